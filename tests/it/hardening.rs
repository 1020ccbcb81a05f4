//! Regression tests of the hardening pass: resets behind stalled backends,
//! admin memory, access checks and limits, the state file's lock, modes and
//! temporary files, guarded file reads, signals, error lines, and probes
//! under a low fd limit. Each test fails on the code before it (919b205);
//! run one against an older build with `SHUTTLE_TEST_BIN=PATH`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::admin::{request_bytes, Http, Response};

mod access;
mod cli;
mod files;
mod limits;
mod loops;
mod proxying;

/// The admin body limit, 1 MiB.
const MIB: usize = 1024 * 1024;

/// The stderr lines starting `shuttle: ` (start-up and command-line errors).
fn error_lines(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|line| line.starts_with("shuttle:")).collect()
}

/// Asserts a start-up failure: exit status 1 and exactly one `shuttle: ` line,
/// which is returned.
#[track_caller]
fn one_error_line(status: std::process::ExitStatus, lines: &[String]) -> String {
    assert_eq!(status.code(), Some(1), "expected exit status 1, got {status}; stderr: {lines:#?}");
    let errors = error_lines(lines);
    assert_eq!(errors.len(), 1, "expected exactly one `shuttle:` line: {lines:#?}");
    errors[0].clone()
}

/// One request with the exact head fields `fields` (no `Host` unless given) on
/// a fresh connection.
#[track_caller]
fn raw_request(admin: SocketAddr, method: &str, target: &str, fields: &[&str], body: Option<&[u8]>) -> Response {
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for field in fields {
        head.push_str(field);
        head.push_str("\r\n");
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    let mut http = Http::tcp(admin);
    http.send(&bytes);
    http.response()
}

/// One request with the usual `Host: localhost` plus `extra` fields on a fresh connection.
#[track_caller]
fn request_with(admin: SocketAddr, method: &str, target: &str, body: Option<&[u8]>, extra: &[&str]) -> Response {
    let mut http = Http::tcp(admin);
    http.send(&request_bytes(method, target, body, extra));
    http.response()
}

/// `GET /_config` with `Connection: close` on a fresh connection, every
/// socket operation bounded by `timeout`: the status, or why there was none.
fn get_config_within(admin: SocketAddr, timeout: Duration) -> Result<u16, String> {
    let mut stream = TcpStream::connect_timeout(&admin, timeout).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /_config HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut all = Vec::new();
    match stream.read_to_end(&mut all) {
        Ok(_) => {}
        Err(e) if all.is_empty() => return Err(format!("read: {e}")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(format!("read after {} bytes: {e}", all.len())),
    }
    let text = String::from_utf8_lossy(&all);
    let status =
        text.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok()).ok_or_else(
            || format!("no status line in {} bytes: {:?}", all.len(), text.chars().take(80).collect::<String>()),
        )?;
    Ok(status)
}
