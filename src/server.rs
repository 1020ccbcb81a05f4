//! The event loop: one `mio::Poll`, one slab of every socket-owning state
//! machine, one timer wheel, the running services, and the inbox where
//! helper threads answer.
//!
//! Every entry is addressed by a generation-checked `Key` packed into its mio
//! token, so an event or timer for a closed entry finds nothing even if its
//! slot was reused in the same batch (pitfall 7). State machines get a `Cx`
//! of the loop's other fields and return a `Step`; the loop does what it says.
//! Work left over when a budget ran out waits in the ready queue, which makes
//! the next poll non-blocking, so one busy socket cannot starve the others.
//!
//! The loop never blocks: name lookups and the state file's writes go to
//! helper threads (`runtime::helpers`), which wake it through its waker.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::info;
use mio::event::Event;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

mod accept;
mod admin;
mod bind;
mod plane;
mod queue;
mod retire;
pub mod udp;
pub mod upgrade;
pub mod workers;

use crate::context::Cx;
use crate::control::access::Access;
use crate::control::admin::{AdminAddr, AdminConn, AdminListener};
use crate::control::api;
use crate::control::change::Changes;
use crate::control::info::Started;
use crate::control::probe::Probe;
use crate::control::state::StateFile;
use crate::data::buffer::BufferPool;
use crate::data::greeting::Greeting;
use crate::data::proxy::{Cut, Pair};
use crate::model::counters::StatusCounts;
use crate::model::endpoint::Endpoint;
use crate::model::service::{self, Services};
use crate::runtime::accesslog::AccessLog;
use crate::runtime::fds::FdBudget;
use crate::runtime::helpers::{Inbox, Outbox, Worker};
use crate::runtime::key::{Key, Side, Slots};
use crate::runtime::listen::{Bound, StreamListener};
use crate::runtime::notify::Notifier;

use crate::runtime::ready::{Ready, Step};
use crate::runtime::throttle::Throttle;
use crate::runtime::timer::{TimerKey, Wheel};

/// The signal source's token; no key packs to it (generations start at 1).
const SIGNALS: Token = Token(0);
/// The helpers' waker; no key packs to it either (generation 0).
const WAKER: Token = Token(1);
/// Connections accepted per listener wakeup before other sockets get a turn.
const ACCEPT_BATCH: usize = 64;
/// How long a listener rests after running short of system resources (pitfall 5).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Admin connections open at once at most.
const MAX_ADMIN_CONNS: usize = 64;
/// Free relay buffers kept for reuse.
const POOL_FREE: usize = 256;
/// How long a second SIGTERM waits for the workers to cut their connections and stop.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// A service's listening socket.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub socket: StreamListener,
    /// The service it feeds; `None` while staged for a change not yet committed.
    pub service: Option<Key>,
    /// Set while accepting is paused for lack of fds, with the pause's timer.
    paused: Option<TimerKey>,
    /// Set from the first fd shortage until an accept succeeds again (logs once per episode).
    short_since: Option<Instant>,
    /// Set once it takes no new connections: it serves what was queued, then closes at this time.
    retiring: Option<Instant>,
    /// Set while its service is at `max_connections`: it is not read until a connection ends.
    held: bool,
}

/// Every socket-owning state machine of the loop.
// Pairs are nearly every entry: boxing them to shrink the rare kinds would
// cost an allocation per connection. The slot size is pinned by a test.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Entry {
    /// A service's listening socket.
    Listener(Listener),
    /// A client and its backend.
    Pair(Pair),
    /// A client of an `accept_proxy` service whose header is still arriving.
    Greeting(Greeting),
    /// One backend's health checker.
    Probe(Probe),
    /// The admin API's listening socket.
    AdminListener(AdminListener),
    /// One admin client.
    Admin(AdminConn),
    /// The control loop's record of a service's listeners, one per worker.
    Group(workers::Group),
    /// A client waiting for a backend slot.
    Queued(queue::Queued),
    /// A UDP service's socket and its flows.
    Datagrams(udp::Datagrams),
    /// One UDP client's flow to its backend.
    Flow(crate::data::flow::Flow),
}

/// What a loop hosts besides pairs and listeners.
#[derive(Debug)]
pub(crate) enum Role {
    /// The admin API, the state file and the probes; with `workers`, the
    /// listeners and pairs are theirs, and without, this loop's.
    Control {
        /// Where helpers (and workers) answer.
        inbox: Inbox,
        /// The worker loops, with `-workers` above 1.
        workers: Option<workers::Workers>,
    },
    /// Worker `index` of several: listeners and pairs only.
    Worker {
        /// Its number, for acknowledgements and logs.
        index: usize,
        /// Where the control loop's orders arrive.
        orders: Inbox<workers::Order>,
        /// Where it acknowledges them.
        control: Outbox,
    },
}

/// How shuttle was started: what the loop needs besides the services.
#[derive(Debug)]
pub struct Options {
    /// Where the admin API listens.
    pub admin: AdminAddr,
    /// Who the admin API lets in.
    pub access: Access,
    /// The state file, locked, written after every change.
    pub state: Option<StateFile>,
    /// The file the services came from, which SIGHUP reads again.
    pub source: Option<std::path::PathBuf>,
    /// That file's form, which the state file is written in.
    pub form: crate::model::config::Form,
    /// How long open pairs may run on after SIGTERM.
    pub grace: Duration,
    /// The process's open-file limit; accepting pauses before pairs would exhaust it.
    pub fd_limit: u64,
    /// How many worker loops proxy; with 1 this loop does everything.
    pub workers: usize,
    /// Whether each worker is pinned to a CPU of its own.
    pub pin: bool,
    /// When the process started, for `GET /_info`.
    pub started: Started,
    /// Where systemd hears that shuttle is ready, and stopping.
    pub notify: Notifier,
    /// The access log, on with `-access-log`.
    pub access_log: AccessLog,
    /// How SIGUSR2 starts this binary again (`None`: its path is unknown).
    pub relaunch: Option<upgrade::Relaunch>,
}

/// What a process that upgrades another takes over instead of binding (reference §3.7).
#[derive(Debug)]
pub struct Inherited {
    /// Each service's sockets by name, one per worker.
    pub sockets: std::collections::HashMap<String, Vec<Bound>>,
    /// The admin listener (taken as the loop is built).
    pub admin: Option<AdminListener>,
    /// The old process's backends that were down.
    pub health: Vec<crate::model::handover::BackendHealth>,
    /// The unix socket files of its services and admin API, its until the hand-over is done.
    pub files: Vec<std::sync::Arc<crate::runtime::unix::SocketFile>>,
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
        addr: Endpoint,
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
    /// The poller, signal handler or a helper thread could not be set up.
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
    pub(crate) fds: FdBudget,
    grace: Duration,
    access: Access,
    /// The admin API's TCP address once bound, for the loop check.
    admin_addr: Option<SocketAddr>,
    /// The admin API's address as the logs show it (the real port, or the socket path).
    admin_shown: String,
    /// What this loop hosts besides pairs and listeners.
    pub(crate) role: Role,
    ready: VecDeque<Key>,
    /// By slot index, the key queued in `ready` for that slot, so an entry is
    /// queued at most once (a slot's next tenant has another key, so it is not
    /// mistaken for its predecessor).
    queued: Vec<Option<Key>>,
    /// SIGTERM and friends; only the control loop listens for them.
    signals: Option<Signals>,
    /// Admin changes taking turns; `None` only while one of its calls runs.
    changes: Option<Changes>,
    /// The admin listener's entry.
    admin_listener: Option<Key>,
    /// Open admin connections (at most `MAX_ADMIN_CONNS`, so scanning is cheap).
    admin: Vec<Key>,
    /// Set from an admin accept failing for lack of resources until one succeeds.
    admin_short: bool,
    /// The armed retry of an admin accept that ran short or found every slot busy.
    admin_retry: Option<TimerKey>,
    /// Refused admin requests are logged through this.
    refusals: Throttle,
    /// Clients closed for a bad PROXY header are logged through this.
    bad_headers: Throttle,
    /// Listeners paused for lack of fds or held at their service's limit; woken when a pair closes.
    paused: Vec<Key>,
    /// This loop's queued clients, per service.
    waiting: std::collections::HashMap<Key, crate::model::queue::Queue<Key>>,
    /// Services whose queue may have room now, served at the end of the turn.
    to_serve: Vec<Key>,
    /// The other worker loops, to wake one whose queued client should get a slot freed here.
    pub(crate) peers: Option<std::sync::Arc<workers::Peers>>,
    draining: Option<Instant>,
    /// Set by a second SIGTERM/SIGINT: the drain ends now, open connections are cut.
    stopping_now: bool,
    /// When the process started, for `GET /_info`.
    pub(crate) started: Started,
    /// Admin responses by status, for the metrics.
    pub(crate) admin_statuses: std::sync::Arc<StatusCounts>,
    /// This loop's end of the access log (off without `-access-log`).
    pub(crate) access_log: AccessLog,
    /// systemd's `$NOTIFY_SOCKET`; only the control loop sends.
    notify: Notifier,
    /// Why a worker loop failed, once one did: the process then drains and exits 1.
    failed: Option<String>,
    /// Fault injection for the tests of a dying worker (see [`FAULT_ENV`]).
    pub(crate) panic_on_accept: bool,
    /// Fault injection for the tests of a stuck worker (see [`HANG_ENV`]).
    pub(crate) hang_on_accept: bool,
    /// The epoch of the services' bell this loop last heard (see [`Server::hear_bell`]).
    heard: u64,
    /// Every datagram this loop relays passes through it (64 KiB once a UDP service exists).
    datagram: Vec<u8>,
    /// Binary upgrades: this process's, and the one it took over from.
    upgrades: upgrade::Upgrades,
}

/// `SHUTTLE_TEST_WORKER_HANG=I` makes worker loop I stop turning at its first
/// accept, as a bug spinning forever would.
pub const HANG_ENV: &str = "SHUTTLE_TEST_WORKER_HANG";

/// `SHUTTLE_TEST_WORKER_PANIC=I` makes worker loop I panic at its first
/// accept: the only way a black-box test can see what a worker's death does.
pub const FAULT_ENV: &str = "SHUTTLE_TEST_WORKER_PANIC";

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("entries", &self.entries.len())
            .field("services", &self.services.len())
            .field("pairs", &self.fds.pairs)
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds every service listener and the admin socket; nothing is left bound on failure.
    /// With `inherited`, the sockets are those an older process handed over, not bound anew.
    pub fn new(
        options: Options,
        services: Vec<service::Prepared>,
        mut inherited: Option<Inherited>,
    ) -> Result<Server, StartupError> {
        let poll = Poll::new().map_err(StartupError::Io)?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2]).map_err(StartupError::Io)?;
        poll.registry().register(&mut signals, SIGNALS, Interest::READABLE).map_err(StartupError::Io)?;
        let inbox: Inbox = Inbox::new(poll.registry(), WAKER).map_err(StartupError::Io)?;
        let state = match options.state {
            Some(state) => Some((state, Worker::new("shuttle-state", inbox.outbox()).map_err(StartupError::Io)?)),
            None => None,
        };
        let changes = Changes::new(inbox.outbox(), state, options.source, options.form);
        // Every loop counts its pairs into one gauge, for `/_info` and the second signal.
        let pairs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Every loop rings it when a backend goes down, and hears it (the worker loops get it as they start).
        let bell = std::sync::Arc::new(crate::runtime::bell::Bell::default());
        // Workers get the pairs' part of the fd limit between them; the control
        // loop keeps the whole limit for its probes' share and admin clients.
        let workers = match options.workers {
            0 | 1 => None,
            n => {
                let share = crate::runtime::fds::worker_share(options.fd_limit, n);
                let outbox = inbox.outbox();
                Some(
                    workers::Workers::spawn(
                        n,
                        options.pin,
                        share,
                        options.grace,
                        &outbox,
                        &pairs,
                        &options.access_log,
                        &bell,
                    )
                    .map_err(StartupError::Io)?,
                )
            }
        };
        let wakers = std::iter::once(inbox.outbox().waker()).chain(workers.iter().flat_map(workers::Workers::wakers));
        bell.connect(wakers.collect());
        let role = Role::Control { inbox, workers };
        let mut server = Server::bare(poll, role, options.fd_limit, options.grace, options.access);
        // Every service's shared gate has a slot per proxying loop.
        server.services.set_loops(options.workers.max(1));
        server.fds.share_pairs(pairs);
        server.started = options.started;
        server.notify = options.notify;
        server.access_log = options.access_log;
        server.signals = Some(signals);
        server.changes = Some(changes);
        server.services.set_bell(bell);
        server.upgrades.relaunch = options.relaunch;
        let now = Instant::now();
        let admin_text = match &options.admin {
            AdminAddr::Tcp(addr) => addr.to_string(),
            AdminAddr::Unix(path, _) => path.display().to_string(),
        };
        let admin = match inherited.as_mut().and_then(|i| i.admin.take()) {
            Some(admin) => admin,
            None => AdminListener::bind(&options.admin)
                .map_err(|source| StartupError::Admin { addr: admin_text.clone(), source })?,
        };
        server.admin_addr = admin.tcp_addr();
        server.admin_shown = server.admin_addr.map_or(admin_text, |a| a.to_string());
        // The admin address is known only now (port 0): no backend may point at it.
        service::check_all(&services, server.admin_addr).map_err(StartupError::Service)?;
        for prepared in services {
            let name = prepared.config.name.clone();
            let addr = prepared.addr.clone();
            let handed = inherited.as_mut().and_then(|i| i.sockets.remove(&name));
            let staged = match handed {
                Some(sockets) => server.stage_handed(sockets),
                None => api::Plane::stage_listener(&mut server, &addr, &prepared.config),
            };
            let staged = staged.map_err(|source| StartupError::Listen { service: name, addr, source })?;
            api::Plane::add_service(&mut server, prepared, staged, now);
        }
        let registry = server.poll.registry();
        let key = server
            .entries
            .try_insert_with(|key| admin.register(key, registry).map(Entry::AdminListener))
            .map_err(StartupError::Io)?;
        server.admin_listener = Some(key);
        server.fds.listeners += 1;
        match inherited {
            // The workers wait until this process has said it is ready (`finish_take_over`).
            Some(inherited) => {
                server.carry_health(&inherited.health);
                server.upgrades.adopted = Some(inherited.files);
            }
            None => {
                if let Some(workers) = server.workers() {
                    workers.start();
                }
            }
        }
        Ok(server)
    }

    /// A loop with nothing in it yet.
    fn bare(poll: Poll, role: Role, fd_limit: u64, grace: Duration, access: Access) -> Server {
        Server {
            poll,
            entries: Slots::with_capacity(1024),
            timers: Wheel::new(Instant::now()),
            services: Services::default(),
            pool: BufferPool::new(POOL_FREE),
            fds: FdBudget::new(fd_limit),
            grace,
            access,
            admin_addr: None,
            admin_shown: String::new(),
            role,
            ready: VecDeque::new(),
            queued: Vec::new(),
            signals: None,
            changes: None,
            admin_listener: None,
            admin: Vec::new(),
            admin_short: false,
            admin_retry: None,
            refusals: Throttle::new(admin::REFUSALS_LOGGED_EVERY),
            bad_headers: Throttle::new(admin::REFUSALS_LOGGED_EVERY),
            paused: Vec::new(),
            waiting: std::collections::HashMap::new(),
            to_serve: Vec::new(),
            peers: None,
            draining: None,
            stopping_now: false,
            started: Started::now(),
            admin_statuses: std::sync::Arc::default(),
            access_log: AccessLog::default(),
            notify: Notifier::disabled(),
            failed: None,
            panic_on_accept: false,
            hang_on_accept: false,
            heard: 0,
            datagram: Vec::new(),
            upgrades: upgrade::Upgrades::default(),
        }
    }

    /// Worker loop `index` of several, which takes its services from the control loop's orders.
    pub(crate) fn worker(
        index: usize,
        poll: Poll,
        orders: Inbox<workers::Order>,
        control: Outbox,
        fd_limit: u64,
        grace: Duration,
    ) -> Server {
        let role = Role::Worker { index, orders, control };
        let mut server = Server::bare(poll, role, fd_limit, grace, Access::new(&[], None, false));
        server.fds = FdBudget::for_worker(fd_limit);
        server.panic_on_accept = std::env::var(FAULT_ENV).is_ok_and(|v| v == index.to_string());
        server.hang_on_accept = std::env::var(HANG_ENV).is_ok_and(|v| v == index.to_string());
        server
    }

    /// Registers a bound listener as an entry that serves no service yet: the
    /// fallible half of starting one, done before the state file changes.
    /// Nothing is accepted until a service adopts it (or it is removed).
    /// Registers a bound socket of either kind for a change not yet committed.
    pub(crate) fn stage_bound(&mut self, socket: Bound) -> io::Result<Key> {
        match socket {
            Bound::Stream(s) => self.stage(s),
            Bound::Datagram(s) => self.stage_datagrams(s),
        }
    }

    pub(crate) fn stage(&mut self, mut socket: StreamListener) -> io::Result<Key> {
        socket.local_addr()?;
        let registry = self.poll.registry();
        let key = self.entries.try_insert_with(|key| {
            registry.register(&mut socket, key.token(Side::Client), Interest::READABLE)?;
            Ok::<_, io::Error>(Entry::Listener(Listener {
                socket,
                service: None,
                paused: None,
                short_since: None,
                retiring: None,
                held: false,
            }))
        })?;
        self.fds.listeners += 1;
        Ok(key)
    }

    /// Starts a new service on a staged listener; cannot fail.
    pub(crate) fn commit_service(&mut self, prepared: service::Prepared, listener: Key, now: Instant) -> Key {
        let (key, backends) = self.services.insert(prepared);
        // A worker's copy gets the control loop's counts when it adopts the shared state.
        if self.hosts_probes() {
            self.services.enroll(key, &backends, &[]);
        }
        self.adopt_listener(key, listener, now);
        for backend in backends {
            self.start_probe(backend, now);
        }
        key
    }

    /// Makes a staged listener `service`'s; the one it had stops taking new
    /// connections and closes once it has served its queue. Cannot fail.
    pub(crate) fn adopt_listener(&mut self, service: Key, listener: Key, now: Instant) {
        let local = match self.entries.get_mut(listener) {
            Some(Entry::Listener(l)) => {
                l.service = Some(service);
                l.socket.local_addr().ok()
            }
            Some(Entry::Datagrams(d)) => {
                d.service = Some(service);
                d.socket.local_addr().ok().map(Endpoint::Inet)
            }
            _ => None,
        };
        let old = self.services.service_mut(service).and_then(|s| s.listener.replace(listener));
        if let Some(old) = old.filter(|&old| old != listener) {
            self.retire_listener(old, now);
        }
        // A staged listener may already have clients queued: serve them. A
        // change saved just as shutdown began serves them, then closes too.
        self.enqueue(listener);
        if self.draining.is_some() {
            self.retire_listener(listener, now);
        }
        let name = self.services.service(service).map_or("?", |s| s.settings.name.as_str());
        match (&self.role, local) {
            // The control loop said it once for all of them.
            (Role::Worker { index, .. }, _) => log::debug!("worker {index}: service {name} listening"),
            (_, Some(local)) => info!("service {name} listening on {local}"),
            (_, None) => info!("service {name} listening"),
        }
    }

    /// Starts the health probe of a backend, if it has a check address and its service checks.
    pub(crate) fn start_probe(&mut self, backend: Key, now: Instant) {
        if !self.hosts_probes() {
            return;
        }
        let Some(b) = self.services.backend(backend) else { return };
        let Some(service) = self.services.service(b.service) else { return };
        let Some(interval) = crate::model::config::seconds(service.settings.check_interval) else { return };
        if b.check_addr.is_none() {
            return;
        }
        let Server { entries, timers, .. } = self;
        let key = entries.insert_with(|key| Entry::Probe(Probe::new(key, backend, interval, now, timers)));
        self.fds.probes += 1;
        if let Some(b) = self.services.backend_mut(backend) {
            b.probe = Some(key);
        }
    }

    /// Removes an entry, giving back its timer, buffers and counts.
    pub(crate) fn remove_entry(&mut self, key: Key) {
        let Some(mut entry) = self.entries.remove(key) else { return };
        if let Entry::Queued(queued) = &entry {
            return self.close_queued(queued, Instant::now());
        }
        let mut cx = Cx {
            now: Instant::now(),
            registry: self.poll.registry(),
            timers: &mut self.timers,
            services: &mut self.services,
            pool: &mut self.pool,
            fds: &mut self.fds,
            access_log: &mut self.access_log,
        };
        match &mut entry {
            Entry::Pair(pair) => {
                pair.close(&mut cx);
                self.fds.pair_closed();
                // A closed pair frees an fd: let listeners paused for lack of fds try again.
                for listener in std::mem::take(&mut self.paused) {
                    self.enqueue(listener);
                }
                // And a slot of its service and backend: the oldest queued client gets it.
                self.service_slot_freed(pair.service());
            }
            Entry::Queued(_) => {}
            Entry::Greeting(greeting) => {
                greeting.close(&mut cx);
                self.fds.pair_closed();
                for listener in std::mem::take(&mut self.paused) {
                    self.enqueue(listener);
                }
                // The service slot it took at accept goes back.
                if let Some(s) = self.services.service(greeting.service()) {
                    s.state.gate.active.sub_one();
                }
                self.service_slot_freed(greeting.service());
            }
            Entry::Listener(listener) => {
                if let Some(timer) = listener.paused.take() {
                    cx.timers.cancel(timer);
                }
                self.fds.listeners -= 1;
                self.paused.retain(|&k| k != key);
            }
            Entry::Probe(probe) => {
                probe.close(key, &mut cx);
                self.fds.probes -= 1;
            }
            Entry::Admin(conn) => {
                conn.close(&mut cx);
                self.fds.admin_conns -= 1;
                self.admin.retain(|&k| k != key);
                if let Some(changes) = self.changes.as_mut() {
                    changes.forget(key);
                }
                // A free slot: admin clients waiting in the listen queue may come in.
                if self.admin_retry.is_some() {
                    self.wake_admin_listener();
                }
            }
            Entry::AdminListener(_) => {
                self.fds.listeners -= 1;
                self.admin_listener = None;
            }
            Entry::Group(group) => self.fds.listeners -= group.copies.len(),
            Entry::Flow(flow) => self.flow_closed(flow),
            Entry::Datagrams(socket) => self.datagrams_closed(socket),
        }
    }

    /// Runs the loop until SIGTERM/SIGINT and the drain that follows.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        if matches!(self.role, Role::Control { .. }) {
            self.notify_ready();
        }
        loop {
            let now = Instant::now();
            let timeout = if self.ready.is_empty() && self.to_serve.is_empty() {
                let changes = self.changes.as_ref().and_then(Changes::deadline);
                let watchdog = self.workers().map(workers::Workers::next_ping);
                let deadline =
                    [self.timers.next_deadline(), self.draining, changes, watchdog].into_iter().flatten().min();
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
            self.hear_bell(now);
            self.on_change_deadline(now);
            self.start_upgrade();
            if let Some(stuck) = self.workers_mut().and_then(|w| w.watch(now)) {
                let why = format!(
                    "worker {stuck} has not answered for {:?}: its loop is stuck; exiting at once, for a supervisor to restart shuttle",
                    workers::STUCK_AFTER
                );
                log::error!("{why}");
                return Err(io::Error::other(why));
            }
            self.start_waiting_probes(now);
            self.serve_waiting(now);
            for _ in 0..self.ready.len() {
                let Some(key) = self.ready.pop_front() else { break };
                if let Some(slot) = self.queued.get_mut(key.index() as usize).filter(|q| **q == Some(key)) {
                    *slot = None;
                }
                self.resume(key, now);
            }
            self.access_log.flush();
            if self.draining.is_some() {
                self.reap_successor(now);
            }
            if self.drained(now) {
                // Grace over with workers still running: they cut their connections and
                // stop, waited for as after a second signal, so none is lost unlogged.
                if !self.stopping_now && self.workers().is_some_and(|w| !w.all_exited()) {
                    self.stop_workers(now);
                    continue;
                }
                self.close_open_pairs();
                self.access_log.flush();
                if matches!(self.role, Role::Control { .. }) {
                    self.access_log.finish();
                }
                return match self.failed.take() {
                    Some(why) => Err(io::Error::other(why)),
                    None => Ok(()),
                };
            }
        }
    }

    fn dispatch(&mut self, event: &Event, now: Instant) {
        match event.token() {
            SIGNALS => return self.on_signals(now),
            WAKER if matches!(self.role, Role::Worker { .. }) => return self.on_orders(now),
            WAKER => return self.on_answers(now),
            _ => {}
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
            Some(Entry::Queued(_)) => self.on_queued_ready(key, ready),
            Some(Entry::Greeting(_)) => self.greet(key, now, |greeting, _| greeting.on_ready()),
            Some(Entry::Datagrams(_)) => self.receive(key, now),
            Some(Entry::Flow(_)) => self.relay_from_backend(key, now),
            Some(Entry::Group(_)) | None => {} // a closed entry's leftover event (pitfall 7)
        }
    }

    fn on_signals(&mut self, now: Instant) {
        let Some(signals) = self.signals.as_mut() else { return };
        let signals: Vec<i32> = signals.pending().collect();
        for signal in signals {
            match signal {
                SIGTERM | SIGINT if self.draining.is_some() => self.stop_now(now),
                SIGTERM | SIGINT => self.begin_drain(now),
                // Nothing new may start once the drain has begun.
                SIGHUP if self.draining.is_some() => info!("SIGHUP received while shutting down: not reloading"),
                SIGHUP if self.upgrades.state.is_some() => info!("SIGHUP received during an upgrade: not reloading"),
                SIGHUP => self.reload(now),
                SIGUSR1 if self.access_log.is_on() => {
                    info!("SIGUSR1 received: reopening the access log");
                    self.access_log.reopen();
                }
                SIGUSR1 => info!("SIGUSR1 received: there is no access log to reopen; shuttle keeps running"),
                SIGUSR2 => self.on_upgrade_signal(),
                other => info!("signal {other} received and ignored; shuttle keeps running"),
            }
        }
    }

    fn on_timer(&mut self, key: Key, now: Instant) {
        match self.entries.get_mut(key) {
            Some(Entry::Listener(listener)) => {
                if listener.retiring.is_some_and(|at| now >= at) {
                    return self.finish_retiring(key, now);
                }
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
            Some(Entry::Queued(_)) => self.on_queued_timer(key, now),
            Some(Entry::Greeting(_)) => self.greet(key, now, |greeting, cx| greeting.on_timer(key, cx)),
            Some(Entry::Flow(_)) => self.flow_timer(key, now),
            Some(Entry::Group(_) | Entry::Datagrams(_)) | None => {}
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
            Some(Entry::Datagrams(_)) => self.receive(key, now),
            Some(Entry::Flow(_)) => self.relay_from_backend(key, now),
            _ => {}
        }
    }

    /// Cuts this loop's pairs of backends marked down since it last looked,
    /// when their service says `on_backend_down: close`. One atomic load a
    /// turn; the backends and pairs are scanned only after the bell rang.
    fn hear_bell(&mut self, now: Instant) {
        let epoch = self.services.bell().epoch();
        if epoch == self.heard {
            return;
        }
        self.heard = epoch;
        let down = self.services.cuts();
        if !down.is_empty() {
            self.cut_pairs(|pair| down.contains(&pair.target()), Cut::BackendDown, now);
            self.close_flows(|flow| down.contains(&flow.backend), crate::data::finished::End::BackendDown);
        }
    }

    /// Cuts every pair of this loop that `which` picks.
    pub(crate) fn cut_pairs(&mut self, which: impl Fn(&Pair) -> bool, why: Cut, now: Instant) {
        let keys: Vec<Key> = self
            .entries
            .iter()
            .filter_map(|(key, entry)| match entry {
                Entry::Pair(pair) if which(pair) => Some(key),
                _ => None,
            })
            .collect();
        if !keys.is_empty() {
            log::debug!("cutting {} connection{} ({why})", keys.len(), if keys.len() == 1 { "" } else { "s" });
        }
        for key in keys {
            self.drive(key, now, |entry, cx| match entry {
                Entry::Pair(pair) => pair.cut(key, why, cx),
                _ => Step::Wait,
            });
        }
    }

    /// Hands free descriptor slots to probes that waited for one.
    fn start_waiting_probes(&mut self, now: Instant) {
        while self.fds.waiting() > 0 {
            let Some(key) = self.fds.next_waiting(now) else { return };
            if !matches!(self.entries.get(key), Some(Entry::Probe(_))) {
                self.fds.check_done();
                continue;
            }
            self.drive(key, now, |entry, cx| match entry {
                Entry::Probe(probe) => probe.on_slot(key, cx),
                _ => Step::Wait,
            });
        }
    }

    /// Runs `f` on an entry with a context of the loop's other fields, then does what it returns.
    fn drive(&mut self, key: Key, now: Instant, f: impl FnOnce(&mut Entry, &mut Cx<'_>) -> Step) {
        let Server { poll, entries, timers, services, pool, fds, access_log, .. } = self;
        let Some(entry) = entries.get_mut(key) else { return };
        let mut cx = Cx { now, registry: poll.registry(), timers, services, pool, fds, access_log };
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

    /// SIGTERM/SIGINT: stop accepting and let open pairs finish within the grace period.
    fn begin_drain(&mut self, now: Instant) {
        if self.draining.is_some() {
            return;
        }
        let pairs = self.fds.pairs;
        let them = if pairs == 1 { "connection gets" } else { "connections get" };
        // After a hand-over the listeners are the new process's: this one only drains.
        let (worker_does, process_does) = match self.upgrades.handed_over {
            true => ("drains after the hand-over", "draining"),
            false => ("shutting down", "shutting down: listeners closed"),
        };
        match (&self.role, self.workers()) {
            (Role::Worker { index, .. }, _) => {
                log::debug!("worker {index} {worker_does}: {pairs} open {them} up to {:?}", self.grace)
            }
            (_, Some(workers)) => {
                let n = workers.len();
                info!("{process_does}, the open connections of {n} workers get up to {:?}", self.grace);
                workers.drain();
            }
            _ => info!("{process_does}, {pairs} open {them} up to {:?}", self.grace),
        }
        // After an upgrade the new process speaks to systemd: it is the main process now.
        if matches!(self.role, Role::Control { .. }) && !self.upgrades.handed_over {
            let open = self.fds.process_pairs();
            let them = if open == 1 { "connection gets" } else { "connections get" };
            self.notify.send(&format!("STOPPING=1\nSTATUS=draining: {open} open {them} up to {:?}\n", self.grace));
        }
        // A huge grace means "wait for every connection": cap it rather than overflow.
        // Set first: what closes below ends as part of the shutdown.
        self.draining = Some(now.checked_add(self.grace).unwrap_or(now + Duration::from_secs(1 << 30)));
        let (mut listeners, mut others) = (Vec::new(), Vec::new());
        for (key, entry) in self.entries.iter() {
            match entry {
                // A client whose header is on its way is served like one already
                // relaying, and so is one waiting for a backend slot: pairs that
                // finish free slots for it, or its queue_timeout closes it.
                Entry::Pair(_) | Entry::Greeting(_) | Entry::Queued(_) => {}
                Entry::Listener(_) => listeners.push(key),
                _ => others.push(key),
            }
        }
        // Clients already queued at a listener are served, not reset by its close.
        for key in listeners {
            self.retire_listener(key, now);
        }
        for key in others {
            self.remove_entry(key);
        }
    }

    /// A second SIGTERM/SIGINT during the drain: open connections are cut now.
    /// Workers are told to do the same and are waited for (briefly), so the
    /// process ends with every loop stopped, not in the middle of one.
    fn stop_now(&mut self, now: Instant) {
        if self.stopping_now {
            return;
        }
        self.stopping_now = true;
        match &self.role {
            Role::Worker { index, .. } => {
                log::debug!("worker {index}: closing {} open connections now", self.fds.pairs)
            }
            Role::Control { workers, .. } => {
                let open = self.fds.process_pairs();
                info!("second signal: closing {open} open connection{} now", if open == 1 { "" } else { "s" });
                if let Some(workers) = workers {
                    workers.stop();
                }
            }
        }
        let wait = if matches!(self.role, Role::Worker { .. }) { Duration::ZERO } else { STOP_WAIT };
        self.draining = Some(now + wait);
    }

    /// The grace period ran out while workers still run: tell them to cut their
    /// connections and stop, and wait for them as `stop_now` does.
    fn stop_workers(&mut self, now: Instant) {
        self.stopping_now = true;
        if let Some(workers) = self.workers() {
            workers.stop();
        }
        self.draining = Some(now + STOP_WAIT);
    }

    /// Closes the pairs still open when the loop stops (the grace ran out, or a
    /// second signal), so each is counted and gets its access-log line (`end=shutdown`).
    fn close_open_pairs(&mut self) {
        let open: Vec<(Key, bool)> = self
            .entries
            .iter()
            .filter_map(|(key, entry)| match entry {
                Entry::Pair(_) => Some((key, false)),
                Entry::Queued(_) => Some((key, true)),
                _ => None,
            })
            .collect();
        for (key, queued) in open {
            if queued {
                self.shut_queued(key);
            } else {
                self.remove_entry(key);
            }
        }
    }

    /// Tells systemd (if it listens) that every listener and the admin API are up.
    fn notify_ready(&mut self) {
        if !self.notify.is_enabled() {
            return;
        }
        let services = self.services.len();
        let status = format!(
            "serving {services} service{}, admin API on {}",
            if services == 1 { "" } else { "s" },
            self.admin_shown
        );
        self.notify.send(&format!("READY=1\nMAINPID={}\nSTATUS={status}\n", std::process::id()));
    }

    /// Whether the drain after SIGTERM is over: every connection closed (and
    /// every listener has served its queue, and no state file write is in
    /// flight), or the grace period ran out.
    fn drained(&self, now: Instant) -> bool {
        let Some(deadline) = self.draining else { return false };
        // Even past the grace: until then the new process serves nothing (bounded by the link's deadline).
        if self.telling_successor() {
            return false;
        }
        if self.stopping_now {
            // Workers were told to cut their connections and go; a stuck one is not waited for.
            return now >= deadline || self.workers().is_none_or(|w| w.all_exited());
        }
        let saving = self.changes.as_ref().is_some_and(Changes::is_saving);
        let workers = self.workers().is_none_or(|w| w.all_exited());
        // The answer of a new process an upgrade started is waited for (its
        // deadline bounds it), so that the upgrade is called off in good order.
        let starting = matches!(self.upgrades.state, Some(upgrade::Upgrade::Running));
        if self.fds.pairs == 0 && self.fds.listeners == 0 && !saving && workers && !starting {
            if !matches!(self.role, Role::Worker { .. }) {
                info!("all connections closed; exiting");
            }
            return true;
        }
        if now >= deadline {
            let connections = |n: u64| format!("{n} open connection{}", if n == 1 { "" } else { "s" });
            match self.role {
                Role::Worker { index, .. } => {
                    log::debug!("worker {index}: grace period over; closing {}", connections(self.fds.pairs as u64))
                }
                // Over every worker: the control loop itself holds none of them.
                Role::Control { .. } => {
                    info!("grace period over; closing {}", connections(self.fds.process_pairs()))
                }
            }
            return true;
        }
        false
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
