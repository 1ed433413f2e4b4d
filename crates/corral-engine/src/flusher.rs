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
//! for in its current pass, and a timerfd armed when it first holds
//! something and disarmed when its pass ends. The flusher thread sleeps in
//! epoll on those timers, so in the common case, where a pass ends well
//! within HOLD, it never runs at all; the cost is two timerfd_settime
//! calls per pass. When a timer fires, the flusher writes what the
//! sockets take at once, never waiting on one: what a full socket cannot
//! take is retried a hold period later, the kernel meanwhile sending what
//! it has.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::exchange::Io;

/// The longest held response bytes wait before they are written.
pub const HOLD: Duration = Duration::from_millis(1);

/// One serving thread's held connections and their timer.
pub(crate) struct Holder {
    /// Non-zero, unique in the worker: what `Io::listed` holds while the
    /// connection is in this holder's list.
    id: usize,
    timer: OwnedFd,
    /// The timer runs; cleared by the flusher when it fires, and by the
    /// serving thread when its pass ends.
    armed: AtomicBool,
    /// When the timer was last armed by the serving thread.
    armed_at: Mutex<Option<Instant>>,
    /// Connections that held bytes in the current pass (each once).
    listed: Mutex<Vec<Arc<Mutex<Io>>>>,
}

impl Holder {
    fn new(id: usize) -> io::Result<Holder> {
        let fd =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Holder {
            id,
            timer: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: AtomicBool::new(false),
            armed_at: Mutex::new(None),
            listed: Mutex::new(Vec::new()),
        })
    }

    fn set_timer(&self, after: Option<Duration>) {
        let after = after.unwrap_or_default();
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: after.as_secs() as i64, tv_nsec: after.subsec_nanos() as i64 },
        };
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Whether the serving thread has held bytes for half of HOLD: it ends
    /// its pass then, so the timer is left for slow app calls.
    pub(crate) fn half_due(&self) -> bool {
        self.armed.load(Ordering::Acquire)
            && self
                .armed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() >= HOLD / 2)
    }

    /// The serving thread's pass is over and nothing it served holds bytes
    /// any more: forget the connections and stop the timer.
    pub(crate) fn pass_over(&self) {
        let listed = std::mem::take(&mut *self.listed.lock().unwrap_or_else(|p| p.into_inner()));
        for io in &listed {
            let mut io = io.lock().unwrap_or_else(|p| p.into_inner());
            // Another thread may have taken the connection up since.
            if io.listed == self.id {
                io.listed = 0;
            }
        }
        if self.armed.swap(false, Ordering::AcqRel) {
            self.set_timer(None);
        }
    }

    /// The timer fired: write what every listed connection holds.
    fn fire(&self) {
        let mut buf = [0u8; 8];
        unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        // Cleared first: bytes held from here on arm the timer again.
        self.armed.store(false, Ordering::Release);
        // A copy, so no connection is locked under the list's lock (the
        // serving thread takes them the other way round).
        let listed = self.listed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut again = false;
        for io in listed {
            again |= match io.try_lock() {
                Ok(mut io) => io.flush_held_nowait(),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().flush_held_nowait(),
                // In use: by a write, which sends what is held first, or a
                // wait, which is only entered once nothing is held; either
                // way this thread must not wait for it (a slow client would
                // hold up every other connection), so look again later.
                Err(std::sync::TryLockError::WouldBlock) => true,
            };
        }
        if again && !self.armed.swap(true, Ordering::AcqRel) {
            self.set_timer(Some(HOLD));
        }
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
        if !holder.armed.swap(true, Ordering::AcqRel) {
            holder.set_timer(Some(HOLD));
            *holder.armed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        true
    })
}

/// Starts the flusher thread for `threads` serving threads and returns
/// their holders. Called in a worker, after the fork.
pub(crate) fn start(threads: usize) -> io::Result<Vec<Arc<Holder>>> {
    let holders: Vec<Arc<Holder>> =
        (1..=threads).map(|id| Holder::new(id).map(Arc::new)).collect::<io::Result<_>>()?;
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
    for (i, h) in holders.iter().enumerate() {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, h.timer.as_raw_fd(), &mut ev) } < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    let watched = holders.clone();
    std::thread::Builder::new().name("corral-flush".into()).spawn(move || {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; watched.len()];
        loop {
            let n =
                unsafe { libc::epoll_wait(epfd.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
            for ev in &events[..n.max(0) as usize] {
                watched[ev.u64 as usize].fire();
            }
        }
    })?;
    Ok(holders)
}
