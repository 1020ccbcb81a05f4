//! The command line (reference §1): Go-style flags, one dash or two, through
//! pico-args. Every error names the flag as the user typed it, and exits 2.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::data::finished::Format;
use crate::model::config::one_line;
use crate::model::options::{self, Globals, LogFormat};
use crate::runtime::accesslog::Target;

pub use crate::model::options::{Workers, MAX_WORKERS};

/// The help text.
pub const USAGE: &str = "\
shuttle: a TCP proxy and load balancer, reconfigured live over HTTP/JSON

usage: shuttle [-config FILE] [-state FILE] [-http ADDR] [-http-mode MODE]
               [-admin-host NAME] [-admin-token-file FILE] [-grace SECONDS]
               [-workers N|auto] [-pin] [-access-log PATH|-] [-access-log-format text|json]
               [-user NAME [-group NAME]] [-debug]
       shuttle -check [-config FILE] [-state FILE] [-http ADDR] [-admin-token-file FILE]
                      [-user NAME [-group NAME]]

  -config FILE            default config (a JSON list of services, or an object with
                          services and global options, which flags override); never written
  -state FILE             live config: loaded at start if it exists, written after every change
  -http ADDR              admin API address, host:port or a unix socket path (default 127.0.0.1:9090)
  -http-mode MODE         permissions of a unix admin socket, in octal (default 0600)
  -admin-host NAME        a host name the admin API answers for besides IP addresses and
                          localhost; repeat it, or separate names with commas
  -admin-token-file FILE  require `Authorization: Bearer TOKEN`, TOKEN being the file's first line
  -grace SECONDS          how long open connections may finish after SIGTERM (default 10)
  -workers N|auto         event loops that proxy, one thread each (default 1: one loop does
                          everything); auto: one per CPU this process may run on
  -pin                    pin worker i to the i-th CPU this process may run on
  -access-log PATH|-      write one line per finished connection to PATH (appended; SIGUSR1
                          reopens it), or to standard output with -; off by default
  -access-log-format F    text (key=value fields, the default) or json (one object a line)
  -user NAME              once the admin API and the listeners are bound, run as this user
                          (a name or a uid), keeping only CAP_NET_BIND_SERVICE; needed to
                          serve the admin API on a non-loopback TCP address as root
  -group NAME             the group to run as with -user (a name or a gid; default the
                          user's primary group); supplementary groups are the user's
  -check                  check the file start-up would load (the state file if it exists,
                          else -config) as start-up does, names resolved, and exit; binds
                          nothing and takes no lock
  -debug                  log at debug level, one line per connection (otherwise RUST_LOG
                          rules, default info); -debug=false turns it off
  -h, -help               print this help
  -V, -version            print the version

SIGHUP reloads the file shuttle started from; SIGUSR1 reopens the access log;
SIGUSR2 upgrades: the binary at shuttle's path takes the listeners over with no
connection refused, and this process drains (-upgrade-fd N is that hand-over's
own flag, not for hand use).

Flags take one dash or two (-config or --config). Exit status: 0 after a clean
shutdown (or a -check that passed), 1 when start-up or -check fails, 2 for a
bad command line.";

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Flags {
    /// `-config`.
    pub config: Option<PathBuf>,
    /// `-state`.
    pub state: Option<PathBuf>,
    /// `-http`.
    pub http: String,
    /// `-http-mode`.
    pub http_mode: u32,
    /// Every `-admin-host` name.
    pub admin_hosts: Vec<String>,
    /// `-admin-token-file`.
    pub token_file: Option<PathBuf>,
    /// `-grace`.
    pub grace: Duration,
    /// `-workers`: how many loops proxy.
    pub workers: Workers,
    /// `-pin`.
    pub pin: bool,
    /// `-debug`.
    pub debug: bool,
    /// `-check`: validate the config and exit.
    pub check: bool,
    /// `-access-log`: where finished connections are logged.
    pub access_log: Option<Target>,
    /// `-access-log-format`.
    pub access_log_format: Format,
    /// `-user`: who to run as once everything is bound.
    pub user: Option<String>,
    /// `-group`: the group to run as with `-user`.
    pub group: Option<String>,
    /// `-upgrade-fd N`: this process takes over from the shuttle that started
    /// it (SIGUSR2), through the socket it inherited as descriptor N.
    pub upgrade_fd: Option<i32>,
    /// The flags given on the command line, by name without dashes
    /// (`grace`): they win over a config file's global options.
    pub given: Vec<String>,
}

/// What to do.
// Made once per process: boxing the flags would only cost an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the proxy.
    Run(Flags),
    /// Print the help.
    Help,
    /// Print the version.
    Version,
}

/// Flags that take no value; Go also accepts `-flag=true` for them.
const SWITCHES: &[&str] = &["--debug", "--pin", "--check", "--help", "--version"];

/// One argument, normalised for pico-args, and how the user wrote it.
struct Arg {
    long: OsString,
    typed: String,
    /// A flag, not a flag's value.
    flag: bool,
}

impl Arg {
    fn flag(long: &str, typed: String) -> Arg {
        Arg { long: long.into(), typed, flag: true }
    }

    fn value(value: &str) -> Arg {
        Arg { long: value.into(), typed: value.to_string(), flag: false }
    }
}

/// Go-style flags: `-word` means `--word`, and `--flag=value` is split, so
/// pico-args only ever sees long keys (pitfall 21); Go's `-debug=false` is
/// honoured, and kept (with no value) so that it counts as given.
fn normalise(args: Vec<String>) -> Result<Vec<Arg>, String> {
    let mut out = Vec::new();
    let mut values_follow = false;
    for arg in args {
        // A flag's value is taken as written: `-config -odd-name.json` is a file name.
        if values_follow {
            out.push(Arg::value(&arg));
            values_follow = false;
            continue;
        }
        let long = if arg.starts_with('-') && !arg.starts_with("--") && arg.len() > 2 {
            format!("-{arg}")
        } else {
            arg.clone()
        };
        let shown = arg.split('=').next().unwrap_or(&arg).to_string();
        match long.split_once('=') {
            Some((flag, value)) if SWITCHES.contains(&flag) => match go_bool(value) {
                Some(true) => out.push(Arg::flag(flag, shown)),
                Some(false) => out.push(Arg { long: format!("{flag}=false").into(), typed: shown, flag: true }),
                None => return Err(format!("{shown}: expected true or false, got {value:?}")),
            },
            Some((flag, value)) if flag.starts_with("--") => {
                out.push(Arg::flag(flag, shown));
                out.push(Arg::value(value));
            }
            _ => {
                values_follow = long.starts_with("--") && !SWITCHES.contains(&long.as_str());
                out.push(Arg { long: long.clone().into(), typed: arg, flag: long.starts_with("--") });
            }
        }
    }
    Ok(out)
}

/// The values Go's `strconv.ParseBool` takes.
fn go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: Vec<String>) -> Result<Command, String> {
    let normalised = normalise(args)?;
    let typed: Vec<(OsString, String)> = normalised.iter().map(|a| (a.long.clone(), a.typed.clone())).collect();
    let mut given: Vec<String> = normalised
        .iter()
        .filter(|a| a.flag)
        .filter_map(|a| a.long.to_str())
        .map(|long| long.trim_start_matches('-').trim_end_matches("=false").to_string())
        .collect();
    given.sort();
    given.dedup();
    // A switch set false is given but takes no value: pico-args must not see it.
    let kept = normalised.into_iter().filter(|a| !(a.flag && a.long.to_string_lossy().ends_with("=false")));
    let mut args = pico_args::Arguments::from_vec(kept.map(|a| a.long).collect());
    if args.contains(["-h", "--help"]) {
        return Ok(Command::Help);
    }
    if args.contains(["-V", "--version"]) {
        return Ok(Command::Version);
    }
    let grace = match value(&mut args, "--grace", parse_seconds)? {
        None => Duration::from_secs(10),
        Some(seconds) => Duration::from_secs_f64(seconds),
    };
    let mut admin_hosts = Vec::new();
    while let Some(names) = value(&mut args, "--admin-host", options::host_names)? {
        admin_hosts.extend(names);
    }
    let flags = Flags {
        config: value(&mut args, "--config", path)?,
        state: value(&mut args, "--state", path)?,
        http: value(&mut args, "--http", non_empty)?.unwrap_or_else(|| "127.0.0.1:9090".into()),
        http_mode: value(&mut args, "--http-mode", parse_mode)?.unwrap_or(0o600),
        admin_hosts,
        token_file: value(&mut args, "--admin-token-file", path)?,
        grace,
        workers: value(&mut args, "--workers", parse_workers)?.unwrap_or(Workers::Count(1)),
        pin: args.contains("--pin"),
        debug: args.contains("--debug"),
        check: args.contains("--check"),
        access_log: value(&mut args, "--access-log", non_empty)?.map(|v| Target::parse(&v)),
        access_log_format: value(&mut args, "--access-log-format", parse_format)?.unwrap_or_default(),
        user: value(&mut args, "--user", non_empty)?,
        group: value(&mut args, "--group", non_empty)?,
        upgrade_fd: value(&mut args, "--upgrade-fd", parse_fd)?,
        given,
    };
    if flags.group.is_some() && flags.user.is_none() {
        return Err("-group: needs -user".into());
    }
    let rest = args.finish();
    if let Some(first) = rest.first() {
        let shown = typed
            .iter()
            .find(|(long, _)| long == first)
            .map_or_else(|| first.to_string_lossy().into_owned(), |(_, t)| t.clone());
        let what = if shown.starts_with('-') { "unknown flag" } else { "unexpected argument" };
        return Err(format!("{what} {}", one_line(&shown)));
    }
    Ok(Command::Run(flags))
}

/// The value of `--flag`, parsed by `f`; every error names the flag as `-flag`.
fn value<T>(
    args: &mut pico_args::Arguments,
    flag: &'static str,
    f: fn(&str) -> Result<T, String>,
) -> Result<Option<T>, String> {
    let shown = &flag[1..];
    args.opt_value_from_fn(flag, f).map_err(|e| match e {
        pico_args::Error::OptionWithoutAValue(_) => format!("{shown}: needs a value"),
        pico_args::Error::Utf8ArgumentParsingFailed { cause, .. } => format!("{shown}: {cause}"),
        pico_args::Error::NonUtf8Argument => format!("{shown}: the value is not UTF-8"),
        other => format!("{shown}: {other}"),
    })
}

fn parse_fd(s: &str) -> Result<i32, String> {
    s.parse().ok().filter(|&fd: &i32| fd > 2).ok_or_else(|| format!("expected a descriptor number above 2, got {s:?}"))
}

fn path(s: &str) -> Result<PathBuf, String> {
    non_empty(s).map(PathBuf::from)
}

fn non_empty(s: &str) -> Result<String, String> {
    options::non_empty(s.to_string())
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| options::seconds(*v).is_ok())
        .ok_or_else(|| options::seconds_rule(&format!("{s:?}")))
}

fn parse_workers(s: &str) -> Result<Workers, String> {
    options::workers(s)
}

fn parse_format(s: &str) -> Result<Format, String> {
    options::log_format(s).map(format)
}

fn format(f: LogFormat) -> Format {
    match f {
        LogFormat::Text => Format::Text,
        LogFormat::Json => Format::Json,
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    options::mode(s)
}

impl Flags {
    /// These flags with a config file's global options (reference §2.1)
    /// wherever no flag was given; returns the options a flag overrode, as
    /// `flag (key)` pairs for the log.
    pub fn with_file(mut self, globals: &Globals) -> (Flags, Vec<String>) {
        let mut overridden = Vec::new();
        let mut take = |flag: &str, key: &str, present: bool| {
            let given = self.given.iter().any(|g| g == flag);
            if present && given {
                overridden.push(format!("-{flag} ({key})"));
            }
            present && !given
        };
        if let Some(admin) = &globals.admin {
            if take("http", "admin.address", admin.address.is_some()) {
                self.http = admin.address.clone().unwrap_or_default();
            }
            if take("http-mode", "admin.mode", admin.mode.is_some()) {
                self.http_mode = admin.mode.unwrap_or(self.http_mode);
            }
            if take("admin-host", "admin.hosts", admin.hosts.is_some()) {
                self.admin_hosts = admin.hosts.clone().unwrap_or_default();
            }
            if take("admin-token-file", "admin.token_file", admin.token_file.is_some()) {
                self.token_file = admin.token_file.as_ref().map(PathBuf::from);
            }
        }
        if take("grace", "grace", globals.grace.is_some()) {
            self.grace = globals.grace.map_or(self.grace, Duration::from_secs_f64);
        }
        if take("workers", "workers", globals.workers.is_some()) {
            self.workers = globals.workers.unwrap_or(self.workers);
        }
        if take("pin", "pin", globals.pin.is_some()) {
            self.pin = globals.pin.unwrap_or(self.pin);
        }
        if let Some(log) = &globals.access_log {
            if take("access-log", "access_log.path", log.path.is_some()) {
                self.access_log = log.path.as_deref().map(Target::parse);
            }
            if take("access-log-format", "access_log.format", log.format.is_some()) {
                self.access_log_format = log.format.map_or(self.access_log_format, format);
            }
        }
        (self, overridden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Flags, String> {
        match parse(args.iter().map(|s| s.to_string()).collect())? {
            Command::Run(flags) => Ok(flags),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_with_no_arguments() {
        let flags = run(&[]).unwrap();
        assert_eq!(flags.http, "127.0.0.1:9090");
        assert_eq!((flags.http_mode, flags.grace, flags.debug), (0o600, Duration::from_secs(10), false));
        assert!(flags.config.is_none() && flags.state.is_none() && flags.token_file.is_none());
    }

    #[test]
    fn one_dash_two_dashes_and_equals_signs() {
        let flags = run(&["-config", "a.json", "--state=s.json", "-grace=2.5", "-http", "/run/s.sock"]).unwrap();
        assert_eq!(flags.config, Some("a.json".into()));
        assert_eq!(flags.state, Some("s.json".into()));
        assert_eq!(flags.grace, Duration::from_millis(2500));
        assert_eq!(flags.http, "/run/s.sock");
        assert_eq!(run(&["-config", "-odd.json"]).unwrap().config, Some("-odd.json".into()));
    }

    #[test]
    fn go_booleans() {
        assert!(run(&["-debug"]).unwrap().debug);
        assert!(run(&["-debug=true"]).unwrap().debug);
        assert!(run(&["--debug=1"]).unwrap().debug);
        assert!(!run(&["-debug=false"]).unwrap().debug);
        assert_eq!(run(&["-debug=maybe"]).unwrap_err(), r#"-debug: expected true or false, got "maybe""#);
    }

    #[test]
    fn errors_name_the_flag_as_typed() {
        assert_eq!(
            run(&["-grace", "abc"]).unwrap_err(),
            r#"-grace: expected a number of seconds from 0 to 1e9, got "abc""#
        );
        assert_eq!(run(&["-grace"]).unwrap_err(), "-grace: needs a value");
        assert_eq!(run(&["-bogus"]).unwrap_err(), "unknown flag -bogus");
        assert_eq!(run(&["--bogus=1"]).unwrap_err(), "unknown flag --bogus");
        assert_eq!(run(&["stray"]).unwrap_err(), "unexpected argument stray");
        assert!(run(&["-http-mode", "999"]).unwrap_err().starts_with("-http-mode: expected permissions in octal"));
        assert_eq!(run(&["-http-mode", "0660"]).unwrap().http_mode, 0o660);
        assert!(run(&["-grace", "a\nb"]).unwrap_err().contains(r"a\nb"), "control characters are escaped");
    }

    #[test]
    fn admin_hosts_repeat_or_use_commas() {
        let flags = run(&["-admin-host", "a.example,b.example", "-admin-host=c"]).unwrap();
        assert_eq!(flags.admin_hosts, ["a.example", "b.example", "c"]);
        assert!(run(&["-admin-host", "a b"]).is_err());
    }

    #[test]
    fn workers_and_pin() {
        assert_eq!(run(&[]).unwrap().workers, Workers::Count(1));
        assert_eq!(run(&["-workers", "4", "-pin"]).unwrap().workers, Workers::Count(4));
        assert!(run(&["-workers=auto", "-pin"]).unwrap().pin);
        assert_eq!(run(&["-workers", "auto"]).unwrap().workers, Workers::Auto);
        for bad in ["0", "257", "-1", "two", ""] {
            let e = run(&["-workers", bad]).unwrap_err();
            assert!(e.starts_with("-workers: "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn check_is_a_switch() {
        assert!(!run(&[]).unwrap().check);
        let flags = run(&["-check", "-config", "a.json"]).unwrap();
        assert!(flags.check);
        assert_eq!(flags.config, Some("a.json".into()));
        assert!(run(&["--check=true"]).unwrap().check);
        assert!(!run(&["-check=false"]).unwrap().check);
    }

    #[test]
    fn access_log_to_a_file_or_standard_output() {
        let flags = run(&[]).unwrap();
        assert_eq!((flags.access_log, flags.access_log_format), (None, Format::Text));
        let flags = run(&["-access-log", "/var/log/shuttle.log", "-access-log-format=json"]).unwrap();
        assert_eq!(flags.access_log, Some(Target::File("/var/log/shuttle.log".into())));
        assert_eq!(flags.access_log_format, Format::Json);
        assert_eq!(run(&["-access-log", "-"]).unwrap().access_log, Some(Target::Stdout));
        assert_eq!(
            run(&["-access-log-format", "xml"]).unwrap_err(),
            r#"-access-log-format: expected text or json, got "xml""#
        );
        assert_eq!(run(&["-access-log"]).unwrap_err(), "-access-log: needs a value");
    }

    #[test]
    fn given_lists_the_flags_on_the_command_line_however_written() {
        assert!(run(&[]).unwrap().given.is_empty());
        let flags = run(&["-grace=2", "--workers", "2", "-pin=false", "-config", "--http"]).unwrap();
        assert_eq!(flags.given, ["config", "grace", "pin", "workers"], "a flag's value is not a flag");
        assert!(!flags.pin);
    }

    #[test]
    fn a_config_files_options_apply_where_no_flag_was_given() {
        let text = r#"{"services": [], "grace": 3, "workers": 4, "pin": true,
            "admin": {"address": "/run/s.sock", "mode": "0660", "hosts": ["a.example"], "token_file": "/t"},
            "access_log": {"path": "/var/log/s.log", "format": "json"}}"#;
        let file = crate::model::config::parse_file(text).unwrap();
        let globals = file.form.globals().unwrap();
        let (flags, overridden) = run(&[]).unwrap().with_file(globals);
        assert!(overridden.is_empty());
        assert_eq!(
            (flags.http.as_str(), flags.http_mode, flags.admin_hosts.clone()),
            ("/run/s.sock", 0o660, vec!["a.example".to_string()])
        );
        assert_eq!(
            (flags.token_file, flags.grace, flags.workers, flags.pin),
            (Some("/t".into()), Duration::from_secs(3), Workers::Count(4), true)
        );
        assert_eq!(
            (flags.access_log, flags.access_log_format),
            (Some(Target::File("/var/log/s.log".into())), Format::Json)
        );

        let given = run(&["-grace", "1", "-http", "127.0.0.1:0", "-pin=false", "-access-log-format", "text"]).unwrap();
        let (flags, overridden) = given.with_file(globals);
        assert_eq!((flags.grace, flags.http.as_str(), flags.pin), (Duration::from_secs(1), "127.0.0.1:0", false));
        assert_eq!((flags.access_log_format, flags.workers), (Format::Text, Workers::Count(4)));
        assert_eq!(
            overridden,
            ["-http (admin.address)", "-grace (grace)", "-pin (pin)", "-access-log-format (access_log.format)"]
        );
    }

    #[test]
    fn user_and_group() {
        let flags = run(&[]).unwrap();
        assert_eq!((flags.user, flags.group), (None, None));
        let flags = run(&["-user", "nobody", "--group=nogroup"]).unwrap();
        assert_eq!((flags.user.as_deref(), flags.group.as_deref()), (Some("nobody"), Some("nogroup")));
        assert_eq!(run(&["-user=65534"]).unwrap().user.as_deref(), Some("65534"));
        assert_eq!(run(&["-group", "nogroup"]).unwrap_err(), "-group: needs -user");
        assert_eq!(run(&["-user"]).unwrap_err(), "-user: needs a value");
        assert!(run(&["-user", ""]).unwrap_err().starts_with("-user: "));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(vec!["-h".into()]), Ok(Command::Help));
        assert_eq!(parse(vec!["-help".into()]), Ok(Command::Help));
        assert_eq!(parse(vec!["-version".into()]), Ok(Command::Version));
        assert_eq!(parse(vec!["-V".into()]), Ok(Command::Version));
    }
}
