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
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, SockFilter, Socket, Type};

/// The default `listen(2)` backlog: gunicorn's, far above uWSGI's 100 that
/// gives 502s under bursts.
pub const DEFAULT_BACKLOG: i32 = 2048;

/// The protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http = 0,
    Uwsgi = 1,
    FastCgi = 2,
    Scgi = 3,
}

impl Protocol {
    /// The name used in option names and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Uwsgi => "uwsgi",
            Protocol::FastCgi => "fastcgi",
            Protocol::Scgi => "scgi",
        }
    }

    /// Whether the protocol trusts whatever its peer says about the request
    /// (client address, scheme, paths): such a socket must face only the
    /// front end, never the internet.
    pub fn trusts_peer(self) -> bool {
        matches!(self, Protocol::Uwsgi | Protocol::FastCgi | Protocol::Scgi)
    }
}

/// The port of an address given as a host alone, as in gunicorn.
const DEFAULT_PORT: &str = "8000";

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
    /// An already listening socket inherited as this descriptor (from
    /// systemd socket activation or a supervising process).
    Fd(RawFd),
}

impl Addr {
    /// Parses `HOST:PORT`, `[v6]:PORT`, `:PORT` (all interfaces), `unix:/path` or
    /// `fd://N`; `tcp://` before a TCP address is accepted, as gunicorn does.
    pub fn parse(s: &str) -> Result<Addr, String> {
        if let Some(tcp) = s.strip_prefix("tcp://") {
            if tcp.starts_with("unix:") || tcp.starts_with("fd://") {
                return Err(format!("{s:?}: tcp:// takes HOST:PORT"));
            }
            return Addr::parse(tcp);
        }
        if let Some(n) = s.strip_prefix("fd://") {
            let fd: RawFd =
                n.parse().map_err(|_| format!("{s:?}: expected fd://N with N a descriptor number"))?;
            if fd < 0 {
                return Err(format!("{s:?}: negative descriptor"));
            }
            return Ok(Addr::Fd(fd));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: empty unix socket path"));
            }
            // uWSGI's `@name`: refused rather than made a file named "@name",
            // which the front end configured for the abstract name would
            // never reach.
            if path.starts_with('@') {
                return Err(format!("{s:?}: abstract unix sockets (@name) are not supported; give a path"));
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        // A host without a port gets 8000, as in gunicorn.
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            match rest.split_once("]:") {
                Some((h, p)) => (h.to_string(), p),
                None => match rest.strip_suffix(']') {
                    Some(h) => (h.to_string(), DEFAULT_PORT),
                    None => return Err(format!("{s:?}: expected [IPv6]:PORT")),
                },
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (if h.is_empty() { "0.0.0.0".to_string() } else { h.to_string() }, p),
                // A port alone: uWSGI's `--socket 3031` habit would otherwise
                // bind port 8000 of a host named "3031".
                None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                    return Err(format!(
                        "{s:?}: a port alone is written 127.0.0.1:{s} (this host) or :{s} (every interface)"
                    ))
                }
                None if !s.is_empty() && !s.contains('/') => (s.to_string(), DEFAULT_PORT),
                None => return Err(format!("{s:?}: expected HOST:PORT, [IPv6]:PORT or unix:PATH")),
            }
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
            Addr::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

/// How sockets are bound: unix socket files' mode and owner, and whether
/// TCP ports may be shared.
#[derive(Debug, Clone, Default)]
pub struct BindOptions {
    /// Permission bits of the socket file (`--socket-mode`).
    pub mode: Option<u32>,
    /// Owner and group of the socket file (`--socket-owner`); `None` keeps that part.
    pub owner: Option<(Option<u32>, Option<u32>)>,
    /// SO_REUSEPORT on TCP sockets (`--reuse-port`): other processes that
    /// set it too (another corral, say the next release started beside
    /// this one) may bind the same address, and the kernel spreads new
    /// connections among them.
    pub reuse_port: bool,
    /// Ports an IPv4 listener of this server binds as well: an IPv6
    /// wildcard (`[::]`) on one of them takes IPv6 only, which leaves the
    /// port's IPv4 side to that listener. Otherwise `[::]` also takes IPv4
    /// (as v4-mapped addresses), as gunicorn's does where the system's
    /// default allows it.
    pub v4_ports: Vec<u16>,
    /// `--backlog` was given: an inherited socket (`fd://N`) listens with it
    /// too, as gunicorn's do; otherwise it keeps the backlog its creator gave.
    pub backlog_given: bool,
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
    /// Device and inode of that file when bound: at exit it is removed only
    /// if it is still this one, not a socket another server bound since.
    file_id: Option<(u64, u64)>,
    /// The process that bound it: a forked child never removes it.
    owner_pid: u32,
    pub protocol: Protocol,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.owner_pid == std::process::id() {
            self.remove_file();
        }
    }
}

impl Listener {
    /// Removes this listener's socket file, if it is still the one bound.
    pub fn remove_file(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let Some(path) = self.unix_path.take() else {
            return;
        };
        match std::fs::symlink_metadata(&path) {
            Ok(m) if Some((m.dev(), m.ino())) == self.file_id => {
                if let Err(e) = std::fs::remove_file(&path) {
                    // After --user, the socket's directory may not be ours to change.
                    tracing::warn!("cannot remove the socket file {}: {e}", path.display());
                }
            }
            Ok(_) => tracing::warn!(
                "{} is no longer the socket this server bound (another server bound it since); left in place",
                path.display()
            ),
            Err(_) => {}
        }
    }

    /// A listener on `fd` (TCP or unix); `path` is a socket file it bound.
    fn new(fd: OwnedFd, addr: Addr, server_name: String, is_unix: bool, path: Option<PathBuf>) -> Listener {
        use std::os::unix::fs::MetadataExt;
        let file_id =
            path.as_ref().and_then(|p| std::fs::symlink_metadata(p).ok()).map(|m| (m.dev(), m.ino()));
        Listener {
            fd,
            addr,
            server_name,
            server_port: String::new(),
            is_unix,
            unix_path: path,
            file_id,
            owner_pid: std::process::id(),
            protocol: Protocol::Http,
        }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Lets no new TCP connection into this listener's accept queue, while
    /// handshakes already under way complete: a classic BPF filter drops
    /// segments that open a connection (SYN without ACK) and passes the
    /// rest. Connections still queued when the last descriptor of a
    /// listening socket closes are reset by the kernel, so before a full
    /// stop the workers take what is queued with the queue closed to
    /// newcomers; a client refused this way retries its SYN a second later
    /// and then finds the port closed. Only for sockets this process bound:
    /// one handed in by descriptor (systemd) outlives it, and its queue is
    /// for the next instance. Returns whether the filter was attached.
    pub fn close_queue(&self) -> io::Result<bool> {
        if self.is_unix || matches!(self.addr, Addr::Fd(_)) {
            return Ok(false);
        }
        // A socket filter sees a TCP segment from its TCP header on.
        const TCP_FLAGS: u32 = 13;
        const SYN: u32 = 0x02;
        const SYN_ACK: u32 = 0x12;
        let program = [
            SockFilter::new((libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16, 0, 0, TCP_FLAGS),
            SockFilter::new((libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16, 0, 0, SYN_ACK),
            SockFilter::new((libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, 0, 1, SYN),
            SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0),
            SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, u32::MAX),
        ];
        socket2::SockRef::from(&self.fd).attach_filter(&program)?;
        Ok(true)
    }

    /// Binds and listens. Errors name the address and the reason.
    pub fn bind(addr: &Addr, backlog: i32) -> Result<Listener, String> {
        Listener::bind_with(addr, Protocol::Http, backlog, BindOptions::default())
    }

    /// Binds and listens for `protocol`; unix socket files get `options`' mode and owner.
    pub fn bind_with(
        addr: &Addr,
        protocol: Protocol,
        backlog: i32,
        options: BindOptions,
    ) -> Result<Listener, String> {
        let mut l = Listener::bind_addr(addr, backlog, &options)?;
        l.protocol = protocol;
        Ok(l)
    }

    /// Takes over a socket this master's previous program bound for `addr`
    /// (see `supervise::INHERIT_ENV`): the same listener, not a new bind.
    pub fn adopt(fd: RawFd, addr: &Addr, protocol: Protocol) -> Result<Listener, String> {
        let mut l = Listener::inherit(fd)?;
        l.protocol = protocol;
        if let Addr::Tcp(..) = addr {
            l.addr = Addr::Tcp(l.server_name.clone(), l.server_port.parse().unwrap_or(0));
        }
        if let Addr::Unix(path) = addr {
            use std::os::unix::fs::MetadataExt;
            l.addr = addr.clone();
            // Still ours: removed at exit as if this program had bound it.
            l.unix_path = Some(path.clone());
            l.file_id = std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
            l.server_name = path.display().to_string();
        }
        Ok(l)
    }

    /// Connections waiting in the accept queue (0 where the kernel does not
    /// say).
    pub fn queued(&self) -> u32 {
        if self.is_unix {
            return unix_queued(self.fd.as_raw_fd()).unwrap_or(0);
        }
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        // For a listening socket the kernel reports the accept queue's
        // length in tcpi_unacked (and its limit in tcpi_sacked).
        if r == 0 {
            info.tcpi_unacked
        } else {
            0
        }
    }

    /// Whether the socket is reachable from other machines: not a unix
    /// socket and not bound to a loopback address (as bound, so also for a
    /// socket inherited as `fd://N` or from systemd).
    pub fn is_public(&self) -> bool {
        !self.is_unix && !self.server_name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether a TCP address could be bound now: bound and let go at once,
    /// without listening (nothing else is checked, nor created). For a
    /// configuration the master is about to re-execute into: once it has,
    /// a listener it cannot bind ends the server.
    pub fn check_bindable(addr: &Addr, options: &BindOptions) -> Result<(), String> {
        match addr {
            Addr::Tcp(host, port) => tcp_bound(addr, host, *port, options).map(drop),
            _ => Ok(()),
        }
    }

    fn bind_addr(addr: &Addr, backlog: i32, options: &BindOptions) -> Result<Listener, String> {
        match addr {
            Addr::Fd(fd) => {
                let l = Listener::inherit(*fd)?;
                if options.backlog_given {
                    socket2::SockRef::from(&l.fd)
                        .listen(backlog)
                        .map_err(|e| format!("--backlog on {addr}: {e}"))?;
                }
                Ok(l)
            }
            Addr::Tcp(host, port) => {
                let (sock, sa) = tcp_bound(addr, host, *port, options)?;
                sock.listen(backlog).map_err(|e| format!("listen on {addr}: {e}"))?;
                sock.set_nonblocking(true).map_err(|e| format!("set {addr} non-blocking: {e}"))?;
                let local = sock.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(sa);
                let bound = Addr::Tcp(local.ip().to_string(), local.port());
                let mut l = Listener::new(sock.into(), bound, local.ip().to_string(), false, None);
                l.server_port = local.port().to_string();
                Ok(l)
            }
            Addr::Unix(path) => {
                remove_stale_socket(path)?;
                let sock = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)
                    .map_err(|e| format!("socket for {addr}: {e}"))?;
                let sa = SockAddr::unix(path).map_err(|e| format!("{addr}: {e}"))?;
                sock.bind(&sa).map_err(|e| bind_error(addr, e))?;
                // From here on the file is ours: a failure below removes it.
                let l = Listener::new(
                    sock.into(),
                    addr.clone(),
                    path.display().to_string(),
                    true,
                    Some(path.clone()),
                );
                socket_file_mode_owner(addr, path, options)?;
                let sock = socket2::SockRef::from(&l.fd);
                sock.listen(backlog).map_err(|e| format!("listen on {addr}: {e}"))?;
                sock.set_nonblocking(true).map_err(|e| format!("set {addr} non-blocking: {e}"))?;
                Ok(l)
            }
        }
    }

    /// Takes over an inherited listening socket. Its file (for a unix
    /// socket) belongs to whoever created it and is left in place at exit.
    fn inherit(fd: RawFd) -> Result<Listener, String> {
        use std::os::fd::FromRawFd;
        let addr = Addr::Fd(fd);
        let mut accepting: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut accepting as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(format!("{addr}: not a socket: {}", io::Error::last_os_error()));
        }
        if accepting == 0 {
            return Err(format!("{addr}: the socket is not listening"));
        }
        // The descriptor is ours from here on; keep it out of anything the app execs.
        let sock = unsafe { Socket::from_raw_fd(fd) };
        sock.set_cloexec(true).map_err(|e| format!("{addr}: {e}"))?;
        sock.set_nonblocking(true).map_err(|e| format!("{addr}: {e}"))?;
        let local = sock.local_addr().map_err(|e| format!("{addr}: {e}"))?;
        let (server_name, server_port, is_unix) = match local.as_socket() {
            Some(sa) => (sa.ip().to_string(), sa.port().to_string(), false),
            None => {
                let path = local.as_pathname().map(|p| p.display().to_string()).unwrap_or_default();
                (path, String::new(), true)
            }
        };
        let mut l = Listener::new(sock.into(), addr, server_name, is_unix, None);
        l.server_port = server_port;
        Ok(l)
    }

    /// How the listener is named in log lines: `http://127.0.0.1:8000`,
    /// `uwsgi://127.0.0.1:3031`, `unix:/run/app.sock (fastcgi)`.
    pub fn url(&self) -> String {
        let proto = self.protocol.name();
        let at = match &self.addr {
            Addr::Fd(n) if self.is_unix => format!("unix:{} (fd {n})", self.server_name),
            Addr::Fd(n) if self.server_port.is_empty() => format!("fd://{n}"),
            Addr::Fd(n) => {
                let host = if self.server_name.contains(':') {
                    format!("[{}]", self.server_name)
                } else {
                    self.server_name.clone()
                };
                return format!("{proto}://{host}:{} (fd {n})", self.server_port);
            }
            Addr::Unix(p) => format!("unix:{}", p.display()),
            a => return format!("{proto}://{a}"),
        };
        if self.protocol == Protocol::Http {
            at
        } else {
            format!("{at} ({proto})")
        }
    }
}

/// Whether a start could resolve `addr`'s host, as it will to bind it (for
/// --check-config and --print-config, which bind nothing).
pub fn check_resolves(addr: &Addr) -> Result<(), String> {
    match addr {
        Addr::Tcp(host, port) => resolve(addr, host, *port).map(|_| ()),
        _ => Ok(()),
    }
}

/// The address a TCP listener for `host:port` binds: the first IPv4
/// address the name resolves to, else its first address. A name binds one
/// address; IPv4 first, as under gunicorn and uWSGI (which bind a name as
/// IPv4): `localhost` resolves to ::1 first on systems whose /etc/hosts
/// lists it, and a server bound there only refuses the 127.0.0.1 that
/// nginx's `uwsgi_pass` or a health check was given.
fn resolve(addr: &Addr, host: &str, port: u16) -> Result<SocketAddr, String> {
    let hint = if host.contains("://") {
        " (an address is HOST:PORT, without a scheme)"
    } else if host.contains(':') {
        " (an IPv6 address is written in brackets: [::1]:8000)"
    } else {
        ""
    };
    let all: Vec<SocketAddr> =
        (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {addr}: {e}{hint}"))?.collect();
    all.iter().find(|a| a.is_ipv4()).or(all.first()).copied().ok_or_else(|| format!("cannot resolve {addr}"))
}

/// Whether the listening socket a previous program of this master held at
/// `held` (a bound listener's address as [`Addr`] writes it: the address
/// and port a TCP socket has, a unix socket's path, an inherited
/// descriptor) is the one `wanted` asks for, so that a re-exec takes it
/// over rather than binding anew. Matched by address, not by place in the
/// list: a configuration read again may add, remove or reorder listeners.
/// Port 0 (any port) is held by a socket on the same address whatever its
/// port: the one the previous program was given.
pub fn holds(held: &str, wanted: &Addr) -> bool {
    match wanted {
        Addr::Tcp(host, port) => held.parse::<SocketAddr>().is_ok_and(|h| {
            resolve(wanted, host, *port)
                .is_ok_and(|w| w.ip() == h.ip() && (*port == 0 || w.port() == h.port()))
        }),
        other => held == other.to_string(),
    }
}

/// A TCP socket bound to `host:port` (not listening yet), with the options
/// of this server's listeners.
fn tcp_bound(
    addr: &Addr,
    host: &str,
    port: u16,
    options: &BindOptions,
) -> Result<(Socket, SocketAddr), String> {
    let sa = resolve(addr, host, port)?;
    let sock = Socket::new(Domain::for_address(sa), Type::STREAM.cloexec(), None)
        .map_err(|e| format!("socket for {addr}: {e}"))?;
    sock.set_reuse_address(true).ok();
    if options.reuse_port {
        sock.set_reuse_port(true).map_err(|e| format!("--reuse-port on {addr}: {e}"))?;
    }
    if sa.is_ipv6() {
        // Both families on a wildcard no IPv4 listener shares,
        // whatever the system's default (net.ipv6.bindv6only).
        let v6_only = !sa.ip().is_unspecified() || options.v4_ports.contains(&sa.port());
        sock.set_only_v6(v6_only).ok();
    }
    sock.bind(&sa.into()).map_err(|e| bind_error(addr, e))?;
    Ok((sock, sa))
}

/// Gives a socket file just bound `--socket-mode` and `--socket-owner`,
/// before it listens: until then a connection is refused, so none gets in
/// under the mode the umask gave the file. Through a descriptor of the file
/// opened without following a symlink, and only when it is a socket: a
/// symlink that a user who may write to the directory put in its place
/// meanwhile must not turn root's chmod or chown onto another file.
fn socket_file_mode_owner(addr: &Addr, path: &Path, options: &BindOptions) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    if options.mode.is_none() && options.owner.is_none() {
        return Ok(());
    }
    let what = if options.mode.is_some() { "--socket-mode" } else { "--socket-owner" };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("{what} on {addr}: {e}"))?;
    let is_socket = file.metadata().is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return Err(format!("{what} on {addr}: {} is no longer the socket just bound", path.display()));
    }
    if let Some(mode) = options.mode {
        use std::os::unix::fs::PermissionsExt;
        // fchmod refuses an O_PATH descriptor; its /proc link names the
        // same file, whatever the path now holds.
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        let mode = std::fs::Permissions::from_mode(mode);
        match std::fs::set_permissions(link, mode.clone()) {
            // No /proc (a chroot, a container without it): by name, as the
            // file was checked to be the socket just now.
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::set_permissions(path, mode),
            other => other,
        }
        .map_err(|e| format!("--socket-mode on {addr}: {e}"))?;
    }
    if let Some((uid, gid)) = options.owner {
        let id = |v: Option<u32>| v.unwrap_or(u32::MAX);
        let r =
            unsafe { libc::fchownat(file.as_raw_fd(), c"".as_ptr(), id(uid), id(gid), libc::AT_EMPTY_PATH) };
        if r != 0 {
            return Err(format!("--socket-owner on {addr}: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn bind_error(addr: &Addr, e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!("cannot bind {addr}: address already in use"),
        Some(libc::EACCES) => format!("cannot bind {addr}: permission denied"),
        Some(libc::EADDRNOTAVAIL) => format!("cannot bind {addr}: address not available on this host"),
        Some(libc::ENOENT) => match addr {
            Addr::Unix(p) => format!(
                "cannot bind {addr}: no directory {}",
                p.parent().map_or_else(|| ".".into(), |d| d.display().to_string())
            ),
            _ => format!("cannot bind {addr}: {e}"),
        },
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
    // Only a refused connection proves that nothing listens there: any
    // other failure (no permission to connect, say) leaves the file alone.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!("cannot bind unix:{}: address already in use", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display())),
        Err(e) => Err(format!(
            "cannot bind unix:{}: a socket file is there and whether a server listens on it cannot be \
             checked ({e}); remove it if none does",
            path.display()
        )),
    }
}

/// Moves a new connection's descriptor above standard input, output and
/// error when it got one of their numbers (the app closed fd 1, say), and
/// puts a stream back there: the error log for output and error, so that
/// what the app, a C library or faulthandler writes there still reaches
/// the log, /dev/null for input; never a client. Negative and higher
/// descriptors are returned as they are.
pub(crate) fn off_stdio(fd: RawFd) -> RawFd {
    if !(0..=2).contains(&fd) {
        return fd;
    }
    let moved = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if moved < 0 {
        return fd;
    }
    // dup2 over the connection's old number, which then is the stream and,
    // as a standard stream should be, inherited by programs.
    let log = if fd == 0 { None } else { crate::logfile::raw_fd() };
    let (in_place, what) = match log {
        Some(log) if unsafe { libc::dup2(log, fd) } == fd => (true, "the error log is in its place"),
        _ => {
            let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            let done = null >= 0 && unsafe { libc::dup2(null, fd) } == fd;
            if null >= 0 {
                unsafe { libc::close(null) };
            }
            (done, "/dev/null is in its place again")
        }
    };
    if !in_place {
        // Closed, at least: a write there then fails rather than reach a client.
        unsafe { libc::close(fd) };
    }
    // Once per descriptor: the app may close all three.
    static WARNED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    if WARNED.fetch_or(1 << fd, std::sync::atomic::Ordering::Relaxed) & (1 << fd) == 0 {
        let now = match in_place {
            true => what,
            false => "it stays closed (/dev/null could not be opened)",
        };
        tracing::warn!(
            "The app closed descriptor {fd} (standard {}); {now}, and connections are kept off it, so that \
             nothing written there reaches a client: pid={}",
            ["input", "output", "error"][fd as usize],
            std::process::id()
        );
    }
    moved
}

/// The accept queue of a unix listening socket, which the kernel reports
/// only through sock_diag (`ss -lx` reads it there): UNIX_DIAG_RQLEN of the
/// socket with this one's inode.
fn unix_queued(fd: RawFd) -> Option<u32> {
    use std::os::fd::FromRawFd;
    // <linux/sock_diag.h> and <linux/unix_diag.h>.
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_RQLEN: u16 = 4;
    #[repr(C)]
    struct Request {
        header: libc::nlmsghdr,
        family: u8,
        protocol: u8,
        pad: u16,
        states: u32,
        ino: u32,
        show: u32,
        cookie: [u32; 2],
    }
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let nl = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
    };
    if nl < 0 {
        return None;
    }
    let nl = unsafe { OwnedFd::from_raw_fd(nl) };
    let req = Request {
        header: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: libc::AF_UNIX as u8,
        protocol: 0,
        pad: 0,
        states: u32::MAX,
        ino: st.st_ino as u32,
        show: UDIAG_SHOW_RQLEN,
        // Any socket of that inode: no cookie to match.
        cookie: [u32::MAX, u32::MAX],
    };
    let sent = unsafe {
        libc::send(nl.as_raw_fd(), (&req as *const Request).cast(), std::mem::size_of::<Request>(), 0)
    };
    if sent < 0 {
        return None;
    }
    let mut buf = [0u8; 1024];
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let reply = buf.get(..usize::try_from(n).ok()?)?;
    // nlmsghdr (16 bytes), unix_diag_msg (16), then attributes.
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let mut at = 32;
    while let Some(attr) = reply.get(at..at + 4) {
        let len = usize::from(u16::from_ne_bytes([attr[0], attr[1]]));
        let kind = u16::from_ne_bytes([attr[2], attr[3]]);
        if len < 4 {
            return None;
        }
        if kind == UNIX_DIAG_RQLEN {
            // struct unix_diag_rqlen: for a listener, the connections queued.
            return Some(u32::from_ne_bytes(reply.get(at + 4..at + 8)?.try_into().ok()?));
        }
        at += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_address_that_cannot_resolve_says_how_to_write_one() {
        use super::{check_resolves, Addr};
        assert!(check_resolves(&Addr::Tcp("127.0.0.1".into(), 0)).is_ok());
        let scheme = check_resolves(&Addr::Tcp("http://127.0.0.1".into(), 9000)).unwrap_err();
        assert!(scheme.ends_with("(an address is HOST:PORT, without a scheme)"), "{scheme}");
        let bare = check_resolves(&Addr::Tcp(":".into(), 1)).unwrap_err();
        assert!(bare.contains("brackets"), "{bare}");
    }

    #[test]
    fn a_unix_listeners_accept_queue_is_counted() {
        let path = std::env::temp_dir().join(format!("corral-queue-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(super::unix_queued(listener.as_raw_fd()), Some(0));
        let clients: Vec<_> =
            (0..3).map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap()).collect();
        assert_eq!(super::unix_queued(listener.as_raw_fd()), Some(3));
        drop(listener.accept().unwrap());
        assert_eq!(super::unix_queued(listener.as_raw_fd()), Some(2));
        drop(clients);
        let _ = std::fs::remove_file(&path);
    }
    use super::*;

    #[test]
    fn a_held_socket_is_matched_by_its_address() {
        let tcp = |h: &str, p| Addr::Tcp(h.into(), p);
        let cases: &[(&str, Addr, bool)] = &[
            ("127.0.0.1:8000", tcp("127.0.0.1", 8000), true),
            ("127.0.0.1:8000", tcp("127.0.0.1", 8001), false),
            ("127.0.0.1:8000", tcp("0.0.0.0", 8000), false),
            ("0.0.0.0:8000", tcp("0.0.0.0", 8000), true),
            ("[::1]:8000", tcp("::1", 8000), true),
            ("[::1]:8000", tcp("127.0.0.1", 8000), false),
            // Port 0: the port the previous program was given.
            ("127.0.0.1:41234", tcp("127.0.0.1", 0), true),
            ("[::1]:41234", tcp("127.0.0.1", 0), false),
            ("unix:/run/a.sock", Addr::Unix("/run/a.sock".into()), true),
            ("unix:/run/a.sock", Addr::Unix("/run/b.sock".into()), false),
            ("fd://3", Addr::Fd(3), true),
            ("fd://3", Addr::Fd(4), false),
            ("unix:/run/a.sock", tcp("127.0.0.1", 8000), false),
        ];
        for (held, wanted, same) in cases {
            assert_eq!(holds(held, wanted), *same, "{held} for {wanted}");
        }
    }

    #[test]
    fn parse_addrs() {
        assert_eq!(Addr::parse("127.0.0.1:80"), Ok(Addr::Tcp("127.0.0.1".into(), 80)));
        assert_eq!(Addr::parse("[::1]:8000"), Ok(Addr::Tcp("::1".into(), 8000)));
        assert_eq!(Addr::parse("127.0.0.1"), Ok(Addr::Tcp("127.0.0.1".into(), 8000)));
        assert_eq!(Addr::parse("localhost"), Ok(Addr::Tcp("localhost".into(), 8000)));
        assert_eq!(Addr::parse("[::1]"), Ok(Addr::Tcp("::1".into(), 8000)));
        assert!(Addr::parse("/run/app.sock").is_err());
        assert!(Addr::parse("").is_err());
        assert!(Addr::parse("3031").unwrap_err().contains("a port alone is written 127.0.0.1:3031"));
        assert_eq!(Addr::parse(":8000"), Ok(Addr::Tcp("0.0.0.0".into(), 8000)));
        assert_eq!(Addr::parse("unix:/tmp/x.sock"), Ok(Addr::Unix("/tmp/x.sock".into())));
        assert!(Addr::parse("unix:@abstract").is_err());
        assert!(Addr::parse("h:99999").is_err());
        assert_eq!(Addr::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(Addr::parse("fd://3"), Ok(Addr::Fd(3)));
        assert!(Addr::parse("fd://x").is_err());
        assert!(Addr::parse("fd://-1").is_err());
        assert_eq!(Addr::parse("tcp://127.0.0.1:80"), Ok(Addr::Tcp("127.0.0.1".into(), 80)));
        assert_eq!(Addr::parse("tcp://[::1]:80"), Ok(Addr::Tcp("::1".into(), 80)));
        assert!(Addr::parse("tcp://unix:/x").is_err());
    }

    fn temp_socket_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("corral-listen-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_stale_socket_file_is_replaced_and_a_live_one_is_not() {
        let path = temp_socket_path("stale");
        let addr = Addr::Unix(path.clone());
        // A socket file nothing listens on (its listener closed without removing it).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = Listener::bind(&addr, 16).unwrap();
        let second = Listener::bind(&addr, 16).unwrap_err();
        assert!(second.contains("address already in use"), "{second}");
        drop(live);
        assert!(!path.exists(), "the socket file is removed with its listener");
    }

    #[test]
    fn at_exit_only_the_socket_file_this_listener_bound_is_removed() {
        let path = temp_socket_path("inode");
        let addr = Addr::Unix(path.clone());
        let first = Listener::bind(&addr, 16).unwrap();
        // Someone removes the file and another server binds the same path.
        std::fs::remove_file(&path).unwrap();
        let second = Listener::bind(&addr, 16).unwrap();
        drop(first);
        assert!(path.exists(), "the other server's socket file was removed");
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn bind_port_zero_reports_real_port() {
        let l = Listener::bind(&Addr::parse("127.0.0.1:0").unwrap(), 16).unwrap();
        assert_ne!(l.server_port, "0");
        let again = Listener::bind(&l.addr, 16).unwrap_err();
        assert!(again.contains("already in use"), "{again}");
    }

    #[test]
    fn inherit_a_listening_descriptor() {
        let l = Listener::bind(&Addr::parse("127.0.0.1:0").unwrap(), 16).unwrap();
        let fd = unsafe { libc::dup(l.raw()) };
        let inherited =
            Listener::bind_with(&Addr::Fd(fd), Protocol::Uwsgi, 16, BindOptions::default()).unwrap();
        assert_eq!(inherited.server_port, l.server_port);
        assert!(inherited.url().starts_with("uwsgi://127.0.0.1:"), "{}", inherited.url());
        assert!(!inherited.is_public());
    }

    #[test]
    fn a_closed_queue_takes_no_new_connection_but_keeps_the_queued_ones() {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::time::Duration;
        let l = Listener::bind(&Addr::parse("127.0.0.1:0").unwrap(), 16).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", l.server_port).parse().unwrap();
        let mut queued = TcpStream::connect(addr).unwrap();
        queued.write_all(b"before").unwrap();
        assert!(l.close_queue().unwrap());
        // The SYN is dropped: no answer, so the connect times out (the
        // client would retry a second later) instead of being queued.
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert_eq!(late.unwrap_err().kind(), io::ErrorKind::TimedOut);
        let sock = socket2::SockRef::from(&l.fd);
        sock.set_nonblocking(false).unwrap();
        let (accepted, _) = sock.accept().unwrap();
        let mut accepted: TcpStream = accepted.into();
        let mut got = [0u8; 6];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"before");
        // Data both ways still flows on it (segments with ACK set pass).
        accepted.write_all(b"after").unwrap();
        queued.read_exact(&mut got[..5]).unwrap();
        assert_eq!(&got[..5], b"after");
        sock.set_nonblocking(true).unwrap();
        assert!(sock.accept().is_err(), "nothing else was queued");
        let path = std::env::temp_dir().join(format!("corral-queue-{}.sock", std::process::id()));
        let unix = Listener::bind(&Addr::Unix(path.clone()), 4).unwrap();
        let attached = unix.close_queue().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(!attached, "a unix socket has no SYN to drop");
    }

    #[test]
    fn not_listening_descriptor_is_refused() {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let fd = sock.as_raw_fd();
        let err = Listener::bind(&Addr::Fd(fd), 16).unwrap_err();
        assert!(err.contains("not listening"), "{err}");
        let err = Listener::bind(&Addr::Fd(9999), 16).unwrap_err();
        assert!(err.contains("not a socket"), "{err}");
    }
}
