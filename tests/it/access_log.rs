//! The access log (`-access-log PATH|-`, `-access-log-format text|json`): one
//! line per finished connection for every way a connection ends, in both
//! formats; standard output; a sink that never drains; logrotate's rename and
//! SIGUSR1; bad paths and flags, the file's mode, appending across restarts,
//! and whole lines from many connections at once.
//!
//! Lines are written by a thread of their own after the connection closed,
//! and with two workers they come from both loops: every check polls the file
//! until the lines it expects are there, and matches them by client address,
//! never by order.
//!
//! `line` parses the two formats strictly; `ends` has a line for each way a
//! connection ends; `sinks` covers standard output, stuck FIFOs and logrotate;
//! `edges` bad paths and flags, the file's mode and appending, and many
//! connections at once.

mod edges;
mod ends;
mod flows;
mod line;
mod sinks;

use std::fs;
use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::path::Path;

use serde_json::Value;

use crate::support::{connect, read_to_eof, round_trip, wait_until, write_config, Launch, Shuttle, DEADLINE};

/// `-access-log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

impl Format {
    fn flag(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

/// The complete (newline-terminated) lines of `path` so far; none if it does not exist.
fn lines_of(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let Some(end) = text.rfind('\n') else { return Vec::new() };
    text[..end].split('\n').map(str::to_string).collect()
}

/// Waits until `path` holds at least `n` complete lines and returns them all.
#[track_caller]
fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let enough = wait_until(DEADLINE, || {
        lines = lines_of(path);
        lines.len() >= n
    });
    assert!(enough, "{} has {} lines, not {n}, after {DEADLINE:?}: {lines:#?}", path.display(), lines.len());
    lines
}

/// One value of `GET /metrics` (the Prometheus text format), `None` when absent.
fn metric(admin: SocketAddr, name: &str) -> Option<u64> {
    let mut stream = connect(admin);
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send GET /metrics");
    let response = String::from_utf8(read_to_eof(&mut stream)).expect("metrics are UTF-8");
    assert!(response.starts_with("HTTP/1.1 200"), "GET /metrics: {response}");
    let (_, body) = response.split_once("\r\n\r\n").expect("a response head");
    let prefix = format!("{name} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().expect("a counter's value"))
}

/// Starts shuttle with `config` (written into `dir`), `args` and `launch`, and
/// waits until it listens.
fn start(dir: &Path, config: &Value, args: &[&str], launch: Launch) -> Shuttle {
    let path = write_config(dir, config);
    let mut all = vec!["-config", path.to_str().expect("utf-8 temp path")];
    all.extend_from_slice(args);
    let shuttle = Shuttle::launch(&all, launch);
    shuttle.wait_for_line(" listening on ");
    shuttle
}

/// SIGTERM, then an exit 0 within [`DEADLINE`].
#[track_caller]
fn stop(shuttle: &mut Shuttle) {
    shuttle.signal(libc::SIGTERM);
    let status = shuttle.wait_exit(DEADLINE).expect("shuttle exits after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

/// One short echo connection that the client closes first; returns its address.
#[track_caller]
fn echo_once(addr: SocketAddr, message: &[u8]) -> SocketAddr {
    let mut client = connect(addr);
    let local = client.local_addr().expect("client address");
    round_trip(&mut client, message);
    client.shutdown(Shutdown::Write).expect("shut the client's write side");
    assert_eq!(read_to_eof(&mut client), b"", "nothing after the echo");
    local
}
