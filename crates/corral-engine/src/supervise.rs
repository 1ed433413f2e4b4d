//! The master process: forks the workers, replaces the ones that die, and
//! turns signals into lifecycle actions.
//!
//! The master never runs more than one thread. Signals are blocked and read
//! from a signalfd, so there is no signal-handling thread, and every fork
//! happens in a process whose only thread is the one forking: the child
//! inherits no lock held by a thread that does not exist on its side.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::app::ListenerInfo;
use crate::config::{Config, SigintMode, MAX_BOOT_FAILURES};
use crate::date::mono_ms;
use crate::listen::Listener;
use crate::scoreboard::{InFlight, Scoreboard, WorkerState, COUNTERS};
use crate::stats::{Snapshot, WorkerView};
use crate::worker::WorkerCtx;

/// Exit code a worker uses when the application cannot be loaded: the
/// master stops instead of respawning into the same error.
pub const EXIT_APP_LOAD_FAILED: i32 = 3;

/// The master's exit code when the application cannot be loaded, as
/// gunicorn's (its APP_LOAD_ERROR), so a deploy script or service manager
/// can tell a release that does not import from a crash.
pub const MASTER_EXIT_APP_LOAD: i32 = 4;

/// The master's exit code when workers keep dying while they boot, as
/// gunicorn's (its WORKER_BOOT_ERROR).
pub const MASTER_EXIT_BOOT_FAILURES: i32 = 3;

/// How often a master short of worker slots says so.
const SLOT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Monitoring clients the master serves at once; more are closed on accept.
const MAX_STATS_CONNS: usize = 64;

/// After a re-exec whose new code fails to load, how long the master waits
/// before a new worker tries it again (the previous workers serve meanwhile).
const RELOAD_RETRY: Duration = Duration::from_secs(5);

/// The longest wait before another try at a replacement, or at filling a
/// serving pool again, after tries that failed to boot: each failure in a
/// row doubles the wait up to this.
const REPLACE_RETRY_MAX: Duration = Duration::from_secs(30);

/// Where the master is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving; dead workers are replaced.
    Running,
    /// Asked to stop with `--shutdown-delay`: still serving, but `/readyz`
    /// says no, so load balancers stop sending work before the listeners close.
    Announcing { until: Instant },
    /// Workers were told to finish their requests; wait for them until the deadline.
    Draining { deadline: Instant },
    /// Workers were told to stop at once.
    Stopping { deadline: Instant },
}

/// How long a graceful stop waits, once no new connection can enter the
/// accept queues, for handshakes under way to end in them before the
/// workers take the last of what is queued.
const HANDSHAKE_SETTLE: Duration = Duration::from_millis(5);

/// How long a worker stuck loading the app past --timeout has, after the
/// SIGABRT that makes it write its stacks, before SIGKILL.
const BOOT_ABORT_GRACE: Duration = Duration::from_secs(2);

/// What a signal asks the master to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    GracefulStop,
    QuickStop,
    /// Replace every worker with a new one (new workers import the app anew
    /// unless it was preloaded), old ones finishing their requests.
    Reload,
    AddWorker,
    RemoveWorker,
    ReopenLogs,
    ReapChildren,
    /// Replace the master's own program in place (same pid, same listening
    /// sockets), then replace the workers: picks up an upgraded corral.
    Reexec,
    /// gunicorn's WINCH (stop the workers of the old master during its
    /// upgrade): nothing to do, since USR2 completes an upgrade by itself;
    /// said once, as the steps of gunicorn's upgrade that come next would
    /// stop this server.
    ExplainWinch,
}

/// The one table from signal to action. SIGINT's is the one of `--sigint
/// graceful`; `--sigint quick` makes it a quick stop (see [`signal_action`]).
const TABLE: [(libc::c_int, Action); 10] = [
    (libc::SIGTERM, Action::GracefulStop),
    (libc::SIGINT, Action::GracefulStop),
    (libc::SIGQUIT, Action::QuickStop),
    (libc::SIGHUP, Action::Reload),
    (libc::SIGTTIN, Action::AddWorker),
    (libc::SIGTTOU, Action::RemoveWorker),
    (libc::SIGUSR1, Action::ReopenLogs),
    (libc::SIGUSR2, Action::Reexec),
    (libc::SIGCHLD, Action::ReapChildren),
    (libc::SIGWINCH, Action::ExplainWinch),
];

/// The signals the master handles: those of [`TABLE`].
pub const SIGNALS: [libc::c_int; TABLE.len()] = {
    let mut out = [0; TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        out[i] = TABLE[i].0;
        i += 1;
    }
    out
};

/// What `sig` asks of the master, with `--sigint` applied.
pub fn signal_action(sig: libc::c_int, sigint: SigintMode) -> Option<Action> {
    if sig == libc::SIGINT && sigint == SigintMode::Quick {
        return Some(Action::QuickStop);
    }
    TABLE.iter().find(|(s, _)| *s == sig).map(|&(_, action)| action)
}

/// Environment variable through which a re-executed master finds the
/// listening sockets it already has: `PROTOCOL ADDRESS=FD` entries, `;`-separated.
pub const INHERIT_ENV: &str = "CORRAL_INHERITED_LISTENERS";

/// Set for the check of a configuration before a re-exec, as
/// [`INHERIT_ENV`] will be: the new listeners (not among those) must be
/// free to bind.
pub const CHECK_BINDS_ENV: &str = "CORRAL_CHECK_BINDS";
/// Environment variable listing the workers a re-executed master inherits
/// (still its children): they are told to stop once new workers are ready.
pub const OLD_WORKERS_ENV: &str = "CORRAL_INHERITED_WORKERS";

/// What happens in the master that the embedding may act on (gunicorn's
/// server hooks). Told in the master, as the other [`Hooks`] calls are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The listeners are bound; the first workers are forked next.
    Ready,
    /// A reload was asked for (HUP, --reload, --touch-reload).
    Reload,
    /// The `age`th worker this master starts is forked next, into `slot`.
    Fork { slot: usize, age: u64 },
    /// A worker exited; `slot` and `age` are unknown for one started before
    /// a re-exec. `booted`: it had loaded the app.
    WorkerExited { pid: libc::pid_t, slot: Option<usize>, age: Option<u64>, booted: bool },
    /// The pool's target size is now `new`, from `old`.
    PoolSize { new: usize, old: usize },
    /// The master re-executes itself next.
    Reexec,
}

/// What the embedding (the Python binding) does around forks and waits.
pub trait Hooks {
    /// Something happened in the master (see [`Event`]). `false` from
    /// [`Event::Ready`] stops the start.
    fn event(&self, e: Event) -> bool {
        let _ = e;
        true
    }
    /// Just before fork, in the master (e.g. take the interpreter's locks).
    fn before_fork(&self) {}
    /// Just after fork, in the master.
    fn after_fork_parent(&self) {}
    /// Just after fork, in the new worker.
    fn after_fork_child(&self) {}
    /// Runs `f`, a blocking wait, letting other threads of the embedding run.
    fn unlocked(&self, f: &mut dyn FnMut()) {
        f()
    }
    /// Runs the worker in the child: load the app, serve, return the exit code.
    fn worker_main(&self, ctx: WorkerCtx) -> i32;
    /// Ends the worker process with `code` (after any at-exit work).
    fn worker_exit(&self, code: i32) -> !;
    /// The program and arguments that start this master again, for an
    /// in-place re-exec; `None` if it cannot be re-executed.
    fn reexec_command(&self) -> Option<(std::ffi::CString, Vec<std::ffi::CString>)> {
        None
    }
    /// Why a reload must re-exec the master, if it must: to pick up new
    /// code (the app was imported in the master before forking), or a
    /// config file that changed since this program read it.
    fn reload_needs_reexec(&self) -> Option<String> {
        None
    }
    /// What the re-executed program would refuse in its configuration (the
    /// config file and the environment, read anew), checked before: a
    /// program that refused them would leave nothing serving.
    /// `held` lists the listeners the new program will take over, as
    /// [`INHERIT_ENV`] does: the others it must bind.
    fn check_reexec(&self, held: &str) -> Result<(), String> {
        let _ = held;
        Ok(())
    }
    /// Environment variables the re-executed program needs besides those
    /// of this module (socket activation's `LISTEN_*`), or must not have
    /// (`None`).
    fn reexec_env(&self) -> Vec<(String, Option<String>)> {
        Vec::new()
    }
}

struct Worker {
    slot: usize,
    started: Instant,
    /// Asked to stop (reload, scale down, shutdown); its death is expected.
    retiring: bool,
    /// When a retiring worker that has not exited is killed.
    kill_at: Option<Instant>,
    /// Whether its kill was put off once, past --graceful-timeout, because
    /// it was still ending its own requests (see [`CUT_GRACE`]).
    kill_put_off: bool,
    /// The worker this one is booting to replace; it is told to stop once
    /// this one is ready, so the pool never shrinks during a replacement.
    replaces: Option<libc::pid_t>,
    /// Why the master itself sent it SIGKILL, if it did: its death is then
    /// no crash to warn about.
    killed: Option<&'static str>,
    /// The how-manyth worker this master started (from 1).
    age: u64,
    /// A reload asked for its replacement: until one is ready, it is given
    /// another whenever it has none booting (none could start for want of
    /// a slot, or the last one died before it was ready).
    stale: bool,
    /// Workers replaced, one after the other, to come to this one (after a
    /// crash, a recycling or a reload), for `/stats`: a replacement takes
    /// another slot than the worker it replaces, so a slot has no history.
    respawns: u64,
}

pub struct Master<'a, H: Hooks> {
    config: Config,
    listeners: Vec<Listener>,
    hooks: &'a H,
    scoreboard: Scoreboard,
    workers: HashMap<libc::pid_t, Worker>,
    /// Free scoreboard slots.
    free_slots: Vec<usize>,
    target: usize,
    phase: Phase,
    boot_failures: u32,
    /// When `boot_failures` last grew. Workers started before then belong
    /// to the same round (a pool of 8 failing at once is one failure, not
    /// 8), so their deaths do not count again.
    boot_failed_at: Option<Instant>,
    respawn_at: Option<Instant>,
    signal_fd: RawFd,
    exit_code: i32,
    /// No replacement is started before this, after one failed to boot.
    replace_after: Option<Instant>,
    /// The service manager was told READY=1 (and not RELOADING=1 since).
    told_ready: bool,
    /// Since the last RELOADING=1, the service manager was told READY=1 for
    /// a reload whose new code does not load (the previous workers serve):
    /// it would otherwise stay "reloading" for as long as the code is broken.
    told_reload_failed: bool,
    /// The stop's kill was put off once, past --graceful-timeout, for
    /// workers still ending their own requests (see [`CUT_GRACE`]).
    stop_kill_put_off: bool,
    /// Monotonic ms of this loop's last look at the workers' heartbeats.
    beats_seen_ms: u64,
    /// Forks that failed in a row (EAGAIN under a limit on processes), and
    /// when the next may be tried.
    fork_failures: u32,
    fork_retry_at: Option<Instant>,
    /// The pool was ready once: the app loaded and served. Unlike
    /// `told_ready`, a reload does not reset it.
    served: bool,
    /// Workers started by this master's previous program (before a re-exec):
    /// stopped once the new workers are ready.
    inherited: Vec<libc::pid_t>,
    /// The inherited workers were told to finish (once: a reload while they
    /// do must not tell them again, nor put off their kill).
    inherited_released: bool,
    /// With `--log-format json`: each worker's crash report file, where its
    /// Python stacks go on a crash (see [`crate::crash::report_fd`]), logged
    /// as one JSON object once the worker is gone.
    crash_reports: HashMap<libc::pid_t, std::os::fd::OwnedFd>,
    /// When those still running are killed: --graceful-timeout after they
    /// were told to stop, as a reload's retiring workers are.
    inherited_kill_at: Option<Instant>,
    /// A re-exec asked for while those were still there: done once they
    /// have exited (what asked for it).
    reexec_pending: Option<String>,
    /// Adaptive pool: when the pool was last seen with a spare worker.
    scale: Scaling,
    /// The `--stats` listener, served by this process.
    stats: Option<Listener>,
    /// Monitoring clients being served (see [`crate::stats::Conn`]).
    stats_conns: Vec<crate::stats::Conn>,
    /// Until when (mono ms) the stats listener is not polled: accept failed
    /// for lack of descriptors with no client of it to close for room, and
    /// the listener, still readable, would make the loop spin. And when that
    /// was last said.
    stats_paused: (u64, u64),
    /// When "no free slot" was last logged.
    slot_warned: Option<Instant>,
    /// Metric counters of workers that have exited.
    totals: [u64; COUNTERS],
    /// Workers started to replace another, by reason.
    respawns: Vec<(&'static str, u64)>,
    /// The `respawns` of workers that crashed, plus one, for the workers
    /// started in their place.
    crashed_lines: Vec<u64>,
    born: Instant,
    /// `--reload`: source directories to watch.
    watcher: Option<crate::watch::Watcher>,
    /// `--touch-reload`: files to look at.
    touch: Option<crate::watch::TouchFiles>,
    /// Workers forked so far.
    spawned: u64,
    /// Signals read from the signalfd in the same batch as the one being
    /// acted on, still to be acted on.
    unhandled_signals: Vec<libc::c_int>,
    /// A re-exec that failed raised them again: the batch ends there.
    signals_raised_again: bool,
    /// Replacements of a reload's that failed to boot in a row, for the
    /// delay before the next try.
    replace_failures: u32,
    /// Workers in a row that died within [`QUICK_DEATH`] of their start,
    /// after they had booted.
    quick_deaths: u32,
    /// The access log as the master has it open, reopened on USR1 and HUP:
    /// a worker that cannot open the file itself (logrotate made it root's
    /// after the workers dropped privileges, the disk went read-only) writes
    /// here rather than fail to start, as gunicorn's workers write to the
    /// log their master opened.
    access_sink: Option<crate::access::Sink>,
}

/// What the adaptive pool has seen lately.
#[derive(Debug, Default)]
struct Scaling {
    /// Consecutive ticks with every thread of every worker busy, or
    /// connections waiting in a listen queue.
    saturated_ticks: u32,
    /// Since when at most `workers - 1` workers were needed.
    idle_since: Option<Instant>,
    last_change: Option<Instant>,
}

/// A booted worker that dies sooner than this after its start counts
/// toward the respawn throttle.
const QUICK_DEATH: Duration = Duration::from_secs(2);

/// Quick deaths in a row replaced at once; after them each replacement
/// waits, 100 ms doubling up to `REPLACE_RETRY_MAX`.
const QUICK_DEATHS_TOLERATED: u32 = 3;

/// Ticks (100 ms) of saturation before the adaptive pool grows.
const SCALE_UP_TICKS: u32 = 3;

/// Scoreboard slots: twice the largest pool (`--workers-max`, else
/// `--workers`), and 64 at least, so that a pool at its largest (TTIN's
/// limit is half the slots, see `max_workers`) still has a slot for each
/// worker's replacement while the old ones finish their requests: a reload
/// of a full pool would otherwise wait for good.
fn slot_capacity(config: &Config) -> usize {
    let largest = config.workers_max.unwrap_or(config.workers).max(config.workers);
    (largest * 2 + 16).max(64)
}

impl<'a, H: Hooks> Master<'a, H> {
    pub fn new(config: Config, listeners: Vec<Listener>, hooks: &'a H) -> io::Result<Self> {
        let cap = slot_capacity(&config);
        let scoreboard = Scoreboard::new(cap, config.threads.max(1))?;
        let signal_fd = block_signals()?;
        let access_sink = match &config.access_log {
            Some((target, _)) => Some(crate::access::Sink::open(target).map_err(io::Error::other)?),
            None => None,
        };
        Ok(Master {
            access_sink,
            target: config.workers.max(1),
            config,
            listeners,
            hooks,
            scoreboard,
            workers: HashMap::new(),
            free_slots: (0..cap).rev().collect(),
            phase: Phase::Running,
            boot_failures: 0,
            boot_failed_at: None,
            respawn_at: None,
            signal_fd,
            exit_code: 0,
            replace_after: None,
            told_ready: false,
            told_reload_failed: false,
            stop_kill_put_off: false,
            beats_seen_ms: 0,
            fork_failures: 0,
            fork_retry_at: None,
            served: false,
            inherited: take_inherited_workers(),
            inherited_released: false,
            crash_reports: HashMap::new(),
            inherited_kill_at: None,
            reexec_pending: None,
            scale: Scaling::default(),
            stats: None,
            slot_warned: None,
            stats_conns: Vec::new(),
            stats_paused: (0, 0),
            totals: [0; COUNTERS],
            respawns: Vec::new(),
            crashed_lines: Vec::new(),
            born: Instant::now(),
            watcher: None,
            touch: None,
            spawned: 0,
            unhandled_signals: Vec::new(),
            signals_raised_again: false,
            replace_failures: 0,
            quick_deaths: 0,
        })
    }

    /// Reloads the workers (as SIGHUP does) when a watched `.py` file changes.
    pub fn set_watcher(&mut self, w: crate::watch::Watcher) {
        self.watcher = Some(w);
    }

    /// Reloads the workers (as SIGHUP does) when one of these files is touched.
    pub fn set_touch_files(&mut self, t: crate::watch::TouchFiles) {
        self.touch = Some(t);
    }

    /// Serves `/metrics`, `/stats`, `/healthz` and `/readyz` on `listener`.
    /// Connections to the stats listener accepted before this master's loop
    /// runs (see [`crate::stats::Interim`]), answered by it.
    pub fn adopt_stats_conns(&mut self, conns: Vec<crate::stats::Conn>) {
        self.stats_conns.extend(conns);
    }

    pub fn set_stats(&mut self, listener: Listener) {
        self.stats = Some(listener);
    }

    fn note_respawn(&mut self, reason: &'static str) {
        match self.respawns.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.respawns.push((reason, 1)),
        }
    }

    /// What `/metrics` and `/stats` report, read now.
    fn snapshot(&self) -> Snapshot {
        let now = mono_ms();
        let mut counters = self.totals;
        let mut workers: Vec<WorkerView> = self
            .workers
            .iter()
            .map(|(pid, w)| {
                let c = self.scoreboard.counters(w.slot);
                for (total, v) in counters.iter_mut().zip(c) {
                    *total += v;
                }
                let state = match (self.scoreboard.state(w.slot), w.retiring) {
                    (_, true) | (WorkerState::Draining, _) => "draining",
                    (WorkerState::Booting, _) => "booting",
                    (WorkerState::Ready, _) => "ready",
                };
                WorkerView {
                    slot: w.slot,
                    pid: *pid,
                    state,
                    requests: self.scoreboard.requests(w.slot),
                    busy_threads: self.scoreboard.busy_threads(w.slot),
                    offloaded: self.scoreboard.offloaded(w.slot),
                    rss: rss_of(*pid),
                    respawns: w.respawns,
                    age_s: w.started.elapsed().as_secs_f64(),
                    current: self.scoreboard.in_flight(w.slot, now),
                    last_exception: self.scoreboard.error(w.slot),
                }
            })
            .collect();
        workers.sort_by_key(|w| w.slot);
        // After a re-exec, the previous program's workers serve until the
        // new ones are ready, and for good if the new code does not load.
        let ready = self.phase == Phase::Running
            && (workers.iter().any(|w| w.state == "ready") || !self.inherited.is_empty());
        Snapshot {
            master_pid: std::process::id(),
            phase: match self.phase {
                Phase::Running => "running",
                Phase::Announcing { .. } => "stopping-soon",
                Phase::Draining { .. } => "draining",
                Phase::Stopping { .. } => "stopping",
            },
            ready,
            target_workers: self.target,
            threads: self.config.threads.max(1),
            uptime_s: self.born.elapsed().as_secs_f64(),
            workers,
            counters,
            respawns: self.respawns.clone(),
            queues: self.listeners.iter().map(|l| (l.url(), l.queued())).collect(),
        }
    }

    /// Takes the monitoring clients waiting on the stats listener.
    fn accept_stats(&mut self) {
        use std::os::fd::FromRawFd;
        let Some(l) = &self.stats else {
            return;
        };
        loop {
            let fd = unsafe {
                libc::accept4(
                    l.raw(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    // The oldest clients go, as at MAX_STATS_CONNS, so that a
                    // probe gets in, a quarter of them, which leaves room for
                    // the master's own descriptors (a new worker's pipes);
                    // with none, the listener rests a second.
                    if !self.stats_conns.is_empty() {
                        let n = self.stats_conns.len().div_ceil(4);
                        self.stats_conns.drain(..n);
                        continue;
                    }
                    let now = mono_ms();
                    if now >= self.stats_paused.1 + 60_000 || self.stats_paused.1 == 0 {
                        warn!(
                            "The master cannot accept monitoring clients on its stats listener: {e}; it tries \
                             again each second (raise the open files limit, `ulimit -n`)"
                        );
                        self.stats_paused.1 = now;
                    }
                    self.stats_paused.0 = now + 1000;
                }
                return;
            }
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if self.stats_conns.len() >= MAX_STATS_CONNS {
                // The oldest goes, not the newcomer: a flood of idle clients
                // must neither grow the master nor keep a health probe out.
                self.stats_conns.remove(0);
            }
            let mut conn = crate::stats::Conn::new(fd);
            // A probe's request usually came with its connection: answered
            // now, before more connections of a flood can push it out.
            if !conn.advance(&|| self.snapshot()) {
                self.stats_conns.push(conn);
            }
        }
    }

    /// Serves the monitoring clients whose sockets are ready (`ready[i]` for
    /// `stats_conns[i]`), and drops those past their deadline.
    fn serve_stats(&mut self, ready: &[bool]) {
        let now = mono_ms();
        // Taken out while served: answering reads the rest of `self`.
        let mut conns = std::mem::take(&mut self.stats_conns);
        let mut ready = ready.iter();
        conns.retain_mut(|c| {
            let done = ready.next().copied().unwrap_or(false) && c.advance(&|| self.snapshot());
            !done && c.deadline() > now
        });
        self.stats_conns = conns;
    }

    /// Supervises until shutdown; returns the exit code for the master.
    pub fn run(mut self) -> i32 {
        crate::proctitle::set(&title("master", &self.config.name));
        // As the user the workers run as, before any of them starts.
        if let Err(e) = crate::handover::prepare_inbox_dir() {
            warn!(
                "Workers cannot hand connections to each other: {e}; a draining worker closes its kept-alive \
                 connections instead"
            );
        }
        let ready = self.hooks.event(Event::Ready);
        if !ready && self.inherited.is_empty() {
            error!("Not starting: the `when_ready` hook failed (see above)");
            self.fail(1);
        } else {
            if !ready {
                // The workers from before the re-exec serve on regardless.
                error!("The `when_ready` hook failed (see above); starting the workers anyway");
            }
            for _ in 0..self.target {
                self.spawn();
            }
        }
        loop {
            let timeout = self.next_timeout();
            let timeout = match self.watcher.as_ref().and_then(|w| w.wait_ms()) {
                Some(ms) => timeout.min(ms.max(10)),
                None => timeout,
            };
            let timeout = match &self.touch {
                Some(t) => timeout.min(t.wait_ms().max(10)),
                None => timeout,
            };
            let mut fds = vec![
                libc::pollfd { fd: self.signal_fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd {
                    fd: match self.stats.as_ref() {
                        Some(l) if mono_ms() >= self.stats_paused.0 => l.raw(),
                        _ => -1,
                    },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.watcher.as_ref().map_or(-1, |w| w.raw()),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd { fd: self.scoreboard.nudge_fd(), events: libc::POLLIN, revents: 0 },
            ];
            fds.extend(self.stats_conns.iter().map(|c| libc::pollfd {
                fd: c.fd(),
                events: c.events(),
                revents: 0,
            }));
            let timeout = match self.stats_conns.iter().map(|c| c.deadline()).min() {
                Some(d) => timeout.min(d.saturating_sub(mono_ms()) as i32 + 1),
                None => timeout,
            };
            self.hooks.unlocked(&mut || {
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            });
            if !self.stats_conns.is_empty() {
                let ready: Vec<bool> = fds[4..].iter().map(|f| f.revents != 0).collect();
                self.serve_stats(&ready);
            }
            if fds[1].revents & libc::POLLIN != 0 {
                self.accept_stats();
                // A client that sent its request with the connect is answered now.
                let ready = vec![true; self.stats_conns.len()];
                self.serve_stats(&ready);
            }
            if fds[3].revents & libc::POLLIN != 0 {
                // What changed is read from the scoreboard below (step).
                self.scoreboard.take_nudges();
            }
            if let Some(w) = &mut self.watcher {
                if fds[2].revents & libc::POLLIN != 0 {
                    w.read();
                }
                if let Some(changed) = w.due() {
                    if self.phase == Phase::Running {
                        info!("Detected a change in {}; reloading the workers", changed.display());
                        self.act(Action::Reload, 0);
                    }
                }
            }
            if let Some(path) = self.touch.as_mut().and_then(|t| t.changed()) {
                if self.phase == Phase::Running {
                    info!("{} was touched (--touch-reload); reloading the workers", path.display());
                    self.act(Action::Reload, 0);
                }
            }
            let sfd = self.signal_fd;
            if fds[0].revents & libc::POLLIN != 0 {
                let sigs = read_signals(sfd);
                for (i, &sig) in sigs.iter().enumerate() {
                    // Those after it, should it re-execute the master: raised
                    // again before the exec, they wait for the new program
                    // (a TERM right behind a USR2 must not be lost).
                    self.unhandled_signals = sigs[i + 1..].to_vec();
                    if let Some(action) = signal_action(sig, self.config.sigint) {
                        self.act(action, sig);
                    }
                    if self.signals_raised_again {
                        // The exec failed: they come back through the signalfd.
                        self.signals_raised_again = false;
                        break;
                    }
                }
                self.unhandled_signals.clear();
            }
            self.reap();
            if let Some(code) = self.step() {
                self.cleanup();
                return code;
            }
        }
    }

    fn next_timeout(&self) -> i32 {
        // Workers wake the master when they become ready or ask to be
        // replaced (the scoreboard's nudge); this is for the rest.
        let mut ms = 100;
        if let Some(at) = self.respawn_at {
            ms = ms.min(at.saturating_duration_since(Instant::now()).as_millis() as i32);
        }
        ms.max(10)
    }

    fn act(&mut self, action: Action, sig: libc::c_int) {
        // Signal 0 is the master's own decision (--reload, --touch-reload).
        let name = if sig == 0 { "a change on disk".to_string() } else { signal_name(sig) };
        let changes_the_pool =
            matches!(action, Action::Reexec | Action::Reload | Action::AddWorker | Action::RemoveWorker);
        if changes_the_pool && self.phase != Phase::Running {
            info!("Received {name} while stopping: ignored");
            return;
        }
        match action {
            Action::ReapChildren => {}
            Action::ExplainWinch => {
                // A terminal sends it at every resize: once is enough.
                static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    info!(
                        "Received {name}: ignored. USR2 upgrades corral in place (same pid, no .oldbin pid \
                         file) and replaces the workers by itself; gunicorn's next step, QUIT or TERM to the \
                         old master, would stop this server"
                    );
                }
            }
            Action::GracefulStop if matches!(self.phase, Phase::Draining { .. }) => {
                // A second TERM or INT (Ctrl-C twice) means: do not wait.
                info!("Received {name} again while draining: stopping now");
                self.signal_all(libc::SIGQUIT);
                self.phase = Phase::Stopping { deadline: Instant::now() + Duration::from_secs(2) };
            }
            Action::GracefulStop => match self.phase {
                Phase::Running if !self.config.shutdown_delay.is_zero() => {
                    info!(
                        "Received {name}: /readyz now answers 503; still serving for {:?} (--shutdown-delay), \
                         then a graceful shutdown",
                        self.config.shutdown_delay
                    );
                    crate::systemd::notify("STOPPING=1");
                    // Workers that got this signal too (sent to the group)
                    // serve on with the master rather than drain.
                    for w in self.workers.values() {
                        self.scoreboard.set_announcing(w.slot);
                    }
                    self.phase = Phase::Announcing { until: Instant::now() + self.config.shutdown_delay };
                }
                Phase::Running | Phase::Announcing { .. } => {
                    info!(
                        "Received {name}: graceful shutdown, waiting up to {} s for in-flight requests",
                        crate::supervise::secs(self.config.graceful_timeout)
                    );
                    crate::systemd::notify("STOPPING=1");
                    self.begin_graceful_stop();
                }
                _ => info!("Received {name}: already stopping"),
            },
            Action::QuickStop => {
                info!("Received {name}: stopping now");
                crate::systemd::notify("STOPPING=1");
                self.close_listeners();
                self.signal_all(libc::SIGQUIT);
                self.phase = Phase::Stopping { deadline: Instant::now() + Duration::from_secs(2) };
            }
            Action::Reexec => {
                if self.phase == Phase::Running {
                    self.reexec(&name);
                }
            }
            Action::Reload => {
                if self.phase != Phase::Running {
                    return;
                }
                self.hooks.event(Event::Reload);
                if let Some(why) = self.hooks.reload_needs_reexec() {
                    info!("Received {name}: {why}");
                    self.reexec(&name);
                    return;
                }
                // As gunicorn's HUP: logrotate's `postrotate kill -HUP` must
                // not leave the master, and the new workers it forks, writing
                // to the rotated file. (The old workers keep it until they exit.)
                match crate::logfile::reopen() {
                    Ok(true) => info!("Received {name}: reopened the error log"),
                    Ok(false) => {}
                    Err(e) => crate::logfile::error_also_to_stderr(&format!("Received {name}: {e}")),
                }
                self.reopen_access_log(&name);
                let old: Vec<libc::pid_t> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| !w.retiring && w.replaces.is_none())
                    .map(|(p, _)| *p)
                    .collect();
                info!(
                    "Received {name}: starting {} new worker(s); each old one stops accepting and finishes \
                     its requests once its replacement is ready",
                    old.len()
                );
                // A reload also cancels replacements still booting from an
                // earlier one: their old workers get fresh replacements.
                let booting: Vec<(libc::pid_t, usize)> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.replaces.is_some())
                    .map(|(p, w)| (*p, w.slot))
                    .collect();
                for (pid, slot) in booting {
                    // One that has just become ready (the master has not read
                    // its state yet) may already serve connections, handed
                    // over by a draining sibling too: it stops gracefully.
                    let ready = self.scoreboard.state(slot) == WorkerState::Ready;
                    self.retire(pid, if ready { libc::SIGTERM } else { libc::SIGKILL });
                }
                // Old workers that are ready have loaded the code, whether
                // or not the master has counted them yet (a HUP may come
                // first): should the new code not load, a worker dying
                // after this reload is not a first start failing.
                if old.iter().any(|p| {
                    self.workers.get(p).is_some_and(|w| self.scoreboard.state(w.slot) == WorkerState::Ready)
                }) {
                    self.served = true;
                }
                crate::systemd::notify_reloading();
                self.told_ready = false;
                self.told_reload_failed = false;
                self.replace_failures = 0;
                self.replace_after = None;
                for pid in old {
                    if let Some(w) = self.workers.get_mut(&pid) {
                        w.stale = true;
                        self.note_respawn("reload");
                    }
                    self.spawn_replacing(Some(pid));
                }
            }
            Action::AddWorker => {
                if self.phase == Phase::Running && self.target < self.max_workers() {
                    self.set_target(self.target + 1);
                    // The adaptive pool judges the new size afresh.
                    self.scale = Scaling { last_change: Some(Instant::now()), ..Scaling::default() };
                    info!("Received {name}: workers {} -> {}", self.target - 1, self.target);
                    self.spawn();
                } else if self.phase == Phase::Running {
                    info!("Received {name}: already at the most workers ({}); ignored", self.target);
                }
            }
            Action::RemoveWorker => {
                if self.phase == Phase::Running && self.target > self.min_workers() {
                    self.set_target(self.target - 1);
                    self.scale = Scaling { last_change: Some(Instant::now()), ..Scaling::default() };
                    info!("Received {name}: workers {} -> {}", self.target + 1, self.target);
                    self.remove_one_worker();
                } else if self.phase == Phase::Running {
                    info!("Received {name}: already at the fewest workers ({}); ignored", self.target);
                }
            }
            Action::ReopenLogs => {
                match crate::logfile::reopen() {
                    Ok(true) => info!("Received {name}: reopened the error log; workers reopen their logs"),
                    Ok(false) => info!("Received {name}: workers reopen their log files"),
                    Err(e) => crate::logfile::error_also_to_stderr(&format!("Received {name}: {e}")),
                }
                self.reopen_access_log(&name);
                self.signal_all(libc::SIGUSR1);
            }
        }
    }

    /// Reopens the master's access log descriptor, the one workers started
    /// from now on fall back to; on failure they fall back to the old one.
    fn reopen_access_log(&self, name: &str) {
        // Only a file is rotated; opening a FIFO again would wait for a
        // reader, and the master supervises nothing while it waits.
        let Some(sink) = self.access_sink.as_ref().filter(|s| s.is_file()) else {
            return;
        };
        if let Err(e) = sink.reopen() {
            crate::logfile::error_also_to_stderr(&format!(
                "Received {name}: the access log: {e}; workers that cannot open it keep writing to the old file"
            ));
        }
    }

    /// Advances the phase; Some(code) when the master should exit.
    fn step(&mut self) -> Option<i32> {
        if self.inherited_kill_at.is_some_and(|at| Instant::now() >= at) {
            self.inherited_kill_at = None;
            for pid in &self.inherited {
                warn!("Worker pid {pid} from before the re-exec still running after --graceful-timeout; killing it");
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
        match self.phase {
            Phase::Running => {
                if self.inherited.is_empty() {
                    if let Some(why) = self.reexec_pending.take() {
                        self.reexec(&why);
                    }
                }
                self.advance_replacements();
                self.autoscale();
                if !self.told_ready {
                    let ready = self
                        .workers
                        .values()
                        .filter(|w| !w.retiring && self.scoreboard.state(w.slot) == WorkerState::Ready)
                        .count();
                    let booting = self.workers.values().any(|w| w.replaces.is_some());
                    if ready >= self.target && !booting {
                        // Stale and ready with none booting: their
                        // replacements failed and wait to be tried again.
                        let stale = self
                            .workers
                            .values()
                            .filter(|w| {
                                w.stale && !w.retiring && self.scoreboard.state(w.slot) == WorkerState::Ready
                            })
                            .count();
                        crate::systemd::notify(&if stale > 0 {
                            format!(
                                "READY=1\nSTATUS=serving with {ready} worker(s); {stale} of them on the code from \
                                 before the reload, which does not load"
                            )
                        } else {
                            format!("READY=1\nSTATUS=serving with {ready} worker(s)")
                        });
                        crate::daemon::ready();
                        self.told_ready = true;
                        self.served = true;
                        // Once: a reload while they finish must not tell them
                        // again, nor put off the kill that backs their drain up.
                        let release = !self.inherited.is_empty() && !self.inherited_released;
                        if release {
                            self.inherited_released = true;
                            self.inherited_kill_at = Some(Instant::now() + self.config.graceful_timeout);
                        }
                        for pid in self.inherited.iter().filter(|_| release) {
                            info!("New workers are ready; worker pid {pid} from before the re-exec finishes its requests");
                            // USR2 first: it may hand its kept connections to
                            // this program's workers (see handover).
                            unsafe {
                                libc::kill(*pid, libc::SIGUSR2);
                                libc::kill(*pid, libc::SIGTERM);
                            }
                        }
                    }
                }
                let active = self.workers.values().filter(|w| !w.retiring).count();
                if active < self.target {
                    let now = Instant::now();
                    if self.respawn_at.is_none_or(|at| now >= at) {
                        self.respawn_at = None;
                        for _ in active..self.target {
                            self.spawn();
                        }
                    }
                }
                None
            }
            Phase::Announcing { until } => {
                self.advance_replacements();
                if Instant::now() >= until {
                    info!("Shutdown delay over: closing the listeners and finishing in-flight requests");
                    self.begin_graceful_stop();
                }
                None
            }
            Phase::Draining { deadline } => {
                if self.workers.is_empty() && self.inherited.is_empty() {
                    info!("Shutdown complete");
                    return Some(self.exit_code);
                }
                if Instant::now() >= deadline {
                    // Each worker ends its requests itself at the same
                    // moment, for its clients and in the logs; killed now, it
                    // would not.
                    let now_ms = crate::date::mono_ms();
                    let serving =
                        self.workers.values().any(|w| !self.scoreboard.in_flight(w.slot, now_ms).is_empty());
                    // Those past their requests are a moment from exiting
                    // (their cut just ended them) or held by the app (a
                    // thread, an atexit handler): a moment more.
                    if !self.stop_kill_put_off {
                        self.stop_kill_put_off = true;
                        let grace = if serving { CUT_GRACE } else { STOP_EXIT_GRACE };
                        self.phase = Phase::Draining { deadline: Instant::now() + grace };
                        return None;
                    }
                    warn!(
                        "{} worker(s) still running after the graceful timeout; killing them",
                        self.workers.len()
                    );
                    self.signal_all(libc::SIGKILL);
                    self.phase = Phase::Stopping { deadline: Instant::now() + Duration::from_secs(5) };
                }
                None
            }
            Phase::Stopping { deadline } => {
                if self.workers.is_empty() && self.inherited.is_empty() {
                    info!("Shutdown complete");
                    return Some(self.exit_code);
                }
                if Instant::now() >= deadline {
                    self.signal_all(libc::SIGKILL);
                    if Instant::now() >= deadline + Duration::from_secs(5) {
                        error!("{} worker(s) did not exit even after SIGKILL", self.workers.len());
                        return Some(self.exit_code);
                    }
                }
                None
            }
        }
    }

    /// Kills the serving workers not heard from (see
    /// [`Scoreboard::beat`](crate::scoreboard::Scoreboard::beat)) for longer
    /// than --timeout: stopped (SIGSTOP), in a frozen cgroup, held by a
    /// debugger, a worker ends no request past --timeout itself, and its
    /// requests would hang for good (gunicorn's master kills such a worker
    /// too). Not when this loop itself was held as long: the whole group
    /// was frozen (`docker pause`), and its workers get a round to say they
    /// live again.
    fn kill_unheard_workers(&mut self, limit: Duration) {
        let now_ms = crate::date::mono_ms();
        let held = now_ms.saturating_sub(self.beats_seen_ms) > UNHEARD_LOOP_GAP_MS;
        self.beats_seen_ms = now_ms;
        if held {
            return;
        }
        let limit_ms = limit.max(UNHEARD_MIN).as_millis() as u64;
        let unheard: Vec<(libc::pid_t, usize, u64)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                !w.retiring
                    && w.kill_at.is_none()
                    && w.killed.is_none()
                    && self.scoreboard.state(w.slot) == WorkerState::Ready
            })
            .filter_map(|(p, w)| {
                let beat = self.scoreboard.last_beat(w.slot);
                let silent = now_ms.saturating_sub(beat);
                (beat != 0 && silent > limit_ms).then_some((*p, w.slot, silent))
            })
            .collect();
        for (pid, slot, silent) in unheard {
            let serving =
                describe_serving(&self.scoreboard.in_flight(slot, now_ms), self.scoreboard.offloaded(slot));
            error!(
                "Worker {slot} (pid {pid}) was not heard from for {:.1} s, past --timeout {}s (stopped with \
                 SIGSTOP, frozen, or held by a debugger?){serving}; killing it",
                silent as f64 / 1000.0,
                secs(limit)
            );
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if let Some(w) = self.workers.get_mut(&pid) {
                w.killed = Some("it was not heard from within --timeout");
            }
        }
    }

    /// Starts replacements for workers that ask for one, retires the
    /// workers whose replacement is ready, and kills retiring workers past
    /// their deadline.
    fn advance_replacements(&mut self) {
        let now = Instant::now();
        let ready: Vec<(libc::pid_t, libc::pid_t)> = self
            .workers
            .iter()
            .filter_map(|(pid, w)| {
                let old = w.replaces?;
                (self.scoreboard.state(w.slot) == WorkerState::Ready).then_some((*pid, old))
            })
            .collect();
        for (new, old) in ready {
            if let Some(w) = self.workers.get_mut(&new) {
                w.replaces = None;
            }
            self.replace_failures = 0;
            if let Some(w) = self.workers.get(&old) {
                let was_stale = w.stale && !w.retiring;
                info!(
                    "Worker pid {new} is ready; worker pid {old} stops accepting and finishes its requests"
                );
                self.retire(old, libc::SIGTERM);
                // The service manager was told, READY=1 with a STATUS, that a
                // reload's code did not load; the last of its workers gone,
                // that is over.
                if was_stale && self.told_ready && !self.workers.values().any(|w| w.stale && !w.retiring) {
                    let serving = self.workers.values().filter(|w| !w.retiring).count();
                    crate::systemd::notify(&format!("STATUS=serving with {serving} worker(s)"));
                }
            }
        }
        if self.replace_after.is_none_or(|at| now >= at) {
            let asking: Vec<(libc::pid_t, usize)> = self
                .workers
                .iter()
                .filter(|(pid, w)| !w.retiring && !self.replacement_booting(**pid))
                .filter(|(_, w)| self.scoreboard.retire(w.slot).is_some())
                .map(|(p, w)| (*p, w.slot))
                .collect();
            for (pid, slot) in asking {
                if self.free_slots.is_empty() {
                    // Asked again on every pass: spawn_replacing says once in
                    // a while that it waits for a slot; the worker's reason
                    // is said, and counted, when its replacement starts.
                    self.spawn_replacing(Some(pid));
                    continue;
                }
                let reason = self.scoreboard.retire(slot);
                self.note_respawn(reason.map_or("other", |r| r.name()));
                let why = reason.map_or("", |r| r.describe());
                info!("Worker {slot} (pid {pid}) is to be replaced because {why}; starting its replacement");
                self.spawn_replacing(Some(pid));
            }
            // A reload's workers still without a replacement booting: the
            // pool must not serve two versions of the code for good.
            let stale: Vec<(libc::pid_t, usize)> = self
                .workers
                .iter()
                .filter(|(pid, w)| w.stale && !w.retiring && !self.replacement_booting(**pid))
                .map(|(p, w)| (*p, w.slot))
                .collect();
            for (pid, slot) in stale {
                // Without a free slot spawn_replacing says so, once in a
                // while, and the next pass tries again.
                if !self.free_slots.is_empty() && !self.fork_backing_off() {
                    info!("Worker {slot} (pid {pid}) still serves the code from before the reload; starting a replacement");
                }
                self.spawn_replacing(Some(pid));
            }
        }
        if let Some(limit) = self.config.timeout {
            // --timeout covers loading the app too, as gunicorn's does: a
            // worker stuck in an import would otherwise never serve.
            let stuck: Vec<(libc::pid_t, usize)> = self
                .workers
                .iter()
                .filter(|(_, w)| {
                    w.kill_at.is_none()
                        && w.killed.is_none()
                        && now.duration_since(w.started) > limit
                        && self.scoreboard.state(w.slot) == WorkerState::Booting
                })
                .map(|(p, w)| (*p, w.slot))
                .collect();
            for (pid, slot) in stuck {
                error!(
                    "Worker {slot} (pid {pid}) did not finish loading the application within --timeout {}s; \
                     ending it (SIGABRT: its log has the Python stack where the import is stuck)",
                    limit.as_secs_f64()
                );
                // SIGABRT first: the worker's faulthandler writes where each
                // of its threads is, which SIGKILL would not let it do.
                unsafe { libc::kill(pid, libc::SIGABRT) };
                if let Some(w) = self.workers.get_mut(&pid) {
                    w.kill_at = Some(now + BOOT_ABORT_GRACE);
                }
            }
            self.kill_unheard_workers(limit);
            // One that outlived its SIGABRT (the app blocked or caught it).
            let unended: Vec<libc::pid_t> = self
                .workers
                .iter()
                .filter(|(_, w)| {
                    !w.retiring
                        && w.kill_at.is_some_and(|at| now >= at)
                        && self.scoreboard.state(w.slot) == WorkerState::Booting
                })
                .map(|(p, _)| *p)
                .collect();
            for pid in unended {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                if let Some(w) = self.workers.get_mut(&pid) {
                    w.kill_at = None;
                    w.killed = Some("it did not end on SIGABRT after --timeout while loading the app");
                }
            }
        }
        let overdue: Vec<libc::pid_t> = self
            .workers
            .iter()
            .filter(|(_, w)| w.retiring && w.kill_at.is_some_and(|at| now >= at))
            .map(|(p, _)| *p)
            .collect();
        for pid in overdue {
            let idle = self
                .workers
                .get(&pid)
                .is_some_and(|w| self.scoreboard.in_flight(w.slot, crate::date::mono_ms()).is_empty());
            if let Some(w) = self.workers.get_mut(&pid).filter(|w| !idle && !w.kill_put_off) {
                w.kill_put_off = true;
                w.kill_at = Some(now + CUT_GRACE);
                continue;
            }
            let why = match idle {
                true => HELD_AFTER_REQUESTS,
                false => "it did not finish within the graceful timeout",
            };
            warn!("Worker pid {pid} did not end within the graceful timeout ({why}); killing it");
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if let Some(w) = self.workers.get_mut(&pid) {
                w.kill_at = None;
                w.killed = Some(why);
            }
        }
    }

    /// Replaces this process's program with a fresh start of corral, keeping
    /// the pid (so the workers stay its children and the pidfile stays true)
    /// and the listening sockets (so no connection is refused). The new
    /// program starts its own workers and stops these once they are ready.
    fn reexec(&mut self, why: &str) {
        // Not three generations of workers at once: connections handed over
        // by the middle one could land on the oldest as it exits. It waits
        // for them instead (gunicorn ignores such a USR2).
        if !self.inherited.is_empty() {
            let pids: Vec<String> = self.inherited.iter().map(|p| p.to_string()).collect();
            info!(
                "Received {why}: the master re-executes once the workers from before the last re-exec (pid {}) \
                 have finished their requests",
                pids.join(", ")
            );
            self.reexec_pending = Some(why.to_string());
            return;
        }
        let held: Vec<String> = self
            .listeners
            .iter()
            .map(|l| format!("{} {}={}", l.protocol.name(), l.addr, l.fd.as_raw_fd()))
            .chain(self.stats.iter().map(|l| format!("stats {}={}", l.addr, l.raw())))
            .collect();
        if let Err(e) = self.hooks.check_reexec(&held.join(";")) {
            error!(
                "Received {why}: not re-executing the master, whose new program would refuse its \
                 configuration: {e}. The running master and workers go on serving"
            );
            return;
        }
        let Some((program, args)) = self.hooks.reexec_command() else {
            error!("Received {why}: this master cannot re-execute itself");
            return;
        };
        // The same list the check was given: these descriptors cross the exec.
        let inherit = held;
        for fd in self.listeners.iter().map(|l| l.fd.as_raw_fd()).chain(self.stats.iter().map(|l| l.raw())) {
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
        let workers: Vec<String> =
            self.workers.keys().chain(self.inherited.iter()).map(|p| p.to_string()).collect();
        info!(
            "Received {why}: re-executing the master ({}), keeping {} listener(s); {} worker(s) serve until the new ones are ready",
            program.to_string_lossy(),
            inherit.len(),
            workers.len()
        );
        std::env::set_var(INHERIT_ENV, inherit.join(";"));
        std::env::set_var(OLD_WORKERS_ENV, workers.join(","));
        std::env::set_var(crate::handover::POOL_ENV, crate::handover::pool());
        let extra = self.hooks.reexec_env();
        let before: Vec<Option<std::ffi::OsString>> =
            extra.iter().map(|(k, _)| std::env::var_os(k)).collect();
        for (k, v) in &extra {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
        crate::systemd::notify_reloading();
        self.hooks.event(Event::Reexec);
        // Signals stay blocked across execve; the new program blocks the same
        // set again and reads what arrived meanwhile from its signalfd.
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        crate::daemon::keep_across_exec();
        // Signals read with the one that asked for this and not acted on
        // yet: blocked, they stay pending across the exec.
        for &sig in &self.unhandled_signals {
            unsafe { libc::kill(libc::getpid(), sig) };
        }
        self.signals_raised_again = !self.unhandled_signals.is_empty();
        unsafe { libc::execv(program.as_ptr(), argv.as_ptr()) };
        let e = io::Error::last_os_error();
        crate::daemon::exec_failed();
        error!("re-exec of {} failed: {e}; this master keeps running", program.to_string_lossy());
        std::env::remove_var(INHERIT_ENV);
        std::env::remove_var(OLD_WORKERS_ENV);
        std::env::remove_var(crate::handover::POOL_ENV);
        for ((k, _), old) in extra.iter().zip(before) {
            match old {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
        for l in self.listeners.iter().chain(self.stats.iter()) {
            unsafe { libc::fcntl(l.fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        self.told_ready = false;
    }

    fn set_target(&mut self, new: usize) {
        let old = std::mem::replace(&mut self.target, new);
        self.hooks.event(Event::PoolSize { new, old });
    }

    fn min_workers(&self) -> usize {
        if self.config.workers_max.is_some() {
            self.config.workers.max(1)
        } else {
            1
        }
    }

    /// The most workers TTIN (or the adaptive pool) grows to: with no
    /// `--workers-max`, half the slots, the other half being the room a
    /// reload's replacements need.
    fn max_workers(&self) -> usize {
        self.config.workers_max.unwrap_or(self.scoreboard.slots() / 2)
    }

    /// The adaptive pool (`--workers-max`): one worker more after a few
    /// ticks with every thread busy, connections waiting to be accepted or
    /// every worker at `--max-connections`; one fewer after
    /// `scale_down_idle` in which the pool had a worker to spare (its
    /// threads' work and its connections would fit in the others). Each
    /// decision is logged with its reason.
    fn autoscale(&mut self) {
        let Some(max) = self.config.workers_max else {
            return;
        };
        let min = self.min_workers();
        let serving: Vec<usize> = self.workers.values().filter(|w| !w.retiring).map(|w| w.slot).collect();
        if serving.iter().any(|&s| self.scoreboard.state(s) != WorkerState::Ready) {
            return; // a worker is booting: judge the pool once it is whole
        }
        let threads = self.config.threads.max(1);
        let busy: usize = serving.iter().map(|&s| self.scoreboard.busy_threads(s)).sum();
        let queued: u32 = self.listeners.iter().map(|l| l.queued()).sum();
        let capacity = serving.len() * threads;
        // Connections count too: a pool whose threads are free but whose
        // workers hold --max-connections each turns new clients away.
        let conns: usize = serving.iter().map(|&s| self.scoreboard.conns(s)).sum();
        let max_conns = self.config.max_connections.max(1);
        let now = Instant::now();
        let settled = self.scale.last_change.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if busy >= capacity || queued > 0 || conns >= serving.len() * max_conns {
            self.scale.saturated_ticks += 1;
            self.scale.idle_since = None;
        } else {
            self.scale.saturated_ticks = 0;
            // Spare capacity: what is busy would fit in one worker fewer
            // with a thread still free, so the smaller pool is not saturated
            // at once (a pool that shrank to exactly full would grow again,
            // and cycle).
            // Likewise the connections held must fit in one worker fewer.
            if busy + threads < capacity && conns < (serving.len() - 1) * max_conns {
                self.scale.idle_since.get_or_insert(now);
            } else {
                self.scale.idle_since = None;
            }
        }
        if self.scale.saturated_ticks >= SCALE_UP_TICKS && self.target < max && settled {
            self.set_target(self.target + 1);
            info!(
                "Scaling up to {} worker(s): {busy} of {capacity} threads busy, {conns} connection(s) held \
                 (at most {} per worker), {queued} connection(s) waiting to be accepted",
                self.target, max_conns
            );
            self.scale.saturated_ticks = 0;
            self.scale.last_change = Some(now);
            self.spawn();
            return;
        }
        let idle_for = self.scale.idle_since.map_or(Duration::ZERO, |t| now.duration_since(t));
        if idle_for >= self.config.scale_down_idle && self.target > min && settled {
            self.set_target(self.target - 1);
            info!(
                "Scaling down to {} worker(s): at most {busy} of {capacity} threads busy and {conns} \
                 connection(s) held for {:.0} s",
                self.target,
                idle_for.as_secs_f64()
            );
            self.scale.idle_since = Some(now);
            self.scale.last_change = Some(now);
            // The least busy (the newest of those): one in a long request
            // would have it cut at --graceful-timeout, while another idles.
            let board = &self.scoreboard;
            let newest = self
                .workers
                .iter()
                .filter(|(_, w)| !w.retiring && w.replaces.is_none())
                .min_by_key(|(_, w)| (board.busy_threads(w.slot), std::cmp::Reverse(w.started)))
                .map(|(p, _)| *p);
            if let Some(pid) = newest {
                self.retire(pid, libc::SIGTERM);
            }
        }
    }

    /// Stops one worker for a TTOU: the newest that serves on its own. A
    /// replacement still booting, or the worker it replaces, is not one:
    /// stopping the first left the second serving the previous code for
    /// good, and one worker more than asked for. When every worker is in
    /// such a pair (a reload under way), one pair goes whole.
    fn remove_one_worker(&mut self) {
        // A replacement whose old worker is gone already is one of its own.
        let workers = &self.workers;
        let replacing = |w: &Worker| w.replaces.filter(|old| workers.contains_key(old));
        let replaced: Vec<libc::pid_t> = workers.values().filter_map(replacing).collect();
        let newest = workers
            .iter()
            .filter(|(p, w)| !w.retiring && replacing(w).is_none() && !replaced.contains(p))
            .max_by_key(|(_, w)| w.started)
            .map(|(p, _)| *p);
        let pair =
            workers.iter().filter(|(_, w)| !w.retiring).find_map(|(p, w)| replacing(w).map(|old| (*p, old)));
        if let Some(pid) = newest {
            self.retire(pid, libc::SIGTERM);
        } else if let Some((replacement, old)) = pair {
            let slot = self.workers[&replacement].slot;
            if self.scoreboard.state(slot) == WorkerState::Booting {
                // Still loading the app, where it cannot act on TERM.
                self.retire(replacement, libc::SIGKILL);
                if let Some(w) = self.workers.get_mut(&replacement) {
                    w.killed = Some("a TTOU made it unneeded while it booted");
                }
            } else {
                // Ready since the last look: it may hold connections already.
                self.retire(replacement, libc::SIGTERM);
            }
            self.retire(old, libc::SIGTERM);
        }
    }

    /// Closes the listeners and tells the workers to finish their requests.
    fn begin_graceful_stop(&mut self) {
        // New connections must not reach a queue the workers have stopped
        // taking from: the kernel resets whatever is still queued when the
        // last worker closes its copy of a listener. So the queues close to
        // newcomers first, and the workers, still accepting meanwhile, drain
        // them when told to stop.
        let mut closed = false;
        for l in &self.listeners {
            match l.close_queue() {
                Ok(c) => closed |= c,
                // Linux 6.x asks CAP_NET_ADMIN for a filter on a TCP socket,
                // which a master under --user or in a container lacks. The
                // workers still take what is queued as they stop; only a
                // connection arriving in the instant between the last accept
                // and the close goes unserved.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => debug!(
                    "{}: the accept queue stays open while the workers stop (a socket filter needs \
                     CAP_NET_ADMIN here): {e}",
                    l.url()
                ),
                Err(e) => warn!("{}: cannot close the accept queue before stopping: {e}", l.url()),
            }
        }
        if closed {
            // Handshakes already under way (their SYN came before the filter)
            // end in the queue within a round trip; on the same host or
            // network that is far less than this.
            std::thread::sleep(HANDSHAKE_SETTLE);
        }
        // Closing the master's copies too means that once the workers close
        // theirs, new connections are refused rather than left in a queue
        // nobody accepts from.
        self.close_listeners();
        // A worker still loading the app has no request to finish, and its
        // signals wait until the import is done, which may be never.
        for (pid, w) in self.workers.iter_mut() {
            if self.scoreboard.state(w.slot) == WorkerState::Booting {
                info!("Worker {} (pid {pid}) is still loading the application; stopping it at once", w.slot);
                unsafe { libc::kill(*pid, libc::SIGKILL) };
                w.killed = Some("the server stopped while it loaded the application");
            } else {
                // Before any TERM goes out: the first worker to drain would
                // otherwise see its siblings still serving and hand them its
                // kept connections, which they then close with a request
                // from the front end unread in them (a 502 for a POST).
                self.scoreboard.set_state(w.slot, WorkerState::Draining);
            }
        }
        self.signal_all(libc::SIGTERM);
        self.phase = Phase::Draining { deadline: Instant::now() + self.config.graceful_timeout };
    }

    /// Tells a worker to stop; its exit is then expected.
    fn retire(&mut self, pid: libc::pid_t, sig: libc::c_int) {
        let grace = self.config.graceful_timeout;
        if let Some(w) = self.workers.get_mut(&pid) {
            w.retiring = true;
            w.replaces = None;
            w.kill_at = Some(Instant::now() + grace);
            if sig == libc::SIGKILL {
                w.killed = Some("a later reload made it unneeded");
            }
        }
        unsafe { libc::kill(pid, sig) };
    }

    fn spawn(&mut self) {
        self.spawn_replacing(None);
    }

    /// Whether a worker is booting to replace `pid`.
    fn replacement_booting(&self, pid: libc::pid_t) -> bool {
        self.workers.values().any(|w| w.replaces == Some(pid))
    }

    /// Whether forks wait after failing (see `fork_retry_at`).
    fn fork_backing_off(&self) -> bool {
        self.fork_retry_at.is_some_and(|at| Instant::now() < at)
    }

    fn spawn_replacing(&mut self, replaces: Option<libc::pid_t>) {
        if self.fork_backing_off() {
            return;
        }
        let Some(slot) = self.free_slots.pop() else {
            // Retried on every pass until a slot frees: one line in a while.
            let now = Instant::now();
            if self.slot_warned.is_none_or(|at| now.duration_since(at) >= SLOT_WARN_EVERY) {
                self.slot_warned = Some(now);
                warn!(
                    "Every worker slot is taken (workers still finishing their requests hold theirs); \
                     the new worker starts once one frees"
                );
            }
            return;
        };
        self.scoreboard.reset(slot, 0);
        let respawns = match replaces {
            Some(old) => self.workers.get(&old).map_or(1, |w| w.respawns + 1),
            None => self.crashed_lines.pop().unwrap_or(0),
        };
        let listeners: Vec<(RawFd, ListenerInfo)> = self
            .listeners
            .iter()
            .map(|l| {
                (
                    l.fd.as_raw_fd(),
                    ListenerInfo {
                        server_name: l.server_name.clone(),
                        server_port: l.server_port.clone(),
                        is_unix: l.is_unix,
                        protocol: l.protocol,
                    },
                )
            })
            .collect();
        self.spawned += 1;
        let age = self.spawned;
        self.hooks.event(Event::Fork { slot, age });
        crate::handover::ensure_inbox_dir();
        self.hooks.before_fork();
        let master = std::process::id() as libc::pid_t;
        let report = crate::logfile::json().then(crate::crash::new_report).flatten();
        // The master is single-threaded (see the module doc), so forking here is safe.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            self.hooks.after_fork_parent();
            let e = io::Error::last_os_error();
            self.fork_failures += 1;
            let backoff = Duration::from_millis(100 << self.fork_failures.min(9)).min(FORK_RETRY_MAX);
            self.fork_retry_at = Some(Instant::now() + backoff);
            error!(
                "Cannot fork worker {slot}: {e} (failure {} in a row; a limit on processes: ulimit -u, systemd's \
                 TasksMax, a container's pids limit?); trying again in {backoff:?}",
                self.fork_failures
            );
            self.free_slots.push(slot);
            return;
        }
        if pid > 0 {
            self.fork_failures = 0;
            self.fork_retry_at = None;
        }
        if pid == 0 {
            crate::proctitle::set(&title(&format!("worker {slot}"), &self.config.name));
            crate::logfile::forget_losses();
            crate::daemon::forget();
            // Still blocked here: the master's forwarding handler goes before
            // the worker's own are set, which would otherwise chain to it.
            for sig in &SIGNALS {
                unsafe { libc::signal(*sig, libc::SIG_DFL) };
            }
            // The master's monitoring clients and its stats listener are not
            // the worker's to hold open: after the master's death the port
            // must be free, not held by a worker that never answers on it.
            // Dropped first: with the master's descriptors at the open files
            // limit, the worker's own need the room.
            self.stats_conns.clear();
            self.stats = None;
            // The worker takes its signals with handlers before any Python
            // runs, the app's after-fork hooks included: a program started
            // from there must not inherit the master's blocked mask (it would
            // ignore TERM for ever). Rust only, so before the interpreter's
            // own after-fork step.
            if let Err(e) = crate::worker::prepare_signals(self.config.sigint) {
                error!("cannot set up the worker's signals: {e}");
                unsafe { libc::_exit(1) };
            }
            self.hooks.after_fork_child();
            // The siblings' crash reports are theirs; this one's, its own.
            self.crash_reports.clear();
            if let Some(report) = report {
                crate::crash::set_report_fd(report);
            }
            unsafe {
                libc::close(self.signal_fd);
                // If the master is killed outright, workers hear about it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            }
            self.scoreboard.reset(slot, std::process::id() as i32);
            let ctx = WorkerCtx {
                max_requests: self
                    .config
                    .max_requests
                    .map(|m| m.saturating_add(jitter(self.config.max_requests_jitter))),
                config: self.config.clone(),
                listeners,
                slot,
                age,
                scoreboard: self.scoreboard,
                master,
                access_sink: self.access_sink.take(),
                previous_program_serves: !self.inherited.is_empty(),
            };
            let code = self.hooks.worker_main(ctx);
            self.hooks.worker_exit(code);
        }
        self.hooks.after_fork_parent();
        if let Some(report) = report {
            self.crash_reports.insert(pid, report);
        }
        self.workers.insert(
            pid,
            Worker {
                slot,
                started: Instant::now(),
                retiring: false,
                kill_at: None,
                kill_put_off: false,
                replaces,
                killed: None,
                age,
                stale: false,
                respawns,
            },
        );
        info!("Booting worker {slot} with pid {pid}");
    }

    /// The next worker (of this program or the previous one) that exited,
    /// and its wait status; None when none has. Only workers: a child the
    /// app started in the master (a thread of a `--preload` import running
    /// `subprocess`) is the app's to wait for, and reaped here it left
    /// `subprocess` no exit status (a failed command's returncode read 0).
    /// As PID 1, a container's init, the master also reaps every other
    /// child that ended (orphans come to it, and nobody else would).
    fn next_exited(&self) -> Option<(libc::pid_t, libc::c_int)> {
        let mut status = 0;
        for &pid in self.workers.keys().chain(self.inherited.iter()) {
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                return Some((pid, status));
            }
        }
        if std::process::id() == 1 {
            loop {
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    return None;
                }
                if self.workers.contains_key(&pid) || self.inherited.contains(&pid) {
                    return Some((pid, status));
                }
            }
        }
        None
    }

    fn reap(&mut self) {
        loop {
            let Some((pid, status)) = self.next_exited() else {
                return;
            };
            crate::handover::forget_inbox(std::process::id() as libc::pid_t, pid);
            if let Some(report) = self.crash_reports.remove(&pid) {
                // Before the line that says how it ended, as faulthandler's
                // text came before it in a text log.
                if let Some(text) = crate::crash::read_report(&report) {
                    let slot = self.workers.get(&pid).map_or(String::new(), |w| format!(" {}", w.slot));
                    error!("Worker{slot} (pid {pid}) crashed; its Python stacks:\n{}", text.trim_end());
                }
            }
            if let Some(w) = self.workers.get(&pid) {
                let c = self.scoreboard.counters(w.slot);
                for (total, v) in self.totals.iter_mut().zip(c) {
                    *total += v;
                }
                if c[crate::scoreboard::C_LOG_DROPPED] > 0 {
                    warn!(
                        "Worker {} (pid {pid}) dropped {} log line(s) before it exited: the log's reader took \
                         nothing for {} s",
                        w.slot,
                        c[crate::scoreboard::C_LOG_DROPPED],
                        crate::nowait::STALL_WAIT.as_secs()
                    );
                }
            }
            let Some(w) = self.workers.remove(&pid) else {
                if let Some(i) = self.inherited.iter().position(|p| *p == pid) {
                    self.inherited.swap_remove(i);
                    self.hooks.event(Event::WorkerExited { pid, slot: None, age: None, booted: true });
                    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                        info!("Worker pid {pid} from before the re-exec {}", describe_exit(status));
                    } else {
                        // Its requests in flight, if any, were lost; what
                        // they were is in the previous program's scoreboard.
                        warn!("Worker pid {pid} from before the re-exec {}", describe_exit(status));
                    }
                }
                continue;
            };
            let booted = self.scoreboard.state(w.slot) != WorkerState::Booting;
            self.hooks.event(Event::WorkerExited { pid, slot: Some(w.slot), age: Some(w.age), booted });
            let serving = (self.scoreboard.in_flight(w.slot, mono_ms()), self.scoreboard.offloaded(w.slot));
            self.free_slots.push(w.slot);
            let how = describe_exit(status);
            let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            if let (Some(old), Phase::Running) = (w.replaces, self.phase) {
                // A replacement died before it was ready: the worker it was
                // to replace keeps serving.
                let load_failed =
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == EXIT_APP_LOAD_FAILED;
                // Tried again (a reload's by its `stale` worker, a recycling's
                // by the worker still asking), later each time it fails.
                self.replace_failures += 1;
                let retry =
                    Duration::from_secs(if load_failed { 5 } else { 1 } << self.replace_failures.min(5) >> 1)
                        .min(REPLACE_RETRY_MAX);
                if load_failed {
                    error!(
                        "Replacement worker {} (pid {pid}) could not load the application (see the error \
                         above); worker pid {old} keeps serving the code it has; trying again in {retry:?}",
                        w.slot
                    );
                } else {
                    error!(
                        "Replacement worker {} (pid {pid}) {how} before it was ready; worker pid {old} keeps \
                         serving; trying again in {retry:?}",
                        w.slot
                    );
                }
                self.replace_after = Some(Instant::now() + retry);
                continue;
            }
            if w.retiring || self.phase != Phase::Running {
                let load_failed =
                    !booted && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == EXIT_APP_LOAD_FAILED;
                if clean {
                    info!("Worker {} (pid {pid}) exited", w.slot);
                } else if let (Some(why), true) = (w.killed, libc::WIFSIGNALED(status)) {
                    info!("Worker {} (pid {pid}) stopped with SIGKILL: {why}", w.slot);
                } else if load_failed {
                    info!("Worker {} (pid {pid}) could not load the application either", w.slot);
                } else if !booted {
                    warn!("Worker {} (pid {pid}) {how} while booting", w.slot);
                } else if self.phase != Phase::Running
                    && libc::WIFSIGNALED(status)
                    && libc::WTERMSIG(status) == libc::SIGKILL
                    && serving.0.is_empty()
                    && serving.1 == 0
                {
                    warn!("Worker {} (pid {pid}) {how}: {HELD_AFTER_REQUESTS}", w.slot);
                } else {
                    warn!("Worker {} (pid {pid}) {how}{}", w.slot, describe_serving(&serving.0, serving.1));
                }
                continue;
            }
            // Exit code 3 means "could not load the application" only from a
            // worker still booting: a serving app may exit with any code.
            let load_failed =
                !booted && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == EXIT_APP_LOAD_FAILED;
            if load_failed && !self.inherited.is_empty() {
                // After a re-exec (HUP with --preload, USR2, --reload): the
                // workers from before it still serve the code that loaded.
                // They go on; the new code is tried again until it loads.
                error!(
                    "Worker {} (pid {pid}) could not load the new code (see the error above); the {} worker(s) \
                     from before the re-exec keep serving the previous code; trying again in {}s",
                    w.slot,
                    self.inherited.len(),
                    RELOAD_RETRY.as_secs()
                );
                self.respawn_at = Some(Instant::now() + RELOAD_RETRY);
                if !self.told_ready && !self.told_reload_failed {
                    // The reload is over, failed: the service serves as before.
                    crate::systemd::notify(&format!(
                        "READY=1\nSTATUS=reload failed: the new code does not load; {} worker(s) serve the \
                         previous code",
                        self.inherited.len()
                    ));
                    self.told_reload_failed = true;
                }
                continue;
            }
            // A worker that died after a deploy the new code of which does
            // not load (its replacement refused): the others still serve
            // what they loaded, and go on.
            let others = self
                .workers
                .values()
                .filter(|o| !o.retiring && self.scoreboard.state(o.slot) == WorkerState::Ready)
                .count();
            // Not `told_ready`, which a reload resets until its new workers are up.
            if load_failed && self.served && others > 0 {
                error!(
                    "Worker {} (pid {pid}) could not load the application (see the error above); the {others} \
                     other worker(s) keep serving the code they loaded; trying again in {}s",
                    w.slot,
                    RELOAD_RETRY.as_secs()
                );
                self.respawn_at = Some(Instant::now() + RELOAD_RETRY);
                continue;
            }
            if load_failed {
                error!("Worker {} (pid {pid}) could not load the application (see the error above); shutting down", w.slot);
                self.fail(MASTER_EXIT_APP_LOAD);
                return;
            }
            if !booted {
                if self.boot_failed_at.is_none_or(|at| w.started > at) {
                    self.boot_failures += 1;
                    self.boot_failed_at = Some(Instant::now());
                }
                if others == 0 && !self.inherited.is_empty() {
                    // After a re-exec whose new code kills the worker that
                    // imports it (a crash in a C extension, os._exit): the
                    // workers from before go on serving the previous code,
                    // as they do when the new code raises.
                    let backoff =
                        Duration::from_millis(100 << self.boot_failures.min(9)).min(REPLACE_RETRY_MAX);
                    error!(
                        "Worker {} (pid {pid}) {how} while booting (failure {} in a row); the {} worker(s) from \
                         before the re-exec keep serving the previous code; trying again in {backoff:?}",
                        w.slot,
                        self.boot_failures,
                        self.inherited.len()
                    );
                    self.respawn_at = Some(Instant::now() + backoff);
                    continue;
                }
                if others > 0 {
                    // Others loaded the app and serve: they go on, as they
                    // do when the app's import raises after the start, and
                    // the pool is filled again later and later (the cause
                    // may be a database the import waits for, down for a
                    // while). Only a pool none of whose workers boots gives up.
                    let backoff =
                        Duration::from_millis(100 << self.boot_failures.min(9)).min(REPLACE_RETRY_MAX);
                    error!(
                        "Worker {} (pid {pid}) {how} while booting (failure {} in a row); the {others} other \
                         worker(s) keep serving; trying again in {backoff:?}",
                        w.slot, self.boot_failures
                    );
                    self.respawn_at = Some(Instant::now() + backoff);
                    continue;
                }
                if self.boot_failures >= MAX_BOOT_FAILURES {
                    error!(
                        "Worker {} (pid {pid}) {how} while booting; {} boot failures in a row, giving up",
                        w.slot, self.boot_failures
                    );
                    self.fail(MASTER_EXIT_BOOT_FAILURES);
                    return;
                }
                let backoff = Duration::from_millis(100 << self.boot_failures.min(6));
                error!(
                    "Worker {} (pid {pid}) {how} while booting (failure {} of {MAX_BOOT_FAILURES}); retrying in {:?}",
                    w.slot, self.boot_failures, backoff
                );
                self.respawn_at = Some(Instant::now() + backoff);
            } else {
                self.boot_failures = 0;
                self.boot_failed_at = None;
                // A worker that dies moments after it became ready (a thread
                // the app started at import ends the process, say) would be
                // replaced for good several times a second, two log lines
                // each; uWSGI sleeps between such respawns, so does this.
                if w.started.elapsed() < QUICK_DEATH {
                    self.quick_deaths += 1;
                } else {
                    self.quick_deaths = 0;
                }
                self.note_respawn("crash");
                // Unless a replacement of its own is booting already (a
                // reload's), the worker started in its place inherits its line.
                if !self.workers.values().any(|o| o.replaces == Some(pid)) {
                    self.crashed_lines.push(w.respawns + 1);
                }
                if clean {
                    // Exit 0 from a serving worker: stopped by someone else
                    // (a TERM sent to it, not to the master), or the app
                    // called sys.exit(0).
                    warn!(
                        "Worker {} (pid {pid}) {how}{}; replacing it",
                        w.slot,
                        describe_serving(&serving.0, serving.1)
                    );
                } else {
                    error!(
                        "Worker {} (pid {pid}) {how}{}; replacing it",
                        w.slot,
                        describe_serving(&serving.0, serving.1)
                    );
                }
                if self.quick_deaths >= QUICK_DEATHS_TOLERATED {
                    let backoff =
                        Duration::from_millis(100 << (self.quick_deaths - QUICK_DEATHS_TOLERATED).min(9))
                            .min(REPLACE_RETRY_MAX);
                    warn!(
                        "Workers are dying within {}s of starting ({} in a row); the next starts in {backoff:?}",
                        QUICK_DEATH.as_secs(),
                        self.quick_deaths
                    );
                    self.respawn_at = Some(Instant::now() + backoff);
                }
            }
        }
    }

    fn fail(&mut self, code: i32) {
        self.exit_code = code;
        self.close_listeners();
        self.signal_all(libc::SIGQUIT);
        self.phase = Phase::Stopping { deadline: Instant::now() + Duration::from_secs(2) };
        for w in self.workers.values_mut() {
            w.retiring = true;
        }
    }

    fn signal_all(&self, sig: libc::c_int) {
        for pid in self.workers.keys().chain(self.inherited.iter()) {
            unsafe { libc::kill(*pid, sig) };
        }
    }

    fn close_listeners(&mut self) {
        for mut l in self.listeners.drain(..) {
            l.remove_file();
        }
    }

    fn cleanup(&mut self) {
        self.close_listeners();
        if let Some(mut l) = self.stats.take() {
            l.remove_file();
        }
        crate::handover::remove_inbox_dir();
    }
}

/// Resident memory of a process, from /proc; 0 if it is gone.
pub(crate) fn rss_of(pid: libc::pid_t) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Workers handed down by the program this master replaced (see [`OLD_WORKERS_ENV`]).
fn take_inherited_workers() -> Vec<libc::pid_t> {
    let list = std::env::var(OLD_WORKERS_ENV).unwrap_or_default();
    std::env::remove_var(OLD_WORKERS_ENV);
    list.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

/// Listening sockets handed down by the program this master replaced:
/// (protocol name, address as written, descriptor). Removes the variable.
pub fn take_inherited_listeners() -> Vec<(String, String, RawFd)> {
    let list = std::env::var(INHERIT_ENV).unwrap_or_default();
    std::env::remove_var(INHERIT_ENV);
    parse_inherited(&list)
}

/// A list of listening sockets as [`INHERIT_ENV`] (and [`CHECK_BINDS_ENV`])
/// carry it: (protocol, address, descriptor).
pub fn parse_inherited(list: &str) -> Vec<(String, String, RawFd)> {
    list.split(';')
        .filter_map(|entry| {
            let (proto, rest) = entry.split_once(' ')?;
            let (addr, fd) = rest.rsplit_once('=')?;
            Some((proto.to_string(), addr.to_string(), fd.parse().ok()?))
        })
        .collect()
}

/// The master's signals as a set.
fn signal_set() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in &SIGNALS {
            libc::sigaddset(&mut set, *sig);
        }
        set
    }
}

/// Sets SIGPIPE back to ignored if something in this process (the app, as
/// it loaded) set another disposition; whether it had to. Python ignores
/// SIGPIPE at start, and the server relies on that: a write to a socket
/// whose client left, or to a log pipe whose reader stopped, must fail with
/// EPIPE, not kill the process. `signal.signal(SIGPIPE, SIG_DFL)`, the
/// idiom of command-line tools, at an app's import would let any client
/// that disconnects kill the worker and every request it serves. Programs
/// the app starts get the default back from `subprocess` as before.
pub(crate) fn keep_sigpipe_ignored() -> bool {
    unsafe {
        let mut now: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut now) != 0
            || now.sa_sigaction == libc::SIG_IGN
        {
            return false;
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    true
}

/// The warning for [`keep_sigpipe_ignored`] having had to act.
pub(crate) const SIGPIPE_RESTORED: &str = "The app set its own disposition for SIGPIPE (such as \
     signal.signal(SIGPIPE, SIG_DFL)); it is ignored again, as Python has it, since otherwise a client \
     that disconnects, or a log reader that stops, would kill the process serving it. Writes to a \
     closed connection fail with EPIPE instead";

/// Blocks the master's signals and returns a signalfd that reads them.
fn block_signals() -> io::Result<RawFd> {
    // A preloaded app may have replaced the handlers that hold the signals
    // until now (`signal.signal(SIGTERM, ...)` at import): they are the
    // master's, and its own go back below. The app's would never run (the
    // main thread runs no Python), and one signal taken by an app thread
    // through it would be lost to the master.
    let replaced: Vec<String> = SIGNALS
        .iter()
        .filter(|sig| unsafe {
            let mut now: libc::sigaction = std::mem::zeroed();
            libc::sigaction(**sig, std::ptr::null(), &mut now) == 0
                && now.sa_sigaction != note_early_signal as *const () as libc::sighandler_t
        })
        .map(|sig| signal_name(*sig))
        .collect();
    if !replaced.is_empty() && !HELD.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        warn!(
            "The app, preloaded, set its own handler for {}; the master's signals are the server's \
             (stop, reload, scaling), so corral's handler is back in place and the app's will not run",
            replaced.join(", ")
        );
    }
    if keep_sigpipe_ignored() {
        warn!("{SIGPIPE_RESTORED}");
    }
    let set = signal_set();
    unsafe {
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
        MASTER_PID.store(libc::getpid(), std::sync::atomic::Ordering::Relaxed);
        MAIN_TID.store(libc::gettid(), std::sync::atomic::Ordering::Relaxed);
    }
    release_early_signals(forward_to_main_thread);
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The master's signals that arrived while they were held, one bit each.
static EARLY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// The dispositions [`hold_early_signals`] replaced, to put back.
static HELD: std::sync::Mutex<Vec<(libc::c_int, libc::sigaction)>> = std::sync::Mutex::new(Vec::new());

extern "C" fn note_early_signal(sig: libc::c_int) {
    EARLY.fetch_or(1 << sig, std::sync::atomic::Ordering::Relaxed);
    if matches!(sig, libc::SIGTERM | libc::SIGINT | libc::SIGQUIT)
        && IMPORTING.load(std::sync::atomic::Ordering::Relaxed)
    {
        // A second one: the import did not stop at the first (C code that
        // never looks), so the master dies of it as without a handler.
        if IMPORT_INTERRUPTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
            }
        } else if let Some(interrupt) = INTERRUPT.get() {
            interrupt();
        }
    }
}

/// Set while the master imports the app (`--preload`), which may take long
/// (a module that waits on a database): a stop signal then interrupts the
/// import rather than wait for its end (it was acted on only after it).
static IMPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static IMPORT_INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Interrupts the import; async-signal-safe (Python's
/// `PyErr_SetInterruptEx`, which raises KeyboardInterrupt in it).
static INTERRUPT: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Marks the span of the master's import of the app: a stop signal that
/// comes then (TERM, INT, QUIT) calls `interrupt`, and a second one ends
/// the master at once. Returns, at the end, whether the import was
/// interrupted.
pub fn importing(on: bool, interrupt: fn()) -> bool {
    let _ = INTERRUPT.set(interrupt);
    IMPORTING.store(on, std::sync::atomic::Ordering::Relaxed);
    IMPORT_INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether a signal that stops the master (TERM, INT, QUIT) arrived while
/// the signals were held (see [`hold_early_signals`]), not acted on yet.
pub fn early_stop_noted() -> bool {
    let early = EARLY.load(std::sync::atomic::Ordering::Relaxed);
    [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT].iter().any(|&s| early & (1 << s) != 0)
}

/// From the start of the program until the master reads its signalfd, its
/// signals are noted by a handler with the mask empty, rather than blocked.
/// A program the app starts meanwhile (while `--preload` imports it)
/// inherits the mask, and blocked signals would make it deaf to TERM for
/// its whole life: after a re-exec the previous program's blocked mask is
/// still in force. A handler, unlike a mask, does not outlive `exec`.
/// What arrives meanwhile is raised again once the signals are blocked, so
/// the master acts on it as usual.
pub fn hold_early_signals() {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if !held.is_empty() {
        return;
    }
    for sig in &SIGNALS {
        if let Some(old) = set_handler(*sig, note_early_signal) {
            held.push((*sig, old));
        }
    }
    let set = signal_set();
    unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
}

/// Runs `handler` for `sig` (restarting interrupted system calls); returns
/// the disposition it replaced. Unlike `SIG_IGN`, a handler is reset to the
/// default in a program started with `exec`.
pub(crate) fn set_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> Option<libc::sigaction> {
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        (libc::sigaction(sig, &action, &mut old) == 0).then_some(old)
    }
}

/// Ends [`hold_early_signals`] in a process that will not supervise
/// (`--check-config`): the old dispositions come back, and a signal that
/// arrived meanwhile is delivered now.
pub fn restore_early_signals() {
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    for (sig, old) in held.drain(..) {
        unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
    }
    drop(held);
    raise_early_signals();
}

/// The master's pid and main thread, for [`forward_to_main_thread`].
static MASTER_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static MAIN_TID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The master's signals, once its main thread blocks them. A thread the app
/// started at import (with --preload: a metrics exporter, a scheduler, a
/// telemetry batcher) does not block them, and the kernel gives a signal sent
/// to the process to any thread that does not: with the default action
/// there, HUP or USR1 killed the master and TTIN stopped it. This passes the
/// signal on to the main thread, where it waits in the signalfd. In a process
/// forked from the master without exec (a worker before it sets its own, a
/// child the app forks) the signal gets its default action, as it would have
/// without this handler.
extern "C" fn forward_to_main_thread(sig: libc::c_int) {
    unsafe {
        let pid = libc::getpid();
        if pid == MASTER_PID.load(std::sync::atomic::Ordering::Relaxed) {
            let tid = MAIN_TID.load(std::sync::atomic::Ordering::Relaxed);
            libc::syscall(libc::SYS_tgkill, pid, tid, sig);
        } else {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// Ends [`hold_early_signals`] once the main thread blocks the signals:
/// `handler` takes them in any other thread, and what arrived meanwhile is
/// raised again, to wait in the signalfd.
fn release_early_signals(handler: extern "C" fn(libc::c_int)) {
    HELD.lock().unwrap_or_else(|p| p.into_inner()).clear();
    for sig in &SIGNALS {
        set_handler(*sig, handler);
    }
    raise_early_signals();
}

/// Raises again the signals [`hold_early_signals`] noted.
fn raise_early_signals() {
    let early = EARLY.swap(0, std::sync::atomic::Ordering::Relaxed);
    for sig in &SIGNALS {
        if early & (1 << sig) != 0 {
            unsafe { libc::raise(*sig) };
        }
    }
}

fn read_signals(fd: RawFd) -> Vec<libc::c_int> {
    let mut out = Vec::new();
    loop {
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let n = unsafe {
            libc::read(
                fd,
                &mut info as *mut _ as *mut libc::c_void,
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
            return out;
        }
        out.push(info.ssi_signo as libc::c_int);
    }
}

pub fn signal_name(sig: libc::c_int) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_string())
}

fn describe_exit(status: libc::c_int) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let core = if libc::WCOREDUMP(status) { ", core dumped" } else { "" };
        format!("was killed by signal {sig} ({}{core})", signal_name(sig))
    } else {
        format!("exited with code {}", libc::WEXITSTATUS(status))
    }
}

/// A number in 0..=max that differs between workers, so that workers
/// started together do not all recycle at the same request count.
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut x =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
    // splitmix64 finalizer: spreads nearby inputs over the whole range.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    x % max.saturating_add(1).max(1)
}

/// A process title: `corral: master [NAME]`, `corral: worker 2 [NAME]`.
fn title(role: &str, name: &str) -> String {
    match name {
        "" => format!("corral: {role}"),
        _ => format!("corral: {role} [{name}]"),
    }
}

/// The longest wait between two tries at a fork the system refused: the
/// limit may lift at any moment, and a try costs little.
const FORK_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long past --graceful-timeout a stop waits for workers that have no
/// request left before it kills them (see `CUT_GRACE` for those that have).
const STOP_EXIT_GRACE: Duration = Duration::from_secs(1);

/// The least silence of a worker the master takes for one that does not
/// run, whatever --timeout says: workers say they live four times a second.
const UNHEARD_MIN: Duration = Duration::from_secs(2);

/// A gap between two looks at the workers' heartbeats past which the
/// master takes itself for held too (see `kill_unheard_workers`).
const UNHEARD_LOOP_GAP_MS: u64 = 2000;

/// How much longer than --graceful-timeout a retiring worker still
/// serving requests is given: its own drain ends at the same moment, cutting
/// them and saying which, and its exit then takes a moment. One whose
/// requests are over (an app thread or an atexit handler holding it) is
/// killed at --graceful-timeout itself.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// Why a worker with no request left was still there at the graceful
/// timeout: its serving was over, and Python's own exit waited.
const HELD_AFTER_REQUESTS: &str = "it had finished its requests, but its process did not end: a non-daemon \
                                   thread the app started, or an atexit handler, kept it";

/// What a dead worker was doing, for its exit line: `serving` as the
/// scoreboard names it, and `offloaded` responses its offload thread was
/// sending (named or not).
pub(crate) fn describe_serving(serving: &[InFlight], offloaded: usize) -> String {
    let named = serving.iter().filter(|r| r.offloaded).count();
    let unnamed = offloaded.saturating_sub(named);
    if serving.is_empty() && unnamed == 0 {
        return " while idle".to_string();
    }
    let mut list: Vec<String> = serving
        .iter()
        .map(|r| match r.offloaded {
            false => format!("{} ({} ms in)", r.what, r.age_ms),
            true => format!("{} (sending its file, {} ms in)", r.what, r.age_ms),
        })
        .collect();
    if unnamed > 0 {
        list.push(format!("{unnamed} more file response(s)"));
    }
    format!(" while serving {}", list.join(", "))
}

/// A duration in seconds as an operator wrote it: `30`, `1.5`, `0.25`.
pub(crate) fn secs(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_read_as_they_were_written() {
        for (d, s) in [(0.0, "0"), (1.5, "1.5"), (30.0, "30"), (100.0, "100"), (0.25, "0.25")] {
            assert_eq!(secs(Duration::from_secs_f64(d)), s);
        }
    }
}
