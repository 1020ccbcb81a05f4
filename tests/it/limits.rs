//! Running out of file descriptors (issue 2, DESIGN pitfall 5): accepting must
//! pause without spinning the CPU or crashing, log once, and resume when
//! connections close.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::{connect, echo, one_backend, round_trip, test_workers, try_connect, wait_until, Shuttle};

/// CPU time (user + system) of process `pid` in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let after_name = stat.rsplit_once(')').expect("stat has a name").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; after the name, 12 and 13 (0-based 11, 12).
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[test]
fn fd_exhaustion_pauses_accepts_without_spinning_and_recovers() {
    let backend = echo();
    let config = one_backend(backend.address());
    // Each worker loop beyond the first holds a few descriptors of its own.
    let shuttle = Shuttle::start_with_fd_limit(&config, &[], 48 + 24 * (test_workers() as u64 - 1));
    let addr = shuttle.service_addr("web");

    // Each pair takes two descriptors, so well before 60 clients shuttle runs
    // out; the rest wait in its accept queue.
    let mut clients: Vec<TcpStream> =
        (0..60).map(|_| try_connect(addr).expect("the kernel queues the connect")).collect();
    assert!(
        wait_until(Duration::from_secs(10), || shuttle.stderr_lines().iter().any(|l| l.contains("pausing accepts"))),
        "shuttle never reported running out of descriptors"
    );
    let served = clients.iter_mut().take(5).all(|c| {
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        c.write_all(b"x").is_ok() && c.read_exact(&mut [0; 1]).is_ok()
    });
    assert!(served, "the first clients are proxied normally");

    // Out of descriptors with clients still queued: the loop must sleep, not spin.
    let before = cpu_ticks(shuttle.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(shuttle.pid()) - before;
    assert!(used <= 30, "shuttle burnt {used} ticks of CPU in one second while out of descriptors");
    let pauses = shuttle.stderr_lines().iter().filter(|l| l.contains("pausing accepts")).count();
    // Each worker loop has its own share of the descriptors, and says so once.
    assert!(
        (1..=test_workers()).contains(&pauses),
        "one exhaustion episode is logged once per loop, got {pauses} lines"
    );

    // Closing the others frees descriptors: the last queued clients get served.
    let mut last: Vec<TcpStream> = clients.split_off(clients.len() - 5);
    drop(clients);
    for client in &mut last {
        round_trip(client, b"late but served");
    }
    drop(last);
    let mut fresh = connect(addr);
    round_trip(&mut fresh, b"after recovery");
    assert!(shuttle.stderr_lines().iter().any(|l| l.contains("accepting again")));
}
