//! Regressions found in review: each test pins one defect that once slipped
//! past the other modules.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use serde_json::{json, Value};

use crate::support::{
    backend, connect, echo, one_backend, service, tempdir, wait_until, write_file, Shuttle, DEADLINE, IO_TIMEOUT,
};

/// Sends one raw HTTP request, then ends our side at once (as `nc -N` does), and
/// returns the status and body.
fn request_then_fin(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(admin).expect("connect to admin");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(head.as_bytes()).expect("send");
    stream.shutdown(Shutdown::Write).expect("shut write");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("read the answer");
    let text = String::from_utf8_lossy(&reply);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn get(admin: SocketAddr, path: &str) -> (u16, Value) {
    request_then_fin(admin, "GET", path, "")
}

#[test]
fn admin_answers_a_request_followed_at_once_by_fin() {
    let shuttle = Shuttle::start(&[]);
    let admin = shuttle.admin_addr();
    for _ in 0..5 {
        assert_eq!(get(admin, "/_config"), (200, json!([])));
    }
    let body = json!({ "address": "127.0.0.1:0" }).to_string();
    assert_eq!(request_then_fin(admin, "PUT", "/web", &body).0, 200);
    assert_eq!(get(admin, "/web").0, 200, "the PUT was applied");
}

#[test]
fn no_backend_closes_with_fin_even_when_the_client_already_sent_bytes() {
    let shuttle = Shuttle::start_with_config(&json!([service("web", vec![])]), &[]);
    let addr = shuttle.service_addr("web");
    for _ in 0..10 {
        let mut client = connect(addr);
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("send");
        let mut buf = [0u8; 16];
        match client.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("no backend, yet {n} bytes came back"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => panic!("closed with a reset, not a FIN"),
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn a_live_unix_admin_socket_is_not_taken_over() {
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    let path = socket.to_str().expect("utf-8 path");
    let first = Shuttle::start(&["-http", path]);
    first.wait_for_line("admin listening on");
    let (status, lines) = Shuttle::start_expect_failure(&["-http", path]);
    assert_eq!(status.code(), Some(1), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("shuttle: admin API: cannot listen on")), "{lines:?}");
    assert!(socket.exists(), "the running instance keeps its socket");
    let mut client = std::os::unix::net::UnixStream::connect(&socket).expect("the first instance still answers");
    client.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    client.write_all(b"GET /_config HTTP/1.0\r\n\r\n").expect("send");
    let mut reply = String::new();
    client.read_to_string(&mut reply).expect("read");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn an_unresolvable_admin_address_exits_1_with_one_line() {
    let (status, lines) = Shuttle::start_expect_failure(&["-http", "no-such-host.invalid:9"]);
    assert_eq!(status.code(), Some(1), "{lines:?}");
    let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("shuttle: ")).collect();
    assert_eq!(errors.len(), 1, "{lines:?}");
    assert!(errors[0].contains("no-such-host.invalid"), "{lines:?}");
}

#[test]
fn a_check_interval_below_a_millisecond_is_refused_and_changes_nothing() {
    let echo = echo();
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let shuttle = Shuttle::start(&["-state", state.to_str().expect("utf-8 path")]);
    let admin = shuttle.admin_addr();
    let mut web = service("web", vec![backend("b0", echo.address())]);
    web["backends"][0]["check_address"] = json!(echo.address());
    web["check_interval"] = json!(1e-10);
    let (status, body) = request_then_fin(admin, "PUT", "/web", &web.to_string());
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("check_interval")), "{body}");
    assert!(!state.exists(), "nothing was written");
    assert_eq!(get(admin, "/_config"), (200, json!([])), "shuttle is alive and unchanged");
}

#[test]
fn backends_only_needs_no_settings_in_the_body() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let body = json!({ "fall": 0, "backends": [{ "name": "b1", "address": echo.address() }] }).to_string();
    let (status, config) = request_then_fin(admin, "PUT", "/web?backends_only", &body);
    assert_eq!(status, 200, "{config}");
    assert_eq!(config[0]["fall"], 2, "the running settings stay");
    assert_eq!(config[0]["backends"][0]["name"], "b1");
}

#[test]
fn a_check_without_connect_timeout_still_ends_when_the_backend_never_replies() {
    // Accepts the check's connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let echo = echo();
    let mut web = service("web", vec![backend("b0", echo.address())]);
    web["backends"][0]["check_address"] = json!(silent_addr.to_string());
    web["connect_timeout"] = json!(0);
    web["check_interval"] = json!(0.2);
    web["check_expect"] = json!("200 OK");
    let dir = tempdir();
    let config = write_file(dir.path(), "config.json", json!([web]).to_string().as_bytes());
    let shuttle = Shuttle::start(&["-config", config.to_str().expect("utf-8 path")]);
    let admin = shuttle.admin_addr();
    let failed = wait_until(DEADLINE, || get(admin, "/web/b0").1["check_fail"].as_u64().unwrap_or(0) >= 2);
    assert!(failed, "checks against a silent backend never ended: {}", get(admin, "/web/b0").1);
    drop(silent);
}

#[test]
fn pipelined_requests_followed_by_fin_are_all_answered() {
    let shuttle = Shuttle::start(&[]);
    let mut stream = TcpStream::connect(shuttle.admin_addr()).expect("connect to admin");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\nGET /_config HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    stream.shutdown(Shutdown::Write).expect("shut write");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read the answers");
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply}");
}

#[test]
fn idle_admin_connections_make_room_for_a_new_client() {
    let shuttle = Shuttle::start(&[]);
    let admin = shuttle.admin_addr();
    let idle: Vec<TcpStream> = (0..70).map(|_| TcpStream::connect(admin).expect("connect")).collect();
    // All 70 are accepted (the oldest idle ones make room), and a 71st client is served.
    assert_eq!(get(admin, "/_config"), (200, json!([])));
    drop(idle);
}

#[test]
fn a_flood_of_pipelined_admin_requests_does_not_stall_proxying() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");

    let mut flood = TcpStream::connect(admin).expect("connect to admin");
    let mut reader = flood.try_clone().expect("clone");
    let drain = std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    let request = b"GET /nope/nope HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(20_000);
    let writer = std::thread::spawn(move || {
        let _ = flood.write_all(&request);
        let _ = flood.shutdown(Shutdown::Write);
    });

    let mut client = connect(web);
    let mut slowest = std::time::Duration::ZERO;
    for _ in 0..50 {
        let started = std::time::Instant::now();
        client.write_all(b"ping").expect("send");
        let mut reply = [0u8; 4];
        client.read_exact(&mut reply).expect("echo");
        slowest = slowest.max(started.elapsed());
    }
    writer.join().expect("writer");
    drain.join().expect("drain");
    assert!(slowest < std::time::Duration::from_millis(500), "a proxied round trip took {slowest:?} during the flood");
}
