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

/// Takes one figure out of a run.
type Extract = fn(&Run) -> Option<f64>;

/// One workload run, summarised.
#[derive(Debug)]
struct Run {
    kind: Kind,
    round: usize,
    workload: Workload,
    secs: f64,
    bytes: u64,
    ops: u64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    proxy_cpu: Option<f64>,
    load_cpu: f64,
    /// Busy fraction of the load generator's and the proxy's CPU.
    load_core: Option<f64>,
    proxy_core: Option<f64>,
}

#[derive(Debug)]
pub struct Results {
    pub header: Vec<String>,
    kinds: Vec<Kind>,
    load_cpu: Option<usize>,
    proxy_cpu: Option<usize>,
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
    pub fn new(kinds: Vec<Kind>, load_cpu: Option<usize>, proxy_cpu: Option<usize>) -> Results {
        Results {
            header: Vec::new(),
            kinds,
            load_cpu,
            proxy_cpu,
            runs: Vec::new(),
            memory: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn record(&mut self, kind: Kind, workload: Workload, round: usize, mut outcome: Outcome) {
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
            round,
            workload,
            secs: outcome.secs,
            bytes: outcome.bytes,
            ops: outcome.ops,
            p50_us,
            p99_us,
            proxy_cpu: outcome.proxy_cpu.map(|d| d.as_secs_f64()),
            load_cpu: outcome.load_cpu.as_secs_f64(),
            load_core: self.load_cpu.and_then(|c| outcome.core_busy.get(c).copied()),
            proxy_core: self.proxy_cpu.and_then(|c| outcome.core_busy.get(c).copied()),
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

    /// The per-round figures behind `id` (those that are medians of rounds).
    fn per_round(&self, id: &str, kind: Kind) -> Option<Vec<f64>> {
        self.by_round(id, kind).map(|v| v.into_iter().map(|(_, x)| x).collect())
    }

    /// Like `per_round`, with each value's round.
    fn by_round(&self, id: &str, kind: Kind) -> Option<Vec<(usize, f64)>> {
        let rate: Extract = |r| Some(r.ops as f64 / r.secs);
        let gbps: Extract = |r| Some(r.bytes as f64 * 8.0 / r.secs / 1e9);
        let p50: Extract = |r| r.p50_us;
        let p99: Extract = |r| r.p99_us;
        let (workload, f): (Workload, Extract) = match id {
            "bulk1" => (Workload::Bulk1, gbps),
            "bulk8" => (Workload::Bulk8, gbps),
            "rps" => (Workload::Rr, rate),
            "rr_p50" => (Workload::Rr, p50),
            "rr_p99" => (Workload::Rr, p99),
            "cps" => (Workload::Conn, rate),
            "conn_p50" => (Workload::Conn, p50),
            "conn_p99" => (Workload::Conn, p99),
            _ => return None,
        };
        Some(self.runs(kind, workload).filter_map(|r| f(r).map(|v| (r.round, v))).collect())
    }

    /// `a ÷ b` for figure `id`: the median of the per-round ratios where the
    /// figure is per round (the targets of one round run back to back, so slow
    /// drifts of a shared machine cancel out), else the ratio of the figures.
    fn ratio(&self, id: &str, a: Kind, b: Kind) -> Option<f64> {
        match (self.by_round(id, a), self.by_round(id, b)) {
            (Some(a), Some(b)) => median(
                a.iter()
                    .filter_map(|&(round, x)| {
                        b.iter().find(|(r, _)| *r == round).and_then(|&(_, y)| ratio(Some(x), Some(y)))
                    })
                    .collect(),
            ),
            _ => ratio(self.figure(id, a), self.figure(id, b)),
        }
    }

    fn figure(&self, id: &str, kind: Kind) -> Option<f64> {
        if let Some(values) = self.per_round(id, kind) {
            return median(values);
        }
        match id {
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
            let arrow = if better == Better::Higher { "↑" } else { "↓" };
            let mut row = vec![format!("{label} {arrow}")];
            row.extend(values.iter().map(|&v| cell(v)));
            if has(Kind::Shuttle) && has(Kind::Haproxy) {
                let r = self.ratio(id, Kind::Shuttle, Kind::Haproxy);
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
                    row.push(ratio_cell(self.ratio(id, k, Kind::Direct)));
                }
            }
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let _ = writeln!(
            out,
            "\n↑ higher is better, ↓ lower is better. A ratio is the median of the rounds' ratios (the targets of \
             a round run back to back), or the ratio of the pooled figures (4, 5).\n"
        );

        // How much the rounds disagreed: the range behind each median.
        if self.runs.iter().any(|r| self.runs(r.kind, r.workload).count() > 1) {
            let mut head = vec!["range over rounds (min – max)".to_string()];
            head.extend(self.kinds.iter().map(|k| k.name().to_string()));
            let _ = writeln!(out, "| {} |", head.join(" | "));
            let _ = writeln!(out, "|---|{}", "---:|".repeat(self.kinds.len()));
            for (id, label, _, _) in FIGURES {
                let mut row = vec![label.to_string()];
                let mut any = false;
                for &kind in &self.kinds {
                    let values = self.per_round(id, kind).unwrap_or_default();
                    let min = values.iter().copied().reduce(f64::min);
                    let max = values.iter().copied().reduce(f64::max);
                    row.push(match (min, max) {
                        (Some(min), Some(max)) => {
                            any = true;
                            format!("{} – {}", number(min), number(max))
                        }
                        _ => "—".into(),
                    });
                }
                if any {
                    let _ = writeln!(out, "| {} |", row.join(" | "));
                }
            }
            let _ = writeln!(out);
        }

        // Where the bottleneck is: how busy each core was during each workload's window.
        let mut head = vec!["CPU use in the window".to_string()];
        head.extend(self.kinds.iter().map(|k| k.name().to_string()));
        let _ = writeln!(out, "| {} |", head.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(self.kinds.len()));
        for workload in [Workload::Bulk1, Workload::Bulk8, Workload::Rr, Workload::Conn] {
            if self.runs.iter().all(|r| r.workload != workload) {
                continue;
            }
            let mut row = vec![workload.label().to_string()];
            for &kind in &self.kinds {
                let pct = |f: &dyn Fn(&Run) -> Option<f64>| self.median_of(kind, workload, |r| f(r).map(|v| 100.0 * v));
                let load_core = pct(&|r| r.load_core);
                let proxy_core = pct(&|r| r.proxy_core);
                let load = pct(&|r| Some(r.load_cpu / r.secs));
                let proxy = pct(&|r| r.proxy_cpu.map(|c| c / r.secs));
                let core = |v: Option<f64>| v.map_or_else(String::new, |v| format!(" (core {v:.0}%)"));
                let mut text = String::new();
                if let Some(proxy) = proxy {
                    let _ = write!(text, "proxy {proxy:.0}%{} · ", core(proxy_core));
                }
                match load {
                    Some(load) => {
                        let _ = write!(text, "load {load:.0}%{}", core(load_core));
                    }
                    None => text.push('—'),
                }
                let busy = |process: Option<f64>, core: Option<f64>| core.or(process).is_some_and(|v| v >= 90.0);
                let verdict = match (busy(proxy, proxy_core) && proxy.is_some(), busy(load, load_core)) {
                    (true, true) => "both",
                    (true, false) => "proxy-bound",
                    (false, true) => "load-bound",
                    (false, false) => "neither",
                };
                let _ = write!(text, " → {verdict}");
                row.push(text);
            }
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let _ = writeln!(
            out,
            "\nPer cent of one core: \"proxy\" is the proxy process, \"load\" the load generator and backend \
             processes; \"core\" is how busy that CPU was in all (anything but idle, incl. kernel network work \
             charged to no process). A core ≥ 90% busy is the bottleneck; \"neither\" means both cores idled \
             part of the time: the run was bound by round trips between them.\n"
        );
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }
}
