//! `--daemon`: the program that started a detached master waits (through
//! the process that forked the master) until the master says, on a pipe,
//! that its workers are ready, or dies, so that an init script's exit
//! status means what it says. This module is the master's
//! end of that pipe; the fork itself happens in the embedding, which knows
//! the interpreter's fork hooks.

use std::sync::atomic::{AtomicI32, Ordering};

/// The pipe's write end; -1 when there is no one waiting.
static READY_FD: AtomicI32 = AtomicI32::new(-1);

/// Names the pipe's descriptor for a master that re-executes itself before
/// it was ready (USR2 early): the new program tells readiness instead, so
/// the waiting program sees the pipe close only when the master is gone.
pub const READY_FD_ENV: &str = "CORRAL_READY_FD";

/// Before the master's execve: the pipe stays open in the new program.
pub fn keep_across_exec() {
    let fd = READY_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        std::env::set_var(READY_FD_ENV, fd.to_string());
    }
}

/// After a failed execve: as before [`keep_across_exec`].
pub fn exec_failed() {
    let fd = READY_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        std::env::remove_var(READY_FD_ENV);
    }
}

/// At start: takes the pipe a previous program of this master passed on.
pub fn inherit() {
    let Some(fd) = std::env::var(READY_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok()) else {
        return;
    };
    std::env::remove_var(READY_FD_ENV);
    if fd > 2 && unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0 {
        set_ready_fd(fd);
    }
}

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
