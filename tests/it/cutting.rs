//! Cutting connections (reference §3): `on_backend_down: "close"` cuts a
//! backend's pairs when it is marked down, `DELETE /{service}/{backend}?close`
//! and `DELETE /{service}?close` cut them with the removal, and
//! `max_connection_duration` cuts a connection at its age. A cut client gets
//! what shuttle had buffered for it and then a FIN, never a reset; the default
//! (`"keep"`, a plain DELETE, no duration) leaves open connections alone.
//!
//! Which pairs are cut is read on the client side: every backend greets with
//! its tag, so each client knows where it went.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::admin::{call, config_json, delete, stats};
use crate::fail_open::{checked, fast_checks, wait_health, CheckPort};
use crate::support::{
    backend, connect, named, read_line, round_trip, service, tempdir, wait_closed, wait_until, Backend, Closed,
    Shuttle, DEADLINE,
};

/// A cut's flush bound in shuttle (`CUT_FLUSH`), plus room for a loaded machine.
const CUT_WITHIN: Duration = Duration::from_secs(6);

/// A client of `addr` that knows which backend it reached.
struct Client {
    tag: String,
    stream: TcpStream,
}

/// `n` clients of `addr`, each echoing once.
#[track_caller]
fn clients(addr: SocketAddr, n: usize) -> Vec<Client> {
    (0..n)
        .map(|_| {
            let mut stream = connect(addr);
            let tag = read_line(&mut stream);
            round_trip(&mut stream, b"hello");
            Client { tag, stream }
        })
        .collect()
}

/// Asserts the client is cut: EOF (a FIN, not a reset) within [`CUT_WITHIN`].
#[track_caller]
fn assert_cut(client: &mut Client) {
    let closed = wait_closed(&mut client.stream, CUT_WITHIN);
    assert_eq!(closed, Ok(Closed::Eof), "a client of {} is cut with a FIN", client.tag);
}

/// Asserts the client still relays.
#[track_caller]
fn assert_alive(client: &mut Client) {
    round_trip(&mut client.stream, b"still here");
}

/// Waits until `path` holds a line containing every word of `words`.
#[track_caller]
fn wait_log_line(path: &Path, words: &[&str]) -> String {
    let mut found = None;
    let ok = wait_until(DEADLINE, || {
        let text = fs::read_to_string(path).unwrap_or_default();
        found = text.lines().find(|l| words.iter().all(|w| l.contains(w))).map(str::to_string);
        found.is_some()
    });
    assert!(ok, "no access-log line with {words:?} in:\n{}", fs::read_to_string(path).unwrap_or_default());
    found.unwrap_or_default()
}

/// A backend that greets with `TAG\n`, then sends `size` bytes of a pattern
/// without reading, and holds the connection until its peer closes.
fn blaster(tag: &str, size: usize) -> Backend {
    let greeting = format!("{tag}\n");
    Backend::spawn(move |mut conn| {
        if conn.write_all(greeting.as_bytes()).is_err() {
            return;
        }
        let blob: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        if conn.write_all(&blob).is_ok() {
            let _ = conn.drain_until_closed(Duration::from_secs(30));
        }
    })
}

#[test]
fn on_backend_down_close_cuts_its_pairs_with_a_fin_and_keep_leaves_them() {
    let (a, b) = (named("a"), named("b"));
    let (mut check_a, _check_b) = (CheckPort::open(), CheckPort::open());
    let backends = vec![checked("a", a.address(), &check_a), checked("b", b.address(), &_check_b)];
    let mut close = fast_checks(service("close", backends.clone()));
    close["on_backend_down"] = json!("close");
    let keep = fast_checks(service("keep", backends));
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let log_arg = log.to_str().expect("UTF-8 path");
    let shuttle = Shuttle::start_with_config(&json!([close, keep]), &["-access-log", log_arg]);
    let admin = shuttle.admin_addr();
    assert_eq!(config_json(admin)[0]["on_backend_down"], "close");
    assert_eq!(config_json(admin)[1]["on_backend_down"], "keep", "the default");
    let mut cut_side = clients(shuttle.service_addr("close"), 6);
    let mut kept_side = clients(shuttle.service_addr("keep"), 6);

    check_a.down();
    wait_health(admin, "close", "a", false);
    wait_health(admin, "keep", "a", false);
    for client in &mut cut_side {
        if client.tag == "a" {
            assert_cut(client);
        } else {
            assert_alive(client);
        }
    }
    // "keep": a's pairs run on after a is marked down.
    for client in &mut kept_side {
        assert_alive(client);
    }
    let line = wait_log_line(&log, &["service=close", "end=backend_down"]);
    assert!(line.contains("backend=a"), "{line}");
    let of_a = cut_side.iter().filter(|c| c.tag == "a").count();
    assert!(of_a > 0, "round robin sent some clients to a");
    let cut_lines =
        || fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| l.contains("end=backend_down")).count();
    assert!(wait_until(DEADLINE, || cut_lines() == of_a), "the {of_a} clients of a were cut, no other");
    assert!(wait_until(DEADLINE, || stats(admin, "/close/a")["active"] == 0), "{}", stats(admin, "/close/a"));
    // The service still takes clients, on its healthy backend.
    let mut later = clients(shuttle.service_addr("close"), 2);
    assert!(later.iter().all(|c| c.tag == "b"));
    assert_alive(&mut later[0]);
}

#[test]
fn a_cut_flushes_what_was_buffered_for_the_client_then_sends_fin() {
    // More than shuttle and the kernel buffer between them, so the cut comes
    // while bytes are still on their way to a client that has read nothing.
    const SIZE: usize = 8 << 20;
    let source = blaster("big", SIZE);
    let mut check = CheckPort::open();
    let mut web = fast_checks(service("web", vec![checked("big", source.address(), &check)]));
    web["on_backend_down"] = json!("close");
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();
    let mut client = connect(shuttle.service_addr("web"));
    assert_eq!(read_line(&mut client), "big");
    // Let the buffers between backend and client fill up.
    assert!(wait_until(DEADLINE, || stats(admin, "/web")["received"].as_u64() > Some(64 << 10)));
    // The client keeps sending while it is cut: shuttle must read and drop it, not reset.
    client.write_all(&[7u8; 32 << 10]).expect("send while the backend is up");

    check.down();
    wait_health(admin, "web", "big", false);
    let started = Instant::now();
    let mut got = Vec::new();
    client.set_read_timeout(Some(CUT_WITHIN)).expect("timeout");
    let end = loop {
        let mut chunk = [0u8; 64 << 10];
        match client.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(e),
        }
    };
    assert!(end.is_ok(), "the cut ends with a FIN, not {end:?} after {} bytes", got.len());
    assert!(started.elapsed() < CUT_WITHIN);
    assert!(!got.is_empty() && got.len() < SIZE, "some bytes were buffered, not all were sent: {}", got.len());
    let expected: Vec<u8> = (0..got.len()).map(|i| (i % 251) as u8).collect();
    assert!(got == expected, "what reached the client is a prefix of what the backend sent, byte for byte");
}

#[test]
fn delete_backend_with_close_cuts_its_pairs_and_a_plain_delete_keeps_them() {
    let (a, b, c) = (named("a"), named("b"), named("c"));
    let web = service("web", vec![backend("a", a.address()), backend("b", b.address()), backend("c", c.address())]);
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let shuttle = Shuttle::start_with_config(&json!([web]), &["-access-log", log.to_str().expect("UTF-8")]);
    let admin = shuttle.admin_addr();
    let mut all = clients(shuttle.service_addr("web"), 9);
    let reached = |tag: &str, all: &[Client]| all.iter().any(|c| c.tag == tag);
    assert!(reached("a", &all), "round robin reached a");

    let reply = delete(admin, "/web/a?close").expect(200);
    assert!(reply.json()[0]["backends"].as_array().is_some_and(|l| l.iter().all(|b| b["name"] != "a")), "{reply:?}");
    for client in all.iter_mut().filter(|c| c.tag == "a") {
        assert_cut(client);
    }
    wait_log_line(&log, &["backend=a", "end=backend_removed"]);
    delete(admin, "/web/b").expect(200);
    for client in all.iter_mut().filter(|c| c.tag != "a") {
        assert_alive(client);
    }

    // The whole service, with ?close: every pair of it.
    let reply = delete(admin, "/web?close").expect(200);
    assert_eq!(reply.json(), json!([]), "{reply:?}");
    for client in all.iter_mut().filter(|c| c.tag != "a") {
        assert_cut(client);
    }
    for tag in ["b", "c"].into_iter().filter(|t| reached(t, &all)) {
        wait_log_line(&log, &[&format!("backend={tag}"), "end=service_removed"]);
    }
}

#[test]
fn delete_with_close_of_something_unknown_is_404_and_cuts_nothing() {
    let a = named("a");
    let shuttle = Shuttle::start_with_config(&json!([service("web", vec![backend("a", a.address())])]), &[]);
    let admin = shuttle.admin_addr();
    let mut open = clients(shuttle.service_addr("web"), 2);
    let before = config_json(admin);
    assert_eq!(delete(admin, "/web/nope?close").status, 404);
    assert_eq!(delete(admin, "/nope?close").status, 404);
    assert_eq!(delete(admin, "/nope/a?close").status, 404);
    assert_eq!(config_json(admin), before);
    for client in &mut open {
        assert_alive(client);
    }
}

#[test]
fn max_connection_duration_cuts_connections_at_their_age_and_changes_live() {
    let a = named("a");
    let mut web = service("web", vec![backend("a", a.address())]);
    web["max_connection_duration"] = json!(1);
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let shuttle = Shuttle::start_with_config(&json!([web]), &["-access-log", log.to_str().expect("UTF-8")]);
    let admin = shuttle.admin_addr();
    assert_eq!(config_json(admin)[0]["max_connection_duration"], 1);
    let addr = shuttle.service_addr("web");

    // A busy connection is cut as well as an idle one: age, not idleness.
    let started = Instant::now();
    let mut busy = clients(addr, 1).remove(0);
    let mut idle = clients(addr, 1).remove(0);
    let cut = loop {
        if let Err(e) = busy.stream.write_all(b"x").and_then(|()| busy.stream.read_exact(&mut [0u8; 1])) {
            break e;
        }
        assert!(started.elapsed() < CUT_WITHIN, "the busy connection outlived its max_connection_duration");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof, "a FIN, not a reset: {cut}");
    let lasted = started.elapsed();
    assert!(lasted >= Duration::from_millis(900), "cut after {lasted:?}, before its second");
    assert_cut(&mut idle);
    let line = wait_log_line(&log, &["end=max_duration"]);
    assert!(line.contains("backend=a"), "{line}");

    // 0 means no limit; a changed limit applies to new connections.
    call(admin, "PATCH", "/web", Some(r#"{"max_connection_duration": 0}"#)).expect(200);
    let mut long = clients(addr, 1).remove(0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_alive(&mut long);
}

#[test]
fn cutting_fields_reject_bad_values_and_change_nothing() {
    let a = named("a");
    let shuttle = Shuttle::start_with_config(&json!([service("web", vec![backend("a", a.address())])]), &[]);
    let admin = shuttle.admin_addr();
    let before = config_json(admin);
    let bad: [(&str, Value); 7] = [
        ("on_backend_down", json!("sometimes")),
        ("on_backend_down", json!("")),
        ("on_backend_down", json!(true)),
        ("max_connection_duration", json!(-1)),
        ("max_connection_duration", json!("1")),
        ("max_connection_duration", json!(1e12)),
        ("max_connection_duration", json!([])),
    ];
    for (field, value) in bad {
        let body = json!({ field: value }).to_string();
        let response = call(admin, "PATCH", "/web", Some(&body));
        assert_eq!(response.status, 400, "{body}: {response:?}");
        assert!(response.error().contains(field), "the error names {field}: {response:?}");
        let mut whole = before[0].clone();
        whole[field] = value.clone();
        let response = call(admin, "PUT", "/web", Some(&whole.to_string()));
        assert_eq!(response.status, 400, "PUT with {body}: {response:?}");
    }
    assert_eq!(config_json(admin), before, "nothing changed");
    let good = r#"{"on_backend_down": "close", "max_connection_duration": 2.5, "fail_open": true}"#;
    call(admin, "PATCH", "/web", Some(good)).expect(200);
    let after = &config_json(admin)[0];
    assert_eq!((&after["on_backend_down"], &after["max_connection_duration"]), (&json!("close"), &json!(2.5)));
    call(admin, "PATCH", "/web", Some(r#"{"on_backend_down": null}"#)).expect(200);
    assert_eq!(config_json(admin)[0]["on_backend_down"], "keep", "null is the default");
}

#[test]
fn two_hundred_pairs_cut_at_once_all_get_a_fin() {
    let a = named("a");
    let mut check = CheckPort::open();
    let mut web = fast_checks(service("web", vec![checked("a", a.address(), &check)]));
    web["on_backend_down"] = json!("close");
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();
    let mut open = clients(shuttle.service_addr("web"), 200);
    check.down();
    wait_health(admin, "web", "a", false);
    for client in &mut open {
        assert_cut(client);
    }
    assert!(wait_until(DEADLINE, || stats(admin, "/web")["active"] == 0), "{}", stats(admin, "/web"));
}
