//! `--daemon`: the program that started a detached master waits, on a pipe,
//! until the master says its workers are ready (or dies), so that an init
//! script's exit status means what it says. This module is the master's
//! end of that pipe; the fork itself happens in the embedding, which knows
//! the interpreter's fork hooks.

use std::sync::atomic::{AtomicI32, Ordering};

/// The pipe's write end; -1 when there is no one waiting.
static READY_FD: AtomicI32 = AtomicI32::new(-1);

/// Remembers the pipe to tell readiness on.
pub fn set_ready_fd(fd: i32) {
    READY_FD.store(fd, Ordering::Relaxed);
}

/// Tells the waiting program that the master is ready, once.
pub fn ready() {
    let fd = READY_FD.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        unsafe {
            libc::write(fd, b"1".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

/// In a worker: drops its copy of the pipe, so the waiting program sees the
/// pipe close when the master dies before it is ready, not when the last
/// worker does.
pub fn forget() {
    let fd = READY_FD.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        unsafe { libc::close(fd) };
    }
}
