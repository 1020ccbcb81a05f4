//! Seeded pseudo-random byte streams. Both ends of a transfer generate the same
//! stream from the same seed, so the receiver checks every chunk against its own
//! copy in constant memory and reports the exact offset of the first mismatch.

use super::sha256::Sha256;

/// An endless xorshift64 byte stream.
#[derive(Clone, Debug)]
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    /// The stream for `seed`; different seeds give unrelated streams.
    pub fn new(seed: u64) -> Pattern {
        // Spread small seeds over the whole state; xorshift must not start at 0.
        let state = seed.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Pattern { state, word: [0; 8], used: 8 }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x.to_le_bytes()
    }

    /// Writes the next `buf.len()` bytes of the stream into `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let from_word = (8 - self.used).min(buf.len());
        buf[..from_word].copy_from_slice(&self.word[self.used..self.used + from_word]);
        self.used += from_word;
        let mut words = buf[from_word..].chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.next_word());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_word();
            rest.copy_from_slice(&self.word[..rest.len()]);
            self.used = rest.len();
        }
    }
}

/// The sending end: produces `total` bytes of a seeded stream in chunks and
/// hashes what it produced.
#[derive(Debug)]
pub struct Source {
    pattern: Pattern,
    left: u64,
    hash: Sha256,
}

impl Source {
    /// `total` bytes of the stream for `seed`.
    pub fn new(seed: u64, total: u64) -> Source {
        Source { pattern: Pattern::new(seed), left: total, hash: Sha256::new() }
    }

    /// Fills up to `buf.len()` next bytes into `buf`; `None` once all are produced.
    pub fn next_chunk<'a>(&mut self, buf: &'a mut [u8]) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let n = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.pattern.fill(&mut buf[..n]);
        self.hash.update(&buf[..n]);
        self.left -= n as u64;
        Some(&buf[..n])
    }

    /// The SHA-256 of everything produced so far.
    pub fn sha256(&self) -> String {
        self.hash.clone().finish_hex()
    }
}

/// The receiving end: checks received bytes against the seeded stream as they
/// arrive, counts and (optionally) hashes them.
#[derive(Debug)]
pub struct Sink {
    pattern: Pattern,
    expected: Vec<u8>,
    received: u64,
    hash: Option<Sha256>,
}

impl Sink {
    /// Expects the stream for `seed`; hashes what arrives when `hash` is set.
    pub fn new(seed: u64, hash: bool) -> Sink {
        Sink { pattern: Pattern::new(seed), expected: Vec::new(), received: 0, hash: hash.then(Sha256::new) }
    }

    /// Checks the next received bytes; `Err` names the offset of the first wrong byte.
    pub fn feed(&mut self, got: &[u8]) -> Result<(), String> {
        self.expected.resize(got.len(), 0);
        self.pattern.fill(&mut self.expected);
        if got != self.expected.as_slice() {
            let at = got.iter().zip(&self.expected).position(|(a, b)| a != b).unwrap_or(0);
            let offset = self.received + at as u64;
            return Err(format!(
                "stream differs at byte {offset}: got {:#04x}, expected {:#04x}",
                got[at], self.expected[at]
            ));
        }
        if let Some(hash) = &mut self.hash {
            hash.update(got);
        }
        self.received += got.len() as u64;
        Ok(())
    }

    /// Bytes received and checked so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The SHA-256 of everything received, when hashing was asked for.
    pub fn sha256(&self) -> Option<String> {
        self.hash.as_ref().map(|hash| hash.clone().finish_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::{Pattern, Sink, Source};

    #[test]
    fn pattern_is_the_same_whatever_the_chunking() {
        let mut whole = vec![0; 1000];
        Pattern::new(7).fill(&mut whole);
        let mut pieces = Pattern::new(7);
        let mut joined = Vec::new();
        for size in [1, 3, 8, 13, 64, 5, 906] {
            let mut piece = vec![0; size];
            pieces.fill(&mut piece);
            joined.extend_from_slice(&piece);
        }
        assert_eq!(joined, whole);
        let mut other = vec![0; 1000];
        Pattern::new(8).fill(&mut other);
        assert_ne!(other, whole, "different seeds give different streams");
    }

    #[test]
    fn sink_accepts_its_source_and_names_the_first_wrong_byte() {
        let mut source = Source::new(3, 10_000);
        let mut sink = Sink::new(3, true);
        let mut buf = vec![0; 777];
        while let Some(chunk) = source.next_chunk(&mut buf) {
            sink.feed(chunk).expect("same seed, same bytes");
        }
        assert_eq!(sink.received(), 10_000);
        assert_eq!(sink.sha256(), Some(source.sha256()));

        let mut corrupt = vec![0; 100];
        Pattern::new(4).fill(&mut corrupt);
        corrupt[42] ^= 1;
        let err = Sink::new(4, false).feed(&corrupt).unwrap_err();
        assert!(err.contains("byte 42"), "{err}");
    }
}
