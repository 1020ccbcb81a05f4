//! The health probe (reference §4): one per checked backend, a socket of the same
//! event loop, never a thread.
//!
//! A probe waits `check_interval`, connects to the backend's `check_address`
//! with `connect_timeout` as the deadline, optionally sends `check_send` and
//! looks for `check_expect` in the first 4 KiB of the reply (a `send_proxy`
//! backend gets a PROXY header first: see `check_header`), then feeds the
//! result to the backend's `Health`. There is one state per probe, so a check
//! that is still running when the next interval comes is never started twice.
//! Settings are read from the service when each check starts, so a changed
//! interval, rise, fall or expectation applies from the next check on.
//!
//! A UDP service's backend with a `check_send` is checked over UDP instead:
//! one datagram of `check_send` to `check_address`, and a reply (containing
//! `check_expect`, if set) within `connect_timeout`. An ICMP port unreachable
//! fails it at once. Without `check_send` a UDP backend's check is the TCP
//! connect to its `check_address`, as for any backend.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::UdpSocket;

use crate::runtime::conn::Conn;
use mio::Interest;

use crate::context::Cx;
use crate::model::config::{Protocol, SendProxy};
use crate::model::health::Transition;
use crate::model::proxy_header;
use crate::model::service::LastCheck;
use crate::runtime::key::{Key, Side};
use crate::runtime::net::{self, ConnectOutcome};
use crate::runtime::ready::{Ready, Step};
use crate::runtime::throttle;
use crate::runtime::timer::{TimerKey, Wheel};

/// The most of a reply a check reads while looking for `check_expect`.
const EXPECT_LIMIT: usize = 4096;

enum ProbeState {
    /// Waiting for the next check.
    Idle,
    /// The check's connect is in flight.
    Connecting { stream: Conn },
    /// Connected; the PROXY header a `send_proxy` backend expects is partly written.
    Announcing { stream: Conn, header: Vec<u8>, sent: usize },
    /// Connected; `check_send` is partly written.
    Sending { stream: Conn, sent: usize },
    /// Waiting for `check_expect` in the reply.
    Expecting { stream: Conn, seen: Vec<u8> },
    /// A UDP check's datagram is sent; waiting for the reply.
    Datagram { socket: UdpSocket },
}

/// One backend's health checker.
pub struct Probe {
    backend: Key,
    state: ProbeState,
    /// Whether it holds one of the probes' descriptor slots (`FdBudget`).
    holds_slot: bool,
    ready: Ready,
    /// When the check in flight fails for lack of an answer, if ever.
    deadline: Option<Instant>,
    /// How long the check in flight may take, for the reason it failed.
    limit: Duration,
    /// The one armed timer: the next check while idle, the deadline while checking.
    timer: Option<TimerKey>,
    /// When the current (or next) check is due; the schedule's phase.
    due: Instant,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            ProbeState::Idle => "idle",
            ProbeState::Connecting { .. } => "connecting",
            ProbeState::Announcing { .. } => "announcing",
            ProbeState::Sending { .. } => "sending",
            ProbeState::Expecting { .. } => "expecting",
            ProbeState::Datagram { .. } => "awaiting a datagram",
        };
        f.debug_struct("Probe").field("backend", &self.backend).field("state", &state).finish()
    }
}

/// Where in `interval` the first check of the probe in slot `index` falls.
///
/// Multiples of the golden ratio modulo 1 are evenly spread for any count, so
/// a thousand backends added at once don't all probe in the same millisecond.
fn first_check_offset(index: u64, interval: Duration) -> Duration {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    interval.mul_f64((index as f64 * GOLDEN).fract())
}

/// The outcome of one check, with the reason a failure is logged with.
type CheckResult = Result<(), String>;

impl Probe {
    /// A probe whose first check comes within one `interval`.
    pub fn new(key: Key, backend: Key, interval: Duration, now: Instant, timers: &mut Wheel<Key>) -> Probe {
        let due = now + first_check_offset(u64::from(key.index()), interval);
        let timer = Some(timers.insert(due, key));
        Probe {
            backend,
            state: ProbeState::Idle,
            holds_slot: false,
            ready: Ready::default(),
            deadline: None,
            limit: Duration::ZERO,
            timer,
            due,
        }
    }

    /// Gives back the probe's timer and descriptor slot before it is dropped (its socket closes with it).
    pub fn close(&mut self, key: Key, cx: &mut Cx<'_>) {
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
        self.release_slot(cx);
        cx.fds.forget(key);
    }

    fn release_slot(&mut self, cx: &mut Cx<'_>) {
        if std::mem::take(&mut self.holds_slot) {
            cx.fds.check_done();
        }
    }

    /// The timer fired: start a check when idle, or fail the check whose deadline passed.
    pub fn on_timer(&mut self, key: Key, cx: &mut Cx<'_>) -> Step {
        self.timer = None;
        match self.state {
            // A check holds a descriptor: it waits its turn when the probes' share is in use.
            ProbeState::Idle if !self.holds_slot && !cx.fds.start_check(key, cx.now) => Step::Wait,
            ProbeState::Idle => {
                self.holds_slot = true;
                self.start(key, cx)
            }
            _ if self.deadline.is_some_and(|d| cx.now >= d) => {
                let why = format!("timed out after {:?}", self.limit);
                self.finish(key, Err(why), cx)
            }
            _ => {
                self.arm(key, self.deadline, cx);
                Step::Wait
            }
        }
    }

    /// The probe's turn came after it waited for a descriptor slot, which it now holds.
    pub fn on_slot(&mut self, key: Key, cx: &mut Cx<'_>) -> Step {
        if std::mem::replace(&mut self.holds_slot, true) {
            cx.fds.check_done(); // it holds one already: give the second back
        }
        match self.state {
            ProbeState::Idle => {
                if let Some(timer) = self.timer.take() {
                    cx.timers.cancel(timer);
                }
                self.start(key, cx)
            }
            // Not idle: a check is running and holds the slot.
            _ => Step::Wait,
        }
    }

    /// The check's socket is ready: advance the check.
    pub fn on_ready(&mut self, key: Key, ready: Ready, cx: &mut Cx<'_>) -> Step {
        self.ready.merge(ready);
        match self.advance(cx) {
            Some(result) => self.finish(key, result, cx),
            None => Step::Wait,
        }
    }

    fn start(&mut self, key: Key, cx: &mut Cx<'_>) -> Step {
        let Some(backend) = cx.services.backend(self.backend) else { return Step::Close };
        let Some(addr) = backend.check_addr.clone() else { return Step::Close };
        let Some(service) = cx.services.service(backend.service) else { return Step::Close };
        // connect_timeout 0 leaves the connect to the OS, but a check must still end:
        // one that a silent backend holds forever would stop all later checks.
        let check_interval = crate::model::config::seconds(service.settings.check_interval);
        let deadline = crate::model::config::seconds(service.settings.connect_timeout).or(check_interval);
        let started = cx.now;
        let opened = if service.settings.protocol == Protocol::Udp && !service.settings.check_send.is_empty() {
            let send = service.settings.check_send.as_bytes();
            let udp = addr.inet().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP address"));
            udp.and_then(net::udp_flow).and_then(|mut socket| {
                cx.registry.register(&mut socket, key.token(Side::Client), Interest::READABLE)?;
                socket.send(send)?;
                Ok(ProbeState::Datagram { socket })
            })
        } else {
            Conn::connect(&addr).and_then(|mut stream| {
                cx.registry.register(&mut stream, key.token(Side::Client), Interest::READABLE | Interest::WRITABLE)?;
                Ok(ProbeState::Connecting { stream })
            })
        };
        match opened {
            Ok(state) => {
                self.state = state;
                self.ready = Ready::default();
                self.deadline = deadline.map(|d| started + d);
                self.limit = deadline.unwrap_or_default();
                self.arm(key, self.deadline, cx);
                Step::Wait
            }
            Err(e) if net::is_local_shortage(&e) => {
                // Our shortage says nothing about the backend: skip this check (pitfall 15).
                if let Some(held) = cx.fds.skipped_checks.ready(cx.now) {
                    warn!("health check of {addr} skipped: {e}{}", throttle::more(held));
                }
                self.release_slot(cx);
                self.schedule_next(key, cx);
                Step::Wait
            }
            Err(e) => self.finish(key, Err(reason(&e)), cx),
        }
    }

    /// Moves the check as far as the socket allows; `Some` once it has passed or failed.
    fn advance(&mut self, cx: &Cx<'_>) -> Option<CheckResult> {
        let (send, expect) = match cx.services.backend(self.backend).and_then(|b| cx.services.service(b.service)) {
            Some(s) => (s.settings.check_send.as_bytes(), s.settings.check_expect.as_bytes()),
            None => (&[][..], &[][..]),
        };
        loop {
            // Idle is the placeholder while the owned state moves into its successor.
            let state = std::mem::replace(&mut self.state, ProbeState::Idle);
            let (next, progress) = match state {
                ProbeState::Idle => return None,
                ProbeState::Connecting { stream } => {
                    match net::connect_outcome(&stream, self.ready.writable, self.ready.closing) {
                        ConnectOutcome::Pending => {
                            self.ready = Ready::default();
                            (ProbeState::Connecting { stream }, Progress::Wait)
                        }
                        ConnectOutcome::Failed(e) => {
                            (ProbeState::Connecting { stream }, Progress::Done(Err(reason(&e))))
                        }
                        ConnectOutcome::Connected => match check_header(cx, self.backend, &stream) {
                            Some(header) => (ProbeState::Announcing { stream, header, sent: 0 }, Progress::Next),
                            None if send.is_empty() && expect.is_empty() => {
                                (ProbeState::Connecting { stream }, Progress::Done(Ok(())))
                            }
                            None => (ProbeState::Sending { stream, sent: 0 }, Progress::Next),
                        },
                    }
                }
                ProbeState::Announcing { mut stream, header, mut sent } => {
                    match write_send(&mut stream, &header, &mut sent, &mut self.ready) {
                        Progress::Next if send.is_empty() && expect.is_empty() => {
                            (ProbeState::Sending { stream, sent: 0 }, Progress::Done(Ok(())))
                        }
                        Progress::Next => (ProbeState::Sending { stream, sent: 0 }, Progress::Next),
                        other => (ProbeState::Announcing { stream, header, sent }, other),
                    }
                }
                ProbeState::Sending { mut stream, mut sent } => {
                    let progress = write_send(&mut stream, send, &mut sent, &mut self.ready);
                    match progress {
                        Progress::Next if expect.is_empty() => {
                            (ProbeState::Sending { stream, sent }, Progress::Done(Ok(())))
                        }
                        Progress::Next => (ProbeState::Expecting { stream, seen: Vec::new() }, Progress::Next),
                        other => (ProbeState::Sending { stream, sent }, other),
                    }
                }
                ProbeState::Expecting { mut stream, mut seen } => {
                    let progress = read_expect(&mut stream, &mut seen, expect, &mut self.ready);
                    (ProbeState::Expecting { stream, seen }, progress)
                }
                ProbeState::Datagram { socket } => {
                    let progress = read_datagram(&socket, expect);
                    (ProbeState::Datagram { socket }, progress)
                }
            };
            self.state = next;
            match progress {
                Progress::Next => continue,
                Progress::Wait => return None,
                Progress::Done(result) => return Some(result),
            }
        }
    }

    fn finish(&mut self, key: Key, result: CheckResult, cx: &mut Cx<'_>) -> Step {
        self.state = ProbeState::Idle; // drops the socket
        self.release_slot(cx);
        self.deadline = None;
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
        let Some(backend) = cx.services.backend(self.backend) else { return Step::Close };
        let Some(service) = cx.services.service(backend.service) else { return Step::Close };
        let (rise, fall) = (service.settings.rise, service.settings.fall);
        let names = format!("{}/{}", service.settings.name, backend.config.name);
        match &result {
            Ok(()) => backend.state.check_success.add(1),
            Err(_) => backend.state.check_fail.add(1),
        }
        let transition = cx.services.record_check(self.backend, result.is_ok());
        let last = LastCheck { at: std::time::SystemTime::now(), error: result.as_ref().err().cloned() };
        if let Some(b) = cx.services.backend_mut(self.backend) {
            b.last_check = Some(last);
        }
        match (transition, &result) {
            (Some(Transition::WentDown), Err(why)) => warn!("{names} is down: {fall} checks failed, last: {why}"),
            (Some(Transition::CameUp), _) => info!("{names} is up: {rise} checks passed"),
            (_, Err(why)) => debug!("{names}: check failed: {why}"),
            (_, Ok(())) => {}
        }
        self.schedule_next(key, cx);
        Step::Wait
    }

    /// Arms the next check one interval after the last one was due. Counting
    /// from the due time, not from when the loop got to it, keeps each probe on
    /// its own phase: probes that happened to fire in the same pass don't fall
    /// into lockstep and probe in bursts.
    fn schedule_next(&mut self, key: Key, cx: &mut Cx<'_>) {
        let interval = cx
            .services
            .backend(self.backend)
            .and_then(|b| cx.services.service(b.service))
            .and_then(|s| crate::model::config::seconds(s.settings.check_interval));
        // Interval 0 turns checks off; the service update removes this probe.
        let Some(interval) = interval else { return };
        // Validation keeps intervals ≥ 1 ms; never divide by zero all the same.
        let interval = interval.max(Duration::from_millis(1));
        let mut next = self.due + interval;
        if next + interval <= cx.now {
            // Late by more than an interval (a long check, a busy loop): skip the
            // missed turns but stay on phase.
            let missed = cx.now.duration_since(self.due).as_secs_f64() / interval.as_secs_f64();
            next = self.due + interval.mul_f64(missed.floor());
        }
        // Late by less than an interval (a check that ran up to its deadline):
        // check at once, and keep the phase for the one after.
        self.due = next;
        let next = next.max(cx.now);
        self.arm(key, Some(next), cx);
    }

    fn arm(&mut self, key: Key, at: Option<Instant>, cx: &mut Cx<'_>) {
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
        if let Some(at) = at {
            self.timer = Some(cx.timers.insert(at, key));
        }
    }
}

/// What one step of a check came to.
enum Progress {
    /// Move on to the next state now.
    Next,
    /// Wait for the socket.
    Wait,
    /// The check passed or failed.
    Done(CheckResult),
}

/// The PROXY header a check sends first, if any. A `send_proxy` backend
/// checked at its traffic address gets one, since a server that requires the
/// header logs or rejects a connection without it (HAProxy issue #511): v2
/// sends `LOCAL` (spec 2.2: "such connections exist when the proxy sends
/// health-checks"), v1 a line of the check's own endpoints, as spec 2.1 asks
/// of health checks. A separate `check_address` is a health port of its own
/// and gets none, as HAProxy does when a check has its own port.
fn check_header(cx: &Cx<'_>, backend: Key, stream: &Conn) -> Option<Vec<u8>> {
    let backend = cx.services.backend(backend)?;
    if backend.check_addr.as_ref() != Some(&backend.addr) {
        return None;
    }
    match backend.config.send_proxy {
        SendProxy::Off => None,
        SendProxy::V2 => Some(proxy_header::v2_local()),
        SendProxy::V1 => {
            let (Some(local), Some(remote)) = (stream.local_inet(), stream.peer_inet()) else {
                return Some(b"PROXY UNKNOWN\r\n".to_vec());
            };
            Some(proxy_header::v1(local, remote))
        }
    }
}

/// Writes what is left of `check_send`.
fn write_send(stream: &mut Conn, send: &[u8], sent: &mut usize, ready: &mut Ready) -> Progress {
    while *sent < send.len() {
        if !ready.writable {
            return Progress::Wait;
        }
        match stream.write(&send[*sent..]) {
            Ok(0) => return Progress::Done(Err("connection closed while sending".into())),
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.writable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Progress::Done(Err(reason(&e))),
        }
    }
    Progress::Next
}

/// Reads the reply until `expect` shows up, the peer closes, or 4 KiB were seen.
fn read_expect(stream: &mut Conn, seen: &mut Vec<u8>, expect: &[u8], ready: &mut Ready) -> Progress {
    let mut chunk = [0u8; 1024];
    while ready.readable {
        let want = (EXPECT_LIMIT - seen.len()).min(chunk.len());
        match stream.read(&mut chunk[..want]) {
            // Closed early: say whether a reply came and lacked the text, or none came.
            Ok(0) if seen.is_empty() => return Progress::Done(Err("connection closed before any reply".into())),
            Ok(0) => {
                let why = format!("reply did not contain {:?} ({} bytes, then closed)", lossy(expect), seen.len());
                return Progress::Done(Err(why));
            }
            Ok(n) => {
                seen.extend_from_slice(&chunk[..n]);
                if contains(seen, expect) {
                    return Progress::Done(Ok(()));
                }
                if seen.len() >= EXPECT_LIMIT {
                    let why = format!("reply did not contain {:?} in its first 4 KiB", lossy(expect));
                    return Progress::Done(Err(why));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Progress::Done(Err(reason(&e))),
        }
    }
    Progress::Wait
}

/// A UDP check's reply: one datagram, in which `expect` must be (if set).
fn read_datagram(socket: &UdpSocket, expect: &[u8]) -> Progress {
    let mut reply = [0u8; EXPECT_LIMIT];
    loop {
        return match socket.recv(&mut reply) {
            Ok(n) if contains(&reply[..n], expect) => Progress::Done(Ok(())),
            Ok(n) => Progress::Done(Err(format!("reply did not contain {:?} ({n} bytes)", lossy(expect)))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Progress::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Progress::Done(Err(reason(&e))),
        };
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A short reason for a failed check: "refused", "timeout", or the OS's words.
fn reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_checks_spread_over_the_interval() {
        let interval = Duration::from_millis(1000);
        let mut per_ms = [0u32; 1000];
        for i in 0..1000 {
            let ms = first_check_offset(i, interval).as_millis() as usize;
            per_ms[ms] += 1;
        }
        assert!(per_ms.iter().all(|&n| n <= 2), "some millisecond has {} probes", per_ms.iter().max().unwrap());
    }

    #[test]
    fn expect_matches_across_reads() {
        assert!(contains(b"HTTP/1.0 200 OK\r\n", b"200 OK"));
        assert!(!contains(b"HTTP/1.0 503 Service Unavailable", b"200 OK"));
    }
}
