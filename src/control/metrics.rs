//! `GET /metrics` (reference §5.1): every counter of the process in the
//! Prometheus text exposition format, version 0.0.4.
//!
//! The counters are the atomics every loop already adds to, so a scrape sums
//! nothing over workers and takes no lock: it reads each figure once and
//! writes it. Families are written whole, one after another (the format
//! wants a family's samples together), each with its `# HELP` and `# TYPE`.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::control::info::COMMIT;
use crate::model::config::Protocol;
use crate::model::counters::{BackendState, Counters, StatusCounts};
use crate::model::histogram::Snapshot;
use crate::model::service::{Service, Services};
use crate::runtime::key::Key;
use crate::runtime::procfs;

/// The exposition's media type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What only the loop knows of the process, for the process families.
#[derive(Debug, Clone, Copy)]
pub struct Process<'a> {
    /// When the process started.
    pub started: SystemTime,
    /// Worker loops that proxy.
    pub workers: usize,
    /// Connections open now, over every worker.
    pub active: u64,
    /// The fd limit.
    pub max_fds: u64,
    /// Admin responses sent, by status.
    pub admin: &'a StatusCounts,
    /// Access-log lines written and dropped, when the access log is on.
    pub access_log: Option<(u64, u64)>,
}

type Labels<'a> = [(&'a str, &'a str)];

/// One figure of a backend's shared state.
type BackendFigure = fn(&BackendState) -> u64;

/// A backend family: name, type, help, and which counter it shows.
type BackendFamily = (&'static str, &'static str, &'static str, fn(&Counters) -> u64);

/// The exposition text: the process first, then services, then backends.
pub fn render(services: &Services, process: &Process<'_>) -> String {
    let backends: Vec<Key> =
        services.keys().filter_map(|k| services.service(k)).flat_map(|s| s.backends.clone()).collect();
    // About 90 bytes a sample, 9 samples a backend: one allocation for most scrapes.
    let mut out = Out(String::with_capacity(4096 + backends.len() * 900));
    out.process(services, process);
    out.services(services);
    out.backends(services, &backends);
    out.0
}

struct Out(String);

/// Reads one figure of a service's shared gate.
type GateFigure = fn(&crate::model::limits::Gate) -> u64;

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    fn sample(&mut self, name: &str, labels: &Labels<'_>, value: impl std::fmt::Display) {
        self.0.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.0, " {value}");
    }

    fn labels(&mut self, labels: &Labels<'_>, le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.0.push('{');
        let le = le.map(|v| ("le", v));
        for (i, (name, value)) in labels.iter().copied().chain(le).enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            self.0.push_str(name);
            self.0.push_str("=\"");
            escape(&mut self.0, value);
            self.0.push('"');
        }
        self.0.push('}');
    }

    /// One gauge or counter family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, labels: &Labels<'_>, snapshot: &Snapshot) {
        let bucket = format!("{name}_bucket");
        for &(bound, count) in &snapshot.buckets {
            self.0.push_str(&bucket);
            self.labels(labels, Some(&seconds(bound)));
            let _ = writeln!(self.0, " {count}");
        }
        self.0.push_str(&bucket);
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.0, " {}", snapshot.count);
        self.sample(&format!("{name}_sum"), labels, seconds(snapshot.sum_micros));
        self.sample(&format!("{name}_count"), labels, snapshot.count);
    }

    fn process(&mut self, services: &Services, p: &Process<'_>) {
        self.family("shuttle_build_info", "gauge", "Always 1; the labels say which shuttle runs.");
        self.sample(
            "shuttle_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT.unwrap_or(""))],
            1,
        );
        let started = p.started.duration_since(UNIX_EPOCH).unwrap_or_default();
        let started = format!("{}.{:03}", started.as_secs(), started.subsec_millis());
        self.single(
            "shuttle_start_time_seconds",
            "gauge",
            "When the process started, in seconds since the Unix epoch.",
            started,
        );
        if let Ok(n) = procfs::open_fds() {
            self.single("shuttle_open_fds", "gauge", "File descriptors the process holds open.", n);
        }
        self.single("shuttle_max_fds", "gauge", "The process's file descriptor limit.", p.max_fds);
        if let Ok(n) = procfs::resident_bytes() {
            self.single("shuttle_resident_memory_bytes", "gauge", "Resident memory of the process.", n);
        }
        self.single("shuttle_workers", "gauge", "Worker loops that proxy.", p.workers);
        self.single("shuttle_services", "gauge", "Services running.", services.len());
        let backends: usize = services.keys().filter_map(|k| services.service(k)).map(|s| s.backends.len()).sum();
        self.single("shuttle_backends", "gauge", "Backends of the running services.", backends);
        self.single("shuttle_active_connections", "gauge", "Client connections open now, over every worker.", p.active);
        self.family("shuttle_admin_requests_total", "counter", "Admin API responses sent, by HTTP status.");
        for (status, n) in p.admin.nonzero() {
            self.sample("shuttle_admin_requests_total", &[("code", &status.to_string())], n);
        }
        if let Some((written, dropped)) = p.access_log {
            self.single("shuttle_access_log_lines_total", "counter", "Access-log lines written.", written);
            let help = "Access-log lines dropped because the log's sink did not keep up.";
            self.single("shuttle_access_log_dropped_lines_total", "counter", help, dropped);
        }
    }

    fn services(&mut self, services: &Services) {
        let running: Vec<_> = services.keys().filter_map(|k| services.service(k)).collect();
        // Counts clients, where a backend's connect errors count attempts: a client
        // whose every connect failed is one here and one per attempt there.
        let help = "Clients closed without a backend: none was available (none configured, all down or drained), \
                    or every connect failed.";
        self.family("shuttle_service_no_backend_errors_total", "counter", help);
        for s in &running {
            self.sample(
                "shuttle_service_no_backend_errors_total",
                &[("service", &s.settings.name)],
                s.state.no_backend.get(),
            );
        }
        let queues: [(&str, &str, &str, GateFigure); 2] = [
            ("shuttle_service_queued", "gauge", "Clients waiting now for a backend slot.", |g| g.queued.get()),
            (
                "shuttle_service_queue_timeouts_total",
                "counter",
                "Queued clients closed because their queue_timeout passed.",
                |g| g.queue_timeouts.get(),
            ),
        ];
        for (name, kind, help, value) in queues {
            self.family(name, kind, help);
            for s in &running {
                self.sample(name, &[("service", &s.settings.name)], value(&s.state.gate));
            }
        }
        let help =
            "Clients of an accept_proxy service closed for a missing, malformed, slow or oversized PROXY header.";
        self.family("shuttle_service_proxy_header_errors_total", "counter", help);
        for s in &running {
            let errors = s.state.proxy_header_errors.get();
            self.sample("shuttle_service_proxy_header_errors_total", &[("service", &s.settings.name)], errors);
        }
        self.family("shuttle_service_connect_seconds", "histogram", "Time to establish a backend connection.");
        for s in &running {
            self.histogram(
                "shuttle_service_connect_seconds",
                &[("service", &s.settings.name)],
                &s.state.connect_time.snapshot(),
            );
        }
        let help = "1 while the service is in fail-open: every backend is down, and new connections go to all of them as if up.";
        self.family("shuttle_service_fail_open_active", "gauge", help);
        for s in &running {
            self.sample("shuttle_service_fail_open_active", &[("service", &s.settings.name)], u8::from(s.fails_open()));
        }
        self.udp(services, &running);
        let help = "How long client connections lasted, from accept to close (not counting clients closed at accept for want of a backend).";
        self.family("shuttle_service_connection_duration_seconds", "histogram", help);
        for s in &running {
            let snapshot = s.state.duration.snapshot();
            self.histogram("shuttle_service_connection_duration_seconds", &[("service", &s.settings.name)], &snapshot);
        }
    }

    /// UDP services' flows, dropped datagrams and datagrams per backend (only UDP services have samples).
    fn udp(&mut self, services: &Services, running: &[&Service]) {
        let udp: Vec<_> = running.iter().filter(|s| s.settings.protocol == Protocol::Udp).collect();
        self.family("shuttle_service_udp_flows", "gauge", "UDP flows open now, over every worker.");
        for s in &udp {
            self.sample("shuttle_service_udp_flows", &[("service", &s.settings.name)], s.state.udp.flows.get());
        }
        let help = "UDP datagrams dropped: no_backend (none could take a new flow), flow_limit (the service was at \
                    max_flows or out of descriptors), send_error (a send failed or the backend refused).";
        self.family("shuttle_service_udp_dropped_datagrams_total", "counter", help);
        for s in &udp {
            let d = &s.state.udp;
            for (reason, n) in [
                ("no_backend", d.dropped_no_backend.get()),
                ("flow_limit", d.dropped_flow_limit.get()),
                ("send_error", d.dropped_send_error.get()),
            ] {
                self.sample(
                    "shuttle_service_udp_dropped_datagrams_total",
                    &[("service", &s.settings.name), ("reason", reason)],
                    n,
                );
            }
        }
        let per_backend: [(&str, &str, BackendFigure); 2] = [
            ("shuttle_backend_datagrams_sent_total", "UDP datagrams sent to the backend.", |b| b.datagrams_sent.get()),
            ("shuttle_backend_datagrams_received_total", "UDP datagrams received from the backend.", |b| {
                b.datagrams_received.get()
            }),
        ];
        for (name, help, value) in per_backend {
            self.family(name, "counter", help);
            for s in &udp {
                for b in s.backends.iter().filter_map(|&k| services.backend(k)) {
                    self.sample(name, &[("service", &s.settings.name), ("backend", &b.config.name)], value(&b.state));
                }
            }
        }
    }

    fn backends(&mut self, services: &Services, keys: &[Key]) {
        // Each backend's figures once, so its families agree with each other.
        let rows: Vec<(&str, &str, Counters, bool)> = keys
            .iter()
            .filter_map(|&k| services.backend(k))
            .map(|b| {
                let (service, backend) =
                    (services.service(b.service).map_or("", |s| s.settings.name.as_str()), b.config.name.as_str());
                (service, backend, b.state.counters(), b.state.health.is_up())
            })
            .collect();
        let families: [BackendFamily; 8] = [
            ("shuttle_backend_connections_total", "counter", "Connections established to the backend.", |c| {
                c.connections
            }),
            (
                "shuttle_backend_active_connections",
                "gauge",
                "Connections open or being opened to the backend now.",
                |c| c.active,
            ),
            ("shuttle_backend_sent_bytes_total", "counter", "Bytes sent to the backend (client to backend).", |c| {
                c.sent
            }),
            (
                "shuttle_backend_received_bytes_total",
                "counter",
                "Bytes received from the backend (backend to client).",
                |c| c.received,
            ),
            (
                "shuttle_backend_connect_errors_total",
                "counter",
                "Connects to the backend that failed or timed out.",
                |c| c.connect_errors,
            ),
            (
                "shuttle_backend_errors_total",
                "counter",
                "Failed connects and backend-side failures (the stats API's errors).",
                |c| c.errors,
            ),
            ("shuttle_backend_checks_passed_total", "counter", "Health checks of the backend that passed.", |c| {
                c.check_success
            }),
            ("shuttle_backend_checks_failed_total", "counter", "Health checks of the backend that failed.", |c| {
                c.check_fail
            }),
        ];
        for (name, kind, help, value) in families {
            self.family(name, kind, help);
            for (service, backend, counters, _) in &rows {
                self.sample(name, &[("service", service), ("backend", backend)], value(counters));
            }
        }
        self.family("shuttle_backend_up", "gauge", "1 when the backend is up, 0 when health marked it down.");
        for (service, backend, _, up) in &rows {
            self.sample("shuttle_backend_up", &[("service", service), ("backend", backend)], u8::from(*up));
        }
    }
}

/// A label value with `\`, `"` and newlines escaped, as the format asks.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Microseconds as decimal seconds, exactly and without trailing zeros: 2500 → "0.0025".
fn seconds(micros: u64) -> String {
    let (whole, fraction) = (micros / 1_000_000, micros % 1_000_000);
    if fraction == 0 {
        return whole.to_string();
    }
    let fraction = format!("{fraction:06}");
    format!("{whole}.{}", fraction.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(500), "0.0005");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(10_000_000), "10");
        assert_eq!(seconds(1_000_001), "1.000001");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape(&mut out, "a\"b\\c\nd");
        assert_eq!(out, r#"a\"b\\c\nd"#);
    }

    #[test]
    fn an_empty_process_renders_each_family_once_with_help_and_type() {
        let statuses = StatusCounts::default();
        statuses.count(200);
        let process = Process {
            started: UNIX_EPOCH + std::time::Duration::from_millis(1_500),
            workers: 2,
            active: 0,
            max_fds: 1024,
            admin: &statuses,
            access_log: None,
        };
        let text = render(&Services::default(), &process);
        assert!(text.contains("shuttle_start_time_seconds 1.500\n"), "{text}");
        assert!(text.contains("shuttle_workers 2\n"), "{text}");
        assert!(text.contains("shuttle_admin_requests_total{code=\"200\"} 1\n"), "{text}");
        let types: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        let mut names: Vec<&str> = types.iter().filter_map(|t| t.split(' ').next()).collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "a family declared twice");
        assert!(!text.contains("access_log"), "no access-log families while it is off");
    }
}
