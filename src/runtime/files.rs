//! Files opened with care for what may already be at their path: shuttle
//! reads config, state and token files that an operator names, and writes
//! the state file, possibly as root in a directory others can see.
//!
//! - Reading takes only regular files, opened without blocking (a FIFO would
//!   hang start-up) and up to a size limit (a huge file or `/dev/zero` would
//!   eat memory).
//! - A new file is created exclusively (`O_EXCL`, never through a symlink)
//!   with a random name and mode 0600, so nothing planted there is written
//!   through or adopted.
//! - A directory that other users can write to can't keep a file safe from
//!   them, so the state file's directory is checked before it is used.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Largest config, state or token file read.
pub const MAX_FILE: u64 = 64 * 1024 * 1024;

/// Why a file could not be read.
#[derive(Debug)]
pub enum FileError {
    /// Opening or reading failed.
    Io(io::Error),
    /// Something other than a regular file is at the path.
    NotRegular(&'static str),
    /// The file is larger than the limit.
    TooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileError::Io(e) => write!(f, "{e}"),
            FileError::NotRegular(kind) => write!(f, "is {kind}, not a regular file"),
            FileError::TooLarge { size, limit } => {
                write!(f, "is {} bytes, larger than the limit of {} MiB", size, limit / (1024 * 1024))
            }
        }
    }
}

impl std::error::Error for FileError {}

fn kind_of(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Reads a regular file of at most `limit` bytes. Opened with `O_NONBLOCK`, so
/// a FIFO at the path is refused instead of waiting for a writer.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(FileError::Io)?;
    let meta = file.metadata().map_err(FileError::Io)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(kind_of(&meta)));
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { size: meta.len(), limit });
    }
    // The size may grow while we read: never take more than the limit.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(FileError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { size: bytes.len() as u64, limit });
    }
    Ok(bytes)
}

/// Creates a new file in `dir` named `{prefix}{random}`, exclusively and
/// without following a symlink, readable and writable by its owner only.
pub fn create_exclusive(dir: &Path, prefix: &str) -> io::Result<(File, PathBuf)> {
    let mut last = None;
    // A clash with an existing name is a planted file or a crashed writer's
    // leftover: take another name, a few times at most.
    for _ in 0..8 {
        let path = dir.join(format!("{prefix}{:016x}", random_u64()?));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => return Ok((file, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary name")))
}

/// Eight random bytes from the kernel (`getrandom(2)`).
#[allow(unsafe_code)]
pub fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(u64::from_ne_bytes(bytes))
}

/// The directory a file path lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Checks that only we (or root) can add, remove or replace files in `dir`:
/// it must not be writable by other users, and must belong to root or to us.
/// Otherwise another user could plant the file we are about to load, or swap
/// it after we wrote it.
pub fn check_private_dir(dir: &Path) -> Result<(), String> {
    check_private_dir_for(dir, effective_uid())
}

/// [`check_private_dir`] for a process that will run as `me` (`-user`).
pub fn check_private_dir_for(dir: &Path, me: u32) -> Result<(), String> {
    let meta = fs::metadata(dir).map_err(|e| format!("cannot inspect directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o002 != 0 {
        return Err(format!(
            "directory {} is writable by every user (mode {:04o}); keep the state file in a directory only its owner can write",
            dir.display(),
            mode & 0o7777
        ));
    }
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "directory {} belongs to user {}, not to root or to the user shuttle runs as ({me}); its owner could replace the state file",
            dir.display(),
            meta.uid()
        ));
    }
    Ok(())
}

/// The effective user id of this process.
#[allow(unsafe_code)]
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn read_regular_refuses_fifos_devices_and_directories_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(rc, 0);
        assert!(matches!(read_regular(&fifo, MAX_FILE), Err(FileError::NotRegular("a FIFO"))));
        assert!(matches!(read_regular(Path::new("/dev/zero"), MAX_FILE), Err(FileError::NotRegular(_))));
        assert!(matches!(read_regular(dir.path(), MAX_FILE), Err(FileError::NotRegular("a directory"))));
    }

    #[test]
    fn read_regular_refuses_a_file_over_the_limit_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(1 << 30).unwrap(); // sparse: no disk, no memory
        let err = read_regular(&big, MAX_FILE).unwrap_err();
        assert!(matches!(err, FileError::TooLarge { size, .. } if size == 1 << 30));
        assert!(err.to_string().contains("larger than the limit of 64 MiB"), "{err}");
        fs::write(&big, b"[]").unwrap();
        assert_eq!(read_regular(&big, MAX_FILE).unwrap(), b"[]");
    }

    #[test]
    fn create_exclusive_never_writes_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, path) = create_exclusive(dir.path(), ".x.tmp.").unwrap();
        std::io::Write::write_all(&mut file, b"ok").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // The same name with a symlink planted there is refused, not followed.
        let target = dir.path().join("target");
        fs::write(&target, b"precious").unwrap();
        let planted = dir.path().join("planted");
        symlink(&target, &planted).unwrap();
        let refused =
            OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&planted).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert_ne!(random_u64().unwrap(), random_u64().unwrap());
    }

    #[test]
    fn check_private_dir_refuses_world_writable_directories() {
        let dir = tempfile::tempdir().unwrap();
        check_private_dir(dir.path()).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let err = check_private_dir(dir.path()).unwrap_err();
        assert!(err.contains("writable by every user (mode 1777)"), "{err}");
        assert!(check_private_dir(&dir.path().join("missing")).is_err());
    }
}
