//! `-workers N` (design §17): N worker loops proxy, one control loop owns
//! the admin API, the state file, the health probes and the authoritative
//! config. They run the same `Server` and the same state machines; only what
//! each loop hosts differs.
//!
//! A change is prepared, bound (one `SO_REUSEPORT` listener per worker) and
//! saved by the control loop, applied to its own services, then sent to
//! every worker as an [`Op`] with the sockets and the shared counters; each
//! worker applies it to its own copy and acknowledges. The admin answer waits
//! for every acknowledgement, so the client's next connection sees the change
//! whichever worker accepts it. Counters and health are shared atomics
//! (`model::counters`), so stats need no messages at all.
//!
//! A worker loop that fails (returns an error or panics) has lost its
//! listeners with it: the kernel stops handing it connections once its
//! sockets close. The control loop then logs why, drains the others and
//! exits with status 1, for the supervisor to restart shuttle: a process
//! running with a part of its workers missing would look healthy and not be.
//! A worker whose loop is stuck (a bug spinning in one call) would keep its
//! listener and leave the connections queued there unanswered: the control
//! loop's watchdog pings every worker each second, and one silent for
//! [`STUCK_AFTER`] makes the process exit 1 at once (a stuck thread can't be
//! drained or stopped).

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info};
use mio::Poll;

use super::{Entry, Role, Server, WAKER};
use crate::control::api::{Plane, Staged};
use crate::model::config::ServiceConfig;
use crate::model::endpoint::Endpoint;
use crate::model::service::{Prepared, Shared};
use crate::runtime::accesslog::AccessLog;
use crate::runtime::bell::Bell;
use crate::runtime::cpus;
use crate::runtime::helpers::{Answer, Inbox, Outbox};
use crate::runtime::key::Key;
use crate::runtime::listen::Bound;
use crate::runtime::listen::SocketKind;
use crate::runtime::unix::SocketFile;

/// What the control loop tells a worker loop.
#[derive(Debug)]
pub enum Order {
    /// Apply change number `generation`, then acknowledge it.
    Apply {
        /// The change's number; they come in order.
        generation: u64,
        /// The change (boxed: orders are rare, and a `Prepared` is big).
        op: Box<Op>,
    },
    /// SIGTERM: stop accepting, let open connections finish, exit.
    Drain,
    /// A second SIGTERM: close every open connection now, exit.
    Stop,
    /// The watchdog asks: answer [`Answer::Alive`] with this number.
    Ping(u64),
    /// A binary upgrade succeeded: close the listeners without a filter (the new process serves the same sockets).
    HandOver,
    /// Another worker freed connection slots this one's queued clients or held listeners may want.
    Slots,
}

/// Every worker's inbox, so that a worker that frees a slot can wake the one
/// whose queued client should get it (`server::queue`). At most one wake-up
/// is in flight per worker: a burst of closes posts one order.
#[derive(Debug)]
pub struct Peers {
    links: Vec<(Outbox<Order>, AtomicBool)>,
}

impl Peers {
    /// Wakes worker `index` to look at its queues and held listeners.
    pub fn poke(&self, index: usize) {
        if let Some((orders, pending)) = self.links.get(index) {
            if !pending.swap(true, Ordering::AcqRel) {
                orders.post(Order::Slots);
            }
        }
    }

    /// Worker `index` took its wake-up: the next one posts again.
    fn taken(&self, index: usize) {
        if let Some((_, pending)) = self.links.get(index) {
            pending.store(false, Ordering::Release);
        }
    }
}

/// A change as a worker applies it to its copy of the services. Services are
/// named, not keyed: each loop has its own keys.
#[derive(Debug)]
pub enum Op {
    /// A new service, on this worker's listener of the group.
    Add {
        /// The service.
        prepared: Prepared,
        /// This worker's listener.
        socket: Bound,
        /// The counters and health every loop shares.
        shared: Shared,
    },
    /// New settings and backends; with a socket, a new address.
    Replace {
        /// The service.
        prepared: Prepared,
        /// This worker's listener on the new address, if it moved.
        socket: Option<Bound>,
        /// The counters and health every loop shares.
        shared: Shared,
    },
    /// New backends only.
    Backends {
        /// The service.
        prepared: Prepared,
        /// The counters and health every loop shares.
        shared: Shared,
    },
    /// A deleted service.
    Remove {
        /// Its name.
        name: String,
    },
    /// Cut the open pairs of one backend of a service, or of the whole service
    /// (`DELETE ...?close`), before the removal that follows it.
    Cut {
        /// The service's name.
        service: String,
        /// The backend's name; `None` for every pair of the service.
        backend: Option<String>,
    },
}

/// One worker loop as the control loop sees it.
#[derive(Debug)]
struct Link {
    orders: Outbox<Order>,
    /// The last change it acknowledged.
    applied: u64,
    /// The watchdog's unanswered ping: its number and when it was sent.
    ping: Option<(u64, Instant)>,
    exited: bool,
    thread: Option<JoinHandle<()>>,
}

/// The control loop's worker loops.
#[derive(Debug)]
pub struct Workers {
    links: Vec<Link>,
    /// Closed until [`Workers::start`]: the threads wait at it before their loops turn.
    gate: Arc<Gate>,
    /// The last change sent.
    generation: u64,
    /// When the watchdog pings next.
    next_ping: Instant,
    /// Pings sent so far.
    pings: u64,
}

/// Where worker threads wait until the process may serve: at once on a
/// plain start; after an upgrade's new process has said it is ready, so that
/// no connection is accepted by a process that may still give up (reference §3.7).
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.opened.notify_all();
    }

    /// Blocks a worker thread before its loop starts (never a turning loop).
    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// How often the watchdog asks every worker whether its loop still turns.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A worker that leaves a ping unanswered this long is stuck. A turning loop
/// answers within one pass, and every pass is bounded by its budgets (a few
/// milliseconds), so this is far from anything a busy worker could reach.
pub const STUCK_AFTER: Duration = Duration::from_secs(5);

/// The listeners of one service, one per worker, while the control loop
/// holds them (staged for a change not yet committed); afterwards only the
/// address is kept, for the loop checks.
#[derive(Debug)]
pub struct Group {
    /// The service they serve; `None` while staged.
    pub service: Option<Key>,
    /// Where they are bound.
    pub local: Endpoint,
    /// The sockets, until handed to the workers.
    pub sockets: Vec<Bound>,
    /// A descriptor of each worker's socket, kept for a binary upgrade to hand over.
    pub copies: Vec<std::os::fd::OwnedFd>,
    /// What the sockets are.
    pub kind: SocketKind,
    /// A unix listener's socket file, which an upgrade leaves to the new process.
    pub file: Option<Arc<SocketFile>>,
}

impl Workers {
    /// Starts `n` worker loops whose fd budget is `fd_limit` each; they
    /// report to `control`. With `pin`, worker i runs on the i-th allowed CPU.
    /// Every worker counts its pairs into `pairs`, which the control loop
    /// reads, logs finished connections to its own end of `access_log`, and
    /// rings and hears `bell` (backends gone down).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        n: usize,
        pin: bool,
        fd_limit: u64,
        grace: Duration,
        control: &Outbox,
        pairs: &Arc<AtomicU64>,
        access_log: &AccessLog,
        bell: &Arc<Bell>,
    ) -> io::Result<Workers> {
        let cpus = if pin { cpus::allowed()? } else { Vec::new() };
        let mut links = Vec::with_capacity(n);
        let mut loops = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Poll::new()?;
            let inbox: Inbox<Order> = Inbox::new(poll.registry(), WAKER)?;
            loops.push((poll, inbox));
        }
        let gate = Arc::new(Gate::default());
        let peers = Arc::new(Peers {
            links: loops.iter().map(|(_, inbox)| (inbox.outbox(), AtomicBool::new(false))).collect(),
        });
        for (index, (poll, inbox)) in loops.into_iter().enumerate() {
            let orders = inbox.outbox();
            let control = control.clone();
            let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
            let budget = Budget {
                fd_limit,
                pairs: pairs.clone(),
                access_log: access_log.for_loop(),
                peers: peers.clone(),
                bell: bell.clone(),
                gate: gate.clone(),
            };
            // `top -H` and `ps -L` show 15 bytes of a thread's name: keep the number in them.
            let thread = thread::Builder::new()
                .name(format!("shuttle-w{index}"))
                .spawn(move || run_worker(index, poll, inbox, control, budget, grace, cpu))?;
            links.push(Link { orders, applied: 0, ping: None, exited: false, thread: Some(thread) });
        }
        Ok(Workers { links, gate, generation: 0, next_ping: Instant::now() + PING_EVERY, pings: 0 })
    }

    /// Lets the worker loops turn: they apply the orders sent so far, and serve.
    pub fn start(&self) {
        self.gate.open();
    }

    /// How many worker loops there are.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Every worker loop's waker, for the bell.
    pub fn wakers(&self) -> impl Iterator<Item = Arc<mio::Waker>> + '_ {
        self.links.iter().map(|l| l.orders.waker())
    }

    /// Sends worker i the change `ops[i]`; a worker without one has nothing to apply.
    pub fn send(&mut self, ops: Vec<Op>) {
        self.generation += 1;
        let mut ops = ops.into_iter();
        for link in &mut self.links {
            let Some(op) = ops.next() else {
                link.applied = self.generation;
                continue;
            };
            if !link.exited && !link.orders.post(Order::Apply { generation: self.generation, op: Box::new(op) }) {
                link.exited = true;
            }
        }
    }

    /// Tells every worker to drain.
    pub fn drain(&self) {
        for link in self.links.iter().filter(|l| !l.exited) {
            let _ = link.orders.post(Order::Drain);
        }
    }

    /// Tells every worker that a new process serves their listeners now.
    pub fn hand_over(&self) {
        for link in self.links.iter().filter(|l| !l.exited) {
            let _ = link.orders.post(Order::HandOver);
        }
    }

    /// Tells every worker to close its connections and stop now.
    pub fn stop(&self) {
        for link in self.links.iter().filter(|l| !l.exited) {
            let _ = link.orders.post(Order::Stop);
        }
    }

    /// Whether every running worker has applied every change sent.
    pub fn settled(&self) -> bool {
        self.links.iter().all(|l| l.exited || l.applied >= self.generation)
    }

    /// Worker `worker` applied changes up to `generation`.
    pub fn applied(&mut self, worker: usize, generation: u64) {
        if let Some(link) = self.links.get_mut(worker) {
            link.applied = link.applied.max(generation);
        }
    }

    /// Worker `worker` has stopped.
    pub fn exited(&mut self, worker: usize) {
        if let Some(link) = self.links.get_mut(worker) {
            link.exited = true;
            if let Some(thread) = link.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Worker `worker` answered ping `seq`.
    pub fn alive(&mut self, worker: usize, seq: u64) {
        if let Some(link) = self.links.get_mut(worker) {
            if link.ping.is_some_and(|(sent, _)| sent == seq) {
                link.ping = None;
            }
        }
    }

    /// When [`Workers::watch`] must run next.
    pub fn next_ping(&self) -> Instant {
        self.next_ping
    }

    /// The watchdog: pings every running worker once a second and returns
    /// the first that has left a ping unanswered for [`STUCK_AFTER`].
    pub fn watch(&mut self, now: Instant) -> Option<usize> {
        if now < self.next_ping {
            return None;
        }
        // Late by more than a period: this loop itself did not run (the process
        // was stopped, the machine suspended). The workers did not either, so
        // their silence says nothing yet: give every ping a fresh start.
        if now.saturating_duration_since(self.next_ping) > PING_EVERY {
            for (_, sent) in self.links.iter_mut().filter_map(|l| l.ping.as_mut()) {
                *sent = now;
            }
        }
        self.next_ping = now + PING_EVERY;
        for (index, link) in self.links.iter_mut().enumerate().filter(|(_, l)| !l.exited) {
            match link.ping {
                Some((_, sent)) if now.saturating_duration_since(sent) >= STUCK_AFTER => return Some(index),
                Some(_) => {}
                None => {
                    self.pings += 1;
                    link.ping = Some((self.pings, now));
                    let _ = link.orders.post(Order::Ping(self.pings));
                }
            }
        }
        None
    }

    /// Whether every worker has stopped.
    pub fn all_exited(&self) -> bool {
        self.links.iter().all(|l| l.exited)
    }
}

/// A worker's share of the descriptor limit, and the process's gauge of open pairs.
struct Budget {
    fd_limit: u64,
    pairs: Arc<AtomicU64>,
    /// The worker's end of the access log.
    access_log: AccessLog,
    /// Every worker's inbox, for wake-ups about freed slots.
    peers: Arc<Peers>,
    /// The bell every loop rings and hears.
    bell: Arc<Bell>,
    /// Where the thread waits until the process may serve.
    gate: Arc<Gate>,
}

/// A worker thread's whole life: build its loop, run it, report how it ended.
fn run_worker(
    index: usize,
    poll: Poll,
    orders: Inbox<Order>,
    control: Outbox,
    budget: Budget,
    grace: Duration,
    cpu: Option<usize>,
) {
    crate::runtime::privileges::confine_thread();
    if let Some(cpu) = cpu {
        match cpus::pin_this_thread(cpu) {
            Ok(()) => debug!("worker {index} runs on CPU {cpu}"),
            Err(e) => log::warn!("worker {index}: cannot pin to CPU {cpu}: {e}"),
        }
    }
    let report = control.clone();
    let ran = catch_unwind(AssertUnwindSafe(move || {
        let mut server = Server::worker(index, poll, orders, control, budget.fd_limit, grace);
        server.fds.share_pairs(budget.pairs);
        server.access_log = budget.access_log;
        server.peers = Some(budget.peers);
        server.services.set_bell(budget.bell);
        budget.gate.wait();
        server.run()
    }));
    let failed = match ran {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("its event loop failed: {e}")),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Some(format!("it panicked: {why}"))
        }
    };
    let _ = report.post(Answer::Exited { worker: index, failed });
}

impl Server {
    /// The worker loops, when this is the control loop of several.
    pub(crate) fn workers(&self) -> Option<&Workers> {
        match &self.role {
            Role::Control { workers, .. } => workers.as_ref(),
            Role::Worker { .. } => None,
        }
    }

    pub(crate) fn workers_mut(&mut self) -> Option<&mut Workers> {
        match &mut self.role {
            Role::Control { workers, .. } => workers.as_mut(),
            Role::Worker { .. } => None,
        }
    }

    /// Whether this loop runs the health probes (it does unless it is a worker of several).
    pub(crate) fn hosts_probes(&self) -> bool {
        matches!(self.role, Role::Control { .. })
    }

    /// Binds one listener per worker and keeps them as a staged group.
    pub(super) fn stage_group(&mut self, addr: &Endpoint, n: usize, settings: &ServiceConfig) -> io::Result<Staged> {
        self.stage_sockets(super::bind::bind_any(addr, n, settings)?)
    }

    /// Keeps one socket per worker, bound here or handed over, as a staged group.
    pub(crate) fn stage_sockets(&mut self, sockets: Vec<Bound>) -> io::Result<Staged> {
        let first = sockets.first().ok_or(io::ErrorKind::AddrNotAvailable)?;
        let (local, kind, file) = (first.local_addr()?, first.kind(), first.file().cloned());
        let copies = sockets.iter().map(Bound::dup).collect::<io::Result<Vec<_>>>()?;
        // The copies are descriptors this loop holds for as long as the group lives.
        self.fds.listeners += copies.len();
        let group = Group { service: None, local: local.clone(), sockets, copies, kind, file };
        let listener = self.entries.insert_with(|_| Entry::Group(group));
        Ok(Staged { listener, local })
    }

    /// Makes a staged group `service`'s and hands out its sockets, one per worker.
    pub(super) fn adopt_group(&mut self, service: Key, staged: Staged) -> Vec<Option<Bound>> {
        let sockets = match self.entries.get_mut(staged.listener) {
            Some(Entry::Group(group)) => {
                group.service = Some(service);
                std::mem::take(&mut group.sockets)
            }
            _ => Vec::new(),
        };
        let old = self.services.service_mut(service).and_then(|s| s.listener.replace(staged.listener));
        if let Some(old) = old.filter(|&old| old != staged.listener) {
            // Its sockets are the workers'; each retires its own.
            self.remove_entry(old);
        }
        let name = self.services.service(service).map_or("?", |s| s.settings.name.as_str());
        // The same line as with one loop: tools read the address at its end.
        info!("service {name} listening on {}", staged.local);
        sockets.into_iter().map(Some).collect()
    }

    /// Worker side: applies the control loop's orders and acknowledges them.
    pub(super) fn on_orders(&mut self, now: Instant) {
        loop {
            let Role::Worker { orders, .. } = &self.role else { return };
            let Some(order) = orders.next() else { return };
            match order {
                Order::Apply { generation, op } => {
                    self.apply_op(*op, now);
                    if let Role::Worker { index, control, .. } = &self.role {
                        let _ = control.post(Answer::Applied { worker: *index, generation });
                    }
                }
                Order::Drain => self.begin_drain(now),
                Order::HandOver => self.release_listeners(),
                Order::Stop => {
                    self.begin_drain(now);
                    self.stop_now(now);
                }
                Order::Slots => {
                    if let Some(peers) = &self.peers {
                        peers.taken(self.loop_index());
                    }
                    self.on_slots();
                }
                Order::Ping(seq) => {
                    if let Role::Worker { index, control, .. } = &self.role {
                        let _ = control.post(Answer::Alive { worker: *index, seq });
                    }
                }
            }
        }
    }

    /// Applies one change to this worker's copy of the services, through the
    /// same `Plane` calls that a single loop makes.
    fn apply_op(&mut self, op: Op, now: Instant) {
        match op {
            Op::Add { prepared, socket, shared } => {
                let Some(staged) = self.stage_socket(socket) else { return };
                let name = prepared.config.name.clone();
                self.add_service(prepared, staged, now);
                if let Some(key) = self.services.find(&name) {
                    self.services.share(key, &shared);
                }
            }
            Op::Replace { prepared, socket, shared } => {
                let Some(key) = self.services.find(&prepared.config.name) else {
                    return error!("worker: no service {:?} to replace", prepared.config.name);
                };
                let staged = socket.and_then(|s| self.stage_socket(s));
                self.replace_service(key, prepared, staged, now);
                self.services.share(key, &shared);
            }
            Op::Backends { prepared, shared } => {
                let Some(key) = self.services.find(&prepared.config.name) else {
                    return error!("worker: no service {:?} to update", prepared.config.name);
                };
                self.set_backends(key, prepared, now);
                self.services.share(key, &shared);
            }
            Op::Remove { name } => match self.services.find(&name) {
                Some(key) => self.remove_service(key, now),
                None => error!("worker: no service {name:?} to remove"),
            },
            Op::Cut { service, backend } => match self.services.find(&service) {
                Some(key) => self.cut(key, backend.as_deref(), now),
                None => error!("worker: no service {service:?} to cut"),
            },
        }
    }

    /// Registers a listener the control loop bound for this worker.
    fn stage_socket(&mut self, socket: Bound) -> Option<Staged> {
        let local = socket.local_addr().ok()?;
        match self.stage_bound(socket) {
            Ok(listener) => Some(Staged { listener, local }),
            Err(e) => {
                // The change is saved and every other loop has it: this worker
                // can only go without. Closing the socket takes it out of the
                // group, so the kernel hands its share to the others.
                error!("worker: cannot register the listener on {local}: {e}; the other workers serve it");
                None
            }
        }
    }
}
