//! The Python stack of another thread, read without the GIL.
//!
//! A request stuck past `--timeout` may be stuck holding the GIL (in C
//! code), so the stack is read the way `faulthandler` reads it from a signal
//! handler: CPython's `_Py_DumpTraceback`, which walks one thread's frames
//! without taking locks. Only the stuck thread's: its frames hold still
//! while it is stuck, where another serving thread's change under the
//! reader as it serves (walking every thread, as `_Py_DumpTracebackThreads`
//! does, crashed a worker about once in twenty timeouts under load). The
//! function is looked up at run time, so an interpreter without it only
//! loses this log detail.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};

type DumpOne = unsafe extern "C" fn(fd: libc::c_int, tstate: *mut libc::c_void);

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
    unsafe { dump(file.as_raw_fd(), tstate) };
    file.seek(SeekFrom::Start(0)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    (!text.trim().is_empty()).then_some(text)
}
