//! The `--stats` listener, served by the master off the request path:
//! `/metrics` (Prometheus text format), `/stats` (JSON), `/healthz` (the
//! master is alive) and `/readyz` (workers are accepting; false while
//! draining).
//!
//! Workers never answer these: the master reads what they publish in the
//! scoreboard, so a pool that is completely busy still reports on itself.

use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::access::json_string;
use crate::scoreboard::{
    InFlight, COUNTERS, C_BYTES_IN, C_BYTES_OUT, C_LATENCY, C_LATENCY_SUM_US, C_REQUESTS, C_SHED, C_TIMEOUTS,
    LATENCY_BUCKETS, PROTOCOLS,
};

/// What one worker looks like at the moment of a scrape.
pub struct WorkerView {
    pub slot: usize,
    pub pid: i32,
    pub state: &'static str,
    pub requests: u64,
    pub busy_threads: usize,
    /// Responses its offload thread is sending (they hold no thread).
    pub offloaded: usize,
    pub rss: u64,
    pub respawns: u64,
    pub age_s: f64,
    /// What its busy threads serve, then the offloaded responses (as many
    /// as the scoreboard has room to name).
    pub current: Vec<InFlight>,
    pub last_exception: Option<String>,
}

/// Everything a scrape reports.
pub struct Snapshot {
    pub master_pid: u32,
    pub phase: &'static str,
    pub ready: bool,
    pub target_workers: usize,
    pub threads: usize,
    pub uptime_s: f64,
    pub workers: Vec<WorkerView>,
    /// Counters summed over every worker that ever ran.
    pub counters: [u64; COUNTERS],
    /// (reason, count) of workers started to replace another.
    pub respawns: Vec<(&'static str, u64)>,
    /// (listener, connections waiting to be accepted).
    pub queues: Vec<(String, u32)>,
}

/// The Prometheus text exposition format (version 0.0.4).
pub fn metrics(s: &Snapshot) -> String {
    let mut o = String::with_capacity(4096);
    let c = &s.counters;
    o.push_str("# HELP corral_requests_total Requests answered, by protocol and status class.\n");
    o.push_str("# TYPE corral_requests_total counter\n");
    for (p, proto) in PROTOCOLS.iter().enumerate() {
        for class in 0..5 {
            let _ = writeln!(
                o,
                "corral_requests_total{{protocol=\"{proto}\",status=\"{}xx\"}} {}",
                class + 1,
                c[C_REQUESTS + p * 5 + class]
            );
        }
    }
    o.push_str(
        "# HELP corral_request_duration_seconds Time from a request's head to the end of its response.\n",
    );
    o.push_str("# TYPE corral_request_duration_seconds histogram\n");
    let mut cumulative = 0;
    for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += c[C_LATENCY + i];
        let _ = writeln!(o, "corral_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}");
    }
    cumulative += c[C_LATENCY + LATENCY_BUCKETS.len()];
    let _ = writeln!(o, "corral_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(o, "corral_request_duration_seconds_sum {}", c[C_LATENCY_SUM_US] as f64 / 1e6);
    let _ = writeln!(o, "corral_request_duration_seconds_count {cumulative}");
    let busy: usize = s.workers.iter().map(|w| w.busy_threads).sum();
    let offloaded: usize = s.workers.iter().map(|w| w.offloaded).sum();
    // Idle capacity is a ready worker's: one booting or draining takes no
    // new request, whatever its threads are doing.
    let ready = || s.workers.iter().filter(|w| w.state == "ready");
    let idle_threads: usize = ready().map(|w| s.threads.saturating_sub(w.busy_threads)).sum();
    gauge(
        &mut o,
        "corral_requests_in_flight",
        "Requests being served now (by a thread, or their file by an offload thread).",
        (busy + offloaded) as u64,
    );
    gauge(
        &mut o,
        "corral_offloaded_responses",
        "Responses whose file an offload thread is sending to a slow client.",
        offloaded as u64,
    );
    o.push_str("# HELP corral_workers Worker processes by state.\n# TYPE corral_workers gauge\n");
    let busy_workers = ready().filter(|w| w.busy_threads > 0).count();
    let in_state = |state: &str| s.workers.iter().filter(|w| w.state == state).count();
    let _ = writeln!(o, "corral_workers{{state=\"busy\"}} {busy_workers}");
    let _ = writeln!(o, "corral_workers{{state=\"idle\"}} {}", ready().count() - busy_workers);
    let _ = writeln!(o, "corral_workers{{state=\"booting\"}} {}", in_state("booting"));
    let _ = writeln!(o, "corral_workers{{state=\"draining\"}} {}", in_state("draining"));
    o.push_str(
        "# HELP corral_threads Worker threads by state: busy serving a request (in any worker), or idle in a \
         ready worker.\n# TYPE corral_threads gauge\n",
    );
    let _ = writeln!(o, "corral_threads{{state=\"busy\"}} {busy}");
    let _ = writeln!(o, "corral_threads{{state=\"idle\"}} {idle_threads}");
    o.push_str("# HELP corral_listen_queue Connections waiting to be accepted.\n");
    o.push_str("# TYPE corral_listen_queue gauge\n");
    for (name, q) in &s.queues {
        let _ = writeln!(o, "corral_listen_queue{{listener=\"{}\"}} {q}", label(name));
    }
    o.push_str("# HELP corral_worker_rss_bytes Resident memory of each worker.\n# TYPE corral_worker_rss_bytes gauge\n");
    for w in &s.workers {
        let _ = writeln!(o, "corral_worker_rss_bytes{{worker=\"{}\",pid=\"{}\"}} {}", w.slot, w.pid, w.rss);
    }
    o.push_str("# HELP corral_worker_respawns_total Workers started to replace another, by reason.\n");
    o.push_str("# TYPE corral_worker_respawns_total counter\n");
    for (reason, n) in &s.respawns {
        let _ = writeln!(o, "corral_worker_respawns_total{{reason=\"{reason}\"}} {n}");
    }
    counter(&mut o, "corral_request_timeouts_total", "Requests that ran past --timeout.", c[C_TIMEOUTS]);
    counter(
        &mut o,
        "corral_connections_shed_total",
        "Connections turned away with 503 (--max-connections).",
        c[C_SHED],
    );
    counter(&mut o, "corral_received_bytes_total", "Bytes read from clients and front ends.", c[C_BYTES_IN]);
    counter(&mut o, "corral_sent_bytes_total", "Response bytes sent (bodies).", c[C_BYTES_OUT]);
    gauge(
        &mut o,
        "corral_ready",
        "1 while workers accept requests, 0 while starting or draining.",
        u64::from(s.ready),
    );
    // The counters above count from the master program's start, which a
    // re-exec (USR2, a HUP that re-executes) makes anew: this tells such a
    // reset from a fall, as a client library's process_start_time_seconds.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let _ = writeln!(
        o,
        "# HELP corral_start_time_seconds When the master's program started (Unix time): the counters count \
         from there.\n# TYPE corral_start_time_seconds gauge\ncorral_start_time_seconds {:.3}",
        (now.as_secs_f64() - s.uptime_s).max(0.0)
    );
    o
}

fn gauge(o: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn counter(o: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `/stats`: the master and one object per worker.
pub fn json(s: &Snapshot) -> String {
    let mut o = String::with_capacity(2048);
    let c = &s.counters;
    let total: u64 = (0..PROTOCOLS.len() * 5).map(|i| c[C_REQUESTS + i]).sum();
    let _ = write!(
        o,
        "{{\"master\":{{\"pid\":{},\"phase\":\"{}\",\"ready\":{},\"target_workers\":{},\"threads\":{},\"uptime_s\":{:.1}}},\
         \"requests\":{total},\"timeouts\":{},\"workers\":[",
        s.master_pid, s.phase, s.ready, s.target_workers, s.threads, s.uptime_s, c[C_TIMEOUTS]
    );
    for (i, w) in s.workers.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(
            o,
            "{{\"worker\":{},\"pid\":{},\"state\":\"{}\",\"requests\":{},\"busy_threads\":{},\"offloaded\":{},\
             \"rss\":{},\"respawns\":{},\"age_s\":{:.1},\"current\":[",
            w.slot, w.pid, w.state, w.requests, w.busy_threads, w.offloaded, w.rss, w.respawns, w.age_s
        );
        for (j, r) in w.current.iter().enumerate() {
            if j > 0 {
                o.push(',');
            }
            let (method, path) = r.what.split_once(' ').unwrap_or((r.what.as_str(), ""));
            let _ = write!(
                o,
                "{{\"method\":{},\"path\":{},\"age_ms\":{},\"offloaded\":{}}}",
                json_string(method),
                json_string(path),
                r.age_ms,
                r.offloaded
            );
        }
        o.push_str("],\"last_exception\":");
        match &w.last_exception {
            Some(e) => o.push_str(&json_string(e)),
            None => o.push_str("null"),
        }
        o.push('}');
    }
    o.push_str("]}");
    o
}

/// How long a monitoring client has to send its request and take the
/// answer; one that idles past it is dropped.
pub const CONN_DEADLINE_MS: u64 = 2000;
/// The most request bytes read: a monitoring request is one short head.
const MAX_REQUEST: usize = 8192;

/// One connection to the stats listener, served by the master's poll loop
/// without ever waiting on it: a slow or idle client costs the master
/// nothing, and other probes, signals and reaping go on meanwhile.
pub struct Conn {
    fd: OwnedFd,
    buf: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    deadline: u64,
}

impl Conn {
    /// A connection just accepted (non-blocking).
    pub fn new(fd: OwnedFd) -> Conn {
        Conn {
            fd,
            buf: Vec::new(),
            out: Vec::new(),
            sent: 0,
            deadline: crate::date::mono_ms() + CONN_DEADLINE_MS,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The poll events this connection waits for.
    pub fn events(&self) -> libc::c_short {
        if self.out.is_empty() {
            libc::POLLIN
        } else {
            libc::POLLOUT
        }
    }

    pub fn deadline(&self) -> u64 {
        self.deadline
    }

    /// Reads or writes what the socket allows now; true when the exchange
    /// is over and the connection can be closed.
    pub fn advance(&mut self, snapshot: &dyn Fn() -> Snapshot) -> bool {
        self.advance_with(&|request| response(request, snapshot))
    }

    /// [`Conn::advance`], answering the request head with `answer`.
    fn advance_with(&mut self, answer: &dyn Fn(&[u8]) -> Vec<u8>) -> bool {
        if self.out.is_empty() {
            let mut chunk = [0u8; 2048];
            loop {
                let n = unsafe { libc::read(self.fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
                if n == 0 {
                    return true;
                }
                if n < 0 {
                    match after_error() {
                        None => continue,
                        Some(done) => return done,
                    }
                }
                self.buf.extend_from_slice(&chunk[..n as usize]);
                // A head ends at an empty line; a bare LF ends lines for
                // curl-less probes written by hand (printf '...\n\n').
                let ended = self.buf.windows(4).any(|w| w == b"\r\n\r\n")
                    || self.buf.windows(2).any(|w| w == b"\n\n");
                if ended || self.buf.len() > MAX_REQUEST {
                    self.out = answer(&self.buf);
                    break;
                }
            }
        }
        while self.sent < self.out.len() {
            let rest = &self.out[self.sent..];
            let n = unsafe { libc::write(self.fd(), rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                match after_error() {
                    None => continue,
                    Some(done) => return done,
                }
            }
            self.sent += n as usize;
        }
        true
    }
}

/// What the read or write that just failed means for the exchange: `None`
/// to try again at once (EINTR), `Some(false)` to wait for the socket,
/// `Some(true)` when it is over.
fn after_error() -> Option<bool> {
    match io::Error::last_os_error().kind() {
        io::ErrorKind::Interrupted => None,
        io::ErrorKind::WouldBlock => Some(false),
        _ => Some(true),
    }
}

/// The method and path of a request head sent to the stats listener.
fn method_and_path(request: &[u8]) -> (&[u8], &[u8]) {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    // A probe typed by hand may leave out the version: its CR then ends the target.
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    (method, target.split(|&b| b == b'?').next().unwrap_or_default())
}

/// The whole response to a request head sent to the stats listener.
pub fn response(request: &[u8], snapshot: &dyn Fn() -> Snapshot) -> Vec<u8> {
    let (method, path) = method_and_path(request);
    let (status, ctype, body) = if method != b"GET" && method != b"HEAD" {
        ("405 Method Not Allowed", "text/plain", "GET or HEAD only\n".to_string())
    } else {
        match path {
            b"/metrics" => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics(&snapshot())),
            b"/stats" => ("200 OK", "application/json", json(&snapshot())),
            b"/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
            b"/readyz" => {
                if snapshot().ready {
                    ("200 OK", "text/plain", "ready\n".to_string())
                } else {
                    ("503 Service Unavailable", "text/plain", "not ready\n".to_string())
                }
            }
            _ => ("404 Not Found", "text/plain", "try /metrics, /stats, /healthz or /readyz\n".to_string()),
        }
    };
    render(method, status, ctype, &body)
}

/// A response with its head as every answer of the stats listener has it.
fn render(method: &[u8], status: &str, ctype: &str, body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n", body.len())
        .into_bytes();
    if status.starts_with("405") {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    if status.starts_with("503") {
        out.extend_from_slice(b"Retry-After: 1\r\n");
    }
    crate::date::append_date_header(&mut out);
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    // HEAD: the same head as GET, Content-Length included, and no body.
    if method != b"HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// What the stats listener answers while a re-executed master imports the
/// new code (`--preload`), before it has its own records: the workers from
/// before the re-exec serve meanwhile, so the process is alive and ready;
/// the figures wait for the master.
fn interim_response(request: &[u8], old_workers: &[u32]) -> Vec<u8> {
    let (method, path) = method_and_path(request);
    let (status, body) = match path {
        _ if method != b"GET" && method != b"HEAD" => ("405 Method Not Allowed", "GET or HEAD only\n"),
        b"/healthz" => ("200 OK", "ok\n"),
        // A stop asked for during the import waits, blocked, for the master's
        // loop: the host is leaving all the same.
        b"/readyz" if stop_pending() => ("503 Service Unavailable", "stopping\n"),
        // No master supervises them meanwhile: gone, they are not replaced.
        b"/readyz" if !old_worker_serves(old_workers) => (
            "503 Service Unavailable",
            "the master is importing the new code (--preload), and no worker from before the reload is left\n",
        ),
        b"/readyz" => ("200 OK", "ready\n"),
        b"/metrics" | b"/stats" => (
            "503 Service Unavailable",
            "the master is importing the new code (--preload); the workers from before the reload serve \
             meanwhile; ask again in a moment\n",
        ),
        _ => ("404 Not Found", "try /metrics, /stats, /healthz or /readyz\n"),
    };
    render(method, status, "text/plain", body)
}

/// Whether a worker from before the re-exec still runs (one that died
/// is a zombie until the master's loop reaps it, after the import).
fn old_worker_serves(pids: &[u32]) -> bool {
    pids.iter().any(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            })
            .unwrap_or(false)
    })
}

/// Whether a signal that stops the master (TERM, INT, QUIT) came and waits
/// for the master's loop: noted by the handler that holds the signals until
/// then, or pending where they are blocked.
fn stop_pending() -> bool {
    if crate::supervise::early_stop_noted() {
        return true;
    }
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    if unsafe { libc::sigpending(set.as_mut_ptr()) } != 0 {
        return false;
    }
    let set = unsafe { set.assume_init() };
    [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT].iter().any(|&s| unsafe { libc::sigismember(&set, s) } == 1)
}

/// The stats listener served by a thread of its own while a re-executed
/// master imports the new code (`--preload`), which may take many seconds
/// in which the master's loop cannot run: health probes are answered
/// meanwhile (see [`interim_response`]), so that an orchestrator does not
/// take a reloading host out of service, or restart it.
///
/// Ended ([`Interim::finish`], or dropped) before the master forks its first
/// worker: the thread has ended by then (both join it), as the master forks
/// only without threads.
pub struct Interim {
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<Vec<Conn>>>,
    /// Held by the thread except while it waits (see [`Interim::quiet`]).
    busy: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Interim {
    /// Serves `listener` (a listening socket, borrowed until the drop).
    pub fn serve(listener: RawFd) -> io::Result<Interim> {
        use std::os::fd::FromRawFd;
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let stop_fd = stop.as_raw_fd();
        // Accepted until the queue is empty, which a blocking socket would
        // wait out.
        unsafe {
            let flags = libc::fcntl(listener, libc::F_GETFL);
            if flags < 0 || libc::fcntl(listener, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Read here, before the import, which may change the environment
        // as the thread would read it.
        let old_workers: Vec<u32> = std::env::var(crate::supervise::OLD_WORKERS_ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        let busy = std::sync::Arc::new(std::sync::Mutex::new(()));
        let held = busy.clone();
        let thread = std::thread::Builder::new()
            .name("corral-stats".into())
            .spawn(move || interim_loop(listener, stop_fd, &old_workers, &held))?;
        Ok(Interim { stop, thread: Some(thread), busy })
    }

    /// Holds the thread in its wait, where it holds nothing else: a fork
    /// while the guard lives leaves the child no lock the thread held (the
    /// allocator's, the log's).
    pub fn quiet(&self) -> std::sync::MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the thread and gives back the connections it held, a probe's
    /// request perhaps on its way in one of them, for the master's loop to
    /// answer (closed with the thread, such a probe got no answer).
    pub fn finish(mut self) -> Vec<Conn> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Vec<Conn> {
        let one: u64 = 1;
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Interim {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn interim_loop(listener: RawFd, stop: RawFd, old_workers: &[u32], busy: &std::sync::Mutex<()>) -> Vec<Conn> {
    let interim_response = |request: &[u8]| interim_response(request, old_workers);
    use std::os::fd::FromRawFd;
    let mut conns: Vec<Conn> = Vec::new();
    let hold = || busy.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let guard = hold();
        let mut fds = vec![
            libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
        ];
        fds.extend(conns.iter().map(|c| libc::pollfd { fd: c.fd(), events: c.events(), revents: 0 }));
        let now = crate::date::mono_ms();
        let timeout = conns.iter().map(|c| c.deadline().saturating_sub(now) as i32 + 1).min().unwrap_or(-1);
        drop(guard);
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let _guard = hold();
        if fds[0].revents != 0 {
            return conns;
        }
        let now = crate::date::mono_ms();
        let ready: Vec<bool> = fds[2..].iter().map(|f| f.revents != 0).collect();
        let mut i = 0;
        conns.retain_mut(|c| {
            let go_on = !(ready[i] && c.advance_with(&interim_response)) && c.deadline() > now;
            i += 1;
            go_on
        });
        if fds[1].revents & libc::POLLIN != 0 {
            loop {
                let fd = unsafe {
                    libc::accept4(
                        listener,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if fd < 0 {
                    break;
                }
                if conns.len() >= 64 {
                    // The oldest goes, as in the master's loop: a flood of
                    // idle clients must not keep a health probe out.
                    conns.remove(0);
                }
                let mut conn = Conn::new(unsafe { OwnedFd::from_raw_fd(fd) });
                if !conn.advance_with(&interim_response) {
                    conns.push(conn);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut counters = [0u64; COUNTERS];
        counters[C_REQUESTS + 1] = 3; // http 2xx
        counters[C_REQUESTS + 5 + 3] = 1; // uwsgi 4xx
        counters[C_LATENCY] = 2;
        counters[C_LATENCY + 3] = 2;
        counters[C_LATENCY_SUM_US] = 1_500_000;
        Snapshot {
            master_pid: 1,
            phase: "running",
            ready: true,
            target_workers: 1,
            threads: 2,
            uptime_s: 3.0,
            workers: vec![WorkerView {
                slot: 0,
                pid: 7,
                state: "ready",
                requests: 4,
                busy_threads: 1,
                offloaded: 1,
                rss: 1 << 20,
                respawns: 0,
                age_s: 2.0,
                current: vec![
                    InFlight { what: "GET /a\"b".into(), age_ms: 5, offloaded: false },
                    InFlight { what: "GET /big".into(), age_ms: 900, offloaded: true },
                ],
                last_exception: Some("ValueError: x".into()),
            }],
            counters,
            respawns: vec![("crash", 2)],
            queues: vec![("http://127.0.0.1:8000".into(), 0)],
        }
    }

    #[test]
    fn prometheus_text() {
        let m = metrics(&snapshot());
        assert!(m.contains("corral_requests_total{protocol=\"http\",status=\"2xx\"} 3\n"));
        assert!(m.contains("corral_requests_total{protocol=\"uwsgi\",status=\"4xx\"} 1\n"));
        assert!(m.contains("corral_request_duration_seconds_bucket{le=\"0.001\"} 2\n"));
        assert!(m.contains("corral_request_duration_seconds_bucket{le=\"0.01\"} 4\n"));
        assert!(m.contains("corral_request_duration_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(m.contains("corral_request_duration_seconds_sum 1.5\n"));
        assert!(m.contains("corral_threads{state=\"idle\"} 1\n"));
        // A booting and a draining worker are no idle capacity.
        let mut more = snapshot();
        for (slot, state, busy) in [(1, "booting", 0), (2, "draining", 1)] {
            more.workers.push(WorkerView {
                slot,
                state,
                busy_threads: busy,
                offloaded: 0,
                ..snapshot().workers.remove(0)
            });
        }
        let with_more = metrics(&more);
        for line in [
            "corral_workers{state=\"busy\"} 1\n",
            "corral_workers{state=\"idle\"} 0\n",
            "corral_workers{state=\"booting\"} 1\n",
            "corral_workers{state=\"draining\"} 1\n",
            "corral_threads{state=\"busy\"} 2\n",
            "corral_threads{state=\"idle\"} 1\n",
        ] {
            assert!(with_more.contains(line), "{line}{with_more}");
        }
        assert!(m.contains("corral_requests_in_flight 2\n"), "a thread's request and an offloaded one: {m}");
        assert!(m.contains("corral_offloaded_responses 1\n"));
        assert!(m.contains("corral_worker_respawns_total{reason=\"crash\"} 2\n"));
        // Every sample line is "name{labels} value".
        for line in m.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.rsplit_once(' ').map(|(_, v)| v.parse::<f64>().is_ok()), Some(true), "{line}");
        }
    }

    #[test]
    fn json_stats() {
        let j = json(&snapshot());
        assert!(j.starts_with("{\"master\":{\"pid\":1,"), "{j}");
        assert!(j.contains("\"requests\":4,"), "{j}");
        assert!(j.contains("\"busy_threads\":1,\"offloaded\":1,"), "{j}");
        assert!(
            j.contains(
                "\"current\":[{\"method\":\"GET\",\"path\":\"/a\\\"b\",\"age_ms\":5,\"offloaded\":false},\
                 {\"method\":\"GET\",\"path\":\"/big\",\"age_ms\":900,\"offloaded\":true}]"
            ),
            "{j}"
        );
        assert!(j.contains("\"last_exception\":\"ValueError: x\""), "{j}");
    }
}
