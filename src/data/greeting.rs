//! A client of an `accept_proxy` service before its PROXY protocol header is
//! complete: no backend is chosen or connected until then, so a client with
//! a bad header never reaches one (reference §3, PROXY protocol).
//!
//! The header is peeked, not read, until it is whole: then exactly its bytes
//! are consumed, and whatever the client sent after it stays in the socket
//! for the pair that takes over. Nothing is buffered here, and a client can
//! hold no more than one slab slot, its socket and the deadline.

use std::fmt;
use std::io::{self, Read};
use std::time::Instant;

use crate::model::endpoint::ClientAddr;
use crate::runtime::conn::Conn;
use mio::Interest;

use crate::context::Cx;
use crate::model::proxy_header::{self, HeaderError, Origin, Parsed, MAX_HEADER};
use crate::runtime::key::{Key, Side};
use crate::runtime::timer::TimerKey;

/// A client whose header is still arriving.
#[derive(Debug)]
pub struct Greeting {
    client: Conn,
    peer: ClientAddr,
    service: Key,
    /// When it was accepted: its pair's clocks count from there.
    accepted: Instant,
    deadline: Instant,
    timer: Option<TimerKey>,
}

/// Why a client was closed before its header was complete.
#[derive(Debug)]
pub enum GreetError {
    /// The bytes are not a valid header.
    Header(HeaderError),
    /// The client closed before sending a whole header.
    Closed,
    /// The deadline passed first.
    Timeout,
    /// The socket failed.
    Io(io::Error),
}

impl fmt::Display for GreetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GreetError::Header(e) => e.fmt(f),
            GreetError::Closed => f.write_str("closed before a complete PROXY protocol header"),
            GreetError::Timeout => f.write_str("no complete PROXY protocol header before the deadline"),
            GreetError::Io(e) => write!(f, "error before a complete PROXY protocol header: {e}"),
        }
    }
}

/// What a wakeup came to.
#[derive(Debug)]
pub enum Greeted {
    /// More bytes are needed.
    Wait,
    /// The header was consumed; the client's own bytes come next.
    Done(Origin),
    /// Close the client.
    Failed(GreetError),
}

impl Greeting {
    /// Registers a freshly accepted client whose header must arrive by `deadline`.
    pub fn new(
        key: Key,
        mut client: Conn,
        peer: ClientAddr,
        service: Key,
        deadline: Instant,
        cx: &mut Cx<'_>,
    ) -> io::Result<Greeting> {
        cx.registry.register(&mut client, key.token(Side::Client), Interest::READABLE)?;
        let timer = Some(cx.timers.insert(deadline, key));
        Ok(Greeting { client, peer, service, accepted: cx.now, deadline, timer })
    }

    /// The service it came to.
    pub fn service(&self) -> Key {
        self.service
    }

    /// The address it connected from (the real peer, whatever its header says).
    pub fn peer(&self) -> ClientAddr {
        self.peer
    }

    /// When it was accepted.
    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// Looks at what has arrived; on a whole header, consumes exactly it.
    pub fn on_ready(&mut self) -> Greeted {
        let mut seen = [0u8; MAX_HEADER];
        let n = loop {
            match self.client.peek(&mut seen) {
                Ok(0) => return Greeted::Failed(GreetError::Closed),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Edge-triggered: the next segment brings the next edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Greeted::Wait,
                Err(e) => return Greeted::Failed(GreetError::Io(e)),
            }
        };
        match proxy_header::parse(&seen[..n]) {
            Ok(Parsed::Incomplete) => Greeted::Wait,
            Ok(Parsed::Header { len, origin }) => match self.consume(&mut seen[..len]) {
                Ok(()) => Greeted::Done(origin),
                Err(e) => Greeted::Failed(GreetError::Io(e)),
            },
            Err(e) => Greeted::Failed(GreetError::Header(e)),
        }
    }

    /// Reads the `buf.len()` bytes just peeked: they are in the socket, so the reads can't block.
    fn consume(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.client.read(&mut buf[got..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The timer fired: fails once the deadline has passed (an early fire is a hint).
    pub fn on_timer(&mut self, key: Key, cx: &mut Cx<'_>) -> Greeted {
        self.timer = None;
        if cx.now >= self.deadline {
            return Greeted::Failed(GreetError::Timeout);
        }
        self.timer = Some(cx.timers.insert(self.deadline, key));
        Greeted::Wait
    }

    /// Gives back the timer and hands over the client, out of epoll, for a pair to register.
    pub fn finish(mut self, cx: &mut Cx<'_>) -> Conn {
        self.close(cx);
        // Failing only if it was never registered; the pair registers it afresh either way.
        let _ = cx.registry.deregister(&mut self.client);
        self.client
    }

    /// Gives back the timer before the greeting is dropped.
    pub fn close(&mut self, cx: &mut Cx<'_>) {
        if let Some(timer) = self.timer.take() {
            cx.timers.cancel(timer);
        }
    }
}
