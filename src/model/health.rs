//! Backend health (reference §4): the rise/fall counters that decide whether a
//! backend is up.
//!
//! `Health` is pure bookkeeping; the probe that feeds it from the event loop
//! lives in `probe.rs`, and failed client connects feed it from `proxy.rs`.
//! `SharedHealth` holds it in one atomic word, so that every loop proxying to a
//! backend reads and feeds the same health without a lock, and each
//! transition happens (and is logged) exactly once.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A change of a backend's `up` state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// `fall` consecutive failures: stop sending it traffic.
    WentDown,
    /// `rise` consecutive passing checks: send it traffic again.
    CameUp,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transition::WentDown => "down",
            Transition::CameUp => "up",
        })
    }
}

/// One backend's health: whether it is up and its run of results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    up: bool,
    /// Consecutive failures (checks and client connects) while up.
    failures: u32,
    /// Consecutive passing checks while down.
    successes: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health { up: true, failures: 0, successes: 0 }
    }
}

impl Health {
    /// Whether traffic may go to the backend.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one health check result.
    pub fn record_check(&mut self, passed: bool, rise: u32, fall: u32) -> Option<Transition> {
        if passed {
            self.failures = 0;
            if self.up {
                return None;
            }
            self.successes += 1;
            if self.successes >= rise.max(1) {
                self.up = true;
                self.successes = 0;
                return Some(Transition::CameUp);
            }
            None
        } else {
            self.successes = 0;
            self.fail(fall)
        }
    }

    /// Records a client connect to the backend that failed (passive health).
    pub fn record_connect_failure(&mut self, fall: u32) -> Option<Transition> {
        self.fail(fall)
    }

    /// Records a client connect that completed: it resets the failure run but
    /// never brings a down backend up (only checks do).
    pub fn record_connect_success(&mut self) {
        self.failures = 0;
    }

    /// One word: the up bit above the current run. The runs never overlap
    /// (failures count only while up, passing checks only while down), so
    /// one counter holds whichever applies.
    fn to_bits(self) -> u64 {
        let run = if self.up { self.failures } else { self.successes };
        (u64::from(self.up) << 32) | u64::from(run)
    }

    fn from_bits(bits: u64) -> Health {
        let (up, run) = (bits >> 32 & 1 == 1, bits as u32);
        if up {
            Health { up, failures: run, successes: 0 }
        } else {
            Health { up, failures: 0, successes: run }
        }
    }

    /// This health after a completed client connect.
    pub fn after_connect_success(mut self) -> Health {
        self.record_connect_success();
        self
    }

    fn fail(&mut self, fall: u32) -> Option<Transition> {
        if !self.up {
            return None;
        }
        self.failures += 1;
        if self.failures >= fall.max(1) {
            self.up = false;
            self.failures = 0;
            return Some(Transition::WentDown);
        }
        None
    }
}

/// A backend's health as every loop sees it: one atomic word, updated by
/// compare-and-swap, so the byte path takes no lock.
#[derive(Debug)]
pub struct SharedHealth(AtomicU64);

impl Default for SharedHealth {
    fn default() -> Self {
        SharedHealth(AtomicU64::new(Health::default().to_bits()))
    }
}

impl SharedHealth {
    /// The health now.
    pub fn get(&self) -> Health {
        Health::from_bits(self.0.load(Ordering::Acquire))
    }

    /// Whether traffic may go to the backend.
    pub fn is_up(&self) -> bool {
        self.get().is_up()
    }

    /// Applies `f` atomically; of concurrent updates, exactly the one that
    /// made a transition returns it.
    pub fn update(&self, f: impl Fn(&mut Health) -> Option<Transition>) -> Option<Transition> {
        let mut transition = None;
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
            let mut health = Health::from_bits(bits);
            transition = f(&mut health);
            let new = health.to_bits();
            (new != bits).then_some(new)
        });
        transition
    }

    /// Forgets the run and marks the backend up (its checks were turned off).
    pub fn reset(&self) {
        self.0.store(Health::default().to_bits(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_falls_after_fall_failures() {
        let mut h = Health::default();
        assert_eq!(h.record_check(false, 2, 3), None);
        assert_eq!(h.record_check(false, 2, 3), None);
        assert_eq!(h.record_check(false, 2, 3), Some(Transition::WentDown));
        assert!(!h.is_up());
        assert_eq!(h.record_check(false, 2, 3), None, "already down");
    }

    #[test]
    fn a_success_resets_the_failure_run() {
        let mut h = Health::default();
        h.record_check(false, 2, 2);
        h.record_check(true, 2, 2);
        assert_eq!(h.record_check(false, 2, 2), None);
        assert!(h.is_up());
    }

    #[test]
    fn down_rises_after_rise_passes_and_a_failure_restarts_the_run() {
        let mut h = Health::default();
        h.record_check(false, 3, 1);
        assert!(!h.is_up());
        h.record_check(true, 3, 1);
        h.record_check(true, 3, 1);
        h.record_check(false, 3, 1);
        h.record_check(true, 3, 1);
        h.record_check(true, 3, 1);
        assert_eq!(h.record_check(true, 3, 1), Some(Transition::CameUp));
        assert!(h.is_up());
    }

    #[test]
    fn passive_failures_count_with_check_failures_and_connects_reset() {
        let mut h = Health::default();
        h.record_connect_failure(3);
        h.record_check(false, 2, 3);
        h.record_connect_success();
        h.record_connect_failure(3);
        h.record_connect_failure(3);
        assert!(h.is_up());
        assert_eq!(h.record_check(false, 2, 3), Some(Transition::WentDown));
    }

    #[test]
    fn connect_success_never_brings_a_backend_up() {
        let mut h = Health::default();
        h.record_connect_failure(1);
        h.record_connect_success();
        assert!(!h.is_up());
    }

    #[test]
    fn the_word_holds_every_state_a_run_reaches() {
        let mut h = Health::default();
        for (passed, rise, fall) in
            [(false, 3, 4), (false, 3, 4), (false, 3, 4), (false, 3, 4), (true, 3, 4), (true, 3, 4)]
        {
            h.record_check(passed, rise, fall);
            assert_eq!(Health::from_bits(h.to_bits()), h);
        }
        let top = Health { up: true, failures: u32::MAX, successes: 0 };
        assert_eq!(Health::from_bits(top.to_bits()), top);
    }

    #[test]
    fn concurrent_failures_make_one_transition() {
        let shared = std::sync::Arc::new(SharedHealth::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| shared.update(|h| h.record_connect_failure(1000)).is_some()).count()
                })
            })
            .collect();
        let transitions: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(transitions, 1, "4000 failures with fall 1000 go down exactly once");
        assert!(!shared.is_up());
        shared.reset();
        assert!(shared.is_up());
    }
}
