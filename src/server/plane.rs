//! What the admin routes may do to the loop (`api::Plane`): read the running
//! services, stage a listener, and apply a prepared change: listeners,
//! probes and services, in the order that never drops a connection.
//!
//! The same calls drive one loop or several: the control loop of workers
//! applies a change to its own services (config, stats, probes), then sends
//! it on to every worker (`workers.rs`), which applies it through these very
//! calls to its copy (listeners and pairs).

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use log::info;

use super::workers::Op;
use super::{Entry, Server};
use crate::control::api::{Plane, Staged};
use crate::control::info::Info;
use crate::control::metrics::Process;
use crate::data::finished::End;
use crate::data::proxy::Cut;
use crate::model::config::{self, ServiceConfig};
use crate::model::endpoint::Endpoint;
use crate::model::service::{BackendChanges, Prepared, Services};
use crate::runtime::key::Key;
use crate::runtime::listen::StreamListener;

impl Plane for Server {
    fn services(&self) -> &Services {
        &self.services
    }

    fn bound(&self) -> Vec<(Option<Key>, Endpoint)> {
        let listeners = self.entries.iter().filter_map(|(_, e)| match e {
            Entry::Listener(l) => Some((l.service, l.socket.local_addr().ok()?)),
            Entry::Datagrams(d) => Some((d.service, Endpoint::Inet(d.socket.local_addr().ok()?))),
            Entry::Group(g) => Some((g.service, g.local.clone())),
            _ => None,
        });
        listeners.collect()
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    fn stage_listener(&mut self, addr: &Endpoint, settings: &ServiceConfig) -> io::Result<Staged> {
        if let Some(n) = self.workers().map(|w| w.len()) {
            return self.stage_group(addr, n, settings);
        }
        let socket = super::bind::bind_any(addr, 1, settings)?.pop().ok_or(io::ErrorKind::AddrNotAvailable)?;
        let local = socket.local_addr()?;
        let listener = self.stage_bound(socket)?;
        Ok(Staged { listener, local })
    }

    fn unstage(&mut self, staged: Staged) {
        self.remove_entry(staged.listener);
    }

    fn info(&self) -> Info {
        let services = self.services.len();
        let backends = self.services.keys().filter_map(|k| self.services.service(k)).map(|s| s.backends.len()).sum();
        let workers = self.workers().map_or(1, |w| w.len());
        let flows =
            self.services.keys().filter_map(|k| self.services.service(k)).map(|s| s.state.udp.flows.get()).sum();
        let open = crate::control::info::Open { connections: self.fds.process_pairs(), flows };
        Info::new(self.started, Instant::now(), workers, services, backends, open)
    }

    fn process(&self) -> Process<'_> {
        Process {
            started: self.started.wall,
            workers: self.workers().map_or(1, |w| w.len()),
            active: self.fds.process_pairs(),
            max_fds: self.fds.limit(),
            admin: &self.admin_statuses,
            access_log: self.access_log.counts(),
        }
    }

    fn settled(&self) -> bool {
        self.workers().is_none_or(|w| w.settled())
    }

    fn add_service(&mut self, prepared: Prepared, listener: Staged, now: Instant) {
        if self.workers().is_none() {
            self.commit_service(prepared, listener.listener, now);
            return;
        }
        let (key, backends) = self.services.insert(prepared.clone());
        self.services.enroll(key, &backends, &[]);
        let sockets = self.adopt_group(key, listener);
        for backend in backends {
            self.start_probe(backend, now);
        }
        let shared = self.services.shared(key);
        let ops = sockets.into_iter().flatten().map(|socket| Op::Add {
            prepared: prepared.clone(),
            socket,
            shared: shared.clone(),
        });
        self.send(ops.collect());
    }

    fn replace_service(&mut self, key: Key, prepared: Prepared, listener: Option<Staged>, now: Instant) {
        let fan_out = self.workers().map(|_| prepared.clone());
        let was = self.services.fail_open_active(key);
        let changes = self.services.replace(key, prepared);
        self.enroll(key, &changes, was);
        for removed in changes.removed {
            if let Some(probe) = removed.probe {
                self.remove_entry(probe);
            }
        }
        // New limits may make room: held listeners and queue heads look again.
        self.on_slots();
        let Some(prepared) = fan_out else {
            match listener {
                Some(staged) => self.adopt_listener(key, staged.listener, now),
                None => self.refresh_socket_mode(key),
            }
            return self.reconcile_probes(key, now);
        };
        let sockets = match listener {
            Some(staged) => self.adopt_group(key, staged),
            None => (0..self.workers().map_or(0, |w| w.len())).map(|_| None).collect(),
        };
        self.reconcile_probes(key, now);
        let shared = self.services.shared(key);
        let ops = sockets.into_iter().map(|socket| Op::Replace {
            prepared: prepared.clone(),
            socket,
            shared: shared.clone(),
        });
        self.send(ops.collect());
    }

    fn set_backends(&mut self, key: Key, prepared: Prepared, now: Instant) {
        let fan_out = self.workers().map(|_| prepared.clone());
        let Prepared { config, backend_addrs, .. } = prepared;
        let was = self.services.fail_open_active(key);
        let changes = self.services.set_backends(key, config.backends, backend_addrs);
        self.on_slots();
        self.enroll(key, &changes, was);
        for removed in changes.removed {
            if let Some(probe) = removed.probe {
                self.remove_entry(probe);
            }
        }
        self.reconcile_probes(key, now);
        if let Some(prepared) = fan_out {
            let shared = self.services.shared(key);
            let n = self.workers().map_or(0, |w| w.len());
            self.send((0..n).map(|_| Op::Backends { prepared: prepared.clone(), shared: shared.clone() }).collect());
        }
    }

    fn cut(&mut self, key: Key, backend: Option<&str>, now: Instant) {
        if let Some(n) = self.workers().map(|w| w.len()) {
            // The pairs are the workers'; each cuts its own.
            let Some(service) = self.services.service(key).map(|s| s.settings.name.clone()) else { return };
            let backend = backend.map(str::to_string);
            return self.send((0..n).map(|_| Op::Cut { service: service.clone(), backend: backend.clone() }).collect());
        }
        match backend {
            Some(name) => {
                let Some(target) = self.services.find_backend(key, name) else { return };
                self.cut_pairs(|pair| pair.target() == target, Cut::BackendRemoved, now);
                self.close_flows(|flow| flow.backend == target, End::BackendRemoved);
            }
            None => {
                self.cut_pairs(|pair| pair.service() == key, Cut::ServiceRemoved, now);
                self.close_flows(|flow| flow.service == key, End::ServiceRemoved);
            }
        }
    }

    fn remove_service(&mut self, key: Key, now: Instant) {
        // Hidden at once (its name may be taken again right away), but kept
        // while its listener serves the clients already queued there.
        let Some(backends) = self.services.retire(key).map(|s| s.backends.clone()) else { return };
        let probes: Vec<Key> = backends.iter().filter_map(|&b| self.services.backend(b)?.probe).collect();
        for probe in probes {
            self.remove_entry(probe);
        }
        if let Some(n) = self.workers().map(|w| w.len()) {
            // Each worker retires its own listener; here only the record goes.
            let name = self.services.service(key).map(|s| s.settings.name.clone()).unwrap_or_default();
            if let Some(group) = self.services.service(key).and_then(|s| s.listener) {
                self.remove_entry(group);
            }
            drop(self.services.remove(key));
            return self.send((0..n).map(|_| Op::Remove { name: name.clone() }).collect());
        }
        match self.services.service(key).and_then(|s| s.listener) {
            Some(listener) => self.retire_listener(listener, now),
            None => drop(self.services.remove(key)),
        }
    }
}

impl Server {
    /// A unix listener kept through a change takes the service's `socket_mode`
    /// now (every worker holding a duplicate sets the same bits).
    fn refresh_socket_mode(&self, key: Key) {
        let Some(s) = self.services.service(key) else { return };
        let Some(Entry::Listener(l)) = s.listener.and_then(|k| self.entries.get(k)) else { return };
        if let (StreamListener::Unix(_, file), Ok(mode)) =
            (&l.socket, config::socket_mode_bits(&s.settings.socket_mode))
        {
            if let Err(e) = file.set_mode(mode) {
                log::warn!("{}: cannot set socket_mode {:o} on {}: {e}", s.settings.name, mode, file.path().display());
            }
        }
    }

    /// On the loop that owns health (the control loop): counts a change's new
    /// backends for fail-open and stops counting its removed ones, then logs
    /// whether the change started or ended fail-open (`was` is before it).
    fn enroll(&self, key: Key, changes: &BackendChanges, was: bool) {
        if !self.hosts_probes() {
            return;
        }
        self.services.enroll(key, &changes.added, &changes.removed);
        let is = self.services.fail_open_active(key);
        if let Some(s) = self.services.service(key).filter(|_| is != was) {
            s.log_fail_open(is);
        }
    }

    fn send(&mut self, ops: Vec<Op>) {
        if let Some(workers) = self.workers_mut() {
            workers.send(ops);
        }
    }

    /// Starts or stops probes so that exactly the checked backends of a checking
    /// service have one. A backend left without checks is up: nothing could ever
    /// bring it back otherwise.
    pub(crate) fn reconcile_probes(&mut self, service: Key, now: Instant) {
        // Workers of several leave health to the control loop, whose state they share.
        if !self.hosts_probes() {
            return;
        }
        let Some(s) = self.services.service(service) else { return };
        let checks = config::seconds(s.settings.check_interval).is_some();
        let name = s.settings.name.clone();
        for backend in s.backends.clone() {
            let Some(b) = self.services.backend(backend) else { continue };
            let want = checks && b.check_addr.is_some();
            let have = b.probe.filter(|&p| matches!(self.entries.get(p), Some(Entry::Probe(_))));
            match (want, have) {
                (true, None) => self.start_probe(backend, now),
                (false, Some(probe)) => self.remove_entry(probe),
                _ => {}
            }
            if let Some(b) = self.services.backend_mut(backend).filter(|_| !want) {
                b.probe = None;
                if self.services.checks_off(backend) {
                    let backend = self.services.names(backend).1;
                    info!("{name}/{backend} is up: health checks are off");
                }
            }
        }
    }
}
