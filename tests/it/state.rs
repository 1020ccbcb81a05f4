//! The state file (SPEC §1, §5): written after every successful admin change,
//! atomically and before the answer; never touched by a failed request; loaded
//! at start in place of the default config; and the default config itself is
//! never written.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::admin::{call, config_bytes, config_json, delete, get, put, Http};
use crate::support::round_trip;
use crate::support::{backend, echo, one_backend, service, tempdir, write_config, write_file, Shuttle, DEADLINE};

pub(crate) fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// The state file parsed as JSON.
#[track_caller]
pub(crate) fn state_json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("read the state file {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("the state file is not JSON ({e}): {text:?}"))
}

/// What identifies one version of a file: its bytes, mtime and inode (an atomic rewrite changes the inode).
#[track_caller]
pub(crate) fn snapshot(path: &Path) -> (Vec<u8>, SystemTime, u64) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    let bytes = std::fs::read(path).expect("read");
    (bytes, meta.modified().expect("mtime"), meta.ino())
}

/// The names in a directory.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// A config that uses every field, with values other than the defaults.
fn rich_config(backend_address: &str) -> Value {
    json!([
        { "name": "web", "address": "127.0.0.1:0", "balance": "LC", "check_interval": 0.5, "fall": 3, "rise": 4,
          "client_timeout": 0.25, "server_timeout": 12.5, "connect_timeout": 1.5,
          "check_send": "GET /health HTTP/1.0\r\n\r\n", "check_expect": "200 \"ok\" ✓",
          "backends": [
            { "name": "b2", "address": backend_address, "check_address": backend_address, "weight": 0 },
            { "name": "b1", "address": backend_address, "weight": 7 } ] },
        { "name": "api", "address": "127.0.0.1:0", "check_interval": 0, "backends": null, "balance": "" },
    ])
}

/// Starts shuttle with `-config` (written from `config`) and `-state` in `dir`.
pub(crate) fn start_with_state(dir: &Path, config: &Value) -> (Shuttle, PathBuf, PathBuf) {
    let config = write_config(dir, config);
    let state = dir.join("state.json");
    let shuttle = Shuttle::start(&["-config", path_str(&config), "-state", path_str(&state)]);
    (shuttle, config, state)
}

#[test]
fn state_file_follows_every_change_and_matches_get_config() {
    let echo = echo();
    let dir = tempdir();
    let (shuttle, _, state) = start_with_state(dir.path(), &one_backend(echo.address()));
    let admin = shuttle.admin_addr();
    let body = json!({ "address": "127.0.0.1:0", "backends": [{ "name": "b0", "address": echo.address() }] });

    let changes: Vec<(&str, &str, Option<String>)> = vec![
        ("PUT", "/api", Some(body.to_string())),
        ("POST", "/api2", Some(body.to_string())),
        ("PUT", "/api/b1", Some(json!({ "address": echo.address(), "weight": 3 }).to_string())),
        ("PUT", "/api/b0", Some(json!({ "address": echo.address(), "weight": 0 }).to_string())),
        ("PUT", "/web", Some(json!({ "address": "127.0.0.1:0", "balance": "LC" }).to_string())),
        ("PUT", "/web?backends_only", Some(json!({ "address": "127.0.0.1:0", "backends": [] }).to_string())),
        ("DELETE", "/api/b1", None),
        ("DELETE", "/api2", None),
    ];
    for (method, target, body) in &changes {
        let response = call(admin, method, target, body.as_deref()).expect(200);
        // Written before the answer: read it right away.
        assert_eq!(state_json(&state), response.json(), "{method} {target}: the state file is the new config");
        assert_eq!(state_json(&state), config_json(admin), "{method} {target}: the state file is GET /_config");
    }
    assert_eq!(
        listing(dir.path()),
        BTreeSet::from(["config.json".into(), "state.json".into(), "state.json.lock".into()]),
        "no temp files left"
    );
}

#[test]
fn state_failed_requests_leave_the_file_untouched() {
    let echo = echo();
    let dir = tempdir();
    let (shuttle, _, state) = start_with_state(dir.path(), &one_backend(echo.address()));
    let admin = shuttle.admin_addr();
    let ok = echo.address();
    put(admin, "/api", &json!({ "address": "127.0.0.1:0" })).expect(200);
    let before = snapshot(&state);
    let config_before = config_bytes(admin);
    // Coarse file-system clocks: make sure a rewrite now would show in the mtime.
    std::thread::sleep(Duration::from_millis(50));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let cases: Vec<(&str, &str, String, u16)> = vec![
        ("PUT", "/web", r#"{"address": "127.0.0.1:0", "#.into(), 400),
        ("PUT", "/web", r#"{"address": "127.0.0.1:0", "balanse": "LC"}"#.into(), 400),
        ("PUT", "/new", r#"{"address": "127.0.0.1:0", "colour": "red"}"#.into(), 400),
        ("PUT", "/web", r#"{"address": "127.0.0.1:0", "balance": "XX"}"#.into(), 400),
        ("PUT", "/web", r#"{"name": "api", "address": "127.0.0.1:0"}"#.into(), 400),
        (
            "PUT",
            "/web",
            format!(r#"{{"address": "127.0.0.1:0", "backends": [{{"name": "b0", "address": "{ok}", "weight": -1}}]}}"#),
            400,
        ),
        ("PUT", "/web/b0", format!(r#"{{"address": "{ok}", "weight": -1}}"#), 400),
        ("PUT", "/web/b1", format!(r#"{{"name": "b2", "address": "{ok}"}}"#), 400),
        ("PUT", "/_new", r#"{"address": "127.0.0.1:0"}"#.into(), 400),
        ("DELETE", "/_web", String::new(), 400),
        ("PUT", "/nope/b0", format!(r#"{{"address": "{ok}"}}"#), 404),
        ("DELETE", "/nope", String::new(), 404),
        ("DELETE", "/web/nope", String::new(), 404),
        ("PUT", "/web", format!(r#"{{"address": "{taken}", "balance": "LC"}}"#), 409),
        ("PUT", "/new", format!(r#"{{"address": "{taken}"}}"#), 409),
        ("PATCH", "/_config", "{}".into(), 405),
        ("PATCH", "/web", r#"{"fall": 0}"#.into(), 400),
        ("PUT", "/_config", "[]".into(), 405),
        ("GET", "/", String::new(), 200),
        ("GET", "/_config", String::new(), 200),
        ("GET", "/web/b0", String::new(), 200),
    ];
    for (method, target, body, status) in &cases {
        let body = (!body.is_empty()).then_some(body.as_str());
        let response = call(admin, method, target, body);
        assert_eq!(response.status, *status, "{method} {target}: {response:?}");
        assert!(snapshot(&state) == before, "{method} {target} ({status}) rewrote the state file");
    }
    // Framing errors.
    let mut http = Http::tcp(admin);
    http.send(format!("PUT /web HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1024 * 1024 + 1).as_bytes());
    http.response().expect(413);
    let mut http = Http::tcp(admin);
    http.send(format!("PUT /web HTTP/1.1\r\nX: {}\r\nContent-Length: 2\r\n\r\n{{}}", "a".repeat(17 * 1024)).as_bytes());
    http.response().expect(431);
    let mut http = Http::tcp(admin);
    http.send(b"\x00\x01garbage\r\n\r\n");
    http.response().expect(400);

    assert!(snapshot(&state) == before, "a failed request rewrote the state file");
    assert_eq!(config_bytes(admin), config_before, "a failed request changed the running config");
    assert_eq!(
        listing(dir.path()),
        BTreeSet::from(["config.json".into(), "state.json".into(), "state.json.lock".into()]),
        "no temp files left"
    );
}

#[test]
fn state_restart_brings_back_exactly_the_same_config() {
    let echo = echo();
    let dir = tempdir();
    let (mut shuttle, config, state) = start_with_state(dir.path(), &one_backend(echo.address()));
    let admin = shuttle.admin_addr();
    // Build a config that uses every field, through the API.
    delete(admin, "/web").expect(200);
    for service in rich_config(&echo.address()).as_array().expect("list") {
        let target = format!("/{}", service["name"].as_str().expect("name"));
        put(admin, &target, service).expect(200);
    }
    let before = config_bytes(admin);
    let saved = std::fs::read(&state).expect("read the state file");
    assert_eq!(
        serde_json::from_slice::<Value>(&saved).expect("JSON"),
        serde_json::from_slice::<Value>(&before).unwrap()
    );
    shuttle.signal(libc::SIGTERM);
    assert!(shuttle.wait_exit(DEADLINE).is_some(), "shuttle exits on SIGTERM");
    drop(shuttle);

    // The same -state (and a -config that says something else): the state wins.
    let shuttle = Shuttle::start(&["-config", path_str(&config), "-state", path_str(&state)]);
    let admin = shuttle.admin_addr();
    let after = config_bytes(admin);
    assert_eq!(
        String::from_utf8_lossy(&after),
        String::from_utf8_lossy(&before),
        "GET /_config after the restart is what it was before"
    );
    get(admin, "/web").expect(200);
    assert_eq!(get(admin, "/web/b1").expect(200).json()["weight"], 7);
    assert_eq!(serde_json::from_slice::<Value>(&std::fs::read(&state).unwrap()).unwrap(), config_json(admin));
}

#[test]
fn state_without_the_flag_no_file_is_written() {
    let echo = echo();
    let dir = tempdir();
    let config = write_config(dir.path(), &one_backend(echo.address()));
    let original = std::fs::read(&config).expect("read config");
    let shuttle = Shuttle::start(&["-config", path_str(&config)]);
    let admin = shuttle.admin_addr();
    put(admin, "/api", &json!({ "address": "127.0.0.1:0" })).expect(200);
    put(admin, "/web/b1", &json!({ "address": echo.address() })).expect(200);
    delete(admin, "/api").expect(200);
    assert_eq!(listing(dir.path()), BTreeSet::from(["config.json".into()]), "nothing written next to the config");
    assert_eq!(std::fs::read(&config).expect("read config"), original, "the config file is never written");
    let cwd = std::env::current_dir().expect("cwd");
    assert!(!cwd.join("state.json").exists() && !cwd.join("shuttle.state").exists());
}

#[test]
fn state_config_file_is_never_written() {
    let echo = echo();
    let dir = tempdir();
    let (shuttle, config, state) = start_with_state(dir.path(), &one_backend(echo.address()));
    let before = snapshot(&config);
    std::thread::sleep(Duration::from_millis(50));
    let admin = shuttle.admin_addr();
    put(admin, "/api", &json!({ "address": "127.0.0.1:0" })).expect(200);
    put(admin, "/web", &json!({ "address": "127.0.0.1:0", "balance": "LC" })).expect(200);
    put(admin, "/web/b1", &json!({ "address": echo.address() })).expect(200);
    delete(admin, "/api").expect(200);
    assert!(snapshot(&config) == before, "the -config file was written");
    assert_eq!(state_json(&state), config_json(admin));
}

#[test]
fn state_get_config_saved_as_a_file_loads_as_config_identically() {
    let echo = echo();
    let first = Shuttle::start_with_config(&rich_config(&echo.address()), &[]);
    let saved = config_bytes(first.admin_addr());
    drop(first);

    let dir = tempdir();
    let file = write_file(dir.path(), "saved.json", &saved);
    let second = Shuttle::start(&["-config", path_str(&file)]);
    let again = config_bytes(second.admin_addr());
    assert_eq!(String::from_utf8_lossy(&again), String::from_utf8_lossy(&saved), "reads back identical");
    // And as a state file.
    let state = write_file(dir.path(), "state.json", &saved);
    let third = Shuttle::start(&["-state", path_str(&state)]);
    assert_eq!(String::from_utf8_lossy(&config_bytes(third.admin_addr())), String::from_utf8_lossy(&saved));
}

#[test]
fn state_write_failure_is_500_and_changes_nothing() {
    let echo = echo();
    let dir = tempdir();
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let (shuttle, _, state) = start_with_state(dir.path(), &config);
    let admin = shuttle.admin_addr();
    let web = shuttle.service_addr("web");
    put(admin, "/api", &json!({ "address": "127.0.0.1:0" })).expect(200);
    let before = config_bytes(admin);

    // The state path becomes a non-empty directory: the rename onto it fails.
    std::fs::remove_file(&state).expect("remove the state file");
    std::fs::create_dir(&state).expect("a directory in its place");
    write_file(&state, "keep", b"x");
    let body = json!({ "address": "127.0.0.1:0", "backends": [{ "name": "b0", "address": echo.address() }] });
    let attempts: Vec<(&str, &str, Option<String>)> = vec![
        ("PUT", "/new", Some(body.to_string())),
        ("PUT", "/web", Some(json!({ "address": "127.0.0.1:0", "balance": "LC" }).to_string())),
        ("PUT", "/web/b1", Some(json!({ "address": echo.address() }).to_string())),
        ("DELETE", "/web/b0", None),
        ("DELETE", "/api", None),
    ];
    for (method, target, body) in &attempts {
        let response = call(admin, method, target, body.as_deref()).expect(500);
        assert!(!response.error().is_empty());
        assert_eq!(config_bytes(admin), before, "{method} {target}: a failed state write must change nothing");
    }
    get(admin, "/new").expect(404);
    assert!(!shuttle.stderr_lines().iter().any(|l| l.contains("service new listening")), "new never started");
    round_trip(&mut crate::support::connect(web), b"web still proxies");

    // Fixed: changes go through again.
    std::fs::remove_dir_all(&state).expect("remove the directory");
    let response = put(admin, "/new", &body).expect(200);
    assert_eq!(state_json(&state), response.json());
}
