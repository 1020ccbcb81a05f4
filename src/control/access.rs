//! Who may use the admin API. curl and scripts may; a web page a browser
//! happens to be showing may not, although the browser can reach 127.0.0.1:
//!
//! - Cross-site requests: browsers mark what a page sends with `Origin` (and
//!   `Sec-Fetch-Site`); curl sends neither. A request carrying `Origin`, or a
//!   `Sec-Fetch-Site` other than `none`/`same-origin`, is refused (403), so a
//!   page's `POST` with `Content-Type: text/plain` changes nothing.
//! - DNS rebinding: a page can make its own host name resolve to 127.0.0.1
//!   and then read the API "same-origin". Its requests still carry that name
//!   in `Host`, so over TCP only IP literals, `localhost` and names given with
//!   `-admin-host` are served (403 otherwise). Unix sockets are out of a
//!   browser's reach and skip this check.
//! - With `-admin-token-file`, every request needs `Authorization: Bearer
//!   <token>`, compared in constant time (401 otherwise).

use std::net::IpAddr;

use crate::control::http::Caller;

/// What the admin API lets in.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Extra host names accepted in `Host`, lower-cased, without a trailing dot.
    hosts: Vec<String>,
    /// The bearer token every request must carry, if one was configured.
    token: Option<Vec<u8>>,
    /// Whether the API listens on a unix socket (no `Host` check).
    unix: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 403: sent by a web page (`Origin`, `Sec-Fetch-Site`).
    CrossSite(String),
    /// 403: `Host` names a host this API is not known by.
    Host(String),
    /// 401: no token, or the wrong one.
    Token(&'static str),
}

impl Refusal {
    /// The status that answers it.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::CrossSite(_) | Refusal::Host(_) => 403,
            Refusal::Token(_) => 401,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::CrossSite(why) => write!(f, "cross-site request refused: {why}; the admin API serves no web pages"),
            Refusal::Host(host) => write!(
                f,
                "host {host:?} is not allowed: the admin API answers for IP addresses, localhost and names given with -admin-host"
            ),
            Refusal::Token(why) => write!(f, "{why}: send Authorization: Bearer <token> with the token of -admin-token-file"),
        }
    }
}

impl Access {
    /// The bearer token, if one was configured (an upgrade hands it on).
    pub fn token(&self) -> Option<&[u8]> {
        self.token.as_deref()
    }

    /// The policy for an API with these extra host names and token, on TCP or a unix socket.
    pub fn new(hosts: &[String], token: Option<Vec<u8>>, unix: bool) -> Access {
        let hosts = hosts.iter().map(|h| normal_host(h)).filter(|h| !h.is_empty()).collect();
        Access { hosts, token, unix }
    }

    /// Checks one request's caller fields.
    pub fn check(&self, from: &Caller) -> Result<(), Refusal> {
        if let Some(origin) = &from.origin {
            return Err(Refusal::CrossSite(format!("it carries Origin: {}", clip(origin))));
        }
        if let Some(site) = &from.fetch_site {
            if !site.eq_ignore_ascii_case("none") && !site.eq_ignore_ascii_case("same-origin") {
                return Err(Refusal::CrossSite(format!("it carries Sec-Fetch-Site: {}", clip(site))));
            }
        }
        if !self.unix {
            // No Host at all is an HTTP/1.0 client or a hand-typed request, never a browser.
            if let Some(host) = &from.host {
                if !self.host_allowed(host) {
                    return Err(Refusal::Host(clip(host)));
                }
            }
        }
        if let Some(token) = &self.token {
            let Some(given) = from.authorization.as_deref().and_then(bearer) else {
                return Err(Refusal::Token("missing bearer token"));
            };
            if !constant_time_eq(given.as_bytes(), token) {
                return Err(Refusal::Token("wrong bearer token"));
            }
        }
        Ok(())
    }

    fn host_allowed(&self, value: &str) -> bool {
        let host = host_of(value);
        if host.parse::<IpAddr>().is_ok() {
            return true;
        }
        let host = normal_host(host);
        host == "localhost" || self.hosts.contains(&host)
    }
}

/// The host part of a `Host` value: without its port, IPv6 brackets removed.
fn host_of(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match value.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => value,
    }
}

fn normal_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The credentials of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without stopping at the first difference, so the time taken
/// says nothing about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn clip(s: &str) -> String {
    crate::model::config::one_line(&crate::model::address::clip(s))
}

/// Whether an admin address is reachable only from this host (loopback or a unix socket).
pub fn is_local_only(addr: &std::net::SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(host: Option<&str>) -> Caller {
        Caller { host: host.map(str::to_string), ..Caller::default() }
    }

    #[test]
    fn curl_style_requests_pass() {
        let access = Access::new(&[], None, false);
        for host in [
            None,
            Some("localhost:9090"),
            Some("127.0.0.1:9090"),
            Some("[::1]:9090"),
            Some("LOCALHOST"),
            Some("10.1.2.3"),
        ] {
            assert_eq!(access.check(&caller(host)), Ok(()), "{host:?}");
        }
    }

    #[test]
    fn browser_requests_are_refused() {
        let access = Access::new(&[], None, false);
        let page = Caller { origin: Some("http://evil.example".into()), ..caller(Some("localhost:9090")) };
        assert!(matches!(access.check(&page), Err(Refusal::CrossSite(_))));
        let null = Caller { origin: Some("null".into()), ..Caller::default() };
        assert_eq!(access.check(&null).unwrap_err().status(), 403);
        let fetched = Caller { fetch_site: Some("cross-site".into()), ..Caller::default() };
        assert!(matches!(access.check(&fetched), Err(Refusal::CrossSite(_))));
        let typed = Caller { fetch_site: Some("none".into()), ..Caller::default() };
        assert_eq!(access.check(&typed), Ok(()));
    }

    #[test]
    fn rebound_host_names_are_refused_unless_allowed() {
        let access = Access::new(&["Shuttle.Internal".into()], None, false);
        assert!(matches!(access.check(&caller(Some("evil.example:9090"))), Err(Refusal::Host(_))));
        assert!(matches!(access.check(&caller(Some("localhost.evil.example"))), Err(Refusal::Host(_))));
        assert_eq!(access.check(&caller(Some("shuttle.internal:9090"))), Ok(()));
        assert_eq!(access.check(&caller(Some("shuttle.internal."))), Ok(()));
        let unix = Access::new(&[], None, true);
        assert_eq!(unix.check(&caller(Some("shuttle"))), Ok(()), "curl --unix-socket http://shuttle/ works");
    }

    #[test]
    fn the_token_is_required_and_compared_exactly() {
        let access = Access::new(&[], Some(b"s3cret".to_vec()), false);
        let with = |auth: &str| Caller { authorization: Some(auth.into()), ..Caller::default() };
        assert_eq!(access.check(&Caller::default()).unwrap_err(), Refusal::Token("missing bearer token"));
        assert_eq!(access.check(&with("Bearer s3cre")).unwrap_err(), Refusal::Token("wrong bearer token"));
        assert_eq!(access.check(&with("Basic s3cret")).unwrap_err().status(), 401);
        assert_eq!(access.check(&with("Bearer s3cret")), Ok(()));
        assert_eq!(access.check(&with("bearer  s3cret ")), Ok(()));
    }
}
