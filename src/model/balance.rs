//! Backend choice (reference §3): weighted round robin and least connected, and the
//! failover order after a failed connect. Pure: no sockets, no clock, no
//! allocation.
//!
//! A backend is *eligible* when it is up and its weight is above 0; it is
//! *open* when eligible and below its `max_connections`. Picks and failover
//! take open backends only: a full one is skipped as if drained, for now. The
//! functions see a service's `n` backends through `at(i)`, in config order,
//! and return positions; the caller maps them to backends. The first choice is
//! all most connections need, so the failover order is computed only when a
//! connect fails, one candidate at a time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::config::Balance;

/// What the balancer needs to know of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Connections in a row round robin gives this backend; 0 drains it.
    pub weight: u32,
    /// Whether health checks let traffic go to it.
    pub up: bool,
    /// Connections open (or being opened) to it now.
    pub active: u64,
    /// Its `max_connections`; 0 means no limit.
    pub limit: u64,
}

impl Candidate {
    fn eligible(&self) -> bool {
        self.up && self.weight > 0
    }

    /// Eligible and below its limit: it may take one more connection now.
    fn open(&self) -> bool {
        self.eligible() && (self.limit == 0 || self.active < self.limit)
    }
}

/// Whether any backend is eligible at all, full or not: when a pick found
/// none, this tells "every backend is full" (queue the client) from "none
/// is up" (close it).
pub fn any_eligible(n: usize, at: impl Fn(usize) -> Candidate) -> bool {
    (0..n).any(|i| at(i).eligible())
}

/// The candidate as the balancer sees it when its service is in fail-open
/// (`open`): up whatever its health says, so round robin, least connected and
/// failover go over every backend. Weight still counts: a drained backend
/// takes nothing even then.
pub fn as_if_up(open: bool, candidate: Candidate) -> Candidate {
    Candidate { up: candidate.up || open, ..candidate }
}

/// A service's balancing position, kept between picks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Position of the backend whose turn it is (RR), or where tie-breaking starts (LC).
    next: usize,
    /// Connections the backend at `next` has taken in its current turn (RR).
    taken: u32,
}

impl Cursor {
    fn to_bits(self) -> u64 {
        // Positions index a service's backends, far fewer than 2^32.
        (self.next as u64) << 32 | u64::from(self.taken)
    }

    fn from_bits(bits: u64) -> Cursor {
        Cursor { next: (bits >> 32) as usize, taken: bits as u32 }
    }
}

/// A service's cursor as every loop shares it: one atomic word, advanced by
/// compare-and-swap. Picks are then one sequence whichever loop makes them,
/// so round robin's weights and least connected's turns hold over the whole
/// process exactly as in one loop, with no lock.
#[derive(Debug, Default)]
pub struct SharedCursor(AtomicU64);

impl SharedCursor {
    /// Picks the first backend for a new client and advances the cursor; `None` when none is eligible.
    pub fn pick(&self, balance: Balance, n: usize, at: impl Fn(usize) -> Candidate) -> Option<usize> {
        let mut bits = self.0.load(Ordering::Acquire);
        loop {
            let mut cursor = Cursor::from_bits(bits);
            let chosen = pick(balance, &mut cursor, n, &at);
            let new = cursor.to_bits();
            if new == bits {
                return chosen;
            }
            match self.0.compare_exchange_weak(bits, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return chosen,
                // Another loop picked meanwhile: pick again from where it left the cursor.
                Err(now) => bits = now,
            }
        }
    }
}

/// Picks the first backend for a new client; `None` when none is eligible.
pub fn pick(balance: Balance, cursor: &mut Cursor, n: usize, at: impl Fn(usize) -> Candidate) -> Option<usize> {
    match balance {
        Balance::RoundRobin => round_robin(cursor, n, at),
        Balance::LeastConn => least_connected(cursor, n, at),
    }
}

/// Weighted round robin: each eligible backend takes `weight` connections in a row, in config order.
pub fn round_robin(cursor: &mut Cursor, n: usize, at: impl Fn(usize) -> Candidate) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let mut pos = cursor.next % n;
    let mut taken = if pos == cursor.next { cursor.taken } else { 0 };
    // n + 1 steps: the current backend's remaining turn, then every backend once.
    for _ in 0..=n {
        let b = at(pos);
        if b.open() && taken < b.weight {
            taken += 1;
            *cursor =
                if taken >= b.weight { Cursor { next: (pos + 1) % n, taken: 0 } } else { Cursor { next: pos, taken } };
            return Some(pos);
        }
        pos = (pos + 1) % n;
        taken = 0;
    }
    None
}

/// Least connected: the eligible backend with the fewest active connections;
/// ties go to the first at or after the cursor, which then moves past it, so
/// idle backends take turns.
pub fn least_connected(cursor: &mut Cursor, n: usize, at: impl Fn(usize) -> Candidate) -> Option<usize> {
    let chosen = fewest_active(cursor.next, n, &at, |_| true)?;
    *cursor = Cursor { next: (chosen + 1) % n, taken: 0 };
    Some(chosen)
}

/// The next failover candidate after `last` (the backend that just failed):
/// RR goes on in config order, LC to the fewest active; `tried(i)` excludes
/// backends already tried, so each is tried at most once (reference §3).
pub fn failover(
    balance: Balance,
    last: usize,
    n: usize,
    at: impl Fn(usize) -> Candidate,
    tried: impl Fn(usize) -> bool,
) -> Option<usize> {
    match balance {
        Balance::RoundRobin => (1..=n).map(|i| (last + i) % n).find(|&i| !tried(i) && at(i).open()),
        Balance::LeastConn => fewest_active(last + 1, n, &at, |i| !tried(i)),
    }
}

/// The open, allowed backend with the fewest active connections, scanning from `start`.
fn fewest_active(
    start: usize,
    n: usize,
    at: &impl Fn(usize) -> Candidate,
    allowed: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for i in (0..n).map(|i| (start + i) % n.max(1)) {
        let b = at(i);
        if b.open() && allowed(i) && best.is_none_or(|(_, active)| b.active < active) {
            best = Some((i, b.active));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(weight: u32) -> Candidate {
        Candidate { weight, up: true, active: 0, limit: 0 }
    }

    const DOWN: Candidate = Candidate { weight: 1, up: false, active: 0, limit: 0 };

    fn full(active: u64) -> Candidate {
        Candidate { active, limit: active, ..up(1) }
    }

    #[track_caller]
    fn picks(balance: Balance, backends: &[Candidate], count: usize) -> Vec<usize> {
        let mut cursor = Cursor::default();
        (0..count).map(|_| pick(balance, &mut cursor, backends.len(), |i| backends[i]).expect("a pick")).collect()
    }

    /// The whole order one client would try: the pick, then every failover.
    fn order(balance: Balance, cursor: &mut Cursor, backends: &[Candidate]) -> Vec<usize> {
        let mut order: Vec<usize> = pick(balance, cursor, backends.len(), |i| backends[i]).into_iter().collect();
        while let Some(&last) = order.last() {
            match failover(balance, last, backends.len(), |i| backends[i], |i| order.contains(&i)) {
                Some(next) => order.push(next),
                None => break,
            }
        }
        order
    }

    #[test]
    fn rr_weights_1_2_3_give_runs_of_that_length() {
        let got = picks(Balance::RoundRobin, &[up(1), up(2), up(3)], 13);
        assert_eq!(got, [0, 1, 1, 2, 2, 2, 0, 1, 1, 2, 2, 2, 0]);
    }

    #[test]
    fn rr_equal_weights_rotate() {
        assert_eq!(picks(Balance::RoundRobin, &[up(1), up(1), up(1)], 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn rr_skips_drained_and_down_backends() {
        assert_eq!(picks(Balance::RoundRobin, &[up(1), up(0), DOWN, up(1)], 4), [0, 3, 0, 3]);
    }

    #[test]
    fn rr_failover_order_lists_every_eligible_backend_once_in_config_order() {
        let mut cursor = Cursor::default();
        let backends = [up(1), up(1), up(0), up(1), DOWN];
        order(Balance::RoundRobin, &mut cursor, &backends);
        assert_eq!(order(Balance::RoundRobin, &mut cursor, &backends), [1, 3, 0]);
    }

    #[test]
    fn rr_with_nothing_eligible_picks_nothing() {
        let mut cursor = Cursor::default();
        assert_eq!(round_robin(&mut cursor, 0, |_| up(1)), None);
        let backends = [up(0), DOWN];
        assert_eq!(round_robin(&mut cursor, 2, |i| backends[i]), None);
    }

    #[test]
    fn rr_survives_a_shrinking_backend_list() {
        let mut cursor = Cursor { next: 5, taken: 1 };
        assert_eq!(round_robin(&mut cursor, 2, |_| up(1)), Some(1));
    }

    #[test]
    fn lc_picks_fewest_active_and_fails_over_by_active_count() {
        let mut cursor = Cursor::default();
        let backends =
            [Candidate { active: 3, ..up(1) }, Candidate { active: 1, ..up(1) }, Candidate { active: 2, ..up(1) }];
        assert_eq!(order(Balance::LeastConn, &mut cursor, &backends), [1, 2, 0]);
    }

    #[test]
    fn lc_ties_rotate() {
        assert_eq!(picks(Balance::LeastConn, &[up(1), up(1), up(1)], 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn lc_skips_drained_and_down() {
        let backends = [Candidate { active: 5, ..up(1) }, up(0), DOWN];
        assert_eq!(picks(Balance::LeastConn, &backends, 2), [0, 0]);
        let mut cursor = Cursor::default();
        assert_eq!(order(Balance::LeastConn, &mut cursor, &backends), [0]);
    }

    #[test]
    fn rr_skips_full_backends_and_takes_them_back_once_below_their_limit() {
        let backends = [up(1), full(2), Candidate { active: 1, limit: 2, ..up(1) }];
        assert_eq!(picks(Balance::RoundRobin, &backends, 4), [0, 2, 0, 2]);
        let mut cursor = Cursor::default();
        assert_eq!(order(Balance::RoundRobin, &mut cursor, &backends), [0, 2], "failover skips the full one too");
        let freed = [up(1), Candidate { active: 1, limit: 2, ..up(1) }];
        assert_eq!(picks(Balance::RoundRobin, &freed, 2), [0, 1]);
    }

    #[test]
    fn lc_skips_full_backends_even_with_fewer_connections() {
        let backends = [Candidate { active: 9, ..up(1) }, full(1), Candidate { active: 5, limit: 6, ..up(1) }];
        assert_eq!(picks(Balance::LeastConn, &backends, 2), [2, 2]);
        let mut cursor = Cursor::default();
        assert_eq!(order(Balance::LeastConn, &mut cursor, &backends), [2, 0]);
    }

    #[test]
    fn all_full_is_told_apart_from_none_eligible() {
        let mut cursor = Cursor::default();
        let full_ones = [full(3), full(1)];
        assert_eq!(pick(Balance::RoundRobin, &mut cursor, 2, |i| full_ones[i]), None);
        assert_eq!(pick(Balance::LeastConn, &mut cursor, 2, |i| full_ones[i]), None);
        assert!(any_eligible(2, |i| full_ones[i]), "full: the client may wait");
        let none = [DOWN, up(0)];
        assert!(!any_eligible(2, |i| none[i]), "none up: the client is closed");
        assert!(!any_eligible(0, |_| up(1)));
    }

    #[test]
    fn fail_open_balances_over_down_backends_but_not_drained_ones() {
        let backends = [DOWN, Candidate { weight: 0, ..DOWN }, DOWN, Candidate { weight: 2, ..DOWN }];
        let open: Vec<Candidate> = backends.iter().map(|&c| as_if_up(true, c)).collect();
        assert_eq!(picks(Balance::RoundRobin, &open, 8), [0, 2, 3, 3, 0, 2, 3, 3]);
        let mut cursor = Cursor::default();
        assert_eq!(order(Balance::RoundRobin, &mut cursor, &open), [0, 2, 3], "failover tries each once");
        let busy: Vec<Candidate> =
            open.iter().enumerate().map(|(i, &c)| Candidate { active: 4 - i as u64, ..c }).collect();
        assert_eq!(order(Balance::LeastConn, &mut Cursor::default(), &busy), [3, 2, 0]);
        let closed: Vec<Candidate> = backends.iter().map(|&c| as_if_up(false, c)).collect();
        assert_eq!(pick(Balance::RoundRobin, &mut Cursor::default(), 4, |i| closed[i]), None);
    }

    #[test]
    fn a_shared_cursor_keeps_one_sequence_over_threads() {
        let cursor = std::sync::Arc::new(SharedCursor::default());
        let weights = [1u32, 2, 3];
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let cursor = cursor.clone();
                std::thread::spawn(move || {
                    let mut counts = [0usize; 3];
                    for _ in 0..600 {
                        let i = cursor.pick(Balance::RoundRobin, 3, |i| up(weights[i])).unwrap();
                        counts[i] += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut total = [0usize; 3];
        for t in threads {
            for (sum, n) in total.iter_mut().zip(t.join().unwrap()) {
                *sum += n;
            }
        }
        // 1800 picks are 300 whole rounds of 1 + 2 + 3.
        assert_eq!(total, [300, 600, 900]);
        assert_eq!(Cursor::from_bits(Cursor { next: 7, taken: 3 }.to_bits()), Cursor { next: 7, taken: 3 });
    }
}
