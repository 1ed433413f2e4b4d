"""Startup: loading the app, startup errors, command line and environment configuration."""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from front_ends import free_port
from support import APPS, CORRAL, ROOT, http10_over_unix, wait_until


def _fails_fast(start_server, app, *args, code=4, **kw):
    started = time.monotonic()
    server = start_server(app, *args, wait=False, **kw)
    exited = server.wait_exit(timeout=10)
    elapsed = time.monotonic() - started
    # 4 (gunicorn's exit code) for an application that cannot be loaded.
    assert exited == code, server.log
    assert elapsed < 10
    # No respawn loop: at most one boot per worker slot.
    boots = server.grep(r"Booting worker")
    assert len(boots) <= kw.get("workers", 1), server.log
    return server


@pytest.mark.parametrize("workers", [1, 2])
def test_import_error_exits_with_the_traceback(start_server, workers):
    server = _fails_fast(start_server, "broken_import:application", workers=workers)
    assert "Traceback" in server.log
    assert re.search(r"(ModuleNotFoundError|ImportError).*corral_tests_no_such_module", server.log), (
        server.log
    )


def test_import_error_with_preload(start_server):
    server = _fails_fast(start_server, "broken_import:application", "--preload", workers=2)
    assert "Traceback" in server.log
    assert "corral_tests_no_such_module" in server.log
    assert not server.grep("Booting worker")


def test_exception_at_import_exits_with_the_traceback(start_server):
    server = _fails_fast(start_server, "raises_at_import:application")
    assert "Traceback" in server.log
    assert "RuntimeError: explodes while importing raises_at_import" in server.log


def test_an_import_that_fails_after_starting_a_thread_still_exits(start_server):
    """The worker does not wait, as at a stop, for a thread half an import started."""
    server = _fails_fast(start_server, "thread_then_fail:application")
    assert "RuntimeError: configuration missing" in server.log


def test_missing_module(start_server):
    server = _fails_fast(start_server, "corral_no_such_app_module:application")
    assert "corral_no_such_app_module" in server.log


def test_missing_attribute(start_server):
    server = _fails_fast(start_server, "factory_app:no_such_callable")
    assert "no_such_callable" in server.log


def test_an_error_raised_while_looking_the_app_up_is_shown_with_its_traceback(start_server, tmp_path):
    """An app built by a module's __getattr__ (PEP 562) or a property whose
    code fails: the error and its line are shown, as gunicorn shows them,
    not a "has no attribute" that sends the user looking for a typo."""
    (tmp_path / "lazy_app.py").write_text(
        "import os\n"
        "def create_app():\n"
        "    url = os.environ['CORRAL_TEST_NO_SUCH_SETTING']\n"
        "    return None\n"
        "def __getattr__(name):\n"
        "    if name == 'app':\n"
        "        return create_app()\n"
        "    raise AttributeError(name)\n"
    )
    server = _fails_fast(start_server, "lazy_app:app", pythonpath=None, cwd=tmp_path)
    assert "KeyError: 'CORRAL_TEST_NO_SUCH_SETTING'" in server.log, server.log
    assert re.search(r'lazy_app\.py", line 3, in create_app', server.log), server.log
    assert "no attribute" not in server.log
    # A name the module's __getattr__ refuses is still a missing attribute.
    other = _fails_fast(start_server, "lazy_app:other", pythonpath=None, cwd=tmp_path)
    assert re.search(r'has no attribute "other"', other.log), other.log


@pytest.mark.parametrize("preload", [False, True])
def test_an_apps_own_module_named_as_one_tracebacks_need_keeps_the_tracebacks(
    start_server, tmp_path, preload
):
    """An app with a `token.py` of its own (tokenize, linecache and
    traceback's other needs alike): the traceback of a failed import and of
    a request's error is still logged whole, with its file and line."""
    (tmp_path / "token.py").write_text("SECRET = 'x'\n")
    (tmp_path / "shadow_import.py").write_text("x = 1\nimport corral_tests_no_such_dependency\n")
    (tmp_path / "shadow_request.py").write_text(
        "import inspect\ndef application(environ, start_response):\n    return {}['x']\n"
    )
    args = ["--preload"] if preload else []
    failed = _fails_fast(start_server, "shadow_import:application", *args, pythonpath=None, cwd=tmp_path)
    assert re.search(r'shadow_import\.py", line 2, in <module>', failed.log), failed.log
    server = start_server("shadow_request:application", *args, pythonpath=None, cwd=tmp_path)
    assert server.request("GET", "/").status == 500
    server.wait_for(r"KeyError: 'x'")
    assert re.search(r'shadow_request\.py", line 3, in application', server.log), server.log


def test_a_worker_that_cannot_start_its_threads_fails_its_boot_before_it_says_it_is_ready(start_server):
    """A serving thread that cannot start (a limit on threads or address
    space) fails the worker's boot, counted and backed off as any, until the
    master gives up: the worker had said it was ready first, then exited
    "while idle" and was replaced for ever (and a reload retired a healthy
    worker for it)."""
    command = ["prlimit", "--as=400000000", *CORRAL]
    server = start_server("behaviour:application", command=command, threads=64, wait=False)
    assert server.wait_exit(60) == 3, server.log
    assert re.search(r"Worker 0 cannot start its serving thread \d+ of 64: ", server.log), server.log
    assert "5 boot failures in a row, giving up" in server.log
    assert not server.grep(r"Worker ready")


def test_not_callable(start_server):
    server = _fails_fast(start_server, "not_callable:application")
    assert re.search(r"(?i)not callable", server.log), server.log


def test_address_in_use(start_server):
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = _fails_fast(start_server, "factory_app:application", http=f"127.0.0.1:{port}", code=1)
    assert re.search(r"(?i)address already in use|address in use|EADDRINUSE", server.log), server.log
    assert str(port) in server.log


def test_address_not_on_this_host(start_server):
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a local interface.
    server = _fails_fast(start_server, "factory_app:application", http="192.0.2.1:8000", code=1)
    assert re.search(r"(?i)cannot bind 192\.0\.2\.1:8000: address not available", server.log), server.log


def test_unix_socket_path_not_usable(start_server, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker / "corral.sock"
    server = _fails_fast(start_server, "factory_app:application", http=f"unix:{path}", code=1)
    assert re.search(rf"(?i)cannot bind unix:{re.escape(str(path))}: not a directory", server.log), server.log


def test_privileged_port_not_permitted():
    cmd = [*CORRAL, "--http", "127.0.0.1:80", "factory_app:application"]
    if os.geteuid() == 0:
        # Run as nobody, the way an unprivileged user meets this error.
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        if (
            shutil.which("setpriv") is None
            or subprocess.run([*drop, CORRAL[0], "--version"], check=False).returncode
        ):
            pytest.skip("cannot run corral as an unprivileged user here")
        cmd = [*drop, *cmd]
    start = time.monotonic()
    proc = subprocess.run(cmd, check=False, capture_output=True, timeout=30, cwd=APPS)
    assert time.monotonic() - start < 5
    assert proc.returncode != 0
    assert b"cannot bind 127.0.0.1:80: permission denied" in proc.stderr, proc.stderr


def test_invalid_app_spec(start_server):
    server = _fails_fast(start_server, "not a module!", code=2)
    assert "not a module!" in server.log


def test_unknown_option_is_a_usage_error():
    proc = subprocess.run([*CORRAL, "--no-such-option", "x:y"], check=False, capture_output=True, timeout=30)
    assert proc.returncode != 0
    assert b"--no-such-option" in proc.stderr


# -- loading ----------------------------------------------------------------


@pytest.mark.parametrize(
    "app,body",
    [
        ("factory_app:application", b"plain application"),
        ("factory_app", b"plain application"),  # the callable defaults to `application`
        ("factory_app:create()", b"made by the factory"),
        # Literal arguments, as gunicorn takes them (`'app:create_app("prod")'`).
        ("factory_app:create('for prod', suffix='!')", b"for prod!"),
    ],
)
def test_app_specs(start_server, app, body):
    server = start_server(app)
    assert server.request("GET", "/").body == body


@pytest.mark.parametrize(
    ("app", "said"),
    [
        ("factory_app:create(__import__('os'))", "the factory's arguments must be literals"),
        ("factory_app:create('x',", "a factory call must end with `)`"),
        ("factory_app:create(**{'a': 1})", "cannot unpack"),
    ],
)
def test_factory_arguments_that_are_not_literals_are_refused(start_server, app, said):
    server = start_server(app, wait=False)
    assert server.wait_exit(10) != 0
    assert said in server.log, server.log


def test_version():
    for cmd in (CORRAL, [sys.executable, "-m", "corral"]):
        proc = subprocess.run([*cmd, "--version"], check=False, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"corral \d+\.\d+\.\d+", proc.stdout), proc.stdout


def test_help():
    proc = subprocess.run([*CORRAL, "--help"], check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for option in ("--http", "--workers", "--threads", "--preload", "--max-body-size", "--mount"):
        assert option in proc.stdout


def test_env_option_reaches_the_app(start_server):
    server = start_server(
        "behaviour:application",
        "--env",
        "CORRAL_TEST_A=hello world",
        "--env",
        "CORRAL_TEST_B=x=y",
        "--env",
        "CORRAL_TEST_EMPTY=",
    )
    assert server.get_json("/os-environ?key=CORRAL_TEST_A")["value"] == "hello world"
    assert server.get_json("/os-environ?key=CORRAL_TEST_B")["value"] == "x=y"
    assert server.get_json("/os-environ?key=CORRAL_TEST_EMPTY")["value"] == ""


APP_SOURCE = """
import os


def application(environ, start_response):
    body = ("%s %s" % (__name__, os.getcwd())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_chdir(start_server, tmp_path):
    (tmp_path / "chdir_app.py").write_text(APP_SOURCE)
    server = start_server("chdir_app:application", "--chdir", str(tmp_path), pythonpath=None, cwd="/")
    assert server.request("GET", "/").body == f"chdir_app {tmp_path}".encode()


def test_relative_paths_are_taken_from_the_start_directory_with_chdir(start_server, tmp_path):
    appdir, start = tmp_path / "app", tmp_path / "start"
    appdir.mkdir()
    (appdir / "chdir_app.py").write_text(APP_SOURCE)
    (start / "static").mkdir(parents=True)
    (start / "static" / "a.txt").write_text("static a")
    server = start_server(
        "chdir_app:application",
        "--chdir",
        str(appdir),
        "--pidfile",
        "corral.pid",
        "--access-log",
        "access.log",
        "--static",
        "/s=static",
        http="unix:corral.sock",
        pythonpath=None,
        cwd=str(start),
    )
    assert server.unix_path == str(start / "corral.sock")
    assert server.request("GET", "/").body == f"chdir_app {appdir}".encode()
    assert server.request("GET", "/s/a.txt").body == b"static a"
    assert (start / "corral.pid").read_text().strip() == str(server.proc.pid)
    assert wait_until(
        lambda: (start / "access.log").exists() and "GET /s/a.txt" in (start / "access.log").read_text()
    )
    assert not any((appdir / name).exists() for name in ("corral.pid", "corral.sock", "access.log"))


def test_umask_applies_to_every_file_corral_creates(start_server, tmp_path):
    access, pidfile, sock = tmp_path / "access.log", tmp_path / "corral.pid", tmp_path / "corral.sock"
    server = start_server(
        "behaviour:application",
        "--umask",
        "077",
        "--access-log",
        str(access),
        "--pidfile",
        str(pidfile),
        http=f"unix:{sock}",
    )
    assert server.request("GET", "/fixed").status == 200
    assert wait_until(pidfile.exists)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (access, pidfile, sock)}
    assert modes == {"access.log": 0o600, "corral.pid": 0o600, "corral.sock": 0o700}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scale-down-idle", "5"], "--workers-max"),
        (["--workers", "4", "--workers-min", "2", "--workers-max", "6"], "cannot be used with"),
    ],
    ids=["scale-down-idle", "workers-and-workers-min"],
)
def test_an_option_that_cannot_apply_is_refused(args, message):
    proc = subprocess.run(
        [*CORRAL, *args, "behaviour:application"], check=False, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_socket_options_without_a_unix_socket_are_reported(start_server):
    server = start_server("behaviour:application", "--socket-mode", "600", "--socket-owner", str(os.getuid()))
    server.wait_for(r"--socket-mode is not used: no listener is a unix:PATH socket")
    server.wait_for(r"--socket-owner is not used")


def test_http_only_options_without_an_http_listener_are_reported(start_server):
    """--proxy-protocol and --forwarded-allow-ips read what HTTP clients send,
    --proxy-allow-from only matters with --proxy-protocol: each said, not
    silently taken."""
    port = free_port()
    server = start_server(
        "behaviour:application",
        "--uwsgi",
        f"127.0.0.1:{port}",
        "--proxy-protocol",
        "--forwarded-allow-ips",
        "10.0.0.1",
        http=None,
        wait=False,
    )
    server.wait_for(r"--proxy-protocol is not used: it applies to --http listeners")
    server.wait_for(r"--forwarded-allow-ips is not used: it applies to --http listeners")
    other = start_server("behaviour:application", "--proxy-allow-from", "10.0.0.0/8")
    other.wait_for(r"--proxy-allow-from is not used: .* --proxy-protocol is off")
    assert not other.grep(r"--forwarded-allow-ips is not used")


def test_pythonpath(start_server, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (two / "path_app.py").write_text(APP_SOURCE)
    server = start_server(
        "path_app:application", "--pythonpath", str(one), "--pythonpath", str(two), pythonpath=None, cwd="/"
    )
    assert server.request("GET", "/").body == b"path_app /"


def test_a_relative_pythonpath_is_made_absolute(start_server, tmp_path):
    """As gunicorn does: an app that changes directory, then starts a child
    with multiprocessing's spawn (which imports from sys.path), still finds
    its modules."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "work_lib.py").write_text("def times21(x):\n    return x * 21\n")
    (tmp_path / "src" / "spawn_app.py").write_text(
        "import multiprocessing, os, sys\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import work_lib\n"
        "os.chdir('/')\n"
        "def application(environ, start_response):\n"
        "    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as ex:\n"
        "        result = ex.submit(work_lib.times21, 2).result()\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [f'{result} {sys.path[0]}'.encode()]\n"
    )
    server = start_server("spawn_app:application", "--pythonpath", "src", pythonpath=None, cwd=tmp_path)
    assert server.request("GET", "/", timeout=60).body == f"42 {tmp_path / 'src'}".encode()


def test_settings_from_environment_variables(start_server):
    server = start_server(
        "behaviour:application",
        workers=None,
        env={"CORRAL_WORKERS": "2", "CORRAL_THREADS": "3", "CORRAL_MAX_BODY_SIZE": "10"},
    )
    server.wait_for("Worker ready", count=2)
    env = server.get_json("/environ")
    assert env["wsgi.multiprocess"]["value"] is True
    assert env["wsgi.multithread"]["value"] is True
    assert server.request("POST", "/echo", body=b"x" * 100).status == 413


def test_command_line_wins_over_the_environment(start_server):
    server = start_server("behaviour:application", workers=1, env={"CORRAL_WORKERS": "3"})
    time.sleep(0.5)
    assert len(server.worker_pids()) == 1
    assert server.get_json("/environ")["wsgi.multiprocess"]["value"] is False


def test_http_address_from_the_environment(start_server):
    server = start_server("factory_app:application", http=None, env={"CORRAL_HTTP": "127.0.0.1:0"})
    assert server.request("GET", "/").body == b"plain application"


def test_unix_socket(start_server, tmp_path):
    path = tmp_path / "corral.sock"
    server = start_server("behaviour:application", http=f"unix:{path}")
    assert server.unix_path == str(path)
    assert path.is_socket()
    env = json.loads(server.request("GET", "/environ").body)
    assert env["PATH_INFO"]["value"] == "/environ"
    server.signal(15)
    assert server.wait_exit(15) == 0
    assert not path.exists(), "the socket file is removed on shutdown"


def test_several_listeners(start_server, tmp_path):
    path = tmp_path / "second.sock"
    server = start_server("factory_app:application", http=["127.0.0.1:0", f"unix:{path}"])
    assert len(server.listeners) == 2
    assert server.request("GET", "/").body == b"plain application"
    data = http10_over_unix(path)
    assert data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b"plain application")


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_listener(start_server):
    server = start_server("behaviour:application", http="[::1]:0")
    assert server.host in ("[::1]", "::1")
    port = server.port
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(b"GET /environ HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    env = json.loads(body)
    assert env["REMOTE_ADDR"]["value"] == "::1"


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="a private /etc/hosts needs root and unshare"
)
def test_a_name_binds_its_ipv4_address_as_gunicorn_and_uwsgi_do(start_server, tmp_path):
    """`localhost` listed as ::1 first in /etc/hosts (as Debian's and Docker's
    list it) still binds 127.0.0.1, which front ends and health checks use."""
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 localhost ip6-localhost\n127.0.0.1 localhost\n")
    # In a mount namespace of its own, so the machine's /etc/hosts is untouched.
    wrap = ["unshare", "-m", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$0" "$@"']
    server = start_server("behaviour:application", http="localhost:0", command=[*wrap, *CORRAL])
    assert server.host == "127.0.0.1", server.log
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /fixed HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data


def test_demo_app(start_server):
    server = start_server(
        "demo_app:app", "--chdir", str(ROOT / "examples"), pythonpath=None, workers=2, threads=2
    )
    page = server.request("GET", "/hello?name=x")
    assert page.status == 200
    assert b"/hello" in page.body
    assert b"name=x" in page.body
    echo = server.request(
        "POST", "/", {"Content-Type": "application/x-www-form-urlencoded"}, b"message=hi+%3Cthere%3E"
    )
    assert echo.status == 200
    assert b"POST" in echo.body
    assert b"hi &lt;there&gt;" in echo.body


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_a_preload_import_stops_the_master_at_once(start_server, tmp_path, sig):
    """TERM or INT while the master imports the app (--preload), a module
    that waits at import: the import is interrupted and the master exits,
    as gunicorn's does at TERM (it went on until the import ended, up to
    ten minutes here)."""
    mark_file = tmp_path / "importing"
    server = start_server(
        "slow_import:application",
        "--preload",
        wait=False,
        env={"CORRAL_TEST_IMPORT_SECS": "600", "CORRAL_TEST_IMPORT_MARK": str(mark_file)},
    )
    assert wait_until(mark_file.exists, 20)
    server.signal(sig)
    assert server.wait_exit(20) == 0
    assert server.grep(r"Stopped while the application was being imported \(--preload\)"), server.log
    assert not server.grep(r"Booting worker"), server.log


def test_a_preloaded_apps_thread_that_never_ends_does_not_hold_the_master_after_a_stop(start_server):
    """A thread that is not a daemon, started by the master's import (a
    scheduler): Python's exit waits for it, and the master ran on for good
    after "Shutdown complete". It gets --graceful-timeout, then the master
    exits without it, saying so."""
    server = start_server(
        "nondaemon_at_import:application", "--preload", "--graceful-timeout", "1", workers=1
    )
    assert server.request("GET", "/").status == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0
    assert server.grep(r"The app's thread\(s\) scheduler still run in the master, and are not daemons")
    assert server.grep(
        r"The app's thread\(s\) scheduler still run 1 s after the stop; the master exits without"
    )


def test_timeout_covers_loading_the_app(start_server):
    server = start_server(
        "slow_import:application", "--timeout", "1", wait=False, env={"CORRAL_TEST_IMPORT_SECS": "60"}
    )
    server.wait_for(
        r"did not finish loading the application within --timeout 1s; ending it \(SIGABRT", timeout=15
    )
    # Where the import waits, from the worker itself.
    server.wait_for(r"Fatal Python error: Aborted", timeout=15)
    server.wait_for(r'File ".*slow_import\.py", line \d+ in <module>', timeout=15)
    server.wait_for(r"was killed by signal 6 \(SIGABRT\) while booting \(failure 1 of 5\)", timeout=15)
    assert server.running()


def test_a_worker_loading_past_timeout_that_blocks_sigabrt_is_killed(start_server):
    server = start_server(
        "slow_import:application",
        "--timeout",
        "1",
        wait=False,
        env={"CORRAL_TEST_IMPORT_SECS": "60", "CORRAL_TEST_BLOCK_ABRT": "1"},
    )
    server.wait_for(r"did not finish loading the application within --timeout 1s; ending it", timeout=15)
    server.wait_for(r"was killed by signal 9 \(SIGKILL\) while booting", timeout=15)
    assert server.running()


def test_stop_while_a_worker_loads_the_app_is_immediate(start_server):
    import signal

    server = start_server("slow_import:application", wait=False, env={"CORRAL_TEST_IMPORT_SECS": "60"})
    server.wait_for(r"Booting worker 0", timeout=15)
    time.sleep(0.5)
    server.signal(signal.SIGTERM)
    # Well within the 30 s graceful timeout: nothing is in flight on a booting worker.
    assert server.wait_exit(timeout=20) == 0, server.log
    assert server.grep(r"is still loading the application; stopping it at once")


def test_usr1_during_a_preloaded_import_kills_no_worker(start_server):
    """USR1 (logrotate's reopen) that arrives while the master imports the app is
    acted on once the master is ready, which forwards it to the workers it has
    just forked: they must take it as a reopen, not die of it."""
    import signal

    server = start_server(
        "slow_import:application",
        "--preload",
        workers=3,
        wait=False,
        env={"CORRAL_TEST_IMPORT_SECS": "1"},
    )
    time.sleep(0.4)
    server.signal(signal.SIGUSR1)
    server.wait_started()
    assert server.request("GET", "/").status == 200
    time.sleep(0.5)
    assert not server.grep(r"killed by signal|exited with code"), server.log


def test_a_preloaded_app_is_imported_before_the_listeners_are_bound(start_server, tmp_path):
    """As under gunicorn's --preload: while the master imports the app, its
    port refuses connections, so a front end balancing over several hosts
    goes to another at once rather than queue requests here for the whole
    import (all reset if the import fails)."""
    port = free_port()
    server = start_server(
        "slow_import:application",
        "--preload",
        http=f"127.0.0.1:{port}",
        wait=False,
        env={"CORRAL_TEST_IMPORT_SECS": "3", "CORRAL_TEST_IMPORT_MARK": str(tmp_path / "importing")},
    )
    assert wait_until(lambda: (tmp_path / "importing").exists(), 10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    server.wait_started()
    assert server.log.index("Preloaded application") < server.log.index("Listening at")
    assert server.request("GET", "/").status == 200


def test_workers_the_master_kills_itself_are_not_reported_as_crashes(start_server):
    """A second HUP while the first one's workers still load makes them unneeded:
    the master kills them, and says so, rather than warn that a worker was killed
    by a signal as if it had crashed."""
    import signal

    server = start_server("slow_import:application", env={"CORRAL_TEST_IMPORT_SECS": "1"}, wait=False)
    server.wait_started(timeout=20)
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"Booting worker", since=mark)
    time.sleep(0.3)
    server.signal(signal.SIGHUP)
    server.wait_for(r"stopped with SIGKILL: a later reload made it unneeded", since=mark, timeout=20)
    server.wait_for(r"Worker ready", since=mark, timeout=20)
    assert not server.grep(r"killed by signal", mark), server.log


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_the_ipv6_wildcard_serves_ipv4_too_unless_an_ipv4_listener_shares_its_port(start_server):
    """`[::]:PORT` takes IPv4 clients as well (as gunicorn's does), who are
    their IPv4 address to the app; given beside `0.0.0.0:PORT`, it leaves
    IPv4 to that listener rather than failing to bind."""

    def remote_addr(host, port):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET /environ HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return json.loads(body)["REMOTE_ADDR"]["value"]

    port = free_port()
    server = start_server("behaviour:application", http=f"[::]:{port}")
    assert remote_addr("127.0.0.1", port) == "127.0.0.1"
    assert remote_addr("::1", port) == "::1"
    server.cleanup()
    port = free_port()
    start_server("behaviour:application", http=[f"0.0.0.0:{port}", f"[::]:{port}"])
    assert remote_addr("127.0.0.1", port) == "127.0.0.1"
    assert remote_addr("::1", port) == "::1"


def test_started_with_its_standard_descriptors_closed(tmp_path):
    """`corral ... 0<&- 1>&- 2>&-`: the descriptors are opened on /dev/null
    before anything else takes them, and the app's print() works."""
    port = free_port()
    log = tmp_path / "error.log"
    command = " ".join(
        [*CORRAL, "--http", f"127.0.0.1:{port}", "--pythonpath", str(APPS), "--error-log", str(log)]
        + ["behaviour:application"]
    )
    proc = subprocess.Popen(["sh", "-c", f"exec {command} 0<&- 1>&- 2>&-"], start_new_session=True)
    try:
        assert wait_until(lambda: log.exists() and "Worker ready" in log.read_text(), timeout=20)
        worker = int(re.search(r"Worker ready: pid=(\d+)", log.read_text()).group(1))
        for pid in (proc.pid, worker):
            for fd in (0, 1, 2):
                assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null", (pid, fd)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /print-std?msg=hi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        assert reply.endswith(b"printed")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_backlog_past_the_kernels_somaxconn_is_warned_about(start_server):
    """The kernel cuts a listen queue longer than net.core.somaxconn without
    a word (uWSGI refuses to start): --backlog past it is said to be cut."""
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    server = start_server("behaviour:application", "--backlog", str(somaxconn + 1))
    server.wait_for(
        rf"--backlog {somaxconn + 1} is more than the kernel's net\.core\.somaxconn \({somaxconn}\): each "
        rf"listener's queue holds {somaxconn} connections"
    )
    assert server.request("GET", "/fixed").status == 200


def test_an_argument_that_is_not_utf8_gets_a_clear_error(tmp_path):
    """A path whose name is not UTF-8 (Latin-1 bytes): one line saying so,
    exit 2, rather than a Python traceback."""
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    proc = subprocess.run(
        [*CORRAL, "--chdir", odd, "app:application"], check=False, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert "is not valid UTF-8" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
