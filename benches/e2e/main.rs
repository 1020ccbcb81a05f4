//! End-to-end benchmark: the release `shuttle` binary against a direct
//! connection and against HAProxy (TCP mode, one thread) when it is on the
//! PATH, all on loopback, in one run.
//!
//! `cargo bench --bench e2e` (about three minutes) or
//! `cargo bench --bench e2e -- --quick` (under a minute). Cargo builds the
//! binary with the bench profile (= release) and tells us where it is.
//! See BENCHMARKS.md for what each figure means; `--help` lists the options.

mod backend;
mod load;
mod proxy;
mod report;
mod sys;

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use load::{Meter, Outcome, Snap, Timing};
use proxy::{Kind, Launch, Target};
use report::{Results, Workload};

const USAGE: &str = "\
usage: cargo bench --bench e2e -- [options]

  --quick               one short round (under a minute)
  --rounds N            rounds of every throughput workload; medians are reported (default 5)
  --secs S              measured seconds per workload (default 2; --quick 1)
  --warm S              warm-up seconds before each window (default 0.5; --quick 0.25)
  --idle N              idle connections held for the memory figure (default 10000)
  --targets LIST        of direct,shuttle,haproxy (default: all available)
  --workloads LIST      of bulk1,bulk8,rr,conn,idle (default: all)
  --conn-inflight N     connects in flight in the new-connection workload (default 64)
  --perf DIR            record `perf record -e cpu-clock --call-graph dwarf` of shuttle in each window into DIR
  --shuttle-wrapper CMD run shuttle under CMD (e.g. \"valgrind --tool=callgrind\")";

/// Persistent connections of the request/response workload.
const RR_CONNS: usize = 50;
/// Connects kept in flight by the new-connection workload (default): enough
/// to keep a proxy busy; with fewer, both sides idle between wakeups.
const CONN_CONCURRENCY: usize = 64;
/// Bytes of every small request (echoed back as the reply).
const MESSAGE: usize = 64;
/// Connects kept in flight while opening idle connections.
const IDLE_CONCURRENCY: usize = 64;

#[derive(Debug)]
struct Args {
    quick: bool,
    rounds: usize,
    timing: Timing,
    idle: usize,
    targets: Option<Vec<Kind>>,
    workloads: Vec<Workload>,
    perf: Option<PathBuf>,
    shuttle_wrapper: Vec<String>,
    conn_inflight: usize,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; without it this is `cargo test` running benches as tests.
    let benching = raw.iter().any(|a| a == "--bench");
    if benching && raw.iter().any(|a| a == "--serve-backends") {
        if let Err(e) = backend::serve_forever() {
            eprintln!("e2e backends: {e}");
            std::process::exit(1);
        }
        return Ok(None);
    }
    raw.retain(|a| a != "--bench");
    if raw.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(None);
    }
    if !benching {
        println!("e2e: not run under `cargo test`; use `cargo bench --bench e2e [-- --quick]`");
        return Ok(None);
    }
    let quick = raw.iter().any(|a| a == "--quick");
    let mut args = Args {
        quick,
        rounds: if quick { 1 } else { 5 },
        timing: if quick {
            Timing { warm: Duration::from_millis(250), run: Duration::from_secs(1) }
        } else {
            Timing { warm: Duration::from_millis(500), run: Duration::from_secs(2) }
        },
        idle: 10_000,
        targets: None,
        workloads: Workload::ALL.to_vec(),
        perf: None,
        shuttle_wrapper: Vec::new(),
        conn_inflight: CONN_CONCURRENCY,
    };
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let secs = |v: String| v.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--quick" => {}
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--secs" => args.timing.run = secs(value()?)?,
            "--warm" => args.timing.warm = secs(value()?)?,
            "--idle" => args.idle = value()?.parse().map_err(|e| format!("--idle: {e}"))?,
            "--targets" => {
                let list = value()?;
                let kinds = list.split(',').map(|t| match t {
                    "direct" => Ok(Kind::Direct),
                    "shuttle" => Ok(Kind::Shuttle),
                    "haproxy" => Ok(Kind::Haproxy),
                    other => Err(format!("unknown target {other:?}")),
                });
                args.targets = Some(kinds.collect::<Result<_, _>>()?);
            }
            "--workloads" => {
                let list = value()?;
                let parsed =
                    list.split(',').map(|w| Workload::parse(w).ok_or_else(|| format!("unknown workload {w:?}")));
                args.workloads = parsed.collect::<Result<_, _>>()?;
            }
            "--conn-inflight" => args.conn_inflight = value()?.parse().map_err(|e| format!("--conn-inflight: {e}"))?,
            "--perf" => args.perf = Some(PathBuf::from(value()?)),
            "--shuttle-wrapper" => args.shuttle_wrapper = value()?.split_whitespace().map(String::from).collect(),
            // Filters and flags meant for other bench harnesses are ignored.
            _ => {}
        }
    }
    Ok(Some(args))
}

/// Reads the proxy's and this process's CPU time at the window's edges, and
/// runs `perf record` on the proxy in between when asked.
struct ProcMeter {
    pid: Option<u32>,
    backends: u32,
    perf_out: Option<PathBuf>,
    recorder: Option<Child>,
}

impl ProcMeter {
    fn snap(&self) -> Snap {
        Snap {
            at: std::time::Instant::now(),
            proxy: self.pid.and_then(|pid| sys::process_cpu(pid).ok()),
            load: sys::self_cpu() + sys::process_cpu(self.backends).unwrap_or_default(),
            cores: sys::cpu_ticks(),
        }
    }
}

impl Meter for ProcMeter {
    fn begin(&mut self) -> Snap {
        if let (Some(pid), Some(out)) = (self.pid, self.perf_out.as_ref()) {
            let recorder = Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "1999",
                    "--call-graph",
                    "dwarf,16384",
                    "-p",
                    &pid.to_string(),
                    "-o",
                ])
                .arg(out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match recorder {
                Ok(child) => {
                    thread::sleep(Duration::from_millis(200)); // let it attach
                    self.recorder = Some(child);
                }
                Err(e) => eprintln!("e2e: cannot run perf: {e}"),
            }
        }
        self.snap()
    }

    fn end(&mut self) -> Snap {
        let snap = self.snap();
        if let Some(mut recorder) = self.recorder.take() {
            // SAFETY: kill only sends a signal to the child we spawned.
            unsafe { libc::kill(recorder.id() as libc::pid_t, libc::SIGINT) };
            let _ = recorder.wait();
        }
        snap
    }
}

fn run_workload(target: &Target, workload: Workload, args: &Args, backends: u32) -> io::Result<Outcome> {
    let perf_out = match (&args.perf, target.kind) {
        (Some(dir), Kind::Shuttle) => Some(dir.join(format!("{}.data", workload.id()))),
        _ => None,
    };
    let mut meter = ProcMeter { pid: target.pid(), backends, perf_out, recorder: None };
    match workload {
        Workload::Bulk1 => load::bulk(target.bulk, 1, args.timing, &mut meter),
        Workload::Bulk8 => load::bulk(target.bulk, 8, args.timing, &mut meter),
        Workload::Rr => load::request_response(target.echo, RR_CONNS, MESSAGE, args.timing, &mut meter),
        Workload::Conn => load::connections(target.echo, args.conn_inflight, MESSAGE, args.timing, &mut meter),
        Workload::Idle => unreachable!("the idle workload is measured by `memory`"),
    }
}

/// Memory per idle proxied connection, on a freshly started proxy: RSS before
/// and after opening `count` connections (each after one exchange).
fn memory(target: &Target, count: usize) -> io::Result<report::Memory> {
    let pid = target.pid().ok_or_else(|| io::Error::other("no proxy process"))?;
    // Warm up with the same pattern, so pools and buffers the opening itself needs are there before "before".
    let (warm, _, _) = load::hold_idle(target.echo, 2 * IDLE_CONCURRENCY, IDLE_CONCURRENCY, MESSAGE)?;
    drop(warm);
    thread::sleep(Duration::from_millis(300));
    let before = sys::rss(pid)?;
    let (held, errors, last_error) = load::hold_idle(target.echo, count, IDLE_CONCURRENCY, MESSAGE)?;
    thread::sleep(Duration::from_millis(500));
    let after = sys::rss(pid)?;
    let memory = report::Memory { before, after, held: held.len(), errors, last_error };
    drop(held);
    thread::sleep(Duration::from_millis(300));
    Ok(memory)
}

fn main() {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return,
        Err(e) => {
            eprintln!("e2e: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("e2e: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> io::Result<()> {
    // Load on the first allowed CPU (every thread started from here on inherits it), proxies on the second.
    let machine = sys::machine();
    let cpus = sys::allowed_cpus();
    let (load_cpu, proxy_cpu) = match cpus.as_slice() {
        [a, b, ..] => (Some(*a), Some(*b)),
        _ => (None, None),
    };
    if let Some(cpu) = load_cpu {
        sys::pin_to(cpu)?;
    }
    // Every process here inherits this limit; a proxy needs two fds per proxied connection.
    let fd_limit = sys::raise_fd_limit(65_536);
    let idle = args.idle.min((fd_limit as usize).saturating_sub(100) / 2);
    // HAProxy refuses to start unless 2 × maxconn + a few fds fit.
    let haproxy_maxconn = 20_000.min((fd_limit as usize).saturating_sub(20) / 2 / 10 * 10);

    let haproxy = proxy::which("haproxy");
    let launch = Launch {
        cpu: proxy_cpu,
        shuttle: env!("CARGO_BIN_EXE_shuttle").to_string(),
        shuttle_wrapper: args.shuttle_wrapper.clone(),
        haproxy: haproxy.clone(),
        haproxy_maxconn,
    };
    let mut kinds = args.targets.clone().unwrap_or_else(|| vec![Kind::Direct, Kind::Shuttle, Kind::Haproxy]);
    if haproxy.is_none() {
        kinds.retain(|&k| k != Kind::Haproxy);
    }
    if let Some(dir) = &args.perf {
        std::fs::create_dir_all(dir)?;
    }

    let mut results = Results::new(kinds.clone(), load_cpu, proxy_cpu);
    results.header.push(format!("machine: {machine}"));
    results.header.push(match (load_cpu, proxy_cpu) {
        (Some(l), Some(p)) => format!(
            "pinning: proxy process on CPU {p} (sched_setaffinity before exec); load generator and backends \
             (this process, every thread) on CPU {l}"
        ),
        _ => "pinning: none (fewer than 2 CPUs allowed); figures are not comparable to pinned runs".into(),
    });
    results.header.push(format!("shuttle: {}", launch.shuttle));
    results.header.push(match &haproxy {
        Some(path) => {
            format!(
                "HAProxy: {path} ({}), nbthread 1, maxconn {haproxy_maxconn}, mode tcp",
                proxy::haproxy_version(path)
            )
        }
        None => "HAProxy: not on the PATH (`apt-get install haproxy`); its columns are left out".into(),
    });
    results.header.push(format!(
        "mode: {}; {} round(s), {:.2} s warm-up + {:.2} s measured per workload, medians of rounds; \
         {idle} idle connections (hard fd limit {fd_limit}: two per proxied connection)",
        if args.quick { "--quick" } else { "full" },
        args.rounds,
        args.timing.warm.as_secs_f64(),
        args.timing.run.as_secs_f64(),
    ));
    results.header.push(format!(
        "workloads: bulk = download from a backend that writes without pause, read with 256 KiB reads; \
         request/response = {RR_CONNS} persistent connections, one {MESSAGE} B request in flight on each, echoed; \
         new connections = {} connects in flight, each sends {MESSAGE} B, reads the echo, closes",
        args.conn_inflight
    ));
    if !args.shuttle_wrapper.is_empty() {
        results.header.push(format!("shuttle ran under `{}`", args.shuttle_wrapper.join(" ")));
    }
    for line in &results.header {
        eprintln!("e2e: {line}");
    }

    let (backends, _backend_process) = backend::spawn()?;

    if args.workloads.contains(&Workload::Idle) {
        for &kind in kinds.iter().filter(|&&k| k != Kind::Direct) {
            let target = Target::start(kind, backends, &launch)?;
            eprintln!("e2e: {}: memory with {idle} idle connections", kind.name());
            match memory(&target, idle) {
                Ok(memory) => results.memory(kind, memory),
                Err(e) => eprintln!("e2e: {}: memory test failed: {e}", kind.name()),
            }
        }
    }

    let throughput: Vec<Workload> = args.workloads.iter().copied().filter(|&w| w != Workload::Idle).collect();
    if !throughput.is_empty() {
        let targets: Vec<Target> =
            kinds.iter().map(|&k| Target::start(k, backends, &launch)).collect::<Result<_, _>>()?;
        for round in 0..args.rounds {
            for &workload in &throughput {
                // Rotate the order each round so no target always runs first.
                for i in 0..targets.len() {
                    let target = &targets[(i + round) % targets.len()];
                    eprintln!(
                        "e2e: round {}/{}: {} via {}",
                        round + 1,
                        args.rounds,
                        workload.label(),
                        target.kind.name()
                    );
                    match run_workload(target, workload, &args, backends.pid) {
                        Ok(outcome) => results.record(target.kind, workload, round, outcome),
                        Err(e) => {
                            eprintln!("e2e: {} via {} failed: {e}", workload.label(), target.kind.name());
                            for line in target.log().iter().rev().take(5) {
                                eprintln!("e2e:   {}: {line}", target.kind.name());
                            }
                        }
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    print!("{}", results.render());
    Ok(())
}
