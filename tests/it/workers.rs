//! `-workers N` (reference §1, design §17): N worker loops behind one admin
//! API. The whole suite also runs with `SHUTTLE_TEST_WORKERS=2`; these tests
//! are about what only several workers can get wrong.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::admin::{config_bytes, get, put, stats};
use crate::support::{
    backend, connect, echo, named, read_line, refusing, round_trip, service, try_connect, wait_until, Launch, Shuttle,
    DEADLINE,
};

/// `-workers 2` and `-debug` (one line per connection, naming its worker).
const TWO: &[&str] = &["-workers", "2", "-debug"];

/// Which worker served each finished connection of service `name`, from the debug lines.
fn served_by(shuttle: &Shuttle, name: &str) -> [usize; 2] {
    let mut by = [0; 2];
    let prefix = format!("{name}: ");
    for line in shuttle.stderr_lines() {
        if !line.contains(&prefix) || !line.contains(" bytes received") {
            continue;
        }
        if let Some(i) = line.rsplit_once(", worker ").and_then(|(_, i)| i.trim().parse::<usize>().ok()) {
            if let Some(n) = by.get_mut(i) {
                *n += 1;
            }
        }
    }
    by
}

/// The first line a client of `addr` reads: the tag of the `named` backend it reached.
fn reached(addr: SocketAddr) -> String {
    let mut client = connect(addr);
    let tag = read_line(&mut client);
    client.shutdown(Shutdown::Both).ok();
    tag
}

#[test]
fn connections_spread_over_the_workers() {
    let up = echo();
    let shuttle =
        Shuttle::start_with_config(&json!([service("web", vec![json!({"name": "b", "address": up.address()})])]), TWO);
    let web = shuttle.service_addr("web");
    for i in 0..200 {
        let mut client = connect(web);
        round_trip(&mut client, format!("client {i}").as_bytes());
    }
    let mut by = [0; 2];
    assert!(
        wait_until(DEADLINE, || {
            by = served_by(&shuttle, "web");
            by[0] + by[1] == 200
        }),
        "expected 200 connection lines naming a worker, got {by:?}"
    );
    // The kernel hashes each client's port: an even split, give or take. Fewer
    // than 40 of 200 on one side happens by chance about once in 10^18 runs.
    assert!(by.iter().all(|&n| n >= 40), "connections did not spread over both workers: {by:?}");
    let threads = std::fs::read_dir(format!("/proc/{}/task", shuttle.pid())).expect("tasks").count();
    assert!(threads >= 3, "a control loop and two workers, got {threads} threads");
}

#[test]
fn the_next_connection_after_a_change_sees_it_whichever_worker_takes_it() {
    let (one, two) = (named("one"), named("two"));
    let config = json!([service("web", vec![backend("b", one.address())])]);
    let shuttle = Shuttle::start_with_config(&config, TWO);
    let (web, admin) = (shuttle.service_addr("web"), shuttle.admin_addr());
    // Busy workers: a late change would show as a connection to the old backend.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut client = connect(web);
                let _tag = read_line(&mut client);
                let chunk = vec![b'l'; 64 * 1024];
                let mut back = vec![0; chunk.len()];
                while !stop.load(Ordering::Relaxed) {
                    if client.write_all(&chunk).is_err() || client.read_exact(&mut back).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    for round in 0..40 {
        let (tag, to) = if round % 2 == 0 { ("two", &two) } else { ("one", &one) };
        put(admin, "/web/b", &json!({"address": to.address()})).expect(200);
        // Several clients, so both workers are asked.
        for _ in 0..4 {
            assert_eq!(reached(web), tag, "round {round}: a connection after the 200 went to the old backend");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.join().expect("load thread");
    }
    let by = served_by(&shuttle, "web");
    assert!(by.iter().all(|&n| n > 0), "both workers must have been checked: {by:?}");
}

#[test]
fn a_new_service_serves_at_once_on_every_worker() {
    let up = echo();
    let shuttle = Shuttle::start(TWO);
    let admin = shuttle.admin_addr();
    for i in 0..10 {
        let name = format!("s{i}");
        put(
            admin,
            &format!("/{name}"),
            &json!({"address": "127.0.0.1:0", "backends": [{"name": "b", "address": up.address()}]}),
        )
        .expect(200);
        let addr = shuttle.service_addr(&name);
        for _ in 0..6 {
            let mut client = connect(addr);
            client.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            round_trip(&mut client, b"new service");
        }
    }
    // Both workers served the new services, not only the one that happened to be ready.
    let total = || {
        let per: Vec<[usize; 2]> = (0..10).map(|i| served_by(&shuttle, &format!("s{i}"))).collect();
        per.iter().fold([0, 0], |acc, by| [acc[0] + by[0], acc[1] + by[1]])
    };
    assert!(wait_until(DEADLINE, || total()[0] > 0 && total()[1] > 0), "served by {:?}", total());
}

#[test]
fn stats_are_exact_sums_under_concurrent_load() {
    let up = echo();
    let config = json!([service("web", vec![backend("b", up.address())])]);
    let shuttle = Shuttle::start_with_config(&config, &["-workers", "2"]);
    let (web, admin) = (shuttle.service_addr("web"), shuttle.admin_addr());
    const CLIENTS: usize = 8;
    const EACH: usize = 50;
    let message = vec![b'x'; 1000];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let message = message.clone();
            thread::spawn(move || {
                for _ in 0..EACH {
                    let mut client = connect(web);
                    round_trip(&mut client, &message);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let total = (CLIENTS * EACH) as u64;
    let bytes = total * message.len() as u64;
    assert!(
        wait_until(DEADLINE, || stats(admin, "/web")["active"] == 0),
        "connections still active: {}",
        stats(admin, "/web")
    );
    let web_stats = stats(admin, "/web");
    let b = &web_stats["backends"][0];
    assert_eq!(
        (b["connections"].as_u64(), b["sent"].as_u64(), b["received"].as_u64(), b["errors"].as_u64()),
        (Some(total), Some(bytes), Some(bytes), Some(0)),
        "{b}"
    );
    assert_eq!((web_stats["connections"].as_u64(), web_stats["sent"].as_u64()), (Some(total), Some(bytes)));
}

#[test]
fn least_connected_counts_the_connections_of_every_worker() {
    let (one, two) = (crate::support::stall(), crate::support::stall());
    let mut b2 = backend("b2", two.address());
    b2["weight"] = json!(0);
    let mut config = service("web", vec![backend("b1", one.address()), b2]);
    config["balance"] = json!("LC");
    let shuttle = Shuttle::start_with_config(&json!([config]), TWO);
    let (web, admin) = (shuttle.service_addr("web"), shuttle.admin_addr());
    let active = |i: usize| stats(admin, "/web")["backends"][i]["active"].as_u64().unwrap_or(0);
    // 20 connections held on b1 (b2 drained), over both workers.
    let mut held = Vec::new();
    for n in 1..=20 {
        held.push(connect(web));
        assert!(wait_until(DEADLINE, || active(0) == n), "connection {n} never became active on b1");
    }
    put(admin, "/web/b2", &json!({"address": two.address()})).expect(200);
    // Fewest active over the whole process: b2 has fewer than b1's 20 until
    // it has 20 too, so each of the next 20 goes to b2. A worker that knew only
    // its own connections (about 10 on b1) would send some to b1.
    for n in 1..=20 {
        held.push(connect(web));
        assert!(wait_until(DEADLINE, || active(0) + active(1) == 20 + n), "connection {n} never became active");
    }
    assert_eq!((active(0), active(1)), (20, 20), "LC must count every worker's connections");
    assert!(served_by(&shuttle, "web").iter().sum::<usize>() == 0, "nothing has finished yet");
    drop(held);
}

#[test]
fn each_backend_is_probed_once_not_once_per_worker() {
    let checks = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the check target");
    let target = listener.local_addr().expect("addr");
    {
        let checks = checks.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stream.is_ok() {
                    checks.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    let up = echo();
    let mut config =
        service("web", vec![json!({"name": "b", "address": up.address(), "check_address": target.to_string()})]);
    config["check_interval"] = json!(0.1);
    let started = Instant::now();
    let shuttle = Shuttle::start_with_config(&json!([config]), &["-workers", "4"]);
    let admin = shuttle.admin_addr();
    thread::sleep(Duration::from_millis(1500));
    let seen = checks.load(Ordering::SeqCst);
    let elapsed = started.elapsed().as_secs_f64();
    // One probe: about one check per 100 ms. Four would make about four.
    let most = (elapsed / 0.1).ceil() as usize + 2;
    assert!(seen >= 3 && seen <= most, "{seen} checks in {elapsed:.2}s: expected one probe at 100 ms");
    let passed = stats(admin, "/web/b")["check_success"].as_u64().unwrap_or(0) as usize;
    assert!(passed <= seen && passed + 2 >= seen, "check_success {passed} but the target saw {seen}");
}

#[test]
fn passive_failures_from_every_worker_add_up_to_fall() {
    // Checks pass but come only once a minute: within the test only client
    // connects, refused, speak about the backend.
    let check_target = echo();
    let dead = refusing();
    let mut config = service(
        "web",
        vec![json!({"name": "b", "address": dead.to_string(), "check_address": check_target.address()})],
    );
    config["check_interval"] = json!(60);
    config["fall"] = json!(10);
    let shuttle = Shuttle::start_with_config(&json!([config]), TWO);
    let (web, admin) = (shuttle.service_addr("web"), shuttle.admin_addr());
    // A passing check resets the run: let a first check that comes at once pass first.
    wait_until(Duration::from_secs(1), || stats(admin, "/web/b")["check_success"] != 0);
    let fail_once = || {
        let mut client = connect(web);
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        // The only backend refuses: shuttle closes the client.
        let _ = client.read(&mut [0; 1]);
    };
    for _ in 0..9 {
        fail_once();
    }
    assert!(wait_until(DEADLINE, || stats(admin, "/web/b")["errors"] == 9), "{}", stats(admin, "/web/b"));
    assert_eq!(stats(admin, "/web/b")["up"], true, "9 failures are one short of fall");
    fail_once();
    assert!(
        wait_until(DEADLINE, || stats(admin, "/web/b")["up"] == false),
        "10 failed connects over both workers must take the backend down: {}",
        stats(admin, "/web/b")
    );
    // The log line travels through shuttle's log thread and our reader: wait for it.
    let downs = || shuttle.stderr_lines().iter().filter(|l| l.contains("web/b is down")).count();
    assert!(wait_until(DEADLINE, || downs() > 0), "the transition is logged");
    // A second one, from another worker, would have been logged as soon.
    fail_once();
    assert_eq!(downs(), 1, "one transition, logged once");
}

#[test]
fn sigterm_drains_every_worker() {
    let up = echo();
    let config = json!([service("web", vec![backend("b", up.address())])]);
    let mut shuttle = Shuttle::start_with_config(&config, TWO);
    let web = shuttle.service_addr("web");
    let mut open: Vec<TcpStream> = (0..16).map(|_| connect(web)).collect();
    for (i, client) in open.iter_mut().enumerate() {
        round_trip(client, format!("before {i}").as_bytes());
    }
    shuttle.signal(libc::SIGTERM);
    assert!(wait_until(DEADLINE, || try_connect(web).is_err()), "after SIGTERM every worker stops accepting");
    // Every open connection, whichever worker has it, runs on.
    for (i, client) in open.iter_mut().enumerate() {
        round_trip(client, format!("during the drain {i}").as_bytes());
    }
    assert!(shuttle.is_running(), "open connections keep the process up");
    drop(open);
    let status = shuttle.wait_exit(DEADLINE).expect("exits once every worker has drained");
    assert!(status.success(), "{status}");
    assert!(shuttle.stderr_lines().iter().any(|l| l.contains("all connections closed; exiting")));
}

#[test]
fn an_address_another_process_holds_is_409_and_no_worker_changes() {
    use socket2::{Domain, Socket, Type};
    let up = echo();
    let config = json!([service("web", vec![backend("b", up.address())])]);
    let shuttle = Shuttle::start_with_config(&config, TWO);
    let (web, admin) = (shuttle.service_addr("web"), shuttle.admin_addr());
    let before = config_bytes(admin);
    // Held plainly, and held with SO_REUSEPORT as another shuttle's workers
    // would: joining that group would steal a share of its traffic.
    let plain = TcpListener::bind("127.0.0.1:0").expect("bind");
    let shared = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    shared.set_reuse_port(true).expect("SO_REUSEPORT");
    shared.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    shared.listen(16).expect("listen");
    let shared_addr = shared.local_addr().ok().and_then(|a| a.as_socket()).expect("addr");
    for taken in [plain.local_addr().expect("addr"), shared_addr] {
        let body = json!({"address": taken.to_string(), "backends": [{"name": "b", "address": up.address()}]});
        let answer = put(admin, "/web", &body);
        assert_eq!(answer.status, 409, "{taken}: {}", String::from_utf8_lossy(&answer.body));
        assert_eq!(config_bytes(admin), before, "a 409 changes nothing");
        // Both workers still serve the old address.
        for i in 0..20 {
            let mut client = connect(web);
            round_trip(&mut client, format!("still here {i}").as_bytes());
        }
    }
    // Nothing of ours joined the other process's group: it gets every connect.
    shared.set_nonblocking(true).expect("nonblocking");
    let _probe = TcpStream::connect(shared_addr).expect("connect to the other process");
    assert!(wait_until(DEADLINE, || shared.accept().is_ok()), "the other process's listener got its client");
}

/// Shuttle with two workers and service `web` to `up`, started with fault
/// injection `var=worker`; the directory holding its config comes along.
fn with_fault(up: &crate::support::Backend, var: &str, worker: &str) -> (Shuttle, tempfile::TempDir) {
    let config = json!([service("web", vec![backend("b", up.address())])]);
    let dir = crate::support::tempdir();
    let path = crate::support::write_config(dir.path(), &config);
    let launch = Launch { env: vec![(var.into(), worker.into())], ..Launch::default() };
    let shuttle = Shuttle::launch(&["-config", path.to_str().expect("path"), "-workers", "2", "-debug"], launch);
    (shuttle, dir)
}

#[test]
fn a_worker_that_dies_takes_the_process_down_gently_with_status_1() {
    let up = echo();
    let (mut shuttle, _dir) = with_fault(&up, "SHUTTLE_TEST_WORKER_PANIC", "1");
    let web = shuttle.service_addr("web");
    // Clients until one lands on worker 1, which then panics; those on worker 0 are served.
    let mut survivors = Vec::new();
    let died = wait_until(DEADLINE, || {
        if let Ok(mut client) = try_connect(web) {
            client.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut buf = [0; 5];
            if client.write_all(b"hello").is_ok() && client.read_exact(&mut buf).is_ok() {
                survivors.push(client);
            }
        }
        shuttle.stderr_lines().iter().any(|l| l.contains("worker 1 stopped"))
    });
    assert!(died, "worker 1 never failed: {:?}", shuttle.stderr_lines());
    let line = shuttle.stderr_lines().into_iter().find(|l| l.contains("worker 1 stopped")).unwrap_or_default();
    assert!(line.contains("panicked") && line.contains("shutting down"), "{line}");
    // The other worker drains: its open connections still work, then the process exits 1.
    for client in &mut survivors {
        round_trip(client, b"during the drain");
    }
    drop(survivors);
    let status = shuttle.wait_exit(DEADLINE).expect("the process exits after a worker died");
    assert_eq!(status.code(), Some(1), "{status}");
}

/// The names and allowed CPUs of `pid`'s worker threads, by worker number.
fn worker_threads(pid: i32) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        if comm.strip_prefix("shuttle-w").and_then(|i| i.parse::<usize>().ok()).is_none() {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string();
        found.push((comm, cpus));
    }
    found.sort_by_key(|(name, _)| name.trim_start_matches("shuttle-w").parse::<usize>().unwrap_or(usize::MAX));
    found
}

/// The CPUs this test process may run on, as the kernel lists them.
fn allowed_cpus() -> String {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string()
}

#[test]
fn auto_runs_one_worker_per_allowed_cpu_and_pin_gives_each_its_own() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shuttle = Shuttle::start(&["-workers", "auto"]);
    let threads = worker_threads(shuttle.pid());
    if cpus > 1 {
        assert_eq!(threads.len(), cpus, "auto: one worker per allowed CPU: {threads:?}");
        assert!(threads.iter().all(|(_, allowed)| *allowed == allowed_cpus()), "unpinned: {threads:?}");
    } else {
        assert!(threads.is_empty(), "one CPU: one loop does everything: {threads:?}");
    }
    drop(shuttle);

    let shuttle = Shuttle::start(&["-workers", "3", "-pin"]);
    let threads = worker_threads(shuttle.pid());
    assert_eq!(threads.len(), 3, "{threads:?}");
    for (name, allowed) in &threads {
        assert!(allowed.parse::<usize>().is_ok(), "{name} is pinned to one CPU, got {allowed:?}");
    }
    if cpus > 1 {
        assert_ne!(threads[0].1, threads[1].1, "workers 0 and 1 share a CPU: {threads:?}");
    }
    let web_less = get(shuttle.admin_addr(), "/").expect(200).json();
    assert_eq!(web_less, json!([]));
}

#[test]
fn bad_worker_counts_are_refused_with_the_flag_named() {
    for bad in ["0", "257", "many"] {
        let out = crate::support::run_to_exit(&["-workers", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        assert!(
            out.stderr.starts_with("shuttle: -workers: expected a number of workers from 1 to 256, or auto"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn round_robin_is_one_sequence_over_the_workers() {
    let backends: Vec<_> = ["b0", "b1", "b2"].iter().map(|tag| named(tag)).collect();
    let list = backends
        .iter()
        .zip([1, 2, 3])
        .enumerate()
        .map(|(i, (b, weight))| json!({"name": format!("b{i}"), "address": b.address(), "weight": weight}))
        .collect();
    let shuttle = Shuttle::start_with_config(&json!([service("web", list)]), TWO);
    let web = shuttle.service_addr("web");
    // One client after another, each landing on whichever worker the kernel
    // picks: the weights hold in a row over the process, as with one loop.
    let got: Vec<String> = (0..60).map(|_| reached(web)).collect();
    let round = ["b0", "b1", "b1", "b2", "b2", "b2"];
    let expected: Vec<String> = round.iter().cycle().take(60).map(|s| s.to_string()).collect();
    assert_eq!(got, expected);
    assert!(
        wait_until(DEADLINE, || served_by(&shuttle, "web").iter().all(|&n| n > 0)),
        "both workers must have taken some: {:?}",
        served_by(&shuttle, "web")
    );
}

#[test]
fn a_stuck_worker_is_found_by_the_watchdog_and_the_process_exits_1() {
    let up = echo();
    let (mut shuttle, _dir) = with_fault(&up, "SHUTTLE_TEST_WORKER_HANG", "0");
    let web = shuttle.service_addr("web");
    // Until a client lands on worker 0, which then stops turning.
    let started = Instant::now();
    let mut clients = Vec::new();
    while started.elapsed() < Duration::from_secs(2) {
        if let Ok(client) = try_connect(web) {
            clients.push(client);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let status = shuttle.wait_exit(Duration::from_secs(15)).expect("the watchdog ends a process with a stuck worker");
    assert_eq!(status.code(), Some(1), "{status}");
    let lines = shuttle.stderr_lines();
    assert!(lines.iter().any(|l| l.contains("worker 0 has not answered") && l.contains("stuck")), "{lines:?}");
}

#[test]
fn a_stopped_and_continued_process_is_not_taken_for_stuck() {
    let up = echo();
    let config = json!([service("web", vec![backend("b", up.address())])]);
    let shuttle = Shuttle::start_with_config(&config, &["-workers", "2"]);
    let web = shuttle.service_addr("web");
    // Longer than the watchdog's limit: every thread stood still, none was stuck.
    shuttle.signal(libc::SIGSTOP);
    thread::sleep(Duration::from_secs(7));
    shuttle.signal(libc::SIGCONT);
    thread::sleep(Duration::from_secs(3));
    assert!(shuttle.is_running(), "{:?}", shuttle.stderr_lines());
    for i in 0..10 {
        let mut client = connect(web);
        round_trip(&mut client, format!("after SIGCONT {i}").as_bytes());
    }
    assert!(!shuttle.stderr_lines().iter().any(|l| l.contains("stuck")));
}
