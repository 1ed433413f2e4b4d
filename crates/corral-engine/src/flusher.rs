//! The guarantee behind holding response bytes back: whatever a serving
//! thread holds is written within [`HOLD`], by the flusher thread if the
//! serving thread is still busy (in a slow app call) by then.
//!
//! Each write to a socket costs the server the whole TCP path and, when the
//! client process sleeps, its wake-up (an inter-processor interrupt, dear
//! in a VM). Two things are therefore held back instead of written at once:
//! the finished responses of a pass over ready connections (see
//! `worker::Held`), and the blocks of a streamed body that follow each
//! other closely, gathered into one write (`Io::gather`). PEP 3333 allows
//! holding a block only if the server "will continue transmission even
//! while the application is producing its next block": this module is that
//! promise, so no held byte waits for a slow app call.
//!
//! Each serving thread has a [`Holder`]: the connections it holds bytes
//! for in its current pass, and since when (a plain atomic, no system
//! call). One timer, owned by the flusher thread, wakes it at the earliest
//! moment a pass still holding would have held for HOLD; it then writes
//! what that pass holds, never waiting on a socket (what a full socket
//! cannot take is retried a hold period later, the kernel meanwhile
//! sending what it has), and sets the timer for the next such moment. So
//! under load the flusher wakes at most once per HOLD whatever the request
//! rate, and when nothing is held the timer stays off; a serving thread
//! sets it only when it starts holding while the timer is off. Arming a
//! timer per pass instead (two timerfd_settime calls, each reprogramming
//! the CPU's timer, which in a VM traps to the hypervisor) cost about 3 us
//! per request behind nginx, a third of the whole.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::exchange::Io;

/// The longest held response bytes wait before they are written.
pub const HOLD: Duration = Duration::from_millis(1);

/// Nanoseconds on the monotonic clock since the first call; never 0.
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// The flusher's timer and whether it is set.
struct Clock {
    timer: OwnedFd,
    /// The timer is set, or the flusher is awake and will set it again if
    /// anything is held. Whoever turns this from false to true sets it.
    ticking: AtomicBool,
}

impl Clock {
    fn set(&self, after: Duration) {
        // A zero it_value would disarm the timer.
        let after = after.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: after.as_secs() as i64, tv_nsec: after.subsec_nanos() as i64 },
        };
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }
}

/// One serving thread's held connections.
pub(crate) struct Holder {
    /// Non-zero, unique in the worker: what `Io::listed` holds while the
    /// connection is in this holder's list.
    id: usize,
    /// When (`now_ns`) the current pass first held bytes; 0 when it holds
    /// none. Set by the serving thread, cleared when its pass ends.
    held_since: AtomicU64,
    /// Connections that held bytes in the current pass (each once).
    listed: Mutex<Vec<Arc<Mutex<Io>>>>,
    /// The flusher found nothing held in this pass any more and stopped
    /// timing it (a long pass, such as a slow stream, must not wake it every
    /// HOLD for nothing). Whoever turns this from true to false makes sure
    /// the timer runs: the serving thread when it holds bytes again.
    dormant: AtomicBool,
    clock: Arc<Clock>,
}

impl Holder {
    /// Whether the serving thread has held bytes for half of HOLD: it ends
    /// its pass then, so the flusher is left for slow app calls.
    pub(crate) fn half_due(&self) -> bool {
        let since = self.held_since.load(Ordering::Relaxed);
        since != 0 && now_ns().saturating_sub(since) >= HOLD.as_nanos() as u64 / 2
    }

    /// The serving thread's pass is over and nothing it served holds bytes
    /// any more: forget the connections.
    pub(crate) fn pass_over(&self) {
        if self.held_since.load(Ordering::Relaxed) == 0 {
            return;
        }
        let listed = std::mem::take(&mut *self.listed.lock().unwrap_or_else(|p| p.into_inner()));
        for io in &listed {
            let mut io = io.lock().unwrap_or_else(|p| p.into_inner());
            // Another thread may have taken the connection up since.
            if io.listed == self.id {
                io.listed = 0;
            }
        }
        self.held_since.store(0, Ordering::SeqCst);
        self.dormant.store(false, Ordering::SeqCst);
    }

    /// Held for HOLD: write what every listed connection holds. What cannot
    /// be written yet is looked at again a HOLD later (see `run`). Returns
    /// whether anything may still be held.
    fn fire(&self) -> bool {
        // A copy, so no connection is locked under the list's lock (the
        // serving thread takes them the other way round).
        let listed = self.listed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut left = false;
        for io in listed {
            match io.try_lock() {
                Ok(mut io) => {
                    io.flush_held_nowait();
                    left |= !io.out.is_empty();
                }
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    let mut io = p.into_inner();
                    io.flush_held_nowait();
                    left |= !io.out.is_empty();
                }
                // In use: by a write, which sends what is held first, or a
                // wait, which is only entered once nothing is held; either
                // way this thread must not wait for it (a slow client would
                // hold up every other connection), so look again later.
                Err(std::sync::TryLockError::WouldBlock) => left = true,
            }
        }
        left
    }
}

thread_local! {
    /// The holder of the serving thread running here, if any.
    static HOLDER: RefCell<Option<Arc<Holder>>> = const { RefCell::new(None) };
}

/// Makes this thread a serving thread with `holder`.
pub(crate) fn enter(holder: Arc<Holder>) {
    HOLDER.with(|h| *h.borrow_mut() = Some(holder));
}

/// Promises that `io`'s held bytes go out within HOLD. Called with `io`
/// locked (`io_listed` is its `listed`). False, and nothing may be held,
/// on a thread that is not a serving thread (an app writing from a thread
/// of its own).
pub(crate) fn promise(io: &Arc<Mutex<Io>>, io_listed: &mut usize) -> bool {
    HOLDER.with(|h| {
        let h = h.borrow();
        let Some(holder) = h.as_ref() else {
            return false;
        };
        if *io_listed != holder.id {
            holder.listed.lock().unwrap_or_else(|p| p.into_inner()).push(io.clone());
            *io_listed = holder.id;
        }
        let first = holder.held_since.load(Ordering::Relaxed) == 0;
        if first {
            // A new pass: a dormant mark the flusher left on the last one
            // (after it ended) does not apply.
            holder.dormant.store(false, Ordering::SeqCst);
            holder.held_since.store(now_ns(), Ordering::SeqCst);
        }
        // Holding again after the flusher stopped timing this pass.
        let woken =
            !first && holder.dormant.load(Ordering::Relaxed) && holder.dormant.swap(false, Ordering::SeqCst);
        if first || woken {
            // The flusher, about to stop its timer, looks at held_since and
            // `dormant` after clearing `ticking`; this looks at `ticking`
            // after setting them: one of the two sees the other.
            let clock = &holder.clock;
            if !clock.ticking.load(Ordering::SeqCst) && !clock.ticking.swap(true, Ordering::SeqCst) {
                clock.set(HOLD);
            }
        }
        true
    })
}

/// Starts the flusher thread for `threads` serving threads and returns
/// their holders. Called in a worker, after the fork.
pub(crate) fn start(threads: usize) -> io::Result<Vec<Arc<Holder>>> {
    // Blocking: the flusher sleeps in read(2) until the timer expires.
    let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let clock =
        Arc::new(Clock { timer: unsafe { OwnedFd::from_raw_fd(fd) }, ticking: AtomicBool::new(false) });
    let holders: Vec<Arc<Holder>> = (1..=threads)
        .map(|id| {
            Arc::new(Holder {
                id,
                held_since: AtomicU64::new(0),
                listed: Mutex::new(Vec::new()),
                dormant: AtomicBool::new(false),
                clock: clock.clone(),
            })
        })
        .collect();
    let watched = holders.clone();
    std::thread::Builder::new().name("corral-flush".into()).spawn(move || {
        crate::crash::enter_own();
        crate::worker::or_exit(|| run(&clock, &watched))
    })?;
    Ok(holders)
}

/// The flusher thread: sleeps until the timer expires, writes what was held
/// for HOLD, and sets the timer for the next pass that will have, or lets
/// it rest when nothing is held.
fn run(clock: &Clock, holders: &[Arc<Holder>]) {
    let hold = HOLD.as_nanos() as u64;
    loop {
        let mut expirations = [0u8; 8];
        let n = unsafe { libc::read(clock.timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
        if n < 0 {
            // EINTR; nothing else can fail on a valid timerfd.
            continue;
        }
        let now = now_ns();
        let mut next: Option<u64> = None;
        for h in holders {
            let since = h.held_since.load(Ordering::SeqCst);
            if since == 0 || h.dormant.load(Ordering::SeqCst) {
                continue;
            }
            let due = if now >= since + hold {
                // Dormant from before the look: bytes the thread holds from
                // here on either are written by this fire, or find it set
                // and wake the timer themselves, or clear it (seen below).
                h.dormant.store(true, Ordering::SeqCst);
                let left = h.fire();
                if !left && h.dormant.load(Ordering::SeqCst) {
                    continue;
                }
                h.dormant.store(false, Ordering::SeqCst);
                // Whatever is left (a full socket, or bytes the thread held
                // again meanwhile) is looked at a HOLD later.
                now + hold
            } else {
                since + hold
            };
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        if let Some(at) = next {
            clock.set(Duration::from_nanos(at - now));
            continue;
        }
        clock.ticking.store(false, Ordering::SeqCst);
        // A thread that began holding after the loop above but saw
        // `ticking` still set relies on this look.
        if holders
            .iter()
            .any(|h| h.held_since.load(Ordering::SeqCst) != 0 && !h.dormant.load(Ordering::SeqCst))
            && !clock.ticking.swap(true, Ordering::SeqCst)
        {
            clock.set(HOLD);
        }
    }
}
