//! A server on a port of its own that stops and comes back on the same port,
//! like a backend process that dies and is restarted. While it is stopped the
//! port is held by a bound socket that does not listen: connects are refused,
//! and no other socket can be given the port meanwhile.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// What the server does with each connection it accepts; the flag turns true when it stops.
pub type Serve = Arc<dyn Fn(TcpStream, Arc<AtomicBool>) + Send + Sync>;

/// See the module doc.
pub struct Restartable {
    addr: SocketAddr,
    _reserved: Socket,
    serve: Serve,
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// A loopback TCP socket that may share its port with the reserving one.
pub fn reuse_socket() -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("create a socket");
    socket.set_reuse_address(true).expect("set SO_REUSEADDR");
    socket
}

impl Restartable {
    /// A running server on a fresh port; `serve` runs on the accepting thread
    /// (spawn from it to serve connections side by side).
    pub fn start(serve: impl Fn(TcpStream, Arc<AtomicBool>) + Send + Sync + 'static) -> Restartable {
        let reserved = reuse_socket();
        reserved.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).expect("reserve a port");
        let addr = reserved.local_addr().expect("reserved address").as_socket().expect("an inet address");
        let mut server = Restartable { addr, _reserved: reserved, serve: Arc::new(serve), running: None };
        server.restart();
        server
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Listens on the same port again.
    pub fn restart(&mut self) {
        assert!(self.running.is_none(), "restarting a server that runs");
        let socket = reuse_socket();
        socket.bind(&self.addr.into()).unwrap_or_else(|e| panic!("bind {} again: {e}", self.addr));
        socket.listen(128).expect("listen");
        socket.set_nonblocking(true).expect("nonblocking listener");
        let listener: TcpListener = socket.into();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, serve) = (stop.clone(), self.serve.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => serve(stream, stop.clone()),
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
                // The listener closes here; queued connections are reset.
            })
        };
        self.running = Some((stop, thread));
    }

    /// Stops listening: connects are refused from now on, and connections
    /// served see the flag and end.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, Ordering::SeqCst);
            thread.join().expect("the accept thread ends");
        }
    }

    /// Whether it listens now.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.stop();
    }
}
