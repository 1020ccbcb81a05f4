//! A bell any loop may ring and every loop hears: an epoch counter and the
//! wakers of every loop. It carries no message: a loop that hears it (its
//! epoch moved) looks at the shared state that changed. With `-workers N`
//! this is how a backend marked down on one loop (a failed check on the
//! control loop, a failed client connect on a worker) reaches the pairs of
//! every worker without a channel per pair of loops or a lock: ringing is an
//! atomic add and one `eventfd` write per loop, hearing is one relaxed load
//! per loop turn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use mio::Waker;

/// Rung by any loop, heard by every loop.
#[derive(Debug, Default)]
pub struct Bell {
    epoch: AtomicU64,
    /// Every loop's waker, set once when the loops exist.
    wakers: OnceLock<Vec<Arc<Waker>>>,
}

impl Bell {
    /// Sets the wakers of every loop that should hear it; only the first call counts.
    pub fn connect(&self, wakers: Vec<Arc<Waker>>) {
        let _ = self.wakers.set(wakers);
    }

    /// Moves the epoch and wakes every loop.
    pub fn ring(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for waker in self.wakers.get().into_iter().flatten() {
            if let Err(e) = waker.wake() {
                log::error!("cannot wake an event loop: {e}");
            }
        }
    }

    /// The epoch now: a loop that last heard another one has something to look at.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ringing_moves_the_epoch_even_before_any_loop_is_connected() {
        let bell = Bell::default();
        let before = bell.epoch();
        bell.ring();
        assert_ne!(bell.epoch(), before);
    }
}
