//! Fixed-capacity relay buffers and the pool that lends them out.
//!
//! A buffer is a flat byte array with `head..tail` holding unsent bytes. It is
//! reset to the start whenever it empties (the common case in a relay) and
//! compacted only when the free tail is too small to read into, which is
//! simpler than a ring and rarely copies. Buffers are borrowed from the pool
//! only while a direction has bytes in flight, so an idle pair holds none.

use std::io::{self, Read, Write};

/// Capacity of one relay buffer: the most one direction of a pair holds (reference §3).
pub const BUF_SIZE: usize = 32 * 1024;

/// Below this much free tail space a buffer with a consumed head is compacted before reading.
const COMPACT_BELOW: usize = 4 * 1024;

/// What one read or write syscall did; EOF and failure are kept apart (a reset is not a half-close).
#[derive(Debug)]
pub enum Transfer {
    /// This many bytes moved (never 0).
    Moved(usize),
    /// The socket is not ready; wait for its next readiness event.
    WouldBlock,
    /// The peer ended its stream (read returned 0).
    Eof,
    /// The socket failed (reset, broken pipe, ...).
    Failed(io::Error),
}

/// A fixed-capacity byte buffer holding the bytes read from one peer and not yet written to the other.
#[derive(Debug)]
pub struct Buffer {
    data: Box<[u8]>,
    head: usize,
    tail: usize,
}

impl Buffer {
    fn new() -> Self {
        Buffer { data: vec![0; BUF_SIZE].into_boxed_slice(), head: 0, tail: 0 }
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.tail - self.head
    }

    /// Whether no bytes are waiting.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Whether another read could add bytes.
    pub fn has_room(&self) -> bool {
        self.len() < self.data.len()
    }

    /// The bytes waiting to be written.
    pub fn data(&self) -> &[u8] {
        &self.data[self.head..self.tail]
    }

    /// Marks `n` waiting bytes as written.
    pub fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.tail);
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    fn space(&mut self) -> &mut [u8] {
        if self.data.len() - self.tail < COMPACT_BELOW && self.head > 0 {
            self.data.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        &mut self.data[self.tail..]
    }

    /// How many bytes the next read may take (compacting first if that frees more).
    pub fn space_len(&mut self) -> usize {
        self.space().len()
    }

    /// Appends `bytes` as far as they fit and returns how many did.
    #[cfg(test)]
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let space = self.space();
        let n = space.len().min(bytes.len());
        space[..n].copy_from_slice(&bytes[..n]);
        self.tail += n;
        n
    }

    /// One read from `src` into the free space; retries `Interrupted`.
    pub fn read_from(&mut self, src: &mut impl Read) -> Transfer {
        loop {
            let space = self.space();
            if space.is_empty() {
                return Transfer::Moved(0).normalise();
            }
            match src.read(space) {
                Ok(0) => return Transfer::Eof,
                Ok(n) => {
                    self.tail += n;
                    return Transfer::Moved(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Transfer::WouldBlock,
                Err(e) => return Transfer::Failed(e),
            }
        }
    }

    /// One write of the waiting bytes to `dst`; retries `Interrupted`.
    pub fn write_to(&mut self, dst: &mut impl Write) -> Transfer {
        loop {
            if self.is_empty() {
                return Transfer::Moved(0).normalise();
            }
            match dst.write(self.data()) {
                Ok(0) => return Transfer::Failed(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.consume(n);
                    return Transfer::Moved(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Transfer::WouldBlock,
                Err(e) => return Transfer::Failed(e),
            }
        }
    }
}

impl Transfer {
    // Callers never ask for a zero-byte transfer; if one slips through, report
    // "not ready" rather than a zero-length move that could loop.
    fn normalise(self) -> Transfer {
        match self {
            Transfer::Moved(0) => Transfer::WouldBlock,
            other => other,
        }
    }
}

/// Free buffers kept for reuse, at most `max_free` of them.
#[derive(Debug)]
pub struct BufferPool {
    free: Vec<Buffer>,
    max_free: usize,
}

impl BufferPool {
    /// A pool that keeps at most `max_free` idle buffers around.
    pub fn new(max_free: usize) -> Self {
        BufferPool { free: Vec::new(), max_free }
    }

    /// An empty buffer, reused when one is free.
    pub fn take(&mut self) -> Buffer {
        self.free.pop().unwrap_or_else(Buffer::new)
    }

    /// Returns a buffer; its contents are discarded.
    pub fn give(&mut self, mut buf: Buffer) {
        if self.free.len() < self.max_free {
            buf.head = 0;
            buf.tail = 0;
            self.free.push(buf);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// One scripted outcome of a mock syscall.
    #[derive(Debug)]
    pub(crate) enum Op {
        Data(Vec<u8>),
        Accept(usize),
        Block,
        Interrupt,
        Eof,
        Reset,
    }

    /// A stream whose reads and writes follow a script; unscripted calls would block.
    #[derive(Debug, Default)]
    pub(crate) struct Script {
        pub reads: VecDeque<Op>,
        pub writes: VecDeque<Op>,
        pub written: Vec<u8>,
        pub shutdowns: std::cell::Cell<u32>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.reads.pop_front() {
                Some(Op::Data(mut bytes)) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.reads.push_front(Op::Data(bytes.split_off(n)));
                    }
                    Ok(n)
                }
                Some(Op::Eof) => Ok(0),
                Some(Op::Interrupt) => Err(io::ErrorKind::Interrupted.into()),
                Some(Op::Reset) => Err(io::ErrorKind::ConnectionReset.into()),
                Some(Op::Block) | Some(Op::Accept(_)) | None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.writes.pop_front() {
                Some(Op::Accept(n)) => {
                    let n = n.min(buf.len());
                    self.written.extend_from_slice(&buf[..n]);
                    Ok(n)
                }
                Some(Op::Interrupt) => Err(io::ErrorKind::Interrupted.into()),
                Some(Op::Reset) => Err(io::ErrorKind::BrokenPipe.into()),
                _ => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn read_then_write_moves_bytes_and_resets_when_empty() {
        let mut buf = Buffer::new();
        let mut s = Script::default();
        s.reads.push_back(Op::Data(b"hello".to_vec()));
        s.writes.push_back(Op::Accept(2));
        s.writes.push_back(Op::Accept(10));
        assert!(matches!(buf.read_from(&mut s), Transfer::Moved(5)));
        assert!(matches!(buf.write_to(&mut s), Transfer::Moved(2)));
        assert_eq!(buf.data(), b"llo");
        assert!(matches!(buf.write_to(&mut s), Transfer::Moved(3)));
        assert!(buf.is_empty());
        assert_eq!((buf.head, buf.tail), (0, 0));
        assert_eq!(s.written, b"hello");
    }

    #[test]
    fn read_outcomes_keep_eof_reset_and_wouldblock_apart() {
        let mut buf = Buffer::new();
        let mut s = Script::default();
        s.reads.extend([Op::Interrupt, Op::Block, Op::Eof, Op::Reset]);
        assert!(matches!(buf.read_from(&mut s), Transfer::WouldBlock), "interrupted is retried");
        assert!(matches!(buf.read_from(&mut s), Transfer::Eof));
        assert!(matches!(buf.read_from(&mut s), Transfer::Failed(_)));
    }

    #[test]
    fn write_zero_and_broken_pipe_fail() {
        let mut buf = Buffer::new();
        buf.fill(b"x");
        let mut s = Script::default();
        s.writes.extend([Op::Accept(0), Op::Reset]);
        assert!(matches!(buf.write_to(&mut s), Transfer::Failed(_)));
        assert!(matches!(buf.write_to(&mut s), Transfer::Failed(_)));
    }

    #[test]
    fn full_buffer_has_no_room_and_compacts_after_partial_write() {
        let mut buf = Buffer::new();
        assert_eq!(buf.fill(&vec![7; BUF_SIZE + 10]), BUF_SIZE);
        assert!(!buf.has_room());
        buf.consume(BUF_SIZE - 100);
        assert!(buf.has_room());
        assert_eq!(buf.fill(&[1; 50]), 50);
        assert_eq!(buf.len(), 150);
        assert_eq!(buf.head, 0, "compacted before the read");
    }

    #[test]
    fn pool_reuses_and_bounds_free_buffers() {
        let mut pool = BufferPool::new(1);
        let a = pool.take();
        let b = pool.take();
        pool.give(a);
        pool.give(b);
        assert_eq!(pool.free.len(), 1);
    }
}
