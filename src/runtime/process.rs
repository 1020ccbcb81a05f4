//! The process a binary upgrade started (reference §3.7), as the old one
//! holds it once it has said it is ready: the link to it, and the child to
//! reap if it exits while this one still runs.

use std::process::Child;

use socket2::Socket;

/// A new process that said it is ready and waits for the word to serve.
#[derive(Debug)]
pub struct Successor {
    /// Its pid.
    pub pid: u32,
    /// The hand-over socketpair's end; dropping it unsent calls the upgrade off.
    pub link: Socket,
    /// The child, to reap if it exits while this process still runs.
    pub child: Child,
}

/// Why an upgrade failed; the old process logs it and serves on.
#[derive(Debug)]
pub enum UpgradeError {
    /// What the hand-over needs could not be made (its socketpair, the manifest, a descriptor).
    Prepare(std::io::Error),
    /// The binary did not start.
    Start {
        /// The binary.
        exe: std::path::PathBuf,
        /// What `exec` said.
        source: std::io::Error,
    },
    /// The new process failed: how it exited, and what went wrong.
    Process {
        /// Its pid.
        pid: u32,
        /// Its exit status, once reaped.
        status: Option<std::process::ExitStatus>,
        /// What went wrong.
        why: Fault,
    },
}

/// What went wrong with a new process that started.
#[derive(Debug)]
pub enum Fault {
    /// Sending it the manifest or the descriptors failed.
    Send(std::io::Error),
    /// It exited before it was ready.
    Exited,
    /// It said why it cannot serve.
    Refused(String),
    /// It answered something unknown.
    Unknown,
    /// It was not ready within the deadline.
    Late(std::time::Duration),
    /// Its answer could not be read.
    Answer(std::io::Error),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::Prepare(e) => write!(f, "cannot prepare the hand-over: {e}"),
            UpgradeError::Start { exe, source } => write!(f, "cannot start {}: {source}", exe.display()),
            UpgradeError::Process { pid, status, why } => {
                write!(f, "process {pid}")?;
                if let Some(status) = status {
                    write!(f, " ({status})")?;
                }
                match why {
                    Fault::Send(e) => write!(f, ": the hand-over failed: {e}"),
                    Fault::Exited => f.write_str(": it exited before it was ready"),
                    Fault::Refused(why) => write!(f, ": {why}"),
                    Fault::Unknown => f.write_str(": it answered something unknown"),
                    Fault::Late(deadline) => write!(f, ": it was not ready within {deadline:?}"),
                    Fault::Answer(e) => write!(f, ": cannot read its answer: {e}"),
                }
            }
        }
    }
}

impl std::error::Error for UpgradeError {}
