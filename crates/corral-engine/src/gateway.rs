//! Reading requests that a front end sends over uwsgi, FastCGI or SCGI.
//!
//! The codecs in `corral-proto` parse bytes; this module applies them to a
//! connection's buffer: it finds where a request's variables end and its
//! body begins, keeps the FastCGI connection state between reads, and
//! answers the management records FastCGI allows at any time. It does no
//! I/O itself: answers are appended to an output buffer the worker writes.

use std::ops::Range;

use bytes::BytesMut;

use corral_proto::fastcgi::{self, ProtocolStatus, RecordType, Role};
use corral_proto::{scgi, uwsgi, Status};

use crate::cgi::CgiParams;

/// Where a FastCGI STDIN stream stands between reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FcgiIn {
    /// Content bytes left in the current STDIN record.
    pub content: usize,
    /// Padding bytes left after it.
    pub padding: usize,
    /// The empty STDIN record arrived: the body ends after the padding.
    pub ended: bool,
    /// Body bytes CONTENT_LENGTH still announces (`None` without one): the
    /// app reads no further, as PEP 3333 asks, and STDIN beyond it is dropped.
    pub left: Option<u64>,
    /// STDIN bytes dropped past CONTENT_LENGTH.
    pub surplus: u64,
}

impl FcgiIn {
    /// Whether every body byte CONTENT_LENGTH announced was read, to the end
    /// of its record, and nothing more came: only the end record is owed.
    pub fn declared_in(&self) -> bool {
        self.left == Some(0) && self.content == 0 && self.padding == 0 && self.surplus == 0 && !self.ended
    }
}

/// What the FastCGI reader learned from the next record in the buffer.
pub(crate) enum StdinStep {
    /// A STDIN record of the active request: skip `header` bytes, then
    /// `content` bytes of body and `padding` bytes to drop.
    Data { header: usize, content: usize, padding: usize },
    /// A whole record of another kind, `used` bytes long, to pass to
    /// [`stray_record`].
    Other { used: usize, stray: Stray },
}

/// What a record that is not part of the active request's streams means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stray {
    Ignore,
    /// ABORT_REQUEST for the active request.
    AbortActive,
    /// A BEGIN_REQUEST for another id, refused with CANT_MPX_CONN.
    Concurrent(u16),
    /// A BEGIN_REQUEST for the active request's own id: the front end lost
    /// track of its requests, and nothing after it can be trusted.
    BegunTwice,
}

/// Looks at the next record while a STDIN stream is read. `Ok(None)` when
/// the record is not all there yet (for STDIN, the header is enough).
pub(crate) fn next_stdin(buf: &[u8], active: u16) -> Result<Option<StdinStep>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != fastcgi::VERSION {
        return Err("record with an unknown FastCGI version");
    }
    if buf.len() < fastcgi::HEADER_LEN {
        return Ok(None);
    }
    let kind = RecordType::from_u8(buf[1]);
    let id = u16::from_be_bytes([buf[2], buf[3]]);
    let content = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    let padding = usize::from(buf[6]);
    if kind == RecordType::Stdin && id == active {
        return Ok(Some(StdinStep::Data { header: fastcgi::HEADER_LEN, content, padding }));
    }
    let used = fastcgi::HEADER_LEN + content + padding;
    if buf.len() < used {
        return Ok(None);
    }
    let stray =
        if kind == RecordType::AbortRequest && id == active { Stray::AbortActive } else { Stray::Ignore };
    Ok(Some(StdinStep::Other { used, stray }))
}

/// Deals with a whole record that belongs to no stream of the active
/// request: answers management records and second requests, and says
/// whether it aborts the active one. `rec` is the record with its padding.
pub(crate) fn stray_record(rec: &[u8], active: Option<u16>, out: &mut Vec<u8>) -> Stray {
    let Ok(Status::Complete(r, _)) = fastcgi::parse_record(rec) else {
        return Stray::Ignore;
    };
    match r.kind {
        RecordType::GetValues if r.request_id == fastcgi::NULL_REQUEST_ID => get_values(r.content, out),
        RecordType::Unknown(t) => fastcgi::write_unknown_type(out, t),
        RecordType::BeginRequest if Some(r.request_id) != active => {
            // One request at a time per connection: the front end must use
            // another connection (FCGI_MPXS_CONNS is 0).
            fastcgi::write_end_request(out, r.request_id, 0, ProtocolStatus::CantMpxConn);
            return Stray::Concurrent(r.request_id);
        }
        RecordType::BeginRequest => return Stray::BegunTwice,
        RecordType::AbortRequest if Some(r.request_id) == active => return Stray::AbortActive,
        // Streams of requests refused earlier, DATA (FILTER role only), and
        // records only an application sends: nothing to do.
        _ => {}
    }
    Stray::Ignore
}

/// Answers GET_VALUES truthfully for the variables asked about.
fn get_values(content: &[u8], out: &mut Vec<u8>) {
    let reqs = MAX_REQS.load(std::sync::atomic::Ordering::Relaxed).to_string();
    let conns = MAX_CONNS.load(std::sync::atomic::Ordering::Relaxed).to_string();
    let mut answer: Vec<(&[u8], &[u8])> = Vec::new();
    if let Ok(pairs) = fastcgi::parse_pairs(content) {
        for (name, _) in pairs {
            let value: &[u8] = match name {
                fastcgi::MAX_CONNS => conns.as_bytes(),
                fastcgi::MAX_REQS => reqs.as_bytes(),
                fastcgi::MPXS_CONNS => b"0",
                _ => continue,
            };
            // Each once, however often asked: the answer then always fits
            // in its one record.
            if !answer.iter().any(|(n, _)| *n == name) {
                answer.push((name, value));
            }
        }
    }
    fastcgi::write_get_values_result(out, &answer).expect("three short pairs fit in a record");
}

/// Requests the whole pool serves at once (every worker's threads), for
/// GET_VALUES.
pub(crate) static MAX_REQS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Connections the whole pool holds at once (every worker's
/// `--max-connections`), for GET_VALUES: past it a worker turns new ones away.
pub(crate) static MAX_CONNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Whether the buffer holds an ABORT_REQUEST for `id` among its complete records.
pub(crate) fn has_abort(buf: &[u8], id: u16) -> bool {
    let mut rest = buf;
    while let Ok(Status::Complete(r, n)) = fastcgi::parse_record(rest) {
        if r.kind == RecordType::AbortRequest && r.request_id == id {
            return true;
        }
        rest = &rest[n..];
    }
    false
}

/// Whether the complete records of `buf` include the end of `active`'s
/// STDIN (its empty STDIN record).
pub(crate) fn stdin_ends(buf: &[u8], active: u16) -> bool {
    let mut rest = buf;
    while let Ok(Status::Complete(r, n)) = fastcgi::parse_record(rest) {
        if r.kind == RecordType::Stdin && r.request_id == active && r.content.is_empty() {
            return true;
        }
        rest = &rest[n..];
    }
    false
}

/// Refuses, with END_REQUEST CANT_MPX_CONN appended to `out`, every
/// BEGIN_REQUEST for another id among the complete records of `buf` from
/// `from` on that comes before the end of `active`'s STDIN, and removes those
/// records from `buf`. The front end sent them while it was still sending
/// `active`, so they are concurrent requests on one connection; their PARAMS
/// and STDIN records then match no request and are ignored. A BEGIN_REQUEST
/// after that end is the next request, not a concurrent one: HAProxy sends it
/// as soon as it has the whole response body, before END_REQUEST. It stays
/// in `buf` and is served after `active`.
pub(crate) fn refuse_concurrent_begins(
    buf: &mut BytesMut,
    from: usize,
    active: u16,
    out: &mut Vec<u8>,
) -> Vec<u16> {
    let mut refused: Vec<Range<usize>> = Vec::new();
    let mut ids = Vec::new();
    let mut at = from;
    while at < buf.len() {
        let Ok(Status::Complete(r, n)) = fastcgi::parse_record(&buf[at..]) else {
            break;
        };
        if r.kind == RecordType::Stdin && r.request_id == active && r.content.is_empty() {
            break;
        }
        if r.kind == RecordType::BeginRequest && r.request_id != active {
            fastcgi::write_end_request(out, r.request_id, 0, ProtocolStatus::CantMpxConn);
            refused.push(at..at + n);
            ids.push(r.request_id);
        }
        at += n;
    }
    if refused.is_empty() {
        return ids;
    }
    let mut kept = BytesMut::with_capacity(buf.len());
    let mut start = 0;
    for r in refused {
        kept.extend_from_slice(&buf[start..r.start]);
        start = r.end;
    }
    kept.extend_from_slice(&buf[start..]);
    *buf = kept;
    ids
}

/// Refuses the request being received, whose PARAMS cannot be taken, with
/// `status` and END_REQUEST (appended to `out`), said to the caller in
/// `st.refused`; without KEEP_CONN the connection closes after them.
fn refuse_in_params(st: &mut FcgiConn, out: &mut Vec<u8>, id: u16, keep_conn: bool, status: u16, why: &str) {
    st.active = None;
    st.params.clear();
    let reply = crate::worker::cgi_error_response(status, why);
    fastcgi::write_stdout(out, id, &reply);
    st.refused.push(Refused {
        why: format!("request {id}: {why} ({status} {})", crate::worker::reason(status)),
        answered: Some((status, reply)),
    });
    fastcgi::write_stream_end(out, RecordType::Stdout, id);
    if keep_conn {
        st.refused_stdin = Some(id);
    } else {
        fastcgi::write_end_request(out, id, 0, ProtocolStatus::RequestComplete);
        st.close_after = true;
    }
}

/// What a BEGIN_REQUEST for the request already active means.
pub(crate) const BEGUN_TWICE: &str = "BEGIN_REQUEST for the request already begun on this connection";

/// The log line's reason for second requests refused with CANT_MPX_CONN.
pub(crate) fn concurrent_refusal(ids: &[u16], active: Option<u16>) -> String {
    let ids = ids.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let during = active.map_or(String::new(), |a| format!(" while request {a} was still being sent"));
    format!(
        "BEGIN_REQUEST for request {ids}{during} (one request at a time per connection, FCGI_MPXS_CONNS 0); \
         ended with CANT_MPX_CONN"
    )
}

/// A record header for `len` content bytes and no padding.
pub(crate) fn record_header(kind: RecordType, id: u16, len: usize) -> [u8; 8] {
    let [id_hi, id_lo] = id.to_be_bytes();
    let [len_hi, len_lo] = (len as u16).to_be_bytes();
    [fastcgi::VERSION, kind.as_u8(), id_hi, id_lo, len_hi, len_lo, 0, 0]
}

/// A request's variables found in a buffer.
pub(crate) struct Head {
    /// Bytes of the buffer the variables took (the body starts after them).
    pub len: usize,
    pub params: CgiParams,
}

fn range_in(outer: &[u8], inner: &[u8]) -> Range<usize> {
    let start = inner.as_ptr() as usize - outer.as_ptr() as usize;
    start..start + inner.len()
}

/// Room for the variables of most requests: nginx's stock params are about
/// twenty, plus one per header field. Made up front, the list is not grown
/// three or four times on the way there for each request.
const VARS_CAPACITY: usize = 40;

/// Each pair's name and value as ranges of `outer`, which holds them.
fn ranges_in<'a>(
    outer: &[u8],
    pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Vec<(Range<usize>, Range<usize>)> {
    let mut ranges = Vec::with_capacity(VARS_CAPACITY);
    ranges.extend(pairs.map(|(k, v)| (range_in(outer, k), range_in(outer, v))));
    ranges
}

/// Parses a uwsgi packet at the start of `buf`.
/// A uwsgi or SCGI head that cannot be served: what is wrong, and the
/// status to answer with when a reply can still be framed.
#[derive(Debug)]
pub(crate) struct HeadError {
    pub status: Option<u16>,
    pub message: String,
}

pub(crate) fn uwsgi_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    match uwsgi::parse_request(buf) {
        Ok(Status::Complete(req, len)) => {
            let pairs = ranges_in(buf, req.vars());
            Ok(Some(Head { len, params: CgiParams { pairs, strip_script_name: req.strips_script_name() } }))
        }
        Ok(Status::Partial) => {
            // The packet header says how long the vars are; nothing else may
            // stretch it.
            Ok(None)
        }
        Err(e) => Err(HeadError { status: e.status(), message: e.to_string() }),
    }
}

/// Parses an SCGI netstring at the start of `buf`.
pub(crate) fn scgi_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    match scgi::parse_request(buf) {
        Ok(Status::Complete(req, len)) => {
            let pairs = ranges_in(buf, req.headers());
            Ok(Some(Head { len, params: CgiParams { pairs, strip_script_name: false } }))
        }
        Ok(Status::Partial) => Ok(None),
        Err(e) => Err(HeadError { status: e.status(), message: e.to_string() }),
    }
}

/// A request refused before the app.
#[derive(Debug)]
pub(crate) struct Refused {
    /// What was wrong, for the error log.
    pub why: String,
    /// The status and CGI response it was answered with, for the access
    /// log; None for a refusal in the protocol's own terms (CANT_MPX_CONN,
    /// UNKNOWN_ROLE), which never was an HTTP request.
    pub answered: Option<(u16, Vec<u8>)>,
}

/// The FastCGI side of a connection between requests.
#[derive(Debug, Default)]
pub(crate) struct FcgiConn {
    /// The request being received: its id, KEEP_CONN, and its PARAMS so far.
    pub active: Option<(u16, bool)>,
    pub params: Vec<u8>,
    /// The connection must close once the pending output is written (a
    /// refused request without KEEP_CONN).
    pub close_after: bool,
    /// Requests refused since the caller last looked, for it to log with
    /// the peer.
    pub refused: Vec<Refused>,
    /// Since the connection was last parked, only records outside any request
    /// came (GET_VALUES, unknown types): not activity that keeps it open.
    pub chatter: bool,
    /// A request refused from its PARAMS on a kept connection whose STDIN
    /// is still to come: its records are dropped, and END_REQUEST goes out
    /// after the empty one (given earlier, a front end may stop sending the
    /// body and begin its next request in the middle of it).
    pub refused_stdin: Option<u16>,
    /// Records answered outside any request (GET_VALUES, unknown types)
    /// since the last request began: see [`MAX_ANSWERS_WITHOUT_REQUEST`].
    pub answered: u32,
}

/// The most records a connection gets answered outside any request before
/// it is closed. A front end asks GET_VALUES once or twice; a peer sending
/// them without end and reading none of the answers would otherwise hold a
/// serving thread in a blocked write, for no request at all.
pub(crate) const MAX_ANSWERS_WITHOUT_REQUEST: u32 = 64;

/// The records that bring a new connection's FastCGI state to `st`: the
/// BEGIN_REQUEST of the request being received and its PARAMS so far
/// (nothing when none is under way). A connection handed to another worker
/// in the middle of a request carries them ahead of its unread bytes.
pub(crate) fn fcgi_resume(st: &FcgiConn) -> Vec<u8> {
    let mut out = Vec::with_capacity(fcgi_resume_len(st));
    if let Some((id, keep_conn)) = st.active {
        let flags = if keep_conn { fastcgi::KEEP_CONN } else { 0 };
        // Role 1, RESPONDER: the only one taken.
        let _ = fastcgi::write_record(&mut out, RecordType::BeginRequest, id, &[0, 1, flags, 0, 0, 0, 0, 0]);
        fastcgi::write_stream(&mut out, RecordType::Params, id, &st.params);
    }
    out
}

/// The length of [`fcgi_resume`]'s records, known without encoding them.
pub(crate) fn fcgi_resume_len(st: &FcgiConn) -> usize {
    match st.active {
        Some(_) => {
            let records = st.params.len().div_ceil(fastcgi::MAX_CONTENT_LEN);
            fastcgi::HEADER_LEN + 8 + records * fastcgi::HEADER_LEN + st.params.len()
        }
        None => 0,
    }
}

/// A FastCGI request whose PARAMS stream is complete.
#[derive(Debug)]
pub(crate) struct FcgiRequest {
    pub id: u16,
    pub keep_conn: bool,
    pub params_bytes: Vec<u8>,
    pub params: CgiParams,
}

/// Consumes whole records from the front of `buf` until a request's PARAMS
/// are complete. Returns the bytes consumed and the request, if one is
/// ready; answers to management records and refused requests go to `out`.
pub(crate) fn fcgi_head(
    st: &mut FcgiConn,
    buf: &[u8],
    out: &mut Vec<u8>,
) -> Result<(usize, Option<FcgiRequest>), String> {
    let mut used = 0;
    loop {
        let rest = &buf[used..];
        let (r, n) = match fastcgi::parse_record(rest) {
            Ok(Status::Complete(r, n)) => (r, n),
            Ok(Status::Partial) => return Ok((used, None)),
            Err(e) => return Err(e.to_string()),
        };
        let record = &rest[..n];
        used += n;
        match (r.kind, st.active) {
            (RecordType::BeginRequest, None) => {
                let begin = fastcgi::parse_begin_request(r.content).map_err(|e| e.to_string())?;
                if r.request_id == fastcgi::NULL_REQUEST_ID {
                    return Err("BEGIN_REQUEST with the management request id 0".into());
                }
                // A front end that begins the next request has given up the
                // refused one's STDIN: its END_REQUEST is owed first.
                if let Some(id) = st.refused_stdin.take() {
                    fastcgi::write_end_request(out, id, 0, ProtocolStatus::RequestComplete);
                }
                match begin.role {
                    Role::Responder => {
                        st.active = Some((r.request_id, begin.keep_conn));
                        st.params.clear();
                        st.answered = 0;
                    }
                    role => {
                        st.refused.push(Refused {
                            why: format!(
                                "FastCGI role {} refused for request {} (only RESPONDER is served); ended \
                                 with UNKNOWN_ROLE",
                                match role {
                                    Role::Authorizer => "AUTHORIZER (2)".to_string(),
                                    Role::Filter => "FILTER (3)".to_string(),
                                    Role::Unknown(n) => n.to_string(),
                                    Role::Responder => unreachable!("served above"),
                                },
                                r.request_id
                            ),
                            answered: None,
                        });
                        fastcgi::write_end_request(out, r.request_id, 0, ProtocolStatus::UnknownRole);
                        if !begin.keep_conn {
                            st.close_after = true;
                            return Ok((used, None));
                        }
                    }
                }
            }
            (RecordType::Params, Some((id, keep_conn))) if r.request_id == id => {
                if r.content.is_empty() {
                    let params_bytes = std::mem::take(&mut st.params);
                    let pairs = match fastcgi::parse_pairs(&params_bytes) {
                        Ok(pairs) => ranges_in(&params_bytes, pairs),
                        // The records are whole: the front end gets a status
                        // to show, and a kept connection goes on.
                        Err(e) => {
                            refuse_in_params(st, out, id, keep_conn, 400, &format!("malformed PARAMS: {e}"));
                            if st.close_after {
                                return Ok((used, None));
                            }
                            continue;
                        }
                    };
                    st.active = None;
                    return Ok((
                        used,
                        Some(FcgiRequest {
                            id,
                            keep_conn,
                            params_bytes,
                            params: CgiParams { pairs, strip_script_name: false },
                        }),
                    ));
                }
                if st.params.len() + r.content.len() > fastcgi::MAX_PARAMS_LEN {
                    // Its remaining PARAMS and STDIN records belong to no
                    // request any more, and are passed over.
                    let why = format!("PARAMS over {} bytes", fastcgi::MAX_PARAMS_LEN);
                    refuse_in_params(st, out, id, keep_conn, 431, &why);
                    if st.close_after {
                        return Ok((used, None));
                    }
                    continue;
                }
                st.params.extend_from_slice(r.content);
            }
            (RecordType::AbortRequest, Some((id, keep_conn))) if r.request_id == id => {
                // Aborted before it started: nothing ran, only END_REQUEST is owed.
                st.active = None;
                st.params.clear();
                fastcgi::write_end_request(out, id, 0, ProtocolStatus::RequestComplete);
                if !keep_conn {
                    st.close_after = true;
                    return Ok((used, None));
                }
            }
            (RecordType::Stdin, Some((id, _))) if r.request_id == id => {
                // The body follows the parameters; taken here, it would be
                // lost without a word.
                return Err("STDIN record before the end of PARAMS".into());
            }
            (RecordType::Stdin, None) if st.refused_stdin == Some(r.request_id) => {
                if r.content.is_empty() {
                    st.refused_stdin = None;
                    fastcgi::write_end_request(out, r.request_id, 0, ProtocolStatus::RequestComplete);
                }
            }
            (RecordType::GetValues | RecordType::Unknown(_), _)
                if st.answered >= MAX_ANSWERS_WITHOUT_REQUEST =>
            {
                return Err(format!(
                    "more than {MAX_ANSWERS_WITHOUT_REQUEST} management records (GET_VALUES, unknown types) \
                     without a request"
                ));
            }
            (_, active) => match stray_record(record, active.map(|(id, _)| id), out) {
                Stray::Concurrent(other) => st
                    .refused
                    .push(Refused { why: concurrent_refusal(&[other], active.map(|a| a.0)), answered: None }),
                Stray::BegunTwice => return Err(BEGUN_TWICE.into()),
                Stray::Ignore | Stray::AbortActive => {
                    if matches!(r.kind, RecordType::GetValues | RecordType::Unknown(_)) {
                        st.answered += 1;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_under_way_resumes_where_it_stood() {
        let mut req = Vec::new();
        fastcgi::write_record(
            &mut req,
            RecordType::BeginRequest,
            7,
            &[0, 1, fastcgi::KEEP_CONN, 0, 0, 0, 0, 0],
        )
        .unwrap();
        let mut pairs = Vec::new();
        fastcgi::encode_pair(&mut pairs, b"REQUEST_METHOD", b"POST");
        fastcgi::encode_pair(&mut pairs, b"BIG", &vec![b'v'; 70_000]);
        fastcgi::write_stream(&mut req, RecordType::Params, 7, &pairs);
        let end = req.len();
        fastcgi::write_stream_end(&mut req, RecordType::Params, 7);
        for cut in [16, 16 + 8 + 100, end - 5, end] {
            // One connection reads the first `cut` bytes; another resumes.
            let (mut first, mut out) = (FcgiConn::default(), Vec::new());
            let (used, done) = fcgi_head(&mut first, &req[..cut], &mut out).unwrap();
            assert!(done.is_none() && out.is_empty());
            let mut resumed = fcgi_resume(&first);
            resumed.extend_from_slice(&req[used..]);
            let mut second = FcgiConn::default();
            let (n, got) = fcgi_head(&mut second, &resumed, &mut out).unwrap();
            let got = got.expect("the request whole");
            assert_eq!((n, got.id, got.keep_conn), (resumed.len(), 7, true));
            assert_eq!(got.params_bytes, pairs);
            assert_eq!(fcgi_resume(&first).len(), fcgi_resume_len(&first));
        }
        assert!(fcgi_resume(&FcgiConn::default()).is_empty());
    }

    fn record(kind: u8, id: u16, content: &[u8], padding: u8) -> Vec<u8> {
        let mut v = vec![1, kind];
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(&(content.len() as u16).to_be_bytes());
        v.push(padding);
        v.push(0);
        v.extend_from_slice(content);
        v.extend(std::iter::repeat_n(0, padding as usize));
        v
    }

    fn begin(id: u16, role: u16, keep: bool) -> Vec<u8> {
        let mut c = role.to_be_bytes().to_vec();
        c.push(u8::from(keep));
        c.extend_from_slice(&[0; 5]);
        record(1, id, &c, 0)
    }

    #[test]
    fn management_records_without_a_request_are_answered_up_to_a_limit() {
        let mut ask = Vec::new();
        fastcgi::encode_pair(&mut ask, fastcgi::MAX_CONNS, b"");
        let one = record(9, 0, &ask, 0);
        let mut st = FcgiConn::default();
        let mut out = Vec::new();
        let wire = one.repeat(MAX_ANSWERS_WITHOUT_REQUEST as usize);
        let (used, req) = fcgi_head(&mut st, &wire, &mut out).unwrap();
        assert!(used == wire.len() && req.is_none());
        assert!(fcgi_head(&mut st, &one, &mut out).unwrap_err().contains("management records"));
        // A request in between starts the count again.
        let mut st = FcgiConn::default();
        let mut wire = one.repeat(MAX_ANSWERS_WITHOUT_REQUEST as usize);
        wire.extend(begin(1, 1, true));
        wire.extend(one.repeat(MAX_ANSWERS_WITHOUT_REQUEST as usize));
        assert!(fcgi_head(&mut st, &wire, &mut out).is_ok());
    }

    #[test]
    fn fastcgi_request_in_pieces() {
        let mut params = Vec::new();
        fastcgi::encode_pair(&mut params, b"REQUEST_METHOD", b"GET");
        fastcgi::encode_pair(&mut params, b"REQUEST_URI", b"/x");
        let mut wire = begin(1, 1, true);
        // PARAMS split inside a pair, with padding.
        wire.extend(record(4, 1, &params[..5], 3));
        wire.extend(record(4, 1, &params[5..], 0));
        wire.extend(record(4, 1, b"", 0));
        wire.extend(record(5, 1, b"body", 4));
        let mut st = FcgiConn::default();
        let mut out = Vec::new();
        // Byte by byte, nothing is ready until the empty PARAMS record.
        let (used, req) = fcgi_head(&mut st, &wire[..10], &mut out).unwrap();
        assert!(req.is_none());
        let mut consumed = used;
        let mut found = None;
        for end in 11..=wire.len() {
            let (used, req) = fcgi_head(&mut st, &wire[consumed..end], &mut out).unwrap();
            consumed += used;
            if let Some(r) = req {
                found = Some(r);
                break;
            }
        }
        let req = found.unwrap();
        assert_eq!((req.id, req.keep_conn), (1, true));
        assert_eq!(req.params.get(&req.params_bytes, b"REQUEST_URI"), Some(&b"/x"[..]));
        assert!(out.is_empty());
        // The STDIN record is left for the body reader.
        match next_stdin(&wire[consumed..], 1).unwrap() {
            Some(StdinStep::Data { header: 8, content: 4, padding: 4 }) => {}
            _ => panic!("expected STDIN"),
        }
    }

    #[test]
    fn fastcgi_management_and_refusals() {
        let mut st = FcgiConn::default();
        let mut out = Vec::new();
        let mut q = Vec::new();
        fastcgi::encode_pair(&mut q, fastcgi::MPXS_CONNS, b"");
        let mut wire = record(9, 0, &q, 0);
        wire.extend(record(200, 0, b"", 0));
        wire.extend(begin(7, 2, true));
        let (used, req) = fcgi_head(&mut st, &wire, &mut out).unwrap();
        assert_eq!(used, wire.len());
        assert!(req.is_none());
        // GET_VALUES_RESULT, UNKNOWN_TYPE, END_REQUEST(UNKNOWN_ROLE).
        let mut kinds = Vec::new();
        let mut rest = &out[..];
        while let Ok(Status::Complete(r, n)) = fastcgi::parse_record(rest) {
            kinds.push((r.kind, r.request_id, r.content.to_vec()));
            rest = &rest[n..];
        }
        assert_eq!(kinds[0].0, RecordType::GetValuesResult);
        assert!(kinds[0].2.ends_with(b"FCGI_MPXS_CONNS0"));
        assert_eq!(kinds[1].0, RecordType::UnknownType);
        assert_eq!(kinds[1].2[0], 200);
        assert_eq!((kinds[2].0, kinds[2].1), (RecordType::EndRequest, 7));
        assert_eq!(kinds[2].2[4], ProtocolStatus::UnknownRole as u8);
        assert!(!st.close_after);

        // A second BEGIN_REQUEST while one is being received.
        let mut st = FcgiConn::default();
        let mut out = Vec::new();
        let mut wire = begin(1, 1, false);
        wire.extend(begin(2, 1, false));
        fcgi_head(&mut st, &wire, &mut out).unwrap();
        let Ok(Status::Complete(r, _)) = fastcgi::parse_record(&out) else { panic!() };
        assert_eq!((r.kind, r.request_id, r.content[4]), (RecordType::EndRequest, 2, 1));
    }

    #[test]
    fn concurrent_begins_are_refused_and_removed() {
        // Unread STDIN of request 1, then what the front end sent meanwhile:
        // a second request (BEGIN and PARAMS) and a half record.
        let mut wire = vec![b'x'; 5];
        wire.extend(begin(2, 1, true));
        wire.extend(record(4, 2, b"", 0));
        wire.extend(begin(1, 1, true));
        wire.extend(&record(8, 1, b"", 0)[..4]);
        let mut buf = BytesMut::from(&wire[..]);
        let mut out = Vec::new();
        refuse_concurrent_begins(&mut buf, 5, 1, &mut out);
        let Ok(Status::Complete(r, n)) = fastcgi::parse_record(&out) else { panic!() };
        assert_eq!(
            (r.kind, r.request_id, r.content[4]),
            (RecordType::EndRequest, 2, ProtocolStatus::CantMpxConn as u8)
        );
        assert_eq!(n, out.len());
        let mut expect = vec![b'x'; 5];
        expect.extend(record(4, 2, b"", 0));
        expect.extend(begin(1, 1, true));
        expect.extend(&record(8, 1, b"", 0)[..4]);
        assert_eq!(&buf[..], &expect[..]);

        // Nothing concurrent: the buffer is untouched.
        let mut out = Vec::new();
        refuse_concurrent_begins(&mut buf, 5, 1, &mut out);
        assert!(out.is_empty());
        assert_eq!(&buf[..], &expect[..]);
    }

    #[test]
    fn begins_after_the_end_of_stdin_are_the_next_requests() {
        // Request 1's STDIN ends, then the front end begins request 2 (and 3,
        // and another 1 after it) without waiting for END_REQUEST: they are
        // left to be served in turn.
        let mut wire = vec![b'x'; 5];
        wire.extend(record(5, 1, b"", 0));
        wire.extend(begin(2, 1, true));
        wire.extend(record(4, 2, b"", 0));
        wire.extend(begin(3, 1, true));
        let mut buf = BytesMut::from(&wire[..]);
        let mut out = Vec::new();
        refuse_concurrent_begins(&mut buf, 5, 1, &mut out);
        assert!(out.is_empty());
        assert_eq!(&buf[..], &wire[..]);

        // Before that end, a BEGIN_REQUEST is concurrent; after it, not.
        let mut wire = vec![b'x'; 5];
        wire.extend(begin(2, 1, true));
        wire.extend(record(5, 1, b"", 0));
        wire.extend(begin(3, 1, true));
        let mut buf = BytesMut::from(&wire[..]);
        let mut out = Vec::new();
        refuse_concurrent_begins(&mut buf, 5, 1, &mut out);
        let Ok(Status::Complete(r, n)) = fastcgi::parse_record(&out) else { panic!() };
        assert_eq!((r.request_id, n), (2, out.len()));
        let mut expect = vec![b'x'; 5];
        expect.extend(record(5, 1, b"", 0));
        expect.extend(begin(3, 1, true));
        assert_eq!(&buf[..], &expect[..]);
    }

    #[test]
    fn fastcgi_bad_input() {
        let mut st = FcgiConn::default();
        let mut out = Vec::new();
        assert!(fcgi_head(&mut st, &[2, 1, 0, 1, 0, 8, 0, 0], &mut out).unwrap_err().contains("version"));
        let mut st = FcgiConn::default();
        assert!(fcgi_head(&mut st, &record(1, 1, b"short", 0), &mut out).is_err());
        // A pair whose length runs past the PARAMS: whole records, so the
        // request gets a 400 and END_REQUEST; the connection closes after
        // them without KEEP_CONN, and goes on with it.
        for keep in [false, true] {
            let mut st = FcgiConn::default();
            let mut out = Vec::new();
            let mut wire = begin(1, 1, keep);
            wire.extend(record(4, 1, &[0x80, 0, 0, 1, 1, b'a'], 0));
            wire.extend(record(4, 1, b"", 0));
            wire.extend(record(5, 1, b"", 0));
            let (used, req) = fcgi_head(&mut st, &wire[..wire.len() - 8], &mut out).unwrap();
            assert!(req.is_none() && st.active.is_none());
            assert_eq!(st.close_after, !keep);
            assert_eq!(used, wire.len() - 8);
            assert!(out.windows(15).any(|w| w == b"Status: 400 Bad"), "{out:?}");
            assert!(st.refused[0].why.contains("malformed PARAMS"), "{:?}", st.refused);
            assert_eq!(st.refused[0].answered.as_ref().map(|a| a.0), Some(400));
            // Kept, END_REQUEST waits for the end of its STDIN.
            let ends = |out: &[u8]| out.windows(2).filter(|w| w == &[1, 3]).count();
            assert_eq!(ends(&out), usize::from(!keep));
            if keep {
                fcgi_head(&mut st, &wire[wire.len() - 8..], &mut out).unwrap();
                assert_eq!((ends(&out), st.refused_stdin), (1, None));
            }
        }
        assert!(next_stdin(&[9], 1).is_err());
    }

    #[test]
    fn uwsgi_and_scgi_heads() {
        let mut vars = Vec::new();
        for (k, v) in [("REQUEST_METHOD", "GET"), ("PATH_INFO", "/")] {
            vars.extend_from_slice(&(k.len() as u16).to_le_bytes());
            vars.extend_from_slice(k.as_bytes());
            vars.extend_from_slice(&(v.len() as u16).to_le_bytes());
            vars.extend_from_slice(v.as_bytes());
        }
        let mut pkt = vec![30];
        pkt.extend_from_slice(&(vars.len() as u16).to_le_bytes());
        pkt.push(0);
        pkt.extend_from_slice(&vars);
        pkt.extend_from_slice(b"body");
        let head = uwsgi_head(&pkt).unwrap().unwrap();
        assert_eq!(head.len, pkt.len() - 4);
        assert!(head.params.strip_script_name);
        assert_eq!(head.params.get(&pkt, b"PATH_INFO"), Some(&b"/"[..]));
        assert!(uwsgi_head(&pkt[..6]).unwrap().is_none());
        assert!(uwsgi_head(&[5, 0, 0, 0]).is_err());

        let block = b"CONTENT_LENGTH\x000\x00SCGI\x001\x00REQUEST_METHOD\x00GET\x00";
        let mut ns = format!("{}:", block.len()).into_bytes();
        ns.extend_from_slice(block);
        ns.push(b',');
        let head = scgi_head(&ns).unwrap().unwrap();
        assert_eq!(head.len, ns.len());
        assert_eq!(head.params.get(&ns, b"REQUEST_METHOD"), Some(&b"GET"[..]));
        assert!(scgi_head(b"12x").is_err());
    }
}
