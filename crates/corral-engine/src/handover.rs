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

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, UnixCredentials,
};

use crate::scoreboard::{Scoreboard, WorkerState};

/// First byte of every message: a version, so a worker of another build
/// (during a re-exec) drops what it cannot read instead of misreading it.
const MAGIC: u8 = 0xC1;

/// What comes with a descriptor: the index of the listener it was accepted
/// on (same in every worker of one master) and that listener's protocol, as
/// a check; and the client a PROXY header named for the connection, which
/// the socket's peer (the balancer) does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Note {
    pub listener: u16,
    pub protocol: u8,
    pub client: Option<SocketAddr>,
}

/// The longest encoded note: the four fixed bytes, then the client's
/// address family (4 or 6), 16 address bytes and the port.
const NOTE_MAX: usize = 4 + 1 + 16 + 2;

impl Note {
    fn encode(self) -> Vec<u8> {
        let [a, b] = self.listener.to_le_bytes();
        let mut out = Vec::with_capacity(NOTE_MAX);
        out.extend_from_slice(&[MAGIC, a, b, self.protocol]);
        if let Some(c) = self.client {
            let (family, ip) = match c.ip() {
                IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
                IpAddr::V6(v6) => (6, v6.octets()),
            };
            out.push(family);
            out.extend_from_slice(&ip);
            out.extend_from_slice(&c.port().to_le_bytes());
        }
        out
    }

    fn decode(buf: &[u8]) -> Option<Note> {
        let (&[magic, a, b, protocol], rest) = buf.split_first_chunk::<4>()?;
        if magic != MAGIC {
            return None;
        }
        let client = match rest {
            [] => None,
            [family @ (4 | 6), addr @ ..] if addr.len() == 18 => {
                let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&addr[..16]).ok()?);
                let ip = match (family, ip.to_ipv4_mapped()) {
                    (4, Some(v4)) => IpAddr::V4(v4),
                    (4, None) => return None,
                    _ => IpAddr::V6(ip),
                };
                Some(SocketAddr::new(ip, u16::from_le_bytes([addr[16], addr[17]])))
            }
            _ => return None,
        };
        Some(Note { listener: u16::from_le_bytes([a, b]), protocol, client })
    }
}

fn address(master: libc::pid_t, worker: libc::pid_t) -> io::Result<UnixAddr> {
    Ok(UnixAddr::new_abstract(format!("corral-handover-{master}-{worker}").as_bytes())?)
}

fn datagram_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// This worker's inbox: where siblings send it connections.
pub(crate) fn bind_inbox(master: libc::pid_t) -> io::Result<OwnedFd> {
    let fd = datagram_socket()?;
    socket::setsockopt(&fd, sockopt::PassCred, &true)?;
    socket::bind(fd.as_raw_fd(), &address(master, std::process::id() as libc::pid_t)?)?;
    Ok(fd)
}

/// A worker of this pool other than `me` that serves and takes new work, if
/// any; successive calls take each of those in turn. (Scanning the slots
/// from a rotating start instead would favour the first ready worker after
/// a run of draining ones: after a reload under load, one new worker took
/// most of the kept connections, and the pool served a quarter less.)
pub(crate) fn target(board: &Scoreboard, me: usize) -> Option<libc::pid_t> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ready: Vec<libc::pid_t> = (0..board.slots())
        .filter(|&slot| slot != me && board.state(slot) == WorkerState::Ready)
        .map(|slot| board.pid(slot))
        .filter(|&pid| alive(pid))
        .collect();
    if ready.is_empty() {
        return None;
    }
    Some(ready[NEXT.fetch_add(1, Ordering::Relaxed) % ready.len()])
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
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Sends `conn` (a descriptor this process keeps until it closes its copy)
/// to the worker `to`. Never waits: a full inbox is an error like any other,
/// and the caller then closes the connection as it would have.
pub(crate) fn send(master: libc::pid_t, to: libc::pid_t, conn: RawFd, note: Note) -> io::Result<()> {
    static SENDER: OnceLock<Option<OwnedFd>> = OnceLock::new();
    let Some(sender) = SENDER.get_or_init(|| datagram_socket().ok()) else {
        return Err(io::Error::other("no socket to send connections with"));
    };
    let payload = note.encode();
    socket::sendmsg(
        sender.as_raw_fd(),
        &[IoSlice::new(&payload)],
        &[ControlMessage::ScmRights(&[conn])],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        Some(&address(master, to)?),
    )?;
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
    let mut payload = [0u8; NOTE_MAX + 8];
    let mut iov = [IoSliceMut::new(&mut payload)];
    // Room for a few descriptors (one is expected; more are closed) and the
    // sender's credentials.
    let mut control = nix::cmsg_space!([RawFd; 4], UnixCredentials);
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = match socket::recvmsg::<()>(inbox, &mut iov, Some(&mut control), flags) {
        Ok(msg) => msg,
        Err(Errno::EAGAIN) => return Ok(Received::Empty),
        Err(e) => return Err(e.into()),
    };
    let (len, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC));
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut uid = None;
    // Err only when the control data was cut short.
    let Ok(cmsgs) = msg.cmsgs() else {
        return Ok(Received::Dropped("a message too large for a connection handed over"));
    };
    for cmsg in cmsgs {
        match cmsg {
            ControlMessageOwned::ScmRights(received) => {
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
            }
            ControlMessageOwned::ScmCredentials(cred) => uid = Some(cred.uid()),
            _ => {}
        }
    }
    if truncated {
        return Ok(Received::Dropped("a message too large for a connection handed over"));
    }
    if uid != Some(nix::unistd::geteuid().as_raw()) {
        return Ok(Received::Dropped("a message from a process of another user"));
    }
    let Some(note) = Note::decode(&payload[..len]) else {
        return Ok(Received::Dropped("a message that is not a connection handed over"));
    };
    let stream = |fd: &OwnedFd| socket::getsockopt(fd, sockopt::SockType) == Ok(SockType::Stream);
    match fds.pop() {
        Some(fd) if fds.is_empty() && stream(&fd) => Ok(Received::Conn(fd, note)),
        _ => Ok(Received::Dropped("a message without exactly one connected socket")),
    }
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
        let note = Note { listener: 3, protocol: 2, client: None };
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
    fn connections_are_spread_evenly_over_the_ready_workers() {
        // Two draining workers (one of them this one) then two ready ones:
        // live processes all, this one and its parent.
        let board = Scoreboard::new(4, 1).unwrap();
        let (me, parent) = (std::process::id() as libc::pid_t, unsafe { libc::getppid() });
        for (slot, pid, state) in [
            (0, me, WorkerState::Draining),
            (1, me, WorkerState::Draining),
            (2, me, WorkerState::Ready),
            (3, parent, WorkerState::Ready),
        ] {
            board.reset(slot, pid);
            board.set_state(slot, state);
        }
        let picks: Vec<libc::pid_t> = (0..100).filter_map(|_| target(&board, 0)).collect();
        assert_eq!(picks.len(), 100);
        assert_eq!(picks.iter().filter(|&&p| p == me).count(), 50);
        assert_eq!(picks.iter().filter(|&&p| p == parent).count(), 50);
        board.set_state(2, WorkerState::Draining);
        board.set_state(3, WorkerState::Draining);
        assert_eq!(target(&board, 0), None);
    }

    #[test]
    fn notes_round_trip_and_strangers_are_refused() {
        let note = Note { listener: 65535, protocol: 1, client: None };
        assert_eq!(Note::decode(&note.encode()), Some(note));
        for client in ["203.0.113.7:40001", "[2001:db8::7]:1", "[::ffff:192.0.2.1]:2"] {
            let client: SocketAddr = client.parse().unwrap();
            let note = Note { listener: 1, protocol: 0, client: Some(client) };
            let got = Note::decode(&note.encode()).unwrap();
            assert_eq!((got.listener, got.client), (1, Some(client)));
        }
        assert_eq!(Note::decode(b"\xc1\x00\x00\x01\x05"), None);
        assert_eq!(Note::decode(b"\xc1\x00\x00"), None);
        assert_eq!(Note::decode(b"\x00\x00\x00\x01"), None);
    }
}
