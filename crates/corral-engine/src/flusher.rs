//! The guarantee behind coalescing a streamed body: blocks an app yields in
//! quick succession are gathered into one write, and this thread writes
//! whatever is still gathered when the app goes quiet.
//!
//! PEP 3333 lets a server hold a block back only if it "will continue
//! transmission even while the application is producing its next block".
//! Writing each small block with a system call of its own costs the server
//! the whole TCP path and a wake-up of the client per block (most of the
//! time of a 64 x 1 KiB stream), so a connection's thread gathers blocks
//! that follow each other within a short burst interval and
//! registers the connection here; at most [`STREAM_HOLD`] later, if the
//! response has not ended (and written them) by then, this thread writes
//! them. It never waits on a socket: what the socket cannot take at once
//! is retried a hold period later, the kernel meanwhile still sending
//! what it has.
//!
//! Deadlines are "registration time + STREAM_HOLD", so the queue is
//! ordered by construction; one thread serves every connection of the
//! worker, and a registration wakes it only when it is asleep with nothing
//! to do, which is at most once per hold period under load.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::exchange::Io;

/// The longest a gathered block of a streamed body waits before it is
/// written, when the app produces no further block meanwhile.
pub const STREAM_HOLD: Duration = Duration::from_millis(1);

struct Queue {
    due: VecDeque<(Instant, Arc<Mutex<Io>>)>,
    /// The thread waits without a deadline: a registration must wake it.
    idle: bool,
}

pub(crate) struct Flusher {
    queue: Mutex<Queue>,
    wake: Condvar,
}

static FLUSHER: OnceLock<Option<&'static Flusher>> = OnceLock::new();

/// The flusher, started on first use so that only a process serving
/// streamed responses (a worker, never the master, which forks) has this
/// thread. `None` if the thread could not be started: nothing may be
/// gathered then.
pub(crate) fn get() -> Option<&'static Flusher> {
    *FLUSHER.get_or_init(|| {
        let f: &'static Flusher = Box::leak(Box::new(Flusher {
            queue: Mutex::new(Queue { due: VecDeque::new(), idle: false }),
            wake: Condvar::new(),
        }));
        match std::thread::Builder::new().name("corral-flush".into()).spawn(move || run(f)) {
            Ok(_) => Some(f),
            Err(e) => {
                tracing::error!(
                    "cannot start the stream flusher thread, streamed blocks are written one by one: {e}"
                );
                None
            }
        }
    })
}

impl Flusher {
    /// Asks for `io`'s gathered bytes to be written by `deadline` if the
    /// connection's own thread has not written them by then.
    pub(crate) fn register(&self, io: &Arc<Mutex<Io>>, deadline: Instant) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.due.push_back((deadline, io.clone()));
        if q.idle {
            q.idle = false;
            self.wake.notify_one();
        }
    }
}

fn run(f: &'static Flusher) {
    let mut q = f.queue.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let Some(&(deadline, _)) = q.due.front() else {
            q.idle = true;
            q = f.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let now = Instant::now();
        if deadline > now {
            q = f.wake.wait_timeout(q, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            continue;
        }
        let (_, io) = q.due.pop_front().expect("front exists");
        drop(q);
        let again = io.lock().unwrap_or_else(|p| p.into_inner()).flush_gathered();
        q = f.queue.lock().unwrap_or_else(|p| p.into_inner());
        if again {
            q.due.push_back((Instant::now() + STREAM_HOLD, io));
        }
    }
}
