//! A service's connection limit and queue as every loop shares them
//! (reference §3, connection limits). Pure atomics: no sockets, no clock.
//!
//! Slots are taken by compare-and-swap (`Counter::try_add_below`), so no
//! limit is ever passed, however many loops take at once. Each loop keeps its
//! own queue of clients (`model::queue`), but tickets come from one counter
//! here and every loop publishes the ticket at the head of its queue: a slot
//! that comes free anywhere goes to the loop whose head has waited longest,
//! which is woken if it is not the loop that freed it. So the clients of all
//! loops are served in one arrival order, and no loop's clients can starve
//! while another loop's keep taking the slots.
//!
//! Lost wake-ups: a loop that finds no slot first says it waits (a head, or
//! a held listener), then looks for a slot once more; a loop that frees a
//! slot first gives it back, then looks for who waits. With a `SeqCst` fence
//! between the two steps on both sides, one of them always sees the other.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

use crate::model::counters::Counter;

/// A queue head no loop has.
const NONE: u64 = u64::MAX;

/// What one loop says of itself.
#[derive(Debug)]
struct LoopSlot {
    /// The ticket at the head of its queue, or `NONE`.
    head: AtomicU64,
    /// Whether its listener stopped accepting at the service's limit.
    held: AtomicBool,
}

/// A service's limit and queue, shared by its copies in every loop.
#[derive(Debug)]
pub struct Gate {
    /// Clients accepted and not yet closed: proxied and queued (the service's `max_connections` bounds it).
    pub active: Counter,
    /// Clients waiting in a queue now, over all loops (`max_queue` bounds it).
    pub queued: Counter,
    /// Queued clients closed because their `queue_timeout` passed.
    pub queue_timeouts: Counter,
    /// The next ticket: queued clients of every loop in one arrival order.
    tickets: AtomicU64,
    /// By loop index.
    loops: Box<[LoopSlot]>,
}

/// Who waits for a slot that just came free.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    /// The loop whose queued client has waited longest.
    pub oldest: Option<usize>,
    /// Whether some loop's listener is held at the service's limit.
    pub held: bool,
}

impl Gate {
    /// A gate for a service that `loops` loops serve.
    pub fn new(loops: usize) -> Gate {
        let slot = || LoopSlot { head: AtomicU64::new(NONE), held: AtomicBool::new(false) };
        Gate {
            active: Counter::default(),
            queued: Counter::default(),
            queue_timeouts: Counter::default(),
            tickets: AtomicU64::new(0),
            loops: (0..loops.max(1)).map(|_| slot()).collect(),
        }
    }

    /// Takes a place in the queue unless `max_queue` clients wait already (0: no queue); its ticket.
    pub fn join_queue(&self, max_queue: u64) -> Option<u64> {
        if max_queue == 0 || !self.queued.try_add_below(max_queue) {
            return None;
        }
        Some(self.tickets.fetch_add(1, Ordering::Relaxed))
    }

    /// A queued client left the queue (served, gone or timed out).
    pub fn left_queue(&self) {
        self.queued.sub_one();
    }

    /// Loop `index` says which ticket heads its queue now (`None`: empty); fenced, see the module doc.
    pub fn publish_head(&self, index: usize, head: Option<u64>) {
        if let Some(slot) = self.loops.get(index) {
            slot.head.store(head.unwrap_or(NONE), Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
    }

    /// The loop whose head has waited longest.
    pub fn oldest(&self) -> Option<usize> {
        let heads = self.loops.iter().map(|s| s.head.load(Ordering::SeqCst));
        let (index, ticket) = heads.enumerate().min_by_key(|&(_, t)| t)?;
        (ticket != NONE).then_some(index)
    }

    /// Loop `index` holds (or releases) its listener at the limit; fenced, see the module doc.
    pub fn hold(&self, index: usize, held: bool) {
        if let Some(slot) = self.loops.get(index) {
            slot.held.store(held, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
    }

    /// Whether loop `index` holds its listener.
    pub fn is_held(&self, index: usize) -> bool {
        self.loops.get(index).is_some_and(|s| s.held.load(Ordering::SeqCst))
    }

    /// Loops whose listener is held.
    pub fn held(&self) -> impl Iterator<Item = usize> + '_ {
        self.loops.iter().enumerate().filter(|(_, s)| s.held.load(Ordering::SeqCst)).map(|(i, _)| i)
    }

    /// Who waits, asked right after a slot was given back (fenced, see the module doc).
    pub fn waiting(&self) -> Waiting {
        fence(Ordering::SeqCst);
        let oldest = if self.queued.get() > 0 { self.oldest() } else { None };
        Waiting { oldest, held: self.loops.iter().any(|s| s.held.load(Ordering::SeqCst)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_never_holds_more_than_max_queue() {
        let gate = Gate::new(1);
        assert_eq!(gate.join_queue(0), None, "0 means no queue");
        assert_eq!((gate.join_queue(2), gate.join_queue(2), gate.join_queue(2)), (Some(0), Some(1), None));
        gate.left_queue();
        assert_eq!(gate.join_queue(2), Some(2), "a left place is free again, tickets go on");
        assert_eq!(gate.queued.get(), 2);
    }

    #[test]
    fn the_oldest_head_over_all_loops_is_served_first() {
        let gate = Gate::new(3);
        assert_eq!(gate.waiting(), Waiting::default());
        gate.queued.add(2);
        gate.publish_head(2, Some(5));
        gate.publish_head(0, Some(9));
        assert_eq!(gate.waiting().oldest, Some(2));
        gate.publish_head(2, None);
        assert_eq!(gate.oldest(), Some(0));
        gate.publish_head(7, Some(1)); // no such loop: ignored
        assert_eq!(gate.oldest(), Some(0));
    }

    #[test]
    fn held_listeners_are_found() {
        let gate = Gate::new(4);
        gate.hold(1, true);
        gate.hold(3, true);
        gate.hold(1, false);
        assert!(gate.waiting().held);
        assert!(gate.is_held(3) && !gate.is_held(1));
        assert_eq!(gate.held().collect::<Vec<_>>(), [3]);
    }
}
