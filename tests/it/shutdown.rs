//! SIGTERM / SIGINT (SPEC §1): listeners close at once, open pairs may finish
//! within the grace period, then the process exits 0.

use std::net::Shutdown;
use std::time::{Duration, Instant};

use crate::support::{
    connect, echo, one_backend, read_to_eof, refused_within, round_trip, wait_closed, wait_until, Shuttle, DEADLINE,
};

#[test]
fn sigterm_refuses_new_connections_and_lets_an_open_pair_finish() {
    let echo = echo();
    let mut shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &["-grace", "30"]);
    let addr = shuttle.service_addr("web");
    let mut client = connect(addr);
    round_trip(&mut client, b"before");

    shuttle.signal(libc::SIGTERM);
    let signalled = Instant::now();
    assert!(refused_within(addr, Duration::from_secs(5)), "new connects still accepted 5 s after SIGTERM");

    round_trip(&mut client, b"after SIGTERM the open pair still relays");
    assert_eq!(shuttle.wait_exit(Duration::ZERO), None, "exited while a pair was open, well before the grace");

    client.shutdown(Shutdown::Write).expect("shut write");
    assert_eq!(read_to_eof(&mut client), b"");
    let status = shuttle.wait_exit(DEADLINE).expect("exit once the last pair closed");
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(20), "exit took {took:?}, grace was 30 s: it waited for the grace");
}

#[test]
fn sigterm_grace_period_ends_a_pair_that_stays_open() {
    let echo = echo();
    let mut shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &["--grace", "1"]);
    let mut client = connect(shuttle.service_addr("web"));
    round_trip(&mut client, b"hold me open");

    shuttle.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = shuttle.wait_exit(Duration::from_secs(6)).expect("exit within the 1 s grace (and a margin)");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status after the grace period: {status:?}");
    assert!(took >= Duration::from_millis(800), "exited after {took:?} with a pair open and 1 s grace");
    let closed = wait_closed(&mut client, Duration::from_secs(5));
    assert!(closed.is_ok(), "the held client after shuttle exited: {closed:?}");
}

#[test]
fn sigint_with_no_open_pair_exits_promptly() {
    let echo = echo();
    let mut shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &[]);
    round_trip(&mut connect(shuttle.service_addr("web")), b"up and running");
    shuttle.signal(libc::SIGINT);
    let status = shuttle.wait_exit(Duration::from_secs(5)).expect("exit promptly on SIGINT");
    assert!(status.success(), "exit status after SIGINT: {status:?}");
}

/// Opens `n` pairs through `web`, sends `first`, waits for the drain to begin,
/// sends `second`: shuttle must exit 0 at once (grace is 30 s) and say how many it cut.
fn second_signal_cuts_the_open_connections(args: &[&str], n: usize, first: i32, second: i32) {
    let echo = echo();
    let mut all = vec!["-grace", "30"];
    all.extend_from_slice(args);
    let mut shuttle = Shuttle::start_with_config(&one_backend(echo.address()), &all);
    let addr = shuttle.service_addr("web");
    let mut clients: Vec<_> = (0..n).map(|_| connect(addr)).collect();
    for client in &mut clients {
        round_trip(client, b"open");
    }
    shuttle.signal(first);
    shuttle.wait_for_line("shutting down");
    assert_eq!(shuttle.wait_exit(Duration::from_millis(200)), None, "exited with pairs open on the first signal");
    shuttle.signal(second);
    let signalled = Instant::now();
    let status = shuttle.wait_exit(Duration::from_secs(3)).expect("exit within 3 s of the second signal");
    assert!(status.success(), "exit status after a second signal: {status:?}");
    let took = signalled.elapsed();
    let s = if n == 1 { "" } else { "s" };
    // The process is gone; its last lines may still be on their way through the pipe.
    let expected = format!("second signal: closing {n} open connection{s} now");
    assert!(
        wait_until(DEADLINE, || shuttle.stderr_lines().iter().any(|l| l.contains(&expected))),
        "no {expected:?} in the log: {:?}",
        shuttle.stderr_lines()
    );
    assert!(!shuttle.stderr_lines().iter().any(|l| l.contains("grace period over")), "it waited for the grace");
    for client in &mut clients {
        let closed = wait_closed(client, Duration::from_secs(5));
        assert!(closed.is_ok(), "a client after shuttle exited: {closed:?}");
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn a_second_sigterm_during_the_grace_closes_every_connection_at_once() {
    second_signal_cuts_the_open_connections(&[], 2, libc::SIGTERM, libc::SIGTERM);
}

#[test]
fn a_sigint_after_sigterm_stops_every_worker_at_once() {
    // Four connections over two workers: the count is the process's.
    second_signal_cuts_the_open_connections(&["-workers", "2"], 4, libc::SIGTERM, libc::SIGINT);
}
