//! Unix sockets for traffic (reference §3.6): `unix:/path` as a service's
//! address, a backend's address or a check address, bridging TCP and unix
//! both ways with half-close; the socket file's mode, stale files replaced,
//! live sockets and other files refused and left alone, files removed when
//! their service goes; health checks of unix backends; bad paths.

use std::fs;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};

use crate::admin::{call, config_json, delete, put, stats};
use crate::fail_open::{fast_checks, wait_health};
use crate::support::{connect, echo, read_to_eof, tempdir, wait_until, Shuttle, DEADLINE, IO_TIMEOUT};

/// What a unix test server does with each connection.
#[derive(Clone, Copy)]
enum Serve {
    /// Echoes until EOF, then shuts its write side.
    Echo,
    /// Sends `hello\n`, shuts its write side, then reads until EOF and answers nothing more.
    GreetThenListen,
}

/// A unix stream server on a thread, stopped (its listener closed, its file left) when dropped.
struct UnixServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    heard: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl UnixServer {
    fn start(path: &Path, serve: Serve) -> UnixServer {
        let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = {
            let (stop, heard) = (stop.clone(), heard.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let heard = heard.clone();
                    thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                        match serve {
                            Serve::Echo => {
                                let mut buf = [0u8; 65536];
                                while let Ok(n @ 1..) = conn.read(&mut buf) {
                                    if conn.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                let _ = conn.shutdown(Shutdown::Write);
                            }
                            Serve::GreetThenListen => {
                                let _ = conn.write_all(b"hello\n");
                                let _ = conn.shutdown(Shutdown::Write);
                                let mut got = Vec::new();
                                let _ = conn.read_to_end(&mut got);
                                if let Ok(mut h) = heard.lock() {
                                    h.extend_from_slice(&got);
                                }
                            }
                        }
                    });
                }
            })
        };
        UnixServer { path: path.to_path_buf(), stop, thread: Some(thread), heard }
    }

    fn address(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// Stops listening; the socket file stays behind, stale.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A unix client of `path` with timeouts.
fn unix_connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

/// Sends `message`, half-closes, and reads the whole echo to EOF.
fn echo_round<S: Read + Write>(stream: &mut S, shut: impl FnOnce(&S), message: &[u8]) -> Vec<u8> {
    stream.write_all(message).expect("send");
    shut(stream);
    let mut back = Vec::new();
    stream.read_to_end(&mut back).expect("read to EOF");
    back
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A service on `address` with one backend.
fn service_at(name: &str, address: &str, backend: &str) -> Value {
    json!({ "name": name, "address": address, "backends": [{ "name": "b", "address": backend }] })
}

/// Starts shuttle with `config` and waits until service `name` listens.
fn start(config: &Value, args: &[&str], name: &str) -> Shuttle {
    let shuttle = Shuttle::start_with_config(config, args);
    shuttle.wait_for_line(&format!("service {name} listening on "));
    shuttle
}

#[test]
fn a_tcp_client_reaches_a_unix_backend_with_half_close_both_ways() {
    let dir = tempdir();
    let echo_server = UnixServer::start(&dir.path().join("echo.sock"), Serve::Echo);
    let greeter = UnixServer::start(&dir.path().join("greet.sock"), Serve::GreetThenListen);
    let config = json!([
        service_at("echo", "127.0.0.1:0", &echo_server.address()),
        service_at("greet", "127.0.0.1:0", &greeter.address()),
    ]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let message: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let mut client = connect(shuttle.service_addr("echo"));
    let back = echo_round(&mut client, |c| c.shutdown(Shutdown::Write).expect("shut"), &message);
    assert!(back == message, "200 kB came back whole through the unix backend ({} bytes)", back.len());
    // The backend finishes first: the client sees its EOF and may still send.
    let mut client = connect(shuttle.service_addr("greet"));
    let mut line = [0u8; 6];
    client.read_exact(&mut line).expect("the greeting");
    assert_eq!(&line, b"hello\n");
    assert_eq!(client.read(&mut [0u8; 1]).expect("EOF"), 0, "the backend's half-close reached the client");
    client.write_all(b"after your EOF").expect("the other direction is still open");
    client.shutdown(Shutdown::Write).expect("shut");
    assert!(wait_until(DEADLINE, || greeter.heard.lock().map(|h| h.as_slice() == b"after your EOF").unwrap_or(false)));
    assert_eq!(stats(shuttle.admin_addr(), "/echo")["backends"][0]["address"], echo_server.address());
}

#[test]
fn a_unix_client_reaches_a_tcp_backend_and_the_access_log_names_it() {
    let dir = tempdir();
    let path = dir.path().join("web.sock");
    let backend = echo();
    let log = dir.path().join("access.log");
    let address = format!("unix:{}", path.display());
    let shuttle = start(
        &json!([service_at("web", &address, &backend.address())]),
        &["-access-log", log.to_str().unwrap()],
        "web",
    );
    shuttle.wait_for_line(&format!("service web listening on {address}"));
    assert!(is_socket(&path));
    let mut client = unix_connect(&path);
    let back = echo_round(&mut client, |c| c.shutdown(Shutdown::Write).expect("shut"), b"over a unix socket");
    assert_eq!(back, b"over a unix socket");
    drop(client);
    assert!(wait_until(DEADLINE, || fs::read_to_string(&log).unwrap_or_default().contains("client=unix:")));
    let line = fs::read_to_string(&log).unwrap_or_default();
    assert!(line.contains(&format!("backend_address={}", backend.address())), "{line}");
    assert_eq!(config_json(shuttle.admin_addr())[0]["address"], address, "the config keeps the path as written");
}

#[test]
fn a_unix_client_reaches_a_unix_backend_many_at_once() {
    let dir = tempdir();
    let backend = UnixServer::start(&dir.path().join("b.sock"), Serve::Echo);
    let path = dir.path().join("front.sock");
    let address = format!("unix:{}", path.display());
    let shuttle = start(&json!([service_at("web", &address, &backend.address())]), &[], "web");
    let clients: Vec<JoinHandle<Vec<u8>>> = (0..100u8)
        .map(|i| {
            let path = path.clone();
            thread::spawn(move || {
                let mut c = unix_connect(&path);
                echo_round(&mut c, |c| c.shutdown(Shutdown::Write).expect("shut"), &[i; 3000])
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().expect("a client thread"), vec![i as u8; 3000], "client {i}");
    }
    assert!(wait_until(DEADLINE, || stats(shuttle.admin_addr(), "/web")["connections"] == 100));
}

#[test]
fn the_socket_file_gets_its_mode_and_a_patch_changes_it_in_place() {
    let dir = tempdir();
    let backend = echo();
    let (default_path, custom_path) = (dir.path().join("default.sock"), dir.path().join("custom.sock"));
    let mut custom = service_at("custom", &format!("unix:{}", custom_path.display()), &backend.address());
    custom["socket_mode"] = json!("0600");
    let config = json!([service_at("plain", &format!("unix:{}", default_path.display()), &backend.address()), custom]);
    let shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    assert!(wait_until(DEADLINE, || is_socket(&default_path) && is_socket(&custom_path)));
    assert_eq!(mode_of(&default_path), 0o660, "the default mode");
    assert_eq!(mode_of(&custom_path), 0o600);
    let inode = fs::metadata(&custom_path).map(|m| m.ino()).unwrap_or(0);
    call(admin, "PATCH", "/custom", Some(r#"{"socket_mode": "0640"}"#)).expect(200);
    assert!(wait_until(DEADLINE, || mode_of(&custom_path) == 0o640), "mode {:o}", mode_of(&custom_path));
    assert_eq!(fs::metadata(&custom_path).map(|m| m.ino()).unwrap_or(1), inode, "the same socket, not a new one");
    for bad in [r#""0800""#, r#""rw-""#, r#""01777""#, "660"] {
        let response = call(admin, "PATCH", "/custom", Some(&format!(r#"{{"socket_mode": {bad}}}"#)));
        assert_eq!(response.status, 400, "{bad}: {response:?}");
        assert!(response.error().contains("socket_mode"), "{response:?}");
    }
    assert_eq!(mode_of(&custom_path), 0o640);
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_or_another_file_is_refused_and_left_alone() {
    let dir = tempdir();
    let backend = echo();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    assert!(is_socket(&stale), "a closed listener leaves its file");
    let address = format!("unix:{}", stale.display());
    let shuttle = start(&json!([service_at("web", &address, &backend.address())]), &[], "web");
    let admin = shuttle.admin_addr();
    let mut client = unix_connect(&stale);
    assert_eq!(echo_round(&mut client, |c| c.shutdown(Shutdown::Write).expect("shut"), b"x"), b"x");

    let live = dir.path().join("live.sock");
    let theirs = UnixListener::bind(&live).expect("bind theirs");
    let before = config_json(admin);
    let response = put(admin, "/other", &service_at("other", &format!("unix:{}", live.display()), &backend.address()));
    assert_eq!(response.status, 409, "{response:?}");
    assert!(response.error().contains("another process is listening there"), "{response:?}");
    UnixStream::connect(&live).expect("their socket still works");
    drop(theirs);

    let file = dir.path().join("data");
    fs::write(&file, b"keep me").expect("write");
    let response = put(admin, "/other", &service_at("other", &format!("unix:{}", file.display()), &backend.address()));
    assert_eq!(response.status, 409, "{response:?}");
    assert!(response.error().contains("regular file, not a socket"), "{response:?}");
    assert_eq!(fs::read(&file).expect("read"), b"keep me");
    let missing = dir.path().join("no/such/dir.sock");
    let response =
        put(admin, "/other", &service_at("other", &format!("unix:{}", missing.display()), &backend.address()));
    assert_eq!(response.status, 409, "{response:?}");
    assert!(response.error().contains("does not exist"), "{response:?}");
    assert_eq!(config_json(admin), before, "nothing changed");
}

#[test]
fn the_socket_file_goes_with_its_service_its_old_address_and_shuttle() {
    let dir = tempdir();
    let backend = echo();
    let (a, b, c) = (dir.path().join("a.sock"), dir.path().join("b.sock"), dir.path().join("c.sock"));
    let config = json!([
        service_at("moving", &format!("unix:{}", a.display()), &backend.address()),
        service_at("deleted", &format!("unix:{}", c.display()), &backend.address()),
    ]);
    let mut shuttle = Shuttle::start_with_config(&config, &[]);
    let admin = shuttle.admin_addr();
    assert!(wait_until(DEADLINE, || is_socket(&a) && is_socket(&c)));
    put(admin, "/moving", &service_at("moving", &format!("unix:{}", b.display()), &backend.address())).expect(200);
    assert!(wait_until(DEADLINE, || is_socket(&b) && !a.exists()), "the old path is removed, the new one listens");
    let mut client = unix_connect(&b);
    assert_eq!(echo_round(&mut client, |s| s.shutdown(Shutdown::Write).expect("shut"), b"moved"), b"moved");
    delete(admin, "/deleted").expect(200);
    assert!(wait_until(DEADLINE, || !c.exists()), "a deleted service's socket file goes");
    shuttle.signal(libc::SIGTERM);
    assert!(shuttle.wait_exit(DEADLINE).is_some());
    assert!(!b.exists(), "shuttle removes its socket files when it stops");
}

#[test]
fn unix_backends_are_health_checked_and_go_down_and_up() {
    let dir = tempdir();
    let path = dir.path().join("b.sock");
    let mut backend = UnixServer::start(&path, Serve::Echo);
    let address = backend.address();
    let web = fast_checks(json!({ "name": "web", "address": "127.0.0.1:0",
        "backends": [{ "name": "b", "address": address, "check_address": address }] }));
    let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
    let admin = shuttle.admin_addr();
    assert!(wait_until(DEADLINE, || stats(admin, "/web/b")["check_success"].as_u64() >= Some(2)));
    backend.stop();
    wait_health(admin, "web", "b", false);
    assert_eq!(stats(admin, "/web/b")["last_error"], "refused", "a stale unix socket refuses");
    fs::remove_file(&path).expect("remove the stale file");
    let _back = UnixServer::start(&path, Serve::Echo);
    wait_health(admin, "web", "b", true);
    let mut client = connect(shuttle.service_addr("web"));
    client.write_all(b"up again").expect("send");
    client.shutdown(Shutdown::Write).expect("shut");
    assert_eq!(read_to_eof(&mut client), b"up again");
}

#[test]
fn bad_unix_addresses_are_400_and_change_nothing() {
    let backend = echo();
    let shuttle = Shuttle::start_with_config(&json!([service_at("web", "127.0.0.1:0", &backend.address())]), &[]);
    let admin = shuttle.admin_addr();
    let before = config_json(admin);
    let long = format!("unix:/{}", "a".repeat(120));
    let bad = ["unix:relative.sock", "unix:", &long, "unix:/run/dir/", "unix:/a\u{0}b"];
    for address in bad {
        for body in [service_at("new", address, &backend.address()), service_at("new", "127.0.0.1:0", address)] {
            let response = put(admin, "/new", &body);
            assert_eq!(response.status, 400, "{address:?}: {response:?}");
            assert!(response.error().contains("unix socket path"), "{address:?}: {response:?}");
        }
    }
    let udp = json!({ "name": "new", "address": "unix:/tmp/x.sock", "protocol": "udp", "backends": [] });
    assert_eq!(put(admin, "/new", &udp).status, 400, "UDP over a unix path is refused");
    // A backend at the service's own path would loop.
    let looped = service_at("new", "unix:/tmp/shuttle-loop-test.sock", "unix:/tmp/shuttle-loop-test.sock");
    let response = put(admin, "/new", &looped);
    assert_eq!(response.status, 400, "{response:?}");
    assert!(response.error().contains("loop"), "{response:?}");
    assert_eq!(config_json(admin), before);
}
