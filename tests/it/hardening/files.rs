//! The files shuttle reads and writes: one shuttle per state file, private
//! modes whatever the umask, no writing through a planted temporary name,
//! stale temporary files cleared, and guarded reads of odd files.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use serde_json::{json, Value};

use super::one_error_line;
use crate::admin::{config_json, put, Http};
use crate::support::{
    connect, echo, one_backend, round_trip, tempdir, try_connect, wait_until, write_config, write_file, Launch,
    Shuttle, DEADLINE,
};

fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// The permission bits of `path` (not following a symlink).
fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).permissions().mode() & 0o777
}

/// A service body at 127.0.0.1:0 with one backend.
fn body(backend: &str) -> Value {
    json!({ "address": "127.0.0.1:0", "backends": [{ "name": "b0", "address": backend }] })
}

/// The names in `dir` starting with `prefix`.
fn names_with(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read the directory")
        .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

const UMASK_0: Launch =
    Launch { fd_limit: None, mem_limit: None, umask: Some(0), resolv_conf: None, env: Vec::new(), stdout: None };

// ---------------------------------------------------------------------------
// The state lock
// ---------------------------------------------------------------------------

#[test]
fn a_second_shuttle_on_the_same_state_file_fails_and_names_the_first() {
    let echo = echo();
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let config = write_config(dir.path(), &one_backend(echo.address()));
    let first = Shuttle::start(&["-config", arg(&config), "-state", arg(&state)]);
    let web = first.service_addr("web");

    let (status, lines) = Shuttle::start_expect_failure(&["-config", arg(&config), "-state", arg(&state)]);
    let line = one_error_line(status, &lines);
    assert!(line.contains(arg(&state)), "the error does not name the state file: {line}");
    assert!(line.contains("in use by another shuttle"), "the error does not say it is in use: {line}");
    assert!(line.contains(&format!("pid {}", first.pid())), "the error does not name the holder's pid: {line}");

    // The first one is undisturbed.
    assert!(first.is_running());
    let mut client = connect(web);
    round_trip(&mut client, b"the first shuttle still proxies");
    put(first.admin_addr(), "/api", &body(&echo.address())).expect(200);

    // Once it is gone, the state file is free.
    drop(client);
    drop(first);
    let second = Shuttle::start(&["-config", arg(&config), "-state", arg(&state)]);
    let mut client = connect(second.service_addr("api"));
    round_trip(&mut client, b"the second shuttle loaded the state");
}

// ---------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------

#[test]
fn unix_admin_socket_is_private_even_with_umask_0() {
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    let shuttle = Shuttle::launch(&["-http", arg(&socket)], UMASK_0);
    shuttle.wait_for_line(&format!("admin listening on {}", socket.display()));
    assert_eq!(mode(&socket), 0o600, "the unix admin socket's mode");
    Http::unix(&socket).request("GET", "/_config", None).expect(200);
}

#[test]
fn http_mode_sets_the_unix_socket_permissions() {
    let dir = tempdir();
    let socket = dir.path().join("admin.sock");
    let shuttle = Shuttle::launch(&["-http", arg(&socket), "-http-mode", "0660"], UMASK_0);
    shuttle.wait_for_line(&format!("admin listening on {}", socket.display()));
    assert_eq!(mode(&socket), 0o660, "the unix admin socket's mode with -http-mode 0660");
    Http::unix(&socket).request("GET", "/_config", None).expect(200);
}

#[test]
fn state_and_lock_files_are_private_even_with_umask_0() {
    let echo = echo();
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let shuttle = Shuttle::launch(&["-state", arg(&state), "-http", "127.0.0.1:0"], UMASK_0);
    let admin = shuttle.admin_addr();
    put(admin, "/web", &body(&echo.address())).expect(200);
    assert_eq!(mode(&state), 0o600, "the state file's mode");
    let lock = dir.path().join("state.json.lock");
    assert_eq!(mode(&lock), 0o600, "the lock file's mode");
}

// ---------------------------------------------------------------------------
// Temporary files
// ---------------------------------------------------------------------------

#[test]
fn a_symlink_planted_at_the_old_temp_name_is_not_written_through() {
    // Earlier versions saved through `.state.json.tmp.<pid>`, a name anyone can
    // guess, and followed a symlink there.
    let echo = echo();
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let precious = write_file(dir.path(), "precious", b"precious content\n");
    let shuttle = Shuttle::start(&["-state", arg(&state)]);
    let admin = shuttle.admin_addr();
    let planted = dir.path().join(format!(".state.json.tmp.{}", shuttle.pid()));
    symlink(&precious, &planted).expect("plant a symlink");

    let answer = put(admin, "/web", &body(&echo.address())).expect(200);
    let now = String::from_utf8_lossy(&fs::read(&precious).expect("read precious")).into_owned();
    assert_eq!(now, "precious content\n", "written through the symlink");
    let meta = fs::symlink_metadata(&state).expect("stat the state file");
    assert!(meta.file_type().is_file(), "the state file is not a regular file: {:?}", meta.file_type());
    let saved: Value = serde_json::from_slice(&fs::read(&state).expect("read the state file")).expect("state is JSON");
    assert_eq!(saved, answer.json(), "the state file holds the new config");
    assert_eq!(saved, config_json(admin));
}

#[test]
fn a_state_file_in_a_world_writable_directory_fails_start_up() {
    for dir_mode in [0o777, 0o1777] {
        let dir = tempdir();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(dir_mode)).expect("chmod the directory");
        let state = dir.path().join("state.json");
        let (status, lines) = Shuttle::start_expect_failure(&["-state", arg(&state)]);
        let line = one_error_line(status, &lines);
        assert!(line.contains(arg(dir.path())), "mode {dir_mode:o}: the error does not name the directory: {line}");
    }
}

#[test]
fn stale_temp_files_beside_the_state_file_are_removed_at_start_up() {
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let stale = [dir.path().join(".state.json.tmp.12345"), dir.path().join(".state.json.tmp.abc")];
    for path in &stale {
        File::create(path).expect("create a stale temp file");
    }
    let other = write_file(dir.path(), ".other.tmp.1", b"");
    let shuttle = Shuttle::start(&["-state", arg(&state)]);
    shuttle.admin_addr();
    assert!(
        wait_until(DEADLINE, || stale.iter().all(|p| !p.exists())),
        "stale temp files left: {:?}",
        names_with(dir.path(), ".state.json.tmp.")
    );
    assert!(other.exists(), "another file's temp name was removed");
}

/// PUTs from a thread, each changing b0's weight to the next number, until
/// told to stop or the connection fails.
struct Writer {
    acked: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Writer {
    fn start(admin: std::net::SocketAddr, backend: String, from: u64) -> Writer {
        let (acked, sent, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (acked, sent, stop) = (acked.clone(), sent.clone(), stop.clone());
            thread::spawn(move || {
                let mut weight = from;
                while !stop.load(Ordering::SeqCst) {
                    weight += 1;
                    let body = json!({ "address": backend, "weight": weight }).to_string();
                    let request = format!(
                        "PUT /web/b0 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let Ok(mut stream) = try_connect(admin) else { return };
                    sent.store(weight, Ordering::SeqCst);
                    let mut answer = Vec::new();
                    if stream.write_all(request.as_bytes()).is_err() || stream.read_to_end(&mut answer).is_err() {
                        return;
                    }
                    if !answer.starts_with(b"HTTP/1.1 200 ") {
                        return;
                    }
                    acked.store(weight, Ordering::SeqCst);
                }
            })
        };
        Writer { acked, sent, stop, thread: Some(thread) }
    }
}

impl Writer {
    /// Stops the writer: the last weight answered, and the last one sent.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        (self.acked.load(Ordering::SeqCst), self.sent.load(Ordering::SeqCst))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// b0's weight in the saved state.
fn saved_weight(state: &Path) -> u64 {
    let text = fs::read(state).unwrap_or_else(|e| panic!("read {}: {e}", state.display()));
    let saved: Value =
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("the state file is not whole JSON ({e}): {text:?}"));
    saved[0]["backends"][0]["weight"].as_u64().unwrap_or_else(|| panic!("no weight of b0 in {saved}"))
}

#[test]
fn kill_9_during_saves_leaves_a_whole_state_file_and_no_temp_files() {
    let echo = echo();
    let dir = tempdir();
    let state = dir.path().join("state.json");
    let config = write_config(dir.path(), &one_backend(echo.address()));
    let start = || Shuttle::start(&["-config", arg(&config), "-state", arg(&state)]);
    let mut weight = 1;
    for round in 0..10u64 {
        let mut shuttle = start();
        let temps = names_with(dir.path(), ".state.json.tmp.");
        assert!(temps.is_empty(), "round {round}: temp files left after start-up: {temps:?}");
        // Killed after a few answers, with the next save likely under way.
        let answers = 1 + (round * 7) % 11;
        let writer = Writer::start(shuttle.admin_addr(), echo.address(), weight);
        assert!(
            wait_until(DEADLINE, || writer.acked.load(Ordering::SeqCst) >= weight + answers),
            "round {round}: fewer than {answers} PUTs answered"
        );
        shuttle.signal(libc::SIGKILL);
        assert!(shuttle.wait_exit(DEADLINE).is_some(), "SIGKILL did not end it");
        // Answers already on their way are counted once the writer has read them.
        let (acked, sent) = writer.finish();
        let saved = saved_weight(&state);
        // Every answered change was saved before its answer; at most the one in flight more.
        assert!(saved >= acked, "round {round}: weight {acked} was answered but the state file has {saved}");
        assert!(saved <= sent, "round {round}: the state file has weight {saved}, more than the {sent} sent");
        weight = saved;
    }
    let shuttle = start();
    shuttle.admin_addr();
    let temps = names_with(dir.path(), ".state.json.tmp.");
    assert!(temps.is_empty(), "temp files left after the last start-up: {temps:?}");
    assert_eq!(config_json(shuttle.admin_addr())[0]["backends"][0]["weight"].as_u64(), Some(weight));
}

// ---------------------------------------------------------------------------
// Odd files
// ---------------------------------------------------------------------------

fn mkfifo(path: &Path) {
    let c = CString::new(arg(path)).expect("no NUL in the path");
    // SAFETY: mkfifo reads the NUL-terminated path we own.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Limits for a shuttle that might read a huge file: 2 GiB of address space at most.
const GUARDED: Launch =
    Launch { fd_limit: None, mem_limit: Some(2 << 30), umask: None, resolv_conf: None, env: Vec::new(), stdout: None };

#[test]
fn a_fifo_as_the_state_file_fails_start_up_at_once() {
    let dir = tempdir();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    // A shuttle that waits for a writer to open the FIFO fails here after DEADLINE.
    let (status, lines) = Shuttle::launch_expect_failure(&["-state", arg(&fifo)], GUARDED);
    let line = one_error_line(status, &lines);
    assert!(line.contains("not a regular file"), "the error does not say what is wrong: {line}");
    assert!(line.contains(arg(&fifo)), "the error does not name the file: {line}");
    // And as the config.
    let (status, lines) = Shuttle::launch_expect_failure(&["-config", arg(&fifo)], GUARDED);
    let line = one_error_line(status, &lines);
    assert!(line.contains("not a regular file"), "{line}");
}

#[test]
fn dev_zero_as_the_config_fails_start_up() {
    // Without the guard, a shuttle that reads it whole eats the machine's memory;
    // with it, such a shuttle fails for want of memory, not for the right reason.
    let (status, lines) = Shuttle::launch_expect_failure(&["-config", "/dev/zero"], GUARDED);
    let line = one_error_line(status, &lines);
    assert!(line.contains("/dev/zero"), "the error does not name the file: {line}");
    assert!(line.contains("not a regular file"), "the error does not say what is wrong: {line}");
}

#[test]
fn an_oversized_state_file_fails_start_up_without_being_read() {
    let dir = tempdir();
    let state: PathBuf = dir.path().join("state.json");
    // Sparse: no disk, and no memory unless shuttle reads it.
    File::create(&state).expect("create").set_len(1 << 30).expect("make it 1 GiB");
    let (status, lines) = Shuttle::launch_expect_failure(&["-state", arg(&state)], GUARDED);
    let line = one_error_line(status, &lines);
    assert!(line.contains("64 MiB"), "the error does not name the limit: {line}");
    assert!(line.contains(arg(&state)), "the error does not name the file: {line}");
    assert_eq!(fs::metadata(&state).expect("stat").len(), 1 << 30, "the state file was changed");
}
