//! Closing a listener without resetting the clients in its accept queue
//! (reference §3: open connections finish). Closing a listening socket resets
//! every connection the kernel has queued for it, so a listener that must go
//! (its service moved or was deleted, or shuttle is shutting down) first
//! stops taking new connections, then accepts and serves what is queued,
//! and what completes its handshake in the next moments, and only then closes.

use std::time::{Duration, Instant};

use log::{debug, warn};

use super::{Entry, Server};
use crate::runtime::key::Key;

/// How long a retiring listener keeps accepting: handshakes under way when
/// it stopped taking new ones complete well within this on any sane network.
pub(super) const LINGER: Duration = Duration::from_millis(250);

/// The most connections a retiring listener accepts in its last pass.
const LAST_PASS: usize = 4096;

impl Server {
    /// Stops a listener taking new connections; it serves its queue, then closes.
    pub(crate) fn retire_listener(&mut self, key: Key, now: Instant) {
        if let Some(Entry::Datagrams(_)) = self.entries.get(key) {
            // No queue to serve: its flows end with it, and their clients'
            // next datagrams reach the socket that replaces it.
            return self.remove_entry(key);
        }
        let Some(Entry::Listener(listener)) = self.entries.get_mut(key) else { return };
        if listener.retiring.is_some() {
            return;
        }
        if listener.service.is_none() {
            // Staged, never served: nobody can be waiting for a service there.
            return self.remove_entry(key);
        }
        let linger = match listener.socket.refuse_new_connections() {
            Ok(()) => LINGER,
            Err(e) => {
                // Without the filter new clients keep coming: close after one pass.
                warn!("cannot stop a listener taking new connections: {e}; closing it after serving its queue");
                Duration::ZERO
            }
        };
        listener.retiring = Some(now + linger);
        self.timers.insert(now + linger, key);
        self.accept(key, now);
    }

    /// The linger is over: accept what is left, then close.
    pub(super) fn finish_retiring(&mut self, key: Key, now: Instant) {
        let service = match self.entries.get(key) {
            Some(Entry::Listener(listener)) => listener.service,
            _ => return,
        };
        let mut served = 0;
        while served < LAST_PASS && self.accept_one(key, now) {
            served += 1;
        }
        if served > 0 {
            debug!("a closing listener served {served} more queued clients");
        }
        self.remove_entry(key);
        // A deleted service lives on only as long as its listener has clients to hand over.
        if let Some(service) = service.filter(|&s| self.services.is_retired(s)) {
            drop(self.services.remove(service));
        }
    }
}
