//! Start-up (reference §1): everything between the parsed flags and a
//! running loop: pick and load the config or state file, resolve and check
//! it, read the token, bind. `-check` runs the same steps and binds nothing.
//! Every failure is one line naming the file or address at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::cli::{self, Flags};
use crate::control::access::{self, Access};
use crate::control::admin::AdminAddr;
use crate::control::info::Started;
use crate::control::state::StateFile;
use crate::model::address;
use crate::model::config::{self, one_line, ConfigFile, Form, ServiceConfig};
use crate::model::service;
use crate::runtime::accesslog::{AccessLog, Target};
use crate::runtime::accounts::Identity;
use crate::runtime::notify::Notifier;
use crate::runtime::{files, helpers};
use crate::server::{Options, Server, StartupError};

mod upgrade;
mod user;

/// Why start-up failed: one line, naming the file or address at fault.
#[derive(Debug)]
pub struct Failed(pub String);

impl Failed {
    fn at(path: &Path, message: impl std::fmt::Display) -> Failed {
        Failed(format!("{}: {message}", path.display()))
    }
}

/// `-check`: everything start-up reads and checks, with nothing bound and no
/// lock taken (a running shuttle holds it, and its state file must be checkable).
pub fn check(flags: &Flags) -> Result<String, Failed> {
    let identity = user::identity(flags)?;
    if let Some(path) = &flags.state {
        StateFile::check(path, user::runs_as(identity.as_ref())).map_err(|e| Failed::at(path, e))?;
    }
    let loaded = load(flags, identity.as_ref(), None)?;
    let services = loaded.prepared.len();
    let backends: usize = loaded.prepared.iter().map(|p| p.config.backends.len()).sum();
    let what = loaded.source.as_ref().map_or_else(|| "no config".to_string(), |p| p.display().to_string());
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    Ok(format!("{}: ok ({}, {})", one_line(&what), plural(services, "service"), plural(backends, "backend")))
}

/// What start-up reads and checks before it binds anything: the part that
/// `-check` runs too, so the two can never disagree.
struct Loaded {
    /// The file the services came from: the state file when it exists, else `-config`.
    source: Option<PathBuf>,
    /// Its form, which the state file is written in (a list without a file).
    form: Form,
    /// The flags with the file's global options where no flag was given.
    flags: Flags,
    /// The services, resolved and checked against each other.
    prepared: Vec<service::Prepared>,
    /// The `-http` address, resolved.
    admin: AdminAddr,
    /// The admin token, if `-admin-token-file` named one.
    token: Option<Vec<u8>>,
}

/// Reads the config (or state) file, resolves its names within the 5 s
/// deadline, runs the cross-service checks and reads the token file. With
/// `running` (an upgrade's), no file is read: the old process's config and
/// the file it names stand in for them.
fn load(flags: &Flags, identity: Option<&Identity>, running: Option<Running>) -> Result<Loaded, Failed> {
    let (source, file, running_token) = match running {
        Some(Running { source, file, token }) => (source, file, Some(token)),
        None => {
            let (source, file) = read_source(flags, identity)?;
            (source, file, None)
        }
    };
    let flags = match (file.form.globals(), &source) {
        (Some(globals), Some(path)) => {
            let (flags, overridden) = flags.clone().with_file(globals);
            if !overridden.is_empty() {
                log::info!("{}: flags override its options: {}", path.display(), overridden.join(", "));
            }
            flags
        }
        _ => flags.clone(),
    };
    let admin = admin_address(&flags)?;
    user::check_admin(&admin, identity)?;
    let prepared = prepare(file.services, &source)?;
    // A TCP admin address with a fixed port is known already; `Server::new`
    // checks again once it is bound, when port 0 has become a real port.
    let admin_tcp = match &admin {
        AdminAddr::Tcp(addr) => Some(*addr),
        AdminAddr::Unix(..) => None,
    };
    service::check_all(&prepared, admin_tcp).map_err(|e| at_source(&source, e))?;
    let token = match (running_token, &flags.token_file) {
        (Some(token), _) => token,
        (None, Some(path)) => Some(read_token(path)?),
        (None, None) => None,
    };
    Ok(Loaded { source, form: file.form, flags, prepared, admin, token })
}

/// What an upgrade's new process starts from instead of a file: the old
/// process's config, in its file's form, and the file a SIGHUP reads.
pub(super) struct Running {
    /// The file shuttle started from.
    pub source: Option<PathBuf>,
    /// The running config.
    pub file: ConfigFile,
    /// The admin token in force (the file it came from may be root's alone, and this process not root).
    pub token: Option<Vec<u8>>,
}

/// The file start-up reads (the state file when it exists, else `-config`), read.
fn read_source(flags: &Flags, identity: Option<&Identity>) -> Result<(Option<PathBuf>, ConfigFile), Failed> {
    // The state file wins when it exists (reference §1); a corrupt one stops start-up and is never overwritten.
    let source = match (&flags.state, &flags.config) {
        (Some(state), _) if state.exists() => Some(state.clone()),
        (_, config) => config.clone(),
    };
    let mut file = match &source {
        None => ConfigFile { services: Vec::new(), form: Form::List },
        Some(path) => {
            if identity.is_some() && source == flags.state {
                user::check_state_file(path)?;
            }
            config::load(path).map_err(|e| Failed::at(path, e))?
        }
    };
    if let (Some(_), Some(state)) = (identity, source.as_ref().filter(|s| Some(*s) == flags.state.as_ref())) {
        file.form = user::trusted_form(file.form, state, flags.config.as_deref())?;
    }
    Ok((source, file))
}

/// A failure of the config, named with the file it came from, if any.
fn at_source(source: &Option<PathBuf>, e: String) -> Failed {
    match source {
        Some(path) => Failed::at(path, e),
        None => Failed(e),
    }
}

/// Everything before the loop runs: each failure is one line and exit 1.
/// With `-upgrade-fd`, the sockets and the config come from the shuttle this
/// one upgrades, which hears at the end whether this one serves or why not.
pub fn start(flags: Flags, started: Started) -> Result<Server, Failed> {
    let Some(fd) = flags.upgrade_fd else { return start_with(flags, started, None) };
    let link = upgrade::link(fd)?;
    let served = upgrade::take(&link).and_then(|taken| {
        let (pid, services) = (taken.pid, taken.running.file.services.len());
        let mut server = start_with(flags, started, Some(taken))?;
        upgrade::ready(&link)?;
        let counters = upgrade::wait_go(&link)?;
        server.carry_counters(&counters);
        server.finish_take_over();
        let plural = if services == 1 { "" } else { "s" };
        log::info!("upgrade: took over {services} service{plural} from process {pid}");
        Ok(server)
    });
    if let Err(e) = &served {
        upgrade::give_up(&link, e);
    }
    served
}

fn start_with(flags: Flags, started: Started, taken: Option<upgrade::Taken>) -> Result<Server, Failed> {
    let identity = user::identity(&flags)?;
    let (running, inherited, lock, handed_workers) = match taken {
        Some(t) => (Some(t.running), Some(t.inherited), t.state_lock, Some(t.workers)),
        None => (None, None, None, None),
    };
    // The state file is locked before it is read: a second shuttle on it stops
    // here. An upgrade holds the old process's lock already.
    let state = match (&flags.state, lock) {
        (Some(path), Some(lock)) => Some(StateFile::adopt(path, lock).map_err(|e| Failed::at(path, e))?),
        (Some(path), None) => {
            Some(StateFile::open_as(path, user::runs_as(identity.as_ref())).map_err(|e| Failed::at(path, e))?)
        }
        (None, _) => None,
    };
    let Loaded { source, form, flags, prepared, admin, token } = load(&flags, identity.as_ref(), running)?;
    if let AdminAddr::Tcp(addr) = &admin {
        if token.is_none() && !access::is_local_only(addr) {
            log::warn!(
                "the admin API listens on {addr}, which other hosts can reach, and needs no token: anyone who can connect can reconfigure shuttle; use -admin-token-file"
            );
        }
    }
    let access = Access::new(&flags.admin_hosts, token, matches!(admin, AdminAddr::Unix(..)));
    let fd_limit = match crate::runtime::net::raise_fd_limit() {
        Ok(limit) => {
            log::debug!("file descriptor limit: {limit}");
            limit
        }
        Err(e) => {
            log::warn!("cannot raise the file descriptor limit: {e}");
            1024
        }
    };
    let workers = match flags.workers {
        cli::Workers::Count(n) => n,
        cli::Workers::Auto => match crate::runtime::cpus::allowed() {
            Ok(cpus) => cpus.len().clamp(1, cli::MAX_WORKERS),
            Err(e) => return Err(Failed(format!("-workers auto: cannot learn which CPUs this process may use: {e}"))),
        },
    };
    // Each service's sockets are one per worker of the old process: keep its count.
    let workers = match handed_workers {
        Some(old) if old != workers => {
            log::warn!("upgrade: keeping the {old} workers of the running shuttle, not {workers}: each service has a socket per worker; restart to change the count");
            old
        }
        _ => workers,
    };
    if workers > 1 {
        log::info!("{workers} worker loops proxy; one control loop runs the admin API and the health checks");
    }
    let notify = Notifier::from_env();
    let new_access_log = user::new_access_log(&flags);
    let access_log = match &flags.access_log {
        None => AccessLog::default(),
        Some(target) => AccessLog::start(target.clone(), flags.access_log_format).map_err(|e| match target {
            Target::File(path) => Failed::at(path, format!("cannot open the access log: {e}")),
            Target::Stdout => Failed(format!("cannot start the access log: {e}")),
        })?,
    };
    let options = Options {
        admin,
        access,
        state,
        source: source.clone(),
        form,
        grace: flags.grace,
        fd_limit,
        workers,
        pin: flags.pin,
        started,
        notify,
        access_log,
        relaunch: crate::server::upgrade::Relaunch::this_process()
            .map_err(|e| log::warn!("cannot learn this binary's path: SIGUSR2 cannot upgrade it: {e}"))
            .ok(),
    };
    let upgrading = inherited.is_some();
    let server = Server::new(options, prepared, inherited).map_err(|e| match (&source, &e) {
        // A service that cannot start is named with the file it came from.
        (Some(path), StartupError::Listen { .. } | StartupError::Service(_)) => Failed::at(path, e),
        _ => Failed(e.to_string()),
    })?;
    // Everything is bound and opened: root is needed no more. (A process that
    // upgrades one that switched already runs as the user.)
    if let Some(id) = identity.as_ref().filter(|_| !upgrading || crate::runtime::files::effective_uid() == 0) {
        let access_log = match &flags.access_log {
            Some(Target::File(path)) => Some(path.as_path()),
            _ => None,
        };
        let reach =
            user::Reach { state: flags.state.as_deref(), source: source.as_deref(), access_log, new_access_log };
        user::switch(id, &reach)?;
    }
    Ok(server)
}

/// Resolves every host name of the config (off this thread, with a deadline)
/// and checks the resolved addresses.
fn prepare(configs: Vec<ServiceConfig>, source: &Option<PathBuf>) -> Result<Vec<service::Prepared>, Failed> {
    let mut names: Vec<String> = configs.iter().flat_map(config::host_names).collect();
    names.sort();
    names.dedup();
    let lookups = helpers::resolve_now(names);
    configs.into_iter().map(|c| service::prepare(c, &lookups).map_err(|e| at_source(source, e))).collect()
}

/// The `-http` address: a unix socket path, or `host:port` resolved now.
fn admin_address(flags: &Flags) -> Result<AdminAddr, Failed> {
    if flags.http.starts_with('/') {
        return Ok(AdminAddr::Unix(flags.http.clone().into(), flags.http_mode));
    }
    let bad = |e: String| Failed(format!("admin API: cannot listen on {}: {e}", flags.http));
    let parsed = address::parse(&flags.http).map_err(bad)?;
    let lookups = helpers::resolve_now(parsed.name().map(str::to_string).into_iter().collect());
    let addr: SocketAddr = parsed.resolve(&lookups).map_err(bad)?;
    Ok(AdminAddr::Tcp(addr))
}

/// The admin token: the first line of a regular file, trimmed, not empty.
fn read_token(path: &Path) -> Result<Vec<u8>, Failed> {
    use std::os::unix::fs::PermissionsExt;
    let bytes = files::read_regular(path, 64 * 1024)
        .map_err(|e| Failed::at(path, format!("cannot read the admin token: {e}")))?;
    let text = String::from_utf8_lossy(&bytes);
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(Failed::at(path, "the admin token file is empty; put the token on its first line"));
    }
    if token.len() > 4096 || token.chars().any(|c| c.is_control() || c == ' ') {
        return Err(Failed::at(path, "the admin token must be one word of at most 4096 characters"));
    }
    if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        log::warn!("{}: the admin token file can be read by other users; chmod 600 it", path.display());
    }
    Ok(token.as_bytes().to_vec())
}
