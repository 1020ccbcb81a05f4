//! shuttle: a TCP proxy and load balancer reconfigured live over HTTP/JSON.
//!
//! One thread runs one `mio::Poll` loop ([`server`]) that owns every socket in
//! one generation-checked slab ([`key`]): service listeners, proxied pairs
//! ([`proxy`]), health probes ([`health`]) and admin connections ([`admin`]).
//! Deadlines come from one timer wheel ([`timer`]). The behaviour contract is
//! `SPEC.md`; the design is `DESIGN.md`.
#![deny(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod admin;
pub mod api;
pub mod balance;
pub mod buffer;
pub mod config;
pub mod health;
pub mod http;
pub mod key;
pub mod net;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod service;
pub mod timer;
