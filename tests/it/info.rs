//! `GET /_info` (reference §5.1): version, build, process and what it serves
//! now, summed over the workers; read-only, and `_info` is no service name.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::admin::{call, config_bytes, get, put};
use crate::support::{
    backend, connect, echo, round_trip, service, tempdir, test_workers, wait_until, write_config, Shuttle, DEADLINE,
};

/// Seconds since 1970 of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SSZ`.
fn epoch_seconds(text: &str) -> i64 {
    let b = text.as_bytes();
    assert!(
        b.len() == 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[19] == b'Z',
        "not RFC 3339 UTC: {text}"
    );
    let n = |range: std::ops::Range<usize>| -> i64 { text[range].parse().unwrap_or_else(|e| panic!("{text}: {e}")) };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant), written independently of shuttle's own.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

fn get_info(admin: std::net::SocketAddr) -> Value {
    get(admin, "/_info").expect(200).json()
}

#[test]
fn info_shows_the_build_the_process_and_what_it_serves() {
    let echo = echo();
    let before = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64;
    let config = json!([
        service("web", vec![backend("a", echo.address()), backend("b", echo.address())]),
        service("api", vec![backend("c", echo.address())]),
        service("empty", vec![]),
    ]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    let info = get_info(admin);
    let keys: Vec<&str> = info.as_object().expect("an object").keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    let mut expected =
        ["version", "commit", "pid", "started", "uptime_seconds", "workers", "services", "backends", "active", "flows"];
    expected.sort();
    assert_eq!(sorted, expected, "{info}");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["pid"], json!(shuttle.pid()));
    assert_eq!(info["workers"], json!(test_workers()));
    assert_eq!((info["services"].clone(), info["backends"].clone()), (json!(3), json!(3)), "{info}");
    assert_eq!((info["active"].clone(), info["flows"].clone()), (json!(0), json!(0)), "{info}");
    match &info["commit"] {
        Value::Null => {}
        Value::String(c) => assert!(!c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{c}"),
        other => panic!("commit is neither null nor a string: {other}"),
    }
    let started = epoch_seconds(info["started"].as_str().expect("started is a string"));
    let after = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64;
    assert!((before - 1..=after).contains(&started), "started {started} not within [{before}, {after}]");
    let uptime = info["uptime_seconds"].as_u64().expect("uptime is a whole number");
    assert!(uptime <= (after - before) as u64 + 1, "uptime {uptime}");

    // Open connections count over every worker, and changes show at once.
    let web = shuttle.service_addr("web");
    let mut clients: Vec<_> = (0..3).map(|_| connect(web)).collect();
    for client in &mut clients {
        round_trip(client, b"hello");
    }
    assert!(wait_until(DEADLINE, || get_info(admin)["active"] == 3), "active never reached 3: {}", get_info(admin));
    put(admin, "/more", &json!({ "address": "127.0.0.1:0", "backends": [backend("d", echo.address())] })).expect(200);
    let now = get_info(admin);
    assert_eq!((now["services"].clone(), now["backends"].clone()), (json!(4), json!(4)), "{now}");
    drop(clients);
    assert!(wait_until(DEADLINE, || get_info(admin)["active"] == 0), "active never fell to 0: {}", get_info(admin));

    // Uptime counts on.
    assert!(
        wait_until(Duration::from_secs(3), || get_info(admin)["uptime_seconds"].as_u64() > Some(uptime)),
        "uptime did not grow"
    );
}

#[test]
fn info_is_read_only_and_no_service_can_be_named_info() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&json!([service("web", vec![backend("b0", echo.address())])]), &[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);
    for method in ["PUT", "POST", "DELETE", "PATCH"] {
        let body = (method != "DELETE").then_some(r#"{"address": "127.0.0.1:0"}"#);
        let response = call(admin, method, "/_info", body).expect(405);
        assert_eq!(response.header("allow"), Some("GET"), "{method} /_info: {response:?}");
    }
    // Under a service's path `_info` is a name, and reserved.
    let response = put(admin, "/_info/b0", &json!({ "address": echo.address().to_string() })).expect(400);
    assert!(response.error().contains("reserved"), "{response:?}");
    assert_eq!(config_bytes(admin), before, "a refused request changed the config");
    assert_eq!(get(admin, "/_info/").json()["pid"], json!(shuttle.pid()), "a trailing slash is the same path");

    let dir = tempdir();
    let file = write_config(dir.path(), &json!([service("_info", vec![])]));
    let (status, lines) = Shuttle::start_expect_failure(&["-config", file.to_str().expect("utf-8")]);
    assert_eq!(status.code(), Some(1));
    assert!(lines.iter().any(|l| l.contains("reserved")), "{lines:?}");
}
