//! The running services and backends: their config, health, counters, stats
//! JSON, and how a new config is matched against the running one.
//!
//! Services and backends live in generation-checked `Slots`, so a pair that
//! holds the key of a backend an operator has since removed or replaced finds
//! nothing when it counts, and keeps running (reference §3).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::model::address::{self, Lookups};
use crate::model::balance::{self, Candidate, SharedCursor};
use crate::model::config::{self, BackendConfig, OnBackendDown, ServiceConfig};
pub use crate::model::counters::Counters;
use crate::model::counters::{BackendState, ServiceState};
use crate::model::endpoint::{self, Endpoint};
use crate::model::handover::{BackendCounters, ServiceCounters};
use crate::model::health::{Health, Transition};
use crate::runtime::bell::Bell;
use crate::runtime::key::{Key, Slots};

/// One running backend.
#[derive(Debug)]
pub struct Backend {
    /// Its config as the operator wrote it.
    pub config: BackendConfig,
    /// Its name and address, shared: a connection that outlives the backend still names it.
    pub label: Arc<Label>,
    /// The service it belongs to.
    pub service: Key,
    /// `config.address`, resolved when the config was applied.
    pub addr: Endpoint,
    /// `config.check_address`, resolved; `None` when it is never checked.
    pub check_addr: Option<Endpoint>,
    /// Health and counters, shared by every loop that proxies to it.
    pub state: Arc<BackendState>,
    /// The last health check's outcome, kept by the loop that runs the probes.
    pub last_check: Option<LastCheck>,
    /// The event-loop entry that probes it, if any.
    pub probe: Option<Key>,
    /// `state.downs` when this loop last cut its pairs (see [`Services::cuts`]).
    seen_downs: u64,
}

/// What the access log calls a backend.
#[derive(Debug)]
pub struct Label {
    /// Its name.
    pub name: String,
    /// Its address, resolved.
    pub addr: Endpoint,
}

/// When the last health check of a backend ended and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCheck {
    /// When it ended.
    pub at: std::time::SystemTime,
    /// Why it failed; `None` when it passed.
    pub error: Option<String>,
}

/// One running service; its backends are listed by key, in balancing order.
#[derive(Debug)]
pub struct Service {
    /// Its settings; `config.backends` is kept empty (the backends are `backends`).
    pub settings: ServiceConfig,
    /// `settings.name`, shared: a connection that outlives the service still names it
    /// (an `Arc<String>` is one word in a pair's slot; an `Arc<str>` would be two).
    pub name: Arc<String>,
    /// `settings.address`, resolved.
    pub addr: Endpoint,
    /// Backends in config order.
    pub backends: Vec<Key>,
    /// No-backend errors and histograms, shared by every loop.
    pub state: Arc<ServiceState>,
    /// The event-loop entry of its listener.
    pub listener: Option<Key>,
    /// The timeouts new connections get, converted once per config change.
    limits: Limits,
    /// Shared by every loop, so balancing is one sequence over the process.
    cursor: Arc<SharedCursor>,
    /// Deleted: hidden from the API, kept while its listener hands over queued clients.
    retired: bool,
}

impl Service {
    /// Whether `prepared` can keep this service's socket: the same address and protocol.
    pub fn listens_as(&self, prepared: &Prepared) -> bool {
        self.addr == prepared.addr && self.settings.protocol == prepared.config.protocol
    }

    /// Whether it balances over down backends now: `fail_open` is on and every
    /// backend that counts is down. One load of the tally: cheap on every pick.
    pub fn fails_open(&self) -> bool {
        self.settings.fail_open && self.state.tally.all_down()
    }

    /// Logs that fail-open began (`true`) or ended.
    pub fn log_fail_open(&self, active: bool) {
        let name = &self.settings.name;
        if active {
            log::warn!("{name}: every backend is down: fail-open, new connections go to all of them as if up");
        } else {
            log::info!("{name}: fail-open ends");
        }
    }

    /// Logs a flip of "every counted backend is down" when it means fail-open
    /// begins or ends; the one loop whose tally change made the flip calls it.
    fn tally_changed(&self, flip: Option<bool>) {
        if let Some(active) = flip.filter(|_| self.settings.fail_open) {
            self.log_fail_open(active);
        }
    }
}

/// A config checked and resolved, ready to be applied without failing.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The config as written.
    pub config: ServiceConfig,
    /// The listen address.
    pub addr: Endpoint,
    /// Each backend's (address, check address).
    pub backend_addrs: Vec<(Endpoint, Option<Endpoint>)>,
}

/// Resolves every address of a validated config with names already looked
/// up (reference §2: names resolve once, when applied, never on the loop).
pub fn prepare(config: ServiceConfig, lookups: &Lookups) -> Result<Prepared, String> {
    let addr =
        resolve_text(&config.address, lookups).map_err(|e| format!("service {:?}: address: {e}", config.name))?;
    let mut backend_addrs = Vec::with_capacity(config.backends.len());
    for b in &config.backends {
        backend_addrs.push(resolve_backend(&config.name, b, lookups)?);
    }
    Ok(Prepared { config, addr, backend_addrs })
}

fn resolve_text(text: &str, lookups: &Lookups) -> Result<Endpoint, String> {
    match endpoint::parse_unix(text) {
        Some(path) => path.map(Endpoint::Unix),
        None => address::parse(text)?.resolve(lookups).map(Endpoint::Inet),
    }
}

/// Resolves one backend's address and check address.
pub fn resolve_backend(
    service: &str,
    b: &BackendConfig,
    lookups: &Lookups,
) -> Result<(Endpoint, Option<Endpoint>), String> {
    let err = |field: &str, e: String| format!("service {service:?}: backend {:?}: {field}: {e}", b.name);
    let addr = resolve_text(&b.address, lookups).map_err(|e| err("address", e))?;
    let check = if b.check_address.is_empty() {
        None
    } else {
        Some(resolve_text(&b.check_address, lookups).map_err(|e| err("check_address", e))?)
    };
    Ok((addr, check))
}

/// Checks a whole prepared config, as at start-up, for what needs resolved
/// addresses: listeners that clash, and backends that would loop to one of
/// the listeners or to the admin API (reference §2).
pub fn check_all(services: &[Prepared], admin: Option<SocketAddr>) -> Result<(), String> {
    // Listeners and loops can only clash on the same port: group by it, so a big config stays linear.
    let mut by_port: HashMap<u16, Vec<(&str, &Endpoint)>> = HashMap::new();
    for p in services {
        let same_port = by_port.entry(p.addr.port()).or_default();
        if let Some((other, taken)) = same_port.iter().find(|(_, taken)| taken.overlaps(&p.addr)) {
            return Err(format!(
                "service {:?}: address: {:?} conflicts with {taken}, where service {other:?} listens",
                p.config.name, p.config.address
            ));
        }
        same_port.push((&p.config.name, &p.addr));
    }
    for p in services {
        for (b, (addr, _)) in p.config.backends.iter().zip(&p.backend_addrs) {
            if let Some(why) = loop_problem(addr, &by_port, admin) {
                return Err(format!("service {:?}: backend {:?}: address: {why}", p.config.name, b.name));
            }
        }
    }
    Ok(())
}

fn loop_problem(
    addr: &Endpoint,
    by_port: &HashMap<u16, Vec<(&str, &Endpoint)>>,
    admin: Option<SocketAddr>,
) -> Option<String> {
    let same_port = by_port.get(&addr.port()).map_or(&[][..], Vec::as_slice);
    if let Some((owner, listener)) = same_port.iter().find(|(_, listener)| addr.loops_to(listener)) {
        return Some(format!("{addr} reaches {listener}, where service {owner:?} listens; it would loop"));
    }
    match admin {
        Some(admin) if addr.loops_to(&Endpoint::Inet(admin)) => {
            Some(format!("{addr} reaches {admin}, where the admin API listens"))
        }
        _ => None,
    }
}

/// The connect, client and server timeouts a pair keeps from its accept on.
/// Held as whole microseconds (0: none) rather than `Option<Duration>`s: half
/// the bytes in every pair's slab slot, with the timer's resolution to spare.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    connect_us: u64,
    client_us: u64,
    server_us: u64,
    lifetime_us: u64,
}

/// What the balancer sees of a backend; a vanished one is never chosen.
/// In fail-open (`open`), every backend is taken as up.
fn candidate(backends: &Slots<Backend>, key: Key, open: bool) -> Candidate {
    match backends.get(key) {
        Some(b) => balance::as_if_up(
            open,
            Candidate {
                weight: b.config.weight,
                up: b.state.health.is_up(),
                active: b.state.active.get(),
                limit: u64::from(b.config.max_connections),
            },
        ),
        None => Candidate { weight: 0, up: false, active: 0, limit: 0 },
    }
}

impl Limits {
    /// The limits a service's settings set.
    fn of(settings: &ServiceConfig) -> Limits {
        let us = |seconds: f64| {
            config::seconds(seconds).map_or(0, |d| (d.as_micros().max(1)).min(u128::from(u64::MAX)) as u64)
        };
        Limits {
            connect_us: us(settings.connect_timeout),
            client_us: us(settings.client_timeout),
            server_us: us(settings.server_timeout),
            lifetime_us: us(settings.max_connection_duration),
        }
    }

    fn get(us: u64) -> Option<Duration> {
        (us > 0).then(|| Duration::from_micros(us))
    }

    /// Deadline of each backend connect.
    pub fn connect(&self) -> Option<Duration> {
        Limits::get(self.connect_us)
    }

    /// Idle limit of the client socket.
    pub fn client(&self) -> Option<Duration> {
        Limits::get(self.client_us)
    }

    /// Idle limit of the backend socket.
    pub fn server(&self) -> Option<Duration> {
        Limits::get(self.server_us)
    }

    /// How long the connection may last in all (`max_connection_duration`).
    pub fn lifetime(&self) -> Option<Duration> {
        Limits::get(self.lifetime_us)
    }
}

/// The backends to try for one client, best first; each is tried at most once
/// (reference §3). Only the first is chosen up front: the rest of the order is
/// worked out when a connect fails, from the backends as they are then.
///
/// Every backend a plan hands out comes with a slot of its `max_connections`
/// already taken (its `active` count raised by compare-and-swap), which the
/// pair gives back when it is done with it; one handed out by `plan` and
/// never used goes back through [`Services::abandon`].
#[derive(Debug)]
pub struct Plan {
    service: Key,
    /// The balancer's pick, slot taken, until it is handed out.
    first: Option<Key>,
    /// Backends handed out (or found full) so far (empty, unallocated, until a first failover).
    tried: Vec<Key>,
    /// The last backend handed out.
    last: Option<Key>,
    /// Some eligible backend was passed over because it was at its limit.
    full: bool,
}

impl Plan {
    /// Whether the balancer found no backend at all.
    pub fn is_empty(&self) -> bool {
        self.first.is_none() && self.last.is_none()
    }

    /// Whether the plan is empty only because every eligible backend is at its limit (the client may wait).
    pub fn is_full(&self) -> bool {
        self.is_empty() && self.full
    }
}

/// A service's state as every loop shares it (see [`Services::share`]).
#[derive(Debug, Clone, Default)]
pub struct Shared {
    /// No-backend errors and histograms.
    pub state: Arc<ServiceState>,
    /// Where balancing stands.
    pub cursor: Arc<SharedCursor>,
    /// Each backend's counters and health, in the service's order.
    pub backends: Vec<Arc<BackendState>>,
}

/// What a backends update did, so the loop can start and stop probes.
#[derive(Debug, Default)]
pub struct BackendChanges {
    /// Backends that are new (fresh health and counters).
    pub added: Vec<Key>,
    /// Backends that are gone; their open connections run on.
    pub removed: Vec<Backend>,
}

/// Every running service and backend.
#[derive(Debug, Default)]
pub struct Services {
    by_name: BTreeMap<String, Key>,
    services: Slots<Service>,
    backends: Slots<Backend>,
    /// How many loops proxy for these services (0 is taken as 1): sizes each service's shared gate.
    loops: usize,
    /// Rung when a backend of an `on_backend_down: close` service goes down, so every loop cuts its pairs.
    bell: Arc<Bell>,
}

impl Services {
    /// Sizes the shared state of services added from now on for `loops` proxying loops.
    pub fn set_loops(&mut self, loops: usize) {
        self.loops = loops;
    }

    /// The service called `name`.
    pub fn find(&self, name: &str) -> Option<Key> {
        self.by_name.get(name).copied()
    }

    /// A service by key.
    pub fn service(&self, key: Key) -> Option<&Service> {
        self.services.get(key)
    }

    /// A service by key, mutably.
    pub fn service_mut(&mut self, key: Key) -> Option<&mut Service> {
        self.services.get_mut(key)
    }

    /// A backend by key.
    pub fn backend(&self, key: Key) -> Option<&Backend> {
        self.backends.get(key)
    }

    /// A backend by key, mutably.
    pub fn backend_mut(&mut self, key: Key) -> Option<&mut Backend> {
        self.backends.get_mut(key)
    }

    /// The backend called `name` in `service`.
    pub fn find_backend(&self, service: Key, name: &str) -> Option<Key> {
        let s = self.services.get(service)?;
        s.backends.iter().copied().find(|&b| self.backends.get(b).is_some_and(|b| b.config.name == name))
    }

    /// Service keys, sorted by name.
    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        self.by_name.values().copied()
    }

    /// How many services run.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no service runs.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Adds a new service with fresh backends; returns its key and its backends' keys.
    pub fn insert(&mut self, prepared: Prepared) -> (Key, Vec<Key>) {
        let Prepared { mut config, addr, backend_addrs } = prepared;
        let backends = std::mem::take(&mut config.backends);
        let name = config.name.clone();
        let key = self.services.insert(Service {
            name: Arc::new(name.clone()),
            limits: Limits::of(&config),
            settings: config,
            addr,
            backends: Vec::new(),
            state: Arc::new(ServiceState::for_loops(self.loops)),
            listener: None,
            cursor: Arc::default(),
            retired: false,
        });
        self.by_name.insert(name, key);
        let changes = self.set_backends(key, backends, backend_addrs);
        (key, changes.added)
    }

    /// Replaces a service's settings (keeping its counters and listener) and matches its backends.
    pub fn replace(&mut self, key: Key, prepared: Prepared) -> BackendChanges {
        let Prepared { mut config, addr, backend_addrs } = prepared;
        let backends = std::mem::take(&mut config.backends);
        if let Some(service) = self.services.get_mut(key) {
            service.limits = Limits::of(&config);
            service.settings = config;
            service.addr = addr;
        }
        self.set_backends(key, backends, backend_addrs)
    }

    /// Sets a service's backends: an unchanged config keeps its backend (state and
    /// counters), anything else gets a fresh one, and the rest are removed.
    pub fn set_backends(
        &mut self,
        key: Key,
        configs: Vec<BackendConfig>,
        addrs: Vec<(Endpoint, Option<Endpoint>)>,
    ) -> BackendChanges {
        let mut changes = BackendChanges::default();
        let Some(service) = self.services.get_mut(key) else { return changes };
        let old = std::mem::take(&mut service.backends);
        // By name: names are unique within a service, and a hash keeps a big update linear.
        let mut by_name: HashMap<String, Key> =
            old.iter().filter_map(|&k| self.backends.get(k).map(|b| (b.config.name.clone(), k))).collect();
        let mut new_keys = Vec::with_capacity(configs.len());
        for (config, (addr, check_addr)) in configs.into_iter().zip(addrs) {
            // A new limit alone keeps the backend: its open connections must go on counting.
            let same = by_name
                .get(&config.name)
                .copied()
                .filter(|&k| self.backends.get(k).is_some_and(|b| b.config.same_but_limit(&config)));
            match same {
                Some(k) => {
                    by_name.remove(&config.name);
                    if let Some(b) = self.backends.get_mut(k) {
                        b.config = config;
                    }
                    new_keys.push(k);
                }
                None => {
                    let b = Backend {
                        label: Arc::new(Label { name: config.name.clone(), addr: addr.clone() }),
                        config,
                        service: key,
                        addr,
                        check_addr,
                        state: Arc::default(),
                        last_check: None,
                        probe: None,
                        seen_downs: 0,
                    };
                    let k = self.backends.insert(b);
                    changes.added.push(k);
                    new_keys.push(k);
                }
            }
        }
        let kept: HashSet<Key> = new_keys.iter().copied().collect();
        changes.removed =
            old.into_iter().filter(|k| !kept.contains(k)).filter_map(|k| self.backends.remove(k)).collect();
        if let Some(service) = self.services.get_mut(key) {
            service.backends = new_keys;
        }
        changes
    }

    /// Hides a deleted service from the API (its name is free again) while it
    /// still serves the clients its listener had queued.
    pub fn retire(&mut self, key: Key) -> Option<&Service> {
        let service = self.services.get_mut(key)?;
        service.retired = true;
        if self.by_name.get(&service.settings.name) == Some(&key) {
            self.by_name.remove(&service.settings.name);
        }
        Some(service)
    }

    /// Whether a service was deleted and only hands over its last clients.
    pub fn is_retired(&self, key: Key) -> bool {
        self.services.get(key).is_some_and(|s| s.retired)
    }

    /// Removes a service and its backends, which are returned.
    pub fn remove(&mut self, key: Key) -> Option<(Service, Vec<Backend>)> {
        let service = self.services.remove(key)?;
        if self.by_name.get(&service.settings.name) == Some(&key) {
            self.by_name.remove(&service.settings.name);
        }
        let backends = service.backends.iter().filter_map(|&k| self.backends.remove(k)).collect();
        Some((service, backends))
    }

    /// What every loop shares of a service: its error counter and its
    /// backends' state, in order.
    pub fn shared(&self, key: Key) -> Shared {
        let Some(s) = self.services.get(key) else { return Shared::default() };
        let backends = s.backends.iter().filter_map(|&k| self.backends.get(k)).map(|b| b.state.clone()).collect();
        Shared { state: s.state.clone(), cursor: s.cursor.clone(), backends }
    }

    /// Makes a service count into `shared`, which another loop's copy of the
    /// same service made with [`Services::shared`]: both then show the same
    /// counters and health. Backends are matched by position.
    pub fn share(&mut self, key: Key, shared: &Shared) {
        let Some(s) = self.services.get_mut(key) else { return };
        s.state = shared.state.clone();
        s.cursor = shared.cursor.clone();
        for (&k, state) in s.backends.iter().zip(&shared.backends) {
            if let Some(b) = self.backends.get_mut(k) {
                if !Arc::ptr_eq(&b.state, state) {
                    // A backend new to this loop has no pairs: downs before now are not its to cut.
                    b.seen_downs = state.downs.get();
                    b.state = state.clone();
                }
            }
        }
    }

    /// The timeouts new connections to the service get.
    pub fn limits(&self, key: Key) -> Limits {
        self.services.get(key).map_or_else(Limits::default, |s| s.limits)
    }

    /// Chooses a backend for a new client and takes a slot of it; an empty
    /// plan means none is available ([`Plan::is_full`] says whether only for now).
    pub fn plan(&mut self, key: Key) -> Plan {
        let mut plan = Plan { service: key, first: None, tried: Vec::new(), last: None, full: false };
        let Some(service) = self.services.get(key) else { return plan };
        let (backends, slots) = (&service.backends, &self.backends);
        let open = service.fails_open();
        let at = |i: usize| candidate(slots, backends[i], open);
        let chosen = service.cursor.pick(service.settings.balance, backends.len(), at).map(|i| backends[i]);
        match chosen {
            Some(b) if self.take_slot(b) => plan.first = Some(b),
            // Another loop took its last slot since the pick looked: on to the next, as after a failure.
            Some(b) => {
                plan.last = Some(b);
                plan.full = true;
                plan.first = self.next_target(&mut plan);
                plan.last = None;
            }
            None => plan.full = balance::any_eligible(backends.len(), at),
        }
        plan
    }

    /// The next backend of `plan` to try, its slot taken: the first choice,
    /// then failover candidates (skipping any found full meanwhile).
    pub fn next_target(&self, plan: &mut Plan) -> Option<Key> {
        if let Some(first) = plan.first.take() {
            plan.last = Some(first);
            return Some(first);
        }
        let service = self.services.get(plan.service)?;
        let backends = &service.backends;
        loop {
            if let Some(last) = plan.last {
                plan.tried.push(last);
            }
            // Where the failed backend stood; if an update removed it, go on from the start.
            let last = (plan.last.and_then(|k| backends.iter().position(|&b| b == k)))
                .unwrap_or(backends.len().saturating_sub(1));
            let tried = |i: usize| plan.tried.contains(&backends[i]);
            let open = service.fails_open();
            let at = |i: usize| candidate(&self.backends, backends[i], open);
            let next =
                balance::failover(service.settings.balance, last, backends.len(), at, tried).map(|i| backends[i]);
            plan.last = next;
            match next {
                Some(b) if !self.take_slot(b) => plan.full = true,
                next => return next,
            }
        }
    }

    /// Takes one slot of `backend`'s `max_connections` (one compare-and-swap); `false` when it is full.
    fn take_slot(&self, backend: Key) -> bool {
        self.backends.get(backend).is_some_and(|b| b.state.active.try_add_below(u64::from(b.config.max_connections)))
    }

    /// Gives back a slot taken by [`Services::plan`] or [`Services::next_target`].
    pub fn release_slot(&self, backend: Key) {
        if let Some(b) = self.backends.get(backend) {
            b.state.active.sub_one();
        }
    }

    /// Gives back the slot of a plan's first choice that was never handed out.
    pub fn abandon(&self, plan: &mut Plan) {
        if let Some(first) = plan.first.take() {
            self.release_slot(first);
        }
    }

    /// Counts a failed backend connect and feeds passive health; returns a transition to log.
    pub fn connect_failed(&mut self, backend: Key) -> Option<Transition> {
        let b = self.backends.get(backend)?;
        b.state.errors.add(1);
        b.state.connect_errors.add(1);
        let settings = self.services.get(b.service).map(|s| &s.settings);
        let fall = settings.map_or(1, |s| s.fall);
        let checked = settings.is_some_and(|s| config::seconds(s.check_interval).is_some());
        // Only backends that checks can bring back are marked down by traffic (reference §4 passive health).
        if checked && b.check_addr.is_some() {
            self.feed(backend, |h| h.record_connect_failure(fall))
        } else {
            None
        }
    }

    /// Feeds one health check's result to a backend; returns a transition to log.
    pub fn record_check(&self, backend: Key, passed: bool) -> Option<Transition> {
        let b = self.backends.get(backend)?;
        let s = self.services.get(b.service)?;
        let (rise, fall) = (s.settings.rise, s.settings.fall);
        self.feed(backend, |h| h.record_check(passed, rise, fall))
    }

    /// A service's counters and its backends', for an upgrade's manifest.
    pub fn counters_of(&self, key: Key) -> Option<ServiceCounters> {
        let s = self.services.get(key)?;
        let state = &s.state;
        let backends = s
            .backends
            .iter()
            .filter_map(|&b| self.backends.get(b))
            .map(|b| {
                let c = &b.state;
                BackendCounters {
                    backend: b.config.name.clone(),
                    bytes: [c.sent.get(), c.received.get()],
                    datagrams: [c.datagrams_sent.get(), c.datagrams_received.get()],
                    errors: [c.errors.get(), c.connect_errors.get()],
                    connections: c.connections.get(),
                    checks: [c.check_success.get(), c.check_fail.get()],
                }
            })
            .collect();
        let udp = &state.udp;
        Some(ServiceCounters {
            service: s.settings.name.clone(),
            errors: state.errors.get(),
            no_backend: state.no_backend.get(),
            proxy_header_errors: state.proxy_header_errors.get(),
            dropped: [udp.dropped_no_backend.get(), udp.dropped_flow_limit.get(), udp.dropped_send_error.get()],
            backends,
        })
    }

    /// Goes on from the counters of the process this one upgraded (reference
    /// §3.7): its totals are added to this process's. Backends are matched by name.
    pub fn carry_counters(&self, carried: &ServiceCounters) {
        let Some(key) = self.find(&carried.service) else { return };
        let Some(s) = self.services.get(key) else { return };
        let state = &s.state;
        state.errors.add(carried.errors);
        state.no_backend.add(carried.no_backend);
        state.proxy_header_errors.add(carried.proxy_header_errors);
        let udp = &state.udp;
        for (counter, n) in
            [&udp.dropped_no_backend, &udp.dropped_flow_limit, &udp.dropped_send_error].into_iter().zip(carried.dropped)
        {
            counter.add(n);
        }
        for b in &carried.backends {
            let Some(backend) = self.find_backend(key, &b.backend).and_then(|k| self.backends.get(k)) else { continue };
            let c = &backend.state;
            let pairs = [
                (&c.sent, b.bytes[0]),
                (&c.received, b.bytes[1]),
                (&c.datagrams_sent, b.datagrams[0]),
                (&c.datagrams_received, b.datagrams[1]),
                (&c.errors, b.errors[0]),
                (&c.connect_errors, b.errors[1]),
                (&c.connections, b.connections),
                (&c.check_success, b.checks[0]),
                (&c.check_fail, b.checks[1]),
            ];
            for (counter, n) in pairs {
                counter.add(n);
            }
        }
    }

    /// Marks a backend down that the process this one upgraded knew down (reference
    /// §3.7): not a transition seen here, so it neither counts as a down nor rings.
    pub fn carry_down(&self, backend: Key) {
        let Some(b) = self.backends.get(backend) else { return };
        let (transition, counted) = b.state.health.update_counting(Health::carried_down);
        let Some(s) = self.services.get(b.service).filter(|_| transition.is_some() && counted) else { return };
        s.tally_changed(s.state.tally.change(0, 1));
    }

    /// Marks a backend up because its checks were turned off; whether it was down.
    pub fn checks_off(&self, backend: Key) -> bool {
        let Some(b) = self.backends.get(backend) else { return false };
        let (transition, counted) = b.state.health.reset();
        self.moved(b, transition, counted);
        transition.is_some()
    }

    /// Applies `f` to a backend's health, keeping its service's tally and cuts in step.
    fn feed(&self, backend: Key, f: impl Fn(&mut Health) -> Option<Transition>) -> Option<Transition> {
        let b = self.backends.get(backend)?;
        let (transition, counted) = b.state.health.update_counting(f);
        self.moved(b, transition, counted);
        transition
    }

    /// What a health transition of `b` does beyond the backend: moves the
    /// tally (when it counts), and a backend gone down rings every loop to
    /// cut its pairs (when its service says so).
    fn moved(&self, b: &Backend, transition: Option<Transition>, counted: bool) {
        let Some(transition) = transition else { return };
        let Some(s) = self.services.get(b.service) else { return };
        if transition == Transition::WentDown {
            b.state.downs.add(1);
            if s.settings.on_backend_down == OnBackendDown::Close {
                self.bell.ring();
            }
        }
        if counted {
            let down = if transition == Transition::WentDown { 1 } else { -1 };
            s.tally_changed(s.state.tally.change(0, down));
        }
    }

    /// Makes the control loop's new backends count for fail-open and its
    /// removed ones stop counting. Only the loop that owns the health (the
    /// control loop) calls it, so each backend is counted once. Logs nothing:
    /// a config change says once whether it started or ended fail-open.
    pub fn enroll(&self, service: Key, added: &[Key], removed: &[Backend]) {
        let Some(s) = self.services.get(service) else { return };
        let added = added.iter().filter_map(|&k| self.backends.get(k));
        // Drained backends take no traffic, healthy or not: they count neither way.
        for (b, counted) in added.map(|b| (b, b.config.weight > 0)).chain(removed.iter().map(|b| (b, false))) {
            if let Some(down) = b.state.health.set_counted(counted) {
                let by = if counted { 1 } else { -1 };
                // The caller compares fail-open before and after the whole change, and logs that.
                let _ = s.state.tally.change(by, if down { by } else { 0 });
            }
        }
    }

    /// Whether the service balances over down backends now (fail-open).
    pub fn fail_open_active(&self, key: Key) -> bool {
        self.services.get(key).is_some_and(Service::fails_open)
    }

    /// The bell this loop's cuts ring; every loop of a process shares one.
    pub fn bell(&self) -> &Arc<Bell> {
        &self.bell
    }

    /// Makes this loop ring and hear `bell`.
    pub fn set_bell(&mut self, bell: Arc<Bell>) {
        self.bell = bell;
    }

    /// The backends of `on_backend_down: close` services marked down since
    /// this loop last looked, whose open pairs it must cut. A scan of this
    /// loop's backends, done only when the bell rang.
    pub fn cuts(&mut self) -> Vec<Key> {
        let mut cut = Vec::new();
        for (key, b) in self.backends.iter_mut() {
            let downs = b.state.downs.get();
            if downs == b.seen_downs {
                continue;
            }
            b.seen_downs = downs;
            let close =
                self.services.get(b.service).is_some_and(|s| s.settings.on_backend_down == OnBackendDown::Close);
            if close {
                cut.push(key);
            }
        }
        cut
    }

    /// Counts an established backend connection.
    pub fn connect_succeeded(&mut self, backend: Key) {
        if let Some(b) = self.backends.get(backend) {
            b.state.connections.add(1);
        }
        self.answered(backend);
    }

    /// Counts a new UDP flow: a connection, but not yet proof the backend is
    /// there (a UDP connect sends nothing; its first reply is the proof).
    pub fn flow_opened(&self, backend: Key) {
        if let Some(b) = self.backends.get(backend) {
            b.state.connections.add(1);
        }
    }

    /// The backend answered: ends a run of passive failures.
    pub fn answered(&self, backend: Key) {
        if let Some(b) = self.backends.get(backend) {
            // A plain load unless a run of failures is open: no store per connection.
            let health = b.state.health.get();
            if health != health.after_connect_success() {
                b.state.health.update(|h| {
                    h.record_connect_success();
                    None
                });
            }
        }
    }

    /// The `service`'s and `backend`'s names, for logs.
    pub fn names(&self, backend: Key) -> (&str, &str) {
        match self.backends.get(backend) {
            Some(b) => (self.services.get(b.service).map_or("?", |s| s.settings.name.as_str()), b.config.name.as_str()),
            None => ("?", "?"),
        }
    }

    /// The full config of one service, as `GET /_config` shows it.
    pub fn config(&self, key: Key) -> Option<ServiceConfig> {
        let s = self.services.get(key)?;
        let mut config = s.settings.clone();
        config.backends = s.backends.iter().filter_map(|&k| self.backends.get(k)).map(|b| b.config.clone()).collect();
        Some(config)
    }

    /// Every service's config, sorted by name.
    pub fn configs(&self) -> Vec<ServiceConfig> {
        self.keys().filter_map(|k| self.config(k)).collect()
    }

    /// A backend's stats object (reference §5): its config, then its state and counters.
    pub fn backend_stats(&self, key: Key) -> Option<Stats> {
        let b = self.backends.get(key)?;
        let c = b.state.counters();
        let mut fields = config_fields(&b.config, BACKEND_FIELDS);
        fields.push(("up".into(), Stats::Field(json!(b.state.health.is_up()))));
        fields.extend(counter_fields(&[
            ("sent", c.sent),
            ("received", c.received),
            ("errors", c.errors),
            ("connections", c.connections),
            ("active", c.active),
            ("check_success", c.check_success),
            ("check_fail", c.check_fail),
        ]));
        if self.services.get(b.service).is_some_and(|s| s.settings.protocol == config::Protocol::Udp) {
            fields.extend(counter_fields(&[
                ("datagrams_sent", b.state.datagrams_sent.get()),
                ("datagrams_received", b.state.datagrams_received.get()),
            ]));
        }
        // null until a first check has ended (and for a backend never checked).
        let last = b.last_check.as_ref();
        let at = last.map_or(Value::Null, |l| json!(crate::runtime::utc::rfc3339(l.at)));
        let result = last.map_or(Value::Null, |l| json!(if l.error.is_none() { "passed" } else { "failed" }));
        let error = last.and_then(|l| l.error.clone()).map_or(Value::Null, Value::from);
        fields.push(("last_check".into(), Stats::Field(at)));
        fields.push(("last_check_result".into(), Stats::Field(result)));
        fields.push(("last_error".into(), Stats::Field(error)));
        Some(Stats::Object(fields))
    }

    /// A service's stats object: its settings, summed counters and its backends' stats (reference §5).
    pub fn service_stats(&self, key: Key) -> Option<Stats> {
        let s = self.services.get(key)?;
        let mut sum = Counters { errors: s.state.errors.get(), ..Counters::default() };
        for b in s.backends.iter().filter_map(|&k| self.backends.get(k)) {
            let c = b.state.counters();
            sum.sent += c.sent;
            sum.received += c.received;
            sum.errors += c.errors;
            sum.connections += c.connections;
            sum.active += c.active;
        }
        let mut fields = config_fields(&s.settings, SERVICE_FIELDS);
        fields.extend(counter_fields(&[
            ("sent", sum.sent),
            ("received", sum.received),
            ("errors", sum.errors),
            ("connections", sum.connections),
            ("active", sum.active),
            ("queued", s.state.gate.queued.get()),
            ("queue_timeouts", s.state.gate.queue_timeouts.get()),
            ("proxy_header_errors", s.state.proxy_header_errors.get()),
        ]));
        fields.push(("fail_open_active".into(), Stats::Field(json!(s.fails_open()))));
        if s.settings.protocol == config::Protocol::Udp {
            let udp = &s.state.udp;
            let datagrams =
                |f: fn(&Backend) -> u64| s.backends.iter().filter_map(|&k| self.backends.get(k)).map(f).sum();
            fields.extend(counter_fields(&[
                ("flows", udp.flows.get()),
                ("datagrams_sent", datagrams(|b| b.state.datagrams_sent.get())),
                ("datagrams_received", datagrams(|b| b.state.datagrams_received.get())),
                ("dropped_no_backend", udp.dropped_no_backend.get()),
                ("dropped_flow_limit", udp.dropped_flow_limit.get()),
                ("dropped_send_error", udp.dropped_send_error.get()),
            ]));
        }
        let backends = s.backends.iter().filter_map(|&k| self.backend_stats(k)).collect();
        fields.push(("backends".into(), Stats::List(backends)));
        Some(Stats::Object(fields))
    }
}

/// Config fields in the order the config file shows them (stats lead with them).
const SERVICE_FIELDS: &[&str] = &[
    "name",
    "address",
    "balance",
    "check_interval",
    "fall",
    "rise",
    "client_timeout",
    "server_timeout",
    "connect_timeout",
    "check_send",
    "check_expect",
    "max_connections",
    "max_queue",
    "queue_timeout",
    "accept_proxy",
    "fail_open",
    "on_backend_down",
    "max_connection_duration",
    "protocol",
    "udp_idle_timeout",
    "udp_max_responses",
    "max_flows",
    "socket_mode",
];
const BACKEND_FIELDS: &[&str] = &["name", "address", "check_address", "weight", "max_connections", "send_proxy"];

/// A stats document whose objects keep their keys in a reading order (serde_json's
/// own objects are sorted), so config fields come first and counters after.
#[derive(Debug, Clone, PartialEq)]
pub enum Stats {
    /// A plain JSON value.
    Field(Value),
    /// An object, keys in order.
    Object(Vec<(String, Stats)>),
    /// A list.
    List(Vec<Stats>),
}

impl serde::Serialize for Stats {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Stats::Field(value) => value.serialize(serializer),
            Stats::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (key, value) in fields {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
            Stats::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
        }
    }
}

/// The config's fields in `order`, then any the order list does not know (never dropped).
fn config_fields<T: serde::Serialize>(config: &T, order: &[&str]) -> Vec<(String, Stats)> {
    let mut map = to_object(config);
    map.remove("backends");
    let mut fields: Vec<(String, Stats)> =
        order.iter().filter_map(|&k| map.remove(k).map(|v| (k.to_owned(), Stats::Field(v)))).collect();
    fields.extend(map.into_iter().map(|(k, v)| (k, Stats::Field(v))));
    fields
}

fn counter_fields(counters: &[(&str, u64)]) -> Vec<(String, Stats)> {
    counters.iter().map(|&(name, value)| (name.to_owned(), Stats::Field(json!(value)))).collect()
}

fn to_object<T: serde::Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(backends: &[(&str, u16)]) -> Prepared {
        let mut config = ServiceConfig::new("web", "127.0.0.1:0");
        for &(name, port) in backends {
            let mut b = BackendConfig::new(name, format!("127.0.0.1:{port}"));
            b.weight = 1;
            config.backends.push(b);
        }
        prepare(config, &Lookups::new()).unwrap()
    }

    fn prepared(name: &str, address: &str, backend: &str) -> Prepared {
        let config =
            ServiceConfig { backends: vec![BackendConfig::new("b", backend)], ..ServiceConfig::new(name, address) };
        let mut lookups = Lookups::new();
        lookups.insert("localhost".into(), Ok(std::net::IpAddr::from([127, 0, 0, 1])));
        prepare(config, &lookups).unwrap()
    }

    #[test]
    fn backends_that_reach_a_listener_or_the_admin_api_are_loops() {
        let one = |a: &str, b: &str| check_all(&[prepared("a", a, b)], None);
        let same = one("127.0.0.1:8080", "127.0.0.1:8080").unwrap_err();
        let expected = "address: 127.0.0.1:8080 reaches 127.0.0.1:8080, where service \"a\" listens; it would loop";
        assert_eq!(same, format!("service \"a\": backend \"b\": {expected}"));
        let other = [prepared("a", "0.0.0.0:8080", "127.0.0.1:1"), prepared("c", "0.0.0.0:8081", "localhost:8080")];
        assert!(check_all(&other, None)
            .unwrap_err()
            .starts_with("service \"c\": backend \"b\": address: 127.0.0.1:8080 reaches 0.0.0.0:8080"));
        assert!(one("127.0.0.1:8080", "0.0.0.0:8080").is_err());
        assert!(one("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080").is_err(), "v4-mapped is the v4 address");
        assert!(one("127.0.0.1:8080", "127.0.0.1:8081").is_ok());
        assert!(one("127.0.0.1:8080", "127.0.0.2:8080").is_ok());
        assert!(one("0.0.0.0:8080", "192.0.2.1:8080").is_ok()); // TEST-NET-1: not local
        assert!(one("127.0.0.1:0", "127.0.0.1:0").is_ok());
        let admin = "127.0.0.1:9090".parse().ok();
        let to_admin = check_all(&[prepared("a", "127.0.0.1:80", "[::ffff:127.0.0.1]:9090")], admin).unwrap_err();
        assert!(to_admin.ends_with("where the admin API listens"), "{to_admin}");
        let clash = check_all(
            &[prepared("a", "127.0.0.1:80", "127.0.0.1:1"), prepared("b", "0.0.0.0:80", "127.0.0.1:1")],
            None,
        );
        assert!(clash.unwrap_err().contains("conflicts with 127.0.0.1:80"));
    }

    #[test]
    fn unchanged_backends_keep_their_keys_and_counters() {
        let mut services = Services::default();
        let (key, added) = services.insert(service(&[("a", 1), ("b", 2)]));
        assert_eq!(added.len(), 2);
        services.backend(added[0]).unwrap().state.sent.add(42);
        let changes = services.replace(key, service(&[("b", 3), ("a", 1), ("c", 4)]));
        assert_eq!(changes.added.len(), 2, "b changed address and c is new");
        assert_eq!(changes.removed.len(), 1);
        assert_eq!(changes.removed[0].config.address, "127.0.0.1:2");
        let a = services.find_backend(key, "a").unwrap();
        assert_eq!(a, added[0]);
        assert_eq!(services.backend(a).unwrap().state.counters().sent, 42);
        let names: Vec<_> = services.config(key).unwrap().backends.into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["b", "a", "c"]);
    }

    #[test]
    fn a_stale_backend_key_counts_nothing() {
        let mut services = Services::default();
        let (key, added) = services.insert(service(&[("a", 1)]));
        services.set_backends(key, Vec::new(), Vec::new());
        assert_eq!(services.connect_failed(added[0]), None);
        services.connect_succeeded(added[0]);
        assert!(services.backend(added[0]).is_none());
    }

    #[test]
    fn plan_lists_every_up_backend_once() {
        let mut services = Services::default();
        let (key, added) = services.insert(service(&[("a", 1), ("b", 2), ("c", 3)]));
        let mut plan = services.plan(key);
        let got: Vec<_> = std::iter::from_fn(|| services.next_target(&mut plan)).collect();
        assert_eq!(got, added);
    }

    #[test]
    fn a_plan_takes_a_slot_skips_full_backends_and_tells_full_from_down() {
        let mut services = Services::default();
        let mut prepared = service(&[("a", 1), ("b", 2)]);
        prepared.config.backends[0].max_connections = 1;
        prepared.config.backends[1].max_connections = 1;
        let (key, added) = services.insert(prepared);
        let active = |s: &Services, i: usize| s.backend(added[i]).unwrap().state.active.get();
        let mut first = services.plan(key);
        assert_eq!(services.next_target(&mut first), Some(added[0]));
        assert_eq!(active(&services, 0), 1, "the slot is taken with the pick");
        let mut second = services.plan(key);
        assert_eq!(services.next_target(&mut second), Some(added[1]));
        let third = services.plan(key);
        assert!(third.is_full(), "every backend is at its limit: the client may wait");
        services.release_slot(added[0]);
        // Taken behind the balancer's back (another loop): the pick moves on instead of passing the limit.
        let mut raced = services.plan(key);
        assert_eq!(services.next_target(&mut raced), Some(added[0]));
        services.abandon(&mut raced);
        assert_eq!(active(&services, 0), 1, "a handed-out slot is the caller's to give back");
        services.release_slot(added[0]);
        let mut unused = services.plan(key);
        services.abandon(&mut unused);
        assert_eq!((active(&services, 0), active(&services, 1)), (0, 1), "an unused pick gives its slot back");
        let down = |s: &Services, i: usize| {
            s.backend(added[i]).unwrap().state.health.update(|h| {
                h.record_check(false, 2, 2);
                h.record_check(false, 2, 2)
            })
        };
        down(&services, 0);
        assert!(services.plan(key).is_full(), "a is down, but b is up and full: wait for b");
        down(&services, 1);
        let none = services.plan(key);
        assert!(none.is_empty() && !none.is_full(), "none up: nothing to wait for");
    }

    #[test]
    fn a_new_limit_alone_keeps_the_backend_and_its_count() {
        let mut services = Services::default();
        let (key, added) = services.insert(service(&[("a", 1)]));
        services.backend(added[0]).unwrap().state.active.add(3);
        let mut lowered = service(&[("a", 1)]);
        lowered.config.backends[0].max_connections = 1;
        let changes = services.set_backends(key, lowered.config.backends, lowered.backend_addrs);
        assert!(changes.added.is_empty() && changes.removed.is_empty());
        let b = services.backend(added[0]).unwrap();
        assert_eq!((b.config.max_connections, b.state.active.get()), (1, 3));
    }

    #[test]
    fn stats_sum_backend_counters_and_service_errors() {
        let mut services = Services::default();
        let (key, added) = services.insert(service(&[("a", 1), ("b", 2)]));
        services.backend(added[0]).unwrap().state.sent.add(5);
        services.backend(added[1]).unwrap().state.sent.add(7);
        services.service(key).unwrap().state.errors.add(3);
        services.connect_failed(added[1]);
        let stats = serde_json::to_value(services.service_stats(key).unwrap()).unwrap();
        assert_eq!(stats["sent"], 12);
        assert_eq!(stats["errors"], 4);
        assert_eq!(stats["backends"][1]["errors"], 1);
        assert_eq!(stats["backends"][0]["up"], true);
        assert_eq!(stats["address"], "127.0.0.1:0");
    }

    #[test]
    fn stats_lead_with_every_config_field_in_file_order() {
        let mut services = Services::default();
        let (key, _) = services.insert(service(&[("a", 1)]));
        let text = serde_json::to_string(&services.service_stats(key).unwrap()).unwrap();
        assert!(text.starts_with(r#"{"name":"web","address":"127.0.0.1:0","balance":"RR""#), "{text}");
        assert!(text.contains(
            r#""backends":[{"name":"a","address":"127.0.0.1:1","check_address":"","weight":1,"max_connections":0,"send_proxy":"","up":true"#
        ));
        let config = serde_json::to_value(services.config(key).unwrap()).unwrap();
        let known: Vec<&str> = SERVICE_FIELDS.iter().chain(["backends"].iter()).copied().collect();
        for field in config.as_object().unwrap().keys() {
            assert!(known.contains(&field.as_str()), "SERVICE_FIELDS lacks {field}");
        }
        for field in config["backends"][0].as_object().unwrap().keys() {
            assert!(BACKEND_FIELDS.contains(&field.as_str()), "BACKEND_FIELDS lacks {field}");
        }
    }
}

#[cfg(test)]
mod carried {
    use super::*;

    fn web() -> Prepared {
        let mut config = ServiceConfig::new("web", "127.0.0.1:0");
        for name in ["a", "b"] {
            config.backends.push(BackendConfig::new(name, "127.0.0.1:9"));
        }
        prepare(config, &Lookups::new()).unwrap()
    }

    #[test]
    fn counters_carried_to_another_process_add_up_by_name() {
        let mut old = Services::default();
        let (key, backends) = old.insert(web());
        let a = &old.backend(backends[0]).unwrap().state;
        a.sent.add(10);
        a.received.add(20);
        a.connections.add(3);
        a.check_fail.add(1);
        old.service(key).unwrap().state.no_backend.add(4);
        let carried = old.counters_of(key).unwrap();

        let mut new = Services::default();
        let (key, backends) = new.insert(web());
        new.backend(backends[0]).unwrap().state.sent.add(1);
        new.carry_counters(&carried);
        let a = new.backend(backends[0]).unwrap().state.counters();
        assert_eq!((a.sent, a.received, a.connections, a.check_fail), (11, 20, 3, 1));
        assert_eq!(new.backend(backends[1]).unwrap().state.counters(), Counters::default());
        assert_eq!(new.service(key).unwrap().state.no_backend.get(), 4);
        // A backend or service the new config lacks is skipped, not an error.
        let mut other = carried.clone();
        other.backends[0].backend = "gone".into();
        new.carry_counters(&other);
        other.service = "gone".into();
        new.carry_counters(&other);
        assert_eq!(new.backend(backends[0]).unwrap().state.counters().sent, 11);
    }

    #[test]
    fn a_backend_carried_down_starts_down_and_counts_in_the_tally_once() {
        let mut services = Services::default();
        let (key, backends) = services.insert(web());
        services.enroll(key, &backends, &[]);
        services.carry_down(backends[0]);
        services.carry_down(backends[0]);
        assert!(!services.backend(backends[0]).unwrap().state.health.is_up());
        assert_eq!(services.service(key).unwrap().state.tally.counts(), (2, 1));
        assert_eq!(services.backend(backends[0]).unwrap().state.downs.get(), 0, "not a transition seen here");
    }
}
