//! Which HTTP peers may say that the client came over https: gunicorn's
//! `--forwarded-allow-ips` and `secure_scheme_headers`, with the same
//! defaults, so an app behind a TLS-terminating proxy on the same host
//! builds https URLs as it did under gunicorn.
//!
//! Only for HTTP listeners: over uwsgi, FastCGI and SCGI the front end says
//! so in its own variables (HTTPS, REQUEST_SCHEME).

use std::net::IpAddr;

use corral_proto::http1::{Head, Known};
use ipnet::IpNet;

/// gunicorn's default `--forwarded-allow-ips`: a proxy on this host.
pub const DEFAULT_ALLOW: &str = "127.0.0.1,::1";

/// The peers whose scheme fields count (`--forwarded-allow-ips`). Peers on
/// a unix socket always count, as under gunicorn: only local processes
/// with access to the socket file reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustedPeers {
    All,
    Only(Vec<IpNet>),
    /// `none`: no peer, not even on a unix socket (gunicorn's
    /// `secure_scheme_headers = {}`, which makes no header count).
    Nobody,
}

impl TrustedPeers {
    /// `*`, or addresses and networks separated by commas
    /// (`127.0.0.1,10.0.0.0/8,::1`); an empty list trusts no TCP peer, and
    /// `none` no peer at all.
    pub fn parse(list: &str) -> Result<TrustedPeers, String> {
        if list.trim() == "none" {
            return Ok(TrustedPeers::Nobody);
        }
        let mut nets = Vec::new();
        let mut all = false;
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                all = true;
                continue;
            }
            let net = match item.parse::<IpNet>() {
                // 10.0.0.1/8 is most likely a typo for 10.0.0.1 or 10.0.0.0/8.
                Ok(net) if net.trunc() != net => {
                    return Err(format!("{item:?} has host bits set (the network is {})", net.trunc()))
                }
                Ok(net) => net,
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => return Err(format!("not an IP address or network: {item:?}")),
                },
            };
            nets.push(ipv4_if_mapped(net));
        }
        Ok(if all { TrustedPeers::All } else { TrustedPeers::Only(nets) })
    }

    /// Whether a peer (REMOTE_ADDR as corral reports it) may set the scheme.
    pub fn trusts(&self, remote_addr: &str, is_unix: bool) -> bool {
        let nets = match self {
            TrustedPeers::Nobody => return false,
            _ if is_unix => return true,
            TrustedPeers::All => return true,
            TrustedPeers::Only(nets) => nets,
        };
        let Ok(ip) = remote_addr.parse::<IpAddr>() else {
            return false;
        };
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
        let v4 = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        nets.iter().any(|n| n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)))
    }
}

/// `::ffff:a.b.c.d` (and a network of such, /96 or longer) as the IPv4
/// address or network it maps: corral reports an IPv4 client of an IPv6
/// listener as a.b.c.d, where gunicorn says ::ffff:a.b.c.d, so lists written
/// for gunicorn name it that way.
fn ipv4_if_mapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// The fields of the head and the value each must have for https.
const SECURE: [(Known, &[u8]); 3] =
    [(Known::XForwardedProto, b"https"), (Known::XForwardedProtocol, b"ssl"), (Known::XForwardedSsl, b"on")];

/// What the scheme fields of a request head say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// No such field.
    Unsaid,
    Http,
    Https,
    /// Fields that disagree (gunicorn answers 400 "Contradictory scheme
    /// headers"): a client must not pick whichever a proxy forgot to strip.
    Contradictory,
}

/// What a peer's scheme fields say (whether the peer may say it is for
/// [`TrustedPeers::trusts`]).
pub fn scheme(head: &Head, bytes: &[u8]) -> Scheme {
    if !head.scheme_fields {
        return Scheme::Unsaid;
    }
    let mut said = Scheme::Unsaid;
    for f in &head.fields {
        let Some((_, secure)) = SECURE.iter().find(|(k, _)| *k == f.known) else {
            continue;
        };
        let this =
            if bytes[f.value.clone()].eq_ignore_ascii_case(secure) { Scheme::Https } else { Scheme::Http };
        if said != Scheme::Unsaid && said != this {
            return Scheme::Contradictory;
        }
        said = this;
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::http1::{parse_head, Limits};
    use corral_proto::Status;

    fn head(fields: &str) -> (Head, Vec<u8>) {
        let raw = format!("GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n").into_bytes();
        let mut head = Head::default();
        match parse_head(&raw, &Limits::default(), &mut head) {
            Ok(Status::Complete((), _)) => (head, raw),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scheme_fields() {
        let vectors: &[(&str, Scheme)] = &[
            ("", Scheme::Unsaid),
            ("X-Forwarded-Proto: https\r\n", Scheme::Https),
            ("x-forwarded-proto: HTTPS\r\n", Scheme::Https),
            ("X-Forwarded-Proto: http\r\n", Scheme::Http),
            ("X-Forwarded-Protocol: ssl\r\n", Scheme::Https),
            ("X-Forwarded-Ssl: on\r\n", Scheme::Https),
            ("X-Forwarded-Ssl: off\r\n", Scheme::Http),
            ("X-Forwarded-Proto: https\r\nX-Forwarded-Ssl: on\r\n", Scheme::Https),
            ("X-Forwarded-Proto: https\r\nX-Forwarded-Proto: http\r\n", Scheme::Contradictory),
            ("X-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off\r\n", Scheme::Contradictory),
            // Underscored names never reach the head.
            ("X_Forwarded_Proto: https\r\n", Scheme::Unsaid),
        ];
        for (fields, want) in vectors {
            let (h, raw) = head(fields);
            assert_eq!(scheme(&h, &raw), *want, "{fields:?}");
        }
    }

    #[test]
    fn trusted_peers() {
        let default = TrustedPeers::parse(DEFAULT_ALLOW).unwrap();
        assert!(default.trusts("127.0.0.1", false));
        assert!(default.trusts("::1", false));
        assert!(default.trusts("::ffff:127.0.0.1", false));
        assert!(!default.trusts("127.0.0.2", false));
        assert!(!default.trusts("192.0.2.1", false));
        assert!(default.trusts("", true));
        let nets = TrustedPeers::parse("10.0.0.0/8, 2001:db8::/32").unwrap();
        assert!(nets.trusts("10.1.2.3", false));
        assert!(nets.trusts("2001:db8::5", false));
        assert!(!nets.trusts("11.0.0.1", false));
        assert_eq!(TrustedPeers::parse("*").unwrap(), TrustedPeers::All);
        assert!(TrustedPeers::parse("*").unwrap().trusts("203.0.113.9", false));
        assert!(!TrustedPeers::parse("").unwrap().trusts("127.0.0.1", false));
        assert!(TrustedPeers::parse("").unwrap().trusts("", true));
        let nobody = TrustedPeers::parse("none").unwrap();
        assert!(!nobody.trusts("127.0.0.1", false) && !nobody.trusts("", true));
        assert!(TrustedPeers::parse("none,127.0.0.1").is_err());
        assert!(TrustedPeers::parse("localhost").is_err());
        assert!(TrustedPeers::parse("localhost,*").is_err());
        assert!(TrustedPeers::parse("*,localhost").is_err());
        assert!(TrustedPeers::parse("10.0.0.1/8").is_err());
        assert!(TrustedPeers::parse("10.0.0.0/33").is_err());
    }

    /// Lists written for gunicorn on `[::]` name IPv4 clients as
    /// ::ffff:a.b.c.d, which corral reports as a.b.c.d.
    #[test]
    fn ipv4_mapped_entries_match_ipv4_peers() {
        let one = TrustedPeers::parse("::ffff:192.0.2.2").unwrap();
        assert!(one.trusts("192.0.2.2", false));
        assert!(one.trusts("::ffff:192.0.2.2", false));
        assert!(!one.trusts("192.0.2.3", false));
        let net = TrustedPeers::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(net, TrustedPeers::Only(vec!["10.0.0.0/8".parse().unwrap()]));
        assert!(net.trusts("10.9.8.7", false) && !net.trusts("11.0.0.1", false));
        // Wider than the mapped range: left as IPv6.
        let wide = TrustedPeers::parse("::/64").unwrap();
        assert_eq!(wide, TrustedPeers::Only(vec!["::/64".parse().unwrap()]));
    }
}
