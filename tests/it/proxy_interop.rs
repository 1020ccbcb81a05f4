//! The PROXY protocol against real implementations: shuttle's `send_proxy`
//! headers read by nginx's `proxy_protocol` listener, and HAProxy's
//! `send-proxy` / `send-proxy-v2` headers read by shuttle's `accept_proxy`.
//! Each test says that it skipped when the program is not installed
//! (`.ci/run` installs both).

use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::proxy_protocol::recorder;
use crate::support::{connect, read_line, read_to_eof, service, tempdir, try_connect, wait_until, Shuttle, DEADLINE};

/// The program's path, or `None` after saying the test is skipped.
fn program(name: &str, package: &str) -> Option<PathBuf> {
    let found = ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists());
    if found.is_none() {
        eprintln!("SKIPPED: {name} is not installed (apt-get install {package}); this test checked nothing");
    }
    found
}

/// A port free a moment ago, for a program that can't report the one it bound.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("address").port()
}

/// A child process killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &Path, args: &[&str]) -> Running {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
    Running(child)
}

fn wait_listening(port: u16, what: &str) {
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    assert!(wait_until(DEADLINE, || try_connect(addr).is_ok()), "{what} never listened on {port}");
}

#[test]
fn nginx_reads_the_client_address_from_shuttles_v1_and_v2_headers() {
    let Some(nginx) = program("nginx", "nginx-core libnginx-mod-stream") else { return };
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    let dir = tempdir();
    let port = free_port();
    let load = if module.exists() { format!("load_module {};", module.display()) } else { String::new() };
    let conf = format!(
        "{load}\ndaemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log info;\n\
         events {{ worker_connections 64; }}\n\
         stream {{ server {{ listen 127.0.0.1:{port} proxy_protocol; \
         return \"$proxy_protocol_addr $proxy_protocol_port $remote_addr\\n\"; }} }}\n",
        dir = dir.path().display()
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let dir_arg = dir.path().to_str().expect("path").to_string();
    let _nginx = spawn(
        &nginx,
        &["-p", &dir_arg, "-e", &format!("{dir_arg}/error.log"), "-c", conf_path.to_str().expect("path")],
    );
    wait_listening(port, "nginx");
    for version in ["v1", "v2"] {
        let web =
            service("web", vec![json!({"name": "n", "address": format!("127.0.0.1:{port}"), "send_proxy": version})]);
        let shuttle = Shuttle::start_with_config(&json!([web]), &[]);
        let mut client = connect(shuttle.service_addr("web"));
        let me = client.local_addr().expect("client address");
        let line = read_line(&mut client);
        assert_eq!(line, format!("{} {} 127.0.0.1", me.ip(), me.port()), "nginx saw the client via {version}");
    }
}

fn haproxy_sends(option: &str) {
    let Some(haproxy) = program("haproxy", "haproxy") else { return };
    let (b, rx) = recorder();
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let mut web = service("web", vec![json!({"name": "b0", "address": b.address(), "send_proxy": "v1"})]);
    web["accept_proxy"] = json!(true);
    let shuttle = Shuttle::start_with_config(
        &json!([web]),
        &["-access-log", log.to_str().expect("path"), "-access-log-format", "json"],
    );
    let port = free_port();
    let conf = format!(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
         listen front\n  bind 127.0.0.1:{port}\n  server shuttle {} {option}\n",
        shuttle.service_addr("web")
    );
    let conf_path = dir.path().join("haproxy.cfg");
    std::fs::write(&conf_path, conf).expect("write haproxy.cfg");
    let _haproxy = spawn(&haproxy, &["-db", "-f", conf_path.to_str().expect("path")]);
    wait_listening(port, "haproxy");

    let mut client = connect(format!("127.0.0.1:{port}").parse().expect("address"));
    let me = client.local_addr().expect("client address");
    client.write_all(b"through haproxy").expect("send");
    client.shutdown(Shutdown::Write).expect("half-close");
    let _ = read_to_eof(&mut client);
    // The readiness probe above went through too: find this client's connection.
    let mut seen = Vec::new();
    let got = loop {
        let got = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("no connection carried the bytes: {seen:?}"));
        if got.ends_with(b"through haproxy") {
            break got;
        }
        seen.push(String::from_utf8_lossy(&got).into_owned());
    };
    let want = format!("PROXY TCP4 {} 127.0.0.1 {} {port}\r\nthrough haproxy", me.ip(), me.port());
    assert_eq!(String::from_utf8_lossy(&got), want, "shuttle relayed HAProxy's {option} addresses");
    let client_in_log = format!("\"client\":\"{me}\"");
    assert!(
        wait_until(DEADLINE, || std::fs::read_to_string(&log).unwrap_or_default().contains(&client_in_log)),
        "the access log names the original client {me}"
    );
}

#[test]
fn haproxy_send_proxy_reaches_shuttle_with_the_original_client() {
    haproxy_sends("send-proxy");
}

#[test]
fn haproxy_send_proxy_v2_with_a_tlv_reaches_shuttle_with_the_original_client() {
    haproxy_sends("send-proxy-v2 proxy-v2-options crc32c");
}
