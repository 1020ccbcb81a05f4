//! Who may use the admin API: no cross-site requests from a web page, no
//! DNS-rebound host names over TCP, and a bearer token when one is configured.

use std::net::SocketAddr;

use serde_json::json;

use super::{one_error_line, raw_request, request_with};
use crate::admin::{config_bytes, curl, get, Http};
use crate::support::{
    connect, echo, is_root, one_backend, round_trip, tempdir, wait_until, write_file, Shuttle, DEADLINE,
};

/// A valid service body for `POST /api`.
fn api_body(backend: &str) -> Vec<u8> {
    json!({ "address": "127.0.0.1:0", "backends": [{ "name": "b0", "address": backend }] }).to_string().into_bytes()
}

#[test]
fn cross_site_requests_are_refused_and_change_nothing() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);
    let body = api_body(&echo.address());

    // What a page can send without a preflight: a POST with a "simple" content type.
    let page = ["Origin: http://evil.example", "Content-Type: text/plain"];
    let response = request_with(admin, "POST", "/api", Some(&body), &page);
    assert_eq!(response.status, 403, "a cross-site POST must be refused: {response:?}");
    assert!(!response.error().is_empty());
    assert_eq!(config_bytes(admin), before, "a refused request created a service");
    let response =
        request_with(admin, "POST", "/api", Some(&body), &["Sec-Fetch-Site: cross-site", "Content-Type: text/plain"]);
    assert_eq!(response.status, 403, "Sec-Fetch-Site: cross-site must be refused: {response:?}");
    assert_eq!(config_bytes(admin), before, "a refused request created a service");
    // Reads too: a page must not read the config either.
    let response = request_with(admin, "GET", "/_config", None, &["Origin: http://evil.example"]);
    assert_eq!(response.status, 403, "{response:?}");

    // What a browser marks as typed by the user, or sent by the same origin, is served.
    request_with(admin, "POST", "/api", Some(&body), &["Sec-Fetch-Site: same-origin"]).expect(200);
    get(admin, "/api").expect(200);
    request_with(admin, "GET", "/_config", None, &["Sec-Fetch-Site: none"]).expect(200);
    let mut client = connect(shuttle.service_addr("web"));
    round_trip(&mut client, b"proxying undisturbed");
}

/// `GET /` with exactly the `Host` field `host`.
#[track_caller]
fn get_root_as(admin: SocketAddr, host: &str) -> u16 {
    let response = raw_request(admin, "GET", "/", &[&format!("Host: {host}")], None);
    if response.status == 403 {
        assert!(!response.error().is_empty());
    }
    response.status
}

#[test]
fn rebound_host_names_are_refused_over_tcp_but_not_on_a_unix_socket() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let port = admin.port();

    for host in ["evil.example", "evil.example:9090", "localhost.evil.example", "shuttle"] {
        assert_eq!(get_root_as(admin, host), 403, "Host: {host}");
    }
    let refused_put = raw_request(admin, "PUT", "/api", &["Host: evil.example"], Some(&api_body(&echo.address())));
    assert_eq!(refused_put.status, 403, "{refused_put:?}");
    get(admin, "/api").expect(404);

    for host in
        ["localhost".to_string(), format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")]
    {
        assert_eq!(get_root_as(admin, &host), 200, "Host: {host}");
    }
    // curl, as a user would run it, is unchanged.
    let got = curl(&[&format!("http://{admin}/_config")], b"");
    assert_eq!(got.status, 200, "{got:?}");
    let got = curl(&["-X", "PUT", "--data-binary", "@-", &format!("http://{admin}/api")], &api_body(&echo.address()));
    assert_eq!(got.status, 200, "{got:?}");
    let got = curl(&[&format!("http://localhost:{port}/api")], b"");
    assert_eq!(got.status, 200, "{got:?}");

    // A unix socket is out of a browser's reach: any Host is served there.
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    let config = write_file(dir.path(), "config.json", one_backend(echo.address()).to_string().as_bytes());
    let unix = Shuttle::start(&["-config", config.to_str().unwrap(), "-http", socket.to_str().unwrap()]);
    unix.wait_for_line(&format!("admin listening on {}", socket.display()));
    let mut http = Http::unix(&socket);
    http.send(b"GET /_config HTTP/1.1\r\nHost: shuttle\r\n\r\n");
    http.response().expect(200);
    let got = curl(&["--unix-socket", socket.to_str().unwrap(), "http://shuttle/_config"], b"");
    assert_eq!(got.status, 200, "{got:?}");
}

#[test]
fn admin_host_flag_adds_a_name_the_api_answers_for() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &["-admin-host", "shuttle.internal"]);
    let admin = shuttle.admin_addr();
    assert_eq!(get_root_as(admin, "shuttle.internal"), 200);
    assert_eq!(get_root_as(admin, &format!("shuttle.internal:{}", admin.port())), 200);
    assert_eq!(get_root_as(admin, "localhost"), 200);
    assert_eq!(get_root_as(admin, "evil.example"), 403, "other names are still refused");
}

#[test]
fn admin_token_is_required_when_configured() {
    let echo = echo();
    let dir = tempdir();
    let token = write_file(dir.path(), "token", b"s3cret-token\nthe second line is not part of it\n");
    let shuttle =
        Shuttle::start_with_config(&one_backend(echo.address()), &["-admin-token-file", token.to_str().unwrap()]);
    let admin = shuttle.admin_addr();

    for (what, fields) in [
        ("no token", vec![]),
        ("a wrong token", vec!["Authorization: Bearer wrong"]),
        ("a prefix of the token", vec!["Authorization: Bearer s3cret"]),
        ("another scheme", vec!["Authorization: Basic s3cret-token"]),
    ] {
        let response = request_with(admin, "GET", "/_config", None, &fields);
        assert_eq!(response.status, 401, "{what}: {response:?}");
        let challenge = response.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{what}: no WWW-Authenticate: Bearer: {response:?}");
        assert!(!response.error().is_empty(), "{what}: {response:?}");
    }
    let body = api_body(&echo.address());
    request_with(admin, "PUT", "/api", Some(&body), &[]).expect(401);
    get(admin, "/api").expect(401);

    let right = ["Authorization: Bearer s3cret-token"];
    request_with(admin, "GET", "/_config", None, &right).expect(200);
    request_with(admin, "PUT", "/api", Some(&body), &right).expect(200);
    request_with(admin, "GET", "/api", None, &right).expect(200);
    let got = curl(&["-H", "Authorization: Bearer s3cret-token", &format!("http://{admin}/api")], b"");
    assert_eq!(got.status, 200, "{got:?}");
    // The refusals are logged.
    assert!(
        wait_until(DEADLINE, || shuttle.stderr_lines().iter().any(|l| l.contains("refused"))),
        "no log line about a refused request"
    );
}

#[test]
fn empty_admin_token_file_fails_start_up() {
    let dir = tempdir();
    for (name, text) in [("empty", &b""[..]), ("blank", &b"\n\n"[..])] {
        let token = write_file(dir.path(), name, text);
        let (status, lines) = Shuttle::start_expect_failure(&["-admin-token-file", token.to_str().unwrap()]);
        let line = one_error_line(status, &lines);
        assert!(line.contains(token.to_str().unwrap()), "the error does not name the token file: {line}");
    }
}

#[test]
fn public_admin_address_without_a_token_logs_a_warning() {
    // As root, a public admin API needs -user (reference §1).
    let public = if is_root() {
        Shuttle::start(&["-http", "0.0.0.0:0", "-user", "nobody"])
    } else {
        Shuttle::start(&["-http", "0.0.0.0:0"])
    };
    public.admin_addr();
    assert!(
        public.stderr_lines().iter().any(|l| l.contains("-admin-token-file")),
        "no warning about a reachable admin API without a token: {:#?}",
        public.stderr_lines()
    );

    let local = Shuttle::start(&["-http", "127.0.0.1:0"]);
    local.admin_addr();
    assert!(
        !local.stderr_lines().iter().any(|l| l.contains("-admin-token-file")),
        "a loopback admin API needs no warning: {:#?}",
        local.stderr_lines()
    );
}
