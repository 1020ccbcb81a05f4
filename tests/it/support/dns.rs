//! A stub DNS server the tests control: it answers A queries for the names it
//! is given after a chosen delay (or never), says "no such name" to others,
//! and counts the queries. Shuttle is pointed at it through a private
//! `/etc/resolv.conf` (see `Shuttle::start_with_resolv_conf`), so the real
//! resolver code path (`getaddrinfo`) is what the tests exercise.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How a name is answered.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// With this address, after this delay.
    After(Duration, Ipv4Addr),
    /// Never: the query is dropped.
    Never,
}

/// A running stub server on `ADDR:53`; stops when dropped.
#[derive(Debug)]
pub struct StubDns {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    queries: Arc<Mutex<Vec<(String, u16)>>>,
    thread: Option<JoinHandle<()>>,
}

const TYPE_A: u16 = 1;

impl StubDns {
    /// Serves `names` on UDP port 53 of a loopback address of its own
    /// (127.53.x.y, from this process's pid and a counter, so parallel tests
    /// don't meet). Port 53 needs root, as does the private resolv.conf.
    pub fn start(names: &[(&str, Answer)]) -> StubDns {
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let ip = Ipv4Addr::new(127, 53, (pid % 250) as u8 + 1, (n % 250) as u8 + 1);
        let socket = UdpSocket::bind((ip, 53))
            .unwrap_or_else(|e| panic!("bind a stub DNS server on {ip}:53 (the DNS tests must run as root): {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("set timeout");
        let addr = socket.local_addr().expect("stub address");
        let names: HashMap<String, Answer> = names.iter().map(|(n, a)| (n.to_ascii_lowercase(), *a)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, queries) = (stop.clone(), queries.clone());
            thread::spawn(move || serve(socket, names, stop, queries))
        };
        StubDns { addr, stop, queries, thread: Some(thread) }
    }

    /// Writes a resolv.conf naming only this server into `dir`; the resolver
    /// waits long for it, so our deadline, not the resolver's, is what ends a lookup.
    pub fn resolv_conf(&self, dir: &Path) -> PathBuf {
        let path = dir.join("resolv.conf");
        let text = format!("nameserver {}\noptions timeout:30 attempts:1\n", self.addr.ip());
        std::fs::write(&path, text).expect("write resolv.conf");
        path
    }

    /// How many A queries came for `name`.
    pub fn a_queries(&self, name: &str) -> usize {
        let queries = self.queries.lock().expect("queries");
        queries.iter().filter(|(n, t)| n.eq_ignore_ascii_case(name) && *t == TYPE_A).count()
    }
}

impl Drop for StubDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    socket: UdpSocket,
    names: HashMap<String, Answer>,
    stop: Arc<AtomicBool>,
    queries: Arc<Mutex<Vec<(String, u16)>>>,
) {
    let socket = Arc::new(socket);
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
        let Some((name, qtype, question_end)) = parse_query(&buf[..n]) else { continue };
        queries.lock().expect("queries").push((name.clone(), qtype));
        let query = buf[..question_end].to_vec();
        let (delay, reply) = match names.get(&name.to_ascii_lowercase()) {
            None => (Duration::ZERO, reply(&query, 3, None)),
            Some(Answer::Never) => continue,
            Some(Answer::After(delay, ip)) => (*delay, reply(&query, 0, (qtype == TYPE_A).then_some(*ip))),
        };
        let socket = socket.clone();
        // The delay stands for a slow name server: a sleep is what we simulate.
        thread::spawn(move || {
            thread::sleep(delay);
            let _ = socket.send_to(&reply, from);
        });
    }
}

/// The question's name, type, and where the question ends.
fn parse_query(packet: &[u8]) -> Option<(String, u16, usize)> {
    if packet.len() < 12 || u16::from_be_bytes([packet[4], packet[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *packet.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(packet.get(i..i + len)?).into_owned());
        i += len;
    }
    let qtype = u16::from_be_bytes([*packet.get(i)?, *packet.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

/// A response to `query` (header and question) with `rcode` and at most one A record.
fn reply(query: &[u8], rcode: u8, ip: Option<Ipv4Addr>) -> Vec<u8> {
    let mut out = query.to_vec();
    out[2] = 0x80 | (query[2] & 0x01); // QR, keep RD
    out[3] = 0x80 | rcode; // RA
    out[6..8].copy_from_slice(&u16::from(ip.is_some()).to_be_bytes()); // ANCOUNT
    out[8..12].fill(0); // NSCOUNT, ARCOUNT
    if let Some(ip) = ip {
        out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&0u32.to_be_bytes()); // TTL 0: nothing cached
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}
