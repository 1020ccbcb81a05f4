//! The PROXY protocol header (haproxy's "proxy-protocol.txt", versions 1 and
//! 2): encoding one for a backend, and a strict parser for one a client sends.
//!
//! The parser is pure and incremental over a growing prefix: call it with the
//! bytes seen so far; it says `Incomplete` while a valid header could still
//! follow, and rejects as soon as the bytes can no longer start one (the spec
//! asks receivers to abort as early as possible). It never reads past the
//! header, so the caller can peek, parse, then consume exactly `len` bytes and
//! leave the client's own bytes in the socket.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line the spec allows, CRLF included.
pub const V1_MAX: usize = 107;
/// The fixed part of a v2 header, before its address block and TLVs.
pub const V2_FIXED: usize = 16;
/// The most a v2 header may declare after its fixed part. The spec designs
/// headers to fit one minimal segment (536 bytes), but senders add TLVs
/// (authority up to 255 bytes, unique id up to 128, SSL details with a
/// certificate's CN): 4 KiB in all leaves room for them while a client still
/// can't make us wait for 64 KiB.
pub const V2_MAX_BODY: usize = 4096 - V2_FIXED;
/// The most bytes a header may take, either version: what a receiver must look at.
pub const MAX_HEADER: usize = V2_FIXED + V2_MAX_BODY;

const V1_PREFIX: &[u8] = b"PROXY ";
const V4_BLOCK: usize = 12;
const V6_BLOCK: usize = 36;
const UNIX_BLOCK: usize = 216;

/// Which header a backend gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The text line.
    V1,
    /// The binary header.
    V2,
}

/// Where a connection really comes from, as a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Relayed for a client: its address and the address it connected to.
    Proxied {
        /// The client.
        source: SocketAddr,
        /// What the client connected to.
        destination: SocketAddr,
    },
    /// v2 `LOCAL`, v1 `UNKNOWN`, or a family we don't relay (UNSPEC, UDP,
    /// UNIX): the connection's own endpoints stand.
    Local,
}

/// What a prefix of a client's first bytes amounts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header may still follow: wait for more bytes.
    Incomplete,
    /// A complete header of `len` bytes.
    Header {
        /// Bytes the header takes; the client's own data starts after them.
        len: usize,
        /// What it says.
        origin: Origin,
    },
}

/// Why bytes are not a PROXY header; `Display` gives the reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Neither `PROXY ` nor the v2 signature.
    Signature,
    /// v2 with a version other than 2 or a command other than LOCAL or PROXY.
    VersionCommand(u8),
    /// v2 with an undefined family or transport.
    Family(u8),
    /// v2 whose declared length can't hold its addresses.
    ShortAddresses {
        /// The family/transport byte.
        family: u8,
        /// The declared length.
        len: usize,
    },
    /// v2 declaring more than `V2_MAX_BODY` bytes.
    TooLong(usize),
    /// A v2 TLV running past the end of the header.
    Tlv {
        /// Its offset within the header.
        at: usize,
    },
    /// No CRLF within the first 107 bytes of a v1 line.
    NoCrlf,
    /// A v1 line that breaks the grammar: what is wrong.
    Line(&'static str),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Signature => f.write_str("not a PROXY protocol header (bad signature)"),
            HeaderError::VersionCommand(b) => write!(f, "v2 header with bad version/command byte 0x{b:02x}"),
            HeaderError::Family(b) => write!(f, "v2 header with bad family/transport byte 0x{b:02x}"),
            HeaderError::ShortAddresses { family, len } => {
                write!(f, "v2 header length {len} too short for family 0x{family:02x}")
            }
            HeaderError::TooLong(len) => write!(f, "v2 header length {len} over the limit of {V2_MAX_BODY}"),
            HeaderError::Tlv { at } => write!(f, "v2 header with a truncated TLV at byte {at}"),
            HeaderError::NoCrlf => write!(f, "v1 header without CRLF in its first {V1_MAX} bytes"),
            HeaderError::Line(why) => write!(f, "malformed v1 header: {why}"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Parses the start of a connection: see the module doc.
pub fn parse(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    match bytes.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'\r') => parse_v2(bytes),
        Some(_) => parse_v1(bytes),
    }
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    let sig = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..sig] != V2_SIGNATURE[..sig] {
        return Err(HeaderError::Signature);
    }
    if let Some(&ver_cmd) = bytes.get(12) {
        if ver_cmd != 0x20 && ver_cmd != 0x21 {
            return Err(HeaderError::VersionCommand(ver_cmd));
        }
    }
    if let Some(&family) = bytes.get(13) {
        if !matches!(family, 0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32) {
            return Err(HeaderError::Family(family));
        }
    }
    if bytes.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    let (ver_cmd, family) = (bytes[12], bytes[13]);
    let body_len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if body_len > V2_MAX_BODY {
        return Err(HeaderError::TooLong(body_len));
    }
    let block = match family >> 4 {
        0x1 => V4_BLOCK,
        0x2 => V6_BLOCK,
        0x3 => UNIX_BLOCK,
        _ => 0,
    };
    // A LOCAL header's block is discarded whole, family included (spec 2.2).
    let local = ver_cmd == 0x20;
    if !local && body_len < block {
        return Err(HeaderError::ShortAddresses { family, len: body_len });
    }
    let len = V2_FIXED + body_len;
    let Some(body) = bytes.get(V2_FIXED..len) else { return Ok(Parsed::Incomplete) };
    if local {
        return Ok(Parsed::Header { len, origin: Origin::Local });
    }
    check_tlvs(&body[block..], V2_FIXED + block)?;
    let origin = match family {
        0x11 => {
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(body[i], body[i + 1], body[i + 2], body[i + 3]));
            let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Origin::Proxied { source: SocketAddr::new(ip(0), port(8)), destination: SocketAddr::new(ip(4), port(10)) }
        }
        0x21 => {
            let ip = |i: usize| {
                let mut octets = [0; 16];
                octets.copy_from_slice(&body[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
            Origin::Proxied { source: SocketAddr::new(ip(0), port(32)), destination: SocketAddr::new(ip(16), port(34)) }
        }
        // UNSPEC, UDP and UNIX: valid, but nothing a TCP relay can use (spec 2.2 says fall back).
        _ => Origin::Local,
    };
    Ok(Parsed::Header { len, origin })
}

/// Checks that the TLVs tile `tlvs` exactly; `offset` is where they start in the header.
fn check_tlvs(tlvs: &[u8], offset: usize) -> Result<(), HeaderError> {
    let mut at = 0;
    while at < tlvs.len() {
        let Some(&[_, hi, lo]) = tlvs.get(at..at + 3) else {
            return Err(HeaderError::Tlv { at: offset + at });
        };
        let next = at + 3 + usize::from(u16::from_be_bytes([hi, lo]));
        if next > tlvs.len() {
            return Err(HeaderError::Tlv { at: offset + at });
        }
        at = next;
    }
    Ok(())
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    let head = bytes.len().min(V1_PREFIX.len());
    if bytes[..head] != V1_PREFIX[..head] {
        return Err(HeaderError::Signature);
    }
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        // Fail early on what no valid line holds: control bytes, or a CR or LF alone.
        let lone = window.iter().enumerate().any(|(i, &b)| {
            (b == b'\r' && i + 1 < window.len()) || b == b'\n' || !(b == b'\r' || (0x20..0x7f).contains(&b))
        });
        if lone {
            return Err(HeaderError::Line("stray control character"));
        }
        let word = &window[window.len().min(V1_PREFIX.len())..];
        let word = &word[..word.len().min(8)];
        if ![&b"TCP4 "[..], b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r"]
            .iter()
            .any(|w| w.starts_with(word) || word.starts_with(w))
        {
            return Err(HeaderError::Line("protocol must be TCP4, TCP6 or UNKNOWN"));
        }
        return if bytes.len() >= V1_MAX { Err(HeaderError::NoCrlf) } else { Ok(Parsed::Incomplete) };
    };
    let line = &bytes[V1_PREFIX.len()..end];
    if line.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
        return Err(HeaderError::Line("stray control character"));
    }
    let len = end + 2;
    // ASCII was checked just above, so this never fails.
    let line = std::str::from_utf8(line).map_err(|_| HeaderError::Line("not ASCII"))?;
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(Parsed::Header { len, origin: Origin::Local });
    }
    let mut fields = line.split(' ');
    let proto = fields.next().unwrap_or("");
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(HeaderError::Line("protocol must be TCP4, TCP6 or UNKNOWN")),
    };
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(HeaderError::Line("expected exactly: protocol, two addresses, two ports, one space apart"));
    };
    let ip = |text: &str| if v6 { v6_address(text) } else { v4_address(text) };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Parsed::Header { len, origin: Origin::Proxied { source, destination } })
}

/// A decimal number without heading zeroes, at most `max`.
fn decimal(text: &str, max: u32) -> Option<u32> {
    let digits_only = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok().filter(|&n| n <= max)
}

fn port(text: &str) -> Result<u16, HeaderError> {
    decimal(text, 65535)
        .and_then(|n| u16::try_from(n).ok())
        .ok_or(HeaderError::Line("port must be 0 to 65535 in decimal without heading zeroes"))
}

fn v4_address(text: &str) -> Result<IpAddr, HeaderError> {
    let bad = HeaderError::Line("TCP4 address must be 4 numbers 0 to 255 without heading zeroes");
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let n = parts.next().and_then(|p| decimal(p, 255)).ok_or(bad.clone())?;
        *octet = u8::try_from(n).map_err(|_| bad.clone())?;
    }
    if parts.next().is_some() {
        return Err(bad);
    }
    Ok(IpAddr::V4(Ipv4Addr::from(octets)))
}

fn v6_address(text: &str) -> Result<IpAddr, HeaderError> {
    // Hex groups and colons (dots for an embedded IPv4 tail, as inet_pton takes); no zone ids.
    let allowed = text.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    match text.parse::<Ipv6Addr>() {
        Ok(ip) if allowed => Ok(IpAddr::V6(ip)),
        _ => Err(HeaderError::Line("TCP6 address must be an IPv6 address")),
    }
}

/// Both addresses in one family: a v4-mapped IPv6 address becomes IPv4 when the
/// other is IPv4 or mapped too (a dual-stack listener's IPv4 client); `None`
/// when the families still differ.
fn same_family(source: SocketAddr, destination: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => Some(SocketAddr::new(IpAddr::V4(ip), a.port())),
        IpAddr::V6(ip) => ip.to_ipv4_mapped().map(|ip| SocketAddr::new(IpAddr::V4(ip), a.port())),
    };
    match (v4(source), v4(destination)) {
        (Some(s), Some(d)) => Some((s, d)),
        _ if source.is_ipv6() && destination.is_ipv6() => Some((source, destination)),
        _ => None,
    }
}

/// The header a backend gets for a client at `source` that connected to `destination`.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    match version {
        Version::V1 => v1(source, destination),
        Version::V2 => v2(source, destination),
    }
}

/// A v1 line; `PROXY UNKNOWN` when the two addresses are of different families.
pub fn v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let line = match same_family(source, destination) {
        Some((s, d)) => {
            let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {proto} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port())
        }
        None => "PROXY UNKNOWN\r\n".to_string(),
    };
    line.into_bytes()
}

/// A v2 PROXY header; with addresses of different families, PROXY over UNSPEC
/// (the receiver then uses the connection's own endpoints).
pub fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED + V6_BLOCK);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match same_family(source, destination) {
        Some((s, d)) => {
            let (family, block) = if s.is_ipv4() { (0x11, V4_BLOCK) } else { (0x21, V6_BLOCK) };
            out.push(family);
            out.extend_from_slice(&(block as u16).to_be_bytes());
            for ip in [s.ip(), d.ip()] {
                match ip {
                    IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
                    IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
                }
            }
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        None => out.extend_from_slice(&[0x00, 0, 0]),
    }
    out
}

/// A header that names no addresses (a unix client has none to carry): v1
/// `UNKNOWN`, v2 `LOCAL`; the receiver uses the connection's own, as the spec says.
pub fn unknown(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => v2_local(),
    }
}

/// A v2 LOCAL header: a connection of the proxy's own, such as a health check.
pub fn v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

#[cfg(test)]
mod tests;
