"""gunicorn's server hooks in a gunicorn configuration file: run where and
when gunicorn runs them, with the objects gunicorn's hooks use, and a hook
that raises handled as gunicorn handles it."""

import os
import signal
import subprocess
import textwrap

from support import APPS, CORRAL, Server, wait_until

# Each hook writes one line, with the process it ran in and what it was given.
HOOKS = textwrap.dedent(
    """
    import os

    workers = 2

    def note(*words):
        with open(os.environ["HOOK_LOG"], "a") as f:
            f.write(" ".join(str(w) for w in words) + "\\n")

    def on_starting(server):
        note("on_starting", os.getpid(), server.pid, server.num_workers)

    def when_ready(server):
        server.log.info("Server is ready. Spawning workers")
        note("when_ready", os.getpid())

    def pre_fork(server, worker):
        note("pre_fork", os.getpid(), worker.age, worker.pid)

    def post_fork(server, worker):
        server.log.info("Worker spawned (pid: %s)", worker.pid)
        worker.mine = "kept"
        note("post_fork", os.getpid(), worker.pid, worker.age, server.pid, worker.booted)

    def post_worker_init(worker):
        note("post_worker_init", os.getpid(), worker.booted, worker.mine)

    def pre_request(worker, req):
        note("pre_request", os.getpid(), worker.pid, req.method, req.path, req.uri, req.query)

    def post_request(worker, req, environ, resp):
        note("post_request", os.getpid(), req.path, resp.status_code, resp.sent, environ["PATH_INFO"])

    def child_exit(server, worker):
        note("child_exit", os.getpid(), worker.pid, worker.age, worker.alive)

    def worker_exit(server, worker):
        note("worker_exit", os.getpid(), worker.pid, worker.alive)

    def worker_int(worker):
        note("worker_int", os.getpid(), worker.pid)

    def nworkers_changed(server, new_value, old_value):
        note("nworkers_changed", os.getpid(), new_value, old_value, server.num_workers)

    def on_reload(server):
        note("on_reload", os.getpid())

    def pre_exec(server):
        note("pre_exec", os.getpid())

    def on_exit(server):
        note("on_exit", os.getpid())
    """
)


def _start(tmp_path, conf: str, *args: str, workers=None) -> tuple[Server, object]:
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(conf)
    log = tmp_path / "hooks.log"
    server = Server(
        "behaviour:application", "-c", str(cfg), *args, workers=workers, env={"HOOK_LOG": str(log)}
    )
    return server, log


def _lines(log) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _named(log, name: str) -> list[list[str]]:
    return [words[1:] for words in _lines(log) if words[0] == name]


def test_every_hook_runs_in_the_process_and_at_the_moment_gunicorn_runs_it(tmp_path):
    server, log = _start(tmp_path, HOOKS)
    try:
        server.wait_started()
        master = str(server.proc.pid)
        first = [words[0] for words in _lines(log)]
        # The pool's size, then on_starting, then when_ready once bound, all
        # before the first fork.
        assert first[:4] == ["nworkers_changed", "on_starting", "when_ready", "pre_fork"], first
        assert _named(log, "nworkers_changed") == [[master, "2", "None", "2"]]
        assert _named(log, "on_starting") == [[master, master, "2"]]
        assert server.grep(r"\[INFO\] Server is ready\. Spawning workers")

        response = server.request("GET", "/pid?x=1")
        assert response.status == 200
        served_by = response.body.decode()
        pre = _named(log, "pre_request")
        assert pre == [[served_by, served_by, "GET", "/pid", "/pid?x=1", "x=1"]]
        wait_until(lambda: _named(log, "post_request"))
        assert _named(log, "post_request") == [[served_by, "/pid", "200", str(len(served_by)), "/pid"]]
        # An app that raised: post_request still runs, and sees the 500 sent.
        assert server.request("GET", "/raise-before").status == 500
        wait_until(lambda: len(_named(log, "post_request")) == 2)
        assert _named(log, "post_request")[1][1:3] == ["/raise-before", "500"]

        mark = server.mark()
        server.signal(signal.SIGTTIN)
        server.wait_for(r"Worker ready", since=mark)
        # The hook's line is read from its own file, which need not be
        # there by the time the log says the worker is ready.
        wait_until(lambda: len(_named(log, "nworkers_changed")) >= 2)
        assert _named(log, "nworkers_changed")[1] == [master, "3", "2", "3"]
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"Worker \d+ \(pid \d+\) exited", count=3, since=mark, timeout=20)
        assert _named(log, "on_reload") == [[master]]
        mark = server.mark()
        server.signal(signal.SIGUSR2)
        server.wait_for(r"re-executing the master", since=mark)
        server.wait_for(r"from before the re-exec exited", count=3, since=mark, timeout=30)
        assert _named(log, "pre_exec") == [[master]]
        # The new program reads the file again, and starts as a master does.
        assert len(_named(log, "when_ready")) == 2
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
    finally:
        server.cleanup()

    workers_started = 2 + 1 + 3 + 2
    pre_fork = _named(log, "pre_fork")
    assert len(pre_fork) == workers_started
    assert all(words[0] == master and words[2] == "None" for words in pre_fork), pre_fork
    post_fork = _named(log, "post_fork")
    assert len(post_fork) == workers_started
    for pid, worker_pid, age, server_pid, booted in post_fork:
        # In the new worker, which the worker object names; server.pid is the master.
        assert pid == worker_pid != master
        assert server_pid == master
        assert booted == "False"
    # The ages count the workers this master started: gunicorn's numbering.
    assert sorted(int(words[2]) for words in post_fork[:6]) == list(range(1, 7))
    init = _named(log, "post_worker_init")
    assert sorted(words[0] for words in init) == sorted(words[0] for words in post_fork)
    assert all(words[1:] == ["True", "kept"] for words in init), init
    # Each worker ran worker_exit itself as it stopped, and the master's
    # child_exit saw it gone: those started before the re-exec with no age.
    exits = _named(log, "worker_exit")
    assert sorted(words[0] for words in exits) == sorted(words[0] for words in post_fork)
    assert all(words[0] == words[1] and words[2] == "False" for words in exits), exits
    children = _named(log, "child_exit")
    assert sorted(words[1] for words in children) == sorted(words[0] for words in post_fork)
    assert all(words[0] == master and words[3] == "False" for words in children), children
    assert sum(words[2] == "None" for words in children) == 3
    assert not _named(log, "worker_int")
    # on_exit last, in the master.
    assert _lines(log)[-1] == ["on_exit", master]


def test_worker_int_runs_at_a_quick_stop(tmp_path):
    server, log = _start(tmp_path, HOOKS)
    try:
        server.wait_started()
        server.wait_for(r"Worker ready", count=2)
        pids = server.worker_pids()
        server.signal(signal.SIGQUIT)
        server.wait_exit(30)
    finally:
        server.cleanup()
    assert sorted(words[0] for words in _named(log, "worker_int")) == sorted(str(p) for p in pids)
    assert sorted(words[0] for words in _named(log, "worker_exit")) == sorted(str(p) for p in pids)


def test_a_raising_pre_request_is_that_requests_500(tmp_path):
    conf = textwrap.dedent(
        """
        def pre_request(worker, req):
            if req.path == "/refused":
                raise PermissionError("not this one")
        """
    )
    server, _ = _start(tmp_path, conf)
    try:
        server.wait_started()
        conn = server.connect()
        conn.send_request("GET", "/refused")
        assert conn.read_response().status == 500
        conn.send_request("GET", "/pid")
        assert conn.read_response().status == 200
        server.wait_for(r"GET /refused from 127\.0\.0\.1:\d+: the gunicorn server hook `pre_request` raised")
        server.wait_for(r"PermissionError: not this one")
    finally:
        server.cleanup()


def test_a_raising_master_hook_is_logged_and_the_server_goes_on(tmp_path):
    conf = HOOKS + textwrap.dedent(
        """
        def child_exit(server, worker):
            raise ValueError("cannot mark " + str(worker.pid))
        """
    )
    server, _ = _start(tmp_path, conf)
    try:
        server.wait_started()
        victim = server.worker_pids()[0]
        mark = server.mark()
        os.kill(victim, signal.SIGKILL)
        server.wait_for(r"The gunicorn server hook `child_exit` raised an exception", since=mark)
        server.wait_for(rf"ValueError: cannot mark {victim}", since=mark)
        server.wait_for(r"Worker ready", since=mark)
        assert server.running()
        assert server.request("GET", "/pid").status == 200
    finally:
        server.cleanup()


def _start_refused(cfg_text: str, tmp_path) -> subprocess.CompletedProcess:
    """Starts corral with a gunicorn file that keeps it from starting."""
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(cfg_text)
    return subprocess.run(
        [
            *CORRAL,
            "-c",
            str(cfg),
            "--http",
            "127.0.0.1:0",
            "--pythonpath",
            str(APPS),
            "behaviour:application",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_raising_post_fork_is_a_worker_that_failed_to_boot(tmp_path):
    proc = _start_refused("def post_fork(server, worker):\n    raise RuntimeError('no database')\n", tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "The gunicorn server hook `post_fork` raised an exception" in proc.stderr
    assert "RuntimeError: no database" in proc.stderr
    assert "the `post_fork` hook failed" in proc.stderr


def test_a_raising_on_starting_stops_the_start(tmp_path):
    proc = _start_refused("def on_starting(server):\n    raise RuntimeError('stale lock')\n", tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "RuntimeError: stale lock" in proc.stderr
    assert "Not starting: the `on_starting` hook failed" in proc.stderr


def test_hooks_corral_cannot_run_are_refused_with_why(tmp_path):
    proc = _start_refused("def worker_abort(worker):\n    pass\n", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert (
        ":1: `worker_abort` is a gunicorn server hook corral cannot run: a request past --timeout gets 504"
        in (proc.stderr)
    )


def test_a_hook_named_by_its_dotted_path_runs_and_a_value_that_is_no_function_is_refused(tmp_path):
    """gunicorn takes a hook as a "module.function" string too, and stops on
    any other value that is not callable; so does corral, with the line."""
    (tmp_path / "hookmod.py").write_text(
        "import os\n\ndef ready(server):\n"
        "    with open(os.environ['HOOK_LOG'], 'a') as f:\n        f.write('when_ready by name\\n')\n"
    )
    conf = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nwhen_ready = 'hookmod.ready'\n"
    server, log = _start(tmp_path, conf)
    try:
        server.wait_started()
        assert wait_until(lambda: log.exists() and "when_ready by name" in log.read_text(), 10)
    finally:
        server.cleanup()
    for text, said in [
        ("post_fork = 5\n", ":1: `post_fork = 5` is not a function"),
        ("when_ready = None\n", ":1: `when_ready = None` is not a function"),
        (
            "on_starting = 'nomodule_here.x'\n",
            ':1: `on_starting = "nomodule_here.x"`: ModuleNotFoundError: No module named',
        ),
        (
            conf.replace("when_ready", "worker_abort"),
            ":3: `worker_abort` is a gunicorn server hook corral cannot run",
        ),
    ]:
        proc = _start_refused(text, tmp_path)
        assert proc.returncode == 2 and said in proc.stderr, (text, proc.stderr)


def test_post_request_of_two_or_three_parameters_runs_and_req_path_is_as_sent(tmp_path):
    """gunicorn wraps a post_request hook of 2 or 3 parameters (its
    validate_post_request), and gives req.path as the request line has it,
    still percent-encoded."""
    conf = textwrap.dedent(
        """
        import os

        def note(*words):
            with open(os.environ["HOOK_LOG"], "a") as f:
                f.write(" ".join(str(w) for w in words) + "\\n")

        def pre_request(worker, req):
            note("pre_request", req.path, req.query)

        def post_request(worker, req):
            note("post_request", req.path)
        """
    )
    server, log = _start(tmp_path, conf)
    try:
        server.wait_started()
        assert server.request("GET", "/a%20b?x=1").status == 200
        assert server.request("GET", "//pid").status == 200
        assert wait_until(lambda: len(_named(log, "post_request")) == 2)
        assert _named(log, "pre_request") == [["/a%20b", "x=1"], ["//pid"]]
        assert _named(log, "post_request") == [["/a%20b"], ["//pid"]]
        assert not server.grep("TypeError")
    finally:
        server.cleanup()
    log.unlink()
    server, log = _start(
        tmp_path, conf.replace('(worker, req):\n    note("post', '(w, req, env):\n    note("post')
    )
    try:
        server.wait_started()
        server.request("GET", "/pid")
        assert wait_until(lambda: _named(log, "post_request") == [["/pid"]])
    finally:
        server.cleanup()


def test_a_hook_taking_other_parameters_than_gunicorn_gives_is_refused_at_start(tmp_path):
    """gunicorn checks each hook's parameters when it reads the file; a hook
    run only at exit would otherwise fail there, long after the start."""
    for text, said in [
        (
            "import os\n\ndef on_exit():\n    pass\n",
            ":3: the server hook `on_exit` takes 0 positional parameter(s), but is called as on_exit(server)",
        ),
        (
            "def post_request(worker):\n    pass\n",
            (
                ":1: the server hook `post_request` takes 1 positional parameter(s), but is called as "
                "post_request(worker, req, environ, resp)"
            ),
        ),
        (
            "def pre_fork(server, worker, extra):\n    pass\n",
            (
                ":1: the server hook `pre_fork` takes 3 positional parameter(s), but is called as "
                "pre_fork(server, worker)"
            ),
        ),
    ]:
        proc = _start_refused(text, tmp_path)
        assert proc.returncode == 2 and said in proc.stderr, (text, proc.stderr)


def test_a_config_file_imports_its_neighbours_and_its_chdir_is_undone(tmp_path):
    """gunicorn runs the file with the start directory first on sys.path and
    goes back to that directory after it (its Application.chdir)."""
    (tmp_path / "settings_helper.py").write_text("WORKERS = 3\n\ndef ready(server):\n    pass\n")
    (tmp_path / "nearby_app.py").write_text(
        "def application(environ, start_response):\n    start_response('200 OK', [])\n    return [b'']\n"
    )
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "gunicorn.conf.py").write_text(
        "import os\nimport settings_helper\n\n"
        "workers = 2\nworkers = settings_helper.WORKERS\n"
        "when_ready = 'settings_helper.ready'\n"
        "wsgi_app = 'nearby_app:application'\n"
        "os.chdir('elsewhere')\n"
    )
    run = lambda *args: subprocess.run(
        [*CORRAL, "-c", "gunicorn.conf.py", *args],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    shown = run("--print-config")
    assert shown.returncode == 0, shown.stderr
    # The line whose value counts is the last assignment.
    assert 'workers = "3"  # config file gunicorn.conf.py:5' in shown.stdout, shown.stdout
    checked = run("--check-config")
    assert checked.returncode == 0, checked.stderr
