//! The global options (reference §2.1): what a config file's object form may
//! set besides its services, and the rules of their values, which the
//! command line's flags share (`cli`), so a value means the same in both.

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::model::config::MAX_SECONDS;

/// The most worker loops shuttle runs.
pub const MAX_WORKERS: usize = 256;

/// How many worker loops to run (`-workers`, `"workers"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// This many.
    Count(usize),
    /// One per CPU the process may run on.
    Auto,
}

/// How the access log writes its lines (`-access-log-format`, `"access_log": {"format"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `key=value` fields.
    Text,
    /// One JSON object a line.
    Json,
}

/// The global options a config file's object form sets; `None` is "not in the file".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Globals {
    /// `"admin"`: the admin API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminOptions>,
    /// `"grace"`: seconds open connections may finish after SIGTERM.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "some_seconds")]
    pub grace: Option<f64>,
    /// `"workers"`: how many loops proxy.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "some_workers")]
    pub workers: Option<Workers>,
    /// `"pin"`: pin each worker to a CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin: Option<bool>,
    /// `"access_log"`: one line per finished connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogOptions>,
}

/// `"admin": {...}`: the flags `-http`, `-http-mode`, `-admin-host` and `-admin-token-file`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AdminOptions {
    /// `host:port`, or a unix socket path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// A unix socket's permissions, written `"0660"`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "some_mode")]
    pub mode: Option<u32>,
    /// Host names the API answers for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// The file holding the bearer token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

/// `"access_log": {...}`: the flags `-access-log` and `-access-log-format`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AccessLogOptions {
    /// A file, or `-` for standard output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `"text"` or `"json"`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "some_format")]
    pub format: Option<LogFormat>,
}

/// `"admin"` as read: loose values, so a bad one is reported with its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    address: Option<Value>,
    mode: Option<Value>,
    hosts: Option<Value>,
    token_file: Option<Value>,
}

/// `"access_log"` as read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccessLog {
    path: Option<Value>,
    format: Option<Value>,
}

/// A global option's value broke its rule: the key (`admin.mode`) and the problem.
pub type Problem = (&'static str, String);

impl Globals {
    /// Builds the options from the values of an object file, checking each by the flag's rule.
    pub(crate) fn build(
        admin: Option<RawAdmin>,
        grace: Option<Value>,
        workers: Option<Value>,
        pin: Option<Value>,
        access_log: Option<RawAccessLog>,
    ) -> Result<Globals, Problem> {
        let admin = match admin {
            None => None,
            Some(raw) => Some(AdminOptions {
                address: opt(raw.address, "admin.address", |v| text(v).and_then(non_empty))?,
                mode: opt(raw.mode, "admin.mode", |v| text(v).and_then(|s| mode(&s)))?,
                hosts: opt(raw.hosts, "admin.hosts", hosts)?,
                token_file: opt(raw.token_file, "admin.token_file", |v| text(v).and_then(non_empty))?,
            }),
        };
        let access_log = match access_log {
            None => None,
            Some(raw) => Some(AccessLogOptions {
                path: opt(raw.path, "access_log.path", |v| text(v).and_then(non_empty))?,
                format: opt(raw.format, "access_log.format", |v| text(v).and_then(|s| log_format(&s)))?,
            }),
        };
        Ok(Globals {
            admin,
            grace: opt(grace, "grace", |v| v.as_f64().ok_or_else(|| seconds_rule(&v)).and_then(seconds))?,
            workers: opt(workers, "workers", |v| match v {
                Value::String(s) if s == "auto" => Ok(Workers::Auto),
                Value::Number(n) => workers_count(&n.to_string()),
                other => Err(workers_rule(&other.to_string())),
            })?,
            pin: opt(pin, "pin", |v| v.as_bool().ok_or_else(|| format!("expected true or false, got {v}")))?,
            access_log,
        })
    }

    /// The keys (`grace`, `admin.address`) whose values differ between `self` and `other`.
    pub fn changed(&self, other: &Globals) -> Vec<String> {
        let (mine, theirs) = (leaves(self), leaves(other));
        let mut keys: Vec<String> = mine.keys().chain(theirs.keys()).cloned().collect();
        keys.sort();
        keys.dedup();
        keys.retain(|k| mine.get(k) != theirs.get(k));
        keys
    }
}

/// Every option set, by its dotted key.
fn leaves(globals: &Globals) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(Value::Object(top)) = serde_json::to_value(globals) else { return out };
    for (key, value) in top {
        match value {
            Value::Object(inner) => out.extend(inner.into_iter().map(|(k, v)| (format!("{key}.{k}"), v))),
            value => drop(out.insert(key, value)),
        }
    }
    out
}

/// A present value checked by `check`; absent or `null` is `None` (not in the file).
fn opt<T>(
    value: Option<Value>,
    key: &'static str,
    check: impl FnOnce(Value) -> Result<T, String>,
) -> Result<Option<T>, Problem> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => check(v).map(Some).map_err(|problem| (key, problem)),
    }
}

fn text(value: Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(format!("expected a string, got {other}")),
    }
}

fn hosts(value: Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = value else { return Err(format!("expected a list of host names, got {value}")) };
    let mut names = Vec::new();
    for item in items {
        names.extend(host_names(&text(item)?)?);
    }
    Ok(names)
}

/// A value that must not be empty (a path, an address).
pub fn non_empty(s: String) -> Result<String, String> {
    if s.is_empty() {
        return Err("needs a value, got an empty one".into());
    }
    Ok(s)
}

/// A number of seconds such as `-grace`'s: from 0 to `MAX_SECONDS`.
pub fn seconds(value: f64) -> Result<f64, String> {
    if (0.0..=MAX_SECONDS).contains(&value) {
        Ok(value)
    } else {
        Err(seconds_rule(&value))
    }
}

/// What a bad number of seconds gets told; `got` as it should be shown.
pub fn seconds_rule(got: &dyn std::fmt::Display) -> String {
    format!("expected a number of seconds from 0 to {MAX_SECONDS:e}, got {got}")
}

/// `-workers`: a count from 1 to `MAX_WORKERS`, or `auto`.
pub fn workers(s: &str) -> Result<Workers, String> {
    if s == "auto" {
        return Ok(Workers::Auto);
    }
    workers_count(s)
}

fn workers_count(s: &str) -> Result<Workers, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(Workers::Count(n)),
        _ => Err(workers_rule(&format!("{s:?}"))),
    }
}

fn workers_rule(got: &str) -> String {
    format!("expected a number of workers from 1 to {MAX_WORKERS}, or auto, got {got}")
}

/// Permissions in octal: `0600`, `660`, `0o660`.
pub fn mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if !digits.is_empty() && mode <= 0o777 => Ok(mode),
        _ => Err(format!("expected permissions in octal such as 0600 or 0660, got {s:?}")),
    }
}

/// Host names separated by commas, each of letters, digits, `-`, `.` and `_`.
pub fn host_names(names: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for name in names.split(',').map(str::trim) {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
            let names = crate::model::config::one_line(names);
            return Err(format!("expected host names separated by commas, got {names:?}"));
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// `text` or `json`.
pub fn log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected text or json, got {s:?}")),
    }
}

// The `serialize_with` helpers only ever see `Some`: `None` is skipped.
fn some_seconds<S: Serializer>(value: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) if v.fract() == 0.0 && *v < 1e15 => s.serialize_u64(*v as u64),
        Some(v) => s.serialize_f64(*v),
        None => s.serialize_none(),
    }
}

fn some_workers<S: Serializer>(value: &Option<Workers>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(Workers::Count(n)) => s.serialize_u64(*n as u64),
        Some(Workers::Auto) => s.serialize_str("auto"),
        None => s.serialize_none(),
    }
}

fn some_mode<S: Serializer>(value: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(mode) => s.serialize_str(&format!("{mode:04o}")),
        None => s.serialize_none(),
    }
}

fn some_format<S: Serializer>(value: &Option<LogFormat>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(LogFormat::Text) => s.serialize_str("text"),
        Some(LogFormat::Json) => s.serialize_str("json"),
        None => s.serialize_none(),
    }
}
