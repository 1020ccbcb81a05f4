//! Partial updates (reference §5.1, `PATCH`): the body's fields over the
//! running config, then the same path as a `PUT` of the merged config: the
//! same validation, the same zero-disruption rules, the same audit line, and
//! a refused one changes neither the running config nor the state file.

use std::net::SocketAddr;
use std::thread;

use serde_json::{json, Value};

use crate::admin::{call, config_bytes, config_json, counters, echo_once, free_port, get, put, stats, wait_idle, Http};
use crate::audit::line_with;
use crate::state::{snapshot, start_with_state, state_json};
use crate::support::{backend, connect, echo, round_trip, tempdir, Shuttle};

#[track_caller]
fn patch(admin: SocketAddr, target: &str, body: &Value) -> crate::admin::Response {
    call(admin, "PATCH", target, Some(&body.to_string()))
}

/// `web` on a fixed free port (so a replacement visibly keeps its socket) with backend `b0` at `address`.
fn web_config(address: &str) -> Value {
    let listen = format!("127.0.0.1:{}", free_port());
    json!([{ "name": "web", "address": listen, "check_send": "PING\r\n", "backends": [backend("b0", address)] }])
}

#[test]
fn patch_changes_each_field_kind_and_keeps_every_other_field_and_the_listener() {
    let up = echo();
    let shuttle = Shuttle::start_with_config(&web_config(&up.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    let mut open = connect(web);
    round_trip(&mut open, b"before");

    let changes = [
        json!({ "check_send": "HEAD / HTTP/1.0\r\n\r\n" }),
        json!({ "connect_timeout": 1.5, "client_timeout": 30 }),
        json!({ "balance": "LC" }),
        json!({ "check_interval": 0.25, "fall": 3, "rise": 4, "check_expect": "200" }),
        json!({ "name": "web", "server_timeout": 0 }),
    ];
    for change in changes {
        let mut expected = config_json(admin);
        for (field, value) in change.as_object().unwrap() {
            expected[0][field] = value.clone();
        }
        let response = patch(admin, "/web", &change).expect(200);
        assert_eq!(response.body, config_bytes(admin), "the answer is GET /_config");
        assert_eq!(response.json(), expected, "PATCH {change} changed just its fields");
        assert_eq!(shuttle.service_addr("web"), web);
        echo_once(web, b"the listener is the same socket");
    }
    round_trip(&mut open, b"an open connection runs on");

    // null puts a field back to its default, as a PUT without it would.
    let reset = patch(admin, "/web", &json!({ "check_send": null, "fall": null, "balance": null })).expect(200).json();
    assert_eq!((reset[0]["check_send"].clone(), reset[0]["fall"].clone()), (json!(""), json!(2)));
    assert_eq!(reset[0]["balance"], "RR");
}

#[test]
fn patch_of_backends_replaces_the_list_and_unchanged_backends_keep_their_counters() {
    let (one, two) = (echo(), echo());
    let shuttle = Shuttle::start_with_config(&web_config(&one.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    echo_once(web, b"counted");
    wait_idle(admin, "web");
    let b0 = counters(&stats(admin, "/web/b0"));
    assert_eq!(b0[0], 1);

    let seen = shuttle.stderr_lines().len();
    let list = json!([backend("b0", one.address()), backend("b1", two.address())]);
    let config = patch(admin, "/web", &json!({ "backends": list })).expect(200).json();
    assert_eq!(config[0]["backends"].as_array().map(Vec::len), Some(2));
    assert_eq!(config[0]["check_send"], "PING\r\n", "the settings are kept");
    line_with(&shuttle, seen, &["INFO", "admin: PATCH /web from 127.0.0.1:", "service web backends updated: added b1"]);
    assert_eq!(counters(&stats(admin, "/web/b0")), b0, "a backends-only update keeps b0's counters");

    // The list is replaced, not merged: b0 goes.
    let seen = shuttle.stderr_lines().len();
    patch(admin, "/web", &json!({ "backends": [backend("b1", two.address())] })).expect(200);
    line_with(&shuttle, seen, &["admin: PATCH /web from", "removed b0"]);
    get(admin, "/web/b0").expect(404);
    echo_once(web, b"to b1");
    assert_eq!(shuttle.service_addr("web"), web);
}

#[test]
fn patch_of_a_backend_changes_weight_address_and_check_address() {
    let (one, two) = (echo(), echo());
    let shuttle = Shuttle::start_with_config(&web_config(&one.address()), &[]);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    put(admin, "/web/b1", &json!({ "address": one.address(), "check_address": one.address(), "weight": 2 }))
        .expect(200);

    let config = patch(admin, "/web/b1", &json!({ "weight": 0 })).expect(200).json();
    let expected = json!({ "name": "b1", "address": one.address(), "check_address": one.address(), "weight": 0,
                           "max_connections": 0, "send_proxy": "" });
    assert_eq!(config[0]["backends"][1], expected);
    assert_eq!(
        config[0]["backends"][0],
        json!({ "name": "b0", "address": one.address(), "check_address": "", "weight": 1, "max_connections": 0,
                "send_proxy": "" })
    );

    let seen = shuttle.stderr_lines().len();
    let change = json!({ "address": two.address(), "check_address": "", "weight": 1 });
    let config = patch(admin, "/web/b1", &change).expect(200).json();
    let expected = json!({ "name": "b1", "address": two.address(), "check_address": "", "weight": 1,
                           "max_connections": 0, "send_proxy": "" });
    assert_eq!(config[0]["backends"][1], expected, "changed in place, second in the list");
    line_with(&shuttle, seen, &["admin: PATCH /web/b1 from 127.0.0.1:", "backends updated: changed b1"]);
    for _ in 0..2 {
        echo_once(web, b"both backends serve");
    }
    wait_idle(admin, "web");
    assert_eq!(stats(admin, "/web/b1")["connections"], 1, "round robin reached b1 at its new address");
    assert_eq!(two.accepted(), 1);
}

#[test]
fn a_refused_patch_changes_neither_the_config_nor_the_state_file() {
    let up = echo();
    let dir = tempdir();
    let (shuttle, _, state) = start_with_state(dir.path(), &web_config(&up.address()));
    let admin = shuttle.admin_addr();
    put(admin, "/web/b1", &json!({ "address": up.address() })).expect(200);
    let before = snapshot(&state);
    let config_before = config_bytes(admin);
    // Coarse file-system clocks: make sure a rewrite now would show in the mtime.
    thread::sleep(std::time::Duration::from_millis(50));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();

    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/web", r#"{"balanse": "LC"}"#.into(), 400, r#"unknown field "balanse""#),
        ("/web/b0", r#"{"wieght": 3}"#.into(), 400, r#"unknown field "wieght""#),
        ("/web", r#"{"name": "api"}"#.into(), 400, r#""api" in the body differs from "web" in the URL"#),
        ("/web/b0", r#"{"name": "b1"}"#.into(), 400, r#""b1" in the body differs from "b0" in the URL"#),
        ("/web", "[]".into(), 400, "expected a JSON object"),
        ("/web", r#""fall""#.into(), 400, "expected a JSON object"),
        ("/web/b0", "null".into(), 400, "expected a JSON object"),
        ("/web", r#"{"fall": "#.into(), 400, "EOF while parsing"),
        ("/web", String::new(), 400, "EOF while parsing"),
        ("/web", r#"{"fall": 0}"#.into(), 400, "fall: must be an integer ≥ 1, got 0"),
        ("/web", r#"{"balance": "XX"}"#.into(), 400, "balance:"),
        ("/web", r#"{"check_interval": -1}"#.into(), 400, "check_interval:"),
        ("/web", r#"{"address": null}"#.into(), 400, "address: is required"),
        ("/web", r#"{"backends": [{"name": "b0"}]}"#.into(), 400, "address: is required"),
        ("/web", r#"{"backends": {"name": "b0"}}"#.into(), 400, "invalid type"),
        ("/web/b0", r#"{"weight": -1}"#.into(), 400, "weight: must be an integer ≥ 0"),
        ("/web/b0", r#"{"address": "127.0.0.1:0"}"#.into(), 400, "address:"),
        ("/web/b0", format!(r#"{{"address": "{}"}}"#, shuttle.service_addr("web")), 400, "it would loop"),
        ("/web", format!(r#"{{"address": "{taken}"}}"#), 409, "cannot listen on"),
        ("/nope", "{}".into(), 404, r#"no service named "nope""#),
        ("/web/nope", "{}".into(), 404, r#"has no backend named "nope""#),
        ("/nope/b0", "{}".into(), 404, r#"no service named "nope""#),
        ("/_web", "{}".into(), 400, "reserved"),
        ("/web/_b", "{}".into(), 400, "reserved"),
        ("/", "{}".into(), 405, "use GET"),
        ("/_config", "{}".into(), 405, "use GET"),
        ("/_info", "{}".into(), 405, "use GET"),
        ("/_metrics", "{}".into(), 405, "use GET"),
    ];
    for (target, body, status, words) in &cases {
        let seen = shuttle.stderr_lines().len();
        let response = call(admin, "PATCH", target, Some(body));
        assert_eq!(response.status, *status, "PATCH {target} {body}: {response:?}");
        assert!(response.error().contains(words), "PATCH {target} {body}: {:?} lacks {words:?}", response.error());
        if *status != 405 && !target.contains('_') {
            let refused = format!("admin: PATCH {target} from 127.0.0.1:");
            line_with(&shuttle, seen, &["WARN", &refused, &format!("refused with {status}")]);
        }
        assert!(snapshot(&state) == before, "PATCH {target} {body} ({status}) rewrote the state file");
    }
    // A body over the limit is refused before it is read (413), an exact 1 MiB one is parsed.
    let mut http = Http::tcp(admin);
    http.send(format!("PATCH /web HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1024 * 1024 + 1).as_bytes());
    http.response().expect(413);
    let huge = crate::admin::padded(&json!({ "fall": 0 }), 1024 * 1024);
    let response = Http::tcp(admin).request("PATCH", "/web", Some(&huge)).expect(400);
    assert!(response.error().contains("fall:"), "{response:?}");

    assert!(snapshot(&state) == before, "a refused PATCH rewrote the state file");
    assert_eq!(config_bytes(admin), config_before, "a refused PATCH changed the running config");
}

#[test]
fn a_patch_that_changes_nothing_is_a_200_that_changes_nothing() {
    let up = echo();
    let dir = tempdir();
    let (shuttle, _, state) = start_with_state(dir.path(), &web_config(&up.address()));
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    echo_once(web, b"counted");
    wait_idle(admin, "web");
    put(admin, "/web/b1", &json!({ "address": up.address() })).expect(200);
    let (config, b0, file) = (config_bytes(admin), counters(&stats(admin, "/web/b0")), std::fs::read(&state).unwrap());
    let running = config_json(admin)[0].clone();
    for (target, body) in [
        ("/web", json!({})),
        ("/web", json!({ "fall": running["fall"], "address": running["address"] })),
        ("/web", running.clone()),
        ("/web/b0", json!({})),
        ("/web/b0", json!({ "weight": 1, "name": "b0" })),
    ] {
        let seen = shuttle.stderr_lines().len();
        assert_eq!(patch(admin, target, &body).expect(200).body, config, "PATCH {target} {body}");
        line_with(&shuttle, seen, &["admin: PATCH", "backends updated: unchanged"]);
        assert_eq!(config_bytes(admin), config);
        assert_eq!(counters(&stats(admin, "/web/b0")), b0, "PATCH {target} {body} reset b0");
        assert_eq!(std::fs::read(&state).unwrap(), file, "the state file's text is the same");
    }
    assert_eq!(shuttle.service_addr("web"), web);
}

#[test]
fn patches_take_their_turn_among_concurrent_puts_and_lose_no_change() {
    let up = echo();
    let dir = tempdir();
    let (shuttle, _, state) = start_with_state(dir.path(), &web_config(&up.address()));
    let admin = shuttle.admin_addr();
    const ROUNDS: u32 = 20;
    let address = up.address();
    // Each PATCH merges over the config of its turn, so no PUT's backend is lost and every PATCH lands.
    let putter = thread::spawn(move || {
        for i in 0..ROUNDS {
            put(admin, &format!("/web/p{i}"), &json!({ "address": address })).expect(200);
        }
    });
    let patcher = thread::spawn(move || {
        for i in 1..=ROUNDS {
            let config = patch(admin, "/web", &json!({ "fall": i, "check_send": format!("PING {i}") })).expect(200);
            assert_eq!(config.json()[0]["fall"], i);
        }
    });
    let backend_patcher = thread::spawn(move || {
        for i in 0..ROUNDS {
            patch(admin, "/web/b0", &json!({ "weight": i + 1 })).expect(200);
        }
    });
    for t in [putter, patcher, backend_patcher] {
        t.join().expect("a client thread failed");
    }
    let config = config_json(admin);
    let web = &config[0];
    assert_eq!((web["fall"].clone(), web["check_send"].clone()), (json!(ROUNDS), json!(format!("PING {ROUNDS}"))));
    let backends = web["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 1 + ROUNDS as usize, "every PUT's backend is there: {backends:?}");
    assert_eq!(
        backends[0],
        json!({ "name": "b0", "address": up.address(), "check_address": "", "weight": ROUNDS, "max_connections": 0,
                "send_proxy": "" })
    );
    assert_eq!(state_json(&state), config, "the state file holds the last change");
}
