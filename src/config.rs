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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Balance {
    /// Weighted round robin.
    #[default]
    #[serde(rename = "RR", alias = "")]
    RoundRobin,
    /// Least connected.
    #[serde(rename = "LC")]
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
            Err(at.err("name", format!("{:?} in the body differs from {url:?} in the URL", clip(&body))))
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
    let expect = service.check_expect.len();
    if expect > MAX_CHECK_EXPECT {
        let problem =
            format!("must be at most {MAX_CHECK_EXPECT} bytes (checks read 4 KiB of reply), got {expect} bytes");
        return Err(at.err("check_expect", problem));
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
            return Err(at.err("name", "is used by more than one service"));
        }
        let addr = listen_address(&service.address).map_err(|p| at.err("address", p))?;
        if let Some((other, taken)) = seen.iter().find(|(_, taken)| overlaps(*taken, addr)) {
            let problem = format!("{:?} conflicts with {taken}, where service {other:?} listens", service.address);
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
                let problem = format!("{address:?} reaches {listener}, where service {owner:?} listens; it would loop");
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
        return Err(format!("port must be a number from 0 to 65535, got {:?} in {address:?}", clip(port)));
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
    best.copied().ok_or_else(|| format!("host {host:?} resolves to no address"))
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

/// Writes `to_json(services)` to `path` atomically: temp file in the same directory, fsync, rename, fsync the dir.
pub fn save_atomic(path: &Path, services: &[ServiceConfig]) -> io::Result<()> {
    let text = render(services).map_err(io::Error::other)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let Some(file_name) = path.file_name() else {
        let message = format!("{} is not a file path", path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
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
        log::warn!("state file {}: cannot fsync its directory: {e}", path.display());
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

    /// A `PUT /web` body on 127.0.0.1:8080 with `extra` fields and one backend "b1" with `backend` fields.
    fn body(extra: &str, backend: &str) -> String {
        let backend = format!(r#"{{"name": "b1", "address": "127.0.0.1:9001"{backend}}}"#);
        format!(r#"{{"address": "127.0.0.1:8080"{extra}, "backends": [{backend}]}}"#)
    }

    fn put(extra: &str, backend: &str) -> Result<ServiceConfig, ConfigError> {
        parse_service(body(extra, backend).as_bytes(), "web")
    }

    #[track_caller]
    fn err<T: fmt::Debug>(result: Result<T, impl fmt::Display>) -> String {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_service_gets_every_default() {
        let parsed = put("", "").unwrap();
        let mut expected = ServiceConfig::new("web", "127.0.0.1:8080");
        expected.backends.push(BackendConfig::new("b1", "127.0.0.1:9001"));
        assert_eq!(parsed, expected);
        let (s, b) = (&parsed, &parsed.backends[0]);
        assert_eq!((s.check_interval, s.fall, s.rise, s.balance), (2.0, 2, 2, Balance::RoundRobin));
        assert_eq!((s.client_timeout, s.server_timeout, s.connect_timeout), (0.0, 0.0, 5.0));
        assert_eq!(
            (s.check_send.as_str(), s.check_expect.as_str(), b.check_address.as_str(), b.weight),
            ("", "", "", 1)
        );
        assert!(parse_service(br#"{"address": "127.0.0.1:8080"}"#, "web").unwrap().backends.is_empty());
        assert_eq!(put(r#", "fall": 2.0, "balance": "LC""#, "").unwrap().balance, Balance::LeastConn);
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
    fn json_errors_carry_position_and_name_unknown_fields() {
        let fields = r#""name", "address", "backends", "balance", "check_interval", "fall", "rise", "client_timeout""#;
        let unknown = err(parse_services(fixture!("bad/unknown_field.json")));
        assert!(unknown.starts_with(&format!(r#"line 4, column 12: unknown field "adress", expected one of {fields}"#)));
        let colour = err(put("", r#", "colour": "red""#));
        assert!(colour.starts_with(r#"line 1, column 95: unknown field "colour", expected one of "name""#), "{colour}");
        let positional = r#"[{"name": "web", "address": "127.0.0.1:80", "backends": [["b", "127.0.0.1:1"]]}]"#;
        let cases = [
            (err(parse_services(fixture!("bad/truncated.json"))), "line 6, column 48: EOF while parsing a string"),
            (err(parse_service(b"", "web")), "line 1, column 0: EOF while parsing a value"),
            (err(parse_service(b"[]", "web")), "line 1, column 0: invalid type: sequence, expected a JSON object"),
            (
                err(parse_backend(b"42", "web", "b1")),
                r#"line 1, column 2: invalid type: integer "42", expected a JSON object"#,
            ),
            (err(parse_service(b"{} x", "web")), "line 1, column 4: trailing characters"),
            (err(parse_services(positional)), "line 1, column 57: invalid type: sequence, expected a JSON object"),
            (
                err(parse_services(r#"{"services": []}"#)),
                "line 1, column 0: expected a JSON list of services, got an object",
            ),
        ];
        for (actual, expected) in cases {
            assert_eq!(actual, expected);
        }
    }

    #[test]
    fn each_field_rule_names_service_backend_field_and_value() {
        let seconds = "must be a number of seconds from 0 to 1e9, fractions allowed, got";
        let balance = r#"must be "RR" (round robin) or "LC" (least connected), got"#;
        let weight = r#"backend "web1": weight: must be an integer ≥ 0, got -1"#;
        let duplicate = r#"backend "web1": name: is used by more than one backend of the service"#;
        let cases = [
            (err(parse_services(fixture!("bad/negative_weight.json"))), weight.to_string()),
            (err(parse_services(fixture!("bad/balance.json"))), format!(r#"balance: {balance} "random""#)),
            (err(parse_services(fixture!("bad/duplicate_backend.json"))), duplicate.to_string()),
            (
                err(put("", r#", "weight": 4294967296"#)),
                r#"backend "b1": weight: must be an integer ≤ 4294967295, got 4294967296"#.into(),
            ),
            (
                err(parse_backend(br#"{"address": ":0"}"#, "web", "b1")),
                r#"backend "b1": address: port 0 cannot be connected to, got ":0""#.into(),
            ),
            (err(put(r#", "fall": 1.5"#, "")), "fall: must be an integer ≥ 1, got 1.5".into()),
            (err(put(r#", "rise": 0"#, "")), "rise: must be an integer ≥ 1, got 0".into()),
            (err(put(r#", "rise": "2""#, "")), r#"rise: must be an integer ≥ 1, got "2""#.into()),
            (err(put(r#", "check_interval": -1"#, "")), format!("check_interval: {seconds} -1")),
            (err(put(r#", "connect_timeout": "5s""#, "")), format!(r#"connect_timeout: {seconds} "5s""#)),
            (err(put(r#", "server_timeout": 1e300"#, "")), format!("server_timeout: {seconds} 1e300")),
            (err(put(r#", "check_send": 1"#, "")), "check_send: must be a string, got 1".into()),
            (err(put(r#", "balance": "rr""#, "")), format!(r#"balance: {balance} "rr""#)),
            (
                err(parse_service(b"{}", "web")),
                r#"address: is required, expected "host:port", "v4:port" or "[v6]:port""#.into(),
            ),
        ];
        for (actual, expected) in cases {
            assert_eq!(actual, format!(r#"service "web": {expected}"#));
        }
        let reserved = err(parse_service(br#"{"address": ":1"}"#, "_x"));
        assert_eq!(reserved, r#"service "_x": name: names starting with "_" are reserved, got "_x""#);
        let unnamed = err(parse_services(r#"[{"address": ":1"}]"#));
        assert!(unnamed.starts_with(r#"service #1: name: is required, expected letters, digits, ".", "_" and "-""#));
        let expect = format!(r#", "check_expect": "{}""#, "x".repeat(MAX_CHECK_EXPECT + 1));
        assert!(err(put(&expect, "")).contains("check_expect: must be at most 4096 bytes"));
        let check = err(put("", r#", "check_address": "nothing.invalid:1""#));
        assert!(check.starts_with(r#"service "web": backend "b1": check_address: host "nothing.invalid" does not"#));
        let drained = put("", r#", "weight": 0, "check_address": "localhost:1""#).unwrap();
        assert_eq!(drained.backends[0].weight, 0);
        assert_eq!(put(r#", "balance": """#, "").unwrap().balance, Balance::RoundRobin);
    }

    #[test]
    fn names_follow_the_rule() {
        let rule = r#"must be letters, digits, ".", "_" and "-", starting with a letter or digit"#;
        assert_eq!(validate_name("ok.Name-1_x"), Ok(()));
        assert_eq!(validate_name(&"a".repeat(128)), Ok(()));
        assert_eq!(err(validate_name(&"a".repeat(129))), "must be at most 128 bytes, got 129 bytes");
        assert_eq!(err(validate_name("_stats")), r#"names starting with "_" are reserved, got "_stats""#);
        assert_eq!(err(validate_name("a b")), format!(r#"{rule}, got "a b""#));
        assert_eq!(err(validate_name("-a")), format!(r#"{rule}, got "-a""#));
        assert!(err(validate_name("")).starts_with("must not be empty"));
        let unnamed = br#"{"address": ":1", "backends": [{"address": "127.0.0.1:1"}]}"#;
        assert!(err(parse_service(unnamed, "web")).starts_with(r#"service "web": backend #1: name: is required"#));
    }

    #[test]
    fn name_comes_from_the_url_and_must_match_it() {
        assert_eq!(parse_service(br#"{"address": ":1"}"#, "web").unwrap().name, "web");
        assert_eq!(parse_service(br#"{"name": "web", "address": ":1"}"#, "web").unwrap().name, "web");
        let mismatch = err(parse_service(br#"{"name": "api", "address": ":1"}"#, "web"));
        assert_eq!(mismatch, r#"service "web": name: "api" in the body differs from "web" in the URL"#);
        let backend = parse_backend(br#"{"address": "127.0.0.1:9001", "weight": 2}"#, "web", "b1").unwrap();
        assert_eq!(backend, BackendConfig { weight: 2, ..BackendConfig::new("b1", "127.0.0.1:9001") });
        let mismatch = err(parse_backend(br#"{"name": "b2", "address": "127.0.0.1:1"}"#, "web", "b1"));
        assert_eq!(mismatch, r#"service "web": backend "b1": name: "b2" in the body differs from "b1" in the URL"#);
    }

    #[test]
    fn resolve_takes_the_three_forms_and_says_which_is_expected() {
        let form = r#"expected "host:port", "v4:port" or "[v6]:port""#;
        assert_eq!(resolve("127.0.0.1:80"), Ok(SocketAddr::from(([127, 0, 0, 1], 80))));
        assert_eq!(resolve("[::1]:80").map(|a| a.is_ipv6()), Ok(true));
        assert_eq!(resolve("localhost:80").map(|a| a.ip().is_loopback()), Ok(true));
        assert_eq!(resolve(":80"), Ok(SocketAddr::from(([0, 0, 0, 0], 80))));
        assert_eq!(err(resolve("localhost")), format!(r#"{form}, got "localhost" (no port)"#));
        assert_eq!(err(resolve("::1:80")), format!(r#"{form} (IPv6 needs brackets), got "::1:80""#));
        assert_eq!(err(resolve("h:99999")), r#"port must be a number from 0 to 65535, got "99999" in "h:99999""#);
        assert!(err(resolve("nothing.invalid:80")).starts_with(r#"host "nothing.invalid" does not resolve: "#));
    }

    #[test]
    fn lists_reject_duplicate_names_and_listen_addresses() {
        let two = |a: &str, b: &str| {
            format!(r#"[{{"name": "a", "address": "{a}"}}, {{"name": "{b}", "address": "127.0.0.1:81"}}]"#)
        };
        let name = err(parse_services(&two("127.0.0.1:80", "a")));
        assert_eq!(name, r#"service "a": name: is used by more than one service"#);
        let address = err(parse_services(&two("0.0.0.0:81", "b")));
        assert_eq!(
            address,
            r#"service "b": address: "127.0.0.1:81" conflicts with 0.0.0.0:81, where service "a" listens"#
        );
        assert_eq!(parse_services(&two("127.0.0.1:0", "b")).unwrap().len(), 2);
        assert_eq!(parse_services(&two("127.0.0.2:81", "b")).unwrap().len(), 2);
    }

    #[test]
    fn backends_that_reach_a_listener_are_loops() {
        let svc = |name: &str, address: &str, backend: &str| ServiceConfig {
            backends: vec![BackendConfig::new("b", backend)],
            ..ServiceConfig::new(name, address)
        };
        let same = err(check_loops(&[svc("a", "127.0.0.1:8080", "127.0.0.1:8080")]));
        let expected = r#"address: "127.0.0.1:8080" reaches 127.0.0.1:8080, where service "a" listens; it would loop"#;
        assert_eq!(same, format!(r#"service "a": backend "b": {expected}"#));
        let other = [svc("a", "0.0.0.0:8080", "127.0.0.1:1"), svc("c", "0.0.0.0:8081", "localhost:8080")];
        assert!(err(check_loops(&other))
            .starts_with(r#"service "c": backend "b": address: "localhost:8080" reaches 0.0.0.0:8080"#));
        assert!(check_loops(&[svc("a", "127.0.0.1:8080", "0.0.0.0:8080")]).is_err());
        assert!(check_loops(&[svc("a", "127.0.0.1:8080", "127.0.0.1:8081")]).is_ok());
        assert!(check_loops(&[svc("a", "127.0.0.1:8080", "127.0.0.2:8080")]).is_ok());
        assert!(check_loops(&[svc("a", "0.0.0.0:8080", "192.0.2.1:8080")]).is_ok()); // TEST-NET-1: not local
        assert!(check_loops(&[svc("a", "127.0.0.1:0", "127.0.0.1:0")]).is_ok());
        let file =
            r#"[{"name": "a", "address": "0.0.0.0:80", "backends": [{"name": "b", "address": "127.0.0.1:80"}]}]"#;
        assert!(err(parse_services(file)).ends_with("it would loop"));
    }

    #[test]
    fn a_failed_parse_never_yields_a_partial_list() {
        let text = r#"[{"name": "a", "address": "127.0.0.1:80"}, {"name": "b", "address": "127.0.0.1:81", "fall": 0}]"#;
        assert_eq!(err(parse_services(text)), r#"service "b": fall: must be an integer ≥ 1, got 0"#);
    }

    #[test]
    fn to_json_is_sorted_complete_and_round_trips() {
        let mut web = ServiceConfig::new("web", "127.0.0.1:8080");
        web.backends = vec![BackendConfig::new("z", "127.0.0.1:9002"), BackendConfig::new("a", "127.0.0.1:9001")];
        let api = ServiceConfig { balance: Balance::LeastConn, ..ServiceConfig::new("api", "127.0.0.1:8081") };
        let text = to_json(&[web.clone(), api.clone()]);
        assert!(text.starts_with("[\n  {\n    \"name\": \"api\",") && text.ends_with("}\n]\n"), "{text}");
        for field in [r#""check_send": """#, r#""weight": 1"#, r#""balance": "LC""#, r#""check_interval": 2,"#] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        let parsed = parse_services(&text).unwrap();
        assert_eq!((&parsed[0], &parsed[1], parsed[1].backends[0].name.as_str()), (&api, &web, "z"));
        assert_eq!(to_json(&parsed), text);
        assert_eq!(to_json(&[]), "[]\n");
        let go = parse_services(fixture!("go_shuttle_state.json")).unwrap();
        assert_eq!(parse_services(&to_json(&go)).unwrap(), [go[1].clone(), go[0].clone()]);
    }

    #[test]
    fn seconds_print_whole_as_integers_and_fractions_exactly() {
        let (check_interval, client_timeout, connect_timeout) = (0.25, 30.0, 1e-7);
        let s = ServiceConfig { check_interval, client_timeout, connect_timeout, ..ServiceConfig::new("w", ":1") };
        let text = to_json(std::slice::from_ref(&s));
        for field in [
            "\"check_interval\": 0.25,",
            "\"client_timeout\": 30,",
            "\"server_timeout\": 0,",
            "\"connect_timeout\": 1e-7,",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert_eq!(parse_services(&text).unwrap(), [s]);
        assert_eq!((seconds(0.0), seconds(f64::NAN)), (None, None));
        assert_eq!((seconds(0.25), seconds(2.0)), (Some(Duration::from_millis(250)), Some(Duration::from_secs(2))));
        assert_eq!(seconds(f64::INFINITY), Some(Duration::from_secs(1_000_000_000)));
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
        assert_eq!((fs::read_to_string(&path).unwrap(), load(&path).unwrap()), (to_json(&services), services.clone()));
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
        assert!(save_atomic(&dir.path().join("missing/state.json"), &services).is_err());
        let missing = load(&dir.path().join("nope.json"));
        assert!(matches!(missing, Err(ConfigError::Io { .. })));
        assert!(err(missing).starts_with("cannot read "));
    }
}
