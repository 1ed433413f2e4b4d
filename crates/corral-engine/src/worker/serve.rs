//! A connection's turn on a serving thread: reading, serving its requests,
//! then parking it in the epoll set or closing it.

use super::*;

/// A connection epoll handed to this thread: claim it from the sweeper first.
pub(super) fn serve<A: App>(
    w: &Shared<A>,
    state: &mut A::Thread,
    t: usize,
    conn: Box<Conn>,
    held: &mut Held,
) {
    let claim = |e: &Entry| e.state.claim(ConnState::Busy);
    if !claim(&conn.entry) && !given_back(w, &conn.entry, claim) {
        // The sweeper shut it down (timeout or drain). Bytes still buffered
        // are a request that did not arrive whole in time: say so.
        let (partial, discarding, lingering) = {
            let io = conn.io.lock().unwrap();
            (io.buf.len(), (io.discard_until != 0).then(|| io.discard_what.clone()), io.lingering)
        };
        if lingering {
            // Its client went quiet, or its time was up: its response went
            // out long ago.
            close(w, conn, false);
            return;
        }
        if let Some(what) = discarding {
            log_discard_gave_up(&what, GaveUp::Unfinished);
            close(w, conn, false);
            return;
        }
        // A FastCGI request's records leave the buffer for its state as they come.
        // One handed to a sibling goes on there; any other was shut down at
        // its deadline, draining or not.
        let begun = partial > 0 || conn.fcgi.active.is_some();
        if begun && !conn.entry.handed.load(Ordering::Relaxed) {
            note_timed_out(w, &conn, partial);
        }
        close(w, conn, false);
        return;
    }
    serve_claimed(w, state, t, conn, held);
}

/// Logs a connection the sweeper shut down with a request begun in it.
/// One whose head came whole names the request and its client (REMOTE_ADDR
/// behind a front end, not only the front end's socket), and the 408 the
/// sweeper answered it with gets an access-log line like any refusal.
fn note_timed_out<A: App>(w: &Shared<A>, conn: &Conn, partial: usize) {
    let listener = &w.listeners[conn.listener].1;
    let io = conn.io.lock().unwrap();
    // The head is the buffer's start until the request is taken from it.
    let params = match listener.protocol {
        _ if !conn.head_ready => None,
        Protocol::Uwsgi => gateway::uwsgi_head(&io.buf).ok().flatten().map(|h| h.params),
        Protocol::Scgi => gateway::scgi_head(&io.buf).ok().flatten().map(|h| h.params),
        _ => None,
    };
    let req = conn.head_ready.then(|| Request {
        meta: match &params {
            Some(p) => Meta::Cgi(p),
            None => Meta::Http(&conn.head),
        },
        bytes: &io.buf,
        remote_addr: &conn.remote_addr,
        remote_port: &conn.remote_port,
        listener,
        listener_index: conn.listener,
        forwarded_https: false,
        forwarded_prefix: false,
    });
    // A gateway head that no longer parses (it cannot: it parsed before)
    // would leave HTTP ranges over gateway bytes.
    let req = req.filter(|_| params.is_some() || listener.protocol == Protocol::Http);
    let (part, who) = match &req {
        Some(req) => (
            format!("its body came slower than {} bytes/s after", crate::exchange::MIN_BODY_RATE),
            format!("{} from {}", req.describe(), req.peer()),
        ),
        None => ("incomplete after".to_string(), format!("from {}", peer(conn, listener))),
    };
    let answered = conn.entry.answered_slow.load(Ordering::Relaxed);
    // A FastCGI request's PARAMS so far are held in its state, not the buffer.
    let partial = partial + conn.fcgi.params.len();
    let what = format!(
        "{} request {who}: {part} the header timeout ({} s, {partial} bytes buffered); {}",
        listener.protocol.name(),
        w.config.header_timeout.as_secs_f64(),
        if answered { "answered 408 and closed the connection" } else { "closing the connection" },
    );
    // A client that stalls is routine on the open internet; a front
    // end that stalls inside its own request is not.
    if listener.protocol == Protocol::Http {
        info!("Timed out: {what}");
    } else {
        warn!("Timed out: {what}");
    }
    if let (Some(req), true) = (&req, answered) {
        let wire = match listener.protocol {
            Protocol::Uwsgi => Wire::Uwsgi,
            Protocol::Scgi => Wire::Scgi,
            _ => Wire::Http,
        };
        let reply = error_reply(wire, 408, SLOW_BODY, false);
        record_refused_request(w, conn, req, 408, &reply);
    }
}

/// Whether a connection this thread was woken for, found `Closing`, is back
/// with it (and claimed, by `claim`): a draining worker's sweeper marks a
/// connection `Closing` while it hands it to a sibling, under the registry
/// lock, and gives it back (`Idle`) when that fails (the sibling began to
/// drain too, say). Closed then, the request that woke this thread would be
/// lost with it (a reset, a 502 from nginx); the sweeper, which hands over
/// only connections with nothing waiting, would never take it again.
pub(super) fn given_back<A: App>(w: &Shared<A>, entry: &Entry, claim: impl Fn(&Entry) -> bool) -> bool {
    let _sweep_done = w.registry.lock().unwrap_or_else(|p| p.into_inner());
    claim(entry)
}

/// A request that arrived over uwsgi, FastCGI or SCGI.
pub(super) struct GatewayRequest {
    /// The bytes `params` index.
    pub(super) bytes: Bytes,
    pub(super) params: CgiParams,
    pub(super) wire: Wire,
    pub(super) body: BodyState,
}

/// What to do with a connection after looking at its buffer.
pub(super) enum Next {
    /// A request head is complete; this many bytes are its head.
    Request(usize),
    /// A gateway request's variables are complete.
    Gateway(GatewayRequest),
    /// Wait in epoll for more bytes.
    Park,
    /// A request was refused with its answer, its body dropped, and the
    /// connection goes on to the next.
    Refused,
    Close,
}

pub(super) fn serve_claimed<A: App>(
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
            Next::Refused => {
                // Answered: the connection waits for the next request as
                // after any response (the keep-alive clock), no longer a new one.
                conn.entry.fresh.store(false, Ordering::Relaxed);
                unpromise(w, &conn.entry);
                conn.request_started = mono_ms();
                Outcome::Done(true)
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
pub(super) fn give_up_turn<A: App>(w: &Shared<A>, mut conn: Box<Conn>) -> Option<Box<Conn>> {
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
pub(super) fn leave_serving_set<A: App>(w: &Shared<A>, conn: &mut Conn) {
    if conn.edge && conn.registered {
        unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, conn.entry.fd, std::ptr::null_mut()) };
        conn.registered = false;
    }
}

/// Serves on a connection that gave up its turn.
pub(super) fn take_turn<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, held: &mut Held) {
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

/// Hands the connection back to epoll until it is readable again.
pub(super) fn park<A: App>(w: &Shared<A>, mut conn: Box<Conn>) {
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
    let fresh = conn.entry.fresh.load(Ordering::Relaxed);
    if fresh && idle && conn.fcgi.active.is_none() && now.saturating_sub(conn.request_started) < PROMISE_MS {
        // Its request is likely on its way: a thread here is counted on for it.
        promise(w, &conn.entry, conn.request_started);
    }
    let between = idle && !fresh && conn.fcgi.active.is_none() && discard_until == 0;
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
            conn.entry.parked_at.store(now, Ordering::Relaxed);
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
        Begun::Not
    } else if conn.fcgi.active.is_some() {
        // Sized before it is encoded: PARAMS may hold up to 1 MiB.
        if crate::gateway::fcgi_resume_len(&conn.fcgi) as u64 + buffered
            <= crate::handover::CARRIED_MAX as u64
        {
            *conn.entry.resume.lock().unwrap_or_else(|p| p.into_inner()) =
                crate::gateway::fcgi_resume(&conn.fcgi);
            Begun::FastCgi
        } else {
            Begun::Not
        }
    } else if idle || buffered > crate::handover::CARRIED_MAX as u64 {
        Begun::Not
    } else if conn.proxy_pending {
        Begun::BeforeProxy
    } else {
        Begun::Request
    };
    conn.entry.begun.store(begun);
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
    entry.state.store(ConnState::Idle);
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
        // SAFETY: `ptr` was leaked above and never reached the epoll set,
        // so no other thread can have been given it.
        let conn = unsafe { Box::from_raw(ptr) };
        close(w, conn, false);
    }
}

pub(super) fn close<A: App>(w: &Shared<A>, conn: Box<Conn>, reset: bool) {
    let fd = conn.entry.fd;
    unpromise(w, &conn.entry);
    let reset = {
        // The flusher may still hold this connection's handle: nothing may
        // be written to the descriptor number once it is closed and reused.
        let mut io = conn.io.lock().unwrap_or_else(|p| p.into_inner());
        io.release();
        // Read since the last request was counted: the rest of a body
        // dropped after its request (a 413's), a head that never came whole.
        let unrecorded = std::mem::take(&mut io.read_total);
        if unrecorded > 0 {
            w.scoreboard.count(w.slot, crate::scoreboard::C_BYTES_IN, unrecorded);
        }
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
        reset || io.reset_on_close
    };
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
        // A child the app forked holds a copy of the descriptor, so close()
        // alone does not end the connection: it is ended here, unless a
        // sibling now serves it (that would end it there too). So is one a
        // sibling handed over: a child its app forked may hold a copy too
        // (the client of a `Connection: close` response got no FIN while
        // that child lived).
        if (APP_FORKED.load(Ordering::Relaxed) || conn.handed_in)
            && !conn.entry.handed.load(Ordering::Relaxed)
        {
            // shutdown() would send a FIN, which a reset must not be.
            let disconnected = reset && !w.listeners[conn.listener].1.is_unix && super::upkeep::reset_tcp(fd);
            if !disconnected {
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        // Closed under the registry lock so the sweeper never shuts down a
        // reused descriptor number.
        unsafe { libc::close(fd) };
    }
    drop(conn);
}

/// Ends the sending side of a connection that closes while its peer may
/// still be sending (a body the app did not read, a request refused before
/// its body, bytes past the request), so that the close does not turn into
/// a reset, which would destroy the response still on its way to the client.
///
/// An HTTP client may go on sending for a while, and a reset arriving
/// before it read the response loses it, as a browser uploading a large
/// file that was refused sees "connection reset" instead of the 413: the
/// connection lingers (nginx's lingering close), its sending side shut,
/// while what comes is read and dropped from the event loop, until the
/// client closes, [`LINGER_QUIET`] passes with nothing, or [`LINGER_TIME`]
/// in all. A front end's stream is read to its end by the serving thread
/// before this (`discard_front_end_body`), so only what is already there
/// is read of it.
pub(super) fn drain_and_close(io: &mut Io) {
    let flushed = io.flush_out(|f| f()).is_ok();
    let fd = io.fd;
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if io.wire == Wire::Http && flushed && !io.broken {
        io.buf.clear();
        io.linger_end = mono_ms() + LINGER_TIME.as_millis() as u64;
        io.lingering = linger_read(io) == Linger::Wait;
        return;
    }
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        io.read_total += n as u64;
    }
}

/// The longest a lingering connection waits for its client's next bytes
/// (nginx's lingering_timeout).
pub(super) const LINGER_QUIET: Duration = Duration::from_secs(5);

/// The longest a connection lingers in all (nginx's lingering_time).
pub(super) const LINGER_TIME: Duration = Duration::from_secs(30);

/// Most bytes a lingering connection's turn drops before it goes back to
/// epoll, so that a client sending fast does not keep the thread.
const LINGER_TURN: usize = 1024 * 1024;

/// What a lingering connection does after [`linger_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Linger {
    /// Waits for more of its client's bytes.
    Wait,
    /// Closed by the client, or broken: it closes.
    Done,
    /// Its client was still sending at [`LINGER_TIME`]: it closes, and the
    /// log says so.
    TimeUp,
}

/// Reads and drops what a lingering connection's client sent. Sets the
/// quiet deadline it waits until.
pub(super) fn linger_read(io: &mut Io) -> Linger {
    let mut scratch = [0u8; 16 * 1024];
    let mut dropped = 0;
    io.drained = false;
    while dropped < LINGER_TURN {
        let n = unsafe { libc::read(io.fd, scratch.as_mut_ptr().cast(), scratch.len()) };
        if n > 0 {
            dropped += n as usize;
            // Received all the same: counted when the connection closes.
            io.read_total += n as u64;
            continue;
        }
        if n == 0 {
            return Linger::Done;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                io.drained = true;
                break;
            }
            _ => return Linger::Done,
        }
    }
    let now = mono_ms();
    io.discard_until = (now + LINGER_QUIET.as_millis() as u64).min(io.linger_end);
    match now < io.linger_end {
        true => Linger::Wait,
        false => Linger::TimeUp,
    }
}
