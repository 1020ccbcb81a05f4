//! The user and group database, for `-user` and `-group` (reference §1):
//! names or numeric ids turned into the uid, gid and supplementary groups
//! shuttle switches to. Looked up through libc (`getpwnam_r` and friends),
//! so NSS sources such as LDAP or systemd's dynamic users count, not only
//! `/etc/passwd`.

use std::ffi::{CStr, CString};
use std::io;

/// Largest buffer offered to a `get*_r` call before giving up on `ERANGE`.
const MAX_BUFFER: usize = 1 << 20;

/// Who shuttle runs as after `-user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `-user` value as given, for messages.
    pub user: String,
    /// The user's name in the database; `None` for a numeric uid it lacks.
    pub name: Option<String>,
    /// The user id.
    pub uid: u32,
    /// The primary group: `-group`, or the user's own.
    pub gid: u32,
    /// Every group the process will be in, the primary one first.
    pub groups: Vec<u32>,
}

/// Why `-user` or `-group` names nobody shuttle can switch to.
#[derive(Debug)]
pub enum AccountError {
    /// `-user NAME`: no such user.
    NoUser(String),
    /// `-group NAME`: no such group.
    NoGroup(String),
    /// A numeric uid the database lacks, and no `-group` to say its group.
    NoPrimaryGroup(u32),
    /// The user is root: there is nothing to drop.
    Root,
    /// The database could not be asked.
    Lookup(io::Error),
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::NoUser(name) => write!(f, "no user {name:?} in the user database"),
            AccountError::NoGroup(name) => write!(f, "no group {name:?} in the group database"),
            AccountError::NoPrimaryGroup(uid) => {
                write!(f, "uid {uid} is not in the user database, so its group is unknown: give -group too")
            }
            AccountError::Root => f.write_str("is root (uid 0): name the unprivileged user shuttle should run as"),
            AccountError::Lookup(e) => write!(f, "cannot read the user database: {e}"),
        }
    }
}

impl std::error::Error for AccountError {}

/// Resolves `-user` (and `-group`, else the user's primary group). A value
/// made of digits only is a numeric id, as with `chown`.
pub fn resolve(user: &str, group: Option<&str>) -> Result<Identity, AccountError> {
    let entry = match numeric(user) {
        Some(uid) => user_by_id(uid).map_err(AccountError::Lookup)?.ok_or(Entry::Unknown(uid)),
        None => user_by_name(user).map_err(AccountError::Lookup)?.ok_or(Entry::Missing),
    };
    let (uid, name, own_gid) = match entry {
        Ok(found) => (found.uid, Some(found.name), Some(found.gid)),
        Err(Entry::Unknown(uid)) => (uid, None, None),
        Err(Entry::Missing) => return Err(AccountError::NoUser(user.to_string())),
    };
    if uid == 0 {
        return Err(AccountError::Root);
    }
    let gid = match group {
        Some(g) => match numeric(g) {
            Some(gid) => gid,
            None => group_by_name(g).map_err(AccountError::Lookup)?.ok_or_else(|| AccountError::NoGroup(g.into()))?,
        },
        None => own_gid.ok_or(AccountError::NoPrimaryGroup(uid))?,
    };
    let mut groups = match &name {
        Some(name) => group_list(name, gid).map_err(AccountError::Lookup)?,
        None => Vec::new(),
    };
    groups.retain(|&g| g != gid);
    groups.insert(0, gid);
    Ok(Identity { user: user.to_string(), name, uid, gid, groups })
}

enum Entry {
    /// A numeric uid the database does not list.
    Unknown(u32),
    /// A name the database does not list.
    Missing,
}

/// A user's database entry.
struct User {
    name: String,
    uid: u32,
    gid: u32,
}

fn numeric(value: &str) -> Option<u32> {
    value.bytes().all(|b| b.is_ascii_digit()).then(|| value.parse().ok()).flatten()
}

fn c_string(value: &str) -> io::Result<CString> {
    CString::new(value).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the name holds a NUL byte"))
}

/// Calls a `get*_r` function with a buffer that grows on `ERANGE`. `call`
/// returns the function's result code and whether it found an entry.
fn with_buffer<T>(mut call: impl FnMut(&mut [u8]) -> (libc::c_int, Option<T>)) -> io::Result<Option<T>> {
    let mut buffer = vec![0u8; 4096];
    loop {
        match call(&mut buffer) {
            (0, found) => return Ok(found),
            // glibc's ways of saying "not there" besides a null result.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (libc::ERANGE, _) if buffer.len() < MAX_BUFFER => buffer.resize(buffer.len() * 2, 0),
            (libc::EINTR, _) => {}
            (code, _) => return Err(io::Error::from_raw_os_error(code)),
        }
    }
}

/// Copies a found `passwd` entry out of the buffer it points into.
#[allow(unsafe_code)]
fn owned_user(pwd: &libc::passwd) -> User {
    // SAFETY: a successful getpw*_r call set `pw_name` to a NUL-terminated
    // string inside the buffer, which the caller still holds.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_string_lossy().into_owned();
    User { name, uid: pwd.pw_uid, gid: pwd.pw_gid }
}

#[allow(unsafe_code)]
fn user_by_name(name: &str) -> io::Result<Option<User>> {
    let name = c_string(name)?;
    with_buffer(|buffer| {
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids); it is only read back if found.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the NUL-terminated name,
        // the entry, the buffer with its true length, and the result pointer.
        let code =
            unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buffer.as_mut_ptr().cast(), buffer.len(), &mut found) };
        (code, (!found.is_null()).then(|| owned_user(&pwd)))
    })
}

#[allow(unsafe_code)]
fn user_by_id(uid: u32) -> io::Result<Option<User>> {
    with_buffer(|buffer| {
        // SAFETY: as in `user_by_name`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        // SAFETY: as in `user_by_name`, with a uid instead of a name.
        let code = unsafe { libc::getpwuid_r(uid, &mut pwd, buffer.as_mut_ptr().cast(), buffer.len(), &mut found) };
        (code, (!found.is_null()).then(|| owned_user(&pwd)))
    })
}

#[allow(unsafe_code)]
fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let name = c_string(name)?;
    with_buffer(|buffer| {
        // SAFETY: all-zero is a valid `group`; only its gid is read, and only if found.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, the buffer with its true length.
        let code =
            unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buffer.as_mut_ptr().cast(), buffer.len(), &mut found) };
        (code, (!found.is_null()).then_some(grp.gr_gid))
    })
}

/// The groups the database puts `name` in, `gid` among them (`getgrouplist`).
#[allow(unsafe_code)]
fn group_list(name: &str, gid: u32) -> io::Result<Vec<u32>> {
    let name = c_string(name)?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..8 {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` has room for `n` gids; on -1 glibc sets `n` to the count needed and writes at most `n`.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        groups.resize(n.max(groups.len() * 2), 0);
    }
    Err(io::Error::other(format!("the group list of {name:?} keeps growing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_by_name_and_by_number() {
        assert!(matches!(resolve("root", None), Err(AccountError::Root)));
        assert!(matches!(resolve("0", None), Err(AccountError::Root)));
    }

    #[test]
    fn unknown_names_are_named() {
        let e = resolve("no-such-user-shuttle", None).unwrap_err();
        assert_eq!(e.to_string(), r#"no user "no-such-user-shuttle" in the user database"#);
        if user_by_name("nobody").unwrap().is_some() {
            let e = resolve("nobody", Some("no-such-group-shuttle")).unwrap_err();
            assert_eq!(e.to_string(), r#"no group "no-such-group-shuttle" in the group database"#);
        }
        assert!(matches!(resolve("a\0b", None), Err(AccountError::Lookup(_))));
    }

    #[test]
    fn a_numeric_uid_outside_the_database_needs_a_group() {
        let uid = 3_999_999_999u32;
        assert!(user_by_id(uid).unwrap().is_none());
        let e = resolve(&uid.to_string(), None).unwrap_err();
        assert!(e.to_string().contains("give -group too"), "{e}");
        let id = resolve(&uid.to_string(), Some("4000")).unwrap();
        assert_eq!((id.uid, id.gid, id.groups, id.name), (uid, 4000, vec![4000], None));
    }

    #[test]
    fn nobody_by_name_and_by_number_agree() {
        let Some(nobody) = user_by_name("nobody").unwrap() else {
            eprintln!("skipped: this system has no user nobody");
            return;
        };
        let by_name = resolve("nobody", None).unwrap();
        let by_id = resolve(&nobody.uid.to_string(), None).unwrap();
        assert_eq!((by_name.uid, by_name.gid), (nobody.uid, nobody.gid));
        assert_eq!((by_id.uid, by_id.gid, &by_id.groups), (by_name.uid, by_name.gid, &by_name.groups));
        assert_eq!(by_name.groups[0], nobody.gid, "the primary group comes first");
        let other = resolve("nobody", Some("12345")).unwrap();
        assert_eq!(other.groups[0], 12345);
        assert!(!other.groups[1..].contains(&12345));
    }

    #[test]
    fn numbers_are_ids_only_when_all_digits() {
        assert_eq!(numeric("65534"), Some(65534));
        assert_eq!(numeric("+1"), None);
        assert_eq!(numeric("1a"), None);
        assert_eq!(numeric(""), None);
        assert_eq!(numeric("99999999999"), None);
    }
}
