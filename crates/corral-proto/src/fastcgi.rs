//! FastCGI 1.0 records, the application's side, as nginx's `fastcgi_pass`
//! and Apache's `mod_proxy_fcgi` speak it.
//!
//! Everything on the connection is a record: an 8-byte header (version,
//! type, request id, content length, padding length), the content, then
//! padding to skip. A request is a `BEGIN_REQUEST` record, a `PARAMS` stream
//! and a `STDIN` stream, each stream ended by an empty record; the answer is
//! a `STDOUT` stream holding CGI-style headers and body, then `END_REQUEST`.
//!
//! Parsing is split in layers so the engine keeps control of buffering:
//! [`parse_record`] frames one record, [`parse_begin_request`] reads that
//! record's body, and [`parse_pairs`] checks a complete name-value block.
//! `PARAMS` content may be cut anywhere, even inside a length, so the engine
//! joins the stream's records before calling [`parse_pairs`], or feeds the
//! joined bytes to [`parse_pair`] as they arrive. The `write_*` functions
//! append records to an output buffer.

use std::fmt;

use crate::Status;

/// The only protocol version there is.
pub const VERSION: u8 = 1;
/// Bytes in a record header.
pub const HEADER_LEN: usize = 8;
/// Most content bytes in one record: the length field is a `u16`.
pub const MAX_CONTENT_LEN: usize = u16::MAX as usize;
/// The largest record content that is a multiple of 8 bytes: a writer that
/// sends records of this size needs no padding to keep them aligned.
pub const MAX_ALIGNED_CONTENT_LEN: usize = MAX_CONTENT_LEN & !7;
const _: () = assert!(MAX_ALIGNED_CONTENT_LEN % 8 == 0 && MAX_ALIGNED_CONTENT_LEN + 8 > MAX_CONTENT_LEN);
/// Longest name-value block accepted, such as a request's joined `PARAMS`
/// stream. The front end builds it from an HTTP request head it has already
/// limited; 1 MiB is generous for any head a front end lets through (Apache's
/// defaults allow 100 fields of 8190 bytes) and bounds what the engine
/// buffers. A pair whose lengths alone exceed it is refused before its bytes
/// arrive.
pub const MAX_PARAMS_LEN: usize = 1 << 20;
/// The request id of management records such as `GET_VALUES`.
pub const NULL_REQUEST_ID: u16 = 0;
/// `BEGIN_REQUEST` flag: keep the connection open after this request.
pub const KEEP_CONN: u8 = 1;
/// `GET_VALUES` variable: the most concurrent transport connections accepted.
pub const MAX_CONNS: &[u8] = b"FCGI_MAX_CONNS";
/// `GET_VALUES` variable: the most concurrent requests accepted.
pub const MAX_REQS: &[u8] = b"FCGI_MAX_REQS";
/// `GET_VALUES` variable: `1` if requests may be multiplexed on one connection.
pub const MPXS_CONNS: &[u8] = b"FCGI_MPXS_CONNS";

/// A name and its value, borrowed from the input.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// The largest value a name or value length can carry (31 bits).
const MAX_PAIR_LEN: usize = 0x7fff_ffff;

/// Why FastCGI input was refused, or a record could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A record header with a version other than 1.
    Version(u8),
    /// A `BEGIN_REQUEST` body that is not 8 bytes.
    BeginRequestLength,
    /// A name-value pair with a zero-length name.
    EmptyName,
    /// A name-value block that ends inside a pair.
    TruncatedPair,
    /// A name-value block, or one pair, over [`MAX_PARAMS_LEN`].
    ParamsTooLarge,
    /// Record content to write over [`MAX_CONTENT_LEN`].
    ContentTooLong,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Version(v) => write!(f, "unsupported FastCGI version {v}"),
            Error::BeginRequestLength => f.write_str("FastCGI BEGIN_REQUEST body is not 8 bytes"),
            Error::EmptyName => f.write_str("empty FastCGI parameter name"),
            Error::TruncatedPair => f.write_str("FastCGI name-value pair cut short"),
            Error::ParamsTooLarge => f.write_str("FastCGI parameters over 1 MiB"),
            Error::ContentTooLong => f.write_str("FastCGI record content over 65535 bytes"),
        }
    }
}

impl std::error::Error for Error {}

/// A record's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordType {
    BeginRequest,
    AbortRequest,
    EndRequest,
    Params,
    Stdin,
    Stdout,
    Stderr,
    Data,
    GetValues,
    GetValuesResult,
    UnknownType,
    /// A type this version of the protocol does not define; answer it with
    /// [`write_unknown_type`].
    Unknown(u8),
}

impl RecordType {
    pub fn from_u8(t: u8) -> RecordType {
        match t {
            1 => RecordType::BeginRequest,
            2 => RecordType::AbortRequest,
            3 => RecordType::EndRequest,
            4 => RecordType::Params,
            5 => RecordType::Stdin,
            6 => RecordType::Stdout,
            7 => RecordType::Stderr,
            8 => RecordType::Data,
            9 => RecordType::GetValues,
            10 => RecordType::GetValuesResult,
            11 => RecordType::UnknownType,
            t => RecordType::Unknown(t),
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            RecordType::BeginRequest => 1,
            RecordType::AbortRequest => 2,
            RecordType::EndRequest => 3,
            RecordType::Params => 4,
            RecordType::Stdin => 5,
            RecordType::Stdout => 6,
            RecordType::Stderr => 7,
            RecordType::Data => 8,
            RecordType::GetValues => 9,
            RecordType::GetValuesResult => 10,
            RecordType::UnknownType => 11,
            RecordType::Unknown(t) => t,
        }
    }
}

impl From<u8> for RecordType {
    fn from(t: u8) -> Self {
        RecordType::from_u8(t)
    }
}

impl From<RecordType> for u8 {
    fn from(t: RecordType) -> Self {
        t.as_u8()
    }
}

/// One framed record, borrowing its content from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordType,
    pub request_id: u16,
    /// The content without padding. Empty on a stream type ends that stream.
    pub content: &'a [u8],
}

/// The role the front end asks the application to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Responder,
    Authorizer,
    Filter,
    /// Not a defined role: answer with [`ProtocolStatus::UnknownRole`].
    Unknown(u16),
}

/// The body of a `BEGIN_REQUEST` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeginRequest {
    pub role: Role,
    /// [`KEEP_CONN`]: the front end will send more requests on this connection.
    pub keep_conn: bool,
}

/// The protocol-level outcome of a request, sent in `END_REQUEST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolStatus {
    RequestComplete = 0,
    /// The application does not multiplex and this connection already has a request.
    CantMpxConn = 1,
    Overloaded = 2,
    UnknownRole = 3,
}

/// Frames one record from the start of `buf`.
///
/// Answers with the record and the bytes it used, padding included, so the
/// next record starts right after. A version other than 1 is refused as soon
/// as the first byte arrives, so a client speaking some other protocol is
/// turned away at once. Whether the type suits the request id (management
/// records use id 0) is the engine's decision.
pub fn parse_record(buf: &[u8]) -> Result<Status<Record<'_>>, Error> {
    match buf.first() {
        None => return Ok(Status::Partial),
        Some(&v) if v != VERSION => return Err(Error::Version(v)),
        Some(_) => {}
    }
    let [_, kind, id_hi, id_lo, len_hi, len_lo, padding, _reserved, ..] = *buf else {
        return Ok(Status::Partial);
    };
    let content_end = HEADER_LEN + usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let total = content_end + usize::from(padding);
    if buf.len() < total {
        return Ok(Status::Partial);
    }
    let record = Record {
        kind: RecordType::from_u8(kind),
        request_id: u16::from_be_bytes([id_hi, id_lo]),
        content: &buf[HEADER_LEN..content_end],
    };
    Ok(Status::Complete(record, total))
}

/// Reads the body of a `BEGIN_REQUEST` record. An unknown role is not an
/// error here: the protocol answers it with an `END_REQUEST`.
pub fn parse_begin_request(content: &[u8]) -> Result<BeginRequest, Error> {
    let [role_hi, role_lo, flags, _, _, _, _, _] = *content else {
        return Err(Error::BeginRequestLength);
    };
    let role = match u16::from_be_bytes([role_hi, role_lo]) {
        1 => Role::Responder,
        2 => Role::Authorizer,
        3 => Role::Filter,
        r => Role::Unknown(r),
    };
    // The other flag bits are reserved; ignoring them is what the spec asks.
    Ok(BeginRequest { role, keep_conn: flags & KEEP_CONN != 0 })
}

/// Reads one pair length: one byte below 128, otherwise four bytes with the
/// top bit set. `None` when the length is not all there yet.
fn read_len(buf: &[u8]) -> Option<(usize, usize)> {
    match *buf {
        [b, ..] if b & 0x80 == 0 => Some((usize::from(b), 1)),
        [b0, b1, b2, b3, ..] => Some((u32::from_be_bytes([b0 & 0x7f, b1, b2, b3]) as usize, 4)),
        _ => None,
    }
}

/// Reads one name-value pair from the start of `buf`.
///
/// Answers with `(name, value)` and the bytes used, or `Partial` when the
/// pair is not all there; a pair that could never fit in [`MAX_PARAMS_LEN`]
/// or has an empty name is refused as soon as its lengths arrive.
pub fn parse_pair(buf: &[u8]) -> Result<Status<Pair<'_>>, Error> {
    let Some((name_len, a)) = read_len(buf) else {
        return Ok(Status::Partial);
    };
    if name_len == 0 {
        return Err(Error::EmptyName);
    }
    if name_len > MAX_PARAMS_LEN {
        return Err(Error::ParamsTooLarge);
    }
    let Some((value_len, b)) = read_len(&buf[a..]) else {
        return Ok(Status::Partial);
    };
    let name_start = a + b;
    let value_start = name_start + name_len;
    let end = value_start + value_len;
    if end > MAX_PARAMS_LEN {
        return Err(Error::ParamsTooLarge);
    }
    if buf.len() < end {
        return Ok(Status::Partial);
    }
    Ok(Status::Complete((&buf[name_start..value_start], &buf[value_start..end]), end))
}

/// Checks a complete name-value block (a request's joined `PARAMS` stream,
/// or the content of `GET_VALUES`) and returns an iterator over its pairs,
/// which then cannot fail.
pub fn parse_pairs(block: &[u8]) -> Result<Pairs<'_>, Error> {
    if block.len() > MAX_PARAMS_LEN {
        return Err(Error::ParamsTooLarge);
    }
    let mut rest = block;
    while !rest.is_empty() {
        match parse_pair(rest)? {
            Status::Complete(_, n) => rest = &rest[n..],
            Status::Partial => return Err(Error::TruncatedPair),
        }
    }
    Ok(Pairs { rest: block })
}

/// Iterator over the (name, value) pairs of a block checked by [`parse_pairs`].
#[derive(Debug, Clone)]
pub struct Pairs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Pairs<'a> {
    type Item = Pair<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        // The block was checked by `parse_pairs`; if it somehow was not,
        // stopping early is the safe answer.
        match parse_pair(self.rest) {
            Ok(Status::Complete(pair, n)) => {
                self.rest = &self.rest[n..];
                Some(pair)
            }
            _ => {
                self.rest = &[];
                None
            }
        }
    }
}

impl std::iter::FusedIterator for Pairs<'_> {}

/// Appends a record header. The caller appends `content_len` bytes of
/// content and then `padding_len` bytes of padding.
pub fn encode_record_header(
    out: &mut Vec<u8>,
    kind: RecordType,
    request_id: u16,
    content_len: u16,
    padding_len: u8,
) {
    let [id_hi, id_lo] = request_id.to_be_bytes();
    let [len_hi, len_lo] = content_len.to_be_bytes();
    out.extend_from_slice(&[VERSION, kind.as_u8(), id_hi, id_lo, len_hi, len_lo, padding_len, 0]);
}

/// Appends one unpadded record holding all of `content`, or nothing and
/// [`Error::ContentTooLong`] if it does not fit in one record.
pub fn write_record(
    out: &mut Vec<u8>,
    kind: RecordType,
    request_id: u16,
    content: &[u8],
) -> Result<(), Error> {
    let len = u16::try_from(content.len()).map_err(|_| Error::ContentTooLong)?;
    encode_record_header(out, kind, request_id, len, 0);
    out.extend_from_slice(content);
    Ok(())
}

/// Appends `data` to a stream (`STDOUT`, `STDERR`) as records of at most
/// [`MAX_CONTENT_LEN`] bytes.
///
/// Writes nothing for empty `data`, since an empty record would end the
/// stream; use [`write_stream_end`] for that. Records are not padded: the
/// spec only recommends 8-byte alignment, for readers that want each header
/// aligned in memory; nginx and Apache read headers byte by byte, so padding
/// would cost bytes and buy nothing.
pub fn write_stream(out: &mut Vec<u8>, kind: RecordType, request_id: u16, data: &[u8]) {
    out.reserve(data.len() + data.len().div_ceil(MAX_CONTENT_LEN) * HEADER_LEN);
    for chunk in data.chunks(MAX_CONTENT_LEN) {
        let len = chunk.len() as u16; // chunks() keeps it within u16
        encode_record_header(out, kind, request_id, len, 0);
        out.extend_from_slice(chunk);
    }
}

/// Appends `data` to the `STDOUT` stream; see [`write_stream`].
pub fn write_stdout(out: &mut Vec<u8>, request_id: u16, data: &[u8]) {
    write_stream(out, RecordType::Stdout, request_id, data);
}

/// Appends the empty record that ends a stream.
pub fn write_stream_end(out: &mut Vec<u8>, kind: RecordType, request_id: u16) {
    encode_record_header(out, kind, request_id, 0, 0);
}

/// Appends an `END_REQUEST` record, which finishes the request.
pub fn write_end_request(
    out: &mut Vec<u8>,
    request_id: u16,
    app_status: u32,
    protocol_status: ProtocolStatus,
) {
    encode_record_header(out, RecordType::EndRequest, request_id, 8, 0);
    out.extend_from_slice(&app_status.to_be_bytes());
    out.extend_from_slice(&[protocol_status as u8, 0, 0, 0]);
}

/// Appends a `GET_VALUES_RESULT` record answering a `GET_VALUES` query with
/// `pairs`. The answer must fit in one record; if it does not, nothing is
/// written and the error is [`Error::ContentTooLong`].
pub fn write_get_values_result(out: &mut Vec<u8>, pairs: &[Pair<'_>]) -> Result<(), Error> {
    let len: usize = pairs.iter().map(|(n, v)| pair_len(n, v)).sum();
    let len = u16::try_from(len).map_err(|_| Error::ContentTooLong)?;
    encode_record_header(out, RecordType::GetValuesResult, NULL_REQUEST_ID, len, 0);
    for (name, value) in pairs {
        encode_pair(out, name, value);
    }
    Ok(())
}

/// Appends an `UNKNOWN_TYPE` record naming the record type not understood.
pub fn write_unknown_type(out: &mut Vec<u8>, kind: u8) {
    encode_record_header(out, RecordType::UnknownType, NULL_REQUEST_ID, 8, 0);
    out.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
}

/// Appends one name-value pair, as the content of `PARAMS`, `GET_VALUES` and
/// `GET_VALUES_RESULT` records carries them; the caller frames the records.
///
/// # Panics
///
/// If the name or value is 2 GiB or longer, which the format cannot express.
pub fn encode_pair(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(pair_len(name, value));
    encode_len(out, name.len());
    encode_len(out, value.len());
    out.extend_from_slice(name);
    out.extend_from_slice(value);
}

fn encode_len(out: &mut Vec<u8>, len: usize) {
    assert!(len <= MAX_PAIR_LEN, "FastCGI name or value over 2 GiB");
    if len < 0x80 {
        out.push(len as u8);
    } else {
        out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes());
    }
}

/// Encoded size of one pair.
fn pair_len(name: &[u8], value: &[u8]) -> usize {
    let len_len = |n: usize| if n < 0x80 { 1 } else { 4 };
    len_len(name.len()) + len_len(value.len()) + name.len() + value.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, request_id: u16, content: &[u8], padding: u8) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record_header(&mut out, RecordType::from_u8(kind), request_id, content.len() as u16, padding);
        out.extend_from_slice(content);
        out.resize(out.len() + usize::from(padding), 0xAA);
        out
    }

    fn pairs_block(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in pairs {
            encode_pair(&mut out, n, v);
        }
        out
    }

    const BEGIN: &[u8] = &[1, 1, 0, 1, 0, 8, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0];

    #[derive(Debug)]
    enum Want {
        /// type, request id, content, bytes used.
        Ok(RecordType, u16, Vec<u8>, usize),
        Partial,
        Err(Error),
    }

    /// Records: (name, input, expected outcome)
    fn record_table() -> Vec<(&'static str, Vec<u8>, Want)> {
        let params = pairs_block(&[(b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", b"")]);
        let big = vec![b'x'; MAX_CONTENT_LEN];
        let mut with_tail = record(5, 1, b"abc", 5);
        with_tail.extend_from_slice(&record(5, 1, b"", 0));
        vec![
            ("BEGIN_REQUEST", BEGIN.to_vec(), Want::Ok(RecordType::BeginRequest, 1, BEGIN[8..].to_vec(), 16)),
            (
                "PARAMS",
                record(4, 1, &params, 0),
                Want::Ok(RecordType::Params, 1, params.clone(), 8 + params.len()),
            ),
            (
                "padding skipped",
                record(5, 7, b"hello", 3),
                Want::Ok(RecordType::Stdin, 7, b"hello".to_vec(), 16),
            ),
            (
                "255 bytes of padding",
                record(5, 7, b"a", 255),
                Want::Ok(RecordType::Stdin, 7, b"a".to_vec(), 264),
            ),
            ("padding on empty content", record(5, 7, b"", 8), Want::Ok(RecordType::Stdin, 7, vec![], 16)),
            ("end of stream", record(5, 1, b"", 0), Want::Ok(RecordType::Stdin, 1, vec![], 8)),
            ("next record not consumed", with_tail, Want::Ok(RecordType::Stdin, 1, b"abc".to_vec(), 16)),
            (
                "largest content",
                record(8, 2, &big, 255),
                Want::Ok(RecordType::Data, 2, big.clone(), 8 + 65535 + 255),
            ),
            (
                "request id is big-endian",
                record(2, 0x1234, b"", 0),
                Want::Ok(RecordType::AbortRequest, 0x1234, vec![], 8),
            ),
            (
                "largest request id",
                record(2, 0xffff, b"", 0),
                Want::Ok(RecordType::AbortRequest, 0xffff, vec![], 8),
            ),
            ("GET_VALUES", record(9, 0, b"\x0e\x00FCGI_MAX_CONNS", 0), {
                Want::Ok(RecordType::GetValues, 0, b"\x0e\x00FCGI_MAX_CONNS".to_vec(), 24)
            }),
            (
                "unknown type 12",
                record(12, 0, b"??", 6),
                Want::Ok(RecordType::Unknown(12), 0, b"??".to_vec(), 16),
            ),
            ("unknown type 0", record(0, 1, b"", 0), Want::Ok(RecordType::Unknown(0), 1, vec![], 8)),
            (
                "unknown type 255",
                record(255, 1, b"x", 0),
                Want::Ok(RecordType::Unknown(255), 1, b"x".to_vec(), 9),
            ),
            ("empty input", vec![], Want::Partial),
            ("header only", BEGIN[..8].to_vec(), Want::Partial),
            ("version 0", vec![0], Want::Err(Error::Version(0))),
            (
                "version 2",
                {
                    let mut r = BEGIN.to_vec();
                    r[0] = 2;
                    r
                },
                Want::Err(Error::Version(2)),
            ),
            ("HTTP on the FastCGI port", b"GET / HTTP/1.1\r\n\r\n".to_vec(), Want::Err(Error::Version(b'G'))),
        ]
    }

    fn check_record(name: &str, input: &[u8], want: &Want) {
        let got = parse_record(input);
        match (want, &got) {
            (Want::Ok(kind, id, content, used), Ok(Status::Complete(r, n))) => {
                assert_eq!((r.kind, r.request_id, *n), (*kind, *id, *used), "{name}");
                assert!(r.content == &content[..], "{name}: content differs");
            }
            (Want::Partial, Ok(Status::Partial)) => {}
            (Want::Err(e), Err(g)) if e == g => {}
            _ => panic!("{name}: got {:?}", got.map(|s| matches!(s, Status::Partial))),
        }
    }

    #[test]
    fn record_vectors() {
        for (name, input, want) in record_table() {
            check_record(name, &input, &want);
        }
    }

    #[test]
    fn every_prefix_of_a_valid_record_is_partial() {
        for (name, input, want) in record_table() {
            let Want::Ok(_, _, _, used) = want else { continue };
            for end in 0..used {
                let got = parse_record(&input[..end]);
                assert!(matches!(got, Ok(Status::Partial)), "{name}: prefix {end}: {:?}", got.map(|_| ()));
            }
        }
    }

    #[test]
    fn records_back_to_back() {
        let mut stream = BEGIN.to_vec();
        stream.extend(record(4, 1, &pairs_block(&[(b"A", b"B")]), 4));
        stream.extend(record(4, 1, b"", 0));
        stream.extend(record(5, 1, b"body", 4));
        stream.extend(record(5, 1, b"", 0));
        let mut kinds = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let Ok(Status::Complete(r, n)) = parse_record(rest) else {
                panic!("at {}", stream.len() - rest.len())
            };
            kinds.push((r.kind, r.content.len()));
            rest = &rest[n..];
        }
        use RecordType::*;
        assert_eq!(kinds, [(BeginRequest, 8), (Params, 4), (Params, 0), (Stdin, 4), (Stdin, 0)]);
    }

    #[test]
    fn record_type_round_trips() {
        for t in 0..=255u8 {
            assert_eq!(RecordType::from(t).as_u8(), t);
            assert_eq!(u8::from(RecordType::from_u8(t)), t);
        }
        assert_eq!(RecordType::from_u8(11), RecordType::UnknownType);
    }

    /// BEGIN_REQUEST bodies: (name, content, expected)
    const BEGIN_TABLE: &[(&str, &[u8], Result<BeginRequest, Error>)] = &[
        (
            "responder, keep",
            &[0, 1, 1, 0, 0, 0, 0, 0],
            Ok(BeginRequest { role: Role::Responder, keep_conn: true }),
        ),
        (
            "responder, close",
            &[0, 1, 0, 0, 0, 0, 0, 0],
            Ok(BeginRequest { role: Role::Responder, keep_conn: false }),
        ),
        (
            "authorizer",
            &[0, 2, 0, 0, 0, 0, 0, 0],
            Ok(BeginRequest { role: Role::Authorizer, keep_conn: false }),
        ),
        ("filter", &[0, 3, 0, 0, 0, 0, 0, 0], Ok(BeginRequest { role: Role::Filter, keep_conn: false })),
        ("role 0", &[0, 0, 0, 0, 0, 0, 0, 0], Ok(BeginRequest { role: Role::Unknown(0), keep_conn: false })),
        (
            "role 0x0101",
            &[1, 1, 0, 0, 0, 0, 0, 0],
            Ok(BeginRequest { role: Role::Unknown(257), keep_conn: false }),
        ),
        ("reserved flags ignored", &[0, 1, 0xfe, 9, 9, 9, 9, 9], {
            Ok(BeginRequest { role: Role::Responder, keep_conn: false })
        }),
        (
            "all flags",
            &[0, 1, 0xff, 0, 0, 0, 0, 0],
            Ok(BeginRequest { role: Role::Responder, keep_conn: true }),
        ),
        ("empty", &[], Err(Error::BeginRequestLength)),
        ("7 bytes", &[0, 1, 1, 0, 0, 0, 0], Err(Error::BeginRequestLength)),
        ("9 bytes", &[0, 1, 1, 0, 0, 0, 0, 0, 0], Err(Error::BeginRequestLength)),
    ];

    #[test]
    fn begin_request_vectors() {
        for (name, content, want) in BEGIN_TABLE {
            assert_eq!(parse_begin_request(content), *want, "{name}");
        }
    }

    /// Name-value blocks: (name, block, expected pairs or error)
    type Owned = Vec<(Vec<u8>, Vec<u8>)>;

    fn pairs_table() -> Vec<(&'static str, Vec<u8>, Result<Owned, Error>)> {
        let owned = |p: &[(&[u8], &[u8])]| Ok(p.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect());
        let long_value = vec![b'v'; 300];
        let long_name = vec![b'N'; 200];
        let v127 = vec![b'a'; 127];
        let v128 = vec![b'b'; 128];
        let params: &[Pair<'static>] = &[
            (b"REQUEST_METHOD", b"POST"),
            (b"CONTENT_LENGTH", b"3"),
            (b"SCRIPT_NAME", b""),
            (b"HTTP_HOST", b"example.com"),
        ];
        let get_values: &[Pair<'static>] = &[(MAX_CONNS, b""), (MAX_REQS, b""), (MPXS_CONNS, b"")];
        // The largest block: one pair, four-byte lengths, MAX_PARAMS_LEN bytes in all.
        let huge = vec![b'h'; MAX_PARAMS_LEN - 6];
        assert_eq!(pairs_block(&[(b"A", &huge)]).len(), MAX_PARAMS_LEN);
        let mut too_big = pairs_block(&[(b"A", &huge)]);
        too_big.extend_from_slice(b"\x01\x00B");
        vec![
            ("empty block", vec![], Ok(vec![])),
            ("request params", pairs_block(params), owned(params)),
            ("GET_VALUES names", pairs_block(get_values), owned(get_values)),
            ("4-byte value length", pairs_block(&[(b"X", &long_value)]), owned(&[(b"X", &long_value)])),
            ("4-byte name length", pairs_block(&[(&long_name, b"y")]), owned(&[(&long_name, b"y")])),
            ("127 uses 1 byte", pairs_block(&[(b"A", &v127)]), owned(&[(b"A", &v127)])),
            ("128 uses 4 bytes", pairs_block(&[(b"A", &v128)]), owned(&[(b"A", &v128)])),
            ("4-byte form of a short length", b"\x80\x00\x00\x02\x01ABc".to_vec(), owned(&[(b"AB", b"c")])),
            (
                "binary bytes kept",
                b"\x02\x03A\x00\xff\x00\x80".to_vec(),
                owned(&[(b"A\x00", b"\xff\x00\x80")]),
            ),
            ("block at the size limit", pairs_block(&[(b"A", &huge)]), owned(&[(b"A", &huge)])),
            ("empty name", b"\x00\x01x".to_vec(), Err(Error::EmptyName)),
            ("empty name, 4-byte form", b"\x80\x00\x00\x00\x01x".to_vec(), Err(Error::EmptyName)),
            ("empty name after a good pair", b"\x01\x01ab\x00\x00".to_vec(), Err(Error::EmptyName)),
            ("cut in a 4-byte length", b"\x80\x00".to_vec(), Err(Error::TruncatedPair)),
            ("value length missing", b"\x01".to_vec(), Err(Error::TruncatedPair)),
            ("cut in the name", b"\x05\x01ab".to_vec(), Err(Error::TruncatedPair)),
            ("cut in the value", b"\x01\x05abc".to_vec(), Err(Error::TruncatedPair)),
            ("cut after a good pair", b"\x01\x01ab\x01".to_vec(), Err(Error::TruncatedPair)),
            ("largest name length", b"\xff\xff\xff\xff\x00".to_vec(), Err(Error::ParamsTooLarge)),
            ("largest value length", b"\x01\xff\xff\xff\xffA".to_vec(), Err(Error::ParamsTooLarge)),
            ("block over the size limit", too_big, Err(Error::ParamsTooLarge)),
        ]
    }

    #[test]
    fn pairs_vectors() {
        for (name, block, want) in pairs_table() {
            let got =
                parse_pairs(&block).map(|it| it.map(|(n, v)| (n.to_vec(), v.to_vec())).collect::<Vec<_>>());
            assert!(got == want, "{name}: got {:?}", got.as_ref().map(Vec::len));
        }
    }

    #[test]
    fn every_prefix_of_a_valid_pair_is_partial() {
        for (name, block, want) in pairs_table() {
            let Ok(pairs) = want else { continue };
            let Some(first) = pairs.first() else { continue };
            let Ok(Status::Complete((n, v), used)) = parse_pair(&block) else { panic!("{name}") };
            assert!((n, v) == (&first.0[..], &first.1[..]), "{name}");
            for end in 0..used {
                let got = parse_pair(&block[..end]);
                assert!(matches!(got, Ok(Status::Partial)), "{name}: prefix {end}: {:?}", got.map(|_| ()));
            }
        }
    }

    #[test]
    fn params_split_across_records() {
        // A request as nginx might send it, with the PARAMS stream cut inside
        // a name and inside a four-byte length (bytes 20..24).
        let long_value = vec![b'q'; 200];
        let params: &[(&[u8], &[u8])] = &[(b"REQUEST_METHOD", b"GET"), (b"QUERY_STRING", &long_value)];
        let block = pairs_block(params);
        let mut stream = BEGIN.to_vec();
        for cut in [&block[..3], &block[3..22], &block[22..]] {
            stream.extend(record(4, 1, cut, 0));
        }
        stream.extend(record(4, 1, b"", 0));
        stream.extend(record(5, 1, b"", 0));

        let mut joined = Vec::new();
        let mut rest = &stream[..];
        loop {
            let Ok(Status::Complete(r, n)) = parse_record(rest) else { panic!() };
            rest = &rest[n..];
            match r.kind {
                RecordType::BeginRequest => {
                    let begin = parse_begin_request(r.content).unwrap();
                    assert_eq!(begin, BeginRequest { role: Role::Responder, keep_conn: true });
                }
                RecordType::Params => {
                    // No record alone holds whole pairs.
                    assert!(r.content.is_empty() || parse_pairs(r.content).is_err());
                    joined.extend_from_slice(r.content);
                }
                RecordType::Stdin => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(rest.is_empty());
        let got: Vec<_> = parse_pairs(&joined).unwrap().collect();
        assert_eq!(got, params);
    }

    #[test]
    fn write_stdout_splits_into_records() {
        for len in
            [0, 1, 100, MAX_CONTENT_LEN - 1, MAX_CONTENT_LEN, MAX_CONTENT_LEN + 1, 3 * MAX_CONTENT_LEN + 7]
        {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            write_stdout(&mut out, 9, &data);
            let records = len.div_ceil(MAX_CONTENT_LEN);
            assert_eq!(out.len(), len + records * HEADER_LEN, "{len}");
            let mut joined = Vec::new();
            let mut rest = &out[..];
            while !rest.is_empty() {
                let Ok(Status::Complete(r, n)) = parse_record(rest) else { panic!("{len}") };
                assert_eq!((r.kind, r.request_id), (RecordType::Stdout, 9));
                assert!(!r.content.is_empty(), "{len}: an empty record would end the stream");
                joined.extend_from_slice(r.content);
                rest = &rest[n..];
            }
            assert!(joined == data, "{len}");
        }
    }

    #[test]
    fn response_bytes() {
        let mut out = Vec::new();
        write_stdout(&mut out, 1, b"Status: 200 OK\r\n\r\nhi");
        write_stream_end(&mut out, RecordType::Stdout, 1);
        write_end_request(&mut out, 1, 0x01020304, ProtocolStatus::RequestComplete);
        let mut want = vec![1, 6, 0, 1, 0, 20, 0, 0];
        want.extend_from_slice(b"Status: 200 OK\r\n\r\nhi");
        want.extend_from_slice(&[1, 6, 0, 1, 0, 0, 0, 0]);
        want.extend_from_slice(&[1, 3, 0, 1, 0, 8, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0]);
        assert_eq!(out, want);

        let mut out = Vec::new();
        write_end_request(&mut out, 0x0203, 0, ProtocolStatus::UnknownRole);
        assert_eq!(out, [1, 3, 2, 3, 0, 8, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0]);
        for (status, byte) in [
            (ProtocolStatus::RequestComplete, 0),
            (ProtocolStatus::CantMpxConn, 1),
            (ProtocolStatus::Overloaded, 2),
            (ProtocolStatus::UnknownRole, 3),
        ] {
            let mut out = Vec::new();
            write_end_request(&mut out, 1, 0, status);
            assert_eq!(out[12], byte);
        }

        let mut out = Vec::new();
        write_unknown_type(&mut out, 42);
        assert_eq!(out, [1, 11, 0, 0, 0, 8, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0]);

        let mut out = Vec::new();
        encode_record_header(&mut out, RecordType::Stderr, 0xabcd, 0x1234, 4);
        assert_eq!(out, [1, 7, 0xab, 0xcd, 0x12, 0x34, 4, 0]);
    }

    #[test]
    fn get_values_round_trip() {
        let query = pairs_block(&[(MAX_CONNS, b""), (MPXS_CONNS, b""), (b"FCGI_OTHER", b"")]);
        let answer: Vec<(&[u8], &[u8])> = parse_pairs(&query)
            .unwrap()
            .filter_map(|(name, _)| match name {
                n if n == MAX_CONNS => Some((n, &b"100"[..])),
                n if n == MPXS_CONNS => Some((n, &b"0"[..])),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        write_get_values_result(&mut out, &answer).unwrap();
        let Ok(Status::Complete(r, n)) = parse_record(&out) else { panic!() };
        assert_eq!((r.kind, r.request_id, n), (RecordType::GetValuesResult, 0, out.len()));
        assert_eq!(parse_pairs(r.content).unwrap().collect::<Vec<_>>(), answer);

        let big = vec![b'x'; MAX_CONTENT_LEN];
        let mut out = vec![7];
        assert_eq!(write_get_values_result(&mut out, &[(b"A", &big)]), Err(Error::ContentTooLong));
        assert_eq!(out, [7], "nothing written on error");
    }

    #[test]
    fn encode_pair_round_trips() {
        for (name_len, value_len, encoded) in
            [(1, 0, 3), (127, 127, 256), (128, 0, 133), (1, 128, 134), (300, 70000, 70308)]
        {
            let name = vec![b'n'; name_len];
            let value = vec![b'v'; value_len];
            let mut out = Vec::new();
            encode_pair(&mut out, &name, &value);
            assert_eq!(out.len(), encoded);
            assert_eq!(parse_pair(&out), Ok(Status::Complete((&name[..], &value[..]), encoded)));
        }
        let mut out = Vec::new();
        encode_pair(&mut out, b"AB", &[b'c'; 200]);
        assert_eq!(out[..6], [0x02, 0x80, 0x00, 0x00, 0xc8, b'A']);
    }

    #[test]
    fn write_record_refuses_long_content() {
        let mut out = Vec::new();
        assert_eq!(
            write_record(&mut out, RecordType::Stdout, 1, &[0; MAX_CONTENT_LEN + 1]),
            Err(Error::ContentTooLong)
        );
        assert!(out.is_empty());
        write_record(&mut out, RecordType::Stdout, 1, b"ok").unwrap();
        assert_eq!(out, [1, 6, 0, 1, 0, 2, 0, 0, b'o', b'k']);
    }

    #[test]
    fn every_error_is_covered() {
        let records = record_table();
        let pairs = pairs_table();
        let covered = |e: Error| {
            records.iter().any(|(_, _, w)| matches!(w, Want::Err(g) if *g == e))
                || pairs.iter().any(|(_, _, w)| *w == Err(e))
                || BEGIN_TABLE.iter().any(|(_, _, w)| *w == Err(e))
        };
        for e in [
            Error::Version(0),
            Error::BeginRequestLength,
            Error::EmptyName,
            Error::TruncatedPair,
            Error::ParamsTooLarge,
        ] {
            assert!(covered(e), "{e:?}");
        }
        // ContentTooLong comes from the writers, tested above.
        for e in [
            Error::Version(2),
            Error::BeginRequestLength,
            Error::EmptyName,
            Error::TruncatedPair,
            Error::ParamsTooLarge,
            Error::ContentTooLong,
        ] {
            assert!(!e.to_string().is_empty());
        }
    }
}
