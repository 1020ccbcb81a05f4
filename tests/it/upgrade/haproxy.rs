//! A measurement, not a test of shuttle's behaviour: the same load through
//! 20 `haproxy -sf` reloads (a new process binds beside the old one, which
//! then closes its listeners: what sat in their queues is lost), through 20
//! `haproxy -sf -x` reloads (the new process takes the old one's listening
//! sockets from its stats socket, `expose-fd listeners`), and through 20
//! shuttle upgrades (the listeners are handed over, never closed). It prints
//! the counts side by side and asserts nothing about HAProxy's.
//!
//! `cargo test --test it haproxy_sf -- --ignored --nocapture`

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::load::{Load, Report};
use super::procs::Successors;
use super::steps::upgrade;
use super::UPGRADES;
use crate::admin::free_port;
use crate::support::{backend, echo, service, tempdir, try_connect, wait_until, Shuttle, DEADLINE};

const HAPROXY: &str = "/usr/sbin/haproxy";
/// Short-connection threads and long streams, the same for both: enough
/// threads that connects are in flight in the old listener's queue when it goes.
const SHORT: usize = 16;
const LONG: usize = 3;
/// Short connections between two reloads, so each one lands under load.
const BETWEEN: u64 = 100;

/// The haproxy processes, killed and reaped when dropped.
struct Haproxies(Vec<Child>);

impl Drop for Haproxies {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts haproxy on `conf`; with `old`, it replaces that process, taking
/// its sockets from `stats` when given (`-x`).
fn spawn_haproxy(conf: &Path, old: Option<u32>, stats: Option<&Path>) -> Child {
    let mut command = Command::new(HAPROXY);
    command.args(["-db", "-q", "-f", conf.to_str().expect("UTF-8")]);
    if let Some(pid) = old {
        if let Some(stats) = stats {
            command.arg("-x").arg(stats);
        }
        command.args(["-sf", &pid.to_string()]);
    }
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    command.spawn().unwrap_or_else(|e| panic!("start {HAPROXY}: {e}"))
}

/// The load through 20 reloads; with `pass_sockets`, each new haproxy takes the old one's listeners (`-x`).
fn through_haproxy(pass_sockets: bool) -> Report {
    let up = echo();
    let dir = tempdir();
    let port = free_port();
    let conf = dir.path().join("haproxy.cfg");
    let stats = dir.path().join("stats.sock");
    let global = match pass_sockets {
        true => format!("  stats socket {} mode 600 level admin expose-fd listeners\n", stats.display()),
        false => String::new(),
    };
    let text = format!(
        "global\n  maxconn 4000\n{global}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         listen front\n  bind 127.0.0.1:{port}\n  server echo {}\n",
        up.address()
    );
    let stats = pass_sockets.then_some(stats.as_path());
    std::fs::write(&conf, text).expect("write haproxy.cfg");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let mut running = Haproxies(vec![spawn_haproxy(&conf, None, None)]);
    if let Some(stats) = stats {
        assert!(wait_until(DEADLINE, || stats.exists()), "haproxy never made its stats socket");
    }
    assert!(wait_until(DEADLINE, || try_connect(addr).is_ok()), "haproxy never listened on {addr}");
    let load = Load::start(addr, SHORT, LONG);
    assert!(load.wait_more(BETWEEN, DEADLINE), "no load through haproxy");
    for reload in 1..=UPGRADES {
        let old = running.0.last().map(Child::id);
        running.0.push(spawn_haproxy(&conf, old, stats));
        assert!(load.wait_more(BETWEEN, DEADLINE), "reload {reload}: the load stalled");
        // The old ones without long streams (all but the first) finish their drain.
        let drained = wait_until(DEADLINE, || {
            let n = running.0.len();
            running.0[1..n - 1].iter_mut().all(|c| c.try_wait().ok().flatten().is_some())
        });
        assert!(drained, "reload {reload}: an old haproxy still runs");
    }
    load.finish()
}

fn through_shuttle() -> Report {
    let up = echo();
    let shuttle =
        Shuttle::start_with_config(&json!([service("web", vec![backend("b0", up.address())])]), &["-grace", "120"]);
    let mut successors = Successors::of(&shuttle);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    let load = Load::start(addr, SHORT, LONG);
    assert!(load.wait_more(BETWEEN, DEADLINE), "no load through shuttle");
    let mut old = shuttle.pid();
    for step in 1..=UPGRADES {
        old = upgrade(&shuttle, &mut successors, admin, old);
        assert!(load.wait_more(BETWEEN, DEADLINE), "upgrade {step}: the load stalled");
    }
    load.finish()
}

#[test]
#[ignore = "a measurement: run it with --ignored --nocapture to see the numbers"]
fn haproxy_sf_reloads_under_the_same_load() {
    if !Path::new(HAPROXY).exists() {
        eprintln!("SKIPPED: {HAPROXY} is not installed (apt-get install haproxy); this test measured nothing");
        return;
    }
    eprintln!("{UPGRADES} reloads under {SHORT} short-connection threads and {LONG} long streams:");
    eprintln!(
        "{:<24} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6} {:>12} {:>9}",
        "", "ok", "refused", "reset", "wrong", "cut", "stalled", "other", "long intact", "took"
    );
    for (name, pass_sockets) in [("haproxy -sf", false), ("haproxy -sf -x", true)] {
        let started = Instant::now();
        let haproxy = through_haproxy(pass_sockets);
        row(name, &haproxy, started.elapsed());
        for line in haproxy.described.iter().chain(&haproxy.long_failures) {
            eprintln!("  {name}: {line}");
        }
    }
    let started = Instant::now();
    let shuttle = through_shuttle();
    row("shuttle SIGUSR2", &shuttle, started.elapsed());
    shuttle.assert_clean();
}

/// One line of the table.
fn row(name: &str, r: &Report, took: Duration) {
    eprintln!(
        "{name:<24} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6} {:>12} {:>8.1}s",
        r.ok,
        r.refused,
        r.reset,
        r.wrong,
        r.cut,
        r.stalled,
        r.other,
        format!("{}/{}", r.long_bytes.len(), r.long_bytes.len() + r.long_failures.len()),
        took.as_secs_f64()
    );
}
