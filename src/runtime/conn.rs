//! A connected byte stream of either kind: TCP, or a unix socket. Pairs,
//! greetings, queued clients and probes hold a `Conn`, so a pair relays
//! TCP↔TCP, TCP↔unix, unix↔TCP and unix↔unix with the same state machine.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use crate::model::endpoint::Endpoint;

/// A connected (or connecting) stream socket.
#[derive(Debug)]
pub enum Conn {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix stream socket connection.
    Unix(UnixStream),
}

impl Conn {
    /// Connects nonblockingly to `endpoint`; an error here is a synchronous failure.
    pub fn connect(endpoint: &Endpoint) -> io::Result<Conn> {
        match endpoint {
            Endpoint::Inet(addr) => {
                let stream = TcpStream::connect(*addr)?;
                // A relay must not add Nagle delay on top of the endpoints' own.
                stream.set_nodelay(true)?;
                Ok(Conn::Tcp(stream))
            }
            Endpoint::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path.as_path())?)),
        }
    }

    /// Shuts one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        }
    }

    /// The socket's pending error (`SO_ERROR`), which reading clears.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Conn::Tcp(s) => s.take_error(),
            Conn::Unix(s) => s.take_error(),
        }
    }

    /// The local IP address and port; `None` for a unix socket.
    pub fn local_inet(&self) -> Option<SocketAddr> {
        match self {
            Conn::Tcp(s) => s.local_addr().ok(),
            Conn::Unix(_) => None,
        }
    }

    /// The peer's IP address and port; `None` for a unix socket.
    pub fn peer_inet(&self) -> Option<SocketAddr> {
        match self {
            Conn::Tcp(s) => s.peer_addr().ok(),
            Conn::Unix(_) => None,
        }
    }

    /// Reads without consuming (`MSG_PEEK`), as the PROXY header parser needs.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.peek(buf),
            Conn::Unix(s) => peek(std::os::fd::AsRawFd::as_raw_fd(s), buf),
        }
    }
}

/// `recv(MSG_PEEK)` on a socket: std's `UnixStream::peek` is not stable yet.
#[allow(unsafe_code)]
fn peek(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the
    // whole call, and `fd` is an open socket the caller owns.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Conn {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.register(registry, token, interests),
            Conn::Unix(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.reregister(registry, token, interests),
            Conn::Unix(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.deregister(registry),
            Conn::Unix(s) => s.deregister(registry),
        }
    }
}

impl std::os::fd::AsRawFd for Conn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        }
    }
}
