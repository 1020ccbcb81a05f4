//! The `shuttle` command: parse flags, load the config, run the loop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shuttle::model::config;
use shuttle::server::{Options, Server, StartupError};

const USAGE: &str = "\
shuttle: a TCP proxy and load balancer, reconfigured live over HTTP/JSON

usage: shuttle [-config FILE] [-state FILE] [-http ADDR] [-grace SECONDS] [-debug]

  -config FILE     default config (a JSON list of services); never written
  -state FILE      live config: loaded at start if it exists, written after every change
  -http ADDR       admin API address, host:port or a unix socket path (default 127.0.0.1:9090)
  -grace SECONDS   how long open connections may finish after SIGTERM (default 10)
  -debug           log at debug level (otherwise RUST_LOG rules, default info)
  -h, -help        print this help
  -V, -version     print the version

Flags take one dash or two (-config or --config).";

/// What the command line asked for.
struct Flags {
    config: Option<PathBuf>,
    state: Option<PathBuf>,
    http: String,
    grace: Duration,
    debug: bool,
}

/// Go-style flags: `-word` means `--word`, and `--flag=value` is split, so
/// pico-args only ever sees long keys (pitfall 21).
fn normalise(args: impl Iterator<Item = String>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    for arg in args {
        let long =
            if arg.starts_with('-') && !arg.starts_with("--") && arg.len() > 2 { format!("-{arg}") } else { arg };
        match long.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                out.push(flag.into());
                out.push(value.into());
            }
            _ => out.push(long.into()),
        }
    }
    out
}

enum Parsed {
    Run(Flags),
    Exit(ExitCode),
}

fn parse_flags() -> Result<Parsed, String> {
    let mut args = pico_args::Arguments::from_vec(normalise(std::env::args().skip(1)));
    if args.contains(["-h", "--help"]) {
        println!("{USAGE}");
        return Ok(Parsed::Exit(ExitCode::SUCCESS));
    }
    if args.contains(["-V", "--version"]) {
        println!("shuttle {}", env!("CARGO_PKG_VERSION"));
        return Ok(Parsed::Exit(ExitCode::SUCCESS));
    }
    let grace: Option<f64> = args.opt_value_from_str("--grace").map_err(|e| e.to_string())?;
    let grace = match grace {
        None => Duration::from_secs(10),
        Some(s) if (0.0..=config::MAX_SECONDS).contains(&s) => Duration::from_secs_f64(s),
        Some(s) => {
            return Err(format!("-grace: must be a number of seconds from 0 to {}, got {s}", config::MAX_SECONDS))
        }
    };
    let flags = Flags {
        config: args.opt_value_from_str("--config").map_err(|e| e.to_string())?,
        state: args.opt_value_from_str("--state").map_err(|e| e.to_string())?,
        http: args.opt_value_from_str("--http").map_err(|e| e.to_string())?.unwrap_or_else(|| "127.0.0.1:9090".into()),
        grace,
        debug: args.contains("--debug"),
    };
    let rest = args.finish();
    if let Some(first) = rest.first() {
        return Err(format!("unknown flag or argument {:?}", first.to_string_lossy()));
    }
    Ok(Parsed::Run(flags))
}

fn main() -> ExitCode {
    let flags = match parse_flags() {
        Ok(Parsed::Run(flags)) => flags,
        Ok(Parsed::Exit(code)) => return code,
        Err(e) => {
            eprintln!("shuttle: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if flags.debug {
        logger.filter_level(log::LevelFilter::Debug);
    }
    logger.init();

    // The state file wins when it exists (SPEC §1); a corrupt one stops start-up and is never overwritten.
    let source = match (&flags.state, &flags.config) {
        (Some(state), _) if state.exists() => Some(state.clone()),
        (_, config) => config.clone(),
    };
    let services = match source.as_deref().map(config::load) {
        None => Vec::new(),
        Some(Ok(services)) => services,
        Some(Err(e)) => {
            eprintln!("shuttle: {}: {e}", source.as_deref().map_or_else(String::new, |p| p.display().to_string()));
            return ExitCode::FAILURE;
        }
    };
    let fd_limit = match shuttle::runtime::net::raise_fd_limit() {
        Ok(limit) => {
            log::debug!("file descriptor limit: {limit}");
            limit
        }
        Err(e) => {
            log::warn!("cannot raise the file descriptor limit: {e}");
            1024
        }
    };
    let options = Options { admin: flags.http, state: flags.state, grace: flags.grace, fd_limit };
    let mut server = match Server::new(options, services) {
        Ok(server) => server,
        Err(e) => {
            // A service that cannot start is named with the file it came from.
            match (&source, &e) {
                (Some(path), StartupError::Listen { .. } | StartupError::Service(_)) => {
                    eprintln!("shuttle: {}: {e}", path.display())
                }
                _ => eprintln!("shuttle: {e}"),
            }
            return ExitCode::FAILURE;
        }
    };
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shuttle: event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
