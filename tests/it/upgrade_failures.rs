//! Binary upgrades that fail before the new process serves (reference §3.7):
//! the binary at shuttle's path exits at once, is missing, or never answers.
//! Each time the old process logs `upgrade failed`, kills what it started,
//! and serves on exactly as before: traffic, the same pid, admin changes.
//! Then the real binary goes back at the path, and the upgrade works.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::admin::{config_json, get, put};
use crate::support::{
    backend, connect, echo, round_trip, served_by, service, shuttle_bin, started_by, tempdir, wait_until, write_config,
    Backend, Launch, Reap, Shuttle, DEADLINE,
};

/// Starts shuttle from a copy of the binary at `dir/shuttle`, so that the
/// test may replace it, with service `web` on `echo`.
fn start_from_copy(dir: &Path, echo: &Backend, env: Vec<(String, String)>) -> (Shuttle, PathBuf) {
    let exe = dir.join("shuttle");
    std::fs::copy(shuttle_bin(), &exe).expect("copy the binary");
    let config = write_config(dir, &json!([service("web", vec![backend("b0", echo.address())])]));
    // The wrapper drops the path the harness puts first and runs the copy in its place.
    let script = format!("shift; exec {} \"$@\"", exe.display());
    let wrapper = ["/bin/sh", "-c", script.as_str(), "sh"];
    let launch = Launch { env, ..Launch::default() };
    let shuttle =
        Shuttle::launch_under_with(&wrapper, &["-config", config.to_str().expect("utf-8"), "-grace", "5"], launch);
    shuttle.wait_for_line(" listening on ");
    (shuttle, exe)
}

/// Puts `bytes` at `exe` as an executable, through a rename (the running binary is never written).
fn replace(exe: &Path, bytes: &[u8]) {
    let tmp = exe.with_extension("new");
    std::fs::write(&tmp, bytes).expect("write the replacement");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, exe).expect("rename over the binary");
}

/// After a failed upgrade: one `upgrade failed` line with `why`, the same pid, traffic, and admin changes.
fn serves_on(shuttle: &Shuttle, why: &str) {
    let line = shuttle.wait_for_line("upgrade failed");
    assert!(line.contains(why) && line.contains("this process keeps serving"), "{line}");
    let admin = shuttle.admin_addr();
    assert_eq!(get(admin, "/_info").expect(200).json()["pid"], shuttle.pid());
    round_trip(&mut connect(shuttle.service_addr("web")), b"still served");
    let before = config_json(admin);
    let mut web = before[0].clone();
    web["client_timeout"] = json!(7);
    put(admin, "/web", &web).expect(200);
    assert_eq!(config_json(admin)[0]["client_timeout"], 7, "changes are taken again");
}

/// Puts the real binary back and upgrades: the failures left nothing behind that stops it.
fn upgrades_after_all(shuttle: &mut Shuttle, exe: &Path) {
    let admin = shuttle.admin_addr();
    let config = config_json(admin);
    replace(exe, &std::fs::read(shuttle_bin()).expect("read the binary"));
    shuttle.signal(libc::SIGUSR2);
    let pid = served_by(shuttle);
    let _reap = Reap(Some(pid));
    assert!(shuttle.wait_exit(DEADLINE).expect("the old process drains and exits").success());
    assert_eq!(get(admin, "/_info").expect(200).json()["pid"], pid);
    assert_eq!(config_json(admin), config, "the config carried over");
    round_trip(&mut connect(shuttle.service_addr("web")), b"served by the new process");
}

#[test]
fn a_new_binary_that_exits_at_once_leaves_the_old_process_serving() {
    let dir = tempdir();
    let echo = echo();
    let (mut shuttle, exe) = start_from_copy(dir.path(), &echo, Vec::new());
    replace(&exe, b"#!/bin/sh\necho 'not shuttle' >&2\nexit 3\n");
    shuttle.signal(libc::SIGUSR2);
    serves_on(&shuttle, "exit status: 3");
    upgrades_after_all(&mut shuttle, &exe);
}

#[test]
fn a_missing_binary_leaves_the_old_process_serving() {
    let dir = tempdir();
    let echo = echo();
    let (mut shuttle, exe) = start_from_copy(dir.path(), &echo, Vec::new());
    std::fs::remove_file(&exe).expect("remove the binary");
    shuttle.signal(libc::SIGUSR2);
    serves_on(&shuttle, "cannot start");
    upgrades_after_all(&mut shuttle, &exe);
}

#[test]
fn a_new_process_that_never_answers_is_killed_at_the_deadline() {
    let dir = tempdir();
    let echo = echo();
    let env = vec![("SHUTTLE_TEST_UPGRADE_DEADLINE_MS".to_string(), "1000".to_string())];
    let (mut shuttle, exe) = start_from_copy(dir.path(), &echo, env);
    // It holds the hand-over socket open and reads nothing.
    replace(&exe, b"#!/bin/sh\nexec sleep 60\n");
    shuttle.signal(libc::SIGUSR2);
    let pid = started_by(&shuttle);
    let _reap = Reap(Some(pid));
    serves_on(&shuttle, "was not ready within 1s");
    let gone = wait_until(DEADLINE, || !Path::new(&format!("/proc/{pid}")).exists());
    assert!(gone, "the process that never answered was killed and reaped");
    upgrades_after_all(&mut shuttle, &exe);
}

#[test]
fn sigterm_during_the_hand_over_stops_both_processes() {
    let dir = tempdir();
    let echo = echo();
    let env = vec![("SHUTTLE_TEST_UPGRADE_PAUSE_MS".to_string(), "1000".to_string())];
    let (mut shuttle, _exe) = start_from_copy(dir.path(), &echo, env);
    shuttle.signal(libc::SIGUSR2);
    let pid = started_by(&shuttle);
    let _reap = Reap(Some(pid));
    // The new process holds the sockets and waits before saying it is ready.
    shuttle.wait_for_line("before saying ready");
    shuttle.signal(libc::SIGTERM);
    let line = shuttle.wait_for_line("but this one is shutting down");
    assert!(line.contains(&format!("process {pid} is ready")), "{line}");
    assert!(shuttle.wait_exit(DEADLINE).expect("the old process drains and exits").success());
    let gone = wait_until(DEADLINE, || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| stat.contains(") Z "))
    });
    assert!(gone, "the new process was told to stop too, and did");
    assert!(!shuttle.stderr_lines().iter().any(|l| l.contains(" is serving; ")), "no hand-over happened");
}
