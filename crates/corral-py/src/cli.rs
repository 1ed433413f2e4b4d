//! The `corral` command line: options, their environment variables, and the
//! start-up sequence of the master (bind, optionally preload, supervise).

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum};
use corral_engine::{config, Addr, BindOptions, Config, Listener, Master, Protocol};
use corral_proto::http1::{Limits, HARD_MAX_HEADERS};
use pyo3::prelude::*;
use tracing::{debug, error, info, warn};

use crate::load::{load_app, AppSpec, Tried};
use crate::runtime::{AppDir, Runtime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What SIGINT does (see `corral_engine::config::SigintMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sigint {
    /// Like SIGTERM: in-flight requests finish (a second INT stops at once).
    Graceful,
    /// Like SIGQUIT: stop at once (gunicorn's meaning).
    Quick,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    #[value(alias = "warn")]
    Warning,
    /// Errors only; `critical` (gunicorn's highest level) means the same,
    /// corral's most severe lines being errors.
    #[value(alias = "critical")]
    Error,
}

/// Serve a WSGI application.
///
/// Every option can also be set with an environment variable named
/// CORRAL_<OPTION> (for example CORRAL_WORKERS=4); the command line wins.
#[derive(Debug, Parser)]
#[command(
    name = "corral",
    version,
    max_term_width = 100,
    // The last of a repeated option wins, as in gunicorn and uWSGI, so that
    // `corral $DEFAULTS "$@"` can override a default.
    args_override_self = true,
    after_help = "Also: `corral stats ADDR` prints a running server's --stats JSON once, `corral top ADDR` \
                  shows it live, `corral signal NAME PIDFILE` sends its master a signal (HUP, TERM, INT, \
                  QUIT, USR1, USR2, TTIN, TTOU)."
)]
pub struct Cli {
    /// The application: MODULE:CALLABLE, a file PATH.py:CALLABLE (loaded by its path), MODULE
    /// (callable `application`), MODULE:FACTORY() or MODULE:FACTORY(ARGS) with literal arguments.
    #[arg(value_name = "APP", env = "CORRAL_APP")]
    pub app: String,

    /// Read options from a TOML file (keys are the long option names: `workers = 4`,
    /// `http = ["127.0.0.1:8000"]`, `app = "myproject.wsgi"`), or from a gunicorn
    /// configuration file (a FILE ending in .py, or python:MODULE), whose settings are
    /// taken as the corral options of the same meaning. The command line and
    /// CORRAL_* variables win over it.
    #[arg(short = 'c', long, value_name = "FILE", env = "CORRAL_CONFIG")]
    pub config: Option<String>,

    /// Print the effective configuration, and where each value came from, then exit.
    #[arg(long)]
    pub print_config: bool,

    /// The name in process titles, as ps and top show them: `corral: master [NAME]`,
    /// `corral: worker 2 [NAME]`. Default: APP.
    #[arg(short = 'n', long, value_name = "NAME", env = "CORRAL_NAME")]
    pub name: Option<String>,

    /// Detach from the terminal and run in the background (gunicorn's -D, uWSGI's
    /// daemonize). The command returns once the workers are ready (exit 0), or with the
    /// server's exit code if it fails to start. Needs --error-log FILE (and no `--access-log
    /// -` unless --capture-output); pair it with --pidfile to signal the server later.
    #[arg(short = 'D', long, value_name = "BOOL", env = "CORRAL_DAEMON", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub daemon: bool,

    /// Check the configuration and import the application as a worker would (with --env,
    /// --chdir and --pythonpath), then exit: 0 if both are fine, 1 if the application fails
    /// to load, 2 for a configuration error. Nothing is bound or written.
    #[arg(long)]
    pub check_config: bool,

    /// Serve HTTP/1.1 on ADDR: HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N. Repeatable, or
    /// several separated by commas (so a unix:PATH cannot contain one). Default 127.0.0.1:8000
    /// when no listener is given.
    #[arg(long, short = 'b', visible_alias = "bind", value_name = "ADDR", env = "CORRAL_HTTP", value_delimiter = ',', value_parser = parse_addr)]
    pub http: Vec<String>,

    /// Serve the uwsgi protocol (nginx uwsgi_pass, Apache mod_proxy_uwsgi) on ADDR. Repeatable.
    #[arg(long, value_name = "ADDR", env = "CORRAL_UWSGI", value_delimiter = ',', value_parser = parse_addr)]
    pub uwsgi: Vec<String>,

    /// Serve FastCGI (nginx fastcgi_pass, Apache mod_proxy_fcgi, HAProxy fcgi-app) on ADDR. Repeatable.
    #[arg(long, value_name = "ADDR", env = "CORRAL_FASTCGI", value_delimiter = ',', value_parser = parse_addr)]
    pub fastcgi: Vec<String>,

    /// Serve SCGI (nginx scgi_pass, Apache mod_proxy_scgi) on ADDR. Repeatable.
    #[arg(long, value_name = "ADDR", env = "CORRAL_SCGI", value_delimiter = ',', value_parser = parse_addr)]
    pub scgi: Vec<String>,

    /// Permission bits (octal, e.g. 660) of the unix socket files corral creates.
    #[arg(long, value_name = "MODE", env = "CORRAL_SOCKET_MODE", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,

    /// Owner of the unix socket files corral creates: USER, USER:GROUP or :GROUP (names or ids).
    #[arg(long, value_name = "USER[:GROUP]", env = "CORRAL_SOCKET_OWNER")]
    pub socket_owner: Option<String>,

    /// Worker processes.
    #[arg(long, short = 'w', value_name = "N", env = "CORRAL_WORKERS", default_value_t = 1, conflicts_with = "workers_min",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,

    /// Adaptive pool: the fewest workers (in place of --workers). Needs --workers-max.
    #[arg(long, value_name = "N", env = "CORRAL_WORKERS_MIN", requires = "workers_max",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers_min: Option<u32>,

    /// Adaptive pool: grow up to N workers while every thread is busy or connections wait,
    /// shrink back after --scale-down-idle seconds with a worker to spare.
    #[arg(long, value_name = "N", env = "CORRAL_WORKERS_MAX",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers_max: Option<u32>,

    /// Adaptive pool: seconds with a worker to spare before one is stopped.
    #[arg(long, value_name = "SECS", env = "CORRAL_SCALE_DOWN_IDLE", default_value = "10",
          requires = "workers_max", value_parser = parse_positive_secs)]
    pub scale_down_idle: Duration,

    /// Connections one worker holds at most. At the limit a new one takes the place of the
    /// kept-alive connection idle the longest (closed, as nginx reuses idle connections);
    /// only when none is idle does it get 503 (logged).
    #[arg(long, visible_alias = "worker-connections", value_name = "N", env = "CORRAL_MAX_CONNECTIONS",
          default_value_t = corral_engine::config::DEFAULT_MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// Threads per worker; they run the app concurrently while it waits on I/O.
    #[arg(long, value_name = "N", env = "CORRAL_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    /// Import the app in the master before forking the workers (shares memory copy-on-write).
    /// --preload=false turns off a preload set in a config file or the environment.
    #[arg(long, value_name = "BOOL", env = "CORRAL_PRELOAD", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub preload: bool,

    /// Change to DIR before loading the app. Relative paths given to other options (log files,
    /// --pidfile, unix:PATH listeners, --static directories) are still taken from the directory
    /// corral starts in.
    #[arg(long, value_name = "DIR", env = "CORRAL_CHDIR")]
    pub chdir: Option<PathBuf>,

    /// Add DIR to the front of sys.path. Repeatable, or several separated by colons or commas
    /// (gunicorn's separator).
    #[arg(long, value_name = "DIR", env = "CORRAL_PYTHONPATH", value_delimiter = ':')]
    pub pythonpath: Vec<PathBuf>,

    /// Set an environment variable for the app. Repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", env = "CORRAL_ENV", value_parser = parse_env_pair)]
    pub env: Vec<String>,

    /// Seconds in-flight requests get to finish on a graceful stop.
    #[arg(long, value_name = "SECS", env = "CORRAL_GRACEFUL_TIMEOUT", default_value = "30",
          value_parser = parse_secs)]
    pub graceful_timeout: Duration,

    /// What SIGINT does: a graceful stop like SIGTERM, or a quick stop like SIGQUIT.
    #[arg(long, value_enum, env = "CORRAL_SIGINT", default_value = "graceful")]
    pub sigint: Sigint,

    /// Seconds to keep serving after SIGTERM/SIGINT while /readyz already answers 503, so
    /// load balancers stop sending work before the listeners close. Default 0.
    #[arg(long, value_name = "SECS", env = "CORRAL_SHUTDOWN_DELAY", default_value = "0",
          value_parser = parse_secs)]
    pub shutdown_delay: Duration,

    /// Seconds a client has to send a whole request head; also the grace a
    /// request body has once the app reads it, after which it must keep
    /// coming at 500 bytes/s on average (or the app's read fails, 408).
    #[arg(long, value_name = "SECS", env = "CORRAL_HEADER_TIMEOUT", default_value = "30",
          value_parser = parse_positive_secs)]
    pub header_timeout: Duration,

    /// Seconds a write to a client, or a wait for more of a body the app reads, may wait on the
    /// socket before the connection is given up (uWSGI's --socket-timeout): a client that stops
    /// reading holds a thread this long.
    #[arg(long, value_name = "SECS", env = "CORRAL_SOCKET_TIMEOUT", default_value = "60",
          value_parser = parse_socket_timeout)]
    pub socket_timeout: Duration,

    /// Seconds an idle keep-alive connection is kept open. 0 turns HTTP keep-alive off: every
    /// response closes its connection (gunicorn's --keep-alive 0).
    #[arg(long, visible_alias = "keep-alive", value_name = "SECS", env = "CORRAL_KEEPALIVE_TIMEOUT", default_value = "75",
          value_parser = parse_secs)]
    pub keepalive_timeout: Duration,

    /// Seconds a request may run. Past it the client gets 504 (if nothing was sent yet), the
    /// log gets the stuck thread's traceback, and the worker is replaced. A worker that takes
    /// longer to load the application is killed too. Off by default; 0 turns it off.
    #[arg(long, short = 't', value_name = "SECS", env = "CORRAL_TIMEOUT", value_parser = parse_secs)]
    pub timeout: Option<Duration>,

    /// Replace a worker after it served N requests (it finishes them first). Off by default;
    /// 0 turns it off.
    #[arg(long, value_name = "N", env = "CORRAL_MAX_REQUESTS",
          value_parser = clap::value_parser!(u64).range(0..=MAX_COUNT))]
    pub max_requests: Option<u64>,

    /// Add up to N to each worker's --max-requests, so workers do not all recycle at once.
    #[arg(
        long,
        value_name = "N",
        env = "CORRAL_MAX_REQUESTS_JITTER",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(0..=MAX_COUNT)
    )]
    pub max_requests_jitter: u64,

    /// Replace a worker after it ran for SECS seconds. Off by default; 0 turns it off.
    #[arg(long, value_name = "SECS", env = "CORRAL_MAX_WORKER_LIFETIME", value_parser = parse_secs)]
    pub max_worker_lifetime: Option<Duration>,

    /// Replace a worker whose resident memory passes MiB (checked four times a second). Off by
    /// default; 0 turns it off.
    #[arg(long, value_name = "MiB", env = "CORRAL_RELOAD_ON_RSS",
          value_parser = clap::value_parser!(u64).range(0..=MAX_RSS_MIB))]
    pub reload_on_rss: Option<u64>,

    /// Write the master's pid to FILE (removed at exit).
    #[arg(long, short = 'p', visible_alias = "pid", value_name = "FILE", env = "CORRAL_PIDFILE")]
    pub pidfile: Option<PathBuf>,

    /// Set the process umask (octal, e.g. 027) before creating sockets and files.
    #[arg(long, short = 'm', value_name = "MODE", env = "CORRAL_UMASK", value_parser = parse_umask)]
    pub umask: Option<u32>,

    /// Run the app as USER (name or id) after binding the listeners. Needs root. Log files
    /// corral creates are given to USER; existing ones must be writable by USER. The master
    /// runs as USER too: the pidfile and unix socket files are removed at exit only from
    /// directories USER may write to (a warning at start says when they will not be).
    #[arg(long, short = 'u', value_name = "USER", env = "CORRAL_USER")]
    pub user: Option<String>,

    /// Run the app with GROUP (name or id) after binding; default: USER's primary group.
    #[arg(long, short = 'g', value_name = "GROUP", env = "CORRAL_GROUP")]
    pub group: Option<String>,

    /// Serve the files under DIR at URL prefix /URL, from Rust (sendfile, ranges, ETag,
    /// precompressed .br/.gz): `--static /static=./staticfiles`. Repeatable, or several
    /// separated by commas.
    #[arg(long = "static", value_name = "/URL=DIR", env = "CORRAL_STATIC", value_delimiter = ',')]
    pub static_dirs: Vec<String>,

    /// uWSGI's static-map: serve the file FILE, or the files under DIR, at /URL, and leave
    /// every other request (not a GET or HEAD, or naming no file there) to the next mapping,
    /// then the app. Repeatable, one prefix possibly mapped to several directories tried in
    /// order, or several separated by commas; tried before the --static mounts.
    #[arg(
        long = "static-map",
        value_name = "/URL=DIR|FILE",
        env = "CORRAL_STATIC_MAP",
        value_delimiter = ','
    )]
    pub static_maps: Vec<String>,

    /// uWSGI's static-safe: a symlink in a --static or --static-map directory may lead to a
    /// file under DIR (by default it may lead only to files inside the directory served).
    /// Repeatable, or several separated by commas.
    #[arg(long = "static-safe", value_name = "DIR", env = "CORRAL_STATIC_SAFE", value_delimiter = ',')]
    pub static_safe: Vec<String>,

    /// Development: reload the workers when a .py file under the current directory (after
    /// --chdir) or a --pythonpath directory changes. --reload=false turns it off.
    #[arg(long, value_name = "BOOL", env = "CORRAL_RELOAD", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub reload: bool,

    /// Reload the workers gracefully (as HUP does) when FILE is touched, written, created or
    /// replaced (uWSGI's touch-reload), for deploy scripts: `--touch-reload
    /// /srv/app/current/tmp/restart.txt`. Looked at once a second, by path, so symlinks a
    /// deploy switches are followed. Repeatable, or several separated by commas.
    #[arg(long, value_name = "FILE", env = "CORRAL_TOUCH_RELOAD", value_delimiter = ',')]
    pub touch_reload: Vec<PathBuf>,

    /// Serve /metrics (Prometheus), /stats (JSON), /healthz and /readyz on ADDR, from the
    /// master process. Off by default.
    #[arg(long, value_name = "ADDR", env = "CORRAL_STATS", value_parser = parse_addr)]
    pub stats: Option<String>,

    /// Write an access log line per request to FILE, or to stdout with `-`. Off by default.
    #[arg(long, visible_alias = "access-logfile", value_name = "FILE|-", env = "CORRAL_ACCESS_LOG")]
    pub access_log: Option<String>,

    /// Access log format: gunicorn's %(x)s atoms (h l u t r m U q H s B b f a T M D L p
    /// {header}i {header}o {var}e), or `json`.
    #[arg(long, visible_alias = "access-logformat", value_name = "FORMAT", env = "CORRAL_ACCESS_LOG_FORMAT",
          default_value = corral_engine::access::DEFAULT_FORMAT)]
    pub access_log_format: String,

    /// Send the app's standard output and error (print, logging to stderr, C extensions'
    /// messages) to the --error-log file too, in the master and every worker; output
    /// corral itself writes to stdout (`--access-log -`) goes there as well. Needs
    /// --error-log FILE. gunicorn's option.
    #[arg(long, value_name = "BOOL", env = "CORRAL_CAPTURE_OUTPUT", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub capture_output: bool,

    /// Write the error log to FILE instead of stderr (`-`). SIGUSR1 reopens it.
    #[arg(long, visible_aliases = ["error-logfile", "log-file"], value_name = "FILE|-", env = "CORRAL_ERROR_LOG", default_value = "-")]
    pub error_log: String,

    /// Log lines as text or as JSON objects: the error log, and the access log unless
    /// --access-log-format says otherwise.
    #[arg(long, value_enum, env = "CORRAL_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Log level, in any case: debug, info, warning (warn), error (critical).
    #[arg(long, value_enum, ignore_case = true, env = "CORRAL_LOG_LEVEL", default_value = "info")]
    pub log_level: LogLevel,

    /// Serve the app under this URL prefix: SCRIPT_NAME is set to it and PATH_INFO excludes it.
    /// Defaults to the SCRIPT_NAME environment variable.
    #[arg(long, value_name = "PREFIX", env = "CORRAL_MOUNT", value_parser = parse_mount)]
    pub mount: Option<String>,

    /// Largest request body in bytes; larger ones get 413. Unlimited by default; 0 turns the
    /// limit off (as uWSGI's limit-post = 0).
    #[arg(long, value_name = "BYTES", env = "CORRAL_MAX_BODY_SIZE")]
    pub max_body_size: Option<u64>,

    /// Longest request line in bytes (414 beyond it) from an HTTP client; 0 for the most corral
    /// allows (1 MiB), as gunicorn's 0 means no limit.
    #[arg(long, value_name = "N", env = "CORRAL_LIMIT_REQUEST_LINE",
          default_value_t = corral_proto::http1::DEFAULT_MAX_REQUEST_LINE,
          value_parser = parse_line_limit)]
    pub limit_request_line: usize,

    /// Most header fields in an HTTP client's request (431 beyond it); 0 for the most corral
    /// allows (1024). A uwsgi, FastCGI or SCGI request may carry up to 1024 variables.
    #[arg(long, value_name = "N", env = "CORRAL_LIMIT_REQUEST_FIELDS",
          default_value_t = corral_proto::http1::DEFAULT_MAX_HEADERS,
          value_parser = parse_fields_limit)]
    pub limit_request_fields: usize,

    /// Longest header field line in bytes from an HTTP client (431 beyond it); 0 for the most
    /// corral allows (1 MiB).
    #[arg(long, alias = "limit-request-field_size", value_name = "N", env = "CORRAL_LIMIT_REQUEST_FIELD_SIZE",
          default_value_t = corral_proto::http1::DEFAULT_MAX_HEADER_LINE,
          value_parser = parse_line_limit)]
    pub limit_request_field_size: usize,

    /// Set SO_REUSEPORT on TCP listeners (gunicorn's --reuse-port): another server that sets it
    /// too, such as the next release started beside this one, may bind the same address and the
    /// kernel spreads new connections between them. --reuse-port=false turns it off.
    #[arg(long, value_name = "BOOL", env = "CORRAL_REUSE_PORT", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub reuse_port: bool,

    /// listen(2) backlog of each listener.
    #[arg(long, value_name = "N", env = "CORRAL_BACKLOG", default_value_t = corral_engine::listen::DEFAULT_BACKLOG,
          value_parser = clap::value_parser!(i32).range(1..=65535))]
    pub backlog: i32,

    /// HTTP peers (addresses and networks separated by commas, or `*` for any) whose
    /// X-Forwarded-Proto: https, X-Forwarded-Protocol: ssl or X-Forwarded-SSL: on make
    /// wsgi.url_scheme https, as gunicorn's option of the same name; unix socket peers
    /// count too. An empty value trusts no TCP peer, `none` no peer at all. Its default
    /// comes from FORWARDED_ALLOW_IPS when that is set, as in gunicorn.
    #[arg(long, value_name = "LIST", env = "CORRAL_FORWARDED_ALLOW_IPS",
          default_value = corral_engine::forwarded::DEFAULT_ALLOW, value_parser = parse_trusted_peers)]
    pub forwarded_allow_ips: corral_engine::forwarded::TrustedPeers,

    /// HTTP connections may start with a PROXY protocol header (v1 or v2, as HAProxy's
    /// send-proxy and AWS's NLB send it): REMOTE_ADDR and REMOTE_PORT are then the client's.
    /// Connections without one are served as they are. --proxy-protocol=false turns it off
    /// (gunicorn's off, v1, v2 and auto are taken too: v1, v2 and auto take either version).
    #[arg(long, value_name = "BOOL", env = "CORRAL_PROXY_PROTOCOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", default_value = "false", action = ArgAction::Set,
          value_parser = parse_proxy_protocol)]
    pub proxy_protocol: bool,

    /// gunicorn's worker class, for a command line written for gunicorn: corral's workers
    /// are its sync and gthread kind (--threads N), the only classes taken.
    #[arg(short = 'k', long, value_name = "CLASS", hide = true, value_parser = parse_worker_class)]
    pub worker_class: Option<String>,

    /// Peers (addresses and networks separated by commas, or `*`) allowed to send a PROXY
    /// header; one from any other peer gets 403. Unix socket peers are allowed too, unless
    /// LIST is `none`, which allows no peer at all.
    #[arg(long, value_name = "LIST", env = "CORRAL_PROXY_ALLOW_FROM",
          default_value = corral_engine::forwarded::DEFAULT_ALLOW, value_parser = parse_trusted_peers)]
    pub proxy_allow_from: corral_engine::forwarded::TrustedPeers,
}

/// The HTTP listener when none of --http, --uwsgi, --fastcgi, --scgi is
/// given and no socket was handed over by socket activation.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8000";

/// The largest --max-requests and --max-requests-jitter: far beyond any
/// use, and their sum still fits a u64.
const MAX_COUNT: u64 = 1 << 40;
/// --proxy-protocol: a boolean, or gunicorn's modes.
fn parse_proxy_protocol(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "y" | "on" | "1" | "v1" | "v2" | "auto" => Ok(true),
        "false" | "no" | "n" | "off" | "0" => Ok(false),
        _ => Err("expected true or false (or gunicorn's off, v1, v2 or auto)".into()),
    }
}

/// -k / --worker-class: the classes corral's workers are.
fn parse_worker_class(s: &str) -> Result<String, String> {
    match s {
        "sync" | "gthread" | "gunicorn.workers.sync.SyncWorker" | "gunicorn.workers.gthread.ThreadWorker" => {
            Ok(s.to_string())
        }
        _ => Err("corral's workers are gunicorn's sync and gthread kind (--threads N threads each, the GIL \
                  released while the app waits on I/O); it runs no gevent, eventlet or ASGI workers"
            .into()),
    }
}

/// The largest --reload-on-rss (1 PiB), so its byte count fits a u64.
const MAX_RSS_MIB: u64 = 1 << 30;

/// A listener address, checked when read (so a config file's bad value is
/// reported at its line); the string itself is kept for later.
fn parse_addr(s: &str) -> Result<String, String> {
    corral_engine::listen::Addr::parse(s).map(|_| s.to_string())
}

fn parse_env_pair(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(s.to_string()),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

fn parse_trusted_peers(s: &str) -> Result<corral_engine::forwarded::TrustedPeers, String> {
    corral_engine::forwarded::TrustedPeers::parse(s)
}

fn parse_mount(s: &str) -> Result<String, String> {
    if let Some((prefix, app)) = s.split_once('=') {
        // uWSGI's `mount = /prefix=module`: here the app is APP, and the
        // prefix alone is --mount.
        return Err(format!(
            "{s:?}: a URL prefix alone (uWSGI's /PREFIX=APP is --mount {prefix} with {app} as APP)"
        ));
    }
    if s.is_empty() || s.starts_with('/') {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: must start with '/'"))
    }
}

/// Octal permission bits with or without a prefix (gunicorn's --umask also
/// takes 0o22 and 0x12); no setuid, setgid or sticky bit, which mean
/// nothing in a umask or on a socket file.
fn parse_bits(s: &str, what: &str, example: &str) -> Result<u32, String> {
    let m = match (
        s.strip_prefix("0o").or_else(|| s.strip_prefix("0O")),
        s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")),
    ) {
        (Some(oct), _) => u32::from_str_radix(oct, 8),
        (_, Some(hex)) => u32::from_str_radix(hex, 16),
        _ => u32::from_str_radix(s, 8),
    }
    .map_err(|_| format!("{s:?} is not an octal {what} such as {example}"))?;
    if m > 0o777 {
        return Err(format!("{s:?} is not a {what} (at most 777)"));
    }
    Ok(m)
}

fn parse_mode(s: &str) -> Result<u32, String> {
    parse_bits(s, "socket mode", "660")
}

fn parse_umask(s: &str) -> Result<u32, String> {
    parse_bits(s, "umask", "027")
}

/// Resolves `USER[:GROUP]` (names or numeric ids) for `--socket-owner`.
fn parse_owner(s: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = if user.is_empty() {
        None
    } else if let Ok(n) = user.parse::<u32>() {
        Some(n)
    } else {
        match nix::unistd::User::from_name(user) {
            Ok(Some(u)) => Some(u.uid.as_raw()),
            _ => return Err(format!("--socket-owner {s:?}: no user named {user:?}")),
        }
    };
    let gid = match group {
        None | Some("") => None,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => match nix::unistd::Group::from_name(g) {
                Ok(Some(gr)) => Some(gr.gid.as_raw()),
                _ => return Err(format!("--socket-owner {s:?}: no group named {g:?}")),
            },
        },
    };
    if uid.is_none() && gid.is_none() {
        return Err(format!("--socket-owner {s:?}: expected USER, USER:GROUP or :GROUP"));
    }
    Ok((uid, gid))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.0..=86400.0 * 365.0).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The most bytes --limit-request-line and --limit-request-field-size allow.
const LINE_LIMIT_CEILING: usize = 1 << 20;

/// A line length limit: 16 bytes to 1 MiB, or 0 for the ceiling (gunicorn's
/// 0 means no limit; corral keeps one, so a buffer never grows unbounded).
fn parse_line_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>().map_err(|_| format!("{s:?} is not a number"))? {
        0 => Ok(LINE_LIMIT_CEILING),
        n if (16..=LINE_LIMIT_CEILING).contains(&n) => Ok(n),
        n => Err(format!("{n} is not 0 or in 16..={LINE_LIMIT_CEILING}")),
    }
}

/// A header count limit: 1 to HARD_MAX_HEADERS, or 0 for that.
fn parse_fields_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>().map_err(|_| format!("{s:?} is not a number"))? {
        0 => Ok(HARD_MAX_HEADERS),
        n if n <= HARD_MAX_HEADERS => Ok(n),
        n => Err(format!("{n} is not in 0..={HARD_MAX_HEADERS}")),
    }
}

/// A socket wait: at least a millisecond (a wait of 0 gives up at once), at
/// most a day (poll(2) takes the milliseconds as an int).
fn parse_socket_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(86400) {
        return Err("must be from 0.001 to 86400 seconds".into());
    }
    Ok(d)
}

fn parse_positive_secs(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

/// Standard descriptors closed when corral was started (`2>&-`) would be
/// taken by the next ones opened (the error log, a listener, a client's
/// socket), and what the app or a C library writes to fd 1 or 2 would go
/// there. They are opened on /dev/null first, as daemons do, and Python's
/// sys.stdin, sys.stdout and sys.stderr (None then) are files on them.
fn reserve_stdio(py: Python<'_>) {
    crate::load::null_on_closed_stdio();
    let Ok(sys) = py.import("sys") else { return };
    for (name, fd, mode) in [("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")] {
        if !sys.getattr(name).is_ok_and(|s| s.is_none()) {
            continue;
        }
        let kwargs = pyo3::types::PyDict::new(py);
        let _ = kwargs.set_item("closefd", false);
        let _ = kwargs.set_item("errors", "backslashreplace");
        if mode == "w" {
            let _ = kwargs.set_item("line_buffering", true);
        }
        if let Ok(file) = py.import("io").and_then(|io| io.call_method("open", (fd, mode), Some(&kwargs))) {
            let _ = sys.setattr(name, file);
        }
    }
}

/// Says why the command line (with the config layers) was refused, and
/// where an option it names was set when not on the command line; returns
/// the exit code (0 for --help and --version, which clap reports the same way).
fn report_parse_error(
    e: &clap::Error,
    cmd: &clap::Command,
    argv: &[String],
    origins: &crate::config_file::FileOrigins,
) -> i32 {
    let code = if e.use_stderr() { 2 } else { 0 };
    let _ = e.print();
    if e.kind() == clap::error::ErrorKind::UnknownArgument {
        if let Some(clap::error::ContextValue::String(arg)) = e.get(clap::error::ContextKind::InvalidArg) {
            let name = arg.split('=').next().unwrap_or_default();
            if let Some(eq) = crate::uwsgi_names::equivalent(name) {
                eprintln!("note: for uWSGI's {name}, corral takes {eq}");
            } else if let Some(g) = crate::gunicorn_conf::hint(name) {
                eprintln!("note: for gunicorn's {name}, corral takes {g}");
            }
            let in_gunicorn_env = std::env::var("GUNICORN_CMD_ARGS").is_ok_and(|text| {
                text.split_whitespace().any(|t| t.trim_matches(['\'', '"']).split('=').next() == Some(name))
            });
            if in_gunicorn_env {
                eprintln!("({name} is in the environment variable GUNICORN_CMD_ARGS)");
            }
        }
    }
    if let Some(clap::error::ContextValue::String(arg)) = e.get(clap::error::ContextKind::InvalidArg) {
        let id =
            arg.trim_start_matches('-').split([' ', '=', '[']).next().unwrap_or_default().replace('-', "_");
        if let Some(at) = origins.get(&id) {
            eprintln!("(that value comes from {at})");
        } else if let Some(var) = cmd
            .get_arguments()
            .find(|a| a.get_id() == id.as_str())
            .filter(|a| a.get_long().is_some_and(|l| !given_on_command_line(argv, l)))
            .and_then(|a| a.get_env())
            .filter(|var| std::env::var_os(var).is_some())
        {
            eprintln!("(that value comes from the environment variable {})", var.to_string_lossy());
        }
    }
    if e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
        // Which option set in the config file asks for the missing
        // one: the one without which the requirement goes away.
        for (id, at) in origins {
            let Some(long) =
                cmd.get_arguments().find(|a| a.get_id() == id.as_str()).and_then(|a| a.get_long())
            else {
                continue;
            };
            let prefix = format!("--{long}=");
            let without: Vec<&String> = argv.iter().filter(|a| !a.starts_with(&prefix)).collect();
            let still = cmd.clone().try_get_matches_from(without).err().map(|e| e.kind());
            if still != Some(clap::error::ErrorKind::MissingRequiredArgument) {
                eprintln!("(--{long}, which needs it, comes from {at})");
            }
        }
    }
    code
}

/// The --error-log file once the log goes there (not set for `-`).
static ERROR_LOG_FILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Entry point behind `corral` and `python -m corral`; returns the exit code.
pub fn main(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    let code = run(py, argv)?;
    if code != 0 {
        // The reason went to the log file; whoever started corral (a
        // terminal, systemd's journal) is told where to look.
        if let Some(path) = ERROR_LOG_FILE.get() {
            eprintln!("corral: exited with code {code}; the reason is in the error log {path}");
        }
    }
    Ok(code)
}

fn run(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    // Before anything can start a program (a --preload import): see there.
    corral_engine::supervise::hold_early_signals();
    // Before the app is imported (--preload), which may start threads: it
    // sets an environment variable.
    corral_engine::name_pool();
    // Before any fork or thread: see there.
    corral_engine::proctitle::init();
    // Both took their variable out of the environment; Python's copy of it
    // (os.environ, made as the interpreter started) loses them too, for the
    // app, and what it starts with os.environ, never to see them.
    let python_environ = py.import("os")?.getattr("environ")?.getattr("_data")?;
    for name in [corral_engine::POOL_ENV, corral_engine::proctitle::NAME_ENV] {
        python_environ.call_method1("pop", (pyo3::types::PyBytes::new(py, name.as_bytes()), py.None()))?;
    }
    // Before anything opens a descriptor.
    reserve_stdio(py);
    let cmd = crate::config_file::without_env_of_other_pool_kind(Cli::command(), &argv);
    let (mut argv, from_gunicorn_env) = match crate::config_file::gunicorn_cmd_args(py, &cmd, &argv) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("corral: error: {e}");
            return Ok(2);
        }
    };
    // Before the config file is looked for: the parser stops at a flag it does not know.
    crate::gunicorn_conf::join_proxy_protocol_mode(&mut argv, 1);
    let mut notes = PendingNotes(crate::gunicorn_conf::drop_moot_flags(&mut argv));
    let (mut argv, mut origins, server_hooks) = match crate::config_file::layer(py, &cmd, &argv) {
        Ok(layered) => {
            notes.0.extend(layered.notes);
            (layered.argv, layered.origins, layered.hooks)
        }
        Err(e) => {
            notes.show_as_text();
            eprintln!("corral: error: {e}");
            return Ok(2);
        }
    };
    for id in from_gunicorn_env {
        origins.insert(id, crate::config_file::GUNICORN_CMD_ARGS_ORIGIN.to_string());
    }
    crate::config_file::platform_defaults(&cmd, &mut argv, &mut origins);
    let parsed =
        cmd.clone().try_get_matches_from(&argv).and_then(|m| Cli::from_arg_matches(&m).map(|c| (m, c)));
    let (matches, mut cli) = match parsed {
        Ok(p) => p,
        Err(e) => {
            notes.show_as_text();
            return Ok(report_parse_error(&e, &cmd, &argv, &origins));
        }
    };
    let given: Vec<String> =
        cli.env.iter().filter_map(|p| p.split_once('=')).map(|(k, _)| k.to_string()).collect();
    notes.0.extend(crate::config_file::unknown_env_notes(&cmd, &given));
    // Commas separate directories too, as in gunicorn's option (clap splits
    // on one character only).
    cli.pythonpath = cli
        .pythonpath
        .iter()
        .flat_map(|p| p.to_string_lossy().split(',').map(PathBuf::from).collect::<Vec<_>>())
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    // Errors name where the options they are about were set, when that was
    // not the command line.
    let located =
        |e: &dyn std::fmt::Display| crate::config_file::whence(&e.to_string(), &cmd, &matches, &origins);
    notes.0.extend(capture_without_a_file(&mut cli));
    if cli.print_config || cli.check_config {
        notes.show_as_text();
    }
    if cli.print_config {
        use std::io::Write as _;
        // What a start would refuse, checked without creating anything, so
        // the output can be trusted as the configuration that runs.
        let checked = check_without_effects(&cli, &matches).and_then(|()| {
            match std::env::var(corral_engine::supervise::CHECK_BINDS_ENV) {
                Ok(held) => check_new_binds(&cli, &held),
                Err(_) => Ok(()),
            }
        });
        if let Err(e) = checked {
            eprintln!("corral: error: {}", located(&e));
            return Ok(2);
        }
        // A closed pipe (`| head`) is not an error.
        let _ =
            std::io::stdout().write_all(crate::config_file::describe(&cmd, &matches, &origins).as_bytes());
        return Ok(0);
    }
    if cli.check_config {
        return check_config(py, &cli, &matches, &located);
    }
    let from_file = |ids: &[&str]| -> String {
        let at: Vec<&str> = ids.iter().filter_map(|id| origins.get(*id).map(String::as_str)).collect();
        if at.is_empty() {
            String::new()
        } else {
            format!(" (set in {})", at.join(", "))
        }
    };
    // Before anything is created: the log files too.
    if let Some(mask) = cli.umask {
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    corral_engine::logfile::set_json(cli.log_format == LogFormat::Json);
    // Paths on the command line are taken from the directory corral starts
    // in, whatever --chdir says: log files (which workers and SIGUSR1 open
    // again by name), the pid file, unix sockets and static directories.
    let error_log = absolute_log_path(&cli.error_log);
    let access_log = cli.access_log.as_deref().map(absolute_log_path);
    let log_files: Vec<(&str, String)> =
        [("--error-log", Some(&error_log)), ("--access-log", access_log.as_ref())]
            .into_iter()
            .filter_map(|(flag, p)| p.filter(|p| *p != "-").map(|p| (flag, p.clone())))
            .collect();
    // Opened as root for a user who may write their directory (see there).
    corral_engine::logfile::set_no_follow(cli.user.is_some() && nix::unistd::geteuid().is_root());
    if let Err(e) = daemon_needs_files(&cli).and_then(|()| touch_files_named(&cli)) {
        eprintln!("corral: error: {}", located(&e));
        return Ok(2);
    }
    corral_engine::logfile::set_capture(cli.capture_output);
    if let Err(e) = corral_engine::logfile::set_error_log(&error_log) {
        eprintln!("corral: {e}");
        return Ok(2);
    }
    // With --capture-output standard error is that log too.
    if error_log != "-" && !cli.capture_output {
        let _ = ERROR_LOG_FILE.set(error_log.clone());
    }
    // A re-executed master is the daemon already (same pid, same session),
    // and may owe the command that started it word of its readiness.
    corral_engine::daemon::inherit();
    if cli.daemon && std::env::var_os(corral_engine::supervise::INHERIT_ENV).is_none() {
        daemonize(&error_log);
        if let Err(e) = corral_engine::logfile::capture_again() {
            corral_engine::logfile::write(format!("corral: {e}\n").as_bytes());
            return Ok(2);
        }
    }
    crate::logging::init(cli.log_level);
    // As gunicorn's debug level starts with its settings.
    debug!("Current configuration:\n{}", crate::config_file::describe(&cmd, &matches, &origins).trim_end());
    notes.log();
    if cli.capture_output {
        // Written line by line, as to a terminal: a worker killed past
        // --timeout would lose what a block buffer held.
        let stdout = py.import("sys")?.getattr("stdout")?;
        if !stdout.is_none() {
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item("line_buffering", true)?;
            let _ = stdout.call_method("reconfigure", (), Some(&kwargs));
        }
    }
    // --log-format json makes both logs JSON unless the access log's format is set.
    let access_format = match access_format(&cli, &matches) {
        Ok(f) => f,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };
    if access_log.is_none()
        && !matches!(
            matches.value_source("access_log_format"),
            None | Some(clap::parser::ValueSource::DefaultValue)
        )
    {
        // gunicorn takes the format alone too, and writes no access log.
        warn!("--access-log-format is set, but no access log is written without --access-log FILE (or -)");
    }
    if let Some(target) = &access_log {
        // Opened here once so a bad path fails at start, not in every worker.
        if let Err(e) = corral_engine::access::Sink::open(target) {
            error!("{}", located(&e));
            return Ok(2);
        }
    }
    let start_dir = logical_cwd();
    // As they were read at this start (a HUP re-reads them if one changed):
    // the --config file, and the files a uWSGI ini file includes.
    let config_files: Vec<(PathBuf, Vec<u8>)> = match cli.config.as_deref() {
        Some(spec) if crate::uwsgi_ini::is_uwsgi_ini(spec) => crate::uwsgi_ini::files_read(spec),
        Some(spec) => crate::gunicorn_conf::file_of(py, spec).into_iter().collect(),
        None => Vec::new(),
    }
    .into_iter()
    .map(|p| std::path::absolute(&p).unwrap_or(p))
    .filter_map(|p| std::fs::read(&p).ok().map(|read| (p, read)))
    .collect();
    let pidfile = cli.pidfile.as_deref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    let touch_files: Vec<PathBuf> =
        cli.touch_reload.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())).collect();
    // A pidfile that cannot be written is a configuration error, found before
    // anything is bound, as --check-config finds it.
    if let Err(e) = pidfile_usable(&cli) {
        error!("{}", located(&e));
        return Ok(2);
    }
    if let Some((path, pid)) = pidfile.as_deref().and_then(|p| running_corral(p).map(|pid| (p, pid))) {
        error!(
            "--pidfile {}: corral is already running there as pid {pid}; stop it first, or choose another file",
            path.display()
        );
        return Ok(1);
    }
    // Without --chdir a relative socket path stays relative: the 108 bytes
    // of a socket address may not hold it joined to a deep directory.
    let chdir_from = start_dir.as_deref().filter(|_| cli.chdir.is_some());
    let static_mounts = match static_mounts(&cli) {
        Ok(m) => m,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };

    // Each new worker enters it again by name (as gunicorn's and uWSGI's
    // reloads do): see AppDir.
    let chdir_named = match cli.chdir.as_deref() {
        Some(d) => Some(AppDir::Chdir(std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf()))),
        None => start_dir.clone().map(AppDir::Started),
    };
    match prepare_import(py, &cli)? {
        Ok(warnings) => warnings.iter().for_each(|w| warn!("{w}")),
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    }

    let spec = match AppSpec::parse(&cli.app) {
        Ok(s) => s,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };
    // An app loaded by its path is watched by --reload where it lies, as
    // the current directory and --pythonpath are.
    let app_dir = spec
        .file
        .as_deref()
        .and_then(|f| std::path::absolute(f).ok())
        .and_then(|p| p.parent().map(PathBuf::from));
    let mount = match mount_prefix(&cli) {
        Ok(m) => m,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };

    let mut wanted = listeners_given(&cli);
    // Socket activation: descriptors from the service manager. Named ones
    // (FileDescriptorName=http, uwsgi, fastcgi, scgi) get that protocol.
    // Each is served, beside the listeners given, unless one of those names
    // it as fd://N: the service manager queues connections on it whatever
    // corral does, and one left unserved would leave them hanging.
    let activated = corral_engine::systemd::take_listen_fds();
    // Python copied the environment at start-up: drop these from its copy
    // too, or the app and its subprocesses would still see them.
    let environ = py.import("os")?.getattr("environ")?;
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        environ.call_method1("pop", (var, py.None()))?;
    }
    let activated_addrs: Vec<(Protocol, String)> = activated
        .iter()
        .map(|(fd, name)| {
            let protocol = match name.as_deref() {
                Some("uwsgi") => Protocol::Uwsgi,
                Some("fastcgi") => Protocol::FastCgi,
                Some("scgi") => Protocol::Scgi,
                // systemd names a socket without FileDescriptorName= after its unit.
                Some("http") | Some("") | None => Protocol::Http,
                Some(unit) if unit.ends_with(".socket") => Protocol::Http,
                Some(other) => {
                    warn!(
                        "Socket-activated fd {fd} is named {other:?} (FileDescriptorName=), which is none of \
                         http, uwsgi, fastcgi, scgi: serving HTTP on it"
                    );
                    Protocol::Http
                }
            };
            (protocol, format!("fd://{fd}"))
        })
        .collect();
    // Listeners taken from socket activation are handed to a re-executed
    // master the same way, or it would fall back to the default address.
    let fd_of = |a: &str| a.strip_prefix("fd://").and_then(|n| n.parse::<i32>().ok());
    let named: Vec<i32> =
        wanted.iter().map(|(_, a)| *a).chain(cli.stats.as_deref()).filter_map(fd_of).collect();
    let given = !wanted.is_empty();
    let unnamed: Vec<(Protocol, &str)> = activated_addrs
        .iter()
        .filter(|(_, a)| fd_of(a).is_some_and(|fd| !named.contains(&fd)))
        .map(|(p, a)| (*p, a.as_str()))
        .collect();
    // Only what can be a listener: the service manager may pass other
    // descriptors too (a datagram socket, its fd store). Named as fd://N,
    // one is refused by the listener itself, with the reason.
    let (unnamed, others): (Vec<_>, Vec<_>) =
        unnamed.into_iter().partition(|(_, a)| fd_of(a).is_some_and(is_listening_stream));
    if !others.is_empty() {
        let list = others.iter().map(|(_, a)| *a).collect::<Vec<_>>().join(", ");
        if !given && unnamed.is_empty() {
            error!(
                "Socket activation passed no listening stream socket ({list}): nothing to serve; give \
                 the service's socket unit a ListenStream=, or a listener (--http and the like)"
            );
            return Ok(2);
        }
        info!("Not serving what the service manager passed that is not a listening stream socket: {list}");
    }
    if given && !unnamed.is_empty() {
        info!(
            "Also serving what the service manager passed (socket activation): {}",
            unnamed.iter().map(|(p, a)| format!("{} on {a}", p.name())).collect::<Vec<_>>().join(", ")
        );
    }
    let from_activation = !unnamed.is_empty();
    wanted.extend(unnamed);
    let defaulted = wanted.is_empty();
    if defaulted {
        wanted.push((Protocol::Http, DEFAULT_HTTP));
    }
    let ids = match resolve_ids(cli.user.as_deref(), cli.group.as_deref()) {
        Ok(ids) => ids,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };
    if let Some((uid, gid, name)) = &ids {
        // Workers run as that user, open the access log themselves and
        // reopen both logs on SIGUSR1: the files must be theirs to write.
        for (flag, path) in &log_files {
            if let Err(e) = give_log_to_user(path, *uid, *gid, name) {
                error!("{}", located(&format!("{flag} {path}: {e}")));
                return Ok(2);
            }
        }
        corral_engine::logfile::forget_created();
        // A re-exec (USR2, HUP with --preload or after the file changed)
        // reads the configuration again as that user.
        if nix::unistd::geteuid().is_root() {
            for (path, _) in &config_files {
                if let Err(e) = user_may_read(&path.to_string_lossy(), *uid, *gid, name) {
                    warn!(
                        "--config {}: {e}; a reload that re-executes the master (USR2, HUP with --preload or \
                         after the file changed) will be refused until it can",
                        path.display()
                    );
                }
            }
        }
    }
    let (parsed, stats_addr) = match listener_addrs(&cli, &wanted, chdir_from) {
        Ok(addrs) => addrs,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };
    let option = |p: &Protocol| match defaulted {
        true => format!("the default --{}", p.name()),
        false => format!("--{}", p.name()),
    };
    let tcp = parsed.iter().map(|(p, a)| (option(p), a));
    if let Err(e) = distinct_tcp_listeners(tcp.chain(stats_addr.as_ref().map(|a| ("--stats".to_string(), a))))
    {
        error!("{}", located(&e));
        return Ok(2);
    }
    let owner = match cli.socket_owner.as_deref().map(parse_owner).transpose() {
        Ok(o) => o,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };
    // As gunicorn does: without --socket-owner, the socket files belong to
    // the user the workers run as (the socket's permission bits then let a
    // front end running as that user connect).
    let given_owner = owner.is_some();
    // A part --socket-owner leaves out (`:GROUP`, `USER`) is --user's too,
    // not root's, which binds the socket.
    let user_ids = ids.as_ref().map(|(uid, gid, _)| (*uid, *gid));
    let owner = match (owner, user_ids) {
        (Some((uid, gid)), Some((u, g))) => Some((uid.or(Some(u)), gid.or(Some(g)))),
        (Some(o), None) => Some(o),
        (None, ids) => ids.map(|(u, g)| (Some(u), Some(g))),
    };
    let v4_ports = parsed
        .iter()
        .filter_map(|(_, a)| match a {
            Addr::Tcp(host, port) if !host.contains(':') => Some(*port),
            _ => None,
        })
        .collect();
    let given =
        |id: &str| !matches!(matches.value_source(id), None | Some(clap::parser::ValueSource::DefaultValue));
    let bind = BindOptions {
        mode: cli.socket_mode,
        owner,
        reuse_port: cli.reuse_port,
        v4_ports,
        backlog_given: given("backlog"),
    };
    let socket_files = parsed.iter().any(|(_, a)| matches!(a, Addr::Unix(_)))
        || cli.stats.as_deref().is_some_and(|s| s.starts_with("unix:"));
    if !socket_files {
        for (flag, given) in [("--socket-mode", cli.socket_mode.is_some()), ("--socket-owner", given_owner)] {
            if given {
                warn!("{flag} is not used: no listener is a unix:PATH socket corral creates");
            }
        }
    }
    if cli.reuse_port && !parsed.iter().any(|(_, a)| matches!(a, Addr::Tcp(..))) {
        warn!("--reuse-port is not used: no listener is a HOST:PORT socket corral binds");
    }
    // Both read what HTTP clients send; a front end's uwsgi, FastCGI or SCGI
    // request carries the client's address and scheme in its own variables.
    let http = parsed.iter().any(|(p, _)| *p == Protocol::Http);
    if !http && cli.proxy_protocol {
        warn!("--proxy-protocol is not used: it applies to --http listeners, and there is none");
    }
    let limits: Vec<&str> = [
        ("limit_request_line", "--limit-request-line"),
        ("limit_request_fields", "--limit-request-fields"),
        ("limit_request_field_size", "--limit-request-field-size"),
    ]
    .into_iter()
    .filter(|(id, _)| given(id))
    .map(|(_, flag)| flag)
    .collect();
    if !http && !limits.is_empty() {
        let (is, limit) = if limits.len() == 1 { ("is", "it limits") } else { ("are", "they limit") };
        warn!(
            "{} {is} not used: {limit} what HTTP clients send to --http listeners, and there is none (a front \
             end applies its own limits before uwsgi, FastCGI or SCGI: nginx's large_client_header_buffers)",
            limits.join(", ")
        );
    }
    if !http && given("forwarded_allow_ips") {
        warn!(
            "--forwarded-allow-ips is not used: it applies to --http listeners, and there is none (over uwsgi, \
             FastCGI and SCGI the front end's HTTPS variable sets the scheme)"
        );
    }
    // Taken, as gunicorn takes it (its example files set both, and a
    // deployment may turn recycling off by leaving out the count alone).
    if cli.max_requests.is_none() && cli.max_requests_jitter > 0 {
        warn!("--max-requests-jitter is not used: it varies --max-requests, which is not given");
    }
    if cli.max_requests == Some(0) && cli.max_requests_jitter > 0 {
        warn!("--max-requests-jitter is not used: --max-requests is 0, which turns recycling off");
    }
    if given("proxy_allow_from") && !cli.proxy_protocol {
        warn!("--proxy-allow-from is not used: it names who may send a PROXY header, and --proxy-protocol is off");
    }
    let workers = match pool_size(&cli, &from_file(&["workers_min", "workers_max", "workers"])) {
        Ok(n) => n,
        Err(e) => {
            error!("{}", located(&e));
            return Ok(2);
        }
    };
    let config = Config {
        http: parsed.iter().map(|(_, a)| a.clone()).collect(),
        workers: workers as usize,
        threads: cli.threads as usize,
        backlog: cli.backlog,
        limits: Limits {
            max_request_line: cli.limit_request_line,
            max_headers: cli.limit_request_fields,
            max_header_line: cli.limit_request_field_size,
        },
        max_body_size: cli.max_body_size.filter(|&n| n > 0).unwrap_or(u64::MAX),
        graceful_timeout: cli.graceful_timeout,
        sigint: match cli.sigint {
            Sigint::Graceful => config::SigintMode::Graceful,
            Sigint::Quick => config::SigintMode::Quick,
        },
        shutdown_delay: cli.shutdown_delay,
        header_timeout: cli.header_timeout,
        keepalive_timeout: cli.keepalive_timeout,
        io_timeout: cli.socket_timeout,
        // 0 is "off", as in gunicorn.
        timeout: cli.timeout.filter(|d| !d.is_zero()),
        max_requests: cli.max_requests.filter(|&n| n > 0),
        max_requests_jitter: cli.max_requests_jitter,
        max_worker_lifetime: cli.max_worker_lifetime.filter(|d| !d.is_zero()),
        reload_on_rss: cli.reload_on_rss.filter(|&m| m > 0).map(|m| m << 20),
        workers_max: cli.workers_max.map(|m| m as usize),
        scale_down_idle: cli.scale_down_idle,
        max_connections: cli.max_connections as usize,
        access_log: access_log.clone().map(|t| (t, access_format)),
        static_mounts,
        forwarded_allow: cli.forwarded_allow_ips.clone(),
        proxy_protocol: cli.proxy_protocol,
        proxy_allow: cli.proxy_allow_from.clone(),
        name: cli.name.clone().unwrap_or_else(|| cli.app.clone()),
    };

    // Set by the program this master replaced (HUP with --preload, USR2, --reload).
    let reexec_with_workers =
        std::env::var(corral_engine::supervise::OLD_WORKERS_ENV).is_ok_and(|v| !v.trim().is_empty());
    // Imported before the listeners are bound, as gunicorn does: while a
    // slow import runs, a front end balancing over several hosts finds this
    // one refusing and goes to another at once, where a bound socket would
    // queue its requests for the whole import (and reset them if it fails).
    // After a re-exec the previous program's sockets are still open here:
    // each goes to the listener asking for its address (the configuration
    // read again may have added, removed or reordered listeners).
    let mut inherited = corral_engine::supervise::take_inherited_listeners();
    let asked: Vec<(&str, &Addr)> =
        parsed.iter().map(|(p, a)| (p.name(), a)).chain(stats_addr.iter().map(|a| ("stats", a))).collect();
    let reused = assign_inherited(&mut inherited, &asked);
    // Probes the import's thread held when the import ended, for the
    // master's loop to answer.
    let mut interim_conns = Vec::new();
    fn interrupt_import() {
        if !crate::load::stop_import_child() {
            // SAFETY: async-signal-safe, as CPython documents it.
            unsafe { pyo3::ffi::PyErr_SetInterruptEx(libc::SIGINT) };
        }
    }
    let preloaded = if cli.preload {
        // The import of a re-exec may take long, and the master's loop does
        // not run meanwhile: health probes are answered by a thread, which
        // ends with the import, before anything forks.
        let stats_fd =
            reused.last().copied().flatten().filter(|_| stats_addr.is_some() && reexec_with_workers);
        let interim = stats_fd.and_then(|fd| match corral_engine::stats::Interim::serve(fd) {
            Ok(i) => Some(i),
            Err(e) => {
                warn!("--stats: cannot answer probes during the import: {e}");
                None
            }
        });
        let tried = match reexec_with_workers {
            true => crate::load::import_in_child(py, &spec, interrupt_import, interim.as_ref())
                .unwrap_or_else(|e| {
                    warn!("Cannot try the new code's import in a child first ({e}); importing it here");
                    Tried::Survived
                }),
            false => Tried::Survived,
        };
        let (loaded, interrupted) = match tried {
            Tried::Died(how) => {
                (Err(format!("The new code's import ended the process that tried it first: {how}")), false)
            }
            Tried::Stopped => (Err(String::new()), true),
            Tried::Survived => {
                corral_engine::supervise::importing(true, interrupt_import);
                *ENV_AT_IMPORT.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(std::env::vars_os().collect());
                let loaded = load_app(py, &spec);
                (loaded, corral_engine::supervise::importing(false, interrupt_import))
            }
        };
        interim_conns = interim.map(|i| i.finish()).unwrap_or_default();
        match loaded {
            Ok(app) => {
                info!("Preloaded application {}", cli.app);
                warn_threads_of_the_import(py);
                Some(app)
            }
            Err(_) if interrupted && reexec_with_workers => {
                // The stop is acted on as soon as the master supervises.
                info!("Stopped while the new code was being imported (--preload); the workers from before the re-exec stop too");
                None
            }
            Err(_) if interrupted => {
                info!("Stopped while the application was being imported (--preload)");
                if let Some(path) = pidfile.as_deref().filter(|p| pidfile_names_this_master(p)) {
                    let _ = std::fs::remove_file(path);
                }
                return Ok(0);
            }
            Err(msg) if reexec_with_workers => {
                // The workers from before the re-exec still serve the code
                // that loaded: keep them, and let new workers import the app
                // themselves until it loads (the master then replaces them).
                error!("{msg}");
                error!(
                    "The new code could not be preloaded; the workers from before the re-exec keep serving \
                     the previous code, and new workers import the application themselves (without \
                     --preload) until it loads"
                );
                None
            }
            Err(msg) => {
                error!("{msg}");
                // Written by the program this one replaced, if any.
                if let Some(path) = pidfile.as_deref().filter(|p| pidfile_names_this_master(p)) {
                    let _ = std::fs::remove_file(path);
                }
                return Ok(corral_engine::supervise::MASTER_EXIT_APP_LOAD);
            }
        }
    } else {
        None
    };

    // gunicorn's order: the pool's size is set, then on_starting, then the
    // listeners are bound.
    if !server_hooks.is_empty() {
        let server = crate::server_hooks::server(py, std::process::id(), config.workers, &config.name)?;
        server_hooks.run(py, "nworkers_changed", (&server, config.workers, py.None()));
        if !server_hooks.run(py, "on_starting", (&server,)) {
            error!("Not starting: the `on_starting` hook failed (see above)");
            return Ok(1);
        }
    }
    // The kernel cuts a longer queue to net.core.somaxconn without a word
    // (the default is under it on kernels since 5.4).
    if let Some(max) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|max| bind.backlog_given && config.backlog > *max)
    {
        warn!(
            "--backlog {} is more than the kernel's net.core.somaxconn ({max}): each listener's queue holds {max} \
             connections (raise it with sysctl, or in a container with its sysctls){}",
            config.backlog,
            from_file(&["backlog"])
        );
    }
    let mut listeners = Vec::new();
    let mut reused = reused.into_iter();
    for (protocol, addr) in parsed.iter() {
        let reuse = reused.next().flatten();
        let bound = match reuse {
            Some(fd) => Listener::adopt(fd, addr, *protocol),
            None => Listener::bind_with(addr, *protocol, config.backlog, bind.clone()),
        };
        match bound {
            Ok(l) => {
                info!("Listening at: {}", l.url());
                if let (Some(path), None) = (&l.unix_path, cli.socket_mode) {
                    use std::os::unix::fs::PermissionsExt;
                    let mode =
                        std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o777);
                    if mode & 0o022 == 0 {
                        // gunicorn makes its sockets 0777: a front end running
                        // as another user would get "permission denied" (502).
                        info!(
                            "{} has mode {mode:03o} (from the umask): only processes of its owner can connect; \
                             for a front end running as another user, give --socket-mode 660 with \
                             --socket-owner USER:GROUP (or 666)",
                            path.display()
                        );
                    }
                }
                if protocol.trusts_peer() && l.is_public() {
                    warn!(
                        "The {} listener {} is reachable from other machines: the {} protocol trusts \
                         whatever its peer sends (client address, scheme, paths) and must not face \
                         the internet; bind it to a loopback address or a unix socket behind the front end",
                        protocol.name(),
                        l.url(),
                        protocol.name()
                    );
                }
                listeners.push(l);
            }
            Err(e) => {
                error!("{}", located(&format!("--{}: {e}", protocol.name())));
                return Ok(1);
            }
        }
    }

    let stats = match &stats_addr {
        None => None,
        Some(addr) => {
            // Inherited across a re-exec like the other listeners.
            let bound = match reused.next().flatten() {
                Some(fd) => Listener::adopt(fd, addr, Protocol::Http),
                None => Listener::bind_with(addr, Protocol::Http, 64, bind.clone()),
            };
            match bound {
                Ok(l) => {
                    info!("Stats at: {}", l.url());
                    if l.is_public() {
                        warn!(
                            "The stats listener {} is reachable from other machines: /stats shows the \
                             requests in flight (paths with their query strings) and the app's last \
                             exception; let only the probes and the metrics scraper reach it (a firewall, \
                             a NetworkPolicy), or bind it to a loopback address",
                            l.url()
                        );
                    }
                    Some(l)
                }
                Err(e) => {
                    // As for any listener: 1, not a configuration error.
                    error!("{}", located(&format!("--stats {e}")));
                    return Ok(1);
                }
            }
        }
    };
    for (_, addr, fd) in inherited.iter().filter(|e| e.2 >= 0) {
        info!("Closing inherited listener {addr} that the command line no longer asks for");
        unsafe { libc::close(*fd) };
    }
    if let Some(path) = pidfile.as_deref().filter(|p| !pidfile_names_this_master(p)) {
        if let Err(e) = write_pidfile(path) {
            error!("--pidfile {}: {e}", path.display());
            return Ok(1);
        }
    }
    // After a re-exec whose configuration moved the pid file: the old one
    // names this same process, and would be left behind for good.
    if let Some(previous) = std::env::var_os(crate::runtime::PREVIOUS_PIDFILE_ENV) {
        std::env::remove_var(crate::runtime::PREVIOUS_PIDFILE_ENV);
        let previous = PathBuf::from(previous);
        let ours =
            std::fs::read_to_string(&previous).is_ok_and(|t| t.trim() == std::process::id().to_string());
        // The same file under another name (a symlinked /var/run) is the one just written.
        let identity = |p: &std::path::Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
        };
        let same =
            pidfile.as_deref().is_some_and(|p| identity(p).is_some() && identity(p) == identity(&previous));
        if ours && !same {
            match std::fs::remove_file(&previous) {
                Ok(()) => info!("Removed the previous pid file {}", previous.display()),
                Err(e) => warn!("--pidfile {}: cannot remove the previous one: {e}", previous.display()),
            }
        }
    }
    let file_id = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(p).ok().map(|m| (m.dev(), m.ino()))
    };
    let written = pidfile.as_deref().and_then(file_id);
    let remove_pidfile = || {
        // Only while it still names this master: never another's. After
        // --user the file may not be readable any more; then it is ours if
        // it is still the file this master wrote.
        let ours = |p: &std::path::Path| match std::fs::read_to_string(p) {
            Ok(text) => text.trim() == std::process::id().to_string(),
            Err(_) => written.is_some() && file_id(p) == written,
        };
        if let Some(path) = pidfile.as_deref().filter(|p| ours(p)) {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    // After --user, the pidfile's directory may not be ours to change.
                    warn!("--pidfile {}: cannot remove it: {e}", path.display());
                }
                _ => {}
            }
        }
    };
    // After --preload: the app is imported with the rights it was started
    // with (as gunicorn's master does), then the whole process switches.
    if let Some((uid, gid, name)) = &ids {
        if let Err(e) = drop_privileges(*uid, *gid, name) {
            error!("{}", located(&e));
            remove_pidfile();
            return Ok(1);
        }
        info!("Running as user {name} (uid {uid}, gid {gid})");
        // Said now rather than at exit: the master runs as USER too, and
        // removes its files only from a directory USER may change.
        let sockets = parsed.iter().filter_map(|(_, a)| match a {
            Addr::Unix(p) => Some(("the socket file", p.as_path())),
            _ => None,
        });
        for (what, path) in pidfile.as_deref().map(|p| ("--pidfile", p)).into_iter().chain(sockets) {
            let dir =
                path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            if !removable(path, dir) {
                warn!(
                    "{what} {} will be left in place at exit: {name}, whom the master runs as, may not \
                     remove it from {}",
                    path.display(),
                    dir.display()
                );
            }
        }
    }

    info!(
        "Starting corral {} with {} worker(s) x {} thread(s), pid {}",
        env!("CARGO_PKG_VERSION"),
        config.workers,
        config.threads,
        std::process::id()
    );
    raise_open_files_limit(config.max_connections);
    let sys = py.import("sys")?;
    let reexec = crate::runtime::Reexec {
        exe: sys.getattr("executable")?.extract::<String>()?,
        argv: sys.getattr("orig_argv")?.extract::<Vec<String>>()?,
        start_dir,
        listen_fds: if from_activation { activated.clone() } else { Vec::new() },
        settings: cli
            .config
            .as_deref()
            .filter(|spec| crate::gunicorn_conf::is_gunicorn_config(spec))
            .map(|_| crate::config_file::describe(&cmd, &matches, &origins)),
        config_files,
        pidfile: pidfile.clone(),
    };
    let runtime = Runtime::new(spec, preloaded, cli.preload, mount, chdir_named, &config, reexec)
        .with_hooks(server_hooks)
        .serving_load_errors(cli.reload);
    let graceful_timeout = config.graceful_timeout;
    let mut master = match Master::new(config, listeners, &runtime) {
        Ok(m) => m,
        Err(e) => {
            error!("cannot start the master: {e}");
            remove_pidfile();
            return Ok(1);
        }
    };
    if let Some(l) = stats {
        master.set_stats(l);
        master.adopt_stats_conns(interim_conns);
    }
    if cli.reload {
        let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
        roots.extend(cli.pythonpath.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())));
        let app_dir = app_dir.filter(|d| !roots.iter().any(|r| d.starts_with(r)));
        match corral_engine::watch::Watcher::new(&roots) {
            Ok(mut w) => {
                if let Some(dir) = &app_dir {
                    w.add_dir(dir);
                    roots.push(dir.clone());
                }
                info!(
                    "--reload: watching {} director(ies) under {} for .py changes",
                    w.watched(),
                    roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
                );
                if let (n @ 1.., Some(first)) = w.unwatched() {
                    warn!("--reload: {n} director(ies) could not be watched, so changes there reload nothing; first {first}");
                }
                if roots.iter().any(|r| r.parent().is_none()) {
                    warn!(
                        "--reload is watching the whole filesystem from /: start corral in the project's \
                         directory (or give --chdir) so that it watches only that"
                    );
                }
                master.set_watcher(w);
            }
            // After a re-exec the workers serve on: not worth stopping them for.
            Err(e) if reexec_with_workers => error!("{e}; changes will not reload the workers"),
            Err(e) => {
                error!("{}", located(&e));
                remove_pidfile();
                return Ok(2);
            }
        }
    }
    if !touch_files.is_empty() {
        let touch = corral_engine::watch::TouchFiles::new(&touch_files);
        for (file, present) in touch.present() {
            let note = if present { "" } else { " (it does not exist yet; creating it counts)" };
            info!("--touch-reload: touching {} reloads the workers{note}", file.display());
        }
        master.set_touch_files(touch);
    }
    // The master has read what a re-exec handed down; the app must not see it.
    for var in [
        corral_engine::supervise::INHERIT_ENV,
        corral_engine::supervise::OLD_WORKERS_ENV,
        corral_engine::daemon::READY_FD_ENV,
    ] {
        environ.call_method1("pop", (var, py.None()))?;
    }
    let code = master.run();
    runtime.on_exit(py);
    remove_pidfile();
    leave_app_threads(py, graceful_timeout, code);
    Ok(code)
}

/// Threads a `--preload` import started run in the master only: a worker
/// is a fork of the master's main thread, without them, and a lock one of
/// them held at that moment (a logging handler's, an HTTP pool's) stays
/// held in the worker for good. Python 3.12 warns of a fork in a process
/// with threads; so does this, once, with their names.
fn warn_threads_of_the_import(py: Python<'_>) {
    let threads = py.import("threading").and_then(|t| crate::runtime::app_threads(&t, false));
    if let Some(threads) = threads.ok().filter(|t| !t.is_empty()) {
        warn!(
            "The app's import started thread(s) {} in the master (--preload): they do not run in the workers, \
             which are forked without them, and a lock one holds as a worker is forked stays held in that \
             worker; start such threads in a `post_fork` hook or at the first request instead",
            crate::runtime::thread_names(&threads).join(", ")
        );
    }
}

/// Python's exit waits for every thread that is not a daemon: one the app
/// started in the master (a `--preload` import's scheduler, a
/// multiprocessing pool's) kept the master running for good after
/// "Shutdown complete". They get `--graceful-timeout`, as a worker's do,
/// and the master then exits without them, saying so.
fn leave_app_threads(py: Python<'_>, timeout: Duration, code: i32) {
    let Ok(threading) = py.import("threading") else { return };
    let stray = || crate::runtime::app_threads(&threading, true);
    let names = |threads: &[Bound<'_, PyAny>]| crate::runtime::thread_names(threads).join(", ");
    let Ok(threads) = stray() else { return };
    if threads.is_empty() {
        return;
    }
    warn!(
        "The app's thread(s) {} still run in the master, and are not daemons (Python's exit waits for them): \
         waiting up to {:.0} s (--graceful-timeout)",
        names(&threads),
        timeout.as_secs_f64()
    );
    let deadline = std::time::Instant::now() + timeout;
    for t in &threads {
        let left = deadline.saturating_duration_since(std::time::Instant::now()).as_secs_f64();
        let kwargs = pyo3::types::PyDict::new(py);
        let _ = kwargs.set_item("timeout", left);
        let _ = t.call_method("join", (), Some(&kwargs));
    }
    let Ok(threads) = stray() else { return };
    if !threads.is_empty() {
        error!(
            "The app's thread(s) {} still run {:.0} s after the stop; the master exits without them",
            names(&threads),
            timeout.as_secs_f64()
        );
        let _ = py.import("sys").and_then(|sys| {
            sys.getattr("stdout")?.call_method0("flush")?;
            sys.getattr("stderr")?.call_method0("flush")
        });
        unsafe { libc::_exit(code) };
    }
}

/// Each connection is a descriptor in its worker; past the limit accepts
/// fail and clients wait in the queue. The soft limit (systemd's default
/// is 1024) is raised as far as --max-connections needs, within the hard
/// one, as nginx's worker_rlimit_nofile would; what stays short is said.
fn raise_open_files_limit(max_connections: usize) {
    /// Room asked for beyond the connections: listeners, log files, pipes,
    /// the epoll set and the app's own files.
    const ROOM_WANTED: u64 = 64;
    /// Below this much room a worker runs out before its connection limit.
    const ROOM_NEEDED: u64 = 24;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let wanted = (max_connections as u64).saturating_add(ROOM_WANTED);
    let known = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if known && limit.rlim_cur < wanted {
        let raised = libc::rlimit { rlim_cur: wanted.min(limit.rlim_max), rlim_max: limit.rlim_max };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    if known
        && limit.rlim_cur != libc::RLIM_INFINITY
        && (max_connections as u64).saturating_add(ROOM_NEEDED) > limit.rlim_cur
    {
        warn!(
            "--max-connections {} is more than the open files limit ({}, `ulimit -n`; LimitNOFILE= under \
             systemd) leaves room for: a worker stops accepting when it runs out; raise the limit or lower \
             --max-connections",
            max_connections, limit.rlim_cur
        );
    }
}

/// Each variable --env set in this process, and its value before (None:
/// it was not set).
static ENV_BEFORE: std::sync::Mutex<Vec<(String, Option<String>)>> = std::sync::Mutex::new(Vec::new());

/// The environment as it was before --env, for a re-exec (see
/// [`ENV_BEFORE`]).
pub(crate) fn env_before_settings() -> Vec<(String, Option<String>)> {
    ENV_BEFORE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The master's environment just before it imported the app (`--preload`).
static ENV_AT_IMPORT: std::sync::Mutex<Option<Vec<(std::ffi::OsString, std::ffi::OsString)>>> =
    std::sync::Mutex::new(None);

/// What the app's import in the master changed in its environment, undone,
/// for a re-exec: the new program imports the app again, and an app that
/// removed a variable it read (a password) found it gone, one that added a
/// directory to PATH added it again at each reload. corral's own variables
/// (`CORRAL_*`, socket activation's `LISTEN_*`) are left to the re-exec.
pub(crate) fn env_changes_of_the_import() -> Vec<(String, Option<String>)> {
    let Some(before) = ENV_AT_IMPORT.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
        return Vec::new();
    };
    let ours = |k: &std::ffi::OsStr| {
        let k = k.to_string_lossy();
        k.starts_with("CORRAL_") || k.starts_with("LISTEN_")
    };
    let now: std::collections::HashMap<_, _> = std::env::vars_os().collect();
    let mut undo = Vec::new();
    for (k, v) in &before {
        if !ours(k) && now.get(k) != Some(v) {
            if let (Some(k), Some(v)) = (k.to_str(), v.to_str()) {
                undo.push((k.to_string(), Some(v.to_string())));
            }
        }
    }
    let had: std::collections::HashSet<_> = before.iter().map(|(k, _)| k.clone()).collect();
    for k in now.keys() {
        if !ours(k) && !had.contains(k) {
            if let Some(k) = k.to_str() {
                undo.push((k.to_string(), None));
            }
        }
    }
    undo
}

/// The working directory as the shell named it: `$PWD` when that is the
/// same directory (symlinks unresolved, as gunicorn's `util.getcwd` has
/// it), else the kernel's resolved path. A deploy that switches a
/// `current -> releases/N` link the server was started in is then followed
/// by new workers and by a re-exec.
fn logical_cwd() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let real = std::env::current_dir().ok()?;
    let named = std::env::var_os("PWD").map(PathBuf::from).filter(|p| p.is_absolute());
    let same = |p: &PathBuf| {
        let (a, b) = (std::fs::metadata(p).ok(), std::fs::metadata(&real).ok());
        matches!((a, b), (Some(a), Some(b)) if a.dev() == b.dev() && a.ino() == b.ino())
    };
    Some(named.filter(same).unwrap_or(real))
}

/// What an import of the app needs in this process: `--env`, `--chdir`,
/// and `sys.path` (the app's directory, then `--pythonpath` first).
/// The outer error is Python's; the inner one a configuration error; the
/// warnings are for the caller to show (a log line, or --check-config's output).
fn prepare_import(py: Python<'_>, cli: &Cli) -> PyResult<Result<Vec<String>, String>> {
    let mut warnings = Vec::new();
    for kv in &cli.env {
        let Some((k, v)) = kv.split_once('=') else {
            return Ok(Err(format!("--env {kv:?}: expected KEY=VALUE")));
        };
        {
            let mut before = ENV_BEFORE.lock().unwrap_or_else(|p| p.into_inner());
            if !before.iter().any(|(key, _)| key == k) {
                before.push((k.to_string(), std::env::var(k).ok()));
            }
        }
        py.import("os")?.getattr("environ")?.set_item(k, v)?;
    }
    // The directory as named, symlinks unresolved: imports then follow a
    // link a deploy switches, in workers started after the switch.
    let mut cwd = logical_cwd().map(|p| p.display().to_string()).unwrap_or_default();
    if let Some(dir) = &cli.chdir {
        if let Ok(named) = std::path::absolute(dir) {
            cwd = named.display().to_string();
        }
        if let Err(e) = std::env::set_current_dir(dir) {
            return Ok(Err(format!("--chdir {}: {e}", dir.display())));
        }
    }
    // traceback (with linecache, tokenize and token) is imported before the
    // app's directory goes first on sys.path: an app's own `token.py` would
    // otherwise be taken for the standard one, and every traceback logged
    // would come out as its last line only.
    py.import("traceback")?;
    let sys_path = py.import("sys")?.getattr("path")?;
    sys_path.call_method1("insert", (0, cwd.as_str()))?;
    for dir in cli.pythonpath.iter().rev() {
        if !dir.is_dir() {
            // Else the import's ModuleNotFoundError is all the user sees.
            warnings.push(format!("--pythonpath {}: no such directory (from {cwd})", dir.display()));
        }
        // Absolute: a child the app spawns (multiprocessing's spawn) reads
        // sys.path after the app may have changed directory.
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        sys_path.call_method1("insert", (0, dir.display().to_string()))?;
    }
    Ok(Ok(warnings))
}

/// `--check-config`: what a start would refuse, then the app's import, in
/// this process and without binding or writing anything (gunicorn's option).
fn check_config(
    py: Python<'_>,
    cli: &Cli,
    matches: &clap::ArgMatches,
    located: &dyn Fn(&dyn std::fmt::Display) -> String,
) -> PyResult<i32> {
    let checked = match check_without_effects(cli, matches).and_then(|()| AppSpec::parse(&cli.app)) {
        Ok(spec) => prepare_import(py, cli)?.map(|warnings| {
            for w in warnings {
                eprintln!("corral: warning: {w}");
            }
            spec
        }),
        Err(e) => Err(e),
    };
    let spec = match checked {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("corral: error: {}", located(&e));
            return Ok(2);
        }
    };
    if let Some(mask) = cli.umask {
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    // Imported with the rights a worker has: --user applies before the
    // import unless --preload imports in the master first.
    if !cli.preload {
        match resolve_ids(cli.user.as_deref(), cli.group.as_deref()).and_then(|ids| match ids {
            Some((uid, gid, name)) => drop_privileges(uid, gid, &name),
            None => Ok(()),
        }) {
            Ok(()) => {}
            Err(e) => {
                eprintln!("corral: error: {}", located(&e));
                return Ok(2);
            }
        }
    }
    // No master will read them from a signalfd: INT and TERM act as usual
    // during a slow import.
    corral_engine::supervise::restore_early_signals();
    // The import runs in a child (forked by Python's os.fork, so the
    // interpreter's after-fork hooks run): an app that calls os._exit or
    // crashes at import is then told apart from a verdict, and answered 1
    // with what happened, as a worker's failure would be.
    let os = py.import("os")?;
    // The child's verdict comes as one byte on a pipe: an import that exits
    // by itself, with 0 or 1 too, gives none.
    let mut verdict_pipe = [0; 2];
    if unsafe { libc::pipe2(verdict_pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("corral: error: a pipe for the check: {}", std::io::Error::last_os_error());
        return Ok(2);
    }
    let [verdict_read, verdict_write] = verdict_pipe;
    let child: i32 = os.call_method0("fork")?.extract()?;
    if child > 0 {
        unsafe { libc::close(verdict_write) };
        // The byte is in the pipe once the child is gone; read without
        // waiting, since a process the app left running may hold the pipe.
        let (_, status): (i32, i32) = os.call_method1("waitpid", (child, 0))?.extract()?;
        let mut verdict = [0u8; 1];
        let got = unsafe {
            libc::fcntl(verdict_read, libc::F_SETFL, libc::O_NONBLOCK);
            libc::read(verdict_read, verdict.as_mut_ptr().cast(), 1)
        };
        unsafe { libc::close(verdict_read) };
        if got == 1 {
            return Ok(i32::from(verdict[0]));
        }
        let how = if libc::WIFEXITED(status) {
            format!("the import exited with code {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!(
                "the import was killed by {}",
                corral_engine::supervise::signal_name(libc::WTERMSIG(status))
            )
        } else {
            format!("the import ended with wait status {status}")
        };
        eprintln!("corral: {spec} failed to load: {how}");
        return Ok(1);
    }
    unsafe { libc::close(verdict_read) };
    let pid = std::process::id();
    let loaded = load_app(py, &spec);
    if std::process::id() != pid {
        // A child the app forked at import: the verdict is its parent's to give.
        unsafe { libc::_exit(0) };
    }
    let code = match loaded {
        Ok(_) => {
            println!("corral: the configuration is valid and {spec} loads");
            0
        }
        Err(msg) => {
            eprintln!("{msg}");
            eprintln!("corral: {spec} failed to load");
            1
        }
    };
    // Out at once with the verdict: the interpreter's shutdown would wait
    // for threads the app started at import, which no one will stop.
    let sys = py.import("sys")?;
    for stream in ["stdout", "stderr"] {
        let _ = sys.getattr(stream).and_then(|s| s.call_method0("flush"));
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let verdict = [code as u8];
    unsafe {
        libc::write(verdict_write, verdict.as_ptr().cast(), 1);
        libc::_exit(code)
    }
}

/// The checks of a start that have no effect on the system: for
/// `--print-config` and `--check-config`.
fn check_without_effects(cli: &Cli, matches: &clap::ArgMatches) -> Result<(), String> {
    access_format(cli, matches)?;
    pool_size(cli, "")?;
    static_mounts(cli)?;
    let ids = resolve_ids(cli.user.as_deref(), cli.group.as_deref())?;
    if let Some(dir) = cli.chdir.as_deref().filter(|d| !d.is_dir()) {
        return Err(format!("--chdir {}: not a directory", dir.display()));
    }
    mount_prefix(cli)?;
    daemon_needs_files(cli)?;
    touch_files_named(cli)?;
    if let Some(owner) = cli.socket_owner.as_deref() {
        parse_owner(owner)?;
    }
    // Two listeners on one port: found by a start only as it binds them.
    // With none given (and none handed over), the start listens on the default.
    let none_given = [&cli.http, &cli.uwsgi, &cli.fastcgi, &cli.scgi].iter().all(|l| l.is_empty())
        && std::env::var_os("LISTEN_FDS").is_none();
    let addrs: Vec<(String, Addr)> =
        [("--http", &cli.http), ("--uwsgi", &cli.uwsgi), ("--fastcgi", &cli.fastcgi)]
            .into_iter()
            .chain([("--scgi", &cli.scgi)])
            .flat_map(|(option, list)| list.iter().map(move |a| (option.to_string(), a.as_str())))
            .chain(none_given.then(|| ("the default --http".to_string(), DEFAULT_HTTP)))
            .chain(cli.stats.as_deref().map(|a| ("--stats".to_string(), a)))
            .filter_map(|(option, a)| Addr::parse(a).ok().map(|a| (option, a)))
            .collect();
    distinct_tcp_listeners(addrs.iter().map(|(o, a)| (o.clone(), a)))?;
    // Where a start would create a file: its directory must be there.
    let stats: Vec<String> = cli.stats.iter().cloned().collect();
    let listeners = [
        ("http", &cli.http),
        ("uwsgi", &cli.uwsgi),
        ("fastcgi", &cli.fastcgi),
        ("scgi", &cli.scgi),
        ("stats", &stats),
    ];
    for (flag, addrs) in listeners {
        for a in addrs.iter() {
            if let Some(path) = a.strip_prefix("unix:") {
                directory_exists(path).map_err(|e| format!("--{flag} {a}: {e}"))?;
            }
            // A host that does not resolve fails the start, not only a bind.
            if let Ok(addr) = Addr::parse(a) {
                corral_engine::listen::check_resolves(&addr).map_err(|e| format!("--{flag} {a}: {e}"))?;
            }
        }
    }
    pidfile_usable(cli)?;
    for (flag, target) in
        [("--error-log", Some(cli.error_log.as_str())), ("--access-log", cli.access_log.as_deref())]
    {
        if let Some(path) = target.filter(|t| *t != "-") {
            // As a start as root with --user refuses it (see logfile::NO_FOLLOW).
            let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            if link && ids.is_some() && nix::unistd::geteuid().is_root() {
                return Err(format!("{flag} {path}: {}", corral_engine::logfile::LINK_REFUSED));
            }
            log_file_writable(path).map_err(|e| format!("{flag} {path}: {e}"))?;
            // As a start with --user judges it (a file it creates becomes the user's).
            if let Some((uid, gid, name)) = ids.as_ref().filter(|_| std::path::Path::new(path).exists()) {
                user_may_write(path, *uid, *gid, name).map_err(|e| format!("{flag} {path}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Which of the sockets a previous program of this master handed down
/// (protocol, address, descriptor) each wanted listener (protocol, address)
/// takes over, if any; those taken are marked (-1). Listeners with a port
/// choose first, so that one given port 0 cannot take a socket another
/// names by its port.
fn assign_inherited(
    inherited: &mut [(String, String, std::os::fd::RawFd)],
    wanted: &[(&str, &Addr)],
) -> Vec<Option<std::os::fd::RawFd>> {
    let mut taken = vec![None; wanted.len()];
    let any_port = |a: &Addr| matches!(a, Addr::Tcp(_, 0));
    for pass_any_port in [false, true] {
        for (i, (protocol, addr)) in wanted.iter().enumerate() {
            if any_port(addr) != pass_any_port {
                continue;
            }
            if let Some(entry) = inherited
                .iter_mut()
                .find(|(p, held, fd)| *fd >= 0 && p == protocol && corral_engine::listen::holds(held, addr))
            {
                taken[i] = Some(std::mem::replace(&mut entry.2, -1));
            }
        }
    }
    taken
}

/// The listeners' addresses (protocol, address) and the --stats one.
type ListenerAddrs = (Vec<(Protocol, Addr)>, Option<Addr>);

/// The addresses of the listeners `wanted` and of --stats, parsed, with a
/// relative unix socket path taken from the start directory.
fn listener_addrs(
    cli: &Cli,
    wanted: &[(Protocol, &str)],
    chdir_from: Option<&std::path::Path>,
) -> Result<ListenerAddrs, String> {
    let parse = |name: &str, a: &str| {
        Addr::parse(a).map(|a| from_start(a, chdir_from)).map_err(|e| format!("--{name} {e}"))
    };
    let listeners =
        wanted.iter().map(|(p, a)| parse(p.name(), a).map(|addr| (*p, addr))).collect::<Result<_, _>>()?;
    let stats = cli.stats.as_deref().map(|a| parse("stats", a)).transpose()?;
    Ok((listeners, stats))
}

/// The listeners the options ask for, in the order they are bound.
fn listeners_given(cli: &Cli) -> Vec<(Protocol, &str)> {
    [
        (Protocol::Http, &cli.http),
        (Protocol::Uwsgi, &cli.uwsgi),
        (Protocol::FastCgi, &cli.fastcgi),
        (Protocol::Scgi, &cli.scgi),
    ]
    .into_iter()
    .flat_map(|(protocol, list)| list.iter().map(move |a| (protocol, a.as_str())))
    .collect()
}

/// Before a re-exec: the TCP listeners (and --stats) the new program would
/// bind anew, rather than take over from `held` (the running master's, as
/// `supervise::INHERIT_ENV` lists them, matched the same way), are free.
fn check_new_binds(cli: &Cli, held: &str) -> Result<(), String> {
    if std::env::var_os("LISTEN_FDS").is_some() {
        return Ok(());
    }
    let mut held = corral_engine::supervise::parse_inherited(held);
    // None given: the default's, or the service manager's sockets, which
    // the running master holds already.
    let start = std::env::current_dir().ok();
    let chdir_from = start.as_deref().filter(|_| cli.chdir.is_some());
    let (parsed, stats) = listener_addrs(cli, &listeners_given(cli), chdir_from)?;
    let wanted: Vec<(&str, &Addr)> =
        parsed.iter().map(|(p, a)| (p.name(), a)).chain(stats.iter().map(|a| ("stats", a))).collect();
    // Taken over as the new program will take them.
    let reused = assign_inherited(&mut held, &wanted);
    for ((name, addr), reuse) in wanted.iter().zip(reused) {
        if reuse.is_none() {
            let options = BindOptions { reuse_port: cli.reuse_port, ..BindOptions::default() };
            Listener::check_bindable(addr, &options).map_err(|e| format!("--{name}: {e}"))?;
        }
    }
    Ok(())
}

/// The directory a file would be created in is there.
fn directory_exists(path: &str) -> Result<(), String> {
    let path = std::path::Path::new(path);
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(format!("no directory {}", dir.display())),
        _ => Ok(()),
    }
}

/// Whether `fd` is a listening stream socket.
fn is_listening_stream(fd: i32) -> bool {
    let opt = |name: libc::c_int| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let ok = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, name, (&mut v as *mut libc::c_int).cast(), &mut len)
        };
        (ok == 0).then_some(v)
    };
    opt(libc::SO_ACCEPTCONN) == Some(1) && opt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Writes this process's pid to `path` without following a symlink there:
/// a new file renamed over it, as gunicorn does, or else (a directory this
/// process may not write to, with the file in it given to it) the file
/// itself, opened with O_NOFOLLOW. A pidfile directory that the user named
/// by --user may write to must not let that user point the file at one
/// the master, started as root, would then overwrite.
fn write_pidfile(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = format!("{}\n", std::process::id());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
    };
    // One left by a start of the same pid that was killed before its rename
    // (a master that is PID 1 in a container always has the same pid).
    let created = match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let _ = std::fs::remove_file(&temp);
            create()
        }
        other => other,
    };
    match created {
        Ok(mut f) => {
            let written = f.write_all(text.as_bytes()).and_then(|()| std::fs::rename(&temp, path));
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) => std::io::Error::other("a symbolic link, which is not followed"),
                    _ => e,
                })?;
            f.write_all(text.as_bytes())
        }
        Err(e) => Err(e),
    }
}

/// Whether --pidfile, if given, names a file that can be written: one
/// this process may write in place, or replace (a new file renamed over
/// it, as [`write_pidfile`] does). The master that started as root wrote
/// it; re-executed as --user's user (USR2, HUP with --preload), it replaces
/// it in a directory that user may write, as the README advises.
fn pidfile_usable(cli: &Cli) -> Result<(), String> {
    let Some(path) = cli.pidfile.as_deref() else {
        return Ok(());
    };
    if pidfile_names_this_master(path) {
        return Ok(());
    }
    let replaceable = || {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        path.is_file() && writable_dir(dir)
    };
    match log_file_writable(&path.to_string_lossy()) {
        Err(_) if replaceable() => Ok(()),
        other => other.map_err(|e| format!("--pidfile {}: {e}", path.display())),
    }
}

/// Whether this process may remove `path` from `dir`: it may write to the
/// directory, and in a sticky one (such as /tmp) owns the directory or the file.
fn removable(path: &std::path::Path, dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    if !writable_dir(dir) {
        return false;
    }
    let me = unsafe { libc::geteuid() };
    match std::fs::metadata(dir) {
        Ok(d) if d.mode() & libc::S_ISVTX != 0 && d.uid() != me => {
            std::fs::symlink_metadata(path).is_ok_and(|f| f.uid() == me)
        }
        _ => true,
    }
}

/// Whether this process may create and remove entries in `dir`.
fn writable_dir(dir: &std::path::Path) -> bool {
    std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0)
}

/// Whether a log file (or the pidfile) could be opened for writing, without
/// creating it: it is writable, or its directory is one where it can be created.
fn log_file_writable(path: &str) -> Result<(), String> {
    let writable = |p: &std::path::Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| "a NUL in the path")?;
        match unsafe { libc::access(c.as_ptr(), libc::W_OK) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error().to_string()),
        }
    };
    if path.is_empty() {
        return Err("an empty path (`-` is standard output or error)".into());
    }
    let path = std::path::Path::new(path);
    if path.exists() {
        return if path.is_dir() { Err("a directory".into()) } else { writable(path) };
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        return Err(format!("no directory {}", dir.display()));
    }
    writable(dir).map_err(|e| format!("cannot create it in {}: {e}", dir.display()))
}

/// Every --touch-reload path names a file (not `/` or `..`).
fn touch_files_named(cli: &Cli) -> Result<(), String> {
    match cli.touch_reload.iter().find(|f| f.file_name().is_none()) {
        Some(f) => Err(format!("--touch-reload {}: not a file name", f.display())),
        None => Ok(()),
    }
}

/// A daemon's logs go to files: its standard streams are /dev/null.
fn daemon_needs_files(cli: &Cli) -> Result<(), String> {
    if cli.daemon && cli.error_log == "-" {
        return Err("--daemon needs --error-log FILE: a daemon has no terminal to log to".into());
    }
    if cli.daemon && cli.access_log.as_deref() == Some("-") && !cli.capture_output {
        return Err(
            "--daemon needs --access-log FILE rather than `-` (or --capture-output): a daemon has no stdout"
                .into(),
        );
    }
    let activated = std::env::var("LISTEN_PID").is_ok_and(|p| p.trim() == std::process::id().to_string());
    if cli.daemon && activated {
        return Err(
            "--daemon cannot take sockets from a service manager (LISTEN_FDS): under systemd, run in \
                    the foreground"
                .into(),
        );
    }
    Ok(())
}

/// `--daemon`: forks twice, as gunicorn and the classic recipe do. The
/// child starts a session of its own (so no terminal is left to it) and
/// forks the master, which is then no session leader and can never gain a
/// controlling terminal, with /dev/null for its standard streams. This
/// process waits until the master's workers are ready (exit 0) or the
/// master exits (its code). Called before any thread exists and before
/// the app is imported, so both forks copy one thread.
fn daemonize(error_log: &str) {
    let told = pipe_or_exit();
    let pid = fork_or_exit();
    if pid > 0 {
        unsafe { libc::close(told[1]) };
        // Waiting is this process's only job now: INT, TERM and the like end
        // it as they would any command (the daemon goes on starting).
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        let code = match read_byte(told[0]) {
            Some(0) => unsafe { libc::_exit(0) },
            Some(code) => code as i32,
            // No word at all: the intermediate process died.
            None => exit_code(pid),
        };
        eprintln!("corral: the server failed to start (exit code {code}); see {error_log}");
        unsafe { libc::_exit(if code == 0 { 1 } else { code }) };
    }
    unsafe {
        libc::close(told[0]);
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    let ready = pipe_or_exit();
    let master = fork_or_exit();
    if master == 0 {
        unsafe {
            libc::close(told[1]);
            libc::close(ready[0]);
        }
        corral_engine::daemon::set_ready_fd(ready[1]);
        return;
    }
    // The intermediate process: passes on the master's word, then exits,
    // leaving the master to init. The master's exit is looked for too, not
    // only the pipe's close: with --preload, a process the app forked at
    // import holds the pipe as long as it lives.
    unsafe { libc::close(ready[1]) };
    let exited = loop {
        let mut poll = libc::pollfd { fd: ready[0], events: libc::POLLIN, revents: 0 };
        if unsafe { libc::poll(&mut poll, 1, 200) } > 0 {
            match read_byte(ready[0]) {
                Some(_) => break None,
                None => break Some(exit_code(master)),
            }
        }
        let mut status = 0;
        if unsafe { libc::waitpid(master, &mut status, libc::WNOHANG) } == master {
            break Some(code_of(status));
        }
    };
    // 0 is "ready": a master that exited before it was ready failed, whatever its code.
    let word: u8 = match exited {
        None => 0,
        Some(code) => code.clamp(1, 255) as u8,
    };
    unsafe {
        libc::write(told[1], (&word as *const u8).cast(), 1);
        libc::_exit(0);
    }
}
fn pipe_or_exit() -> [i32; 2] {
    let mut fds = [-1; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        eprintln!("corral: --daemon: pipe: {}", std::io::Error::last_os_error());
        unsafe { libc::_exit(1) };
    }
    fds
}

/// fork(2) with the interpreter's fork hooks on both sides.
fn fork_or_exit() -> libc::pid_t {
    unsafe { pyo3::ffi::PyOS_BeforeFork() };
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
        eprintln!("corral: --daemon: fork: {}", std::io::Error::last_os_error());
        unsafe { libc::_exit(1) };
    }
    if pid == 0 {
        unsafe { pyo3::ffi::PyOS_AfterFork_Child() };
    } else {
        unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
    }
    pid
}

/// One byte from a pipe; `None` at its end (or on an error).
fn read_byte(fd: i32) -> Option<u8> {
    let mut byte = 0u8;
    loop {
        let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        if n == 1 {
            return Some(byte);
        }
        if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// Waits for child `pid` to exit: its exit code, 1 if a signal ended it.
fn exit_code(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    {}
    code_of(status)
}

fn code_of(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    }
}

/// No two of this server's TCP listeners (the stats one included) take the
/// same port on overlapping addresses: with --reuse-port both would bind,
/// and the kernel would split connections between them.
fn distinct_tcp_listeners<'a>(addrs: impl Iterator<Item = (String, &'a Addr)>) -> Result<(), String> {
    let wildcard = |h: &str| h == "0.0.0.0" || h == "::" || h.is_empty();
    let mut seen: Vec<(&str, u16, String)> = Vec::new();
    for (option, a) in addrs {
        let Addr::Tcp(host, port) = a else { continue };
        if *port == 0 {
            continue;
        }
        // IPv4 and IPv6 overlap only on an IPv6 wildcard, and that one
        // leaves IPv4 to a listener on the same port (see BindOptions).
        let same_family = |h: &str| h.contains(':') == host.contains(':');
        if let Some(other) = seen
            .iter()
            .find(|(h, p, _)| p == port && same_family(h) && (h == host || wildcard(h) || wildcard(host)))
        {
            return Err(format!(
                "{option} {a} overlaps {} {}: two listeners of this server cannot take the same port",
                other.2,
                Addr::Tcp(other.0.to_string(), other.1)
            ));
        }
        seen.push((host, *port, option));
    }
    Ok(())
}

/// --capture-output without --error-log FILE asks for nothing: the app's
/// output goes to stdout and stderr already. Taken with a note, as gunicorn
/// takes it (and as a gunicorn file's `capture_output` is).
fn capture_without_a_file(cli: &mut Cli) -> Option<String> {
    if cli.capture_output && cli.error_log == "-" {
        cli.capture_output = false;
        return Some(
            "--capture-output without --error-log FILE is not needed: the app's output goes to stdout and \
             stderr already; ignored"
                .to_string(),
        );
    }
    None
}

/// Notes about the configuration, written once the error log is set up, as
/// its warnings and in its format (`--log-format json` makes every line of
/// it JSON); a run that ends before that (an error, `--print-config`) shows
/// them on standard error as text.
struct PendingNotes(Vec<String>);

impl PendingNotes {
    fn show_as_text(&mut self) {
        for note in self.0.drain(..) {
            eprintln!("corral: note: {note}");
        }
    }

    fn log(&mut self) {
        for note in self.0.drain(..) {
            warn!("{note}");
        }
    }
}

impl Drop for PendingNotes {
    fn drop(&mut self) {
        self.show_as_text();
    }
}

/// The access log's format; --log-format json makes it JSON too unless the
/// format is set.
fn access_format(cli: &Cli, matches: &clap::ArgMatches) -> Result<corral_engine::access::Format, String> {
    let text = match (cli.log_format, matches.value_source("access_log_format")) {
        (LogFormat::Json, Some(clap::parser::ValueSource::DefaultValue)) => "json",
        _ => cli.access_log_format.as_str(),
    };
    corral_engine::access::Format::parse(text).map_err(|e| format!("--access-log-format: {e}"))
}

/// The URL prefix the app is mounted at: --mount, else $SCRIPT_NAME, with
/// no trailing slash.
fn mount_prefix(cli: &Cli) -> Result<String, String> {
    let (mount, from) = match (&cli.mount, std::env::var("SCRIPT_NAME")) {
        (Some(m), _) => (m.clone(), "--mount"),
        (None, Ok(m)) => (m, "the SCRIPT_NAME environment variable (the default of --mount)"),
        (None, Err(_)) => (String::new(), "--mount"),
    };
    let mount = mount.trim_end_matches('/').to_string();
    if !mount.is_empty() && !mount.starts_with('/') {
        return Err(format!("{from} {mount:?}: must start with '/'"));
    }
    Ok(mount)
}

/// The workers at start: --workers, or the adaptive pool's fewest.
/// `set_in` says where the values came from, for the error.
fn pool_size(cli: &Cli, set_in: &str) -> Result<u32, String> {
    let Some(max) = cli.workers_max else { return Ok(cli.workers) };
    let min = cli.workers_min.unwrap_or(cli.workers);
    if min > max {
        let which = if cli.workers_min.is_some() { "--workers-min" } else { "--workers" };
        return Err(format!("{which} {min} is greater than --workers-max {max}{set_in}"));
    }
    Ok(min)
}

/// The --static-map and --static mounts, in the order they are tried, their
/// directories resolved. A --static-map mount takes only the files it has,
/// so it goes first: after a --static mount of the same prefix it would
/// never see a request.
/// Of the --static mounts, a longer prefix goes before a shorter one it is
/// under, as nginx picks the longest location; one prefix given twice would
/// leave the second unseen.
fn static_mounts(cli: &Cli) -> Result<Vec<corral_engine::static_files::Mount>, String> {
    use corral_engine::static_files::Mount;
    let mut dirs = cli.static_dirs.iter().map(|spec| Mount::parse(spec)).collect::<Result<Vec<_>, _>>()?;
    for (i, m) in dirs.iter().enumerate() {
        if !m.prefix.is_empty() && dirs[..i].iter().any(|o| o.prefix == m.prefix) {
            return Err(format!(
                "--static {} is given twice: a --static mount answers its whole prefix, 404 for a file it has \
                 not; --static-map {0}=DIR, given once for each directory, tries them in turn",
                m.prefix
            ));
        }
    }
    dirs.sort_by_key(|m| std::cmp::Reverse(m.prefix.len()));
    let maps = cli.static_maps.iter().map(|spec| Mount::parse_map(spec)).collect::<Result<Vec<_>, _>>()?;
    let safe = cli
        .static_safe
        .iter()
        .map(|d| corral_engine::static_files::SafeDir::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    if !safe.is_empty() && maps.is_empty() && dirs.is_empty() {
        return Err("--static-safe is given without a --static or --static-map directory to apply to".into());
    }
    Ok(maps.into_iter().chain(dirs).map(|m| Mount { safe: safe.clone(), ..m }).collect())
}

/// Whether `--long` (alone, or as `--long=VALUE`) is among the arguments.
fn given_on_command_line(argv: &[String], long: &str) -> bool {
    argv.iter().any(|a| {
        a.strip_prefix("--")
            .and_then(|a| a.strip_prefix(long))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    })
}

/// The pid a pid file names, if that process is alive and is a corral other
/// than this one (a re-executed master keeps its pid). A stale file may name
/// a pid the system has since given to another program: that one does not
/// count.
/// Whether the pidfile names this master already: after a re-exec (the
/// pid stays), or in the check a running master makes of the program it is
/// about to re-execute, the master asking. The file is then right as it
/// is, and need not be written again: under --user, the master may not
/// write where root wrote it at the first start, and a reload that
/// re-executes (USR2, HUP with --preload) must not be refused for that.
fn pidfile_names_this_master(path: &std::path::Path) -> bool {
    let Some(pid) = pidfile_pid(path) else {
        return false;
    };
    pid == std::process::id()
        || (std::env::var_os(corral_engine::supervise::CHECK_BINDS_ENV).is_some()
            && pid == unsafe { libc::getppid() } as u32)
}

/// The pid a pid file holds.
fn pidfile_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn running_corral(path: &std::path::Path) -> Option<u32> {
    let pid = pidfile_pid(path)?;
    if pid == std::process::id() {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline.split(|&b| b == 0).any(|arg| arg.windows(6).any(|w| w == b"corral")).then_some(pid)
}

/// A unix socket's relative path, taken from the directory corral started in
/// when it changes to another.
fn from_start(addr: Addr, start: Option<&std::path::Path>) -> Addr {
    match (addr, start) {
        (Addr::Unix(p), Some(dir)) if p.is_relative() => Addr::Unix(dir.join(p)),
        (addr, _) => addr,
    }
}

/// A log file's name made absolute against the current directory (`-`,
/// standard output or error, stays as it is).
fn absolute_log_path(target: &str) -> String {
    if target == "-" {
        return target.to_string();
    }
    std::path::absolute(target).map_or_else(|_| target.to_string(), |p| p.display().to_string())
}

/// Makes a log file writable by the user the workers run as: one corral
/// just created becomes theirs (by its descriptor: the name may be a link
/// to another file by now); an existing one must already be writable by
/// them (corral does not take over a file someone else owns).
fn give_log_to_user(path: &str, uid: u32, gid: u32, name: &str) -> Result<(), String> {
    if let Some(file) = corral_engine::logfile::take_created(path) {
        return std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            .map_err(|e| format!("cannot give it to user {name}: {e}"));
    }
    user_may_write(path, uid, gid, name)
}

/// Whether the user the workers run as can write an existing log file.
fn user_may_write(path: &str, uid: u32, gid: u32, name: &str) -> Result<(), String> {
    user_may(path, uid, gid, name, 0o2).map_err(|e| {
        format!("user {name} cannot write it ({e}); give it to that user or let corral create it")
    })
}

/// Whether the user the master re-executes as can read a config file.
fn user_may_read(path: &str, uid: u32, gid: u32, name: &str) -> Result<(), String> {
    user_may(path, uid, gid, name, 0o4).map_err(|e| format!("user {name} cannot read it ({e})"))
}

/// Whether the user (with the groups initgroups gives them) has the
/// permission `bit` (0o4 read, 0o2 write) on an existing file; the error
/// says who owns it and its mode.
fn user_may(path: &str, uid: u32, gid: u32, name: &str, bit: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let mode = meta.mode();
    // The groups the workers will have: the primary one and, through
    // initgroups, every group the user belongs to.
    let groups: Vec<u32> = std::ffi::CString::new(name)
        .ok()
        .and_then(|c| nix::unistd::getgrouplist(&c, nix::unistd::Gid::from_raw(gid)).ok())
        .map_or_else(|| vec![gid], |g| g.into_iter().map(|g| g.as_raw()).collect());
    let allowed = if meta.uid() == uid {
        mode & (bit << 6) != 0
    } else if groups.contains(&meta.gid()) {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    };
    if allowed {
        return Ok(());
    }
    Err(format!("owner uid {}, gid {}, mode {:o}", meta.uid(), meta.gid(), mode & 0o7777))
}

/// Resolves `--user` and `--group` to (uid, gid, user name) before anything
/// is bound, so a typo fails at once.
fn resolve_ids(user: Option<&str>, group: Option<&str>) -> Result<Option<(u32, u32, String)>, String> {
    use nix::unistd::{Group, User};
    let root = nix::unistd::geteuid().is_root();
    // A number needs no entry in the group database, as under gunicorn:
    // containers run as ids their image never named.
    let group_id = |g: &str| match g.parse::<u32>() {
        Ok(gid) => Ok(gid),
        Err(_) => match Group::from_name(g) {
            Ok(Some(gr)) => Ok(gr.gid.as_raw()),
            _ => Err(format!("--group {g:?}: no such group")),
        },
    };
    let Some(user) = user else {
        // --group alone changes the group only, as gunicorn's -g does.
        let Some(g) = group else { return Ok(None) };
        let gid = group_id(g)?;
        if !root && gid != nix::unistd::getegid().as_raw() {
            return Err(format!("--group {g:?}: changing group needs root"));
        }
        let uid = nix::unistd::geteuid();
        let name = User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
        return Ok(Some((uid.as_raw(), gid, name)));
    };
    let (uid, name, primary) = match user.parse::<u32>() {
        Ok(uid) => match User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(u)) => (uid, u.name, Some(u.gid.as_raw())),
            _ => (uid, uid.to_string(), None),
        },
        Err(_) => match User::from_name(user) {
            Ok(Some(u)) => (u.uid.as_raw(), u.name, Some(u.gid.as_raw())),
            _ => return Err(format!("--user {user:?}: no such user")),
        },
    };
    let gid = match (group, primary) {
        (Some(g), _) => group_id(g)?,
        // Already that user: keep the group it runs with (a container's
        // runAsGroup), as gunicorn does, rather than switch to the entry's.
        (None, _) if nix::unistd::geteuid().as_raw() == uid => nix::unistd::getegid().as_raw(),
        (None, Some(gid)) => gid,
        (None, None) => {
            return Err(format!(
                "--user {user:?}: uid {uid} has no entry in the user database, so its group is not known: \
                 give --group too"
            ))
        }
    };
    if !root && nix::unistd::geteuid().as_raw() != uid {
        return Err(format!("--user {user:?}: changing user needs root"));
    }
    Ok(Some((uid, gid, name)))
}

/// Switches the whole process to `uid`/`gid` (supplementary groups from the
/// user's entry), after the listeners are bound and before any worker exists.
fn drop_privileges(uid: u32, gid: u32, name: &str) -> Result<(), String> {
    use nix::unistd::{setgid, setuid, Gid, Uid};
    if nix::unistd::geteuid().as_raw() == uid {
        // The same user (or --group alone): the group only.
        if nix::unistd::getegid().as_raw() != gid {
            setgid(Gid::from_raw(gid)).map_err(|e| format!("--group: setgid({gid}): {e}"))?;
        }
        return Ok(());
    }
    if nix::unistd::User::from_uid(Uid::from_raw(uid)).ok().flatten().is_some() {
        let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
        nix::unistd::initgroups(&cname, Gid::from_raw(gid))
            .map_err(|e| format!("--user: initgroups: {e}"))?;
    } else {
        // No entry to take supplementary groups from: none but the group, not root's.
        nix::unistd::setgroups(&[Gid::from_raw(gid)]).map_err(|e| format!("--user: setgroups: {e}"))?;
    }
    setgid(Gid::from_raw(gid)).map_err(|e| format!("--group: setgid({gid}): {e}"))?;
    setuid(Uid::from_raw(uid)).map_err(|e| format!("--user: setuid({uid}): {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pidfile_names_this_master;

    #[test]
    fn a_pidfile_naming_this_process_is_taken_as_it_is() {
        let dir = std::env::temp_dir().join(format!("corral-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.pid");
        assert!(!pidfile_names_this_master(&path), "no file");
        std::fs::write(&path, format!("{}\n", std::process::id())).unwrap();
        assert!(pidfile_names_this_master(&path));
        // Another process's (the parent's only in a re-exec's check).
        std::fs::write(&path, format!("{}\n", std::process::id() + 1)).unwrap();
        assert!(!pidfile_names_this_master(&path));
        std::fs::write(&path, "garbage").unwrap();
        assert!(!pidfile_names_this_master(&path));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
