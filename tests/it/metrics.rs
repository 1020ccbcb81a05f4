//! `GET /metrics` (and `/_metrics`): the Prometheus text exposition, 0.0.4.
//! Every scrape goes through the format checker in `exposition`, and the
//! figures are compared with the JSON stats of `GET /` read just before and
//! just after (`before ≤ metric ≤ after`; equal when nothing moves), and with
//! the traffic the test made. With `SHUTTLE_TEST_WORKERS=2` every shuttle has
//! two workers; one test always runs two and checks both served.

pub(crate) mod exposition;

use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use self::exposition::{check, Exposition};
use crate::admin::{call, config_bytes, get, put};
use crate::support::{
    backend, connect, echo, read_to_eof, refusing, round_trip, service, test_workers, wait_closed, wait_until, Backend,
    Closed, Shuttle, DEADLINE,
};

/// The families with one sample per backend.
const BACKEND_FAMILIES: [&str; 9] = [
    "shuttle_backend_connections_total",
    "shuttle_backend_active_connections",
    "shuttle_backend_sent_bytes_total",
    "shuttle_backend_received_bytes_total",
    "shuttle_backend_connect_errors_total",
    "shuttle_backend_errors_total",
    "shuttle_backend_checks_passed_total",
    "shuttle_backend_checks_failed_total",
    "shuttle_backend_up",
];

/// One request with `Connection: close`: status, `Content-Type` and body (its length checked).
#[track_caller]
pub(crate) fn raw(admin: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = connect(admin);
    let request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap_or_else(|e| panic!("sending {method} {path}: {e}"));
    let reply = String::from_utf8(read_to_eof(&mut stream)).expect("a UTF-8 reply");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head: {reply:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status: {head:?}"));
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
    };
    let length: usize = field("content-length").and_then(|v| v.parse().ok()).expect("a Content-Length");
    assert_eq!(length, body.len(), "Content-Length differs from the body: {head}");
    (status, field("content-type").unwrap_or_default().to_string(), body.to_string())
}

/// `GET path` as a checked exposition: 200, text/plain 0.0.4, every format rule.
#[track_caller]
fn scrape_at(admin: SocketAddr, path: &str) -> Exposition {
    let (status, content_type, text) = raw(admin, "GET", path);
    assert_eq!(status, 200, "GET {path}: {text}");
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "GET {path}: Content-Type {content_type:?}");
    check(&text).unwrap_or_else(|e| panic!("GET {path}: invalid exposition: {e}\n{text}"))
}

#[track_caller]
fn scrape(admin: SocketAddr) -> Exposition {
    scrape_at(admin, "/metrics")
}

/// `GET /` as JSON.
#[track_caller]
fn all_stats(admin: SocketAddr) -> Value {
    get(admin, "/").expect(200).json()
}

/// A service's stats in `GET /`'s list.
#[track_caller]
fn service_in<'a>(all: &'a Value, name: &str) -> &'a Value {
    all.as_array().and_then(|l| l.iter().find(|s| s["name"] == name)).unwrap_or_else(|| panic!("no {name}: {all}"))
}

/// A backend's stats in `GET /`'s list.
#[track_caller]
fn backend_in<'a>(all: &'a Value, service: &str, name: &str) -> &'a Value {
    let list = service_in(all, service)["backends"].as_array();
    list.and_then(|l| l.iter().find(|b| b["name"] == name)).unwrap_or_else(|| panic!("no {service}/{name}: {all}"))
}

#[track_caller]
fn u(value: &Value) -> u64 {
    value.as_u64().unwrap_or_else(|| panic!("not a count: {value}"))
}

/// The metric families of a backend and the JSON stats field each matches.
const MATCHED: [(&str, &str); 6] = [
    ("shuttle_backend_connections_total", "connections"),
    ("shuttle_backend_active_connections", "active"),
    ("shuttle_backend_sent_bytes_total", "sent"),
    ("shuttle_backend_received_bytes_total", "received"),
    ("shuttle_backend_errors_total", "errors"),
    ("shuttle_backend_checks_passed_total", "check_success"),
];

/// Reads `GET /`, the metrics, `GET /` again, and checks that every backend
/// figure lies between the two JSON readings (so equals them when nothing
/// moved) and that `up` agrees. Returns the metrics and the later JSON.
#[track_caller]
fn compare_with_json(admin: SocketAddr) -> (Exposition, Value) {
    let before = all_stats(admin);
    let m = scrape(admin);
    let after = all_stats(admin);
    let mut rows = 0;
    for s in after.as_array().expect("a list") {
        let service = s["name"].as_str().expect("a name");
        for b in s["backends"].as_array().expect("backends") {
            let name = b["name"].as_str().expect("a name");
            let labels = [("service", service), ("backend", name)];
            let fields = MATCHED.iter().copied().chain([("shuttle_backend_checks_failed_total", "check_fail")]);
            for (family, field) in fields {
                let (low, high) = (u(&backend_in(&before, service, name)[field]), u(&b[field]));
                let (low, high) = (low.min(high), low.max(high)); // `active` may fall as well as rise
                let value = m.value(family, &labels) as u64;
                assert!((low..=high).contains(&value), "{family}{labels:?} = {value}, JSON {field} {low}..={high}");
            }
            let up = m.value("shuttle_backend_up", &labels);
            assert_eq!(up == 1.0, b["up"] == true, "{service}/{name} up: metric {up}, JSON {}", b["up"]);
            rows += 1;
        }
    }
    for family in BACKEND_FAMILIES {
        assert_eq!(m.named(family).count(), rows, "{family}: one sample per backend");
    }
    (m, after)
}

/// A backend that reads until the client's EOF, then writes `reply` bytes and
/// shuts its write side: a known byte count each way, and different ones.
fn replier(reply: usize) -> Backend {
    Backend::spawn(move |mut conn| {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = conn.read(&mut buf) {}
        if conn.write_all(&vec![b'r'; reply]).is_ok() {
            let _ = conn.shutdown_write();
        }
    })
}

/// One proxied exchange: `send` bytes up, EOF, then exactly `reply` bytes back and EOF.
#[track_caller]
fn exchange(addr: SocketAddr, send: usize, reply: usize) {
    let mut client = connect(addr);
    client.write_all(&vec![b's'; send]).expect("send through the proxy");
    client.shutdown(Shutdown::Write).expect("shut write");
    assert_eq!(read_to_eof(&mut client).len(), reply, "reply through the proxy");
}

/// A service config with `fields` set.
fn with(mut service: Value, fields: &[(&str, Value)]) -> Value {
    for (k, v) in fields {
        service[k] = v.clone();
    }
    service
}

/// Which worker served each finished connection of service `name`, from the `-debug` lines.
fn served_by(shuttle: &Shuttle, name: &str) -> [usize; 2] {
    let mut by = [0; 2];
    for line in shuttle.stderr_lines() {
        if line.contains(&format!("{name}: ")) && line.contains(" bytes received") {
            let worker = line.rsplit_once(", worker ").and_then(|(_, i)| i.trim().parse::<usize>().ok());
            if let Some(n) = worker.and_then(|i| by.get_mut(i)) {
                *n += 1;
            }
        }
    }
    by
}

/// Waits until the histogram `family` of `service` has counted `n`; returns the scrape that showed it.
#[track_caller]
fn wait_count(admin: SocketAddr, family: &str, service: &str, n: u64) -> Exposition {
    let name = format!("{family}_count");
    let mut last = None;
    let reached = wait_until(DEADLINE, || {
        let m = scrape(admin);
        let seen = m.get(&name, &[("service", service)]);
        last = seen;
        seen == Some(n as f64)
    });
    assert!(reached, "{name}{{service={service:?}}} never reached {n}: last {last:?}");
    scrape(admin)
}

#[test]
fn metrics_match_the_json_stats_after_known_traffic() {
    const WEB: (usize, usize, usize) = (12, 1_500, 700); // connections, bytes up, bytes down
    const API: (usize, usize, usize) = (5, 300, 9_000);
    let (w1, w2, a0) = (replier(WEB.2), replier(WEB.2), replier(API.2));
    let off = [("check_interval", json!(0))];
    let config = json!([
        with(
            service("web", vec![backend("b0", refusing()), backend("b1", w1.address()), backend("b2", w2.address())]),
            &off
        ),
        with(service("api", vec![backend("c0", a0.address())]), &off),
        service("empty", vec![]),
        with(service("dead", vec![backend("d0", refusing()), backend("d1", refusing())]), &off),
    ]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let (web, api) = (shuttle.service_addr("web"), shuttle.service_addr("api"));
    let (empty, dead) = (shuttle.service_addr("empty"), shuttle.service_addr("dead"));
    for _ in 0..WEB.0 {
        exchange(web, WEB.1, WEB.2);
    }
    for _ in 0..API.0 {
        exchange(api, API.1, API.2);
    }
    for _ in 0..3 {
        let mut client = connect(empty);
        assert_eq!(wait_closed(&mut client, DEADLINE), Ok(Closed::Eof), "a client of a service with no backend");
    }
    for _ in 0..2 {
        let mut client = connect(dead);
        assert!(wait_closed(&mut client, DEADLINE).is_ok(), "a client of a service whose backends all refuse");
    }
    // Counters are final once every pair has closed (each close observes a duration).
    wait_count(admin, "shuttle_service_connection_duration_seconds", "web", WEB.0 as u64);
    wait_count(admin, "shuttle_service_connection_duration_seconds", "api", API.0 as u64);
    let (m, json) = compare_with_json(admin);
    let at = |s: &'static str, b: &'static str| [("service", s), ("backend", b)];

    // What the traffic was, backend by backend.
    let (n1, n2) = (w1.accepted() as f64, w2.accepted() as f64);
    assert_eq!(n1 + n2, WEB.0 as f64, "every web connection reached b1 or b2");
    for (b, n) in [("b1", n1), ("b2", n2)] {
        assert_eq!(m.value("shuttle_backend_connections_total", &at("web", b)), n, "{b}");
        assert_eq!(m.value("shuttle_backend_sent_bytes_total", &at("web", b)), n * WEB.1 as f64, "{b}");
        assert_eq!(m.value("shuttle_backend_received_bytes_total", &at("web", b)), n * WEB.2 as f64, "{b}");
        assert_eq!(m.value("shuttle_backend_errors_total", &at("web", b)), 0.0, "{b}");
    }
    let c0 = at("api", "c0");
    assert_eq!(m.value("shuttle_backend_connections_total", &c0), API.0 as f64);
    assert_eq!(m.value("shuttle_backend_sent_bytes_total", &c0), (API.0 * API.1) as f64);
    assert_eq!(m.value("shuttle_backend_received_bytes_total", &c0), (API.0 * API.2) as f64);
    // b0 refuses: each client that tried it first failed over; it carried nothing.
    let b0 = at("web", "b0");
    let refused = m.value("shuttle_backend_connect_errors_total", &b0);
    assert!(refused >= 1.0, "round robin over three backends tried b0 in {} connections", WEB.0);
    assert_eq!(m.value("shuttle_backend_errors_total", &b0), refused, "b0's only errors are its refused connects");
    assert_eq!(m.value("shuttle_backend_connections_total", &b0), 0.0);
    assert_eq!(m.value("shuttle_backend_sent_bytes_total", &b0), 0.0);
    // Every client of `dead` tried both backends once (no checks, so none is marked down).
    for b in ["d0", "d1"] {
        assert_eq!(m.value("shuttle_backend_connect_errors_total", &at("dead", b)), 2.0, "{b}");
        assert_eq!(m.value("shuttle_backend_errors_total", &at("dead", b)), 2.0, "{b}");
    }
    for (s, b) in [("web", "b0"), ("web", "b1"), ("web", "b2"), ("api", "c0"), ("dead", "d0"), ("dead", "d1")] {
        assert_eq!(m.value("shuttle_backend_active_connections", &at(s, b)), 0.0, "{s}/{b}");
        assert_eq!(m.value("shuttle_backend_up", &at(s, b)), 1.0, "{s}/{b}: checks are off, so up");
        assert_eq!(m.value("shuttle_backend_checks_passed_total", &at(s, b)), 0.0, "{s}/{b}: never checked");
        assert_eq!(m.value("shuttle_backend_checks_failed_total", &at(s, b)), 0.0, "{s}/{b}: never checked");
    }

    // Per service: clients closed without a backend (none available, or every connect failed),
    // and a service's JSON errors are its own (clients that found none available) plus its backends'.
    for (s, no_backend, own) in [("web", 0.0, 0.0), ("api", 0.0, 0.0), ("empty", 3.0, 3.0), ("dead", 2.0, 0.0)] {
        assert_eq!(m.value("shuttle_service_no_backend_errors_total", &[("service", s)]), no_backend, "{s}");
        let backends: f64 = m
            .named("shuttle_backend_errors_total")
            .filter(|x| x.labels.iter().any(|(k, v)| k == "service" && v == s))
            .map(|x| x.value)
            .sum();
        assert_eq!(u(&service_in(&json, s)["errors"]) as f64, own + backends, "{s}: JSON errors");
    }
    // One connect time per established connection, one duration per closed one.
    for (s, n) in [("web", WEB.0), ("api", API.0), ("empty", 0)] {
        let labels = [("service", s)];
        assert_eq!(m.value("shuttle_service_connect_seconds_count", &labels), n as f64, "{s}");
        assert_eq!(m.value("shuttle_service_connection_duration_seconds_count", &labels), n as f64, "{s}");
        let lasted = m.value("shuttle_service_connection_duration_seconds_sum", &labels);
        assert_eq!(lasted > 0.0, n > 0, "{s}: duration sum {lasted}");
    }
    assert_eq!(m.value("shuttle_services", &[]), 4.0);
    assert_eq!(m.value("shuttle_backends", &[]), 6.0);
    assert_eq!(m.value("shuttle_workers", &[]), test_workers() as f64);
    assert_eq!(m.value("shuttle_active_connections", &[]), 0.0);
}

#[test]
fn metrics_process_families_show_admin_responses_fds_and_start_time() {
    let up = echo();
    let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    let shuttle = Shuttle::start_with_config(
        &json!([with(service("web", vec![backend("b0", up.address())]), &[("check_interval", json!(0))])]),
        &[],
    );
    let after = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64();
    let (admin, web) = (shuttle.admin_addr(), shuttle.service_addr("web"));

    // A scrape counts the responses sent before it, not itself.
    let first = scrape(admin);
    assert_eq!(first.named("shuttle_admin_requests_total").count(), 0, "no admin response yet");
    for _ in 0..3 {
        get(admin, "/").expect(200);
    }
    get(admin, "/nosuch").expect(404);
    get(admin, "/web/nosuch").expect(404);
    get(admin, "/a/b/c").expect(404);
    let m = scrape(admin);
    let codes: Vec<(String, f64)> = m
        .named("shuttle_admin_requests_total")
        .map(|s| (s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(), s.value))
        .collect();
    assert_eq!(codes, vec![("code=200".to_string(), 4.0), ("code=404".to_string(), 3.0)]);
    assert_eq!(scrape(admin).value("shuttle_admin_requests_total", &[("code", "200")]), 5.0);

    let started = m.value("shuttle_start_time_seconds", &[]);
    assert!((before - 1.0..=after + 1.0).contains(&started), "started {started}, not within [{before}, {after}]");
    let build = m.named("shuttle_build_info").next().expect("build info");
    assert_eq!(build.value, 1.0);
    assert!(build.labels.contains(&("version".into(), env!("CARGO_PKG_VERSION").into())), "{build:?}");
    let rss = m.value("shuttle_resident_memory_bytes", &[]);
    assert!(rss > 1e6 && rss < 4e9, "resident memory {rss}");
    assert_eq!(m.value("shuttle_workers", &[]), test_workers() as f64);

    // Descriptors: plausible, and two more per open proxied connection.
    let max = m.value("shuttle_max_fds", &[]);
    let idle = m.value("shuttle_open_fds", &[]);
    assert!(idle > 3.0 && idle < max, "open fds {idle}, limit {max}");
    const OPEN: usize = 20;
    let mut clients: Vec<_> = (0..OPEN).map(|_| connect(web)).collect();
    for client in &mut clients {
        round_trip(client, b"hold");
    }
    let mut busy = None;
    let all_open = wait_until(DEADLINE, || {
        let m = scrape(admin);
        busy = Some(m.value("shuttle_open_fds", &[]));
        m.value("shuttle_active_connections", &[]) == OPEN as f64
            && m.value("shuttle_backend_active_connections", &[("service", "web"), ("backend", "b0")]) == OPEN as f64
    });
    assert!(all_open, "active connections never reached {OPEN}");
    let busy = busy.expect("a scrape");
    // 2 × OPEN more, less a margin for admin connections of earlier requests still closing.
    assert!(busy >= idle + OPEN as f64, "{OPEN} open connections, yet open fds went only {idle} → {busy}");
    drop(clients);
    let fell = wait_until(DEADLINE, || {
        let m = scrape(admin);
        m.value("shuttle_active_connections", &[]) == 0.0 && m.value("shuttle_open_fds", &[]) <= busy - OPEN as f64
    });
    assert!(
        fell,
        "open fds did not fall back once the connections closed: {}",
        scrape(admin).value("shuttle_open_fds", &[])
    );
}

#[test]
fn metrics_sum_every_worker() {
    const N: usize = 40;
    let to = replier(64);
    let config = json!([with(service("web", vec![backend("b0", to.address())]), &[("check_interval", json!(0))])]);
    let shuttle = Shuttle::start_with_config(&config, &["-workers", "2", "-debug"]);
    let (admin, web) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    for _ in 0..N {
        exchange(web, 100, 64);
    }
    let mut by = [0; 2];
    let logged = wait_until(DEADLINE, || {
        by = served_by(&shuttle, "web");
        by[0] + by[1] == N
    });
    assert!(logged, "expected {N} connection lines naming a worker, got {by:?}");
    // The kernel spreads clients over the workers' listeners: all 40 on one happens once in 10^11 runs.
    assert!(by.iter().all(|&n| n > 0), "one worker served every connection: {by:?}");
    let m = wait_count(admin, "shuttle_service_connection_duration_seconds", "web", N as u64);
    let b0 = [("service", "web"), ("backend", "b0")];
    assert_eq!(m.value("shuttle_workers", &[]), 2.0);
    assert_eq!(m.value("shuttle_backend_connections_total", &b0), N as f64, "served by {by:?}");
    assert_eq!(m.value("shuttle_backend_sent_bytes_total", &b0), (N * 100) as f64);
    assert_eq!(m.value("shuttle_backend_received_bytes_total", &b0), (N * 64) as f64);
    assert_eq!(m.value("shuttle_service_connect_seconds_count", &[("service", "web")]), N as f64);
    compare_with_json(admin);
}

#[test]
fn metrics_show_a_backend_failing_its_checks_as_down() {
    let up = echo();
    let checks =
        [("check_interval", json!(0.1)), ("fall", json!(2)), ("rise", json!(2)), ("connect_timeout", json!(1))];
    let failing =
        |name: &str| json!({ "name": name, "address": up.address(), "check_address": refusing().to_string() });
    let passing = json!({ "name": "ok", "address": up.address(), "check_address": up.address() });
    let config = json!([
        with(service("checked", vec![passing, failing("bad")]), &checks),
        with(service("gone", vec![failing("g0")]), &checks),
    ]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let (admin, gone) = (shuttle.admin_addr(), shuttle.service_addr("gone"));
    let ok = [("service", "checked"), ("backend", "ok")];
    let bad = [("service", "checked"), ("backend", "bad")];
    let g0 = [("service", "gone"), ("backend", "g0")];
    let mut last = None;
    let settled = wait_until(Duration::from_secs(15), || {
        let m = scrape(admin);
        let done = m.value("shuttle_backend_up", &bad) == 0.0
            && m.value("shuttle_backend_up", &g0) == 0.0
            && m.value("shuttle_backend_checks_failed_total", &bad) >= 2.0
            && m.value("shuttle_backend_checks_passed_total", &ok) >= 2.0;
        last = Some(m);
        done
    });
    assert!(settled, "checks never settled: {:?}", last.map(|m| m.samples));

    // Checks go on between the readings: the figures sit between the two JSON readings.
    let (m, _) = compare_with_json(admin);
    assert_eq!(m.value("shuttle_backend_up", &ok), 1.0);
    assert_eq!(m.value("shuttle_backend_checks_failed_total", &ok), 0.0);
    assert_eq!(m.value("shuttle_backend_checks_passed_total", &bad), 0.0);
    assert_eq!(m.value("shuttle_backend_errors_total", &bad), 0.0, "failed checks are no connection errors");

    // Clients of a service whose only backend is down have no backend.
    for _ in 0..2 {
        let mut client = connect(gone);
        assert_eq!(wait_closed(&mut client, DEADLINE), Ok(Closed::Eof));
    }
    let m = scrape(admin);
    assert_eq!(m.value("shuttle_service_no_backend_errors_total", &[("service", "gone")]), 2.0);
    assert_eq!(m.value("shuttle_backend_connections_total", &g0), 0.0);
}

#[test]
fn metrics_label_values_are_the_names_as_written() {
    let up = echo();
    let long = format!("x{}", "-._".repeat(42)); // 127 bytes of the name alphabet's punctuation
    let backends = vec![backend("b.0-x_y", up.address()), backend("2nd", up.address()), backend(&long, up.address())];
    let config = json!([with(service("my.svc-1_a", backends), &[("check_interval", json!(0))])]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let mut client = connect(shuttle.service_addr("my.svc-1_a"));
    round_trip(&mut client, b"labels");
    drop(client);
    let m = wait_count(admin, "shuttle_service_connection_duration_seconds", "my.svc-1_a", 1);
    for name in ["b.0-x_y", "2nd", long.as_str()] {
        assert_eq!(m.value("shuttle_backend_up", &[("service", "my.svc-1_a"), ("backend", name)]), 1.0, "{name}");
    }
    let served: f64 = m.named("shuttle_backend_connections_total").map(|s| s.value).sum();
    assert_eq!(served, 1.0);
    let (_, _, text) = raw(admin, "GET", "/metrics");
    assert!(text.contains(r#"shuttle_backend_up{service="my.svc-1_a",backend="b.0-x_y"} 1"#), "{text}");
    // Names are restricted, so no label value but the build's needs escaping.
    for s in m.samples.iter().filter(|s| s.name != "shuttle_build_info") {
        for (k, v) in &s.labels {
            let plain = v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
            assert!(plain, "{}: label {k}={v:?}", s.name);
        }
    }
    compare_with_json(admin);
}

#[test]
fn metrics_paths_are_read_only_and_shadow_a_service_named_metrics_for_get() {
    let up = echo();
    let shuttle = Shuttle::start(&[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);
    for method in ["POST", "PUT", "DELETE"] {
        let body = (method != "DELETE").then_some(r#"{"address": "127.0.0.1:0"}"#);
        let response = call(admin, method, "/_metrics", body).expect(405);
        assert_eq!(response.header("allow"), Some("GET"), "{method} /_metrics: {response:?}");
    }
    assert_eq!(config_bytes(admin), before, "a refused request changed the config");
    let families = |m: &Exposition| m.types.keys().cloned().collect::<Vec<_>>();
    let plain = scrape(admin);
    assert_eq!(families(&scrape_at(admin, "/_metrics")), families(&plain));
    assert_eq!(families(&scrape_at(admin, "/metrics/")), families(&plain), "a trailing slash is the same path");
    assert_eq!(plain.value("shuttle_services", &[]), 0.0);
    assert_eq!(plain.named("shuttle_service_connect_seconds_bucket").count(), 0, "no service, no series");

    // `metrics` is a valid service name: written and deleted as usual, its GET shadowed.
    let body = json!({ "address": "127.0.0.1:0", "check_interval": 0, "backends": [backend("b0", up.address())] });
    put(admin, "/metrics", &body).expect(200);
    let m = scrape(admin);
    assert_eq!(m.value("shuttle_services", &[]), 1.0);
    assert_eq!(m.value("shuttle_backend_up", &[("service", "metrics"), ("backend", "b0")]), 1.0);
    assert_eq!(get(admin, "/metrics/b0").expect(200).json()["name"], "b0", "the backend's own path is not shadowed");
    assert_eq!(service_in(&all_stats(admin), "metrics")["backends"][0]["name"], "b0");
    call(admin, "DELETE", "/metrics", None).expect(200);
    assert_eq!(scrape(admin).value("shuttle_services", &[]), 0.0);
}

#[test]
fn metrics_stay_valid_while_scraped_during_proxying() {
    const CONNECTIONS: usize = 150;
    const ROUND_TRIPS: usize = 400;
    let up = echo();
    let config = json!([with(service("web", vec![backend("b0", up.address())]), &[("check_interval", json!(0))])]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let (admin, web) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    let done = Arc::new(AtomicBool::new(false));
    let scraper = {
        let done = done.clone();
        thread::spawn(move || {
            // As fast as it can, and at least a few times whatever the proxying's pace.
            let (mut scrapes, mut last) = (0, 0.0);
            while !done.load(Ordering::SeqCst) || scrapes < 5 {
                let m = scrape(admin);
                let now = m.value("shuttle_backend_connections_total", &[("service", "web"), ("backend", "b0")]);
                assert!(now >= last, "a counter went down between scrapes: {last} → {now}");
                last = now;
                scrapes += 1;
            }
            scrapes
        })
    };
    let proxying = [
        thread::spawn(move || {
            for i in 0..CONNECTIONS {
                let mut client = connect(web);
                round_trip(&mut client, format!("connection {i}").as_bytes());
            }
        }),
        thread::spawn(move || {
            let mut client = connect(web);
            for i in 0..ROUND_TRIPS {
                round_trip(&mut client, format!("round trip {i}").as_bytes());
            }
        }),
    ];
    let proxied = proxying.into_iter().map(|t| t.join()).collect::<Vec<_>>();
    done.store(true, Ordering::SeqCst);
    let scrapes = scraper.join();
    assert!(proxied.iter().all(Result::is_ok), "a round trip failed while /metrics was scraped");
    let scrapes = scrapes.unwrap_or_else(|_| panic!("a scrape failed while proxying"));
    assert!(scrapes >= 5, "{scrapes} scrapes");
    let total = CONNECTIONS as u64 + 1;
    let m = wait_count(admin, "shuttle_service_connection_duration_seconds", "web", total);
    assert_eq!(m.value("shuttle_backend_connections_total", &[("service", "web"), ("backend", "b0")]), total as f64);
    compare_with_json(admin);
}

#[test]
fn metrics_render_a_thousand_backends() {
    const N: usize = 1_000;
    // Nothing listens at these (their ports stay bound, never listening), and
    // nothing connects: no clients, no checks.
    let dead: Vec<SocketAddr> = (0..10).map(|_| refusing()).collect();
    let shuttle = Shuttle::start(&[]);
    let admin = shuttle.admin_addr();
    let backends: Vec<Value> = (0..N).map(|i| backend(&format!("b{i:04}"), dead[i % dead.len()])).collect();
    put(admin, "/many", &json!({ "address": "127.0.0.1:0", "check_interval": 0, "backends": backends })).expect(200);
    let m = scrape(admin);
    assert_eq!(m.value("shuttle_backends", &[]), N as f64);
    for family in BACKEND_FAMILIES {
        assert_eq!(m.named(family).count(), N, "{family}");
    }
    assert_eq!(m.value("shuttle_backend_up", &[("service", "many"), ("backend", "b0999")]), 1.0);
    assert_eq!(m.named("shuttle_service_connect_seconds_count").count(), 1, "one service, one series");
    compare_with_json(admin);
}
