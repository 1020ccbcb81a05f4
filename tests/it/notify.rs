//! systemd's readiness protocol (reference §7): with `$NOTIFY_SOCKET` set,
//! `READY=1` once every listener and the admin API are up, `STOPPING=1` when
//! the drain begins; a socket that is missing or full never stalls shuttle.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

use crate::admin::get;
use crate::support::{backend, connect, echo, round_trip, service, tempdir, write_config, Launch, Shuttle, DEADLINE};

/// Starts shuttle on a one-service config with `NOTIFY_SOCKET=name`, without waiting for anything.
fn launch(dir: &Path, name: &str, echo: &crate::support::Backend) -> Shuttle {
    let config = write_config(dir, &serde_json::json!([service("web", vec![backend("b0", echo.address())])]));
    let launch = Launch { env: vec![("NOTIFY_SOCKET".into(), name.into())], ..Launch::default() };
    Shuttle::launch(&["-config", config.to_str().expect("utf-8 temp path"), "-grace", "30"], launch)
}

/// The next datagram as its `KEY=value` lines.
fn receive(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no notification within {DEADLINE:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect()
}

/// The whole conversation: READY=1 (shuttle serving by then), then STOPPING=1 on SIGTERM.
fn ready_then_stopping(receiver: &UnixDatagram, name: &str) {
    receiver.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let echo = echo();
    let dir = tempdir();
    let mut shuttle = launch(dir.path(), name, &echo);
    let ready = receive(receiver);
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");
    assert!(ready.contains(&format!("MAINPID={}", shuttle.pid())), "{ready:?}");
    assert!(ready.iter().any(|l| l.starts_with("STATUS=") && l.contains("1 service")), "{ready:?}");
    // Ready means ready: the service and the admin API answer now.
    let mut client = connect(shuttle.service_addr("web"));
    round_trip(&mut client, b"ready");
    get(shuttle.admin_addr(), "/_info").expect(200);

    shuttle.signal(libc::SIGTERM);
    let stopping = receive(receiver);
    assert!(stopping.contains(&"STOPPING=1".to_string()), "{stopping:?}");
    assert!(stopping.iter().any(|l| l.starts_with("STATUS=draining: 1 open connection")), "{stopping:?}");
    drop(client);
    let status = shuttle.wait_exit(DEADLINE).expect("exit after the last connection closed");
    assert!(status.success(), "{status:?}");
}

#[test]
fn notify_ready_then_stopping_on_a_socket_path() {
    let dir = tempdir();
    let path = dir.path().join("notify");
    let receiver = UnixDatagram::bind(&path).expect("bind the notify socket");
    ready_then_stopping(&receiver, path.to_str().expect("utf-8"));
}

#[test]
fn notify_ready_then_stopping_on_an_abstract_socket() {
    let name = format!("shuttle-it-notify-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let receiver = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
    ready_then_stopping(&receiver, &format!("@{name}"));
}

#[test]
fn notify_to_a_missing_or_full_socket_never_stalls_shuttle() {
    let echo = echo();
    let dir = tempdir();
    // Nobody listens at this path.
    let missing = dir.path().join("nobody");
    let mut shuttle = launch(dir.path(), missing.to_str().expect("utf-8"), &echo);
    round_trip(&mut connect(shuttle.service_addr("web")), b"serving anyway");
    shuttle.wait_for_line("cannot notify systemd");
    shuttle.signal(libc::SIGTERM);
    assert!(shuttle.wait_exit(DEADLINE).expect("exit").success());
    let warnings = shuttle.stderr_lines().iter().filter(|l| l.contains("cannot notify systemd")).count();
    assert_eq!(warnings, 1, "the failure is logged once: {:?}", shuttle.stderr_lines());

    // A receiver whose queue is full: a blocking send would hang the loop here.
    let path = dir.path().join("full");
    let receiver = UnixDatagram::bind(&path).expect("bind");
    let filler = UnixDatagram::unbound().expect("socket");
    filler.set_nonblocking(true).expect("nonblocking");
    let mut queued = 0;
    loop {
        match filler.send_to(b"X", &path) {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the notify socket: {e}"),
        }
        assert!(queued < 1_000_000, "the notify socket's queue never filled");
    }
    let dir2 = tempdir();
    let mut shuttle = launch(dir2.path(), path.to_str().expect("utf-8"), &echo);
    round_trip(&mut connect(shuttle.service_addr("web")), b"serving with systemd's queue full");
    get(shuttle.admin_addr(), "/_info").expect(200);
    shuttle.signal(libc::SIGTERM);
    assert!(shuttle.wait_exit(DEADLINE).expect("exit").success());
    drop(receiver);

    // And an address kind shuttle does not speak is a warning, not a failure.
    let mut shuttle = launch(dir2.path(), "vsock:2:9999", &echo);
    round_trip(&mut connect(shuttle.service_addr("web")), b"no vsock");
    shuttle.wait_for_line("NOTIFY_SOCKET");
    shuttle.signal(libc::SIGTERM);
    assert!(shuttle.wait_exit(Duration::from_secs(10)).expect("exit").success());
}

#[test]
fn after_an_upgrade_the_new_process_tells_systemd_its_pid_and_the_old_one_says_nothing_of_stopping() {
    let dir = tempdir();
    let path = dir.path().join("notify");
    let receiver = UnixDatagram::bind(&path).expect("bind the notify socket");
    receiver.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let echo = echo();
    let mut shuttle = launch(dir.path(), path.to_str().expect("utf-8"), &echo);
    let ready = receive(&receiver);
    assert!(ready.contains(&format!("MAINPID={}", shuttle.pid())), "{ready:?}");
    let admin = shuttle.admin_addr();

    shuttle.signal(libc::SIGUSR2);
    let next = receive(&receiver);
    let new_pid: i32 = next
        .iter()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {next:?}"));
    // Whatever happens below, the new process goes with the test.
    let _reap = crate::support::Reap(Some(new_pid));
    assert_ne!(new_pid, shuttle.pid());
    // The old process names its successor first (it is still the main one); then the new one is ready.
    assert!(!next.contains(&"READY=1".to_string()), "{next:?}");
    let ready = receive(&receiver);
    assert!(ready.contains(&"READY=1".to_string()), "{ready:?}");
    assert!(ready.contains(&format!("MAINPID={new_pid}")), "{ready:?}");
    let status = shuttle.wait_exit(DEADLINE).expect("the old process exits after its drain");
    assert!(status.success(), "{status:?}");
    // The old one's drain sent nothing: systemd would read STOPPING=1 as the service stopping.
    receiver.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut buf = [0u8; 4096];
    assert!(receiver.recv(&mut buf).is_err(), "{:?}", String::from_utf8_lossy(&buf));
    let info = get(admin, "/_info").expect(200).json();
    assert_eq!(info["pid"], new_pid);
    round_trip(&mut connect(shuttle.service_addr("web")), b"served by the new process");
}
