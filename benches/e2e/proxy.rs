//! The ways a client reaches the backends: directly, through shuttle,
//! through HAProxy, through nginx's stream module, each proxy with one worker
//! or several. A proxy is a child process placed before `exec` (one worker:
//! pinned to the proxy CPU; several: free to use every allowed CPU), killed
//! (and reaped) on drop and by the kernel if the bench dies.

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::backend::Backends;
use crate::sys;

/// The shuttle config the bench starts from; its backend addresses are replaced by the bench's own.
const FIXTURE: &str = include_str!("../../fixtures/bench.json");
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A target; a proxy's number is its workers (threads or processes). The
/// order (derived) is the order of the report's columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Direct,
    /// shuttle with `-workers N`.
    Shuttle(usize),
    /// The same shuttle as operators run it: an access log to a file, and
    /// `GET /metrics` scraped every 100 ms while it works.
    ShuttleOps(usize),
    /// HAProxy with `nbthread N`.
    Haproxy(usize),
    /// nginx's stream module with `worker_processes N`.
    Nginx(usize),
}

impl Kind {
    /// The name in the report: `shuttle`, `shuttle2`, `HAProxy`, `HAProxy2`, `nginx2`, ...
    pub fn name(self) -> String {
        let (base, n) = match self {
            Kind::Direct => return "direct".into(),
            Kind::Shuttle(n) => ("shuttle", n),
            Kind::ShuttleOps(n) => ("shuttle-ops", n),
            Kind::Haproxy(n) => ("HAProxy", n),
            Kind::Nginx(n) => ("nginx", n),
        };
        if n == 1 {
            base.into()
        } else {
            format!("{base}{n}")
        }
    }

    /// The inverse of `name`, in any case: `haproxy2` is `Haproxy(2)`.
    pub fn parse(name: &str) -> Option<Kind> {
        let name = name.to_ascii_lowercase();
        if name == "direct" {
            return Some(Kind::Direct);
        }
        type Make = fn(usize) -> Kind;
        // "shuttle-ops" before "shuttle", which is its prefix.
        let make: [(&str, Make); 4] = [
            ("shuttle-ops", Kind::ShuttleOps),
            ("shuttle", Kind::Shuttle),
            ("haproxy", Kind::Haproxy),
            ("nginx", Kind::Nginx),
        ];
        let (rest, make) = make.iter().find_map(|&(base, make)| Some((name.strip_prefix(base)?, make)))?;
        match rest {
            "" => Some(make(1)),
            n => n.parse().ok().filter(|&n| (1..=MAX_WORKERS).contains(&n)).map(make),
        }
    }

    /// Its workers: 0 for direct.
    pub fn workers(self) -> usize {
        match self {
            Kind::Direct => 0,
            Kind::Shuttle(n) | Kind::ShuttleOps(n) | Kind::Haproxy(n) | Kind::Nginx(n) => n,
        }
    }

    /// Whether it runs pinned to the proxy CPU: a proxy with one worker. One
    /// with several may use every allowed CPU, where it competes with the load.
    pub fn pinned(self) -> bool {
        self.workers() == 1
    }
}

/// The most workers shuttle takes (its `MAX_WORKERS`).
pub const MAX_WORKERS: usize = 256;

/// How to start the proxy processes.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The CPU proxies with one worker are pinned to, if pinning is possible.
    pub cpu: Option<usize>,
    /// Every CPU the bench was allowed at start: where proxies with several workers run.
    pub cpus: Vec<usize>,
    pub shuttle: String,
    /// A command (and arguments) to run shuttle under, e.g. `valgrind --tool=callgrind`.
    pub shuttle_wrapper: Vec<String>,
    /// Whether shuttle with several workers gets `-pin` (worker i on the i-th allowed CPU).
    pub shuttle_pin: bool,
    pub haproxy: Option<String>,
    /// `maxconn` of HAProxy's global and defaults sections.
    pub haproxy_maxconn: usize,
    pub nginx: Option<Nginx>,
    /// `worker_connections` of nginx: connections per worker, client and upstream sides both count.
    pub nginx_connections: usize,
}

/// An nginx that can proxy TCP.
#[derive(Clone, Debug)]
pub struct Nginx {
    pub program: String,
    /// `nginx -V`'s version.
    pub version: String,
    /// The stream module to `load_module`; `None` when it is built in.
    pub stream_module: Option<String>,
}

/// How a proxy's processes and threads are laid out: where its CPU time is
/// and which parts are its workers.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// One process; its workers are the threads whose name the function
    /// accepts, when it has several.
    Threads(fn(&str) -> bool),
    /// A master process and its children, the worker processes.
    Processes,
}

/// A target: where clients connect for bulk data and for the echo service.
#[derive(Debug)]
pub struct Target {
    pub kind: Kind,
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    child: Option<Child>,
    shape: Shape,
    /// How long the process may take to exit after SIGTERM.
    stop_within: Duration,
    lines: Lines,
    /// The `/metrics` scraper of `ShuttleOps`: held only to be stopped (dropped) with the target.
    _scraper: Option<Scraper>,
    _dir: Option<TempDir>,
}

impl Target {
    pub fn start(kind: Kind, backends: Backends, launch: &Launch) -> io::Result<Target> {
        match kind {
            Kind::Direct => Ok(Target {
                kind,
                bulk: backends.source,
                echo: backends.echo,
                child: None,
                shape: Shape::Threads(|_| false),
                stop_within: Duration::ZERO,
                lines: Arc::default(),
                _scraper: None,
                _dir: None,
            }),
            Kind::Shuttle(_) | Kind::ShuttleOps(_) => start_shuttle(kind, backends, launch),
            Kind::Haproxy(n) => start_haproxy(n, backends, launch),
            Kind::Nginx(n) => start_nginx(n, backends, launch),
        }
    }

    /// The proxy's process id (the wrapper's when one is used; nginx's master).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every process of the proxy: the one, or the master and its workers.
    fn processes(&self) -> Vec<u32> {
        let Some(pid) = self.pid() else { return Vec::new() };
        let mut all = vec![pid];
        if let Shape::Processes = self.shape {
            all.extend(sys::children(pid));
        }
        all
    }

    /// CPU time of the whole proxy so far: every thread of every process of
    /// it (a process's `/proc/PID/stat` counts all its threads).
    pub fn cpu(&self) -> Option<Duration> {
        let processes = self.processes();
        let (&main, workers) = processes.split_first()?;
        let main = sys::process_cpu(main).ok()?;
        // A worker that exits between the scan and the read is left out.
        Some(main + workers.iter().filter_map(|&pid| sys::process_cpu(pid).ok()).sum::<Duration>())
    }

    /// CPU time of each worker so far, by thread or process id; empty with one worker.
    pub fn worker_cpu(&self) -> Vec<(u32, Duration)> {
        let Some(pid) = self.pid().filter(|_| self.kind.workers() > 1) else { return Vec::new() };
        match self.shape {
            Shape::Threads(is_worker) => sys::threads(pid)
                .into_iter()
                .filter(|(_, name)| is_worker(name))
                .filter_map(|(tid, _)| Some((tid, sys::thread_cpu(pid, tid).ok()?)))
                .collect(),
            Shape::Processes => {
                sys::children(pid).into_iter().filter_map(|p| Some((p, sys::process_cpu(p).ok()?))).collect()
            }
        }
    }

    /// Resident memory of the whole proxy: the sum over its processes (pages
    /// they share count once per process, which cancels out of a difference).
    pub fn rss(&self) -> io::Result<u64> {
        let processes = self.processes();
        let Some((&main, workers)) = processes.split_first() else {
            return Err(io::Error::other("no proxy process"));
        };
        Ok(sys::rss(main)? + workers.iter().filter_map(|&pid| sys::rss(pid).ok()).sum::<u64>())
    }

    /// The proxy's stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Target {
    /// SIGTERM first, so a wrapper such as valgrind can write its output; SIGKILL if it lingers.
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        // SAFETY: kill only sends a signal to the child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + self.stop_within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        if let Shape::Processes = self.shape {
            // Worker processes do not die with their master: kill them first,
            // while the master (not reaped) keeps their ids from being reused.
            for pid in sys::children(child.id()) {
                // SAFETY: kill only sends a signal, to a child of our unreaped child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Where a proxy may run: with one worker, on the proxy CPU; with several, on
/// every allowed CPU (it would otherwise inherit the bench's pinning to the
/// load CPU). `None` when there is nothing to pin to.
fn placement(kind: Kind, launch: &Launch) -> Option<Vec<usize>> {
    if kind.pinned() {
        launch.cpu.map(|cpu| vec![cpu])
    } else {
        (!launch.cpus.is_empty()).then(|| launch.cpus.clone())
    }
}

fn command(program: &str, args: &[String], cpus: Option<Vec<usize>>) -> Command {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only the prctl and sched_setaffinity syscalls, which are
    // async-signal-safe, run between fork and exec (`cpus` was allocated before).
    unsafe {
        command.pre_exec(move || {
            // No proxy outlives a killed bench (nginx's workers excepted: they are the master's children).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            match &cpus {
                Some(cpus) => sys::pin_to_cpus(cpus),
                None => Ok(()),
            }
        });
    }
    command
}

/// Every stderr line of a child so far.
type Lines = Arc<Mutex<Vec<String>>>;

/// Spawns `command` and collects its stderr lines; each line is also sent on the returned channel.
fn spawn(mut command: Command) -> io::Result<(Child, Lines, mpsc::Receiver<String>)> {
    let mut child = command.spawn()?;
    let stderr = child.stderr.take().expect("piped stderr");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    {
        let lines = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                if let Ok(mut lines) = lines.lock() {
                    lines.push(line);
                }
            }
        });
    }
    Ok((child, lines, rx))
}

fn shuttle_config(backends: Backends) -> io::Result<String> {
    let mut config: serde_json::Value = serde_json::from_str(FIXTURE).map_err(io::Error::other)?;
    let services = config.as_array_mut().ok_or_else(|| io::Error::other("fixture: not a list"))?;
    for service in services {
        let address = match service["name"].as_str() {
            Some("bulk") => backends.source,
            Some("echo") => backends.echo,
            other => return Err(io::Error::other(format!("fixture: unexpected service {other:?}"))),
        };
        service["backends"][0]["address"] = address.to_string().into();
    }
    serde_json::to_string_pretty(&config).map_err(io::Error::other)
}

fn start_shuttle(kind: Kind, backends: Backends, launch: &Launch) -> io::Result<Target> {
    let workers = kind.workers();
    let ops = matches!(kind, Kind::ShuttleOps(_));
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.json");
    std::fs::write(&path, shuttle_config(backends)?)?;
    let mut argv: Vec<String> = launch.shuttle_wrapper.clone();
    argv.push(launch.shuttle.clone());
    argv.extend(["-config".into(), path.display().to_string(), "-http".into(), "127.0.0.1:0".into()]);
    argv.extend(["-workers".into(), workers.to_string()]);
    if workers > 1 && launch.shuttle_pin {
        argv.push("-pin".into());
    }
    let access_log = dir.path().join("access.log");
    if ops {
        argv.extend(["-access-log".into(), access_log.display().to_string()]);
    }
    let mut command = command(&argv[0], &argv[1..], placement(kind, launch));
    command.env("RUST_LOG", "info").env("RUST_LOG_STYLE", "never");
    let (mut child, lines, rx) = spawn(command)?;
    let deadline = Instant::now() + START_DEADLINE * if launch.shuttle_wrapper.is_empty() { 1 } else { 6 };
    let (mut bulk, mut echo, mut admin) = (None, None, None);
    while bulk.is_none() || echo.is_none() || admin.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = lines.lock().map(|l| l.join("\n")).unwrap_or_default();
            return Err(io::Error::other(format!("{} did not report its listeners:\n{log}", kind.name())));
        };
        for (needle, slot) in [
            ("service bulk listening on ", &mut bulk),
            ("service echo listening on ", &mut echo),
            ("admin listening on ", &mut admin),
        ] {
            if let Some((_, addr)) = line.split_once(needle) {
                *slot = addr.trim().parse::<SocketAddr>().ok();
            }
        }
    }
    let (Some(bulk), Some(echo), Some(admin)) = (bulk, echo, admin) else {
        unreachable!("loop ends when all are known")
    };
    let stop_within = Duration::from_secs(if launch.shuttle_wrapper.is_empty() { 5 } else { 60 });
    // With several workers only the worker loops proxy; the control loop, the
    // log writer and name resolution are not workers.
    let shape = Shape::Threads(is_shuttle_worker);
    let scraper = ops.then(|| Scraper::start(admin, access_log));
    Ok(Target { kind, bulk, echo, child: Some(child), shape, stop_within, lines, _scraper: scraper, _dir: Some(dir) })
}

/// Scrapes `GET /metrics` every 100 ms, as a Prometheus would (ten times as often as its default).
#[derive(Debug)]
struct Scraper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<(u64, u64)>>,
    access_log: std::path::PathBuf,
}

impl Scraper {
    const EVERY: Duration = Duration::from_millis(100);

    fn start(admin: SocketAddr, access_log: std::path::PathBuf) -> Scraper {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                thread::sleep(Self::EVERY);
                match scrape(admin) {
                    Ok(()) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        });
        Scraper { stop, thread: Some(thread), access_log }
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let Some((ok, failed)) = self.thread.take().and_then(|t| t.join().ok()) else { return };
        let lines = std::fs::read(&self.access_log).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
        eprintln!("e2e: shuttle-ops: {ok} scrapes of /metrics ({failed} failed), {lines} access-log lines");
    }
}

/// One `GET /metrics`, read to the end.
fn scrape(admin: SocketAddr) -> io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    if body.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(io::Error::other("not a 200"))
    }
}

/// Whether a shuttle thread is a worker loop: `shuttle-wN` (`shuttle-worker-N`
/// in older builds, which the kernel cuts to `shuttle-worker-`); not
/// `shuttle-log` nor `shuttle-resolve`.
fn is_shuttle_worker(name: &str) -> bool {
    name.starts_with("shuttle-worker")
        || name.strip_prefix("shuttle-w").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A loopback port nobody listens on right now.
fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// `nbthread` threads, TCP mode, the same timeouts as the shuttle fixture, no health checks.
pub fn haproxy_config(
    bulk: SocketAddr,
    echo: SocketAddr,
    backends: Backends,
    nbthread: usize,
    maxconn: usize,
) -> String {
    format!(
        "global
    nbthread {nbthread}
    maxconn {maxconn}

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bulk
    bind {bulk}
    default_backend bulk

backend bulk
    server source {source}

frontend echo
    bind {echo}
    default_backend echo

backend echo
    server echo {echo_backend}
",
        source = backends.source,
        echo_backend = backends.echo,
    )
}

fn start_haproxy(nbthread: usize, backends: Backends, launch: &Launch) -> io::Result<Target> {
    let kind = Kind::Haproxy(nbthread);
    let program = launch.haproxy.as_deref().ok_or_else(|| io::Error::other("haproxy is not on the PATH"))?;
    let dir = tempfile::tempdir()?;
    let (bulk, echo) = (free_port()?, free_port()?);
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, haproxy_config(bulk, echo, backends, nbthread, launch.haproxy_maxconn))?;
    let args = ["-f".to_string(), path.display().to_string(), "-db".to_string()];
    let (child, lines, _rx) = spawn(command(program, &args, placement(kind, launch)))?;
    // Its threads are all workers: each runs the same event loop.
    let target = Target {
        kind,
        bulk,
        echo,
        child: Some(child),
        shape: Shape::Threads(|_| true),
        stop_within: Duration::from_secs(5),
        lines,
        _scraper: None,
        _dir: Some(dir),
    };
    wait_ready(target, |_| true)
}

/// `worker_processes` processes proxying both services over TCP, with the
/// same timeouts as the shuttle fixture and no health checks (open source
/// nginx has none); as root, without touching /etc or /run: the pid and lock
/// files are in `dir`, the error log is stderr.
pub fn nginx_config(
    bulk: SocketAddr,
    echo: SocketAddr,
    backends: Backends,
    worker_processes: usize,
    worker_connections: usize,
    stream_module: Option<&str>,
    dir: &Path,
) -> String {
    let load = stream_module.map_or_else(String::new, |m| format!("load_module {m};\n"));
    format!(
        "{load}daemon off;
master_process on;
worker_processes {worker_processes};
error_log stderr;
pid {dir}/nginx.pid;
lock_file {dir}/nginx.lock;

events {{
    worker_connections {worker_connections};
}}

stream {{
    proxy_connect_timeout 5s;
    proxy_timeout 60s;

    server {{
        listen {bulk};
        proxy_pass {source};
    }}

    server {{
        listen {echo};
        proxy_pass {echo_backend};
    }}
}}
",
        dir = dir.display(),
        source = backends.source,
        echo_backend = backends.echo,
    )
}

fn start_nginx(workers: usize, backends: Backends, launch: &Launch) -> io::Result<Target> {
    let kind = Kind::Nginx(workers);
    let nginx = launch.nginx.as_ref().ok_or_else(|| io::Error::other("nginx with the stream module is not there"))?;
    let dir = tempfile::tempdir()?;
    let (bulk, echo) = (free_port()?, free_port()?);
    let path = dir.path().join("nginx.conf");
    let config = nginx_config(
        bulk,
        echo,
        backends,
        workers,
        launch.nginx_connections,
        nginx.stream_module.as_deref(),
        dir.path(),
    );
    std::fs::write(&path, config)?;
    // -p: relative paths (none used) resolve in the temp dir; -e: no log file opened before the config is read.
    let args = ["-p", &dir.path().display().to_string(), "-c", &path.display().to_string(), "-e", "stderr"]
        .map(str::to_string);
    let (child, lines, _rx) = spawn(command(&nginx.program, &args, placement(kind, launch)))?;
    let target = Target {
        kind,
        bulk,
        echo,
        child: Some(child),
        shape: Shape::Processes,
        stop_within: Duration::from_secs(5),
        lines,
        _scraper: None,
        _dir: Some(dir),
    };
    // The master listens before it forks the workers: wait for them too, so
    // the first window does not see them start.
    wait_ready(target, |t| sys::children(t.pid().unwrap_or_default()).len() >= workers)
}

/// Waits until `target` accepts on both addresses and `ready` says so; the
/// proxy's stderr is the error if it exits or is not ready in time.
fn wait_ready(mut target: Target, ready: impl Fn(&Target) -> bool) -> io::Result<Target> {
    let deadline = Instant::now() + START_DEADLINE;
    while !(listening(target.bulk) && listening(target.echo) && ready(&target)) {
        let exited = match target.child.as_mut() {
            Some(child) => child.try_wait()?.is_some(),
            None => false,
        };
        if exited || Instant::now() >= deadline {
            let log = target.log().join("\n");
            // Drop stops and reaps it (and any workers).
            return Err(io::Error::other(format!("{} did not start:\n{log}", target.kind.name())));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(target)
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The first `name` on the PATH.
pub fn which(name: &str) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p)).map(|p| p.display().to_string())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `haproxy -v`'s first line.
pub fn haproxy_version(program: &str) -> String {
    Command::new(program)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown version".into())
}

/// The nginx at `program` if it can proxy TCP: the stream module built in or
/// loadable from its modules directory (`libnginx-mod-stream` on Debian);
/// else why not.
pub fn nginx(program: &str) -> Result<Nginx, String> {
    let output = Command::new(program).arg("-V").output().map_err(|e| format!("{program} -V: {e}"))?;
    // nginx -V writes to stderr.
    let text = String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout);
    let version =
        text.lines().find_map(|l| l.strip_prefix("nginx version: ")).unwrap_or("unknown version").trim().to_string();
    let options: Vec<&str> =
        text.lines().find_map(|l| l.strip_prefix("configure arguments:")).unwrap_or("").split_whitespace().collect();
    let stream_module = if options.contains(&"--with-stream") {
        None
    } else if options.contains(&"--with-stream=dynamic") {
        let dir = options.iter().find_map(|o| o.strip_prefix("--modules-path=")).unwrap_or("/usr/lib/nginx/modules");
        let module = Path::new(dir).join("ngx_stream_module.so");
        if !module.is_file() {
            return Err(format!("{} is missing (`apt-get install libnginx-mod-stream`)", module.display()));
        }
        Some(module.display().to_string())
    } else {
        return Err(format!("{version} was built without the stream module"));
    };
    Ok(Nginx { program: program.to_string(), version, stream_module })
}
