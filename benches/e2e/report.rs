//! Collects every run's figures and prints them as markdown tables: the
//! figures with their ratios and targets, each against direct, how much the
//! rounds disagreed, where each workload's bottleneck was (CPU use of the
//! proxy and of the load generator), how evenly the work spread over a
//! proxy's workers, and with `--workers` how shuttle scales with them.

use std::fmt::Write as _;
use std::time::Duration;

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
    /// CPU seconds of each worker of a proxy with several.
    workers: Vec<f64>,
    load_cpu: f64,
    /// Busy fraction of the load generator's and the proxy's CPU.
    load_core: Option<f64>,
    proxy_core: Option<f64>,
    /// Busy fraction of every allowed CPU, where proxies with several workers run.
    cores: Vec<f64>,
}

#[derive(Debug)]
pub struct Results {
    pub header: Vec<String>,
    kinds: Vec<Kind>,
    load_cpu: Option<usize>,
    proxy_cpu: Option<usize>,
    /// Every allowed CPU.
    cpus: Vec<usize>,
    /// `--workers`: the shuttle worker counts of the scaling table.
    scaling: Vec<usize>,
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

impl Goal {
    /// The goal, with whether `r` meets it when known: "≥ 1.1× ✓".
    fn cell(self, r: Option<f64>) -> String {
        let (sign, g, met) = match self {
            Goal::AtLeast(g) => ("≥", g, r.map(|r| r >= g)),
            Goal::AtMost(g) => ("≤", g, r.map(|r| r <= g)),
        };
        match met {
            Some(met) => format!("{sign} {g:.1}× {}", if met { "✓" } else { "✗" }),
            None => format!("{sign} {g:.1}×"),
        }
    }
}

/// The figures of the tables: id, label, which way is better, the goal of shuttle ÷ HAProxy.
const FIGURES: [(&str, &str, Better, Option<Goal>); 12] = [
    ("bulk1", "1. Bulk throughput, 1 stream (Gbit/s)", Better::Higher, Some(Goal::AtLeast(1.0))),
    ("bulk8", "1. Bulk throughput, 8 streams (Gbit/s)", Better::Higher, Some(Goal::AtLeast(1.0))),
    ("rps", "2. Requests/s, 64 B echo, 50 persistent connections", Better::Higher, Some(Goal::AtLeast(1.1))),
    ("rr_p50", "2. Request latency p50 (µs)", Better::Lower, None),
    ("rr_p99", "2. Request latency p99 (µs)", Better::Lower, Some(Goal::AtMost(1.0))),
    ("cps", "3. New connections/s, one 64 B exchange each", Better::Higher, Some(Goal::AtLeast(1.1))),
    ("conn_p50", "3. Connect-to-reply p50 (µs)", Better::Lower, None),
    ("conn_p99", "3. Connect-to-reply p99 (µs)", Better::Lower, None),
    ("memory", "4. Memory per idle proxied connection (bytes of proxy RSS)", Better::Lower, Some(Goal::AtMost(0.5))),
    ("cpu_gb", "5. Proxy CPU seconds per GB relayed", Better::Lower, Some(Goal::AtMost(1.0))),
    ("cpu_req", "5. Proxy CPU seconds per 100k requests", Better::Lower, None),
    ("cpu_conn", "5. Proxy CPU seconds per 100k new connections", Better::Lower, None),
];

/// The throughput workloads, in the order of the tables.
const THROUGHPUT: [Workload; 4] = [Workload::Bulk1, Workload::Bulk8, Workload::Rr, Workload::Conn];

/// What the scaling table asks of N workers against one: throughput ≥ 0.9 × N, CPU per unit within 10%.
const SCALING_THROUGHPUT: f64 = 0.9;
const SCALING_CPU: f64 = 1.1;

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
    /// Results of `kinds`; the load runs on the first of `cpus`, proxies with
    /// one worker on the second; `scaling` are the worker counts of `--workers`.
    pub fn new(kinds: Vec<Kind>, cpus: Vec<usize>, scaling: Vec<usize>) -> Results {
        Results {
            header: Vec::new(),
            kinds,
            load_cpu: cpus.first().copied().filter(|_| cpus.len() >= 2),
            proxy_cpu: cpus.get(1).copied(),
            cpus,
            scaling,
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
            workers: outcome.worker_cpu.iter().map(Duration::as_secs_f64).collect(),
            load_cpu: outcome.load_cpu.as_secs_f64(),
            load_core: self.load_cpu.and_then(|c| outcome.core_busy.get(c).copied()),
            proxy_core: self.proxy_cpu.and_then(|c| outcome.core_busy.get(c).copied()),
            cores: self.cpus.iter().filter_map(|&c| outcome.core_busy.get(c).copied()).collect(),
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

    fn has(&self, kind: Kind) -> bool {
        self.kinds.contains(&kind)
    }

    /// The ratio columns: shuttle ÷ HAProxy with one worker each (the pair
    /// the goals are for), then for every shuttle with N > 1 workers: ÷
    /// HAProxy with N, ÷ nginx with N, ÷ shuttle with one. Only pairs that
    /// both ran.
    fn pairs(&self) -> Vec<(Kind, Kind)> {
        let mut pairs = vec![(Kind::Shuttle(1), Kind::Haproxy(1))];
        for &kind in &self.kinds {
            match kind {
                Kind::Shuttle(n @ 2..) => {
                    pairs.extend([(kind, Kind::Haproxy(n)), (kind, Kind::Nginx(n)), (kind, Kind::Shuttle(1))])
                }
                // What the access log and a busy scraper cost: the same shuttle without them.
                Kind::ShuttleOps(n) => pairs.push((kind, Kind::Shuttle(n))),
                _ => {}
            }
        }
        pairs.retain(|&(a, b)| self.has(a) && self.has(b));
        pairs
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out);
        for line in &self.header {
            let _ = writeln!(out, "- {line}");
        }
        let _ = writeln!(out);
        self.render_figures(&mut out);
        self.render_direct(&mut out);
        self.render_ranges(&mut out);
        self.render_cpu(&mut out);
        self.render_spread(&mut out);
        self.render_scaling(&mut out);
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }

    /// Every figure of every target, with the ratios of `pairs`.
    fn render_figures(&self, out: &mut String) {
        let pairs = self.pairs();
        // The goals are what the issue asks of shuttle ÷ HAProxy with one worker each.
        let goals = pairs.first() == Some(&(Kind::Shuttle(1), Kind::Haproxy(1)));
        let mut columns = vec!["figure".to_string()];
        columns.extend(self.kinds.iter().map(|k| k.name()));
        for (i, (a, b)) in pairs.iter().enumerate() {
            columns.push(format!("{} ÷ {}", a.name(), b.name()));
            if i == 0 && goals {
                columns.push("target".into());
            }
        }
        head(out, &columns, true);
        for (id, label, better, goal) in FIGURES {
            let values: Vec<Option<f64>> = self.kinds.iter().map(|&k| self.figure(id, k)).collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            let arrow = if better == Better::Higher { "↑" } else { "↓" };
            let mut cells = vec![format!("{label} {arrow}")];
            cells.extend(values.iter().map(|&v| cell(v)));
            for (i, &(a, b)) in pairs.iter().enumerate() {
                let r = self.ratio(id, a, b);
                cells.push(ratio_cell(r));
                if i == 0 && goals {
                    cells.push(goal.map_or_else(|| "—".into(), |g| g.cell(r)));
                }
            }
            row(out, &cells);
        }
        let _ = writeln!(
            out,
            "\n↑ higher is better, ↓ lower is better. A ratio is the median of the rounds' ratios (the targets of \
             a round run back to back), or the ratio of the pooled figures (4, 5). A number after a name is its \
             workers (threads or processes); \"target\" is what the issue asks of shuttle ÷ HAProxy, one worker \
             each.\n"
        );
    }

    /// Each proxy against the load with no proxy.
    fn render_direct(&self, out: &mut String) {
        let proxies: Vec<Kind> = self.kinds.iter().copied().filter(|&k| k != Kind::Direct).collect();
        if !self.has(Kind::Direct) || proxies.is_empty() {
            return;
        }
        let mut columns = vec!["÷ direct".to_string()];
        columns.extend(proxies.iter().map(|k| k.name()));
        head(out, &columns, true);
        for (id, label, _, _) in FIGURES {
            let ratios: Vec<Option<f64>> = proxies.iter().map(|&k| self.ratio(id, k, Kind::Direct)).collect();
            if ratios.iter().any(Option::is_some) {
                let mut cells = vec![label.to_string()];
                cells.extend(ratios.into_iter().map(ratio_cell));
                row(out, &cells);
            }
        }
        let _ = writeln!(out);
    }

    /// How much the rounds disagreed: the range behind each median.
    fn render_ranges(&self, out: &mut String) {
        if !self.runs.iter().any(|r| self.runs(r.kind, r.workload).count() > 1) {
            return;
        }
        let mut columns = vec!["range over rounds (min – max)".to_string()];
        columns.extend(self.kinds.iter().map(|k| k.name()));
        head(out, &columns, true);
        for (id, label, _, _) in FIGURES {
            let mut cells = vec![label.to_string()];
            let mut any = false;
            for &kind in &self.kinds {
                let values = self.per_round(id, kind).unwrap_or_default();
                let min = values.iter().copied().reduce(f64::min);
                let max = values.iter().copied().reduce(f64::max);
                cells.push(match (min, max) {
                    (Some(min), Some(max)) => {
                        any = true;
                        format!("{} – {}", number(min), number(max))
                    }
                    _ => "—".into(),
                });
            }
            if any {
                row(out, &cells);
            }
        }
        let _ = writeln!(out);
    }

    /// Where the bottleneck is: how busy each core was during each workload's window.
    fn render_cpu(&self, out: &mut String) {
        let mut columns = vec!["CPU use in the window".to_string()];
        columns.extend(self.kinds.iter().map(|k| k.name()));
        head(out, &columns, false);
        for workload in THROUGHPUT {
            if self.runs.iter().all(|r| r.workload != workload) {
                continue;
            }
            let mut cells = vec![workload.label().to_string()];
            cells.extend(self.kinds.iter().map(|&kind| self.cpu_cell(kind, workload)));
            row(out, &cells);
        }
        let _ = writeln!(
            out,
            "\nPer cent of one core: \"proxy\" is the proxy (every thread and process of it), \"load\" the load \
             generator and backend processes; \"core\" is how busy that CPU was in all (anything but idle, incl. \
             kernel network work charged to no process). A core ≥ 90% busy is the bottleneck; \"neither\" means \
             both cores idled part of the time: the run was bound by round trips between them. A proxy with \
             several workers shares the cores with the load, so only \"cores\" (every allowed CPU, in order) \
             says whether the machine was the limit.\n"
        );
    }

    fn cpu_cell(&self, kind: Kind, workload: Workload) -> String {
        let pct = |f: &dyn Fn(&Run) -> Option<f64>| self.median_of(kind, workload, |r| f(r).map(|v| 100.0 * v));
        let load = pct(&|r| Some(r.load_cpu / r.secs));
        let proxy = pct(&|r| r.proxy_cpu.map(|c| c / r.secs));
        let Some(load) = load else { return "—".into() };
        let mut text = String::new();
        if kind.workers() > 1 {
            let cores: Vec<f64> = (0..self.cpus.len()).filter_map(|i| pct(&|r| r.cores.get(i).copied())).collect();
            if let Some(proxy) = proxy {
                let _ = write!(text, "proxy {proxy:.0}% · ");
            }
            let shown: Vec<String> = cores.iter().map(|c| format!("{c:.0}%")).collect();
            let _ = write!(text, "load {load:.0}% · cores {}", shown.join(" / "));
            let full = !cores.is_empty() && cores.iter().all(|&c| c >= 90.0);
            let _ = write!(text, " → {}", if full { "cores saturated" } else { "cores idle part of the time" });
            return text;
        }
        let load_core = pct(&|r| r.load_core);
        let proxy_core = pct(&|r| r.proxy_core);
        let core = |v: Option<f64>| v.map_or_else(String::new, |v| format!(" (core {v:.0}%)"));
        if let Some(proxy) = proxy {
            let _ = write!(text, "proxy {proxy:.0}%{} · ", core(proxy_core));
        }
        let _ = write!(text, "load {load:.0}%{}", core(load_core));
        let busy = |process: Option<f64>, core: Option<f64>| core.or(process).is_some_and(|v| v >= 90.0);
        let verdict = match (busy(proxy, proxy_core) && proxy.is_some(), busy(Some(load), load_core)) {
            (true, true) => "both",
            (true, false) => "proxy-bound",
            (false, true) => "load-bound",
            (false, false) => "neither",
        };
        let _ = write!(text, " → {verdict}");
        text
    }

    /// How evenly each proxy with several workers spread the work over them.
    fn render_spread(&self, out: &mut String) {
        let several: Vec<Kind> = self.kinds.iter().copied().filter(|k| k.workers() > 1).collect();
        if !self.runs.iter().any(|r| several.contains(&r.kind) && r.workers.len() > 1) {
            return;
        }
        let mut columns = vec!["spread: busiest worker's share of the workers' CPU".to_string()];
        columns.extend(several.iter().map(|k| format!("{} (even: {:.0}%)", k.name(), 100.0 / k.workers() as f64)));
        head(out, &columns, true);
        for workload in THROUGHPUT {
            if self.runs.iter().all(|r| r.workload != workload) {
                continue;
            }
            let mut cells = vec![workload.label().to_string()];
            cells.extend(several.iter().map(|&kind| self.spread_cell(kind, workload)));
            row(out, &cells);
        }
        let _ = writeln!(
            out,
            "\nThe busiest worker's CPU time in the window as a share of all the workers' (median of rounds): \
             100/N % is perfectly even, 100% means one worker did all the work. In parentheses, each worker's CPU \
             in per cent of one core, busiest first (medians by rank). Workers are shuttle's worker-loop threads \
             (`shuttle-wN`, not the control loop), HAProxy's threads, nginx's worker processes (not the master). \
             \"bulk, 1 stream\" is one connection, which one worker carries whatever the proxy.\n"
        );
    }

    fn spread_cell(&self, kind: Kind, workload: Workload) -> String {
        let share = |r: &Run| {
            let total: f64 = r.workers.iter().sum();
            let busiest = r.workers.iter().copied().reduce(f64::max)?;
            (r.workers.len() > 1 && total > 0.0).then(|| 100.0 * busiest / total)
        };
        let Some(median_share) = self.median_of(kind, workload, share) else { return "—".into() };
        let workers = self.runs(kind, workload).map(|r| r.workers.len()).max().unwrap_or(0);
        let by_rank: Vec<String> = (0..workers)
            .filter_map(|rank| {
                self.median_of(kind, workload, |r| {
                    let mut sorted = r.workers.clone();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    sorted.get(rank).map(|c| 100.0 * c / r.secs)
                })
            })
            .map(|pct| format!("{pct:.0}%"))
            .collect();
        format!("{median_share:.0}% ({})", by_rank.join(" + "))
    }

    /// `--workers`: shuttle with each number of workers against shuttle with one.
    fn render_scaling(&self, out: &mut String) {
        let mut counts = self.scaling.clone();
        counts.sort_unstable();
        counts.dedup();
        let kinds: Vec<Kind> = counts.iter().map(|&n| Kind::Shuttle(n)).filter(|&k| self.has(k)).collect();
        if kinds.is_empty() {
            return;
        }
        let base = Kind::Shuttle(1);
        let mut columns = vec!["scaling: shuttle with N workers".to_string()];
        columns.extend(kinds.iter().map(|k| format!("{} (N = {})", k.name(), k.workers())));
        head(out, &columns, true);
        for id in ["bulk1", "bulk8", "rps", "cps", "cpu_gb", "cpu_req", "cpu_conn"] {
            let Some(&(_, label, better, _)) = FIGURES.iter().find(|f| f.0 == id) else { continue };
            let values: Vec<Option<f64>> = kinds.iter().map(|&k| self.figure(id, k)).collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            let arrow = if better == Better::Higher { "↑" } else { "↓" };
            let mut cells = vec![format!("{label} {arrow}")];
            for (&kind, &value) in kinds.iter().zip(&values) {
                let n = kind.workers();
                if n == 1 || !self.has(base) {
                    cells.push(cell(value));
                    continue;
                }
                let r = self.ratio(id, kind, base);
                let goal = match better {
                    Better::Higher => Goal::AtLeast(SCALING_THROUGHPUT * n as f64),
                    Better::Lower => Goal::AtMost(SCALING_CPU),
                };
                cells.push(format!("{} · {} of N = 1 ({})", cell(value), ratio_cell(r), goal.cell(r)));
            }
            row(out, &cells);
        }
        let _ = writeln!(
            out,
            "\nThroughput as a multiple of N = 1 (median of the rounds' ratios) against the goal of {SCALING_THROUGHPUT} \
             × N (near-linear), and proxy CPU per unit of work as a multiple of N = 1's (pooled) against \
             {SCALING_CPU}× (within 10%). The workers share the machine's {} allowed CPU(s) with the load generator \
             and the backends, so throughput cannot scale past what the cores left over allow: where N + 1 exceeds \
             the cores, the throughput goal cannot be shown and CPU per unit of work is the figure to read.\n",
            self.cpus.len()
        );
    }
}

/// Writes the head of a markdown table; columns after the first are right-aligned if `numeric`.
fn head(out: &mut String, columns: &[String], numeric: bool) {
    let _ = writeln!(out, "| {} |", columns.join(" | "));
    let align = if numeric { "---:|" } else { "---|" };
    let _ = writeln!(out, "|---|{}", align.repeat(columns.len().saturating_sub(1)));
}

fn row(out: &mut String, cells: &[String]) {
    let _ = writeln!(out, "| {} |", cells.join(" | "));
}
