//! The Python stack of another thread, read without the GIL.
//!
//! A request stuck past `--timeout` may be stuck holding the GIL (in C
//! code), so the stack is read the way `faulthandler` reads it from a signal
//! handler: CPython's `_Py_DumpTraceback`, which walks one thread's frames
//! without taking locks. The stuck thread may still be running Python (a
//! loop that never ends), pushing and popping frames under a reader, so the
//! walk happens in a copy of the process taken at one instant: a child made
//! with a bare `clone` (no fork handlers, which could wait on a lock the
//! stuck thread holds), which only walks the frames into a memfd and exits.
//! A walk that meets a half-made frame crashes the child, not the worker,
//! and the log then goes without the stack. The function is looked up at run
//! time, so an interpreter without it only loses this log detail.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

type DumpOne = unsafe extern "C" fn(fd: libc::c_int, tstate: *mut libc::c_void);

/// How long the child that reads a stack may take before it is killed.
const DUMP_WAIT: Duration = Duration::from_secs(2);

/// The stack of the Python thread whose thread state is `tstate`, most
/// recent call first, as Python's faulthandler prints it.
pub fn thread_stack(tstate: *mut libc::c_void) -> Option<String> {
    if tstate.is_null() {
        return None;
    }
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_Py_DumpTraceback".as_ptr()) };
    if sym.is_null() {
        return None;
    }
    let dump: DumpOne = unsafe { std::mem::transmute(sym) };
    let fd = unsafe { libc::memfd_create(c"corral-traceback".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    // A fork without glibc's fork handlers: the child runs nothing but the
    // walk (which writes with write(2) and allocates nothing) and _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
    if pid < 0 {
        return None;
    }
    if pid == 0 {
        unsafe {
            dump(file.as_raw_fd(), tstate);
            libc::_exit(0);
        }
    }
    let pid = pid as libc::pid_t;
    let deadline = Instant::now() + DUMP_WAIT;
    loop {
        let mut status = 0;
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            0 => {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return None;
            }
            // Reaped, or by nobody (an app that set SIGCHLD to SIG_IGN).
            _ => break,
        }
    }
    file.seek(SeekFrom::Start(0)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    (!text.trim().is_empty()).then_some(text)
}
