//! The two line formats, parsed strictly: text is the time then `key=value`
//! words in a fixed order, JSON an object with exactly the same fields.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::Format;

/// The fields of a line after its time, in the order the text format writes them.
const KEYS: [&str; 11] = [
    "service",
    "client",
    "backend",
    "backend_address",
    "connect_ms",
    "queue_ms",
    "duration_ms",
    "sent",
    "received",
    "failed_connects",
    "end",
];

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Line {
    pub time: SystemTime,
    pub service: String,
    pub client: SocketAddr,
    pub backend: Option<String>,
    pub backend_address: Option<SocketAddr>,
    pub connect_ms: Option<f64>,
    pub queue_ms: f64,
    pub duration_ms: f64,
    pub sent: u64,
    pub received: u64,
    pub failed_connects: u64,
    pub end: String,
}

/// Parses `2026-12-03T08:16:51.279Z` (UTC, milliseconds).
fn parse_time(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("not an RFC 3339 UTC time with milliseconds: {s:?}");
    let b = s.as_bytes();
    let shape = b.len() == 24
        && [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')]
            .iter()
            .all(|&(i, c)| b[i] == c);
    if !shape {
        return Err(bad());
    }
    let num = |from: usize, to: usize| s[from..to].parse::<i64>().map_err(|_| bad());
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second, millis) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis;
    Ok(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).map_err(|_| bad())?))
}

/// A text line: the time, then `key=value` words in [`KEYS`] order; `-` is none.
fn parse_text(text: &str) -> Result<Line, String> {
    let mut words = text.split(' ');
    let time = parse_time(words.next().unwrap_or_default())?;
    let mut fields = Vec::new();
    for word in words {
        let (key, value) = word.split_once('=').ok_or_else(|| format!("{word:?} is not key=value in {text:?}"))?;
        fields.push((key, value));
    }
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    if keys != KEYS {
        return Err(format!("keys {keys:?} are not {KEYS:?} in {text:?}"));
    }
    let field = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v).unwrap_or_default();
    let some = |key: &str| Some(field(key)).filter(|v| *v != "-");
    let millis = |key: &str| -> Result<f64, String> {
        let value = field(key);
        // Three decimals, always: sub-millisecond connects are the common case.
        let decimals = value.split_once('.').map(|(_, d)| d.len());
        match (decimals, value.parse()) {
            (Some(3), Ok(ms)) => Ok(ms),
            _ => Err(format!("{key}={value:?} is not milliseconds with three decimals in {text:?}")),
        }
    };
    let number = |key: &str| field(key).parse::<u64>().map_err(|e| format!("{key}: {e} in {text:?}"));
    let addr = |v: &str| v.parse::<SocketAddr>().map_err(|e| format!("{v:?}: {e} in {text:?}"));
    Ok(Line {
        time,
        service: field("service").to_string(),
        client: addr(field("client"))?,
        backend: some("backend").map(str::to_string),
        backend_address: some("backend_address").map(addr).transpose()?,
        connect_ms: some("connect_ms").map(|_| millis("connect_ms")).transpose()?,
        queue_ms: millis("queue_ms")?,
        duration_ms: millis("duration_ms")?,
        sent: number("sent")?,
        received: number("received")?,
        failed_connects: number("failed_connects")?,
        end: field("end").to_string(),
    })
}

/// A JSON line: an object with `time` and every one of [`KEYS`], nothing else;
/// `backend`, `backend_address` and `connect_ms` may be null.
fn parse_json(text: &str) -> Result<Line, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("{e} in {text:?}"))?;
    let object = value.as_object().ok_or_else(|| format!("not an object: {text:?}"))?;
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = KEYS.iter().copied().chain(["time"]).collect();
    keys.sort_unstable();
    expected.sort_unstable();
    if keys != expected {
        return Err(format!("keys {keys:?} are not {expected:?} in {text:?}"));
    }
    let wrong = |key: &str| format!("{key} has the wrong type in {text:?}");
    let string = |key: &str| value[key].as_str().ok_or_else(|| wrong(key));
    let nullable = |key: &str| match &value[key] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(wrong(key)),
    };
    let number = |key: &str| value[key].as_u64().ok_or_else(|| wrong(key));
    let addr = |v: &str| v.parse::<SocketAddr>().map_err(|e| format!("{v:?}: {e} in {text:?}"));
    let connect_ms = match &value["connect_ms"] {
        Value::Null => None,
        v => Some(v.as_f64().ok_or_else(|| wrong("connect_ms"))?),
    };
    Ok(Line {
        time: parse_time(string("time")?)?,
        service: string("service")?.to_string(),
        client: addr(string("client")?)?,
        backend: nullable("backend")?,
        backend_address: nullable("backend_address")?.map(|a| addr(&a)).transpose()?,
        connect_ms,
        queue_ms: value["queue_ms"].as_f64().ok_or_else(|| wrong("queue_ms"))?,
        duration_ms: value["duration_ms"].as_f64().ok_or_else(|| wrong("duration_ms"))?,
        sent: number("sent")?,
        received: number("received")?,
        failed_connects: number("failed_connects")?,
        end: string("end")?.to_string(),
    })
}

#[track_caller]
pub(super) fn parse(format: Format, text: &str) -> Line {
    let parsed = match format {
        Format::Text => parse_text(text),
        Format::Json => parse_json(text),
    };
    parsed.unwrap_or_else(|e| panic!("a bad {format:?} access-log line: {e}"))
}

#[test]
fn the_time_parser_reads_rfc3339_milliseconds() {
    assert_eq!(parse_time("1970-01-01T00:00:00.000Z"), Ok(UNIX_EPOCH));
    let t = parse_time("2026-12-03T08:16:51.279Z").unwrap();
    assert_eq!(t.duration_since(UNIX_EPOCH).unwrap(), Duration::from_millis(1_796_285_811_279));
    assert!(parse_time("2026-12-03 08:16:51.279Z").is_err());
    assert!(parse_time("2026-12-03T08:16:51Z").is_err());
}
