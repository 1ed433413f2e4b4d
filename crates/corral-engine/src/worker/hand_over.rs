//! Passing kept-alive connections to the worker that replaces this one,
//! so that a graceful reload closes none of them.

use super::*;

/// Connections this worker handed to siblings while draining.
pub(super) static HANDED_OVER: AtomicUsize = AtomicUsize::new(0);

/// [`can_hand_over`] for the response path, which holds no [`Shared`]: set
/// once, when the worker's shared state exists (a process runs one worker).
pub(super) static HAND_OVER_PROBE: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>> =
    std::sync::OnceLock::new();

/// Whether a kept FastCGI connection may stay open after the request on it:
/// unless this worker drains with no sibling to take the connection.
/// FastCGI cannot warn the front end that a connection closes (see
/// crate::handover), so one that may not stay closes with its END_REQUEST.
pub(crate) fn fastcgi_conn_may_stay() -> bool {
    !draining() || HAND_OVER_PROBE.get().is_some_and(|probe| probe())
}

/// Whether a sibling could take a connection from this draining worker, now
/// or once it has started (a replacement still loading the app): the
/// connection then waits here, parked, for the sweeper to hand it over.
pub(super) fn can_hand_over<A: App>(w: &Shared<A>) -> bool {
    w.inbox.is_some() && crate::handover::successor(&w.scoreboard, w.slot, w.master)
}

/// What goes with a connection from listener `idx` that is handed over.
pub(super) fn note_for<A: App>(w: &Shared<A>, idx: usize, entry: &Entry) -> crate::handover::Note {
    crate::handover::Note {
        listener: idx as u16,
        protocol: w.listeners[idx].1.protocol as u8,
        client: entry.proxy_client.get().copied(),
        fresh: entry.fresh.load(Ordering::Relaxed),
    }
}

/// In a draining worker, hands a connection between two requests (nothing
/// buffered, its responses written) to a sibling; gives it back if it stays
/// (to be parked: the sweeper hands it over once a sibling is ready).
pub(super) fn hand_over_if_draining<A: App>(w: &Shared<A>, conn: Box<Conn>) -> Option<Box<Conn>> {
    // Nor one whose next FastCGI request began: its first records left the
    // buffer for the connection's state, which does not go with it (the
    // sibling got the rest of a request it never saw begin, and dropped it:
    // Apache writes BEGIN_REQUEST on its own). The sweeper hands such a one
    // over with its records encoded again.
    if !draining()
        || w.inbox.is_none()
        || conn.entry.fresh.load(Ordering::Relaxed)
        || conn.fcgi.active.is_some()
    {
        return Some(conn);
    }
    let Some(to) = crate::handover::target(&w.scoreboard, w.slot, w.master) else {
        return Some(conn);
    };
    let ready = {
        let mut io = conn.io.lock().unwrap();
        io.buf.is_empty() && io.keep_alive && io.discard_until == 0 && io.flush_out(|f| f()).is_ok()
    };
    if !ready {
        return Some(conn);
    }
    match crate::handover::send(w.master, to, conn.entry.fd, note_for(w, conn.listener, &conn.entry), b"") {
        Ok(()) => {
            HANDED_OVER.fetch_add(1, Ordering::Relaxed);
            // Marked as the sweeper marks what it hands over (close() counts
            // it off again), so that close() does not shut it down for the
            // sibling too when the app has forked.
            conn.entry.handed.store(true, Ordering::Relaxed);
            w.handed.fetch_add(1, Ordering::Relaxed);
            // The sibling holds the connection too, so closing this copy
            // neither ends it nor takes it out of this epoll set.
            if conn.registered {
                unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, conn.entry.fd, std::ptr::null_mut()) };
            }
            close(w, conn, false);
            None
        }
        Err(e) => {
            debug!("handing a connection to worker {to}: {e}");
            Some(conn)
        }
    }
}

/// Takes the connections siblings handed over and serves what they bring.
pub(super) fn take_handed_over<A: App>(w: &Shared<A>, state: &mut A::Thread, t: usize, held: &mut Held) {
    // Every connection waiting in the inbox is taken first; the first is
    // served here and the others parked. Served one after another, they
    // would wait behind a slow request unseen by the other threads, and be
    // lost with the inbox should this worker be stopped too (a slow request
    // handed over from a stuck worker is often stuck here as well).
    let mut taken = Vec::new();
    receive_handed_over(w, &mut taken);
    let mut taken = taken.into_iter();
    if let Some(first) = taken.next() {
        taken.for_each(|conn| park_adopted(w, conn));
        serve_claimed(w, state, t, first, held);
        if held.due() {
            held.release(w);
        }
    }
}

/// Adopts the connections waiting in the hand-over inbox.
// Boxed as everywhere: epoll's events carry a connection's address.
#[allow(clippy::vec_box)]
pub(super) fn receive_handed_over<A: App>(w: &Shared<A>, taken: &mut Vec<Box<Conn>>) {
    use std::os::fd::IntoRawFd;
    let Some(inbox) = &w.inbox else { return };
    loop {
        match crate::handover::receive(inbox.as_raw_fd()) {
            Ok(crate::handover::Received::Conn(fd, note, carried)) => {
                let idx = usize::from(note.listener);
                // Listeners are numbered alike in every worker of one program;
                // across a re-exec the list may have changed: the socket
                // itself must say it came from that listener.
                if idx >= w.listeners.len()
                    || w.listeners[idx].1.protocol as u8 != note.protocol
                    || !accepted_on(fd.as_raw_fd(), &w.listeners[idx].1)
                {
                    warn!("a connection handed over for a listener this worker does not have; closing it");
                    continue;
                }
                let is_unix = w.listeners[idx].1.is_unix;
                let (remote_addr, remote_port) = if is_unix {
                    (String::new(), String::new())
                } else {
                    match peer_of_socket(fd.as_raw_fd()) {
                        Ok(peer) => peer,
                        // Reset by its client on the way (ENOTCONN): nothing is
                        // left to answer, and no address to name it by.
                        Err(e) => {
                            debug!("a connection handed over was reset by its client on the way ({e}); closing it");
                            continue;
                        }
                    }
                };
                let mut conn = adopt(w, fd.into_raw_fd(), idx, remote_addr, remote_port, note.fresh);
                conn.handed_in = true;
                if let Some(client) = note.client {
                    set_proxy_client(&mut conn, client);
                }
                // A request the sibling had begun to read: its bytes come
                // first, as if read from the socket here.
                if !carried.is_empty() {
                    conn.io.lock().unwrap().buf.extend_from_slice(&carried);
                }
                taken.push(conn);
            }
            Ok(crate::handover::Received::Dropped(why)) => warn!("hand-over inbox: dropped {why}"),
            Ok(crate::handover::Received::Empty) => return,
            Err(e) => {
                warn!("hand-over inbox: {e}");
                return;
            }
        }
    }
}
