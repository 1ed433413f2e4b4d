//! Reading a request's head (HTTP/1.x, a PROXY header, or a front end's
//! uwsgi, FastCGI or SCGI request) and refusing what cannot be served.

use super::*;

/// Whether an incomplete head, `parsed` bytes of which were looked at before,
/// may have become complete or bad with what `buf` has now. Parsing it all
/// again after every read would cost a client dribbling a large head in
/// small pieces the square of its size; only an empty line ends a head, and
/// past the request line only the size limit refuses one unseen.
pub(super) fn worth_parsing(buf: &[u8], parsed: usize, limits: &http1::Limits) -> bool {
    let parsed = parsed.min(buf.len());
    let new = &buf[parsed.saturating_sub(3)..];
    // Whether the request line had not ended before these bytes: looked up
    // only when it matters, and the look stops at the line's end.
    let line_open = || !buf[..parsed].contains(&b'\n');
    parsed == 0
        // A request line still open, and short (parsed at each read, so that
        // bytes that cannot start a request, TLS to an HTTP port, get their
        // 400 at once), ended now, or over the limit. Parsing a long one again
        // after every read would cost the square of its length
        // (--limit-request-line allows 1 MiB).
        || ((parsed <= EARLY_LOOK || new.contains(&b'\n') || buf.len() > limits.max_request_line + 2)
            && line_open())
        || new.windows(2).any(|w| w == b"\n\n")
        || new.windows(3).any(|w| w == b"\n\r\n")
        || buf.len() > limits.max_head_bytes()
        // A header line over its limit and still unfinished (a look back of
        // at most the limit's length).
        || (buf.len() > limits.max_header_line
            && !buf[buf.len() - limits.max_header_line - 1..].contains(&b'\n')
            && !line_open())
}

/// Whether `buf` holds nothing but empty lines (CRLF), as a client sends
/// after a body now and then. RFC 9112 (2.2) has a server ignore them
/// before a request line; kept, they would make an idle connection look
/// like one inside a request (held to the header timeout rather than the
/// keep-alive one, and by a graceful stop).
fn only_empty_lines(buf: &[u8]) -> bool {
    !buf.is_empty() && buf.len() % 2 == 0 && buf.chunks(2).all(|pair| pair == b"\r\n")
}

/// How much of an unfinished request line is parsed again at every read.
pub(super) const EARLY_LOOK: usize = http1::DEFAULT_MAX_REQUEST_LINE;

/// Reads until a whole head is buffered, the socket is drained, or the head is bad.
pub(super) fn read_head<A: App>(w: &Shared<A>, conn: &mut Conn) -> Next {
    let io_arc = conn.io.clone();
    let mut io = io_arc.lock().unwrap();
    if io.lingering {
        match linger_read(&mut io) {
            Linger::Wait => return Next::Park,
            Linger::TimeUp => info!(
                "{}: closing the connection: its client was still sending {} s after the response \
                 ({} bytes read in all)",
                peer(conn, &w.listeners[conn.listener].1),
                LINGER_TIME.as_secs(),
                io.read_total
            ),
            Linger::Done => {}
        }
        io.lingering = false;
        return Next::Close;
    }
    if io.discard_until != 0 {
        if let Some(next) = go_on_discarding(w, conn, &mut io) {
            return next;
        }
    }
    let mut read_once = false;
    let mut want = READ_CHUNK;
    let mut head_len = None;
    loop {
        if !conn.proxy_pending && only_empty_lines(&io.buf) {
            io.buf.clear();
        }
        if conn.proxy_pending && !io.buf.is_empty() {
            if let Some(next) = take_proxy_header(w, conn, &mut io) {
                return next;
            }
        }
        let worth = !conn.proxy_pending
            && !io.buf.is_empty()
            && (head_len.is_some()
                || conn.head_ready
                || worth_parsing(&io.buf, conn.parsed_upto, &w.config.limits));
        // Looked at either way: the next check starts after these bytes.
        conn.parsed_upto = io.buf.len();
        if worth {
            match http1::parse_head(&io.buf, &w.config.limits, &mut conn.head) {
                Ok(Status::Complete((), n)) => {
                    // A small body is read before the app runs, like the head:
                    // a slow client then ties up a connection, never a thread.
                    let missing = match conn.head.framing {
                        BodyFraming::Length(len)
                            if len <= PREREAD_MAX.min(w.config.max_body_size)
                                && !conn.head.expect_continue =>
                        {
                            (n as u64 + len).saturating_sub(io.buf.len() as u64)
                        }
                        _ => 0,
                    };
                    conn.head_charge.set(0);
                    if missing == 0 {
                        conn.parsed_upto = 0;
                        conn.head_ready = false;
                        return Next::Request(n);
                    }
                    if conn.head_done == 0 {
                        conn.head_done = mono_ms();
                    }
                    conn.head_ready = true;
                    head_len = Some(n);
                    want = missing as usize;
                }
                Ok(Status::Partial) => {}
                Err(e) => {
                    info!(
                        "Bad request from {}: {e} ({} {})",
                        peer(conn, &w.listeners[conn.listener].1),
                        e.status(),
                        reason(e.status())
                    );
                    let blocking: fn(&mut dyn FnMut()) = |f| f();
                    let reply = error_response(e.status(), &e.to_string());
                    let _ = io.write_parts(&[&reply], blocking);
                    record_refusal(w, Ok(conn), conn.listener, &io.buf, e.status(), &reply);
                    drain_and_close(&mut io);
                    return Next::Close;
                }
            }
        }
        // A head not ended yet (parsed above, or not worth parsing) holds
        // its share of the worker's budget for such heads.
        if head_len.is_none() && !conn.head_ready && !conn.proxy_pending && !io.buf.is_empty() {
            let total = conn.head_charge.set(io.buf.len());
            if io.buf.len() > HEAD_FAIR_SHARE && total > HEAD_BUDGET {
                info!(
                    "Request head refused from {}: {} KiB and not ended, while this worker holds \
                     {} MiB of unfinished request heads (at most {} MiB) (431 {})",
                    peer(conn, &w.listeners[conn.listener].1),
                    io.buf.len() >> 10,
                    total >> 20,
                    HEAD_BUDGET >> 20,
                    reason(431)
                );
                let reply = error_response(431, "request header fields too large");
                let _ = io.write_parts(&[&reply], |f| f());
                record_refusal(w, Ok(conn), conn.listener, &io.buf, 431, &reply);
                drain_and_close(&mut io);
                conn.head_charge.set(0);
                return Next::Close;
            }
        }
        // Draining, a kept-alive connection found idle closes. A new one
        // (its PROXY header taken, nothing else yet) waits for its request.
        if draining() && io.buf.is_empty() && read_once && !conn.entry.fresh.load(Ordering::Relaxed) {
            return Next::Close;
        }
        let was_empty = io.buf.is_empty();
        match io.read_some(want) {
            // The client half-closed inside a small body: run the request
            // anyway so the app sees the short body (and the log says so)
            // rather than the client getting no answer at all.
            Ok(0) => return head_len.map_or(Next::Close, Next::Request),
            Ok(_) => {
                read_once = true;
                if was_empty {
                    conn.request_started = mono_ms();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Past the linger, an idle connection closes, unless a sibling
                // can take it: then it is parked for the sweeper to hand over
                // (its inbox may be full for a moment).
                if io.buf.is_empty()
                    && idle_linger_over()
                    && !conn.entry.fresh.load(Ordering::Relaxed)
                    && !can_hand_over(w)
                {
                    return Next::Close;
                }
                if !io.buf.is_empty() {
                    io.ack_now();
                }
                return Next::Park;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("read from {}: {e}", peer(conn, &w.listeners[conn.listener].1));
                return Next::Close;
            }
        }
    }
}

/// Looks for a PROXY protocol header at the start of a new connection
/// (`--proxy-protocol`): one from an allowed peer is taken off the buffer
/// and its client address becomes the connection's; none at all means the
/// client speaks HTTP at once. Returns what to do when the connection
/// cannot go on to its request head.
pub(super) fn take_proxy_header<A: App>(w: &Shared<A>, conn: &mut Conn, io: &mut Io) -> Option<Next> {
    let listener = &w.listeners[conn.listener].1;
    let (status, why) = match corral_proto::proxy::parse(&io.buf) {
        Err(corral_proto::proxy::Error::NotProxy) => {
            conn.proxy_pending = false;
            return None;
        }
        Ok(Status::Partial) => return None,
        _ if !w.config.proxy_allow.trusts(&conn.peer_addr, listener.is_unix) => {
            (403, "a PROXY header from a peer not in --proxy-allow-from".to_string())
        }
        Ok(Status::Complete(header, n)) => {
            io.buf.advance(n);
            conn.parsed_upto = 0;
            conn.proxy_pending = false;
            if let Some(client) = header.source {
                set_proxy_client(conn, client);
            }
            return None;
        }
        Err(e) => (400, e.to_string()),
    };
    info!("Bad request from {}: {why} ({status} {})", peer(conn, listener), reason(status));
    let reply = error_response(status, &why);
    let _ = io.write_parts(&[&reply], |f| f());
    record_refusal(w, Ok(conn), conn.listener, &io.buf, status, &reply);
    drain_and_close(io);
    Some(Next::Close)
}

/// Makes the client a PROXY header named the connection's REMOTE_ADDR and
/// REMOTE_PORT, for good (also when the connection is handed over).
pub(super) fn set_proxy_client(conn: &mut Conn, client: std::net::SocketAddr) {
    // A dual-stack balancer may name an IPv4 client as ::ffff:a.b.c.d.
    let ip = match client.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client.ip(), std::net::IpAddr::V4),
        ip => ip,
    };
    let client = std::net::SocketAddr::new(ip, client.port());
    conn.remote_addr = ip.to_string();
    conn.remote_port = client.port().to_string();
    let _ = conn.entry.proxy_client.set(client);
}

/// Reads until a front end's request variables are complete (uwsgi, SCGI,
/// FastCGI), answering FastCGI management records on the way.
pub(super) fn read_gateway<A: App>(w: &Shared<A>, conn: &mut Conn) -> Next {
    let listener = &w.listeners[conn.listener].1;
    let protocol = listener.protocol;
    let io_arc = conn.io.clone();
    let mut io = io_arc.lock().unwrap();
    let mut read_once = false;
    let mut want = READ_CHUNK;
    loop {
        // Set when a uwsgi/SCGI head is complete but its small body is not;
        // park() gives the connection a body's deadline then.
        conn.head_ready = false;
        if !io.buf.is_empty() {
            match parse_gateway(w, conn, &mut io, &mut want) {
                Ok(Some(req)) => return Next::Gateway(req),
                Ok(None) => {}
                Err(next) => return next,
            }
        }
        // Unfinished variables (in the buffer, or FastCGI PARAMS taken into
        // the connection's state) hold their share of the same budget as
        // HTTP heads: each may reach the protocols' 1 MiB.
        let unfinished = if conn.head_ready { 0 } else { io.buf.len() + conn.fcgi.params.len() };
        let total = conn.head_charge.set(unfinished);
        if unfinished > HEAD_FAIR_SHARE && total > HEAD_BUDGET {
            let why = format!(
                "request variables refused: {} KiB and not ended, while this worker holds {} MiB of \
                 unfinished request heads (at most {} MiB)",
                unfinished >> 10,
                total >> 20,
                HEAD_BUDGET >> 20
            );
            conn.head_charge.set(0);
            let wire = match (protocol, conn.fcgi.active) {
                (Protocol::Uwsgi, _) => Wire::Uwsgi,
                (Protocol::Scgi, _) => Wire::Scgi,
                (_, Some((id, keep_conn))) => Wire::FastCgi { id, keep_conn },
                (_, None) => {
                    warn!(
                        "Bad {} request from {}: {why}; closing the connection",
                        protocol.name(),
                        peer(conn, listener)
                    );
                    drain_and_close(&mut io);
                    return Next::Close;
                }
            };
            return refuse(w, conn, &mut io, wire, 431, &why, None);
        }
        // Draining with no sibling to take it, a kept FastCGI connection that
        // brought no request (only records of one already answered, such as
        // a body's closing empty STDIN) closes; one whose request came in
        // part (its records so far are in the connection's FastCGI state, not
        // in the buffer) reads the rest. With a sibling serving, it is read
        // on and parked, to be handed over: closed, the front end's next
        // request, perhaps on its way already (Apache writes it as soon as
        // it has the response), would be lost with it.
        if draining() && io.buf.is_empty() && read_once && conn.fcgi.active.is_none() && !can_hand_over(w) {
            return Next::Close;
        }
        let was_empty = io.buf.is_empty();
        match io.read_some(want) {
            Ok(0) if conn.head_ready => {
                // Closed inside a small body: the app still gets the request,
                // and its read of the body fails where the bytes end, as with
                // a larger body (the log says so).
                return take_short_gateway_request(&mut io, protocol);
            }
            Ok(0) => {
                if !io.buf.is_empty() || conn.fcgi.active.is_some() {
                    warn!(
                        "Bad {} request from {}: connection closed inside the request",
                        protocol.name(),
                        peer(conn, listener)
                    );
                }
                return Next::Close;
            }
            Ok(_) => {
                read_once = true;
                // The header timeout counts from the first bytes of a request
                // on a kept connection (from the accept on a new one), not
                // from each read: FastCGI records leave the buffer as they
                // are taken, so a peer sending one record at a time, or only
                // management records, would never reach it.
                if was_empty && conn.fcgi.active.is_none() && !conn.entry.fresh.load(Ordering::Relaxed) {
                    conn.request_started = mono_ms();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if io.buf.is_empty()
                    && conn.fcgi.active.is_none()
                    && idle_linger_over()
                    && !conn.entry.fresh.load(Ordering::Relaxed)
                    && !can_hand_over(w)
                {
                    return Next::Close;
                }
                if !io.buf.is_empty() || conn.fcgi.active.is_some() {
                    io.ack_now();
                }
                return Next::Park;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("read from {}: {e}", peer(conn, listener));
                return Next::Close;
            }
        }
    }
}

/// Looks for a whole request in the buffer (or, for FastCGI, in the records
/// so far): `Ok(None)` while more must be read, with `want` what a small
/// body still needs; `Err` with what the connection does next when the
/// request is refused or the peer broke the protocol (said in the log).
fn parse_gateway<A: App>(
    w: &Shared<A>,
    conn: &mut Conn,
    io: &mut Io,
    want: &mut usize,
) -> Result<Option<GatewayRequest>, Next> {
    let listener = &w.listeners[conn.listener].1;
    let protocol = listener.protocol;
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    let parsed = match protocol {
        Protocol::Uwsgi | Protocol::Scgi => {
            let (head, wire) = if protocol == Protocol::Uwsgi {
                (gateway::uwsgi_head(&io.buf), Wire::Uwsgi)
            } else {
                (gateway::scgi_head(&io.buf), Wire::Scgi)
            };
            match head {
                Ok(Some(head)) => {
                    let len = match cgi::check(&head.params, &io.buf) {
                        Ok(len) => len.unwrap_or(0),
                        Err(e) => {
                            let parsed = (head.params, io.buf[..head.len].to_vec());
                            return Err(refuse(w, conn, io, wire, e.status(), &e.to_string(), Some(parsed)));
                        }
                    };
                    // A small body is read before the app runs, as over HTTP.
                    let missing = if len <= PREREAD_MAX.min(w.config.max_body_size) {
                        (head.len as u64 + len).saturating_sub(io.buf.len() as u64)
                    } else {
                        0
                    };
                    if missing == 0 {
                        let bytes = io.buf.split_to(head.len).freeze();
                        let body = if len == 0 { BodyState::Done } else { BodyState::Length(len) };
                        Ok(Some(GatewayRequest { bytes, params: head.params, wire, body }))
                    } else {
                        *want = missing as usize;
                        if conn.head_done == 0 {
                            conn.head_done = mono_ms();
                        }
                        conn.head_ready = true;
                        Ok(None)
                    }
                }
                Ok(None) => Ok(None),
                Err(e) => match e.status {
                    // The block was whole: the front end gets a
                    // status to show for it rather than a 502.
                    Some(status) => return Err(refuse(w, conn, io, wire, status, &e.message, None)),
                    None => Err(e.message),
                },
            }
        }
        _ => {
            let mut out = Vec::new();
            match gateway::fcgi_head(&mut conn.fcgi, &io.buf, &mut out) {
                Ok((used, req)) => {
                    io.buf.advance(used);
                    for refused in std::mem::take(&mut conn.fcgi.refused) {
                        warn!("Bad fastcgi request from {}: {}", peer(conn, listener), refused.why);
                        if let Some((status, reply)) = &refused.answered {
                            record_refusal(w, Ok(conn), conn.listener, b"", *status, reply);
                        }
                        // Answered: the connection is between requests, on
                        // the keep-alive clock, no longer a new one.
                        conn.entry.fresh.store(false, Ordering::Relaxed);
                        unpromise(w, &conn.entry);
                    }
                    if req.is_some() || conn.fcgi.active.is_some() {
                        conn.fcgi.chatter = false;
                    } else if used > 0 {
                        conn.fcgi.chatter = true;
                    }
                    if !out.is_empty() && io.write_parts(&[&out], blocking).is_err() {
                        return Err(Next::Close);
                    }
                    if conn.fcgi.close_after {
                        return Err(Next::Close);
                    }
                    match req {
                        Some(r) => {
                            let wire = Wire::FastCgi { id: r.id, keep_conn: r.keep_conn };
                            let left = match cgi::check(&r.params, &r.params_bytes) {
                                Ok(len) => len,
                                Err(e) => {
                                    // The refusal's ending depends on it (begin_request sets
                                    // it for a request that goes on).
                                    io.front_end_nginx =
                                        super::request::nginx_sent(&r.params, &r.params_bytes);
                                    let why = e.to_string();
                                    let parsed = Some((r.params, r.params_bytes.to_vec()));
                                    return Err(refuse(w, conn, io, wire, e.status(), &why, parsed));
                                }
                            };
                            Ok(Some(GatewayRequest {
                                bytes: Bytes::from(r.params_bytes),
                                params: r.params,
                                wire,
                                body: BodyState::Fcgi(FcgiIn {
                                    content: 0,
                                    padding: 0,
                                    ended: false,
                                    left,
                                    surplus: 0,
                                }),
                            }))
                        }
                        None => Ok(None),
                    }
                }
                Err(m) => Err(m),
            }
        }
    };
    match parsed {
        Ok(Some(req)) => {
            conn.head_charge.set(0);
            Ok(Some(req))
        }
        Ok(None) => Ok(None),
        Err(m) => {
            warn!(
                "Bad {} request from {}: {m}; closing the connection",
                protocol.name(),
                peer(conn, listener)
            );
            drain_and_close(io);
            Err(Next::Close)
        }
    }
}

/// A uwsgi/SCGI request whose front end closed inside its body.
pub(super) fn take_short_gateway_request(io: &mut Io, protocol: Protocol) -> Next {
    let (head, wire) = if protocol == Protocol::Uwsgi {
        (gateway::uwsgi_head(&io.buf), Wire::Uwsgi)
    } else {
        (gateway::scgi_head(&io.buf), Wire::Scgi)
    };
    let Ok(Some(head)) = head else {
        return Next::Close;
    };
    let Ok(len) = cgi::check(&head.params, &io.buf) else {
        return Next::Close;
    };
    let bytes = io.buf.split_to(head.len).freeze();
    let body = BodyState::Length(len.unwrap_or(0));
    Next::Gateway(GatewayRequest { bytes, params: head.params, wire, body })
}

/// Answers a gateway request that cannot be served with an error response
/// in the protocol's framing, logs why, and closes the connection. `parsed`:
/// the request's variables (and the bytes they index), when they parsed,
/// for its access-log line to name its client and target as the front end
/// gave them.
pub(super) fn refuse<A: App>(
    w: &Shared<A>,
    conn: &Conn,
    io: &mut Io,
    wire: Wire,
    status: u16,
    why: &str,
    parsed: Option<(cgi::CgiParams, Vec<u8>)>,
) -> Next {
    let listener = &w.listeners[conn.listener].1;
    warn!(
        "Bad {} request from {}: {why} ({status} {})",
        listener.protocol.name(),
        peer(conn, listener),
        reason(status)
    );
    let blocking: fn(&mut dyn FnMut()) = |f| f();
    // Kept, once its parameters ended: records of them still to come are
    // not a body to drop.
    if let (Wire::FastCgi { id, keep_conn: true }, None, true) =
        (wire, conn.fcgi.active, fastcgi_conn_may_stay())
    {
        let (reply, kept) = refuse_kept_fcgi(io, id, status, why, false, blocking);
        record(w, conn, &io.buf, &parsed, status, &reply);
        if kept {
            return Next::Refused;
        }
        drain_and_close(io);
        return Next::Close;
    }
    let reply = error_reply(wire, status, why, io.front_end_nginx);
    let _ = io.write_parts(&[&reply], blocking);
    record(w, conn, &io.buf, &parsed, status, &reply);
    drain_and_close(io);
    Next::Close
}

/// The access-log line (and metrics) of a refused gateway request: with its
/// variables, when they parsed, as the request's own line would be.
fn record<A: App>(
    w: &Shared<A>,
    conn: &Conn,
    buf: &[u8],
    parsed: &Option<(cgi::CgiParams, Vec<u8>)>,
    status: u16,
    reply: &[u8],
) {
    let Some((params, bytes)) = parsed else {
        return record_refusal(w, Ok(conn), conn.listener, buf, status, reply);
    };
    let req = Request {
        meta: Meta::Cgi(params),
        bytes,
        remote_addr: &conn.remote_addr,
        remote_port: &conn.remote_port,
        listener: &w.listeners[conn.listener].1,
        listener_index: conn.listener,
        forwarded_https: false,
        forwarded_prefix: false,
    };
    record_refused_request(w, conn, &req, status, reply);
}

#[cfg(test)]
mod tests {
    use super::{only_empty_lines, worth_parsing};

    #[test]
    fn only_whole_empty_lines_are_dropped_between_requests() {
        assert!(only_empty_lines(b"\r\n"));
        assert!(only_empty_lines(b"\r\n\r\n"));
        // Nothing, half an empty line, or a request after them: kept.
        assert!(!only_empty_lines(b""));
        assert!(!only_empty_lines(b"\r"));
        assert!(!only_empty_lines(b"\r\n\r"));
        assert!(!only_empty_lines(b"\n\n"));
        assert!(!only_empty_lines(b"\r\nGET / HTTP/1.1\r\n"));
    }

    use corral_proto::http1::Limits;

    #[test]
    fn an_incomplete_head_is_parsed_again_only_when_it_may_have_ended() {
        let limits = Limits::default();
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n";
        // First bytes, and the request line still coming: parsed.
        assert!(worth_parsing(&head[..5], 0, &limits));
        assert!(worth_parsing(&head[..10], 5, &limits));
        // More fields: nothing can have ended.
        assert!(!worth_parsing(&head[..30], 20, &limits));
        // The empty line, also when it straddles two reads.
        let mut whole = head.to_vec();
        whole.extend_from_slice(b"\r\n");
        assert!(worth_parsing(&whole, head.len(), &limits));
        assert!(worth_parsing(&whole, head.len() + 1, &limits));
        assert!(worth_parsing(b"GET / HTTP/1.0\n\n", 15, &limits));
        // Past the size limit, the parser refuses it.
        let mut big = head.to_vec();
        big.resize(limits.max_head_bytes() + 1, b'a');
        assert!(worth_parsing(&big, head.len(), &limits));
        // A long request line (as --limit-request-line 0 allows): parsed
        // again when it ends or passes the limit, not at every read.
        let long = Limits { max_request_line: 1 << 20, ..Limits::default() };
        let mut line = b"GET /".to_vec();
        line.resize(100_000, b'a');
        assert!(!worth_parsing(&line, 90_000, &long));
        line.extend_from_slice(b" HTTP/1.1\r\n");
        assert!(worth_parsing(&line, 100_000, &long));
        let mut over = b"GET /".to_vec();
        over.resize((1 << 20) + 3, b'a');
        assert!(worth_parsing(&over, 1 << 20, &long));
    }
}
