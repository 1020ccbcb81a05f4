//! A config or state file's two forms (reference §2): the plain list of
//! services, or an object with `"services"` and the global options. The form
//! read is the form written back, with its global options as they were read.

use serde::Deserialize;
use serde_json::Value;

use super::{build_all, json_error, ConfigError, Object, RawService, ServiceConfig};
use crate::model::options::{Globals, RawAccessLog, RawAdmin};

/// A config or state file: its services, and the form they came in.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// The services, every default applied and validated.
    pub services: Vec<ServiceConfig>,
    /// List or object, with the object's global options.
    pub form: Form,
}

/// How a file is laid out.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Form {
    /// `[service, ...]`, as the Go shuttle wrote.
    #[default]
    List,
    /// `{"services": [...], ...}` with these global options.
    Object(Globals),
}

/// The object form as read: `services` and the global options, nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    services: Option<Vec<Object<RawService>>>,
    admin: Option<Object<RawAdmin>>,
    grace: Option<Value>,
    workers: Option<Value>,
    pin: Option<Value>,
    access_log: Option<Object<RawAccessLog>>,
}

/// Parses a config or state file in either form.
pub fn parse_file(text: &str) -> Result<ConfigFile, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if !text.trim_start().starts_with('{') {
        return Ok(ConfigFile { services: super::parse_services(text)?, form: Form::List });
    }
    let raw: Object<RawFile> = serde_json::from_str(text).map_err(json_error)?;
    let raw = raw.0;
    let Some(services) = raw.services else {
        let problem = "is required: an object config holds its services in \"services\": [...]".to_string();
        return Err(ConfigError::Global { key: "services", problem });
    };
    let globals = Globals::build(raw.admin.map(|o| o.0), raw.grace, raw.workers, raw.pin, raw.access_log.map(|o| o.0))
        .map_err(|(key, problem)| ConfigError::Global { key, problem })?;
    let services = build_all(services)?;
    Ok(ConfigFile { services, form: Form::Object(globals) })
}

impl Form {
    /// The file's text for `services` in this form: pretty JSON, services
    /// sorted by name, global options first, trailing newline.
    pub fn render(&self, services: &[ServiceConfig]) -> String {
        let Form::Object(globals) = self else { return super::to_json(services) };
        #[derive(serde::Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            globals: &'a Globals,
            services: Vec<&'a ServiceConfig>,
        }
        let mut sorted: Vec<&ServiceConfig> = services.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        match serde_json::to_string_pretty(&Out { globals, services: sorted }) {
            Ok(mut text) => {
                text.push('\n');
                text
            }
            // Unreachable with these types; never hand out half a document.
            Err(e) => {
                log::error!("cannot render the config as JSON: {e}");
                super::to_json(services)
            }
        }
    }

    /// The global options, if any.
    pub fn globals(&self) -> Option<&Globals> {
        match self {
            Form::List => None,
            Form::Object(globals) => Some(globals),
        }
    }

    /// The global options whose values differ from `other`'s (a list has none).
    pub fn changed(&self, other: &Form) -> Vec<String> {
        let none = Globals::default();
        self.globals().unwrap_or(&none).changed(other.globals().unwrap_or(&none))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::options::{AccessLogOptions, AdminOptions, LogFormat, Workers};

    const WEB: &str =
        r#"{"name": "web", "address": "127.0.0.1:8080", "backends": [{"name": "b", "address": "127.0.0.1:9001"}]}"#;

    fn err(text: &str) -> String {
        parse_file(text).map(|f| format!("{f:?}")).unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn the_list_form_reads_and_writes_as_before() {
        let list = format!("[{WEB}]");
        let file = parse_file(&list).unwrap();
        assert_eq!((file.form.clone(), file.services.len()), (Form::List, 1));
        assert_eq!(file.form.render(&file.services), super::super::to_json(&file.services));
        assert_eq!(parse_file("null").unwrap().services, []);
        assert_eq!(parse_file("\u{feff}[]").unwrap().form, Form::List);
    }

    #[test]
    fn the_object_form_reads_services_and_every_global_option() {
        let text = format!(
            r#"{{"services": [{WEB}], "grace": 2.5, "workers": "auto", "pin": false,
                "admin": {{"address": "/run/shuttle.sock", "mode": "0660", "hosts": ["a.example", "b,c"], "token_file": "/etc/t"}},
                "access_log": {{"path": "-", "format": "json"}}}}"#
        );
        let file = parse_file(&text).unwrap();
        let expected = Globals {
            admin: Some(AdminOptions {
                address: Some("/run/shuttle.sock".into()),
                mode: Some(0o660),
                hosts: Some(vec!["a.example".into(), "b".into(), "c".into()]),
                token_file: Some("/etc/t".into()),
            }),
            grace: Some(2.5),
            workers: Some(Workers::Auto),
            pin: Some(false),
            access_log: Some(AccessLogOptions { path: Some("-".into()), format: Some(LogFormat::Json) }),
        };
        assert_eq!(file.form, Form::Object(expected));
        assert_eq!(file.services[0].name, "web");
        let minimal = parse_file(r#"{"services": []}"#).unwrap();
        assert_eq!((minimal.form, minimal.services.len()), (Form::Object(Globals::default()), 0));
        assert!(err(r#"{"services": null, "workers": 4}"#).starts_with("services: is required"));
    }

    #[test]
    fn the_object_form_round_trips_with_its_globals_first() {
        let text = format!(r#"{{"workers": 2, "services": [{WEB}], "admin": {{"mode": "600"}}, "grace": 3}}"#);
        let file = parse_file(&text).unwrap();
        let written = file.form.render(&file.services);
        let admin = written.find("\"admin\"").unwrap();
        assert!(
            admin < written.find("\"grace\"").unwrap()
                && written.find("\"workers\"").unwrap() < written.find("\"services\"").unwrap(),
            "{written}"
        );
        assert!(
            written.contains(r#""mode": "0600""#) && written.contains(r#""grace": 3,"#) && written.ends_with("}\n"),
            "{written}"
        );
        assert_eq!(parse_file(&written).unwrap(), file, "what is written reads back the same");
        assert_eq!(parse_file(&written).unwrap().form.render(&file.services), written);
        let empty = Form::Object(Globals::default()).render(&[]);
        assert_eq!(empty, "{\n  \"services\": []\n}\n");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        assert!(
            err(r#"{"services": [], "grase": 1}"#).contains(r#"unknown field "grase""#),
            "{}",
            err(r#"{"grase": 1}"#)
        );
        assert!(err(r#"{"services": [], "admin": {"adress": "x"}}"#).contains(r#"unknown field "adress""#));
        assert!(err(r#"{"services": [], "access_log": {"file": "x"}}"#).contains(r#"unknown field "file""#));
        assert!(err(r#"{"grace": 1}"#).starts_with("services: is required"));
        let cases = [
            (r#""grace": -1"#, "grace: expected a number of seconds from 0 to 1e9, got -1"),
            (r#""grace": "10""#, r#"grace: expected a number of seconds from 0 to 1e9, got "10""#),
            (r#""workers": 0"#, "workers: expected a number of workers from 1 to 256, or auto, got \"0\""),
            (r#""workers": "all""#, "workers: expected a number of workers from 1 to 256, or auto, got \"all\""),
            (r#""pin": "yes""#, r#"pin: expected true or false, got "yes""#),
            (r#""admin": {"mode": 600}"#, "admin.mode: expected a string, got 600"),
            (
                r#""admin": {"mode": "999"}"#,
                r#"admin.mode: expected permissions in octal such as 0600 or 0660, got "999""#,
            ),
            (r#""admin": {"hosts": "a"}"#, r#"admin.hosts: expected a list of host names, got "a""#),
            (r#""admin": {"hosts": ["a b"]}"#, r#"admin.hosts: expected host names separated by commas, got "a b""#),
            (r#""admin": {"address": ""}"#, "admin.address: needs a value, got an empty one"),
            (r#""access_log": {"format": "xml"}"#, r#"access_log.format: expected text or json, got "xml""#),
            (r#""admin": []"#, "expected a JSON object"),
        ];
        for (field, expected) in cases {
            let got = err(&format!(r#"{{"services": [], {field}}}"#));
            assert!(got.ends_with(expected), "{field}: {got}");
        }
        let service = err(r#"{"services": [{"name": "web", "address": "127.0.0.1:1", "fall": 0}]}"#);
        assert_eq!(service, r#"service "web": fall: must be an integer ≥ 1, got 0"#);
        let position = err("{\"services\": [\n {\"name\": \"web\", \"adress\": 1}]}");
        assert!(
            position.starts_with("line 2, column ") && position.contains(r#"unknown field "adress""#),
            "{position}"
        );
    }

    #[test]
    fn changed_names_each_global_option_that_differs() {
        let form = |text: &str| parse_file(text).unwrap().form;
        let a = form(r#"{"services": [], "grace": 1, "admin": {"address": "127.0.0.1:1", "mode": "0600"}}"#);
        let b =
            form(r#"{"services": [], "grace": 1, "workers": 2, "admin": {"address": "127.0.0.1:2", "mode": "600"}}"#);
        assert_eq!(a.changed(&b), ["admin.address", "workers"]);
        assert_eq!(a.changed(&a), Vec::<String>::new());
        assert_eq!(a.changed(&Form::List), ["admin.address", "admin.mode", "grace"]);
        assert!(Form::List.changed(&form(r#"{"services": []}"#)).is_empty());
    }
}
