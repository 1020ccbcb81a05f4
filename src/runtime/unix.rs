//! Unix socket files that shuttle listens on (service listeners and the
//! admin socket): bound with an exact mode, taking over a path only from a
//! stale socket, and removed only while they are still ours.
//!
//! - **Binding.** The socket is bound at its final path, its file gets its
//!   mode with `chmod`, and only then does it `listen`: until `listen`, a
//!   connect is refused, so no client ever connects through a mode the umask
//!   chose. Binding into the final path also never replaces anything: if a
//!   file appeared at the path since we looked, `bind` fails with "address
//!   in use". (Binding to a temporary name and renaming it over the path
//!   would replace whatever appeared meanwhile, a user's file included.)
//! - **What is already there.** Nothing: bind. A socket that refuses a
//!   connect is stale (its process is gone): it is removed first. A socket
//!   that accepts one, or whose backlog is full, belongs to a live process:
//!   "address in use". Anything else (a regular file, a directory, a
//!   symlink) is never removed.
//! - **Removing.** The file's device and inode are taken at bind. It is
//!   removed (once) when its listener goes, but only if the path still holds
//!   that inode: a newer process that replaced our socket keeps its own. The
//!   check runs while our listening socket is open, which pins the inode, so
//!   its number cannot have been reused by another file.
//!
//! A process that can write the socket's directory could still swap files
//! between one of these checks and the call after it; the directory check
//! (not writable by every user unless sticky) keeps strangers out.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use mio::net::{UnixListener, UnixStream};
use socket2::{Domain, SockAddr, Socket, Type};

/// A socket file this process bound; dropping it removes the file if it is still ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    removed: AtomicBool,
}

impl SocketFile {
    /// The path it was bound at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still holds the socket we bound.
    pub fn is_ours(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == (self.dev, self.ino))
    }

    /// Removes the file if it is still ours; only the first call does anything.
    pub fn remove(&self) {
        if self.removed.swap(true, Ordering::Acquire) {
            return;
        }
        let path = self.path.display();
        match fs::symlink_metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Not ours to judge (a directory we may no longer search, after -user): the
            // next start replaces it as stale.
            Err(e) => log::info!("{path}: not removed: {e}"),
            Ok(m) if m.file_type().is_socket() && (m.dev(), m.ino()) == (self.dev, self.ino) => {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::info!("{path}: not removed: {e}; the next start replaces it as stale");
                }
            }
            Ok(_) => log::info!("{path}: not removed: another socket or file has taken its place"),
        }
    }

    /// Its device and inode, taken at bind.
    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Leaves the file in place for good: another process took the socket over.
    pub fn disown(&self) {
        self.removed.store(true, Ordering::Release);
    }

    /// The file of a socket another process bound at `path` and handed over,
    /// by its identity then. Left in place until [`SocketFile::own`]: while the
    /// hand-over may still fail, the file is the other process's.
    pub fn adopt(path: PathBuf, (dev, ino): (u64, u64)) -> SocketFile {
        SocketFile { path, dev, ino, removed: AtomicBool::new(true) }
    }

    /// Takes an adopted file on: this process removes it when its listener goes.
    pub fn own(&self) {
        self.removed.store(false, Ordering::Release);
    }

    /// Gives the file `mode`, if it is still ours and was not removed.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        if self.removed.load(Ordering::Acquire) || !self.is_ours() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the socket file is no longer ours"));
        }
        fs::set_permissions(&self.path, fs::Permissions::from_mode(mode))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds a nonblocking unix stream listener at `path` whose file has
/// exactly `mode`, whatever the umask (see the module doc).
pub fn bind(path: &Path, mode: u32, backlog: i32) -> io::Result<(UnixListener, SocketFile)> {
    check_dir(crate::runtime::files::parent_dir(path))?;
    clear_stale(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::unix(path)?)?;
    let meta = fs::symlink_metadata(path)?;
    // Declared after `socket`, so on failure it is dropped (and the file removed) while the socket still pins it.
    let file =
        SocketFile { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino(), removed: AtomicBool::new(false) };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    socket.listen(backlog)?;
    let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket)));
    Ok((listener, file))
}

/// The directory must exist, and must not let every user replace our socket.
fn check_dir(dir: &Path) -> io::Result<()> {
    let meta = fs::metadata(dir).map_err(|e| {
        let why = match e.kind() {
            io::ErrorKind::NotFound => "does not exist".to_string(),
            _ => format!("cannot be inspected: {e}"),
        };
        io::Error::new(e.kind(), format!("directory {} {why}", dir.display()))
    })?;
    if !meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotADirectory, format!("{} is not a directory", dir.display())));
    }
    // Without the sticky bit, anyone who may write the directory may replace our socket.
    let m = meta.permissions().mode();
    if m & 0o002 != 0 && m & 0o1000 == 0 {
        let message =
            format!("directory {} is writable by every user and not sticky (mode {:04o})", dir.display(), m & 0o7777);
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, message));
    }
    Ok(())
}

/// Makes way at `path`: nothing there, or a stale socket now removed; an error otherwise.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(meta) => meta,
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let what = if kind.is_file() {
            "a regular file"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else {
            "a special file"
        };
        let message = format!("{} is {what}, not a socket; shuttle never removes it", path.display());
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, message));
    }
    // Nonblocking: a live listener with a full backlog says WouldBlock, never hangs us.
    match UnixStream::connect(path) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // The same file we looked at, not one a new process bound meanwhile.
            let now = fs::symlink_metadata(path)?;
            if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "another socket took the path meanwhile"));
            }
            log::info!("{}: removing a stale socket (nobody listens there)", path.display());
            fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is listening there")),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is listening there (its backlog is full)"))
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("cannot tell whether a process listens there: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn bind_gives_the_mode_whatever_the_umask_and_removes_the_file_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (listener, file) = bind(&path, 0o640, 16).unwrap();
        assert_eq!(mode_of(&path), 0o640);
        assert!(file.is_ours());
        std::os::unix::net::UnixStream::connect(&path).expect("it listens");
        drop(file);
        assert!(fs::symlink_metadata(&path).is_err(), "removed with its listener");
        drop(listener);
    }

    #[test]
    fn bind_replaces_a_stale_socket_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(fs::symlink_metadata(&path).is_ok(), "a closed listener leaves its file: stale");
        let (_live, _file) = bind(&path, 0o600, 16).expect("a stale socket is replaced");
        let again = bind(&path, 0o600, 16).expect_err("a live socket is never taken over");
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse, "{again}");
        assert_eq!(mode_of(&path), 0o600, "the live socket is untouched");
    }

    #[test]
    fn bind_never_removes_what_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        fs::write(&path, b"keep me").unwrap();
        let e = bind(&path, 0o600, 16).unwrap_err();
        assert!(e.to_string().contains("is a regular file, not a socket"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(bind(&sub, 0o600, 16).unwrap_err().to_string().contains("is a directory"));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(bind(&link, 0o600, 16).unwrap_err().to_string().contains("is a symbolic link"));
    }

    #[test]
    fn bind_names_a_missing_directory() {
        let e = bind(Path::new("/nonexistent-shuttle-dir/s.sock"), 0o600, 16).unwrap_err();
        assert_eq!(e.to_string(), "directory /nonexistent-shuttle-dir does not exist");
    }

    #[test]
    fn a_replaced_socket_file_is_left_to_its_new_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (listener, file) = bind(&path, 0o600, 16).unwrap();
        fs::remove_file(&path).unwrap();
        let theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!file.is_ours());
        assert!(file.set_mode(0o666).is_err(), "their file keeps its mode");
        drop(file);
        drop(listener);
        assert!(fs::symlink_metadata(&path).is_ok(), "the newer socket stays");
        drop(theirs);
    }
}
