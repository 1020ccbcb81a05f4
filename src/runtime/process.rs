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
