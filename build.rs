//! Tells `GET /_info` which commit this binary was built from, as the
//! `SHUTTLE_COMMIT` compile-time variable: `SHUTTLE_BUILD_COMMIT` when the
//! builder sets it (a tarball or a distribution's build has no `.git`),
//! else `git rev-parse --short HEAD` of this checkout. Without either the
//! variable is left unset and the commit shows as null: a missing `git`, a
//! missing `.git` or any other failure never fails the build.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SHUTTLE_BUILD_COMMIT");
    let commit = match std::env::var("SHUTTLE_BUILD_COMMIT") {
        Ok(given) if !given.trim().is_empty() => Some(given.trim().to_string()),
        _ => from_git(),
    };
    if let Some(commit) = commit.filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        println!("cargo:rustc-env=SHUTTLE_COMMIT={commit}");
    }
}

/// `git` run in the package's directory, its trimmed output if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// The short commit of this package's own checkout, and the files to watch so
/// that a new commit rebuilds with its id.
fn from_git() -> Option<String> {
    // Only this package's checkout counts, not a repository it happens to be vendored in.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let manifest = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    if Path::new(&top).canonicalize().ok()? != Path::new(&manifest).canonicalize().ok()? {
        return None;
    }
    // HEAD, the branch it points to and the packed refs: a commit or a checkout
    // changes one of them (`--git-path` finds them in a worktree too).
    let mut watched =
        vec![git(&["rev-parse", "--git-path", "HEAD"])?, git(&["rev-parse", "--git-path", "packed-refs"])?];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.extend(git(&["rev-parse", "--git-path", &branch]));
    }
    // A path that does not exist would make cargo run this script on every build.
    for path in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    git(&["rev-parse", "--short", "HEAD"])
}
