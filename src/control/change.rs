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
//! Once a save has started, the change is applied whatever happens to the
//! client that asked for it: the file and the running config must agree.

use std::collections::VecDeque;
use std::time::Instant;

use log::{debug, info, warn};

use crate::control::api::{self, ApiError, Draft, Plane, Ready, Response};
use crate::control::http::Request;
use crate::control::state::StateFile;
use crate::model::address::Lookups;
use crate::runtime::helpers::{self, Answer, Busy, Resolver, Worker, RESOLVE_DEADLINE};
use crate::runtime::key::Key;

/// Changes that may wait for their turn at once; more get a 503.
const MAX_WAITING: usize = 32;

/// A response for the admin connection `conn`.
#[derive(Debug)]
pub struct Reply {
    /// The admin connection that asked.
    pub conn: Key,
    /// Its answer.
    pub response: Response,
}

/// Who asked for a change, and what: the audit log's words for it.
#[derive(Debug, Clone)]
struct About {
    /// "PUT /web".
    what: String,
    /// The peer address, or the unix socket's peer uid and pid.
    who: String,
}

impl About {
    fn of(request: &Request, who: String) -> About {
        About { what: format!("{} {}", request.method, request.path), who }
    }

    /// Logs an applied change at info, with what changed.
    fn applied(&self, summary: &str) {
        info!("admin: {} from {}: {summary}", self.what, self.who);
    }

    /// Logs a refused change at warn, with its status and reason, and answers it.
    fn refused(&self, e: ApiError) -> Response {
        warn!("admin: {} from {} refused with {}: {}", self.what, self.who, e.status(), e.message());
        e.into_response()
    }
}

/// The change in flight, by what it waits for.
#[derive(Debug)]
enum Current {
    /// Names are being looked up; past `deadline` the change gets a 400.
    Resolving { conn: Key, job: u64, deadline: Instant, draft: Draft, names: Vec<String>, about: About },
    /// The state file is being written; once it is, the change is applied.
    Saving { conn: Key, job: u64, ready: Ready, about: About },
    /// Applied here; the answer waits until every worker loop has it too.
    Applying { conn: Key, response: Response },
}

/// The queue of admin changes and the one in flight.
#[derive(Debug)]
pub struct Changes {
    waiting: VecDeque<(Key, Request, String)>,
    current: Option<Current>,
    next_job: u64,
    resolver: Resolver,
    /// The state file and the thread that writes it, when there is one.
    state: Option<(StateFile, Worker)>,
}

impl Changes {
    /// A queue whose lookups and saves run on these helpers.
    pub fn new(resolver: Resolver, state: Option<(StateFile, Worker)>) -> Changes {
        Changes { waiting: VecDeque::new(), current: None, next_job: 1, resolver, state }
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
            let response = About::of(&request, who).refused(ApiError::Unavailable(message));
            replies.push(Reply { conn, response });
            return replies;
        }
        self.waiting.push_back((conn, request, who));
        self.pump(plane, now, &mut replies);
        replies
    }

    /// A helper answered.
    pub fn on_answer(&mut self, plane: &mut impl Plane, answer: Answer, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        match (answer, self.current.take()) {
            (Answer::Resolved { job, found }, Some(Current::Resolving { conn, job: expected, draft, about, .. }))
                if job == expected =>
            {
                replies.extend(self.resolved(plane, conn, draft, &found, about, now));
            }
            (Answer::Done { job, result }, Some(Current::Saving { conn, job: expected, ready, about }))
                if job == expected =>
            {
                let response = match result {
                    Ok(()) => {
                        let (response, summary) = api::commit(plane, ready, now);
                        about.applied(&summary);
                        if !plane.settled() {
                            self.current = Some(Current::Applying { conn, response });
                            return replies;
                        }
                        response
                    }
                    Err(e) => {
                        api::abandon(plane, ready);
                        let path = self.state.as_ref().map(|(s, _)| s.path().display().to_string()).unwrap_or_default();
                        about.refused(ApiError::Internal(format!(
                            "cannot write the state file {path}: {e}; nothing was changed"
                        )))
                    }
                };
                replies.push(Reply { conn, response });
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
            if let Some(Current::Applying { conn, response }) = self.current.take() {
                replies.push(Reply { conn, response });
            }
        }
        self.pump(plane, now, &mut replies);
        replies
    }

    /// Time passed: a lookup may have run out its deadline.
    pub fn on_time(&mut self, plane: &mut impl Plane, now: Instant) -> Vec<Reply> {
        let mut replies = Vec::new();
        if let Some(Current::Resolving { deadline, .. }) = &self.current {
            if now >= *deadline {
                if let Some(Current::Resolving { conn, names, about, .. }) = self.current.take() {
                    let slow = names.first().map_or_else(String::new, |n| helpers::timed_out(n));
                    replies.push(Reply { conn, response: about.refused(ApiError::BadRequest(slow)) });
                }
            }
        }
        self.pump(plane, now, &mut replies);
        replies
    }

    /// When [`Changes::on_time`] must next be called.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.current {
            Some(Current::Resolving { deadline, .. }) => Some(*deadline),
            _ => None,
        }
    }

    /// Admin connection `conn` is gone: its waiting requests go too, and a
    /// change of its still being resolved is given up. A save in flight is not.
    pub fn forget(&mut self, conn: Key) {
        self.waiting.retain(|(c, _, _)| *c != conn);
        if matches!(&self.current, Some(Current::Resolving { conn: c, .. }) if *c == conn) {
            self.current = None;
        }
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
            let Some((conn, request, who)) = self.waiting.pop_front() else { return };
            if let Some(reply) = self.start(plane, conn, &request, About::of(&request, who), now) {
                replies.push(reply);
            }
        }
    }

    fn start(
        &mut self,
        plane: &mut impl Plane,
        conn: Key,
        request: &Request,
        about: About,
        now: Instant,
    ) -> Option<Reply> {
        let draft = match api::draft(plane, request) {
            Ok(draft) => draft,
            Err(e) => return Some(refused(&about, conn, e)),
        };
        let names = draft.host_names();
        if names.is_empty() {
            return self.resolved(plane, conn, draft, &Lookups::new(), about, now);
        }
        let job = self.job();
        match self.resolver.submit(job, names.clone()) {
            Ok(()) => {
                let deadline = now + RESOLVE_DEADLINE;
                self.current = Some(Current::Resolving { conn, job, deadline, draft, names, about });
                None
            }
            Err(Busy(n)) => {
                let message = format!("name resolution is busy: {n} lookups have not answered yet; try again later");
                Some(refused(&about, conn, ApiError::Unavailable(message)))
            }
        }
    }

    fn resolved(
        &mut self,
        plane: &mut impl Plane,
        conn: Key,
        draft: Draft,
        lookups: &Lookups,
        about: About,
        now: Instant,
    ) -> Option<Reply> {
        let ready = match api::prepare(plane, draft, lookups) {
            Ok(ready) => ready,
            Err(e) => return Some(refused(&about, conn, e)),
        };
        let Some((state, worker)) = &self.state else {
            let (response, summary) = api::commit(plane, ready, now);
            about.applied(&summary);
            if !plane.settled() {
                self.current = Some(Current::Applying { conn, response });
                return None;
            }
            return Some(Reply { conn, response });
        };
        let job = self.next_job;
        self.next_job += 1;
        match worker.submit(job, state.save_job(ready.state_text())) {
            Ok(()) => {
                self.current = Some(Current::Saving { conn, job, ready, about });
                None
            }
            Err(e) => {
                api::abandon(plane, ready);
                let message =
                    format!("cannot write the state file {}: {e}; nothing was changed", state.path().display());
                Some(refused(&about, conn, ApiError::Internal(message)))
            }
        }
    }

    fn job(&mut self) -> u64 {
        let job = self.next_job;
        self.next_job += 1;
        job
    }
}

/// The answer to a change that will not happen, logged with who asked.
fn refused(about: &About, conn: Key, e: ApiError) -> Reply {
    Reply { conn, response: about.refused(e) }
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
        fn bound(&self) -> Vec<(Option<Key>, SocketAddr)> {
            Vec::new()
        }
        fn admin_addr(&self) -> Option<SocketAddr> {
            None
        }
        fn stage_listener(&mut self, _: SocketAddr) -> io::Result<Staged> {
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
        fn settled(&self) -> bool {
            !self.unacknowledged
        }
        fn info(&self) -> crate::control::info::Info {
            crate::control::info::Info::new(crate::control::info::Started::now(), Instant::now(), 1, 0, 0, 0)
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
        let mut changes = Changes::new(Resolver::new(outbox), None);
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
}
