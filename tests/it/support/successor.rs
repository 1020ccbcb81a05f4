//! The processes a shuttle's binary upgrade starts (reference §3.7): they are
//! no children of the test's, so their pids come from the old process's log,
//! and a guard kills them, else one would outlive the test and hold its
//! stderr pipe open.

use super::Shuttle;

/// Kills the process it names when dropped (none while `None`).
pub struct Reap(pub Option<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill takes two integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The pid right after `marker` in `line`.
pub fn pid_after(line: &str, marker: &str) -> Option<i32> {
    let rest = line.split(marker).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The new process's pid, once the old one logs that it serves.
#[track_caller]
pub fn served_by(shuttle: &Shuttle) -> i32 {
    let line = shuttle.wait_for_line(" is serving; ");
    pid_after(&line, "upgrade: process ").unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// The new process's pid, once the old one logs that it started it.
#[track_caller]
pub fn started_by(shuttle: &Shuttle) -> i32 {
    let line = shuttle.wait_for_line("upgrade: starting ");
    pid_after(&line, "(process ").unwrap_or_else(|| panic!("no pid in {line:?}"))
}
