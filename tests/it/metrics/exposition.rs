//! A checker of the Prometheus text exposition format, version 0.0.4, as
//! strict as shuttle needs: it parses every line and returns the samples, or
//! says which line breaks which rule. Written from the format's description,
//! without a Prometheus crate.
//!
//! Rules checked: `# HELP` and `# TYPE` (counter, gauge or histogram) come
//! once per family, before its samples; a family's samples are contiguous;
//! metric and label names have the format's alphabet; label values are
//! quoted with only `\\`, `\"` and `\n` escaped; values are floats (`+Inf`,
//! `-Inf`, `NaN` spelled so); counters end in `_total` and are finite and
//! non-negative; every name starts with `shuttle_`; a histogram series has
//! buckets with ascending `le` ending in `+Inf`, non-decreasing counts, a
//! `_count` equal to the `+Inf` bucket and a `_sum`; no series twice.

use std::collections::{BTreeMap, BTreeSet};

/// A sample's labels, in the order written.
pub type Labels = Vec<(String, String)>;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, with its `_bucket`/`_sum`/`_count` suffix.
    pub name: String,
    /// Labels in the order written.
    pub labels: Labels,
    /// The value.
    pub value: f64,
}

/// A checked exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Each family's type.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of the one sample named `name` whose labels are exactly `labels` (in any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeSet<(&str, &str)> = labels.iter().copied().collect();
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<BTreeSet<_>>() == want
            })
            .map(|s| s.value)
    }

    /// [`Exposition::get`], panicking when there is no such sample.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    /// Every sample named `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

/// Whether `name` is a metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Whether `name` is a label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A sample value: a decimal float, or `+Inf`, `-Inf`, `NaN`.
fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    // Rust would also take "inf" or "infinity"; the format spells them as above.
    let numeric = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    let has_digit = text.bytes().any(|b| b.is_ascii_digit());
    match text.parse::<f64>() {
        Ok(v) if numeric && has_digit => Ok(v),
        _ => Err(format!("value {text:?} is not a float")),
    }
}

/// Parses `{name="value",...}` at the start of `text`; returns the labels and the rest.
fn parse_labels(text: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = text.strip_prefix('{').ok_or("labels must start with {")?;
    if let Some(after) = rest.strip_prefix('}') {
        return Ok((labels, after));
    }
    loop {
        let eq = rest.find('=').ok_or_else(|| format!("no = after label name in {rest:?}"))?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..].strip_prefix('"').ok_or_else(|| format!("label {name} value is not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name} value has no closing quote")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("label {name} value has a bad escape \\{:?}", other.map(|c| c.1))),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.iter().any(|(n, _)| n == name) {
            return Err(format!("label {name} given twice"));
        }
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        rest = rest.strip_prefix(',').ok_or_else(|| format!("expected , or }} after label {name}"))?;
    }
}

/// One sample line: `name[{labels}] value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end..])?
    } else {
        (Vec::new(), &line[name_end..])
    };
    let rest = rest.strip_prefix(' ').ok_or("expected one space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().unwrap_or_default())?;
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("extra fields after the timestamp".into());
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

/// The family a sample of type `kind` named `name` belongs to, if it is `family`'s.
fn belongs(name: &str, family: &str, kind: &str) -> bool {
    match kind {
        "histogram" => ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s) == Some(family)),
        _ => name == family,
    }
}

/// A histogram series: its buckets in order, `_sum` and `_count`.
#[derive(Default)]
struct Series {
    buckets: Vec<(f64, f64)>,
    sum: Option<f64>,
    count: Option<f64>,
}

/// The labels of a sample as a sorted key, without `le`.
fn series_key(labels: &[(String, String)]) -> Labels {
    let mut key: Vec<_> = labels.iter().filter(|(n, _)| n != "le").cloned().collect();
    key.sort();
    key
}

fn check_histogram(family: &str, samples: &[Sample]) -> Result<(), String> {
    let mut series: BTreeMap<Labels, Series> = BTreeMap::new();
    for s in samples {
        let key = series_key(&s.labels);
        let entry = series.entry(key.clone()).or_default();
        let le = s.labels.iter().find(|(n, _)| n == "le").map(|(_, v)| v.as_str());
        match (s.name.strip_prefix(family), le) {
            (Some("_bucket"), Some(le)) => {
                let bound = parse_value(le).map_err(|e| format!("{family}{key:?}: le: {e}"))?;
                if s.value < 0.0 || s.value.fract() != 0.0 {
                    return Err(format!("{family}{key:?}: bucket count {} is not a whole number", s.value));
                }
                if let Some(&(last, count)) = entry.buckets.last() {
                    if bound <= last {
                        return Err(format!("{family}{key:?}: le {le} after {last}: not ascending"));
                    }
                    if s.value < count {
                        return Err(format!("{family}{key:?}: bucket le={le} {} below the previous {count}", s.value));
                    }
                }
                entry.buckets.push((bound, s.value));
            }
            (Some("_bucket"), None) => return Err(format!("{family}{key:?}: a bucket without le")),
            (Some(_), Some(_)) => return Err(format!("{}: only buckets have le", s.name)),
            (Some("_sum"), None) => entry.sum = Some(s.value),
            (Some("_count"), None) => entry.count = Some(s.value),
            _ => return Err(format!("{}: not a sample of histogram {family}", s.name)),
        }
    }
    for (key, s) in &series {
        let last = s.buckets.last().ok_or_else(|| format!("{family}{key:?}: no buckets"))?;
        if last.0 != f64::INFINITY {
            return Err(format!("{family}{key:?}: the last bucket is le={} instead of +Inf", last.0));
        }
        let count = s.count.ok_or_else(|| format!("{family}{key:?}: no _count"))?;
        if count != last.1 {
            return Err(format!("{family}{key:?}: _count {count} differs from the +Inf bucket {}", last.1));
        }
        s.sum.ok_or_else(|| format!("{family}{key:?}: no _sum"))?;
    }
    Ok(())
}

/// Ends the family samples went to: checks a histogram's series, and starts afresh.
fn finish(current: &Option<(String, String)>, samples: &mut Vec<Sample>) -> Result<(), String> {
    if let Some((family, kind)) = current {
        if kind == "histogram" {
            check_histogram(family, samples)?;
        }
    }
    samples.clear();
    Ok(())
}

/// Checks a whole exposition; the error names the line (1-based) or family at fault.
pub fn check(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the last line has no line feed".into());
    }
    let mut out = Exposition::default();
    let mut help: BTreeSet<String> = BTreeSet::new();
    // The family samples go to now: the last one declared. Closed families can't take more.
    let mut current: Option<(String, String)> = None;
    let mut family_samples: Vec<Sample> = Vec::new();
    let mut series: BTreeSet<(String, Labels)> = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').unwrap_or((rest, ""));
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            if out.types.contains_key(name) || !help.insert(name.to_string()) {
                return Err(at(format!("family {name} declared twice or HELP after TYPE")));
            }
            let mut chars = doc.chars();
            while let Some(c) = chars.next() {
                if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                    return Err(at("HELP text has a bad escape".into()));
                }
            }
            finish(&current, &mut family_samples).map_err(at)?;
            current = None;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE without a type".into()))?;
            if !matches!(kind, "counter" | "gauge" | "histogram") {
                return Err(at(format!("type {kind:?} is not counter, gauge or histogram")));
            }
            if !help.contains(name) {
                return Err(at(format!("TYPE of {name} without a HELP before it")));
            }
            if out.types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(at(format!("family {name} typed twice")));
            }
            if !name.starts_with("shuttle_") {
                return Err(at(format!("{name} does not start with shuttle_")));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at(format!("counter {name} does not end in _total")));
            }
            finish(&current, &mut family_samples).map_err(at)?;
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        if line.starts_with('#') {
            // Any other comment is allowed by the format.
            continue;
        }
        let sample = parse_sample(line).map_err(at)?;
        let Some((family, kind)) = &current else {
            return Err(at(format!("sample {} outside any declared family (after HELP, before TYPE?)", sample.name)));
        };
        if !belongs(&sample.name, family, kind) {
            return Err(at(format!("sample {} inside family {family}: families must be contiguous", sample.name)));
        }
        let uses_le = sample.labels.iter().any(|(n, _)| n == "le");
        if uses_le && !sample.name.ends_with("_bucket") {
            return Err(at("le is reserved for histogram buckets".into()));
        }
        match kind.as_str() {
            "counter" if !(sample.value.is_finite() && sample.value >= 0.0) => {
                return Err(at(format!("counter value {} is not finite and non-negative", sample.value)));
            }
            "gauge" if sample.value.is_nan() => return Err(at("gauge value is NaN".into())),
            _ => {}
        }
        let mut labels = sample.labels.clone();
        labels.sort();
        if !series.insert((sample.name.clone(), labels)) {
            return Err(at(format!("series {}{:?} appears twice", sample.name, sample.labels)));
        }
        family_samples.push(sample.clone());
        out.samples.push(sample);
    }
    finish(&current, &mut family_samples)?;
    if let Some(name) = help.iter().find(|n| !out.types.contains_key(*n)) {
        return Err(format!("family {name} has a HELP but no TYPE"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::check;

    /// A small exposition that follows every rule: a counter, a gauge and a histogram.
    const GOOD: &str = "\
# HELP shuttle_a_total A counter, with \\\\ and \\n in its help.
# TYPE shuttle_a_total counter
shuttle_a_total{service=\"web\",backend=\"a.b-c_d\"} 3
shuttle_a_total{service=\"web\",backend=\"q\\\"\\\\\\n\"} 0
# HELP shuttle_g A gauge with no samples.
# TYPE shuttle_g gauge
# HELP shuttle_h_seconds A histogram.
# TYPE shuttle_h_seconds histogram
shuttle_h_seconds_bucket{service=\"web\",le=\"0.0005\"} 1
shuttle_h_seconds_bucket{service=\"web\",le=\"1\"} 2
shuttle_h_seconds_bucket{service=\"web\",le=\"+Inf\"} 2
shuttle_h_seconds_sum{service=\"web\"} 1.25
shuttle_h_seconds_count{service=\"web\"} 2
# HELP shuttle_start_time_seconds A gauge.
# TYPE shuttle_start_time_seconds gauge
shuttle_start_time_seconds 1.7e9
";

    #[test]
    fn checker_accepts_a_valid_exposition_and_unescapes_labels() {
        let e = check(GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.samples.len(), 8);
        assert_eq!(e.value("shuttle_a_total", &[("backend", "a.b-c_d"), ("service", "web")]), 3.0);
        assert_eq!(e.value("shuttle_a_total", &[("service", "web"), ("backend", "q\"\\\n")]), 0.0);
        assert_eq!(e.value("shuttle_h_seconds_bucket", &[("service", "web"), ("le", "+Inf")]), 2.0);
        assert_eq!(e.types["shuttle_h_seconds"], "histogram");
        assert_eq!(check("").map(|e| e.samples.len()), Ok(0));
    }

    /// `GOOD` with `from` replaced by `to` (which must occur) fails with an error containing `why`.
    #[track_caller]
    fn rejects(from: &str, to: &str, why: &str) {
        assert!(GOOD.contains(from), "the fixture has no {from:?}");
        rejected(&GOOD.replacen(from, to, 1), from, to, why);
    }

    #[track_caller]
    fn rejected(bad: &str, from: &str, to: &str, why: &str) {
        match check(bad) {
            Ok(_) => panic!("accepted with {from:?} → {to:?}:\n{bad}"),
            Err(e) => assert!(e.contains(why), "{from:?} → {to:?}: expected an error about {why:?}, got {e:?}"),
        }
    }

    #[test]
    fn checker_rejects_broken_declarations() {
        rejects("# TYPE shuttle_a_total counter\n", "", "outside any declared family");
        rejects("# HELP shuttle_g A gauge with no samples.\n", "", "without a HELP");
        rejects("# TYPE shuttle_g gauge\n", "", "HELP but no TYPE");
        rejects("# TYPE shuttle_g gauge", "# TYPE shuttle_g summary", "not counter, gauge or histogram");
        rejects("# HELP shuttle_g A", "# HELP shuttle_a_total A", "declared twice");
        rejects("counter, with \\\\", "counter, with \\t", "bad escape");
        rejects(
            "# TYPE shuttle_a_total counter",
            "# TYPE shuttle_a_total gauge\n# TYPE shuttle_a_total counter",
            "typed twice",
        );
    }

    #[test]
    fn checker_rejects_bad_names() {
        rejected(
            &GOOD.replace("shuttle_a_total", "shuttle_a"),
            "shuttle_a_total",
            "shuttle_a",
            "does not end in _total",
        );
        rejects("shuttle_g A gauge with no samples.\n# TYPE shuttle_g", "other_g A.\n# TYPE other_g", "shuttle_");
        rejects("shuttle_a_total{service", "shuttle_a_total{1service", "bad label name");
        rejects("shuttle_a_total{service", "shuttle_a_total{serv-ice", "bad label name");
        rejects(
            "shuttle_a_total{service=\"web\",backend=\"a",
            "shuttle-a_total{service=\"web\",backend=\"a",
            "metric name",
        );
    }

    #[test]
    fn checker_rejects_bad_label_values_and_values() {
        rejects("backend=\"a.b-c_d\"", "backend=a.b-c_d", "not quoted");
        rejects("backend=\"a.b-c_d\"", "backend=\"a\"b\"", "expected , or }");
        rejects("backend=\"a.b-c_d\"", "backend=\"a\\tb\"", "bad escape");
        rejects("backend=\"a.b-c_d\"", "backend=\"a.b-c_d", "no closing quote");
        rejects("backend=\"a.b-c_d\"} 3", "backend=\"a.b-c_d\"} three", "not a float");
        rejects("backend=\"a.b-c_d\"} 3", "backend=\"a.b-c_d\"} inf", "not a float");
        rejects("backend=\"a.b-c_d\"} 3", "backend=\"a.b-c_d\"}  3", "not a float");
        rejects("backend=\"a.b-c_d\"} 3", "backend=\"a.b-c_d\"} -3", "non-negative");
        rejects("service=\"web\",backend=\"a.b-c_d\"", "service=\"web\",service=\"a.b-c_d\"", "twice");
        rejects("1.7e9\n", "1.7e9", "no line feed");
    }

    #[test]
    fn checker_rejects_scattered_families_and_duplicate_series() {
        rejects(
            "shuttle_start_time_seconds 1.7e9\n",
            "shuttle_start_time_seconds 1.7e9\nshuttle_a_total 1\n",
            "contiguous",
        );
        rejects(
            "shuttle_a_total{service=\"web\",backend=\"q\\\"\\\\\\n\"} 0",
            "shuttle_a_total{backend=\"a.b-c_d\",service=\"web\"} 0",
            "appears twice",
        );
    }

    #[test]
    fn checker_rejects_broken_histograms() {
        rejects("le=\"+Inf\"} 2\n", "le=\"2\"} 2\n", "instead of +Inf");
        rejects("le=\"1\"} 2", "le=\"0.0001\"} 2", "not ascending");
        rejects("le=\"1\"} 2", "le=\"1\"} 0", "below the previous");
        rejects("le=\"+Inf\"} 2", "le=\"+Inf\"} 3", "differs from the +Inf bucket");
        rejects("shuttle_h_seconds_sum{service=\"web\"} 1.25\n", "", "no _sum");
        rejects("shuttle_h_seconds_count{service=\"web\"} 2\n", "", "no _count");
        rejects("le=\"0.0005\"} 1", "le=\"0.0005\"} 0.5", "whole number");
        rejects(
            "shuttle_h_seconds_sum{service=\"web\"}",
            "shuttle_h_seconds_sum{service=\"web\",le=\"1\"}",
            "reserved",
        );
    }
}
