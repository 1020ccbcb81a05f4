//! Service and backend configuration: the JSON file format (reference §2), its
//! defaults and validation, and the atomic state-file write (reference §5).
//!
//! Input goes through private `Raw*` types whose values are loose JSON, so a
//! bad value is reported with the service, backend, field and value at fault
//! rather than as serde's "expected u32". Invariant: every `ServiceConfig`
//! returned by `parse_*`/`load` has every default applied and has passed
//! `validate_service` (and, for whole lists, `validate_all`). Host names are
//! kept as written and never resolved here: `runtime::resolver` looks them up
//! when a config is applied, off the loop.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{value::MapAccessDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::model::address::{self, clip, overlaps, Address, Host};
use crate::model::endpoint;
use crate::runtime::files::{self, FileError};

mod file;
mod patch;
pub use file::{parse_file, ConfigFile, Form};
pub use patch::{patch_backend, patch_service};

/// Default seconds between health checks.
pub const DEFAULT_CHECK_INTERVAL: f64 = 2.0;
/// Default consecutive checks for `fall` and `rise`.
pub const DEFAULT_FALL_RISE: u32 = 2;
/// Default seconds allowed for a backend connect or a health check.
pub const DEFAULT_CONNECT_TIMEOUT: f64 = 5.0;
/// Default seconds a queued client waits for a backend slot.
pub const DEFAULT_QUEUE_TIMEOUT: f64 = 5.0;
/// Seconds a UDP flow lives without traffic, unless set.
pub const DEFAULT_UDP_IDLE_TIMEOUT: f64 = 30.0;
/// UDP flows a service holds at once, unless set: each costs a socket and a descriptor.
pub const DEFAULT_MAX_FLOWS: u32 = 10_000;
/// A unix listener's file mode, unless set: its owner and group may connect, nobody else.
pub const DEFAULT_SOCKET_MODE: &str = "0660";
/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Longest service or backend name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Largest accepted number of seconds (about 31 years); keeps `Instant + Duration` from overflowing.
pub const MAX_SECONDS: f64 = 1e9;
/// Smallest non-zero number of seconds: the timer wheel's resolution.
pub const MIN_SECONDS: f64 = 0.001;
/// Longest `check_expect`: a check only looks at the first 4 KiB of the reply (reference §2).
pub const MAX_CHECK_EXPECT: usize = 4096;
const NAME_RULE: &str = r#"letters, digits, ".", "_" and "-", starting with a letter or digit"#;

/// One service: a listener, its balancing settings and its backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique service name, used in admin URLs.
    pub name: String,
    /// Listen address as written (`host:port`).
    pub address: String,
    /// Backends in balancing order; Go's `null` reads as none.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub backends: Vec<BackendConfig>,
    /// Balancing algorithm.
    #[serde(default)]
    pub balance: Balance,
    /// Seconds between health checks; 0 disables them.
    #[serde(default = "default_check_interval", serialize_with = "serialize_seconds")]
    pub check_interval: f64,
    /// Consecutive failed checks before a backend is marked down.
    #[serde(default = "default_fall_rise")]
    pub fall: u32,
    /// Consecutive successful checks before a down backend is marked up.
    #[serde(default = "default_fall_rise")]
    pub rise: u32,
    /// Client-side idle timeout in seconds; 0 means none.
    #[serde(default, serialize_with = "serialize_seconds")]
    pub client_timeout: f64,
    /// Backend-side idle timeout in seconds; 0 means none.
    #[serde(default, serialize_with = "serialize_seconds")]
    pub server_timeout: f64,
    /// Backend connect and health-check deadline in seconds; 0 means the OS's own.
    #[serde(default = "default_connect_timeout", serialize_with = "serialize_seconds")]
    pub connect_timeout: f64,
    /// Bytes a health check sends once connected.
    #[serde(default)]
    pub check_send: String,
    /// Text a health check reply must contain; empty accepts any connect.
    #[serde(default)]
    pub check_expect: String,
    /// Clients proxied or queued at once at most; 0 means no limit. At the limit the listener rests.
    #[serde(default)]
    pub max_connections: u32,
    /// Clients that may wait for a backend slot when every backend is at its limit; 0 closes them instead.
    #[serde(default)]
    pub max_queue: u32,
    /// Seconds a queued client waits at most; 0 means no deadline.
    #[serde(default = "default_queue_timeout", serialize_with = "serialize_seconds")]
    pub queue_timeout: f64,
    /// Whether every client must start with a PROXY protocol header (v1 or v2).
    #[serde(default)]
    pub accept_proxy: bool,
    /// When every backend that could take traffic is down, balance over them all as if up.
    #[serde(default)]
    pub fail_open: bool,
    /// What happens to a backend's open connections when it is marked down.
    #[serde(default)]
    pub on_backend_down: OnBackendDown,
    /// Seconds a connection may last before it is closed; 0 means no limit.
    #[serde(default, serialize_with = "serialize_seconds")]
    pub max_connection_duration: f64,
    /// `"tcp"` streams or `"udp"` datagrams balanced by flow.
    #[serde(default)]
    pub protocol: Protocol,
    /// Seconds a UDP flow lives without traffic either way.
    #[serde(default = "default_udp_idle_timeout", serialize_with = "serialize_seconds")]
    pub udp_idle_timeout: f64,
    /// Replies after which a UDP flow ends (DNS-style exchanges); 0 means no limit.
    #[serde(default)]
    pub udp_max_responses: u32,
    /// UDP flows open at once at most, over every worker; new flows past it are dropped.
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// The mode of a `unix:/path` listener's socket file, in octal (`"0660"`); unused for TCP and UDP.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Name, unique within its service.
    pub name: String,
    /// Address to proxy to (`host:port`).
    pub address: String,
    /// Address for TCP health checks; empty means never checked, always up.
    #[serde(default)]
    pub check_address: String,
    /// Round-robin weight; 0 drains the backend.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Connections open or being opened to it at once at most; 0 means no limit.
    #[serde(default)]
    pub max_connections: u32,
    /// The PROXY protocol header this backend gets before a client's bytes.
    #[serde(default)]
    pub send_proxy: SendProxy,
}

/// A config field spelled as one of a few words in JSON: the enum, its serde
/// names and its `FromStr` (for query strings and PATCH) from one table, so
/// the two spellings can never drift apart.
macro_rules! words {
    (
        $(#[$meta:meta])*
        pub enum $name:ident expecting $expected:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal $(| $alias:literal)? ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $word $(, alias = $alias)?)] $variant, )+
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $( $word $(| $alias)? => Ok($name::$variant), )+
                    other => Err(format!(concat!("must be ", $expected, ", got {:?}"), clip(other))),
                }
            }
        }
    };
}

words! {
    /// Which PROXY protocol header a backend gets: `""` (none), `"v1"` or `"v2"` in JSON.
    pub enum SendProxy expecting r#""" (none), "v1" or "v2""# {
        /// None: the backend sees shuttle's address.
        #[default]
        Off = "",
        /// The text line of version 1.
        V1 = "v1",
        /// The binary header of version 2.
        V2 = "v2",
    }
}

words! {
    /// Balancing algorithm: `"RR"` or `"LC"` in JSON; the Go shuttle's `""` means RR.
    pub enum Balance expecting r#""RR" (round robin) or "LC" (least connected)"# {
        /// Weighted round robin.
        #[default]
        RoundRobin = "RR" | "",
        /// Least connected.
        LeastConn = "LC",
    }
}

words! {
    /// What a backend marked down does to its open connections: `"keep"` or `"close"` in JSON.
    pub enum OnBackendDown expecting r#""keep" or "close""# {
        /// They run on until they close (as before the field existed).
        #[default]
        Keep = "keep",
        /// They are closed: the client gets what was buffered for it, then a FIN.
        Close = "close",
    }
}

words! {
    /// A service's transport: `"tcp"` or `"udp"` in JSON.
    pub enum Protocol expecting r#""tcp" or "udp""# {
        /// Byte streams, one backend connection per client connection.
        #[default]
        Tcp = "tcp",
        /// Datagrams, one backend socket per client address and port (a flow).
        Udp = "udp",
    }
}

/// Why a config was rejected; `Display` gives one lower-case line.
#[derive(Debug)]
pub enum ConfigError {
    /// Not JSON, or not the expected shape (unknown field, wrong container).
    Json {
        /// 1-based line of the error.
        line: usize,
        /// Column of the error (0 when the input ended).
        column: usize,
        /// What is wrong, without the position.
        message: String,
    },
    /// A value breaks a rule of reference §2.
    Invalid {
        /// Service name, or `#N` for the Nth service when it has no name.
        service: String,
        /// Backend name (or `#N`) when the fault is in a backend.
        backend: Option<String>,
        /// Field at fault.
        field: String,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// A global option of an object file breaks its rule (reference §2.1).
    Global {
        /// Its key: `grace`, `admin.mode`.
        key: &'static str,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// The file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `{:?}` quotes names and escapes control characters: messages stay on one line.
        let label = |f: &mut fmt::Formatter<'_>, kind: &str, name: &str| {
            if name.starts_with('#') {
                write!(f, "{kind} {name}: ")
            } else {
                write!(f, "{kind} {:?}: ", clip(name))
            }
        };
        match self {
            ConfigError::Json { line, column, message } => write!(f, "line {line}, column {column}: {message}"),
            ConfigError::Invalid { service, backend, field, problem } => {
                label(f, "service", service)?;
                if let Some(backend) = backend {
                    label(f, "backend", backend)?;
                }
                write!(f, "{field}: {problem}")
            }
            ConfigError::Global { key, problem } => write!(f, "{key}: {problem}"),
            ConfigError::Io { path, source } => write!(f, "cannot read {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl ServiceConfig {
    /// A service with no backends and every default.
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> Self {
        ServiceConfig {
            name: name.into(),
            address: address.into(),
            backends: Vec::new(),
            balance: Balance::default(),
            check_interval: DEFAULT_CHECK_INTERVAL,
            fall: DEFAULT_FALL_RISE,
            rise: DEFAULT_FALL_RISE,
            client_timeout: 0.0,
            server_timeout: 0.0,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            check_send: String::new(),
            check_expect: String::new(),
            max_connections: 0,
            max_queue: 0,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            accept_proxy: false,
            fail_open: false,
            on_backend_down: OnBackendDown::Keep,
            max_connection_duration: 0.0,
            protocol: Protocol::Tcp,
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            udp_max_responses: 0,
            max_flows: DEFAULT_MAX_FLOWS,
            socket_mode: DEFAULT_SOCKET_MODE.to_string(),
        }
    }

    /// True when every field but `backends` is equal (reference §5, backends-only update).
    pub fn settings_equal(&self, other: &ServiceConfig) -> bool {
        // Struct update syntax, so that a field added later is compared too.
        let strip = |s: &ServiceConfig| ServiceConfig { backends: Vec::new(), ..s.clone() };
        strip(self) == strip(other)
    }
}

impl BackendConfig {
    /// A backend with no health check and weight 1.
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> Self {
        BackendConfig {
            name: name.into(),
            address: address.into(),
            check_address: String::new(),
            weight: DEFAULT_WEIGHT,
            max_connections: 0,
            send_proxy: SendProxy::Off,
        }
    }

    /// True when only `max_connections` differs: the backend keeps its state
    /// (its `active` count must go on counting the connections it has).
    pub fn same_but_limit(&self, other: &BackendConfig) -> bool {
        // Struct update syntax, so that a field added later is compared too.
        let strip = |b: &BackendConfig| BackendConfig { max_connections: 0, ..b.clone() };
        strip(self) == strip(other)
    }
}

fn default_check_interval() -> f64 {
    DEFAULT_CHECK_INTERVAL
}
fn default_fall_rise() -> u32 {
    DEFAULT_FALL_RISE
}
fn default_connect_timeout() -> f64 {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_queue_timeout() -> f64 {
    DEFAULT_QUEUE_TIMEOUT
}
fn default_udp_idle_timeout() -> f64 {
    DEFAULT_UDP_IDLE_TIMEOUT
}
fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}
fn default_socket_mode() -> String {
    DEFAULT_SOCKET_MODE.to_string()
}

/// The permission bits of a `socket_mode` ("660", "0660"), or why it is not one.
pub fn socket_mode_bits(mode: &str) -> Result<u32, String> {
    let digits = mode.strip_prefix('0').filter(|d| d.len() == 3).unwrap_or(mode);
    if digits.len() != 3 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!("must be permission bits in octal, like \"0660\", got {:?}", clip(mode)));
    }
    u32::from_str_radix(digits, 8).map_err(|e| e.to_string())
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BackendConfig>, D::Error> {
    Ok(Option::<Vec<BackendConfig>>::deserialize(d)?.unwrap_or_default())
}

fn serialize_seconds<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    // `2`, not `2.0`: written files look like the Go shuttle's and read back identically.
    if value.fract() == 0.0 && value.abs() < 1e15 {
        s.serialize_i64(*value as i64)
    } else {
        s.serialize_f64(*value)
    }
}

/// A config's seconds as a `Duration`: `None` for 0 (no timeout), clamped to `MAX_SECONDS`.
pub fn seconds(value: f64) -> Option<Duration> {
    // `value > 0.0` is false for NaN; the clamp keeps `from_secs_f64` from panicking.
    (value > 0.0).then(|| Duration::from_secs_f64(value.min(MAX_SECONDS)))
}

/// Deserializes `T` from a JSON object only: serde's derive would also take a positional list.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Only<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Only(PhantomData)).map(Object)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Value>,
    address: Option<Value>,
    backends: Option<Vec<Object<RawBackend>>>,
    balance: Option<Value>,
    check_interval: Option<Value>,
    fall: Option<Value>,
    rise: Option<Value>,
    client_timeout: Option<Value>,
    server_timeout: Option<Value>,
    connect_timeout: Option<Value>,
    check_send: Option<Value>,
    check_expect: Option<Value>,
    max_connections: Option<Value>,
    max_queue: Option<Value>,
    queue_timeout: Option<Value>,
    accept_proxy: Option<Value>,
    fail_open: Option<Value>,
    on_backend_down: Option<Value>,
    max_connection_duration: Option<Value>,
    protocol: Option<Value>,
    udp_idle_timeout: Option<Value>,
    udp_max_responses: Option<Value>,
    max_flows: Option<Value>,
    socket_mode: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<Value>,
    address: Option<Value>,
    check_address: Option<Value>,
    weight: Option<Value>,
    max_connections: Option<Value>,
    send_proxy: Option<Value>,
}

/// Where a problem is: builds `ConfigError::Invalid`.
struct At<'a>(&'a str, Option<&'a str>);

impl At<'_> {
    fn err(&self, field: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            service: self.0.to_string(),
            backend: self.1.map(str::to_string),
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

/// Parses a list of services (Go's `null` is an empty list); `parse_file` reads either form.
pub fn parse_services(text: &str) -> Result<Vec<ServiceConfig>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let raw: Option<Vec<Object<RawService>>> = serde_json::from_str(text).map_err(|e| match json_error(e) {
        // `parse_file` reads the object form; this one is the list only.
        ConfigError::Json { line, column, .. } if text.trim_start().starts_with('{') => {
            let message = "expected a JSON list of services, got an object".to_string();
            ConfigError::Json { line, column, message }
        }
        other => other,
    })?;
    build_all(raw.unwrap_or_default())
}

/// Builds and checks a whole list of services as read.
fn build_all(raw: Vec<Object<RawService>>) -> Result<Vec<ServiceConfig>, ConfigError> {
    let services =
        raw.into_iter().enumerate().map(|(i, raw)| build_service(raw.0, i, None)).collect::<Result<Vec<_>, _>>()?;
    validate_all(&services)?;
    Ok(services)
}

/// Parses an admin `PUT /{service}` body; `name` defaults to `url_name` and must match it.
pub fn parse_service(body: &[u8], url_name: &str) -> Result<ServiceConfig, ConfigError> {
    let raw: Object<RawService> = serde_json::from_slice(body).map_err(json_error)?;
    build_service(raw.0, 0, Some(url_name))
}

/// Parses an admin `PUT /{service}?backends_only` body: only its `backends`
/// (and `name`, which must match) count; the settings are `running`'s, so a
/// client that sends zero values for them (as Go clients do) is not refused.
pub fn parse_backends_only(body: &[u8], running: &ServiceConfig) -> Result<ServiceConfig, ConfigError> {
    // Shape and field names first, so a typo is still caught.
    let _: Object<RawService> = serde_json::from_slice(body).map_err(json_error)?;
    let body: Value = serde_json::from_slice(body).map_err(json_error)?;
    let mut merged = serde_json::to_value(running).map_err(json_error)?;
    merged["backends"] = body.get("backends").cloned().unwrap_or_else(|| Value::Array(Vec::new()));
    if let Some(name) = body.get("name") {
        merged["name"] = name.clone();
    }
    let raw: Object<RawService> = serde_json::from_value(merged).map_err(json_error)?;
    build_service(raw.0, 0, Some(&running.name))
}

/// Parses an admin `PUT /{service}/{backend}` body; `name` defaults to `url_name` and must match it.
pub fn parse_backend(body: &[u8], service: &str, url_name: &str) -> Result<BackendConfig, ConfigError> {
    let raw: Object<RawBackend> = serde_json::from_slice(body).map_err(json_error)?;
    let backend = build_backend(raw.0, service, 0, Some(url_name))?;
    validate_backend(service, &backend)?;
    Ok(backend)
}

/// Reads and parses a config or state file, in either form: a regular file of at most 64 MiB.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
    let io = |source| ConfigError::Io { path: path.to_path_buf(), source };
    let bytes = files::read_regular(path, files::MAX_FILE).map_err(|e| match e {
        FileError::Io(e) => io(e),
        other => io(io::Error::new(io::ErrorKind::InvalidData, other.to_string())),
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|e| io(io::Error::new(io::ErrorKind::InvalidData, format!("is not UTF-8 text ({e})"))))?;
    parse_file(&text)
}

fn json_error(e: serde_json::Error) -> ConfigError {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full);
    // serde quotes names and values with backticks; the rest of our messages use double quotes.
    let message = one_line(&message.replace('`', "\""));
    ConfigError::Json { line: e.line(), column: e.column(), message }
}

/// `text` with control characters escaped (`\n` → `\\n`), so a message
/// quoting user input (serde quotes unknown keys raw) stays on one line.
pub fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn build_service(raw: RawService, index: usize, url_name: Option<&str>) -> Result<ServiceConfig, ConfigError> {
    let unnamed = format!("#{}", index + 1);
    let given = text(raw.name, &At(url_name.unwrap_or(&unnamed), None), "name")?;
    let label = url_name.map_or_else(|| given.clone().unwrap_or(unnamed), str::to_string);
    let at = At(&label, None);
    let name = pick_name(given, url_name, &at)?;
    let address = required_address(raw.address, &at)?;
    let balance = match text(raw.balance, &at, "balance")? {
        Some(s) => s.parse().map_err(|problem: String| at.err("balance", problem))?,
        None => Balance::default(),
    };
    let backends = (raw.backends.unwrap_or_default().into_iter().enumerate())
        .map(|(i, b)| build_backend(b.0, &label, i, None))
        .collect::<Result<Vec<_>, _>>()?;
    let service = ServiceConfig {
        name,
        address,
        backends,
        balance,
        check_interval: number(raw.check_interval, &at, "check_interval", DEFAULT_CHECK_INTERVAL)?,
        fall: integer(raw.fall, &at, "fall", 1, DEFAULT_FALL_RISE)?,
        rise: integer(raw.rise, &at, "rise", 1, DEFAULT_FALL_RISE)?,
        client_timeout: number(raw.client_timeout, &at, "client_timeout", 0.0)?,
        server_timeout: number(raw.server_timeout, &at, "server_timeout", 0.0)?,
        connect_timeout: number(raw.connect_timeout, &at, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)?,
        check_send: text(raw.check_send, &at, "check_send")?.unwrap_or_default(),
        check_expect: text(raw.check_expect, &at, "check_expect")?.unwrap_or_default(),
        max_connections: integer(raw.max_connections, &at, "max_connections", 0, 0)?,
        max_queue: integer(raw.max_queue, &at, "max_queue", 0, 0)?,
        queue_timeout: number(raw.queue_timeout, &at, "queue_timeout", DEFAULT_QUEUE_TIMEOUT)?,
        accept_proxy: flag(raw.accept_proxy, &at, "accept_proxy")?,
        fail_open: flag(raw.fail_open, &at, "fail_open")?,
        on_backend_down: match text(raw.on_backend_down, &at, "on_backend_down")? {
            Some(s) => s.parse().map_err(|problem: String| at.err("on_backend_down", problem))?,
            None => OnBackendDown::default(),
        },
        max_connection_duration: number(raw.max_connection_duration, &at, "max_connection_duration", 0.0)?,
        protocol: match text(raw.protocol, &at, "protocol")? {
            Some(s) => s.parse().map_err(|problem: String| at.err("protocol", problem))?,
            None => Protocol::default(),
        },
        udp_idle_timeout: number(raw.udp_idle_timeout, &at, "udp_idle_timeout", DEFAULT_UDP_IDLE_TIMEOUT)?,
        udp_max_responses: integer(raw.udp_max_responses, &at, "udp_max_responses", 0, 0)?,
        max_flows: integer(raw.max_flows, &at, "max_flows", 1, DEFAULT_MAX_FLOWS)?,
        socket_mode: text(raw.socket_mode, &at, "socket_mode")?.unwrap_or_else(default_socket_mode),
    };
    validate_service(&service)?;
    Ok(service)
}

fn build_backend(
    raw: RawBackend,
    service: &str,
    index: usize,
    url_name: Option<&str>,
) -> Result<BackendConfig, ConfigError> {
    let unnamed = format!("#{}", index + 1);
    let given = text(raw.name, &At(service, Some(url_name.unwrap_or(&unnamed))), "name")?;
    let label = url_name.map_or_else(|| given.clone().unwrap_or(unnamed), str::to_string);
    let at = At(service, Some(&label));
    Ok(BackendConfig {
        name: pick_name(given, url_name, &at)?,
        address: required_address(raw.address, &at)?,
        check_address: text(raw.check_address, &at, "check_address")?.unwrap_or_default(),
        weight: integer(raw.weight, &at, "weight", 0, DEFAULT_WEIGHT)?,
        max_connections: integer(raw.max_connections, &at, "max_connections", 0, 0)?,
        send_proxy: match text(raw.send_proxy, &at, "send_proxy")? {
            Some(s) => s.parse().map_err(|problem: String| at.err("send_proxy", problem))?,
            None => SendProxy::Off,
        },
    })
}

fn pick_name(given: Option<String>, url_name: Option<&str>, at: &At<'_>) -> Result<String, ConfigError> {
    match (given, url_name) {
        (Some(body), Some(url)) if body != url => {
            Err(at.err("name", format!("{:?} in the body differs from {url:?} in the URL", clip(&body))))
        }
        (Some(name), _) => Ok(name),
        (None, Some(url)) => Ok(url.to_string()),
        (None, None) => Err(at.err("name", format!("is required, expected {NAME_RULE}"))),
    }
}

fn required_address(value: Option<Value>, at: &At<'_>) -> Result<String, ConfigError> {
    text(value, at, "address")?.ok_or_else(|| at.err("address", format!("is required, {}", address::FORM)))
}

/// A string field; `null` or absent is `None`.
fn text(value: Option<Value>, at: &At<'_>, field: &str) -> Result<Option<String>, ConfigError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(at.err(field, format!("must be a string, got {}", shown(&other)))),
    }
}

/// A boolean field; `null` or absent is `false`.
fn flag(value: Option<Value>, at: &At<'_>, field: &str) -> Result<bool, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(other) => Err(at.err(field, format!("must be true or false, got {}", shown(&other)))),
    }
}

/// A number of seconds; the range is checked by `validate_service`.
fn number(value: Option<Value>, at: &At<'_>, field: &str, default: f64) -> Result<f64, ConfigError> {
    let Some(value) = value else { return Ok(default) };
    value.as_f64().ok_or_else(|| at.err(field, seconds_problem(shown(&value))))
}

/// A whole number in `min..=u32::MAX`; `2.0` is accepted as 2.
fn integer(value: Option<Value>, at: &At<'_>, field: &str, min: u32, default: u32) -> Result<u32, ConfigError> {
    let Some(value) = value else { return Ok(default) };
    let whole = value.as_u64().or_else(|| {
        let float = value.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e19)?;
        Some(float as u64)
    });
    let (got, max) = (shown(&value), u32::MAX);
    match whole.map(u32::try_from) {
        Some(Ok(n)) if n >= min => Ok(n),
        Some(Err(_)) => Err(at.err(field, format!("must be an integer ≤ {max}, got {got}"))),
        _ => Err(at.err(field, format!("must be an integer ≥ {min}, got {got}"))),
    }
}

/// A number of seconds for a message: `-1`, `0.5`, `1e300`.
fn show_seconds(value: f64) -> String {
    if value.abs() < 1e15 {
        format!("{value}")
    } else {
        format!("{value:e}")
    }
}

fn seconds_problem(got: impl fmt::Display) -> String {
    format!("must be a number of seconds from 0 to {MAX_SECONDS:e}, fractions allowed, got {got}")
}

/// A JSON value for a message: compact, one line, at most ~60 characters.
fn shown(value: &Value) -> String {
    clip(&value.to_string()).into_owned()
}

/// Checks a service or backend name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 bytes.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("must not be empty; expected {NAME_RULE}"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("must be at most {MAX_NAME_LEN} bytes, got {} bytes", name.len()));
    }
    if name.starts_with('_') {
        return Err(format!(r#"names starting with "_" are reserved, got {:?}"#, clip(name)));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    if !name.as_bytes()[0].is_ascii_alphanumeric() || !name.bytes().all(allowed) {
        return Err(format!("must be {NAME_RULE}, got {:?}", clip(name)));
    }
    Ok(())
}

/// Checks every field rule of one service and its backends (reference §2).
pub fn validate_service(service: &ServiceConfig) -> Result<(), ConfigError> {
    let at = At(&service.name, None);
    validate_name(&service.name).map_err(|p| at.err("name", p))?;
    listen_address(&service.address).map_err(|p| at.err("address", p))?;
    for (field, value) in [
        ("check_interval", service.check_interval),
        ("client_timeout", service.client_timeout),
        ("server_timeout", service.server_timeout),
        ("connect_timeout", service.connect_timeout),
        ("queue_timeout", service.queue_timeout),
        ("max_connection_duration", service.max_connection_duration),
        ("udp_idle_timeout", service.udp_idle_timeout),
    ] {
        if !(0.0..=MAX_SECONDS).contains(&value) {
            return Err(at.err(field, seconds_problem(show_seconds(value))));
        }
        // A millisecond is the timer's resolution; below it a value would round to
        // nothing (a check interval of 0 s would probe in a tight loop).
        if value > 0.0 && value < MIN_SECONDS {
            let problem = format!("must be 0 or at least {MIN_SECONDS} (one millisecond), got {}", show_seconds(value));
            return Err(at.err(field, problem));
        }
    }
    for (field, value) in [("fall", service.fall), ("rise", service.rise)] {
        if value < 1 {
            return Err(at.err(field, format!("must be an integer ≥ 1, got {value}")));
        }
    }
    let expect = service.check_expect.len();
    if expect > MAX_CHECK_EXPECT {
        let problem =
            format!("must be at most {MAX_CHECK_EXPECT} bytes (checks read 4 KiB of reply), got {expect} bytes");
        return Err(at.err("check_expect", problem));
    }
    socket_mode_bits(&service.socket_mode).map_err(|p| at.err("socket_mode", p))?;
    if service.protocol == Protocol::Udp {
        validate_udp(service)?;
    }
    let mut names = HashSet::new();
    for backend in &service.backends {
        validate_backend(&service.name, backend)?;
        if !names.insert(backend.name.as_str()) {
            let problem = "is used by more than one backend of the service";
            return Err(At(&service.name, Some(&backend.name)).err("name", problem));
        }
    }
    Ok(())
}

/// What a UDP service cannot have: the stream-only features, and a flow that
/// never ends.
fn validate_udp(service: &ServiceConfig) -> Result<(), ConfigError> {
    let at = At(&service.name, None);
    let stream_only = [
        ("accept_proxy", service.accept_proxy, "a PROXY header cannot start a datagram flow"),
        ("max_connections", service.max_connections > 0, "a UDP service is bounded by max_flows"),
        ("max_queue", service.max_queue > 0, "datagrams are not queued: a flow past max_flows is dropped"),
        ("max_connection_duration", service.max_connection_duration > 0.0, "a UDP flow ends at its udp_idle_timeout"),
    ];
    if let Some((field, _, why)) = stream_only.iter().find(|(_, set, _)| *set) {
        return Err(at.err(field, format!("must not be set on a UDP service: {why}")));
    }
    if service.address.starts_with(endpoint::UNIX_PREFIX) {
        return Err(at.err("address", "must be host:port on a UDP service: unix sockets carry streams here"));
    }
    if let Some(b) = service.backends.iter().find(|b| b.address.starts_with(endpoint::UNIX_PREFIX)) {
        let problem = "must be host:port on a UDP service: unix sockets carry streams here";
        return Err(At(&service.name, Some(&b.name)).err("address", problem));
    }
    if service.udp_idle_timeout == 0.0 {
        return Err(at.err("udp_idle_timeout", "must be above 0 on a UDP service: a flow must end some time"));
    }
    if let Some(b) = service.backends.iter().find(|b| b.send_proxy != SendProxy::Off) {
        let problem = "must be \"\" on a UDP service: shuttle sends PROXY headers on TCP only";
        return Err(At(&service.name, Some(&b.name)).err("send_proxy", problem));
    }
    Ok(())
}

/// Checks one backend's fields; `service` names it in errors.
pub fn validate_backend(service: &str, backend: &BackendConfig) -> Result<(), ConfigError> {
    let at = At(service, Some(&backend.name));
    validate_name(&backend.name).map_err(|p| at.err("name", p))?;
    connect_address(&backend.address).map_err(|p| at.err("address", p))?;
    if !backend.check_address.is_empty() {
        connect_address(&backend.check_address).map_err(|p| at.err("check_address", p))?;
    }
    Ok(())
}

/// Checks what only a whole list can break and can be told without resolving
/// names: unique names, and listen addresses given as IP literals that clash.
/// Named addresses and loops are checked once resolved (`service::check_all`).
pub fn validate_all(services: &[ServiceConfig]) -> Result<(), ConfigError> {
    let mut names = HashSet::with_capacity(services.len());
    // Listeners can only clash on the same port: group by it, so a big config stays linear.
    let mut by_port: HashMap<u16, Vec<(&str, SocketAddr)>> = HashMap::new();
    for service in services {
        let at = At(&service.name, None);
        if !names.insert(service.name.as_str()) {
            return Err(at.err("name", "is used by more than one service"));
        }
        // Unix paths and named hosts clash once resolved (`service::check_all`).
        let parsed = listen_address(&service.address).map_err(|p| at.err("address", p))?;
        let Some(addr) = parsed.and_then(|a| a.literal()) else {
            continue;
        };
        let same_port = by_port.entry(addr.port()).or_default();
        if let Some((other, taken)) = same_port.iter().find(|(_, taken)| overlaps(*taken, addr)) {
            let problem = format!("{:?} conflicts with {taken}, where service {other:?} listens", service.address);
            return Err(at.err("address", problem));
        }
        same_port.push((&service.name, addr));
    }
    Ok(())
}

/// A listen address's syntax; `None` for a `unix:/path`, whose path is checked.
fn listen_address(address: &str) -> Result<Option<Address>, String> {
    match endpoint::parse_unix(address) {
        Some(path) => path.map(|_| None),
        None => address::parse(address).map(Some),
    }
}

/// A connect address's syntax (port 0 refused); `None` for a `unix:/path`.
fn connect_address(address: &str) -> Result<Option<Address>, String> {
    match endpoint::parse_unix(address) {
        Some(path) => path.map(|_| None),
        None => address::parse_connect(address).map(Some),
    }
}

/// The host names a service's addresses need looked up, each once.
pub fn host_names(service: &ServiceConfig) -> Vec<String> {
    let mut names = Vec::new();
    let addresses = std::iter::once(service.address.as_str())
        .chain(service.backends.iter().flat_map(|b| [b.address.as_str(), b.check_address.as_str()]));
    for text in addresses.filter(|t| !t.is_empty()) {
        if let Ok(Address { host: Host::Name(name), .. }) = address::parse(text) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// The config list as written to the state file and `GET /_config`: pretty JSON, sorted by name, trailing newline.
pub fn to_json(services: &[ServiceConfig]) -> String {
    render(services).unwrap_or_else(|e| {
        // Unreachable with these types; never hand out half a document.
        log::error!("cannot render the config as JSON: {e}");
        String::from("[]\n")
    })
}

fn render(services: &[ServiceConfig]) -> serde_json::Result<String> {
    let mut sorted: Vec<&ServiceConfig> = services.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut text = serde_json::to_string_pretty(&sorted)?;
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests;
