//! The PROXY protocol header (versions 1 and 2), which TCP load balancers
//! (HAProxy `send-proxy`/`send-proxy-v2`, AWS NLB, stunnel) put before the
//! client's bytes so that the server learns the client's address.
//!
//! Version 1 is one text line, `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`
//! (or `PROXY UNKNOWN ...\r\n`), at most 107 bytes. Version 2 is a 16-byte
//! binary header (a 12-byte signature, version and command, address family,
//! length) followed by the addresses and optional TLVs, which are skipped.
//! A version 2 `LOCAL` command (the balancer's own health check) and the
//! `UNKNOWN`/`UNSPEC` families carry no client address.
//!
//! [`detect`] tells from the first bytes whether a connection starts with a
//! header at all; [`parse`] reads one.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Status;

/// Longest version 1 line, CRLF included (the specification's limit).
pub const V1_MAX: usize = 107;
/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 2 address block and TLVs accepted. The length field
/// allows 65535; real balancers send a few hundred bytes at most (AWS adds
/// a TLV or two), and the server buffers this much before it can refuse.
pub const V2_MAX_PAYLOAD: usize = 4096;

/// Whether a connection's first bytes are a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// They are not: the connection speaks the server's protocol at once.
    No,
    /// Too few bytes to tell yet.
    Maybe,
    Yes,
}

/// Looks at the first bytes of a connection.
pub fn detect(buf: &[u8]) -> Detect {
    for sig in [&b"PROXY "[..], &V2_SIGNATURE[..]] {
        let n = buf.len().min(sig.len());
        if buf[..n] == sig[..n] {
            return if n == sig.len() { Detect::Yes } else { Detect::Maybe };
        }
    }
    Detect::No
}

/// What a header says: the client's address, and the address it connected
/// to, when it carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

/// Why a PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Not a PROXY header at all.
    NotProxy,
    /// A version 1 line longer than [`V1_MAX`], or not ended by CRLF.
    V1Line,
    /// A version 1 protocol other than TCP4, TCP6 or UNKNOWN.
    V1Protocol,
    /// A version 1 address or port that does not parse, or does not match
    /// the protocol (an IPv6 address after TCP4).
    V1Address,
    /// A version 2 header whose version is not 2 or command not LOCAL or PROXY.
    V2Version,
    /// A version 2 address family or transport byte the specification does
    /// not define.
    V2Family,
    /// A version 2 length shorter than its family's addresses, or over
    /// [`V2_MAX_PAYLOAD`].
    V2Length,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::NotProxy => "not a PROXY protocol header",
            Error::V1Line => "PROXY v1 line too long or not ended by CRLF",
            Error::V1Protocol => "PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN",
            Error::V1Address => "PROXY v1 address or port is malformed",
            Error::V2Version => "PROXY v2 version or command is unknown",
            Error::V2Family => "PROXY v2 address family or transport is not one the protocol defines",
            Error::V2Length => "PROXY v2 length does not fit its addresses or is too large",
        })
    }
}

impl std::error::Error for Error {}

/// Parses the header at the start of `buf`: `Complete(header, bytes used)`,
/// `Partial` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Status<Header>, Error> {
    match detect(buf) {
        Detect::No => Err(Error::NotProxy),
        Detect::Maybe => Ok(Status::Partial),
        Detect::Yes if buf.starts_with(b"PROXY ") => parse_v1(buf),
        Detect::Yes => parse_v2(buf),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Status<Header>, Error> {
    let Some(end) = buf.iter().take(V1_MAX).position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX { Err(Error::V1Line) } else { Ok(Status::Partial) };
    };
    let line = buf[..end].strip_suffix(b"\r").ok_or(Error::V1Line)?;
    let line = std::str::from_utf8(line).map_err(|_| Error::V1Line)?;
    let mut parts = line.split(' ');
    parts.next(); // "PROXY"
    let unknown = Header { source: None, destination: None };
    let header = match parts.next() {
        // Whatever follows UNKNOWN is to be ignored.
        Some("UNKNOWN") => unknown,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Err(Error::V1Address);
            };
            let ip = |s: &str| -> Result<IpAddr, Error> {
                let ip: IpAddr = s.parse().map_err(|_| Error::V1Address)?;
                if ip.is_ipv4() != (proto == "TCP4") {
                    return Err(Error::V1Address);
                }
                Ok(ip)
            };
            let port = |s: &str| -> Result<u16, Error> {
                // Decimal without a sign or leading zeros, as the specification asks.
                if s.is_empty() || s.len() > 5 || (s.len() > 1 && s.starts_with('0')) {
                    return Err(Error::V1Address);
                }
                if !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Error::V1Address);
                }
                s.parse().map_err(|_| Error::V1Address)
            };
            Header {
                source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
                destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
            }
        }
        _ => return Err(Error::V1Protocol),
    };
    Ok(Status::Complete(header, end + 1))
}

fn parse_v2(buf: &[u8]) -> Result<Status<Header>, Error> {
    if buf.len() < 16 {
        return Ok(Status::Partial);
    }
    let (version, command) = (buf[12] >> 4, buf[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(Error::V2Version);
    }
    let (family, transport) = (buf[13] >> 4, buf[13] & 0x0f);
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > V2_MAX_PAYLOAD {
        return Err(Error::V2Length);
    }
    if command == 0 {
        // LOCAL: the balancer speaks for itself (a health check); whatever
        // family it names is to be ignored (specification, 2.2).
        if buf.len() < 16 + len {
            return Ok(Status::Partial);
        }
        return Ok(Status::Complete(Header { source: None, destination: None }, 16 + len));
    }
    // UNSPEC, INET, INET6, UNIX; UNSPEC, STREAM, DGRAM. Other values are
    // to be refused (specification, 2.2).
    if family > 3 || transport > 2 {
        return Err(Error::V2Family);
    }
    let needed = [0, 12, 36, 216][usize::from(family)];
    if len < needed {
        return Err(Error::V2Length);
    }
    if buf.len() < 16 + len {
        return Ok(Status::Partial);
    }
    let a = &buf[16..16 + len];
    let header = match (family, transport) {
        // A valid combination a receiver does not use is taken as UNSPEC
        // (specification, 2.2): the connection's own addresses stand. A
        // unix socket's path or a datagram peer is no REMOTE_ADDR of an
        // HTTP client.
        (0, _) | (3, _) | (_, 0) | (_, 2) => Header { source: None, destination: None },
        (1, _) => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header {
                source: Some(SocketAddr::new(ip(0), port(8))),
                destination: Some(SocketAddr::new(ip(4), port(10))),
            }
        }
        _ => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header {
                source: Some(SocketAddr::new(ip(0), port(32))),
                destination: Some(SocketAddr::new(ip(16), port(34))),
            }
        }
    };
    Ok(Status::Complete(header, 16 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | command);
        b.push(fam);
        b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn detection() {
        assert_eq!(detect(b""), Detect::Maybe);
        assert_eq!(detect(b"PRO"), Detect::Maybe);
        assert_eq!(detect(b"PROXY "), Detect::Yes);
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Detect::No);
        assert_eq!(detect(b"POST"), Detect::No);
        assert_eq!(detect(b"PUT"), Detect::No);
        assert_eq!(detect(b"\r\n\r\n\0"), Detect::Maybe);
        assert_eq!(detect(&V2_SIGNATURE), Detect::Yes);
        assert_eq!(detect(b"\r\n\r\nX"), Detect::No);
    }

    #[test]
    fn version_1_vectors() {
        let ok = |line: &str, src: Option<&str>, dst: Option<&str>| {
            let mut buf = line.as_bytes().to_vec();
            buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse(&buf),
                Ok(Status::Complete(
                    Header { source: src.and_then(addr), destination: dst.and_then(addr) },
                    line.len()
                )),
                "{line:?}"
            );
        };
        ok(
            "PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n",
            Some("192.0.2.7:56324"),
            Some("198.51.100.1:443"),
        );
        ok(
            "PROXY TCP6 2001:db8::7 2001:db8::1 65535 80\r\n",
            Some("[2001:db8::7]:65535"),
            Some("[2001:db8::1]:80"),
        );
        ok("PROXY UNKNOWN\r\n", None, None);
        ok("PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None, None);
        ok("PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", Some("0.0.0.0:0"), Some("0.0.0.0:0"));

        let err =
            |line: &[u8], e: Error| assert_eq!(parse(line), Err(e), "{:?}", String::from_utf8_lossy(line));
        err(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\n", Error::V1Line);
        err(b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n", Error::V1Protocol);
        err(b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n", Error::V1Address);
        err(b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n", Error::V1Address);
        err(b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", Error::V1Address);
        err(b"PROXY TCP4 192.0.2.7 198.51.100.1 080 2\r\n", Error::V1Address);
        err(b"PROXY TCP4 192.0.2.7 198.51.100.1 +80 2\r\n", Error::V1Address);
        err(b"PROXY TCP4 192.0.2.7 198.51.100.1 80\r\n", Error::V1Address);
        err(b"PROXY TCP4 192.0.2.7  198.51.100.1 80 2\r\n", Error::V1Address);
        err(b"PROXY TCP4 192.0.2.7 198.51.100.1 80 2 3\r\n", Error::V1Address);
        err(b"PROXY TCP4 192.0.2.007 198.51.100.1 80 2\r\n", Error::V1Address);
        err(b"GET / HTTP/1.1\r\n", Error::NotProxy);
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(V1_MAX, b'x');
        err(&long, Error::V1Line);

        assert_eq!(parse(b"PROXY TCP4 192.0.2.7"), Ok(Status::Partial));
        assert_eq!(parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r"), Ok(Status::Partial));
    }

    #[test]
    fn version_2_vectors() {
        let mut v4 = vec![192, 0, 2, 7, 198, 51, 100, 1];
        v4.extend_from_slice(&56324u16.to_be_bytes());
        v4.extend_from_slice(&443u16.to_be_bytes());
        let buf = v2(1, 0x11, &v4);
        assert_eq!(
            parse(&buf),
            Ok(Status::Complete(
                Header { source: addr("192.0.2.7:56324"), destination: addr("198.51.100.1:443") },
                28
            ))
        );
        // TLVs after the addresses (AWS sends some) are skipped; what follows is the client's.
        let mut with_tlv = v4.clone();
        with_tlv.extend_from_slice(&[0xEA, 0x00, 0x03, b'v', b'p', b'c']);
        let mut buf = v2(1, 0x11, &with_tlv);
        buf.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&buf),
            Ok(Status::Complete(
                Header { source: addr("192.0.2.7:56324"), destination: addr("198.51.100.1:443") },
                34
            ))
        );

        let mut v6 = Vec::new();
        v6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&1u16.to_be_bytes());
        v6.extend_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &v6)),
            Ok(Status::Complete(
                Header { source: addr("[2001:db8::7]:1"), destination: addr("[2001:db8::1]:2") },
                52
            ))
        );

        let none = Header { source: None, destination: None };
        // LOCAL (a health check) and UNSPEC carry no client; LOCAL's family is ignored.
        assert_eq!(parse(&v2(0, 0x11, &v4)), Ok(Status::Complete(none, 28)));
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Status::Complete(none, 16)));
        assert_eq!(parse(&v2(0, 0x11, &[])), Ok(Status::Complete(none, 16)));
        assert_eq!(parse(&v2(0, 0x12, &v4)), Ok(Status::Complete(none, 28)));
        assert_eq!(parse(&v2(0, 0x31, &[0; 216])), Ok(Status::Complete(none, 232)));
        assert_eq!(parse(&v2(1, 0x00, &[1, 2, 3])), Ok(Status::Complete(none, 19)));

        assert_eq!(parse(&v2(1, 0x11, &v4)[..20]), Ok(Status::Partial));
        assert_eq!(parse(&v2(1, 0x11, &v4)[..15]), Ok(Status::Partial));
        assert_eq!(parse(&v2(1, 0x11, &v4[..8])), Err(Error::V2Length));
        // UDP and AF_UNIX fall back to UNSPEC; values not defined are refused.
        assert_eq!(parse(&v2(1, 0x12, &v4)), Ok(Status::Complete(none, 28)));
        assert_eq!(parse(&v2(1, 0x22, &v6)), Ok(Status::Complete(none, 52)));
        assert_eq!(parse(&v2(1, 0x31, &[0; 216])), Ok(Status::Complete(none, 232)));
        assert_eq!(parse(&v2(1, 0x32, &[0; 216])), Ok(Status::Complete(none, 232)));
        assert_eq!(parse(&v2(1, 0x10, &v4)), Ok(Status::Complete(none, 28)));
        assert_eq!(parse(&v2(1, 0x31, &[0; 100])), Err(Error::V2Length));
        assert_eq!(parse(&v2(1, 0x41, &v4)), Err(Error::V2Family));
        assert_eq!(parse(&v2(1, 0x13, &v4)), Err(Error::V2Family));
        assert_eq!(parse(&v2(2, 0x11, &v4)), Err(Error::V2Version));
        let mut v1_version = v2(1, 0x11, &v4);
        v1_version[12] = 0x11;
        assert_eq!(parse(&v1_version), Err(Error::V2Version));
        let mut huge = v2(1, 0x11, &v4);
        huge[14..16].copy_from_slice(&(V2_MAX_PAYLOAD as u16 + 1).to_be_bytes());
        assert_eq!(parse(&huge), Err(Error::V2Length));
    }
}
