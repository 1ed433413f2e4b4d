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

const IDLE: u8 = 0;
const BUSY: u8 = 1;
const CLOSING: u8 = 2;

/// [`Entry::begun`]: nothing of a request is buffered.
const NOT_BEGUN: u8 = 0;
/// [`Entry::begun`]: a request's first bytes are buffered.
const BEGUN: u8 = 1;
/// [`Entry::begun`]: the first bytes of a new connection are buffered, and
/// a PROXY header may be among them (or still to come).
const BEGUN_BEFORE_PROXY: u8 = 2;
/// [`Entry::begun`]: a FastCGI request is under way, its records so far
/// taken into the connection's state (which [`Entry::resume`] encodes again).
const BEGUN_FASTCGI: u8 = 3;

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
}

/// The part of a connection other threads may look at: the main thread
/// reads it to expire idle connections and to drain.
struct Entry {
    fd: RawFd,
    state: AtomicU8,
    /// Monotonic ms after which an idle connection is closed; 0 = none.
    deadline: AtomicU64,
    /// No request has started on it yet. A drain closes idle keep-alive
    /// connections, but a new one is waiting for its first request, which
    /// the client has already committed to this server: it is served.
    fresh: AtomicBool,
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
    /// thread is stuck hands it to a sibling with those bytes. One of
    /// [`NOT_BEGUN`], [`BEGUN`], [`BEGUN_BEFORE_PROXY`], [`BEGUN_FASTCGI`].
    begun: AtomicU8,
    /// With [`BEGUN_FASTCGI`]: the records that resume its request, ahead of
    /// the buffer (see [`crate::gateway::fcgi_resume`]).
    resume: Mutex<Vec<u8>>,
    /// Handed to a sibling by the sweeper: this process's copy of the
    /// descriptor only waits to be closed, and counts for nothing.
    handed: AtomicBool,
    /// Parked with its head whole and its small body being read ahead of the
    /// app: past its deadline the sweeper answers 408 before it shuts the
    /// connection, as the app's read of a larger body that stalls does.
    body_ahead: AtomicBool,
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
    for (i, (fd, _)) in ctx.listeners.iter().enumerate() {
        let mut ev =
            libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32, u64: i as u64 };
        if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, *fd, &mut ev) } < 0 {
            error!("epoll_ctl on listener: {}", io::Error::last_os_error());
            return 1;
        }
    }
    let master = unsafe { libc::getppid() };
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
    let access = match &ctx.config.access_log {
        Some((target, format)) => match Sink::open(target) {
            Ok(sink) => Some(AccessLog::new(format.clone(), sink, threads)),
            Err(e) => {
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
    // Ready before any thread can accept: the master kills a replacement
    // still booting outright (a reload that supersedes it), which must not
    // take a connection with it.
    shared.scoreboard.set_state(shared.slot, WorkerState::Ready);
    info!("Worker ready: pid={} threads={}", std::process::id(), threads);
    let stack = app_stack_size();
    for (t, holder) in holders.into_iter().enumerate() {
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("corral-{t}"))
            .stack_size(stack)
            .spawn(move || or_exit(|| thread_main(&s, t, holder)));
        if let Err(e) = spawned {
            error!("cannot start worker thread: {e}");
            return 1;
        }
    }
    if shared.offload.is_some() {
        let s = shared.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("corral-offload".into())
            .spawn(move || or_exit(|| offload_main(&s)))
        {
            error!("cannot start the offload thread: {e}");
            return 1;
        }
    }
    let code = or_exit(|| main_loop(&shared, &signals));
    // However the loop ended, a crashed worker runs nothing more (the
    // embedding's exit would wait for the lock the crashed thread may
    // hold) and dies of its signal.
    if let Some(c) = crate::crash::crashed() {
        crate::crash::die(c);
    }
    code
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

/// The worker's signal handlers, set up right after the fork by
/// [`prepare_signals`], for [`run_worker`] to take.
static PREPARED_SIGNALS: Mutex<Option<WorkerSignals>> = Mutex::new(None);

/// Sets up a new worker's signals before it loads the app: a stop asked
/// for meanwhile is noted and acted on once the worker runs, and the mask
/// is empty, so programs the app starts while it loads take signals as
/// they should.
pub fn prepare_signals(sigint: SigintMode) -> io::Result<()> {
    let signals = WorkerSignals::install(sigint)?;
    *PREPARED_SIGNALS.lock().unwrap_or_else(|p| p.into_inner()) = Some(signals);
    Ok(())
}

/// The signals whose handlers [`WorkerSignals::install`] sets.
const WORKER_SIGNALS: [libc::c_int; 9] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGWINCH,
];

/// The worker's handlers as installed, to put back if the app replaces them.
static OWN_HANDLERS: Mutex<Vec<(libc::c_int, libc::sigaction)>> = Mutex::new(Vec::new());

/// Puts the worker's signal handlers back where the app, loading, set its
/// own (`signal.signal(SIGTERM, ...)` at import), and says so. A Python
/// handler runs only when the main thread runs Python, which in a worker it
/// never does: the app's handler would not run, and the worker would no
/// longer hear the master's TERM (a reload or stop would wait out
/// --graceful-timeout and kill it).
fn restore_own_handlers() {
    let own = OWN_HANDLERS.lock().unwrap_or_else(|p| p.into_inner());
    let mut replaced = Vec::new();
    for (sig, action) in own.iter() {
        unsafe {
            let mut now: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(*sig, std::ptr::null(), &mut now) == 0
                && now.sa_sigaction != action.sa_sigaction
            {
                libc::sigaction(*sig, action, std::ptr::null_mut());
                replaced.push(crate::supervise::signal_name(*sig));
            }
        }
    }
    if !replaced.is_empty() {
        warn!(
            "The app set its own handler for {}; a worker's signals are the server's (the master's \
             stop, reload and log reopening come that way), so corral's handler is back in place and the \
             app's will not run. To run code as a worker exits, register it with atexit",
            replaced.join(", ")
        );
    }
}

/// The worker left at a quick stop (SIGQUIT, or SIGINT as configured).
static STOPPED_AT_ONCE: AtomicBool = AtomicBool::new(false);

/// Whether this worker's serving ended with a quick stop rather than a
/// graceful one (for gunicorn's `worker_int` hook).
pub fn stopped_at_once() -> bool {
    STOPPED_AT_ONCE.load(Ordering::Relaxed)
}

/// Signals a worker acts on, delivered through a self-pipe so the main
/// thread can wait for them together with its sweep timer.
struct WorkerSignals {
    read_fd: RawFd,
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    /// SIGUSR1: reopen log files (after logrotate renamed them).
    reopen: Arc<AtomicBool>,
}

impl WorkerSignals {
    fn install(sigint: SigintMode) -> io::Result<WorkerSignals> {
        use signal_hook::consts::*;
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let quit = Arc::new(AtomicBool::new(false));
        // The master's table decides, for a signal sent to the whole process
        // group too (Ctrl-C, systemd's KillMode=control-group).
        for sig in [SIGTERM, SIGINT, SIGQUIT] {
            let flag = match crate::supervise::signal_action(sig, sigint) {
                Some(crate::supervise::Action::QuickStop) => &quit,
                _ => &stop,
            };
            signal_hook::flag::register(sig, flag.clone())?;
        }
        let reopen = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(SIGUSR1, reopen.clone())?;
        for sig in [SIGTERM, SIGINT, SIGQUIT, SIGUSR1] {
            // Close-on-exec like the pipe itself: programs the app runs
            // must not inherit the worker's signal pipe.
            let w = unsafe { libc::fcntl(fds[1], libc::F_DUPFD_CLOEXEC, 0) };
            signal_hook::low_level::pipe::register_raw(sig, w)?;
        }
        // Signals meant for the master alone: a worker ignores them rather
        // than die of their default action when a whole group is signalled.
        // With a handler that does nothing, not SIG_IGN: an ignored signal
        // stays ignored in the programs the app runs, a handler does not.
        extern "C" fn ignore(_: libc::c_int) {}
        for sig in [SIGHUP, SIGTTIN, SIGTTOU, SIGWINCH] {
            crate::supervise::set_handler(sig, ignore);
        }
        // From the master's next program, which stops this worker next.
        crate::supervise::set_handler(SIGUSR2, crate::handover::note_superseded);
        unsafe { libc::close(fds[1]) };
        *OWN_HANDLERS.lock().unwrap_or_else(|p| p.into_inner()) = WORKER_SIGNALS
            .iter()
            .filter_map(|&sig| unsafe {
                let mut now: libc::sigaction = std::mem::zeroed();
                (libc::sigaction(sig, std::ptr::null(), &mut now) == 0).then_some((sig, now))
            })
            .collect();
        // The master blocks its signals to read them from a signalfd; a
        // worker runs app code that may start subprocesses, so it takes
        // them with handlers and an unblocked mask instead. Unblocked only
        // now that every handler is in place: the master forwards USR1 (and
        // TERM) to workers as soon as they exist, and one that arrived since
        // the fork is pending here and is delivered at this very call.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        }
        Ok(WorkerSignals { read_fd: fds[0], stop, quit, reopen })
    }

    fn wait(&self, timeout: Duration) {
        crate::exchange::poll_one(self.read_fd, libc::POLLIN, timeout.as_millis() as i32);
        let mut buf = [0u8; 64];
        while unsafe { libc::read(self.read_fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

fn main_loop<A: App>(w: &Shared<A>, signals: &WorkerSignals) -> i32 {
    let mut drain_deadline: Option<u64> = None;
    let born = mono_ms();
    // Ticks in a row with no connection left while draining.
    let mut empty_ticks = 0;
    // Compared with the current parent to notice the master's death (the
    // master may itself be PID 1 in a container, so "parent is 1" is no test).
    let master = unsafe { libc::getppid() };
    // When the main thread took over from a crashed serving thread.
    let mut crash_seen: Option<u64> = None;
    loop {
        signals.wait(SWEEP_INTERVAL);
        if signals.quit.load(Ordering::Relaxed) {
            info!("Worker exiting at once (SIGQUIT): pid={}", std::process::id());
            STOPPED_AT_ONCE.store(true, Ordering::Relaxed);
            if let Some(log) = &w.access {
                log.flush();
            }
            return 0;
        }
        if signals.stop.load(Ordering::Relaxed) && drain_deadline.is_none() {
            drain_deadline = Some(mono_ms() + w.config.graceful_timeout.as_millis() as u64);
            begin_drain(w);
        }
        let now = mono_ms();
        let crash = crate::crash::crashed();
        if let Some(c) = crash {
            match crash_seen {
                None => {
                    crash_seen = Some(now);
                    on_crash(w, c, now);
                }
                // No replacement became ready to take over (its code does
                // not load, say): what this worker holds is lost either way,
                // and it must not hold it for ever.
                Some(at)
                    if drain_deadline.is_none()
                        && now >= at + w.config.graceful_timeout.as_millis() as u64 =>
                {
                    error!(
                        "Worker still not replaced {:.0} s after its crash (--graceful-timeout); exiting with the \
                         connections it holds: pid={}",
                        w.config.graceful_timeout.as_secs_f64(),
                        std::process::id()
                    );
                    crate::crash::die(c);
                }
                Some(_) => {}
            }
        }
        let reopen = signals.reopen.swap(false, Ordering::Relaxed);
        if reopen {
            match crate::logfile::reopen() {
                Ok(true) => info!("Reopened the error log: pid={}", std::process::id()),
                Ok(false) => {}
                Err(e) => error!("{e}"),
            }
        }
        if let Some(log) = &w.access {
            log.flush();
            if reopen {
                match log.reopen() {
                    Ok(()) => info!("Reopened the access log: pid={}", std::process::id()),
                    Err(e) => error!("{e}"),
                }
            }
        }
        if drain_deadline.is_some() {
            adopt_inbox(w);
        }
        if serving_over(w) {
            rescue_turns(w);
        }
        // Looked at before the sweep: a thread out of its pass after the
        // crash takes nothing more, so this sweep sees every connection it
        // will leave here.
        let others_out = crash.is_some_and(|c| {
            (0..w.in_pass.len()).all(|t| {
                t == c.thread
                    || !w.in_pass[t].load(Ordering::SeqCst)
                    || w.timed_out[t].load(Ordering::Acquire)
            })
        });
        let orphans_left = sweep(w, now, idle_linger_over());
        resume_accepting(w, now);
        trim_after_closes(w);
        report_shed(w, now);
        check_timeouts(w, now);
        if !RECYCLING.load(Ordering::Acquire) && drain_deadline.is_none() {
            check_recycle(w, now - born);
        }
        if let Some(deadline) = drain_deadline {
            // `accepting` first: a connection leaves it only once the
            // registry counts it, so none is missed between the two reads.
            let accepting = w.accepting.load(Ordering::SeqCst);
            let live = w.registry.lock().unwrap().live + accepting - w.handed.load(Ordering::Relaxed);
            let stuck = w.stuck.load(Ordering::Acquire);
            // Twice in a row: a thread may have accepted a connection just
            // before the listeners closed and not registered it yet.
            empty_ticks = if live == 0 { empty_ticks + 1 } else { 0 };
            if empty_ticks >= 2 {
                if let Some(log) = &w.access {
                    log.flush();
                }
                let handed = HANDED_OVER.load(Ordering::Relaxed);
                if handed > 0 {
                    info!(
                        "Worker handed {handed} kept-alive connection(s) to other workers: pid={}",
                        std::process::id()
                    );
                }
                info!("Worker stopped gracefully: pid={}", std::process::id());
                return 0;
            }
            if let Some(log) = &w.access {
                log.flush();
            }
            // Downloads the offload thread is sending need no serving thread
            // until they are out: they go on, up to the graceful timeout.
            let sending = w.offload.as_ref().map_or(0, |o| o.sending.load(Ordering::Acquire));
            // A crashed thread holding the interpreter lock: the others
            // can never end their requests.
            // Crashed otherwise, the others have parked once their requests
            // ended, and left what they read between two requests parked
            // for the sweep (see `in_pass`).
            let others_stuck = all_stuck(w) || crash.is_some_and(|c| c.held_lock || others_out);
            if stuck > 0 && sending == 0 && orphans_left == 0 && (live <= stuck || others_stuck) {
                // Only timed-out requests are left, or every thread is in
                // one and the connections held here could never be served:
                // the sweep has handed those it could to a sibling, and what
                // is left (a request this worker had begun to read, or no
                // sibling to take it) is closed now, so that its client
                // retries rather than wait for the graceful timeout. They
                // may hold the GIL for ever, so leave without running any
                // Python.
                let handed = HANDED_OVER.load(Ordering::Relaxed);
                if handed > 0 {
                    info!(
                        "Worker handed {handed} connection(s) to other workers {}: pid={}",
                        if crash.is_some() { "after the crash" } else { "while stuck" },
                        std::process::id()
                    );
                }
                if let Some(c) = crash {
                    crate::crash::die(c);
                }
                warn!(
                    "Worker exiting with {stuck} timed-out request(s) still running: pid={}",
                    std::process::id()
                );
                unsafe { libc::_exit(0) };
            }
            if now >= deadline {
                // Which requests are cut, as a request past --timeout is named.
                let (serving, offloaded) =
                    (w.scoreboard.in_flight(w.slot, now), w.scoreboard.offloaded(w.slot));
                let cut = match serving.is_empty() && offloaded == 0 {
                    true => String::new(),
                    false => crate::supervise::describe_serving(&serving, offloaded),
                };
                warn!(
                    "Worker stopping with {live} connection(s) still open after the graceful timeout{cut}: pid={}",
                    std::process::id()
                );
                if let Some(c) = crash {
                    crate::crash::die(c);
                }
                if stuck > 0 {
                    unsafe { libc::_exit(0) };
                }
                return 0;
            }
        }
        if unsafe { libc::getppid() } != master {
            // The master is gone (killed outright): nobody will replace or stop us.
            if drain_deadline.is_none() {
                warn!("Master process died; worker draining and exiting");
                drain_deadline = Some(mono_ms() + w.config.graceful_timeout.as_millis() as u64);
                begin_drain(w);
            }
        }
    }
}

/// A serving thread's waits on its client, which --timeout leaves out: a
/// slow upload or download is the client's doing, bounded by
/// --socket-timeout and the body's rate, and the thread is not stuck (as
/// under gunicorn's gthread workers, which let such a request run).
#[derive(Default)]
struct ClientWait {
    /// Since when it waits (monotonic ms), 0 when it does not.
    since: AtomicU64,
    /// Milliseconds waited during its current request.
    total: AtomicU64,
}

static CLIENT_WAITS: std::sync::OnceLock<Box<[ClientWait]>> = std::sync::OnceLock::new();

thread_local! {
    /// This serving thread's index, usize::MAX on other threads.
    static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Runs `f`, a wait for the client's socket, as time --timeout leaves out.
pub(crate) fn waiting_on_client(f: &mut dyn FnMut()) {
    let wait = CLIENT_WAITS.get().and_then(|w| w.get(SERVING_THREAD.with(|t| t.get())));
    let Some(wait) = wait else {
        return f();
    };
    let start = mono_ms().max(1);
    wait.since.store(start, Ordering::Release);
    f();
    wait.since.store(0, Ordering::Release);
    wait.total.fetch_add(mono_ms() - start, Ordering::AcqRel);
}

/// A new request on serving thread `t`: none of its time was the client's yet.
fn reset_client_wait(t: usize) {
    if let Some(wait) = CLIENT_WAITS.get().and_then(|w| w.get(t)) {
        wait.total.store(0, Ordering::Release);
    }
}

/// Whether serving thread `t` waits on its client now, and how long it has
/// so far in its request.
fn client_wait(t: usize) -> (bool, u64) {
    CLIENT_WAITS.get().and_then(|w| w.get(t)).map_or((false, 0), |wait| {
        (wait.since.load(Ordering::Acquire) != 0, wait.total.load(Ordering::Acquire))
    })
}

/// Answers requests that ran past `--timeout` with 504 (or cuts them off if
/// their response already started), logs where their thread is stuck, and
/// asks the master to replace this worker.
fn check_timeouts<A: App>(w: &Shared<A>, now: u64) {
    let Some(limit) = w.config.timeout else {
        return;
    };
    let limit_ms = limit.as_millis() as u64;
    for t in 0..w.timed_out.len() {
        let Some((what, since)) = w.scoreboard.thread_request(w.slot, t) else {
            continue;
        };
        let (waiting, waited) = client_wait(t);
        let app_ms = now.saturating_sub(since).saturating_sub(waited);
        if waiting || app_ms < limit_ms || w.timed_out[t].load(Ordering::Acquire) {
            continue;
        }
        let Some(answered) = abandon_request(w, t, now, since, 504, "the request timed out", true) else {
            continue;
        };
        let traceback = w.app.thread_traceback(t).unwrap_or_else(|| "(no traceback available)\n".to_string());
        let client = match waited {
            0 => String::new(),
            ms => format!(" (and {:.1} s more waiting on its client)", ms as f64 / 1000.0),
        };
        error!(
            "Request timeout: {what} ran for {:.1} s{client}, over --timeout {:.1} s, in worker {} (pid {}), \
             thread {t}; {answered}. The worker is being replaced. Stack of the stuck thread:\n{}",
            app_ms as f64 / 1000.0,
            limit.as_secs_f64(),
            w.slot,
            std::process::id(),
            traceback.trim_end()
        );
        w.scoreboard.request_retire(w.slot, Retire::Timeout);
        w.scoreboard.count(w.slot, crate::scoreboard::C_TIMEOUTS, 1);
        rescue_held(w, t, true);
    }
}

/// Ends for its client the request thread `t` runs, which that thread
/// will not end (stuck past --timeout, or crashed): answers `status` with
/// `why` if nothing was sent yet, else cuts the connection; counts it and
/// (with --timeout, which keeps a note for it) writes its access log line.
/// Says what the client got; None if the
/// thread was between requests, or (unless `wait`) its request is locked.
fn abandon_request<A: App>(
    w: &Shared<A>,
    t: usize,
    now: u64,
    since: u64,
    status: u16,
    why: &str,
    wait: bool,
) -> Option<String> {
    // Under the thread's `current` lock: a thread ending its request
    // clears `current` before it looks at `timed_out`, so either it has
    // ended (nothing to do) or it will find the flag and leave the
    // request, counted here, uncounted.
    let mut current = if wait { w.current[t].lock().unwrap() } else { w.current[t].try_lock().ok()? };
    let (fd, io, protocol, note) = current.as_mut().map(|(f, i, p, n)| (*f, i.clone(), *p, n.take()))?;
    w.timed_out[t].store(true, Ordering::Release);
    w.stuck.fetch_add(1, Ordering::AcqRel);
    let micros = now.saturating_sub(since) * 1000;
    let (answered, status, sent) = match io.try_lock() {
        Ok(mut io) => {
            let blocking: fn(&mut dyn FnMut()) = |f| f();
            let fresh = io.phase < RespPhase::Sent && !io.broken;
            if fresh {
                io.status = status;
                let mut reply = error_reply(io.wire, status, why);
                // A FastCGI connection the front end keeps: the record behind
                // END_REQUEST keeps it out of the front end's pool (see
                // `Io::push_last_notice`), which would send its next request
                // on it after the shutdown below (nginx: EPIPE, 502).
                if matches!(io.wire, Wire::FastCgi { keep_conn: true, .. }) {
                    let _ = fastcgi::write_get_values_result(&mut reply, &[]);
                }
                if io.write_parts(&[&reply], blocking).is_ok() {
                    // The body's bytes, as the access log counts a response's.
                    io.bytes_sent += error_body(status, why).len() as u64;
                }
            }
            // Counted now, as it ends for the client: the thread may never
            // come back to count it.
            let bytes_in = std::mem::take(&mut io.read_total);
            w.scoreboard.record(w.slot, protocol as usize, io.status, micros, bytes_in, io.bytes_sent);
            // Whatever the app does next goes nowhere.
            io.broken = true;
            io.keep_alive = false;
            let answered = if fresh {
                format!("the client got {status}")
            } else {
                "its response had started, so the connection was cut".to_string()
            };
            (answered, io.status, io.bytes_sent)
        }
        // The thread is inside a socket wait of its own: what it sent is
        // not known here, and the request counts as failed.
        Err(_) => {
            w.scoreboard.record(w.slot, protocol as usize, status, micros, 0, 0);
            ("the connection was cut".to_string(), status, 0)
        }
    };
    // Sends what is queued (the answer), then ends the connection, which
    // also wakes the thread if it waits on this socket. Before the lock
    // goes: once it has, the thread may come back, close the descriptor,
    // and its number may be a new client's by the time this runs.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    drop(current);
    if let (Some(log), Some(note)) = (&w.access, note) {
        note.log(log, status, sent, micros);
    }
    Some(answered)
}

/// Takes over from a serving thread that crashed (see [`crate::crash`]):
/// this worker accepts nothing more and starts no request, answers the
/// crashed one, and asks the master for a replacement, to which the
/// connections no thread serves go once it is ready.
fn on_crash<A: App>(w: &Shared<A>, c: crate::crash::Crash, now: u64) {
    // First what needs no allocation and no lock: a crash in malloc may
    // have left its lock held, and the master must hear of the crash even
    // if this thread then blocks (its kill after the graceful timeout is
    // the backstop).
    w.scoreboard.request_retire(w.slot, Retire::Crash);
    // Siblings draining must not hand it their connections.
    w.scoreboard.set_state(w.slot, WorkerState::Draining);
    // For good: threads woken by a listener before it left see the crash
    // and skip their accepts, and resume_accepting never puts it back.
    pause_listeners(w, now);
    let signal = crate::supervise::signal_name(c.signal);
    let serving = w.scoreboard.thread_request(w.slot, c.thread);
    // A request --timeout abandoned already is answered and counted.
    let timed_out = w.timed_out[c.thread].load(Ordering::Acquire);
    let answered = serving
        .as_ref()
        .filter(|_| !timed_out)
        .and_then(|(_, since)| abandon_request(w, c.thread, now, *since, 500, "the worker crashed", false));
    if answered.is_none() && !timed_out {
        // Between requests, or its request is locked (the crash came in
        // the middle of the server's own work on it): nothing to answer.
        w.timed_out[c.thread].store(true, Ordering::Release);
        w.stuck.fetch_add(1, Ordering::AcqRel);
    }
    let request = match (serving, answered) {
        (Some((what, _)), Some(answered)) => format!("while it served {what}; {answered}"),
        (Some((what, _)), None) => {
            format!("while it served {what}; its client is cut off as the worker exits")
        }
        (None, _) => "between requests".to_string(),
    };
    let others = if c.held_lock {
        "; it held the interpreter lock, so the requests of the other threads cannot end and are cut once \
         the replacement is ready"
    } else {
        ""
    };
    error!(
        "Worker crashed: {signal} in thread {} {request}. The worker is being replaced; it accepts nothing \
         more, and the connections no thread serves go to a worker that serves{others}: pid={}",
        c.thread,
        std::process::id()
    );
    // Last: it frees memory, which a crash inside malloc may have locked.
    rescue_held(w, c.thread, false);
}

/// This worker's resident memory when it became ready, before any request.
static FRESH_RSS: AtomicU64 = AtomicU64::new(0);
/// Set once this worker found --reload-on-rss below that size.
static RSS_LIMIT_UNREACHABLE: AtomicBool = AtomicBool::new(false);

/// Asks the master for a replacement when this worker reached one of its
/// recycling limits.
fn check_recycle<A: App>(w: &Shared<A>, age_ms: u64) {
    let served = w.scoreboard.requests(w.slot);
    let reason = if let Some(max) = w.max_requests.filter(|&m| served >= m) {
        Some((Retire::MaxRequests, format!("served {served} requests (limit {max})")))
    } else if let Some(life) = w.config.max_worker_lifetime.filter(|l| age_ms >= l.as_millis() as u64) {
        Some((
            Retire::Lifetime,
            format!("running for {:.0} s (limit {:.0} s)", age_ms as f64 / 1000.0, life.as_secs_f64()),
        ))
    } else if let Some(limit) =
        w.config.reload_on_rss.filter(|_| !RSS_LIMIT_UNREACHABLE.load(Ordering::Relaxed))
    {
        let rss = rss_bytes();
        let fresh = FRESH_RSS.load(Ordering::Relaxed);
        if fresh > limit {
            // A fresh worker is this big already: each replacement would be
            // replaced in turn, for ever, and serve nothing meanwhile.
            RSS_LIMIT_UNREACHABLE.store(true, Ordering::Relaxed);
            warn!(
                "Worker {} (pid {}) had {} MiB of resident memory before serving anything, over \
                 --reload-on-rss {} MiB: the limit cannot be met, so this worker does not apply it; \
                 raise it above the size of a fresh worker",
                w.slot,
                std::process::id(),
                fresh >> 20,
                limit >> 20
            );
            return;
        }
        (rss > limit)
            .then(|| (Retire::Rss, format!("resident memory {} MiB (limit {} MiB)", rss >> 20, limit >> 20)))
    } else {
        None
    };
    let Some((why, detail)) = reason else {
        return;
    };
    ask_recycle(w, why, &detail);
}

/// Set once this worker asked to be replaced.
static RECYCLING: AtomicBool = AtomicBool::new(false);

/// Asks the master for a replacement, once.
fn ask_recycle<A: App>(w: &Shared<A>, why: Retire, detail: &str) {
    if RECYCLING.swap(true, Ordering::AcqRel) {
        return;
    }
    info!(
        "Worker {} (pid {}) recycling: {detail}; it finishes its requests once its replacement is ready",
        w.slot,
        std::process::id()
    );
    w.scoreboard.request_retire(w.slot, why);
}

/// This process's resident set size in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Stops accepting: the listeners leave this worker's epoll set and close,
/// so the kernel sends new connections to workers still accepting (or, once
/// the master closed its copy too, refuses them).
fn begin_drain<A: App>(w: &Shared<A>) {
    DRAIN_STARTED.store(mono_ms(), Ordering::Relaxed);
    DRAINING.store(true, Ordering::SeqCst);
    w.scoreboard.set_state(w.slot, WorkerState::Draining);
    // What takes each listener's descriptor number in this process once it
    // is let go: a thread still in its batch of accepts from an earlier
    // wake-up may call accept4 on that number again, and must get an error
    // (ENOTSOCK), not a socket the app opened meanwhile under the same number.
    let placeholder = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    for (idx, (fd, _)) in w.listeners.iter().enumerate() {
        unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, *fd, std::ptr::null_mut()) };
        // A wake-up epoll gave this worker just before the removal is not
        // given to any other worker: take what is queued now and serve it.
        // Connections arriving from here on wake the other workers. Unless
        // every thread is stuck past --timeout: nothing taken here would be
        // served, while the replacement and the other workers will be.
        while !serving_over(w) {
            match accept_one(w, idx) {
                Accepted::Conn(conn) => park(w, conn),
                Accepted::Shed => {}
                Accepted::None => break,
            }
        }
        // Lets go of this process's reference to the listening socket (the
        // queue closes once every process has), keeping the number taken.
        if placeholder < 0 || unsafe { libc::dup3(placeholder, *fd, libc::O_CLOEXEC) } < 0 {
            unsafe { libc::close(*fd) };
        }
    }
    if placeholder >= 0 {
        unsafe { libc::close(placeholder) };
    }
    // The inbox closes too: a sibling that chose this worker a moment ago
    // finds it closed and hands its connection to another. What it queued
    // already, the main thread takes (adopt_inbox). Out of the epoll set
    // first, since a socket shut for reading is readable for ever.
    if let Some(inbox) = &w.inbox {
        unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, inbox.as_raw_fd(), std::ptr::null_mut()) };
        crate::handover::close_inbox(inbox.as_raw_fd());
    }
    info!("Worker draining: pid={}", std::process::id());
}

/// Draining, takes the connections siblings queued in the inbox before it
/// closed, which no serving thread looks for any more (and which would
/// otherwise go with this worker when it exits, after a request stuck past
/// --timeout or a crash, say): parked like this worker's own, each is
/// handed on by the sweep, or served here.
fn adopt_inbox<A: App>(w: &Shared<A>) {
    let mut taken = Vec::new();
    receive_handed_over(w, &mut taken);
    for conn in taken {
        park_adopted(w, conn);
    }
}

/// Parks a connection just handed over, or queues it for a turn (see
/// [`Turns`]) when it came with the start of a request the sibling had
/// read: epoll reports only bytes that arrive from now on, and its request
/// may be whole already.
fn park_adopted<A: App>(w: &Shared<A>, conn: Box<Conn>) {
    match &w.turns {
        Some(turns) if !conn.io.lock().unwrap().buf.is_empty() => {
            turns.queue.lock().unwrap().push_back(conn);
            wake(&turns.wake);
        }
        _ => park(w, conn),
    }
}

/// Parks the connections waiting for a turn in a worker where no thread
/// will take one again (every one stuck past --timeout, or one crashed):
/// there the sweeper hands them on, with the requests they have buffered.
fn rescue_turns<A: App>(w: &Shared<A>) {
    let Some(turns) = &w.turns else { return };
    // Not waiting: a thread may have crashed inside the lock. It is tried
    // again at the next sweep.
    let waiting: Vec<Box<Conn>> = match turns.queue.try_lock() {
        Ok(mut queue) => queue.drain(..).collect(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().drain(..).collect(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for conn in waiting {
        park(w, conn);
    }
}

/// Closes connections idle past their deadline, and with `close_idle`
/// (a drain past its linger) every idle keep-alive connection. A connection
/// with unread bytes is a request on its way and is left for a thread to
/// serve, past its deadline too. Draining, an idle connection between two
/// requests goes to a sibling instead, if one serves; and when every thread
/// is stuck past --timeout (or one crashed), so is every parked connection
/// nothing was read from, its request waiting in the socket included, and
/// every one whose request was begun, with the bytes read of it, since no
/// thread here will serve them. Returns how many of those could not be handed over yet (the
/// sibling's inbox was full, the sibling went away, or the replacement is
/// still starting).
fn sweep<A: App>(w: &Shared<A>, now: u64, close_idle: bool) -> usize {
    let draining = draining() && w.inbox.is_some();
    let orphans = draining && serving_over(w);
    let mut left = 0;
    // Whether a sibling serves or is starting, asked once a sweep if needed.
    let mut successor = None;
    // Half-millisecond waits for a full inbox of the sibling taking over,
    // 200 ms at most per sweep.
    let mut wait_budget = 400;
    let reg = w.registry.lock().unwrap();
    for e in reg.entries.iter().flatten() {
        if e.state.load(Ordering::Acquire) != IDLE {
            continue;
        }
        let expired = {
            let d = e.deadline.load(Ordering::Relaxed);
            d != 0 && now >= d
        };
        let between = e.between.load(Ordering::Relaxed);
        // Nothing of it read here, or all that was still buffered, to go with it.
        let as_it_is =
            |e: &Entry| e.untouched.load(Ordering::Relaxed) || e.begun.load(Ordering::Relaxed) != NOT_BEGUN;
        let orphan = orphans && as_it_is(e) && !e.handed.load(Ordering::Relaxed);
        if !(expired || (draining || close_idle) && between || orphan) {
            // Nothing to do for it: spare the system call below, four times
            // a second for each of thousands of idle connections.
            continue;
        }
        let pending = pending_bytes(e.fd) > 0;
        if orphan || draining && !pending && between && !e.handed.load(Ordering::Relaxed) {
            let to = crate::handover::target(&w.scoreboard, w.slot, w.master);
            // None serves yet, but a replacement is starting: wait for it
            // (up to the graceful timeout) rather than close the connection.
            if to.is_none() && *successor.get_or_insert_with(|| can_hand_over(w)) {
                left += 1;
            }
            // Taken for the hand-over (CLOSING), and still as it was seen: a
            // thread may have served a request on it since its flags were
            // read, and parked it again with the start of the next one read
            // into this process's buffer (which would be lost with it). Once
            // it is CLOSING no thread takes it, so its flags stand still.
            let take = |e: &Entry| {
                if e.state.compare_exchange(IDLE, CLOSING, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                    return false;
                }
                let fits = if orphan {
                    as_it_is(e)
                } else {
                    e.between.load(Ordering::Relaxed) && pending_bytes(e.fd) == 0
                };
                if !fits {
                    e.state.store(IDLE, Ordering::Release);
                }
                fits
            };
            if let Some(to) = to {
                if take(e) {
                    // Under the registry lock, so no thread closes the
                    // descriptor meanwhile. A thread woken for it from here on
                    // waits for that lock (given_back), then closes this
                    // process's copy only if the connection went, and serves
                    // it if the hand-over failed and it is IDLE again. The
                    // bytes of its request read here go with it, as they are
                    // at each try: no thread takes it while it is CLOSING,
                    // only the flusher may hold its buffers for a moment (it
                    // is then tried again, as with a full inbox).
                    let send = || {
                        let begun = e.begun.load(Ordering::Relaxed);
                        let mut carried = match begun {
                            BEGUN_FASTCGI => e.resume.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                            _ => Vec::new(),
                        };
                        if begun != NOT_BEGUN {
                            match e.io.upgrade().and_then(|io| io.try_lock().ok().map(|io| io.buf.to_vec())) {
                                Some(bytes) => carried.extend_from_slice(&bytes),
                                None => return Err(io::Error::from(io::ErrorKind::WouldBlock)),
                            }
                        }
                        let mut note = note_for(w, e.listener.load(Ordering::Relaxed), e);
                        if !carried.is_empty() {
                            note.fresh = begun == BEGUN_BEFORE_PROXY;
                        }
                        crate::handover::send(w.master, to, e.fd, note, &carried)
                    };
                    let mut sent = send();
                    // The sibling's inbox is full: the kernel queues few
                    // messages on it (net.unix.max_dgram_qlen, often 10) and
                    // it empties them as fast as it can. Wait a little for it,
                    // within a budget per sweep (the registry is locked). The
                    // connection is IDLE while it waits: a request that comes
                    // meanwhile wakes a thread that serves it here.
                    let mut taken = true;
                    while matches!(&sent, Err(err) if err.kind() == io::ErrorKind::WouldBlock)
                        && wait_budget > 0
                    {
                        wait_budget -= 1;
                        e.state.store(IDLE, Ordering::Release);
                        std::thread::sleep(Duration::from_micros(500));
                        if !take(e) {
                            taken = false;
                            break;
                        }
                        sent = send();
                    }
                    if !taken {
                        continue;
                    }
                    match sent {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                            // Tried again at the next sweep: closed, it would
                            // lose a request sent on it meanwhile.
                            e.state.store(IDLE, Ordering::Release);
                            left += 1;
                            continue;
                        }
                        Ok(()) => {
                            e.handed.store(true, Ordering::Relaxed);
                            w.handed.fetch_add(1, Ordering::Relaxed);
                            HANDED_OVER.fetch_add(1, Ordering::Relaxed);
                            unsafe {
                                libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, e.fd, std::ptr::null_mut())
                            };
                            continue;
                        }
                        Err(err) => {
                            // Gone or draining since it was chosen: another
                            // is tried at the next sweep.
                            debug!("handing a connection to worker {to}: {err}");
                            e.state.store(IDLE, Ordering::Release);
                            left += 1;
                        }
                    }
                }
            }
        }
        let idle_keepalive = e.between.load(Ordering::Relaxed) && !pending;
        if !(expired || close_idle && idle_keepalive) {
            continue;
        }
        if pending {
            // Bytes no thread has read yet: the client sent on time and its
            // request waits for a free thread, which reads it and then judges
            // a head still incomplete by its own deadline.
            continue;
        }
        if e.state.compare_exchange(IDLE, CLOSING, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            if expired && e.body_ahead.load(Ordering::Relaxed) {
                // A request whose head came whole: it gets its answer (what
                // does not fit in the socket at once is not waited for).
                let wire = match w.listeners[e.listener.load(Ordering::Relaxed)].1.protocol {
                    Protocol::Http => Some(Wire::Http),
                    Protocol::Uwsgi => Some(Wire::Uwsgi),
                    Protocol::Scgi => Some(Wire::Scgi),
                    Protocol::FastCgi => None,
                };
                if let Some(wire) = wire {
                    let reply = error_reply(wire, 408, "the request body came too slowly");
                    unsafe {
                        libc::send(
                            e.fd,
                            reply.as_ptr().cast(),
                            reply.len(),
                            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                        )
                    };
                }
            }
            // The fd stays open until the owning thread sees the hang-up and
            // removes the entry under this same lock, so it cannot be reused here.
            unsafe { libc::shutdown(e.fd, libc::SHUT_RDWR) };
            if expired && !close_idle {
                debug!("closing connection idle past its timeout (fd {})", e.fd);
            }
        }
    }
    left
}

/// At `--max-connections`, makes room for a new connection by closing the
/// kept-alive connection idle the longest (nothing buffered, nothing sent
/// since its last response), as nginx reuses idle connections when it runs
/// out: idle keep-alive connections, a proxy's pool among them, must not
/// turn new clients away with 503. Its close completes when a thread sees
/// the hang-up, so the count runs over the limit by the closes in flight.
/// False when every connection is in use or waiting for its first request.
fn reclaim_idle(reg: &Registry) -> bool {
    let mut idle: Vec<&Arc<Entry>> = reg
        .entries
        .iter()
        .flatten()
        .filter(|e| {
            e.state.load(Ordering::Acquire) == IDLE
                && e.between.load(Ordering::Relaxed)
                && !e.handed.load(Ordering::Relaxed)
        })
        .collect();
    // The earliest keep-alive deadline is the longest idle.
    idle.sort_unstable_by_key(|e| e.deadline.load(Ordering::Relaxed));
    for e in idle {
        if pending_bytes(e.fd) > 0 {
            continue; // its next request is arriving
        }
        if e.state.compare_exchange(IDLE, CLOSING, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            // As the sweep closes one past its timeout: the fd stays open
            // until a thread sees the hang-up and removes the entry under
            // the registry lock, which is held here.
            unsafe { libc::shutdown(e.fd, libc::SHUT_RDWR) };
            debug!("closed an idle kept-alive connection to make room (--max-connections or the open files limit, fd {})", e.fd);
            return true;
        }
    }
    false
}

fn pending_bytes(fd: RawFd) -> i32 {
    let mut n: libc::c_int = 0;
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    n
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
    if keep {
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

fn accept_batch<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, idx: usize, held: &mut Held) {
    if ACCEPT_PAUSED_AT.load(Ordering::Relaxed) != 0 {
        // Woken by the listener just before it left the epoll set.
        return;
    }
    let started = mono_ms();
    let mut serving = true;
    for i in 0..ACCEPT_BATCH {
        // Crashed, or paused (full, or out of descriptors): the rest stay
        // queued for the other workers.
        if crate::crash::crashed().is_some() || ACCEPT_PAUSED_AT.load(Ordering::Relaxed) != 0 {
            return;
        }
        // The first is this thread's to take: epoll woke it for it.
        if i > 0 && leave_to_siblings(w, t) {
            return;
        }
        match accept_one(w, idx) {
            // Serve right away: the request often arrived with the connection.
            Accepted::Conn(conn) if serving => {
                serve_claimed(w, state, t, conn, held);
                if held.due() {
                    held.release(w);
                }
            }
            // In line behind the connections already ready (epoll reports
            // a request that is there at once).
            Accepted::Conn(conn) => park(w, conn),
            Accepted::Shed => {}
            Accepted::None => return,
        }
        // Slow requests on new connections must not keep kept-alive ones
        // waiting for a whole batch: past ACCEPT_BATCH_TIME the rest of the
        // waiting connections are accepted and parked instead, to be served
        // in turn with the others. Going back to epoll with them still in
        // the accept queue would take one new connection per pass over all
        // the others: under a slow app the last of a wave of new clients
        // waited seconds for its first response. Not while draining: epoll
        // woke this worker (and no other) for these connections, and the
        // listener is gone from its set.
        if serving && mono_ms().saturating_sub(started) >= ACCEPT_BATCH_TIME_MS && !draining() {
            serving = false;
        }
    }
}

/// Whether the connections still in the accept queue are better left
/// there for the other workers: every other thread of this one is busy, so
/// one taken here would wait behind this thread's requests while another
/// worker may be free (one-thread workers served a burst of slow requests
/// in turn while their siblings sat idle, and a connection accepted before
/// its request came waited for a whole batch). This thread takes one per
/// wake-up then, as gunicorn's sync worker does; alone in its pool, or with
/// a thread free to take them, it takes a batch.
fn leave_to_siblings<A: App>(w: &Shared<A>, t: usize) -> bool {
    let own_free = (0..w.in_pass.len()).any(|o| o != t && !w.in_pass[o].load(Ordering::Relaxed));
    if own_free {
        return false;
    }
    let sb = &w.scoreboard;
    (0..sb.slots()).any(|s| s != w.slot && sb.pid(s) != 0 && sb.state(s) == WorkerState::Ready)
}

enum Accepted {
    Conn(Box<Conn>),
    /// Over `--max-connections`: answered 503 and closed.
    Shed,
    None,
}

/// Connections shed since the last log line about it (answered 503, and
/// FastCGI ones, only closed), and when that line was.
static SHED: Mutex<(u64, u64, u64)> = Mutex::new((0, 0, 0));

/// Answers a connection over the limit with 503 and closes it; logs at most
/// once a second how many were turned away.
fn shed<A: App>(w: &Shared<A>, fd: RawFd, idx: usize, client: &str) {
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    let mut io = Io::new(fd, 1000, 0);
    let reply = match w.listeners[idx].1.protocol {
        // FastCGI needs a request id to answer on; closing is its 503.
        Protocol::FastCgi => Vec::new(),
        Protocol::Scgi => error_reply(Wire::Scgi, 503, "server overloaded"),
        _ => error_response(503, "server overloaded"),
    };
    if !reply.is_empty() {
        let _ = io.write_parts(&[&reply], blocking);
        record_refusal(w, Err(client), idx, b"", 503, &reply);
    }
    drain_and_close(&mut io);
    unsafe { libc::close(fd) };
    w.scoreboard.count(w.slot, crate::scoreboard::C_SHED, 1);
    {
        let mut shed = SHED.lock().unwrap_or_else(|p| p.into_inner());
        match reply.is_empty() {
            true => shed.1 += 1,
            false => shed.0 += 1,
        }
    }
    report_shed(w, mono_ms());
}

/// Logs how many connections were turned away since the last report, at
/// most once a second; the main loop calls it too, so the tail of a burst
/// is reported even when no connection is turned away after it.
fn report_shed<A: App>(w: &Shared<A>, now: u64) {
    let mut shed = SHED.lock().unwrap_or_else(|p| p.into_inner());
    let (answered, closed, last) = *shed;
    if answered + closed > 0 && now >= last + 1000 {
        let how = match (answered, closed) {
            (n, 0) => format!("{n} connection(s) turned away with 503"),
            (0, n) => {
                format!("{n} FastCGI connection(s) closed before any request (the front end answers 502)")
            }
            (a, c) => format!(
                "{a} connection(s) turned away with 503, and {c} FastCGI connection(s) closed before any \
                 request (the front end answers 502)"
            ),
        };
        warn!(
            "Overloaded: {how} (this worker holds --max-connections {}): pid={}",
            w.config.max_connections,
            std::process::id()
        );
        *shed = (0, 0, now);
    }
}

/// Stops accepting for [`ACCEPT_PAUSE`] after accept failed for lack of
/// descriptors; says so at most once a second.
fn pause_accepting<A: App>(w: &Shared<A>, e: &io::Error) {
    let now = mono_ms();
    pause_listeners(w, now);
    // As at --max-connections: a new client must not wait for a descriptor
    // that an idle kept-alive connection holds.
    let reclaimed = {
        let reg = w.registry.lock().unwrap();
        (0..RECLAIM_ON_EMFILE).take_while(|_| reclaim_idle(&reg)).count()
    };
    RECLAIMED_FOR_FDS.fetch_add(reclaimed as u64, Ordering::Relaxed);
    let mut no_fds = NO_FDS.lock().unwrap_or_else(|p| p.into_inner());
    no_fds.0 += 1;
    if now >= no_fds.1 + 1000 {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        warn!(
            "Cannot accept connections: {e} (open files limit {}, `ulimit -n`; this worker holds {} \
             connection(s)); pausing accepts for {} to {} ms; {} refused accept(s) and {} idle kept-alive \
             connection(s) closed to make room since the last report: pid={}",
            limit.rlim_cur,
            w.registry.lock().unwrap().live,
            ACCEPT_PAUSE.as_millis(),
            (ACCEPT_PAUSE + SWEEP_INTERVAL).as_millis(),
            no_fds.0,
            RECLAIMED_FOR_FDS.swap(0, Ordering::Relaxed),
            std::process::id()
        );
        *no_fds = (0, now);
    }
}

/// Idle kept-alive connections closed at each accept that failed for lack
/// of descriptors; each close frees one for a client waiting in the queue.
const RECLAIM_ON_EMFILE: usize = 4;
/// Those closed since the last log line about the descriptor shortage.
static RECLAIMED_FOR_FDS: AtomicU64 = AtomicU64::new(0);

/// Takes the listeners out of the epoll set for [`ACCEPT_PAUSE`]: the
/// kernel then wakes the other workers for new connections.
fn pause_listeners<A: App>(w: &Shared<A>, now: u64) {
    let _pause = ACCEPT_PAUSE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Draining, the listeners have left the epoll set already, and their
    // numbers may be taken by other descriptors since.
    if ACCEPT_PAUSED_AT.load(Ordering::Acquire) == 0 && !draining() {
        for (fd, _) in &w.listeners {
            unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, *fd, std::ptr::null_mut()) };
        }
        ACCEPT_PAUSED_AT.store(now.max(1), Ordering::Release);
    }
}

/// At `--max-connections` with nothing idle to close: gives the connection
/// just accepted to a sibling that has room, as a new one (its first
/// request unread), and stops accepting for [`ACCEPT_PAUSE`] so the next
/// ones go to the siblings directly. epoll wakes the same worker for most
/// new connections, so without this one full worker turned clients away
/// with 503 while the others had room. False when no sibling has room.
fn pass_to_sibling<A: App>(w: &Shared<A>, fd: RawFd, idx: usize) -> bool {
    if w.inbox.is_none() {
        return false;
    }
    let Some(to) = crate::handover::target_with_room(&w.scoreboard, w.slot, w.config.max_connections) else {
        return false;
    };
    let note = crate::handover::Note {
        listener: idx as u16,
        protocol: w.listeners[idx].1.protocol as u8,
        client: None,
        fresh: true,
    };
    match crate::handover::send(w.master, to, fd, note, b"") {
        Ok(()) => {
            unsafe { libc::close(fd) };
            pause_listeners(w, mono_ms());
            debug!("at --max-connections: handed a new connection to worker pid {to}");
            true
        }
        Err(e) => {
            debug!("at --max-connections: handing a new connection to worker pid {to}: {e}");
            false
        }
    }
}

/// Puts the listeners back in the epoll set once [`ACCEPT_PAUSE`] passed.
fn resume_accepting<A: App>(w: &Shared<A>, now: u64) {
    let _pause = ACCEPT_PAUSE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let at = ACCEPT_PAUSED_AT.load(Ordering::Acquire);
    if at == 0 || now < at + ACCEPT_PAUSE.as_millis() as u64 {
        return;
    }
    if crate::crash::crashed().is_some() {
        return;
    }
    // A drain has let the listeners go meanwhile.
    if !draining() {
        for (i, (fd, _)) in w.listeners.iter().enumerate() {
            let mut ev =
                libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32, u64: i as u64 };
            unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_ADD, *fd, &mut ev) };
        }
    }
    ACCEPT_PAUSED_AT.store(0, Ordering::Release);
}

/// Accepts one connection from listener `idx`, if one is waiting.
fn accept_one<A: App>(w: &Shared<A>, idx: usize) -> Accepted {
    struct Accepting<'a>(&'a AtomicUsize);
    impl Drop for Accepting<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    w.accepting.fetch_add(1, Ordering::SeqCst);
    let _accepting = Accepting(&w.accepting);
    let lfd = w.listeners[idx].0;
    let is_unix = w.listeners[idx].1.is_unix;
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // A unix peer's address says nothing (the front end's socket is
    // unnamed), and asking the kernel for it is about 8 % of accept's cost.
    let (addr_ptr, len_ptr) = if is_unix {
        (std::ptr::null_mut(), std::ptr::null_mut())
    } else {
        (&mut addr as *mut _ as *mut libc::sockaddr, &mut len as *mut libc::socklen_t)
    };
    let fd = unsafe { libc::accept4(lfd, addr_ptr, len_ptr, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // EBADF/EINVAL/ENOTSOCK: the listener was let go by a drain meanwhile.
            Some(libc::EAGAIN)
            | Some(libc::ECONNABORTED)
            | Some(libc::EINTR)
            | Some(libc::EBADF)
            | Some(libc::ENOTSOCK)
            | Some(libc::EINVAL) => {}
            Some(libc::EMFILE) | Some(libc::ENFILE) => pause_accepting(w, &e),
            _ => error!("accept: {e}"),
        }
        return Accepted::None;
    }
    if !is_unix {
        let one: libc::c_int = 1;
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
    }
    // At --max-connections the new connection goes to a sibling with room
    // first. Only when none has any is an idle kept-alive connection closed
    // for it: its client may be sending its next request at that moment (a
    // POST nginx then answers with 502), while the sibling closes nothing.
    if w.registry.lock().unwrap().live >= w.config.max_connections {
        if pass_to_sibling(w, fd, idx) {
            return Accepted::Shed;
        }
        let reg = w.registry.lock().unwrap();
        if reg.live >= w.config.max_connections && !reclaim_idle(&reg) {
            drop(reg);
            shed(w, fd, idx, &peer_strings(&addr, is_unix).0);
            return Accepted::Shed;
        }
    }
    let (remote_addr, remote_port) = peer_strings(&addr, is_unix);
    Accepted::Conn(adopt(w, fd, idx, remote_addr, remote_port, true))
}

/// Registers a connection this worker now owns (accepted, or handed over
/// by a sibling) and makes its state.
fn adopt<A: App>(
    w: &Shared<A>,
    fd: RawFd,
    idx: usize,
    remote_addr: String,
    remote_port: String,
    fresh: bool,
) -> Box<Conn> {
    let protocol = w.listeners[idx].1.protocol;
    let io = Arc::new_cyclic(|me| {
        let mut io = Io::new(fd, w.config.io_timeout.as_millis() as i32, w.config.max_body_size);
        // Held responses are written once a pass over the ready
        // connections ends, which only a thread taking many at once has.
        io.hold = w.config.threads == 1;
        io.body_grace_ms = w.config.header_timeout.as_millis() as u64;
        io.time_drains = protocol == Protocol::FastCgi;
        io.tcp = !w.listeners[idx].1.is_unix;
        io.me = Some(me.clone());
        Mutex::new(io)
    });
    let entry = Arc::new(Entry {
        fd,
        state: AtomicU8::new(BUSY),
        deadline: AtomicU64::new(0),
        fresh: AtomicBool::new(fresh),
        between: AtomicBool::new(false),
        untouched: AtomicBool::new(false),
        begun: AtomicU8::new(NOT_BEGUN),
        resume: Mutex::new(Vec::new()),
        handed: AtomicBool::new(false),
        body_ahead: AtomicBool::new(false),
        listener: AtomicUsize::new(idx),
        proxy_client: std::sync::OnceLock::new(),
        io: Arc::downgrade(&io),
    });
    let slot = {
        let mut reg = w.registry.lock().unwrap();
        reg.live += 1;
        reg.peak = reg.peak.max(reg.live);
        w.scoreboard.set_conns(w.slot, reg.live);
        match reg.free.pop() {
            Some(i) => {
                reg.entries[i] = Some(entry.clone());
                i
            }
            None => {
                reg.entries.push(Some(entry.clone()));
                reg.entries.len() - 1
            }
        }
    };
    Box::new(Conn {
        entry,
        slot,
        io,
        head: Head::default(),
        listener: idx,
        peer_addr: remote_addr.clone(),
        remote_addr,
        remote_port,
        request_started: mono_ms(),
        parsed_upto: 0,
        head_ready: false,
        fcgi: FcgiConn::default(),
        registered: false,
        // uwsgi and SCGI carry one request per connection: nothing to re-arm.
        edge: w.config.threads <= 1 && matches!(protocol, Protocol::Http | Protocol::FastCgi),
        hung_up: false,
        proxy_pending: fresh && protocol == Protocol::Http && w.config.proxy_protocol,
        head_charge: HeadCharge::default(),
    })
}

/// Set once the app has forked (a `pthread_atfork` handler, in the parent):
/// from then on a connection is shut down before it is closed, since a
/// child may hold a copy of its descriptor, and a close alone would then
/// neither end it for the client (a body that ends with the connection
/// would never end) nor free it until the child exits.
static APP_FORKED: AtomicBool = AtomicBool::new(false);

/// The descriptors a child the app forks closes at once (the listeners, the
/// hand-over inbox): one that lived on would hold the server's port after
/// the server stopped, and take connections nobody answers. Atomics, since
/// the child's handler may not take a lock another thread held at the fork.
static CLOSE_IN_CHILD: [std::sync::atomic::AtomicI32; 64] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; 64];

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
    for fd in &CLOSE_IN_CHILD {
        let fd = fd.load(Ordering::Relaxed);
        if fd >= 0 {
            unsafe { libc::close(fd) };
        }
    }
}

/// Registers what a fork by the app does with the worker's descriptors.
fn watch_app_forks(fds: impl Iterator<Item = RawFd>) {
    for (slot, fd) in CLOSE_IN_CHILD.iter().zip(fds) {
        slot.store(fd, Ordering::Relaxed);
    }
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

/// Connections this worker handed to siblings while draining.
static HANDED_OVER: AtomicUsize = AtomicUsize::new(0);

/// [`can_hand_over`] for the response path, which holds no [`Shared`]: set
/// once, when the worker's shared state exists (a process runs one worker).
static HAND_OVER_PROBE: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>> = std::sync::OnceLock::new();

/// Whether a kept FastCGI connection may stay open after the request on it:
/// unless this worker drains with no sibling to take the connection.
/// FastCGI cannot warn the front end that a connection closes (see
/// crate::handover), so one that may not stay closes with its END_REQUEST.
pub(crate) fn fastcgi_conn_may_stay() -> bool {
    !draining() || HAND_OVER_PROBE.get().is_some_and(|probe| probe())
}

/// Whether a sibling could take a connection from this draining worker, now
/// or once it has started (a replacement still loading the app): the
/// connection then waits here, parked, for the sweeper to hand it over.
fn can_hand_over<A: App>(w: &Shared<A>) -> bool {
    w.inbox.is_some() && crate::handover::successor(&w.scoreboard, w.slot, w.master)
}

/// What goes with a connection from listener `idx` that is handed over.
fn note_for<A: App>(w: &Shared<A>, idx: usize, entry: &Entry) -> crate::handover::Note {
    crate::handover::Note {
        listener: idx as u16,
        protocol: w.listeners[idx].1.protocol as u8,
        client: entry.proxy_client.get().copied(),
        fresh: entry.fresh.load(Ordering::Relaxed),
    }
}

/// In a draining worker, hands a connection between two requests (nothing
/// buffered, its responses written) to a sibling; gives it back if it stays
/// (to be parked: the sweeper hands it over once a sibling is ready).
fn hand_over_if_draining<A: App>(w: &Shared<A>, conn: Box<Conn>) -> Option<Box<Conn>> {
    if !draining() || w.inbox.is_none() || conn.entry.fresh.load(Ordering::Relaxed) {
        return Some(conn);
    }
    let Some(to) = crate::handover::target(&w.scoreboard, w.slot, w.master) else {
        return Some(conn);
    };
    let ready = {
        let mut io = conn.io.lock().unwrap();
        io.buf.is_empty() && io.keep_alive && io.discard_until == 0 && io.flush_out(|f| f()).is_ok()
    };
    if !ready {
        return Some(conn);
    }
    match crate::handover::send(w.master, to, conn.entry.fd, note_for(w, conn.listener, &conn.entry), b"") {
        Ok(()) => {
            HANDED_OVER.fetch_add(1, Ordering::Relaxed);
            // Marked as the sweeper marks what it hands over (close() counts
            // it off again), so that close() does not shut it down for the
            // sibling too when the app has forked.
            conn.entry.handed.store(true, Ordering::Relaxed);
            w.handed.fetch_add(1, Ordering::Relaxed);
            // The sibling holds the connection too, so closing this copy
            // neither ends it nor takes it out of this epoll set.
            if conn.registered {
                unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, conn.entry.fd, std::ptr::null_mut()) };
            }
            close(w, conn, false);
            None
        }
        Err(e) => {
            debug!("handing a connection to worker {to}: {e}");
            Some(conn)
        }
    }
}

/// Takes the connections siblings handed over and serves what they bring.
fn take_handed_over<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, held: &mut Held) {
    // Every connection waiting in the inbox is taken first; the first is
    // served here and the others parked. Served one after another, they
    // would wait behind a slow request unseen by the other threads, and be
    // lost with the inbox should this worker be stopped too (a slow request
    // handed over from a stuck worker is often stuck here as well).
    let mut taken = Vec::new();
    receive_handed_over(w, &mut taken);
    let mut taken = taken.into_iter();
    if let Some(first) = taken.next() {
        taken.for_each(|conn| park_adopted(w, conn));
        serve_claimed(w, state, t, first, held);
        if held.due() {
            held.release(w);
        }
    }
}

/// Adopts the connections waiting in the hand-over inbox.
// Boxed as everywhere: epoll's events carry a connection's address.
#[allow(clippy::vec_box)]
fn receive_handed_over<A: App>(w: &Shared<A>, taken: &mut Vec<Box<Conn>>) {
    use std::os::fd::IntoRawFd;
    let Some(inbox) = &w.inbox else { return };
    loop {
        match crate::handover::receive(inbox.as_raw_fd()) {
            Ok(crate::handover::Received::Conn(fd, note, carried)) => {
                let idx = usize::from(note.listener);
                // Listeners are numbered alike in every worker of one program;
                // across a re-exec the list may have changed: the socket
                // itself must say it came from that listener.
                if idx >= w.listeners.len()
                    || w.listeners[idx].1.protocol as u8 != note.protocol
                    || !accepted_on(fd.as_raw_fd(), &w.listeners[idx].1)
                {
                    warn!("a connection handed over for a listener this worker does not have; closing it");
                    continue;
                }
                let is_unix = w.listeners[idx].1.is_unix;
                let (remote_addr, remote_port) = if is_unix {
                    (String::new(), String::new())
                } else {
                    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                    unsafe {
                        libc::getpeername(
                            fd.as_raw_fd(),
                            &mut addr as *mut _ as *mut libc::sockaddr,
                            &mut len,
                        )
                    };
                    peer_strings(&addr, false)
                };
                let mut conn = adopt(w, fd.into_raw_fd(), idx, remote_addr, remote_port, note.fresh);
                if let Some(client) = note.client {
                    set_proxy_client(&mut conn, client);
                }
                // A request the sibling had begun to read: its bytes come
                // first, as if read from the socket here.
                if !carried.is_empty() {
                    conn.io.lock().unwrap().buf.extend_from_slice(&carried);
                }
                taken.push(conn);
            }
            Ok(crate::handover::Received::Dropped(why)) => warn!("hand-over inbox: dropped {why}"),
            Ok(crate::handover::Received::Empty) => return,
            Err(e) => {
                warn!("hand-over inbox: {e}");
                return;
            }
        }
    }
}

/// Whether connection `fd` was accepted on a listener like `listener`: the
/// same family, and for TCP the same port.
fn accepted_on(fd: RawFd, listener: &ListenerInfo) -> bool {
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe { libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) } < 0 {
        return false;
    }
    let port = match addr.ss_family as i32 {
        libc::AF_UNIX => return listener.is_unix,
        libc::AF_INET => u16::from_be(unsafe { &*(&addr as *const _ as *const libc::sockaddr_in) }.sin_port),
        libc::AF_INET6 => {
            u16::from_be(unsafe { &*(&addr as *const _ as *const libc::sockaddr_in6) }.sin6_port)
        }
        _ => return false,
    };
    !listener.is_unix && listener.server_port == port.to_string()
}

fn peer_strings(addr: &libc::sockaddr_storage, is_unix: bool) -> (String, String) {
    if is_unix {
        return (String::new(), String::new());
    }
    match addr.ss_family as i32 {
        libc::AF_INET => {
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            (ip.to_string(), u16::from_be(a.sin_port).to_string())
        }
        libc::AF_INET6 => {
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port).to_string();
            // An IPv4 client of a dual-stack `[::]` listener comes as
            // ::ffff:a.b.c.d: it is a.b.c.d to the app and to the
            // --forwarded-allow-ips and --proxy-allow-from lists.
            match ip.to_ipv4_mapped() {
                Some(v4) => (v4.to_string(), port),
                None => (ip.to_string(), port),
            }
        }
        _ => (String::new(), String::new()),
    }
}

/// A connection epoll handed to this thread: claim it from the sweeper first.
fn serve<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, conn: Box<Conn>, held: &mut Held) {
    let claim = |e: &Entry| e.state.compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok();
    if !claim(&conn.entry) && !given_back(w, &conn.entry, claim) {
        // The sweeper shut it down (timeout or drain). Bytes still buffered
        // are a request that did not arrive whole in time: say so.
        let (partial, discarding) = {
            let io = conn.io.lock().unwrap();
            (io.buf.len(), (io.discard_until != 0).then(|| io.discard_what.clone()))
        };
        if let Some(what) = discarding {
            log_discard_gave_up(&what, GaveUp::Stalled);
            close(w, conn, false);
            return;
        }
        // A FastCGI request's records leave the buffer for its state as they come.
        // One handed to a sibling goes on there; any other was shut down at
        // its deadline, draining or not.
        let begun = partial > 0 || conn.fcgi.active.is_some();
        if begun && !conn.entry.handed.load(Ordering::Relaxed) {
            let listener = &w.listeners[conn.listener].1;
            // Its head whole, a small body read ahead of the app has the grace and rate of any body.
            let part = if conn.head_ready {
                format!("its body came slower than {} bytes/s after", crate::exchange::MIN_BODY_RATE)
            } else {
                "incomplete after".to_string()
            };
            let what = format!(
                "{} request from {}: {part} the header timeout ({} s, {partial} bytes buffered); \
                 closing the connection",
                listener.protocol.name(),
                peer(&conn, listener),
                w.config.header_timeout.as_secs_f64()
            );
            // A client that stalls is routine on the open internet; a front
            // end that stalls inside its own request is not.
            if listener.protocol == Protocol::Http {
                info!("Timed out: {what}");
            } else {
                warn!("Timed out: {what}");
            }
        }
        close(w, conn, false);
        return;
    }
    serve_claimed(w, state, t, conn, held);
}

/// Whether a connection this thread was woken for, found CLOSING, is back
/// with it (and claimed, by `claim`): a draining worker's sweeper marks a
/// connection CLOSING while it hands it to a sibling, under the registry
/// lock, and gives it back (IDLE) when that fails (the sibling began to
/// drain too, say). Closed then, the request that woke this thread would be
/// lost with it (a reset, a 502 from nginx); the sweeper, which hands over
/// only connections with nothing waiting, would never take it again.
fn given_back<A: App>(w: &Shared<A>, entry: &Entry, claim: impl Fn(&Entry) -> bool) -> bool {
    let _sweep_done = w.registry.lock().unwrap_or_else(|p| p.into_inner());
    claim(entry)
}

/// A request that arrived over uwsgi, FastCGI or SCGI.
struct GatewayRequest {
    /// The bytes `params` index.
    bytes: Bytes,
    params: CgiParams,
    wire: Wire,
    body: BodyState,
}

/// What to do with a connection after looking at its buffer.
enum Next {
    /// A request head is complete; this many bytes are its head.
    Request(usize),
    /// A gateway request's variables are complete.
    Gateway(GatewayRequest),
    /// Wait in epoll for more bytes.
    Park,
    Close,
}

fn serve_claimed<A: App>(
    w: &Shared<A>,
    state: &mut A::Thread,
    t: usize,
    mut conn: Box<Conn>,
    held: &mut Held,
) {
    // Pipelined requests served in a row, and when the first of them began
    // (read only once there is one: most connections have none).
    let (mut served, mut turn_began) = (0, 0);
    loop {
        let next = match w.listeners[conn.listener].1.protocol {
            Protocol::Http => read_head(w, &mut conn),
            _ => read_gateway(w, &mut conn),
        };
        let outcome = match next {
            Next::Request(n) => handle_request(w, state, t, &mut conn, Incoming::Http(n)),
            Next::Gateway(req) => handle_request(w, state, t, &mut conn, Incoming::Gateway(req)),
            Next::Park => {
                if let Some(conn) = hand_over_if_draining(w, conn) {
                    held.settle(w, conn, true);
                }
                return;
            }
            Next::Close => Outcome::Done(false),
        };
        let keep = match outcome {
            Outcome::Done(keep) => keep,
            Outcome::Offload(rest) => {
                offload(w, conn, rest);
                return;
            }
        };
        if !keep {
            held.settle(w, conn, false);
            return;
        }
        // Pipelined bytes are served at once; otherwise the connection goes
        // back to epoll rather than being read again right away. Reading
        // again would often find the client's next request already there,
        // and this thread would then serve one connection back and forth
        // while the others wait, waking an idle client for every response.
        if conn.io.lock().unwrap().buf.is_empty() {
            if let Some(conn) = hand_over_if_draining(w, conn) {
                held.settle(w, conn, true);
            }
            return;
        }
        served += 1;
        let now = mono_ms();
        if served == 1 {
            turn_began = now;
        }
        if served >= TURN_REQUESTS || now >= turn_began + TURN_MS {
            match give_up_turn(w, conn) {
                Some(c) => (conn, served) = (c, 0),
                None => return,
            }
        }
    }
}

/// Queues `conn`, whose next requests are buffered already, behind the work
/// ready now (see [`Turns`]); gives it back to be served on at once when it
/// cannot wait there.
fn give_up_turn<A: App>(w: &Shared<A>, mut conn: Box<Conn>) -> Option<Box<Conn>> {
    let Some(turns) = &w.turns else {
        return Some(conn);
    };
    {
        // What its pass held goes out first: another thread may take it.
        let mut io = conn.io.lock().unwrap();
        if io.flush_out(|f| f()).is_err() || io.broken {
            drop(io);
            close(w, conn, false);
            return None;
        }
    }
    leave_serving_set(w, &mut conn);
    turns.queue.lock().unwrap().push_back(conn);
    wake(&turns.wake);
    None
}

/// Takes `conn` out of the serving threads' epoll set before something else
/// (the offload thread, the turn queue) owns it: an edge-triggered
/// registration stays armed, and an event there would give a serving
/// thread the same box. (A one-shot registration is disarmed until parked
/// again; park adds the connection back.)
fn leave_serving_set<A: App>(w: &Shared<A>, conn: &mut Conn) {
    if conn.edge && conn.registered {
        unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, conn.entry.fd, std::ptr::null_mut()) };
        conn.registered = false;
    }
}

/// Serves on a connection that gave up its turn.
fn take_turn<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, held: &mut Held) {
    let Some(turns) = &w.turns else {
        return;
    };
    // One per wake-up, as for downloads: the others go to other threads.
    if let Some(conn) = take_one(&turns.queue, &turns.wake) {
        serve_claimed(w, state, t, conn, held);
        if held.due() {
            held.release(w);
        }
    }
}

/// Whether an incomplete head, `parsed` bytes of which were looked at before,
/// may have become complete or bad with what `buf` has now. Parsing it all
/// again after every read would cost a client dribbling a large head in
/// small pieces the square of its size; only an empty line ends a head, and
/// past the request line only the size limit refuses one unseen.
fn worth_parsing(buf: &[u8], parsed: usize, limits: &http1::Limits) -> bool {
    let parsed = parsed.min(buf.len());
    let new = &buf[parsed.saturating_sub(3)..];
    // Whether the request line had not ended before these bytes: looked up
    // only when it matters, and the look stops at the line's end.
    let line_open = || !buf[..parsed].contains(&b'\n');
    parsed == 0
        // A request line still open, and short (parsed at each read, so that
        // bytes that cannot start a request, TLS to an HTTP port, get their
        // 400 at once), ended now, or over the limit. Parsing a long one again
        // after every read would cost the square of its length
        // (--limit-request-line allows 1 MiB).
        || ((parsed <= EARLY_LOOK || new.contains(&b'\n') || buf.len() > limits.max_request_line + 2)
            && line_open())
        || new.windows(2).any(|w| w == b"\n\n")
        || new.windows(3).any(|w| w == b"\n\r\n")
        || buf.len() > limits.max_head_bytes()
        // A header line over its limit and still unfinished (a look back of
        // at most the limit's length).
        || (buf.len() > limits.max_header_line
            && !buf[buf.len() - limits.max_header_line - 1..].contains(&b'\n')
            && !line_open())
}

/// How much of an unfinished request line is parsed again at every read.
const EARLY_LOOK: usize = http1::DEFAULT_MAX_REQUEST_LINE;

/// Reads until a whole head is buffered, the socket is drained, or the head is bad.
fn read_head<A: App>(w: &Shared<A>, conn: &mut Conn) -> Next {
    let io_arc = conn.io.clone();
    let mut io = io_arc.lock().unwrap();
    if io.discard_until != 0 {
        if let Some(next) = go_on_discarding(w, conn, &mut io) {
            return next;
        }
    }
    let mut read_once = false;
    let mut want = READ_CHUNK;
    let mut head_len = None;
    loop {
        if conn.proxy_pending && !io.buf.is_empty() {
            if let Some(next) = take_proxy_header(w, conn, &mut io) {
                return next;
            }
        }
        let worth = !conn.proxy_pending
            && !io.buf.is_empty()
            && (head_len.is_some()
                || conn.head_ready
                || worth_parsing(&io.buf, conn.parsed_upto, &w.config.limits));
        // Looked at either way: the next check starts after these bytes.
        conn.parsed_upto = io.buf.len();
        if worth {
            match http1::parse_head(&io.buf, &w.config.limits, &mut conn.head) {
                Ok(Status::Complete((), n)) => {
                    // A small body is read before the app runs, like the head:
                    // a slow client then ties up a connection, never a thread.
                    let missing = match conn.head.framing {
                        BodyFraming::Length(len)
                            if len <= PREREAD_MAX.min(w.config.max_body_size)
                                && !conn.head.expect_continue =>
                        {
                            (n as u64 + len).saturating_sub(io.buf.len() as u64)
                        }
                        _ => 0,
                    };
                    conn.head_charge.set(0);
                    if missing == 0 {
                        conn.parsed_upto = 0;
                        conn.head_ready = false;
                        return Next::Request(n);
                    }
                    conn.head_ready = true;
                    head_len = Some(n);
                    want = missing as usize;
                }
                Ok(Status::Partial) => {}
                Err(e) => {
                    info!(
                        "Bad request from {}: {e} ({} {})",
                        peer(conn, &w.listeners[conn.listener].1),
                        e.status(),
                        reason(e.status())
                    );
                    let blocking: fn(&mut dyn FnMut()) = |f| f();
                    let reply = error_response(e.status(), &e.to_string());
                    let _ = io.write_parts(&[&reply], blocking);
                    record_refusal(w, Ok(conn), conn.listener, &io.buf, e.status(), &reply);
                    drain_and_close(&mut io);
                    return Next::Close;
                }
            }
        }
        // A head not ended yet (parsed above, or not worth parsing) holds
        // its share of the worker's budget for such heads.
        if head_len.is_none() && !conn.head_ready && !conn.proxy_pending && !io.buf.is_empty() {
            let total = conn.head_charge.set(io.buf.len());
            if io.buf.len() > HEAD_FAIR_SHARE && total > HEAD_BUDGET {
                info!(
                    "Request head refused from {}: {} KiB and not ended, while this worker holds \
                     {} MiB of unfinished request heads (at most {} MiB) (431 {})",
                    peer(conn, &w.listeners[conn.listener].1),
                    io.buf.len() >> 10,
                    total >> 20,
                    HEAD_BUDGET >> 20,
                    reason(431)
                );
                let reply = error_response(431, "request header fields too large");
                let _ = io.write_parts(&[&reply], |f| f());
                record_refusal(w, Ok(conn), conn.listener, &io.buf, 431, &reply);
                drain_and_close(&mut io);
                conn.head_charge.set(0);
                return Next::Close;
            }
        }
        // Draining, a kept-alive connection found idle closes. A new one
        // (its PROXY header taken, nothing else yet) waits for its request.
        if draining() && io.buf.is_empty() && read_once && !conn.entry.fresh.load(Ordering::Relaxed) {
            return Next::Close;
        }
        let was_empty = io.buf.is_empty();
        match io.read_some(want) {
            // The client half-closed inside a small body: run the request
            // anyway so the app sees the short body (and the log says so)
            // rather than the client getting no answer at all.
            Ok(0) => return head_len.map_or(Next::Close, Next::Request),
            Ok(_) => {
                read_once = true;
                if was_empty {
                    conn.request_started = mono_ms();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Past the linger, an idle connection closes, unless a sibling
                // can take it: then it is parked for the sweeper to hand over
                // (its inbox may be full for a moment).
                if io.buf.is_empty()
                    && idle_linger_over()
                    && !conn.entry.fresh.load(Ordering::Relaxed)
                    && !can_hand_over(w)
                {
                    return Next::Close;
                }
                if !io.buf.is_empty() {
                    io.ack_now();
                }
                return Next::Park;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("read from {}: {e}", peer(conn, &w.listeners[conn.listener].1));
                return Next::Close;
            }
        }
    }
}

/// Looks for a PROXY protocol header at the start of a new connection
/// (`--proxy-protocol`): one from an allowed peer is taken off the buffer
/// and its client address becomes the connection's; none at all means the
/// client speaks HTTP at once. Returns what to do when the connection
/// cannot go on to its request head.
fn take_proxy_header<A: App>(w: &Shared<A>, conn: &mut Conn, io: &mut Io) -> Option<Next> {
    let listener = &w.listeners[conn.listener].1;
    let (status, why) = match corral_proto::proxy::parse(&io.buf) {
        Err(corral_proto::proxy::Error::NotProxy) => {
            conn.proxy_pending = false;
            return None;
        }
        Ok(Status::Partial) => return None,
        _ if !w.config.proxy_allow.trusts(&conn.peer_addr, listener.is_unix) => {
            (403, "a PROXY header from a peer not in --proxy-allow-from".to_string())
        }
        Ok(Status::Complete(header, n)) => {
            io.buf.advance(n);
            conn.parsed_upto = 0;
            conn.proxy_pending = false;
            if let Some(client) = header.source {
                set_proxy_client(conn, client);
            }
            return None;
        }
        Err(e) => (400, e.to_string()),
    };
    info!("Bad request from {}: {why} ({status} {})", peer(conn, listener), reason(status));
    let reply = error_response(status, &why);
    let _ = io.write_parts(&[&reply], |f| f());
    record_refusal(w, Ok(conn), conn.listener, &io.buf, status, &reply);
    drain_and_close(io);
    Some(Next::Close)
}

/// Makes the client a PROXY header named the connection's REMOTE_ADDR and
/// REMOTE_PORT, for good (also when the connection is handed over).
fn set_proxy_client(conn: &mut Conn, client: std::net::SocketAddr) {
    // A dual-stack balancer may name an IPv4 client as ::ffff:a.b.c.d.
    let ip = match client.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client.ip(), std::net::IpAddr::V4),
        ip => ip,
    };
    let client = std::net::SocketAddr::new(ip, client.port());
    conn.remote_addr = ip.to_string();
    conn.remote_port = client.port().to_string();
    let _ = conn.entry.proxy_client.set(client);
}

/// Reads until a front end's request variables are complete (uwsgi, SCGI,
/// FastCGI), answering FastCGI management records on the way.
fn read_gateway<A: App>(w: &Shared<A>, conn: &mut Conn) -> Next {
    let listener = &w.listeners[conn.listener].1;
    let protocol = listener.protocol;
    let io_arc = conn.io.clone();
    let mut io = io_arc.lock().unwrap();
    let mut read_once = false;
    let mut want = READ_CHUNK;
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    loop {
        // Set when a uwsgi/SCGI head is complete but its small body is not;
        // park() gives the connection a body's deadline then.
        conn.head_ready = false;
        if !io.buf.is_empty() {
            let parsed = match protocol {
                Protocol::Uwsgi | Protocol::Scgi => {
                    let (head, wire) = if protocol == Protocol::Uwsgi {
                        (gateway::uwsgi_head(&io.buf), Wire::Uwsgi)
                    } else {
                        (gateway::scgi_head(&io.buf), Wire::Scgi)
                    };
                    match head {
                        Ok(Some(head)) => {
                            let len = match cgi::check(&head.params, &io.buf) {
                                Ok(len) => len.unwrap_or(0),
                                Err(e) => return refuse(w, conn, &mut io, wire, e.status(), &e.to_string()),
                            };
                            // A small body is read before the app runs, as over HTTP.
                            let missing = if len <= PREREAD_MAX.min(w.config.max_body_size) {
                                (head.len as u64 + len).saturating_sub(io.buf.len() as u64)
                            } else {
                                0
                            };
                            if missing == 0 {
                                let bytes = io.buf.split_to(head.len).freeze();
                                let body = if len == 0 { BodyState::Done } else { BodyState::Length(len) };
                                Ok(Some(GatewayRequest { bytes, params: head.params, wire, body }))
                            } else {
                                want = missing as usize;
                                conn.head_ready = true;
                                Ok(None)
                            }
                        }
                        Ok(None) => Ok(None),
                        Err(e) => match e.status {
                            // The block was whole: the front end gets a
                            // status to show for it rather than a 502.
                            Some(status) => return refuse(w, conn, &mut io, wire, status, &e.message),
                            None => Err(e.message),
                        },
                    }
                }
                _ => {
                    let mut out = Vec::new();
                    match gateway::fcgi_head(&mut conn.fcgi, &io.buf, &mut out) {
                        Ok((used, req)) => {
                            io.buf.advance(used);
                            for why in std::mem::take(&mut conn.fcgi.refused) {
                                warn!("Bad fastcgi request from {}: {why}", peer(conn, listener));
                            }
                            if req.is_some() || conn.fcgi.active.is_some() {
                                conn.fcgi.chatter = false;
                            } else if used > 0 {
                                conn.fcgi.chatter = true;
                            }
                            if !out.is_empty() && io.write_parts(&[&out], blocking).is_err() {
                                return Next::Close;
                            }
                            if conn.fcgi.close_after {
                                return Next::Close;
                            }
                            match req {
                                Some(r) => {
                                    let wire = Wire::FastCgi { id: r.id, keep_conn: r.keep_conn };
                                    let left = match cgi::check(&r.params, &r.params_bytes) {
                                        Ok(len) => len,
                                        Err(e) => {
                                            return refuse(w, conn, &mut io, wire, e.status(), &e.to_string())
                                        }
                                    };
                                    Ok(Some(GatewayRequest {
                                        bytes: Bytes::from(r.params_bytes),
                                        params: r.params,
                                        wire,
                                        body: BodyState::Fcgi(FcgiIn {
                                            content: 0,
                                            padding: 0,
                                            ended: false,
                                            left,
                                            surplus: 0,
                                        }),
                                    }))
                                }
                                None => Ok(None),
                            }
                        }
                        Err(m) => Err(m),
                    }
                }
            };
            match parsed {
                Ok(Some(req)) => {
                    conn.head_charge.set(0);
                    return Next::Gateway(req);
                }
                Ok(None) => {}
                Err(m) => {
                    warn!(
                        "Bad {} request from {}: {m}; closing the connection",
                        protocol.name(),
                        peer(conn, listener)
                    );
                    drain_and_close(&mut io);
                    return Next::Close;
                }
            }
        }
        // Unfinished variables (in the buffer, or FastCGI PARAMS taken into
        // the connection's state) hold their share of the same budget as
        // HTTP heads: each may reach the protocols' 1 MiB.
        let unfinished = if conn.head_ready { 0 } else { io.buf.len() + conn.fcgi.params.len() };
        let total = conn.head_charge.set(unfinished);
        if unfinished > HEAD_FAIR_SHARE && total > HEAD_BUDGET {
            let why = format!(
                "request variables refused: {} KiB and not ended, while this worker holds {} MiB of \
                 unfinished request heads (at most {} MiB)",
                unfinished >> 10,
                total >> 20,
                HEAD_BUDGET >> 20
            );
            conn.head_charge.set(0);
            let wire = match (protocol, conn.fcgi.active) {
                (Protocol::Uwsgi, _) => Wire::Uwsgi,
                (Protocol::Scgi, _) => Wire::Scgi,
                (_, Some((id, keep_conn))) => Wire::FastCgi { id, keep_conn },
                (_, None) => {
                    warn!(
                        "Bad {} request from {}: {why}; closing the connection",
                        protocol.name(),
                        peer(conn, listener)
                    );
                    drain_and_close(&mut io);
                    return Next::Close;
                }
            };
            return refuse(w, conn, &mut io, wire, 431, &why);
        }
        // Draining, a kept FastCGI connection that brought no request closes;
        // one whose request came in part (its records so far are in the
        // connection's FastCGI state, not in the buffer) reads the rest.
        if draining() && io.buf.is_empty() && read_once && conn.fcgi.active.is_none() {
            return Next::Close;
        }
        let was_empty = io.buf.is_empty();
        match io.read_some(want) {
            Ok(0) if conn.head_ready => {
                // Closed inside a small body: the app still gets the request,
                // and its read of the body fails where the bytes end, as with
                // a larger body (the log says so).
                return take_short_gateway_request(&mut io, protocol);
            }
            Ok(0) => {
                if !io.buf.is_empty() || conn.fcgi.active.is_some() {
                    warn!(
                        "Bad {} request from {}: connection closed inside the request",
                        protocol.name(),
                        peer(conn, listener)
                    );
                }
                return Next::Close;
            }
            Ok(_) => {
                read_once = true;
                // The header timeout counts from the first bytes of a request
                // on a kept connection (from the accept on a new one), not
                // from each read: FastCGI records leave the buffer as they
                // are taken, so a peer sending one record at a time, or only
                // management records, would never reach it.
                if was_empty && conn.fcgi.active.is_none() && !conn.entry.fresh.load(Ordering::Relaxed) {
                    conn.request_started = mono_ms();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if io.buf.is_empty()
                    && conn.fcgi.active.is_none()
                    && idle_linger_over()
                    && !conn.entry.fresh.load(Ordering::Relaxed)
                    && !can_hand_over(w)
                {
                    return Next::Close;
                }
                if !io.buf.is_empty() || conn.fcgi.active.is_some() {
                    io.ack_now();
                }
                return Next::Park;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("read from {}: {e}", peer(conn, listener));
                return Next::Close;
            }
        }
    }
}

/// A uwsgi/SCGI request whose front end closed inside its body.
fn take_short_gateway_request(io: &mut Io, protocol: Protocol) -> Next {
    let (head, wire) = if protocol == Protocol::Uwsgi {
        (gateway::uwsgi_head(&io.buf), Wire::Uwsgi)
    } else {
        (gateway::scgi_head(&io.buf), Wire::Scgi)
    };
    let Ok(Some(head)) = head else {
        return Next::Close;
    };
    let Ok(len) = cgi::check(&head.params, &io.buf) else {
        return Next::Close;
    };
    let bytes = io.buf.split_to(head.len).freeze();
    let body = BodyState::Length(len.unwrap_or(0));
    Next::Gateway(GatewayRequest { bytes, params: head.params, wire, body })
}

/// Answers a gateway request that cannot be served with an error response
/// in the protocol's framing, logs why, and closes the connection.
fn refuse<A: App>(w: &Shared<A>, conn: &Conn, io: &mut Io, wire: Wire, status: u16, why: &str) -> Next {
    let listener = &w.listeners[conn.listener].1;
    warn!(
        "Bad {} request from {}: {why} ({status} {})",
        listener.protocol.name(),
        peer(conn, listener),
        reason(status)
    );
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    let reply = error_reply(wire, status, why);
    let _ = io.write_parts(&[&reply], blocking);
    record_refusal(w, Ok(conn), conn.listener, &io.buf, status, &reply);
    drain_and_close(io);
    Next::Close
}

/// Hands the connection back to epoll until it is readable again.
fn park<A: App>(w: &Shared<A>, mut conn: Box<Conn>) {
    let now = mono_ms();
    let (idle, drained, buffered, discard_until) = {
        let mut io = conn.io.lock().unwrap();
        let buffered = io.buf.len() as u64;
        let idle = buffered == 0;
        if idle {
            // An idle connection holds no buffer: there may be thousands of
            // them, and the next request gets a fresh one big enough to be
            // read in one call. Nor room for held responses (written by now).
            io.buf = bytes::BytesMut::new();
            if io.out.is_empty() {
                io.out = Vec::new();
            }
        }
        (idle, io.drained, buffered, io.discard_until)
    };
    // A new connection has the header timeout, counted from the accept, to
    // send its first request; between requests the keep-alive timeout applies.
    // A FastCGI request whose records came in part has left the buffer for
    // the connection's FastCGI state: it is inside a request, on the header
    // timeout, though its buffer is empty.
    // Neither is one whose response is out while the rest of a body the app
    // did not read is still to come and be dropped.
    let between =
        idle && !conn.entry.fresh.load(Ordering::Relaxed) && conn.fcgi.active.is_none() && discard_until == 0;
    let deadline = if discard_until != 0 {
        discard_until
    } else if between {
        // Only a FastCGI connection the front end asked to keep is idle here
        // when HTTP keep-alive is off (a zero timeout); it keeps the default.
        let idle_for = match w.config.keepalive_timeout {
            t if t.is_zero() => crate::config::DEFAULT_KEEPALIVE_TIMEOUT,
            t => t,
        };
        if conn.fcgi.chatter && conn.entry.between.load(Ordering::Relaxed) {
            // Only management records since it was parked idle: it stays on
            // that idle clock, or a peer sending GET_VALUES now and then
            // would hold it open for good.
            conn.entry.deadline.load(Ordering::Relaxed)
        } else {
            now + idle_for.as_millis() as u64
        }
    } else if conn.head_ready {
        // Its head is in, and its small body is read ahead of the app: the
        // body has the grace any body has, then must keep coming at
        // MIN_BODY_RATE, as it would with the app reading it.
        conn.request_started
            + w.config.header_timeout.as_millis() as u64
            + buffered * 1000 / crate::exchange::MIN_BODY_RATE
    } else {
        conn.request_started + w.config.header_timeout.as_millis() as u64
    };
    conn.entry.deadline.store(deadline, Ordering::Relaxed);
    conn.entry.between.store(between, Ordering::Relaxed);
    conn.fcgi.chatter = false;
    conn.entry.body_ahead.store(conn.head_ready && discard_until == 0, Ordering::Relaxed);
    // A fresh connection whose PROXY header was taken would be expected to
    // send one again by a worker it were handed to.
    let proxy_taken = conn.entry.fresh.load(Ordering::Relaxed)
        && !conn.proxy_pending
        && w.config.proxy_protocol
        && w.listeners[conn.listener].1.protocol == Protocol::Http;
    let untouched = idle && conn.fcgi.active.is_none() && !proxy_taken && discard_until == 0;
    conn.entry.untouched.store(untouched, Ordering::Relaxed);
    // The bytes of a request begun are all in the buffer, from its first
    // on, except inside a FastCGI request, whose records so far went to its
    // state: they are encoded again to go ahead of the buffer. Not a body
    // being dropped. A PROXY header taken is not among them: the sibling
    // takes the client it named from the note, and the connection as one a
    // request began on, with no PROXY header to come.
    let begun = if discard_until != 0 || conn.fcgi.close_after {
        NOT_BEGUN
    } else if conn.fcgi.active.is_some() {
        // Sized before it is encoded: PARAMS may hold up to 1 MiB.
        if crate::gateway::fcgi_resume_len(&conn.fcgi) as u64 + buffered
            <= crate::handover::CARRIED_MAX as u64
        {
            *conn.entry.resume.lock().unwrap_or_else(|p| p.into_inner()) =
                crate::gateway::fcgi_resume(&conn.fcgi);
            BEGUN_FASTCGI
        } else {
            NOT_BEGUN
        }
    } else if idle || buffered > crate::handover::CARRIED_MAX as u64 {
        NOT_BEGUN
    } else if conn.proxy_pending {
        BEGUN_BEFORE_PROXY
    } else {
        BEGUN
    };
    conn.entry.begun.store(begun, Ordering::Relaxed);
    let op = if conn.registered { libc::EPOLL_CTL_MOD } else { libc::EPOLL_CTL_ADD };
    // Edge-triggered and still armed: bytes that arrive from now on raise an
    // event, and none are waiting unread, since the last read found the
    // socket empty and every byte since then raised an event of its own. A
    // hang-up already reported is not reported again: re-arm, which looks.
    let armed = conn.edge && conn.registered && drained && !conn.hung_up;
    conn.registered = true;
    let edge = conn.edge;
    let fd = conn.entry.fd;
    let entry = conn.entry.clone();
    let ptr = Box::into_raw(conn);
    entry.state.store(IDLE, Ordering::Release);
    if armed {
        return;
    }
    // One-shot with several threads: the event goes to one of them, which
    // owns the connection until it parks it again. A MOD also checks the
    // socket, so bytes already waiting raise the event at once.
    let mode = if edge { libc::EPOLLET } else { libc::EPOLLONESHOT };
    let mut ev =
        libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP | mode) as u32, u64: ptr as u64 };
    // First park of a new connection adds it; later ones re-arm it.
    if unsafe { libc::epoll_ctl(w.epfd, op, fd, &mut ev) } < 0 {
        error!("epoll_ctl: {}", io::Error::last_os_error());
        let conn = unsafe { Box::from_raw(ptr) };
        close(w, conn, false);
    }
}

fn close<A: App>(w: &Shared<A>, conn: Box<Conn>, reset: bool) {
    let fd = conn.entry.fd;
    {
        // The flusher may still hold this connection's handle: nothing may
        // be written to the descriptor number once it is closed and reused.
        let mut io = conn.io.lock().unwrap_or_else(|p| p.into_inner());
        io.release();
        // A write gave up on the client where no request was at hand to
        // name (held responses to pipelined requests, written after them).
        if io.stalled && !io.stall_logged {
            io.stall_logged = true;
            info!(
                "Connection from {}: {} ({} s); closing it",
                peer(&conn, &w.listeners[conn.listener].1),
                crate::exchange::STALLED_READER,
                w.config.io_timeout.as_secs_f64()
            );
        }
    }
    {
        let mut reg = w.registry.lock().unwrap();
        reg.entries[conn.slot] = None;
        reg.free.push(conn.slot);
        reg.live -= 1;
        w.scoreboard.set_conns(w.slot, reg.live);
        if conn.entry.handed.load(Ordering::Relaxed) {
            w.handed.fetch_sub(1, Ordering::Relaxed);
        }
        if reset {
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
        }
        if conn.edge && conn.registered {
            // Still armed (edge-triggered): close() alone leaves it in the
            // epoll set while a forked child of the app holds a copy of the
            // descriptor, and its next event would name this freed box.
            unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        }
        // Not one a sibling now serves: shutdown would end it there too.
        if !reset && APP_FORKED.load(Ordering::Relaxed) && !conn.entry.handed.load(Ordering::Relaxed) {
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        // Closed under the registry lock so the sweeper never shuts down a
        // reused descriptor number.
        unsafe { libc::close(fd) };
    }
    drop(conn);
}

/// Reads and discards what the client already sent, so that closing does not
/// turn into a reset that destroys the response still in flight.
fn drain_and_close(io: &mut Io) {
    let _ = io.flush_out(|f| f());
    let fd = io.fd;
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        if unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } <= 0 {
            break;
        }
    }
}

/// A request ready to be served.
enum Incoming {
    /// An HTTP request whose head is the first `n` buffered bytes.
    Http(usize),
    Gateway(GatewayRequest),
}

/// Serves one request.
fn handle_request<A: App>(
    w: &Shared<A>,
    state: &mut A::Thread,
    t: usize,
    conn: &mut Conn,
    incoming: Incoming,
) -> Outcome {
    let listener = &w.listeners[conn.listener].1;
    conn.entry.fresh.store(false, Ordering::Relaxed);
    let (bytes, params, generation, too_large) = {
        let mut io = conn.io.lock().unwrap();
        let (bytes, params) = match incoming {
            Incoming::Http(n) => {
                let head_bytes = io.buf.split_to(n).freeze();
                let head = &conn.head;
                io.wire = Wire::Http;
                io.body = match head.framing {
                    BodyFraming::None => BodyState::Done,
                    BodyFraming::Length(len) => BodyState::Length(len),
                    BodyFraming::Chunked => BodyState::Chunked(http1::ChunkedDecoder::new()),
                };
                io.continue_owed = head.expect_continue && !matches!(io.body, BodyState::Done);
                io.http11 = head.version == Version::Http11;
                io.head_request = &head_bytes[head.method.clone()] == b"HEAD";
                // A zero --keepalive-timeout turns keep-alive off (gunicorn's 0).
                // Draining, a connection closes after this request unless
                // the client sent another behind it already.
                io.keep_alive = head.keep_alive
                    && (!draining() || io.pipelined())
                    && !w.config.keepalive_timeout.is_zero();
                (head_bytes, None)
            }
            Incoming::Gateway(g) => {
                io.wire = g.wire;
                io.body = g.body;
                io.continue_owed = false;
                io.http11 = true;
                io.head_request = g.params.get(&g.bytes, b"REQUEST_METHOD") == Some(b"HEAD");
                io.keep_alive =
                    matches!(g.wire, Wire::FastCgi { keep_conn: true, .. }) && fastcgi_conn_may_stay();
                (g.bytes, Some(g.params))
            }
        };
        // The body's declared length: uwsgi and SCGI frame the body by it;
        // FastCGI streams STDIN, but the front end says its length too.
        let declared = match (&io.body, &params) {
            (BodyState::Length(len), _) => Some(*len),
            (BodyState::Fcgi(_), Some(p)) if w.config.max_body_size != u64::MAX => p
                .get(&bytes, b"CONTENT_LENGTH")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse::<u64>().ok()),
            _ => None,
        };
        let too_large = declared.filter(|&len| len > w.config.max_body_size);
        io.body_received = 0;
        io.body_deadline = 0;
        io.discard_until = 0;
        io.pending.clear();
        io.phase = RespPhase::Idle;
        io.block_at = None;
        io.status = 0;
        io.app_length = None;
        io.app_date = false;
        io.bytes_sent = 0;
        io.aborted = false;
        io.fcgi_aborted = false;
        io.fcgi_ended = false;
        if w.access.as_ref().is_some_and(|a| a.format.needs_response_headers()) {
            io.logged_headers.get_or_insert_with(Vec::new).clear();
        }
        io.logged_environ.clear();
        io.generation += 1;
        (bytes, params, io.generation, too_large)
    };
    let forwarded_https = match params {
        Some(_) => false,
        None if !conn.head.scheme_fields => false,
        None if !w.config.forwarded_allow.trusts(&conn.peer_addr, listener.is_unix) => false,
        None => match crate::forwarded::scheme(&conn.head, &bytes) {
            crate::forwarded::Scheme::Https => true,
            crate::forwarded::Scheme::Http | crate::forwarded::Scheme::Unsaid => false,
            crate::forwarded::Scheme::Contradictory => {
                let mut io = conn.io.lock().unwrap();
                info!(
                    "Bad request from {}: contradictory scheme headers (X-Forwarded-Proto, \
                     X-Forwarded-Protocol, X-Forwarded-SSL) (400 Bad Request)",
                    peer(conn, listener)
                );
                let reply = error_reply(io.wire, 400, "contradictory scheme headers");
                let _ = io.write_parts(&[&reply], |f| f());
                record_refusal(w, Ok(conn), conn.listener, &bytes, 400, &reply);
                drain_and_close(&mut io);
                return Outcome::Done(false);
            }
        },
    };
    let req = Request {
        meta: match &params {
            Some(p) => Meta::Cgi(p),
            None => Meta::Http(&conn.head),
        },
        bytes: &bytes,
        remote_addr: &conn.remote_addr,
        remote_port: &conn.remote_port,
        listener,
        listener_index: conn.listener,
        forwarded_https,
    };
    if let Some(len) = too_large {
        info!(
            "Request body too large from {}: Content-Length {len} exceeds --max-body-size {}",
            req.peer(),
            w.config.max_body_size
        );
        let mut io = conn.io.lock().unwrap();
        let blocking: fn(&mut dyn FnMut()) = |f| f();
        let reply = error_reply(io.wire, 413, "request body too large");
        let _ = io.write_parts(&[&reply], blocking);
        record_refused_request(w, conn, &req, 413, &reply);
        if io.wire != Wire::Http {
            // A front end reads the 413 only once it has sent the body.
            discard_front_end_body(&mut io, blocking, &req);
        }
        drain_and_close(&mut io);
        return Outcome::Done(false);
    }
    // For the main thread, should this request run past --timeout or its
    // thread crash. The access log's note of it only with --timeout: a
    // crash is rare enough to go without that line.
    let note = w.config.timeout.and(w.access.as_ref()).map(|log| LogNote::of(log, conn, &req));
    *w.current[t].lock().unwrap() = Some((conn.entry.fd, conn.io.clone(), listener.protocol, note));
    let started = Instant::now();
    let began_ms = mono_ms();
    w.scoreboard.begin(w.slot, t, req.method(), req.target(), began_ms);
    reset_client_wait(t);
    // gunicorn's debug level has a line per request too.
    debug!("{} {}", String::from_utf8_lossy(req.method()), String::from_utf8_lossy(req.target()));
    match static_target(&w.config.static_mounts, &req) {
        Some((mount, rel)) => {
            // Answered here: no app, no GIL, so waits block this thread plainly.
            let ex = Exchange { io: conn.io.clone(), generation, blocking: |f| f() };
            let header = |name: &str| request_header(&req, name);
            let values = [
                "if-match",
                "if-none-match",
                "if-modified-since",
                "if-unmodified-since",
                "if-range",
                "range",
                "accept-encoding",
            ]
            .map(header);
            let v = |i: usize| values[i].as_deref();
            let conditions = crate::static_files::Conditions {
                if_match: v(0),
                if_none_match: v(1),
                if_modified_since: v(2),
                if_unmodified_since: v(3),
                if_range: v(4),
                range: v(5),
                accept_encoding: v(6),
                query: match req.cgi() {
                    Some(c) => c.get(req.bytes, b"QUERY_STRING").unwrap_or(b""),
                    None => req.query(),
                },
            };
            let method = req.method();
            let ok = method == b"GET" || method == b"HEAD";
            crate::static_files::serve(&ex, mount, &rel, method == b"HEAD", ok, &conditions);
        }
        None => {
            let mut ex = Exchange { io: conn.io.clone(), generation, blocking: A::blocking };
            w.app.call(state, &req, &mut ex);
        }
    }
    w.scoreboard.end(w.slot, t);
    let timed_out = {
        *w.current[t].lock().unwrap() = None;
        w.timed_out[t].swap(false, Ordering::AcqRel)
    };
    let keep = if timed_out {
        w.stuck.fetch_sub(1, Ordering::AcqRel);
        warn!("Timed-out request {} returned after all", req.describe());
        false
    } else {
        let mut io = conn.io.lock().unwrap();
        // A file the socket could not take at once (Exchange::send_file).
        if w.offload.is_some() {
            if let Some(transfer) = io.pending_file.take() {
                // The app's handles (a kept write callable, wsgi.input) are
                // stale from here on, as after any response.
                io.generation += 1;
                let shown = w.scoreboard.begin_download(w.slot, req.method(), req.target(), began_ms);
                return Outcome::Offload(Download { transfer, bytes: bytes.clone(), params, started, shown });
            }
        }
        // Without the offload thread, io.finish sends the rest here.
        complete_locked_noted(conn, listener, &req, &mut io)
    };
    // A timed-out request was counted and logged when it timed out (check_timeouts).
    after_request(w, t, conn, &req, started, !timed_out);
    if keep {
        conn.request_started = mono_ms();
    }
    Outcome::Done(keep)
}

/// The end of every request: metrics (unless `count` is false), `--max-requests`,
/// the access log line.
fn after_request<A: App>(
    w: &Shared<A>,
    t: usize,
    conn: &Conn,
    req: &Request<'_>,
    started: Instant,
    count: bool,
) {
    let took = started.elapsed();
    if count {
        let mut io = conn.io.lock().unwrap();
        let bytes_in = std::mem::take(&mut io.read_total);
        let protocol = req.listener.protocol as usize;
        w.scoreboard.record(w.slot, protocol, io.status, took.as_micros() as u64, bytes_in, io.bytes_sent);
    }
    // --max-requests is judged at each request's end, as gunicorn does,
    // rather than at the next sweep, which may come hundreds of requests later.
    if let Some(max) = w.max_requests {
        let served = w.scoreboard.requests(w.slot);
        if served >= max && !RECYCLING.load(Ordering::Acquire) {
            ask_recycle(w, Retire::MaxRequests, &format!("served {served} requests (limit {max})"));
        }
    }
    if let (Some(log), true) = (&w.access, count) {
        log_request(log, t, conn, req, took);
    }
}

impl Offload {
    /// `serving` is the serving threads' epoll set.
    fn new(serving: RawFd) -> io::Result<Offload> {
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
        let wake = eventfd_in(epfd.as_raw_fd(), libc::EPOLLIN, OFFLOAD_WAKE)?;
        // Edge-triggered: each write wakes one pass, which takes one
        // download and writes again if more wait.
        let done_wake = eventfd_in(serving, libc::EPOLLIN | libc::EPOLLET, OFFLOADED_TOKEN)?;
        Ok(Offload {
            epfd,
            wake,
            queue: Mutex::new(Vec::new()),
            done_wake,
            done: Mutex::new(std::collections::VecDeque::new()),
            sending: AtomicUsize::new(0),
        })
    }
}

/// A new eventfd, in epoll set `epfd` for `events` under `token`.
fn eventfd_in(epfd: RawFd, events: i32, token: u64) -> io::Result<OwnedFd> {
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ev = libc::epoll_event { events: events as u32, u64: token };
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Takes the first of the queue an eventfd (edge-triggered) woke a thread
/// for, and wakes another thread if more are waiting.
fn take_one<T>(queue: &Mutex<std::collections::VecDeque<T>>, wake_fd: &OwnedFd) -> Option<T> {
    clear(wake_fd);
    let mut queue = queue.lock().unwrap();
    let first = queue.pop_front();
    if !queue.is_empty() {
        wake(wake_fd);
    }
    first
}

fn clear(fd: &OwnedFd) {
    let mut count = 0u64;
    unsafe { libc::read(fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
}

/// Completes the downloads the offload thread is done with, and serves
/// what their connections bring next.
fn take_offloaded<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, held: &mut Held) {
    let Some(off) = &w.offload else {
        return;
    };
    // One per wake-up: the next request on a returned connection may be
    // slow, and the other returned connections go to other threads meanwhile.
    let Some(job) = take_one(&off.done, &off.done_wake) else {
        return;
    };
    let (conn, keep) = finish_download(w, t, job);
    if keep {
        serve_claimed(w, state, t, conn, held);
    } else {
        // Held bytes (FastCGI's END_REQUEST) go out before it closes.
        held.settle(w, conn, false);
    }
}

/// Hands the rest of a download to the offload thread.
fn offload<A: App>(w: &Shared<A>, mut conn: Box<Conn>, rest: Download) {
    let Some(off) = &w.offload else {
        return;
    };
    leave_serving_set(w, &mut conn);
    let sent = conn.io.lock().unwrap().bytes_sent;
    off.sending.fetch_add(1, Ordering::AcqRel);
    off.queue.lock().unwrap().push(Offloaded { conn, rest, sent, progress: mono_ms() });
    wake(&off.wake);
}

/// The offload thread: sends each download's file as its client's socket
/// takes it, and hands the connection back to the serving threads when all
/// of it went out, the client failed, or it took nothing for the write
/// timeout.
fn offload_main<A: App>(w: &Shared<A>) {
    let Some(off) = &w.offload else {
        return;
    };
    let epfd = off.epfd.as_raw_fd();
    let mut jobs: Vec<Option<Offloaded>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let end = |jobs: &mut Vec<Option<Offloaded>>, free: &mut Vec<usize>, i: usize| {
        if let Some(job) = jobs[i].take() {
            free.push(i);
            unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, job.conn.entry.fd, std::ptr::null_mut()) };
            off.done.lock().unwrap().push_back(job);
            off.sending.fetch_sub(1, Ordering::AcqRel);
            wake(&off.done_wake);
        }
    };
    loop {
        // Woken once a second while downloads run, to give up on stalled clients.
        let timeout = if free.len() < jobs.len() { 1000 } else { -1 };
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("epoll_wait (offload thread): {e}");
            return;
        }
        for ev in &events[..n as usize] {
            if ev.u64 == OFFLOAD_WAKE {
                clear(&off.wake);
                let taken = std::mem::take(&mut *off.queue.lock().unwrap());
                for job in taken {
                    let fd = job.conn.entry.fd;
                    let i = free.pop().unwrap_or_else(|| {
                        jobs.push(None);
                        jobs.len() - 1
                    });
                    jobs[i] = Some(job);
                    let mut ev = libc::epoll_event {
                        events: (libc::EPOLLOUT | libc::EPOLLONESHOT) as u32,
                        u64: i as u64,
                    };
                    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                        error!("epoll_ctl (offload thread): {}", io::Error::last_os_error());
                        if let Some(job) = jobs[i].as_mut() {
                            job.conn.io.lock().unwrap().broken = true;
                        }
                        end(&mut jobs, &mut free, i);
                    }
                }
                continue;
            }
            let i = ev.u64 as usize;
            let Some(job) = jobs.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            let fd = job.conn.entry.fd;
            let step = {
                let mut io = job.conn.io.lock().unwrap();
                let step = io.advance(&mut job.rest.transfer);
                if io.bytes_sent != job.sent {
                    job.sent = io.bytes_sent;
                    job.progress = mono_ms();
                }
                if let Err(ResponseError::Invalid(why)) = &step {
                    // Logged with the request when a serving thread completes it.
                    io.body_note = Some(format!("sending the file: {why}; closing the connection"));
                }
                step
            };
            let done = !matches!(step, Ok(false));
            let mut ev =
                libc::epoll_event { events: (libc::EPOLLOUT | libc::EPOLLONESHOT) as u32, u64: i as u64 };
            if done || unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) } < 0 {
                end(&mut jobs, &mut free, i);
            }
        }
        let now = mono_ms();
        let limit = w.config.io_timeout.as_millis() as u64;
        for i in 0..jobs.len() {
            let stalled = jobs[i].as_ref().is_some_and(|job| now.saturating_sub(job.progress) >= limit);
            if stalled {
                if let Some(job) = jobs[i].as_mut() {
                    let listener = &w.listeners[job.conn.listener].1;
                    info!(
                        "Gave up sending a file to {}: it took nothing for {} s ({} bytes sent)",
                        peer(&job.conn, listener),
                        w.config.io_timeout.as_secs_f64(),
                        job.sent
                    );
                    job.conn.io.lock().unwrap().broken = true;
                }
                end(&mut jobs, &mut free, i);
            }
        }
    }
}

/// Completes a request whose file went out (or failed to) as any other
/// request: the framing's end, log line, metrics. Returns the connection
/// and whether it carries another request.
fn finish_download<A: App>(w: &Shared<A>, t: usize, job: Offloaded) -> (Box<Conn>, bool) {
    let Offloaded { mut conn, rest, .. } = job;
    let listener = &w.listeners[conn.listener].1;
    let keep = {
        let req = Request {
            meta: match &rest.params {
                Some(p) => Meta::Cgi(p),
                None => Meta::Http(&conn.head),
            },
            bytes: &rest.bytes,
            remote_addr: &conn.remote_addr,
            remote_port: &conn.remote_port,
            listener,
            listener_index: conn.listener,
            forwarded_https: false,
        };
        let keep = complete(&conn, listener, &req);
        w.scoreboard.end_download(w.slot, rest.shown);
        after_request(w, t, &conn, &req, rest.started, true);
        keep
    };
    if keep {
        conn.request_started = mono_ms();
    }
    (conn, keep)
}

/// The `--static` mount a request falls under, with the decoded path below it.
fn static_target<'m>(
    mounts: &'m [crate::static_files::Mount],
    req: &Request<'_>,
) -> Option<(&'m crate::static_files::Mount, Vec<u8>)> {
    if mounts.is_empty() {
        return None;
    }
    let raw: &[u8] = match req.cgi() {
        Some(c) => {
            // The path the app would see as SCRIPT_NAME + PATH_INFO, so that a
            // file is served for the path the front end routed on: PATH_INFO
            // (decoded by the front end), else DOCUMENT_URI (nginx's, also
            // normalized), else REQUEST_URI decoded and normalized.
            let path = match (c.get(req.bytes, b"PATH_INFO"), c.get(req.bytes, b"DOCUMENT_URI")) {
                (Some(p), _) => p.to_vec(),
                (None, Some(d)) if d.starts_with(b"/") => d.to_vec(),
                _ => {
                    let uri = c.get(req.bytes, b"REQUEST_URI").unwrap_or(b"");
                    cgi::request_path(uri.split(|&b| b == b'?').next().unwrap_or(b""))
                }
            };
            return mounts.iter().find_map(|m| m.takes(&path, req.method()).map(|r| (m, r.to_vec())));
        }
        None => req.path(),
    };
    let mut decoded = Vec::with_capacity(raw.len());
    corral_proto::http1::percent_decode(raw, &mut decoded);
    mounts.iter().find_map(|m| m.takes(&decoded, req.method()).map(|r| (m, r.to_vec())))
}

/// A request header by lower-case name (joined with "," when repeated over
/// HTTP; as the front end sent it otherwise).
fn request_header<'r>(req: &Request<'r>, name: &str) -> Option<std::borrow::Cow<'r, [u8]>> {
    match req.cgi() {
        Some(c) => {
            let key: Vec<u8> = b"HTTP_"
                .iter()
                .copied()
                .chain(name.bytes().map(|b| if b == b'-' { b'_' } else { b.to_ascii_uppercase() }))
                .collect();
            join_values(c.iter(req.bytes).filter(|(k, _)| *k == &key[..]).map(|(_, v)| v))
        }
        None => join_values(
            req.fields().filter(|(n, _, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v, _)| v),
        ),
    }
}

/// Several field lines of one name are one comma-separated list (RFC 9110 5.3).
fn join_values<'r>(mut values: impl Iterator<Item = &'r [u8]>) -> Option<std::borrow::Cow<'r, [u8]>> {
    let first = values.next()?;
    let mut joined: Option<Vec<u8>> = None;
    for v in values {
        let j = joined.get_or_insert_with(|| first.to_vec());
        j.extend_from_slice(b", ");
        j.extend_from_slice(v);
    }
    Some(joined.map_or(std::borrow::Cow::Borrowed(first), std::borrow::Cow::Owned))
}

/// Writes the access log line of a request that has ended.
/// The client as the access log names it: the front end's REMOTE_ADDR, or the peer.
fn log_remote(conn: &Conn, req: &Request<'_>) -> String {
    match req.cgi().and_then(|c| c.get(req.bytes, b"REMOTE_ADDR")) {
        Some(a) => String::from_utf8_lossy(a).into_owned(),
        None => conn.remote_addr.clone(),
    }
}

/// The protocol as the access log names it: the front end's SERVER_PROTOCOL,
/// or the request line's.
fn log_protocol(req: &Request<'_>) -> String {
    match req.cgi().and_then(|c| c.get(req.bytes, b"SERVER_PROTOCOL")) {
        Some(p) => String::from_utf8_lossy(p).into_owned(),
        None => req.protocol().to_string(),
    }
}

/// What the access log line of a request that may run past --timeout
/// needs, kept as it starts: its thread may never come back to write the
/// line, so [`check_timeouts`] writes it.
struct LogNote {
    remote: String,
    method: Vec<u8>,
    target: Vec<u8>,
    protocol: String,
    /// The request headers the log format shows.
    headers: Vec<(String, Vec<u8>)>,
}

impl LogNote {
    fn of(log: &AccessLog, conn: &Conn, req: &Request<'_>) -> Box<LogNote> {
        Box::new(LogNote {
            remote: log_remote(conn, req),
            method: req.method().to_vec(),
            target: req.target().to_vec(),
            protocol: log_protocol(req),
            headers: log
                .format
                .request_header_names()
                .into_iter()
                .filter_map(|n| request_header(req, &n).map(|v| (n, v.into_owned())))
                .collect(),
        })
    }

    /// Writes the line of the request, which ended with `status` after `micros`.
    fn log(&self, log: &AccessLog, status: u16, bytes: u64, micros: u64) {
        let header = |name: &str| self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let none = |_: &str| -> Option<Vec<u8>> { None };
        log.log_now(&crate::access::Entry {
            remote_addr: &self.remote,
            method: &self.method,
            target: &self.target,
            protocol: &self.protocol,
            status,
            bytes,
            micros,
            request_header: &header,
            response_header: &none,
            environ: &none,
        });
    }
}

fn log_request(log: &AccessLog, t: usize, conn: &Conn, req: &Request<'_>, took: Duration) {
    let io = conn.io.lock().unwrap();
    let remote = log_remote(conn, req);
    let request_header = |name: &str| request_header(req, name).map(std::borrow::Cow::into_owned);
    let response_header = |name: &str| -> Option<Vec<u8>> {
        let kept = io.logged_headers.as_ref()?;
        // The last of repeated ones (Set-Cookie), as gunicorn's.
        kept.iter().rev().find(|(n, _)| n == name.as_bytes()).map(|(_, v)| v.clone())
    };
    let environ = |name: &str| io.logged_environ.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let protocol = log_protocol(req);
    log.log(
        t,
        &crate::access::Entry {
            remote_addr: &remote,
            method: req.method(),
            target: req.target(),
            protocol: &protocol,
            status: io.status,
            bytes: io.bytes_sent,
            micros: took.as_micros() as u64,
            request_header: &request_header,
            response_header: &response_header,
            environ: &environ,
        },
    );
}

/// Finishes the exchange after the app returned: completes or aborts the
/// response and decides whether the connection carries another request.
fn complete(conn: &Conn, listener: &ListenerInfo, req: &Request<'_>) -> bool {
    complete_locked_noted(conn, listener, req, &mut conn.io.lock().unwrap())
}

/// [`complete_locked`], then the body's note in the log.
fn complete_locked_noted(conn: &Conn, listener: &ListenerInfo, req: &Request<'_>, io: &mut Io) -> bool {
    let keep = complete_locked(conn, listener, req, io);
    if let Some(note) = io.body_note.take() {
        // A client going away is routine; a body too slow or broken is not.
        if matches!(io.body, BodyState::Failed(BodyError::Truncated)) {
            info!("{} from {}: {note}", req.describe(), req.peer());
        } else {
            warn!("{} from {}: {note}", req.describe(), req.peer());
        }
    }
    keep
}

fn complete_locked(conn: &Conn, listener: &ListenerInfo, req: &Request<'_>, io: &mut Io) -> bool {
    // Stale handles kept by the app must not touch the next request.
    io.generation += 1;
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    if io.fcgi_aborted {
        // The front end gave up on this request (ABORT_REQUEST): it is owed
        // END_REQUEST, and the connection stays usable when it asked for that.
        info!("{} from {}: the front end aborted the request", req.describe(), req.peer());
        if io.end_fcgi_request(blocking).is_err() || !io.keep_alive {
            return false;
        }
        return true;
    }
    if io.phase == RespPhase::Idle && !io.broken && !io.aborted {
        error!("App returned without starting a response: {}", req.describe());
        io.keep_alive = false;
        io.status = 500;
        let reply = error_reply(io.wire, 500, "Internal Server Error");
        let _ = io.write_parts(&[&reply], blocking);
        return false;
    }

    if io.phase != RespPhase::Finished && !io.broken && !io.aborted {
        if let Err(e) = io.finish(blocking) {
            warn!("{} from {}: {e}", req.describe(), req.peer());
        }
    }
    if io.aborted {
        // What was held of the response goes out before the reset, as it
        // would have without holding.
        let _ = io.flush_out(blocking);
        if let (Wire::FastCgi { id, .. }, true) = (io.wire, listener.is_unix) {
            // FastCGI has no record that says a response failed, and on a
            // unix socket, which has no reset, nginx takes a close without
            // END_REQUEST for the response's end. A record header of version
            // 0 fails the response there. (Over TCP the reset does, for
            // every front end; HAProxy would end the response normally on
            // such a header.)
            let [hi, lo] = id.to_be_bytes();
            let _ = io.write_parts(&[&[0, 6, hi, lo, 0, 0, 0, 0]], blocking);
        }
        // Reset, so the client cannot mistake a truncated body for a whole one.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        unsafe {
            libc::setsockopt(
                conn.entry.fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as u32,
            )
        };
        return false;
    }
    if io.broken {
        return false;
    }
    if matches!(io.body, BodyState::Failed(_)) {
        warn_bad_stream(conn, listener, io);
        drain_and_close(io);
        return false;
    }
    if !io.keep_alive {
        if io.wire != Wire::Http && !io.body_finished() {
            // A front end may still be sending the request (the empty STDIN
            // record Apache sends after the response began, a body the app
            // ignored): read it before closing, or the close turns into a
            // reset that destroys the response the front end has not read yet.
            discard_front_end_body(io, blocking, req);
        }
        warn_bad_stream(conn, listener, io);
        if !io.body_finished() || !io.buf.is_empty() {
            drain_and_close(io);
        }
        return false;
    }
    if !io.body_finished() {
        // Discard what the app did not read so the next request parses from
        // the right byte. From a client, what has not come yet is dropped
        // as it comes, from the event loop: a thread waiting for it would
        // serve no one else meanwhile.
        let discarded = if io.wire == Wire::Http {
            io.discard_until = mono_ms() + DRAIN_WAIT.as_millis() as u64;
            io.discarded = 0;
            discard_available(io)
        } else {
            discard_body(io, blocking)
        };
        match discarded {
            Discarded::All => {}
            Discarded::Later => io.discard_what = format!("{} from {}", req.describe(), req.peer()),
            Discarded::Failed => {
                log_discard_failed(peer(conn, listener), io);
                warn_bad_stream(conn, listener, io);
                return false;
            }
            Discarded::GaveUp(why) => {
                // The response promised to keep the connection: say why it closes.
                log_discard_gave_up(&format!("{} from {}", req.describe(), req.peer()), why);
                drain_and_close(io);
                return false;
            }
        }
    }
    true
}

/// Says why a connection closes before the rest of the body the app did
/// not read was dropped.
fn log_discard_gave_up(what: &str, why: GaveUp) {
    match why {
        GaveUp::Stalled => info!(
            "{what}: closing the connection: the rest of a request body the app did not read \
             did not come within {} s",
            DRAIN_WAIT.as_secs()
        ),
        GaveUp::TooMuch => info!(
            "{what}: closing the connection: more than {MAX_DRAIN} bytes were left of a request body \
             the app did not read"
        ),
        GaveUp::TooLong => warn!(
            "{what}: closing the connection: the front end was still sending a request body the \
             app did not read after {} s",
            FRONT_END_DRAIN_TIME.as_secs()
        ),
    }
}

/// Drops the rest of a front end's body the app did not read before the
/// connection closes ([`discard_body`]), saying so when that was cut short.
fn discard_front_end_body(io: &mut Io, blocking: fn(&mut dyn FnMut()), req: &Request<'_>) {
    if let Discarded::GaveUp(why) = discard_body(io, blocking) {
        log_discard_gave_up(&format!("{} from {}", req.describe(), req.peer()), why);
    }
}

/// Drops what came of the rest of a body the app did not read, before the
/// next request head is looked at; `Some` when the connection cannot go on
/// to it yet (or at all).
fn go_on_discarding<A: App>(w: &Shared<A>, conn: &mut Conn, io: &mut Io) -> Option<Next> {
    match discard_available(io) {
        Discarded::All => {
            // The next head's header timeout counts from here, as it would
            // from the previous response had nothing been left to drop: its
            // first bytes may have come with the body's last ones.
            conn.request_started = mono_ms();
            None
        }
        Discarded::Later => Some(Next::Park),
        Discarded::GaveUp(why) => {
            log_discard_gave_up(&io.discard_what, why);
            drain_and_close(io);
            Some(Next::Close)
        }
        Discarded::Failed => {
            log_discard_failed(peer(conn, &w.listeners[conn.listener].1), io);
            Some(Next::Close)
        }
    }
}

/// Says why a body the app did not read could not be dropped, when the
/// client broke its chunked framing (no one else says so: the app never
/// read it).
fn log_discard_failed(peer: String, io: &Io) {
    if let BodyState::Failed(BodyError::Framing(e)) = io.body {
        info!(
            "Bad request body from {peer}: {}, in the body the app did not read; closing the connection",
            crate::exchange::chunked_fault(e)
        );
    }
}

/// How discarding the rest of a request body ended.
enum Discarded {
    All,
    /// The rest has not come yet: the connection waits in epoll for it
    /// (until [`Io::discard_until`]).
    Later,
    /// The stream broke (or the front end broke its framing).
    Failed,
    /// The rest was too much, or too slow, to wait for.
    GaveUp(GaveUp),
}

/// Why the rest of a body the app did not read was not dropped to its end.
#[derive(Debug, Clone, Copy)]
enum GaveUp {
    /// Nothing came for [`DRAIN_WAIT`].
    Stalled,
    /// More than [`MAX_DRAIN`] was left of a client's body.
    TooMuch,
    /// A front end was still sending after [`FRONT_END_DRAIN_TIME`].
    TooLong,
}

/// The longest the serving thread waits for the rest of a body the app did
/// not read. The thread serves nothing else meanwhile, so a client that
/// declares a body and stops sending must not hold it for the whole I/O
/// timeout (nginx gives such a client its lingering_timeout, 5 s). From a
/// front end, the longest it waits for the next bytes.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The longest the serving thread drops a front end's body the app did not
/// read, however steadily it comes. nginx sends a buffered body at local
/// speed and reads the response only after it, so a body this read keeps a
/// 413 or a redirect the app gave from turning into a 502 (hundreds of MB
/// take well under a second); a peer streaming without end, or a client's
/// upload passed on at the client's pace, must not keep the thread for good
/// (nginx's own lingering_time is 30 s; the thread serves no one else
/// meanwhile, so less).
const FRONT_END_DRAIN_TIME: Duration = Duration::from_secs(10);

/// Drops what has come of the rest of a client's request body the app did
/// not read, without waiting for more: `Later` when more is to come. At most
/// [`MAX_DRAIN`] bytes in all, until `io.discard_until`.
fn discard_available(io: &mut Io) -> Discarded {
    let saved_max = io.max_body;
    // What passes --max-body-size is read to be dropped, not refused again.
    io.max_body = u64::MAX;
    io.no_wait = true;
    let outcome = loop {
        let left = match io.body {
            BodyState::Length(left) => left,
            _ => 0,
        };
        if io.discarded.saturating_add(left) > MAX_DRAIN {
            break Discarded::GaveUp(GaveUp::TooMuch);
        }
        match io.read_body_with(READ_CHUNK, &mut |_| {}, |f| f()) {
            Ok(0) => break Discarded::All,
            Ok(n) => io.discarded += n as u64,
            Err(BodyError::WouldWait) if mono_ms() < io.discard_until => break Discarded::Later,
            Err(BodyError::WouldWait | BodyError::Timeout) => break Discarded::GaveUp(GaveUp::Stalled),
            Err(_) => break Discarded::Failed,
        }
    };
    io.no_wait = false;
    io.max_body = saved_max;
    if !matches!(outcome, Discarded::Later) {
        io.discard_until = 0;
    }
    outcome
}

/// Reads and drops the rest of the request body.
///
/// From a client: at most [`MAX_DRAIN`] bytes (a larger remainder is not
/// worth reading), for at most [`DRAIN_WAIT`]. From a front end: as long
/// as it keeps coming, for [`FRONT_END_DRAIN_TIME`] at most. nginx sends
/// the whole body before it reads
/// the response (it has it buffered, and sends it at local speed) and
/// answers 502 when the backend closes before taking it: the response the
/// app gave without reading the body (a 403, a redirect, a 413) would be
/// lost. uWSGI users get this from `post-buffering`.
fn discard_body(io: &mut Io, blocking: fn(&mut dyn FnMut())) -> Discarded {
    let front_end = io.wire != Wire::Http;
    if !front_end && matches!(io.body, BodyState::Length(left) if left > MAX_DRAIN) {
        return Discarded::GaveUp(GaveUp::TooMuch);
    }
    let (saved_timeout, saved_max) = (io.timeout_ms, io.max_body);
    // What passes --max-body-size is read to be dropped, not refused again.
    io.max_body = u64::MAX;
    // From a front end, each piece buys the next DRAIN_WAIT, within
    // FRONT_END_DRAIN_TIME in all.
    let started = mono_ms();
    let cap = if front_end { started + FRONT_END_DRAIN_TIME.as_millis() as u64 } else { u64::MAX };
    let mut deadline = (started + DRAIN_WAIT.as_millis() as u64).min(cap);
    let mut last_bytes = started;
    // Out of time: still coming when the cap was reached, or stopped.
    let out_of_time = |last_bytes: u64| match mono_ms() < last_bytes + DRAIN_WAIT.as_millis() as u64 {
        true => GaveUp::TooLong,
        false => GaveUp::Stalled,
    };
    let mut sink = Vec::new();
    let mut total = 0u64;
    let outcome = loop {
        if !front_end && total > MAX_DRAIN {
            break Discarded::GaveUp(GaveUp::TooMuch);
        }
        let left = deadline.saturating_sub(mono_ms());
        if left == 0 {
            break Discarded::GaveUp(out_of_time(last_bytes));
        }
        io.timeout_ms = left as i32;
        sink.clear();
        match io.read_body(&mut sink, READ_CHUNK, blocking) {
            Ok(0) => break Discarded::All,
            Ok(n) => {
                total += n as u64;
                if front_end {
                    last_bytes = mono_ms();
                    deadline = (last_bytes + DRAIN_WAIT.as_millis() as u64).min(cap);
                }
            }
            Err(BodyError::Timeout) => break Discarded::GaveUp(out_of_time(last_bytes)),
            Err(_) => break Discarded::Failed,
        }
    };
    io.timeout_ms = saved_timeout;
    io.max_body = saved_max;
    outcome
}

/// The one log line for a FastCGI body stream the front end broke, wherever
/// it was found (by the app reading wsgi.input, or by draining what it left).
fn warn_bad_stream(conn: &Conn, listener: &ListenerInfo, io: &Io) {
    if let BodyState::Failed(BodyError::Gateway(m)) = io.body {
        if io.phase == RespPhase::Finished && m == crate::exchange::FCGI_CLOSED_IN_BODY {
            // The app answered without reading the whole body, and the front
            // end, given END_REQUEST, closed rather than send the rest (nginx
            // does): nobody wanted those bytes, and nothing was wrong.
            debug!(
                "{} request from {}: the front end closed the connection after the response, \
                 before the rest of a body the app did not read",
                listener.protocol.name(),
                peer(conn, listener)
            );
            return;
        }
        warn!(
            "Bad {} request from {}: {m} (in the request body); closing the connection",
            listener.protocol.name(),
            peer(conn, listener)
        );
    }
}

/// A response the engine wrote itself to a request it would not pass to the
/// app (malformed, too large, over the connection limit): counted in the
/// metrics and given an access log line like any other. `head` is what was
/// read of the request; an HTTP request line in it gives the method and
/// target, when it has one.
fn record_refusal<A: App>(
    w: &Shared<A>,
    conn: Result<&Conn, &str>,
    idx: usize,
    head: &[u8],
    status: u16,
    reply: &[u8],
) {
    let listener = &w.listeners[idx].1;
    // The body's bytes, as for the app's responses and the access log.
    let sent = body_length(reply);
    let started = conn.map_or(mono_ms(), |c| c.request_started);
    // A connection refused before it became one (over the limit) has only
    // its address.
    let conn = conn.map_err(|client| if client.is_empty() { "-" } else { client });
    let micros = mono_ms().saturating_sub(started) * 1000;
    w.scoreboard.record(w.slot, listener.protocol as usize, status, micros, head.len() as u64, sent);
    w.scoreboard.count_refused(w.slot);
    let Some(log) = &w.access else { return };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (method, target, protocol) = match (listener.protocol, parts.next(), parts.next(), parts.next()) {
        (Protocol::Http, Some(m), Some(t), Some(p)) if p.starts_with(b"HTTP/") => {
            (m, t, String::from_utf8_lossy(p).into_owned())
        }
        _ => (&b"-"[..], &b"-"[..], "-".to_string()),
    };
    let none = |_: &str| -> Option<Vec<u8>> { None };
    // The header lines read, as far as they go: a refused request's
    // User-Agent is often what tells a scanner from a broken client.
    let http = listener.protocol == Protocol::Http;
    let request_header = |name: &str| -> Option<Vec<u8>> {
        head.split(|&b| b == b'\n').skip(1).filter(|_| http).find_map(|l| {
            let (n, v) = l.split_at(l.iter().position(|&b| b == b':')?);
            n.eq_ignore_ascii_case(name.as_bytes()).then(|| v[1..].trim_ascii().to_vec())
        })
    };
    log.log_now(&crate::access::Entry {
        remote_addr: conn.map_or_else(|client| client, |c| c.remote_addr.as_str()),
        method,
        target,
        protocol: &protocol,
        status,
        // As for the app's responses: the body's bytes, not the head's.
        bytes: body_length(reply),
        micros,
        request_header: &request_header,
        response_header: &none,
        environ: &none,
    });
}

/// [`record_refusal`] for a request parsed whole (refused for what it
/// declares): its line names the client, method, target and headers as the
/// request's own line would, the front end's variables included.
fn record_refused_request<A: App>(w: &Shared<A>, conn: &Conn, req: &Request<'_>, status: u16, reply: &[u8]) {
    let micros = mono_ms().saturating_sub(conn.request_started) * 1000;
    let protocol = req.listener.protocol as usize;
    let sent = body_length(reply);
    w.scoreboard.record(w.slot, protocol, status, micros, req.bytes.len() as u64, sent);
    w.scoreboard.count_refused(w.slot);
    if let Some(log) = &w.access {
        LogNote::of(log, conn, req).log(log, status, sent, micros);
    }
}

/// The body length an error reply of [`error_reply`] declares (each has a
/// Content-Length, inside its FastCGI record too): what the access log counts.
fn body_length(reply: &[u8]) -> u64 {
    const FIELD: &[u8] = b"Content-Length: ";
    reply
        .windows(FIELD.len())
        .position(|w| w == FIELD)
        .map(|i| &reply[i + FIELD.len()..])
        .map(|rest| {
            rest.iter().take_while(|b| b.is_ascii_digit()).fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'))
        })
        .unwrap_or(0)
}

fn peer(conn: &Conn, l: &ListenerInfo) -> String {
    l.peer(&conn.remote_addr, &conn.remote_port)
}

pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The body of the error responses corral writes itself.
fn error_body(status: u16, detail: &str) -> String {
    format!("{status} {}: {detail}\n", reason(status))
}

/// A complete error response in a connection's framing: HTTP for HTTP and
/// uwsgi, CGI headers for SCGI, and those in STDOUT records followed by
/// END_REQUEST for FastCGI.
fn error_reply(wire: Wire, status: u16, detail: &str) -> Vec<u8> {
    let cgi_response = || {
        let body = error_body(status, detail);
        let mut out = format!(
            "Status: {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
            reason(status),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    };
    match wire {
        Wire::Http | Wire::Uwsgi => error_response(status, detail),
        Wire::Scgi => cgi_response(),
        Wire::FastCgi { id, .. } => {
            let mut out = Vec::new();
            fastcgi::write_stdout(&mut out, id, &cgi_response());
            fastcgi::write_stream_end(&mut out, fastcgi::RecordType::Stdout, id);
            fastcgi::write_end_request(&mut out, id, 0, fastcgi::ProtocolStatus::RequestComplete);
            out
        }
    }
}

/// A complete error response that closes the connection.
pub fn error_response(status: u16, detail: &str) -> Vec<u8> {
    let body = error_body(status, detail);
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n");
    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    crate::date::append_date_header(&mut out);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::worth_parsing;
    use corral_proto::http1::Limits;

    #[test]
    fn an_incomplete_head_is_parsed_again_only_when_it_may_have_ended() {
        let limits = Limits::default();
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n";
        // First bytes, and the request line still coming: parsed.
        assert!(worth_parsing(&head[..5], 0, &limits));
        assert!(worth_parsing(&head[..10], 5, &limits));
        // More fields: nothing can have ended.
        assert!(!worth_parsing(&head[..30], 20, &limits));
        // The empty line, also when it straddles two reads.
        let mut whole = head.to_vec();
        whole.extend_from_slice(b"\r\n");
        assert!(worth_parsing(&whole, head.len(), &limits));
        assert!(worth_parsing(&whole, head.len() + 1, &limits));
        assert!(worth_parsing(b"GET / HTTP/1.0\n\n", 15, &limits));
        // Past the size limit, the parser refuses it.
        let mut big = head.to_vec();
        big.resize(limits.max_head_bytes() + 1, b'a');
        assert!(worth_parsing(&big, head.len(), &limits));
        // A long request line (as --limit-request-line 0 allows): parsed
        // again when it ends or passes the limit, not at every read.
        let long = Limits { max_request_line: 1 << 20, ..Limits::default() };
        let mut line = b"GET /".to_vec();
        line.resize(100_000, b'a');
        assert!(!worth_parsing(&line, 90_000, &long));
        line.extend_from_slice(b" HTTP/1.1\r\n");
        assert!(worth_parsing(&line, 100_000, &long));
        let mut over = b"GET /".to_vec();
        over.resize((1 << 20) + 3, b'a');
        assert!(worth_parsing(&over, 1 << 20, &long));
    }
}
