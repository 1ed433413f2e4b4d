"""Several corral hosts behind one load balancer, with real network
namespaces as hosts: every host takes a share, a host can be drained, lost
and brought back, a deploy can roll host by host, and readiness alone moves
traffic away before a shutdown. A load generator runs throughout and every
response is counted."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter

import front_ends
import netns
import pytest
from support import APPS, CORRAL, Server, group_members, wait_until

why_not = netns.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=why_not or "")


class Load:
    """Threads sending GETs to the load balancer back to back (new connection each)."""

    def __init__(self, port, threads=4):
        self.port = port
        self.bodies: list[str] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self):
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read().decode()
                with self.lock:
                    if resp.status == 200:
                        self.bodies.append(body)
                    else:
                        self.failures.append(f"status {resp.status}: {body[:80]}")
            except OSError as e:
                with self.lock:
                    self.failures.append(repr(e))
            finally:
                conn.close()

    def mark(self):
        with self.lock:
            return len(self.bodies)

    def since(self, mark):
        with self.lock:
            return list(self.bodies[mark:])

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return self


class Cluster:
    def __init__(self, tmp, count=3, extra=()):
        self.tmp, self.extra = tmp, list(extra)
        self.hosts = netns.Hosts(count)
        self.servers: list[Server | None] = [None] * count
        self.dirs = []
        for i in range(count):
            d = tmp / f"host{i}"
            d.mkdir()
            (d / "VERSION").write_text("v1")
            self.dirs.append(d)
            self.start(i)

    def start(self, i):
        addr = self.hosts.addrs[i]
        server = Server(
            "host_app:application",
            "--env",
            f"HOST_NAME=h{i}",
            "--chdir",
            str(self.dirs[i]),
            "--stats",
            f"{addr}:9100",
            *self.extra,
            http=f"{addr}:8000",
            workers=2,
            pythonpath=APPS,
            command=[*self.hosts.exec_prefix(i), *CORRAL],
        )
        server.wait_started()
        self.servers[i] = server
        return server

    def stop(self, i, sig=signal.SIGTERM):
        server = self.servers[i]
        if sig == signal.SIGKILL:
            os.killpg(server.pgid, signal.SIGKILL)
            wait_until(lambda: not group_members(server.pgid), 10)
        else:
            server.signal(sig)
            assert server.wait_exit(60) == 0
        server.cleanup()

    def destroy(self):
        for s in self.servers:
            if s is not None:
                s.cleanup()
        self.hosts.destroy()


def nginx_for(cluster, tmp):
    port = front_ends.free_port()
    upstream = "\n".join(f"        server {a}:8000 max_fails=1 fail_timeout=2s;" for a in cluster.hosts.addrs)
    servers = f"""
    upstream corral {{
{upstream}
        keepalive 16;
    }}
    server {{
        listen {port};
        location / {{
            proxy_pass http://corral;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout 1s;
        }}
    }}"""
    fe = front_ends.nginx(tmp / "nginx", servers)
    return fe, port


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    fe, port = nginx_for(c, tmp_path)
    c.front, c.port = fe, port
    yield c
    fe.stop()
    c.destroy()


def _hosts_of(bodies):
    return Counter(b.split()[0] for b in bodies)


def test_every_host_serves_a_share(cluster):
    load = Load(cluster.port)
    assert wait_until(lambda: len(_hosts_of(load.since(0))) == 3 and load.mark() > 300, 20)
    load.finish()
    shares = _hosts_of(load.bodies)
    assert not load.failures, load.failures[:5]
    assert all(shares[h] > load.mark() / 10 for h in ("h0", "h1", "h2")), shares


def test_drain_fails_nothing_and_the_host_comes_back(cluster):
    load = Load(cluster.port)
    time.sleep(1)
    cluster.stop(1)  # SIGTERM: graceful
    mark = load.mark()
    assert wait_until(lambda: load.mark() > mark + 200, 20)
    assert "h1" not in _hosts_of(load.since(mark + 50))
    cluster.start(1)
    mark = load.mark()
    assert wait_until(lambda: "h1" in _hosts_of(load.since(mark)), 20)
    load.finish()
    assert not load.failures, load.failures[:5]


def test_losing_a_whole_host_fails_no_get(cluster):
    load = Load(cluster.port)
    time.sleep(1)
    cluster.stop(2, signal.SIGKILL)
    mark = load.mark()
    assert wait_until(lambda: load.mark() > mark + 300, 20)
    load.finish()
    assert not load.failures, load.failures[:5]
    assert set(_hosts_of(load.since(mark + 50))) == {"h0", "h1"}


def test_rolling_deploy(cluster):
    load = Load(cluster.port)
    time.sleep(0.5)
    versions_during = set()
    for i in range(3):
        (cluster.dirs[i] / "VERSION").write_text("v2")
        if i < 2:
            mark = cluster.servers[i].mark()
            cluster.servers[i].signal(signal.SIGHUP)
            cluster.servers[i].wait_for(r"Worker \d+ \(pid \d+\) exited", count=2, since=mark, timeout=30)
        else:
            cluster.stop(i)
            cluster.start(i)
        m = load.mark()
        assert wait_until(lambda m=m: load.mark() > m + 100, 20)
        recent = load.since(m)
        versions_during |= {b.split()[1] for b in recent}
        # Each host answers with the right version for its stage of the roll.
        for body in recent[20:]:
            host, version = body.split()
            assert version == ("v2" if int(host[1:]) <= i else "v1"), (i, body)
    load.finish()
    assert not load.failures, load.failures[:5]
    assert versions_during == {"v1", "v2"}
    assert {b.split()[1] for b in load.bodies[-50:]} == {"v2"}


@pytest.mark.skipif(not front_ends.available("haproxy"), reason="haproxy is not installed")
def test_readiness_alone_moves_traffic_before_shutdown(tmp_path):
    cluster = Cluster(tmp_path, extra=["--shutdown-delay", "2"])
    port = front_ends.free_port()
    servers = "\n".join(
        f"    server h{i} {a}:8000 check port 9100 inter 200ms fall 1 rise 1"
        for i, a in enumerate(cluster.hosts.addrs)
    )
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
    http-reuse never
{servers}
"""
    fe = front_ends.haproxy(tmp_path / "haproxy", cfg, [port])
    try:
        load = Load(port)
        assert wait_until(lambda: len(_hosts_of(load.since(0))) == 3, 20)
        server = cluster.servers[0]
        mark_log = server.mark()
        server.signal(signal.SIGTERM)
        # HAProxy stops sending to h0 while h0 still accepts (shutdown delay).
        t0 = time.monotonic()
        mark = load.mark()
        assert wait_until(lambda: "h0" not in _hosts_of(load.since(load.mark() - 20)), 5)
        assert time.monotonic() - t0 < 2, "traffic moved only when the listeners closed"
        server.wait_for(r"Shutdown delay over", since=mark_log, timeout=10)
        assert server.wait_exit(30) == 0
        assert wait_until(lambda: load.mark() > mark + 200, 20)
        load.finish()
        assert not load.failures, load.failures[:5]
    finally:
        fe.stop()
        cluster.destroy()
