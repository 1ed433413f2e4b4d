//! Error replies the server makes itself (400, 413, 503, ...), in the
//! wire format of the connection's protocol, and their access-log lines.

use super::*;

/// A response the engine wrote itself to a request it would not pass to the
/// app (malformed, too large, over the connection limit): counted in the
/// metrics and given an access log line like any other. `head` is what was
/// read of the request; an HTTP request line in it gives the method and
/// target, when it has one.
pub(super) fn record_refusal<A: App>(
    w: &Shared<A>,
    conn: Result<&Conn, &str>,
    idx: usize,
    head: &[u8],
    status: u16,
    reply: &[u8],
) {
    let listener = &w.listeners[idx].1;
    // The body's bytes, as for the app's responses and the access log.
    let sent = body_length(reply);
    let started = conn.map_or(mono_ms(), |c| c.request_started);
    // A connection refused before it became one (over the limit) has only
    // its address.
    let conn = conn.map_err(|client| if client.is_empty() { "-" } else { client });
    let micros = mono_ms().saturating_sub(started) * 1000;
    w.scoreboard.record(w.slot, listener.protocol as usize, status, micros, head.len() as u64, sent);
    w.scoreboard.count_refused(w.slot);
    let Some(log) = &w.access else { return };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (method, target, protocol) = match (listener.protocol, parts.next(), parts.next(), parts.next()) {
        (Protocol::Http, Some(m), Some(t), Some(p)) if p.starts_with(b"HTTP/") => {
            (m, t, String::from_utf8_lossy(p).into_owned())
        }
        _ => (&b"-"[..], &b"-"[..], "-".to_string()),
    };
    let none = |_: &str| -> Option<Vec<u8>> { None };
    // The header lines read, as far as they go: a refused request's
    // User-Agent is often what tells a scanner from a broken client.
    let http = listener.protocol == Protocol::Http;
    let request_header = |name: &str| -> Option<Vec<u8>> {
        head.split(|&b| b == b'\n').skip(1).filter(|_| http).find_map(|l| {
            let (n, v) = l.split_at(l.iter().position(|&b| b == b':')?);
            n.eq_ignore_ascii_case(name.as_bytes()).then(|| v[1..].trim_ascii().to_vec())
        })
    };
    log.log_now(&crate::access::Entry {
        remote_addr: conn.map_or_else(|client| client, |c| c.remote_addr.as_str()),
        method,
        target,
        protocol: &protocol,
        status,
        // As for the app's responses: the body's bytes, not the head's.
        bytes: body_length(reply),
        micros,
        request_header: &request_header,
        response_header: &none,
        environ: &none,
    });
}

/// [`record_refusal`] for a request parsed whole (refused for what it
/// declares): its line names the client, method, target and headers as the
/// request's own line would, the front end's variables included.
pub(super) fn record_refused_request<A: App>(
    w: &Shared<A>,
    conn: &Conn,
    req: &Request<'_>,
    status: u16,
    reply: &[u8],
) {
    let micros = mono_ms().saturating_sub(conn.request_started) * 1000;
    let protocol = req.listener.protocol as usize;
    let sent = body_length(reply);
    w.scoreboard.record(w.slot, protocol, status, micros, req.bytes.len() as u64, sent);
    w.scoreboard.count_refused(w.slot);
    if let Some(log) = &w.access {
        LogNote::of(log, conn, req).log(log, status, sent, micros);
    }
}

/// What the 408 for a small body read ahead of the app that came too
/// slowly says.
pub(super) const SLOW_BODY: &str = "the request body came too slowly";

/// The body length an error reply of [`error_reply`] declares (each has a
/// Content-Length, inside its FastCGI record too): what the access log counts.
pub(super) fn body_length(reply: &[u8]) -> u64 {
    const FIELD: &[u8] = b"Content-Length: ";
    reply
        .windows(FIELD.len())
        .position(|w| w == FIELD)
        .map(|i| &reply[i + FIELD.len()..])
        .map(|rest| {
            rest.iter().take_while(|b| b.is_ascii_digit()).fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'))
        })
        .unwrap_or(0)
}

pub(super) fn peer(conn: &Conn, l: &ListenerInfo) -> String {
    l.peer(&conn.remote_addr, &conn.remote_port)
}

pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The body of the error responses corral writes itself.
pub(super) fn error_body(status: u16, detail: &str) -> String {
    format!("{status} {}: {detail}\n", reason(status))
}

/// Answers a request refused before the app on a kept FastCGI connection
/// (FCGI_KEEP_CONN) and says whether the connection goes on to the front
/// end's next request. The specification leaves the close to the web server,
/// and HAProxy's connection pool and nginx's upstream keepalive send their
/// next request on it. As for an app's answer, END_REQUEST waits for the
/// rest of this request's STDIN, dropped meanwhile: Apache, given it
/// earlier, stops sending the body and begins its next request in the middle
/// of it. The answer (without END_REQUEST) is returned, for the access log.
pub(super) fn refuse_kept_fcgi(
    io: &mut Io,
    id: u16,
    status: u16,
    why: &str,
    body_begun: bool,
    blocking: fn(&mut dyn FnMut()),
) -> (Vec<u8>, bool) {
    let mut reply = Vec::new();
    fastcgi::write_stdout(&mut reply, id, &cgi_error_response(status, why));
    fastcgi::write_stream_end(&mut reply, fastcgi::RecordType::Stdout, id);
    if io.write_parts(&[&reply], blocking).is_err() {
        return (reply, false);
    }
    if !body_begun {
        // Refused from its parameters: no body state was set up for it (what
        // is there is the previous request's).
        io.wire = Wire::FastCgi { id, keep_conn: true };
        io.body = BodyState::Fcgi(crate::gateway::FcgiIn {
            content: 0,
            padding: 0,
            ended: false,
            left: None,
            surplus: 0,
        });
    }
    let dropped = matches!(discard_body(io, blocking), Discarded::All);
    // Owed however the drop ended.
    let mut end = Vec::with_capacity(16);
    fastcgi::write_end_request(&mut end, id, 0, fastcgi::ProtocolStatus::RequestComplete);
    let sent = io.write_parts(&[&end], blocking).is_ok();
    io.fcgi_ended = true;
    io.keep_alive = dropped && sent;
    (reply, dropped && sent)
}

/// A complete error response in a connection's framing: HTTP for HTTP and
/// uwsgi, CGI headers for SCGI, and those in STDOUT records followed by
/// END_REQUEST for FastCGI. `nginx`: the front end is nginx (see
/// `Io::front_end_nginx`).
pub(super) fn error_reply(wire: Wire, status: u16, detail: &str, nginx: bool) -> Vec<u8> {
    let cgi_response = || cgi_error_response(status, detail);
    match wire {
        Wire::Http | Wire::Uwsgi => error_response(status, detail),
        Wire::Scgi => cgi_response(),
        Wire::FastCgi { id, keep_conn } => {
            let mut out = Vec::new();
            fastcgi::write_stdout(&mut out, id, &cgi_response());
            fastcgi::write_stream_end(&mut out, fastcgi::RecordType::Stdout, id);
            fastcgi::write_end_request(&mut out, id, 0, fastcgi::ProtocolStatus::RequestComplete);
            if keep_conn && nginx {
                // The connection closes after it, though nginx asked to keep
                // it: a record behind END_REQUEST keeps it out of nginx's
                // pool (see `Io::push_last_notice`), which would send its
                // next request on it as it closes (a 502).
                let _ = fastcgi::write_get_values_result(&mut out, &[]);
            }
            out
        }
    }
}

/// An error response as a CGI-style head (a Status header) and body.
pub(crate) fn cgi_error_response(status: u16, detail: &str) -> Vec<u8> {
    let body = error_body(status, detail);
    let mut out = format!(
        "Status: {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// A complete error response that closes the connection.
pub fn error_response(status: u16, detail: &str) -> Vec<u8> {
    let body = error_body(status, detail);
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n");
    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    crate::date::append_date_header(&mut out);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}
