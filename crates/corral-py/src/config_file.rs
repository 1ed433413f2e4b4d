//! `--config FILE`: options from a TOML file, under the command line and the
//! environment.
//!
//! Every command-line option is a key of the same name (`workers = 4`,
//! `max-requests = 1000`, `http = ["127.0.0.1:8000", "unix:/run/app.sock"]`,
//! `preload = true`, and `app = "myproject.wsgi"` for the positional APP).
//! Precedence: command line > `CORRAL_*` environment variables > file >
//! defaults. The file's values are turned into command-line arguments for
//! the options that neither the command line nor the environment set, so
//! they go through exactly the same parsing and checks; an error in one of
//! them names the key and the file line.

use std::collections::HashMap;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use toml_edit::{ImDocument, Item, Value};

use crate::server_hooks::ServerHooks;

/// Where each option set from the file came from: option id -> "FILE:LINE".
pub type FileOrigins = HashMap<String, String>;

/// How [`platform_defaults`] names where a value came from.
const PLATFORM_ORIGIN: &str = "environment ";

/// gunicorn's platform variables, below every other layer (the command
/// line, CORRAL_* variables, the config file): WEB_CONCURRENCY is the number
/// of workers and PORT the port of the default HTTP listener, on every
/// interface (0.0.0.0:PORT), as gunicorn takes them. Hosting platforms set
/// them for the app's server; ignored, the app would listen on loopback.
pub fn platform_defaults(cmd: &Command, argv: &mut Vec<String>, origins: &mut FileOrigins) {
    let set = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let (workers, port) = (set("WEB_CONCURRENCY"), set("PORT"));
    // gunicorn's default for --forwarded-allow-ips; empty, it trusts no peer.
    let forwarded = std::env::var("FORWARDED_ALLOW_IPS").ok();
    if workers.is_none() && port.is_none() && forwarded.is_none() {
        return;
    }
    let Ok(first) = cmd.clone().ignore_errors(true).try_get_matches_from(argv.as_slice()) else {
        return;
    };
    let unset = |id: &str| {
        !matches!(first.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
    };
    if let Some(n) = workers {
        if ["workers", "workers_min", "workers_max"].into_iter().all(unset) {
            argv.insert(1, format!("--workers={n}"));
            origins.insert("workers".into(), format!("{PLATFORM_ORIGIN}WEB_CONCURRENCY"));
        }
    }
    if let Some(port) = port {
        // Sockets handed over by systemd take the default's place too.
        if ["http", "uwsgi", "fastcgi", "scgi"].into_iter().all(unset)
            && std::env::var_os("LISTEN_FDS").is_none()
        {
            argv.insert(1, format!("--http=0.0.0.0:{port}"));
            origins.insert("http".into(), format!("{PLATFORM_ORIGIN}PORT"));
        }
    }
    if let Some(list) = forwarded.filter(|_| unset("forwarded_allow_ips")) {
        argv.insert(1, format!("--forwarded-allow-ips={list}"));
        origins.insert("forwarded_allow_ips".into(), format!("{PLATFORM_ORIGIN}FORWARDED_ALLOW_IPS"));
    }
}

/// How --print-config names options given in GUNICORN_CMD_ARGS.
pub const GUNICORN_CMD_ARGS_ORIGIN: &str = "environment GUNICORN_CMD_ARGS";

/// gunicorn's GUNICORN_CMD_ARGS (split as a shell would, as gunicorn's
/// `shlex.split`), put before the command line's own options: under them,
/// over a config file and CORRAL_* variables, as gunicorn ranks it above
/// its config file. An option the command line gives too is left out of
/// it, with its value. Returns the new argv and the ids it set.
pub fn gunicorn_cmd_args(
    py: pyo3::Python<'_>,
    cmd: &Command,
    argv: &[String],
) -> Result<(Vec<String>, Vec<String>), String> {
    use pyo3::types::PyAnyMethods as _;
    let Some(text) = std::env::var("GUNICORN_CMD_ARGS").ok().filter(|t| !t.trim().is_empty()) else {
        return Ok((argv.to_vec(), Vec::new()));
    };
    let mut tokens: Vec<String> = py
        .import("shlex")
        .and_then(|m| m.call_method1("split", (text.as_str(),))?.extract())
        .map_err(|e| format!("GUNICORN_CMD_ARGS: {e}"))?;
    // `--proxy-protocol off` as `--proxy-protocol=off`, as on the command
    // line: the switch alone would mean on, and `off` be taken for the APP.
    crate::gunicorn_conf::join_proxy_protocol_mode(&mut tokens, 0);
    let on_command_line = cmd.clone().ignore_errors(true).try_get_matches_from(argv).ok();
    let given = |id: &str| {
        on_command_line.as_ref().is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
    };
    let mut kept = Vec::new();
    let mut ids = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        let (arg, inline) = if let Some(long) = t.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            let found = cmd.get_arguments().find(|a| {
                a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name))
            });
            (found, value.is_some())
        } else if t.len() >= 2 && t.starts_with('-') {
            let c = t.chars().nth(1).unwrap_or_default();
            let found = cmd.get_arguments().find(|a| a.get_short() == Some(c));
            (found, t.len() > 2)
        } else {
            // The APP, unless the command line names one.
            if !given("app") {
                kept.push(t.clone());
                ids.push("app".to_string());
            }
            i += 1;
            continue;
        };
        // A flag that is not corral's takes the word after it, if that is not a flag.
        let takes_value = match arg {
            Some(a) => !is_switch(a) && a.get_action().takes_values(),
            None => tokens.get(i + 1).is_some_and(|next| !next.starts_with('-')),
        };
        let end = if takes_value && !inline { (i + 2).min(tokens.len()) } else { i + 1 };
        match arg {
            Some(a) if given(a.get_id().as_str()) || other_pool_kind(a.get_id().as_str(), &given) => {}
            Some(a) => {
                kept.extend(tokens[i..end].iter().cloned());
                ids.push(a.get_id().to_string());
            }
            // Not corral's: the parser says what it is (a gunicorn flag gets its hint).
            None => kept.extend(tokens[i..end].iter().cloned()),
        }
        i = end;
    }
    let mut out = vec![argv[0].clone()];
    out.extend(kept);
    out.extend(argv[1..].iter().cloned());
    Ok((out, ids))
}

/// What `--config` adds to the command line.
pub struct Layered {
    /// The argument list with the file's options added.
    pub argv: Vec<String>,
    /// Where each of those was set.
    pub origins: FileOrigins,
    /// Notes to show about settings of a gunicorn file that were ignored.
    pub notes: Vec<String>,
    /// A gunicorn file's server hooks.
    pub hooks: ServerHooks,
}

/// The argument list with the file's options added, and their origins; and
/// notes to show about settings of a gunicorn file that were ignored.
pub fn layer(py: pyo3::Python<'_>, cmd: &Command, argv: &[String]) -> Result<Layered, String> {
    let mut argv = argv.to_vec();
    // A lenient first pass: the APP may be in the file, and errors in the
    // command line itself are reported by the real parse afterwards.
    let mut first = match cmd.clone().ignore_errors(true).try_get_matches_from(&argv) {
        Ok(m) => m,
        // --help, --version and the like: the real parse shows them.
        Err(_) => {
            return Ok(Layered {
                argv: argv.to_vec(),
                origins: HashMap::new(),
                notes: Vec::new(),
                hooks: ServerHooks::default(),
            })
        }
    };
    let path = match first.get_one::<String>("config") {
        Some(p) => p.clone(),
        None => {
            // gunicorn reads this file unasked; corral does not, and says so
            // to whoever moves over with one in place.
            let notes = if std::path::Path::new("gunicorn.conf.py").is_file() {
                vec!["./gunicorn.conf.py is not read unless given with -c gunicorn.conf.py".to_string()]
            } else {
                Vec::new()
            };
            return Ok(Layered {
                argv: argv.to_vec(),
                origins: HashMap::new(),
                notes,
                hooks: ServerHooks::default(),
            });
        }
    };
    // (key, value, where it was set), in the file's order.
    let mut entries: Vec<(String, Item, String)> = Vec::new();
    let mut notes = Vec::new();
    let mut hooks = ServerHooks::default();
    let gunicorn = crate::gunicorn_conf::is_gunicorn_config(&path);
    if gunicorn {
        let given = |id: &str| -> Option<String> {
            if !matches!(first.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
                return None;
            }
            let mut raw = first.try_get_raw(id).ok().flatten()?;
            raw.next_back().map(|v| v.to_string_lossy().into_owned())
        };
        let translated = crate::gunicorn_conf::translate(py, &path, &given)?;
        notes = translated.notes;
        hooks = translated.hooks;
        entries
            .extend(translated.settings.into_iter().map(|s| (s.key.to_string(), Item::Value(s.value), s.at)));
        if translated.binds_speak_uwsgi {
            crate::gunicorn_conf::binds_as_uwsgi(&mut argv);
            first = cmd.clone().ignore_errors(true).try_get_matches_from(&argv).map_err(|e| e.to_string())?;
        }
    } else if crate::uwsgi_ini::is_uwsgi_ini(&path) {
        use pyo3::types::PyAnyMethods as _;
        let prefix: String =
            py.import("sys").and_then(|s| s.getattr("prefix")?.extract()).unwrap_or_default();
        (entries, notes) = crate::uwsgi_ini::translate(&path, &prefix)?;
    } else {
        entries = toml_entries(&path)?;
    }
    let mut injected: Vec<String> = Vec::new();
    let mut app: Option<String> = None;
    let mut origins = HashMap::new();
    // Every unknown key at once: a file converted from another server's
    // has several, and one run per key is slow going.
    let mut args = Vec::with_capacity(entries.len());
    let mut unknown = Vec::new();
    for (key, _, at) in &entries {
        match cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) || (a.get_long().is_none() && a.get_id() == key))
        {
            Some(arg) => args.push(arg),
            None => unknown.push(unknown_key(cmd, key, at)),
        }
    }
    if !unknown.is_empty() {
        return Err(unknown.join("\n"));
    }
    for ((key, item, at), arg) in entries.iter().zip(args) {
        let key = key.as_str();
        if key == "config" {
            return Err(format!("{at}: `config` cannot be set from a config file"));
        }
        if matches!(key, "print-config" | "check-config") {
            return Err(format!("{at}: `{key}` is an action for the command line (--{key}), not a setting"));
        }
        let id = arg.get_id().to_string();
        let outside = |id: &str| {
            matches!(first.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
        };
        if outside(&id) || overruled(cmd, arg, &outside) {
            continue;
        }
        let value = match item {
            Item::Value(v) => v,
            _ => return Err(format!("{at}: `{key}` must be a value, not a table")),
        };
        if arg.get_long().is_none() {
            let Value::String(s) = value else {
                return Err(format!("{at}: `{key}` must be a string"));
            };
            app = Some(s.value().clone());
            origins.insert(id, at.clone());
            continue;
        }
        if is_switch(arg) {
            let flag = match value {
                Value::Boolean(b) => Some(b.value().to_string()),
                // gunicorn's modes (off, v1, v2, auto), which its parser takes.
                Value::String(mode) if key == "proxy-protocol" => Some(mode.value().clone()),
                // As gunicorn reads a boolean given as a string (a config
                // that takes it from the environment: os.environ.get(...)).
                Value::String(text) if gunicorn => bool_word(text.value()).map(|b| b.to_string()),
                _ => None,
            };
            let Some(flag) = flag else {
                let strings = if gunicorn {
                    " (as gunicorn takes it, also the strings \"true\" and \"false\")"
                } else {
                    ""
                };
                return Err(format!("{at}: `{key}` must be true or false{strings}"));
            };
            injected.push(format!("--{key}={flag}"));
            origins.insert(id, at.clone());
            continue;
        }
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let values: Vec<&Value> = match value {
            Value::Array(a) if repeatable => a.iter().collect(),
            Value::Array(_) => return Err(format!("{at}: `{key}` takes one value, not a list")),
            v => vec![v],
        };
        for v in values {
            if OCTAL_KEYS.contains(&key) && matches!(v, Value::Integer(_)) {
                // TOML reads 0o660 and 660 alike as plain integers: which one
                // was meant cannot be told, and a wrong mode would go unnoticed.
                let example = if key == "umask" { "027" } else { "660" };
                return Err(format!(
                    "{at}: `{key}` is an octal mode: write it as a string, e.g. {key} = \"{example}\""
                ));
            }
            let s = scalar(v).ok_or_else(|| format!("{at}: `{key}` must be a string or a number"))?;
            // Check each value alone, so a bad one is reported at its line.
            let mut probe = vec![argv[0].clone(), format!("--{key}={s}"), "app:probe".to_string()];
            if key == "group" {
                probe.splice(1..1, ["--user=root".to_string()]);
            }
            if let Err(e) = cmd.clone().try_get_matches_from(&probe) {
                if e.kind() != clap::error::ErrorKind::MissingRequiredArgument {
                    // clap's message, without its pointer to --help (the
                    // possible values, when it lists them, are kept).
                    let msg = e.to_string();
                    let lines: Vec<&str> = msg
                        .lines()
                        .map(str::trim)
                        .take_while(|l| !l.starts_with("For more information") && !l.starts_with("Usage:"))
                        .filter(|l| !l.is_empty())
                        .collect();
                    return Err(format!("{at}: `{key}`: {}", lines.join(" ").trim_start_matches("error: ")));
                }
            }
            injected.push(format!("--{key}={s}"));
        }
        origins.insert(id, at.clone());
    }
    let mut out = vec![argv[0].clone()];
    out.extend(injected);
    out.extend(argv[1..].iter().cloned());
    if let Some(app) = app {
        out.push(app);
    }
    Ok(Layered { argv: out, origins, notes, hooks })
}

/// A file's setting that the command line or the environment (`outside`)
/// replaces with another option: one it cannot be given with (`--workers-min`
/// over the file's `workers`, `--workers` over its `workers-min`), so that
/// they win over the file as they do for the same option; and `--workers`
/// over the file's `workers-max`, since a fixed pool asked for there leaves
/// the file's adaptive one behind whole.
fn overruled(cmd: &Command, arg: &clap::Arg, outside: &dyn Fn(&str) -> bool) -> bool {
    let id = arg.get_id().as_str();
    cmd.get_arg_conflicts_with(arg).iter().any(|other| outside(other.get_id().as_str()))
        || cmd.get_arguments().any(|other| {
            outside(other.get_id().as_str())
                && cmd.get_arg_conflicts_with(other).iter().any(|c| c.get_id().as_str() == id)
        })
        || other_pool_kind(id, outside)
}

/// Whether `id` sets up the other kind of pool than one a higher layer (the
/// command line over the environment, either over a config file) asks for
/// with `given`: a fixed pool (`--workers`) leaves a lower layer's adaptive
/// one behind whole, `--scale-down-idle` with it, and an adaptive one its
/// `--workers`; mixed, the two would be refused together.
pub fn other_pool_kind(id: &str, given: &dyn Fn(&str) -> bool) -> bool {
    match id {
        "workers" => given("workers_min") || given("workers_max"),
        "workers_min" | "workers_max" | "scale_down_idle" => given("workers"),
        _ => false,
    }
}

/// The parser without the environment variables of the other kind of pool
/// than the command line asks for (see [`other_pool_kind`]): the command
/// line wins over the environment there too.
pub fn without_env_of_other_pool_kind(cmd: Command, argv: &[String]) -> Command {
    let on_command_line = cmd.clone().ignore_errors(true).try_get_matches_from(argv).ok();
    let given = |id: &str| {
        on_command_line.as_ref().is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
    };
    let mut cmd = cmd;
    for id in ["workers", "workers_min", "workers_max", "scale_down_idle"] {
        if other_pool_kind(id, &given) {
            cmd = cmd.mut_arg(id, |a| a.env(None));
        }
    }
    cmd
}

/// A TOML config file's keys and values, with the line each is on.
fn toml_entries(path: &str) -> Result<Vec<(String, Item, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {path}: {e}"))?;
    let doc = ImDocument::parse(text.as_str()).map_err(|e| {
        let line = e.span().map_or(0, |s| line_of(&text, s.start));
        let ini = if crate::uwsgi_names::looks_like_uwsgi_ini(&text) {
            " (this looks like a uWSGI ini file: corral reads one as such when its name ends in .ini)"
        } else if text.lines().any(|l| l.starts_with("import ") || l.starts_with("def ")) {
            " (this looks like Python: a gunicorn configuration file is read as one when its name ends in .py)"
        } else {
            ""
        };
        format!("{path}:{line}: invalid TOML: {}{ini}", e.message().trim_end())
    })?;
    Ok(doc
        .as_table()
        .iter()
        .map(|(key, item)| {
            let line = item
                .span()
                .or_else(|| doc.as_table().key(key).and_then(|k| k.span()))
                .map_or(0, |s| line_of(&text, s.start));
            (key.to_string(), item.clone(), format!("{path}:{line}"))
        })
        .collect())
}

/// An on/off option: `--preload`, or `--preload=false` to undo a setting.
fn is_switch(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
        || arg.get_num_args().is_some_and(|n| n.min_values() == 0 && n.max_values() == 1)
}

/// Options whose value is an octal file mode.
const OCTAL_KEYS: [&str; 2] = ["socket-mode", "umask"];

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.value().clone()),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::Float(f) => Some(f.value().to_string()),
        _ => None,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// An error message with where the options it names were set, when that was
/// not the command line: "--static ...: no such directory (set in app.toml:4)".
/// Left as it is when it says so already.
pub fn whence(msg: &str, cmd: &Command, matches: &ArgMatches, origins: &FileOrigins) -> String {
    if msg.contains("(set in ") {
        return msg.to_string();
    }
    let mut at: Vec<String> = Vec::new();
    for (i, _) in msg.match_indices("--") {
        let name: String = msg[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        let Some(arg) = cmd.get_arguments().find(|a| {
            a.get_long() == Some(name.as_str())
                || a.get_all_aliases().is_some_and(|all| all.contains(&name.as_str()))
        }) else {
            continue;
        };
        let id = arg.get_id().as_str();
        let origin = match origins.get(id) {
            Some(o) => o.clone(),
            None if matches.value_source(id) == Some(ValueSource::EnvVariable) => match arg.get_env() {
                Some(var) => format!("the environment variable {}", var.to_string_lossy()),
                None => continue,
            },
            None => continue,
        };
        if !at.contains(&origin) {
            at.push(origin);
        }
    }
    if at.is_empty() {
        msg.to_string()
    } else {
        format!("{msg} (set in {})", at.join(", "))
    }
}

/// `--print-config`: every option's effective value and where it came from.
pub fn describe(cmd: &Command, matches: &ArgMatches, origins: &FileOrigins) -> String {
    let mut out = String::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version" | "print_config" | "check_config") {
            continue;
        }
        let name = arg.get_long().unwrap_or(id);
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let no_listener = id == "http"
            && values.is_empty()
            && ["uwsgi", "fastcgi", "scgi"].iter().all(|l| matches.get_raw(l).is_none());
        if no_listener {
            // The same choice the server makes when it starts.
            let implied = if std::env::var_os("LISTEN_FDS").is_some() {
                "the descriptors from socket activation (LISTEN_FDS)".to_string()
            } else {
                format!("[{:?}]", crate::cli::DEFAULT_HTTP)
            };
            out.push_str(&format!("{name} = {implied}  # default, as no listener is given\n"));
            continue;
        }
        if id == "access_log_format"
            && matches.value_source(id) == Some(ValueSource::DefaultValue)
            && matches.get_one::<crate::cli::LogFormat>("log_format") == Some(&crate::cli::LogFormat::Json)
        {
            out.push_str(&format!("{name} = \"json\"  # default, as --log-format is json\n"));
            continue;
        }
        if id == "mount" && values.is_empty() {
            if let Ok(script_name) = std::env::var("SCRIPT_NAME") {
                out.push_str(&format!("{name} = {script_name:?}  # environment SCRIPT_NAME\n"));
                continue;
            }
        }
        let shown = match (arg.get_action(), values.as_slice()) {
            (_, [_]) if is_switch(arg) => matches.get_one::<bool>(id).is_some_and(|b| *b).to_string(),
            (_, []) => "(not set)".to_string(),
            (_, [v]) => format!("{v:?}"),
            (_, vs) => format!("{vs:?}"),
        };
        let source = match (origins.get(id), matches.value_source(id)) {
            (_, Some(ValueSource::CommandLine)) if !origins.contains_key(id) => "command line".to_string(),
            (Some(at), _) if at.starts_with(PLATFORM_ORIGIN) => at.clone(),
            (Some(at), _) => format!("config file {at}"),
            (None, Some(ValueSource::EnvVariable)) => {
                format!(
                    "environment {}",
                    arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default()
                )
            }
            (None, Some(ValueSource::DefaultValue)) => "default".to_string(),
            _ => "default".to_string(),
        };
        out.push_str(&format!("{name} = {shown}  # {source}\n"));
    }
    out
}

/// Variables of the environment named like an option's (`CORRAL_*`) that
/// no option reads: a typo (`CORRAL_WOKRERS=4`) would otherwise be
/// ignored without a word. `given` are the names `--env` sets (a re-exec
/// inherits them), which the app may read.
pub fn unknown_env_notes(cmd: &Command, given: &[String]) -> Vec<String> {
    // Set by corral for itself, across a re-exec or for --print-config.
    const INTERNAL: &[&str] = &[
        "CORRAL_CHECK_BINDS",
        "CORRAL_INHERITED_LISTENERS",
        "CORRAL_INHERITED_WORKERS",
        "CORRAL_PREVIOUS_PIDFILE",
        "CORRAL_PROCESS_NAME",
        "CORRAL_POOL",
        "CORRAL_READY_FD",
    ];
    let known: Vec<String> =
        cmd.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
    let mut notes = Vec::new();
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if !name.starts_with("CORRAL_")
            || known.iter().any(|k| *k == name)
            || INTERNAL.contains(&name.as_ref())
            || given.iter().any(|g| *g == name)
        {
            continue;
        }
        let nearest = known
            .iter()
            .map(|k| (strsim::levenshtein(k, &name), k))
            .min()
            .filter(|(d, _)| *d <= 2)
            .map(|(_, k)| format!(" (did you mean {k}?)"))
            .unwrap_or_default();
        notes.push(format!("the environment variable {name} is not one corral reads{nearest}"));
    }
    notes.sort();
    notes
}

/// The error for a key no option has, with what corral takes instead when
/// the key is a near miss, a uWSGI option or a gunicorn setting.
fn unknown_key(cmd: &clap::Command, key: &str, at: &str) -> String {
    let close = cmd.get_arguments().filter_map(|a| a.get_long()).find(|l| *l == key.replace('_', "-"));
    let gunicorn = crate::gunicorn_conf::hint(key);
    match (crate::uwsgi_names::equivalent(key), close, gunicorn) {
        (_, Some(long), _) => format!("{at}: unknown key `{key}` (did you mean `{long}`?)"),
        (Some(eq), None, _) => {
            format!("{at}: unknown key `{key}` (for uWSGI's `{key}`, corral takes {eq})")
        }
        (None, None, Some(g)) => {
            // An option's key is its long name.
            let takes = match g.strip_prefix("--").filter(|k| !k.contains(' ')) {
                Some(k) => format!("the key `{k}`"),
                None => g,
            };
            format!(
                "{at}: unknown key `{key}` (for gunicorn's `{key}`, corral takes {takes}; or give \
                 the gunicorn file itself: a --config name ending in .py is read as one)"
            )
        }
        (None, None, None) => {
            format!("{at}: unknown key `{key}` (keys are the long option names, such as `workers`)")
        }
    }
}

/// A boolean written as a string, as gunicorn's settings take it (its
/// `validate_bool`): true or false, in any case, spaces around ignored.
fn bool_word(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    #[test]
    fn whence_names_the_file_line_of_each_option_an_error_names() {
        let cmd = Command::new("t")
            .arg(Arg::new("static").long("static"))
            .arg(Arg::new("user").long("user").short('u'))
            .arg(Arg::new("workers").long("workers").visible_alias("processes"));
        let m = cmd.clone().get_matches_from(["t", "--static", "x", "--user", "u", "--workers", "2"]);
        let origins: super::FileOrigins = [
            ("static".to_string(), "app.toml:4".to_string()),
            ("workers".to_string(), "app.toml:1".to_string()),
        ]
        .into();
        let w = |msg: &str| super::whence(msg, &cmd, &m, &origins);
        assert_eq!(
            w("--static \"x\": no such directory"),
            "--static \"x\": no such directory (set in app.toml:4)"
        );
        // From the command line: nothing to add.
        assert_eq!(w("--user \"u\": no such user"), "--user \"u\": no such user");
        assert_eq!(
            w("--processes 2 and --static x"),
            "--processes 2 and --static x (set in app.toml:1, app.toml:4)"
        );
        assert_eq!(w("--static x (set in elsewhere)"), "--static x (set in elsewhere)");
        assert_eq!(w("no option named -- here"), "no option named -- here");
    }

    #[test]
    fn lines() {
        assert_eq!(super::line_of("a\nb\nc", 0), 1);
        assert_eq!(super::line_of("a\nb\nc", 2), 2);
        assert_eq!(super::line_of("a\nb\nc", 4), 3);
    }
}
