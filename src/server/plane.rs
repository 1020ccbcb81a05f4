//! What the admin routes may do to the loop (`api::Plane`): read the running
//! services, stage a listener, and apply a prepared change: listeners,
//! probes and services, in the order that never drops a connection.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use log::info;

use super::{Entry, Server};
use crate::control::api::{Plane, Staged};
use crate::model::config;
use crate::model::health::Health;
use crate::model::service::{Prepared, Services};
use crate::runtime::key::Key;
use crate::runtime::net;

impl Plane for Server {
    fn services(&self) -> &Services {
        &self.services
    }

    fn bound(&self) -> Vec<(Option<Key>, SocketAddr)> {
        let listeners = self.entries.iter().filter_map(|(_, e)| match e {
            Entry::Listener(l) => Some((l.service, l.socket.local_addr().ok()?)),
            _ => None,
        });
        listeners.collect()
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    fn stage_listener(&mut self, addr: SocketAddr) -> io::Result<Staged> {
        let socket = net::bind(addr)?;
        let local = socket.local_addr()?;
        let listener = self.stage(socket)?;
        Ok(Staged { listener, local })
    }

    fn unstage(&mut self, staged: Staged) {
        self.remove_entry(staged.listener);
    }

    fn add_service(&mut self, prepared: Prepared, listener: Staged, now: Instant) {
        self.commit_service(prepared, listener.listener, now);
    }

    fn replace_service(&mut self, key: Key, prepared: Prepared, listener: Option<Staged>, now: Instant) {
        let changes = self.services.replace(key, prepared);
        for removed in changes.removed {
            if let Some(probe) = removed.probe {
                self.remove_entry(probe);
            }
        }
        if let Some(staged) = listener {
            self.adopt_listener(key, staged.listener, now);
        }
        self.reconcile_probes(key, now);
    }

    fn set_backends(&mut self, key: Key, prepared: Prepared, now: Instant) {
        let Prepared { config, backend_addrs, .. } = prepared;
        let changes = self.services.set_backends(key, config.backends, backend_addrs);
        for removed in changes.removed {
            if let Some(probe) = removed.probe {
                self.remove_entry(probe);
            }
        }
        self.reconcile_probes(key, now);
    }

    fn remove_service(&mut self, key: Key, now: Instant) {
        // Hidden at once (its name may be taken again right away), but kept
        // while its listener serves the clients already queued there.
        let Some(backends) = self.services.retire(key).map(|s| s.backends.clone()) else { return };
        let probes: Vec<Key> = backends.iter().filter_map(|&b| self.services.backend(b)?.probe).collect();
        for probe in probes {
            self.remove_entry(probe);
        }
        match self.services.service(key).and_then(|s| s.listener) {
            Some(listener) => self.retire_listener(listener, now),
            None => drop(self.services.remove(key)),
        }
    }
}

impl Server {
    /// Starts or stops probes so that exactly the checked backends of a checking
    /// service have one. A backend left without checks is up: nothing could ever
    /// bring it back otherwise.
    pub(crate) fn reconcile_probes(&mut self, service: Key, now: Instant) {
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
                if !b.health.is_up() {
                    b.health = Health::default();
                    info!("{name}/{} is up: health checks are off", b.config.name);
                }
            }
        }
    }
}
