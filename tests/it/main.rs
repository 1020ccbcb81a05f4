//! Black-box tests of the real shuttle binary on loopback (DESIGN.md §14).
//!
//! One test binary with one module per area, so it links once. Each test
//! starts its own shuttle with a config templated in code (services on port 0,
//! backends on this process's own test servers) and reads the bound ports from
//! the "listening on" log lines.

// The support toolkit is shared with later modules (admin, health, state);
// not every helper is used by every set of tests.
#[allow(dead_code, unused_imports)]
mod support;

mod access_log;
mod admin;
mod audit;
mod balance;
mod check;
mod config_object;
mod cutting;
mod fail_open;
mod failover;
mod hardening;
mod health;
mod info;
mod limits;
mod limits_queue;
mod metrics;
mod notify;
mod patch;
mod privileges;
mod proxy;
mod proxy_interop;
mod proxy_protocol;
mod readme;
mod regressions;
mod reload;
mod shutdown;
mod stalls;
mod startup;
mod state;
mod timeouts;
mod udp;
mod unix;
mod upgrade;
mod upgrade_edges;
mod upgrade_failures;
mod workers;
