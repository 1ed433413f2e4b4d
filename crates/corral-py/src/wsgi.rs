//! The WSGI adapter (PEP 3333): builds the environ, provides
//! `start_response`, `wsgi.input`, `wsgi.errors` and `wsgi.file_wrapper`,
//! and turns the app's iterable into a response through the engine's
//! [`Exchange`].
//!
//! Each worker thread keeps one Python thread state for its whole life and
//! holds the GIL only while Python runs: the engine's socket waits go through
//! [`WsgiApp::blocking`], which releases it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use corral_engine::cgi::{CgiEnviron, CgiParams};
use corral_engine::{App, BodyError, Exchange, Meta, Request, ResponseError, WorkerCtx};
use corral_proto::http1::{percent_decode, Known, TargetForm};
use pyo3::exceptions::{PyAssertionError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use tracing::{error, info, warn};

use crate::load::format_exception;
use crate::server_hooks::RequestHooks;
use crate::shape::Shape;

pyo3::create_exception!(
    corral._corral,
    ClientDisconnected,
    PyOSError,
    "The client closed the connection, or stopped reading, before the exchange ended."
);
pyo3::create_exception!(
    corral._corral,
    InvalidRequestBody,
    PyOSError,
    "The request body could not be read: bad framing, too large, or a timeout."
);

/// Header-key strings cached beyond this many distinct names are built per
/// request instead, so odd names from clients cannot grow memory.
const MAX_CACHED_KEYS: usize = 512;

/// Largest body `read()` reads straight into one preallocated bytes object.
const DIRECT_READ_MAX: u64 = 16 * 1024 * 1024;

/// Interned environ keys and constant values, created once per worker.
struct Keys {
    request_method: Py<PyString>,
    path_info: Py<PyString>,
    script_name: Py<PyString>,
    query_string: Py<PyString>,
    request_uri: Py<PyString>,
    raw_uri: Py<PyString>,
    server_protocol: Py<PyString>,
    remote_addr: Py<PyString>,
    remote_port: Py<PyString>,
    content_type: Py<PyString>,
    content_length: Py<PyString>,
    wsgi_input: Py<PyString>,
    url_scheme: Py<PyString>,
    https: Py<PyString>,
    http10: Py<PyString>,
    http11: Py<PyString>,
    empty: Py<PyString>,
    methods: Vec<(&'static [u8], Py<PyString>)>,
}

/// Python strings for names seen before, so each request's environ reuses
/// them. foldhash rather than the standard SipHash: a lookup per variable
/// per request, and the seed is still random per process.
type KeyCache = HashMap<Box<[u8]>, Py<PyString>, foldhash::fast::RandomState>;

pub struct WsgiApp {
    app: PyObject,
    templates: Vec<Py<PyDict>>,
    keys: Keys,
    header_keys: Mutex<KeyCache>,
    var_keys: Mutex<KeyCache>,
    /// Each serving thread's Python thread state (a `PyThreadState *`, kept
    /// for the thread's life), by index, for tracebacks.
    thread_states: Mutex<Vec<usize>>,
    /// Since when each serving thread waits for the GIL to call the app
    /// (monotonic ms), 0 when it does not (see [`App::stalled`]).
    gil_waits: Box<[AtomicU64]>,
    /// When a serving thread last got the GIL to call the app (monotonic ms).
    gil_taken: AtomicU64,
    mount: Vec<u8>,
    max_body: u64,
    /// The worker's pid, for the log when a forked child comes back.
    pid: u32,
    /// Environ variables the access log shows, lower-case (`%({name}e)s`).
    log_environ: Vec<String>,
    /// gunicorn's `pre_request` and `post_request` hooks, if any.
    request_hooks: Option<RequestHooks>,
}

/// How long a serving thread may wait for the GIL before the worker counts
/// as stalled: Python hands the GIL over every 5 ms (sys.setswitchinterval)
/// to threads running Python code, so a wait this long means a thread that
/// keeps it, in C code that does not release it.
const GIL_STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// A worker thread's own: its Python thread state, parked while the thread
/// waits, its index, and the environ it keeps for gateway requests.
pub struct PyThread {
    tstate: *mut ffi::PyThreadState,
    index: usize,
    shape: Option<Shape>,
}

impl WsgiApp {
    pub fn new(
        py: Python<'_>,
        app: PyObject,
        ctx: &WorkerCtx,
        mount: &str,
        multiprocess: bool,
        multithread: bool,
        request_hooks: Option<RequestHooks>,
    ) -> PyResult<WsgiApp> {
        let s = |v: &str| PyString::intern(py, v).unbind();
        let errors = Bound::new(py, ErrorStream {})?;
        let wrapper = py.get_type::<FileWrapper>();
        let mut templates = Vec::new();
        for (_, l) in &ctx.listeners {
            let d = PyDict::new(py);
            d.set_item("wsgi.version", (1, 0))?;
            d.set_item("wsgi.url_scheme", "http")?;
            d.set_item("wsgi.errors", &errors)?;
            d.set_item("wsgi.multithread", multithread)?;
            d.set_item("wsgi.multiprocess", multiprocess)?;
            d.set_item("wsgi.run_once", false)?;
            d.set_item("wsgi.input_terminated", true)?;
            d.set_item("wsgi.file_wrapper", &wrapper)?;
            d.set_item("SERVER_SOFTWARE", concat!("corral/", env!("CARGO_PKG_VERSION")))?;
            d.set_item("SERVER_NAME", &l.server_name)?;
            d.set_item("SERVER_PORT", &l.server_port)?;
            d.set_item("SCRIPT_NAME", latin1(py, mount.as_bytes()))?;
            templates.push(d.unbind());
        }
        let methods = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"]
            .iter()
            .map(|m| (m.as_bytes(), s(m)))
            .collect();
        let app = WsgiApp {
            app,
            templates,
            keys: Keys {
                request_method: s("REQUEST_METHOD"),
                path_info: s("PATH_INFO"),
                script_name: s("SCRIPT_NAME"),
                query_string: s("QUERY_STRING"),
                request_uri: s("REQUEST_URI"),
                raw_uri: s("RAW_URI"),
                server_protocol: s("SERVER_PROTOCOL"),
                remote_addr: s("REMOTE_ADDR"),
                remote_port: s("REMOTE_PORT"),
                content_type: s("CONTENT_TYPE"),
                content_length: s("CONTENT_LENGTH"),
                wsgi_input: s("wsgi.input"),
                url_scheme: s("wsgi.url_scheme"),
                https: s("https"),
                http10: s("HTTP/1.0"),
                http11: s("HTTP/1.1"),
                empty: s(""),
                methods,
            },
            header_keys: Mutex::new(KeyCache::default()),
            var_keys: Mutex::new(KeyCache::default()),
            thread_states: Mutex::new(Vec::new()),
            // One thread: no other is free to take connections into the wait.
            gil_waits: match ctx.config.threads {
                0 | 1 => Box::new([]),
                n => (0..n).map(|_| AtomicU64::new(0)).collect(),
            },
            gil_taken: AtomicU64::new(0),
            mount: mount.as_bytes().to_vec(),
            max_body: ctx.config.max_body_size,
            pid: std::process::id(),
            log_environ: ctx.config.access_log.as_ref().map(|(_, f)| f.environ_names()).unwrap_or_default(),
            request_hooks,
        };
        Ok(app)
    }

    fn environ<'py>(
        &self,
        py: Python<'py>,
        req: &Request<'_>,
        ex: &Exchange,
        shape: &mut Option<Shape>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let k = &self.keys;
        let head = match req.meta {
            Meta::Http(head) => head,
            Meta::Cgi(params) => {
                let env = self.cgi_environ(py, req, params, shape)?;
                let input = Bound::new(py, Input { ex: ex.clone(), max: self.max_body })?;
                env.set_item(k.wsgi_input.bind(py), input)?;
                return Ok(env);
            }
        };
        let env = self.templates[req.listener_index].bind(py).copy()?;
        let method = req.method();
        match k.methods.iter().find(|(m, _)| *m == method) {
            Some((_, s)) => env.set_item(k.request_method.bind(py), s.bind(py))?,
            None => env.set_item(k.request_method.bind(py), latin1(py, method))?,
        }
        let mut decoded = Vec::new();
        if head.form == TargetForm::Asterisk {
            decoded.push(b'*');
        } else if head.form == TargetForm::Absolute && req.path().is_empty() {
            // `http://a` names the root, and for OPTIONS the server itself,
            // as `*` does (RFC 9112 3.2.4).
            decoded.push(if method == b"OPTIONS" { b'*' } else { b'/' });
        } else {
            percent_decode(req.path(), &mut decoded);
        }
        let mut path: &[u8] = &decoded;
        let prefix = match req.forwarded_prefix {
            true => forwarded_prefix(head, req.bytes),
            false => None,
        };
        if let Some(prefix) = prefix {
            // As gunicorn takes it from a trusted proxy: the prefix is the
            // SCRIPT_NAME, and comes off the path when the path has it.
            if path.starts_with(prefix) && matches!(path.get(prefix.len()), None | Some(b'/')) {
                path = &path[prefix.len()..];
            }
            env.set_item(k.script_name.bind(py), latin1(py, prefix))?;
        } else if !self.mount.is_empty() {
            let under = path.starts_with(&self.mount)
                && (path.len() == self.mount.len() || path[self.mount.len()] == b'/');
            if under {
                path = &path[self.mount.len()..];
            } else {
                env.set_item(k.script_name.bind(py), k.empty.bind(py))?;
            }
        }
        env.set_item(k.path_info.bind(py), latin1(py, path))?;
        let query = req.query();
        if query.is_empty() {
            env.set_item(k.query_string.bind(py), k.empty.bind(py))?;
        } else {
            env.set_item(k.query_string.bind(py), latin1(py, query))?;
        }
        // RAW_URI too, as gunicorn sets it: apps written for it read the
        // target from there.
        let target = latin1(py, req.target());
        env.set_item(k.raw_uri.bind(py), &target)?;
        env.set_item(k.request_uri.bind(py), target)?;
        let proto = if req.protocol() == "HTTP/1.1" { &k.http11 } else { &k.http10 };
        env.set_item(k.server_protocol.bind(py), proto.bind(py))?;
        env.set_item(k.remote_addr.bind(py), req.remote_addr)?;
        env.set_item(k.remote_port.bind(py), req.remote_port)?;
        let authority = req.authority();
        let mut host_field: &[u8] = b"";
        for (name, value, known) in req.fields() {
            if known == Known::Host {
                host_field = value;
            }
            match known {
                Known::ScriptName => {}
                Known::ContentType => env.set_item(k.content_type.bind(py), latin1(py, value))?,
                Known::ContentLength => env.set_item(k.content_length.bind(py), latin1(py, value))?,
                // An absolute-form target's authority replaces Host (below).
                Known::Host if !authority.is_empty() => {}
                _ => {
                    let key = self.header_key(py, name);
                    let value = latin1(py, value);
                    match env.get_item(&key)? {
                        None => env.set_item(key, value)?,
                        Some(prev) => {
                            // RFC 9110 lets repeated fields be joined with commas; Cookie uses "; ".
                            let sep = if known == Known::Cookie { "; " } else { "," };
                            let joined = format!("{}{sep}{}", prev.extract::<&str>()?, value.to_str()?);
                            env.set_item(key, joined)?;
                        }
                    }
                }
            }
        }
        if !authority.is_empty() {
            env.set_item(self.header_key(py, b"host"), latin1(py, authority))?;
        }
        if req.forwarded_https {
            env.set_item(k.url_scheme.bind(py), k.https.bind(py))?;
        }
        if req.listener.is_unix {
            // A unix socket has no name or port a URL could use (PEP 3333
            // wants both, never empty): the Host the client asked for gives
            // them, as under gunicorn; Django's CSRF Referer check compares
            // against them.
            let host = if authority.is_empty() { host_field } else { authority };
            let (name, port) = split_host(host);
            if !name.is_empty() {
                env.set_item(pyo3::intern!(py, "SERVER_NAME"), latin1(py, name))?;
            }
            let port = match port {
                Some(p) => latin1(py, p),
                None if req.forwarded_https => PyString::new(py, "443"),
                None => PyString::new(py, "80"),
            };
            env.set_item(pyo3::intern!(py, "SERVER_PORT"), port)?;
        }
        let input = Bound::new(py, Input { ex: ex.clone(), max: self.max_body })?;
        env.set_item(k.wsgi_input.bind(py), input)?;
        Ok(env)
    }

    /// The environ of a request a front end sent over uwsgi, FastCGI or SCGI:
    /// its variables, normalized by [`corral_engine::cgi::environ`], with
    /// `wsgi.input` still None. A copy of the thread's kept environ when the
    /// request has its shape (see [`crate::shape`]), else built anew and kept.
    fn cgi_environ<'py>(
        &self,
        py: Python<'py>,
        req: &Request<'_>,
        params: &CgiParams,
        shape: &mut Option<Shape>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let cgi = corral_engine::cgi::environ(params, req.bytes, &self.mount);
        let listener = req.listener_index;
        let names = || cgi.vars.iter().map(|(name, _)| *name);
        let Some(kept) = shape.as_mut().filter(|s| s.fits(listener, cgi.https, names())) else {
            // Dropped first: a failure below must not leave the old shape
            // kept with this request's values half in it.
            *shape = None;
            let (env, keys) = self.cgi_environ_anew(py, req, &cgi)?;
            let mut values: Vec<Vec<u8>> = cgi.vars.iter().map(|(_, v)| v.to_vec()).collect();
            values.push(cgi.path_info.to_vec());
            values.push(cgi.script_name.to_vec());
            let names = names().map(Box::from).collect();
            let kept = Shape { listener, https: cgi.https, names, values, keys, dict: env.unbind() };
            return shape.insert(kept).environ(py);
        };
        for (i, (name, value)) in cgi.vars.iter().enumerate() {
            kept.set(py, i, value, || self.var_value(py, name, value))?;
        }
        let n = cgi.vars.len();
        kept.set(py, n, &cgi.path_info, || latin1(py, &cgi.path_info))?;
        kept.set(py, n + 1, &cgi.script_name, || latin1(py, &cgi.script_name))?;
        kept.environ(py)
    }

    /// A gateway request's environ built from the listener's template, and
    /// the key of each of its slots (see [`Shape`]).
    fn cgi_environ_anew<'py>(
        &self,
        py: Python<'py>,
        req: &Request<'_>,
        cgi: &CgiEnviron<'_>,
    ) -> PyResult<(Bound<'py, PyDict>, Vec<Py<PyString>>)> {
        let k = &self.keys;
        let env = self.templates[req.listener_index].bind(py).copy()?;
        // Every name looked up under one lock; the lock is never held while
        // Python allocates, since a collection could run a __del__ that lets
        // another thread in, which would then wait for the lock with the GIL.
        let known: Vec<Option<Bound<'_, PyString>>> = {
            let cache = self.var_keys.lock().unwrap_or_else(|p| p.into_inner());
            cgi.vars.iter().map(|(name, _)| cache.get(&name[..]).map(|k| k.bind(py).clone())).collect()
        };
        let mut keys = Vec::with_capacity(cgi.vars.len() + 2);
        for ((name, value), key) in cgi.vars.iter().zip(known) {
            let key = key.unwrap_or_else(|| {
                // Latin-1, as every environ string: one char per byte.
                let text: String = name.iter().map(|&b| b as char).collect();
                new_key(&self.var_keys, py, name, &text)
            });
            env.set_item(&key, self.var_value(py, name, value))?;
            keys.push(key.unbind());
        }
        env.set_item(k.path_info.bind(py), latin1(py, &cgi.path_info))?;
        env.set_item(k.script_name.bind(py), latin1(py, &cgi.script_name))?;
        keys.push(k.path_info.clone_ref(py));
        keys.push(k.script_name.clone_ref(py));
        if cgi.https {
            env.set_item(k.url_scheme.bind(py), k.https.bind(py))?;
        }
        env.set_item(k.wsgi_input.bind(py), py.None())?;
        Ok((env, keys))
    }

    /// A variable's value as the environ has it: latin-1, and the method
    /// as one of the strings every request shares.
    fn var_value<'py>(&self, py: Python<'py>, name: &[u8], value: &[u8]) -> Bound<'py, PyString> {
        if name == b"REQUEST_METHOD" {
            if let Some((_, s)) = self.keys.methods.iter().find(|(m, _)| *m == value) {
                return s.bind(py).clone();
            }
        }
        latin1(py, value)
    }

    /// `HTTP_` + the name upper-cased with `-` as `_`, cached per distinct name.
    fn header_key<'py>(&self, py: Python<'py>, name: &[u8]) -> Bound<'py, PyString> {
        if let Some(k) = cached(&self.header_keys, py, name) {
            return k;
        }
        let mut key = String::with_capacity(5 + name.len());
        key.push_str("HTTP_");
        for &b in name {
            key.push(if b == b'-' { '_' } else { b.to_ascii_uppercase() as char });
        }
        new_key(&self.header_keys, py, name, &key)
    }

    fn serve(&self, py: Python<'_>, req: &Request<'_>, ex: &Exchange, shape: &mut Option<Shape>) {
        let environ = match self.environ(py, req, ex, shape) {
            Ok(e) => e,
            Err(e) => return self.app_error(py, req, ex, &e),
        };
        let start_response = match Bound::new(py, StartResponse { ex: ex.clone() }) {
            Ok(s) => s,
            Err(e) => return self.app_error(py, req, ex, &e),
        };
        match &self.request_hooks {
            None => self.call_app(py, req, ex, &environ, start_response.as_any()),
            Some(hooks) => self.call_hooked(py, req, ex, &environ, start_response.as_any(), hooks),
        }
        // A child the app forked in its iterable or its close(): see there.
        self.leave_if_forked(req);
        if !self.log_environ.is_empty() {
            self.keep_environ_for_log(ex, &environ);
        }
        // A last line the app wrote to wsgi.errors without its newline.
        crate::logging::app_error_flush();
    }

    fn call_app(
        &self,
        py: Python<'_>,
        req: &Request<'_>,
        ex: &Exchange,
        environ: &Bound<'_, PyDict>,
        start_response: &Bound<'_, PyAny>,
    ) {
        let result = self.app.bind(py).call1((environ, start_response));
        self.leave_if_forked(req);
        match result {
            Ok(result) => self.send(py, req, ex, &result),
            Err(e) => self.app_error(py, req, ex, &e),
        }
    }

    /// The app between gunicorn's `pre_request` and `post_request` hooks,
    /// as gunicorn runs them: a `pre_request` that raises is the request's
    /// 500, and `post_request` runs whatever happened, once the response
    /// is complete.
    fn call_hooked(
        &self,
        py: Python<'_>,
        req: &Request<'_>,
        ex: &Exchange,
        environ: &Bound<'_, PyDict>,
        start_response: &Bound<'_, PyAny>,
        hooks: &RequestHooks,
    ) {
        let request = match hooks.request(py, environ.as_any()) {
            Ok(r) => r,
            Err(e) => return self.app_error(py, req, ex, &e),
        };
        let response = match hooks.response(py, start_response) {
            Ok(r) => r,
            Err(e) => return self.app_error(py, req, ex, &e),
        };
        let worker = hooks.worker.bind(py);
        let pre = hooks.pre.as_ref().map_or(Ok(()), |pre| pre.bind(py).call1((worker, &request)).map(|_| ()));
        match pre {
            Ok(()) => match response.getattr(pyo3::intern!(py, "start_response")) {
                Ok(wrapped) => self.call_app(py, req, ex, environ, &wrapped),
                Err(e) => self.app_error(py, req, ex, &e),
            },
            Err(e) => {
                error!(
                    "{} from {}: the gunicorn server hook `pre_request` raised an exception",
                    req.describe(),
                    req.peer()
                );
                self.app_error(py, req, ex, &e);
            }
        }
        if let Some(post) = &hooks.post {
            let _ = response.call_method1(pyo3::intern!(py, "_answered"), (ex.status(), ex.body_sent()));
            if let Err(e) = post.bind(py).call1((worker, &request, environ, &response)) {
                crate::server_hooks::log_failure(py, "post_request", &e);
            }
        }
    }

    /// The environ variables the access log shows, as the app left them
    /// (middleware may have added REMOTE_USER, say), matched without
    /// regard to case as gunicorn does.
    fn keep_environ_for_log(&self, ex: &Exchange, environ: &Bound<'_, PyDict>) {
        for (key, value) in environ.iter() {
            let Ok(key) = key.downcast::<PyString>() else { continue };
            let Ok(key) = key.to_cow() else { continue };
            let lower = key.to_ascii_lowercase();
            if !self.log_environ.contains(&lower) {
                continue;
            }
            let text = match value.downcast::<PyString>() {
                Ok(s) => crate::logging::log_text(s).into_owned(),
                Err(_) => match value.str() {
                    Ok(s) => crate::logging::log_text(&s).into_owned(),
                    Err(_) => continue,
                },
            };
            ex.log_environ(&lower, text.as_bytes());
        }
    }

    /// Leaves at once if this is a process the app forked: see
    /// [`WsgiApp::forked_child_returned`].
    fn leave_if_forked(&self, req: &Request<'_>) {
        if corral_engine::worker::in_forked_child() {
            self.forked_child_returned(req);
        }
    }

    /// The app called `os.fork()` and the child returned from the app (or
    /// from a step of its iterable, or its close()) instead of ending with
    /// `os._exit()`. Going on would write a second
    /// response on the parent's connection, then serve the parent's
    /// listeners with nobody supervising it (it has none of the worker's
    /// other threads, so it would not even see a stop). It leaves at once.
    fn forked_child_returned(&self, req: &Request<'_>) -> ! {
        if corral_engine::logfile::free() {
            error!(
                "{}: the app forked (pid {} -> {}) and the child returned to the server; \
                 the child exits without answering (end a forked child with os._exit())",
                req.describe(),
                self.pid,
                std::process::id(),
            );
        }
        unsafe { libc::_exit(1) }
    }

    /// Sends the app's iterable and calls its close() exactly once.
    fn send(&self, py: Python<'_>, req: &Request<'_>, ex: &Exchange, result: &Bound<'_, PyAny>) {
        if self.answered_for_body(py, req, ex, result) {
            return;
        }
        let outcome = self.send_body(py, req, ex, result);
        // The app forked in its iterable, whose child ended its iteration:
        // it leaves before the response's end or the app's close() (which
        // for Django closes database connections shared with the parent).
        self.leave_if_forked(req);
        if outcome.is_ok() {
            // The client has its whole response before close() runs, as under gunicorn.
            if let Err(e) = ex.end_body() {
                warn!("{} from {}: {e}", req.describe(), req.peer());
            }
        }
        let closed = close_iterable(py, result);
        self.leave_if_forked(req);
        if let Err(e) = outcome {
            self.app_error(py, req, ex, &e);
            if let Err(e) = closed {
                // Django's close() runs the request_finished handlers (which
                // close database connections): their failure on an aborted
                // response must show too.
                error!(
                    "Error in close() of the response iterable of {}, after the error above:\n{}",
                    req.describe(),
                    format_exception(py, &e)
                );
            }
        } else if let Err(e) = closed {
            if ex.started() {
                // The whole body went out: the client gets it complete, as
                // under gunicorn, and the log gets the error.
                let text = format_exception(py, &e);
                corral_engine::worker::note_exception(&exception_summary(py, &e));
                error!(
                    "Error in close() of the response iterable of {} (the response was sent whole):\n{text}",
                    req.describe()
                );
            } else {
                // Both faults, each with its own line: the close() error
                // alone would hide that no response was ever started.
                error!(
                    "App error in {}: the application returned without calling start_response",
                    req.describe()
                );
                self.app_error(py, req, ex, &e);
            }
        } else if !ex.started() {
            error!(
                "App error in {}: the application returned without calling start_response",
                req.describe()
            );
            respond_error(ex, 500);
        }
    }

    /// An app that caught the error a read of its body raised and answered
    /// it with a server error (Django and Flask render UnreadablePostError as
    /// their 500) answered a client whose body was at fault: bad framing,
    /// too large, too slow or cut short. The client gets the status that
    /// says so (400, 408, 413), as when the error escapes the app, and the
    /// server's 5xx count does not take the client's fault for its own. The
    /// app's response is closed unsent; true if it was replaced so.
    fn answered_for_body(
        &self,
        py: Python<'_>,
        req: &Request<'_>,
        ex: &Exchange,
        result: &Bound<'_, PyAny>,
    ) -> bool {
        let clients = |be: &BodyError| {
            matches!(
                be,
                BodyError::Framing(_) | BodyError::TooLarge | BodyError::Truncated | BodyError::Timeout
            )
        };
        let Some(be) = ex.body_error().filter(clients) else {
            return false;
        };
        if !ex.started() || ex.headers_sent() || ex.status() < 500 {
            return false;
        }
        info!(
            "{} from {}: the app answered {} to its body's error ({be}); the client is told {}",
            req.describe(),
            req.peer(),
            ex.status(),
            be.status()
        );
        ex.unstart();
        respond_error(ex, be.status());
        let closed = close_iterable(py, result);
        self.leave_if_forked(req);
        if let Err(e) = closed {
            error!(
                "Error in close() of the response iterable of {}:\n{}",
                req.describe(),
                format_exception(py, &e)
            );
        }
        true
    }

    fn send_body(
        &self,
        py: Python<'_>,
        req: &Request<'_>,
        ex: &Exchange,
        result: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        // The common case: a list holding the whole body, sent with its length in one write.
        // Only a plain list: a subclass may iterate as it likes.
        if let Ok(list) = result.downcast_exact::<PyList>() {
            if list.len() == 1 {
                let item = list.get_item(0)?;
                if let Ok(b) = item.downcast::<PyBytes>() {
                    return body_write(ex, b.as_bytes(), true);
                }
            }
        }
        if let Ok(fw) = result.downcast::<FileWrapper>() {
            if sendfile(py, ex, &fw.borrow())? {
                return Ok(());
            }
        }
        // Once the body is complete the iterable gets one more turn, so a
        // generator's code after its last yield still runs; an item there
        // ends the iteration (and close() follows), as PEP 3333 allows: an
        // endless stream answering HEAD, or running past its Content-Length,
        // would otherwise hold this thread after its client has gone.
        let mut complete = false;
        let items = result.try_iter().map_err(|e| {
            if e.is_instance_of::<PyTypeError>(py) {
                PyTypeError::new_err(format!(
                    "the application returned a {} object, not an iterable of bytes",
                    type_name(result)
                ))
            } else {
                e
            }
        })?;
        for item in items {
            // The app forked inside its iterable: the child leaves before it
            // writes, or reports an error, on the parent's connection.
            self.leave_if_forked(req);
            let item = item?;
            let b = item.downcast::<PyBytes>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "the response iterable yielded a {} object; WSGI bodies are bytes",
                    item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                ))
            })?;
            let data = b.as_bytes();
            if complete {
                if !data.is_empty() {
                    // Dropped, and past a Content-Length noted as such.
                    body_write(ex, data, false)?;
                }
                break;
            }
            if data.is_empty() {
                continue;
            }
            body_write(ex, data, false)?;
            complete = ex.body_complete();
        }
        Ok(())
    }

    /// Logs an exception from the app and answers 500 if nothing was sent yet;
    /// otherwise the connection is reset so the client sees the failure.
    fn app_error(&self, py: Python<'_>, req: &Request<'_>, ex: &Exchange, e: &PyErr) {
        let what = req.describe();
        if e.is_instance_of::<ClientDisconnected>(py) {
            // A body cut short is logged once by the engine, with the peer
            // and how much was missing.
            if ex.body_error() != Some(BodyError::Truncated) && !ex.front_end_aborted() {
                let why = e.value(py).to_string();
                if why == corral_engine::exchange::STALLED_READER {
                    info!("{what} from {}: {why}", req.peer());
                    ex.stall_logged();
                } else if !corral_engine::worker::cut_at_exit() {
                    // (A cut as the worker exits is logged as such already.)
                    info!("{what} from {}: client disconnected ({why})", req.peer());
                }
            }
            // A client that closed only its sending side, short of its body,
            // may still read: it is told 400, as nginx tells it, where a reset
            // would look like a server fault.
            if ex.body_error() == Some(BodyError::Truncated) && !ex.headers_sent() {
                respond_error(ex, 400);
            } else {
                ex.abort();
            }
            return;
        }
        // Only the body error itself, or what the app raised `from` it
        // (Django's UnreadablePostError): an app that caught it and then
        // failed in some other way has a bug of its own to be shown.
        if let Some(be) = ex.body_error().filter(|_| raised_for_body(py, e)) {
            // A broken FastCGI stream is the front end's fault: the engine
            // logs it once, with the peer, when it closes the connection.
            if !matches!(be, BodyError::Gateway(_) | BodyError::Aborted) && !ex.failure_noted() {
                info!("{what} from {}: {be}", req.peer());
            }
            if !ex.headers_sent() {
                respond_error(ex, be.status());
            } else {
                ex.abort();
            }
            return;
        }
        let text = format_exception(py, e);
        corral_engine::worker::note_exception(&exception_summary(py, e));
        // A whole response stands (see Exchange::abort): the log says so,
        // since the client saw no failure.
        let whole = if ex.body_complete() { " (its response had gone out whole, and stands)" } else { "" };
        error!("Error handling request {what}{whole}:\n{text}");
        if ex.headers_sent() {
            ex.abort();
        } else {
            respond_error(ex, 500);
        }
    }
}

/// Calls the response iterable's close(), if it has one (PEP 3333).
fn close_iterable(py: Python<'_>, result: &Bound<'_, PyAny>) -> PyResult<()> {
    // Lists and tuples have no close(); asking would build an AttributeError per request.
    if result.is_exact_instance_of::<PyList>() || result.is_exact_instance_of::<PyTuple>() {
        return Ok(());
    }
    match result.getattr(pyo3::intern!(py, "close")) {
        Ok(close) => close.call0().map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// Whether `e` is the error a read of the request body raised, or was
/// raised `from` one (its `__cause__` chain, not the `__context__` that any
/// exception raised while handling it gets).
fn raised_for_body(py: Python<'_>, e: &PyErr) -> bool {
    let mut current = Some(e.value(py).clone().into_any());
    for _ in 0..16 {
        let Some(ex) = current else { return false };
        if ex.is_instance_of::<InvalidRequestBody>() || ex.is_instance_of::<ClientDisconnected>() {
            return true;
        }
        current = ex.getattr("__cause__").ok().filter(|c| !c.is_none());
    }
    false
}

fn respond_error(ex: &Exchange, status: u16) {
    let reason = corral_engine::worker::reason(status);
    let body = format!("{status} {reason}\n");
    let _ = ex.start(format!("{status} {reason}").as_bytes());
    let _ = ex.header(b"Content-Type", b"text/plain; charset=utf-8");
    let _ = ex.write(body.as_bytes(), true);
}

fn write(ex: &Exchange, data: &[u8], last: bool) -> PyResult<()> {
    ex.write(data, last).map_err(response_error)
}

/// A piece of the response iterable.
fn body_write(ex: &Exchange, data: &[u8], last: bool) -> PyResult<()> {
    ex.write(data, last).map_err(iterable_error)
}

fn iterable_error(e: ResponseError) -> PyErr {
    match e {
        ResponseError::NotStarted => PyAssertionError::new_err(
            "the response iterable gave body bytes before start_response() was called",
        ),
        other => response_error(other),
    }
}

fn response_error(e: ResponseError) -> PyErr {
    match e {
        ResponseError::ClientGone(m) => ClientDisconnected::new_err(m),
        ResponseError::Invalid(m) => PyValueError::new_err(m),
        ResponseError::NotStarted => PyAssertionError::new_err("write() before start_response()"),
        other => PyValueError::new_err(other.to_string()),
    }
}

fn body_error(e: BodyError) -> PyErr {
    match e {
        BodyError::Truncated | BodyError::Io(_) => ClientDisconnected::new_err(e.to_string()),
        _ => InvalidRequestBody::new_err(e.to_string()),
    }
}

/// The cached Python string for `name`, if any. The lock is held for the
/// lookup only: nothing under it allocates Python objects.
fn cached<'py>(cache: &Mutex<KeyCache>, py: Python<'py>, name: &[u8]) -> Option<Bound<'py, PyString>> {
    cache.lock().unwrap_or_else(|p| p.into_inner()).get(name).map(|k| k.bind(py).clone())
}

/// The Python string `text` for a name not cached yet, interned and cached
/// while the cache has room (up to MAX_CACHED_KEYS names); past that a
/// plain string, so names a client makes up cannot grow the interpreter's
/// table of interned strings without bound.
fn new_key<'py>(cache: &Mutex<KeyCache>, py: Python<'py>, name: &[u8], text: &str) -> Bound<'py, PyString> {
    let room = cache.lock().unwrap_or_else(|p| p.into_inner()).len() < MAX_CACHED_KEYS;
    if !room {
        return PyString::new(py, text);
    }
    let s = PyString::intern(py, text);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() < MAX_CACHED_KEYS {
        cache.insert(name.into(), s.clone().unbind());
    }
    s
}

/// A Host value's name and port: `name`, `name:port`, `[v6]` or `[v6]:port`.
fn split_host(host: &[u8]) -> (&[u8], Option<&[u8]>) {
    let colon = if host.first() == Some(&b'[') {
        host.iter()
            .position(|&b| b == b']')
            .and_then(|end| (host.get(end + 1) == Some(&b':')).then_some(end + 1))
    } else {
        host.iter().rposition(|&b| b == b':')
    };
    match colon {
        Some(i) if i + 1 < host.len() => (&host[..i], Some(&host[i + 1..])),
        Some(i) => (&host[..i], None),
        None => (host, None),
    }
}

/// Bytes to `str` as ISO-8859-1, as PEP 3333 maps them.
fn latin1<'py>(py: Python<'py>, b: &[u8]) -> Bound<'py, PyString> {
    if b.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        return PyString::new(py, unsafe { std::str::from_utf8_unchecked(b) });
    }
    unsafe {
        let p = ffi::PyUnicode_DecodeLatin1(b.as_ptr().cast(), b.len() as ffi::Py_ssize_t, std::ptr::null());
        Bound::from_owned_ptr(py, p).downcast_into_unchecked()
    }
}

/// A `str` as ISO-8859-1 bytes, borrowed when it is ASCII (the usual case).
/// `what` names the value in the error, built only when there is one.
fn latin1_bytes<'a>(s: &'a Bound<'_, PyAny>, what: &dyn Fn() -> String) -> PyResult<Cow<'a, [u8]>> {
    let s = s
        .downcast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("{} must be a str, got {}", what(), type_name(s))))?;
    let text = s.to_str()?;
    if text.is_ascii() {
        return Ok(Cow::Borrowed(text.as_bytes()));
    }
    text.chars()
        .map(|c| {
            u8::try_from(c as u32)
                .map_err(|_| PyValueError::new_err(format!("{} {text:?} is not latin-1", what())))
        })
        .collect::<PyResult<Vec<u8>>>()
        .map(Cow::Owned)
}

/// An exception as /stats shows the last one: "ValueError: message", its
/// message whole (the last line of its traceback may be a line of the
/// message, or a note), at most [`SUMMARY_MAX`] bytes of it.
fn exception_summary(py: Python<'_>, e: &PyErr) -> String {
    let name = e.get_type(py).qualname().map(|n| n.to_string()).unwrap_or_default();
    let message = e.value(py).str().map(|m| m.to_string()).unwrap_or_default();
    let mut summary = if message.is_empty() { name } else { format!("{name}: {message}") };
    if summary.len() > SUMMARY_MAX {
        let cut = (0..=SUMMARY_MAX).rev().find(|&i| summary.is_char_boundary(i)).unwrap_or(0);
        summary.truncate(cut);
        summary.push_str("...");
    }
    summary
}

/// How much of an exception's message /stats keeps.
const SUMMARY_MAX: usize = 500;

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type().name().map(|n| n.to_string()).unwrap_or_default()
}

/// Whether what `read()` returns is the bytes of the descriptor `fileno()`
/// names: a binary file from `open()`. A gzip, bz2 or lzma file (or any
/// wrapper) has the descriptor of the file it decodes, whose bytes are not
/// the response: it is iterated instead.
fn reads_its_descriptor(py: Python<'_>, file: &Bound<'_, PyAny>) -> bool {
    let Ok(io) = py.import("io") else { return false };
    let is = |o: &Bound<'_, PyAny>, class: &str| io.getattr(class).ok().is_some_and(|c| o.get_type().is(&c));
    if is(file, "FileIO") {
        return true;
    }
    if is(file, "TextIOWrapper") {
        // A file opened in text mode (`open(path)`): its bytes go out as they
        // are on disk, as uWSGI's sendfile sends them (gunicorn refuses such
        // a file), when nothing of it was read (a text position is no byte
        // offset).
        return file.getattr(pyo3::intern!(py, "buffer")).is_ok_and(|b| reads_its_descriptor(py, &b))
            && file
                .call_method0(pyo3::intern!(py, "tell"))
                .and_then(|t| t.extract::<i64>())
                .is_ok_and(|t| t == 0);
    }
    (is(file, "BufferedReader") || is(file, "BufferedRandom"))
        && file.getattr(pyo3::intern!(py, "raw")).is_ok_and(|raw| is(&raw, "FileIO"))
}

/// Whether the file is on a filesystem whose sizes are not its files'
/// contents (sysfs gives 4096 for a file of 20 bytes): such a file is
/// iterated to its end, not announced by its size.
fn on_pseudo_fs(fd: i32) -> bool {
    const PSEUDO: &[i64] = &[
        0x6265_6572, // sysfs
        0x9fa0,      // proc
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0x6265_6570, // configfs
        0x0027_e0eb, // cgroup
        0x6367_7270, // cgroup2
        0xcafe_4a11, // bpf
        0x6e73_6673, // nsfs
    ];
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::fstatfs(fd, &mut fs) } == 0;
    ok && PSEUDO.contains(&(fs.f_type as i64))
}

/// Sends a file_wrapper's file with sendfile(2) when it is a regular file;
/// the rest of a file a slow client cannot take at once is sent by the
/// worker's offload thread.
fn sendfile(py: Python<'_>, ex: &Exchange, fw: &FileWrapper) -> PyResult<bool> {
    let file = fw.filelike.bind(py);
    if !reads_its_descriptor(py, file) {
        return Ok(false);
    }
    let Ok(fileno) = file.getattr(pyo3::intern!(py, "fileno")) else { return Ok(false) };
    let Ok(fd) = fileno.call0().and_then(|f| f.extract::<i32>()) else { return Ok(false) };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // A size of 0 may be a file whose size the kernel does not know
    // (/proc, /sys): iterating reads what it has. So may a size of one
    // page, which sysfs and configfs give every file; only then is the
    // filesystem looked up.
    if unsafe { libc::fstat(fd, &mut st) } < 0
        || (st.st_mode & libc::S_IFMT) != libc::S_IFREG
        || st.st_size == 0
        || (st.st_size == unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64 && on_pseudo_fs(fd))
    {
        return Ok(false);
    }
    let offset: i64 = match file.getattr(pyo3::intern!(py, "tell")) {
        Ok(tell) => tell.call0()?.extract()?,
        Err(_) => 0,
    };
    let count = (st.st_size - offset).max(0) as u64;
    // A descriptor of its own: what the socket cannot take at once goes out
    // after the app returned and closed the iterable (and the file with it).
    let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if own < 0 {
        ex.sendfile(fd, offset, count).map_err(iterable_error)?;
        return Ok(true);
    }
    let own = unsafe { OwnedFd::from_raw_fd(own) };
    ex.send_file(own, offset, count).map_err(iterable_error)?;
    Ok(true)
}

impl App for WsgiApp {
    type Thread = PyThread;

    fn thread_start(&self, t: usize) -> PyThread {
        // Creates this thread's Python state, which it keeps for good.
        let tstate = unsafe {
            ffi::PyGILState_Ensure();
            // Named for logging's %(threadName)s, which would say "Dummy-1"
            // for a thread Python did not start.
            let py = Python::assume_gil_acquired();
            // (A failure leaves the name as it was; its error is dropped here.)
            // Not a daemon either, unlike other threads Python did not start:
            // a thread the app starts in a request inherits that, and must be
            // waited for at exit as under gunicorn, whose request threads are
            // not daemons (mail sent in the background would be cut off).
            let _ = py.import("threading").and_then(|m| m.call_method0("current_thread")).and_then(|th| {
                th.setattr("name", format!("corral-thread-{}", t + 1))?;
                th.setattr("_daemonic", false)
            });
            ffi::PyEval_SaveThread()
        };
        let mut states = self.thread_states.lock().unwrap_or_else(|p| p.into_inner());
        if states.len() <= t {
            states.resize(t + 1, 0);
        }
        states[t] = tstate as usize;
        PyThread { tstate, index: t, shape: None }
    }

    fn call(&self, thread: &mut PyThread, req: &Request<'_>, ex: &mut Exchange) {
        let wait = self.gil_waits.get(thread.index);
        if let Some(since) = wait {
            since.store(corral_engine::date::mono_ms().max(1), Ordering::Relaxed);
        }
        unsafe { ffi::PyEval_RestoreThread(thread.tstate) };
        if let Some(since) = wait {
            since.store(0, Ordering::Relaxed);
            self.gil_taken.store(corral_engine::date::mono_ms(), Ordering::Relaxed);
        }
        Python::with_gil(|py| self.serve(py, req, ex, &mut thread.shape));
        thread.tstate = unsafe { ffi::PyEval_SaveThread() };
    }

    fn stalled(&self) -> bool {
        // Not while threads take turns with it, however long a turn lasts
        // (C code holding it 100 ms at a time, a long garbage collection):
        // only while none got it for that long.
        if self.gil_waits.is_empty() {
            return false;
        }
        let now = corral_engine::date::mono_ms();
        let limit = GIL_STALL.as_millis() as u64;
        if now < self.gil_taken.load(Ordering::Relaxed) + limit {
            return false;
        }
        self.gil_waits.iter().any(|since| {
            let since = since.load(Ordering::Relaxed);
            since != 0 && now >= since + limit
        })
    }

    fn thread_traceback(&self, t: usize) -> Option<String> {
        let tstate = *self.thread_states.lock().unwrap_or_else(|p| p.into_inner()).get(t)?;
        crate::traceback::thread_stack(tstate as *mut libc::c_void)
    }

    fn blocking(f: &mut dyn FnMut()) {
        // Called only on a thread running Python code, which holds the GIL.
        without_gil(f)
    }
}

/// Runs `f` with the GIL released, and takes it back even if `f` panics: a
/// panic is turned into a Python exception by pyo3's trampoline further up,
/// and Python code must never go on without the GIL.
///
/// The calling thread must hold the GIL. `Python::allow_threads` would do
/// the same, but it wants a `Send` closure, and the engine's waits are not.
pub(crate) fn without_gil(f: &mut dyn FnMut()) {
    struct Retake(*mut ffi::PyThreadState);
    impl Drop for Retake {
        fn drop(&mut self) {
            // SAFETY: the state saved below, by this thread, is restored once.
            unsafe { ffi::PyEval_RestoreThread(self.0) };
        }
    }
    // SAFETY: the caller holds the GIL (see above), which this releases.
    let _retake = Retake(unsafe { ffi::PyEval_SaveThread() });
    f();
}

/// The `start_response` callable.
#[pyclass(module = "corral._corral")]
pub struct StartResponse {
    ex: Exchange,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn __call__(
        &self,
        py: Python<'_>,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<Write>> {
        let ex = &self.ex;
        match exc_info.filter(|e| !e.is_none()) {
            Some(info) => {
                if ex.headers_sent() {
                    // PEP 3333: too late to change the response; re-raise the app's error.
                    let value = info.get_item(1)?;
                    return Err(PyErr::from_value(value));
                }
            }
            None => {
                if ex.started() {
                    return Err(PyAssertionError::new_err(
                        "start_response() called a second time without exc_info",
                    ));
                }
            }
        }
        let status = latin1_bytes(status, &|| "status".into())?;
        ex.start(&status).map_err(response_error)?;
        let set = Self::set_headers(ex, headers);
        if set.is_err() {
            ex.unstart();
        }
        set?;
        Py::new(py, Write { ex: ex.clone() })
    }
}

impl StartResponse {
    /// PEP 3333 asks for a list of (name, value) tuples. Other sequences of
    /// pairs are taken as well, as gunicorn takes them: apps written against
    /// it pass lists of lists or tuples of tuples, and refusing them would
    /// turn working pages into 500s. A str, bytes or dict is refused, as
    /// iterating one yields characters or keys, never pairs.
    fn set_headers(ex: &Exchange, headers: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(list) = headers.downcast::<PyList>() {
            return list.iter().try_for_each(|item| Self::set_header(ex, &item));
        }
        if let Ok(tuple) = headers.downcast::<PyTuple>() {
            return tuple.iter().try_for_each(|item| Self::set_header(ex, &item));
        }
        let refused = || {
            PyTypeError::new_err(format!(
                "headers must be a list of (name, value) tuples, got {}",
                type_name(headers)
            ))
        };
        if headers.is_instance_of::<PyString>()
            || headers.is_instance_of::<PyBytes>()
            || headers.is_instance_of::<PyDict>()
        {
            return Err(refused());
        }
        let items = headers.try_iter().map_err(|_| refused())?;
        for item in items {
            Self::set_header(ex, &item?)?;
        }
        Ok(())
    }

    fn set_header(ex: &Exchange, item: &Bound<'_, PyAny>) -> PyResult<()> {
        let (name, value) = if let Ok(pair) = item.downcast::<PyTuple>() {
            if pair.len() != 2 {
                return Err(Self::not_a_pair(item));
            }
            (pair.get_item(0)?, pair.get_item(1)?)
        } else if let Ok(pair) = item.downcast::<PyList>() {
            if pair.len() != 2 {
                return Err(Self::not_a_pair(item));
            }
            (pair.get_item(0)?, pair.get_item(1)?)
        } else {
            return Err(Self::not_a_pair(item));
        };
        let name = latin1_bytes(&name, &|| "header name".into())?;
        let value =
            latin1_bytes(&value, &|| format!("value of header {:?}", String::from_utf8_lossy(&name)))?;
        ex.header(&name, &value).map_err(response_error)
    }

    fn not_a_pair(item: &Bound<'_, PyAny>) -> PyErr {
        let what = match item.len() {
            Ok(n) if item.is_instance_of::<PyTuple>() || item.is_instance_of::<PyList>() => {
                format!("{} of {n} items", type_name(item))
            }
            _ => type_name(item),
        };
        PyTypeError::new_err(format!("each header must be a (name, value) tuple of two str, got {what}"))
    }
}

/// The `write()` callable start_response returns.
#[pyclass(module = "corral._corral")]
pub struct Write {
    ex: Exchange,
}

#[pymethods]
impl Write {
    fn __call__(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let b = data
            .downcast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err(format!("write() takes bytes, got {}", type_name(data))))?;
        if !b.as_bytes().is_empty() && self.ex.finished() {
            // From the iterable's close(), say: the response went out whole
            // already, and bytes dropped without a word would be a mystery.
            return Err(PyRuntimeError::new_err(
                "write() called after the response ended (its iterable was done): the bytes cannot be sent",
            ));
        }
        write(&self.ex, b.as_bytes(), false)
    }
}

/// `wsgi.input`: the request body, read on demand from the connection.
#[pyclass(module = "corral._corral")]
pub struct Input {
    ex: Exchange,
    max: u64,
}

/// Reads up to `n` body bytes into a new bytes object without an
/// intermediate buffer.
fn read_into_bytes<'py>(py: Python<'py>, ex: &Exchange, n: usize) -> PyResult<Bound<'py, PyBytes>> {
    if n == 0 {
        return Ok(PyBytes::new(py, b""));
    }
    unsafe {
        let mut obj = ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as ffi::Py_ssize_t);
        if obj.is_null() {
            return Err(PyErr::fetch(py));
        }
        let dst = std::slice::from_raw_parts_mut(ffi::PyBytes_AsString(obj) as *mut u8, n);
        let got = match ex.read_exact_or_end(dst) {
            Ok(got) => got,
            Err(e) => {
                ffi::Py_DECREF(obj);
                return Err(body_error(e));
            }
        };
        if got < n && ffi::_PyBytes_Resize(&mut obj, got as ffi::Py_ssize_t) < 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, obj).downcast_into_unchecked())
    }
}

fn size_arg(size: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    match size {
        None => Ok(None),
        Some(s) if s.is_none() => Ok(None),
        Some(s) => {
            let n: i64 = s.extract()?;
            Ok((n >= 0).then_some(n as usize))
        }
    }
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size = None))]
    fn read<'py>(&self, py: Python<'py>, size: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyBytes>> {
        let asked = size_arg(size)?;
        let remaining = self.ex.remaining_hint();
        // Read straight into one bytes object when the size is known and
        // modest; a declared length is the client's word, so a large one is
        // read into a buffer that grows with what actually arrives.
        let direct = match (asked, remaining) {
            (Some(n), Some(r)) => Some((n as u64).min(r)),
            (Some(n), None) => Some(n as u64),
            (None, r) => r,
        };
        match direct {
            Some(n) if n <= DIRECT_READ_MAX => read_into_bytes(py, &self.ex, n as usize),
            _ => {
                // One byte past the limit: a body longer than --max-body-size
                // then fails here instead of stopping short without a word.
                let limit =
                    asked.map_or(self.max.saturating_add(1), |n| n as u64).min(usize::MAX as u64) as usize;
                let mut out = Vec::new();
                self.ex.read_to_end(&mut out, limit).map_err(body_error)?;
                Ok(PyBytes::new(py, &out))
            }
        }
    }

    #[pyo3(signature = (size = None))]
    fn readline<'py>(
        &self,
        py: Python<'py>,
        size: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let max = size_arg(size)?.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        self.ex.read_line(&mut out, max).map_err(body_error)?;
        Ok(PyBytes::new(py, &out))
    }

    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(
        &self,
        py: Python<'py>,
        hint: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let hint = size_arg(hint)?.filter(|&h| h > 0).unwrap_or(usize::MAX);
        let lines = PyList::empty(py);
        let mut total = 0;
        loop {
            let mut out = Vec::new();
            if self.ex.read_line(&mut out, usize::MAX).map_err(body_error)? == 0 {
                break;
            }
            total += out.len();
            lines.append(PyBytes::new(py, &out))?;
            if total >= hint {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let mut out = Vec::new();
        if self.ex.read_line(&mut out, usize::MAX).map_err(body_error)? == 0 {
            return Ok(None);
        }
        Ok(Some(PyBytes::new(py, &out)))
    }
}

/// `wsgi.errors`: text written here goes to the server's error log, a whole
/// line at a time (see [`crate::logging::app_error_text`]). It answers what
/// code that puts it in place of `sys.stderr` asks of a text stream.
#[pyclass(module = "corral._corral")]
pub struct ErrorStream {}

#[pymethods]
impl ErrorStream {
    fn write(&self, s: &Bound<'_, PyAny>) -> PyResult<usize> {
        let Ok(s) = s.downcast::<PyString>() else {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "write() argument must be str, not {}",
                s.get_type().name()?
            )));
        };
        crate::logging::app_error_text(&crate::logging::log_text(s));
        s.len()
    }

    fn flush(&self) {
        crate::logging::app_error_flush_from_app();
    }

    fn writelines(&self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            self.write(&line?)?;
        }
        Ok(())
    }

    fn isatty(&self) -> bool {
        false
    }

    fn writable(&self) -> bool {
        true
    }

    fn readable(&self) -> bool {
        false
    }

    fn seekable(&self) -> bool {
        false
    }

    #[getter]
    fn closed(&self) -> bool {
        false
    }

    fn fileno(&self, py: Python<'_>) -> PyResult<i32> {
        let unsupported = py.import("io")?.getattr("UnsupportedOperation")?;
        Err(PyErr::from_value(unsupported.call1(("wsgi.errors has no file descriptor",))?))
    }
}

/// `wsgi.file_wrapper`: regular files go out with sendfile(2); anything else
/// is read in `blksize` blocks, passed to its `read()` as given (a negative
/// one reads the rest at once), as wsgiref's wrapper does; `filelike` and
/// `blksize` are readable as there. It may be subclassed, as gunicorn's
/// can; a subclass's instances go out as the wrapper's do (as in gunicorn).
#[pyclass(module = "corral._corral", subclass)]
pub struct FileWrapper {
    #[pyo3(get)]
    filelike: PyObject,
    #[pyo3(get)]
    blksize: isize,
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize = 8192))]
    fn new(filelike: PyObject, blksize: isize) -> Self {
        FileWrapper { filelike, blksize }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let data = self.filelike.bind(py).call_method1(pyo3::intern!(py, "read"), (self.blksize,))?;
        if data.len()? == 0 {
            return Ok(None);
        }
        Ok(Some(data))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let f = self.filelike.bind(py);
        if let Ok(close) = f.getattr(pyo3::intern!(py, "close")) {
            close.call0()?;
        }
        Ok(())
    }
}

/// The prefix a trusted proxy named in a `SCRIPT_NAME` field (the last one),
/// its trailing `/` left out; None when empty.
fn forwarded_prefix<'b>(head: &corral_proto::http1::Head, bytes: &'b [u8]) -> Option<&'b [u8]> {
    let field = head.fields.iter().rev().find(|f| f.known == Known::ScriptName)?;
    let value = &bytes[field.value.clone()];
    let value = value.strip_suffix(b"/").unwrap_or(value);
    (!value.is_empty()).then_some(value)
}
