//! What every loop is built from: generation-checked keys, the timer wheel,
//! cached readiness and steps, socket plumbing, and the helper threads that
//! take blocking calls off the loop.

pub mod accesslog;
pub mod accounts;
pub mod bell;
pub mod conn;
pub mod cpus;
pub mod fds;
pub mod files;
pub mod helpers;
pub mod key;
pub mod listen;
pub mod logsink;
pub mod net;
pub mod notify;
pub mod passfd;
pub mod privileges;
pub mod process;
pub mod procfs;
pub mod ready;
pub mod throttle;
pub mod timer;
pub mod unix;
pub mod utc;
