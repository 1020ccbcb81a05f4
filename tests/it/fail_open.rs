//! Fail-open (reference §3): with `fail_open`, a service whose checked
//! backends are all down balances new connections over all of them as if they
//! were up, says so in its stats and metrics, and stops as soon as one comes
//! back. Without it (the default) such a service closes its clients.
//!
//! A backend's health and its traffic are told apart here: each backend's
//! `check_address` is a [`CheckPort`] the test opens and closes, while its
//! traffic address is a live `TAG`-then-echo server. So "down" means only that
//! the checks fail, and a client that reaches a down backend proves fail-open.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::{call, config_json, stats};
use crate::support::{connect, named, read_line, refusing, round_trip, try_connect, wait_closed, wait_until, Closed};
use crate::support::{Restartable, Shuttle, DEADLINE};

/// How long a backend may take to reach an expected health state.
const HEALTH_DEADLINE: Duration = Duration::from_secs(15);

/// A check port that can be opened (checks pass) and closed (checks are
/// refused), on the same port throughout.
pub(crate) struct CheckPort(Restartable);

impl CheckPort {
    /// An open check port.
    pub(crate) fn open() -> CheckPort {
        // Accept and drop: a check only needs its connect to complete.
        CheckPort(Restartable::start(|stream, _| drop(stream)))
    }

    /// Its address, as a `check_address`.
    pub(crate) fn address(&self) -> String {
        self.0.addr().to_string()
    }

    /// Listens again: checks pass from now on.
    pub(crate) fn up(&mut self) {
        assert!(!self.0.is_running(), "the check port is open already");
        self.0.restart();
    }

    /// Stops listening: checks are refused from now on.
    pub(crate) fn down(&mut self) {
        self.0.stop();
    }
}

/// A checked backend: traffic to `address`, checks to `check`.
pub(crate) fn checked(name: &str, address: impl ToString, check: &CheckPort) -> Value {
    json!({ "name": name, "address": address.to_string(), "check_address": check.address() })
}

/// Fast checks: every 100 ms, one failure marks a backend down and one pass up.
pub(crate) fn fast_checks(mut service: Value) -> Value {
    service["check_interval"] = json!(0.1);
    service["fall"] = json!(1);
    service["rise"] = json!(1);
    service
}

/// Whether backend `backend` of `service` is up, as the stats say.
#[track_caller]
pub(crate) fn is_up(admin: SocketAddr, service: &str, backend: &str) -> bool {
    stats(admin, &format!("/{service}/{backend}"))["up"] == true
}

/// Waits until backend `backend` of `service` is `up` (or down).
#[track_caller]
pub(crate) fn wait_health(admin: SocketAddr, service: &str, backend: &str, up: bool) {
    assert!(
        wait_until(HEALTH_DEADLINE, || is_up(admin, service, backend) == up),
        "{service}/{backend} never went {}: {}",
        if up { "up" } else { "down" },
        stats(admin, &format!("/{service}/{backend}"))
    );
}

/// The `fail_open_active` of a service's stats.
#[track_caller]
fn fail_open_active(admin: SocketAddr, service: &str) -> bool {
    let stats = stats(admin, &format!("/{service}"));
    stats["fail_open_active"].as_bool().unwrap_or_else(|| panic!("no fail_open_active in {stats}"))
}

/// The value of `shuttle_service_fail_open_active{service="NAME"}` in `/metrics`.
#[track_caller]
fn fail_open_metric(admin: SocketAddr, service: &str) -> String {
    let (status, _, body) = crate::metrics::raw(admin, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    let series = format!("shuttle_service_fail_open_active{{service=\"{service}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series}in the metrics:\n{body}"))
        .to_string()
}

/// The tags of the backends `n` fresh clients reach; each client echoes once.
#[track_caller]
fn reached(addr: SocketAddr, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let mut client = connect(addr);
            let tag = read_line(&mut client);
            round_trip(&mut client, b"ping");
            tag
        })
        .collect()
}

#[test]
fn fail_open_switches_on_when_every_checked_backend_is_down_and_off_when_one_comes_back() {
    let (a, b) = (named("a"), named("b"));
    let (mut check_a, mut check_b) = (CheckPort::open(), CheckPort::open());
    let mut web = json!({ "name": "web", "address": "127.0.0.1:0", "fail_open": true,
        "backends": [checked("a", a.address(), &check_a), checked("b", b.address(), &check_b)] });
    web = fast_checks(web);
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    assert_eq!(config_json(admin)[0]["fail_open"], true, "the field round-trips");
    assert!(!fail_open_active(admin, "web"));
    assert_eq!(fail_open_metric(admin, "web"), "0");

    // One down: the other takes everything; that is not fail-open.
    check_a.down();
    wait_health(admin, "web", "a", false);
    assert_eq!(reached(addr, 4), ["b"; 4], "a down backend gets nothing while another is up");
    assert!(!fail_open_active(admin, "web"));

    // Both down: balanced over both as if up.
    check_b.down();
    wait_health(admin, "web", "b", false);
    assert!(fail_open_active(admin, "web"), "{}", stats(admin, "/web"));
    assert_eq!(fail_open_metric(admin, "web"), "1");
    let tags = reached(addr, 6);
    assert_eq!(tags.iter().filter(|t| *t == "a").count(), 3, "round robin over both down backends: {tags:?}");
    assert_eq!(tags.iter().filter(|t| *t == "b").count(), 3, "round robin over both down backends: {tags:?}");
    shuttle.wait_for_line("web: every backend is down: fail-open");

    // One back: fail-open ends at once, and only the healthy one is used.
    check_a.up();
    wait_health(admin, "web", "a", true);
    assert!(!fail_open_active(admin, "web"));
    assert_eq!(fail_open_metric(admin, "web"), "0");
    assert_eq!(reached(addr, 4), ["a"; 4]);
    shuttle.wait_for_line("web: fail-open ends");
}

#[test]
fn without_fail_open_a_service_whose_backends_are_all_down_closes_its_clients() {
    let a = named("a");
    let mut check = CheckPort::open();
    let web = fast_checks(
        json!({ "name": "web", "address": "127.0.0.1:0", "backends": [checked("a", a.address(), &check)] }),
    );
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    assert_eq!(config_json(admin)[0]["fail_open"], false, "off by default");
    check.down();
    wait_health(admin, "web", "a", false);
    assert!(!fail_open_active(admin, "web"), "off: never active");
    let mut client = connect(addr);
    assert_eq!(wait_closed(&mut client, DEADLINE), Ok(Closed::Eof), "no backend: closed");
    assert_eq!(a.accepted(), 0, "the down backend got no client");

    // Turned on live: the same down backend takes the next client.
    call(admin, "PATCH", "/web", Some(r#"{"fail_open": true}"#)).expect(200);
    assert!(fail_open_active(admin, "web"), "{}", stats(admin, "/web"));
    assert_eq!(reached(addr, 2), ["a"; 2]);
    // And off again.
    call(admin, "PATCH", "/web", Some(r#"{"fail_open": false}"#)).expect(200);
    assert!(!fail_open_active(admin, "web"));
    let mut client = connect(addr);
    assert_eq!(wait_closed(&mut client, DEADLINE), Ok(Closed::Eof));
}

#[test]
fn fail_open_still_fails_over_and_leaves_drained_and_unchecked_backends_alone() {
    let (good, drained) = (named("good"), named("drained"));
    let (mut check_dead, mut check_good, mut check_drained) = (CheckPort::open(), CheckPort::open(), CheckPort::open());
    let mut drained_backend = checked("drained", drained.address(), &check_drained);
    drained_backend["weight"] = json!(0);
    let web = fast_checks(json!({ "name": "web", "address": "127.0.0.1:0", "fail_open": true, "backends": [
        checked("dead", refusing(), &check_dead), checked("good", good.address(), &check_good), drained_backend] }));
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    for (check, name) in [(&mut check_dead, "dead"), (&mut check_good, "good"), (&mut check_drained, "drained")] {
        check.down();
        wait_health(admin, "web", name, false);
    }
    assert!(fail_open_active(admin, "web"));
    // Every client ends at the one backend that answers: the dead one's connects fail over.
    assert_eq!(reached(addr, 6), ["good"; 6]);
    assert_eq!(drained.accepted(), 0, "weight 0 takes nothing, even in fail-open");

    // A backend without check_address is always up: the service is not all down.
    let plain = json!({ "address": good.address() });
    call(admin, "PUT", "/web/plain", Some(&plain.to_string())).expect(200);
    assert!(
        wait_until(DEADLINE, || !fail_open_active(admin, "web")),
        "an unchecked backend ends fail-open: {}",
        stats(admin, "/web")
    );
}

#[test]
fn fail_open_rejects_values_that_are_not_booleans_and_changes_nothing() {
    let a = named("a");
    let shuttle = Shuttle::start_with_config(
        &json!([{ "name": "web", "address": "127.0.0.1:0",
        "backends": [{ "name": "a", "address": a.address() }] }]),
        &[],
    );
    let admin = shuttle.admin_addr();
    let before = config_json(admin);
    for bad in [r#""yes""#, "1", "[]", "{}"] {
        let response = call(admin, "PATCH", "/web", Some(&format!(r#"{{"fail_open": {bad}}}"#)));
        assert_eq!(response.status, 400, "fail_open {bad}: {response:?}");
        assert!(response.json()["error"].as_str().is_some_and(|e| e.contains("fail_open")), "{response:?}");
    }
    assert_eq!(config_json(admin), before);
    assert!(try_connect(shuttle.service_addr("web")).is_ok());
}
