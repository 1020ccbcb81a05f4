//! Start-up errors (SPEC §1): each exits with status 1 and one line on stderr,
//! starting `shuttle: `, that names the file (or address) and the problem.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use serde_json::{json, Value};

use crate::support::{backend, error_line, service, tempdir, write_config, write_file, Shuttle};

/// Runs shuttle with `args`, asserts exit status 1 and exactly one `shuttle: `
/// line holding every word in `words`; returns that line.
#[track_caller]
pub(crate) fn expect_startup_error(args: &[&str], words: &[&str]) -> String {
    let (status, lines) = Shuttle::start_expect_failure(args);
    assert_eq!(status.code(), Some(1), "exit status of shuttle {args:?}; stderr: {lines:#?}");
    let error_lines: Vec<&String> = lines.iter().filter(|l| l.starts_with("shuttle: ")).collect();
    assert_eq!(error_lines.len(), 1, "one `shuttle: ` line expected; stderr: {lines:#?}");
    let line = error_line(&lines, words).unwrap_or_else(|| panic!("the error line lacks one of {words:?}: {lines:#?}"));
    line.clone()
}

/// A config whose only problem is `problem` applied to an otherwise good service.
fn config_with(problem: impl FnOnce(&mut Value)) -> Value {
    let mut web = service("web", vec![backend("b0", "127.0.0.1:1"), backend("b1", "127.0.0.1:2")]);
    problem(&mut web);
    json!([web])
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn startup_rejects_bad_json_with_its_position() {
    let dir = tempdir();
    let text = "[\n  {\n    \"name\": \"web\",\n    \"address\": \"127.0.0.1:0\",\n    \"backends\": [}\n  }\n]\n";
    let err = serde_json::from_str::<Value>(text).expect_err("the fixture is bad JSON");
    let (line, column) = (err.line(), err.column());
    let path = write_file(dir.path(), "broken.json", text.as_bytes());

    let message = expect_startup_error(&["-config", path_str(&path)], &[path_str(&path)]);
    let position_named = message.contains(&format!("line {line}")) || message.contains(&format!(":{line}:{column}"));
    assert!(position_named, "{message:?} should name line {line} (column {column})");
}

#[test]
fn startup_rejects_unknown_fields_naming_them() {
    let dir = tempdir();
    let path = write_config(dir.path(), &config_with(|web| web["bakends"] = json!([])));
    expect_startup_error(&["-config", path_str(&path)], &[path_str(&path), "bakends"]);

    let path = write_config(dir.path(), &config_with(|web| web["backends"][1]["wieght"] = json!(2)));
    expect_startup_error(&["-config", path_str(&path)], &[path_str(&path), "wieght"]);
}

#[test]
fn startup_rejects_an_unknown_balance() {
    let dir = tempdir();
    let path = write_config(dir.path(), &config_with(|web| web["balance"] = json!("RANDOM")));
    expect_startup_error(&["-config", path_str(&path)], &[path_str(&path), "balance"]);
}

#[test]
fn startup_rejects_a_duplicate_backend_name() {
    let dir = tempdir();
    let path = write_config(
        dir.path(),
        &config_with(|web| {
            web["backends"][0]["name"] = json!("twin");
            web["backends"][1]["name"] = json!("twin");
        }),
    );
    expect_startup_error(&["-config", path_str(&path)], &[path_str(&path), "twin"]);
}

#[test]
fn startup_rejects_every_bad_fixture() {
    // fixtures/bad/ holds the project's catalogue of broken configs; each must
    // fail the same way. Known ones must also name their problem.
    let keywords = [
        ("balance.json", "balance"),
        ("duplicate_backend.json", "web1"),
        ("negative_weight.json", "weight"),
        ("truncated.json", "line"),
        ("unknown_field.json", "adress"),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    for path in &paths {
        let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8 fixture name");
        let mut words = vec![path_str(path)];
        words.extend(keywords.iter().filter(|(file, _)| *file == name).map(|(_, word)| *word));
        expect_startup_error(&["-config", path_str(path)], &words);
    }
}

#[test]
fn startup_rejects_a_service_address_in_use() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port to take");
    let address = taken.local_addr().expect("taken address").to_string();
    let dir = tempdir();
    let path = write_config(dir.path(), &config_with(|web| web["address"] = json!(address)));
    expect_startup_error(&["-config", path_str(&path)], &[&address]);
}

#[test]
fn startup_rejects_an_admin_address_in_use() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port to take");
    let address = taken.local_addr().expect("taken address").to_string();
    let dir = tempdir();
    let path = write_config(dir.path(), &config_with(|_| {}));
    expect_startup_error(&["-config", path_str(&path), "-http", &address], &[&address]);
}

#[test]
fn startup_leaves_a_corrupt_state_file_untouched() {
    let dir = tempdir();
    let config = write_config(dir.path(), &config_with(|_| {}));
    let cases: [(&str, &[u8]); 2] = [
        ("garbage.state", b"\x00\xffthis is not {json at all\n"),
        ("invalid.state", br#"[{"name": "web", "address": "127.0.0.1:0", "balance": "XX"}]"#),
    ];
    for (name, bytes) in cases {
        let state = write_file(dir.path(), name, bytes);
        expect_startup_error(&["-config", path_str(&config), "-state", path_str(&state)], &[path_str(&state)]);
        let after = std::fs::read(&state).expect("the state file is still there");
        assert!(after == bytes, "{name} was changed: {:?}", String::from_utf8_lossy(&after));
    }
}
