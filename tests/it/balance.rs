//! Backend choice (SPEC §3): weighted round robin in config order, drained
//! backends skipped, and least-connected with round robin among ties. Every
//! backend answers with its name, so each connection shows where it went.

use std::collections::BTreeSet;
use std::net::{Shutdown, SocketAddr, TcpStream};

use serde_json::{json, Value};

use crate::support::{backend, connect, named, read_line, read_to_eof, service, Backend, Shuttle};

/// Starts one named backend per weight and a service `web` over them.
fn start(balance: &str, weights: &[u64]) -> (Vec<Backend>, Shuttle, SocketAddr) {
    let backends: Vec<Backend> = (0..weights.len()).map(|i| named(&format!("b{i}"))).collect();
    let configs: Vec<Value> = backends
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(i, (b, weight))| {
            let mut config = backend(&format!("b{i}"), b.address());
            config["weight"] = json!(weight);
            config
        })
        .collect();
    let mut web = service("web", configs);
    web["balance"] = json!(balance);
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let addr = shuttle.service_addr("web");
    (backends, shuttle, addr)
}

/// Opens a connection and returns it with the name of the backend it reached.
fn open(addr: SocketAddr) -> (TcpStream, String) {
    let mut client = connect(addr);
    let tag = read_line(&mut client);
    (client, tag)
}

/// Closes both ways and waits for EOF, so the proxy has finished the pair
/// before the caller opens the next one.
fn close(mut client: TcpStream) {
    client.shutdown(Shutdown::Write).expect("shut write");
    assert_eq!(read_to_eof(&mut client), b"", "nothing but EOF after the tag");
}

/// One short connection after another; the backend each one reached.
fn short_connections(addr: SocketAddr, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let (client, tag) = open(addr);
            close(client);
            tag
        })
        .collect()
}

#[test]
fn round_robin_takes_backends_in_config_order() {
    let (_backends, _shuttle, addr) = start("RR", &[1, 1, 1]);
    assert_eq!(short_connections(addr, 7), ["b0", "b1", "b2", "b0", "b1", "b2", "b0"]);
}

#[test]
fn round_robin_gives_each_backend_its_weight_in_a_row() {
    let (_backends, _shuttle, addr) = start("RR", &[1, 2, 3]);
    assert_eq!(
        short_connections(addr, 13),
        ["b0", "b1", "b1", "b2", "b2", "b2", "b0", "b1", "b1", "b2", "b2", "b2", "b0"]
    );
}

#[test]
fn round_robin_skips_a_drained_backend() {
    let (backends, _shuttle, addr) = start("RR", &[1, 0, 2]);
    assert_eq!(short_connections(addr, 7), ["b0", "b2", "b2", "b0", "b2", "b2", "b0"]);
    assert_eq!(backends[1].accepted(), 0, "weight 0 gets no connection");
}

#[track_caller]
fn assert_alternate(tags: &[String], between: [&str; 2]) {
    let seen: BTreeSet<&str> = tags.iter().map(String::as_str).collect();
    assert_eq!(seen, BTreeSet::from(between), "short connections went to {tags:?}");
    assert!(tags.windows(2).all(|w| w[0] != w[1]), "ties must take turns, got {tags:?}");
}

#[test]
fn least_connected_avoids_busy_backends_and_rotates_ties() {
    let (_backends, _shuttle, addr) = start("LC", &[1, 1, 1]);
    let all = ["b0", "b1", "b2"];

    // One connection held open on X: short connections never go to X, and the
    // two idle backends take turns.
    let (held_x, x) = open(addr);
    let others: Vec<&str> = all.iter().copied().filter(|b| *b != x).collect();
    assert_alternate(&short_connections(addr, 6), [others[0], others[1]]);

    // A second held connection lands on an idle backend Y; now only Z is idle
    // and takes every short connection.
    let (_held_y, y) = open(addr);
    assert_ne!(y, x, "the second held connection must avoid the busy backend");
    let z = all.iter().copied().find(|b| *b != x && *b != y).expect("a third backend");
    assert_eq!(short_connections(addr, 4), [z, z, z, z], "only {z} has no active connection");

    // X is idle again once its connection ends: X and Z tie and take turns; Y stays busy.
    close(held_x);
    assert_alternate(&short_connections(addr, 6), [x.as_str(), z]);
}
