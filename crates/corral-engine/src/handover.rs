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
//! Each worker receives on a unix datagram socket of its own, named after
//! the master's pid and its own, in a directory of its pool (see
//! [`POOL_ENV`]) that only the user the workers run as may enter. Not in
//! the abstract namespace, where names have no owner: any local user could
//! bind the name of a worker yet to start and be handed its connections,
//! with the requests read on them. Only processes of the same user are
//! believed (SO_PASSCRED), and only a descriptor that is a stream socket is
//! taken.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, UnixCredentials,
};

use crate::scoreboard::{Retire, Scoreboard, WorkerState};

/// First byte of every message: a version, so a worker of another build
/// (during a re-exec) drops what it cannot read instead of misreading it.
/// It also says which kind of connection comes: one between two requests
/// ([`MAGIC`]), one that has not sent its first request yet
/// ([`MAGIC_FRESH`]: the header timeout applies, and a PROXY header may
/// come first), or one whose request the sender had begun to read
/// ([`MAGIC_BEGUN`]: what it read comes after the note, to be taken as the
/// first bytes from the socket). A build that knows only the first drops
/// the others.
const MAGIC: u8 = 0xC1;
const MAGIC_FRESH: u8 = 0xC2;
const MAGIC_BEGUN: u8 = 0xC3;

/// What comes with a descriptor: the index of the listener it was accepted
/// on (same in every worker of one master) and that listener's protocol, as
/// a check; and the client a PROXY header named for the connection, which
/// the socket's peer (the balancer) does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Note {
    pub listener: u16,
    pub protocol: u8,
    pub client: Option<SocketAddr>,
    /// No request has begun on it yet (with bytes carried: its PROXY
    /// header is still to come, in them or after them).
    pub fresh: bool,
}

/// The longest encoded note: the four fixed bytes, a flags byte (only with
/// bytes carried), then the client's address family (4 or 6), 16 address
/// bytes and the port.
const NOTE_MAX: usize = 4 + 1 + 1 + 16 + 2;

/// The most bytes of a begun request that go with its connection: a head
/// and a small body read ahead of the app (64 KiB each by default). A unix
/// datagram may be as large as the sender's SO_SNDBUF (208 KiB by
/// default); a connection holding more is not handed over.
pub(crate) const CARRIED_MAX: usize = 128 * 1024;

impl Note {
    /// The message for a connection and the bytes of its request already
    /// read (`carried`, empty for one between two requests).
    fn encode(self, carried: &[u8]) -> Vec<u8> {
        let [a, b] = self.listener.to_le_bytes();
        let mut out = Vec::with_capacity(NOTE_MAX + carried.len());
        let magic = match (carried.is_empty(), self.fresh) {
            (false, _) => MAGIC_BEGUN,
            (true, true) => MAGIC_FRESH,
            (true, false) => MAGIC,
        };
        out.extend_from_slice(&[magic, a, b, self.protocol]);
        if !carried.is_empty() {
            out.push(u8::from(self.fresh));
        }
        match self.client {
            Some(c) => {
                let (family, ip) = match c.ip() {
                    IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
                    IpAddr::V6(v6) => (6, v6.octets()),
                };
                out.push(family);
                out.extend_from_slice(&ip);
                out.extend_from_slice(&c.port().to_le_bytes());
            }
            // Where bytes follow, a family of 0 says no client comes first.
            None if !carried.is_empty() => out.push(0),
            None => {}
        }
        out.extend_from_slice(carried);
        out
    }

    /// The note and the bytes carried after it.
    fn decode(buf: &[u8]) -> Option<(Note, &[u8])> {
        let (&[magic, a, b, protocol], mut rest) = buf.split_first_chunk::<4>()?;
        let fresh = match magic {
            MAGIC => false,
            MAGIC_FRESH => true,
            MAGIC_BEGUN => {
                let (&flags, after) = rest.split_first()?;
                rest = after;
                match flags {
                    0 => false,
                    1 => true,
                    _ => return None,
                }
            }
            _ => return None,
        };
        let client = |family: u8, addr: &[u8]| -> Option<SocketAddr> {
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&addr[..16]).ok()?);
            let ip = match (family, ip.to_ipv4_mapped()) {
                (4, Some(v4)) => IpAddr::V4(v4),
                (4, None) => return None,
                _ => IpAddr::V6(ip),
            };
            Some(SocketAddr::new(ip, u16::from_le_bytes([addr[16], addr[17]])))
        };
        let (client, carried) = match (magic, rest) {
            (MAGIC_BEGUN, [0, carried @ ..]) => (None, carried),
            (MAGIC_BEGUN, [family @ (4 | 6), addr @ ..]) if addr.len() >= 18 => {
                (Some(client(*family, &addr[..18])?), &addr[18..])
            }
            (MAGIC_BEGUN, _) => return None,
            (_, []) => (None, rest),
            (_, [family @ (4 | 6), addr @ ..]) if addr.len() == 18 => (Some(client(*family, addr)?), &[][..]),
            _ => return None,
        };
        if magic == MAGIC_BEGUN && carried.is_empty() {
            return None;
        }
        Some((Note { listener: u16::from_le_bytes([a, b]), protocol, client, fresh }, carried))
    }
}

fn address(master: libc::pid_t, worker: libc::pid_t) -> io::Result<UnixAddr> {
    if !dir_ready() {
        return Err(io::Error::other("the directory of the inboxes is not ready"));
    }
    Ok(UnixAddr::new(format!("{}{worker}", inbox_prefix(master)).as_str())?)
}

/// What the inbox paths of `master`'s workers start with.
fn inbox_prefix(master: libc::pid_t) -> String {
    format!("{}/{master}-", inbox_dir().display())
}

/// Where the pool's directory of inboxes may go, in order: the temporary
/// directory, then /tmp (a `TMPDIR` of root's own, as libpam-tmpdir sets,
/// is closed to `--user`). The program a master re-executes into tries them
/// in the same order, and so finds the same directory.
fn inbox_dir_candidates() -> Vec<std::path::PathBuf> {
    let name = format!("corral-{}-{}", pool(), nix::unistd::geteuid());
    let mut bases = Vec::new();
    let tmp = std::env::temp_dir();
    // A socket's path has room for 107 bytes; and the kernel's table,
    // where a re-executed master's workers are found, splits on spaces.
    let text = tmp.to_string_lossy();
    if text.len() <= 48 && !text.contains(char::is_whitespace) && tmp.is_absolute() {
        bases.push(tmp.clone());
    }
    if tmp != std::path::Path::new("/tmp") {
        bases.push(std::path::PathBuf::from("/tmp"));
    }
    bases.into_iter().map(|b| b.join(&name)).collect()
}

/// The directory [`prepare_inbox_dir`] chose (inherited by the workers).
static CHOSEN_DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

/// The pool's directory of inboxes: named after the pool and the user.
fn inbox_dir() -> &'static std::path::Path {
    CHOSEN_DIR.get_or_init(|| inbox_dir_candidates().swap_remove(0))
}

/// Set once the directory of [`inbox_dir`] is known to be this user's alone
/// (see [`prepare_inbox_dir`]); inherited by the workers forked after.
static DIR_READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the directory of the inboxes is this user's alone, as the
/// master found it before this worker started.
pub(crate) fn dir_ready() -> bool {
    DIR_READY.load(Ordering::Relaxed)
}

/// Makes the pool's directory of inboxes, or takes the one a previous
/// program of this master made: owned by this user, entered by nobody
/// else. Called by the master, as the user the workers run as, before the
/// workers start. A directory there of anyone else's is refused, and the
/// workers then close the connections they would have handed over.
pub fn prepare_inbox_dir() -> Result<(), String> {
    let mut why = Vec::new();
    for dir in inbox_dir_candidates() {
        match make_private_dir(&dir) {
            Ok(()) => {
                let _ = CHOSEN_DIR.set(dir.clone());
                if inbox_dir() == dir {
                    DIR_READY.store(true, Ordering::Relaxed);
                    if let Some(base) = dir.parent() {
                        remove_stale_dirs(base, &dir);
                    }
                    return Ok(());
                }
            }
            Err(e) => why.push(e),
        }
    }
    Err(why.join("; "))
}

/// Makes `dir` with mode 700, or checks that the one there is this user's
/// alone.
fn make_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let made = std::fs::DirBuilder::new().mode(0o700).create(dir);
    if let Err(e) = &made {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(format!("cannot create {}: {e}", dir.display()));
        }
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir()
        || meta.uid() != nix::unistd::geteuid().as_raw()
        || meta.permissions().mode() & 0o077 != 0
    {
        return Err(format!(
            "{} exists and is not a directory of this user's alone (mode 700)",
            dir.display()
        ));
    }
    Ok(())
}

/// Makes the directory of inboxes again if it went (a clean-up of /tmp),
/// before a worker starts: the workers started after would have no inbox.
pub(crate) fn ensure_inbox_dir() {
    if dir_ready() && !inbox_dir().exists() {
        if let Err(e) = make_private_dir(inbox_dir()) {
            tracing::warn!("Workers cannot hand connections to each other: {e}");
        }
    }
}

/// Removes the directories of inboxes a master of this user left when it
/// was killed outright (each start names its pool anew, so they would pile
/// up): those where no inbox answers any more.
fn remove_stale_dirs(base: &std::path::Path, ours: &std::path::Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let uid = nix::unistd::geteuid().as_raw();
    let suffix = format!("-{uid}");
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pool) = name.strip_prefix("corral-").and_then(|n| n.strip_suffix(&suffix)) else { continue };
        if path == ours || pool.len() != 16 || !pool.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if !meta.is_dir() || meta.uid() != uid {
            continue;
        }
        // An empty one may be a master's that is starting its workers.
        let young = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_none_or(|age| age.as_secs() < 600);
        let Ok(mut inside) = std::fs::read_dir(&path).map(|d| d.flatten().peekable()) else { continue };
        if young && inside.peek().is_none() {
            continue;
        }
        let dead = inside.all(|inbox| {
            let is_socket = inbox.file_type().is_ok_and(|t| t.is_socket());
            is_socket
                && datagram_socket().is_ok_and(|s| {
                    UnixAddr::new(&inbox.path()).is_ok_and(|addr| {
                        matches!(socket::connect(s.as_raw_fd(), &addr), Err(Errno::ECONNREFUSED))
                    })
                })
        });
        if dead {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Removes the inbox of a worker that is gone (one killed outright could
/// not), so that the directory does not fill up with a file per worker.
pub(crate) fn forget_inbox(master: libc::pid_t, worker: libc::pid_t) {
    if dir_ready() {
        let _ = std::fs::remove_file(format!("{}{worker}", inbox_prefix(master)));
    }
}

/// Removes the pool's directory of inboxes, when the master stops for good.
pub fn remove_inbox_dir() {
    if dir_ready() {
        let _ = std::fs::remove_dir_all(inbox_dir());
    }
}

/// Names a pool in its inboxes' addresses, with the master's pid: set once
/// by the first master, kept by the programs it re-executes into (the
/// environment survives execve), inherited by its workers. A pid alone is
/// not enough: containers sharing a network namespace (one pod) share the
/// abstract socket names, while each numbers its processes from 1.
pub const POOL_ENV: &str = "CORRAL_POOL";

/// This master's pool's name (see [`name_pool`]).
static POOL: OnceLock<String> = OnceLock::new();

/// Gives this master's pool its name, unless a previous program of it did
/// (the re-exec passes it in [`POOL_ENV`]). The variable leaves the
/// environment: a program the app starts, another corral say, must not
/// take the pool for its own (one that did removed this pool's inboxes at
/// its exit). Called before any worker (or thread) exists.
pub fn name_pool() {
    let given = std::env::var(POOL_ENV).ok().filter(|v| !v.is_empty());
    std::env::remove_var(POOL_ENV);
    let name = given.unwrap_or_else(|| {
        let mut bytes = [0u8; 8];
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let mut name = u64::from_ne_bytes(bytes);
        if n != bytes.len() as isize {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            name = now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
        }
        format!("{name:016x}")
    });
    let _ = POOL.set(name);
}

/// The pool's name, for the program a re-exec runs (in [`POOL_ENV`]).
pub fn pool() -> &'static str {
    POOL.get().map_or("", String::as_str)
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
    let addr = address(master, std::process::id() as libc::pid_t)?;
    // Left by a worker of the same pid that was killed before the master
    // removed it: in a directory no one else may write, it is ours.
    if let Some(path) = addr.path() {
        let _ = std::fs::remove_file(path);
    }
    socket::bind(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}

/// A worker of this pool other than `me` that serves and takes new work, if
/// any; successive calls take each of those in turn. (Scanning the slots
/// from a rotating start instead would favour the first ready worker after
/// a run of draining ones: after a reload under load, one new worker took
/// most of the kept connections, and the pool served a quarter less.)
pub(crate) fn target(board: &Scoreboard, me: usize, master: libc::pid_t) -> Option<libc::pid_t> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let serving: Vec<usize> = (0..board.slots())
        .filter(|&slot| slot != me && board.state(slot) == WorkerState::Ready && !stuck(board, slot))
        .filter(|&slot| alive(board.pid(slot)))
        .collect();
    // One with a thread free first: a worker whose threads are all in a
    // request may be stuck in them, and would leave the connection unread.
    let free: Vec<usize> =
        serving.iter().copied().filter(|&s| board.busy_threads(s) < board.threads()).collect();
    let mut ready: Vec<libc::pid_t> =
        if free.is_empty() { serving } else { free }.into_iter().map(|slot| board.pid(slot)).collect();
    if ready.is_empty() {
        ready = successors_after_reexec(board, master);
    }
    if ready.is_empty() {
        return None;
    }
    Some(ready[NEXT.fetch_add(1, Ordering::Relaxed) % ready.len()])
}

/// A worker that has a request stuck past --timeout or a crashed thread
/// (it is being replaced): connections passed to it may never be read.
fn stuck(board: &Scoreboard, slot: usize) -> bool {
    matches!(board.retire(slot), Some(Retire::Timeout | Retire::Crash))
}

/// The sibling of `me` that serves and holds the fewest connections, if it
/// holds fewer than `max`: where a new connection goes that `me` has no
/// room for.
pub(crate) fn target_with_room(board: &Scoreboard, me: usize, max: usize) -> Option<libc::pid_t> {
    with_room(board, me, max)
        .min_by_key(|&slot| board.conns(slot))
        .map(|slot| board.pid(slot))
        .filter(|&pid| alive(pid))
}

/// The ready workers other than `me`, not stuck, with fewer than `max`
/// connections.
fn with_room(board: &Scoreboard, me: usize, max: usize) -> impl Iterator<Item = usize> + '_ {
    (0..board.slots()).filter(move |&slot| {
        slot != me
            && board.state(slot) == WorkerState::Ready
            && !stuck(board, slot)
            && board.conns(slot) < max
    })
}

/// The ready worker other than `me`, with room for a connection, that has
/// the most threads free (see [`Scoreboard::free_threads`]); None when none
/// has one.
pub(crate) fn target_with_free_thread(board: &Scoreboard, me: usize, max: usize) -> Option<libc::pid_t> {
    with_room(board, me, max)
        .filter(|&slot| board.free_threads(slot) > 0)
        .max_by_key(|&slot| board.free_threads(slot))
        .map(|slot| board.pid(slot))
        .filter(|&pid| alive(pid))
}

/// Whether a worker other than `me` serves or is starting to: one that can
/// take connections now or soon. None during a stop, when every worker drains.
pub(crate) fn successor(board: &Scoreboard, me: usize, master: libc::pid_t) -> bool {
    (0..board.slots())
        .any(|slot| slot != me && board.state(slot) != WorkerState::Draining && alive(board.pid(slot)))
        || !successors_after_reexec(board, master).is_empty()
}

/// Workers of this master that this worker's scoreboard does not know: once
/// the master has re-executed itself (USR2, or HUP with --preload), those of
/// the new program, which has a scoreboard of its own. That master stops the
/// old workers only once its own are ready (and says so first, see
/// [`SUPERSEDED`]), so these serve. They are found
/// by their inboxes' names among the unix sockets the kernel lists, looked
/// up at most once a second (a draining worker asks for every connection).
fn successors_after_reexec(board: &Scoreboard, master: libc::pid_t) -> Vec<libc::pid_t> {
    if !SUPERSEDED.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let mut found = SUCCESSORS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, pids)) = found.as_ref() {
        if at.elapsed() < Duration::from_secs(1) {
            return pids.clone();
        }
    }
    let known: Vec<libc::pid_t> = (0..board.slots()).map(|slot| board.pid(slot)).collect();
    let me = std::process::id() as libc::pid_t;
    let pids: Vec<libc::pid_t> = std::fs::read_to_string("/proc/net/unix")
        .map(|table| inboxes_of(&table, master))
        .unwrap_or_default()
        .into_iter()
        .filter(|pid| *pid != me && !known.contains(pid) && alive(*pid))
        .collect();
    *found = Some((Instant::now(), pids.clone()));
    pids
}

/// The workers [`successors_after_reexec`] found last, and when.
static SUCCESSORS: Mutex<Option<(Instant, Vec<libc::pid_t>)>> = Mutex::new(None);

/// Set in a worker of a master's previous program, by the USR2 the new
/// program sends before it stops that worker: only then are workers its
/// scoreboard does not know a new generation that serves, rather than (in a
/// stop, say) others draining like itself.
static SUPERSEDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The worker's handler for USR2 (async-signal-safe: one atomic store).
pub(crate) extern "C" fn note_superseded(_: libc::c_int) {
    SUPERSEDED.store(true, Ordering::Relaxed);
}

/// The worker pids of `master`'s inboxes in a /proc/net/unix table, whose
/// last column is a bound socket's path.
fn inboxes_of(table: &str, master: libc::pid_t) -> Vec<libc::pid_t> {
    let prefix = inbox_prefix(master);
    let mut pids: Vec<libc::pid_t> = table
        .lines()
        .filter_map(|line| line.split_whitespace().last()?.strip_prefix(&prefix)?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// A slot keeps the pid and state of a worker that died until the slot is
/// used again: only a process that exists counts.
fn alive(pid: libc::pid_t) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Sends `conn` (a descriptor this process keeps until it closes its copy)
/// to the worker `to`, with `carried`, the bytes of a request begun on it
/// that this process read (at most [`CARRIED_MAX`]). Never waits: a full inbox is an error like any other,
/// and the caller then closes the connection as it would have.
pub(crate) fn send(
    master: libc::pid_t,
    to: libc::pid_t,
    conn: RawFd,
    note: Note,
    carried: &[u8],
) -> io::Result<()> {
    static SENDER: OnceLock<Option<OwnedFd>> = OnceLock::new();
    let Some(sender) = SENDER.get_or_init(|| datagram_socket().ok()) else {
        return Err(io::Error::other("no socket to send connections with"));
    };
    if carried.len() > CARRIED_MAX {
        return Err(io::Error::other("too much of its request read to go with it"));
    }
    let payload = note.encode(carried);
    let sent = socket::sendmsg(
        sender.as_raw_fd(),
        &[IoSlice::new(&payload)],
        &[ControlMessage::ScmRights(&[conn])],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        Some(&address(master, to)?),
    );
    if let Err(Errno::EPIPE | Errno::ECONNREFUSED) = sent {
        // Its inbox is closed (it drains) or gone: a new-program worker
        // that a HUP drains right after a re-exec is still in the list
        // found less than a second ago.
        if let Some((_, pids)) = SUCCESSORS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            pids.retain(|&pid| pid != to);
        }
    }
    sent?;
    Ok(())
}

/// Closes a draining worker's inbox to senders: a sibling that picked it
/// before it began to drain gets EPIPE and keeps its connection (to hand it
/// to another), where a message queued after the worker's last look would
/// be lost with the worker. What is queued already can still be received.
pub(crate) fn close_inbox(inbox: RawFd) {
    let _ = socket::shutdown(inbox, socket::Shutdown::Read);
}

/// What one read of the inbox gave.
pub(crate) enum Received {
    /// A connection, and the bytes of a request begun on it that the
    /// sender had read (empty if none).
    Conn(OwnedFd, Note, Vec<u8>),
    /// A message that was not a connection from this pool: dropped (any
    /// descriptor in it is closed), with why.
    Dropped(&'static str),
    Empty,
}

/// Takes one message from the inbox, without waiting.
pub(crate) fn receive(inbox: RawFd) -> io::Result<Received> {
    thread_local! {
        // Large enough for the bytes a begun request carries, and one more
        // so that a larger message shows as cut; kept for the thread's
        // next message.
        static PAYLOAD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PAYLOAD.with(|p| {
        let mut payload = p.borrow_mut();
        if payload.is_empty() {
            payload.resize(NOTE_MAX + CARRIED_MAX + 1, 0);
        }
        receive_into(inbox, &mut payload)
    })
}

fn receive_into(inbox: RawFd, payload: &mut [u8]) -> io::Result<Received> {
    let mut iov = [IoSliceMut::new(&mut *payload)];
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
            ControlMessageOwned::ScmRights(received) => fds.extend(
                received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(crate::listen::off_stdio(fd)) }),
            ),
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
    let Some((note, carried)) = Note::decode(&payload[..len]) else {
        return Ok(Received::Dropped("a message that is not a connection handed over"));
    };
    let stream = |fd: &OwnedFd| socket::getsockopt(fd, sockopt::SockType) == Ok(SockType::Stream);
    match fds.pop() {
        Some(fd) if fds.is_empty() && stream(&fd) => Ok(Received::Conn(fd, note, carried.to_vec())),
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
        prepare_inbox_dir().unwrap();
        let inbox = bind_inbox(master).unwrap();
        assert!(matches!(receive(inbox.as_raw_fd()).unwrap(), Received::Empty));
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let note = Note { listener: 3, protocol: 2, client: None, fresh: false };
        send(master, std::process::id() as libc::pid_t, a.as_raw_fd(), note, b"").unwrap();
        drop(a);
        let Received::Conn(fd, got, carried) = receive(inbox.as_raw_fd()).unwrap() else {
            panic!("nothing received")
        };
        assert_eq!((got, carried), (note, Vec::new()));
        // The descriptor received is the same connection.
        let mut same = std::os::unix::net::UnixStream::from(fd);
        use std::io::{Read, Write};
        same.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // The largest request begun goes with its connection; a larger one
        // is refused, never cut.
        let begun: Vec<u8> = (0..CARRIED_MAX).map(|i| (i % 251) as u8).collect();
        send(master, std::process::id() as libc::pid_t, same.as_raw_fd(), note, &begun).unwrap();
        let Received::Conn(_, got, carried) = receive(inbox.as_raw_fd()).unwrap() else {
            panic!("nothing received")
        };
        assert_eq!(got, note);
        assert!(carried == begun);
        let too_much = vec![b'x'; CARRIED_MAX + 1];
        assert!(send(master, std::process::id() as libc::pid_t, same.as_raw_fd(), note, &too_much).is_err());
        assert!(matches!(receive(inbox.as_raw_fd()).unwrap(), Received::Empty));
        // No inbox under that name: an error, never a wait.
        assert!(send(master, 1, same.as_raw_fd(), note, b"").is_err());
        // The directory is the user's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(inbox_dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        forget_inbox(master, std::process::id() as libc::pid_t);
        assert!(send(master, std::process::id() as libc::pid_t, same.as_raw_fd(), note, b"").is_err());
        remove_inbox_dir();
        assert!(!inbox_dir().exists());
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
        let picks: Vec<libc::pid_t> = (0..100).filter_map(|_| target(&board, 0, 1)).collect();
        assert_eq!(picks.len(), 100);
        assert_eq!(picks.iter().filter(|&&p| p == me).count(), 50);
        assert_eq!(picks.iter().filter(|&&p| p == parent).count(), 50);
        board.set_state(2, WorkerState::Draining);
        board.set_state(3, WorkerState::Draining);
        assert_eq!(target(&board, 0, 1), None);
    }

    #[test]
    fn inboxes_are_found_in_the_kernels_table() {
        let p = inbox_prefix(70);
        let table = format!(
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 11 {p}71\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 12 {p}72\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 13 {p}0-73\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 13 /tmp/corral-other-0/70-74\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 13 @{p}75\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 13 {}73\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 14 /run/app.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 15\n",
            inbox_prefix(700)
        );
        let table = table.as_str();
        assert_eq!(inboxes_of(table, 70), vec![71, 72]);
        assert_eq!(inboxes_of(table, 7), Vec::<libc::pid_t>::new());
    }

    #[test]
    fn notes_round_trip_and_strangers_are_refused() {
        for carried in [&b""[..], b"P", b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"] {
            for fresh in [false, true] {
                let note = Note { listener: 65535, protocol: 1, client: None, fresh };
                assert_eq!(Note::decode(&note.encode(carried)), Some((note, carried)));
                for client in ["203.0.113.7:40001", "[2001:db8::7]:1", "[::ffff:192.0.2.1]:2"] {
                    let client: SocketAddr = client.parse().unwrap();
                    let note = Note { listener: 1, protocol: 0, client: Some(client), fresh };
                    let encoded = note.encode(carried);
                    let (got, got_carried) = Note::decode(&encoded).unwrap();
                    assert_eq!(
                        (got.listener, got.client, got.fresh, got_carried),
                        (1, Some(client), fresh, carried)
                    );
                }
            }
        }
        // A note of the build before fresh connections were handed over.
        assert_eq!(
            Note::decode(b"\xc1\x02\x00\x03"),
            Some((Note { listener: 2, protocol: 3, client: None, fresh: false }, &b""[..]))
        );
        // Carried bytes, and the flags and family bytes they need before them.
        assert_eq!(
            Note::decode(b"\xc3\x02\x00\x03\x01\x00GET"),
            Some((Note { listener: 2, protocol: 3, client: None, fresh: true }, &b"GET"[..]))
        );
        assert_eq!(Note::decode(b"\xc3\x02\x00\x03\x00\x00"), None);
        assert_eq!(Note::decode(b"\xc3\x02\x00\x03\x02\x00GET"), None);
        assert_eq!(Note::decode(b"\xc3\x02\x00\x03\x00\x05GET"), None);
        assert_eq!(Note::decode(b"\xc3\x02\x00\x03\x00\x04GET"), None);
        assert_eq!(Note::decode(b"\xc3\x02\x00\x03"), None);
        assert_eq!(Note::decode(b"\xc1\x00\x00\x01\x05"), None);
        assert_eq!(Note::decode(b"\xc1\x00\x00"), None);
        assert_eq!(Note::decode(b"\x00\x00\x00\x01"), None);
        assert_eq!(Note::decode(b"\xc4\x00\x00\x01"), None);
    }
}
