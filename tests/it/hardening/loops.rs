//! Loops through another spelling of an address: a v4-mapped IPv6 backend
//! reaching a service's own listener or the admin API, and a new listener
//! that another service already uses as a backend.

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::one_error_line;
use crate::admin::{config_bytes, put};
use crate::support::{connect, echo, one_backend, refusing, round_trip, tempdir, write_config, Shuttle};

/// A service body at `address` with one backend `b0` at `backend`.
fn body(address: &str, backend: &str) -> Value {
    json!({ "address": address, "backends": [{ "name": "b0", "address": backend }] })
}

/// Proxying through `web` still works.
#[track_caller]
fn web_round_trips(web: SocketAddr, what: &str) {
    let mut client = connect(web);
    round_trip(&mut client, format!("after {what}").as_bytes());
}

/// `PUT /{name}` with `body` is a 400 whose message has every word of `words`,
/// and changes nothing; then web still proxies.
#[track_caller]
fn refused(admin: SocketAddr, web: SocketAddr, name: &str, body: &Value, words: &[&str]) {
    let before = config_bytes(admin);
    let response = put(admin, &format!("/{name}"), body);
    assert_eq!(response.status, 400, "PUT /{name} {body} must be refused: {response:?}");
    let error = response.error();
    for word in words {
        assert!(error.contains(word), "the error for {body} does not mention {word:?}: {error}");
    }
    assert_eq!(config_bytes(admin), before, "a refused PUT /{name} {body} changed the config");
    web_round_trips(web, &format!("PUT /{name} {body}"));
}

#[test]
fn v4_mapped_backend_reaching_its_own_listener_is_a_loop() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let port = web.port();

    let own = format!("127.0.0.1:{port}");
    let mapped = format!("[::ffff:127.0.0.1]:{port}");
    // A new service proxying into web's listener.
    refused(admin, web, "api", &body("127.0.0.1:0", &mapped), &["loop"]);
    // Web itself, at its own address, proxying into itself.
    refused(admin, web, "web", &body(&own, &mapped), &["loop"]);
    // The plain spelling, for comparison.
    refused(admin, web, "web", &body(&own, &own), &["loop"]);
}

#[test]
fn backend_at_the_admin_api_is_refused_in_either_spelling() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let own = web.to_string();
    let admin_port = admin.port();

    let mapped = format!("[::ffff:127.0.0.1]:{admin_port}");
    // A new service, then web at its own address.
    refused(admin, web, "api", &body("127.0.0.1:0", &mapped), &["admin API"]);
    refused(admin, web, "web", &body(&own, &mapped), &["admin API"]);
    refused(admin, web, "web", &body(&own, &format!("127.0.0.1:{admin_port}")), &["admin API"]);
}

#[test]
fn a_listener_that_another_service_uses_as_a_backend_is_refused() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    // A port nobody listens on, held by this test so no other test can take it.
    let port = refusing().port();

    let response = put(admin, "/front", &body("127.0.0.1:0", &format!("127.0.0.1:{port}")));
    assert_eq!(response.status, 200, "a backend that refuses is allowed: {response:?}");
    // A service listening there would be front's backend: front would proxy into it.
    refused(admin, web, "back", &body(&format!("127.0.0.1:{port}"), &echo.address()), &["loop"]);
    refused(admin, web, "back", &body(&format!("0.0.0.0:{port}"), &echo.address()), &["loop"]);
    refused(admin, web, "back", &body(&format!("[::ffff:127.0.0.1]:{port}"), &echo.address()), &["loop"]);

    // The same with the backend in the mapped spelling.
    let port = refusing().port();
    let response = put(admin, "/front2", &body("127.0.0.1:0", &format!("[::ffff:127.0.0.1]:{port}")));
    assert_eq!(response.status, 200, "{response:?}");
    refused(admin, web, "back", &body(&format!("127.0.0.1:{port}"), &echo.address()), &["loop"]);
    refused(admin, web, "back", &body(&format!("0.0.0.0:{port}"), &echo.address()), &["loop"]);
}

#[test]
fn v4_mapped_loop_in_a_config_file_fails_start_up() {
    let dir = tempdir();
    // A port held (never listening) by this test: the loop must be found
    // without binding it. Binding it would fail with "in use", which is not the point.
    let port = refusing().port();
    let config = json!([{
        "name": "web",
        "address": format!("127.0.0.1:{port}"),
        "backends": [{ "name": "b0", "address": format!("[::ffff:127.0.0.1]:{port}") }],
    }]);
    let path = write_config(dir.path(), &config);
    let (status, lines) = Shuttle::start_expect_failure(&["-config", path.to_str().unwrap()]);
    let line = one_error_line(status, &lines);
    assert!(line.contains("loop"), "the error does not say it would loop: {line}");
    assert!(line.contains(path.to_str().unwrap()), "the error does not name the file: {line}");
}
