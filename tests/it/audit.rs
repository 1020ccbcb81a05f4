//! The audit log (reference §7): every admin change is logged at info with
//! who asked and what changed; a refused one at warn with its reason.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::json;

use crate::admin::{delete, put};
use crate::support::{echo, tempdir, wait_until, Shuttle, DEADLINE};

/// The first log line after `seen` lines that contains every one of `words`.
pub(crate) fn line_with(shuttle: &Shuttle, seen: usize, words: &[&str]) -> String {
    let mut found = None;
    let ok = wait_until(DEADLINE, || {
        found = shuttle.stderr_lines()[seen..].iter().find(|l| words.iter().all(|w| l.contains(w))).cloned();
        found.is_some()
    });
    assert!(ok, "no log line with {words:?}: {:?}", &shuttle.stderr_lines()[seen..]);
    found.unwrap_or_default()
}

#[test]
fn changes_are_logged_with_who_asked_and_what_changed() {
    let up = echo();
    let shuttle = Shuttle::start(&[]);
    let admin = shuttle.admin_addr();
    let body = |timeout: u32, backends: &[&str]| {
        let list: Vec<_> = backends.iter().map(|b| json!({"name": b, "address": up.address()})).collect();
        json!({"address": "127.0.0.1:0", "connect_timeout": timeout, "backends": list})
    };

    let seen = shuttle.stderr_lines().len();
    put(admin, "/web", &body(5, &["a"])).expect(200);
    let added = line_with(&shuttle, seen, &["INFO", "admin: PUT /web from 127.0.0.1:", "service web added"]);
    assert!(!added.contains("WARN"), "{added}");

    let seen = shuttle.stderr_lines().len();
    put(admin, "/web", &body(2, &["a", "b"])).expect(200);
    let replaced = line_with(&shuttle, seen, &["admin: PUT /web from 127.0.0.1:", "service web updated"]);
    assert!(replaced.contains("connect_timeout 5 → 2") && replaced.contains("added b"), "{replaced}");

    let seen = shuttle.stderr_lines().len();
    put(admin, "/web/b", &json!({"address": up.address(), "weight": 3})).expect(200);
    line_with(&shuttle, seen, &["admin: PUT /web/b from 127.0.0.1:", "backends updated: changed b"]);

    let seen = shuttle.stderr_lines().len();
    let refused = put(admin, "/web", &json!({"address": "127.0.0.1:0", "balance": "XX"}));
    assert_eq!(refused.status, 400);
    let line = line_with(&shuttle, seen, &["WARN", "admin: PUT /web from 127.0.0.1:", "refused with 400"]);
    assert!(line.contains("balance"), "the reason is logged: {line}");

    let seen = shuttle.stderr_lines().len();
    delete(admin, "/web").expect(200);
    line_with(&shuttle, seen, &["admin: DELETE /web from 127.0.0.1:", "service web removed"]);
}

#[test]
fn a_change_over_the_unix_socket_names_the_peer_uid_and_pid() {
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    let shuttle = Shuttle::start(&["-http", socket.to_str().expect("utf-8")]);
    let mut client = UnixStream::connect(&socket).expect("connect the admin socket");
    client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let body = json!({"address": "127.0.0.1:0"}).to_string();
    let request =
        format!("PUT /web HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    client.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    let _ = client.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let me = format!("from unix socket (uid {uid}, pid {})", std::process::id());
    line_with(&shuttle, 0, &["admin: PUT /web", &me, "service web added"]);
}
