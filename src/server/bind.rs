//! Binding a service's sockets from its settings: what a change stages and
//! start-up binds (an upgrade's new process binds nothing, reference §3.7).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::config::{self, Protocol, ServiceConfig};
use crate::model::endpoint::Endpoint;
use crate::runtime::listen::{Bound, StreamListener};
use crate::runtime::{net, unix};

/// Unix listeners' backlog, as deep as TCP's.
const UNIX_BACKLOG: i32 = 1024;

/// `n` sockets for a service at `addr`, one per worker: `SO_REUSEPORT`
/// groups for TCP and UDP, one unix socket file duplicated for each.
pub(crate) fn bind_any(addr: &Endpoint, n: usize, settings: &ServiceConfig) -> io::Result<Vec<Bound>> {
    let inet = |addr: &Endpoint| -> io::Result<SocketAddr> {
        addr.inet().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "UDP needs an IP address"))
    };
    match (settings.protocol, addr) {
        (Protocol::Udp, _) => Ok(net::bind_udp_group(inet(addr)?, n)?.into_iter().map(Bound::Datagram).collect()),
        (Protocol::Tcp, Endpoint::Inet(a)) => {
            let group = net::bind_group(*a, n)?;
            Ok(group.into_iter().map(|l| Bound::Stream(StreamListener::Tcp(l))).collect())
        }
        (Protocol::Tcp, Endpoint::Unix(path)) => {
            let mode = config::socket_mode_bits(&settings.socket_mode)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let (listener, file) = unix::bind(path.as_path(), mode, UNIX_BACKLOG)?;
            let first = StreamListener::Unix(listener, Arc::new(file));
            let mut group = Vec::with_capacity(n.max(1));
            for _ in 1..n {
                group.push(Bound::Stream(first.duplicate()?));
            }
            group.insert(0, Bound::Stream(first));
            Ok(group)
        }
    }
}
