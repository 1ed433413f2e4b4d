"""Several corral hosts behind one load balancer, with network namespaces as
hosts (tests/netns.py): three hosts, one corral each (HTTP, uwsgi and stats
listeners on the host's own address), nginx in front of them over HTTP
(keepalive) and over uwsgi, or HAProxy health-checking `/readyz`.

A load generator sends GETs through every front end for the whole test and
records every response (which host and code version answered it, when the
request started and ended) and every failure. Besides back-to-back short
requests, "slow" requests (`?delay=&tag=`) are logged by the host that takes
them, so a test knows which requests are in flight on a host when it stops
it. The claims made in docs/deploy/multi-host.md are checked from those
records:

- every host serves a share of the requests;
- a host drained with SIGTERM finishes its in-flight requests itself, no
  request fails, it gets none after it exited, and once started again it
  gets requests again;
- a host whose corral is SIGKILLed (master and workers) fails no GET: nginx
  retries the requests that were in flight on it on the other hosts, which
  keep serving;
- a deploy rolled host by host (new VERSION file, then SIGHUP; the last host
  stopped and started) fails no request, and while it is under way each host
  answers with the version of its stage;
- HAProxy's `option httpchk GET /readyz` with `--shutdown-delay` takes a
  host out of rotation (on a 503 from /readyz) before its listeners close,
  with no request failing and no retry configured.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

import front_ends
import netns
import pytest
from support import APPS, CORRAL, Server, group_members, wait_until

_why_not = netns.available()
if _why_not is not None:
    pytest.skip(_why_not, allow_module_level=True)

HTTP_PORT, UWSGI_PORT, STATS_PORT = 8000, 3031, 9100


# -- load generator ----------------------------------------------------------


@dataclass
class Record:
    front: str  # which front-end listener the request went to
    tag: str  # "" for the short requests
    start: float  # time.monotonic() before connecting
    end: float
    host: str = ""
    version: str = ""
    error: str = ""


class Load:
    """Client threads sending GETs to the front ends back to back, one connection per request.

    Per front end: `fast` threads sending `/?delay=0.005`, and `slow` threads
    sending `/?delay=SLOW&tag=<front>-<n>`.
    """

    SLOW = 1.0

    def __init__(self, fronts: dict[str, int], fast: int = 3, slow: int = 3):
        self.fronts = fronts
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._tags = iter(range(10**9))
        self._pending: dict[str, float] = {}  # slow requests sent and not answered yet
        self.threads = []
        for front, port in fronts.items():
            for _ in range(fast):
                self.threads.append(
                    threading.Thread(target=self._run, args=(front, port, False), daemon=True)
                )
            for _ in range(slow):
                self.threads.append(threading.Thread(target=self._run, args=(front, port, True), daemon=True))
        for t in self.threads:
            t.start()

    def _run(self, front, port, slow):
        while not self.stopping.is_set():
            if slow:
                with self.lock:
                    tag = f"{front}-{next(self._tags)}"
                target = f"/?delay={self.SLOW}&tag={tag}"
            else:
                tag, target = "", "/?delay=0.005"
            rec = Record(front, tag, time.monotonic(), 0.0)
            if tag:
                with self.lock:
                    self._pending[tag] = rec.start
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("GET", target)
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace")
                if resp.status == 200 and len(body.split()) == 2:
                    rec.host, rec.version = body.split()
                else:
                    rec.error = f"status {resp.status}: {body[:100]!r}"
            except OSError as e:
                rec.error = repr(e)
            finally:
                conn.close()
            rec.end = time.monotonic()
            with self.lock:
                self.records.append(rec)
                self._pending.pop(tag, None)

    def pending_since(self) -> dict[str, float]:
        """Slow requests not answered yet, with when each was sent."""
        with self.lock:
            return dict(self._pending)

    def snapshot(self, after: float = 0.0) -> list[Record]:
        """Every record of a request that started after `after` (a time.monotonic())."""
        with self.lock:
            return [r for r in self.records if r.start > after]

    def failures(self) -> list[Record]:
        return [r for r in self.snapshot() if r.error]

    def served(self, after: float = 0.0) -> Counter:
        """(front, host) -> responses to requests started after `after`."""
        return Counter((r.front, r.host) for r in self.snapshot(after) if not r.error)

    def wait_served(self, hosts, after: float = 0.0, each: int = 5, timeout: float = 20.0) -> Counter:
        """Waits until every host in `hosts` answered `each` requests started after `after` on every front."""

        def enough():
            served = self.served(after)
            return all(served[(f, h)] >= each for f in self.fronts for h in hosts)

        assert wait_until(enough, timeout), f"not every host of {hosts} served: {self.summary(after)}"
        return self.served(after)

    def wait_answered(self, tags: set[str], timeout: float = 15.0) -> dict[str, Record]:
        """Waits until the slow requests `tags` have completed; returns their records."""

        def done():
            recs = {r.tag: r for r in self.snapshot() if r.tag in tags}
            return recs if len(recs) == len(tags) else None

        recs = wait_until(done, timeout)
        assert recs is not None, f"slow requests {tags} never completed: {self.summary()}"
        return recs

    def summary(self, after: float = 0.0) -> str:
        recs = self.snapshot(after)
        by = Counter((r.front, r.host, r.version) for r in recs if not r.error)
        return f"{len(recs)} requests, {sum(1 for r in recs if r.error)} failed; answered by {dict(by)}"

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)


def assert_no_failure(load: Load, *logs: str) -> None:
    failed = load.failures()
    assert not failed, (
        f"{len(failed)} of {len(load.snapshot())} requests failed; first: {failed[:5]}\n"
        f"{load.summary()}\n" + "\n".join(logs)
    )


# -- hosts -------------------------------------------------------------------


class Cluster:
    """Three network-namespace hosts with one corral each, serving apps/host_app.py."""

    def __init__(self, tmp, count: int = 3, extra=()):
        self.extra = list(extra)
        self.hosts = netns.Hosts(count)
        self.servers: list[Server | None] = [None] * count
        self.all_servers: list[Server] = []
        self.front = None
        self.load = None
        self.dirs = []
        try:
            for i in range(count):
                d = tmp / f"host{i}"
                d.mkdir()
                (d / "VERSION").write_text("v1")
                self.dirs.append(d)
            for i in range(count):
                self.start(i)
        except BaseException:
            self.destroy()
            raise

    def addr(self, i: int) -> str:
        return self.hosts.addrs[i]

    def start(self, i: int) -> Server:
        addr = self.addr(i)
        server = Server(
            "host_app:application",
            "--uwsgi",
            f"{addr}:{UWSGI_PORT}",
            "--stats",
            f"{addr}:{STATS_PORT}",
            "--env",
            f"HOST_NAME=h{i}",
            "--chdir",
            str(self.dirs[i]),
            *self.extra,
            http=f"{addr}:{HTTP_PORT}",
            workers=2,
            threads=4,
            pythonpath=APPS,
            # `ip netns exec` execs corral: the master keeps the pid, and its
            # own session (start_new_session) holds every worker.
            command=[*self.hosts.exec_prefix(i), *CORRAL],
        )
        self.all_servers.append(server)
        self.servers[i] = server
        server.wait_started()
        assert wait_until(lambda: self.readyz(i) == 200, 10), server.log
        return server

    def readyz(self, i: int) -> int | None:
        conn = http.client.HTTPConnection(self.addr(i), STATS_PORT, timeout=2)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status
        except OSError:
            return None
        finally:
            conn.close()

    def sigterm(self, i: int) -> None:
        self.servers[i].signal(signal.SIGTERM)

    def wait_stopped(self, i: int, timeout: float = 30) -> float:
        server = self.servers[i]
        code = server.wait_exit(timeout)
        t = time.monotonic()
        assert code == 0, f"h{i} exited with {code}\n{server.log}"
        server.cleanup()
        return t

    def kill(self, i: int) -> float:
        """SIGKILL to every process of host i's corral (master and workers) at once."""
        server = self.servers[i]
        members = group_members(server.pgid)
        assert len(members) >= 3, members  # the master and two workers
        t = time.monotonic()
        os.killpg(server.pgid, signal.SIGKILL)
        assert wait_until(lambda: not group_members(server.pgid), 10), group_members(server.pgid)
        server.cleanup()
        return t

    def logs(self) -> str:
        out = []
        for s in self.all_servers:
            out.append(f"--- corral in {s.cmd[3]} ---\n" + "\n".join(s.lines[-40:]))
        if self.front is not None:
            out.append(self.front.logs())
        return "\n".join(out)

    def destroy(self) -> None:
        """Stops the load, the front end, every corral and the hosts, whatever state they are in."""
        if self.load is not None:
            self.load.stop()
        if self.front is not None:
            self.front.stop()
        # QUIT (stop at once) to every master first, so that teardown does
        # not wait out a --shutdown-delay per host; cleanup() then makes sure
        # no process of any of them is left.
        for s in self.all_servers:
            if s.running():
                s.signal(signal.SIGQUIT)
        for s in self.all_servers:
            s.cleanup()
        self.hosts.destroy()


def check_clean(cluster: Cluster) -> None:
    """Nothing this test started is left: namespaces, links, corral and front-end processes."""
    assert not cluster.hosts.leftovers(), cluster.hosts.leftovers()
    for s in cluster.all_servers:
        assert not group_members(s.pgid), (s.cmd, group_members(s.pgid))
    if cluster.front is not None:
        assert not group_members(cluster.front.proc.pid), cluster.front.cmd


def start_nginx(cluster: Cluster, workdir) -> dict[str, int]:
    """nginx in this namespace: one server block proxying HTTP, one passing uwsgi, to every host."""
    http_port, uwsgi_port = front_ends.free_port(), front_ends.free_port()
    http_servers = "\n".join(
        f"        server {a}:{HTTP_PORT} max_fails=1 fail_timeout=2s;" for a in cluster.hosts.addrs
    )
    uwsgi_servers = "\n".join(
        f"        server {a}:{UWSGI_PORT} max_fails=1 fail_timeout=2s;" for a in cluster.hosts.addrs
    )
    config = f"""
    upstream corral_http {{
{http_servers}
        keepalive 16;
    }}
    upstream corral_uwsgi {{
{uwsgi_servers}
    }}
    server {{
        listen {http_port};
        location / {{
            proxy_pass http://corral_http;
            proxy_set_header Host $http_host;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout 1s;
        }}
    }}
    server {{
        listen {uwsgi_port};
        location / {{
            include {front_ends.NGINX_PARAMS}/uwsgi_params;
            uwsgi_param HTTP_HOST $http_host;
            uwsgi_pass corral_uwsgi;
            uwsgi_next_upstream error timeout http_503;
            uwsgi_connect_timeout 1s;
        }}
    }}"""
    cluster.front = front_ends.nginx(workdir, config)
    return {"http": http_port, "uwsgi": uwsgi_port}


@pytest.fixture
def cluster(tmp_path):
    """Three hosts behind nginx, with the load running."""
    c = Cluster(tmp_path)
    try:
        fronts = start_nginx(c, tmp_path / "nginx")
        c.load = Load(fronts)
        c.load.wait_served(["h0", "h1", "h2"])
        yield c
    finally:
        c.destroy()
    check_clean(c)


def started_on(server: Server) -> set[str]:
    """Tags of the slow requests a host has logged as started."""
    return {m.group(1) for m in server.grep(r"request (\S+) started")}


def in_flight_on(cluster: Cluster, i: int) -> dict[str, set[str]]:
    """Per front end, the slow requests host i started that have not completed."""
    done = {r.tag for r in cluster.load.snapshot() if r.tag}
    tags = started_on(cluster.servers[i]) - done
    return {f: {t for t in tags if t.startswith(f + "-")} for f in cluster.load.fronts}


def wait_in_flight(cluster: Cluster, i: int) -> None:
    """Waits until host i has a slow request from every front end in flight, with most of its time left."""

    def ready():
        now = time.monotonic()
        pending = cluster.load.pending_since()
        flight = in_flight_on(cluster, i)
        return all(any(now - pending.get(t, now) < Load.SLOW / 2 for t in tags) for tags in flight.values())

    assert wait_until(ready, 20, interval=0.01), f"no slow request in flight on h{i}: {cluster.logs()}"


def nginx_errors_for(cluster: Cluster, addr: str) -> list[str]:
    log = (cluster.front.workdir / "error.log").read_text(errors="replace")
    return [line for line in log.splitlines() if f"{addr}:" in line and "[error]" in line]


# -- scenarios ---------------------------------------------------------------


def test_every_host_serves_a_share(cluster):
    load = cluster.load
    t = time.monotonic()
    served = load.wait_served(["h0", "h1", "h2"], after=t, each=100, timeout=30)
    assert_no_failure(load, cluster.logs())
    for front in load.fronts:
        total = sum(n for (f, _), n in served.items() if f == front)
        for host in ("h0", "h1", "h2"):
            # Round robin: a third each; a fifth is the least any host gets.
            assert served[(front, host)] > total / 5, (front, served)
    # The app sees the Host the client sent, through either server block.
    for port in load.fronts.values():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/host")
        assert conn.getresponse().read().decode() == f"127.0.0.1:{port}"
        conn.close()


def test_drain_fails_nothing_and_the_host_comes_back(cluster):
    load = cluster.load
    server = cluster.servers[1]
    wait_in_flight(cluster, 1)
    mark = server.mark()
    cluster.sigterm(1)
    flight = in_flight_on(cluster, 1)
    t_exit = cluster.wait_stopped(1)
    assert server.grep(r"Shutdown complete", mark), server.log

    # The requests in flight at the SIGTERM were finished by h1 itself.
    finished = load.wait_answered(set().union(*flight.values()))
    for front, tags in flight.items():
        assert tags, (front, flight)
        for tag in tags:
            assert finished[tag].host == "h1" and not finished[tag].error, finished[tag]

    # Nothing started after h1 exited reached it, and the others took over.
    load.wait_served(["h0", "h2"], after=t_exit, each=50)
    assert not any(h == "h1" for (_, h) in load.served(t_exit)), load.summary(t_exit)

    # Started again, h1 gets requests again on both front ends.
    t_back = time.monotonic()
    cluster.start(1)
    load.wait_served(["h0", "h1", "h2"], after=t_back, each=5, timeout=30)
    assert_no_failure(load, cluster.logs())


def test_losing_a_whole_host_fails_no_get(cluster):
    load = cluster.load
    wait_in_flight(cluster, 2)
    flight = in_flight_on(cluster, 2)
    t_kill = cluster.kill(2)

    # The GETs that were in flight on h2 were answered by another host.
    retried = load.wait_answered(set().union(*flight.values()))
    for front, tags in flight.items():
        assert tags, (front, flight)
        # Some may have completed just before the kill; the rest were retried.
        assert any(retried[t].host in ("h0", "h1") for t in tags), (front, [retried[t] for t in tags])
    assert all(not r.error for r in retried.values()), retried

    # The other two hosts keep serving everything, for longer than fail_timeout
    # (so nginx tried the dead host again, and retried again).
    load.wait_served(["h0", "h1"], after=t_kill, each=150, timeout=30)
    assert not any(h == "h2" for (_, h) in load.served(t_kill)), load.summary(t_kill)
    assert_no_failure(load, cluster.logs())
    # nginx did meet the dead host (and so retried): its errors name it.
    assert nginx_errors_for(cluster, cluster.addr(2)), cluster.front.logs()


def test_rolling_deploy(cluster):
    load = cluster.load
    stages = []
    for i in range(3):
        (cluster.dirs[i] / "VERSION").write_text("v2")
        server = cluster.servers[i]
        if i < 2:
            # Reload in place, with a slow request in flight on the old workers.
            wait_in_flight(cluster, i)
            mark = server.mark()
            server.signal(signal.SIGHUP)
            flight = set().union(*in_flight_on(cluster, i).values())
            server.wait_for(r"Worker \d+ \(pid \d+\) exited", count=2, since=mark, timeout=30)
            # The old workers finished what they had, with the old code.
            assert flight
            old = Counter((r.host, r.version) for r in load.wait_answered(flight).values())
            assert old == Counter({(f"h{i}", "v1"): len(flight)}), old
        else:
            # A full restart: drain, then start with the new code.
            cluster.sigterm(i)
            cluster.wait_stopped(i)
            cluster.start(i)
        t = time.monotonic()
        load.wait_served(["h0", "h1", "h2"], after=t, each=10, timeout=30)
        answered = Counter((r.host, r.version) for r in load.snapshot(t) if not r.error)
        stages.append(answered)
        # Each host answers with the version of its stage of the roll.
        for host, version in answered:
            assert version == ("v2" if int(host[1:]) <= i else "v1"), (i, answered)
    # While the roll was under way, both versions answered.
    assert {v for (_, v) in stages[0]} == {"v1", "v2"}, stages
    assert {v for (_, v) in stages[1]} == {"v1", "v2"}, stages
    assert {v for (_, v) in stages[2]} == {"v2"}, stages
    assert {r.version for r in load.snapshot() if not r.error} == {"v1", "v2"}
    assert_no_failure(load, cluster.logs())


@pytest.mark.skipif(not front_ends.available("haproxy"), reason="haproxy is not installed")
def test_readiness_alone_moves_traffic_before_shutdown(tmp_path):
    cluster = Cluster(tmp_path, extra=["--shutdown-delay", "2"])
    try:
        port = front_ends.free_port()
        servers = "\n".join(
            f"    server h{i} {a}:{HTTP_PORT} check port {STATS_PORT} inter 200ms fall 1 rise 1"
            for i, a in enumerate(cluster.hosts.addrs)
        )
        # No retries to other servers (no `option redispatch`, no `retry-on`):
        # only the health check keeps requests away from a stopping host.
        cfg = f"""
global
    maxconn 500
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend www
    bind 127.0.0.1:{port}
    default_backend corral
backend corral
    option httpchk GET /readyz
    timeout check 1s
{servers}
"""
        cluster.front = front_ends.haproxy(tmp_path / "haproxy", cfg, [port])
        out = cluster.front.workdir / "stdout.log"
        load = cluster.load = Load({"http": port})
        load.wait_served(["h0", "h1", "h2"])
        server = cluster.servers[0]
        wait_in_flight(cluster, 0)
        mark = server.mark()
        cluster.sigterm(0)
        flight = set().union(*in_flight_on(cluster, 0).values())

        down_re = re.compile(r"Server corral/h0 is DOWN.*")
        down = wait_until(lambda: down_re.search(out.read_text(errors="replace")), 5)
        t_down = time.monotonic()
        assert down, cluster.logs()
        # Marked down by the check's 503, while h0's listeners were still open.
        assert "Layer7 wrong status" in down.group(0) and "503" in down.group(0), down.group(0)
        assert not server.grep(r"Shutdown delay over", mark), server.log
        direct = http.client.HTTPConnection(cluster.addr(0), HTTP_PORT, timeout=5)
        direct.request("GET", "/")
        assert direct.getresponse().read() == b"h0 v1"  # its listener still accepts
        direct.close()

        server.wait_for(r"Shutdown delay over", since=mark, timeout=10)
        t_exit = cluster.wait_stopped(0)
        # The slow request in flight at the SIGTERM was finished by h0.
        assert flight
        finished = load.wait_answered(flight)
        assert all(r.host == "h0" and not r.error for r in finished.values()), finished
        # No request that reached HAProxy after it marked h0 down went there.
        load.wait_served(["h1", "h2"], after=t_exit, each=50)
        assert not any(h == "h0" for (_, h) in load.served(t_down)), load.summary(t_down)

        # Back up: /readyz turns 200 and HAProxy sends to h0 again.
        t_back = time.monotonic()
        cluster.start(0)
        load.wait_served(["h0", "h1", "h2"], after=t_back, each=5, timeout=20)
        assert_no_failure(load, cluster.logs())
    finally:
        cluster.destroy()
    check_clean(cluster)
