//! `GET /_info` (reference §5.1): what a running shuttle is: its version and
//! build, its process, and how much it serves now.

use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::runtime::utc;

/// The commit the binary was built from: `SHUTTLE_BUILD_COMMIT` at build
/// time, else what `git` said in `build.rs`; `None` outside a checkout.
pub const COMMIT: Option<&str> = option_env!("SHUTTLE_COMMIT");

/// When the process started, on both clocks: the wall clock for the time shown,
/// the monotonic one for the uptime (the wall clock may be set back meanwhile).
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// The time of day it started.
    pub wall: SystemTime,
    /// The same instant on the monotonic clock.
    pub mono: Instant,
}

impl Started {
    /// Now.
    pub fn now() -> Started {
        Started { wall: SystemTime::now(), mono: Instant::now() }
    }
}

/// The body of `GET /_info`, in the order it is shown.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Info {
    /// The crate's version.
    pub version: &'static str,
    /// The build's commit, if known.
    pub commit: Option<&'static str>,
    /// The process id.
    pub pid: u32,
    /// When the process started, RFC 3339 in UTC.
    pub started: String,
    /// Whole seconds since then.
    pub uptime_seconds: u64,
    /// Worker loops that proxy (1: one loop does everything).
    pub workers: usize,
    /// Services running.
    pub services: usize,
    /// Their backends, summed.
    pub backends: usize,
    /// Connections open now, over every worker.
    pub active: u64,
    /// UDP flows open now, over every worker.
    pub flows: u64,
}

impl Info {
    /// The info of this process, given what only the loop knows.
    pub fn new(started: Started, now: Instant, workers: usize, services: usize, backends: usize, open: Open) -> Info {
        Info {
            version: env!("CARGO_PKG_VERSION"),
            commit: COMMIT,
            pid: std::process::id(),
            started: utc::rfc3339(started.wall),
            uptime_seconds: now.saturating_duration_since(started.mono).as_secs(),
            workers,
            services,
            backends,
            active: open.connections,
            flows: open.flows,
        }
    }
}

/// What is open now, over every worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open {
    /// TCP and unix connections.
    pub connections: u64,
    /// UDP flows.
    pub flows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fields_come_in_the_documented_order() {
        let started = Started::now();
        let open = Open { connections: 5, flows: 6 };
        let info = Info::new(started, started.mono + Duration::from_millis(2500), 2, 3, 4, open);
        assert_eq!(info.uptime_seconds, 2, "whole seconds, rounded down");
        let text = serde_json::to_string(&info).unwrap();
        let order = [
            "version",
            "commit",
            "pid",
            "started",
            "uptime_seconds",
            "workers",
            "services",
            "backends",
            "active",
            "flows",
        ];
        let at: Vec<usize> = order.iter().map(|k| text.find(&format!("\"{k}\"")).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.contains(r#""workers":2,"services":3,"backends":4,"active":5,"flows":6"#), "{text}");
    }

    #[test]
    fn an_uptime_is_never_negative() {
        let started = Started::now();
        let earlier = started.mono.checked_sub(Duration::from_secs(1)).unwrap_or(started.mono);
        assert_eq!(Info::new(started, earlier, 1, 0, 0, Open::default()).uptime_seconds, 0);
    }
}
