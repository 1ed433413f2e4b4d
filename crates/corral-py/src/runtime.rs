//! The embedding side of the master: what happens around each fork, how the
//! master waits without holding the GIL, and how a worker loads the app,
//! serves, and exits.

use std::ffi::CString;

use pyo3::ffi;
use pyo3::prelude::*;
use tracing::{error, info, warn};

use corral_engine::supervise::{Event, Hooks, EXIT_APP_LOAD_FAILED};
use corral_engine::{run_worker, Config, WorkerCtx};

use crate::load::{load_app, AppSpec};
use crate::server_hooks::{RequestHooks, ServerHooks, WorkerInfo};
use crate::wsgi::WsgiApp;

/// How long the master waits for the new program to check its configuration
/// before a re-exec (HUP after a configuration change, USR2), supervising
/// nothing meanwhile.
const REEXEC_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Runtime {
    spec: AppSpec,
    preloaded: Option<PyObject>,
    /// --preload was asked for (even if the app failed to preload after a
    /// re-exec, a reload re-executes to try again).
    preload: bool,
    mount: String,
    /// The app's directory as named (symlinks unresolved), for each worker
    /// to enter: --chdir, else the directory the master started in.
    chdir: Option<AppDir>,
    multiprocess: bool,
    multithread: bool,
    /// sys.executable and sys.orig_argv: how to start this master again.
    reexec: Reexec,
    /// A gunicorn configuration file's server hooks.
    hooks: ServerHooks,
    /// The pool's size as the hooks' `server.num_workers` says it.
    num_workers: std::cell::Cell<usize>,
    name: String,
    max_requests: u64,
    timeout: u64,
    /// In a worker: its `server` and `worker` objects, for the hooks it runs
    /// as it exits.
    this_worker: std::cell::OnceCell<(PyObject, PyObject)>,
    /// --reload: a worker whose import of the app fails serves the error as
    /// a 500 until a change to the code reloads it, where it would exit
    /// (and a server that had not started yet would stop).
    serve_load_errors: bool,
}

/// What a re-exec of the master needs to start the same program again.
pub struct Reexec {
    /// sys.executable and sys.orig_argv.
    pub exe: String,
    pub argv: Vec<String>,
    /// The directory corral was started in (before --chdir).
    pub start_dir: Option<std::path::PathBuf>,
    /// The --config file (and the files a uWSGI ini file includes) and what
    /// each held when this program read it: a reload re-executes the master
    /// when one changed, as gunicorn's HUP reloads its configuration.
    pub config_files: Vec<(std::path::PathBuf, Vec<u8>)>,
    /// The socket-activation descriptors (and names) the listeners came
    /// from, handed to the new program the way the service manager did.
    pub listen_fds: Vec<(i32, Option<String>)>,
    /// This program's pid file: the next program removes it if it writes
    /// another (the configuration changed it), so none is left behind.
    pub pidfile: Option<std::path::PathBuf>,
    /// With a gunicorn configuration file (Python, which may read what it
    /// sets from elsewhere: a file, the environment), the settings this
    /// program runs with, as --print-config shows them: a reload runs the
    /// file again, as gunicorn's HUP does, and re-executes the master when
    /// what it gives changed, though the file's own text did not.
    pub settings: Option<String>,
}

impl Runtime {
    /// The settings a new program would run with now (see
    /// [`Reexec::settings`]): its --print-config, run as a re-exec would run
    /// it. None when it fails or takes longer than a check may.
    fn settings_now(&self) -> Option<String> {
        // In the environment the re-exec would give it.
        let printed = self.print_config(&crate::cli::env_before_settings()).ok()?;
        printed.status.filter(|s| s.success())?;
        String::from_utf8(printed.stdout).ok()
    }

    /// Runs the program a re-exec would run (from the directory of the first
    /// start) with --print-config, which checks without creating or binding
    /// anything, and `env` set (None: removed): its exit status, None when
    /// it took longer than [`REEXEC_CHECK_TIMEOUT`] (and was killed), and
    /// what it wrote to stdout and stderr.
    fn print_config(&self, env: &[(String, Option<String>)]) -> Result<Printed, String> {
        let (exe, orig) = (&self.reexec.exe, &self.reexec.argv);
        let mut run = std::process::Command::new(exe);
        run.args(orig.get(1..).unwrap_or_default()).arg("--print-config");
        for (k, v) in env {
            match v {
                Some(v) => run.env(k, v),
                None => run.env_remove(k),
            };
        }
        if let Some(dir) = &self.reexec.start_dir {
            run.current_dir(dir);
        }
        let mut child = run
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| match &self.reexec.start_dir {
                // The directory of the first start may be one the user of
                // --user cannot enter.
                Some(dir) => format!("cannot run {exe} in {} to check it: {e}", dir.display()),
                None => format!("cannot run {exe} to check it: {e}"),
            })?;
        // Read meanwhile, so that a program saying much cannot fill a pipe
        // and wait on it; the threads end with the child's pipes.
        let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut said = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut said);
                }
                said
            })
        };
        let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
        let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
        // The master supervises nothing while it waits here: a configuration
        // file that hangs (a secret fetched from the network, a lock) must
        // not take the service down with it.
        let deadline = std::time::Instant::now() + REEXEC_CHECK_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        Ok(Printed {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

/// What a [`Runtime::print_config`] run gave: its exit status (None when it
/// took too long and was killed), and what it wrote.
struct Printed {
    status: Option<std::process::ExitStatus>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// The directory each worker enters before it imports the app, as named
/// (symlinks unresolved): a reload after a deploy that switched a
/// `current -> releases/N` link, or moved a new release into the place of
/// the old one, then serves the new release in its own directory.
pub enum AppDir {
    /// --chdir: a worker that cannot enter it fails to boot.
    Chdir(std::path::PathBuf),
    /// The directory the master started in, as gunicorn takes it from $PWD.
    Started(std::path::PathBuf),
}

/// The pid file of the program a re-exec replaced (see [`Reexec::pidfile`]).
pub const PREVIOUS_PIDFILE_ENV: &str = "CORRAL_PREVIOUS_PIDFILE";

impl Runtime {
    pub fn new(
        spec: AppSpec,
        preloaded: Option<PyObject>,
        preload: bool,
        mount: String,
        chdir: Option<AppDir>,
        config: &Config,
        reexec: Reexec,
    ) -> Runtime {
        Runtime {
            spec,
            preloaded,
            preload,
            mount,
            chdir,
            // Another process may run the app at the same time whenever the
            // pool can hold more than one worker (--workers-max included).
            multiprocess: config.workers.max(config.workers_max.unwrap_or(0)) > 1,
            multithread: config.threads > 1,
            reexec,
            hooks: ServerHooks::default(),
            num_workers: std::cell::Cell::new(config.workers),
            name: config.name.clone(),
            max_requests: config.max_requests.unwrap_or(0),
            timeout: config.timeout.map_or(0, |t| t.as_secs()),
            this_worker: std::cell::OnceCell::new(),
            serve_load_errors: false,
        }
    }

    /// Under --reload: see [`Runtime::serve_load_errors`].
    pub fn serving_load_errors(mut self, on: bool) -> Runtime {
        self.serve_load_errors = on;
        self
    }

    /// The server hooks of a gunicorn configuration file, to run.
    pub fn with_hooks(mut self, hooks: ServerHooks) -> Runtime {
        self.hooks = hooks;
        self
    }

    fn server<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        crate::server_hooks::server(py, std::process::id(), self.num_workers.get(), &self.name)
    }

    /// A `worker` object for the master's hooks.
    fn worker_seen_from_master(
        &self,
        pid: Option<u32>,
        slot: Option<usize>,
        age: Option<u64>,
        booted: bool,
    ) -> WorkerInfo {
        WorkerInfo {
            pid,
            ppid: std::process::id(),
            age,
            slot,
            booted,
            // Not forked yet (pre_fork), or gone (child_exit).
            alive: pid.is_none(),
            max_requests: self.max_requests,
            timeout: self.timeout,
        }
    }

    /// Runs hook `name` with (server, ...rest); false if it raised (logged)
    /// or its objects could not be made.
    fn run_with_server(&self, py: Python<'_>, name: &str, rest: Vec<PyObject>) -> bool {
        if !self.hooks.has(name) {
            return true;
        }
        let server = match self.server(py) {
            Ok(s) => s,
            Err(e) => {
                crate::server_hooks::log_failure(py, name, &e);
                return false;
            }
        };
        let mut args = vec![server.unbind()];
        args.extend(rest);
        match pyo3::types::PyTuple::new(py, args) {
            Ok(t) => self.hooks.run(py, name, t),
            Err(e) => {
                crate::server_hooks::log_failure(py, name, &e);
                false
            }
        }
    }

    /// Runs hook `name` with (server, worker).
    fn run_worker_hook(&self, py: Python<'_>, name: &str, info: &WorkerInfo) -> bool {
        if !self.hooks.has(name) {
            return true;
        }
        match crate::server_hooks::worker(py, info) {
            Ok(w) => self.run_with_server(py, name, vec![w.unbind()]),
            Err(e) => {
                crate::server_hooks::log_failure(py, name, &e);
                false
            }
        }
    }

    /// gunicorn's `on_exit`, as the master leaves.
    pub fn on_exit(&self, py: Python<'_>) {
        self.run_with_server(py, "on_exit", Vec::new());
    }

    /// In a new worker: `post_fork`, then the app, then `post_worker_init`;
    /// the worker's objects are kept for the hooks of its exit.
    fn worker_hooks_start(&self, py: Python<'_>, ctx: &WorkerCtx) -> Result<Option<PyObject>, ()> {
        if self.hooks.is_empty() {
            return Ok(None);
        }
        let info = WorkerInfo {
            pid: Some(std::process::id()),
            ppid: unsafe { libc::getppid() } as u32,
            age: Some(ctx.age),
            slot: Some(ctx.slot),
            booted: false,
            alive: true,
            max_requests: ctx.max_requests.unwrap_or(0),
            timeout: self.timeout,
        };
        let made = crate::server_hooks::worker(py, &info).and_then(|w| {
            // gunicorn's worker copies the arbiter: `server.pid` is the master's.
            let server = crate::server_hooks::server(py, info.ppid, self.num_workers.get(), &self.name)?;
            Ok((server, w))
        });
        let (server, worker) = match made {
            Ok(o) => o,
            Err(e) => {
                crate::server_hooks::log_failure(py, "post_fork", &e);
                return Err(());
            }
        };
        let _ = self.this_worker.set((server.clone().unbind(), worker.clone().unbind()));
        if !self.hooks.run(py, "post_fork", (&server, &worker)) {
            return Err(());
        }
        Ok(Some(worker.unbind()))
    }
}

impl Hooks for Runtime {
    fn before_fork(&self) {
        // The master holds the GIL here (it only lets go inside `unlocked`).
        unsafe { ffi::PyOS_BeforeFork() };
    }

    fn after_fork_parent(&self) {
        unsafe { ffi::PyOS_AfterFork_Parent() };
    }

    fn after_fork_child(&self) {
        unsafe { ffi::PyOS_AfterFork_Child() };
    }

    fn event(&self, e: Event) -> bool {
        if self.hooks.is_empty() {
            return true;
        }
        // The master holds the GIL here, as around a fork.
        Python::with_gil(|py| match e {
            Event::Ready => self.run_with_server(py, "when_ready", Vec::new()),
            Event::Reload => self.run_with_server(py, "on_reload", Vec::new()),
            Event::Reexec => self.run_with_server(py, "pre_exec", Vec::new()),
            Event::PoolSize { new, old } => {
                self.num_workers.set(new);
                let (Ok(new), Ok(old)) = (new.into_pyobject(py), old.into_pyobject(py));
                self.run_with_server(
                    py,
                    "nworkers_changed",
                    vec![new.into_any().unbind(), old.into_any().unbind()],
                )
            }
            Event::Fork { slot, age } => {
                let info = self.worker_seen_from_master(None, Some(slot), Some(age), false);
                self.run_worker_hook(py, "pre_fork", &info)
            }
            Event::WorkerExited { pid, slot, age, booted } => {
                let info = self.worker_seen_from_master(Some(pid as u32), slot, age, booted);
                self.run_worker_hook(py, "child_exit", &info)
            }
        })
    }

    fn unlocked(&self, f: &mut dyn FnMut()) {
        crate::wsgi::without_gil(f)
    }

    fn worker_main(&self, ctx: WorkerCtx) -> i32 {
        crate::logging::set_worker(ctx.slot);
        // Still the GIL-holding main thread, now in the child.
        let py = unsafe { Python::assume_gil_acquired() };
        // Before faulthandler, which passes a crash on to it once it has
        // written the stacks.
        // Enabled already (PYTHONFAULTHANDLER, -X faulthandler, a preloaded
        // app), it would keep the handlers it has and never call this one.
        if let Err(e) = py.import("faulthandler").and_then(|f| f.call_method0("disable")) {
            error!("cannot reset faulthandler: {e}");
        }
        corral_engine::crash::install(holds_gil);
        // Before the import, which --timeout ends with SIGABRT if it hangs.
        enable_faulthandler(py);
        // The master entered --chdir when it started; a deploy may have
        // switched a symlink on the way since. A preloaded app is the code of
        // the directory the master entered, and stays there.
        match (&self.preloaded, &self.chdir) {
            (None, Some(AppDir::Chdir(dir))) => {
                if let Err(e) = std::env::set_current_dir(dir) {
                    error!("--chdir {}: {e}", dir.display());
                    return EXIT_APP_LOAD_FAILED;
                }
            }
            (None, Some(AppDir::Started(dir))) => {
                // Gone (a deploy removed it): the app's imports name it too,
                // and the import says what is missing if anything is.
                if let Err(e) = std::env::set_current_dir(dir) {
                    warn!("Worker {} stays in the master's directory: {}: {e}", ctx.slot, dir.display());
                }
            }
            _ => {}
        }
        // threading takes the thread that first imports it for the main one
        // and waits for it at exit (`_shutdown`): first imported by a serving
        // thread (Flask or Django loaded lazily at the first request), it
        // would make a stop wait for that thread, which never ends.
        if let Err(e) = py.import("threading") {
            error!("cannot import threading: {e}");
        }
        if let Err(e) = py.import("corral._fork").and_then(|m| m.call_method0("register")) {
            error!("cannot set up what a process the app forks needs: {e}");
        }
        let Ok(worker) = self.worker_hooks_start(py, &ctx) else {
            error!("Worker {} could not boot: the `post_fork` hook failed (see above)", ctx.slot);
            return EXIT_APP_LOAD_FAILED;
        };
        let app = match &self.preloaded {
            Some(a) => a.clone_ref(py),
            None => match load_app(py, &self.spec) {
                Ok(a) => a,
                // Only where no sibling serves code that loaded (one serving
                // the error of another edit does not count), nor the workers
                // of the program a --preload reload re-executed from: while
                // one does (an edit saved half-way through a reload), the
                // reload fails as any would, and the old code keeps serving.
                Err(msg)
                    if self.serve_load_errors
                        && !ctx.previous_program_serves
                        && !ctx.scoreboard.other_serves_loaded_code(ctx.slot) =>
                {
                    error!("{msg}");
                    ctx.scoreboard.set_load_error(ctx.slot);
                    match py.import("corral._load_error").and_then(|m| m.call_method1("app_for", (&msg,))) {
                        Ok(app) => {
                            error!(
                                "Worker {} answers every request with 500 and this error until the code is \
                                 fixed: --reload loads it again at the next change",
                                ctx.slot
                            );
                            app.unbind()
                        }
                        Err(e) => {
                            error!("cannot set up the app that reports the error: {e}");
                            return EXIT_APP_LOAD_FAILED;
                        }
                    }
                }
                Err(msg) => {
                    error!("{msg}");
                    return EXIT_APP_LOAD_FAILED;
                }
            },
        };
        match python_handlers_that_never_run(py) {
            Ok(names) if !names.is_empty() => warn!(
                "The app set Python handlers for {} while it loaded; Python runs a signal handler on the main \
                 thread only, which in a worker runs no Python while it serves, so they will not run (a thread, \
                 such as threading.Timer, does what SIGALRM or setitimer would)",
                names.join(", ")
            ),
            _ => {}
        }
        let mut request_hooks = None;
        if let Some(worker) = &worker {
            let worker = worker.bind(py);
            let booted = worker.setattr("booted", true);
            if booted.is_err() || !self.hooks.run(py, "post_worker_init", (worker,)) {
                if let Err(e) = booted {
                    crate::server_hooks::log_failure(py, "post_worker_init", &e);
                }
                error!("Worker {} could not boot: the `post_worker_init` hook failed (see above)", ctx.slot);
                return EXIT_APP_LOAD_FAILED;
            }
            request_hooks = match RequestHooks::new(py, &self.hooks, worker) {
                Ok(h) => h,
                Err(e) => {
                    crate::server_hooks::log_failure(py, "pre_request", &e);
                    return EXIT_APP_LOAD_FAILED;
                }
            };
        }
        // The app, loading, may have set SIGSEGV back to its default (taking
        // faulthandler's handler with it): both go back, faulthandler first
        // in line again, so a crash still shows the Python stacks.
        let faults = corral_engine::crash::restore_if_dropped();
        if !faults.is_empty() {
            if let Err(e) = py.import("faulthandler").and_then(|f| f.call_method0("disable")) {
                error!("cannot reset faulthandler: {e}");
            }
            enable_faulthandler(py);
            warn!(
                "The app set {} back to its default action; corral's crash handler and faulthandler are back \
                 in place, so that a crash is logged with its Python stacks and the worker's other requests \
                 are handed on",
                faults.join(", ")
            );
        }
        let wsgi = match WsgiApp::new(
            py,
            app,
            &ctx,
            &self.mount,
            self.multiprocess,
            self.multithread,
            request_hooks,
        ) {
            Ok(w) => w,
            Err(e) => {
                error!("cannot prepare the WSGI environment: {e}");
                return EXIT_APP_LOAD_FAILED;
            }
        };
        // Serve with the GIL released; worker threads take it per request.
        // allow_threads rather than a bare PyEval_SaveThread: this thread is
        // inside a Python call, so PyO3 would otherwise take the GIL for held
        // and drop the app's objects (when run_worker returns early) with a
        // bare Py_DECREF, which aborts the process.
        py.allow_threads(move || run_worker(wsgi, ctx))
    }

    fn reexec_command(&self) -> Option<(CString, Vec<CString>)> {
        let (exe, orig) = (&self.reexec.exe, &self.reexec.argv);
        if exe.is_empty() || orig.is_empty() {
            return None;
        }
        // A relative --chdir, --pythonpath or app path means what it meant
        // at the first start only from the directory of the first start.
        if let Some(dir) = &self.reexec.start_dir {
            let _ = std::env::set_current_dir(dir);
        }
        let program = CString::new(exe.as_str()).ok()?;
        let mut args = vec![program.clone()];
        for a in &orig[1..] {
            args.push(CString::new(a.as_str()).ok()?);
        }
        Some((program, args))
    }

    fn check_reexec(&self, held: &str) -> Result<(), String> {
        // The new program judges, not this one: after an upgrade it may know
        // options this one does not (or no longer know some). Asked with
        // --print-config, which checks without creating or binding anything,
        // from the directory of the first start, as the re-exec will be.
        let (exe, orig) = (&self.reexec.exe, &self.reexec.argv);
        if exe.is_empty() || orig.is_empty() {
            return Ok(());
        }
        // And that the listeners it would bind anew are free.
        let Printed { status, stderr, .. } =
            self.print_config(&[(corral_engine::supervise::CHECK_BINDS_ENV.into(), Some(held.into()))])?;
        let Some(status) = status else {
            return Err(format!(
                "checking it took longer than {} s (does the configuration file wait on something?), so the \
                 check was stopped",
                REEXEC_CHECK_TIMEOUT.as_secs()
            ));
        };
        if status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&stderr);
        let lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        // The start and the end: a traceback's exception is its last line.
        let said: Vec<&str> = match lines.len() {
            0..=4 => lines,
            n => [&lines[..2], &["..."], &lines[n - 2..]].concat(),
        };
        Err(match said.is_empty() {
            true => format!("it exited with {status}"),
            false => said.join(" / "),
        })
    }

    fn reexec_env(&self) -> Vec<(String, Option<String>)> {
        // What --env (or a config file's env) set goes back to what it was
        // at the first start: the new program applies its configuration
        // again, and a variable taken out of the file must not stay.
        let mut env = crate::cli::env_changes_of_the_import();
        env.extend(crate::cli::env_before_settings());
        if let Some(path) = &self.reexec.pidfile {
            env.push((PREVIOUS_PIDFILE_ENV.into(), Some(path.to_string_lossy().into_owned())));
        }
        env.push((corral_engine::proctitle::NAME_ENV.into(), corral_engine::proctitle::name()));
        let fds = &self.reexec.listen_fds;
        if fds.is_empty() {
            return env;
        }
        // Same pid after execve: the new program takes them as its own.
        let names: Vec<&str> = fds.iter().map(|(_, n)| n.as_deref().unwrap_or("")).collect();
        env.extend([
            ("LISTEN_PID".into(), Some(std::process::id().to_string())),
            ("LISTEN_FDS".into(), Some(fds.len().to_string())),
            ("LISTEN_FDNAMES".into(), Some(names.join(":"))),
        ]);
        env
    }

    fn reload_needs_reexec(&self) -> Option<String> {
        if self.preload {
            return Some("the app was preloaded, so the master re-executes itself to load it anew".into());
        }
        if let Some((path, _)) = self
            .reexec
            .config_files
            .iter()
            .find(|(path, read)| std::fs::read(path).ok().as_ref() != Some(read))
        {
            return Some(format!("{} changed, so the master re-executes itself to read it", path.display()));
        }
        let at_start = self.reexec.settings.as_ref().filter(|_| !self.reexec.exe.is_empty())?;
        let (path, _) = self.reexec.config_files.first()?;
        match self.settings_now() {
            Some(now) if &now != at_start => Some(format!(
                "what {} sets changed, so the master re-executes itself to read it",
                path.display()
            )),
            Some(_) => None,
            // The file no longer runs, or cannot be run from here (the
            // directory of the first start, after --user): its text is as it
            // was, so the reload goes on with the settings it gave.
            None => {
                warn!(
                    "{} was not run again to see whether the settings it gives changed (it failed, or \
                     took longer than {} s): reloading with those it gave at start",
                    path.display(),
                    REEXEC_CHECK_TIMEOUT.as_secs()
                );
                None
            }
        }
    }

    fn worker_exit(&self, code: i32) -> ! {
        // What Python's own exit does, in its order.
        let py = unsafe { Python::assume_gil_acquired() };
        // Not after a failed import: the master is waiting to hear of it,
        // and half an import may have started a thread that never ends.
        let hooked = self.this_worker.get().map(|(s, w)| (s.bind(py), w.bind(py)));
        if let (Some((_, worker)), true) = (&hooked, corral_engine::worker::stopped_at_once()) {
            self.hooks.run(py, "worker_int", (worker,));
        }
        if code != EXIT_APP_LOAD_FAILED {
            wait_for_app_threads(py);
        }
        if let Some((server, worker)) = hooked {
            let _ = worker.setattr("alive", false);
            self.hooks.run(py, "worker_exit", (server, worker));
        }
        let _ = py.import("atexit").and_then(|m| m.call_method0("_run_exitfuncs"));
        let _ = py.import("sys").and_then(|sys| {
            sys.getattr("stdout")?.call_method0("flush")?;
            sys.getattr("stderr")?.call_method0("flush")
        });
        if code != EXIT_APP_LOAD_FAILED && corral_engine::worker::left_idle() {
            // As Python's own exit, and gunicorn's and uWSGI's workers: the
            // modules are torn down, so the app's open files are flushed
            // and closed, and the objects of reference cycles collected,
            // their __del__ run (a NamedTemporaryFile removes its file).
            // Nothing else will run Python here: the serving ended with
            // every thread parked and nothing in flight.
            // The modules are held alive through it: the app's callable and
            // hooks, which this process keeps to its end, hold their module's
            // globals, which outlive a module destroyed before them and then
            // are never cleared. A module still alive has its globals
            // cleared, in the reverse order of the imports.
            if let Ok(modules) = py.import("sys").and_then(|sys| {
                let values = sys.getattr("modules")?.call_method0("values")?;
                py.import("builtins")?.getattr("list")?.call1((values,))
            }) {
                std::mem::forget(modules.unbind());
            }
            unsafe { pyo3::ffi::Py_FinalizeEx() };
        } else {
            // Threads may still be in the app's code, or a crash left the
            // interpreter in doubt: finalizing under them could hang or end
            // them mid-request. Cycles are still collected.
            let _ = py.import("gc").and_then(|gc| gc.call_method0("collect"));
        }
        unsafe { libc::_exit(code) }
    }
}

/// The threads the app started that are alive, those without `daemon=True`
/// only if `non_daemon_only`: not the main thread, nor threads Python did
/// not start (the serving threads, dummies to it).
pub(crate) fn app_threads<'py>(
    threading: &Bound<'py, PyAny>,
    non_daemon_only: bool,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let main = threading.call_method0("main_thread")?;
    let dummy = threading.getattr("_DummyThread")?;
    let mut threads = Vec::new();
    for t in threading.call_method0("enumerate")?.try_iter()? {
        let t = t?;
        if !t.is(&main)
            && !t.is_instance(&dummy)?
            && (!non_daemon_only || !t.getattr("daemon")?.is_truthy()?)
            && t.call_method0("is_alive")?.is_truthy()?
        {
            threads.push(t);
        }
    }
    Ok(threads)
}

/// The names of `threads`, for the log.
pub(crate) fn thread_names(threads: &[Bound<'_, PyAny>]) -> Vec<String> {
    threads.iter().map(|t| t.getattr("name").map_or_else(|_| "?".to_string(), |n| n.to_string())).collect()
}

/// Waits for the threads the app started without `daemon=True`, as Python
/// does before it exits (`threading._shutdown`, which also runs what
/// `concurrent.futures` registered to finish its queued work): the app means
/// them to finish. The master stops waiting at --graceful-timeout.
fn wait_for_app_threads(py: Python<'_>) {
    let Ok(Some(threading)) = py
        .import("sys")
        .and_then(|sys| sys.getattr("modules")?.call_method1("get", ("threading",))?.extract())
    else {
        return;
    };
    let threading: Bound<'_, PyAny> = threading;
    let names = app_threads(&threading, true).map(|t| thread_names(&t)).unwrap_or_default();
    if !names.is_empty() {
        info!(
            "Worker waiting for {} thread{} the app started (not daemon) to finish before it exits: {}",
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        );
    }
    if let Err(e) = threading.call_method0("_shutdown") {
        error!("waiting for the app's threads: {e}");
    }
}

/// Whether the calling thread holds the GIL; called in a signal handler, on
/// a thread that crashed. PyGILState_Check only loads the interpreter's
/// current thread state and the thread's own.
fn holds_gil() -> bool {
    unsafe { ffi::PyGILState_Check() == 1 }
}

/// A worker that crashes (a segfault in a C extension, an abort) writes the
/// Python stack of each of its threads to the error log first, as Python's
/// `faulthandler` does: the master's line says only which signal killed it
/// and what it was serving.
fn enable_faulthandler(py: Python<'_>) {
    // A JSON log takes only JSON objects: the stacks go to the worker's
    // crash report instead, which the master logs as one.
    let Some(fd) = corral_engine::crash::report_fd().or_else(corral_engine::logfile::raw_fd) else {
        return;
    };
    let enabled = (|| -> PyResult<()> {
        let kw = pyo3::types::PyDict::new(py);
        kw.set_item("file", fd)?;
        kw.set_item("all_threads", true)?;
        py.import("faulthandler")?.call_method("enable", (), Some(&kw))?;
        Ok(())
    })();
    if let Err(e) = enabled {
        error!("cannot enable faulthandler: {e}");
    }
}

/// The signals the app gave a Python handler while it loaded, other than
/// the worker's own (put back with a warning of their own, see
/// `corral_engine::worker`): such a handler runs only when the main thread
/// runs Python, which a worker's never does while it serves.
fn python_handlers_that_never_run(py: Python<'_>) -> PyResult<Vec<String>> {
    let signal = py.import("signal")?;
    let (dfl, ign) = (signal.getattr("SIG_DFL")?, signal.getattr("SIG_IGN")?);
    let mut names = Vec::new();
    for sig in signal.call_method0("valid_signals")?.try_iter()? {
        let sig = sig?;
        let Ok(num) = sig.extract::<libc::c_int>() else { continue };
        if corral_engine::worker::WORKER_SIGNALS.contains(&num) {
            continue;
        }
        let Ok(handler) = signal.call_method1("getsignal", (&sig,)) else { continue };
        if handler.is_none() || handler.eq(&dfl)? || handler.eq(&ign)? {
            continue;
        }
        names.push(corral_engine::supervise::signal_name(num));
    }
    Ok(names)
}
