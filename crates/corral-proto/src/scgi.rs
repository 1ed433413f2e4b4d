//! The SCGI request header block, as nginx's `scgi_pass` and Apache's
//! `mod_proxy_scgi` send it.
//!
//! A request is a netstring, `<decimal length>:<block>,`, whose block is
//! NUL-terminated `name\0value\0` pairs. `CONTENT_LENGTH` comes first and is
//! always present, and an `SCGI: 1` pair marks the protocol version. The
//! specification says no name repeats, but nginx repeats one whenever its
//! configuration sets a variable its stock `scgi_params` sets too (`scgi_param
//! HTTPS on;`), and one HTTP_* name per repeated header line, as it does over
//! uwsgi and FastCGI; so repeats are accepted (the environ takes the last
//! value, or joins HTTP_* ones), except of `CONTENT_LENGTH`, which frames the
//! body. The body, `CONTENT_LENGTH` bytes, follows the comma. The response
//! is CGI-style (`Status: 200 OK`, headers, blank line, body) and needs no
//! codec here.
//!
//! [`parse_request`] checks the whole block before answering, so walking it
//! afterwards with [`Request::headers`] cannot fail.

use std::fmt;

use crate::Status;

/// Longest header block accepted, in bytes between the `:` and the `,`.
///
/// The front end builds the block from an HTTP request head it has already
/// limited, so this only has to be generous enough for any head a front end
/// lets through: Apache's defaults allow 100 fields of 8190 bytes, about
/// 800 KiB. It also bounds what the server buffers before refusing a bogus
/// length, and makes the length field at most seven digits.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;
/// Most pairs in one block; it matches the HTTP/1 parser's hard ceiling on
/// header fields.
pub const MAX_HEADERS: usize = 1024;

/// Why an SCGI request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The netstring length is empty or has a byte other than a digit before the `:`.
    Length,
    /// The netstring length has a leading zero (only `0` itself may start with one).
    LengthLeadingZero,
    /// The netstring length is over [`MAX_HEADER_BLOCK`].
    TooLarge,
    /// The header block is not followed by `,`.
    MissingComma,
    /// The header block does not end in NUL.
    NotNulTerminated,
    /// The block holds an odd number of strings: a name without a value.
    OddStrings,
    EmptyName,
    /// The first pair is not `CONTENT_LENGTH` (or the block is empty).
    ContentLengthNotFirst,
    /// `CONTENT_LENGTH` is not a decimal number that fits in a `u64`.
    ContentLength,
    /// No `SCGI` pair, or its value is not `1`.
    ScgiVersion,
    /// `CONTENT_LENGTH` appears twice: the body's length would be ambiguous.
    RepeatedContentLength,
    /// More than [`MAX_HEADERS`] pairs.
    TooManyHeaders,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Error::Length => "SCGI netstring length is not a decimal number",
            Error::LengthLeadingZero => "SCGI netstring length has a leading zero",
            Error::TooLarge => "SCGI header block over 1 MiB",
            Error::MissingComma => "SCGI header block not followed by ','",
            Error::NotNulTerminated => "SCGI header block does not end in NUL",
            Error::OddStrings => "SCGI header name without a value",
            Error::EmptyName => "empty SCGI header name",
            Error::ContentLengthNotFirst => "SCGI CONTENT_LENGTH missing or not the first header",
            Error::ContentLength => "invalid SCGI CONTENT_LENGTH",
            Error::ScgiVersion => "SCGI header missing or not 1",
            Error::RepeatedContentLength => "repeated CONTENT_LENGTH",
            Error::TooManyHeaders => "too many SCGI headers",
        };
        f.write_str(s)
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The HTTP status to answer with when the netstring was whole and only
    /// what it holds is wrong, so a reply can still be framed; `None` when
    /// the stream cannot be read as SCGI (the connection is only closed).
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Length | Error::LengthLeadingZero | Error::TooLarge | Error::MissingComma => None,
            Error::TooManyHeaders => Some(431),
            Error::NotNulTerminated
            | Error::OddStrings
            | Error::EmptyName
            | Error::ContentLengthNotFirst
            | Error::ContentLength
            | Error::ScgiVersion
            | Error::RepeatedContentLength => Some(400),
        }
    }
}

/// A parsed SCGI request header block, borrowing its pairs from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    // Private so that only a block `parse_request` has checked can reach `Headers`.
    block: &'a [u8],
    content_length: u64,
}

impl<'a> Request<'a> {
    /// The pairs in the order they were sent, `CONTENT_LENGTH` and `SCGI` included.
    pub fn headers(&self) -> Headers<'a> {
        Headers { rest: self.block }
    }

    /// The value of the pair named `name`; names are unique.
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.headers().find(|&(n, _)| n == name).map(|(_, v)| v)
    }

    /// The body length from the leading `CONTENT_LENGTH` pair.
    pub fn content_length(&self) -> u64 {
        self.content_length
    }

    /// The raw header block, without the netstring length and comma.
    pub fn header_block(&self) -> &'a [u8] {
        self.block
    }
}

/// A header's name and value, borrowed from the input.
pub type Header<'a> = (&'a [u8], &'a [u8]);

/// Iterator over the (name, value) pairs of a checked header block.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Headers<'a> {
    type Item = Header<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        // The block was checked by `parse_request`; if it somehow was not,
        // stopping early is the safe answer.
        let pair = split_nul(self.rest).and_then(|(name, rest)| Some((name, split_nul(rest)?)));
        match pair {
            Some((name, (value, rest))) => {
                self.rest = rest;
                Some((name, value))
            }
            None => {
                self.rest = &[];
                None
            }
        }
    }
}

impl std::iter::FusedIterator for Headers<'_> {}

/// Splits a NUL-terminated string off the front of `buf`, dropping the NUL.
fn split_nul(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..end], &buf[end + 1..]))
}

/// Reads the netstring length: `Ok(None)` until the `:` arrives, otherwise the
/// length and the bytes it took, colon included. Bad lengths are refused as
/// soon as the offending byte arrives.
fn parse_length(buf: &[u8]) -> Result<Option<(usize, usize)>, Error> {
    let mut len = 0usize;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b':' if i > 0 => return Ok(Some((len, i + 1))),
            b'0'..=b'9' if i > 0 && len == 0 => return Err(Error::LengthLeadingZero),
            b'0'..=b'9' => {
                len = len * 10 + usize::from(b - b'0');
                if len > MAX_HEADER_BLOCK {
                    return Err(Error::TooLarge);
                }
            }
            _ => return Err(Error::Length),
        }
    }
    Ok(None)
}

/// Checks a whole header block and returns its `CONTENT_LENGTH`.
fn check_block(block: &[u8]) -> Result<u64, Error> {
    if block.is_empty() {
        return Err(Error::ContentLengthNotFirst);
    }
    if block.last() != Some(&0) {
        return Err(Error::NotNulTerminated);
    }
    // Strings, not pairs, so an odd count is told apart from a bad name.
    if block.iter().filter(|&&b| b == 0).count() % 2 != 0 {
        return Err(Error::OddStrings);
    }
    let mut content_length = None;
    let mut scgi = false;
    for (count, (name, value)) in (Headers { rest: block }).enumerate() {
        if name.is_empty() {
            return Err(Error::EmptyName);
        }
        if count == 0 {
            if name != b"CONTENT_LENGTH" {
                return Err(Error::ContentLengthNotFirst);
            }
            content_length =
                Some(crate::http1::parse_content_length(value).map_err(|_| Error::ContentLength)?);
        } else if name == b"CONTENT_LENGTH" {
            return Err(Error::RepeatedContentLength);
        }
        if name == b"SCGI" {
            if value != b"1" {
                return Err(Error::ScgiVersion);
            }
            scgi = true;
        }
        if count == MAX_HEADERS {
            return Err(Error::TooManyHeaders);
        }
    }
    if !scgi {
        return Err(Error::ScgiVersion);
    }
    content_length.ok_or(Error::ContentLengthNotFirst)
}

/// Parses one SCGI request header block from the start of `buf`.
///
/// Answers with the request and the bytes the netstring used, comma included;
/// the body starts right after.
pub fn parse_request(buf: &[u8]) -> Result<Status<Request<'_>>, Error> {
    let Some((len, start)) = parse_length(buf)? else {
        return Ok(Status::Partial);
    };
    let end = start + len;
    let Some(&comma) = buf.get(end) else {
        return Ok(Status::Partial);
    };
    if comma != b',' {
        return Err(Error::MissingComma);
    }
    let block = &buf[start..end];
    let content_length = check_block(block)?;
    Ok(Status::Complete(Request { block, content_length }, end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pair = (&'static [u8], &'static [u8]);

    fn netstring(block: &[u8]) -> Vec<u8> {
        let mut out = format!("{}:", block.len()).into_bytes();
        out.extend_from_slice(block);
        out.push(b',');
        out
    }

    fn block(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in pairs {
            out.extend_from_slice(n);
            out.push(0);
            out.extend_from_slice(v);
            out.push(0);
        }
        out
    }

    fn request(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        netstring(&block(pairs))
    }

    /// The example from the SCGI specification.
    const SPEC: &[u8] = b"70:CONTENT_LENGTH\x0027\x00SCGI\x001\x00REQUEST_METHOD\x00POST\x00\
REQUEST_URI\x00/deepthought\x00,What is the answer to life?";
    const GET: &[Pair] = &[
        (b"CONTENT_LENGTH", b"0"),
        (b"SCGI", b"1"),
        (b"REQUEST_METHOD", b"GET"),
        (b"REQUEST_URI", b"/"),
        (b"HTTP_HOST", b"example.com"),
        (b"QUERY_STRING", b""),
    ];

    #[derive(Debug)]
    enum Want {
        /// content length, the pairs, bytes used.
        Ok(u64, Vec<(Vec<u8>, Vec<u8>)>, usize),
        Partial,
        Err(Error),
    }

    fn owned(pairs: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    fn ok(content_length: u64, pairs: &[(&[u8], &[u8])]) -> Want {
        Want::Ok(content_length, owned(pairs), request(pairs).len())
    }

    fn with(extra: &[(&'static [u8], &'static [u8])]) -> Vec<Pair> {
        let mut pairs = GET.to_vec();
        pairs.extend_from_slice(extra);
        pairs
    }

    /// (name, input, expected outcome)
    fn table() -> Vec<(&'static str, Vec<u8>, Want)> {
        let spec_pairs: &[Pair] = &[
            (b"CONTENT_LENGTH", b"27"),
            (b"SCGI", b"1"),
            (b"REQUEST_METHOD", b"POST"),
            (b"REQUEST_URI", b"/deepthought"),
        ];
        let minimal: &[Pair] = &[(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1")];
        let max_len: &[Pair] = &[(b"CONTENT_LENGTH", b"18446744073709551615"), (b"SCGI", b"1")];
        // A block of exactly MAX_HEADER_BLOCK bytes: 24 bytes of fixed pairs,
        // then a name, a NUL, the filler and a NUL.
        let filler = vec![b'v'; MAX_HEADER_BLOCK - 24 - 3];
        let mut big_pairs = minimal.to_vec();
        big_pairs.push((b"X", &filler));
        assert_eq!(block(&big_pairs).len(), MAX_HEADER_BLOCK);
        let mut over = big_pairs.clone();
        over.push((b"Y", b""));
        let many_names: Vec<Vec<u8>> = (0..MAX_HEADERS).map(|i| format!("H{i}").into_bytes()).collect();
        let mut many: Vec<(&[u8], &[u8])> = minimal.to_vec();
        many.extend(many_names[2..].iter().map(|n| (&n[..], &b""[..])));
        let mut too_many = many.clone();
        too_many.push((b"ONE_MORE", b""));
        vec![
            ("spec example", SPEC.to_vec(), Want::Ok(27, owned(spec_pairs), 74)),
            ("GET", request(GET), ok(0, GET)),
            ("minimal", request(minimal), ok(0, minimal)),
            ("SCGI last", request(&[(b"CONTENT_LENGTH", b"3"), (b"A", b"b"), (b"SCGI", b"1")]), {
                ok(3, &[(b"CONTENT_LENGTH", b"3"), (b"A", b"b"), (b"SCGI", b"1")])
            }),
            ("largest content length", request(max_len), ok(u64::MAX, max_len)),
            ("leading zeros in CONTENT_LENGTH", request(&[(b"CONTENT_LENGTH", b"007"), (b"SCGI", b"1")]), {
                ok(7, &[(b"CONTENT_LENGTH", b"007"), (b"SCGI", b"1")])
            }),
            ("binary value", request(&with(&[(b"X", b"\x01\xff ")])), ok(0, &with(&[(b"X", b"\x01\xff ")]))),
            ("block at the size limit", request(&big_pairs), ok(0, &big_pairs)),
            ("pairs at the count limit", request(&many), ok(0, &many)),
            ("empty input", vec![], Want::Partial),
            ("length only", b"70".to_vec(), Want::Partial),
            ("no comma yet", SPEC[..73].to_vec(), Want::Partial),
            ("HTTP on the SCGI port", b"GET / HTTP/1.1\r\n".to_vec(), Want::Err(Error::Length)),
            ("empty length", b":,".to_vec(), Want::Err(Error::Length)),
            ("sign in length", b"+5:".to_vec(), Want::Err(Error::Length)),
            ("space in length", b"5 :".to_vec(), Want::Err(Error::Length)),
            ("leading zero", b"070:".to_vec(), Want::Err(Error::LengthLeadingZero)),
            ("double zero", b"00:,".to_vec(), Want::Err(Error::LengthLeadingZero)),
            ("length over the limit", b"1048577:".to_vec(), Want::Err(Error::TooLarge)),
            ("length over the limit, colon unseen", b"99999999".to_vec(), Want::Err(Error::TooLarge)),
            ("block over the limit", request(&over), Want::Err(Error::TooLarge)),
            ("huge length", b"184467440737095516160:".to_vec(), Want::Err(Error::TooLarge)),
            ("missing comma", SPEC.iter().map(|&b| if b == b',' { b';' } else { b }).collect(), {
                Want::Err(Error::MissingComma)
            }),
            ("length too short", b"5:CONTENT_LENGTH\x000\x00,".to_vec(), Want::Err(Error::MissingComma)),
            ("zero length", b"0:,".to_vec(), Want::Err(Error::ContentLengthNotFirst)),
            (
                "not NUL-terminated",
                netstring(b"CONTENT_LENGTH\x000\x00SCGI\x001"),
                Want::Err(Error::NotNulTerminated),
            ),
            ("odd strings", netstring(b"CONTENT_LENGTH\x000\x00SCGI\x00"), Want::Err(Error::OddStrings)),
            ("empty name", request(&with(&[(b"", b"x")])), Want::Err(Error::EmptyName)),
            ("empty first name", request(&[(b"", b"0"), (b"SCGI", b"1")]), Want::Err(Error::EmptyName)),
            ("CONTENT_LENGTH second", request(&[(b"SCGI", b"1"), (b"CONTENT_LENGTH", b"0")]), {
                Want::Err(Error::ContentLengthNotFirst)
            }),
            ("CONTENT_LENGTH missing", request(&[(b"SCGI", b"1")]), Want::Err(Error::ContentLengthNotFirst)),
            ("lower-case content_length", request(&[(b"content_length", b"0"), (b"SCGI", b"1")]), {
                Want::Err(Error::ContentLengthNotFirst)
            }),
            ("empty CONTENT_LENGTH", request(&[(b"CONTENT_LENGTH", b""), (b"SCGI", b"1")]), {
                Want::Err(Error::ContentLength)
            }),
            ("signed CONTENT_LENGTH", request(&[(b"CONTENT_LENGTH", b"+1"), (b"SCGI", b"1")]), {
                Want::Err(Error::ContentLength)
            }),
            ("CONTENT_LENGTH with space", request(&[(b"CONTENT_LENGTH", b" 1"), (b"SCGI", b"1")]), {
                Want::Err(Error::ContentLength)
            }),
            (
                "CONTENT_LENGTH overflows u64",
                request(&[(b"CONTENT_LENGTH", b"18446744073709551616"), (b"SCGI", b"1")]),
                Want::Err(Error::ContentLength),
            ),
            (
                "SCGI missing",
                request(&[(b"CONTENT_LENGTH", b"0"), (b"A", b"1")]),
                Want::Err(Error::ScgiVersion),
            ),
            ("SCGI 2", request(&[(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"2")]), Want::Err(Error::ScgiVersion)),
            (
                "SCGI empty",
                request(&[(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"")]),
                Want::Err(Error::ScgiVersion),
            ),
            // nginx repeats a variable its configuration sets twice; the
            // environ takes the last value.
            (
                "repeated name",
                request(&with(&[(b"REQUEST_METHOD", b"POST")])),
                ok(0, &with(&[(b"REQUEST_METHOD", b"POST")])),
            ),
            // nginx sends a repeated header line as a repeated HTTP_* pair.
            (
                "repeated header",
                request(&with(&[(b"HTTP_HOST", b"again")])),
                ok(0, &with(&[(b"HTTP_HOST", b"again")])),
            ),
            ("repeated SCGI", request(&with(&[(b"SCGI", b"1")])), ok(0, &with(&[(b"SCGI", b"1")]))),
            (
                "repeated SCGI, the second not 1",
                request(&with(&[(b"SCGI", b"2")])),
                Want::Err(Error::ScgiVersion),
            ),
            ("repeated CONTENT_LENGTH", request(&with(&[(b"CONTENT_LENGTH", b"5")])), {
                Want::Err(Error::RepeatedContentLength)
            }),
            ("repeated CONTENT_LENGTH, same value", request(&with(&[(b"CONTENT_LENGTH", b"0")])), {
                Want::Err(Error::RepeatedContentLength)
            }),
            ("too many pairs", request(&too_many), Want::Err(Error::TooManyHeaders)),
        ]
    }

    fn check(name: &str, input: &[u8], want: &Want) {
        let got = parse_request(input);
        match (want, &got) {
            (Want::Ok(content_length, pairs, used), Ok(Status::Complete(req, n))) => {
                assert_eq!((req.content_length(), *n), (*content_length, *used), "{name}");
                let got: Vec<_> = req.headers().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
                assert!(&got == pairs, "{name}: pairs differ");
            }
            (Want::Partial, Ok(Status::Partial)) => {}
            (Want::Err(e), Err(g)) if e == g => {}
            _ => panic!("{name}: got {:?}", got.map(|s| matches!(s, Status::Partial))),
        }
    }

    #[test]
    fn vectors() {
        for (name, input, want) in table() {
            check(name, &input, &want);
        }
    }

    #[test]
    fn every_prefix_of_a_valid_request_is_partial() {
        for (name, input, want) in table() {
            let Want::Ok(_, _, used) = want else { continue };
            for end in 0..used {
                let got = parse_request(&input[..end]);
                assert!(matches!(got, Ok(Status::Partial)), "{name}: prefix {end}: {:?}", got.map(|_| ()));
            }
        }
    }

    #[test]
    fn body_follows_the_comma() {
        let Ok(Status::Complete(req, n)) = parse_request(SPEC) else { panic!() };
        assert_eq!(&SPEC[n..], b"What is the answer to life?");
        assert_eq!(req.content_length(), (SPEC.len() - n) as u64);
        assert_eq!(req.get(b"REQUEST_URI"), Some(&b"/deepthought"[..]));
        assert_eq!(req.get(b"NOPE"), None);
        assert_eq!(req.header_block(), &SPEC[3..73]);
    }

    #[test]
    fn every_error_is_covered() {
        let table = table();
        let all = [
            Error::Length,
            Error::LengthLeadingZero,
            Error::TooLarge,
            Error::MissingComma,
            Error::NotNulTerminated,
            Error::OddStrings,
            Error::EmptyName,
            Error::ContentLengthNotFirst,
            Error::ContentLength,
            Error::ScgiVersion,
            Error::RepeatedContentLength,
            Error::TooManyHeaders,
        ];
        for e in all {
            assert!(table.iter().any(|(_, _, w)| matches!(w, Want::Err(g) if *g == e)), "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
}
