"""--config FILE (TOML), its precedence under the environment and the command
line, --print-config, and errors that name the key and the line."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from front_ends import free_port
from support import APPS, CORRAL, READY_RE, Server, http10_over_unix, wait_until


def _run(args, env=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    full_env.update(env or {})
    return subprocess.run(
        [*CORRAL, *args], check=False, capture_output=True, text=True, timeout=30, env=full_env, cwd=cwd
    )


def _printed(out):
    """--print-config lines as {name: (value, source)}."""
    result = {}
    for line in out.splitlines():
        left, _, source = line.partition("  # ")
        name, _, value = left.partition(" = ")
        result[name] = (value, source)
    return result


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        'app = "behaviour:application"\n'
        "workers = 3\n"
        "threads = 5\n"
        'http = ["127.0.0.1:9", "unix:/tmp/x.sock"]\n'
        "preload = true\n"
        "max-requests = 100\n"
    )
    proc = _run(["--config", str(cfg), "--threads", "7", "--print-config"], env={"CORRAL_WORKERS": "2"})
    assert proc.returncode == 0, proc.stderr
    p = _printed(proc.stdout)
    assert p["threads"] == ('"7"', "command line")
    assert p["workers"] == ('"2"', "environment CORRAL_WORKERS")
    assert p["max-requests"] == ('"100"', f"config file {cfg}:6")
    assert p["preload"] == ("true", f"config file {cfg}:5")
    assert p["http"] == ('["127.0.0.1:9", "unix:/tmp/x.sock"]', f"config file {cfg}:4")
    assert p["app"] == ('"behaviour:application"', f"config file {cfg}:1")
    assert p["graceful-timeout"] == ('"30"', "default")


def test_print_config_shows_the_listener_used_when_none_is_given():
    proc = _run(["--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["http"] == ('["127.0.0.1:8000"]', "default, as no listener is given")
    proc = _run(["--print-config", "--uwsgi", "127.0.0.1:9", "behaviour:application"])
    assert _printed(proc.stdout)["http"] == ("(not set)", "default")
    assert _printed(proc.stdout)["uwsgi"] == ('"127.0.0.1:9"', "command line")


def test_the_command_line_turns_off_what_the_file_turns_on(tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        'app = "behaviour:application"\npreload = true\nreload = true\ntimeout = 30\nmax-requests = 5\n'
    )
    args = ["--config", str(cfg), "--print-config"]
    p = _printed(_run(args).stdout)
    assert (p["preload"][0], p["reload"][0], p["timeout"][0]) == ("true", "true", '"30"')
    off = ["--preload=false", "--reload=no", "--timeout", "0", "--max-requests", "0"]
    p = _printed(_run([*args, *off]).stdout)
    assert p["preload"] == ("false", "command line")
    assert p["reload"] == ("false", "command line")
    assert p["timeout"] == ('"0"', "command line")
    p = _printed(_run(args, env={"CORRAL_PRELOAD": "off"}).stdout)
    assert p["preload"] == ("false", "environment CORRAL_PRELOAD")


def test_timeout_and_max_requests_zero_mean_off(start_server):
    server = start_server(
        "behaviour:application", "--timeout", "0", "--max-requests", "0", workers=1, threads=1
    )
    (worker,) = server.worker_pids()
    assert server.request("GET", "/slow?secs=1.5").status == 200
    for _ in range(5):
        assert server.request("GET", "/fixed").status == 200
    assert server.worker_pids() == [worker]


def test_print_config_refuses_what_a_start_would_refuse(tmp_path):
    for args, message in [
        (["--static", f"/s={tmp_path / 'missing'}"], "--static"),
        (["--static-map", f"/s={tmp_path / 'missing'}"], "--static-map"),
        (["--static-map", "/s=/dev/null"], "is not a directory or a regular file"),
        (["--user", "no-such-user-here"], "no-such-user-here"),
        (["--chdir", str(tmp_path / "missing")], "--chdir"),
        (["--access-log", "-", "--access-log-format", "%(zz)s"], "unknown atom"),
    ]:
        proc = _run(["--print-config", *args, "behaviour:application"])
        assert proc.returncode == 2, (args, proc.stdout)
        assert message in proc.stderr, (args, proc.stderr)


def test_print_config_shows_values_other_options_imply():
    p = _printed(_run(["--print-config", "--log-format", "json", "behaviour:application"]).stdout)
    assert p["access-log-format"] == ('"json"', "default, as --log-format is json")
    p = _printed(_run(["--print-config", "behaviour:application"], env={"SCRIPT_NAME": "/app"}).stdout)
    assert p["mount"] == ('"/app"', "environment SCRIPT_NAME")


def test_a_bad_value_from_the_environment_names_the_variable():
    proc = _run(["behaviour:application"], env={"CORRAL_WORKERS": "abc"})
    assert proc.returncode == 2
    assert "invalid value 'abc' for '--workers <N>'" in proc.stderr
    assert "(that value comes from the environment variable CORRAL_WORKERS)" in proc.stderr
    # Given on the command line, the bad value is the command line's.
    proc = _run(["--workers=abc", "behaviour:application"], env={"CORRAL_WORKERS": "abc"})
    assert proc.returncode == 2 and "environment variable" not in proc.stderr


def test_a_bad_script_name_from_the_environment_names_the_variable():
    proc = _run(["--check-config", "behaviour:application"], env={"SCRIPT_NAME": "app"})
    assert proc.returncode == 2
    assert "the SCRIPT_NAME environment variable (the default of --mount) \"app\": must start with '/'" in (
        proc.stderr
    )
    proc = _run(["--check-config", "--mount", "app", "behaviour:application"])
    assert proc.returncode == 2 and "invalid value 'app' for '--mount <PREFIX>'" in proc.stderr, proc.stderr


def test_a_server_runs_from_the_file(start_server, tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f'app = "behaviour:application"\nworkers = 2\npythonpath = ["{APPS}"]\n')
    # The harness puts its first argument last on the command line: here the
    # config file's path, right after --config (the app comes from the file).
    server = start_server(str(cfg), "--config", pythonpath=None, workers=None, wait=False)
    server.expected_workers = 2
    server.wait_started()
    assert server.request("GET", "/fixed").status == 200
    assert len(server.worker_pids()) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers = 2\nwrkers = 4\n", ":2: unknown key `wrkers`"),
        ("max_requests = 100\n", ":1: unknown key `max_requests` (did you mean `max-requests`?)"),
        (
            "harakiri = 30\n",
            ":1: unknown key `harakiri` (for uWSGI's `harakiri`, corral takes --timeout SECS",
        ),
        (
            "[uwsgi]\nmodule = app\n",
            "this looks like a uWSGI ini file: corral reads one as such when its name ends in .ini",
        ),
        ('workers = "four"\n', ":1: `workers`: invalid value 'four'"),
        ("preload = 1\n", ":1: `preload` must be true or false"),
        ("threads = [1, 2]\n", ":1: `threads` takes one value, not a list"),
        ("[server]\nworkers = 2\n", ":1: unknown key `server`"),
        (
            'bind = ["127.0.0.1:9"]\n',
            ":1: unknown key `bind` (for gunicorn's `bind`, corral takes the key `http`;",
        ),
        ("preload_app = true\n", "corral takes the key `preload`; or give the gunicorn file itself"),
        ("http = [1, 2\n", ":2: invalid TOML"),
        ("workers-min = 5\nworkers-max = 2\n", "--workers-min 5 is greater than --workers-max 2 (set in"),
        ("timeout = -1\n", ":1: `timeout`"),
        (
            'sigint = "QUICK"\n',
            ":1: `sigint`: invalid value 'QUICK' for '--sigint <SIGINT>' [possible values: graceful, quick]",
        ),
        ('preload = "yes"\n', ":1: `preload` must be true or false"),
        # TOML reads 0o660 as the integer 432: a mode must be a string.
        ("socket-mode = 0o660\n", ":1: `socket-mode` is an octal mode: write it as a string"),
        ("umask = 0o027\n", ":1: `umask` is an octal mode"),
        ("umask = 27\n", ':1: `umask` is an octal mode: write it as a string, e.g. umask = "027"'),
        ("workers-min = 2\n", "(--workers-min, which needs it, comes from {cfg}:1)"),
        ('workers = 1\nhttp = ["nonsense:port"]\n', ":2: `http`: invalid value 'nonsense:port'"),
        ('stats = "bad:port"\n', ":1: `stats`: invalid value 'bad:port'"),
        ('env = ["NOEQ"]\n', ":1: `env`: invalid value 'NOEQ'"),
        ('mount = "x"\n', ":1: `mount`: invalid value 'x'"),
        # Checked after parsing, against the system: the file's line still said.
        ('user = "no-such-user-here"\n', "no such user (set in {cfg}:1)"),
        (
            'workers = 2\nstatic = ["/s=/no/such/dir"]\n',
            "No such file or directory (os error 2) (set in {cfg}:2)",
        ),
        ('socket-owner = "no-such-user-here"\n', "(set in {cfg}:1)"),
    ],
)
def test_errors_name_the_key_and_line(tmp_path, text, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    proc = _run(["--config", str(cfg), "behaviour:application"], cwd=APPS)
    assert proc.returncode != 0
    assert message.format(cfg=cfg) in proc.stderr, proc.stderr
    assert str(cfg) in proc.stderr or "set in" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # uWSGI habits: a bare port, and mount's /PREFIX=APP.
        (["--uwsgi", "3031"], "a port alone is written 127.0.0.1:3031 (this host) or :3031"),
        (
            ["--mount", "/shop=shop.wsgi:application"],
            "uWSGI's /PREFIX=APP is --mount /shop with shop.wsgi:application as APP",
        ),
        (["--harakiri", "30"], "note: for uWSGI's --harakiri, corral takes --timeout SECS"),
        (["--socket", ":3031"], "note: for uWSGI's --socket, corral takes --uwsgi ADDR"),
        (["--master"], "note: for uWSGI's --master, corral takes nothing: corral always runs a master"),
        (["--stop", "/run/app.pid"], "note: for uWSGI's --stop, corral takes `corral signal TERM PIDFILE`"),
        (
            ["--cheaper", "2"],
            "note: for uWSGI's --cheaper, corral takes --workers-min N with --workers-max M",
        ),
        # gunicorn's options corral spells differently or has no use for.
        (
            ["-k", "gevent"],
            "for '--worker-class <CLASS>': corral's workers are gunicorn's sync and gthread kind",
        ),
        (
            ["--statsd-host", "x:8125"],
            "note: for gunicorn's --statsd-host, corral takes nothing (corral sends no",
        ),
        (
            ["--reload-extra-file", "x.html"],
            "note: for gunicorn's --reload-extra-file, corral takes --touch-reload FILE",
        ),
    ],
)
def test_habits_from_uwsgi_and_gunicorn_get_an_error_that_says_what_to_write(args, message):
    proc = _run([*args, "behaviour:application"], cwd=APPS)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_converted_uwsgi_ini_gets_every_unknown_key_named_at_once(tmp_path):
    cfg = tmp_path / "from-uwsgi.toml"
    cfg.write_text(
        'plugins = "python3"\nworkers = 2\nmanage-script-name = true\ncheaper = 2\n'
        'logto = "/var/log/app.log"\n'
    )
    proc = _run(["--config", str(cfg), "behaviour:application"], cwd=APPS)
    assert proc.returncode == 2, proc.stderr
    for line in (
        ":1: unknown key `plugins` (for uWSGI's `plugins`, corral takes nothing: corral serves WSGI apps",
        ":3: unknown key `manage-script-name` (for uWSGI's `manage-script-name`, corral takes --mount PREFIX",
        ":4: unknown key `cheaper` (for uWSGI's `cheaper`, corral takes --workers-min N with --workers-max M",
        ":5: unknown key `logto` (for uWSGI's `logto`, corral takes --error-log FILE with --capture-output",
    ):
        assert line in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("app", "message"),
    [
        (
            "corral.pid",
            'APP "corral.pid" looks like a pid file: to reload a running server, `corral signal HUP',
        ),
        ("run/app.pid", "`corral signal HUP run/app.pid` (uWSGI's --reload PIDFILE)"),
        ("uwsgi.ini", "a configuration file: give it with --config uwsgi.ini"),
    ],
)
def test_a_file_where_the_app_goes_gets_what_was_meant(tmp_path, app, message):
    """uWSGI's `--reload PIDFILE` reads as corral's --reload switch and a pid
    file for APP; refused before anything binds or imports."""
    (tmp_path / "run").mkdir()
    (tmp_path / app).write_text("1234\n")
    proc = _run(["--reload", app], cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Listening at" not in proc.stderr


def test_a_unix_socket_in_a_missing_directory_is_named_with_its_option(tmp_path):
    proc = _run(["--uwsgi", f"unix:{tmp_path}/run/app.sock", "behaviour:application"], cwd=APPS)
    assert proc.returncode != 0
    assert f"--uwsgi: cannot bind unix:{tmp_path}/run/app.sock: no directory {tmp_path}/run" in proc.stderr


def test_missing_config_file(tmp_path):
    proc = _run(["--config", str(tmp_path / "nope.toml"), "x:y"])
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr


def test_reload_picks_up_an_edited_module(start_server, tmp_path):
    app_dir = tmp_path / "site"
    (app_dir / "pkg").mkdir(parents=True)
    (app_dir / "pkg" / "__init__.py").write_text("")
    (app_dir / "pkg" / "views.py").write_text('VERSION = b"one"\n')
    (app_dir / "reloadable.py").write_text(
        "from pkg import views\n\n\n"
        "def application(environ, start_response):\n"
        '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
        "    return [views.VERSION]\n"
    )
    server = start_server("reloadable:application", "--reload", "--chdir", str(app_dir), pythonpath=None)
    assert server.grep(r"--reload: watching \d+ director")
    assert server.request("GET", "/").body == b"one"
    mark = server.mark()
    # An edit in a subpackage; then a burst of saves counts as one change.
    (app_dir / "pkg" / "views.py").write_text('VERSION = b"two"\n')
    (app_dir / "pkg" / "views.py").write_text('VERSION = b"three"\n')
    server.wait_for(r"Detected a change in .*views\.py; reloading the workers", since=mark)
    server.wait_for(r"Worker ready", since=mark)
    assert wait_until(lambda: server.request("GET", "/").body == b"three", 10)
    assert len(server.grep(r"Detected a change", since=mark)) == 1
    # Files other than Python sources do not reload.
    mark = server.mark()
    (app_dir / "notes.txt").write_text("hello")
    time.sleep(1)
    assert not server.grep(r"Detected a change", since=mark)


def test_reload_started_on_broken_code_serves_the_error_until_it_is_fixed(start_server, tmp_path):
    """As gunicorn's reloader: an app that cannot be imported when the server
    starts (a syntax error saved mid-edit) gets every request answered 500
    with the error, and loads once fixed; the server used to stop."""
    app_dir = tmp_path / "site"
    app_dir.mkdir()
    app = app_dir / "devapp.py"
    app.write_text("def application(environ, start_response:\n    pass\n")
    server = start_server("devapp:application", "--reload", "--chdir", str(app_dir), pythonpath=None)
    server.wait_for(r"SyntaxError")
    server.wait_for(r"Worker 0 answers every request with 500 and this error until the code is fixed")
    r = server.request("GET", "/")
    assert r.status == 500 and b"SyntaxError" in r.body and b"devapp.py" in r.body, r.body
    mark = server.mark()
    app.write_text(
        "def application(environ, start_response):\n"
        '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
        '    return [b"fixed"]\n'
    )
    server.wait_for(r"Detected a change in .*devapp\.py; reloading the workers", since=mark)
    assert wait_until(lambda: server.request("GET", "/").body == b"fixed", 15), server.log[mark:]
    assert server.running()


def test_a_broken_edit_under_reload_keeps_the_code_that_loaded_serving(start_server, tmp_path):
    """Once code that loads serves, a broken save does not replace it with the
    error: the reload fails as any reload would."""
    app_dir = tmp_path / "site"
    app_dir.mkdir()
    app = app_dir / "devapp2.py"
    good = (
        "def application(environ, start_response):\n"
        '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
        '    return [b"good"]\n'
    )
    app.write_text(good)
    server = start_server("devapp2:application", "--reload", "--chdir", str(app_dir), pythonpath=None)
    assert server.request("GET", "/").body == b"good"
    mark = server.mark()
    app.write_text("def application(:\n")
    server.wait_for(r"Detected a change in .*devapp2\.py; reloading the workers", since=mark)
    server.wait_for(r"SyntaxError", since=mark)
    time.sleep(1)
    assert server.request("GET", "/").body == b"good"
    assert not server.grep(r"answers every request with 500", since=mark), server.log[mark:]


def test_reload_started_on_broken_code_with_several_workers_serves_the_error_and_the_next(
    start_server, tmp_path
):
    """Every worker serves the error (one serving it is no code that loaded:
    a sibling failing a moment later used to stop the server), and an edit
    that breaks it differently shows the new error, not the first one."""
    app_dir = tmp_path / "site"
    app_dir.mkdir()
    app = app_dir / "devapp3.py"
    app.write_text("def application(environ, start_response:\n    pass\n")
    server = start_server(
        "devapp3:application", "--reload", "--chdir", str(app_dir), pythonpath=None, workers=4
    )
    server.wait_for(r"answers every request with 500 and this error", count=4, timeout=30)
    assert server.running()
    assert not server.grep(r"shutting down")
    r = server.request("GET", "/")
    assert r.status == 500 and b"SyntaxError" in r.body, r.body
    mark = server.mark()
    app.write_text("import no_such_module_here\n")
    server.wait_for(r"Detected a change in .*devapp3\.py", since=mark)
    assert wait_until(lambda: b"no_such_module_here" in server.request("GET", "/").body, 15), server.log[
        mark:
    ]
    assert all(b"no_such_module_here" in server.request("GET", "/").body for _ in range(8))


def test_a_broken_edit_under_reload_with_preload_keeps_the_code_that_loaded_serving(start_server, tmp_path):
    """With --preload the reload re-executes the master, whose new workers
    do not see the previous program's: they must not serve the error in
    place of the code that loaded."""
    app_dir = tmp_path / "site"
    app_dir.mkdir()
    app = app_dir / "devapp4.py"
    app.write_text(
        "def application(environ, start_response):\n"
        '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
        '    return [b"good"]\n'
    )
    server = start_server(
        "devapp4:application", "--reload", "--preload", "--chdir", str(app_dir), pythonpath=None, workers=2
    )
    assert server.request("GET", "/").body == b"good"
    mark = server.mark()
    app.write_text("def application(:\n")
    server.wait_for(r"could not load the new code", since=mark, timeout=30)
    time.sleep(1)
    assert [server.request("GET", "/").status for _ in range(10)] == [200] * 10
    assert not server.grep(r"answers every request with 500", since=mark), server.log[mark:]


def test_reload_watches_an_app_given_by_its_path(start_server, tmp_path):
    """PATH.py:CALLABLE from another directory: its file is watched too; an
    editor's lock file beside it is not a change."""
    app_dir = tmp_path / "elsewhere"
    app_dir.mkdir()
    app = app_dir / "wsgi.py"
    app.write_text(
        "def application(environ, start_response):\n"
        '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
        '    return [b"one"]\n'
    )
    server = start_server(f"{app}:application", "--reload")
    assert server.request("GET", "/").body == b"one"
    mark = server.mark()
    (app_dir / ".#wsgi.py").symlink_to("someone@host.1234:1700000000")
    time.sleep(1)
    assert not server.grep(r"Detected a change", since=mark), server.log
    app.write_text(app.read_text().replace('b"one"', 'b"two"'))
    server.wait_for(r"Detected a change in .*wsgi\.py; reloading the workers", since=mark)
    assert wait_until(lambda: server.request("GET", "/").body == b"two", 10)


@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preload"])
def test_touch_reload_reloads_when_the_file_is_touched(start_server, tmp_path, preload):
    """uWSGI's --touch-reload: a deploy writes new code, then touches a file;
    the workers reload gracefully with the new code (with --preload the master
    re-executes and looks again). The path is followed as it is at each look:
    its directory may appear later, and a symlink a deploy switches counts.
    Other files, and removing it, do nothing."""
    app_dir, releases = tmp_path / "site", tmp_path / "releases"
    app_dir.mkdir()
    flag = tmp_path / "current" / "tmp" / "restart.txt"  # no such directory yet
    module = app_dir / "touched.py"
    module.write_text(_versioned("one"))
    extra = ["--preload"] if preload else []
    server = start_server("touched:application", "--touch-reload", str(flag), "--chdir", str(app_dir), *extra)
    assert server.grep(
        r"--touch-reload: touching .*current/tmp/restart\.txt reloads the workers \(it does not exist"
    )
    assert server.request("GET", "/").body == b"one"
    # A Python edit alone reloads nothing: there is no --reload.
    module.write_text(_versioned("two"))
    time.sleep(1.5)
    assert server.request("GET", "/").body == b"one"

    def deploy(release, version, how):
        module.write_text(_versioned(version))
        mark = server.mark()
        how()
        server.wait_for(r"restart\.txt was touched \(--touch-reload\); reloading the workers", since=mark)
        assert wait_until(lambda: server.request("GET", "/").body == version.encode(), 15)

    def switch(release):
        (releases / release / "tmp").mkdir(parents=True, exist_ok=True)
        (releases / release / "tmp" / "restart.txt").write_text("")
        link = tmp_path / "current.new"
        link.symlink_to(releases / release)
        link.replace(tmp_path / "current")

    deploy("r1", "three", lambda: switch("r1"))
    deploy("r1", "four", lambda: os.utime(flag))
    deploy("r2", "five", lambda: switch("r2"))
    mark = server.mark()
    flag.unlink()
    time.sleep(1.5)
    assert not server.grep(r"was touched", since=mark)
    assert server.proc.poll() is None


def test_touch_reload_needs_a_file_name(tmp_path):
    proc = _run(["--touch-reload", "/", "x:y"])
    assert proc.returncode == 2
    assert "--touch-reload /: not a file name" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("bind", "hint"),
    [("::1", "in brackets: [::1]:8000"), ("http://127.0.0.1:9000", "without a scheme"), ("bad addr", "")],
)
@pytest.mark.parametrize("check", ["--check-config", "--print-config"])
def test_an_address_that_cannot_resolve_fails_the_checks_as_it_fails_a_start(bind, hint, check):
    """Found by a start only as it bound the listeners: the checks said it was valid."""
    proc = _run(["-b", bind, check, "behaviour:application"], cwd=APPS)
    assert proc.returncode == 2, proc.stderr
    assert f"--http {bind}: cannot resolve" in proc.stderr and hint in proc.stderr, proc.stderr


def test_check_config_imports_the_app_and_binds_nothing(tmp_path):
    """gunicorn's --check-config: 0 when the configuration is valid and the app
    loads (with --env, --chdir and --pythonpath applied), 1 with the import's
    traceback when it does not, 2 for a configuration error; nothing is bound."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "checked.py").write_text(
        "import os\n"
        "GREETING = os.environ['GREETING']\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [b'']\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = [
        "--check-config",
        "--chdir",
        str(site),
        "--http",
        f"127.0.0.1:{port}",
        "--pidfile",
        str(tmp_path / "pid"),
    ]
    ok = _run([*common, "-e", "GREETING=hi", "checked"])
    assert (ok.returncode, ok.stdout.strip()) == (
        0,
        "corral: the configuration is valid and checked:application loads",
    )
    assert not (tmp_path / "pid").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "nothing listens"
    failing = _run([*common, "checked"])
    assert failing.returncode == 1
    assert "KeyError: 'GREETING'" in failing.stderr and "checked:application failed to load" in failing.stderr
    missing = _run([*common, "-e", "GREETING=hi", "checked:app"])
    assert missing.returncode == 1 and 'has no attribute "app"' in missing.stderr, missing.stderr
    bad = _run([*common, "--workers-min", "3", "--workers-max", "2", "checked"])
    assert bad.returncode == 2 and "--workers-max" in bad.stderr
    assert "check-config" not in _run(["--print-config", "checked"]).stdout
    # As a start says it in its log.
    astray = _run([*common, "-e", "GREETING=hi", "--pythonpath", "no-such-dir", "checked"])
    assert astray.returncode == 0, astray.stderr
    assert f"corral: warning: --pythonpath no-such-dir: no such directory (from {site})" in astray.stderr
    # What a real start would refuse before importing anything.
    owner = _run([*common, "-e", "GREETING=hi", "--socket-owner", "no-such-user-here", "checked"])
    assert owner.returncode == 2 and "no-such-user-here" in owner.stderr, owner.stderr
    for where in (["--uwsgi", f"unix:{tmp_path}/nowhere/app.sock"], ["--pidfile", f"{tmp_path}/nowhere/pid"]):
        nowhere = _run([*common[:-2], "-e", "GREETING=hi", *where, "checked"])
        assert nowhere.returncode == 2, nowhere.stderr
        assert f"{where[0]} {where[1]}: no directory {tmp_path}/nowhere" in nowhere.stderr, nowhere.stderr
    log = _run([*common, "-e", "GREETING=hi", "--access-log", str(tmp_path / "nowhere" / "a.log"), "checked"])
    assert log.returncode == 2 and "--access-log" in log.stderr and "nowhere" in log.stderr, log.stderr
    in_file = tmp_path / "c.toml"
    in_file.write_text("check-config = true\n")
    refused = _run(["--config", str(in_file), "checked"])
    assert refused.returncode == 2 and "an action for the command line" in refused.stderr, refused.stderr


def test_check_config_takes_signals_and_exits_past_the_apps_threads(tmp_path):
    """A slow import can be interrupted with TERM, and a thread the app starts
    at import (not a daemon thread) does not keep the check from exiting."""
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\ndef application(e, s):\n    return []\n")
    (tmp_path / "threaded.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "def application(e, s):\n    return []\n"
    )
    threaded = _run(["--check-config", "--chdir", str(tmp_path), "threaded"])
    assert threaded.returncode == 0, threaded.stderr
    proc = subprocess.Popen(
        [*CORRAL, "--check-config", "--chdir", str(tmp_path), "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_numeric_ids_without_entries_and_a_group_alone(start_server):
    """Ids an image never named are taken as numbers, as gunicorn takes them,
    without root's supplementary groups; --group alone changes the group."""
    import pwd

    uid = next(n for n in range(23456, 24000) if n not in {p.pw_uid for p in pwd.getpwall()})
    # Imported by the master, as root: the interpreter's own files may not
    # be readable by that user.
    server = start_server("behaviour:application", "--preload", "--user", str(uid), "--group", str(uid))
    assert server.get_json("/ids") == {"uid": uid, "gid": uid, "groups": [uid]}
    assert server.grep(rf"Running as user {uid} \(uid {uid}, gid {uid}\)")
    server = start_server("behaviour:application", "--group", str(uid))
    assert {k: v for k, v in server.get_json("/ids").items() if k != "groups"} == {"uid": 0, "gid": uid}
    proc = _run(["--check-config", "--user", str(uid), "behaviour:application"], cwd=APPS)
    assert proc.returncode == 2 and "has no entry in the user database" in proc.stderr, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_check_config_imports_with_the_users_rights(tmp_path):
    """Workers import the app as --user (unless --preload imports it in the
    master first): so does the check."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "privapp.py").write_text("def application(e, s):\n    return []\n")
    tmp_path.chmod(0o755)
    as_nobody = _run(["--check-config", "--user", "nobody", "--pythonpath", str(private), "privapp"])
    assert as_nobody.returncode == 1 and "privapp" in as_nobody.stderr, as_nobody.stderr
    # The error says why: a module nobody finds may be in a directory it may not read.
    note = next(
        line for line in as_nobody.stderr.splitlines() if line.startswith("This process runs as user")
    )
    assert note.startswith("This process runs as user nobody, who may not read these directories"), note
    assert str(private) in note, note
    preloaded = _run(
        ["--check-config", "--user", "nobody", "--preload", "--pythonpath", str(private), "privapp"]
    )
    assert preloaded.returncode == 0, preloaded.stderr
    # A log file root owns that the user cannot write: a start would refuse it.
    log = tmp_path / "root.log"
    log.write_text("")
    log.chmod(0o644)
    refused = _run(
        [
            "--check-config",
            "--user",
            "nobody",
            "--error-log",
            str(log),
            "--preload",
            "--pythonpath",
            str(private),
            "privapp",
        ]
    )
    assert refused.returncode == 2 and "user nobody cannot write it" in refused.stderr, refused.stderr


def _versioned(version):
    return (
        "def application(environ, start_response):\n"
        '    start_response("200 OK", [("Content-Type", "text/plain")])\n'
        f"    return [b{version!r}]\n"
    )


def test_gunicorn_spellings_of_the_options_work(start_server, tmp_path):
    """A gunicorn command line carries over: -b/--bind, -w, -t, -e, --keep-alive,
    --access-logfile, --access-logformat, --error-logfile/--log-file, --pid,
    --worker-connections."""
    pid, access = tmp_path / "corral.pid", tmp_path / "access.log"
    server = start_server(
        "behaviour:application",
        "-b",
        "127.0.0.1:0",
        "-w",
        "2",
        "-t",
        "30",
        "-e",
        "GREETING=hi",
        "--keep-alive",
        "5",
        "--access-logfile",
        str(access),
        "--access-logformat",
        "%(r)s -> %(s)s",
        "--error-logfile",
        "-",
        "--pid",
        str(pid),
        "--worker-connections",
        "50",
        http=None,
        workers=None,
        wait=False,
    )
    server.expected_workers = 2
    server.wait_started()
    assert len(server.worker_pids()) == 2
    assert server.get_json("/os-environ?key=GREETING") == {"value": "hi"}
    assert int(pid.read_text()) == server.proc.pid
    assert wait_until(lambda: "GET /os-environ?key=GREETING HTTP/1.1 -> 200" in access.read_text())
    printed = _run(
        [
            "--bind",
            "127.0.0.1:9",
            "--log-file",
            "-",
            "--log-level",
            "CRITICAL",
            "--print-config",
            "behaviour:application",
        ]
    )
    assert printed.returncode == 0, printed.stderr
    got = _printed(printed.stdout)
    assert got["log-level"] == ('"CRITICAL"', "command line")
    assert got["http"] == ('"127.0.0.1:9"', "command line")
    assert got["error-log"] == ('"-"', "command line")


def test_gunicorns_platform_variables_come_below_every_other_setting(tmp_path):
    """WEB_CONCURRENCY and PORT, which hosting platforms set, as gunicorn takes them."""
    env = {"PORT": "5123", "WEB_CONCURRENCY": "3"}
    p = _printed(_run(["--print-config", "behaviour:application"], env=env).stdout)
    assert p["http"] == ('"0.0.0.0:5123"', "environment PORT")
    assert p["workers"] == ('"3"', "environment WEB_CONCURRENCY")
    p = _printed(
        _run(["--print-config", "-w", "2", "--uwsgi", "127.0.0.1:9", "behaviour:application"], env=env).stdout
    )
    assert (p["workers"], p["uwsgi"], p["http"]) == (
        ('"2"', "command line"),
        ('"127.0.0.1:9"', "command line"),
        ("(not set)", "default"),
    )
    cfg = tmp_path / "corral.toml"
    cfg.write_text('workers = 5\nhttp = ["127.0.0.1:5124"]\n')
    p = _printed(_run(["--print-config", "--config", str(cfg), "behaviour:application"], env=env).stdout)
    assert p["workers"] == ('"5"', f"config file {cfg}:1")
    assert p["http"] == ('"127.0.0.1:5124"', f"config file {cfg}:2")
    bad = _run(["--print-config", "behaviour:application"], env={"WEB_CONCURRENCY": "many"})
    assert bad.returncode == 2 and "(that value comes from environment WEB_CONCURRENCY)" in bad.stderr, (
        bad.stderr
    )


def test_gunicorn_flags_for_what_corral_needs_not_are_left_out_with_a_note(tmp_path):
    """A command line from gunicorn's documentation (`--worker-tmp-dir /dev/shm`
    for containers) runs, as a gunicorn file with the same settings does."""
    proc = _run(
        [
            "--worker-tmp-dir",
            "/dev/shm",
            "--no-sendfile",
            "-w",
            "3",
            "--print-config",
            "behaviour:application",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "note: gunicorn's --worker-tmp-dir /dev/shm is not needed: corral's workers report" in proc.stderr
    assert "note: gunicorn's --no-sendfile is not needed: corral always sends" in proc.stderr
    assert _printed(proc.stdout)["workers"] == ('"3"', "command line")


def test_forwarded_allow_ips_variable_is_below_every_other_setting(tmp_path):
    env = {"FORWARDED_ALLOW_IPS": "10.0.0.0/8"}
    p = _printed(_run(["--print-config", "behaviour:application"], env=env).stdout)
    assert p["forwarded-allow-ips"] == ('"10.0.0.0/8"', "environment FORWARDED_ALLOW_IPS")
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text("forwarded_allow_ips = '*'\n")
    p = _printed(_run(["--print-config", "-c", str(cfg), "behaviour:application"], env=env).stdout)
    assert p["forwarded-allow-ips"] == ('"*"', f"config file {cfg}:1")
    bad = _run(["--print-config", "behaviour:application"], env={"FORWARDED_ALLOW_IPS": "proxy"})
    assert bad.returncode == 2 and "(that value comes from environment FORWARDED_ALLOW_IPS)" in bad.stderr, (
        bad.stderr
    )


def test_the_port_variable_is_served_on_every_interface(start_server):
    port = free_port()
    server = start_server("behaviour:application", http=None, env={"PORT": str(port)})
    server.wait_for(rf"Listening at: http://0\.0\.0\.0:{port}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"hello world" in sock.makefile("rb").read()


def test_gunicorns_spellings_of_options(tmp_path):
    pythonpath = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inb.py").write_text("def application(e, s):\n    s('200 OK', [])\n    return [b'b']\n")
    checked = _run(["--check-config", "--pythonpath", pythonpath, "inb"])
    assert checked.returncode == 0, checked.stderr
    args = [
        "-m",
        "0o27",
        "-p",
        str(tmp_path / "x.pid"),
        "--limit-request-field_size",
        "100",
        "behaviour:application",
    ]
    p = _printed(_run(["--print-config", *args]).stdout)
    assert p["umask"] == ('"0o27"', "command line")
    assert p["pidfile"] == (f'"{tmp_path / "x.pid"}"', "command line")
    assert p["limit-request-field-size"] == ('"100"', "command line")


GUNICORN_CONF = """\
import multiprocessing
import os

bind = ["127.0.0.1:{port}"]
workers = int(os.environ.get("TEST_WORKERS", "2"))
threads = 3
worker_class = "gthread"
timeout = 30
graceful_timeout = 20
keepalive = 5
max_requests = 0
max_requests_jitter = 50
accesslog = "{access}"
access_log_format = "%(r)s -> %(s)s"
loglevel = "INFO"
forwarded_allow_ips = ["10.0.0.1", "10.0.0.2"]
umask = 0o027
raw_env = ["GREETING=from-gunicorn-conf"]
pythonpath = "{apps}"
proc_name = "gconf"
worker_tmp_dir = "/dev/shm"
wsgi_app = "behaviour:application"
cores = multiprocessing.cpu_count()
_private = object()
"""


def test_a_gunicorn_configuration_file_is_read_as_gunicorn_reads_it(start_server, tmp_path):
    """-c gunicorn.conf.py: the file runs, and each gunicorn setting becomes the
    corral option of the same meaning, with the line it was set on."""
    port, access = free_port(), tmp_path / "access.log"
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(GUNICORN_CONF.format(port=port, access=access, apps=APPS))
    proc = _run(["-c", str(cfg), "--print-config"], env={"TEST_WORKERS": "3"})
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    at = f"config file {cfg}:"
    assert got["http"] == (f'"127.0.0.1:{port}"', at + "4")
    assert got["workers"] == ('"3"', at + "5")
    assert got["threads"] == ('"3"', at + "6")
    assert got["timeout"] == ('"30"', at + "8")
    assert got["graceful-timeout"] == ('"20"', at + "9")
    assert got["keepalive-timeout"] == ('"5"', at + "10")
    # gunicorn's max_requests = 0 is "off", and the jitter then means nothing.
    assert got["max-requests"][1] == "default"
    assert got["max-requests-jitter"][1] == "default"
    assert got["log-level"] == ('"info"', at + "15")
    assert got["forwarded-allow-ips"] == ('"10.0.0.1,10.0.0.2"', at + "16")
    # gunicorn creates its unix sockets under its umask, and nothing else:
    # with none bound, it asks for nothing.
    assert got["socket-mode"][1] == "default" and got["umask"][1] == "default"
    assert got["name"] == ('"gconf"', at + "20")
    assert got["app"] == ('"behaviour:application"', at + "22")
    # What it does not need is said, not silently dropped; what differs too.
    assert f"{cfg}:21: gunicorn's `worker_tmp_dir` is not needed" in proc.stderr
    assert f"{cfg}:8: gunicorn's `timeout` (how long a worker may stay silent) is taken as" in proc.stderr

    server = start_server(str(cfg), "-c", http=None, pythonpath=None, workers=None, wait=False)
    server.expected_workers = 2
    server.wait_started()
    assert len(server.worker_pids()) == 2
    assert server.get_json("/os-environ?key=GREETING") == {"value": "from-gunicorn-conf"}
    assert wait_until(
        lambda: access.exists() and "GET /os-environ?key=GREETING HTTP/1.1 -> 200" in access.read_text()
    )
    assert any("corral: master [gconf]" in line for line in _ps_args()), _ps_args()


@pytest.mark.parametrize(
    ("args", "env", "file", "want"),
    [
        (["--workers-min", "1", "--workers-max", "4"], {"CORRAL_WORKERS": "3"}, "", ("1", "4", None)),
        (["--workers-min", "1", "--workers-max", "4"], {"GUNICORN_CMD_ARGS": "-w 3"}, "", ("1", "4", None)),
        (["-w", "2"], {"CORRAL_WORKERS_MIN": "1", "CORRAL_WORKERS_MAX": "4"}, "", (None, None, "2")),
        (["-w", "2"], {"CORRAL_SCALE_DOWN_IDLE": "30", "CORRAL_WORKERS_MAX": "4"}, "", (None, None, "2")),
        (["-w", "3"], {}, "workers-min = 2\nworkers-max = 4\nscale-down-idle = 30\n", (None, None, "3")),
        (
            [],
            {"CORRAL_WORKERS": "3"},
            "workers-min = 2\nworkers-max = 4\nscale-down-idle = 30\n",
            (None, None, "3"),
        ),
    ],
)
def test_the_higher_layer_chooses_the_kind_of_pool(tmp_path, args, env, file, want):
    """The command line wins over the environment, and either over a file, for
    the pool's kind too: a fixed pool asked for there leaves a lower layer's
    adaptive one behind whole (--scale-down-idle with it), and an adaptive one
    the lower layer's --workers, rather than both being refused together."""
    if file:
        cfg = tmp_path / "corral.toml"
        cfg.write_text(file)
        args = ["--config", str(cfg), *args]
    proc = _run([*args, "--print-config", "behaviour:application"], env=env, cwd=APPS)
    assert proc.returncode == 0, proc.stderr
    p = _printed(proc.stdout)
    lo, hi, fixed = want
    if fixed:
        assert p["workers"][0] == f'"{fixed}"' and p["workers-min"][0] == "(not set)", p
        assert p["workers-max"][0] == "(not set)", p
    else:
        assert (p["workers-min"][0], p["workers-max"][0]) == (f'"{lo}"', f'"{hi}"'), p
        assert p["workers"][1] == "default", p


def test_a_gunicorn_files_relative_paths_are_from_its_chdir(tmp_path):
    """gunicorn changes to its chdir before it opens its logs, its pid file and
    its unix sockets: a file's relative paths of them are from there."""
    (tmp_path / "site").mkdir()
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(
        f'chdir = "{tmp_path}/site"\naccesslog = "acc.log"\nerrorlog = "-"\npidfile = "g.pid"\n'
        'bind = ["unix:g.sock", "127.0.0.1:0"]\n'
    )
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    p = _printed(proc.stdout)
    assert p["access-log"][0] == f'"{tmp_path}/site/acc.log"', p["access-log"]
    assert p["pidfile"][0] == f'"{tmp_path}/site/g.pid"', p["pidfile"]
    assert p["http"][0] == f'["unix:{tmp_path}/site/g.sock", "127.0.0.1:0"]', p["http"]
    assert p["error-log"][0] == '"-"'


def test_a_gunicorn_files_umask_is_its_unix_sockets_mode_only(start_server, tmp_path):
    """gunicorn's default umask, 0, which its example file sets: the socket is
    777 as gunicorn's would be, and the logs corral writes are not made
    world-writable."""
    sock, access = tmp_path / "g.sock", tmp_path / "access.log"
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(
        f'bind = "unix:{sock}"\numask = 0\naccesslog = "{access}"\nwsgi_app = "behaviour:application"\n'
    )
    server = start_server(str(cfg), "-c", http=None, workers=None, wait=False)
    server.wait_started()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o777
    got = http10_over_unix(sock, "/fixed")
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"hello world"), got
    assert wait_until(lambda: access.exists() and access.read_text())
    assert stat.S_IMODE(os.stat(access).st_mode) & 0o022 == 0, oct(os.stat(access).st_mode)
    printed = _run(["-c", str(cfg), "--print-config"], cwd=tmp_path)
    assert _printed(printed.stdout)["socket-mode"] == ('"777"', f"config file {cfg}:2"), printed.stdout


def _ps_args():
    return subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True, check=True
    ).stdout.splitlines()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "workers = 2\n\ndef worker_abort(worker):\n    pass\n",
            ":3: `worker_abort` is a gunicorn server hook corral cannot run",
        ),
        (
            'worker_class = "gevent"\n',
            ":1: `worker_class = \"gevent\"`: corral's workers are gunicorn's sync and gthread",
        ),
        (
            'certfile = "/etc/ssl/x.pem"\n',
            ":1: gunicorn's `certfile` has no counterpart in corral: corral serves plain HTTP",
        ),
        ('statsd_host = "localhost:8125"\n', ":1: gunicorn's `statsd_host` has no counterpart in corral"),
        (
            "secure_scheme_headers = {'X-SCHEME': 'https'}\n",
            ":1: gunicorn's `secure_scheme_headers` names a header or value corral does not take",
        ),
        ('workers = "many"\n', ":1: `workers`: invalid value 'many'"),
        ("workers = 2\nbind = 1 / 0\n", "line 2, in <module>\n    bind = 1 / 0"),
        ("workers = (\n", "SyntaxError"),
        ("workers = {'a': 1}\n", ":1: gunicorn's `workers` has a value corral cannot take (dict)"),
    ],
)
def test_gunicorn_settings_corral_cannot_honour_are_refused_with_why(tmp_path, text, message):
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(text)
    proc = _run(["-c", str(cfg), "behaviour:application"])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "<frozen" not in proc.stderr, proc.stderr


def test_gunicorn_settings_at_their_defaults_ask_for_nothing(tmp_path):
    """A file written out with gunicorn's defaults (as `gunicorn --print-config`
    shows them) is taken: settings corral has no counterpart for are refused
    only when they ask for something."""
    cfg = tmp_path / "conf.py"
    cfg.write_text(
        "certfile = None\nstatsd_host = None\nsyslog = False\nsendfile = None\nspew = False\n"
        "secure_scheme_headers = {'X-FORWARDED-PROTOCOL': 'ssl', 'X-FORWARDED-PROTO': 'https', "
        "'X-FORWARDED-SSL': 'on'}\nheader_map = 'drop'\nlogger_class = 'gunicorn.glogging.Logger'\n"
        "logconfig_dict = {}\nraw_paste_global_conf = []\nworker_class = 'sync'\nreload_engine = 'auto'\n"
        "accesslog = None\npidfile = None\n"
    )
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_every_gunicorn_hook_corral_cannot_run_is_named_at_once(tmp_path):
    """The hooks corral runs are taken; each of those it cannot run is
    named, with its line, in one error."""
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(
        "bind = '127.0.0.1:8000'\n\n"
        "def post_fork(server, worker):\n    server.log.info('Worker spawned (pid: %s)', worker.pid)\n\n"
        "def worker_abort(worker):\n    worker.log.info('worker received SIGABRT signal')\n\n"
        "def ssl_context(config, default_ssl_context_factory):\n    return default_ssl_context_factory()\n"
    )
    proc = _run(["-c", str(cfg), "behaviour:application"])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "is a gunicorn server hook" in line]
    assert [line.split(": `")[0].rsplit(":", 1)[-1] for line in lines] == ["6", "9"], proc.stderr
    assert "`ssl_context` is a gunicorn server hook corral cannot run: corral serves plain HTTP" in lines[1]


def test_common_gunicorn_settings_that_ask_for_what_corral_does_anyway(tmp_path):
    """Settings often found in gunicorn files that ask for part of what corral
    does already, or for nothing: taken, with a note saying so."""
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(
        "secure_scheme_headers = {'X-Forwarded-Proto': 'https'}\ncapture_output = True\nerrorlog = '-'\n"
    )
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert f"{cfg}:1: gunicorn's `secure_scheme_headers` names only part of gunicorn's default" in proc.stderr
    assert f"{cfg}:2: gunicorn's `capture_output` without an errorlog file is not needed" in proc.stderr
    assert _printed(proc.stdout)["capture-output"][1] == "default"
    log = tmp_path / "error.log"
    cfg.write_text(f"capture_output = True\nerrorlog = {str(log)!r}\n")
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["capture-output"] == ("true", f"config file {cfg}:1")


def test_a_gunicorn_configuration_module_and_a_python_looking_toml_file(tmp_path):
    (tmp_path / "deploy_conf.py").write_text("workers = 4\n")
    # Found in the current directory, as gunicorn finds it.
    proc = _run(["--config", "python:deploy_conf", "--print-config", "behaviour:application"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["workers"] == ('"4"', f"config file {tmp_path / 'deploy_conf.py'}:1")
    # A gunicorn file under another name is not taken for TOML silently.
    (tmp_path / "gunicorn.conf").write_text("import os\nworkers = 2\n")
    proc = _run(["--config", "gunicorn.conf", "behaviour:application"], cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        "this looks like Python: a gunicorn configuration file is read as one when its name ends in .py"
        in proc.stderr
    )
    # gunicorn reads ./gunicorn.conf.py unasked; corral says it does not.
    (tmp_path / "gunicorn.conf.py").write_text("workers = 2\n")
    proc = _run(["--print-config", "behaviour:application"], cwd=tmp_path)
    assert "./gunicorn.conf.py is not read unless given with -c gunicorn.conf.py" in proc.stderr
    assert _printed(proc.stdout)["workers"] == ('"1"', "default")


def test_gunicorn_command_lines_of_a_dockerfile_run(tmp_path):
    """`-k gthread` and `--proxy-protocol=v1` as gunicorn takes them; a class
    corral's workers are not is refused with why."""
    proc = _run(
        ["--print-config", "-k", "gthread", "--threads", "4", "--proxy-protocol=v1", "behaviour:application"]
    )
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["proxy-protocol"] == ("true", "command line")
    proc = _run(["--print-config", "--proxy-protocol=off", "behaviour:application"])
    assert _printed(proc.stdout)["proxy-protocol"] == ("false", "command line")
    proc = _run(["--print-config", "-k", "gevent", "behaviour:application"])
    assert proc.returncode == 2
    assert "corral's workers are gunicorn's sync and gthread kind" in proc.stderr
    proc = _run(["--print-config", "--protocol", "uwsgi", "behaviour:application"])
    assert "corral takes --uwsgi ADDR in place of --http ADDR" in proc.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('proxy_protocol = "off"\n', {"proxy-protocol": "false"}),
        ('proxy_protocol = "auto"\n', {"proxy-protocol": "true"}),
        (
            'protocol = "uwsgi"\nbind = "unix:/tmp/app.sock"\n',
            {"uwsgi": '"unix:/tmp/app.sock"', "http": "(not set)"},
        ),
        ('protocol = "uwsgi"\n', {"uwsgi": '"127.0.0.1:8000"', "http": "(not set)"}),
        ("forwarder_headers = ['SCRIPT_NAME', 'PATH_INFO']\nhttp_protocols = 'h1'\ndirty_workers = 0\n", {}),
        (
            'access_log_format = "%(h)s %(s)s"\n',
            {"access-log-format": '"%(h)s %(s)s"', "access-log": "(not set)"},
        ),
    ],
)
def test_gunicorn_27_settings_are_taken(tmp_path, text, expected):
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(text)
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    printed = _printed(proc.stdout)
    for key, value in expected.items():
        assert printed[key][0] == value, (key, printed[key])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('protocol = "h2"\n', ':1: gunicorn\'s `protocol` is "http" or "uwsgi"'),
        ("dirty_apps = ['tasks:app']\n", ":1: gunicorn's `dirty_apps` has no counterpart in corral"),
        ("http_protocols = 'h2,h1'\n", ":1: gunicorn's `http_protocols` has no counterpart in corral"),
        ("uwsgi_allow_ips = '10.0.0.5'\n", ":1: gunicorn's `uwsgi_allow_ips` has no counterpart in corral"),
    ],
)
def test_gunicorn_27_settings_corral_cannot_honour_are_refused(tmp_path, text, message):
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(text)
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_a_gunicorn_control_socket_gets_a_note(tmp_path):
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text("control_socket = '/run/app.ctl'\n")
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert "gunicorn's `control_socket` is not needed: corral has no control socket" in proc.stderr


def test_an_access_log_format_without_an_access_log_is_taken_with_a_warning(start_server):
    server = start_server("behaviour:application", "--access-log-format", "%(h)s").wait_started()
    server.wait_for(r"--access-log-format is set, but no access log is written without --access-log")


def test_notes_about_a_gunicorn_file_are_in_its_error_log_file(tmp_path):
    log = tmp_path / "error.log"
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(f"timeout = 30\nerrorlog = {str(log)!r}\n")
    server = Server("behaviour:application", "-c", str(cfg))
    try:
        wait_until(lambda: log.exists() and "Worker ready" in log.read_text())
        text = log.read_text()
        assert (
            "gunicorn's `timeout` (how long a worker may stay silent) is taken as corral's --timeout" in text
        )
    finally:
        server.cleanup()


# -- a uWSGI ini file (--config uwsgi.ini) ------------------------------------------

UWSGI_INI = """\
; a deployment as uWSGI ran it
[uwsgi]
project = behaviour
base = {apps}
chdir = %(base)
module = %(project):application
master = true
processes = 2
threads = 2
socket = {tmp}/%n.sock
chmod-socket = 660
vacuum = true
harakiri = 30
max-requests = 5000
max-requests-delta = 100
env = GREETING=from-$(INI_WORD)
http-socket = 127.0.0.1:{port}
enable-threads = true
static-map = /files=%d

[other]
processes = 9
"""


@pytest.mark.parametrize(
    ("value", "mode"), [("", "666"), ("1", "666"), ("660", "660"), ("6", None), ("0666", None)]
)
def test_a_uwsgi_ini_files_chmod_socket_is_read_as_uwsgi_reads_it(tmp_path, value, mode):
    """A bare chmod-socket, which uWSGI's parser gives as 1, is 666 (it was
    taken as mode 001, which no front end can connect to); a value that is
    not three octal digits is refused as uWSGI refuses it."""
    ini = tmp_path / "site.ini"
    ini.write_text(f"[uwsgi]\nsocket = {tmp_path}/s.sock\nchmod-socket = {value}\n")
    proc = _run(["--config", str(ini), "--print-config", "behaviour:application"], cwd=APPS)
    if mode is None:
        assert proc.returncode == 2, proc.stdout
        assert f"{ini}:3: `chmod-socket = {value}` is not a mode uWSGI takes" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert _printed(proc.stdout)["socket-mode"][0] == f'"{mode}"'


@pytest.mark.parametrize(("disable", "logged"), [("true", False), ("false", True)])
def test_a_uwsgi_ini_files_disable_logging_wins_over_its_req_logger(tmp_path, disable, logged):
    """uWSGI writes no request log with disable-logging, whatever req-logger says."""
    ini = tmp_path / "site.ini"
    ini.write_text(f"[uwsgi]\nreq-logger = file:{tmp_path}/acc.log\ndisable-logging = {disable}\n")
    proc = _run(["--config", str(ini), "--print-config", "behaviour:application"], cwd=APPS)
    assert proc.returncode == 0, proc.stderr
    access = _printed(proc.stdout)["access-log"][0]
    assert access == (f'"{tmp_path}/acc.log"' if logged else "(not set)"), access


def test_a_uwsgi_ini_file_is_read_as_uwsgi_reads_it(start_server, tmp_path):
    """The [uwsgi] section's options become corral's, with uWSGI's expansions
    (%d, %n, $(VAR), %(placeholder)); what corral does anyway gets a note."""
    port = free_port()
    ini = tmp_path / "site.ini"
    ini.write_text(UWSGI_INI.format(apps=APPS, tmp=tmp_path, port=port))
    (tmp_path / "hello.txt").write_text("static hello\n")
    proc = _run(["--config", str(ini), "--print-config"], env={"INI_WORD": "ini"})
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    at = f"config file {ini}:"
    assert got["app"] == ('"behaviour:application"', at + "6")
    assert got["workers"] == ('"2"', at + "8")
    assert got["uwsgi"] == (f'"unix:{tmp_path}/site.sock"', at + "10")
    assert got["socket-mode"] == ('"660"', at + "11")
    assert got["timeout"] == ('"30"', at + "13")
    assert got["max-requests-jitter"] == ('"100"', at + "15")
    assert got["env"] == ('"GREETING=from-ini"', at + "16")
    assert got["static-map"] == (f'"/files={tmp_path}/"', at + "19")
    for line, key in ((7, "master"), (12, "vacuum"), (18, "enable-threads")):
        assert f"{ini}:{line}: uWSGI's `{key}` is not needed" in proc.stderr, proc.stderr

    server = start_server(
        str(ini), "--config", http=None, pythonpath=None, env={"INI_WORD": "ini"}, wait=False
    )
    server.expected_workers = 2
    server.wait_started()
    assert server.port == port and len(server.worker_pids()) == 2
    assert server.get_json("/os-environ?key=GREETING") == {"value": "from-ini"}
    assert server.request("GET", "/files/hello.txt").body == b"static hello\n"
    sock = tmp_path / "site.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        pairs = b"".join(
            len(k).to_bytes(2, "little") + k + len(v).to_bytes(2, "little") + v
            for k, v in (
                (b"REQUEST_METHOD", b"GET"),
                (b"PATH_INFO", b"/pid"),
                (b"SERVER_PROTOCOL", b"HTTP/1.1"),
            )
        )
        s.sendall(b"\x00" + len(pairs).to_bytes(2, "little") + b"\x00" + pairs)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200") and int(out.split(b"\r\n\r\n", 1)[1]) in server.worker_pids()


def test_a_uwsgi_ini_section_a_wsgi_file_and_a_virtualenv(tmp_path):
    """uWSGI's `--ini file:section`; `wsgi-file` with `callable`; `home` naming
    the virtualenv corral runs in is taken."""
    ini = tmp_path / "app.ini"
    ini.write_text(
        "[uwsgi]\nprocesses = 9\n\n[prod]\n"
        f"chdir = {APPS}\nwsgi-file = behaviour.py\ncallable = application\nhome = {sys.prefix}\n"
        "http-socket = :8123\n"
    )
    proc = _run(["--config", f"{ini}:prod", "--print-config"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    # Loaded by its path, as uWSGI loads it: its directory stays off sys.path.
    assert got["app"] == (f'"{APPS}/behaviour.py:application"', f"config file {ini}:6")
    assert got["pythonpath"][1] == "default"
    assert got["http"] == ('"0.0.0.0:8123"', f"config file {ini}:9")
    assert got["workers"][1] == "default"
    assert f"{ini}:8: uWSGI's `home` is the virtualenv corral runs in" in proc.stderr


def test_uwsgi_options_corral_cannot_honour_are_all_named_with_their_lines(tmp_path):
    ini = tmp_path / "uwsgi.ini"
    ini.write_text(
        "[uwsgi]\nmodule = behaviour:application\nspooler = /var/spool/app\nhome = /opt/other-venv\n"
        "socket = @abstract\nmystery-option = 1\nmount = /a=behaviour:application\n"
        "mount = /b=behaviour:application\nchdir = %(nowhere)\n"
    )
    proc = _run(["--config", str(ini), "--print-config"])
    assert proc.returncode == 2, proc.stderr
    assert f"{ini}:9: `chdir`: %(nowhere) names no option or placeholder set above it" in proc.stderr
    ini.write_text(ini.read_text().replace("chdir = %(nowhere)\n", ""))
    proc = _run(["--config", str(ini), "--print-config"])
    assert proc.returncode == 2, proc.stderr
    for expected in (
        f"{ini}:3: uWSGI's `spooler` has no counterpart in corral: corral runs no background jobs",
        f"{ini}:4: uWSGI's `home` names the virtualenv /opt/other-venv, but corral runs with the Python",
        f"{ini}:5: `socket`: an abstract unix socket",
        f"{ini}:6: `mystery-option` is not a uWSGI option corral knows",
        f"{ini}:8: uWSGI's `mount` is given more than once",
    ):
        assert expected in proc.stderr, proc.stderr
    ini.write_text("[uwsgi-prod]\nprocesses = 2\n")
    proc = _run(["--config", str(ini), "--print-config", "behaviour:application"])
    assert proc.returncode == 2 and "no [uwsgi] section" in proc.stderr, proc.stderr


def test_a_uwsgi_mount_is_a_prefix_only_with_manage_script_name_and_never_beside_a_module(tmp_path):
    """uWSGI takes a mount's prefix off PATH_INFO only with manage-script-name;
    a mount beside a module is two apps, which corral does not serve."""
    ini = tmp_path / "uwsgi.ini"
    ini.write_text("[uwsgi]\nmount = /x=behaviour:application\nhttp-socket = 127.0.0.1:8123\n")
    proc = _run(["--config", str(ini), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["app"] == ('"behaviour:application"', f"config file {ini}:2")
    assert got["mount"][1] == "default", got["mount"]
    assert (
        f"{ini}:2: `mount` without `manage-script-name`: uWSGI neither takes /x off PATH_INFO" in proc.stderr
    )
    # uWSGI takes any value but false, off, no and 0 as true.
    base = ini.read_text()
    for value in ("true", "enabled", "2", ""):
        ini.write_text(base + f"manage-script-name = {value}\n")
        proc = _run(["--config", str(ini), "--print-config"])
        assert proc.returncode == 0, proc.stderr
        assert _printed(proc.stdout)["mount"] == ('"/x"', f"config file {ini}:2"), value
        assert "manage-script-name" not in proc.stderr, proc.stderr
    ini.write_text(base + "manage-script-name = off\n")
    proc = _run(["--config", str(ini), "--print-config"])
    assert _printed(proc.stdout)["mount"][1] == "default"
    for order in (
        "mount = /x=behaviour:application\nmodule = other\n",
        "module = other\nmount = /x=behaviour:application\n",
    ):
        ini.write_text("[uwsgi]\n" + order + "manage-script-name = true\n")
        proc = _run(["--config", str(ini), "--print-config"])
        assert proc.returncode == 2, proc.stderr
        assert (
            "`module = other`" in proc.stderr
            and "name two apps, which uWSGI serves side by side" in proc.stderr
        )


def test_gunicorn_counts_are_read_as_gunicorn_reads_them(tmp_path):
    """A count given as a string is a number to gunicorn; a negative one is refused."""
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text('max_requests = "1000"\nmax_requests_jitter = "0x10"\n')
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["max-requests"] == ('"1000"', f"config file {cfg}:1")
    assert got["max-requests-jitter"] == ('"16"', f"config file {cfg}:2")
    for text in ("max_requests = -5\n", "max_requests = 100\nmax_requests_jitter = -1\n"):
        cfg.write_text(text)
        proc = _run(["-c", str(cfg), "--check-config", "behaviour:application"])
        assert proc.returncode == 2 and "is negative" in proc.stderr, proc.stderr


def test_a_stats_address_taken_is_a_bind_failure_as_any_listener_is(tmp_path):
    """Exit 1 for a listener that cannot be bound, --stats too; 2 is for configuration errors."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args in (["--http", "127.0.0.1:0", "--stats"], ["--http"]):
            proc = _run(["--pythonpath", str(APPS), *args, f"127.0.0.1:{port}", "behaviour:application"])
            assert proc.returncode == 1, (args, proc.stderr)
            assert f"cannot bind 127.0.0.1:{port}: address already in use" in proc.stderr, proc.stderr


def test_check_config_refuses_what_a_start_refuses(tmp_path):
    for args, said in (
        (["--pidfile", str(tmp_path)], f"--pidfile {tmp_path}: a directory"),
        (["--access-log", ""], "--access-log : an empty path"),
        (["--error-log", ""], "--error-log : an empty path"),
        # No listener given: the default one is what --stats must not take.
        (
            ["--stats", "127.0.0.1:8000"],
            "--stats 127.0.0.1:8000 overlaps the default --http 127.0.0.1:8000",
        ),
        # A start would not resolve it either.
        (["--stats", "no-such-host.invalid"], "--stats no-such-host.invalid: cannot resolve"),
    ):
        proc = _run(["--check-config", "--pythonpath", str(APPS), *args, "behaviour:application"])
        assert proc.returncode == 2 and said in proc.stderr, (args, proc.stderr)


def test_two_listeners_on_one_port_are_named_with_where_each_was_set(tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text('http = ["127.0.0.1:8000"]\nstats = "127.0.0.1:8000"\n')
    for check in ("--check-config", "--print-config"):
        proc = _run(["--config", str(cfg), check, "behaviour:application"])
        assert proc.returncode == 2, proc.stderr
        assert "--stats 127.0.0.1:8000 overlaps --http 127.0.0.1:8000" in proc.stderr, proc.stderr
        assert f"(set in {cfg}:2, {cfg}:1)" in proc.stderr, proc.stderr
    proc = _run(
        ["--check-config", "--pythonpath", str(APPS), "behaviour:application"],
        env={"CORRAL_STATS": "127.0.0.1:8000"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "(set in the environment variable CORRAL_STATS)" in proc.stderr, proc.stderr


def test_gunicorns_proxy_protocol_mode_may_follow_a_space():
    proc = _run(["--proxy-protocol", "v2", "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["proxy-protocol"] == ("true", "command line")


def test_a_mistyped_option_variable_gets_a_note():
    proc = _run(
        ["--print-config", "--env", "CORRAL_APP_SETTING=1", "behaviour:application"],
        env={"CORRAL_WOKRERS": "4", "CORRAL_APP_SETTING": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "note: the environment variable CORRAL_WOKRERS is not one corral reads (did you mean CORRAL_WORKERS?)"
        in proc.stderr
    ), proc.stderr
    # One the app is given with --env is the app's.
    assert "CORRAL_APP_SETTING" not in proc.stderr, proc.stderr


def test_gunicorn_cmd_args_rank_under_the_command_line_and_over_a_config_file(tmp_path):
    """As gunicorn takes GUNICORN_CMD_ARGS (Azure App Service and many images set it)."""
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text("workers = 7\ntimeout = 99\nthreads = 4\n")
    env = {
        "GUNICORN_CMD_ARGS": "--bind=0.0.0.0:8123 -w 3 --threads 2 --worker-tmp-dir /dev/shm --access-logfile -"
    }
    proc = _run(["-c", str(cfg), "--threads", "5", "--print-config", "behaviour:application"], env=env)
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["http"] == ('"0.0.0.0:8123"', "environment GUNICORN_CMD_ARGS")
    assert got["workers"] == ('"3"', "environment GUNICORN_CMD_ARGS")
    assert got["threads"] == ('"5"', "command line")
    assert got["timeout"] == ('"99"', f"config file {cfg}:2")
    assert got["access-log"] == ('"-"', "environment GUNICORN_CMD_ARGS")
    assert "gunicorn's --worker-tmp-dir /dev/shm is not needed" in proc.stderr
    bad = _run(["--print-config", "behaviour:application"], env={"GUNICORN_CMD_ARGS": "-w many"})
    assert bad.returncode == 2 and "(that value comes from environment GUNICORN_CMD_ARGS)" in bad.stderr, (
        bad.stderr
    )


@pytest.mark.parametrize("name", ["wsgi.py", "django.wsgi"])
def test_an_app_file_given_by_its_path_is_loaded_as_uwsgi_loads_a_wsgi_file(start_server, tmp_path, name):
    """Its directory is not put on sys.path, where a module beside it (a
    Django project's celery.py) would hide a package of the same name."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "json.py").write_text("raise ImportError('the json beside the app file was imported')\n")
    (proj / name).write_text(
        "import json, sys\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'application/json')])\n"
        "    return [json.dumps(sys.path).encode()]\n"
    )
    server = start_server(f"{proj / name}:application", pythonpath=None)
    assert str(proj) not in server.get_json("/")


def test_uwsgi_ini_values_as_uwsgi_reads_them(tmp_path):
    """Paths uWSGI opens after its chdir are taken from there; a socket with
    no port is a unix socket; an unset $(VAR) stays as written; a number's
    trailing words are ignored; buffer-size raises the head limits."""
    site = tmp_path / "site"
    (site / "assets").mkdir(parents=True)
    ini = tmp_path / "app.ini"
    ini.write_text(
        f"[uwsgi]\nchdir = {site}\nmodule = behaviour:application\nsocket = app.sock\n"
        "http-socket = 127.0.0.1:8123\ntouch-reload = reload.txt\nstatic-map = /assets=assets\n"
        "env = SECRET=$(CORRAL_INI_UNSET_VAR)\nprocesses = 2 ; two workers\nharakiri = 30 # seconds\n"
        "buffer-size = 32768\nlazy-apps = true\npython-autoreload = 1\ncheaper-algo = spare\nhttp-timeout = 300\n"
    )
    proc = _run(["--config", str(ini), "--print-config", "--pythonpath", str(APPS)])
    assert proc.returncode == 0, proc.stderr
    got = {k: v[0] for k, v in _printed(proc.stdout).items()}
    assert got["uwsgi"] == f'"unix:{site}/app.sock"'
    assert got["touch-reload"] == f'"{site}/reload.txt"'
    assert got["static-map"] == f'"/assets={site}/assets"'
    assert got["env"] == '"SECRET=$(CORRAL_INI_UNSET_VAR)"'
    assert (got["workers"], got["timeout"]) == ('"2"', '"30"')
    assert got["limit-request-field-size"] == got["limit-request-line"] == '"32768"'
    assert got["reload"] == "true"
    assert "uWSGI's `cheaper-algo` is not needed" in proc.stderr
    assert "uWSGI's `http-timeout` is not needed: corral has no HTTP router" in proc.stderr
    ini.write_text(
        "[uwsgi]\nmodule = behaviour:application\nlog-format = %(addr) - %(user) [%(ltime)]\n"
        "stats = /run/stats.sock\nwsgi-file = other.py\n"
    )
    proc = _run(["--config", str(ini), "--print-config"])
    assert proc.returncode == 2, proc.stderr
    for said in (
        ":3: uWSGI's `log-format` has no counterpart in corral: corral's --access-log-format takes gunicorn's atoms",
        ":4: uWSGI's `stats` on a unix socket",
        f":2: `module = behaviour:application` ({ini}:2), `wsgi-file = other.py` ({ini}:5) name an app each",
    ):
        assert said in proc.stderr, proc.stderr


def test_a_uwsgi_ini_includes_another_where_it_stands(tmp_path):
    """`ini = FILE` and `ini = :SECTION` are read in place, as uWSGI reads
    them, each option keeping the file and line it came from."""
    base, site = tmp_path / "base.ini", tmp_path / "site.ini"
    base.write_text("[uwsgi]\nmodule = behaviour:application\nprocesses = 3\nharakiri = 20\n")
    site.write_text(
        f"[uwsgi]\nini = {base}\nprocesses = 5\nini = :prod\nlazy-apps = true\n\n[prod]\nharakiri = 60\n"
    )
    proc = _run(["--config", str(site), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["app"] == ('"behaviour:application"', f"config file {base}:2")
    assert got["workers"] == ('"5"', f"config file {site}:3")
    assert got["timeout"] == ('"60"', f"config file {site}:8")
    site.write_text(f"[uwsgi]\nini = {site}\n")
    proc = _run(["--config", str(site), "--print-config"])
    assert proc.returncode == 2 and "an include loop" in proc.stderr, proc.stderr


def test_uwsgi_configuration_logic_is_applied_as_uwsgi_applies_it(tmp_path):
    """`if-env` / `if-exists` ... `endif` and `for` ... `endfor` blocks, with
    `%(_)`: what a block holds is taken only when its test holds, each line of
    a `for` block once per item; a block left open is refused with its line."""
    ini = tmp_path / "app.ini"
    ini.write_text(
        "[uwsgi]\nmodule = behaviour:application\nprocesses = 2\n"
        "if-env = CORRAL_TEST_WORKERS\nprocesses = %(_)\nendif =\n"
        f"if-exists = {tmp_path}/maintenance\nharakiri = 5\nendif =\n"
        "for = 8001 8002\nhttp-socket = 127.0.0.1:%(_)\nendfor =\n"
    )
    proc = _run(["--config", str(ini), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["workers"] == ('"2"', f"config file {ini}:3")
    assert got["http"][0] == '["127.0.0.1:8001", "127.0.0.1:8002"]'
    assert got["timeout"][1] == "default"
    (tmp_path / "maintenance").touch()
    proc = _run(["--config", str(ini), "--print-config"], env={"CORRAL_TEST_WORKERS": "5"})
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["workers"] == ('"5"', f"config file {ini}:5")
    assert got["timeout"] == ('"5"', f"config file {ini}:8")
    ini.write_text("[uwsgi]\nmodule = behaviour:application\nif-env = HOME\nprocesses = 3\n")
    proc = _run(["--config", str(ini), "--print-config"])
    assert proc.returncode == 2 and f"{ini}:3: `if-env` has no `endif` below it" in proc.stderr, proc.stderr


def test_uwsgi_static_maps_serve_their_files_and_leave_the_rest_to_the_app(start_server, tmp_path):
    """uWSGI's `static-map` (a prefix mapped to several directories, a URL to
    one file) and `check-static DIR`: a GET of a file one of them has is that
    file, the first mapping that has it winning; any other request is the
    app's, as under uWSGI."""
    site = tmp_path / "site"
    for d in ("public", "more", "static", "favicons"):
        (site / d).mkdir(parents=True)
    (site / "public" / "robots.txt").write_text("User-agent: *\n")
    (site / "more" / "favicon.ico").write_bytes(b"\x00ico")
    (site / "static" / "app.css").write_text("a{}")
    (site / "static" / "both.txt").write_text("from static")
    (site / "favicons" / "both.txt").write_text("from favicons")
    (site / "favicons" / "site.png").write_bytes(b"\x89PNG")
    (site / "humans.txt").write_text("we are people\n")
    port = free_port()
    ini = tmp_path / "app.ini"
    ini.write_text(
        f"[uwsgi]\nchdir = {site}\npythonpath = {APPS}\nmodule = behaviour:application\n"
        f"http-socket = 127.0.0.1:{port}\ncheck-static = public\nstatic-map = /=more\nstatic-map = /=more\n"
        "static-map = /static=static\nstatic-map = /static=favicons\nstatic-map = /people.txt=humans.txt\n"
        "lazy-apps = true\n"
    )
    proc = _run(["--config", str(ini), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    server = start_server(str(ini), "--config", http=None, pythonpath=None, wait=False)
    server.wait_started()
    assert server.request("GET", "/robots.txt").body == b"User-agent: *\n"
    assert server.request("GET", "/favicon.ico").body == b"\x00ico"
    assert server.request("GET", "/static/app.css").body == b"a{}"
    assert server.request("GET", "/static/site.png").body == b"\x89PNG"
    assert server.request("GET", "/static/both.txt").body == b"from static"
    people = server.request("GET", "/people.txt")
    assert people.body == b"we are people\n" and people.header("content-type").startswith("text/plain")
    assert server.request("HEAD", "/static/site.png").status == 200
    for method, path in [("GET", "/nope"), ("GET", "/static/missing.css"), ("POST", "/static/app.css")]:
        r = server.request(method, path, body=b"x" if method == "POST" else b"")
        assert r.status == 200 and json.loads(r.body)["PATH_INFO"]["value"] == path, (method, path, r.body)
    assert (
        json.loads(server.request("GET", "/people.txt/more").body)["PATH_INFO"]["value"] == "/people.txt/more"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching groups needs root")
def test_user_already_run_as_keeps_the_group_it_runs_with(start_server):
    """A container's runAsGroup: --user naming the user corral runs as does
    not switch to that user's primary group (as gunicorn keeps it)."""
    keep = "import os, sys; os.setgid(23457); os.execv(sys.argv[1], sys.argv[1:])"
    server = start_server(
        "behaviour:application", "--user", "root", command=[sys.executable, "-c", keep, *CORRAL]
    )
    assert server.get_json("/ids")["gid"] == 23457


def test_gunicorn_cmd_args_take_a_proxy_protocol_mode_after_a_space():
    """`--proxy-protocol off` as the command line takes it: off, not the switch
    on with `off` taken for the APP."""
    for mode, want in (("off", "false"), ("v1", "true")):
        env = {"GUNICORN_CMD_ARGS": f"--proxy-protocol {mode}"}
        proc = _run(["--print-config", "behaviour:application"], env=env)
        assert proc.returncode == 0, proc.stderr
        got = _printed(proc.stdout)
        assert got["proxy-protocol"] == (want, "environment GUNICORN_CMD_ARGS"), mode
        assert got["app"][0] == '"behaviour:application"'


def test_a_gunicorn_file_speaking_uwsgi_makes_the_command_lines_bind_uwsgi(tmp_path):
    """gunicorn's `protocol = "uwsgi"` is for every bind: -b on the command line
    replaces the file's bind, in that protocol, and opens no HTTP listener."""
    with_bind = tmp_path / "with_bind.conf.py"
    with_bind.write_text('protocol = "uwsgi"\nbind = "127.0.0.1:19154"\n')
    without = tmp_path / "without.conf.py"
    without.write_text('protocol = "uwsgi"\n')
    for cfg in (with_bind, without):
        for bind in (["-b", "127.0.0.1:19155"], ["--bind=127.0.0.1:19155"], ["-b127.0.0.1:19155"]):
            proc = _run(["-c", str(cfg), *bind, "--print-config", "behaviour:application"])
            assert proc.returncode == 0, proc.stderr
            got = _printed(proc.stdout)
            assert got["uwsgi"] == ('"127.0.0.1:19155"', "command line"), (cfg.name, bind)
            assert got["http"][1] == "default", (cfg.name, bind)
    proc = _run(["-c", str(without), "--print-config", "behaviour:application"])
    assert _printed(proc.stdout)["uwsgi"][0] == '"127.0.0.1:8000"'


def test_a_gunicorn_files_capture_output_uses_the_error_log_from_anywhere(tmp_path):
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text("capture_output = True\n")
    log = tmp_path / "error.log"
    for args, env in (([f"--error-log={log}"], {}), ([], {"CORRAL_ERROR_LOG": str(log)})):
        proc = _run(["-c", str(cfg), *args, "--print-config", "behaviour:application"], env=env)
        assert proc.returncode == 0, proc.stderr
        assert _printed(proc.stdout)["capture-output"][0] == "true", (args, env)
        assert "capture_output` without an errorlog file" not in proc.stderr
    # The file's errorlog replaced by stderr on the command line: nothing to capture to.
    both = tmp_path / "both.conf.py"
    both.write_text(f"capture_output = True\nerrorlog = {str(log)!r}\n")
    proc = _run(["-c", str(both), "--error-log", "-", "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["capture-output"] == ("false", "default")
    assert "capture_output` without an errorlog file is not needed" in proc.stderr


def test_a_gunicorn_files_jitter_applies_to_max_requests_given_elsewhere(tmp_path):
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text("max_requests_jitter = 1000\n")
    proc = _run(["-c", str(cfg), "--max-requests", "2", "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["max-requests-jitter"] == ('"1000"', f"config file {cfg}:1")
    # max_requests 0 (off) on the command line: the jitter means nothing.
    proc = _run(["-c", str(cfg), "--max-requests", "0", "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["max-requests-jitter"] == ('"0"', "default")


def test_a_gunicorn_files_reload_extra_files_follow_reload_from_anywhere(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("x")
    only_files = tmp_path / "files.conf.py"
    only_files.write_text(f"reload_extra_files = [{str(extra)!r}]\n")
    proc = _run(["-c", str(only_files), "--reload", "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["touch-reload"][0] == f'"{extra}"'
    reloading = tmp_path / "reloading.conf.py"
    reloading.write_text(f"reload = True\nreload_extra_files = [{str(extra)!r}]\n")
    proc = _run(["-c", str(reloading), "--reload=false", "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["reload"] == ("false", "command line")
    assert got["touch-reload"][1] == "default"
    # The string "false", as gunicorn reads it, is no reload either.
    reloading.write_text(f"reload = 'false'\nreload_extra_files = [{str(extra)!r}]\n")
    proc = _run(["-c", str(reloading), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["reload"] == ("false", f"config file {reloading}:1")
    assert got["touch-reload"][1] == "default"


def test_a_gunicorn_files_reload_extra_files_are_from_its_chdir(tmp_path):
    """gunicorn's reloader runs after the chdir: relative names and patterns
    there are from it (they were from where corral started, so a pattern
    matched nothing and an edit reloaded nothing)."""
    site = tmp_path / "site"
    (site / "tpl").mkdir(parents=True)
    (site / "tpl" / "a.html").write_text("a")
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(
        f'reload = True\nchdir = {str(site)!r}\nreload_extra_files = ["tpl/*.html", "conf.txt"]\n'
    )
    proc = _run(["-c", str(conf), "--print-config", "behaviour:application"], cwd=APPS)
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["touch-reload"][0] == f'["{site}/tpl/a.html", "{site}/conf.txt"]'
    assert "matches no file" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("umask", "mode"), [('"0o022"', "755"), ("0o022", "755"), ('"18"', "755"), ('"0"', "777")]
)
def test_a_gunicorn_files_umask_is_read_as_gunicorn_reads_it(tmp_path, umask, mode):
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(f'bind = "unix:{tmp_path}/s.sock"\numask = {umask}\n')
    proc = _run(["-c", str(conf), "--print-config", "behaviour:application"], cwd=APPS)
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["socket-mode"][0] == f'"{mode}"'


def test_a_gunicorn_files_umask_string_with_a_leading_zero_is_refused(tmp_path):
    """gunicorn reads a string umask with int(v, 0), which refuses "0022"; it
    was read as decimal 22, a mode of 751 where 755 was meant."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(f'bind = "unix:{tmp_path}/s.sock"\numask = "0022"\n')
    proc = _run(["-c", str(conf), "--print-config", "behaviour:application"], cwd=APPS)
    assert proc.returncode == 2, proc.stdout
    assert f'{conf}:2: gunicorn\'s `umask` "0022" has a leading zero' in proc.stderr, proc.stderr


def test_a_gunicorn_files_reload_extra_files_patterns_are_the_files_they_match(start_server, tmp_path):
    """gunicorn expands glob patterns there; they were taken as file names,
    which never change, so a template's edit reloaded nothing."""
    (tmp_path / "templates" / "sub").mkdir(parents=True)
    (tmp_path / "templates" / "t.html").write_text("<p>one</p>")
    (tmp_path / "templates" / "sub" / "u.html").write_text("<p>two</p>")
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(
        'reload = True\nreload_extra_files = ["templates/*.html", "templates/**/*.html", "none/*.x"]\n'
    )
    server = start_server("behaviour:application", "-c", str(conf), cwd=tmp_path)
    server.wait_for(r'pattern "templates/\*\.html" is the 1 file\(s\) it matches at start')
    server.wait_for(r'pattern "none/\*\.x" matches no file now')
    for template in ("t.html", "sub/u.html"):
        mark = server.mark()
        (tmp_path / "templates" / template).write_text("<p>edited</p>")
        server.wait_for(
            rf"templates/{re.escape(template)} was touched \(--touch-reload\); reloading", since=mark
        )
        server.wait_for(READY_RE.pattern, since=mark, timeout=20)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("corral.toml", "workers = 4\n"),
        ("gunicorn.conf.py", "workers = 4\n"),
        ("uwsgi.ini", "[uwsgi]\nprocesses = 4\n"),
    ],
)
def test_the_command_line_switches_a_files_pool_between_fixed_and_adaptive(tmp_path, name, text):
    cfg = tmp_path / name
    cfg.write_text(text)
    proc = _run(
        [
            "-c",
            str(cfg),
            "--workers-min",
            "2",
            "--workers-max",
            "4",
            "--print-config",
            "behaviour:application",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert (got["workers-min"][0], got["workers-max"][0], got["workers"][1]) == ('"2"', '"4"', "default")
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"], env={"CORRAL_WORKERS": "3"})
    assert proc.returncode == 0, proc.stderr
    assert _printed(proc.stdout)["workers"] == ('"3"', "environment CORRAL_WORKERS")
    # An adaptive pool in the file, a fixed one asked for on the command line.
    adaptive = tmp_path / "adaptive.toml"
    adaptive.write_text("workers-min = 2\nworkers-max = 6\n")
    proc = _run(["-c", str(adaptive), "--workers", "3", "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    got = _printed(proc.stdout)
    assert got["workers"] == ('"3"', "command line")
    assert got["workers-min"][1] == got["workers-max"][1] == "default"
    # Only the top raised there: the file's low end stays.
    proc = _run(["-c", str(adaptive), "--workers-max", "9", "--print-config", "behaviour:application"])
    got = _printed(proc.stdout)
    assert (got["workers-min"][0], got["workers-max"]) == ('"2"', ('"9"', "command line"))


@pytest.mark.parametrize("line", ["lazy-apps = false\n", ""])
def test_a_uwsgi_ini_that_imports_in_the_master_gets_a_note(tmp_path, line):
    ini = tmp_path / "app.ini"
    ini.write_text(f"[uwsgi]\nmodule = behaviour:application\n{line}")
    proc = _run(["--config", str(ini), "--print-config", "--pythonpath", str(APPS)])
    assert proc.returncode == 0, proc.stderr
    assert "uWSGI imports the app once in its master before forking" in proc.stderr
    assert _printed(proc.stdout)["preload"][0] == "false"


@pytest.mark.parametrize("crash", ["exit", "segv"])
def test_check_config_says_an_import_that_kills_its_process_failed(crash):
    """An app that calls os._exit or crashes at import is a failure to load (1)
    with a word on what happened, not its own exit code or a signal's."""
    proc = _run(["--check-config", "exit_at_boot:application"], env={"CORRAL_TEST_CRASH": crash}, cwd=APPS)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    said = "exited with code 7" if crash == "exit" else "was killed by SIGSEGV"
    assert f"exit_at_boot:application failed to load: the import {said}" in proc.stderr, proc.stderr


def test_a_pidfile_that_cannot_be_written_is_refused_before_binding(tmp_path):
    port = free_port()
    for path, said in [(tmp_path / "no" / "x.pid", "no directory"), (tmp_path, "a directory")]:
        proc = _run(
            ["--http", f"127.0.0.1:{port}", "--pidfile", str(path), "behaviour:application"], cwd=APPS
        )
        assert proc.returncode == 2, proc.stderr
        assert f"--pidfile {path}: {said}" in proc.stderr
        assert "Listening at" not in proc.stderr


def test_a_umask_is_permission_bits_only():
    proc = _run(["--umask", "1777", "--check-config", "behaviour:application"], cwd=APPS)
    assert proc.returncode == 2
    assert "is not a umask (at most 777)" in proc.stderr


def test_jitter_without_recycling_is_reported(start_server):
    server = start_server("behaviour:application", "--max-requests", "0", "--max-requests-jitter", "5")
    server.wait_for(r"--max-requests-jitter is not used: --max-requests is 0")


def test_jitter_alone_is_taken_with_a_warning_as_gunicorn_takes_it(start_server):
    server = start_server("behaviour:application", "--max-requests-jitter", "5")
    server.wait_for(r"--max-requests-jitter is not used: it varies --max-requests, which is not given")
    assert server.request("GET", "/fixed").status == 200


def test_backlog_applies_to_an_inherited_socket(tmp_path):
    """gunicorn listens again with --backlog on a socket it inherits; without
    --backlog the creator's backlog stays."""
    port = free_port()
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(5)
    try:
        # Without --backlog first: a listen() with it would stay on the socket.
        for args, backlog in [([], 5), (["--backlog", "33"], 33)]:
            proc = subprocess.Popen(
                [*CORRAL, "--http", f"fd://{sock.fileno()}", *args, "behaviour:application"],
                pass_fds=[sock.fileno()],
                stderr=subprocess.PIPE,
                text=True,
                cwd=APPS,
                start_new_session=True,
            )
            try:
                seen = []

                def listening(seen=seen, backlog=backlog):
                    seen.append(_listen_backlog(port))
                    return seen[-1] == backlog

                assert wait_until(listening, timeout=15), seen[-3:]
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
                proc.stderr.close()
    finally:
        sock.close()


def _listen_backlog(port):
    """The backlog `ss` shows for a listening TCP port (its Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False
    ).stdout
    fields = out.split()
    return int(fields[2]) if len(fields) > 2 else None


def test_check_config_does_not_take_an_import_exiting_0_for_a_verdict(tmp_path):
    (tmp_path / "quits.py").write_text("import os\nos._exit(0)\n")
    proc = _run(["--check-config", "--pythonpath", str(tmp_path), "quits:application"])
    assert proc.returncode == 1, proc.stderr
    assert "quits:application failed to load: the import exited with code 0" in proc.stderr


def test_gunicorn_booleans_given_as_strings(tmp_path):
    """A gunicorn file that reads its switches from the environment gives them
    as strings: taken as gunicorn takes them ("true" and "false", in any case);
    anything else is refused, as gunicorn refuses it."""
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text(
        "import os\npreload_app = os.environ.get('PRELOAD', 'False')\nreuse_port = 'TRUE'\nreload = ' true '\n"
    )
    proc = _run(["-c", str(cfg), "--print-config", "behaviour:application"])
    assert proc.returncode == 0, proc.stderr
    printed = _printed(proc.stdout)
    assert printed["preload"] == ("false", f"config file {cfg}:2")
    assert printed["reuse-port"] == ("true", f"config file {cfg}:3")
    assert printed["reload"][0] == "true"
    cfg.write_text("preload_app = 'yes'\n")
    proc = _run(["-c", str(cfg), "behaviour:application"])
    assert proc.returncode == 2
    assert f"{cfg}:1: `preload` must be true or false (as gunicorn takes it" in proc.stderr


def test_the_last_of_a_repeated_option_wins(tmp_path):
    """As in gunicorn and uWSGI: `corral $DEFAULTS "$@"` overrides a default."""
    got = _printed(_run(["--workers", "4", "--workers", "2", "--print-config", "x:app"]).stdout)
    assert got["workers"] == ('"2"', "command line")


def test_an_unknown_option_in_gunicorn_cmd_args_is_named_as_coming_from_there():
    proc = _run(["x:app"], env={"GUNICORN_CMD_ARGS": "--wokers 3"})
    assert proc.returncode == 2
    assert "(--wokers is in the environment variable GUNICORN_CMD_ARGS)" in proc.stderr, proc.stderr


def test_socket_mode_takes_permission_bits_only():
    proc = _run(["--socket-mode", "4777", "--check-config", "x:app"])
    assert proc.returncode == 2 and "is not a socket mode (at most 777)" in proc.stderr, proc.stderr


def test_a_failed_start_with_an_error_log_file_says_where_the_reason_is(tmp_path):
    """The reason goes to the --error-log file; the terminal (or the
    service manager's journal) is told where to look."""
    log = tmp_path / "error.log"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run(
            ["--http", f"127.0.0.1:{port}", "--error-log", str(log), "behaviour:application"], cwd=APPS
        )
    assert proc.returncode == 1
    assert f"corral: exited with code 1; the reason is in the error log {log}" in proc.stderr, proc.stderr
    assert "in use" in log.read_text(), log.read_text()


def test_gunicorns_initgroups_flag_is_left_out_with_a_note():
    proc = _run(
        ["--check-config", "--pythonpath", str(APPS), "behaviour:application"],
        env={"GUNICORN_CMD_ARGS": "--initgroups"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "gunicorn's --initgroups is not needed: --user always gives the workers the user's groups"
        in proc.stderr
    )


def test_request_limits_without_an_http_listener_are_said_to_be_unused(start_server):
    """They limit what HTTP clients send; uwsgi, FastCGI and SCGI carry what a
    front end, with its own limits, let through."""
    server = start_server(
        "behaviour:application",
        "--scgi",
        "127.0.0.1:0",
        "--limit-request-fields",
        "5",
        "--limit-request-line",
        "100",
        http=None,
        wait=False,
    )
    server.wait_for(
        r"--limit-request-line, --limit-request-fields are not used: they limit what HTTP clients send to "
        r"--http listeners, and there is none"
    )
