//! Work that once ran on the loop and stalled every connection: name
//! resolution and the state file's fsync now run on helper threads, and a
//! listener that goes away serves its queue instead of resetting it.
//!
//! "Not stalled" is shown with a generous margin: a proxied round trip that
//! takes longer than half the injected delay is a stall, whatever the load.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::admin::{call, get, put};
use crate::support::dns::{Answer, StubDns};
use crate::support::{connect, echo, one_backend, round_trip, tempdir, wait_until, write_config, Shuttle, DEADLINE};

/// Round trips through the proxy on one connection, back to back, while a
/// test does something that must not stall them; reports the slowest.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Duration, usize)>>,
}

impl Prober {
    fn start(addr: SocketAddr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut client = connect(addr);
            let (mut slowest, mut count) = (Duration::ZERO, 0);
            while !flag.load(Ordering::SeqCst) {
                let started = Instant::now();
                round_trip(&mut client, b"are you there?");
                slowest = slowest.max(started.elapsed());
                count += 1;
                thread::sleep(Duration::from_millis(5));
            }
            (slowest, count)
        });
        Prober { stop, thread: Some(thread) }
    }

    /// The slowest round trip and how many there were.
    fn finish(mut self) -> (Duration, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().expect("prober thread").join().expect("prober panicked")
    }
}

fn body(backend: &str) -> Value {
    json!({ "address": "127.0.0.1:0", "backends": [{ "name": "b", "address": backend }] })
}

#[test]
fn a_slow_resolver_never_stalls_proxying_and_each_name_is_looked_up_once() {
    let echo = echo();
    let dns = StubDns::start(&[
        ("slow.shuttle.test", Answer::After(Duration::from_millis(1500), Ipv4Addr::LOCALHOST)),
        ("dead.shuttle.test", Answer::Never),
    ]);
    let dir = tempdir();
    let config = write_config(dir.path(), &one_backend(echo.address()));
    let shuttle =
        Shuttle::start_with_resolv_conf(&["-config", config.to_str().expect("path")], &dns.resolv_conf(dir.path()));
    let (admin, web) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    let prober = Prober::start(web);

    // A name the resolver answers after 1.5 s: the change waits for it, proxying does not.
    let started = Instant::now();
    let answer = put(admin, "/api", &body(&format!("slow.shuttle.test:{}", echo.addr().port())));
    let took = started.elapsed();
    answer.expect(200);
    assert!(took >= Duration::from_millis(1400), "the PUT waited for the resolver ({took:?})");
    assert_eq!(dns.a_queries("slow.shuttle.test"), 1, "one PUT looks its name up once");
    let mut client = connect(shuttle.service_addr("api"));
    round_trip(&mut client, b"via a slow name");

    // A name that never answers: 400 naming it once the deadline passes, and reads are served meanwhile.
    let dead = thread::spawn(move || {
        let started = Instant::now();
        let answer = put(admin, "/api2", &body("dead.shuttle.test:80"));
        (answer, started.elapsed())
    });
    assert!(wait_until(DEADLINE, || dns.a_queries("dead.shuttle.test") > 0), "the lookup was sent");
    let started = Instant::now();
    get(admin, "/_config").expect(200);
    assert!(started.elapsed() < Duration::from_secs(1), "reads wait for no lookup ({:?})", started.elapsed());
    let (answer, took) = dead.join().expect("PUT thread");
    let answer = answer.expect(400);
    let error = answer.error();
    assert!(error.contains("dead.shuttle.test") && error.contains("did not resolve within 5 s"), "{error}");
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(9),
        "the deadline is about 5 s: {took:?}"
    );
    assert!(get(admin, "/api2").status == 404, "nothing was created");

    let (slowest, count) = prober.finish();
    assert!(count > 10, "the prober ran ({count} round trips)");
    assert!(slowest < Duration::from_millis(700), "a round trip waited for the resolver: {slowest:?}");
}

#[test]
fn a_name_that_never_answers_fails_start_up_after_the_deadline() {
    let dns = StubDns::start(&[("dead.shuttle.test", Answer::Never)]);
    let dir = tempdir();
    let config = write_config(dir.path(), &one_backend("dead.shuttle.test:80"));
    let started = Instant::now();
    let (status, lines) = Shuttle::start_expect_failure_with_resolv_conf(
        &["-config", config.to_str().expect("path")],
        &dns.resolv_conf(dir.path()),
    );
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    let errors: Vec<&String> = lines.iter().filter(|l| l.starts_with("shuttle: ")).collect();
    assert_eq!(errors.len(), 1, "{lines:#?}");
    assert!(errors[0].contains("dead.shuttle.test") && errors[0].contains("within 5 s"), "{}", errors[0]);
    assert!(started.elapsed() < Duration::from_secs(9));
}

/// strace attached to a process, delaying its fsync calls; detached on drop.
struct SlowFsync(Child);

impl SlowFsync {
    fn attach(pid: i32, delay: Duration) -> SlowFsync {
        let inject = format!("inject=fsync:delay_enter={}", delay.as_micros());
        let child = Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync", "-e", &inject, "-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run strace (apt-get install strace; .ci/run installs it)");
        let tracer = child.id().to_string();
        // Attached once every thread of shuttle names strace as its tracer.
        let attached = wait_until(DEADLINE, || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
            let mut all = true;
            for task in tasks {
                let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                all &= status.lines().any(|l| l.starts_with("TracerPid:") && l.ends_with(&tracer));
            }
            all
        });
        assert!(attached, "strace did not attach to {pid}");
        SlowFsync(child)
    }
}

impl Drop for SlowFsync {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_slow_fsync_never_stalls_proxying() {
    let echo = echo();
    let dir = tempdir();
    let config = write_config(dir.path(), &one_backend(echo.address()));
    let state = dir.path().join("state.json");
    let shuttle = Shuttle::start(&["-config", config.to_str().expect("path"), "-state", state.to_str().expect("path")]);
    let (admin, web) = (shuttle.admin_addr(), shuttle.service_addr("web"));
    let _slow = SlowFsync::attach(shuttle.pid(), Duration::from_secs(2));
    let prober = Prober::start(web);

    let put_thread = thread::spawn(move || {
        let started = Instant::now();
        let answer = put(admin, "/api", &body("127.0.0.1:9"));
        (answer, started.elapsed())
    });
    // While the save waits on the disk, reads are answered at once.
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let config_now = get(admin, "/_config").expect(200).json();
    assert!(started.elapsed() < Duration::from_secs(1), "a read waited for the disk ({:?})", started.elapsed());
    assert!(config_now.as_array().is_some_and(|a| a.len() == 1), "the change is not applied before it is saved");
    let (answer, took) = put_thread.join().expect("PUT thread");
    answer.expect(200);
    assert!(took >= Duration::from_millis(1900), "the PUT waited for its fsync ({took:?}): the injection works");
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).expect("state file")).expect("state JSON");
    assert_eq!(saved.as_array().map(Vec::len), Some(2), "saved before it was answered");

    let (slowest, count) = prober.finish();
    assert!(count > 10, "the prober ran ({count} round trips)");
    assert!(slowest < Duration::from_secs(1), "a round trip waited for the fsync: {slowest:?}");
}

/// Clients hammering a service whose address the test keeps moving: a
/// client whose connect succeeded must get its echo, never a reset.
struct Hammer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Hammer {
    fn start(target: Arc<Mutex<SocketAddr>>, clients: usize) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, served, failures, target) = (stop.clone(), served.clone(), failures.clone(), target.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let addr = *target.lock().expect("target");
                        let Ok(mut client) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                            continue; // refused or no answer: the address is not served now, fine
                        };
                        client.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
                        client.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
                        let mut reply = [0u8; 4];
                        let result = client.write_all(b"ping").and_then(|()| client.read_exact(&mut reply));
                        match result {
                            Ok(()) if &reply == b"ping" => {
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(()) => failures.lock().expect("failures").push(format!("{addr}: wrong echo {reply:?}")),
                            Err(e) => failures.lock().expect("failures").push(format!("{addr}: {e}")),
                        }
                    }
                })
            })
            .collect();
        Hammer { stop, served, failures, threads }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().expect("client thread");
        }
        let failures = self.failures.lock().expect("failures").clone();
        (self.served.load(Ordering::SeqCst), failures)
    }
}

#[test]
fn moving_or_deleting_a_service_under_load_resets_no_accepted_client() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&json!([]), &[]);
    let admin = shuttle.admin_addr();
    // Every move goes to another loopback address on one port, so an address
    // is never reused while its old listener may still be closing.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let at = |n: u8| SocketAddr::from(([127, 0, 1, n], port));
    let service = |addr: SocketAddr| json!({ "address": addr.to_string(), "backends": [{ "name": "b", "address": echo.address() }] });
    put(admin, "/web", &service(at(1))).expect(200);
    let target = Arc::new(Mutex::new(at(1)));
    let hammer = Hammer::start(target.clone(), 4);
    let moves = 60u8;
    for n in 2..=moves + 1 {
        // Let some clients in at the current address first.
        let before = hammer.served.load(Ordering::SeqCst);
        assert!(wait_until(DEADLINE, || hammer.served.load(Ordering::SeqCst) >= before + 5), "clients got through");
        put(admin, "/web", &service(at(n))).expect(200);
        *target.lock().expect("target") = at(n);
    }
    let before = hammer.served.load(Ordering::SeqCst);
    assert!(wait_until(DEADLINE, || hammer.served.load(Ordering::SeqCst) >= before + 5));
    call(admin, "DELETE", "/web", None).expect(200);
    thread::sleep(Duration::from_millis(300)); // clients keep trying the deleted address meanwhile
    let (served, failures) = hammer.finish();
    assert!(served > 300, "the load ran ({served} clients served)");
    assert!(
        failures.is_empty(),
        "{} accepted clients were cut, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn sigterm_serves_the_clients_already_queued() {
    let echo = echo();
    let shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &["-grace", "5"]);
    let web = shuttle.service_addr("web");
    let target = Arc::new(Mutex::new(web));
    let hammer = Hammer::start(target, 4);
    assert!(wait_until(DEADLINE, || hammer.served.load(Ordering::SeqCst) >= 50));
    shuttle.signal(libc::SIGTERM);
    let mut shuttle = shuttle;
    let status = shuttle.wait_exit(DEADLINE).expect("shuttle exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let (_, failures) = hammer.finish();
    assert!(
        failures.is_empty(),
        "{} accepted clients were cut, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
