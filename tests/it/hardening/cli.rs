//! Command-line and start-up error lines: always one line, naming the flag
//! as typed, with the documented exit statuses.

use super::{error_lines, one_error_line};
use crate::support::{run_to_exit, tempdir, write_file, Shuttle};

#[test]
fn a_config_key_with_a_newline_gives_one_error_line() {
    let dir = tempdir();
    // The key holds a real newline once the JSON is decoded: `"bad\nkey"`.
    let path = write_file(dir.path(), "config.json", br#"[{"name":"web","address":"127.0.0.1:0","bad\nkey":1}]"#);
    let (status, lines) = Shuttle::start_expect_failure(&["-config", path.to_str().unwrap()]);
    let line = one_error_line(status, &lines);
    assert!(line.contains(r"bad\nkey"), "the key is not shown escaped: {line}");
    // Nothing on stderr continues it: every line is the error line or a log line.
    for other in &lines {
        assert!(
            other.starts_with("shuttle:") || other.starts_with('['),
            "a stderr line continues the error: {other:?} in {lines:#?}"
        );
    }
}

#[test]
fn a_bad_flag_value_exits_2_naming_the_flag() {
    let out = run_to_exit(&["-grace", "abc"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr: Vec<String> = out.stderr.lines().map(str::to_string).collect();
    let first = error_lines(&stderr).first().map(|l| l.to_string()).unwrap_or_default();
    assert!(first.starts_with("shuttle: -grace"), "the message does not name -grace: {:?}", out.stderr);
    assert!(first.contains("abc"), "{first}");
}

#[test]
fn an_unknown_flag_exits_2_named_as_typed() {
    let out = run_to_exit(&["-bogus"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr: Vec<String> = out.stderr.lines().map(str::to_string).collect();
    let first = error_lines(&stderr).first().map(|l| l.to_string()).unwrap_or_default();
    assert!(first.contains("-bogus"), "the message does not name the flag: {first}");
    assert!(!first.contains("--bogus"), "the flag is not named as typed: {first}");
}

#[test]
fn go_style_boolean_values_of_debug_are_accepted() {
    for flag in ["-debug=true", "-debug=false", "--debug=true"] {
        let shuttle = Shuttle::start(&[flag]);
        shuttle.admin_addr();
        assert!(shuttle.is_running(), "{flag}");
    }
}

#[test]
fn help_mentions_the_exit_statuses() {
    let out = run_to_exit(&["-h"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = out.stdout.to_ascii_lowercase();
    let at = help.find("exit status").unwrap_or_else(|| panic!("-h says nothing of exit statuses: {}", out.stdout));
    let rest = &help[at..];
    for status in ["0", "1", "2"] {
        assert!(rest.contains(status), "-h does not mention exit status {status}: {}", out.stdout);
    }
}
