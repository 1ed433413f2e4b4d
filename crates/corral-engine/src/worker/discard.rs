//! Dropping the rest of a request body the app did not read, so that the
//! connection can carry the next request, within limits of time and size.

use super::*;

/// Says why a connection closes before the rest of the body the app did
/// not read was dropped.
pub(super) fn log_discard_gave_up(what: &str, why: GaveUp) {
    match why {
        GaveUp::Stalled => info!(
            "{what}: closing the connection: the rest of a request body the app did not read \
             did not come within {} s",
            DRAIN_WAIT.as_secs()
        ),
        GaveUp::Unfinished => info!(
            "{what}: closing the connection: the rest of a request body the app did not read was \
             still to come {} s after the request ended",
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
pub(super) fn discard_front_end_body(io: &mut Io, blocking: fn(&mut dyn FnMut()), req: &Request<'_>) {
    if let Discarded::GaveUp(why) = discard_body(io, blocking) {
        log_discard_gave_up(&format!("{} from {}", req.describe(), req.peer()), why);
    }
}

/// Drops what came of the rest of a body the app did not read, before the
/// next request head is looked at; `Some` when the connection cannot go on
/// to it yet (or at all).
pub(super) fn go_on_discarding<A: App>(w: &Shared<A>, conn: &mut Conn, io: &mut Io) -> Option<Next> {
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
pub(super) fn log_discard_failed(peer: String, io: &Io) {
    if let BodyState::Failed(BodyError::Framing(e)) = io.body {
        info!(
            "Bad request body from {peer}: {}, in the body the app did not read; closing the connection",
            crate::exchange::chunked_fault(e)
        );
    }
}

/// How discarding the rest of a request body ended.
pub(super) enum Discarded {
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
pub(super) enum GaveUp {
    /// Nothing came for [`DRAIN_WAIT`].
    Stalled,
    /// A client's body had not all come [`DRAIN_WAIT`] after its request
    /// ended, though some of it may have been coming.
    Unfinished,
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
pub(super) const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The longest the serving thread drops a front end's body the app did not
/// read, however steadily it comes. nginx sends a buffered body at local
/// speed and reads the response only after it, so a body this read keeps a
/// 413 or a redirect the app gave from turning into a 502 (hundreds of MB
/// take well under a second); a peer streaming without end, or a client's
/// upload passed on at the client's pace, must not keep the thread for good
/// (nginx's own lingering_time is 30 s; the thread serves no one else
/// meanwhile, so less).
pub(super) const FRONT_END_DRAIN_TIME: Duration = Duration::from_secs(10);

/// Drops what has come of the rest of a client's request body the app did
/// not read, without waiting for more: `Later` when more is to come. At most
/// [`MAX_DRAIN`] bytes in all, until `io.discard_until`.
pub(super) fn discard_available(io: &mut Io) -> Discarded {
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
            Err(BodyError::WouldWait | BodyError::Timeout) => break Discarded::GaveUp(GaveUp::Unfinished),
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
pub(super) fn discard_body(io: &mut Io, blocking: fn(&mut dyn FnMut())) -> Discarded {
    let front_end = io.wire != Wire::Http;
    if !front_end && matches!(io.body, BodyState::Length(left) if left > MAX_DRAIN) {
        return Discarded::GaveUp(GaveUp::TooMuch);
    }
    let (saved_timeout, saved_max) = (io.timeout_ms, io.max_body);
    // How a drop ends is said by its caller, not by the body's reader.
    let saved_note = io.body_note.take();
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
    io.body_note = saved_note;
    outcome
}

/// The one log line for a FastCGI body stream the front end broke, wherever
/// it was found (by the app reading wsgi.input, or by draining what it left).
pub(super) fn warn_bad_stream(conn: &Conn, listener: &ListenerInfo, io: &Io) {
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
