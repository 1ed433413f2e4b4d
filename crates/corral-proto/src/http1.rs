//! HTTP/1.x request heads and request-body framing.
//!
//! [`parse_head`] reads a request line and header block with `httparse`, then
//! applies the policy that keeps a server behind a load balancer safe from
//! request smuggling: one unambiguous body length, no bare LF, no control
//! characters in values, a method and request target of the expected shape,
//! and named limits that answer 414 and 431. The result records byte ranges
//! into the caller's buffer rather than borrowing it, so the engine can freeze
//! the head's bytes and go on reading the body into the same allocation.
//!
//! [`ChunkedDecoder`] is the matching state machine for `Transfer-Encoding:
//! chunked` bodies, fed whatever bytes have arrived.

use std::fmt;
use std::mem::MaybeUninit;
use std::ops::Range;

use crate::Status;

/// Longest request line accepted, in bytes without the CRLF. nginx proxies
/// request lines up to its 8 KiB `large_client_header_buffers`; a backend that
/// allows less turns long URLs into 414s behind it.
pub const DEFAULT_MAX_REQUEST_LINE: usize = 8190;
/// Most header fields in one request (gunicorn's and hyper's limit).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Longest header field line, name, colon, value and CRLF included
/// (gunicorn's `limit_request_field_size`; nginx allows 8 KiB).
pub const DEFAULT_MAX_HEADER_LINE: usize = 8190;
/// Hard ceiling on the header count, whatever the configuration says: the
/// parser keeps its header table on the stack.
pub const HARD_MAX_HEADERS: usize = 1024;
/// Bytes of empty lines (CR, LF) tolerated before a request line: RFC 9112
/// 2.2 asks a server to skip at least one, which some clients send after a
/// body; far more is a client filling the buffer with nothing.
pub const MAX_LEADING_EMPTY: usize = 16;
/// Longest chunk-size line (size plus extensions) in a chunked body.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Limits applied while parsing a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_line: usize,
    pub max_headers: usize,
    pub max_header_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: DEFAULT_MAX_REQUEST_LINE,
            max_headers: DEFAULT_MAX_HEADERS,
            max_header_line: DEFAULT_MAX_HEADER_LINE,
        }
    }
}

impl Limits {
    /// The most bytes a head can take before it is refused unseen: a full
    /// request line plus the full count of full-size fields.
    pub fn max_head_bytes(&self) -> usize {
        self.max_request_line + 2 + self.max_headers.min(HARD_MAX_HEADERS) * self.max_header_line + 2
    }
}

/// Why a request was refused. Each maps to the status the client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Malformed request line: method, target or version.
    RequestLine,
    Method,
    Target,
    /// Raw bytes >= 0x80 in the request target (they must be percent-encoded).
    NonAsciiTarget,
    Version,
    /// A well-formed `HTTP/x.y` whose major version is not 1 (505).
    VersionNotSupported,
    HeaderName,
    HeaderValue,
    /// A LF not preceded by CR, or a CR not followed by LF.
    BareLineEnding,
    /// A continuation line (obs-fold); RFC 9112 lets a server reject it.
    ObsFold,
    RequestLineTooLong,
    TooManyHeaders,
    HeaderLineTooLong,
    ContentLength,
    /// Content-Length together with Transfer-Encoding.
    LengthAndEncoding,
    /// Transfer-Encoding where chunked is missing, repeated or not last, or in HTTP/1.0.
    BadTransferEncoding,
    /// A transfer-coding other than chunked: this server decodes no other (501).
    UnknownTransferCoding,
    /// CONNECT: a WSGI app cannot answer it with a tunnel (501).
    Connect,
    /// A header that may appear only once (Host, Content-Type) appeared twice.
    DuplicateHeader,
    ChunkSize,
    ChunkExtension,
    /// A chunk's size line, extensions included, longer than [`MAX_CHUNK_LINE`].
    ChunkLineTooLong,
    ChunkTerminator,
    Trailer,
    /// Transfer-Encoding: identity, which RFC 9112 removed.
    IdentityEncoding,
    /// More empty lines before the request line than a client sends.
    LeadingEmptyLines,
    /// A Host field whose value is not `host[:port]` (RFC 9112 3.2).
    Host,
    /// A TLS handshake where a request line goes: a client speaking https
    /// to a plain-HTTP port.
    TlsHandshake,
}

impl Error {
    /// The response status for this error.
    pub fn status(self) -> u16 {
        match self {
            Error::RequestLineTooLong => 414,
            Error::TooManyHeaders | Error::HeaderLineTooLong => 431,
            Error::UnknownTransferCoding | Error::Connect => 501,
            Error::VersionNotSupported => 505,
            _ => 400,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Error::RequestLine => "malformed request line",
            Error::Method => "invalid method",
            Error::Target => "invalid request target",
            Error::NonAsciiTarget => "raw non-ASCII byte in request target",
            Error::Version => "unsupported or malformed HTTP version",
            Error::VersionNotSupported => "HTTP major version other than 1",
            Error::HeaderName => "invalid header name",
            Error::HeaderValue => "invalid character in header value",
            Error::BareLineEnding => "bare CR or LF in request head",
            Error::ObsFold => "obsolete line folding in header",
            Error::RequestLineTooLong => "request line too long",
            Error::TooManyHeaders => "too many header fields",
            Error::HeaderLineTooLong => "header field too large",
            Error::ContentLength => "invalid or conflicting Content-Length",
            Error::LengthAndEncoding => "both Content-Length and Transfer-Encoding",
            Error::BadTransferEncoding => "chunked must be the last transfer-coding, once, in HTTP/1.1",
            Error::UnknownTransferCoding => "transfer-coding other than chunked (not decoded here)",
            Error::Connect => "CONNECT is not supported (no tunnels)",
            Error::DuplicateHeader => "repeated Host or Content-Type header",
            Error::ChunkSize => "invalid chunk size",
            Error::ChunkExtension => "invalid chunk extension",
            Error::ChunkLineTooLong => "chunk size line (with its extensions) longer than 4096 bytes",
            Error::ChunkTerminator => "chunk data not followed by CRLF",
            Error::Trailer => "invalid or forbidden trailer field",
            Error::IdentityEncoding => "Transfer-Encoding: identity is not allowed",
            Error::LeadingEmptyLines => "too many empty lines before the request line",
            Error::TlsHandshake => "a TLS handshake (https) sent to a plain-HTTP port",
            Error::Host => "invalid Host header (expected host[:port])",
        };
        f.write_str(s)
    }
}

impl std::error::Error for Error {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// The shape of the request target (RFC 9112 section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    Origin,
    Absolute,
    Asterisk,
}

/// Header names the engine treats specially, recognised once while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Other,
    ContentLength,
    ContentType,
    Cookie,
    Host,
    Connection,
    TransferEncoding,
    Expect,
    /// `X-Forwarded-Proto`, `X-Forwarded-Protocol`, `X-Forwarded-SSL`: a
    /// proxy saying which scheme the client used (see [`Head::scheme_fields`]).
    XForwardedProto,
    XForwardedProtocol,
    XForwardedSsl,
    /// `SCRIPT_NAME`: a proxy naming the prefix the app is mounted at, as
    /// gunicorn's `forwarder_headers` take it (nginx's `proxy_set_header
    /// SCRIPT_NAME /prefix`). The one name with `_` kept; whether it counts
    /// is the server's to judge by the peer.
    ScriptName,
}

/// One header field as byte ranges into the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Range<usize>,
    pub value: Range<usize>,
    pub known: Known,
}

/// A parsed request head. Ranges index the buffer given to [`parse_head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Range<usize>,
    pub target: Range<usize>,
    pub form: TargetForm,
    /// The path within the target (after any scheme and authority), without query or fragment.
    pub path: Range<usize>,
    /// The query string without the `?`; empty when there is none.
    pub query: Range<usize>,
    pub version: Version,
    pub framing: BodyFraming,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent (HTTP/1.1 only).
    pub expect_continue: bool,
    /// The authority of an absolute-form target (`http://host:port/...`),
    /// which replaces the Host field (RFC 9112 3.2.2); empty otherwise.
    pub authority: Range<usize>,
    /// Fields with names containing `_` are not here: they could impersonate
    /// dashed names once mapped to `HTTP_*` keys.
    pub fields: Vec<Field>,
    /// A field among them says which scheme the client used
    /// ([`Known::XForwardedProto`] and kin), for the server to weigh only
    /// when one is there.
    pub scheme_fields: bool,
    /// A `SCRIPT_NAME` field is among the fields (see [`Known::ScriptName`]).
    pub script_name_field: bool,
}

impl Default for Head {
    fn default() -> Head {
        Head {
            method: 0..0,
            target: 0..0,
            form: TargetForm::Origin,
            path: 0..0,
            query: 0..0,
            version: Version::Http11,
            framing: BodyFraming::None,
            keep_alive: true,
            expect_continue: false,
            authority: 0..0,
            fields: Vec::new(),
            scheme_fields: false,
            script_name_field: false,
        }
    }
}

/// Parses a request head from the start of `buf`.
///
/// `head` is reused to avoid an allocation per request; on `Complete` it
/// holds the result and the count is the head's length including the blank
/// line. Leading empty lines (allowed by RFC 9112 before a request) are
/// skipped and counted.
pub fn parse_head(buf: &[u8], limits: &Limits, head: &mut Head) -> Result<Status<()>, Error> {
    // Empty lines (CRLF) before a request line are skipped (RFC 9112 2.2):
    // clients send one after a body now and then. Any other CR or LF there
    // is as bare as one in a field.
    let mut skip = 0;
    while buf[skip..].starts_with(b"\r\n") {
        skip += 2;
        if skip > MAX_LEADING_EMPTY {
            return Err(Error::LeadingEmptyLines);
        }
    }
    let data = &buf[skip..];
    match data {
        [] | [b'\r'] => return Ok(Status::Partial),
        [b'\r' | b'\n', ..] => return Err(Error::BareLineEnding),
        _ => {}
    }
    // The request line is checked on its own first so an endless one is
    // refused with 414 as soon as it is too long, not once the head is whole.
    let line_end = match memchr(b'\n', &data[..data.len().min(limits.max_request_line + 2)]) {
        Some(i) => i,
        None if data.len() > limits.max_request_line + 1 => return Err(Error::RequestLineTooLong),
        None => return not_a_method(data).map_or(Ok(Status::Partial), Err),
    };
    let line_len = if line_end > 0 && data[line_end - 1] == b'\r' { line_end - 1 } else { line_end };
    if line_len > limits.max_request_line {
        return Err(Error::RequestLineTooLong);
    }
    let max_headers = limits.max_headers.min(HARD_MAX_HEADERS);
    let mut storage: [MaybeUninit<httparse::Header<'_>>; HARD_MAX_HEADERS + 1] =
        [const { MaybeUninit::uninit() }; HARD_MAX_HEADERS + 1];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        data,
        &mut storage[..max_headers + 1],
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if data.len() > limits.max_head_bytes() {
                return Err(Error::HeaderLineTooLong);
            }
            // The unfinished line, a header line (the request line ended):
            // too long already, it is refused before the rest comes.
            let line_start = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if data.len() - line_start > limits.max_header_line {
                return Err(Error::HeaderLineTooLong);
            }
            // A partial head may already show a continuation line.
            if find_obs_fold(data).is_some() {
                return Err(Error::ObsFold);
            }
            return Ok(Status::Partial);
        }
        Err(httparse::Error::Version) if later_minor_version(data) => {
            // HTTP/1.2 and on are HTTP/1.1 to a server of 1.1 (RFC 9112
            // 2.3); httparse knows only 1.0 and 1.1, so it reads a copy that
            // says 1.1. The copy is as long, so the ranges hold for `buf`.
            let mut copy = buf.to_vec();
            copy[skip + line_len - 1] = b'1';
            return parse_head(&copy, limits, head);
        }
        Err(e) => return Err(map_httparse_error(e, data)),
    };
    if req.headers.len() > max_headers {
        return Err(Error::TooManyHeaders);
    }
    let raw = &data[..len];
    check_line_endings(raw)?;

    let off = |s: &[u8]| -> Range<usize> {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let method = req.method.unwrap_or("").as_bytes();
    check_method(method)?;
    let target = req.path.unwrap_or("").as_bytes();
    let version = match req.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(Error::Version),
    };
    let (form, authority, path, query) = split_target(method, target)?;

    head.fields.clear();
    head.method = off(method);
    head.target = off(target);
    head.form = form;
    head.path = off(path);
    head.query = off(query);
    head.version = version;
    head.expect_continue = false;
    head.scheme_fields = false;
    head.script_name_field = false;

    head.authority = off(authority);
    let mut content_length: Option<u64> = None;
    let mut saw_te = false;
    let mut chunked_last = false;
    let mut saw_identity = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut saw_host = false;
    let mut saw_content_type = false;
    for (i, h) in req.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        // The whole line as sent, its line break included: the value
        // httparse gives has lost the whitespace around it, which a client
        // may send by the megabyte.
        let start = name.as_ptr() as usize - data.as_ptr() as usize;
        let next = match req.headers.get(i + 1) {
            Some(n) => n.name.as_ptr() as usize - data.as_ptr() as usize,
            None => len - 2,
        };
        if next - start > limits.max_header_line {
            return Err(Error::HeaderLineTooLong);
        }
        let value = trim_ows(h.value);
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(Error::HeaderValue);
        }
        if name.contains(&b'_') {
            // Dropped, as gunicorn drops them: HTTP_X_A would not tell X-A
            // from X_A, and a proxy that sets the one cannot strip the other.
            if name.eq_ignore_ascii_case(b"script_name") {
                head.script_name_field = true;
                head.fields.push(Field { name: off(name), value: off(value), known: Known::ScriptName });
            }
            continue;
        }
        let known = classify(name);
        match known {
            Known::ContentLength => {
                if content_length.is_some() {
                    return Err(Error::ContentLength);
                }
                content_length = Some(parse_content_length(value)?);
            }
            Known::TransferEncoding => {
                // Present at all, the field decides the framing: an empty
                // list has no final chunked, which is a 400 (RFC 9112 6.3).
                saw_te = true;
                for coding in value.split(|&b| b == b',') {
                    let coding = trim_ows(coding);
                    if coding.is_empty() {
                        continue;
                    }
                    if chunked_last {
                        // chunked must be the final coding, and only once.
                        return Err(Error::BadTransferEncoding);
                    }
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        chunked_last = true;
                    } else if coding.eq_ignore_ascii_case(b"identity") {
                        // Tolerated only as a no-op before chunked (as gunicorn does).
                        saw_identity = true;
                    } else {
                        // gzip, deflate and the rest: this server does not
                        // decode them, and wsgi.input is the decoded body, so
                        // 501 (RFC 9112 6.1) rather than the coded bytes.
                        return Err(Error::UnknownTransferCoding);
                    }
                }
            }
            Known::Connection => {
                for token in value.split(|&b| b == b',') {
                    let token = trim_ows(token);
                    if token.eq_ignore_ascii_case(b"close") {
                        conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        conn_keep_alive = true;
                    }
                }
            }
            Known::Expect => {
                if value.eq_ignore_ascii_case(b"100-continue") && version == Version::Http11 {
                    head.expect_continue = true;
                }
            }
            Known::Host => {
                if saw_host {
                    return Err(Error::DuplicateHeader);
                }
                // Empty is allowed (a target without authority); otherwise
                // host[:port], no userinfo.
                if !value.is_empty() && check_host_port(value).is_err() {
                    return Err(Error::Host);
                }
                saw_host = true;
            }
            Known::ContentType => {
                if saw_content_type {
                    return Err(Error::DuplicateHeader);
                }
                saw_content_type = true;
            }
            Known::XForwardedProto | Known::XForwardedProtocol | Known::XForwardedSsl => {
                head.scheme_fields = true;
            }
            Known::Cookie | Known::Other | Known::ScriptName => {}
        }
        head.fields.push(Field { name: off(name), value: off(value), known });
    }

    head.framing = if saw_te {
        if version == Version::Http10 || !chunked_last {
            return Err(if version == Version::Http10 {
                Error::BadTransferEncoding
            } else if saw_identity && content_length.is_some() {
                Error::IdentityEncoding
            } else {
                Error::BadTransferEncoding
            });
        }
        if content_length.is_some() {
            return Err(Error::LengthAndEncoding);
        }
        BodyFraming::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    };
    head.keep_alive = match version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };
    Ok(Status::Complete((), skip + len))
}

fn map_httparse_error(e: httparse::Error, data: &[u8]) -> Error {
    use httparse::Error as E;
    match e {
        E::HeaderName => {
            if find_obs_fold(data).is_some() {
                Error::ObsFold
            } else {
                Error::HeaderName
            }
        }
        E::HeaderValue => Error::HeaderValue,
        // httparse stops right after `HTTP/1.1` when more follows it.
        E::NewLine if !matches!(version_token(data), Some(b"HTTP/1.1" | b"HTTP/1.0") | None) => {
            Error::Version
        }
        E::NewLine => Error::BareLineEnding,
        // httparse takes a target's raw UTF-8 but not other high bytes
        // (Latin-1 `caf\xe9`): name either the same way.
        // A bad method first: a TLS ClientHello has a line feed somewhere
        // in its first bytes, and high bytes in every part of it.
        E::Status | E::Token => not_a_method(data).unwrap_or_else(|| {
            if request_line(data).iter().any(|&b| b >= 0x80) {
                Error::NonAsciiTarget
            } else {
                Error::RequestLine
            }
        }),
        E::Version => version_error(data),
        E::TooManyHeaders => Error::TooManyHeaders,
    }
}

/// The first line of `data`, without its line ending.
fn request_line(data: &[u8]) -> &[u8] {
    let end = data.iter().position(|&b| b == b'\n' || b == b'\r').unwrap_or(data.len());
    &data[..end]
}

/// A version httparse refused: 505 if it is a well-formed `HTTP/x.y` of
/// another major version (RFC 9110 15.6.6), 400 if it is malformed.
fn version_error(data: &[u8]) -> Error {
    match version_token(data).unwrap_or(b"") {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() && *major != b'1' =>
        {
            Error::VersionNotSupported
        }
        _ => Error::Version,
    }
}

/// The request line ends in `HTTP/1.y` with a single digit `y` above 1.
fn later_minor_version(data: &[u8]) -> bool {
    matches!(version_token(data), Some([b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor]) if (b'2'..=b'9').contains(minor))
}

/// The last word of a complete request line ending in CRLF.
fn version_token(data: &[u8]) -> Option<&[u8]> {
    let line = data[..memchr(b'\n', data)?].strip_suffix(b"\r")?;
    line.rsplit(|&b| b == b' ').next()
}

/// Finds a header line that starts with SP or HTAB (a continuation line).
fn find_obs_fold(data: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(nl) = memchr(b'\n', &data[i..]) {
        let next = i + nl + 1;
        if next < data.len() && (data[next] == b' ' || data[next] == b'\t') {
            return Some(next);
        }
        i = next;
    }
    None
}

/// httparse accepts a lone LF as a line ending; RFC 9112 lets a server do so,
/// but a proxy in front may not split lines the same way, so refuse it.
fn check_line_endings(raw: &[u8]) -> Result<(), Error> {
    let mut i = 0;
    while let Some(p) = memchr2(b'\n', b'\r', &raw[i..]) {
        let at = i + p;
        match raw[at] {
            b'\n' => {
                if at == 0 || raw[at - 1] != b'\r' {
                    return Err(Error::BareLineEnding);
                }
            }
            _ => {
                if raw.get(at + 1) != Some(&b'\n') {
                    return Err(Error::BareLineEnding);
                }
            }
        }
        i = at + 1;
    }
    Ok(())
}

/// Methods are tokens; like gunicorn, lowercase letters and `#` are refused
/// since no real method has them and they mark a desynchronised stream.
fn check_method(m: &[u8]) -> Result<(), Error> {
    if m.is_empty() || m.len() > 32 || m.iter().any(|&b| b.is_ascii_lowercase() || b == b'#' || !is_tchar(b))
    {
        return Err(Error::Method);
    }
    Ok(())
}

/// (form, authority of an absolute-form target or empty, path, query)
type Target<'a> = (TargetForm, &'a [u8], &'a [u8], &'a [u8]);

fn split_target<'a>(method: &[u8], t: &'a [u8]) -> Result<Target<'a>, Error> {
    if t.is_empty() {
        return Err(Error::Target);
    }
    if t.iter().any(|&b| b >= 0x80) {
        return Err(Error::NonAsciiTarget);
    }
    if t.iter().any(|&b| b <= 0x20 || b == 0x7f) {
        return Err(Error::Target);
    }
    if t == b"*" {
        return if method == b"OPTIONS" {
            Ok((TargetForm::Asterisk, &t[..0], &t[..1], &t[1..]))
        } else {
            Err(Error::Target)
        };
    }
    if method == b"CONNECT" {
        // A 2xx to CONNECT turns the connection into a tunnel, which WSGI
        // has no way to serve; a pipelined request after it must never be
        // read as HTTP.
        check_authority(t)?;
        return Err(Error::Connect);
    }
    let (form, authority, rest) = if t[0] == b'/' {
        (TargetForm::Origin, &t[..0], t)
    } else {
        // absolute-form: scheme "://" authority path-abempty [ "?" query ]
        let colon = t.iter().position(|&b| b == b':').ok_or(Error::Target)?;
        let scheme = &t[..colon];
        if scheme.is_empty()
            || !scheme[0].is_ascii_alphabetic()
            || !scheme.iter().all(|&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            || !t[colon..].starts_with(b"://")
        {
            return Err(Error::Target);
        }
        let after = &t[colon + 3..];
        let end = after.iter().position(|&b| b == b'/' || b == b'?' || b == b'#').unwrap_or(after.len());
        check_authority(&after[..end])?;
        // The authority stands for Host, which has no userinfo: drop it
        // (RFC 9110 4.2.4 deprecates userinfo in http URIs; gunicorn accepts it).
        let host_start = after[..end].iter().rposition(|&b| b == b'@').map_or(0, |i| i + 1);
        (TargetForm::Absolute, &after[host_start..end], &after[end..])
    };
    let rest = match rest.iter().position(|&b| b == b'#') {
        Some(i) => &rest[..i],
        None => rest,
    };
    let (path, query) = match rest.iter().position(|&b| b == b'?') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    Ok((form, authority, path, query))
}

/// authority = [ userinfo "@" ] host [ ":" port ]
fn check_authority(a: &[u8]) -> Result<(), Error> {
    let hostport = match a.iter().rposition(|&b| b == b'@') {
        Some(i) => {
            if !a[..i].iter().all(|&b| is_unreserved_or_sub(b) || b == b':' || b == b'%') {
                return Err(Error::Target);
            }
            &a[i + 1..]
        }
        None => a,
    };
    check_host_port(hostport)
}

/// host [ ":" port ], as in a Host field: no userinfo.
fn check_host_port(hostport: &[u8]) -> Result<(), Error> {
    let bracketed = hostport.first() == Some(&b'[');
    let (host, port) = if bracketed {
        let close = hostport.iter().position(|&b| b == b']').ok_or(Error::Target)?;
        let inner = &hostport[1..close];
        if inner.is_empty() || !inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return Err(Error::Target);
        }
        match &hostport[close + 1..] {
            [] => (inner, &[][..]),
            [b':', port @ ..] => (inner, port),
            _ => return Err(Error::Target),
        }
    } else {
        match hostport.iter().rposition(|&b| b == b':') {
            Some(i) => (&hostport[..i], &hostport[i + 1..]),
            None => (hostport, &[][..]),
        }
    };
    // A colon belongs in a host only between the brackets of an IPv6 address.
    if host.is_empty()
        || !host.iter().all(|&b| is_unreserved_or_sub(b) || b == b'%' || b == b':' && bracketed)
    {
        return Err(Error::Target);
    }
    // At most 65535, with leading zeros allowed (RFC 3986 port = *DIGIT).
    let digits = &port[port.iter().position(|&b| b != b'0').unwrap_or(port.len())..];
    // Its length first: the value of a longer run of digits would overflow.
    let value = (digits.len() <= 5)
        .then(|| {
            digits.iter().try_fold(0u32, |v, &b| b.is_ascii_digit().then(|| v * 10 + u32::from(b - b'0')))
        })
        .flatten();
    if !port.iter().all(u8::is_ascii_digit) || value.is_none_or(|v| v > 65535) {
        return Err(Error::Target);
    }
    Ok(())
}

fn is_unreserved_or_sub(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
}

/// Refuses an unfinished request line that cannot become a request: a byte
/// no method may hold, before the first space. A client that sends such a
/// line is not speaking HTTP, and waiting for its line end (never coming, in
/// a TLS handshake) would hold the connection for the header timeout.
fn not_a_method(data: &[u8]) -> Option<Error> {
    let method = &data[..data.iter().position(|&b| b == b' ').unwrap_or(data.len())];
    let bad = method.iter().position(|&b| !is_tchar(b) && b != b'\r')?;
    // A TLS record of type handshake (22), version 3.x.
    Some(if bad == 0 && data.starts_with(&[0x16, 0x03]) { Error::TlsHandshake } else { Error::Method })
}

/// Whether `b` may appear in a token (a method or a field name, RFC 9110
/// 5.6.2). One load: every response header name passes through here.
pub fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

fn classify(name: &[u8]) -> Known {
    // Dispatch on length first: most names are rejected by one comparison.
    match name.len() {
        4 if name.eq_ignore_ascii_case(b"host") => Known::Host,
        6 if name.eq_ignore_ascii_case(b"cookie") => Known::Cookie,
        6 if name.eq_ignore_ascii_case(b"expect") => Known::Expect,
        10 if name.eq_ignore_ascii_case(b"connection") => Known::Connection,
        12 if name.eq_ignore_ascii_case(b"content-type") => Known::ContentType,
        14 if name.eq_ignore_ascii_case(b"content-length") => Known::ContentLength,
        15 if name.eq_ignore_ascii_case(b"x-forwarded-ssl") => Known::XForwardedSsl,
        17 if name.eq_ignore_ascii_case(b"transfer-encoding") => Known::TransferEncoding,
        17 if name.eq_ignore_ascii_case(b"x-forwarded-proto") => Known::XForwardedProto,
        20 if name.eq_ignore_ascii_case(b"x-forwarded-protocol") => Known::XForwardedProtocol,
        _ => Known::Other,
    }
}

/// Content-Length is 1*DIGIT: no sign, no list, no whitespace inside.
pub fn parse_content_length(v: &[u8]) -> Result<u64, Error> {
    if v.is_empty() {
        return Err(Error::ContentLength);
    }
    // `1*DIGIT`: any number of leading zeros, any value a u64 holds.
    v.iter()
        .try_fold(0u64, |n, &d| match d {
            b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(d - b'0')),
            _ => None,
        })
        .ok_or(Error::ContentLength)
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &v[start..end]
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

fn memchr2(a: u8, b: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&x| x == a || x == b)
}

/// Percent-decodes `src` into `out` (cleared first). A `%` not followed by
/// two hex digits is kept as it is, as most servers do.
pub fn percent_decode(src: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(src.len());
    let mut i = 0;
    while i < src.len() {
        let b = src[i];
        if b == b'%' && i + 2 < src.len() {
            if let (Some(h), Some(l)) = (hex(src[i + 1]), hex(src[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Where a [`ChunkedDecoder`] is within the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data, with this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// Reading trailer fields after the last chunk.
    Trailers,
    Done,
}

/// What one call to [`ChunkedDecoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Body bytes at this range of the input; `consumed` bytes were used in all.
    Data { data: Range<usize>, consumed: usize },
    /// No body bytes yet: `consumed` framing bytes were used and more input is needed.
    NeedMore { consumed: usize },
    /// The body ended; `consumed` bytes were used.
    End { consumed: usize },
}

/// Incremental decoder for a chunked request body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder { state: ChunkState::Size, trailer_bytes: 0 }
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// How many bytes of `buf`, read from where this decoder stands, the body
    /// takes to its end, if it ends in `buf`: what follows is the next
    /// request. The decoder itself is left as it is.
    pub fn end_within(&self, buf: &[u8]) -> Option<usize> {
        let mut probe = self.clone();
        let mut pos = 0;
        loop {
            match probe.decode(&buf[pos..]).ok()? {
                Chunk::Data { consumed, .. } => pos += consumed,
                Chunk::NeedMore { .. } => return None,
                Chunk::End { consumed } => return Some(pos + consumed),
            }
        }
    }

    /// Decodes from `buf`, returning at most one run of body bytes. Call again
    /// with the unconsumed rest (and more input) until [`Chunk::End`].
    pub fn decode(&mut self, buf: &[u8]) -> Result<Chunk, Error> {
        let mut pos = 0;
        loop {
            match self.state {
                ChunkState::Done => return Ok(Chunk::End { consumed: pos }),
                ChunkState::Data(left) => {
                    let avail = (buf.len() - pos) as u64;
                    if avail == 0 {
                        return Ok(Chunk::NeedMore { consumed: pos });
                    }
                    let n = avail.min(left) as usize;
                    self.state = if n as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Chunk::Data { data: pos..pos + n, consumed: pos + n });
                }
                ChunkState::DataEnd => {
                    let rest = &buf[pos..];
                    if rest.len() < 2 {
                        if rest.first().is_some_and(|&b| b != b'\r') {
                            return Err(Error::ChunkTerminator);
                        }
                        return Ok(Chunk::NeedMore { consumed: pos });
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(Error::ChunkTerminator);
                    }
                    pos += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Size => {
                    let rest = &buf[pos..];
                    let Some(nl) = memchr(b'\n', &rest[..rest.len().min(MAX_CHUNK_LINE)]) else {
                        if rest.len() >= MAX_CHUNK_LINE {
                            return Err(Error::ChunkLineTooLong);
                        }
                        // Refuse bad input early rather than wait for a line end.
                        if let Some(&b) = rest.first() {
                            if !b.is_ascii_hexdigit() {
                                return Err(Error::ChunkSize);
                            }
                        }
                        return Ok(Chunk::NeedMore { consumed: pos });
                    };
                    if nl == 0 || rest[nl - 1] != b'\r' {
                        return Err(if nl == 0 { Error::ChunkSize } else { Error::BareLineEnding });
                    }
                    let size = parse_chunk_line(&rest[..nl - 1])?;
                    pos += nl + 1;
                    self.state = if size == 0 { ChunkState::Trailers } else { ChunkState::Data(size) };
                }
                ChunkState::Trailers => {
                    let rest = &buf[pos..];
                    let Some(nl) = memchr(b'\n', rest) else {
                        if self.trailer_bytes + rest.len() > MAX_TRAILERS {
                            return Err(Error::Trailer);
                        }
                        return Ok(Chunk::NeedMore { consumed: pos });
                    };
                    if nl == 0 || rest[nl - 1] != b'\r' {
                        return Err(Error::BareLineEnding);
                    }
                    self.trailer_bytes += nl + 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(Error::Trailer);
                    }
                    let line = &rest[..nl - 1];
                    pos += nl + 1;
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    } else {
                        check_trailer(line)?;
                    }
                }
            }
        }
    }
}

/// chunk-size [ chunk-ext ] where chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
fn parse_chunk_line(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::ChunkSize);
    }
    let significant = line[..digits].iter().skip_while(|&&b| b == b'0').count();
    if significant > 15 {
        return Err(Error::ChunkSize);
    }
    let size = line[..digits].iter().fold(0u64, |n, &b| n << 4 | u64::from(hex(b).unwrap_or(0)));
    let ext = &line[digits..];
    if ext.is_empty() {
        return Ok(size);
    }
    // Whitespace is only allowed before a ';' that starts an extension.
    let after_ws = ext.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(ext.len());
    if ext.get(after_ws) != Some(&b';') {
        return Err(if after_ws == 0 { Error::ChunkSize } else { Error::ChunkExtension });
    }
    if ext.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Error::ChunkExtension);
    }
    Ok(size)
}

/// Trailer fields are headers, and may not carry framing or routing fields.
fn check_trailer(line: &[u8]) -> Result<(), Error> {
    if line[0] == b' ' || line[0] == b'\t' {
        return Err(Error::ObsFold);
    }
    let colon = memchr(b':', line).ok_or(Error::Trailer)?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Error::Trailer);
    }
    if trim_ows(&line[colon + 1..]).iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Error::HeaderValue);
    }
    const FORBIDDEN: [&str; 6] =
        ["content-length", "transfer-encoding", "host", "te", "trailer", "connection"];
    if FORBIDDEN.iter().any(|f| name.eq_ignore_ascii_case(f.as_bytes())) {
        return Err(Error::Trailer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Status<()>, Error> {
        let mut head = Head::default();
        parse_head(raw, &Limits::default(), &mut head)
    }

    #[test]
    fn a_flood_of_empty_lines_is_refused_before_a_request_line() {
        assert_eq!(parse(&[b'\r', b'\n'].repeat(9)), Err(Error::LeadingEmptyLines));
        assert_eq!(parse(&[b'\n'; 17]), Err(Error::BareLineEnding));
        assert_eq!(parse(b"\r\r\rGET / HTTP/1.1\r\n\r\n"), Err(Error::BareLineEnding));
        assert_eq!(parse(b"\nGET / HTTP/1.1\r\n\r\n"), Err(Error::BareLineEnding));
        assert_eq!(parse(b"\r\n\r"), Ok(Status::Partial));
        // What cannot start a request is refused before its line ends.
        assert_eq!(parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), Err(Error::TlsHandshake));
        assert_eq!(parse(b"G\x00T /"), Err(Error::Method));
        // A real ClientHello has a line feed among its first bytes (curl's
        // cipher suite c0 0a): still named as TLS.
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xc0\x0a\x00 /"),
            Err(Error::TlsHandshake)
        );
        assert_eq!(parse(b"G\xe9T / HTTP/1.1\r\n\r\n"), Err(Error::Method));
        assert_eq!(parse(b"GET /caf\xe9 HTTP/1.1\r\n\r\n"), Err(Error::NonAsciiTarget));
        assert_eq!(parse(b"GET /\x00"), Ok(Status::Partial));
        assert_eq!(parse(b"GE"), Ok(Status::Partial));
        assert_eq!(parse(b"GET\r"), Ok(Status::Partial));
        assert_eq!(parse(b"\r\n\r\n"), Ok(Status::Partial));
    }

    #[test]
    fn an_absolute_form_target_gives_its_authority() {
        let raw = b"GET http://example.com:81/a?b HTTP/1.1\r\nHost: other\r\n\r\n";
        let (h, _) = parse_ok(raw);
        assert_eq!(&raw[h.authority.clone()], b"example.com:81");
        assert_eq!(&raw[h.path.clone()], b"/a");
        let raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(parse_ok(raw).0.authority.is_empty());
        let raw = b"GET http://good@evil.example:81/ HTTP/1.1\r\nHost: good\r\n\r\n";
        let (h, _) = parse_ok(raw);
        assert_eq!(&raw[h.authority.clone()], b"evil.example:81");
    }

    fn parse_ok(raw: &[u8]) -> (Head, usize) {
        let mut head = Head::default();
        match parse_head(raw, &Limits::default(), &mut head) {
            Ok(Status::Complete((), n)) => (head, n),
            other => panic!("{:?}: {:?}", String::from_utf8_lossy(raw), other),
        }
    }

    /// (input, expected framing or error)
    const HEADS: &[(&[u8], Result<BodyFraming, Error>)] = &[
        (b"GET / HTTP/1.1\r\n\r\n", Ok(BodyFraming::None)),
        // An empty Transfer-Encoding has no final chunked: 400, never ignored.
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: \r\nContent-Length: 3\r\n\r\n",
            Err(Error::BadTransferEncoding),
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\r\n", Err(Error::BadTransferEncoding)),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\n\r\n", Err(Error::BadTransferEncoding)),
        // Host: host[:port] or empty.
        (b"GET / HTTP/1.1\r\nHost: example.com:8080\r\n\r\n", Ok(BodyFraming::None)),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", Ok(BodyFraming::None)),
        (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", Ok(BodyFraming::None)),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: evil.com/x\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: user@evil.com\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: a:b:c\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: a:b:80\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", Ok(BodyFraming::None)),
        (b"GET http://a:b:80/ HTTP/1.1\r\n\r\n", Err(Error::Target)),
        (b"GET / HTTP/1.1\r\nHost: a:99999999\r\n\r\n", Err(Error::Host)),
        // Digits enough to overflow the port's value as it is read.
        (b"GET http://a:3333333333333333333/ HTTP/1.1\r\n\r\n", Err(Error::Target)),
        (b"GET / HTTP/1.1\r\nHost: a:3333333333333333333\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", Err(Error::Host)),
        (b"GET / HTTP/1.1\r\nHost: a:65535\r\n\r\n", Ok(BodyFraming::None)),
        (b"GET / HTTP/1.1\r\nHost: a:0000080\r\n\r\n", Ok(BodyFraming::None)),
        // One or a few empty lines before the request line are skipped; a flood is not.
        (b"\r\nGET / HTTP/1.1\r\n\r\n", Ok(BodyFraming::None)),
        (b"\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n", Ok(BodyFraming::None)),
        (b"GET / HTTP/1.0\r\nContent-Length: 0\r\n\r\n", Ok(BodyFraming::None)),
        (b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n", Ok(BodyFraming::Length(12))),
        // 1*DIGIT: leading zeros do not count toward the length limit.
        (b"POST / HTTP/1.1\r\nContent-Length: 0000000000000000003\r\n\r\n", Ok(BodyFraming::Length(3))),
        (b"POST / HTTP/1.1\r\nContent-Length: 00\r\n\r\n", Ok(BodyFraming::None)),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", Ok(BodyFraming::Chunked)),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Err(Error::UnknownTransferCoding)),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: deflate, chunked\r\n\r\n",
            Err(Error::UnknownTransferCoding),
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n",
            Ok(BodyFraming::Chunked),
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", Err(Error::BadTransferEncoding)),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            Err(Error::BadTransferEncoding),
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: foo, chunked\r\n\r\n", Err(Error::UnknownTransferCoding)),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\n",
            Err(Error::IdentityEncoding),
        ),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Err(Error::BadTransferEncoding)),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            Err(Error::LengthAndEncoding),
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", Err(Error::ContentLength)),
        (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", Err(Error::ContentLength)),
        (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", Err(Error::ContentLength)),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", Err(Error::ContentLength)),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Err(Error::DuplicateHeader)),
        (b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n", Err(Error::BareLineEnding)),
        (b"GET / HTTP/1.1\r\nX: a\x07b\r\n\r\n", Err(Error::HeaderValue)),
        (b"GET / HTTP/1.1\r\nX: a\x7fb\r\n\r\n", Err(Error::HeaderValue)),
        (b"GET / HTTP/1.1\r\nX: one\r\n two\r\n\r\n", Err(Error::ObsFold)),
        (b"GET / HTTP/1.1\r\nba\x00z: x\r\n\r\n", Err(Error::HeaderName)),
        (b"GET / HTTP/1.1\r\nName : x\r\n\r\n", Err(Error::HeaderName)),
        (b"get / HTTP/1.1\r\n\r\n", Err(Error::Method)),
        (b"GET /foo FTP/1.1\r\n\r\n", Err(Error::Version)),
        (b"GET /foo HTTP/2.0\r\n\r\n", Err(Error::VersionNotSupported)),
        (b"GET /foo HTTP/3.0\r\nHost: a\r\n\r\n", Err(Error::VersionNotSupported)),
        (b"GET /foo HTTP/0.9\r\n\r\n", Err(Error::VersionNotSupported)),
        (b"GET /foo HTTP/1.10\r\n\r\n", Err(Error::Version)),
        (b"GET /foo HTTP/1.2\r\n\r\n", Ok(BodyFraming::None)),
        (b"\r\nPOST /foo HTTP/1.9\r\nContent-Length: 3\r\n\r\n", Ok(BodyFraming::Length(3))),
        (b"POST /foo HTTP/1.2\r\nTransfer-Encoding: chunked\r\n\r\n", Ok(BodyFraming::Chunked)),
        (b"GET /foo HTTP/1.2\nHost: a\r\n\r\n", Err(Error::Version)),
        (b"GET /foo HTTP/20.0\r\n\r\n", Err(Error::Version)),
        (b"GET /foo http/2.0\r\n\r\n", Err(Error::Version)),
        (b"GET * HTTP/1.1\r\n\r\n", Err(Error::Target)),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", Ok(BodyFraming::None)),
        (b"GET foo/bar HTTP/1.1\r\n\r\n", Err(Error::Target)),
        (b"GET example.com:443 HTTP/1.1\r\n\r\n", Err(Error::Target)),
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", Err(Error::Connect)),
        (b"CONNECT /x HTTP/1.1\r\n\r\n", Err(Error::Target)),
        (b"PUT s://]ufd/: HTTP/1.1\r\n\r\n", Err(Error::Target)),
        (b"GET /\xc3\xa0 HTTP/1.1\r\n\r\n", Err(Error::NonAsciiTarget)),
        (b"GET /caf\xe9 HTTP/1.1\r\n\r\n", Err(Error::NonAsciiTarget)),
        (b"GET /?q=\xe9 HTTP/1.1\r\n\r\n", Err(Error::NonAsciiTarget)),
    ];

    #[test]
    fn head_table() {
        for (raw, want) in HEADS {
            let mut head = Head::default();
            let got = parse_head(raw, &Limits::default(), &mut head).map(|s| {
                assert!(matches!(s, Status::Complete(..)), "{:?}", String::from_utf8_lossy(raw));
                head.framing
            });
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn every_prefix_is_partial() {
        let raw = b"POST /a/b?x=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\n";
        for n in 0..raw.len() {
            assert_eq!(parse(&raw[..n]), Ok(Status::Partial), "prefix {n}");
        }
        assert_eq!(parse_ok(raw).1, raw.len());
    }

    #[test]
    fn fields_and_ranges() {
        let raw = b"\r\nGET http://h:8/p%20q?a=1#frag HTTP/1.0\r\nX_Y: dropped\r\nCookie: a=1\r\nConnection: keep-alive\r\n\r\nrest";
        let (head, n) = parse_ok(raw);
        assert_eq!(&raw[n..], b"rest");
        assert_eq!(&raw[head.method.clone()], b"GET");
        assert_eq!(&raw[head.path.clone()], b"/p%20q");
        assert_eq!(&raw[head.query.clone()], b"a=1");
        assert_eq!(head.form, TargetForm::Absolute);
        assert_eq!(head.fields.len(), 2);
        assert_eq!(head.fields[0].known, Known::Cookie);
        assert!(head.keep_alive);
        assert_eq!(head.version, Version::Http10);
    }

    #[test]
    fn keep_alive_defaults() {
        assert!(parse_ok(b"GET / HTTP/1.1\r\n\r\n").0.keep_alive);
        assert!(!parse_ok(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").0.keep_alive);
        assert!(!parse_ok(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(parse_ok(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").0.expect_continue);
    }

    #[test]
    fn limits() {
        let limits = Limits { max_request_line: 20, max_headers: 2, max_header_line: 30 };
        let mut head = Head::default();
        let long_line = b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(parse_head(long_line, &limits, &mut head), Err(Error::RequestLineTooLong));
        let three = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(parse_head(three, &limits, &mut head), Err(Error::TooManyHeaders));
        let big = b"GET / HTTP/1.1\r\nA: 123456789012345678901234567890\r\n\r\n";
        assert_eq!(parse_head(big, &limits, &mut head), Err(Error::HeaderLineTooLong));
        // The line's length as sent: whitespace around the value counts.
        let fits = b"GET / HTTP/1.1\r\nA: 1234567890123456789012345\r\n\r\n";
        assert!(matches!(parse_head(fits, &limits, &mut head), Ok(Status::Complete(..))));
        let padded = b"GET / HTTP/1.1\r\nA:                          1\t\t\t\r\nB: 2\r\n\r\n";
        assert_eq!(parse_head(padded, &limits, &mut head), Err(Error::HeaderLineTooLong));
        let last = b"GET / HTTP/1.1\r\nB: 2\r\nA:                          1\r\n\r\n";
        assert_eq!(parse_head(last, &limits, &mut head), Err(Error::HeaderLineTooLong));
        // An unfinished header line is refused once it is too long.
        let unfinished = b"GET / HTTP/1.1\r\nA: 1\r\nB:                             ";
        assert_eq!(parse_head(unfinished, &limits, &mut head), Err(Error::HeaderLineTooLong));
        assert_eq!(parse_head(&unfinished[..40], &limits, &mut head), Ok(Status::Partial));
        assert_eq!(Error::RequestLineTooLong.status(), 414);
        assert_eq!(Error::TooManyHeaders.status(), 431);
        assert_eq!(Error::UnknownTransferCoding.status(), 501);
    }

    fn dechunk(raw: &[u8]) -> Result<Vec<u8>, Error> {
        // Feed one byte more at a time to exercise every split point.
        let mut dec = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut start = 0;
        for end in 1..=raw.len() {
            loop {
                match dec.decode(&raw[start..end])? {
                    Chunk::Data { data, consumed } => {
                        out.extend_from_slice(&raw[start + data.start..start + data.end]);
                        start += consumed;
                    }
                    Chunk::NeedMore { consumed } => {
                        start += consumed;
                        break;
                    }
                    Chunk::End { .. } => return Ok(out),
                }
            }
        }
        Err(Error::ChunkTerminator)
    }

    type ChunkVector = (&'static [u8], Result<&'static [u8], Error>);
    const CHUNKED: &[ChunkVector] = &[
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", Ok(b"hello world")),
        (b"5; a; b=c\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        (b"5;foo=\"bar baz\"\r\nhello\r\n0\r\n\r\n", Ok(b"hello")),
        (b"0005\r\nhello\r\n000\r\n\r\n", Ok(b"hello")),
        (b"A\r\n0123456789\r\n0\r\nVary: *\r\n\r\n", Ok(b"0123456789")),
        (b"6_0\r\n", Err(Error::ChunkSize)),
        (b"0x5\r\nhello\r\n", Err(Error::ChunkSize)),
        (b"-5\r\nhello\r\n", Err(Error::ChunkSize)),
        (b"+5\r\nhello\r\n", Err(Error::ChunkSize)),
        (b"5 \r\nhello\r\n", Err(Error::ChunkExtension)),
        (b" 5\r\nhello\r\n", Err(Error::ChunkSize)),
        (b"5\n;\r\nhello\r\n", Err(Error::BareLineEnding)),
        (b"\r\nhello\r\n", Err(Error::ChunkSize)),
        (b"5;ext=val\rue\r\nhello\r\n", Err(Error::ChunkExtension)),
        (b"5\r\nhelloXX", Err(Error::ChunkTerminator)),
        (b"10000000000000000\r\n", Err(Error::ChunkSize)),
        (b"5\r\nhello\r\n0\r\nContent-Length: 9\r\n\r\n", Err(Error::Trailer)),
        (b"5\r\nhello\r\n0\r\nHost: x\r\n\r\n", Err(Error::Trailer)),
        (b"0\r\n", Err(Error::ChunkTerminator)),
    ];

    #[test]
    fn chunked_table() {
        for (raw, want) in CHUNKED {
            let got = dechunk(raw);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{:?}", String::from_utf8_lossy(raw));
        }
        // Extensions that make the size line too long are named as such.
        let mut long = b"3;a=".to_vec();
        long.resize(MAX_CHUNK_LINE + 10, b'b');
        long.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
        assert_eq!(dechunk(&long).err(), Some(Error::ChunkLineTooLong));
    }

    #[test]
    fn of_the_names_with_an_underscore_only_script_name_is_kept() {
        let raw =
            b"GET /p/x HTTP/1.1\r\nHost: h\r\nX_Forwarded_Proto: https\r\nscript_name: /p\r\nA: 1\r\n\r\n";
        let mut head = Head::default();
        assert!(matches!(parse_head(raw, &Limits::default(), &mut head), Ok(Status::Complete((), _))));
        assert!(head.script_name_field && !head.scheme_fields);
        let kept: Vec<(&[u8], Known)> = head.fields.iter().map(|f| (&raw[f.name.clone()], f.known)).collect();
        assert_eq!(
            kept,
            [(&b"Host"[..], Known::Host), (b"script_name", Known::ScriptName), (b"A", Known::Other)]
        );
        assert_eq!(&raw[head.fields[1].value.clone()], b"/p");
    }

    #[test]
    fn the_end_of_a_chunked_body_is_found_without_decoding_it() {
        let body = b"5\r\nhello\r\n0\r\n\r\n";
        let mut next = body.to_vec();
        next.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let fresh = ChunkedDecoder::new();
        assert_eq!(fresh.end_within(body), Some(body.len()));
        assert_eq!(fresh.end_within(&next), Some(body.len()));
        assert_eq!(fresh.end_within(b"5\r\nhello\r\nVary: *\r\n0\r\n\r\n"), None);
        assert_eq!(fresh.end_within(b"A;x=y\r\n0123456789\r\n0\r\nVary: *\r\n\r\nGET"), Some(33));
        for cut in 0..body.len() {
            assert_eq!(fresh.end_within(&body[..cut]), None, "{cut}");
        }
        // From where a decoder stands, part of the body read already.
        let mut part = ChunkedDecoder::new();
        assert!(matches!(part.decode(b"5\r\nhel"), Ok(Chunk::Data { consumed: 6, .. })));
        assert_eq!(part.end_within(b"lo\r\n0\r\n\r\nGET"), Some(9));
        assert!(matches!(part.decode(b"lo\r\n0\r\n\r\n"), Ok(Chunk::Data { consumed: 2, .. })));
    }

    #[test]
    fn tchar_table_is_rfc_9110_token_set() {
        let delimiters = b"\"(),/:;<=>?@[\\]{}";
        for b in 0..=255u8 {
            let want = b.is_ascii_graphic() && !delimiters.contains(&b);
            assert_eq!(is_tchar(b), want, "byte {b:#04x}");
        }
    }

    #[test]
    fn percent() {
        let mut out = Vec::new();
        percent_decode(b"/caf%C3%A9%2", &mut out);
        assert_eq!(out, b"/caf\xc3\xa9%2");
        percent_decode(b"%zz%41", &mut out);
        assert_eq!(out, b"%zzA");
    }
}
