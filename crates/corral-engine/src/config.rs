//! Settings the engine runs with, already validated by the command line.

use std::time::Duration;

use corral_proto::http1::Limits;

use crate::listen::Addr;

/// Default `--graceful-timeout`: how long in-flight requests get to finish on
/// a graceful stop (gunicorn's default).
pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client has to send a whole request head (hyper's 30 s;
/// nginx allows 60 s per read).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle time of a keep-alive connection between requests. Long enough
/// for nginx/HAProxy upstream pools (they close first at 60 s by default).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// Default wait for the client while reading a body or writing a response.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive worker deaths during boot after which the master gives up.
pub const MAX_BOOT_FAILURES: u32 = 5;

/// What SIGINT asks for. SIGTERM is always a graceful stop and SIGQUIT
/// always a quick one; SIGINT is graceful by default, so that a Ctrl-C or a
/// container runtime configured to send INT loses no request, and quick for
/// operators used to gunicorn's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigintMode {
    #[default]
    Graceful,
    Quick,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub http: Vec<Addr>,
    pub workers: usize,
    pub threads: usize,
    pub backlog: i32,
    pub limits: Limits,
    /// Largest request body accepted (413 beyond it); `u64::MAX` for no limit.
    pub max_body_size: u64,
    pub graceful_timeout: Duration,
    pub sigint: SigintMode,
    /// After SIGTERM, time spent still serving with `/readyz` failing before
    /// the listeners close.
    pub shutdown_delay: Duration,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub io_timeout: Duration,
    /// Longest a request may run before it is answered 504 and its worker replaced.
    pub timeout: Option<Duration>,
    /// Requests after which a worker is replaced, plus up to `max_requests_jitter` more.
    pub max_requests: Option<u64>,
    pub max_requests_jitter: u64,
    /// Age after which a worker is replaced.
    pub max_worker_lifetime: Option<Duration>,
    /// Resident memory (bytes) above which a worker is replaced.
    pub reload_on_rss: Option<u64>,
    /// Adaptive pool: grow up to `workers_max` while every worker is busy,
    /// shrink back to `workers` after `scale_down_idle` without work for
    /// the extra ones. `None`: the pool stays at `workers`.
    pub workers_max: Option<usize>,
    pub scale_down_idle: Duration,
    /// Connections one worker holds at most; past it new ones get 503.
    pub max_connections: usize,
    /// Access log: where (`-` for stdout, or a file) and in what format.
    pub access_log: Option<(String, crate::access::Format)>,
    /// `--static` mounts, answered without the app.
    pub static_mounts: Vec<crate::static_files::Mount>,
    /// HTTP peers whose X-Forwarded-Proto (and kin) set the scheme.
    pub forwarded_allow: crate::forwarded::TrustedPeers,
    /// HTTP connections may start with a PROXY protocol header
    /// (`--proxy-protocol`), from these peers (`--proxy-allow-from`).
    pub proxy_protocol: bool,
    pub proxy_allow: crate::forwarded::TrustedPeers,
    /// The name in process titles (`corral: worker 2 [NAME]`); none when empty.
    pub name: String,
}

/// Default `--max-connections` per worker (gunicorn's worker_connections).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// Default idle time before an adaptive pool gives back a worker.
pub const DEFAULT_SCALE_DOWN_IDLE: Duration = Duration::from_secs(10);

impl Default for Config {
    fn default() -> Self {
        Config {
            http: Vec::new(),
            workers: 1,
            threads: 1,
            backlog: crate::listen::DEFAULT_BACKLOG,
            limits: Limits::default(),
            max_body_size: u64::MAX,
            graceful_timeout: DEFAULT_GRACEFUL_TIMEOUT,
            sigint: SigintMode::Graceful,
            shutdown_delay: Duration::ZERO,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            io_timeout: DEFAULT_IO_TIMEOUT,
            timeout: None,
            max_requests: None,
            max_requests_jitter: 0,
            max_worker_lifetime: None,
            reload_on_rss: None,
            workers_max: None,
            scale_down_idle: DEFAULT_SCALE_DOWN_IDLE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            access_log: None,
            static_mounts: Vec::new(),
            forwarded_allow: crate::forwarded::TrustedPeers::parse(crate::forwarded::DEFAULT_ALLOW)
                .expect("the default list parses"),
            proxy_protocol: false,
            proxy_allow: crate::forwarded::TrustedPeers::parse(crate::forwarded::DEFAULT_ALLOW)
                .expect("the default list parses"),
            name: String::new(),
        }
    }
}
