//! gunicorn's server hooks (`post_fork`, `when_ready`, `child_exit`,
//! `pre_request`...) defined in a gunicorn configuration file, run where
//! and when gunicorn runs them, with the objects of `corral._gunicorn` in
//! place of gunicorn's own.
//!
//! A hook that raises is logged with its traceback and the hook's name.
//! What follows is gunicorn's rule: a raising `on_starting` or `when_ready`
//! stops the start; a raising `post_fork` or `post_worker_init` is a worker
//! that failed to boot (as an app that does not import); a raising
//! `pre_request` is that request's 500; any other is logged and the server
//! goes on.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tracing::error;

/// The hooks corral runs, with the arguments gunicorn gives them.
pub const RUN: &[&str] = &[
    "on_starting",      // in the master before it binds
    "on_reload",        // in the master at HUP
    "when_ready",       // in the master once bound, before the first fork
    "pre_fork",         // in the master before each fork
    "post_fork",        // in the new worker
    "post_worker_init", // in the worker once the app is loaded
    "worker_int",       // in the worker at a quick stop (INT or QUIT)
    "pre_exec",         // in the master before it re-executes itself
    "pre_request",      // before the app is called
    "post_request",     // after the response
    "child_exit",       // in the master when a worker exited
    "worker_exit",      // in the worker as it exits
    "nworkers_changed", // in the master
    "on_exit",          // in the master as it exits
];

/// The parameters each hook of [`RUN`] is called with, as gunicorn calls
/// it; a hook that takes another number is refused at start, as gunicorn's
/// settings refuse it (`post_request` may also take the first 2 or 3).
pub fn parameters(hook: &str) -> &'static str {
    match hook {
        "pre_fork" | "post_fork" | "child_exit" | "worker_exit" => "server, worker",
        "post_worker_init" | "worker_int" => "worker",
        "pre_request" => "worker, req",
        "post_request" => "worker, req, environ, resp",
        "nworkers_changed" => "server, new_value, old_value",
        _ => "server",
    }
}

/// The hooks a configuration file defined (callables under the names of
/// [`RUN`]).
#[derive(Default)]
pub struct ServerHooks {
    hooks: Vec<(&'static str, PyObject)>,
}

impl ServerHooks {
    /// The hooks among the names a configuration file defined.
    pub fn from_names(names: &Bound<'_, PyDict>) -> ServerHooks {
        let hooks = RUN
            .iter()
            .filter_map(|&name| {
                let hook = names.get_item(name).ok().flatten()?;
                hook.is_callable().then(|| (name, hook.unbind()))
            })
            .collect();
        ServerHooks { hooks }
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    pub fn has(&self, name: &str) -> bool {
        self.hooks.iter().any(|(n, _)| *n == name)
    }

    pub fn get(&self, py: Python<'_>, name: &str) -> Option<PyObject> {
        self.hooks.iter().find(|(n, _)| *n == name).map(|(_, h)| h.clone_ref(py))
    }

    /// Runs hook `name`, if the file defined it, with `args`. A hook that
    /// raised is logged here; `false` tells the caller it did.
    pub fn run<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        args: impl IntoPyObject<'py, Target = PyTuple>,
    ) -> bool {
        let Some((_, hook)) = self.hooks.iter().find(|(n, _)| *n == name) else {
            return true;
        };
        match hook.bind(py).call1(args) {
            Ok(_) => true,
            Err(e) => {
                log_failure(py, name, &e);
                false
            }
        }
    }
}

/// One line saying which hook raised, then its traceback.
pub fn log_failure(py: Python<'_>, name: &str, e: &PyErr) {
    error!(
        "The gunicorn server hook `{name}` raised an exception:\n{}",
        crate::load::format_exception(py, e)
    );
}

fn shims(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    py.import("corral._gunicorn")
}

/// gunicorn's `server`: the master `pid`, its pool size and name.
pub fn server<'py>(py: Python<'py>, pid: u32, num_workers: usize, name: &str) -> PyResult<Bound<'py, PyAny>> {
    shims(py)?.getattr("Server")?.call1((pid, num_workers, name))
}

/// What a `worker` object says of one worker.
pub struct WorkerInfo {
    /// None before it is forked (`pre_fork`).
    pub pid: Option<u32>,
    pub ppid: u32,
    /// None for a worker started before a re-exec.
    pub age: Option<u64>,
    pub slot: Option<usize>,
    pub booted: bool,
    pub alive: bool,
    pub max_requests: u64,
    pub timeout: u64,
}

/// gunicorn's `worker`.
pub fn worker<'py>(py: Python<'py>, w: &WorkerInfo) -> PyResult<Bound<'py, PyAny>> {
    shims(py)?.getattr("Worker")?.call1((
        w.pid,
        w.ppid,
        w.age,
        w.slot,
        w.booted,
        w.alive,
        w.max_requests,
        w.timeout,
    ))
}

/// `pre_request` and `post_request`, as a worker runs them around each
/// request, with the worker's own `worker` object.
pub struct RequestHooks {
    pub pre: Option<PyObject>,
    pub post: Option<PyObject>,
    pub worker: PyObject,
    /// `corral._gunicorn.Request` and `Response`.
    request_class: PyObject,
    response_class: PyObject,
}

impl RequestHooks {
    /// None when the file defined neither hook.
    pub fn new(
        py: Python<'_>,
        hooks: &ServerHooks,
        worker: &Bound<'_, PyAny>,
    ) -> PyResult<Option<RequestHooks>> {
        let (pre, post) = (hooks.get(py, "pre_request"), hooks.get(py, "post_request"));
        if pre.is_none() && post.is_none() {
            return Ok(None);
        }
        let m = shims(py)?;
        Ok(Some(RequestHooks {
            pre,
            post,
            worker: worker.clone().unbind(),
            request_class: m.getattr("Request")?.unbind(),
            response_class: m.getattr("Response")?.unbind(),
        }))
    }

    /// gunicorn's `req` for this environ.
    pub fn request<'py>(&self, py: Python<'py>, environ: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.request_class.bind(py).call1((environ,))
    }

    /// gunicorn's `resp`, wrapping the server's start_response.
    pub fn response<'py>(
        &self,
        py: Python<'py>,
        start_response: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.response_class.bind(py).call1((start_response,))
    }
}
