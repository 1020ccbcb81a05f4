//! Binary upgrades at their edges (reference §3.7), first found by a review:
//! a binary reached through a symlink, `-user` with a token file only root
//! may read, systemd hearing the new pid before the old process exits,
//! counters read during the hand-over, and a unix admin socket.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::admin::get;
use crate::support::{
    backend, connect, echo, is_root, pid_after, round_trip, served_by, service, shuttle_bin, tempdir, wait_until,
    write_config, Launch, Reap, Shuttle, DEADLINE,
};

/// Whether `pid` has exited (a zombie, or gone).
fn exited(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'))
}

fn web_config(dir: &Path, echo: &crate::support::Backend) -> std::path::PathBuf {
    write_config(dir, &json!([service("web", vec![backend("b0", echo.address())])]))
}

/// A common layout: `/usr/local/bin/shuttle -> /opt/shuttle/1.2/shuttle`,
/// upgraded by repointing the link. The upgrade must run what the path names
/// now, not the binary the link named at start-up (`/proc/self/exe`).
#[test]
fn an_upgrade_runs_the_binary_at_the_path_not_the_old_symlink_target() {
    let dir = tempdir();
    let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
    for version in [&v1, &v2] {
        std::fs::create_dir(version).expect("mkdir");
        std::fs::copy(shuttle_bin(), version.join("shuttle")).expect("copy the binary");
    }
    let link = dir.path().join("shuttle");
    std::os::unix::fs::symlink(v1.join("shuttle"), &link).expect("symlink");
    let echo = echo();
    let config = web_config(dir.path(), &echo);
    let script = format!("shift; exec {} \"$@\"", link.display());
    let wrapper = ["/bin/sh", "-c", script.as_str(), "sh"];
    let args = ["-config", config.to_str().expect("utf-8"), "-grace", "1"];
    let mut shuttle = Shuttle::launch_under_with(&wrapper, &args, Launch::default());
    shuttle.wait_for_line(" listening on ");
    let tmp = dir.path().join("shuttle.new");
    std::os::unix::fs::symlink(v2.join("shuttle"), &tmp).expect("symlink v2");
    std::fs::rename(&tmp, &link).expect("repoint the link");
    shuttle.signal(libc::SIGUSR2);
    let line = shuttle.wait_for_line("upgrade: starting ");
    assert!(line.contains(&format!("starting {} ", link.display())), "the link, as invoked: {line}");
    let pid = served_by(&shuttle);
    let _reap = Reap(Some(pid));
    let running = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the new process's binary");
    assert_eq!(running, v2.join("shuttle").canonicalize().expect("v2"), "the binary the link names now");
    assert!(shuttle.wait_exit(DEADLINE).expect("the old process exits").success());
}

/// Reference §1.1: the token file is read once, at start-up, and need not
/// stay readable. With `-user`, the new process of an upgrade runs as that
/// user, so it gets the token from the old one instead of the file (0600,
/// root's, as the start-up warning asks).
#[test]
fn an_upgrade_with_user_keeps_a_token_only_root_may_read() {
    if !is_root() {
        return eprintln!("skipped: -user needs root");
    }
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod dir");
    let echo = echo();
    let config = web_config(dir.path(), &echo);
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod config");
    let token = dir.path().join("token");
    std::fs::write(&token, b"s3cret\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod token");
    let config = config.to_str().expect("utf-8");
    let token_arg = token.to_str().expect("utf-8");
    let args = ["-config", config, "-user", "nobody", "-admin-token-file", token_arg, "-grace", "1"];
    let mut shuttle = Shuttle::launch(&args, Launch::default());
    shuttle.wait_for_line(" listening on ");
    let admin = shuttle.admin_addr();
    shuttle.signal(libc::SIGUSR2);
    let pid = served_by(&shuttle);
    let _reap = Reap(Some(pid));
    assert!(shuttle.wait_exit(DEADLINE).expect("the old process exits").success());
    // The token still guards the API: no token is refused, the right one answered.
    let mut plain = crate::admin::Http::tcp(admin);
    assert_eq!(plain.request("GET", "/_info", None).status, 401);
    let mut with = crate::admin::Http::tcp(admin);
    let info = with.request_with("GET", "/_info", &["Authorization: Bearer s3cret"], None);
    assert_eq!((info.status, info.json()["pid"].as_i64()), (200, Some(i64::from(pid))));
}

/// Under systemd (`Type=notify`) the old process is the main one until systemd
/// hears `MAINPID=` of the new. Were the old one to exit first, systemd would
/// take the service for stopped and kill the new process with its cgroup. So
/// by the time the old process has exited, `MAINPID=` of the new one must be
/// queued on the notify socket already.
#[test]
fn systemd_hears_the_new_pid_before_the_old_process_exits() {
    for round in 0..5 {
        let dir = tempdir();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind the notify socket");
        receiver.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let echo = echo();
        let config = web_config(dir.path(), &echo);
        let env = vec![("NOTIFY_SOCKET".to_string(), path.to_str().expect("utf-8").to_string())];
        let args = ["-config", config.to_str().expect("utf-8"), "-grace", "5"];
        let mut shuttle = Shuttle::launch(&args, Launch { env, ..Launch::default() });
        let mut buf = [0u8; 4096];
        receiver.recv(&mut buf).expect("the first READY=1");
        let old = shuttle.pid();
        shuttle.signal(libc::SIGUSR2);
        let mut reap = Reap(None);
        let gone = wait_until(DEADLINE, || {
            reap.0 = reap.0.or_else(|| shuttle.stderr_lines().iter().find_map(|l| pid_after(l, "upgrade: process ")));
            exited(old)
        });
        assert!(gone, "round {round}: the old process never exited");
        // Read what was queued by then, without waiting.
        receiver.set_nonblocking(true).expect("nonblocking");
        let n = receiver.recv(&mut buf).unwrap_or_else(|e| panic!("round {round}: nothing queued at its exit: {e}"));
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let named: Option<i32> = text.lines().find_map(|l| l.strip_prefix("MAINPID=")).and_then(|p| p.parse().ok());
        assert!(named.is_some_and(|p| p != old && Some(p) == reap.0), "round {round}: {text:?}, new {:?}", reap.0);
        let _ = shuttle.wait_exit(DEADLINE);
    }
}

/// A scrape during the hand-over must not see more than one just after it:
/// a counter that goes back reads as a reset to Prometheus, whose `rate()`
/// then counts the whole total again. The counters go to the new process
/// once the old one has stopped accepting and closed its admin API.
#[test]
fn a_counter_read_during_the_hand_over_is_never_more_than_just_after_it() {
    let echo = echo();
    let dir = tempdir();
    let config = web_config(dir.path(), &echo);
    let env = vec![("SHUTTLE_TEST_UPGRADE_PAUSE_MS".to_string(), "1000".to_string())];
    let args = ["-config", config.to_str().expect("utf-8"), "-grace", "2"];
    let mut shuttle = Shuttle::launch(&args, Launch { env, ..Launch::default() });
    shuttle.wait_for_line(" listening on ");
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                round_trip(&mut connect(addr), &[b'x'; 1000]);
            }
        })
    };
    let sent = || get(admin, "/web").expect(200).json()["sent"].as_u64().expect("sent");
    assert!(wait_until(DEADLINE, || sent() > 0), "no traffic");
    shuttle.signal(libc::SIGUSR2);
    shuttle.wait_for_line("before saying ready");
    std::thread::sleep(Duration::from_millis(700));
    let during = sent();
    let pid = served_by(&shuttle);
    let _reap = Reap(Some(pid));
    let after = sent();
    stop.store(true, Ordering::Relaxed);
    traffic.join().expect("the traffic thread");
    assert!(after >= during, "web's sent went from {during} (during the hand-over) to {after} (just after it)");
    assert!(shuttle.wait_exit(DEADLINE).expect("the old process exits").success());
}

/// A unix admin socket is handed over like the listeners: the new process
/// answers on the same file, the old one leaves it as it exits, and the new
/// one removes it when it stops.
#[test]
fn a_unix_admin_socket_is_handed_over_and_removed_only_by_its_last_owner() {
    let dir = tempdir();
    let echo = echo();
    let config = web_config(dir.path(), &echo);
    let sock = dir.path().join("admin.sock");
    let args = ["-config", config.to_str().expect("utf-8"), "-http", sock.to_str().expect("utf-8"), "-grace", "1"];
    let mut shuttle = Shuttle::launch(&args, Launch::default());
    shuttle.wait_for_line(" listening on ");
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).expect("the socket file"));
    let before = ino(&sock);
    shuttle.signal(libc::SIGUSR2);
    let pid = served_by(&shuttle);
    let mut reap = Reap(Some(pid));
    assert!(shuttle.wait_exit(DEADLINE).expect("the old process exits").success());
    assert_eq!(ino(&sock), before, "the same socket file, left by the old process");
    let info = crate::admin::Http::unix(&sock).request("GET", "/_info", None);
    assert_eq!((info.status, info.json()["pid"].as_i64()), (200, Some(i64::from(pid))));
    // SAFETY: kill takes two integers; the pid is the new shuttle's.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(wait_until(DEADLINE, || exited(pid)), "the new process stops on SIGTERM");
    reap.0 = None;
    assert!(wait_until(DEADLINE, || !sock.exists()), "its last owner removed the socket file");
}
