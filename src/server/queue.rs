//! Clients waiting for a backend slot (reference §3, connection limits), and
//! what a slot coming free sets off: the queue's head gets it, a listener
//! held at its service's `max_connections` accepts again.
//!
//! A queued client is not a pair yet: it is a small `Entry::Queued` holding
//! its socket (registered for reading only, to see it leave), its address,
//! when it came and its ticket. Each loop keeps its own FIFO per service
//! (`model::queue`); the order over all loops, and who gets woken, are the
//! shared gate's (`model::limits`). Slots freed in one loop go to the loop
//! whose head has waited longest, which another loop wakes with
//! [`Order::Slots`](super::workers::Order). A head also retries every
//! [`QUEUE_RETRY`], for what frees room without closing a connection (a
//! backend coming up, a raised limit in a change).

use std::io;
use std::time::{Duration, Instant, SystemTime};

use crate::model::endpoint::ClientAddr;
use crate::runtime::conn::Conn;
use log::debug;
use mio::Interest;

use super::{Entry, Server};
use crate::data::finished::{End, Finished};
use crate::data::proxy::Client;
use crate::model::service::Plan;
use crate::runtime::key::{Key, Side};
use crate::runtime::net;
use crate::runtime::ready::Ready;
use crate::runtime::timer::TimerKey;

/// How often the head of a queue looks for room that no closing connection announced.
pub const QUEUE_RETRY: Duration = Duration::from_millis(100);

/// A client waiting in its service's queue.
#[derive(Debug)]
pub struct Queued {
    /// The client; its pair's duration and idle clocks count from its `accepted`.
    client: Client,
    service: Key,
    /// Its place in the order of every loop's queues.
    ticket: u64,
    /// When it gives up; `None` with `queue_timeout` 0.
    deadline: Option<Instant>,
    /// The armed timer and its time.
    timer: Option<(TimerKey, Instant)>,
}

impl Server {
    /// This loop's index among the loops that proxy (0 without workers).
    pub(super) fn loop_index(&self) -> usize {
        match &self.role {
            super::Role::Worker { index, .. } => *index,
            super::Role::Control { .. } => 0,
        }
    }

    /// Queues an accepted client that holds a slot of its service but found no
    /// backend with room; with the queue full (or off) it is closed as "no
    /// backend". An error is a local shortage that should pause accepting.
    pub(super) fn enqueue_client(&mut self, service: Key, client: Client, now: Instant) -> Result<(), io::Error> {
        let Some(s) = self.services.service(service) else { return Ok(()) };
        let peer = client.peer;
        let (max_queue, timeout) = (s.settings.max_queue, crate::model::config::seconds(s.settings.queue_timeout));
        let Some(ticket) = s.state.gate.join_queue(u64::from(max_queue)) else {
            self.refuse_no_backend(service, &client.stream, peer);
            return Ok(());
        };
        let deadline = timeout.map(|t| now + t);
        let registry = self.poll.registry();
        let made = self.entries.try_insert_with(|key| {
            let mut client = client;
            registry.register(&mut client.stream, key.token(Side::Client), Interest::READABLE)?;
            Ok::<_, io::Error>(Entry::Queued(Queued { client, service, ticket, deadline, timer: None }))
        });
        let key = match made {
            Ok(key) => key,
            Err(e) => {
                if let Some(s) = self.services.service(service) {
                    s.state.gate.left_queue();
                    s.state.errors.add(1);
                }
                self.service_slot_freed(service);
                return Err(e);
            }
        };
        self.fds.pair_opened();
        let me = self.loop_index();
        let queue = self.waiting.entry(service).or_default();
        queue.push(ticket, key, deadline);
        let head = queue.len() == 1;
        if let Some(s) = self.services.service(service) {
            if head {
                s.state.gate.publish_head(me, Some(ticket));
            }
            let name = &s.settings.name;
            debug!("{name}: {peer}: every backend is at its limit; queued ({} waiting)", s.state.gate.queued.get());
        }
        self.arm_queued(key, head, now);
        // A slot may have come free while this client joined (see model::limits): look once more.
        self.to_serve.push(service);
        Ok(())
    }

    /// Closes a client that got no backend (none up, or all full and the queue too): FIN, counted.
    pub(super) fn refuse_no_backend(&mut self, service: Key, stream: &Conn, peer: ClientAddr) {
        if let Some(s) = self.services.service(service) {
            s.state.errors.add(1);
            s.state.no_backend.add(1);
            s.state.gate.active.sub_one();
            debug!("{}: {peer}: closed at once (no backend available)", s.settings.name);
        }
        net::close_gently(stream);
        self.log_refused(service, peer, End::NoBackend, 0, Duration::ZERO);
        self.service_slot_freed(service);
    }

    /// Arms a queued client's timer at its deadline, or sooner for a head's retry.
    fn arm_queued(&mut self, key: Key, head: bool, now: Instant) {
        let Some(Entry::Queued(q)) = self.entries.get_mut(key) else { return };
        let retry = head.then_some(now + QUEUE_RETRY);
        let Some(want) = [q.deadline, retry].into_iter().flatten().min() else { return };
        if let Some((timer, at)) = q.timer {
            if at <= want {
                return;
            }
            self.timers.cancel(timer);
        }
        q.timer = Some((self.timers.insert(want, key), want));
    }

    /// A queued client's socket stirred: it stays while it may still want a
    /// backend (it sent bytes, which wait in the kernel for its pair), and
    /// leaves, never to be connected, once it closed or reset first.
    pub(super) fn on_queued_ready(&mut self, key: Key, ready: Ready) {
        let Some(Entry::Queued(q)) = self.entries.get(key) else { return };
        if !(ready.readable || ready.closing || ready.error) {
            return;
        }
        let gone = match q.client.stream.peek(&mut [0u8; 1]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        };
        if gone {
            debug!("{}: queued client left before its turn", q.client.peer);
            self.log_queued(key, End::ClientClosed);
            self.remove_entry(key);
        }
    }

    /// A queued client's timer: close every client of its service whose time
    /// is up, then let the head look for room.
    pub(super) fn on_queued_timer(&mut self, key: Key, now: Instant) {
        let Some(Entry::Queued(q)) = self.entries.get_mut(key) else { return };
        q.timer = None;
        let service = q.service;
        let me = self.loop_index();
        let Some(queue) = self.waiting.get_mut(&service) else { return };
        let head = queue.front().map(|(t, _)| t);
        let expired = queue.expire(now);
        let new_head = queue.front();
        if queue.is_empty() {
            self.waiting.remove(&service);
        }
        if let Some(s) = self.services.service(service) {
            expired.iter().for_each(|_| s.state.gate.left_queue());
            if new_head.map(|(t, _)| t) != head {
                s.state.gate.publish_head(me, new_head.map(|(t, _)| t));
            }
        }
        for gone in expired {
            if let Some(Entry::Queued(q)) = self.entries.get(gone) {
                if let Some(s) = self.services.service(service) {
                    s.state.gate.queue_timeouts.add(1);
                    debug!("{}: {}: queue timeout", s.settings.name, q.client.peer);
                }
                net::close_gently(&q.client.stream);
                self.log_queued(gone, End::QueueTimeout);
            }
            // Out of the queue already: removing the entry gives back its slot and fd.
            self.remove_entry(gone);
        }
        self.to_serve.push(service);
        if let Some((_, head)) = new_head {
            self.arm_queued(head, true, now);
        }
        if matches!(self.entries.get(key), Some(Entry::Queued(_))) {
            self.arm_queued(key, new_head.map(|(_, k)| k) == Some(key), now);
        }
    }

    /// Gives back what a queued client holds as its entry goes: its place (if it
    /// still has one), its timer, its fd and its service slot.
    pub(super) fn close_queued(&mut self, q: &Queued, now: Instant) {
        if let Some((timer, _)) = q.timer {
            self.timers.cancel(timer);
        }
        self.leave_queue(q.service, q.ticket, now);
        self.fds.pair_closed();
        if let Some(s) = self.services.service(q.service) {
            s.state.gate.active.sub_one();
        }
        self.service_slot_freed(q.service);
    }

    /// Takes `ticket` out of its loop's queue, if there, and says who heads it now.
    fn leave_queue(&mut self, service: Key, ticket: u64, now: Instant) {
        let me = self.loop_index();
        let Some(queue) = self.waiting.get_mut(&service) else { return };
        let was_head = queue.front().is_some_and(|(t, _)| t == ticket);
        if queue.remove(ticket).is_none() {
            return;
        }
        let head = queue.front();
        if queue.is_empty() {
            self.waiting.remove(&service);
        }
        if let Some(s) = self.services.service(service) {
            s.state.gate.left_queue();
            if was_head {
                s.state.gate.publish_head(me, head.map(|(t, _)| t));
            }
        }
        if let Some((_, next)) = head.filter(|_| was_head) {
            self.arm_queued(next, true, now);
        }
    }

    /// A slot of `service` (its own or one of its backends') came free in this
    /// loop: the loop whose queued client waited longest gets it, and held
    /// listeners may accept again.
    pub(super) fn service_slot_freed(&mut self, service: Key) {
        let Some(s) = self.services.service(service) else { return };
        let waiting = s.state.gate.waiting();
        let me = self.loop_index();
        let mut pokes: Vec<usize> = Vec::new();
        match waiting.oldest {
            Some(oldest) if oldest == me => self.to_serve.push(service),
            Some(oldest) => pokes.push(oldest),
            None => {}
        }
        let held: Vec<usize> = if waiting.held { s.state.gate.held().collect() } else { Vec::new() };
        for loop_index in held {
            if loop_index == me {
                // Held listeners rest in `paused` with the fd-short ones: retrying costs one CAS.
                for listener in std::mem::take(&mut self.paused) {
                    self.enqueue(listener);
                }
            } else if !pokes.contains(&loop_index) {
                pokes.push(loop_index);
            }
        }
        if let Some(peers) = &self.peers {
            for i in pokes {
                peers.poke(i);
            }
        }
    }

    /// Slots this loop may want came free elsewhere, or limits changed: held
    /// listeners try again, queue heads look for room.
    pub(super) fn on_slots(&mut self) {
        for listener in std::mem::take(&mut self.paused) {
            self.enqueue(listener);
        }
        self.to_serve.extend(self.waiting.keys().copied());
    }

    /// Serves the queues that may have room now.
    pub(super) fn serve_waiting(&mut self, now: Instant) {
        let mut services = std::mem::take(&mut self.to_serve);
        services.sort_unstable();
        services.dedup();
        for service in services {
            self.serve_queue(service, now);
        }
    }

    /// Connects queued clients of `service` while this loop holds the oldest
    /// and a backend has room; hands the turn on to the loop that holds it otherwise.
    fn serve_queue(&mut self, service: Key, now: Instant) {
        let me = self.loop_index();
        loop {
            let Some((ticket, key)) = self.waiting.get(&service).and_then(|q| q.front()) else { return };
            let Some(s) = self.services.service(service) else { return };
            match s.state.gate.oldest() {
                Some(oldest) if oldest != me => {
                    if let Some(peers) = &self.peers {
                        peers.poke(oldest);
                    }
                    return;
                }
                _ => {}
            }
            let plan = self.services.plan(service);
            if plan.is_empty() {
                return;
            }
            self.leave_queue(service, ticket, now);
            // Out of the slab without `remove_entry`: its fd and service slot pass to the pair.
            let Some(Entry::Queued(mut q)) = self.entries.remove(key) else {
                self.services.abandon(&mut { plan });
                continue;
            };
            if let Some((timer, _)) = q.timer.take() {
                self.timers.cancel(timer);
            }
            // The pair registers the socket afresh under its own key; epoll then reports what is pending.
            let _ = self.poll.registry().deregister(&mut q.client.stream);
            if !matches!(self.open_pair(service, q.client, plan, now), Ok(true)) {
                self.fds.pair_closed();
            }
        }
    }

    /// Closes a client still queued when shuttle stops (the grace ended, a
    /// second signal): a FIN and its access-log line, as a pair closed then gets.
    pub(super) fn shut_queued(&mut self, key: Key) {
        if let Some(Entry::Queued(q)) = self.entries.get(key) {
            net::close_gently(&q.client.stream);
            self.log_queued(key, End::Shutdown);
        }
        self.remove_entry(key);
    }

    /// The access log's line for a queued client that never got a pair.
    fn log_queued(&mut self, key: Key, end: End) {
        let Some(Entry::Queued(q)) = self.entries.get(key) else { return };
        let (service, peer, waited) = (q.service, q.client.peer, q.client.accepted.elapsed());
        self.log_refused(service, peer, end, 0, waited);
    }

    /// Opens a pair for a client that holds a slot of `service`, along `plan`:
    /// `true` if it did. Errors are local shortages; every failure has been
    /// counted and logged, and the client's service slot given back.
    pub(super) fn open_pair(
        &mut self,
        service: Key,
        client: Client,
        plan: Plan,
        now: Instant,
    ) -> Result<bool, io::Error> {
        let (peer, accepted) = (client.peer, client.accepted);
        let Server { poll, entries, timers, services, pool, fds, access_log, .. } = self;
        let mut cx = crate::context::Cx { now, registry: poll.registry(), timers, services, pool, fds, access_log };
        let opened = entries.try_insert_with(|key| {
            crate::data::proxy::Pair::open(key, client, service, plan, &mut cx).map(Entry::Pair)
        });
        let Err(refused) = opened else { return Ok(true) };
        let name = self.services.service(service).map_or("?", |s| s.settings.name.as_str());
        let waited = now.saturating_duration_since(accepted);
        let failed = refused.failed_connects;
        let result = match refused.fault {
            crate::data::proxy::Fault::Local(e) => {
                debug!("{name}: {peer}: closing: {e}");
                if let Some(s) = self.services.service(service) {
                    s.state.errors.add(1);
                }
                self.log_refused(service, peer, End::LocalError, failed, waited);
                Err(e)
            }
            fault => {
                debug!("{name}: {peer}: closed after 0 ms ({fault})");
                if let Some(s) = self.services.service(service) {
                    s.state.no_backend.add(1);
                }
                self.log_refused(service, peer, End::ConnectFailed, failed, waited);
                Ok(false)
            }
        };
        if let Some(s) = self.services.service(service) {
            s.state.gate.active.sub_one();
        }
        self.service_slot_freed(service);
        result
    }

    /// The access log's line for a client closed before it had a pair.
    pub(super) fn log_refused(&mut self, service: Key, client: ClientAddr, end: End, failed: u16, queued: Duration) {
        if !self.access_log.is_on() {
            return;
        }
        let finished = Finished {
            at: SystemTime::now(),
            service: self.services.service(service).map_or("?", |s| s.settings.name.as_str()),
            client,
            backend: None,
            connect: None,
            queued,
            duration: queued,
            sent: 0,
            received: 0,
            failed_connects: failed,
            end,
        };
        self.access_log.record(&finished);
    }
}
