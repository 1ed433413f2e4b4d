//! The worker's signals: which ones it takes over from the master's
//! defaults, and how the main thread waits for them.

use super::*;

use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicI32, AtomicU32};

/// The worker's signal handlers, set up right after the fork by
/// [`prepare_signals`], for [`run_worker`] to take.
pub(super) static PREPARED_SIGNALS: Mutex<Option<WorkerSignals>> = Mutex::new(None);

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
pub const WORKER_SIGNALS: [libc::c_int; 9] = [
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
pub(super) static OWN_HANDLERS: Mutex<Vec<(libc::c_int, libc::sigaction)>> = Mutex::new(Vec::new());

/// Puts the worker's signal handlers back where the app, loading, set its
/// own (`signal.signal(SIGTERM, ...)` at import), and says so. A Python
/// handler runs only when the main thread runs Python, which in a worker it
/// never does: the app's handler would not run, and the worker would no
/// longer hear the master's TERM (a reload or stop would wait out
/// --graceful-timeout and kill it).
pub(super) fn restore_own_handlers() {
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
    if crate::supervise::keep_sigpipe_ignored() {
        warn!("{}", crate::supervise::SIGPIPE_RESTORED);
    }
    // A mask the app set while loading (pthread_sigmask at import) would
    // hold the master's TERM for good, and the serving threads, started
    // next, inherit this thread's mask.
    let mut unblocked = Vec::new();
    unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        if libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) == 0 {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in WORKER_SIGNALS.into_iter().chain(crate::crash::FAULTS) {
                if libc::sigismember(&mask, sig) == 1 {
                    libc::sigaddset(&mut set, sig);
                    unblocked.push(crate::supervise::signal_name(sig));
                }
            }
            if !unblocked.is_empty() {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
        }
    }
    if !unblocked.is_empty() {
        warn!(
            "The app blocked {} while it loaded; a worker must take the master's signals, so they are \
             unblocked again",
            unblocked.join(", ")
        );
    }
}

/// Signals meant for the master alone, which a worker takes and ignores
/// (see [`WorkerSignals::install`]).
pub(super) const MASTERS_SIGNALS: [libc::c_int; 4] =
    [libc::SIGHUP, libc::SIGTTIN, libc::SIGTTOU, libc::SIGWINCH];

/// One bit per signal of [`MASTERS_SIGNALS`] that came since the main
/// thread last looked, and the process that sent the last of them: the
/// handler may not log, the main thread does.
static MISDIRECTED: AtomicU32 = AtomicU32::new(0);
static MISDIRECTED_SENDER: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_misdirected(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let sender = if info.is_null() { 0 } else { unsafe { (*info).si_pid() } };
    // Not one from the kernel or a terminal (sender 0: a window resized,
    // Ctrl-Z's group), nor WINCH, which a terminal sends the whole group.
    if sender == 0 || sig == libc::SIGWINCH {
        return;
    }
    if let Some(i) = MASTERS_SIGNALS.iter().position(|&s| s == sig) {
        MISDIRECTED_SENDER.store(sender, Ordering::Relaxed);
        MISDIRECTED.fetch_or(1 << i, Ordering::Relaxed);
    }
}

/// A handler that notes the signal, not SIG_IGN: an ignored signal stays
/// ignored in the programs the app runs, a handler does not.
fn set_note_handler(sig: libc::c_int) {
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = note_misdirected as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(sig, &action, std::ptr::null_mut());
    }
}

/// Says which of the master's signals came to this worker since the last
/// call: one sent to a worker's pid by mistake (`kill -HUP` of the wrong
/// process) would otherwise do nothing, and nothing would tell why. At INFO:
/// one sent to the whole group (`systemctl kill -s HUP`) reached the master
/// too, and is no mistake.
pub(super) fn log_misdirected(master: libc::pid_t) {
    let bits = MISDIRECTED.swap(0, Ordering::Relaxed);
    if bits == 0 {
        return;
    }
    let names: Vec<String> = MASTERS_SIGNALS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, &sig)| crate::supervise::signal_name(sig))
        .collect();
    info!(
        "Worker received {} from pid {}: ignored, as the master's signal (the master is pid {master}; a worker \
         acts on TERM, INT, QUIT and USR1): pid={}",
        names.join(", "),
        MISDIRECTED_SENDER.load(Ordering::Relaxed),
        std::process::id(),
    );
}

/// The worker left at a quick stop (SIGQUIT, or SIGINT as configured).
pub(super) static STOPPED_AT_ONCE: AtomicBool = AtomicBool::new(false);

/// Whether this worker's serving ended with a quick stop rather than a
/// graceful one (for gunicorn's `worker_int` hook).
pub fn stopped_at_once() -> bool {
    STOPPED_AT_ONCE.load(Ordering::Relaxed)
}

/// Set when the worker's serving ended with nothing left running: no
/// request in flight or past its timeout, no thread in a pass, no crash.
pub(super) static LEFT_IDLE: AtomicBool = AtomicBool::new(false);

/// Whether this worker's serving ended with nothing left running, so that
/// the interpreter may be finalized as Python's own exit does: no other
/// thread will need it again, and none holds it.
pub fn left_idle() -> bool {
    LEFT_IDLE.load(Ordering::SeqCst)
}

/// The process that sent the last graceful stop signal (TERM, or INT unless
/// --sigint quick), and which signal it was. Two signals that come before
/// the main thread looks leave the last one's; the master marks a worker
/// it stops in the scoreboard too, so its word is not lost that way.
pub(super) static STOP_SENDER: AtomicI32 = AtomicI32::new(0);
pub(super) static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Signals a worker acts on, delivered through a self-pipe so the main
/// thread can wait for them together with its sweep timer.
pub(super) struct WorkerSignals {
    pub(super) read_fd: RawFd,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) quit: Arc<AtomicBool>,
    /// SIGUSR1: reopen log files (after logrotate renamed them).
    pub(super) reopen: Arc<AtomicBool>,
}

impl WorkerSignals {
    pub(super) fn install(sigint: SigintMode) -> io::Result<WorkerSignals> {
        use signal_hook::consts::*;
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both ends were just opened, and nothing else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let stop = Arc::new(AtomicBool::new(false));
        let quit = Arc::new(AtomicBool::new(false));
        // The master's table decides, for a signal sent to the whole process
        // group too (Ctrl-C, systemd's KillMode=control-group).
        for sig in [SIGTERM, SIGINT, SIGQUIT] {
            match crate::supervise::signal_action(sig, sigint) {
                Some(crate::supervise::Action::QuickStop) => {
                    signal_hook::flag::register(sig, quit.clone())?;
                }
                _ => {
                    let stop = stop.clone();
                    // SAFETY: the action only stores to atomics, which is
                    // async-signal-safe.
                    unsafe {
                        signal_hook_registry::register_sigaction(sig, move |info: &libc::siginfo_t| {
                            STOP_SENDER.store(info.si_pid(), Ordering::Relaxed);
                            STOP_SIGNAL.store(info.si_signo, Ordering::Relaxed);
                            stop.store(true, Ordering::SeqCst);
                        })
                    }?;
                }
            }
        }
        let reopen = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(SIGUSR1, reopen.clone())?;
        for sig in [SIGTERM, SIGINT, SIGQUIT, SIGUSR1] {
            // One descriptor per signal, which signal-hook keeps for good;
            // close-on-exec like the pipe itself (try_clone), so programs
            // the app runs do not inherit the worker's signal pipe.
            signal_hook::low_level::pipe::register_raw(sig, write.try_clone()?.into_raw_fd())?;
        }
        // Signals meant for the master alone: a worker ignores them rather
        // than die of their default action when a whole group is signalled
        // (see set_note_handler).
        for sig in MASTERS_SIGNALS {
            set_note_handler(sig);
        }
        // From the master's next program, which stops this worker next.
        crate::supervise::set_handler(SIGUSR2, crate::handover::note_superseded);
        drop(write);
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
        Ok(WorkerSignals { read_fd: read.into_raw_fd(), stop, quit, reopen })
    }

    pub(super) fn wait(&self, timeout: Duration) {
        crate::exchange::poll_one(self.read_fd, libc::POLLIN, timeout.as_millis() as i32);
        let mut buf = [0u8; 64];
        while unsafe { libc::read(self.read_fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}
