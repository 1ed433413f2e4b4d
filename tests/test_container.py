"""The Kubernetes recipe (docs/deploy/kubernetes.md), checked without a cluster.

The page's Dockerfile `CMD` is run, with loopback addresses and a test app, as
PID 1 of a new PID namespace (`unshare --fork --pid --mount-proc`), which is
what a container runtime does; SIGTERM comes from outside the namespace, as
the kubelet's does. The Deployment's probes and grace period are read from
the page's YAML and checked against the command and the running server.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from support import CORRAL, READY_RE, ROOT, Server, group_members, wait_until

DOC = ROOT / "docs" / "deploy" / "kubernetes.md"


# -- reading the page ----------------------------------------------------------


def _block(lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, f"expected one {lang} block in {DOC.name}"
    return blocks[0]


def image_cmd() -> list[str]:
    """The Dockerfile's CMD, in exec (JSON) form."""
    lines = [line for line in _block("dockerfile").splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, lines
    return json.loads(lines[0][4:])


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _section(yaml: str, key: str) -> dict[str, str]:
    """The `name: value` lines nested under `key:` (a minimal reader for the page's YAML)."""
    lines = yaml.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"{key}:")
    indent = len(lines[start]) - len(lines[start].lstrip())
    out = {}
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        name, _, value = line.strip().lstrip("- ").partition(":")
        if value.strip():
            out[name] = value.strip()
    return out


def manifest() -> dict:
    yaml = _block("yaml")
    ports = {name: int(port) for name, port in re.findall(r"- name: (\S+)\s+containerPort: (\d+)", yaml)}
    return {
        "ports": ports,
        "readiness": _section(yaml, "readinessProbe"),
        "liveness": _section(yaml, "livenessProbe"),
        "grace": int(re.search(r"terminationGracePeriodSeconds: (\d+)", yaml).group(1)),
    }


def test_recipe_is_consistent():
    cmd, m = image_cmd(), manifest()
    assert cmd[0] == "corral"
    # The named ports are the command's listeners; both probes use the stats port.
    assert m["ports"]["http"] == int(option(cmd, "--http").rsplit(":", 1)[1]), (m, cmd)
    assert m["ports"]["stats"] == int(option(cmd, "--stats").rsplit(":", 1)[1]), (m, cmd)
    assert m["readiness"]["port"] == "stats" and m["liveness"]["port"] == "stats", m
    assert (m["readiness"]["path"], m["liveness"]["path"]) == ("/readyz", "/healthz"), m
    # The kubelet's SIGKILL comes after the delay and the drain.
    delay, graceful = int(option(cmd, "--shutdown-delay")), int(option(cmd, "--graceful-timeout"))
    assert m["grace"] > delay + graceful, m
    # Every option of the command is one corral has.
    help_text = subprocess.run([*CORRAL, "--help"], capture_output=True, text=True, check=True).stdout
    for opt in (a for a in cmd if a.startswith("--")):
        assert re.search(rf"^\s+{opt}\b", help_text, re.MULTILINE), opt


# -- running it as PID 1 -------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and (_stat(int(e)) or ("", 0))[1] == pid]


def _ns_pid(pid: int) -> int | None:
    """The pid of a host process as seen in its own (innermost) PID namespace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("NSpid:")).split()[-1])
    except (OSError, StopIteration):
        return None


def _get(port: int, path: str) -> tuple[int, bytes] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return None
    finally:
        conn.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_image_cmd_as_pid_1(tmp_path):
    cmd, m = image_cmd(), manifest()
    http_port, stats_port = _free_port(), _free_port()
    args = [
        {
            option(cmd, "--http"): f"127.0.0.1:{http_port}",
            option(cmd, "--stats"): f"127.0.0.1:{stats_port}",
        }.get(a, a)
        for a in cmd[1:-1]  # without "corral" and the app
    ]
    workers = int(option(cmd, "--workers"))
    delay = int(option(cmd, "--shutdown-delay"))
    server = Server(
        "host_app:application",
        *args,
        "--env",
        "HOST_NAME=pod",
        http=None,
        command=["unshare", "--fork", "--pid", "--mount-proc", *CORRAL],
    )
    server.expected_workers = workers
    try:
        server.wait_started()
        # unshare forks the namespace's PID 1, which is corral's master.
        assert server.grep(r"Starting corral .* pid 1$"), server.log
        master = wait_until(lambda: (_children(server.proc.pid) or [None])[0], 5)
        assert master and _ns_pid(master) == 1
        assert wait_until(lambda: len(_children(master)) == workers, 5), _children(master)

        # The probes answer on the stats port.
        assert _get(stats_port, m["readiness"]["path"])[0] == 200
        assert _get(stats_port, m["liveness"]["path"])[0] == 200

        # An orphan the app leaves behind is adopted by PID 1 and reaped when it exits.
        status, body = _get(http_port, "/orphan?secs=0.5")
        assert status == 200
        orphan = next(p for p in _children(master) if _ns_pid(p) == int(body))
        assert wait_until(lambda: _stat(orphan) is None, 5), f"orphan {orphan} left as {_stat(orphan)}"

        # A request in flight when the SIGTERM comes, and lasting past the delay.
        slow = {}
        t = threading.Thread(
            target=lambda: slow.update(r=_get(http_port, f"/?delay={delay + 1.5}&tag=inflight")), daemon=True
        )
        t.start()
        server.wait_for(r"request inflight started")
        mark = server.mark()
        t_term = time.monotonic()
        os.kill(master, signal.SIGTERM)  # from outside the namespace, as the kubelet does

        # During the delay: not ready, still alive, still serving.
        assert wait_until(lambda: _get(stats_port, "/readyz")[0] == 503, 2)
        assert _get(stats_port, "/healthz")[0] == 200
        assert _get(http_port, "/") == (200, b"pod 0")

        # Then the listener closes while the slow request is still running.
        server.wait_for(r"Shutdown delay over", since=mark, timeout=delay + 5)
        assert wait_until(lambda: _refused(http_port), 2)
        assert "r" not in slow
        assert _get(stats_port, "/healthz")[0] == 200

        t.join(30)
        assert slow.get("r") == (200, b"pod 0"), slow
        code = server.wait_exit(m["grace"])
        assert code == 0, server.log
        assert time.monotonic() - t_term < m["grace"]
        # Every worker was reaped before the master finished.
        lines = server.lines[mark:]
        done = next(i for i, line in enumerate(lines) if "Shutdown complete" in line)
        assert len([line for line in lines[:done] if re.search(r"Worker \d+ \(pid \d+\) exited", line)]) == (
            workers
        ), server.log
        assert len(server.grep(READY_RE.pattern)) == workers  # none was replaced on the way
        assert not group_members(server.pgid)
    finally:
        server.cleanup()
