//! The admin API (SPEC §5) over real HTTP against the real binary: every route
//! and status, replace semantics, HTTP framing (chunked, `Expect`, keep-alive,
//! limits, garbage), slow clients, a unix socket, and `curl` as the reference
//! client.
//!
//! Most tests speak HTTP/1.1 through [`Http`], a small raw client that checks
//! what every response must be: JSON, `Content-Type: application/json`, a
//! trailing newline, and `{"error": "..."}` for every error status.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    backend, connect, echo, named, one_backend, read_line, refused_within, round_trip, service, tempdir, try_connect,
    wait_until, write_file, Shuttle, DEADLINE, IO_TIMEOUT,
};

/// The body limit (SPEC §5), inclusive.
const MIB: usize = 1024 * 1024;
/// The request head limit (SPEC §5).
const HEAD_LIMIT: usize = 16 * 1024;

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client
// ---------------------------------------------------------------------------

/// A client socket: TCP or unix.
#[derive(Debug)]
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn {
    fn set_read_timeout(&self, timeout: Duration) {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(timeout)),
            Conn::Unix(s) => s.set_read_timeout(Some(timeout)),
        }
        .expect("set read timeout");
    }
}

/// One parsed response.
#[derive(Clone)]
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {:?} {}", self.status, self.headers, String::from_utf8_lossy(&self.body))
    }
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    /// Asserts the status and returns the response.
    #[track_caller]
    pub fn expect(self, status: u16) -> Response {
        assert_eq!(self.status, status, "unexpected status: {self:?}");
        self
    }

    /// The message of an error response (the shape is checked on every read).
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_string()
    }

    /// Whether the server said it will close the connection.
    pub fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    /// What every final response of the admin API must be (SPEC §5).
    #[track_caller]
    fn check_invariants(&self) {
        let content_type = self.header("content-type").unwrap_or_else(|| panic!("no Content-Type: {self:?}"));
        assert!(
            content_type.to_ascii_lowercase().starts_with("application/json"),
            "Content-Type is not application/json: {self:?}"
        );
        assert!(self.body.ends_with(b"\n"), "body has no trailing newline: {self:?}");
        let value = self.json();
        if self.status >= 400 {
            let object = value.as_object().unwrap_or_else(|| panic!("error body is not an object: {self:?}"));
            assert_eq!(object.len(), 1, "error body must be exactly {{\"error\": ...}}: {self:?}");
            let message = object.get("error").and_then(Value::as_str);
            assert!(message.is_some_and(|m| !m.is_empty()), "error body has no message string: {self:?}");
        }
    }
}

/// A raw HTTP/1.1 client connection; several requests may share it.
#[derive(Debug)]
pub(crate) struct Http {
    conn: Conn,
    buf: Vec<u8>,
}

/// The bytes of a request with `Host` and, when there is a body, `Content-Length`.
pub(crate) fn request_bytes(method: &str, target: &str, body: Option<&[u8]>, extra: &[&str]) -> Vec<u8> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: shuttle-tests\r\n");
    for field in extra {
        head.push_str(field);
        head.push_str("\r\n");
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

impl Http {
    /// Connects over TCP.
    #[track_caller]
    pub fn tcp(addr: SocketAddr) -> Http {
        Http { conn: Conn::Tcp(connect(addr)), buf: Vec::new() }
    }

    /// Connects to a unix socket.
    #[track_caller]
    pub fn unix(path: &Path) -> Http {
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set read timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set write timeout");
        Http { conn: Conn::Unix(stream), buf: Vec::new() }
    }

    /// Writes raw bytes.
    #[track_caller]
    pub fn send(&mut self, bytes: &[u8]) {
        self.conn.write_all(bytes).unwrap_or_else(|e| panic!("sending {} bytes: {e}", bytes.len()));
    }

    /// Sends one request and reads its final response.
    #[track_caller]
    pub fn request(&mut self, method: &str, target: &str, body: Option<&[u8]>) -> Response {
        self.send(&request_bytes(method, target, body, &[]));
        self.response()
    }

    /// Sends one request with `extra` header fields and reads its final response.
    #[track_caller]
    pub fn request_with(&mut self, method: &str, target: &str, extra: &[&str], body: Option<&[u8]>) -> Response {
        self.send(&request_bytes(method, target, body, extra));
        self.response()
    }

    /// Reads more bytes into the buffer; panics on EOF, error or timeout.
    #[track_caller]
    fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        match self.conn.read(&mut chunk) {
            Ok(0) => panic!("EOF while reading a response; got so far: {:?}", String::from_utf8_lossy(&self.buf)),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading a response: {e}; got so far: {:?}", String::from_utf8_lossy(&self.buf)),
        }
    }

    /// Reads one response, interim (1xx) or final; final ones are checked against SPEC §5.
    #[track_caller]
    pub fn any_response(&mut self) -> Response {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill();
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).expect("response head is UTF-8");
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        assert!(status_line.starts_with("HTTP/1.1 "), "bad status line {status_line:?}");
        let status: u16 = status_line[9..]
            .split(' ')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap_or_else(|| panic!("bad header line {line:?}"));
                (name.trim().to_string(), value.trim().to_string())
            })
            .collect();
        let mut response = Response { status, headers, body: Vec::new() };
        if (100..200).contains(&status) {
            return response;
        }
        let length: usize = response
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("response without a valid Content-Length: {response:?}"));
        while self.buf.len() < length {
            self.fill();
        }
        response.body = self.buf.drain(..length).collect();
        response.check_invariants();
        response
    }

    /// Reads the final response, which must not be preceded by an interim one.
    #[track_caller]
    pub fn response(&mut self) -> Response {
        let response = self.any_response();
        assert!(response.status >= 200, "unexpected interim response {response:?}");
        response
    }

    /// Waits up to `within` for the server to close the connection (any bytes
    /// arriving first are discarded); returns how long it took.
    pub fn closed_within(&mut self, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let mut chunk = [0u8; 4096];
        loop {
            let left = within.checked_sub(started.elapsed()).ok_or(format!("still open after {within:?}"))?;
            self.conn.set_read_timeout(left.max(Duration::from_millis(1)));
            match self.conn.read(&mut chunk) {
                Ok(0) => return Ok(started.elapsed()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => {
                    return Ok(started.elapsed())
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(format!("still open after {within:?}"))
                }
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shorthands
// ---------------------------------------------------------------------------

/// One request on a fresh connection.
#[track_caller]
pub(crate) fn call(admin: SocketAddr, method: &str, target: &str, body: Option<&str>) -> Response {
    Http::tcp(admin).request(method, target, body.map(str::as_bytes))
}

#[track_caller]
pub(crate) fn get(admin: SocketAddr, target: &str) -> Response {
    call(admin, "GET", target, None)
}

#[track_caller]
pub(crate) fn put(admin: SocketAddr, target: &str, body: &Value) -> Response {
    call(admin, "PUT", target, Some(&body.to_string()))
}

#[track_caller]
pub(crate) fn delete(admin: SocketAddr, target: &str) -> Response {
    call(admin, "DELETE", target, None)
}

/// `GET /_config`'s body, which must be 200.
#[track_caller]
pub(crate) fn config_bytes(admin: SocketAddr) -> Vec<u8> {
    get(admin, "/_config").expect(200).body
}

/// `GET /_config` as JSON.
#[track_caller]
pub(crate) fn config_json(admin: SocketAddr) -> Value {
    get(admin, "/_config").expect(200).json()
}

/// Stats of `/{service}` or `/{service}/{backend}`, which must be 200.
#[track_caller]
pub(crate) fn stats(admin: SocketAddr, target: &str) -> Value {
    get(admin, target).expect(200).json()
}

/// A backend's stats inside a service stats object.
#[track_caller]
fn backend_in(service: &Value, name: &str) -> Value {
    service["backends"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name:?} in {service}"))
}

/// The counters of a stats object, as a comparable tuple.
pub(crate) fn counters(stats: &Value) -> [u64; 5] {
    ["connections", "sent", "received", "errors", "active"]
        .map(|k| stats[k].as_u64().unwrap_or_else(|| panic!("no counter {k:?} in {stats}")))
}

/// Waits until service `name` has no active connection.
#[track_caller]
pub(crate) fn wait_idle(admin: SocketAddr, name: &str) {
    let target = format!("/{name}");
    assert!(
        wait_until(DEADLINE, || stats(admin, &target)["active"] == 0),
        "service {name} still has active connections: {}",
        stats(admin, &target)
    );
}

/// A fresh connection to `addr`, one echo round trip, then a clean close; returns how long it took.
#[track_caller]
pub(crate) fn echo_once(addr: SocketAddr, message: &[u8]) -> Duration {
    let started = Instant::now();
    let mut client = connect(addr);
    round_trip(&mut client, message);
    client.shutdown(Shutdown::Write).expect("shut write");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("read to EOF");
    assert!(rest.is_empty(), "nothing after the echo");
    started.elapsed()
}

/// A loopback port that was free a moment ago (bound to port 0, then released).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local addr").port()
}

/// A valid service body at `address` with one backend `b0` at `backend_address`.
fn service_body(address: &str, backend_address: &str) -> Value {
    json!({ "address": address, "backends": [{ "name": "b0", "address": backend_address }] })
}

/// A JSON body padded with spaces to exactly `len` bytes.
pub(crate) fn padded(body: &Value, len: usize) -> Vec<u8> {
    let mut bytes = body.to_string().into_bytes();
    assert!(bytes.len() <= len);
    bytes.resize(len, b' ');
    bytes
}

// ---------------------------------------------------------------------------
// curl, as a user would run it
// ---------------------------------------------------------------------------

/// What a curl run gave.
#[derive(Debug)]
pub(crate) struct Curl {
    pub status: u16,
    pub body: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `curl -sS ARGS` with `stdin`; the body goes to a file and the status to stdout.
pub(crate) fn curl(args: &[&str], stdin: &[u8]) -> Curl {
    let dir = tempdir();
    let out = dir.path().join("body");
    let started = Instant::now();
    let mut child = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", out.to_str().expect("utf-8 path"), "-w", "%{http_code}"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run curl (install it: .ci/run does)");
    let mut input = child.stdin.take().expect("curl stdin");
    let stdin = stdin.to_vec();
    let writer = thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().expect("wait for curl");
    let elapsed = started.elapsed();
    let _ = writer.join();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "curl {args:?} failed: {}\n{stderr}", output.status);
    let status = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0);
    let body = std::fs::read(&out).unwrap_or_default();
    Curl { status, body, stderr, elapsed }
}

// ---------------------------------------------------------------------------
// Reading: GET /, GET /_config, GET /{service}, GET /{service}/{backend}
// ---------------------------------------------------------------------------

#[test]
fn admin_get_root_lists_service_stats_sorted_by_name() {
    let (one, two) = (echo(), echo());
    let config = json!([
        service("zeta", vec![backend("z0", one.address())]),
        service("alpha", vec![backend("a0", one.address()), backend("a1", two.address())]),
        service("mid", vec![]),
    ]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();

    // Traffic on alpha: one connection to each backend (round robin), known sizes.
    let alpha = shuttle.service_addr("alpha");
    echo_once(alpha, &[b'x'; 100]);
    echo_once(alpha, &[b'y'; 30]);
    // A service with no backends accepts and closes at once: an error of the service.
    let mut empty = connect(shuttle.service_addr("mid"));
    let mut rest = Vec::new();
    let _ = empty.read_to_end(&mut rest);
    wait_idle(admin, "alpha");
    assert!(wait_until(DEADLINE, || stats(admin, "/mid")["errors"] == 1), "{}", stats(admin, "/mid"));

    let root = get(admin, "/").expect(200);
    let list = root.json();
    let list = list.as_array().expect("GET / is a list");
    let names: Vec<&str> = list.iter().map(|s| s["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["alpha", "mid", "zeta"], "sorted by name");

    let config = config_json(admin);
    for (stats, config) in list.iter().zip(config.as_array().expect("config list")) {
        // Every config field, plus counters.
        for (field, value) in config.as_object().expect("service config object") {
            if field != "backends" {
                assert_eq!(&stats[field], value, "stats field {field} of {}", stats["name"]);
            }
        }
        for counter in ["sent", "received", "errors", "connections", "active"] {
            assert!(stats[counter].is_u64(), "service counter {counter} in {stats}");
        }
        let backends = stats["backends"].as_array().expect("backends list");
        let configs = config["backends"].as_array().expect("backend configs");
        assert_eq!(backends.len(), configs.len());
        for (b, c) in backends.iter().zip(configs) {
            for (field, value) in c.as_object().expect("backend config object") {
                assert_eq!(&b[field], value, "backend stats field {field}");
            }
            assert_eq!(b["up"], true, "an unchecked backend is up");
            for counter in ["sent", "received", "errors", "connections", "active", "check_success", "check_fail"] {
                assert!(b[counter].is_u64(), "backend counter {counter} in {b}");
            }
        }
    }
    // Sums over the backends.
    let alpha = &list[0];
    assert_eq!(counters(alpha), [2, 130, 130, 0, 0], "alpha sums: {alpha}");
    assert_eq!(counters(&backend_in(alpha, "a0"))[..3], [1, 100, 100], "{alpha}");
    assert_eq!(counters(&backend_in(alpha, "a1"))[..3], [1, 30, 30], "{alpha}");
    assert_eq!(list[1]["errors"], 1, "the service's own error: {}", list[1]);
    assert_eq!(list[1]["backends"], json!([]));
}

#[test]
fn admin_get_config_shows_every_field_with_effective_values() {
    let echo = echo();
    let config = json!([
        { "name": "web", "address": "127.0.0.1:0",
          "backends": [{ "name": "zz", "address": echo.address() },
                       { "name": "aa", "address": echo.address(), "weight": 3 }] },
        { "name": "api", "address": "127.0.0.1:0", "balance": "LC", "client_timeout": 0.25 },
    ]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let response = get(admin, "/_config").expect(200);
    let text = String::from_utf8(response.body.clone()).expect("UTF-8");
    assert!(text.lines().count() > 10, "pretty-printed: {text}");
    let expected = json!([
        { "name": "api", "address": "127.0.0.1:0", "backends": [], "balance": "LC", "check_interval": 2,
          "fall": 2, "rise": 2, "client_timeout": 0.25, "server_timeout": 0, "connect_timeout": 5,
          "check_send": "", "check_expect": "", "max_connections": 0, "max_queue": 0, "queue_timeout": 5,
          "accept_proxy": false, "fail_open": false, "on_backend_down": "keep", "max_connection_duration": 0,
          "protocol": "tcp", "udp_idle_timeout": 30, "udp_max_responses": 0, "max_flows": 10000,
          "socket_mode": "0660" },
        { "name": "web", "address": "127.0.0.1:0",
          "backends": [
            { "name": "zz", "address": echo.address(), "check_address": "", "weight": 1, "max_connections": 0,
              "send_proxy": "" },
            { "name": "aa", "address": echo.address(), "check_address": "", "weight": 3, "max_connections": 0,
              "send_proxy": "" }],
          "balance": "RR", "check_interval": 2, "fall": 2, "rise": 2, "client_timeout": 0,
          "server_timeout": 0, "connect_timeout": 5, "check_send": "", "check_expect": "",
          "max_connections": 0, "max_queue": 0, "queue_timeout": 5, "accept_proxy": false,
          "fail_open": false, "on_backend_down": "keep", "max_connection_duration": 0,
          "protocol": "tcp", "udp_idle_timeout": 30, "udp_max_responses": 0, "max_flows": 10000,
          "socket_mode": "0660" },
    ]);
    assert_eq!(response.json(), expected, "services sorted by name, backends in order, every field shown");
}

#[test]
fn admin_get_service_and_backend_stats_and_their_404s() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    echo_once(shuttle.service_addr("web"), b"hello");
    wait_idle(admin, "web");

    let web = stats(admin, "/web");
    assert_eq!(web["name"], "web");
    assert_eq!(counters(&web), [1, 5, 5, 0, 0], "{web}");
    let b0 = stats(admin, "/web/b0");
    assert_eq!(b0, backend_in(&web, "b0"), "GET /web/b0 is the same object as in GET /web");
    assert_eq!((b0["name"].clone(), b0["up"].clone()), (json!("b0"), json!(true)));
    assert_eq!(get(admin, "/web/").expect(200).json(), web, "a trailing slash names the same service");

    for target in ["/nope", "/nope/b0", "/web/nope", "/nope/nope", "/web/b0/deeper"] {
        let response = get(admin, target).expect(404);
        assert!(!response.error().is_empty(), "{target}");
    }
}

// ---------------------------------------------------------------------------
// PUT / POST / DELETE of services
// ---------------------------------------------------------------------------

#[test]
fn admin_put_service_creates_it_and_answers_the_whole_config() {
    let (one, two) = (named("one"), named("two"));
    let shuttle = Shuttle::start_with_config(&one_backend(one.address()), &[]);
    let admin = shuttle.admin_addr();

    // No "name" in the body: it comes from the URL.
    let response = put(admin, "/api", &service_body("127.0.0.1:0", &two.address())).expect(200);
    assert_eq!(response.body, config_bytes(admin), "the PUT answer is GET /_config");
    let names: Vec<Value> = response.json().as_array().expect("list").iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, [json!("api"), json!("web")]);

    // The new service proxies.
    let mut client = connect(shuttle.service_addr("api"));
    assert_eq!(read_line(&mut client), "two");
    round_trip(&mut client, b"ping");
    drop(client);

    // POST works wherever PUT does, and a body name equal to the URL name is fine.
    let body = json!({ "name": "other", "address": "127.0.0.1:0", "balance": "LC" });
    let response = call(admin, "POST", "/other", Some(&body.to_string())).expect(200);
    assert_eq!(response.body, config_bytes(admin));
    assert_eq!(stats(admin, "/other")["balance"], "LC");
    let response = call(admin, "POST", "/other/b9", Some(&json!({ "address": one.address() }).to_string())).expect(200);
    assert_eq!(response.body, config_bytes(admin));
    let mut client = connect(shuttle.service_addr("other"));
    assert_eq!(read_line(&mut client), "one");
}

#[test]
fn admin_put_service_bad_requests_get_400_and_change_nothing() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let before = config_bytes(admin);
    let ok = echo.address();

    let cases: Vec<(&str, &str, String)> = vec![
        ("bad JSON", "/web", r#"{"address": "127.0.0.1:0", "#.into()),
        ("bad JSON (new service)", "/api", r#"{"address": "127.0.0.1:0" "#.into()),
        ("empty body", "/web", String::new()),
        ("not an object", "/web", "[1, 2]".into()),
        ("unknown field", "/web", r#"{"address": "127.0.0.1:0", "balanse": "LC"}"#.into()),
        ("unknown field (new service)", "/api", r#"{"address": "127.0.0.1:0", "colour": "red"}"#.into()),
        (
            "unknown backend field",
            "/web",
            format!(r#"{{"address": "127.0.0.1:0", "backends": [{{"name": "b0", "address": "{ok}", "wieght": 2}}]}}"#),
        ),
        ("bad balance", "/web", r#"{"address": "127.0.0.1:0", "balance": "XX"}"#.into()),
        ("bad balance (new service)", "/api", r#"{"address": "127.0.0.1:0", "balance": "random"}"#.into()),
        ("name differs from URL", "/web", r#"{"name": "api", "address": "127.0.0.1:0"}"#.into()),
        ("name differs from URL (new service)", "/api", r#"{"name": "web", "address": "127.0.0.1:0"}"#.into()),
        (
            "negative weight",
            "/web",
            format!(r#"{{"address": "127.0.0.1:0", "backends": [{{"name": "b0", "address": "{ok}", "weight": -1}}]}}"#),
        ),
        (
            "negative weight (new service)",
            "/api",
            format!(r#"{{"address": "127.0.0.1:0", "backends": [{{"name": "b0", "address": "{ok}", "weight": -1}}]}}"#),
        ),
        ("reserved _ name", "/_api", r#"{"address": "127.0.0.1:0"}"#.into()),
        ("invalid name", "/we%20b", r#"{"address": "127.0.0.1:0"}"#.into()),
        ("missing address", "/api", "{}".into()),
        ("bad address", "/web", r#"{"address": "not an address"}"#.into()),
        ("fall 0", "/web", r#"{"address": "127.0.0.1:0", "fall": 0}"#.into()),
        ("negative timeout", "/web", r#"{"address": "127.0.0.1:0", "client_timeout": -1}"#.into()),
        (
            "duplicate backend names",
            "/web",
            format!(
                concat!(
                    r#"{{"address": "127.0.0.1:0", "backends": [{{"name": "b", "address": "{ok}"}}, "#,
                    r#"{{"name": "b", "address": "{ok}"}}]}}"#
                ),
                ok = ok
            ),
        ),
        (
            "backend port 0",
            "/web",
            r#"{"address": "127.0.0.1:0", "backends": [{"name": "b", "address": "127.0.0.1:0"}]}"#.into(),
        ),
    ];
    for (what, target, body) in &cases {
        let response = call(admin, "PUT", target, Some(body)).expect(400);
        if what.starts_with("unknown") {
            let field = ["balanse", "colour", "wieght"].into_iter().find(|f| body.contains(f)).expect("a field");
            assert!(response.error().contains(field), "{what}: the error names the field: {response:?}");
        }
        assert_eq!(config_bytes(admin), before, "{what}: the running config changed");
        // POST is the same route.
        call(admin, "POST", target, Some(body)).expect(400);
    }
    get(admin, "/api").expect(404);
    assert!(!shuttle.stderr_lines().iter().any(|l| l.contains("service api listening")), "api never started");
    echo_once(web, b"still proxying");
}

#[test]
fn admin_put_rejects_a_backend_that_loops_to_a_service_listener() {
    let echo = echo();
    let port = free_port();
    let config = json!([{ "name": "web", "address": format!("127.0.0.1:{port}"),
        "backends": [{ "name": "b0", "address": echo.address() }] }]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);
    let looping = json!({ "address": format!("127.0.0.1:{port}") });
    put(admin, "/web/loop", &looping).expect(400);
    let body =
        json!({ "address": "127.0.0.1:0", "backends": [{ "name": "b", "address": format!("127.0.0.1:{port}") }] });
    put(admin, "/api", &body).expect(400);
    assert_eq!(config_bytes(admin), before);
}

#[test]
fn admin_delete_service_stops_its_listener_and_lets_open_connections_finish() {
    let echo = echo();
    let config = json!([service("web", vec![backend("b0", echo.address())]), service("api", vec![])]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let mut open = connect(web);
    round_trip(&mut open, b"before");

    let response = delete(admin, "/web").expect(200);
    assert_eq!(response.body, config_bytes(admin), "the DELETE answer is GET /_config");
    assert_eq!(response.json().as_array().map(Vec::len), Some(1));
    assert_eq!(response.json()[0]["name"], "api");
    assert!(refused_within(web, DEADLINE), "the listener of a deleted service is closed");
    round_trip(&mut open, b"after the delete");

    get(admin, "/web").expect(404);
    delete(admin, "/web").expect(404);
    delete(admin, "/nope").expect(404);
    delete(admin, "/_web").expect(400);
    assert_eq!(config_bytes(admin), response.body);
}

// ---------------------------------------------------------------------------
// PUT / POST / DELETE of backends
// ---------------------------------------------------------------------------

#[test]
fn admin_put_backend_adds_at_the_end_and_replaces_in_place() {
    let (one, two) = (named("one"), named("two"));
    let shuttle = Shuttle::start_with_config(&one_backend(one.address()), &[]);
    let admin = shuttle.admin_addr();

    let response = put(admin, "/web/b1", &json!({ "address": two.address(), "weight": 2 })).expect(200);
    assert_eq!(response.body, config_bytes(admin), "the PUT answer is GET /_config");
    let backends = &response.json()[0]["backends"];
    let b1 = json!({ "name": "b1", "address": two.address(), "check_address": "", "weight": 2, "max_connections": 0,
                     "send_proxy": "" });
    assert_eq!(backends[1], b1);
    assert_eq!(backends[0]["name"], "b0");

    // Replace b0 in place (order kept), with a name in the body equal to the URL's.
    let body = json!({ "name": "b0", "address": two.address(), "weight": 5 });
    let response = put(admin, "/web/b0", &body).expect(200);
    assert_eq!(response.body, config_bytes(admin));
    let backends = response.json()[0]["backends"].clone();
    let names: Vec<&str> = backends.as_array().expect("list").iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["b0", "b1"], "replaced in place");
    assert_eq!(backends[0]["weight"], 5);

    // All traffic now reaches two.
    for _ in 0..3 {
        let mut client = connect(shuttle.service_addr("web"));
        assert_eq!(read_line(&mut client), "two");
    }
    get(admin, "/web/b1").expect(200);
}

#[test]
fn admin_put_backend_bad_requests_get_400_or_404_and_change_nothing() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);
    let ok = echo.address();
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("bad JSON", "/web/b1", format!(r#"{{"address": "{ok}""#), 400),
        ("empty body", "/web/b1", String::new(), 400),
        ("unknown field", "/web/b1", format!(r#"{{"address": "{ok}", "wieght": 1}}"#), 400),
        ("negative weight", "/web/b1", format!(r#"{{"address": "{ok}", "weight": -1}}"#), 400),
        ("negative weight (replace)", "/web/b0", format!(r#"{{"address": "{ok}", "weight": -3}}"#), 400),
        ("fractional weight", "/web/b1", format!(r#"{{"address": "{ok}", "weight": 1.5}}"#), 400),
        ("name differs from URL", "/web/b1", format!(r#"{{"name": "b2", "address": "{ok}"}}"#), 400),
        ("missing address", "/web/b1", "{}".into(), 400),
        ("port 0", "/web/b1", r#"{"address": "127.0.0.1:0"}"#.into(), 400),
        ("reserved backend name", "/web/_b1", format!(r#"{{"address": "{ok}"}}"#), 400),
        ("reserved service name", "/_web/b1", format!(r#"{{"address": "{ok}"}}"#), 400),
        ("no such service", "/nope/b1", format!(r#"{{"address": "{ok}"}}"#), 404),
    ];
    for (what, target, body, status) in &cases {
        let response = call(admin, "PUT", target, Some(body));
        assert_eq!(response.status, *status, "{what}: {response:?}");
        if what.starts_with("unknown") {
            assert!(response.error().contains("wieght"), "{what}: the error names the field: {response:?}");
        }
        assert_eq!(config_bytes(admin), before, "{what}: the running config changed");
    }
    get(admin, "/web/b1").expect(404);
}

#[test]
fn admin_delete_backend_keeps_its_open_connection_and_404s() {
    let (one, two) = (named("one"), named("two"));
    let config = json!([service("web", vec![backend("b0", one.address()), backend("b1", two.address())])]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let mut open = connect(web);
    assert_eq!(read_line(&mut open), "one", "round robin starts at b0");
    round_trip(&mut open, b"before");

    let response = delete(admin, "/web/b0").expect(200);
    assert_eq!(response.body, config_bytes(admin), "the DELETE answer is GET /_config");
    assert_eq!(response.json()[0]["backends"].as_array().map(Vec::len), Some(1));
    round_trip(&mut open, b"the removed backend's connection keeps working");
    for _ in 0..2 {
        let mut client = connect(web);
        assert_eq!(read_line(&mut client), "two", "new connections go to the remaining backend");
    }
    round_trip(&mut open, b"still");

    delete(admin, "/web/b0").expect(404);
    delete(admin, "/nope/b1").expect(404);
    get(admin, "/web/b0").expect(404);
    delete(admin, "/web/_b1").expect(400);
    assert_eq!(config_bytes(admin), response.body);
}

#[test]
fn admin_replaced_backend_keeps_its_open_connection() {
    let (one, two) = (named("one"), named("two"));
    let shuttle = Shuttle::start_with_config(&one_backend(one.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let mut open = connect(web);
    assert_eq!(read_line(&mut open), "one");
    put(admin, "/web/b0", &json!({ "address": two.address() })).expect(200);
    round_trip(&mut open, b"the old backend's connection keeps working");
    let mut client = connect(web);
    assert_eq!(read_line(&mut client), "two");
    round_trip(&mut open, b"still");
}

// ---------------------------------------------------------------------------
// Replace semantics
// ---------------------------------------------------------------------------

#[test]
fn admin_backends_only_update_keeps_unchanged_backends_counters() {
    let (one, two, three) = (echo(), echo(), echo());
    let config = json!([service("web", vec![backend("b0", one.address()), backend("b1", two.address())])]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    for size in [100, 200, 300, 400] {
        echo_once(web, &vec![b'z'; size]);
    }
    wait_idle(admin, "web");
    let b0 = counters(&stats(admin, "/web/b0"));
    assert_eq!(b0, [2, 400, 400, 0, 0], "round robin: b0 took the 100 and 300 byte connections");
    // An address we hold: if the body's settings were applied, the PUT would fail with 409.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();

    // 1. ?backends_only (bare): the settings in the body are ignored.
    let body = json!({ "address": taken, "balance": "LC", "client_timeout": 7,
        "backends": [{ "name": "b0", "address": one.address() },
                     { "name": "b1", "address": two.address(), "weight": 2 },
                     { "name": "b2", "address": three.address() }] });
    let response = put(admin, "/web?backends_only", &body).expect(200);
    assert_eq!(response.body, config_bytes(admin), "the PUT answer is GET /_config");
    let config = response.json();
    assert_eq!(config[0]["address"], "127.0.0.1:0", "address untouched");
    assert_eq!((config[0]["balance"].clone(), config[0]["client_timeout"].clone()), (json!("RR"), json!(0)));
    let names: Vec<&str> =
        config[0]["backends"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["b0", "b1", "b2"]);
    assert_eq!(config[0]["backends"][1]["weight"], 2, "changed backend replaced");
    assert_eq!(counters(&stats(admin, "/web/b0")), b0, "unchanged backend keeps its counters");
    assert_eq!(counters(&stats(admin, "/web/b2"))[0], 0, "new backend starts fresh");
    assert_eq!(shuttle.service_addr("web"), web);
    echo_once(web, b"still listening");
    echo_once(web, b"still listening");
    wait_idle(admin, "web");
    let b0 = counters(&stats(admin, "/web/b0"));

    // 2. ?backends_only=1 among other parameters; b2 removed.
    let body = json!({ "address": taken, "balance": "LC",
        "backends": [{ "name": "b0", "address": one.address() },
                     { "name": "b1", "address": two.address(), "weight": 2 }] });
    let response = put(admin, "/web?x=1&backends_only=1", &body).expect(200);
    assert_eq!(response.body, config_bytes(admin));
    assert_eq!(response.json()[0]["balance"], "RR");
    assert_eq!(response.json()[0]["backends"].as_array().map(Vec::len), Some(2));
    get(admin, "/web/b2").expect(404);
    assert_eq!(counters(&stats(admin, "/web/b0")), b0, "unchanged backend keeps its counters");

    // 3. Implicitly: every setting equal to the running config (defaults spelled out or not).
    let mut body = config_json(admin)[0].clone();
    body["backends"] =
        json!([{ "name": "b0", "address": one.address() }, { "name": "b3", "address": three.address() }]);
    let response = put(admin, "/web", &body).expect(200);
    assert_eq!(response.body, config_bytes(admin));
    assert_eq!(counters(&stats(admin, "/web/b0")), b0, "unchanged backend keeps its counters");
    get(admin, "/web/b1").expect(404);
    let body = json!({ "address": "127.0.0.1:0",
        "backends": [{ "name": "b0", "address": one.address(), "weight": 1 },
                     { "name": "b3", "address": three.address() }] });
    put(admin, "/web", &body).expect(200);
    assert_eq!(counters(&stats(admin, "/web/b0")), b0, "unchanged backend keeps its counters");
    assert_eq!(shuttle.service_addr("web"), web);
    echo_once(web, b"still listening");
}

#[test]
fn admin_settings_change_keeps_the_listener_and_unchanged_backends_counters() {
    let echo = echo();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let config =
        json!([{ "name": "web", "address": address, "backends": [{ "name": "b0", "address": echo.address() }] }]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    assert_eq!(web.port(), port);

    let stop = Arc::new(AtomicBool::new(false));
    let (refused, failed, done) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, refused, failed, done) = (stop.clone(), refused.clone(), failed.clone(), done.clone());
        thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match try_connect(web) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        errors.push(format!("connect: {e}"));
                    }
                    Ok(mut stream) => {
                        let mut reply = [0u8; 4];
                        match stream.write_all(b"ping").and_then(|()| stream.read_exact(&mut reply)) {
                            Ok(()) if &reply == b"ping" => {
                                done.fetch_add(1, Ordering::SeqCst);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors.push(format!("round trip: {other:?} {reply:?}"));
                            }
                        }
                    }
                }
            }
            errors
        })
    };
    assert!(wait_until(DEADLINE, || done.load(Ordering::SeqCst) >= 5), "the client loop gets going");
    for i in 0..20 {
        let body = json!({ "address": address,
            "balance": if i % 2 == 0 { "LC" } else { "RR" },
            "client_timeout": 30 + i, "connect_timeout": 1 + i % 3,
            "backends": [{ "name": "b0", "address": echo.address() }] });
        let response = put(admin, "/web", &body).expect(200);
        assert_eq!(response.body, config_bytes(admin), "the PUT answer is GET /_config");
        assert_eq!(response.json()[0]["client_timeout"], 30 + i, "the settings were applied");
        thread::sleep(Duration::from_millis(20));
    }
    let before_stop = done.load(Ordering::SeqCst);
    assert!(wait_until(DEADLINE, || done.load(Ordering::SeqCst) >= before_stop + 5), "the client loop goes on");
    stop.store(true, Ordering::SeqCst);
    let errors = client.join().expect("client thread");
    let (refused, failed, done) =
        (refused.load(Ordering::SeqCst), failed.load(Ordering::SeqCst), done.load(Ordering::SeqCst));
    assert_eq!(refused, 0, "connections refused during 20 same-address replacements ({done} succeeded)");
    assert_eq!(failed, 0, "failed round trips: {errors:?}");
    // Every round trip went through b0, whose counters survived the 20 changes.
    wait_idle(admin, "web");
    let b0 = stats(admin, "/web/b0");
    assert_eq!(b0["connections"], done as u64, "b0 kept its counters: {b0}");
    assert_eq!(b0["sent"], 4 * done as u64, "{b0}");
}

#[test]
fn admin_conflict_409_leaves_the_old_service_proxying() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let mut open = connect(web);
    round_trip(&mut open, b"before");
    let before = config_bytes(admin);
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind an address shuttle cannot have");
    let taken = taken.local_addr().expect("addr").to_string();

    // Move web to the taken address, with a settings change too.
    let body = json!({ "address": taken, "balance": "LC", "backends": [{ "name": "b0", "address": echo.address() }] });
    let response = put(admin, "/web", &body).expect(409);
    assert!(!response.error().is_empty());
    assert_eq!(config_bytes(admin), before, "a 409 changes nothing");
    assert_eq!(stats(admin, "/web")["balance"], "RR");
    echo_once(web, b"the old listener still proxies");
    round_trip(&mut open, b"and the open connection too");

    // A new service on the taken address.
    put(admin, "/api", &service_body(&taken, &echo.address())).expect(409);
    get(admin, "/api").expect(404);
    assert_eq!(config_bytes(admin), before);
    echo_once(web, b"still");
}

// ---------------------------------------------------------------------------
// Methods, limits, malformed requests
// ---------------------------------------------------------------------------

#[test]
fn admin_unknown_methods_get_405_with_allow() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);
    let cases = [
        ("PUT", "/_config", &["GET"][..]),
        ("POST", "/_config", &["GET"][..]),
        ("DELETE", "/_config", &["GET"][..]),
        ("PUT", "/", &["GET"][..]),
        ("DELETE", "/", &["GET"][..]),
        ("PATCH", "/", &["GET"][..]),
        ("PATCH", "/_config", &["GET"][..]),
        ("PATCH", "/_info", &["GET"][..]),
        ("PATCH", "/_metrics", &["GET"][..]),
        ("BREW", "/web", &["GET", "PUT", "POST", "PATCH", "DELETE"][..]),
        ("OPTIONS", "/web/b0", &["GET", "PUT", "POST", "PATCH", "DELETE"][..]),
    ];
    for (method, target, allowed) in cases {
        let body = (method != "DELETE").then_some("{}");
        let response = call(admin, method, target, body).expect(405);
        let allow = response.header("allow").unwrap_or_else(|| panic!("{method} {target}: no Allow: {response:?}"));
        let listed: Vec<&str> = allow.split(',').map(str::trim).collect();
        for m in allowed {
            assert!(listed.contains(m), "{method} {target}: Allow {allow:?} lacks {m}");
        }
        assert!(!listed.contains(&method), "{method} {target}: Allow {allow:?} lists the refused method");
    }
    assert_eq!(config_bytes(admin), before);
}

#[test]
fn admin_body_over_1mib_is_413_and_exactly_1mib_is_not() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);
    let body = service_body("127.0.0.1:0", &echo.address());

    // Announced too big: answered from the head alone.
    let mut http = Http::tcp(admin);
    http.send(format!("PUT /api HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n", MIB + 1).as_bytes());
    http.response().expect(413);
    // With `Expect: 100-continue` (as curl sends for a big upload): a 413 instead of the 100.
    let mut http = Http::tcp(admin);
    http.send(
        format!("PUT /api HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", MIB + 1)
            .as_bytes(),
    );
    http.any_response().expect(413);

    // Too big, sent in full.
    call(admin, "PUT", "/api", Some(std::str::from_utf8(&padded(&body, MIB + 1)).unwrap())).expect(413);
    // Too big, chunked: the limit is on the decoded body.
    let big = padded(&body, MIB + 1);
    let mut http = Http::tcp(admin);
    http.send(b"PUT /api HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n");
    for piece in big.chunks(64 * 1024) {
        http.send(format!("{:x}\r\n", piece.len()).as_bytes());
        http.send(piece);
        http.send(b"\r\n");
    }
    http.send(b"0\r\n\r\n");
    http.response().expect(413);
    assert_eq!(config_bytes(admin), before, "a 413 changes nothing");
    get(admin, "/api").expect(404);

    // Exactly 1 MiB is accepted, with a length and chunked.
    let exact = padded(&body, MIB);
    let response = call(admin, "PUT", "/api", Some(std::str::from_utf8(&exact).unwrap())).expect(200);
    assert_eq!(response.body, config_bytes(admin));
    let mut http = Http::tcp(admin);
    http.send(b"PUT /api2 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n");
    for piece in exact.chunks(100_000) {
        http.send(format!("{:x}\r\n", piece.len()).as_bytes());
        http.send(piece);
        http.send(b"\r\n");
    }
    http.send(b"0\r\n\r\n");
    http.response().expect(200);
    get(admin, "/api2").expect(200);
}

#[test]
fn admin_head_over_16kib_is_431() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();

    let head_of = |len: usize| {
        let fixed = "GET /web HTTP/1.1\r\nHost: localhost\r\nX-Pad: \r\n\r\n".len();
        format!("GET /web HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n", "a".repeat(len - fixed))
    };
    let mut http = Http::tcp(admin);
    http.send(head_of(HEAD_LIMIT + 1).as_bytes());
    http.response().expect(431);

    let mut http = Http::tcp(admin);
    http.send(head_of(64 * 1024).as_bytes());
    http.response().expect(431);

    // A head of exactly 16 KiB is within the limit.
    let mut http = Http::tcp(admin);
    http.send(head_of(HEAD_LIMIT).as_bytes());
    assert_eq!(http.response().expect(200).json()["name"], "web");
}

#[test]
fn admin_garbage_gets_400_and_disturbs_nothing() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let mut open = connect(web);
    round_trip(&mut open, b"before");
    let mut idle_admin = Http::tcp(admin);
    idle_admin.request("GET", "/", None).expect(200);
    let before = config_bytes(admin);

    let mut binary: Vec<u8> = (0..2048u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    binary[0] = 0;
    binary.retain(|&b| b != b'\n');
    binary.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<&[u8]> = vec![
        b"\x00\x01\x02\x03garbage\r\n\r\n",
        b"HELLO\r\n\r\n",
        b"GET / HTTP/1.1\r\nThis is not a header\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /%zz HTTP/1.1\r\n\r\n",
        b"GET / SMTP/1.0\r\n\r\n",
        b"PUT /web HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        &binary,
    ];
    for bytes in cases {
        let mut http = Http::tcp(admin);
        http.send(bytes);
        let response = http.response();
        assert_eq!(response.status, 400, "{:?}: {response:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(40)]));
        assert!(http.closed_within(DEADLINE).is_ok(), "the connection is closed after a malformed request");
    }
    assert_eq!(config_bytes(admin), before);
    idle_admin.request("GET", "/web", None).expect(200);
    round_trip(&mut open, b"after");
    echo_once(web, b"new connection");
}

#[test]
fn admin_garbage_without_a_line_end_gets_400_promptly() {
    // A TLS ClientHello sent to the plain-HTTP admin port: no CRLF ever comes,
    // but the first byte already cannot start a request.
    let shuttle = Shuttle::start(&[]);
    let admin = shuttle.admin_addr();
    let mut http = Http::tcp(admin);
    http.conn.set_read_timeout(Duration::from_secs(3));
    let started = Instant::now();
    http.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x8a\x11\x00\x42");
    let mut first = [0u8; 12];
    let got = http.conn.read(&mut first);
    let elapsed = started.elapsed();
    match got {
        Ok(n) if n > 0 => assert!(
            first[..n].starts_with(b"HTTP/1.1 400"),
            "expected a 400, got {:?}",
            String::from_utf8_lossy(&first[..n])
        ),
        other => panic!("no 400 for garbage without a line end within {elapsed:?}: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// HTTP framing that curl uses: chunked, Expect, keep-alive
// ---------------------------------------------------------------------------

#[test]
fn admin_chunked_request_body_is_accepted() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let body = service_body("127.0.0.1:0", &echo.address()).to_string();
    let (a, rest) = body.as_bytes().split_at(7);
    let (b, c) = rest.split_at(rest.len() / 2);

    let mut http = Http::tcp(admin);
    http.send(b"PUT /api HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (i, piece) in [a, b, c].into_iter().enumerate() {
        // Pieces in separate writes, one with a chunk extension.
        let size = if i == 1 { format!("{:X};ext=1\r\n", piece.len()) } else { format!("{:x}\r\n", piece.len()) };
        http.send(size.as_bytes());
        thread::sleep(Duration::from_millis(30));
        http.send(piece);
        http.send(b"\r\n");
        thread::sleep(Duration::from_millis(30));
    }
    http.send(b"0\r\n\r\n");
    let response = http.response().expect(200);
    assert_eq!(response.body, config_bytes(admin));
    echo_once(shuttle.service_addr("api"), b"chunked");

    // A backend, chunked, on the same keep-alive connection.
    let body = json!({ "address": echo.address(), "weight": 4 }).to_string();
    http.send(b"PUT /api/b1 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n");
    http.send(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes());
    http.response().expect(200);
    assert_eq!(stats(admin, "/api/b1")["weight"], 4);
}

#[test]
fn admin_expect_100_continue_is_answered_before_the_body() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let body = service_body("127.0.0.1:0", &echo.address()).to_string();

    // With a Content-Length.
    let mut http = Http::tcp(admin);
    let started = Instant::now();
    http.send(
        format!(
            "PUT /api HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let interim = http.any_response();
    assert_eq!(interim.status, 100, "{interim:?}");
    assert!(started.elapsed() < Duration::from_millis(900), "the 100 took {:?}", started.elapsed());
    http.send(body.as_bytes());
    let response = http.response().expect(200);
    assert_eq!(response.body, config_bytes(admin));

    // Chunked, as `curl -T -` sends it, on the same connection.
    http.send(b"PUT /api2 HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n");
    let interim = http.any_response();
    assert_eq!(interim.status, 100, "{interim:?}");
    http.send(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes());
    http.response().expect(200);
    get(admin, "/api2").expect(200);
}

#[test]
fn admin_keep_alive_carries_several_requests() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let mut http = Http::tcp(admin);

    let first = http.request("GET", "/", None).expect(200);
    assert!(!first.closes(), "HTTP/1.1 keeps the connection: {first:?}");
    let body = service_body("127.0.0.1:0", &echo.address()).to_string();
    let put = http.request("PUT", "/api", Some(body.as_bytes())).expect(200);
    assert_eq!(http.request("GET", "/_config", None).expect(200).body, put.body);
    http.request("GET", "/nope", None).expect(404);
    http.request("PATCH", "/api", Some(b"{}")).expect(200);
    http.request("BREW", "/api", Some(b"{}")).expect(405);
    http.request("PUT", "/api", Some(b"{nope")).expect(400);
    http.request("DELETE", "/api", None).expect(200);

    // Two requests pipelined in one write: two responses, in order.
    let mut both = request_bytes("GET", "/web", None, &[]);
    both.extend(request_bytes("GET", "/_config", None, &[]));
    http.send(&both);
    assert_eq!(http.response().expect(200).json()["name"], "web");
    assert_eq!(http.response().expect(200).body, config_bytes(admin));

    // Connection: close ends it after the response.
    http.send(&request_bytes("GET", "/", None, &["Connection: close"]));
    let last = http.response().expect(200);
    assert!(last.closes(), "{last:?}");
    assert!(http.closed_within(DEADLINE).is_ok(), "closed after Connection: close");

    // HTTP/1.0 without keep-alive closes too.
    let mut http = Http::tcp(admin);
    http.send(b"GET /web HTTP/1.0\r\n\r\n");
    http.response().expect(200);
    assert!(http.closed_within(DEADLINE).is_ok(), "closed after an HTTP/1.0 request");
}

// ---------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------

#[test]
fn admin_stalled_requests_delay_nobody_and_are_dropped_after_10s() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");

    // Half a head; a whole head and half its body; and one that dribbles a byte every 300 ms.
    let started = Instant::now();
    let mut half_head = Http::tcp(admin);
    half_head.send(b"PUT /web HTTP/1.1\r\nHost: localhost\r\nContent-Le");
    let mut half_body = Http::tcp(admin);
    half_body.send(b"PUT /api HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"address\": ");
    let mut dribble = Http::tcp(admin);
    dribble.send(b"GET / HTTP/1.1\r\nX-Slow: ");
    let Conn::Tcp(dribble_socket) = &dribble.conn else { unreachable!() };
    let mut writer = dribble_socket.try_clone().expect("clone");
    let stop = Arc::new(AtomicBool::new(false));
    let dribbler = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) && writer.write_all(b"a").is_ok() {
                thread::sleep(Duration::from_millis(300));
            }
        })
    };
    thread::sleep(Duration::from_millis(100));

    // Other admin clients and proxying go on at full speed.
    for _ in 0..5 {
        let t = Instant::now();
        get(admin, "/").expect(200);
        assert!(t.elapsed() < Duration::from_secs(1), "an admin GET took {:?} behind stalled clients", t.elapsed());
        let t = echo_once(web, b"proxied");
        assert!(t < Duration::from_secs(1), "a proxied round trip took {t:?} behind stalled admin clients");
    }
    let t = Instant::now();
    put(admin, "/other", &service_body("127.0.0.1:0", &echo.address())).expect(200);
    assert!(t.elapsed() < Duration::from_secs(1), "an admin PUT took {:?}", t.elapsed());

    // Each stalled request is dropped after about 10 s.
    for (what, http) in
        [("half a head", &mut half_head), ("half a body", &mut half_body), ("a dribbled head", &mut dribble)]
    {
        let left = Duration::from_secs(20).saturating_sub(started.elapsed());
        match http.closed_within(left) {
            Ok(_) => {
                let at = started.elapsed();
                assert!(at >= Duration::from_secs(9), "{what}: dropped after only {at:?}");
            }
            Err(e) => panic!("{what}: not dropped within 20 s: {e}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    dribbler.join().expect("dribbler");
    get(admin, "/api").expect(404);
    echo_once(web, b"after");
}

// ---------------------------------------------------------------------------
// Unix socket
// ---------------------------------------------------------------------------

#[test]
fn admin_over_a_unix_socket() {
    let echo = echo();
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a stale socket"));
    assert!(socket.exists());
    let config = write_file(dir.path(), "config.json", one_backend(echo.address()).to_string().as_bytes());
    let mut shuttle = Shuttle::start(&["-config", config.to_str().unwrap(), "-http", socket.to_str().unwrap()]);
    shuttle.wait_for_line(&format!("admin listening on {}", socket.display()));

    let mut http = Http::unix(&socket);
    let list = http.request("GET", "/", None).expect(200).json();
    assert_eq!(list[0]["name"], "web");
    let body = service_body("127.0.0.1:0", &echo.address()).to_string();
    let put = http.request("PUT", "/api", Some(body.as_bytes())).expect(200);
    assert_eq!(http.request("GET", "/_config", None).expect(200).body, put.body);
    http.request("GET", "/nope", None).expect(404);
    echo_once(shuttle.service_addr("api"), b"added over a unix socket");

    // curl, as a user would.
    let socket_arg = socket.to_str().unwrap();
    let got = curl(&["--unix-socket", socket_arg, "http://localhost/_config"], b"");
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, put.body);
    let got = curl(&["--unix-socket", socket_arg, "-X", "DELETE", "http://localhost/api"], b"");
    assert_eq!(got.status, 200, "{got:?}");
    let got =
        curl(&["--unix-socket", socket_arg, "-X", "PUT", "--data-binary", "@-", "http://x/api2"], body.as_bytes());
    assert_eq!(got.status, 200, "{got:?}");
    let list = Http::unix(&socket).request("GET", "/", None).expect(200).json();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["api2", "web"]);

    // The socket file is removed on exit.
    shuttle.signal(libc::SIGTERM);
    assert!(shuttle.wait_exit(DEADLINE).is_some_and(|s| s.success()), "exit 0 on SIGTERM");
    assert!(!socket.exists(), "the socket file is removed on exit");
}

// ---------------------------------------------------------------------------
// curl as the reference client
// ---------------------------------------------------------------------------

#[test]
fn admin_curl_put_get_delete_as_a_user_would() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let url = |path: &str| format!("http://{admin}{path}");
    let body = service_body("127.0.0.1:0", &echo.address()).to_string();

    let put = curl(&["-X", "PUT", "--data-binary", "@-", &url("/api")], body.as_bytes());
    assert_eq!(put.status, 200, "{put:?}");
    let config = curl(&[&url("/_config")], b"");
    assert_eq!((config.status, &config.body), (200, &put.body), "the PUT answer is GET /_config");
    echo_once(shuttle.service_addr("api"), b"added by curl");

    // `curl -d` (a form content type, the usual shorthand) for a backend.
    let backend = json!({ "address": echo.address(), "weight": 3 }).to_string();
    let post = curl(&["-d", &backend, &url("/api/b1")], b"");
    assert_eq!(post.status, 200, "{post:?}");
    assert_eq!(stats(admin, "/api/b1")["weight"], 3);

    let stats = curl(&[&url("/api")], b"");
    assert_eq!(stats.status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&stats.body).expect("JSON")["name"], "api");

    let bad =
        curl(&["-X", "PUT", "--data-binary", "@-", &url("/api")], br#"{"address": "127.0.0.1:0", "balance": "XX"}"#);
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(serde_json::from_slice::<Value>(&bad.body).expect("JSON")["error"].is_string());

    let gone = curl(&["-X", "DELETE", &url("/api")], b"");
    assert_eq!(gone.status, 200, "{gone:?}");
    assert_eq!(gone.body, config_bytes(admin));
    assert_eq!(curl(&["-X", "DELETE", &url("/api")], b"").status, 404);
    let not_allowed = curl(&["-i", "-X", "PUT", "--data-binary", "[]", &url("/_config")], b"");
    assert_eq!(not_allowed.status, 405);
    let head = String::from_utf8_lossy(&not_allowed.body).to_ascii_lowercase();
    assert!(head.contains("\nallow: "), "{head}");
}

#[test]
fn admin_curl_chunked_upload_with_expect_gets_a_prompt_100() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let body = service_body("127.0.0.1:0", &echo.address()).to_string();

    // curl waits 1 s for the 100 before sending the body anyway: the whole run must be well under that.
    let mut runs = Vec::new();
    for attempt in 0..2 {
        let url = format!("http://{admin}/api{attempt}");
        let got = curl(&["-v", "-T", "-", &url], body.as_bytes());
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.body, config_bytes(admin));
        let sent = got.stderr.to_ascii_lowercase();
        assert!(sent.contains("> transfer-encoding: chunked"), "curl -T - sends chunked: {}", got.stderr);
        assert!(sent.contains("> expect: 100-continue"), "curl -T - sends Expect: {}", got.stderr);
        assert!(sent.contains("< http/1.1 100"), "no 100 Continue: {}", got.stderr);
        runs.push(got.elapsed);
        if got.elapsed < Duration::from_millis(900) {
            break;
        }
    }
    assert!(runs.iter().any(|t| *t < Duration::from_millis(900)), "curl -T - took {runs:?} (waiting for the 100?)");
}
