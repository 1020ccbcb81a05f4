//! One line for each way a connection ends, with the right `end` and fields,
//! in both formats.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use socket2::Socket;

use super::line::{parse, Line};
use super::{echo_once, start, stop, wait_for_lines, Format};
use crate::admin::stats;
use crate::support::{
    backend, connect, echo, read_to_eof, refusing, round_trip, service, tempdir, wait_closed, wait_until, Backend,
    Conn, Launch, Shuttle, DEADLINE,
};

/// Closes `stream` with a reset (`SO_LINGER` 0): the kernel sends RST, not FIN.
fn reset(stream: TcpStream) {
    let socket = Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).expect("set SO_LINGER 0");
    drop(socket);
}

/// Reads exactly `n` bytes from a backend connection.
fn read_n(conn: &mut Conn, n: usize) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = [0u8; 64];
    while all.len() < n {
        match conn.read(&mut buf[..(n - all.len()).min(64)])? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            k => all.extend_from_slice(&buf[..k]),
        }
    }
    Ok(all)
}

/// What the line of one connection must say.
#[derive(Debug)]
struct Expected {
    /// Which case it is, for messages.
    case: &'static str,
    service: &'static str,
    client: SocketAddr,
    /// The backend it ended with; `connect_ms` is present exactly when there is one.
    backend: Option<(&'static str, SocketAddr)>,
    sent: u64,
    received: u64,
    failed_connects: u64,
    end: &'static str,
    /// The least it can have lasted (an idle timeout, the grace period).
    lasted: Duration,
}

#[track_caller]
fn check(line: &Line, want: &Expected, window: (SystemTime, SystemTime)) {
    let case = want.case;
    assert_eq!(line.service, want.service, "{case}: {line:?}");
    assert_eq!(line.client, want.client, "{case}: {line:?}");
    assert_eq!(line.backend.as_deref(), want.backend.map(|(name, _)| name), "{case}: {line:?}");
    assert_eq!(line.backend_address, want.backend.map(|(_, addr)| addr), "{case}: {line:?}");
    assert_eq!(line.connect_ms.is_some(), want.backend.is_some(), "{case}: connect_ms iff connected: {line:?}");
    assert_eq!((line.sent, line.received), (want.sent, want.received), "{case}: bytes each way: {line:?}");
    assert_eq!(line.failed_connects, want.failed_connects, "{case}: {line:?}");
    assert_eq!(line.end, want.end, "{case}: {line:?}");
    assert_eq!(line.queue_ms, 0.0, "{case}: no limits, so nobody queued: {line:?}");
    let (from, to) = window;
    let slack = Duration::from_secs(1);
    assert!(line.time + slack >= from && line.time <= to + slack, "{case}: the time is not now: {line:?}");
    let longest = to.duration_since(from).unwrap_or_default() + slack;
    assert!(line.duration_ms >= 0.0 && line.duration_ms <= longest.as_secs_f64() * 1000.0, "{case}: {line:?}");
    assert!(line.duration_ms >= want.lasted.as_secs_f64() * 1000.0 - 50.0, "{case}: too short: {line:?}");
    if let Some(connect) = line.connect_ms {
        assert!(connect >= 0.0 && connect <= line.duration_ms, "{case}: connect_ms: {line:?}");
    }
}

/// The test backends of [`every_way_a_connection_ends`], kept alive through it.
struct Backends {
    echo: Backend,
    /// Sends [`GREETING`], shuts its write side, then reads to EOF.
    closer: Backend,
    /// Echoes 4 bytes, reads 4 more, then resets.
    resetter: Backend,
}

/// What the `closer` backend sends before its EOF.
const GREETING: &[u8] = b"the backend speaks first and closes\n";
/// The idle timeout of `idle-client` and `idle-server`, in seconds.
const IDLE: f64 = 0.3;

fn backends() -> Backends {
    let closer = Backend::spawn(|mut conn| {
        if conn.write_all(GREETING).is_ok() && conn.shutdown_write().is_ok() {
            let _ = conn.read_to_end();
        }
    });
    let resetter = Backend::spawn(|mut conn| {
        let Ok(ping) = read_n(&mut conn, 4) else { return };
        // The second message comes once the client has the echo: every byte is counted before the reset.
        if conn.write_all(&ping).is_ok() && read_n(&mut conn, 4).is_ok() {
            let _ = conn.reset();
        }
    });
    Backends { echo: echo(), closer, resetter }
}

/// A service for each way to end: the timeouts, no backend (none, drained, down
/// by its checks), backends that all refuse, and a failover.
fn every_end_config(b: &Backends) -> Value {
    let mut idle_client = service("idle-client", vec![backend("b0", b.echo.address())]);
    idle_client["client_timeout"] = json!(IDLE);
    let mut idle_server = service("idle-server", vec![backend("b0", b.echo.address())]);
    idle_server["server_timeout"] = json!(IDLE);
    let mut drained = backend("b0", b.echo.address());
    drained["weight"] = json!(0);
    let mut checked = backend("b0", b.echo.address());
    checked["check_address"] = json!(refusing().to_string());
    let mut down = service("down", vec![checked]);
    down["check_interval"] = json!(0.1);
    down["fall"] = json!(1);
    json!([
        service("web", vec![backend("b0", b.echo.address())]),
        service("closer", vec![backend("b0", b.closer.address())]),
        idle_client,
        idle_server,
        service("resetter", vec![backend("b0", b.resetter.address())]),
        service("empty", vec![]),
        service("drained", vec![drained]),
        down,
        service("refused", vec![backend("b0", refusing()), backend("b1", refusing())]),
        service("failover", vec![backend("b0", refusing()), backend("b1", b.echo.address())]),
    ])
}

/// Runs one connection for each way a connection can end but shutdown, one after the other.
fn run_every_end(shuttle: &Shuttle, b: &Backends) -> Vec<Expected> {
    let addr = |name: &str| shuttle.service_addr(name);
    let local = |client: &TcpStream| client.local_addr().expect("client address");
    let none = Duration::ZERO;
    let mut expected = Vec::new();

    let client = echo_once(addr("web"), b"hello");
    let echo = Some(("b0", b.echo.addr()));
    expected.push(Expected {
        case: "client closes first",
        service: "web",
        client,
        backend: echo,
        sent: 5,
        received: 5,
        failed_connects: 0,
        end: "client_closed",
        lasted: none,
    });

    let mut client = connect(addr("closer"));
    assert_eq!(read_to_eof(&mut client), GREETING);
    client.write_all(b"bye").expect("write after the backend's EOF");
    client.shutdown(Shutdown::Write).expect("shut write");
    expected.push(Expected {
        case: "backend closes first",
        service: "closer",
        client: local(&client),
        backend: Some(("b0", b.closer.addr())),
        sent: 3,
        received: GREETING.len() as u64,
        failed_connects: 0,
        end: "backend_closed",
        lasted: none,
    });

    for (service, end) in [("idle-client", "client_timeout"), ("idle-server", "server_timeout")] {
        let mut client = connect(addr(service));
        round_trip(&mut client, b"ping");
        let closed = wait_closed(&mut client, DEADLINE);
        assert!(closed.is_ok(), "{service}: the idle pair was not closed: {closed:?}");
        expected.push(Expected {
            case: end,
            service,
            client: local(&client),
            backend: echo,
            sent: 4,
            received: 4,
            failed_connects: 0,
            end,
            lasted: Duration::from_secs_f64(IDLE),
        });
    }

    let mut client = connect(addr("web"));
    round_trip(&mut client, b"ping");
    let client_addr = local(&client);
    reset(client);
    expected.push(Expected {
        case: "client resets",
        service: "web",
        client: client_addr,
        backend: echo,
        sent: 4,
        received: 4,
        failed_connects: 0,
        end: "client_reset",
        lasted: none,
    });

    let mut client = connect(addr("resetter"));
    round_trip(&mut client, b"ping");
    client.write_all(b"rst!").expect("the second message");
    let closed = wait_closed(&mut client, DEADLINE);
    assert!(closed.is_ok(), "the client of a backend that reset: {closed:?}");
    expected.push(Expected {
        case: "backend resets",
        service: "resetter",
        client: local(&client),
        backend: Some(("b0", b.resetter.addr())),
        sent: 8,
        received: 4,
        failed_connects: 0,
        end: "backend_reset",
        lasted: none,
    });

    let admin = shuttle.admin_addr();
    let down = wait_until(DEADLINE, || stats(admin, "/down/b0")["up"] == json!(false));
    assert!(down, "the checked backend never went down: {}", stats(admin, "/down"));
    for (case, service) in [("no backend at all", "empty"), ("drained", "drained"), ("all down", "down")] {
        let mut client = connect(addr(service));
        let closed = wait_closed(&mut client, DEADLINE);
        assert!(closed.is_ok(), "{service}: {closed:?}");
        expected.push(Expected {
            case,
            service,
            client: local(&client),
            backend: None,
            sent: 0,
            received: 0,
            failed_connects: 0,
            end: "no_backend",
            lasted: none,
        });
    }

    let mut client = connect(addr("refused"));
    let closed = wait_closed(&mut client, DEADLINE);
    assert!(closed.is_ok(), "the client of backends that all refuse: {closed:?}");
    expected.push(Expected {
        case: "every backend refuses",
        service: "refused",
        client: local(&client),
        backend: None,
        sent: 0,
        received: 0,
        failed_connects: 2,
        end: "connect_failed",
        lasted: none,
    });

    // Round robin starts at the first backend, which refuses: the second serves.
    let client = echo_once(addr("failover"), b"failing over");
    expected.push(Expected {
        case: "failover",
        service: "failover",
        client,
        backend: echo.map(|(_, a)| ("b1", a)),
        sent: 12,
        received: 12,
        failed_connects: 1,
        end: "client_closed",
        lasted: none,
    });
    expected
}

/// Every way but shutdown, then a connection still open when shuttle stops
/// with a 1 s grace; the log is read whole after the exit.
fn every_way_a_connection_ends(format: Format) {
    let b = backends();
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let args = ["-access-log", log.to_str().unwrap(), "-access-log-format", format.flag(), "-grace", "1"];
    let mut shuttle = start(dir.path(), &every_end_config(&b), &args, Launch::default());
    let from = SystemTime::now();
    let mut expected = run_every_end(&shuttle, &b);
    // The lines come while shuttle runs, not only when it exits.
    wait_for_lines(&log, expected.len());

    let mut held = connect(shuttle.service_addr("web"));
    round_trip(&mut held, b"held");
    expected.push(Expected {
        case: "open when the grace ran out",
        service: "web",
        client: held.local_addr().expect("client address"),
        backend: Some(("b0", b.echo.addr())),
        sent: 4,
        received: 4,
        failed_connects: 0,
        end: "shutdown",
        lasted: Duration::from_secs(1),
    });
    stop(&mut shuttle);
    let to = SystemTime::now();

    let text = fs::read_to_string(&log).expect("read the access log");
    assert!(text.ends_with('\n'), "the log ends in a partial line: {text}");
    let mut by_client: BTreeMap<SocketAddr, Vec<Line>> = BTreeMap::new();
    for raw in text.lines() {
        let line = parse(format, raw);
        by_client.entry(line.client).or_default().push(line);
    }
    for want in &expected {
        match by_client.get(&want.client).map(Vec::as_slice) {
            Some([line]) => check(line, want, (from, to)),
            other => panic!("{}: not exactly one line for {}: {other:?}\nthe log:\n{text}", want.case, want.client),
        }
    }
    assert_eq!(text.lines().count(), expected.len(), "lines nobody asked for:\n{text}");
}

#[test]
fn text_lines_for_every_way_a_connection_ends() {
    every_way_a_connection_ends(Format::Text);
}

#[test]
fn json_lines_for_every_way_a_connection_ends() {
    every_way_a_connection_ends(Format::Json);
}

#[test]
fn a_connection_cut_by_a_second_sigterm_is_logged_as_shutdown() {
    let echo = echo();
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let args = ["-access-log", log.to_str().unwrap(), "-access-log-format", "json", "-grace", "30"];
    let mut shuttle =
        start(dir.path(), &json!([service("web", vec![backend("b0", echo.address())])]), &args, Launch::default());
    let from = SystemTime::now();
    let mut held = connect(shuttle.service_addr("web"));
    round_trip(&mut held, b"held open");
    shuttle.signal(libc::SIGTERM);
    shuttle.wait_for_line("shutting down");
    shuttle.signal(libc::SIGTERM);
    let status = shuttle.wait_exit(DEADLINE).expect("exit after the second SIGTERM");
    assert!(status.success(), "{status:?}");
    let lines = wait_for_lines(&log, 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let want = Expected {
        case: "cut by a second SIGTERM",
        service: "web",
        client: held.local_addr().expect("client address"),
        backend: Some(("b0", echo.addr())),
        sent: 9,
        received: 9,
        failed_connects: 0,
        end: "shutdown",
        lasted: Duration::ZERO,
    };
    check(&parse(Format::Json, &lines[0]), &want, (from, SystemTime::now()));
}
