//! The data plane: proxied pairs and their relay buffers.

pub mod buffer;
pub mod proxy;
