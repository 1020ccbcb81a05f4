//! Hostile and edge cases: paths that cannot be opened, an unknown format,
//! the file's mode and appending across restarts, many connections at once.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use super::line::parse;
use super::{echo_once, lines_of, start, stop, wait_for_lines, Format};
use crate::support::{
    backend, connect, echo, error_line, read_to_eof, round_trip, run_to_exit, service, tempdir, Launch, Shuttle,
};

#[test]
fn an_unwritable_access_log_path_fails_start_up_naming_it() {
    let dir = tempdir();
    let missing = dir.path().join("missing").join("access.log");
    for path in [dir.path(), missing.as_path()] {
        let shown = path.to_str().unwrap();
        let (status, lines) = Shuttle::start_expect_failure(&["-access-log", shown]);
        assert_eq!(status.code(), Some(1), "-access-log {shown}: {status:?}: {lines:#?}");
        let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("shuttle:")).collect();
        assert_eq!(errors.len(), 1, "-access-log {shown}: not one error line: {lines:#?}");
        assert!(error_line(&lines, &[shown, "access log"]).is_some(), "the error does not name {shown}: {errors:?}");
    }
    assert!(!missing.exists() && !missing.parent().unwrap().exists(), "start-up created the missing directory");
}

#[test]
fn an_unknown_access_log_format_exits_2() {
    let out = run_to_exit(&["-access-log-format", "xml"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let first = out.stderr.lines().find(|l| l.starts_with("shuttle:")).unwrap_or_default();
    for word in ["-access-log-format", "xml", "text", "json"] {
        assert!(first.contains(word), "{word:?} missing from {first:?}");
    }
}

#[test]
fn the_log_is_created_0640_and_appended_to_across_a_restart() {
    let echo = echo();
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let args = ["-access-log", log.to_str().unwrap()];
    // umask 0: the mode is the one shuttle asks for, not what a umask left of 0666.
    let launch = Launch { umask: Some(0), ..Launch::default() };

    let mut first = start(dir.path(), &config, &args, launch.clone());
    let mode = fs::metadata(&log).expect("the log exists at start-up").permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "mode {mode:o}");
    let web = first.service_addr("web");
    for i in 0..2 {
        echo_once(web, format!("first run {i}").as_bytes());
    }
    let before = wait_for_lines(&log, 2);
    stop(&mut first);

    let mut second = start(dir.path(), &config, &args, launch);
    let web = second.service_addr("web");
    for i in 0..3 {
        echo_once(web, format!("second run {i}").as_bytes());
    }
    let after = wait_for_lines(&log, 5);
    stop(&mut second);
    assert_eq!(after[..2], before[..], "the first run's lines changed");
    assert_eq!(lines_of(&log).len(), 5);
    assert_eq!(fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o640);
}

#[test]
fn two_hundred_connections_at_once_give_two_hundred_whole_lines() {
    const N: usize = 200;
    let echo = echo();
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let args = ["-access-log", log.to_str().unwrap(), "-access-log-format", "json"];
    let mut shuttle = start(dir.path(), &config, &args, Launch::default());
    let web = shuttle.service_addr("web");

    // All open at once, each with a payload of its own length, then all closed together.
    let mut clients: Vec<(TcpStream, Vec<u8>)> =
        (0..N).map(|i| (connect(web), vec![b'a' + (i % 26) as u8; i + 1])).collect();
    for (client, payload) in &mut clients {
        round_trip(client, payload);
    }
    for (client, _) in &clients {
        client.shutdown(Shutdown::Write).expect("shut write");
    }
    let mut want = BTreeMap::new();
    for (client, payload) in &mut clients {
        assert_eq!(read_to_eof(client), b"");
        want.insert(client.local_addr().unwrap(), payload.len() as u64);
    }
    let lines = wait_for_lines(&log, N);
    stop(&mut shuttle);
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.ends_with('\n'));
    assert_eq!(text.lines().count(), N, "{text}");
    let mut got = BTreeMap::new();
    for raw in &lines {
        let line = parse(Format::Json, raw);
        assert_eq!((line.end.as_str(), line.sent), ("client_closed", line.received), "{raw}");
        assert_eq!(got.insert(line.client, line.sent), None, "two lines for {}", line.client);
    }
    assert_eq!(got, want);
}
