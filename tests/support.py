"""Helpers for the end-to-end tests: running corral, and a raw HTTP/1.1 client.

`Server` starts ``corral`` in its own session (so it leads a process group),
collects every line of its stderr (and stdout) in background threads, parses
the real port from the ``Listening at:`` line and waits for the workers'
``Worker ready`` lines. `Server.cleanup` signals the whole process group
(TERM, then KILL after 10 s) so no worker survives a test.

`RawConn` speaks HTTP/1.1 over a plain socket and parses responses itself
(Content-Length, chunked, close-delimited, HEAD, 1xx), telling apart a body
that ended cleanly from one cut short by a closed connection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
APPS = TESTS / "apps"
ROOT = TESTS.parent

_script = Path(sys.executable).parent / "corral"
# The console script from the same environment as pytest; `python -m corral` otherwise.
CORRAL = [str(_script)] if _script.exists() else [sys.executable, "-m", "corral"]

LISTEN_RE = re.compile(r"Listening at: (http://(\S+):(\d+)|unix:(\S+))")
READY_RE = re.compile(r"Worker ready.*?pid=(\d+)")

# Every process group a test started (its number, and when its leader
# started), so the session can check none is left.
STARTED_GROUPS: list[tuple[int, int | None]] = []


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), which tells it
    from a later process given the same number; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def http10_over_unix(path, target: str = "/") -> bytes:
    """An HTTP/1.0 GET on a unix socket: the whole reply, up to the close."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def wait_until(predicate, timeout=10.0, interval=0.05):
    """Polls `predicate` until it returns something truthy; returns that, or None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class Server:
    """One corral master (and its workers) started for a test."""

    def __init__(
        self,
        app: str,
        *args: str,
        http: str | list[str] | None = "127.0.0.1:0",
        workers: int | None = None,
        threads: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        pythonpath: str | os.PathLike | None = APPS,
        command: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ):
        cmd = list(command or CORRAL)
        for addr in [http] if isinstance(http, str) else http or []:
            cmd += ["--http", addr]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if pythonpath is not None:
            cmd += ["--pythonpath", str(pythonpath)]
        cmd += [*args, app]
        self.cmd = cmd
        self.expected_workers = workers or 1
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=pass_fds,
        )
        self.pgid = self.proc.pid
        STARTED_GROUPS.append((self.pgid, start_time(self.pgid)))
        self._readers = [
            threading.Thread(target=self._collect, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._collect, args=(self.proc.stdout, self.stdout_lines), daemon=True),
        ]
        for t in self._readers:
            t.start()
        self.host: str | None = None
        self.port: int | None = None
        self.unix_path: str | None = None
        self.listeners: list[str] = []

    # -- output ---------------------------------------------------------------

    def _collect(self, stream, into):
        for raw in iter(stream.readline, b""):
            with self._cond:
                into.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """A position in the log; pass it as `since` to look only at later lines."""
        with self._cond:
            return len(self.lines)

    def grep(self, pattern: str, since: int = 0) -> list[re.Match]:
        rx = re.compile(pattern)
        with self._cond:
            return [m for m in (rx.search(line) for line in self.lines[since:]) if m]

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 10.0, since: int = 0) -> list[re.Match]:
        """Waits until `count` lines after `since` match `pattern`; fails with the log otherwise."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in (rx.search(line) for line in self.lines[since:]) if m]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {count} line(s) matching {pattern!r} "
                        f"(found {len(found)}); command {self.cmd}; exit code {self.proc.poll()}\n"
                        f"--- stderr ---\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.2))

    # -- lifecycle --------------------------------------------------------------

    def wait_started(self, timeout: float = 20.0) -> Server:
        """Waits for the listener line(s) and every worker's ready line."""
        first = self.wait_for(LISTEN_RE.pattern, timeout=timeout)[0]
        if first.group(4):
            self.unix_path = first.group(4)
        else:
            self.host, self.port = first.group(2), int(first.group(3))
        self.wait_for(READY_RE.pattern, count=self.expected_workers, timeout=timeout)
        # The master prints every listener before it forks the workers.
        self.listeners = [m.group(0) for m in self.grep(LISTEN_RE.pattern)]
        return self

    def worker_pids(self, since: int = 0) -> list[int]:
        return [int(m.group(1)) for m in self.grep(READY_RE.pattern, since)]

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Waits for the master to exit; fails with the log if it does not."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"corral did not exit within {timeout}s\n--- stderr ---\n{self.log}"
            ) from None
        for t in self._readers:
            t.join(5)
        return code

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def running(self) -> bool:
        return self.proc.poll() is None

    def cleanup(self) -> None:
        """Stops the master and every process of its group, whatever state they are in."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or group_members(self.pgid):
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        wait_until(lambda: not group_members(self.pgid), timeout=5)
        for t in self._readers:
            t.join(5)

    # -- clients ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connect(self, timeout: float = 10.0) -> RawConn:
        if self.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.unix_path)
        else:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        return RawConn(sock)

    def request(
        self, method: str = "GET", target: str = "/", headers=None, body: bytes = b"", **kw
    ) -> Response:
        """One request on a fresh connection that asks to be closed afterwards."""
        with self.connect(kw.pop("timeout", 10.0)) as conn:
            hdrs = {"Host": "localhost", "Connection": "close", **(headers or {})}
            conn.send_request(method, target, hdrs, body)
            return conn.read_response(head=method == "HEAD")

    def get_json(self, target: str, **kw):
        resp = self.request("GET", target, **kw)
        assert resp.status == 200, (resp.status, resp.body[:2000], self.log[-3000:])
        return json.loads(resp.body)


# -- raw HTTP client -----------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    # False when the connection closed before the body's framing said it was complete.
    complete: bool = True
    interim: list[int] = field(default_factory=list)

    def header(self, name: str, default=None):
        values = self.header_all(name)
        return values[0] if values else default

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class IncompleteResponse(Exception):
    pass


class RawConn:
    """A client connection that sends raw bytes and parses responses itself."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.eof = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def send_request(self, method="GET", target="/", headers=None, body=b"", version="HTTP/1.1"):
        head = f"{method} {target} {version}\r\n"
        hdrs = dict(headers or {})
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in hdrs):
            hdrs["Content-Length"] = str(len(body))
        head += "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        self.send(head.encode("latin-1") + b"\r\n" + body)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            if not self._fill():
                raise IncompleteResponse(f"connection closed inside a line: {self.buf[:200]!r}")
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                break
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_to_close(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def at_eof(self, timeout: float = 10.0) -> bool:
        """True if the server closes the connection (with no more bytes) within `timeout`."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while not self.buf and self._fill():
                pass
            return self.eof and not self.buf
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(old)

    def read_head(self) -> Response:
        line = self.read_line()
        m = re.match(rb"(HTTP/\d\.\d) (\d{3})(?: (.*))?$", line)
        if not m:
            raise IncompleteResponse(f"bad status line {line!r}")
        headers = []
        while True:
            h = self.read_line()
            if not h:
                break
            k, _, v = h.partition(b":")
            headers.append((k.decode("latin-1"), v.strip().decode("latin-1")))
        return Response(int(m.group(2)), (m.group(3) or b"").decode("latin-1"), m.group(1).decode(), headers)

    def read_response(self, head: bool = False) -> Response:
        """Reads one final response (skipping 1xx ones, which are recorded in `interim`)."""
        interim = []
        while True:
            resp = self.read_head()
            if resp.status >= 200 or resp.status == 101:
                break
            interim.append(resp.status)
        resp.interim = interim
        if head or resp.status in (204, 304):
            return resp
        te = resp.header("Transfer-Encoding")
        cl = resp.header("Content-Length")
        if te is not None:
            assert te.lower() == "chunked", f"unexpected Transfer-Encoding {te!r}"
            resp.chunked = True
            resp.body, resp.complete = self._read_chunked()
        elif cl is not None:
            n = int(cl)
            resp.body = self.read_exact(n)
            resp.complete = len(resp.body) == n
        else:
            resp.body = self.read_to_close()
        return resp

    def _read_chunked(self) -> tuple[bytes, bool]:
        body = b""
        try:
            while True:
                size_line = self.read_line()
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.read_line():  # trailers, then the empty line
                        pass
                    return body, True
                data = self.read_exact(size)
                body += data
                if len(data) < size or self.read_exact(2) != b"\r\n":
                    return body, False
        except IncompleteResponse:
            return body, False


def parse_responses(data: bytes, head_methods=()) -> list[Response]:
    """Parses every response in `data` (a whole connection's worth of bytes)."""

    class _Bytes(RawConn):
        def __init__(self, data):
            self.buf = data
            self.eof = True

    conn = _Bytes(data)
    out = []
    i = 0
    while conn.buf:
        out.append(conn.read_response(head=i in head_methods))
        i += 1
    return out


def exchange(host: str, port: int, raw: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Sends `raw` on a fresh connection, half-closes it and reads until the server closes.

    Returns the bytes received and whether the server closed the connection (False: timed out).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return data, False
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk


def slow_reader(server, rcvbuf=4096) -> RawConn:
    """A connection with a small receive buffer, so the server's socket fills at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(60)
    sock.connect((server.host, server.port))
    return RawConn(sock)


def read_hashed(conn: RawConn, n: int) -> tuple[int, str]:
    """The next `n` bytes of `conn` (fewer if it closes), hashed as they come."""
    digest, got = hashlib.sha256(conn.buf[:n]), len(conn.buf[:n])
    conn.buf = conn.buf[n:]
    chunk = bytearray(1 << 20)
    while got < n:
        k = conn.sock.recv_into(chunk, min(len(chunk), n - got))
        if not k:
            break
        digest.update(memoryview(chunk)[:k])
        got += k
    return got, digest.hexdigest()
