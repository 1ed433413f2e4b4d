"""``corral stats ADDR`` and ``corral top ADDR``: read a running server's
``--stats`` listener, once (JSON for scripts) or as a live terminal view."""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import socket
import sys
import time


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _host_port(addr: str) -> tuple[str, int]:
    """HOST:PORT or http://HOST:PORT; ValueError for anything else."""
    hostport = addr.removeprefix("http://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r} is not HOST:PORT, http://HOST:PORT or unix:PATH")
    return host.strip("[]") or "127.0.0.1", int(port)


def fetch(addr: str, path: str = "/stats", timeout: float = 5.0) -> dict:
    """GETs `path` from a stats listener at HOST:PORT, http://HOST:PORT or unix:/path."""
    if addr.startswith("unix:"):
        conn: http.client.HTTPConnection = _UnixConnection(addr[5:], timeout)
    else:
        host, port = _host_port(addr)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise OSError(f"{addr}{path}: HTTP {resp.status}")
    data = json.loads(body)
    if not isinstance(data, dict) or "master" not in data or "workers" not in data:
        raise ValueError(f"{addr}{path} is not a corral --stats listener")
    return data


# What a peer that is not a corral --stats listener can make fetch() raise.
READ_ERRORS = (OSError, ValueError, http.client.HTTPException)


def stats_main(addr: str) -> int:
    try:
        data = fetch(addr)
    except READ_ERRORS as e:
        print(f"corral stats: cannot read {addr}: {e or type(e).__name__}", file=sys.stderr)
        return 1
    try:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (head, say) stopped early: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f}"


def render(data: dict, width: int, previous: dict | None = None, interval: float = 1.0) -> str:
    """The screen for one /stats reading (a pure function, for tests); `interval`
    is the time since the `previous` reading."""
    m = data["master"]
    rate = ""
    if previous is not None:
        rate = f"  {max(0, data['requests'] - previous['requests']) / interval:.0f} req/s"
    header = (
        f"corral master {m['pid']}  {m['phase']}  {'ready' if m['ready'] else 'NOT READY'}  "
        f"workers {len(data['workers'])}/{m['target_workers']} x {m['threads']} threads  "
        f"up {m['uptime_s']:.0f}s  requests {data['requests']}{rate}  timeouts {data['timeouts']}"
    )
    lines = [
        header,
        "",
        f"{'WORKER':>6} {'PID':>8} {'STATE':<9} {'REQS':>9} {'BUSY':>5} {'RSS MiB':>8} {'AGE s':>7} {'RESP':>4}  CURRENT",
    ]
    for w in data["workers"]:
        current = (
            ", ".join(
                f"{c['method']} {c['path']} ({'sending file, ' if c.get('offloaded') else ''}{c['age_ms'] / 1000:.1f}s)"
                for c in w["current"]
            )
            or "-"
        )
        lines.append(
            f"{w['worker']:>6} {w['pid']:>8} {w['state']:<9} {w['requests']:>9} {w['busy_threads']:>5} "
            f"{_mib(w['rss']):>8} {w['age_s']:>7.0f} {w['respawns']:>4}  {current}"
        )
        if w.get("last_exception"):
            lines.append(f"{'':>6} last exception: {w['last_exception']}")
    return "\n".join(line[:width] for line in lines)


def top_main(addr: str, interval: float = 1.0) -> int:
    """Redraws the view every `interval` seconds until q or Ctrl-C."""
    if not addr.startswith("unix:"):
        try:
            _host_port(addr)
        except ValueError as e:
            # A typo never gets better by redrawing: say so once.
            print(f"corral top: {e}", file=sys.stderr)
            return 2
    interactive = sys.stdin.isatty()
    old = None
    if interactive:
        import termios
        import tty

        old = termios.tcgetattr(sys.stdin)
        tty.setcbreak(sys.stdin.fileno())
    previous, previous_at = None, 0.0
    try:
        sys.stdout.write("\x1b[?25l")  # hide the cursor while redrawing
        while True:
            width = shutil.get_terminal_size((120, 40)).columns
            try:
                data = fetch(addr)
                now = time.monotonic()
                # The rate over the time that really passed between readings.
                screen = render(data, width, previous, max(now - previous_at, 1e-3))
                previous, previous_at = data, now
            except READ_ERRORS as e:
                screen = f"corral top: cannot read {addr}: {e or type(e).__name__}"
            sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n\n(q to quit)")
            sys.stdout.flush()
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                if not interactive:
                    time.sleep(left)
                elif select.select([sys.stdin], [], [], left)[0] and os.read(sys.stdin.fileno(), 1) in (
                    b"q",
                    b"Q",
                ):
                    return 0
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader (head, say) stopped early: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        try:
            sys.stdout.write("\x1b[?25h\n")
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if old is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)
