//! Admin connections: the listener (TCP, or a unix socket when the address
//! starts with `/`) and one small state machine per client that reads a
//! request, hands it up to be executed, and writes the response, without ever
//! blocking the loop (reference §5).
//!
//! Framing is `http.rs`; routes are `api.rs`. A connection whose request takes
//! longer than `REQUEST_TIME` to arrive (or whose response takes that long to
//! leave) is dropped.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info};
use mio::{Interest, Registry};

use crate::context::Cx;
use crate::control::api::Response;
use crate::control::http::{self, Decoder, Progress, Request, MAX_BODY, MAX_HEAD};
use crate::model::counters::StatusCounts;
use crate::runtime::conn::Conn;
use crate::runtime::key::{Key, Side};
use crate::runtime::listen::{Bound, SocketKind, StreamListener};
use crate::runtime::ready::{Ready, Step};
use crate::runtime::timer::{TimerKey, Wheel};
use crate::runtime::unix::{self, SocketFile};

/// How long a request may take to arrive, and a response to leave (reference §5).
pub const REQUEST_TIME: Duration = Duration::from_secs(10);

/// Requests one connection may have executed per wakeup before others get a turn.
const REQUESTS_PER_TURN: u32 = 16;

/// Input kept unread at most. The decoder drops body bytes and framing as it
/// goes, so input holds a head and about one read; this is only a backstop.
const INPUT_LIMIT: usize = 4 * (MAX_HEAD + MAX_BODY);
/// Bytes read from a client at once.
const READ_CHUNK: usize = 64 * 1024;
/// Buffer capacity kept between requests; a big request's memory is given back.
const KEEP_CAPACITY: usize = 64 * 1024;
/// How long a new connection is safe from eviction: time for a well-behaved
/// client's request to arrive.
pub const EVICTION_GRACE: Duration = Duration::from_millis(250);
/// Listen backlog of the admin socket.
const ADMIN_BACKLOG: i32 = 128;

/// Where the admin API listens, once resolved.
#[derive(Debug, Clone)]
pub enum AdminAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path and the permissions its file gets.
    Unix(PathBuf, u32),
}

/// The admin API's listening socket: a service's kind of stream listener,
/// whose unix file is removed when it goes, if it is still ours.
#[derive(Debug)]
pub struct AdminListener(StreamListener);

impl AdminListener {
    /// Binds `addr`; for a unix path a stale socket file there is replaced,
    /// and a live one or any other file refused (reference §1).
    pub fn bind(addr: &AdminAddr) -> io::Result<AdminListener> {
        let listener = match addr {
            AdminAddr::Unix(path, mode) => {
                let (listener, file) = unix::bind(path, *mode, ADMIN_BACKLOG)?;
                info!("admin listening on {}", path.display());
                StreamListener::Unix(listener, Arc::new(file))
            }
            AdminAddr::Tcp(addr) => {
                let listener = crate::runtime::net::bind(*addr)?;
                info!("admin listening on {}", listener.local_addr()?);
                StreamListener::Tcp(listener)
            }
        };
        Ok(AdminListener(listener))
    }

    /// The admin listener another process handed over (reference §3.7),
    /// checked to be of its kind; a unix one's `file` stays that process's until
    /// the hand-over is done ([`SocketFile::own`]).
    pub fn adopt(file: Option<Arc<SocketFile>>, fd: OwnedFd) -> io::Result<AdminListener> {
        let kind = if file.is_some() { SocketKind::Unix } else { SocketKind::Tcp };
        match Bound::adopt(kind, fd, file)? {
            Bound::Stream(listener) => Ok(AdminListener(listener)),
            Bound::Datagram(_) => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, "the handed-over admin socket is of another kind"))
            }
        }
    }

    /// Another descriptor of the same socket, for the hand-over.
    pub fn fd_copy(&self) -> io::Result<OwnedFd> {
        self.0.fd_copy()
    }

    /// A unix listener's socket file.
    pub fn file(&self) -> Option<&Arc<SocketFile>> {
        self.0.file()
    }

    /// The bound TCP address, if it is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.0.local_addr().ok().and_then(|a| a.inet())
    }

    /// Registers the listener under `key`.
    pub fn register(mut self, key: Key, registry: &Registry) -> io::Result<AdminListener> {
        registry.register(&mut self.0, key.token(Side::Client), Interest::READABLE)?;
        Ok(self)
    }

    /// Stops this poller hearing of it.
    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut self.0)
    }

    /// Accepts one admin client, with a name for it in logs.
    pub fn accept(&self) -> io::Result<(Conn, String)> {
        let (conn, peer) = self.0.accept()?;
        let who = match &conn {
            Conn::Tcp(_) => peer.to_string(),
            // The socket's peer, as the kernel vouches for it: who changed what, in the audit log.
            Conn::Unix(s) => match crate::runtime::net::peer_cred(s) {
                Some((uid, pid)) => format!("unix socket (uid {uid}, pid {pid})"),
                None => "unix socket".to_string(),
            },
        };
        Ok((conn, who))
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        // While the socket is still open, so the inode it binds cannot have gone to another file.
        if let Some(file) = self.0.file() {
            file.remove();
        }
    }
}

/// Where an admin connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading (and decoding) the next request.
    Reading,
    /// A request was handed up; its response has not come back yet.
    Executing { keep_alive: bool },
    /// Writing a response; then read the next request or close.
    Writing { keep_alive: bool },
    /// Our side is shut; reading what the client still sends so closing doesn't reset the response away.
    Closing,
}

/// What an admin connection wants after it ran.
#[derive(Debug)]
pub enum AdminStep {
    /// As for any state machine.
    Done(Step),
    /// Execute this request and hand the response to [`AdminConn::respond`].
    Execute(Request),
}

/// One admin client.
#[derive(Debug)]
pub struct AdminConn {
    stream: Conn,
    /// Who it is, for logs: `ip:port` or `unix socket`.
    peer: String,
    ready: Ready,
    input: Vec<u8>,
    decoder: Decoder,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    timer: Option<TimerKey>,
    /// Requests this wakeup may still execute.
    turn: u32,
    /// When it was accepted: a young connection is not evicted.
    accepted: Instant,
    /// Progress of the current request or response: bytes moved since `since`.
    moved: u64,
    since: Instant,
    /// Where every response sent is counted, for the metrics.
    statuses: Arc<StatusCounts>,
}

impl AdminConn {
    /// Registers a new admin client under `key`; its first request must arrive within `REQUEST_TIME`.
    pub fn new(
        key: Key,
        mut stream: Conn,
        peer: String,
        registry: &Registry,
        now: Instant,
        timers: &mut Wheel<Key>,
        statuses: Arc<StatusCounts>,
    ) -> io::Result<AdminConn> {
        let token = key.token(Side::Client);
        let interest = Interest::READABLE | Interest::WRITABLE;
        registry.register(&mut stream, token, interest)?;
        let timer = Some(timers.insert(now + REQUEST_TIME, key));
        Ok(AdminConn {
            stream,
            peer,
            // Just accepted: its request has likely arrived with the handshake,
            // so read at once rather than wait for an event (and an eviction).
            ready: Ready { readable: true, writable: true, ..Ready::default() },
            input: Vec::new(),
            decoder: Decoder::new(),
            output: Vec::new(),
            written: 0,
            phase: Phase::Reading,
            timer,
            turn: REQUESTS_PER_TURN,
            accepted: now,
            moved: 0,
            since: now,
            statuses,
        })
    }

    /// Who the client is, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The socket is ready (or there is leftover work): move the exchange on.
    pub fn on_ready(&mut self, key: Key, ready: Ready, cx: &mut Cx<'_>) -> AdminStep {
        self.ready.merge(ready);
        self.turn = REQUESTS_PER_TURN;
        // A reset while we wait for a change to be executed (or for anything
        // else that reads or writes nothing) would go unseen until the answer.
        if std::mem::take(&mut self.ready.error) {
            if let Ok(Some(e)) | Err(e) = self.stream.take_error() {
                return self.closed_by(e);
            }
        }
        self.advance(key, cx)
    }

    fn advance(&mut self, key: Key, cx: &mut Cx<'_>) -> AdminStep {
        loop {
            match self.phase {
                Phase::Executing { .. } => return AdminStep::Done(Step::Wait),
                Phase::Writing { keep_alive } => {
                    match self.flush() {
                        Ok(true) => {}
                        Ok(false) => return AdminStep::Done(Step::Wait),
                        Err(e) => return self.closed_by(e),
                    }
                    if !keep_alive {
                        if let Err(e) = self.stream.shutdown(std::net::Shutdown::Write) {
                            return self.closed_by(e);
                        }
                        self.phase = Phase::Closing;
                        continue;
                    }
                    self.phase = Phase::Reading;
                    self.restart_progress(cx.now);
                    self.arm(key, cx);
                }
                Phase::Closing => {
                    let mut sink = [0u8; 4096];
                    return match self.read_into(&mut sink) {
                        Ok(false) => AdminStep::Done(Step::Wait),
                        _ => AdminStep::Done(Step::Close),
                    };
                }
                // Pipelined requests take turns with the rest of the loop.
                Phase::Reading if self.turn == 0 => return AdminStep::Done(Step::Again),
                Phase::Reading => match self.decoder.decode(&mut self.input) {
                    Ok(Progress::Request(request)) => {
                        self.turn -= 1;
                        self.phase = Phase::Executing { keep_alive: request.keep_alive };
                        if let Some(timer) = self.timer.take() {
                            cx.timers.cancel(timer);
                        }
                        // A big request's buffer is not kept for the small ones after it.
                        if self.input.capacity() > KEEP_CAPACITY {
                            self.input.shrink_to(KEEP_CAPACITY.max(self.input.len()));
                        }
                        return AdminStep::Execute(request);
                    }
                    Ok(Progress::SendContinue) => {
                        self.output.extend_from_slice(http::CONTINUE);
                        if let Err(e) = self.flush() {
                            return self.closed_by(e);
                        }
                    }
                    Ok(Progress::NeedMore) if self.input.len() >= INPUT_LIMIT => {
                        let e = http::HttpError::BodyTooLarge;
                        self.queue(Response::error(e.status(), &e.to_string()), false, cx.now);
                    }
                    Ok(Progress::NeedMore) => match self.read_input() {
                        Ok(true) => {}
                        Ok(false) => return AdminStep::Done(Step::Wait),
                        Err(e) => return self.closed_by(e),
                    },
                    Err(e) => {
                        debug!("admin: {}: bad request: {e}", self.peer);
                        self.queue(Response::error(e.status(), &e.to_string()), false, cx.now);
                    }
                },
            }
        }
    }

    /// Takes the response to the request this connection handed up, and goes on.
    pub fn respond(&mut self, key: Key, response: Response, cx: &mut Cx<'_>) -> AdminStep {
        let keep_alive = matches!(self.phase, Phase::Executing { keep_alive: true });
        self.queue(response, keep_alive, cx.now);
        self.arm(key, cx);
        self.advance(key, cx)
    }

    /// The request or response took too long.
    pub fn on_timer(&mut self, _key: Key, _cx: &mut Cx<'_>) -> AdminStep {
        self.timer = None;
        debug!("admin: {}: connection idle or too slow for {} s; closing", self.peer, REQUEST_TIME.as_secs());
        AdminStep::Done(Step::Close)
    }

    /// Gives back the connection's timer before it is dropped.
    pub fn close(&mut self, cx: &mut Cx<'_>) {
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
    }

    fn queue(&mut self, response: Response, keep_alive: bool, now: Instant) {
        self.statuses.count(response.status);
        let extra: Vec<(&str, &str)> = response.fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        self.output.extend_from_slice(&http::response(
            response.status,
            response.content_type,
            &response.body,
            keep_alive,
            &extra,
        ));
        self.phase = Phase::Writing { keep_alive };
        self.restart_progress(now);
    }

    fn restart_progress(&mut self, now: Instant) {
        self.moved = 0;
        self.since = now;
    }

    fn arm(&mut self, key: Key, cx: &mut Cx<'_>) {
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
        self.timer = Some(cx.timers.insert(cx.now + REQUEST_TIME, key));
    }

    /// How fast the current request (or response) moves, in bytes per second,
    /// if the connection may be closed to make room for a newcomer: not while
    /// its request is executed, nor in its first [`EVICTION_GRACE`].
    pub fn eviction_rate(&self, now: Instant) -> Option<f64> {
        if matches!(self.phase, Phase::Executing { .. }) || now < self.accepted + EVICTION_GRACE {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64().max(0.001);
        Some(self.moved as f64 / elapsed)
    }

    fn closed_by(&self, e: io::Error) -> AdminStep {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            debug!("admin: {}: connection failed: {e}", self.peer);
        }
        AdminStep::Done(Step::Close)
    }

    /// Writes queued output; `Ok(true)` once all of it is out.
    fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.output.len() {
            if !self.ready.writable {
                return Ok(false);
            }
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    self.moved += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        if self.output.capacity() > KEEP_CAPACITY {
            self.output = Vec::new();
        }
        self.written = 0;
        Ok(true)
    }

    /// Reads one chunk into the input, only when the decoder needs more: input
    /// then holds about one request, and taking a request off its front stays
    /// cheap however much a client pipelines. `Ok(true)` if bytes arrived. A
    /// client's FIN right after its request is seen only on the next call, once
    /// every request before it was answered (`nc -N`, HTTP/1.0 style clients).
    fn read_input(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK];
        let mut got = false;
        while !got && self.ready.readable && self.input.len() < INPUT_LIMIT {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    self.moved += n as u64;
                    got = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Reads and discards; `Ok(true)` at EOF.
    fn read_into(&mut self, sink: &mut [u8]) -> io::Result<bool> {
        while self.ready.readable {
            match self.stream.read(sink) {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}
