//! UDP services: a service socket per loop receives every client's
//! datagrams and finds (or opens) the client's flow; each flow's socket
//! relays to its backend and its replies go back out of the service socket.
//!
//! Everything here runs on the loop and never blocks: sockets are
//! nonblocking, and a datagram that cannot be sent now (a full socket buffer)
//! is dropped and counted, as the network would drop it. One 64 KiB buffer
//! per loop carries every datagram, so relaying allocates nothing.
//!
//! A new flow takes a slot of the service's `max_flows` (one compare-and-swap
//! on a count every worker shares) and then a backend from the balancer,
//! which counts it as an active connection of that backend, so least
//! connected balances flows. Both are given back when the flow ends.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, warn};
use mio::net::UdpSocket;
use mio::Interest;

use super::{Entry, Server};
use crate::data::finished::End;
use crate::data::flow::{self, Flow};
use crate::model::config;
use crate::model::health::Transition;
use crate::runtime::key::{Key, Side};
use crate::runtime::net;

/// Datagrams one socket reads per wakeup before others get a turn.
const DATAGRAM_BATCH: usize = 256;
/// The largest UDP payload, over IPv6 jumbograms aside: a datagram is never cut.
pub const MAX_DATAGRAM: usize = 65_536;

/// A UDP service's socket in one loop, and the flows it has open there.
#[derive(Debug)]
pub struct Datagrams {
    /// Bound to the service's address (`SO_REUSEPORT` with several workers).
    pub socket: UdpSocket,
    /// The service it feeds; `None` while staged.
    pub service: Option<Key>,
    /// Each client address's flow entry.
    pub flows: HashMap<SocketAddr, Key>,
}

impl Datagrams {
    /// A staged socket, serving nobody yet.
    pub fn new(socket: UdpSocket) -> Datagrams {
        Datagrams { socket, service: None, flows: HashMap::new() }
    }
}

/// Whether a send or receive error is the backend refusing (an ICMP port unreachable).
fn refused(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionRefused
}

impl Server {
    /// Registers a UDP socket the loop will serve once its change commits.
    pub(crate) fn stage_datagrams(&mut self, mut socket: UdpSocket) -> io::Result<Key> {
        socket.local_addr()?;
        if self.datagram.is_empty() {
            self.datagram = vec![0; MAX_DATAGRAM];
        }
        let registry = self.poll.registry();
        let key = self.entries.try_insert_with(|key| {
            registry.register(&mut socket, key.token(Side::Client), Interest::READABLE)?;
            Ok::<_, io::Error>(Entry::Datagrams(Datagrams::new(socket)))
        })?;
        self.fds.listeners += 1;
        Ok(key)
    }

    /// Reads a batch of datagrams from a service socket and relays each to its flow.
    pub(super) fn receive(&mut self, key: Key, now: Instant) {
        for _ in 0..DATAGRAM_BATCH {
            let Server { entries, datagram, .. } = self;
            let Some(Entry::Datagrams(socket)) = entries.get_mut(key) else { return };
            // Staged: its datagrams wait in the kernel until the change commits.
            let Some(service) = socket.service else { return };
            let (n, client) = match socket.socket.recv_from(datagram) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // An ICMP error for an earlier reply, or a transient fault: the next datagram is another's.
                    debug!("receiving a datagram: {e}");
                    continue;
                }
            };
            let flow = match socket.flows.get(&client) {
                Some(&flow) => Some(flow),
                None => self.open_flow(key, service, client, now),
            };
            if let Some(flow) = flow {
                self.relay_to_backend(flow, n, now);
            }
        }
        // Batch spent with datagrams possibly waiting: come back after others had a turn.
        self.enqueue(key);
    }

    /// Opens `client`'s flow to a backend of `service`; `None` (the datagram
    /// dropped and counted) at the flow limit or without a backend.
    fn open_flow(&mut self, listener: Key, service: Key, client: SocketAddr, now: Instant) -> Option<Key> {
        let s = self.services.service(service)?;
        let service_name = s.name.clone();
        let max_flows = u64::from(s.settings.max_flows);
        let idle = config::seconds(s.settings.udp_idle_timeout)?;
        let replies_left = flow::replies_allowed(s.settings.udp_max_responses);
        if !self.fds.has_room_for_pair() || !s.state.udp.flows.try_add_below(max_flows) {
            s.state.udp.dropped_flow_limit.add(1);
            return None;
        }
        let mut plan = self.services.plan(service);
        let Some(backend) = self.services.next_target(&mut plan) else {
            let udp = &self.services.service(service)?.state.udp;
            udp.flows.sub_one();
            udp.dropped_no_backend.add(1);
            return None;
        };
        // Validation keeps unix paths off UDP services: a backend here has an IP address.
        let label = self.services.backend(backend).map(|b| b.label.clone());
        let opened = label.as_ref().and_then(|l| l.addr.inet()).ok_or(io::Error::from(io::ErrorKind::NotFound));
        let opened = opened.and_then(net::udp_flow).and_then(|mut socket| {
            let names = (service_name, label.ok_or(io::ErrorKind::NotFound)?);
            let registry = self.poll.registry();
            self.entries.try_insert_with(|key| {
                registry.register(&mut socket, key.token(Side::Backend), Interest::READABLE)?;
                let flow = Flow {
                    socket,
                    client,
                    listener,
                    service,
                    backend,
                    last: now,
                    idle,
                    replies_left,
                    replies_seen: 0,
                    timer: None,
                    started: now,
                    bytes: [0, 0],
                    end: None,
                    names,
                };
                Ok::<_, io::Error>(Entry::Flow(flow))
            })
        });
        let key = match opened {
            Ok(key) => key,
            Err(e) => {
                warn!("cannot open a UDP flow for {client}: {e}");
                self.services.release_slot(backend);
                let udp = &self.services.service(service)?.state.udp;
                udp.flows.sub_one();
                udp.dropped_send_error.add(1);
                return None;
            }
        };
        self.fds.flows += 1;
        self.services.flow_opened(backend);
        if let Some(Entry::Datagrams(socket)) = self.entries.get_mut(listener) {
            socket.flows.insert(client, key);
        }
        if let Some(Entry::Flow(f)) = self.entries.get_mut(key) {
            f.timer = Some(self.timers.insert(now + idle, key));
        }
        if log::log_enabled!(log::Level::Debug) {
            let (service, backend) = self.services.names(backend);
            debug!("{service}: UDP flow {client} -> {backend}");
        }
        Some(key)
    }

    /// Sends the loop's datagram buffer (`n` bytes) to a flow's backend.
    fn relay_to_backend(&mut self, key: Key, n: usize, now: Instant) {
        let Server { entries, datagram, services, .. } = self;
        let Some(Entry::Flow(f)) = entries.get_mut(key) else { return };
        let sent = f.socket.send(&datagram[..n]);
        let (backend, service) = (f.backend, f.service);
        match sent {
            Ok(_) => {
                f.last = now;
                f.bytes[0] += n as u64;
                if let Some(b) = services.backend(backend) {
                    b.state.datagrams_sent.add(1);
                    b.state.sent.add(n as u64);
                }
            }
            Err(e) => {
                if let Some(s) = services.service(service) {
                    s.state.udp.dropped_send_error.add(1);
                }
                if refused(&e) {
                    self.backend_refused(key, &e);
                }
            }
        }
    }

    /// A flow's socket is readable: relay its backend's replies to the client.
    pub(super) fn relay_from_backend(&mut self, key: Key, now: Instant) {
        for _ in 0..DATAGRAM_BATCH {
            let Server { entries, datagram, services, .. } = self;
            let Some(Entry::Flow(f)) = entries.get_mut(key) else { return };
            let n = match f.socket.recv(datagram) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if refused(&e) => return self.backend_refused(key, &e),
                Err(e) => {
                    debug!("receiving a UDP reply: {e}");
                    continue;
                }
            };
            let first = f.replies_seen == 0;
            f.replies_seen = f.replies_seen.saturating_add(1);
            let last = f.replied(now);
            if last {
                f.end = Some(End::MaxResponses);
            }
            let (client, listener, backend, service) = (f.client, f.listener, f.backend, f.service);
            let sent = match entries.get(listener) {
                Some(Entry::Datagrams(socket)) => socket.socket.send_to(&datagram[..n], client).map(drop),
                _ => Err(io::ErrorKind::NotConnected.into()),
            };
            if first {
                services.answered(backend);
            }
            match sent {
                Ok(()) => {
                    if let Some(Entry::Flow(f)) = entries.get_mut(key) {
                        f.bytes[1] += n as u64;
                    }
                    if let Some(b) = services.backend(backend) {
                        b.state.datagrams_received.add(1);
                        b.state.received.add(n as u64);
                    }
                }
                Err(e) => {
                    debug!("sending a UDP reply to {client}: {e}");
                    if let Some(s) = services.service(service) {
                        s.state.udp.dropped_send_error.add(1);
                    }
                }
            }
            if last {
                return self.remove_entry(key);
            }
        }
        self.enqueue(key);
    }

    /// The backend refused a flow's datagram: a failed connect for passive
    /// health, and the flow ends, so the client's next datagram picks again.
    fn backend_refused(&mut self, key: Key, error: &io::Error) {
        let Some(Entry::Flow(f)) = self.entries.get_mut(key) else { return };
        f.end = Some(End::ConnectFailed);
        let backend = f.backend;
        let transition = self.services.connect_failed(backend);
        let (service, name) = self.services.names(backend);
        log::trace!("{service}/{name}: UDP datagram refused: {error}");
        if transition == Some(Transition::WentDown) {
            warn!("{service}/{name} is down: its port refused UDP datagrams ({error})");
        }
        self.remove_entry(key);
    }

    /// A flow's idle timer: it ends if nothing passed since, else waits on.
    pub(super) fn flow_timer(&mut self, key: Key, now: Instant) {
        let Some(Entry::Flow(f)) = self.entries.get_mut(key) else { return };
        f.timer = None;
        let expires = f.expires();
        if now >= expires {
            f.end = Some(End::IdleTimeout);
            return self.remove_entry(key);
        }
        f.timer = Some(self.timers.insert(expires, key));
    }

    /// Ends every flow of this loop that `which` picks (a `?close`, a backend
    /// marked down), as `why` says in the access log.
    pub(crate) fn close_flows(&mut self, which: impl Fn(&Flow) -> bool, why: End) {
        let keys: Vec<Key> = self
            .entries
            .iter_mut()
            .filter_map(|(key, entry)| match entry {
                Entry::Flow(f) if which(f) => {
                    f.end = Some(why);
                    Some(key)
                }
                _ => None,
            })
            .collect();
        for key in keys {
            self.remove_entry(key);
        }
    }

    /// What closing a flow gives back: its timer, its client's place in the
    /// service socket, its backend slot and its `max_flows` slot.
    pub(super) fn flow_closed(&mut self, flow: &Flow) {
        if let Some(timer) = flow.timer {
            self.timers.cancel(timer);
        }
        if self.access_log.is_on() {
            let end = if self.draining.is_some() { End::Shutdown } else { End::SocketClosed };
            self.access_log.record(&flow.finished(Instant::now(), end));
        }
        if let Some(Entry::Datagrams(socket)) = self.entries.get_mut(flow.listener) {
            socket.flows.remove(&flow.client);
        }
        self.services.release_slot(flow.backend);
        if let Some(s) = self.services.service(flow.service) {
            s.state.udp.flows.sub_one();
        }
        self.fds.flows -= 1;
    }

    /// What closing a service socket takes with it: every flow it replies through.
    pub(super) fn datagrams_closed(&mut self, socket: &Datagrams) {
        self.fds.listeners -= 1;
        for &flow in socket.flows.values() {
            self.remove_entry(flow);
        }
        // A deleted service lived on only for its socket (as a TCP one lives on for its queue).
        if let Some(service) = socket.service.filter(|&s| self.services.is_retired(s)) {
            drop(self.services.remove(service));
        }
    }
}
