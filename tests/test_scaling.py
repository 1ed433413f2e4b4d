"""The adaptive pool (--workers-min/--workers-max) and overload shedding
(--max-connections), driven by real concurrent load."""

import re
import selectors
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait

from support import CORRAL, READY_RE, wait_until


def _live_workers(server, since=0):
    """Pids that logged ready and have not been reported as exited."""
    ready = {int(m.group(1)) for m in server.grep(READY_RE.pattern, since)}
    gone = {int(m.group(1)) for m in server.grep(r"\(pid (\d+)\) exited", since)}
    return ready - gone


def test_burst_grows_the_pool_to_the_max_and_idle_shrinks_it(start_server):
    server = start_server(
        "behaviour:application",
        "--workers-min",
        "1",
        "--workers-max",
        "3",
        "--scale-down-idle",
        "1",
        workers=None,
        threads=1,
    )
    assert len(_live_workers(server)) == 1
    mark = server.mark()
    # 12 requests of 1 s at once against one single-threaded worker: every
    # thread is busy and connections queue, so the pool grows to its maximum.
    with ThreadPoolExecutor(12) as pool:
        results = list(
            pool.map(lambda i: server.request("GET", f"/slow?secs=1&id=b{i}", timeout=60), range(12))
        )
    assert all(r.status == 200 for r in results), [r.status for r in results]
    ups = server.grep(
        r"Scaling up to (\d+) worker\(s\): (\d+) of (\d+) threads busy, (\d+) connection\(s\) held "
        r"\(at most (\d+) per worker\), (\d+) connection",
        since=mark,
    )
    # The burst takes the pool to its maximum one worker at a time. (A request
    # still running after the pool began to shrink may grow it again later.)
    assert [int(m.group(1)) for m in ups][:2] == [2, 3], server.log
    assert max(int(m.group(1)) for m in ups) == 3, server.log
    assert all(
        int(m.group(2)) == int(m.group(3))
        or int(m.group(6)) > 0
        or int(m.group(4)) >= (int(m.group(1)) - 1) * int(m.group(5))
        for m in ups
    )
    # Idle: one worker less per --scale-down-idle, down to the minimum.
    downs = server.wait_for(r"Scaling down to (\d+) worker", count=2, since=mark, timeout=20)
    assert [int(m.group(1)) for m in downs] == [2, 1]
    assert wait_until(lambda: len(_live_workers(server)) == 1, 10), server.log
    assert server.request("GET", "/fixed").status == 200


def test_a_burst_waits_in_the_queue_for_the_workers_the_pool_grows_by(start_server, tmp_path):
    """A one-worker adaptive pool under a burst of slow requests: its worker,
    every thread busy, leaves the burst in the listener's queue, where the
    worker the pool grows by takes its share once it has loaded. (It took
    the whole burst in and served it in turn, while the new worker idled.)
    The new worker's import waits here until the first has served three
    requests, which makes the order certain."""
    server = start_server(
        "gated_import:application",
        "--workers-min",
        "1",
        "--workers-max",
        "2",
        workers=None,
        threads=1,
        env={"CORRAL_TEST_GATE_DIR": str(tmp_path)},
    )
    first = server.worker_pids()[0]
    mark = server.mark()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(server.request, "GET", "/?secs=0.3", timeout=60) for _ in range(16)]
        server.wait_for(r"Scaling up to 2 worker", since=mark, timeout=30)
        assert wait_until(lambda: sum(f.done() for f in futures) >= 3, 30)
        (tmp_path / "release").touch()
        results = [f.result() for f in futures]
    assert all(r.status == 200 for r in results), [r.status for r in results]
    served = Counter(int(r.body) for r in results)
    second = sum(n for pid, n in served.items() if pid != first)
    assert second >= 3, (served, server.log)


def test_ttin_ttou_stay_within_the_bounds(start_server):
    server = start_server(
        "behaviour:application",
        "--workers-min",
        "1",
        "--workers-max",
        "2",
        "--scale-down-idle",
        "60",
        workers=None,
    )
    mark = server.mark()
    server.signal(signal.SIGTTIN)
    server.wait_for(r"Received SIGTTIN: workers 1 -> 2", since=mark)
    server.wait_for(READY_RE.pattern, since=mark)
    server.signal(signal.SIGTTIN)  # already at the maximum: ignored
    server.signal(signal.SIGTTOU)
    server.wait_for(r"Received SIGTTOU: workers 2 -> 1", since=mark)
    server.signal(signal.SIGTTOU)  # already at the minimum: ignored
    server.wait_for(r"Received SIGTTOU: already at the fewest workers \(1\); ignored", since=mark)
    server.wait_for(r"Received SIGTTIN: already at the most workers \(2\); ignored", since=mark)
    time.sleep(0.5)
    assert not server.grep(r"workers 2 -> 3|workers 1 -> 0", since=mark)
    assert wait_until(lambda: len(_live_workers(server)) == 1, 10)


def test_a_worker_out_of_file_descriptors_pauses_accepting(start_server):
    """Past the open files limit, accept() fails: the worker stops accepting
    for a moment and says so once a second, instead of being woken for the
    same failure in a loop (a core's worth of CPU and a log line per try)."""
    server = start_server(
        "behaviour:application",
        threads=2,
        command=["sh", "-c", 'ulimit -n 128 && exec "$0" "$@"', *CORRAL],
    )
    assert server.grep(r"--max-connections 1000 is more than the open files limit \(128")
    idle = []
    try:
        for _ in range(150):
            idle.append(socket.create_connection((server.host, server.port)))
        server.wait_for(r"Cannot accept connections: .*Too many open files.*open files limit 128")
        time.sleep(3)
        lines = server.grep(r"Cannot accept connections")
        assert 1 <= len(lines) <= 8, len(lines)
    finally:
        for s in idle:
            s.close()
    # Once descriptors are free again, new clients are served.
    assert server.request("GET", "/fixed", timeout=15).status == 200


def test_an_open_files_limit_the_worker_fills_itself_is_an_error(start_server):
    """A limit so low that the worker's own descriptors fill it: it could
    never accept, and the start says so as an error, naming the limit, rather
    than leave only the shortage lines that follow."""
    server = start_server(
        "behaviour:application",
        command=["sh", "-c", 'ulimit -n 18 && exec "$0" "$@"', *CORRAL],
        wait=False,
    )
    server.wait_for(
        r"This worker's own descriptors .* fill the open files limit \(18, `ulimit -n`.*it cannot accept a connection"
    )


def test_out_of_file_descriptors_idle_kept_alive_connections_make_room(start_server):
    """As at --max-connections: a new client waiting in the queue while every
    descriptor is taken gets one an idle kept-alive connection held."""
    server = start_server(
        "behaviour:application",
        threads=2,
        command=["sh", "-c", 'ulimit -n 64 && exec "$0" "$@"', *CORRAL],
    )
    kept = []
    try:
        for _ in range(70):
            conn = server.connect()
            conn.send_request("GET", "/fixed", {"Host": "x"})
            kept.append(conn)
            if server.grep(r"Cannot accept connections"):
                break
        server.wait_for(r"Cannot accept connections: .*Too many open files")
        # Every descriptor is taken; the ones that were answered sit idle,
        # past the second that makes them fair to close (RECLAIM_MIN_IDLE).
        time.sleep(1.2)
        resp = server.request("GET", "/fixed", timeout=15)
        assert resp.status == 200, resp
        server.wait_for(r"[1-9]\d* idle kept-alive connection\(s\) closed to make room", timeout=5)
    finally:
        for conn in kept:
            conn.close()


def _answer_on_a_new_connection(server) -> bytes:
    """Everything the server sends to a GET on a new connection, up to its close."""
    with socket.create_connection((server.host, server.port), timeout=10) as extra:
        extra.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := extra.recv(4096):
            data += chunk
    return data


def test_max_connections_sheds_with_503(start_server, tmp_path):
    log = tmp_path / "access.log"
    server = start_server(
        "behaviour:application", "--max-connections", "3", "--access-log", str(log), threads=2
    )
    held = []
    try:
        # Three connections whose clients have not sent their request yet fill
        # the worker's allowance (idle kept-alive ones would make room, below).
        for _ in range(3):
            held.append(server.connect())
        time.sleep(0.3)
        # A burst of three more: every one gets 503, and the log's counts add up
        # to all three, the tail of the burst included (reported within a second
        # or two, with no later connection needed to trigger it).
        for _ in range(3):
            data = _answer_on_a_new_connection(server)
            assert data.startswith(b"HTTP/1.1 503 "), data
        pattern = r"Overloaded: (\d+) connection\(s\) turned away with 503"
        assert wait_until(lambda: sum(int(m.group(1)) for m in server.grep(pattern)) == 3, 10), server.log
        # Each with an access log line naming its client.
        shed = lambda: [line for line in log.read_text().splitlines() if '"- - -" 503' in line]
        assert wait_until(lambda: len(shed()) == 3, 10), log.read_text()
        assert all(line.startswith("127.0.0.1 - - [") for line in shed()), shed()
    finally:
        for conn in held:
            conn.close()
    # Once connections close, new ones are served again.
    assert wait_until(lambda: server.request("GET", "/fixed").status == 200, 10)
    assert re.search(r"--max-connections 3", server.log)
    # Over HTTP: nothing about FastCGI, which only the FastCGI listener's lines say.
    assert "FastCGI" not in server.log, server.log


GATE_APP = """
import os, time

def application(environ, start_response):
    query = dict(p.split("=", 1) for p in environ["QUERY_STRING"].split("&") if "=" in p)
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/hold":
        environ["wsgi.errors"].write("hold started\\n")
        environ["wsgi.errors"].flush()
        deadline = time.monotonic() + 120
        while not os.path.exists(query["marker"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [b"released"]
    time.sleep(0.3)
    return [str(os.getpid()).encode()]
"""


def test_a_worker_whose_threads_are_all_busy_leaves_queued_connections_to_a_sibling(start_server, tmp_path):
    """A worker whose only thread holds a long request (a stream, a long poll)
    does not take connections that wait in the accept queue while its
    sibling is busy: they would wait there for the whole long request, while
    the sibling serves the others in a moment (uWSGI's behaviour)."""
    (tmp_path / "gate_app.py").write_text(GATE_APP)
    server = start_server("gate_app:application", workers=2, threads=1, pythonpath=None, cwd=tmp_path)
    marker = tmp_path / "release"
    with ThreadPoolExecutor(7) as pool:
        held = pool.submit(server.request, "GET", f"/hold?marker={marker}", timeout=150)
        server.wait_for(r"hold started")
        shorts = [pool.submit(server.request, "GET", f"/short?id={i}", timeout=150) for i in range(6)]
        done, _ = wait(shorts, timeout=60)
        marker.touch()
        assert held.result().body == b"released"
        assert len(done) == 6, server.log
        assert all(f.result().status == 200 for f in shorts)


def test_a_full_worker_leaves_new_clients_to_a_sibling_with_room(start_server):
    """--max-connections holds per worker, and epoll wakes the same worker for
    most new connections: once it is full, new clients go to the workers that
    have room rather than get 503. Only a server full everywhere sheds."""
    server = start_server("behaviour:application", "--max-connections", "4", workers=2, threads=1)
    held = []
    try:
        # Seven clients that have not sent their request (nothing idle to close).
        for _ in range(7):
            held.append(server.connect())
            time.sleep(0.05)
        resp = server.request("GET", "/pid", timeout=15)
        assert resp.status == 200, resp
        assert not server.grep(r"turned away with 503"), server.log
        # Both workers full now (four each): the next client is turned away.
        held.append(server.connect())
        time.sleep(0.3)
        data = _answer_on_a_new_connection(server)
        assert data.startswith(b"HTTP/1.1 503 "), data
        # The connections handed over are served where they went.
        for conn in held:
            conn.send_request("GET", "/fixed", {"Host": "x"})
            assert conn.read_response().status == 200
    finally:
        for conn in held:
            conn.close()


def test_a_full_worker_passes_new_clients_on_before_closing_idle_ones(start_server):
    """At --max-connections, a worker whose kept-alive connections sit idle
    gives a new client to a sibling with room rather than close one of them:
    its client may be sending its next request at that very moment (a POST
    nginx then answers with 502)."""
    server = start_server("behaviour:application", "--max-connections", "3", workers=2, threads=1)
    conns, pids = [], []
    try:
        for _ in range(6):
            conn = server.connect()
            conn.send_request("GET", "/pid", {"Host": "x"})
            resp = conn.read_response()
            assert resp.status == 200
            conns.append(conn)
            pids.append(resp.body)
            time.sleep(0.05)
        for conn in conns:
            conn.send_request("POST", "/echo", {"Host": "x"}, b"again")
            assert conn.read_response().body == b"again"
        assert sorted(pids.count(p) for p in set(pids)) == [3, 3], pids
    finally:
        for conn in conns:
            conn.close()
    assert not server.grep(r"turned away with 503")


def test_idle_kept_alive_connections_make_room_for_new_ones(start_server):
    """At --max-connections, a new client is not turned away while kept-alive
    connections sit idle (a proxy's pool, browsers): the one idle longest is
    closed to make room, as nginx reuses idle connections. Those in use, or
    still sending a request, are left alone."""
    server = start_server("behaviour:application", "--max-connections", "3", threads=2)
    oldest, newer = server.connect(), server.connect()
    partial = server.connect()
    fresh = []
    try:
        for conn in (oldest, newer):
            conn.send_request("GET", "/fixed", {"Host": "x"})
            assert conn.read_response().status == 200
            time.sleep(0.2)
        partial.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n")  # the rest comes later
        time.sleep(1.3)  # idle past RECLAIM_MIN_IDLE (1 s)
        for gone in (oldest, newer):
            # A new client, kept connected: the longest idle one made room for it.
            conn = server.connect()
            fresh.append(conn)
            conn.send_request("GET", "/fixed", {"Host": "x"})
            assert conn.read_response().status == 200
            assert gone.at_eof(5)
            time.sleep(0.2)
        assert not fresh[0].at_eof(0.5), "the newest idle connection is not the one closed"
        # The slow request was left alone.
        partial.send(b"\r\n")
        assert partial.read_response().status == 200
    finally:
        for conn in (oldest, newer, partial, *fresh):
            conn.close()
    assert not server.grep(r"turned away with 503")


def test_connections_idle_only_a_moment_are_not_closed_to_make_room(start_server):
    """A kept-alive connection whose client sent a request within the last
    second is likely to send the next one as it is closed, which then goes
    unanswered: at --max-connections a new client gets a clear 503 instead,
    and the busy clients lose nothing."""
    server = start_server("behaviour:application", "--max-connections", "2", threads=2)
    busy = [server.connect(), server.connect()]
    try:
        for _ in range(3):
            for conn in busy:
                conn.send_request("POST", "/echo", {"Host": "x"}, b"busy")
                assert conn.read_response().body == b"busy"
        data = _answer_on_a_new_connection(server)
        assert data.startswith(b"HTTP/1.1 503 "), data
        for conn in busy:
            conn.send_request("POST", "/echo", {"Host": "x"}, b"still")
            assert conn.read_response().body == b"still"
        # Idle for longer, one of them makes room.
        time.sleep(1.3)
        assert server.request("GET", "/fixed", timeout=15).status == 200
        assert busy[0].at_eof(5)
    finally:
        for conn in busy:
            conn.close()


def test_connections_held_grow_the_adaptive_pool_and_keep_it(start_server):
    """Threads free but every worker at --max-connections: the pool grows,
    and does not shrink while the connections it holds would not fit in
    one worker fewer."""
    server = start_server(
        "behaviour:application",
        "--workers-min",
        "1",
        "--workers-max",
        "3",
        "--scale-down-idle",
        "1",
        "--max-connections",
        "3",
        workers=None,
        threads=2,
    )
    mark = server.mark()
    kept = []

    def keep_one(i):
        conn = server.connect()
        kept.append(conn)
        conn.send_request("GET", f"/fixed?n={i}", {"Host": "x"})
        assert conn.read_response().status == 200

    try:
        for i in range(3):
            keep_one(i)
        server.wait_for(
            r"Scaling up to 2 worker\(s\): .*3 connection\(s\) held \(at most 3 per worker\)", since=mark
        )
        assert wait_until(lambda: len(server.worker_pids(since=mark)) >= 1, 30), server.log[mark:]
        # Two more, which the new worker takes: five held by two workers.
        for i in range(3, 5):
            keep_one(i)
        # Idle past --scale-down-idle: five connections would not fit in one worker of 3.
        time.sleep(3)
        assert not server.grep(r"Scaling down", since=mark), server.log[mark:]
        for conn in kept[:3]:
            conn.close()
        # Two left, which fit in one worker: the pool shrinks.
        server.wait_for(
            r"Scaling down to 1 worker\(s\): .* and 2 connection\(s\) held", since=mark, timeout=20
        )
    finally:
        for conn in kept:
            conn.close()


def test_adaptive_pool_settles_under_steady_load(start_server):
    """One client sending slow requests back to back uses one thread: the pool may
    grow once, but does not shrink and grow again while the load lasts (a pool
    that shrinks to exactly full is saturated at once)."""
    server = start_server(
        "behaviour:application",
        "--workers-min",
        "1",
        "--workers-max",
        "3",
        "--scale-down-idle",
        "1",
        workers=None,
    )
    mark = server.mark()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert server.request("GET", "/slow?secs=0.3&id=steady", timeout=30).status == 200
    ups = server.grep(r"Scaling up", since=mark)
    assert len(ups) <= 1, server.log[-3000:]
    assert not server.grep(r"Scaling down", since=mark), server.log[-3000:]
    if ups:
        # Once the load stops, the spare worker goes.
        server.wait_for(r"Scaling down to 1 worker", since=mark, timeout=10)


def test_a_wave_of_new_clients_is_served_in_turn_with_the_kept_alive_ones(start_server):
    """One thread and a slow app, under more load than it can take: clients that
    connect while others keep it busy get their first response within the first
    round, not after the earlier clients have been served again and again (the
    last of 24 waited seconds when each pass over the kept-alive connections
    accepted one new one)."""
    server = start_server("behaviour:application", threads=1)
    clients = 24
    socks = []
    order = []  # (client, nth response), in the order they arrived
    sel = selectors.DefaultSelector()
    request = b"GET /slow?secs=0.02 HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        for i in range(clients):
            s = socket.create_connection((server.host, server.port), timeout=10)
            s.sendall(request)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, [i, 0, b""])
            socks.append(s)
        deadline = time.monotonic() + 60
        while len({i for i, _ in order}) < clients and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                state = key.data
                state[2] += key.fileobj.recv(65536)
                while b"slept" in state[2]:
                    _, _, state[2] = state[2].partition(b"slept")
                    state[1] += 1
                    order.append((state[0], state[1]))
                    key.fileobj.sendall(request)
        firsts = {i for i, n in order if n == 1}
        assert firsts == set(range(clients)), order
        # Every client's first response came before any client's third.
        last_first = max(k for k, (_, n) in enumerate(order) if n == 1)
        assert all(n < 3 for _, n in order[:last_first]), order
    finally:
        for s in socks:
            s.close()


def test_memory_of_a_wave_of_unfinished_heads_goes_back_after_it(start_server):
    """Hundreds of clients that each sent most of a large request head and
    left (a scan, a slowloris wave) leave their read buffers free in the
    middle of the heap; the worker gives that memory back once they are gone,
    at the default --max-connections too."""
    server = start_server("behaviour:application")
    pid = server.worker_pids()[0]

    def rss_kib():
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-F%d: %s\r\n" % (j, b"a" * 7000) for j in range(9))
    for _ in range(20):
        assert server.request("GET", "/fixed").status == 200
    before = rss_kib()
    socks = []
    try:
        for _ in range(500):
            s = socket.create_connection((server.host, server.port))
            s.sendall(head[:60_000])
            socks.append(s)
        # Every head read into its buffer (the worker holds them all).
        assert wait_until(lambda: rss_kib() - before > 20_000, 20), rss_kib() - before
    finally:
        for s in socks:
            s.close()
    for _ in range(50):
        assert server.request("GET", "/fixed").status == 200
    # 30 MB stayed resident before (60 KB a client); a few MB at most now.
    assert wait_until(lambda: rss_kib() - before < 10_000, 10), rss_kib() - before


def test_a_pool_grown_to_its_largest_with_ttin_still_reloads(start_server):
    """TTIN stops where a reload still has a slot for each worker's
    replacement (32 workers here): a HUP of the largest pool replaces every
    worker rather than wait for a free slot for good."""
    server = start_server("echo_app:application", workers=24)
    mark = server.mark()
    for _ in range(9):
        server.signal(signal.SIGTTIN)
        time.sleep(0.05)
    server.wait_for(r"Received SIGTTIN: already at the most workers \(32\); ignored", since=mark)
    assert wait_until(lambda: len(_live_workers(server)) == 32, 60), server.log[-3000:]
    old = _live_workers(server)
    mark = server.mark()
    server.signal(signal.SIGHUP)
    assert wait_until(
        lambda: len(_live_workers(server, mark)) == 32 and not old & _live_workers(server), 90
    ), server.log[-3000:]
    assert not server.grep(r"Every worker slot is taken", since=mark)


def test_clients_that_connect_then_send_are_spread_over_the_workers(start_server):
    """Each of three one-thread workers serves one of three slow requests
    whose clients connect first and send a moment later: the worker that took
    the first connection, its thread counted on for that request, hands the
    next ones to siblings with a thread free (it used to take them too, and
    serve them in turn while its siblings sat idle)."""
    server = start_server("behaviour:application", workers=3, threads=1)
    mark = server.mark()
    clients = []
    try:
        for _ in range(3):
            clients.append(socket.create_connection((server.host, server.port), timeout=30))
            time.sleep(0.05)
        for i, c in enumerate(clients):
            c.sendall(
                f"GET /slow?secs=2&id=c{i}&pid=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
        pids = set()
        for c in clients:
            raw = b""
            while chunk := c.recv(4096):
                raw += chunk
            assert raw.startswith(b"HTTP/1.1 200"), raw
            pids.add(raw.rsplit(b" in ", 1)[1])
        assert len(pids) == 3, (pids, server.log[mark:])
    finally:
        for c in clients:
            c.close()
