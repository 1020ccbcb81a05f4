//! The configuration and the running state it becomes: pure data and rules,
//! no sockets. Config files and API bodies, addresses, services and their
//! counters, the balancer, and health bookkeeping.

pub mod address;
pub mod balance;
pub mod config;
pub mod counters;
pub mod diff;
pub mod endpoint;
pub mod handover;
pub mod health;
pub mod histogram;
pub mod limits;
pub mod options;
pub mod proxy_header;
pub mod queue;
pub mod service;
