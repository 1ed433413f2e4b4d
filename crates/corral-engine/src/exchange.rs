//! One request/response exchange on a connection: the body reader and the
//! response writer an [`App`](crate::App) uses.
//!
//! An [`Exchange`] is a cheap handle (an `Arc` and a generation number) so
//! an app may keep it in objects that outlive the call, such as a WSGI
//! `wsgi.input`; once the engine moves on to the next request on the
//! connection the generation changes and stale handles read EOF and refuse to
//! write, so nothing of one request can reach another.
//!
//! Sockets are non-blocking. A read or write that would block waits in
//! `poll(2)` inside the app's [`blocking`](crate::App::blocking) hook, so a
//! Python app releases the GIL only when it actually has to wait.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use corral_proto::fastcgi;
use corral_proto::http1::{parse_content_length, Chunk, ChunkedDecoder};

use crate::date;
use crate::flusher;
use crate::gateway::{self, FcgiIn, Stray};

/// The most bytes one `sendfile` call is asked for: a count that fits any
/// `size_t`, under the about 2 GiB that Linux moves in one call anyway.
const SENDFILE_MAX: u64 = 1 << 30;
/// The most the engine asks a socket for at a time while reading a body.
pub const READ_CHUNK: usize = 64 * 1024;
/// The least room a read asks the socket to fill.
const MIN_READ: usize = 8 * 1024;
/// The slowest a request body may arrive once the app reads it, on average:
/// past the grace (the header timeout), each second more must have brought
/// this many bytes, as Apache's mod_reqtimeout (`body=20,MinRate=500`)
/// judges bodies. Without it a client sending a byte a minute would hold a
/// thread, the pool's only one by default, for as long as it liked.
pub const MIN_BODY_RATE: u64 = 500;
/// Unread request body the engine discards to keep a connection alive; past
/// this it closes the connection instead of reading what the app ignored.
pub(crate) const MAX_DRAIN: u64 = 1024 * 1024;
/// Buffered input past which a FastCGI response stops looking for records
/// the front end sent meanwhile (ABORT_REQUEST, a second BEGIN_REQUEST):
/// reading more would buffer a body the app ignores.
const PEEK_MAX: usize = 256 * 1024;
/// A FastCGI request that ends within this time of the socket last being
/// found empty does not read it again before END_REQUEST to refuse a second
/// BEGIN_REQUEST: one that arrived meanwhile is read after END_REQUEST and
/// served in turn, like any later request. That saves a read per request
/// (a tenth of a small request's system time) where the refusal would
/// spare the front end no wait worth having.
const PEEK_QUIET: Duration = Duration::from_millis(1);
/// The most bytes of finished responses a connection holds back (when its
/// thread asks for that with [`Io::hold`]) to write them after the other
/// ready connections were served. Larger responses go out at once: the
/// copy would cost more than the wake-up of the client it saves.
pub(crate) const HOLD_MAX: usize = 16 * 1024;
/// Blocks of a streamed body that follow the previous one this closely are
/// gathered into one write (see [`crate::flusher`]); slower streams, such
/// as server-sent events, have each block written as it comes.
const STREAM_BURST: Duration = Duration::from_micros(100);
/// The largest block that is gathered: larger ones amortise their system
/// call themselves.
const GATHER_BLOCK_MAX: usize = 16 * 1024;
/// Gathered bytes past which they are written at once.
const GATHER_MAX: usize = 64 * 1024;

/// Why a body read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The chunked framing was invalid (400).
    Framing(corral_proto::http1::Error),
    /// The body is larger than `--max-body-size` (413).
    TooLarge,
    /// The client closed the connection before the whole body arrived.
    Truncated,
    /// No bytes arrived within the I/O timeout.
    Timeout,
    /// The socket failed.
    Io(i32),
    /// This handle belongs to a request that has ended.
    Stale,
    /// The front end broke the FastCGI framing of the body; the text says how.
    Gateway(&'static str),
    /// The front end aborted the request (FastCGI ABORT_REQUEST).
    Aborted,
    /// No bytes now, and the reader asked not to wait ([`Io::no_wait`]):
    /// the body stays as it was, to be read on when the socket is readable.
    WouldWait,
}

/// Bytes the socket holds that its peer has not taken (SIOCOUTQ: not yet
/// acknowledged over TCP, not yet read on a unix socket); -1 if unknown.
pub(crate) fn unsent(fd: RawFd) -> i32 {
    let mut n: libc::c_int = 0;
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) } < 0 {
        return -1;
    }
    n
}

/// What a response write that waited out `--socket-timeout` says: the
/// client is still there, but the server gave up on it.
pub const STALLED_READER: &str =
    "gave up on the client: it read nothing of the response for --socket-timeout";

/// How [`BodyError::Gateway`] says a FastCGI connection closed before its
/// STDIN stream ended.
pub(crate) const FCGI_CLOSED_IN_BODY: &str = "connection closed inside the body";

impl BodyError {
    /// The status to answer with when the app lets this error escape.
    pub fn status(self) -> u16 {
        match self {
            BodyError::Framing(e) => e.status(),
            BodyError::TooLarge => 413,
            BodyError::Timeout | BodyError::WouldWait => 408,
            _ => 400,
        }
    }
}

/// Why a request's handle (`what`) no longer works: its request is over,
/// or this is a process the app forked, whose copy of the connection is
/// the parent's (see [`Exchange::lock`]).
fn write_stale(f: &mut std::fmt::Formatter<'_>, what: &str) -> std::fmt::Result {
    match crate::worker::in_forked_child() {
        false => write!(f, "{what} used after its request ended"),
        true => write!(f, "{what} used in a process the app forked: the request is its parent's"),
    }
}

/// What is wrong with a chunked body, in its words: the decoder reports its
/// trailer fields' faults with the errors of the head's fields.
pub(crate) fn chunked_fault(e: corral_proto::http1::Error) -> String {
    use corral_proto::http1::Error as E;
    match e {
        E::BareLineEnding => "bare CR or LF in the chunked framing or a trailer field".to_string(),
        E::ObsFold => "obsolete line folding in a trailer field".to_string(),
        E::HeaderName => "invalid trailer field name".to_string(),
        E::HeaderValue => "invalid character in a trailer field value".to_string(),
        E::HeaderLineTooLong | E::TooManyHeaders => "trailer fields too large".to_string(),
        other => other.to_string(),
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Framing(e) => write!(f, "invalid chunked request body: {}", chunked_fault(*e)),
            BodyError::TooLarge => f.write_str("request body larger than the configured maximum"),
            BodyError::Truncated => f.write_str("client closed the connection before sending the whole body"),
            BodyError::Timeout => f.write_str("timed out waiting for the request body"),
            BodyError::Io(e) => write!(f, "reading the request body: {}", io::Error::from_raw_os_error(*e)),
            BodyError::Stale => write_stale(f, "wsgi.input"),
            BodyError::Gateway(m) => write!(f, "invalid FastCGI body stream: {m}"),
            BodyError::Aborted => f.write_str("the front end aborted the request"),
            BodyError::WouldWait => f.write_str("no more of the request body yet"),
        }
    }
}

/// Why the app's response could not be used or sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// The status or a header the app gave is invalid; the message says which.
    Invalid(String),
    /// start_response was called again after the headers went out.
    AlreadySent,
    /// Nothing was started before writing.
    NotStarted,
    /// The client went away (EPIPE, ECONNRESET) or stopped reading past the timeout.
    ClientGone(String),
    Stale,
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::Invalid(m) => f.write_str(m),
            ResponseError::AlreadySent => f.write_str("response headers already sent"),
            ResponseError::NotStarted => f.write_str("write before start_response"),
            ResponseError::ClientGone(m) => write!(f, "client disconnected: {m}"),
            ResponseError::Stale => write_stale(f, "response"),
        }
    }
}

#[derive(Debug)]
pub(crate) enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    Done,
    Failed(BodyError),
    /// A FastCGI STDIN stream, read record by record.
    Fcgi(FcgiIn),
}

/// What frames the responses on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// HTTP/1.x straight to the client.
    Http,
    /// uwsgi: an HTTP status line and headers, one request per connection.
    Uwsgi,
    /// SCGI: CGI headers (`Status:`), one request per connection.
    Scgi,
    /// FastCGI: CGI headers and body in STDOUT records of request `id`.
    FastCgi { id: u16, keep_conn: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RespFraming {
    /// Content-Length given by the app, with the bytes still owed.
    Length(u64),
    Chunked,
    /// HTTP/1.0 without Content-Length: the close ends the body.
    Close,
    /// HEAD, 1xx, 204, 304: headers only.
    NoBody,
    /// Behind a gateway protocol, with no length given: the bytes go as they
    /// come and the protocol marks the end (END_REQUEST, or the close).
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RespPhase {
    /// Nothing started yet.
    Idle,
    /// Status and headers buffered, not sent.
    Started,
    /// Headers on the wire.
    Sent,
    /// Complete.
    Finished,
}

/// Mutable per-connection state, behind the exchange's lock.
pub(crate) struct Io {
    pub fd: RawFd,
    pub wire: Wire,
    pub generation: u64,
    /// Bytes read from the socket and not yet consumed: body, then any
    /// pipelined requests.
    pub buf: BytesMut,
    pub body: BodyState,
    pub body_received: u64,
    pub max_body: u64,
    /// When the body must be in by, on the monotonic clock (ms; 0 until the
    /// app first waits for it); every byte read moves it by 1/MIN_BODY_RATE s.
    pub body_deadline: u64,
    /// The grace a body has before MIN_BODY_RATE counts (ms).
    pub body_grace_ms: u64,
    /// Bytes read from the socket while waiting for the body.
    body_read: u64,
    body_wait_started: u64,
    /// Decoded body bytes held back by readline.
    pub pending: BytesMut,
    /// `Expect: 100-continue` was asked and not yet answered.
    pub continue_owed: bool,
    pub http11: bool,
    pub head_request: bool,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    pub timeout_ms: i32,
    /// Body reads return [`BodyError::WouldWait`] rather than wait for the
    /// client (the rest of a body nobody reads is dropped from the event
    /// loop, not by a thread waiting for it).
    pub no_wait: bool,
    /// Monotonic ms by which the rest of a body the app did not read must
    /// have come, while it is dropped between requests; 0 when none is.
    pub discard_until: u64,
    /// Bytes of that body dropped so far.
    pub discarded: u64,
    /// The request that body belonged to, for the log line if it never ends.
    pub discard_what: String,
    /// The response is out and the sending side shut: what the client still
    /// sends is read and dropped until it closes (see `drain_and_close`),
    /// with `discard_until` as the quiet deadline.
    pub lingering: bool,
    /// Monotonic ms after which a lingering connection closes, whatever comes.
    pub linger_end: u64,
    /// This FastCGI request's front end stops sending STDIN once the
    /// response began, and keeps no connection whose STDIN it did not send
    /// whole (nginx, which says so in SERVER_SOFTWARE): END_REQUEST need not
    /// wait for the rest of a body the app did not read (see `fcgi_stdin_in`).
    pub stdin_stops_at_response: bool,
    /// This gateway request came from nginx (its SERVER_SOFTWARE says so).
    pub front_end_nginx: bool,
    /// The socket failed; nothing more is written and the connection closes.
    pub broken: bool,
    /// A write waited out the I/O timeout ([`STALLED_READER`]): the client
    /// took nothing. Said in the log once, by whoever learns it with the
    /// request in hand, or else when the connection closes.
    pub stalled: bool,
    /// That was logged already.
    pub stall_logged: bool,
    /// The app failed after sending headers: close with a reset.
    pub aborted: bool,
    /// The FastCGI front end sent ABORT_REQUEST for the active request.
    pub fcgi_aborted: bool,
    /// END_REQUEST for the active FastCGI request went out with its last
    /// STDOUT bytes.
    pub fcgi_ended: bool,
    /// The peer shut down its sending side (nothing more will be read).
    pub peer_eof: bool,
    /// Something wrong with the exchange that did not stop the request (a
    /// short body, STDIN past CONTENT_LENGTH, a file that shrank while the
    /// offload thread sent it), logged with the request and its peer once
    /// the exchange completes.
    pub body_note: Option<String>,
    /// Ids of second requests the front end began on this FastCGI
    /// connection while this one's were still coming, refused with
    /// CANT_MPX_CONN: said in the log with the request's peer.
    pub fcgi_refused: Vec<u16>,
    /// The connection ends with a reset: the response was cut short in a way
    /// its framing cannot say (a FastCGI record or HTTP chunk announced and
    /// not filled, an app that failed mid-body), and a plain close could
    /// pass for its end.
    pub reset_on_close: bool,
    pub phase: RespPhase,
    pub status: u16,
    pub head: Vec<u8>,
    pub framing: RespFraming,
    pub app_length: Option<u64>,
    /// The app set its own Date header, so the server adds none.
    pub app_date: bool,
    pub bytes_sent: u64,
    /// Bytes the last failed write left unwritten (0 after one that went
    /// out whole): the body bytes among them are not counted as sent.
    unwritten: usize,
    /// Bytes read from the socket since the metrics last took them.
    pub read_total: u64,
    /// Response headers as the app gave them, kept only when the access
    /// log shows some (`%({name}o)s`).
    pub logged_headers: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Environ variables the access log shows (`%({name}e)s`), by
    /// lower-case name, as the app left them.
    pub logged_environ: Vec<(String, Vec<u8>)>,
    /// The thread serving this connection writes finished responses after
    /// its pass over the ready connections, so one wake-up of a client
    /// process covers several responses instead of one each.
    pub hold: bool,
    /// The write in progress may be held: it finishes a response the app
    /// has produced in full, so nothing of a stream waits behind it.
    holding: bool,
    /// Held response bytes, written by [`Io::flush_out`] before anything
    /// else goes out on the connection or waits on it.
    pub out: Vec<u8>,
    /// When the app handed over the previous block of this response's body.
    pub block_at: Option<Instant>,
    /// When a read last found the socket empty (FastCGI only, see
    /// `peek_fcgi_records`).
    drained_at: Option<Instant>,
    /// Whether to keep `drained_at`.
    pub(crate) time_drains: bool,
    /// A TCP socket (not a unix one): see [`Io::ack_now`].
    pub(crate) tcp: bool,
    /// The last read found the socket empty (a short read or would-block):
    /// whatever arrives from here on raises a new epoll event.
    pub(crate) drained: bool,
    /// The flusher holder (serving thread) whose current pass lists this
    /// connection; 0 for none.
    pub(crate) listed: usize,
    /// This connection's own handle, for the flusher; without it no block
    /// of a stream is gathered.
    pub me: Option<Weak<Mutex<Io>>>,
    /// The rest of a file response the socket could not take at once (see
    /// [`Exchange::send_file`]): sent after the app returns, or before
    /// anything else is written.
    pub(crate) pending_file: Option<Transfer>,
}

impl Io {
    /// Marks the connection closed and frees its buffers. The app may keep
    /// this Io alive long after (an environ held in a request history keeps
    /// its `wsgi.input`, and with it the connection's handle), so what the
    /// connection read and wrote must not stay with it.
    ///
    /// A new generation makes every handle of its requests stale: a thread
    /// the app left running (a request past --timeout) must not read or
    /// write a descriptor number that may belong to another connection now.
    pub(crate) fn release(&mut self) {
        self.broken = true;
        self.generation += 1;
        self.pending_file = None;
        self.buf = BytesMut::new();
        self.pending = BytesMut::new();
        self.out = Vec::new();
        self.head = Vec::new();
        self.logged_headers = None;
        self.logged_environ = Vec::new();
    }

    pub(crate) fn new(fd: RawFd, timeout_ms: i32, max_body: u64) -> Io {
        Io {
            fd,
            wire: Wire::Http,
            generation: 0,
            buf: BytesMut::new(),
            body: BodyState::Done,
            body_received: 0,
            max_body,
            body_deadline: 0,
            body_grace_ms: crate::config::DEFAULT_HEADER_TIMEOUT.as_millis() as u64,
            body_read: 0,
            body_wait_started: 0,
            pending: BytesMut::new(),
            continue_owed: false,
            http11: true,
            head_request: false,
            keep_alive: true,
            timeout_ms,
            no_wait: false,
            stalled: false,
            stall_logged: false,
            discard_until: 0,
            discarded: 0,
            discard_what: String::new(),
            lingering: false,
            linger_end: 0,
            stdin_stops_at_response: false,
            front_end_nginx: false,
            broken: false,
            aborted: false,
            fcgi_aborted: false,
            fcgi_ended: false,
            body_note: None,
            fcgi_refused: Vec::new(),
            reset_on_close: false,
            pending_file: None,
            peer_eof: false,
            phase: RespPhase::Idle,
            status: 0,
            head: Vec::with_capacity(512),
            framing: RespFraming::NoBody,
            app_length: None,
            app_date: false,
            bytes_sent: 0,
            unwritten: 0,
            logged_headers: None,
            logged_environ: Vec::new(),
            hold: false,
            holding: false,
            out: Vec::new(),
            block_at: None,
            drained_at: None,
            time_drains: false,
            tcp: false,
            drained: false,
            listed: 0,
            me: None,
            read_total: 0,
        }
    }

    /// Reads what the socket has into `buf`, with room for at least `want`
    /// more bytes where that is reasonable. Ok(0) is end of input; a
    /// would-block is `Err(WouldBlock)`.
    pub(crate) fn read_some(&mut self, want: usize) -> io::Result<usize> {
        let want = want.clamp(MIN_READ, READ_CHUNK);
        if self.buf.capacity() - self.buf.len() < want.min(4096)
            || self.buf.capacity() - self.buf.len() < want / 2
        {
            self.buf.reserve(want);
        }
        let spare = self.buf.spare_capacity_mut();
        let room = spare.len();
        let n = unsafe { libc::read(self.fd, spare.as_mut_ptr().cast(), room) };
        self.note_read(n, room)
    }

    /// Takes the outcome `n` of a read of up to `room` bytes into `buf`'s
    /// spare capacity: whether the socket is drained, and the bytes read.
    fn note_read(&mut self, n: isize, room: usize) -> io::Result<usize> {
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                self.drained = true;
                if self.time_drains {
                    self.drained_at = Some(Instant::now());
                }
            }
            return Err(e);
        }
        // A short read took all the socket had; an end of stream is not
        // "empty": no later event will say it again.
        self.drained = n > 0 && (n as usize) < room;
        if self.drained && self.time_drains {
            self.drained_at = Some(Instant::now());
        }
        unsafe { self.buf.set_len(self.buf.len() + n as usize) };
        self.read_total += n as u64;
        Ok(n as usize)
    }

    /// Acknowledges what was read at once, when the rest of a request is
    /// awaited. A peer with Nagle's algorithm on (nginx's upstream
    /// connections, among others) holds back the small last segment of a
    /// request until the ones before it are acknowledged, and Linux delays
    /// that acknowledgement up to 40 ms on a connection it thinks is
    /// interactive: each request with a body of a few tens of KiB on a kept
    /// connection then took 40 ms more.
    pub(crate) fn ack_now(&self) {
        self.tcp_option(libc::TCP_QUICKACK, 1);
    }

    fn tcp_option(&self, option: libc::c_int, value: libc::c_int) {
        if self.tcp {
            unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::IPPROTO_TCP,
                    option,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }

    fn wait(&self, events: i16, blocking: fn(&mut dyn FnMut())) -> bool {
        self.wait_ms(events, self.timeout_ms, blocking)
    }

    /// Waits until the socket takes more of the response; false when the
    /// client read nothing of what it holds for the I/O timeout. The kernel
    /// says writable only once a third of the send buffer is free, which a
    /// client reading slowly but steadily from a large buffer may take
    /// longer than the timeout to free: what it read meanwhile keeps it.
    fn wait_writable(&self, blocking: fn(&mut dyn FnMut())) -> bool {
        loop {
            let before = unsent(self.fd);
            if self.wait(libc::POLLOUT, blocking) {
                return true;
            }
            let after = unsent(self.fd);
            if before < 0 || after < 0 || after >= before {
                return false;
            }
        }
    }

    fn wait_ms(&self, events: i16, timeout: i32, blocking: fn(&mut dyn FnMut())) -> bool {
        let mut ready = false;
        let fd = self.fd;
        blocking(&mut || crate::worker::waiting_on_client(&mut || ready = poll_one(fd, events, timeout)));
        ready
    }

    /// Reads more of the body from the socket, waiting up to the timeout.
    fn fill(&mut self, blocking: fn(&mut dyn FnMut())) -> Result<(), BodyError> {
        if self.continue_owed {
            self.continue_owed = false;
            if self.phase < RespPhase::Sent {
                self.write_parts(&[b"HTTP/1.1 100 Continue\r\n\r\n"], blocking)
                    .map_err(|_| BodyError::Io(libc::EPIPE))?;
            }
        }
        // Room for the rest of a body whose length is known, so it comes in one read.
        let want = match self.body {
            BodyState::Length(left) => left as usize,
            _ => READ_CHUNK,
        };
        if self.body_deadline == 0 {
            self.body_wait_started = crate::date::mono_ms();
            self.body_read = 0;
            self.body_deadline = self.body_wait_started + self.body_grace_ms;
        }
        loop {
            match self.read_some(want) {
                Ok(0) => return Err(BodyError::Truncated),
                Ok(n) => {
                    self.body_read += n as u64;
                    self.body_deadline += n as u64 * 1000 / MIN_BODY_RATE;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.no_wait {
                        return Err(BodyError::WouldWait);
                    }
                    // The client may wait for a held response before it sends more.
                    if self.flush_out(blocking).is_err() {
                        return Err(BodyError::Io(libc::EPIPE));
                    }
                    self.ack_now();
                    let now = crate::date::mono_ms();
                    let left = self.body_deadline.saturating_sub(now);
                    let timeout = (self.timeout_ms as u64).min(left) as i32;
                    // Judged by which limit the wait had, not by the clock after
                    // it: mono_ms is coarse (a few ms), and a wait that ended at
                    // the body's deadline could read as just short of it.
                    let rate_bound = left <= self.timeout_ms as u64;
                    if left == 0 || !self.wait_ms(libc::POLLIN, timeout, blocking) {
                        let now = crate::date::mono_ms();
                        if rate_bound {
                            self.body_note = Some(format!(
                                "the body came slower than {MIN_BODY_RATE} bytes/s after a {} s grace \
                                 ({} bytes in {:.1} s); giving up on it",
                                self.body_grace_ms / 1000,
                                self.body_read,
                                (now - self.body_wait_started) as f64 / 1000.0
                            ));
                        } else {
                            self.body_note = Some(format!(
                                "no more of the body came for {:.1} s (--socket-timeout) after {} bytes; \
                                 giving up on it",
                                f64::from(self.timeout_ms) / 1000.0,
                                self.body_read
                            ));
                        }
                        return Err(BodyError::Timeout);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BodyError::Io(e.raw_os_error().unwrap_or(0))),
            }
        }
    }

    /// Appends up to `max` body bytes to `out`; Ok(0) only at the end of the body.
    pub(crate) fn read_body(
        &mut self,
        out: &mut Vec<u8>,
        max: usize,
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<usize, BodyError> {
        self.read_body_with(max, &mut |d| out.extend_from_slice(d), blocking)
    }

    /// Hands up to `max` body bytes to `sink` (in one call); Ok(0) only at
    /// the end of the body.
    pub(crate) fn read_body_with(
        &mut self,
        max: usize,
        sink: &mut dyn FnMut(&[u8]),
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<usize, BodyError> {
        if max == 0 {
            return Ok(0);
        }
        if !self.pending.is_empty() {
            let n = self.pending.len().min(max);
            sink(&self.pending[..n]);
            self.pending.advance(n);
            return Ok(n);
        }
        loop {
            match &mut self.body {
                BodyState::Done => return Ok(0),
                BodyState::Failed(e) => return Err(*e),
                BodyState::Length(left) => {
                    if self.buf.is_empty() {
                        let left = *left;
                        match self.fill(blocking) {
                            Ok(()) => {}
                            Err(BodyError::Truncated) => {
                                // An error, not end of input: an app must not take
                                // a cut upload for a whole one (uWSGI and mod_wsgi
                                // raise too, and so does an aborted FastCGI request).
                                self.body_note = Some(format!(
                                    "the peer closed its side {left} bytes short of the declared \
                                     Content-Length"
                                ));
                                self.body = BodyState::Failed(BodyError::Truncated);
                                return Err(BodyError::Truncated);
                            }
                            Err(BodyError::WouldWait) => return Err(BodyError::WouldWait),
                            Err(e) => {
                                self.body = BodyState::Failed(e);
                                return Err(e);
                            }
                        }
                        continue;
                    }
                    let n = (self.buf.len() as u64).min(*left).min(max as u64) as usize;
                    sink(&self.buf[..n]);
                    self.buf.advance(n);
                    *left -= n as u64;
                    if *left == 0 {
                        self.body = BodyState::Done;
                    }
                    return Ok(n);
                }
                BodyState::Fcgi(_) => return self.read_fcgi_body(max, sink, blocking),
                BodyState::Chunked(dec) => match dec.decode(&self.buf) {
                    Ok(Chunk::Data { data, consumed }) => {
                        // The whole chunk counts against the limit, also the part
                        // kept in `pending` for the next read.
                        let take = data.len().min(max);
                        let total = self.body_received + data.len() as u64;
                        if total > self.max_body {
                            self.body = BodyState::Failed(BodyError::TooLarge);
                            return Err(BodyError::TooLarge);
                        }
                        sink(&self.buf[data.start..data.start + take]);
                        self.body_received = total;
                        if take < data.len() {
                            // Hand back what did not fit: the decoder counted it as consumed,
                            // so keep it decoded in `pending`.
                            self.pending.extend_from_slice(&self.buf[data.start + take..data.end]);
                        }
                        self.buf.advance(consumed);
                        return Ok(take);
                    }
                    Ok(Chunk::NeedMore { consumed }) => {
                        self.buf.advance(consumed);
                        // The client closing inside a chunked body is a
                        // disconnect, as inside a Content-Length one: not a
                        // malformed body.
                        if let Err(e) = self.fill(blocking) {
                            if e == BodyError::WouldWait {
                                return Err(e);
                            }
                            if e == BodyError::Truncated {
                                self.body_note = Some(format!(
                                    "the peer closed its side inside the chunked body ({} bytes of it received)",
                                    self.body_received
                                ));
                            }
                            self.body = BodyState::Failed(e);
                            return Err(e);
                        }
                    }
                    Ok(Chunk::End { consumed }) => {
                        self.buf.advance(consumed);
                        self.body = BodyState::Done;
                        return Ok(0);
                    }
                    Err(e) => {
                        self.body = BodyState::Failed(BodyError::Framing(e));
                        return Err(BodyError::Framing(e));
                    }
                },
            }
        }
    }

    /// Appends bytes up to and including the next LF (or `max` bytes, or the end).
    pub(crate) fn read_line(
        &mut self,
        out: &mut Vec<u8>,
        max: usize,
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<usize, BodyError> {
        let start = out.len();
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let n = (i + 1).min(max - (out.len() - start));
                out.extend_from_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Ok(out.len() - start);
            }
            let room = max - (out.len() - start);
            if self.pending.len() >= room {
                out.extend_from_slice(&self.pending[..room]);
                self.pending.advance(room);
                return Ok(out.len() - start);
            }
            // No newline yet and room left: keep what is pending and fetch
            // more. `pending` is empty afterwards, so read_body reads fresh
            // bytes rather than serving the same ones again.
            out.extend_from_slice(&self.pending);
            self.pending.clear();
            let mut chunk = Vec::new();
            let n = self.read_body(&mut chunk, READ_CHUNK, blocking)?;
            if n == 0 {
                return Ok(out.len() - start);
            }
            let rest = std::mem::take(&mut self.pending);
            self.pending.extend_from_slice(&chunk);
            self.pending.extend_from_slice(&rest);
        }
    }

    /// Whether the rest of a chunked request body the app left unread is
    /// known: all of it, to its last chunk (dropping it needs no more from
    /// the client), or framing that is malformed (dropping it finds that,
    /// logs it and closes). What the socket holds already is read for it,
    /// without waiting, while the buffer stays within [`MAX_DRAIN`], the
    /// most that is dropped to keep a connection: a client that sent its
    /// whole body before the app answered without reading it (a 401, a
    /// redirect) keeps its connection.
    fn chunked_rest_arrived(&mut self) -> bool {
        let BodyState::Chunked(dec) = &self.body else { return false };
        let mut dec = dec.clone();
        let mut at = 0;
        loop {
            loop {
                match dec.decode(&self.buf[at..]) {
                    Ok(Chunk::Data { consumed, .. }) if consumed > 0 => at += consumed,
                    Ok(Chunk::End { .. }) | Err(_) => return true,
                    _ => break,
                }
            }
            let room = (MAX_DRAIN as usize).saturating_sub(self.buf.len());
            if !self.keep_alive || self.peer_eof || room == 0 {
                return false;
            }
            match self.read_at_most(room.min(READ_CHUNK)) {
                Ok(0) => {
                    self.peer_eof = true;
                    return false;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// [`Io::read_some`] taking at most `max` bytes.
    fn read_at_most(&mut self, max: usize) -> io::Result<usize> {
        self.buf.reserve(max);
        let spare = self.buf.spare_capacity_mut();
        let room = max.min(spare.len());
        let n = unsafe { libc::read(self.fd, spare.as_mut_ptr().cast(), room) };
        self.note_read(n, room)
    }

    pub(crate) fn body_finished(&self) -> bool {
        matches!(self.body, BodyState::Done) && self.pending.is_empty()
    }

    /// The FastCGI side of [`Io::read_body_with`]: STDIN content of the
    /// active request, skipping padding and dealing with whatever other
    /// records the front end interleaves.
    fn read_fcgi_body(
        &mut self,
        max: usize,
        sink: &mut dyn FnMut(&[u8]),
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<usize, BodyError> {
        let Wire::FastCgi { id, .. } = self.wire else {
            return Ok(0);
        };
        loop {
            let BodyState::Fcgi(st) = &mut self.body else {
                return Ok(0);
            };
            if st.content > 0 && !self.buf.is_empty() && st.left == Some(0) {
                let n = self.buf.len().min(st.content);
                st.content -= n;
                st.surplus += n as u64;
                self.buf.advance(n);
                if st.surplus > MAX_DRAIN {
                    let e = BodyError::Gateway("STDIN runs on far past CONTENT_LENGTH");
                    self.body = BodyState::Failed(e);
                    return Err(e);
                }
                continue;
            }
            if st.content > 0 && !self.buf.is_empty() {
                let n = self.buf.len().min(st.content).min(max);
                let n = st.left.map_or(n, |left| n.min(left.min(usize::MAX as u64) as usize));
                let total = self.body_received + n as u64;
                if total > self.max_body {
                    self.body = BodyState::Failed(BodyError::TooLarge);
                    return Err(BodyError::TooLarge);
                }
                st.content -= n;
                if let Some(left) = &mut st.left {
                    *left -= n as u64;
                }
                sink(&self.buf[..n]);
                self.buf.advance(n);
                self.body_received = total;
                return Ok(n);
            }
            if st.content == 0 && st.padding > 0 && !self.buf.is_empty() {
                let n = self.buf.len().min(st.padding);
                st.padding -= n;
                self.buf.advance(n);
                continue;
            }
            if st.content == 0 && st.padding == 0 {
                if st.ended {
                    if st.surplus > 0 {
                        self.body_note = Some(format!(
                            "the front end sent {} bytes of STDIN past CONTENT_LENGTH; the app did not see them",
                            st.surplus
                        ));
                    } else if st.left.is_some_and(|l| l > 0) {
                        // An error, not end of input, as a short body is over
                        // uwsgi and SCGI: an app must not take a cut upload
                        // for a whole one. The front end waits for the answer.
                        let e = BodyError::Gateway("STDIN ended short of CONTENT_LENGTH");
                        self.body = BodyState::Failed(e);
                        return Err(e);
                    }
                    self.body = BodyState::Done;
                    return Ok(0);
                }
                match gateway::next_stdin(&self.buf, id) {
                    Ok(Some(gateway::StdinStep::Data { header, content, padding })) => {
                        self.buf.advance(header);
                        *st = FcgiIn { content, padding, ended: content == 0, ..*st };
                        continue;
                    }
                    Ok(Some(gateway::StdinStep::Other { used, stray })) => {
                        let mut out = Vec::new();
                        let action = {
                            let rec = &self.buf[..used];
                            gateway::stray_record(rec, Some(id), &mut out)
                        };
                        self.buf.advance(used);
                        if !out.is_empty() {
                            self.write_parts(&[&out], blocking).map_err(|_| BodyError::Io(libc::EPIPE))?;
                        }
                        if let Stray::Concurrent(other) = action {
                            self.fcgi_refused.push(other);
                        }
                        if action == Stray::BegunTwice {
                            let e = BodyError::Gateway(gateway::BEGUN_TWICE);
                            self.body = BodyState::Failed(e);
                            return Err(e);
                        }
                        if action == Stray::AbortActive || stray == Stray::AbortActive {
                            self.fcgi_aborted = true;
                            self.body = BodyState::Failed(BodyError::Aborted);
                            return Err(BodyError::Aborted);
                        }
                        continue;
                    }
                    // Every byte CONTENT_LENGTH announced has come: the app
                    // has its whole body and waits for no end record, which
                    // HAProxy 2.6 never sends for an empty chunked upload
                    // (CONTENT_LENGTH 0 and no STDIN at all). Should it come
                    // after all, it is dropped with the records between
                    // requests.
                    Ok(None) if st.declared_in() && self.buf.is_empty() => {
                        self.body = BodyState::Done;
                        return Ok(0);
                    }
                    Ok(None) => {}
                    Err(m) => {
                        let e = BodyError::Gateway(m);
                        self.body = BodyState::Failed(e);
                        return Err(e);
                    }
                }
            }
            if let Err(e) = self.fill(blocking) {
                let e = match e {
                    // While the app reads: its client went away in the middle
                    // of an upload (the front end closes), as over uwsgi and
                    // SCGI, and said once with what had come of it.
                    BodyError::Truncated if self.phase != RespPhase::Finished => {
                        self.body_note = Some(format!(
                            "the front end closed the connection inside the body ({} bytes of it received{})",
                            self.body_received,
                            match &self.body {
                                BodyState::Fcgi(FcgiIn { left: Some(left), .. }) => {
                                    format!(", {left} short of CONTENT_LENGTH")
                                }
                                _ => String::new(),
                            }
                        ));
                        e
                    }
                    BodyError::Truncated => BodyError::Gateway(FCGI_CLOSED_IN_BODY),
                    e => e,
                };
                self.body = BodyState::Failed(e);
                return Err(e);
            }
        }
    }

    /// Writes response bytes in the connection's framing: as they are, or in
    /// FastCGI STDOUT records followed by `trailer` as it is.
    fn emit(
        &mut self,
        parts: &[&[u8]],
        trailer: &[u8],
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        let Wire::FastCgi { id, .. } = self.wire else {
            return self.write_parts(parts, blocking);
        };
        if self.fcgi_aborted {
            return Err(ResponseError::ClientGone("the front end aborted the request".into()));
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 {
            return self.write_parts(&[trailer], blocking);
        }
        // One record header per RECORD bytes of content, each followed by the
        // slices of `parts` it covers; written a batch of records at a time.
        const RECORD: usize = fastcgi::MAX_ALIGNED_CONTENT_LEN;
        const BATCH: usize = 128;
        let records = total.div_ceil(RECORD);
        let mut headers: Vec<[u8; 8]> = Vec::with_capacity(records.min(BATCH));
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 * records.min(BATCH) + parts.len());
        let (mut part, mut offset) = (0usize, 0usize);
        let mut left = total;
        while left > 0 {
            headers.clear();
            iov.clear();
            let mut lens = Vec::with_capacity(BATCH);
            while left > 0 && headers.len() < BATCH {
                let n = left.min(RECORD);
                headers.push(gateway::record_header(fastcgi::RecordType::Stdout, id, n));
                lens.push(n);
                left -= n;
            }
            for (h, &n) in headers.iter().zip(&lens) {
                iov.push(libc::iovec { iov_base: h.as_ptr() as *mut _, iov_len: 8 });
                let mut want = n;
                while want > 0 {
                    let p = parts[part];
                    let take = (p.len() - offset).min(want);
                    if take > 0 {
                        iov.push(libc::iovec { iov_base: p[offset..].as_ptr() as *mut _, iov_len: take });
                    }
                    offset += take;
                    want -= take;
                    if offset == p.len() {
                        part += 1;
                        offset = 0;
                    }
                }
            }
            if left == 0 && !trailer.is_empty() {
                iov.push(libc::iovec { iov_base: trailer.as_ptr() as *mut _, iov_len: trailer.len() });
            }
            self.writev_all(&mut iov, blocking)?;
        }
        Ok(())
    }

    /// Writes all of `parts` (one writev where possible), waiting for the socket
    /// when it is full.
    pub(crate) fn write_parts(
        &mut self,
        parts: &[&[u8]],
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        if self.broken {
            self.unwritten = parts.iter().map(|p| p.len()).sum();
            return Err(ResponseError::ClientGone("connection already failed".into()));
        }
        let mut iov: [libc::iovec; 4] = unsafe { std::mem::zeroed() };
        let mut cnt = 0;
        for p in parts.iter().filter(|p| !p.is_empty()) {
            iov[cnt] = libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() };
            cnt += 1;
        }
        self.writev_all(&mut iov[..cnt], blocking)
    }

    /// Writes every byte `iov` points to, waiting for the socket when it is full.
    fn writev_all(
        &mut self,
        iov: &mut [libc::iovec],
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        // Counted only when nothing of `iov` goes out: not on every write.
        let whole = |iov: &[libc::iovec]| iov.iter().map(|v| v.iov_len).sum();
        if self.broken {
            self.unwritten = whole(iov);
            return Err(ResponseError::ClientGone("connection already failed".into()));
        }
        if let Err(e) = self.finish_pending_file(blocking) {
            self.unwritten = whole(iov);
            return Err(e);
        }
        // Held only with the promise that it goes out within the flusher's HOLD.
        if self.holding && self.arm() {
            self.out.reserve(iov.iter().map(|v| v.iov_len).sum());
            for v in iov.iter() {
                // SAFETY: each iovec points into a slice borrowed for this call.
                self.out.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                });
            }
            return Ok(());
        }
        if !self.out.is_empty() {
            // Held bytes first, in the same system call.
            let mut out = std::mem::take(&mut self.out);
            let mut all = Vec::with_capacity(iov.len() + 1);
            all.push(libc::iovec { iov_base: out.as_mut_ptr().cast(), iov_len: out.len() });
            all.extend_from_slice(iov);
            let result = self.writev_raw(&mut all, blocking);
            out.clear();
            self.out = out;
            return result;
        }
        self.writev_raw(iov, blocking)
    }

    fn writev_raw(
        &mut self,
        iov: &mut [libc::iovec],
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        let cnt = iov.len();
        let mut first = 0;
        // Set on each failure (the only time it is read), not on each success.
        let left = |iov: &[libc::iovec], first: usize| iov[first..].iter().map(|v| v.iov_len).sum::<usize>();
        while first < cnt {
            let batch = (cnt - first).min(1024);
            let n = unsafe { libc::writev(self.fd, iov[first..].as_ptr(), batch as i32) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        if !self.wait_writable(blocking) {
                            self.broken = true;
                            self.stalled = true;
                            self.unwritten = left(iov, first);
                            return Err(ResponseError::ClientGone(crate::exchange::STALLED_READER.into()));
                        }
                        continue;
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.broken = true;
                        self.unwritten = left(iov, first);
                        return Err(ResponseError::ClientGone(e.to_string()));
                    }
                }
            }
            let mut n = n as usize;
            while n > 0 && first < cnt {
                let len = iov[first].iov_len;
                if n >= len {
                    n -= len;
                    first += 1;
                } else {
                    iov[first].iov_base = unsafe { (iov[first].iov_base as *mut u8).add(n) }.cast();
                    iov[first].iov_len -= n;
                    n = 0;
                }
            }
            while first < cnt && iov[first].iov_len == 0 {
                first += 1;
            }
        }
        Ok(())
    }

    /// Writes the held response bytes, if any.
    pub(crate) fn flush_out(&mut self, blocking: fn(&mut dyn FnMut())) -> Result<(), ResponseError> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.writev_all(&mut [], blocking)
    }

    /// Finishes the buffered head: date, framing and connection headers.
    /// `known_len` is the whole body's length when the app handed it over in
    /// one piece, so a Content-Length can replace chunking.
    fn seal_head(&mut self, known_len: Option<u64>) {
        let no_body = self.head_request || self.status < 200 || matches!(self.status, 204 | 205 | 304);
        if self.status == 205 {
            // A 205 has no content (RFC 9110 15.3.6) and says so, so that
            // the connection can carry the next request; what the app gave
            // as a body is dropped, as for HEAD.
            self.head.extend_from_slice(b"Content-Length: 0\r\n");
        }
        if self.wire != Wire::Http {
            // The front end frames the response for its client and adds Date
            // and Connection itself; a length lets it keep that connection.
            self.framing = match (self.app_length, no_body, known_len) {
                // As over HTTP (below): HEAD gets the length GET would have.
                (None, true, Some(n))
                    if self.head_request && n > 0 && !matches!(self.status, 204 | 205 | 304) =>
                {
                    self.head.extend_from_slice(b"Content-Length: ");
                    self.head.extend_from_slice(itoa(n, &mut [0u8; 20]));
                    self.head.extend_from_slice(b"\r\n");
                    RespFraming::NoBody
                }
                (_, true, _) => RespFraming::NoBody,
                (Some(n), false, _) => RespFraming::Length(n),
                (None, false, Some(n)) => {
                    self.head.extend_from_slice(b"Content-Length: ");
                    self.head.extend_from_slice(itoa(n, &mut [0u8; 20]));
                    self.head.extend_from_slice(b"\r\n");
                    RespFraming::Length(n)
                }
                (None, false, None) => RespFraming::Raw,
            };
            self.head.extend_from_slice(b"\r\n");
            return;
        }
        self.framing = match (self.app_length, no_body) {
            (Some(n), false) => RespFraming::Length(n),
            (None, true) if self.head_request && !matches!(self.status, 204 | 205 | 304) => {
                // The Content-Length a GET would have had (RFC 9110 9.3.2),
                // when the app gave its whole body at once. An empty one is
                // no evidence: frameworks (Werkzeug) return no body for HEAD
                // whatever GET would send.
                if let Some(n) = known_len.filter(|&n| n > 0) {
                    self.head.extend_from_slice(b"Content-Length: ");
                    self.head.extend_from_slice(itoa(n, &mut [0u8; 20]));
                    self.head.extend_from_slice(b"\r\n");
                }
                RespFraming::NoBody
            }
            (_, true) => RespFraming::NoBody,
            (None, false) => match known_len {
                Some(n) => {
                    self.head.extend_from_slice(b"Content-Length: ");
                    self.head.extend_from_slice(itoa(n, &mut [0u8; 20]));
                    self.head.extend_from_slice(b"\r\n");
                    RespFraming::Length(n)
                }
                None if self.http11 => {
                    self.head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
                    RespFraming::Chunked
                }
                None => {
                    self.keep_alive = false;
                    RespFraming::Close
                }
            },
        };
        if crate::worker::draining() && !self.pipelined() {
            // Tell the client now rather than close under it after this
            // response. A request the client already sent behind this one
            // is served first: its last response says so.
            self.keep_alive = false;
        }
        if matches!(self.body, BodyState::Failed(_)) {
            // The body's framing is lost: nothing after it can be parsed.
            self.keep_alive = false;
        }
        if self.continue_owed && !self.body_finished() {
            // The client is waiting for permission to send a body nobody will
            // read: the connection cannot be reused.
            self.keep_alive = false;
        }
        if matches!(self.body, BodyState::Length(left) if left > MAX_DRAIN)
            || self.wire == Wire::Http
                && matches!(self.body, BodyState::Chunked(_))
                && !self.chunked_rest_arrived()
        {
            // Unless the app reads it after all, more body than the engine
            // discards may still be to come (a chunked body's rest has no
            // known size), and the connection will close: say so (RFC 9112
            // 9.6), so that no client or proxy reuses it meanwhile.
            self.keep_alive = false;
        }
        if !self.app_date {
            date::append_date_header(&mut self.head);
        }
        if !self.keep_alive {
            if self.http11 {
                self.head.extend_from_slice(b"Connection: close\r\n");
            }
        } else if !self.http11 {
            self.head.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        self.head.extend_from_slice(b"\r\n");
    }

    /// Sends `data` as body bytes (with the head first if it is still buffered).
    pub(crate) fn write_body(
        &mut self,
        data: &[u8],
        last: bool,
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        let head = match self.phase {
            RespPhase::Idle => return Err(ResponseError::NotStarted),
            RespPhase::Started => {
                self.seal_head(if last { Some(data.len() as u64) } else { None });
                self.phase = RespPhase::Sent;
                std::mem::take(&mut self.head)
            }
            RespPhase::Sent => Vec::new(),
            RespPhase::Finished => return Ok(()),
        };
        // The whole response in this one write (or the last block of it):
        // no later block of the body can be kept waiting behind it.
        let whole = !head.is_empty()
            && (last || matches!(self.framing, RespFraming::Length(n) if n <= data.len() as u64));
        self.holding = self.hold && whole && self.out.len() + head.len() + data.len() <= HOLD_MAX;
        if !whole && !data.is_empty() {
            self.holding = self.gather(data.len());
        }
        // Room for the empty STDOUT record, END_REQUEST and a last
        // request's notice, so that writing them does not grow it twice.
        let mut trailer = match self.wire {
            Wire::FastCgi { .. } if last => Vec::with_capacity(4 * fastcgi::HEADER_LEN + 8),
            _ => Vec::new(),
        };
        if let Wire::FastCgi { id, .. } = self.wire {
            if !last {
                if let Err(e) = self.check_fcgi_abort() {
                    // Nothing more is held for this response: what was held
                    // (a previous response on the connection) must go out with
                    // the END_REQUEST the abort is owed, not wait for a later
                    // write that may never come.
                    self.holding = false;
                    return Err(e);
                }
            } else if self.completes_body(data.len()) && self.fcgi_stdin_in() {
                // The whole body: END_REQUEST goes out in the same write.
                self.refuse_concurrent_fcgi(&mut trailer);
                if self.keep_alive && !crate::worker::fastcgi_conn_may_stay() {
                    // As in end_fcgi_request: the drain began while the app ran.
                    self.keep_alive = false;
                }
                fastcgi::write_stream_end(&mut trailer, fastcgi::RecordType::Stdout, id);
                fastcgi::write_end_request(&mut trailer, id, 0, fastcgi::ProtocolStatus::RequestComplete);
                self.push_last_notice(&mut trailer);
            }
        }
        let result = if trailer.is_empty() {
            self.send_framed(&head, data, &trailer, blocking)
        } else {
            self.ending(|io| io.send_framed(&head, data, &trailer, blocking))
        };
        // Ended only once END_REQUEST went out (or is held to go out): a
        // request the front end aborted meanwhile sends nothing here and is
        // still owed its END_REQUEST.
        self.fcgi_ended |= !trailer.is_empty() && result.is_ok();
        self.holding = false;
        if self.head.capacity() == 0 {
            self.head = head;
            self.head.clear();
        }
        result
    }

    /// Whether a block of `len` bytes of a streamed body may be gathered
    /// rather than written now: it follows the previous block within
    /// STREAM_BURST (the flusher writes it within its HOLD if nothing else
    /// does, see `arm`).
    fn gather(&mut self, len: usize) -> bool {
        let now = Instant::now();
        let quick = self.block_at.is_some_and(|t| now.duration_since(t) < STREAM_BURST);
        self.block_at = Some(now);
        // Room for the block and its framing (a chunk-size line, or a
        // FastCGI record header and END_REQUEST).
        quick && len <= GATHER_BLOCK_MAX && self.out.len() + len + 64 <= GATHER_MAX
    }

    /// Makes sure what this connection holds goes out within
    /// [`flusher::HOLD`], whatever the app or this connection's thread do
    /// meanwhile. False (and nothing may be held) without that promise.
    fn arm(&mut self) -> bool {
        let Some(me) = self.me.as_ref().and_then(Weak::upgrade) else {
            return false;
        };
        flusher::promise(&me, &mut self.listed)
    }

    /// The flusher's turn: writes what the socket takes now of the held
    /// bytes, without waiting; what remains is tried again later.
    pub(crate) fn flush_held_nowait(&mut self) {
        if self.broken {
            self.out.clear();
        }
        while !self.out.is_empty() {
            let n = unsafe { libc::write(self.fd, self.out.as_ptr().cast(), self.out.len()) };
            if n >= 0 {
                self.out.drain(..n as usize);
                continue;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return,
                _ => {
                    // The app's next write reports the failure.
                    self.broken = true;
                    self.out.clear();
                }
            }
        }
    }

    /// Whether writing `len` more body bytes leaves nothing owed under the
    /// response's framing.
    fn completes_body(&self, len: usize) -> bool {
        match self.framing {
            RespFraming::NoBody | RespFraming::Raw => true,
            RespFraming::Length(left) => left <= len as u64,
            RespFraming::Close | RespFraming::Chunked => false,
        }
    }

    /// `trailer` goes out after the framed bytes, as it is (FastCGI's end records).
    fn send_framed(
        &mut self,
        head: &[u8],
        data: &[u8],
        trailer: &[u8],
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        match self.framing {
            RespFraming::NoBody => self.emit(&[head], trailer, blocking),
            RespFraming::Close | RespFraming::Raw => {
                self.bytes_sent += data.len() as u64;
                let sent = self.emit(&[head, data], trailer, blocking);
                self.uncount_unwritten(&sent, data.len(), 0);
                sent
            }
            RespFraming::Length(left) => {
                // Bytes past the declared length would be read as the next
                // response by the client: drop them, as gunicorn does.
                let n = (data.len() as u64).min(left) as usize;
                if n < data.len() && self.body_note.is_none() {
                    self.body_note = Some(format!(
                        "the app sent more than its Content-Length ({} bytes); the rest was not sent",
                        self.app_length.unwrap_or_default()
                    ));
                }
                self.framing = RespFraming::Length(left - n as u64);
                self.bytes_sent += n as u64;
                let sent = self.emit(&[head, &data[..n]], trailer, blocking);
                self.uncount_unwritten(&sent, n, 0);
                sent
            }
            RespFraming::Chunked => {
                if data.is_empty() {
                    return self.write_parts(&[head], blocking);
                }
                let mut size = [0u8; 18];
                let len = hex_line(data.len(), &mut size);
                self.bytes_sent += data.len() as u64;
                let sent = self.write_parts(&[head, &size[..len], data, b"\r\n"], blocking);
                self.uncount_unwritten(&sent, data.len(), 2);
                sent
            }
        }
    }

    /// After a write of a body block of `len` bytes followed by `after`
    /// bytes of framing failed: the block's bytes that did not go out are
    /// taken off the count the access log shows. (Behind FastCGI, whose
    /// records interleave headers with the body, the count stays as it was.)
    fn uncount_unwritten(&mut self, sent: &Result<(), ResponseError>, len: usize, after: usize) {
        if sent.is_err() && !matches!(self.wire, Wire::FastCgi { .. }) {
            let lost = self.unwritten.saturating_sub(after).min(len);
            self.bytes_sent = self.bytes_sent.saturating_sub(lost as u64);
        }
    }

    /// While a FastCGI response streams, looks (without waiting) for what
    /// the front end sent meanwhile: ABORT_REQUEST ends the request, a closed
    /// connection ends the exchange. Other records stay buffered for later.
    fn check_fcgi_abort(&mut self) -> Result<(), ResponseError> {
        let Wire::FastCgi { id, .. } = self.wire else {
            return Ok(());
        };
        let Some(from) = self.peek_fcgi_records(true) else {
            return Ok(());
        };
        if gateway::has_abort(&self.buf[from..], id) {
            self.fcgi_aborted = true;
            return Err(ResponseError::ClientGone(
                "the front end aborted the request (ABORT_REQUEST)".into(),
            ));
        }
        Ok(())
    }

    /// Reads (without waiting) what the front end sent while the request
    /// ran, and returns where the next whole record starts in the buffer,
    /// past the STDIN bytes the app has not read: `None` when that is not
    /// known. Without `read`, looks at what is buffered only.
    fn peek_fcgi_records(&mut self, read: bool) -> Option<usize> {
        let from = match &self.body {
            BodyState::Done => 0,
            BodyState::Fcgi(st) => st.content + st.padding,
            _ => return None,
        };
        // Bounded, for a large body the app ignores: an ABORT_REQUEST
        // behind it is found when the body is drained instead.
        if read && !self.peer_eof && self.buf.len() < PEEK_MAX {
            if let Ok(0) = self.read_some(fastcgi::HEADER_LEN) {
                // A half-close, as Apache's mod_proxy_fcgi does once it has sent
                // the request: the response still goes out. A front end that is
                // really gone shows up as a failed write.
                self.peer_eof = true;
            }
        }
        (from <= self.buf.len()).then_some(from)
    }

    /// Before END_REQUEST goes out: second requests the front end began on
    /// this connection while it was still sending this one's STDIN get
    /// CANT_MPX_CONN (appended to `out`), as they would while this request's
    /// streams were read. Once the whole STDIN is in, whatever follows is
    /// the next request and is served after this one.
    fn refuse_concurrent_fcgi(&mut self, out: &mut Vec<u8>) {
        let Wire::FastCgi { id, .. } = self.wire else {
            return;
        };
        if matches!(self.body, BodyState::Done) {
            return;
        }
        let quiet = self.drained_at.is_some_and(|t| t.elapsed() < PEEK_QUIET);
        if let Some(from) = self.peek_fcgi_records(!quiet) {
            let refused = gateway::refuse_concurrent_begins(&mut self.buf, from, id, out);
            self.fcgi_refused.extend(refused);
        }
    }

    /// Completes the response. Returns an error when the app sent fewer bytes
    /// than its Content-Length, in which case the connection must close.
    pub(crate) fn finish(&mut self, blocking: fn(&mut dyn FnMut())) -> Result<(), ResponseError> {
        self.finish_pending_file(blocking)?;
        match self.phase {
            RespPhase::Idle => return Err(ResponseError::NotStarted),
            RespPhase::Started => self.write_body(b"", true, blocking)?,
            RespPhase::Sent => {}
            RespPhase::Finished => return Ok(()),
        }
        self.phase = RespPhase::Finished;
        // The app is done: what is left is the response's tail.
        self.holding = self.hold && self.out.len() < HOLD_MAX;
        let result = self.finish_framing(blocking);
        self.holding = false;
        result
    }

    fn finish_framing(&mut self, blocking: fn(&mut dyn FnMut())) -> Result<(), ResponseError> {
        match self.framing {
            RespFraming::Chunked => self.write_parts(&[b"0\r\n\r\n"], blocking),
            RespFraming::Length(left) if left > 0 => {
                // Over FastCGI too the front end then sees the connection
                // close without END_REQUEST: never a short body as a whole one.
                // A front end is told with a reset: one that does not count
                // the body (Apache over SCGI passes it on as whole, nginx over
                // FastCGI keeps its client waiting) sees an error then.
                self.keep_alive = false;
                if self.wire != Wire::Http {
                    self.aborted = true;
                }
                Err(ResponseError::Invalid(match self.app_length {
                    Some(n) => format!(
                        "the app declared Content-Length {n} but sent {} bytes; closing the connection",
                        self.bytes_sent
                    ),
                    None => format!(
                        "the body ended after {} of the {} bytes its file had when the response \
                         started; closing the connection",
                        self.bytes_sent,
                        self.bytes_sent + left
                    ),
                }))
            }
            // END_REQUEST waits for the rest of STDIN, dropped first (see
            // `fcgi_stdin_in`).
            _ => match self.fcgi_stdin_in() {
                true => self.end_fcgi_request(blocking),
                false => Ok(()),
            },
        }
    }

    /// Whether the front end has sent the whole STDIN of this FastCGI
    /// request, which END_REQUEST must not come before: HAProxy stops
    /// passing on the client's body once it has END_REQUEST, and its client,
    /// still sending the body the app did not read, then waits for HAProxy's
    /// timeout while corral waits for the rest of the body. Looked for in
    /// what is buffered, then in what the socket holds (a body the front end
    /// sent whole, as nginx does, is there by now); when it is not, the
    /// response goes out without END_REQUEST, which follows once the rest
    /// of the body was read and dropped, or given up on (see
    /// `complete_locked`).
    fn fcgi_stdin_in(&mut self) -> bool {
        let Wire::FastCgi { id, .. } = self.wire else {
            return true;
        };
        // Its end read (the app may not have taken all of it yet), or a STDIN
        // that broke, which is read no further: nothing to wait for.
        if matches!(self.body, BodyState::Done | BodyState::Failed(_)) || self.fcgi_aborted {
            return true;
        }
        let ends = |io: &Io, from: usize| gateway::stdin_ends(&io.buf[from..], id);
        if self.peek_fcgi_records(false).is_some_and(|from| ends(self, from)) {
            return true;
        }
        // Read for it as `refuse_concurrent_fcgi` does, not again right
        // after the socket was found empty.
        let quiet = self.drained_at.is_some_and(|t| t.elapsed() < PEEK_QUIET);
        if !quiet && self.peek_fcgi_records(true).is_some_and(|from| ends(self, from)) {
            return true;
        }
        if matches!(&self.body, BodyState::Fcgi(st) if st.declared_in()) && self.buf.is_empty() {
            // Nothing of the body is left to come but its end record, which
            // may never come (see `read_fcgi_body`).
            self.body = BodyState::Done;
            return true;
        }
        if self.stdin_stops_at_response {
            // nginx sends no more of it once it has the response's head, and
            // waits for END_REQUEST: waiting for the rest held the response
            // until the wait gave up. The connection closes after it (nginx
            // would not keep it either); the record behind END_REQUEST keeps
            // it out of nginx's pool should nginx have sent the whole body
            // after all (see `push_last_notice`).
            self.keep_alive = false;
            return true;
        }
        false
    }

    /// Ends a FastCGI request: the empty STDOUT record and END_REQUEST.
    pub(crate) fn end_fcgi_request(&mut self, blocking: fn(&mut dyn FnMut())) -> Result<(), ResponseError> {
        let Wire::FastCgi { id, .. } = self.wire else {
            return Ok(());
        };
        if self.fcgi_ended {
            return Ok(());
        }
        self.fcgi_ended = true;
        let mut out = Vec::with_capacity(48);
        if !self.fcgi_aborted {
            self.refuse_concurrent_fcgi(&mut out);
        }
        fastcgi::write_stream_end(&mut out, fastcgi::RecordType::Stdout, id);
        fastcgi::write_end_request(&mut out, id, 0, fastcgi::ProtocolStatus::RequestComplete);
        if self.keep_alive && !crate::worker::fastcgi_conn_may_stay() {
            // The drain began while this request ran: the connection would
            // otherwise sit idle until the drain's linger closes it, perhaps
            // as the front end sends its next request on it.
            self.keep_alive = false;
        }
        self.push_last_notice(&mut out);
        self.ending(|io| io.write_parts(&[&out], blocking))
    }

    /// Whether the front end kept this FastCGI connection for its next
    /// request but it closes after this one (a draining worker with no
    /// sibling to take it).
    fn last_on_kept_conn(&self) -> bool {
        matches!(self.wire, Wire::FastCgi { keep_conn: true, .. }) && !self.keep_alive
    }

    /// On a kept FastCGI connection that closes after this request, puts an
    /// empty FCGI_GET_VALUES_RESULT (a management record, which a front end
    /// may get at any time) right behind END_REQUEST, in the same write.
    /// nginx puts a connection back in its pool only when END_REQUEST ends
    /// what it read; a byte after it makes it close the connection. This
    /// does on a unix socket what the FIN in END_REQUEST's segment does over
    /// TCP (see [`Io::ending`]), where nothing sends the two together: a
    /// reader that ran between the write and the shutdown put the
    /// connection back and sent its next request on it, a 502 for a POST.
    ///
    /// Only for nginx: a front end that checks a pooled connection by
    /// peeking at it (Apache's mod_proxy) takes the record for a sign of
    /// life, and sends its next request on the connection as it closes.
    fn push_last_notice(&self, out: &mut Vec<u8>) {
        if self.last_on_kept_conn() && self.front_end_nginx {
            // Empty: within any length limit.
            let _ = fastcgi::write_get_values_result(out, &[]);
        }
    }

    /// Runs `write`, the one that sends END_REQUEST, and makes it the
    /// connection's last when the front end kept this FastCGI connection for
    /// its next request but it closes after this one (a draining worker
    /// with no sibling to take it). FastCGI has no way to
    /// say so, so the FIN goes with END_REQUEST, in one segment (corked):
    /// nginx then sees the end of the connection as it reads the end of the
    /// response and does not put it back in its pool. Sent a moment later,
    /// the FIN met the next request nginx had already written on the
    /// connection, a 502 for a POST. (A unix socket has no cork; the FIN
    /// follows at once, and the record [`Io::push_last_notice`] puts behind
    /// END_REQUEST keeps the connection out of the pool meanwhile.)
    fn ending(
        &mut self,
        write: impl FnOnce(&mut Io) -> Result<(), ResponseError>,
    ) -> Result<(), ResponseError> {
        if !self.last_on_kept_conn() {
            return write(self);
        }
        self.holding = false;
        self.tcp_option(libc::TCP_CORK, 1);
        let result = write(self);
        if result.is_ok() {
            unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
        }
        self.tcp_option(libc::TCP_CORK, 0);
        result
    }

    /// Sends `count` bytes of `file` from `offset` with sendfile(2).
    pub(crate) fn sendfile(
        &mut self,
        file: RawFd,
        offset: i64,
        count: u64,
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        let count = self.begin_file(count, blocking)?;
        match self.framing {
            RespFraming::NoBody => return Ok(()),
            // A chunk of size 0 is the last-chunk: it would end the body here.
            RespFraming::Chunked if count == 0 => return Ok(()),
            RespFraming::Chunked => {
                let mut size = [0u8; 18];
                let len = hex_line(count as usize, &mut size);
                self.write_parts(&[&size[..len]], blocking)?;
            }
            _ => {}
        }
        let before = self.bytes_sent;
        self.send_span(file, &mut Span { offset, left: count, owed: 0 }, blocking)?;
        if self.framing == RespFraming::Chunked {
            if self.bytes_sent - before < count {
                // The chunk size was announced; a short file cannot be framed.
                self.broken = true;
                self.reset_on_close = true;
                return Err(ResponseError::Invalid("file ended before its announced size".into()));
            }
            self.write_parts(&[b"\r\n"], blocking)?;
        }
        Ok(())
    }
}

impl Io {
    /// Sends the head if it has not gone out yet; returns how many of the
    /// file's `count` bytes the response's framing has room for.
    fn begin_file(&mut self, count: u64, blocking: fn(&mut dyn FnMut())) -> Result<u64, ResponseError> {
        self.finish_pending_file(blocking)?;
        self.flush_out(blocking)?;
        let mut count = match self.framing {
            RespFraming::Length(left) if self.phase == RespPhase::Sent => count.min(left),
            _ => count,
        };
        if self.phase == RespPhase::Started {
            // Head first; when the app gave no length this file is the whole body.
            let head_len = if self.app_length.is_none() { Some(count) } else { None };
            self.seal_head(head_len);
            self.phase = RespPhase::Sent;
            let head = std::mem::take(&mut self.head);
            self.emit(&[&head], &[], blocking)?;
            if let RespFraming::Length(left) = self.framing {
                count = count.min(left);
            }
        }
        Ok(count)
    }

    /// Sends the rest of a pending file response here, waiting for the
    /// socket as it drains: something else is about to be written after it.
    pub(crate) fn finish_pending_file(
        &mut self,
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        match self.pending_file.take() {
            Some(mut t) => self.send_span(t.file.as_raw_fd(), &mut t.span, blocking),
            None => Ok(()),
        }
    }

    /// Sends all of `s`, waiting for the socket as it drains.
    fn send_span(
        &mut self,
        file: RawFd,
        s: &mut Span,
        blocking: fn(&mut dyn FnMut()),
    ) -> Result<(), ResponseError> {
        while !self.advance_span(file, s)? {
            if !self.wait_writable(blocking) {
                self.broken = true;
                self.stalled = true;
                return Err(ResponseError::ClientGone(crate::exchange::STALLED_READER.into()));
            }
        }
        Ok(())
    }

    /// Sends what the socket takes now of `t`, never waiting: `Ok(true)`
    /// once the whole file went out (or the file turned out shorter, which
    /// the response's framing then reports), `Ok(false)` when the socket is
    /// full.
    pub(crate) fn advance(&mut self, t: &mut Transfer) -> Result<bool, ResponseError> {
        self.advance_span(t.file.as_raw_fd(), &mut t.span)
    }

    fn advance_span(&mut self, file: RawFd, t: &mut Span) -> Result<bool, ResponseError> {
        let fcgi = match self.wire {
            Wire::FastCgi { id, .. } => Some(id),
            _ => None,
        };
        loop {
            // A record header that did not fit goes out before its content.
            self.flush_held_nowait();
            if self.broken {
                return Err(ResponseError::ClientGone("the connection failed".into()));
            }
            if !self.out.is_empty() {
                return Ok(false);
            }
            if t.owed == 0 {
                if t.left == 0 {
                    return Ok(true);
                }
                // FastCGI: a STDOUT record header, then that many bytes
                // straight from the file, in records of a size that needs no
                // padding.
                if fcgi.is_some() {
                    // Between records, as for a streamed body: a front end
                    // whose client left (HAProxy sends ABORT_REQUEST and keeps
                    // the connection) is not sent the rest of a large file.
                    self.check_fcgi_abort()?;
                }
                t.owed = if fcgi.is_some() {
                    t.left.min(fastcgi::MAX_ALIGNED_CONTENT_LEN as u64) as usize
                } else {
                    t.left.min(SENDFILE_MAX) as usize
                };
                t.left -= t.owed as u64;
                if let Some(id) = fcgi {
                    let header = gateway::record_header(fastcgi::RecordType::Stdout, id, t.owed);
                    self.out.extend_from_slice(&header);
                    continue;
                }
            }
            let n = unsafe { libc::sendfile(self.fd, file, &mut t.offset, t.owed) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.broken = true;
                        return Err(ResponseError::ClientGone(e.to_string()));
                    }
                }
            }
            if n == 0 {
                if fcgi.is_some() {
                    // The record's length is announced; a short file cannot fill it.
                    self.broken = true;
                    self.reset_on_close = true;
                    return Err(ResponseError::Invalid("file ended before its announced size".into()));
                }
                t.owed = 0;
                t.left = 0;
                return Ok(true);
            }
            t.owed -= n as usize;
            self.bytes_sent += n as u64;
            if let RespFraming::Length(l) = self.framing {
                self.framing = RespFraming::Length(l.saturating_sub(n as u64));
            }
        }
    }
}

/// The rest of a file response that the socket could not take at once:
/// what the worker's offload thread sends as the client reads, so that a
/// slow download does not hold a serving thread (uWSGI's offloading).
pub struct Transfer {
    file: OwnedFd,
    span: Span,
}

/// What is left to send of a file: from `offset`, `owed` bytes of the piece
/// begun (a FastCGI record's content, whose header went out), then `left`.
struct Span {
    offset: i64,
    left: u64,
    owed: usize,
}

/// Handle the app uses to read the body and write the response.
#[derive(Clone)]
pub struct Exchange {
    pub(crate) io: Arc<Mutex<Io>>,
    pub(crate) generation: u64,
    pub(crate) blocking: fn(&mut dyn FnMut()),
}

impl Io {
    /// An HTTP client sent another request behind this one: bytes past the
    /// rest of this request's body are in the buffer already.
    pub(crate) fn pipelined(&self) -> bool {
        matches!(self.wire, Wire::Http)
            && match &self.body {
                BodyState::Done => !self.buf.is_empty(),
                BodyState::Length(left) => self.buf.len() as u64 > *left,
                BodyState::Chunked(decoder) => {
                    decoder.end_within(&self.buf).is_some_and(|n| self.buf.len() > n)
                }
                _ => false,
            }
    }
}

/// Hop-by-hop headers already logged as dropped in this process, by index
/// in [`HOP_BY_HOP`].
static HOP_NOTED: AtomicU8 = AtomicU8::new(0);

/// One warning per header name and worker: an app sets such a header on
/// every response, and the log must not repeat it for each.
fn note_dropped_hop_header(hop: usize, name: &[u8], value: &[u8], close: bool) {
    let bit = 1u8 << hop;
    if HOP_NOTED.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
        tracing::warn!(
            "The app set the hop-by-hop header \"{}: {}\", which a WSGI app may not send (PEP 3333): it is \
             dropped{}; logged once per worker",
            crate::app::log_escape(name),
            crate::app::log_escape(value),
            if close { ", and the connection closes after the response, as it asks" } else { "" }
        );
    }
}

/// Whether a Status header from the app was logged as dropped in this process.
static STATUS_NOTED: AtomicBool = AtomicBool::new(false);

/// Hop-by-hop headers an app may not set (PEP 3333); the server owns framing.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

impl Exchange {
    /// The connection's I/O, if it still belongs to this request.
    ///
    /// The caller may hold the app's global lock (Python's GIL), and the
    /// holder of this mutex may be waiting for that lock: a body read
    /// releases the GIL while it polls and takes it back before it lets the
    /// mutex go. So a contended mutex is waited for inside the `blocking`
    /// hook, never while keeping the app's lock, or a thread the app
    /// started to read `wsgi.input` and the request thread calling
    /// `start_response` would wait for each other for ever.
    fn lock(&self) -> Option<MutexGuard<'_, Io>> {
        // A process the app forked has a copy of the connection that is not
        // its own (its bytes belong to the parent's request), and a lock
        // another thread held at the fork that nobody will release.
        if crate::worker::in_forked_child() {
            return None;
        }
        let io = match self.io.try_lock() {
            Ok(io) => io,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let mut taken = None;
                (self.blocking)(&mut || taken = Some(self.io.lock().unwrap_or_else(|p| p.into_inner())));
                taken.expect("the blocking hook runs its closure")
            }
        };
        (io.generation == self.generation).then_some(io)
    }

    /// Reads up to `max` body bytes into `out`; Ok(0) at the end of the body.
    pub fn read(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, BodyError> {
        let mut io = self.lock().ok_or(BodyError::Stale)?;
        io.read_body(out, max, self.blocking)
    }

    /// Fills `dst` from the body; fewer bytes only at the end of the body.
    pub fn read_exact_or_end(&self, dst: &mut [u8]) -> Result<usize, BodyError> {
        let mut io = self.lock().ok_or(BodyError::Stale)?;
        let mut pos = 0;
        while pos < dst.len() {
            let room = dst.len() - pos;
            let n = io.read_body_with(
                room,
                &mut |d| {
                    dst[pos..pos + d.len()].copy_from_slice(d);
                },
                self.blocking,
            )?;
            if n == 0 {
                break;
            }
            pos += n;
        }
        Ok(pos)
    }

    /// Body bytes still to come when the request declared its length.
    pub fn remaining_hint(&self) -> Option<u64> {
        let io = self.lock()?;
        match io.body {
            BodyState::Length(left) => Some(left + io.pending.len() as u64),
            BodyState::Done => Some(io.pending.len() as u64),
            _ => None,
        }
    }

    /// Reads the rest of the body (up to `max` bytes) into `out`.
    pub fn read_to_end(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, BodyError> {
        let mut io = self.lock().ok_or(BodyError::Stale)?;
        let start = out.len();
        while out.len() - start < max {
            let want = (max - (out.len() - start)).min(READ_CHUNK * 4);
            if io.read_body(out, want, self.blocking)? == 0 {
                break;
            }
        }
        Ok(out.len() - start)
    }

    /// Reads one line (through LF), at most `max` bytes.
    pub fn read_line(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, BodyError> {
        let mut io = self.lock().ok_or(BodyError::Stale)?;
        io.read_line(out, max, self.blocking)
    }

    /// Begins (or, before anything was sent, replaces) the response with a
    /// status such as `200 OK`.
    pub fn start(&self, status: &[u8]) -> Result<(), ResponseError> {
        let mut io = self.lock().ok_or(ResponseError::Stale)?;
        if io.phase >= RespPhase::Sent {
            return Err(ResponseError::AlreadySent);
        }
        let code = parse_status(status)?;
        io.status = code;
        io.app_length = None;
        io.app_date = false;
        if let Some(kept) = &mut io.logged_headers {
            kept.clear();
        }
        io.head.clear();
        let prefix: &[u8] = match io.wire {
            Wire::Http | Wire::Uwsgi => b"HTTP/1.1 ",
            Wire::Scgi | Wire::FastCgi { .. } => b"Status: ",
        };
        io.head.extend_from_slice(prefix);
        io.head.extend_from_slice(status);
        if status.len() == 3 {
            // A bare code, which gunicorn takes: the status line still needs
            // the space before its (empty) reason phrase.
            io.head.push(b' ');
        }
        io.head.extend_from_slice(b"\r\n");
        io.phase = RespPhase::Started;
        Ok(())
    }

    /// Undoes [`Exchange::start`] while nothing was sent: start_response
    /// takes effect whole or not at all, so an app that catches its error
    /// neither sends half its headers nor is refused a second call.
    pub fn unstart(&self) {
        if let Some(mut io) = self.lock() {
            if io.phase == RespPhase::Started {
                io.phase = RespPhase::Idle;
                io.status = 0;
                io.app_length = None;
                io.app_date = false;
                io.head.clear();
                if let Some(kept) = &mut io.logged_headers {
                    kept.clear();
                }
            }
        }
    }

    /// Adds one response header after [`Exchange::start`].
    pub fn header(&self, name: &[u8], value: &[u8]) -> Result<(), ResponseError> {
        let mut io = self.lock().ok_or(ResponseError::Stale)?;
        if io.phase != RespPhase::Started {
            return Err(ResponseError::NotStarted);
        }
        if name.is_empty() || !name.iter().all(|&b| corral_proto::http1::is_tchar(b)) {
            return Err(ResponseError::Invalid(format!(
                "invalid response header name {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(ResponseError::Invalid(format!(
                "response header {:?} has a control character (CR, LF or NUL) in its value",
                String::from_utf8_lossy(name)
            )));
        }
        // RFC 9110 5.5: a field value has no leading or trailing
        // whitespace (Django's Set-Cookie values start with a space).
        let value = value.trim_ascii();
        if let Some(hop) = HOP_BY_HOP.iter().position(|h| name.eq_ignore_ascii_case(h.as_bytes())) {
            // Dropped, as gunicorn drops them: the server owns the framing
            // and the connection. What `Connection: close` asks for is done.
            let close = hop == 0
                && matches!(io.wire, Wire::Http)
                && value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            if close {
                io.keep_alive = false;
            }
            note_dropped_hop_header(hop, name, value, close);
            return Ok(());
        }
        if matches!(io.wire, Wire::FastCgi { .. } | Wire::Scgi) && name.eq_ignore_ascii_case(b"status") {
            // A CGI reply's Status header is its status: a second one would
            // let the header override start_response's (Apache takes the last).
            if !STATUS_NOTED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "The app set a \"Status: {}\" header, which over FastCGI and SCGI would be taken as the \
                     response's status in place of start_response's: it is dropped; logged once per worker",
                    crate::app::log_escape(value)
                );
            }
            return Ok(());
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value).map_err(|_| {
                ResponseError::Invalid(format!("invalid Content-Length {:?}", String::from_utf8_lossy(value)))
            })?;
            match io.app_length {
                Some(m) if m != n => {
                    return Err(ResponseError::Invalid("conflicting Content-Length headers".into()));
                }
                // The same length twice is one (RFC 9112 6.3): sent twice,
                // clients and proxies that refuse a repeated Content-Length
                // (nginx answers 502) would refuse the response.
                Some(_) => return Ok(()),
                None => io.app_length = Some(n),
            }
            if io.status == 204 || io.status == 205 {
                // RFC 9110 8.6: a 204 carries no Content-Length; a 205's is
                // the 0 that seal_head writes (RFC 9110 15.3.6).
                return Ok(());
            }
        }
        if name.len() == 4 && name.eq_ignore_ascii_case(b"date") {
            // A response has one Date (RFC 9110 5.3): the app's own, if it set one.
            io.app_date = true;
        }
        io.head.extend_from_slice(name);
        io.head.extend_from_slice(b": ");
        io.head.extend_from_slice(value);
        io.head.extend_from_slice(b"\r\n");
        if let Some(kept) = &mut io.logged_headers {
            kept.push((name.to_ascii_lowercase(), value.to_vec()));
        }
        Ok(())
    }

    /// Keeps an environ variable's value for the access log line.
    pub fn log_environ(&self, name: &str, value: &[u8]) {
        if let Some(mut io) = self.lock() {
            io.logged_environ.push((name.to_string(), value.to_vec()));
        }
    }

    /// Sends body bytes. `last` says that this is the whole remaining body,
    /// which lets a response without Content-Length avoid chunking.
    pub fn write(&self, data: &[u8], last: bool) -> Result<(), ResponseError> {
        let mut io = self.lock().ok_or(ResponseError::Stale)?;
        io.write_body(data, last, self.blocking)
    }

    /// Sends `count` bytes of an open file from `offset`, without copying
    /// them through user space.
    pub fn sendfile(&self, file: RawFd, offset: i64, count: u64) -> Result<(), ResponseError> {
        let mut io = self.lock().ok_or(ResponseError::Stale)?;
        if io.phase == RespPhase::Idle {
            return Err(ResponseError::NotStarted);
        }
        io.sendfile(file, offset, count, self.blocking)
    }

    /// As [`Exchange::sendfile`] for a file the exchange may keep: sends
    /// the head and what the socket takes now, and keeps the rest when the
    /// socket is full. The engine sends that after the app returns, from the
    /// worker's offload thread when it has one, so a client that reads
    /// slowly does not hold the serving thread; anything the app writes
    /// after this waits for the file to go out first. A response without a
    /// length is sent here in full, waiting as [`Exchange::sendfile`] does.
    pub fn send_file(&self, file: OwnedFd, offset: i64, count: u64) -> Result<(), ResponseError> {
        let mut io = self.lock().ok_or(ResponseError::Stale)?;
        if io.phase == RespPhase::Idle {
            return Err(ResponseError::NotStarted);
        }
        let count = io.begin_file(count, self.blocking)?;
        if !matches!(io.framing, RespFraming::Length(_)) {
            return io.sendfile(file.as_raw_fd(), offset, count, self.blocking);
        }
        let mut t = Transfer { file, span: Span { offset, left: count, owed: 0 } };
        if !io.advance(&mut t)? {
            io.pending_file = Some(t);
        }
        Ok(())
    }

    /// The app's body is complete: ends the response now (the chunked
    /// terminator, FastCGI's END_REQUEST unless it waits for the rest of
    /// STDIN), before the app's `close()` runs, which may take a while
    /// (Django's request_finished handlers). Nothing
    /// to do for a response that failed, or whose file is still to be sent
    /// (it ends once the file went out).
    pub fn end_body(&self) -> Result<(), ResponseError> {
        let mut io = self.lock().ok_or(ResponseError::Stale)?;
        if io.broken || io.aborted || io.pending_file.is_some() || io.phase == RespPhase::Idle {
            return Ok(());
        }
        io.finish(self.blocking)?;
        // A body the close ends (uwsgi and SCGI without a length, HTTP/1.0
        // without one): half-close now, so that the front end or client has
        // the whole response while close() runs, rather than after it.
        let ends_at_close = match io.wire {
            Wire::Uwsgi | Wire::Scgi => io.framing == RespFraming::Raw,
            Wire::Http => io.framing == RespFraming::Close,
            Wire::FastCgi { .. } => false,
        };
        if ends_at_close && io.flush_out(self.blocking).is_ok() {
            unsafe { libc::shutdown(io.fd, libc::SHUT_WR) };
        }
        Ok(())
    }

    /// Completes the response.
    pub fn finish(&self) -> Result<(), ResponseError> {
        let mut io = self.lock().ok_or(ResponseError::Stale)?;
        io.finish(self.blocking)
    }

    /// Whether the status line and headers have gone out.
    pub fn headers_sent(&self) -> bool {
        self.lock().is_some_and(|io| io.phase >= RespPhase::Sent)
    }

    /// Whether the response can take no more body bytes: its head is out and
    /// it has none (HEAD, 204, 304, 205) or has sent all of its
    /// Content-Length. More would be dropped, so the server may stop
    /// iterating the body there (PEP 3333).
    pub fn body_complete(&self) -> bool {
        self.lock().is_some_and(|io| {
            io.phase >= RespPhase::Sent && matches!(io.framing, RespFraming::NoBody | RespFraming::Length(0))
        })
    }

    /// Whether the response has ended: the app's iterable is done, and
    /// nothing more can be added to it.
    pub fn finished(&self) -> bool {
        self.lock().is_some_and(|io| io.phase == RespPhase::Finished)
    }

    /// Whether the response was started (headers buffered or sent).
    pub fn started(&self) -> bool {
        self.lock().is_some_and(|io| io.phase >= RespPhase::Started)
    }

    /// The app failed after the headers went out: unless the response is
    /// whole, the connection will be reset so the client cannot take a
    /// truncated body for a whole one.
    pub fn abort(&self) {
        if let Some(mut io) = self.lock() {
            if io.fcgi_aborted {
                // Ended by the front end: END_REQUEST closes it cleanly.
                return;
            }
            if io.phase >= RespPhase::Sent
                && matches!(io.framing, RespFraming::NoBody | RespFraming::Length(0))
            {
                // A HEAD (or 204, 304) response is whole once its head went
                // out, and one with a Content-Length once that many bytes did
                // (the app failed after its last item, in a generator's code
                // after its last yield, say): the client loses nothing, so it
                // ends with a plain close rather than a reset that would cut
                // the bytes still on their way, and pipelined requests along.
                // A kept FastCGI connection, whose END_REQUEST follows as for
                // any whole response, stays open: closing it races the front
                // end's next request on it (Apache answers that one 503).
                if !matches!(io.wire, Wire::FastCgi { .. }) {
                    io.keep_alive = false;
                }
                return;
            }
            io.keep_alive = false;
            io.aborted = true;
        }
    }

    /// The status the app chose, once started.
    pub fn status(&self) -> u16 {
        self.lock().map_or(0, |io| io.status)
    }

    /// Body bytes of the response given to the connection so far.
    pub fn body_sent(&self) -> u64 {
        self.lock().map_or(0, |io| io.bytes_sent)
    }
}

/// `NNN reason`: three digits, a space, and a reason with no control
/// characters; or the three digits alone.
fn parse_status(s: &[u8]) -> Result<u16, ResponseError> {
    let bad = || ResponseError::Invalid(format!("invalid status {:?}", String::from_utf8_lossy(s)));
    // PEP 3333 asks for a reason phrase; a bare code ("200") is taken as
    // gunicorn takes it, so an app that ran there is not answered with 500.
    if s.len() < 3 || !s[..3].iter().all(u8::is_ascii_digit) || s.get(3).is_some_and(|&b| b != b' ') {
        return Err(bad());
    }
    if s.get(4..).unwrap_or_default().iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(bad());
    }
    let code = s[..3].iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    // A WSGI app gives the final response: a 1xx is never final (the client
    // would take the next response for this one), and codes run to 599.
    if !(200..=599).contains(&code) {
        return Err(ResponseError::Invalid(format!(
            "invalid status {:?}: a WSGI response's status is 200 to 599",
            String::from_utf8_lossy(s)
        )));
    }
    Ok(code)
}

/// Formats `n` as hex followed by CRLF; returns the length used.
fn hex_line(n: usize, out: &mut [u8; 18]) -> usize {
    let digits = if n == 0 { 1 } else { (usize::BITS - n.leading_zeros()).div_ceil(4) as usize };
    for (i, slot) in out[..digits].iter_mut().enumerate() {
        *slot = b"0123456789abcdef"[(n >> (4 * (digits - 1 - i))) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

pub(crate) fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Waits for `events` on `fd`; false on timeout or error.
pub(crate) fn poll_one(fd: RawFd, events: i16, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    loop {
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return r > 0;
    }
}

impl PartialOrd for RespPhase {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some((*self as u8).cmp(&(*other as u8)))
    }
}

impl Exchange {
    /// The error that ended the body, if reading it failed: the status to
    /// answer with when the app gives up because of it.
    /// The front end aborted this request (FastCGI ABORT_REQUEST): the
    /// engine logs that once, as the request ends.
    /// The caller logged that the client took nothing for the I/O timeout
    /// ([`STALLED_READER`]): the connection's close does not say it again.
    pub fn stall_logged(&self) {
        if let Some(mut io) = self.lock() {
            io.stall_logged = true;
        }
    }

    pub fn front_end_aborted(&self) -> bool {
        self.lock().is_some_and(|io| io.fcgi_aborted)
    }

    pub fn body_error(&self) -> Option<BodyError> {
        let io = self.lock()?;
        match io.body {
            BodyState::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Whether the server will log, with the peer, why the request's body
    /// failed or its connection ends (a body that came too slowly, say), so
    /// that the embedding need not say it again.
    pub fn failure_noted(&self) -> bool {
        self.lock().is_some_and(|io| io.body_note.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_lines() {
        let mut b = [0u8; 18];
        let n = hex_line(1024, &mut b);
        assert_eq!(&b[..n], b"400\r\n");
        let n = hex_line(0, &mut b);
        assert_eq!(&b[..n], b"0\r\n");
        let n = hex_line(15, &mut b);
        assert_eq!(&b[..n], b"f\r\n");
    }

    #[test]
    fn statuses() {
        assert_eq!(parse_status(b"200 OK"), Ok(200));
        assert_eq!(parse_status(b"404 "), Ok(404));
        assert_eq!(parse_status(b"200"), Ok(200));
        assert!(parse_status(b"20").is_err());
        assert!(parse_status(b"2000").is_err());
        assert!(parse_status(b"20x OK").is_err());
        assert!(parse_status(b"200 OK\r\nX: y").is_err());
        assert!(parse_status(b"099 Low").is_err());
    }
}
