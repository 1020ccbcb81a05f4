//! The README's examples, run as written: a reader who copies them top to
//! bottom into one shell must see what the README shows.
//!
//! Every ```` ```sh ```` block runs verbatim and must succeed. Every
//! ```` ```console ```` block is a list of `$ command` lines, each followed by
//! the output it must print (stdout and stderr together; its exit status is
//! not checked, the README echoes it where it matters). In an expected output,
//! a line that is just `...` stands for any number of lines, and `...` inside
//! a line for any text. Lines that install or test the project itself are
//! skipped. The script runs in a private network namespace, so the README's
//! fixed ports (8080, 9090, ...) can't meet another test or a shuttle the
//! developer has running.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{shuttle_bin, tempdir};

/// The whole walk-through takes a few seconds; this bounds a hung example.
const DEADLINE: Duration = Duration::from_secs(120);

/// Lines of the README that act on the checkout, not on a running shuttle.
const SKIPPED: &[&str] = &["cargo install", "cargo build", "cargo test", "cargo run", ".ci/run"];

#[derive(Debug)]
enum Block {
    /// A script that must succeed, with the README line of its first line.
    Sh { line: usize, text: Vec<String> },
    /// Commands with their expected output.
    Console { commands: Vec<Example> },
}

#[derive(Debug)]
struct Example {
    line: usize,
    command: String,
    expected: Vec<String>,
}

fn blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = readme.lines().enumerate().map(|(i, l)| (i + 1, l));
    while let Some((number, line)) = lines.next() {
        let kind = line.trim_end();
        if kind != "```sh" && kind != "```console" {
            continue;
        }
        let body: Vec<(usize, &str)> = lines.by_ref().take_while(|(_, l)| l.trim_end() != "```").collect();
        let body: Vec<(usize, &str)> = body
            .into_iter()
            .filter(|(_, l)| !SKIPPED.iter().any(|s| l.trim_start().trim_start_matches("$ ").starts_with(s)))
            .collect();
        if kind == "```sh" {
            if !body.is_empty() {
                let text = body.iter().map(|(_, l)| l.to_string()).collect();
                blocks.push(Block::Sh { line: body[0].0, text });
            }
            continue;
        }
        let mut commands: Vec<Example> = Vec::new();
        for (n, l) in body {
            if let Some(command) = l.strip_prefix("$ ") {
                commands.push(Example { line: n, command: command.to_string(), expected: Vec::new() });
            } else if let Some(last) = commands.last_mut() {
                last.expected.push(l.to_string());
            } else {
                panic!("README.md:{number}: a console block must start with a `$ ` line, got {l:?}");
            }
        }
        blocks.push(Block::Console { commands });
    }
    blocks
}

/// Ends the script at the first failing command of an sh block, naming it.
const FAILED: &str = "trap 'echo \"@@ $__line failed: exit $? from: $BASH_COMMAND\"; exit 1' ERR";

/// One bash script for all blocks. Each example's output goes to its own file
/// in `out`; `@@ LINE` markers on stdout tell how far the script got.
fn script(blocks: &[Block]) -> String {
    let mut s = String::from("set -u\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\nmkdir -p .out\n");
    for block in blocks {
        match block {
            Block::Sh { line, text } => {
                let _ = writeln!(s, "__line={line}; echo \"@@ $__line\"\nset -eE\n{FAILED}");
                for l in text {
                    s.push_str(l);
                    s.push('\n');
                }
                s.push_str("set +eE\ntrap - ERR\n");
            }
            Block::Console { commands } => {
                for c in commands {
                    let _ = writeln!(
                        s,
                        "__line={}; echo \"@@ $__line\"\n{{ {}\n}} >.out/{} 2>&1 </dev/null",
                        c.line, c.command, c.line
                    );
                }
            }
        }
    }
    s.push_str("echo '@@ end'\n");
    s
}

/// Whether `line` matches `pattern`, where `...` stands for any text.
fn line_matches(pattern: &str, line: &str) -> bool {
    let pieces: Vec<&str> = pattern.split("...").collect();
    if pieces.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !line.starts_with(first) || line.len() < first.len() + last.len() || !line.ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Whether `lines` match `pattern`, where a `...` line stands for any lines.
fn lines_match(pattern: &[String], lines: &[&str]) -> bool {
    match pattern.split_first() {
        None => lines.is_empty(),
        Some((p, rest)) if p == "..." => (0..=lines.len()).any(|skip| lines_match(rest, &lines[skip..])),
        Some((p, rest)) => lines.split_first().is_some_and(|(l, more)| line_matches(p, l) && lines_match(rest, more)),
    }
}

#[test]
fn matching_rules() {
    let p = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(line_matches("a ... b", "a xyz b"));
    assert!(line_matches("\"sent\": ...,", "\"sent\": 1234,"));
    assert!(!line_matches("\"sent\": ...,", "\"sent\": 1234"));
    assert!(!line_matches("ab...ba", "aba"));
    assert!(lines_match(&p(&["[", "...", "]"]), &["[", "x", "y", "]"]));
    assert!(lines_match(&p(&["...", "exit status 2"]), &["exit status 2"]));
    assert!(!lines_match(&p(&["[", "]"]), &["[", "x", "]"]));
    assert!(!lines_match(&p(&["0"]), &[]));
}

#[test]
fn readme_examples_run_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).expect("read README.md");
    let blocks = blocks(&readme);
    let examples: usize =
        blocks.iter().map(|b| if let Block::Console { commands } = b { commands.len() } else { 0 }).sum();
    assert!(examples >= 20, "found only {examples} console examples in README.md; did the block syntax change?");

    let dir = tempdir();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).expect("mkdir bin");
    std::os::unix::fs::symlink(shuttle_bin(), bin.join("shuttle")).expect("link shuttle");
    std::os::unix::fs::symlink(root.join("fixtures"), dir.path().join("fixtures")).expect("link fixtures");
    fs::write(dir.path().join("walk.sh"), script(&blocks)).expect("write the script");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    // A private network namespace with its own loopback. As root, a network
    // namespace alone; otherwise inside a user namespace that maps us to root.
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let mut command = Command::new("unshare");
    if !root_user {
        command.args(["--user", "--map-root-user"]);
    }
    command
        .args(["--net", "--", "sh", "-c", "ip link set lo up && exec bash walk.sh"])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .env("RUST_LOG_STYLE", "never")
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.path().join("progress")).expect("create progress"))
        .stderr(fs::File::create(dir.path().join("log")).expect("create log"))
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; it makes the kernel kill the script
    // if this test process dies, so no walk-through outlives `cargo test`.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("run unshare (util-linux) for a private network namespace");
    let pgid = child.id() as i32;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the walk-through") {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: kill on our own child's process group; the shuttles and demo
    // backends the script left running are in it.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();

    let progress = fs::read_to_string(dir.path().join("progress")).unwrap_or_default();
    let log = fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let last = progress.lines().filter_map(|l| l.strip_prefix("@@ ")).next_back().unwrap_or("nothing");
    let Some(status) = status else {
        panic!(
            "the README walk-through did not finish within {DEADLINE:?}; it was at README.md:{last}; its log:\n{log}"
        );
    };
    assert!(
        status.success() && last == "end",
        "the README walk-through stopped ({status}) at README.md:{last}; its log:\n{log}"
    );
    let mut failures = String::new();
    for block in &blocks {
        let Block::Console { commands } = block else { continue };
        for c in commands {
            let actual = fs::read_to_string(dir.path().join(".out").join(c.line.to_string())).unwrap_or_default();
            let lines: Vec<&str> = actual.lines().collect();
            if !lines_match(&c.expected, &lines) {
                let _ = write!(
                    failures,
                    "\nREADME.md:{}: $ {}\n--- expected\n{}\n--- got\n{}",
                    c.line,
                    c.command,
                    c.expected.join("\n"),
                    actual.trim_end()
                );
            }
        }
    }
    assert!(failures.is_empty(), "README examples printed something else:{failures}\n--- shuttle's log\n{log}");
}
