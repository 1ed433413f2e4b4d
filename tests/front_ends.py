"""Real front ends for the tests: nginx, Apache httpd and HAProxy, each run
from a generated configuration in a temporary directory, on free loopback
ports, never touching the system's own configuration or services, and
always stopped with their whole process group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from support import wait_until

NGINX_PARAMS = Path("/etc/nginx")  # Debian's nginx ships uwsgi_params, fastcgi_params, scgi_params here
APACHE_MODULES = Path("/usr/lib/apache2/modules")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class FrontEnd:
    """A front-end process started in its own session."""

    name = "front end"

    def __init__(self, workdir: Path, cmd: list[str], ports: list[int], error_log: Path):
        self.workdir, self.cmd, self.ports, self.error_log = workdir, cmd, ports, error_log
        self.out = open(workdir / "stdout.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_until(lambda: all(_listening(p) for p in ports) or self.proc.poll() is not None, 15):
            self.stop()
            raise AssertionError(f"{self.name} did not start: {self.logs()}")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.logs()}")

    def logs(self) -> str:
        text = []
        for p in (self.workdir / "stdout.log", self.error_log):
            if p.exists():
                text.append(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # Apache's children (and nginx's workers) leave with the group.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.out.close()


def nginx(workdir: Path, servers: str) -> FrontEnd:
    """nginx with the given `server { ... }` blocks (and upstreams)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / d).mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    conf = f"""
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    client_max_body_size 200m;
{servers}
}}
"""
    (workdir / "nginx.conf").write_text(conf)
    ports = [
        int(line.split()[1].rstrip(";"))
        for line in servers.splitlines()
        if line.strip().startswith("listen ")
    ]
    fe = FrontEnd(
        workdir,
        [command("nginx"), "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
        ports,
        workdir / "error.log",
    )
    fe.name = "nginx"
    return fe


def apache(workdir: Path, body: str, ports: list[int]) -> FrontEnd:
    """Apache httpd (event MPM) with the given virtual-host configuration."""
    workdir.mkdir(parents=True, exist_ok=True)
    modules = [
        "mpm_event",
        "authz_core",
        "env",
        "setenvif",
        "proxy",
        "proxy_uwsgi",
        "proxy_fcgi",
        "proxy_scgi",
        "proxy_http",
        "headers",
    ]
    loads = "\n".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so" for m in modules)
    user = "User www-data\nGroup www-data" if os.geteuid() == 0 else ""
    listens = "\n".join(f"Listen 127.0.0.1:{p}" for p in ports)
    conf = f"""
ServerRoot {workdir}
ServerName localhost
PidFile {workdir}/httpd.pid
ErrorLog {workdir}/error.log
LogLevel warn
DefaultRuntimeDir {workdir}
Mutex file:{workdir} default
{user}
{loads}
{listens}
LimitRequestBody 0
{body}
"""
    (workdir / "httpd.conf").write_text(conf)
    fe = FrontEnd(
        workdir,
        [command("apache2"), "-f", str(workdir / "httpd.conf"), "-DFOREGROUND"],
        ports,
        workdir / "error.log",
    )
    fe.name = "apache"
    return fe


def haproxy(workdir: Path, cfg: str, ports: list[int]) -> FrontEnd:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "haproxy.cfg").write_text(cfg)
    fe = FrontEnd(
        workdir,
        [command("haproxy"), "-f", str(workdir / "haproxy.cfg"), "-db"],
        ports,
        workdir / "stdout.log",
    )
    fe.name = "haproxy"
    return fe


def command(name: str) -> str:
    """The program's path: Debian puts the servers in /usr/sbin, which is not
    on an ordinary user's PATH."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def available(*commands: str) -> bool:
    return all(Path(command(c)).exists() for c in commands)
