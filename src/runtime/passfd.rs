//! Passing open sockets between processes (the binary upgrade, reference
//! §3.7): a `SOCK_SEQPACKET` socketpair whose messages carry descriptors as
//! `SCM_RIGHTS`. A descriptor received this way is the very socket the
//! sender holds, not a copy bound anew: what is queued in its backlog stays
//! there, and whichever process accepts first serves it.
//!
//! Seqpacket keeps message boundaries, so a message is read whole or not at
//! all, and the peer's exit reads as end of file: a new process that dies
//! mid-hand-over is noticed at once, not at a deadline.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// The most descriptors one message carries (the kernel's limit is 253).
pub const MAX_FDS: usize = 64;
/// The longest message: payload bytes, without the descriptors.
pub const MAX_MESSAGE: usize = 32 * 1024;

/// Both ends of a new seqpacket socketpair, close-on-exec.
pub fn pair() -> io::Result<(Socket, Socket)> {
    Socket::pair(Domain::UNIX, Type::SEQPACKET, None)
}

/// Makes `fd` survive `exec`, for the one end a new process inherits. Only
/// the upgrade thread starts processes, and it closes this end as soon as
/// the child has it, so no other child can inherit it meanwhile.
#[allow(unsafe_code)]
pub fn inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and set the flags of a descriptor
    // that stays open while it is borrowed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of descriptor `fd` named on the command line, after
/// checking that it is an open seqpacket socket (so a wrong number fails
/// cleanly instead of closing some other file later).
#[allow(unsafe_code)]
pub fn adopt(fd: RawFd) -> io::Result<Socket> {
    if fd < 3 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "descriptors 0 to 2 are stdio"));
    }
    // SAFETY: F_GETFD reads the flags of a descriptor number; an unused one gives EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and stays open while borrowed here.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if socket2::SockRef::from(&borrowed).r#type().ok() != Some(Type::SEQPACKET) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a seqpacket socket"));
    }
    // SAFETY: nothing else in this process owns the descriptor: it was
    // inherited for this purpose alone.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    // Close-on-exec again: no later child of this process should inherit it.
    // SAFETY: as in `inheritable`.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Gives `socket` a deadline for every send and receive.
pub fn set_deadline(socket: &Socket, each: Duration) -> io::Result<()> {
    socket.set_read_timeout(Some(each))?;
    socket.set_write_timeout(Some(each))
}

/// Sends one message of `bytes` with `fds` attached.
#[allow(unsafe_code)]
pub fn send(socket: &Socket, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS || bytes.len() > MAX_MESSAGE || bytes.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "message too big or empty"));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    let mut control = vec![0u64; control_words()];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: msghdr is plain data; zeroed is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE computes a size from a length; it touches no memory.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
        // SAFETY: the control buffer is 8-byte aligned and at least
        // CMSG_SPACE(payload) bytes long (control_words), so the first header
        // and its data lie inside it; the data gets exactly `payload` bytes.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(header).cast::<RawFd>(), raw.len());
        }
    }
    loop {
        // SAFETY: msg points at the iovec and control buffer above, which
        // outlive the call; sendmsg only reads them.
        let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf`: its length (0 when the peer is gone)
/// and the descriptors it carried, each owned and close-on-exec.
#[allow(unsafe_code)]
pub fn recv(socket: &Socket, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = vec![0u64; control_words()];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; zeroed is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(control.as_slice()) as _;
    let got = loop {
        // SAFETY: msg points at `buf` and the control buffer, which outlive
        // the call and are as long as the lengths it gives.
        let got = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if got >= 0 {
            break got as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros walk only the headers inside it, and each SCM_RIGHTS header's
    // data holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors, now ours.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = ((*header).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a hand-over message was cut short"));
    }
    Ok((got, fds))
}

/// The control buffer's size in 8-byte words: room for `MAX_FDS` descriptors.
#[allow(unsafe_code)]
fn control_words() -> usize {
    // SAFETY: CMSG_SPACE computes a size from a length; it touches no memory.
    let bytes = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_message_carries_its_descriptors_and_end_of_file_reads_as_zero() {
        let (a, b) = pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        send(&a, b"hello", &[listener.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello"[..], 1));
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap().port(), port, "the very same socket");
        drop(a);
        assert_eq!(recv(&b, &mut buf).unwrap().0, 0);
    }

    #[test]
    fn too_many_descriptors_or_an_empty_message_are_refused() {
        let (a, _b) = pair().unwrap();
        let many: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert!(send(&a, b"x", &many).is_err());
        assert!(send(&a, b"", &[]).is_err());
    }

    #[test]
    fn adopt_refuses_stdio_closed_and_other_descriptors() {
        assert!(adopt(0).is_err());
        assert!(adopt(100_000).is_err());
        let file = tempfile::tempfile().unwrap();
        assert!(adopt(file.as_raw_fd()).is_err());
        // Still open: adopt did not take what was not a seqpacket socket.
        assert!(file.metadata().is_ok());
    }
}
