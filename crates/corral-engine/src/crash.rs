//! A serving thread that crashes (a segfault in a C extension, an abort
//! from a failed assertion) loses its own request, not every connection its
//! worker holds.
//!
//! A worker holds more connections than it has threads: kept-alive ones
//! between two requests, new ones whose request waits in the socket. Dying
//! at once resets all of them, and a front end answers 502 to what it sent
//! on them. So the crashed thread's handler does not die: it notes the
//! crash and parks the thread for good. The main thread then does what it
//! does for a worker whose every thread is stuck past `--timeout`: answers
//! the crashed request, asks for a replacement, and hands the connections
//! no thread serves (with the bytes of a request begun on one) to the
//! replacement once that is ready. Then it
//! dies of the same signal, so the master's log and a core dump say what
//! they said before.
//!
//! A thread the app started (a C extension's own, or a Python thread) that
//! crashes is taken the same way, with no request of its own to answer:
//! the serving threads' requests finish, unless it held the GIL.
//!
//! The handler goes in before Python's `faulthandler`, which then calls it
//! after it has written every thread's Python stack. Only a signal raised
//! on a serving thread or an app's thread of this very process is taken
//! this way: the kernel's fault, an `abort()`, or faulthandler passing
//! either on (which hides whether another process sent it: a `kill -SEGV`
//! that lands on such a thread counts as a crash). Anything else dies of
//! its signal at once, as without the handler: a crash on one of corral's
//! own threads (the main thread, the flusher, the offload thread), whose
//! work the others need, in a process the app forked, or a second crash.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

/// The signals a crash raises.
pub(crate) const FAULTS: [libc::c_int; 5] =
    [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL, libc::SIGABRT];

/// The process whose serving threads the handler may keep: not a child the
/// app forked, which inherits the handler.
static WORKER_PID: AtomicI32 = AtomicI32::new(0);
/// Taken by the first crash; a second one dies at once.
static CLAIMED: AtomicBool = AtomicBool::new(false);
/// The crash: signal number in the high half, serving thread index + 1 in
/// the low one ([`APP_THREAD`] for a thread of the app's); 0 while none
/// happened.
static CRASH: AtomicU64 = AtomicU64::new(0);
/// The low half of [`CRASH`] for a thread the app started.
const APP_THREAD: u64 = 0xffff_ffff;
/// Whether the crashed thread holds the lock the app's other threads need
/// to go on (Python's GIL): their requests then never end.
static HELD_LOCK: AtomicBool = AtomicBool::new(false);
/// The embedding's check for that lock, run in the handler: a
/// `fn() -> bool` that must be async-signal-safe. A `OnceLock` is read with
/// one atomic load, which a signal handler may do.
static HOLDS_LOCK: std::sync::OnceLock<fn() -> bool> = std::sync::OnceLock::new();

/// The kernel thread id of each serving thread, by index; 0 where none.
/// Not a thread-local: in a library loaded with dlopen, a thread's first
/// access to one may allocate, which a handler must not do.
static SERVING: [AtomicI32; MAX_SERVING] = [const { AtomicI32::new(0) }; MAX_SERVING];
/// Serving threads past this many crash as they would without the handler.
const MAX_SERVING: usize = 1024;

/// The kernel thread ids of corral's own threads besides the main one and
/// the serving ones (the flusher, the offload thread): a crash there is
/// corral's, and the others could not go on without them.
static OWN: [AtomicI32; 4] = [const { AtomicI32::new(0) }; 4];

/// Set while the worker's main loop runs, the one that takes a crash from
/// there: a thread of the app's that crashed while the app loaded, or as
/// the worker exits, would be parked with nobody to end the process (and,
/// holding the GIL, leave the import or the exit waiting for good). It
/// dies of its signal at once then, as before.
static APP_THREADS_TAKEN: AtomicBool = AtomicBool::new(false);

/// See [`APP_THREADS_TAKEN`].
pub(crate) fn take_app_thread_crashes(on: bool) {
    APP_THREADS_TAKEN.store(on, Ordering::Release);
}

/// Marks the calling thread as one of corral's own (see [`OWN`]).
pub(crate) fn enter_own() {
    let tid = gettid();
    for slot in &OWN {
        if slot.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return;
        }
    }
}

/// Installs the handler for the signals a crash raises, in a worker before
/// anything else takes them (Python's `faulthandler` chains to it).
/// `holds_lock` says whether the calling thread holds a lock the app's other
/// threads need, such as the GIL; it runs inside a signal handler.
pub fn install(holds_lock: fn() -> bool) {
    WORKER_PID.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    let _ = HOLDS_LOCK.set(holds_lock);
    for sig in FAULTS {
        set_fault_handler(sig);
    }
}

fn set_fault_handler(sig: libc::c_int) {
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_fault as *const () as libc::sighandler_t;
        // On the thread's alternate stack: a fault that is a stack overflow
        // (C recursion in json.dumps with the recursion limit raised) leaves
        // no room on the thread's own stack to run the handler in.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(sig, &action, std::ptr::null_mut());
    }
}

/// Puts the crash handler back on the faults whose action the app, loading,
/// set to the default or to ignore (`signal.signal(SIGSEGV, SIG_DFL)`):
/// a crash would otherwise cut every request of the worker without a
/// word. A handler of the app's own (faulthandler's, which chains to this
/// one) is left in place. Returns the names of the faults put back.
pub fn restore_if_dropped() -> Vec<String> {
    if !installed() {
        return Vec::new();
    }
    let mut restored = Vec::new();
    for sig in FAULTS {
        unsafe {
            let mut now: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut now) == 0
                && (now.sa_sigaction == libc::SIG_DFL || now.sa_sigaction == libc::SIG_IGN)
            {
                set_fault_handler(sig);
                restored.push(crate::supervise::signal_name(sig));
            }
        }
    }
    restored
}

/// Whether [`install`] ran in this process.
pub(crate) fn installed() -> bool {
    WORKER_PID.load(Ordering::Relaxed) == unsafe { libc::getpid() }
}

/// Size of a serving thread's alternate signal stack, where the fault
/// handler runs (it needs little: a few atomics and a pause).
const ALT_STACK: usize = 64 * 1024;

/// Marks the calling thread as serving thread `t`, and gives it an
/// alternate signal stack for the fault handler (a thread that overflows
/// its stack would otherwise die without it: no 500, no stacks, no
/// hand-over).
pub(crate) fn enter_serving(t: usize) {
    if let Some(slot) = SERVING.get(t) {
        slot.store(gettid(), Ordering::Release);
    }
    // Kept for the thread's life, which is the worker's.
    let stack = Box::leak(vec![0u8; ALT_STACK].into_boxed_slice());
    let ss = libc::stack_t { ss_sp: stack.as_mut_ptr().cast(), ss_flags: 0, ss_size: ALT_STACK };
    unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
}

fn gettid() -> i32 {
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The crash, if a serving thread or an app's thread crashed: its signal,
/// the serving thread's index, and whether it holds the lock the other
/// threads need.
pub(crate) fn crashed() -> Option<Crash> {
    let c = CRASH.load(Ordering::Acquire);
    (c != 0).then(|| Crash {
        signal: (c >> 32) as libc::c_int,
        thread: match c & 0xffff_ffff {
            APP_THREAD => None,
            t => Some(t as usize - 1),
        },
        held_lock: HELD_LOCK.load(Ordering::Acquire),
    })
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Crash {
    pub signal: libc::c_int,
    /// The serving thread that crashed; None for a thread the app started.
    pub thread: Option<usize>,
    pub held_lock: bool,
}

/// Dies of the crash's signal, as the worker would have without the
/// handler (with a core dump where the system keeps them).
pub(crate) fn die(c: Crash) -> ! {
    unsafe {
        default_action(c.signal);
        libc::raise(c.signal);
        // Only if the signal was blocked on this thread.
        libc::_exit(128 + c.signal);
    }
}

unsafe fn default_action(sig: libc::c_int) {
    let mut action: libc::sigaction = std::mem::zeroed();
    action.sa_sigaction = libc::SIG_DFL;
    libc::sigemptyset(&mut action.sa_mask);
    libc::sigaction(sig, &action, std::ptr::null_mut());
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only what is async-signal-safe below: atomics, getpid, gettid,
    // sigaction, raise and pause.
    let pid = unsafe { libc::getpid() };
    let tid = gettid();
    let which = match SERVING.iter().position(|s| s.load(Ordering::Acquire) == tid) {
        Some(t) => Some(t as u64 + 1),
        // The app's own thread: neither the main thread nor another of corral's.
        None if tid != pid
            && APP_THREADS_TAKEN.load(Ordering::Acquire)
            && !OWN.iter().any(|s| s.load(Ordering::Acquire) == tid) =>
        {
            Some(APP_THREAD)
        }
        None => None,
    };
    // The kernel's own fault (si_code > 0), or a signal this process sent
    // itself: abort(), or faulthandler passing the fault on once it wrote
    // the stacks. Not one another process sent.
    let raised_here = unsafe { (*info).si_code > 0 || (*info).si_pid() == pid };
    if let Some(which) = which.filter(|_| {
        pid == WORKER_PID.load(Ordering::Relaxed) && raised_here && !CLAIMED.swap(true, Ordering::AcqRel)
    }) {
        if let Some(check) = HOLDS_LOCK.get() {
            HELD_LOCK.store(check(), Ordering::Release);
        }
        CRASH.store(((sig as u64) << 32) | which, Ordering::Release);
        // The main thread takes it from here, and ends the process.
        loop {
            unsafe { libc::pause() };
        }
    }
    unsafe {
        default_action(sig);
        // Pending until the handler returns (the signal is blocked while it
        // runs), then the default action ends the process; a fault would
        // also come back when the instruction runs again.
        libc::raise(sig);
    }
}

/// Where this worker's Python stacks go on a crash when its log is JSON: a
/// file the master made for it, which reads it into one log object once the
/// worker is gone (faulthandler writes plain lines, and a worker that
/// crashes cannot be trusted to write anything else). -1: none.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// A new, empty crash report file (in memory), for a worker about to be forked.
pub(crate) fn new_report() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::memfd_create(c"corral-crash-report".as_ptr(), libc::MFD_CLOEXEC) };
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// In the worker: its crash report file, kept open for its whole life.
pub(crate) fn set_report_fd(fd: std::os::fd::OwnedFd) {
    use std::os::fd::IntoRawFd;
    REPORT_FD.store(fd.into_raw_fd(), Ordering::Relaxed);
}

/// The file a worker's crash stacks go to instead of a JSON log, if any.
pub fn report_fd() -> Option<std::os::fd::RawFd> {
    let fd = REPORT_FD.load(Ordering::Relaxed);
    (fd >= 0).then_some(fd)
}

/// What a gone worker wrote to its crash report, if anything (at most 1 MiB).
pub(crate) fn read_report(fd: &std::os::fd::OwnedFd) -> Option<String> {
    use std::os::fd::AsRawFd;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 || st.st_size <= 0 {
        return None;
    }
    let mut buf = vec![0u8; (st.st_size as usize).min(1 << 20)];
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}
