//! Dropping root once start-up has bound what it needs (`-user`, reference
//! §1): supplementary groups, gid and uid change, and of root's capabilities
//! only `CAP_NET_BIND_SERVICE` stays, so that a service added later through
//! the API can still listen on a port below 1024. Every call is a libc
//! wrapper here, and nothing else in shuttle changes credentials.
//!
//! Linux keeps credentials per thread. glibc makes `setgroups`, `setresgid`
//! and `setresuid` apply to every thread of the process (it has each thread
//! make the same call), so every thread ends up the new user. Capabilities
//! have no such broadcast: `capset` changes the calling thread only. The
//! thread that switches is the control loop's, the only one that binds
//! listeners; it keeps the capability (`PR_SET_KEEPCAPS` carries its
//! permitted set across the uid change, `capset` then narrows it). Threads
//! already running lose every capability in the uid change, as the kernel
//! does for a thread without `PR_SET_KEEPCAPS`; threads started later
//! inherit the control loop's one capability.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::runtime::accounts::Identity;

/// The capability's number in `<linux/capability.h>`.
const CAP_NET_BIND_SERVICE: u32 = 10;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, given as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// What the process may still do that root could, after the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Listen on ports below 1024 (`CAP_NET_BIND_SERVICE`, also ambient).
    BindBelow1024,
    /// Nothing: shuttle started without `CAP_NET_BIND_SERVICE` to keep.
    Nothing,
}

/// Why the switch failed; the process must not go on.
#[derive(Debug)]
pub enum SwitchError {
    /// A call failed.
    Call {
        /// The call, as the man pages name it.
        call: &'static str,
        /// What the OS said.
        source: io::Error,
    },
    /// The calls succeeded but the process is not (only) the new user.
    NotDropped(String),
}

impl std::fmt::Display for SwitchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwitchError::Call { call, source } if source.raw_os_error() == Some(libc::EPERM) => {
                write!(f, "{call}: {source}; switching user needs shuttle to start as root")
            }
            SwitchError::Call { call, source } => write!(f, "{call}: {source}"),
            SwitchError::NotDropped(why) => write!(f, "the switch did not take: {why}"),
        }
    }
}

impl std::error::Error for SwitchError {}

/// Becomes `id` for good, keeping only `CAP_NET_BIND_SERVICE` if the
/// process has it. Call it on the control loop's thread.
pub fn switch(id: &Identity) -> Result<Kept, SwitchError> {
    set_keep_caps(true)?;
    set_groups(&id.groups)?;
    set_gid(id.gid)?;
    set_uid(id.uid)?;
    let bit = 1 << CAP_NET_BIND_SERVICE;
    let kept = match set_caps(bit) {
        Ok(()) => {
            raise_ambient(CAP_NET_BIND_SERVICE)?;
            Kept::BindBelow1024
        }
        // Not in the permitted set to begin with (a narrowed bounding set, say): keep nothing.
        Err(SwitchError::Call { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
            set_caps(0)?;
            Kept::Nothing
        }
        Err(e) => return Err(e),
    };
    set_keep_caps(false)?;
    verify(id)?;
    Ok(kept)
}

/// Drops every capability of the calling thread, unless the process runs as
/// root (with no `-user`, root's threads stay as they are). Worker and helper
/// threads call it as they start: only the control thread binds, and a
/// thread started after the switch, or in a process that an upgrade started
/// as the user, would otherwise inherit its capability (reference §1.1).
pub fn confine_thread() {
    if crate::runtime::files::effective_uid() == 0 {
        return;
    }
    // Lowering one's own sets cannot be refused; and it is not logged, as the
    // log writer's own thread calls this too.
    let _ = set_caps(0).and_then(|()| clear_ambient());
}

#[allow(unsafe_code)]
fn clear_ambient() -> Result<(), SwitchError> {
    let clear = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
    // SAFETY: PR_CAP_AMBIENT takes integers only; the unused arguments must be 0.
    let rc =
        unsafe { libc::prctl(libc::PR_CAP_AMBIENT, clear, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    check("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", rc.into())
}

/// The hint a failed bind gets when the cause is likely the missing capability.
pub fn bind_hint(port: u16, e: &io::Error) -> Option<&'static str> {
    let privileged = port != 0 && port < 1024;
    (privileged && e.kind() == io::ErrorKind::PermissionDenied)
        .then_some("a port below 1024 needs CAP_NET_BIND_SERVICE or root")
}

/// Whether the process's real user may write `path` (`access(2)`, which asks
/// without opening: a FIFO's reader sees no writer come and go). After the
/// switch the real user is the new one.
#[allow(unsafe_code)]
pub fn may_write(path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the path holds a NUL byte"))?;
    // SAFETY: access reads the NUL-terminated path, which lives across the call.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that every id is the new one and that root cannot come back.
fn verify(id: &Identity) -> Result<(), SwitchError> {
    let (uids, gids) = ids()?;
    if uids != [id.uid; 3] || gids != [id.gid; 3] {
        return Err(SwitchError::NotDropped(format!("uids {uids:?}, gids {gids:?}")));
    }
    if set_uid(0).is_ok() {
        return Err(SwitchError::NotDropped("it could become root again".into()));
    }
    Ok(())
}

fn check(call: &'static str, rc: libc::c_long) -> Result<(), SwitchError> {
    if rc == -1 {
        return Err(SwitchError::Call { call, source: io::Error::last_os_error() });
    }
    Ok(())
}

#[allow(unsafe_code)]
fn set_keep_caps(on: bool) -> Result<(), SwitchError> {
    // SAFETY: PR_SET_KEEPCAPS takes an integer flag and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0 as libc::c_ulong) };
    check("prctl(PR_SET_KEEPCAPS)", rc.into())
}

#[allow(unsafe_code)]
fn set_groups(groups: &[u32]) -> Result<(), SwitchError> {
    // SAFETY: the kernel reads `groups.len()` gids from the slice, which lives across the call.
    let rc = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
    check("setgroups", rc.into())
}

#[allow(unsafe_code)]
fn set_gid(gid: u32) -> Result<(), SwitchError> {
    // SAFETY: setresgid takes plain integers.
    let rc = unsafe { libc::setresgid(gid, gid, gid) };
    check("setresgid", rc.into())
}

#[allow(unsafe_code)]
fn set_uid(uid: u32) -> Result<(), SwitchError> {
    // SAFETY: setresuid takes plain integers.
    let rc = unsafe { libc::setresuid(uid, uid, uid) };
    check("setresuid", rc.into())
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit half of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets this thread's effective, permitted and inheritable sets to `low`
/// (capabilities 0 to 31; the upper half is emptied).
#[allow(unsafe_code)]
fn set_caps(low: u32) -> Result<(), SwitchError> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData { effective: low, permitted: low, inheritable: low }, CapData::default()];
    // SAFETY: capset reads the header and, for version 3, two data structs,
    // all of which live across the call; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    check("capset", rc)
}

#[allow(unsafe_code)]
fn raise_ambient(cap: u32) -> Result<(), SwitchError> {
    let (raise, cap) = (libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong, libc::c_ulong::from(cap));
    // SAFETY: PR_CAP_AMBIENT takes integers only; the unused arguments must be 0.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, raise, cap, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    check("prctl(PR_CAP_AMBIENT_RAISE)", rc.into())
}

/// The real, effective and saved uids and gids of this thread.
#[allow(unsafe_code)]
fn ids() -> Result<([u32; 3], [u32; 3]), SwitchError> {
    let (mut u, mut g) = ([0u32; 3], [0u32; 3]);
    // SAFETY: getresuid and getresgid each write three ids into the arrays we own.
    let rc = unsafe { libc::getresuid(&mut u[0], &mut u[1], &mut u[2]) };
    check("getresuid", rc.into())?;
    // SAFETY: as above.
    let rc = unsafe { libc::getresgid(&mut g[0], &mut g[1], &mut g[2]) };
    check("getresgid", rc.into())?;
    Ok((u, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_bind_below_1024_gets_the_hint() {
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(bind_hint(80, &denied).is_some_and(|h| h.contains("CAP_NET_BIND_SERVICE")));
        assert!(bind_hint(1023, &denied).is_some());
        assert_eq!(bind_hint(1024, &denied), None);
        assert_eq!(bind_hint(0, &denied), None);
        assert_eq!(bind_hint(80, &io::Error::from_raw_os_error(libc::EADDRINUSE)), None);
    }

    #[test]
    fn may_write_asks_without_opening() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log");
        std::fs::write(&file, b"").unwrap();
        may_write(&file).unwrap();
        assert_eq!(may_write(&dir.path().join("missing")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_capability_structs_have_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<CapHeader>(), 8);
        assert_eq!(std::mem::size_of::<CapData>(), 12);
    }

    #[test]
    fn a_refused_call_says_that_root_is_needed() {
        let e = SwitchError::Call { call: "setgroups", source: io::Error::from_raw_os_error(libc::EPERM) };
        assert!(e.to_string().starts_with("setgroups: ") && e.to_string().ends_with("needs shuttle to start as root"));
    }
}
