//! The load an upgrade (or an HAProxy reload) must not disturb: client
//! threads that open short connections as fast as they can (one message,
//! its echo, a half-close, EOF), and long streams that carry a seeded byte
//! stream through the whole run, each byte checked as its echo comes back.
//!
//! Every failure is classified by what the client saw, so a report tells a
//! refused connect (nothing listened, or the queue was dropped) from a reset
//! (a queued or open connection thrown away) from wrong or missing bytes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::{Pattern, Sha256, Sink, IO_TIMEOUT};

/// Bytes a long stream sends before it reads their echo back.
const CHUNK: usize = 16 * 1024;
/// The pause after each round trip of a long stream: a few MB/s each, so the
/// streams run all the time without taking the CPU from the upgrades.
const PACE: Duration = Duration::from_millis(2);
/// How many failures are described in a report (the rest are only counted).
const DESCRIBED: usize = 20;

/// What went wrong with one connection, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// The connect was refused.
    Refused,
    /// A reset (or a write into a reset socket).
    Reset,
    /// Bytes came back that were not the ones sent.
    Wrong,
    /// EOF before the whole echo came back.
    Cut,
    /// No progress within [`IO_TIMEOUT`].
    Stalled,
    /// Anything else (e.g. no local port left).
    Other,
}

fn classify(e: &io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => Failure::Reset,
        io::ErrorKind::UnexpectedEof => Failure::Cut,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::Stalled,
        _ => Failure::Other,
    }
}

/// The shared counters of a run.
#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    wrong: AtomicU64,
    cut: AtomicU64,
    stalled: AtomicU64,
    other: AtomicU64,
    described: Mutex<Vec<String>>,
}

impl Counts {
    fn fail(&self, started: Instant, failure: Failure, what: String) {
        let counter = match failure {
            Failure::Refused => &self.refused,
            Failure::Reset => &self.reset,
            Failure::Wrong => &self.wrong,
            Failure::Cut => &self.cut,
            Failure::Stalled => &self.stalled,
            Failure::Other => &self.other,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut described) = self.described.lock() {
            if described.len() < DESCRIBED {
                described.push(format!("at {:.3}s: {failure:?}: {what}", started.elapsed().as_secs_f64()));
            }
        }
    }
}

/// What a finished run saw.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Short connections that did everything right.
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    pub wrong: u64,
    pub cut: u64,
    pub stalled: u64,
    pub other: u64,
    /// Bytes each long stream carried there and back, checked.
    pub long_bytes: Vec<u64>,
    /// How each long stream that failed failed.
    pub long_failures: Vec<String>,
    /// The first failures of short connections, with when they happened.
    pub described: Vec<String>,
}

impl Report {
    /// Failed short connections, of every kind.
    pub fn failed(&self) -> u64 {
        self.refused + self.reset + self.wrong + self.cut + self.stalled + self.other
    }

    /// One line: the counts of every outcome.
    pub fn summary(&self) -> String {
        format!(
            "{} ok, {} refused, {} reset, {} wrong, {} cut, {} stalled, {} other; long streams: {:?} bytes, {} failed",
            self.ok,
            self.refused,
            self.reset,
            self.wrong,
            self.cut,
            self.stalled,
            self.other,
            self.long_bytes,
            self.long_failures.len()
        )
    }

    /// Panics, with the summary and every failure described, unless nothing failed.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(
            self.failed() == 0 && self.long_failures.is_empty(),
            "the load saw failures: {}\nshort connections: {:#?}\nlong streams: {:#?}",
            self.summary(),
            self.described,
            self.long_failures
        );
    }
}

/// A running load on one TCP address.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    short: Vec<JoinHandle<()>>,
    long: Vec<JoinHandle<Result<u64, String>>>,
}

impl Load {
    /// Starts `short` client threads and `long` streams against `addr`; the
    /// long streams are connected (and have made one round trip) on return.
    pub fn start(addr: SocketAddr, short: usize, long: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let long = (0..long)
            .map(|i| {
                let (stop, ready) = (stop.clone(), Arc::new(AtomicBool::new(false)));
                let handle = {
                    let ready = ready.clone();
                    thread::spawn(move || long_stream(addr, 1000 + i as u64, &stop, &ready))
                };
                let connected = crate::support::wait_until(crate::support::DEADLINE, || {
                    ready.load(Ordering::SeqCst) || handle.is_finished()
                });
                assert!(connected, "long stream {i} made no round trip");
                handle
            })
            .collect();
        let short = (0..short)
            .map(|t| {
                let (stop, counts) = (stop.clone(), counts.clone());
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        // Unique bytes per connection, so a mix-up shows as wrong bytes.
                        let message = format!("client {t} connection {n} {:0>64}\n", n.wrapping_mul(2_654_435_761));
                        match short_connection(addr, message.as_bytes()) {
                            Ok(()) => {
                                counts.ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Err((failure, what)) => counts.fail(started, failure, format!("client {t}/{n}: {what}")),
                        }
                    }
                })
            })
            .collect();
        Load { stop, counts, short, long }
    }

    /// Short connections that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.counts.ok.load(Ordering::SeqCst)
    }

    /// Failed short connections so far.
    pub fn failed(&self) -> u64 {
        let c = &self.counts;
        [&c.refused, &c.reset, &c.wrong, &c.cut, &c.stalled, &c.other].iter().map(|n| n.load(Ordering::SeqCst)).sum()
    }

    /// Waits until `n` more short connections have succeeded (or `within` passed).
    pub fn wait_more(&self, n: u64, within: Duration) -> bool {
        let from = self.ok();
        crate::support::wait_until(within, || self.ok() >= from + n)
    }

    /// The failures described so far.
    pub fn described(&self) -> Vec<String> {
        self.counts.described.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Stops every client; the long streams half-close and read their echo to
    /// EOF. Returns what the whole run saw.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        for handle in std::mem::take(&mut self.short) {
            handle.join().expect("a short-connection thread");
        }
        let mut report = Report::default();
        for (i, handle) in std::mem::take(&mut self.long).into_iter().enumerate() {
            match handle.join().expect("a long-stream thread") {
                Ok(bytes) => report.long_bytes.push(bytes),
                Err(why) => report.long_failures.push(format!("long stream {i}: {why}")),
            }
        }
        let c = &self.counts;
        let get = |n: &AtomicU64| n.load(Ordering::SeqCst);
        report.ok = get(&c.ok);
        report.refused = get(&c.refused);
        report.reset = get(&c.reset);
        report.wrong = get(&c.wrong);
        report.cut = get(&c.cut);
        report.stalled = get(&c.stalled);
        report.other = get(&c.other);
        report.described = self.described();
        report
    }
}

impl Drop for Load {
    /// A test that fails midway stops its clients too (they end within [`IO_TIMEOUT`]).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One short connection: connect, send `message`, read its echo, half-close,
/// and read EOF.
fn short_connection(addr: SocketAddr, message: &[u8]) -> Result<(), (Failure, String)> {
    let fail = |step: &str, e: io::Error| (classify(&e), format!("{step}: {e}"));
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| fail("connect", e))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| fail("set timeout", e))?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| fail("set timeout", e))?;
    stream.write_all(message).map_err(|e| fail("send", e))?;
    let mut echo = vec![0; message.len()];
    stream.read_exact(&mut echo).map_err(|e| fail("read the echo", e))?;
    if echo != message {
        return Err((Failure::Wrong, format!("sent {:?}, got {:?}", String::from_utf8_lossy(message), echo)));
    }
    stream.shutdown(Shutdown::Write).map_err(|e| fail("half-close", e))?;
    let mut rest = [0u8; 64];
    match stream.read(&mut rest) {
        Ok(0) => Ok(()),
        Ok(n) => Err((Failure::Wrong, format!("{n} bytes after the echo"))),
        Err(e) => Err(fail("read EOF", e)),
    }
}

/// A long stream: seeded chunks there and back, every byte checked, until
/// `stop`; then a half-close and EOF. Returns the bytes carried, or what
/// went wrong. Sets `ready` after the first round trip.
fn long_stream(addr: SocketAddr, seed: u64, stop: &AtomicBool, ready: &AtomicBool) -> Result<u64, String> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let (mut source, mut sent_hash, mut sink) = (Pattern::new(seed), Sha256::new(), Sink::new(seed, true));
    let (mut out, mut back) = (vec![0; CHUNK], vec![0; CHUNK]);
    let started = Instant::now();
    let at = |sink: &Sink| format!("after {} bytes, {:.3}s in", sink.received(), started.elapsed().as_secs_f64());
    while !stop.load(Ordering::SeqCst) {
        source.fill(&mut out);
        sent_hash.update(&out);
        stream.write_all(&out).map_err(|e| format!("send {}: {e}", at(&sink)))?;
        stream.read_exact(&mut back).map_err(|e| format!("read the echo {}: {e}", at(&sink)))?;
        sink.feed(&back)?;
        ready.store(true, Ordering::SeqCst);
        thread::sleep(PACE);
    }
    stream.shutdown(Shutdown::Write).map_err(|e| format!("half-close {}: {e}", at(&sink)))?;
    match stream.read(&mut back) {
        Ok(0) => {}
        Ok(n) => return Err(format!("{n} bytes after the last echo")),
        Err(e) => return Err(format!("read EOF {}: {e}", at(&sink))),
    }
    let (sent, got) = (sent_hash.finish_hex(), sink.sha256().unwrap_or_default());
    if sent != got {
        return Err(format!("SHA-256 of what was sent {sent} but of what came back {got}"));
    }
    Ok(sink.received())
}
