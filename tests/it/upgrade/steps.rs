//! What the upgrade tests share: starting a shuttle with test hooks in its
//! environment, reading the log of every process, one upgrade step, and what
//! must be the same (or may only grow) across one.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::procs::{cmdline, signal, Ended, Successors};
use crate::admin::{config_bytes, config_json, get, Response};
use crate::support::{tempdir, wait_until, write_config, Launch, Shuttle, DEADLINE, IO_TIMEOUT};

/// How long a hand-over may take under load: the new process starts, loads
/// the manifest and binds nothing.
pub(super) const HAND_OVER: Duration = Duration::from_secs(15);

/// A shuttle started with `-config FILE` (from `config`), `args` and the
/// environment `env`; the directory holds the config and anything else the
/// test puts there.
pub(super) struct Started {
    pub shuttle: Shuttle,
    pub dir: TempDir,
    pub config: PathBuf,
}

pub(super) fn start(config: &Value, args: &[&str], env: &[(&str, &str)]) -> Started {
    let dir = tempdir();
    let path = write_config(dir.path(), config);
    let mut all = vec!["-config", path.to_str().expect("UTF-8 temp path")];
    all.extend_from_slice(args);
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let shuttle = Shuttle::launch(&all, Launch { env, ..Launch::default() });
    shuttle.wait_for_line(" listening on ");
    Started { shuttle, dir, config: path }
}

/// `GET /_info` as JSON.
#[track_caller]
pub(super) fn info(admin: SocketAddr) -> Value {
    get(admin, "/_info").expect(200).json()
}

/// The pid `GET /_info` names.
#[track_caller]
pub(super) fn served_by(admin: SocketAddr) -> i32 {
    let info = info(admin);
    info["pid"].as_i64().and_then(|p| i32::try_from(p).ok()).unwrap_or_else(|| panic!("no pid in {info}"))
}

/// The first log line after the first `seen` that contains all of one of
/// `alternatives`, waited for up to `within`.
#[track_caller]
pub(super) fn line_after(shuttle: &Shuttle, seen: usize, alternatives: &[&[&str]], within: Duration) -> String {
    let mut found = None;
    wait_until(within, || {
        let lines = shuttle.stderr_lines();
        found = lines.get(seen..).unwrap_or_default().iter().find(|l| matches_any(l, alternatives)).cloned();
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!("no log line with {alternatives:?} within {within:?}: {:#?}", shuttle.stderr_lines().get(seen..))
    })
}

pub(super) fn matches_any(line: &str, alternatives: &[&[&str]]) -> bool {
    alternatives.iter().any(|words| words.iter().all(|w| line.contains(w)))
}

/// How many log lines after the first `seen` contain all of `words`.
pub(super) fn count_after(shuttle: &Shuttle, seen: usize, words: &[&str]) -> usize {
    shuttle.stderr_lines().get(seen..).unwrap_or_default().iter().filter(|l| matches_any(l, &[words])).count()
}

/// The number right after `prefix` in `line`.
#[track_caller]
pub(super) fn number_after(line: &str, prefix: &str) -> i32 {
    let start = line.find(prefix).unwrap_or_else(|| panic!("no {prefix:?} in {line:?}")) + prefix.len();
    let digits: String = line[start..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|e| panic!("no number after {prefix:?} in {line:?}: {e}"))
}

/// The arguments of `pid` after the program, less the hidden `-upgrade-fd N`.
pub(super) fn args_less_upgrade_fd(pid: i32) -> Vec<String> {
    let mut args = cmdline(pid).into_iter().skip(1);
    let mut kept = Vec::new();
    while let Some(arg) = args.next() {
        match arg.trim_start_matches('-') {
            "upgrade-fd" => {
                args.next();
            }
            flag if flag.starts_with("upgrade-fd=") => {}
            _ => kept.push(arg),
        }
    }
    kept
}

/// Upgrades the process `old`: SIGUSR2, then the old one's "is serving" line
/// (an "upgrade failed" line fails the test), the new one's "took over"
/// line, and `GET /_info` naming the new process. Returns the new pid.
#[track_caller]
pub(super) fn upgrade(shuttle: &Shuttle, successors: &mut Successors, admin: SocketAddr, old: i32) -> i32 {
    let seen = shuttle.stderr_lines().len();
    signal(old, libc::SIGUSR2);
    let outcome = line_after(shuttle, seen, &[&["upgrade: process ", " is serving"], &["upgrade failed"]], HAND_OVER);
    successors.add_children_of(old);
    assert!(!outcome.contains("upgrade failed"), "the upgrade of {old} failed: {outcome}");
    let new = number_after(&outcome, "upgrade: process ");
    successors.add(new);
    assert_ne!(new, old, "{outcome}");
    let took_over = line_after(shuttle, seen, &[&["upgrade: took over ", &format!("from process {old}")]], DEADLINE);
    assert!(
        wait_until(DEADLINE, || served_by(admin) == new),
        "GET /_info still names {} after {outcome:?}",
        served_by(admin)
    );
    let services = number_after(&took_over, "upgrade: took over ");
    assert_eq!(services as usize, config_json(admin).as_array().map_or(0, Vec::len), "{took_over}");
    new
}

/// What must be the same before and after an upgrade.
#[derive(Debug, PartialEq)]
pub(super) struct Same {
    /// `GET /_config`, byte for byte.
    pub config: Vec<u8>,
    /// Every backend's `up`, by service and backend.
    pub health: BTreeMap<String, bool>,
    /// `GET /_info`'s worker count.
    pub workers: Value,
}

/// What may only grow across an upgrade: counters of every service and backend.
pub(super) type Totals = BTreeMap<String, u64>;

pub(super) const GROWING: [&str; 5] = ["connections", "sent", "received", "check_success", "check_fail"];

pub(super) fn observe(admin: SocketAddr) -> (Same, Totals) {
    let config = config_bytes(admin);
    let stats = get(admin, "/").expect(200).json();
    let (mut health, mut totals) = (BTreeMap::new(), BTreeMap::new());
    for service in stats.as_array().expect("a list of services") {
        let name = service["name"].as_str().unwrap_or_default();
        for field in ["connections", "sent", "received"] {
            totals.insert(format!("{name} {field}"), service[field].as_u64().unwrap_or(0));
        }
        for b in service["backends"].as_array().into_iter().flatten() {
            let key = format!("{name}/{}", b["name"].as_str().unwrap_or_default());
            health.insert(key.clone(), b["up"] == true);
            for field in GROWING {
                totals.insert(format!("{key} {field}"), b[field].as_u64().unwrap_or(0));
            }
        }
    }
    (Same { config, health, workers: info(admin)["workers"].clone() }, totals)
}

/// Asserts that every counter of `after` is at least its value in `before`.
#[track_caller]
pub(super) fn assert_grew(before: &Totals, after: &Totals, step: &str) {
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "{step}");
    let fell: Vec<_> = before.iter().filter(|(k, v)| after[k.as_str()] < **v).collect();
    assert!(fell.is_empty(), "{step}: counters went back (the stats were not carried over): {fell:?} now {after:?}");
}

/// Waits for the old process `old` to end after its drain; it must exit 0
/// when the test can read its status.
#[track_caller]
pub(super) fn assert_ended(successors: &mut Successors, old: i32, within: Duration) {
    match successors.wait_ended(old, within) {
        None => panic!("old process {old} still runs {within:?} after the upgrade: {:?}", cmdline(old)),
        Some(Ended::Reaped(code)) => assert_eq!(code, Some(0), "old process {old} exit code"),
        Some(Ended::Gone) => {}
    }
}

/// Waits for the first process, the `Shuttle`'s own child (which only the
/// `Shuttle` may reap), to exit 0 after its drain.
#[track_caller]
pub(super) fn assert_first_exits(shuttle: &mut Shuttle, within: Duration) {
    let status = shuttle
        .wait_exit(within)
        .unwrap_or_else(|| panic!("the first process {} still runs {within:?} after the upgrade", shuttle.pid()));
    assert!(status.success(), "the first process after its drain: {status:?}");
}

/// A unix stream client of `path` with timeouts.
pub(super) fn unix_connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

/// One echo over the unix service at `path`, half-closed, read to EOF.
#[track_caller]
pub(super) fn unix_echo(path: &Path, message: &[u8]) {
    let mut stream = unix_connect(path);
    stream.write_all(message).expect("send over the unix socket");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    stream.read_to_end(&mut back).expect("read the echo to EOF");
    assert_eq!(back, message, "the echo over the unix service");
}

/// Asserts a change refused during the hand-over: 503, `Retry-After: 1`, an error.
#[track_caller]
pub(super) fn assert_busy(response: Response, what: &str) {
    assert_eq!(response.status, 503, "{what} during the hand-over: {response:?}");
    assert_eq!(response.header("retry-after"), Some("1"), "{what}: {response:?}");
    assert!(!response.error().is_empty(), "{what}: {response:?}");
}
