//! The access log's writer: each loop formats its finished connections into
//! a batch of its own, and hands whole batches to one writer thread through a
//! bounded queue. The loop never waits on the sink: when the queue is full (a
//! slow disk, a FIFO nobody reads), the batch is dropped and its lines are
//! counted, for the metrics. Emptied batches go back to a free list, so a
//! busy log allocates nothing once warm.
//!
//! SIGUSR1 reopens the file (for logrotate): the control loop raises a flag
//! that the writer checks before each batch, and wakes it with an empty one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use log::warn;

use crate::data::finished::{Finished, Format};

/// Batches queued at most; with `BATCH_BYTES`, the memory the log may hold.
const QUEUE: usize = 64;
/// A batch is handed over once it holds this much, or at the end of the loop's turn.
const BATCH_BYTES: usize = 32 * 1024;
/// Free batches kept for reuse.
const FREE: usize = QUEUE + 8;
/// How long the exit waits for the writer to write what was queued.
const EXIT_WAIT: Duration = Duration::from_secs(1);
/// Permissions of a log file shuttle creates.
const MODE: u32 = 0o640;

/// Where `-access-log` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `-`: standard output.
    Stdout,
    /// A file, appended to (or a FIFO).
    File(PathBuf),
}

impl Target {
    /// The `-access-log` value: `-` or a path.
    pub fn parse(value: &str) -> Target {
        if value == "-" {
            Target::Stdout
        } else {
            Target::File(value.into())
        }
    }
}

enum Message {
    Batch { bytes: Vec<u8>, lines: u64 },
    Flush(mpsc::Sender<()>),
}

/// What the loops and the writer share.
#[derive(Debug, Default)]
struct Shared {
    written: AtomicU64,
    dropped: AtomicU64,
    reopen: AtomicBool,
    free: Mutex<Vec<Vec<u8>>>,
}

/// One loop's end of the access log; off unless `-access-log` was given.
#[derive(Debug, Default)]
pub struct AccessLog {
    on: Option<Handle>,
}

#[derive(Debug)]
struct Handle {
    queue: SyncSender<Message>,
    shared: Arc<Shared>,
    format: Format,
    batch: Vec<u8>,
    lines: u64,
}

impl AccessLog {
    /// Opens the sink and starts its writer thread. A FIFO is opened by the
    /// writer, since opening one waits for a reader; anything else is opened
    /// here, so a bad path fails start-up with the OS's reason.
    pub fn start(target: Target, format: Format) -> io::Result<AccessLog> {
        let sink = match &target {
            Target::Stdout => Some(Sink::Stdout(io::stdout())),
            Target::File(path) if is_fifo(path) => None,
            Target::File(path) => Some(Sink::File(open(path)?)),
        };
        let (queue, batches) = mpsc::sync_channel(QUEUE);
        let shared = Arc::new(Shared::default());
        let writer = Writer { target, sink, shared: shared.clone(), failing: false };
        thread::Builder::new().name("shuttle-access".into()).spawn(move || {
            crate::runtime::privileges::confine_thread();
            writer.run(batches)
        })?;
        Ok(AccessLog { on: Some(Handle { queue, shared, format, batch: Vec::new(), lines: 0 }) })
    }

    /// Another loop's end of the same log.
    pub fn for_loop(&self) -> AccessLog {
        let on = self.on.as_ref().map(|h| Handle {
            queue: h.queue.clone(),
            shared: h.shared.clone(),
            format: h.format,
            batch: Vec::new(),
            lines: 0,
        });
        AccessLog { on }
    }

    /// Whether lines are written at all (callers skip building a record when not).
    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// Adds one finished connection's line to this loop's batch.
    pub fn record(&mut self, finished: &Finished<'_>) {
        let Some(h) = self.on.as_mut() else { return };
        if h.batch.capacity() == 0 {
            h.batch = h.shared.take_free();
        }
        let before = h.batch.len();
        if finished.write(h.format, &mut h.batch).is_err() {
            h.batch.truncate(before);
            return;
        }
        h.lines += 1;
        if h.batch.len() >= BATCH_BYTES {
            self.flush();
        }
    }

    /// Hands the batch to the writer; called at the end of every loop turn.
    pub fn flush(&mut self) {
        let Some(h) = self.on.as_mut() else { return };
        if h.lines == 0 {
            return;
        }
        let bytes = std::mem::take(&mut h.batch);
        let lines = std::mem::take(&mut h.lines);
        match h.queue.try_send(Message::Batch { bytes, lines }) {
            Ok(()) => {}
            Err(TrySendError::Full(Message::Batch { mut bytes, lines }))
            | Err(TrySendError::Disconnected(Message::Batch { mut bytes, lines })) => {
                h.shared.dropped.fetch_add(lines, Ordering::Relaxed);
                bytes.clear();
                h.batch = bytes;
            }
            Err(_) => {}
        }
    }

    /// SIGUSR1: the writer reopens the file before its next batch.
    pub fn reopen(&self) {
        let Some(h) = self.on.as_ref() else { return };
        h.shared.reopen.store(true, Ordering::Relaxed);
        // Wakes a writer waiting for work; a full queue means it is awake already.
        let _ = h.queue.try_send(Message::Batch { bytes: Vec::new(), lines: 0 });
    }

    /// Lines written and dropped so far, over every loop; `None` when off.
    pub fn counts(&self) -> Option<(u64, u64)> {
        let h = self.on.as_ref()?;
        Some((h.shared.written.load(Ordering::Relaxed), h.shared.dropped.load(Ordering::Relaxed)))
    }

    /// Flushes, then waits briefly for the writer to write everything queued
    /// (a sink that is stuck loses what it holds: the exit does not wait on it).
    pub fn finish(&mut self) {
        self.flush();
        let Some(h) = self.on.as_ref() else { return };
        let (done, wait) = mpsc::channel();
        if h.queue.try_send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(EXIT_WAIT);
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Shared {
    fn take_free(&self) -> Vec<u8> {
        // try_lock: the writer holds the list only to push one buffer; if it is
        // at it right now, a fresh buffer is cheaper than waiting.
        let reused = self.free.try_lock().ok().and_then(|mut free| free.pop());
        reused.unwrap_or_else(|| Vec::with_capacity(BATCH_BYTES + 1024))
    }

    fn give_back(&self, mut bytes: Vec<u8>) {
        bytes.clear();
        if let Ok(mut free) = self.free.lock() {
            if free.len() < FREE {
                free.push(bytes);
            }
        }
    }
}

enum Sink {
    Stdout(io::Stdout),
    File(File),
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout(out) => out.lock().write_all(bytes).and_then(|()| out.lock().flush()),
            Sink::File(file) => file.write_all(bytes),
        }
    }
}

/// The writer thread's state: it alone touches the sink.
struct Writer {
    target: Target,
    /// `None` until a FIFO is opened, or after a reopen failed with nothing to keep.
    sink: Option<Sink>,
    shared: Arc<Shared>,
    /// Set from a failed write until one succeeds (warns once per episode).
    failing: bool,
}

impl Writer {
    fn run(mut self, batches: Receiver<Message>) {
        for message in batches {
            match message {
                Message::Batch { bytes, lines } => {
                    self.write(&bytes, lines);
                    if bytes.capacity() > 0 {
                        self.shared.give_back(bytes);
                    }
                }
                Message::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    fn write(&mut self, bytes: &[u8], lines: u64) {
        if self.shared.reopen.swap(false, Ordering::Relaxed) {
            self.reopen();
        }
        if lines == 0 {
            return;
        }
        if self.sink.is_none() {
            if let Target::File(path) = &self.target {
                // Blocks until a FIFO has a reader: only this thread waits.
                match open(path) {
                    Ok(file) => self.sink = Some(Sink::File(file)),
                    Err(e) => return self.failed(lines, &e),
                }
            }
        }
        let Some(sink) = self.sink.as_mut() else { return };
        match sink.write_all(bytes) {
            Ok(()) => {
                self.shared.written.fetch_add(lines, Ordering::Relaxed);
                self.failing = false;
            }
            Err(e) => self.failed(lines, &e),
        }
    }

    fn failed(&mut self, lines: u64, e: &io::Error) {
        self.shared.dropped.fetch_add(lines, Ordering::Relaxed);
        if !std::mem::replace(&mut self.failing, true) {
            warn!("access log: cannot write to {}: {e}; lines are dropped until a write succeeds", self.shown());
        }
    }

    fn reopen(&mut self) {
        let Target::File(path) = &self.target else { return };
        // A FIFO is reopened lazily, by the next write, never waited for here.
        if is_fifo(path) {
            self.sink = None;
            return;
        }
        match open(path) {
            Ok(file) => {
                self.sink = Some(Sink::File(file));
                log::info!("access log: reopened {}", path.display());
            }
            Err(e) => warn!("access log: cannot reopen {}: {e}; still writing to the file open before", path.display()),
        }
    }

    fn shown(&self) -> String {
        match &self.target {
            Target::Stdout => "standard output".into(),
            Target::File(path) => path.display().to_string(),
        }
    }
}

fn is_fifo(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).create(true).mode(MODE).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::finished::End;
    use std::time::{Instant, SystemTime};

    fn finished() -> Finished<'static> {
        Finished {
            at: SystemTime::now(),
            service: "web",
            client: crate::model::endpoint::ClientAddr::Inet("127.0.0.1:1".parse().unwrap()),
            backend: None,
            connect: None,
            queued: Duration::ZERO,
            duration: Duration::ZERO,
            sent: 0,
            received: 0,
            failed_connects: 0,
            end: End::NoBackend,
        }
    }

    fn wait_for(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_from_two_loops_reach_the_file_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut one = AccessLog::start(Target::File(path.clone()), Format::Text).unwrap();
        let mut two = one.for_loop();
        one.record(&finished());
        two.record(&finished());
        two.record(&finished());
        one.flush();
        two.flush();
        one.finish();
        wait_for(|| one.counts() == Some((3, 0)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn a_sink_that_never_drains_drops_lines_and_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&path).status().unwrap().success());
        // Nobody ever opens it for reading: the writer waits in open forever.
        let mut log = AccessLog::start(Target::File(path), Format::Json).unwrap();
        let started = Instant::now();
        for _ in 0..20_000 {
            log.record(&finished());
        }
        log.flush();
        assert!(started.elapsed() < Duration::from_secs(5), "recording waited on the sink");
        let (written, dropped) = log.counts().unwrap();
        assert_eq!(written, 0);
        assert!(dropped > 0, "a full queue drops and counts");
    }

    #[test]
    fn reopen_follows_a_renamed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut log = AccessLog::start(Target::File(path.clone()), Format::Text).unwrap();
        log.record(&finished());
        log.finish();
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        log.reopen();
        log.record(&finished());
        log.finish();
        wait_for(|| path.exists());
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(std::fs::read_to_string(dir.path().join("access.log.1")).unwrap().lines().count(), 1);
    }

    #[test]
    fn off_records_nothing() {
        let mut log = AccessLog::default();
        log.record(&finished());
        log.flush();
        assert!(!log.is_on());
        assert_eq!(log.counts(), None);
    }
}
