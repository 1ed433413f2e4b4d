//! `--config uwsgi.ini`: a uWSGI ini file's `[uwsgi]` section, translated
//! into corral's options, so a project moves over with the file it has.
//!
//! Every option is translated or refused: an option with a counterpart
//! becomes that option (`processes` -> `workers`, `socket` -> `uwsgi`,
//! `harakiri` -> `timeout`); one asking for what corral does anyway
//! (`master`, `vacuum`, `enable-threads`) is taken with a note; one corral
//! cannot honour (`home` naming another virtualenv, the spooler) stops
//! the start with its line and what to do instead, all of them at once.
//! uWSGI's own expansions are applied first: `%d` (the file's directory),
//! `%n`, `%s`, `%e`, `%p`, `%c`, `%k`, `%h`, `%%`, `$(VAR)` from the environment, and
//! `%(name)` for an earlier option or placeholder of the file; `ini =`
//! includes are read in place, as uWSGI assembles them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use toml_edit::{Array, Item, Value};

/// A translated entry: corral option (long name, or `app`), value, "FILE:LINE".
pub type Entry = (String, Item, String);

/// Whether `--config` names a uWSGI ini file: an `.ini` name (with
/// uWSGI's optional `:section`).
pub fn is_uwsgi_ini(spec: &str) -> bool {
    let (file, _) = split_section(spec);
    file.ends_with(".ini")
}

/// The file a `FILE.ini[:SECTION]` spec names.
pub fn file_of(spec: &str) -> &str {
    split_section(spec).0
}

/// `FILE.ini:SECTION` (uWSGI's `--ini file:section`) -> (file, section).
fn split_section(spec: &str) -> (&str, &str) {
    match spec.rsplit_once(':') {
        Some((file, section)) if file.ends_with(".ini") && !section.contains('/') => (file, section),
        _ => (spec, "uwsgi"),
    }
}

/// One `key = value` line of the section.
struct Line {
    key: String,
    value: String,
    /// Where it was written, "FILE:LINE".
    at: String,
    /// Its place among all the lines read, included files' in theirs.
    seq: usize,
    /// Set with `set-placeholder`, for `%(name)` only.
    placeholder: bool,
    /// The value as written, before expansion.
    raw: String,
}

/// The options that name the app (`mount` names one under a prefix).
const APP_KEYS: &[&str] = &["module", "wsgi", "w", "wsgi-file", "file"];

/// How deep `ini =` includes may nest: deeper is a loop in all likelihood.
const MAX_INCLUDE_DEPTH: usize = 16;

/// uWSGI's configuration logic: the block a section's reading is in.
/// uWSGI does not nest them, and neither does corral.
enum Block {
    /// Outside any block.
    Open,
    /// After `if-env`, `if-exists`... up to `endif`: whether the test held,
    /// and what `%(_)` stands for in the block (the `if-not-*` tests of a
    /// name leave it as written, as uWSGI does).
    If { at: String, key: String, taken: bool, context: String },
    /// After `for = A B C` up to `endfor`: each line in it is read once per
    /// item, with `%(_)` the item.
    For { at: String, items: Vec<String> },
}

/// The test of an `if-*` line: whether it holds, and what `%(_)` is in its block.
fn logic_test(key: &str, value: &str, earlier: &[Line]) -> Result<(bool, String), String> {
    let (negated, test) = match key.strip_prefix("if-not-") {
        Some(test) => (true, test),
        None => (false, key.strip_prefix("if-").unwrap_or(key)),
    };
    let literal = "%(_)".to_string();
    let (held, context) = match test {
        "env" | "opt" => {
            let (name, wanted) = match value.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (value.trim(), None),
            };
            let found = if test == "env" {
                std::env::var(name).ok()
            } else {
                earlier.iter().rev().find(|l| l.key == name).map(|l| l.value.clone())
            };
            let held = found.as_deref().is_some_and(|v| wanted.is_none_or(|w| w == v));
            (held, found.unwrap_or_default())
        }
        "exists" => (Path::new(value).exists(), value.to_string()),
        "file" => (Path::new(value).is_file(), value.to_string()),
        "dir" => (Path::new(value).is_dir(), value.to_string()),
        _ => return Err(format!("uWSGI's `{key}` is not a test corral reads (if-env, if-exists, if-file, if-dir, if-opt and their if-not- forms)")),
    };
    let context = if negated && matches!(test, "env" | "opt") { literal } else { context };
    Ok((held != negated, context))
}

/// The files a uWSGI ini file's section is read from: itself and those its
/// `ini =` lines include (that set an option).
pub fn files_read(spec: &str) -> Vec<PathBuf> {
    let Ok((file, lines)) = read(spec) else { return Vec::new() };
    let mut files = vec![PathBuf::from(file)];
    for l in &lines {
        let f = PathBuf::from(l.at.rsplit_once(':').map_or(l.at.as_str(), |(f, _)| f));
        if !files.contains(&f) {
            files.push(f);
        }
    }
    files
}

/// Reads the section's lines, in order, with uWSGI's expansions applied and
/// `ini = FILE[:SECTION]` (or `ini = :SECTION` of the same file) replaced
/// by the lines it names, where it stands, as uWSGI assembles them.
fn read(spec: &str) -> Result<(String, Vec<Line>), String> {
    let (file, section) = split_section(spec);
    let text = std::fs::read_to_string(file).map_err(|e| format!("--config {file}: {e}"))?;
    let mut lines = Vec::new();
    read_section(file, &text, section, &mut lines, &mut Vec::new())?;
    Ok((file.to_string(), lines))
}

/// Appends one file's section to `lines`; `open` lists the sections being
/// read, the includers of this one, to stop a loop.
fn read_section(
    file: &str,
    text: &str,
    section: &str,
    lines: &mut Vec<Line>,
    open: &mut Vec<(PathBuf, String)>,
) -> Result<(), String> {
    let path = std::path::absolute(file).unwrap_or_else(|_| PathBuf::from(file));
    let magic = Magic::of(&path);
    open.push((path.clone(), section.to_string()));
    let mut in_section = false;
    let mut found = false;
    let mut block = Block::Open;
    for (i, raw) in text.lines().enumerate() {
        let at = format!("{file}:{}", i + 1);
        let l = raw.trim();
        if l.is_empty() || l.starts_with(';') || l.starts_with('#') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            if in_section {
                unclosed(&block)?;
            }
            in_section = name.trim() == section;
            found |= in_section;
            continue;
        }
        if !in_section {
            continue;
        }
        // A bare name (no value) is a flag uWSGI sets to true.
        let (key, raw) = match l.split_once('=') {
            Some((key, raw)) => (key.trim().to_string(), Some(raw.trim().to_string())),
            None => (l.to_string(), None),
        };
        if key.starts_with("if-") || key == "for" || key.starts_with("for-") {
            let inner = match &block {
                Block::Open => None,
                Block::If { at, key, .. } => Some((at, key.as_str())),
                Block::For { at, .. } => Some((at, "for")),
            };
            if let Some((outer_at, outer)) = inner {
                return Err(format!(
                    "{at}: `{key}` inside the `{outer}` block opened at {outer_at}: uWSGI's configuration \
                     logic does not nest"
                ));
            }
            let raw = raw.as_deref().unwrap_or("true");
            let value = expand(raw, &magic, lines, None).map_err(|e| format!("{at}: `{key}`: {e}"))?;
            block = if key == "for" {
                Block::For { at: at.clone(), items: value.split_whitespace().map(str::to_string).collect() }
            } else if key.starts_with("for-") {
                return Err(format!("{at}: uWSGI's `{key}` is not one corral reads (`for = A B C` is)"));
            } else {
                let (taken, context) = logic_test(&key, &value, lines).map_err(|e| format!("{at}: {e}"))?;
                Block::If { at: at.clone(), key: key.clone(), taken, context }
            };
            continue;
        }
        if key == "endif" || key == "endfor" {
            match (&block, key.as_str()) {
                (Block::If { .. }, "endif") | (Block::For { .. }, "endfor") => block = Block::Open,
                (Block::Open, _) => return Err(format!("{at}: `{key}` with no block open above it")),
                (Block::If { at: o, key: k, .. }, _) => {
                    return Err(format!("{at}: `{key}` ends the `{k}` block opened at {o}"))
                }
                (Block::For { at: o, .. }, _) => {
                    return Err(format!("{at}: `{key}` ends the `for` block opened at {o}"))
                }
            }
            continue;
        }
        // The value of `%(_)` for each time the line is read.
        let contexts: Vec<Option<String>> = match &block {
            Block::Open => vec![None],
            Block::If { taken: false, .. } => continue,
            Block::If { context, .. } => vec![Some(context.clone())],
            Block::For { items, .. } => items.iter().cloned().map(Some).collect(),
        };
        for context in contexts {
            read_line(file, &magic, &key, raw.as_deref(), &at, lines, open, context.as_deref())?;
        }
    }
    if in_section {
        unclosed(&block)?;
    }
    open.pop();
    if !found {
        return Err(format!("{file}: no [{section}] section (uWSGI reads its options from that section)"));
    }
    Ok(())
}

/// Refuses a section that ends inside a block.
fn unclosed(block: &Block) -> Result<(), String> {
    match block {
        Block::Open => Ok(()),
        Block::If { at, key, .. } => Err(format!("{at}: `{key}` has no `endif` below it in its section")),
        Block::For { at, .. } => Err(format!("{at}: `for` has no `endfor` below it in its section")),
    }
}

/// Reads one `key = value` line (`raw` None for a bare name, a flag set to
/// true) into `lines`, with `%(_)` standing for `context`.
#[allow(clippy::too_many_arguments)]
fn read_line(
    file: &str,
    magic: &Magic,
    key: &str,
    raw: Option<&str>,
    at: &str,
    lines: &mut Vec<Line>,
    open: &mut Vec<(PathBuf, String)>,
    context: Option<&str>,
) -> Result<(), String> {
    let (at, seq) = (at.to_string(), lines.len());
    let Some(raw) = raw else {
        let (key, value) = (key.to_string(), "true".to_string());
        lines.push(Line { key, value, at, seq, placeholder: false, raw: String::new() });
        return Ok(());
    };
    let (key, raw) = (key.to_string(), raw.to_string());
    // uWSGI's log format uses %(name) for its own variables, not placeholders.
    let value = if matches!(key.as_str(), "log-format" | "logformat") {
        raw.clone()
    } else {
        expand(&raw, magic, lines, context).map_err(|e| format!("{at}: `{key}`: {e}"))?
    };
    if key == "ini" {
        let (inner, inner_section) = match value.strip_prefix(':') {
            Some(name) => (file.to_string(), name.to_string()),
            None => {
                let (f, s) = split_section(&value);
                (f.to_string(), s.to_string())
            }
        };
        let inner_path = std::path::absolute(&inner).unwrap_or_else(|_| PathBuf::from(&inner));
        if open.len() >= MAX_INCLUDE_DEPTH || open.contains(&(inner_path, inner_section.clone())) {
            return Err(format!(
                "{at}: `ini = {value}` includes [{inner_section}] of {inner}, which is being read already \
                     (an include loop)"
            ));
        }
        let inner_text =
            std::fs::read_to_string(&inner).map_err(|e| format!("{at}: `ini = {value}`: {inner}: {e}"))?;
        return read_section(&inner, &inner_text, &inner_section, lines, open)
            .map_err(|e| format!("{e}\n(included at {at})"));
    }
    if matches!(key.as_str(), "set-placeholder" | "set-ph") {
        let Some((name, value)) = value.split_once('=') else {
            return Err(format!("{at}: `{key}` must be NAME=VALUE"));
        };
        let (key, value) = (name.trim().to_string(), value.trim().to_string());
        lines.push(Line { key, value, at, seq, placeholder: true, raw });
        return Ok(());
    }
    lines.push(Line { key, value, at, seq, placeholder: false, raw });
    Ok(())
}

/// uWSGI's magic variables for one file.
struct Magic {
    dir: String,
    name: String,
    file: String,
    ext: String,
    path: String,
    parent: String,
}

impl Magic {
    fn of(path: &Path) -> Magic {
        let s = |p: Option<&std::ffi::OsStr>| p.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = path.parent().map(|d| format!("{}/", d.display())).unwrap_or_default();
        Magic {
            dir,
            name: s(path.file_stem()),
            file: s(path.file_name()),
            ext: s(path.extension()),
            path: path.display().to_string(),
            parent: s(path.parent().and_then(Path::file_name)),
        }
    }
}

/// Applies `%d`-style magic variables, `$(VAR)`, `@(FILE)` and `%(name)` to a value;
/// `%(_)` is `context`, inside a block of configuration logic.
fn expand(value: &str, magic: &Magic, earlier: &[Line], context: Option<&str>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find(['%', '$', '@']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(inner) = tail.strip_prefix("@(") {
            // A file's content, less one final newline, as uWSGI reads it.
            let end = inner.find(')').ok_or("an unclosed @(")?;
            let path = &inner[..end];
            if let Some((scheme, _)) =
                path.split_once("://").filter(|(s, _)| s.chars().all(|c| c.is_ascii_alphanumeric()))
            {
                return Err(format!("uWSGI's @({scheme}://...) is not one corral reads (@(FILE) is)"));
            }
            let text = std::fs::read_to_string(path).map_err(|e| format!("@({path}): {e}"))?;
            out.push_str(text.strip_suffix('\n').unwrap_or(&text));
            rest = &inner[end + 1..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('@') {
            out.push('@');
            rest = after;
            continue;
        }
        if let Some(inner) = tail.strip_prefix("$(") {
            let end = inner.find(')').ok_or("an unclosed $(")?;
            let var = &inner[..end];
            // uWSGI leaves the reference to an unset variable as it is written.
            match std::env::var(var) {
                Ok(v) => out.push_str(&v),
                Err(_) => out.push_str(&tail[..end + 3]),
            }
            rest = &inner[end + 1..];
            continue;
        }
        if let Some(inner) = tail.strip_prefix("%(") {
            let end = inner.find(')').ok_or("an unclosed %(")?;
            let name = &inner[..end];
            if let (Some(context), "_") = (context, name) {
                out.push_str(context);
                rest = &inner[end + 1..];
                continue;
            }
            let line = earlier
                .iter()
                .rev()
                .find(|l| l.key == name)
                .ok_or_else(|| format!("%({name}) names no option or placeholder set above it"))?;
            out.push_str(&line.value);
            rest = &inner[end + 1..];
            continue;
        }
        let next = tail[1..].chars().next();
        let sub = match (tail.as_bytes()[0], next) {
            (b'%', Some('d')) => Some(magic.dir.as_str()),
            (b'%', Some('n')) => Some(magic.name.as_str()),
            (b'%', Some('s')) => Some(magic.file.as_str()),
            (b'%', Some('e')) => Some(magic.ext.as_str()),
            (b'%', Some('p')) => Some(magic.path.as_str()),
            (b'%', Some('c')) => Some(magic.parent.as_str()),
            (b'%', Some('%')) => Some("%"),
            (b'%', Some('k')) => {
                out.push_str(&std::thread::available_parallelism().map_or(1, |n| n.get()).to_string());
                rest = &tail[2..];
                continue;
            }
            (b'%', Some('h')) => {
                let mut buf = [0u8; 256];
                if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    out.push_str(&String::from_utf8_lossy(&buf[..end]));
                }
                rest = &tail[2..];
                continue;
            }
            (b'%', Some(c)) if c.is_ascii_alphanumeric() => {
                return Err(format!(
                    "uWSGI's magic variable %{c} is not one corral expands (%d %n %s %e %p %c %k %h)"
                ))
            }
            _ => None,
        };
        match sub {
            Some(s) => {
                out.push_str(s);
                rest = &tail[2..];
            }
            None => {
                out.push_str(&tail[..1]);
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// What a uWSGI option is in corral.
enum Rule {
    /// The corral option it sets, its value as it is.
    Option(&'static str),
    /// A listener: uWSGI's address forms become corral's.
    Listener(&'static str),
    /// Asks for what corral does anyway: taken with a note saying why.
    Moot(&'static str),
    /// Handled with the options it goes with (`module` and `callable`...).
    Combined,
    /// No counterpart: refused with why.
    Refused(&'static str),
}

fn rule(key: &str) -> Option<Rule> {
    use Rule::*;
    Some(match key {
        "module" | "wsgi" | "w" | "wsgi-file" | "file" | "callable" | "mount" | "home" | "virtualenv"
        | "venv" | "pyhome" | "h" | "cheaper" | "processes" | "workers" | "p" | "logto" | "logto2"
        | "daemonize" | "req-logger" | "py-autoreload" | "python-autoreload" | "chmod-socket" | "http" | "logger"
        | "stats" | "stats-server" | "buffer-size" | "b" | "manage-script-name" => Combined,
        "chdir" => Option("chdir"),
        "pythonpath" | "python-path" | "pp" => Option("pythonpath"),
        "socket" | "uwsgi-socket" | "s" => Listener("uwsgi"),
        "http-socket" => Listener("http"),
        "fastcgi-socket" => Listener("fastcgi"),
        "scgi-socket" => Listener("scgi"),
        "chown-socket" => Option("socket-owner"),
        "threads" => Option("threads"),
        "harakiri" | "t" => Option("timeout"),
        "max-requests" | "R" => Option("max-requests"),
        "max-requests-delta" => Option("max-requests-jitter"),
        "max-worker-lifetime" => Option("max-worker-lifetime"),
        "reload-on-rss" | "evil-reload-on-rss" => Option("reload-on-rss"),
        "limit-post" => Option("max-body-size"),
        "static-map" => Option("static-map"),
        "check-static" => Option("check-static"),
        "static-safe" => Option("static-safe"),
        "uid" => Option("user"),
        "gid" => Option("group"),
        "listen" | "l" => Option("backlog"),
        "pidfile" | "pidfile2" => Option("pidfile"),
        "env" => Option("env"),
        "touch-reload" | "touch-chain-reload" => Option("touch-reload"),
        "stats-http" => Moot("corral's --stats speaks HTTP (/stats, /metrics)"),
        "socket-timeout" | "z" => Option("socket-timeout"),
        "reload-mercy" | "worker-reload-mercy" => Option("graceful-timeout"),
        "procname" | "procname-prefix" | "procname-prefix-spaced" => Option("name"),
        "umask" => Option("umask"),
        "master" | "M" => Moot("corral always runs a master"),
        "vacuum" => Moot("corral removes its socket and pid files at exit"),
        "die-on-term" => Moot("SIGTERM stops corral gracefully"),
        "enable-threads" | "T" => Moot("the app may start threads; `threads` sets the serving threads"),
        "lazy-apps" | "lazy" => Moot("each worker imports the app (corral's --preload is the opposite)"),
        "need-app" => Moot("corral exits when the app cannot be imported"),
        "thunder-lock" => Moot("workers take connections without a lock stampede"),
        "single-interpreter" | "i" => Moot("each worker has one interpreter"),
        "strict" => Moot("corral refuses unknown options"),
        "auto-procname" => Moot("process titles name the master and each worker"),
        "log-reopen" => Moot("USR1 (and HUP) reopen the log files"),
        "log-master" => Moot("master and workers write to the one error log"),
        "log-date" => Moot("every line of corral's error log is dated"),
        "harakiri-verbose" => Moot("a request past --timeout has its Python stack logged"),
        "offload-threads" => Moot("large downloads are sent by an offload thread already"),
        "memory-report" => Moot("each worker's resident memory is in --stats' /stats and /metrics"),
        "plugins" | "plugin" | "plugins-dir" => {
            Moot("corral serves WSGI apps with the Python it is installed in")
        }
        "post-buffering" => Moot("a body the app did not read is read and dropped"),
        "disable-logging" | "L" => {
            Moot("no access log is written unless --access-log is given (and the file's `req-logger` is dropped)")
        }
        "no-orphans" => Moot("workers leave when their master does"),
        "ignore-sigpipe" | "ignore-write-errors" | "disable-write-exception" => {
            Moot("a client that goes away ends its request with one log line, not an exception in the app")
        }
        "max-fd" => Refused("set `ulimit -n` (LimitNOFILE= under systemd), with --max-connections N"),
        "cheaper-algo" | "cheaper-initial" | "cheaper-step" | "cheaper-overload" => Moot(
            "corral's adaptive pool (from `cheaper` to `processes`) adds a worker when every thread is busy \
             and stops one idle for --scale-down-idle",
        ),
        "log-format" | "logformat" => Refused(
            "corral's --access-log-format takes gunicorn's atoms (%(h)s %(r)s %(s)s ...), not uWSGI's: write it \
             in those",
        ),
        "include" | "inherit" | "xml" | "yaml" | "json" => {
            Refused("corral includes ini files only (`ini = FILE[:SECTION]`): merge this one into an ini file")
        }
        // Settings of uWSGI's HTTP router, which `http` starts in front of
        // the workers; corral's workers serve `http` themselves.
        "http-timeout" => Moot(
            "corral has no HTTP router between client and app: --socket-timeout bounds each read and write of a \
             client, --timeout a request",
        ),
        "http-keepalive" => Moot("corral keeps HTTP/1.1 connections alive (--keepalive-timeout)"),
        "http-auto-chunked" => Moot("corral chunks an HTTP/1.1 response that has no Content-Length"),
        "http-processes" | "http-workers" => {
            Moot("corral has no HTTP router processes: its workers serve `http` themselves")
        }
        "emperor" | "vassal" | "zerg" | "zerg-server" | "fastrouter" | "subscribe-to" => Refused(
            "corral runs one app per server: start one corral for each, under systemd or a supervisor",
        ),
        "spooler"
        | "spooler-processes"
        | "mule"
        | "mules"
        | "cron"
        | "cron2"
        | "attach-daemon"
        | "smart-attach-daemon" => {
            Refused("corral runs no background jobs: use a task queue (Celery, RQ), cron or systemd units")
        }
        "route" | "route-run" | "route-uri" | "route-host" | "response-route" | "final-route" => {
            Refused("corral has no internal routing: route in the front end (nginx location blocks)")
        }
        "cache" | "cache2" => Refused("corral has no shared cache: use Redis or memcached"),
        "https" | "https-socket" | "ssl-socket" => {
            Refused("corral serves plain HTTP: terminate TLS in a front end")
        }
        _ => return None,
    })
}

/// corral options whose uWSGI value is a number, of which uWSGI reads the
/// leading digits.
const NUMERIC: &[&str] = &[
    "threads",
    "timeout",
    "max-requests",
    "max-requests-jitter",
    "max-worker-lifetime",
    "reload-on-rss",
    "max-body-size",
    "backlog",
    "socket-timeout",
    "graceful-timeout",
];

/// A number as uWSGI reads one: its leading digits (`2 ; two workers` is
/// 2); a value with none is left for the option's parser to refuse.
fn leading_number(value: &str) -> String {
    let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        value.to_string()
    } else {
        digits
    }
}

/// A uWSGI socket address as corral writes it: `/path` is `unix:/path`,
/// `:PORT` is every interface.
fn listener(value: &str) -> Result<String, String> {
    if value.starts_with('/') || value.starts_with("./") {
        return Ok(format!("unix:{value}"));
    }
    if value.starts_with('@') {
        return Err("an abstract unix socket (@name): give corral a path or an address".into());
    }
    if let Some(port) = value.strip_prefix(':') {
        return Ok(format!("0.0.0.0:{port}"));
    }
    // uWSGI takes a value with no port as a unix socket's path.
    if !value.contains(':') {
        return Ok(format!("unix:{value}"));
    }
    Ok(value.to_string())
}

/// uWSGI's boolean values: `true`, `1`, `yes`, `on` (and a bare flag).
/// A uWSGI switch's value as uWSGI reads it (`uwsgi_opt_true`): anything
/// but false, off, no and 0 turns it on (`enabled`, `2`, an empty value).
fn truthy(value: &str) -> bool {
    !matches!(value.trim().to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0")
}

/// Translates the file into corral's options. Returns the entries and the
/// notes to show; errors name every option that cannot be taken, with its line.
pub fn translate(spec: &str, python_prefix: &str) -> Result<(Vec<Entry>, Vec<String>), String> {
    let (file, lines) = read(spec)?;
    let at = |l: &Line| l.at.clone();
    let last = |keys: &[&str]| lines.iter().rev().find(|l| keys.contains(&l.key.as_str()));
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    // Relative paths of what uWSGI opens after its chdir (sockets, files
    // it watches or serves) are taken from there.
    let chdir = lines.iter().rev().find(|l| l.key == "chdir").map(|l| l.value.clone());
    let in_chdir = |p: &str| match &chdir {
        Some(c) if Path::new(p).is_relative() => Path::new(c).join(p).display().to_string(),
        _ => p.to_string(),
    };
    // With `mount` and `manage-script-name`, uWSGI matches its static maps
    // against PATH_INFO, the mount's prefix taken off: a map of /static
    // serves /prefix/static/... too. corral matches the path clients
    // request, so such a map is given under the prefix as well.
    let stripped =
        lines.iter().rev().find(|l| l.key == "manage-script-name").is_some_and(|l| truthy(&l.value));
    let prefix = lines
        .iter()
        .rev()
        .find(|l| l.key == "mount")
        .and_then(|l| l.value.split_once('='))
        .map(|(p, _)| p.trim().trim_end_matches('/').to_string())
        .filter(|p| stripped && !p.is_empty());
    let mounted = |url: &str| -> Vec<String> {
        match &prefix {
            Some(p) if url == "/" => vec![p.clone(), url.to_string()],
            Some(p) => vec![format!("{p}{url}"), url.to_string()],
            None => vec![url.to_string()],
        }
    };
    // Repeatable options collect every value, in order.
    let mut list: Vec<(String, Vec<String>, String)> = Vec::new();
    let mut single: HashMap<&'static str, (Value, String)> = HashMap::new();
    let mut push = |key: &str, value: String, at: String| match list.iter_mut().find(|(k, ..)| k == key) {
        Some((_, values, _)) => values.push(value),
        None => list.push((key.to_string(), vec![value], at)),
    };
    // Names the file sets only to use them as %(name) placeholders.
    let used = |l: &Line| {
        let wanted = format!("%({})", l.key);
        lines.iter().any(|o| o.seq > l.seq && o.raw.contains(&wanted))
    };
    for l in &lines {
        let key = l.key.as_str();
        match rule(key) {
            _ if l.placeholder => {}
            None if used(l) => {}
            None => errors.push(match crate::uwsgi_names::equivalent(key) {
                Some(eq) => format!("{}: uWSGI's `{key}`: corral has {eq}", at(l)),
                None => format!("{}: `{key}` is not a uWSGI option corral knows", at(l)),
            }),
            Some(Rule::Combined) => {}
            Some(Rule::Option(opt)) => match opt {
                "env" | "pythonpath" => push(opt, l.value.clone(), at(l)),
                // uWSGI looks for these after its chdir.
                "touch-reload" | "static-safe" => push(opt, in_chdir(&l.value), at(l)),
                // Each leaves what it has not to the next mapping and the app, as in uWSGI.
                "check-static" => {
                    for url in mounted("/") {
                        push("static-map", format!("{url}={}", in_chdir(&l.value)), at(l));
                    }
                }
                "static-map" => match l.value.split_once('=') {
                    Some((url, dir)) => {
                        for url in mounted(url) {
                            push(opt, format!("{url}={}", in_chdir(dir)), at(l));
                        }
                    }
                    None => push(opt, l.value.clone(), at(l)),
                },
                // uWSGI reads a number's leading digits (`processes = 4 ; four`).
                _ if NUMERIC.contains(&opt) => {
                    single.insert(opt, (Value::from(leading_number(&l.value)), at(l)));
                }
                _ => {
                    single.insert(opt, (Value::from(l.value.clone()), at(l)));
                }
            },
            Some(Rule::Listener(opt)) => match listener(&l.value) {
                Ok(addr) => push(
                    opt,
                    addr.strip_prefix("unix:").map_or(addr.clone(), |p| format!("unix:{}", in_chdir(p))),
                    at(l),
                ),
                Err(e) => errors.push(format!("{}: `{key}`: {e}", at(l))),
            },
            Some(Rule::Moot(why)) => {
                if !matches!(l.value.to_ascii_lowercase().as_str(), "false" | "0" | "no" | "off") {
                    notes.push(format!("{}: uWSGI's `{key}` is not needed: {why}; ignored", at(l)));
                }
            }
            Some(Rule::Refused(why)) => {
                errors.push(format!("{}: uWSGI's `{key}` has no counterpart in corral: {why}", at(l)))
            }
        }
    }
    // uWSGI's plain `http` starts its HTTP router in front of the workers;
    // corral serves HTTP itself.
    for l in lines.iter().filter(|l| l.key == "http") {
        match listener(&l.value) {
            Ok(addr) => {
                notes.push(format!(
                    "{}: uWSGI's `http` router is corral's own HTTP listener: served at {addr}",
                    at(l)
                ));
                push("http", addr, at(l));
            }
            Err(e) => errors.push(format!("{}: `http`: {e}", at(l))),
        }
    }
    if let Some(l) = last(&["chmod-socket"]) {
        // uWSGI's bare chmod-socket (which its parser gives as "1") means
        // 666; any other value must be three octal digits, or uWSGI stops
        // with "invalid chmod value".
        if l.value.is_empty() || l.value == "1" || l.value == "true" {
            single.insert("socket-mode", (Value::from("666"), at(l)));
        } else if l.value.len() == 3 && l.value.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            single.insert("socket-mode", (Value::from(l.value.clone()), at(l)));
        } else {
            errors.push(format!(
                "{}: `chmod-socket = {}` is not a mode uWSGI takes: three octal digits (660), or no value \
                 (or 1) for 666",
                at(l),
                l.value
            ));
        }
    }
    // The app: module[:callable], or a file, with `callable` (default application).
    let callable = last(&["callable"]).map(|l| l.value.clone());
    let app_line = last(&[APP_KEYS, &["mount"]].concat());
    let naming: Vec<&Line> = lines.iter().filter(|o| APP_KEYS.contains(&o.key.as_str())).collect();
    let all =
        |of: &[&Line]| of.iter().map(|o| format!("`{} = {}` ({})", o.key, o.value, o.at)).collect::<Vec<_>>();
    if naming.len() > 1 {
        // uWSGI loads one of them (a module before a file) as the app and
        // skips the others ("mountpoint already configured"): which one is
        // meant is not for corral to guess.
        errors.push(format!(
            "{}: {} name an app each: uWSGI serves one of them and skips the others; keep the one meant",
            at(naming[0]),
            all(&naming).join(", ")
        ));
    } else if let (Some(app), Some(mount)) = (naming.first(), lines.iter().find(|o| o.key == "mount")) {
        // uWSGI serves both: the mount's app under its prefix, the other
        // at the root for every other path.
        errors.push(format!(
            "{}: {} and {} name two apps, which uWSGI serves side by side (one under the mount's prefix, \
             the other for every other path): corral serves one app per server, so keep one here and \
             serve the other with a second corral",
            at(app),
            all(&[app]).join(""),
            all(&[mount]).join("")
        ));
    }
    if let Some(l) = app_line {
        let (module, at_line) = match l.key.as_str() {
            "mount" => match l.value.split_once('=') {
                Some((prefix, target)) => {
                    if lines.iter().filter(|o| o.key == "mount").count() > 1 {
                        errors.push(format!(
                            "{}: uWSGI's `mount` is given more than once: corral serves one app per server, \
                             under one --mount prefix",
                            at(l)
                        ));
                    }
                    if stripped {
                        single.insert("mount", (Value::from(prefix.trim().to_string()), at(l)));
                    } else {
                        // uWSGI picks the app by the SCRIPT_NAME the front end
                        // sends and takes nothing off PATH_INFO unless told to.
                        notes.push(format!(
                            "{}: `mount` without `manage-script-name`: uWSGI neither takes {} off \
                             PATH_INFO nor puts it in SCRIPT_NAME, both stay as the front end sends \
                             them, and so they do here (no --mount); add `manage-script-name = true` \
                             to mount the app there",
                            at(l),
                            prefix.trim()
                        ));
                    }
                    (Some(app_of(target.trim(), last(&["chdir"]).map(|c| c.value.as_str()), false)), at(l))
                }
                None => {
                    errors.push(format!("{}: `mount` must be /PREFIX=APP", at(l)));
                    (None, at(l))
                }
            },
            key => {
                let file = matches!(key, "wsgi-file" | "file");
                (Some(app_of(&l.value, last(&["chdir"]).map(|c| c.value.as_str()), file)), at(l))
            }
        };
        if let Some(module) = module {
            let app = match (module.contains(':'), &callable) {
                (true, _) => module,
                (false, Some(c)) => format!("{module}:{c}"),
                (false, None) => format!("{module}:application"),
            };
            single.insert("app", (Value::from(app), at_line));
        }
    }
    // `cheaper` makes the pool adaptive, between it and `processes`.
    let processes = last(&["processes", "workers", "p"]);
    match (last(&["cheaper"]), processes) {
        (Some(c), Some(p)) => {
            single.insert("workers-min", (Value::from(leading_number(&c.value)), at(c)));
            single.insert("workers-max", (Value::from(leading_number(&p.value)), at(p)));
        }
        (Some(c), None) => {
            errors.push(format!("{}: uWSGI's `cheaper` needs `processes` (the most workers)", at(c)))
        }
        (None, Some(p)) => {
            single.insert("workers", (Value::from(leading_number(&p.value)), at(p)));
        }
        (None, None) => {}
    }
    // uWSGI's logto takes the app's output too, as --capture-output does.
    if let Some(l) = last(&["daemonize"]) {
        single.insert("daemon", (Value::from(true), at(l)));
        single.insert("error-log", (Value::from(l.value.clone()), at(l)));
        single.insert("capture-output", (Value::from(true), at(l)));
    }
    if let Some(l) = last(&["logger"]) {
        match l.value.strip_prefix("file:") {
            Some(path) => {
                single.insert("error-log", (Value::from(path.to_string()), at(l)));
                single.insert("capture-output", (Value::from(true), at(l)));
            }
            None => errors.push(format!(
                "{}: uWSGI's `logger` is taken in its file:PATH form only (corral's --error-log FILE)",
                at(l)
            )),
        }
    }
    if let Some(l) = last(&["logto", "logto2"]) {
        single.insert("error-log", (Value::from(l.value.clone()), at(l)));
        single.insert("capture-output", (Value::from(true), at(l)));
    }
    // uWSGI writes no request log with disable-logging, whatever req-logger says.
    let no_request_log = last(&["disable-logging", "L"])
        .is_some_and(|l| !matches!(l.value.to_ascii_lowercase().as_str(), "false" | "0" | "no" | "off"));
    if let Some(l) = last(&["req-logger"]).filter(|_| !no_request_log) {
        match l.value.strip_prefix("file:") {
            Some(path) => {
                single.insert("access-log", (Value::from(path.to_string()), at(l)));
            }
            None => errors.push(format!(
                "{}: uWSGI's `req-logger` is taken in its file:PATH form only (corral's --access-log FILE)",
                at(l)
            )),
        }
    }
    // uWSGI's buffer-size bounds a request's whole head (4096 by default):
    // a larger one lets cookies and request lines grow as large.
    if let Some(l) = last(&["buffer-size", "b"]) {
        match l.value.trim().parse::<u64>() {
            Ok(n) if n > 8190 => {
                let n = n.min(1 << 20).to_string();
                single.insert("limit-request-line", (Value::from(n.clone()), at(l)));
                single.insert("limit-request-field-size", (Value::from(n), at(l)));
            }
            Ok(_) => notes.push(format!(
                "{}: uWSGI's `buffer-size` is not needed under corral's own limits (8190-byte request line \
                 and header fields); ignored",
                at(l)
            )),
            Err(_) => errors.push(format!("{}: `buffer-size` must be a number of bytes", at(l))),
        }
    }
    // uWSGI's stats server sends raw JSON; corral's --stats speaks HTTP.
    if let Some(l) = last(&["stats", "stats-server"]) {
        if l.value.starts_with('/') || l.value.starts_with('@') || !l.value.contains(':') {
            errors.push(format!(
                "{}: uWSGI's `stats` on a unix socket: corral's --stats serves HTTP (/stats, /metrics) on a TCP \
                 address such as 127.0.0.1:9191",
                at(l)
            ));
        } else {
            let addr = listener(&l.value).unwrap_or_else(|_| l.value.clone());
            notes.push(format!(
                "{}: uWSGI's `stats` is corral's --stats {addr}, which speaks HTTP (/stats, /metrics), not raw JSON \
                 (uwsgitop does not read it; `corral top` does)",
                at(l)
            ));
            single.insert("stats", (Value::from(addr), at(l)));
        }
    }
    // Left out or turned off, uWSGI's way is to import in the master: corral's
    // is not, and says so either way.
    let lazy = last(&["lazy-apps", "lazy"]);
    if app_line.is_some() && lazy.is_none_or(|l| !truthy(&l.value)) {
        let (at, what) = match lazy {
            Some(l) => (at(l), format!("with `{} = {}`", l.key, l.value)),
            None => (file.to_string(), "without `lazy-apps`".to_string()),
        };
        notes.push(format!(
            "{at}: {what}, uWSGI imports the app once in its master before forking; corral imports it \
             in each worker, as `lazy-apps` does (give --preload for uWSGI's way)"
        ));
    }
    if let Some(l) = last(&["py-autoreload", "python-autoreload"]) {
        let on = l.value.parse::<u64>().map_or(truthy(&l.value), |n| n > 0);
        single.insert("reload", (Value::from(on), at(l)));
    }
    // Another virtualenv cannot be switched to from inside this one.
    if let Some(l) = last(&["home", "virtualenv", "venv", "pyhome", "h"]).filter(|l| !l.value.is_empty()) {
        let same = std::fs::canonicalize(&l.value).ok() == std::fs::canonicalize(python_prefix).ok();
        if same {
            notes.push(format!("{}: uWSGI's `{}` is the virtualenv corral runs in; ignored", at(l), l.key));
        } else {
            errors.push(format!(
                "{}: uWSGI's `{}` names the virtualenv {}, but corral runs with the Python it is installed in \
                 ({python_prefix}): install corral there and run that corral",
                at(l),
                l.key,
                l.value
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let mut entries: Vec<Entry> =
        single.into_iter().map(|(k, (v, at))| (k.to_string(), Item::Value(v), at)).collect();
    for (key, values, at) in list {
        let mut array = Array::new();
        values.into_iter().for_each(|v| array.push(v));
        entries.push((key, Item::Value(Value::Array(array)), at));
    }
    // In the order read, so errors about them come in that order.
    entries.sort_by_key(|(_, _, at)| lines.iter().position(|l| &l.at == at).unwrap_or(0));
    Ok((entries, notes))
}

/// The APP an app option names: a module as it is, or a file (`wsgi-file`,
/// a `mount` target that is a path) by its path, found from `chdir` when
/// relative as uWSGI finds it, and loaded by path as uWSGI loads it.
fn app_of(value: &str, chdir: Option<&str>, file: bool) -> String {
    let path_like = |t: &str| t.ends_with(".py") || t.ends_with(".wsgi") || t.contains('/');
    let (target, callable) = match value.split_once(':') {
        Some((t, c)) if !t.is_empty() && (file || path_like(t)) => (t, Some(c)),
        _ => (value, None),
    };
    if !(file || path_like(target)) {
        return value.to_string();
    }
    let path = match chdir {
        Some(c) if Path::new(target).is_relative() => Path::new(c).join(target),
        _ => PathBuf::from(target),
    };
    match callable {
        Some(c) => format!("{}:{c}", path.display()),
        None => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn magic() -> Magic {
        Magic::of(Path::new("/srv/site/deploy/site.ini"))
    }

    #[test]
    fn expansions() {
        let base = Line {
            key: "base".into(),
            value: "/srv/site".into(),
            at: "site.ini:1".into(),
            seq: 0,
            placeholder: true,
            raw: String::new(),
        };
        let earlier = vec![base];
        std::env::set_var("CORRAL_INI_TEST", "v");
        let vectors: &[(&str, &str)] = &[
            ("%dapp.sock", "/srv/site/deploy/app.sock"),
            ("/run/%n.sock", "/run/site.sock"),
            ("%s %e %c", "site.ini ini deploy"),
            ("%p", "/srv/site/deploy/site.ini"),
            ("100%%", "100%"),
            ("%(base)/static", "/srv/site/static"),
            // An unset variable stays as written, as uWSGI leaves it.
            ("$(CORRAL_INI_TEST)-$(CORRAL_INI_UNSET)", "v-$(CORRAL_INI_UNSET)"),
            ("50%", "50%"),
            ("$HOME", "$HOME"),
        ];
        for (raw, want) in vectors {
            assert_eq!(expand(raw, &magic(), &earlier, None).unwrap(), *want, "{raw}");
        }
        assert!(expand("%(nope)", &magic(), &earlier, None).unwrap_err().contains("%(nope)"));
        assert!(expand("%(_)", &magic(), &earlier, None).unwrap_err().contains("%(_)"));
        assert_eq!(expand("/%(_)static", &magic(), &earlier, Some("app/")).unwrap(), "/app/static");
        assert!(expand("%x", &magic(), &earlier, None).unwrap_err().contains("%x"));
        let secret = std::env::temp_dir().join(format!("corral-ini-at-{}", std::process::id()));
        std::fs::write(&secret, "s3cret\n\n").unwrap();
        let at = format!("KEY=@({})!", secret.display());
        assert_eq!(expand(&at, &magic(), &earlier, None).unwrap(), "KEY=s3cret\n!");
        std::fs::remove_file(&secret).unwrap();
        assert!(expand(&at, &magic(), &earlier, None).unwrap_err().contains("No such file"));
        assert!(expand("@(exec://cat x)", &magic(), &earlier, None).unwrap_err().contains("@(exec://...)"));
        assert_eq!(expand("me@example.org", &magic(), &earlier, None).unwrap(), "me@example.org");
        assert!(expand("$(OPEN", &magic(), &earlier, None).is_err());
    }

    #[test]
    fn listeners() {
        assert_eq!(listener("/run/app.sock").unwrap(), "unix:/run/app.sock");
        assert_eq!(listener(":3031").unwrap(), "0.0.0.0:3031");
        assert_eq!(listener("127.0.0.1:3031").unwrap(), "127.0.0.1:3031");
        assert!(listener("@abstract").is_err());
    }

    #[test]
    fn names() {
        assert!(is_uwsgi_ini("deploy/uwsgi.ini"));
        assert!(is_uwsgi_ini("uwsgi.ini:prod"));
        assert_eq!(split_section("uwsgi.ini:prod"), ("uwsgi.ini", "prod"));
        assert_eq!(split_section("uwsgi.ini"), ("uwsgi.ini", "uwsgi"));
        assert!(!is_uwsgi_ini("corral.toml"));
    }

    /// What uWSGI 2.0's `--show-config` gave for the same file and
    /// environment (SETV=hello, EMPTYV set and empty, UNSETV unset).
    #[test]
    fn configuration_logic() {
        let dir = std::env::temp_dir().join(format!("corral-logic-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("adir")).unwrap();
        std::fs::write(dir.join("afile"), "").unwrap();
        let (adir, afile) = (dir.join("adir").display().to_string(), dir.join("afile").display().to_string());
        std::env::set_var("CORRAL_LOGIC_SETV", "hello");
        std::env::set_var("CORRAL_LOGIC_EMPTYV", "");
        std::env::remove_var("CORRAL_LOGIC_UNSETV");
        let ini = dir.join("t.ini");
        std::fs::write(
            &ini,
            format!(
                "[uwsgi]\na1 = base\n\
                 if-env = CORRAL_LOGIC_SETV\ne1 = set:%(_)\nendif =\n\
                 if-env = CORRAL_LOGIC_EMPTYV\ne2 = empty:%(_)\nendif =\n\
                 if-env = CORRAL_LOGIC_UNSETV\ne3 = unset:%(_)\nendif =\n\
                 if-env = CORRAL_LOGIC_SETV=hello\ne4 = eq:%(_)\nendif =\n\
                 if-env = CORRAL_LOGIC_SETV=nope\ne5 = neq:%(_)\nendif =\n\
                 if-not-env = CORRAL_LOGIC_UNSETV\ne6 = notenv:%(_)\nendif =\n\
                 if-not-env = CORRAL_LOGIC_SETV\ne7 = notenv-set\nendif =\n\
                 if-exists = {adir}\nx1 = exists\nendif =\n\
                 if-file = {afile}\nx2 = file:%(_)\nendif =\n\
                 if-file = {adir}\nx3 = file-on-dir\nendif =\n\
                 if-dir = {adir}\nx4 = dir\nendif =\n\
                 if-not-exists = {adir}/nothere\nx5 = notexists\nendif =\n\
                 if-opt = a1\no1 = opt:%(_)\nendif =\n\
                 if-opt = a1=base\no2 = opteq:%(_)\nendif =\n\
                 if-not-opt = zz\no3 = notopt:%(_)\nendif =\n\
                 for = p q\nf1 = for:%(_)\nf2 = for2:%(_)\nendfor =\n\
                 after = done\n"
            ),
        )
        .unwrap();
        let (_, lines) = read(ini.to_str().unwrap()).unwrap();
        let got: Vec<String> = lines.iter().map(|l| format!("{} = {}", l.key, l.value)).collect();
        let file_line = format!("x2 = file:{afile}");
        assert_eq!(
            got,
            [
                "a1 = base",
                "e1 = set:hello",
                "e2 = empty:",
                "e4 = eq:hello",
                "e6 = notenv:%(_)",
                "x1 = exists",
                file_line.as_str(),
                "x4 = dir",
                "x5 = notexists",
                "o1 = opt:base",
                "o2 = opteq:base",
                "o3 = notopt:%(_)",
                "f1 = for:p",
                "f1 = for:q",
                "f2 = for2:p",
                "f2 = for2:q",
                "after = done",
            ]
        );
        assert_eq!(lines[1].at, format!("{}:4", ini.display()));

        // Nesting, a block left open, an end with no block, a test corral
        // does not read: each refused with its line.
        for (body, said) in [
            ("if-env = A\nfor = 1 2\nendfor =\nendif =\n", ":3: `for` inside the `if-env` block opened at"),
            ("if-env = A\nx = 1\n", ":2: `if-env` has no `endif` below it"),
            ("for = 1\nx = 1\n[other]\ny = 2\n", ":2: `for` has no `endfor` below it"),
            ("x = 1\nendif =\n", ":3: `endif` with no block open above it"),
            ("for = 1\nendif =\n", ":3: `endif` ends the `for` block opened at"),
            ("if-hostname = h\nendif =\n", ":2: uWSGI's `if-hostname` is not a test corral reads"),
            ("for-glob = *.ini\nendfor =\n", ":2: uWSGI's `for-glob` is not one corral reads"),
        ] {
            std::fs::write(&ini, format!("[uwsgi]\n{body}")).unwrap();
            let err = read(ini.to_str().unwrap()).err().unwrap_or_default();
            assert!(err.contains(said), "{body:?}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn includes_are_read_where_they_stand() {
        let dir = std::env::temp_dir().join(format!("corral-ini-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let main = dir.join("site.ini");
        let base = dir.join("base.ini");
        std::fs::write(
            &main,
            format!(
                "[uwsgi]\nsocket = :3031\nini = {}\nini = :extra\nprocesses = %(threads)\n\n\
                 [extra]\nsocket = :3033\n",
                base.display()
            ),
        )
        .unwrap();
        std::fs::write(&base, "[uwsgi]\nthreads = 4\nchdir = %d\n").unwrap();
        let (_, lines) = read(main.to_str().unwrap()).unwrap();
        let got: Vec<(&str, &str)> = lines.iter().map(|l| (l.key.as_str(), l.value.as_str())).collect();
        let base_dir = format!("{}/", dir.display());
        assert_eq!(
            got,
            [
                ("socket", ":3031"),
                ("threads", "4"),
                ("chdir", base_dir.as_str()),
                ("socket", ":3033"),
                ("processes", "4")
            ]
        );
        assert_eq!(lines[1].at, format!("{}:2", base.display()));
        assert_eq!(lines[3].at, format!("{}:8", main.display()));

        // A loop, a missing file and a missing section are named with where
        // they were included.
        std::fs::write(&base, format!("[uwsgi]\nini = {}\n", main.display())).unwrap();
        let err = read(main.to_str().unwrap()).err().unwrap();
        assert!(err.contains("an include loop"), "{err}");
        std::fs::write(&main, "[uwsgi]\nini = nowhere.ini\n").unwrap();
        let err = read(main.to_str().unwrap()).err().unwrap();
        assert!(
            err.starts_with(&format!("{}:2: `ini = nowhere.ini`: nowhere.ini:", main.display())),
            "{err}"
        );
        std::fs::write(&main, "[uwsgi]\nini = :prod\n").unwrap();
        let err = read(main.to_str().unwrap()).err().unwrap();
        assert!(err.contains("no [prod] section") && err.contains("(included at"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
