//! Admin API limits under abuse: memory across many connections, the body
//! limit with chunked framing, and slow clients that would take every slot.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use super::{get_config_within, MIB};
use crate::admin::{config_bytes, get};
use crate::support::{connect, echo, one_backend, round_trip, Shuttle};

/// One admin connection: `GET /_config` with `Connection: close`, read to EOF.
fn one_admin_connection(admin: SocketAddr, buf: &mut Vec<u8>) {
    let mut stream = connect(admin);
    stream
        .write_all(b"GET /_config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    buf.clear();
    stream.read_to_end(buf).expect("read the response to EOF");
    assert!(buf.starts_with(b"HTTP/1.1 200 "), "{:?}", String::from_utf8_lossy(buf));
}

#[test]
fn memory_stays_flat_under_100k_sequential_admin_connections() {
    // The old code kept ~8 bytes for every admin connection it had ever served:
    // measured here, RSS grew by 704 KiB over the 90,000 after the warm-up. The
    // fixed code grew by 0 KiB (same RSS to the page), alone and with other
    // tests running beside it. What a connection may legitimately leave behind is
    // allocator slack, bounded however many come; 256 KiB (64 pages) is far
    // above that noise and well under half of what the leak shows.
    const WARM_UP: usize = 10_000;
    const TOTAL: usize = 100_000;
    const BOUND_KIB: u64 = 256;
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let started = Instant::now();
    let mut buf = Vec::new();
    for _ in 0..WARM_UP {
        one_admin_connection(admin, &mut buf);
    }
    let before = shuttle.rss_kib();
    for _ in WARM_UP..TOTAL {
        one_admin_connection(admin, &mut buf);
    }
    let after = shuttle.rss_kib();
    let grew = after.saturating_sub(before);
    eprintln!("{TOTAL} admin connections in {:?}: RSS {before} KiB -> {after} KiB", started.elapsed());
    assert!(
        grew < BOUND_KIB,
        "RSS grew by {grew} KiB ({before} -> {after}) over {} admin connections",
        TOTAL - WARM_UP
    );
    let mut client = connect(shuttle.service_addr("web"));
    round_trip(&mut client, b"still proxying");
}

/// `n` bytes of `X` as a chunked body of 1-byte chunks, with the last chunk.
fn one_byte_chunks(n: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(n * 6 + 5);
    for _ in 0..n {
        body.extend_from_slice(b"1\r\nX\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

/// `PUT /web` with `body` (already chunked), written from another thread in
/// large writes while this one waits for the answer: its status and body.
fn put_chunked(admin: SocketAddr, body: Vec<u8>) -> (u16, String) {
    let mut stream = connect(admin);
    stream
        .write_all(b"PUT /web HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("send the head");
    let mut writer = stream.try_clone().expect("clone the client socket");
    let sender = thread::spawn(move || body.chunks(256 * 1024).try_for_each(|piece| writer.write_all(piece)));
    let answer = read_response(&mut stream);
    // A refusal may close the connection before the rest is sent: only the answer counts.
    let _ = sender.join().expect("writer thread");
    answer
}

/// Reads one response with a `Content-Length` body: its status and body.
fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) => panic!("EOF before a response head: {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading a response head: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {head:?}"));
    while got.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) => panic!("EOF inside a response body: {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("reading a response body: {e}"),
        }
    }
    (status, String::from_utf8_lossy(&got[head_end..head_end + length]).into_owned())
}

#[test]
fn one_mib_body_in_one_byte_chunks_gets_past_the_framing() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();
    let before = config_bytes(admin);

    // 6 MiB of framing for 1 MiB of body: the limit is on the body, so this
    // is read whole and found to be no JSON (400), not refused as too big.
    let (status, body) = put_chunked(admin, one_byte_chunks(MIB));
    assert_eq!(status, 400, "1 MiB in 1-byte chunks: {body}");
    // serde_json's complaint about the first `X`: the body was read whole and parsed.
    assert!(body.contains("line 1, column 1"), "the 400 is not about the JSON: {body}");
    // One byte more is over the body limit.
    let (status, body) = put_chunked(admin, one_byte_chunks(MIB + 1));
    assert_eq!(status, 413, "1 MiB + 1 in 1-byte chunks: {body}");
    assert_eq!(config_bytes(admin), before);
    get(admin, "/web").expect(200);
}

/// One slow client: a socket that sends a request head a byte at a time.
struct Slow {
    socket: Option<Socket>,
    sent: usize,
    next: Instant,
}

/// A head that never ends within the test.
const SLOW_HEAD: &[u8] =
    b"GET /_config HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn slow_connect(admin: SocketAddr) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_nonblocking(true).expect("nonblocking");
    match socket.connect(&admin.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => panic!("connect a slow client: {e}"),
    }
    socket
}

fn waiting(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOTCONN)
}

impl Slow {
    /// A new slow client that sends its first byte as soon as it is connected:
    /// a head begun is what makes a connection look busy rather than idle.
    fn connect(admin: SocketAddr, now: Instant) -> Slow {
        let mut slow = Slow { socket: Some(slow_connect(admin)), sent: 0, next: now };
        slow.tick(now);
        slow
    }

    /// Whether shuttle closed (or answered) this client: then it is reconnected at once.
    fn closed(&self) -> bool {
        let Some(socket) = &self.socket else { return true };
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 512];
        match socket.recv(&mut buf) {
            Ok(_) => true, // EOF, or an answer such as a 408: either way this slot is gone
            Err(e) if waiting(&e) => socket.take_error().ok().flatten().is_some(),
            Err(_) => true,
        }
    }

    /// Sends the next byte if it is due; a failed send means closed.
    fn tick(&mut self, now: Instant) -> bool {
        if now < self.next {
            return true;
        }
        let Some(socket) = &self.socket else { return false };
        match socket.send(&SLOW_HEAD[self.sent % SLOW_HEAD.len()..][..1]) {
            Ok(_) => {
                self.sent += 1;
                self.next += Duration::from_secs(1);
                true
            }
            Err(e) if waiting(&e) => true,
            Err(_) => false,
        }
    }
}

#[test]
fn slow_admin_clients_leave_room_for_a_normal_one() {
    // 200 clients each dribble a request head at one byte per second and
    // reconnect at once whenever shuttle closes them, as an attacker would.
    // Meanwhile a normal client asks every 500 ms: each of its requests is answered.
    const SLOW: usize = 200;
    const RUN: Duration = Duration::from_secs(8);
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let admin = shuttle.admin_addr();

    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        thread::spawn(move || {
            let start = Instant::now();
            let mut clients: Vec<Slow> = (0..SLOW).map(|_| Slow::connect(admin, start)).collect();
            let mut reconnects = 0usize;
            while !stop.load(Ordering::SeqCst) && start.elapsed() < RUN + Duration::from_secs(5) {
                let now = Instant::now();
                for client in &mut clients {
                    if client.closed() || !client.tick(now) {
                        // Closed first, so the new socket does not find the old one's slot taken.
                        client.socket = None;
                        *client = Slow::connect(admin, now);
                        reconnects += 1;
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
            reconnects
        })
    };

    // Let the slow clients take their places first.
    thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let mut answers = Vec::new();
    while started.elapsed() < RUN - Duration::from_secs(1) {
        let asked = Instant::now();
        answers.push(get_config_within(admin, Duration::from_secs(5)));
        let next = asked + Duration::from_millis(500);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let reconnects = attacker.join().expect("attacker thread");
    eprintln!("slow clients reconnected {reconnects} times");
    let failed: Vec<_> = answers.iter().enumerate().filter(|(_, a)| *a != &Ok(200)).collect();
    assert!(answers.len() >= 8, "only {} requests in the run", answers.len());
    assert!(failed.is_empty(), "{} of {} normal requests failed: {failed:?}", failed.len(), answers.len());
    let mut client = connect(shuttle.service_addr("web"));
    round_trip(&mut client, b"still proxying");
}
