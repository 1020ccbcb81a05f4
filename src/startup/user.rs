//! `-user` and `-group` at start-up (reference §1): who to become, checked
//! before anything is opened; the rule against a root admin API other hosts
//! can reach; and, once the admin API and every listener are bound, the
//! switch and a check of each file the new user must still reach, so that a
//! missing permission fails start-up instead of the first save or reload.

use std::path::Path;

use crate::cli::Flags;
use crate::control::access;
use crate::control::admin::AdminAddr;
use crate::control::state::StateFile;
use crate::model::config::{self, Form};
use crate::model::options::Globals;
use crate::runtime::accesslog::Target;
use crate::runtime::accounts::{self, Identity};
use crate::runtime::files;
use crate::runtime::privileges::{self, Kept};

use super::Failed;

/// The `-user` (and `-group`) identity, if one was given.
pub(super) fn identity(flags: &Flags) -> Result<Option<Identity>, Failed> {
    let Some(user) = &flags.user else { return Ok(None) };
    accounts::resolve(user, flags.group.as_deref()).map(Some).map_err(|e| {
        let which = match (&e, &flags.group) {
            (accounts::AccountError::NoGroup(_), Some(group)) => format!("-group {group}"),
            _ => format!("-user {user}"),
        };
        Failed(format!("{which}: {e}"))
    })
}

/// The uid shuttle runs as once start-up is done: files it keeps must be its.
pub(super) fn runs_as(identity: Option<&Identity>) -> u32 {
    identity.map_or_else(files::effective_uid, |id| id.uid)
}

/// Refuses an admin API that other hosts can reach in a process that stays
/// root: a flaw in its HTTP handling would then be root's.
pub(super) fn check_admin(admin: &AdminAddr, identity: Option<&Identity>) -> Result<(), Failed> {
    match admin {
        AdminAddr::Tcp(addr) if identity.is_none() && files::effective_uid() == 0 && !access::is_local_only(addr) => {
            Err(Failed(format!(
                "admin API: {addr} can be reached from other hosts, and shuttle would serve it as root: add -user NAME (e.g. -user nobody) to drop root once everything is bound, or listen on a loopback address or a unix socket"
            )))
        }
        _ => Ok(()),
    }
}

/// With `-user`, the state file is that user's to write, so root takes no
/// global option from it at start-up (they name files root opens and
/// addresses it binds): they come from `-config`, which stays root's, and
/// the state file is written with those. Returns the form to use.
pub(super) fn trusted_form(form: Form, state: &Path, config: Option<&Path>) -> Result<Form, Failed> {
    let Form::Object(written) = &form else { return Ok(form) };
    let trusted = match config {
        Some(path) => match config::load(path).map_err(|e| Failed::at(path, e))?.form {
            Form::Object(globals) => globals,
            Form::List => Globals::default(),
        },
        None => Globals::default(),
    };
    if *written != trusted {
        log::warn!(
            "{}: its global options differ from -config's, and are not used: with -user the state file is written by that user, so they come from -config and flags",
            state.display()
        );
    }
    Ok(Form::Object(trusted))
}

/// With `-user`, a state file that is a symbolic link is refused: the user
/// who may write its directory could point it at a file only root may read.
pub(super) fn check_state_file(path: &Path) -> Result<(), Failed> {
    match path.symlink_metadata() {
        Ok(meta) if meta.file_type().is_symlink() => Err(Failed::at(
            path,
            "is a symbolic link; with -user the state file's directory is that user's, and root reads no link there",
        )),
        _ => Ok(()),
    }
}

/// The files the new user must still reach after the switch.
#[derive(Debug)]
pub(super) struct Reach<'a> {
    /// The state file: every save creates a file beside it and renames it over.
    pub state: Option<&'a Path>,
    /// The file the services came from: SIGHUP reads it again.
    pub source: Option<&'a Path>,
    /// The access log file: SIGUSR1 opens it again.
    pub access_log: Option<&'a Path>,
    /// Whether start-up created the access log (then it is given to the new user).
    pub new_access_log: bool,
}

/// The access log file, if `-access-log` names one that does not exist yet.
pub(super) fn new_access_log(flags: &Flags) -> bool {
    matches!(&flags.access_log, Some(Target::File(path)) if path.symlink_metadata().is_err())
}

/// Becomes `id`, then checks what it must reach. Called once everything is
/// bound and opened, on the thread that runs the control loop.
pub(super) fn switch(id: &Identity, keep: &Reach<'_>) -> Result<(), Failed> {
    let who = match &id.name {
        Some(name) if *name != id.user => format!("{name} (uid {})", id.uid),
        _ => format!("{} (uid {})", id.user, id.uid),
    };
    if let (true, Some(path)) = (keep.new_access_log, keep.access_log) {
        // A log shuttle created as root is its own: the new user reopens it after rotation.
        std::os::unix::fs::lchown(path, Some(id.uid), Some(id.gid))
            .map_err(|e| Failed::at(path, format!("cannot give the new access log to user {who}: {e}")))?;
    }
    let kept = privileges::switch(id).map_err(|e| Failed(format!("-user {}: cannot switch: {e}", id.user)))?;
    let groups: Vec<String> = id.groups.iter().map(u32::to_string).collect();
    match kept {
        Kept::BindBelow1024 => log::info!(
            "running as user {who}, group {}, groups {}; kept CAP_NET_BIND_SERVICE and no other capability",
            id.gid,
            groups.join(",")
        ),
        Kept::Nothing => log::warn!(
            "running as user {who}, group {}, groups {}, with no capability: shuttle started without CAP_NET_BIND_SERVICE, so a service added later cannot listen on a port below 1024",
            id.gid,
            groups.join(",")
        ),
    }
    if let Some(path) = keep.state {
        let dir = files::parent_dir(path).display();
        StateFile::check_saveable(path).map_err(|e| {
            Failed::at(path, format!("user {who} cannot create files in {dir}, as every save does: {e}; make the directory the user's, or writable by its group"))
        })?;
    }
    if let Some(path) = keep.source {
        files::read_regular(path, files::MAX_FILE)
            .map_err(|e| Failed::at(path, format!("user {who} cannot read it, and SIGHUP reads it again: {e}")))?;
    }
    if let Some(path) = keep.access_log {
        privileges::may_write(path).map_err(|e| {
            Failed::at(path, format!("user {who} cannot write the access log, and SIGUSR1 opens it again: {e}"))
        })?;
    }
    Ok(())
}
