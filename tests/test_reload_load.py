"""Lifecycle under constant load, counting every response: ten HUP reloads
with the code changed in between, worker recycling, and a graceful stop."""

import http.client
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import gateway
import pytest
from front_ends import free_port
from support import IncompleteResponse, group_members, wait_until


class Load:
    """Threads sending requests on new connections back to back."""

    def __init__(self, server, target="/", threads=3):
        self.server, self.target = server, target
        self.bodies: list[bytes] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self):
        while not self.stop.is_set():
            try:
                resp = self.server.request("GET", self.target, timeout=20)
                with self.lock:
                    if resp.status == 200:
                        self.bodies.append(resp.body)
                    else:
                        self.failures.append(f"status {resp.status}")
            except (OSError, IncompleteResponse) as e:
                with self.lock:
                    self.failures.append(repr(e))

    def count(self):
        with self.lock:
            return len(self.bodies)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return self


def _write_app(path, version):
    path.write_text(
        "def application(environ, start_response):\n"
        f"    body = b'version {version}'\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n"
        "    return [body]\n"
    )


def test_ten_hup_reloads_under_load_with_new_code(start_server, tmp_path):
    app = tmp_path / "versioned.py"
    _write_app(app, 0)
    server = start_server(
        "versioned:application", "--chdir", str(tmp_path), workers=2, threads=2, pythonpath=None
    )
    load = Load(server)
    try:
        for version in range(1, 11):
            _write_app(app, version)
            mark = server.mark()
            server.signal(signal.SIGHUP)
            # Both old workers are replaced: new ones ready, old ones gone.
            server.wait_for(r"Worker ready", count=2, since=mark, timeout=30)
            server.wait_for(r"Worker \d+ \(pid \d+\) exited", count=2, since=mark, timeout=30)
            seen = load.count()
            wanted = f"version {version}".encode()
            assert wait_until(lambda seen=seen: load.count() > seen + 5, 10)
            with load.lock:
                after = load.bodies[seen:]
            assert after and all(b == wanted for b in after), set(after)
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]
    assert load.count() > 100


def test_ttou_while_a_reload_boots_its_replacements(start_server, tmp_path):
    """A TTOU that arrives while HUP's replacements still load the app stops
    one whole pair (an old worker and its replacement): the pool ends at the
    new count, all of it on the new code."""
    app = tmp_path / "versioned.py"
    _write_app(app, 0)
    server = start_server("versioned:application", "--chdir", str(tmp_path), workers=2, pythonpath=None)
    app.write_text("import time\ntime.sleep(1.5)\n" + app.read_text().replace("version 0", "version 1"))
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"Booting worker", count=2, since=mark)
    server.signal(signal.SIGTTOU)
    server.wait_for(r"Received SIGTTOU: workers 2 -> 1", since=mark)
    server.wait_for(r"Worker ready", since=mark, timeout=30)
    # The master and one worker, serving the new code.
    assert wait_until(lambda: len(group_members(server.pgid)) == 2, timeout=30), server.log[-3000:]
    assert {server.request("GET", "/").body for _ in range(10)} == {b"version 1"}
    time.sleep(2)
    assert len(group_members(server.pgid)) == 2
    assert not server.grep(r"ERROR"), server.log[-3000:]


def test_recycling_under_load_fails_nothing(start_server):
    server = start_server(
        "behaviour:application", "--max-requests", "30", "--max-requests-jitter", "10", workers=2, threads=2
    )
    load = Load(server, "/pid")
    try:
        assert wait_until(lambda: len(server.grep(r"recycling: served")) >= 4, 60), server.log[-3000:]
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]
    pids = {int(b) for b in load.bodies}
    assert len(pids) >= 4, pids


def test_max_requests_asks_for_the_replacement_at_the_nth_request(start_server):
    """Judged at the end of request N itself, not at a later sweep that may
    come hundreds of requests after it."""
    server = start_server("behaviour:application", "--max-requests", "50", workers=1, threads=1)
    with server.connect() as conn:
        for _ in range(60):
            conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.read_response().status == 200
    (line,) = server.wait_for(r"recycling: served (\d+) requests \(limit 50\)")
    assert line.group(1) == "50"


def test_sigterm_under_load_finishes_in_flight_requests(start_server):
    server = start_server("behaviour:application", workers=2, threads=4)
    load = Load(server, "/fixed")
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(server.request, "GET", f"/slow?secs=2&id=t{i}", timeout=30) for i in range(4)]
        server.wait_for(r"slow request started: t\d", count=4)
        server.signal(signal.SIGTERM)
        results = [f.result(30) for f in slow]
    time.sleep(0.5)
    load.finish()
    assert [r.status for r in results] == [200] * 4
    assert server.wait_exit(30) == 0
    # Once the listeners closed, new connections are refused: those are the
    # only failures the load may see, never a reset or a cut response.
    assert all("ConnectionRefusedError" in f for f in load.failures), load.failures[:10]


def test_reload_on_rss_recycles_a_leaking_app_without_failures(start_server):
    server = start_server("leaky_app:application", "--reload-on-rss", "80", workers=2)
    load = Load(server, "/", threads=2)
    try:
        assert wait_until(
            lambda: len(server.grep(r"recycling: resident memory \d+ MiB \(limit 80 MiB\)")) >= 2, 60
        )
        # The replaced workers finish and exit; their replacements serve.
        assert wait_until(lambda: len(server.grep(r"Worker \d+ \(pid \d+\) exited")) >= 2, 30)
        seen = load.count()
        assert wait_until(lambda: load.count() > seen + 5, 10)
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]
    assert len({int(b) for b in load.bodies}) >= 3


def test_reload_on_rss_below_a_fresh_worker_is_reported_not_looped(start_server):
    server = start_server("behaviour:application", "--reload-on-rss", "1", workers=1)
    server.wait_for(r"before serving anything, over --reload-on-rss 1 MiB: the limit cannot be met")
    (worker,) = server.worker_pids()
    for _ in range(20):
        assert server.request("GET", "/pid").body.decode() == str(worker)
    time.sleep(1)  # four checks of the limit
    assert server.worker_pids() == [worker]
    assert not server.grep("recycling")


def test_worker_lifetime_recycles_without_failures(start_server):
    server = start_server("behaviour:application", "--max-worker-lifetime", "1", workers=2)
    load = Load(server, "/pid")
    try:
        assert wait_until(lambda: len(server.grep(r"recycling: running for")) >= 4, 30)
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]
    assert len({int(b) for b in load.bodies}) >= 4


def test_timeout_of_a_sleeping_request_under_load(start_server):
    server = start_server("behaviour:application", "--timeout", "2", workers=2, threads=2)
    load = Load(server, "/fixed", threads=2)
    try:
        mark = server.mark()
        started = time.monotonic()
        resp = server.request("GET", "/slow?secs=30&id=stuck", timeout=30)
        elapsed = time.monotonic() - started
        assert resp.status == 504
        # Within timeout + 1 s (checked four times a second).
        assert elapsed < 3.0, elapsed
        line = server.wait_for(
            r"Request timeout: GET /slow\?secs=30&id=stuck ran for .* \(pid (\d+)\)", since=mark
        )[0]
        stuck = int(line.group(1))
        # The stack names the line that sleeps.
        assert server.grep(r'behaviour\.py", line \d+ in slow', since=mark)
        server.wait_for(rf"\(pid {stuck}\) exited", since=mark, timeout=30)
        seen = load.count()
        assert wait_until(lambda: load.count() > seen + 10, 10)
    finally:
        load.finish()
    # Other requests were served throughout, none failed.
    assert not load.failures, load.failures[:10]
    pids = {int(server.request("GET", "/pid").body) for _ in range(20)}
    assert stuck not in pids


def test_a_worker_whose_only_thread_is_stuck_leaves_at_once(start_server):
    """With one thread stuck past --timeout the worker can serve nothing
    more: it takes no connection from the shared queue, and it leaves without
    waiting out the graceful timeout (30 s) with connections it cannot serve."""
    server = start_server("behaviour:application", "--timeout", "2", workers=2, threads=1)
    load = Load(server, "/fixed", threads=3)
    try:
        mark = server.mark()
        assert server.request("GET", "/slow?secs=60&id=stuck", timeout=30).status == 504
        stuck = int(server.wait_for(r"Request timeout: .* \(pid (\d+)\)", since=mark)[0].group(1))
        server.wait_for(
            rf"Worker exiting with 1 timed-out request\(s\) still running: pid={stuck}",
            since=mark,
            timeout=15,
        )
        seen = load.count()
        assert wait_until(lambda: load.count() > seen + 10, 10)
    finally:
        load.finish()
    # None waits for the stuck worker, none is lost with it: a connection it
    # held untouched went to the other worker.
    assert not load.failures, load.failures[:10]


def test_requests_waiting_on_a_worker_whose_only_thread_is_stuck_reach_its_replacement(start_server):
    """A worker whose only thread is stuck past --timeout reads nothing more:
    a request sent meanwhile on a connection it holds (a kept-alive one, a new
    one it accepted before) waits unread in the socket. Those connections go
    to the replacement with the request in them, rather than being reset as
    the stuck worker leaves (a POST a front end cannot retry)."""
    server = start_server("behaviour:application", "--timeout", "2", workers=1, threads=1)
    with server.connect() as kept, server.connect() as fresh, ThreadPoolExecutor(1) as pool:
        kept.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        old = kept.read_response().body.decode()
        # `fresh` was accepted with the first request (or the sweep after
        # it): the worker holds it, waiting for its first request.
        time.sleep(0.5)
        mark = server.mark()
        stuck = pool.submit(server.request, "GET", "/slow?secs=60&id=stuck", timeout=30)
        server.wait_for("slow request started: stuck", since=mark)
        kept.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        fresh.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert stuck.result(timeout=30).status == 504
        server.wait_for(rf"Worker exiting with 1 timed-out request\(s\) still running: pid={old}", since=mark)
        assert server.grep(rf"Worker handed 2 connection\(s\) to other workers while stuck: pid={old}", mark)
        for conn, body in ((kept, b"hello"), (fresh, b"abc")):
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, body)
            conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
            new = conn.read_response().body.decode()
            assert new != old and int(new) in server.worker_pids(mark)


def _queue_behind_a_slow_request(server, secs):
    """A kept-alive and a fresh connection whose requests wait behind a slow
    one on a worker with one thread; returns them with the old worker's pid
    and the slow request's future."""
    kept, fresh = server.connect(), server.connect()
    kept.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
    old = kept.read_response().body.decode()
    time.sleep(0.5)
    mark = server.mark()
    pool = ThreadPoolExecutor(1)
    slow = pool.submit(server.request, "GET", f"/slow?secs={secs}&id=slow", timeout=30)
    server.wait_for("slow request started: slow", since=mark)
    for conn in (kept, fresh):
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    pool.shutdown(wait=False)
    return kept, fresh, old, slow


def _served_by_a_new_worker(server, conns, old, mark):
    for conn in conns:
        resp = conn.read_response()
        assert resp.status == 200
        new = resp.body.decode()
        assert new != old and int(new) in server.worker_pids(mark)
        conn.close()


def test_requests_waiting_on_a_draining_worker_go_to_its_ready_replacement(start_server):
    """On a reload, requests waiting for a thread of the old worker (its
    threads busy with slow ones) go to the new worker, which is ready and
    idle, rather than being cut at the graceful timeout unstarted."""
    server = start_server("behaviour:application", "--graceful-timeout", "20", workers=1, threads=1)
    kept, fresh, old, slow = _queue_behind_a_slow_request(server, 8)
    mark = server.mark()
    server.signal(signal.SIGHUP)
    # Answered while the old worker's one thread is still in its slow request.
    _served_by_a_new_worker(server, [kept, fresh], old, mark)
    assert slow.result(timeout=30).status == 200
    server.wait_for(rf"Worker stopped gracefully: pid={old}", since=mark)
    assert server.grep(rf"Worker handed 2 connection\(s\) to other workers: pid={old}", mark)


def test_requests_waiting_on_a_draining_worker_survive_its_last_thread_timing_out(start_server):
    """The drain began while the worker's thread was busy, then that request
    passed --timeout: the worker leaves at once, and what waited for the
    thread goes to the replacement (it was reset with the worker)."""
    server = start_server("behaviour:application", "--timeout", "3", workers=1, threads=1)
    kept, fresh, old, slow = _queue_behind_a_slow_request(server, 60)
    mark = server.mark()
    server.signal(signal.SIGHUP)
    assert slow.result(timeout=30).status == 504
    server.wait_for(rf"Worker exiting with 1 timed-out request\(s\) still running: pid={old}", since=mark)
    _served_by_a_new_worker(server, [kept, fresh], old, mark)


@pytest.mark.parametrize("proto", ["http", "uwsgi", "scgi", "fastcgi"])
def test_a_request_begun_before_the_only_thread_got_stuck_reaches_the_replacement(start_server, proto):
    """A worker with one thread reads a request's head and waits for its
    small body without holding the thread (FastCGI: its BEGIN_REQUEST and
    part of its PARAMS); the thread then gets stuck past --timeout in
    another request. The connection goes to the replacement with what this
    worker had read of it, and the rest sent meanwhile follows it there: the
    request is answered, where it was reset as the stuck worker left."""
    args = [f"--{proto}", f"127.0.0.1:{free_port()}"] if proto != "http" else []
    server = start_server("behaviour:application", "--timeout", "2", *args, workers=1, threads=1)
    addr = ("127.0.0.1", int(args[1].rpartition(":")[2])) if args else (server.host, server.port)
    body = b"the body sent once the worker was stuck"
    if proto == "http":
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    elif proto == "fastcgi":
        whole = gateway.fcgi_request_bytes(gateway.cgi_params("POST", "/echo", body), body)
        # BEGIN_REQUEST, and a PARAMS record's header and 10 of its bytes.
        head, body = whole[: 16 + 8 + 10], whole[16 + 8 + 10 :]
    else:
        pairs = gateway.cgi_params("POST", "/echo", body)
        if proto == "scgi":
            pairs.insert(1, (b"SCGI", b"1"))
        head = gateway.request_bytes(proto, pairs)
    old = server.request("GET", "/pid").body.decode()
    with socket.create_connection(addr, timeout=30) as begun, ThreadPoolExecutor(1) as pool:
        begun.sendall(head)
        # Read by the worker, which parks the connection for its body.
        time.sleep(0.5)
        mark = server.mark()
        stuck = pool.submit(server.request, "GET", "/slow?secs=60&id=stuck", timeout=30)
        server.wait_for("slow request started: stuck", since=mark)
        begun.sendall(body)
        assert stuck.result(timeout=30).status == 504
        server.wait_for(rf"Worker exiting with 1 timed-out request\(s\) still running: pid={old}", since=mark)
        assert server.grep(rf"Worker handed 1 connection\(s\) to other workers while stuck: pid={old}", mark)
        if proto == "http":
            begun.shutdown(socket.SHUT_WR)
        data, _ = gateway.read_until_close(begun, timeout=30)
    reply = gateway.parse_any(proto if proto != "http" else "uwsgi", data)
    assert (reply.status, reply.body) == (200, b"the body sent once the worker was stuck"), data[:500]
    assert int(server.request("GET", "/pid").body) != int(old)


def test_pipelined_requests_waiting_for_their_turn_on_a_stuck_worker_reach_the_replacement(start_server):
    """A connection pipelining slow requests gives up its turn to other work
    after 20 ms, its next requests buffered in the worker; the other work is
    a request that gets the worker's only thread stuck past --timeout. The
    connection goes to the replacement with the requests buffered, and every
    one is answered in order."""
    server = start_server("behaviour:application", "--timeout", "2", workers=1, threads=1)
    old = server.request("GET", "/pid").body.decode()
    n = 20
    with server.connect(timeout=30) as piped, ThreadPoolExecutor(1) as pool:
        mark = server.mark()
        piped.send(b"".join(b"GET /slow?secs=0.05&id=p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(n)))
        server.wait_for("slow request started: p1", since=mark)
        stuck = pool.submit(server.request, "GET", "/slow?secs=60&id=stuck", timeout=30)
        assert stuck.result(timeout=30).status == 504
        server.wait_for(rf"Worker exiting with 1 timed-out request\(s\) still running: pid={old}", since=mark)
        for i in range(n):
            resp = piped.read_response()
            assert (resp.status, resp.body) == (200, b"slept p%d" % i)


def test_connections_handed_over_behind_another_stuck_request_are_not_lost(start_server):
    """A stuck worker's connections go to its replacement, one of them with
    a request that gets stuck there too: the others wait parked where a
    later hand-over finds them, rather than unseen in the replacement's
    inbox, lost as it leaves in turn."""
    server = start_server("behaviour:application", "--timeout", "2", workers=1, threads=1)
    conns = [server.connect(timeout=30) for _ in range(6)]
    try:
        for conn in conns:
            conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
            first = conn.read_response().body.decode()
        mark = server.mark()
        conns[0].send(b"GET /slow?secs=60&id=first HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_for("slow request started: first", since=mark)
        conns[1].send(b"GET /slow?secs=60&id=second HTTP/1.1\r\nHost: x\r\n\r\n")
        for i, conn in enumerate(conns[2:]):
            conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % i)
        assert conns[0].read_response().status == 504
        server.wait_for(
            rf"Worker handed 5 connection\(s\) to other workers while stuck: pid={first}", since=mark
        )
        assert conns[1].read_response().status == 504
        for i, conn in enumerate(conns[2:]):
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"%d" % i)
    finally:
        for conn in conns:
            conn.close()


def test_connections_handed_to_a_worker_that_gets_stuck_go_on_to_its_replacement(start_server):
    """A reload hands the old worker's kept-alive connections to the new one,
    whose only thread is stuck in a request by then: they wait in its inbox,
    which no thread reads. When it leaves past --timeout they go on to its
    replacement with the requests sent on them meanwhile, rather than being
    reset as it exits."""
    server = start_server("behaviour:application", "--timeout", "3", workers=1, threads=1)
    kept = [server.connect(timeout=30) for _ in range(8)]
    try:
        for conn in kept:
            conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
            old = conn.read_response().body.decode()
        mark = server.mark()
        with ThreadPoolExecutor(2) as pool:
            # The old worker is busy while the new one starts and takes the stuck request.
            busy = pool.submit(server.request, "GET", "/slow?secs=1.5&id=busy", timeout=30)
            server.wait_for("slow request started: busy", since=mark)
            server.signal(signal.SIGHUP)
            stuck = pool.submit(server.request, "GET", "/slow?secs=100&id=stuck", timeout=30)
            server.wait_for("slow request started: stuck", since=mark)
            assert busy.result(timeout=30).status == 200
            server.wait_for(rf"Worker handed 8 connection\(s\) to other workers: pid={old}", since=mark)
            for i, conn in enumerate(kept):
                conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % i)
            assert stuck.result(timeout=30).status == 504
        for i, conn in enumerate(kept):
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"%d" % i)
    finally:
        for conn in kept:
            conn.close()


@pytest.mark.parametrize("hang", ["/slow?secs=60&id=stuck", "/segfault"])
def test_a_connection_answered_in_the_pass_that_got_stuck_reaches_the_replacement(start_server, hang):
    """A worker with one thread answers the requests that came ready together
    in one go, holding each finished response back briefly: `kept`'s response
    is held as the next request of the same pass runs past --timeout, or
    crashes the worker. The response is written at once all the same, and
    the connection, whose next request that thread can never read, goes to
    the replacement with that request rather than being closed under it."""
    server = start_server("behaviour:application", "--timeout", "2", workers=1, threads=1)
    with server.connect() as busy, server.connect() as kept, server.connect() as hanging:
        for conn in (busy, kept, hanging):
            conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
            old = conn.read_response().body.decode()
        mark = server.mark()
        # The only thread is busy while both requests come in, so it finds
        # them ready together, `kept`'s first.
        busy.send(b"GET /slow?secs=0.5&id=busy HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_for("slow request started: busy", since=mark)
        kept.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.05)
        hanging.send(f"GET {hang} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert busy.read_response().status == 200
        assert kept.read_response().status == 200
        kept.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        if hang == "/segfault":
            assert hanging.read_response().status == 500
            server.wait_for(r"Worker handed 2 connection\(s\) to other workers after the crash", since=mark)
        else:
            assert hanging.read_response().status == 504
            server.wait_for(
                rf"Worker exiting with 1 timed-out request\(s\) still running: pid={old}", since=mark
            )
        resp = kept.read_response()
        assert (resp.status, resp.body) == (200, b"hello")
        kept.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        new = kept.read_response().body.decode()
        assert new != old and int(new) in server.worker_pids(mark)


def test_an_idle_keep_alive_connection_is_handed_to_a_new_worker_on_hup(start_server):
    """A reload closes no kept-alive connection: the draining worker hands an
    idle one to a worker that serves on, and the client's next request on it
    reaches the new code without a reconnect."""
    server = start_server("behaviour:application", workers=1)
    with server.connect() as conn:
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        old = conn.read_response().body.decode()
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(rf"Worker stopped gracefully: pid={old}", since=mark)
        assert server.grep(rf"Worker handed 1 connection\(s\) to other workers: pid={old}", mark)
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        resp = conn.read_response()
        assert (resp.status, resp.body, resp.header("Connection")) == (200, b"hello", None)
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        new = conn.read_response().body.decode()
        assert new != old and int(new) in server.worker_pids(mark)


def _inboxes(master_pid):
    """Paths of the unix sockets bound for `master_pid`'s hand-over inboxes,
    from the kernel's table (abstract names start with @)."""
    with open("/proc/net/unix") as table:
        paths = [line.split()[-1] for line in table.readlines()[1:] if len(line.split()) >= 8]
    return [
        p
        for p in paths
        if p.startswith("/")
        and f"/{master_pid}-" in p
        or p.startswith("@corral-handover-")
        and f"-{master_pid}-" in p
    ]


def _hands_over_a_kept_connection(server):
    """A kept-alive connection of a worker sent TERM alone (as a reload
    drains each) goes to a sibling; returns the drained worker's pid and
    the log's mark before its TERM."""
    with server.connect() as conn:
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        old = int(conn.read_response().body)
        mark = server.mark()
        os.kill(old, signal.SIGTERM)
        server.wait_for(rf"Worker handed 1 connection\(s\) to other workers: pid={old}", since=mark)
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        new = int(conn.read_response().body)
        assert new != old and new in server.worker_pids()
    return old, mark


@pytest.mark.parametrize("user", [None, "nobody"])
def test_hand_over_inboxes_are_in_a_directory_of_the_users_alone(start_server, user):
    """The inboxes a draining worker hands connections to are socket files in
    a directory only the user the workers run as may enter, removed at exit:
    names in the abstract namespace have no owner, and any local user could
    bind the name of a worker yet to start and be handed its connections
    with the requests read on them."""
    if user and os.geteuid() != 0:
        pytest.skip("--user needs root")
    extra = ("--user", user, "--preload") if user else ()
    server = start_server("behaviour:application", *extra, workers=2)
    pids = server.worker_pids()
    assert wait_until(lambda: len(_inboxes(server.proc.pid)) == 2, 10), _inboxes(server.proc.pid)
    inboxes = _inboxes(server.proc.pid)
    assert sorted(inboxes) == sorted(
        os.path.join(os.path.dirname(inboxes[0]), f"{server.proc.pid}-{pid}") for pid in pids
    ), inboxes
    directory = os.stat(os.path.dirname(inboxes[0]))
    assert directory.st_mode & 0o777 == 0o700
    assert directory.st_uid == (pwd.getpwnam(user).pw_uid if user else os.geteuid())
    old, mark = _hands_over_a_kept_connection(server)
    # The inbox of a worker gone is removed; the directory at exit.
    server.wait_for(rf"\(pid {old}\) exited", since=mark)
    assert not os.path.exists(os.path.join(os.path.dirname(inboxes[0]), f"{server.proc.pid}-{old}"))
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    assert not os.path.exists(os.path.dirname(inboxes[0]))


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_hand_over_inboxes_go_to_tmp_when_tmpdir_is_closed_to_the_user(start_server):
    """A TMPDIR of root's own (libpam-tmpdir's /tmp/user/0) that --user cannot
    enter: the inboxes go to /tmp instead (every reload closed the kept-alive
    connections)."""
    private = tempfile.mkdtemp(prefix="u0-", dir="/tmp")  # mode 700, root's
    try:
        server = start_server(
            "behaviour:application", "--user", "nobody", "--preload", workers=2, env={"TMPDIR": private}
        )
        assert wait_until(lambda: len(_inboxes(server.proc.pid)) == 2, 10), _inboxes(server.proc.pid)
        assert all(p.startswith("/tmp/corral-") for p in _inboxes(server.proc.pid)), _inboxes(server.proc.pid)
        assert not server.grep(r"cannot hand connections"), server.log
        _hands_over_a_kept_connection(server)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_a_directory_of_inboxes_removed_is_made_again_and_stale_ones_are_removed(start_server):
    """The directory of inboxes removed while the server runs (a clean-up of
    /tmp) is made again for the next workers; and one a master killed
    outright left behind, where no inbox answers, goes at the next start."""
    uid = os.geteuid()
    stale = f"/tmp/corral-{os.urandom(8).hex()}-{uid}"
    os.mkdir(stale, 0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(f"{stale}/1-2")
    dead.close()
    live_dir = f"/tmp/corral-{os.urandom(8).hex()}-{uid}"
    os.mkdir(live_dir, 0o700)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    live.bind(f"{live_dir}/1-2")
    try:
        server = start_server("behaviour:application", workers=2)
        assert not os.path.exists(stale)
        assert os.path.exists(f"{live_dir}/1-2")
        assert wait_until(lambda: len(_inboxes(server.proc.pid)) == 2, 10)
        ours = os.path.dirname(_inboxes(server.proc.pid)[0])
        shutil.rmtree(ours)
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"from before|Worker \d+ \(pid \d+\) exited", since=mark, timeout=20)
        assert wait_until(lambda: len(_inboxes(server.proc.pid)) == 2, 10), _inboxes(server.proc.pid)
        assert os.stat(ours).st_mode & 0o777 == 0o700
        _hands_over_a_kept_connection(server)
    finally:
        live.close()
        shutil.rmtree(live_dir, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def test_a_connection_handed_over_from_a_worker_whose_app_forked_ends_when_closed(start_server):
    """A child the old worker's app forked still holds a copy of a kept-alive
    connection handed to the new worker at a reload: when the new worker
    closes it (a `Connection: close` response), the client gets its end at
    once, not when that child exits."""
    server = start_server("behaviour:application", workers=1)
    with server.connect() as conn:
        conn.send(b"GET /fork-child?secs=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        child = int(conn.read_response().body)
        try:
            conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
            old = conn.read_response().body.decode()
            mark = server.mark()
            server.signal(signal.SIGHUP)
            server.wait_for(rf"Worker handed 1 connection\(s\) to other workers: pid={old}", since=mark)
            conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            resp = conn.read_response()
            assert resp.status == 200 and resp.body.decode() != old
            assert conn.at_eof(15)
        finally:
            os.kill(child, signal.SIGKILL)


def test_a_connection_handed_over_after_the_app_forked_stays_open(start_server):
    """Once the app has forked, a worker shuts down the connections it closes
    (a child may hold copies); one it handed to a sibling must not be: that
    would end it for the sibling too."""
    server = start_server("behaviour:application", workers=1)
    with server.connect() as conn:
        conn.send(b"GET /fork-returns HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body.startswith(b"parent ")
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        old = conn.read_response().body.decode()
        # A response under way (its head already sent) as the drain begins:
        # the connection is handed over as it ends, and this worker's copy
        # closed then.
        mark = server.mark()
        conn.send(b"GET /burst-then-slow?slow=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        server.signal(signal.SIGHUP)
        server.wait_for(rf"Worker draining: pid={old}", since=mark)
        resp = conn.read_response()
        assert (resp.status, resp.header("Connection")) == (200, None)
        assert resp.body.endswith(b"slow 2\n")
        server.wait_for(rf"Worker stopped gracefully: pid={old}", since=mark)
        assert server.grep(rf"Worker handed 1 connection\(s\) to other workers: pid={old}", mark)
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        new = conn.read_response().body.decode()
        assert new != old and int(new) in server.worker_pids(mark)


def test_a_request_on_an_idle_keep_alive_connection_as_a_stop_begins_is_served(start_server):
    """With no worker left to take it (a graceful stop), a request sent on an
    idle keep-alive connection just as the drain begins is served, with
    Connection: close, rather than lost to a close under it."""
    server = start_server("behaviour:application", workers=1)
    with server.connect() as conn:
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        old = conn.read_response().body.decode()
        mark = server.mark()
        server.signal(signal.SIGTERM)
        server.wait_for(rf"Worker draining: pid={old}", since=mark)
        # Past the worker's next sweep (every 0.25 s), within its linger (2 s).
        time.sleep(0.5)
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"hello")
        assert resp.header("Connection") == "close"
        assert conn.at_eof(10)
    assert server.wait_exit(20) == 0


def test_hup_with_broken_code_keeps_the_old_workers_then_fixed_code_loads(start_server, tmp_path):
    app = tmp_path / "versioned.py"
    _write_app(app, 1)
    server = start_server("versioned:application", "--chdir", str(tmp_path), workers=2, pythonpath=None)
    load = Load(server)
    try:
        app.write_text("def application(environ, start_response):\n    return [b'unclosed'\n")
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(
            r"could not load the application .*keeps serving the code it has", count=2, since=mark
        )
        seen = load.count()
        assert wait_until(lambda: load.count() > seen + 20, 10)
        with load.lock:
            assert set(load.bodies[seen:]) == {b"version 1"}
        _write_app(app, 2)
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"Worker \d+ \(pid \d+\) exited", count=2, since=mark, timeout=30)
        assert wait_until(lambda: server.request("GET", "/").body == b"version 2", 10)
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]


def test_a_worker_that_dies_while_the_new_code_cannot_load_leaves_the_others_serving(start_server, tmp_path):
    """After a HUP the new code of which does not load, a worker dies (the OOM
    killer, say): its replacement cannot load either, and the other worker goes
    on serving what it loaded, with no quick stop of the server; fixed code
    loads at the next try."""
    app = tmp_path / "versioned.py"
    _write_app(app, 1)
    server = start_server("versioned:application", "--chdir", str(tmp_path), workers=2, pythonpath=None)
    app.write_text("def application(environ, start_response):\n    return [b'unclosed'\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"could not load the application .*keeps serving the code it has", count=2, since=mark)
    victim, survivor = server.worker_pids()[:2]
    mark = server.mark()
    os.kill(victim, signal.SIGKILL)
    server.wait_for(
        r"could not load the application \(see the error above\); the 1 other worker\(s\) keep serving the "
        r"code they loaded; trying again in 5s",
        since=mark,
    )
    assert server.proc.poll() is None
    assert not server.grep(r"shutting down|SIGQUIT", since=mark), server.log
    for _ in range(5):
        assert server.request("GET", "/").body == b"version 1"
    mark = server.mark()
    _write_app(app, 2)
    server.wait_for(r"Worker ready", since=mark, timeout=20)
    assert not server.grep(rf"pid {survivor}\) exited", since=mark)
    # The next reload replaces the worker that kept the old code.
    server.signal(signal.SIGHUP)
    server.wait_for(rf"Worker \d+ \(pid {survivor}\) exited", since=mark, timeout=20)
    assert all(server.request("GET", "/").body == b"version 2" for _ in range(5))


def test_readiness_holds_while_the_workers_from_before_a_reexec_serve(start_server, tmp_path):
    """With --preload a HUP re-executes the master; while (and, if the new code
    does not load, as long as) the previous program's workers serve, /readyz
    says ready: a balancer must not take a serving host out."""
    app = tmp_path / "versioned.py"
    _write_app(app, 1)
    stats = free_port()
    server = start_server(
        "versioned:application",
        "--preload",
        "--chdir",
        str(tmp_path),
        "--stats",
        f"127.0.0.1:{stats}",
        workers=1,
        pythonpath=None,
    )
    app.write_text("def application(environ, start_response):\n    return [b'unclosed'\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"could not load the new code", since=mark, timeout=30)
    assert server.request("GET", "/").body == b"version 1"
    conn = http.client.HTTPConnection("127.0.0.1", stats, timeout=10)
    conn.request("GET", "/readyz")
    assert conn.getresponse().status == 200


def test_hup_with_preload_reexecutes_and_loads_new_code(start_server, tmp_path):
    app = tmp_path / "versioned.py"
    _write_app(app, 1)
    server = start_server(
        "versioned:application", "--preload", "--chdir", str(tmp_path), workers=2, pythonpath=None
    )
    load = Load(server)
    try:
        _write_app(app, 2)
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"re-executing the master", since=mark)
        server.wait_for(r"from before the re-exec exited", count=2, since=mark, timeout=30)
        assert wait_until(lambda: server.request("GET", "/").body == b"version 2", 10)
        assert server.running()
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]


def _versioned_server(start_server, tmp_path, how):
    """Two workers serving version 1 of versioned.py, preloaded for a HUP's re-exec."""
    app = tmp_path / "versioned.py"
    _write_app(app, 1)
    preload = ("--preload",) if how == "hup-preload" else ()
    server = start_server(
        "versioned:application", *preload, "--chdir", str(tmp_path), workers=2, pythonpath=None
    )
    return app, server


def _old_workers_serve_then_fixed_code_loads(server, app, load):
    """After a re-exec whose new code did not load: the workers from before
    it serve the previous code under load, and fixed code loads at a later
    try, with the master up throughout."""
    seen = load.count()
    assert wait_until(lambda: load.count() > seen + 20, 10)
    with load.lock:
        assert set(load.bodies[seen:]) == {b"version 1"}
    assert server.running()
    _write_app(app, 2)
    mark = server.mark()
    server.wait_for(r"from before the re-exec exited", count=2, since=mark, timeout=60)
    assert wait_until(lambda: server.request("GET", "/").body == b"version 2", 10)
    assert server.running()


@pytest.mark.parametrize("how", ["hup-preload", "usr2"])
def test_reexec_with_broken_code_keeps_the_old_workers_then_fixed_code_loads(start_server, tmp_path, how):
    """A re-exec (HUP with --preload, USR2) whose new code fails to import: the
    workers from before it keep serving the previous code, the master stays up,
    and the new code is tried again until it loads."""
    app, server = _versioned_server(start_server, tmp_path, how)
    load = Load(server)
    try:
        app.write_text("def application(environ, start_response):\n    return [b'unclosed'\n")
        mark = server.mark()
        server.signal(signal.SIGHUP if how == "hup-preload" else signal.SIGUSR2)
        server.wait_for(
            r"could not load the new code .*keep serving the previous code", since=mark, timeout=30
        )
        if how == "hup-preload":
            assert server.grep(r"The new code could not be preloaded", since=mark)
        _old_workers_serve_then_fixed_code_loads(server, app, load)
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]


SEGFAULT = "import ctypes\nctypes.string_at(0)\n"


@pytest.mark.parametrize(
    "how, crash, said",
    [
        ("hup-preload", SEGFAULT, r"killed by signal 11 \(SIGSEGV\)"),
        ("hup-preload", "import os\nos._exit(9)\n", r"it exited with status 9 before the import ended"),
        ("usr2", SEGFAULT, None),
    ],
)
def test_a_reexec_whose_import_kills_its_process_keeps_the_old_workers(
    start_server, tmp_path, how, crash, said
):
    """HUP with --preload re-executes the master, which imports the new code
    itself: an import that kills its process (a crash in a C extension, an
    abort, os._exit) would take the master, and with it every worker of the
    previous code, down. It is tried in a child first. After any re-exec the
    new workers that die importing it are retried with a growing wait, not
    given up on: the old workers keep serving, and fixed code loads at a
    later try, as with a Python error."""
    app, server = _versioned_server(start_server, tmp_path, how)
    load = Load(server)
    try:
        app.write_text(crash + app.read_text())
        mark = server.mark()
        server.signal(signal.SIGHUP if how == "hup-preload" else signal.SIGUSR2)
        if said:
            server.wait_for(
                r"The new code's import ended the process that tried it first: " + said,
                since=mark,
                timeout=30,
            )
        server.wait_for(
            r"while booting \(failure 6 in a row\); the 2 worker\(s\) from before the re-exec keep serving the "
            r"previous code",
            since=mark,
            timeout=60,
        )
        _old_workers_serve_then_fixed_code_loads(server, app, load)
    finally:
        load.finish()
    assert not load.failures, load.failures[:10]


def test_a_process_the_failing_import_forked_does_not_hold_the_master(start_server, tmp_path):
    """The new code's import forks a process that lives on, then dies: the
    master reads the verdict without waiting for that process (which holds
    the pipe's writing end), says why, and hears TERM at once."""
    app, server = _versioned_server(start_server, tmp_path, "hup-preload")
    app.write_text("import os, time\nif os.fork() == 0:\n    time.sleep(20)\n    os._exit(0)\nos._exit(7)\n")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(
        r"The new code's import ended the process that tried it first: it exited with status 7",
        since=mark,
        timeout=15,
    )
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0


def test_a_stop_while_a_preload_reload_tries_the_import_in_a_child_stops_it(start_server, tmp_path):
    """TERM while the new code's import is tried in a child: the child is
    killed and the master stops with the workers from before, at once."""
    app = tmp_path / "versioned.py"
    _write_app(app, 1)
    server = start_server(
        "versioned:application", "--preload", "--chdir", str(tmp_path), workers=1, pythonpath=None
    )
    app.write_text("import time\ntime.sleep(600)\n" + app.read_text())
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"re-executing the master", since=mark)
    time.sleep(1)
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20) == 0, server.log[mark:]
    server.wait_for(r"Stopped while the new code was being imported", since=mark)


def test_thousands_of_idle_keep_alive_connections_all_survive_a_hup(start_server):
    """The new worker's inbox holds few messages at once (the kernel's
    net.unix.max_dgram_qlen, often 10): a draining worker with thousands of
    idle connections waits for it to take them rather than closing the ones
    that did not fit (a few percent were lost that way)."""
    count = 6000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * count + 200:
        pytest.skip(f"the open files limit ({hard}) is too low for {count} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (2 * count + 200, hard))
    conns = []
    try:
        server = start_server("behaviour:application", "--max-connections", str(count + 100), threads=2)
        for _ in range(count):
            conns.append(socket.create_connection((server.host, server.port)))
        request = b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n"

        def round_trip(sock):
            sock.sendall(request)
            got = b""
            while not got.endswith(b"hello world"):
                data = sock.recv(65536)
                if not data:
                    return False
                got += data
            return True

        assert all(round_trip(s) for s in conns)
        old = server.worker_pids()
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(rf"Worker stopped gracefully: pid={old[0]}", since=mark, timeout=40)
        lost = 0
        for s in conns:
            try:
                lost += not round_trip(s)
            except OSError:
                lost += 1
        assert lost == 0, (lost, server.log[-2000:])
        assert server.grep(rf"Worker handed {count} connection\(s\)", mark)
    finally:
        for s in conns:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_post_is_lost_or_held_under_alternating_reexecs_and_reloads(start_server):
    """Eight clients posting on kept connections while the server is re-executed
    (USR2) and reloaded (HUP) in turn every 0.5 s for 20 s: workers of several
    generations drain at once and hand their idle connections on. Each request
    is answered, none reset and none left unanswered. (A draining worker's
    sweeper, waiting for a full inbox, handed over a connection a request had
    begun on meanwhile, its head left in the old worker's buffer: that client
    waited for ever, in most such runs.)"""
    server = start_server("front_app:application", workers=2, threads=4)
    failures, answered = [], [0]
    stop = threading.Event()
    body = b"p" * 2000

    def client():
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("POST", "/upload", body=body)
                resp = conn.getresponse()
                got = resp.read()
                if resp.status != 200 or json.loads(got)["length"] != len(body):
                    failures.append((resp.status, got[:100]))
                answered[0] += 1
            except (OSError, http.client.HTTPException) as e:
                failures.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for i in range(40):
            time.sleep(0.5)
            server.signal(signal.SIGUSR2 if i % 2 == 0 else signal.SIGHUP)
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert answered[0] > 1000, answered
    assert not failures, (failures[:10], server.log[-3000:])
