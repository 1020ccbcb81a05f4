//! Accepting: service listeners hand clients to new pairs, the admin listener
//! to admin connections. Both accept in bounded batches, and both rest
//! instead of spinning or stalling when descriptors run short (DESIGN
//! pitfall 5): a service listener also pauses before pairs would exhaust the
//! fd limit, so clients wait in the listen queue rather than being accepted
//! and dropped.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use log::{debug, info, warn};

use super::{Cx, Entry, Server, ACCEPT_BATCH, ACCEPT_PAUSE, FIXED_FDS, MAX_ADMIN_CONNS};
use crate::control::admin::AdminConn;
use crate::data::proxy::{Fault, Pair};
use crate::runtime::key::Key;
use crate::runtime::net::{self, AcceptError};

impl Server {
    /// Whether one more pair (two descriptors) fits under the fd limit. Like
    /// HAProxy's maxconn, this keeps clients waiting in the listen queue
    /// instead of accepting them only to fail their backend connect.
    fn has_fds_for_a_pair(&self) -> bool {
        // A pair holds two descriptors, a listener or admin client one; idle probes
        // hold none (a check in flight borrows one from the slack, with stdio,
        // epoll and the signal pipe).
        let listeners = self.services.len() + 1;
        let in_use = (2 * self.pairs + self.admin_conns + listeners) as u64 + FIXED_FDS;
        in_use + 2 <= self.options.fd_limit
    }

    pub(super) fn accept(&mut self, key: Key, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            if !self.has_fds_for_a_pair() {
                let full = io::Error::other(format!(
                    "{} connections fill the file descriptor limit of {}",
                    self.pairs, self.options.fd_limit
                ));
                return self.pause(key, &full, now);
            }
            let Some(Entry::Listener(listener)) = self.entries.get_mut(key) else { return };
            match listener.socket.accept() {
                Ok((stream, peer)) => {
                    let service = listener.service;
                    if let Err(shortage) = self.start_pair(service, stream, peer, now) {
                        return self.pause(key, &shortage, now);
                    }
                    if let Some(Entry::Listener(listener)) = self.entries.get_mut(key) {
                        if let Some(since) = listener.short_since.take() {
                            info!("accepting again after {} ms short of resources", since.elapsed().as_millis());
                        }
                    }
                }
                Err(e) => match net::classify_accept(&e) {
                    AcceptError::Drained => return,
                    AcceptError::Skip => debug!("accept failed: {e}"),
                    AcceptError::Exhausted => return self.pause(key, &e, now),
                },
            }
        }
        // Batch spent with connections possibly still queued: come back after others had a turn.
        self.enqueue(key);
    }

    /// Rests a listener that ran short of fds (or memory, or ports). Edge-triggered,
    /// its queued connections would stall it until a new client came, so it is
    /// retried after a pause, or sooner when a pair closes (pitfall 5).
    fn pause(&mut self, key: Key, why: &io::Error, now: Instant) {
        let Some(Entry::Listener(listener)) = self.entries.get_mut(key) else { return };
        if listener.short_since.is_none() {
            listener.short_since = Some(now);
            let name = self.services.service(listener.service).map_or("?", |s| s.settings.name.as_str());
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

    /// Starts proxying an accepted client; an error is a local shortage that should pause accepting.
    fn start_pair(
        &mut self,
        service: Key,
        stream: mio::net::TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<(), io::Error> {
        let plan = self.services.plan(service);
        if plan.is_empty() {
            if let Some(s) = self.services.service_mut(service) {
                s.errors += 1;
                debug!("{}: no backend available for {peer}; closing", s.settings.name);
            }
            net::close_gently(&stream);
            return Ok(());
        }
        let Server { poll, entries, timers, services, pool, .. } = self;
        let mut cx = Cx { now, registry: poll.registry(), timers, services, pool };
        let opened = entries.try_insert_with(|key| Pair::open(key, stream, service, plan, &mut cx).map(Entry::Pair));
        let name = self.services.service(service).map_or("?", |s| s.settings.name.as_str());
        match opened {
            Ok(key) => {
                self.pairs += 1;
                debug!("{name}: {key} accepted {peer}");
                Ok(())
            }
            Err(Fault::Local(e)) => {
                debug!("{name}: {peer}: closing: {e}");
                if let Some(s) = self.services.service_mut(service) {
                    s.errors += 1;
                }
                Err(e)
            }
            Err(fault) => {
                debug!("{name}: {peer}: {fault}");
                Ok(())
            }
        }
    }

    pub(super) fn accept_admin(&mut self, key: Key, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let Some(Entry::AdminListener(listener)) = self.entries.get(key) else { return };
            match listener.accept() {
                Ok(stream) => {
                    // Bounded, so idle admin clients can't take the fds proxying needs;
                    // at the bound the oldest idle one makes room for the newcomer.
                    if self.admin_conns >= MAX_ADMIN_CONNS && !self.evict_idle_admin() {
                        debug!("admin: {MAX_ADMIN_CONNS} connections busy; closing a new one");
                        continue;
                    }
                    let Server { poll, entries, timers, .. } = self;
                    let registry = poll.registry();
                    let made = entries
                        .try_insert_with(|conn| AdminConn::new(conn, stream, registry, now, timers).map(Entry::Admin));
                    match made {
                        Ok(conn) => {
                            self.admin_conns += 1;
                            self.admin_order.push_back(conn);
                        }
                        Err(e) => warn!("admin: cannot register a connection: {e}"),
                    }
                    self.admin_short = false;
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

    /// Closes the oldest admin connection that waits for a request with nothing
    /// received; `false` if every one is busy.
    fn evict_idle_admin(&mut self) -> bool {
        self.admin_order.retain(|&k| matches!(self.entries.get(k), Some(Entry::Admin(_))));
        let idle =
            self.admin_order.iter().position(|&k| matches!(self.entries.get(k), Some(Entry::Admin(c)) if c.is_idle()));
        let Some(key) = idle.and_then(|i| self.admin_order.remove(i)) else { return false };
        debug!("admin: {MAX_ADMIN_CONNS} connections open; closing the oldest idle one");
        self.remove_entry(key);
        true
    }
}
