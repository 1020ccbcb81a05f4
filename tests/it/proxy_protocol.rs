//! The PROXY protocol (haproxy's proxy-protocol.txt): `send_proxy` headers
//! byte-exact on the backend side, `accept_proxy` with good, split, bad, slow
//! and oversized headers, and health checks of `send_proxy` backends. Real
//! HAProxy and nginx are in `proxy_interop`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::admin::stats;
use crate::support::{
    backend, blackhole, connect, echo, read_to_eof, service, tempdir, wait_until, Backend, Shuttle, DEADLINE,
};

pub(crate) const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A backend that sends everything each connection carried (to its EOF) down a channel.
pub(crate) fn recorder() -> (Backend, Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let backend = Backend::spawn(move |mut conn| {
        let got = conn.read_to_end().unwrap_or_default();
        let _ = conn.shutdown_write();
        let _ = tx.lock().map(|tx| tx.send(got));
    });
    (backend, rx)
}

fn received(rx: &Receiver<Vec<u8>>) -> Vec<u8> {
    rx.recv_timeout(DEADLINE).expect("the backend got a connection")
}

/// The v2 header of a TCP4 connection.
pub(crate) fn v2_tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&u16::try_from(12 + tlvs.len()).unwrap().to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

fn v2_expected(client: SocketAddr, listener: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    let ips = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let (family, len) = if client.is_ipv4() { (0x11, 12u16) } else { (0x21, 36) };
    h.extend_from_slice(&[0x21, family]);
    h.extend_from_slice(&len.to_be_bytes());
    h.extend(ips(client));
    h.extend(ips(listener));
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&listener.port().to_be_bytes());
    h
}

fn v1_expected(client: SocketAddr, listener: SocketAddr) -> Vec<u8> {
    let proto = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {proto} {} {} {} {}\r\n", client.ip(), listener.ip(), client.port(), listener.port()).into_bytes()
}

/// Sends `payload`, half-closes, and returns what the backend recorded.
fn through(shuttle: &Shuttle, rx: &Receiver<Vec<u8>>, payload: &[u8]) -> (SocketAddr, Vec<u8>) {
    let mut client = connect(shuttle.service_addr("web"));
    client.write_all(payload).expect("send");
    client.shutdown(Shutdown::Write).expect("half-close");
    let got = received(rx);
    let _ = read_to_eof(&mut client);
    (client.local_addr().expect("client address"), got)
}

fn sends(version: &str, address: &str) -> (Shuttle, Backend, Receiver<Vec<u8>>) {
    let (b, rx) = recorder();
    let mut web = service("web", vec![json!({"name": "b0", "address": b.address(), "send_proxy": version})]);
    web["address"] = json!(address);
    (Shuttle::start_with_config(&json!([web]), &[]), b, rx)
}

#[test]
fn send_proxy_v1_and_v2_headers_are_byte_exact_over_ipv4_and_ipv6() {
    for address in ["127.0.0.1:0", "[::1]:0"] {
        for (version, expected) in [("v1", v1_expected as fn(_, _) -> _), ("v2", v2_expected)] {
            let (shuttle, _b, rx) = sends(version, address);
            let listener = shuttle.service_addr("web");
            let (client, got) = through(&shuttle, &rx, b"hello");
            let mut want = expected(client, listener);
            want.extend_from_slice(b"hello");
            assert_eq!(got, want, "{version} on {address}: {:?}", String::from_utf8_lossy(&got));
        }
    }
}

#[test]
fn send_proxy_off_sends_no_header() {
    let (shuttle, _b, rx) = sends("", "127.0.0.1:0");
    assert_eq!(through(&shuttle, &rx, b"plain").1, b"plain");
}

#[test]
fn client_bytes_read_ahead_while_connecting_follow_the_header_intact() {
    // The first backend never answers the SYN, so the client's bytes are read
    // ahead while shuttle waits, then fails over to the second: the header
    // must still come first, and every byte after it.
    let hole = blackhole();
    let (b, rx) = recorder();
    let mut web = service(
        "web",
        vec![backend("hole", hole.address()), json!({"name": "b1", "address": b.address(), "send_proxy": "v2"})],
    );
    web["connect_timeout"] = json!(0.3);
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let (client, got) = through(&shuttle, &rx, &payload);
    let header = v2_expected(client, shuttle.service_addr("web"));
    assert_eq!(&got[..header.len()], &header[..], "the header first");
    assert!(got[header.len()..] == payload[..], "then the client's bytes, all {} of them", payload.len());
}

fn accepts(extra: Value, backend_config: Value, args: &[&str]) -> Shuttle {
    let mut web = service("web", vec![backend_config]);
    web["accept_proxy"] = json!(true);
    if let (Some(web), Some(extra)) = (web.as_object_mut(), extra.as_object()) {
        web.extend(extra.clone());
    }
    Shuttle::start_with_config(&json!([web]), args)
}

fn access_lines(path: &Path, n: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    wait_until(DEADLINE, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        lines = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        lines.len() >= n
    });
    lines
}

#[test]
fn accept_proxy_takes_v1_and_v2_headers_and_passes_their_addresses_on() {
    let (b, rx) = recorder();
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let log_arg = log.to_str().expect("path");
    let shuttle = accepts(
        json!({}),
        json!({"name": "b0", "address": b.address(), "send_proxy": "v1"}),
        &["-access-log", log_arg, "-access-log-format", "json"],
    );
    let mut tlvs = vec![0x02, 0, 11];
    tlvs.extend_from_slice(b"example.com");
    tlvs.extend_from_slice(&[0x04, 0, 2, 0, 0]);
    let cases: [(Vec<u8>, &str); 3] = [
        (
            b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n".to_vec(),
            "PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n",
        ),
        (v2_tcp4([192, 0, 2, 9], [198, 51, 100, 2], 5151, 80, &tlvs), "PROXY TCP4 192.0.2.9 198.51.100.2 5151 80\r\n"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n".to_vec(), "PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n"),
    ];
    for (header, forwarded) in &cases {
        let mut payload = header.clone();
        payload.extend_from_slice(b"data after the header");
        let (_, got) = through(&shuttle, &rx, &payload);
        let mut want = forwarded.as_bytes().to_vec();
        want.extend_from_slice(b"data after the header");
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
    }
    let clients: Vec<Value> = access_lines(&log, 3).iter().map(|l| l["client"].clone()).collect();
    assert_eq!(clients, [json!("203.0.113.7:4242"), json!("192.0.2.9:5151"), json!("[2001:db8::7]:1")]);
    assert_eq!(stats(shuttle.admin_addr(), "/web")["proxy_header_errors"], 0);
}

#[test]
fn accept_proxy_local_and_unknown_keep_the_real_peer() {
    let (b, rx) = recorder();
    let shuttle = accepts(json!({}), json!({"name": "b0", "address": b.address(), "send_proxy": "v1"}), &[]);
    let listener = shuttle.service_addr("web");
    let mut local = V2_SIG.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    for header in [local, b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n".to_vec()] {
        let mut payload = header;
        payload.extend_from_slice(b"x");
        let (client, got) = through(&shuttle, &rx, &payload);
        let mut want = v1_expected(client, listener);
        want.push(b'x');
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
    }
}

#[test]
fn accept_proxy_header_split_into_single_bytes_is_assembled() {
    let (b, rx) = recorder();
    let shuttle = accepts(json!({}), json!({"name": "b0", "address": b.address(), "send_proxy": "v2"}), &[]);
    for header in
        [b"PROXY TCP4 10.1.2.3 10.0.0.1 999 80\r\n".to_vec(), v2_tcp4([10, 1, 2, 3], [10, 0, 0, 1], 999, 80, &[])]
    {
        let mut client = connect(shuttle.service_addr("web"));
        client.set_nodelay(true).expect("nodelay");
        for byte in &header {
            client.write_all(std::slice::from_ref(byte)).expect("send a byte");
            thread::sleep(Duration::from_millis(2));
        }
        client.write_all(b"tail").expect("send");
        client.shutdown(Shutdown::Write).expect("half-close");
        let mut want = v2_tcp4([10, 1, 2, 3], [10, 0, 0, 1], 999, 80, &[]);
        want.extend_from_slice(b"tail");
        assert_eq!(received(&rx), want);
    }
}

/// Sends `bytes` (then waits, if `hold`), and asserts the client is closed without
/// reaching the backend, and counted.
fn refused(shuttle: &Shuttle, backend: &Backend, bytes: &[u8], hold: bool, errors_before: u64) {
    let mut client = connect(shuttle.service_addr("web"));
    let started = Instant::now();
    let _ = client.write_all(bytes);
    if !hold {
        let _ = client.shutdown(Shutdown::Write);
    }
    // EOF or a reset (shuttle closes with the bad bytes unread): either way, closed.
    let mut sink = Vec::new();
    let _ = client.read_to_end(&mut sink);
    assert!(started.elapsed() < DEADLINE, "the client was closed");
    assert!(sink.is_empty(), "nothing came back: {sink:?}");
    let admin = shuttle.admin_addr();
    assert!(
        wait_until(DEADLINE, || stats(admin, "/web")["proxy_header_errors"] == errors_before + 1),
        "counted: {}",
        stats(admin, "/web")
    );
    assert_eq!(backend.accepted(), 0, "the backend never saw {:?}", String::from_utf8_lossy(bytes));
}

#[test]
fn accept_proxy_bad_headers_never_reach_the_backend_and_are_counted() {
    let b = echo();
    let shuttle = accepts(json!({"connect_timeout": 0.3}), backend("b0", b.address()), &[]);
    let mut no_crlf = b"PROXY UNKNOWN ".to_vec();
    no_crlf.resize(107, b'a');
    let mut oversized = V2_SIG.to_vec();
    oversized.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let mut bad_tlv = v2_tcp4([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, &[0x02, 0, 9, b'x']);
    bad_tlv.extend_from_slice(b"more bytes that are not the TLV's");
    let cases: [(&str, Vec<u8>, bool); 9] = [
        ("bad signature", b"GET / HTTP/1.0\r\n\r\n".to_vec(), false),
        ("bad v2 signature", b"\r\n\r\n\0\r\nQUIX\n!\x11\0\x0c".to_vec(), true),
        ("v1 without CRLF at 107 bytes", no_crlf, true),
        ("oversized v2 length", oversized, true),
        ("v2 with a bad command", [V2_SIG, &[0x22, 0x11, 0, 12], &[0; 12]].concat(), true),
        ("truncated TLV", bad_tlv, false),
        ("leading zero port", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(), true),
        ("slow header past the deadline", b"PROXY TCP4 1.2.3.4".to_vec(), true),
        ("nothing at all", Vec::new(), false),
    ];
    for (i, (what, bytes, hold)) in cases.iter().enumerate() {
        eprintln!("case: {what}");
        refused(&shuttle, &b, bytes, *hold, i as u64);
    }
    let silent = connect(shuttle.service_addr("web"));
    let admin = shuttle.admin_addr();
    assert!(
        wait_until(DEADLINE, || stats(admin, "/web")["proxy_header_errors"] == cases.len() as u64 + 1),
        "a client that sends nothing times out too"
    );
    drop(silent);
    let mut scrape = connect(admin);
    scrape.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("ask for the metrics");
    let metrics = read_to_eof(&mut scrape);
    let metrics = String::from_utf8_lossy(&metrics);
    let want = format!("shuttle_service_proxy_header_errors_total{{service=\"web\"}} {}", cases.len() + 1);
    assert!(metrics.contains(&want), "{want} in the metrics");
    assert!(shuttle.stderr_lines().iter().any(|l| l.contains("closing client") && l.contains("PROXY")));
}

#[test]
fn a_client_sending_its_header_holds_a_service_slot_and_a_failed_one_gives_it_back() {
    let b = echo();
    let fields = json!({"connect_timeout": 0.5, "max_connections": 1});
    let shuttle = accepts(fields, backend("b0", b.address()), &[]);
    for i in 0..3 {
        // Were the slot of a bad header kept, the next client would wait in the backlog forever.
        refused(&shuttle, &b, b"not a PROXY header\r\n", false, i);
    }
    // A silent client holds the only slot; a good one waits until its header deadline passes.
    let silent = connect(shuttle.service_addr("web"));
    thread::sleep(Duration::from_millis(100));
    let mut good = connect(shuttle.service_addr("web"));
    good.write_all(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80\r\nping").expect("send");
    good.shutdown(Shutdown::Write).expect("half-close");
    let started = Instant::now();
    assert_eq!(read_to_eof(&mut good), b"ping", "served once the silent client is gone");
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited for the slot");
    let admin = shuttle.admin_addr();
    assert!(wait_until(DEADLINE, || stats(admin, "/web")["proxy_header_errors"] == 4), "the silent one was counted");
    assert!(wait_until(DEADLINE, || stats(admin, "/web")["active"] == 0), "every slot is back");
    drop(silent);
}

#[test]
fn health_checks_of_a_send_proxy_backend_announce_themselves() {
    for version in ["v1", "v2"] {
        let (b, rx) = recorder();
        let mut web = service(
            "web",
            vec![json!({"name": "b0", "address": b.address(), "check_address": b.address(), "send_proxy": version})],
        );
        web["check_interval"] = json!(0.05);
        let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
        let got = received(&rx);
        if version == "v2" {
            assert_eq!(got, [V2_SIG, &[0x20, 0x00, 0, 0]].concat(), "a v2 LOCAL header");
        } else {
            let line = String::from_utf8_lossy(&got);
            let port = b.addr().port();
            assert!(
                line.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 ") && line.ends_with(&format!(" {port}\r\n")),
                "{line:?}"
            );
        }
        let admin = shuttle.admin_addr();
        assert!(wait_until(DEADLINE, || stats(admin, "/web/b0")["check_success"].as_u64() >= Some(1)));
    }
}

#[test]
fn health_checks_to_a_separate_check_address_send_no_header() {
    let traffic = echo();
    let (health, rx) = recorder();
    let mut web = service(
        "web",
        vec![
            json!({"name": "b0", "address": traffic.address(), "check_address": health.address(), "send_proxy": "v2"}),
        ],
    );
    web["check_interval"] = json!(0.05);
    let _shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    assert_eq!(received(&rx), b"", "a health port of its own gets no header");
}

#[test]
fn the_new_fields_round_trip_and_validate() {
    let b = echo();
    let shuttle = accepts(json!({}), json!({"name": "b0", "address": b.address(), "send_proxy": "v2"}), &[]);
    let admin = shuttle.admin_addr();
    let config = crate::admin::config_json(admin);
    assert_eq!(config[0]["accept_proxy"], true);
    assert_eq!(config[0]["backends"][0]["send_proxy"], "v2");
    let bad = crate::admin::put(admin, "/web/b1", &json!({"address": b.address(), "send_proxy": "v3"}));
    assert_eq!(bad.status, 400);
    let bad = crate::admin::put(admin, "/web", &json!({"address": "127.0.0.1:0", "accept_proxy": "yes"}));
    assert_eq!(bad.status, 400);
    assert_eq!(crate::admin::config_json(admin), config, "nothing changed");
    // Turned off live: plain clients are served again.
    let mut web = config[0].clone();
    web["accept_proxy"] = json!(false);
    web["backends"][0]["send_proxy"] = json!("");
    crate::admin::put(admin, "/web", &web).expect(200);
    let mut client = connect(shuttle.service_addr("web"));
    client.write_all(b"ping").expect("send");
    let mut reply = [0; 4];
    assert!(client.read_exact(&mut reply).is_ok(), "served without a header");
    assert_eq!(&reply, b"ping");
}
