//! `--config gunicorn.conf.py` (or `-c python:module`): reads a gunicorn
//! configuration file as gunicorn does (runs it, then looks at the names it
//! defines) and turns each gunicorn setting into the corral option of the
//! same meaning, so that a team moving over keeps the file it deploys with.
//!
//! A setting corral has no counterpart for is refused, with why and what to
//! do instead, unless it is at gunicorn's default (then it asks for nothing).
//! Its server hooks (`post_fork`, `pre_request`...) are kept for
//! [`crate::server_hooks`] to run, but for the two corral cannot run
//! (`worker_abort`, `ssl_context`), which are refused, since a hook that
//! silently never ran would be worse. Other names the file defines
//! (imports, helper variables) are ignored, as gunicorn ignores them.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use toml_edit::{Array, Value};

/// Whether `--config` names a gunicorn configuration: a Python file, or
/// gunicorn's `python:MODULE` or `file:PATH` form.
pub fn is_gunicorn_config(spec: &str) -> bool {
    spec.ends_with(".py") || spec.starts_with("python:") || spec.starts_with("file:")
}

/// The file `--config` names (for a HUP to notice it changed): gunicorn's
/// `file:PATH` is PATH, and `python:MODULE` the module's source file.
pub fn file_of(py: Python<'_>, spec: &str) -> Option<std::path::PathBuf> {
    if let Some(module) = spec.strip_prefix("python:") {
        let util = py.import("importlib.util").ok()?;
        let found = with_cwd_on_path(py, || util.call_method1("find_spec", (module,))).ok()?;
        return found.getattr("origin").ok()?.extract::<String>().ok().map(Into::into);
    }
    if crate::uwsgi_ini::is_uwsgi_ini(spec) {
        return Some(crate::uwsgi_ini::file_of(spec).into());
    }
    Some(spec.strip_prefix("file:").unwrap_or(spec).into())
}

/// Runs `f` with the current directory first on sys.path, where gunicorn
/// puts it before it reads its configuration (`Application.chdir`), and
/// leaves it there, as gunicorn does: hooks that import the file's
/// neighbours when they run (`post_fork`) find them too.
fn with_cwd_on_path<T>(py: Python<'_>, f: impl FnOnce() -> T) -> T {
    let path = py.import("sys").and_then(|s| s.getattr("path")).ok();
    let cwd = std::env::current_dir().ok().map(|d| d.to_string_lossy().into_owned());
    if let (Some(p), Some(cwd)) = (&path, cwd) {
        if !p.contains(&cwd).unwrap_or(true) {
            let _ = p.call_method1("insert", (0, cwd));
        }
    }
    f()
}

/// One setting of the file as a corral option: its long name, its value and
/// where it was set ("gunicorn.conf.py:3").
pub struct Setting {
    pub key: &'static str,
    pub value: Value,
    pub at: String,
}

/// `v`, a path (or `bind`'s addresses) a gunicorn file gives, with a
/// relative one taken from `dir` as gunicorn takes it after its chdir.
fn in_dir(dir: &str, name: &str, v: Value) -> Value {
    let rebase = |p: &str| -> String {
        let (prefix, path) = match name {
            "bind" => match p.strip_prefix("unix:") {
                Some(path) => ("unix:", path),
                None => return p.to_string(),
            },
            _ => ("", p),
        };
        if path == "-" || path.is_empty() || std::path::Path::new(path).is_absolute() {
            return p.to_string();
        }
        format!("{prefix}{}", std::path::Path::new(dir).join(path).display())
    };
    match v {
        Value::String(s) => Value::from(rebase(s.value())),
        Value::Array(a) => Value::Array(
            a.iter().map(|x| x.as_str().map_or_else(|| x.clone(), |s| Value::from(rebase(s)))).collect(),
        ),
        v => v,
    }
}

/// What a gunicorn setting is in corral.
enum Rule {
    /// The corral option of the same meaning.
    Option(&'static str),
    /// No counterpart: the values corral already behaves as (a Python
    /// tuple, gunicorn's default among them) are taken; any other value is
    /// refused, with why.
    Refused(&'static str, &'static str),
    /// How gunicorn does something corral does its own way (the file
    /// watcher's engine, the default process name): nothing to carry over.
    Ignored,
    /// Like `Refused`, but what it is for is moot in corral: a value other
    /// than those accepted gets a note saying so, not an error.
    Moot(&'static str, &'static str),
}

fn rule(name: &str) -> Option<Rule> {
    use Rule::*;
    Some(match name {
        "wsgi_app" => Option("app"),
        "bind" => Option("http"),
        "backlog" => Option("backlog"),
        "workers" => Option("workers"),
        "threads" => Option("threads"),
        "worker_connections" => Option("max-connections"),
        "max_requests" => Option("max-requests"),
        "max_requests_jitter" => Option("max-requests-jitter"),
        "timeout" => Option("timeout"),
        "graceful_timeout" => Option("graceful-timeout"),
        "keepalive" => Option("keepalive-timeout"),
        "limit_request_line" => Option("limit-request-line"),
        "limit_request_fields" => Option("limit-request-fields"),
        "limit_request_field_size" => Option("limit-request-field-size"),
        "reload" => Option("reload"),
        "accesslog" => Option("access-log"),
        "access_log_format" => Option("access-log-format"),
        "errorlog" => Option("error-log"),
        "loglevel" => Option("log-level"),
        "capture_output" => Option("capture-output"),
        "proc_name" => Option("name"),
        "preload_app" => Option("preload"),
        "reuse_port" => Option("reuse-port"),
        "chdir" => Option("chdir"),
        "daemon" => Option("daemon"),
        "raw_env" => Option("env"),
        "pidfile" => Option("pidfile"),
        "user" => Option("user"),
        "group" => Option("group"),
        // gunicorn creates its unix sockets under it, and nothing else
        // (not its logs, not the app's files): their mode, in corral.
        "umask" => Option("socket-mode"),
        "pythonpath" => Option("pythonpath"),
        "forwarded_allow_ips" => Option("forwarded-allow-ips"),
        "proxy_protocol" => Option("proxy-protocol"),
        "proxy_allow_ips" => Option("proxy-allow-from"),
        // Handled with `reload` and `worker_class` (see `translate`).
        "reload_extra_files" | "worker_class" => Ignored,
        "reload_engine" | "default_proc_name" | "config" => Ignored,
        "initgroups" => Moot("(False, True)", "--user always gives the workers the user's groups, as initgroups(3) does"),
        // Its syslog settings only matter with `syslog`, refused below.
        "syslog_addr" | "syslog_prefix" | "syslog_facility" | "disable_redirect_access_to_syslog" => Ignored,
        "ssl_version" | "cert_reqs" | "suppress_ragged_eofs" | "do_handshake_on_connect" | "ciphers" => {
            Ignored
        }
        "keyfile" | "certfile" | "ca_certs" => Refused("(None,)",
            "corral serves plain HTTP: terminate TLS in the front end (nginx, HAProxy) or a load balancer",
        ),
        "statsd_host" => Refused("(None,)",
            "corral sends no StatsD metrics: --stats ADDR serves them for Prometheus (/metrics) and as JSON (/stats)",
        ),
        "dogstatsd_tags" | "statsd_prefix" => Refused("('', None)", "corral sends no StatsD metrics (see --stats ADDR)"),
        "syslog" => Refused("(False,)", "corral does not log to syslog: --error-log and --access-log take files or -"),
        "logger_class" => Refused("('gunicorn.glogging.Logger',)", "corral's logging is its own (--log-format json for structured lines)"),
        "logconfig" | "logconfig_json" => {
            Refused("(None,)", "corral's logging is its own: --error-log, --access-log, --log-level, --log-format")
        }
        "logconfig_dict" => {
            Refused("({},)", "corral's logging is its own: --error-log, --access-log, --log-level, --log-format")
        }
        "enable_stdio_inheritance" => Refused("(False,)", "a daemon's output goes to --error-log FILE with --capture-output"),
        "spew" => Refused("(False,)", "corral has no statement tracer"),
        "check_config" | "print_config" => {
            Refused("(False,)", "it is an action: give --check-config or --print-config on the command line")
        }
        "paste" | "raw_paste_global_conf" => Refused("(None, [])",
            "corral does not read PasteDeploy files: give the app as MODULE:CALLABLE, or MODULE:FACTORY()",
        ),
        "sendfile" => Moot("(None, True)", "corral always sends wsgi.file_wrapper files with sendfile"),
        "worker_tmp_dir" => {
            Moot("(None,)", "corral's workers report to the master through shared memory, not a file")
        }
        "tmp_upload_dir" => Moot("(None,)", "corral keeps no request data in files"),
        // Handled in `translate`: any part of gunicorn's default is taken.
        "secure_scheme_headers" => Ignored,
        "forwarder_headers" => Refused("('SCRIPT_NAME,PATH_INFO', ['SCRIPT_NAME', 'PATH_INFO'], ('SCRIPT_NAME', 'PATH_INFO'))", "corral takes a trusted proxy's SCRIPT_NAME field, as gunicorn's default does, and no other"),
        // Handled in `translate`: `bind` becomes --uwsgi.
        "protocol" => Ignored,
        "uwsgi_allow_ips" => Refused("('127.0.0.1,::1', ['127.0.0.1', '::1'], ('127.0.0.1', '::1'))",
            "corral takes uwsgi requests from any peer that reaches its --uwsgi listener: bind it to a loopback \
             address or a unix socket (corral warns of any other), or firewall it",
        ),
        "http_protocols" => Refused("('h1',)", "corral speaks HTTP/1.1; HTTP/2 is for the front end (nginx, a load balancer)"),
        // Only with `http_protocols` h2, refused above.
        "http2_cleartext" | "http2_max_concurrent_streams" | "http2_initial_window_size" | "http2_max_frame_size"
        | "http2_max_header_list_size" => Ignored,
        // Only for the ASGI workers, which `worker_class` refuses.
        "asgi_loop" | "asgi_lifespan" | "asgi_disconnect_grace_period" | "websocket_max_message_size" | "root_path" => {
            Ignored
        }
        "http_parser" => Moot("('auto',)", "corral's HTTP parser is its own, in Rust"),
        "enable_backlog_metric" => Moot("(False,)", "--stats ADDR's /metrics reports each listen queue already"),
        "dirty_apps" => Refused("([], ())", "corral has no dirty worker pool: run such tasks in a task queue"),
        "dirty_workers" => Refused("(0,)", "corral has no dirty worker pool: run such tasks in a task queue"),
        // Only with `dirty_apps`, refused above.
        "dirty_timeout" | "dirty_threads" | "dirty_graceful_timeout" => Ignored,
        "control_socket" | "control_socket_mode" => Moot("()",
            "corral has no control socket: it is run with signals (`corral signal HUP PIDFILE`) and watched with \
             --stats ADDR (`corral stats`)",
        ),
        "control_socket_disable" => Ignored,
        "header_map" => Refused("('drop',)", "corral drops header names with underscores, as gunicorn's default does"),
        "permit_obsolete_folding"
        | "strip_header_spaces"
        | "permit_unconventional_http_method"
        | "permit_unconventional_http_version"
        | "casefold_http_method" => {
            Refused("(False,)", "corral parses requests strictly, as gunicorn's default does, and has no switch to relax it")
        }
        _ => return None,
    })
}

/// The headers (and values) that make the scheme https, gunicorn's default
/// `secure_scheme_headers`, as corral takes them (see `forwarded.rs`).
const SCHEME_HEADERS: &[(&str, &str)] =
    &[("X-FORWARDED-PROTOCOL", "ssl"), ("X-FORWARDED-PROTO", "https"), ("X-FORWARDED-SSL", "on")];

/// Whether a `secure_scheme_headers` value is gunicorn's default (true), a
/// part of it (false), or names anything else (None).
fn scheme_headers(value: &Bound<'_, PyAny>) -> Option<bool> {
    let dict = value.downcast::<PyDict>().ok()?;
    let mut seen = 0;
    for (k, v) in dict.iter() {
        let (k, v) = (k.extract::<String>().ok()?.to_ascii_uppercase(), v.extract::<String>().ok()?);
        if !SCHEME_HEADERS.iter().any(|(h, hv)| *h == k && hv.eq_ignore_ascii_case(&v)) {
            return None;
        }
        seen += 1;
    }
    Some(seen == SCHEME_HEADERS.len())
}

/// The callable a "module.attribute" string names, as gunicorn resolves a
/// server hook given by name.
fn resolve_dotted<'py>(py: Python<'py>, dotted: &str) -> Result<Bound<'py, PyAny>, String> {
    let (module, attr) = dotted.rsplit_once('.').ok_or("a server hook's name must be \"module.function\"")?;
    let object = with_cwd_on_path(py, || {
        py.import("importlib")
            .and_then(|m| m.call_method1("import_module", (module,)))
            .and_then(|m| m.getattr(attr))
    })
    .map_err(|e| e.to_string())?;
    if !object.is_callable() {
        return Err(format!("{dotted} is not callable"));
    }
    Ok(object)
}

/// gunicorn's server hooks that corral cannot run, with what to do instead.
const HOOKS: &[(&str, &str)] = &[
    (
        "worker_abort",
        "a request past --timeout gets 504, its Python stack is logged and its worker is replaced; no \
         hook runs there, as the stuck thread may hold the GIL",
    ),
    ("ssl_context", "corral serves plain HTTP: terminate TLS in the front end"),
    ("on_dirty_starting", "corral has no dirty worker pool"),
    ("dirty_post_fork", "corral has no dirty worker pool"),
    ("dirty_worker_init", "corral has no dirty worker pool"),
    ("dirty_worker_exit", "corral has no dirty worker pool"),
];

/// What corral takes for gunicorn's setting or command-line option `name`
/// (`worker_class`, `--worker-class`, `-k`), when corral spells it
/// differently or has none: the note an unknown option or config key gets.
pub fn hint(name: &str) -> Option<String> {
    let setting = match name {
        "-k" => "worker_class".to_string(),
        "--log-config" => "logconfig".to_string(),
        "--log-config-dict" => "logconfig_dict".to_string(),
        "--paste" | "--paster" => "paste".to_string(),
        "--log-syslog" => "syslog".to_string(),
        "--statsd-host" => "statsd_host".to_string(),
        "--no-sendfile" => "sendfile".to_string(),
        "--proxy-allow-from" => "proxy_allow_ips".to_string(),
        "--uwsgi-allow-from" => "uwsgi_allow_ips".to_string(),
        "--no-control-socket" => "control_socket_disable".to_string(),
        "--dirty-app" => "dirty_apps".to_string(),
        "--reload-extra-file" => "reload_extra_files".to_string(),
        other => other.trim_start_matches('-').replace('-', "_"),
    };
    if setting == "protocol" {
        return Some("--uwsgi ADDR in place of --http ADDR (gunicorn's --protocol uwsgi)".to_string());
    }
    if setting == "reload_extra_files" {
        return Some("--touch-reload FILE (a change to it reloads the workers)".to_string());
    }
    if setting == "worker_class" {
        return Some(
            "--threads N (its workers are gunicorn's sync and gthread kind; it has no gevent, \
             eventlet or ASGI worker classes)"
                .to_string(),
        );
    }
    if let Some((_, instead)) = HOOKS.iter().find(|(h, _)| *h == setting) {
        return Some(format!("nothing ({instead})"));
    }
    if crate::server_hooks::RUN.contains(&setting.as_str()) {
        return Some(format!("`def {setting}(...)` in a gunicorn configuration file (-c gunicorn.conf.py)"));
    }
    match rule(&setting)? {
        Rule::Option(key) => Some(format!("--{key}")),
        Rule::Refused(_, why) => Some(format!("nothing ({why})")),
        Rule::Moot(_, why) => Some(format!("nothing, as it is not needed ({why})")),
        Rule::Ignored => None,
    }
}

/// gunicorn's command-line flags for settings corral has no need of, with
/// the setting and whether the flag takes a value. A gunicorn command line
/// (a Dockerfile's `--worker-tmp-dir /dev/shm`) runs with them left out, as
/// a gunicorn file's settings of the same kind are.
const MOOT_FLAGS: &[(&str, &str, bool)] = &[
    ("--worker-tmp-dir", "worker_tmp_dir", true),
    ("--no-sendfile", "sendfile", false),
    ("--http-parser", "http_parser", true),
    ("--enable-backlog-metric", "enable_backlog_metric", false),
    ("--control-socket", "control_socket", true),
    ("--control-socket-mode", "control_socket_mode", true),
    ("--no-control-socket", "control_socket", false),
    ("--initgroups", "initgroups", false),
];

/// gunicorn 27's `--proxy-protocol MODE`, with its mode after a space, as
/// corral's parser takes it (`--proxy-protocol=MODE`): corral's switch
/// alone means on, so a following word is otherwise the APP. Looks from
/// `argv[from]` on (1 past a program name, 0 in GUNICORN_CMD_ARGS).
pub fn join_proxy_protocol_mode(argv: &mut Vec<String>, from: usize) {
    let mut i = from;
    while i + 1 < argv.len() && argv[i] != "--" {
        if argv[i] == "--proxy-protocol" && matches!(argv[i + 1].as_str(), "off" | "v1" | "v2" | "auto") {
            let mode = argv.remove(i + 1);
            argv[i] = format!("--proxy-protocol={mode}");
        }
        i += 1;
    }
}

/// Takes gunicorn's flags for settings corral does not need out of `argv`
/// (up to the first `--`), with a note for each on why.
pub fn drop_moot_flags(argv: &mut Vec<String>) -> Vec<String> {
    let mut notes = Vec::new();
    let mut i = 1;
    while i < argv.len() && argv[i] != "--" {
        let (flag, inline) = match argv[i].split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (argv[i].as_str(), None),
        };
        let Some(&(_, setting, takes_value)) = MOOT_FLAGS.iter().find(|(f, ..)| *f == flag) else {
            i += 1;
            continue;
        };
        let Some(Rule::Moot(_, why)) = rule(setting) else { unreachable!("{setting} is moot") };
        let given = match (takes_value, inline) {
            (true, None) if i + 1 < argv.len() => format!("{flag} {}", argv[i + 1]),
            (false, Some(_)) => {
                // A switch given a value: let the parser say what is wrong.
                i += 1;
                continue;
            }
            _ => argv[i].clone(),
        };
        let end = if takes_value && inline.is_none() { (i + 2).min(argv.len()) } else { i + 1 };
        argv.drain(i..end);
        notes.push(format!("gunicorn's {given} is not needed: {why}; left out"));
    }
    notes
}

/// The last line of `text` where `name` is assigned at the top level (or a
/// function of that name defined), for error messages and --print-config:
/// the last is the one whose value counts.
fn line_of(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let def =
                l.strip_prefix("def ").and_then(|r| r.strip_prefix(name)).is_some_and(|r| r.starts_with('('));
            let assigned = l.strip_prefix(name).is_some_and(|rest| {
                let rest = rest.trim_start();
                (rest.starts_with('=') && !rest.starts_with("==")) || rest.starts_with(':')
            });
            def || assigned
        })
        .last()
        .map(|(i, _)| i + 1)
}

/// Runs the file (or imports the module) and returns the names it defined,
/// with the file's text for line numbers.
fn load<'py>(py: Python<'py>, spec: &str) -> Result<(Bound<'py, PyDict>, String, String), String> {
    let failed = |e: PyErr| {
        let text = py
            .import("traceback")
            .and_then(|tb| tb.call_method1("format_exception", (e.value(py),)))
            .and_then(|lines| lines.extract::<Vec<String>>())
            .map(|lines| {
                // Frames of the machinery that ran the file say nothing to its author.
                lines
                    .concat()
                    .lines()
                    .filter(|l| !l.contains("File \"<frozen "))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|_| e.to_string());
        format!("--config {spec}: the gunicorn configuration failed to run:\n{}", text.trim_end())
    };
    // As gunicorn does, the file runs with the start directory first on
    // sys.path, so that it can import its neighbours, and a chdir it makes
    // is undone (`chdir = ...` is the setting for that).
    let start = std::env::current_dir().ok();
    let ran = with_cwd_on_path(py, || run_config(py, spec));
    if let Some(start) = start {
        if std::env::current_dir().ok().as_ref() != Some(&start) {
            let _ = std::env::set_current_dir(&start);
        }
    }
    let (names, path) = ran.map_err(|e| match e {
        Ran::Missing(e) => e,
        Ran::Failed(e) => failed(e),
    })?;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let shown = if path.is_empty() { spec.to_string() } else { path };
    Ok((names, text, shown))
}

/// How running a gunicorn configuration failed.
enum Ran {
    /// The file is not there (or cannot be looked at): the message.
    Missing(String),
    /// It raised.
    Failed(PyErr),
}

/// Runs the file (or imports the module): the names it defined and its path.
fn run_config<'py>(py: Python<'py>, spec: &str) -> Result<(Bound<'py, PyDict>, String), Ran> {
    Ok(match spec.strip_prefix("python:") {
        Some(module) => {
            let m = py.import(module).map_err(Ran::Failed)?;
            let path = m.getattr("__file__").and_then(|f| f.extract::<String>()).unwrap_or_default();
            let names = m.dict();
            (names, path)
        }
        None => {
            // gunicorn's `file:PATH` is a path like any other.
            let file = spec.strip_prefix("file:").unwrap_or(spec);
            std::fs::metadata(file).map_err(|e| Ran::Missing(format!("--config {file}: {e}")))?;
            let names = py
                .import("runpy")
                .and_then(|r| r.call_method1("run_path", (file,)))
                .and_then(|d| Ok(d.downcast_into::<PyDict>()?))
                .map_err(Ran::Failed)?;
            (names, file.to_string())
        }
    })
}

/// A Python value as the config file's TOML value would be; None for
/// None (not set) and for values that have no such form.
fn to_value(v: &Bound<'_, PyAny>) -> Option<Value> {
    if v.is_instance_of::<PyBool>() {
        return v.extract::<bool>().ok().map(Value::from);
    }
    if v.is_instance_of::<PyInt>() {
        return v.extract::<i64>().ok().map(Value::from);
    }
    if v.is_instance_of::<PyFloat>() {
        return v.extract::<f64>().ok().map(Value::from);
    }
    if v.is_instance_of::<PyString>() {
        return v.extract::<String>().ok().map(Value::from);
    }
    if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        let mut array = Array::new();
        for item in v.try_iter().ok()? {
            array.push(to_value(&item.ok()?)?);
        }
        return Some(Value::Array(array));
    }
    None
}

/// A count as gunicorn's validator reads it (`int(value, 0)` for a string),
/// refusing a negative one as gunicorn does; None for None.
fn positive_int(v: &Bound<'_, PyAny>) -> Result<Option<i64>, String> {
    if v.is_none() {
        return Ok(None);
    }
    let n = if v.is_instance_of::<PyString>() {
        let int = v.py().import("builtins").and_then(|b| b.getattr("int")).map_err(|e| e.to_string())?;
        int.call1((v, 0))
            .and_then(|n| n.extract::<i64>())
            .map_err(|_| format!("{v} is not a whole number"))?
    } else if v.is_instance_of::<PyInt>() && !v.is_instance_of::<PyBool>() {
        v.extract::<i64>().map_err(|e| e.to_string())?
    } else {
        return Err(format!("{v} is not a whole number"));
    };
    if n < 0 {
        return Err(format!("{n} is negative (gunicorn: \"Value must be positive\")"));
    }
    Ok(Some(n))
}

/// The file's settings as corral options, in the order the file has them,
/// and notes about settings it ignores.
pub fn translate(
    py: Python<'_>,
    spec: &str,
    given: &dyn Fn(&str) -> Option<String>,
) -> Result<Translated, String> {
    let (names, text, path) = load(py, spec)?;
    let at = |name: &str| match line_of(&text, name) {
        Some(line) => format!("{path}:{line}"),
        None => path.clone(),
    };
    let get = |name: &str| names.get_item(name).ok().flatten();
    // As gunicorn's validate_bool: the strings "true" and "false" too.
    let truthy = |name: &str| {
        get(name).is_some_and(|v| match v.extract::<String>() {
            Ok(text) => text.trim().eq_ignore_ascii_case("true"),
            Err(_) => v.is_truthy().unwrap_or(false),
        })
    };
    let mut out: Vec<Setting> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    // A hook may be named by its dotted path, as gunicorn takes it; any
    // other value that is not a function stops the start there, as in gunicorn.
    for name in HOOKS.iter().map(|(h, _)| *h).chain(crate::server_hooks::RUN.iter().copied()) {
        let Some(value) = get(name) else { continue };
        if value.is_callable() {
            continue;
        }
        let resolved = match value.extract::<String>() {
            Ok(dotted) => resolve_dotted(py, &dotted)
                .map_err(|e| format!("{}: `{name} = {dotted:?}`: {e}", at(name)))?,
            Err(_) => {
                let shown = value.repr().map(|r| r.to_string()).unwrap_or_default();
                return Err(format!(
                    "{}: `{name} = {shown}` is not a function (nor a \"module.function\" name), which a \
                     gunicorn server hook must be",
                    at(name)
                ));
            }
        };
        names.set_item(name, resolved).map_err(|e| e.to_string())?;
    }
    // Each hook takes what gunicorn calls it with, checked now rather than
    // found when it first runs, which may be much later (`on_exit`).
    let shim = py.import("corral._gunicorn").map_err(|e| e.to_string())?;
    for &name in crate::server_hooks::RUN {
        let Some(hook) = get(name).filter(|v| v.is_callable()) else { continue };
        let Some(n) =
            shim.call_method1("arity", (&hook,)).and_then(|n| n.extract::<Option<usize>>()).ok().flatten()
        else {
            continue;
        };
        let wanted = crate::server_hooks::parameters(name);
        if name == "post_request" && (2..4).contains(&n) {
            let wrapped = shim.call_method1("post_request_of", (&hook, n)).map_err(|e| e.to_string())?;
            names.set_item(name, wrapped).map_err(|e| e.to_string())?;
        } else if n != wanted.split(", ").count() {
            return Err(format!(
                "{}: the server hook `{name}` takes {n} positional parameter(s), but is called as \
                 {name}({wanted}), as gunicorn calls it",
                at(name)
            ));
        }
    }
    // All of them at once, so that one edit of the file deals with them.
    let mut hooks: Vec<(usize, String)> = HOOKS
        .iter()
        .filter(|(hook, _)| get(hook).is_some_and(|v| v.is_callable()))
        .map(|(hook, instead)| {
            let line = line_of(&text, hook).unwrap_or(usize::MAX);
            (line, format!("{}: `{hook}` is a gunicorn server hook corral cannot run: {instead}", at(hook)))
        })
        .collect();
    if !hooks.is_empty() {
        hooks.sort();
        return Err(hooks.into_iter().map(|(_, m)| m).collect::<Vec<_>>().join("\n"));
    }
    if let Some(class) = get("worker_class") {
        let class = class.extract::<String>().unwrap_or_default();
        let known =
            ["sync", "gthread", "gunicorn.workers.sync.SyncWorker", "gunicorn.workers.gthread.ThreadWorker"];
        if !known.contains(&class.as_str()) {
            return Err(format!(
                "{}: `worker_class = {class:?}`: corral's workers are gunicorn's sync and gthread kind \
                 (--threads N threads each, the GIL released while the app waits on I/O); it runs no \
                 gevent, eventlet or ASGI workers",
                at("worker_class")
            ));
        }
    }
    // gunicorn's `protocol = "uwsgi"`: its binds speak uwsgi (for nginx's uwsgi_pass).
    // A setting that depends on another reads the other's final value: the
    // command line's or the environment's (`given`, by corral's option id)
    // over the file's, as gunicorn merges them before it reads either.
    let given_bool = |id: &str| given(id).map(|raw| boolish(&raw));
    let uwsgi = match get("protocol").map(|p| p.extract::<String>()) {
        None => false,
        Some(Ok(p)) if p == "http" => false,
        Some(Ok(p)) if p == "uwsgi" => true,
        Some(_) => {
            return Err(format!(
                "{}: gunicorn's `protocol` is \"http\" or \"uwsgi\" (its bind addresses then speak uwsgi, as \
                 corral's --uwsgi ADDR does)",
                at("protocol")
            ))
        }
    };
    if uwsgi && get("bind").is_none_or(|b| b.is_none()) {
        // gunicorn's default bind, in the protocol asked for.
        out.push(Setting { key: "uwsgi", value: Value::from("127.0.0.1:8000"), at: at("protocol") });
    }
    // A zero max_requests is gunicorn's "off", and its jitter then means nothing.
    let recycling = match (given("max_requests"), get("max_requests")) {
        (Some(raw), _) => raw.trim().parse::<i64>().ok(),
        (None, Some(v)) => {
            positive_int(&v).map_err(|e| format!("{}: gunicorn's `max_requests`: {e}", at("max_requests")))?
        }
        (None, None) => None,
    }
    .is_some_and(|n| n > 0);
    let mut no_scheme_headers: Option<String> = None;
    let mut items: Vec<(String, Bound<'_, PyAny>)> = names
        .iter()
        .filter_map(|(k, v)| Some((k.extract::<String>().ok()?, v)))
        .filter(|(k, _)| !k.starts_with('_'))
        .collect();
    // In the file's order, so repeated errors point at the first.
    items.sort_by_key(|(k, _)| line_of(&text, k).unwrap_or(usize::MAX));
    for (name, value) in items {
        if name == "secure_scheme_headers" {
            if value.downcast::<PyDict>().is_ok_and(|d| d.is_empty()) {
                // No header makes the scheme https, from any peer.
                no_scheme_headers = Some(at(&name));
                continue;
            }
            match scheme_headers(&value) {
                Some(true) => {}
                Some(false) => notes.push(format!(
                    "{}: gunicorn's `secure_scheme_headers` names only part of gunicorn's default; \
                     corral takes all of it from --forwarded-allow-ips peers: {}",
                    at(&name),
                    SCHEME_HEADERS.iter().map(|(h, v)| format!("{h}: {v}")).collect::<Vec<_>>().join(", ")
                )),
                None => {
                    return Err(format!(
                        "{}: gunicorn's `secure_scheme_headers` names a header or value corral does not \
                         take: it makes the scheme https on {} only (from --forwarded-allow-ips peers)",
                        at(&name),
                        SCHEME_HEADERS
                            .iter()
                            .map(|(h, v)| format!("{h}: {v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
            continue;
        }
        if name == "capture_output" && value.is_truthy().unwrap_or(false) {
            let errorlog =
                given("error_log").or_else(|| get("errorlog").and_then(|v| v.extract::<String>().ok()));
            if errorlog.as_deref().is_none_or(|e| e == "-") {
                // gunicorn takes it, to no effect: the output is on stderr already.
                notes.push(format!(
                    "{}: gunicorn's `capture_output` without an errorlog file is not needed: the app's \
                     output goes to standard error already; ignored",
                    at(&name)
                ));
                continue;
            }
        }
        let Some(rule) = rule(&name) else { continue };
        let key = match &rule {
            Rule::Ignored => continue,
            Rule::Refused(accepted, why) | Rule::Moot(accepted, why) => {
                let moot = matches!(rule, Rule::Moot(..));
                let accepted = std::ffi::CString::new(*accepted).expect("a literal");
                let accepted = py.eval(&accepted, None, None).map_err(|e| e.to_string())?;
                if value.is_none() || accepted.contains(&value).unwrap_or(false) {
                    continue;
                }
                if moot {
                    notes.push(format!("{}: gunicorn's `{name}` is not needed: {why}; ignored", at(&name)));
                    continue;
                }
                return Err(format!(
                    "{}: gunicorn's `{name}` has no counterpart in corral: {why}",
                    at(&name)
                ));
            }
            Rule::Option("http") if uwsgi => "uwsgi",
            Rule::Option(key) => *key,
        };
        if value.is_none() || (matches!(name.as_str(), "max_requests" | "max_requests_jitter") && !recycling)
        {
            continue;
        }
        // Only unix sockets take gunicorn's umask: with none, it asks for nothing.
        let unix_bind = |b: Option<String>| b.is_some_and(|b| b.contains("unix:"));
        if name == "umask"
            && !unix_bind(given("http"))
            && !unix_bind(get("bind").map(|b| b.str().map(|s| s.to_string()).unwrap_or_default()))
        {
            continue;
        }
        let Some(mut v) = to_value(&value) else {
            return Err(format!(
                "{}: gunicorn's `{name}` has a value corral cannot take ({})",
                at(&name),
                value.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ));
        };
        if matches!(name.as_str(), "max_requests" | "max_requests_jitter") {
            // Numbers as gunicorn reads them: "1000" and 0x10 too, but never below 0.
            let n = positive_int(&value).map_err(|e| format!("{}: gunicorn's `{name}`: {e}", at(&name)))?;
            v = n.map_or(v, Value::from);
        }
        // gunicorn changes to its chdir before it opens its logs, its pid
        // file and its unix sockets: relative paths in the file are from there.
        if let Some(dir) = given("chdir").or_else(|| get("chdir").and_then(|c| c.extract::<String>().ok())) {
            if matches!(name.as_str(), "accesslog" | "errorlog" | "pidfile" | "bind") {
                v = in_dir(&dir, &name, v);
            }
        }
        v = match (name.as_str(), v) {
            // gunicorn's umask is a number (0o022), or a string int() reads.
            ("umask", v) => {
                let mask = match &v {
                    Value::Integer(i) => u32::try_from(*i.value()).ok().filter(|m| *m <= 0o777),
                    Value::String(s) => {
                        let s = s.value().trim();
                        match (
                            s.strip_prefix("0o").or(s.strip_prefix("0O")),
                            s.strip_prefix("0x").or(s.strip_prefix("0X")),
                        ) {
                            (Some(oct), _) => u32::from_str_radix(oct, 8).ok(),
                            (_, Some(hex)) => u32::from_str_radix(hex, 16).ok(),
                            // int(v, 0) refuses "022": a leading zero
                            // says octal, which it wants spelt 0o22.
                            _ if s.len() > 1 && s.starts_with('0') && !s.bytes().all(|b| b == b'0') => {
                                return Err(format!(
                                    "{}: gunicorn's `umask` {s:?} has a leading zero, which gunicorn refuses \
                                     (it reads the string with int(v, 0)): write \"0o{}\" for octal, or the \
                                     number 0o{} without quotes",
                                    at(&name),
                                    s.trim_start_matches('0'),
                                    s.trim_start_matches('0'),
                                ));
                            }
                            _ => s.parse::<u32>().ok(),
                        }
                        .filter(|m| *m <= 0o777)
                    }
                    _ => None,
                };
                let Some(mask) = mask else {
                    return Err(format!(
                        "{}: gunicorn's `umask` is not a umask (0 to 0o777): {}",
                        at(&name),
                        value
                    ));
                };
                Value::from(format!("{:o}", 0o777 & !mask))
            }
            // gunicorn takes user and group ids as numbers.
            ("user" | "group", Value::Integer(i)) => Value::from(i.value().to_string()),
            // Lists of networks are one comma-separated value in corral.
            ("forwarded_allow_ips" | "proxy_allow_ips" | "pythonpath", Value::Array(a)) => Value::from(
                a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect::<Vec<_>>().join(","),
            ),
            ("loglevel", Value::String(s)) => Value::from(s.value().to_ascii_lowercase()),
            (_, v) => v,
        };
        if name == "timeout" && matches!(&v, Value::Integer(i) if *i.value() > 0) {
            notes.push(format!(
                "{}: gunicorn's `timeout` (how long a worker may stay silent) is taken as corral's \
                 --timeout, a deadline for each request: one running longer gets 504 and its worker \
                 is replaced, also with several threads (gunicorn's gthread workers let it run)",
                at(&name)
            ));
        }
        out.push(Setting { key, value: v, at: at(&name) });
    }
    if let Some(set_at) = no_scheme_headers {
        // Which peers may send them is moot then.
        out.retain(|s| s.key != "forwarded-allow-ips");
        out.push(Setting { key: "forwarded-allow-ips", value: Value::from("none"), at: set_at });
    }
    // gunicorn watches these files for changes only while it reloads on code changes.
    if given_bool("reload").unwrap_or_else(|| truthy("reload")) {
        if let Some(mut files) = get("reload_extra_files").and_then(|v| to_value(&v)) {
            // gunicorn's reloader runs in the worker, after its chdir:
            // relative names and patterns are from there.
            if let Some(dir) =
                given("chdir").or_else(|| get("chdir").and_then(|c| c.extract::<String>().ok()))
            {
                files = in_dir(&dir, "reload_extra_files", files);
            }
            // gunicorn takes glob patterns there (`templates/**/*.html`):
            // each is the files it matches now, watched as named files.
            let files = match files {
                Value::Array(items) => {
                    let mut expanded = Vec::new();
                    for item in items {
                        match item.as_str().filter(|p| p.contains(['*', '?', '['])) {
                            Some(pattern) => {
                                let found = glob_files(py, pattern);
                                if found.is_empty() {
                                    notes.push(format!(
                                        "gunicorn's reload_extra_files pattern {pattern:?} matches no file now; the \
                                         files a pattern matches at start are watched"
                                    ));
                                } else {
                                    notes.push(format!(
                                        "gunicorn's reload_extra_files pattern {pattern:?} is the {} file(s) it \
                                         matches at start; one added later is not watched until the next start",
                                        found.len()
                                    ));
                                }
                                // `a/*.html` and `a/**/*.html` both match a/t.html.
                                for f in found {
                                    if !expanded.iter().any(|v: &Value| v.as_str() == Some(f.as_str())) {
                                        expanded.push(Value::from(f));
                                    }
                                }
                            }
                            None => expanded.push(item),
                        }
                    }
                    Value::Array(expanded.into_iter().collect())
                }
                other => other,
            };
            if !matches!(&files, Value::Array(a) if a.is_empty()) {
                out.push(Setting { key: "touch-reload", value: files, at: at("reload_extra_files") });
            }
        }
    }
    Ok(Translated {
        settings: out,
        notes,
        hooks: crate::server_hooks::ServerHooks::from_names(&names),
        binds_speak_uwsgi: uwsgi,
    })
}

/// The files a glob pattern matches now (`**` across directories), as
/// Python's glob finds them, sorted.
fn glob_files(py: Python<'_>, pattern: &str) -> Vec<String> {
    let found = py.import("glob").and_then(|g| {
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("recursive", true)?;
        g.call_method("glob", (pattern,), Some(&kwargs))?.extract::<Vec<String>>()
    });
    let mut files: Vec<String> =
        found.unwrap_or_default().into_iter().filter(|f| std::path::Path::new(f).is_file()).collect();
    files.sort();
    files
}

/// What a gunicorn configuration file sets, in corral's terms.
pub struct Translated {
    pub settings: Vec<Setting>,
    /// Settings left out, and why.
    pub notes: Vec<String>,
    pub hooks: crate::server_hooks::ServerHooks,
    /// `protocol = "uwsgi"`: every bind speaks uwsgi, the command line's
    /// `-b` too (see [`binds_as_uwsgi`]).
    pub binds_speak_uwsgi: bool,
}

/// A value clap's boolish parser takes as true (`--reload`, `CORRAL_RELOAD=yes`).
fn boolish(raw: &str) -> bool {
    matches!(raw.trim().to_ascii_lowercase().as_str(), "y" | "yes" | "t" | "true" | "on" | "1")
}

/// gunicorn's `protocol = "uwsgi"` applies to every bind address, those of
/// `-b`/`--bind` on its command line too: they become corral's `--uwsgi`,
/// which also replaces the file's `bind`, as gunicorn's command line does.
/// (`--http`, corral's own name, stays HTTP.)
pub fn binds_as_uwsgi(argv: &mut [String]) {
    let mut i = 1;
    while i < argv.len() && argv[i] != "--" {
        let a = &argv[i];
        if a == "-b" || a == "--bind" {
            argv[i] = "--uwsgi".to_string();
            i += 1; // its value
        } else if let Some(v) = a.strip_prefix("--bind=").or_else(|| a.strip_prefix("-b")) {
            argv[i] = format!("--uwsgi={}", v.strip_prefix('=').unwrap_or(v));
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn moot_gunicorn_flags_are_left_out() {
        let mut argv: Vec<String> = [
            "corral",
            "--worker-tmp-dir",
            "/dev/shm",
            "-w",
            "2",
            "--no-sendfile",
            "--http-parser=auto",
            "app:x",
        ]
        .map(String::from)
        .to_vec();
        let notes = super::drop_moot_flags(&mut argv);
        assert_eq!(argv, ["corral", "-w", "2", "app:x"]);
        assert_eq!(notes.len(), 3);
        assert!(notes[0].starts_with("gunicorn's --worker-tmp-dir /dev/shm is not needed: corral's workers"));
        // A switch with a value, and anything after `--`, are the parser's.
        let mut argv: Vec<String> =
            ["corral", "--no-sendfile=1", "--", "--worker-tmp-dir"].map(String::from).to_vec();
        assert!(super::drop_moot_flags(&mut argv).is_empty());
        assert_eq!(argv.len(), 4);
    }

    #[test]
    fn a_proxy_protocol_mode_after_a_space_is_joined() {
        let mut argv: Vec<String> = ["corral", "--proxy-protocol", "v1", "app:x"].map(String::from).to_vec();
        super::join_proxy_protocol_mode(&mut argv, 1);
        assert_eq!(argv, ["corral", "--proxy-protocol=v1", "app:x"]);
        let mut argv: Vec<String> = ["corral", "--proxy-protocol", "app:x"].map(String::from).to_vec();
        super::join_proxy_protocol_mode(&mut argv, 1);
        assert_eq!(argv, ["corral", "--proxy-protocol", "app:x"]);
    }

    use super::*;

    #[test]
    fn lines_of_assignments_and_hooks() {
        let text = "import os\nworkers = 4\nbind: list = ['a']\nif workers == 2:\n    threads = 2\ndef post_fork(server, worker):\n    pass\n";
        assert_eq!(line_of(text, "workers"), Some(2));
        assert_eq!(line_of(text, "bind"), Some(3));
        assert_eq!(line_of(text, "threads"), None);
        assert_eq!(line_of(text, "post_fork"), Some(6));
        assert_eq!(line_of(text, "work"), None);
        // The last assignment is the one whose value counts.
        let text = "import os\nworkers = 2\nworkers = int(os.environ.get('W', workers))\n";
        assert_eq!(line_of(text, "workers"), Some(3));
    }

    #[test]
    fn every_hook_and_setting_is_classified_once() {
        for hook in HOOKS.iter().map(|(h, _)| *h).chain(crate::server_hooks::RUN.iter().copied()) {
            assert!(rule(hook).is_none(), "{hook}");
        }
        for (hook, _) in HOOKS {
            assert!(!crate::server_hooks::RUN.contains(hook), "{hook}");
        }
        assert!(matches!(rule("bind"), Some(Rule::Option("http"))));
        assert!(rule("not_a_setting").is_none());
    }

    #[test]
    fn hints_for_gunicorns_names() {
        assert_eq!(hint("bind").as_deref(), Some("--http"));
        assert_eq!(hint("preload_app").as_deref(), Some("--preload"));
        assert!(hint("--worker-tmp-dir")
            .unwrap()
            .starts_with("nothing, as it is not needed (corral's workers"));
        assert!(hint("-k").unwrap().starts_with("--threads N (its workers are gunicorn's sync and gthread"));
        assert!(hint("--statsd-host").unwrap().starts_with("nothing (corral sends no StatsD"));
        assert!(hint("post_fork").unwrap().starts_with("`def post_fork(...)` in a gunicorn configuration"));
        assert!(hint("worker_abort").unwrap().starts_with("nothing (a request past --timeout gets 504"));
        assert_eq!(hint("wrkers"), None);
    }
}
