//! The backends every target proxies to, served by one mio loop in a child
//! process (the bench executable run with `--serve-backends`), so that their
//! sockets do not count against the bench's own fd limit. It inherits the
//! load generator's CPU.
//!
//! - `source`: writes an endless stream of bytes to every connection and
//!   discards what it reads (bulk throughput);
//! - `echo`: writes back every byte it reads (request/response, new
//!   connections, idle connections).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

const SOURCE: Token = Token(0);
const ECHO: Token = Token(1);
const FIRST_CONN: usize = 2;
/// What `source` writes per call.
const CHUNK: usize = 256 * 1024;
/// What `echo` reads per call; requests are much smaller.
const ECHO_BUF: usize = 16 * 1024;

/// The running backends' addresses and process.
#[derive(Clone, Copy, Debug)]
pub struct Backends {
    pub source: SocketAddr,
    pub echo: SocketAddr,
    pub pid: u32,
}

/// The backend process; killed and reaped on drop (and by the kernel if the bench dies).
#[derive(Debug)]
pub struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A nonblocking listener on an ephemeral loopback port with a deep backlog.
pub fn listen() -> io::Result<TcpListener> {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Starts the backend process and reads the two addresses it prints.
pub fn spawn() -> io::Result<(Backends, Process)> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["--bench", "--serve-backends"]).stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: only prctl, which is async-signal-safe, runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let process = Process { child };
    let mut lines = BufReader::new(stdout).lines();
    let mut next_addr = |name: &str| -> io::Result<SocketAddr> {
        let line = lines.next().ok_or_else(|| io::Error::other("the backend process exited"))??;
        line.strip_prefix(name)
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("backend process: unexpected line {line:?}")))
    };
    let source = next_addr("source ")?;
    let echo = next_addr("echo ")?;
    Ok((Backends { source, echo, pid }, process))
}

/// The backend process's main: binds both listeners, prints their addresses, serves forever.
pub fn serve_forever() -> io::Result<()> {
    let mut source = listen()?;
    let mut echo = listen()?;
    let poll = Poll::new()?;
    poll.registry().register(&mut source, SOURCE, Interest::READABLE)?;
    poll.registry().register(&mut echo, ECHO, Interest::READABLE)?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "source {}\necho {}", source.local_addr()?, echo.local_addr()?)?;
    stdout.flush()?;
    serve(poll, source, echo);
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Source,
    Echo,
}

struct Conn {
    stream: TcpStream,
    kind: Kind,
    /// Echo only: bytes read and not yet written back.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

fn serve(mut poll: Poll, source: TcpListener, echo: TcpListener) {
    let chunk = vec![0x5a_u8; CHUNK];
    let mut conns: Slab<Conn> = Slab::with_capacity(16 * 1024);
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            panic!("backend poll failed: {e}");
        }
        for event in events.iter() {
            match event.token() {
                SOURCE => accept(&poll, &source, Kind::Source, &mut conns),
                ECHO => accept(&poll, &echo, Kind::Echo, &mut conns),
                Token(t) => {
                    let index = t - FIRST_CONN;
                    let Some(conn) = conns.get_mut(index) else { continue };
                    let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                    let open = match conn.kind {
                        Kind::Source => pump_source(conn, &chunk, readable),
                        Kind::Echo => pump_echo(conn),
                    };
                    if !open {
                        let mut conn = conns.remove(index);
                        let _ = poll.registry().deregister(&mut conn.stream);
                    }
                }
            }
        }
    }
}

fn accept(poll: &Poll, listener: &TcpListener, kind: Kind, conns: &mut Slab<Conn>) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nodelay(true);
                let entry = conns.vacant_entry();
                let token = Token(entry.key() + FIRST_CONN);
                if poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_err() {
                    continue;
                }
                let buf = match kind {
                    Kind::Source => Box::default(),
                    Kind::Echo => vec![0; ECHO_BUF].into_boxed_slice(),
                };
                let conn = entry.insert(Conn { stream, kind, buf, start: 0, end: 0 });
                // Edge-triggered: a request may already be waiting.
                let open = match kind {
                    Kind::Source => true,
                    Kind::Echo => pump_echo(conn),
                };
                if !open {
                    let key = token.0 - FIRST_CONN;
                    let mut conn = conns.remove(key);
                    let _ = poll.registry().deregister(&mut conn.stream);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Out of fds or a connection gone before accept: try again on the next event.
            Err(_) => return,
        }
    }
}

/// Drains what the client sent (if `readable`) and writes until the socket is full; false once it is closed.
fn pump_source(conn: &mut Conn, chunk: &[u8], readable: bool) -> bool {
    let mut sink = [0u8; 4096];
    if readable {
        loop {
            match conn.stream.read(&mut sink) {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }
    loop {
        match conn.stream.write(chunk) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// Echoes until reading or writing would block; false once it is closed.
///
/// A read that does not fill the buffer took everything there was: edge-triggered
/// epoll reports the next arrival anew, so the extra read that would say
/// `WouldBlock` is skipped (it would be a third of the echo's syscalls).
fn pump_echo(conn: &mut Conn) -> bool {
    let mut drained = false;
    loop {
        if conn.start < conn.end {
            match conn.stream.write(&conn.buf[conn.start..conn.end]) {
                Ok(n) => {
                    conn.start += n;
                    if conn.start == conn.end {
                        conn.start = 0;
                        conn.end = 0;
                        if drained {
                            return true;
                        }
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        match conn.stream.read(&mut conn.buf) {
            Ok(0) => return false,
            Ok(n) => {
                conn.end = n;
                drained = n < conn.buf.len();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}
