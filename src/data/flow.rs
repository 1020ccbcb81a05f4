//! One UDP flow: the datagrams of one client address and port, relayed to
//! one backend through a socket of the flow's own.
//!
//! The flow's socket is connected to its backend, so the kernel hands it only
//! that backend's replies and reports the backend's ICMP errors on it
//! (`ECONNREFUSED` for a closed port, which counts as a failed connect). A
//! reply goes back to the client through the service's socket, so the client
//! sees it come from the address it sent to.
//!
//! A flow ends when it has been idle for `udp_idle_timeout`, after
//! `udp_max_responses` replies, when its backend refuses, or when it is cut.
//! Its idle deadline moves with every datagram, but its timer is not re-armed
//! per datagram: when the timer fires early it is set again for the deadline
//! it finds then.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mio::net::UdpSocket;

use crate::data::finished::{End, Finished};
use crate::model::endpoint::ClientAddr;
use crate::model::service::Label;
use crate::runtime::key::Key;
use crate::runtime::timer::TimerKey;

/// A UDP flow's socket and bookkeeping.
#[derive(Debug)]
pub struct Flow {
    /// Connected to the backend, bound to an ephemeral port.
    pub socket: UdpSocket,
    /// The client's address and port: the flow's key in its listener.
    pub client: SocketAddr,
    /// The service socket entry that replies go out of.
    pub listener: Key,
    /// The service.
    pub service: Key,
    /// The backend it relays to, whose slot it holds.
    pub backend: Key,
    /// The last datagram either way.
    pub last: Instant,
    /// How long it may be idle.
    pub idle: Duration,
    /// Replies it may still carry; `None` without `udp_max_responses`.
    pub replies_left: Option<u32>,
    /// Replies it carried (the first one proves the backend is there).
    pub replies_seen: u32,
    /// Its idle timer, once armed.
    pub timer: Option<TimerKey>,
    /// Its first datagram.
    pub started: Instant,
    /// Bytes relayed client → backend, and backend → client.
    pub bytes: [u64; 2],
    /// How it ends, once known; a flow closed otherwise ends with its socket or shuttle.
    pub end: Option<End>,
    /// Its service's and backend's names, for the access log (they may be gone by its end).
    pub names: (Arc<String>, Arc<Label>),
}

impl Flow {
    /// When it ends if nothing more comes.
    pub fn expires(&self) -> Instant {
        self.last + self.idle
    }

    /// Counts one reply to the client; `true` when that was its last.
    pub fn replied(&mut self, now: Instant) -> bool {
        self.last = now;
        match self.replies_left.as_mut() {
            Some(left) => {
                *left = left.saturating_sub(1);
                *left == 0
            }
            None => false,
        }
    }
}

impl Flow {
    /// Its access-log record, ending `end` unless it knows better.
    pub fn finished(&self, now: Instant, end: End) -> Finished<'_> {
        let (service, label) = &self.names;
        Finished {
            at: SystemTime::now(),
            service: service.as_str(),
            client: ClientAddr::Inet(self.client),
            backend: Some((label.name.as_str(), &label.addr)),
            connect: None,
            queued: Duration::ZERO,
            duration: now.saturating_duration_since(self.started),
            sent: self.bytes[0],
            received: self.bytes[1],
            // A refused datagram is the flow's one failed connect (reference §7.1).
            failed_connects: u16::from(self.end == Some(End::ConnectFailed)),
            end: self.end.unwrap_or(end),
        }
    }
}

/// The reply budget `udp_max_responses` gives a new flow (0: no limit).
pub fn replies_allowed(max_responses: u32) -> Option<u32> {
    (max_responses > 0).then_some(max_responses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(max_responses: u32) -> Flow {
        let socket = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let key = crate::runtime::key::Slots::new().insert(());
        Flow {
            socket,
            client: "127.0.0.1:9".parse().unwrap(),
            listener: key,
            service: key,
            backend: key,
            last: Instant::now(),
            idle: Duration::from_secs(30),
            replies_left: replies_allowed(max_responses),
            replies_seen: 0,
            timer: None,
            started: Instant::now(),
            bytes: [0, 0],
            end: None,
            names: (
                Arc::new("dns".into()),
                Arc::new(Label {
                    name: "b0".into(),
                    addr: crate::model::endpoint::Endpoint::Inet("127.0.0.1:53".parse().unwrap()),
                }),
            ),
        }
    }

    #[test]
    fn a_flow_ends_after_its_last_allowed_reply_and_never_without_a_limit() {
        let now = Instant::now();
        let mut one = flow(1);
        assert!(one.replied(now), "udp_max_responses 1: the first reply is the last");
        let mut two = flow(2);
        assert!(!two.replied(now));
        assert!(two.replied(now));
        let mut unlimited = flow(0);
        assert!((0..1000).all(|_| !unlimited.replied(now)));
    }

    #[test]
    fn traffic_moves_the_idle_deadline() {
        let mut f = flow(0);
        let later = f.last + Duration::from_secs(10);
        f.replied(later);
        assert_eq!(f.expires(), later + Duration::from_secs(30));
    }
}
