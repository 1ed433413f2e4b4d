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
    /// A pipe that could not be reopened (it belongs to another user, as
    /// after --user): each piece of at most PIPE_BUF bytes is written once
    /// poll says there is room, which a piece that size always fits.
    PolledPipe,
    /// A socket: each send with MSG_DONTWAIT.
    Socket,
}

/// The most a pipe takes in one piece, all or nothing (POSIX's PIPE_BUF).
const PIPE_BUF: usize = 4096;

/// A log destination and what it dropped while its reader stalled.
pub struct Target {
    file: File,
    /// The descriptor given, when `file` is a description of our own: for
    /// what must wait, however long (a crash's traceback).
    given: Option<File>,
    way: Way,
    stalled: bool,
    /// What was written last ended inside a line: the next write ends it.
    cut: bool,
    dropped: u64,
    /// For a file: what a failing write (a full disk) lost.
    lost: Losses,
}

/// Lines a log file lost to failing writes (a full disk), and whether the
/// last one was cut: the next write that goes through ends the cut line,
/// then says how many were lost and why.
#[derive(Default)]
pub struct Losses {
    cut: bool,
    lines: u64,
    why: String,
}

impl Losses {
    pub const fn new() -> Losses {
        Losses { cut: false, lines: 0, why: String::new() }
    }

    /// Leaves the count of lost lines to another process to say (see
    /// [`crate::logfile::forget_losses`]).
    pub fn forget(&mut self) {
        self.lines = 0;
    }

    /// Writes `data` (whole lines) to `file`; on an error, counts the lines
    /// it did not write whole and returns the error.
    pub fn write(&mut self, file: &mut File, data: &[u8]) -> io::Result<()> {
        let count = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count().max(1) as u64;
        if self.cut {
            if let Err(e) = file.write_all(b"\n") {
                self.lines += count(data);
                return Err(e);
            }
            self.cut = false;
        }
        let mut written = 0;
        while written < data.len() {
            match file.write(&data[written..]) {
                Ok(0) => return Err(self.lose(data, written, io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lose(data, written, e)),
            }
        }
        if self.lines > 0 {
            let note = note_line(&format!("{} log line(s) lost: {}", self.lines, self.why));
            if file.write_all(note.as_bytes()).is_ok() {
                self.lines = 0;
            }
        }
        Ok(())
    }

    fn lose(&mut self, data: &[u8], written: usize, e: io::Error) -> io::Error {
        // The line cut short counts as lost, with those after it.
        let from = data[..written].iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
        self.lines += data[from..].iter().filter(|&&c| c == b'\n').count().max(1) as u64;
        self.cut |= written > from;
        self.why = e.to_string();
        e
    }
}

/// A warning line like the log's others, saying which process wrote it.
fn note_line(message: &str) -> String {
    log_line("WARNING", message)
}

/// A line at `level` like the log's others, saying which process wrote it.
pub(crate) fn log_line(level: &str, message: &str) -> String {
    let pid = std::process::id();
    if crate::logfile::json() {
        format!(
            "{{\"time\":\"{}\",\"level\":\"{level}\",\"pid\":{pid},\"message\":{}}}\n",
            crate::access::iso_time(),
            crate::access::json_string(message)
        )
    } else {
        let ((y, mo, d, h, mi, sec), off) = crate::date::local(crate::date::now_secs());
        format!("[{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{sec:02} {off}] [{pid}] [{level}] {message}\n")
    }
}

impl Target {
    /// Takes `file` (a descriptor of its own, close-on-exec) as a log.
    pub fn new(file: File) -> Target {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let kind = match unsafe { libc::fstat(file.as_raw_fd(), &mut st) } {
            0 => st.st_mode & libc::S_IFMT,
            _ => 0,
        };
        let (file, given, way) = match kind {
            libc::S_IFSOCK => (file, None, Way::Socket),
            libc::S_IFIFO => match reopen_nonblocking(&file) {
                Some(own) => (own, Some(file), Way::Pipe),
                None => (file, None, Way::PolledPipe),
            },
            _ => (file, None, Way::Blocking),
        };
        Target { file, given, way, stalled: false, cut: false, dropped: 0, lost: Losses::new() }
    }

    /// Lines dropped and not yet said to be (see [`Target::write`]), for a
    /// process about to exit to hand on; counted from 0 again.
    pub fn take_dropped(&mut self) -> u64 {
        self.stalled = false;
        std::mem::take(&mut self.dropped)
    }

    /// The descriptor to write to.
    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The descriptor given, which waits for its reader: for a last word
    /// that must not be dropped.
    pub fn blocking_fd(&self) -> i32 {
        self.given.as_ref().unwrap_or(&self.file).as_raw_fd()
    }

    /// Whether writes wait for the reader as on a file: reopening the log
    /// may then keep the descriptor number (dup3 over it).
    pub fn is_blocking(&self) -> bool {
        self.way == Way::Blocking
    }

    /// Writes `data` (whole lines), waiting for a stalled reader at most
    /// [`STALL_WAIT`]; what it does not take is dropped. Errors other than
    /// a full pipe or socket are returned.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.way == Way::Blocking {
            return self.lost.write(&mut self.file, data);
        }
        let deadline = Instant::now() + if self.stalled { Duration::ZERO } else { STALL_WAIT };
        let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count().max(1) as u64;
        // A line cut short before is ended first, or nothing after it is written.
        if self.cut && !self.write_piece(b"\n", deadline)? {
            self.dropped += lines(data);
            return Ok(());
        }
        self.cut = false;
        let mut rest = data;
        while !rest.is_empty() {
            // Whole lines up to PIPE_BUF go in one piece, which a pipe takes
            // all or nothing, so lines from several processes never mix; a
            // longer line goes in PIPE_BUF pieces.
            let n = match rest[..rest.len().min(PIPE_BUF)].iter().rposition(|&b| b == b'\n') {
                Some(i) if rest.len() > PIPE_BUF => i + 1,
                _ => rest.len().min(PIPE_BUF),
            };
            if !self.write_piece(&rest[..n], deadline)? {
                self.stalled = true;
                self.dropped += lines(rest);
                // Part of a line already went out: it is ended before anything else.
                let written = data.len() - rest.len();
                self.cut |= written > 0 && data[written - 1] != b'\n';
                return Ok(());
            }
            rest = &rest[n..];
        }
        if self.stalled {
            let message = format!(
                "{} log line(s) dropped: the log's reader took nothing for {} s",
                self.dropped,
                STALL_WAIT.as_secs()
            );
            let note = note_line(&message);
            // The count stays until the note is out.
            if self.write_piece(note.as_bytes(), Instant::now())? {
                self.stalled = false;
                self.dropped = 0;
            }
        }
        Ok(())
    }

    /// Writes one piece whole (a pipe piece is at most PIPE_BUF); false when
    /// the reader did not make room for it by `deadline`.
    fn write_piece(&mut self, piece: &[u8], deadline: Instant) -> io::Result<bool> {
        let mut rest = piece;
        while !rest.is_empty() {
            if self.way == Way::PolledPipe && !self.wait_writable(deadline) {
                return Ok(false);
            }
            match self.send(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait_writable(deadline) {
                        if rest.len() < piece.len() {
                            // A socket took part of it: the line is cut.
                            self.cut = true;
                        }
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
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

    /// Whether there is room by `deadline` (now, when it has passed).
    fn wait_writable(&self, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
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
    fn a_file_that_fails_writes_counts_the_lost_lines_and_says_so_once_it_takes_them_again() {
        let mut losses = Losses::default();
        let mut full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        assert!(losses.write(&mut full, b"one\ntwo\n").is_err());
        assert_eq!((losses.lines, losses.cut), (2, false));
        // A write that went out in part: the line it cut is lost, and ended later.
        losses.lose(b"three\nfour\n", 8, io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!((losses.lines, losses.cut), (3, true));
        let path = std::env::temp_dir().join(format!("corral-losses-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        losses.write(&mut file, b"five\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(text.starts_with("\nfive\n["), "{text}");
        assert!(
            text.ends_with("[WARNING] 3 log line(s) lost: No space left on device (os error 28)\n"),
            "{text}"
        );
        assert_eq!((losses.lines, losses.cut), (0, false));
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
        assert!(text.starts_with("after\n["), "{text}");
        assert!(text.contains("[WARNING] ") && text.contains(" log line(s) dropped"), "{text}");
    }

    #[test]
    fn a_line_cut_by_a_stall_is_ended_before_the_next_one() {
        let (mut reader, writer) = pipe();
        let mut log = Target::new(writer);
        let short = [b's'; 99].iter().copied().chain([b'\n']).collect::<Vec<u8>>();
        while !log.stalled {
            log.write(&short).unwrap();
        }
        // Room for one piece: the first PIPE_BUF bytes of a long line go, the rest cannot.
        let mut buf = vec![0; PIPE_BUF];
        reader.read_exact(&mut buf).unwrap();
        let long = [b'y'; 10_000].iter().copied().chain([b'\n']).collect::<Vec<u8>>();
        log.write(&long).unwrap();
        assert!(log.cut);
        let mut all = Vec::new();
        let mut chunk = vec![0; 1 << 20];
        loop {
            let n = reader.read(&mut chunk).unwrap();
            all.extend_from_slice(&chunk[..n]);
            if n < chunk.len() && all.ends_with(&[b'y'; PIPE_BUF]) {
                break;
            }
        }
        log.write(b"after\n").unwrap();
        let n = reader.read(&mut chunk).unwrap();
        let text = String::from_utf8_lossy(&chunk[..n]).into_owned();
        assert!(text.starts_with("\nafter\n[") && text.contains(" log line(s) dropped"), "{text:?}");
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
