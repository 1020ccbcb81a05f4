//! UDP services (reference §3.5): flows keyed by the client's address and
//! port, each relayed to one backend; balancing, weights, stickiness, idle
//! expiry, `udp_max_responses`, `max_flows`, datagram boundaries, IPv6, live
//! backend changes, ICMP refusals as passive failures, UDP health checks, and
//! a real DNS exchange.
//!
//! Backends here are small UDP servers on threads. Each answers a datagram
//! with its tag, a colon and the datagram, so a client knows which backend it
//! reached and that the reply is its own.

mod dns;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::{call, config_json, delete, put, stats};
use crate::fail_open::{wait_health, CheckPort};
use crate::support::{try_connect, wait_until, Shuttle, DEADLINE};

/// How long a client waits for a reply that should come.
const REPLY: Duration = Duration::from_secs(5);
/// How long a client waits to be sure a reply does not come.
const SILENCE: Duration = Duration::from_millis(400);

/// What a test UDP server does with each datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// `TAG:` then the datagram.
    Tagged,
    /// The datagram as it came.
    Echo,
    /// The tagged reply, twice.
    Twice,
    /// Nothing.
    Silent,
}

/// A UDP server on a thread, stopped when dropped.
pub(crate) struct UdpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    answer: Arc<Mutex<(Answer, Vec<u8>)>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    /// A server on `127.0.0.1:0` answering with `tag`.
    pub(crate) fn start(tag: &str, answer: Answer) -> UdpServer {
        UdpServer::start_at((Ipv4Addr::LOCALHOST, 0).into(), tag, answer)
    }

    /// A server on `addr`.
    pub(crate) fn start_at(addr: SocketAddr, tag: &str, answer: Answer) -> UdpServer {
        let socket = UdpSocket::bind(addr).expect("bind a UDP test server");
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let addr = socket.local_addr().expect("local address");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(Mutex::new((answer, tag.as_bytes().to_vec())));
        let thread = {
            let (stop, received, answer) = (stop.clone(), received.clone(), answer.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                    received.fetch_add(1, Ordering::SeqCst);
                    let (how, tag) = answer.lock().map(|a| a.clone()).unwrap_or((Answer::Silent, Vec::new()));
                    let tagged = [&tag[..], b":", &buf[..n]].concat();
                    let _ = match how {
                        Answer::Tagged => socket.send_to(&tagged, from),
                        Answer::Echo => socket.send_to(&buf[..n], from),
                        Answer::Twice => socket.send_to(&tagged, from).and_then(|_| socket.send_to(&tagged, from)),
                        Answer::Silent => Ok(0),
                    };
                }
            })
        };
        UdpServer { addr, stop, received, answer, thread: Some(thread) }
    }

    /// Its address as a config string.
    pub(crate) fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Datagrams it received.
    pub(crate) fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    /// Changes what it answers from now on.
    pub(crate) fn set(&self, answer: Answer, tag: &str) {
        if let Ok(mut a) = self.answer.lock() {
            *a = (answer, tag.as_bytes().to_vec());
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client socket of the same family as `to`, with a reply timeout.
pub(crate) fn client_for(to: SocketAddr) -> UdpSocket {
    let any: SocketAddr = if to.is_ipv6() { "[::1]:0".parse().unwrap() } else { "127.0.0.1:0".parse().unwrap() };
    let socket = UdpSocket::bind(any).expect("bind a UDP client");
    socket.set_read_timeout(Some(REPLY)).expect("timeout");
    socket
}

/// Sends `payload` to `to` and returns the reply, or `None` if none came within `within`.
pub(crate) fn exchange(client: &UdpSocket, to: SocketAddr, payload: &[u8], within: Duration) -> Option<Vec<u8>> {
    client.set_read_timeout(Some(within)).expect("timeout");
    client.send_to(payload, to).expect("send a datagram");
    let mut buf = vec![0u8; 65_536];
    match client.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, to, "the reply comes from the address the client sent to");
            Some(buf[..n].to_vec())
        }
        Err(_) => None,
    }
}

/// The tag of a tagged reply to `payload`, checking the rest is the payload.
#[track_caller]
fn tag_of(reply: &[u8], payload: &[u8]) -> String {
    let at = reply.iter().position(|&b| b == b':').expect("a tagged reply");
    assert_eq!(&reply[at + 1..], payload, "the reply carries this client's own datagram");
    String::from_utf8_lossy(&reply[..at]).into_owned()
}

/// One exchange of a fresh client; the tag of the backend it reached.
#[track_caller]
fn new_flow_tag(to: SocketAddr, payload: &[u8]) -> String {
    let client = client_for(to);
    let reply = exchange(&client, to, payload, REPLY).expect("a reply through shuttle");
    tag_of(&reply, payload)
}

/// A UDP service config.
pub(crate) fn udp_service(name: &str, backends: &[(&str, &UdpServer)]) -> Value {
    let backends: Vec<Value> = backends.iter().map(|(n, s)| json!({ "name": n, "address": s.address() })).collect();
    json!({ "name": name, "address": "127.0.0.1:0", "protocol": "udp", "backends": backends })
}

/// A service's stats counter.
#[track_caller]
fn counter(admin: SocketAddr, target: &str, field: &str) -> u64 {
    let stats = stats(admin, target);
    stats[field].as_u64().unwrap_or_else(|| panic!("no {field} in {stats}"))
}

#[test]
fn an_echo_flow_reaches_each_of_two_round_robin_backends() {
    let (a, b) = (UdpServer::start("a", Answer::Tagged), UdpServer::start("b", Answer::Tagged));
    let shuttle = Shuttle::start_with_config(&json!([udp_service("dns", &[("a", &a), ("b", &b)])]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    assert_eq!(config_json(admin)[0]["protocol"], "udp");
    let tags: Vec<String> = (0..6).map(|i| new_flow_tag(addr, format!("hello {i}").as_bytes())).collect();
    assert_eq!(tags.iter().filter(|t| *t == "a").count(), 3, "{tags:?}");
    assert_eq!(tags.iter().filter(|t| *t == "b").count(), 3, "{tags:?}");
    let s = stats(admin, "/dns");
    assert_eq!((s["flows"].as_u64(), s["connections"].as_u64()), (Some(6), Some(6)), "{s}");
    assert_eq!((s["datagrams_sent"].as_u64(), s["datagrams_received"].as_u64()), (Some(6), Some(6)), "{s}");
    assert_eq!(s["sent"], (0..6).map(|i| format!("hello {i}").len()).sum::<usize>(), "bytes to the backends");
    assert_eq!(counter(admin, "/dns/a", "active"), 3, "a flow is an active connection of its backend");
    let info = call(admin, "GET", "/_info", None).json();
    assert_eq!(
        (info["flows"].as_u64(), info["active"].as_u64()),
        (Some(6), Some(0)),
        "flows apart from connections: {info}"
    );
}

#[test]
fn weights_share_new_flows() {
    let (a, b) = (UdpServer::start("a", Answer::Tagged), UdpServer::start("b", Answer::Tagged));
    let mut service = udp_service("dns", &[("a", &a), ("b", &b)]);
    service["backends"][0]["weight"] = json!(3);
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let addr = shuttle.service_addr("dns");
    let tags: Vec<String> = (0..8).map(|_| new_flow_tag(addr, b"w")).collect();
    assert_eq!(tags.iter().filter(|t| *t == "a").count(), 6, "{tags:?}");
    assert_eq!(tags.iter().filter(|t| *t == "b").count(), 2, "{tags:?}");
}

#[test]
fn a_flow_sticks_to_its_backend_and_least_connected_counts_flows() {
    let (a, b) = (UdpServer::start("a", Answer::Tagged), UdpServer::start("b", Answer::Tagged));
    let mut service = udp_service("dns", &[("a", &a), ("b", &b)]);
    service["balance"] = json!("LC");
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let first = client_for(addr);
    let reply = exchange(&first, addr, b"0", REPLY).expect("reply");
    let tag = tag_of(&reply, b"0");
    for i in 1..30 {
        let payload = format!("{i}");
        let reply = exchange(&first, addr, payload.as_bytes(), REPLY).expect("reply");
        assert_eq!(tag_of(&reply, payload.as_bytes()), tag, "datagram {i} of the flow went elsewhere");
    }
    // LC: the other backend has no flow, so the next client goes there.
    let other = new_flow_tag(addr, b"x");
    assert_ne!(other, tag, "least connected counts open flows");
    assert_eq!(counter(admin, "/dns", "flows"), 2);
}

#[test]
fn an_idle_flow_ends_after_udp_idle_timeout_and_the_next_datagram_opens_a_new_one() {
    let a = UdpServer::start("a", Answer::Tagged);
    let mut service = udp_service("dns", &[("a", &a)]);
    service["udp_idle_timeout"] = json!(0.3);
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let client = client_for(addr);
    // Traffic keeps it alive past its timeout.
    for i in 0..8 {
        exchange(&client, addr, b"keep", REPLY).expect("reply");
        if i == 0 {
            assert_eq!(counter(admin, "/dns", "flows"), 1);
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(counter(admin, "/dns", "connections"), 1, "one flow while traffic flows");
    assert!(wait_until(DEADLINE, || counter(admin, "/dns", "flows") == 0), "the idle flow never ended");
    assert_eq!(counter(admin, "/dns/a", "active"), 0, "its backend slot is given back");
    exchange(&client, addr, b"again", REPLY).expect("a reply on a new flow");
    assert_eq!(counter(admin, "/dns", "connections"), 2);
}

#[test]
fn udp_max_responses_ends_a_flow_after_its_replies() {
    let a = UdpServer::start("a", Answer::Twice);
    let mut service = udp_service("dns", &[("a", &a)]);
    service["udp_max_responses"] = json!(1);
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let client = client_for(addr);
    let reply = exchange(&client, addr, b"q1", REPLY).expect("the first reply");
    assert_eq!(tag_of(&reply, b"q1"), "a");
    let mut buf = [0u8; 64];
    client.set_read_timeout(Some(SILENCE)).expect("timeout");
    assert!(client.recv_from(&mut buf).is_err(), "the second reply is past udp_max_responses");
    assert!(wait_until(DEADLINE, || counter(admin, "/dns", "flows") == 0), "the flow ends at its last reply");
    exchange(&client, addr, b"q2", REPLY).expect("the next query opens a new flow");
    assert_eq!(counter(admin, "/dns", "connections"), 2);
}

#[test]
fn new_flows_past_max_flows_are_dropped_and_counted_over_every_worker() {
    let a = UdpServer::start("a", Answer::Tagged);
    let mut service = udp_service("dns", &[("a", &a)]);
    service["max_flows"] = json!(5);
    service["udp_idle_timeout"] = json!(1);
    let shuttle = Shuttle::start_with_config(&json!([service]), &["-workers", "2"]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let clients: Vec<UdpSocket> = (0..20).map(|_| client_for(addr)).collect();
    for c in &clients {
        c.send_to(b"hi", addr).expect("send");
    }
    let answered = clients
        .iter()
        .filter(|c| {
            c.set_read_timeout(Some(SILENCE)).expect("timeout");
            c.recv_from(&mut [0u8; 64]).is_ok()
        })
        .count();
    assert_eq!(answered, 5, "exactly max_flows flows over both workers");
    assert_eq!(counter(admin, "/dns", "dropped_flow_limit"), 15);
    assert_eq!(a.received(), 5, "a dropped datagram never reaches a backend");
    // Once the flows expire, there is room again.
    assert!(wait_until(DEADLINE, || counter(admin, "/dns", "flows") == 0));
    exchange(&clients[19], addr, b"late", REPLY).expect("room again");
}

#[test]
fn datagram_boundaries_are_kept_for_every_size_up_to_65507_bytes() {
    let echo = UdpServer::start("e", Answer::Echo);
    let shuttle = Shuttle::start_with_config(&json!([udp_service("dns", &[("e", &echo)])]), &[]);
    let addr = shuttle.service_addr("dns");
    let client = client_for(addr);
    for size in [0usize, 1, 2, 511, 1472, 1473, 8192, 9000, 32_768, 65_507] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let reply = exchange(&client, addr, &payload, REPLY).unwrap_or_else(|| panic!("no echo of {size} bytes"));
        assert_eq!(reply.len(), size, "one datagram in, one of the same size out");
        assert!(reply == payload, "{size} bytes came back changed");
    }
    // Several datagrams in a row stay apart and in order on loopback.
    for size in [3usize, 0, 100, 7] {
        client.send_to(&vec![size as u8; size], addr).expect("send");
    }
    let mut buf = vec![0u8; 65_536];
    for size in [3usize, 0, 100, 7] {
        let (n, _) = client.recv_from(&mut buf).expect("each datagram's echo");
        assert_eq!(&buf[..n], &vec![size as u8; size][..]);
    }
}

#[test]
fn ipv6_services_and_backends_and_bridging_between_families() {
    let v6 = UdpServer::start_at("[::1]:0".parse().unwrap(), "six", Answer::Tagged);
    let v4 = UdpServer::start("four", Answer::Tagged);
    let mut on_v6 = udp_service("six", &[("b", &v4)]);
    on_v6["address"] = json!("[::1]:0");
    let to_v6 = udp_service("four", &[("b", &v6)]);
    let shuttle = Shuttle::start_with_config(&json!([on_v6, to_v6]), &[]);
    assert_eq!(new_flow_tag(shuttle.service_addr("six"), b"over v6"), "four", "an IPv6 client, an IPv4 backend");
    assert_eq!(new_flow_tag(shuttle.service_addr("four"), b"to v6"), "six", "an IPv4 client, an IPv6 backend");
}

#[test]
fn live_backend_changes_keep_unchanged_flows_and_misroute_nothing() {
    let (a, b, c) = (
        UdpServer::start("a", Answer::Tagged),
        UdpServer::start("b", Answer::Tagged),
        UdpServer::start("c", Answer::Tagged),
    );
    let shuttle = Shuttle::start_with_config(&json!([udp_service("dns", &[("a", &a), ("b", &b)])]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let clients: Vec<UdpSocket> = (0..6).map(|_| client_for(addr)).collect();
    let tags: Vec<String> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let payload = format!("client {i} seq 0");
            tag_of(&exchange(c, addr, payload.as_bytes(), REPLY).expect("reply"), payload.as_bytes())
        })
        .collect();
    // A stream of datagrams from every client while the backends change under it.
    for (round, step) in [0usize, 1, 2].into_iter().enumerate() {
        match step {
            0 => drop(put(admin, "/dns/c", &json!({ "address": c.address() })).expect(200)),
            1 => drop(delete(admin, "/dns/b").expect(200)),
            _ => drop(call(admin, "PATCH", "/dns/c", Some(r#"{"weight": 2}"#)).expect(200)),
        }
        for seq in 1..=10 {
            for (i, client) in clients.iter().enumerate() {
                let payload = format!("client {i} seq {round}.{seq}");
                let reply = exchange(client, addr, payload.as_bytes(), REPLY)
                    .unwrap_or_else(|| panic!("client {i} lost datagram {round}.{seq}"));
                assert_eq!(tag_of(&reply, payload.as_bytes()), tags[i], "client {i}'s flow moved");
            }
        }
    }
    // b was removed without ?close: its flows run on; with ?close a's end at once.
    delete(admin, "/dns/a?close").expect(200);
    for (i, client) in clients.iter().enumerate() {
        let payload = format!("client {i} after");
        let reply = exchange(client, addr, payload.as_bytes(), REPLY).expect("reply");
        let tag = tag_of(&reply, payload.as_bytes());
        match tags[i].as_str() {
            "a" => assert_eq!(tag, "c", "a cut flow picks again"),
            other => assert_eq!(tag, other, "client {i}'s flow to a removed b runs on"),
        }
    }
}

#[test]
fn a_backend_refusing_datagrams_is_marked_down_and_others_take_its_flows() {
    let good = UdpServer::start("good", Answer::Tagged);
    // A UDP port nobody has: the kernel answers port unreachable.
    let closed = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free UDP port");
    let check = CheckPort::open();
    let service = json!({ "name": "dns", "address": "127.0.0.1:0", "protocol": "udp",
        "check_interval": 3600, "fall": 2, "rise": 2, "backends": [
            { "name": "dead", "address": closed.to_string(), "check_address": check.address() },
            { "name": "good", "address": good.address() }] });
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let mut lost = 0;
    assert!(
        wait_until(DEADLINE, || {
            let client = client_for(addr);
            if exchange(&client, addr, b"q", SILENCE).is_none() {
                lost += 1;
            }
            stats(admin, "/dns/dead")["up"] == false
        }),
        "refusals never marked it down: {}",
        stats(admin, "/dns/dead")
    );
    assert!(lost >= 2, "the datagrams to the dead backend were lost ({lost})");
    assert!(counter(admin, "/dns/dead", "errors") >= 2);
    assert!(shuttle.stderr_lines().iter().any(|l| l.contains("dns/dead is down") && l.contains("refused")));
    for _ in 0..4 {
        assert_eq!(new_flow_tag(addr, b"after"), "good");
    }
}

#[test]
fn a_udp_check_sends_check_send_and_expects_check_expect_in_the_reply() {
    let traffic = UdpServer::start("t", Answer::Tagged);
    let health = UdpServer::start("pong", Answer::Tagged);
    let service = json!({ "name": "dns", "address": "127.0.0.1:0", "protocol": "udp",
        "check_interval": 0.1, "fall": 1, "rise": 1, "connect_timeout": 0.5,
        "check_send": "ping", "check_expect": "pong:ping", "backends": [
            { "name": "t", "address": traffic.address(), "check_address": health.address() }] });
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let admin = shuttle.admin_addr();
    assert!(wait_until(DEADLINE, || counter(admin, "/dns/t", "check_success") >= 2));
    assert!(health.received() >= 2, "the checks went over UDP");
    health.set(Answer::Tagged, "nope");
    wait_health(admin, "dns", "t", false);
    let why = stats(admin, "/dns/t")["last_error"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("reply did not contain"), "{why}");
    health.set(Answer::Silent, "");
    assert!(wait_until(DEADLINE, || stats(admin, "/dns/t")["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("timed out"))));
    health.set(Answer::Tagged, "pong");
    wait_health(admin, "dns", "t", true);
}

#[test]
fn a_service_changes_protocol_on_the_same_address() {
    let a = UdpServer::start("a", Answer::Tagged);
    let tcp = crate::support::echo();
    let shuttle = Shuttle::start_with_config(
        &json!([{ "name": "svc", "address": "127.0.0.1:0", "backends": [{ "name": "a", "address": tcp.address() }] }]),
        &[],
    );
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("svc"));
    assert!(try_connect(addr).is_ok());
    let body = json!({ "address": addr.to_string(), "protocol": "udp", "backends": [{ "name": "a", "address": a.address() }] });
    put(admin, "/svc", &body).expect(200);
    assert_eq!(new_flow_tag(addr, b"now udp"), "a");
    assert!(crate::support::refused_within(addr, DEADLINE), "the TCP listener went");
}

#[test]
fn bad_udp_configs_are_refused_and_change_nothing() {
    let a = UdpServer::start("a", Answer::Tagged);
    let shuttle = Shuttle::start_with_config(&json!([udp_service("dns", &[("a", &a)])]), &[]);
    let admin = shuttle.admin_addr();
    let before = config_json(admin);
    let bad: [(&str, Value, &str); 9] = [
        ("protocol", json!("sctp"), "protocol"),
        ("protocol", json!(17), "protocol"),
        ("udp_idle_timeout", json!(0), "udp_idle_timeout"),
        ("udp_idle_timeout", json!(-1), "udp_idle_timeout"),
        ("max_flows", json!(0), "max_flows"),
        ("udp_max_responses", json!(-1), "udp_max_responses"),
        ("accept_proxy", json!(true), "accept_proxy"),
        ("max_queue", json!(3), "max_queue"),
        ("max_connection_duration", json!(5), "max_connection_duration"),
    ];
    for (field, value, named) in bad {
        let body = json!({ field: value }).to_string();
        let response = call(admin, "PATCH", "/dns", Some(&body));
        assert_eq!(response.status, 400, "{body}: {response:?}");
        assert!(response.error().contains(named), "{body}: {response:?}");
    }
    let response = call(admin, "PATCH", "/dns/a", Some(r#"{"send_proxy": "v2"}"#));
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(config_json(admin), before);
    assert_eq!(new_flow_tag(shuttle.service_addr("dns"), b"still"), "a");
}

#[test]
fn a_flood_of_new_flows_at_the_limit_is_dropped_without_harm() {
    let a = UdpServer::start("a", Answer::Tagged);
    let mut service = udp_service("dns", &[("a", &a)]);
    service["max_flows"] = json!(50);
    service["udp_idle_timeout"] = json!(0.5);
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let flooders: Vec<UdpSocket> = (0..400).map(|_| client_for(addr)).collect();
    for _ in 0..5 {
        for f in &flooders {
            let _ = f.send_to(&[0u8; 1200], addr);
        }
    }
    assert!(wait_until(DEADLINE, || counter(admin, "/dns", "dropped_flow_limit") > 0), "{}", stats(admin, "/dns"));
    assert!(counter(admin, "/dns", "flows") <= 50, "never past max_flows: {}", stats(admin, "/dns"));
    assert!(shuttle.is_running());
    // Once the flood's flows go idle, a newcomer is served.
    assert!(wait_until(DEADLINE, || counter(admin, "/dns", "flows") == 0), "{}", stats(admin, "/dns"));
    assert_eq!(new_flow_tag(addr, b"after the flood"), "a");
}

#[test]
fn udp_metrics_agree_with_the_stats_and_keep_the_exposition_format() {
    let a = UdpServer::start("a", Answer::Tagged);
    let mut service = udp_service("dns", &[("a", &a)]);
    service["max_flows"] = json!(1);
    let shuttle = Shuttle::start_with_config(&json!([service]), &[]);
    let (admin, addr) = (shuttle.admin_addr(), shuttle.service_addr("dns"));
    let client = client_for(addr);
    for _ in 0..3 {
        exchange(&client, addr, b"m", REPLY).expect("reply");
    }
    assert!(exchange(&client_for(addr), addr, b"over", SILENCE).is_none(), "past max_flows");
    let (status, _, body) = crate::metrics::raw(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    let metrics = crate::metrics::exposition::check(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let service = [("service", "dns")];
    assert_eq!(metrics.value("shuttle_service_udp_flows", &service), 1.0);
    let dropped = |reason: &str| {
        metrics.value("shuttle_service_udp_dropped_datagrams_total", &[("service", "dns"), ("reason", reason)])
    };
    assert_eq!((dropped("flow_limit"), dropped("no_backend"), dropped("send_error")), (1.0, 0.0, 0.0));
    let backend = [("service", "dns"), ("backend", "a")];
    assert_eq!(metrics.value("shuttle_backend_datagrams_sent_total", &backend), 3.0);
    assert_eq!(metrics.value("shuttle_backend_datagrams_received_total", &backend), 3.0);
    assert_eq!(metrics.value("shuttle_backend_received_bytes_total", &backend), 9.0, "a:m three times");
}
