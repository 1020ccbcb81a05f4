//! The state file (reference §1, §5): the live config, loaded at start-up when it
//! exists and rewritten after every change.
//!
//! - One shuttle per state file: an exclusive `flock` on `FILE.lock` beside
//!   it, held for the life of the process (the state file itself can't carry
//!   the lock: every save replaces its inode). The lock file holds the
//!   holder's pid, so a second shuttle can say who is in the way.
//! - A save is atomic: a new temporary file with a random name, created
//!   exclusively with mode 0600 in the same directory, written and fsynced,
//!   renamed over the state file, then the directory fsynced. Temporary files
//!   a killed shuttle left behind are removed at start-up, under the lock.
//! - The directory must be ours (see `files::check_private_dir`).
//!
//! The save itself blocks, so it runs on a helper thread (`helpers::Worker`);
//! this module only builds the job.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::runtime::files;

/// Why the state file can't be used.
#[derive(Debug)]
pub enum StateError {
    /// Its directory is not safe from other users.
    Directory(String),
    /// Another shuttle holds the lock.
    Locked {
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, if it could be read.
        pid: Option<u32>,
    },
    /// The lock file could not be opened or locked.
    Lock {
        /// The lock file.
        lock: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::Directory(why) => f.write_str(why),
            StateError::Locked { lock, pid: Some(pid) } => {
                write!(f, "is in use by another shuttle (pid {pid}), which holds the lock {}", lock.display())
            }
            StateError::Locked { lock, pid: None } => {
                write!(f, "is in use by another shuttle, which holds the lock {}", lock.display())
            }
            StateError::Lock { lock, source } => write!(f, "cannot lock {}: {source}", lock.display()),
        }
    }
}

impl std::error::Error for StateError {}

/// The state file, locked for this process.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    /// Held open for the lock; closing it releases the lock.
    lock: File,
}

impl StateFile {
    /// Checks the directory, takes the lock and clears stale temporary files.
    pub fn open(path: &Path) -> Result<StateFile, StateError> {
        StateFile::open_as(path, files::effective_uid())
    }

    /// [`StateFile::open`] for a process that will run as uid `me` (`-user`):
    /// the directory may be that user's, and so may stale temporary files.
    pub fn open_as(path: &Path, me: u32) -> Result<StateFile, StateError> {
        let dir = files::parent_dir(path);
        files::check_private_dir_for(dir, me).map_err(StateError::Directory)?;
        let lock_path = lock_path(path);
        let lock_err = |source| StateError::Lock { lock: lock_path.clone(), source };
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&lock_path)
            .map_err(lock_err)?;
        let meta = lock.metadata().map_err(lock_err)?;
        if !meta.is_file() {
            return Err(lock_err(io::Error::other("it is not a regular file")));
        }
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let pid = files::read_regular(&lock_path, 64)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.trim().parse().ok());
                return Err(StateError::Locked { lock: lock_path, pid });
            }
            Err(fs::TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        lock.set_len(0).and_then(|()| writeln!(lock, "{}", std::process::id())).map_err(lock_err)?;
        remove_stale_temps(path, me);
        Ok(StateFile { path: path.to_path_buf(), lock })
    }

    /// The state file of a shuttle that handed over to this process (reference
    /// §3.7), with the lock it held: one open lock file, so the lock is never
    /// free between the two processes.
    pub fn adopt(path: &Path, lock: File) -> Result<StateFile, StateError> {
        let lock_err = |source| StateError::Lock { lock: lock_path(path), source };
        if !lock.metadata().map_err(lock_err)?.is_file() {
            return Err(lock_err(io::Error::other("the handed-over lock is not a regular file")));
        }
        Ok(StateFile { path: path.to_path_buf(), lock })
    }

    /// Writes this process's pid into the lock file, once a hand-over is done.
    pub fn name_holder(&self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let pid = format!("{}\n", std::process::id());
        self.lock.set_len(0).and_then(|()| self.lock.write_all_at(pid.as_bytes(), 0))
    }

    /// Another descriptor of the lock, for the hand-over.
    pub fn lock_copy(&self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(self.lock.try_clone()?.into())
    }

    /// What [`StateFile::open`] checks short of the lock, for `-check`: a
    /// running shuttle holds the lock, and its state file must still be checkable.
    pub fn check(path: &Path, me: u32) -> Result<(), StateError> {
        files::check_private_dir_for(files::parent_dir(path), me).map_err(StateError::Directory)
    }

    /// Whether this process can save `path`: creates and removes a temporary
    /// file beside it as a save would (after `-user`, the new user must be
    /// able to create files in the directory).
    pub fn check_saveable(path: &Path) -> io::Result<()> {
        let (_, tmp) = files::create_exclusive(files::parent_dir(path), &temp_prefix(path))?;
        fs::remove_file(tmp)
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The blocking work that saves `text` as the new state file, for a helper thread.
    pub fn save_job(&self, text: String) -> impl FnOnce() -> io::Result<()> + Send + 'static {
        let path = self.path.clone();
        move || save_atomic(&path, text.as_bytes())
    }
}

/// `FILE.lock` beside `FILE`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    path.with_file_name(name)
}

/// The prefix of the state file's temporary files: `.FILE.tmp.`.
fn temp_prefix(path: &Path) -> String {
    format!(".{}.tmp.", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())
}

/// Removes temporary files a killed shuttle left beside the state file. Only
/// regular files of ours (uid `me`) are touched; we hold the lock, so none is in use.
fn remove_stale_temps(path: &Path, me: u32) {
    let dir = files::parent_dir(path);
    let prefix = temp_prefix(path);
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let Ok(meta) = entry.path().symlink_metadata() else { continue };
        if meta.is_file() && meta.uid() == me {
            match fs::remove_file(entry.path()) {
                Ok(()) => log::info!("removed {}, left by an earlier shuttle", entry.path().display()),
                Err(e) => log::warn!("cannot remove stale {}: {e}", entry.path().display()),
            }
        }
    }
}

/// Writes `bytes` to `path` atomically: a fresh temporary file in the same
/// directory, fsync, rename over `path`, fsync the directory.
pub fn save_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = files::parent_dir(path);
    if path.file_name().is_none() {
        let message = format!("{} is not a file path", path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    let (mut file, tmp) = files::create_exclusive(dir, &temp_prefix(path))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create a temporary file in {}: {e}", dir.display())))?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        // Best effort: the original error is what matters.
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())));
    }
    // The new file is in place, so the change counts as saved; a failed directory fsync
    // only weakens durability across a crash, and reporting failure now would make the
    // running config and the file disagree (reference §5).
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::warn!("state file {}: cannot fsync its directory: {e}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_lock_on_the_same_state_file_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let held = StateFile::open(&path).unwrap();
        let err = StateFile::open(&path).unwrap_err();
        let pid = std::process::id();
        assert!(matches!(err, StateError::Locked { pid: Some(p), .. } if p == pid), "{err:?}");
        drop(held);
        StateFile::open(&path).unwrap();
    }

    #[test]
    fn saves_are_private_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let state = StateFile::open(&path).unwrap();
        state.save_job("[]\n".into())().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"[]\n");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.contains(".tmp.")), "{names:?}");
    }

    #[test]
    fn stale_temporary_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let stale = dir.path().join(".state.json.tmp.12345");
        fs::write(&stale, b"").unwrap();
        let other = dir.path().join(".other.json.tmp.1");
        fs::write(&other, b"").unwrap();
        let _state = StateFile::open(&path).unwrap();
        assert!(!stale.exists());
        assert!(other.exists(), "only our own temporary files are removed");
    }

    #[test]
    fn a_world_writable_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateFile::open(&dir.path().join("state.json")).unwrap_err();
        assert!(matches!(err, StateError::Directory(_)), "{err:?}");
    }
}
