//! One loop's queue of clients waiting for a backend slot of a service
//! (reference §3, connection limits): FIFO by ticket, each client with its
//! own deadline. Pure: keys and instants in, keys out; the loop owns the
//! sockets and the timers.
//!
//! Tickets come from the service's shared counter, so they order the clients
//! of every loop in one sequence: the loop whose head has the smallest ticket
//! holds the client that has waited longest (see `model::limits`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// One waiting client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter<K> {
    key: K,
    deadline: Option<Instant>,
}

/// Clients waiting in arrival order, with their deadlines.
#[derive(Debug)]
pub struct Queue<K> {
    by_ticket: BTreeMap<u64, Waiter<K>>,
    /// Deadlines in order, so expiry touches only what expired, even when a
    /// lowered `queue_timeout` gives later clients earlier deadlines.
    by_deadline: BTreeSet<(Instant, u64)>,
}

impl<K> Default for Queue<K> {
    fn default() -> Self {
        Queue { by_ticket: BTreeMap::new(), by_deadline: BTreeSet::new() }
    }
}

impl<K: Copy> Queue<K> {
    /// Adds a client at the tail; `ticket` must be larger than every ticket queued so far.
    pub fn push(&mut self, ticket: u64, key: K, deadline: Option<Instant>) {
        self.by_ticket.insert(ticket, Waiter { key, deadline });
        if let Some(at) = deadline {
            self.by_deadline.insert((at, ticket));
        }
    }

    /// The client that has waited longest, with its ticket.
    pub fn front(&self) -> Option<(u64, K)> {
        self.by_ticket.first_key_value().map(|(&t, w)| (t, w.key))
    }

    /// Takes the client that has waited longest.
    pub fn pop_front(&mut self) -> Option<K> {
        let (ticket, _) = self.front()?;
        self.remove(ticket)
    }

    /// Takes a client out wherever it stands (it left, or its turn came); `None` if not queued.
    pub fn remove(&mut self, ticket: u64) -> Option<K> {
        let waiter = self.by_ticket.remove(&ticket)?;
        if let Some(at) = waiter.deadline {
            self.by_deadline.remove(&(at, ticket));
        }
        Some(waiter.key)
    }

    /// Takes out every client whose deadline is at or before `now`, earliest first.
    pub fn expire(&mut self, now: Instant) -> Vec<K> {
        let mut expired = Vec::new();
        while let Some(&(at, ticket)) = self.by_deadline.first() {
            if at > now {
                break;
            }
            self.by_deadline.pop_first();
            if let Some(w) = self.by_ticket.remove(&ticket) {
                expired.push(w.key);
            }
        }
        expired
    }

    /// The earliest deadline of a queued client.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|&(at, _)| at)
    }

    /// How many clients wait.
    pub fn len(&self) -> usize {
        self.by_ticket.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.by_ticket.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(origin: Instant, ms: u64) -> Option<Instant> {
        Some(origin + Duration::from_millis(ms))
    }

    #[test]
    fn clients_leave_in_arrival_order() {
        let now = Instant::now();
        let mut q = Queue::default();
        for (ticket, key) in [(3, 'a'), (7, 'b'), (9, 'c')] {
            q.push(ticket, key, at(now, 100));
        }
        assert_eq!(q.front(), Some((3, 'a')));
        assert_eq!(
            [q.pop_front(), q.pop_front(), q.pop_front(), q.pop_front()],
            [Some('a'), Some('b'), Some('c'), None]
        );
        assert!(q.is_empty());
        assert_eq!(q.next_deadline(), None, "no deadline outlives its client");
    }

    #[test]
    fn a_departed_client_is_gone_and_the_rest_keep_their_order() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.push(1, 'a', at(now, 10));
        q.push(2, 'b', at(now, 20));
        q.push(3, 'c', None);
        assert_eq!(q.remove(2), Some('b'));
        assert_eq!(q.remove(2), None, "removing twice finds nothing");
        assert_eq!(q.len(), 2);
        assert_eq!(q.expire(now + Duration::from_millis(30)), ['a'], "b left, c never expires");
        assert_eq!(q.pop_front(), Some('c'));
    }

    #[test]
    fn expiry_takes_only_what_is_due_even_out_of_ticket_order() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.push(1, 'a', at(now, 500));
        // Queued after a lowered queue_timeout: later, yet due sooner.
        q.push(2, 'b', at(now, 100));
        q.push(3, 'c', at(now, 300));
        assert_eq!(q.next_deadline(), at(now, 100));
        assert!(q.expire(now + Duration::from_millis(99)).is_empty());
        assert_eq!(q.expire(now + Duration::from_millis(300)), ['b', 'c']);
        assert_eq!(q.front(), Some((1, 'a')));
        assert_eq!(q.next_deadline(), at(now, 500));
    }
}
