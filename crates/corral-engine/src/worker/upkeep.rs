//! The worker's main thread: it serves no request, but handles signals,
//! enforces timeouts, recycles the worker and runs the graceful drain.

use super::*;

pub(super) fn main_loop<A: App>(w: &Shared<A>, signals: &WorkerSignals) -> i32 {
    let mut drain_deadline: Option<u64> = None;
    let born = mono_ms();
    // Ticks in a row with no connection left while draining.
    let mut empty_ticks = 0;
    // Compared with the current parent to notice the master's death (the
    // master may itself be PID 1 in a container, so "parent is 1" is no test).
    let master = w.master;
    // When the main thread took over from a crashed serving thread.
    let mut crash_seen: Option<u64> = None;
    let mut stop_wait = StopWait::None;
    // Listeners found with connections queued at the last tick.
    let mut queued_before = vec![false; w.listeners.len()];
    loop {
        signals.wait(match stop_wait {
            StopWait::Asked { .. } => STOP_ASK_TICK,
            _ => SWEEP_INTERVAL,
        });
        if signals.quit.load(Ordering::Relaxed) {
            // The master names what a worker it kills was serving; one that
            // leaves by itself names it here, or the 502s a front end logs
            // for these requests would go unexplained.
            let serving = w.scoreboard.in_flight(w.slot, mono_ms());
            let offloaded = w.scoreboard.offloaded(w.slot);
            let what = crate::supervise::describe_serving(&serving, offloaded);
            if serving.is_empty() && offloaded == 0 {
                info!("Worker exiting at once (quick stop): pid={}", std::process::id());
                note_if_idle(w, w.stuck.load(Ordering::Acquire), crate::crash::crashed().is_some());
            } else {
                warn!("Worker exiting at once (quick stop){what}: pid={}", std::process::id());
            }
            STOPPED_AT_ONCE.store(true, Ordering::Relaxed);
            if crate::crash::crashed().is_none() {
                end_cut_requests(w, mono_ms(), "Quick stop");
            }
            if let Some(log) = &w.access {
                log.flush();
            }
            return 0;
        }
        let stop_signal = signals.stop.swap(false, Ordering::SeqCst);
        // Its listening socket gone (see accept::listener_gone), the worker
        // still takes the kernel's wake-ups for it, which no sibling then
        // gets: it leaves as soon as its requests are done, when one serves.
        let broken = LISTENER_GONE.load(Ordering::Relaxed) && w.scoreboard.other_ready(w.slot);
        if drain_deadline.is_none() && (broken || stop_now(w, stop_signal, &mut stop_wait)) {
            drain_deadline = Some(mono_ms() + w.config.graceful_timeout.as_millis() as u64);
            begin_drain(w);
        }
        let now = mono_ms();
        w.scoreboard.beat(w.slot, now);
        let crash = crate::crash::crashed();
        if let Some(c) = crash {
            match crash_seen {
                None => {
                    crash_seen = Some(now);
                    on_crash(w, c, now);
                }
                // No replacement became ready to take over (its code does
                // not load, say): what this worker holds is lost either way,
                // and it must not hold it for ever.
                Some(at)
                    if drain_deadline.is_none()
                        && now >= at + w.config.graceful_timeout.as_millis() as u64 =>
                {
                    error!(
                        "Worker still not replaced {:.0} s after its crash (--graceful-timeout); exiting with the \
                         connections it holds: pid={}",
                        w.config.graceful_timeout.as_secs_f64(),
                        std::process::id()
                    );
                    crate::crash::die(c);
                }
                Some(_) => {}
            }
        }
        log_misdirected(master);
        let reopen = signals.reopen.swap(false, Ordering::Relaxed);
        if reopen {
            match crate::logfile::reopen() {
                Ok(true) => info!("Reopened the error log: pid={}", std::process::id()),
                Ok(false) => {}
                Err(e) => error!("{e}"),
            }
        }
        if let Some(log) = &w.access {
            log.flush();
            if reopen {
                match log.reopen() {
                    Ok(()) => info!("Reopened the access log: pid={}", std::process::id()),
                    Err(e) => error!("{e}"),
                }
            }
        }
        if drain_deadline.is_some() {
            adopt_inbox(w);
        }
        // Before the sweep: the request that leaves every thread stuck may
        // be the one timing out now, and a draining worker then exits in
        // this tick, which only connections this sweep hands over survive.
        check_timeouts(w, now);
        if serving_over(w) {
            rescue_turns(w);
        }
        // Looked at before the sweep: a thread out of its pass after the
        // crash takes nothing more, so this sweep sees every connection it
        // will leave here.
        let others_out = crash.is_some_and(|c| {
            (0..w.in_pass.len()).all(|t| {
                c.thread == Some(t)
                    || !w.in_pass[t].load(Ordering::SeqCst)
                    || w.timed_out[t].load(Ordering::Acquire)
            })
        });
        let orphans_left = sweep(w, now, idle_linger_over());
        resume_accepting(w, now);
        take_unannounced(w, &mut queued_before);
        trim_after_closes(w);
        report_shed(w, now);
        report_fd_shortage(now);
        if !RECYCLING.load(Ordering::Acquire) && drain_deadline.is_none() {
            check_recycle(w, now - born);
        }
        if let Some(deadline) = drain_deadline {
            // `accepting` first: a connection leaves it only once the
            // registry counts it, so none is missed between the two reads.
            let accepting = w.accepting.load(Ordering::SeqCst);
            let live = w.registry.lock().unwrap().live + accepting - w.handed.load(Ordering::Relaxed);
            let stuck = w.stuck.load(Ordering::Acquire);
            // Twice in a row: a thread may have accepted a connection just
            // before the listeners closed and not registered it yet.
            empty_ticks = if live == 0 { empty_ticks + 1 } else { 0 };
            if empty_ticks >= 2 {
                if let Some(log) = &w.access {
                    log.flush();
                }
                let handed = HANDED_OVER.load(Ordering::Relaxed);
                if handed > 0 {
                    info!(
                        "Worker handed {handed} connection(s) to other workers: pid={}",
                        std::process::id()
                    );
                }
                info!("Worker stopped gracefully: pid={}", std::process::id());
                note_if_idle(w, stuck, crash.is_some());
                return 0;
            }
            if let Some(log) = &w.access {
                log.flush();
            }
            // Downloads the offload thread is sending need no serving thread
            // until they are out: they go on, up to the graceful timeout.
            let sending = w.offload.as_ref().map_or(0, |o| o.sending.load(Ordering::Acquire));
            // A crashed thread holding the interpreter lock: the others
            // can never end their requests.
            // Crashed otherwise, the others have parked once their requests
            // ended, and left what they read between two requests parked
            // for the sweep (see `in_pass`).
            let others_stuck = all_stuck(w) || crash.is_some_and(|c| c.held_lock || others_out);
            // A thread of the app's that crashed holds no request, but may
            // hold what the others need, as a stuck one does.
            let app_crash = crash.is_some_and(|c| c.thread.is_none());
            if (stuck > 0 || app_crash)
                && sending == 0
                && orphans_left == 0
                && (live <= stuck || others_stuck)
            {
                // Only timed-out requests are left, or every thread is in
                // one and the connections held here could never be served:
                // the sweep has handed those it could to a sibling, and what
                // is left (a request this worker had begun to read, or no
                // sibling to take it) is closed now, so that its client
                // retries rather than wait for the graceful timeout. They
                // may hold the GIL for ever, so leave without running any
                // Python.
                let handed = HANDED_OVER.load(Ordering::Relaxed);
                if handed > 0 {
                    info!(
                        "Worker handed {handed} connection(s) to other workers {}: pid={}",
                        if crash.is_some() { "after the crash" } else { "while stuck" },
                        std::process::id()
                    );
                }
                if let Some(c) = crash {
                    crate::crash::die(c);
                }
                warn!(
                    "Worker exiting with {stuck} timed-out request(s) still running: pid={}",
                    std::process::id()
                );
                unsafe { libc::_exit(0) };
            }
            if now >= deadline {
                // Which requests are cut, as a request past --timeout is named.
                let (serving, offloaded) =
                    (w.scoreboard.in_flight(w.slot, now), w.scoreboard.offloaded(w.slot));
                let cut = match serving.is_empty() && offloaded == 0 {
                    true => String::new(),
                    false => crate::supervise::describe_serving(&serving, offloaded),
                };
                warn!(
                    "Worker stopping with {live} connection(s) still open after the graceful timeout{cut}: pid={}",
                    std::process::id()
                );
                if crash.is_none() {
                    end_cut_requests(w, now, "Graceful timeout");
                }
                if let Some(log) = &w.access {
                    log.flush();
                }
                if let Some(c) = crash {
                    crate::crash::die(c);
                }
                if stuck > 0 {
                    unsafe { libc::_exit(0) };
                }
                return 0;
            }
        }
        if unsafe { libc::getppid() } != master {
            // The master is gone (killed outright): nobody will replace or stop us.
            if drain_deadline.is_none() {
                warn!("Master process (pid {master}) died; worker draining and exiting");
                drain_deadline = Some(mono_ms() + w.config.graceful_timeout.as_millis() as u64);
                begin_drain(w);
            }
        }
    }
}

/// Where a worker is with a graceful stop signal (TERM, or INT unless
/// --sigint quick) that did not come from the master.
#[derive(Clone, Copy)]
enum StopWait {
    None,
    /// Received then (monotonic ms), from pid `from`; the master's mark of
    /// its --shutdown-delay is looked for until [`STOP_ASK_WAIT`] has passed.
    Asked {
        at: u64,
        from: i32,
        sig: i32,
    },
    /// Serving on with the master through --shutdown-delay, until then.
    Held {
        until: u64,
    },
}

/// How long a worker that got a stop signal from someone else than the
/// master looks for the master's mark of --shutdown-delay before it takes
/// the signal as its own (one sent to this worker alone): the master marks
/// it within a millisecond of the same signal.
const STOP_ASK_WAIT: Duration = Duration::from_millis(200);
/// How often the main thread looks meanwhile.
const STOP_ASK_TICK: Duration = Duration::from_millis(20);
/// How long past --shutdown-delay a worker holding with the master waits
/// for the master's stop before it drains by itself.
const HELD_STOP_GRACE: Duration = Duration::from_secs(1);

/// Whether the worker drains now, given a graceful stop signal that just
/// came (`signal`) and where it was with an earlier one (`wait`).
///
/// One from the master drains at once, and so does any without
/// --shutdown-delay. One sent to the whole group (Ctrl-C, systemd's
/// KillMode=control-group, kill -- -PGID) reached the master too, which
/// serves on for --shutdown-delay while front ends take the server out of
/// rotation, then stops the workers: a worker leaving now would leave the
/// master's listeners with nobody to take connections from them, so it
/// serves on too. The master marks that in the scoreboard; a signal without
/// the mark (sent to this worker alone) drains.
/// Notes that the worker leaves with nothing running (see
/// [`super::left_idle`]): no request past its timeout, no thread in a pass.
fn note_if_idle<A: App>(w: &Shared<A>, stuck: usize, crashed: bool) {
    let idle = stuck == 0 && !crashed && w.in_pass.iter().all(|p| !p.load(Ordering::SeqCst));
    super::signals::LEFT_IDLE.store(idle, Ordering::SeqCst);
}

fn stop_now<A: App>(w: &Shared<A>, signal: bool, wait: &mut StopWait) -> bool {
    let now = mono_ms();
    if signal {
        let (from, sig) = (STOP_SENDER.load(Ordering::Relaxed), STOP_SIGNAL.load(Ordering::Relaxed));
        if unsafe { libc::getppid() } != w.master {
            // The kernel's SIGTERM at the master's death (PR_SET_PDEATHSIG).
            warn!("Master process (pid {}) died; worker draining and exiting", w.master);
            return true;
        }
        if from == w.master || w.config.shutdown_delay.is_zero() {
            return true;
        }
        if let StopWait::None = wait {
            *wait = StopWait::Asked { at: now, from, sig };
        }
    }
    // The master began its graceful stop (its signal may have merged with
    // one still pending here).
    if !matches!(wait, StopWait::None) && w.scoreboard.state(w.slot) == WorkerState::Draining {
        return true;
    }
    match *wait {
        StopWait::None => false,
        StopWait::Asked { at, from, sig } => {
            let name = signal_hook::low_level::signal_name(sig).unwrap_or("a stop signal");
            // pid 0: from outside the pid namespace, or the terminal's Ctrl-C.
            let from = match from {
                0 => "outside".to_string(),
                pid => format!("pid {pid}"),
            };
            if w.scoreboard.announcing(w.slot) {
                info!(
                    "Worker received {name} from {from} as the master did: serving on with it for {:?} \
                     (--shutdown-delay) until it stops the workers: pid={}",
                    w.config.shutdown_delay,
                    std::process::id()
                );
                *wait = StopWait::Held { until: at + w.config.shutdown_delay.as_millis() as u64 };
                false
            } else if signal_pending(w.master, sig)
                && now < at + (w.config.shutdown_delay + HELD_STOP_GRACE).as_millis() as u64
            {
                // The master has the same signal still to read (it blocks
                // its signals and reads them in its loop, which may be busy):
                // its mark is to come.
                false
            } else if now >= at + STOP_ASK_WAIT.as_millis() as u64 {
                info!("Worker received {name} from {from}: draining: pid={}", std::process::id());
                true
            } else {
                false
            }
        }
        StopWait::Held { until } if now >= until + HELD_STOP_GRACE.as_millis() as u64 => {
            warn!(
                "The master did not stop the workers when --shutdown-delay ended; worker draining: pid={}",
                std::process::id()
            );
            true
        }
        StopWait::Held { .. } => false,
    }
}

/// Whether signal `sig` waits to be taken by process `pid` (its shared
/// pending set, /proc/PID/status's ShdPnd, where a signal the process
/// blocks stays until it reads it).
fn signal_pending(pid: libc::pid_t, sig: i32) -> bool {
    if !(1..=64).contains(&sig) {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig - 1)) != 0)
}

/// A serving thread's waits on its client, which --timeout leaves out: a
/// slow upload or download is the client's doing, bounded by
/// --socket-timeout and the body's rate, and the thread is not stuck (as
/// under gunicorn's gthread workers, which let such a request run).
#[derive(Default)]
pub(super) struct ClientWait {
    /// Since when it waits (monotonic ms), 0 when it does not.
    pub(super) since: AtomicU64,
    /// Milliseconds waited during its current request.
    pub(super) total: AtomicU64,
}

pub(super) static CLIENT_WAITS: std::sync::OnceLock<Box<[ClientWait]>> = std::sync::OnceLock::new();

thread_local! {
    /// This serving thread's index, usize::MAX on other threads.
    pub(super) static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Runs `f`, a wait for the client's socket, as time --timeout leaves out.
pub(crate) fn waiting_on_client(f: &mut dyn FnMut()) {
    let wait = CLIENT_WAITS.get().and_then(|w| w.get(SERVING_THREAD.with(|t| t.get())));
    let Some(wait) = wait else {
        return f();
    };
    let start = mono_ms().max(1);
    wait.since.store(start, Ordering::Release);
    f();
    wait.since.store(0, Ordering::Release);
    wait.total.fetch_add(mono_ms() - start, Ordering::AcqRel);
}

/// A new request on serving thread `t`: none of its time was the client's yet.
pub(super) fn reset_client_wait(t: usize) {
    if let Some(wait) = CLIENT_WAITS.get().and_then(|w| w.get(t)) {
        wait.total.store(0, Ordering::Release);
    }
}

/// Whether serving thread `t` waits on its client now, and how long it has
/// so far in its request.
pub(super) fn client_wait(t: usize) -> (bool, u64) {
    CLIENT_WAITS.get().and_then(|w| w.get(t)).map_or((false, 0), |wait| {
        (wait.since.load(Ordering::Acquire) != 0, wait.total.load(Ordering::Acquire))
    })
}

/// Answers requests that ran past `--timeout` with 504 (or cuts them off if
/// their response already started), logs where their thread is stuck, and
/// asks the master to replace this worker.
pub(super) fn check_timeouts<A: App>(w: &Shared<A>, now: u64) {
    let Some(limit) = w.config.timeout else {
        return;
    };
    let limit_ms = limit.as_millis() as u64;
    for t in 0..w.timed_out.len() {
        let Some((what, since)) = w.scoreboard.thread_request(w.slot, t) else {
            continue;
        };
        let (waiting, waited) = client_wait(t);
        let app_ms = now.saturating_sub(since).saturating_sub(waited);
        if waiting || app_ms < limit_ms || w.timed_out[t].load(Ordering::Acquire) {
            continue;
        }
        let Some(answered) = abandon_request(w, t, now, since, 504, "the request timed out", true) else {
            continue;
        };
        let traceback = w.app.thread_traceback(t).unwrap_or_else(|| "(no traceback available)\n".to_string());
        let client = match waited {
            0 => String::new(),
            ms => format!(" (and {:.1} s more waiting on its client)", ms as f64 / 1000.0),
        };
        error!(
            "Request timeout: {what} ran for {:.1} s{client}, over --timeout {:.1} s, in worker {} (pid {}), \
             thread {} (the app's corral-thread-{}); {answered}. The worker is being replaced. Stack of the stuck \
             thread:\n{}",
            app_ms as f64 / 1000.0,
            limit.as_secs_f64(),
            w.slot,
            std::process::id(),
            t + 1,
            t + 1,
            traceback.trim_end()
        );
        w.scoreboard.request_retire(w.slot, Retire::Timeout);
        w.scoreboard.count(w.slot, crate::scoreboard::C_TIMEOUTS, 1);
        rescue_held(w, t, true);
    }
}

/// At the graceful timeout or a quick stop (`when`), before the worker
/// exits: each request still running ends for its client as one past
/// --timeout does (503 if nothing was sent, else the connection cut, so
/// that neither a client nor a front end takes a truncated body for a whole
/// one), with its access log line and a line naming its client;
/// connections whose request no thread had begun are named too (they close
/// unanswered, which a front end may retry elsewhere, as it may not a
/// response).
fn end_cut_requests<A: App>(w: &Shared<A>, now: u64, when: &str) {
    CUT_AT_EXIT.store(true, Ordering::Relaxed);
    // The client of each request as the access log names it (behind a
    // front end, the address the front end gave), with the connection's
    // peer, while it has one. Those whose thread waits on its client are
    // then aborted all at once, so that their threads let go of them
    // together, not one after another as each is come to (a quick stop
    // must be quick).
    let clients: Vec<Option<String>> = (0..w.timed_out.len())
        .map(|t| {
            // Under the `current` lock: the thread cannot close the descriptor meanwhile.
            let current = w.current[t].lock().unwrap();
            let (fd, io, _, note) = current.as_ref()?;
            let peer = peer_of(*fd);
            if io.try_lock().is_err() {
                abort_connection(*fd);
            }
            Some(match note {
                Some(note) if !peer.starts_with(&format!("{}:", note.remote)) => {
                    format!("{} via {peer}", note.remote)
                }
                _ => peer,
            })
        })
        .collect();
    for (t, client) in clients.into_iter().enumerate() {
        if w.timed_out[t].load(Ordering::Acquire) {
            continue;
        }
        let Some((what, since)) = w.scoreboard.thread_request(w.slot, t) else {
            continue;
        };
        if let Some(answered) = abandon_request(w, t, now, since, 503, "the server is shutting down", true) {
            warn!(
                "{when}: {what} from {} cut {:.1} s in: {answered}",
                client.unwrap_or_default(),
                now.saturating_sub(since) as f64 / 1000.0
            );
        }
    }
    let reg = w.registry.lock().unwrap();
    let waiting: Vec<String> = reg
        .entries
        .iter()
        .flatten()
        .filter(|e| {
            e.state.load() == ConnState::Idle
                && !e.handed.load(Ordering::Relaxed)
                && (e.begun.load() != Begun::Not || pending_bytes(e.fd) > 0)
        })
        .map(|e| peer_of(e.fd))
        .collect();
    if !waiting.is_empty() {
        warn!(
            "{when}: {} request(s) no thread had begun are not served; their connections close unanswered \
             (from {})",
            waiting.len(),
            waiting.join(", ")
        );
    }
}

/// Set once [`end_cut_requests`] runs: the serving threads' writes that
/// fail from then on failed because of the cut, which is logged already,
/// not because their client went away or their request timed out.
static CUT_AT_EXIT: AtomicBool = AtomicBool::new(false);

/// Whether the worker has cut its requests as it exits (see [`CUT_AT_EXIT`]).
pub fn cut_at_exit() -> bool {
    CUT_AT_EXIT.load(Ordering::Relaxed)
}

/// The address of a connection's peer, as a log line names it: the
/// client, or a front end in front of it.
fn peer_of(fd: RawFd) -> String {
    match super::accept::peer_of_socket(fd) {
        Err(_) => "an unknown peer".to_string(),
        Ok((ip, _)) if ip.is_empty() => "a unix socket peer".to_string(),
        Ok((ip, port)) => format!("{ip}:{port}"),
    }
}

/// Ends for its client the request thread `t` runs, which that thread
/// will not end (stuck past --timeout, or crashed): answers `status` with
/// `why` if nothing was sent yet, else cuts the connection; counts it and
/// (with --timeout, which keeps a note for it) writes its access log line.
/// Says what the client got; None if the
/// thread was between requests, or (unless `wait`) its request is locked.
pub(super) fn abandon_request<A: App>(
    w: &Shared<A>,
    t: usize,
    now: u64,
    since: u64,
    status: u16,
    why: &str,
    wait: bool,
) -> Option<String> {
    // Under the thread's `current` lock: a thread ending its request
    // clears `current` before it looks at `timed_out`, so either it has
    // ended (nothing to do) or it will find the flag and leave the
    // request, counted here, uncounted.
    let mut current = if wait { w.current[t].lock().unwrap() } else { w.current[t].try_lock().ok()? };
    let (fd, io, protocol, note) = current.as_mut().map(|(f, i, p, n)| (*f, i.clone(), *p, n.take()))?;
    w.timed_out[t].store(true, Ordering::Release);
    w.stuck.fetch_add(1, Ordering::AcqRel);
    let micros = now.saturating_sub(since) * 1000;
    let (answered, status, sent) = match io.try_lock() {
        Ok(mut io) => {
            let blocking: fn(&mut dyn FnMut()) = |f| f();
            let fresh = io.phase < RespPhase::Sent && !io.broken;
            if fresh {
                io.status = status;
                // On a FastCGI connection nginx keeps, it ends with a record
                // that keeps the connection out of nginx's pool, which would
                // send its next request on it after the shutdown below
                // (EPIPE, 502).
                let reply = error_reply(io.wire, status, why, io.front_end_nginx);
                if io.write_parts(&[&reply], blocking).is_ok() {
                    // The body's bytes, as the access log counts a response's.
                    io.bytes_sent += error_body(status, why).len() as u64;
                }
            }
            // Counted now, as it ends for the client: the thread may never
            // come back to count it.
            let bytes_in = std::mem::take(&mut io.read_total);
            w.scoreboard.record(w.slot, protocol as usize, io.status, micros, bytes_in, io.bytes_sent);
            let whole = !fresh && whole(&io);
            if !fresh && !whole {
                cut_short(&io, fd);
            }
            // A request the client sent after a whole response, on a
            // connection it was told stays open, goes unanswered: said, so
            // that it is not lost without a word.
            let after = if whole && io.keep_alive && io.body_finished() {
                io.buf.len() + pending_bytes(fd).max(0) as usize
            } else {
                0
            };
            // Whatever the app does next goes nowhere.
            io.broken = true;
            io.keep_alive = false;
            let answered = match (fresh, whole) {
                (true, _) => format!("the client got {status}"),
                (false, true) if after > 0 => format!(
                    "its response had gone out whole; the connection was closed, and the {after} bytes the \
                     client sent after it on the connection (its next request) went unanswered"
                ),
                (false, true) => "its response had gone out whole; the connection was closed".to_string(),
                (false, false) => "its response had started, so the connection was cut".to_string(),
            };
            (answered, io.status, io.bytes_sent)
        }
        // The thread is inside a socket wait of its own (a client that
        // reads slowly, or sends its body slowly), with the lock held: the
        // connection is aborted first, a reset over TCP (it may carry a
        // response begun, which a plain end would pass for whole), which
        // ends the wait. The thread then lets go of the lock, and what the
        // client got is read for the log; failing that, the request counts
        // as failed.
        Err(_) => {
            abort_connection(fd);
            let started = Instant::now();
            let mut got = None;
            while got.is_none() && started.elapsed() < ABORT_LOCK_WAIT {
                match io.try_lock() {
                    Ok(mut io) => {
                        io.broken = true;
                        io.keep_alive = false;
                        let begun = io.phase >= RespPhase::Sent;
                        got = Some((begun, io.status, io.bytes_sent, std::mem::take(&mut io.read_total)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            match got {
                Some((begun, status, sent, bytes_in)) => {
                    w.scoreboard.record(w.slot, protocol as usize, status, micros, bytes_in, sent);
                    let answered = match begun {
                        true => "its response had started, so the connection was cut",
                        false => "the connection was cut",
                    };
                    (answered.to_string(), status, sent)
                }
                None => {
                    w.scoreboard.record(w.slot, protocol as usize, status, micros, 0, 0);
                    ("the connection was cut".to_string(), status, 0)
                }
            }
        }
    };
    // Sends what is queued (the answer), then ends the connection, which
    // also wakes the thread if it waits on this socket. Before the lock
    // goes: once it has, the thread may come back, close the descriptor,
    // and its number may be a new client's by the time this runs.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    drop(current);
    if let (Some(log), Some(note)) = (&w.access, note) {
        note.log(log, status, sent, micros);
    }
    Some(answered)
}

/// How long [`abandon_request`] waits for the lock of a request whose
/// thread was in a socket wait, once the connection is aborted.
const ABORT_LOCK_WAIT: Duration = Duration::from_millis(200);

/// Aborts a connection another thread may be waiting on, without closing
/// its descriptor: a reset over TCP (see [`cut_short`]), a shutdown over a
/// unix socket, which has none.
fn abort_connection(fd: RawFd) {
    if !reset_tcp(fd) {
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Aborts a TCP connection with a reset, without closing its descriptor:
/// a disconnect (connect to AF_UNSPEC) sends the RST, where shutdown()
/// would send a FIN. False for a unix socket, which has no reset (the
/// connect fails there and changes nothing).
pub(super) fn reset_tcp(fd: RawFd) -> bool {
    let unspec = libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
    unsafe { libc::connect(fd, &unspec, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t) == 0 }
}

/// Makes a response cut short look so to the peer, as a response the app
/// fails in does (see `complete_locked`): a front end that does not count
/// the body (Apache over uwsgi and SCGI) passes the FIN of a plain shutdown
/// on as the response's end. Over TCP a reset: connect() with AF_UNSPEC
/// aborts a TCP connection with one, without closing the descriptor the
/// stuck thread still holds. Over a unix socket, which has no reset, a
/// FastCGI record header of version 0, which fails the response in nginx.
/// Nothing waits here: the upkeep thread holds the thread's locks. What
/// the response still held goes with the cut.
fn cut_short(io: &Io, fd: RawFd) {
    if io.tcp {
        reset_tcp(fd);
    } else if let Wire::FastCgi { id, .. } = io.wire {
        let [hi, lo] = id.to_be_bytes();
        let header = [0, 6, hi, lo, 0, 0, 0, 0];
        unsafe {
            libc::send(fd, header.as_ptr().cast(), header.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
    }
}

/// Whether the response went out whole, as the app gave it (its close()
/// is what hangs, say): it is not cut then, and leaves with the FIN of the
/// shutdown that follows, which the kernel sends after what the socket
/// still holds.
fn whole(io: &Io) -> bool {
    let fcgi_ended = !matches!(io.wire, Wire::FastCgi { .. }) || io.fcgi_ended;
    io.phase == RespPhase::Finished && io.pending_file.is_none() && io.out.is_empty() && fcgi_ended
}

/// Takes over from a serving thread that crashed (see [`crate::crash`]):
/// this worker accepts nothing more and starts no request, answers the
/// crashed one, and asks the master for a replacement, to which the
/// connections no thread serves go once it is ready.
pub(super) fn on_crash<A: App>(w: &Shared<A>, c: crate::crash::Crash, now: u64) {
    // First what needs no allocation and no lock: a crash in malloc may
    // have left its lock held, and the master must hear of the crash even
    // if this thread then blocks (its kill after the graceful timeout is
    // the backstop).
    w.scoreboard.request_retire(w.slot, Retire::Crash);
    // Siblings draining must not hand it their connections.
    w.scoreboard.set_state(w.slot, WorkerState::Draining);
    // For good: threads woken by a listener before it left see the crash
    // and skip their accepts, and resume_accepting never puts it back.
    pause_listeners(w, now);
    let signal = crate::supervise::signal_name(c.signal);
    let Some(t) = c.thread else {
        // A thread the app started: no request of its own to answer.
        let others = if c.held_lock {
            "; it held the interpreter lock, so the requests in flight cannot end and are cut once the \
             replacement is ready"
        } else {
            "; the requests in flight finish first"
        };
        error!(
            "Worker crashed: {signal} in a thread the app started. The worker is being replaced; it accepts \
             nothing more, and the connections no thread serves go to a worker that serves{others}: pid={}",
            std::process::id()
        );
        return;
    };
    let serving = w.scoreboard.thread_request(w.slot, t);
    // A request --timeout abandoned already is answered and counted.
    let timed_out = w.timed_out[t].load(Ordering::Acquire);
    let answered = serving
        .as_ref()
        .filter(|_| !timed_out)
        .and_then(|(_, since)| abandon_request(w, t, now, *since, 500, "the worker crashed", false));
    if answered.is_none() && !timed_out {
        // Between requests, or its request is locked (the crash came in
        // the middle of the server's own work on it): nothing to answer.
        w.timed_out[t].store(true, Ordering::Release);
        w.stuck.fetch_add(1, Ordering::AcqRel);
    }
    let request = match (serving, answered) {
        (Some((what, _)), Some(answered)) => format!("while it served {what}; {answered}"),
        (Some((what, _)), None) => {
            format!("while it served {what}; its client is cut off as the worker exits")
        }
        (None, _) => "between requests".to_string(),
    };
    // Numbered from 1, as the app's names for its serving threads are.
    let n = t + 1;
    let others = if c.held_lock {
        "; it held the interpreter lock, so the requests of the other threads cannot end and are cut once \
         the replacement is ready"
    } else {
        ""
    };
    error!(
        "Worker crashed: {signal} in thread {n} (the app's corral-thread-{n}) {request}. The worker is being \
         replaced; it accepts nothing more, and the connections no thread serves go to a worker that \
         serves{others}: pid={}",
        std::process::id()
    );
    // Last: it frees memory, which a crash inside malloc may have locked.
    rescue_held(w, t, false);
}

/// This worker's resident memory when it became ready, before any request.
pub(super) static FRESH_RSS: AtomicU64 = AtomicU64::new(0);
/// Set once this worker found --reload-on-rss below that size.
pub(super) static RSS_LIMIT_UNREACHABLE: AtomicBool = AtomicBool::new(false);

/// Asks the master for a replacement when this worker reached one of its
/// recycling limits.
pub(super) fn check_recycle<A: App>(w: &Shared<A>, age_ms: u64) {
    let served = w.scoreboard.requests(w.slot);
    let reason = if let Some(max) = w.max_requests.filter(|&m| served >= m) {
        Some((Retire::MaxRequests, format!("served {served} requests (limit {max})")))
    } else if let Some(life) = w.config.max_worker_lifetime.filter(|l| age_ms >= l.as_millis() as u64) {
        Some((
            Retire::Lifetime,
            format!("running for {:.1} s (limit {} s)", age_ms as f64 / 1000.0, crate::supervise::secs(life)),
        ))
    } else if let Some(limit) =
        w.config.reload_on_rss.filter(|_| !RSS_LIMIT_UNREACHABLE.load(Ordering::Relaxed))
    {
        let rss = rss_bytes();
        let fresh = FRESH_RSS.load(Ordering::Relaxed);
        if fresh > limit {
            // A fresh worker is this big already: each replacement would be
            // replaced in turn, for ever, and serve nothing meanwhile.
            RSS_LIMIT_UNREACHABLE.store(true, Ordering::Relaxed);
            warn!(
                "Worker {} (pid {}) had {} MiB of resident memory before serving anything, over \
                 --reload-on-rss {} MiB: the limit cannot be met, so this worker does not apply it; \
                 raise it above the size of a fresh worker",
                w.slot,
                std::process::id(),
                fresh >> 20,
                limit >> 20
            );
            return;
        }
        (rss > limit)
            .then(|| (Retire::Rss, format!("resident memory {} MiB (limit {} MiB)", rss >> 20, limit >> 20)))
    } else {
        None
    };
    let Some((why, detail)) = reason else {
        return;
    };
    ask_recycle(w, why, &detail);
}

/// Set once this worker asked to be replaced.
pub(super) static RECYCLING: AtomicBool = AtomicBool::new(false);

/// Asks the master for a replacement, once.
pub(super) fn ask_recycle<A: App>(w: &Shared<A>, why: Retire, detail: &str) {
    if RECYCLING.swap(true, Ordering::AcqRel) {
        return;
    }
    info!(
        "Worker {} (pid {}) recycling: {detail}; it finishes its requests once its replacement is ready",
        w.slot,
        std::process::id()
    );
    w.scoreboard.request_retire(w.slot, why);
}

/// This process's resident set size in bytes.
pub(super) fn rss_bytes() -> u64 {
    crate::supervise::rss_of(std::process::id() as libc::pid_t)
}

/// Stops accepting: the listeners leave this worker's epoll set and close,
/// so the kernel sends new connections to workers still accepting (or, once
/// the master closed its copy too, refuses them).
pub(super) fn begin_drain<A: App>(w: &Shared<A>) {
    DRAIN_STARTED.store(mono_ms(), Ordering::Relaxed);
    DRAINING.store(true, Ordering::SeqCst);
    w.scoreboard.set_state(w.slot, WorkerState::Draining);
    // What takes each listener's descriptor number in this process once it
    // is let go: a thread still in its batch of accepts from an earlier
    // wake-up may call accept4 on that number again, and must get an error
    // (ENOTSOCK), not a socket the app opened meanwhile under the same number.
    let placeholder = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    for (idx, (fd, _)) in w.listeners.iter().enumerate() {
        if !listener_kept(idx) {
            continue;
        }
        unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, *fd, std::ptr::null_mut()) };
        // A wake-up epoll gave this worker just before the removal is not
        // given to any other worker: take what is queued now and serve it.
        // Connections arriving from here on wake the other workers. Unless
        // every thread is stuck past --timeout: nothing taken here would be
        // served, while the replacement and the other workers will be.
        while !serving_over(w) {
            match accept_one(w, idx) {
                Accepted::Conn(conn) => park(w, conn),
                Accepted::Shed => {}
                Accepted::None => break,
            }
        }
        // Lets go of this process's reference to the listening socket (the
        // queue closes once every process has), keeping the number taken.
        if placeholder < 0 || unsafe { libc::dup3(placeholder, *fd, libc::O_CLOEXEC) } < 0 {
            unsafe { libc::close(*fd) };
        }
    }
    if placeholder >= 0 {
        unsafe { libc::close(placeholder) };
    }
    // The inbox closes too: a sibling that chose this worker a moment ago
    // finds it closed and hands its connection to another. What it queued
    // already, the main thread takes (adopt_inbox). Out of the epoll set
    // first, since a socket shut for reading is readable for ever.
    if let Some(inbox) = &w.inbox {
        unsafe { libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, inbox.as_raw_fd(), std::ptr::null_mut()) };
        crate::handover::close_inbox(inbox.as_raw_fd());
    }
    info!("Worker draining: pid={}", std::process::id());
}

/// Draining, takes the connections siblings queued in the inbox before it
/// closed, which no serving thread looks for any more (and which would
/// otherwise go with this worker when it exits, after a request stuck past
/// --timeout or a crash, say): parked like this worker's own, each is
/// handed on by the sweep, or served here.
pub(super) fn adopt_inbox<A: App>(w: &Shared<A>) {
    let mut taken = Vec::new();
    receive_handed_over(w, &mut taken);
    for conn in taken {
        park_adopted(w, conn);
    }
}

/// Parks a connection just handed over, or queues it for a turn (see
/// [`Turns`]) when it came with the start of a request the sibling had
/// read: epoll reports only bytes that arrive from now on, and its request
/// may be whole already.
pub(super) fn park_adopted<A: App>(w: &Shared<A>, conn: Box<Conn>) {
    match &w.turns {
        Some(turns) if !conn.io.lock().unwrap().buf.is_empty() => {
            turns.queue.lock().unwrap().push_back(conn);
            wake(&turns.wake);
        }
        _ => park(w, conn),
    }
}

/// Parks the connections waiting for a turn in a worker where no thread
/// will take one again (every one stuck past --timeout, or one crashed):
/// there the sweeper hands them on, with the requests they have buffered.
pub(super) fn rescue_turns<A: App>(w: &Shared<A>) {
    let Some(turns) = &w.turns else { return };
    // Not waiting: a thread may have crashed inside the lock. It is tried
    // again at the next sweep.
    let waiting: Vec<Box<Conn>> = match turns.queue.try_lock() {
        Ok(mut queue) => queue.drain(..).collect(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().drain(..).collect(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for conn in waiting {
        park(w, conn);
    }
}

/// Closes connections idle past their deadline, and with `close_idle`
/// (a drain past its linger) every idle keep-alive connection. A connection
/// with unread bytes is a request on its way and is left for a thread to
/// serve, past its deadline too. Draining, an idle connection between two
/// requests goes to a sibling instead, if one serves; and when every thread
/// is stuck past --timeout (or one crashed), so is every parked connection
/// nothing was read from, its request waiting in the socket included, and
/// every one whose request was begun, with the bytes read of it, since no
/// thread here will serve them. Returns how many of those could not be handed over yet (the
/// sibling's inbox was full, the sibling went away, or the replacement is
/// still starting).
pub(super) fn sweep<A: App>(w: &Shared<A>, now: u64, close_idle: bool) -> usize {
    let draining = draining() && w.inbox.is_some();
    let orphans = draining && serving_over(w);
    let mut left = 0;
    // Whether a sibling serves or is starting, asked once a sweep if needed.
    let mut successor = None;
    // Half-millisecond waits for a full inbox of the sibling taking over,
    // 200 ms at most per sweep.
    let mut wait_budget = 400;
    let reg = w.registry.lock().unwrap();
    for e in reg.entries.iter().flatten() {
        // A new connection silent this long is not about to be served.
        if e.promising.load(Ordering::Relaxed)
            && now.saturating_sub(e.promised_at.load(Ordering::Relaxed)) >= PROMISE_MS
        {
            unpromise(w, e);
        }
        if e.state.load() != ConnState::Idle {
            continue;
        }
        let expired = {
            let d = e.deadline.load(Ordering::Relaxed);
            d != 0 && now >= d
        };
        let between = e.between.load(Ordering::Relaxed);
        // Nothing of it read here, or all that was still buffered, to go with it.
        let as_it_is = |e: &Entry| e.untouched.load(Ordering::Relaxed) || e.begun.load() != Begun::Not;
        // A connection no thread here has taken a request from, its request
        // perhaps waiting in the socket: a draining worker's threads may be
        // busy for a while yet, and at the graceful timeout it would be cut,
        // while the worker replacing this one is ready and idle.
        let waiting = draining && as_it_is(e) && !e.handed.load(Ordering::Relaxed);
        let orphan = orphans && waiting;
        if !(expired || (draining || close_idle) && between || waiting) {
            // Nothing to do for it: spare the system call below, four times
            // a second for each of thousands of idle connections.
            continue;
        }
        let pending = pending_bytes(e.fd) > 0;
        let idle_between = draining && !pending && between && !e.handed.load(Ordering::Relaxed);
        if waiting || idle_between {
            let to = crate::handover::target(&w.scoreboard, w.slot, w.master);
            // None serves yet, but a replacement is starting: wait for it
            // (up to the graceful timeout) rather than close the connection.
            // (A request merely waiting for a thread here is served here if
            // none comes.)
            if to.is_none() && (orphan || idle_between) && *successor.get_or_insert_with(|| can_hand_over(w))
            {
                left += 1;
            }
            // Taken for the hand-over (`Closing`), and still as it was seen: a
            // thread may have served a request on it since its flags were
            // read, and parked it again with the start of the next one read
            // into this process's buffer (which would be lost with it). Once
            // it is `Closing` no thread takes it, so its flags stand still.
            let take = |e: &Entry| {
                if !e.state.claim(ConnState::Closing) {
                    return false;
                }
                let fits = if waiting {
                    as_it_is(e)
                } else {
                    e.between.load(Ordering::Relaxed) && pending_bytes(e.fd) == 0
                };
                if !fits {
                    e.state.store(ConnState::Idle);
                }
                fits
            };
            if let Some(to) = to {
                if take(e) {
                    // Under the registry lock, so no thread closes the
                    // descriptor meanwhile. A thread woken for it from here on
                    // waits for that lock (given_back), then closes this
                    // process's copy only if the connection went, and serves
                    // it if the hand-over failed and it is `Idle` again. The
                    // bytes of its request read here go with it, as they are
                    // at each try: no thread takes it while it is `Closing`,
                    // only the flusher may hold its buffers for a moment (it
                    // is then tried again, as with a full inbox).
                    let send = || {
                        let begun = e.begun.load();
                        let mut carried = match begun {
                            Begun::FastCgi => e.resume.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                            _ => Vec::new(),
                        };
                        if begun != Begun::Not {
                            match e.io.upgrade().and_then(|io| io.try_lock().ok().map(|io| io.buf.to_vec())) {
                                Some(bytes) => carried.extend_from_slice(&bytes),
                                None => return Err(io::Error::from(io::ErrorKind::WouldBlock)),
                            }
                        }
                        let mut note = note_for(w, e.listener.load(Ordering::Relaxed), e);
                        if !carried.is_empty() {
                            note.fresh = begun == Begun::BeforeProxy;
                        }
                        crate::handover::send(w.master, to, e.fd, note, &carried)
                    };
                    let mut sent = send();
                    // The sibling's inbox is full: the kernel queues few
                    // messages on it (net.unix.max_dgram_qlen, often 10) and
                    // it empties them as fast as it can. Wait a little for it,
                    // within a budget per sweep (the registry is locked). The
                    // connection is `Idle` while it waits: a request that comes
                    // meanwhile wakes a thread that serves it here.
                    let mut taken = true;
                    while matches!(&sent, Err(err) if err.kind() == io::ErrorKind::WouldBlock)
                        && wait_budget > 0
                    {
                        wait_budget -= 1;
                        e.state.store(ConnState::Idle);
                        std::thread::sleep(Duration::from_micros(500));
                        if !take(e) {
                            taken = false;
                            break;
                        }
                        sent = send();
                    }
                    if !taken {
                        continue;
                    }
                    match sent {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                            // Tried again at the next sweep: closed, it would
                            // lose a request sent on it meanwhile.
                            e.state.store(ConnState::Idle);
                            left += 1;
                            continue;
                        }
                        Ok(()) => {
                            e.handed.store(true, Ordering::Relaxed);
                            w.handed.fetch_add(1, Ordering::Relaxed);
                            HANDED_OVER.fetch_add(1, Ordering::Relaxed);
                            unsafe {
                                libc::epoll_ctl(w.epfd, libc::EPOLL_CTL_DEL, e.fd, std::ptr::null_mut())
                            };
                            continue;
                        }
                        Err(err) => {
                            // Gone or draining since it was chosen: another
                            // is tried at the next sweep.
                            debug!("handing a connection to worker {to}: {err}");
                            e.state.store(ConnState::Idle);
                            left += 1;
                        }
                    }
                }
            }
        }
        let idle_keepalive = e.between.load(Ordering::Relaxed) && !pending;
        if !(expired || close_idle && idle_keepalive) {
            continue;
        }
        if pending {
            // Bytes no thread has read yet: the client sent on time and its
            // request waits for a free thread, which reads it and then judges
            // a head still incomplete by its own deadline.
            continue;
        }
        if e.state.claim(ConnState::Closing) {
            if expired && e.body_ahead.load(Ordering::Relaxed) {
                // A request whose head came whole: it gets its answer (what
                // does not fit in the socket at once is not waited for).
                let wire = match w.listeners[e.listener.load(Ordering::Relaxed)].1.protocol {
                    Protocol::Http => Some(Wire::Http),
                    Protocol::Uwsgi => Some(Wire::Uwsgi),
                    Protocol::Scgi => Some(Wire::Scgi),
                    Protocol::FastCgi => None,
                };
                if let Some(wire) = wire {
                    let reply = error_reply(wire, 408, SLOW_BODY, false);
                    unsafe {
                        libc::send(
                            e.fd,
                            reply.as_ptr().cast(),
                            reply.len(),
                            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                        )
                    };
                    e.answered_slow.store(true, Ordering::Relaxed);
                }
            }
            // The fd stays open until the owning thread sees the hang-up and
            // removes the entry under this same lock, so it cannot be reused here.
            unsafe { libc::shutdown(e.fd, libc::SHUT_RDWR) };
            if expired && !close_idle {
                debug!("closing connection idle past its timeout (fd {})", e.fd);
            }
        }
    }
    left
}

/// How long a kept-alive connection must have been idle before it may be
/// closed to make room for a new one. A client that sends a request on a
/// connection as it is closed gets no answer (a POST is not retried), and
/// one in the middle of a burst of requests is the likeliest to: the new
/// client gets a clear 503 instead.
const RECLAIM_MIN_IDLE: Duration = Duration::from_secs(1);

/// At `--max-connections`, makes room for a new connection by closing the
/// kept-alive connection idle the longest (nothing buffered, nothing sent
/// since its last response, idle [`RECLAIM_MIN_IDLE`] at least), as nginx
/// reuses idle connections when it runs out: idle keep-alive connections,
/// a proxy's pool among them, must not turn new clients away with 503. Its
/// close completes when a thread sees the hang-up, so the count runs over
/// the limit by the closes in flight. False when every connection is in
/// use, waiting for its first request, or idle only a moment.
pub(super) fn reclaim_idle(reg: &Registry) -> bool {
    let idle_since = mono_ms().saturating_sub(RECLAIM_MIN_IDLE.as_millis() as u64);
    let mut idle: Vec<&Arc<Entry>> = reg
        .entries
        .iter()
        .flatten()
        .filter(|e| {
            e.state.load() == ConnState::Idle
                && e.between.load(Ordering::Relaxed)
                && !e.handed.load(Ordering::Relaxed)
                && e.parked_at.load(Ordering::Relaxed) <= idle_since
        })
        .collect();
    idle.sort_unstable_by_key(|e| e.parked_at.load(Ordering::Relaxed));
    for e in idle {
        if pending_bytes(e.fd) > 0 {
            continue; // its next request is arriving
        }
        if e.state.claim(ConnState::Closing) {
            // As the sweep closes one past its timeout: the fd stays open
            // until a thread sees the hang-up and removes the entry under
            // the registry lock, which is held here.
            unsafe { libc::shutdown(e.fd, libc::SHUT_RDWR) };
            debug!("closed an idle kept-alive connection to make room (--max-connections or the open files limit, fd {})", e.fd);
            return true;
        }
    }
    false
}

pub(super) fn pending_bytes(fd: RawFd) -> i32 {
    let mut n: libc::c_int = 0;
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    n
}
