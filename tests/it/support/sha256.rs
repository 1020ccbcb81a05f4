//! A small SHA-256 (FIPS 180-4), enough to fingerprint each direction of a big
//! transfer without a hash crate. Checked against the FIPS test vectors below.

/// Incremental SHA-256: `update` any number of times, then `finish`.
#[derive(Clone, Debug)]
pub struct Sha256 {
    state: [u32; 8],
    block: [u8; 64],
    filled: usize,
    total: u64,
}

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2,
];

const INITIAL: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

impl Sha256 {
    /// A hasher that has seen no bytes.
    pub fn new() -> Sha256 {
        Sha256 { state: INITIAL, block: [0; 64], filled: 0, total: 0 }
    }

    /// Feeds `data` into the hash.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.filled > 0 {
            let take = (64 - self.filled).min(data.len());
            self.block[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < 64 {
                return;
            }
            let block = self.block;
            compress(&mut self.state, &block);
            self.filled = 0;
        }
        let mut blocks = data.chunks_exact(64);
        for block in &mut blocks {
            compress(&mut self.state, block);
        }
        let rest = blocks.remainder();
        self.block[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Pads, finishes and returns the digest as lower-case hex.
    pub fn finish_hex(mut self) -> String {
        let bits = self.total.wrapping_mul(8);
        let mut pad = [0u8; 72];
        pad[0] = 0x80;
        // Pad to 56 mod 64, then the 8-byte big-endian bit length.
        let zeros = (119 - (self.total % 64) as usize) % 64;
        pad[1 + zeros..9 + zeros].copy_from_slice(&bits.to_be_bytes());
        let total = self.total;
        self.update(&pad[..9 + zeros]);
        debug_assert_eq!(self.filled, 0, "padding of {total} bytes must end on a block boundary");
        self.state.iter().map(|word| format!("{word:08x}")).collect()
    }
}

// Written for speed in unoptimised test builds: one round per macro
// expansion with the working variables renamed instead of shuffled, and the
// message schedule kept in a 16-word ring.
macro_rules! round {
    ($w:ident, $i:expr, $a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident) => {
        if $i >= 16 {
            let w15 = $w[($i + 1) & 15];
            let w2 = $w[($i + 14) & 15];
            let s0 = w15.rotate_right(7) ^ w15.rotate_right(18) ^ (w15 >> 3);
            let s1 = w2.rotate_right(17) ^ w2.rotate_right(19) ^ (w2 >> 10);
            $w[$i & 15] = $w[$i & 15].wrapping_add(s0).wrapping_add($w[($i + 9) & 15]).wrapping_add(s1);
        }
        let t1 = $h
            .wrapping_add($e.rotate_right(6) ^ $e.rotate_right(11) ^ $e.rotate_right(25))
            .wrapping_add(($e & $f) ^ (!$e & $g))
            .wrapping_add(K[$i])
            .wrapping_add($w[$i & 15]);
        let t2 = ($a.rotate_right(2) ^ $a.rotate_right(13) ^ $a.rotate_right(22))
            .wrapping_add(($a & $b) ^ ($a & $c) ^ ($b & $c));
        $d = $d.wrapping_add(t1);
        $h = t1.wrapping_add(t2);
    };
}

macro_rules! eight_rounds {
    ($w:ident, $i:expr, $a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident) => {
        round!($w, $i, $a, $b, $c, $d, $e, $f, $g, $h);
        round!($w, $i + 1, $h, $a, $b, $c, $d, $e, $f, $g);
        round!($w, $i + 2, $g, $h, $a, $b, $c, $d, $e, $f);
        round!($w, $i + 3, $f, $g, $h, $a, $b, $c, $d, $e);
        round!($w, $i + 4, $e, $f, $g, $h, $a, $b, $c, $d);
        round!($w, $i + 5, $d, $e, $f, $g, $h, $a, $b, $c);
        round!($w, $i + 6, $c, $d, $e, $f, $g, $h, $a, $b);
        round!($w, $i + 7, $b, $c, $d, $e, $f, $g, $h, $a);
    };
}

fn compress(state: &mut [u32; 8], block: &[u8]) {
    let mut w = [0u32; 16];
    for (j, word) in w.iter_mut().enumerate() {
        let at = 4 * j;
        *word = u32::from(block[at]) << 24
            | u32::from(block[at + 1]) << 16
            | u32::from(block[at + 2]) << 8
            | u32::from(block[at + 3]);
    }
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    eight_rounds!(w, 0, a, b, c, d, e, f, g, h);
    eight_rounds!(w, 8, a, b, c, d, e, f, g, h);
    eight_rounds!(w, 16, a, b, c, d, e, f, g, h);
    eight_rounds!(w, 24, a, b, c, d, e, f, g, h);
    eight_rounds!(w, 32, a, b, c, d, e, f, g, h);
    eight_rounds!(w, 40, a, b, c, d, e, f, g, h);
    eight_rounds!(w, 48, a, b, c, d, e, f, g, h);
    eight_rounds!(w, 56, a, b, c, d, e, f, g, h);
    for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
        *s = s.wrapping_add(v);
    }
}

#[cfg(test)]
mod tests {
    use super::Sha256;

    #[track_caller]
    fn check(input: &[u8], expected: &str) {
        let mut hash = Sha256::new();
        hash.update(input);
        assert_eq!(hash.finish_hex(), expected, "sha256 of {} bytes", input.len());
    }

    #[test]
    fn sha256_matches_fips_vectors() {
        check(b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        check(b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        check(
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        );
    }

    #[test]
    fn sha256_split_updates_match_one_update() {
        // One million 'a' (FIPS 180-2 appendix B.3), fed in uneven pieces so
        // the partial-block path is exercised.
        let data = vec![b'a'; 1_000_000];
        let mut hash = Sha256::new();
        for piece in data.chunks(999) {
            hash.update(piece);
        }
        assert_eq!(hash.len(), 1_000_000);
        assert_eq!(hash.finish_hex(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    }
}
