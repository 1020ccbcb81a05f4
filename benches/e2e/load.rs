//! The load generators. They run on the benchmark's own CPU and time only a
//! window after a warm-up; the `Meter` marks the window's edges (CPU readings
//! of the proxy and of this process, and profiling if asked for).
//!
//! - `bulk`: N blocking reader threads draining `source` streams;
//! - `request_response`: one mio loop keeping one small request in flight on
//!   each of N persistent connections;
//! - `connections`: one mio loop keeping N connects in flight, each doing one
//!   small exchange and closing;
//! - `hold_idle`: the same dialer, keeping every connection open afterwards.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

/// Warm-up, then the measured window.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warm: Duration,
    pub run: Duration,
}

/// Readings at one edge of a measured window.
#[derive(Clone, Debug)]
pub struct Snap {
    pub at: Instant,
    /// CPU time of the proxy (all its threads and processes); `None` without a proxy.
    pub proxy: Option<Duration>,
    /// CPU time of each of the proxy's workers (threads or processes), by id;
    /// empty unless it has several.
    pub workers: Vec<(u32, Duration)>,
    /// CPU time of this process: load generators and backends.
    pub load: Duration,
    /// Busy and total ticks of every CPU (`sys::cpu_ticks`).
    pub cores: Vec<(u64, u64)>,
}

/// Marks the edges of a measured window.
pub trait Meter {
    fn begin(&mut self) -> Snap;
    fn end(&mut self) -> Snap;
}

/// What one workload did inside its window.
#[derive(Debug)]
pub struct Outcome {
    pub secs: f64,
    /// Payload bytes received by the clients.
    pub bytes: u64,
    /// Requests answered or connections completed.
    pub ops: u64,
    /// Connections that failed (refused, reset, no local port, ...).
    pub errors: u64,
    /// The last failure, to say what went wrong.
    pub last_error: Option<String>,
    /// Per-operation latencies in nanoseconds.
    pub latencies: Vec<u32>,
    pub proxy_cpu: Option<Duration>,
    /// CPU time of each proxy worker that lived through the whole window.
    pub worker_cpu: Vec<Duration>,
    pub load_cpu: Duration,
    /// Fraction of each CPU's time it was busy (anything but idle), whoever ran.
    pub core_busy: Vec<f64>,
}

impl Outcome {
    fn new(start: &Snap, end: &Snap) -> Outcome {
        Outcome {
            secs: end.at.duration_since(start.at).as_secs_f64(),
            bytes: 0,
            ops: 0,
            errors: 0,
            last_error: None,
            latencies: Vec::new(),
            proxy_cpu: end.proxy.zip(start.proxy).map(|(e, s)| e.saturating_sub(s)),
            worker_cpu: end
                .workers
                .iter()
                .filter_map(|&(id, e)| start.workers.iter().find(|&&(i, _)| i == id).map(|&(_, s)| e.saturating_sub(s)))
                .collect(),
            load_cpu: end.load.saturating_sub(start.load),
            core_busy: end
                .cores
                .iter()
                .zip(&start.cores)
                .map(|(e, s)| {
                    let total = e.1.saturating_sub(s.1);
                    if total == 0 {
                        0.0
                    } else {
                        e.0.saturating_sub(s.0) as f64 / total as f64
                    }
                })
                .collect(),
        }
    }

    /// The `q` quantile (0..=1) of the latencies, in microseconds.
    pub fn quantile_us(&mut self, q: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        let (_, value, _) = self.latencies.select_nth_unstable(rank);
        Some(f64::from(*value) / 1_000.0)
    }
}

fn nanos(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

/// Bulk download: `streams` connections to `addr`, each drained by its own blocking thread.
pub fn bulk(addr: SocketAddr, streams: usize, timing: Timing, meter: &mut dyn Meter) -> io::Result<Outcome> {
    let received = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..streams {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (received, failed, stop) = (received.clone(), failed.clone(), stop.clone());
        threads.push(thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    thread::sleep(timing.warm);
    let before = received.load(Ordering::Relaxed);
    let start = meter.begin();
    thread::sleep(timing.run);
    let end = meter.end();
    let after = received.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let mut outcome = Outcome::new(&start, &end);
    outcome.bytes = after - before;
    outcome.errors = failed.load(Ordering::Relaxed);
    if outcome.errors > 0 {
        outcome.last_error = Some("a stream ended early".into());
    }
    Ok(outcome)
}

/// Small requests over `conns` persistent connections, one in flight on each, answered by `echo`.
pub fn request_response(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    timing: Timing,
    meter: &mut dyn Meter,
) -> io::Result<Outcome> {
    let request = vec![b'r'; size];
    let mut poll = Poll::new()?;
    let mut streams = Vec::with_capacity(conns);
    for i in 0..conns {
        // One blocking exchange first: the path through the proxy is up before the clock starts.
        let mut std_stream = std::net::TcpStream::connect(addr)?;
        std_stream.set_nodelay(true)?;
        std_stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        std_stream.write_all(&request)?;
        std_stream.read_exact(&mut vec![0; size])?;
        std_stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std_stream);
        poll.registry().register(&mut stream, Token(i), Interest::READABLE)?;
        streams.push(stream);
    }
    let mut sent = vec![Instant::now(); conns];
    let mut got = vec![0usize; conns];
    let mut buf = vec![0u8; 64 * 1024];
    let mut latencies = Vec::with_capacity(4 << 20);
    let mut ops = 0u64;
    let mut events = Events::with_capacity(1024);

    let begun = Instant::now();
    let (measure_at, stop_at) = (begun + timing.warm, begun + timing.warm + timing.run);
    let mut start: Option<Snap> = None;
    for (i, stream) in streams.iter_mut().enumerate() {
        write_request(stream, &request)?;
        sent[i] = Instant::now();
    }
    let end = loop {
        poll.poll(&mut events, Some(Duration::from_millis(5)))?;
        let now = Instant::now();
        if start.is_none() && now >= measure_at {
            start = Some(meter.begin());
        }
        if now >= stop_at {
            break meter.end();
        }
        let measuring = start.is_some();
        for event in events.iter() {
            let i = event.token().0;
            let stream = &mut streams[i];
            // A short read took all there was (see `backend::pump_echo`).
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the proxy closed a connection")),
                    Ok(n) => {
                        got[i] += n;
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if got[i] >= size {
                got[i] -= size;
                let done = Instant::now();
                if measuring {
                    latencies.push(nanos(done - sent[i]));
                    ops += 1;
                }
                write_request(stream, &request)?;
                sent[i] = done;
            }
        }
    };
    let start = start.unwrap_or_else(|| end.clone());
    let mut outcome = Outcome::new(&start, &end);
    outcome.ops = ops;
    outcome.bytes = ops * size as u64;
    outcome.latencies = latencies;
    Ok(outcome)
}

fn write_request(stream: &mut TcpStream, request: &[u8]) -> io::Result<()> {
    match stream.write(request) {
        Ok(n) if n == request.len() => Ok(()),
        Ok(n) => Err(io::Error::other(format!("short write of a {}-byte request: {n}", request.len()))),
        Err(e) => Err(e),
    }
}

/// One slot of the dialer: a connection being opened and used for one exchange.
struct Slot {
    stream: Option<TcpStream>,
    generation: usize,
    started: Instant,
    sent: bool,
    got: usize,
}

/// Keeps up to `slots` connects in flight; each connection sends one request
/// and is complete when the whole echo has come back.
struct Dialer {
    addr: SocketAddr,
    request: Vec<u8>,
    poll: Poll,
    events: Events,
    slots: Vec<Slot>,
    buf: Vec<u8>,
    errors: u64,
    last_error: Option<String>,
}

const SLOT_BITS: usize = 20;

impl Dialer {
    fn new(addr: SocketAddr, slots: usize, size: usize) -> io::Result<Dialer> {
        assert!(slots < 1 << SLOT_BITS);
        let now = Instant::now();
        Ok(Dialer {
            addr,
            request: vec![b'c'; size],
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            slots: (0..slots)
                .map(|_| Slot { stream: None, generation: 0, started: now, sent: false, got: 0 })
                .collect(),
            buf: vec![0u8; 16 * 1024],
            errors: 0,
            last_error: None,
        })
    }

    fn idle_slots(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].stream.is_none()).collect()
    }

    fn fail(&mut self, i: usize, e: io::Error) {
        self.errors += 1;
        self.last_error = Some(e.to_string());
        self.slots[i].stream = None;
    }

    /// Starts a connection in the empty slot `i` and sends the request if the connect completed at once.
    fn start(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.started = Instant::now();
        slot.sent = false;
        slot.got = 0;
        let token = Token(slot.generation << SLOT_BITS | i);
        let opened = TcpStream::connect(self.addr).and_then(|mut stream| {
            stream.set_nodelay(true)?;
            self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        });
        match opened {
            Ok(stream) => {
                self.slots[i].stream = Some(stream);
                self.try_send(i);
            }
            Err(e) => self.fail(i, e),
        }
    }

    fn try_send(&mut self, i: usize) {
        let Some(stream) = self.slots[i].stream.as_mut() else { return };
        match stream.write(&self.request) {
            Ok(n) if n == self.request.len() => self.slots[i].sent = true,
            Ok(n) => self.fail(i, io::Error::other(format!("short write of a request: {n}"))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected) => {}
            Err(e) => self.fail(i, e),
        }
    }

    /// Waits for events once and drives the slots; completed connections (with
    /// their connect-to-reply time) are moved out into `done`, leaving their slots empty.
    fn turn(&mut self, timeout: Duration, done: &mut Vec<(TcpStream, Duration)>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let tokens: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
        for token in tokens {
            let (i, generation) = (token & ((1 << SLOT_BITS) - 1), token >> SLOT_BITS);
            if self.slots[i].generation != generation || self.slots[i].stream.is_none() {
                continue; // an event of a connection this slot had before
            }
            if !self.slots[i].sent {
                self.try_send(i);
                if !self.slots[i].sent {
                    continue;
                }
            }
            loop {
                let slot = &mut self.slots[i];
                let Some(stream) = slot.stream.as_mut() else { break };
                match stream.read(&mut self.buf) {
                    Ok(0) => {
                        self.fail(i, io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the reply"));
                        break;
                    }
                    Ok(n) => {
                        slot.got += n;
                        if slot.got >= self.request.len() {
                            let elapsed = slot.started.elapsed();
                            if let Some(stream) = slot.stream.take() {
                                done.push((stream, elapsed));
                            }
                            break;
                        }
                        if n < self.buf.len() {
                            break; // a short read took all there was
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.fail(i, e);
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// New connections: `concurrency` clients each connect, exchange one `size`-byte request and close, in a loop.
pub fn connections(
    addr: SocketAddr,
    concurrency: usize,
    size: usize,
    timing: Timing,
    meter: &mut dyn Meter,
) -> io::Result<Outcome> {
    let mut dialer = Dialer::new(addr, concurrency, size)?;
    let mut done = Vec::with_capacity(1024);
    let mut latencies = Vec::with_capacity(1 << 20);
    let (mut ops, mut errors_before) = (0u64, 0u64);
    let begun = Instant::now();
    let (measure_at, stop_at) = (begun + timing.warm, begun + timing.warm + timing.run);
    let mut start: Option<Snap> = None;
    for i in 0..concurrency {
        dialer.start(i);
    }
    let end = loop {
        dialer.turn(Duration::from_millis(5), &mut done)?;
        let now = Instant::now();
        if start.is_none() && now >= measure_at {
            start = Some(meter.begin());
            errors_before = dialer.errors;
        }
        if now >= stop_at {
            break meter.end();
        }
        for (stream, elapsed) in done.drain(..) {
            drop(stream); // the client closes first, as most do
            if start.is_some() {
                latencies.push(nanos(elapsed));
                ops += 1;
            }
        }
        for i in dialer.idle_slots() {
            dialer.start(i);
        }
    };
    let start = start.unwrap_or_else(|| end.clone());
    let mut outcome = Outcome::new(&start, &end);
    outcome.ops = ops;
    outcome.bytes = ops * size as u64;
    outcome.latencies = latencies;
    outcome.errors = dialer.errors - errors_before;
    outcome.last_error = dialer.last_error.take();
    Ok(outcome)
}

/// Opens `count` connections with one exchange each (so the proxy's backend
/// side is connected too) and returns them open, plus how many failed.
pub fn hold_idle(
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    size: usize,
) -> io::Result<(Vec<TcpStream>, u64, Option<String>)> {
    let mut dialer = Dialer::new(addr, concurrency, size)?;
    let mut done = Vec::with_capacity(concurrency);
    let mut held = Vec::with_capacity(count);
    let mut started = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while held.len() < count {
        for i in dialer.idle_slots() {
            if started < count + dialer.errors as usize {
                dialer.start(i);
                started += 1;
            }
        }
        if dialer.errors > count as u64 / 10 + 10 || Instant::now() > deadline {
            break;
        }
        dialer.turn(Duration::from_millis(20), &mut done)?;
        for (mut stream, _) in done.drain(..) {
            dialer.poll.registry().deregister(&mut stream)?;
            held.push(stream);
        }
    }
    Ok((held, dialer.errors, dialer.last_error.take()))
}
