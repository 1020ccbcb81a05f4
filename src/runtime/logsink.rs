//! The log sink: env_logger formats each record on the thread that logs it,
//! and hands the line to a bounded queue that a helper thread writes to
//! stderr. A stderr that blocks (a full pipe nobody reads, a stalled
//! journald) then stalls only that thread: when the queue is full, lines are
//! dropped and counted, and the loop never waits (pitfall 16).

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Lines queued at most before new ones are dropped.
const QUEUE: usize = 4096;
/// How long the exit waits for queued lines to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

enum Message {
    Line(Vec<u8>),
    Flush(mpsc::Sender<()>),
}

/// The logger's end of the queue.
struct Sink {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // env_logger writes each record whole, in one call.
        match self.queue.try_send(Message::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

static FLUSHER: OnceLock<SyncSender<Message>> = OnceLock::new();

/// Installs the logger: `RUST_LOG` rules (default `info`), or debug with `-debug`.
pub fn init(debug: bool) {
    let (queue, lines) = mpsc::sync_channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let writer_dropped = dropped.clone();
    let spawned = thread::Builder::new().name("shuttle-log".into()).spawn(move || {
        crate::runtime::privileges::confine_thread();
        write_lines(lines, &writer_dropped)
    });
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if debug {
        builder.filter_level(log::LevelFilter::Debug);
    }
    if std::env::var_os("RUST_LOG_STYLE").is_none() {
        let style =
            if io::stderr().is_terminal() { env_logger::WriteStyle::Always } else { env_logger::WriteStyle::Never };
        builder.write_style(style);
    }
    if spawned.is_ok() {
        let _ = FLUSHER.set(queue.clone());
        builder.target(env_logger::Target::Pipe(Box::new(Sink { queue, dropped })));
    }
    // Without a writer thread, log straight to stderr rather than not at all.
    builder.init();
}

fn write_lines(lines: Receiver<Message>, dropped: &AtomicU64) {
    let mut stderr = io::stderr();
    for message in lines {
        match message {
            Message::Line(line) => {
                let _ = stderr.write_all(&line);
            }
            Message::Flush(done) => {
                let _ = done.send(());
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(stderr, "shuttle: {lost} log lines were dropped: stderr did not keep up");
        }
    }
}

/// Waits (briefly) until every line logged so far is written: called before exit.
pub fn flush() {
    let Some(queue) = FLUSHER.get() else { return };
    let (done, wait) = mpsc::channel();
    let deadline = Instant::now() + FLUSH_WAIT;
    let mut message = Message::Flush(done);
    loop {
        match queue.try_send(message) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                message = back;
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}
