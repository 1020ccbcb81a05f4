//! Admin connections: the listener (TCP, or a unix socket when the address
//! starts with `/`) and one small state machine per client that reads a
//! request, hands it up to be executed, and writes the response, without ever
//! blocking the loop (SPEC §5).
//!
//! Framing is `http.rs`; routes are `api.rs`. A connection whose request takes
//! longer than `REQUEST_TIME` to arrive (or whose response takes that long to
//! leave) is dropped.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, info};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry};

use crate::context::Cx;
use crate::control::api::Response;
use crate::control::http::{self, Decoder, Progress, Request, MAX_BODY, MAX_HEAD};
use crate::runtime::key::{Key, Side};
use crate::runtime::ready::{Ready, Step};
use crate::runtime::timer::{TimerKey, Wheel};

/// How long a request may take to arrive, and a response to leave (SPEC §5).
pub const REQUEST_TIME: Duration = Duration::from_secs(10);

/// Requests one connection may have executed per wakeup before others get a turn.
const REQUESTS_PER_TURN: u32 = 16;

/// Input kept unread at most: one full request, with room for chunk framing
/// (which can outweigh small chunks) and the next request's start.
const INPUT_LIMIT: usize = 4 * (MAX_HEAD + MAX_BODY);

/// The admin API's listening socket.
#[derive(Debug)]
pub enum AdminListener {
    /// `host:port`.
    Tcp(TcpListener),
    /// A unix socket path; the file is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl AdminListener {
    /// Binds `addr`; for a unix path a stale socket file there is removed first (SPEC §1).
    pub fn bind(addr: &str) -> io::Result<AdminListener> {
        if addr.starts_with('/') {
            let path = PathBuf::from(addr);
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                // Stale only if the connect is refused: never take over a running
                // shuttle's socket. Nonblocking, so a full backlog can't hang start-up.
                match UnixStream::connect(&path) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => fs::remove_file(&path)?,
                    _ => {
                        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is listening there"));
                    }
                }
            }
            let listener = UnixListener::bind(&path)?;
            info!("admin listening on {}", path.display());
            return Ok(AdminListener::Unix(listener, path));
        }
        let resolved =
            crate::model::config::resolve(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = crate::runtime::net::bind(resolved)?;
        info!("admin listening on {}", listener.local_addr()?);
        Ok(AdminListener::Tcp(listener))
    }

    /// Registers the listener under `key`.
    pub fn register(mut self, key: Key, registry: &Registry) -> io::Result<AdminListener> {
        let token = key.token(Side::Client);
        match &mut self {
            AdminListener::Tcp(l) => registry.register(l, token, Interest::READABLE)?,
            AdminListener::Unix(l, _) => registry.register(l, token, Interest::READABLE)?,
        }
        Ok(self)
    }

    /// Accepts one admin client.
    pub fn accept(&self) -> io::Result<AdminStream> {
        match self {
            AdminListener::Tcp(l) => l.accept().map(|(s, _)| AdminStream::Tcp(s)),
            AdminListener::Unix(l, _) => l.accept().map(|(s, _)| AdminStream::Unix(s)),
        }
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        if let AdminListener::Unix(_, path) = self {
            let _ = fs::remove_file(path);
        }
    }
}

/// An admin client's socket.
#[derive(Debug)]
pub enum AdminStream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a unix socket.
    Unix(UnixStream),
}

impl Read for AdminStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            AdminStream::Tcp(s) => s.read(buf),
            AdminStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for AdminStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            AdminStream::Tcp(s) => s.write(buf),
            AdminStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AdminStream {
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            AdminStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            AdminStream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
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
    stream: AdminStream,
    ready: Ready,
    input: Vec<u8>,
    decoder: Decoder,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    timer: Option<TimerKey>,
    /// Requests this wakeup may still execute.
    turn: u32,
}

impl AdminConn {
    /// Registers a new admin client under `key`; its first request must arrive within `REQUEST_TIME`.
    pub fn new(
        key: Key,
        mut stream: AdminStream,
        registry: &Registry,
        now: Instant,
        timers: &mut Wheel<Key>,
    ) -> io::Result<AdminConn> {
        let token = key.token(Side::Client);
        let interest = Interest::READABLE | Interest::WRITABLE;
        match &mut stream {
            AdminStream::Tcp(s) => registry.register(s, token, interest)?,
            AdminStream::Unix(s) => registry.register(s, token, interest)?,
        }
        let timer = Some(timers.insert(now + REQUEST_TIME, key));
        Ok(AdminConn {
            stream,
            ready: Ready::default(),
            input: Vec::new(),
            decoder: Decoder::new(),
            output: Vec::new(),
            written: 0,
            phase: Phase::Reading,
            timer,
            turn: REQUESTS_PER_TURN,
        })
    }

    /// The socket is ready (or there is leftover work): move the exchange on.
    pub fn on_ready(&mut self, key: Key, ready: Ready, cx: &mut Cx<'_>) -> AdminStep {
        self.ready.merge(ready);
        self.turn = REQUESTS_PER_TURN;
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
                        if let Err(e) = self.stream.shutdown_write() {
                            return self.closed_by(e);
                        }
                        self.phase = Phase::Closing;
                        continue;
                    }
                    self.phase = Phase::Reading;
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
                        return AdminStep::Execute(request);
                    }
                    Ok(Progress::SendContinue) => {
                        self.output.extend_from_slice(http::CONTINUE);
                        if let Err(e) = self.flush() {
                            return self.closed_by(e);
                        }
                    }
                    Ok(Progress::NeedMore) if self.input.len() >= INPUT_LIMIT => {
                        // Only chunk framing can make a request this big without the
                        // decoder objecting: too large, with its framing.
                        let e = http::HttpError::BodyTooLarge;
                        let body = crate::control::api::error_body(&e.to_string());
                        self.queue(Response { status: e.status(), body, allow: None }, false);
                    }
                    Ok(Progress::NeedMore) => match self.read_input() {
                        Ok(true) => {}
                        Ok(false) => return AdminStep::Done(Step::Wait),
                        Err(e) => return self.closed_by(e),
                    },
                    Err(e) => {
                        debug!("admin: bad request: {e}");
                        let body = crate::control::api::error_body(&e.to_string());
                        self.queue(Response { status: e.status(), body, allow: None }, false);
                    }
                },
            }
        }
    }

    /// Takes the response to the request this connection handed up, and goes on.
    pub fn respond(&mut self, key: Key, response: Response, cx: &mut Cx<'_>) -> AdminStep {
        let keep_alive = matches!(self.phase, Phase::Executing { keep_alive: true });
        self.queue(response, keep_alive);
        self.arm(key, cx);
        self.advance(key, cx)
    }

    /// The request or response took too long.
    pub fn on_timer(&mut self, _key: Key, _cx: &mut Cx<'_>) -> AdminStep {
        self.timer = None;
        debug!("admin: connection idle or too slow for {} s; closing", REQUEST_TIME.as_secs());
        AdminStep::Done(Step::Close)
    }

    /// Gives back the connection's timer before it is dropped.
    pub fn close(&mut self, cx: &mut Cx<'_>) {
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
    }

    fn queue(&mut self, response: Response, keep_alive: bool) {
        let extra: Vec<(&str, &str)> = response.allow.iter().map(|allow| ("Allow", *allow)).collect();
        self.output.extend_from_slice(&http::response(response.status, &response.body, keep_alive, &extra));
        self.phase = Phase::Writing { keep_alive };
    }

    fn arm(&mut self, key: Key, cx: &mut Cx<'_>) {
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
        self.timer = Some(cx.timers.insert(cx.now + REQUEST_TIME, key));
    }

    /// Whether the connection waits for a request with nothing received: safe to drop for a newcomer.
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Reading && self.input.is_empty()
    }

    fn closed_by(&self, e: io::Error) -> AdminStep {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            debug!("admin: connection failed: {e}");
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
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.ready.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.written = 0;
        Ok(true)
    }

    /// Reads one chunk into the input, only when the decoder needs more: input
    /// then holds about one request, and taking a request off its front stays
    /// cheap however much a client pipelines. `Ok(true)` if bytes arrived. A
    /// client's FIN right after its request is seen only on the next call, once
    /// every request before it was answered (`nc -N`, HTTP/1.0 style clients).
    fn read_input(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 64 * 1024];
        let mut got = false;
        while !got && self.ready.readable && self.input.len() < INPUT_LIMIT {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
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
