//! The control plane: the admin API (HTTP framing, connections, routes) and
//! the health probes.

pub mod access;
pub mod admin;
pub mod api;
pub mod change;
pub mod http;
pub mod info;
pub mod metrics;
pub mod probe;
pub mod state;
