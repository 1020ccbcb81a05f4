//! `-check` (reference §1): the file start-up would load is read, resolved and
//! checked exactly as start-up does, with nothing bound and no lock taken;
//! one `FILE: ok (...)` line and 0, or start-up's own error line and 1.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use serde_json::json;

use crate::admin::put;
use crate::support::{backend, echo, run_to_exit, service, tempdir, write_config, write_file, Output, Shuttle};

fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A port nothing listens on now.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local address")
}

/// `shuttle -check` with `args` and `-http 127.0.0.1:0`, as the start-up it is compared with gets.
pub(crate) fn check(args: &[&str]) -> Output {
    let mut all = vec!["-check", "-http", "127.0.0.1:0"];
    all.extend_from_slice(args);
    run_to_exit(&all)
}

/// `-check` on `file` fails with exactly the line start-up fails with.
#[track_caller]
pub(crate) fn fails_as_start_up_does(file: &Path, words: &[&str]) {
    let out = check(&["-config", arg(file)]);
    assert_eq!(out.status.code(), Some(1), "-check of a bad file: {out:?}");
    assert_eq!(out.stdout, "", "-check printed on stdout for a bad file: {out:?}");
    let line = out.stderr.lines().last().unwrap_or_default().to_string();
    assert!(line.starts_with(&format!("shuttle: {}: ", file.display())), "the error names the file: {line}");
    for word in words {
        assert!(line.contains(word), "-check's error lacks {word:?}: {line}");
    }
    let (status, lines) = Shuttle::start_expect_failure(&["-config", arg(file)]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(lines.last(), Some(&line), "start-up fails with another line than -check: {lines:?}");
}

#[test]
fn check_a_good_file_says_ok_with_its_counts_and_binds_nothing() {
    let echo = echo();
    let dir = tempdir();
    // The ports are held by this test while it checks: a check that bound them would fail.
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let held_admin = TcpListener::bind("127.0.0.1:0").expect("bind");
    let web = held.local_addr().expect("local address").to_string();
    let admin = held_admin.local_addr().expect("local address").to_string();
    let config = json!([
        { "name": "web", "address": web, "backends": [backend("a", echo.address()), backend("b", echo.address())] },
        service("api", vec![backend("c", format!("localhost:{}", echo.addr().port()))]),
    ]);
    let file = write_config(dir.path(), &config);
    let out = run_to_exit(&["-check", "-config", arg(&file), "-http", &admin]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{}: ok (2 services, 3 backends)\n", file.display()));

    // Start-up does bind: the same file with the port held fails.
    let (status, lines) = Shuttle::start_expect_failure(&["-config", arg(&file)]);
    assert_eq!(status.code(), Some(1), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("cannot listen on") && l.contains(&web)), "{lines:?}");

    // Once the check is over, the ports are still ours to bind again.
    drop((held, held_admin));
    let out = run_to_exit(&["-check", "-config", arg(&file), "-http", &admin]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    TcpListener::bind(&web).expect("the service's port is free after -check");
    TcpListener::bind(&admin).expect("the admin port is free after -check");
}

#[test]
fn check_with_no_file_and_with_one_service() {
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, "no config: ok (0 services, 0 backends)\n");

    let dir = tempdir();
    let file = write_config(dir.path(), &json!([service("web", vec![backend("b0", free_addr())])]));
    // Go's spelling of a switch works too.
    let out = run_to_exit(&["--check=true", "-config", arg(&file), "-http", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{}: ok (1 service, 1 backend)\n", file.display()));
}

#[test]
fn check_bad_files_fail_with_start_ups_own_line() {
    let dir = tempdir();
    let bad_json = write_file(dir.path(), "bad.json", b"[{\"name\": \"web\",\n \"address\": }]");
    fails_as_start_up_does(&bad_json, &["line 2"]);

    let unknown = write_config(dir.path(), &json!([{ "name": "web", "address": "127.0.0.1:0", "colour": "red" }]));
    fails_as_start_up_does(&unknown, &["colour"]);

    let unresolvable = write_config(dir.path(), &json!([service("web", vec![backend("b0", "nowhere.invalid:80")])]));
    fails_as_start_up_does(&unresolvable, &["nowhere.invalid", "b0"]);

    let reserved = write_config(dir.path(), &json!([service("_info", vec![])]));
    fails_as_start_up_does(&reserved, &["reserved"]);

    // A backend pointing at its own service's listener would loop.
    let port = free_addr().port();
    let looping = write_config(
        dir.path(),
        &json!([{ "name": "web", "address": format!("127.0.0.1:{port}"),
                 "backends": [backend("self", format!("127.0.0.1:{port}"))] }]),
    );
    fails_as_start_up_does(&looping, &["loop"]);

    let missing = dir.path().join("missing.json");
    fails_as_start_up_does(&missing, &["missing.json"]);
}

#[test]
fn check_a_backend_at_the_admin_address_is_a_loop() {
    let dir = tempdir();
    let admin = free_addr().to_string();
    let file = write_config(dir.path(), &json!([service("web", vec![backend("b0", &admin)])]));
    let out = run_to_exit(&["-check", "-config", arg(&file), "-http", &admin]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("the admin API"), "{out:?}");
}

#[test]
fn check_reads_the_state_file_of_a_running_shuttle_without_its_lock() {
    let echo = echo();
    let dir = tempdir();
    let config = write_config(dir.path(), &json!([service("web", vec![backend("b0", echo.address())])]));
    let state = dir.path().join("state.json");
    let shuttle = Shuttle::start(&["-config", arg(&config), "-state", arg(&state)]);
    let admin = shuttle.admin_addr();
    let body =
        json!({ "address": "127.0.0.1:0", "backends": [backend("x", echo.address()), backend("y", echo.address())] });
    put(admin, "/api", &body).expect(200);
    assert!(state.exists(), "the state file was written");

    // The state file wins over -config, as at start-up; the running shuttle's lock is no obstacle.
    let out = check(&["-config", arg(&config), "-state", arg(&state)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{}: ok (2 services, 3 backends)\n", state.display()));
    assert!(shuttle.is_running(), "the check disturbed the running shuttle");
    put(admin, "/later", &json!({ "address": "127.0.0.1:0" })).expect(200);

    // A second shuttle on it is still refused: -check took no lock away either.
    let (status, lines) = Shuttle::start_expect_failure(&["-state", arg(&state)]);
    assert_eq!(status.code(), Some(1), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("in use by another shuttle")), "{lines:?}");
}

#[test]
fn check_falls_back_to_the_config_while_the_state_file_does_not_exist() {
    let dir = tempdir();
    let config = write_config(dir.path(), &json!([service("web", vec![])]));
    let state = dir.path().join("state.json");
    let out = check(&["-config", arg(&config), "-state", arg(&state)]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{}: ok (1 service, 0 backends)\n", config.display()));
    assert!(!state.exists(), "-check wrote the state file");
    assert!(!dir.path().join("state.json.lock").exists(), "-check made a lock file");

    // A corrupt state file fails the check, as it fails start-up, and is left alone.
    let state = write_file(dir.path(), "state.json", b"{");
    let out = check(&["-config", arg(&config), "-state", arg(&state)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.starts_with(&format!("shuttle: {}: ", state.display())), "{out:?}");
    assert_eq!(std::fs::read(&state).expect("read"), b"{");
}

#[test]
fn check_refuses_a_state_file_in_a_directory_others_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let state = open.join("state.json");
    let out = check(&["-state", arg(&state)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let (_, lines) = Shuttle::start_expect_failure(&["-state", arg(&state)]);
    assert_eq!(out.stderr.lines().last(), lines.last().map(String::as_str), "{lines:?}");
}

#[test]
fn check_reads_the_token_file_as_start_up_does() {
    let dir = tempdir();
    let missing = dir.path().join("token.txt");
    let out = check(&["-admin-token-file", arg(&missing)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let (_, lines) = Shuttle::start_expect_failure(&["-admin-token-file", arg(&missing)]);
    assert_eq!(out.stderr.lines().last(), lines.last().map(String::as_str), "{lines:?}");
    let empty = write_file(dir.path(), "empty.txt", b"\n");
    let out = check(&["-admin-token-file", arg(&empty)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("empty"), "{out:?}");
}
