//! Service and backend configuration: the JSON file format (SPEC §2), its
//! defaults and validation, and the atomic state-file write (SPEC §5).
//!
//! Input goes through private `Raw*` types whose values are loose JSON, so a
//! bad value is reported with the service, backend, field and value at fault
//! rather than as serde's "expected u32". Invariant: every `ServiceConfig`
//! returned by `parse_*`/`load` has every default applied and has passed
//! `validate_service` (and, for whole lists, `validate_all`). Host names are
//! kept as written; `resolve` is called again when a config is applied.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{value::MapAccessDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Default seconds between health checks.
pub const DEFAULT_CHECK_INTERVAL: f64 = 2.0;
/// Default consecutive checks for `fall` and `rise`.
pub const DEFAULT_FALL_RISE: u32 = 2;
/// Default seconds allowed for a backend connect or a health check.
pub const DEFAULT_CONNECT_TIMEOUT: f64 = 5.0;
/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Longest service or backend name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Largest accepted number of seconds (about 31 years); keeps `Instant + Duration` from overflowing.
pub const MAX_SECONDS: f64 = 1e9;
/// Longest `check_expect`: a check only looks at the first 4 KiB of the reply (SPEC §2).
pub const MAX_CHECK_EXPECT: usize = 4096;
const ADDRESS_FORM: &str = r#"expected "host:port", "v4:port" or "[v6]:port""#;
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
}

/// Balancing algorithm: `"RR"` or `"LC"` in JSON; the Go shuttle's `""` means RR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Least connected.
    LeastConn,
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
    /// A value breaks a rule of SPEC §2.
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

impl Balance {
    /// The JSON spelling: `"RR"` or `"LC"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "RR",
            Balance::LeastConn => "LC",
        }
    }
}

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "RR" | "" => Ok(Balance::RoundRobin),
            "LC" => Ok(Balance::LeastConn),
            other => Err(format!(r#"must be "RR" (round robin) or "LC" (least connected), got {:?}"#, clip(other))),
        }
    }
}

impl Serialize for Balance {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
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
        }
    }

    /// True when every field but `backends` is equal (SPEC §5, backends-only update).
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
        }
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

/// Names what an `Object` holds, for "expected ..." messages.
trait Expected {
    const WHAT: &'static str;
}

impl<'de, T: Deserialize<'de> + Expected> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Only<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Expected> Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::WHAT)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Only(PhantomData)).map(Object)
    }
}

impl Expected for RawService {
    const WHAT: &'static str = "a service object";
}

impl Expected for RawBackend {
    const WHAT: &'static str = "a backend object";
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<Value>,
    address: Option<Value>,
    check_address: Option<Value>,
    weight: Option<Value>,
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

/// Parses a config or state file: a JSON list of services (Go's `null` is an empty list).
pub fn parse_services(text: &str) -> Result<Vec<ServiceConfig>, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let raw: Option<Vec<Object<RawService>>> = serde_json::from_str(text).map_err(|e| match json_error(e) {
        // The later Go shuttle's `{"services": [...]}`: say what this format is instead of "expected a sequence".
        ConfigError::Json { line, column, .. } if text.trim_start().starts_with('{') => {
            let message = "expected a JSON list of services, got an object".to_string();
            ConfigError::Json { line, column, message }
        }
        other => other,
    })?;
    let services = raw
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, raw)| build_service(raw.0, i, None))
        .collect::<Result<Vec<_>, _>>()?;
    validate_all(&services)?;
    Ok(services)
}

/// Parses an admin `PUT /{service}` body; `name` defaults to `url_name` and must match it.
pub fn parse_service(body: &[u8], url_name: &str) -> Result<ServiceConfig, ConfigError> {
    let raw: Object<RawService> = serde_json::from_slice(body).map_err(json_error)?;
    build_service(raw.0, 0, Some(url_name))
}

/// Parses an admin `PUT /{service}/{backend}` body; `name` defaults to `url_name` and must match it.
pub fn parse_backend(body: &[u8], service: &str, url_name: &str) -> Result<BackendConfig, ConfigError> {
    let raw: Object<RawBackend> = serde_json::from_slice(body).map_err(json_error)?;
    let backend = build_backend(raw.0, service, 0, Some(url_name))?;
    validate_backend(service, &backend)?;
    Ok(backend)
}

/// Reads and parses a config or state file.
pub fn load(path: &Path) -> Result<Vec<ServiceConfig>, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
    parse_services(&text)
}

fn json_error(e: serde_json::Error) -> ConfigError {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full);
    // serde quotes names and values with backticks; the rest of our messages use double quotes.
    let message = message.replace('`', "\"");
    ConfigError::Json { line: e.line(), column: e.column(), message }
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
    })
}

fn pick_name(given: Option<String>, url_name: Option<&str>, at: &At<'_>) -> Result<String, ConfigError> {
    match (given, url_name) {
        (Some(body), Some(url)) if body != url => {
            Err(at.err("name", format!("{:?} in the body differs from {:?} in the URL", clip(&body), clip(url))))
        }
        (Some(name), _) => Ok(name),
        (None, Some(url)) => Ok(url.to_string()),
        (None, None) => Err(at.err("name", format!("is required, expected {NAME_RULE}"))),
    }
}

fn required_address(value: Option<Value>, at: &At<'_>) -> Result<String, ConfigError> {
    text(value, at, "address")?.ok_or_else(|| at.err("address", format!("is required, {ADDRESS_FORM}")))
}

/// A string field; `null` or absent is `None`.
fn text(value: Option<Value>, at: &At<'_>, field: &str) -> Result<Option<String>, ConfigError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(at.err(field, format!("must be a string, got {}", shown(&other)))),
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
    match whole.map(u32::try_from) {
        Some(Ok(n)) if n >= min => Ok(n),
        Some(Err(_)) => Err(at.err(field, format!("must be an integer ≤ {}, got {}", u32::MAX, shown(&value)))),
        _ => Err(at.err(field, format!("must be an integer ≥ {min}, got {}", shown(&value)))),
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
    format!("must be a number of seconds ≥ 0 (fractions allowed, at most {MAX_SECONDS}), got {got}")
}

/// A JSON value for a message: compact, one line, at most ~60 characters.
fn shown(value: &Value) -> String {
    clip(&value.to_string()).into_owned()
}

fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(60) {
        Some((end, _)) => format!("{}…", &s[..end]).into(),
        None => s.into(),
    }
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

/// Checks every field rule of one service and its backends (SPEC §2).
pub fn validate_service(service: &ServiceConfig) -> Result<(), ConfigError> {
    let at = At(&service.name, None);
    validate_name(&service.name).map_err(|p| at.err("name", p))?;
    listen_address(&service.address).map_err(|p| at.err("address", p))?;
    for (field, value) in [
        ("check_interval", service.check_interval),
        ("client_timeout", service.client_timeout),
        ("server_timeout", service.server_timeout),
        ("connect_timeout", service.connect_timeout),
    ] {
        if !(0.0..=MAX_SECONDS).contains(&value) {
            return Err(at.err(field, seconds_problem(show_seconds(value))));
        }
    }
    for (field, value) in [("fall", service.fall), ("rise", service.rise)] {
        if value < 1 {
            return Err(at.err(field, format!("must be an integer ≥ 1, got {value}")));
        }
    }
    if service.check_expect.len() > MAX_CHECK_EXPECT {
        let problem = format!("must be at most {MAX_CHECK_EXPECT} bytes (a check reads the first 4 KiB of the reply)");
        return Err(at.err("check_expect", format!("{problem}, got {} bytes", service.check_expect.len())));
    }
    let mut names = HashSet::new();
    for backend in &service.backends {
        validate_backend(&service.name, backend)?;
        if !names.insert(backend.name.as_str()) {
            let at = At(&service.name, Some(&backend.name));
            return Err(at.err("name", "is used by more than one backend; backend names must be unique in a service"));
        }
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

/// Checks what only a whole list can break: unique names, distinct listen addresses, no loops.
pub fn validate_all(services: &[ServiceConfig]) -> Result<(), ConfigError> {
    let mut seen: Vec<(&str, SocketAddr)> = Vec::with_capacity(services.len());
    for service in services {
        let at = At(&service.name, None);
        if seen.iter().any(|(name, _)| *name == service.name) {
            return Err(at.err("name", "is used by more than one service; service names must be unique"));
        }
        let addr = listen_address(&service.address).map_err(|p| at.err("address", p))?;
        if let Some((other, _)) = seen.iter().find(|(_, other)| overlaps(*other, addr)) {
            let problem = format!("{:?} is already the listen address of service {other:?}", clip(&service.address));
            return Err(at.err("address", problem));
        }
        seen.push((&service.name, addr));
    }
    check_loops(services)
}

/// Rejects a backend whose address reaches one of the services' listeners: it would loop (SPEC §2).
pub fn check_loops(services: &[ServiceConfig]) -> Result<(), ConfigError> {
    let mut listeners = Vec::with_capacity(services.len());
    for service in services {
        let addr = resolve(&service.address).map_err(|p| At(&service.name, None).err("address", p))?;
        listeners.push((service.name.as_str(), addr));
    }
    for service in services {
        for backend in &service.backends {
            let at = At(&service.name, Some(&backend.name));
            let addr = resolve(&backend.address).map_err(|p| at.err("address", p))?;
            if let Some((owner, listener)) = listeners.iter().find(|(_, listener)| loops_to(addr, *listener)) {
                let address = clip(&backend.address);
                let problem =
                    format!("{address:?} reaches {listener}, the listener of service {owner:?}; it would loop");
                return Err(at.err("address", problem));
            }
        }
    }
    Ok(())
}

fn loops_to(backend: SocketAddr, listener: SocketAddr) -> bool {
    backend.port() == listener.port()
        && listener.port() != 0
        && (backend.ip() == listener.ip()
            || backend.ip().is_unspecified()
            || (listener.ip().is_unspecified() && is_local(backend.ip())))
}

/// Whether `ip` is one of this host's addresses: only a local address can be bound.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind((ip, 0)).is_ok()
}

/// Whether two listeners would fight over one port; `[::]` is dual-stack on Linux by default.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |x: SocketAddr, y: SocketAddr| x.ip().is_unspecified() && (x.is_ipv6() || y.is_ipv4());
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

fn listen_address(address: &str) -> Result<SocketAddr, String> {
    if address.is_empty() {
        return Err(format!("is required, {ADDRESS_FORM}"));
    }
    resolve(address)
}

fn connect_address(address: &str) -> Result<SocketAddr, String> {
    let addr = listen_address(address)?;
    match addr.port() {
        0 => Err(format!("port 0 cannot be connected to, got {:?}", clip(address))),
        _ => Ok(addr),
    }
}

/// Resolves `host:port`, `v4:port` or `[v6]:port` (first result, IPv4 preferred); `:port` is `0.0.0.0:port` as in Go.
pub fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{ADDRESS_FORM}, got {:?} (no port)", clip(address)));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("port must be a number from 0 to 65535, got {:?} in {:?}", clip(port), clip(address)));
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!("{ADDRESS_FORM} (IPv6 needs brackets), got {:?}", clip(address)));
    }
    if host.is_empty() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let found: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
        Ok(found) => found.collect(),
        Err(e) => return Err(format!("host {:?} does not resolve: {e}", clip(host))),
    };
    let best = found.iter().find(|a| a.is_ipv4()).or_else(|| found.first());
    best.copied().ok_or_else(|| format!("host {:?} resolves to no address", clip(host)))
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

/// Writes `to_json(services)` to `path` atomically: temp file in the same directory, fsync, rename, fsync the directory.
pub fn save_atomic(path: &Path, services: &[ServiceConfig]) -> io::Result<()> {
    let text = render(services).map_err(io::Error::other)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let Some(file_name) = path.file_name() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a file path", path.display())));
    };
    let tmp = dir.join(format!(".{}.tmp.{}", file_name.to_string_lossy(), std::process::id()));
    let written = write_synced(&tmp, path, text.as_bytes()).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        // Best effort: the temp file may not exist, and the original error is what matters.
        let _ = fs::remove_file(&tmp);
        return Err(io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())));
    }
    // The new file is in place, so the change counts as saved; a failed directory fsync
    // only weakens durability across a crash, and reporting failure now would make the
    // running config and the file disagree (SPEC §5).
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::warn!("state file {}: cannot fsync directory {}: {e}", path.display(), dir.display());
    }
    Ok(())
}

fn write_synced(tmp: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(tmp)?;
    if let Ok(meta) = fs::metadata(target) {
        // Keep the state file's permissions across the replace.
        file.set_permissions(meta.permissions())?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/", $name))
        };
    }

    fn service(body: &str) -> ServiceConfig {
        parse_service(body.as_bytes(), "web").unwrap()
    }

    #[track_caller]
    fn service_err(body: &str) -> String {
        parse_service(body.as_bytes(), "web").unwrap_err().to_string()
    }

    #[track_caller]
    fn list_err(text: &str) -> String {
        parse_services(text).unwrap_err().to_string()
    }

    /// A service body on 127.0.0.1:8080 with `extra` fields and one backend with `backend` fields.
    fn with(extra: &str, backend: &str) -> String {
        let backend = format!(r#"{{"name": "b1", "address": "127.0.0.1:9001"{backend}}}"#);
        format!(r#"{{"address": "127.0.0.1:8080"{extra}, "backends": [{backend}]}}"#)
    }

    #[test]
    fn minimal_service_gets_every_default() {
        let parsed = service(&with("", ""));
        let mut expected = ServiceConfig::new("web", "127.0.0.1:8080");
        expected.backends.push(BackendConfig::new("b1", "127.0.0.1:9001"));
        assert_eq!(parsed, expected);
        let s = &parsed;
        assert_eq!((s.check_interval, s.fall, s.rise), (2.0, 2, 2));
        assert_eq!((s.client_timeout, s.server_timeout, s.connect_timeout), (0.0, 0.0, 5.0));
        assert_eq!((s.balance, s.check_send.as_str(), s.check_expect.as_str()), (Balance::RoundRobin, "", ""));
        assert_eq!((s.backends[0].check_address.as_str(), s.backends[0].weight), ("", 1));
        assert!(service(r#"{"address": "127.0.0.1:8080"}"#).backends.is_empty());
        assert_eq!(service(&with(r#", "fall": 2.0, "check_interval": 0.25"#, "")).fall, 2);
    }

    #[test]
    fn fixtures_load() {
        let example = parse_services(fixture!("example.json")).unwrap();
        assert_eq!((example[0].name.as_str(), example[0].backends.len()), ("web", 2));
        let rr = parse_services(fixture!("round_robin.json")).unwrap();
        assert_eq!(rr[0].backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(parse_services(fixture!("least_conn.json")).unwrap()[0].balance, Balance::LeastConn);
    }

    #[test]
    fn go_state_file_with_empty_balance_and_null_backends_loads() {
        let services = parse_services(fixture!("go_shuttle_state.json")).unwrap();
        assert_eq!((services[0].balance, services[0].backends[1].weight), (Balance::RoundRobin, 3));
        assert_eq!((services[1].name.as_str(), services[1].backends.len()), ("spare", 0));
        assert_eq!(parse_services("null\n").unwrap(), []); // Go's empty registry
        let derived: Vec<ServiceConfig> = serde_json::from_str(fixture!("go_shuttle_state.json")).unwrap();
        assert_eq!(derived, services);
    }

    #[test]
    fn bad_fixtures_give_one_line_messages() {
        let expected_fields = r#""name", "address", "backends", "balance", "check_interval", "fall", "rise", "client_timeout", "server_timeout", "connect_timeout", "check_send", "check_expect""#;
        assert_eq!(
            list_err(fixture!("bad/unknown_field.json")),
            format!(r#"line 4, column 12: unknown field "adress", expected one of {expected_fields}"#)
        );
        assert_eq!(
            list_err(fixture!("bad/balance.json")),
            r#"service "web": balance: must be "RR" (round robin) or "LC" (least connected), got "random""#
        );
        assert_eq!(
            list_err(fixture!("bad/duplicate_backend.json")),
            r#"service "web": backend "web1": name: is used by more than one backend; backend names must be unique in a service"#
        );
        assert_eq!(list_err(fixture!("bad/truncated.json")), "line 6, column 48: EOF while parsing a string");
        assert_eq!(
            list_err(fixture!("bad/negative_weight.json")),
            r#"service "web": backend "web1": weight: must be an integer ≥ 0, got -1"#
        );
    }

    #[test]
    fn unknown_backend_field_is_named() {
        let err = service_err(&with("", r#", "colour": "red""#));
        assert!(err.starts_with(r#"line 1, column 95: unknown field "colour", expected one of "name""#), "{err}");
    }

    #[test]
    fn not_an_object_or_not_json_is_a_json_error_with_position() {
        assert_eq!(service_err(""), "line 1, column 0: EOF while parsing a value");
        assert_eq!(service_err("[]"), "line 1, column 0: invalid type: sequence, expected a service object");
        assert_eq!(service_err(r#"{"address": "127.0.0.1:8080"} x"#), "line 1, column 31: trailing characters");
        let positional = r#"[{"name": "web", "address": "127.0.0.1:80", "backends": [["b", "127.0.0.1:1"]]}]"#;
        assert_eq!(list_err(positional), "line 1, column 57: invalid type: sequence, expected a backend object");
        assert_eq!(list_err("{\"services\": []}"), "line 1, column 0: expected a JSON list of services, got an object");
        let err = parse_backend(b"42", "web", "b1").unwrap_err();
        assert!(matches!(err, ConfigError::Json { line: 1, .. }), "{err}");
    }

    #[test]
    fn numbers_are_checked_with_field_and_value() {
        let cases = [
            (r#", "fall": 1.5"#, r#"fall: must be an integer ≥ 1, got 1.5"#),
            (r#", "rise": 0"#, r#"rise: must be an integer ≥ 1, got 0"#),
            (r#", "rise": "2""#, r#"rise: must be an integer ≥ 1, got "2""#),
            (
                r#", "check_interval": -1"#,
                "check_interval: must be a number of seconds ≥ 0 (fractions allowed, at most 1000000000), got -1",
            ),
            (
                r#", "connect_timeout": "5s""#,
                r#"connect_timeout: must be a number of seconds ≥ 0 (fractions allowed, at most 1000000000), got "5s""#,
            ),
            (
                r#", "server_timeout": 1e300"#,
                "server_timeout: must be a number of seconds ≥ 0 (fractions allowed, at most 1000000000), got 1e300",
            ),
            (r#", "check_send": 1"#, "check_send: must be a string, got 1"),
        ];
        for (extra, problem) in cases {
            assert_eq!(service_err(&with(extra, "")), format!(r#"service "web": {problem}"#));
        }
        let weight = service_err(&with("", r#", "weight": 5000000000"#));
        assert_eq!(weight, r#"service "web": backend "b1": weight: must be an integer ≤ 4294967295, got 5000000000"#);
        assert_eq!(service(&with("", r#", "weight": 0"#)).backends[0].weight, 0);
        let long = format!(r#", "check_expect": "{}""#, "x".repeat(MAX_CHECK_EXPECT + 1));
        assert!(service_err(&with(&long, "")).contains("check_expect: must be at most 4096 bytes"));
    }

    #[test]
    fn balance_accepts_rr_lc_and_go_empty() {
        assert_eq!(service(&with(r#", "balance": """#, "")).balance, Balance::RoundRobin);
        assert_eq!(service(&with(r#", "balance": "RR""#, "")).balance, Balance::RoundRobin);
        assert_eq!(service(&with(r#", "balance": "LC""#, "")).balance, Balance::LeastConn);
        assert!(service_err(&with(r#", "balance": "rr""#, "")).ends_with(r#"least connected), got "rr""#));
    }

    #[test]
    fn names_follow_the_rule() {
        assert_eq!(validate_name("ok.name-1_x"), Ok(()));
        assert_eq!(validate_name(&"a".repeat(128)), Ok(()));
        assert_eq!(validate_name(&"a".repeat(129)).unwrap_err(), "must be at most 128 bytes, got 129 bytes");
        assert_eq!(validate_name("_stats").unwrap_err(), r#"names starting with "_" are reserved, got "_stats""#);
        let rule = r#"must be letters, digits, ".", "_" and "-", starting with a letter or digit"#;
        assert_eq!(validate_name("a b").unwrap_err(), format!(r#"{rule}, got "a b""#));
        assert_eq!(validate_name("-a").unwrap_err(), format!(r#"{rule}, got "-a""#));
        assert!(validate_name("").unwrap_err().starts_with("must not be empty"));
        let err = parse_service(br#"{"address": "127.0.0.1:8080"}"#, "_x").unwrap_err().to_string();
        assert_eq!(err, r#"service "_x": name: names starting with "_" are reserved, got "_x""#);
        let err = list_err(r#"[{"address": "127.0.0.1:8080"}]"#);
        assert!(err.starts_with("service #1: name: is required, expected letters"), "{err}");
        let err = service_err(r#"{"address": "127.0.0.1:8080", "backends": [{"address": "127.0.0.1:1"}]}"#);
        assert!(err.starts_with(r#"service "web": backend #1: name: is required"#), "{err}");
    }

    #[test]
    fn name_comes_from_the_url_and_must_match_it() {
        assert_eq!(service(r#"{"address": "127.0.0.1:8080"}"#).name, "web");
        assert_eq!(service(r#"{"name": "web", "address": "127.0.0.1:8080"}"#).name, "web");
        let err = service_err(r#"{"name": "api", "address": "127.0.0.1:8080"}"#);
        assert_eq!(err, r#"service "web": name: "api" in the body differs from "web" in the URL"#);
        let backend = parse_backend(br#"{"address": "127.0.0.1:9001", "weight": 2}"#, "web", "b1").unwrap();
        assert_eq!(backend, BackendConfig { weight: 2, ..BackendConfig::new("b1", "127.0.0.1:9001") });
        let err = parse_backend(br#"{"name": "b2", "address": "127.0.0.1:1"}"#, "web", "b1").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"service "web": backend "b1": name: "b2" in the body differs from "b1" in the URL"#
        );
        let err = parse_backend(br#"{"address": "127.0.0.1:0"}"#, "web", "b1").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"service "web": backend "b1": address: port 0 cannot be connected to, got "127.0.0.1:0""#
        );
    }

    #[test]
    fn addresses_must_resolve() {
        assert_eq!(resolve("127.0.0.1:80"), Ok(SocketAddr::from(([127, 0, 0, 1], 80))));
        assert_eq!(resolve("[::1]:80").map(|a| a.is_ipv6()), Ok(true));
        assert_eq!(resolve("localhost:80").map(|a| a.ip().is_loopback()), Ok(true));
        assert_eq!(resolve(":80"), Ok(SocketAddr::from(([0, 0, 0, 0], 80))));
        let form = r#"expected "host:port", "v4:port" or "[v6]:port""#;
        assert_eq!(resolve("localhost").unwrap_err(), format!(r#"{form}, got "localhost" (no port)"#));
        assert_eq!(resolve("::1:80").unwrap_err(), format!(r#"{form} (IPv6 needs brackets), got "::1:80""#));
        assert_eq!(
            resolve("h:99999").unwrap_err(),
            r#"port must be a number from 0 to 65535, got "99999" in "h:99999""#
        );
        assert!(resolve("nothing.invalid:80").unwrap_err().starts_with(r#"host "nothing.invalid" does not resolve"#));
        assert_eq!(service_err("{}"), format!(r#"service "web": address: is required, {form}"#));
        let err = service_err(&with("", r#", "check_address": "nothing.invalid:1""#));
        assert!(err.starts_with(r#"service "web": backend "b1": check_address: host "nothing.invalid""#), "{err}");
    }

    #[test]
    fn lists_reject_duplicate_names_and_listen_addresses() {
        let two = |a: &str, b: &str| {
            format!(r#"[{{"name": "a", "address": "{a}"}}, {{"name": "{b}", "address": "127.0.0.1:81"}}]"#)
        };
        let err = list_err(&two("127.0.0.1:80", "a"));
        assert_eq!(err, r#"service "a": name: is used by more than one service; service names must be unique"#);
        let err = list_err(&two("0.0.0.0:81", "b"));
        assert_eq!(err, r#"service "b": address: "127.0.0.1:81" is already the listen address of service "a""#);
        assert_eq!(parse_services(&two("127.0.0.1:0", "b")).unwrap().len(), 2);
        let ports_zero = r#"[{"name": "a", "address": "127.0.0.1:0"}, {"name": "b", "address": "127.0.0.1:0"}]"#;
        assert_eq!(parse_services(ports_zero).unwrap().len(), 2);
    }

    #[test]
    fn backends_pointing_at_a_listener_are_loops() {
        let svc = |name: &str, address: &str, backend: &str| ServiceConfig {
            backends: vec![BackendConfig::new("b", backend)],
            ..ServiceConfig::new(name, address)
        };
        let err = check_loops(&[svc("a", "127.0.0.1:8080", "127.0.0.1:8080")]).unwrap_err().to_string();
        assert_eq!(
            err,
            r#"service "a": backend "b": address: "127.0.0.1:8080" reaches 127.0.0.1:8080, the listener of service "a"; it would loop"#
        );
        assert!(check_loops(&[svc("a", "0.0.0.0:8080", "127.0.0.1:1"), svc("c", "0.0.0.0:8081", "localhost:8080")])
            .is_err());
        assert!(check_loops(&[svc("a", "127.0.0.1:8080", "0.0.0.0:8080")]).is_err());
        assert!(check_loops(&[svc("a", "127.0.0.1:8080", "127.0.0.1:8081")]).is_ok());
        assert!(check_loops(&[svc("a", "127.0.0.1:8080", "127.0.0.2:8080")]).is_ok());
        assert!(check_loops(&[svc("a", "0.0.0.0:8080", "192.0.2.1:8080")]).is_ok()); // TEST-NET: not local
        assert!(check_loops(&[svc("a", "127.0.0.1:0", "127.0.0.1:0")]).is_ok());
        let text =
            r#"[{"name": "a", "address": "0.0.0.0:80", "backends": [{"name": "b", "address": "127.0.0.1:80"}]}]"#;
        assert!(list_err(text).ends_with("it would loop"));
    }

    #[test]
    fn a_failed_parse_never_yields_a_partial_list() {
        let text = r#"[{"name": "a", "address": "127.0.0.1:80"}, {"name": "b", "address": "127.0.0.1:81", "fall": 0}]"#;
        assert_eq!(list_err(text), r#"service "b": fall: must be an integer ≥ 1, got 0"#);
    }

    #[test]
    fn to_json_is_sorted_complete_and_round_trips() {
        let mut web = ServiceConfig::new("web", "127.0.0.1:8080");
        web.backends = vec![BackendConfig::new("z", "127.0.0.1:9002"), BackendConfig::new("a", "127.0.0.1:9001")];
        let api = ServiceConfig { balance: Balance::LeastConn, ..ServiceConfig::new("api", "127.0.0.1:8081") };
        let text = to_json(&[web.clone(), api.clone()]);
        assert!(text.starts_with("[\n  {\n    \"name\": \"api\",") && text.ends_with("]\n"), "{text}");
        let parsed = parse_services(&text).unwrap();
        assert_eq!(parsed, [api, web]);
        assert_eq!(parsed[1].backends[0].name, "z");
        assert_eq!(to_json(&parsed), text);
        for field in ["\"check_send\": \"\"", "\"weight\": 1", "\"balance\": \"LC\"", "\"client_timeout\": 0,"] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert_eq!(to_json(&[]), "[]\n");
        let go = parse_services(fixture!("go_shuttle_state.json")).unwrap();
        assert_eq!(parse_services(&to_json(&go)).unwrap(), [go[1].clone(), go[0].clone()]);
    }

    #[test]
    fn seconds_print_whole_as_integers_and_fractions_exactly() {
        let s = ServiceConfig {
            check_interval: 0.25,
            client_timeout: 30.0,
            connect_timeout: 1e-7,
            ..ServiceConfig::new("w", "127.0.0.1:1")
        };
        let text = to_json(std::slice::from_ref(&s));
        assert!(text.contains("\"check_interval\": 0.25,") && text.contains("\"client_timeout\": 30,"), "{text}");
        assert!(text.contains("\"server_timeout\": 0,") && text.contains("\"connect_timeout\": 1e-7,"), "{text}");
        assert_eq!(parse_services(&text).unwrap(), [s]);
        assert_eq!(seconds(0.0), None);
        assert_eq!(seconds(0.25), Some(Duration::from_millis(250)));
        assert_eq!(seconds(2.0), Some(Duration::from_secs(2)));
        assert_eq!(seconds(f64::INFINITY), Some(Duration::from_secs(1_000_000_000)));
        assert_eq!(seconds(f64::NAN), None);
    }

    #[test]
    fn settings_equal_ignores_backends_only() {
        let a = ServiceConfig::new("web", "127.0.0.1:8080");
        let b = ServiceConfig { backends: vec![BackendConfig::new("b", "127.0.0.1:1")], ..a.clone() };
        assert!(a.settings_equal(&b));
        assert!(!a.settings_equal(&ServiceConfig { rise: 3, ..b.clone() }));
        assert!(!a.settings_equal(&ServiceConfig { check_expect: "ok".into(), ..b }));
    }

    #[test]
    fn save_atomic_replaces_the_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, "old").unwrap();
        let services = parse_services(fixture!("example.json")).unwrap();
        save_atomic(&path, &services).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), to_json(&services));
        assert_eq!(load(&path).unwrap(), services);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
        assert!(save_atomic(&dir.path().join("missing/state.json"), &services).is_err());
        let err = load(&dir.path().join("nope.json")).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }) && err.to_string().starts_with("cannot read "), "{err}");
    }
}
