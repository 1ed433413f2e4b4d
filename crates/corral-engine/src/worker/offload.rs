//! The thread that finishes file downloads a client reads more slowly than
//! they are sent, so that a slow reader never holds a serving thread.

use super::*;

impl Offload {
    /// `serving` is the serving threads' epoll set.
    pub(super) fn new(serving: RawFd) -> io::Result<Offload> {
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
        let wake = eventfd_in(epfd.as_raw_fd(), libc::EPOLLIN, OFFLOAD_WAKE)?;
        // Edge-triggered: each write wakes one pass, which takes one
        // download and writes again if more wait.
        let done_wake = eventfd_in(serving, libc::EPOLLIN | libc::EPOLLET, OFFLOADED_TOKEN)?;
        Ok(Offload {
            epfd,
            wake,
            queue: Mutex::new(Vec::new()),
            done_wake,
            done: Mutex::new(std::collections::VecDeque::new()),
            sending: AtomicUsize::new(0),
        })
    }
}

/// A new eventfd, in epoll set `epfd` for `events` under `token`.
pub(super) fn eventfd_in(epfd: RawFd, events: i32, token: u64) -> io::Result<OwnedFd> {
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ev = libc::epoll_event { events: events as u32, u64: token };
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

pub(super) fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Takes the first of the queue an eventfd (edge-triggered) woke a thread
/// for, and wakes another thread if more are waiting.
pub(super) fn take_one<T>(queue: &Mutex<std::collections::VecDeque<T>>, wake_fd: &OwnedFd) -> Option<T> {
    clear(wake_fd);
    let mut queue = queue.lock().unwrap();
    let first = queue.pop_front();
    if !queue.is_empty() {
        wake(wake_fd);
    }
    first
}

pub(super) fn clear(fd: &OwnedFd) {
    let mut count = 0u64;
    unsafe { libc::read(fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
}

/// Completes the downloads the offload thread is done with, and serves
/// what their connections bring next.
pub(super) fn take_offloaded<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, held: &mut Held) {
    let Some(off) = &w.offload else {
        return;
    };
    // One per wake-up: the next request on a returned connection may be
    // slow, and the other returned connections go to other threads meanwhile.
    let Some(job) = take_one(&off.done, &off.done_wake) else {
        return;
    };
    let (conn, keep) = finish_download(w, t, job);
    if keep {
        serve_claimed(w, state, t, conn, held);
    } else {
        // Held bytes (FastCGI's END_REQUEST) go out before it closes.
        held.settle(w, conn, false);
    }
}

/// Hands the rest of a download to the offload thread.
pub(super) fn offload<A: App>(w: &Shared<A>, mut conn: Box<Conn>, rest: Download) {
    let Some(off) = &w.offload else {
        return;
    };
    leave_serving_set(w, &mut conn);
    let sent = conn.io.lock().unwrap().bytes_sent;
    let queued = crate::exchange::unsent(conn.entry.fd);
    off.sending.fetch_add(1, Ordering::AcqRel);
    off.queue.lock().unwrap().push(Offloaded {
        conn,
        rest,
        sent,
        progress: mono_ms(),
        queued,
        gone: None,
        stalled: None,
    });
    wake(&off.wake);
}

/// The offload thread: sends each download's file as its client's socket
/// takes it, and hands the connection back to the serving threads when all
/// of it went out, the client failed, or it took nothing for the write
/// timeout.
pub(super) fn offload_main<A: App>(w: &Shared<A>) {
    let Some(off) = &w.offload else {
        return;
    };
    let epfd = off.epfd.as_raw_fd();
    let mut jobs: Vec<Option<Offloaded>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let end = |jobs: &mut Vec<Option<Offloaded>>, free: &mut Vec<usize>, i: usize| {
        if let Some(job) = jobs[i].take() {
            free.push(i);
            unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, job.conn.entry.fd, std::ptr::null_mut()) };
            off.done.lock().unwrap().push_back(job);
            off.sending.fetch_sub(1, Ordering::AcqRel);
            wake(&off.done_wake);
        }
    };
    loop {
        // Woken once a second while downloads run, to give up on stalled clients.
        let timeout = if free.len() < jobs.len() { 1000 } else { -1 };
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("epoll_wait (offload thread): {e}");
            return;
        }
        for ev in &events[..n as usize] {
            if ev.u64 == OFFLOAD_WAKE {
                clear(&off.wake);
                let taken = std::mem::take(&mut *off.queue.lock().unwrap());
                for job in taken {
                    let fd = job.conn.entry.fd;
                    let i = free.pop().unwrap_or_else(|| {
                        jobs.push(None);
                        jobs.len() - 1
                    });
                    jobs[i] = Some(job);
                    let mut ev = libc::epoll_event {
                        events: (libc::EPOLLOUT | libc::EPOLLONESHOT) as u32,
                        u64: i as u64,
                    };
                    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                        error!("epoll_ctl (offload thread): {}", io::Error::last_os_error());
                        if let Some(job) = jobs[i].as_mut() {
                            job.conn.io.lock().unwrap().broken = true;
                        }
                        end(&mut jobs, &mut free, i);
                    }
                }
                continue;
            }
            let i = ev.u64 as usize;
            let Some(job) = jobs.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            let fd = job.conn.entry.fd;
            let step = {
                let mut io = job.conn.io.lock().unwrap();
                let step = io.advance(&mut job.rest.transfer);
                if io.bytes_sent != job.sent {
                    job.sent = io.bytes_sent;
                    job.progress = mono_ms();
                    job.queued = crate::exchange::unsent(fd);
                }
                match &step {
                    // Logged with the request when a serving thread completes it.
                    Err(ResponseError::Invalid(why)) => {
                        io.body_note = Some(format!("sending the file: {why}; closing the connection"))
                    }
                    // A front end's abort has its own line.
                    Err(ResponseError::ClientGone(why)) if !io.fcgi_aborted => job.gone = Some(why.clone()),
                    _ => {}
                }
                step
            };
            let done = !matches!(step, Ok(false));
            let mut ev =
                libc::epoll_event { events: (libc::EPOLLOUT | libc::EPOLLONESHOT) as u32, u64: i as u64 };
            if done || unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) } < 0 {
                end(&mut jobs, &mut free, i);
            }
        }
        let now = mono_ms();
        let limit = w.config.io_timeout.as_millis() as u64;
        for i in 0..jobs.len() {
            let stalled = jobs[i].as_mut().is_some_and(|job| {
                if now.saturating_sub(job.progress) < limit {
                    return false;
                }
                // Taking what the socket held is taking bytes too.
                let queued = crate::exchange::unsent(job.conn.entry.fd);
                if queued >= 0 && job.queued >= 0 && queued < job.queued {
                    job.queued = queued;
                    job.progress = now;
                    return false;
                }
                true
            });
            if stalled {
                if let Some(job) = jobs[i].as_mut() {
                    // Said with the request when a serving thread completes it.
                    job.stalled = Some(job.sent);
                    job.conn.io.lock().unwrap().broken = true;
                }
                end(&mut jobs, &mut free, i);
            }
        }
    }
}

/// Completes a request whose file went out (or failed to) as any other
/// request: the framing's end, log line, metrics. Returns the connection
/// and whether it carries another request.
pub(super) fn finish_download<A: App>(w: &Shared<A>, t: usize, job: Offloaded) -> (Box<Conn>, bool) {
    let Offloaded { mut conn, rest, gone, stalled, .. } = job;
    let listener = &w.listeners[conn.listener].1;
    let keep = {
        let req = Request {
            meta: match &rest.params {
                Some(p) => Meta::Cgi(p),
                None => Meta::Http(&conn.head),
            },
            bytes: &rest.bytes,
            remote_addr: &conn.remote_addr,
            remote_port: &conn.remote_port,
            listener,
            listener_index: conn.listener,
            forwarded_https: false,
            forwarded_prefix: false,
        };
        if let Some(why) = gone {
            info!("{} from {}: client disconnected ({why}) during the file", req.describe(), req.peer());
        }
        if let Some(sent) = stalled {
            info!(
                "{} from {}: gave up sending the file: the client took nothing for {} s ({sent} bytes sent)",
                req.describe(),
                req.peer(),
                w.config.io_timeout.as_secs_f64()
            );
        }
        let keep = complete(&conn, listener, &req);
        w.scoreboard.end_download(w.slot, rest.shown);
        after_request(w, t, &conn, &req, rest.started, true);
        keep
    };
    if keep {
        conn.request_started = mono_ms();
    }
    (conn, keep)
}
