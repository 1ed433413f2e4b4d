"""The process model: workers, signals, graceful shutdown, crashes, --preload."""

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from front_ends import free_port
from support import APPS, CORRAL, READY_RE, IncompleteResponse, group_members, slow_reader, wait_until


def _pid_of_request(server, target="/pid"):
    resp = server.request("GET", target)
    assert resp.status == 200, resp
    return int(resp.body)


def test_several_workers_share_the_load(start_server):
    server = start_server("behaviour:application", workers=3, threads=1)
    pids = server.worker_pids()
    assert len(set(pids)) == 3
    assert server.proc.pid not in pids
    seen = {_pid_of_request(server) for _ in range(30)}
    # Concurrent slow requests cannot all be served by one single-threaded worker.
    with ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda i: server.request("GET", f"/slow?secs=0.5&id=p{i}"), range(6)))
    assert all(b.status == 200 for b in bodies)
    seen |= {_pid_of_request(server) for _ in range(30)}
    with ThreadPoolExecutor(6) as pool:
        seen |= set(pool.map(lambda i: _pid_of_request(server), range(60)))
    assert seen <= set(pids)
    assert len(seen) >= 2, f"every request went to one worker: {seen}"


class Load:
    """Light background load: one request at a time, new connection each, bounded in time."""

    def __init__(self, server, target="/pid", limit=30.0):
        self.server, self.target, self.limit = server, target, limit
        self.results = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.results.append(self.server.request("GET", self.target, timeout=5).status)
            except (OSError, IncompleteResponse) as e:
                self.results.append(e)
            time.sleep(0.02)

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        return self.results


def test_killed_worker_is_replaced(start_server):
    server = start_server("behaviour:application", workers=2, threads=2)
    before = server.worker_pids()
    load = Load(server)
    time.sleep(0.3)
    victim = before[0]
    mark = server.mark()
    os.kill(victim, signal.SIGKILL)
    ready = server.wait_for(READY_RE.pattern, since=mark)
    new_pid = int(ready[0].group(1))
    assert new_pid not in before
    # The master says which worker died and how.
    died = server.wait_for(rf"\b{victim}\b.*(signal 9|SIGKILL)", since=mark)
    assert died
    time.sleep(0.3)
    load.finish()
    assert 200 in load.results
    # The load sends one request at a time, so at most the one in flight on
    # the victim can fail.
    failures = [r for r in load.results if r != 200]
    assert len(failures) <= 1, failures
    for _ in range(20):
        assert _pid_of_request(server) in set(before[1:]) | {new_pid}
    assert server.running()
    assert not any(p == victim for p in group_members(server.pgid))


@pytest.mark.parametrize("code", [1, 3])
def test_a_serving_worker_that_exits_is_replaced(start_server, code):
    """Exit code 3 says "could not load the application" only while a worker boots:
    an app that exits with it while serving gets its worker replaced like any other."""
    server = start_server("behaviour:application", workers=2)
    before = set(server.worker_pids())
    mark = server.mark()
    with pytest.raises((OSError, IncompleteResponse)):
        server.request("GET", f"/exit?code={code}", timeout=10)
    died = server.wait_for(
        rf"Worker \d+ \(pid (\d+)\) exited with code {code} while serving GET /exit", since=mark
    )
    assert int(died[0].group(1)) in before
    server.wait_for(READY_RE.pattern, since=mark)
    assert server.running()
    assert not server.grep("shutting down", since=mark)
    assert server.request("GET", "/fixed").status == 200


def test_workers_dying_right_after_they_start_are_replaced_ever_more_slowly(start_server):
    """A worker that dies moments after it became ready, again and again, is
    not replaced several times a second for good (uWSGI sleeps between such
    respawns too): after three in a row the next waits, 100 ms doubling."""
    server = start_server("dies_after_ready:application", workers=1, wait=False)
    server.wait_for(
        r"Workers are dying within 2s of starting \(3 in a row\); the next starts in 100ms", timeout=30
    )
    server.wait_for(
        r"Workers are dying within 2s of starting \(4 in a row\); the next starts in 200ms", timeout=30
    )
    assert server.running()


def test_killed_worker_fails_only_its_own_request(start_server):
    server = start_server("behaviour:application", workers=1, threads=2)
    (victim,) = server.worker_pids()
    mark = server.mark()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(server.request, "GET", "/slow?secs=30&id=victim", timeout=60)
        server.wait_for("slow request started: victim", since=mark)
        load = Load(server)
        time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        # The master names the requests the worker was serving when it died:
        # the slow one, and the load's request if one was in flight on the
        # other thread at that instant.
        assert server.wait_for(
            rf"\b{victim}\b.*while serving .*GET /slow\?secs=30&id=victim \(\d+ ms in\)", since=mark
        )
        server.wait_for(READY_RE.pattern, since=mark)
        time.sleep(0.3)
        results = load.finish()
        # The slow request dies with its worker: the client sees the
        # connection end without a response.
        with pytest.raises((OSError, IncompleteResponse)):
            slow.result(timeout=30)
    # Requests queued while no worker was alive wait in the listen backlog and
    # are answered by the replacement; only the in-flight load request (if it
    # was on the victim at that instant) may fail besides the slow one.
    failures = [r for r in results if r != 200]
    assert len(failures) <= 1, failures
    assert results.count(200) >= 2
    assert _pid_of_request(server) != victim


def _in_flight_then_signal(server, send_signal, n=3, secs=2):
    """Starts `n` slow requests, waits until the app runs them all, then signals; returns the responses."""
    mark = server.mark()
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(server.request, "GET", f"/slow?secs={secs}&id=r{i}", timeout=30) for i in range(n)
        ]
        server.wait_for(r"slow request started: r\d", count=n, since=mark)
        send_signal()
        responses = [f.result(timeout=60) for f in futures]
    return responses


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "killpg"])
def test_graceful_stop_finishes_in_flight_requests(start_server, how):
    server = start_server("behaviour:application", workers=2, threads=2)
    if how == "killpg":

        def send():
            os.killpg(server.pgid, signal.SIGTERM)

    else:

        def send():
            server.signal(getattr(signal, how))

    responses = _in_flight_then_signal(server, send)
    assert [r.status for r in responses] == [200, 200, 200]
    assert sorted(r.body for r in responses) == [b"slept r0", b"slept r1", b"slept r2"]
    assert server.wait_exit(30) == 0, server.log
    assert wait_until(lambda: not group_members(server.pgid), timeout=10)


def test_a_graceful_stop_lets_the_apps_own_threads_finish(start_server, tmp_path):
    """As Python's own exit does, a worker stopping waits for the threads the app
    started without daemon=True (the work they were started for is the app's)."""
    server = start_server("behaviour:application", workers=1, threads=1)
    marker = tmp_path / "written"
    assert server.request("GET", f"/background?secs=1.5&marker={marker}").body == b"started"
    mark = server.mark()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0, server.log
    assert marker.read_text() == "done"
    server.wait_for(r"Worker waiting for 1 thread the app started \(not daemon\) to finish", since=mark)


def test_a_worker_stops_at_once_when_the_app_first_imported_threading_in_a_request(start_server):
    """threading, first imported by a serving thread, takes that thread for the
    main one and counts it among the threads to wait for at exit: a stop waited
    for a thread that never ends, until the master's kill."""
    server = start_server("late_threading:application", "--graceful-timeout", "600", workers=1, threads=1)
    assert server.request("GET", "/").status == 200
    mark = server.mark()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0, server.log
    server.wait_for("Worker stopped gracefully", since=mark)
    assert "Worker waiting for" not in server.log[mark:], server.log


def test_an_app_that_takes_the_workers_signals_at_import_gets_them_back_with_a_warning(start_server):
    """The app's handler would never run (a worker's main thread runs no Python)
    and the worker would not hear the master's TERM: corral puts its own back."""
    server = start_server("signal_app:application", workers=1)
    server.wait_for(
        r"\[WARNING\] The app set its own handler for SIGTERM, SIGUSR1; a worker's signals are the server's"
    )
    assert server.request("GET", "/").status == 200
    mark = server.mark()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0, server.log
    server.wait_for("Worker stopped gracefully", since=mark)
    assert "graceful timeout" not in server.log[mark:], server.log


def test_an_app_that_blocks_the_workers_signals_or_drops_the_crash_handler_at_import(start_server):
    """A mask set at import would keep the master's TERM from the worker for
    good (a reload or stop waits out --graceful-timeout, then kills it), and
    SIGSEGV at its default would cut every request without a word: both
    are put back, with a warning."""
    server = start_server("masking_app:application", "--graceful-timeout", "60", workers=1, threads=2)
    server.wait_for(r"\[WARNING\] The app blocked SIGTERM, SIGINT, SIGQUIT, SIGUSR1 while it loaded")
    server.wait_for(
        r"\[WARNING\] The app set SIGSEGV back to its default action; corral's crash handler and faulthandler are back"
    )
    mark = server.mark()
    with contextlib.suppress(OSError, IncompleteResponse):
        server.request("GET", "/segfault")
    server.wait_for(r"Fatal Python error: Segmentation fault", since=mark)
    server.wait_for(
        r"Worker crashed: SIGSEGV in thread \d \(the app.s corral-thread-\d\) while it served GET /segfault",
        since=mark,
    )
    assert wait_until(lambda: _serves(server), timeout=30)
    mark = server.mark()
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0, server.log
    server.wait_for("Worker stopped gracefully", since=mark)
    # Not held until --graceful-timeout's kill.
    assert time.monotonic() - started < 30, server.log[mark:]


def test_a_worker_held_at_exit_by_the_apps_thread_is_killed_and_the_log_says_why(start_server):
    """Its requests are over, but Python's exit waits for a non-daemon thread
    the app started: at --graceful-timeout the master kills it, and says what
    held it rather than that it was idle."""
    server = start_server("behaviour:application", "--graceful-timeout", "2", workers=1)
    assert server.request("GET", "/non-daemon-thread").body == b"started"
    mark = server.mark()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0, server.log
    server.wait_for(r"Worker stopped gracefully", since=mark)
    assert server.grep(
        r"Worker 0 \(pid \d+\) was killed by signal 9 \(SIGKILL\): it had finished its requests, but its "
        r"process did not end: a non-daemon thread the app started, or an atexit handler, kept it",
        since=mark,
    ), server.log[mark:]


def test_a_retiring_worker_held_by_the_apps_thread_is_killed_at_the_graceful_timeout(start_server):
    """A reload's old worker has finished its requests, but an app thread (not
    a daemon) holds its exit: the master kills it at --graceful-timeout, as
    the README says, not some seconds later. The thread here would end 5 s
    after the reload, later than the timeout (1 s) and sooner than the kill
    used to come (6 s)."""
    server = start_server("behaviour:application", "--graceful-timeout", "1", workers=1)
    old = server.worker_pids()
    assert server.request("GET", "/non-daemon-thread?5").body == b"started"
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(
        rf"Worker pid {old[0]} did not end within the graceful timeout \(it had finished its requests, but its "
        r"process did not end: a non-daemon thread the app started, or an atexit handler, kept it\); killing it",
        since=mark,
        timeout=30,
    )
    assert server.request("GET", "/").status == 200


def _sigpipe_ignored(pid):
    return bool(_signal_masks(pid)[1] & (1 << (signal.SIGPIPE - 1)))


def test_an_app_that_sets_sigpipe_to_its_default_does_not_let_a_leaving_client_kill_the_worker(start_server):
    """signal.signal(SIGPIPE, SIG_DFL) at import: a client that disconnects
    from a streamed response would kill the worker, and with it another
    client's request. SIGPIPE is ignored again, with a warning."""
    server = start_server("sigpipe_app:application", workers=1, threads=2)
    server.wait_for(r"\[WARNING\] The app set its own disposition for SIGPIPE .*it is ignored again")
    [pid] = server.worker_pids()
    assert _sigpipe_ignored(pid)
    results = []
    slow = threading.Thread(target=lambda: results.append(server.request("GET", "/slow")))
    slow.start()
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    slow.join(30)
    assert results and results[0].status == 200 and results[0].body == f"slow {pid}".encode(), server.log
    server.wait_for(r"GET /stream from 127\.0\.0\.1:\d+: client disconnected")
    assert "killed by signal 13" not in server.log, server.log
    assert server.worker_pids() == [pid]


def test_a_preloaded_app_that_takes_the_masters_signals_gets_them_back_with_a_warning(start_server):
    """Loaded in the master, the app sets SIGPIPE to its default (a log reader
    that stops would kill the master) and its own SIGTERM handler, and starts
    a thread, to which the kernel gives the master's TERM. SIGPIPE is ignored
    again, and the master's handler, which passes TERM on to its main
    thread, replaces the app's (which would never run), both with a warning
    (the replacement used to be silent)."""
    server = start_server("sigpipe_app:application", "--preload", "--env", "SIGPIPE_APP_TERM=1", workers=1)
    server.wait_for(r"\[WARNING\] The app, preloaded, set its own handler for SIGTERM; the master's signals")
    server.wait_for(r"\[WARNING\] The app set its own disposition for SIGPIPE")
    assert _sigpipe_ignored(server.proc.pid)
    assert all(_sigpipe_ignored(p) for p in server.worker_pids())
    assert server.request("GET", "/slow").status == 200
    mark = server.mark()
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0, server.log[mark:]
    server.wait_for("Shutdown complete", since=mark)


def test_a_worker_that_crashes_logs_its_python_stacks_first(start_server):
    """A segfault in C code called by the app: the log has the Python stack that
    led there (faulthandler's), then the master's line, and a new worker serves."""
    server = start_server("behaviour:application", workers=1)
    mark = server.mark()
    with contextlib.suppress(OSError, IncompleteResponse):
        server.request("GET", "/segfault")
    server.wait_for(r"killed by signal 11 \(SIGSEGV\) while serving GET /segfault", since=mark)
    server.wait_for(r"Fatal Python error: Segmentation fault", since=mark)
    server.wait_for(r'File ".*behaviour\.py", line \d+ in segfault', since=mark)
    assert wait_until(lambda: _serves(server), timeout=30)


def test_a_crashed_request_has_its_access_log_line(start_server, tmp_path):
    """Its client got a 500, and the access log says so, as for any request
    (with or without --timeout)."""
    access = tmp_path / "access.log"
    server = start_server("behaviour:application", "--access-log", str(access), workers=1, threads=2)
    assert server.request("GET", "/segfault").status == 500
    assert wait_until(lambda: access.exists() and '"GET /segfault HTTP/1.1" 500' in access.read_text(), 10), (
        access.read_text() if access.exists() else "no access log"
    )


def _served_by_the_replacement(old, *conns):
    """Requests sent on connections a crashed worker (pid `old`) holds are
    answered by its replacement."""
    for i, conn in enumerate(conns):
        conn.send_request("POST", "/pid", body=bytes([ord("x") + i]) * 1000)
    for conn in conns:
        resp = conn.read_response()
        assert resp.status == 200, resp
        assert int(resp.body) not in (old, 0)


@pytest.mark.parametrize("crash", ["/segfault", "/segfault-without-gil"])
def test_a_crash_loses_only_the_request_that_crashed(start_server, crash):
    """A segfault in one thread: its client gets a 500; a kept-alive connection
    and a new one whose requests wait unread go to the replacement and are
    served there. A request on another thread finishes if the crash left the
    GIL free, and is cut if the crashed thread held it (it can never end)."""
    server = start_server("behaviour:application", workers=1, threads=2)
    old = _pid_of_request(server)
    with (
        server.connect() as kept,
        server.connect() as fresh,
        server.connect() as slow,
        server.connect() as bad,
    ):
        kept.send_request("GET", "/pid")
        assert int(kept.read_response().body) == old
        mark = server.mark()
        slow.send_request("GET", "/slow?secs=2&id=other")
        server.wait_for("slow request started: other", since=mark)
        bad.send_request("GET", crash)
        resp = bad.read_response()
        assert resp.status == 500, resp
        server.wait_for(
            rf"Worker crashed: SIGSEGV in thread \d \(the app.s corral-thread-\d\) while it served GET {crash}; the client got 500",
            since=mark,
        )
        # Sent while the crashed worker still holds both connections.
        _served_by_the_replacement(old, kept, fresh)
        if crash == "/segfault":
            # ctypes.string_at holds the GIL, so the other thread's request cannot end.
            assert slow.at_eof(30)
        else:
            resp = slow.read_response()
            assert (resp.status, resp.body) == (200, b"slept other"), resp
    server.wait_for(r"Worker handed 2 connection\(s\) to other workers after the crash", since=mark)
    server.wait_for(
        rf"Worker 0 \(pid {old}\) was killed by signal 11 \(SIGSEGV\) while serving .*GET {crash}", since=mark
    )
    server.wait_for(r"Fatal Python error: Segmentation fault", since=mark)
    assert server.grep(r"\[ERROR\] Worker crashed", since=mark)


@pytest.mark.parametrize("gil", [False, True])
def test_a_crash_in_a_thread_of_the_apps_loses_no_connection(start_server, gil):
    """A segfault in a thread the app started (no request of its own): the
    request in flight on a serving thread finishes if the crash left the
    GIL free (it was cut: the worker died at once), and kept-alive and new
    connections go to the replacement, as for a crash on a serving thread."""
    server = start_server("behaviour:application", workers=1, threads=2)
    old = _pid_of_request(server)
    with server.connect() as kept, server.connect() as slow, server.connect() as fresh:
        kept.send_request("GET", "/pid")
        assert int(kept.read_response().body) == old
        mark = server.mark()
        slow.send_request("GET", "/slow?secs=2&id=other")
        server.wait_for("slow request started: other", since=mark)
        target = "/segfault-in-a-thread" + ("?gil=1" if gil else "")
        assert server.request("GET", target).body == b"started"
        server.wait_for(r"Worker crashed: SIGSEGV in a thread the app started", since=mark)
        _served_by_the_replacement(old, kept, fresh)
        if gil:
            assert slow.at_eof(30)
        else:
            resp = slow.read_response()
            assert (resp.status, resp.body) == (200, b"slept other"), resp
    server.wait_for(rf"Worker 0 \(pid {old}\) was killed by signal 11 \(SIGSEGV\)", since=mark)
    server.wait_for(r"Fatal Python error: Segmentation fault", since=mark)


def test_the_master_leaves_the_exit_status_of_the_apps_commands_to_the_app(start_server, tmp_path):
    """A thread of a --preload import (in the master) runs commands that
    fail: each one's exit status reaches the app. The master reaped every
    child that ended, workers or not, and subprocess then saw none (a
    returncode of 0 for a command that failed)."""
    status = tmp_path / "status"
    start_server(
        "subprocess_at_import:application",
        "--preload",
        workers=1,
        env={"CORRAL_TEST_STATUS_FILE": str(status)},
    )
    (tmp_path / "status.go").touch()  # the worker is up: no fork meanwhile
    assert wait_until(lambda: status.exists() and len(status.read_text().split()) == 20, 30)
    assert status.read_text().split() == ["3"] * 20


@pytest.mark.parametrize("preload", [False, True])
def test_descriptors_0_to_2_the_import_closed_are_not_the_servers_own(start_server, preload):
    """An import that closes standard input, output and error: the epoll set,
    a listener or the hand-over inbox took those numbers, and the app's
    print() wrote into them (a 500, or lost in the server's wake-ups). They
    are /dev/null again, with a warning."""
    server = start_server("close_std_at_import:application", *(["--preload"] if preload else []), workers=1)
    for _ in range(3):
        resp = server.request("GET", "/")
        assert (resp.status, resp.body) == (200, b"printed"), resp
    worker = server.worker_pids()[0]
    for pid in (worker, server.proc.pid) if preload else (worker,):
        assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null"] * 3
    assert server.grep(
        r"\[WARNING\] The app closed standard input, standard output, standard error while it loaded"
    )


def test_a_python_signal_handler_that_cannot_run_in_a_worker_is_warned_about(start_server):
    """A handler the app set at import for a signal that is not the worker's
    own (SIGALRM here): Python runs it on the main thread only, which in a
    worker runs no Python while it serves, so it never runs; the log says
    so (it said nothing)."""
    server = start_server("alarm_app:application", workers=1)
    assert server.request("GET", "/").status == 200
    warned = server.grep(r"\[WARNING\] The app set Python handlers for (.*) while it loaded")
    assert [m.group(1) for m in warned] == ["SIGALRM"], server.log


def test_a_thread_of_the_apps_crashing_while_the_app_loads_ends_the_worker_at_once(start_server):
    """A crash in a thread the app's import started, before the worker
    serves: no main loop would take it, and the thread holds the GIL the
    import waits for, so the worker dies of it at once, as it did, rather
    than hang until --timeout."""
    server = start_server("thread_crash_at_import:application", "--timeout", "120", workers=1, wait=False)
    server.wait_for(r"was killed by signal 11 \(SIGSEGV\) while booting", timeout=30)
    assert not server.grep(r"Worker crashed: SIGSEGV in a thread the app started"), server.log


def test_the_stack_of_a_request_past_timeout_that_runs_python_all_along(start_server):
    """Its frames change all the time; the stack is read in a copy of the worker
    taken at one instant, so it is whole, and the worker is replaced as usual."""
    server = start_server("behaviour:application", "--timeout", "1", workers=1, threads=2)
    mark = server.mark()
    assert server.request("GET", "/spin?secs=30", timeout=30).status == 504
    server.wait_for(r"Request timeout: GET /spin\?secs=30 ran for", since=mark)
    assert server.grep(r'behaviour\.py", line \d+ in (spin|_step)', since=mark), server.log
    server.wait_for(r"is to be replaced because a request ran past --timeout", since=mark, timeout=30)
    assert wait_until(lambda: _serves(server), timeout=30)


def test_timeout_leaves_out_the_time_spent_waiting_on_a_slow_client(start_server):
    """A slow upload or download is the client's doing (bounded by
    --socket-timeout), not a stuck app: it is served whole, past --timeout,
    and the worker stays."""
    server = start_server("behaviour:application", "--timeout", "1", workers=1, threads=1)
    worker = server.worker_pids()
    mark = server.mark()
    piece = os.urandom(20_000)
    with server.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(piece) * 30))
        for _ in range(30):
            conn.send(piece)
            time.sleep(0.1)
        resp = conn.read_response()
    assert resp.status == 200
    assert resp.body == piece * 30
    body = os.urandom(4 << 20)
    conn = slow_reader(server)
    with conn:
        conn.send_request("POST", "/echo", {"Host": "x"}, body)
        head = conn.read_head()
        assert head.status == 200
        got = b""
        while len(got) < len(body):
            got += conn.read_exact(min(65536, len(body) - len(got)))
            time.sleep(0.05)
    assert got == body
    assert not server.grep(r"Request timeout", since=mark), server.log
    assert server.request("GET", "/pid").body.decode() == str(worker[0])


def test_a_reload_hands_kept_alive_connections_to_workers_that_can_read_them(start_server):
    """A draining worker passes its idle kept-alive connections to a sibling:
    not to one whose only thread is in a request that will pass --timeout,
    which would never read them before it is replaced."""
    server = start_server("behaviour:application", "--timeout", "3", workers=2, threads=1)
    server.wait_for(r"Worker ready", count=2)
    mark = server.mark()
    hung = server.connect()
    hung.send_request("GET", "/slow?secs=60&id=hung")
    server.wait_for("slow request started: hung", since=mark)
    conns = [server.connect() for _ in range(20)]
    try:
        for conn in conns:
            conn.send_request("GET", "/pid")
            assert conn.read_response().status == 200
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"handed \d+ connection\(s\) to other workers", since=mark, timeout=20)
        for conn in conns:
            conn.send_request("GET", "/pid")
        for conn in conns:
            assert conn.read_response().status == 200
    finally:
        for conn in [hung, *conns]:
            conn.close()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_draining_worker_answers_the_requests_a_client_pipelined(start_server, framing):
    """Requests already sent behind the one in flight when the worker starts
    to drain are answered before the connection closes, also behind one
    whose body is chunked (whose end is found only by decoding it)."""
    server = start_server("behaviour:application", workers=1, threads=2)
    mark = server.mark()
    second = {
        "length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecond",
        "chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nsec\r\n3;x=y\r\nond\r\n0\r\n\r\n",
    }[framing]
    with server.connect() as conn:
        conn.send(
            b"POST /slow?secs=1&id=first HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            + second
            + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nthird"
        )
        server.wait_for("slow request started: first", since=mark)
        server.signal(signal.SIGHUP)
        responses = [conn.read_response() for _ in range(3)]
        assert conn.at_eof()
    assert [r.body for r in responses] == [b"slept first", b"second", b"third"]
    assert [r.header("Connection") for r in responses] == [None, None, "close"]


def _serves(server):
    try:
        return server.request("GET", "/fixed", timeout=5).status == 200
    except OSError:
        return False


def test_graceful_stop_refuses_new_connections(start_server):
    server = start_server("behaviour:application", workers=1, threads=2)
    mark = server.mark()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.request, "GET", "/slow?secs=2&id=last", timeout=30)
        server.wait_for("slow request started: last", since=mark)
        server.signal(signal.SIGTERM)
        # Once the listener is closed new connections are refused (the in-flight one still finishes).
        assert wait_until(lambda: _refused(server), timeout=10)
        assert future.result(timeout=30).status == 200
    assert server.wait_exit(30) == 0


def test_a_graceful_stop_names_the_requests_its_timeout_cuts(start_server):
    server = start_server("behaviour:application", "--graceful-timeout", "1", workers=1, threads=2)
    mark = server.mark()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.request, "GET", "/slow?secs=30&id=cut", timeout=30)
        server.wait_for("slow request started: cut", since=mark)
        server.signal(signal.SIGTERM)
        # The worker says it as it stops, or the master as it kills it at the
        # same deadline, whichever comes first.
        server.wait_for(
            r"(Worker stopping with 1 connection\(s\) still open after the graceful timeout|was killed by "
            r"signal 9 \(SIGKILL\)) while serving GET /slow\?secs=30&id=cut \(\d+ ms in\)",
            since=mark,
        )
        with contextlib.suppress(OSError, IncompleteResponse):
            future.result(timeout=30)
    server.wait_exit(30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT])
def test_requests_cut_at_the_graceful_timeout_end_as_cut_for_their_clients_and_in_the_logs(
    start_server, tmp_path, sig
):
    """At --graceful-timeout of a stop (and at a quick stop), each request still running ends for
    its client as one past --timeout does: 503 if nothing was sent, and a
    reset if its response had started, so that no client or front end takes
    a truncated body for a whole one (a plain close ended a cut stream as if
    it were complete). Each gets its access log line and a line naming its
    client, and a request no thread had begun is named too."""
    access = tmp_path / "access.log"
    marker = tmp_path / "never"
    server = start_server(
        "behaviour:application", "--graceful-timeout", "2", "--access-log", str(access), workers=1, threads=2
    )
    mark = server.mark()
    quiet = server.connect(timeout=30)
    streaming = server.connect(timeout=30)
    waiting = server.connect(timeout=30)
    try:
        quiet.send_request("GET", "/slow?secs=60&id=quiet", {"Host": "x"})
        server.wait_for("slow request started: quiet", since=mark)
        streaming.send_request("GET", f"/pause?marker={marker}", {"Host": "x"})
        head = streaming.read_head()
        assert head.status == 200
        assert streaming.read_line() == b"6"  # the first chunk's size line
        waiting.send_request("GET", "/fixed", {"Host": "x"})
        server.signal(sig)
        resp = quiet.read_response()
        assert resp.status == 503, resp
        # Reset: the bytes after the first chunk never end the body.
        with pytest.raises((ConnectionResetError, IncompleteResponse)):
            streaming.sock.settimeout(30)
            while True:
                data = streaming.sock.recv(65536)
                if not data:
                    raise AssertionError("a plain end of stream, not a reset: " + repr(streaming.buf))
                assert not data.endswith(b"0\r\n\r\n")
        assert waiting.at_eof(30)
    finally:
        for conn in (quiet, streaming, waiting):
            conn.close()
    assert server.wait_exit(30) == 0
    when = "Graceful timeout" if sig == signal.SIGTERM else "Quick stop"
    server.wait_for(
        when + r": GET /slow\?secs=60&id=quiet from 127\.0\.0\.1:\d+ cut [\d.]+ s in: the client got 503",
        since=mark,
    )
    server.wait_for(
        when + r": GET /pause\?marker=\S+ from 127\.0\.0\.1:\d+ cut [\d.]+ s in: its response had "
        r"started, so the connection was cut",
        since=mark,
    )
    # A quick stop takes nothing more from the accept queue, where the third
    # request may still wait (the kernel refuses it as the listener closes);
    # a graceful stop takes what waits there, and names it.
    if sig == signal.SIGTERM:
        server.wait_for(
            when + r": 1 request\(s\) no thread had begun are not served; their connections close "
            r"unanswered \(from 127\.0\.0\.1:\d+\)",
            since=mark,
        )
    assert not server.grep(r"killing them|SIGKILL", since=mark), server.log[mark:]
    logged = access.read_text()
    assert re.search(r'"GET /slow\?secs=60&id=quiet HTTP/1\.1" 503 ', logged), logged
    assert re.search(r'"GET /pause\?marker=\S+ HTTP/1\.1" 200 ', logged), logged


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT])
def test_a_response_cut_while_it_waits_on_a_slow_reader_is_reset_and_logged_as_sent(
    start_server, tmp_path, sig
):
    """The cut of a stop finds the request's thread inside a write that waits
    for a client that reads slowly (the usual case for a long download): the
    connection is reset all the same, not ended, which for a body that ends
    with the connection (HTTP/1.0 here; SCGI and uwsgi to Apache) would pass
    the truncated body for a whole one; its access log line has the status
    and the bytes the client got."""
    (tmp_path / "blocks_app.py").write_text(
        "import time\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    for _ in range(4000):\n"
        "        yield b'x' * 65536\n"
        "        time.sleep(0.01)\n"
    )
    access = tmp_path / "access.log"
    server = start_server(
        "blocks_app:application",
        "--graceful-timeout",
        "2",
        "--access-log",
        str(access),
        "--access-log-format",
        "%(r)s %(s)s %(B)s",
        workers=1,
        threads=1,
        pythonpath=None,
        cwd=tmp_path,
    )
    mark = server.mark()
    with server.connect(timeout=30) as conn:
        # Nothing read until the worker is gone: its writes wait for room.
        conn.send_request("GET", "/blocks", {"Host": "x"}, version="HTTP/1.0")
        time.sleep(0.5)
        server.signal(sig)
        server.wait_for(
            r"(Graceful timeout|Quick stop): GET /blocks from 127\.0\.0\.1:\d+ cut ",
            since=mark,
        )
        assert server.wait_exit(30) == 0
        with pytest.raises(ConnectionResetError):
            while conn.sock.recv(1 << 20):
                pass
    line = access.read_text().strip()
    request, status, sent = line.rsplit(" ", 2)
    assert (request, status) == ("GET /blocks HTTP/1.0", "200"), line
    assert int(sent) > 0, line
    assert not server.grep(r"client disconnected|returned after all", since=mark), server.lines[mark:]


def test_a_worker_stopped_with_sigstop_is_killed_and_replaced_after_the_timeout(start_server):
    """A worker that cannot end a request past --timeout itself, because it
    does not run at all (SIGSTOP, a frozen cgroup, a debugger holding it),
    is killed by the master once it has not been heard from for longer than
    --timeout, as gunicorn's master kills it, and replaced: its requests
    would hang for good."""
    server = start_server("behaviour:application", "--timeout", "2", workers=1, threads=1)
    (stopped,) = server.worker_pids()
    mark = server.mark()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.request, "GET", "/slow?secs=1&id=frozen", timeout=60)
        server.wait_for("slow request started: frozen", since=mark)
        os.kill(stopped, signal.SIGSTOP)
        try:
            server.wait_for(
                rf"Worker 0 \(pid {stopped}\) was not heard from for [\d.]+ s, past --timeout 2s \(stopped with "
                r"SIGSTOP, frozen, or held by a debugger\?\) while serving GET /slow\?secs=1&id=frozen \(\d+ ms in\); "
                r"killing it",
                since=mark,
                timeout=30,
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        with pytest.raises((OSError, IncompleteResponse)):
            future.result(timeout=30)
    server.wait_for(READY_RE.pattern, since=mark, timeout=30)
    assert server.request("GET", "/fixed").status == 200
    assert stopped not in server.worker_pids(since=mark)


def test_a_timeout_names_the_stuck_thread_as_the_app_does(start_server, tmp_path):
    """The thread a --timeout line names is the one the app knows by that
    number (its threading name), not the one before it."""
    (tmp_path / "named_app.py").write_text(
        "import threading, time\n"
        "def application(environ, start_response):\n"
        "    environ['wsgi.errors'].write(f'stuck in {threading.current_thread().name}\\n')\n"
        "    environ['wsgi.errors'].flush()\n"
        "    time.sleep(30)\n"
        "    start_response('200 OK', [])\n"
        "    return [b'late']\n"
    )
    server = start_server(
        "named_app:application", "--timeout", "1", workers=1, threads=2, pythonpath=None, cwd=tmp_path
    )
    assert server.request("GET", "/", timeout=30).status == 504
    (name,) = re.findall(r"stuck in corral-thread-(\d)", server.log)
    server.wait_for(rf"Request timeout: GET / ran for .* thread {name} \(the app's corral-thread-{name}\);")


def test_a_timeout_shorter_than_the_heartbeat_kills_no_idle_worker(start_server):
    """Workers say they live four times a second: a --timeout below that does
    not make the master take an idle worker for a stopped one."""
    server = start_server("behaviour:application", "--timeout", "0.2", workers=1)
    time.sleep(3)
    assert server.request("GET", "/fixed").status == 200
    assert not server.grep(r"not heard from"), server.log


PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")


@pytest.mark.skipif(
    not (PIDS_CGROUPS.is_dir() and os.access(PIDS_CGROUPS, os.W_OK)),
    reason="needs a writable cgroup v1 pids hierarchy",
)
def test_a_fork_refused_by_a_limit_on_processes_is_retried_with_a_growing_wait(start_server, tmp_path):
    """A worker that cannot be forked (EAGAIN under systemd's TasksMax or a
    container's pids limit) is tried again with a doubling wait, one line
    each, not on every pass of the master's loop (ten lines a second per
    missing worker), and starts once the limit allows it."""
    group = PIDS_CGROUPS / f"corral-test-{os.getpid()}-{tmp_path.name}"
    group.mkdir()
    # The master and its workers in the group, from their start.
    command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *CORRAL]
    server = start_server("behaviour:application", command=command, workers=1, threads=1)
    try:
        (victim,) = server.worker_pids()
        mark = server.mark()
        (group / "pids.max").write_text("1")
        os.kill(victim, signal.SIGKILL)
        server.wait_for(r"Cannot fork worker 0: .*failure 3 in a row", since=mark, timeout=30)
        waits = re.findall(
            r"Cannot fork worker 0: .*failure (\d+) in a row.*trying again in (\S+)",
            "\n".join(server.lines[mark:]),
        )
        assert waits[:3] == [("1", "200ms"), ("2", "400ms"), ("3", "800ms")], waits
        (group / "pids.max").write_text("max")
        server.wait_for(READY_RE.pattern, since=mark, timeout=30)
        assert server.request("GET", "/fixed").status == 200
    finally:
        (group / "pids.max").write_text("max")
        server.signal(signal.SIGTERM)
        server.wait_exit(30)
        group.rmdir()


def _refused(server):
    try:
        server.request("GET", "/fixed", timeout=2)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except OSError:
        return False
    return False


def test_sigquit_stops_promptly(start_server):
    server = start_server("behaviour:application", workers=2, threads=2)
    started = time.monotonic()
    server.signal(signal.SIGQUIT)
    server.wait_exit(10)
    assert time.monotonic() - started < 10
    assert wait_until(lambda: not group_members(server.pgid), timeout=10)


@pytest.mark.parametrize(
    ("how", "args"),
    [("SIGQUIT", ()), ("SIGINT", ("--sigint", "quick")), ("killpg-SIGINT", ("--sigint", "quick"))],
)
def test_quick_stop_does_not_wait_for_slow_requests(start_server, how, args):
    server = start_server("behaviour:application", *args, workers=1, threads=2)
    mark = server.mark()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(server.request, "GET", "/slow?secs=20&id=q", timeout=30)
        server.wait_for("slow request started: q", since=mark)
        started = time.monotonic()
        if how.startswith("killpg"):
            # Ctrl-C in a terminal: the master and every worker get INT at once.
            os.killpg(server.pgid, signal.SIGINT)
        else:
            server.signal(getattr(signal, how))
        server.wait_exit(10)
        assert "stopping now" in server.log, server.log
        assert time.monotonic() - started < 10
        try:
            resp = future.result(timeout=30)
        except (OSError, IncompleteResponse):
            resp = None
    # The slow request was cut off, not served in full, and the log says which.
    assert resp is None or not (resp.status == 200 and resp.complete), resp
    assert re.search(
        r"\[WARNING\] Worker exiting at once \(quick stop\) while serving GET /slow\?secs=20&id=q \(\d+ ms in\)",
        server.log,
    ), server.log


def test_group_stop_with_shutdown_delay_keeps_workers_serving(start_server):
    """TERM to the whole process group (systemd's KillMode=control-group,
    kill -- -PGID) with --shutdown-delay: the workers serve on through the
    delay as the master does, rather than leave its listeners with nobody
    accepting (connections queued there were reset when the delay ended)."""
    server = start_server("behaviour:application", "--shutdown-delay", "3", workers=2)
    mark = server.mark()
    os.killpg(server.pgid, signal.SIGTERM)
    server.wait_for(r"still serving for", since=mark)
    server.wait_for(r"serving on with it for .* until it stops the workers", count=2, since=mark)
    started = time.monotonic()
    served = 0
    # Well inside the delay: new connections, each answered.
    while time.monotonic() - started < 2:
        assert server.request("GET", "/fixed", timeout=5).status == 200
        served += 1
    assert served > 0
    assert not server.grep(r"Worker draining", since=mark), server.log
    assert server.wait_exit(30) == 0
    # Once the master stopped them, the workers drained as usual.
    assert len(server.grep(r"Worker draining", since=mark)) == 2, server.log


def test_a_masters_signal_sent_to_a_worker_is_logged_and_ignored(start_server):
    """HUP (or TTIN, TTOU, WINCH) sent to a worker's pid by mistake: the
    worker serves on, nothing reloads, and the log says why nothing happened
    and where the signal should go (it was ignored without a word)."""
    server = start_server("behaviour:application", workers=2)
    victim = server.worker_pids()[0]
    for sig, name in ((signal.SIGHUP, "SIGHUP"), (signal.SIGTTIN, "SIGTTIN")):
        mark = server.mark()
        os.kill(victim, sig)
        server.wait_for(
            rf"\[INFO\] Worker received {name} from pid {os.getpid()}: ignored, as the master's signal \(the "
            rf"master is pid {server.proc.pid}; a worker acts on TERM, INT, QUIT and USR1\): pid={victim}",
            since=mark,
        )
    assert server.request("GET", "/fixed").status == 200
    assert server.worker_pids() == [victim, server.worker_pids()[1]]
    assert not server.grep(r"\] Received SIG|Worker draining", since=0), server.log


def test_stop_signal_to_one_worker_with_shutdown_delay_drains_it(start_server):
    """TERM to a single worker (a watchdog, an operator recycling it) is not
    the group's stop: the worker drains at once and is replaced, even with
    --shutdown-delay, and the server serves on."""
    server = start_server("behaviour:application", "--shutdown-delay", "30", workers=2)
    victim = server.worker_pids()[0]
    mark = server.mark()
    os.kill(victim, signal.SIGTERM)
    server.wait_for(rf"Worker received SIGTERM from pid \d+: draining: pid={victim}", since=mark)
    server.wait_for(r"Worker draining", since=mark)
    assert not server.grep(r"serving on with it", since=mark), server.log
    server.wait_for(rf"\(pid {victim}\) exited", since=mark, timeout=30)
    # Its replacement.
    assert wait_until(lambda: [p for p in server.worker_pids(since=mark) if p != victim], 30), server.log
    assert server.request("GET", "/fixed").status == 200
    assert not server.grep(r"still serving for", since=mark), server.log


@pytest.mark.parametrize("crash", ["exit", "segv"])
def test_workers_dying_at_boot_make_the_master_give_up(start_server, crash):
    started = time.monotonic()
    server = start_server("exit_at_boot:application", workers=2, wait=False, env={"CORRAL_TEST_CRASH": crash})
    code = server.wait_exit(30)
    # gunicorn's exit code for workers that fail to boot.
    assert code == 3, server.log
    assert time.monotonic() - started < 30
    boots = server.grep("Booting worker")
    assert 2 <= len(boots) <= 30, server.log
    # The last word says why it gave up.
    errors = server.grep(r"\[ERROR\].*")
    assert errors, server.log
    assert any(s in server.log.lower() for s in ("boot", "giving up", "gave up")), server.log
    assert wait_until(lambda: not group_members(server.pgid), timeout=10)


def test_a_pool_failing_at_boot_together_counts_one_failure_a_round(start_server):
    """Six workers dying at boot at once are one failed attempt, not six: the
    master retries with its growing backoff before it gives up, rather than
    giving up within the first second."""
    server = start_server("exit_at_boot:application", workers=6, wait=False)
    assert server.wait_exit(60) == 3, server.log
    counted = [int(n) for n in re.findall(r"\(failure (\d) of 5\); retrying in", server.log)]
    assert sorted(set(counted)) == [1, 2, 3, 4], server.log
    # Numbers never go back: a later round is never counted as an earlier one.
    assert counted == sorted(counted), server.log
    assert "5 boot failures in a row, giving up" in server.log
    # Every round restarted the whole pool.
    assert len(server.grep("Booting worker")) >= 6 * 5, server.log


@pytest.mark.parametrize("first", ["USR2", "TERM"])
def test_a_signal_sent_with_a_usr2_is_acted_on_after_the_re_exec(start_server, first):
    """Read together from the signalfd, a TERM and a USR2 (in either order:
    the lower number comes first) both count: the master re-executes, then
    stops, rather than losing the TERM to the exec."""
    server = start_server("behaviour:application", workers=1)
    second = "TERM" if first == "USR2" else "USR2"
    os.kill(server.proc.pid, getattr(signal, f"SIG{first}"))
    os.kill(server.proc.pid, getattr(signal, f"SIG{second}"))
    assert server.wait_exit(60) == 0, server.log
    assert server.grep(r"Received SIGTERM|Shutdown complete"), server.log


def test_a_reload_replacement_that_dies_booting_is_tried_again(start_server, tmp_path):
    """The pool does not go on serving two versions of the code: a worker a
    reload asked to replace gets another replacement once the first died."""
    marker = tmp_path / "crash"
    server = start_server(
        "crash_on_marker:application", workers=2, env={"CORRAL_TEST_CRASH_MARKER": str(marker)}
    )
    old = server.worker_pids()
    assert len(old) == 2
    marker.write_text("once")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(
        r"killed by signal 9 \(SIGKILL\) before it was ready; worker pid \d+ keeps serving; trying again",
        since=mark,
    )
    server.wait_for(r"still serves the code from before the reload; starting a replacement", since=mark)
    for pid in old:
        server.wait_for(
            rf"worker pid {pid} stops accepting and finishes its requests", since=mark, timeout=30
        )
    assert server.request("GET", "/fixed").status == 200


def test_a_worker_crashing_as_it_boots_after_the_start_leaves_the_others_serving(start_server, tmp_path):
    """Once the server is up, a worker that dies while booting again and
    again (a crash at import, an import that times out) does not stop the
    server: the others serve on, a request in flight included, and the pool
    is filled again, later each time, until the cause is gone."""
    marker = tmp_path / "crash"
    server = start_server(
        "crash_on_marker:application", workers=2, threads=2, env={"CORRAL_TEST_CRASH_MARKER": str(marker)}
    )
    victim = server.worker_pids()[0]
    marker.write_text("always")
    mark = server.mark()
    os.kill(victim, signal.SIGKILL)
    server.wait_for(r"while booting \(failure 1 in a row\); the 1 other worker\(s\) keep serving", since=mark)
    with ThreadPoolExecutor(1) as pool:
        # On the worker left: the one the pool is waiting to fill again.
        slow = pool.submit(server.request, "GET", "/slow?secs=3&id=inflight", timeout=60)
        server.wait_for(
            r"while booting \(failure 4 in a row\); the 1 other worker\(s\) keep serving",
            since=mark,
            timeout=60,
        )
        assert slow.result().status == 200
    assert server.running()
    assert server.request("GET", "/fixed").status == 200
    marker.unlink()
    server.wait_for(READY_RE.pattern, since=mark, timeout=60)


def test_preload_imports_once_in_the_master(start_server):
    server = start_server("preload_app:application", "--preload", workers=2)
    imports = [line for line in server.lines + server.stdout_lines if "preload_app imported" in line]
    assert imports == [f"preload_app imported in pid={server.proc.pid}"]
    workers = set(server.worker_pids())
    assert {_pid_of_request(server, "/") for _ in range(10)} <= workers


def test_after_fork_hooks_run_in_each_preloaded_worker(start_server, tmp_path):
    """With --preload, hooks the app registers with os.register_at_fork run in
    every worker after its fork (uWSGI's @postfork), as after Python's own
    os.fork(): random is reseeded, so workers draw different numbers, and no
    signal is blocked (a program a hook starts must take TERM)."""
    server = start_server(
        "forkhook_app:application", "--preload", "--env", f"FORKHOOK_DIR={tmp_path}", workers=3
    )
    workers = set(server.worker_pids())
    assert wait_until(lambda: len(list(tmp_path.iterdir())) == 3, timeout=10), list(tmp_path.iterdir())
    assert {int(p.name) for p in tmp_path.iterdir()} == workers
    draws = [p.read_text().split() for p in tmp_path.iterdir()]
    assert len({draw for draw, _ in draws}) == 3, draws
    assert {int(blocked, 16) for _, blocked in draws} == {0}, draws


def _title(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode()


def test_process_titles_name_the_master_and_each_worker(start_server):
    """ps shows `corral: master [APP]` and `corral: worker N [APP]` (N as in the
    log); --name replaces APP; a reload's new workers are titled too."""

    def worker_titles(server, name, since=0):
        booted = server.grep(r"Booting worker (\d+) with pid (\d+)", since)
        slots = {int(m.group(2)): m.group(1) for m in booted}
        pids = server.worker_pids(since)
        assert pids
        return {_title(pid) for pid in pids} == {f"corral: worker {slots[pid]} [{name}]" for pid in pids}

    server = start_server("preload_app:application", workers=2)
    assert _title(server.proc.pid) == "corral: master [preload_app:application]"
    assert worker_titles(server, "preload_app:application")
    named = start_server("preload_app:application", "--name", "shop-api", "--preload", workers=1)
    assert _title(named.proc.pid) == "corral: master [shop-api]"
    assert worker_titles(named, "shop-api")
    mark = named.mark()
    named.signal(signal.SIGHUP)
    named.wait_for(READY_RE.pattern, since=mark)
    # --preload: HUP re-executed the master, which titles itself again.
    assert _title(named.proc.pid) == "corral: master [shop-api]"
    assert worker_titles(named, "shop-api", since=mark)


def test_without_preload_each_worker_imports(start_server):
    server = start_server("preload_app:application", workers=2)
    wait_until(lambda: len(server.grep("preload_app imported")) >= 2, timeout=10)
    pids = {int(m.group(1)) for m in server.grep(r"preload_app imported in pid=(\d+)")}
    assert pids == set(server.worker_pids())


def test_hup_replaces_the_workers(start_server):
    server = start_server("preload_app:application", workers=2)
    before = set(server.worker_pids())
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(READY_RE.pattern, count=2, since=mark)
    after = set(server.worker_pids(since=mark))
    assert not after & before
    assert wait_until(lambda: not (set(group_members(server.pgid)) & before), timeout=15)
    assert {_pid_of_request(server, "/") for _ in range(10)} <= after


def test_a_reload_after_a_deploy_switched_the_current_symlink_serves_the_new_release(start_server, tmp_path):
    """--chdir and --static name a `current -> releases/N` link that a deploy
    switches, then reloads (HUP here; --touch-reload does the same): the new
    workers serve the new release's code and files, as gunicorn's and uWSGI's
    reloads do, not the directory the master entered when it started."""
    for release in ("r1", "r2"):
        (tmp_path / release / "static").mkdir(parents=True)
        (tmp_path / release / "release_app.py").write_text(
            "import os\n"
            f"RELEASE = {release!r}\n"
            "def application(environ, start_response):\n"
            "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            "    return [f'{RELEASE} in {os.path.basename(os.getcwd())}'.encode()]\n"
        )
        (tmp_path / release / "static" / "note.txt").write_text(f"file of {release}")
    current = tmp_path / "current"
    current.symlink_to("r1")
    server = start_server(
        "release_app:application",
        "--chdir",
        str(current),
        "--static",
        f"/static={current}/static",
        pythonpath=None,
        workers=1,
    )
    assert server.request("GET", "/").body == b"r1 in r1"
    assert server.request("GET", "/static/note.txt").body == b"file of r1"
    switched = tmp_path / "current.new"
    switched.symlink_to("r2")
    switched.rename(current)
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(READY_RE.pattern, since=mark)
    assert wait_until(lambda: server.request("GET", "/").body == b"r2 in r2", timeout=15)
    assert server.request("GET", "/static/note.txt").body == b"file of r2"


@pytest.mark.parametrize("how", ["hup", "preload-hup", "usr2"])
def test_a_server_started_in_the_current_symlink_follows_a_deploy_without_chdir(start_server, tmp_path, how):
    """Started from `cd current` (a shell, or systemd's WorkingDirectory), with
    no --chdir: the directory is the one the shell named ($PWD), as gunicorn
    takes it, so new workers (and a re-exec) serve the release the link
    names now; the kernel's resolved path kept them in the old one."""
    for release in ("r1", "r2"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "release_app.py").write_text(
            "import os\n"
            f"RELEASE = {release!r}\n"
            "def application(environ, start_response):\n"
            "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            "    return [f'{RELEASE} in {os.path.basename(os.path.realpath(os.getcwd()))}'.encode()]\n"
        )
    current = tmp_path / "current"
    current.symlink_to("r1")
    args = ["--preload"] if how == "preload-hup" else []
    server = start_server(
        "release_app:application", *args, cwd=current, env={"PWD": str(current)}, pythonpath=None, workers=1
    )
    assert server.request("GET", "/").body == b"r1 in r1"
    switched = tmp_path / "current.new"
    switched.symlink_to("r2")
    switched.rename(current)
    mark = server.mark()
    server.signal(signal.SIGUSR2 if how == "usr2" else signal.SIGHUP)
    server.wait_for(READY_RE.pattern, since=mark, timeout=30)
    assert wait_until(lambda: server.request("GET", "/").body == b"r2 in r2", timeout=15), server.log[mark:]


@pytest.mark.parametrize("how", ["hup", "preload-hup"])
def test_a_reload_after_a_deploy_moved_a_new_release_into_the_start_directory_serves_it_there(
    start_server, tmp_path, how
):
    """A deploy that moves the old release aside (`mv app app.old; mkdir app`)
    and reloads, with no --chdir: the new workers run in the new directory
    of the same name, as gunicorn's do, not in the old one the master was
    started in (its code from one release, its files from the other)."""
    source = (
        "import os\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    with open('data.txt') as f:\n"
        "        return [f'{RELEASE} {f.read().strip()} {os.path.basename(os.getcwd())}'.encode()]\n"
    )
    app = tmp_path / "app"
    app.mkdir()
    (app / "moved_app.py").write_text("RELEASE = 'code1'\n" + source)
    (app / "data.txt").write_text("data1")
    args = ["--preload"] if how == "preload-hup" else []
    server = start_server(
        "moved_app:application", *args, cwd=app, env={"PWD": str(app)}, pythonpath=None, workers=1
    )
    assert server.request("GET", "/").body == b"code1 data1 app"
    app.rename(tmp_path / "app.old")
    app.mkdir()
    (app / "moved_app.py").write_text("RELEASE = 'code2'\n" + source)
    (app / "data.txt").write_text("data2")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(READY_RE.pattern, since=mark, timeout=30)
    assert wait_until(lambda: server.request("GET", "/").body != b"code1 data1 app", timeout=15)
    assert server.request("GET", "/").body == b"code2 data2 app", server.log[mark:]


def test_ttin_ttou_change_the_worker_count(start_server):
    server = start_server("behaviour:application", workers=1)
    mark = server.mark()
    server.signal(signal.SIGTTIN)
    server.wait_for(READY_RE.pattern, since=mark)
    assert wait_until(lambda: len(group_members(server.pgid)) == 3, timeout=10)
    server.signal(signal.SIGTTOU)
    assert wait_until(lambda: len(group_members(server.pgid)) == 2, timeout=15)
    assert server.request("GET", "/fixed").status == 200


def test_a_thread_the_app_started_at_import_does_not_take_the_masters_signals(start_server):
    """With --preload, a thread the app starts at import (an exporter, a
    scheduler) runs in the master without its signals blocked, so the kernel
    hands it the signals sent to the master: each must still do what the
    table says, not kill or stop the master."""
    server = start_server("thread_at_import:application", "--preload", workers=1)
    master = server.proc.pid
    assert len(os.listdir(f"/proc/{master}/task")) >= 2, "the app's thread runs in the master"
    # Said once: such a thread does not run in the workers.
    assert len(server.grep(r"\[WARNING\] The app's import started thread\(s\) ticker in the master")) == 1
    mark = server.mark()
    server.signal(signal.SIGUSR1)
    server.wait_for(r"Received SIGUSR1: ", since=mark)
    server.signal(signal.SIGTTIN)
    server.wait_for(r"Received SIGTTIN: workers 1 -> 2", since=mark)
    server.wait_for(READY_RE.pattern, since=mark)
    server.signal(signal.SIGTTOU)
    server.wait_for(r"Received SIGTTOU: workers 2 -> 1", since=mark)
    assert server.running()
    assert Path(f"/proc/{master}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T"
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"re-executing the master", since=mark)
    server.wait_for(r"from before the re-exec exited", since=mark, timeout=30)
    assert server.request("GET", "/").status == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0, server.log[-3000:]


def _signal_masks(pid):
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["SigBlk"], 16), int(fields["SigIgn"], 16)


@pytest.mark.parametrize("preload", [False, True], ids=["in-the-worker", "preload"])
def test_programs_the_app_starts_at_import_take_signals(start_server, tmp_path, preload):
    """Neither the master's blocked mask nor a worker's ignored signals reach
    a program the app starts while it loads (before, after a re-exec too)."""
    helpers = tmp_path / "helpers"
    args = ["--preload"] if preload else []
    server = start_server("spawn_at_import:application", *args, "--env", f"CORRAL_TEST_HELPERS={helpers}")
    started = []
    try:
        assert wait_until(lambda: helpers.exists() and helpers.read_text().strip())
        if preload:
            # HUP with --preload re-executes the master, which imports the app again.
            server.signal(signal.SIGHUP)
            assert wait_until(lambda: len(helpers.read_text().split()) >= 2, 30), server.log[-2000:]
        started = [int(p) for p in helpers.read_text().split()]
        for pid in started:
            blocked, ignored = _signal_masks(pid)
            assert blocked == 0, f"helper {pid} has signals blocked: {blocked:#x}"
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
                assert not ignored & (1 << (sig - 1)), f"helper {pid} ignores {sig.name}"
        os.kill(started[-1], signal.SIGTERM)
        assert wait_until(lambda: not Path(f"/proc/{started[-1]}").exists() or _is_zombie(started[-1]))
    finally:
        for pid in started or [int(p) for p in (helpers.read_text().split() if helpers.exists() else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_passes_no_descriptor_to_the_programs_it_runs(start_server, tmp_path):
    server = start_server(
        "behaviour:application",
        "--stats",
        f"unix:{tmp_path / 'stats.sock'}",
        "--access-log",
        str(tmp_path / "access.log"),
        threads=2,
    )
    assert json.loads(server.request("GET", "/inheritable-fds").body) == []


def test_workers_do_not_hold_the_stats_port(start_server):
    """After the master is killed outright, a worker still finishing a request
    must not keep the stats port: a new instance binds it at once."""
    stats_port = free_port()
    server = start_server("behaviour:application", "--stats", f"127.0.0.1:{stats_port}", threads=2)
    slow = ThreadPoolExecutor(1).submit(server.request, "GET", "/slow?secs=4", timeout=30)
    server.wait_for("slow request started")
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", stats_port))
    assert slow.result(30).status == 200


def _is_zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _corral_signal(*args):
    return subprocess.run([*CORRAL, "signal", *args], check=False, capture_output=True, text=True, timeout=30)


def test_corral_signal_by_name_through_the_pidfile(start_server, tmp_path):
    pidfile = tmp_path / "corral.pid"
    server = start_server("behaviour:application", "--pidfile", str(pidfile), workers=1, threads=1)
    assert wait_until(pidfile.exists)
    mark = server.mark()
    done = _corral_signal("ttin", str(pidfile))
    assert done.returncode == 0, done.stderr
    assert f"sent SIGTTIN (one worker more) to {server.proc.pid}" in done.stdout
    server.wait_for(r"Received SIGTTIN: workers 1 -> 2", since=mark)
    assert _corral_signal("SIGTERM", str(pidfile)).returncode == 0
    assert server.wait_exit(30) == 0
    assert not pidfile.exists()


def test_corral_signal_errors_name_the_problem(tmp_path):
    pidfile = tmp_path / "corral.pid"
    done = _corral_signal("RESTART", str(pidfile))
    assert done.returncode == 2
    assert "unknown signal name 'RESTART'" in done.stderr and "HUP (zero-downtime reload)" in done.stderr
    done = _corral_signal("HUP", str(pidfile))
    assert done.returncode == 1 and f"cannot read the pid file {pidfile}" in done.stderr
    pidfile.write_text("not a pid\n")
    done = _corral_signal("HUP", str(pidfile))
    assert done.returncode == 1 and "does not hold a process id" in done.stderr
    # A pid that no process has: pid_max is never reached.
    pidfile.write_text(f"{int(Path('/proc/sys/kernel/pid_max').read_text())}\n")
    done = _corral_signal("HUP", str(pidfile))
    assert done.returncode == 1 and "is corral running?" in done.stderr
    done = _corral_signal("HUP")
    assert done.returncode == 2 and "usage: corral signal NAME PIDFILE" in done.stderr
    done = _corral_signal("--help")
    assert done.returncode == 0 and "usage: corral signal NAME PIDFILE" in done.stdout


def test_corral_signal_refuses_a_stale_pidfile_naming_another_program(tmp_path):
    pidfile = tmp_path / "corral.pid"
    other = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(f"{other.pid}\n")
        done = _corral_signal("TERM", str(pidfile))
        assert done.returncode == 1 and f"process {other.pid} (from {pidfile}) is not corral" in done.stderr
        assert other.poll() is None, "the unrelated process must not be signalled"
    finally:
        other.kill()
        other.wait()


def test_a_second_server_refuses_the_pidfile_of_a_running_one(start_server, tmp_path):
    pidfile = tmp_path / "corral.pid"
    first = start_server("behaviour:application", "--pidfile", str(pidfile), workers=1, threads=1)
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() == str(first.proc.pid))
    second = start_server("behaviour:application", "--pidfile", str(pidfile), wait=False)
    assert second.wait_exit() == 1
    assert f"corral is already running there as pid {first.proc.pid}" in second.log
    assert pidfile.read_text().strip() == str(first.proc.pid)
    assert first.request("GET", "/fixed").status == 200


def _alive(pid):
    try:
        os.kill(pid, 0)
        # It may be reaped between the two looks: reading its stat then fails.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def _assert_detached(pid):
    """In a session of its own that it does not lead (so it can never gain a
    controlling terminal), without one, and no child of the command."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ppid, session, tty = int(fields[1]), int(fields[3]), int(fields[4])
    assert session == os.getsid(pid) != os.getsid(0)
    assert session != pid, "the daemon must not lead its session"
    # It exits right after passing on the master's word.
    assert wait_until(lambda: not _alive(session), timeout=10), (
        "the session's leader (the first fork) is gone"
    )
    assert tty == 0
    assert ppid != os.getpid()


def test_daemon_returns_once_ready_and_reports_a_failed_start(tmp_path):
    """--daemon (gunicorn's -D): the command returns 0 once the workers are
    ready, leaving the master in a session of its own; USR2 re-executes it in
    place without detaching again; a start that fails returns its exit code
    and points at the error log."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log, pidfile = tmp_path / "error.log", tmp_path / "corral.pid"
    common = ["--pythonpath", str(APPS), "--http", f"127.0.0.1:{port}", "--error-log"]
    started = subprocess.run(
        [*CORRAL, "-D", *common, str(log), "--pidfile", str(pidfile), "-w", "2", "preload_app:application"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert started.returncode == 0, (started.stderr, log.read_text())
        assert pid and _alive(pid)
        _assert_detached(pid)
        assert log.read_text().count("Worker ready") == 2, "ready before the command returned"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        # The same port taken: this start fails, and says so, every time (the
        # master's exit and the pipe's close race in the waiting command).
        for _ in range(5):
            failed = subprocess.run(
                [*CORRAL, "-D", *common, str(tmp_path / "second.log"), "preload_app:application"],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert failed.returncode == 1, failed.stderr
            assert "failed to start (exit code 1)" in failed.stderr and "second.log" in failed.stderr, (
                failed.stderr
            )
        assert "address already in use" in (tmp_path / "second.log").read_text()
        # Sockets from a service manager are not for a daemon.
        activated = subprocess.run(
            [
                "sh",
                "-c",
                'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"',
                "sh",
                *CORRAL,
                "-D",
                *common,
                str(log),
                "x:y",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert activated.returncode == 2 and "LISTEN_FDS" in activated.stderr, activated.stderr
        os.kill(pid, signal.SIGUSR2)
        assert wait_until(lambda: log.read_text().count("Worker ready") == 4, 20), log.read_text()
        assert _alive(pid) and int(pidfile.read_text()) == pid
        _assert_detached(pid)
        refused = subprocess.run(
            [*CORRAL, "-D", "x:y"], check=False, capture_output=True, text=True, timeout=30
        )
        assert refused.returncode == 2 and "--daemon needs --error-log FILE" in refused.stderr
    finally:
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            assert wait_until(lambda: not _alive(pid), 30)
    assert not pidfile.exists()


def test_a_daemon_whose_preloaded_app_forked_reports_its_failed_start(tmp_path):
    """A process the app forks at import (with --preload) keeps a copy of
    everything the master had open; the command must still learn that the
    master failed, without waiting for that process."""
    child_pid = tmp_path / "child.pid"
    (tmp_path / "forks.py").write_text(
        "import os, time\n"
        "if os.fork() == 0:\n"
        f"    open({str(child_pid)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "raise RuntimeError('import failed after the fork')\n"
    )
    log = tmp_path / "e.log"
    try:
        failed = subprocess.run(
            [*CORRAL, "-D", "--preload", "--error-log", str(log), "--http", f"127.0.0.1:{free_port()}"]
            + ["--chdir", str(tmp_path), "forks:application"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert failed.returncode == 4, (failed.stderr, log.read_text())
        assert "failed to start (exit code 4)" in failed.stderr
        assert "import failed after the fork" in log.read_text()
    finally:
        if wait_until(child_pid.exists, 5):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(child_pid.read_text()), signal.SIGKILL)


def test_a_daemon_start_can_be_interrupted_while_it_waits(tmp_path):
    """The command waiting for a daemon's workers takes TERM (an init script's
    timeout) like any command; the daemon itself goes on."""
    (tmp_path / "slowboot.py").write_text(
        "import time\ntime.sleep(30)\ndef application(e, s):\n    return []\n"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pidfile = tmp_path / "corral.pid"
    cmd = [*CORRAL, "-D", "--error-log", str(tmp_path / "e.log"), "--pidfile", str(pidfile)]
    waiting = subprocess.Popen(
        [*cmd, "--http", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "slowboot:application"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid = None
    try:
        assert wait_until(pidfile.exists, 20)
        pid = int(pidfile.read_text())
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(10) == -signal.SIGTERM
        assert _alive(pid)
    finally:
        waiting.kill()
        waiting.wait()
        if pid and _alive(pid):
            os.kill(pid, signal.SIGQUIT)
            assert wait_until(lambda: not _alive(pid), 30)


def test_reuse_port_lets_a_second_server_share_the_port_and_take_over(start_server):
    port = free_port()
    old = start_server("behaviour:application", "--reuse-port", http=f"127.0.0.1:{port}")
    old_pids = set(old.worker_pids())
    new = start_server("behaviour:application", "--reuse-port", http=f"127.0.0.1:{port}")
    new_pids = set(new.worker_pids())
    # New connections are spread between the two servers by the kernel.
    seen = {_pid_of_request(old) for _ in range(60)}
    assert seen & old_pids and seen & new_pids, (seen, old_pids, new_pids)

    # The old one stops while clients keep connecting: none is refused or reset.
    failures, served, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                served.append(_pid_of_request(old))
            except (OSError, IncompleteResponse) as e:
                failures.append(repr(e))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        wait_until(lambda: len(served) > 20)
        old.signal(signal.SIGTERM)
        assert old.wait_exit(30) == 0, old.log
        count = len(served)
        wait_until(lambda: len(served) > count + 20)
        stop.set()
    assert not failures, failures
    assert set(served[count:]) <= new_pids


def test_without_reuse_port_a_second_server_cannot_bind(start_server):
    port = free_port()
    start_server("behaviour:application", "--reuse-port", http=f"127.0.0.1:{port}")
    second = start_server("behaviour:application", http=f"127.0.0.1:{port}", wait=False)
    assert second.wait_exit(20) != 0
    assert re.search(
        rf"cannot bind 127\.0\.0\.1:{port}: address already in use", second.log, re.IGNORECASE
    ), second.log


@pytest.mark.parametrize(
    "args",
    [
        ["--http", "127.0.0.1:{port}", "--uwsgi", "127.0.0.1:{port}"],
        ["--http", "0.0.0.0:{port}", "--stats", "127.0.0.1:{port}"],
    ],
    ids=["same-address", "wildcard-and-stats"],
)
def test_two_listeners_of_one_server_cannot_take_one_port(args):
    """With --reuse-port both would bind, and the kernel would split the
    connections between protocols (or between the app and the stats)."""
    port = free_port()
    cmd = [*CORRAL, "--reuse-port", *(a.format(port=port) for a in args), "behaviour:application"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30, cwd=APPS)
    assert done.returncode == 2, done.stderr
    assert "overlaps" in done.stderr and "cannot take the same port" in done.stderr, done.stderr


def test_reuse_port_without_a_tcp_listener_is_reported(start_server, tmp_path):
    server = start_server("behaviour:application", "--reuse-port", http=f"unix:{tmp_path}/s.sock")
    server.wait_for(r"--reuse-port is not used: no listener is a HOST:PORT socket")


def test_new_connections_avoid_a_worker_whose_interpreter_is_held(start_server):
    """A thread stuck in C code that keeps the GIL stops every Python thread of
    its worker. Once another of its threads has waited for the GIL a while,
    the worker hands new connections to a sibling rather than take them into
    the wait (gunicorn's threaded worker, which accepts in Python, does not
    take them either)."""
    server = start_server("c_hang:application", workers=2, threads=4)
    # Kept-alive connections, sorted by the worker that took them.
    by_pid: dict[int, list] = {}
    for _ in range(16):
        conn = server.connect(30)
        conn.send_request("GET", "/", {"Host": "x"})
        by_pid.setdefault(int(conn.read_response().body), []).append(conn)
    held, (holder, waiter, *_) = next((p, c) for p, c in by_pid.items() if len(c) >= 2)
    mark = server.mark()
    with ThreadPoolExecutor(2) as pool:
        holder.send_request("GET", "/hold?secs=8", {"Host": "x"})
        hold = pool.submit(holder.read_response)
        server.wait_for(rf"holding the GIL in pid {held}", since=mark)
        # A request on the same worker waits for the GIL; a second later the
        # worker counts as stalled.
        waiter.send_request("GET", "/", {"Host": "x"})
        waiting = pool.submit(waiter.read_response)
        time.sleep(1.5)
        for _ in range(30):
            resp = server.request("GET", "/", timeout=30)
            assert resp.status == 200
            # Served by the other worker, while the hold still goes on.
            assert int(resp.body) != held
            assert not server.grep(r"hold done", since=mark), server.log
        assert hold.result().status == 200
        assert waiting.result().status == 200
    # (Which worker the kernel wakes for a new connection is its choice: the
    # held one may have been woken for none of them, and said nothing.)
    for conns in by_pid.values():
        for conn in conns:
            conn.close()


def test_pidfile_symlink_is_replaced_not_followed(start_server, tmp_path):
    """A pidfile path that is a symlink (planted by whoever may write to the
    pidfile's directory) is replaced by the pidfile, as under gunicorn: the
    file it pointed to is left as it was."""
    target = tmp_path / "precious"
    target.write_text("secret\n")
    pidfile = tmp_path / "run" / "corral.pid"
    pidfile.parent.mkdir()
    pidfile.symlink_to(target)
    server = start_server("behaviour:application", "--pidfile", str(pidfile))
    assert target.read_text() == "secret\n"
    assert not pidfile.is_symlink()
    assert pidfile.read_text() == f"{server.proc.pid}\n"
    assert not [p for p in pidfile.parent.iterdir() if p.name.endswith(".tmp")]
    server.signal(signal.SIGTERM)
    assert server.wait_exit(30) == 0
    assert not pidfile.exists()
    assert target.read_text() == "secret\n"


def test_a_stack_overflow_in_c_is_handled_as_a_crash(start_server):
    """C recursion past the thread's stack (json.dumps of a list nested a
    million deep, the recursion limit raised): the fault handler runs on an
    alternate stack, so the client gets its 500 and the log names the
    request, as for any crash (the worker died without a word)."""
    server = start_server("behaviour:application", workers=1, threads=2)
    mark = server.mark()
    resp = server.request("GET", "/deep?depth=1000000", timeout=60)
    assert resp.status == 500, resp
    server.wait_for(
        r"Worker crashed: SIGSEGV in thread \d \(the app.s corral-thread-\d\) while it served GET /deep",
        since=mark,
    )
    assert wait_until(lambda: _serves(server), timeout=30)


def test_an_app_that_closes_the_listening_socket_gets_its_worker_replaced(start_server):
    """The socket stays open in the other processes, so the worker's epoll
    keeps reporting it: the worker says what happened, stops accepting and
    is replaced (it spun on the failing accept without a word, holding its
    share of new connections unserved)."""
    server = start_server("behaviour:application", workers=1, threads=2)
    (old,) = server.worker_pids()
    mark = server.mark()
    assert server.request("GET", "/close-listeners").body.startswith(b"closed [")
    # The next client wakes the worker for the listener: served by the replacement.
    assert server.request("GET", "/pid", timeout=30).body != str(old).encode()
    server.wait_for(
        r"its http listening socket \(descriptor \d+\) is gone: .*This worker stops accepting", since=mark
    )
    server.wait_for(r"is to be replaced because the app closed its listening socket", since=mark)
    server.wait_for(rf"Worker \d+ \(pid {old}\) exited", since=mark, timeout=30)
    assert all(server.request("GET", "/fixed").status == 200 for _ in range(10))


@pytest.mark.parametrize("how", ["TERM", "max-requests"])
def test_a_worker_leaving_finalizes_the_interpreter_as_pythons_exit_does(start_server, tmp_path, how):
    """A worker that stops gracefully or is recycled exits as Python does
    (and gunicorn's and uWSGI's workers): the app's module-level files are
    flushed, and objects of reference cycles collected, their __del__ run,
    a NamedTemporaryFile's file removed. The worker left with _exit after
    atexit: the buffered writes were lost and the temporary files stayed."""
    extra = ("--max-requests", "2") if how == "max-requests" else ()
    server = start_server("finalize_app:application", *extra, env={"FINALIZE_DIR": str(tmp_path)})
    first = server.worker_pids()
    url = f"http://127.0.0.1:{server.port}/"
    for _ in range(2):
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.read() == b"ok"
    if how == "TERM":
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
    else:
        server.wait_for(READY_RE.pattern, count=2, timeout=20)
        assert wait_until(lambda: not os.path.exists(f"/proc/{first[0]}"))
    assert (tmp_path / f"buffered-{first[0]}.txt").read_text() == "x" * 200
    assert (tmp_path / "collected.txt").read_text().split() == [str(first[0])] * 2
    assert not list(tmp_path.glob("*.upload"))
