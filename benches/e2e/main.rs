//! End-to-end benchmark: the release `shuttle` binary, with one worker loop
//! and with several, against a direct connection, against HAProxy (TCP mode,
//! one thread and two) and against nginx's stream module (two worker
//! processes) when they are on the PATH, all on loopback, in one run.
//!
//! `cargo bench --bench e2e` (about seven minutes with the default six targets) or
//! `cargo bench --bench e2e -- --quick` (under a minute). Cargo builds the
//! binary with the bench profile (= release) and tells us where it is.
//! See BENCHMARKS.md for what each figure means; `--help` lists the options.

mod backend;
mod load;
mod proxy;
mod report;
mod sys;

use std::fmt::Write as _;
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
  --targets LIST        of direct, shuttle[N], shuttle-ops[N], haproxy[N], nginx[N], N being workers
                        (threads or processes; default: direct,shuttle,shuttle2,haproxy,haproxy2,nginx2,
                        those installed); shuttle-ops is shuttle with -access-log to a file and GET
                        /metrics scraped every 100 ms
  --workers LIST        also shuttle with each number of workers, e.g. 2,4,8 (and 1), and a scaling table
  --pin-workers         pass -pin to shuttle with several workers (worker i on the i-th allowed CPU)
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
    /// `--workers`: shuttle targets to add, by number of workers.
    workers: Vec<usize>,
    shuttle_pin: bool,
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
        workers: Vec::new(),
        shuttle_pin: false,
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
                let kinds = list.split(',').map(|t| Kind::parse(t).ok_or_else(|| format!("unknown target {t:?}")));
                args.targets = Some(kinds.collect::<Result<_, _>>()?);
            }
            "--workers" => {
                let list = value()?;
                let counts = list.split(',').map(|n| match n.parse::<usize>() {
                    Ok(n) if (1..=proxy::MAX_WORKERS).contains(&n) => Ok(n),
                    _ => Err(format!("--workers: expected numbers from 1 to {}, got {n:?}", proxy::MAX_WORKERS)),
                });
                args.workers = counts.collect::<Result<_, _>>()?;
            }
            "--pin-workers" => args.shuttle_pin = true,
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

/// Reads the proxy's (and each of its workers') and this process's CPU time
/// at the window's edges, and runs `perf record` on the proxy in between when
/// asked.
struct ProcMeter<'a> {
    target: &'a Target,
    backends: u32,
    perf_out: Option<PathBuf>,
    recorder: Option<Child>,
}

impl ProcMeter<'_> {
    fn snap(&self) -> Snap {
        Snap {
            at: std::time::Instant::now(),
            proxy: self.target.cpu(),
            workers: self.target.worker_cpu(),
            load: sys::self_cpu() + sys::process_cpu(self.backends).unwrap_or_default(),
            cores: sys::cpu_ticks(),
        }
    }
}

impl Meter for ProcMeter<'_> {
    fn begin(&mut self) -> Snap {
        if let (Some(pid), Some(out)) = (self.target.pid(), self.perf_out.as_ref()) {
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
        (Some(dir), Kind::Shuttle(1)) => Some(dir.join(format!("{}.data", workload.id()))),
        (Some(dir), Kind::Shuttle(_)) => Some(dir.join(format!("{}-{}.data", target.kind.name(), workload.id()))),
        _ => None,
    };
    let mut meter = ProcMeter { target, backends, perf_out, recorder: None };
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
    // Warm up with the same pattern, so pools and buffers the opening itself needs are there before "before".
    let (warm, _, _) = load::hold_idle(target.echo, 2 * IDLE_CONCURRENCY, IDLE_CONCURRENCY, MESSAGE)?;
    drop(warm);
    thread::sleep(Duration::from_millis(300));
    let before = target.rss()?;
    let (held, errors, last_error) = load::hold_idle(target.echo, count, IDLE_CONCURRENCY, MESSAGE)?;
    thread::sleep(Duration::from_millis(500));
    let after = target.rss()?;
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

/// The targets of a run without `--targets`; those whose program is missing are left out later.
const DEFAULT_TARGETS: [Kind; 6] =
    [Kind::Direct, Kind::Shuttle(1), Kind::Shuttle(2), Kind::Haproxy(1), Kind::Haproxy(2), Kind::Nginx(2)];

/// The worker counts of the targets `of` picks, for the header: "1 / 2".
fn worker_counts(kinds: &[Kind], of: fn(Kind) -> bool) -> String {
    let counts: Vec<String> = kinds.iter().filter(|&&k| of(k)).map(|k| k.workers().to_string()).collect();
    if counts.is_empty() {
        "—".into()
    } else {
        counts.join(" / ")
    }
}

fn run(args: Args) -> io::Result<()> {
    // Load on the first allowed CPU (every thread started from here on inherits it), proxies with one
    // worker on the second; proxies with several may use every allowed CPU.
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
    // All idle connections may land on one nginx worker; each takes two of its connections. nginx
    // warns if worker_connections exceeds the fd limit, and allocates them all at start.
    let nginx_connections = (2 * idle + 64).min(fd_limit as usize);

    let haproxy = proxy::which("haproxy");
    let nginx = proxy::which("nginx").ok_or_else(|| "not on the PATH".to_string()).and_then(|p| proxy::nginx(&p));
    let launch = Launch {
        cpu: proxy_cpu,
        cpus: cpus.clone(),
        shuttle: env!("CARGO_BIN_EXE_shuttle").to_string(),
        shuttle_wrapper: args.shuttle_wrapper.clone(),
        shuttle_pin: args.shuttle_pin,
        haproxy: haproxy.clone(),
        haproxy_maxconn,
        nginx: nginx.clone().ok(),
        nginx_connections,
    };
    let mut kinds = args.targets.clone().unwrap_or_else(|| DEFAULT_TARGETS.to_vec());
    // The scaling table compares every N with N = 1, so that one always runs with `--workers`.
    let scaling: Vec<usize> = if args.workers.is_empty() {
        Vec::new()
    } else {
        [1].into_iter().chain(args.workers.iter().copied()).collect()
    };
    kinds.extend(scaling.iter().map(|&n| Kind::Shuttle(n)));
    // What was asked for, to say in the header why a proxy's columns are missing.
    let (want_haproxy, want_nginx) =
        (kinds.iter().any(|k| matches!(k, Kind::Haproxy(_))), kinds.iter().any(|k| matches!(k, Kind::Nginx(_))));
    kinds.retain(|k| match k {
        Kind::Haproxy(_) => haproxy.is_some(),
        Kind::Nginx(_) => nginx.is_ok(),
        Kind::Direct | Kind::Shuttle(_) | Kind::ShuttleOps(_) => true,
    });
    kinds.sort_unstable();
    kinds.dedup();
    if let Some(dir) = &args.perf {
        std::fs::create_dir_all(dir)?;
    }

    let mut results = Results::new(kinds.clone(), cpus.clone(), scaling);
    results.header.push(format!("machine: {machine}"));
    let several = kinds.iter().any(|k| k.workers() > 1);
    results.header.push(match (load_cpu, proxy_cpu) {
        (Some(l), Some(p)) => {
            let mut line = format!(
                "pinning: proxies with one worker on CPU {p} (sched_setaffinity before exec); load generator and \
                 backends (this process, every thread) on CPU {l}"
            );
            if several {
                let _ = write!(
                    line,
                    "; proxies with N > 1 workers may run on every allowed CPU ({}), so for them the load competes \
                     for the cores: CPU per unit of work and the spread over workers are the honest figures, \
                     not throughput",
                    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
                );
            }
            line
        }
        _ => "pinning: none (fewer than 2 CPUs allowed); figures are not comparable to pinned runs".into(),
    });
    results.header.push(format!("shuttle: {}", launch.shuttle));
    if kinds.iter().any(|k| matches!(k, Kind::Shuttle(n) if *n > 1)) {
        results.header.push(if args.shuttle_pin {
            "shuttle with N > 1 workers: -workers N -pin (worker i pinned to the i-th allowed CPU)".into()
        } else {
            "shuttle with N > 1 workers: -workers N, not -pin (the scheduler places the worker threads)".into()
        });
    }
    if want_haproxy {
        results.header.push(match &haproxy {
            Some(path) => format!(
                "HAProxy: {path} ({}), nbthread {}, maxconn {haproxy_maxconn}, mode tcp, threads unpinned (no \
                 cpu-map)",
                proxy::haproxy_version(path),
                worker_counts(&kinds, |k| matches!(k, Kind::Haproxy(_)))
            ),
            None => "HAProxy: not on the PATH (`apt-get install haproxy`); its columns are left out".into(),
        });
    }
    if want_nginx {
        results.header.push(match &nginx {
            Ok(n) => format!(
                "nginx: {} ({}{}), stream module, worker_processes {}, worker_connections {nginx_connections}, \
                 proxy_connect_timeout 5s, proxy_timeout 60s, one listening socket shared by the workers (no \
                 reuseport, as shipped), no worker_cpu_affinity",
                n.program,
                n.version,
                n.stream_module.as_deref().map_or_else(String::new, |m| format!(", load_module {m}")),
                worker_counts(&kinds, |k| matches!(k, Kind::Nginx(_)))
            ),
            Err(e) => {
                format!("nginx: {e} (`apt-get install nginx-core libnginx-mod-stream`); its columns are left out")
            }
        });
    }
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
