//! The config as an object (reference §2.1): `{"services": [...]}` with global
//! options besides the plain list; flags override the file; the state file is
//! written in the form read and keeps its global options; unknown keys and bad
//! values stop start-up in one line, as `-check` reports them.

use std::path::Path;

use serde_json::{json, Value};

use crate::admin::{get, put, Http};
use crate::audit::line_with;
use crate::check::{check, fails_as_start_up_does};
use crate::state::{path_str, state_json};
use crate::support::{backend, echo, service, tempdir, test_workers, wait_until, write_file, Shuttle, DEADLINE};

fn write_json(dir: &Path, name: &str, value: &Value) -> std::path::PathBuf {
    write_file(dir, name, serde_json::to_string_pretty(value).expect("JSON").as_bytes())
}

/// `GET /` with `Host: HOST` and, if given, a bearer token: the status.
fn get_status(admin: std::net::SocketAddr, host: &str, token: Option<&str>) -> u16 {
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let mut http = Http::tcp(admin);
    http.send(format!("GET / HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n").as_bytes());
    http.response().status
}

/// An object config with every kind of global option a test can see from outside.
fn object_config(dir: &Path, backend_address: &str) -> Value {
    let token = write_file(dir, "token", b"s3cret\n");
    json!({
        "admin": { "hosts": ["shuttle.example"], "token_file": path_str(&token) },
        "workers": 3,
        "grace": 1,
        "access_log": { "path": path_str(&dir.join("access.log")), "format": "json" },
        "services": [service("web", vec![backend("b0", backend_address)])],
    })
}

#[test]
fn an_object_config_is_read_and_its_global_options_apply() {
    let up = echo();
    let dir = tempdir();
    let file = write_json(dir.path(), "config.json", &object_config(dir.path(), &up.address()));
    let shuttle = Shuttle::start(&["-config", path_str(&file)]);
    let admin = shuttle.admin_addr();
    crate::admin::echo_once(shuttle.service_addr("web"), b"logged");

    assert_eq!(get_status(admin, "localhost", None), 401, "admin.token_file applies");
    assert_eq!(get_status(admin, "shuttle.example", Some("s3cret")), 200, "admin.hosts applies");
    assert_eq!(get_status(admin, "other.example", Some("s3cret")), 403);
    let log = dir.path().join("access.log");
    assert!(wait_until(DEADLINE, || std::fs::read_to_string(&log).is_ok_and(|t| t.starts_with("{\"time\""))));
    let info =
        Http::tcp(admin).request_with("GET", "/_info", &["Authorization: Bearer s3cret"], None).expect(200).json();
    // The suite's -workers 2, when set, is a flag: it wins over the file's 3.
    let workers = if test_workers() > 1 { test_workers() } else { 3 };
    assert_eq!(info["workers"], workers);
    // GET /_config stays the list of services (the config file's list form).
    let config = Http::tcp(admin).request_with("GET", "/_config", &["Authorization: Bearer s3cret"], None).expect(200);
    assert!(config.json().is_array(), "{config:?}");
}

#[test]
fn flags_override_the_files_global_options() {
    let up = echo();
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    let config = json!({
        "admin": { "address": path_str(&socket), "hosts": ["shuttle.example"] },
        "access_log": { "path": path_str(&dir.path().join("access.log")), "format": "json" },
        "services": [service("web", vec![backend("b0", up.address())])],
    });
    let file = write_json(dir.path(), "config.json", &config);
    // Shuttle::start adds `-http 127.0.0.1:0`: that flag beats admin.address.
    let shuttle =
        Shuttle::start(&["-config", path_str(&file), "-access-log-format", "text", "-admin-host", "x.example"]);
    let admin = shuttle.admin_addr();
    let line = shuttle.wait_for_line("flags override its options");
    for overridden in ["-http (admin.address)", "-admin-host (admin.hosts)", "-access-log-format (access_log.format)"] {
        assert!(line.contains(overridden), "{line}");
    }
    assert!(!socket.exists(), "the admin API is on the -http address only");
    assert_eq!(get_status(admin, "x.example", None), 200);
    assert_eq!(get_status(admin, "shuttle.example", None), 403, "the flag's hosts replace the file's");
    crate::admin::echo_once(shuttle.service_addr("web"), b"logged");
    let log = dir.path().join("access.log");
    assert!(
        wait_until(DEADLINE, || std::fs::read_to_string(&log).is_ok_and(|t| t.contains(" service=web "))),
        "access_log.path applies, in the flag's text format"
    );
}

#[test]
fn the_state_file_is_written_in_the_object_form_and_keeps_its_global_options() {
    let up = echo();
    let dir = tempdir();
    let config = object_config(dir.path(), &up.address());
    let file = write_json(dir.path(), "config.json", &config);
    let state = dir.path().join("state.json");
    let token = "Authorization: Bearer s3cret";
    {
        let shuttle = Shuttle::start(&["-config", path_str(&file), "-state", path_str(&state)]);
        let admin = shuttle.admin_addr();
        let body = json!({ "address": "127.0.0.1:0" }).to_string();
        Http::tcp(admin).request_with("PUT", "/api", &[token], Some(body.as_bytes())).expect(200);
        let written = state_json(&state);
        let mut expected = config.clone();
        expected["services"] = json!(null);
        let mut globals = written.clone();
        globals["services"] = json!(null);
        assert_eq!(globals, expected, "the config's global options, as read");
        let names: Vec<&str> =
            written["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["api", "web"]);
        let text = std::fs::read_to_string(&state).unwrap();
        assert!(text.find("\"admin\"").unwrap() < text.find("\"services\"").unwrap(), "options first: {text}");
        Http::tcp(admin).request_with("PATCH", "/api", &[token], Some(br#"{"fall": 3}"#)).expect(200);
        assert_eq!(state_json(&state)["admin"], config["admin"], "kept across saves");
        assert_eq!(state_json(&state)["services"][0]["fall"], 3);
    }
    // A restart loads the state file: its options still apply (the token), and its services.
    std::fs::write(&file, "[]").unwrap();
    let shuttle = Shuttle::start(&["-config", path_str(&file), "-state", path_str(&state)]);
    let admin = shuttle.admin_addr();
    assert_eq!(get_status(admin, "localhost", None), 401);
    assert_eq!(get_status(admin, "shuttle.example", Some("s3cret")), 200);
    shuttle.service_addr("api");
}

#[test]
fn a_list_config_stays_a_list_in_the_state_file() {
    let up = echo();
    let dir = tempdir();
    let file = write_json(dir.path(), "config.json", &json!([service("web", vec![backend("b0", up.address())])]));
    let state = dir.path().join("state.json");
    let shuttle = Shuttle::start(&["-config", path_str(&file), "-state", path_str(&state)]);
    put(shuttle.admin_addr(), "/api", &json!({ "address": "127.0.0.1:0" })).expect(200);
    let written = state_json(&state);
    assert!(written.is_array(), "{written}");
    assert_eq!(written, get(shuttle.admin_addr(), "/_config").expect(200).json());
}

#[test]
fn unknown_keys_and_bad_options_stop_start_up_in_one_line_and_check_says_the_same() {
    let dir = tempdir();
    let cases = [
        (json!({ "services": [], "servics": [] }), vec![r#"unknown field "servics""#, "line 1"]),
        (json!({ "services": [], "admin": { "adress": "x" } }), vec![r#"unknown field "adress""#]),
        (json!({ "services": [], "workers": 0 }), vec!["workers: expected a number of workers from 1 to 256"]),
        (json!({ "services": [], "admin": { "mode": "999" } }), vec!["admin.mode: expected permissions in octal"]),
        (json!({ "grace": 1 }), vec!["services: is required"]),
        (
            json!({ "services": [{ "name": "web", "address": "127.0.0.1:0", "fall": 0 }] }),
            vec![r#"service "web": fall"#],
        ),
    ];
    for (i, (config, words)) in cases.into_iter().enumerate() {
        let text = serde_json::to_string(&config).unwrap();
        let file = write_file(dir.path(), &format!("bad{i}.json"), text.as_bytes());
        fails_as_start_up_does(&file, &words);
    }
}

#[test]
fn check_reports_an_object_file_as_it_reports_a_list() {
    let up = echo();
    let dir = tempdir();
    let config = json!({
        "grace": 2,
        "services": [service("web", vec![backend("a", up.address()), backend("b", up.address())])],
    });
    let file = write_json(dir.path(), "config.json", &config);
    let out = check(&["-config", path_str(&file)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{}: ok (1 service, 2 backends)\n", file.display()));
    let token = json!({ "admin": { "token_file": path_str(&dir.path().join("missing")) }, "services": [] });
    let file = write_json(dir.path(), "token.json", &token);
    let out = check(&["-config", path_str(&file)]);
    assert_eq!(out.status.code(), Some(1), "-check reads the token file the object names: {out:?}");
    assert!(out.stderr.contains("cannot read the admin token"), "{out:?}");
}

#[test]
fn a_reload_applies_the_services_and_warns_about_options_that_need_a_restart() {
    let up = echo();
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let config = |grace: u32, services: Vec<Value>| json!({ "grace": grace, "pin": false, "services": services });
    let file =
        write_json(dir.path(), "config.json", &config(1, vec![service("web", vec![backend("b0", up.address())])]));
    let shuttle = Shuttle::start(&["-config", path_str(&file), "-state", path_str(&state)]);
    let admin = shuttle.admin_addr();
    put(admin, "/web/b1", &json!({ "address": up.address() })).expect(200);
    assert_eq!(state_json(&state)["grace"], 1);

    // Only a global option changes: nothing is applied, the warning names it, the state file takes it.
    let services = state_json(&state)["services"].as_array().unwrap().clone();
    write_json(dir.path(), "config.json", &config(5, services.clone()));
    let seen = shuttle.stderr_lines().len();
    shuttle.signal(libc::SIGHUP);
    let line = line_with(&shuttle, seen, &["WARN", "global options changed: grace;", "restart shuttle"]);
    assert!(line.contains("admin: reload (SIGHUP) of "), "{line}");
    line_with(&shuttle, seen, &["admin: reload (SIGHUP) of ", "nothing changed"]);
    assert!(wait_until(DEADLINE, || state_json(&state)["grace"] == 5), "{}", state_json(&state));

    // A list file: the services apply, the options go, and the state file becomes a list.
    let seen = shuttle.stderr_lines().len();
    write_json(dir.path(), "config.json", &json!([service("api", vec![])]));
    shuttle.signal(libc::SIGHUP);
    line_with(&shuttle, seen, &["WARN", "global options changed: grace, pin;"]);
    line_with(&shuttle, seen, &["admin: reload (SIGHUP) of ", "service api added", "service web removed"]);
    assert!(wait_until(DEADLINE, || state_json(&state).is_array()), "{}", state_json(&state));
    shuttle.service_addr("api");
}
