//! Where a socket is, once a config's address is resolved: an IP address and
//! port, or a unix socket path (`unix:/path` in a config); and where a client
//! came from. The rules that compare IP addresses are `model::address`'s.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// What a unix socket address starts with in a config.
pub const UNIX_PREFIX: &str = "unix:";

/// An absolute unix socket path, lexically normalized (no repeated `/`, no
/// `.` components), so two spellings of one path compare equal. Shared: it
/// is cloned into every loop's copy of a service and every access-log label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UnixPath(Arc<str>);

impl UnixPath {
    /// `path` normalized; `model::address` checks a config's path before it gets here.
    pub fn new(path: &str) -> UnixPath {
        let mut out = String::with_capacity(path.len());
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            out.push('/');
            out.push_str(part);
        }
        if out.is_empty() {
            out.push('/');
        }
        UnixPath(out.into())
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        Path::new(&*self.0)
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UnixPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{UNIX_PREFIX}{}", self.0)
    }
}

/// A resolved address: what a listener binds or a connect reaches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// An IP address and port.
    Inet(SocketAddr),
    /// A unix socket path.
    Unix(UnixPath),
}

impl Endpoint {
    /// The port; 0 for a unix socket (maps that group listeners by port put them together).
    pub fn port(&self) -> u16 {
        self.inet().map_or(0, |a| a.port())
    }

    /// Whether a connect to `self` reaches a listener bound at `listener`.
    pub fn loops_to(&self, listener: &Endpoint) -> bool {
        match (self, listener) {
            (Endpoint::Inet(a), Endpoint::Inet(l)) => crate::model::address::loops_to(*a, *l),
            (Endpoint::Unix(a), Endpoint::Unix(l)) => a == l,
            _ => false,
        }
    }

    /// Whether two listeners would clash.
    pub fn overlaps(&self, other: &Endpoint) -> bool {
        match (self, other) {
            (Endpoint::Inet(a), Endpoint::Inet(b)) => crate::model::address::overlaps(*a, *b),
            (Endpoint::Unix(a), Endpoint::Unix(b)) => a == b,
            _ => false,
        }
    }

    /// The IP address and port, if it is one.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Inet(addr) => Some(*addr),
            Endpoint::Unix(_) => None,
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint::Inet(addr)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Inet(addr) => addr.fmt(f),
            Endpoint::Unix(path) => path.fmt(f),
        }
    }
}

/// Where a client connected from, for logs and PROXY headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAddr {
    /// A TCP client (or the source its PROXY header named).
    Inet(SocketAddr),
    /// A client of a unix socket: its address is almost always unnamed, so
    /// it shows as `unix:`, as nginx's `$remote_addr` does.
    Unix,
}

impl ClientAddr {
    /// The IP address and port, if it is one.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            ClientAddr::Inet(addr) => Some(*addr),
            ClientAddr::Unix => None,
        }
    }
}

impl From<SocketAddr> for ClientAddr {
    fn from(addr: SocketAddr) -> ClientAddr {
        ClientAddr::Inet(addr)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAddr::Inet(addr) => addr.fmt(f),
            ClientAddr::Unix => f.write_str(UNIX_PREFIX),
        }
    }
}

/// Longest unix socket path: `sun_path` holds 108 bytes with the final NUL.
pub const MAX_UNIX_PATH: usize = 107;

/// A config's `unix:/path`: `None` when `text` is not one, else the checked path.
pub fn parse_unix(text: &str) -> Option<Result<UnixPath, String>> {
    let path = text.strip_prefix(UNIX_PREFIX)?;
    let clipped = crate::model::address::clip(text);
    Some(if !path.starts_with('/') {
        Err(format!("a unix socket path must be absolute, got {clipped:?}"))
    } else if path.contains('\0') {
        Err(format!("a unix socket path must not contain NUL, got {clipped:?}"))
    } else if path.len() > MAX_UNIX_PATH {
        Err(format!("a unix socket path is at most {MAX_UNIX_PATH} bytes, got {} in {clipped:?}", path.len()))
    } else if path.ends_with('/') {
        Err(format!("a unix socket path names a file, not a directory, got {clipped:?}"))
    } else {
        Ok(UnixPath::new(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_addresses_are_checked_and_others_are_not_ours() {
        assert_eq!(parse_unix("127.0.0.1:80"), None);
        assert_eq!(parse_unix("unix:/run/web.sock"), Some(Ok(UnixPath::new("/run/web.sock"))));
        assert!(parse_unix("unix:run/web.sock").is_some_and(|r| r.unwrap_err().contains("absolute")));
        assert!(parse_unix("unix:").is_some_and(|r| r.is_err()));
        assert!(parse_unix("unix:/a\0b").is_some_and(|r| r.unwrap_err().contains("NUL")));
        assert!(parse_unix(&format!("unix:/{}", "a".repeat(107))).is_some_and(|r| r.unwrap_err().contains("107")));
        assert!(parse_unix(&format!("unix:/{}", "a".repeat(106))).is_some_and(|r| r.is_ok()));
        assert!(parse_unix("unix:/run/").is_some_and(|r| r.is_err()));
    }

    #[test]
    fn unix_endpoints_clash_and_loop_on_the_same_path_only() {
        let a = Endpoint::Unix(UnixPath::new("/run/a.sock"));
        let a2 = Endpoint::Unix(UnixPath::new("//run/./a.sock"));
        let b = Endpoint::Unix(UnixPath::new("/run/b.sock"));
        let inet: Endpoint = "127.0.0.1:0".parse::<SocketAddr>().unwrap().into();
        assert!(a.overlaps(&a2) && a.loops_to(&a2));
        assert!(!a.overlaps(&b) && !a.loops_to(&b));
        assert!(!a.overlaps(&inet) && !inet.loops_to(&a));
        assert_eq!(a.port(), 0);
    }

    #[test]
    fn unix_paths_are_normalized_lexically() {
        assert_eq!(UnixPath::new("/run//shuttle/./web.sock").as_str(), "/run/shuttle/web.sock");
        assert_eq!(UnixPath::new("/run/shuttle/web.sock"), UnixPath::new("//run/shuttle//web.sock"));
        assert_eq!(UnixPath::new("/a/../b").as_str(), "/a/../b", "\"..\" is the file system's business");
        assert_eq!(UnixPath::new("/run/web.sock").to_string(), "unix:/run/web.sock");
    }

    #[test]
    fn endpoints_and_clients_display_as_a_config_writes_them() {
        let inet: Endpoint = "127.0.0.1:80".parse::<SocketAddr>().unwrap().into();
        assert_eq!(inet.to_string(), "127.0.0.1:80");
        assert_eq!(Endpoint::Unix(UnixPath::new("/s")).to_string(), "unix:/s");
        assert_eq!(ClientAddr::Unix.to_string(), "unix:");
        assert_eq!(ClientAddr::from("[::1]:9".parse::<SocketAddr>().unwrap()).to_string(), "[::1]:9");
    }
}
