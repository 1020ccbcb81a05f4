//! Idle timeouts (SPEC §2 `client_timeout`, `server_timeout`): a pair with no
//! progress on that side for the timeout is closed; progress keeps it open.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{backend, connect, round_trip, service, wait_closed, Backend, Shuttle, DEADLINE};

/// An echo backend that reports when each of its connections ends.
fn echo_reporting_close() -> (Backend, mpsc::Receiver<Instant>) {
    let (closed_tx, closed_rx) = mpsc::channel();
    let backend = Backend::spawn(move |mut conn| {
        let _ = conn.echo();
        let _ = closed_tx.send(Instant::now());
    });
    (backend, closed_rx)
}

/// Starts a service with `field` set to `seconds` in front of an echo backend.
fn start(field: &str, seconds: f64) -> (Backend, mpsc::Receiver<Instant>, Shuttle) {
    let (echo, closed) = echo_reporting_close();
    let mut web = service("web", vec![backend("b0", echo.address())]);
    web[field] = json!(seconds);
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    (echo, closed, shuttle)
}

/// A pair that goes silent after one round trip is closed on both sides
/// between 0.4 s and 5 s later (the timeout is 0.5 s).
fn silent_pair_is_closed(field: &str) {
    let (_echo, backend_closed, shuttle) = start(field, 0.5);
    let mut client = connect(shuttle.service_addr("web"));
    round_trip(&mut client, b"ping");
    let silent_since = Instant::now();

    let closed = wait_closed(&mut client, Duration::from_secs(5));
    let took = silent_since.elapsed();
    assert!(closed.is_ok(), "{field} 0.5: the silent client was not closed: {closed:?}");
    assert!(took >= Duration::from_millis(400), "{field} 0.5 closed the pair after only {took:?}");

    let backend_end = backend_closed.recv_timeout(DEADLINE).expect("the backend connection was closed too");
    let backend_took = backend_end.duration_since(silent_since);
    assert!(backend_took < Duration::from_secs(5), "{field} 0.5: backend closed only after {backend_took:?}");
}

#[test]
fn client_timeout_closes_a_silent_pair() {
    silent_pair_is_closed("client_timeout");
}

#[test]
fn server_timeout_closes_a_silent_pair() {
    silent_pair_is_closed("server_timeout");
}

#[test]
fn client_timeout_spares_a_pair_that_keeps_talking() {
    // Progress resets the idle clock: 2.5 s of round trips every 100 ms outlive
    // a 1 s timeout; silence afterwards does not.
    let (_echo, _closed, shuttle) = start("client_timeout", 1.0);
    let mut client = connect(shuttle.service_addr("web"));
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        round_trip(&mut client, b"still here");
        thread::sleep(Duration::from_millis(100));
    }
    let silent_since = Instant::now();
    let closed = wait_closed(&mut client, Duration::from_secs(6));
    assert!(closed.is_ok(), "the pair outlived its idle timeout: {closed:?}");
    let took = silent_since.elapsed();
    assert!(took >= Duration::from_millis(800), "closed {took:?} after the last round trip, timeout 1 s");
}
