//! Finding the WSGI callable from `MODULE:NAME`, with errors that say exactly
//! what went wrong (and the import's traceback).

use std::os::fd::{AsRawFd, FromRawFd};

use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

/// A parsed APP argument.
#[derive(Debug, Clone)]
pub struct AppSpec {
    pub module: String,
    pub attr: String,
    /// `NAME(ARGS)`: call it with ARGS (Python literals, as gunicorn takes
    /// them; empty for `NAME()`) to get the app.
    pub factory: Option<String>,
    /// `PATH:CALLABLE`: the module is this file, loaded by its path as
    /// uWSGI's `wsgi-file` loads it (its directory is not put on sys.path,
    /// where a `celery.py` beside it would hide the real package).
    pub file: Option<String>,
}

impl AppSpec {
    pub fn parse(s: &str) -> Result<AppSpec, String> {
        let (module, attr) = s.split_once(':').unwrap_or((s, "application"));
        let (attr, factory) = match attr.split_once('(') {
            Some((a, args)) => match args.strip_suffix(')') {
                Some(args) => (a, Some(args.trim().to_string())),
                None => return Err(format!("APP {s:?}: a factory call must end with `)`")),
            },
            None => (attr, None),
        };
        let valid = |p: &str| {
            !p.is_empty()
                && p.split('.').all(|x| !x.is_empty() && x.chars().all(|c| c.is_alphanumeric() || c == '_'))
        };
        // A file name where the module goes: what was meant instead.
        let hint = |m: &str| match m.rsplit_once('.').map(|(_, ext)| ext) {
            Some("pid") => Some(format!(
                "a pid file: to reload a running server, `corral signal HUP {m}` (uWSGI's --reload PIDFILE); \
                 corral's --reload is a switch that watches the code, for development"
            )),
            Some("py") => Some(format!(
                "a file name: give its module, `{}`",
                m.trim_start_matches("./").trim_end_matches(".py").replace('/', ".")
            )),
            Some("ini" | "toml" | "conf") => Some(format!("a configuration file: give it with --config {m}")),
            _ => None,
        };
        // A Python file that is there, given by its path (`app.py`,
        // `/srv/site/wsgi.py`, mod_wsgi's `django.wsgi`): loaded as a file.
        let source = module.ends_with(".py") || module.ends_with(".wsgi");
        if source && std::path::Path::new(module).is_file() {
            let (attr, factory) = (attr.to_string(), factory);
            if !valid(&attr) {
                return Err(format!("APP {s:?}: expected PATH:CALLABLE"));
            }
            let stem = std::path::Path::new(module).file_stem().map(|f| f.to_string_lossy().into_owned());
            let name: String =
                stem.unwrap_or_default().chars().map(|c| if c.is_alphanumeric() { c } else { '_' }).collect();
            return Ok(AppSpec {
                module: format!("wsgi_file_{name}"),
                attr,
                factory,
                file: Some(module.to_string()),
            });
        }
        // Only for a file that is there (or a path, which no module is):
        // `conf.py` may as well be a module `py` in a package `conf`.
        let a_file = s.contains('/') || std::path::Path::new(s).is_file();
        if let Some(h) = (!s.contains(':') && a_file).then(|| hint(module)).flatten() {
            return Err(format!("APP {s:?} looks like {h}"));
        }
        if !valid(module) || !valid(attr) {
            return Err(format!(
                "APP {s:?}: expected MODULE:CALLABLE, MODULE, MODULE:FACTORY() or MODULE:FACTORY(ARGS)"
            ));
        }
        Ok(AppSpec { module: module.to_string(), attr: attr.to_string(), factory, file: None })
    }
}

impl std::fmt::Display for AppSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let module = self.file.as_deref().unwrap_or(&self.module);
        match &self.factory {
            Some(args) => write!(f, "{module}:{}({args})", self.attr),
            None => write!(f, "{module}:{}", self.attr),
        }
    }
}

/// When an import fails: the sys.path directories this process may not
/// read, said with the user it runs as. A worker under --user that cannot
/// read the virtualenv or Python itself (installed in a home directory it
/// may not enter, say) fails with "No module named 'datetime'", which
/// names neither.
fn unreadable_path_note(py: Python<'_>) -> Option<String> {
    let path: Vec<String> = py.import("sys").ok()?.getattr("path").ok()?.extract().ok()?;
    let found: Vec<String> = path
        .into_iter()
        .filter(|d| !d.is_empty())
        .filter(|d| match std::fs::metadata(d) {
            Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
            Ok(m) => {
                let c = std::ffi::CString::new(d.as_str()).unwrap_or_default();
                m.is_dir() && unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::X_OK) } != 0
            }
        })
        .collect();
    if found.is_empty() {
        return None;
    }
    let uid = unsafe { libc::geteuid() };
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    Some(format!(
        "This process runs as user {user}, who may not read these directories on the module search \
         path: {}. Under --user, that user must be able to read the app, its virtualenv and Python itself",
        found.join(", ")
    ))
}

/// Imports the module and returns the callable, or a message for the log.
pub fn load_app(py: Python<'_>, spec: &AppSpec) -> Result<PyObject, String> {
    let imported = match &spec.file {
        Some(path) => load_file(py, &spec.module, path),
        None => py.import(spec.module.as_str()),
    };
    reopen_stdio_the_import_closed();
    let module = imported.map_err(|e| {
        let what =
            spec.file.as_ref().map_or_else(|| format!("module {:?}", spec.module), |f| format!("file {f:?}"));
        let mut msg = format!("Failed to import {what}:\n{}", format_exception(py, &e));
        if let Some(note) = unreadable_path_note(py) {
            msg.push('\n');
            msg.push_str(&note);
        }
        msg
    })?;
    let mut obj = module.clone().into_any();
    for part in spec.attr.split('.') {
        obj = obj.getattr(part).map_err(|e| {
            if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) {
                format!("Module {:?} has no attribute {:?} (APP is {spec})", spec.module, spec.attr)
            } else {
                // A module's __getattr__ or a property that builds the app.
                format!(
                    "Looking up {:?} in module {:?} raised:\n{}",
                    spec.attr,
                    spec.module,
                    format_exception(py, &e)
                )
            }
        })?;
    }
    if let Some(args) = &spec.factory {
        let (args, kwargs) = factory_args(py, args).map_err(|e| format!("APP {spec}: {e}"))?;
        obj = obj
            .call(args, Some(&kwargs))
            .map_err(|e| format!("Application factory {spec} raised:\n{}", format_exception(py, &e)))?;
    }
    if !obj.is_callable() {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        return Err(format!("{spec} is not callable (it is a {ty} object); a WSGI app is a callable"));
    }
    Ok(obj.unbind())
}

/// How an import of the app tried in a child process ended (see
/// [`import_in_child`]).
pub enum Tried {
    /// It loaded there, or raised a Python exception (which the import in
    /// this process then shows): this process may import it.
    Survived,
    /// The child died in it, as this process would have (a crash in a C
    /// extension, `os._exit()`, an abort): how it ended.
    Died(String),
    /// A stop signal came meanwhile (the child was killed).
    Stopped,
}

/// The child of [`import_in_child`] while it runs, for [`stop_import_child`].
static IMPORT_CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Kills the child of [`import_in_child`], if one runs; whether one did.
/// Async-signal-safe.
pub fn stop_import_child() -> bool {
    let pid = IMPORT_CHILD.load(std::sync::atomic::Ordering::Relaxed);
    // Never 0 or -1 to kill(2), which would name a whole group.
    pid > 0 && unsafe { libc::kill(pid, libc::SIGKILL) } == 0
}

/// Imports the app in a forked child, which then exits: a master that
/// re-executes itself to preload new code (HUP with --preload, --reload)
/// keeps the workers of the previous code only as long as it lives, and an
/// import that kills its process (a segfault in a C extension, an abort,
/// `os._exit()`) would take every worker down with it, where a Python
/// exception leaves them serving. The cost is a second import.
///
/// Forks, so it must be called with no other thread running than
/// `interim`'s. `interrupt` is what [`corral_engine::supervise::importing`]
/// calls at a stop signal: it must call [`stop_import_child`].
pub fn import_in_child(
    py: Python<'_>,
    spec: &AppSpec,
    interrupt: fn(),
    interim: Option<&corral_engine::stats::Interim>,
) -> Result<Tried, String> {
    let mut fds = [0; 2];
    // Not waited on: a process the import forked may hold the writing end
    // long after the child that says the verdict is gone.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the GIL is held (`py`), as CPython's fork hooks need; the one
    // other thread (answering probes) is held where it holds no lock, so
    // the child holds none another thread held.
    let quiet = interim.map(|i| i.quiet());
    unsafe { pyo3::ffi::PyOS_BeforeFork() };
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            pyo3::ffi::PyOS_AfterFork_Child();
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::close(fds[0]);
        }
        let verdict: u8 = if load_app(py, spec).is_ok() { b'1' } else { b'0' };
        // Nothing of this process's may run at its exit: no Rust or Python
        // exit handlers, no buffers flushed twice.
        unsafe {
            libc::write(fds[1], (&verdict as *const u8).cast(), 1);
            libc::_exit(0);
        }
    }
    unsafe { pyo3::ffi::PyOS_AfterFork_Parent() };
    drop(quiet);
    unsafe { libc::close(fds[1]) };
    let read_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    IMPORT_CHILD.store(pid, std::sync::atomic::Ordering::Relaxed);
    corral_engine::supervise::importing(true, interrupt);
    let mut status = 0;
    // Restarted after the signals' handlers (SA_RESTART); ends when the
    // child does, killed at a stop signal included.
    let waited = py.allow_threads(|| loop {
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break r == pid;
        }
    });
    let stopped = corral_engine::supervise::importing(false, interrupt);
    IMPORT_CHILD.store(0, std::sync::atomic::Ordering::Relaxed);
    if stopped {
        return Ok(Tried::Stopped);
    }
    if !waited {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    let mut verdict = 0u8;
    let got = unsafe { libc::read(read_end.as_raw_fd(), (&mut verdict as *mut u8).cast(), 1) };
    if got == 1 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Ok(Tried::Survived);
    }
    Ok(Tried::Died(if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        format!("killed by signal {sig} ({})", corral_engine::supervise::signal_name(sig))
    } else {
        format!("it exited with status {} before the import ended", libc::WEXITSTATUS(status))
    }))
}

/// Puts /dev/null back on descriptors 0, 1 and 2 that the app's import
/// closed (a library that daemonizes the process does): the descriptors
/// corral opens next (the epoll set, a listener, the hand-over inbox) would
/// take those numbers, and what the app then writes to standard output
/// would go into them. A request that closes them is repaired the same way
/// by the connections kept off 0-2.
fn reopen_stdio_the_import_closed() {
    let names = ["standard input", "standard output", "standard error"];
    let closed: Vec<&str> = null_on_closed_stdio().into_iter().map(|fd| names[fd as usize]).collect();
    if !closed.is_empty() {
        tracing::warn!(
            "The app closed {} while it loaded; /dev/null is there again, so that the server's own \
             descriptors do not take those numbers (what the app writes there is lost)",
            closed.join(", ")
        );
    }
}

/// Opens /dev/null on each of descriptors 0, 1 and 2 that is closed;
/// returns those it found closed.
pub(crate) fn null_on_closed_stdio() -> Vec<libc::c_int> {
    let mut closed = Vec::new();
    for fd in 0..3 {
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if null >= 0 && null != fd {
            unsafe {
                libc::dup2(null, fd);
                libc::close(null);
            }
        }
        closed.push(fd);
    }
    closed
}

/// Runs a Python file as the module `name` (in sys.modules, as an import
/// would put it), whatever its file name's suffix.
fn load_file<'py>(py: Python<'py>, name: &str, path: &str) -> PyResult<Bound<'py, pyo3::types::PyModule>> {
    let loader = py.import("importlib.machinery")?.getattr("SourceFileLoader")?.call1((name, path))?;
    let util = py.import("importlib.util")?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("loader", &loader)?;
    let spec = util.call_method("spec_from_file_location", (name, path), Some(&kwargs))?;
    let module = util.call_method1("module_from_spec", (&spec,))?;
    py.import("sys")?.getattr("modules")?.set_item(name, &module)?;
    loader.call_method1("exec_module", (&module,))?;
    Ok(module.downcast_into::<pyo3::types::PyModule>()?)
}

/// A factory's arguments, `'prod', debug=True`: Python literals only, as
/// gunicorn takes them (`ast.literal_eval` of each), never code to run.
fn factory_args<'py>(
    py: Python<'py>,
    args: &str,
) -> Result<(Bound<'py, PyTuple>, Bound<'py, pyo3::types::PyDict>), String> {
    let ast = py.import("ast").map_err(|e| e.to_string())?;
    let call = ast
        .call_method1("parse", (format!("f({args})"), "<APP>", "eval"))
        .and_then(|tree| tree.getattr("body"))
        .map_err(|_| format!("the factory's arguments `{args}` are not valid Python"))?;
    let literal = |node: Bound<'py, PyAny>| {
        ast.call_method1("literal_eval", (node,)).map_err(|_| {
            format!("the factory's arguments must be literals (strings, numbers, ...): `{args}`")
        })
    };
    let mut positional = Vec::new();
    for node in call.getattr("args").map_err(|e| e.to_string())?.try_iter().map_err(|e| e.to_string())? {
        positional.push(literal(node.map_err(|e| e.to_string())?)?);
    }
    let kwargs = pyo3::types::PyDict::new(py);
    for kw in call.getattr("keywords").map_err(|e| e.to_string())?.try_iter().map_err(|e| e.to_string())? {
        let kw = kw.map_err(|e| e.to_string())?;
        let name = kw.getattr("arg").map_err(|e| e.to_string())?;
        if name.is_none() {
            return Err(format!("the factory's arguments cannot unpack (`**`): `{args}`"));
        }
        let value = literal(kw.getattr("value").map_err(|e| e.to_string())?)?;
        kwargs.set_item(name, value).map_err(|e| e.to_string())?;
    }
    Ok((PyTuple::new(py, positional).map_err(|e| e.to_string())?, kwargs))
}

/// The exception with its traceback, as Python prints it.
pub fn format_exception(py: Python<'_>, e: &PyErr) -> String {
    let formatted = (|| -> PyResult<String> {
        let tb = py.import("traceback")?;
        let args = PyTuple::new(
            py,
            [
                e.get_type(py).into_any(),
                e.value(py).clone().into_any(),
                e.traceback(py).map_or_else(|| py.None().into_bound(py), |t| t.into_any()),
            ],
        )?;
        let lines = tb.getattr("format_exception")?.call1(args)?;
        let joined = "".into_pyobject(py)?.call_method1("join", (lines,))?;
        Ok(crate::logging::log_text(joined.downcast::<PyString>()?).into_owned())
    })();
    formatted.unwrap_or_else(|_| e.to_string()).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = AppSpec::parse("pkg.mod:app").unwrap();
        assert_eq!((s.module.as_str(), s.attr.as_str(), s.factory), ("pkg.mod", "app", None));
        let s = AppSpec::parse("mod").unwrap();
        assert_eq!(s.attr, "application");
        let s = AppSpec::parse("mod:create_app()").unwrap();
        assert_eq!(s.factory.as_deref(), Some(""));
        let s = AppSpec::parse("mod:create_app('prod', debug=True)").unwrap();
        assert_eq!((s.attr.as_str(), s.factory.as_deref()), ("create_app", Some("'prod', debug=True")));
        assert_eq!(s.to_string(), "mod:create_app('prod', debug=True)");
        assert!(AppSpec::parse("mod:create_app('prod'").is_err());
        assert!(AppSpec::parse("mod:").is_err());
        let e = AppSpec::parse("run/corral.pid").unwrap_err();
        assert!(e.contains("`corral signal HUP run/corral.pid`"), "{e}");
        assert!(AppSpec::parse("./app.py").unwrap_err().contains("give its module, `app`"));
        assert!(AppSpec::parse("etc/uwsgi.ini").unwrap_err().contains("--config etc/uwsgi.ini"));
        // No such file here: a module path like any other.
        assert!(AppSpec::parse("myproj.conf").is_ok());
        assert!(AppSpec::parse("mod:a b").is_err());
    }
}
