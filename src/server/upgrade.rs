//! The running side of a binary upgrade (reference §3.7).
//!
//! SIGUSR2 starts it. Once no admin change is in flight (changes wait their
//! turn, and new ones get 503 until the upgrade ends), the control loop
//! writes the manifest, takes a descriptor of every socket it will hand
//! over, and gives both to a thread of its own, which starts the binary at
//! the path this process was invoked by, with the same arguments and
//! `-upgrade-fd`, sends everything over a seqpacket socketpair, and waits
//! (each message at most [`DEADLINE`]) for the new process to say it is ready.
//!
//! - Ready: systemd hears the new `MAINPID=` from this process, still the
//!   main one. The listeners close here without the SYN filter a retiring
//!   listener gets: they are the new process's sockets too, so what is
//!   queued in their backlogs stays queued, for it. Then the counters go to
//!   the new process, with the word to serve (`G`); until then it accepts
//!   nothing. Unix socket files and the state file's lock stay with it. This
//!   process then drains as after SIGTERM.
//! - Ready, but this process began shutting down meanwhile: the link is
//!   dropped unsent, and the new process exits, having served nothing.
//! - Anything else (the binary does not start, refuses the manifest,
//!   crashes, or is late): the new process is killed if it still runs, and
//!   this one goes on as if nothing happened, and says so.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use super::{Entry, Role, Server};
use crate::control::api::{Response, Staged};
use crate::control::change::Changes;
use crate::model::config;
use crate::model::handover::{self, kind, AdminSocket, BackendHealth, FileId, Manifest, ServiceSockets, SocketKind};
use crate::runtime::helpers::Answer;
use crate::runtime::listen::Bound;
use crate::runtime::passfd;
use crate::runtime::process::{Fault, Successor, UpgradeError};
use crate::runtime::unix::SocketFile;

/// How long each message of the hand-over may take, the new process's answer
/// included (its start-up, name lookups and all).
pub const DEADLINE: Duration = Duration::from_secs(10);
/// `SHUTTLE_TEST_UPGRADE_DEADLINE_MS=N` shortens [`DEADLINE`] (the tests of a new process that never answers).
pub const DEADLINE_ENV: &str = "SHUTTLE_TEST_UPGRADE_DEADLINE_MS";

/// How to start this binary again: its path when it started, and its arguments.
#[derive(Clone, Debug)]
pub struct Relaunch {
    /// The executable this process runs, as it was named when it started (a new
    /// binary put at that path is what an upgrade runs).
    pub exe: PathBuf,
    /// The arguments it was given, without any `-upgrade-fd`.
    pub args: Vec<OsString>,
}

impl Relaunch {
    /// This process's own executable and arguments.
    pub fn this_process() -> io::Result<Relaunch> {
        let mut given = std::env::args_os();
        let argv0 = given.next().map(PathBuf::from);
        let exe = match argv0.as_deref().and_then(as_invoked) {
            Some(exe) => exe,
            None => std::env::current_exe()?,
        };
        Ok(Relaunch { exe, args: without_upgrade_fd(given) })
    }
}

/// The binary as it was invoked, symlinks kept: a path with a slash made
/// absolute, a bare name found in `$PATH`. (`/proc/self/exe` would resolve a
/// symlink, and an upgrade that repoints the link would run the old binary.)
fn as_invoked(argv0: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if argv0.as_os_str().as_encoded_bytes().contains(&b'/') {
        let path = if argv0.is_absolute() { argv0.to_path_buf() } else { std::env::current_dir().ok()?.join(argv0) };
        return executable(&path).then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(argv0)).find(|p| p.is_absolute() && executable(p))
}

/// The arguments less `-upgrade-fd N` (or `--upgrade-fd=N`): each upgrade names its own.
fn without_upgrade_fd(given: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args = Vec::new();
    let mut given = given.into_iter();
    while let Some(arg) = given.next() {
        let text = arg.to_string_lossy();
        match text.strip_prefix("--").or_else(|| text.strip_prefix('-')) {
            Some("upgrade-fd") => {
                given.next();
            }
            Some(flag) if flag.starts_with("upgrade-fd=") => {}
            _ => args.push(arg),
        }
    }
    args
}

/// What a loop knows of binary upgrades.
#[derive(Debug, Default)]
pub(crate) struct Upgrades {
    /// How SIGUSR2 starts this binary again (`None`: its path is unknown).
    pub relaunch: Option<Relaunch>,
    /// This process's upgrade under way.
    pub state: Option<Upgrade>,
    /// Set once a new process took the listeners over: this one only drains.
    pub handed_over: bool,
    /// The process it started, reaped if it exits while this one drains.
    successor: Option<std::process::Child>,
    /// When to look whether it has exited next (a `waitpid` a second, not one a turn).
    next_reap: Option<Instant>,
    /// The thread telling that process to serve; the drain waits for it.
    telling: Option<std::thread::JoinHandle<()>>,
    /// In a process that took over: the socket files it adopted, left alone
    /// (the old process's) until it is told to serve.
    pub adopted: Option<Vec<Arc<SocketFile>>>,
}

/// Where an upgrade stands.
#[derive(Debug)]
pub(crate) enum Upgrade {
    /// Asked for while a change was in flight: it starts when that change is answered.
    Waiting,
    /// The new process is starting.
    Running,
}

impl Server {
    /// SIGUSR2.
    pub(super) fn on_upgrade_signal(&mut self) {
        if self.upgrades.handed_over {
            return info!("SIGUSR2 received after the hand-over: this process only drains");
        }
        if self.draining.is_some() {
            return info!("SIGUSR2 received while shutting down: not upgrading");
        }
        if self.upgrades.state.is_some() {
            return info!("SIGUSR2 received: upgrade already in progress");
        }
        if self.upgrades.relaunch.is_none() {
            return warn!("SIGUSR2 received: cannot upgrade: the path of this binary is unknown");
        }
        info!("SIGUSR2 received: upgrading; admin changes get 503 until the new process serves");
        self.upgrades.state = Some(Upgrade::Waiting);
        self.start_upgrade();
    }

    /// Starts a waiting upgrade once no change is in flight; run every turn.
    pub(super) fn start_upgrade(&mut self) {
        if matches!(self.upgrades.state, Some(Upgrade::Waiting)) && self.draining.is_some() {
            info!("upgrade: not started: this process is shutting down");
            self.upgrades.state = None;
        }
        if !matches!(self.upgrades.state, Some(Upgrade::Waiting))
            || !self.changes.as_ref().is_some_and(Changes::is_idle)
        {
            return;
        }
        match self.offer() {
            Ok(()) => self.upgrades.state = Some(Upgrade::Running),
            Err(e) => {
                error!("upgrade failed: {e}; this process keeps serving");
                self.upgrades.state = None;
            }
        }
    }

    /// Reaps the process an upgrade started if it has exited (while this one
    /// drains: it is this process's child until this one exits).
    pub(super) fn reap_successor(&mut self, now: Instant) {
        let upgrades = &mut self.upgrades;
        let Some(child) = upgrades.successor.as_mut() else { return };
        if upgrades.next_reap.is_some_and(|at| now < at) {
            return;
        }
        upgrades.next_reap = Some(now + Duration::from_secs(1));
        if !matches!(child.try_wait(), Ok(None)) {
            upgrades.successor = None;
        }
    }

    /// Whether admin changes must wait: an upgrade is under way.
    pub(super) fn upgrading(&self) -> Option<Response> {
        self.upgrades.state.as_ref()?;
        let mut response =
            Response::error(503, "a binary upgrade is in progress; no change is taken until it ends: try again");
        response.fields.push(("Retry-After", "1".into()));
        Some(response)
    }

    /// Hands the manifest and the sockets to the thread that starts the new process.
    fn offer(&mut self) -> io::Result<()> {
        let Some(relaunch) = self.upgrades.relaunch.clone() else { return Err(io::Error::other("no binary to run")) };
        let Role::Control { inbox, .. } = &self.role else { return Err(io::Error::other("not the control loop")) };
        let outbox = inbox.outbox();
        let (manifest, fds) = self.manifest()?;
        std::thread::Builder::new().name("shuttle-upgrade".into()).spawn(move || {
            let result = launch(&relaunch, &manifest, &fds);
            let _ = outbox.post(Answer::Upgraded { result });
        })?;
        Ok(())
    }

    /// Everything the new process needs, and the descriptors in the manifest's order.
    fn manifest(&self) -> io::Result<(Manifest, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        let mut sockets = Vec::new();
        let mut health = Vec::new();
        for key in self.services.keys() {
            let Some(service) = self.services.service(key) else { continue };
            let name = service.settings.name.clone();
            let listener = service.listener.and_then(|l| self.entries.get(l));
            let (kind, file, count) = match listener {
                Some(Entry::Group(group)) => {
                    for copy in &group.copies {
                        fds.push(copy.try_clone()?);
                    }
                    (group.kind, group.file.clone(), group.copies.len())
                }
                Some(Entry::Listener(l)) => {
                    fds.push(l.socket.fd_copy()?);
                    (l.socket.kind(), l.socket.file().cloned(), 1)
                }
                Some(Entry::Datagrams(d)) => {
                    fds.push(socket2::SockRef::from(&d.socket).try_clone()?.into());
                    (SocketKind::Udp, None, 1)
                }
                _ => return Err(io::Error::other(format!("service {name:?} has no listener to hand over"))),
            };
            let file = file.as_deref().map(file_id);
            sockets.push(ServiceSockets { service: name.clone(), kind, count, file });
            for &b in &service.backends {
                let Some(backend) = self.services.backend(b) else { continue };
                if backend.probe.is_some() {
                    let up = backend.state.health.is_up();
                    health.push(BackendHealth { service: name.clone(), backend: backend.config.name.clone(), up });
                }
            }
        }
        let Some(Entry::AdminListener(admin)) = self.admin_listener.and_then(|k| self.entries.get(k)) else {
            return Err(io::Error::other("the admin listener is closed"));
        };
        fds.push(admin.fd_copy()?);
        let admin = AdminSocket { file: admin.file().map(|f| file_id(f)) };
        let lock = self.changes.as_ref().and_then(Changes::state_lock).transpose()?;
        let state_lock = lock.is_some();
        fds.extend(lock);
        let manifest = Manifest {
            version: handover::VERSION,
            pid: std::process::id(),
            workers: self.workers().map_or(1, |w| w.len()),
            config: self.changes.as_ref().map_or_else(
                || config::to_json(&self.services.configs()),
                |c| c.form().render(&self.services.configs()),
            ),
            source: self.changes.as_ref().and_then(Changes::source).map(|p| p.display().to_string()),
            sockets,
            admin,
            state_lock,
            health,
            token: self.access.token().map(|t| String::from_utf8_lossy(t).into_owned()),
        };
        Ok((manifest, fds))
    }

    /// The upgrade thread's answer.
    pub(super) fn on_upgraded(&mut self, result: Result<Successor, UpgradeError>, now: Instant) {
        self.upgrades.state = None;
        let successor = match result {
            Ok(successor) => successor,
            Err(why) => return error!("upgrade failed: {why}; this process keeps serving"),
        };
        let Successor { pid, link, child } = successor;
        self.upgrades.successor = Some(child);
        if self.draining.is_some() {
            // Its end of the link closes with ours: it exits, having served nothing.
            return warn!("upgrade: process {pid} is ready, but this one is shutting down: the upgrade is called off");
        }
        // This process is still systemd's main one: it names its successor before it can exit.
        self.notify.send(&format!("MAINPID={pid}\n"));
        info!("upgrade: process {pid} is serving; this process stops accepting and drains its open connections");
        self.hand_over(now);
        // The totals as they stand once this process stopped accepting (its
        // admin API is closed now), so no reader sees a counter go back.
        let counters: Vec<_> = self.services.keys().filter_map(|k| self.services.counters_of(k)).collect();
        let Role::Control { inbox, .. } = &self.role else { return };
        let outbox = inbox.outbox();
        let go = std::thread::Builder::new().name("shuttle-upgrade".into()).spawn(move || {
            let result = send_go(&link, &counters);
            // Its answer wakes the loop, whose drain may have waited for it alone.
            let _ = outbox.post(Answer::Told { pid, result });
        });
        match go {
            // The drain waits for it: exiting first would close the link unsent, calling the upgrade off.
            Ok(thread) => self.upgrades.telling = Some(thread),
            Err(e) => error!("upgrade: cannot tell process {pid} to serve: {e}"),
        }
    }

    /// The new process was told to serve (or could not be).
    pub(super) fn on_told(&mut self, pid: u32, result: io::Result<()>) {
        if let Some(thread) = self.upgrades.telling.take() {
            let _ = thread.join();
        }
        if let Err(e) = result {
            error!(
                "upgrade: cannot tell process {pid} to serve: {e}; it will exit, and nothing serves these services now"
            );
        }
    }

    /// Whether the word to serve is still on its way to the new process.
    pub(super) fn telling_successor(&self) -> bool {
        self.upgrades.telling.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// The new process serves: leave it the sockets and files, then drain.
    fn hand_over(&mut self, now: Instant) {
        for (_, entry) in self.entries.iter_mut() {
            match entry {
                Entry::Group(group) => {
                    if let Some(file) = &group.file {
                        file.disown();
                    }
                }
                Entry::AdminListener(admin) => {
                    if let Some(file) = admin.file() {
                        file.disown();
                    }
                    if let Err(e) = admin.deregister(self.poll.registry()) {
                        warn!("upgrade: cannot deregister the admin listener: {e}");
                    }
                }
                _ => {}
            }
        }
        self.release_listeners();
        if let Some(workers) = self.workers() {
            workers.hand_over();
        }
        self.begin_drain(now);
    }

    /// Closes this loop's listeners with no filter and leaves their socket
    /// files: the process that took them over accepts what they queue. From
    /// here on this loop only drains (a worker hears of the hand-over here).
    pub(super) fn release_listeners(&mut self) {
        self.upgrades.handed_over = true;
        let keys: Vec<_> = self
            .entries
            .iter()
            .filter_map(|(key, entry)| match entry {
                Entry::Listener(l) if l.retiring.is_none() => {
                    if let Some(file) = l.socket.file() {
                        file.disown();
                    }
                    Some(key)
                }
                Entry::Datagrams(_) => Some(key),
                _ => None,
            })
            .collect();
        // The other process holds the same sockets: closing ours would leave
        // them registered with this poller, waking it for connections it no
        // longer takes (epoll forgets a socket only when its last descriptor closes).
        let registry = self.poll.registry();
        for &key in &keys {
            let deregistered = match self.entries.get_mut(key) {
                Some(Entry::Listener(l)) => registry.deregister(&mut l.socket),
                Some(Entry::Datagrams(d)) => registry.deregister(&mut d.socket),
                _ => Ok(()),
            };
            if let Err(e) = deregistered {
                warn!("upgrade: cannot deregister a listener: {e}");
            }
        }
        for key in keys {
            self.remove_entry(key);
        }
    }

    /// Stages sockets another process handed over, as [`Server::stage_group`] stages new ones.
    pub(super) fn stage_handed(&mut self, mut sockets: Vec<Bound>) -> io::Result<Staged> {
        if self.workers().is_some() {
            return self.stage_sockets(sockets);
        }
        let socket = sockets.pop().ok_or(io::ErrorKind::AddrNotAvailable)?;
        let local = socket.local_addr()?;
        let listener = self.stage_bound(socket)?;
        Ok(Staged { listener, local })
    }

    /// The old process has let go: the socket files and the state file's lock file are this one's now.
    pub fn finish_take_over(&mut self) {
        let Some(files) = self.upgrades.adopted.take() else { return };
        if let Some(workers) = self.workers() {
            workers.start();
        }
        for file in files {
            file.own();
        }
        if let Some(Err(e)) = self.changes.as_ref().map(Changes::name_holder) {
            warn!("upgrade: cannot write this process's pid into the state file's lock file: {e}");
        }
    }

    /// Goes on from the old process's counters, as they stood when it stopped accepting.
    pub fn carry_counters(&mut self, counters: &[handover::ServiceCounters]) {
        for carried in counters {
            self.services.carry_counters(carried);
        }
    }

    /// Makes the backends the old process knew down start down here.
    pub(super) fn carry_health(&mut self, health: &[BackendHealth]) {
        for h in health.iter().filter(|h| !h.up) {
            let backend = self.services.find(&h.service).and_then(|s| self.services.find_backend(s, &h.backend));
            match backend {
                Some(backend) => self.services.carry_down(backend),
                None => warn!("upgrade: service {:?} has no backend {:?} to mark down", h.service, h.backend),
            }
        }
    }
}

/// A socket file as the manifest names it.
fn file_id(file: &SocketFile) -> FileId {
    let (dev, ino) = file.id();
    FileId { path: file.path().display().to_string(), dev, ino }
}

/// The upgrade thread: starts the new process, hands it everything, and
/// waits for it to be ready.
fn launch(relaunch: &Relaunch, manifest: &Manifest, fds: &[OwnedFd]) -> Result<Successor, UpgradeError> {
    let (ours, theirs) = passfd::pair().map_err(UpgradeError::Prepare)?;
    passfd::inheritable(theirs.as_fd()).map_err(UpgradeError::Prepare)?;
    let messages = manifest.to_messages(passfd::MAX_MESSAGE).map_err(|e| UpgradeError::Prepare(e.into()))?;
    let mut child = Command::new(&relaunch.exe)
        .args(&relaunch.args)
        .arg("-upgrade-fd")
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Start { exe: relaunch.exe.clone(), source })?;
    drop(theirs);
    let pid = child.id();
    info!("upgrade: starting {} (process {pid})", relaunch.exe.display());
    let deadline =
        std::env::var(DEADLINE_ENV).ok().and_then(|v| v.parse().ok()).map_or(DEADLINE, Duration::from_millis);
    match converse(&ours, &messages, fds, deadline) {
        // It runs on after this process exits, adopted by init or the service manager.
        Ok(()) => Ok(Successor { pid, link: ours, child }),
        Err(why) => {
            // One that gave up or crashed is exiting: its own status says more than our kill.
            let exited = (0..100).find_map(|_| match child.try_wait() {
                Ok(None) => {
                    std::thread::sleep(Duration::from_millis(10));
                    None
                }
                done => Some(done),
            });
            let status = match exited {
                Some(Ok(Some(status))) => Some(status),
                _ => child.kill().and_then(|()| child.wait()).ok(),
            };
            Err(UpgradeError::Process { pid, status, why })
        }
    }
}

/// Sends the manifest's messages and the descriptors, then waits for the answer.
fn converse(link: &socket2::Socket, manifest: &[Vec<u8>], fds: &[OwnedFd], deadline: Duration) -> Result<(), Fault> {
    passfd::set_deadline(link, deadline).map_err(Fault::Send)?;
    for message in manifest {
        passfd::send(link, message, &[]).map_err(Fault::Send)?;
    }
    for chunk in fds.chunks(passfd::MAX_FDS) {
        let borrowed: Vec<BorrowedFd<'_>> = chunk.iter().map(AsFd::as_fd).collect();
        passfd::send(link, &[kind::FDS], &borrowed).map_err(Fault::Send)?;
    }
    passfd::send(link, &[kind::END], &[]).map_err(Fault::Send)?;
    let mut answer = vec![0u8; passfd::MAX_MESSAGE];
    match passfd::recv(link, &mut answer) {
        Ok((0, _)) => Err(Fault::Exited),
        Ok((_, _)) if answer[0] == kind::READY => Ok(()),
        Ok((n, _)) if answer[0] == kind::FAILED => Err(Fault::Refused(String::from_utf8_lossy(&answer[1..n]).into())),
        Ok(_) => Err(Fault::Unknown),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Err(Fault::Late(deadline)),
        Err(e) => Err(Fault::Answer(e)),
    }
}

/// Tells the new process to serve, with the counters to go on from.
fn send_go(link: &socket2::Socket, counters: &[handover::ServiceCounters]) -> io::Result<()> {
    for message in handover::counters_to_messages(counters, passfd::MAX_MESSAGE)? {
        passfd::send(link, &message, &[])?;
    }
    passfd::send(link, &[kind::GO], &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_passes_every_argument_but_the_last_upgrade_fd() {
        let given = ["-config", "c.json", "-upgrade-fd", "7", "--grace=2", "--upgrade-fd=9", "-workers", "2"];
        let args = without_upgrade_fd(given.iter().map(OsString::from));
        assert_eq!(args, ["-config", "c.json", "--grace=2", "-workers", "2"].map(OsString::from));
    }
}
