//! systemd's readiness protocol (reference §7, `sd_notify(3)`): one datagram
//! such as `READY=1` to the unix socket named by `$NOTIFY_SOCKET`, when it is
//! set. A name starting with `@` is in the abstract namespace, which std
//! addresses through its Linux extension, so no unsafe code is needed.
//!
//! Called from the loop, so it never blocks: the socket is nonblocking, and a
//! failure (systemd gone, its queue full) is logged once and then ignored:
//! readiness is a courtesy to the supervisor, never a reason to stop proxying.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    /// The unbound socket and systemd's address; `None` when not under a notify supervisor.
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Set once a send failed and was logged.
    warned: bool,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`, or one that sends nothing when it is unset.
    pub fn from_env() -> Notifier {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(name) if !name.is_empty() => Notifier::to(&name.to_string_lossy()),
            _ => Notifier::disabled(),
        }
    }

    /// One that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None, warned: false }
    }

    /// One that sends to `name`: a path, or `@` and an abstract name.
    pub fn to(name: &str) -> Notifier {
        match open(name) {
            Ok(target) => Notifier { target: Some(target), warned: false },
            Err(e) => {
                log::warn!("${NOTIFY_SOCKET} {name:?}: {e}; systemd will not hear when shuttle is ready");
                Notifier::disabled()
            }
        }
    }

    /// Whether anything will be sent.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (lines such as `READY=1\nSTATUS=...`) without blocking.
    pub fn send(&mut self, state: &str) {
        let Some((socket, addr)) = &self.target else { return };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            if !self.warned {
                self.warned = true;
                log::warn!("cannot notify systemd through ${NOTIFY_SOCKET}: {e}; further failures are not logged");
            }
        }
    }
}

/// An unbound nonblocking datagram socket and the parsed address.
fn open(name: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
        None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
        // systemd also speaks vsock ("vsock:CID:PORT"), for virtual machines.
        None => return Err(io::Error::other("only a socket path or an @abstract name is supported")),
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_and_to_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let mut notifier = Notifier::to(path.to_str().unwrap());
        notifier.send("READY=1\n");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let name = format!("shuttle-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        let mut notifier = Notifier::to(&format!("@{name}"));
        notifier.send("STOPPING=1\n");
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_missing_socket_is_logged_once_and_ignored() {
        let mut notifier = Notifier::to("/nonexistent/shuttle-notify");
        assert!(notifier.is_enabled());
        notifier.send("READY=1\n");
        notifier.send("STOPPING=1\n");
        assert!(notifier.warned);
        assert!(!Notifier::to("vsock:1:2").is_enabled());
        assert!(!Notifier::disabled().is_enabled());
    }
}
