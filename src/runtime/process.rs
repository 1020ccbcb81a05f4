//! Signalling another process: the one a binary upgrade started, when this
//! process began shutting down before it heard that the other one serves.

use std::io;

/// Sends SIGTERM to `pid`: it drains and exits as after any SIGTERM.
#[allow(unsafe_code)]
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "no such pid"))?;
    if pid <= 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a process of ours"));
    }
    // SAFETY: kill takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
