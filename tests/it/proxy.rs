//! Relaying (SPEC §3): bytes both ways, half-close in each direction, big
//! transfers intact, and a slow reader that must not make the proxy grow.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{
    connect, echo, one_backend, read_to_eof, stream, wait_until, Backend, Shuttle, Sink, Source, DEADLINE,
};

const MIB: u64 = 1024 * 1024;

#[test]
fn single_backend_round_trips_and_closes_cleanly() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    let mut client = connect(shuttle.service_addr("web"));

    for message in ["hello", "a second message", "x", &"long ".repeat(2000)] {
        client.write_all(message.as_bytes()).expect("send");
        let mut reply = vec![0; message.len()];
        client.read_exact(&mut reply).expect("read the echo");
        assert_eq!(reply, message.as_bytes());
    }
    client.shutdown(Shutdown::Write).expect("shut write");
    assert_eq!(read_to_eof(&mut client), b"", "nothing after the echoes, then EOF");
    assert_eq!(echo.accepted(), 1, "one client, one backend connection");
}

#[test]
fn half_close_from_the_client_still_delivers_the_whole_reply() {
    // The backend answers only after it has seen the client's EOF, so the reply
    // can only arrive if the FIN was relayed and the other direction stayed open.
    let server = Backend::spawn(|mut conn| {
        if let Ok(request) = conn.read_to_end() {
            let reply: Vec<u8> = request.iter().rev().copied().collect();
            if conn.write_all(&reply).is_ok() {
                let _ = conn.shutdown_write();
            }
        }
    });
    let shuttle = Shuttle::start_with_config(&one_backend(server.address()), &[]);
    let mut client = connect(shuttle.service_addr("web"));

    let mut request = vec![0; 256 * 1024];
    Source::new(1, request.len() as u64).next_chunk(&mut request).expect("request bytes");
    client.write_all(&request).expect("send the request");
    client.shutdown(Shutdown::Write).expect("shut write");

    let reply = read_to_eof(&mut client);
    let expected: Vec<u8> = request.iter().rev().copied().collect();
    assert_eq!(reply.len(), expected.len(), "whole reply after our half-close");
    assert!(reply == expected, "reply bytes differ from the reversed request");
}

#[test]
fn half_close_from_the_backend_still_carries_the_client_bytes() {
    // The backend sends a greeting and shuts its write side first; the client
    // reads it to EOF and only then sends, and the backend must receive it all.
    let (got_tx, got_rx) = mpsc::channel();
    let server = Backend::spawn(move |mut conn| {
        let mut greeting = vec![0; 256 * 1024];
        Source::new(2, greeting.len() as u64).next_chunk(&mut greeting).expect("greeting bytes");
        let received = conn
            .write_all(&greeting)
            .and_then(|()| conn.shutdown_write())
            .and_then(|()| conn.read_to_end())
            .map_err(|e| e.to_string());
        let _ = got_tx.send(received);
    });
    let shuttle = Shuttle::start_with_config(&one_backend(server.address()), &[]);
    let mut client = connect(shuttle.service_addr("web"));

    let greeting = read_to_eof(&mut client);
    let mut sink = Sink::new(2, false);
    sink.feed(&greeting).expect("greeting intact");
    assert_eq!(sink.received(), 256 * 1024, "the whole greeting, then EOF");

    let mut request = vec![0; 128 * 1024];
    Source::new(3, request.len() as u64).next_chunk(&mut request).expect("request bytes");
    client.write_all(&request).expect("send after the backend's half-close");
    client.shutdown(Shutdown::Write).expect("shut write");

    let received = got_rx.recv_timeout(DEADLINE).expect("the backend saw EOF in time").expect("backend I/O");
    assert_eq!(received.len(), request.len(), "the backend got every byte sent after its half-close");
    assert!(received == request, "bytes sent after the backend's half-close differ");
}

/// What one end of the bidirectional transfer saw.
#[derive(Debug)]
struct Seen {
    sent_sha256: String,
    received: u64,
    received_sha256: String,
}

/// Sends `total` bytes of stream `out_seed` on `write` (then FIN) while checking
/// that `read` delivers `total` bytes of stream `in_seed` (then EOF).
fn send_and_check(
    mut write: impl Write + Send + 'static,
    shut: impl FnOnce() + Send + 'static,
    mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    out_seed: u64,
    in_seed: u64,
    total: u64,
) -> Result<Seen, String> {
    let writer = thread::spawn(move || -> Result<String, String> {
        let mut source = Source::new(out_seed, total);
        let mut buf = vec![0; 64 * 1024];
        while let Some(chunk) = source.next_chunk(&mut buf) {
            write.write_all(chunk).map_err(|e| format!("write: {e}"))?;
        }
        shut();
        Ok(source.sha256())
    });
    let mut sink = Sink::new(in_seed, true);
    let mut buf = vec![0; 64 * 1024];
    let read_result = loop {
        match read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = sink.feed(&buf[..n]) {
                    break Err(e);
                }
            }
            Err(e) => break Err(format!("read after {} bytes: {e}", sink.received())),
        }
    };
    let sent_sha256 = writer.join().map_err(|_| "writer panicked".to_string())??;
    read_result?;
    let received_sha256 = sink.sha256().expect("hashing sink");
    Ok(Seen { sent_sha256, received: sink.received(), received_sha256 })
}

#[test]
fn sixty_four_mib_each_way_at_once_arrive_intact() {
    const TOTAL: u64 = 64 * MIB;
    const CLIENT_SEED: u64 = 11;
    const BACKEND_SEED: u64 = 22;

    let (seen_tx, seen_rx) = mpsc::channel();
    let server = Backend::spawn(move |mut conn| {
        let seen = conn.try_clone().map_err(|e| e.to_string()).and_then(|writer| {
            let shut = writer.try_clone().map_err(|e| e.to_string())?;
            let write = ConnWriter(writer);
            send_and_check(
                write,
                move || {
                    let _ = shut.shutdown_write();
                },
                |buf| conn.read(buf),
                BACKEND_SEED,
                CLIENT_SEED,
                TOTAL,
            )
        });
        let _ = seen_tx.send(seen);
    });
    let shuttle = Shuttle::start_with_config(&one_backend(server.address()), &[]);
    let mut client = connect(shuttle.service_addr("web"));
    client.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    client.set_write_timeout(Some(Duration::from_secs(30))).expect("write timeout");

    let started = Instant::now();
    let writer = client.try_clone().expect("clone client");
    let shut = client.try_clone().expect("clone client");
    let client_seen = send_and_check(
        writer,
        move || {
            let _ = shut.shutdown(Shutdown::Write);
        },
        |buf| client.read(buf),
        CLIENT_SEED,
        BACKEND_SEED,
        TOTAL,
    )
    .expect("client side of the transfer");
    let backend_seen = seen_rx.recv_timeout(Duration::from_secs(60)).expect("backend finished").expect("backend side");
    eprintln!("64 MiB each way in {:?}", started.elapsed());

    assert_eq!(client_seen.received, TOTAL, "client received the backend's whole stream");
    assert_eq!(backend_seen.received, TOTAL, "backend received the client's whole stream");
    assert_eq!(backend_seen.received_sha256, client_seen.sent_sha256, "client → backend SHA-256");
    assert_eq!(client_seen.received_sha256, backend_seen.sent_sha256, "backend → client SHA-256");
}

/// `Write` over a backend connection, for the shared transfer helper.
struct ConnWriter(crate::support::Conn);

impl Write for ConnWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn slow_reader_keeps_proxy_memory_bounded() {
    const TOTAL: u64 = 256 * MIB;
    const SEED: u64 = 33;
    const ALLOWED_GROWTH_KIB: u64 = 8 * 1024;

    let streamer = stream(SEED, TOTAL);
    let shuttle = Shuttle::start_with_config(&one_backend(streamer.address()), &[]);
    let addr = shuttle.service_addr("web");
    let baseline = shuttle.rss_kib();
    let mut client = connect(addr);

    // Read nothing until the backend's writes stop moving: every buffer on the
    // way (ours, the proxy's, the kernel's) is then full.
    let mut peak = baseline;
    let (mut last, mut last_change) = (0, Instant::now());
    let blocked = wait_until(Duration::from_secs(60), || {
        peak = peak.max(shuttle.rss_kib());
        let written = streamer.bytes();
        if written != last {
            (last, last_change) = (written, Instant::now());
        }
        written > 0 && last_change.elapsed() >= Duration::from_secs(1)
    });
    assert!(blocked, "the backend never blocked; it wrote {} bytes", streamer.bytes());
    let blocked_at = streamer.bytes();
    assert!(blocked_at < TOTAL, "the backend wrote everything while the client read nothing");
    // Keep sampling for a while as the proxy sits on full buffers.
    wait_until(Duration::from_millis(500), || {
        peak = peak.max(shuttle.rss_kib());
        false
    });
    eprintln!("backend blocked after {blocked_at} bytes; proxy RSS {baseline} KiB → peak {peak} KiB");
    assert!(
        peak < baseline + ALLOWED_GROWTH_KIB,
        "proxy RSS grew from {baseline} KiB to {peak} KiB while the client was not reading"
    );

    // Now read everything; the stream must be intact and memory still bounded.
    let mut sink = Sink::new(SEED, false);
    let mut buf = vec![0; 256 * 1024];
    let mut next_sample = 0;
    loop {
        let n = client.read(&mut buf).unwrap_or_else(|e| panic!("read after {} bytes: {e}", sink.received()));
        if n == 0 {
            break;
        }
        sink.feed(&buf[..n]).expect("stream intact");
        if sink.received() >= next_sample {
            peak = peak.max(shuttle.rss_kib());
            next_sample += 16 * MIB;
        }
    }
    assert_eq!(sink.received(), TOTAL, "the whole stream arrived, then EOF");
    assert!(peak < baseline + ALLOWED_GROWTH_KIB, "proxy RSS grew from {baseline} KiB to {peak} KiB while relaying");
}
