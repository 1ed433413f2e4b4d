//! One request: calling the app, writing its response, and deciding
//! whether the connection can carry another.

use super::*;

/// A request ready to be served.
pub(super) enum Incoming {
    /// An HTTP request whose head is the first `n` buffered bytes.
    Http(usize),
    Gateway(GatewayRequest),
}

/// Serves one request.
pub(super) fn handle_request<A: App>(
    w: &Shared<A>,
    state: &mut A::Thread,
    t: usize,
    conn: &mut Conn,
    incoming: Incoming,
) -> Outcome {
    let listener = &w.listeners[conn.listener].1;
    conn.entry.fresh.store(false, Ordering::Relaxed);
    unpromise(w, &conn.entry);
    let (bytes, params, generation, too_large) = begin_request(w, conn, incoming);
    let forwarded_https = match params {
        Some(_) => false,
        None if !conn.head.scheme_fields => false,
        None if !w.config.forwarded_allow.trusts(&conn.peer_addr, listener.is_unix) => false,
        None => match crate::forwarded::scheme(&conn.head, &bytes) {
            crate::forwarded::Scheme::Https => true,
            crate::forwarded::Scheme::Http | crate::forwarded::Scheme::Unsaid => false,
            crate::forwarded::Scheme::Contradictory => {
                let mut io = conn.io.lock().unwrap();
                info!(
                    "Bad request from {}: contradictory scheme headers (X-Forwarded-Proto, \
                     X-Forwarded-Protocol, X-Forwarded-SSL) (400 Bad Request)",
                    peer(conn, listener)
                );
                let reply = error_reply(io.wire, 400, "contradictory scheme headers", io.front_end_nginx);
                let _ = io.write_parts(&[&reply], |f| f());
                record_refusal(w, Ok(conn), conn.listener, &bytes, 400, &reply);
                drain_and_close(&mut io);
                return Outcome::Done(false);
            }
        },
    };
    let forwarded_prefix = params.is_none()
        && conn.head.script_name_field
        && w.config.forwarded_allow.trusts(&conn.peer_addr, listener.is_unix);
    let req = Request {
        meta: match &params {
            Some(p) => Meta::Cgi(p),
            None => Meta::Http(&conn.head),
        },
        bytes: &bytes,
        remote_addr: &conn.remote_addr,
        remote_port: &conn.remote_port,
        listener,
        listener_index: conn.listener,
        forwarded_https,
        forwarded_prefix,
    };
    if let Some(len) = too_large {
        info!(
            "Request body too large from {}: Content-Length {len} exceeds --max-body-size {}",
            req.peer(),
            w.config.max_body_size
        );
        let mut io = conn.io.lock().unwrap();
        let blocking: fn(&mut dyn FnMut()) = |f| f();
        let wire = io.wire;
        if let (Wire::FastCgi { id, keep_conn: true }, true) = (wire, io.keep_alive) {
            let (reply, kept) = refuse_kept_fcgi(&mut io, id, 413, "request body too large", true, blocking);
            record_refused_request(w, conn, &req, 413, &reply);
            if !kept {
                drain_and_close(&mut io);
                return Outcome::Done(false);
            }
            drop(io);
            conn.request_started = mono_ms();
            return Outcome::Done(true);
        }
        let reply = error_reply(wire, 413, "request body too large", io.front_end_nginx);
        let _ = io.write_parts(&[&reply], blocking);
        record_refused_request(w, conn, &req, 413, &reply);
        if io.wire != Wire::Http {
            // The end of the stream goes with the 413: a front end that stops
            // sending the body once it has the answer (nginx, Apache) would
            // otherwise find the connection alive meanwhile, and send its
            // next request on it to be dropped here with the body (Apache:
            // 503). What it still sends is read, so that the close is no reset.
            if io.flush_out(blocking).is_ok() {
                unsafe { libc::shutdown(io.fd, libc::SHUT_WR) };
            }
            // A front end reads the 413 only once it has sent the body.
            discard_front_end_body(&mut io, blocking, &req);
        }
        drain_and_close(&mut io);
        return Outcome::Done(false);
    }
    // For the main thread, should this request run past --timeout or its
    // thread crash: the access log's line of it, which the thread will not
    // write then.
    let note = w.access.as_ref().map(|log| LogNote::of(log, conn, &req));
    *w.current[t].lock().unwrap() = Some((conn.entry.fd, conn.io.clone(), listener.protocol, note));
    // From the end of the head, as gunicorn counts: a small body read ahead
    // of the app (a slow client's upload) is part of the request's time.
    let started = match std::mem::take(&mut conn.head_done) {
        0 => Instant::now(),
        done => Instant::now() - Duration::from_millis(mono_ms().saturating_sub(done)),
    };
    let began_ms = mono_ms();
    w.scoreboard.begin(w.slot, t, req.method(), req.target(), began_ms);
    reset_client_wait(t);
    // gunicorn's debug level has a line per request too.
    debug!("{} {}", String::from_utf8_lossy(req.method()), String::from_utf8_lossy(req.target()));
    match static_target(&w.config.static_mounts, &req) {
        Some((mount, rel)) => serve_static(conn, generation, mount, &rel, &req),
        None => {
            let mut ex = Exchange { io: conn.io.clone(), generation, blocking: A::blocking };
            w.app.call(state, &req, &mut ex);
        }
    }
    w.scoreboard.end(w.slot, t);
    let timed_out = {
        *w.current[t].lock().unwrap() = None;
        w.timed_out[t].swap(false, Ordering::AcqRel)
    };
    let keep = if timed_out {
        w.stuck.fetch_sub(1, Ordering::AcqRel);
        if !super::upkeep::cut_at_exit() {
            warn!("Timed-out request {} returned after all", req.describe());
        }
        false
    } else {
        let mut io = conn.io.lock().unwrap();
        // A file the socket could not take at once (Exchange::send_file).
        if w.offload.is_some() {
            if let Some(transfer) = io.pending_file.take() {
                // The app's handles (a kept write callable, wsgi.input) are
                // stale from here on, as after any response.
                io.generation += 1;
                let shown = w.scoreboard.begin_download(w.slot, req.method(), req.target(), began_ms);
                return Outcome::Offload(Download { transfer, bytes: bytes.clone(), params, started, shown });
            }
        }
        // Without the offload thread, io.finish sends the rest here.
        complete_locked_noted(conn, listener, &req, &mut io)
    };
    // A timed-out request was counted and logged when it timed out (check_timeouts).
    after_request(w, t, conn, &req, started, !timed_out);
    if keep {
        conn.request_started = mono_ms();
    }
    Outcome::Done(keep)
}

/// Whether nginx sent these CGI parameters, as its SERVER_SOFTWARE says
/// (its stock fastcgi_params, uwsgi_params and scgi_params all pass it).
pub(super) fn nginx_sent(params: &crate::cgi::CgiParams, bytes: &[u8]) -> bool {
    params.get(bytes, b"SERVER_SOFTWARE").is_some_and(|v| v.starts_with(b"nginx/"))
}

/// Sets the connection's I/O up for the request `incoming` says is ready:
/// its body's framing, whether the connection may stay, the response state
/// of the last request cleared. Answers the request's bytes, a front end's
/// parameters, the exchange's generation, and the declared body length when
/// it passes --max-body-size.
fn begin_request<A: App>(
    w: &Shared<A>,
    conn: &mut Conn,
    incoming: Incoming,
) -> (Bytes, Option<cgi::CgiParams>, u64, Option<u64>) {
    let mut io = conn.io.lock().unwrap();
    let (bytes, params) = match incoming {
        Incoming::Http(n) => {
            let head_bytes = io.buf.split_to(n).freeze();
            let head = &conn.head;
            io.wire = Wire::Http;
            io.body = match head.framing {
                BodyFraming::None => BodyState::Done,
                BodyFraming::Length(len) => BodyState::Length(len),
                BodyFraming::Chunked => BodyState::Chunked(http1::ChunkedDecoder::new()),
            };
            io.continue_owed = head.expect_continue && !matches!(io.body, BodyState::Done);
            io.http11 = head.version == Version::Http11;
            io.head_request = &head_bytes[head.method.clone()] == b"HEAD";
            // A zero --keepalive-timeout turns keep-alive off (gunicorn's 0).
            // Draining, a connection closes after this request unless
            // the client sent another behind it already.
            io.keep_alive =
                head.keep_alive && (!draining() || io.pipelined()) && !w.config.keepalive_timeout.is_zero();
            (head_bytes, None)
        }
        Incoming::Gateway(g) => {
            io.wire = g.wire;
            io.body = g.body;
            io.continue_owed = false;
            io.http11 = true;
            io.head_request = g.params.get(&g.bytes, b"REQUEST_METHOD") == Some(b"HEAD");
            io.keep_alive =
                matches!(g.wire, Wire::FastCgi { keep_conn: true, .. }) && fastcgi_conn_may_stay();
            io.front_end_nginx = matches!(g.wire, Wire::FastCgi { .. }) && nginx_sent(&g.params, &g.bytes);
            io.stdin_stops_at_response = io.front_end_nginx && !matches!(io.body, BodyState::Done);
            (g.bytes, Some(g.params))
        }
    };
    // The body's declared length: uwsgi and SCGI frame the body by it;
    // FastCGI streams STDIN, but the front end says its length too.
    let declared = match (&io.body, &params) {
        (BodyState::Length(len), _) => Some(*len),
        (BodyState::Fcgi(_), Some(p)) if w.config.max_body_size != u64::MAX => p
            .get(&bytes, b"CONTENT_LENGTH")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok()),
        _ => None,
    };
    let too_large = declared.filter(|&len| len > w.config.max_body_size);
    io.body_received = 0;
    io.body_deadline = 0;
    io.discard_until = 0;
    io.pending.clear();
    io.phase = RespPhase::Idle;
    io.block_at = None;
    io.status = 0;
    io.app_length = None;
    io.app_date = false;
    io.bytes_sent = 0;
    io.aborted = false;
    io.fcgi_aborted = false;
    io.fcgi_ended = false;
    io.fcgi_refused.clear();
    if w.access.as_ref().is_some_and(|a| a.format.needs_response_headers()) {
        io.logged_headers.get_or_insert_with(Vec::new).clear();
    }
    io.logged_environ.clear();
    io.generation += 1;
    (bytes, params, io.generation, too_large)
}

/// Answers a request for a file under --static, here: no app, no GIL, so
/// waits block this thread plainly.
fn serve_static(
    conn: &Conn,
    generation: u64,
    mount: &crate::static_files::Mount,
    rel: &[u8],
    req: &Request<'_>,
) {
    let ex = Exchange { io: conn.io.clone(), generation, blocking: |f| f() };
    let header = |name: &str| request_header(req, name);
    let values = [
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "range",
        "accept-encoding",
    ]
    .map(header);
    let v = |i: usize| values[i].as_deref();
    let conditions = crate::static_files::Conditions {
        if_match: v(0),
        if_none_match: v(1),
        if_modified_since: v(2),
        if_unmodified_since: v(3),
        if_range: v(4),
        range: v(5),
        accept_encoding: v(6),
        query: match req.cgi() {
            Some(c) => c.get(req.bytes, b"QUERY_STRING").unwrap_or(b""),
            None => req.query(),
        },
    };
    let method = req.method();
    let ok = method == b"GET" || method == b"HEAD";
    crate::static_files::serve(&ex, mount, rel, method == b"HEAD", ok, &conditions);
}

/// The end of every request: metrics (unless `count` is false), `--max-requests`,
/// the access log line.
pub(super) fn after_request<A: App>(
    w: &Shared<A>,
    t: usize,
    conn: &Conn,
    req: &Request<'_>,
    started: Instant,
    count: bool,
) {
    let took = started.elapsed();
    if count {
        let mut io = conn.io.lock().unwrap();
        let bytes_in = std::mem::take(&mut io.read_total);
        let protocol = req.listener.protocol as usize;
        w.scoreboard.record(w.slot, protocol, io.status, took.as_micros() as u64, bytes_in, io.bytes_sent);
    }
    // --max-requests is judged at each request's end, as gunicorn does,
    // rather than at the next sweep, which may come hundreds of requests later.
    if let Some(max) = w.max_requests {
        let served = w.scoreboard.requests(w.slot);
        if served >= max && !RECYCLING.load(Ordering::Acquire) {
            ask_recycle(w, Retire::MaxRequests, &format!("served {served} requests (limit {max})"));
        }
    }
    if let (Some(log), true) = (&w.access, count) {
        log_request(log, t, conn, req, took);
    }
}

/// The `--static` mount a request falls under, with the decoded path below it.
pub(super) fn static_target<'m>(
    mounts: &'m [crate::static_files::Mount],
    req: &Request<'_>,
) -> Option<(&'m crate::static_files::Mount, Vec<u8>)> {
    if mounts.is_empty() {
        return None;
    }
    let raw: &[u8] = match req.cgi() {
        Some(c) => {
            // The path the app would see as SCRIPT_NAME + PATH_INFO, so that a
            // file is served for the path the front end routed on: PATH_INFO
            // (decoded by the front end), else DOCUMENT_URI (nginx's, also
            // normalized), else REQUEST_URI decoded and normalized.
            let path = match (c.get(req.bytes, b"PATH_INFO"), c.get(req.bytes, b"DOCUMENT_URI")) {
                // A front end that split the path itself (nginx's
                // fastcgi_split_path_info) sends the prefix apart; one that
                // names SCRIPT_NAME and the whole path sends it in both.
                (Some(p), _) => {
                    match c.get(req.bytes, b"SCRIPT_NAME").map(|s| s.strip_suffix(b"/").unwrap_or(s)) {
                        Some(sn) if !sn.is_empty() && !under_prefix(p, sn) => [sn, p].concat(),
                        _ => p.to_vec(),
                    }
                }
                (None, Some(d)) if d.starts_with(b"/") => d.to_vec(),
                _ => {
                    let uri = c.get(req.bytes, b"REQUEST_URI").unwrap_or(b"");
                    cgi::request_path(uri.split(|&b| b == b'?').next().unwrap_or(b""))
                }
            };
            return mounts.iter().find_map(|m| m.takes(&path, req.method()).map(|r| (m, r.to_vec())));
        }
        None => req.path(),
    };
    let mut decoded = Vec::with_capacity(raw.len());
    corral_proto::http1::percent_decode(raw, &mut decoded);
    mounts.iter().find_map(|m| m.takes(&decoded, req.method()).map(|r| (m, r.to_vec())))
}

/// Whether `path` is `prefix` or lies below it.
fn under_prefix(path: &[u8], prefix: &[u8]) -> bool {
    path.starts_with(prefix) && matches!(path.get(prefix.len()), None | Some(b'/'))
}

/// A request header by lower-case name (joined with "," when repeated over
/// HTTP; as the front end sent it otherwise).
pub(super) fn request_header<'r>(req: &Request<'r>, name: &str) -> Option<std::borrow::Cow<'r, [u8]>> {
    match req.cgi() {
        Some(c) => {
            let key: Vec<u8> = b"HTTP_"
                .iter()
                .copied()
                .chain(name.bytes().map(|b| if b == b'-' { b'_' } else { b.to_ascii_uppercase() }))
                .collect();
            join_values(c.iter(req.bytes).filter(|(k, _)| *k == &key[..]).map(|(_, v)| v))
        }
        None => join_values(
            req.fields().filter(|(n, _, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v, _)| v),
        ),
    }
}

/// Several field lines of one name are one comma-separated list (RFC 9110 5.3).
pub(super) fn join_values<'r>(
    mut values: impl Iterator<Item = &'r [u8]>,
) -> Option<std::borrow::Cow<'r, [u8]>> {
    let first = values.next()?;
    let mut joined: Option<Vec<u8>> = None;
    for v in values {
        let j = joined.get_or_insert_with(|| first.to_vec());
        j.extend_from_slice(b", ");
        j.extend_from_slice(v);
    }
    Some(joined.map_or(std::borrow::Cow::Borrowed(first), std::borrow::Cow::Owned))
}

/// Writes the access log line of a request that has ended.
/// The client as the access log names it: the front end's REMOTE_ADDR, or the peer.
pub(super) fn log_remote(conn: &Conn, req: &Request<'_>) -> String {
    match req.cgi().and_then(|c| c.get(req.bytes, b"REMOTE_ADDR")) {
        Some(a) => String::from_utf8_lossy(a).into_owned(),
        None => conn.remote_addr.clone(),
    }
}

/// The protocol as the access log names it: the front end's SERVER_PROTOCOL,
/// or the request line's.
pub(super) fn log_protocol(req: &Request<'_>) -> String {
    match req.cgi().and_then(|c| c.get(req.bytes, b"SERVER_PROTOCOL")) {
        Some(p) => String::from_utf8_lossy(p).into_owned(),
        None => req.protocol().to_string(),
    }
}

/// What the access log line of a request that may run past --timeout
/// needs, kept as it starts: its thread may never come back to write the
/// line, so [`check_timeouts`] writes it.
pub(super) struct LogNote {
    pub(super) remote: String,
    pub(super) method: Vec<u8>,
    pub(super) target: Vec<u8>,
    pub(super) protocol: String,
    /// The request headers the log format shows.
    pub(super) headers: Vec<(String, Vec<u8>)>,
}

impl LogNote {
    pub(super) fn of(log: &AccessLog, conn: &Conn, req: &Request<'_>) -> Box<LogNote> {
        Box::new(LogNote {
            remote: log_remote(conn, req),
            method: req.method().to_vec(),
            target: req.log_target().into_owned(),
            protocol: log_protocol(req),
            headers: log
                .format
                .request_header_names()
                .into_iter()
                .filter_map(|n| request_header(req, &n).map(|v| (n, v.into_owned())))
                .collect(),
        })
    }

    /// Writes the line of the request, which ended with `status` after `micros`.
    pub(super) fn log(&self, log: &AccessLog, status: u16, bytes: u64, micros: u64) {
        let header = |name: &str| self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let none = |_: &str| -> Option<Vec<u8>> { None };
        log.log_now(&crate::access::Entry {
            remote_addr: &self.remote,
            method: &self.method,
            target: &self.target,
            protocol: &self.protocol,
            status,
            bytes,
            micros,
            request_header: &header,
            response_header: &none,
            environ: &none,
        });
    }
}

pub(super) fn log_request(log: &AccessLog, t: usize, conn: &Conn, req: &Request<'_>, took: Duration) {
    let io = conn.io.lock().unwrap();
    let remote = log_remote(conn, req);
    let request_header = |name: &str| request_header(req, name).map(std::borrow::Cow::into_owned);
    let response_header = |name: &str| -> Option<Vec<u8>> {
        let kept = io.logged_headers.as_ref()?;
        // The last of repeated ones (Set-Cookie), as gunicorn's.
        kept.iter().rev().find(|(n, _)| n == name.as_bytes()).map(|(_, v)| v.clone())
    };
    let environ = |name: &str| io.logged_environ.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let protocol = log_protocol(req);
    let target = req.log_target();
    log.log(
        t,
        &crate::access::Entry {
            remote_addr: &remote,
            method: req.method(),
            target: &target,
            protocol: &protocol,
            status: io.status,
            bytes: io.bytes_sent,
            micros: took.as_micros() as u64,
            request_header: &request_header,
            response_header: &response_header,
            environ: &environ,
        },
    );
}

/// Finishes the exchange after the app returned: completes or aborts the
/// response and decides whether the connection carries another request.
pub(super) fn complete(conn: &Conn, listener: &ListenerInfo, req: &Request<'_>) -> bool {
    complete_locked_noted(conn, listener, req, &mut conn.io.lock().unwrap())
}

/// [`complete_locked`], then the body's note in the log.
pub(super) fn complete_locked_noted(
    conn: &Conn,
    listener: &ListenerInfo,
    req: &Request<'_>,
    io: &mut Io,
) -> bool {
    let keep = complete_locked(conn, listener, req, io);
    if !io.fcgi_refused.is_empty() {
        let active = match io.wire {
            Wire::FastCgi { id, .. } => Some(id),
            _ => None,
        };
        let why = crate::gateway::concurrent_refusal(&std::mem::take(&mut io.fcgi_refused), active);
        warn!("Bad {} request from {}: {why}", listener.protocol.name(), req.peer());
    }
    if let Some(note) = io.body_note.take() {
        // A client going away is routine; a body too slow or broken is not.
        if matches!(io.body, BodyState::Failed(BodyError::Truncated)) {
            info!("{} from {}: {note}", req.describe(), req.peer());
        } else {
            warn!("{} from {}: {note}", req.describe(), req.peer());
        }
    }
    keep
}

pub(super) fn complete_locked(conn: &Conn, listener: &ListenerInfo, req: &Request<'_>, io: &mut Io) -> bool {
    // Stale handles kept by the app must not touch the next request.
    io.generation += 1;
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    if io.fcgi_aborted {
        // The front end gave up on this request (ABORT_REQUEST): it is owed
        // END_REQUEST, and the connection stays usable when it asked for that.
        info!("{} from {}: the front end aborted the request", req.describe(), req.peer());
        if io.end_fcgi_request(blocking).is_err() || !io.keep_alive {
            return false;
        }
        return true;
    }
    if io.phase == RespPhase::Idle && !io.broken && !io.aborted {
        error!("App returned without starting a response: {}", req.describe());
        io.keep_alive = false;
        io.status = 500;
        let reply = error_reply(io.wire, 500, "Internal Server Error", io.front_end_nginx);
        let _ = io.write_parts(&[&reply], blocking);
        return false;
    }

    if io.phase != RespPhase::Finished && !io.broken && !io.aborted {
        match io.finish(blocking) {
            // A client gone is routine, said as the app's write says it.
            Err(ResponseError::ClientGone(why)) if why == crate::exchange::STALLED_READER => {
                info!("{} from {}: {why}", req.describe(), req.peer())
            }
            Err(ResponseError::ClientGone(_)) if super::upkeep::cut_at_exit() => {}
            Err(ResponseError::ClientGone(why)) => {
                info!("{} from {}: client disconnected ({why})", req.describe(), req.peer())
            }
            Err(e) => warn!("{} from {}: {e}", req.describe(), req.peer()),
            Ok(()) => {}
        }
    }
    if io.aborted {
        // What was held of the response goes out before the reset, as it
        // would have without holding.
        let _ = io.flush_out(blocking);
        if let (Wire::FastCgi { id, .. }, true) = (io.wire, listener.is_unix) {
            // FastCGI has no record that says a response failed, and on a
            // unix socket, which has no reset, nginx takes a close without
            // END_REQUEST for the response's end. A record header of version
            // 0 fails the response there. (Over TCP the reset does, for
            // every front end; HAProxy would end the response normally on
            // such a header.)
            let [hi, lo] = id.to_be_bytes();
            let _ = io.write_parts(&[&[0, 6, hi, lo, 0, 0, 0, 0]], blocking);
        }
        // Reset, so the client cannot mistake a truncated body for a whole one.
        io.reset_on_close = true;
        return false;
    }
    if io.broken {
        return false;
    }
    if matches!(io.body, BodyState::Failed(_)) {
        // A FastCGI response whose END_REQUEST waited for STDIN, which broke:
        // it still gets it, or nginx fails a response the app sent whole.
        let _ = io.end_fcgi_request(blocking);
        warn_bad_stream(conn, listener, io);
        drain_and_close(io);
        return false;
    }
    if !io.keep_alive {
        if io.wire != Wire::Http && !io.body_finished() {
            if io.stdin_stops_at_response {
                // nginx sends no more of the body, and it has END_REQUEST:
                // the end of the stream tells it the response is whole (it
                // waits for it without keep-conn), and it closes its side,
                // which ends the wait for the body below. What it sent
                // meanwhile is read, so that the close is not a reset.
                let _ = io.flush_out(blocking);
                unsafe { libc::shutdown(io.fd, libc::SHUT_WR) };
            }
            // A front end may still be sending the request (the empty STDIN
            // record Apache sends after the response began, a body the app
            // ignored): read it before closing, or the close turns into a
            // reset that destroys the response the front end has not read yet.
            discard_front_end_body(io, blocking, req);
        }
        // Owed once the rest of STDIN was dropped, or given up on.
        let _ = io.end_fcgi_request(blocking);
        warn_bad_stream(conn, listener, io);
        if !io.body_finished() || !io.buf.is_empty() {
            drain_and_close(io);
        }
        return false;
    }
    if !io.body_finished() {
        // Discard what the app did not read so the next request parses from
        // the right byte. From a client, what has not come yet is dropped
        // as it comes, from the event loop: a thread waiting for it would
        // serve no one else meanwhile.
        let discarded = if io.wire == Wire::Http {
            io.discard_until = mono_ms() + DRAIN_WAIT.as_millis() as u64;
            io.discarded = 0;
            discard_available(io)
        } else {
            discard_body(io, blocking)
        };
        match discarded {
            Discarded::All => {}
            Discarded::Later => io.discard_what = format!("{} from {}", req.describe(), req.peer()),
            Discarded::Failed => {
                log_discard_failed(peer(conn, listener), io);
                // As above: the STDIN broke (or was aborted) while dropped.
                let _ = io.end_fcgi_request(blocking);
                warn_bad_stream(conn, listener, io);
                return false;
            }
            Discarded::GaveUp(why) => {
                // The response promised to keep the connection: say why it closes.
                log_discard_gave_up(&format!("{} from {}", req.describe(), req.peer()), why);
                let _ = io.end_fcgi_request(blocking);
                drain_and_close(io);
                return false;
            }
        }
    }
    // A FastCGI response whose END_REQUEST waited for the rest of STDIN
    // (a no-op for any other, and for one that has sent it).
    if io.end_fcgi_request(blocking).is_err() || !io.keep_alive {
        return false;
    }
    true
}
