//! Addresses as a config writes them (`host:port`, `v4:port`, `[v6]:port`,
//! `:port`), checked for syntax without resolving anything, and the rules
//! that compare resolved addresses: which listeners clash, and which backend
//! would loop back into one of our own listeners.
//!
//! Parsing never touches the network: a host name is only resolved when a
//! config is applied, on a helper thread (`runtime::resolver`), so a slow
//! resolver can never stall the loop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

pub use crate::runtime::helpers::Lookups;

/// How addresses are written, for error messages.
pub const FORM: &str = r#"expected "host:port", "v4:port" or "[v6]:port""#;
/// Longest host name (RFC 1035 §2.3.4).
const MAX_HOST: usize = 253;
/// Longest label of a host name.
const MAX_LABEL: usize = 63;

/// The host part of an address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP literal: nothing to resolve.
    Ip(IpAddr),
    /// A name the resolver must look up.
    Name(String),
}

/// An address as written, with its syntax checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    /// The host.
    pub host: Host,
    /// The port; 0 lets a listener take any free port.
    pub port: u16,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl Address {
    /// The socket address, when the host is an IP literal.
    pub fn literal(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }

    /// The name to resolve, if the host is one.
    pub fn name(&self) -> Option<&str> {
        match &self.host {
            Host::Name(name) => Some(name),
            Host::Ip(_) => None,
        }
    }

    /// The socket address once names are resolved; `Err` says why the name gave none.
    pub fn resolve(&self, lookups: &Lookups) -> Result<SocketAddr, String> {
        match &self.host {
            Host::Ip(ip) => Ok(SocketAddr::new(*ip, self.port)),
            Host::Name(name) => match lookups.get(name) {
                Some(Ok(ip)) => Ok(SocketAddr::new(*ip, self.port)),
                Some(Err(why)) => Err(why.clone()),
                None => Err(format!("host {name:?} was not looked up")),
            },
        }
    }
}

/// Parses an address without resolving it: `host:port`, `v4:port`, `[v6]:port`,
/// or `:port` (every IPv4 address, as in Go).
pub fn parse(text: &str) -> Result<Address, String> {
    if text.is_empty() {
        return Err(format!("is required, {FORM}"));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if let SocketAddr::V6(v6) = addr {
            // A scope would be lost on the way to the socket: refuse it rather than connect elsewhere.
            if v6.scope_id() != 0 {
                return Err(format!("IPv6 scope ids are not supported, got {:?}", clip(text)));
            }
        }
        return Ok(Address { host: Host::Ip(addr.ip()), port: addr.port() });
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("{FORM}, got {:?} (no port)", clip(text)));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("port must be a number from 0 to 65535, got {:?} in {:?}", clip(port), clip(text)));
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!("{FORM} (IPv6 needs brackets), got {:?}", clip(text)));
    }
    if host.is_empty() {
        return Ok(Address { host: Host::Ip(Ipv4Addr::UNSPECIFIED.into()), port });
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Address { host: Host::Ip(ip), port });
    }
    check_host_name(host)?;
    Ok(Address { host: Host::Name(host.to_ascii_lowercase()), port })
}

/// Parses an address a backend or a check connects to: port 0 can't be connected to.
pub fn parse_connect(text: &str) -> Result<Address, String> {
    let addr = parse(text)?;
    if addr.port == 0 {
        return Err(format!("port 0 cannot be connected to, got {:?}", clip(text)));
    }
    Ok(addr)
}

/// RFC 1123 host names (letters, digits, `-`, dots between labels), plus `_`,
/// which internal DNS zones use. Anything else would only fail later, slowly,
/// in the resolver.
fn check_host_name(host: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("host {:?} is not a valid host name: {why}", clip(host)));
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > MAX_HOST {
        return bad("longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("empty label");
        }
        if label.len() > MAX_LABEL {
            return bad("a label is longer than 63 bytes");
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return bad("only letters, digits, \"-\" and \"_\" may appear between dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with \"-\"");
        }
    }
    Ok(())
}

/// The address compared as the kernel sees it: an IPv4-mapped IPv6 address
/// (`::ffff:127.0.0.1`) reaches the IPv4 address, so it is that address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether connecting to `backend` would reach `listener`: a backend on one of
/// our own listeners makes every connection open another until the fds run out.
///
/// Both sides are normalised first (see [`canonical`]). A wildcard listener, of
/// either family, is taken to match every local address, and connecting to a
/// wildcard reaches the local host.
pub fn loops_to(backend: SocketAddr, listener: SocketAddr) -> bool {
    let (backend, listener) = (canonical(backend), canonical(listener));
    if backend.port() != listener.port() || listener.port() == 0 {
        return false;
    }
    let (to, at) = (backend.ip(), listener.ip());
    to == at || to.is_unspecified() || (at.is_unspecified() && is_local(to))
}

/// Whether `ip` is one of this host's addresses: only a local address can be
/// bound. A nonblocking syscall, never a lookup.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind((ip, 0)).is_ok()
}

/// Whether two listeners would fight over one port; `[::]` is taken to cover
/// IPv4 as well, as it does on Linux unless `IPV6_V6ONLY` is set.
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let (a, b) = (canonical(a), canonical(b));
    let covers = |x: SocketAddr, y: SocketAddr| x.ip().is_unspecified() && (x.is_ipv6() || y.is_ipv4());
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// A string for a message: at most ~60 characters, with a `…` when cut.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(60) {
        Some((end, _)) => format!("{}…", &s[..end]).into(),
        None => s.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_takes_the_forms_and_says_which_is_expected() {
        assert_eq!(parse("127.0.0.1:80").unwrap().literal(), Some(sa("127.0.0.1:80")));
        assert_eq!(parse("[::1]:80").unwrap().literal(), Some(sa("[::1]:80")));
        assert_eq!(parse(":80").unwrap().literal(), Some(sa("0.0.0.0:80")));
        let named = parse("Backend-1.example:8080").unwrap();
        assert_eq!(named.name(), Some("backend-1.example"));
        assert_eq!(named.to_string(), "backend-1.example:8080");
        assert!(parse("localhost").unwrap_err().ends_with(r#"got "localhost" (no port)"#));
        assert!(parse("::1:80").unwrap_err().contains("IPv6 needs brackets"));
        assert!(parse("h:99999").unwrap_err().starts_with("port must be a number"));
        assert!(parse("").unwrap_err().starts_with("is required"));
        assert!(parse_connect("127.0.0.1:0").unwrap_err().starts_with("port 0 cannot be connected to"));
    }

    #[test]
    fn parse_rejects_what_no_resolver_could_find() {
        for bad in ["a b:80", "a..b:80", "-a:80", "a-:80", "\nx:80", "x\u{0}:80", "é.example:80"] {
            assert!(parse(bad).unwrap_err().contains("not a valid host name"), "{bad:?}");
        }
        assert!(parse(&format!("{}:80", "a".repeat(64))).is_err());
        assert!(parse("host.example.:80").is_ok(), "a trailing dot is a fully qualified name");
        assert!(parse("_srv.internal:80").is_ok());
    }

    #[test]
    fn parse_never_resolves() {
        // A name no resolver knows still parses: looking it up is the resolver's job.
        assert_eq!(parse("nothing.invalid:80").unwrap().name(), Some("nothing.invalid"));
    }

    #[test]
    fn resolve_uses_the_lookups() {
        let mut lookups = Lookups::new();
        lookups.insert("up.example".into(), Ok(IpAddr::from([192, 0, 2, 7])));
        lookups.insert("down.example".into(), Err("host \"down.example\" does not resolve".into()));
        assert_eq!(parse("up.example:81").unwrap().resolve(&lookups), Ok(sa("192.0.2.7:81")));
        assert!(parse("down.example:81").unwrap().resolve(&lookups).is_err());
        assert_eq!(parse("10.0.0.1:81").unwrap().resolve(&Lookups::new()), Ok(sa("10.0.0.1:81")));
    }

    #[test]
    fn loops_to_normalises_mapped_and_wildcard_addresses() {
        assert!(loops_to(sa("127.0.0.1:8080"), sa("127.0.0.1:8080")));
        assert!(loops_to(sa("[::ffff:127.0.0.1]:8080"), sa("127.0.0.1:8080")));
        assert!(loops_to(sa("127.0.0.1:8080"), sa("[::ffff:127.0.0.1]:8080")));
        assert!(loops_to(sa("0.0.0.0:8080"), sa("127.0.0.1:8080")));
        assert!(loops_to(sa("127.0.0.1:8080"), sa("0.0.0.0:8080")));
        assert!(loops_to(sa("[::1]:8080"), sa("0.0.0.0:8080")), "any wildcard matches every local address");
        assert!(loops_to(sa("127.0.0.5:8080"), sa("[::]:8080")));
        assert!(loops_to(sa("[::ffff:127.0.0.2]:8080"), sa("[::]:8080")));
        assert!(!loops_to(sa("127.0.0.1:8081"), sa("127.0.0.1:8080")));
        assert!(!loops_to(sa("127.0.0.2:8080"), sa("127.0.0.1:8080")), "another loopback address is another socket");
        assert!(!loops_to(sa("192.0.2.1:8080"), sa("0.0.0.0:8080")), "TEST-NET-1 is not local");
        assert!(!loops_to(sa("127.0.0.1:0"), sa("127.0.0.1:0")));
    }

    #[test]
    fn overlaps_normalises_mapped_addresses() {
        assert!(overlaps(sa("127.0.0.1:80"), sa("[::ffff:127.0.0.1]:80")));
        assert!(overlaps(sa("[::]:80"), sa("127.0.0.1:80")));
        assert!(overlaps(sa("0.0.0.0:80"), sa("127.0.0.1:80")));
        assert!(!overlaps(sa("0.0.0.0:80"), sa("[::1]:80")));
        assert!(!overlaps(sa("127.0.0.1:80"), sa("127.0.0.2:80")));
        assert!(!overlaps(sa("127.0.0.1:0"), sa("127.0.0.1:0")));
    }
}
