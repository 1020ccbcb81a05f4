//! Admin changes take turns: one is in flight at a time, the others wait in
//! arrival order. A change in flight waits for the resolver, then for the
//! state file's write, both on helper threads, while the loop goes on
//! proxying and answering reads (reference §5's order is kept: persist, apply,
//! answer).
//!
//! ```text
//! waiting ──▶ draft ──▶ Resolving ──▶ prepare ──▶ Saving ──▶ commit ──▶ Applying ──▶ 200
//!               │ 4xx        │ 400 (deadline)│ 4xx      │ 500
//! ```
//!
//! `Applying` lasts until every worker loop has the change (at once with one loop).
//!
//! A reload (SIGHUP, reference §7) takes its turn in the same queue: it reads
//! the file shuttle started from on a helper thread (`Reading`), then goes the
//! same way as one admin change of the whole service list, with the log as
//! its only answer. At most one reload waits: it reads the file when its turn
//! comes, so a burst of signals costs one reload and the last write wins.
//!
//! Once a save has started, the change is applied whatever happens to the
//! client that asked for it: the file and the running config must agree.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::control::api::{self, ApiError, Draft, Plane, Ready, Response};
use crate::control::http::Request;
use crate::control::state::StateFile;
use crate::model::address::Lookups;
use crate::model::config::{self, ConfigError, ConfigFile, Form};
use crate::runtime::helpers::{self, Answer, Busy, Outbox, Resolver, Worker, RESOLVE_DEADLINE};
use crate::runtime::key::Key;

/// Changes that may wait for their turn at once; more get a 503.
const MAX_WAITING: usize = 32;
/// How long reading the file of a reload may take: a local file takes
/// milliseconds, so past this something hangs (a dead network mount).
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// What every refused change leaves behind.
const NOTHING_CHANGED: &str = "nothing was changed";

/// A response for the admin connection `conn`.
#[derive(Debug)]
pub struct Reply {
    /// The admin connection that asked.
    pub conn: Key,
    /// Its answer.
    pub response: Response,
}

/// Who asked for a change: the audit log's words for it, and where its answer goes.
#[derive(Debug, Clone)]
enum Origin {
    /// An admin request; the answer goes back to its connection.
    Admin {
        /// The admin connection that asked.
        conn: Key,
        /// "PUT /web".
        what: String,
        /// The peer address, or the unix socket's peer uid and pid.
        who: String,
    },
    /// SIGHUP: a reload of this file. Nobody waits for an answer but the log.
    Signal {
        /// The file re-read.
        path: PathBuf,
        /// Its form once read: the state file takes it with the services.
        form: Option<Form>,
    },
}

impl Origin {
    fn admin(conn: Key, request: &Request, who: String) -> Origin {
        Origin::Admin { conn, what: format!("{} {}", request.method, request.path), who }
    }

    /// "PUT /web from 127.0.0.1:50110", or "reload (SIGHUP) of /etc/shuttle.json".
    fn head(&self) -> String {
        match self {
            Origin::Admin { what, who, .. } => format!("{what} from {who}"),
            Origin::Signal { path, .. } => {
                format!("reload (SIGHUP) of {}", config::one_line(&path.display().to_string()))
            }
        }
    }

    /// A reload's file form, once read.
    fn form(&self) -> Option<&Form> {
        match self {
            Origin::Signal { form, .. } => form.as_ref(),
            Origin::Admin { .. } => None,
        }
    }

    /// The admin connection waiting for the answer, if any.
    fn conn(&self) -> Option<Key> {
        match self {
            Origin::Admin { conn, .. } => Some(*conn),
            Origin::Signal { .. } => None,
        }
    }

    /// The answer to send, if anyone waits for one.
    fn answer(&self, response: Response) -> Option<Reply> {
        self.conn().map(|conn| Reply { conn, response })
    }

    /// Logs an applied change at info, with what changed.
    fn applied(&self, summary: &str) {
        info!("admin: {}: {summary}", self.head());
    }

    /// Logs a refused change at warn, with its reason (and status, to an
    /// admin client), and answers it.
    fn refused(&self, e: ApiError) -> Option<Reply> {
        let message = e.message();
        match self {
            Origin::Admin { .. } => warn!("admin: {} refused with {}: {message}", self.head(), e.status()),
            Origin::Signal { .. } if message.ends_with(NOTHING_CHANGED) => {
                warn!("admin: {} refused: {message}", self.head())
            }
            Origin::Signal { .. } => warn!("admin: {} refused: {message}; {NOTHING_CHANGED}", self.head()),
        }
        self.answer(e.into_response())
    }
}

/// A change waiting for its turn.
// At most `MAX_WAITING` of them, and a reload: boxing the request would save nothing worth an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Pending {
    /// An admin request from connection `conn`, sent by `who`.
    Admin { conn: Key, request: Request, who: String },
    /// A reload; the file is read when its turn comes.
    Reload,
}

/// The change in flight, by what it waits for.
#[derive(Debug)]
enum Current {
    /// A reload's file is being read and parsed; past `deadline` it is given up.
    Reading { job: u64, deadline: Instant, path: PathBuf, read: Receiver<Result<ConfigFile, ConfigError>> },
    /// Names are being looked up; past `deadline` the change gets a 400.
    Resolving { origin: Origin, job: u64, deadline: Instant, draft: Box<Draft>, names: Vec<String> },
    /// The state file is being written; once it is, the change is applied.
    Saving { origin: Origin, job: u64, ready: Ready },
    /// Applied here; the answer (if anyone waits for one) waits until every worker loop has it too.
    Applying { reply: Option<Reply> },
}

/// The queue of admin changes and reloads, and the one in flight.
#[derive(Debug)]
pub struct Changes {
    waiting: VecDeque<Pending>,
    current: Option<Current>,
    next_job: u64,
    resolver: Resolver,
    /// Where the helper reading a reload's file answers.
    outbox: Outbox,
    /// The state file and the thread that writes it, when there is one.
    state: Option<(StateFile, Worker)>,
    /// The file a reload reads: the one shuttle started from, if any.
    source: Option<PathBuf>,
    /// The form the state file is written in: that of the file last read
    /// (at start-up or by a reload), with its global options as read.
    form: Form,
}

impl Changes {
    /// A queue whose helpers answer into `outbox`, saving to `state` in
    /// `form`, and whose reloads read `source`.
    pub fn new(outbox: Outbox, state: Option<(StateFile, Worker)>, source: Option<PathBuf>, form: Form) -> Changes {
        let resolver = Resolver::new(outbox.clone());
        Changes { waiting: VecDeque::new(), current: None, next_job: 1, resolver, outbox, state, source, form }
    }

    /// Takes a change request from admin connection `conn`, sent by `who`;
    /// replies that are ready come back.
    pub fn submit(
        &mut self,
        plane: &mut impl Plane,
        conn: Key,
        request: Request,
        who: String,
        now: Instant,
    ) -> Vec<Reply> {
        let mut replies = Vec::new();
        if self.waiting.len() >= MAX_WAITING {
            let message = format!("{MAX_WAITING} changes are waiting for their turn already; try again later");
            replies.extend(Origin::admin(conn, &request, who).refused(ApiError::Unavailable(message)));
            return replies;
        }
        self.waiting.push_back(Pending::Admin { conn, request, who });
        self.pump(plane, now, &mut replies);
        replies
    }

    /// SIGHUP: queues a reload of the file shuttle started from, unless one
    /// waits already (it reads the file when its turn comes, so it sees this
    /// signal's version too). Replies of changes it let through come back.
    pub fn reload(&mut self, plane: &mut impl Plane, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        if self.source.is_none() {
            warn!("SIGHUP: nothing to reload: shuttle was started with neither -config nor an existing state file; {NOTHING_CHANGED}");
            return replies;
        }
        if self.waiting.iter().any(|p| matches!(p, Pending::Reload)) {
            debug!("SIGHUP: a reload is waiting for its turn already; it will read the file then");
            return replies;
        }
        self.waiting.push_back(Pending::Reload);
        self.pump(plane, now, &mut replies);
        replies
    }

    /// A helper answered.
    pub fn on_answer(&mut self, plane: &mut impl Plane, answer: Answer, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        match (answer, self.current.take()) {
            (Answer::Done { job, .. }, Some(Current::Reading { job: expected, path, read, .. })) if job == expected => {
                let configs = read.try_recv().unwrap_or_else(|_| {
                    Err(ConfigError::Io {
                        path: path.clone(),
                        source: std::io::Error::other("the reading thread stopped"),
                    })
                });
                replies.extend(self.loaded(plane, path, configs, now));
            }
            (Answer::Resolved { job, found }, Some(Current::Resolving { origin, job: expected, draft, .. }))
                if job == expected =>
            {
                replies.extend(self.resolved(plane, origin, *draft, &found, now));
            }
            (Answer::Done { job, result }, Some(Current::Saving { origin, job: expected, ready }))
                if job == expected =>
            {
                let reply = match result {
                    Ok(()) => self.commit(plane, origin, ready, now),
                    Err(e) => {
                        api::abandon(plane, ready);
                        let path = self.state.as_ref().map(|(s, _)| s.path().display().to_string()).unwrap_or_default();
                        origin.refused(ApiError::Internal(format!(
                            "cannot write the state file {path}: {e}; {NOTHING_CHANGED}"
                        )))
                    }
                };
                replies.extend(reply);
            }
            // A late answer to a change given up on (deadline, client gone).
            (answer, current) => {
                debug!("admin: dropping a late helper answer: {answer:?}");
                self.current = current;
            }
        }
        self.pump(plane, now, &mut replies);
        replies
    }

    /// A worker loop acknowledged a change (or stopped): the change applying
    /// may be everywhere now.
    pub fn on_settled(&mut self, plane: &mut impl Plane, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        if matches!(self.current, Some(Current::Applying { .. })) && plane.settled() {
            if let Some(Current::Applying { reply }) = self.current.take() {
                replies.extend(reply);
            }
        }
        self.pump(plane, now, &mut replies);
        replies
    }

    /// Time passed: a lookup or a reload's read may have run out its deadline.
    pub fn on_time(&mut self, plane: &mut impl Plane, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        if self.deadline().is_some_and(|d| now >= d) {
            match self.current.take() {
                Some(Current::Resolving { names, origin, .. }) => {
                    let slow = names.first().map_or_else(String::new, |n| helpers::timed_out(n));
                    replies.extend(origin.refused(ApiError::BadRequest(slow)));
                }
                Some(Current::Reading { path, .. }) => {
                    let slow = format!("the file was not read within {} s", READ_DEADLINE.as_secs());
                    Origin::Signal { path, form: None }.refused(ApiError::Internal(slow));
                }
                other => self.current = other,
            }
        }
        self.pump(plane, now, &mut replies);
        replies
    }

    /// When [`Changes::on_time`] must next be called.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.current {
            Some(Current::Resolving { deadline, .. } | Current::Reading { deadline, .. }) => Some(*deadline),
            _ => None,
        }
    }

    /// Admin connection `conn` is gone: its waiting requests go too, and a
    /// change of its still being resolved is given up. A save in flight is not.
    pub fn forget(&mut self, conn: Key) {
        self.waiting.retain(|p| !matches!(p, Pending::Admin { conn: c, .. } if *c == conn));
        if matches!(&self.current, Some(Current::Resolving { origin, .. }) if origin.conn() == Some(conn)) {
            self.current = None;
        }
    }

    /// Whether no change is in flight or waiting: the config is the one saved (an upgrade starts only then).
    pub fn is_idle(&self) -> bool {
        self.current.is_none() && self.waiting.is_empty()
    }

    /// Another descriptor of the state file's lock, for the hand-over.
    pub fn state_lock(&self) -> Option<std::io::Result<std::os::fd::OwnedFd>> {
        self.state.as_ref().map(|(state, _)| state.lock_copy())
    }

    /// The form the state file is written in, with its global options.
    pub fn form(&self) -> &Form {
        &self.form
    }

    /// The file a reload reads.
    pub fn source(&self) -> Option<&std::path::Path> {
        self.source.as_deref()
    }

    /// Writes this process's pid into the state file's lock file (after an upgrade).
    pub fn name_holder(&self) -> std::io::Result<()> {
        self.state.as_ref().map_or(Ok(()), |(state, _)| state.name_holder())
    }

    /// Whether a change is still to be answered (the drain waits for a save in flight).
    pub fn is_saving(&self) -> bool {
        matches!(self.current, Some(Current::Saving { .. } | Current::Applying { .. }))
    }

    /// Whether a change waits although none is in flight (its predecessor's
    /// client left): [`Changes::pump`] should run.
    pub fn is_stuck(&self) -> bool {
        self.current.is_none() && !self.waiting.is_empty()
    }

    /// Starts waiting changes until one has to wait for a helper.
    pub fn pump(&mut self, plane: &mut impl Plane, now: Instant, replies: &mut Vec<Reply>) {
        while self.current.is_none() {
            let Some(pending) = self.waiting.pop_front() else { return };
            replies.extend(self.start(plane, pending, now));
        }
    }

    fn start(&mut self, plane: &mut impl Plane, pending: Pending, now: Instant) -> Option<Reply> {
        match pending {
            Pending::Admin { conn, request, who } => {
                let origin = Origin::admin(conn, &request, who);
                match api::draft(plane, &request) {
                    Ok(draft) => self.look_up(plane, origin, draft, now),
                    Err(e) => origin.refused(e),
                }
            }
            Pending::Reload => self.read(now),
        }
    }

    /// Starts reading and parsing the reload's file on a helper thread: a
    /// read blocks (a slow disk, a network mount), and a big file takes a
    /// while to parse.
    fn read(&mut self, now: Instant) -> Option<Reply> {
        let path = self.source.clone()?;
        let job = self.job();
        let reading = path.clone();
        match helpers::run_once("shuttle-reload", job, &self.outbox, move || config::load(&reading)) {
            Ok(read) => {
                self.current = Some(Current::Reading { job, deadline: now + READ_DEADLINE, path, read });
                None
            }
            Err(e) => Origin::Signal { path, form: None }
                .refused(ApiError::Internal(format!("cannot start a thread to read it: {e}"))),
        }
    }

    /// The reload's file was read: the same way as an admin change from here.
    fn loaded(
        &mut self,
        plane: &mut impl Plane,
        path: PathBuf,
        file: Result<ConfigFile, ConfigError>,
        now: Instant,
    ) -> Option<Reply> {
        match file {
            Ok(ConfigFile { services, form }) => {
                let origin = Origin::Signal { path, form: Some(form) };
                self.look_up(plane, origin, Draft::Reload { configs: services }, now)
            }
            // The words start-up would print for this file.
            Err(e) => Origin::Signal { path, form: None }.refused(ApiError::BadRequest(e.to_string())),
        }
    }

    /// Looks up the names a draft needs on a helper thread, if it needs any.
    fn look_up(&mut self, plane: &mut impl Plane, origin: Origin, draft: Draft, now: Instant) -> Option<Reply> {
        let names = draft.host_names();
        if names.is_empty() {
            return self.resolved(plane, origin, draft, &Lookups::new(), now);
        }
        let job = self.job();
        match self.resolver.submit(job, names.clone()) {
            Ok(()) => {
                let deadline = now + RESOLVE_DEADLINE;
                self.current = Some(Current::Resolving { origin, job, deadline, draft: Box::new(draft), names });
                None
            }
            Err(Busy(n)) => {
                let message = format!("name resolution is busy: {n} lookups have not answered yet; try again later");
                origin.refused(ApiError::Unavailable(message))
            }
        }
    }

    fn resolved(
        &mut self,
        plane: &mut impl Plane,
        origin: Origin,
        draft: Draft,
        lookups: &Lookups,
        now: Instant,
    ) -> Option<Reply> {
        let ready = match api::prepare(plane, draft, lookups) {
            Ok(ready) => ready,
            Err(e) => return origin.refused(e),
        };
        // A reload brings its file's form; a reload that changes only global options is saved too.
        let form = origin.form().unwrap_or(&self.form);
        let saves = !ready.changes_nothing() || *form != self.form;
        let Some((state, worker)) = self.state.as_ref().filter(|_| saves) else {
            return self.commit(plane, origin, ready, now);
        };
        let job = self.next_job;
        self.next_job += 1;
        match worker.submit(job, state.save_job(form.render(ready.configs()))) {
            Ok(()) => {
                self.current = Some(Current::Saving { origin, job, ready });
                None
            }
            Err(e) => {
                api::abandon(plane, ready);
                let message = format!("cannot write the state file {}: {e}; {NOTHING_CHANGED}", state.path().display());
                origin.refused(ApiError::Internal(message))
            }
        }
    }

    /// Applies a ready (and saved) change and logs it; its answer waits
    /// until every worker loop has it.
    fn commit(&mut self, plane: &mut impl Plane, origin: Origin, ready: Ready, now: Instant) -> Option<Reply> {
        let (response, summary) = api::commit(plane, ready, now);
        origin.applied(&summary);
        if let Some(form) = origin.form() {
            let changed = self.form.changed(form);
            if !changed.is_empty() {
                warn!(
                    "admin: {}: global options changed: {}; they take effect at start-up only: restart shuttle to apply them",
                    origin.head(),
                    changed.join(", ")
                );
            }
            self.form = form.clone();
        }
        let reply = origin.answer(response);
        if !plane.settled() {
            self.current = Some(Current::Applying { reply });
            return None;
        }
        reply
    }

    fn job(&mut self) -> u64 {
        let job = self.next_job;
        self.next_job += 1;
        job
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::SocketAddr;

    use super::*;
    use crate::control::api::Staged;
    use crate::control::http::Caller;
    use crate::model::config::{BackendConfig, ServiceConfig};
    use crate::model::service::{self, Prepared, Services};
    use crate::runtime::helpers::Inbox;
    use crate::runtime::key::Slots;

    /// A plane whose workers acknowledge only when told to.
    struct Fake {
        services: Services,
        unacknowledged: bool,
    }

    impl Plane for Fake {
        fn services(&self) -> &Services {
            &self.services
        }
        fn bound(&self) -> Vec<(Option<Key>, crate::model::endpoint::Endpoint)> {
            Vec::new()
        }
        fn admin_addr(&self) -> Option<SocketAddr> {
            None
        }
        fn stage_listener(
            &mut self,
            _: &crate::model::endpoint::Endpoint,
            _: &crate::model::config::ServiceConfig,
        ) -> io::Result<Staged> {
            Err(io::Error::other("not in this test"))
        }
        fn unstage(&mut self, _: Staged) {}
        fn add_service(&mut self, _: Prepared, _: Staged, _: Instant) {}
        fn replace_service(&mut self, _: Key, _: Prepared, _: Option<Staged>, _: Instant) {}
        fn set_backends(&mut self, key: Key, prepared: Prepared, _: Instant) {
            self.services.set_backends(key, prepared.config.backends, prepared.backend_addrs);
            self.unacknowledged = true;
        }
        fn remove_service(&mut self, _: Key, _: Instant) {}
        fn cut(&mut self, _: Key, _: Option<&str>, _: Instant) {}
        fn settled(&self) -> bool {
            !self.unacknowledged
        }
        fn info(&self) -> crate::control::info::Info {
            crate::control::info::Info::new(
                crate::control::info::Started::now(),
                Instant::now(),
                1,
                0,
                0,
                Default::default(),
            )
        }
        fn process(&self) -> crate::control::metrics::Process<'_> {
            crate::control::metrics::Process {
                started: std::time::SystemTime::now(),
                workers: 1,
                active: 0,
                max_fds: 1024,
                // A test's plane lives as long as the test: leaking it is harmless.
                admin: Box::leak(Box::default()),
                access_log: None,
            }
        }
    }

    #[test]
    fn a_change_is_answered_only_once_every_worker_has_it() {
        let mut services = Services::default();
        let mut config = ServiceConfig::new("web", "127.0.0.1:8080");
        config.backends.push(BackendConfig::new("a", "127.0.0.1:9001"));
        services.insert(service::prepare(config, &Lookups::new()).unwrap());
        let mut plane = Fake { services, unacknowledged: false };
        let outbox = Inbox::<Answer>::new(mio::Poll::new().unwrap().registry(), mio::Token(1)).unwrap().outbox();
        let mut changes = Changes::new(outbox, None, None, Form::List);
        let request = Request {
            method: "PUT".into(),
            path: "/web/b".into(),
            query: None,
            body: br#"{"address": "127.0.0.1:9002"}"#.to_vec(),
            keep_alive: true,
            from: Caller::default(),
        };
        let now = Instant::now();
        let conn = Slots::<()>::new().insert(());
        let who = "127.0.0.1:1".to_string();
        assert!(changes.submit(&mut plane, conn, request, who, now).is_empty(), "applied here, not yet everywhere");
        assert!(changes.is_saving(), "a drain waits for it");
        assert!(changes.on_settled(&mut plane, now).is_empty(), "still not acknowledged");
        plane.unacknowledged = false;
        let replies = changes.on_settled(&mut plane, now);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].response.status, 200);
        assert!(!changes.is_saving());
    }

    /// The next helper answer, waited for (a reload's read runs on a thread).
    fn next_answer(inbox: &Inbox<Answer>) -> Answer {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(answer) = inbox.next() {
                return answer;
            }
            assert!(Instant::now() < deadline, "no helper answer within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn signals_while_a_reload_is_in_flight_queue_one_more_and_no_answer_goes_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, "[]").unwrap();
        let mut services = Services::default();
        services.insert(service::prepare(ServiceConfig::new("web", "127.0.0.1:8080"), &Lookups::new()).unwrap());
        let mut plane = Fake { services, unacknowledged: false };
        let poll = mio::Poll::new().unwrap();
        let inbox = Inbox::<Answer>::new(poll.registry(), mio::Token(1)).unwrap();
        let mut changes = Changes::new(inbox.outbox(), None, Some(path), Form::List);
        let now = Instant::now();
        for _ in 0..3 {
            assert!(changes.reload(&mut plane, now).is_empty());
        }
        assert!(matches!(changes.current, Some(Current::Reading { .. })), "the first reads the file");
        assert_eq!(changes.waiting.len(), 1, "one more waits; the third signal adds nothing");
        assert!(changes.on_answer(&mut plane, next_answer(&inbox), now).is_empty(), "nobody to answer");
        assert!(matches!(changes.current, Some(Current::Reading { .. })), "the waiting reload reads the file again");
        assert!(changes.waiting.is_empty());
        assert!(changes.on_answer(&mut plane, next_answer(&inbox), now).is_empty());
        assert!(changes.current.is_none() && changes.waiting.is_empty());
    }

    #[test]
    fn a_signal_without_a_file_queues_nothing() {
        let poll = mio::Poll::new().unwrap();
        let inbox = Inbox::<Answer>::new(poll.registry(), mio::Token(1)).unwrap();
        let mut changes = Changes::new(inbox.outbox(), None, None, Form::List);
        let mut plane = Fake { services: Services::default(), unacknowledged: false };
        assert!(changes.reload(&mut plane, Instant::now()).is_empty());
        assert!(changes.current.is_none() && changes.waiting.is_empty());
    }
}
