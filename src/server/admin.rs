//! Running admin requests: an admin connection hands up each request it has
//! read; the loop checks who is asking, answers reads at once, and queues
//! changes, whose answers come back when the helpers have done their part.

use std::time::{Duration, Instant};

use log::{error, warn};

use super::{Entry, Role, Server};
use crate::context::Cx;
use crate::control::access::Refusal;
use crate::control::admin::{AdminConn, AdminStep};
use crate::control::api::{self, Response};
use crate::control::change::{Changes, Reply};
use crate::control::http::Request;
use crate::runtime::helpers::Answer;
use crate::runtime::key::Key;
use crate::runtime::ready::Step;
use crate::runtime::throttle;

/// Refused admin requests are logged at most this often (an attacker could send thousands).
pub(super) const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(5);

impl Server {
    pub(super) fn with_admin(
        &mut self,
        key: Key,
        now: Instant,
        f: impl FnOnce(&mut AdminConn, &mut Cx<'_>) -> AdminStep,
    ) -> AdminStep {
        let Server { poll, entries, timers, services, pool, fds, access_log, .. } = self;
        let Some(Entry::Admin(conn)) = entries.get_mut(key) else { return AdminStep::Done(Step::Wait) };
        let mut cx = Cx { now, registry: poll.registry(), timers, services, pool, fds, access_log };
        f(conn, &mut cx)
    }

    /// Goes on with an admin connection until it waits or closes: each request
    /// it hands up is answered now, or queued as a change.
    pub(super) fn run_admin(&mut self, key: Key, step: AdminStep, now: Instant) {
        let mut work = vec![(key, step)];
        while let Some((key, step)) = work.pop() {
            match step {
                AdminStep::Done(step) => self.apply(key, step),
                AdminStep::Execute(request) => {
                    for Reply { conn, response } in self.execute(key, request, now) {
                        let step = self.with_admin(conn, now, |c, cx| c.respond(conn, response, cx));
                        work.push((conn, step));
                    }
                }
            }
        }
    }

    /// What a request gets now: its answer, or nothing yet (a queued change),
    /// plus the answers of changes it let through.
    fn execute(&mut self, conn: Key, request: Request, now: Instant) -> Vec<Reply> {
        if let Err(refusal) = self.access.check(&request.from) {
            return vec![Reply { conn, response: self.refuse(conn, &request, &refusal, now) }];
        }
        if !api::is_change(&request) {
            return vec![Reply { conn, response: api::read(self, &request) }];
        }
        if let Some(response) = self.upgrading() {
            return vec![Reply { conn, response }];
        }
        let who = match self.entries.get(conn) {
            Some(Entry::Admin(c)) => c.peer().to_string(),
            _ => "?".into(),
        };
        self.with_changes(|changes, server| changes.submit(server, conn, request, who, now))
    }

    fn refuse(&mut self, conn: Key, request: &Request, refusal: &Refusal, now: Instant) -> Response {
        let peer = match self.entries.get(conn) {
            Some(Entry::Admin(c)) => c.peer().to_string(),
            _ => "?".into(),
        };
        if let Some(held) = self.refusals.ready(now) {
            warn!("admin: refused {} {} from {peer}: {refusal}{}", request.method, request.path, throttle::more(held));
        }
        let mut response = Response::error(refusal.status(), &refusal.to_string());
        if let Refusal::Token(_) = refusal {
            response.fields.push(("WWW-Authenticate", "Bearer realm=\"shuttle\"".into()));
        }
        response
    }

    /// Runs `f` on the change queue with the server as its plane.
    pub(super) fn with_changes(&mut self, f: impl FnOnce(&mut Changes, &mut Server) -> Vec<Reply>) -> Vec<Reply> {
        let Some(mut changes) = self.changes.take() else { return Vec::new() };
        let replies = f(&mut changes, self);
        self.changes = Some(changes);
        replies
    }

    /// Helpers answered: go on with the change that waited for them.
    pub(super) fn on_answers(&mut self, now: Instant) {
        loop {
            let Role::Control { inbox, .. } = &self.role else { return };
            let Some(answer) = inbox.next() else { return };
            let replies = match answer {
                Answer::Applied { worker, generation } => {
                    if let Some(workers) = self.workers_mut() {
                        workers.applied(worker, generation);
                    }
                    self.with_changes(|changes, server| changes.on_settled(server, now))
                }
                Answer::Alive { worker, seq } => {
                    if let Some(workers) = self.workers_mut() {
                        workers.alive(worker, seq);
                    }
                    Vec::new()
                }
                Answer::Exited { worker, failed } => {
                    if let Some(workers) = self.workers_mut() {
                        workers.exited(worker);
                    }
                    if let Some(why) = failed.filter(|_| self.failed.is_none()) {
                        error!("worker {worker} stopped: {why}; shutting down, for a supervisor to restart shuttle");
                        self.failed = Some(format!("worker {worker} stopped: {why}"));
                        self.begin_drain(now);
                    }
                    // A change may have waited for that worker only.
                    self.with_changes(|changes, server| changes.on_settled(server, now))
                }
                Answer::Upgraded { result } => {
                    self.on_upgraded(result, now);
                    Vec::new()
                }
                Answer::Told { pid, result } => {
                    self.on_told(pid, result);
                    Vec::new()
                }
                answer => self.with_changes(|changes, server| changes.on_answer(server, answer, now)),
            };
            self.deliver(replies, now);
        }
    }

    /// SIGHUP: the file shuttle started from is read again and applied as
    /// one change, in its turn.
    pub(super) fn reload(&mut self, now: Instant) {
        let replies = self.with_changes(|changes, server| changes.reload(server, now));
        self.deliver(replies, now);
    }

    /// A lookup may have run out its time, or a change may wait behind one
    /// whose client left.
    pub(super) fn on_change_deadline(&mut self, now: Instant) {
        let changes = self.changes.as_ref();
        let late = changes.and_then(Changes::deadline).is_some_and(|d| now >= d);
        if late || changes.is_some_and(Changes::is_stuck) {
            let replies = self.with_changes(|changes, server| changes.on_time(server, now));
            self.deliver(replies, now);
        }
    }

    fn deliver(&mut self, replies: Vec<Reply>, now: Instant) {
        for Reply { conn, response } in replies {
            let step = self.with_admin(conn, now, |c, cx| c.respond(conn, response, cx));
            self.run_admin(conn, step, now);
        }
    }
}
