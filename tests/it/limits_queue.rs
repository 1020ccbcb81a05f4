//! Connection limits and the queue (reference §3): `max_connections` per
//! backend and per service, `max_queue` and `queue_timeout`. The backend here
//! counts the connections it has open at once, and records the id each client
//! sends first, so order and limits are read on the backend's side.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::{config_json, put, stats};
use crate::support::{
    backend, connect, named, read_line, read_to_eof, service, wait_closed, wait_until, Backend, Closed, Shuttle,
    DEADLINE,
};

/// A backend that counts its open connections and logs each client's id.
struct Counting {
    backend: Backend,
    open: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    order: Arc<Mutex<Vec<String>>>,
}

impl Counting {
    /// Each connection: count it, read the client's id line, answer "ok", hold until EOF.
    fn spawn() -> Counting {
        let open = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (o, m, r) = (open.clone(), most.clone(), order.clone());
        let backend = Backend::spawn(move |mut conn| {
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let mut id = Vec::new();
            let mut byte = [0u8; 1];
            while let Ok(1) = conn.read(&mut byte) {
                if byte[0] == b'\n' {
                    break;
                }
                id.push(byte[0]);
            }
            r.lock().unwrap().push(String::from_utf8_lossy(&id).into_owned());
            let _ = conn.write_all(b"ok\n");
            let _ = conn.read_to_end();
            o.fetch_sub(1, Ordering::SeqCst);
        });
        Counting { backend, open, most, order }
    }

    fn order(&self) -> Vec<String> {
        self.order.lock().unwrap().clone()
    }
}

/// Connects and sends `id`; the bytes wait in the proxy while the client is queued.
fn client(addr: SocketAddr, id: &str) -> TcpStream {
    let mut c = connect(addr);
    c.write_all(format!("{id}\n").as_bytes()).expect("send the id");
    c
}

/// Whether `c` gets the backend's "ok" within `within` (`false`: still waiting).
fn served_within(c: &mut TcpStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 3];
    let got = match c.read_exact(&mut buf) {
        Ok(()) => {
            assert_eq!(&buf, b"ok\n");
            true
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => false,
        Err(e) => panic!("client failed while waiting: {e}"),
    };
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    got
}

/// Ends a client and waits for the proxy's EOF, so its pair is done.
fn finish(mut c: TcpStream) {
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = read_to_eof(&mut c);
}

/// A service `web` over `backends` with `fields` set.
fn web(backends: Vec<Value>, fields: Value) -> Value {
    let mut web = service("web", backends);
    for (k, v) in fields.as_object().unwrap() {
        web[k] = v.clone();
    }
    web
}

fn limited(name: &str, b: &Backend, max: u64) -> Value {
    let mut config = backend(name, b.address());
    config["max_connections"] = json!(max);
    config
}

#[track_caller]
fn wait_stat(shuttle: &Shuttle, field: &str, want: u64) {
    let admin = shuttle.admin_addr();
    let ok = wait_until(DEADLINE, || stats(admin, "/web")[field] == want);
    assert!(ok, "{field} never became {want}: {}", stats(admin, "/web"));
}

#[test]
fn a_backend_at_its_limit_is_skipped() {
    let (b0, b1) = (named("b0"), named("b1"));
    let shuttle = Shuttle::start_with_config(
        &json!([web(vec![limited("b0", &b0, 1), backend("b1", b1.address())], json!({}))]),
        &[],
    );
    let addr = shuttle.service_addr("web");
    let open = |_| {
        let mut c = connect(addr);
        let tag = read_line(&mut c);
        (c, tag)
    };
    let (first, tag0) = open(0);
    let (second, tag1) = open(1);
    let (third, tag2) = open(2);
    assert_eq!([tag0.as_str(), &tag1, &tag2], ["b0", "b1", "b1"], "b0 is full while the first client stays");
    finish(first);
    let admin = shuttle.admin_addr();
    assert!(wait_until(DEADLINE, || stats(admin, "/web/b0")["active"] == 0));
    let (fourth, tag3) = open(3);
    assert_eq!(tag3, "b0", "b0 takes clients again once below its limit");
    for c in [second, third, fourth] {
        finish(c);
    }
}

#[test]
fn queued_clients_are_served_in_arrival_order_as_slots_free() {
    let b = Counting::spawn();
    let fields = json!({"max_queue": 10, "queue_timeout": 20});
    let shuttle = Shuttle::start_with_config(&json!([web(vec![limited("b0", &b.backend, 1)], fields)]), &[]);
    let addr = shuttle.service_addr("web");
    let mut holder = client(addr, "0");
    assert!(served_within(&mut holder, DEADLINE));
    let mut waiting = Vec::new();
    for i in 1..=4 {
        waiting.push(client(addr, &i.to_string()));
        // Connect order is queue order: the next client comes once this one waits.
        wait_stat(&shuttle, "queued", i);
    }
    assert!(!served_within(&mut waiting[0], Duration::from_millis(200)), "no slot is free yet");
    finish(holder);
    for mut c in waiting {
        assert!(served_within(&mut c, DEADLINE), "each client is served once the one before it leaves");
        finish(c);
    }
    assert_eq!(b.order(), ["0", "1", "2", "3", "4"]);
    assert_eq!(b.most.load(Ordering::SeqCst), 1, "the backend never had more than its limit");
    let s = stats(shuttle.admin_addr(), "/web");
    assert_eq!((s["queued"].as_u64(), s["queue_timeouts"].as_u64()), (Some(0), Some(0)), "{s}");
}

#[test]
fn a_full_queue_closes_newcomers_as_no_backend() {
    let b = Counting::spawn();
    let fields = json!({"max_queue": 1});
    let shuttle = Shuttle::start_with_config(&json!([web(vec![limited("b0", &b.backend, 1)], fields)]), &[]);
    let addr = shuttle.service_addr("web");
    let mut holder = client(addr, "0");
    assert!(served_within(&mut holder, DEADLINE));
    let mut queued = client(addr, "1");
    wait_stat(&shuttle, "queued", 1);
    let mut turned_away = connect(addr);
    assert!(matches!(wait_closed(&mut turned_away, DEADLINE), Ok(Closed::Eof)), "closed with a FIN");
    assert_eq!(stats(shuttle.admin_addr(), "/web")["errors"], 1);
    finish(holder);
    assert!(served_within(&mut queued, DEADLINE), "the queued client still gets its turn");
    finish(queued);
}

#[test]
fn no_queue_by_default_closes_the_client_when_every_backend_is_full() {
    let b = Counting::spawn();
    let shuttle = Shuttle::start_with_config(&json!([web(vec![limited("b0", &b.backend, 1)], json!({}))]), &[]);
    let addr = shuttle.service_addr("web");
    let mut holder = client(addr, "0");
    assert!(served_within(&mut holder, DEADLINE));
    let mut other = connect(addr);
    assert!(matches!(wait_closed(&mut other, DEADLINE), Ok(Closed::Eof)));
    let config = config_json(shuttle.admin_addr());
    assert_eq!((config[0]["max_queue"].as_u64(), config[0]["queue_timeout"].as_u64()), (Some(0), Some(5)));
    finish(holder);
}

#[test]
fn queue_timeout_closes_gently_and_counts() {
    let b = Counting::spawn();
    let dir = crate::support::tempdir();
    let log = dir.path().join("access.log");
    let fields = json!({"max_queue": 5, "queue_timeout": 0.3});
    let args = ["-access-log", log.to_str().unwrap()];
    let shuttle = Shuttle::start_with_config(&json!([web(vec![limited("b0", &b.backend, 1)], fields)]), &args);
    let addr = shuttle.service_addr("web");
    let mut holder = client(addr, "0");
    assert!(served_within(&mut holder, DEADLINE));
    let mut late = client(addr, "1");
    assert!(matches!(wait_closed(&mut late, DEADLINE), Ok(Closed::Eof)), "a FIN, not a reset");
    wait_stat(&shuttle, "queue_timeouts", 1);
    assert_eq!(stats(shuttle.admin_addr(), "/web")["queued"], 0);
    let (_, _, metrics) = crate::metrics::raw(shuttle.admin_addr(), "GET", "/metrics");
    assert!(metrics.contains("shuttle_service_queue_timeouts_total{service=\"web\"} 1"), "{metrics}");
    assert!(metrics.contains("shuttle_service_queued{service=\"web\"} 0"), "{metrics}");
    let line = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(wait_until(DEADLINE, || line().contains("end=queue_timeout")), "{}", line());
    let text = line();
    let entry = text.lines().find(|l| l.contains("end=queue_timeout")).unwrap();
    let queue_ms: f64 = entry.split(" queue_ms=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(queue_ms >= 290.0, "{entry}");
    assert_eq!(b.order(), ["0"], "the timed-out client never reached the backend");
    finish(holder);
}

#[test]
fn a_queued_client_that_leaves_is_never_connected() {
    let b = Counting::spawn();
    let fields = json!({"max_queue": 5, "queue_timeout": 20});
    let shuttle = Shuttle::start_with_config(&json!([web(vec![limited("b0", &b.backend, 1)], fields)]), &[]);
    let addr = shuttle.service_addr("web");
    let mut holder = client(addr, "0");
    assert!(served_within(&mut holder, DEADLINE));
    let leaver = connect(addr);
    wait_stat(&shuttle, "queued", 1);
    drop(leaver);
    wait_stat(&shuttle, "queued", 0);
    finish(holder);
    let mut next = client(addr, "2");
    assert!(served_within(&mut next, DEADLINE));
    finish(next);
    assert_eq!(b.order(), ["0", "2"]);
    assert_eq!(b.backend.accepted(), 2, "the client that left was never connected");
}

#[test]
fn a_service_at_max_connections_stops_accepting_and_resumes() {
    let b = Counting::spawn();
    let fields = json!({"max_connections": 2});
    let shuttle = Shuttle::start_with_config(&json!([web(vec![backend("b0", b.backend.address())], fields)]), &[]);
    let addr = shuttle.service_addr("web");
    let mut first = client(addr, "0");
    let mut second = client(addr, "1");
    assert!(served_within(&mut first, DEADLINE) && served_within(&mut second, DEADLINE));
    // The kernel completes the handshake into the backlog; shuttle does not accept it yet.
    let mut third = client(addr, "2");
    assert!(!served_within(&mut third, Duration::from_millis(300)), "a third client must wait in the backlog");
    assert_eq!(stats(shuttle.admin_addr(), "/web")["active"], 2);
    finish(first);
    assert!(served_within(&mut third, DEADLINE), "accepting resumes when a connection ends");
    assert_eq!(b.most.load(Ordering::SeqCst), 2);
    finish(second);
    finish(third);
}

/// Many clients at once, each held a little while; `-workers 2` explicitly.
fn crowd(addr: SocketAddr, n: usize) {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            thread::spawn(move || {
                let mut c = client(addr, &i.to_string());
                assert!(served_within(&mut c, Duration::from_secs(20)), "client {i} was never served");
                thread::sleep(Duration::from_millis(10));
                finish(c);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client failed");
    }
}

#[test]
fn limits_hold_exactly_across_two_workers() {
    let (queued, capped) = (Counting::spawn(), Counting::spawn());
    let config = json!([
        web(vec![limited("b0", &queued.backend, 3)], json!({"max_queue": 100, "queue_timeout": 30})),
        {"name": "capped", "address": "127.0.0.1:0", "max_connections": 4,
         "backends": [backend("b0", capped.backend.address())]},
    ]);
    let shuttle = Shuttle::start_with_config(&config, &["-workers", "2"]);
    let (web_addr, capped_addr) = (shuttle.service_addr("web"), shuttle.service_addr("capped"));
    let t = thread::spawn(move || crowd(capped_addr, 40));
    crowd(web_addr, 60);
    t.join().unwrap();
    assert_eq!(queued.order().len(), 60);
    assert_eq!(capped.order().len(), 40);
    assert!(queued.most.load(Ordering::SeqCst) <= 3, "backend limit passed: {}", queued.most.load(Ordering::SeqCst));
    assert!(capped.most.load(Ordering::SeqCst) <= 4, "service limit passed: {}", capped.most.load(Ordering::SeqCst));
    assert_eq!(queued.open.load(Ordering::SeqCst), 0);
    let s = stats(shuttle.admin_addr(), "/web");
    assert_eq!((s["queued"].as_u64(), s["active"].as_u64()), (Some(0), Some(0)), "{s}");
}

#[test]
fn a_lowered_limit_keeps_open_connections_and_makes_new_ones_wait() {
    let b = Counting::spawn();
    let fields = json!({"max_queue": 10, "queue_timeout": 20});
    let shuttle = Shuttle::start_with_config(&json!([web(vec![backend("b0", b.backend.address())], fields)]), &[]);
    let (addr, admin) = (shuttle.service_addr("web"), shuttle.admin_addr());
    let mut open: Vec<TcpStream> = (0..3).map(|i| client(addr, &i.to_string())).collect();
    for c in &mut open {
        assert!(served_within(c, DEADLINE));
    }
    put(admin, "/web/b0", &limited("b0", &b.backend, 1)).expect(200);
    assert_eq!(config_json(admin)[0]["backends"][0]["max_connections"], 1, "the limit round-trips");
    assert_eq!(stats(admin, "/web/b0")["active"], 3, "the backend kept its count: open connections stay");
    let mut waiting = client(addr, "3");
    wait_stat(&shuttle, "queued", 1);
    finish(open.remove(0));
    finish(open.remove(0));
    assert!(!served_within(&mut waiting, Duration::from_millis(300)), "one connection is still at the limit of 1");
    finish(open.remove(0));
    assert!(served_within(&mut waiting, DEADLINE));
    finish(waiting);
    let mut order = b.order();
    order[..3].sort();
    assert_eq!(order, ["0", "1", "2", "3"]);
}

#[test]
fn bad_limits_are_refused_and_change_nothing() {
    let b = Counting::spawn();
    let shuttle = Shuttle::start_with_config(&json!([web(vec![backend("b0", b.backend.address())], json!({}))]), &[]);
    let admin = shuttle.admin_addr();
    let before = config_json(admin);
    for (field, value) in [("max_connections", json!(-1)), ("max_queue", json!("10")), ("queue_timeout", json!(0.0001))]
    {
        let body = web(vec![backend("b0", b.backend.address())], json!({ field: value }));
        let response = put(admin, "/web", &body).expect(400);
        assert!(response.error().contains(field), "{field}: {}", response.error());
    }
    let mut bad = backend("b0", b.backend.address());
    bad["max_connections"] = json!(1.5);
    assert!(put(admin, "/web/b0", &bad).expect(400).error().contains("max_connections"));
    assert_eq!(config_json(admin), before);
}

#[test]
fn a_client_queued_when_the_drain_begins_is_served_once_a_slot_frees() {
    let b = Counting::spawn();
    let fields = json!({"max_queue": 10, "queue_timeout": 20});
    let mut shuttle =
        Shuttle::start_with_config(&json!([web(vec![limited("b0", &b.backend, 1)], fields)]), &["-grace", "20"]);
    let addr = shuttle.service_addr("web");
    let mut holder = client(addr, "0");
    assert!(served_within(&mut holder, DEADLINE));
    let mut queued = client(addr, "1");
    wait_stat(&shuttle, "queued", 1);
    shuttle.signal(libc::SIGTERM);
    shuttle.wait_for_line("shutting down");
    assert!(!served_within(&mut queued, Duration::from_millis(200)), "no slot is free yet");
    finish(holder);
    assert!(served_within(&mut queued, DEADLINE), "the drain serves the queue as slots free");
    finish(queued);
    assert_eq!(b.order(), ["0", "1"]);
    let status = shuttle.wait_exit(DEADLINE).expect("exit once the last client is done");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_client_still_queued_when_the_grace_ends_gets_a_fin_and_its_access_log_line() {
    let b = Counting::spawn();
    let dir = crate::support::tempdir();
    let log = dir.path().join("access.log");
    let fields = json!({"max_queue": 10, "queue_timeout": 60});
    let mut shuttle = Shuttle::start_with_config(
        &json!([web(vec![limited("b0", &b.backend, 1)], fields)]),
        &["-grace", "1", "-access-log", log.to_str().expect("utf-8")],
    );
    let addr = shuttle.service_addr("web");
    let mut holder = client(addr, "0");
    assert!(served_within(&mut holder, DEADLINE));
    let mut queued = client(addr, "1");
    let (holder_addr, queued_addr) = (holder.local_addr().unwrap(), queued.local_addr().unwrap());
    wait_stat(&shuttle, "queued", 1);
    shuttle.signal(libc::SIGTERM);
    let status = shuttle.wait_exit(DEADLINE).expect("exit once the grace is over");
    assert!(status.success(), "{status:?}");
    queued.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(queued.read(&mut [0u8; 16]).map_err(|e| e.kind()), Ok(0), "a FIN, not a reset");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains(&format!("client={holder_addr} ")), "the pair's line: {text}");
    let line = text.lines().find(|l| l.contains(&format!("client={queued_addr} ")));
    assert!(line.is_some_and(|l| l.ends_with("end=shutdown")), "the queued client's line: {text}");
}
