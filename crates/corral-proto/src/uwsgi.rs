//! The uwsgi request packet, as nginx's `uwsgi_pass` sends it.
//!
//! A request is a 4-byte header (`modifier1`, little-endian `datasize`,
//! `modifier2`) followed by `datasize` bytes of CGI-style variables, each a
//! little-endian `u16` length and key, then a `u16` length and value. The
//! request body follows the packet directly and is delimited by
//! `CONTENT_LENGTH`, so this module only reports how many bytes the packet
//! used. The response is plain HTTP/1.x and needs no codec.
//!
//! [`parse_request`] checks the whole vars block before answering, so walking
//! it afterwards with [`Request::vars`] cannot fail.

use std::fmt;

use crate::Status;

/// Bytes in the packet header: modifier1, datasize (2), modifier2.
pub const HEADER_LEN: usize = 4;
/// Largest vars block: `datasize` is a `u16`, so the format itself caps the
/// request head at 64 KiB and no configurable limit is needed.
pub const MAX_VARS_LEN: usize = u16::MAX as usize;
/// `modifier1` for a WSGI request.
pub const MODIFIER1_WSGI: u8 = 0;
/// `modifier1` for a WSGI request whose `PATH_INFO` still starts with
/// `SCRIPT_NAME`; the server removes that prefix before calling the app.
pub const MODIFIER1_WSGI_STRIP_SCRIPT_NAME: u8 = 30;

/// Why a uwsgi packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A `modifier1` other than 0 or 30: some other uWSGI subsystem's packet.
    Modifier1(u8),
    /// A var with a zero-length key.
    EmptyKey,
    /// A key or value length that runs past the end of the vars block.
    TruncatedVar,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Modifier1(m) => write!(f, "unsupported uwsgi modifier1 {m} (expected 0 or 30)"),
            Error::EmptyKey => f.write_str("empty var name in uwsgi packet"),
            Error::TruncatedVar => f.write_str("uwsgi var runs past the end of the vars block"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The HTTP status to answer with when the packet was whole and only its
    /// vars are wrong, so a reply can still be framed; `None` for a packet of
    /// another uWSGI subsystem, which an HTTP reply would not answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Modifier1(_) => None,
            Error::EmptyKey | Error::TruncatedVar => Some(400),
        }
    }
}

/// A parsed uwsgi request packet, borrowing its vars from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// [`MODIFIER1_WSGI`] or [`MODIFIER1_WSGI_STRIP_SCRIPT_NAME`]; nothing else parses.
    pub modifier1: u8,
    /// Passed through unchecked: WSGI requests leave it 0 and give it no meaning.
    pub modifier2: u8,
    // Private so that only a block `parse_request` has checked can reach `Vars`.
    vars: &'a [u8],
}

impl<'a> Request<'a> {
    /// The vars in the order they were sent, as (key, value) pairs.
    /// Repeated keys are kept as sent; merging them is the engine's policy.
    pub fn vars(&self) -> Vars<'a> {
        Vars { rest: self.vars }
    }

    /// The value of the first var named `key`.
    pub fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        self.vars().find(|&(k, _)| k == key).map(|(_, v)| v)
    }

    /// Whether the server must remove `SCRIPT_NAME` from the front of `PATH_INFO`.
    pub fn strips_script_name(&self) -> bool {
        self.modifier1 == MODIFIER1_WSGI_STRIP_SCRIPT_NAME
    }

    /// The raw vars block, without the packet header.
    pub fn vars_block(&self) -> &'a [u8] {
        self.vars
    }
}

/// A var's key and value, borrowed from the input.
pub type Var<'a> = (&'a [u8], &'a [u8]);

/// Iterator over the (key, value) pairs of a checked vars block.
#[derive(Debug, Clone)]
pub struct Vars<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Vars<'a> {
    type Item = Var<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        // The block was checked by `parse_request`; if it somehow was not,
        // stopping early is the safe answer.
        let mut rest = self.rest;
        match split_var(&mut rest) {
            Ok(Some(var)) => {
                self.rest = rest;
                Some(var)
            }
            _ => {
                self.rest = &[];
                None
            }
        }
    }
}

impl std::iter::FusedIterator for Vars<'_> {}

/// Splits a length-prefixed string off the front of `buf`.
fn split_string(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = match buf {
        [lo, hi, rest @ ..] => (u16::from_le_bytes([*lo, *hi]) as usize, rest),
        _ => return None,
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Takes one var off the front of a vars block: `Ok(None)` at the end.
fn split_var<'a>(buf: &mut &'a [u8]) -> Result<Option<Var<'a>>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let (key, rest) = split_string(buf).ok_or(Error::TruncatedVar)?;
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    let (value, rest) = split_string(rest).ok_or(Error::TruncatedVar)?;
    *buf = rest;
    Ok(Some((key, value)))
}

/// Parses one uwsgi request packet from the start of `buf`.
///
/// Answers with the request and the packet's length (header plus vars); the
/// body, if any, starts right after. An unsupported `modifier1` is refused as
/// soon as the first byte arrives, so a client speaking some other protocol
/// is turned away without waiting for a full packet.
pub fn parse_request(buf: &[u8]) -> Result<Status<Request<'_>>, Error> {
    let Some(&modifier1) = buf.first() else {
        return Ok(Status::Partial);
    };
    if modifier1 != MODIFIER1_WSGI && modifier1 != MODIFIER1_WSGI_STRIP_SCRIPT_NAME {
        return Err(Error::Modifier1(modifier1));
    }
    let [_, lo, hi, modifier2, ..] = *buf else {
        return Ok(Status::Partial);
    };
    let total = HEADER_LEN + u16::from_le_bytes([lo, hi]) as usize;
    let Some(vars) = buf.get(HEADER_LEN..total) else {
        return Ok(Status::Partial);
    };
    let mut rest = vars;
    while split_var(&mut rest)?.is_some() {}
    Ok(Status::Complete(Request { modifier1, modifier2, vars }, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pair = (&'static [u8], &'static [u8]);

    /// Builds a packet from a raw vars block.
    fn packet_raw(modifier1: u8, modifier2: u8, vars: &[u8]) -> Vec<u8> {
        let len = u16::try_from(vars.len()).unwrap();
        let mut out = vec![modifier1];
        out.extend_from_slice(&len.to_le_bytes());
        out.push(modifier2);
        out.extend_from_slice(vars);
        out
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&u16::try_from(s.len()).unwrap().to_le_bytes());
        out.extend_from_slice(s);
    }

    fn vars_block(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in pairs {
            string(&mut out, k);
            string(&mut out, v);
        }
        out
    }

    fn packet(modifier1: u8, pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        packet_raw(modifier1, 0, &vars_block(pairs))
    }

    const GET: &[Pair] = &[
        (b"REQUEST_METHOD", b"GET"),
        (b"PATH_INFO", b"/hello"),
        (b"QUERY_STRING", b""),
        (b"SERVER_PROTOCOL", b"HTTP/1.1"),
        (b"HTTP_HOST", b"example.com"),
    ];

    #[derive(Debug)]
    enum Want {
        /// modifier1, modifier2, the vars, bytes used.
        Ok(u8, u8, Vec<(Vec<u8>, Vec<u8>)>, usize),
        Partial,
        Err(Error),
    }

    fn owned(pairs: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
    }

    fn ok(modifier1: u8, pairs: &[(&[u8], &[u8])], used: usize) -> Want {
        Want::Ok(modifier1, 0, owned(pairs), used)
    }

    /// (name, input, expected outcome)
    fn table() -> Vec<(&'static str, Vec<u8>, Want)> {
        let get = packet(0, GET);
        let get_len = get.len();
        let mut with_body = packet(0, &[(b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", b"5")]);
        let post_len = with_body.len();
        with_body.extend_from_slice(b"hello");
        // 2 + 8 + 2 + 65523 = 65535 bytes.
        let big_value = vec![b'x'; MAX_VARS_LEN - 2 - 8 - 2];
        let big = packet(0, &[(b"BIG_NAME", &big_value)]);
        let repeated = [(&b"HTTP_COOKIE"[..], &b"a=1"[..]), (b"HTTP_COOKIE", b"b=2")];
        let big_key = vec![b'K'; 300];
        let binary: &[(&[u8], &[u8])] = &[(b"X\x00\xff", b"\x00\x01\x02")];
        vec![
            ("simple GET", get.clone(), ok(0, GET, get_len)),
            ("modifier1 30", packet(30, GET), ok(30, GET, get_len)),
            (
                "modifier2 passed through",
                packet_raw(0, 7, &vars_block(GET)),
                Want::Ok(0, 7, owned(GET), get_len),
            ),
            (
                "body not consumed",
                with_body,
                ok(0, &[(b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", b"5")], post_len),
            ),
            ("empty vars block", vec![0, 0, 0, 0], ok(0, &[], 4)),
            ("empty value", packet(0, &[(b"A", b"")]), ok(0, &[(b"A", b"")], 4 + 5)),
            ("repeated keys kept", packet(0, &repeated), ok(0, &repeated, 4 + 2 * (2 + 11 + 2 + 3))),
            (
                "key longer than 255 bytes",
                packet(0, &[(&big_key, b"v")]),
                ok(0, &[(&big_key, b"v")], 4 + 2 + 300 + 3),
            ),
            ("binary bytes kept", packet(0, binary), ok(0, binary, 4 + 5 + 5)),
            ("65535-byte vars block", big.clone(), ok(0, &[(b"BIG_NAME", &big_value)], 4 + MAX_VARS_LEN)),
            ("empty input", vec![], Want::Partial),
            ("header only", vec![0, 10, 0, 0], Want::Partial),
            ("modifier1 5", packet(5, GET), Want::Err(Error::Modifier1(5))),
            ("modifier1 refused on first byte", vec![255], Want::Err(Error::Modifier1(255))),
            ("HTTP on the uwsgi port", b"GET / HTTP/1.1\r\n\r\n".to_vec(), Want::Err(Error::Modifier1(b'G'))),
            ("empty key", packet(0, &[(b"A", b"1"), (b"", b"x")]), Want::Err(Error::EmptyKey)),
            ("key length past block", packet_raw(0, 0, &[5, 0, b'a', b'b']), Want::Err(Error::TruncatedVar)),
            ("value length missing", packet_raw(0, 0, &[1, 0, b'a']), Want::Err(Error::TruncatedVar)),
            ("half a value length", packet_raw(0, 0, &[1, 0, b'a', 1]), Want::Err(Error::TruncatedVar)),
            (
                "value length past block",
                packet_raw(0, 0, &[1, 0, b'a', 9, 0, b'v']),
                Want::Err(Error::TruncatedVar),
            ),
            (
                "stray byte after last var",
                packet_raw(0, 0, &[1, 0, b'a', 1, 0, b'v', 0]),
                Want::Err(Error::TruncatedVar),
            ),
            (
                "var crossing the datasize into the body",
                {
                    let mut p = packet_raw(0, 0, &[1, 0, b'a', 4, 0, b'v']);
                    p.extend_from_slice(b"body");
                    p
                },
                Want::Err(Error::TruncatedVar),
            ),
        ]
    }

    fn check(name: &str, input: &[u8], want: &Want) {
        let got = parse_request(input);
        match (want, &got) {
            (Want::Ok(m1, m2, vars, used), Ok(Status::Complete(req, n))) => {
                assert_eq!((req.modifier1, req.modifier2, *n), (*m1, *m2, *used), "{name}");
                let got: Vec<_> = req.vars().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
                assert_eq!(&got, vars, "{name}");
                assert_eq!(req.strips_script_name(), *m1 == 30, "{name}");
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
    fn every_prefix_of_a_valid_packet_is_partial() {
        for (name, input, want) in table() {
            let Want::Ok(_, _, _, used) = want else { continue };
            for end in 0..used {
                let got = parse_request(&input[..end]);
                assert!(matches!(got, Ok(Status::Partial)), "{name}: prefix {end}: {:?}", got.map(|_| ()));
            }
        }
    }

    #[test]
    fn every_error_is_covered() {
        let table = table();
        for e in [Error::Modifier1(5), Error::EmptyKey, Error::TruncatedVar] {
            assert!(table.iter().any(|(_, _, w)| matches!(w, Want::Err(g) if *g == e)), "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn get_finds_the_first_match() {
        let p = packet(0, &[(b"A", b"1"), (b"B", b"2"), (b"A", b"3")]);
        let Ok(Status::Complete(req, _)) = parse_request(&p) else { panic!() };
        assert_eq!(req.get(b"A"), Some(&b"1"[..]));
        assert_eq!(req.get(b"B"), Some(&b"2"[..]));
        assert_eq!(req.get(b"C"), None);
        assert_eq!(req.vars_block(), &p[4..]);
    }

    #[test]
    fn packets_back_to_back() {
        let mut stream = packet(0, GET);
        stream.extend(packet(30, &[(b"A", b"B")]));
        let Ok(Status::Complete(first, n)) = parse_request(&stream) else { panic!() };
        assert_eq!(first.vars().count(), GET.len());
        let Ok(Status::Complete(second, m)) = parse_request(&stream[n..]) else { panic!() };
        assert_eq!((second.modifier1, n + m), (30, stream.len()));
    }
}
