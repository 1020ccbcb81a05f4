//! What a running shuttle hands to the process that upgrades it (reference
//! §3.7): the manifest, and the framing of the messages that carry it and
//! the sockets. Pure data; the sockets travel in `runtime::passfd`.
//!
//! The old process sends the manifest as `M` messages (JSON in pieces), the
//! descriptors as `F` messages, then `E`. The new one builds its loops on
//! them, accepting nothing yet, and answers `R` (ready), or `X` and why it
//! cannot. Then the old one stops accepting and sends its counters as they
//! are at that moment (`C` messages), then `G`: only then does the new one
//! serve. If the old one calls it off instead (it began shutting down), the
//! new one sees the end of the socket and exits, having served nothing. The
//! descriptors come in the manifest's order: every service's sockets (one per
//! worker), the admin listener, the state file's lock.
//!
//! The config travels in the manifest, not through the state file: the old
//! process sends it only when no change is in flight and takes none until
//! the hand-over ends, so it is the config the state file holds, and the new
//! process can never start from an older one.

use serde::{Deserialize, Serialize};

pub use crate::runtime::listen::SocketKind;

/// The manifest's format; a process refuses one it does not know.
pub const VERSION: u32 = 1;

/// Message kinds, the first byte of each message.
pub mod kind {
    /// A piece of the manifest's JSON.
    pub const MANIFEST: u8 = b'M';
    /// Descriptors, in the manifest's order.
    pub const FDS: u8 = b'F';
    /// Everything was sent.
    pub const END: u8 = b'E';
    /// The new process is ready to serve.
    pub const READY: u8 = b'R';
    /// A piece of the counters' JSON.
    pub const COUNTERS: u8 = b'C';
    /// The old process has stopped accepting: serve.
    pub const GO: u8 = b'G';
    /// The new process gives up; the rest of the message says why.
    pub const FAILED: u8 = b'X';
}

/// Everything but the descriptors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`VERSION`].
    pub version: u32,
    /// The old process.
    pub pid: u32,
    /// Its worker loops: the new process runs as many (each service has one socket per worker).
    pub workers: usize,
    /// The running config, as the state file would hold it now (in the form of
    /// the file last read, with its global options).
    pub config: String,
    /// The file a SIGHUP reloads: the one the old process started from.
    pub source: Option<String>,
    /// Each service's sockets.
    pub sockets: Vec<ServiceSockets>,
    /// The admin listener.
    pub admin: AdminSocket,
    /// Whether the state file's lock follows the admin listener.
    pub state_lock: bool,
    /// Every checked backend's health.
    pub health: Vec<BackendHealth>,
    /// The admin token, which the new process may no longer be allowed to read (`-user`).
    pub token: Option<String>,
}

/// A service's sockets: `count` descriptors of one `kind`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceSockets {
    /// The service's name.
    pub service: String,
    /// What they are.
    pub kind: SocketKind,
    /// How many (one per worker).
    pub count: usize,
    /// For a unix socket: the file it is bound at, which the new process removes when it is done.
    pub file: Option<FileId>,
}

/// A unix socket file, by path and by identity (so it is removed only while it is still the one bound).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileId {
    /// Where it is.
    pub path: String,
    /// Its device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
}

/// The admin listener: TCP, or a unix socket and its file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdminSocket {
    /// For a unix socket, its file; `None` for TCP.
    pub file: Option<FileId>,
}

/// One backend's health.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendHealth {
    /// Its service.
    pub service: String,
    /// Its name.
    pub backend: String,
    /// Whether it is up.
    pub up: bool,
}

/// A service's counters and its backends', as the stats show them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceCounters {
    /// The service.
    pub service: String,
    /// Its `errors`.
    pub errors: u64,
    /// Clients closed without a backend.
    pub no_backend: u64,
    /// Clients closed for a bad PROXY header.
    pub proxy_header_errors: u64,
    /// UDP datagrams dropped: no backend, the flow limit, a failed send.
    pub dropped: [u64; 3],
    /// Each backend's.
    pub backends: Vec<BackendCounters>,
}

/// A backend's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendCounters {
    /// The backend.
    pub backend: String,
    /// Bytes client → backend, and backend → client.
    pub bytes: [u64; 2],
    /// UDP datagrams client → backend, and backend → client.
    pub datagrams: [u64; 2],
    /// `errors`, and the failed connects among them.
    pub errors: [u64; 2],
    /// Connections established.
    pub connections: u64,
    /// Health checks passed, and failed.
    pub checks: [u64; 2],
}

/// Why a manifest cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// Not JSON of this shape.
    Malformed(String),
    /// Another format version.
    Version(u32),
    /// The descriptors do not match the manifest.
    Fds {
        /// How many the manifest names.
        expected: usize,
        /// How many came.
        got: usize,
    },
    /// A service's socket count is not the worker count.
    Count(String),
    /// Two services of one name.
    Duplicate(String),
    /// More workers than shuttle runs.
    Workers(usize),
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestError::Malformed(e) => write!(f, "the hand-over manifest is malformed: {e}"),
            ManifestError::Version(v) => {
                write!(f, "the running shuttle hands over format {v}; this binary reads format {VERSION}")
            }
            ManifestError::Fds { expected, got } => {
                write!(f, "the manifest names {expected} sockets, {got} came")
            }
            ManifestError::Count(service) => {
                write!(f, "service {service:?}: the number of its sockets is not the number of workers")
            }
            ManifestError::Duplicate(service) => write!(f, "service {service:?} is handed over twice"),
            ManifestError::Workers(n) => write!(f, "{n} workers: more than shuttle runs"),
        }
    }
}

impl Manifest {
    /// How many descriptors follow it (`None` past any real count).
    pub fn fds(&self) -> Option<usize> {
        let sockets = self.sockets.iter().try_fold(0usize, |n, s| n.checked_add(s.count))?;
        sockets.checked_add(1 + usize::from(self.state_lock))
    }

    /// The manifest as its `M` messages of at most `each` bytes.
    pub fn to_messages(&self, each: usize) -> serde_json::Result<Vec<Vec<u8>>> {
        Ok(pieces(kind::MANIFEST, &serde_json::to_vec(self)?, each))
    }

    /// Reads the manifest from its JSON and checks it against `fds` received descriptors.
    pub fn parse(json: &[u8], fds: usize) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned = serde_json::from_slice(json).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if versioned.version != VERSION {
            return Err(ManifestError::Version(versioned.version));
        }
        let manifest: Manifest = serde_json::from_slice(json).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if manifest.workers > crate::model::options::MAX_WORKERS {
            return Err(ManifestError::Workers(manifest.workers));
        }
        if let Some(bad) = manifest.sockets.iter().find(|s| s.count != manifest.workers.max(1)) {
            return Err(ManifestError::Count(bad.service.clone()));
        }
        let expected = manifest.fds().unwrap_or(usize::MAX);
        if expected != fds {
            return Err(ManifestError::Fds { expected, got: fds });
        }
        let mut names = std::collections::HashSet::new();
        if let Some(twice) = manifest.sockets.iter().find(|s| !names.insert(s.service.as_str())) {
            return Err(ManifestError::Duplicate(twice.service.clone()));
        }
        Ok(manifest)
    }
}

/// The counters as their `C` messages of at most `each` bytes.
pub fn counters_to_messages(counters: &[ServiceCounters], each: usize) -> serde_json::Result<Vec<Vec<u8>>> {
    Ok(pieces(kind::COUNTERS, &serde_json::to_vec(counters)?, each))
}

/// Reads the counters from their JSON.
pub fn parse_counters(json: &[u8]) -> Result<Vec<ServiceCounters>, ManifestError> {
    serde_json::from_slice(json).map_err(|e| ManifestError::Malformed(e.to_string()))
}

/// `json` cut into messages of at most `each` bytes, each led by `kind`.
fn pieces(kind: u8, json: &[u8], each: usize) -> Vec<Vec<u8>> {
    json.chunks(each.max(2) - 1)
        .map(|piece| {
            let mut message = Vec::with_capacity(piece.len() + 1);
            message.push(kind);
            message.extend_from_slice(piece);
            message
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: VERSION,
            pid: 42,
            workers: 2,
            config: "[]\n".into(),
            source: Some("/etc/shuttle.json".into()),
            sockets: vec![ServiceSockets { service: "web".into(), kind: SocketKind::Tcp, count: 2, file: None }],
            admin: AdminSocket { file: None },
            state_lock: true,
            health: vec![BackendHealth { service: "web".into(), backend: "a".into(), up: false }],
            token: Some("s3cret".into()),
        }
    }

    #[test]
    fn the_manifest_survives_its_pieces() {
        let m = manifest();
        let messages = m.to_messages(16).unwrap();
        assert!(messages.len() > 5 && messages.iter().all(|p| p.len() <= 16 && p[0] == kind::MANIFEST));
        let json: Vec<u8> = messages.iter().flat_map(|p| p[1..].to_vec()).collect();
        assert_eq!(Manifest::parse(&json, 4), Ok(m));
        let counters = vec![ServiceCounters {
            service: "web".into(),
            errors: 3,
            backends: vec![BackendCounters { backend: "a".into(), bytes: [10, 20], ..Default::default() }],
            ..Default::default()
        }];
        let messages = counters_to_messages(&counters, 16).unwrap();
        assert!(messages.iter().all(|p| p.len() <= 16 && p[0] == kind::COUNTERS));
        let json: Vec<u8> = messages.iter().flat_map(|p| p[1..].to_vec()).collect();
        assert_eq!(parse_counters(&json), Ok(counters));
    }

    #[test]
    fn a_manifest_that_does_not_match_its_descriptors_or_format_is_refused() {
        let json = serde_json::to_vec(&manifest()).unwrap();
        assert_eq!(Manifest::parse(&json, 3), Err(ManifestError::Fds { expected: 4, got: 3 }));
        let mut other = manifest();
        other.version = 9;
        let json = serde_json::to_vec(&other).unwrap();
        assert_eq!(Manifest::parse(&json, 4), Err(ManifestError::Version(9)));
        let mut short = manifest();
        short.sockets[0].count = 1;
        let json = serde_json::to_vec(&short).unwrap();
        assert_eq!(Manifest::parse(&json, 3), Err(ManifestError::Count("web".into())));
        assert!(matches!(Manifest::parse(b"{\"version\":1}", 0), Err(ManifestError::Malformed(_))));
        let mut twice = manifest();
        twice.sockets.push(twice.sockets[0].clone());
        let json = serde_json::to_vec(&twice).unwrap();
        assert_eq!(Manifest::parse(&json, 6), Err(ManifestError::Duplicate("web".into())));
        let mut huge = manifest();
        huge.workers = usize::MAX;
        huge.sockets[0].count = usize::MAX;
        huge.sockets.push(huge.sockets[0].clone());
        let json = serde_json::to_vec(&huge).unwrap();
        assert_eq!(Manifest::parse(&json, 4), Err(ManifestError::Workers(usize::MAX)));
        huge.workers = 2;
        let json = serde_json::to_vec(&huge).unwrap();
        assert_eq!(Manifest::parse(&json, 4), Err(ManifestError::Count("web".into())));
        assert!(matches!(Manifest::parse(b"\xff", 0), Err(ManifestError::Malformed(_))));
    }
}
