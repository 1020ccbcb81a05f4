//! A real DNS exchange through a UDP service: dnsmasq (the test starts it,
//! on loopback, with one made-up name) behind shuttle, and a query built and
//! parsed here by the RFC 1035 wire format.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use super::{client_for, exchange, REPLY};
use crate::admin::stats;
use crate::support::{wait_until, Shuttle, DEADLINE};

/// A dnsmasq on a loopback port that answers `name` with `addr` and nothing else.
struct Dnsmasq {
    child: Child,
    port: u16,
}

impl Dnsmasq {
    /// A dnsmasq that answers: started again on another port if it did not
    /// (the free port it was given may have been taken meanwhile by a parallel test).
    fn start(name: &str, addr: Ipv4Addr) -> Option<Dnsmasq> {
        for _ in 0..5 {
            let dnsmasq = Dnsmasq::spawn(name, addr)?;
            let direct = client_for(dnsmasq.addr());
            let answering = wait_until(Duration::from_secs(3), || {
                exchange(&direct, dnsmasq.addr(), &query(1, name), Duration::from_millis(200)).is_some()
            });
            if answering {
                return Some(dnsmasq);
            }
        }
        panic!("dnsmasq never answered on loopback");
    }

    fn spawn(name: &str, addr: Ipv4Addr) -> Option<Dnsmasq> {
        let binary =
            ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"].into_iter().find(|p| std::path::Path::new(p).exists())?;
        let port = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).ok()?.port();
        let child = Command::new(binary)
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--bind-interfaces"])
            .args(["--conf-file=/dev/null", "--listen-address=127.0.0.1", "--user=root", "--pid-file="])
            .arg(format!("--port={port}"))
            .arg(format!("--address=/{name}/{addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Dnsmasq { child, port })
    }

    fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query for `name`'s A record with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // recursion desired, one question
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    q
}

/// The A records of a response to query `id`: the header checked, the
/// question skipped, each answer's RDATA read.
fn answers(id: u16, response: &[u8]) -> Vec<Ipv4Addr> {
    assert!(response.len() >= 12, "a DNS header: {response:?}");
    assert_eq!(u16::from_be_bytes([response[0], response[1]]), id, "the response answers this query");
    assert!(response[2] & 0x80 != 0, "QR: a response");
    assert_eq!(response[3] & 0x0f, 0, "RCODE NOERROR");
    let count = u16::from_be_bytes([response[6], response[7]]);
    let mut at = 12;
    // The question: labels to the root, then type and class.
    while response[at] != 0 {
        at += 1 + usize::from(response[at]);
    }
    at += 5;
    let mut found = Vec::new();
    for _ in 0..count {
        // The name: a compression pointer, or labels.
        if response[at] & 0xc0 == 0xc0 {
            at += 2;
        } else {
            while response[at] != 0 {
                at += 1 + usize::from(response[at]);
            }
            at += 1;
        }
        let kind = u16::from_be_bytes([response[at], response[at + 1]]);
        let len = usize::from(u16::from_be_bytes([response[at + 8], response[at + 9]]));
        let data = &response[at + 10..at + 10 + len];
        if kind == 1 && len == 4 {
            found.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    found
}

#[test]
fn a_dns_query_through_shuttle_is_answered_by_dnsmasq() {
    let answer = Ipv4Addr::new(192, 0, 2, 53);
    let Some(dnsmasq) = Dnsmasq::start("shuttle.test", answer) else {
        panic!("dnsmasq is not installed (.ci/run installs dnsmasq-base)");
    };
    let service = json!({ "name": "dns", "address": "127.0.0.1:0", "protocol": "udp", "udp_max_responses": 1,
        "backends": [{ "name": "dnsmasq", "address": dnsmasq.addr().to_string() }] });
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let client = client_for(addr);
    let reply = exchange(&client, addr, &query(0x5151, "shuttle.test"), REPLY).expect("an answer through shuttle");
    assert_eq!(answers(0x5151, &reply), [answer]);
    // udp_max_responses 1: the flow ended with its answer, and the next query is a new flow.
    assert!(wait_until(DEADLINE, || stats(admin, "/dns")["flows"] == 0));
    let again = exchange(&client, addr, &query(7, "shuttle.test"), REPLY).expect("a second answer");
    assert_eq!(answers(7, &again), [answer]);
    assert_eq!(stats(admin, "/dns")["connections"], 2);
}
