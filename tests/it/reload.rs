//! SIGHUP (reference §7): shuttle reads the file it started from again (the
//! state file if it existed at start-up, else `-config`) and applies it as
//! one change of the whole service list, with the zero-disruption rules of
//! the admin API; a bad file changes nothing, neither what runs nor the
//! state file.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::admin::{config_bytes, config_json, put, stats};
use crate::support::{
    backend, connect, named, refused_within, round_trip, run_to_exit, service, tempdir, try_connect, wait_until,
    write_file, Shuttle, DEADLINE,
};

/// A shuttle started with `-config FILE` (and `extra` flags), the file kept for rewriting.
struct Reloadable {
    shuttle: Shuttle,
    /// The `-config` file.
    config: PathBuf,
    _dir: TempDir,
}

impl Reloadable {
    fn start(config: &Value, extra: &[&str]) -> Reloadable {
        let dir = tempdir();
        let path = write_json(dir.path(), "config.json", config);
        let mut args = vec!["-config", path_str(&path)];
        args.extend_from_slice(extra);
        let shuttle = Shuttle::start(&args);
        Reloadable { shuttle, config: path.clone(), _dir: dir }
    }

    fn admin(&self) -> SocketAddr {
        self.shuttle.admin_addr()
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
    write_file(dir, name, serde_json::to_string_pretty(value).expect("JSON").as_bytes())
}

/// Sends SIGHUP and returns the reload's audit line (applied or refused),
/// the first one logged after the signal.
#[track_caller]
fn sighup(shuttle: &Shuttle) -> String {
    let seen = shuttle.stderr_lines().len();
    shuttle.signal(libc::SIGHUP);
    line_after(shuttle, seen, &["admin: reload (SIGHUP) of "])
}

/// The first log line after the first `seen` lines that contains every one of `words`.
#[track_caller]
fn line_after(shuttle: &Shuttle, seen: usize, words: &[&str]) -> String {
    let mut found = None;
    let ok = wait_until(DEADLINE, || {
        found = shuttle
            .stderr_lines()
            .get(seen..)
            .unwrap_or_default()
            .iter()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .cloned();
        found.is_some()
    });
    assert!(ok, "no log line with {words:?} after line {seen}: {:?}", shuttle.stderr_lines().get(seen..));
    found.unwrap_or_default()
}

/// The first line a backend made by `named` sends: its tag.
fn greeting(addr: SocketAddr) -> Result<String, String> {
    let mut stream = try_connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("{addr}: EOF after {:?}", String::from_utf8_lossy(&line))),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("{addr}: read: {e}")),
        }
    }
    Err(format!("{addr}: no end of line"))
}

/// A client connecting over and over to each address until `stop`, checking
/// that the backend that answers is one of those allowed there; counts its
/// rounds in `rounds` and returns every failure.
fn hammer(
    targets: Vec<(SocketAddr, Vec<&'static str>)>,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
) -> JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            rounds.fetch_add(1, Ordering::Relaxed);
            for (addr, allowed) in &targets {
                match greeting(*addr) {
                    Ok(tag) if allowed.contains(&tag.as_str()) => {}
                    Ok(tag) => failures.push(format!("{addr}: reached {tag:?}, not one of {allowed:?}")),
                    Err(e) => failures.push(e),
                }
            }
        }
        failures
    })
}

/// The services of a config list, sorted by name: name, address and backend names.
fn shape(list: &Value) -> Vec<(String, String, Vec<String>)> {
    let services = list.as_array().expect("a config list");
    let mut all: Vec<_> = services
        .iter()
        .map(|s| {
            let backends = s["backends"].as_array().map(|b| b.iter().map(|b| b["name"].to_string()).collect());
            (s["name"].to_string(), s["address"].to_string(), backends.unwrap_or_default())
        })
        .collect();
    all.sort();
    all
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind port 0").local_addr().expect("local addr").port()
}

#[test]
fn sighup_applies_a_changed_config_without_refusing_a_connection() {
    let (b0, b1, b2) = (named("b0"), named("b1"), named("b2"));
    let before = json!([
        service("stay", vec![backend("b0", b0.address())]),
        service("web", vec![backend("b0", b0.address()), backend("b1", b1.address())]),
        service("tuned", vec![backend("b1", b1.address())]),
        service("old", vec![backend("b0", b0.address())]),
    ]);
    let run = Reloadable::start(&before, &[]);
    let admin = run.admin();
    let addr = |name: &str| run.shuttle.service_addr(name);
    let (stay, web, tuned, old) = (addr("stay"), addr("web"), addr("tuned"), addr("old"));
    for _ in 0..4 {
        greeting(web).expect("web serves before the reload");
    }
    let b1_before = stats(admin, "/web/b1")["connections"].as_u64().expect("b1 connections");
    assert!(b1_before >= 1, "RR sent web's connections to b1 too");

    let stop = Arc::new(AtomicBool::new(false));
    let targets = vec![(stay, vec!["b0"]), (web, vec!["b0", "b1", "b2"]), (tuned, vec!["b1"])];
    let rounds = Arc::new(AtomicUsize::new(0));
    let client = hammer(targets, stop.clone(), rounds.clone());
    let busy = |n: usize| wait_until(DEADLINE, || rounds.load(Ordering::Relaxed) >= n);
    assert!(busy(3), "the client does not get going");

    let mut tuned_config = service("tuned", vec![backend("b1", b1.address())]);
    tuned_config["connect_timeout"] = json!(2);
    let after = json!([
        service("stay", vec![backend("b0", b0.address())]),
        service("web", vec![backend("b1", b1.address()), backend("b2", b2.address())]),
        tuned_config,
        service("api", vec![backend("b2", b2.address())]),
    ]);
    write_json(run.config.parent().expect("dir"), "config.json", &after);
    let line = sighup(&run.shuttle);
    let expected = "service api added; service tuned updated: connect_timeout 5 → 2; backends: unchanged; \
                    service web backends updated: added b2; removed b0; service old removed";
    assert!(line.contains("INFO") && line.ends_with(expected), "{line}");

    // Every worker has it once connections to web reach b2 and never b0.
    assert!(wait_until(DEADLINE, || (0..4).all(|_| greeting(web).is_ok_and(|t| t != "b0"))), "web still reaches b0");
    assert!(wait_until(DEADLINE, || greeting(web).is_ok_and(|t| t == "b2")), "web never reaches b2");
    assert_eq!(greeting(run.shuttle.service_addr("api")).expect("api serves"), "b2");
    assert!(refused_within(old, DEADLINE), "old still accepts after its removal");
    // A few more rounds after the change has settled everywhere.
    assert!(busy(rounds.load(Ordering::Relaxed) + 3), "the client stopped");
    stop.store(true, Ordering::Relaxed);
    let failures = client.join().expect("client thread");
    let made = rounds.load(Ordering::Relaxed) * 3;
    assert!(failures.is_empty(), "{} of about {made} connections failed: {failures:?}", failures.len());

    let running = config_json(admin);
    assert_eq!(shape(&running), shape(&after));
    let tuned_now = running.as_array().and_then(|l| l.iter().find(|s| s["name"] == "tuned")).expect("tuned runs");
    assert_eq!(tuned_now["connect_timeout"].as_f64(), Some(2.0));
    let b1_after = stats(admin, "/web/b1")["connections"].as_u64().expect("b1 connections");
    assert!(b1_after >= b1_before, "unchanged backend b1 lost its counters: {b1_before} → {b1_after}");
    assert_eq!(sighup(&run.shuttle).rsplit(": ").next(), Some("nothing changed"));
}

/// Writes `bad` over the config, sends SIGHUP, and checks that the reload is
/// refused with `reason` at warn and changes neither what runs nor the state
/// file, and that `web` still serves.
#[track_caller]
fn refused_changes_nothing(run: &Reloadable, state: &Path, bad: &[u8], reason: &str) {
    let admin = run.admin();
    let (config_before, state_before) = (config_bytes(admin), std::fs::read(state).expect("read state"));
    write_file(run.config.parent().expect("dir"), "config.json", bad);
    let line = sighup(&run.shuttle);
    assert!(line.contains("WARN") && line.contains(" refused: ") && line.contains(reason), "{line}");
    assert!(line.ends_with("nothing was changed"), "{line}");
    assert_eq!(String::from_utf8_lossy(&config_bytes(admin)), String::from_utf8_lossy(&config_before));
    assert_eq!(std::fs::read(state).expect("read state"), state_before, "the state file changed");
    round_trip(&mut connect(run.shuttle.service_addr("web")), b"still serving");
}

/// The reason `shuttle -check` gives for the config file: what start-up would print after `shuttle: FILE: `.
fn check_reason(config: &Path) -> String {
    let out = run_to_exit(&["-check", "-config", path_str(config)]);
    assert!(!out.status.success(), "-check passed: {out:?}");
    let prefix = format!("shuttle: {}: ", config.display());
    out.stderr.trim_end().strip_prefix(&prefix).unwrap_or_else(|| panic!("{:?}", out.stderr)).to_string()
}

#[test]
fn a_bad_file_changes_neither_the_running_config_nor_the_state_file() {
    let echo = crate::support::echo();
    let config = json!([service("web", vec![backend("b0", echo.address())])]);
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let run = Reloadable::start(&config, &["-state", path_str(&state)]);
    let admin = run.admin();
    // A change through the API writes the state file, which the reloads must leave alone.
    put(admin, "/extra", &json!({"address": "127.0.0.1:0"})).expect(200);
    assert!(state.exists());
    let web = run.shuttle.service_addr("web");

    let truncated = br#"[{"name": "web", "address": "127.0.0.1:0""#;
    write_file(dir.path(), "probe.json", truncated);
    refused_changes_nothing(&run, &state, truncated, &check_reason(&dir.path().join("probe.json")));

    let bad_field = json!([{"name": "web", "address": "127.0.0.1:0", "balance": "XX"}]).to_string();
    write_file(dir.path(), "probe.json", bad_field.as_bytes());
    let reason = check_reason(&dir.path().join("probe.json"));
    assert!(reason.contains("balance"), "{reason}");
    refused_changes_nothing(&run, &state, bad_field.as_bytes(), &reason);

    // A port in use: the service before it in the list was staged, and must be unstaged.
    let held = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken = held.local_addr().expect("held addr");
    let in_use = json!([
        {"name": "aaa", "address": "127.0.0.1:0"},
        {"name": "clash", "address": taken.to_string()},
        service("web", vec![backend("b9", echo.address())]),
    ]);
    refused_changes_nothing(&run, &state, in_use.to_string().as_bytes(), &format!("cannot listen on {taken}"));

    let to_admin = json!([service("web", vec![backend("b0", admin)])]);
    refused_changes_nothing(&run, &state, to_admin.to_string().as_bytes(), "where the admin API listens");

    // A backend reaching the real port of a port-0 listener that stays.
    let to_web = json!([service("web", vec![backend("b0", echo.address())]), service("x", vec![backend("b", web)])]);
    refused_changes_nothing(
        &run,
        &state,
        to_web.to_string().as_bytes(),
        &format!("reaches {web}, where service \"web\""),
    );
    drop(held);
}

#[test]
fn sighup_rereads_the_state_file_it_started_from() {
    let echo = crate::support::echo();
    let dir = tempdir();
    let state = write_json(dir.path(), "state.json", &json!([service("web", vec![backend("b0", echo.address())])]));
    // The state file wins over -config at start-up, and so it does at a reload.
    let config = write_json(dir.path(), "config.json", &json!([service("ignored", vec![])]));
    let shuttle = Shuttle::start(&["-config", path_str(&config), "-state", path_str(&state)]);
    let admin = shuttle.admin_addr();
    assert_eq!(shape(&config_json(admin)), shape(&json!([service("web", vec![backend("b0", "")])])));

    let edited = json!([{"name": "web", "address": "127.0.0.1:0", "balance": "LC",
                         "backends": [{"name": "b0", "address": echo.address()}, {"name": "b1", "address": echo.address()}]}]);
    write_json(dir.path(), "state.json", &edited);
    let line = sighup(&shuttle);
    assert!(
        line.contains(&format!("reload (SIGHUP) of {}: service web updated: balance \"RR\" → \"LC\"", state.display())),
        "{line}"
    );
    let running = config_json(admin);
    assert_eq!(running[0]["balance"], "LC");
    assert_eq!(running[0]["backends"].as_array().map(Vec::len), Some(2));
    // What runs is what the state file says, in its full form.
    assert_eq!(std::fs::read(&state).expect("read state"), config_bytes(admin));
    round_trip(&mut connect(shuttle.service_addr("web")), b"after the reload");
}

#[test]
fn sighup_without_a_file_is_logged_and_shuttle_keeps_running() {
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let mut shuttle = Shuttle::start(&["-state", path_str(&state)]);
    let seen = shuttle.stderr_lines().len();
    shuttle.signal(libc::SIGHUP);
    let line = line_after(&shuttle, seen, &["SIGHUP", "nothing to reload"]);
    assert!(line.contains("WARN") && line.contains("nothing was changed"), "{line}");
    assert_eq!(config_json(shuttle.admin_addr()), json!([]));
    assert!(shuttle.is_running());
    assert!(!state.exists(), "nothing was written");
    shuttle.signal(libc::SIGTERM);
    let status = shuttle.wait_exit(DEADLINE).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn a_burst_of_sighups_while_the_file_changes_and_puts_run_ends_consistent() {
    let echo = crate::support::echo();
    let version = |n: usize| {
        let extra = format!("x{}", n % 3);
        json!([service("web", vec![backend("b0", echo.address())]), service(&extra, vec![])])
    };
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let run = Reloadable::start(&version(0), &["-state", path_str(&state)]);
    let admin = run.admin();
    let path = run.config.clone();
    let stop = Arc::new(AtomicBool::new(false));

    // Rewrites the file in place, non-atomically: a reload may read half a file.
    let writer = {
        let (stop, path, echo_address) = (stop.clone(), path.clone(), echo.address());
        thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let text = json!([
                    service("web", vec![backend("b0", &echo_address)]),
                    service(&format!("x{}", n % 3), vec![])
                ]);
                let _ = std::fs::write(&path, serde_json::to_vec_pretty(&text).expect("JSON"));
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let putter = thread::spawn(move || {
        let mut answers = Vec::new();
        for i in 0..20 {
            let name = format!("p{i}");
            let response = put(admin, &format!("/web/{name}"), &json!({"address": "127.0.0.1:9"}));
            let has_it = response.status == 200
                && response.json().as_array().is_some_and(|l| {
                    l.iter().any(|s| {
                        s["name"] == "web"
                            && s["backends"].as_array().is_some_and(|b| b.iter().any(|b| b["name"] == name.as_str()))
                    })
                });
            answers.push((response.status, has_it));
        }
        answers
    });
    for _ in 0..50 {
        run.shuttle.signal(libc::SIGHUP);
        thread::sleep(Duration::from_millis(3));
    }
    let answers = putter.join().expect("putter");
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        answers.iter().all(|&(status, has_it)| status == 200 && has_it),
        "every PUT is answered 200 with its backend: {answers:?}"
    );
    assert!(run.shuttle.is_running());

    // Quiet now: the last write wins, whichever reload was in flight.
    let last = json!([service("web", vec![backend("b0", echo.address())]), service("final", vec![])]);
    write_json(run.config.parent().expect("dir"), "config.json", &last);
    run.shuttle.signal(libc::SIGHUP);
    let settled = wait_until(DEADLINE, || {
        let names: Vec<String> = config_json(admin)
            .as_array()
            .map(|l| l.iter().map(|s| s["name"].to_string()).collect())
            .unwrap_or_default();
        names == ["\"final\"", "\"web\""]
    });
    assert!(settled, "the last file never ran: {}", config_json(admin));
    // The file's config exactly: the PUTs' backends went with the reloads after them.
    assert_eq!(shape(&config_json(admin)), shape(&last));
    assert!(
        wait_until(DEADLINE, || std::fs::read(&state).ok() == Some(config_bytes(admin))),
        "the state file differs from what runs"
    );
    let reloads = run.shuttle.stderr_lines().iter().filter(|l| l.contains("admin: reload (SIGHUP) of")).count();
    assert!((2..=51).contains(&reloads), "{reloads} reloads for 51 signals");
    round_trip(&mut connect(run.shuttle.service_addr("web")), b"still serving");
}

#[test]
fn an_address_handed_between_services_is_refused_and_works_in_two_steps() {
    let echo = crate::support::echo();
    let (p1, p2) = (free_port(), free_port());
    let at = |name: &str, port: u16| json!({"name": name, "address": format!("127.0.0.1:{port}"), "backends": [backend("b0", echo.address())]});
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let run = Reloadable::start(&json!([at("a", p1), at("b", p2)]), &["-state", path_str(&state)]);
    let admin = run.admin();
    put(admin, "/c", &json!({"address": "127.0.0.1:0"})).expect(200);
    let dir_path = run.config.parent().expect("dir").to_path_buf();

    for (what, list) in [
        ("swap", json!([at("a", p2), at("b", p1), {"name": "c", "address": "127.0.0.1:0"}])),
        ("rename", json!([at("b", p2), at("d", p1), {"name": "c", "address": "127.0.0.1:0"}])),
    ] {
        let (config_before, state_before) = (config_bytes(admin), std::fs::read(&state).expect("state"));
        write_json(&dir_path, "config.json", &list);
        let line = sighup(&run.shuttle);
        assert!(line.contains("WARN") && line.contains("two steps") && line.contains("listens now"), "{what}: {line}");
        assert!(
            line.contains("service \"a\"") && (line.contains("service \"b\"") || line.contains("service \"d\"")),
            "{what}: {line}"
        );
        assert_eq!(config_bytes(admin), config_before, "{what}");
        assert_eq!(std::fs::read(&state).expect("state"), state_before, "{what}");
        round_trip(&mut connect(format!("127.0.0.1:{p1}").parse().expect("addr")), b"a still on its port");
    }

    // In two steps: first without a, then d takes its port once a's listener is gone.
    write_json(&dir_path, "config.json", &json!([at("b", p2)]));
    assert!(sighup(&run.shuttle).ends_with("service a removed; service c removed"));
    assert!(refused_within(format!("127.0.0.1:{p1}").parse().expect("addr"), DEADLINE));
    write_json(&dir_path, "config.json", &json!([at("b", p2), at("d", p1)]));
    assert!(sighup(&run.shuttle).ends_with("service d added"));
    round_trip(&mut connect(run.shuttle.service_addr("d")), b"d on a's old port");
    assert_eq!(std::fs::read(&state).expect("state"), config_bytes(admin));
}
