//! Health checks (SPEC §4) as the stats API shows them (SPEC §5: `up`,
//! `check_success`, `check_fail`, `errors`).
//!
//! Every wait polls the backend's stats against a deadline. A claim that
//! something does *not* happen (no checks) is timed by a control backend whose
//! checks do run, never by a fixed sleep. Invariants are checked on every
//! reading: results of one probe arrive in order, so after a server stops all
//! later failures are consecutive, and "up with `fall` of them" or "down with
//! fewer" are both bugs, whatever the polling lag.
//!
//! A server that stops and returns keeps its port reserved by a bound,
//! non-listening socket while it is down, so no parallel test can be handed
//! that port and connects to it are refused.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use socket2::Socket;

use crate::support::{
    backend, blackhole, connect, echo, named, read_line, read_to_eof, reuse_socket, service, wait_closed, wait_until,
    Backend, Restartable, Shuttle, DEADLINE, IO_TIMEOUT,
};

/// How long a backend may take to reach an expected health state.
const HEALTH_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Admin client and stats
// ---------------------------------------------------------------------------

/// One admin request with `Connection: close`; returns the status and the JSON body.
#[track_caller]
fn admin_request(admin: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(|b| serde_json::to_vec(b).expect("serialize the request body")).unwrap_or_default();
    let mut stream = connect(admin);
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&body))
        .unwrap_or_else(|e| panic!("sending {method} {path}: {e}"));
    let reply = read_to_eof(&mut stream);
    let text = String::from_utf8_lossy(&reply);
    let Some(end) = reply.windows(4).position(|w| w == b"\r\n\r\n") else {
        panic!("no end of head in the reply to {method} {path}: {text:?}");
    };
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in the reply to {method} {path}: {text:?}"));
    let json = serde_json::from_slice(&reply[end + 4..])
        .unwrap_or_else(|e| panic!("the reply to {method} {path} is not JSON ({e}): {text:?}"));
    (status, json)
}

#[track_caller]
fn get(admin: SocketAddr, path: &str) -> Value {
    let (status, body) = admin_request(admin, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

#[track_caller]
fn put(admin: SocketAddr, path: &str, body: &Value) -> Value {
    let (status, reply) = admin_request(admin, "PUT", path, Some(body));
    assert_eq!(status, 200, "PUT {path} {body}: {reply}");
    reply
}

/// The health-related part of a backend's stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Health {
    up: bool,
    check_success: u64,
    check_fail: u64,
    errors: u64,
}

impl Health {
    #[track_caller]
    fn from_stats(stats: &Value) -> Health {
        let count = |field: &str| stats[field].as_u64().unwrap_or_else(|| panic!("no counter {field:?} in {stats}"));
        Health {
            up: stats["up"].as_bool().unwrap_or_else(|| panic!("no boolean \"up\" in {stats}")),
            check_success: count("check_success"),
            check_fail: count("check_fail"),
            errors: count("errors"),
        }
    }
}

#[track_caller]
fn health(admin: SocketAddr, service: &str, backend: &str) -> Health {
    Health::from_stats(&get(admin, &format!("/{service}/{backend}")))
}

/// Polls a backend's stats until `done` holds and returns that reading; `done`
/// sees every reading, so it can assert invariants too. Panics with the last
/// reading after [`HEALTH_DEADLINE`].
#[track_caller]
fn wait_health(
    admin: SocketAddr,
    service: &str,
    backend: &str,
    what: &str,
    mut done: impl FnMut(&Health) -> bool,
) -> Health {
    let deadline = Instant::now() + HEALTH_DEADLINE;
    loop {
        let reading = health(admin, service, backend);
        if done(&reading) {
            return reading;
        }
        if Instant::now() >= deadline {
            panic!("{service}/{backend}: no {what} within {HEALTH_DEADLINE:?}; last stats {reading:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A backend config with a `check_address`.
fn checked(name: &str, address: impl ToString, check_address: impl ToString) -> Value {
    let mut config = backend(name, address);
    config["check_address"] = json!(check_address.to_string());
    config
}

/// `service` with the given fields set.
fn with(mut service: Value, settings: &[(&str, Value)]) -> Value {
    for (field, value) in settings {
        service[*field] = value.clone();
    }
    service
}

/// How many stderr lines contain `level` and every one of `words`.
fn count_lines(shuttle: &Shuttle, level: &str, words: &[&str]) -> usize {
    shuttle.stderr_lines().iter().filter(|l| l.contains(level) && words.iter().all(|w| l.contains(w))).count()
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// An address whose connects are refused: a bound socket that does not
/// listen. Unlike a port bound and closed again, it cannot be handed to another
/// socket while the test runs.
struct Refusing {
    addr: SocketAddr,
    _socket: Socket,
}

impl Refusing {
    fn new() -> Refusing {
        let socket = reuse_socket();
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).expect("bind a refusing address");
        let addr = socket.local_addr().expect("refusing address").as_socket().expect("an inet address");
        Refusing { addr, _socket: socket }
    }
}

/// A `TAG\n`-then-echo server that stops and comes back on the same port.
fn restartable(tag: &str) -> Restartable {
    let greeting = format!("{tag}\n");
    Restartable::start(move |stream, stop| {
        let greeting = greeting.clone();
        thread::spawn(move || greet_and_echo(stream, &stop, &greeting));
    })
}

fn greet_and_echo(mut stream: TcpStream, stop: &AtomicBool, greeting: &str) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_millis(50))))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| stream.write_all(greeting.as_bytes()));
    if setup.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A minimal HTTP/1.0 health endpoint: reads a request head, answers with the
/// current status line, closes. Keeps every request head it got.
struct HttpResponder {
    backend: Backend,
    status: Arc<Mutex<&'static str>>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl HttpResponder {
    fn start(status: &'static str) -> HttpResponder {
        let status = Arc::new(Mutex::new(status));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let backend = {
            let (status, requests) = (status.clone(), requests.clone());
            Backend::spawn(move |mut conn| {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                    if request.len() > 16 * 1024 {
                        return;
                    }
                }
                requests.lock().expect("requests").push(request);
                let status = *status.lock().expect("status");
                let reply =
                    format!("HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n");
                let _ = conn.write_all(reply.as_bytes());
            })
        };
        HttpResponder { backend, status, requests }
    }

    fn address(&self) -> String {
        self.backend.address()
    }

    fn set_status(&self, status: &'static str) {
        *self.status.lock().expect("status") = status;
    }

    fn requests(&self) -> Vec<Vec<u8>> {
        self.requests.lock().expect("requests").clone()
    }
}

/// A server that reads until EOF and never writes; returns what each connection sent.
fn silent() -> (Backend, Arc<Mutex<Vec<Vec<u8>>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let backend = {
        let received = received.clone();
        Backend::spawn(move |mut conn| {
            if let Ok(bytes) = conn.read_to_end() {
                received.lock().expect("received").push(bytes);
            }
        })
    };
    (backend, received)
}

/// A listener with a deep backlog whose thread accepts and closes at once: a
/// cheap target for hundreds of passing health checks.
struct AcceptAndClose {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptAndClose {
    fn start() -> AcceptAndClose {
        let socket = reuse_socket();
        socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).expect("bind a check target");
        socket.listen(4096).expect("listen");
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().expect("check target address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if listener.accept().is_err() {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        };
        AcceptAndClose { addr, stop, thread: Some(thread) }
    }
}

impl Drop for AcceptAndClose {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; if even that fails, leave the thread behind.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).is_ok() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Active checks: fall and rise
// ---------------------------------------------------------------------------

#[test]
fn a_stopped_server_goes_down_after_fall_checks_and_comes_back_after_rise() {
    const FALL: u64 = 3;
    const RISE: u64 = 2;
    let mut server = restartable("b0");
    let other = named("b1");
    let web = with(
        service("web", vec![checked("b0", server.addr(), server.addr()), backend("b1", other.address())]),
        &[("check_interval", json!(0.1)), ("fall", json!(FALL)), ("rise", json!(RISE)), ("connect_timeout", json!(1))],
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));

    let healthy = wait_health(admin, "web", "b0", "two passing checks", |h| {
        assert!(h.up && h.check_fail == 0, "a check of a live server failed: {h:?}");
        h.check_success >= 2
    });

    // From the stop on every check fails, and every failure counted after
    // `healthy` comes after every success counted after it: those failures are
    // one run.
    server.stop();
    let down = wait_health(admin, "web", "b0", "down state", |h| {
        let failed = h.check_fail - healthy.check_fail;
        if h.up {
            assert!(failed < FALL, "b0 is still up after {failed} failed checks in a row (fall {FALL}): {h:?}");
        } else {
            assert!(failed >= FALL, "b0 went down after only {failed} failed checks (fall {FALL}): {h:?}");
        }
        !h.up
    });
    assert!(
        wait_until(DEADLINE, || count_lines(&shuttle, "WARN", &["web", "b0"]) > 0),
        "no warn line names web and b0 after b0 went down"
    );

    // New clients go to b1 without b0 being tried: a try would count an error of b0.
    for i in 0..4 {
        let mut client = connect(addr);
        assert_eq!(read_line(&mut client), "b1", "client {i} while b0 is down");
    }
    let after = health(admin, "web", "b0");
    assert!(!after.up, "b0 came up while its server is stopped: {after:?}");
    assert_eq!(after.errors, down.errors, "new clients were sent to the down backend b0: {after:?}");

    // The server returns: the same reasoning for passes.
    let infos = count_lines(&shuttle, "INFO", &["web", "b0"]);
    server.restart();
    wait_health(admin, "web", "b0", "up state", |h| {
        let passed = h.check_success - after.check_success;
        if h.up {
            assert!(passed >= RISE, "b0 came up after only {passed} passing checks (rise {RISE}): {h:?}");
        } else {
            assert!(passed < RISE, "b0 is still down after {passed} passing checks in a row (rise {RISE}): {h:?}");
        }
        h.up
    });
    assert!(
        wait_until(DEADLINE, || count_lines(&shuttle, "INFO", &["web", "b0"]) > infos),
        "no info line names web and b0 after b0 came up"
    );
    let tags: Vec<String> = (0..4).map(|_| read_line(&mut connect(addr))).collect();
    assert!(tags.iter().any(|t| t == "b0"), "no new client reached b0 after it came up: {tags:?}");
}

#[test]
fn removing_check_address_by_put_stops_checks() {
    let mut target = restartable("target");
    let t = target.addr();
    let settings = [("check_interval", json!(0.1)), ("fall", json!(2))];
    let web = with(service("web", vec![checked("b0", t, t), checked("b2", t, t), checked("ctl", t, t)]), &settings);
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();
    for name in ["b0", "b2", "ctl"] {
        wait_health(admin, "web", name, "two passing checks", |h| h.check_success >= 2);
    }

    // b0 loses its check address through PUT /web, b2 through PUT /web/b2.
    // A changed backend is a new one (SPEC §5): fresh counters.
    let web = with(service("web", vec![backend("b0", t), checked("b2", t, t), checked("ctl", t, t)]), &settings);
    put(admin, "/web", &web);
    put(admin, "/web/b2", &json!({ "address": t.to_string() }));
    for name in ["b0", "b2"] {
        let stats = get(admin, &format!("/web/{name}"));
        assert_eq!(stats["check_address"], "", "{name} after the PUT: {stats}");
        let h = Health::from_stats(&stats);
        assert_eq!((h.up, h.check_success, h.check_fail), (true, 0, 0), "{name} right after the PUT: {stats}");
    }

    // The server stops. ctl, still checked, times the wait: five of its checks
    // fail, so b0 and b2 would have failed theirs too.
    target.stop();
    let start = health(admin, "web", "ctl");
    wait_health(admin, "web", "ctl", "five more failed checks", |h| h.check_fail >= start.check_fail + 5);
    for name in ["b0", "b2"] {
        let h = health(admin, "web", name);
        assert_eq!(
            (h.up, h.check_success, h.check_fail),
            (true, 0, 0),
            "{name} has no check address any more, so it is never checked and stays up: {h:?}"
        );
    }
}

#[test]
fn check_interval_zero_disables_checks() {
    let live = echo();
    let dead = Refusing::new();
    // "off" never checks; "on" checks until a PUT sets its interval to 0; the
    // checks of "ctl" (which fail) time the waits.
    let off = with(
        service("off", vec![checked("b0", live.address(), dead.addr)]),
        &[("check_interval", json!(0)), ("fall", json!(1))],
    );
    let on =
        with(service("on", vec![checked("b0", live.address(), live.address())]), &[("check_interval", json!(0.1))]);
    let ctl = with(service("ctl", vec![checked("b0", live.address(), dead.addr)]), &[("check_interval", json!(0.1))]);
    let shuttle = Shuttle::start_with_config(&json!([off, on, ctl]), &[]);
    let admin = shuttle.admin_addr();

    wait_health(admin, "on", "b0", "two passing checks", |h| h.check_success >= 2);
    wait_health(admin, "ctl", "b0", "five failed checks", |h| h.check_fail >= 5);
    let h = health(admin, "off", "b0");
    assert_eq!(
        (h.up, h.check_success, h.check_fail),
        (true, 0, 0),
        "service off has check_interval 0, yet its backend (check address refusing) was checked: {h:?}"
    );

    let config = get(admin, "/_config");
    let mut on = config
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == "on"))
        .cloned()
        .unwrap_or_else(|| panic!("no service on in /_config: {config}"));
    on["check_interval"] = json!(0);
    put(admin, "/on", &on);
    assert_eq!(get(admin, "/on")["check_interval"], 0, "the PUT took effect");
    let frozen = health(admin, "on", "b0");
    let ctl_then = health(admin, "ctl", "b0");
    wait_health(admin, "ctl", "b0", "five more failed checks", |h| h.check_fail >= ctl_then.check_fail + 5);
    let h = health(admin, "on", "b0");
    assert_eq!(
        (h.check_success, h.check_fail),
        (frozen.check_success, frozen.check_fail),
        "checks went on after PUT /on set check_interval 0: {frozen:?} then {h:?}"
    );
}

// ---------------------------------------------------------------------------
// check_send / check_expect
// ---------------------------------------------------------------------------

#[test]
fn send_expect_check_passes_on_200_ok_and_fails_on_503() {
    const FALL: u64 = 2;
    const RISE: u64 = 2;
    const SEND: &str = "GET /health HTTP/1.0\r\n\r\n";
    let responder = HttpResponder::start("200 OK");
    let web = with(
        service("web", vec![checked("b0", responder.address(), responder.address())]),
        &[
            ("check_interval", json!(0.1)),
            ("fall", json!(FALL)),
            ("rise", json!(RISE)),
            ("connect_timeout", json!(2)),
            ("check_send", json!(SEND)),
            ("check_expect", json!("200 OK")),
        ],
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();

    let ok = wait_health(admin, "web", "b0", "three passing checks", |h| {
        assert!(h.up && h.check_fail == 0, "a check answered 200 OK failed: {h:?}");
        h.check_success >= 3
    });
    let requests = responder.requests();
    assert!(!requests.is_empty(), "the responder got no request");
    for request in &requests {
        assert_eq!(String::from_utf8_lossy(request), SEND, "a check sent something else than check_send");
    }

    responder.set_status("503 Service Unavailable");
    let down = wait_health(admin, "web", "b0", "down state on 503", |h| {
        let failed = h.check_fail - ok.check_fail;
        if h.up {
            assert!(failed < FALL, "still up after {failed} checks answered 503 (fall {FALL}): {h:?}");
        } else {
            assert!(failed >= FALL, "down after only {failed} failed checks (fall {FALL}): {h:?}");
        }
        !h.up
    });

    responder.set_status("200 OK");
    wait_health(admin, "web", "b0", "up state on 200 OK", |h| {
        let passed = h.check_success - down.check_success;
        if h.up {
            assert!(passed >= RISE, "up after only {passed} passing checks (rise {RISE}): {h:?}");
        } else {
            assert!(passed < RISE, "still down after {passed} checks answered 200 OK (rise {RISE}): {h:?}");
        }
        h.up
    });
}

#[test]
fn send_without_expect_passes_once_the_bytes_are_sent() {
    // The server never answers; with no check_expect the check must not wait
    // for a reply (it would fail at the 0.5 s deadline).
    let (server, received) = silent();
    let web = with(
        service("web", vec![checked("b0", server.address(), server.address())]),
        &[("check_interval", json!(0.1)), ("connect_timeout", json!(0.5)), ("check_send", json!("PING\r\n"))],
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();
    wait_health(admin, "web", "b0", "three passing checks", |h| {
        assert!(h.up && h.check_fail == 0, "a send-only check of a silent server failed: {h:?}");
        h.check_success >= 3
    });
    assert!(
        wait_until(DEADLINE, || !received.lock().expect("received").is_empty()),
        "no check connection to the silent server ended"
    );
    for bytes in received.lock().expect("received").iter() {
        assert_eq!(String::from_utf8_lossy(bytes), "PING\r\n", "a check sent something else than check_send");
    }
}

// ---------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------

/// Starts a service whose only backend is checked at `check_address` every
/// 0.1 s with a 0.5 s `connect_timeout` (plus `extra` settings), where no check
/// can pass: each must fail at its deadline, one at a time.
fn checks_fail_at_connect_timeout(check_address: String, extra: &[(&str, Value)]) {
    const TIMEOUT: f64 = 0.5;
    const FAILS: u64 = 5;
    let live = echo();
    let mut settings = vec![("check_interval", json!(0.1)), ("connect_timeout", json!(TIMEOUT)), ("fall", json!(2))];
    settings.extend_from_slice(extra);
    let web = with(service("web", vec![checked("b0", live.address(), check_address)]), &settings);
    let started = Instant::now();
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();

    let mut first_fail = None;
    let last = wait_health(admin, "web", "b0", "five failed checks", |h| {
        let elapsed = started.elapsed();
        assert_eq!(h.check_success, 0, "a check passed: {h:?}");
        // Check n cannot fail before n deadlines have passed: checks never
        // overlap, and none fails before its deadline.
        let floor = Duration::from_secs_f64(TIMEOUT * h.check_fail as f64);
        assert!(
            elapsed >= floor,
            "{} checks failed within {elapsed:?} of start: each must wait out its {TIMEOUT} s deadline, \
             one at a time",
            h.check_fail
        );
        if h.check_fail >= 1 && first_fail.is_none() {
            first_fail = Some(elapsed);
        }
        h.check_fail >= FAILS
    });
    let first = first_fail.expect("a first failure was seen");
    eprintln!("first failed check seen {first:?} after start; {FAILS} failed after {:?}", started.elapsed());
    assert!(first < Duration::from_secs(5), "the first check failed only {first:?} after start (timeout {TIMEOUT} s)");
    assert!(!last.up, "b0 is still up after {} failed checks (fall 2): {last:?}", last.check_fail);
}

#[test]
fn probe_to_a_full_accept_queue_times_out_at_connect_timeout() {
    let hole = blackhole();
    checks_fail_at_connect_timeout(hole.address(), &[]);
}

#[test]
fn expect_check_fails_at_connect_timeout_when_no_reply_comes() {
    let (server, _received) = silent();
    checks_fail_at_connect_timeout(
        server.address(),
        &[("check_send", json!("PING\r\n")), ("check_expect", json!("PONG"))],
    );
}

// ---------------------------------------------------------------------------
// Passive health
// ---------------------------------------------------------------------------

#[test]
fn failed_client_connects_mark_a_checked_backend_down_after_fall() {
    const FALL: u64 = 3;
    let live = named("b1");
    let (dead_checked, dead_unchecked) = (Refusing::new(), Refusing::new());
    // A check would pass (and so could only delay the marking), but none runs
    // during the test: the interval is 60 s.
    let check_target = echo();
    let web = with(
        service(
            "web",
            vec![
                checked("b0", dead_checked.addr, check_target.address()),
                backend("b1", live.address()),
                backend("b2", dead_unchecked.addr),
            ],
        ),
        &[("check_interval", json!(60)), ("fall", json!(FALL))],
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));

    // Every client is served by b1 through failover; each try of b0 fails.
    let mut clients = 0;
    loop {
        let h = health(admin, "web", "b0");
        if !h.up {
            assert_eq!(h.errors, FALL, "b0 went down after {} failed client connects (fall {FALL}): {h:?}", h.errors);
            break;
        }
        assert!(h.errors < FALL, "b0 is still up after {} failed client connects (fall {FALL}): {h:?}", h.errors);
        assert!(clients < 50, "b0 was tried only {} times in {clients} clients: {h:?}", h.errors);
        let mut client = connect(addr);
        assert_eq!(read_line(&mut client), "b1", "client {clients}");
        clients += 1;
    }

    // Down: new clients do not try it.
    for i in 0..6 {
        assert_eq!(read_line(&mut connect(addr)), "b1", "client {i} after b0 went down");
    }
    let h = health(admin, "web", "b0");
    assert!(!h.up && h.errors == FALL, "b0 was tried again while down, or came up: {h:?}");
    assert_eq!(h.check_fail, 0, "a health check ran during the test: {h:?}");

    // b2 has no check address: it is never marked down, however often it fails.
    let mut extra = 0;
    while health(admin, "web", "b2").errors <= FALL {
        assert!(extra < 50, "b2 was not tried in {extra} clients");
        assert_eq!(read_line(&mut connect(addr)), "b1", "client {extra} while counting b2's failures");
        extra += 1;
    }
    let h2 = health(admin, "web", "b2");
    assert!(h2.up, "b2 has no check address but was marked down after {} failed connects: {h2:?}", h2.errors);
}

#[test]
fn a_completed_client_connect_resets_the_passive_failure_run() {
    const FALL: u64 = 3;
    let mut server = restartable("b0");
    let check_target = echo();
    let web = with(
        service("web", vec![checked("b0", server.addr(), check_target.address())]),
        &[("check_interval", json!(60)), ("fall", json!(FALL))],
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));

    // A client whose only backend refuses is closed; b0 counts one more error.
    let fail_once = |errors: u64| {
        let mut client = connect(addr);
        let closed = wait_closed(&mut client, DEADLINE);
        assert!(closed.is_ok(), "client {errors} of a refusing backend was not closed: {closed:?}");
        wait_health(admin, "web", "b0", &format!("error {errors}"), |h| h.errors >= errors)
    };

    server.stop();
    for errors in 1..FALL {
        let h = fail_once(errors);
        assert!(h.up && h.errors == errors, "after {errors} failed connects (fall {FALL}): {h:?}");
    }
    server.restart();
    let mut client = connect(addr);
    assert_eq!(read_line(&mut client), "b0", "a client once the server is back");
    drop(client);
    server.stop();
    for errors in FALL..2 * FALL - 1 {
        let h = fail_once(errors);
        assert!(
            h.up && h.errors == errors,
            "{} failed connects since a completed one, {errors} in all (fall {FALL}): {h:?}",
            errors - (FALL - 1)
        );
    }
    let h = fail_once(2 * FALL - 1);
    assert!(!h.up, "b0 is still up after {FALL} failed connects in a row: {h:?}");
    assert_eq!(h.check_fail, 0, "a health check ran during the test: {h:?}");
}

// ---------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------

/// Round trip latencies of one measurement, interleaved so that all three
/// kinds see the same machine.
struct Latencies {
    /// Through the proxy, a new connection each (connect, 32 bytes out and back, close).
    fresh: Vec<Duration>,
    /// Through the proxy on one connection kept open.
    kept: Vec<Duration>,
    /// Straight to the echo server, a new connection each: the control.
    direct: Vec<Duration>,
}

/// `count` rounds, 5 ms apart, of one round trip of each kind.
fn measure(proxy: SocketAddr, echo: SocketAddr, count: usize) -> Latencies {
    let message = [0x5a_u8; 32];
    let round_trip = |client: &mut TcpStream, what: &str, i: usize| {
        let mut reply = [0u8; 32];
        client.write_all(&message).unwrap_or_else(|e| panic!("{what} round trip {i}: send: {e}"));
        client.read_exact(&mut reply).unwrap_or_else(|e| panic!("{what} round trip {i}: echo: {e}"));
        assert_eq!(reply, message, "{what} round trip {i}");
    };
    let mut kept = connect(proxy);
    let mut times = Latencies { fresh: Vec::new(), kept: Vec::new(), direct: Vec::new() };
    for i in 0..count {
        let started = Instant::now();
        round_trip(&mut connect(proxy), "proxied", i);
        times.fresh.push(started.elapsed());
        let started = Instant::now();
        round_trip(&mut kept, "kept", i);
        times.kept.push(started.elapsed());
        let started = Instant::now();
        round_trip(&mut connect(echo), "direct", i);
        times.direct.push(started.elapsed());
        thread::sleep(Duration::from_millis(5));
    }
    times
}

/// p50, p99, max, and how many took over 10 ms.
fn percentiles(times: &[Duration]) -> (Duration, Duration, Duration, usize) {
    let mut times = times.to_vec();
    times.sort();
    let at = |q: usize| times[(times.len() * q / 100).min(times.len() - 1)];
    let slow = times.iter().filter(|&&t| t > Duration::from_millis(10)).count();
    (at(50), at(99), times[times.len() - 1], slow)
}

/// CPU time (user + system) process `pid` has used so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based), in clock ticks.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a configuration value.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    Duration::from_millis(ticks * 1000 / per_second)
}

fn report(label: &str, times: &[Duration]) {
    let (p50, p99, max, slow) = percentiles(times);
    eprintln!("  {label:<45} p50 {p50:>10.3?}  p99 {p99:>10.3?}  max {max:>10.3?}  over 10 ms: {slow}");
}

/// Checks counted so far over every backend of `service`, and the fewest of any one backend.
fn check_totals(admin: SocketAddr, service: &str) -> (u64, u64, u64) {
    let stats = get(admin, &format!("/{service}"));
    let backends = stats["backends"].as_array().unwrap_or_else(|| panic!("no backends in {stats}"));
    let each: Vec<Health> = backends.iter().map(Health::from_stats).collect();
    let success = each.iter().map(|h| h.check_success).sum();
    let fail = each.iter().map(|h| h.check_fail).sum();
    let fewest = each.iter().map(|h| h.check_success + h.check_fail).min().unwrap_or(0);
    (success, fail, fewest)
}

#[test]
fn five_hundred_checked_backends_keep_client_latency_low() {
    const BACKENDS: usize = 500;
    const ROUND_TRIPS: usize = 200;
    let echo_server = echo();
    let targets: Vec<AcceptAndClose> = (0..4).map(|_| AcceptAndClose::start()).collect();
    let shuttle = Shuttle::start_with_config(&json!([service("web", vec![backend("b0", echo_server.address())])]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));

    let idle = measure(addr, echo_server.addr(), ROUND_TRIPS);

    let backends = (0..BACKENDS)
        .map(|i| checked(&format!("c{i}"), echo_server.address(), targets[i % targets.len()].addr))
        .collect();
    put(admin, "/many", &with(service("many", backends), &[("check_interval", json!(0.1))]));
    let mut fewest = 0;
    let every_backend_checked = wait_until(Duration::from_secs(30), || {
        fewest = check_totals(admin, "many").2;
        fewest >= 2
    });
    assert!(every_backend_checked, "some of the {BACKENDS} backends had only {fewest} checks after 30 s");

    let (success_before, fail_before, _) = check_totals(admin, "many");
    let (started, cpu_before) = (Instant::now(), cpu_time(shuttle.pid()));
    let loaded = measure(addr, echo_server.addr(), ROUND_TRIPS);
    let (window, cpu) = (started.elapsed(), cpu_time(shuttle.pid()) - cpu_before);
    let (success_after, fail_after, _) = check_totals(admin, "many");
    let checks = (success_after + fail_after) - (success_before + fail_before);

    eprintln!("{ROUND_TRIPS} round trips of each kind, interleaved, 5 ms apart:");
    for (phase, times) in [("idle", &idle), ("500 checked", &loaded)] {
        report(&format!("{phase}: proxied, a new connection each"), &times.fresh);
        report(&format!("{phase}: proxied, one connection"), &times.kept);
        report(&format!("{phase}: direct to the echo server"), &times.direct);
    }
    eprintln!(
        "  checks during the loaded window of {window:?}: {checks} ({:.0}/s; {} failed; nominal {}/s)",
        checks as f64 / window.as_secs_f64(),
        fail_after - fail_before,
        BACKENDS * 10
    );
    eprintln!(
        "  shuttle CPU during that window: {cpu:?} ({:.0}% of one core)",
        100.0 * cpu.as_secs_f64() / window.as_secs_f64()
    );

    assert!(
        checks >= BACKENDS as u64,
        "only {checks} checks ran during the {window:?} of measurement: the load was not there"
    );
    let bound = Duration::from_millis(200);
    for (kind, times) in [("a new connection each", &loaded.fresh), ("one connection", &loaded.kept)] {
        let p99 = percentiles(times).1;
        assert!(p99 < bound, "p99 of proxied round trips ({kind}) with {BACKENDS} checked backends: {p99:?}");
    }
}

/// The last check's fields of backend `b0` of service `web`, once one has
/// ended with `result` ("passed" or "failed").
fn last_check(admin: SocketAddr, result: &str) -> Value {
    let mut stats = Value::Null;
    let ended = wait_until(HEALTH_DEADLINE, || {
        stats = get(admin, "/web/b0");
        stats["last_check_result"] == result
    });
    assert!(ended, "no check ended {result}: {stats}");
    let at = stats["last_check"].as_str().unwrap_or_default().to_string();
    // RFC 3339 UTC, e.g. 2026-12-03T07:55:01Z (fractions allowed).
    assert!(at.len() >= 20 && at.as_bytes()[10] == b'T' && at.ends_with('Z'), "last_check {at:?}");
    stats
}

#[test]
fn health_fields_say_when_the_last_check_ended_and_why_it_failed() {
    // Never checked: nulls.
    let up = echo();
    let shuttle = Shuttle::start_with_config(&json!([service("web", vec![backend("b0", up.address())])]), &[]);
    let stats = get(shuttle.admin_addr(), "/web/b0");
    assert_eq!(
        (&stats["last_check"], &stats["last_check_result"], &stats["last_error"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    drop(shuttle);

    // Passed, then refused.
    let up = echo();
    let web = with(service("web", vec![checked("b0", up.address(), up.address())]), &[("check_interval", json!(0.1))]);
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();
    assert_eq!(last_check(admin, "passed")["last_error"], Value::Null);
    let dead = crate::support::refusing();
    let web = with(service("web", vec![checked("b0", up.address(), dead)]), &[("check_interval", json!(0.1))]);
    put(admin, "/web", &web);
    assert_eq!(last_check(admin, "failed")["last_error"], "refused");
    drop(shuttle);

    // A reply that lacks the expected text says so, with the text.
    let responder = HttpResponder::start("503 Service Unavailable");
    let web = with(
        service("web", vec![checked("b0", responder.address(), responder.address())]),
        &[
            ("check_interval", json!(0.1)),
            ("check_send", json!("GET / HTTP/1.0\r\n\r\n")),
            ("check_expect", json!("200 OK")),
        ],
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let why = last_check(shuttle.admin_addr(), "failed")["last_error"].as_str().unwrap_or_default().to_string();
    assert!(why.starts_with(r#"reply did not contain "200 OK""#), "{why}");
    drop(shuttle);

    // A check that hangs names its deadline.
    let hole = blackhole();
    let web = with(
        service("web", vec![checked("b0", up.address(), hole.address())]),
        &[("check_interval", json!(0.2)), ("connect_timeout", json!(0.3))],
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    assert_eq!(last_check(shuttle.admin_addr(), "failed")["last_error"], "timed out after 300ms");
}
