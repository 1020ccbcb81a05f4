//! The three ways a client reaches the backends: directly, through shuttle,
//! through HAProxy. A proxy is a child process pinned to the proxy CPU before
//! `exec`, killed (and reaped) on drop and by the kernel if the bench dies.

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Shuttle,
    Haproxy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Shuttle => "shuttle",
            Kind::Haproxy => "HAProxy",
        }
    }
}

/// How to start the proxy processes.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The CPU proxies are pinned to, if pinning is possible.
    pub cpu: Option<usize>,
    pub shuttle: String,
    /// A command (and arguments) to run shuttle under, e.g. `valgrind --tool=callgrind`.
    pub shuttle_wrapper: Vec<String>,
    pub haproxy: Option<String>,
    /// `maxconn` of HAProxy's global and defaults sections.
    pub haproxy_maxconn: usize,
}

/// A target: where clients connect for bulk data and for the echo service.
#[derive(Debug)]
pub struct Target {
    pub kind: Kind,
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    child: Option<Child>,
    /// How long the process may take to exit after SIGTERM.
    stop_within: Duration,
    lines: Lines,
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
                stop_within: Duration::ZERO,
                lines: Arc::default(),
                _dir: None,
            }),
            Kind::Shuttle => start_shuttle(backends, launch),
            Kind::Haproxy => start_haproxy(backends, launch),
        }
    }

    /// The proxy's process id (the wrapper's when one is used).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn command(program: &str, args: &[String], cpu: Option<usize>) -> Command {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only the prctl and sched_setaffinity syscalls, which are
    // async-signal-safe, run between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // No proxy outlives a killed bench.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            match cpu {
                Some(cpu) => sys::pin_to(cpu),
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

fn start_shuttle(backends: Backends, launch: &Launch) -> io::Result<Target> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.json");
    std::fs::write(&path, shuttle_config(backends)?)?;
    let mut argv: Vec<String> = launch.shuttle_wrapper.clone();
    argv.push(launch.shuttle.clone());
    argv.extend(["-config".into(), path.display().to_string(), "-http".into(), "127.0.0.1:0".into()]);
    let mut command = command(&argv[0], &argv[1..], launch.cpu);
    command.env("RUST_LOG", "info").env("RUST_LOG_STYLE", "never");
    let (mut child, lines, rx) = spawn(command)?;
    let deadline = Instant::now() + START_DEADLINE * if launch.shuttle_wrapper.is_empty() { 1 } else { 6 };
    let (mut bulk, mut echo) = (None, None);
    while bulk.is_none() || echo.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = lines.lock().map(|l| l.join("\n")).unwrap_or_default();
            return Err(io::Error::other(format!("shuttle did not report its listeners:\n{log}")));
        };
        for (name, slot) in [("bulk", &mut bulk), ("echo", &mut echo)] {
            let needle = format!("service {name} listening on ");
            if let Some((_, addr)) = line.split_once(&needle) {
                *slot = addr.trim().parse::<SocketAddr>().ok();
            }
        }
    }
    let (Some(bulk), Some(echo)) = (bulk, echo) else { unreachable!("loop ends when both are known") };
    let stop_within = Duration::from_secs(if launch.shuttle_wrapper.is_empty() { 5 } else { 60 });
    Ok(Target { kind: Kind::Shuttle, bulk, echo, child: Some(child), stop_within, lines, _dir: Some(dir) })
}

/// A loopback port nobody listens on right now.
fn free_port() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// One thread, TCP mode, the same timeouts as the shuttle fixture, no health checks.
pub fn haproxy_config(bulk: SocketAddr, echo: SocketAddr, backends: Backends, maxconn: usize) -> String {
    format!(
        "global
    nbthread 1
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

fn start_haproxy(backends: Backends, launch: &Launch) -> io::Result<Target> {
    let program = launch.haproxy.as_deref().ok_or_else(|| io::Error::other("haproxy is not on the PATH"))?;
    let dir = tempfile::tempdir()?;
    let (bulk, echo) = (free_port()?, free_port()?);
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, haproxy_config(bulk, echo, backends, launch.haproxy_maxconn))?;
    let args = ["-f".to_string(), path.display().to_string(), "-db".to_string()];
    let (mut child, lines, _rx) = spawn(command(program, &args, launch.cpu))?;
    let deadline = Instant::now() + START_DEADLINE;
    while !(listening(bulk) && listening(echo)) {
        if child.try_wait()?.is_some() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = lines.lock().map(|l| l.join("\n")).unwrap_or_default();
            return Err(io::Error::other(format!("haproxy did not start:\n{log}")));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let stop_within = Duration::from_secs(5);
    Ok(Target { kind: Kind::Haproxy, bulk, echo, child: Some(child), stop_within, lines, _dir: Some(dir) })
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
