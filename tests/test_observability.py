"""Access and error logs, metrics, health endpoints, `corral stats` and `corral top`."""

import contextlib
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from front_ends import free_port
from support import APPS, CORRAL, READY_RE, IncompleteResponse, RawConn, read_hashed, slow_reader, wait_until


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path, timeout=5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _uwsgi(port, variables, body=b""):
    """One uwsgi request; returns the raw response."""
    data = b""
    for k, v in variables:
        k, v = k.encode("latin-1"), v.encode("latin-1")
        data += struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(bytes([0]) + struct.pack("<H", len(data)) + bytes([0]) + data + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _read_lines(path, count, timeout=10.0):
    """Waits until `path` holds at least `count` lines (the log is flushed once a second)."""

    def ready():
        try:
            lines = path.read_text(encoding="latin-1").splitlines()
        except FileNotFoundError:
            return None
        return lines if len(lines) >= count else None

    lines = wait_until(ready, timeout=timeout)
    assert lines, f"{path} did not get {count} lines: {path.read_text() if path.exists() else 'missing'}"
    return lines


ALL_ATOMS = (
    '%(h)s|%(l)s|%(u)s|%(t)s|"%(r)s"|%(m)s|%(U)s|%(q)s|%(H)s|%(s)s|%(B)s|%(b)s|%(f)s|%(a)s|'
    "%(T)s|%(M)s|%(D)s|%(L)s|%(p)s|%({X-Trace}i)s|%({Content-Type}o)s|%({query_string}e)s|"
    "%({CORRAL_TEST_VAR}e)s|%({REMOTE_USER}e)s|%({SCRIPT_NAME}e)s|100%%"
)


def test_access_log_atoms(start_server, tmp_path):
    log = tmp_path / "access.log"
    server = start_server(
        "behaviour:application",
        "--access-log",
        str(log),
        "--access-log-format",
        ALL_ATOMS,
        # Local time, as gunicorn's: a POSIX zone needs no time zone files.
        env={"CORRAL_TEST_VAR": "from-env", "TZ": "XYZ-3"},
    )
    resp = server.request(
        "GET",
        "/fixed?a=1&b=2",
        headers={
            "Referer": "http://ref.example/",
            "User-Agent": "agent/1.0",
            "X-Trace": "abc",
            "Authorization": "Basic YWxpY2U6c2VjcmV0",
        },
    )
    assert resp.status == 200
    (line,) = _read_lines(log, 1)
    f = line.split("|")
    assert f[0] == "127.0.0.1"
    assert f[1] == "-"
    assert f[2] == "alice"
    assert re.fullmatch(r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0300\]", f[3]), f[3]
    assert server.grep(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0300\] \[\d+\] \[INFO\] Listening at"), (
        server.log
    )
    assert f[4] == '"GET /fixed?a=1&b=2 HTTP/1.1"'
    assert f[5:9] == ["GET", "/fixed", "a=1&b=2", "HTTP/1.1"]
    assert f[9] == "200"
    assert f[10] == f[11] == str(len(resp.body))
    assert f[12] == "http://ref.example/"
    assert f[13] == "agent/1.0"
    t, ms, us, secs = int(f[14]), int(f[15]), int(f[16]), float(f[17])
    assert t == us // 1_000_000 and ms == us // 1000 and abs(secs - us / 1e6) < 1e-5
    assert f[18] == f"<{server.worker_pids()[0]}>"
    assert f[19] == "abc"
    assert f[20] == {k.lower(): v for k, v in resp.headers}["content-type"]
    # {var}e is the request's WSGI environ, as in gunicorn: not the process environment.
    # Set but empty (SCRIPT_NAME without --mount) is empty, unset is `-`, as in gunicorn.
    assert f[21:] == ["a=1&b=2", "-", "-", "", "100%"]
    # ... as the app left it: middleware may set REMOTE_USER.
    server.request("GET", "/set-user?user=bob")
    (_, line) = _read_lines(log, 2)
    assert line.split("|")[21:] == ["user=bob", "-", "bob", "", "100%"]
    # The path the app got: an absolute-form target's authority and a
    # fragment are not part of it; the auth scheme's name is in any case.
    with server.connect() as conn:
        conn.send(b"GET http://x/fixed?a=1#frag HTTP/1.1\r\nHost: x\r\nAuthorization: BASIC Ym9iOnB3\r\n\r\n")
        assert conn.read_response().status == 200
    (*_, line) = _read_lines(log, 3)
    f = line.split("|")
    assert (f[2], f[6], f[7]) == ("bob", "/fixed", "a=1"), line


def test_a_repeated_response_header_logs_its_last_value_as_gunicorn(start_server, tmp_path):
    log = tmp_path / "access.log"
    server = start_server(
        "behaviour:application", "--access-log", str(log), "--access-log-format", "%({set-cookie}o)s"
    )
    assert server.request("GET", "/cookies").status == 200
    assert _read_lines(log, 1) == ["b=2"]


def test_a_refused_request_is_logged_after_the_one_before_it(start_server, tmp_path):
    """A request the server refuses itself, pipelined after one the app
    answered, has its access-log line after that one's, as it was answered."""
    log = tmp_path / "access.log"
    server = start_server(
        "behaviour:application", "--access-log", str(log), "--access-log-format", "%(U)s %(s)s"
    )
    with server.connect() as conn:
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n")
        assert conn.read_response().status == 200
        assert conn.read_response().status == 400
    assert _read_lines(log, 2) == ["/fixed 200", "/second 400"]


def test_default_access_log_format_on_stdout(start_server):
    server = start_server("behaviour:application", "--access-log", "-")
    server.request("GET", "/fixed", headers={"User-Agent": "ua"})
    # gunicorn's default: h l u t "r" s b "f" "a"
    pattern = r'^127\.0\.0\.1 - - \[[^\]]+\] "GET /fixed HTTP/1\.1" 200 \d+ "-" "ua"$'
    assert wait_until(lambda: any(re.match(pattern, line) for line in server.stdout_lines), 5), (
        server.stdout_lines
    )


def test_json_access_log_cannot_be_forged(start_server, tmp_path):
    """A header full of quotes, backslashes, control characters and even
    newlines (which only a front end can pass, over uwsgi) stays inside its
    JSON string: one line, one object, the same keys."""
    log = tmp_path / "access.json"
    port = _free_port()
    server = start_server(
        "behaviour:application",
        "--uwsgi",
        f"127.0.0.1:{port}",
        "--access-log",
        str(log),
        "--access-log-format",
        "json",
    )
    hostile = 'x", "status": 999, "injected": "1\n{"forged": true}\\ \x01 caf\xe9'
    out = _uwsgi(
        port,
        [
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/fixed"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REMOTE_ADDR", "203.0.113.9"),
            ("HTTP_USER_AGENT", hostile),
        ],
    )
    assert out.startswith(b"HTTP/1.1 200 ")
    server.request("GET", "/fixed", headers={"User-Agent": 'q"uote\\back'})
    lines = _read_lines(log, 2)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == set(second)
    assert first["user_agent"] == hostile
    assert first["status"] == 200
    assert first["remote_addr"] == "203.0.113.9"
    assert "injected" not in first and "forged" not in first
    assert second["user_agent"] == 'q"uote\\back'
    assert second["path"] == "/fixed" and second["method"] == "GET"


def test_json_access_log_writes_utf8_text_as_text(start_server, tmp_path):
    """A header in UTF-8 reads as that text in the JSON access log (not as
    the latin-1 code points of its bytes); a latin-1 header still reads as
    latin-1. The path is logged as sent."""
    log = tmp_path / "access.json"
    server = start_server("behaviour:application", "--access-log", str(log), "--access-log-format", "json")
    with server.connect() as conn:
        conn.send_request(
            "GET", "/caf%C3%A9?q=%C3%A9", {"Host": "x", "User-Agent": "naïve €".encode().decode("latin-1")}
        )
        assert conn.read_response().status == 200
        conn.send_request("GET", "/fixed", {"Host": "x", "User-Agent": "caf\xe9"})
        assert conn.read_response().status == 200
    assert wait_until(lambda: log.exists() and log.read_bytes().count(b"\n") >= 2)
    raw = log.read_bytes()
    assert "naïve €".encode() in raw
    first, second = (json.loads(line) for line in raw.decode("utf-8").splitlines())
    assert (first["path"], first["query"], first["user_agent"]) == ("/caf%C3%A9", "q=%C3%A9", "naïve €")
    assert second["user_agent"] == "café"


def _start_logging_to(start_server, errors, *args, workers=1):
    """Starts a server whose error log goes to a file (not to the harness's stderr)."""
    port = _free_port()
    server = start_server(
        "behaviour:application",
        "--error-log",
        str(errors),
        *args,
        http=f"127.0.0.1:{port}",
        workers=workers,
        wait=False,
    )
    assert wait_until(lambda: errors.exists() and errors.read_text().count("Worker ready") >= workers, 20), (
        errors.read_text() if errors.exists() else "no error log"
    )
    server.host, server.port = "127.0.0.1", port
    return server


def test_logs_reopen_after_rename(start_server, tmp_path):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    server = _start_logging_to(
        start_server, errors, "--access-log", str(access), "--access-log-format", "%(U)s", workers=2
    )
    server.request("GET", "/fixed")
    _read_lines(access, 1)
    os.rename(access, tmp_path / "access.log.1")
    os.rename(errors, tmp_path / "error.log.1")
    os.kill(server.proc.pid, signal.SIGUSR1)
    # Each process reopens on its next tick; then requests go to the new file.
    assert wait_until(
        lambda: errors.exists() and errors.read_text().count("Reopened the access log") >= 2, 10
    )
    server.request("GET", "/pid")
    assert _read_lines(access, 1) == ["/pid"]
    assert (tmp_path / "access.log.1").read_text().splitlines() == ["/fixed"]
    assert "Worker ready" in (tmp_path / "error.log.1").read_text()
    # The error log file gets the master's and the workers' lines, with worker ids.
    assert re.search(r"\[\d+\] \[worker \d\] \[INFO\] Reopened the access log", errors.read_text())


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def test_hup_reopens_the_logs_as_gunicorns_does(start_server, tmp_path):
    """logrotate's `postrotate kill -HUP` (gunicorn's recipe): the master and
    the new workers write to files under the logs' names, none to the rotated ones."""
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    server = _start_logging_to(start_server, errors, "--access-log", str(access), workers=2)
    old = _children(server.proc.pid)
    assert len(old) == 2
    os.rename(access, tmp_path / "access.log.1")
    os.rename(errors, tmp_path / "error.log.1")
    server.signal(signal.SIGHUP)
    # The old workers keep the rotated file until they exit; the master says they did.
    assert wait_until(
        lambda: errors.exists() and all(f"(pid {pid}) exited" in errors.read_text() for pid in old), 20
    ), errors.read_text()
    assert "Received SIGHUP: reopened the error log" in errors.read_text()
    assert "Received SIGHUP: starting 2 new worker(s)" in errors.read_text()
    server.request("GET", "/fixed")
    assert wait_until(lambda: access.exists() and "GET /fixed" in access.read_text(), 10)
    master = server.proc.pid
    workers = _children(master)
    assert workers and not workers & old
    for pid in [master, *workers]:
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        assert not [link for link in links if ".log." in link], (pid, links)


def test_logs_reopened_before_a_reexec_are_not_carried_into_it(start_server, tmp_path):
    """A log file reopened on SIGUSR1 stays close-on-exec: the re-executed
    master (USR2) and its workers hold each log once, never a rotated file."""
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    server = _start_logging_to(start_server, errors, "--access-log", str(access))
    for i in range(1, 3):
        os.rename(access, tmp_path / f"access.log.{i}")
        os.rename(errors, tmp_path / f"error.log.{i}")
        server.signal(signal.SIGUSR1)
        assert wait_until(lambda: errors.exists() and "Reopened the access log" in errors.read_text(), 10)
        server.signal(signal.SIGUSR2)
        assert wait_until(lambda: "from before the re-exec exited" in errors.read_text(), 20), (
            errors.read_text()
        )
    server.request("GET", "/fixed")
    master = server.proc.pid
    with open(f"/proc/{master}/task/{master}/children") as f:
        workers = f.read().split()
    assert workers
    for pid in [master, *map(int, workers)]:
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        assert not [link for link in links if ".log." in link], (pid, links)
        assert links.count(str(errors)) == 1, (pid, links)


def test_capture_output_sends_the_apps_prints_to_the_error_log(start_server, tmp_path):
    """--capture-output: the app's stdout and stderr go to the --error-log file,
    in every worker, also after SIGUSR1 reopened the file under its name; so
    does `--access-log -`."""
    errors = tmp_path / "error.log"
    server = _start_logging_to(
        start_server,
        errors,
        "--capture-output",
        "--access-log",
        "-",
        "--access-log-format",
        "access %(U)s %(q)s",
        workers=2,
    )
    for msg in ("first", "second", "third"):
        server.request("GET", f"/print-std?msg={msg}")
    assert wait_until(lambda: errors.read_text().count("stderr says") == 3, 10), errors.read_text()
    assert errors.read_text().count("stdout says") == 3
    os.rename(errors, tmp_path / "error.log.1")
    os.kill(server.proc.pid, signal.SIGUSR1)
    assert wait_until(lambda: errors.exists() and errors.read_text().count("Reopened the error log") == 2, 10)
    for i in range(4):  # both workers, whichever takes each request
        server.request("GET", f"/print-std?msg=after{i}")
    assert wait_until(lambda: errors.read_text().count("stdout says after") == 4, 10), errors.read_text()
    assert "says after" not in (tmp_path / "error.log.1").read_text()
    assert wait_until(lambda: errors.read_text().count("access /print-std msg=after") == 4, 10)
    assert (tmp_path / "error.log.1").read_text().count("access /print-std msg=") == 3
    assert not [line for line in server.stdout_lines + server.lines if "says" in line]
    # Without a file, it asks for nothing (gunicorn takes it too).
    moot = subprocess.run(
        [*CORRAL, "--capture-output", "--check-config", "behaviour:application"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=APPS,
    )
    assert moot.returncode == 0, moot.stderr
    assert "note: --capture-output without --error-log FILE is not needed" in moot.stderr


def test_json_error_log(start_server, tmp_path):
    errors = tmp_path / "error.log"
    server = _start_logging_to(start_server, errors, "--log-format", "json")
    server.request("GET", "/errors?msg=hello%22there")
    # A write of several lines (a logging record with its traceback) is one
    # object, so a log system keeps its lines together.
    server.request("GET", "/errors?msg=Traceback%3A%0A%20%20frame%0AValueError%3A%20x")
    # A logging record keeps its level; other text is the error stream's.
    server.request("GET", "/errors?msg=INFO%3Aapp%3Astarted")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    objs = [json.loads(line) for line in errors.read_text().splitlines()]
    assert all(set(o) == {"time", "level", "pid", "worker", "message"} for o in objs)
    assert any(o["message"].startswith("Listening at:") and o["worker"] is None for o in objs)
    assert any(o["message"] == 'hello"there' and o["worker"] == 0 for o in objs)
    messages = [o["message"] for o in objs]
    assert "Traceback:\n  frame\nValueError: x" in messages, messages
    assert "Traceback:\n  frame\nValueError: x again" in messages, messages
    assert "  frame" not in messages, messages
    levels = {o["message"]: o["level"] for o in objs}
    assert levels["INFO:app:started"] == "INFO"
    assert levels['hello"there'] == "ERROR"
    assert levels["Traceback:\n  frame\nValueError: x"] == "ERROR"


def test_notes_on_the_configuration_are_json_in_a_json_log_on_standard_error(start_server):
    """A container's log shipper reads standard error as JSON lines: the notes
    a start has about its configuration are objects there too."""
    server = start_server(
        "behaviour:application",
        "--log-format",
        "json",
        "--capture-output",
        workers=1,
        env={"CORRAL_WOKRERS": "2"},
    )
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    objs = [json.loads(line) for line in server.lines if line.strip()]
    notes = [o for o in objs if o["level"] == "WARNING"]
    assert any("CORRAL_WOKRERS is not one corral reads" in o["message"] for o in notes), objs
    assert any("--capture-output without --error-log FILE is not needed" in o["message"] for o in notes), objs


def test_debug_level_logs_the_configuration_and_each_request(start_server):
    """As gunicorn's debug level: the settings at start, then a line per request."""
    server = start_server(
        "behaviour:application", "--log-level", "DEBUG", "--max-requests", "1234", workers=1
    )
    server.wait_for(r"\[DEBUG\] Current configuration:")
    server.wait_for(r'^max-requests = "1234"  # command line$')
    mark = server.mark()
    assert server.request("GET", "/fixed?x=1").status == 200
    server.wait_for(r"\[worker 0\] \[DEBUG\] GET /fixed\?x=1$", since=mark)
    quiet = start_server("behaviour:application", workers=1)
    assert quiet.request("GET", "/fixed").status == 200
    assert not quiet.grep(r"DEBUG|Current configuration")


def test_a_crash_keeps_a_json_error_log_json(start_server, tmp_path):
    """faulthandler writes a crashed worker's Python stacks as plain lines; in a
    JSON log they come as one object, from the master, before its line on the
    worker's end."""
    errors = tmp_path / "error.log"
    server = _start_logging_to(start_server, errors, "--log-format", "json")
    with contextlib.suppress(OSError, IncompleteResponse):
        server.request("GET", "/segfault")

    def objects():
        return [json.loads(line) for line in errors.read_text().splitlines()]

    assert wait_until(lambda: any("killed by signal 11" in o["message"] for o in objects()), timeout=20)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    messages = [o["message"] for o in objects()]
    [stacks] = [i for i, m in enumerate(messages) if "crashed; its Python stacks:" in m]
    assert "Fatal Python error: Segmentation fault" in messages[stacks], messages[stacks]
    assert re.search(r'File ".*behaviour\.py", line \d+ in segfault', messages[stacks]), messages[stacks]
    assert stacks < next(i for i, m in enumerate(messages) if "killed by signal 11" in m)


def test_json_error_log_keeps_printed_lines_whole(start_server, tmp_path):
    errors = tmp_path / "error.log"
    server = _start_logging_to(start_server, errors, "--log-format", "json")
    server.request("GET", "/print-errors")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    messages = [json.loads(line)["message"] for line in errors.read_text().splitlines()]
    assert "piece by 42" in messages, messages
    assert "no newline at the end" in messages, messages
    assert not [m for m in messages if m in ("piece", "by", "42", " ")], messages


def test_a_thread_of_the_app_that_ends_leaves_no_wsgi_errors_text_behind(start_server, tmp_path):
    """What a thread of the app's own wrote after its last newline is written
    when the thread ends (a serving thread writes it after each request), as
    gunicorn writes it at once."""
    errors = tmp_path / "error.log"
    server = _start_logging_to(start_server, errors)
    assert server.request("GET", "/errors-from-thread").status == 200
    assert wait_until(lambda: "its last piece" in errors.read_text(), 10), errors.read_text()
    assert "from a thread of the app\n" in errors.read_text()


@pytest.fixture
def stats_server(start_server):
    # All three ports chosen here, held together so they differ: an HTTP
    # listener on port 0 could be given the stats port just let go.
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket()) for _ in range(3)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        http_port, stats_port, uwsgi_port = (s.getsockname()[1] for s in socks)
    server = start_server(
        "behaviour:application",
        "--stats",
        f"127.0.0.1:{stats_port}",
        "--uwsgi",
        f"127.0.0.1:{uwsgi_port}",
        http=f"127.0.0.1:{http_port}",
        workers=2,
        threads=2,
    )
    server.stats_port = stats_port
    server.uwsgi_port = uwsgi_port
    return server


def _metric(text, name, labels=""):
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name}{labels} not in\n{text}"
    return float(m.group(1))


def _metrics_once(port, name, labels, at_least):
    """The /metrics text once `name{labels}` reached `at_least` (workers
    report what they count a moment after the response)."""

    def settled():
        text = _get(port, "/metrics")[1].decode()
        return text if _metric(text, name, labels) >= at_least else None

    text = wait_until(settled)
    assert text, _get(port, "/metrics")[1].decode()
    return text


def test_metrics_count_a_known_mix_exactly(stats_server):
    s = stats_server
    for _ in range(5):
        assert s.request("GET", "/fixed").status == 200
    for _ in range(2):
        assert s.request("GET", "/raise-before").status == 500
    for _ in range(3):
        assert s.request("GET", "/bad-header").status == 500
    uw = _uwsgi(s.uwsgi_port, [("REQUEST_METHOD", "GET"), ("REQUEST_URI", "/fixed")])
    assert uw.startswith(b"HTTP/1.1 200")
    with s.connect() as conn:  # refused as it is read, by no thread's app call
        conn.send(b"GET /bad\x01 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 400

    # A worker counts a request once its response is out, so the client may
    # read the response a moment before it is counted.
    def settled():
        status, body = _get(s.stats_port, "/metrics")
        assert status == 200
        text = body.decode()
        return text if _metric(text, "corral_request_duration_seconds_count") >= 12 else None

    text = wait_until(settled)
    assert text
    assert _metric(text, "corral_requests_total", '{protocol="http",status="2xx"}') == 5
    assert _metric(text, "corral_requests_total", '{protocol="http",status="5xx"}') == 5
    assert _metric(text, "corral_requests_total", '{protocol="uwsgi",status="2xx"}') == 1
    assert _metric(text, "corral_requests_total", '{protocol="http",status="4xx"}') == 1
    assert _metric(text, "corral_request_duration_seconds_count") == 12
    assert _metric(text, "corral_request_duration_seconds_bucket", '{le="+Inf"}') == 12
    # /stats: the workers' counts add up to the total, the refused request included.
    stats = json.loads(_get(s.stats_port, "/stats")[1])
    assert stats["requests"] == 12 == sum(w["requests"] for w in stats["workers"]), stats
    assert _metric(text, "corral_requests_in_flight") == 0
    assert _metric(text, "corral_threads", '{state="idle"}') == 4
    assert _metric(text, "corral_ready") == 1
    assert _metric(text, "corral_sent_bytes_total") > 0
    for pid in s.worker_pids():
        assert re.search(
            rf'^corral_worker_rss_bytes{{worker="\d+",pid="{pid}"}} [1-9]\d*$', text, re.MULTILINE
        ), text


def test_requests_the_engine_refuses_are_logged_and_counted(start_server, tmp_path):
    """A request refused before the app (malformed, a line too long, a body over
    --max-body-size, one over the uwsgi protocol's rules) still gets an access log
    line and counts under its status class, as a response the app wrote would."""
    stats_port, uwsgi_port = _free_port(), _free_port()
    log = tmp_path / "access.log"
    s = start_server(
        "behaviour:application",
        "--stats",
        f"127.0.0.1:{stats_port}",
        "--uwsgi",
        f"127.0.0.1:{uwsgi_port}",
        "--max-body-size",
        "10",
        "--access-log",
        str(log),
    )
    bodies = {}
    for raw in (
        b"GARBAGE\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nuser-agent: scanner/1.0\r\nContent-Length: 50\r\n\r\n",
    ):
        with s.connect() as conn:
            conn.send(raw)
            resp = conn.read_response()
            assert resp.status in (400, 414, 413)
            bodies[str(resp.status)] = len(resp.body)
    with socket.create_connection(("127.0.0.1", uwsgi_port), timeout=10) as c:
        pairs = b"".join(
            len(k).to_bytes(2, "little") + k + len(v).to_bytes(2, "little") + v
            for k, v in ((b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", b"abc"))
        )
        c.sendall(b"\x00" + len(pairs).to_bytes(2, "little") + b"\x00" + pairs)
        assert c.recv(100).startswith(b"HTTP/1.1 400")
    lines = _read_lines(log, 4)
    statuses = sorted(line.split('" ')[1].split()[0] for line in lines)
    assert statuses == ["400", "400", "413", "414"], lines
    # With the headers read, as far as they went.
    assert any('"POST /echo HTTP/1.1" 413' in line and '"scanner/1.0"' in line for line in lines), lines
    # %(b)s is the body's length, as for the app's responses, not the head's too.
    for line in lines:
        status, size = line.split('" ')[1].split()[:2]
        if status in ("413", "414"):
            assert int(size) == bodies[status], (line, bodies)
    text = _metrics_once(stats_port, "corral_requests_total", '{protocol="http",status="4xx"}', 3)
    assert _metric(text, "corral_requests_total", '{protocol="http",status="4xx"}') == 3
    assert _metric(text, "corral_requests_total", '{protocol="uwsgi",status="4xx"}') == 1
    # Bytes sent are the bodies', as the log counts them; the worker's count
    # takes in every refusal, the 413 of a request parsed whole too.
    logged = sum(int(line.split('" ')[1].split()[1].replace("-", "0")) for line in lines)
    assert _metric(text, "corral_sent_bytes_total") == logged, (text, lines)
    stats = json.loads(_get(stats_port, "/stats")[1])
    assert stats["requests"] == 4 == sum(w["requests"] for w in stats["workers"]), stats


def test_a_workers_respawns_count_the_workers_replaced_to_come_to_it(start_server):
    """A replacement takes another slot than the worker it replaces: the
    count follows the line of workers, not the slot."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        stats_port = held.getsockname()[1]
    server = start_server(
        "behaviour:application", "--stats", f"127.0.0.1:{stats_port}", "--max-requests", "2", workers=1
    )
    for done in range(1, 4):
        old = server.worker_pids()
        for _ in range(2):
            assert server.request("GET", "/fixed").status == 200

        def replaced(old=old, done=done):
            workers = json.loads(_get(stats_port, "/stats")[1])["workers"]
            return workers if len(workers) == 1 and workers[0]["pid"] not in old else None

        workers = wait_until(replaced, 20)
        assert workers and workers[0]["respawns"] == done, workers
    text = _get(stats_port, "/metrics")[1].decode()
    assert _metric(text, "corral_worker_respawns_total", '{reason="max_requests"}') == 3


def test_a_body_dropped_after_its_413_counts_as_received(start_server):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        stats_port = held.getsockname()[1]
    server = start_server(
        "behaviour:application", "--stats", f"127.0.0.1:{stats_port}", "--max-body-size", "100000", workers=1
    )
    body = b"x" * 500_000
    with server.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n" + body)
        assert conn.read_response().status == 413
    text = _metrics_once(stats_port, "corral_received_bytes_total", "", len(body))
    assert _metric(text, "corral_received_bytes_total") < len(body) + 1000


def test_stats_json_and_cli(stats_server):
    s = stats_server
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(s.request, "GET", "/slow?secs=2&id=seen", timeout=30)
        s.wait_for("slow request started: seen")
        s.request("GET", "/raise-before?more=%0Aon%20a%20second%20line")
        status, body = _get(s.stats_port, "/stats")
        assert status == 200
        data = json.loads(body)
        assert {w["pid"] for w in data["workers"]} == set(s.worker_pids())
        busy = [c for w in data["workers"] for c in w["current"]]
        assert any(c["method"] == "GET" and c["path"].startswith("/slow") for c in busy), data
        # The exception's type and whole message, not the traceback's last line.
        want = "RuntimeError: boom before start_response\non a second line"
        assert any(w["last_exception"] == want for w in data["workers"]), data
        # `corral stats ADDR` prints the same document.
        out = subprocess.run(
            [*CORRAL, "stats", f"127.0.0.1:{s.stats_port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert {w["pid"] for w in json.loads(out)["workers"]} == set(s.worker_pids())
        assert slow.result(30).status == 200


def test_readyz_flips_during_graceful_shutdown(stats_server):
    s = stats_server
    assert _get(s.stats_port, "/healthz") == (200, b"ok\n")
    assert _get(s.stats_port, "/readyz")[0] == 200
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(s.request, "GET", "/slow?secs=2&id=drain", timeout=30)
        s.wait_for("slow request started: drain")
        s.signal(signal.SIGTERM)
        # Draining: not ready, still alive, while the slow request finishes.
        assert wait_until(lambda: _get(s.stats_port, "/readyz")[0] == 503, 5)
        assert _get(s.stats_port, "/healthz")[0] == 200
        assert slow.result(30).status == 200
    assert s.wait_exit(30) == 0


def test_idle_monitoring_clients_do_not_hold_up_the_master(stats_server):
    """Clients that connect to the stats port and send nothing (a stuck scraper,
    half-open probes) cost the master nothing: other probes are answered and a
    killed worker is replaced while they stay connected."""
    s = stats_server
    idle = [socket.create_connection(("127.0.0.1", s.stats_port), timeout=10) for _ in range(20)]
    try:
        time.sleep(0.2)
        assert _get(s.stats_port, "/healthz", timeout=3) == (200, b"ok\n")
        victim = s.worker_pids()[0]
        mark = s.mark()
        os.kill(victim, signal.SIGKILL)
        s.wait_for(r"Worker ready", since=mark, timeout=5)
        assert _get(s.stats_port, "/readyz", timeout=3)[0] == 200
    finally:
        for c in idle:
            c.close()


def test_a_flood_of_idle_monitoring_clients_does_not_keep_probes_out(stats_server):
    """More idle connections than the master keeps for monitoring (64): the
    oldest make room, so a liveness probe is still answered, and one written by
    hand with bare line feeds too."""
    s = stats_server
    idle = [socket.create_connection(("127.0.0.1", s.stats_port), timeout=10) for _ in range(100)]
    try:
        time.sleep(0.2)
        for _ in range(10):
            assert _get(s.stats_port, "/healthz", timeout=3) == (200, b"ok\n")
        # Nor does it need the version.
        for raw in (b"GET /healthz HTTP/1.1\n\n", b"GET /healthz\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", s.stats_port), timeout=5) as c:
                c.sendall(raw)
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok\n"), (raw, data)
    finally:
        for c in idle:
            c.close()


def test_a_method_or_target_with_line_breaks_cannot_forge_log_lines(start_server):
    """uwsgi, FastCGI and SCGI carry the method and target as the front end sent
    them: a line break in them is escaped in the error log, not a new line."""
    server = start_server("behaviour:application", "--uwsgi", "127.0.0.1:0", http=None, wait=False)
    port = int(server.wait_for(r"Listening at: uwsgi://127\.0\.0\.1:(\d+)")[0].group(1))
    server.wait_for(r"Worker ready")
    forged = "\n[2026-01-01 00:00:00 +0000] [1] [CRITICAL] FORGED"
    out = _uwsgi(
        port,
        [
            ("REQUEST_METHOD", "GET" + forged),
            ("REQUEST_URI", "/raise-before" + forged),
            ("PATH_INFO", "/raise-before"),
        ],
    )
    assert out.startswith(b"HTTP/1.1 500"), out
    server.wait_for(r"Error handling request GET\\x0a\[2026")
    assert not server.grep(r"^\[2026-01-01 00:00:00 \+0000\] \[1\] \[CRITICAL\] FORGED"), server.log


def test_stats_responses_follow_http(stats_server):
    s = stats_server

    def raw(request):
        with socket.create_connection(("127.0.0.1", s.stats_port), timeout=5) as c:
            c.sendall(request)
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        return lines[0], {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:])}, body

    status, headers, _ = raw(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status.startswith("HTTP/1.1 405") and headers["allow"] == "GET, HEAD"
    _, get_headers, get_body = raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, head_headers, head_body = raw(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status.startswith("HTTP/1.1 200") and head_body == b""
    assert int(head_headers["content-length"]) > 0
    assert int(get_headers["content-length"]) == len(get_body)
    assert "date" in get_headers and "date" in head_headers


def test_top_renders_in_a_terminal(stats_server):
    s = stats_server
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["COLUMNS"], os.environ["LINES"] = "120", "30"
        os.execv(CORRAL[0], [*CORRAL, "top", f"127.0.0.1:{s.stats_port}"])
    try:
        screen = b""
        deadline = time.monotonic() + 15

        # Two whole redraws (a frame ends with its "q to quit" line): the
        # second shows a request rate.
        def two_frames():
            frames = screen.split(b"\x1b[H\x1b[2J")
            return screen.count(b"corral master") >= 2 and b"(q to quit)" in frames[-1]

        while time.monotonic() < deadline and not two_frames():
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
        text = screen.decode(errors="replace")
        last = text.split("\x1b[H\x1b[2J")[-1]
        assert "WORKER" in last and "STATE" in last, text
        for wpid in s.worker_pids():
            assert str(wpid) in last, last
        assert "req/s" in last, last
        os.write(fd, b"q")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_shutdown_delay_turns_readiness_off_before_listeners_close(start_server):
    stats_port = _free_port()
    server = start_server(
        "behaviour:application", "--stats", f"127.0.0.1:{stats_port}", "--shutdown-delay", "2", workers=2
    )
    assert _get(stats_port, "/readyz")[0] == 200
    mark = server.mark()
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert wait_until(lambda: _get(stats_port, "/readyz")[0] == 503, 5)
    # Not ready, yet still serving: a load balancer has time to move away.
    served = 0
    while time.monotonic() - started < 1.5:
        assert server.request("GET", "/fixed").status == 200
        served += 1
    assert served > 0
    server.wait_for(r"Shutdown delay over", since=mark)
    assert time.monotonic() - started >= 2
    assert server.wait_exit(30) == 0


def test_app_logging_keeps_working(start_server):
    server = start_server("logging_app:application", workers=2)
    assert server.request("GET", "/hello").status == 200
    server.wait_for(r"^APPLOG INFO myapp: handling /hello$")
    server.wait_for(r"^APPLOG WARNING myapp: a warning with 1 args$")


def test_client_disconnect_is_one_line_not_a_traceback(start_server):
    server = start_server("behaviour:application")
    conn = server.connect()
    conn.send_request("GET", "/closing?id=gone-log&mode=infinite", {"Host": "x"})
    assert conn.read_head().status == 200
    conn.read_exact(100_000)
    mark = server.mark()
    conn.close()
    lines = server.wait_for(
        r"\[INFO\] GET /closing\?id=gone-log&mode=infinite from 127\.0\.0\.1:\d+: client disconnected",
        since=mark,
    )
    assert len(lines) == 1
    time.sleep(0.5)
    after = server.log.splitlines()[mark:]
    assert not [line for line in after if "Traceback" in line or "ClientDisconnected" in line], after
    assert len([line for line in after if "client disconnected" in line]) == 1
    assert server.request("GET", "/fixed").status == 200


def test_log_format_json_applies_to_the_access_log_too(start_server, tmp_path):
    log = tmp_path / "access.log"
    server = start_server(
        "behaviour:application", "--log-format", "json", "--access-log", str(log), wait=False
    )
    server.wait_for(r'"message":"Worker ready')
    port = int(server.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")[0].group(1))
    server.host, server.port = "127.0.0.1", port
    server.request("GET", "/fixed")
    (line,) = _read_lines(log, 1)
    assert json.loads(line)["path"] == "/fixed"


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_log_files_with_user_and_chdir(start_server):
    """Relative log paths name files in the directory corral starts in (not the
    --chdir one); files corral creates are given to --user, so workers can write
    the access log and reopen both logs on SIGUSR1."""
    import http.client
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    from front_ends import free_port

    base = Path(tempfile.mkdtemp(prefix="corral-logs-"))
    try:
        base.chmod(0o755)
        start, app_dir = base / "start", base / "app"
        start.mkdir(mode=0o755)
        app_dir.mkdir(mode=0o755)
        port = free_port()
        server = start_server(
            "behaviour:application",
            # Imported by the master, as root: the interpreter's own files may
            # not be readable by nobody.
            "--preload",
            "--user",
            "nobody",
            "--access-log",
            "access.log",
            "--error-log",
            "error.log",
            "--chdir",
            str(app_dir),
            http=f"127.0.0.1:{port}",
            cwd=start,
            wait=False,
        )
        error_log, access_log = start / "error.log", start / "access.log"

        def error_text():
            return error_log.read_text() if error_log.exists() else ""

        assert wait_until(lambda: "Worker ready" in error_text(), 20), error_text()

        def get(path):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", path)
                return conn.getresponse().status
            finally:
                conn.close()

        assert get("/fixed") == 200
        assert wait_until(lambda: access_log.exists() and "GET /fixed" in access_log.read_text(), 10)
        nobody = pwd.getpwnam("nobody").pw_uid
        assert error_log.stat().st_uid == nobody and access_log.stat().st_uid == nobody
        assert not (app_dir / "access.log").exists() and not (app_dir / "error.log").exists()
        server.signal(signal.SIGUSR1)
        assert get("/fixed?after=usr1") == 200
        assert wait_until(lambda: "after=usr1" in access_log.read_text(), 10)
        assert "Permission denied" not in error_text(), error_text()
        # Rotated twice (renamed, no `create`) in a directory the user may
        # write: the master holds the current files only, not every file it
        # created since the start.
        os.chown(start, pwd.getpwnam("nobody").pw_uid, -1)
        for n in (1, 2):
            error_log.rename(start / f"error.log.{n}")
            access_log.rename(start / f"access.log.{n}")
            server.signal(signal.SIGUSR1)
            assert wait_until(lambda: access_log.exists() and error_log.exists(), 10)
        assert get("/fixed?after=rotations") == 200
        assert wait_until(lambda: "after=rotations" in access_log.read_text(), 10)
        held = [
            os.readlink(f"/proc/{server.proc.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{server.proc.pid}/fd")
        ]
        logs_held = sorted(p for p in held if p.startswith(str(start)))
        assert logs_held == sorted({str(error_log), str(access_log)} & set(logs_held)), held
        assert len([p for p in logs_held if p == str(error_log)]) == 1, held
        assert "replacing it" not in error_text() and "while booting" not in error_text(), error_text()
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_existing_log_file_the_user_cannot_write_is_refused_at_start(start_server, tmp_path):
    log = tmp_path / "access.log"
    log.write_text("")
    log.chmod(0o644)
    server = start_server("behaviour:application", "--user", "nobody", "--access-log", str(log), wait=False)
    assert server.wait_exit(20) == 2
    assert server.grep(r"--access-log .*access\.log: user nobody cannot write it")


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
@pytest.mark.parametrize("flag", ["--access-log", "--error-log"])
def test_a_log_path_that_is_a_link_is_refused_as_root_with_user(start_server, tmp_path, flag):
    """The user the workers run as may write the log directory (to reopen the
    logs after logrotate), so a link there made by that user must not lead
    the master, still root, to create or append to the file it points at:
    the link is refused at start, and the file it names is not created (it
    was, and then given to that user)."""
    logs, outside = tmp_path / "logs", tmp_path / "outside"
    logs.mkdir()
    outside.mkdir(mode=0o700)
    target = outside / "created"
    (logs / "corral.log").symlink_to(target)
    server = start_server(
        "behaviour:application", "--user", "nobody", flag, str(logs / "corral.log"), wait=False
    )
    assert server.wait_exit(20) == 2
    assert server.grep(
        rf"{flag} .*corral\.log: it is a symbolic link, which corral started as root with --user"
    ), server.log
    assert not target.exists()
    # --check-config, which a deploy runs before the start, says the same.
    check = subprocess.run(
        [
            *CORRAL,
            "--check-config",
            "--user",
            "nobody",
            flag,
            str(logs / "corral.log"),
            "behaviour:application",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(APPS),
    )
    assert check.returncode == 2, check.stderr
    assert "it is a symbolic link, which corral started as root with --user" in check.stderr
    assert not target.exists()


def test_a_worker_that_cannot_open_the_access_log_writes_to_the_masters(start_server, tmp_path):
    """After logrotate left a log path the workers cannot open (here a
    directory stands there), a new worker does not fail to boot: it says so
    and writes to the file the master has open, as the old workers do."""
    log = tmp_path / "access.log"
    server = start_server("behaviour:application", "--access-log", str(log), workers=1)
    assert server.request("GET", "/fixed?n=1").status == 200
    rotated = tmp_path / "access.log.1"
    log.rename(rotated)
    log.mkdir()
    mark = server.mark()
    server.signal(signal.SIGUSR1)
    server.wait_for(r"reopening .*access\.log: Is a directory", since=mark)
    old = server.worker_pids()[-1]
    mark = server.mark()
    os.kill(old, signal.SIGKILL)
    server.wait_for(READY_RE.pattern, since=mark, timeout=30)
    server.wait_for(
        r"--access-log .*access\.log: Is a directory .*; writing to the file the master has open instead",
        since=mark,
    )
    assert int(server.request("GET", "/pid").body) != old
    assert server.request("GET", "/fixed?n=2").status == 200
    assert wait_until(lambda: "GET /fixed?n=2 " in rotated.read_text(), 10), rotated.read_text()
    assert server.running()


def test_access_log_lines_survive_a_worker_that_dies(start_server, tmp_path):
    """Lines of requests already answered are written before the worker dies."""
    log = tmp_path / "access.log"
    server = start_server("behaviour:application", "--access-log", str(log), workers=1)
    for i in range(3):
        assert server.request("GET", f"/fixed?n={i}").status == 200
    mark = server.mark()
    with pytest.raises((OSError, IncompleteResponse)):
        server.request("GET", "/exit?code=1", timeout=10)
    server.wait_for(r"exited with code 1 while serving GET /exit", since=mark)
    text = log.read_text()
    for i in range(3):
        assert f"GET /fixed?n={i} " in text, text


def test_stats_subcommand_errors(tmp_path):
    import threading

    def run(*args):
        return subprocess.run([*CORRAL, *args], capture_output=True, text=True, timeout=30, check=False)

    # No address: a usage line, never a server started for an app named "stats".
    for sub in ("stats", "top"):
        proc = run(sub)
        assert proc.returncode == 2 and f"usage: corral {sub} ADDR" in proc.stderr, proc.stderr
        assert "Listening at" not in proc.stderr
        proc = run(sub, "--help")
        assert proc.returncode == 0 and f"usage: corral {sub} ADDR" in proc.stdout, proc
        proc = run(sub, "not-an-address")
        assert proc.returncode in (1, 2) and "not HOST:PORT" in proc.stderr, proc
    # A peer that is not an HTTP server, and an HTTP server that is not corral's stats.
    replies = [
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    ]
    for reply in replies:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def answer(srv=srv, reply=reply):
            c, _ = srv.accept()
            c.recv(4096)
            c.sendall(reply)
            c.close()

        t = threading.Thread(target=answer)
        t.start()
        proc = run("stats", f"127.0.0.1:{srv.getsockname()[1]}")
        t.join(10)
        srv.close()
        assert proc.returncode == 1, proc.stderr
        assert "corral stats: cannot read" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("sub", ["stats", "top"])
def test_stats_subcommand_into_a_closed_pipe(stats_server, sub):
    """A reader that is gone (`| head`, say) is no error of corral stats or top."""
    r, w = os.pipe()
    os.close(r)  # every write to w now fails with EPIPE
    try:
        proc = subprocess.run(
            [*CORRAL, sub, f"127.0.0.1:{stats_server.stats_port}"],
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_an_offloaded_download_is_in_flight_until_it_ends(start_server, tmp_path):
    """A download the offload thread sends holds no thread, but it is a request
    in flight: /stats and /metrics show it until its last byte, and a worker
    that dies meanwhile says it was sending it."""
    public = tmp_path / "public"
    public.mkdir()
    size = 40 << 20
    data = os.urandom(size)
    (public / "big.bin").write_bytes(data)
    stats_port = _free_port()
    server = start_server(
        "behaviour:application", "--static", f"/static={public}", "--stats", f"127.0.0.1:{stats_port}"
    )

    def worker():
        return json.loads(_get(stats_port, "/stats")[1])["workers"][0]

    def metric(name):
        text = _get(stats_port, "/metrics")[1].decode()
        return int(re.search(rf"^{name} (\d+)$", text, re.MULTILINE).group(1))

    with slow_reader(server) as slow:
        slow.send_request("GET", "/static/big.bin", {"Host": "x"})
        assert slow.read_head().status == 200
        assert wait_until(lambda: worker()["offloaded"] == 1, timeout=10), worker()
        w = worker()
        assert w["busy_threads"] == 0
        assert [(c["method"], c["path"], c["offloaded"]) for c in w["current"]] == [
            ("GET", "/static/big.bin", True)
        ]
        assert (metric("corral_requests_in_flight"), metric("corral_offloaded_responses")) == (1, 1)
        assert read_hashed(slow, size) == (size, hashlib.sha256(data).hexdigest())
    assert wait_until(lambda: worker()["offloaded"] == 0, timeout=10), worker()
    assert worker()["current"] == []
    assert (metric("corral_requests_in_flight"), metric("corral_offloaded_responses")) == (0, 0)

    with slow_reader(server) as slow:
        slow.send_request("GET", "/static/big.bin?again", {"Host": "x"})
        assert slow.read_head().status == 200
        assert wait_until(lambda: worker()["offloaded"] == 1, timeout=10), worker()
        mark = len(server.lines)
        os.kill(worker()["pid"], signal.SIGKILL)
        server.wait_for(
            r"killed by signal 9 \(SIGKILL\) while serving GET /static/big\.bin\?again \(sending its file, \d+ ms in\)",
            since=mark,
        )


def test_a_request_past_timeout_counts_in_requests_and_durations(start_server):
    """A request answered 504 by --timeout is a request like any other for
    the metrics, though its thread never returns to count it (its worker is
    replaced)."""
    stats_port = _free_port()
    s = start_server(
        "behaviour:application", "--stats", f"127.0.0.1:{stats_port}", "--timeout", "1", workers=1, threads=2
    )
    resp = s.request("GET", "/slow?secs=2&id=late", timeout=30)
    assert resp.status == 504
    text = _metrics_once(stats_port, "corral_request_timeouts_total", "", 1)
    assert _metric(text, "corral_requests_total", '{protocol="http",status="5xx"}') == 1
    assert _metric(text, "corral_request_duration_seconds_count", "") == 1
    assert _metric(text, "corral_request_duration_seconds_bucket", '{le="0.5"}') == 0


def test_a_request_past_timeout_has_its_access_log_line(start_server, tmp_path):
    """Its thread may never come back to write the line (the worker is replaced),
    so the line is written as the client gets its 504, once."""
    log = tmp_path / "access.log"
    s = start_server(
        "behaviour:application",
        "--access-logfile",
        str(log),
        "--access-logformat",
        '%(h)s "%(r)s" %(s)s %(b)s "%(a)s" %({x-id}i)s',
        "--timeout",
        "1",
        workers=1,
        threads=2,
    )
    resp = s.request(
        "GET", "/slow?secs=3&id=late", headers={"User-Agent": "probe/1", "X-Id": "7"}, timeout=30
    )
    assert resp.status == 504
    assert s.request("GET", "/fixed").status == 200
    # %(b)s is the 504's body, as for any response.
    line = f'127.0.0.1 "GET /slow?secs=3&id=late HTTP/1.1" 504 {len(resp.body)} '
    assert wait_until(lambda: log.exists() and line in log.read_text(), timeout=20), log.read_text()
    [timed_out] = [entry for entry in log.read_text().splitlines() if "/slow" in entry]
    assert timed_out.endswith('"probe/1" 7'), timed_out
    # Whether or not the stuck thread comes back before its worker is gone: one line.
    time.sleep(3)
    s.signal(signal.SIGTERM)
    assert s.wait_exit(30) == 0
    assert [entry for entry in log.read_text().splitlines() if "/slow" in entry] == [timed_out]


@pytest.mark.parametrize("size", [4, 200_000])
def test_the_request_time_counts_a_slow_upload_whatever_its_size(start_server, tmp_path, size):
    """%(D)s counts from the end of the request's head, as gunicorn's does: a
    small body the server reads ahead of the app counted only from its end,
    so the same slow client took 0 ms or its whole upload by the body's size."""
    log = tmp_path / "access.log"
    s = start_server(
        "behaviour:application", "--access-logfile", str(log), "--access-logformat", "%(r)s %(s)s %(D)s"
    )
    with s.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"a" * (size // 2))
        time.sleep(1.5)
        conn.send(b"b" * (size - size // 2))
        resp = conn.read_response()
        assert (resp.status, len(resp.body)) == (200, size)
    assert wait_until(lambda: log.exists() and "POST /echo" in log.read_text(), timeout=20)
    [line] = [x for x in log.read_text().splitlines() if "POST /echo" in x]
    assert int(line.rsplit(" ", 1)[1]) >= 1_000_000, line


def _access_log_to_a_pipe(tmp_path, *extra):
    """corral with its access log on standard output, a pipe whose read end
    the test holds (and reads only when it wants), its error log in a file:
    (process, read end, HTTP port, error log), once its worker is ready."""
    read_end, write_end = os.pipe()
    port = _free_port()
    errors = tmp_path / "error.log"
    proc = subprocess.Popen(
        [
            *CORRAL,
            "--http",
            f"127.0.0.1:{port}",
            "--access-log",
            "-",
            *extra,
            "--error-log",
            str(errors),
            "behaviour:application",
        ],
        cwd=APPS,
        stdout=write_end,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write_end)
    try:
        assert wait_until(lambda: errors.exists() and "Worker ready" in errors.read_text(), timeout=30)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        os.close(read_end)
        raise
    return proc, read_end, port, errors


def test_a_log_pipe_nobody_reads_drops_lines_instead_of_stopping_the_server(tmp_path):
    """Standard output is a pipe whose reader stopped reading (`corral | tool`
    with the tool stuck): the access log's lines past what the pipe holds are
    dropped, every request is still answered, and once the reader reads again
    a line says how many were lost."""
    proc, read_end, port, _ = _access_log_to_a_pipe(tmp_path)
    try:
        # About 100 bytes a line: 2000 lines are three times what a pipe holds.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            conn = RawConn(s)
            for _ in range(2000):
                conn.send_request("GET", "/fixed", {"Host": "x"})
                assert conn.read_response().status == 200
            os.set_blocking(read_end, False)
            with contextlib.suppress(BlockingIOError):
                while os.read(read_end, 1 << 20):
                    pass
            os.set_blocking(read_end, True)
            conn.send_request("GET", "/fixed?after", {"Host": "x"})
            assert conn.read_response().status == 200
        seen = b""

        def noted():
            nonlocal seen
            readable, _, _ = select.select([read_end], [], [], 0.2)
            if readable:
                seen += os.read(read_end, 1 << 16)
            return b"log line(s) dropped" in seen and b"/fixed?after" in seen

        # The note goes out with the first write the reader takes, and the
        # line of the request after may come with a later flush.
        assert wait_until(noted, timeout=15), seen[-500:]
        # A line like the log's others, with the process that dropped them.
        line = next(x for x in seen.decode().splitlines() if "log line(s) dropped" in x)
        assert re.fullmatch(r"\[[^]]+\] \[\d+\] \[WARNING\] \d+ log line\(s\) dropped: .*", line), line
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        os.close(read_end)


def test_lines_a_worker_dropped_for_a_stalled_log_reader_are_counted_when_it_exits(tmp_path):
    """A worker that leaves (here retired by HUP) while its log's reader
    still takes nothing cannot write the note saying how many lines it
    dropped: the master says it once the worker has exited, so that every
    request is either in the access log or in a count."""
    proc, read_end, port, errors = _access_log_to_a_pipe(tmp_path, "--access-log-format", "%(r)s")
    try:
        # 2000 lines of some 20 bytes are more than the 64 KiB a pipe holds.
        requests = 4000
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            conn = RawConn(s)
            for _ in range(requests):
                conn.send_request("GET", "/fixed", {"Host": "x"})
                assert conn.read_response().status == 200
        [retired] = [int(p) for p in re.findall(r"Worker ready: pid=(\d+)", errors.read_text())]
        proc.send_signal(signal.SIGHUP)
        said = re.compile(rf"Worker 0 \(pid {retired}\) dropped (\d+) log line\(s\) before it exited")
        assert wait_until(lambda: said.search(errors.read_text()), timeout=30), errors.read_text()[-2000:]
        dropped = int(said.search(errors.read_text()).group(1))
        os.set_blocking(read_end, False)
        seen = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 1 << 20):
                seen += chunk
        logged = seen.count(b"GET /fixed HTTP/1.1\n")
        assert dropped > 0 and logged + dropped == requests, (logged, dropped)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        os.close(read_end)


def test_a_stats_flood_at_the_open_files_limit_leaves_room_for_new_workers(start_server):
    """Idle monitoring clients that fill the master's descriptors up to the
    open files limit: the oldest are closed for room, a probe is answered,
    and a worker started meanwhile boots (it held the master's stats
    descriptors while it set up its own, and died of EMFILE)."""
    stats = _free_port()
    server = start_server(
        "behaviour:application",
        "--stats",
        f"127.0.0.1:{stats}",
        workers=2,
        command=["prlimit", "--nofile=64:64", *CORRAL],
    )
    [first, _] = server.worker_pids()
    held = []
    try:
        for _ in range(120):
            held.append(socket.create_connection(("127.0.0.1", stats), timeout=5))
        time.sleep(0.5)
        mark = server.mark()
        os.kill(first, signal.SIGKILL)
        server.wait_for(READY_RE.pattern, since=mark, timeout=20)
        assert not server.grep(r"cannot set up the worker's signals", since=mark), server.log[-2000:]
        with socket.create_connection(("127.0.0.1", stats), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    assert server.request("GET", "/fixed").status == 200


def test_metrics_say_when_their_counters_began(start_server):
    """The counters count from the master program's start, which a re-exec
    makes anew: corral_start_time_seconds (Unix time) moves with it, so a
    reset is told from a fall, as process_start_time_seconds tells it for a
    client library's metrics."""
    stats = _free_port()
    before = time.time()
    server = start_server("behaviour:application", "--stats", f"127.0.0.1:{stats}")
    text = _get(stats, "/metrics")[1].decode()
    assert "# TYPE corral_start_time_seconds gauge" in text
    first = _metric(text, "corral_start_time_seconds")
    assert before - 1 <= first <= time.time()
    assert server.request("GET", "/fixed").status == 200
    time.sleep(1.1)
    mark = server.mark()
    server.signal(signal.SIGUSR2)
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=30)
    text = _get(stats, "/metrics")[1].decode()
    assert _metric(text, "corral_start_time_seconds") > first + 1


@pytest.mark.parametrize("option", ["--access-log", "--error-log"])
def test_a_log_that_is_a_named_pipe_with_no_reader_is_refused_at_once(start_server, tmp_path, option):
    """A named pipe nobody reads yet: the open for writing would wait for a
    reader, deaf to TERM and Ctrl-C, with nothing said. It is refused with a
    line saying why; with its reader there, the log goes through it."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    server = start_server("behaviour:application", option, str(fifo), wait=False)
    assert server.wait_exit(20) != 0
    assert re.search(
        r"log\.fifo: it is a named pipe \(FIFO\) that no process reads: start its reader first", server.log
    ), server.log
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    port = free_port()
    server = start_server("behaviour:application", option, str(fifo), http=f"127.0.0.1:{port}", wait=False)
    try:
        expected = b"GET /fixed" if option == "--access-log" else b"Worker ready"
        got = b""
        deadline = time.monotonic() + 20
        while expected not in got and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            with contextlib.suppress(BlockingIOError):
                got += os.read(reader, 65536)
            time.sleep(0.05)
        assert expected in got, got
    finally:
        server.signal(signal.SIGTERM)
        server.wait_exit(20)
        os.close(reader)


def test_access_log_lines_lost_to_a_full_disk_are_counted_and_no_line_is_torn(start_server, tmp_path):
    """The disk under the access log fills: the lines that do not fit are
    lost, but none is cut into the next one, and once the disk has room
    again a line says how many were lost and why."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]
    if subprocess.run(mount, check=False, capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        log = disk / "access.log"
        server = start_server("behaviour:application", "--access-log", str(log))
        assert server.request("GET", "/fixed?n=first").status == 200
        assert wait_until(lambda: b"first" in log.read_bytes(), timeout=10)
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
            while True:
                f.write(b"x" * 100)
        for i in range(40):
            assert server.request("GET", f"/fixed?n=lost{i:02d}-" + "y" * 200).status == 200
        server.wait_for(r"writing the access log: No space left on device")
        filler.unlink()
        assert server.request("GET", "/fixed?n=after").status == 200
        assert wait_until(lambda: b"log line(s) lost" in log.read_bytes(), timeout=10), log.read_text()
        server.signal(signal.SIGTERM)
        server.wait_exit(20)
        lines = [line for line in log.read_text().split("\n") if line]
        notes = [line for line in lines if "log line(s) lost" in line]
        assert len(notes) == 1, lines
        assert re.search(r"\[WARNING\] \d+ log line\(s\) lost: No space left on device", notes[0]), notes
        # Every other line is one request's, whole, or the start of one cut
        # short and ended there: never two run together.
        requests = [line for line in lines if line not in notes]
        assert all(line.startswith("127.0.0.1 - - [") and line.count('"GET ') == 1 for line in requests), (
            requests
        )
        assert re.fullmatch(
            r'127\.0\.0\.1 - - \[[^]]+\] "GET /fixed\?n=after HTTP/1\.1" 200 .*', requests[-1]
        ), requests
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_log_reopen_that_fails_is_said_on_standard_error_too(start_server, tmp_path):
    """USR1 after the log directory was removed: the reopen fails, and the
    line saying so goes to standard error as well, not only to the old
    file, which nobody reads any more; serving goes on."""
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    server = start_server(
        "behaviour:application",
        "--error-log",
        str(logs / "error.log"),
        "--access-log",
        str(logs / "access.log"),
        http=f"127.0.0.1:{port}",
        wait=False,
    )
    error_log = logs / "error.log"
    assert wait_until(lambda: error_log.exists() and b"Worker ready" in error_log.read_bytes(), timeout=20)
    shutil.rmtree(logs)
    server.signal(signal.SIGUSR1)
    server.wait_for(
        r"\[ERROR\] Received SIGUSR1: reopening the error log \S+error\.log: No such file or directory"
    )
    server.wait_for(
        r"\[ERROR\] Received SIGUSR1: the access log: reopening \S+access\.log: No such file or directory"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_the_access_log_counts_only_the_body_bytes_that_went_out(start_server, tmp_path, framing):
    """A client that stops reading a large block: the write is given up
    after --socket-timeout, and the access log counts what went out of it,
    not the whole block (it was counted before it was written)."""
    size = 32 * 1024 * 1024
    (tmp_path / "block_app.py").write_text(
        "def application(environ, start_response):\n"
        f"    headers = [('Content-Length', '{size}')] if environ['QUERY_STRING'] == 'length' else []\n"
        "    start_response('200 OK', [('Content-Type', 'application/octet-stream'), *headers])\n"
        f"    return iter([b'x' * {size}])\n"
    )
    access = tmp_path / "access.log"
    server = start_server(
        "block_app:application",
        "--socket-timeout",
        "1",
        "--access-log",
        str(access),
        "--access-log-format",
        "%(s)s %(B)s",
        pythonpath=None,
        cwd=tmp_path,
    )
    with slow_reader(server) as conn:
        conn.send_request("GET", f"/?{framing}", {"Host": "x"})
        server.wait_for(r"GET /\?\w+ from 127\.0\.0\.1:\d+: gave up on the client", timeout=30)
    assert wait_until(lambda: access.read_text().strip(), timeout=10)
    status, sent = access.read_text().split()
    assert status == "200"
    assert 0 < int(sent) < size, sent
