//! The worker process: one epoll set shared by `--threads` threads, each of
//! which accepts, reads, parses, calls the app and writes the response itself.
//!
//! No request is handed from one thread to another: a thread-to-thread
//! hand-off costs about as much as serving a small request. With several
//! threads, connections sit in the epoll set with `EPOLLONESHOT`, so exactly
//! one thread owns a connection from the moment it becomes readable until it
//! is re-armed. With one thread there is no one to share with: connections
//! stay armed edge-triggered, which saves re-arming (an `epoll_ctl`) after
//! every request on a kept-alive connection.
//! Listeners are registered with `EPOLLEXCLUSIVE`, so one connection wakes
//! one worker process, not all of them.
//!
//! The process's main thread serves nothing: it handles signals, closes idle
//! connections whose deadline passed, and runs the graceful drain.
//!
//! One more thread finishes the file downloads (`--static`,
//! `wsgi.file_wrapper`) a client reads more slowly than they are sent (see
//! [`Offload`]), so that a slow reader never holds a serving thread.
//!
//! This module holds what every part shares: the connection table, the
//! serving threads' loop and the worker's start-up. A connection's path
//! through the others: [`accept`] takes it, [`serve`] gives it a thread's
//! turn, [`read`] reads a head, [`request`] serves it (with [`discard`] for
//! a body the app left and [`refusal`] for the server's own errors), and
//! [`serve`] parks or closes it. [`upkeep`] and [`signals`] are the main
//! thread's; [`offload`] and [`hand_over`] are described above and in
//! [`crate::handover`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use corral_proto::http1::{self, BodyFraming, Head, Version};
use corral_proto::{fastcgi, Status};
use tracing::{debug, error, info, warn};

use crate::access::{AccessLog, Sink};
use crate::app::{App, ListenerInfo, Meta, Request};
use crate::cgi::{self, CgiParams};
use crate::config::{Config, SigintMode};
use crate::date::mono_ms;
use crate::exchange::{
    BodyError, BodyState, Exchange, Io, RespPhase, ResponseError, Transfer, Wire, MAX_DRAIN, READ_CHUNK,
};
use crate::gateway::{self, FcgiConn, FcgiIn};
use crate::listen::Protocol;
use crate::scoreboard::{Retire, Scoreboard, WorkerState};

mod accept;
mod discard;
mod hand_over;
mod offload;
mod read;
mod refusal;
mod request;
mod serve;
mod signals;
mod upkeep;

use accept::*;
use discard::*;
use hand_over::*;
use offload::*;
use read::*;
use refusal::*;
use request::*;
use serve::*;
use signals::*;
use upkeep::*;

pub(crate) use hand_over::fastcgi_conn_may_stay;
pub(crate) use refusal::cgi_error_response;
pub use refusal::{error_response, reason};
pub use signals::{left_idle, prepare_signals, stopped_at_once, WORKER_SIGNALS};
pub use upkeep::cut_at_exit;
pub(crate) use upkeep::waiting_on_client;

/// epoll tokens below this are listener indexes; the inbox token sits just
/// under it; anything else is a `*mut Conn`.
const LISTENER_TOKENS: u64 = 1 << 16;
/// The epoll token of the socket on which siblings hand this worker their
/// kept-alive connections when they drain (see [`crate::handover`]).
const INBOX_TOKEN: u64 = LISTENER_TOKENS - 1;
/// The token of the eventfd that says the offload thread finished downloads.
const OFFLOADED_TOKEN: u64 = LISTENER_TOKENS - 2;
/// The token of the eventfd that says a connection gave up its turn (see [`Turns`]).
const YIELDED_TOKEN: u64 = LISTENER_TOKENS - 3;
/// Requests a connection may have served in a row from bytes it already
/// sent (pipelined) before its thread looks at the others' work: a client
/// that keeps its requests coming would otherwise hold the thread for good,
/// and with one thread the whole worker.
const TURN_REQUESTS: u32 = 16;
/// Milliseconds of pipelined requests after which a connection gives up
/// its turn even before [`TURN_REQUESTS`] (slow ones).
const TURN_MS: u64 = 20;
/// Connections taken from one listener wake-up before looking at other work.
const ACCEPT_BATCH: usize = 64;
/// Milliseconds of serving new connections after which a batch of accepts
/// ends early (read from a coarse clock, so a little more in fact). Fast
/// requests fill a batch long before; a slow one ends it, so connections
/// already kept alive get their turn.
const ACCEPT_BATCH_TIME_MS: u64 = 5;
/// Request bodies up to this size are read in full before the app is
/// called (unless the client waits for `100 Continue`).
const PREREAD_MAX: u64 = 64 * 1024;
/// Most bytes of incomplete HTTP request heads one worker buffers at once.
/// Each head may be as long as the limits allow (827 KB with gunicorn's
/// defaults), but --max-connections clients sending that much and never
/// ending their heads would otherwise hold the product, most of a GiB.
/// Past it, a head longer than HEAD_FAIR_SHARE is refused with 431.
const HEAD_BUDGET: usize = 32 << 20;
/// An incomplete head up to this long is never refused for the budget: the
/// heads real clients send stay well below it.
const HEAD_FAIR_SHARE: usize = 64 << 10;

/// Bytes of incomplete request heads this worker buffers, all connections.
static HEAD_BYTES: AtomicUsize = AtomicUsize::new(0);

/// One connection's share of HEAD_BYTES, given back when it ends.
#[derive(Default)]
struct HeadCharge(usize);

impl HeadCharge {
    /// Makes the share `n` bytes; returns the worker's total.
    fn set(&mut self, n: usize) -> usize {
        let total = if n >= self.0 {
            HEAD_BYTES.fetch_add(n - self.0, Ordering::Relaxed) + (n - self.0)
        } else {
            HEAD_BYTES.fetch_sub(self.0 - n, Ordering::Relaxed) - (self.0 - n)
        };
        self.0 = n;
        total
    }
}

impl Drop for HeadCharge {
    fn drop(&mut self) {
        HEAD_BYTES.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// Connections whose finished responses one thread holds back before
/// writing them all (see [`Held`]).
const HOLD_CONNS: usize = 16;
/// How often the main thread looks for expired connections.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// How long a worker that ran out of file descriptors stops accepting at
/// least (the main thread resumes at its first sweep after it), as nginx
/// does: a
/// listener left in the epoll set wakes the threads again at once, each
/// failing the same way, which burned a core and wrote a log line per
/// attempt while clients waited in the queue all the same.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);

/// When accepting stopped for lack of descriptors ([`mono_ms`]); 0 while
/// accepting. Changed only under [`ACCEPT_PAUSE_LOCK`], with the listeners'
/// removal from the epoll set or their return; read without it by threads
/// woken by a listener, to skip accepting while it is set.
static ACCEPT_PAUSED_AT: AtomicU64 = AtomicU64::new(0);
static ACCEPT_PAUSE_LOCK: Mutex<()> = Mutex::new(());

/// Accepts refused for lack of descriptors since the last report, and when
/// that report was ([`mono_ms`]).
static NO_FDS: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// Set once this worker process starts its graceful drain. Process-wide
/// because a process runs exactly one worker.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Whether this worker process is draining: responses then close their connection.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

/// When the drain began ([`mono_ms`]).
static DRAIN_STARTED: AtomicU64 = AtomicU64::new(0);

/// How long a draining worker keeps its idle keep-alive connections open.
/// A client (or nginx, from its upstream keepalive pool) may be sending a
/// request on one at the very moment it is closed, and that request is
/// lost: nginx answers a POST with 502, since it retries only idempotent
/// requests. Kept open a little, such a request is served (with
/// `Connection: close`); what stays idle through it, and so is the least
/// likely to be picked next, is closed after.
const DRAIN_KEEPALIVE_LINGER: Duration = Duration::from_secs(2);

/// Whether every thread of the worker is stuck in a request past --timeout:
/// then it can serve nothing more.
fn all_stuck<A: App>(w: &Shared<A>) -> bool {
    w.stuck.load(Ordering::Acquire) >= w.current.len()
}

/// Whether no thread of this worker will start another request: every one
/// is stuck past --timeout, or one crashed (see [`crate::crash`]).
fn serving_over<A: App>(w: &Shared<A>) -> bool {
    all_stuck(w) || crate::crash::crashed().is_some()
}

/// Whether a draining worker may close its idle keep-alive connections.
fn idle_linger_over() -> bool {
    draining()
        && mono_ms() >= DRAIN_STARTED.load(Ordering::Relaxed) + DRAIN_KEEPALIVE_LINGER.as_millis() as u64
}

/// Who may touch a connection's [`Conn`] now (its [`Entry::state`]).
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ConnState {
    /// Parked in the epoll set: whoever claims it, a serving thread woken
    /// for it or the main thread sweeping, owns it.
    Idle = 0,
    /// A serving thread owns it.
    Busy = 1,
    /// The main thread took it to close it or hand it to a sibling.
    Closing = 2,
}

/// A [`ConnState`] shared between threads. A claim is a compare-and-swap
/// from `Idle`, so exactly one thread wins a parked connection.
struct AtomicConnState(AtomicU8);

impl AtomicConnState {
    const fn new(s: ConnState) -> AtomicConnState {
        AtomicConnState(AtomicU8::new(s as u8))
    }

    fn load(&self) -> ConnState {
        match self.0.load(Ordering::Acquire) {
            0 => ConnState::Idle,
            1 => ConnState::Busy,
            _ => ConnState::Closing,
        }
    }

    /// Gives the connection up (to `Idle`): what was written to it before
    /// is seen by whoever claims it next.
    fn store(&self, s: ConnState) {
        self.0.store(s as u8, Ordering::Release);
    }

    /// Takes an `Idle` connection as `to`; false if another thread has it.
    fn claim(&self, to: ConnState) -> bool {
        self.0.compare_exchange(ConnState::Idle as u8, to as u8, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }
}

/// How much of a request a parked connection holds (its [`Entry::begun`]),
/// which says what a hand-over to a sibling must carry with it.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Begun {
    /// Nothing of a request is buffered.
    Not = 0,
    /// A request's first bytes are buffered.
    Request = 1,
    /// The first bytes of a new connection are buffered, and a PROXY header
    /// may be among them (or still to come).
    BeforeProxy = 2,
    /// A FastCGI request is under way, its records so far taken into the
    /// connection's state (which [`Entry::resume`] encodes again).
    FastCgi = 3,
}

/// A [`Begun`] the main thread reads while the connection is parked.
struct AtomicBegun(AtomicU8);

impl AtomicBegun {
    const fn new(b: Begun) -> AtomicBegun {
        AtomicBegun(AtomicU8::new(b as u8))
    }

    fn load(&self) -> Begun {
        match self.0.load(Ordering::Relaxed) {
            1 => Begun::Request,
            2 => Begun::BeforeProxy,
            3 => Begun::FastCgi,
            _ => Begun::Not,
        }
    }

    fn store(&self, b: Begun) {
        self.0.store(b as u8, Ordering::Relaxed);
    }
}

/// What the master hands a freshly forked worker.
pub struct WorkerCtx {
    pub config: Config,
    /// This worker's `--max-requests`, jitter included.
    pub max_requests: Option<u64>,
    /// (listening fd, facts for the environ), inherited from the master.
    pub listeners: Vec<(RawFd, ListenerInfo)>,
    pub slot: usize,
    /// The how-manyth worker the master started (from 1).
    pub age: u64,
    pub scoreboard: Scoreboard,
    /// The master's pid, taken before the fork: a master that dies while
    /// the worker loads the app must not leave the reaper in its place.
    pub master: libc::pid_t,
    /// The access log as the master had it open at the fork, for when the
    /// worker cannot open the file itself.
    pub access_sink: Option<Sink>,
    /// Workers of the program this master re-executed from serve on (until
    /// this one's are ready): the code they run loaded.
    pub previous_program_serves: bool,
}

/// The part of a connection other threads may look at: the main thread
/// reads it to expire idle connections and to drain.
struct Entry {
    fd: RawFd,
    state: AtomicConnState,
    /// Monotonic ms after which an idle connection is closed; 0 = none.
    deadline: AtomicU64,
    /// No request has started on it yet. A drain closes idle keep-alive
    /// connections, but a new one is waiting for its first request, which
    /// the client has already committed to this server: it is served.
    fresh: AtomicBool,
    /// Counted among the worker's promised connections (see
    /// [`accept::promise`]): new, parked for its first request.
    promising: AtomicBool,
    /// When it was accepted (monotonic ms), while `promising`.
    promised_at: AtomicU64,
    /// Monotonic ms when it was last parked between two requests: how long
    /// a kept-alive connection has been idle, for [`upkeep::reclaim_idle`].
    parked_at: AtomicU64,
    /// Parked between two requests with nothing buffered: a draining worker
    /// may hand it to a sibling as it is.
    between: AtomicBool,
    /// Parked with nothing of it read into this process (an empty buffer,
    /// no FastCGI request begun, no PROXY header taken before a first
    /// request): a worker whose every thread is stuck past --timeout hands
    /// it to a sibling as it is, the bytes waiting in the socket with it.
    untouched: AtomicBool,
    /// Parked with the start of a request read into this process (a head
    /// waiting for its small body, a head in part) and all of it still in
    /// the buffer, at most what a hand-over carries: a worker whose every
    /// thread is stuck hands it to a sibling with those bytes.
    begun: AtomicBegun,
    /// With [`Begun::FastCgi`]: the records that resume its request, ahead of
    /// the buffer (see [`crate::gateway::fcgi_resume`]).
    resume: Mutex<Vec<u8>>,
    /// Handed to a sibling by the sweeper: this process's copy of the
    /// descriptor only waits to be closed, and counts for nothing.
    handed: AtomicBool,
    /// Parked with its head whole and its small body being read ahead of the
    /// app: past its deadline the sweeper answers 408 before it shuts the
    /// connection, as the app's read of a larger body that stalls does.
    body_ahead: AtomicBool,
    /// The sweeper sent that 408: the thread that closes the connection
    /// gives it its log and access-log lines.
    answered_slow: AtomicBool,
    /// The connection's buffers, for the sweeper to take the bytes of a
    /// begun request when it hands it over.
    io: std::sync::Weak<Mutex<Io>>,
    /// The listener it came from, for a hand-over by the sweeper.
    listener: AtomicUsize,
    /// The client a PROXY header named: it goes with the connection when a
    /// draining worker hands it to a sibling.
    proxy_client: std::sync::OnceLock<std::net::SocketAddr>,
}

/// A connection, owned by whichever thread epoll handed it to.
struct Conn {
    entry: Arc<Entry>,
    slot: usize,
    io: Arc<Mutex<Io>>,
    head: Head,
    listener: usize,
    /// REMOTE_ADDR and REMOTE_PORT: the socket's peer, or the client its
    /// PROXY header named.
    remote_addr: String,
    remote_port: String,
    /// The socket's peer (empty on unix sockets): whose X-Forwarded-Proto
    /// counts is judged on it, as gunicorn does, not on a PROXY client.
    peer_addr: String,
    /// Monotonic ms when the first byte of the current request arrived.
    request_started: u64,
    /// Bytes of the buffer an incomplete HTTP head had when last looked at.
    parsed_upto: usize,
    /// The buffered HTTP head is complete and its small body is being read
    /// ahead: body bytes never end a head, so `worth_parsing` would not look
    /// at the buffer again.
    head_ready: bool,
    /// Monotonic ms when the head of the request whose small body is read
    /// ahead was complete (0: none): the access log's request time counts
    /// from there, as gunicorn's does, the wait for that body included.
    head_done: u64,
    /// FastCGI state between records (FastCGI listeners only).
    fcgi: FcgiConn,
    /// The descriptor is in the worker's epoll set (it has been parked once),
    /// with this box's address as its token (a box never moves).
    registered: bool,
    /// Registered edge-triggered, so it stays armed between requests: a
    /// kept-alive connection (HTTP, FastCGI) of a worker with one thread.
    edge: bool,
    /// The event that handed this connection over said the peer closed or
    /// failed. Under edge triggering that is said once: a read that takes
    /// the last request bytes does not see the end of stream behind them.
    hung_up: bool,
    /// Handed over by a sibling, whose app may have forked a child that
    /// still holds a copy of the descriptor (see `close`).
    handed_in: bool,
    /// A new HTTP connection with `--proxy-protocol` whose first bytes have
    /// not been looked at yet: they may be a PROXY header naming the client.
    proxy_pending: bool,
    /// What this connection's incomplete HTTP head adds to HEAD_BYTES.
    head_charge: HeadCharge,
}

/// Connections whose finished responses a pass holds back, each with
/// whether it stays open afterwards (see [`Held`]).
type HeldList = Vec<(Box<Conn>, bool)>;

/// A connection a thread is serving a request on: its descriptor, state and
/// protocol, and its access log line's makings (with an access log).
type Serving = (RawFd, Arc<Mutex<Io>>, Protocol, Option<Box<LogNote>>);

struct Shared<A: App> {
    app: A,
    access: Option<AccessLog>,
    config: Config,
    max_requests: Option<u64>,
    /// Per thread: the connection of the request it is serving, so the main
    /// thread can answer 504 for it when it runs past `--timeout`.
    current: Vec<Mutex<Option<Serving>>>,
    /// Per thread: its current request was timed out.
    timed_out: Vec<AtomicBool>,
    /// Per thread: it is in a pass over ready events (out of epoll_wait),
    /// and may own connections no other thread sees. After a crash the
    /// worker leaves only once the other threads are out of their passes:
    /// one reading a request, or between two on a kept connection, would
    /// have its connection closed under it, and what the front end sent on
    /// it lost.
    in_pass: Vec<AtomicBool>,
    /// Per listener: TCP_NODELAY is set on it, and so on what it accepts.
    nodelay_inherited: Vec<bool>,
    /// What `accept::ready_sibling` last found, and when (see there).
    ready_sibling: AtomicU64,
    /// Requests timed out and not yet returned from the app.
    stuck: AtomicUsize,
    listeners: Vec<(RawFd, ListenerInfo)>,
    epfd: RawFd,
    registry: Mutex<Registry>,
    /// Threads between accept(2) and registering what it returned: a
    /// connection the registry does not count yet.
    accepting: AtomicUsize,
    scoreboard: Scoreboard,
    slot: usize,
    /// The master's pid, which names the inboxes of this pool's workers.
    master: libc::pid_t,
    /// This worker's inbox for connections handed over by siblings.
    inbox: Option<std::os::fd::OwnedFd>,
    /// Registry entries handed to a sibling and not closed here yet.
    handed: AtomicUsize,
    /// The offload thread (None only if it could not be set up).
    offload: Option<Offload>,
    /// Connections that gave up their turn (None only if it could not be set up).
    turns: Option<Turns>,
    /// Per thread: the connections whose responses its current pass holds
    /// (see [`Held`]). Shared, so that when the thread is stuck past
    /// --timeout or crashed the main thread can park them for a sibling.
    held: Vec<Mutex<HeldList>>,
}

/// Connections with pipelined requests still buffered that gave up their
/// turn to serve them (after [`TURN_REQUESTS`] or [`TURN_MS`]), waiting to be
/// taken again as the serving threads get to the `wake` event, after the
/// other work ready before it. A connection waits here, not in epoll, since
/// its next requests are in its buffer, of which epoll knows nothing.
struct Turns {
    /// An eventfd, in the serving threads' epoll set under [`YIELDED_TOKEN`].
    wake: OwnedFd,
    queue: Mutex<std::collections::VecDeque<Box<Conn>>>,
}

impl Turns {
    fn new(serving: RawFd) -> io::Result<Turns> {
        // Edge-triggered: each write wakes one pass, which takes one
        // connection and writes again if more wait.
        let wake = eventfd_in(serving, libc::EPOLLIN | libc::EPOLLET, YIELDED_TOKEN)?;
        Ok(Turns { wake, queue: Mutex::new(std::collections::VecDeque::new()) })
    }
}

/// The thread that sends the rest of a file response the client's socket
/// could not take at once (uWSGI's offload threads), as the client reads
/// it: a serving thread that waited instead would serve no one else for
/// as long as the slowest client takes, and a worker has one by default.
/// Serving threads hand it a download through `queue` and wake it with
/// `wake`; it owns the connection until the file went out (or the client
/// failed or stalled), then hands it back through `done`, waking a serving
/// thread with `done_wake`. That thread completes the request as any other
/// (the framing's end, what is left of the request body, the log line,
/// metrics) and serves what the connection brings next.
struct Offload {
    epfd: OwnedFd,
    /// An eventfd, in `epfd` under [`OFFLOAD_WAKE`].
    wake: OwnedFd,
    queue: Mutex<Vec<Offloaded>>,
    /// An eventfd, in the serving threads' epoll set under [`OFFLOADED_TOKEN`].
    done_wake: OwnedFd,
    done: Mutex<std::collections::VecDeque<Offloaded>>,
    /// Downloads the offload thread is sending: a worker whose serving
    /// threads are all stuck past --timeout waits for them before it leaves.
    sending: AtomicUsize,
}

/// The offload thread's token for its eventfd; other tokens index its downloads.
const OFFLOAD_WAKE: u64 = u64::MAX;

/// A download the offload thread finishes.
struct Offloaded {
    conn: Box<Conn>,
    rest: Download,
    /// Bytes sent when the socket last took some, and when (mono ms): a
    /// client that takes nothing for the write timeout is given up on.
    sent: u64,
    progress: u64,
    /// What the socket held that the client had not taken at `progress`
    /// (-1: unknown): the kernel says writable only once a third of the send
    /// buffer is free, which a client reading slowly but steadily from a
    /// large buffer may take longer than the timeout to free, while what it
    /// reads meanwhile shows here.
    queued: i32,
    /// Why the client could not take the rest (the socket's error), for the
    /// request's log line, as a streamed response cut short has one.
    gone: Option<String>,
    /// The client took nothing for the write timeout: the bytes sent, for
    /// the request's log line.
    stalled: Option<u64>,
}

/// What is left of a response whose file the socket could not take at
/// once, with the request it answers (for its log line and metrics).
struct Download {
    transfer: Transfer,
    bytes: Bytes,
    params: Option<CgiParams>,
    started: Instant,
    /// Its download slot in the scoreboard, if one was free.
    shown: Option<usize>,
}

/// How a request ended on its serving thread.
enum Outcome {
    /// Answered; whether the connection may carry another request.
    Done(bool),
    /// Answered in part: the rest of a file goes out as the client reads it.
    Offload(Download),
}

#[derive(Default)]
struct Registry {
    entries: Vec<Option<Arc<Entry>>>,
    free: Vec<usize>,
    live: usize,
    /// The most connections held at once since memory was last given back
    /// (see [`trim_after_closes`]): counted here, since a wave can come and
    /// go between two looks of the main loop.
    peak: usize,
}

/// This process's scoreboard slot, for [`note_exception`].
static SLOT: Mutex<Option<(Scoreboard, usize)>> = Mutex::new(None);

/// Records the text of an exception the app raised (shown in `/stats`).
pub fn note_exception(text: &str) {
    if let Some((sb, slot)) = *SLOT.lock().unwrap_or_else(|p| p.into_inner()) {
        sb.set_error(slot, text);
    }
}

/// Runs a worker until it is told to stop; returns the process exit code.
/// Call on the process's only thread, right after fork and app loading.
pub fn run_worker<A: App>(app: A, ctx: WorkerCtx) -> i32 {
    let prepared = PREPARED_SIGNALS.lock().unwrap_or_else(|p| p.into_inner()).take();
    let signals = match prepared.map_or_else(|| WorkerSignals::install(ctx.config.sigint), Ok) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    // The app has loaded since the handlers went in.
    restore_own_handlers();
    if !crate::crash::installed() {
        crate::crash::install(|| false);
    }
    log_panics();
    tune_allocator();
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        error!("epoll_create1: {}", io::Error::last_os_error());
        return 1;
    }
    // Set on a TCP listener, TCP_NODELAY is inherited by the connections
    // it accepts (Linux copies it into each), which then need no setsockopt
    // of their own: one system call less for every connection of a front end
    // that opens one per request. Set here, in every worker, because a
    // listener may come from elsewhere (systemd, fd://N, the master before a
    // re-exec) without it.
    let nodelay_inherited: Vec<bool> =
        ctx.listeners.iter().map(|(fd, info)| !info.is_unix && set_nodelay(*fd)).collect();
    for (i, (fd, _)) in ctx.listeners.iter().enumerate() {
        let mut ev =
            libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32, u64: i as u64 };
        if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, *fd, &mut ev) } < 0 {
            error!("epoll_ctl on listener: {}", io::Error::last_os_error());
            return 1;
        }
    }
    let master = ctx.master;
    let inbox = match crate::handover::bind_inbox(master) {
        Ok(fd) => {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: INBOX_TOKEN };
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } < 0 {
                warn!("epoll_ctl on the hand-over inbox: {}", io::Error::last_os_error());
                None
            } else {
                Some(fd)
            }
        }
        // The master said why at its start, once for every worker.
        Err(e) if !crate::handover::dir_ready() => {
            debug!("no inbox for connections other workers hand over: {e}");
            None
        }
        Err(e) => {
            warn!(
                "cannot open the inbox for connections other workers hand over when they drain: {e}; \
                 a draining worker closes them instead"
            );
            None
        }
    };
    watch_app_forks(ctx.listeners.iter().map(|(fd, _)| *fd).chain(inbox.as_ref().map(|fd| fd.as_raw_fd())));
    let threads = ctx.config.threads.max(1);
    // Every worker accepts from the same listeners, so the application as a
    // whole takes as many concurrent requests as the pool can grow to hold.
    let pool = ctx.config.workers_max.unwrap_or(ctx.config.workers).max(1);
    gateway::MAX_REQS.store(pool * threads, Ordering::Relaxed);
    gateway::MAX_CONNS.store(pool.saturating_mul(ctx.config.max_connections), Ordering::Relaxed);
    *SLOT.lock().unwrap_or_else(|p| p.into_inner()) = Some((ctx.scoreboard, ctx.slot));
    // Opened by name, so that a worker started after logrotate writes to
    // the new file even if the master could not reopen it.
    let access = match &ctx.config.access_log {
        Some((target, format)) => match (Sink::open(target), ctx.access_sink) {
            (Ok(sink), _) => Some(AccessLog::new(format.clone(), sink, threads)),
            (Err(e), Some(inherited)) => {
                error!("{e}; writing to the file the master has open instead");
                Some(AccessLog::new(format.clone(), inherited, threads))
            }
            (Err(e), None) => {
                error!("{e}");
                return 1;
            }
        },
        None => None,
    };
    let offload = match Offload::new(epfd) {
        Ok(o) => Some(o),
        Err(e) => {
            warn!("cannot set up the offload thread, so a slow download holds its serving thread: {e}");
            None
        }
    };
    let turns = match Turns::new(epfd) {
        Ok(t) => Some(t),
        Err(e) => {
            warn!("cannot set up turns between connections, so a client pipelining without end holds its thread: {e}");
            None
        }
    };
    let mut config = ctx.config;
    // A worker started after a deploy serves the files of the release it
    // switched to, as its app does.
    config.static_mounts.iter_mut().for_each(crate::static_files::Mount::refresh);
    // Only --timeout reads them: without it, a wait on a client costs nothing more.
    if config.timeout.is_some() {
        let _ = CLIENT_WAITS.set((0..threads).map(|_| ClientWait::default()).collect());
    }
    let shared = Arc::new(Shared {
        app,
        access,
        max_requests: ctx.max_requests,
        current: (0..threads).map(|_| Mutex::new(None)).collect(),
        timed_out: (0..threads).map(|_| AtomicBool::new(false)).collect(),
        in_pass: (0..threads).map(|_| AtomicBool::new(false)).collect(),
        ready_sibling: AtomicU64::new(0),
        nodelay_inherited,
        stuck: AtomicUsize::new(0),
        config,
        listeners: ctx.listeners,
        epfd,
        registry: Mutex::new(Registry::default()),
        accepting: AtomicUsize::new(0),
        scoreboard: ctx.scoreboard,
        slot: ctx.slot,
        master,
        inbox,
        handed: AtomicUsize::new(0),
        offload,
        turns,
        held: (0..threads).map(|_| Mutex::new(Vec::with_capacity(HOLD_CONNS))).collect(),
    });
    let probe = shared.clone();
    let _ = HAND_OVER_PROBE.set(Box::new(move || can_hand_over(&probe)));
    // Without the flusher nothing is held back: every write goes out at once.
    let holders: Vec<Option<_>> = match crate::flusher::start(threads) {
        Ok(h) => h.into_iter().map(Some).collect(),
        Err(e) => {
            warn!("cannot start the flusher thread, so every response is written on its own: {e}");
            vec![None; threads]
        }
    };
    if shared.config.reload_on_rss.is_some() {
        FRESH_RSS.store(rss_bytes(), Ordering::Relaxed);
    }
    // Every thread is started before the worker says it is ready (one that
    // cannot start, for want of threads under a pids limit, fails the boot
    // rather than the ready worker a reload retires its predecessor for),
    // and held until then: none may accept before, since the master kills
    // a replacement still booting outright (a reload that supersedes it),
    // which must not take a connection with it.
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let stack = app_stack_size();
    for (t, holder) in holders.into_iter().enumerate() {
        let s = shared.clone();
        let gate = gate.clone();
        let spawned =
            std::thread::Builder::new().name(format!("corral-{t}")).stack_size(stack).spawn(move || {
                let (open, opened) = &*gate;
                drop(opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
                or_exit(|| thread_main(&s, t, holder))
            });
        if let Err(e) = spawned {
            error!(
                "Worker {} cannot start its serving thread {} of {threads}: {e}; lower --threads, or raise the \
                 limit on threads or address space (ulimit -u or -v, systemd's TasksMax, a container's pids limit)",
                shared.slot,
                t + 1
            );
            return 1;
        }
    }
    if shared.offload.is_some() {
        let s = shared.clone();
        if let Err(e) = std::thread::Builder::new().name("corral-offload".into()).spawn(move || {
            crate::crash::enter_own();
            or_exit(|| offload_main(&s))
        }) {
            error!("Worker {} cannot start its offload thread: {e}", shared.slot);
            return 1;
        }
    }
    // Said first: the master, seeing every worker ready, may tell a waiting
    // `-D` command so before this line would otherwise be in the log.
    info!("Worker ready: pid={} threads={}", std::process::id(), threads);
    shared.scoreboard.beat(shared.slot, mono_ms());
    shared.scoreboard.set_state(shared.slot, WorkerState::Ready);
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    check_descriptors_left();
    crate::crash::take_app_thread_crashes(true);
    let code = or_exit(|| main_loop(&shared, &signals));
    crate::crash::take_app_thread_crashes(false);
    // However the loop ended, a crashed worker runs nothing more (the
    // embedding's exit would wait for the lock the crashed thread may
    // hold) and dies of its signal.
    if let Some(c) = crate::crash::crashed() {
        crate::crash::die(c);
    }
    // The note saying how many lines a stalled log reader cost would come
    // with this process's next line, which it will not write: the master
    // says it instead, once this worker has exited.
    let dropped = crate::logfile::take_dropped() + shared.access.as_ref().map_or(0, |a| a.take_dropped());
    if dropped > 0 {
        shared.scoreboard.count(shared.slot, crate::scoreboard::C_LOG_DROPPED, dropped);
    }
    code
}

/// Says so when the worker's own descriptors (listeners, the epoll set,
/// pipes, logs, the app's files) leave none of the open files limit for a
/// connection: accepts would fail for good, and the shortage lines that
/// follow would not say why.
fn check_descriptors_left() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return;
    }
    // A new descriptor takes the lowest free number: none is free below the
    // limit when the listing itself cannot open, or when (its own counted
    // out) every number below the limit is taken.
    let full = match std::fs::read_dir("/proc/self/fd") {
        Err(e) => e.raw_os_error() == Some(libc::EMFILE),
        Ok(dir) => {
            let below = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                .filter(|&fd| fd < limit.rlim_cur)
                .count();
            below.saturating_sub(1) as u64 >= limit.rlim_cur
        }
    };
    if full {
        error!(
            "This worker's own descriptors (listeners, pipes, logs, the app's files) fill the open files limit \
             ({}, `ulimit -n`; LimitNOFILE= under systemd): it cannot accept a connection; raise the limit: \
             pid={}",
            limit.rlim_cur,
            std::process::id()
        );
    }
}

/// Above this size glibc's malloc maps a block of its own (and unmaps it
/// when freed); below it, blocks come from the thread's heap.
const MMAP_THRESHOLD: libc::c_int = 4 * 1024 * 1024;
/// Free memory at the top of a heap that malloc keeps rather than hands back.
const TRIM_THRESHOLD: libc::c_int = 2 * MMAP_THRESHOLD;

/// Stops glibc handing a serving thread's heap back to the kernel after
/// every few requests. A request's buffers (64 KiB for reading alone) are
/// freed when it ends, which leaves more than glibc's default 128 KiB free
/// at the top of a thread's heap; malloc then returns it with
/// madvise(MADV_DONTNEED), a TLB flush, and the next request faults the
/// pages back in: one madvise per 16 requests on a small app over HTTP.
/// These are the values glibc's own sliding thresholds reach once a 4 MiB
/// block has been freed; setting them fixes them from the start. A worker
/// keeps at most TRIM_THRESHOLD of free memory per heap in return.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Connections closed since the most this worker held at once, after which
/// the free memory in every heap goes back to the kernel (or half of
/// --max-connections, when that is fewer: a worker can never close more
/// than it holds).
const TRIM_AFTER_CLOSES: usize = 256;

/// Gives free memory back after a wave of connections has gone. Each
/// connection's first read takes a 64 KiB buffer, held until its request
/// head is complete: thousands of clients that sent part of a head (a scan,
/// a slowloris attack) leave that much free in the middle of the threads'
/// heaps once they close, which no trim threshold returns (only the top of
/// a heap is), and the next wave lands elsewhere: the resident size grew
/// by 30 MB a wave of 10,000 and never came down.
fn trim_after_closes<A: App>(w: &Shared<A>) {
    let after = TRIM_AFTER_CLOSES.min(w.config.max_connections / 2).max(1);
    let wave_gone = {
        let mut reg = w.registry.lock().unwrap();
        let gone = reg.peak - reg.live >= after;
        if gone {
            reg.peak = reg.live;
        }
        gone
    };
    if wave_gone {
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Connections served in one pass over the ready ones whose finished
/// responses are held back, each with whether it stays open afterwards.
///
/// Writing a response to a client process that sleeps in epoll_wait costs
/// the writer the wake-up of that process: on a small request that is a
/// tenth of the server's time. Writing the responses of a pass back to back
/// wakes a client once for several of them, as bjoern's event loop does.
/// Only whole responses (or a response's tail once the app returned) are
/// held, and the flusher writes them within its HOLD if this thread is
/// still busy with a slow app call by then. Only a worker with one thread
/// holds responses: with several, each takes one ready connection at a
/// time. Gathered blocks of a streamed body are held with any number. The
/// connections themselves are listed where the main thread can take them
/// ([`rescue_held`]) if the next app call of the pass never returns.
struct Held {
    /// The serving thread: its list is `Shared::held[t]`.
    t: usize,
    /// How many connections this pass listed (the list itself may have been
    /// emptied by `rescue_held` meanwhile).
    listed: usize,
    /// The list taken out to release, kept for its allocation.
    spare: HeldList,
    holder: Option<Arc<crate::flusher::Holder>>,
}

impl Held {
    fn new(t: usize, holder: Option<Arc<crate::flusher::Holder>>) -> Held {
        if let Some(h) = &holder {
            crate::flusher::enter(h.clone());
        }
        Held { t, listed: 0, spare: Vec::with_capacity(HOLD_CONNS), holder }
    }

    /// Parks or closes `conn` now, or after its held bytes were written.
    fn settle<A: App>(&mut self, w: &Shared<A>, conn: Box<Conn>, keep: bool) {
        if conn.io.lock().unwrap().out.is_empty() {
            park_or_close(w, conn, keep);
        } else {
            w.held[self.t].lock().unwrap_or_else(|p| p.into_inner()).push((conn, keep));
            self.listed += 1;
        }
    }

    /// Whether the held responses should go out before the next request:
    /// enough of them, or held for half the flusher's HOLD already (so its
    /// timer fires only when one app call takes that long).
    fn due(&self) -> bool {
        self.listed >= HOLD_CONNS || self.holder.as_ref().is_some_and(|h| h.half_due())
    }

    /// Writes every held response, then parks or closes its connection.
    fn release<A: App>(&mut self, w: &Shared<A>) {
        if self.listed > 0 {
            self.listed = 0;
            std::mem::swap(&mut self.spare, &mut *w.held[self.t].lock().unwrap_or_else(|p| p.into_inner()));
            for (conn, keep) in self.spare.drain(..) {
                let written = {
                    let mut io = conn.io.lock().unwrap();
                    // The flusher may have found the connection broken and
                    // dropped what it held: then there is nothing to flush.
                    io.flush_out(|f| f()).is_ok() && !io.broken
                };
                park_or_close(w, conn, keep && written);
            }
        }
        if let Some(h) = &self.holder {
            h.pass_over();
        }
    }
}

/// Takes from thread `t`, which is stuck past --timeout or crashed, the
/// connections whose responses its pass held: the flusher has written
/// those responses, but the thread would never park the connections, so
/// their next requests would go unread and be lost with the worker. Parked
/// here, they go to a sibling with the rest (see `sweep`). A response the
/// client has not taken by now (a flusher's HOLD is long past) closes its
/// connection, as this thread must not wait on a client. `wait` is false
/// after a crash, which may have come inside the list's lock.
fn rescue_held<A: App>(w: &Shared<A>, t: usize, wait: bool) {
    // Held while they are parked: should the thread come back from its app
    // call meanwhile, its `release` waits here, so it cannot take an epoll
    // event for one of them (armed, edge-triggered) while this thread still
    // owns it.
    let mut list = match wait {
        true => w.held[t].lock().unwrap_or_else(|p| p.into_inner()),
        false => match w.held[t].try_lock() {
            Ok(list) => list,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        },
    };
    for (conn, keep) in list.drain(..) {
        let written = {
            let mut io = conn.io.lock().unwrap_or_else(|p| p.into_inner());
            io.flush_held_nowait();
            io.out.is_empty() && !io.broken
        };
        park_or_close(w, conn, keep && written);
    }
}

fn park_or_close<A: App>(w: &Shared<A>, conn: Box<Conn>, keep: bool) {
    // A lingering HTTP connection (see drain_and_close) waits in epoll for
    // its client to finish sending.
    let lingers =
        || w.listeners[conn.listener].1.protocol == Protocol::Http && conn.io.lock().unwrap().lingering;
    if keep || lingers() {
        park(w, conn);
    } else {
        close(w, conn, false);
    }
}

fn thread_main<A: App>(w: &Shared<A>, t: usize, holder: Option<Arc<crate::flusher::Holder>>) {
    let mut state = w.app.thread_start(t);
    SERVING_THREAD.with(|s| s.set(t));
    // With several threads, take one event at a time so a slow request never
    // holds other ready connections hostage on this thread.
    let batch = if w.config.threads > 1 { 1 } else { 64 };
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; batch];
    let mut held = Held::new(t, holder);
    crate::crash::enter_serving(t);
    loop {
        w.in_pass[t].store(false, Ordering::SeqCst);
        let n = unsafe { libc::epoll_wait(w.epfd, events.as_mut_ptr(), batch as i32, -1) };
        // Before it looks for a crash, so that a main thread that found it
        // out of its pass after the crash knows it will take nothing more.
        w.in_pass[t].store(true, Ordering::SeqCst);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("epoll_wait: {e}");
            return;
        }
        for ev in &events[..n as usize] {
            if crate::crash::crashed().is_some() {
                after_crash(w, t, &mut held);
            }
            let token = ev.u64;
            if token == INBOX_TOKEN {
                take_handed_over(w, &mut state, t, &mut held);
            } else if token == OFFLOADED_TOKEN {
                take_offloaded(w, &mut state, t, &mut held);
            } else if token == YIELDED_TOKEN {
                take_turn(w, &mut state, t, &mut held);
            } else if token < LISTENER_TOKENS {
                accept_batch(w, &mut state, t, token as usize, &mut held);
            } else {
                // SAFETY: any other token is a `Box<Conn>` that `park` leaked
                // into the epoll set, and epoll names it to one thread once
                // until `park` leaks it again: it is one-shot with several
                // threads, and with one thread no other can be woken. Only
                // the thread woken for it frees it (the sweeper shuts the
                // socket down, which wakes one), and a box freed while still
                // armed was taken out of the set first (see `close`).
                let mut conn = unsafe { Box::from_raw(token as *mut Conn) };
                conn.hung_up = ev.events & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                serve(w, &mut state, t, conn, &mut held);
                if held.due() {
                    held.release(w);
                }
            }
        }
        held.release(w);
        // The lines of this pass's requests go out before the thread waits
        // again: a worker that dies (an app calling os._exit, a crash in C)
        // loses at most the lines of the pass it died in. With one thread
        // one write covers a whole pass under load; with several a pass is
        // one request.
        if let Some(log) = &w.access {
            log.flush_thread(t);
        }
    }
}

/// Where a serving thread goes once another one crashed: it writes what it
/// has finished and starts nothing more. The connections it was woken for
/// stay registered, untouched, for the main thread to hand over.
fn after_crash<A: App>(w: &Shared<A>, t: usize, held: &mut Held) -> ! {
    held.release(w);
    if let Some(log) = &w.access {
        log.flush_thread(t);
    }
    w.in_pass[t].store(false, Ordering::SeqCst);
    loop {
        std::thread::park();
    }
}

/// Set once the app has forked (a `pthread_atfork` handler, in the parent):
/// from then on a connection is shut down before it is closed, since a
/// child may hold a copy of its descriptor, and a close alone would then
/// neither end it for the client (a body that ends with the connection
/// would never end) nor free it until the child exits.
static APP_FORKED: AtomicBool = AtomicBool::new(false);

/// The descriptors a child the app forks closes at once (the listeners, the
/// hand-over inbox): one that lived on would hold the server's port after
/// the server stopped, and take connections nobody answers. Set once before
/// the app is called; a `OnceLock` is read without a lock, which the child's
/// handler may not take (another thread may have held it at the fork).
static CLOSE_IN_CHILD: std::sync::OnceLock<Box<[RawFd]>> = std::sync::OnceLock::new();

/// Set in a child the app forked: a load per request, where asking for the
/// pid would be a system call.
static IN_FORKED_CHILD: AtomicBool = AtomicBool::new(false);

/// Whether this process is a child the app forked from a worker (one that
/// returns from the app must not answer on the worker's connection).
pub fn in_forked_child() -> bool {
    IN_FORKED_CHILD.load(Ordering::Relaxed)
}

extern "C" fn app_forked_parent() {
    APP_FORKED.store(true, Ordering::Relaxed);
}

extern "C" fn app_forked_child() {
    IN_FORKED_CHILD.store(true, Ordering::Relaxed);
    for &fd in CLOSE_IN_CHILD.get().map_or(&[][..], |fds| &fds[..]) {
        unsafe { libc::close(fd) };
    }
    // The worker's handlers only note a signal for the worker's main
    // thread, which the child does not have: TERM from multiprocessing's
    // terminate(), or from whoever stops it, would be lost. The child takes
    // them as a program the app runs does (exec resets handlers). HUP,
    // TTIN, TTOU and WINCH keep the handler that only notes them: sent to the
    // whole group, they are the master's.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2] {
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// Registers what a fork by the app does with the worker's descriptors.
fn watch_app_forks(fds: impl Iterator<Item = RawFd>) {
    let _ = CLOSE_IN_CHILD.set(fds.collect());
    unsafe { libc::pthread_atfork(None, Some(app_forked_parent), Some(app_forked_child)) };
}

/// The exit code of a worker that ended on a panic (sysexits' EX_SOFTWARE).
pub const EXIT_PANIC: i32 = 70;

/// Puts a panic's message and place in the log, wherever it happens (one
/// in a call from Python becomes a Python exception there).
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        error!("Panic on thread {}: {info}", std::thread::current().name().unwrap_or("main"));
    }));
}

/// Runs one of the worker's threads, and ends the worker if a panic
/// unwinds out of it. Left alone, it would end only its thread, silently:
/// with one thread, a worker the master counts as ready and that serves
/// nothing; with several, one thread fewer and its request unanswered, and
/// locks it held poisoned for the others. Ended, the worker is replaced
/// like any worker that dies, and the master's log names what it was
/// serving.
pub(crate) fn or_exit<T>(f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            error!("The worker exits (code {EXIT_PANIC}) after that panic, to be replaced");
            unsafe { libc::_exit(EXIT_PANIC) }
        }
    }
}

/// The stack a serving thread gets when the soft RLIMIT_STACK is unlimited:
/// glibc's default for new threads on x86-64 then.
const DEFAULT_APP_STACK: usize = 8 << 20;

/// The stack of a serving thread, which runs the app: what Python gives its
/// own threads (glibc's default, the soft RLIMIT_STACK). With Rust's 2 MiB,
/// C code that recurses deep, such as `json.dumps` of a deeply nested list
/// under a raised recursion limit, overflowed it and killed the worker where
/// a Python thread has room.
fn app_stack_size() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return DEFAULT_APP_STACK;
    }
    // Within what a 64-bit address space takes many of without thought.
    (lim.rlim_cur as usize).clamp(2 << 20, 1 << 30)
}
