//! shuttle: a TCP proxy and load balancer reconfigured live over HTTP/JSON.
//!
//! One thread runs one `mio::Poll` loop ([`server`]) that owns every socket in
//! one generation-checked slab ([`runtime::key`]): service listeners, proxied
//! pairs ([`data::proxy`]), health probes ([`control::probe`]) and admin
//! connections ([`control::admin`]). Deadlines come from one timer wheel
//! ([`runtime::timer`]). Blocking calls (name resolution, the state file's
//! fsync, the log sink) run on helper threads that answer through the loop's
//! waker. The behaviour contract is `docs/reference.md`; the design is
//! `docs/design.md`.
//!
//! The folders are the house's rooms: `runtime` (keys, timers, readiness,
//! sockets, helper threads), `model` (config and running state, pure),
//! `data` (the proxied pair), `control` (admin API and probes). Arrows go
//! from `data` and `control` down to `model` and `runtime`, never between
//! `data` and `control`; the loop in `server` ties them together.
#![deny(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cli;
pub mod context;
pub mod control;
pub mod data;
#[doc(hidden)]
pub mod fuzzing;
pub mod model;
pub mod runtime;
pub mod server;
pub mod startup;
