//! Taking new connections: batches that leave a burst to sibling workers,
//! shedding past the connection limit, pausing when file descriptors run out.

use super::*;

pub(super) fn accept_batch<A: App>(
    w: &Shared<A>,
    state: &mut A::Thread,
    t: usize,
    idx: usize,
    held: &mut Held,
) {
    if LISTENER_GONE.load(Ordering::Relaxed) {
        // Its registration outlives the descriptor (other processes hold
        // the socket) and reports it ready for good: waking for it at full
        // speed until the replacement is ready would burn a core.
        std::thread::sleep(Duration::from_millis(5));
        return;
    }
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
        if i > 0 && (leave_to_siblings(w, t) || !queued(w.listeners[idx].0)) {
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

/// How long after its accept a new connection parked for its first request
/// counts on a thread of its worker: a client that connects and then sends
/// (a few milliseconds later on a real network) is about to be served. One
/// still silent after this (a browser's speculative preconnect) is not
/// waited for.
pub(super) const PROMISE_MS: u64 = 200;

/// Counts `conn`, new and parked for its first request, on one of this
/// worker's threads (see [`hand_on_if_spoken_for`]); undone by
/// [`unpromise`] when its request begins, it closes, or [`PROMISE_MS`] pass.
pub(super) fn promise<A: App>(w: &Shared<A>, entry: &Entry, accepted_at: u64) {
    entry.promised_at.store(accepted_at, Ordering::Relaxed);
    if !entry.promising.swap(true, Ordering::Relaxed) {
        w.scoreboard.promise(w.slot, true);
    }
}

pub(super) fn unpromise<A: App>(w: &Shared<A>, entry: &Entry) {
    if entry.promising.load(Ordering::Relaxed) && entry.promising.swap(false, Ordering::Relaxed) {
        w.scoreboard.promise(w.slot, false);
    }
}

/// A new connection just accepted, while every thread of this worker not
/// serving a request is counted on by one accepted before, whose request is
/// still to come: it goes to a sibling with a thread free, if one has. epoll
/// wakes the same worker for most new connections, so without this a
/// one-thread worker that took a client who connects and then sends took
/// the next few as well, and served them in turn while its siblings sat
/// idle. True when it went.
fn hand_on_if_spoken_for<A: App>(w: &Shared<A>, t: usize, fd: RawFd, idx: usize) -> bool {
    let promised = w.scoreboard.promised(w.slot);
    if promised == 0 || w.inbox.is_none() {
        return false;
    }
    // This thread is free (it is accepting), and so are the others not in a pass.
    let free = 1 + (0..w.in_pass.len()).filter(|&o| o != t && !w.in_pass[o].load(Ordering::Relaxed)).count();
    if free > promised {
        return false;
    }
    let Some(to) = crate::handover::target_with_free_thread(&w.scoreboard, w.slot, w.config.max_connections)
    else {
        return false;
    };
    send_new(w, to, fd, idx).is_ok()
}

/// Hands the connection just accepted from listener `idx`, its first request
/// unread, to the worker `to`; closes this process's copy once it went.
fn send_new<A: App>(w: &Shared<A>, to: libc::pid_t, fd: RawFd, idx: usize) -> io::Result<()> {
    let note = crate::handover::Note {
        listener: idx as u16,
        protocol: w.listeners[idx].1.protocol as u8,
        client: None,
        fresh: true,
    };
    crate::handover::send(w.master, to, fd, note, b"")?;
    unsafe { libc::close(fd) };
    Ok(())
}

/// Whether the connections still in the accept queue are better left
/// there for the other workers: every other thread of this one is busy, so
/// one taken here would wait behind this thread's requests while another
/// worker may be free (one-thread workers served a burst of slow requests
/// in turn while their siblings sat idle, and a connection accepted before
/// its request came waited for a whole batch). This thread takes one per
/// wake-up then, as gunicorn's sync worker does; alone in a pool that cannot
/// grow, or with a thread free to take them, it takes a batch. Alone in an
/// adaptive pool below `--workers-max` it leaves them too: the workers the
/// pool grows by take connections from the queue, and none from this one
/// (one worker of four held 74 of a burst of 100 slow requests, and served
/// them in turn while the three others sat idle).
pub(super) fn leave_to_siblings<A: App>(w: &Shared<A>, t: usize) -> bool {
    let own_free = (0..w.in_pass.len()).any(|o| o != t && !w.in_pass[o].load(Ordering::Relaxed));
    if own_free {
        return false;
    }
    // The clock now, not the batch's start: a batch serves its requests as
    // it goes, for as long as they take, and a sibling may have come up since.
    ready_sibling(w, mono_ms())
}

/// Sets TCP_NODELAY on a TCP socket; whether that worked.
pub(super) fn set_nodelay(fd: RawFd) -> bool {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        ) == 0
    }
}

/// Whether a connection waits in the listener's accept queue. Asked before
/// each accept after a batch's first: Linux makes the new socket and its
/// file before it looks at the queue, so an accept that finds nothing costs
/// as much as one that finds a connection (2.7 us on a test machine,
/// against 0.4 us for this poll), and behind a front end that opens a
/// connection per request (uwsgi, SCGI) most looks find nothing.
pub(super) fn queued(listener: RawFd) -> bool {
    let mut p = libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 };
    // An error (the listener let go by a drain meanwhile) reads as nothing queued.
    unsafe { libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLIN != 0 }
}

/// How long what [`ready_sibling`] found stands.
const SIBLINGS_FRESH_MS: u64 = 100;

/// Whether another worker of the pool is up and serving, or may be soon:
/// the adaptive pool has room to grow. Workers come and go seldom (forks,
/// reloads, recycling) while every connection after the first of a batch
/// asks, and the scoreboard has room for dozens of workers: it is looked at
/// once per [`SIBLINGS_FRESH_MS`] at most (a scan per connection behind
/// nginx cost more than parsing its request).
fn ready_sibling<A: App>(w: &Shared<A>, now_ms: u64) -> bool {
    // (when + 1) << 1 | found; 0 is never looked.
    let seen = w.ready_sibling.load(Ordering::Relaxed);
    if seen != 0 && now_ms.saturating_sub((seen >> 1) - 1) < SIBLINGS_FRESH_MS {
        return seen & 1 == 1;
    }
    let found = w.scoreboard.other_ready(w.slot)
        || w.config.workers_max.is_some_and(|max| w.scoreboard.ready_workers() < max);
    w.ready_sibling.store((now_ms + 1) << 1 | u64::from(found), Ordering::Relaxed);
    found
}

pub(super) enum Accepted {
    Conn(Box<Conn>),
    /// Over `--max-connections`: answered 503 and closed.
    Shed,
    None,
}

/// Connections shed since the last log line about it (answered 503, and
/// FastCGI ones, only closed), and when that line was.
pub(super) static SHED: Mutex<(u64, u64, u64)> = Mutex::new((0, 0, 0));

/// Answers a connection over the limit with 503 and closes it; logs at most
/// once a second how many were turned away.
pub(super) fn shed<A: App>(w: &Shared<A>, fd: RawFd, idx: usize, client: &str) {
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    let mut io = Io::new(fd, 1000, 0);
    let reply = match w.listeners[idx].1.protocol {
        // FastCGI needs a request id to answer on; closing is its 503.
        Protocol::FastCgi => Vec::new(),
        Protocol::Scgi => error_reply(Wire::Scgi, 503, "server overloaded", false),
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
pub(super) fn report_shed<A: App>(w: &Shared<A>, now: u64) {
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
pub(super) fn pause_accepting<A: App>(w: &Shared<A>, e: &io::Error) {
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

/// Says what the last line about the descriptor shortage left out, once a
/// second has passed since it: the refusals and closes that came after it
/// would otherwise wait for the next shortage to be told, for good if none
/// comes.
pub(super) fn report_fd_shortage(now: u64) {
    let mut no_fds = NO_FDS.lock().unwrap_or_else(|p| p.into_inner());
    if (no_fds.0 == 0 && RECLAIMED_FOR_FDS.load(Ordering::Relaxed) == 0) || now < no_fds.1 + 1000 {
        return;
    }
    warn!(
        "Short of file descriptors: {} refused accept(s) and {} idle kept-alive connection(s) closed to make \
         room since the last report: pid={}",
        no_fds.0,
        RECLAIMED_FOR_FDS.swap(0, Ordering::Relaxed),
        std::process::id()
    );
    *no_fds = (0, now);
}

/// Idle kept-alive connections closed at each accept that failed for lack
/// of descriptors; each close frees one for a client waiting in the queue.
pub(super) const RECLAIM_ON_EMFILE: usize = 4;
/// Those closed since the last log line about the descriptor shortage.
pub(super) static RECLAIMED_FOR_FDS: AtomicU64 = AtomicU64::new(0);

/// Takes the listeners out of the epoll set for [`ACCEPT_PAUSE`]: the
/// kernel then wakes the other workers for new connections.
pub(super) fn pause_listeners<A: App>(w: &Shared<A>, now: u64) {
    let _pause = ACCEPT_PAUSE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Draining, the listeners have left the epoll set already, and their
    // numbers may be taken by other descriptors since.
    if ACCEPT_PAUSED_AT.load(Ordering::Acquire) == 0 && !draining() {
        for (idx, (fd, _)) in w.listeners.iter().enumerate() {
            if listener_kept(idx) {
                unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, *fd, std::ptr::null_mut()) };
            }
        }
        ACCEPT_PAUSED_AT.store(now.max(1), Ordering::Release);
    }
}

/// Gives the connection just accepted to a sibling that has room, as a new
/// one (its first request unread), and stops accepting for [`ACCEPT_PAUSE`]
/// so the next ones go to the siblings directly: at `--max-connections`
/// with nothing idle to close, or while the app cannot run here (`why`).
/// epoll wakes the same worker for most new connections, so without this
/// one full worker turned clients away with 503 while the others had room.
/// False when no sibling has room.
pub(super) fn pass_to_sibling<A: App>(w: &Shared<A>, fd: RawFd, idx: usize, why: &str) -> bool {
    if w.inbox.is_none() {
        return false;
    }
    let Some(to) = crate::handover::target_with_room(&w.scoreboard, w.slot, w.config.max_connections) else {
        return false;
    };
    match send_new(w, to, fd, idx) {
        Ok(()) => {
            pause_listeners(w, mono_ms());
            debug!("{why}: handed a new connection to worker pid {to}");
            true
        }
        Err(e) => {
            debug!("{why}: handing a new connection to worker pid {to}: {e}");
            false
        }
    }
}

/// When the last line about a stalled app was written (monotonic ms), and
/// connections passed on since.
static STALL_REPORT: Mutex<(u64, u64)> = Mutex::new((0, 0));

/// Says, at most every 10 s, that new connections go to the siblings while
/// the app is stalled here.
fn report_stall<A: App>(w: &Shared<A>) {
    let now = mono_ms();
    let mut report = STALL_REPORT.lock().unwrap_or_else(|p| p.into_inner());
    report.1 += 1;
    if report.0 == 0 || now >= report.0 + 10_000 {
        warn!(
            "Worker {}: a thread has waited over a second to run the app (another holds the \
             interpreter, in C code that does not release it); {} new connection(s) handed to other \
             workers: pid={}",
            w.slot,
            report.1,
            std::process::id()
        );
        *report = (now, 0);
    }
}

/// Puts the listeners back in the epoll set once [`ACCEPT_PAUSE`] passed.
pub(super) fn resume_accepting<A: App>(w: &Shared<A>, now: u64) {
    let _pause = ACCEPT_PAUSE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let at = ACCEPT_PAUSED_AT.load(Ordering::Acquire);
    if at == 0 || now < at + ACCEPT_PAUSE.as_millis() as u64 {
        return;
    }
    if crate::crash::crashed().is_some() || LISTENER_GONE.load(Ordering::Relaxed) {
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

/// A listening socket of this worker is gone from under it: said once, and
/// the worker stops accepting and asks to be replaced. Its threads serve
/// what they hold meanwhile; the new worker takes the new connections.
pub(super) static LISTENER_GONE: AtomicBool = AtomicBool::new(false);

/// The listeners (by index, the first 64) whose descriptor number is no
/// longer theirs: it may name a file the app opened since, which nothing
/// here may close, replace or take out of the epoll set.
static LOST: AtomicU64 = AtomicU64::new(0);

/// Whether listener `idx`'s descriptor number is still its own.
pub(super) fn listener_kept(idx: usize) -> bool {
    match idx {
        // Not tracked one by one: any loss counts for them all.
        64.. => !LISTENER_GONE.load(Ordering::Relaxed),
        _ => LOST.load(Ordering::Relaxed) & (1 << idx) == 0,
    }
}

fn listener_gone<A: App>(w: &Shared<A>, idx: usize, e: &io::Error) {
    if idx < 64 {
        LOST.fetch_or(1 << idx, Ordering::SeqCst);
    }
    if LISTENER_GONE.swap(true, Ordering::SeqCst) {
        return;
    }
    error!(
        "Worker {}: its {} listening socket (descriptor {}) is gone: {e}; the app closed the descriptor \
         (os.closerange, say)? This worker stops accepting, leaves once its requests are done if another \
         worker serves, and is replaced: pid={}",
        w.slot,
        w.listeners[idx].1.protocol.name(),
        w.listeners[idx].0,
        std::process::id()
    );
    pause_listeners(w, mono_ms());
    w.scoreboard.request_retire(w.slot, crate::scoreboard::Retire::Broken);
}

/// Takes, from the main thread, connections that wait in an accept queue
/// for two upkeep ticks in a row while this worker accepts: their wake-up
/// went to a worker that could not take them (one whose listening
/// descriptor the app closed, which the kernel goes on waking), and no
/// other wake-up comes until the next connection arrives. Parked, they are
/// served like any other. Not while every thread here is busy: they wait
/// in the queue as well as here, and there the first worker with a thread
/// free takes them (taken here, one waited for the whole of a stream that
/// held this worker's only thread, while its sibling served the others).
pub(super) fn take_unannounced<A: App>(w: &Shared<A>, before: &mut [bool]) {
    let all_busy = w.in_pass.iter().all(|busy| busy.load(Ordering::Relaxed));
    if all_busy
        || draining()
        || ACCEPT_PAUSED_AT.load(Ordering::Relaxed) != 0
        || LISTENER_GONE.load(Ordering::Relaxed)
    {
        before.iter_mut().for_each(|b| *b = false);
        return;
    }
    for (idx, (fd, _)) in w.listeners.iter().enumerate() {
        let now_queued = queued(*fd);
        if now_queued && before[idx] {
            if let Accepted::Conn(conn) = accept_one(w, idx) {
                debug!(
                    "took a connection no wake-up announced from the {} listener",
                    w.listeners[idx].1.protocol.name()
                );
                park(w, conn);
            }
        }
        before[idx] = now_queued;
    }
}

/// Accepts one connection from listener `idx`, if one is waiting.
pub(super) fn accept_one<A: App>(w: &Shared<A>, idx: usize) -> Accepted {
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
    let fd = crate::listen::off_stdio(fd);
    if fd < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::ECONNABORTED) | Some(libc::EINTR) => {}
            // The listener was let go by a drain meanwhile; or, not draining,
            // its descriptor was closed by the app (a daemonizing idiom's
            // closerange, say), or now names a file the app opened.
            Some(libc::EBADF) | Some(libc::ENOTSOCK) | Some(libc::EINVAL) if !draining() => {
                listener_gone(w, idx, &e)
            }
            Some(libc::EBADF) | Some(libc::ENOTSOCK) | Some(libc::EINVAL) => {}
            Some(libc::EMFILE) | Some(libc::ENFILE) => pause_accepting(w, &e),
            _ => error!("accept: {e}"),
        }
        return Accepted::None;
    }
    if !is_unix && !w.nodelay_inherited[idx] {
        set_nodelay(fd);
    }
    // Nothing runs the app here now: a sibling serves the connection sooner.
    if w.app.stalled() && pass_to_sibling(w, fd, idx, "the app is stalled") {
        report_stall(w);
        return Accepted::Shed;
    }
    // Taken from the queue as this worker leaves (see begin_drain) while
    // every thread of it is busy: a ready sibling serves it sooner.
    if draining()
        && SERVING_THREAD.with(|t| t.get()) == usize::MAX
        && w.in_pass.iter().all(|p| p.load(Ordering::Relaxed))
        && pass_to_sibling(w, fd, idx, "draining with every thread busy")
    {
        return Accepted::Shed;
    }
    // At --max-connections the new connection goes to a sibling with room
    // first. Only when none has any is an idle kept-alive connection closed
    // for it: its client may be sending its next request at that moment (a
    // POST nginx then answers with 502), while the sibling closes nothing.
    if w.registry.lock().unwrap().live >= w.config.max_connections {
        if pass_to_sibling(w, fd, idx, "at --max-connections") {
            return Accepted::Shed;
        }
        let reg = w.registry.lock().unwrap();
        if reg.live >= w.config.max_connections && !reclaim_idle(&reg) {
            drop(reg);
            shed(w, fd, idx, &peer_strings(&addr, is_unix).0);
            return Accepted::Shed;
        }
    }
    let t = SERVING_THREAD.with(|t| t.get());
    if t != usize::MAX && hand_on_if_spoken_for(w, t, fd, idx) {
        return Accepted::Shed;
    }
    let (remote_addr, remote_port) = peer_strings(&addr, is_unix);
    Accepted::Conn(adopt(w, fd, idx, remote_addr, remote_port, true))
}

/// Registers a connection this worker now owns (accepted, or handed over
/// by a sibling) and makes its state.
pub(super) fn adopt<A: App>(
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
        state: AtomicConnState::new(ConnState::Busy),
        deadline: AtomicU64::new(0),
        fresh: AtomicBool::new(fresh),
        promising: AtomicBool::new(false),
        promised_at: AtomicU64::new(0),
        between: AtomicBool::new(false),
        parked_at: AtomicU64::new(0),
        untouched: AtomicBool::new(false),
        begun: AtomicBegun::new(Begun::Not),
        resume: Mutex::new(Vec::new()),
        handed: AtomicBool::new(false),
        body_ahead: AtomicBool::new(false),
        answered_slow: AtomicBool::new(false),
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
        head_done: 0,
        fcgi: FcgiConn::default(),
        registered: false,
        // uwsgi and SCGI carry one request per connection: nothing to re-arm.
        edge: w.config.threads <= 1 && matches!(protocol, Protocol::Http | Protocol::FastCgi),
        hung_up: false,
        handed_in: false,
        proxy_pending: fresh && protocol == Protocol::Http && w.config.proxy_protocol,
        head_charge: HeadCharge::default(),
    })
}

/// Whether connection `fd` was accepted on a listener like `listener`: the
/// same family, and for TCP the same port.
pub(super) fn accepted_on(fd: RawFd, listener: &ListenerInfo) -> bool {
    // SAFETY: `fd` is a connection this worker owns for the whole call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let Ok(local) = socket2::SockRef::from(&fd).local_addr() else {
        return false;
    };
    match local.as_socket() {
        Some(addr) => !listener.is_unix && listener.server_port.parse() == Ok(addr.port()),
        None => listener.is_unix && local.is_unix(),
    }
}

/// The address and port of a connected socket's peer ([`peer_strings`]);
/// the error when it has none (reset on the way).
pub(super) fn peer_of_socket(fd: RawFd) -> std::io::Result<(String, String)> {
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe { libc::getpeername(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(peer_strings(&addr, addr.ss_family as i32 == libc::AF_UNIX))
}

pub(super) fn peer_strings(addr: &libc::sockaddr_storage, is_unix: bool) -> (String, String) {
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
