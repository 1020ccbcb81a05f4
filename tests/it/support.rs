//! What every black-box test needs (mio's `tests/util` analogue): the shuttle
//! child process, test backends, clients, config files and byte-stream checks.
//!
//! Rules kept here so the tests can't forget them: every socket has a timeout,
//! every child process is killed and reaped on drop, waits poll against a
//! deadline instead of sleeping, and everything binds port 0.

mod backend;
pub mod dns;
mod pattern;
mod restartable;
mod sha256;
mod successor;

use std::io::{self, BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

pub use backend::{blackhole, echo, named, refusing, sink, stall, stream, Backend, Blackhole, Conn, Stall};
pub use pattern::{Pattern, Sink, Source};
pub use restartable::{reuse_socket, Restartable};
pub use sha256::Sha256;
pub use successor::{pid_after, served_by, started_by, Reap};

/// How long start-up, exits and other "should happen soon" events may take.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Read and write timeout of every client socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `cond` every few milliseconds until it holds or `within` has passed;
/// returns whether it held.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// How to spawn a shuttle beyond its arguments: limits and the umask, set in
/// the child between fork and exec.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// The open-file limit (soft and hard).
    pub fd_limit: Option<u64>,
    /// The address-space limit in bytes (`RLIMIT_AS`), so a runaway read can't eat the machine's memory.
    pub mem_limit: Option<u64>,
    /// The umask the process starts with.
    pub umask: Option<u32>,
    /// A file bind-mounted over `/etc/resolv.conf` in a mount namespace of the
    /// child's own, so its lookups go to a server the test runs (needs root).
    pub resolv_conf: Option<PathBuf>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// A file standard output goes to (created, or truncated); `/dev/null` when `None`.
    pub stdout: Option<PathBuf>,
}

/// The binary under test: this crate's `shuttle`, or the one named by
/// `SHUTTLE_TEST_BIN` (to check that a regression test fails on an older build).
pub fn shuttle_bin() -> PathBuf {
    match std::env::var_os("SHUTTLE_TEST_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_shuttle")),
    }
}

/// Whether the tests run as root (tests of what needs root skip otherwise, saying so).
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// How many worker loops every shuttle the tests start runs, from
/// `SHUTTLE_TEST_WORKERS` (default 1), unless a test passes `-workers` itself.
/// CI runs the whole suite with 1 and with 2.
pub fn test_workers() -> usize {
    std::env::var("SHUTTLE_TEST_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// What a short run of the binary printed.
#[derive(Debug)]
pub struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

/// Runs the binary with exactly `args` (no `-http` added), expecting it to
/// exit by itself within [`DEADLINE`]; it is killed (and the test fails) otherwise.
pub fn run_to_exit(args: &[&str]) -> Output {
    let mut command = Command::new(shuttle_bin());
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: only prctl, which is async-signal-safe, runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("spawn the shuttle binary");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut all = Vec::new();
            let _ = pipe.read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let mut status = None;
    wait_until(DEADLINE, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("shuttle {args:?} still running after {DEADLINE:?}");
    };
    Output { status, stdout: stdout.join().expect("stdout reader"), stderr: stderr.join().expect("stderr reader") }
}

/// A running shuttle process. Dropping it kills and reaps the process; if the
/// test is failing, its stderr is printed with the test's output.
#[derive(Debug)]
pub struct Shuttle {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    dir: Option<TempDir>,
}

impl Shuttle {
    /// Spawns shuttle with `args` (plus `-http 127.0.0.1:0` unless `args` set
    /// `-http`) and waits for its first "listening on" line.
    pub fn start(args: &[&str]) -> Shuttle {
        let shuttle = Shuttle::spawn(args);
        shuttle.wait_for_line(" listening on ");
        shuttle
    }

    /// Writes `config` to a fresh directory, then starts shuttle with
    /// `-config FILE` and `args`. The directory lives as long as the process.
    pub fn start_with_config(config: &Value, args: &[&str]) -> Shuttle {
        let dir = tempdir();
        let path = write_config(dir.path(), config);
        let mut all = vec!["-config", path.to_str().expect("utf-8 temp path")];
        all.extend_from_slice(args);
        let mut shuttle = Shuttle::start(&all);
        shuttle.dir = Some(dir);
        shuttle
    }

    /// Runs shuttle with `args`, expecting it to exit by itself within
    /// [`DEADLINE`]; returns its status and every stderr line.
    pub fn start_expect_failure(args: &[&str]) -> (ExitStatus, Vec<String>) {
        let mut shuttle = Shuttle::spawn(args);
        let Some(status) = shuttle.wait_exit(DEADLINE) else {
            panic!("shuttle {args:?} was expected to fail at start-up but is still running after {DEADLINE:?}");
        };
        if let Some(reader) = shuttle.reader.take() {
            let _ = reader.join();
        }
        (status, shuttle.stderr_lines())
    }

    /// Like [`Shuttle::start_with_config`], with the process's open-file limit
    /// (soft and hard) set to `fd_limit`, so tests can run it out of descriptors.
    pub fn start_with_fd_limit(config: &Value, args: &[&str], fd_limit: u64) -> Shuttle {
        let dir = tempdir();
        let path = write_config(dir.path(), config);
        let mut all = vec!["-config", path.to_str().expect("utf-8 temp path")];
        all.extend_from_slice(args);
        let mut shuttle = Shuttle::spawn_with(&all, Launch { fd_limit: Some(fd_limit), ..Launch::default() });
        shuttle.wait_for_line(" listening on ");
        shuttle.dir = Some(dir);
        shuttle
    }

    /// Starts shuttle with `args` in a mount namespace of its own where
    /// `resolv_conf` is its `/etc/resolv.conf`, so its name lookups go to a
    /// server the test runs (see `StubDns`). Needs root.
    pub fn start_with_resolv_conf(args: &[&str], resolv_conf: &Path) -> Shuttle {
        let shuttle =
            Shuttle::spawn_with(args, Launch { resolv_conf: Some(resolv_conf.to_path_buf()), ..Launch::default() });
        shuttle.wait_for_line(" listening on ");
        shuttle
    }

    /// Like [`Shuttle::start_expect_failure`], with a private `/etc/resolv.conf`.
    pub fn start_expect_failure_with_resolv_conf(args: &[&str], resolv_conf: &Path) -> (ExitStatus, Vec<String>) {
        Shuttle::launch_expect_failure(
            args,
            Launch { resolv_conf: Some(resolv_conf.to_path_buf()), ..Launch::default() },
        )
    }

    /// Spawns shuttle with `args` (plus `-http 127.0.0.1:0` unless `args` set
    /// `-http`) as `launch` says, without waiting for anything.
    pub fn launch(args: &[&str], launch: Launch) -> Shuttle {
        Shuttle::spawn_with(args, launch)
    }

    /// Like [`Shuttle::start_expect_failure`], spawned as `launch` says.
    pub fn launch_expect_failure(args: &[&str], launch: Launch) -> (ExitStatus, Vec<String>) {
        let mut shuttle = Shuttle::spawn_with(args, launch);
        let Some(status) = shuttle.wait_exit(DEADLINE) else {
            panic!("shuttle {args:?} was expected to fail at start-up but is still running after {DEADLINE:?}");
        };
        if let Some(reader) = shuttle.reader.take() {
            let _ = reader.join();
        }
        (status, shuttle.stderr_lines())
    }

    /// Spawns shuttle under `wrapper`, a command and its options (`setpriv
    /// --reuid=...`) that shuttle's path and `args` follow, without waiting.
    pub fn launch_under(wrapper: &[&str], args: &[&str]) -> Shuttle {
        Shuttle::spawn_under(wrapper, args, Launch::default())
    }

    /// [`Shuttle::launch_under`] with limits and environment, without waiting for anything.
    pub fn launch_under_with(wrapper: &[&str], args: &[&str], launch: Launch) -> Shuttle {
        Shuttle::spawn_under(wrapper, args, launch)
    }

    fn spawn(args: &[&str]) -> Shuttle {
        Shuttle::spawn_with(args, Launch::default())
    }

    fn spawn_with(args: &[&str], launch: Launch) -> Shuttle {
        Shuttle::spawn_under(&[], args, launch)
    }

    fn spawn_under(wrapper: &[&str], args: &[&str], launch: Launch) -> Shuttle {
        let resolv_conf = launch
            .resolv_conf
            .as_ref()
            .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path"));
        let mut command = match wrapper.split_first() {
            Some((program, options)) => {
                let mut command = Command::new(program);
                command.args(options).arg(shuttle_bin());
                command
            }
            None => Command::new(shuttle_bin()),
        };
        command.args(args);
        let sets_http = args.iter().any(|a| {
            let flag = a.split('=').next().unwrap_or(a);
            flag == "-http" || flag == "--http"
        });
        if !sets_http {
            command.args(["-http", "127.0.0.1:0"]);
        }
        let sets_workers = args.iter().any(|a| a.trim_start_matches('-').split('=').next() == Some("workers"));
        if !sets_workers && test_workers() > 1 {
            command.args(["-workers".to_string(), test_workers().to_string()]);
        }
        let stdout = match &launch.stdout {
            Some(path) => {
                Stdio::from(std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())))
            }
            None => Stdio::null(),
        };
        command
            .env("RUST_LOG", "info")
            .env("RUST_LOG_STYLE", "never")
            .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        // SAFETY: only prctl, setrlimit, umask, unshare and mount, which are
        // async-signal-safe, run between fork and exec (the path was made
        // before the fork). If the test process dies, the kernel kills the
        // child too, so no shuttle outlives a killed `cargo test`.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                for (resource, limit) in [(libc::RLIMIT_NOFILE, launch.fd_limit), (libc::RLIMIT_AS, launch.mem_limit)] {
                    if let Some(limit) = limit {
                        let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                        if libc::setrlimit(resource, &rlimit) == -1 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
                if let Some(mask) = launch.umask {
                    libc::umask(mask as libc::mode_t);
                }
                if let Some(conf) = &resolv_conf {
                    // A private mount namespace: the bind mount is seen by this child only.
                    let root = c"/".as_ptr();
                    let target = c"/etc/resolv.conf".as_ptr();
                    if libc::unshare(libc::CLONE_NEWNS) == -1
                        || libc::mount(
                            std::ptr::null(),
                            root,
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) == -1
                        || libc::mount(conf.as_ptr(), target, std::ptr::null(), libc::MS_BIND, std::ptr::null()) == -1
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn the shuttle binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            thread::spawn(move || {
                let mut stderr = BufReader::new(stderr);
                let mut line = Vec::new();
                while let Ok(1..) = stderr.read_until(b'\n', &mut line) {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    lines.lock().expect("stderr lines").push(text);
                    line.clear();
                }
            })
        };
        Shuttle { child, lines, reader: Some(reader), dir: None }
    }

    /// Waits until a stderr line contains `needle` and returns it; panics if the
    /// process exits first or nothing comes within [`DEADLINE`].
    pub fn wait_for_line(&self, needle: &str) -> String {
        let mut found = None;
        wait_until(DEADLINE, || {
            found = self.stderr_lines().into_iter().find(|line| line.contains(needle));
            found.is_some() || !self.is_running()
        });
        match found.or_else(|| self.stderr_lines().into_iter().find(|line| line.contains(needle))) {
            Some(line) => line,
            None if !self.is_running() => panic!("shuttle exited before logging {needle:?}"),
            None => panic!("shuttle logged no {needle:?} within {DEADLINE:?}"),
        }
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&self) -> bool {
        // `try_wait` needs `&mut self`; /proc shows the same without reaping:
        // an unreaped child that has exited is a zombie (state Z).
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    }

    /// The bound address of service `name`, from its "service NAME listening on
    /// ADDR" line (waited for).
    pub fn service_addr(&self, name: &str) -> SocketAddr {
        let needle = format!("service {name} listening on ");
        parse_addr_after(&self.wait_for_line(&needle), &needle)
    }

    /// The bound admin address, from its "admin listening on ADDR" line (waited for).
    pub fn admin_addr(&self) -> SocketAddr {
        let needle = "admin listening on ";
        parse_addr_after(&self.wait_for_line(needle), needle)
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().expect("stderr lines").clone()
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}): {}", self.pid(), io::Error::last_os_error());
    }

    /// The exit status, once the process has exited within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(within, || {
            status = self.child.try_wait().expect("try_wait on shuttle");
            status.is_some()
        });
        status
    }

    /// The shuttle's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

impl Drop for Shuttle {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        if thread::panicking() {
            let lines = self.stderr_lines();
            eprintln!("--- shuttle stderr ({} lines, last 200) ---", lines.len());
            for line in lines.iter().skip(lines.len().saturating_sub(200)) {
                eprintln!("{line}");
            }
            eprintln!("--- end of shuttle stderr ---");
        }
    }
}

#[track_caller]
fn parse_addr_after(line: &str, needle: &str) -> SocketAddr {
    let start = line.find(needle).expect("line holds the needle") + needle.len();
    let word = line[start..].split_whitespace().next().unwrap_or("");
    let word = word.trim_end_matches(|c: char| !c.is_ascii_digit());
    word.parse().unwrap_or_else(|e| panic!("no address after {needle:?} in {line:?}: {e}"))
}

/// The first stderr line starting `shuttle: ` that contains every word in `words`.
pub fn error_line<'a>(lines: &'a [String], words: &[&str]) -> Option<&'a String> {
    lines.iter().find(|line| line.starts_with("shuttle: ") && words.iter().all(|w| line.contains(w)))
}

/// The resident set size of process `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmRSS value in kB")
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> TempDir {
    tempfile::tempdir().expect("create a temporary directory")
}

/// Writes `config` as `config.json` in `dir` and returns its path.
pub fn write_config(dir: &Path, config: &Value) -> PathBuf {
    let text = serde_json::to_string_pretty(config).expect("serialize config");
    write_file(dir, "config.json", text.as_bytes())
}

/// Writes `bytes` as `name` in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// A service config listening on 127.0.0.1:0 with `backends`; add fields with
/// `service["balance"] = json!("LC")`.
pub fn service(name: &str, backends: Vec<Value>) -> Value {
    json!({ "name": name, "address": "127.0.0.1:0", "backends": backends })
}

/// A backend config.
pub fn backend(name: &str, address: impl ToString) -> Value {
    json!({ "name": name, "address": address.to_string() })
}

/// The common config: service `web` on 127.0.0.1:0 with one backend `b0` at `address`.
pub fn one_backend(address: impl ToString) -> Value {
    json!([service("web", vec![backend("b0", address)])])
}

/// Connects with [`IO_TIMEOUT`] on the connect, reads and writes.
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// [`try_connect`], panicking on failure.
#[track_caller]
pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Reads one `\n`-terminated line (without the `\n`), byte by byte so nothing
/// after it is consumed.
#[track_caller]
pub fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => panic!("EOF after {:?} while reading a line", String::from_utf8_lossy(&line)),
            Ok(_) if byte[0] == b'\n' => return String::from_utf8_lossy(&line).into_owned(),
            Ok(_) if line.len() > 1024 => panic!("no end of line in 1 KiB"),
            Ok(_) => line.push(byte[0]),
            Err(e) => panic!("reading a line after {:?}: {e}", String::from_utf8_lossy(&line)),
        }
    }
}

/// Reads until EOF and returns everything; panics on an error or timeout.
#[track_caller]
pub fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).unwrap_or_else(|e| panic!("reading to EOF after {} bytes: {e}", all.len()));
    all
}

/// How a connection ended, seen from our side.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Closed {
    /// A read returned 0: the peer sent FIN.
    Eof,
    /// A read failed with a reset or abort: the peer sent RST.
    Reset,
}

/// Waits up to `within` for the peer to close `stream`, discarding nothing:
/// data arriving first is an error, as is no close in time.
pub fn wait_closed(stream: &mut TcpStream, within: Duration) -> Result<Closed, String> {
    stream.set_read_timeout(Some(within)).expect("set read timeout");
    let mut buf = [0u8; 256];
    let outcome = match stream.read(&mut buf) {
        Ok(0) => Ok(Closed::Eof),
        Ok(n) => Err(format!("{n} unexpected bytes instead of a close: {:?}", String::from_utf8_lossy(&buf[..n]))),
        Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
            Ok(Closed::Reset)
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(format!("still open after {within:?}"))
        }
        Err(e) => Err(format!("read failed: {e}")),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("restore read timeout");
    outcome
}

/// One echo round trip of `message` on an open proxied connection.
#[track_caller]
pub fn round_trip(client: &mut TcpStream, message: &[u8]) {
    use std::io::Write;
    client.write_all(message).expect("send through the proxy");
    let mut reply = vec![0; message.len()];
    client.read_exact(&mut reply).expect("read the echo through the proxy");
    assert_eq!(reply, message, "echo differs");
}

/// Whether a connect to `addr` is refused within `within` (a connect that
/// still gets through, e.g. into a closing backlog, is retried).
pub fn refused_within(addr: SocketAddr, within: Duration) -> bool {
    wait_until(within, || {
        matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use super::{blackhole, refusing};

    #[test]
    fn support_blackhole_connects_time_out() {
        let hole = blackhole();
        for _ in 0..2 {
            let started = Instant::now();
            let err = TcpStream::connect_timeout(&hole.addr(), Duration::from_millis(300))
                .expect_err("a connect to the blackhole must not complete");
            assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
            assert!(started.elapsed() >= Duration::from_millis(250), "it hung until our own deadline");
        }
    }

    #[test]
    fn support_refusing_address_refuses() {
        let err = TcpStream::connect_timeout(&refusing(), Duration::from_secs(5)).expect_err("nothing listens");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[test]
    fn support_parses_listening_lines() {
        let line = "[2026-01-01T00:00:00Z INFO  shuttle::server] service web listening on 127.0.0.1:4321";
        let addr = super::parse_addr_after(line, "service web listening on ");
        assert_eq!(addr, "127.0.0.1:4321".parse().unwrap());
        let line = "[INFO shuttle] admin listening on [::1]:80.";
        assert_eq!(super::parse_addr_after(line, "admin listening on "), "[::1]:80".parse().unwrap());
    }
}
