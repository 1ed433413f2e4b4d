"""Python app servers behind nginx, one backend worker each: requests/sec and
the backend's CPU microseconds per request.

nginx (one worker) and wrk share CPU 0; the backend has CPU 1 to itself, so
its CPU time per request is its own cost, and "backend CPU %" below 100 with
nginx's CPU 0 saturated means nginx, not the backend, set the pace.

    python3 bench/frontends.py                      # every backend, default cases
    python3 bench/frontends.py --cases hello -d 4 --backends corral-uwsgi,uwsgi
    python3 bench/frontends.py --cases hello --floor   # and the Python-free floors

--floor adds, on the hello case only, two kinds of backend with no Python in
them (crates/corral-engine/examples/floor.rs, built here with cargo):
`floor-raw-uwsgi`, a uwsgi backend reduced to a blocking accept, one read, one
write and a close per request, about the least any uwsgi backend can cost on
this kernel; and `engine-*`, corral's engine with a Rust app answering the same
body, so that corral minus engine is what Python and PEP 3333 cost.

The apps come from the shared benchmark harness (--bench-dir, default
../shared/bench); uWSGI and gunicorn from its anchor virtualenv (--anchor-venv,
default the harness's own /tmp/bench-work/venv).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")

PARAMS = {
    "uwsgi": ("uwsgi_params", "uwsgi_pass"),
    "fastcgi": ("fastcgi_params", "fastcgi_pass"),
    "scgi": ("scgi_params", "scgi_pass"),
}


FLOOR_CASE = "hello"


def backends(corral: str, venv: Path, floor: str) -> dict[str, tuple[str, str]]:
    """name -> (nginx protocol, command template with {sock} and {app})."""
    return {
        "floor-raw-uwsgi": ("uwsgi", f"{floor} raw unix:{{sock}}"),
        "engine-uwsgi": ("uwsgi", f"{floor} engine uwsgi unix:{{sock}}"),
        "engine-fastcgi": ("fastcgi-keep", f"{floor} engine fastcgi unix:{{sock}}"),
        "engine-scgi": ("scgi", f"{floor} engine scgi unix:{{sock}}"),
        "corral-uwsgi": ("uwsgi", f"{corral} --uwsgi unix:{{sock}} --log-level warning {{app}}"),
        "corral-fastcgi": ("fastcgi-keep", f"{corral} --fastcgi unix:{{sock}} --log-level warning {{app}}"),
        "corral-scgi": ("scgi", f"{corral} --scgi unix:{{sock}} --log-level warning {{app}}"),
        "uwsgi": (
            "uwsgi",
            (
                f"{venv}/bin/uwsgi --socket {{sock}} --master --processes 1 --disable-logging --die-on-term "
                "--need-app --module {app}"
            ),
        ),
        "gunicorn": (
            "uwsgi",
            f"{venv}/bin/gunicorn --workers 1 --protocol uwsgi --uwsgi-allow-from '*' --bind unix:{{sock}} {{app}}",
        ),
    }


def nginx_conf(workdir: Path, port: int, protocol: str, sock: str) -> str:
    keep = protocol == "fastcgi-keep"
    wire = "fastcgi" if keep else protocol
    params, directive = PARAMS[wire]
    # A pool as large as the load's concurrency (wrk -c64), so every request
    # reuses a connection, which is what keep_conn is for: with a smaller
    # pool nginx closes the connections past it after each request.
    upstream = f"upstream backend {{ server unix:{sock}; keepalive 64; }}" if keep else ""
    target = "backend" if keep else f"unix:{sock}"
    extra = "fastcgi_keep_conn on;" if keep else ""
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    {wire}_temp_path {workdir}/tmp;
    {upstream}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include /etc/nginx/{params};
            {extra}
            {directive} {target};
        }}
    }}
}}
"""


def tree_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its live descendants."""
    user = system = 0.0
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.append(int(entry))
            except OSError:
                continue
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / TICK
            system += int(fields[12]) / TICK
        except OSError:
            pass
    return user, system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def expected_body(bench_dir: Path, python: str, app: str) -> bytes:
    """The app's body, computed in-process (as the shared harness checks it) by
    `python`, which has the frameworks."""
    code = (
        "import sys, io; sys.path.insert(0, sys.argv[1]); import apps;"
        "env={'REQUEST_METHOD':'GET','PATH_INFO':'/','SCRIPT_NAME':'','QUERY_STRING':'','SERVER_NAME':'x',"
        "'SERVER_PORT':'80','SERVER_PROTOCOL':'HTTP/1.1','HTTP_HOST':'x','wsgi.url_scheme':'http',"
        "'wsgi.input':io.BytesIO(),'wsgi.errors':sys.stderr,'wsgi.version':(1,0),'wsgi.multithread':False,"
        "'wsgi.multiprocess':False,'wsgi.run_once':True};"
        f"b=b''.join(getattr(apps, {app!r})(env, lambda *a: None)); sys.stdout.buffer.write(b)"
    )
    return subprocess.run(
        [python, "-c", code, str(bench_dir)], capture_output=True, check=True, env={**os.environ}
    ).stdout


def run_one(name, protocol, template, app, args, workdir):
    sock = str(workdir / f"{name}.sock")
    port = free_port()
    (workdir / "tmp").mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, port, protocol, sock))
    env = {**os.environ, "PYTHONPATH": str(args.bench_dir)}
    backend = subprocess.Popen(
        ["taskset", "-c", "1", "bash", "-c", "exec " + template.format(sock=sock, app=f"apps:{app}")],
        cwd=args.bench_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / f"{name}.log", "ab"),  # noqa: SIM115
        start_new_session=True,
    )
    nginx = subprocess.Popen(
        ["taskset", "-c", "0", "nginx", "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/"
        body = wait_http(url)
        if body != args.expected[app]:
            raise RuntimeError(f"{name} {app}: wrong body {body[:80]!r}")
        subprocess.run(
            ["taskset", "-c", "0", "wrk", "-t1", "-c64", "-d2s", url], capture_output=True, check=True
        )
        b0, n0 = tree_cpu(backend.pid), tree_cpu(nginx.pid)
        out = subprocess.run(
            ["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{args.duration}s", "--latency", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        b1, n1 = tree_cpu(backend.pid), tree_cpu(nginx.pid)
        backend_s, nginx_s = sum(b1) - sum(b0), sum(n1) - sum(n0)
        if wait_http(url) != args.expected[app]:
            raise RuntimeError(f"{name} {app}: wrong body after the load")
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        total = int(re.search(r"(\d+) requests in", out).group(1))
        errors = re.search(r"Socket errors: (.*)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {
            "rps": rps,
            "us": backend_s / total * 1e6,
            "backend_cpu": backend_s / args.duration * 100,
            "nginx_cpu": nginx_s / args.duration * 100,
            "errors": (errors.group(1) if errors else "0")
            + (f", non2xx {non2xx.group(1)}" if non2xx else ""),
        }
    finally:
        for p in (nginx, backend):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", type=Path, default=ROOT.parent / "shared" / "bench")
    ap.add_argument("--anchor-venv", type=Path, default=Path("/tmp/bench-work/venv"))
    ap.add_argument("--corral", default=str(ROOT / ".venv" / "bin" / "corral"))
    ap.add_argument("--cases", default="hello,json_app,big,flask_app,django_app")
    ap.add_argument("--backends", default="corral-uwsgi,corral-fastcgi,corral-scgi,uwsgi,gunicorn")
    ap.add_argument("-d", "--duration", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--floor", action="store_true", help="add the Python-free backends (hello case only)")
    args = ap.parse_args()
    args.bench_dir = args.bench_dir.resolve()
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        sys.exit("nginx is not installed")
    floor = ROOT / "target" / "release" / "examples" / "floor"
    table = backends(args.corral, args.anchor_venv, str(floor))
    names = args.backends.split(",")
    if args.floor:
        names += [
            n for n in ("floor-raw-uwsgi", "engine-uwsgi", "engine-fastcgi", "engine-scgi") if n not in names
        ]
    if any(table[n][1].startswith(str(floor)) for n in names):
        subprocess.run(
            ["cargo", "build", "--quiet", "--release", "-p", "corral-engine", "--example", "floor"],
            cwd=ROOT,
            check=True,
        )
    cases = args.cases.split(",")
    venv_python = args.anchor_venv / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    args.expected = {c: expected_body(args.bench_dir, python, c) for c in cases}
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="corral-frontbench-") as tmp:
        for r in range(args.rounds):
            order = names if r % 2 == 0 else list(reversed(names))
            for case in cases:
                for name in order:
                    protocol, template = table[name]
                    if template.startswith(str(floor)) and case != FLOOR_CASE:
                        continue
                    res = run_one(name, protocol, template, case, args, Path(tmp))
                    results.setdefault((case, name), []).append(res)
                    print(
                        f"[r{r + 1}] {case:10} {name:15} {res['rps']:9.0f} rps  backend {res['us']:6.1f} us/req "
                        f"cpu {res['backend_cpu']:3.0f}%  nginx cpu {res['nginx_cpu']:3.0f}%  err {res['errors']}",
                        flush=True,
                    )

    def med(case, name, key):
        return statistics.median(x[key] for x in results[(case, name)])

    def cell(case, name, key, fmt):
        return fmt.format(med(case, name, key)) if (case, name) in results else "-"

    lines = ["| backend | " + " | ".join(cases) + " |", "|---|" + "---:|" * len(cases)]
    lines.insert(0, "Requests/sec (median):\n")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(c, name, "rps", "{:.0f}") for c in cases) + " |")
    lines.append("\nBackend CPU microseconds per request (median; lower is better):\n")
    lines.append("| backend | " + " | ".join(cases) + " |")
    lines.append("|---|" + "---:|" * len(cases))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell(c, name, "us", "{:.1f}") for c in cases) + " |")
    lines.append("\nBackend CPU % / nginx CPU % during the load (100 = its core saturated):\n")
    lines.append("| backend | " + " | ".join(cases) + " |")
    lines.append("|---|" + "---:|" * len(cases))
    for name in names:
        cells = [
            f"{med(c, name, 'backend_cpu'):.0f} / {med(c, name, 'nginx_cpu'):.0f}"
            if (c, name) in results
            else "-"
            for c in cases
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
