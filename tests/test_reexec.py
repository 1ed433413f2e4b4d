"""The master re-executing itself (SIGUSR2) under load, and --timeout on a
request stuck in C code with the GIL held."""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from front_ends import free_port
from support import READY_RE, IncompleteResponse, wait_until


class Load:
    """Sequential requests on new connections, each one counted."""

    def __init__(self, server, target="/fixed"):
        self.server, self.target = server, target
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                status = self.server.request("GET", self.target, timeout=10).status
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")
            except (OSError, IncompleteResponse) as e:
                self.failures.append(repr(e))

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        return self


def test_usr2_reexec_under_load_refuses_nothing(start_server):
    server = start_server("behaviour:application", workers=2, threads=2)
    old_workers = set(server.worker_pids())
    loads = [Load(server) for _ in range(3)]
    for round_ in range(3):
        mark = server.mark()
        server.signal(signal.SIGUSR2)
        server.wait_for(r"re-executing the master", since=mark)
        # The same master (pid) starts new workers, then stops the old ones.
        server.wait_for(READY_RE.pattern, count=2, since=mark, timeout=20)
        server.wait_for(r"from before the re-exec exited", count=2, since=mark, timeout=20)
        assert server.running()
    results = [load.finish() for load in loads]
    failures = [f for r in results for f in r.failures]
    assert not failures, failures
    assert sum(r.ok for r in results) > 100
    # The listening address never changed and the new workers answer.
    now = {int(server.request("GET", "/pid").body) for _ in range(10)}
    assert not now & old_workers
    assert len(server.grep(r"Listening at: http://")) == 4  # first start + 3 re-execs, same port
    ports = {m.group(0) for m in server.grep(r"Listening at: http://\S+")}
    assert len(ports) == 1, ports


def test_timeout_on_a_request_stuck_in_c_with_the_gil(start_server):
    server = start_server("c_hang:application", "--timeout", "1", workers=2, threads=2)
    stuck_pid = None
    mark = server.mark()
    started = time.monotonic()
    resp = server.request("GET", "/hang", timeout=30)
    elapsed = time.monotonic() - started
    assert resp.status == 504
    # Loose bound (the deadline is checked four times a second): it is the
    # worker's main thread, not Python, that notices.
    assert elapsed < 5, elapsed
    line = server.wait_for(r"Request timeout: GET /hang ran for .* in worker \d+ \(pid (\d+)\)", since=mark)[
        0
    ]
    stuck_pid = int(line.group(1))
    # The stack names the Python function that called into C.
    assert re.search(r"line \d+ in hold_the_gil_in_c", server.log), server.log
    # The stuck worker is replaced and then gone; the pool is whole again.
    server.wait_for(READY_RE.pattern, since=mark, timeout=20)
    assert wait_until(
        lambda: server.grep(rf"\(pid {stuck_pid}\) exited|pid {stuck_pid}\) was killed", since=mark), 30
    )
    pids = {int(server.request("GET", "/").body) for _ in range(20)}
    assert stuck_pid not in pids
    assert server.running()


@pytest.mark.parametrize("how", ["port in use", "stats on a listener's port"])
def test_a_reexec_into_listeners_it_could_not_bind_keeps_serving(start_server, tmp_path, how):
    """Only binding finds these, and once the master has re-executed nothing
    can go back: the check before it tries the new listeners (not the ones it
    keeps) and the running server goes on serving."""
    conf = tmp_path / "corral.toml"
    conf.write_text("workers = 1\n")
    server = start_server("behaviour:application", "--config", str(conf), workers=None)
    old = set(server.worker_pids())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if how == "port in use":
            conf.write_text(f'workers = 1\nuwsgi = ["127.0.0.1:{taken.getsockname()[1]}"]\n')
            said = rf"--uwsgi: cannot bind 127\.0\.0\.1:{taken.getsockname()[1]}: address already in use"
        else:
            conf.write_text(f'workers = 1\nstats = "127.0.0.1:{server.port}"\n')
            # The server listens on a port it was given as 0: only a bind finds it.
            said = rf"--stats: cannot bind 127\.0\.0\.1:{server.port}: address already in use"
        for sig in (signal.SIGUSR2, signal.SIGHUP):
            mark = server.mark()
            server.signal(sig)
            server.wait_for(
                rf"Received {sig.name}: not re-executing the master, whose new program would refuse its "
                rf"configuration: .*{said}.*The running master and workers go on serving",
                since=mark,
            )
            assert server.running()
            assert int(server.request("GET", "/pid").body) in old


def test_a_configuration_file_that_hangs_does_not_hang_the_master(start_server, tmp_path):
    """The new program's check of a changed gunicorn file that waits on
    something (a secret fetched from afar) is stopped after a while: the
    master goes back to supervising, and replaces a worker that died."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("workers = 1\n")
    server = start_server("behaviour:application", "-c", str(conf), workers=None)
    conf.write_text("import time\ntime.sleep(600)\nworkers = 1\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(
        r"Received SIGHUP: not re-executing the master, whose new program would refuse its configuration: "
        r"checking it took longer than 10 s",
        since=mark,
        timeout=40,
    )
    [old] = server.worker_pids()
    mark = server.mark()
    os.kill(old, signal.SIGKILL)
    assert wait_until(lambda: server.worker_pids(since=mark), 20), server.log[-3000:]
    assert server.request("GET", "/fixed").status == 200
    # The check was stopped, not left running.
    assert not [p for p in os.listdir("/proc") if p.isdigit() and "--print-config" in _cmdline(p, str(conf))]


def _cmdline(pid, having):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read().decode(errors="replace")
    except OSError:
        return ""
    return line if having in line else ""


def _answers_health(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    except ConnectionRefusedError:
        return False


def _accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


def test_a_reexec_takes_over_each_listener_by_its_address(start_server, tmp_path):
    """A configuration read again may add, remove or reorder listeners: each
    socket the running master holds goes to the listener with its address
    (the --stats one included), the others are bound anew or closed. Matched
    by place in the list, an added listener made the new program bind the
    stats port the old one still held, and the whole server exit."""
    conf = tmp_path / "corral.toml"
    # Three different ports: each is free when picked, and none is bound
    # before the next is picked, so the same one may come twice.
    ports: list[int] = []
    while len(ports) < 3:
        if (port := free_port()) not in ports:
            ports.append(port)
    stats, a, b = ports
    conf.write_text(f'workers = 1\nstats = "127.0.0.1:{stats}"\nuwsgi = ["127.0.0.1:{a}"]\n')
    server = start_server("behaviour:application", "--config", str(conf), workers=None)
    for uwsgi, closed in (([a, b], []), ([b, a], []), ([b], [a])):
        listed = ", ".join(f'"127.0.0.1:{p}"' for p in uwsgi)
        conf.write_text(f'workers = 1\nstats = "127.0.0.1:{stats}"\nuwsgi = [{listed}]\n')
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"changed, so the master re-executes", since=mark)
        server.wait_for(READY_RE.pattern, since=mark, timeout=20)
        server.wait_for(r"from before the re-exec exited", since=mark, timeout=20)
        assert server.running()
        assert server.request("GET", "/fixed").status == 200
        assert _answers_health(stats), server.log[mark:]
        assert all(_accepts(p) for p in uwsgi)
        assert not any(_accepts(p) for p in closed)
    assert server.grep(
        rf"Closing inherited listener 127\.0\.0\.1:{a} that the command line no longer asks for"
    )


def test_usr2_with_a_config_file_the_new_program_would_refuse_keeps_serving(start_server, tmp_path):
    """The new program reads the config file anew: one it would refuse (a
    typo made before the upgrade) must not end the running server."""
    conf = tmp_path / "corral.toml"
    conf.write_text("workers = 1\n")
    server = start_server("behaviour:application", "--config", str(conf), workers=None)
    old = set(server.worker_pids())
    conf.write_text("workers = 1\nworkers = 2\n")
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(
        r"Received SIGUSR2: not re-executing the master, whose new program would refuse its configuration: "
        r".*corral\.toml:2: invalid TOML.*The running master and workers go on serving",
        since=mark,
    )
    assert server.running()
    assert int(server.request("GET", "/pid").body) in old
    conf.write_text("workers = 2\n")
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(r"re-executing the master", since=mark)
    server.wait_for(READY_RE.pattern, count=2, since=mark, timeout=20)
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=20)
    assert not {int(server.request("GET", "/pid").body) for _ in range(10)} & old


def _reexecs_as_nobody():
    """Whether a root process that becomes nobody can then run this
    interpreter, as the master under --user nobody re-executes itself (an
    interpreter under a directory only root may enter cannot)."""
    if os.geteuid() != 0:
        return False
    become = (
        "import os, pwd, sys; n = pwd.getpwnam('nobody'); os.setgroups([]); os.setgid(n.pw_gid); "
        "os.setuid(n.pw_uid); "
        "os.execv(sys.executable, [sys.executable, '-c', 'pass'])"
    )
    return subprocess.run([sys.executable, "-c", become], check=False, capture_output=True).returncode == 0


def _pidfile_server(start_server, d):
    """A --user nobody server with its pid file in a directory nobody owns,
    as the README advises, started from `d`."""
    nobody = pwd.getpwnam("nobody")
    d.chmod(0o755)
    run = d / "run"
    run.mkdir()
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    pidfile = run / "corral.pid"
    server = start_server(
        "behaviour:application", "--preload", "--user", "nobody", "--pidfile", str(pidfile), cwd=d
    )
    # Written by root: not given to the user, whose code could then point
    # root's tools (logrotate's kill -USR1) at any process.
    assert pidfile.stat().st_uid == 0
    return server, pidfile


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_reexec_as_the_user_accepts_the_pidfile_root_wrote(start_server):
    """Written by root at start, in a directory --user's user may write: the
    check a re-executed master makes as that user (its --print-config)
    accepts it, as the new master replaces it."""
    d = Path(tempfile.mkdtemp(prefix="corral-pid-"))
    try:
        server, _ = _pidfile_server(start_server, d)
        nobody = pwd.getpwnam("nobody")
        check = subprocess.run(
            [
                "setpriv",
                f"--reuid={nobody.pw_uid}",
                f"--regid={nobody.pw_gid}",
                "--init-groups",
                *server.cmd,
                "--print-config",
            ],
            check=False,
            capture_output=True,
            text=True,
            cwd=d,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(not _reexecs_as_nobody(), reason="needs root, and an interpreter nobody may run")
def test_usr2_under_user_rewrites_the_pidfile(start_server):
    """The master, re-executed as --user's user, writes its pid file again
    rather than refuse its own configuration."""
    d = Path(tempfile.mkdtemp(prefix="corral-pid-"))
    try:
        server, pidfile = _pidfile_server(start_server, d)
        old = set(server.worker_pids())
        mark = server.mark()
        server.signal(signal.SIGUSR2)
        server.wait_for(r"re-executing the master", since=mark)
        server.wait_for(READY_RE.pattern, since=mark, timeout=30)
        server.wait_for(r"from before the re-exec exited", since=mark, timeout=30)
        assert "refuse its configuration" not in server.log[mark:], server.log[mark:]
        assert int(pidfile.read_text()) == server.proc.pid
        assert int(server.request("GET", "/pid").body) not in old
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
        assert not pidfile.exists(), server.log
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_a_config_file_the_user_cannot_read_is_warned_about_at_start(start_server, tmp_path):
    conf = tmp_path / "corral.toml"
    conf.write_text("workers = 1\n")
    conf.chmod(0o600)
    server = start_server(
        "behaviour:application", "--config", str(conf), "--preload", "--user", "nobody", workers=None
    )
    assert server.grep(
        r"--config .*corral\.toml: user nobody cannot read it \(owner uid 0, gid 0, mode 600\); a reload that "
        r"re-executes the master .* will be refused until it can"
    ), server.log


def test_hup_reads_a_uwsgi_ini_file_again_when_a_file_it_includes_changed(start_server, tmp_path):
    """uWSGI users expect a reload to read the whole configuration: a change in
    a file the ini file includes counts as a change of the configuration."""
    base, site = tmp_path / "base.ini", tmp_path / "site.ini"
    base.write_text("[uwsgi]\nenv = GREETING=v1\n")
    site.write_text(f"[uwsgi]\nmodule = behaviour:application\nprocesses = 1\nini = {base}\n")
    server = start_server(str(site), "--config", workers=None)
    assert server.get_json("/os-environ?key=GREETING") == {"value": "v1"}
    base.write_text("[uwsgi]\nenv = GREETING=v2\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(
        rf"Received SIGHUP: {re.escape(str(base))} changed, so the master re-executes", since=mark
    )
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=20)
    assert server.get_json("/os-environ?key=GREETING") == {"value": "v2"}


@pytest.mark.parametrize(("name", "prefix"), [("corral.toml", ""), ("gunicorn.conf.py", "file:")])
def test_hup_reads_a_changed_config_file_again(start_server, tmp_path, name, prefix):
    """As gunicorn's HUP reloads its configuration: a config file (TOML, or
    gunicorn's, here named in its file:PATH form) that changed since the
    start is read again (the master re-executes itself); one that did not
    change gets the usual reload."""
    conf = tmp_path / name
    conf.write_text("workers = 1\n")
    server = start_server("behaviour:application", "--config", prefix + str(conf), workers=None)
    _hup_reexecs_only_once_changed(
        server, lambda: conf.write_text("workers = 2\n"), rf"{re.escape(str(conf))} changed", workers=2
    )


def _hup_reexecs_only_once_changed(server, change, said, workers):
    """A HUP before `change()` is the usual reload; one after it re-executes
    the master (saying `said` changed), which then runs `workers` workers."""
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"Received SIGHUP: starting 1 new worker", since=mark, timeout=20)
    server.wait_for(READY_RE.pattern, since=mark, timeout=20)
    assert not server.grep(r"re-executing the master", since=mark)
    change()
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(rf"Received SIGHUP: {said}, so the master re-executes", since=mark)
    server.wait_for(READY_RE.pattern, count=workers, since=mark, timeout=20)
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=20)
    assert len(server.worker_pids(since=mark)) == workers


def test_what_a_preloaded_import_changed_in_the_environment_is_undone_for_a_reexec(start_server):
    """An app that takes a secret out of the environment at import, and puts
    a directory in front of a PATH-like variable: each HUP (a re-exec with
    --preload) imports it again in the environment of the first start. The
    re-executed master found the secret gone (KeyError, and the reload
    failed for good) and the directory once more per reload."""
    server = start_server(
        "env_at_import:application",
        "--preload",
        workers=1,
        env={"APP_TEST_SECRET": "s3cret", "APP_TEST_PATH": "/usr/bin"},
    )
    assert server.request("GET", "/").body == b"s3cret /opt/app/bin:/usr/bin None"
    for _ in range(2):
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"from before the re-exec exited", since=mark, timeout=30)
        assert not server.grep(r"could not load|KeyError", since=mark), server.log
        assert server.request("GET", "/").body == b"s3cret /opt/app/bin:/usr/bin None"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR2], ids=["hup", "usr2"])
def test_a_variable_taken_out_of_the_config_files_env_is_gone_after_a_reexec(start_server, tmp_path, sig):
    """The re-executed program applies the configuration again, but started
    with the environment the old one had made: a variable taken out of the
    file's env stayed (gunicorn's reload and re-exec drop it), and one the
    file changed back to the outside value must get that value."""
    conf = tmp_path / "corral.toml"
    conf.write_text('workers = 1\nenv = ["GREETING=set", "OUTSIDE=overridden"]\n')
    server = start_server(
        "behaviour:application", "--config", str(conf), workers=None, env={"OUTSIDE": "from-outside"}
    )
    assert server.get_json("/os-environ?key=GREETING") == {"value": "set"}
    assert server.get_json("/os-environ?key=OUTSIDE") == {"value": "overridden"}
    conf.write_text("workers = 1\n")
    mark = server.mark()
    server.signal(sig)
    server.wait_for(r"re-executing the master", since=mark)
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=20)
    assert server.get_json("/os-environ?key=GREETING") == {"value": None}
    assert server.get_json("/os-environ?key=OUTSIDE") == {"value": "from-outside"}
    master_env = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
    assert not any(v.startswith(b"GREETING=") for v in master_env)


def test_workers_from_before_a_reexec_are_killed_at_the_graceful_timeout(start_server, tmp_path):
    """As a reload's old workers are: one held up (here by a thread the app
    started, not a daemon, that runs for minutes) does not outlive the
    re-exec by more than --graceful-timeout, serving old code meanwhile."""
    server = start_server("behaviour:application", "--graceful-timeout", "2", workers=1)
    (old,) = server.worker_pids()
    assert server.request("GET", f"/background?secs=600&marker={tmp_path / 'never'}").body == b"started"
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(r"Worker waiting for 1 thread the app started", since=mark, timeout=20)
    server.wait_for(
        rf"Worker pid {old} from before the re-exec still running after --graceful-timeout; killing it",
        since=mark,
        timeout=20,
    )
    server.wait_for(rf"Worker pid {old} from before the re-exec .*SIGKILL", since=mark)
    assert server.running()
    assert int(server.request("GET", "/pid").body) != old


def test_a_hup_while_the_workers_from_before_a_reexec_finish_does_not_tell_them_again(start_server, tmp_path):
    """They were told to finish once; a reload meanwhile neither tells them
    again (the log read as a second generation being retired) nor puts off
    the kill that backs their drain up."""
    server = start_server("behaviour:application", "--graceful-timeout", "3", workers=1)
    (old,) = server.worker_pids()
    assert server.request("GET", f"/background?secs=600&marker={tmp_path / 'never'}").body == b"started"
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(
        rf"worker pid {old} from before the re-exec finishes its requests", since=mark, timeout=20
    )
    server.signal(signal.SIGHUP)
    server.wait_for(r"Worker pid \d+ is ready; worker pid \d+ stops accepting", since=mark, timeout=20)
    server.wait_for(
        rf"Worker pid {old} from before the re-exec still running after --graceful-timeout", since=mark
    )
    assert (
        len(server.grep(rf"worker pid {old} from before the re-exec finishes its requests", since=mark)) == 1
    )


def test_a_second_reexec_waits_for_the_workers_of_the_first_to_exit(start_server):
    """Three generations of workers at once let a connection handed over by the
    middle one land on the oldest as it exits (a reset): a USR2 while the
    previous re-exec's old workers finish is carried out after they exit."""
    server = start_server("behaviour:application", workers=1)
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(r"re-executing the master", since=mark)
    server.signal(signal.SIGUSR2)
    server.wait_for(
        r"Received SIGUSR2: the master re-executes once the workers from before the last re-exec .* have "
        r"finished their requests",
        since=mark,
    )
    server.wait_for(r"re-executing the master", count=2, since=mark, timeout=20)
    log = server.log
    second = log.index("re-executing the master", log.index("re-executing the master", mark) + 1)
    assert log.index("from before the re-exec exited", mark) < second, log[mark:]
    server.wait_for(r"from before the re-exec exited", count=2, since=mark, timeout=20)
    assert server.running()
    assert server.request("GET", "/fixed").status == 200


def test_signals_that_change_the_pool_during_a_stop_say_they_are_ignored(start_server):
    server = start_server("behaviour:application", "--shutdown-delay", "3", workers=1)
    mark = server.mark()
    server.signal(signal.SIGTERM)
    server.wait_for(r"--shutdown-delay", since=mark)
    for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        server.signal(sig)
        server.wait_for(rf"Received {sig.name} while stopping: ignored", since=mark)
    assert server.wait_exit(30) == 0


def test_winch_says_gunicorns_upgrade_steps_do_not_apply(start_server):
    """gunicorn's upgrade is USR2, WINCH, then QUIT to the old master; here USR2
    does it all in place, and that QUIT would stop the only master: WINCH says
    so (once: a terminal sends it at every resize) and changes nothing."""
    server = start_server("behaviour:application", workers=1)
    (worker,) = server.worker_pids()
    mark = server.mark()
    for _ in range(3):
        server.signal(signal.SIGWINCH)
    server.wait_for(
        r"Received SIGWINCH: ignored\. USR2 upgrades corral in place \(same pid, no \.oldbin pid file\).*"
        r"QUIT or TERM to the old master, would stop this server",
        since=mark,
    )
    server.signal(signal.SIGTTIN)
    server.wait_for(r"Received SIGTTIN", since=mark)
    assert len(server.grep(r"Received SIGWINCH", since=mark)) == 1
    assert server.running()
    assert int(server.request("GET", "/pid").body) in server.worker_pids()
    assert worker in server.worker_pids()


def test_a_reexec_that_moves_the_pid_file_leaves_no_stale_one(start_server, tmp_path):
    conf = tmp_path / "corral.toml"
    first, second = tmp_path / "a.pid", tmp_path / "b.pid"
    conf.write_text(f'workers = 1\npidfile = "{first}"\n')
    server = start_server("behaviour:application", "--config", str(conf), workers=None)
    assert first.read_text().strip() == str(server.proc.pid)
    conf.write_text(f'workers = 1\npidfile = "{second}"\n')
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(READY_RE.pattern, since=mark, timeout=20)
    assert second.read_text().strip() == str(server.proc.pid)
    assert not first.exists()
    assert server.grep(rf"Removed the previous pid file {re.escape(str(first))}", since=mark)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    assert not second.exists()


def test_a_reexec_keeps_a_pid_file_named_anew_through_a_symlink(start_server, tmp_path):
    real, link = tmp_path / "run", tmp_path / "var-run"
    real.mkdir()
    link.symlink_to(real)
    conf = tmp_path / "corral.toml"
    conf.write_text(f'workers = 1\npidfile = "{link / "app.pid"}"\n')
    server = start_server("behaviour:application", "--config", str(conf), workers=None)
    conf.write_text(f'workers = 1\npidfile = "{real / "app.pid"}"\n')
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(READY_RE.pattern, since=mark, timeout=20)
    assert (real / "app.pid").read_text().strip() == str(server.proc.pid)
    assert not server.grep("Removed the previous pid file", since=mark)


def _reloading_with_a_slow_import(start_server, tmp_path):
    """A --preload server with --stats whose app takes 4 s to import, sent
    HUP and caught in the re-executed master's import: (server, the stats
    port, the log's mark before the HUP)."""
    stats = free_port()
    mark_file = tmp_path / "importing"
    server = start_server(
        "slow_import:application",
        "--preload",
        "--stats",
        f"127.0.0.1:{stats}",
        env={"CORRAL_TEST_IMPORT_SECS": "4", "CORRAL_TEST_IMPORT_MARK": str(mark_file)},
        wait=False,
    )
    server.wait_started(timeout=30)
    mark_file.unlink()
    mark = server.mark()
    server.signal(signal.SIGHUP)
    assert wait_until(mark_file.exists, 20)
    return server, stats, mark


def test_health_probes_are_answered_while_a_preload_reload_imports(start_server, tmp_path):
    """HUP with --preload re-executes the master, which imports the new code
    before its loop runs again: a thread answers the stats listener meanwhile,
    /readyz 200 since the workers from before serve, the figures 503 with
    Retry-After, so an orchestrator neither takes the host out nor restarts it."""
    server, stats, mark = _reloading_with_a_slow_import(start_server, tmp_path)
    answers = {}
    for path in ("/healthz", "/readyz", "/metrics"):
        with socket.create_connection(("127.0.0.1", stats), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answers[path] = s.recv(4096)
    assert answers["/healthz"].startswith(b"HTTP/1.1 200"), answers
    assert answers["/readyz"].startswith(b"HTTP/1.1 200"), answers
    assert answers["/metrics"].startswith(b"HTTP/1.1 503") and b"Retry-After: 1\r\n" in answers["/metrics"]
    assert server.request("GET", "/").status == 200
    # The import is still going on: the answers above came during it.
    assert not server.grep(r"Preloaded application", since=mark)
    # A probe that connects during the import and sends its request after it
    # is answered by the master's loop (the thread dropped it): the last of
    # connections opened now and then until the import ends.
    opened = []
    while not server.grep(r"Preloaded application", since=mark):
        opened.append(socket.create_connection(("127.0.0.1", stats), timeout=10))
        time.sleep(0.2)
    straddling = opened.pop()
    for c in opened:
        c.close()
    with straddling:
        straddling.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert straddling.recv(4096).startswith(b"HTTP/1.1 200")
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=30)
    with socket.create_connection(("127.0.0.1", stats), timeout=2) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def _not_ready(stats):
    """Whether the stats listener's /readyz answers 503."""
    with socket.create_connection(("127.0.0.1", stats), timeout=2) as s:
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        return s.recv(4096).startswith(b"HTTP/1.1 503")


def test_readiness_is_off_during_a_preload_reloads_import_once_no_old_worker_is_left(start_server, tmp_path):
    """The workers from before the re-exec die while the new master imports
    (nothing replaces them until it has): /readyz says 503 (it said 200
    with no worker left), and the server serves again after the import."""
    server, stats, mark = _reloading_with_a_slow_import(start_server, tmp_path)
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)

    assert wait_until(lambda: _not_ready(stats), timeout=3, interval=0.05)
    assert not server.grep(r"Preloaded application", since=mark)
    server.wait_for(r"Preloaded application", since=mark, timeout=30)
    assert wait_until(lambda: server.request("GET", "/").status == 200, 30)


def test_a_stop_during_a_preload_reloads_import_turns_readiness_off(start_server, tmp_path):
    """TERM while the re-executed master imports: the import is
    interrupted, /readyz says 503 at once, as it does for any stop, and the
    workers from before the re-exec stop."""
    server, stats, mark = _reloading_with_a_slow_import(start_server, tmp_path)
    server.signal(signal.SIGTERM)

    # The signal is taken a moment after kill() returns: a probe sent at
    # once may come before it.
    assert wait_until(lambda: _not_ready(stats), timeout=2, interval=0.05)
    assert not server.grep(r"Preloaded application", since=mark)
    assert server.wait_exit(60) == 0


def test_hup_runs_a_gunicorn_config_file_again(start_server, tmp_path):
    """gunicorn runs its Python configuration again at each HUP: a file that
    reads what it sets from elsewhere (here the number of workers, from a
    file) gives the new value though its own text is the same. Settings
    that came out the same get the usual reload, without a re-exec."""
    count = tmp_path / "workers.txt"
    count.write_text("1")
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(f"workers = int(open({str(count)!r}).read())\n")
    server = start_server("behaviour:application", "--config", str(conf), workers=None)
    _hup_reexecs_only_once_changed(
        server, lambda: count.write_text("3"), rf"what {re.escape(str(conf))} sets changed", workers=3
    )


def test_a_reexec_keeps_the_process_name(start_server):
    """The re-executed program is the interpreter run again, which would go
    by its own name (`python`) in /proc/PID/comm, what pgrep, pidof, top and
    `ss -p` show: the master and its new workers keep the first start's."""
    server = start_server("behaviour:application")
    master = server.proc.pid

    def comm(pid):
        return Path(f"/proc/{pid}/comm").read_text().strip()

    before = comm(master)
    assert before == "corral"
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(READY_RE.pattern, since=mark, timeout=20)
    assert comm(master) == before
    assert [comm(pid) for pid in server.worker_pids(since=mark)] == [before]
    # And no note about an environment variable it does not read.
    assert not server.grep(r"CORRAL_PROCESS_NAME", since=mark)


def test_hup_with_a_gunicorn_config_that_no_longer_runs_reloads_with_its_settings(start_server, tmp_path):
    """A gunicorn file whose text is unchanged but which fails when run again
    (what it reads is gone): the reload goes on with the settings it gave at
    start, and the log says it was not run again."""
    count = tmp_path / "workers.txt"
    count.write_text("1")
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(f"workers = int(open({str(count)!r}).read())\n")
    server = start_server("behaviour:application", "--config", str(conf), workers=None)
    count.unlink()
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(rf"{re.escape(str(conf))} was not run again to see whether the settings", since=mark)
    server.wait_for(r"Received SIGHUP: starting 1 new worker", since=mark, timeout=20)
    server.wait_for(READY_RE.pattern, since=mark, timeout=20)
    assert not server.grep(r"re-execut", since=mark)
    assert server.request("GET", "/fixed").status == 200


def test_the_servers_own_variables_never_reach_the_app_or_its_programs(start_server, tmp_path):
    """The pool's name and the process name corral passes itself across a
    re-exec are not in the app's os.environ nor in the environment of the
    programs it starts, before and after a USR2: another corral started by
    the app took the pool for its own, and removed its inboxes as it exited."""
    (tmp_path / "env_app.py").write_text(
        "import os, subprocess\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    child = subprocess.run(['env'], capture_output=True, text=True).stdout\n"
        "    mine = sorted(k for k in os.environ if k.startswith('CORRAL_'))\n"
        "    theirs = sorted(line.split('=')[0] for line in child.splitlines() if line.startswith('CORRAL_'))\n"
        "    return [f'{mine} {theirs}'.encode()]\n"
    )
    server = start_server("env_app:application", "--env", "CORRAL_TEST_SET=1", pythonpath=None, cwd=tmp_path)
    assert server.request("GET", "/").body == b"['CORRAL_TEST_SET'] ['CORRAL_TEST_SET']"
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=30)
    assert server.request("GET", "/").body == b"['CORRAL_TEST_SET'] ['CORRAL_TEST_SET']"
