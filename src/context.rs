//! The context a state machine gets while the loop has it borrowed from the
//! slab: the loop's other fields, never the loop itself, so state machines
//! don't import the loop that drives them.

use std::time::Instant;

use mio::Registry;

use crate::data::buffer::BufferPool;
use crate::model::service::Services;
use crate::runtime::accesslog::AccessLog;
use crate::runtime::fds::FdBudget;
use crate::runtime::key::Key;
use crate::runtime::timer::Wheel;

/// What state machines may use of the loop while one of them is borrowed from the slab.
#[derive(Debug)]
pub struct Cx<'a> {
    /// The time this loop iteration started.
    pub now: Instant,
    /// Where sockets are registered.
    pub registry: &'a Registry,
    /// Deadlines, each naming an entry.
    pub timers: &'a mut Wheel<Key>,
    /// Running config and counters.
    pub services: &'a mut Services,
    /// Relay buffers.
    pub pool: &'a mut BufferPool,
    /// Who holds descriptors; probes ask it before they connect.
    pub fds: &'a mut FdBudget,
    /// Where finished pairs are logged, when `-access-log` is on.
    pub access_log: &'a mut AccessLog,
}
