//! The new side of a binary upgrade (reference §3.7): `-upgrade-fd N`.
//!
//! The process reads the manifest and the sockets from the old one, starts
//! exactly as a fresh shuttle would, but on those sockets and with that
//! config, then says it is ready. Until then nothing of the old process's
//! changes: its socket files and the state file stay its own, so that if
//! this process fails at any point, the old one serves on as before.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;

use super::Failed;
use crate::control::admin::AdminListener;
use crate::model::config;
use crate::model::handover::{self, kind, FileId, Manifest, ServiceCounters};
use crate::runtime::listen::Bound;
use crate::runtime::passfd;
use crate::runtime::unix::SocketFile;
use crate::server::Inherited;

/// `SHUTTLE_TEST_UPGRADE_CRASH=1`: the new process aborts once it holds the
/// sockets, before it is ready (the tests of a failed upgrade).
pub const CRASH_ENV: &str = "SHUTTLE_TEST_UPGRADE_CRASH";
/// `SHUTTLE_TEST_UPGRADE_PAUSE_MS=N`: the new process waits N ms before it
/// says it is ready (the tests of admin changes during a hand-over).
pub const PAUSE_ENV: &str = "SHUTTLE_TEST_UPGRADE_PAUSE_MS";

/// How long each message of the hand-over may take.
const EACH: Duration = Duration::from_secs(10);
/// The most manifest bytes taken: far above any config, far below harm.
const MAX_MANIFEST: usize = 64 << 20;

/// What the old process handed over.
pub(super) struct Taken {
    /// Its pid.
    pub pid: u32,
    /// Its worker count, which this process keeps.
    pub workers: usize,
    /// The running config and the file it came from.
    pub running: super::Running,
    /// The sockets, the admin listener and the health.
    pub inherited: Inherited,
    /// The state file's lock, if it has one.
    pub state_lock: Option<File>,
}

/// The socket to the old process, named by `-upgrade-fd`.
pub(super) fn link(fd: i32) -> Result<Socket, Failed> {
    let link = passfd::adopt(fd).map_err(|e| Failed(format!("-upgrade-fd {fd}: {e}")))?;
    passfd::set_deadline(&link, EACH).map_err(|e| Failed(format!("-upgrade-fd {fd}: {e}")))?;
    Ok(link)
}

/// Reads everything the old process sends, up to its end.
pub(super) fn take(link: &Socket) -> Result<Taken, Failed> {
    let failed = |e: String| Failed(format!("upgrade: {e}"));
    let mut fds = Vec::new();
    let json = gather(link, kind::MANIFEST, kind::END, Some(&mut fds))?;
    let manifest = Manifest::parse(&json, fds.len()).map_err(|e| failed(e.to_string()))?;
    let file = config::parse_file(&manifest.config)
        .map_err(|e| failed(format!("the running shuttle's config does not load here: {e}")))?;
    let source = manifest.source.as_ref().map(PathBuf::from);
    let running = super::Running { source, file, token: manifest.token.as_ref().map(|t| t.as_bytes().to_vec()) };
    let mut fds = fds.into_iter();
    let mut sockets = HashMap::new();
    let mut files = Vec::new();
    for s in &manifest.sockets {
        let file = s.file.as_ref().map(adopt_file);
        files.extend(file.clone());
        let mut group = Vec::with_capacity(s.count);
        for fd in fds.by_ref().take(s.count) {
            let bound =
                Bound::adopt(s.kind, fd, file.clone()).map_err(|e| failed(format!("service {:?}: {e}", s.service)))?;
            group.push(bound);
        }
        sockets.insert(s.service.clone(), group);
    }
    let admin_file = manifest.admin.file.as_ref().map(adopt_file);
    files.extend(admin_file.clone());
    let fd = fds.next().ok_or_else(|| failed("no admin listener".into()))?;
    let admin = AdminListener::adopt(admin_file, fd).map_err(|e| failed(format!("admin listener: {e}")))?;
    let state_lock = if manifest.state_lock { fds.next().map(File::from) } else { None };
    if std::env::var(CRASH_ENV).is_ok_and(|v| v == "1") {
        log::error!("upgrade: {CRASH_ENV} is set: aborting mid-hand-over");
        std::process::abort();
    }
    let inherited = Inherited { sockets, admin: Some(admin), health: manifest.health, files };
    Ok(Taken { pid: manifest.pid, workers: manifest.workers, running, inherited, state_lock })
}

/// A socket file the old process bound, not yet this one's to remove.
fn adopt_file(f: &FileId) -> Arc<SocketFile> {
    Arc::new(SocketFile::adopt(PathBuf::from(&f.path), (f.dev, f.ino)))
}

/// Tells the old process that this one is ready to serve.
pub(super) fn ready(link: &Socket) -> Result<(), Failed> {
    if let Some(ms) = std::env::var(PAUSE_ENV).ok().and_then(|v| v.parse().ok()) {
        log::info!("upgrade: {PAUSE_ENV} is set: waiting {ms} ms before saying ready");
        std::thread::sleep(Duration::from_millis(ms));
    }
    passfd::send(link, &[kind::READY], &[])
        .map_err(|e| Failed(format!("upgrade: cannot tell the running shuttle this one is ready: {e}")))
}

/// Waits for the old process to stop accepting: its counters, then the word
/// to serve. The end of the link instead means it called the upgrade off.
pub(super) fn wait_go(link: &Socket) -> Result<Vec<ServiceCounters>, Failed> {
    let json = gather(link, kind::COUNTERS, kind::GO, None)?;
    handover::parse_counters(&json).map_err(|e| Failed(format!("upgrade: {e}")))
}

/// Reads messages up to one of kind `end`: the JSON that the `piece` ones
/// carry, joined, and (where `fds` takes them) the descriptors of `FDS` ones.
fn gather(link: &Socket, piece: u8, end: u8, mut fds: Option<&mut Vec<OwnedFd>>) -> Result<Vec<u8>, Failed> {
    let failed = |e: String| Failed(format!("upgrade: {e}"));
    let mut json = Vec::new();
    let mut buf = vec![0u8; passfd::MAX_MESSAGE];
    loop {
        let (n, got) = passfd::recv(link, &mut buf).map_err(|e| failed(format!("cannot read the hand-over: {e}")))?;
        match (buf[..n].first(), fds.as_deref_mut()) {
            // Waiting for the word to serve, the end of the link is the old process calling it off.
            (None, _) if end == kind::GO => return Err(failed("the running shuttle called the upgrade off".into())),
            (None, _) => return Err(failed("the running shuttle closed the hand-over".into())),
            (Some(&k), _) if k == end => return Ok(json),
            (Some(&k), _) if k == piece => json.extend_from_slice(&buf[1..n]),
            (Some(&kind::FDS), Some(fds)) => fds.extend(got),
            (Some(other), _) => return Err(failed(format!("unknown hand-over message {other:#04x}"))),
        }
        if json.len() > MAX_MANIFEST {
            return Err(failed("the hand-over's JSON is too big".into()));
        }
    }
}

/// Tells the old process why this one gives up (it logs it and serves on).
pub(super) fn give_up(link: &Socket, why: &Failed) {
    let mut message = vec![kind::FAILED];
    let text = config::one_line(&why.0);
    message.extend_from_slice(&text.as_bytes()[..text.len().min(passfd::MAX_MESSAGE - 1)]);
    let _ = passfd::send(link, &message, &[]);
}
