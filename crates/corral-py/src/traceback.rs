//! The Python stack of another thread, read without the GIL.
//!
//! A request stuck past `--timeout` may be stuck holding the GIL (in C
//! code), so the stack is read the way `faulthandler` reads it from a signal
//! handler: CPython's `_Py_DumpTracebackThreads`, which walks every thread's
//! frames without taking locks. The function is looked up at run time, so
//! an interpreter without it only loses this log detail.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};

type DumpThreads = unsafe extern "C" fn(
    fd: libc::c_int,
    interp: *mut libc::c_void,
    current: *mut libc::c_void,
) -> *const libc::c_char;

/// The stack of the Python thread whose ident (pthread_self) is `ident`,
/// most recent call first, as Python's faulthandler prints it.
pub fn thread_stack(ident: u64) -> Option<String> {
    let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_Py_DumpTracebackThreads".as_ptr()) };
    if sym.is_null() {
        return None;
    }
    let dump: DumpThreads = unsafe { std::mem::transmute(sym) };
    let fd = unsafe { libc::memfd_create(c"corral-traceback".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    unsafe { dump(file.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
    file.seek(SeekFrom::Start(0)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    pick_thread(&text, ident)
}

/// The block of a faulthandler dump that belongs to thread `ident`.
fn pick_thread(dump: &str, ident: u64) -> Option<String> {
    let wanted = format!("{ident:#018x}");
    let mut out = String::new();
    let mut inside = false;
    for line in dump.lines() {
        let is_header = line.starts_with("Thread 0x") || line.starts_with("Current thread 0x");
        if is_header {
            if inside {
                break;
            }
            inside = line.contains(&wanted);
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn picks_one_thread() {
        let dump = "Thread 0x00007f0000000001 (most recent call first):\n  File \"a.py\", line 1 in f\n\n\
                    Thread 0x00007f0000000002 (most recent call first):\n  File \"b.py\", line 9 in slow\n  \
                    File \"b.py\", line 20 in app\n\n";
        let got = super::pick_thread(dump, 0x7f0000000002).unwrap();
        assert!(got.contains("line 9 in slow") && got.contains("line 20 in app"), "{got}");
        assert!(!got.contains("a.py"));
        assert_eq!(super::pick_thread(dump, 5), None);
    }
}
