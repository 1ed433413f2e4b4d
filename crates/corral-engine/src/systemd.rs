//! The two systemd protocols a service manager speaks to corral with:
//! socket activation (listening sockets handed over as descriptors 3 and up,
//! described by `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`) and
//! readiness notification (datagrams such as `READY=1` to `NOTIFY_SOCKET`).
//! Both work without systemd itself: anything that sets those variables the
//! same way gets the same behaviour.

use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;

/// The first descriptor systemd passes.
pub const LISTEN_FDS_START: RawFd = 3;

/// Descriptors passed by socket activation, with their names
/// (`FileDescriptorName=` in the socket unit), or none when the variables
/// are absent or meant for another process. The variables are removed so
/// that processes the app starts do not take the sockets for theirs.
pub fn take_listen_fds() -> Vec<(RawFd, Option<String>)> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    parse_listen_fds(pid.as_deref(), count.as_deref(), names.as_deref(), std::process::id())
}

fn parse_listen_fds(
    pid: Option<&str>,
    count: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Vec<(RawFd, Option<String>)> {
    let (Some(pid), Some(count)) = (pid, count) else {
        return Vec::new();
    };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Vec::new();
    }
    let Ok(n) = count.trim().parse::<RawFd>() else {
        return Vec::new();
    };
    let names: Vec<&str> = names.map(|s| s.split(':').collect()).unwrap_or_default();
    (0..n.max(0))
        .map(|i| {
            let name = names.get(i as usize).filter(|s| !s.is_empty()).map(|s| s.to_string());
            (LISTEN_FDS_START + i, name)
        })
        .collect()
}

/// Sends one notification (`READY=1`, `RELOADING=1`, `STOPPING=1`,
/// `STATUS=...`) when `NOTIFY_SOCKET` names a socket; otherwise does nothing.
pub fn notify(state: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let sent = if let Some(name) = path.strip_prefix('@') {
        // An abstract socket: the name starts with a NUL byte.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::debug!("sd_notify {state:?} to {path}: {e}");
    }
}

/// `RELOADING=1` with the monotonic timestamp newer systemd versions expect.
pub fn notify_reloading() {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds() {
        assert_eq!(
            parse_listen_fds(Some("42"), Some("2"), Some("http:uwsgi"), 42),
            vec![(3, Some("http".to_string())), (4, Some("uwsgi".to_string()))]
        );
        assert_eq!(parse_listen_fds(Some("42"), Some("1"), None, 42), vec![(3, None)]);
        // Meant for another process (the variables leaked through a fork).
        assert!(parse_listen_fds(Some("41"), Some("1"), None, 42).is_empty());
        assert!(parse_listen_fds(None, Some("1"), None, 42).is_empty());
        assert!(parse_listen_fds(Some("42"), Some("x"), None, 42).is_empty());
    }

    #[test]
    fn notify_reaches_the_socket() {
        let dir = std::env::temp_dir().join(format!("corral-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
