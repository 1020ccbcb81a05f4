//! The proxied pair: one client socket, one backend socket, and the two
//! directions between them. Read reference §3 and design §5–7 first.
//!
//! A pair is first `Connecting` (a nonblocking connect to one backend of its
//! plan, failing over to the next on refusal or deadline), then `Relaying`.
//! Each direction is a `Half`: bytes read from one peer wait in a pooled
//! buffer until written to the other; a full buffer stops reading (the
//! backpressure of reference §3) and an EOF is passed on as `shutdown(Write)` once
//! the buffer is flushed. Both halves shut: the pair is done. Any socket
//! error or idle timeout closes both sides.
//!
//! A pair may be *cut* (its backend marked down or removed, or it reached
//! `max_connection_duration`): it reads nothing more from either side, the
//! backend gets a FIN at once, the client gets what was already buffered for
//! it and then a FIN, and what the client still sends is read and dropped
//! until its EOF, so that the close sends no RST. All this within
//! [`CUT_FLUSH`]; then the pair closes whatever remains.
//!
//! Readiness is cached per socket (edge-triggered epoll): a flag is cleared
//! only when a syscall says `WouldBlock`, so a pair that stops early (full
//! buffer, spent budget) resumes without waiting for an edge that won't come.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::model::endpoint::ClientAddr;
use crate::runtime::conn::Conn;
use log::{debug, info, warn};
use mio::{Interest, Token};

use crate::context::Cx;
use crate::data::buffer::{Buffer, BufferPool, Transfer, BUF_SIZE};
use crate::data::finished::{End, Finished};
use crate::model::config::SendProxy;
use crate::model::health::Transition;
use crate::model::proxy_header::{self, Version};
use crate::model::service::{Label, Limits, Plan};
use crate::runtime::key::{Key, Side};
use crate::runtime::net::{self, ConnectOutcome};
use crate::runtime::ready::{Ready, Step};
use crate::runtime::timer::TimerKey;

/// Bytes one direction may read per wakeup before the pair yields to others (fairness).
const BUDGET: usize = 4 * BUF_SIZE;

/// How long a cut pair may take to flush what it buffered for the client and
/// see the client's EOF before it closes anyway (a client that reads nothing
/// must not hold a cut connection open).
pub const CUT_FLUSH: Duration = Duration::from_secs(2);

/// Why shuttle cut a pair that both peers would have kept open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Its backend was marked down, and the service says `on_backend_down: close`.
    BackendDown,
    /// Its backend was removed with `DELETE /{service}/{backend}?close`.
    BackendRemoved,
    /// Its service was removed with `DELETE /{service}?close`.
    ServiceRemoved,
    /// It reached the service's `max_connection_duration`.
    MaxDuration,
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cut::BackendDown => "cut: backend marked down",
            Cut::BackendRemoved => "cut: backend removed",
            Cut::ServiceRemoved => "cut: service removed",
            Cut::MaxDuration => "cut: max_connection_duration reached",
        })
    }
}

/// A cut in progress: rare, so boxed to keep the pair's slab slot small.
#[derive(Debug)]
pub struct Cutting {
    /// Why.
    pub why: Cut,
    /// When the pair closes even if the flush is not done.
    pub until: Instant,
}

/// A byte stream a half can relay through; a [`Conn`] in the loop, a script in tests.
pub trait Stream: Read + Write {
    /// Ends our sending direction (sends FIN).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Stream for Conn {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// One socket of a pair with its cached readiness and last progress.
#[derive(Debug)]
pub struct Peer<S> {
    stream: S,
    ready: Ready,
    last_progress: Instant,
}

impl<S> Peer<S> {
    fn new(stream: S, now: Instant) -> Self {
        Peer { stream, ready: Ready::default(), last_progress: now }
    }
}

/// Where one direction stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HalfState {
    /// The source may still send.
    Open,
    /// The source sent EOF: flush the buffer, then shut the destination's write side.
    Draining,
    /// The destination got `shutdown(Write)`; this direction is finished.
    Shut,
}

/// Which end of a half failed.
#[derive(Debug)]
enum HalfError {
    Source(io::Error),
    Destination(io::Error),
}

/// One direction: bytes read from one peer wait here until written to the other.
#[derive(Debug)]
struct Half {
    buf: Option<Buffer>,
    state: HalfState,
    /// Bytes written to the destination and not yet added to the counters.
    unreported: u64,
    /// Bytes written to the destination in all.
    total: u64,
}

impl Half {
    fn new() -> Self {
        Half { buf: None, state: HalfState::Open, unreported: 0, total: 0 }
    }

    fn has_data(&self) -> bool {
        self.buf.as_ref().is_some_and(|b| !b.is_empty())
    }

    fn has_room(&self) -> bool {
        self.buf.as_ref().is_none_or(Buffer::has_room)
    }

    /// Moves bytes from `src` towards `dst` until both would block, the buffer
    /// is stuck, or `budget` is spent. Without `dst` (backend still
    /// connecting) it only reads ahead into the buffer.
    fn pump<S: Stream>(
        &mut self,
        src: &mut Peer<S>,
        mut dst: Option<&mut Peer<S>>,
        other_done: bool,
        pool: &mut BufferPool,
        budget: &mut usize,
        now: Instant,
    ) -> Result<(), HalfError> {
        loop {
            if let (Some(dst), Some(buf)) = (dst.as_deref_mut(), self.buf.as_mut()) {
                if !buf.is_empty() && dst.ready.writable {
                    let offered = buf.len();
                    match buf.write_to(&mut dst.stream) {
                        Transfer::Moved(n) => {
                            dst.last_progress = now;
                            self.unreported += n as u64;
                            self.total += n as u64;
                            // epoll(7): a short write on a stream socket means its send
                            // buffer is full; the next edge says when it has room again.
                            if n < offered {
                                dst.ready.writable = false;
                            }
                        }
                        Transfer::WouldBlock => dst.ready.writable = false,
                        Transfer::Eof => return Err(HalfError::Destination(io::ErrorKind::WriteZero.into())),
                        Transfer::Failed(e) => return Err(HalfError::Destination(e)),
                    }
                    continue;
                }
            }
            if self.state == HalfState::Open && src.ready.readable && self.has_room() && *budget > 0 {
                let buf = self.buf.get_or_insert_with(|| pool.take());
                let wanted = buf.space_len();
                match buf.read_from(&mut src.stream) {
                    Transfer::Moved(n) => {
                        src.last_progress = now;
                        *budget = budget.saturating_sub(n);
                        // epoll(7): a short read on a stream socket means it is drained,
                        // saving the read that would say WouldBlock. Not after a hang-up
                        // hint: the FIN's edge has come already, so read on to the EOF.
                        if n < wanted && !src.ready.closing {
                            src.ready.readable = false;
                        }
                    }
                    Transfer::WouldBlock => src.ready.readable = false,
                    Transfer::Eof => {
                        src.last_progress = now;
                        self.state = HalfState::Draining;
                    }
                    Transfer::Failed(e) => return Err(HalfError::Source(e)),
                }
                continue;
            }
            break;
        }
        if !self.has_data() {
            if let Some(buf) = self.buf.take() {
                pool.give(buf);
            }
            if self.state == HalfState::Draining {
                if let Some(dst) = dst {
                    // When the other direction is finished too, the pair closes next and
                    // the close sends this FIN: both sides were read to EOF, so no RST.
                    if !other_done {
                        dst.stream.shutdown_write().map_err(HalfError::Destination)?;
                    }
                    self.state = HalfState::Shut;
                }
            }
        }
        Ok(())
    }

    /// Whether the last pump stopped only because its budget ran out.
    fn has_work<S>(&self, src: &Peer<S>, dst: &Peer<S>) -> bool {
        (self.has_data() && dst.ready.writable)
            || (self.state == HalfState::Open && src.ready.readable && self.has_room())
    }

    fn release(&mut self, pool: &mut BufferPool) {
        if let Some(buf) = self.buf.take() {
            pool.give(buf);
        }
    }
}

/// Why a pair ended early.
#[derive(Debug)]
pub enum Fault {
    /// The client socket failed.
    Client(io::Error),
    /// The backend socket failed.
    Backend(io::Error),
    /// A side was idle for longer than its timeout.
    Timeout(Side),
    /// Every candidate backend failed to connect.
    NoBackend,
    /// Connecting failed for lack of local resources (fds, ports, memory).
    Local(io::Error),
    /// Shuttle cut it (a gentle close, not a failure).
    Cut(Box<Cutting>),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Client(e) => write!(f, "client error: {e}"),
            Fault::Backend(e) => write!(f, "backend error: {e}"),
            Fault::Timeout(Side::Client) => f.write_str("client idle timeout"),
            Fault::Timeout(Side::Backend) => f.write_str("server idle timeout"),
            Fault::NoBackend => f.write_str("no backend could be reached"),
            Fault::Local(e) => write!(f, "cannot connect: {e}"),
            Fault::Cut(cutting) => cutting.why.fmt(f),
        }
    }
}

// The backend socket lives in `Pair`, not in the phase: a failover swaps it
// in place and the connect confirmation only changes the phase, with no
// placeholder socket needed to move it between variants. Writing to an
// unconfirmed backend is still impossible: only `Relaying` pumps towards it.
enum Phase {
    /// A nonblocking connect is in flight; client bytes may already be buffered.
    Connecting { target: Key, deadline: Option<Instant>, plan: Plan, started: Instant },
    /// Both sockets are connected; bytes flow until both halves are shut.
    Relaying { target: Key },
}

impl fmt::Debug for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Connecting { target, .. } => write!(f, "connecting to {target}"),
            Phase::Relaying { target, .. } => write!(f, "relaying with {target}"),
        }
    }
}

/// One proxied connection: a client, the backend it was given, and both directions.
#[derive(Debug)]
pub struct Pair {
    client: Peer<Conn>,
    backend: Peer<Conn>,
    phase: Phase,
    /// Client → backend.
    up: Half,
    /// Backend → client.
    down: Half,
    service: Key,
    limits: Limits,
    /// The backend whose `active` count includes this pair, released on close or failover.
    holds: Option<Key>,
    /// When the client was accepted, for the close log.
    accepted: Instant,
    /// The client's address, for the close log.
    peer: ClientAddr,
    /// How long the backend connect took, once it succeeded.
    /// In microseconds (saturating: no connect outlasts 71 minutes), to keep the slab slot small.
    connected_in: Option<u32>,
    /// How long the client waited in its service's queue before this pair began, in
    /// microseconds (saturating like `connected_in`; `accepted` is when it came in).
    queued_us: u32,
    /// Connects that failed before the one in flight (failovers).
    failed_connects: u16,
    /// Why the pair ended early, for the close log.
    ended: Option<Fault>,
    /// Which side sent its EOF first, for the access log.
    first_eof: Option<Side>,
    /// With the access log on: the service's name, kept from the start, since
    /// a deleted service may be gone from `services` before its pairs end.
    service_name: Option<Arc<String>>,
    /// With the access log on: the backend connected to, named likewise.
    backend_name: Option<Arc<Label>>,
    /// The armed timer and its deadline: at most one, at the earliest deadline.
    timer: Option<(TimerKey, Instant)>,
    /// PROXY protocol state, for the few pairs that have any (one word otherwise).
    proxied: Option<Box<Proxied>>,
}

/// What a pair keeps of the PROXY protocol.
#[derive(Debug, Default)]
struct Proxied {
    /// The destination a client's own header named; without one, the accepted socket's address.
    destination: Option<SocketAddr>,
    /// The header for the backend, still to be written before any client byte.
    header: Vec<u8>,
}

/// A client that could not be given a backend: why, and after how many failed connects.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub fault: Fault,
    /// Connects that failed first.
    pub failed_connects: u16,
}

/// A started connect: the stream and the backend it goes to.
struct Attempt {
    stream: Conn,
    target: Key,
}

/// Starts a connect to the next candidate of `plan` that accepts one; failed
/// candidates are counted as backend errors (reference §3). The plan hands
/// out each candidate with a slot of its limit taken: the attempt keeps it,
/// a failed start gives it back.
fn connect_next(plan: &mut Plan, token: Token, failed: &mut u16, cx: &mut Cx<'_>) -> Result<Attempt, Fault> {
    while let Some(target) = cx.services.next_target(plan) {
        let Some(addr) = cx.services.backend(target).map(|b| b.addr.clone()) else { continue };
        let started = Conn::connect(&addr).and_then(|mut stream| {
            cx.registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        });
        if started.is_err() {
            cx.services.release_slot(target);
        }
        match started {
            Ok(stream) => return Ok(Attempt { stream, target }),
            // An fd or port shortage is ours, not the backend's (pitfall 15).
            Err(e) if net::is_local_shortage(&e) => return Err(Fault::Local(e)),
            Err(e) => {
                *failed = failed.saturating_add(1);
                backend_failed(target, &e, cx);
            }
        }
    }
    Err(Fault::NoBackend)
}

/// Counts a failed connect to `target` and logs what passive health made of it.
fn backend_failed(target: Key, error: &io::Error, cx: &mut Cx<'_>) {
    let transition = cx.services.connect_failed(target);
    let (service, backend) = cx.services.names(target);
    // Trace, not debug: `-debug` gives one line per connection, which counts these.
    log::trace!("{service}/{backend}: connect failed: {error}");
    if transition == Some(Transition::WentDown) {
        warn!("{service}/{backend} is down: {} client connects failed ({error})", fall_of(cx, target));
    }
}

fn fall_of(cx: &Cx<'_>, target: Key) -> u32 {
    let service = cx.services.backend(target).map(|b| b.service);
    service.and_then(|s| cx.services.service(s)).map_or(1, |s| s.settings.fall)
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An accepted client on its way to a pair (perhaps through the queue).
#[derive(Debug)]
pub struct Client {
    /// Its socket.
    pub stream: Conn,
    /// Its address: the socket's peer, or the source its PROXY header named.
    pub peer: ClientAddr,
    /// The address it connected to, when a PROXY header named it.
    pub destination: Option<SocketAddr>,
    /// When it was accepted: earlier than now if it was queued.
    pub accepted: Instant,
}

impl Pair {
    /// Takes an accepted client and starts connecting it along `plan`. On
    /// failure the client is dropped (a normal close) and the fault returned.
    pub fn open(
        key: Key,
        Client { stream: mut client, peer, destination, accepted }: Client,
        service: Key,
        mut plan: Plan,
        cx: &mut Cx<'_>,
    ) -> Result<Pair, Refused> {
        let limits = cx.services.limits(service);
        let refused = |fault, failed_connects| Refused { fault, failed_connects };
        if let Err(e) =
            cx.registry.register(&mut client, key.token(Side::Client), Interest::READABLE | Interest::WRITABLE)
        {
            cx.services.abandon(&mut plan);
            return Err(refused(Fault::Local(e), 0));
        }
        let mut failed_connects = 0;
        let attempt = connect_next(&mut plan, key.token(Side::Backend), &mut failed_connects, cx)
            .map_err(|f| refused(f, failed_connects))?;
        let now = cx.now;
        let mut pair = Pair {
            client: Peer::new(client, now),
            backend: Peer::new(attempt.stream, now),
            phase: Phase::Connecting {
                target: attempt.target,
                deadline: limits.connect().map(|d| now + d),
                plan,
                started: now,
            },
            up: Half::new(),
            down: Half::new(),
            service,
            limits,
            holds: Some(attempt.target),
            accepted,
            peer,
            connected_in: None,
            queued_us: u32::try_from(now.saturating_duration_since(accepted).as_micros()).unwrap_or(u32::MAX),
            failed_connects,
            ended: None,
            first_eof: None,
            service_name: cx.access_log.is_on().then(|| cx.services.service(service).map(|s| s.name.clone())).flatten(),
            backend_name: None,
            timer: None,
            proxied: destination.map(|d| Box::new(Proxied { destination: Some(d), header: Vec::new() })),
        };
        pair.rearm(key, cx);
        Ok(pair)
    }

    /// Handles readiness of one of the pair's sockets.
    pub fn on_ready(&mut self, key: Key, side: Side, ready: Ready, cx: &mut Cx<'_>) -> Step {
        match side {
            Side::Client => self.client.ready.merge(ready),
            Side::Backend => self.backend.ready.merge(ready),
        }
        let step = self.advance(key, side == Side::Backend, cx);
        self.finish_wakeup(key, step, cx)
    }

    /// Continues work left over when a wakeup's budget ran out.
    pub fn resume(&mut self, key: Key, cx: &mut Cx<'_>) -> Step {
        let step = self.advance(key, false, cx);
        self.finish_wakeup(key, step, cx)
    }

    /// The cut under way, if the pair is being cut.
    fn cutting(&self) -> Option<&Cutting> {
        match &self.ended {
            Some(Fault::Cut(cutting)) => Some(cutting),
            _ => None,
        }
    }

    /// The backend it connects or relays to.
    pub fn target(&self) -> Key {
        match &self.phase {
            Phase::Connecting { target, .. } | Phase::Relaying { target } => *target,
        }
    }

    /// The service whose client it serves.
    pub fn service(&self) -> Key {
        self.service
    }

    /// Cuts the pair (see the module's doc): a FIN to both sides once what
    /// was buffered for the client is flushed. A second cut changes nothing.
    pub fn cut(&mut self, key: Key, why: Cut, cx: &mut Cx<'_>) -> Step {
        let step = self.begin_cut(why, cx);
        self.finish_wakeup(key, step, cx)
    }

    fn begin_cut(&mut self, why: Cut, cx: &mut Cx<'_>) -> Step {
        if self.cutting().is_some() {
            return Step::Wait;
        }
        // Whatever else it would have ended with, the cut is why it ends.
        self.ended = Some(Fault::Cut(Box::new(Cutting { why, until: cx.now + CUT_FLUSH })));
        self.release_backend(cx);
        if let Phase::Connecting { .. } = self.phase {
            // Nothing was sent to the client yet: a plain FIN, without the reset unread bytes would cause.
            net::close_gently(&self.client.stream);
            return Step::Close;
        }
        // The backend gets its FIN now and is read no more; bytes the client
        // sent that it has not taken yet are dropped.
        let _ = self.backend.stream.shutdown(Shutdown::Both);
        self.up.release(cx.pool);
        if self.down.state == HalfState::Open {
            self.down.state = HalfState::Draining;
        }
        self.relay_cut(cx)
    }

    /// A cut pair's wakeup: flush towards the client and FIN it, and drop what it still sends until its EOF.
    fn relay_cut(&mut self, cx: &mut Cx<'_>) -> Step {
        let mut budget = BUDGET;
        // Draining: the pump only writes what is buffered, then shuts the client's side.
        if self.down.pump(&mut self.backend, Some(&mut self.client), false, cx.pool, &mut budget, cx.now).is_err() {
            return Step::Close;
        }
        if self.up.state == HalfState::Open {
            match discard(&mut self.client, &mut budget) {
                Ok(true) => self.up.state = HalfState::Shut,
                Ok(false) => {}
                Err(_) => return Step::Close,
            }
        }
        if self.down.state == HalfState::Shut && self.up.state != HalfState::Open {
            return Step::Close;
        }
        let more = self.down.has_work(&self.backend, &self.client)
            || (self.up.state == HalfState::Open && self.client.ready.readable);
        if more {
            Step::Again
        } else {
            Step::Wait
        }
    }

    /// Handles the pair's timer: a connect deadline, an idle timeout, the
    /// connection's lifetime or a cut's flush deadline may have passed.
    pub fn on_timer(&mut self, key: Key, cx: &mut Cx<'_>) -> Step {
        self.timer = None;
        let now = cx.now;
        let step = if let Some(cutting) = self.cutting() {
            if now >= cutting.until {
                Step::Close
            } else {
                Step::Wait
            }
        } else if self.limits.lifetime().is_some_and(|d| now >= self.accepted + d) {
            self.begin_cut(Cut::MaxDuration, cx)
        } else if self.limits.client().is_some_and(|d| now >= self.client.last_progress + d) {
            self.fail(Fault::Timeout(Side::Client), cx)
        } else {
            match &mut self.phase {
                Phase::Connecting { deadline: Some(deadline), target, .. } if now >= *deadline => {
                    let target = *target;
                    self.attempt_failed(target, io::ErrorKind::TimedOut.into(), key, cx)
                }
                Phase::Relaying { .. }
                    if self.limits.server().is_some_and(|d| now >= self.backend.last_progress + d) =>
                {
                    self.fail(Fault::Timeout(Side::Backend), cx)
                }
                _ => Step::Wait,
            }
        };
        self.finish_wakeup(key, step, cx)
    }

    /// Gives back what the pair holds before it is dropped: its timer, buffers and active count.
    pub fn close(&mut self, cx: &mut Cx<'_>) {
        if let Some((timer, _)) = self.timer.take() {
            cx.timers.cancel(timer);
        }
        self.up.release(cx.pool);
        self.down.release(cx.pool);
        self.report(cx);
        self.release_backend(cx);
        if let Some(s) = cx.services.service(self.service) {
            s.state.duration.observe(cx.now.saturating_duration_since(self.accepted));
            s.state.gate.active.sub_one();
        }
        if cx.access_log.is_on() {
            self.log_access(cx);
        }
        if log::log_enabled!(log::Level::Debug) {
            debug!("{}", self.summary(cx));
        }
    }

    /// The access log's line for this pair.
    fn log_access(&self, cx: &mut Cx<'_>) {
        // A connected pair names the backend it relayed to, even one removed since; one that
        // never connected names the backend it was trying, unless it ended with none at all.
        let trying = match &self.phase {
            Phase::Connecting { target, .. } if !matches!(self.ended, Some(Fault::NoBackend)) => {
                cx.services.backend(*target).map(|b| (b.config.name.as_str(), &b.addr))
            }
            _ => None,
        };
        let backend = self.backend_name.as_ref().map(|l| (l.name.as_str(), &l.addr)).or(trying);
        let finished = Finished {
            at: SystemTime::now(),
            service: self.service_name.as_ref().map_or("?", |n| n.as_str()),
            client: self.peer,
            backend,
            connect: self.connected_in.map(|us| Duration::from_micros(u64::from(us))),
            queued: Duration::from_micros(u64::from(self.queued_us)),
            duration: cx.now.saturating_duration_since(self.accepted),
            sent: self.up.total,
            received: self.down.total,
            failed_connects: self.failed_connects,
            end: self.end(),
        };
        cx.access_log.record(&finished);
    }

    /// How the pair ended, in the access log's words.
    fn end(&self) -> End {
        let reset = |e: &io::Error| matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe);
        match &self.ended {
            Some(Fault::Cut(cutting)) => match cutting.why {
                Cut::BackendDown => End::BackendDown,
                Cut::BackendRemoved => End::BackendRemoved,
                Cut::ServiceRemoved => End::ServiceRemoved,
                Cut::MaxDuration => End::MaxDuration,
            },
            Some(Fault::Client(e)) if reset(e) => End::ClientReset,
            Some(Fault::Client(_)) => End::ClientError,
            Some(Fault::Backend(e)) if reset(e) => End::BackendReset,
            Some(Fault::Backend(_)) => End::BackendError,
            Some(Fault::Timeout(Side::Client)) => End::ClientTimeout,
            Some(Fault::Timeout(Side::Backend)) => End::ServerTimeout,
            Some(Fault::NoBackend) => End::ConnectFailed,
            Some(Fault::Local(_)) => End::LocalError,
            None if self.up.state != HalfState::Shut || self.down.state != HalfState::Shut => End::Shutdown,
            None if self.first_eof == Some(Side::Backend) => End::BackendClosed,
            None => End::ClientClosed,
        }
    }

    /// The one line a finished connection gets at debug level.
    fn summary(&self, cx: &Cx<'_>) -> String {
        let service = cx.services.service(self.service).map_or("?", |s| s.settings.name.as_str());
        let lasted = cx.now.saturating_duration_since(self.accepted).as_millis();
        let (sent, received) = (self.up.total, self.down.total);
        let backend = match &self.phase {
            Phase::Relaying { target } | Phase::Connecting { target, .. } => cx.services.backend(*target),
        };
        let to = backend.map_or_else(String::new, |b| format!(" -> {} ({})", b.config.name, b.addr));
        let failed = match self.failed_connects {
            0 => String::new(),
            1 => "after 1 failed connect, ".into(),
            n => format!("after {n} failed connects, "),
        };
        let connected =
            self.connected_in.map_or_else(String::new, |us| format!("{failed}connected in {} ms, ", us / 1000));
        let how = match (&self.ended, self.end()) {
            (Some(fault), _) => fault.to_string(),
            (None, End::Shutdown) => "cut at shutdown".into(),
            (None, End::BackendClosed) => "both sides closed, the backend first".into(),
            (None, _) => "both sides closed, the client first".into(),
        };
        // With several worker loops, which one served it (their threads are named for them).
        let thread = std::thread::current();
        let worker = thread
            .name()
            .and_then(|n| n.strip_prefix("shuttle-w"))
            .map_or_else(String::new, |i| format!(", worker {i}"));
        format!("{service}: {}{to}: {connected}closed after {lasted} ms ({how}), {sent} bytes sent, {received} bytes received{worker}", self.peer)
    }

    /// Takes this pair off its backend's `active` count.
    fn release_backend(&mut self, cx: &mut Cx<'_>) {
        if let Some(b) = self.holds.take().and_then(|k| cx.services.backend(k)) {
            b.state.active.sub_one();
        }
    }

    fn advance(&mut self, key: Key, backend_event: bool, cx: &mut Cx<'_>) -> Step {
        if self.cutting().is_some() {
            // The cut is why it ends, whatever the client does meanwhile.
            if pending_error(&mut self.client).is_some() {
                return Step::Close;
            }
            return self.relay_cut(cx);
        }
        // A reset must close the pair even when nothing would read or write the
        // socket now (a full buffer towards a stalled peer): reference §3.
        if let Some(e) = pending_error(&mut self.client) {
            return self.fail(Fault::Client(e), cx);
        }
        if matches!(self.phase, Phase::Relaying { .. }) {
            if let Some(e) = pending_error(&mut self.backend) {
                return self.fail(Fault::Backend(e), cx);
            }
        }
        if let Phase::Connecting { target, .. } = &mut self.phase {
            if backend_event || self.backend.ready.writable {
                let ready = self.backend.ready;
                match net::connect_outcome(&self.backend.stream, ready.writable, ready.closing) {
                    ConnectOutcome::Connected => self.connected(cx),
                    ConnectOutcome::Pending => self.backend.ready.writable = false,
                    ConnectOutcome::Failed(e) => {
                        let target = *target;
                        return self.attempt_failed(target, e, key, cx);
                    }
                }
            }
        }
        self.relay(cx)
    }

    fn connected(&mut self, cx: &mut Cx<'_>) {
        let Phase::Connecting { target, started, .. } = self.phase else { return };
        cx.services.connect_succeeded(target);
        self.backend.last_progress = cx.now;
        let took = cx.now.saturating_duration_since(started);
        if let Some(s) = cx.services.service(self.service) {
            s.state.connect_time.observe(took);
        }
        self.connected_in = Some(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
        if cx.access_log.is_on() {
            self.backend_name = cx.services.backend(target).map(|b| b.label.clone());
        }
        let version = cx.services.backend(target).and_then(|b| match b.config.send_proxy {
            SendProxy::Off => None,
            SendProxy::V1 => Some(Version::V1),
            SendProxy::V2 => Some(Version::V2),
        });
        if let Some(version) = version {
            let proxied = self.proxied.get_or_insert_with(Box::default);
            // getsockname of the accepted socket: the address the client connected to.
            let destination = proxied.destination.or_else(|| self.client.stream.local_inet());
            proxied.header = match (self.peer.inet(), destination) {
                (Some(source), Some(destination)) => proxy_header::encode(version, source, destination),
                // A unix client has no address the header could carry.
                _ => proxy_header::unknown(version),
            };
        }
        self.set_phase(Phase::Relaying { target });
    }

    fn set_phase(&mut self, phase: Phase) {
        log::trace!("pair phase {:?} => {:?}", self.phase, phase);
        self.phase = phase;
    }

    /// The connect to `target` failed: count it and fail over to the next candidate.
    fn attempt_failed(&mut self, target: Key, error: io::Error, key: Key, cx: &mut Cx<'_>) -> Step {
        self.failed_connects = self.failed_connects.saturating_add(1);
        self.release_backend(cx);
        backend_failed(target, &error, cx);
        let Phase::Connecting { plan, .. } = &mut self.phase else { return Step::Close };
        match connect_next(plan, key.token(Side::Backend), &mut self.failed_connects, cx) {
            Ok(attempt) => {
                let now = cx.now;
                // The old stream is dropped here, which closes it and removes it from epoll.
                self.backend = Peer::new(attempt.stream, now);
                self.holds = Some(attempt.target);
                if let Phase::Connecting { target, deadline, .. } = &mut self.phase {
                    *target = attempt.target;
                    *deadline = self.limits.connect().map(|d| now + d);
                }
                Step::Wait
            }
            Err(fault) => self.fail(fault, cx),
        }
    }

    fn relay(&mut self, cx: &mut Cx<'_>) -> Step {
        let now = cx.now;
        let mut up_budget = BUDGET;
        let mut down_budget = BUDGET;
        let header_sent = match &self.phase {
            Phase::Relaying { .. } => match send_header(&mut self.proxied, &mut self.backend) {
                Ok(sent) => sent,
                Err(e) => return self.fail(Fault::Backend(e), cx),
            },
            Phase::Connecting { .. } => false,
        };
        let backend = &mut self.backend;
        let (result, more) = match &mut self.phase {
            Phase::Connecting { .. } => {
                let r = self.up.pump(&mut self.client, None, false, cx.pool, &mut up_budget, now);
                (r.map_err(|e| half_fault(e, Side::Client)), false)
            }
            Phase::Relaying { .. } => {
                let down_done = self.down.state == HalfState::Shut;
                // Until the header is out, client bytes only queue up behind it.
                let towards = header_sent.then_some(&mut *backend);
                let r = self
                    .up
                    .pump(&mut self.client, towards, down_done, cx.pool, &mut up_budget, now)
                    .map_err(|e| half_fault(e, Side::Client))
                    .and_then(|()| {
                        let up_done = self.up.state == HalfState::Shut;
                        self.down
                            .pump(backend, Some(&mut self.client), up_done, cx.pool, &mut down_budget, now)
                            .map_err(|e| half_fault(e, Side::Backend))
                    });
                let more = self.up.has_work(&self.client, backend) || self.down.has_work(backend, &self.client);
                (r, more)
            }
        };
        if self.first_eof.is_none() {
            if self.up.state != HalfState::Open {
                self.first_eof = Some(Side::Client);
            } else if self.down.state != HalfState::Open {
                self.first_eof = Some(Side::Backend);
            }
        }
        if let Err(fault) = result {
            return self.fail(fault, cx);
        }
        if self.up.state == HalfState::Shut && self.down.state == HalfState::Shut {
            return Step::Close;
        }
        if more {
            Step::Again
        } else {
            Step::Wait
        }
    }

    fn fail(&mut self, fault: Fault, cx: &mut Cx<'_>) -> Step {
        let service = cx.services.service(self.service).map_or("?", |s| s.settings.name.as_str());
        match &fault {
            Fault::Local(_) => warn!("{service}: {fault}"),
            Fault::NoBackend => {
                info!("{service}: closing client {}: {fault}", self.peer);
                net::close_gently(&self.client.stream);
                if let Some(s) = cx.services.service(self.service) {
                    s.state.no_backend.add(1);
                }
            }
            _ => {}
        }
        match &fault {
            Fault::Backend(_) | Fault::Timeout(Side::Backend) => {
                if let Phase::Relaying { target, .. } = &self.phase {
                    if let Some(b) = cx.services.backend(*target) {
                        b.state.errors.add(1);
                    }
                }
            }
            Fault::Local(_) => {
                if let Some(s) = cx.services.service(self.service) {
                    s.state.errors.add(1);
                }
            }
            _ => {}
        }
        self.ended = Some(fault);
        Step::Close
    }

    /// Adds the bytes moved since the last report to the backend's counters (once per wakeup).
    fn report(&mut self, cx: &mut Cx<'_>) {
        if self.up.unreported == 0 && self.down.unreported == 0 {
            return;
        }
        if let Phase::Relaying { target, .. } = &self.phase {
            if let Some(b) = cx.services.backend(*target) {
                b.state.sent.add(self.up.unreported);
                b.state.received.add(self.down.unreported);
            }
        }
        self.up.unreported = 0;
        self.down.unreported = 0;
    }

    fn finish_wakeup(&mut self, key: Key, step: Step, cx: &mut Cx<'_>) -> Step {
        self.report(cx);
        if !matches!(step, Step::Close) {
            self.rearm(key, cx);
        }
        step
    }

    fn next_deadline(&self) -> Option<Instant> {
        if let Some(cutting) = self.cutting() {
            return Some(cutting.until);
        }
        let client = self.limits.client().map(|d| self.client.last_progress + d);
        let other = match &self.phase {
            Phase::Connecting { deadline, .. } => *deadline,
            Phase::Relaying { .. } => self.limits.server().map(|d| self.backend.last_progress + d),
        };
        let lifetime = self.limits.lifetime().map(|d| self.accepted + d);
        earliest(earliest(client, other), lifetime)
    }

    /// Keeps one timer armed at or before the earliest deadline. Progress moves
    /// idle deadlines later without touching the wheel: an early fire just re-arms.
    fn rearm(&mut self, key: Key, cx: &mut Cx<'_>) {
        let Some(want) = self.next_deadline() else { return };
        if let Some((timer, at)) = self.timer {
            if at <= want {
                return;
            }
            cx.timers.cancel(timer);
        }
        self.timer = Some((cx.timers.insert(want, key), want));
    }
}

/// Writes what is left of the backend's PROXY header; `Ok(true)` once none is.
fn send_header(proxied: &mut Option<Box<Proxied>>, backend: &mut Peer<Conn>) -> io::Result<bool> {
    let Some(proxied) = proxied.as_mut().filter(|p| !p.header.is_empty()) else { return Ok(true) };
    while !proxied.header.is_empty() && backend.ready.writable {
        match backend.stream.write(&proxied.header) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                proxied.header.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => backend.ready.writable = false,
            Err(e) => return Err(e),
        }
    }
    Ok(proxied.header.is_empty())
}

/// Reads and drops what a cut pair's client still sends, within `budget`;
/// `Ok(true)` at its EOF.
fn discard<S: Read>(peer: &mut Peer<S>, budget: &mut usize) -> io::Result<bool> {
    let mut sink = [0u8; 4096];
    while peer.ready.readable && *budget > 0 {
        match peer.stream.read(&mut sink) {
            Ok(0) => return Ok(true),
            Ok(n) => *budget = budget.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => peer.ready.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// The socket's pending error (`SO_ERROR`), once an event flagged one. Read
/// once per flag: the flag is cleared, and the kernel clears the error.
fn pending_error(peer: &mut Peer<Conn>) -> Option<io::Error> {
    if !std::mem::take(&mut peer.ready.error) {
        return None;
    }
    match peer.stream.take_error() {
        Ok(Some(e)) | Err(e) => Some(e),
        Ok(None) => None,
    }
}

fn half_fault(error: HalfError, source: Side) -> Fault {
    let failed = match error {
        HalfError::Source(e) => (source, e),
        HalfError::Destination(e) => (if source == Side::Client { Side::Backend } else { Side::Client }, e),
    };
    match failed {
        (Side::Client, e) => Fault::Client(e),
        (Side::Backend, e) => Fault::Backend(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::buffer::tests::{Op, Script};

    impl Stream for Script {
        fn shutdown_write(&self) -> io::Result<()> {
            self.shutdowns.set(self.shutdowns.get() + 1);
            Ok(())
        }
    }

    fn peer(reads: Vec<Op>, writes: Vec<Op>) -> Peer<Script> {
        let script = Script { reads: reads.into(), writes: writes.into(), ..Script::default() };
        let mut peer = Peer::new(script, Instant::now());
        peer.ready = Ready { readable: true, writable: true, closing: true, error: false };
        peer
    }

    #[track_caller]
    fn pump(half: &mut Half, src: &mut Peer<Script>, dst: Option<&mut Peer<Script>>) -> usize {
        let mut pool = BufferPool::new(4);
        let mut budget = BUDGET;
        half.pump(src, dst, false, &mut pool, &mut budget, Instant::now()).expect("pump failed");
        BUDGET - budget
    }

    #[test]
    fn relaying_full_buffer_stops_reads_and_resumes_without_an_event() {
        let mut half = Half::new();
        let mut src = peer(vec![Op::Data(vec![1; 3 * BUF_SIZE])], vec![]);
        let mut dst = peer(vec![], vec![Op::Block]);
        assert_eq!(pump(&mut half, &mut src, Some(&mut dst)), BUF_SIZE, "reads stop at capacity");
        assert!(src.ready.readable, "the source was never drained, so its readiness is kept");
        assert!(!dst.ready.writable);
        dst.ready.writable = true;
        dst.stream.writes.extend((0..4).map(|_| Op::Accept(BUF_SIZE)));
        pump(&mut half, &mut src, Some(&mut dst));
        assert_eq!(dst.stream.written.len(), 3 * BUF_SIZE);
    }

    #[test]
    fn relaying_source_eof_shuts_destination_once_after_flush() {
        let mut half = Half::new();
        let mut src = peer(vec![Op::Data(b"abc".to_vec()), Op::Eof], vec![]);
        let mut dst = peer(vec![], vec![Op::Accept(1)]);
        pump(&mut half, &mut src, Some(&mut dst));
        assert_eq!(half.state, HalfState::Draining);
        assert!(!dst.ready.writable, "a short write means the send buffer is full");
        assert_eq!(dst.stream.shutdowns.get(), 0, "bytes are still buffered");
        dst.ready.writable = true;
        dst.stream.writes.push_back(Op::Accept(10));
        pump(&mut half, &mut src, Some(&mut dst));
        assert_eq!(dst.stream.written, b"abc");
        assert_eq!(half.state, HalfState::Shut);
        pump(&mut half, &mut src, Some(&mut dst));
        assert_eq!(dst.stream.shutdowns.get(), 1);
        assert!(half.buf.is_none(), "an idle half holds no buffer");
    }

    #[test]
    fn connecting_reads_ahead_and_keeps_eof_for_later() {
        let mut half = Half::new();
        let mut src = peer(vec![Op::Data(b"early".to_vec()), Op::Eof], vec![]);
        pump(&mut half, &mut src, None);
        assert_eq!(half.state, HalfState::Draining);
        assert_eq!(half.buf.as_ref().map(|b| b.data().to_vec()), Some(b"early".to_vec()));
        let mut dst = peer(vec![], vec![Op::Accept(100)]);
        pump(&mut half, &mut src, Some(&mut dst));
        assert_eq!(dst.stream.written, b"early");
        assert_eq!(half.state, HalfState::Shut);
    }

    #[test]
    fn relaying_short_read_means_drained_unless_the_peer_hung_up() {
        let mut half = Half::new();
        let mut src = peer(vec![Op::Data(b"ab".to_vec()), Op::Eof], vec![]);
        src.ready.closing = false;
        let mut dst = peer(vec![], vec![Op::Accept(10)]);
        pump(&mut half, &mut src, Some(&mut dst));
        assert!(!src.ready.readable, "no read is wasted on WouldBlock after a short one");
        assert_eq!(half.state, HalfState::Open);
        src.ready = Ready { readable: true, writable: false, closing: true, error: false };
        pump(&mut half, &mut src, Some(&mut dst));
        assert_eq!(half.state, HalfState::Shut, "after a hang-up hint it reads on to the EOF");
    }

    #[test]
    fn relaying_budget_spent_leaves_work() {
        let mut half = Half::new();
        let mut src = peer(vec![Op::Data(vec![0; 10 * BUF_SIZE])], vec![]);
        let mut dst = peer(vec![], (0..40).map(|_| Op::Accept(BUF_SIZE)).collect());
        assert!(pump(&mut half, &mut src, Some(&mut dst)) >= BUDGET);
        assert!(half.has_work(&src, &dst));
    }

    #[test]
    fn relaying_source_reset_is_an_error_not_eof() {
        let mut half = Half::new();
        let mut src = peer(vec![Op::Reset], vec![]);
        let mut dst = peer(vec![], vec![]);
        let mut pool = BufferPool::new(1);
        let result = half.pump(&mut src, Some(&mut dst), false, &mut pool, &mut { BUDGET }, Instant::now());
        assert!(matches!(result, Err(HalfError::Source(_))));
        assert_eq!(dst.stream.shutdowns.get(), 0);
    }

    #[test]
    fn relaying_destination_failure_is_reported_as_such() {
        let mut half = Half::new();
        let mut src = peer(vec![Op::Data(b"x".to_vec())], vec![]);
        let mut dst = peer(vec![], vec![Op::Reset]);
        let mut pool = BufferPool::new(1);
        let result = half.pump(&mut src, Some(&mut dst), false, &mut pool, &mut { BUDGET }, Instant::now());
        assert!(matches!(result, Err(HalfError::Destination(_))));
    }
}
