//! The data plane: proxied pairs, their relay buffers, the access log's
//! record of each finished one, and UDP flows.

pub mod buffer;
pub mod finished;
pub mod flow;
pub mod greeting;
pub mod proxy;
