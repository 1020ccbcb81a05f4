//! The data plane: proxied pairs, their relay buffers, and the access log's
//! record of each finished one.

pub mod buffer;
pub mod finished;
pub mod greeting;
pub mod proxy;
