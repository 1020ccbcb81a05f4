//! Failover and "no backend" (SPEC §3): a failed connect tries the next
//! backend, a client with no backend at all is closed at once with a FIN.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{
    backend, blackhole, connect, echo, named, read_line, refusing, service, wait_closed, Closed, Shuttle,
};

#[test]
fn failover_when_the_first_backend_refuses() {
    let live = named("b1");
    let shuttle = Shuttle::start_with_config(
        &json!([service("web", vec![backend("b0", refusing()), backend("b1", live.address())])]),
        &[],
    );
    let addr = shuttle.service_addr("web");
    // Whichever backend round robin starts with, every client ends up on b1.
    for _ in 0..4 {
        let mut client = connect(addr);
        assert_eq!(read_line(&mut client), "b1");
        client.write_all(b"ping").expect("send");
        let mut reply = [0; 4];
        client.read_exact(&mut reply).expect("echo from b1");
        assert_eq!(&reply, b"ping");
    }
    assert_eq!(live.accepted(), 4);
}

#[test]
fn failover_when_the_first_backend_connect_times_out() {
    let hole = blackhole();
    let live = named("b1");
    let mut web = service("web", vec![backend("b0", hole.address()), backend("b1", live.address())]);
    web["connect_timeout"] = json!(0.5);
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let addr = shuttle.service_addr("web");

    // Round robin starts at least one of two connections on the blackhole; that
    // one waits out the 0.5 s connect timeout, then reaches b1.
    let mut slowest = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        let mut client = connect(addr);
        assert_eq!(read_line(&mut client), "b1");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "served by b1 only after {took:?}");
        slowest = slowest.max(took);
    }
    assert!(
        slowest >= Duration::from_millis(400),
        "no connection waited for the blackhole's connect timeout (slowest {slowest:?})"
    );
}

#[test]
fn client_is_closed_when_every_backend_fails() {
    let shuttle = Shuttle::start_with_config(
        &json!([service("web", vec![backend("b0", refusing()), backend("b1", refusing())])]),
        &[],
    );
    let mut client = connect(shuttle.service_addr("web"));
    let closed = wait_closed(&mut client, Duration::from_secs(5));
    assert!(closed.is_ok(), "client of a service whose backends all refuse: {closed:?}");
}

#[test]
fn no_backend_closes_the_client_promptly_with_a_fin() {
    let drained = echo();
    let mut drained_config = backend("b0", drained.address());
    drained_config["weight"] = json!(0);
    let shuttle =
        Shuttle::start_with_config(&json!([service("empty", vec![]), service("drained", vec![drained_config])]), &[]);
    for name in ["empty", "drained"] {
        let mut client = connect(shuttle.service_addr(name));
        let started = Instant::now();
        let closed = wait_closed(&mut client, Duration::from_secs(2));
        assert_eq!(closed, Ok(Closed::Eof), "service {name:?} with no usable backend, after {:?}", started.elapsed());
    }
    assert_eq!(drained.accepted(), 0, "a drained backend is no failover candidate either");
}
