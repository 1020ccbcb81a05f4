//! Proxying under stress: a client reset behind a stalled backend, signals
//! that must not stop the proxy, and hanging health checks under a low fd limit.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use socket2::Socket;

use super::MIB;
use crate::admin::get;
use crate::support::{
    backend, blackhole, connect, echo, one_backend, round_trip, service, stall, wait_until, Shuttle, DEADLINE,
};

/// How long shuttle may take to act on a client's reset.
const RESET_DEADLINE: Duration = Duration::from_secs(5);

/// The `active` count of service `name`.
#[track_caller]
fn active(admin: SocketAddr, name: &str) -> u64 {
    let stats = get(admin, &format!("/{name}")).expect(200).json();
    stats["active"].as_u64().unwrap_or_else(|| panic!("no active count in {stats}"))
}

/// Writes until a write blocks for `stuck` (every buffer on the way to the
/// stalled backend is full); returns the bytes written.
fn fill_until_blocked(client: &mut TcpStream, stuck: Duration) -> usize {
    client.set_write_timeout(Some(stuck)).expect("set write timeout");
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    // A bound far above any loopback buffering, so a proxy that never stops reading fails the test.
    while sent < 512 * MIB {
        match client.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return sent,
            Err(e) => panic!("writing towards the stalled backend after {sent} bytes: {e}"),
        }
    }
    panic!("{sent} bytes written and the writes never blocked: the proxy does not apply backpressure");
}

/// Closes `stream` with a reset (`SO_LINGER` 0): the kernel sends RST, not FIN.
fn reset(stream: TcpStream) {
    let socket = Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).expect("set SO_LINGER 0");
    drop(socket);
}

#[test]
fn reset_behind_a_stalled_backend_closes_both_sides() {
    // The backend accepts and never reads, so shuttle's buffer towards it fills
    // and it stops reading the client: only the reset itself can tell it the
    // client is gone. Timeouts stay at 0 (the default): nothing else ends the pair.
    let stalled = stall();
    let shuttle = Shuttle::start_with_config(&one_backend(stalled.address()), &[]);
    let web = shuttle.service_addr("web");
    let admin = shuttle.admin_addr();

    for pair in 0..20 {
        let mut client = connect(web);
        let sent = fill_until_blocked(&mut client, Duration::from_millis(300));
        assert!(sent > MIB, "pair {pair}: only {sent} bytes went out before the writes blocked");
        let mut held =
            stalled.take(1, DEADLINE).unwrap_or_else(|| panic!("pair {pair}: the backend got no connection"));
        assert_eq!(active(admin, "web"), 1, "pair {pair}: the pair is open before the reset");

        reset(client);
        // Shuttle must close the pair although no buffer on its way can move.
        let closed = wait_until(RESET_DEADLINE, || active(admin, "web") == 0);
        assert!(
            closed,
            "pair {pair}: {sent} bytes sent, then a reset: still active after {RESET_DEADLINE:?}: {}",
            get(admin, "/web").json()
        );
        // The backend side is closed too: after what was buffered, EOF or a reset.
        let (drained, _reset) = held[0]
            .drain_until_closed(DEADLINE)
            .unwrap_or_else(|e| panic!("pair {pair}: the backend side was not closed: {e}"));
        assert!(drained as usize <= sent, "pair {pair}: the backend got {drained} bytes of {sent}");
    }
}

/// Sends `signal`, waits for the log line `needle` and checks that shuttle
/// still runs and proxies.
#[track_caller]
fn survives(shuttle: &Shuttle, web: SocketAddr, signal: i32, needle: &[&str]) {
    let seen = shuttle.stderr_lines().len();
    shuttle.signal(signal);
    let logged = wait_until(DEADLINE, || {
        shuttle.stderr_lines()[seen..].iter().any(|line| needle.iter().any(|n| line.contains(n)))
            || !shuttle.is_running()
    });
    assert!(shuttle.is_running(), "shuttle exited on signal {signal}");
    assert!(logged, "no log line with any of {needle:?} after signal {signal}");
    let mut client = connect(web);
    round_trip(&mut client, format!("after signal {signal}").as_bytes());
}

#[test]
fn sighup_and_sigusr1_are_logged_by_name_and_change_nothing() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let web = shuttle.service_addr("web");
    // A connection open across the signals keeps working too.
    let mut open = connect(web);
    round_trip(&mut open, b"before the signals");

    survives(&shuttle, web, libc::SIGHUP, &["SIGHUP"]);
    survives(&shuttle, web, libc::SIGUSR1, &["SIGUSR1"]);
    round_trip(&mut open, b"after the signals");
    assert!(shuttle.is_running());
}

/// A config with service `web` (one backend at `web_backend`) and service
/// `checks`: `n` backends whose health checks hang until `connect_timeout`.
fn with_hanging_checks(web_backend: &str, hole: &str, n: usize) -> Value {
    let backends: Vec<Value> = (0..n)
        .map(|i| {
            let mut b = backend(&format!("c{i}"), hole);
            b["check_address"] = json!(hole);
            b
        })
        .collect();
    let mut checks = service("checks", backends);
    checks["check_interval"] = json!(1);
    checks["connect_timeout"] = json!(5);
    json!([service("web", vec![backend("b0", web_backend)]), checks])
}

#[test]
fn hanging_health_checks_under_a_low_fd_limit_leave_descriptors_for_clients() {
    // 400 checks that each hang for 5 s would need 400 descriptors; with a
    // limit of 256 the probes must keep to a share and leave the rest to
    // clients, and say so in a line or two, not thousands.
    let echo = echo();
    let hole = blackhole();
    let config = with_hanging_checks(&echo.address(), &hole.address(), 400);
    let shuttle = Shuttle::start_with_fd_limit(&config, &[], 256);
    let web = shuttle.service_addr("web");
    let started = Instant::now();

    // 20 sequential connections spread over 3 s, while the checks are in flight.
    for i in 0..20 {
        let mut client = TcpStream::connect_timeout(&web, Duration::from_secs(5)).expect("connect to web");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("set read timeout");
        client.set_write_timeout(Some(Duration::from_secs(5))).expect("set write timeout");
        let message = format!("round trip {i}");
        client.write_all(message.as_bytes()).expect("send through the proxy");
        let mut reply = vec![0; message.len()];
        if let Err(e) = client.read_exact(&mut reply) {
            panic!("round trip {i} of 20 failed after {:?}: {e}", started.elapsed());
        }
        assert_eq!(reply, message.as_bytes());
        let next = Duration::from_millis(150) * (i + 1);
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let window = Duration::from_secs(3);
    if let Some(rest) = window.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let lines = shuttle.stderr_lines();
    let warnings: Vec<&String> =
        lines.iter().filter(|l| l.contains("skipped") || l.contains("waiting for a descriptor")).collect();
    assert!(
        warnings.len() <= 5,
        "{} warnings about skipped checks in {:?}; the first: {:#?}",
        warnings.len(),
        started.elapsed(),
        &warnings[..warnings.len().min(5)]
    );
    assert!(shuttle.is_running());
}
