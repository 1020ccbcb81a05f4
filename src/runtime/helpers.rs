//! Helper threads for the calls that block: name resolution and the state
//! file's write and fsync. The loop never makes such a call itself (pitfall
//! 16): it hands a job to a helper and goes on; the helper posts its answer
//! to the loop's inbox and wakes the loop through its `mio::Waker`.
//!
//! Helpers own no socket of the loop and share nothing with it but the
//! channel. Each job carries a number the loop chose, so a late answer to a
//! job the loop has given up on is recognised and dropped.

use std::io;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::{Registry, Token, Waker};

/// What the resolver found for each name: its address (IPv4 preferred), or why there is none.
pub type Lookups = std::collections::HashMap<String, Result<std::net::IpAddr, String>>;

/// How long a name may take to resolve before the change that needs it gets a 400.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);
/// Lookups that may be in flight at once; beyond, a change needing one is refused (503).
pub const MAX_LOOKUPS: usize = 4;

/// What a helper reports back.
#[derive(Debug)]
pub enum Answer {
    /// The names of job `job` were looked up.
    Resolved {
        /// The job's number.
        job: u64,
        /// Each name's address, or why it has none.
        found: Lookups,
    },
    /// The blocking work of job `job` is done.
    Done {
        /// The job's number.
        job: u64,
        /// How it went.
        result: io::Result<()>,
    },
    /// Worker loop `worker` has applied every change up to `generation`.
    Applied {
        /// The worker's index.
        worker: usize,
        /// The last change it applied.
        generation: u64,
    },
    /// Worker loop `worker` answered the watchdog's ping `seq`.
    Alive {
        /// The worker's index.
        worker: usize,
        /// The ping's number.
        seq: u64,
    },
    /// The process started by a binary upgrade is ready to serve, or why it is not.
    Upgraded {
        /// The new process, waiting for the word to serve, or why the upgrade failed.
        result: Result<crate::runtime::process::Successor, crate::runtime::process::UpgradeError>,
    },
    /// The new process of an upgrade was told to serve, or could not be.
    Told {
        /// Its pid.
        pid: u32,
        /// How the telling went.
        result: io::Result<()>,
    },
    /// Worker loop `worker` has stopped: drained, or `failed` with why.
    Exited {
        /// The worker's index.
        worker: usize,
        /// Why it stopped early, if it did.
        failed: Option<String>,
    },
}

/// The loop's end: messages (helpers' answers, or a worker loop's orders)
/// arrive here after its waker fired.
#[derive(Debug)]
pub struct Inbox<T = Answer> {
    answers: Receiver<T>,
    outbox: Outbox<T>,
}

/// The senders' end: posts a message and wakes the loop.
#[derive(Debug)]
pub struct Outbox<T = Answer> {
    answers: Sender<T>,
    waker: Arc<Waker>,
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Outbox { answers: self.answers.clone(), waker: self.waker.clone() }
    }
}

impl<T> Outbox<T> {
    /// The loop's waker, for a [`crate::runtime::bell::Bell`] that wakes it with no message.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Posts `answer` and wakes the loop; `false` if the loop is gone.
    pub fn post(&self, answer: T) -> bool {
        // The loop may be gone (shutting down): nobody is left to tell.
        if self.answers.send(answer).is_err() {
            return false;
        }
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake the event loop: {e}");
        }
        true
    }
}

impl<T> Inbox<T> {
    /// An inbox whose waker raises `token` on `registry` (mio allows one waker per poll).
    pub fn new(registry: &Registry, token: Token) -> io::Result<Inbox<T>> {
        let waker = Arc::new(Waker::new(registry, token)?);
        let (tx, answers) = mpsc::channel();
        Ok(Inbox { answers, outbox: Outbox { answers: tx, waker } })
    }

    /// The next message that has arrived, if any.
    pub fn next(&self) -> Option<T> {
        self.answers.try_recv().ok()
    }

    /// Where senders post.
    pub fn outbox(&self) -> Outbox<T> {
        self.outbox.clone()
    }
}

/// Looks names up on helper threads, one thread per job so that a name that
/// never answers holds up only its own job.
#[derive(Debug)]
pub struct Resolver {
    outbox: Outbox,
    in_flight: Arc<AtomicUsize>,
}

/// Too many lookups are still waiting for an answer.
#[derive(Debug)]
pub struct Busy(pub usize);

impl Resolver {
    /// A resolver answering into `outbox`.
    pub fn new(outbox: Outbox) -> Resolver {
        Resolver { outbox, in_flight: Arc::new(AtomicUsize::new(0)) }
    }

    /// Starts looking up `names` as job `job`; the answer comes as [`Answer::Resolved`].
    pub fn submit(&self, job: u64, names: Vec<String>) -> Result<(), Busy> {
        let running = self.in_flight.load(Ordering::Relaxed);
        if running >= MAX_LOOKUPS {
            return Err(Busy(running));
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let (outbox, in_flight) = (self.outbox.clone(), self.in_flight.clone());
        let asked = names.clone();
        let spawned = thread::Builder::new().name("shuttle-resolve".into()).spawn(move || {
            crate::runtime::privileges::confine_thread();
            let found = lookup_all(&asked);
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = outbox.post(Answer::Resolved { job, found });
        });
        if let Err(e) = spawned {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            let found = names.into_iter().map(|n| (n, Err(format!("cannot start a resolver thread: {e}")))).collect();
            let _ = self.outbox.post(Answer::Resolved { job, found });
        }
        Ok(())
    }
}

/// Looks up `names` before the loop runs (start-up), waiting at most
/// [`RESOLVE_DEADLINE`]; a name still unanswered then is an error naming it.
pub fn resolve_now(names: Vec<String>) -> Lookups {
    if names.is_empty() {
        return Lookups::new();
    }
    let (tx, rx) = mpsc::channel();
    let asked = names.clone();
    let spawned = thread::Builder::new().name("shuttle-resolve".into()).spawn(move || {
        crate::runtime::privileges::confine_thread();
        for name in names {
            let found = lookup(&name);
            if tx.send((name, found)).is_err() {
                return;
            }
        }
    });
    let mut found = Lookups::new();
    if let Err(e) = spawned {
        return asked.into_iter().map(|n| (n, Err(format!("cannot start a resolver thread: {e}")))).collect();
    }
    let deadline = Instant::now() + RESOLVE_DEADLINE;
    while found.len() < asked.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((name, result)) => {
                found.insert(name, result);
            }
            Err(_) => break,
        }
    }
    for name in asked {
        found.entry(name.clone()).or_insert_with(|| Err(timed_out(&name)));
    }
    found
}

/// The message for a name that did not answer in time.
pub fn timed_out(name: &str) -> String {
    format!("host {name:?} did not resolve within {} s", RESOLVE_DEADLINE.as_secs())
}

fn lookup_all(names: &[String]) -> Lookups {
    names.iter().map(|name| (name.clone(), lookup(name))).collect()
}

/// One blocking lookup (`getaddrinfo`): the first IPv4 address, else the first one.
fn lookup(name: &str) -> Result<std::net::IpAddr, String> {
    let found: Vec<_> = match (name, 0).to_socket_addrs() {
        Ok(found) => found.collect(),
        Err(e) => return Err(format!("host {name:?} does not resolve: {e}")),
    };
    let best = found.iter().find(|a| a.is_ipv4()).or_else(|| found.first());
    best.map(|a| a.ip()).ok_or_else(|| format!("host {name:?} resolves to no address"))
}

/// Runs one blocking call on a thread of its own as job `job`: its result
/// waits in the returned receiver, and [`Answer::Done`] wakes the loop for it.
/// A thread per call, so one that never returns holds up only itself.
pub fn run_once<R: Send + 'static>(
    name: &str,
    job: u64,
    outbox: &Outbox,
    work: impl FnOnce() -> R + Send + 'static,
) -> io::Result<Receiver<R>> {
    let (result, received) = mpsc::sync_channel(1);
    let outbox = outbox.clone();
    thread::Builder::new().name(name.into()).spawn(move || {
        crate::runtime::privileges::confine_thread();
        // Sent before the wake-up, so the loop finds it when it looks.
        let _ = result.send(work());
        let _ = outbox.post(Answer::Done { job, result: Ok(()) });
    })?;
    Ok(received)
}

/// Runs blocking jobs (the state file's write, fsync, rename) one at a time,
/// in order, on one long-lived thread.
#[derive(Debug)]
pub struct Worker {
    jobs: Sender<(u64, Work)>,
}

/// One blocking job.
type Work = Box<dyn FnOnce() -> io::Result<()> + Send>;

impl Worker {
    /// Starts the thread; it ends when the `Worker` is dropped and its queue is empty.
    pub fn new(name: &str, outbox: Outbox) -> io::Result<Worker> {
        let (jobs, queue) = mpsc::channel::<(u64, Work)>();
        thread::Builder::new().name(name.into()).spawn(move || {
            crate::runtime::privileges::confine_thread();
            for (job, work) in queue {
                let result = work();
                let _ = outbox.post(Answer::Done { job, result });
            }
        })?;
        Ok(Worker { jobs })
    }

    /// Queues `work` as job `job`; the answer comes as [`Answer::Done`].
    pub fn submit(&self, job: u64, work: impl FnOnce() -> io::Result<()> + Send + 'static) -> io::Result<()> {
        self.jobs.send((job, Box::new(work))).map_err(|_| io::Error::other("the worker thread has stopped"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};

    #[test]
    fn answers_wake_the_loop_and_arrive_in_the_inbox() {
        let mut poll = Poll::new().unwrap();
        let inbox = Inbox::new(poll.registry(), Token(1)).unwrap();
        let worker = Worker::new("test-worker", inbox.outbox()).unwrap();
        worker.submit(7, || Ok(())).unwrap();
        worker.submit(8, || Err(io::Error::other("disk full"))).unwrap();
        let resolver = Resolver::new(inbox.outbox());
        resolver.submit(9, vec!["localhost".into()]).unwrap();
        let mut events = Events::with_capacity(8);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 3 && Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
            while let Some(answer) = inbox.next() {
                got.push(answer);
            }
        }
        assert!(matches!(
            got.iter().find(|a| matches!(a, Answer::Done { job: 7, .. })),
            Some(Answer::Done { result: Ok(()), .. })
        ));
        assert!(matches!(
            got.iter().find(|a| matches!(a, Answer::Done { job: 8, .. })),
            Some(Answer::Done { result: Err(_), .. })
        ));
        let Some(Answer::Resolved { found, .. }) = got.iter().find(|a| matches!(a, Answer::Resolved { job: 9, .. }))
        else {
            panic!("no lookup answer: {got:?}");
        };
        assert!(found["localhost"].as_ref().is_ok_and(|ip| ip.is_loopback()));
    }

    #[test]
    fn resolve_now_names_what_does_not_resolve() {
        let found = resolve_now(vec!["localhost".into(), "nothing.invalid".into()]);
        assert!(found["localhost"].is_ok());
        assert!(found["nothing.invalid"]
            .as_ref()
            .unwrap_err()
            .starts_with("host \"nothing.invalid\" does not resolve"));
    }
}
