//! The event loop: one `mio::Poll`, one slab of every socket-owning state
//! machine, one timer wheel, and the running services.
//!
//! Every entry is addressed by a generation-checked `Key` packed into its mio
//! token, so an event or timer for a closed entry finds nothing even if its
//! slot was reused in the same batch (pitfall 7). State machines get a `Cx`
//! of the loop's other fields and return a `Step`; the loop does what it says.
//! Work left over when a budget ran out waits in the ready queue, which makes
//! the next poll non-blocking, so one busy socket cannot starve the others.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::info;
use mio::event::Event;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

mod accept;

use crate::context::Cx;
use crate::control::admin::{AdminConn, AdminListener, AdminStep};
use crate::control::api;
use crate::control::probe::Probe;
use crate::data::buffer::BufferPool;
use crate::data::proxy::Pair;
use crate::model::config::ServiceConfig;
use crate::model::service::{self, Services};
use crate::runtime::key::{Key, Side, Slots};
use crate::runtime::net;
use crate::runtime::ready::{Ready, Step};
use crate::runtime::timer::{TimerKey, Wheel};

/// The signal source's token; no key packs to it (generations start at 1).
const SIGNALS: Token = Token(0);
/// Connections accepted per listener wakeup before other sockets get a turn.
const ACCEPT_BATCH: usize = 64;
/// How long a listener rests after running short of system resources (pitfall 5).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Admin connections open at once at most.
const MAX_ADMIN_CONNS: usize = 64;
/// Descriptors held besides the entries': stdio, epoll, the signal pipe, slack.
const FIXED_FDS: u64 = 32;
/// Free relay buffers kept for reuse.
const POOL_FREE: usize = 256;

/// A service's listening socket.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub socket: TcpListener,
    /// The service it feeds.
    pub service: Key,
    /// Set while accepting is paused for lack of fds, with the pause's timer.
    paused: Option<TimerKey>,
    /// Set from the first fd shortage until an accept succeeds again (logs once per episode).
    short_since: Option<Instant>,
}

/// Every socket-owning state machine of the loop.
#[derive(Debug)]
pub enum Entry {
    /// A service's listening socket.
    Listener(Listener),
    /// A client and its backend.
    Pair(Pair),
    /// One backend's health checker.
    Probe(Probe),
    /// The admin API's listening socket.
    AdminListener(AdminListener),
    /// One admin client.
    Admin(AdminConn),
}

/// How shuttle was started: what the loop needs besides the services.
#[derive(Debug, Clone)]
pub struct Options {
    /// Admin address: `host:port`, or a unix socket path starting with `/`.
    pub admin: String,
    /// The state file, written after every change.
    pub state: Option<PathBuf>,
    /// How long open pairs may run on after SIGTERM.
    pub grace: Duration,
    /// The process's open-file limit; accepting pauses before pairs would exhaust it.
    pub fd_limit: u64,
}

/// Why the loop could not start.
#[derive(Debug)]
pub enum StartupError {
    /// A service's addresses are unusable.
    Service(String),
    /// A service's listener could not be bound.
    Listen {
        /// The service's name.
        service: String,
        /// The address it should listen on.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// The admin address could not be bound.
    Admin {
        /// The `-http` address.
        addr: String,
        /// What went wrong.
        source: io::Error,
    },
    /// The poller or signal handler could not be set up.
    Io(io::Error),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::Service(message) => f.write_str(message),
            StartupError::Listen { service, addr, source } => {
                write!(f, "service {service:?}: cannot listen on {addr}: {source}")
            }
            StartupError::Admin { addr, source } => write!(f, "admin API: cannot listen on {addr}: {source}"),
            StartupError::Io(e) => write!(f, "cannot set up the event loop: {e}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// The proxy: the poller and everything it drives.
pub struct Server {
    pub(crate) poll: Poll,
    pub(crate) entries: Slots<Entry>,
    pub(crate) timers: Wheel<Key>,
    pub(crate) services: Services,
    pub(crate) pool: BufferPool,
    pub(crate) options: Options,
    ready: VecDeque<Key>,
    /// By slot index, the key queued in `ready` for that slot, so an entry is
    /// queued at most once (a slot's next tenant has another key, so it is not
    /// mistaken for its predecessor).
    queued: Vec<Option<Key>>,
    signals: Signals,
    pairs: usize,
    /// Admin connections open now.
    admin_conns: usize,
    /// Set from an admin accept failing for lack of resources until one succeeds.
    admin_short: bool,
    /// The armed retry of an admin accept that ran short.
    admin_retry: Option<TimerKey>,
    /// Admin connections, oldest first (may hold keys of closed ones).
    admin_order: VecDeque<Key>,
    paused: Vec<Key>,
    draining: Option<Instant>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("entries", &self.entries.len())
            .field("services", &self.services.len())
            .field("pairs", &self.pairs)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds every service listener and the admin socket; nothing is left bound on failure.
    pub fn new(options: Options, configs: Vec<ServiceConfig>) -> Result<Server, StartupError> {
        let poll = Poll::new().map_err(StartupError::Io)?;
        let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(StartupError::Io)?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE).map_err(StartupError::Io)?;
        let now = Instant::now();
        let mut server = Server {
            poll,
            entries: Slots::with_capacity(1024),
            timers: Wheel::new(now),
            services: Services::default(),
            pool: BufferPool::new(POOL_FREE),
            options,
            ready: VecDeque::new(),
            queued: Vec::new(),
            signals,
            pairs: 0,
            admin_conns: 0,
            admin_short: false,
            admin_retry: None,
            admin_order: VecDeque::new(),
            paused: Vec::new(),
            draining: None,
        };
        for config in configs {
            let prepared = service::prepare(config).map_err(StartupError::Service)?;
            let name = prepared.config.name.clone();
            let addr = prepared.addr;
            let socket = net::bind(addr).map_err(|source| StartupError::Listen { service: name, addr, source })?;
            server.add_service(prepared, socket, now).map_err(StartupError::Io)?;
        }
        let admin = AdminListener::bind(&server.options.admin)
            .map_err(|source| StartupError::Admin { addr: server.options.admin.clone(), source })?;
        let registry = server.poll.registry();
        server
            .entries
            .try_insert_with(|key| admin.register(key, registry).map(Entry::AdminListener))
            .map_err(StartupError::Io)?;
        Ok(server)
    }

    /// Starts a prepared service on an already bound socket: its listener entry and probes.
    pub(crate) fn add_service(
        &mut self,
        prepared: service::Prepared,
        socket: TcpListener,
        now: Instant,
    ) -> io::Result<Key> {
        let listener = self.stage_listener(socket)?;
        Ok(self.commit_service(prepared, listener, now))
    }

    /// Registers a bound listener as an entry that serves no service yet: the
    /// fallible half of starting one, done before the state file changes.
    /// Nothing is polled until the admin request returns, so it gets no client
    /// before [`Server::adopt_listener`] gives it its service (or it is removed).
    pub(crate) fn stage_listener(&mut self, mut socket: TcpListener) -> io::Result<Key> {
        socket.local_addr()?;
        let registry = self.poll.registry();
        self.entries.try_insert_with(|key| {
            registry.register(&mut socket, key.token(Side::Client), Interest::READABLE)?;
            Ok(Entry::Listener(Listener { socket, service: key, paused: None, short_since: None }))
        })
    }

    /// Starts a new service on a staged listener; cannot fail.
    pub(crate) fn commit_service(&mut self, prepared: service::Prepared, listener: Key, now: Instant) -> Key {
        let (key, backends) = self.services.insert(prepared);
        self.adopt_listener(key, listener);
        for backend in backends {
            self.start_probe(backend, now);
        }
        key
    }

    /// Makes a staged listener `service`'s, closing the one it had; cannot fail.
    pub(crate) fn adopt_listener(&mut self, service: Key, listener: Key) {
        let local = match self.entries.get_mut(listener) {
            Some(Entry::Listener(l)) => {
                l.service = service;
                l.socket.local_addr().ok()
            }
            _ => None,
        };
        let old = self.services.service_mut(service).and_then(|s| s.listener.replace(listener));
        if let Some(old) = old.filter(|&old| old != listener) {
            self.remove_entry(old);
        }
        let name = self.services.service(service).map_or("?", |s| s.settings.name.as_str());
        match local {
            Some(local) => info!("service {name} listening on {local}"),
            None => info!("service {name} listening"),
        }
    }

    /// Starts the health probe of a backend, if it has a check address and its service checks.
    pub(crate) fn start_probe(&mut self, backend: Key, now: Instant) {
        let Some(b) = self.services.backend(backend) else { return };
        let Some(service) = self.services.service(b.service) else { return };
        let Some(interval) = crate::model::config::seconds(service.settings.check_interval) else { return };
        if b.check_addr.is_none() {
            return;
        }
        let Server { entries, timers, .. } = self;
        let key = entries.insert_with(|key| Entry::Probe(Probe::new(key, backend, interval, now, timers)));
        if let Some(b) = self.services.backend_mut(backend) {
            b.probe = Some(key);
        }
    }

    /// Removes an entry, giving back its timer, buffers and counts.
    pub(crate) fn remove_entry(&mut self, key: Key) {
        let Some(mut entry) = self.entries.remove(key) else { return };
        let mut cx = Cx {
            now: Instant::now(),
            registry: self.poll.registry(),
            timers: &mut self.timers,
            services: &mut self.services,
            pool: &mut self.pool,
        };
        match &mut entry {
            Entry::Pair(pair) => {
                pair.close(&mut cx);
                self.pairs -= 1;
                // A closed pair frees an fd: let listeners paused for lack of fds try again.
                for listener in std::mem::take(&mut self.paused) {
                    self.enqueue(listener);
                }
            }
            Entry::Listener(listener) => {
                if let Some(timer) = listener.paused.take() {
                    cx.timers.cancel(timer);
                }
            }
            Entry::Probe(probe) => probe.close(&mut cx),
            Entry::Admin(conn) => {
                conn.close(&mut cx);
                self.admin_conns -= 1;
            }
            Entry::AdminListener(_) => {}
        }
    }

    /// Runs the loop until SIGTERM/SIGINT and the drain that follows.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = if self.ready.is_empty() {
                let deadline = match (self.timers.next_deadline(), self.draining) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                deadline.map(|d| d.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for event in events.iter() {
                self.dispatch(event, now);
            }
            while let Some(key) = self.timers.poll(now) {
                self.on_timer(key, now);
            }
            for _ in 0..self.ready.len() {
                let Some(key) = self.ready.pop_front() else { break };
                if let Some(slot) = self.queued.get_mut(key.index() as usize).filter(|q| **q == Some(key)) {
                    *slot = None;
                }
                self.resume(key, now);
            }
            if let Some(deadline) = self.draining {
                if self.pairs == 0 {
                    info!("all connections closed; exiting");
                    return Ok(());
                }
                if now >= deadline {
                    info!("grace period over; closing {} open connections", self.pairs);
                    return Ok(());
                }
            }
        }
    }

    fn dispatch(&mut self, event: &Event, now: Instant) {
        if event.token() == SIGNALS {
            let signals: Vec<i32> = self.signals.pending().collect();
            if !signals.is_empty() {
                self.begin_drain(now);
            }
            return;
        }
        let Some((key, side)) = Key::from_token(event.token()) else { return };
        let ready = Ready::from_event(event);
        match self.entries.get(key) {
            Some(Entry::Listener(_)) => self.accept(key, now),
            Some(Entry::AdminListener(_)) => self.accept_admin(key, now),
            Some(Entry::Admin(_)) => {
                let step = self.with_admin(key, now, |conn, cx| conn.on_ready(key, ready, cx));
                self.run_admin(key, step, now);
            }
            Some(Entry::Pair(_) | Entry::Probe(_)) => self.drive(key, now, |entry, cx| match entry {
                Entry::Pair(pair) => pair.on_ready(key, side, ready, cx),
                Entry::Probe(probe) => probe.on_ready(key, ready, cx),
                _ => Step::Wait,
            }),
            None => {} // a closed entry's leftover event (pitfall 7)
        }
    }

    fn on_timer(&mut self, key: Key, now: Instant) {
        match self.entries.get_mut(key) {
            Some(Entry::Listener(listener)) => {
                listener.paused = None;
                self.paused.retain(|&k| k != key);
                self.accept(key, now);
            }
            Some(Entry::Admin(_)) => {
                let step = self.with_admin(key, now, |conn, cx| conn.on_timer(key, cx));
                self.run_admin(key, step, now);
            }
            Some(Entry::Pair(_) | Entry::Probe(_)) => self.drive(key, now, |entry, cx| match entry {
                Entry::Pair(pair) => pair.on_timer(key, cx),
                Entry::Probe(probe) => probe.on_timer(key, cx),
                _ => Step::Wait,
            }),
            Some(Entry::AdminListener(_)) => {
                self.admin_retry = None;
                self.accept_admin(key, now);
            }
            None => {}
        }
    }

    fn resume(&mut self, key: Key, now: Instant) {
        match self.entries.get(key) {
            Some(Entry::Listener(_)) => {
                // Queued after its batch ran out, or woken early from a pause because a pair closed.
                if let Some(Entry::Listener(listener)) = self.entries.get_mut(key) {
                    if let Some(timer) = listener.paused.take() {
                        self.timers.cancel(timer);
                    }
                }
                self.accept(key, now);
            }
            Some(Entry::Pair(_)) => self.drive(key, now, |entry, cx| match entry {
                Entry::Pair(pair) => pair.resume(key, cx),
                _ => Step::Wait,
            }),
            Some(Entry::Admin(_)) => {
                let step = self.with_admin(key, now, |conn, cx| conn.on_ready(key, Ready::default(), cx));
                self.run_admin(key, step, now);
            }
            Some(Entry::AdminListener(_)) => self.accept_admin(key, now),
            _ => {}
        }
    }

    /// Runs `f` on an entry with a context of the loop's other fields, then does what it returns.
    fn drive(&mut self, key: Key, now: Instant, f: impl FnOnce(&mut Entry, &mut Cx<'_>) -> Step) {
        let Server { poll, entries, timers, services, pool, .. } = self;
        let Some(entry) = entries.get_mut(key) else { return };
        let mut cx = Cx { now, registry: poll.registry(), timers, services, pool };
        let step = f(entry, &mut cx);
        self.apply(key, step);
    }

    fn apply(&mut self, key: Key, step: Step) {
        match step {
            Step::Wait => {}
            Step::Again => self.enqueue(key),
            Step::Close => self.remove_entry(key),
        }
    }

    /// Puts `key` on the ready queue unless it is there already.
    fn enqueue(&mut self, key: Key) {
        let index = key.index() as usize;
        if self.queued.len() <= index {
            self.queued.resize(index + 1, None);
        }
        if self.queued[index] != Some(key) {
            self.queued[index] = Some(key);
            self.ready.push_back(key);
        }
    }

    fn with_admin(
        &mut self,
        key: Key,
        now: Instant,
        f: impl FnOnce(&mut AdminConn, &mut Cx<'_>) -> AdminStep,
    ) -> AdminStep {
        let Server { poll, entries, timers, services, pool, .. } = self;
        let Some(Entry::Admin(conn)) = entries.get_mut(key) else { return AdminStep::Done(Step::Wait) };
        let mut cx = Cx { now, registry: poll.registry(), timers, services, pool };
        f(conn, &mut cx)
    }

    /// Executes the requests an admin connection hands up, one at a time, until it waits or closes.
    fn run_admin(&mut self, key: Key, mut step: AdminStep, now: Instant) {
        loop {
            match step {
                AdminStep::Done(step) => return self.apply(key, step),
                AdminStep::Execute(request) => {
                    let response = api::execute(self, &request, now);
                    step = self.with_admin(key, now, |conn, cx| conn.respond(key, response, cx));
                }
            }
        }
    }

    /// SIGTERM/SIGINT: stop accepting and let open pairs finish within the grace period.
    fn begin_drain(&mut self, now: Instant) {
        if self.draining.is_some() {
            return;
        }
        info!("shutting down: listeners closed, {} open connections get up to {:?}", self.pairs, self.options.grace);
        let doomed: Vec<Key> =
            self.entries.iter().filter(|(_, e)| !matches!(e, Entry::Pair(_))).map(|(key, _)| key).collect();
        for key in doomed {
            self.remove_entry(key);
        }
        // A huge grace means "wait for every connection": cap it rather than overflow.
        self.draining = Some(now.checked_add(self.options.grace).unwrap_or(now + Duration::from_secs(1 << 30)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_pair_costs_one_small_slab_slot() {
        // Idle pairs hold no buffer; the slot itself is their whole user-space cost.
        assert!(std::mem::size_of::<Entry>() <= 512, "Entry grew to {} bytes", std::mem::size_of::<Entry>());
    }
}
