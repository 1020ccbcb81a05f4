//! Accepting: service listeners hand clients to new pairs, the admin listener
//! to admin connections. Both accept in bounded batches, and both rest
//! instead of spinning or stalling when descriptors run short (design
//! pitfall 5): a service listener also pauses before pairs would exhaust the
//! fd limit, so clients wait in the listen queue rather than being accepted
//! and dropped.
//!
//! Admin connections are capped. At the cap a newcomer takes the place of the
//! connection making the least progress, so clients that trickle their
//! requests in (slowloris) can't lock the API; one that is too young to judge
//! is left alone, and while none can go the newcomers wait in the queue.

use std::io;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{Entry, Server, ACCEPT_BATCH, ACCEPT_PAUSE, MAX_ADMIN_CONNS};
use crate::context::Cx;
use crate::control::admin::{AdminConn, EVICTION_GRACE};
use crate::data::finished::End;
use crate::data::greeting::{GreetError, Greeted, Greeting};
use crate::data::proxy::Client;
use crate::model::endpoint::ClientAddr;
use crate::model::proxy_header::Origin;
use crate::runtime::conn::Conn;
use crate::runtime::key::Key;
use crate::runtime::net::{self, AcceptError};
use crate::runtime::throttle;

/// How long a PROXY header may take when the service's `connect_timeout` is 0.
const HEADER_DEADLINE: Duration = Duration::from_secs(5);

/// How long an `accept_proxy` client may take to send its header: the
/// service's `connect_timeout` (the time it allows to set up a connection),
/// or 5 s without one.
fn header_deadline(connect_timeout: f64) -> Duration {
    crate::model::config::seconds(connect_timeout).unwrap_or(HEADER_DEADLINE)
}

impl Server {
    pub(super) fn accept(&mut self, key: Key, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            if !self.accept_one(key, now) {
                return;
            }
        }
        // Batch spent with connections possibly still queued: come back after others had a turn.
        self.enqueue(key);
    }

    /// Accepts one client of a service listener; `false` once there is nothing
    /// more to accept now (queue empty, paused, or not serving yet).
    pub(super) fn accept_one(&mut self, key: Key, now: Instant) -> bool {
        if !self.fds.has_room_for_pair() {
            let full = io::Error::other(format!(
                "{} connections fill the file descriptor limit of {}",
                self.fds.pairs,
                self.fds.limit()
            ));
            self.pause(key, &full, now);
            return false;
        }
        let Some(Entry::Listener(listener)) = self.entries.get_mut(key) else { return false };
        // A staged listener serves nobody until its change is committed (which queues it).
        let Some(service) = listener.service else { return false };
        if !self.take_service_slot(key, service, now) {
            return false;
        }
        let Some(Entry::Listener(listener)) = self.entries.get_mut(key) else { return false };
        let accepted = listener.socket.accept();
        if accepted.is_err() {
            // The slot taken for a client that was not there goes back (and to whoever waits for it).
            if let Some(s) = self.services.service(service) {
                s.state.gate.active.sub_one();
            }
            self.service_slot_freed(service);
        }
        match accepted {
            Ok((stream, peer)) => {
                if self.panic_on_accept {
                    panic!("{} asked this worker to fail", super::FAULT_ENV);
                }
                if self.hang_on_accept {
                    // What a bug spinning forever looks like from outside.
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
                let accept_proxy = self.services.service(service).is_some_and(|s| s.settings.accept_proxy);
                let started = if accept_proxy {
                    self.start_greeting(service, stream, peer, now)
                } else {
                    self.start_pair(service, Client { stream, peer, destination: None, accepted: now }, now)
                };
                if let Err(shortage) = started {
                    self.pause(key, &shortage, now);
                    return false;
                }
                if let Some(Entry::Listener(listener)) = self.entries.get_mut(key) {
                    if let Some(since) = listener.short_since.take() {
                        info!("accepting again after {} ms short of resources", since.elapsed().as_millis());
                    }
                }
                true
            }
            Err(e) => match net::classify_accept(&e) {
                AcceptError::Drained => false,
                AcceptError::Skip => {
                    debug!("accept failed: {e}");
                    true
                }
                AcceptError::Exhausted => {
                    self.pause(key, &e, now);
                    false
                }
            },
        }
    }

    /// Rests a listener that ran short of fds (or memory, or ports). Edge-triggered,
    /// its queued connections would stall it until a new client came, so it is
    /// retried after a pause, or sooner when a pair closes (pitfall 5).
    fn pause(&mut self, key: Key, why: &io::Error, now: Instant) {
        let Some(Entry::Listener(listener)) = self.entries.get_mut(key) else { return };
        if listener.short_since.is_none() {
            listener.short_since = Some(now);
            let name =
                listener.service.and_then(|s| self.services.service(s)).map_or("?", |s| s.settings.name.as_str());
            warn!("{name}: cannot accept: {why}; pausing accepts until connections close");
        }
        // Our own fds come back when our pairs close, which wakes the listener at
        // once; other shortages (system-wide fds, memory, ports) are retried soon.
        let rest = if why.raw_os_error() == Some(libc::EMFILE) { ACCEPT_PAUSE * 10 } else { ACCEPT_PAUSE };
        if let Some(timer) = listener.paused.replace(self.timers.insert(now + rest, key)) {
            self.timers.cancel(timer);
        }
        if !self.paused.contains(&key) {
            self.paused.push(key);
        }
    }

    /// Takes a slot of the service's `max_connections` for the next accept.
    /// At the limit the listener is held: it is not read (the kernel's backlog
    /// keeps the clients, as HAProxy's frontend `maxconn` does) until a
    /// connection of the service ends in any loop, which wakes it, or its
    /// retry timer fires. Edge-triggered, it then accepts without a new event.
    fn take_service_slot(&mut self, key: Key, service: Key, now: Instant) -> bool {
        let me = self.loop_index();
        let Some(s) = self.services.service(service) else { return false };
        let (gate, max) = (&s.state.gate, u64::from(s.settings.max_connections));
        let held = matches!(self.entries.get(key), Some(Entry::Listener(l)) if l.held);
        if gate.active.try_add_below(max) {
            if held {
                gate.hold(me, false);
            }
        } else {
            // Say it waits before looking once more, so a slot freed meanwhile is not missed (model::limits).
            gate.hold(me, true);
            if !gate.active.try_add_below(max) {
                if !held {
                    debug!("{}: {max} connections open: not accepting until one ends", s.settings.name);
                }
                self.hold_listener(key, now);
                return false;
            }
            gate.hold(me, false);
        }
        if let Some(Entry::Listener(listener)) = self.entries.get_mut(key) {
            listener.held = false;
        }
        true
    }

    /// Rests a listener at its service's limit until a slot frees (with a retry timer for safety).
    fn hold_listener(&mut self, key: Key, now: Instant) {
        let Some(Entry::Listener(listener)) = self.entries.get_mut(key) else { return };
        listener.held = true;
        if listener.paused.is_none() {
            listener.paused = Some(self.timers.insert(now + super::queue::QUEUE_RETRY, key));
        }
        if !self.paused.contains(&key) {
            self.paused.push(key);
        }
    }

    /// Waits for the PROXY header of a client of an `accept_proxy` service; an
    /// error is a local shortage that should pause accepting.
    fn start_greeting(&mut self, service: Key, stream: Conn, peer: ClientAddr, now: Instant) -> Result<(), io::Error> {
        let wait =
            self.services.service(service).map_or(HEADER_DEADLINE, |s| header_deadline(s.settings.connect_timeout));
        let Server { poll, entries, timers, services, pool, fds, access_log, .. } = self;
        let mut cx = Cx { now, registry: poll.registry(), timers, services, pool, fds, access_log };
        entries.try_insert_with(|key| {
            Greeting::new(key, stream, peer, service, now + wait, &mut cx).map(Entry::Greeting)
        })?;
        self.fds.pair_opened();
        Ok(())
    }

    /// Runs `f` on a greeting; a complete header hands the client to a pair, a bad one closes it.
    pub(super) fn greet(&mut self, key: Key, now: Instant, f: impl FnOnce(&mut Greeting, &mut Cx<'_>) -> Greeted) {
        let Server { poll, entries, timers, services, pool, fds, access_log, .. } = self;
        let Some(Entry::Greeting(greeting)) = entries.get_mut(key) else { return };
        let mut cx = Cx { now, registry: poll.registry(), timers, services, pool, fds, access_log };
        match f(greeting, &mut cx) {
            Greeted::Wait => {}
            Greeted::Failed(error) => {
                let (service, peer) = (greeting.service(), greeting.peer());
                self.remove_entry(key);
                self.bad_header(service, peer, &error, now);
            }
            Greeted::Done(origin) => {
                let Some(Entry::Greeting(greeting)) = self.entries.remove(key) else { return };
                self.fds.pair_closed();
                let (service, peer) = (greeting.service(), greeting.peer());
                let Server { poll, timers, services, pool, fds, access_log, .. } = self;
                let mut cx = Cx { now, registry: poll.registry(), timers, services, pool, fds, access_log };
                let accepted = greeting.accepted();
                let stream = greeting.finish(&mut cx);
                // LOCAL and UNKNOWN keep the connection's own endpoints (spec 2.1, 2.2).
                let (source, destination) = match origin {
                    Origin::Proxied { source, destination } => (ClientAddr::Inet(source), Some(destination)),
                    Origin::Local => (peer, None),
                };
                let client = Client { stream, peer: source, destination, accepted };
                if let Err(e) = self.start_pair(service, client, now) {
                    // Already counted and logged as a local error; the listener pauses at its next accept.
                    debug!("{source}: closed after its PROXY header: {e}");
                }
            }
        }
    }

    /// Counts and logs (throttled) a client closed for its PROXY header.
    fn bad_header(&mut self, service: Key, peer: ClientAddr, error: &GreetError, now: Instant) {
        let name = self.services.service(service).map_or("?", |s| s.settings.name.as_str());
        if let Some(held) = self.bad_headers.ready(now) {
            warn!("{name}: closing client {peer}: {error}{}", throttle::more(held));
        }
        if let Some(s) = self.services.service(service) {
            s.state.proxy_header_errors.add(1);
        }
        self.log_refused(service, peer, End::ProxyHeader, 0, Duration::ZERO);
    }

    /// Starts proxying an accepted client that holds a slot of its service
    /// (its `peer` may be a PROXY header's source); an error is a local
    /// shortage that should pause accepting.
    fn start_pair(&mut self, service: Key, client: Client, now: Instant) -> Result<(), io::Error> {
        let Some(s) = self.services.service(service) else { return Ok(()) };
        // Newcomers never pass the clients already waiting.
        if s.settings.max_queue > 0 && s.state.gate.queued.get() > 0 {
            return self.enqueue_client(service, client, now);
        }
        let plan = self.services.plan(service);
        if plan.is_full() {
            return self.enqueue_client(service, client, now);
        }
        if plan.is_empty() {
            self.refuse_no_backend(service, &client.stream, client.peer);
            return Ok(());
        }
        if self.open_pair(service, client, plan, now)? {
            self.fds.pair_opened();
        }
        Ok(())
    }

    pub(super) fn accept_admin(&mut self, key: Key, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            // Bounded, so admin clients can't take the fds proxying needs. At the
            // bound, the slowest connection makes room; if every one is busy or
            // too young to judge, newcomers wait in the listen queue for a while.
            if self.fds.admin_conns >= MAX_ADMIN_CONNS && !self.evict_slowest_admin(now) {
                if self.admin_retry.is_none() {
                    self.admin_retry = Some(self.timers.insert(now + EVICTION_GRACE / 5, key));
                }
                return;
            }
            let Some(Entry::AdminListener(listener)) = self.entries.get(key) else { return };
            match listener.accept() {
                Ok((stream, peer)) => {
                    self.admin_short = false;
                    let Server { poll, entries, timers, admin_statuses, .. } = self;
                    let registry = poll.registry();
                    let statuses = admin_statuses.clone();
                    let made = entries.try_insert_with(|conn| {
                        AdminConn::new(conn, stream, peer, registry, now, timers, statuses).map(Entry::Admin)
                    });
                    match made {
                        Ok(conn) => {
                            self.fds.admin_conns += 1;
                            self.admin.push(conn);
                            // Its request has likely arrived already: read it before
                            // the next accept could take its place.
                            self.resume(conn, now);
                        }
                        Err(e) => warn!("admin: cannot register a connection: {e}"),
                    }
                }
                Err(e) => match net::classify_accept(&e) {
                    AcceptError::Drained => return,
                    AcceptError::Skip => debug!("admin accept failed: {e}"),
                    AcceptError::Exhausted => {
                        // As for service listeners: without a retry the queued clients
                        // would wait for the next edge (pitfall 5).
                        if !self.admin_short {
                            self.admin_short = true;
                            warn!("admin: cannot accept: {e}; retrying shortly");
                        }
                        if self.admin_retry.is_none() {
                            self.admin_retry = Some(self.timers.insert(now + ACCEPT_PAUSE, key));
                        }
                        return;
                    }
                },
            }
        }
        self.enqueue(key);
    }

    /// Closes the admin connection making the least progress (bytes per second
    /// of its current request or response: idle ones first), if any may go.
    fn evict_slowest_admin(&mut self, now: Instant) -> bool {
        let rate = |key: Key| match self.entries.get(key) {
            Some(Entry::Admin(conn)) => conn.eviction_rate(now),
            _ => None,
        };
        let slowest = self.admin.iter().filter_map(|&k| rate(k).map(|r| (k, r))).min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((key, rate)) = slowest else { return false };
        if let Some(Entry::Admin(conn)) = self.entries.get(key) {
            debug!(
                "admin: {MAX_ADMIN_CONNS} connections open; closing the slowest, {} ({rate:.1} bytes/s)",
                conn.peer()
            );
        }
        self.remove_entry(key);
        true
    }

    /// Lets the admin listener accept again now that a slot is free.
    pub(super) fn wake_admin_listener(&mut self) {
        if let Some(listener) = self.admin_listener {
            self.enqueue(listener);
        }
    }
}
