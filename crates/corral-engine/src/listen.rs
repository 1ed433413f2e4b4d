//! Listening sockets: address syntax, binding, and what the environ needs to
//! know about each listener.
//!
//! The master binds every listener once, before any worker exists; workers
//! inherit the descriptors across fork and accept on them directly.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use socket2::{Domain, SockAddr, Socket, Type};

/// The default `listen(2)` backlog: gunicorn's, far above uWSGI's 100 that
/// gives 502s under bursts.
pub const DEFAULT_BACKLOG: i32 = 2048;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Addr {
    /// Parses `HOST:PORT`, `[v6]:PORT`, `:PORT` (all interfaces) or `unix:/path`.
    pub fn parse(s: &str) -> Result<Addr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: empty unix socket path"));
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(|| format!("{s:?}: expected [IPv6]:PORT"))?;
            (h.to_string(), p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: expected HOST:PORT, [IPv6]:PORT or unix:PATH"))?;
            (if h.is_empty() { "0.0.0.0".to_string() } else { h.to_string() }, p)
        };
        let port: u16 = port.parse().map_err(|_| format!("{s:?}: invalid port {port:?}"))?;
        Ok(Addr::Tcp(host, port))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(h, p) if h.contains(':') => write!(f, "[{h}]:{p}"),
            Addr::Tcp(h, p) => write!(f, "{h}:{p}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound, listening socket and the facts the environ takes from it.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    /// The address as bound (with the real port when 0 was asked for).
    pub addr: Addr,
    /// SERVER_NAME and SERVER_PORT for requests arriving here.
    pub server_name: String,
    pub server_port: String,
    pub is_unix: bool,
    /// A unix socket file this process created and removes at exit.
    pub unix_path: Option<PathBuf>,
}

impl Listener {
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Binds and listens. Errors name the address and the reason.
    pub fn bind(addr: &Addr, backlog: i32) -> Result<Listener, String> {
        match addr {
            Addr::Tcp(host, port) => {
                let sa: SocketAddr = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| format!("cannot resolve {addr}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("cannot resolve {addr}"))?;
                let sock = Socket::new(Domain::for_address(sa), Type::STREAM.cloexec(), None)
                    .map_err(|e| format!("socket for {addr}: {e}"))?;
                sock.set_reuse_address(true).ok();
                if sa.is_ipv6() {
                    sock.set_only_v6(true).ok();
                }
                sock.bind(&sa.into()).map_err(|e| bind_error(addr, e))?;
                sock.listen(backlog).map_err(|e| format!("listen on {addr}: {e}"))?;
                sock.set_nonblocking(true).map_err(|e| e.to_string())?;
                let local = sock.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(sa);
                let bound = Addr::Tcp(local.ip().to_string(), local.port());
                Ok(Listener {
                    fd: sock.into(),
                    addr: bound,
                    server_name: local.ip().to_string(),
                    server_port: local.port().to_string(),
                    is_unix: false,
                    unix_path: None,
                })
            }
            Addr::Unix(path) => {
                remove_stale_socket(path)?;
                let sock = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)
                    .map_err(|e| format!("socket for {addr}: {e}"))?;
                let sa = SockAddr::unix(path).map_err(|e| format!("{addr}: {e}"))?;
                sock.bind(&sa).map_err(|e| bind_error(addr, e))?;
                sock.listen(backlog).map_err(|e| format!("listen on {addr}: {e}"))?;
                sock.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(Listener {
                    fd: sock.into(),
                    addr: addr.clone(),
                    server_name: path.display().to_string(),
                    server_port: String::new(),
                    is_unix: true,
                    unix_path: Some(path.clone()),
                })
            }
        }
    }

    /// The socket's current accept-queue length, where the kernel reports it.
    pub fn url(&self) -> String {
        match &self.addr {
            Addr::Unix(p) => format!("unix:{}", p.display()),
            a => format!("http://{a}"),
        }
    }
}

fn bind_error(addr: &Addr, e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!("cannot bind {addr}: address already in use"),
        Some(libc::EACCES) => format!("cannot bind {addr}: permission denied"),
        Some(libc::EADDRNOTAVAIL) => format!("cannot bind {addr}: address not available on this host"),
        _ => format!("cannot bind {addr}: {e}"),
    }
}

/// A socket file left by a process that died is removed; one that something
/// still listens on is an "address in use" error, as for TCP.
fn remove_stale_socket(path: &PathBuf) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "cannot bind unix:{}: a file that is not a socket is in the way",
            path.display()
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!("cannot bind unix:{}: address already in use", path.display()));
    }
    std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_addrs() {
        assert_eq!(Addr::parse("127.0.0.1:80"), Ok(Addr::Tcp("127.0.0.1".into(), 80)));
        assert_eq!(Addr::parse("[::1]:8000"), Ok(Addr::Tcp("::1".into(), 8000)));
        assert_eq!(Addr::parse(":8000"), Ok(Addr::Tcp("0.0.0.0".into(), 8000)));
        assert_eq!(Addr::parse("unix:/tmp/x.sock"), Ok(Addr::Unix("/tmp/x.sock".into())));
        assert!(Addr::parse("localhost").is_err());
        assert!(Addr::parse("h:99999").is_err());
        assert_eq!(Addr::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
    }

    #[test]
    fn bind_port_zero_reports_real_port() {
        let l = Listener::bind(&Addr::parse("127.0.0.1:0").unwrap(), 16).unwrap();
        assert_ne!(l.server_port, "0");
        let again = Listener::bind(&l.addr, 16).unwrap_err();
        assert!(again.contains("already in use"), "{again}");
    }
}
