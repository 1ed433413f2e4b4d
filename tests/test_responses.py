"""The response side of PEP 3333: start_response checks, exc_info, write(), close(),
wsgi.file_wrapper, and apps that fail before or after the headers went out."""

import hashlib
import os
import pathlib
import re
import signal
import socket
import struct
import time

import pytest
from support import exchange, read_hashed, slow_reader, wait_until


def _closed_tags(server):
    return server.markers.read_text().split()


def _wait_closed(server, tag):
    """Waits until close() of the iterable `tag` was recorded; then makes sure it stays recorded once."""
    assert wait_until(lambda: tag in _closed_tags(server), timeout=10), (
        f"close() was never called for {tag}\n{server.log[-3000:]}"
    )
    time.sleep(0.3)
    assert _closed_tags(server).count(tag) == 1, _closed_tags(server)


# -- start_response checks ----------------------------------------------------------


@pytest.mark.parametrize(
    "target,said",
    [
        ("/bad-header?kind=crlf", "X-Injected"),
        ("/bad-header?kind=lf", "X-Injected"),
        ("/bad-header?kind=nonstr", "X-Number"),
        ("/bad-header?kind=bytes", "X-Bytes"),
        ("/bad-header?kind=name-space", "X Bad Name"),
        # Headers that are not a sequence of pairs (other sequences are taken, below).
        ("/header-shapes?shape=dict", "headers must be a list of (name, value) tuples, got dict"),
        ("/header-shapes?shape=str", "headers must be a list of (name, value) tuples, got str"),
        ("/header-shapes?shape=triple", "got tuple of 3 items"),
        (
            "/header-shapes?shape=bare-str-item",
            "each header must be a (name, value) tuple of two str, got str",
        ),
    ],
)
def test_invalid_headers_give_500_and_a_log_line(behaviour, target, said):
    mark = behaviour.mark()
    resp = behaviour.request("GET", target)
    assert resp.status == 500
    assert b"should not be sent" not in resp.body and b"shape ok" not in resp.body
    assert resp.header("X-Injected") is None
    assert resp.header("Set-Cookie") is None
    # A log line names the offending header.
    behaviour.wait_for(re.escape(said), since=mark)
    # And the server carries on.
    assert behaviour.request("GET", "/fixed").status == 200


@pytest.mark.parametrize("shape", ["list-of-lists", "tuple-of-tuples", "generator"])
def test_headers_as_other_sequences_of_pairs_are_taken_as_gunicorn_takes_them(behaviour, shape):
    resp = behaviour.request("GET", f"/header-shapes?shape={shape}")
    assert resp.status == 200, resp.body
    assert resp.header("X-Shape") == shape
    assert resp.header("Content-Type") == "text/plain"
    assert resp.body == b"shape ok"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("Upgrade", "websocket"),
        ("TE", "trailers"),
    ],
)
def test_hop_by_hop_headers_from_the_app_are_dropped_with_one_warning(start_server, name, value):
    """PEP 3333 forbids them; gunicorn drops them. They are dropped, the
    response and the connection go on, and the log says so once."""
    server = start_server("behaviour:application").wait_started()
    with server.connect() as conn:
        for _ in range(2):
            conn.send_request("GET", f"/bad-header?kind=hop&name={name}&value={value}")
            resp = conn.read_response()
            assert resp.status == 200
            assert resp.body == b"should not be sent"
            assert resp.header(name) is None
            assert resp.header("Connection") is None
    server.wait_for(rf'The app set the hop-by-hop header "{name}: {value}", which a WSGI app may not send')
    assert len(server.grep("hop-by-hop header")) == 1


def test_connection_close_from_the_app_closes_the_connection(start_server):
    server = start_server("behaviour:application").wait_started()
    with server.connect() as conn:
        conn.send_request("GET", "/bad-header?kind=hop&name=Connection&value=close")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.header_all("Connection") == ["close"]
        assert conn.at_eof()
    server.wait_for(r'"Connection: close".* it is dropped, and the connection closes after the response')


def test_header_values_lose_leading_and_trailing_whitespace(behaviour):
    """Django's Set-Cookie values start with a space (SimpleCookie.output)."""
    raw, _ = exchange(
        behaviour.host,
        behaviour.port,
        b"GET /bad-header?kind=hop&name=X-Spaced&value=%20a%3Db%09 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nX-Spaced: a=b\r\n" in raw


def test_start_response_twice_without_exc_info_raises(behaviour):
    resp = behaviour.request("GET", "/twice")
    assert resp.status == 200
    assert resp.body.startswith(b"raised ")


def test_exc_info_before_headers_were_sent_replaces_the_status(behaviour):
    resp = behaviour.request("GET", "/exc-info-replace")
    assert resp.status == 503
    assert resp.header("X-Replaced") == "yes"
    assert resp.body == b"replaced"


def test_exc_info_after_headers_were_sent_reraises_and_aborts(behaviour):
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send_request("GET", "/exc-info-after-headers", {"Host": "x"})
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.chunked
        assert not resp.complete, "the response must not look complete"
        assert b"must not be reached" not in resp.body
        assert resp.body.startswith(b"first part\n")
    behaviour.wait_for("KeyError", since=mark)


def test_write_callable(behaviour):
    resp = behaviour.request("GET", "/write")
    assert resp.status == 200
    assert resp.body == b"hello from write()"


def _blocks_arrive_while_the_app_waits(server, tmp_path):
    marker = tmp_path / "go"
    with server.connect(timeout=5) as conn:
        conn.send_request("GET", f"/pause?marker={marker}", {"Host": "x"})
        assert conn.read_head().status == 200
        # The app now waits for the marker: both blocks must be here already,
        # even though they were yielded too closely to be written one by one.
        while b"second," not in conn.buf:
            assert conn._fill(), conn.buf
        marker.touch()
        body, complete = conn._read_chunked()
        assert complete and body == b"first,second,third"


def test_stream_blocks_are_sent_while_the_app_produces_the_next(behaviour, tmp_path):
    _blocks_arrive_while_the_app_waits(behaviour, tmp_path)


def test_stream_blocks_are_sent_while_the_app_produces_the_next_one_thread(start_server, tmp_path):
    # One thread per worker also holds finished responses until its pass over
    # the ready connections ends; a stream's blocks are not among them.
    markers = tmp_path / "closed.log"
    server = start_server("behaviour:application", "--env", f"CORRAL_TEST_MARKERS={markers}", threads=1)
    _blocks_arrive_while_the_app_waits(server, tmp_path)


# -- close() ----------------------------------------------------------------


def test_close_called_once_after_a_normal_response(behaviour):
    resp = behaviour.request("GET", "/closing?id=normal-1&count=3")
    assert resp.status == 200
    assert resp.body == b"piece0\npiece1\npiece2\n"
    _wait_closed(behaviour, "normal-1")


def test_close_called_once_on_keep_alive_connection(behaviour):
    with behaviour.connect() as conn:
        for tag in ("ka-1", "ka-2"):
            conn.send_request("GET", f"/closing?id={tag}", {"Host": "x"})
            assert conn.read_response().complete
    _wait_closed(behaviour, "ka-1")
    _wait_closed(behaviour, "ka-2")


def test_close_called_once_when_iteration_raises(behaviour):
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send_request("GET", "/closing?id=raise-1&mode=raise", {"Host": "x"})
        resp = conn.read_response()
        assert not resp.complete
    _wait_closed(behaviour, "raise-1")
    behaviour.wait_for("failing mid-iteration raise-1", since=mark)


def test_close_called_once_when_the_client_disconnects(behaviour):
    conn = behaviour.connect()
    conn.send_request("GET", "/closing?id=gone-1&mode=infinite", {"Host": "x"})
    resp = conn.read_head()
    assert resp.status == 200
    conn.read_exact(200_000)
    conn.close()
    _wait_closed(behaviour, "gone-1")
    # The worker thread is free again.
    assert behaviour.request("GET", "/fixed").status == 200


def test_close_called_for_head_requests(behaviour):
    resp = behaviour.request("HEAD", "/closing?id=head-1")
    assert resp.status == 200
    _wait_closed(behaviour, "head-1")


@pytest.mark.parametrize(
    ("name", "method", "query"),
    [
        ("head", "HEAD", ""),
        ("not-modified", "GET", "&s=304+Not+Modified"),
        ("no-content", "GET", "&s=204+No+Content"),
        ("past-length", "GET", "&cl=5"),
        ("file-past-length", "GET", "&cl=100&file=1"),
    ],
)
def test_an_endless_body_stops_being_iterated_once_no_more_can_be_sent(behaviour, name, method, query):
    """PEP 3333: the server may stop iterating once enough was sent. An endless
    stream answering HEAD or a 304, or running past its Content-Length, ends
    with close() instead of holding its thread whether or not the client is
    still there; the connection goes on."""
    with behaviour.connect() as conn:
        conn.send_request(method, f"/endless?key={name}{query}", {"Host": "x"})
        resp = conn.read_response(head=method == "HEAD")
        assert resp.status in (200, 204, 304)
        assert resp.complete
        state = lambda: behaviour.get_json(f"/endless-state?key={name}")
        assert wait_until(lambda: state()["closed"], timeout=10), state()
        items = state()["items"]
        assert items <= 3, items
        conn.send_request("GET", "/fixed", {"Host": "x"})
        assert conn.read_response().body == b"hello world"
    assert state()["items"] == items


def test_a_body_of_its_exact_length_is_iterated_to_its_end(behaviour):
    """The code after a generator's last yield still runs when the body it
    gave filled its Content-Length."""
    resp = behaviour.request("GET", "/endless?key=exact&exact=1&cl=7")
    assert (resp.status, resp.body) == (200, b"x" * 7)
    state = behaviour.get_json("/endless-state?key=exact")
    assert state["after_last_yield"] and state["closed"], state


def test_a_response_is_complete_before_its_close_runs(behaviour):
    """close() runs after the body's end has gone out (the chunked
    terminator here): Django's request_finished handlers, which run in it,
    do not hold the client's response open, as under gunicorn."""
    with behaviour.connect() as conn:
        conn.send_request("GET", "/slow-close", {"Host": "x"})
        resp = conn.read_response()
        assert (resp.status, resp.body, resp.complete) == (200, b"ab", True)
        assert resp.header("Transfer-Encoding") == "chunked"
        # close() is still waiting; releasing it frees its thread.
        assert behaviour.request("GET", "/release-close").status == 200
        conn.send_request("GET", "/fixed", {"Host": "x"})
        assert conn.read_response().status == 200


def test_a_response_the_close_ends_is_whole_before_its_close_runs(behaviour):
    """HTTP/1.0 without a length (and uwsgi or SCGI without one): the body ends
    when the connection closes, so the server half-closes it as the body ends."""
    with behaviour.connect() as conn:
        conn.send(b"GET /slow-close HTTP/1.0\r\n\r\n")
        data = conn.read_to_close()
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nab"), data
    assert behaviour.request("GET", "/release-close").status == 200


def test_a_list_subclass_is_iterated_as_the_app_defines(behaviour):
    """Only a plain list is taken as it is: a subclass's __iter__ is the app's."""
    assert behaviour.request("GET", "/list-subclass").body == b"ABC"


# -- wsgi.file_wrapper -----------------------------------------------------------


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("files") / "random.bin"
    data = os.urandom(1024 * 1024 + 123)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("cl", ["1", "0"])
def test_file_wrapper_serves_a_real_file(behaviour, big_file, cl):
    path, digest = big_file
    with behaviour.connect(timeout=30) as conn:
        conn.send_request("GET", f"/file?path={path}&cl={cl}", {"Host": "x"})
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.complete
        assert hashlib.sha256(resp.body).hexdigest() == digest
        if cl == "1" or not resp.chunked:
            # Without the app's Content-Length the server may send the file's size itself.
            assert resp.header("Content-Length") == str(path.stat().st_size)
        # The connection is still in step.
        conn.send_request("GET", "/fixed", {"Host": "x"})
        assert conn.read_response().body == b"hello world"


def test_content_length_given_twice_by_the_app(behaviour):
    """The same value twice is sent once (nginx refuses a response with two);
    two values are a 500 that says so."""
    with behaviour.connect() as conn:
        conn.send_request("GET", "/lengths?values=6,6", {"Host": "x"})
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"abcdef")
        assert [v for k, v in resp.headers if k.lower() == "content-length"] == ["6"]
    mark = behaviour.mark()
    assert behaviour.request("GET", "/lengths?values=6,7").status == 500
    behaviour.wait_for("conflicting Content-Length headers", since=mark)


def test_the_log_stays_out_of_connections_after_the_app_closes_standard_error(start_server):
    """Descriptors 0-2 closed by the app go to the next connections accepted; the
    log, written to a copy of standard error taken at start, must not follow."""
    server = start_server("behaviour:application", workers=1, threads=1)
    assert server.request("GET", "/close-std").body == b"closed"
    conns = [server.connect() for _ in range(4)]  # the first three get numbers 0, 1, 2
    try:
        for conn in conns:
            conn.send_request("GET", "/fixed", {"Host": "x"})
            assert conn.read_response().body == b"hello world"
        mark = server.mark()
        for conn in conns:
            conn.send_request("GET", "/raise-before", {"Host": "x"})
            resp = conn.read_response()
            assert resp.status == 500 and b"Traceback" not in resp.body, resp.body
            conn.send_request("GET", "/fixed", {"Host": "x"})
            assert conn.read_response().body == b"hello world"
        server.wait_for("boom before start_response", count=4, since=mark)
    finally:
        for conn in conns:
            conn.close()


def test_a_child_the_app_forks_holds_neither_the_clients_connection_nor_the_port(start_server):
    """A child that outlives the request (a process pool the app starts) holds
    copies of the worker's descriptors: the client still sees its body end, and
    once the server stops, its port is free again."""
    server = start_server("behaviour:application", workers=1)
    child = None
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /fork-child?secs=60 HTTP/1.0\r\nHost: x\r\n\r\n")
            raw = sock.makefile("rb").read()  # to the end of the connection
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        child = int(body)
        os.kill(child, 0)  # alive, holding its copies
        server.signal(signal.SIGTERM)
        assert server.wait_exit(30) == 0
        os.kill(child, 0)
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", server.port))
    finally:
        if child:
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("target", ["/raise-after", "/raise-after-cl"])
def test_a_failed_body_ends_with_a_reset_after_the_app_forked(start_server, target):
    """Once the app has forked a child that holds copies of the worker's
    descriptors, a body the app failed in the middle of still ends with a
    reset: a plain close (which a shutdown sends) would pass for the end of
    a body read to the close (HTTP/1.0 here, or a front end's stream)."""
    server = start_server("behaviour:application", workers=1)
    child = None
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /fork-child?secs=60 HTTP/1.0\r\nHost: x\r\n\r\n")
            child = int(sock.makefile("rb").read().partition(b"\r\n\r\n")[2])
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            got = b""
            with pytest.raises(ConnectionResetError):
                while chunk := sock.recv(65536):
                    got += chunk
    finally:
        if child:
            os.kill(child, signal.SIGKILL)


def test_an_app_recursing_deep_in_c_has_the_stack_a_python_thread_has(behaviour):
    """json.dumps of a list nested 20000 deep runs in a Python thread (8 MiB of
    stack by default); a serving thread must have as much, or the worker dies."""
    depth = 20000
    resp = behaviour.request("GET", f"/deep?depth={depth}")
    assert (resp.status, resp.body) == (200, f"{2 * (depth + 1)} bytes".encode())


def test_a_file_with_nothing_left_after_write_ends_a_chunked_body_once(behaviour, big_file):
    """write() made the body chunked; a file_wrapper over a file read to its end
    adds no chunk, so the body ends with one last-chunk and the next response on
    the connection is read from the right byte."""
    path, _ = big_file
    with behaviour.connect(timeout=30) as conn:
        conn.send_request("GET", f"/file?path={path}&cl=0&write=before&at_end=1", {"Host": "x"})
        resp = conn.read_response()
        assert (resp.status, resp.chunked, resp.complete, resp.body) == (200, True, True, b"before")
        conn.send_request("GET", "/fixed", {"Host": "x"})
        assert conn.read_response().body == b"hello world"


@pytest.mark.parametrize("cl", ["1", "0"])
def test_file_that_shrinks_while_sent_ends_the_connection_with_a_log_line(behaviour, tmp_path, cl):
    path = tmp_path / "shrinks.bin"
    size = 64 * 1024 * 1024
    with open(path, "wb") as f:
        f.truncate(size)
    mark = behaviour.mark()
    with behaviour.connect(timeout=30) as conn:
        conn.send_request("GET", f"/file?path={path}&cl={cl}", {"Host": "x"})
        # Far more than the socket buffers hold: the server is mid-file when it shrinks.
        time.sleep(0.5)
        os.truncate(path, 1024 * 1024)
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.header("Content-Length") == str(size)
        assert not resp.complete
        assert conn.at_eof(10)
    if cl == "1":
        behaviour.wait_for(rf"the app declared Content-Length {size} but sent \d+ bytes", since=mark)
    else:
        behaviour.wait_for(rf"the body ended after \d+ of the {size} bytes its file had", since=mark)


def test_file_wrapper_head(behaviour, big_file):
    path, _ = big_file
    resp = behaviour.request("HEAD", f"/file?path={path}")
    assert resp.status == 200
    assert resp.header("Content-Length") == str(path.stat().st_size)
    assert resp.body == b""


@pytest.mark.parametrize("blksize", [8192, 1, -1])
def test_file_wrapper_falls_back_to_iteration_without_fileno(behaviour, blksize):
    # A negative blksize reads the rest at once, as under wsgiref and gunicorn.
    size = 100000 if blksize != 1 else 3000
    resp = behaviour.request("GET", f"/bytesio?size={size}&blksize={blksize}")
    assert resp.status == 200
    assert resp.body == bytes(i % 251 for i in range(size))


def test_file_wrapper_may_be_subclassed(behaviour):
    resp = behaviour.request("GET", "/bytesio?size=100000&subclass=1")
    assert (resp.status, resp.body) == (200, bytes(i % 251 for i in range(100000)))


def test_file_wrapper_over_a_decoding_file_sends_what_read_returns(behaviour):
    """gzip.open()'s fileno() is the compressed file's: sending that
    descriptor would send the compressed bytes."""
    resp = behaviour.request("GET", "/gzip?size=300000")
    assert resp.status == 200
    assert resp.body == bytes(i % 251 for i in range(300000))


# -- app exceptions ------------------------------------------------------------------


def test_exception_before_start_response_is_500_with_traceback_logged(behaviour):
    mark = behaviour.mark()
    resp = behaviour.request("GET", "/raise-before")
    assert resp.status == 500
    assert b"boom before start_response" not in resp.body, "the traceback must not leak to the client"
    behaviour.wait_for("Traceback", since=mark)
    behaviour.wait_for("RuntimeError: boom before start_response", since=mark)
    assert behaviour.request("GET", "/fixed").status == 200


def test_undecodable_text_in_wsgi_errors_and_exceptions_is_logged_escaped(behaviour):
    mark = behaviour.mark()
    assert behaviour.request("GET", "/undecodable").status == 500
    behaviour.wait_for(r"cannot open file\\udcff\.txt", since=mark)
    behaviour.wait_for("Traceback", since=mark)
    behaviour.wait_for(r"FileNotFoundError: no such file: file\\udcff\.txt", since=mark)


def test_control_characters_of_an_exception_message_are_logged_escaped(behaviour):
    """A NUL would make the log file binary to grep; a carriage return or an
    escape sequence could hide what precedes it on a terminal."""
    mark = behaviour.mark()
    assert behaviour.request("GET", "/raise-before?more=%00nul%0Dcr%1B%5B2Jesc").status == 500
    behaviour.wait_for(r"RuntimeError: boom before start_response\\x00nul\\x0dcr\\x1b\[2Jesc", since=mark)
    assert not behaviour.grep("\x00|\r", since=mark)


def test_a_body_before_start_response_is_a_500_that_says_so(behaviour):
    mark = behaviour.mark()
    assert behaviour.request("GET", "/no-start").status == 500
    behaviour.wait_for(r"gave body bytes before start_response\(\) was called", since=mark)


def test_no_start_response_and_a_failing_close_are_both_logged(behaviour):
    mark = behaviour.mark()
    assert behaviour.request("GET", "/close-fails?nostart=1").status == 500
    behaviour.wait_for(r"the application returned without calling start_response", since=mark)
    behaviour.wait_for(r"Traceback", since=mark)


def test_exception_after_headers_aborts_a_chunked_response(behaviour):
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send_request("GET", "/raise-after", {"Host": "x"})
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.chunked
        assert resp.body == b"part one\n"
        assert not resp.complete, "no terminating chunk may follow a failed body"
        assert conn.at_eof(10)
    behaviour.wait_for("RuntimeError: boom after the headers were sent", since=mark)
    assert behaviour.request("GET", "/fixed").status == 200


def test_an_exception_after_a_head_response_went_out_ends_it_with_a_plain_close(behaviour):
    """A HEAD response is whole once its head is out: the app's later failure
    is logged, and the connection closes without a reset, which would have
    destroyed what the client had not read yet."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(b"HEAD /raise-after HTTP/1.1\r\nHost: x\r\n\r\nGET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response(head=True)
        assert resp.status == 200
        assert conn.at_eof(10)
    behaviour.wait_for("RuntimeError: boom after the headers were sent", since=mark)


def test_exception_after_headers_aborts_a_content_length_response(behaviour):
    with behaviour.connect() as conn:
        conn.send_request("GET", "/raise-after-cl", {"Host": "x"})
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"part one\n"
        assert not resp.complete
        assert conn.at_eof(10)


def test_an_exception_after_a_whole_content_length_body_keeps_the_response(behaviour):
    """The generator's code after its last yield fails: the client already
    has every byte the Content-Length promised, or is about to, so it gets
    them all and a plain close (gunicorn and uWSGI send them too), not a
    reset that would drop what is still on its way; the log says it stood."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(b"GET /raise-after-whole HTTP/1.1\r\nHost: x\r\n\r\n")
        # The server is done, and the tail of the body still in the sockets,
        # before the client reads.
        behaviour.wait_for(r"RuntimeError: cleanup failed after the whole body", since=mark)
        resp = conn.read_response()
        assert (resp.status, resp.complete) == (200, True)
        assert resp.body == (bytes(range(251)) * ((4 << 20) // 251 + 1))[: 4 << 20]
        assert conn.at_eof(10)
    behaviour.wait_for(
        r"Error handling request GET /raise-after-whole \(its response had gone out whole", since=mark
    )


def test_close_that_raises_after_a_whole_body_keeps_the_response(behaviour):
    """The client already has the whole body: it gets a complete response (the
    chunked terminator included) and the connection stays usable; the log gets
    the error."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(b"GET /close-fails HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        assert (resp.status, resp.body, resp.complete) == (200, b"hello world", True)
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body == b"hello world"
    behaviour.wait_for(r"Error in close\(\) of the response iterable of GET /close-fails", since=mark)
    behaviour.wait_for(r"RuntimeError: close failed", since=mark)


def test_close_that_raises_after_the_iteration_failed_is_logged_too(behaviour):
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(b"GET /close-fails?mid=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not conn.read_response().complete
    behaviour.wait_for(r"ValueError: iteration failed", since=mark)
    behaviour.wait_for(
        r"Error in close\(\) of the response iterable of GET /close-fails\?mid=1, after the error above",
        since=mark,
    )
    behaviour.wait_for(r"RuntimeError: close failed", since=mark)


def test_an_environ_the_app_keeps_does_not_keep_its_connections_buffers(start_server):
    """wsgi.input outlives the connection when the app keeps the environ; the
    connection's read and write buffers (64 KiB and more after a body) must
    not."""
    server = start_server("behaviour:application")
    body = b"x" * 100_000

    def rss():
        resp = server.request("POST", "/keep-environ", body=body)
        assert resp.status == 200, resp.body
        return int(resp.body)

    for _ in range(50):
        before = rss()
    for _ in range(1500):
        after = rss()
    # About 36 KB each when the buffers stayed (54 MB here), 1 MB in all
    # for 600 without them.
    assert after - before < 20_000, (before, after)


def test_a_forked_child_returning_from_the_app_leaves_without_answering(behaviour):
    mark = behaviour.mark()
    worker = behaviour.request("GET", "/pid").body.decode()
    with behaviour.connect() as conn:
        conn.send(b"GET /fork-returns HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        # Only the worker answers: the child neither wrote on its connection nor lived on.
        assert resp.body == f"parent {worker}, child exit code 1".encode()
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body.decode() == worker
    behaviour.wait_for(
        r"GET /fork-returns: the app forked \(pid \d+ -> \d+\) and the child returned", since=mark
    )
    assert {behaviour.request("GET", "/pid").body.decode() for _ in range(20)} == {worker}


@pytest.mark.parametrize("at", ["iter", "close"])
def test_a_child_forked_in_the_iterable_or_close_leaves_without_touching_the_response(start_server, at):
    """A child the app forks while its response is sent goes on from there
    in the server's code: it leaves at once, before it writes to (or resets)
    the parent's connection, and the parent's response goes out whole."""
    server = start_server("behaviour:application", threads=2)
    (worker,) = server.worker_pids()
    mark = server.mark()
    with server.connect() as conn:
        conn.send(b"GET /fork-in-iterable?at=%s HTTP/1.1\r\nHost: x\r\n\r\n" % at.encode())
        resp = conn.read_response()
        assert resp.body == f"before after in {worker}".encode()
        conn.send(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body.decode() == str(worker)
    server.wait_for(
        r"GET /fork-in-iterable\?at=\w+: the app forked \(pid \d+ -> \d+\) and the child returned", since=mark
    )
    if at == "close":
        server.wait_for(r"close forked a child that ended with 1", since=mark)
    assert "Error handling request" not in server.log[mark:], server.log[mark:]
    assert {int(server.request("GET", "/pid").body) for _ in range(10)} == {worker}


def test_a_multiprocessing_process_started_in_a_request_reports_its_real_exit_code(behaviour):
    """Started from a serving thread (a dummy thread to Python), its process
    used to fail threading's shutdown and report 1 whatever its target did."""
    assert behaviour.request("GET", "/mp-exitcode", timeout=60).body == b"0"


@pytest.mark.parametrize("sig", ["TERM", "INT", "QUIT", "USR1", "USR2"])
def test_a_process_the_app_forks_takes_signals_as_any_program(behaviour, sig):
    """The worker's handlers only note a signal for its main thread, which
    the child has not got: it gets the default actions back (HUP, TTIN, TTOU
    and WINCH, the master's when sent to the whole group, stay without
    effect)."""
    resp = behaviour.request("GET", f"/fork-then-signal?sig={sig}", timeout=30)
    assert resp.body == f"signal SIG{sig}".encode()


def test_an_app_that_returns_none_gets_500_and_a_line_that_says_so(behaviour):
    mark = behaviour.mark()
    assert behaviour.request("GET", "/return-none").status == 500
    behaviour.wait_for(r"the application returned a NoneType object, not an iterable of bytes", since=mark)


@pytest.mark.parametrize("fd", [1, 2])
def test_a_standard_stream_the_app_closed_never_becomes_a_client_connection(start_server, fd):
    """After the app closed fd 1 or 2, the next connection would get that
    number, and what the app prints would go to that client."""
    server = start_server("behaviour:application", threads=2)
    mark = server.mark()
    assert server.request("GET", f"/close-fd?fd={fd}").body == b"closed"
    with server.connect() as victim:
        victim.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        assert victim.read_response().body == b"hello world"
        assert server.request("GET", f"/write-fd?fd={fd}").body == b"written"
        victim.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = victim.read_response()
        assert (resp.status, resp.body) == (200, b"hello world")
    name = {1: "output", 2: "error"}[fd]
    server.wait_for(
        rf"The app closed descriptor {fd} \(standard {name}\); the error log is in its place", since=mark
    )
    # What the app writes there reaches the log (it went to /dev/null).
    server.wait_for(r"WRITTEN-BY-THE-APP", since=mark)


@pytest.mark.parametrize("threads", [1, 4])
def test_the_flusher_rests_while_a_slow_stream_holds_nothing(start_server, threads):
    """Held bytes go out within the hold time; after that, a pass that goes on
    (a stream that waits between pieces) holds nothing, and the flusher thread
    sleeps instead of waking every millisecond until the pass ends."""
    server = start_server("behaviour:application", threads=threads)
    (worker,) = server.worker_pids()

    def find_flusher():
        # A thread names itself once it runs, which may be just after "Worker ready".
        tasks = os.listdir(f"/proc/{worker}/task")
        named = [
            t
            for t in tasks
            if pathlib.Path(f"/proc/{worker}/task/{t}/comm").read_text().strip() == "corral-flush"
        ]
        return named[0] if named else None

    wait_until(find_flusher)
    flusher = find_flusher()

    def wakeups():
        with open(f"/proc/{worker}/task/{flusher}/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("voluntary_ctxt_switches")))

    before = wakeups()
    resp = server.request("GET", "/burst-then-slow?slow=2", timeout=30)
    assert resp.status == 200 and resp.body.startswith(b"burst 0\nburst 1\nburst 2\nslow 0")
    # A timer every millisecond would be some 2000 wake-ups over the 2 s.
    assert wakeups() - before < 100


def test_a_file_wrapper_download_read_slowly_holds_no_thread(start_server, tmp_path):
    """One worker with one thread: the rest of a wsgi.file_wrapper file that a
    client reads slowly is sent by the offload thread, after the app returned and
    its iterable (and the file) were closed; the serving thread answers others
    meanwhile, and the download arrives whole on a connection that stays in step."""
    size = 48 << 20
    path = tmp_path / "big.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    server = start_server("behaviour:application")
    with slow_reader(server) as slow:
        slow.send_request("GET", f"/file?path={path}", {"Host": "x"})
        head = slow.read_head()
        assert head.status == 200 and int(head.header("Content-Length")) == size
        time.sleep(0.5)
        for i in range(5):
            assert server.request("GET", f"/fixed?n={i}", timeout=20).status == 200
        assert read_hashed(slow, size) == (size, hashlib.sha256(data).hexdigest())
        slow.send_request("GET", "/fixed", {"Host": "x"})
        assert slow.read_response().body == b"hello world"


def test_a_file_opened_in_text_mode_goes_out_as_its_bytes(behaviour, tmp_path):
    """uWSGI sends a file_wrapper's file with sendfile whatever its mode (where
    gunicorn refuses one in text mode); so does corral, for one of which
    nothing was read."""
    data = "héllo\r\nwörld\n".encode() * 1000
    path = tmp_path / "text.txt"
    path.write_bytes(data)
    resp = behaviour.request("GET", f"/file?path={path}&mode=r")
    assert (resp.status, resp.complete, resp.body) == (200, True, data)


def test_a_client_leaving_an_offloaded_download_is_logged_as_a_streamed_one_is(start_server, tmp_path):
    """The offload thread's send that fails on a closed connection gets the
    request's "client disconnected" line, as a streamed response has, so an
    aborted download is told from a finished one without counting bytes."""
    size = 48 << 20
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(size))
    server = start_server("behaviour:application")
    with slow_reader(server) as slow:
        slow.send_request("GET", f"/file?path={path}", {"Host": "x"})
        assert slow.read_head().status == 200
        time.sleep(0.3)
        # Unread bytes at the close make it a reset, so the next send fails.
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.wait_for(r"GET /file\?path=\S+ from 127\.0\.0\.1:\d+: client disconnected \(.*\) during the file")
    assert server.request("GET", "/fixed").status == 200


def test_the_apps_handles_are_stale_once_its_file_is_offloaded(start_server, tmp_path):
    """An app that keeps write() and calls it after returning a file_wrapper, while
    the offload thread still sends the file: the call fails as after any response,
    and nothing of it reaches the body."""
    size = 16 << 20
    path = tmp_path / "big.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    server = start_server("behaviour:application", threads=2)
    with slow_reader(server) as slow:
        slow.send_request("GET", f"/file-late-write?path={path}&id=a&after=0.3", {"Host": "x"})
        assert slow.read_head().status == 200
        assert wait_until(lambda: server.get_json("/late-write?id=a")["result"] is not None)
        assert server.get_json("/late-write?id=a")["result"] == (
            "ValueError: response used after its request ended"
        )
        assert read_hashed(slow, size) == (size, hashlib.sha256(data).hexdigest())
        slow.send_request("GET", "/fixed", {"Host": "x"})
        assert slow.read_response().body == b"hello world"


def test_a_file_whose_size_the_kernel_does_not_know_is_read_whole(behaviour):
    """/proc files report size 0: file_wrapper iterates them instead of sending 0 bytes."""
    resp = behaviour.request("GET", "/file?path=/proc/self/status&cl=0")
    assert resp.status == 200
    assert b"Name:" in resp.body
    # sysfs gives every file the size 4096, whatever it holds.
    sysfs = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(sysfs):
        with open(sysfs, "rb") as f:
            want = f.read()
        resp = behaviour.request("GET", f"/file?path={sysfs}&cl=0")
        assert (resp.status, resp.complete, resp.body) == (200, True, want)


def test_a_worker_stuck_past_timeout_lets_its_downloads_finish(start_server, tmp_path):
    """--timeout with one thread: a request stuck past it while the offload thread
    sends another client's file. The worker is replaced, but the download goes on
    to its end instead of being cut when the worker leaves."""
    size = 16 << 20
    path = tmp_path / "big.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    server = start_server("behaviour:application", "--timeout", "2")
    with slow_reader(server) as slow:
        slow.send_request("GET", f"/file?path={path}", {"Host": "x"})
        assert slow.read_head().status == 200
        time.sleep(0.3)
        assert server.request("GET", "/slow?secs=15&id=stuck", timeout=30).status == 504
        time.sleep(1)
        assert read_hashed(slow, size) == (size, hashlib.sha256(data).hexdigest())


def test_start_response_takes_effect_whole_or_not_at_all(behaviour):
    """A header start_response refuses leaves nothing of the call behind: an
    app that catches the error may call it again, and one that does not is a
    500, never a response with half its headers."""
    resp = behaviour.request("GET", "/catch-bad-header?retry=1")
    assert (resp.status, resp.header("X-Retry"), resp.header("X-Good")) == (200, "1", None)
    assert resp.body in (b"ValueError", b"TypeError")
    resp = behaviour.request("GET", "/catch-bad-header")
    assert resp.status == 500 and resp.header("X-Good") is None
