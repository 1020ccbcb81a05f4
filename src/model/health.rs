//! Backend health (reference §4): the rise/fall counters that decide whether a
//! backend is up.
//!
//! `Health` is pure bookkeeping; the probe that feeds it from the event loop
//! lives in `probe.rs`, and failed client connects feed it from `proxy.rs`.

use std::fmt;

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
}
