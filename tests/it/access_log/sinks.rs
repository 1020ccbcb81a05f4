//! Where lines go: standard output, a FIFO that never drains, and a file
//! renamed by logrotate and reopened on SIGUSR1.

use std::fs::{self, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::line::parse;
use super::{echo_once, lines_of, metric, start, stop, wait_for_lines, Format};
use crate::support::{backend, connect, echo, round_trip, service, tempdir, wait_until, Launch, DEADLINE};

#[test]
fn a_dash_writes_lines_to_stdout_and_the_log_stays_on_stderr() {
    let echo = echo();
    let dir = tempdir();
    let out = dir.path().join("stdout");
    let launch = Launch { stdout: Some(out.clone()), ..Launch::default() };
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let mut shuttle = start(dir.path(), &config, &["-access-log", "-"], launch);
    let web = shuttle.service_addr("web");
    let clients: Vec<SocketAddr> = (0..3).map(|i| echo_once(web, format!("to stdout {i}").as_bytes())).collect();
    let lines = wait_for_lines(&out, 3);
    stop(&mut shuttle);
    let mut logged: Vec<SocketAddr> = lines.iter().map(|l| parse(Format::Text, l).client).collect();
    logged.sort();
    let mut want = clients.clone();
    want.sort();
    assert_eq!(logged, want, "stdout: {lines:#?}");
    assert_eq!(lines_of(&out).len(), 3, "stdout holds only the access lines: {:#?}", lines_of(&out));
    let stderr = shuttle.stderr_lines();
    assert!(stderr.iter().any(|l| l.contains("service web listening on")), "{stderr:#?}");
    assert!(!stderr.iter().any(|l| l.contains(" end=")), "access lines on stderr: {stderr:#?}");
}

// A sink that never drains

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path without NUL");
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// How many short connections go through while the sink is stuck.
const THROUGH_A_STUCK_SINK: usize = 3_000;
/// What one of them may take: generous, since only a sink that blocks the loop would be slower.
const PER_CONNECTION: Duration = Duration::from_secs(5);

/// Shuttle logs to a FIFO that is never read: opened by the test (the pipe
/// fills) or by nobody (shuttle's open waits forever). Proxying goes on, the
/// lost lines are counted, and SIGTERM still ends the process promptly.
fn a_stuck_sink_does_not_slow_proxying(open_for_reading: bool) {
    let echo = echo();
    let dir = tempdir();
    let fifo = dir.path().join("access.fifo");
    mkfifo(&fifo);
    // O_NONBLOCK: opening the read end does not wait for a writer; the test then never reads.
    let _reader = open_for_reading.then(|| {
        OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).expect("open the FIFO to read")
    });
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let mut shuttle = start(dir.path(), &config, &["-access-log", fifo.to_str().unwrap()], Launch::default());
    let web = shuttle.service_addr("web");
    let admin = shuttle.admin_addr();

    let started = Instant::now();
    for i in 0..THROUGH_A_STUCK_SINK {
        let one = Instant::now();
        echo_once(web, b"ping");
        let took = one.elapsed();
        assert!(took < PER_CONNECTION, "connection {i} took {took:?} with the access log stuck");
    }
    let all = started.elapsed();
    let dropped = wait_until(DEADLINE, || metric(admin, "shuttle_access_log_dropped_lines_total") > Some(0));
    assert!(dropped, "no dropped lines counted after {THROUGH_A_STUCK_SINK} connections ({all:?})");
    let written = metric(admin, "shuttle_access_log_lines_total").expect("the written count");
    let dropped = metric(admin, "shuttle_access_log_dropped_lines_total").unwrap_or_default();
    assert!(written + dropped <= THROUGH_A_STUCK_SINK as u64, "{written} written and {dropped} dropped");
    if !open_for_reading {
        assert_eq!(written, 0, "lines written to a FIFO nobody opened");
    }

    shuttle.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = shuttle.wait_exit(Duration::from_secs(5)).expect("exit within 5 s of SIGTERM with the sink stuck");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_fifo_nobody_reads_drops_lines_and_never_slows_proxying() {
    a_stuck_sink_does_not_slow_proxying(true);
}

#[test]
fn a_fifo_nobody_opens_drops_lines_and_never_slows_proxying() {
    a_stuck_sink_does_not_slow_proxying(false);
}

// logrotate: rename, SIGUSR1

#[test]
fn sigusr1_after_a_rename_starts_a_new_file_and_loses_no_line() {
    let echo = echo();
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let mut shuttle = start(dir.path(), &config, &["-access-log", log.to_str().unwrap()], Launch::default());
    let web = shuttle.service_addr("web");
    let admin = shuttle.admin_addr();

    // Each round's lines end up in the file renamed after it; the last round's stay at the path.
    let rounds = [5, 7, 3];
    let mut clients = Vec::new();
    for (round, &n) in rounds.iter().enumerate() {
        let these: Vec<SocketAddr> = (0..n).map(|i| echo_once(web, format!("round {round} #{i}").as_bytes())).collect();
        assert_eq!(wait_for_lines(&log, n).len(), n, "round {round}");
        clients.push(these);
        if round + 1 < rounds.len() {
            fs::rename(&log, dir.path().join(format!("access.log.{round}"))).expect("rename the log");
            shuttle.signal(libc::SIGUSR1);
            let reopened = wait_until(DEADLINE, || {
                shuttle.stderr_lines().iter().filter(|l| l.contains("access log: reopened")).count() == round + 1
            });
            assert!(reopened, "no reopen logged after SIGUSR1 {}", round + 1);
        }
    }
    // None lost: every line written is in one of the files, and none was dropped.
    let total: usize = rounds.iter().sum();
    let counted = wait_until(DEADLINE, || metric(admin, "shuttle_access_log_lines_total") == Some(total as u64));
    assert!(counted, "lines_total {:?}, not {total}", metric(admin, "shuttle_access_log_lines_total"));
    assert_eq!(metric(admin, "shuttle_access_log_dropped_lines_total"), Some(0));
    stop(&mut shuttle);

    for (round, these) in clients.iter().enumerate() {
        let path = if round + 1 < rounds.len() { dir.path().join(format!("access.log.{round}")) } else { log.clone() };
        let mut logged: Vec<SocketAddr> = lines_of(&path).iter().map(|l| parse(Format::Text, l).client).collect();
        logged.sort();
        let mut want = these.clone();
        want.sort();
        assert_eq!(logged, want, "round {round}: {}", path.display());
    }
}

#[test]
fn sigusr1_without_an_access_log_is_logged_and_harmless() {
    let echo = echo();
    let dir = tempdir();
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let shuttle = start(dir.path(), &config, &[], Launch::default());
    let web = shuttle.service_addr("web");
    let mut open = connect(web);
    round_trip(&mut open, b"before SIGUSR1");
    shuttle.signal(libc::SIGUSR1);
    shuttle.wait_for_line("there is no access log to reopen");
    assert!(shuttle.is_running(), "SIGUSR1 stopped shuttle");
    round_trip(&mut open, b"after SIGUSR1");
    echo_once(web, b"a new connection");
    let admin = shuttle.admin_addr();
    assert_eq!(metric(admin, "shuttle_access_log_lines_total"), None, "access-log metrics while it is off");
}
