//! Where the error log goes: stderr, or a file that SIGUSR1 reopens (so
//! logrotate can rename it away), shared by the master and its workers;
//! with `--capture-output`, the file is also every process's standard
//! output and error, so the app's prints land in it.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::nowait::Target;

static ERROR_LOG: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);
/// What writes to the error log file lost (a full disk), said once they go through again.
static ERROR_LOG_LOSSES: Mutex<crate::nowait::Losses> = Mutex::new(crate::nowait::Losses::new());

/// A copy of standard error, for the log that goes there: an app that
/// closes descriptors 0-2 (a daemonizing library does) leaves number 2 to
/// the next connection accepted, and log lines written to it would go to
/// that client.
/// Written without waiting long for a stalled reader (see [`crate::nowait`]).
static STDERR_COPY: Mutex<Option<Target>> = Mutex::new(None);
static JSON: AtomicBool = AtomicBool::new(false);
static CAPTURE: AtomicBool = AtomicBool::new(false);

/// `--capture-output`: the error log file becomes standard output and error
/// (now, and again at each reopen). Call before [`set_error_log`].
pub fn set_capture(on: bool) {
    CAPTURE.store(on, Ordering::Relaxed);
}

/// Points descriptors 1 and 2 at the log file again, when output is
/// captured (after something else took them, as `--daemon`'s /dev/null).
pub fn capture_again() -> Result<(), String> {
    let guard = ERROR_LOG.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some((_, file)) => capture(file).map_err(|e| format!("--capture-output: {e}")),
        None => Ok(()),
    }
}

/// Points descriptors 1 and 2 at the log file when output is captured.
fn capture(file: &File) -> std::io::Result<()> {
    if CAPTURE.load(Ordering::Relaxed) {
        for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Sends the error log to `target`: `-` for stderr, otherwise a file opened
/// for appending.
pub fn set_error_log(target: &str) -> Result<(), String> {
    if target == "-" {
        *ERROR_LOG.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Close-on-exec: programs the app runs have their own standard error.
        let fd = unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
        *STDERR_COPY.lock().unwrap_or_else(|p| p.into_inner()) =
            (fd >= 0).then(|| Target::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }));
        return Ok(());
    }
    let path = PathBuf::from(target);
    let file = open(&path).map_err(|e| format!("--error-log {target}: {e}"))?;
    capture(&file).map_err(|e| format!("--capture-output: {e}"))?;
    *ERROR_LOG.lock().unwrap_or_else(|p| p.into_inner()) = Some((path, file));
    Ok(())
}

/// Error-log lines dropped and not yet said to be, for a process about to
/// exit to hand on (see [`Target::take_dropped`]).
pub fn take_dropped() -> u64 {
    STDERR_COPY.lock().unwrap_or_else(|p| p.into_inner()).as_mut().map_or(0, Target::take_dropped)
}

/// Whether log lines are JSON objects (`--log-format json`).
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Opens the error log file again under its name; `Ok(false)` when the log
/// goes to stderr. The descriptor number stays the same, so a process that
/// forked after opening it writes to the new file as well.
pub fn reopen() -> Result<bool, String> {
    let mut guard = ERROR_LOG.lock().unwrap_or_else(|p| p.into_inner());
    let Some((path, file)) = guard.as_mut() else {
        return Ok(false);
    };
    let fresh = open(path).map_err(|e| format!("reopening the error log {}: {e}", path.display()))?;
    // dup3, not dup2: dup2 clears close-on-exec, and a re-exec of the master
    // would then take the old file along, once more after every rotation.
    if unsafe { libc::dup3(fresh.as_raw_fd(), file.as_raw_fd(), libc::O_CLOEXEC) } < 0 {
        *file = fresh;
    }
    capture(file).map_err(|e| format!("--capture-output: {e}"))?;
    Ok(true)
}

/// In a worker just forked: the master's error log losses not said yet are
/// the master's to say, not each worker's too.
pub fn forget_losses() {
    ERROR_LOG_LOSSES.lock().unwrap_or_else(|p| p.into_inner()).forget();
}

/// Logs `message` as an error, and when the error log is a file, writes it
/// to standard error too: a failure to reopen the log after it was rotated
/// or its directory removed would otherwise go only to the old file, which
/// nobody reads any more.
pub fn error_also_to_stderr(message: &str) {
    tracing::error!("{message}");
    if ERROR_LOG.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
        return;
    }
    write_stderr(crate::nowait::log_line("ERROR", message).as_bytes());
}

/// Whether a line can be written without waiting: false in a forked child
/// when another thread of the parent held the log at the fork (that thread
/// does not exist in the child, so waiting would be for ever).
pub fn free() -> bool {
    ERROR_LOG.try_lock().is_ok()
}

/// The descriptor the error log is written to: for what writes there on its
/// own, such as Python's faulthandler on a crash. Its number stays the same
/// when the file is reopened.
pub fn raw_fd() -> Option<std::os::fd::RawFd> {
    if let Some((_, file)) = ERROR_LOG.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return Some(file.as_raw_fd());
    }
    // The descriptor that waits for its reader: a crash's traceback must
    // not be dropped for a pipe that is full at that moment.
    STDERR_COPY.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|f| f.blocking_fd())
}

/// Writes whole lines to the error log (one write, so lines from several
/// processes never interleave).
pub fn write(data: &[u8]) {
    let mut guard = ERROR_LOG.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_mut() {
        Some((_, file)) => {
            // Nowhere to say it failed but in the next line that goes through.
            let _ = ERROR_LOG_LOSSES.lock().unwrap_or_else(|p| p.into_inner()).write(file, data);
        }
        None => write_stderr(data),
    }
}

/// Writes to standard error, through this process's own copy of it if it
/// has one (see `STDERR_COPY`).
fn write_stderr(data: &[u8]) {
    match STDERR_COPY.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        Some(copy) => {
            let _ = copy.write(data);
        }
        None => {
            let _ = std::io::stderr().write_all(data);
        }
    }
}

fn open(path: &PathBuf) -> std::io::Result<File> {
    open_append(path)
}

/// Set in a master started as root that will run as `--user`: it opens the
/// log files, which that user may write the directory of (to reopen them
/// after logrotate), so a link there could point anywhere. Such a master
/// opens a log file only under its own name, and gives the user only a file
/// it created itself.
static NO_FOLLOW: AtomicBool = AtomicBool::new(false);

/// Log files this process created at its start while [`NO_FOLLOW`] was
/// set, kept open for [`take_created`] until [`forget_created`].
static CREATED: Mutex<Vec<(PathBuf, File)>> = Mutex::new(Vec::new());
/// Whether [`CREATED`] still takes files: only until the start has given
/// them to the user (a reopen after logrotate would keep each new file open
/// in it, and the rotated ones with them).
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Why a log path that is a symbolic link is refused under [`NO_FOLLOW`].
pub const LINK_REFUSED: &str = "it is a symbolic link, which corral started as root with --user does not follow \
     for a log file (whoever may write its directory could point it at any file); give the file's own path (for \
     standard output or error, `-`)";

/// See [`NO_FOLLOW`]; call before any log file is opened.
pub fn set_no_follow(on: bool) {
    NO_FOLLOW.store(on, Ordering::Relaxed);
    RECORDING.store(on, Ordering::Relaxed);
}

/// Closes the copies [`take_created`] did not take, and records no more.
pub fn forget_created() {
    RECORDING.store(false, Ordering::Relaxed);
    CREATED.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// The log file at `path` if this process created it (under [`NO_FOLLOW`]),
/// to give to the user the workers run as by its descriptor: a name may
/// have been replaced by a link since.
pub fn take_created(path: &str) -> Option<File> {
    let mut created = CREATED.lock().unwrap_or_else(|p| p.into_inner());
    let i = created.iter().position(|(p, _)| p.as_os_str() == path)?;
    Some(created.swap_remove(i).1)
}

/// Opens a log file for appending, creating it if needed (the error log
/// and the access log alike).
pub fn open_append(path: &PathBuf) -> std::io::Result<File> {
    use std::os::unix::fs::FileTypeExt;
    open_append_waiting(path).and_then(blocking_again).map_err(|e| {
        let kind = std::fs::metadata(path).map(|m| m.file_type());
        match (e.raw_os_error(), kind) {
            (Some(libc::ENXIO), Ok(kind)) if kind.is_fifo() => std::io::Error::other(
                "it is a named pipe (FIFO) that no process reads: start its reader first (an open for writing \
                 would wait for one, deaf to TERM)",
            ),
            (Some(libc::ENXIO), Ok(kind)) if kind.is_socket() => std::io::Error::other(format!(
                "{e}: it is a socket, which cannot be opened by its name (standard output given to systemd's \
                 journal, say); for standard output give `-`"
            )),
            _ => e,
        }
    })
}

/// The open of [`open_append`], with O_NONBLOCK: a named pipe with no
/// reader fails (ENXIO) rather than wait for one.
fn open_append_waiting(path: &PathBuf) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !NO_FOLLOW.load(Ordering::Relaxed) {
        return std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
    }
    let refuse_link = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) => std::io::Error::other(LINK_REFUSED),
        _ => e,
    };
    // Whether this open created it, without a race: an existing file is
    // the user's to make writable (see the CLI), a new one is given to them.
    for _ in 0..3 {
        match std::fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => {
                if RECORDING.load(Ordering::Relaxed) {
                    if let Ok(copy) = file.try_clone() {
                        CREATED.lock().unwrap_or_else(|p| p.into_inner()).push((path.clone(), copy));
                    }
                }
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(refuse_link(e)),
        }
        match std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => return Ok(file),
            // Removed in between: create it after all.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(refuse_link(e)),
        }
    }
    Err(std::io::Error::other("it keeps appearing and disappearing"))
}

/// Writes to the file wait again as they did (O_NONBLOCK was for the open).
fn blocking_again(file: File) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}
