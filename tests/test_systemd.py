"""systemd integration, driven by the sample units in docs/deploy/systemd/.

The tests do what systemd does with those files, without systemd: bind the
socket unit's socket and hand it to corral as descriptor 3 with LISTEN_PID,
LISTEN_FDS and LISTEN_FDNAMES, run the service's ExecStart command line, and
listen on a NOTIFY_SOCKET for its READY/RELOADING/STOPPING messages. They
also run corral as root dropping to an unprivileged user, as `User=` asks.
"""

import configparser
import os
import pathlib
import shlex
import shutil
import signal
import socket
import stat
import sys
import tempfile

import pytest
from support import APPS, CORRAL, ROOT, wait_until

UNITS = ROOT / "docs" / "deploy" / "systemd"

# Moves descriptor argv[1] to 3, sets LISTEN_PID to this process, and execs argv[2:].
LAUNCH = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "os.dup2(fd, 3)\n"
    "os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


# As LAUNCH, with two descriptors: argv[1] to 3 and argv[2] to 4.
LAUNCH2 = (
    "import os, sys\n"
    "a, b = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.dup2(a, 3)\nos.dup2(b, 4)\nos.close(a)\nos.close(b)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def _unit(name):
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keys are case-sensitive in systemd units
    parser.read(UNITS / name)
    return parser


class Notifications:
    """A NOTIFY_SOCKET: a unix datagram socket anyone may send to (like systemd's)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)

    def next(self, timeout=20.0) -> dict:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def close(self):
        self.sock.close()


def _service_args():
    """ExecStart's options, with the sample project's app replaced by a test app."""
    argv = shlex.split(_unit("corral.service")["Service"]["ExecStart"])
    assert argv[0].endswith("/corral")
    assert argv[-1] == "myproject.wsgi:application"
    return argv[1:-1]


def test_socket_activation_and_notify(start_server, tmp_path):
    sock_unit = _unit("corral.socket")["Socket"]
    service = _unit("corral.service")["Service"]
    assert service["Type"] == "notify"
    assert service["KillMode"] == "mixed"
    name = sock_unit["FileDescriptorName"]
    host, _port = sock_unit["ListenStream"].rsplit(":", 1)
    listener = socket.socket()
    listener.bind((host, 0))  # the unit's address, on a free port
    listener.listen(int(sock_unit["Backlog"]))
    port = listener.getsockname()[1]
    notify = Notifications(tmp_path / "notify.sock")
    try:
        # systemd passes the socket as fd 3 and names the receiving pid, which
        # exec keeps: the launcher's own pid becomes corral's.
        fd = listener.fileno()
        launcher = [sys.executable, "-c", LAUNCH, str(fd), *CORRAL]
        server = start_server(
            "behaviour:application",
            *_service_args(),
            http=None,
            command=launcher,
            pass_fds=(fd,),
            env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": name, "NOTIFY_SOCKET": notify.path},
            wait=False,
        )
        listener.close()  # corral has it now, as systemd would keep its own copy
        ready = notify.next()
        assert ready.get("READY") == "1", ready
        server.wait_for(rf"Listening at: http://{host}:{port} \(fd 3\)")
        server.host, server.port = host, port
        server.wait_for(r"Worker ready", count=4)
        assert server.request("GET", "/fixed").status == 200
        # LISTEN_* are meant for corral alone: the app does not see them.
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            assert server.get_json(f"/os-environ?key={key}")["value"] is None, key

        server.signal(signal.SIGHUP)
        assert "RELOADING" in notify.next()
        assert notify.next().get("READY") == "1"
        assert server.request("GET", "/fixed").status == 200

        server.signal(signal.SIGTERM)
        assert notify.next().get("STOPPING") == "1"
        assert server.wait_exit(30) == 0
    finally:
        notify.close()


def _uid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_runs_as_nobody_after_binding_a_privileged_port(start_server, request):
    import pwd

    nobody = pwd.getpwnam("nobody")
    # Like /run/corral: a directory the unprivileged user can reach and write,
    # so it can remove its pidfile and socket at exit (pytest's own tmp dirs
    # are private to root).
    rundir = pathlib.Path(tempfile.mkdtemp(prefix="corral-run-"))
    request.addfinalizer(lambda: shutil.rmtree(rundir, ignore_errors=True))
    os.chmod(rundir, 0o777)
    pidfile = rundir / "corral.pid"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_low = None
        for candidate in range(800, 1000):
            try:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", candidate))
                free_low = candidate
                break
            except OSError:
                continue
    assert free_low is not None
    server = start_server(
        "behaviour:application",
        "--user",
        "nobody",
        "--pidfile",
        str(pidfile),
        "--umask",
        "027",
        # Imported as root before the switch: the interpreter's own files
        # (here under root's home) need not be readable by nobody then.
        "--preload",
        "--uwsgi",
        f"unix:{rundir}/app.sock",
        http=f"127.0.0.1:{free_low}",
    )
    assert server.port == free_low  # bound as root: a port below 1024
    assert server.grep(r"Running as user nobody")
    master = int(pidfile.read_text())
    assert master == server.proc.pid
    assert _uid_of(master) == nobody.pw_uid
    for pid in server.worker_pids():
        assert _uid_of(pid) == nobody.pw_uid
    # The umask applied to the socket file corral created.
    mode = stat.S_IMODE(os.stat(rundir / "app.sock").st_mode)
    assert mode & 0o007 == 0, oct(mode)
    assert server.request("GET", "/fixed").status == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    assert not pidfile.exists()
    assert not (rundir / "app.sock").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "no-such-user-here"], "--user"),
        (["--group", "no-such-group-here"], "--group"),
        (["--user", "nobody", "--group", "no-such-group-here"], "--group"),
        (["--umask", "999"], "--umask"),
        (["--workers-min", "3", "--workers-max", "2"], "--workers-min 3 is greater than --workers-max 2"),
        (["--workers-min", "2"], "--workers-max"),
        (["--timeout", "soon"], "--timeout"),
    ],
)
def test_bad_lifecycle_options_fail_at_start(start_server, args, message):
    server = start_server("behaviour:application", *args, wait=False)
    assert server.wait_exit(10) != 0
    assert message in server.log, server.log


def test_docs_units_use_existing_options():
    """Every option in the sample ExecStart is one corral accepts."""
    import subprocess

    help_text = subprocess.run([*CORRAL, "--help"], capture_output=True, text=True, check=True).stdout
    for arg in _service_args():
        if arg.startswith("--"):
            assert arg in help_text, arg
    assert (APPS / "behaviour.py").exists()


# Moves descriptors argv[1] and argv[2] to 3 and 4, sets LISTEN_PID, execs argv[3:].
LAUNCH_TWO = (
    "import os, sys\n"
    "a, b = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.dup2(a, 3)\n"
    "os.dup2(b, 4)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def test_reexec_keeps_activated_sockets(start_server, tmp_path):
    """USR2 (and HUP with --preload) re-executes the master: the sockets systemd
    handed over (here an HTTP and a uwsgi one) stay its listeners, with their
    protocols, and nothing falls back to the default address."""
    import struct

    from front_ends import free_port

    http_sock, uwsgi_sock = socket.socket(), socket.socket()
    for s in (http_sock, uwsgi_sock):
        s.bind(("127.0.0.1", 0))
        s.listen(64)
    http_port, uwsgi_port = http_sock.getsockname()[1], uwsgi_sock.getsockname()[1]
    stats_port = free_port()
    notify = Notifications(tmp_path / "notify.sock")
    try:
        fds = (http_sock.fileno(), uwsgi_sock.fileno())
        launcher = [sys.executable, "-c", LAUNCH_TWO, str(fds[0]), str(fds[1]), *CORRAL]
        server = start_server(
            "behaviour:application",
            "--stats",
            f"127.0.0.1:{stats_port}",
            http=None,
            command=launcher,
            pass_fds=fds,
            env={"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:uwsgi", "NOTIFY_SOCKET": notify.path},
            wait=False,
        )
        http_sock.close()
        uwsgi_sock.close()
        assert notify.next().get("READY") == "1"
        server.host, server.port = "127.0.0.1", http_port

        def uwsgi_ok():
            body = b""
            for k, v in ((b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/fixed"), (b"PATH_INFO", b"/fixed")):
                body += struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
            with socket.create_connection(("127.0.0.1", uwsgi_port), timeout=10) as c:
                c.sendall(b"\0" + struct.pack("<H", len(body)) + b"\0" + body)
                out = b""
                while chunk := c.recv(65536):
                    out += chunk
            return out.startswith(b"HTTP/1.1 200") and out.endswith(b"hello world")

        assert server.request("GET", "/fixed").status == 200 and uwsgi_ok()
        mark = server.mark()
        server.signal(signal.SIGUSR2)
        assert "RELOADING" in notify.next()
        assert notify.next().get("READY") == "1"
        assert server.grep(r"re-executing the master", since=mark)
        assert not server.grep(r"Closing inherited listener|127\.0\.0\.1:8000", since=mark), server.log
        assert server.request("GET", "/fixed").status == 200 and uwsgi_ok()
        with socket.create_connection(("127.0.0.1", stats_port), timeout=10) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        assert server.running()
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
    finally:
        notify.close()


def test_activated_socket_is_served_beside_the_listeners_given(start_server):
    """A socket the service manager passed is served even when listeners are
    given too (a health-check port, say): systemd queues connections on it
    whatever corral does, and left unserved they would hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    launcher = [sys.executable, "-c", LAUNCH, str(fd), *CORRAL]
    server = start_server(
        "behaviour:application",
        command=launcher,
        pass_fds=(fd,),
        env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "htpp"},
    )
    listener.close()
    server.wait_for(r"is named \"htpp\" .*serving HTTP on it")
    server.wait_for(r"Also serving what the service manager passed \(socket activation\): http on fd://3")
    # The listener given on the command line...
    assert server.request("GET", "/fixed").status == 200
    # ...and the activated one.
    given = server.port
    server.port = port
    assert server.request("GET", "/fixed").status == 200
    server.port = given


def test_activated_stats_socket_is_not_served_as_http_too(start_server):
    """Two sockets passed, one of them named by --stats fd://4: that one is
    the stats listener alone; the other is served beside --http."""
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        socks.append(s)
    fds = [s.fileno() for s in socks]
    ports = [s.getsockname()[1] for s in socks]
    server = start_server(
        "behaviour:application",
        "--stats",
        "fd://4",
        command=[sys.executable, "-c", LAUNCH2, str(fds[0]), str(fds[1]), *CORRAL],
        pass_fds=tuple(fds),
        env={"LISTEN_FDS": "2"},
    )
    for s in socks:
        s.close()
    server.wait_for(r"Also serving what the service manager passed \(socket activation\): http on fd://3$")
    assert server.request("GET", "/fixed").status == 200
    given = server.port
    server.port = ports[0]
    assert server.request("GET", "/fixed").status == 200
    server.port = ports[1]
    assert server.request("GET", "/healthz").status == 200
    server.port = given


def test_activated_datagram_socket_beside_a_stream_one_is_left_alone(start_server):
    """A service whose socket unit has a ListenDatagram= too: systemd passes
    both; the stream socket is served and the datagram one is left alone,
    with a line saying so (it used to stop the start)."""
    stream = socket.socket()
    stream.bind(("127.0.0.1", 0))
    stream.listen(16)
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagram.bind(("127.0.0.1", 0))
    port = stream.getsockname()[1]
    fds = (stream.fileno(), datagram.fileno())
    server = start_server(
        "behaviour:application",
        http=None,
        command=[sys.executable, "-c", LAUNCH2, str(fds[0]), str(fds[1]), *CORRAL],
        pass_fds=fds,
        env={"LISTEN_FDS": "2"},
        wait=False,
    )
    stream.close()
    datagram.close()
    server.wait_for(
        r"Not serving what the service manager passed that is not a listening stream socket: fd://4$"
    )
    server.wait_for(r"Worker ready")
    server.host, server.port = "127.0.0.1", port
    assert server.request("GET", "/fixed").status == 200


def test_activation_of_a_datagram_socket_alone_is_refused(start_server):
    """Nothing to serve: a clear error, not a server that never answers."""
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagram.bind(("127.0.0.1", 0))
    fd = datagram.fileno()
    server = start_server(
        "behaviour:application",
        http=None,
        command=[sys.executable, "-c", LAUNCH, str(fd), *CORRAL],
        pass_fds=(fd,),
        env={"LISTEN_FDS": "1"},
        wait=False,
    )
    datagram.close()
    assert server.wait_exit(30) == 2
    server.wait_for(r"Socket activation passed no listening stream socket \(fd://3\): nothing to serve")


def _versioned(path, version):
    path.write_text(
        "def application(environ, start_response):\n"
        f"    body = b'version {version}'\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [body]\n"
    )


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_a_reload_whose_code_does_not_load_ends_with_ready_and_says_so(start_server, tmp_path, preload):
    """`systemctl reload` of code that does not import: the previous workers
    serve on, so the service is told READY=1 again (it would stay
    "reloading" for as long as the code is broken), with a STATUS saying the
    reload failed; once the code loads, the STATUS says so too."""
    app = tmp_path / "versioned.py"
    _versioned(app, 1)
    notify = Notifications(tmp_path / "notify.sock")
    try:
        server = start_server(
            "versioned:application",
            *(["--preload"] if preload else []),
            "--chdir",
            str(tmp_path),
            workers=1,
            pythonpath=None,
            env={"NOTIFY_SOCKET": notify.path},
        )
        assert notify.next().get("READY") == "1"
        app.write_text("def application(environ, start_response):\n    return [b'unclosed'\n")
        server.signal(signal.SIGHUP)
        assert "RELOADING" in notify.next()
        told = notify.next(timeout=30)
        assert told.get("READY") == "1", told
        assert "from before the reload" in told["STATUS"] or "reload failed" in told["STATUS"], told
        assert server.request("GET", "/").body == b"version 1"
        _versioned(app, 2)
        # Tried again until it loads; then the STATUS is the plain one.
        while True:
            told = notify.next(timeout=60)
            if (
                told.get("STATUS", "").startswith("serving with 1 worker(s)")
                and "before" not in told["STATUS"]
            ):
                break
        # The previous worker stops accepting as it is told to stop.
        assert wait_until(lambda: server.request("GET", "/").body == b"version 2", 10)
    finally:
        notify.close()
