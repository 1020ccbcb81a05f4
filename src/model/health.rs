//! Backend health (reference §4): the rise/fall counters that decide whether a
//! backend is up.
//!
//! `Health` is pure bookkeeping; the probe that feeds it from the event loop
//! lives in `probe.rs`, and failed client connects feed it from `proxy.rs`.
//! `SharedHealth` holds it in one atomic word, so that every loop proxying to a
//! backend reads and feeds the same health without a lock, and each
//! transition happens (and is logged) exactly once.
//!
//! Fail-open (reference §3) needs to know, on every pick, whether all of a
//! service's backends are down. Scanning them per pick would cost O(n) on the
//! hot path, so each service keeps a [`Tally`]: one atomic word with how many
//! of its backends count and how many of those are down. A backend's health
//! word carries a *counted* bit beside its state, and whoever makes a
//! transition of a counted word (exactly one loop, by the compare-and-swap)
//! moves the tally; the control loop sets and clears the bit as backends come
//! and go, with the same exactness. So the tally is exact across workers, and
//! a pick reads one word.

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

    /// Marks it down with no run under way, as an upgraded process found it.
    pub fn carried_down(&mut self) -> Option<Transition> {
        let was_up = self.up;
        *self = Health { up: false, failures: 0, successes: 0 };
        was_up.then_some(Transition::WentDown)
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

/// The health word's bit that says the backend counts in its service's [`Tally`].
const COUNTED: u64 = 1 << 33;

/// A backend's health as every loop sees it: one atomic word, updated by
/// compare-and-swap, so the byte path takes no lock. Besides the `Health`,
/// the word holds whether the backend counts in its service's [`Tally`].
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
        self.update_counting(f).0
    }

    /// [`SharedHealth::update`], also saying whether the backend counted in
    /// its service's tally at that moment (then the caller moves the tally).
    pub fn update_counting(&self, f: impl Fn(&mut Health) -> Option<Transition>) -> (Option<Transition>, bool) {
        let mut transition = None;
        let mut counted = false;
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
            let mut health = Health::from_bits(bits);
            transition = f(&mut health);
            counted = bits & COUNTED != 0;
            let new = health.to_bits() | (bits & COUNTED);
            (new != bits).then_some(new)
        });
        (transition, counted)
    }

    /// Forgets the run and marks the backend up (its checks were turned off);
    /// `CameUp` when it was down.
    pub fn reset(&self) -> (Option<Transition>, bool) {
        self.update_counting(|h| {
            let was_down = !h.up;
            *h = Health::default();
            was_down.then_some(Transition::CameUp)
        })
    }

    /// Makes the backend count in its service's tally, or not. `Some(down)`
    /// when that changed, with whether it is down: the caller moves the tally.
    pub fn set_counted(&self, counted: bool) -> Option<bool> {
        let want = if counted { COUNTED } else { 0 };
        let bits = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
            (bits & COUNTED != want).then_some((bits & !COUNTED) | want)
        });
        bits.ok().map(|old| !Health::from_bits(old).is_up())
    }
}

/// How many of a service's backends count for fail-open, and how many of
/// those are down: `[counted 32 | down 32]` in one atomic word, so a pick
/// reads one load and a scrape never sees the halves disagree.
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    /// Whether every counted backend is down (and there is at least one).
    pub fn all_down(&self) -> bool {
        Self::all_down_in(self.0.load(Ordering::Acquire))
    }

    fn all_down_in(bits: u64) -> bool {
        let (counted, down) = ((bits >> 32) as u32, bits as u32);
        counted > 0 && down == counted
    }

    /// Moves the counts; `Some(all_down)` when that flipped, so exactly one
    /// caller logs each flip. Each half wraps on its own: two updates of the
    /// same backend racing in the other order pass through a state where
    /// `down` is one below zero (never "all down"), and end exact.
    pub fn change(&self, counted: i32, down: i32) -> Option<bool> {
        let moved = |bits: u64| {
            let shift = |half: u64, by: i32| u64::from((half as u32).wrapping_add_signed(by));
            shift(bits >> 32, counted) << 32 | shift(bits, down)
        };
        // Every step from `old` to `moved(old)` is one compare-and-swap: the flips the steps report are exact.
        let old = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| Some(moved(bits)));
        let old = old.unwrap_or_else(|bits| bits);
        let (was, is) = (Self::all_down_in(old), Self::all_down_in(moved(old)));
        (was != is).then_some(is)
    }

    /// The counts now: (counted, down).
    pub fn counts(&self) -> (u32, u32) {
        let bits = self.0.load(Ordering::Acquire);
        ((bits >> 32) as u32, bits as u32)
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
    fn the_counted_bit_survives_updates_and_says_when_it_changes() {
        let shared = SharedHealth::default();
        assert_eq!(shared.set_counted(true), Some(false), "counted now, and up");
        assert_eq!(shared.set_counted(true), None, "no change");
        let (transition, counted) = shared.update_counting(|h| h.record_check(false, 1, 1));
        assert_eq!((transition, counted), (Some(Transition::WentDown), true));
        assert!(!shared.is_up());
        assert_eq!(shared.set_counted(false), Some(true), "uncounted while down");
        assert_eq!(shared.reset(), (Some(Transition::CameUp), false));
        assert_eq!(shared.reset(), (None, false));
    }

    #[test]
    fn a_tally_is_all_down_only_when_every_counted_backend_is_down() {
        let tally = Tally::default();
        assert!(!tally.all_down(), "nothing counted is never all down");
        assert_eq!(tally.change(2, 0), None);
        assert_eq!(tally.change(0, 1), None);
        assert_eq!(tally.change(0, 1), Some(true), "the second of two went down");
        assert!(tally.all_down());
        assert_eq!(tally.change(0, -1), Some(false));
        assert_eq!(tally.change(-1, 0), Some(true), "the up one left: the rest are all down");
        assert_eq!(tally.counts(), (1, 1));
    }

    #[test]
    fn a_tally_passes_below_zero_and_back_without_flipping() {
        let tally = Tally::default();
        tally.change(1, 0);
        // A CameUp counted before the WentDown it follows.
        assert_eq!(tally.change(0, -1), None);
        assert!(!tally.all_down());
        assert_eq!(tally.counts().0, 1, "the down half never borrows from the other");
        assert_eq!(tally.change(0, 1), None);
        assert_eq!(tally.counts(), (1, 0));
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
