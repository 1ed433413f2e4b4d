//! Log writes that never hold the thread that makes them for long.
//!
//! A log read through a pipe (`corral ... | tee`, a container runtime's log
//! collector) or a socket (journald's stream for standard output) blocks its
//! writer once the reader stops reading. A serving thread waiting there
//! serves nothing more; its worker stalls, and so does the replacement the
//! master starts for it, at its first line. So such a log is written without
//! waiting: a pipe through a description of its own, opened again through
//! `/proc/self/fd` with O_NONBLOCK (the shared one, which the shell or other
//! programs may use, is left as it was); a socket with MSG_DONTWAIT. What
//! the reader does not take within [`STALL_WAIT`] is dropped and counted,
//! and once it takes lines again a line says how many were lost. Files and
//! terminals are written as before: they do not stop for a reader.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

/// The longest one write waits for a stalled reader before what is left
/// is dropped. Once a write gave up, the next ones wait not at all until
/// the reader takes lines again.
pub const STALL_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// A file or terminal: written as usual.
    Blocking,
    /// A pipe reopened with O_NONBLOCK.
    Pipe,
    /// A socket: each send with MSG_DONTWAIT.
    Socket,
}

/// A log destination and what it dropped while its reader stalled.
pub struct Target {
    file: File,
    way: Way,
    stalled: bool,
    dropped: u64,
}

impl Target {
    /// Takes `file` (a descriptor of its own, close-on-exec) as a log.
    pub fn new(file: File) -> Target {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let kind = match unsafe { libc::fstat(file.as_raw_fd(), &mut st) } {
            0 => st.st_mode & libc::S_IFMT,
            _ => 0,
        };
        let (file, way) = match kind {
            libc::S_IFSOCK => (file, Way::Socket),
            libc::S_IFIFO => match reopen_nonblocking(&file) {
                Some(own) => (own, Way::Pipe),
                // Kept as it is: blocking, as before.
                None => (file, Way::Blocking),
            },
            _ => (file, Way::Blocking),
        };
        Target { file, way, stalled: false, dropped: 0 }
    }

    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Writes `data` (whole lines), waiting for a stalled reader at most
    /// [`STALL_WAIT`]; what it does not take is dropped. Errors other than
    /// a full pipe or socket are returned.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.way == Way::Blocking {
            return self.file.write_all(data);
        }
        let deadline = Instant::now() + if self.stalled { Duration::ZERO } else { STALL_WAIT };
        let mut rest = data;
        while !rest.is_empty() {
            match self.send(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !self.wait_writable(left) {
                        self.stalled = true;
                        self.dropped += rest.iter().filter(|&&b| b == b'\n').count().max(1) as u64;
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if self.stalled {
            self.stalled = false;
            let note = format!(
                "corral: {} log line(s) dropped: the log's reader took nothing for {} s\n",
                std::mem::take(&mut self.dropped),
                STALL_WAIT.as_secs()
            );
            let _ = self.send(note.as_bytes());
        }
        Ok(())
    }

    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        let n = match self.way {
            Way::Socket => unsafe {
                libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            },
            _ => unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) },
        };
        match n {
            n if n >= 0 => Ok(n as usize),
            _ => Err(io::Error::last_os_error()),
        }
    }

    fn wait_writable(&self, wait: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
        unsafe { libc::poll(&mut pfd, 1, ms) == 1 && pfd.revents & libc::POLLOUT != 0 }
    }
}

/// A description of the pipe `file` writes to, of this process's own, with
/// O_NONBLOCK; `None` where /proc is not mounted or the open is refused.
fn reopen_nonblocking(file: &File) -> Option<File> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_stalled_pipe_drops_lines_and_says_so_once_read_again() {
        let (mut reader, writer) = pipe();
        let mut log = Target::new(writer);
        assert_eq!(log.way, Way::Pipe);
        let line = [b'x'; 1023].iter().copied().chain([b'\n']).collect::<Vec<u8>>();
        // Fill the pipe (64 KiB by default), then some: the writes return.
        let started = Instant::now();
        for _ in 0..200 {
            log.write(&line).unwrap();
        }
        assert!(log.stalled);
        assert!(log.dropped > 0);
        // Only the first write that found it full waited.
        assert!(started.elapsed() < STALL_WAIT * 3);
        let mut buf = vec![0; 1 << 20];
        let mut got = reader.read(&mut buf).unwrap();
        while got % 1024 != 0 {
            got += reader.read(&mut buf[got..]).unwrap();
        }
        log.write(b"after\n").unwrap();
        assert!(!log.stalled);
        let n = reader.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(text.starts_with("after\ncorral: "), "{text}");
        assert!(text.contains("log line(s) dropped"), "{text}");
    }

    #[test]
    fn a_file_is_written_as_before() {
        let path = std::env::temp_dir().join(format!("corral-nowait-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut log = Target::new(file);
        assert_eq!(log.way, Way::Blocking);
        log.write(b"one\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\n");
        let _ = std::fs::remove_file(&path);
    }
}
