//! Hands a draining worker's kept-alive connections to a worker that goes on
//! serving, so that a reload or a recycled worker closes none of them.
//!
//! A front end reuses a kept connection whenever it likes: closing one is a
//! race with the request it may be sending on it at that moment, which it
//! then sees fail (nginx answers 502 to a POST it cannot retry). HTTP can
//! warn the client with `Connection: close` on a last response; FastCGI's
//! FCGI_KEEP_CONN has no such word, and an idle connection has no response
//! to carry one. So between two requests a draining worker passes the
//! descriptor itself (SCM_RIGHTS) to a sibling whose scoreboard state is
//! Ready, which takes it into its epoll set as if it had accepted it: the
//! front end's connection never closes, and its next request reaches new code.
//!
//! Each worker receives on a unix datagram socket of its own in the abstract
//! namespace, named after the master's pid and its own. Only processes of the
//! same user are believed (SO_PASSCRED), and only a descriptor that is a
//! stream socket is taken.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::scoreboard::{Scoreboard, WorkerState};

/// First byte of every message: a version, so a worker of another build
/// (during a re-exec) drops what it cannot read instead of misreading it.
const MAGIC: u8 = 0xC1;

/// What comes with a descriptor: the index of the listener it was accepted
/// on (same in every worker of one master) and that listener's protocol, as
/// a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Note {
    pub listener: u16,
    pub protocol: u8,
}

impl Note {
    fn encode(self) -> [u8; 4] {
        let [a, b] = self.listener.to_le_bytes();
        [MAGIC, a, b, self.protocol]
    }

    fn decode(buf: &[u8]) -> Option<Note> {
        match buf {
            [MAGIC, a, b, p] => Some(Note { listener: u16::from_le_bytes([*a, *b]), protocol: *p }),
            _ => None,
        }
    }
}

fn address(master: libc::pid_t, worker: libc::pid_t) -> (libc::sockaddr_un, libc::socklen_t) {
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = format!("corral-handover-{master}-{worker}");
    // Abstract namespace: a leading NUL, no file, gone with the socket.
    for (i, b) in name.bytes().enumerate() {
        addr.sun_path[i + 1] = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    (addr, len as libc::socklen_t)
}

/// This worker's inbox: where siblings send it connections.
pub(crate) fn bind_inbox(master: libc::pid_t) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let (addr, len) = address(master, std::process::id() as libc::pid_t);
    unsafe {
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) < 0
            || libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// A worker of this pool other than `me` that serves and takes new work, if
/// any; successive calls go round the pool.
pub(crate) fn target(board: &Scoreboard, me: usize) -> Option<libc::pid_t> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let slots = board.slots();
    let start = NEXT.fetch_add(1, Ordering::Relaxed);
    (0..slots).map(|i| (start + i) % slots).find_map(|slot| {
        let pid = board.pid(slot);
        (slot != me && board.state(slot) == WorkerState::Ready && alive(pid)).then_some(pid)
    })
}

/// Whether a worker other than `me` serves or is starting to: one that can
/// take connections now or soon. None during a stop, when every worker drains.
pub(crate) fn successor(board: &Scoreboard, me: usize) -> bool {
    (0..board.slots())
        .any(|slot| slot != me && board.state(slot) != WorkerState::Draining && alive(board.pid(slot)))
}

/// A slot keeps the pid and state of a worker that died until the slot is
/// used again: only a process that exists counts.
fn alive(pid: libc::pid_t) -> bool {
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// Sends `conn` (a descriptor this process keeps until it closes its copy)
/// to the worker `to`. Never waits: a full inbox is an error like any other,
/// and the caller then closes the connection as it would have.
pub(crate) fn send(master: libc::pid_t, to: libc::pid_t, conn: RawFd, note: Note) -> io::Result<()> {
    static SENDER: OnceLock<Option<OwnedFd>> = OnceLock::new();
    let sender = SENDER.get_or_init(|| {
        let fd = unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
        };
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    });
    let Some(sender) = sender else {
        return Err(io::Error::other("no socket to send connections with"));
    };
    let (mut addr, len) = address(master, to);
    let payload = note.encode();
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
    msg.msg_namelen = len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, conn);
        if libc::sendmsg(sender.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What one read of the inbox gave.
pub(crate) enum Received {
    Conn(OwnedFd, Note),
    /// A message that was not a connection from this pool: dropped (any
    /// descriptor in it is closed), with why.
    Dropped(&'static str),
    Empty,
}

/// Takes one message from the inbox, without waiting.
pub(crate) fn receive(inbox: RawFd) -> io::Result<Received> {
    let mut payload = [0u8; 16];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // Room for a few descriptors (one is expected; more are closed) and the
    // sender's credentials.
    let space = unsafe {
        libc::CMSG_SPACE(4 * std::mem::size_of::<RawFd>() as u32)
            + libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32)
    } as usize;
    let mut control = vec![0u8; space];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = unsafe { libc::recvmsg(inbox, &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(Received::Empty),
            _ => Err(e),
        };
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut uid = None;
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) => {
                    let cred: libc::ucred = std::ptr::read_unaligned(data as *const libc::ucred);
                    uid = Some(cred.uid);
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Ok(Received::Dropped("a message too large for a connection handed over"));
    }
    if uid != Some(unsafe { libc::geteuid() }) {
        return Ok(Received::Dropped("a message from a process of another user"));
    }
    let Some(note) = Note::decode(&payload[..n as usize]) else {
        return Ok(Received::Dropped("a message that is not a connection handed over"));
    };
    if fds.len() != 1 || !is_stream_socket(fds[0].as_raw_fd()) {
        return Ok(Received::Dropped("a message without exactly one connected socket"));
    }
    Ok(Received::Conn(fds.pop().unwrap(), note))
}

fn is_stream_socket(fd: RawFd) -> bool {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut kind as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    r == 0 && kind == libc::SOCK_STREAM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_through_the_inbox() {
        // This process plays both workers: the inbox is named after its pid.
        let master = 1_000_000 + (std::process::id() as libc::pid_t % 1000);
        let inbox = bind_inbox(master).unwrap();
        assert!(matches!(receive(inbox.as_raw_fd()).unwrap(), Received::Empty));
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let note = Note { listener: 3, protocol: 2 };
        send(master, std::process::id() as libc::pid_t, a.as_raw_fd(), note).unwrap();
        drop(a);
        let Received::Conn(fd, got) = receive(inbox.as_raw_fd()).unwrap() else { panic!("nothing received") };
        assert_eq!(got, note);
        // The descriptor received is the same connection.
        let mut same = std::os::unix::net::UnixStream::from(fd);
        use std::io::{Read, Write};
        same.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // No inbox under that name: an error, never a wait.
        assert!(send(master, 1, same.as_raw_fd(), note).is_err());
    }

    #[test]
    fn notes_round_trip_and_strangers_are_refused() {
        let note = Note { listener: 65535, protocol: 1 };
        assert_eq!(Note::decode(&note.encode()), Some(note));
        assert_eq!(Note::decode(b"\xc1\x00\x00"), None);
        assert_eq!(Note::decode(b"\x00\x00\x00\x01"), None);
    }
}
