//! Unit tests of `config.rs`.
use super::*;
use std::fs;

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
    assert_eq!((s.check_send.as_str(), s.check_expect.as_str(), b.check_address.as_str(), b.weight), ("", "", "", 1));
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
    let check = err(put("", r#", "check_address": "no such host:1""#));
    assert!(check
        .starts_with(r#"service "web": backend "b1": check_address: host "no such host" is not a valid host name"#));
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
fn parsing_never_resolves_names() {
    // Looking names up is the resolver thread's job: a file with a name no
    // resolver knows parses, and fails only when it is applied.
    let file =
        r#"[{"name": "a", "address": "nothing.invalid:80", "backends": [{"name": "b", "address": "x.invalid:1"}]}]"#;
    let services = parse_services(file).unwrap();
    assert_eq!(host_names(&services[0]), ["nothing.invalid", "x.invalid"]);
    let bad = r#"[{"name": "a", "address": "bad host:80"}]"#;
    assert!(err(parse_services(bad)).contains("is not a valid host name"));
}

#[test]
fn lists_reject_duplicate_names_and_listen_addresses() {
    let two = |a: &str, b: &str| {
        format!(r#"[{{"name": "a", "address": "{a}"}}, {{"name": "{b}", "address": "127.0.0.1:81"}}]"#)
    };
    let name = err(parse_services(&two("127.0.0.1:80", "a")));
    assert_eq!(name, r#"service "a": name: is used by more than one service"#);
    let address = err(parse_services(&two("0.0.0.0:81", "b")));
    assert_eq!(address, r#"service "b": address: "127.0.0.1:81" conflicts with 0.0.0.0:81, where service "a" listens"#);
    assert_eq!(parse_services(&two("127.0.0.1:0", "b")).unwrap().len(), 2);
    assert_eq!(parse_services(&two("127.0.0.2:81", "b")).unwrap().len(), 2);
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
    let (check_interval, client_timeout, connect_timeout) = (0.25, 30.0, 0.0015);
    let s = ServiceConfig { check_interval, client_timeout, connect_timeout, ..ServiceConfig::new("w", ":1") };
    let text = to_json(std::slice::from_ref(&s));
    for field in [
        "\"check_interval\": 0.25,",
        "\"client_timeout\": 30,",
        "\"server_timeout\": 0,",
        "\"connect_timeout\": 0.0015,",
    ] {
        assert!(text.contains(field), "{field} missing from {text}");
    }
    assert_eq!(parse_services(&text).unwrap(), [s]);
    assert_eq!((seconds(0.0), seconds(f64::NAN)), (None, None));
    assert_eq!((seconds(0.25), seconds(2.0)), (Some(Duration::from_millis(250)), Some(Duration::from_secs(2))));
    assert_eq!(seconds(f64::INFINITY), Some(Duration::from_secs(1_000_000_000)));
}

#[test]
fn seconds_below_a_millisecond_are_rejected_but_zero_is_off() {
    let s = ServiceConfig { check_interval: 1e-10, ..ServiceConfig::new("w", "127.0.0.1:1") };
    let e = validate_service(&s).unwrap_err().to_string();
    assert!(e.contains("check_interval") && e.contains("at least 0.001"), "{e}");
    let off = ServiceConfig { check_interval: 0.0, connect_timeout: 0.001, ..ServiceConfig::new("w", "127.0.0.1:1") };
    validate_service(&off).unwrap();
}

#[test]
fn backends_only_takes_backends_and_name_from_the_body_and_settings_from_the_running_config() {
    let running = ServiceConfig { fall: 5, ..ServiceConfig::new("web", "127.0.0.1:1") };
    let body = br#"{"fall": 0, "address": "", "backends": [{"name": "b", "address": "127.0.0.1:2"}]}"#;
    let merged = parse_backends_only(body, &running).unwrap();
    assert!(merged.settings_equal(&running));
    assert_eq!(merged.backends.len(), 1);
    let typo = parse_backends_only(br#"{"backend": []}"#, &running).unwrap_err().to_string();
    assert!(typo.contains("backend"), "{typo}");
    let renamed = parse_backends_only(br#"{"name": "api", "backends": []}"#, &running).unwrap_err().to_string();
    assert!(renamed.contains("differs"), "{renamed}");
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
fn load_reads_what_to_json_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let services = parse_services(fixture!("example.json")).unwrap();
    fs::write(&path, to_json(&services)).unwrap();
    assert_eq!(load(&path).unwrap(), ConfigFile { services, form: Form::List });
    let missing = load(&dir.path().join("nope.json"));
    assert!(matches!(missing, Err(ConfigError::Io { .. })));
    assert!(err(missing).starts_with("cannot read "));
}
