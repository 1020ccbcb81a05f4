//! Collects every run's figures and prints them as markdown tables: the
//! figures with their ratios and targets, then where each workload's
//! bottleneck was (CPU use of the proxy and of the load generator).

use std::fmt::Write as _;

use crate::load::Outcome;
use crate::proxy::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Bulk1,
    Bulk8,
    Rr,
    Conn,
    Idle,
}

impl Workload {
    pub const ALL: [Workload; 5] = [Workload::Bulk1, Workload::Bulk8, Workload::Rr, Workload::Conn, Workload::Idle];

    pub fn parse(s: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.id() == s)
    }

    pub fn id(self) -> &'static str {
        match self {
            Workload::Bulk1 => "bulk1",
            Workload::Bulk8 => "bulk8",
            Workload::Rr => "rr",
            Workload::Conn => "conn",
            Workload::Idle => "idle",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::Bulk1 => "bulk, 1 stream",
            Workload::Bulk8 => "bulk, 8 streams",
            Workload::Rr => "request/response, 50 connections",
            Workload::Conn => "new connections",
            Workload::Idle => "idle connections",
        }
    }
}

/// The memory figure of one proxy.
#[derive(Debug)]
pub struct Memory {
    pub before: u64,
    pub after: u64,
    pub held: usize,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// One workload run, summarised.
#[derive(Debug)]
struct Run {
    kind: Kind,
    workload: Workload,
    secs: f64,
    bytes: u64,
    ops: u64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    proxy_cpu: Option<f64>,
    load_cpu: f64,
}

#[derive(Debug)]
pub struct Results {
    pub header: Vec<String>,
    kinds: Vec<Kind>,
    runs: Vec<Run>,
    memory: Vec<(Kind, Memory)>,
    notes: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// What the issue asks of shuttle ÷ HAProxy.
#[derive(Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        // Thousands separated, as in "123,456".
        let digits = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 && c.is_ascii_digit() {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), number)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or_else(|| "—".into(), |r| format!("{r:.2}×"))
}

impl Results {
    pub fn new(kinds: Vec<Kind>) -> Results {
        Results { header: Vec::new(), kinds, runs: Vec::new(), memory: Vec::new(), notes: Vec::new() }
    }

    pub fn record(&mut self, kind: Kind, workload: Workload, mut outcome: Outcome) {
        if outcome.errors > 0 {
            self.notes.push(format!(
                "{} via {}: {} failed connection(s) in the window (last: {})",
                workload.label(),
                kind.name(),
                outcome.errors,
                outcome.last_error.as_deref().unwrap_or("?")
            ));
        }
        let p50_us = outcome.quantile_us(0.50);
        let p99_us = outcome.quantile_us(0.99);
        self.runs.push(Run {
            kind,
            workload,
            secs: outcome.secs,
            bytes: outcome.bytes,
            ops: outcome.ops,
            p50_us,
            p99_us,
            proxy_cpu: outcome.proxy_cpu.map(|d| d.as_secs_f64()),
            load_cpu: outcome.load_cpu.as_secs_f64(),
        });
    }

    pub fn memory(&mut self, kind: Kind, memory: Memory) {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut note = format!(
            "memory, {}: RSS {:.1} MiB before, {:.1} MiB with {} idle connections open",
            kind.name(),
            mib(memory.before),
            mib(memory.after),
            memory.held
        );
        if memory.errors > 0 {
            let _ = write!(
                note,
                "; {} failed connects (last: {})",
                memory.errors,
                memory.last_error.as_deref().unwrap_or("?")
            );
        }
        self.notes.push(note);
        self.memory.push((kind, memory));
    }

    fn runs(&self, kind: Kind, workload: Workload) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.kind == kind && r.workload == workload)
    }

    fn median_of(&self, kind: Kind, workload: Workload, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        median(self.runs(kind, workload).filter_map(f).collect())
    }

    /// Proxy CPU seconds per `unit` of `amount` over every run of `workloads` (pooled, not a median).
    fn cpu_per(&self, kind: Kind, workloads: &[Workload], amount: impl Fn(&Run) -> f64, unit: f64) -> Option<f64> {
        let runs: Vec<&Run> = workloads.iter().flat_map(|&w| self.runs(kind, w)).collect();
        let cpu: f64 = runs.iter().map(|r| r.proxy_cpu).sum::<Option<f64>>()?;
        let total: f64 = runs.iter().map(|r| amount(r)).sum();
        (total > 0.0).then(|| cpu / total * unit)
    }

    fn figure(&self, id: &str, kind: Kind) -> Option<f64> {
        let rate = |r: &Run| Some(r.ops as f64 / r.secs);
        let gbps = |r: &Run| Some(r.bytes as f64 * 8.0 / r.secs / 1e9);
        match id {
            "bulk1" => self.median_of(kind, Workload::Bulk1, gbps),
            "bulk8" => self.median_of(kind, Workload::Bulk8, gbps),
            "rps" => self.median_of(kind, Workload::Rr, rate),
            "rr_p50" => self.median_of(kind, Workload::Rr, |r| r.p50_us),
            "rr_p99" => self.median_of(kind, Workload::Rr, |r| r.p99_us),
            "cps" => self.median_of(kind, Workload::Conn, rate),
            "conn_p50" => self.median_of(kind, Workload::Conn, |r| r.p50_us),
            "conn_p99" => self.median_of(kind, Workload::Conn, |r| r.p99_us),
            "memory" => self
                .memory
                .iter()
                .find(|(k, m)| *k == kind && m.held > 0)
                .map(|(_, m)| (m.after as f64 - m.before as f64) / m.held as f64),
            "cpu_gb" => self.cpu_per(kind, &[Workload::Bulk1, Workload::Bulk8], |r| r.bytes as f64, 1e9),
            "cpu_req" => self.cpu_per(kind, &[Workload::Rr], |r| r.ops as f64, 1e5),
            "cpu_conn" => self.cpu_per(kind, &[Workload::Conn], |r| r.ops as f64, 1e5),
            _ => None,
        }
    }

    pub fn render(&self) -> String {
        const FIGURES: [(&str, &str, Better, Option<Goal>); 12] = [
            ("bulk1", "1. Bulk throughput, 1 stream (Gbit/s)", Better::Higher, Some(Goal::AtLeast(1.0))),
            ("bulk8", "1. Bulk throughput, 8 streams (Gbit/s)", Better::Higher, Some(Goal::AtLeast(1.0))),
            ("rps", "2. Requests/s, 64 B echo, 50 persistent connections", Better::Higher, Some(Goal::AtLeast(1.1))),
            ("rr_p50", "2. Request latency p50 (µs)", Better::Lower, None),
            ("rr_p99", "2. Request latency p99 (µs)", Better::Lower, Some(Goal::AtMost(1.0))),
            ("cps", "3. New connections/s, one 64 B exchange each", Better::Higher, Some(Goal::AtLeast(1.1))),
            ("conn_p50", "3. Connect-to-reply p50 (µs)", Better::Lower, None),
            ("conn_p99", "3. Connect-to-reply p99 (µs)", Better::Lower, None),
            (
                "memory",
                "4. Memory per idle proxied connection (bytes of proxy RSS)",
                Better::Lower,
                Some(Goal::AtMost(0.5)),
            ),
            ("cpu_gb", "5. Proxy CPU seconds per GB relayed", Better::Lower, Some(Goal::AtMost(1.0))),
            ("cpu_req", "5. Proxy CPU seconds per 100k requests", Better::Lower, None),
            ("cpu_conn", "5. Proxy CPU seconds per 100k new connections", Better::Lower, None),
        ];
        let has = |k: Kind| self.kinds.contains(&k);
        let mut out = String::new();
        let _ = writeln!(out);
        for line in &self.header {
            let _ = writeln!(out, "- {line}");
        }
        let _ = writeln!(out);
        let mut columns = vec!["figure".to_string()];
        columns.extend(self.kinds.iter().map(|k| k.name().to_string()));
        if has(Kind::Shuttle) && has(Kind::Haproxy) {
            columns.push("shuttle ÷ HAProxy".into());
            columns.push("target".into());
        }
        if has(Kind::Direct) {
            columns.extend(self.kinds.iter().filter(|&&k| k != Kind::Direct).map(|k| format!("{} ÷ direct", k.name())));
        }
        let _ = writeln!(out, "| {} |", columns.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            columns.iter().enumerate().map(|(i, _)| if i == 0 { "---|" } else { "---:|" }).collect::<String>()
        );
        for (id, label, better, goal) in FIGURES {
            let values: Vec<Option<f64>> = self.kinds.iter().map(|&k| self.figure(id, k)).collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            let value = |k: Kind| self.kinds.iter().position(|&x| x == k).and_then(|i| values[i]);
            let arrow = if better == Better::Higher { "↑" } else { "↓" };
            let mut row = vec![format!("{label} {arrow}")];
            row.extend(values.iter().map(|&v| cell(v)));
            if has(Kind::Shuttle) && has(Kind::Haproxy) {
                let r = ratio(value(Kind::Shuttle), value(Kind::Haproxy));
                row.push(ratio_cell(r));
                row.push(match (goal, r) {
                    (None, _) => "—".into(),
                    (Some(Goal::AtLeast(g)), Some(r)) => format!("≥ {g:.1}× {}", if r >= g { "✓" } else { "✗" }),
                    (Some(Goal::AtMost(g)), Some(r)) => format!("≤ {g:.1}× {}", if r <= g { "✓" } else { "✗" }),
                    (Some(Goal::AtLeast(g)), None) => format!("≥ {g:.1}×"),
                    (Some(Goal::AtMost(g)), None) => format!("≤ {g:.1}×"),
                });
            }
            if has(Kind::Direct) {
                for &k in self.kinds.iter().filter(|&&k| k != Kind::Direct) {
                    row.push(ratio_cell(ratio(value(k), value(Kind::Direct))));
                }
            }
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let _ = writeln!(out, "\n↑ higher is better, ↓ lower is better; ratios are of the medians.\n");

        // Where the bottleneck is: CPU use of each side during each workload's window.
        let mut head = vec!["CPU use in the window (% of one core)".to_string()];
        head.extend(self.kinds.iter().map(|k| k.name().to_string()));
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(self.kinds.len()));
        for workload in [Workload::Bulk1, Workload::Bulk8, Workload::Rr, Workload::Conn] {
            if self.runs.iter().all(|r| r.workload != workload) {
                continue;
            }
            let mut row = vec![workload.label().to_string()];
            for &kind in &self.kinds {
                let load = self.median_of(kind, workload, |r| Some(100.0 * r.load_cpu / r.secs));
                let proxy = self.median_of(kind, workload, |r| r.proxy_cpu.map(|c| 100.0 * c / r.secs));
                row.push(match (proxy, load) {
                    (_, None) => "—".into(),
                    (None, Some(load)) => format!("load {load:.0}% → {}", bottleneck(None, load)),
                    (Some(proxy), Some(load)) => {
                        format!("proxy {proxy:.0}% · load {load:.0}% → {}", bottleneck(Some(proxy), load))
                    }
                });
            }
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let _ = writeln!(
            out,
            "\n\"load\" is this bench process (clients and backends, one core); a side at ≥ 90% of its core is \
             the bottleneck, neither means the run was latency-bound.\n"
        );
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }
}

fn bottleneck(proxy: Option<f64>, load: f64) -> &'static str {
    match (proxy.is_some_and(|p| p >= 90.0), load >= 90.0) {
        (true, true) => "both",
        (true, false) => "proxy-bound",
        (false, true) => "load-bound",
        (false, false) => "neither",
    }
}
