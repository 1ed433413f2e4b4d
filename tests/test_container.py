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
import sys
import threading
import time
from pathlib import Path

import netns
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
        assert re.search(rf"^\s+(-\w, )?{opt}\b", help_text, re.MULTILINE), opt


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


def _status_field(pid: int, name: str) -> list[str] | None:
    """The values of one line of /proc/PID/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith(f"{name}:")).split()[1:]
    except (OSError, StopIteration):
        return None


def _ns_pid(pid: int) -> int | None:
    """The pid of a host process as seen in its own (innermost) PID namespace."""
    values = _status_field(pid, "NSpid")
    return int(values[-1]) if values else None


def _get(port: int, path: str) -> tuple[int, bytes] | None:
    return _get_at("127.0.0.1", port, path)


def _get_at(addr: str, port: int, path: str) -> tuple[int, bytes] | None:
    conn = http.client.HTTPConnection(addr, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError:
        return None
    finally:
        conn.close()


def _refused(port: int) -> bool:
    # A SYN that meets a stopping server's closed accept queue is dropped and
    # sent again by the kernel a second later, by when the port is closed.
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
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
            target=lambda: slow.update(r=_get(http_port, f"/?delay={delay + 3}&tag=inflight")), daemon=True
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
        assert wait_until(lambda: _refused(http_port), 5)
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


# -- the image -----------------------------------------------------------------

DOCKERFILE = ROOT / "docs" / "deploy" / "Dockerfile"
BASE_IMAGE = "localhost/corral-test-base:bookworm"
# Container runtime settings this machine needs and a cluster node does not:
# crun refuses the hybrid cgroup layout here (runc takes it), and a container
# may not raise its limits above the ones the tests run with.
RUNTIME = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def test_page_shows_the_dockerfile():
    assert _block("dockerfile") == DOCKERFILE.read_text()


def _image_tools_missing() -> str | None:
    if os.geteuid() != 0:
        return "building and running an image here needs root"
    for tool in ("podman", "runc", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    return netns.available()


def _run(*cmd: str, timeout: float = 600) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _logs(name: str) -> str:
    """The container's output (podman gives its stderr, corral's log, on stderr)."""
    done = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=30, check=False)
    return done.stdout + done.stderr


def _base_image(work) -> str:
    """A Debian image with Python 3 in a virtualenv on PATH, standing in for
    the python:*-slim image (no registry is reachable here), made with
    debootstrap from Debian's own packages. Kept between runs."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        return BASE_IMAGE
    rootfs = work / "rootfs"
    _run(
        "debootstrap",
        "--variant=minbase",
        "--include=python3,python3-venv",
        "bookworm",
        str(rootfs),
        "http://deb.debian.org/debian",
    )
    _run("chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    path = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    done = subprocess.run(
        ["podman", "import", "--change", f"ENV PATH={path}", "-", BASE_IMAGE],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    tar.stdout.close()
    assert tar.wait() == 0 and done.returncode == 0, done.stderr
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE_IMAGE


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The page's Dockerfile built as a user would: a project directory with
    requirements.txt, the project's code (the host app as myproject/wsgi.py)
    and corral's wheel, built from this checkout, in wheels/."""
    why = _image_tools_missing()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("image")
    base = _base_image(work)
    ctx = work / "project"
    (ctx / "myproject").mkdir(parents=True)
    (ctx / "wheels").mkdir()
    maturin = Path(sys.executable).parent / "maturin"
    _run(
        str(maturin),
        "build",
        "--release",
        "-q",
        "-i",
        sys.executable,
        "-o",
        str(ctx / "wheels"),
        timeout=1200,
    )
    shutil.copy(DOCKERFILE, ctx / "Dockerfile")
    (ctx / "requirements.txt").write_text("")
    (ctx / "VERSION").write_text("image\n")
    (ctx / "myproject" / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "apps" / "host_app.py", ctx / "myproject" / "wsgi.py")
    tag = f"localhost/corral-test-app:{os.getpid()}"
    # chroot isolation: the RUN step needs no container runtime.
    _run(
        "podman", "build", "--isolation", "chroot", "--network", "host",
        "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag, str(ctx),
    )  # fmt: skip
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, check=False)


def _uid(pid: int) -> int | None:
    """The real user id of a process."""
    values = _status_field(pid, "Uid")
    return int(values[0]) if values else None


# The first run makes the base image with debootstrap: a few minutes.
@pytest.mark.timeout(900)
def test_image_runs_and_stops_as_a_pod_would(image):
    cmd, m = image_cmd(), manifest()
    http_port, stats_port = m["ports"]["http"], m["ports"]["stats"]
    workers = int(option(cmd, "--workers"))
    delay = int(option(cmd, "--shutdown-delay"))
    hosts = netns.Hosts(1)
    addr = hosts.addrs[0]
    name = f"corral-test-{os.getpid()}"
    try:
        # The pod's network: a namespace of its own, reached at its address.
        _run(
            "podman", *RUNTIME, "run", "-d", *LIMITS, "--name", name,
            "--network", f"ns:/run/netns/{hosts.names[0]}", image,
        )  # fmt: skip
        assert wait_until(
            lambda: (_get_at(addr, stats_port, m["readiness"]["path"]) or (0,))[0] == 200, 30
        ), _logs(name)
        assert _get_at(addr, stats_port, m["liveness"]["path"])[0] == 200
        assert _get_at(addr, http_port, "/") == (200, b"? image")

        # corral is the container's PID 1, its workers are its children, and
        # all of them run as the image's user.
        master = int(_run("podman", "inspect", "--format", "{{.State.Pid}}", name))
        assert _ns_pid(master) == 1
        assert "corral" in Path(f"/proc/{master}/cmdline").read_text()
        kids = _children(master)
        assert len(kids) == workers, kids
        assert {_uid(p) for p in [master, *kids]} == {65534}

        # An orphan the app leaves behind is reaped by PID 1.
        status, body = _get_at(addr, http_port, "/orphan?secs=0.5")
        assert status == 200
        orphan = next(p for p in _children(master) if _ns_pid(p) == int(body))
        assert wait_until(lambda: _stat(orphan) is None, 5), f"orphan {orphan} left as {_stat(orphan)}"

        # `podman stop` sends SIGTERM to PID 1 and SIGKILL after the grace
        # period, as the kubelet does.
        slow = {}
        t = threading.Thread(
            target=lambda: slow.update(r=_get_at(addr, http_port, f"/?delay={delay + 1.5}&tag=inflight")),
            daemon=True,
        )
        t.start()
        assert wait_until(lambda: "request inflight started" in _logs(name), 10)
        t_term = time.monotonic()
        stop = subprocess.Popen(
            ["podman", "stop", "-t", str(m["grace"]), name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert wait_until(lambda: (_get_at(addr, stats_port, "/readyz") or (0,))[0] == 503, 3)
        assert _get_at(addr, stats_port, "/healthz")[0] == 200
        assert _get_at(addr, http_port, "/") == (200, b"? image")
        t.join(30)
        assert slow.get("r") == (200, b"? image"), slow
        assert stop.wait(m["grace"] + 10) == 0, stop.stderr.read()
        assert time.monotonic() - t_term < m["grace"]
        state = _run("podman", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).split()
        assert state == ["exited", "0"], _logs(name)
        log = _logs(name)
        assert (
            "Shutdown complete" in log and len(re.findall(r"Worker \d+ \(pid \d+\) exited", log)) == workers
        )
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, check=False)
        hosts.destroy()
