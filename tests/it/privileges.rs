//! `-user` and `-group` (reference §1): shuttle drops root once the admin API
//! and its listeners are bound, every thread becomes the new user, and the
//! control thread keeps `CAP_NET_BIND_SERVICE` alone, so that a service added
//! later can listen below 1024; without that capability such a PUT is a 409
//! that changes nothing. Switching needs root: those tests skip otherwise,
//! and say so.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::admin::{config_bytes, get, put};
use crate::startup::expect_startup_error;
use crate::state::{path_str, snapshot};
use crate::support::{
    connect, echo, error_line, is_root, one_backend, round_trip, run_to_exit, tempdir, wait_until, write_config,
    Launch, Shuttle, DEADLINE,
};

/// `CAP_NET_BIND_SERVICE` as a capability mask.
const NET_BIND: u64 = 1 << 10;

/// Whether the test can run; prints why not when it can't.
fn root_or_skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("skipped {test}: switching user needs root, and these tests run as uid {}", uid_now());
    }
    is_root()
}

fn uid_now() -> u32 {
    // SAFETY: getuid takes no arguments and cannot fail.
    unsafe { libc::getuid() }
}

/// `id OPTION nobody`, as numbers.
fn id_of_nobody(option: &str) -> Vec<u32> {
    let out = Command::new("id").args([option, "nobody"]).output().expect("run id");
    assert!(out.status.success(), "this system has no user nobody: {out:?}");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(|n| n.parse().expect("a number from id")).collect()
}

/// Nobody's uid and primary gid.
fn nobody() -> (u32, u32) {
    (id_of_nobody("-u")[0], id_of_nobody("-g")[0])
}

/// A fresh temporary directory and, inside it, one nobody owns; `None`
/// (saying why) when the tests cannot switch user.
fn nobody_home(test: &str) -> Option<(TempDir, PathBuf)> {
    if !root_or_skip(test) {
        return None;
    }
    let dir = tempdir();
    let home = nobodys_dir(dir.path());
    Some((dir, home))
}

/// A directory nobody owns (and so may write), inside a fresh temporary one.
fn nobodys_dir(dir: &Path) -> PathBuf {
    let (uid, gid) = nobody();
    // The temporary directory is root's, mode 0700: nobody must be able to pass through it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod the temporary directory");
    let inner = dir.join("nobody");
    std::fs::create_dir(&inner).expect("mkdir");
    chown(&inner, Some(uid), Some(gid)).expect("chown to nobody");
    inner
}

/// Each thread's `/proc/PID/task/TID/status` fields, with its name and whether it is the main thread.
fn tasks(pid: i32) -> Vec<(String, bool, HashMap<String, String>)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the tasks") {
        let dir = entry.expect("task entry").path();
        let (Ok(status), Ok(comm)) =
            (std::fs::read_to_string(dir.join("status")), std::fs::read_to_string(dir.join("comm")))
        else {
            continue; // a thread that just ended
        };
        let fields = status
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
            .collect();
        let main = dir.file_name().and_then(|n| n.to_str()) == Some(&pid.to_string());
        all.push((comm.trim().to_string(), main, fields));
    }
    all
}

fn mask(fields: &HashMap<String, String>, name: &str) -> u64 {
    u64::from_str_radix(&fields[name], 16).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A port below 1024 that nothing listens on now, tried downwards from `from`.
fn free_low_port(from: u16) -> u16 {
    (from - 100..=from)
        .rev()
        .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        .unwrap_or_else(|| panic!("no free port from {} to {from}", from - 100))
}

/// A service body on `address` with one backend.
fn service_at(address: &str, backend: &str) -> Value {
    json!({ "address": address, "backends": [{ "name": "b0", "address": backend }] })
}

#[test]
fn every_thread_runs_as_the_new_user_and_only_the_control_thread_keeps_a_capability() {
    let Some((_dir, home)) = nobody_home("every_thread_runs_as_the_new_user") else { return };
    let (uid, gid) = nobody();
    let groups: Vec<String> = id_of_nobody("-G").iter().map(u32::to_string).collect();
    let state = home.join("state.json");
    let log = home.join("access.log");
    let shuttle = Shuttle::launch(
        &["-user", "nobody", "-workers", "2", "-state", path_str(&state), "-access-log", path_str(&log)],
        Launch::default(),
    );
    shuttle.wait_for_line("running as user nobody");
    shuttle.admin_addr();

    let all = tasks(shuttle.pid());
    let names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("shuttle-w")).count(), 2, "two worker threads: {names:?}");
    for (name, main, f) in &all {
        for (field, want) in [("Uid", uid), ("Gid", gid)] {
            assert_eq!(f[field], format!("{want} {want} {want} {want}"), "{field} of thread {name}");
        }
        assert_eq!(f["Groups"], groups.join(" "), "supplementary groups of thread {name}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            let got = mask(f, set);
            if *main {
                // The control loop binds every listener: it keeps the one capability.
                assert_eq!(got, NET_BIND, "{set} of the control thread");
            } else {
                assert_eq!(got & !NET_BIND, 0, "{set} of thread {name} holds more than CAP_NET_BIND_SERVICE: {got:x}");
            }
        }
        if name.starts_with("shuttle-w") {
            assert_eq!(mask(f, "CapEff"), 0, "a worker thread binds nothing, so it keeps no capability");
        }
    }
    // The access log start-up created is the new user's, so SIGUSR1 can open it again.
    let meta = std::fs::metadata(&log).expect("stat the access log");
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    // The process still counts its own descriptors (/proc/self/fd of a process that changed uid).
    let (status, _, metrics) = crate::metrics::raw(shuttle.admin_addr(), "GET", "/metrics");
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("shuttle_open_fds ")), "{metrics}");
}

#[test]
fn after_the_switch_a_put_below_1024_listens_proxies_and_is_saved() {
    let Some((_dir, home)) = nobody_home("after_the_switch_a_put_below_1024_listens") else { return };
    let (uid, _) = nobody();
    let echo = echo();
    let state = home.join("state.json");
    let shuttle = Shuttle::launch(&["-user", "nobody", "-state", path_str(&state)], Launch::default());
    shuttle.wait_for_line("kept CAP_NET_BIND_SERVICE");
    let admin = shuttle.admin_addr();

    let port = free_low_port(999);
    let address = format!("127.0.0.1:{port}");
    put(admin, "/low", &service_at(&address, &echo.address())).expect(200);
    let mut client = connect(address.parse::<SocketAddr>().expect("address"));
    round_trip(&mut client, b"below 1024, as nobody\n");

    // The state file was saved by the new user, in its directory.
    let saved = std::fs::read_to_string(&state).expect("read the state file");
    assert!(saved.contains(&address), "{saved}");
    assert_eq!(std::fs::metadata(&state).expect("stat").uid(), uid);
    drop(client);
    drop(shuttle);

    // And a restart as nobody loads it, and listens below 1024 again (bound as root).
    let again = Shuttle::launch(&["-user", "nobody", "-state", path_str(&state)], Launch::default());
    let needle = format!("service low listening on {address}");
    again.wait_for_line(&needle);
    let mut client = connect(address.parse::<SocketAddr>().expect("address"));
    round_trip(&mut client, b"again\n");
}

/// PUTs a service below 1024 on a shuttle that lacks the capability: a 409
/// naming it, and neither the running config nor the state file changes.
fn refused_below_1024(shuttle: &Shuttle, state: &Path, from: u16) {
    let echo = echo();
    let admin = shuttle.admin_addr();
    // A first change writes the state file, so that there is one to compare.
    put(admin, "/high", &service_at("127.0.0.1:0", &echo.address())).expect(200);
    let config = config_bytes(admin);
    let file = snapshot(state);

    let port = free_low_port(from);
    let response = put(admin, "/low", &service_at(&format!("127.0.0.1:{port}"), &echo.address())).expect(409);
    let error = response.error();
    assert!(error.contains(&format!("127.0.0.1:{port}")) && error.contains("CAP_NET_BIND_SERVICE"), "{error}");
    assert!(error.contains("below 1024"), "{error}");
    assert_eq!(config_bytes(admin), config, "a refused PUT changed the running config");
    assert_eq!(snapshot(state), file, "a refused PUT touched the state file");
    get(admin, "/low").expect(404);
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok(), "the refused port is left free");
}

#[test]
fn without_the_capability_a_put_below_1024_is_409_and_changes_nothing() {
    let Some((_dir, home)) = nobody_home("without_the_capability_a_put_below_1024_is_409") else { return };
    let (uid, gid) = nobody();

    // Started as nobody with no capability at all.
    let state = home.join("plain.json");
    let ids = [format!("--reuid={uid}"), format!("--regid={gid}")];
    let wrapper = ["setpriv", &ids[0], &ids[1], "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"];
    let plain = Shuttle::launch_under(&wrapper, &["-state", path_str(&state)]);
    refused_below_1024(&plain, &state, 949);

    // Started as root, but without CAP_NET_BIND_SERVICE to keep: -user says so, and the PUT is refused too.
    let state = home.join("narrowed.json");
    let wrapper = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_bind_service"];
    let narrowed = Shuttle::launch_under(&wrapper, &["-user", "nobody", "-state", path_str(&state)]);
    narrowed.wait_for_line("with no capability");
    refused_below_1024(&narrowed, &state, 899);
}

#[test]
fn an_unknown_user_or_group_fails_start_up_with_one_line() {
    expect_startup_error(&["-user", "no-such-user-here"], &["-user no-such-user-here", "no user"]);
    if Command::new("id").arg("nobody").output().is_ok_and(|o| o.status.success()) {
        expect_startup_error(&["-user", "nobody", "-group", "no-such-group"], &["-group no-such-group", "no group"]);
    }
    expect_startup_error(&["-user", "3999999999"], &["-user 3999999999", "give -group too"]);
    expect_startup_error(&["-user", "root"], &["-user root", "is root"]);
    expect_startup_error(&["-user", "0"], &["-user 0", "is root"]);
    // -group alone is a bad command line.
    let (status, lines) = Shuttle::start_expect_failure(&["-group", "nogroup"]);
    assert_eq!(status.code(), Some(2), "{lines:#?}");
    assert!(error_line(&lines, &["-group: needs -user"]).is_some(), "{lines:#?}");
}

#[test]
fn a_root_admin_api_other_hosts_can_reach_needs_user() {
    if !root_or_skip("a_root_admin_api_other_hosts_can_reach_needs_user") {
        return;
    }
    for public in ["0.0.0.0:0", "[::]:0"] {
        expect_startup_error(&["-http", public], &["admin API", public, "-user NAME"]);
    }
    // -check judges it the same way, and passes with -user.
    let refused = run_to_exit(&["-check", "-http", "0.0.0.0:9090"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("-user NAME"), "{refused:?}");
    let passed = run_to_exit(&["-check", "-http", "0.0.0.0:9090", "-user", "nobody"]);
    assert_eq!(passed.status.code(), Some(0), "{passed:?}");
    // With -user it runs, and so does a loopback or unix socket admin API as root.
    let dropped = Shuttle::launch(&["-http", "0.0.0.0:0", "-user", "nobody"], Launch::default());
    dropped.admin_addr();
    let loopback = Shuttle::launch(&["-http", "127.0.0.1:0"], Launch::default());
    get(loopback.admin_addr(), "/_config").expect(200);
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    let unix = Shuttle::launch(&["-http", path_str(&socket)], Launch::default());
    unix.wait_for_line("admin listening on");
}

#[test]
fn files_the_new_user_cannot_reach_fail_start_up_before_anything_is_served() {
    let Some((dir, home)) = nobody_home("files_the_new_user_cannot_reach_fail_start_up") else { return };
    // Root's own directory, which nobody cannot enter.
    let private = dir.path().join("root-only");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");

    let state = private.join("state.json");
    let line = expect_startup_error(
        &["-user", "nobody", "-state", path_str(&state)],
        &[path_str(&state), "cannot create files in"],
    );
    assert!(line.contains(path_str(&private)), "the line names the directory: {line}");

    let config = write_config(&private, &one_backend("127.0.0.1:1"));
    expect_startup_error(&["-user", "nobody", "-config", path_str(&config)], &[path_str(&config), "SIGHUP"]);

    // An access log that exists and is root's: SIGUSR1 could not open it again.
    let log = home.join("root.log");
    std::fs::write(&log, b"").expect("write the log");
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    expect_startup_error(&["-user", "nobody", "-access-log", path_str(&log)], &[path_str(&log), "SIGUSR1"]);
}

#[test]
fn check_judges_the_state_directory_as_the_user_shuttle_will_run_as() {
    let Some((dir, home)) = nobody_home("check_judges_the_state_directory_as_the_user") else { return };
    let state = home.join("state.json");
    let config = write_config(dir.path(), &one_backend("127.0.0.1:1"));
    let args = ["-check", "-config", path_str(&config), "-state", path_str(&state)];
    let refused = run_to_exit(&args);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("belongs to user"), "{refused:?}");
    let with_user = [&args[..], &["-user", "nobody"]].concat();
    let passed = run_to_exit(&with_user);
    assert_eq!(passed.status.code(), Some(0), "{passed:?}");
    assert!(passed.stdout.contains(": ok (1 service, 1 backend)"), "{passed:?}");
}

#[test]
fn switching_user_without_root_fails_with_one_line() {
    if !root_or_skip("switching_user_without_root_fails_with_one_line") {
        return;
    }
    let (uid, gid) = nobody();
    let ids = [format!("--reuid={uid}"), format!("--regid={gid}")];
    let wrapper = ["setpriv", &ids[0], &ids[1], "--clear-groups", "--inh-caps=-all"];
    let mut shuttle = Shuttle::launch_under(&wrapper, &["-user", "nobody"]);
    let words = ["-user nobody: cannot switch", "needs shuttle to start as root"];
    let said = wait_until(DEADLINE, || error_line(&shuttle.stderr_lines(), &words).is_some());
    assert!(said, "no line with {words:?}: {:#?}", shuttle.stderr_lines());
    let status = shuttle.wait_exit(DEADLINE).expect("shuttle exits");
    assert_eq!(status.code(), Some(1), "{:#?}", shuttle.stderr_lines());
}

#[test]
fn a_state_file_the_new_user_writes_chooses_nothing_root_opens() {
    let Some((dir, home)) = nobody_home("a_state_file_the_new_user_writes_chooses_nothing_root_opens") else { return };
    let (uid, gid) = nobody();
    // What a compromised shuttle, running as nobody, could write for root's next start.
    let planted = dir.path().join("planted.log");
    let state = home.join("state.json");
    let text = json!({ "access_log": { "path": path_str(&planted) }, "services": [] }).to_string();
    std::fs::write(&state, text).expect("write the state file");
    chown(&state, Some(uid), Some(gid)).expect("chown");
    let shuttle = Shuttle::launch(&["-user", "nobody", "-state", path_str(&state)], Launch::default());
    shuttle.wait_for_line("are not used");
    shuttle.wait_for_line("running as user nobody");
    assert!(!planted.exists(), "root opened an access log the state file named");
    drop(shuttle);

    // Nor may the state file be a link to a file only root may read.
    let secret = dir.path().join("secret.json");
    std::fs::write(&secret, "[]").expect("write");
    let link = home.join("link.json");
    std::os::unix::fs::symlink(&secret, &link).expect("symlink");
    expect_startup_error(&["-user", "nobody", "-state", path_str(&link)], &[path_str(&link), "symbolic link"]);
}

#[test]
fn after_an_upgrade_only_the_control_thread_keeps_the_capability_and_binds_below_1024() {
    let Some((_dir, home)) = nobody_home("after_an_upgrade_only_the_control_thread") else { return };
    let log = home.join("access.log");
    let shuttle =
        Shuttle::launch(&["-user", "nobody", "-workers", "2", "-access-log", path_str(&log)], Launch::default());
    shuttle.wait_for_line("running as user nobody");
    let admin = shuttle.admin_addr();
    shuttle.signal(libc::SIGUSR2);
    let pid = crate::support::served_by(&shuttle);
    let _reap = crate::support::Reap(Some(pid));
    // Its threads are all up once it answers the admin API.
    assert!(crate::support::wait_until(crate::support::DEADLINE, || {
        crate::admin::get(admin, "/_info").json()["pid"] == pid
    }));
    let all = tasks(pid);
    assert!(all.iter().filter(|(n, _, _)| n.starts_with("shuttle-w")).count() == 2, "{all:?}");
    for (name, main, f) in &all {
        let want = if *main { NET_BIND } else { 0 };
        for set in ["CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(mask(f, set), want, "{set} of thread {name} of the new process");
        }
    }
    // The control thread still binds below 1024 for a service added now.
    let port = free_low_port(1000);
    let backend = crate::support::echo();
    let body = service_at(&format!("127.0.0.1:{port}"), &backend.address().to_string());
    crate::admin::put(admin, "/low", &body).expect(200);
}
