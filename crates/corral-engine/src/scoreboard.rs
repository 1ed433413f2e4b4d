//! A table in shared memory where each worker thread says what it is doing.
//!
//! The master maps it before forking, so every worker writes to the same
//! pages. Workers write only their own slots, with plain atomic stores; the
//! master reads them to say what a dead worker was serving and whether a
//! worker finished booting.
//!
//! After a worker's threads come a few slots for the responses its offload
//! thread is sending: those requests hold no thread, but they are in flight
//! for their clients, and a worker that dies takes them down too.

use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Bytes of "METHOD /path" kept per thread.
const TEXT: usize = 112;

/// Text in the shared table, kept in atomic words: a thread writes it while
/// other threads and the master read it, so a reader may see parts of two
/// texts (each read checks the request it belongs to is still the same),
/// but never a torn word or undefined behaviour.
#[repr(C)]
struct SharedText<const WORDS: usize>([AtomicU64; WORDS]);

impl<const WORDS: usize> SharedText<WORDS> {
    const BYTES: usize = WORDS * 8;

    /// Stores the first [`Self::BYTES`] bytes of `text` at most; returns how many.
    fn store(&self, text: &[u8]) -> usize {
        let n = text.len().min(Self::BYTES);
        for (word, chunk) in self.0.iter().zip(text[..n].chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
        n
    }

    /// The first `n` bytes.
    fn load(&self, n: usize) -> Vec<u8> {
        let n = n.min(Self::BYTES);
        let mut out = Vec::with_capacity(n.next_multiple_of(8));
        for word in &self.0[..n.div_ceil(8)] {
            out.extend_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Offloaded responses shown by name per worker; more are only counted.
const DOWNLOADS: usize = 8;

/// `since_ms` of a download slot claimed but not yet written.
const CLAIMED: u64 = u64::MAX;

#[repr(C)]
struct ThreadSlot {
    /// Monotonic ms when the current request started; 0 when idle.
    since_ms: AtomicU64,
    len: AtomicU32,
    _pad: u32,
    text: SharedText<{ TEXT / 8 }>,
}

#[repr(C)]
struct WorkerHeader {
    pid: AtomicI32,
    state: AtomicU32,
    requests: AtomicU64,
    /// Why the worker asks to be replaced ([`Retire`] as u32); 0 = it does not.
    retire: AtomicU32,
    error_len: AtomicU32,
    /// Responses the offload thread is sending now.
    offloaded: AtomicU32,
    /// Connections the worker holds (its registry's count).
    conns: AtomicU32,
    /// 1 once the master serves on through --shutdown-delay after a stop
    /// signal: a worker that got the same signal serves on with it.
    announcing: AtomicU32,
    /// 1 while the worker answers every request with the error its app's
    /// import raised (--reload): ready, but serving no code that loaded.
    load_error: AtomicU32,
    /// New connections parked for their first request, which (for a moment
    /// after the accept) a thread of the worker is counted on to serve.
    promised: AtomicU32,
    /// Monotonic ms of the worker's main loop's last round (see
    /// [`Scoreboard::beat`]); 0 before its first.
    beat_ms: AtomicU64,
    /// Counters for the metrics, indexed by the `C_*` constants.
    counters: [AtomicU64; COUNTERS],
    /// The last exception the app raised, as text (truncated).
    error: SharedText<{ ERROR_TEXT / 8 }>,
}

/// Bytes of the last exception's text kept per worker.
const ERROR_TEXT: usize = 240;

const _: () = assert!(TEXT % 8 == 0 && ERROR_TEXT % 8 == 0, "texts are kept in whole words");

/// Upper bounds (seconds) of the request-duration histogram buckets; the
/// last bucket is everything above.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Protocols counted apart, in [`crate::listen::Protocol`] order.
pub const PROTOCOLS: [&str; 4] = ["http", "uwsgi", "fastcgi", "scgi"];
/// Requests by protocol and status class (1xx..5xx): PROTOCOLS x 5.
pub const C_REQUESTS: usize = 0;
/// Duration histogram: LATENCY_BUCKETS + 1 counts (not cumulative).
pub const C_LATENCY: usize = C_REQUESTS + PROTOCOLS.len() * 5;
pub const C_LATENCY_SUM_US: usize = C_LATENCY + LATENCY_BUCKETS.len() + 1;
pub const C_BYTES_IN: usize = C_LATENCY_SUM_US + 1;
pub const C_BYTES_OUT: usize = C_BYTES_IN + 1;
pub const C_TIMEOUTS: usize = C_BYTES_OUT + 1;
pub const C_SHED: usize = C_TIMEOUTS + 1;
/// Log lines a worker dropped for a stalled reader and could not say it
/// had, by the time it exited: the master says so for it.
pub const C_LOG_DROPPED: usize = C_SHED + 1;
pub const COUNTERS: usize = C_LOG_DROPPED + 1;

/// Why a worker asks the master to replace it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Retire {
    MaxRequests = 1,
    Lifetime = 2,
    Rss = 3,
    Timeout = 4,
    Crash = 5,
    /// A listening socket of the worker was closed under it (by the app).
    Broken = 6,
}

impl Retire {
    /// The reason as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Retire::MaxRequests => "max_requests",
            Retire::Lifetime => "lifetime",
            Retire::Rss => "rss",
            Retire::Timeout => "timeout",
            Retire::Crash => "crash",
            Retire::Broken => "broken",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Retire::MaxRequests => "it reached --max-requests",
            Retire::Lifetime => "it reached --max-worker-lifetime",
            Retire::Rss => "its memory passed --reload-on-rss",
            Retire::Timeout => "a request ran past --timeout",
            Retire::Crash => "one of its threads crashed",
            Retire::Broken => "the app closed its listening socket",
        }
    }
}

/// Lifecycle of a worker as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    Booting = 0,
    Ready = 1,
    Draining = 2,
}

/// A request in flight, as the master reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// "GET /path".
    pub what: String,
    pub age_ms: u64,
    /// Its response is being sent by the offload thread, not a serving thread.
    pub offloaded: bool,
}

/// The shared table; cheap to copy into each worker (a pointer and sizes).
#[derive(Clone, Copy)]
pub struct Scoreboard {
    base: NonNull<u8>,
    slots: usize,
    threads: usize,
    /// A datagram socket pair: a worker that becomes ready or asks to be
    /// replaced sends a byte on the second, which wakes the master polling
    /// the first, rather than leave the change to its next look (up to
    /// 100 ms later, twice per replacement, while the old worker serves on).
    nudge: [RawFd; 2],
}

// SAFETY: the mapping lives as long as the process (it is never unmapped),
// and every field in it is an atomic (or padding nobody writes), so any
// thread of any process may read and write it through shared references.
unsafe impl Send for Scoreboard {}
// SAFETY: as for Send.
unsafe impl Sync for Scoreboard {}

impl Scoreboard {
    /// Maps a table for `slots` workers of `threads` threads each. Call in the
    /// master before the first fork.
    pub fn new(slots: usize, threads: usize) -> std::io::Result<Scoreboard> {
        let size = Self::slot_size(threads) * slots.max(1);
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut nudge = [-1; 2];
        let kind = libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, nudge.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Scoreboard { base: NonNull::new(p.cast()).expect("mmap returned null"), slots, threads, nudge })
    }

    fn slot_size(threads: usize) -> usize {
        std::mem::size_of::<WorkerHeader>() + (threads + DOWNLOADS) * std::mem::size_of::<ThreadSlot>()
    }

    fn header(&self, slot: usize) -> &WorkerHeader {
        assert!(slot < self.slots);
        unsafe { &*(self.base.as_ptr().add(slot * Self::slot_size(self.threads)) as *const WorkerHeader) }
    }

    /// Thread `t`'s slot; `t` from `threads` on are the download slots.
    fn thread(&self, slot: usize, t: usize) -> &ThreadSlot {
        assert!(slot < self.slots && t < self.threads + DOWNLOADS);
        let off = slot * Self::slot_size(self.threads)
            + std::mem::size_of::<WorkerHeader>()
            + t * std::mem::size_of::<ThreadSlot>();
        unsafe { &*(self.base.as_ptr().add(off) as *const ThreadSlot) }
    }

    /// Resets a slot for a new worker process.
    pub fn reset(&self, slot: usize, pid: i32) {
        let h = self.header(slot);
        h.pid.store(pid, Ordering::Relaxed);
        h.requests.store(0, Ordering::Relaxed);
        h.retire.store(0, Ordering::Relaxed);
        h.error_len.store(0, Ordering::Relaxed);
        h.offloaded.store(0, Ordering::Relaxed);
        h.conns.store(0, Ordering::Relaxed);
        h.announcing.store(0, Ordering::Relaxed);
        h.load_error.store(0, Ordering::Relaxed);
        h.promised.store(0, Ordering::Relaxed);
        h.beat_ms.store(0, Ordering::Relaxed);
        for c in &h.counters {
            c.store(0, Ordering::Relaxed);
        }
        h.state.store(WorkerState::Booting as u32, Ordering::Release);
        for t in 0..self.threads + DOWNLOADS {
            self.thread(slot, t).since_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn set_state(&self, slot: usize, s: WorkerState) {
        self.header(slot).state.store(s as u32, Ordering::Release);
        if s == WorkerState::Ready {
            self.nudge();
        }
    }

    /// Marks the master's --shutdown-delay for the worker in `slot`.
    pub fn set_announcing(&self, slot: usize) {
        self.header(slot).announcing.store(1, Ordering::Release);
    }

    /// Whether the master serves on through --shutdown-delay.
    pub fn announcing(&self, slot: usize) -> bool {
        self.header(slot).announcing.load(Ordering::Acquire) != 0
    }

    /// The descriptor the master polls: readable after a worker became
    /// ready or asked to be replaced (see [`Scoreboard::take_nudges`]).
    pub fn nudge_fd(&self) -> RawFd {
        self.nudge[0]
    }

    /// Empties the nudge socket once its readiness was seen.
    pub fn take_nudges(&self) {
        let mut buf = [0u8; 64];
        while unsafe { libc::recv(self.nudge[0], buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) } > 0
        {
        }
    }

    fn nudge(&self) {
        // A full socket already holds a nudge the master has yet to see;
        // after the master is gone or re-executed (the pair is close-on-exec)
        // the nudges queue unread in the workers' copies, which is harmless.
        unsafe {
            libc::send(self.nudge[1], b"!".as_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
    }

    /// Says the worker in `slot` is alive and its main loop runs, at
    /// `now_ms` (monotonic): a worker that stops saying it (stopped with
    /// SIGSTOP, a frozen cgroup, a debugger holding it) cannot end a request
    /// past --timeout itself, and the master ends it.
    pub fn beat(&self, slot: usize, now_ms: u64) {
        self.header(slot).beat_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the worker in `slot` last said it was alive (see [`Self::beat`]); 0 if never.
    pub fn last_beat(&self, slot: usize) -> u64 {
        self.header(slot).beat_ms.load(Ordering::Relaxed)
    }

    pub fn state(&self, slot: usize) -> WorkerState {
        match self.header(slot).state.load(Ordering::Acquire) {
            1 => WorkerState::Ready,
            2 => WorkerState::Draining,
            _ => WorkerState::Booting,
        }
    }

    /// Asks the master to replace this worker (the first reason sticks).
    pub fn request_retire(&self, slot: usize, why: Retire) {
        if self
            .header(slot)
            .retire
            .compare_exchange(0, why as u32, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.nudge();
        }
    }

    pub fn retire(&self, slot: usize) -> Option<Retire> {
        match self.header(slot).retire.load(Ordering::Acquire) {
            1 => Some(Retire::MaxRequests),
            2 => Some(Retire::Lifetime),
            3 => Some(Retire::Rss),
            4 => Some(Retire::Timeout),
            5 => Some(Retire::Crash),
            6 => Some(Retire::Broken),
            _ => None,
        }
    }

    pub fn requests(&self, slot: usize) -> u64 {
        self.header(slot).requests.load(Ordering::Relaxed)
    }

    /// Records the request a thread starts serving.
    pub fn begin(&self, slot: usize, t: usize, method: &[u8], path: &[u8], now_ms: u64) {
        self.write_slot(self.thread(slot, t), method, path, now_ms);
    }

    fn write_slot(&self, s: &ThreadSlot, method: &[u8], path: &[u8], now_ms: u64) {
        let mut text = [0u8; TEXT];
        let m = method.len().min(TEXT);
        text[..m].copy_from_slice(&method[..m]);
        let mut len = m;
        if len < TEXT {
            text[len] = b' ';
            len += 1;
            let p = path.len().min(TEXT - len);
            text[len..len + p].copy_from_slice(&path[..p]);
            len += p;
        }
        s.text.store(&text[..len]);
        s.len.store(len as u32, Ordering::Relaxed);
        s.since_ms.store(now_ms.max(1), Ordering::Release);
    }

    pub fn end(&self, slot: usize, t: usize) {
        self.thread(slot, t).since_ms.store(0, Ordering::Release);
        self.header(slot).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request answered without a thread's turn at it (refused as
    /// it was read), so that the workers' counts add up to the total.
    pub fn count_refused(&self, slot: usize) {
        self.header(slot).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a response the offload thread starts sending, for the request
    /// that began at `since_ms`. Returns the download slot naming it, if one
    /// was free (several serving threads may offload at once, so slots are
    /// claimed with a compare-and-swap).
    pub fn begin_download(&self, slot: usize, method: &[u8], path: &[u8], since_ms: u64) -> Option<usize> {
        self.header(slot).offloaded.fetch_add(1, Ordering::AcqRel);
        let d = (self.threads..self.threads + DOWNLOADS).find(|&d| {
            let s = self.thread(slot, d);
            s.since_ms.compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        })?;
        self.write_slot(self.thread(slot, d), method, path, since_ms.min(CLAIMED - 1));
        Some(d)
    }

    /// The offloaded response [`Scoreboard::begin_download`] recorded ended.
    pub fn end_download(&self, slot: usize, download: Option<usize>) {
        if let Some(d) = download {
            self.thread(slot, d).since_ms.store(0, Ordering::Release);
        }
        let _ = self
            .header(slot)
            .offloaded
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// How many responses a worker's offload thread is sending.
    pub fn offloaded(&self, slot: usize) -> usize {
        self.header(slot).offloaded.load(Ordering::Acquire) as usize
    }

    /// What one thread (or download slot) is serving: ("GET /x", monotonic
    /// ms it started), if anything.
    pub fn thread_request(&self, slot: usize, t: usize) -> Option<(String, u64)> {
        let s = self.thread(slot, t);
        let mut tries = 0;
        loop {
            let since = s.since_ms.load(Ordering::Acquire);
            if since == 0 || since == CLAIMED {
                return None;
            }
            let len = s.len.load(Ordering::Relaxed) as usize;
            let text = s.text.load(len);
            // The thread may have moved on to another request while the text
            // was read: read again, a few times at most (a thread serving
            // requests that short is not one anybody waits on).
            std::sync::atomic::fence(Ordering::Acquire);
            tries += 1;
            if s.since_ms.load(Ordering::Relaxed) == since || tries == 4 {
                return Some((crate::app::log_escape(&text), since));
            }
        }
    }

    /// Adds to one of a worker's metric counters.
    pub fn count(&self, slot: usize, counter: usize, n: u64) {
        self.header(slot).counters[counter].fetch_add(n, Ordering::Relaxed);
    }

    /// A worker's metric counters.
    pub fn counters(&self, slot: usize) -> [u64; COUNTERS] {
        let h = self.header(slot);
        std::array::from_fn(|i| h.counters[i].load(Ordering::Relaxed))
    }

    /// Records one finished request in a worker's counters.
    pub fn record(
        &self,
        slot: usize,
        protocol: usize,
        status: u16,
        micros: u64,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        // A request that ended before any response (the client went away,
        // a worker stopping) has no status class to count under.
        if status >= 100 {
            let class = usize::from(status / 100).clamp(1, 5) - 1;
            self.count(slot, C_REQUESTS + protocol * 5 + class, 1);
        }
        let secs = micros as f64 / 1e6;
        let bucket = LATENCY_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.count(slot, C_LATENCY + bucket, 1);
        self.count(slot, C_LATENCY_SUM_US, micros);
        self.count(slot, C_BYTES_IN, bytes_in);
        self.count(slot, C_BYTES_OUT, bytes_out);
    }

    /// Keeps the text of the last exception the app raised in this worker.
    pub fn set_error(&self, slot: usize, text: &str) {
        let h = self.header(slot);
        let mut n = text.len().min(ERROR_TEXT);
        while n > 0 && !text.is_char_boundary(n) {
            n -= 1;
        }
        h.error.store(&text.as_bytes()[..n]);
        h.error_len.store(n as u32, Ordering::Release);
    }

    pub fn error(&self, slot: usize) -> Option<String> {
        let h = self.header(slot);
        let n = (h.error_len.load(Ordering::Acquire) as usize).min(ERROR_TEXT);
        (n > 0).then(|| String::from_utf8_lossy(&h.error.load(n)).into_owned())
    }

    /// How many workers the table has room for.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Whether a worker other than the one in `slot` is up and serving.
    /// Counts a new connection of the worker in `slot` parked for its first
    /// request (`true`), or one that no longer is (`false`).
    pub fn promise(&self, slot: usize, on: bool) {
        let p = &self.header(slot).promised;
        if on {
            p.fetch_add(1, Ordering::Relaxed);
        } else {
            // Never below zero, should a count be missed.
            let _ = p.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// New connections of the worker in `slot` waiting for their first request.
    pub fn promised(&self, slot: usize) -> usize {
        self.header(slot).promised.load(Ordering::Relaxed) as usize
    }

    /// Threads of the worker in `slot` neither serving a request nor counted
    /// on by a new connection waiting for its first.
    pub fn free_threads(&self, slot: usize) -> usize {
        self.threads.saturating_sub(self.busy_threads(slot) + self.promised(slot))
    }

    /// Marks the worker in `slot` as serving its app's import error.
    pub fn set_load_error(&self, slot: usize) {
        self.header(slot).load_error.store(1, Ordering::Release);
    }

    /// Whether a worker other than `slot` is ready and serves code that
    /// loaded (not the error of one that did not).
    pub fn other_serves_loaded_code(&self, slot: usize) -> bool {
        (0..self.slots).any(|s| {
            s != slot
                && self.pid(s) != 0
                && self.state(s) == WorkerState::Ready
                && self.header(s).load_error.load(Ordering::Acquire) == 0
        })
    }

    /// How many workers are ready (a reload's outgoing ones among them).
    pub fn ready_workers(&self) -> usize {
        (0..self.slots).filter(|&s| self.pid(s) != 0 && self.state(s) == WorkerState::Ready).count()
    }

    pub fn other_ready(&self, slot: usize) -> bool {
        (0..self.slots).any(|s| s != slot && self.pid(s) != 0 && self.state(s) == WorkerState::Ready)
    }

    pub fn pid(&self, slot: usize) -> i32 {
        self.header(slot).pid.load(Ordering::Relaxed)
    }

    pub fn set_conns(&self, slot: usize, n: usize) {
        self.header(slot).conns.store(n.min(u32::MAX as usize) as u32, Ordering::Relaxed);
    }

    /// How many connections a worker holds.
    pub fn conns(&self, slot: usize) -> usize {
        self.header(slot).conns.load(Ordering::Relaxed) as usize
    }

    /// Serving threads per worker.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How many of a worker's threads are serving a request now.
    pub fn busy_threads(&self, slot: usize) -> usize {
        (0..self.threads).filter(|&t| self.thread(slot, t).since_ms.load(Ordering::Relaxed) != 0).count()
    }

    /// What a worker is serving: its threads' requests, then the responses
    /// its offload thread is sending (those with a free slot to name them).
    pub fn in_flight(&self, slot: usize, now_ms: u64) -> Vec<InFlight> {
        (0..self.threads + DOWNLOADS)
            .filter_map(|t| {
                self.thread_request(slot, t).map(|(what, since)| InFlight {
                    what,
                    age_ms: now_ms.saturating_sub(since),
                    offloaded: t >= self.threads,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_end_in_flight() {
        let sb = Scoreboard::new(2, 3).unwrap();
        sb.reset(1, 42);
        assert_eq!(sb.state(1), WorkerState::Booting);
        sb.set_state(1, WorkerState::Ready);
        sb.begin(1, 2, b"GET", b"/slow", 1000);
        let slow = InFlight { what: "GET /slow".into(), age_ms: 500, offloaded: false };
        assert_eq!(sb.in_flight(1, 1500), vec![slow]);
        sb.end(1, 2);
        assert!(sb.in_flight(1, 1600).is_empty());
        assert_eq!(sb.requests(1), 1);
        assert_eq!(sb.retire(1), None);
        sb.record(1, 2, 404, 3000, 10, 20);
        let c = sb.counters(1);
        assert_eq!(c[C_REQUESTS + 2 * 5 + 3], 1);
        assert_eq!(c[C_LATENCY + 2], 1); // 3 ms: the <= 5 ms bucket
        assert_eq!((c[C_BYTES_IN], c[C_BYTES_OUT]), (10, 20));
        sb.set_error(1, "ValueError: bad");
        assert_eq!(sb.error(1).as_deref(), Some("ValueError: bad"));
        sb.request_retire(1, Retire::Rss);
        sb.request_retire(1, Retire::Timeout);
        assert_eq!(sb.retire(1), Some(Retire::Rss));
        sb.reset(1, 43);
        assert_eq!(sb.retire(1), None);
        sb.record(1, 2, 404, 3000, 10, 20);
        let c = sb.counters(1);
        assert_eq!(c[C_REQUESTS + 2 * 5 + 3], 1);
        assert_eq!(c[C_LATENCY + 2], 1); // 3 ms: the <= 5 ms bucket
        assert_eq!((c[C_BYTES_IN], c[C_BYTES_OUT]), (10, 20));
        sb.set_error(1, "ValueError: bad");
        assert_eq!(sb.error(1).as_deref(), Some("ValueError: bad"));
        // No response, no status class.
        sb.record(1, 2, 0, 3000, 10, 0);
        let c = sb.counters(1);
        assert_eq!((0..5).map(|k| c[C_REQUESTS + 2 * 5 + k]).sum::<u64>(), 1);
        let long = vec![b'a'; 500];
        sb.begin(0, 0, b"POST", &long, 5);
        assert_eq!(sb.in_flight(0, 5)[0].what.len(), TEXT);
    }

    #[test]
    fn shared_text_keeps_any_length_up_to_its_words() {
        let t = SharedText::<3>(Default::default());
        for n in [0, 1, 7, 8, 9, 23, 24] {
            let text: Vec<u8> = (0..n as u8).collect();
            assert_eq!(t.store(&text), n);
            assert_eq!(t.load(n), text);
        }
        assert_eq!(t.store(&[b'x'; 30]), 24);
        assert_eq!(t.load(99), vec![b'x'; 24]);
        // A shorter text after a longer one: only its own bytes are read.
        t.store(b"abc");
        assert_eq!(t.load(3), b"abc");
        let sb = Scoreboard::new(1, 1).unwrap();
        sb.reset(0, 1);
        let error = "é".repeat(ERROR_TEXT); // two bytes each: cut at a character boundary
        sb.set_error(0, &error);
        assert_eq!(sb.error(0).unwrap(), "é".repeat(ERROR_TEXT / 2));
    }

    #[test]
    fn downloads_are_named_while_slots_last_and_always_counted() {
        let sb = Scoreboard::new(2, 1).unwrap();
        sb.reset(0, 7);
        sb.reset(1, 8);
        sb.begin(1, 0, b"GET", b"/page", 900);
        let first = sb.begin_download(1, b"GET", b"/big.iso", 1000);
        assert_eq!(first, Some(1));
        let listed = sb.in_flight(1, 1500);
        assert_eq!(
            listed,
            vec![
                InFlight { what: "GET /page".into(), age_ms: 600, offloaded: false },
                InFlight { what: "GET /big.iso".into(), age_ms: 500, offloaded: true },
            ]
        );
        let more: Vec<_> = (0..DOWNLOADS).map(|_| sb.begin_download(1, b"GET", b"/x", 1200)).collect();
        assert!(more[..DOWNLOADS - 1].iter().all(Option::is_some));
        assert_eq!(more[DOWNLOADS - 1], None, "every slot taken: counted only");
        assert_eq!(sb.offloaded(1), DOWNLOADS + 1);
        assert_eq!(sb.in_flight(1, 1500).len(), 1 + DOWNLOADS);
        sb.end_download(1, first);
        sb.end_download(1, None);
        assert_eq!(sb.offloaded(1), DOWNLOADS - 1);
        assert!(!sb.in_flight(1, 1500).iter().any(|r| r.what == "GET /big.iso"));
        // The neighbouring worker's slots are untouched, and a fresh worker starts empty.
        assert!(sb.in_flight(0, 1500).is_empty());
        assert_eq!(sb.offloaded(0), 0);
        sb.reset(1, 9);
        assert_eq!(sb.offloaded(1), 0);
        assert!(sb.in_flight(1, 1500).is_empty());
        // More ends than begins never wraps the count.
        sb.end_download(1, None);
        assert_eq!(sb.offloaded(1), 0);
    }
}
