//! The access log's record of one finished connection, and its two line
//! formats. Lines are written straight into the loop's batch buffer, so a
//! finished connection costs no allocation once the buffer has grown.

use crate::model::endpoint::{ClientAddr, Endpoint};
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use crate::runtime::utc;

/// How a connection ended, as the access log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished, the client's first.
    ClientClosed,
    /// Both directions finished, the backend's first.
    BackendClosed,
    /// The client sent nothing for longer than `client_timeout`.
    ClientTimeout,
    /// The backend sent nothing for longer than `server_timeout`.
    ServerTimeout,
    /// The client reset the connection.
    ClientReset,
    /// The backend reset the connection.
    BackendReset,
    /// The client's socket failed otherwise.
    ClientError,
    /// The backend's socket failed otherwise.
    BackendError,
    /// No backend was available: none up, or none at all.
    NoBackend,
    /// Every backend tried refused or timed out.
    ConnectFailed,
    /// Shuttle ran short of descriptors, ports or memory.
    LocalError,
    /// Cut when shuttle stopped before it finished.
    Shutdown,
    /// Waited in the service's queue for longer than `queue_timeout`; never connected.
    QueueTimeout,
    /// An `accept_proxy` client's PROXY header was missing, malformed, slow or too long.
    ProxyHeader,
    /// Cut because its backend was marked down (`on_backend_down: close`).
    BackendDown,
    /// Cut because its backend was removed with `?close`.
    BackendRemoved,
    /// Cut because its service was removed with `?close`.
    ServiceRemoved,
    /// Cut at the service's `max_connection_duration`.
    MaxDuration,
    /// A UDP flow that saw no datagram either way for `udp_idle_timeout`.
    IdleTimeout,
    /// A UDP flow that carried its `udp_max_responses` replies.
    MaxResponses,
    /// A UDP flow whose service socket closed: the service moved or was removed.
    SocketClosed,
}

impl End {
    /// The word the log shows.
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::BackendClosed => "backend_closed",
            End::ClientTimeout => "client_timeout",
            End::ServerTimeout => "server_timeout",
            End::ClientReset => "client_reset",
            End::BackendReset => "backend_reset",
            End::ClientError => "client_error",
            End::BackendError => "backend_error",
            End::NoBackend => "no_backend",
            End::ConnectFailed => "connect_failed",
            End::LocalError => "local_error",
            End::Shutdown => "shutdown",
            End::QueueTimeout => "queue_timeout",
            End::ProxyHeader => "proxy_header_error",
            End::BackendDown => "backend_down",
            End::BackendRemoved => "backend_removed",
            End::ServiceRemoved => "service_removed",
            End::MaxDuration => "max_duration",
            End::IdleTimeout => "idle_timeout",
            End::MaxResponses => "max_responses",
            End::SocketClosed => "socket_closed",
        }
    }
}

/// The two formats of `-access-log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `key=value` fields separated by spaces.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// One finished connection.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// When it ended.
    pub at: SystemTime,
    /// Its service.
    pub service: &'a str,
    /// The client's address (`unix:` for a unix socket's client).
    pub client: ClientAddr,
    /// The backend it was given last (name and address); `None` when it got none.
    pub backend: Option<(&'a str, &'a Endpoint)>,
    /// How long the backend connect took, once one succeeded.
    pub connect: Option<Duration>,
    /// How long it waited in the service's queue for a backend slot (a part of `duration`).
    pub queued: Duration,
    /// From accept to close.
    pub duration: Duration,
    /// Bytes client → backend.
    pub sent: u64,
    /// Bytes backend → client.
    pub received: u64,
    /// Connects that failed before (failovers).
    pub failed_connects: u16,
    /// How it ended.
    pub end: End,
}

impl Finished<'_> {
    /// Appends the line, newline included.
    pub fn write(&self, format: Format, out: &mut Vec<u8>) -> io::Result<()> {
        match format {
            Format::Text => self.write_text(out),
            Format::Json => self.write_json(out),
        }
    }

    fn write_text(&self, out: &mut Vec<u8>) -> io::Result<()> {
        utc::write_rfc3339_millis(out, self.at)?;
        // Names are `[A-Za-z0-9][A-Za-z0-9._-]*` (reference §2): nothing to quote.
        write!(out, " service={} client={}", self.service, self.client)?;
        match self.backend {
            Some((name, addr)) => {
                write!(out, " backend={name} backend_address=")?;
                write_word(out, &addr.to_string())?;
            }
            None => out.extend_from_slice(b" backend=- backend_address=-"),
        }
        match self.connect {
            Some(d) => write!(out, " connect_ms={}", millis(d))?,
            None => out.extend_from_slice(b" connect_ms=-"),
        }
        writeln!(
            out,
            " queue_ms={} duration_ms={} sent={} received={} failed_connects={} end={}",
            millis(self.queued),
            millis(self.duration),
            self.sent,
            self.received,
            self.failed_connects,
            self.end.as_str()
        )
    }

    fn write_json(&self, out: &mut Vec<u8>) -> io::Result<()> {
        out.extend_from_slice(b"{\"time\":\"");
        utc::write_rfc3339_millis(out, self.at)?;
        out.extend_from_slice(b"\",\"service\":");
        serde_json::to_writer(&mut *out, self.service)?;
        write!(out, ",\"client\":\"{}\",\"backend\":", self.client)?;
        match self.backend {
            Some((name, addr)) => {
                serde_json::to_writer(&mut *out, name)?;
                out.extend_from_slice(b",\"backend_address\":");
                serde_json::to_writer(&mut *out, &addr.to_string())?;
            }
            None => out.extend_from_slice(b"null,\"backend_address\":null"),
        }
        match self.connect {
            Some(d) => write!(out, ",\"connect_ms\":{}", millis(d))?,
            None => out.extend_from_slice(b",\"connect_ms\":null"),
        }
        writeln!(
            out,
            ",\"queue_ms\":{},\"duration_ms\":{},\"sent\":{},\"received\":{},\"failed_connects\":{},\"end\":\"{}\"}}",
            millis(self.queued),
            millis(self.duration),
            self.sent,
            self.received,
            self.failed_connects,
            self.end.as_str()
        )
    }
}

/// Milliseconds with three decimals: sub-millisecond connects are the common case on a LAN.
fn millis(d: Duration) -> Millis {
    Millis(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

struct Millis(u64);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// Writes a text-format value: as it is when it has no space, quote or
/// control byte (every IP address), else as a JSON string (a unix path may hold any).
fn write_word(out: &mut Vec<u8>, word: &str) -> io::Result<()> {
    if word.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
        out.extend_from_slice(word.as_bytes());
        Ok(())
    } else {
        serde_json::to_writer(&mut *out, word).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn inet(text: &str) -> &'static Endpoint {
        Box::leak(Box::new(Endpoint::Inet(text.parse().unwrap())))
    }

    fn finished(backend: Option<(&'static str, &'static Endpoint)>, end: End) -> Finished<'static> {
        Finished {
            at: UNIX_EPOCH + Duration::from_millis(1_796_285_811_279),
            service: "web",
            client: ClientAddr::Inet("127.0.0.1:5555".parse().unwrap()),
            backend,
            connect: backend.map(|_| Duration::from_micros(1_250)),
            queued: Duration::from_micros(500),
            duration: Duration::from_millis(25),
            sent: 100,
            received: 2_000,
            failed_connects: 1,
            end,
        }
    }

    fn line(f: &Finished<'_>, format: Format) -> String {
        let mut out = Vec::new();
        f.write(format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_text_line_has_every_field() {
        let f = finished(Some(("b1", inet("127.0.0.1:8080"))), End::ClientClosed);
        assert_eq!(
            line(&f, Format::Text),
            "2026-12-03T08:16:51.279Z service=web client=127.0.0.1:5555 backend=b1 backend_address=127.0.0.1:8080 \
             connect_ms=1.250 queue_ms=0.500 duration_ms=25.000 sent=100 received=2000 failed_connects=1 end=client_closed\n"
        );
    }

    #[test]
    fn a_json_line_parses_and_shows_no_backend_as_null() {
        let f = finished(None, End::NoBackend);
        let text = line(&f, Format::Json);
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["time"], "2026-12-03T08:16:51.279Z");
        assert_eq!(v["backend"], serde_json::Value::Null);
        assert_eq!(v["connect_ms"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"], 25.0);
        assert_eq!(v["queue_ms"], 0.5);
        assert_eq!(v["end"], "no_backend");
        assert_eq!(v["received"], 2000);
    }

    #[test]
    fn an_ipv6_client_is_quoted_whole() {
        let mut f = finished(None, End::ConnectFailed);
        f.client = ClientAddr::Inet("[::1]:80".parse().unwrap());
        let v: serde_json::Value = serde_json::from_str(&line(&f, Format::Json)).unwrap();
        assert_eq!(v["client"], "[::1]:80");
        assert!(line(&f, Format::Text).contains(" client=[::1]:80 backend=- "));
    }

    #[test]
    fn a_unix_client_and_a_unix_backend_path_with_a_space_keep_both_formats_parseable() {
        let path: &'static Endpoint =
            Box::leak(Box::new(Endpoint::Unix(crate::model::endpoint::UnixPath::new("/run/my app/\"b\".sock"))));
        let mut f = finished(Some(("b1", path)), End::BackendClosed);
        f.client = ClientAddr::Unix;
        let text = line(&f, Format::Text);
        assert!(text.contains(r#" client=unix: backend=b1 backend_address="unix:/run/my app/\"b\".sock" "#), "{text}");
        let v: serde_json::Value = serde_json::from_str(&line(&f, Format::Json)).unwrap();
        assert_eq!(v["backend_address"], "unix:/run/my app/\"b\".sock");
        assert_eq!(v["client"], "unix:");
    }
}
