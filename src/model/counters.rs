//! Counters and health of a backend, shared by every loop that proxies to it:
//! each loop adds with relaxed atomics (no lock on the byte path), and the
//! stats API reads the process's exact sums.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::health::{SharedHealth, Tally};
use crate::model::histogram::{Histogram, CONNECT_BOUNDS, DURATION_BOUNDS};
use crate::model::limits::Gate;

/// Counters of one backend, as the stats API and the metrics show them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes client → backend.
    pub sent: u64,
    /// Bytes backend → client.
    pub received: u64,
    /// Failed connects and backend-side failures.
    pub errors: u64,
    /// Failed connects alone (metrics only; the stats API shows `errors`).
    pub connect_errors: u64,
    /// Connections established, in all.
    pub connections: u64,
    /// Connections open or being opened now.
    pub active: u64,
    /// Health checks passed.
    pub check_success: u64,
    /// Health checks failed.
    pub check_fail: u64,
}

/// One counter that any loop may add to.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Relaxed: a counter orders nothing else.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes one away, never below zero.
    pub fn sub_one(&self) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Adds one unless that would pass `limit` (0: no limit); `false` when at
    /// the limit. One compare-and-swap: two loops can't both take the last slot.
    pub fn try_add_below(&self, limit: u64) -> bool {
        if limit == 0 {
            self.add(1);
            return true;
        }
        self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| (v < limit).then_some(v + 1)).is_ok()
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What every loop shares of one backend.
#[derive(Debug, Default)]
pub struct BackendState {
    /// Bytes client → backend.
    pub sent: Counter,
    /// Bytes backend → client.
    pub received: Counter,
    /// Failed connects and backend-side failures.
    pub errors: Counter,
    /// Failed connects alone (a part of `errors`).
    pub connect_errors: Counter,
    /// Connections established, in all.
    pub connections: Counter,
    /// Connections open or being opened now, over all loops (LC balances on it).
    pub active: Counter,
    /// Health checks passed.
    pub check_success: Counter,
    /// Health checks failed.
    pub check_fail: Counter,
    /// Up or down, and the current run of results.
    pub health: SharedHealth,
    /// Times it was marked down: a loop whose count differs has pairs to cut.
    pub downs: Counter,
    /// UDP datagrams client → backend.
    pub datagrams_sent: Counter,
    /// UDP datagrams backend → client.
    pub datagrams_received: Counter,
}

impl BackendState {
    /// The counters now.
    pub fn counters(&self) -> Counters {
        Counters {
            sent: self.sent.get(),
            received: self.received.get(),
            errors: self.errors.get(),
            connect_errors: self.connect_errors.get(),
            connections: self.connections.get(),
            active: self.active.get(),
            check_success: self.check_success.get(),
            check_fail: self.check_fail.get(),
        }
    }
}

/// What every loop shares of one service besides its backends.
#[derive(Debug)]
pub struct ServiceState {
    /// Clients that found no backend to go to (and local connect failures): the stats API's own errors.
    pub errors: Counter,
    /// Clients closed without a backend: none was available, or every connect failed.
    pub no_backend: Counter,
    /// Clients closed for a missing, malformed, slow or oversized PROXY header.
    pub proxy_header_errors: Counter,
    /// How long established backend connects took.
    pub connect_time: Histogram,
    /// How long finished connections lasted, from accept to close.
    pub duration: Histogram,
    /// Its connection limit and queue as every loop shares them.
    pub gate: Gate,
    /// Its backends that count for fail-open, and how many of those are down.
    pub tally: Tally,
    /// A UDP service's flows and dropped datagrams.
    pub udp: UdpState,
}

/// What every loop shares of a UDP service's flows.
#[derive(Debug, Default)]
pub struct UdpState {
    /// Flows open now, over every worker (bounded by `max_flows`).
    pub flows: Counter,
    /// Datagrams dropped because no backend could take a new flow.
    pub dropped_no_backend: Counter,
    /// Datagrams dropped because the service was at `max_flows`.
    pub dropped_flow_limit: Counter,
    /// Datagrams dropped because a send failed (a full socket buffer, an unreachable backend).
    pub dropped_send_error: Counter,
}

impl Default for ServiceState {
    fn default() -> Self {
        ServiceState::for_loops(1)
    }
}

impl ServiceState {
    /// The state of a service that `loops` loops serve.
    pub fn for_loops(loops: usize) -> ServiceState {
        ServiceState {
            errors: Counter::default(),
            no_backend: Counter::default(),
            proxy_header_errors: Counter::default(),
            connect_time: Histogram::new(CONNECT_BOUNDS),
            duration: Histogram::new(DURATION_BOUNDS),
            gate: Gate::new(loops),
            tally: Tally::default(),
            udp: UdpState::default(),
        }
    }
}

/// Admin responses by status code, counted as they are sent.
#[derive(Debug)]
pub struct StatusCounts {
    /// Index `status - 100`, for 100..=599.
    by_status: Box<[Counter]>,
}

impl Default for StatusCounts {
    fn default() -> Self {
        StatusCounts { by_status: (100..600).map(|_| Counter::default()).collect() }
    }
}

impl StatusCounts {
    /// Counts one response with `status`; a code outside 100..=599 is never sent, so never counted.
    pub fn count(&self, status: u16) {
        if let Some(c) = status.checked_sub(100).and_then(|i| self.by_status.get(usize::from(i))) {
            c.add(1);
        }
    }

    /// Every status sent at least once, with its count, in ascending order.
    pub fn nonzero(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        (100u16..).zip(self.by_status.iter()).map(|(s, c)| (s, c.get())).filter(|&(_, n)| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_never_goes_below_zero() {
        let state = BackendState::default();
        state.active.add(1);
        state.active.sub_one();
        state.active.sub_one();
        assert_eq!(state.counters().active, 0);
    }

    #[test]
    fn a_limit_is_never_passed_by_concurrent_takers() {
        let active = std::sync::Arc::new(Counter::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let active = active.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| active.try_add_below(7)).count())
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!((taken, active.get()), (7, 7));
        assert!(active.try_add_below(0), "0 is no limit");
    }

    #[test]
    fn statuses_outside_the_http_range_are_not_counted() {
        let counts = StatusCounts::default();
        counts.count(200);
        counts.count(200);
        counts.count(599);
        counts.count(99);
        counts.count(600);
        assert_eq!(counts.nonzero().collect::<Vec<_>>(), vec![(200, 2), (599, 1)]);
    }

    #[test]
    fn sums_are_exact_under_concurrent_adds() {
        let state = std::sync::Arc::new(BackendState::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let state = state.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| state.sent.add(3)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(state.counters().sent, 120_000);
    }
}
