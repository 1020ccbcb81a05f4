//! Upgrading the binary in place (issue 13): SIGUSR2 makes shuttle start the
//! binary it was started from again, hand it every listening socket (each
//! worker's, TCP, unix and UDP), the admin listener, the state-file lock and
//! the live config and health, and then drain and exit 0 once the new
//! process is serving. No connect is refused and no open connection is cut.
//!
//! The new processes are not the `Shuttle`'s child: [`procs::Successors`]
//! learns them from `GET /_info` and the log and kills them at the end. They
//! write to the same stderr pipe, so one `Shuttle` shows the log of them all.
//! The test hooks `SHUTTLE_TEST_UPGRADE_CRASH` and
//! `SHUTTLE_TEST_UPGRADE_PAUSE_MS` are set in the first shuttle's environment
//! and act in the new process it starts.

mod haproxy;
mod load;
mod procs;
mod steps;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::admin::{call, config_bytes, config_json, delete, echo_once, get, put, wait_idle};
use crate::fail_open::{checked, fast_checks, wait_health, CheckPort};
use crate::support::{
    backend, connect, echo, named, round_trip, service, shuttle_bin, tempdir, test_workers, wait_until, write_config,
    write_file, Shuttle, DEADLINE, IO_TIMEOUT,
};
use crate::udp::{client_for, exchange, udp_service, Answer, UdpServer};
use load::Load;
use procs::{alive, children, signal, Successors};
use steps::{
    args_less_upgrade_fd, assert_busy, assert_ended, assert_first_exits, assert_grew, count_after, info, line_after,
    number_after, observe, served_by, start, unix_echo, upgrade, HAND_OVER,
};

/// How many times the main test upgrades.
pub(crate) const UPGRADES: usize = 20;

// ---------------------------------------------------------------------------
// The main test: twenty upgrades under load
// ---------------------------------------------------------------------------

#[test]
fn twenty_upgrades_under_load_refuse_reset_and_corrupt_nothing() {
    let started_at = Instant::now();
    let (traffic, unused) = (echo(), echo());
    let up_check = CheckPort::open();
    let mut down_check = CheckPort::open();
    down_check.down();
    // b1's checks are refused: it is down before the load starts, and must
    // stay down in every new process (a fresh start would count it up).
    let web = fast_checks(service(
        "web",
        vec![checked("b0", traffic.address(), &up_check), checked("b1", unused.address(), &down_check)],
    ));
    let dir = tempdir();
    let config = write_config(dir.path(), &json!([web]));
    let state = dir.path().join("state.json");
    let (config_arg, state_arg) = (config.to_str().expect("UTF-8"), state.to_str().expect("UTF-8"));
    // A grace longer than the run: the long streams stay on the first process until the end.
    let mut shuttle = Shuttle::start(&["-config", config_arg, "-state", state_arg, "-grace", "120"]);
    let mut successors = Successors::of(&shuttle);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    let first = shuttle.pid();
    let first_args = args_less_upgrade_fd(first);
    wait_health(admin, "web", "b0", true);
    wait_health(admin, "web", "b1", false);
    // A change, so the state file exists and is what runs.
    put(admin, "/api", &json!({"address": "127.0.0.1:0", "backends": [backend("a0", traffic.address())]})).expect(200);
    assert_eq!(std::fs::read(&state).expect("the state file"), config_bytes(admin));
    let unused_accepted = unused.accepted();
    assert_eq!(info(admin)["workers"], json!(test_workers()));

    let load = Load::start(addr, 4, 3);
    assert!(load.wait_more(50, DEADLINE), "the load never got going: {} ok, {} failed", load.ok(), load.failed());
    let mut old = first;
    let mut took = Vec::new();
    for step in 1..=UPGRADES {
        let what = format!("upgrade {step} of {UPGRADES} (from process {old})");
        let (same, totals) = observe(admin);
        let ok_before = load.ok();
        let signalled = Instant::now();
        let new = upgrade(&shuttle, &mut successors, admin, old);
        took.push(signalled.elapsed());
        let (same_after, totals_after) = observe(admin);
        assert_eq!(same_after, same, "{what}: config, health or workers changed");
        assert_grew(&totals, &totals_after, &what);
        assert_eq!(args_less_upgrade_fd(new), first_args, "{what}: the new process's arguments");
        let exe = std::fs::read_link(format!("/proc/{new}/exe")).expect("the new process's binary");
        assert_eq!(exe, shuttle_bin().canonicalize().expect("the binary's path"), "{what}");
        if old == first {
            // It holds the long streams: it drains them, it does not exit.
            assert!(shuttle.is_running(), "{what}: the first process exited with its long streams open");
        } else {
            assert_ended(&mut successors, old, DEADLINE);
        }
        assert!(load.wait_more(50, DEADLINE), "{what}: the new process serves no connection");
        assert!(load.ok() > ok_before, "{what}: no connection completed during the step");
        assert_eq!(load.failed(), 0, "{what}: connections failed: {:#?}", load.described());
        let to_b1 = unused.accepted() - unused_accepted;
        assert_eq!(to_b1, 0, "{what}: {to_b1} connections went to b1, which its checks hold down");
        old = new;
    }
    let report = load.finish();
    eprintln!(
        "{UPGRADES} upgrades in {:?} (slowest hand-over {:?}): {}",
        started_at.elapsed(),
        took.iter().max().copied().unwrap_or_default(),
        report.summary()
    );
    report.assert_clean();
    assert_eq!(report.long_bytes.len(), 3, "{}", report.summary());
    assert!(report.long_bytes.iter().all(|&b| b > 0), "{}", report.summary());
    assert_eq!(unused.accepted(), unused_accepted, "a connection went to b1, which its checks hold down");

    // The first process ends with its long streams, and exits 0.
    let status = shuttle.wait_exit(DEADLINE).expect("the first process exits once its long streams closed");
    assert!(status.success(), "the first process after its drain: {status:?}");
    // The last one serves, takes changes and writes the state file under the lock it inherited.
    assert_eq!(served_by(admin), old);
    echo_once(addr, b"after twenty upgrades");
    put(admin, "/api/a1", &json!({"address": traffic.address()})).expect(200);
    assert_eq!(std::fs::read(&state).expect("the state file"), config_bytes(admin), "the last process saves it");
    let (status, lines) = Shuttle::start_expect_failure(&["-state", state_arg]);
    assert_eq!(status.code(), Some(1), "a second shuttle on the state file: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("in use by another shuttle")), "the lock was handed over: {lines:?}");
}

// ---------------------------------------------------------------------------
// A new process that fails
// ---------------------------------------------------------------------------

#[test]
fn a_new_process_that_crashes_mid_hand_over_leaves_the_old_one_serving() {
    let up = echo();
    let s =
        start(&json!([service("web", vec![backend("b0", up.address())])]), &[], &[("SHUTTLE_TEST_UPGRADE_CRASH", "1")]);
    let mut successors = Successors::of(&s.shuttle);
    let (admin, addr, pid) = (s.shuttle.admin_addr(), s.shuttle.service_addr("web"), s.shuttle.pid());
    let before = config_bytes(admin);
    let load = Load::start(addr, 2, 1);
    // Twice: a failed upgrade leaves nothing "in progress" behind.
    for attempt in 1..=2 {
        let seen = s.shuttle.stderr_lines().len();
        signal(pid, libc::SIGUSR2);
        let failed = line_after(&s.shuttle, seen, &[&["upgrade failed"], &[" is serving"]], HAND_OVER);
        successors.add_children_of(pid);
        assert!(failed.contains("this process keeps serving"), "attempt {attempt}: {failed}");
        assert_eq!(count_after(&s.shuttle, seen, &["upgrade: starting "]), 1, "attempt {attempt}");
        assert_eq!(count_after(&s.shuttle, seen, &["already in progress"]), 0, "attempt {attempt}");
        assert!(s.shuttle.is_running());
        assert_eq!(served_by(admin), pid, "attempt {attempt}");
        assert_eq!(config_bytes(admin), before, "attempt {attempt}");
        assert!(load.wait_more(20, DEADLINE), "attempt {attempt}: the old process stopped serving");
        // The crashed process is reaped, not left a zombie.
        assert!(
            wait_until(DEADLINE, || children(pid).is_empty()),
            "attempt {attempt}: children of {pid} left: {:?}",
            children(pid)
        );
    }
    // Changes are taken again, by the same process.
    put(admin, "/web/b1", &json!({"address": up.address()})).expect(200);
    assert_eq!(config_json(admin)[0]["backends"][1]["name"], "b1");
    assert_eq!(served_by(admin), pid);
    let report = load.finish();
    report.assert_clean();
}

#[test]
fn a_new_process_that_never_says_ready_is_given_up_after_10_s() {
    let up = echo();
    let config = json!([service("web", vec![backend("b0", up.address())])]);
    let s = start(&config, &[], &[("SHUTTLE_TEST_UPGRADE_PAUSE_MS", "25000")]);
    let mut successors = Successors::of(&s.shuttle);
    let (admin, addr, pid) = (s.shuttle.admin_addr(), s.shuttle.service_addr("web"), s.shuttle.pid());
    let before = config_bytes(admin);
    let load = Load::start(addr, 2, 1);
    let seen = s.shuttle.stderr_lines().len();
    signal(pid, libc::SIGUSR2);
    let signalled = Instant::now();
    line_after(&s.shuttle, seen, &[&["upgrade: starting "]], DEADLINE);
    let mut hung = Vec::new();
    wait_until(DEADLINE, || {
        hung = successors.add_children_of(pid);
        !hung.is_empty()
    });
    assert_eq!(hung.len(), 1, "one new process, started with -upgrade-fd: {:?}", children(pid));
    // Connections opened once the new process has the listeners but has not
    // said ready belong to the old one: they must outlive the failure.
    line_after(&s.shuttle, seen, &[&["service web listening on "]], DEADLINE);
    let mut held: Vec<_> = (0..20).map(|_| connect(addr)).collect();
    for (i, client) in held.iter_mut().enumerate() {
        round_trip(client, format!("held {i} during the pause").as_bytes());
    }
    let failed = line_after(&s.shuttle, seen, &[&["upgrade failed"], &[" is serving"]], Duration::from_secs(20));
    let waited = signalled.elapsed();
    assert!(failed.contains("this process keeps serving"), "{failed}");
    assert!(waited >= Duration::from_secs(9), "gave up after {waited:?}, not the 10 s timeout: {failed}");
    assert!(waited < Duration::from_secs(16), "gave up only after {waited:?}: {failed}");
    for (i, client) in held.iter_mut().enumerate() {
        let mut echo = vec![0; 5];
        let alive = client.write_all(b"after").and_then(|()| client.read_exact(&mut echo));
        assert!(
            alive.is_ok() && echo == b"after",
            "connection {i} of 20 opened during the pause was cut when the new process was given up: {alive:?}"
        );
        client.shutdown(Shutdown::Write).expect("half-close");
        assert_eq!(crate::support::read_to_eof(client), b"", "connection {i}");
    }
    // The old process served all along, and now takes changes again.
    assert_eq!(load.failed(), 0, "connections failed while the new process hung: {:#?}", load.described());
    assert!(load.wait_more(20, DEADLINE), "the old process stopped serving");
    assert_eq!((served_by(admin), config_bytes(admin)), (pid, before));
    put(admin, "/web/b1", &json!({"address": up.address()})).expect(200);
    // The hung process does not live on with copies of the listeners and the lock.
    assert!(
        wait_until(DEADLINE, || !alive(hung[0])),
        "the new process {} that never said ready still runs after {failed:?}",
        hung[0]
    );
    load.finish().assert_clean();
}

// ---------------------------------------------------------------------------
// The admin API during the hand-over
// ---------------------------------------------------------------------------

#[test]
fn admin_changes_during_the_hand_over_get_503_and_reads_are_answered() {
    let up = echo();
    let config = json!([service("web", vec![backend("b0", up.address())])]);
    let dir_state = tempdir();
    let state = dir_state.path().join("state.json");
    let state_arg = state.to_str().expect("UTF-8");
    let mut s = start(&config, &["-state", state_arg], &[("SHUTTLE_TEST_UPGRADE_PAUSE_MS", "1500")]);
    let mut successors = Successors::of(&s.shuttle);
    let (admin, addr, old) = (s.shuttle.admin_addr(), s.shuttle.service_addr("web"), s.shuttle.pid());
    put(admin, "/web/b1", &json!({"address": up.address()})).expect(200);
    echo_once(addr, b"some traffic, so the counters are not all zero");
    wait_idle(admin, "web");
    let (config_before, stats_before) = (config_bytes(admin), get(admin, "/").expect(200).json());
    let state_before = std::fs::read(&state).expect("the state file");

    let seen = s.shuttle.stderr_lines().len();
    signal(old, libc::SIGUSR2);
    let signalled = Instant::now();
    line_after(&s.shuttle, seen, &[&["upgrade: starting "]], DEADLINE);
    let service_body = json!({"address": "127.0.0.1:0", "backends": [backend("c0", up.address())]});
    assert_busy(put(admin, "/web", &service_body), "PUT /web");
    assert_busy(call(admin, "POST", "/web/b2", Some(&json!({"address": up.address()}).to_string())), "POST");
    assert_busy(call(admin, "PATCH", "/web", Some(r#"{"connect_timeout": 2}"#)), "PATCH /web");
    assert_busy(delete(admin, "/web/b0"), "DELETE /web/b0");
    assert_busy(put(admin, "/other", &service_body), "PUT of a new service");
    // Reads are answered, by the old process, with nothing changed.
    assert_eq!(config_bytes(admin), config_before, "a refused change changed the config");
    assert_eq!(served_by(admin), old, "GET /_info during the hand-over");
    assert_eq!(get(admin, "/web").status, 200);
    assert_eq!(std::fs::read(&state).expect("the state file"), state_before, "a refused change was saved");
    assert_eq!(count_after(&s.shuttle, seen, &[" is serving"]), 0, "the pause was over before the checks");

    let serving =
        line_after(&s.shuttle, seen, &[&["upgrade: process ", " is serving"], &["upgrade failed"]], HAND_OVER);
    assert!(!serving.contains("failed"), "{serving}");
    assert!(signalled.elapsed() >= Duration::from_millis(1400), "the new process said ready before its pause ended");
    let new = number_after(&serving, "upgrade: process ");
    successors.add(new);
    assert!(wait_until(DEADLINE, || served_by(admin) == new), "GET /_info never named {new}");
    assert_first_exits(&mut s.shuttle, DEADLINE);
    // The config and the stats are those of before, and a change now goes to the new process.
    assert_eq!(config_bytes(admin), config_before, "the config after the upgrade");
    assert_eq!(get(admin, "/").expect(200).json(), stats_before, "the stats after the upgrade");
    put(admin, "/web/b2", &json!({"address": up.address()})).expect(200);
    assert_eq!(config_json(admin)[0]["backends"][2]["name"], "b2");
    assert_eq!(std::fs::read(&state).expect("the state file"), config_bytes(admin), "the new process saves it");
    assert_eq!(served_by(admin), new);
    echo_once(addr, b"after the upgrade");
}

// ---------------------------------------------------------------------------
// Every kind of listener, and the live config
// ---------------------------------------------------------------------------

#[test]
fn unix_and_udp_services_keep_serving_across_upgrades_and_the_socket_file_stays() {
    let up = echo();
    let udp_backend = UdpServer::start("u", Answer::Tagged);
    let files = tempdir();
    let socket = files.path().join("front.sock");
    let mut dns = udp_service("dns", &[("u", &udp_backend)]);
    dns["udp_idle_timeout"] = json!(1);
    let config = json!([
        service("web", vec![backend("b0", up.address())]),
        { "name": "local", "address": format!("unix:{}", socket.display()), "backends": [backend("b0", up.address())] },
        dns,
    ]);
    let mut s = start(&config, &["-grace", "5"], &[]);
    let mut successors = Successors::of(&s.shuttle);
    let admin = s.shuttle.admin_addr();
    let (web, dns) = (s.shuttle.service_addr("web"), s.shuttle.service_addr("dns"));
    s.shuttle.wait_for_line("service local listening on unix:");
    let old_client = client_for(dns);
    let check_all = |when: &str| {
        echo_once(web, format!("TCP {when}").as_bytes());
        unix_echo(&socket, format!("unix {when}").as_bytes());
        let payload = format!("UDP {when}");
        let reply = exchange(&old_client, dns, payload.as_bytes(), IO_TIMEOUT);
        assert_eq!(reply, Some(format!("u:{payload}").into_bytes()), "the UDP client of before, {when}");
        let fresh = client_for(dns);
        let reply = exchange(&fresh, dns, payload.as_bytes(), IO_TIMEOUT);
        assert_eq!(reply, Some(format!("u:{payload}").into_bytes()), "a new UDP client, {when}");
    };
    check_all("before");
    let before = config_bytes(admin);

    let first = s.shuttle.pid();
    let second = upgrade(&s.shuttle, &mut successors, admin, first);
    check_all("after the first upgrade");
    assert_first_exits(&mut s.shuttle, Duration::from_secs(15));
    assert!(
        std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()),
        "the old process removed the socket file the new one listens on"
    );
    check_all("after the first process exited");

    // Again, from an orphan: the second process's parent is gone.
    let third = upgrade(&s.shuttle, &mut successors, admin, second);
    check_all("after the second upgrade");
    assert_ended(&mut successors, second, Duration::from_secs(15));
    assert!(std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()), "the socket file is gone");
    check_all("after the second process exited");
    assert_eq!(config_bytes(admin), before);
    assert_eq!(served_by(admin), third);
}

#[test]
fn an_upgrade_takes_the_live_config_not_the_file_shuttle_started_from() {
    let (one, two) = (named("one"), named("two"));
    let mut s = start(&json!([service("web", vec![backend("b0", one.address())])]), &[], &[]);
    let mut successors = Successors::of(&s.shuttle);
    let (admin, web) = (s.shuttle.admin_addr(), s.shuttle.service_addr("web"));
    put(admin, "/web/b1", &json!({"address": two.address()})).expect(200);
    let live = config_bytes(admin);
    // The file now says something else: the new process must not read it.
    write_config(s.dir.path(), &json!([service("other", vec![backend("x", one.address())])]));
    let first = s.shuttle.pid();
    let second = upgrade(&s.shuttle, &mut successors, admin, first);
    assert_eq!(String::from_utf8_lossy(&config_bytes(admin)), String::from_utf8_lossy(&live));
    assert_first_exits(&mut s.shuttle, DEADLINE);
    assert_eq!(served_by(admin), second);
    // Round robin over both backends, as the live config says.
    let mut reached: Vec<String> = (0..4)
        .map(|_| {
            let mut client = connect(web);
            let tag = crate::support::read_line(&mut client);
            round_trip(&mut client, b"ping");
            tag
        })
        .collect();
    reached.sort();
    assert_eq!(reached, ["one", "one", "two", "two"]);
}

#[test]
fn an_upgrade_goes_ahead_when_the_config_file_is_no_longer_valid() {
    let up = echo();
    let mut s = start(&json!([service("web", vec![backend("b0", up.address())])]), &[], &[]);
    let mut successors = Successors::of(&s.shuttle);
    let (admin, web) = (s.shuttle.admin_addr(), s.shuttle.service_addr("web"));
    let live = config_bytes(admin);
    // The running config comes in the manifest: a broken file on disk is no
    // reason to keep the old binary running.
    write_file(s.dir.path(), "config.json", b"[{ this is not a config");
    assert!(s.config.exists());
    let first = s.shuttle.pid();
    let second = upgrade(&s.shuttle, &mut successors, admin, first);
    assert_eq!(String::from_utf8_lossy(&config_bytes(admin)), String::from_utf8_lossy(&live));
    assert_first_exits(&mut s.shuttle, DEADLINE);
    assert_eq!(served_by(admin), second);
    echo_once(web, b"after an upgrade over a broken config file");
}

// ---------------------------------------------------------------------------
// Hostile signals
// ---------------------------------------------------------------------------

#[test]
fn sigusr2_twice_quickly_upgrades_once_and_a_second_in_flight_is_refused() {
    let up = echo();
    // A pause, so the second signal surely comes while the first upgrade is in flight.
    let env = [("SHUTTLE_TEST_UPGRADE_PAUSE_MS", "800")];
    let mut s = start(&json!([service("web", vec![backend("b0", up.address())])]), &[], &env);
    let mut successors = Successors::of(&s.shuttle);
    let (admin, web, first) = (s.shuttle.admin_addr(), s.shuttle.service_addr("web"), s.shuttle.pid());

    // Back to back: the kernel may merge them into one; either way one upgrade.
    let seen = s.shuttle.stderr_lines().len();
    signal(first, libc::SIGUSR2);
    signal(first, libc::SIGUSR2);
    let serving =
        line_after(&s.shuttle, seen, &[&["upgrade: process ", " is serving"], &["upgrade failed"]], HAND_OVER);
    assert!(!serving.contains("failed"), "{serving}");
    let second = number_after(&serving, "upgrade: process ");
    successors.add(second);
    assert_first_exits(&mut s.shuttle, DEADLINE);
    assert_eq!(count_after(&s.shuttle, seen, &["upgrade: starting "]), 1, "{:?}", s.shuttle.stderr_lines());
    assert_eq!(count_after(&s.shuttle, seen, &[" is serving"]), 1);
    assert!(count_after(&s.shuttle, seen, &["upgrade already in progress"]) <= 1);
    assert!(wait_until(DEADLINE, || served_by(admin) == second));
    assert!(successors.add_children_of(second).is_empty(), "the second process started an upgrade of its own");

    // The second signal once the first upgrade has surely started.
    let seen = s.shuttle.stderr_lines().len();
    signal(second, libc::SIGUSR2);
    line_after(&s.shuttle, seen, &[&["upgrade: starting "]], DEADLINE);
    signal(second, libc::SIGUSR2);
    line_after(&s.shuttle, seen, &[&["upgrade already in progress"]], DEADLINE);
    let serving =
        line_after(&s.shuttle, seen, &[&["upgrade: process ", " is serving"], &["upgrade failed"]], HAND_OVER);
    assert!(!serving.contains("failed"), "{serving}");
    let third = number_after(&serving, "upgrade: process ");
    successors.add(third);
    assert_ended(&mut successors, second, DEADLINE);
    assert_eq!(count_after(&s.shuttle, seen, &["upgrade: starting "]), 1, "{:?}", s.shuttle.stderr_lines());
    assert!(wait_until(DEADLINE, || served_by(admin) == third));
    echo_once(web, b"after two double signals");
}

#[test]
fn sigusr2_during_a_sigterm_drain_starts_no_upgrade() {
    let up = echo();
    let mut s = start(&json!([service("web", vec![backend("b0", up.address())])]), &["-grace", "30"], &[]);
    let _successors = Successors::of(&s.shuttle);
    let pid = s.shuttle.pid();
    let mut open = connect(s.shuttle.service_addr("web"));
    round_trip(&mut open, b"before");
    let seen = s.shuttle.stderr_lines().len();
    s.shuttle.signal(libc::SIGTERM);
    line_after(&s.shuttle, seen, &[&["shutting down"]], DEADLINE);
    s.shuttle.signal(libc::SIGUSR2);
    // Nothing may start: no line says so and no process is spawned, for a second.
    let started = wait_until(Duration::from_secs(1), || {
        count_after(&s.shuttle, seen, &["upgrade: starting "]) > 0 || !children(pid).is_empty()
    });
    assert!(
        !started,
        "SIGUSR2 during the drain started something: {:?}, children {:?}",
        s.shuttle.stderr_lines(),
        children(pid)
    );
    round_trip(&mut open, b"the drain goes on");
    open.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(crate::support::read_to_eof(&mut open), b"");
    let status = s.shuttle.wait_exit(DEADLINE).expect("exit once the last pair closed");
    assert!(status.success(), "{status:?}");
    let upgraded =
        count_after(&s.shuttle, seen, &["upgrade: starting "]) + count_after(&s.shuttle, seen, &[" is serving"]);
    assert_eq!(upgraded, 0, "{:?}", s.shuttle.stderr_lines());
}
