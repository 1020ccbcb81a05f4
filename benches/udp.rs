//! UDP benchmark: 64-byte echoes over 50 flows through the release `shuttle`
//! (one worker loop and two) and through nginx's stream module (`listen ...
//! udp reuseport`, one and two worker processes) when it is installed, and
//! straight to the backend, all on loopback, in one run.
//!
//! `cargo bench --bench udp` (about a minute) or `cargo bench --bench udp --
//! --secs 2 --rounds 1`. Each flow keeps one datagram in flight (a closed
//! loop), so datagrams/s and the round trip measure the proxy's latency under
//! a steady load, and the proxy's CPU time per datagram its cost. Figures are
//! medians over the rounds; ratios are to nginx with two workers, measured
//! in the same run.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::UdpSocket as MioUdp;
use mio::{Events, Interest, Poll, Token};

/// Flows (client sockets) of the workload.
const FLOWS: usize = 50;
/// Threads that drive the flows.
const CLIENT_THREADS: usize = 2;
/// Bytes of every datagram (echoed back).
const MESSAGE: usize = 64;

/// One proxy (or none) under test.
struct Target {
    name: String,
    addr: SocketAddr,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGTERM so nginx's master takes its workers down too.
            // SAFETY: kill(2) on our own child's pid, with a valid signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free loopback UDP port (bound, then released).
fn free_udp() -> io::Result<SocketAddr> {
    UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

/// The echo backend: two threads answering on one socket, until `stop`.
fn echo_backend(stop: Arc<AtomicBool>) -> io::Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let addr = socket.local_addr()?;
    for _ in 0..2 {
        let (socket, stop) = (socket.try_clone()?, stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
    }
    Ok(addr)
}

fn wait_answering(addr: SocketAddr) -> io::Result<()> {
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        client.send_to(b"ready?", addr)?;
        if client.recv_from(&mut [0u8; 64]).is_ok() {
            return Ok(());
        }
    }
    Err(io::Error::other(format!("nothing answers on {addr}")))
}

fn start_shuttle(workers: usize, backend: SocketAddr) -> io::Result<Target> {
    let dir = tempfile::tempdir()?;
    let addr = free_udp()?;
    let config = format!(
        r#"[{{"name": "echo", "address": "{addr}", "protocol": "udp", "max_flows": 100000,
            "backends": [{{"name": "b", "address": "{backend}"}}]}}]"#
    );
    let path = dir.path().join("config.json");
    std::fs::write(&path, config)?;
    let child = Command::new(env!("CARGO_BIN_EXE_shuttle"))
        .args(["-http", "127.0.0.1:0", "-workers", &workers.to_string(), "-config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let target = Target {
        name: format!("shuttle{}", if workers > 1 { workers.to_string() } else { String::new() }),
        addr,
        child: Some(child),
        _dir: Some(dir),
    };
    wait_answering(addr)?;
    Ok(target)
}

/// nginx's stream module, if it is installed: `nginx -V` says whether it is built in or a module.
fn nginx() -> Option<(String, Option<String>)> {
    let program = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists())?;
    let output = Command::new(program).arg("-V").output().ok()?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    if text.contains("--with-stream=dynamic") {
        let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
        return Path::new(module).exists().then(|| (program.to_string(), Some(module.to_string())));
    }
    text.contains("--with-stream").then(|| (program.to_string(), None))
}

fn start_nginx(workers: usize, backend: SocketAddr, program: &str, module: Option<&str>) -> io::Result<Target> {
    let dir = tempfile::tempdir()?;
    let addr = free_udp()?;
    let load = module.map_or_else(String::new, |m| format!("load_module {m};\n"));
    let d = dir.path().display();
    let config = format!(
        "{load}daemon off;\nmaster_process on;\nworker_processes {workers};\nerror_log stderr;\n\
         pid {d}/nginx.pid;\nlock_file {d}/nginx.lock;\nevents {{ worker_connections 4096; }}\n\
         stream {{\n  server {{\n    listen {addr} udp reuseport;\n    proxy_pass {backend};\n    proxy_timeout 30s;\n  }}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config)?;
    let child = Command::new(program)
        .args(["-p", &d.to_string(), "-c", &path.display().to_string(), "-e", "stderr"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let target = Target { name: format!("nginx{workers}"), addr, child: Some(child), _dir: Some(dir) };
    wait_answering(addr)?;
    Ok(target)
}

/// CPU time of `pid` and its children (nginx's workers), from /proc.
fn cpu_of(pid: u32) -> Duration {
    let ticks = |pid: &str| -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
        let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
    };
    let mut total = ticks(&pid.to_string());
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace() {
        total += ticks(child);
    }
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(total * 1_000_000 / hz)
}

/// One window's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_datagram: Option<f64>,
}

/// Runs the closed-loop workload against `to` for `secs`.
fn run(to: SocketAddr, pid: Option<u32>, secs: Duration) -> io::Result<Window> {
    let start_cpu = pid.map(cpu_of);
    let started = Instant::now();
    let deadline = started + secs;
    let handles: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            // The flows split over the threads as evenly as they go.
            let flows = (FLOWS * (t + 1)) / CLIENT_THREADS - (FLOWS * t) / CLIENT_THREADS;
            thread::spawn(move || drive(to, flows, deadline))
        })
        .collect();
    let mut rtts = Vec::new();
    for h in handles {
        rtts.extend(h.join().map_err(|_| io::Error::other("a client thread panicked"))??);
    }
    let elapsed = started.elapsed();
    let cpu = pid.zip(start_cpu).map(|(p, s)| cpu_of(p).saturating_sub(s));
    rtts.sort_unstable();
    let at = |q: f64| rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1))).copied();
    let n = rtts.len() as f64;
    Ok(Window {
        per_sec: n / elapsed.as_secs_f64(),
        p50_us: at(0.50).unwrap_or(0) as f64,
        p99_us: at(0.99).unwrap_or(0) as f64,
        cpu_us_per_datagram: cpu.map(|c| c.as_micros() as f64 / n.max(1.0)),
    })
}

/// One client thread: `flows` sockets, each with one datagram in flight; the round trips in µs.
fn drive(to: SocketAddr, flows: usize, deadline: Instant) -> io::Result<Vec<u32>> {
    let mut poll = Poll::new()?;
    let mut sockets = Vec::with_capacity(flows);
    let mut sent_at = Vec::with_capacity(flows);
    let payload = [0x5au8; MESSAGE];
    for i in 0..flows {
        let mut s = MioUdp::bind("127.0.0.1:0".parse().map_err(io::Error::other)?)?;
        s.connect(to)?;
        poll.registry().register(&mut s, Token(i), Interest::READABLE)?;
        s.send(&payload)?;
        sent_at.push(Instant::now());
        sockets.push(s);
    }
    let mut rtts = Vec::with_capacity(1 << 20);
    let mut events = Events::with_capacity(256);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        if events.is_empty() {
            // A datagram lost on the way: put one in flight again on every quiet flow.
            for (i, s) in sockets.iter().enumerate() {
                if sent_at[i].elapsed() > Duration::from_millis(200) {
                    let _ = s.send(&payload);
                    sent_at[i] = Instant::now();
                }
            }
        }
        for event in events.iter() {
            let i = event.token().0;
            loop {
                match sockets[i].recv(&mut buf) {
                    Ok(_) => {
                        rtts.push(sent_at[i].elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        let _ = sockets[i].send(&payload);
                        sent_at[i] = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
        }
    }
    Ok(rtts)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("udp: not run under `cargo test`; use `cargo bench --bench udp`");
        return Ok(());
    }
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let secs = Duration::from_secs_f64(value("--secs").and_then(|v| v.parse().ok()).unwrap_or(3.0));
    let rounds: usize = value("--rounds").and_then(|v| v.parse().ok()).unwrap_or(3);
    let stop = Arc::new(AtomicBool::new(false));
    let backend = echo_backend(stop.clone())?;
    let nginx = nginx();
    let mut names = vec!["direct".to_string(), "shuttle".into(), "shuttle2".into()];
    if nginx.is_some() {
        names.extend(["nginx1".to_string(), "nginx2".into()]);
    } else {
        println!("nginx with the stream module is not installed: no nginx figures");
    }
    let mut results: Vec<(String, Vec<Window>)> = names.iter().map(|n| (n.clone(), Vec::new())).collect();
    for round in 0..rounds {
        for (name, windows) in results.iter_mut() {
            let target = match name.as_str() {
                "direct" => Target { name: name.clone(), addr: backend, child: None, _dir: None },
                "shuttle" => start_shuttle(1, backend)?,
                "shuttle2" => start_shuttle(2, backend)?,
                n => {
                    let (program, module) = nginx.clone().ok_or_else(|| io::Error::other("no nginx"))?;
                    start_nginx(if n == "nginx1" { 1 } else { 2 }, backend, &program, module.as_deref())?
                }
            };
            // Warm up the flows and the proxy's sessions, then measure.
            run(target.addr, None, Duration::from_millis(300))?;
            let window = run(target.addr, target.child.as_ref().map(Child::id), secs)?;
            eprintln!("round {round} {:<9} {:>9.0} datagrams/s", target.name, window.per_sec);
            windows.push(window);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let baseline =
        results.iter().find(|(n, _)| n == "nginx2").map(|(_, w)| median(w.iter().map(|w| w.per_sec).collect()));
    let baseline_cpu = results
        .iter()
        .find(|(n, _)| n == "nginx2")
        .map(|(_, w)| median(w.iter().filter_map(|w| w.cpu_us_per_datagram).collect()));
    println!("\n64-byte UDP echoes, {FLOWS} flows, one in flight each; medians of {rounds} rounds of {secs:?}");
    println!(
        "{:<9} {:>12} {:>9} {:>9} {:>14} {:>10} {:>10}",
        "target", "datagrams/s", "p50 µs", "p99 µs", "CPU µs/dgram", "vs nginx2", "CPU ratio"
    );
    for (name, windows) in &results {
        let rate = median(windows.iter().map(|w| w.per_sec).collect());
        let p50 = median(windows.iter().map(|w| w.p50_us).collect());
        let p99 = median(windows.iter().map(|w| w.p99_us).collect());
        let cpu: Vec<f64> = windows.iter().filter_map(|w| w.cpu_us_per_datagram).collect();
        let cpu = (!cpu.is_empty()).then(|| median(cpu));
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
        println!(
            "{name:<9} {rate:>12.0} {p50:>9.0} {p99:>9.0} {:>14} {:>10} {:>10}",
            show(cpu),
            show(baseline.map(|b| rate / b)),
            show(cpu.zip(baseline_cpu).map(|(c, b)| c / b))
        );
    }
    Ok(())
}
