//! A service's listening socket of either kind, TCP or a unix socket file,
//! and the bound sockets a change stages (those two, or a UDP socket).
//!
//! A unix socket file cannot be shared with `SO_REUSEPORT`: with several
//! workers each gets a duplicate of the one listening socket and registers it
//! with its own poller. A connection wakes every worker; one accept wins and
//! the others see `WouldBlock`, which nonblocking accepts take in stride. The
//! file itself is removed once, when the last duplicate closes or when the
//! listener starts retiring, whichever comes first.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use mio::event::Source;
use mio::net::{TcpListener, UdpSocket, UnixListener};
use mio::{Interest, Registry, Token};

use crate::model::endpoint::{ClientAddr, Endpoint};
use crate::runtime::conn::Conn;
use crate::runtime::net;
use crate::runtime::unix::SocketFile;

/// A listening stream socket.
#[derive(Debug)]
pub enum StreamListener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket file, shared by every worker's duplicate.
    Unix(UnixListener, Arc<SocketFile>),
}

impl StreamListener {
    /// Accepts one client.
    pub fn accept(&self) -> io::Result<(Conn, ClientAddr)> {
        match self {
            StreamListener::Tcp(l) => l.accept().map(|(s, peer)| (Conn::Tcp(s), ClientAddr::Inet(peer))),
            StreamListener::Unix(l, _) => l.accept().map(|(s, _)| (Conn::Unix(s), ClientAddr::Unix)),
        }
    }

    /// Where it listens.
    pub fn local_addr(&self) -> io::Result<Endpoint> {
        match self {
            StreamListener::Tcp(l) => l.local_addr().map(Endpoint::Inet),
            StreamListener::Unix(_, file) => {
                Ok(Endpoint::Unix(crate::model::endpoint::UnixPath::new(&file.path().to_string_lossy())))
            }
        }
    }

    /// Stops new clients coming in while the queued ones are served: a SYN
    /// filter for TCP; for a unix socket, removing its file.
    pub fn refuse_new_connections(&self) -> io::Result<()> {
        match self {
            StreamListener::Tcp(l) => net::refuse_new_connections(l),
            StreamListener::Unix(_, file) => {
                file.remove();
                Ok(())
            }
        }
    }

    /// Another descriptor of the same socket, for the hand-over.
    pub fn fd_copy(&self) -> io::Result<OwnedFd> {
        let socket = match self {
            StreamListener::Tcp(l) => socket2::SockRef::from(l).try_clone()?,
            StreamListener::Unix(l, _) => socket2::SockRef::from(l).try_clone()?,
        };
        Ok(socket.into())
    }

    /// A unix listener's socket file.
    pub fn file(&self) -> Option<&Arc<SocketFile>> {
        match self {
            StreamListener::Unix(_, file) => Some(file),
            StreamListener::Tcp(_) => None,
        }
    }

    /// What it is, as the hand-over names it.
    pub fn kind(&self) -> SocketKind {
        match self {
            StreamListener::Tcp(_) => SocketKind::Tcp,
            StreamListener::Unix(..) => SocketKind::Unix,
        }
    }

    /// Another handle on the same listening socket, for another worker.
    pub fn duplicate(&self) -> io::Result<StreamListener> {
        match self {
            StreamListener::Tcp(l) => {
                let socket = socket2::SockRef::from(l).try_clone()?;
                Ok(StreamListener::Tcp(TcpListener::from_std(socket.into())))
            }
            StreamListener::Unix(l, file) => {
                let socket = socket2::SockRef::from(l).try_clone()?;
                Ok(StreamListener::Unix(UnixListener::from_std(socket.into()), file.clone()))
            }
        }
    }
}

impl Source for StreamListener {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            StreamListener::Tcp(l) => l.register(registry, token, interests),
            StreamListener::Unix(l, _) => l.register(registry, token, interests),
        }
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            StreamListener::Tcp(l) => l.reregister(registry, token, interests),
            StreamListener::Unix(l, _) => l.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            StreamListener::Tcp(l) => l.deregister(registry),
            StreamListener::Unix(l, _) => l.deregister(registry),
        }
    }
}

/// A socket's kind.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SocketKind {
    /// A TCP listener.
    Tcp,
    /// A unix stream listener.
    Unix,
    /// A UDP socket.
    Udp,
}

/// A service's bound socket: a stream listener, or a UDP socket.
#[derive(Debug)]
pub enum Bound {
    /// A listening stream socket.
    Stream(StreamListener),
    /// A UDP socket receiving every client's datagrams.
    Datagram(UdpSocket),
}

impl Bound {
    /// A socket of `kind` handed over by another process, checked to be one (reference §3.7).
    pub fn adopt(kind: SocketKind, fd: OwnedFd, file: Option<Arc<SocketFile>>) -> io::Result<Bound> {
        let socket = socket2::Socket::from(fd);
        let (want_type, inet) = match kind {
            SocketKind::Tcp => (socket2::Type::STREAM, true),
            SocketKind::Unix => (socket2::Type::STREAM, false),
            SocketKind::Udp => (socket2::Type::DGRAM, true),
        };
        let domain = socket.domain()?;
        let is_inet = domain == socket2::Domain::IPV4 || domain == socket2::Domain::IPV6;
        let listening = kind == SocketKind::Udp || socket.is_listener()?;
        if socket.r#type()? != want_type || is_inet != inet || (!inet && domain != socket2::Domain::UNIX) || !listening
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a handed-over socket is not a {kind:?} one"),
            ));
        }
        socket.set_nonblocking(true)?;
        let fd = OwnedFd::from(socket);
        Ok(match (kind, file) {
            (SocketKind::Tcp, _) => Bound::Stream(StreamListener::Tcp(TcpListener::from_std(fd.into()))),
            (SocketKind::Unix, Some(file)) => {
                Bound::Stream(StreamListener::Unix(UnixListener::from_std(fd.into()), file))
            }
            (SocketKind::Unix, None) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "a handed-over unix socket without its file"))
            }
            (SocketKind::Udp, _) => Bound::Datagram(UdpSocket::from_std(fd.into())),
        })
    }

    /// Another descriptor of the same socket, for the hand-over.
    pub fn dup(&self) -> io::Result<OwnedFd> {
        match self {
            Bound::Stream(s) => s.fd_copy(),
            Bound::Datagram(s) => Ok(socket2::SockRef::from(s).try_clone()?.into()),
        }
    }

    /// What it is, as the hand-over names it.
    pub fn kind(&self) -> SocketKind {
        match self {
            Bound::Stream(s) => s.kind(),
            Bound::Datagram(_) => SocketKind::Udp,
        }
    }

    /// A unix listener's socket file.
    pub fn file(&self) -> Option<&Arc<SocketFile>> {
        match self {
            Bound::Stream(s) => s.file(),
            Bound::Datagram(_) => None,
        }
    }

    /// Where it is bound.
    pub fn local_addr(&self) -> io::Result<Endpoint> {
        match self {
            Bound::Stream(s) => s.local_addr(),
            Bound::Datagram(s) => s.local_addr().map(Endpoint::Inet),
        }
    }
}
