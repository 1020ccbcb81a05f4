//! The processes an upgrade leaves behind it, which are not the `Shuttle`'s
//! child: each new shuttle is started by the old one, so no PDEATHSIG ties it
//! to the test, and it holds the test's stderr pipe open (the `Shuttle`'s
//! reader would wait for it forever). [`Successors`] knows them by pid and
//! kills and reaps them when dropped.
//!
//! The test process makes itself a child subreaper, so an old shuttle whose
//! parent has exited is reparented to the test, which can then read its exit
//! status instead of only seeing it disappear.

use std::sync::Once;
use std::time::{Duration, Instant};

use crate::support::{wait_until, Shuttle};

/// Makes the test process the reaper of its orphaned descendants (once).
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with an integer option changes only this process's attribute.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
    });
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, ...
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub(crate) fn alive(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| !matches!(f.first().map(String::as_str), Some("Z" | "X")))
}

/// The parent of `pid`, while it exists.
pub(crate) fn parent(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The command line of `pid`, one string per argument.
pub(crate) fn cmdline(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// The processes whose parent is `pid` (zombies too).
pub(crate) fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| parent(p) == Some(pid))
        .collect()
}

/// Sends `signal` to `pid`.
#[track_caller]
pub(crate) fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) with a pid this test learned from the process itself.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Reaped by the test: its exit code, or `None` when a signal ended it.
    Reaped(Option<i32>),
    /// Gone, or a zombie of another parent: the status is not ours to read.
    Gone,
}

/// The new shuttles of one test, killed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct Successors {
    /// The `Shuttle`'s own child, which the `Shuttle` reaps.
    first: i32,
    /// Every later process, in the order they were learned.
    pids: Vec<i32>,
    /// Those already reaped here (their pids may be reused: never signal them).
    reaped: Vec<i32>,
}

impl Successors {
    /// Tracks the successors of `shuttle`'s process.
    pub fn of(shuttle: &Shuttle) -> Successors {
        become_subreaper();
        Successors { first: shuttle.pid(), pids: Vec::new(), reaped: Vec::new() }
    }

    /// Adds `pid` (a new shuttle) to those killed on drop.
    pub fn add(&mut self, pid: i32) {
        if pid != self.first && !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
    }

    /// Adds the children of `pid` that run shuttle with `-upgrade-fd` and returns them.
    pub fn add_children_of(&mut self, pid: i32) -> Vec<i32> {
        let found: Vec<i32> =
            children(pid).into_iter().filter(|&c| cmdline(c).iter().any(|a| a.contains("upgrade-fd"))).collect();
        for &c in &found {
            self.add(c);
        }
        found
    }

    /// Waits up to `within` for `pid` (not the `Shuttle`'s child) to end,
    /// reaping it when it is the test's child.
    pub fn wait_ended(&mut self, pid: i32, within: Duration) -> Option<Ended> {
        assert_ne!(pid, self.first, "the Shuttle reaps its own child: use Shuttle::wait_exit");
        let mut ended = None;
        wait_until(within, || {
            ended = self.try_reap(pid);
            ended.is_some()
        });
        ended
    }

    fn try_reap(&mut self, pid: i32) -> Option<Ended> {
        if self.reaped.contains(&pid) {
            return Some(Ended::Gone);
        }
        let mut status = 0;
        // SAFETY: waitpid on one pid with WNOHANG; status is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            self.reaped.push(pid);
            let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            return Some(Ended::Reaped(code));
        }
        // Not reaped yet (rc 0) or not ours (ECHILD: its parent still lives).
        (!alive(pid)).then_some(Ended::Gone)
    }
}

impl Drop for Successors {
    fn drop(&mut self) {
        // Children not learned yet (a new process mid-hand-over) are found by parent.
        let mut i = 0;
        let mut roots = vec![self.first];
        roots.extend(self.pids.iter().copied());
        while i < roots.len() {
            for c in children(roots[i]) {
                if cmdline(c).iter().any(|a| a.contains("upgrade-fd")) && !roots.contains(&c) {
                    roots.push(c);
                    self.add(c);
                }
            }
            i += 1;
        }
        for &pid in &self.pids {
            // Only a live process that is still a new shuttle: never a reused pid.
            if !self.reaped.contains(&pid) && alive(pid) && cmdline(pid).iter().any(|a| a.contains("upgrade-fd")) {
                // SAFETY: kill(2) on a shuttle this test started through an upgrade.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in self.pids.clone() {
            while self.try_reap(pid).is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
