//! Socket plumbing: binding listeners with an explicit backlog, nonblocking
//! connects and their outcome, accept-error classes, and the fd limit.
//!
//! Its `unsafe` is confined to two syscall wrappers: `getrlimit`/`setrlimit`
//! and `getsockopt(SO_PEERCRED)`.

use std::io::{self, Read};
use std::net::SocketAddr;

use mio::net::{TcpListener, UdpSocket};

use crate::runtime::conn::Conn;
use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog; mio ≥ 1.2 would use std's 128, which drops SYNs under bursts (pitfall 14).
const BACKLOG: i32 = 1024;

/// A nonblocking listener on `addr` with `SO_REUSEADDR`, a deep backlog, and `TCP_NODELAY` for what it accepts.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_one(addr, false)
}

/// `n` listeners on one address, one per worker, among which the kernel
/// spreads new connections (`SO_REUSEPORT`). For port 0 the first picks the
/// port and the others join it. With `n == 1` this is [`bind`].
///
/// `SO_REUSEPORT` would also let these sockets join another process's
/// listeners on the address (any process of the same user that set the
/// option) and silently share its traffic. So the address is first bound
/// once without the option: if anyone listens there, that fails as a plain
/// [`bind`] would, with "address in use".
pub fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpListener>> {
    if n <= 1 {
        return Ok(vec![bind(addr)?]);
    }
    reuse_port_group(addr, n, Type::STREAM, |at| bind_one(at, true), TcpListener::local_addr)
}

/// `n` sockets on `addr` bound with `SO_REUSEPORT` by `bind`, after the guard
/// [`bind_group`] describes: one plain bind of the address first, which
/// fails with "address in use" if anyone else holds it.
fn reuse_port_group<T>(
    addr: SocketAddr,
    n: usize,
    kind: Type,
    bind: impl Fn(SocketAddr) -> io::Result<T>,
    local_addr: impl Fn(&T) -> io::Result<SocketAddr>,
) -> io::Result<Vec<T>> {
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), kind, None)?;
        // As the listeners themselves do: a TCP port in TIME_WAIT is free to take.
        probe.set_reuse_address(kind == Type::STREAM)?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        probe.bind(&addr.into())?;
    }
    let first = bind(addr)?;
    let at = local_addr(&first)?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(bind(at)?);
    }
    Ok(group)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: one
    // setsockopt here instead of one per client.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Socket buffers asked for a UDP service's socket: bursts of datagrams wait
/// there while the loop is busy, and what does not fit is dropped by the kernel.
const UDP_BUFFER: usize = 4 << 20;

/// `n` nonblocking UDP sockets on one address, one per worker, among which
/// the kernel spreads flows by their 4-tuple (`SO_REUSEPORT`), so a flow's
/// datagrams all reach one worker. Guarded like [`bind_group`]: an address
/// another socket holds is "in use", never shared.
pub fn bind_udp_group(addr: SocketAddr, n: usize) -> io::Result<Vec<UdpSocket>> {
    if n <= 1 {
        return Ok(vec![bind_udp_one(addr, false)?]);
    }
    reuse_port_group(addr, n, Type::DGRAM, |at| bind_udp_one(at, true), UdpSocket::local_addr)
}

fn bind_udp_one(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(UdpSocket::from_std(socket.into()))
}

/// A flow's nonblocking socket towards `backend`: bound to an ephemeral port
/// and connected, so the kernel filters what it receives to that backend's
/// replies and reports its ICMP errors (`ECONNREFUSED`).
pub fn udp_flow(backend: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(backend), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    let any: SocketAddr = if backend.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&any.into())?;
    socket.connect(&backend.into())?;
    Ok(UdpSocket::from_std(socket.into()))
}

/// The uid and pid of a unix socket's peer (`SO_PEERCRED`), as the kernel
/// recorded them at connect.
#[allow(unsafe_code)]
pub fn peer_cred(stream: &impl std::os::fd::AsRawFd) -> Option<(u32, i32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which lives
    // across the call; the fd is open for as long as `stream` is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((cred.uid, cred.pid))
}

/// Makes a listener drop new connection attempts (SYNs) while it still
/// completes the handshakes already under way and keeps its accept queue:
/// what is queued can then be accepted before the socket closes, instead of
/// being reset by the close. A client whose SYN is dropped retries it about
/// a second later, and by then meets whatever listens at the address.
///
/// A classic BPF socket filter sees the TCP header first: byte 13 holds the
/// flags, and 0x02 is SYN. Accepted sockets inherit the filter, which is
/// harmless: an established connection never receives a SYN.
pub fn refuse_new_connections(listener: &TcpListener) -> io::Result<()> {
    const TCP_FLAGS: u32 = 13;
    const SYN: u32 = 0x02;
    let program = [
        bpf(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, TCP_FLAGS),
        bpf(libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K, 0, 1, SYN),
        bpf(libc::BPF_RET | libc::BPF_K, 0, 0, 0),        // SYN: drop
        bpf(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX), // anything else: keep
    ];
    socket2::SockRef::from(listener).attach_filter(&program)
}

fn bpf(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    // The opcode constants are small; they fit the field.
    libc::sock_filter { code: code as u16, jt, jf, k }
}

/// Where a nonblocking connect stands after a readiness event.
#[derive(Debug)]
pub enum ConnectOutcome {
    /// The connection is established.
    Connected,
    /// Not yet: the event was spurious.
    Pending,
    /// The connect failed.
    Failed(io::Error),
}

/// Checks a connect in flight after a readiness event. On Linux a connecting
/// socket turns writable exactly when the handshake ends (`tcp_poll` reports
/// no `EPOLLOUT` in `SYN_SENT`), and a failed one also reports `EPOLLERR`:
/// so without writability nothing is asked, writability with no error or
/// hang-up hint is success, and only with a hint is `SO_ERROR` read to learn
/// how it ended. epoll reports each fd at most once per wait, and a
/// failover's new socket is made while its predecessor's one event is being
/// handled, so a stale event can't pass for the new socket's.
pub fn connect_outcome(stream: &Conn, writable: bool, hint: bool) -> ConnectOutcome {
    if !writable {
        return ConnectOutcome::Pending;
    }
    if !hint {
        return ConnectOutcome::Connected;
    }
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => ConnectOutcome::Failed(e),
        Ok(None) => ConnectOutcome::Connected,
    }
}

/// Ends a client we have nothing for with a FIN (reference §3): closing a socket
/// with unread input makes Linux send RST, so what already arrived is read
/// and dropped first (a bounded amount, never waiting), then our side is shut.
/// The caller drops the stream afterwards.
pub fn close_gently(stream: &Conn) {
    let mut sink = [0u8; 4096];
    let mut reader = stream;
    for _ in 0..16 {
        match reader.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Whether an error is this host running short (fds, memory, ports), not the peer's fault (pitfall 15).
pub fn is_local_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) | Some(libc::EADDRNOTAVAIL)
    )
}

/// What the accept loop does after `accept` failed.
#[derive(Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// The queue is empty: wait for the next event.
    Drained,
    /// One connection failed or the call was interrupted: accept the next one.
    Skip,
    /// Out of fds or memory: pause this listener briefly, or it would spin or stall.
    Exhausted,
}

/// Classifies an accept error (pitfall 5).
pub fn classify_accept(e: &io::Error) -> AcceptError {
    match e.kind() {
        io::ErrorKind::WouldBlock => AcceptError::Drained,
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset => {
            AcceptError::Skip
        }
        _ if is_local_shortage(e) => AcceptError::Exhausted,
        // EPROTO, ENETDOWN and friends concern one queued connection.
        _ => AcceptError::Skip,
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit if it can, and returns the soft limit in force.
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the rlimit struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the rlimit struct we pass by pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_classified() {
        assert_eq!(classify_accept(&io::ErrorKind::WouldBlock.into()), AcceptError::Drained);
        assert_eq!(classify_accept(&io::ErrorKind::ConnectionAborted.into()), AcceptError::Skip);
        assert_eq!(classify_accept(&io::Error::from_raw_os_error(libc::EMFILE)), AcceptError::Exhausted);
        assert_eq!(classify_accept(&io::Error::from_raw_os_error(libc::ENFILE)), AcceptError::Exhausted);
    }

    #[test]
    fn a_refusing_listener_keeps_its_queue_and_drops_new_syns() {
        use std::time::{Duration, Instant};
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        refuse_new_connections(&listener).unwrap();
        let started = Instant::now();
        let late = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(late.is_err_and(|e| e.kind() == io::ErrorKind::TimedOut), "a new SYN is dropped, not answered");
        assert!(started.elapsed() >= Duration::from_millis(250));
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut accepted, _) = loop {
            match listener.accept() {
                Ok(pair) => break pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        // The queued connection works both ways after the filter went on.
        use std::io::Write;
        (&queued).write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match accepted.read(&mut got) {
                Ok(4) => break,
                Ok(n) => panic!("short read {n}"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(&got, b"ping");
        accepted.write_all(b"pong").unwrap();
        let mut back = [0u8; 4];
        queued.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&queued).read_exact(&mut back).unwrap();
        assert_eq!(&back, b"pong");
    }

    #[test]
    fn bind_gives_a_listener_on_an_ephemeral_port() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(listener.local_addr().unwrap().port(), 0);
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let accepted = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
    }
}
