//! What a loop tells a state machine, and what the state machine tells the
//! loop back: the cached readiness of one socket, and the next step.

use mio::event::Event;

/// Cached readiness of one socket; a flag is cleared only by a `WouldBlock`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// A read may make progress.
    pub readable: bool,
    /// A write (or a connect check) may make progress.
    pub writable: bool,
    /// The peer hung up or the socket has an error: read to EOF, never stop at a short read.
    pub closing: bool,
    /// The socket reported an error (`EPOLLERR`): a reset, say. The next step
    /// must look at it even if it would neither read nor write.
    pub error: bool,
}

impl Ready {
    /// Readiness from an event; error and hang-up hints just make the next syscall happen (pitfall 10).
    pub fn from_event(event: &Event) -> Ready {
        Ready {
            readable: event.is_readable() || event.is_read_closed() || event.is_error(),
            writable: event.is_writable() || event.is_write_closed() || event.is_error(),
            closing: event.is_read_closed() || event.is_error(),
            error: event.is_error(),
        }
    }

    /// Adds what an event reported.
    pub fn merge(&mut self, other: Ready) {
        self.readable |= other.readable;
        self.writable |= other.writable;
        self.closing |= other.closing;
        self.error |= other.error;
    }
}

/// What a state machine wants the loop to do after it ran.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing until an event or a timer.
    Wait,
    /// Its budget ran out with work left: run it again soon.
    Again,
    /// Remove it (dropping its sockets closes them).
    Close,
}
