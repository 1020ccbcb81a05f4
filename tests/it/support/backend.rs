//! Test backends: small blocking servers on threads, each stopped (and its
//! connections ended) when its handle is dropped, plus the two kinds of dead
//! address (`refusing`, `blackhole`). Every socket has a timeout.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use super::pattern::Source;

/// How often a blocked backend socket wakes up to look at its stop flag.
const TICK: Duration = Duration::from_millis(50);
/// A backend connection with no progress for this long gives up.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Chunk size of the built-in handlers.
const CHUNK: usize = 64 * 1024;

/// A running test backend. Dropping it stops the accept loop and makes every
/// connection handler return within a tick.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// One accepted backend connection, handed to the handler on its own thread.
/// Reads and writes block until progress, EOF, error, or the backend stops.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
}

impl Backend {
    /// Listens on 127.0.0.1:0 and runs `handler` on a new thread for each connection.
    pub fn spawn<F>(handler: F) -> Backend
    where
        F: Fn(Conn) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a test backend");
        let addr = listener.local_addr().expect("backend address");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let handler = Arc::new(handler);
        let thread = {
            let (stop, accepted, bytes) = (stop.clone(), accepted.clone(), bytes.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    stream.set_read_timeout(Some(TICK)).expect("set backend read timeout");
                    stream.set_write_timeout(Some(TICK)).expect("set backend write timeout");
                    let conn = Conn { stream, stop: stop.clone(), bytes: bytes.clone() };
                    let handler = handler.clone();
                    thread::spawn(move || handler(conn));
                }
            })
        };
        Backend { addr, stop, accepted, bytes, thread: Some(thread) }
    }

    /// The backend's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address as a config string, `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Bytes the built-in handlers counted: written by `stream`, read by `sink`.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; if even that fails, leave the thread behind.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn waiting(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

impl Conn {
    fn stopped(&self, since: Instant) -> io::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("test backend stopped"));
        }
        if since.elapsed() > IDLE_LIMIT {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "test backend connection idle too long"));
        }
        Ok(())
    }

    /// Reads once: `Ok(0)` is EOF.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            match self.stream.read(buf) {
                Err(e) if waiting(&e) => self.stopped(since)?,
                result => return result,
            }
        }
    }

    /// Writes all of `buf`.
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        let mut since = Instant::now();
        while !buf.is_empty() {
            match self.stream.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    since = Instant::now();
                }
                Err(e) if waiting(&e) => self.stopped(since)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads until EOF, returning everything read.
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        let mut buf = vec![0; CHUNK];
        loop {
            match self.read(&mut buf)? {
                0 => return Ok(all),
                n => all.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Reads and discards until the peer closes or `within` has passed: how
    /// many bytes came first, and whether the close was a reset (else EOF).
    pub fn drain_until_closed(&mut self, within: Duration) -> Result<(u64, bool), String> {
        let deadline = Instant::now() + within;
        let mut buf = vec![0; CHUNK];
        let mut total = 0u64;
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok((total, false)),
                Ok(n) => total += n as u64,
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
                    return Ok((total, true))
                }
                Err(e) if waiting(&e) => {
                    if Instant::now() >= deadline {
                        return Err(format!("still open after {within:?} and {total} bytes"));
                    }
                }
                Err(e) => return Err(format!("read failed after {total} bytes: {e}")),
            }
        }
    }

    /// Sends FIN; the read side stays open.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    /// Closes the connection with a reset (`SO_LINGER` 0): the kernel sends RST, not FIN.
    pub fn reset(self) -> io::Result<()> {
        socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO))
    }

    /// A second handle on the same socket, for a writer thread.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn { stream: self.stream.try_clone()?, stop: self.stop.clone(), bytes: self.bytes.clone() })
    }

    /// Adds `n` to the backend's byte counter.
    pub fn count(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::SeqCst);
    }

    /// Echoes until EOF, then shuts its write side (propagating the half-close).
    pub fn echo(&mut self) -> io::Result<()> {
        let mut buf = vec![0; CHUNK];
        loop {
            match self.read(&mut buf)? {
                0 => return self.shutdown_write(),
                n => self.write_all(&buf[..n])?,
            }
        }
    }
}

/// Echoes every connection until EOF, then shuts its write side.
pub fn echo() -> Backend {
    Backend::spawn(|mut conn| {
        let _ = conn.echo();
    })
}

/// Writes `TAG\n` on accept, then echoes: tells a client which backend it reached.
pub fn named(tag: &str) -> Backend {
    let greeting = format!("{tag}\n");
    Backend::spawn(move |mut conn| {
        if conn.write_all(greeting.as_bytes()).is_ok() {
            let _ = conn.echo();
        }
    })
}

/// Reads and counts everything until EOF, then shuts its write side.
pub fn sink() -> Backend {
    Backend::spawn(|mut conn| {
        let mut buf = vec![0; CHUNK];
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            conn.count(n);
        }
        let _ = conn.shutdown_write();
    })
}

/// Sends `total` bytes of the seeded stream `seed` (counting them as they are
/// written), shuts its write side, then reads until the client's EOF.
pub fn stream(seed: u64, total: u64) -> Backend {
    Backend::spawn(move |mut conn| {
        let mut source = Source::new(seed, total);
        let mut buf = vec![0; CHUNK];
        while let Some(chunk) = source.next_chunk(&mut buf) {
            if conn.write_all(chunk).is_err() {
                return;
            }
            conn.count(chunk.len());
        }
        if conn.shutdown_write().is_ok() {
            let _ = conn.read_to_end();
        }
    })
}

/// A backend that accepts and then never reads: each connection is held,
/// untouched, until the test takes it ([`Stall::take`]) or the backend is dropped.
#[derive(Debug)]
pub struct Stall {
    backend: Backend,
    held: Arc<Mutex<Vec<Conn>>>,
}

impl Stall {
    /// The backend's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.backend.addr()
    }

    /// The address as a config string.
    pub fn address(&self) -> String {
        self.backend.address()
    }

    /// Waits up to `within` until `n` connections are held and takes them, in accept order.
    pub fn take(&self, n: usize, within: Duration) -> Option<Vec<Conn>> {
        let deadline = Instant::now() + within;
        loop {
            {
                let mut held = self.held.lock().expect("held connections");
                if held.len() >= n {
                    return Some(held.drain(..n).collect());
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Accepts and holds every connection without reading a byte.
pub fn stall() -> Stall {
    let held = Arc::new(Mutex::new(Vec::new()));
    let backend = {
        let held = held.clone();
        Backend::spawn(move |conn| held.lock().expect("held connections").push(conn))
    };
    Stall { backend, held }
}

/// An address nothing listens on: connects are refused. The port stays bound
/// (never listening) for the rest of the test process, so no test running at
/// the same time can be handed it and turn it into a live address.
pub fn refusing() -> SocketAddr {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket for a refusing address");
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).expect("bind for a refusing address");
    let addr = socket.local_addr().ok().and_then(|a| a.as_socket()).expect("refusing address");
    std::mem::forget(socket);
    addr
}

/// A listener whose accept queue is full and never drained: a connect to it
/// neither completes nor fails, it hangs until the connector's own deadline.
#[derive(Debug)]
pub struct Blackhole {
    addr: SocketAddr,
    _listener: Socket,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    /// The address whose connects hang.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address as a config string.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }
}

/// Listens with backlog 0 and connects until the queue is full (Linux then
/// drops further SYNs), keeping the queued connections open.
pub fn blackhole() -> Blackhole {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("blackhole socket");
    listener.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).expect("bind blackhole");
    listener.listen(0).expect("listen blackhole");
    let addr = listener.local_addr().expect("blackhole address").as_socket().expect("an inet address");
    let mut queued = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Blackhole { addr, _listener: listener, _queued: queued };
            }
            Err(e) => panic!("filling the blackhole's accept queue: {e}"),
        }
    }
    panic!("the blackhole's accept queue took 16 connections and is still not full");
}
