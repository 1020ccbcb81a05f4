//! The descriptor budget: who may open a socket when the process's fd limit
//! is near. Proxied pairs (two fds each), admin connections, listeners and
//! health probes share one limit; without a budget, a few hundred probes
//! hanging on connect would take the fds that clients need (a pair's connect
//! fails, the client is dropped).
//!
//! - Probes get at most a quarter of the limit at once; a probe due while
//!   that share is used waits its turn in a FIFO and starts when another
//!   probe's check ends, so every backend is still checked, later.
//! - Pairs may use what is left after the probes' share (as much of it as
//!   there are probes to use it), the admin connections and the listeners:
//!   accepting pauses before that runs out, so clients wait in the listen
//!   queue instead of being accepted and dropped (as HAProxy's maxconn does).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::runtime::key::Key;
use crate::runtime::throttle::Throttle;

/// Descriptors held besides the entries': stdio, epoll, the signal pipe, the
/// waker, the state lock, helper threads' files, slack.
pub const FIXED_FDS: u64 = 32;

/// What a worker loop holds besides its entries: its epoll and waker.
const WORKER_FIXED_FDS: u64 = 2;

/// The part of the fd limit each of `n` worker loops may give its pairs and
/// listeners. The control loop keeps the fixed descriptors, the probes'
/// share and room for admin clients; the workers split the rest evenly (the
/// kernel spreads connections evenly too).
pub fn worker_share(limit: u64, n: usize) -> u64 {
    let probes = (limit.saturating_sub(FIXED_FDS) / 4).max(1);
    let admin = (limit.saturating_sub(FIXED_FDS) / 8).min(64);
    let rest = limit.saturating_sub(FIXED_FDS + probes + admin);
    rest / n.max(1) as u64 + WORKER_FIXED_FDS
}

/// Who holds descriptors now, and the probes waiting for one.
#[derive(Debug)]
pub struct FdBudget {
    limit: u64,
    /// Descriptors held outside the entries.
    fixed: u64,
    /// Proxied pairs open (two fds each); change it through
    /// [`FdBudget::pair_opened`] and [`FdBudget::pair_closed`].
    pub pairs: usize,
    /// Pairs open over every loop of the process, which all share it.
    process_pairs: Arc<AtomicU64>,
    /// Admin connections open.
    pub admin_conns: usize,
    /// Listening sockets (service listeners and the admin one).
    pub listeners: usize,
    /// Probe entries, checking or not.
    pub probes: usize,
    /// UDP flows open in this loop (one fd each).
    pub flows: usize,
    /// Probe checks in flight, each holding one fd.
    checking: usize,
    /// Probes due but waiting for a slot, oldest first.
    waiting: VecDeque<Key>,
    /// Since when probes have been waiting, and how many checks waited.
    short: Option<(Instant, u64)>,
    /// The warning for checks skipped because a connect ran short of fds or ports.
    pub skipped_checks: Throttle,
}

impl FdBudget {
    /// A budget for a process whose fd limit is `limit`.
    pub fn new(limit: u64) -> FdBudget {
        FdBudget::with_fixed(limit, FIXED_FDS)
    }

    /// A worker loop's budget: its part of the limit from [`worker_share`].
    pub fn for_worker(share: u64) -> FdBudget {
        FdBudget::with_fixed(share, WORKER_FIXED_FDS)
    }

    fn with_fixed(limit: u64, fixed: u64) -> FdBudget {
        FdBudget {
            limit,
            fixed,
            pairs: 0,
            process_pairs: Arc::default(),
            admin_conns: 0,
            listeners: 0,
            probes: 0,
            flows: 0,
            checking: 0,
            waiting: VecDeque::new(),
            short: None,
            skipped_checks: Throttle::new(Duration::from_secs(10)),
        }
    }

    /// Counts this loop's pairs into `gauge` too, which the other loops share.
    pub fn share_pairs(&mut self, gauge: Arc<AtomicU64>) {
        self.process_pairs = gauge;
    }

    /// The gauge of every loop's pairs, to share with another loop.
    pub fn pairs_gauge(&self) -> Arc<AtomicU64> {
        self.process_pairs.clone()
    }

    /// A pair was opened.
    pub fn pair_opened(&mut self) {
        self.pairs += 1;
        self.process_pairs.fetch_add(1, Ordering::Relaxed);
    }

    /// A pair was closed.
    pub fn pair_closed(&mut self) {
        self.pairs -= 1;
        let _ = self.process_pairs.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Pairs open now over every loop that shares this budget's gauge.
    pub fn process_pairs(&self) -> u64 {
        self.process_pairs.load(Ordering::Relaxed)
    }

    /// The fd limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Checks that may be in flight at once: a quarter of what is not fixed.
    pub fn probe_share(&self) -> usize {
        (self.limit.saturating_sub(self.fixed) / 4).max(1) as usize
    }

    /// Whether one more pair (two descriptors) fits beside everything else,
    /// keeping the probes' share free for them.
    pub fn has_room_for_pair(&self) -> bool {
        let reserved = self.probe_share().min(self.probes).max(self.checking);
        let in_use = (2 * self.pairs + self.flows + self.admin_conns + self.listeners + reserved) as u64 + self.fixed;
        in_use + 2 <= self.limit
    }

    /// A probe wants to start a check: `true` if it may now (it then holds a
    /// slot until [`FdBudget::check_done`]); otherwise it is queued and will be
    /// handed out by [`FdBudget::next_waiting`].
    pub fn start_check(&mut self, probe: Key, now: Instant) -> bool {
        if self.checking < self.probe_share() && self.waiting.is_empty() {
            self.checking += 1;
            return true;
        }
        if !self.waiting.contains(&probe) {
            self.waiting.push_back(probe);
        }
        match &mut self.short {
            Some((_, waited)) => *waited += 1,
            None => {
                self.short = Some((now, 1));
                warn!(
                    "health checks are waiting for a descriptor: {} checks in flight use the probes' share of the fd limit ({}); further checks start as these end",
                    self.checking, self.limit
                );
            }
        }
        false
    }

    /// A check ended (or its probe was removed mid-check): its slot is free.
    pub fn check_done(&mut self) {
        self.checking = self.checking.saturating_sub(1);
    }

    /// A probe removed while waiting gives up its place.
    pub fn forget(&mut self, probe: Key) {
        self.waiting.retain(|&k| k != probe);
    }

    /// The next waiting probe, if a slot is free; it holds that slot from now.
    pub fn next_waiting(&mut self, now: Instant) -> Option<Key> {
        if self.checking >= self.probe_share() {
            return None;
        }
        match self.waiting.pop_front() {
            Some(probe) => {
                self.checking += 1;
                Some(probe)
            }
            None => {
                if let Some((since, waited)) = self.short.take() {
                    let ms = now.saturating_duration_since(since).as_millis();
                    info!("health checks caught up: {waited} checks waited for a descriptor over {ms} ms");
                }
                None
            }
        }
    }

    /// Probes waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::key::Slots;

    #[test]
    fn probes_beyond_their_share_wait_in_order_and_pairs_keep_theirs() {
        let now = Instant::now();
        let mut budget = FdBudget::new(256);
        let share = budget.probe_share();
        assert_eq!(share, 56);
        let mut slots = Slots::new();
        let keys: Vec<Key> = (0..400).map(|i| slots.insert(i)).collect();
        budget.probes = keys.len();
        let started = keys.iter().filter(|&&k| budget.start_check(k, now)).count();
        assert_eq!(started, share);
        assert_eq!(budget.waiting(), 400 - share);
        // Every probe holds a slot or waits; pairs still fit beside them.
        let mut pairs = 0;
        while budget.has_room_for_pair() {
            budget.pairs += 1;
            pairs += 1;
        }
        assert_eq!(pairs, (256 - 32 - 56 - 2) / 2 + 1, "pairs get what probes and fixed fds leave");
        assert_eq!(budget.next_waiting(now), None, "no slot is free yet");
        budget.check_done();
        assert_eq!(budget.next_waiting(now), Some(keys[share]), "first come, first served");
    }

    #[test]
    fn without_probes_pairs_get_everything() {
        let mut budget = FdBudget::new(100);
        while budget.has_room_for_pair() {
            budget.pairs += 1;
        }
        assert_eq!(budget.pairs, (100 - 32) / 2);
    }

    #[test]
    fn workers_split_what_the_control_loop_leaves() {
        // 1,000,000: the fixed fds, 249,992 for probes, 64 for admin clients; the rest in 4.
        assert_eq!(worker_share(1_000_000, 4), (1_000_000 - 32 - 249_992 - 64) / 4 + 2);
        let shares: u64 = (0..2).map(|_| worker_share(72, 2) - 2).sum();
        assert!(shares + 32 + 10 <= 72, "the workers and the control loop fit the limit together");
        assert!(worker_share(72, 2) >= 2 + 1 + 6, "a worker at a tiny limit still fits a listener and a few pairs");
    }

    #[test]
    fn loops_sharing_a_gauge_count_the_process_pairs() {
        let mut control = FdBudget::new(1024);
        let mut worker = FdBudget::for_worker(512);
        worker.share_pairs(control.pairs_gauge());
        control.pair_opened();
        worker.pair_opened();
        worker.pair_opened();
        assert_eq!((control.pairs, worker.pairs, control.process_pairs()), (1, 2, 3));
        worker.pair_closed();
        assert_eq!((worker.pairs, worker.process_pairs()), (1, 2));
        let alone = FdBudget::new(1024);
        assert_eq!(alone.process_pairs(), 0, "a budget of its own counts only its own");
    }
}
