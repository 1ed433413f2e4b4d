"""HTTP/1.1 behaviour (RFC 9110/9112), driven with raw sockets."""

import contextlib
import email.utils
import json
import select
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import slow_reader, wait_until


def _get(conn, target, version="HTTP/1.1", headers=None, method="GET", body=b""):
    conn.send_request(method, target, {"Host": "localhost", **(headers or {})}, body, version=version)
    return conn.read_response(head=method == "HEAD")


def test_keep_alive_serves_several_requests_on_one_connection(behaviour):
    with behaviour.connect() as conn:
        ports = set()
        for i in range(5):
            resp = _get(conn, f"/environ?i={i}")
            assert resp.status == 200
            assert resp.header("Connection", "").lower() != "close"
            env = json.loads(resp.body)
            assert env["QUERY_STRING"]["value"] == f"i={i}"
            ports.add(env["REMOTE_PORT"]["value"])
        # The same connection carried every request.
        assert ports == {str(conn.sock.getsockname()[1])}
        assert not conn.eof


def test_pipelined_requests_are_answered_in_order(behaviour):
    with behaviour.connect() as conn:
        conn.send(b"".join(f"GET /stream?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in (1, 2, 3)))
        bodies = [conn.read_response().body for _ in range(3)]
    assert bodies == [b"chunk0\n", b"chunk0\nchunk1\n", b"chunk0\nchunk1\nchunk2\n"]


def test_pipelined_requests_with_bodies(behaviour):
    reqs = b"".join(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
        for b in (b"one", b"second", b"")
    )
    reqs += b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfour\r\n0\r\n\r\n"
    with behaviour.connect() as conn:
        conn.send(reqs)
        bodies = [conn.read_response().body for _ in range(4)]
    assert bodies == [b"one", b"second", b"", b"four"]


def test_http10_closes_by_default(behaviour):
    with behaviour.connect() as conn:
        resp = _get(conn, "/fixed", version="HTTP/1.0")
        assert resp.status == 200
        assert resp.version == "HTTP/1.1"
        assert resp.body == b"hello world"
        assert conn.at_eof(10), "an HTTP/1.0 connection without keep-alive must be closed"


def test_http10_keep_alive_when_asked(behaviour):
    with behaviour.connect() as conn:
        for _ in range(3):
            resp = _get(conn, "/fixed", version="HTTP/1.0", headers={"Connection": "keep-alive"})
            assert resp.status == 200
            assert resp.body == b"hello world"
            assert resp.header("Connection", "").lower() == "keep-alive"


def test_http11_connection_close_is_honoured(behaviour):
    with behaviour.connect() as conn:
        resp = _get(conn, "/fixed", headers={"Connection": "close"})
        assert resp.status == 200
        assert resp.header("Connection", "").lower() == "close"
        assert conn.at_eof(10)


def test_chunked_request_body(behaviour):
    with behaviour.connect() as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"hello world"
        # The connection is still usable afterwards.
        assert _get(conn, "/fixed").body == b"hello world"


def test_large_chunked_request_body(behaviour):
    payload = bytes(range(256)) * 4096  # 1 MiB
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + 70000]), payload[i : i + 70000])
        for i in range(0, len(payload), 70000)
    )
    with behaviour.connect() as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        )
        resp = conn.read_response()
    assert resp.status == 200
    assert resp.body == payload


def test_chunked_response_without_content_length(behaviour):
    with behaviour.connect() as conn:
        resp = _get(conn, "/stream?n=4")
        assert resp.status == 200
        assert resp.chunked, resp.headers
        assert resp.header("Content-Length") is None
        assert resp.complete
        assert resp.body == b"chunk0\nchunk1\nchunk2\nchunk3\n"
        # Properly terminated: the next request on the connection works.
        assert _get(conn, "/fixed").body == b"hello world"


def test_http10_response_without_content_length_is_close_delimited(behaviour):
    with behaviour.connect() as conn:
        resp = _get(conn, "/stream?n=3", version="HTTP/1.0")
        assert resp.status == 200
        assert resp.header("Transfer-Encoding") is None
        assert resp.header("Content-Length") is None
        assert resp.body == b"chunk0\nchunk1\nchunk2\n"
        assert conn.eof


def test_empty_response_body(behaviour):
    with behaviour.connect() as conn:
        resp = _get(conn, "/stream?n=0")
        assert resp.status == 200
        assert resp.body == b""
        assert resp.complete
        assert _get(conn, "/fixed").body == b"hello world"


@pytest.mark.parametrize("target", ["/fixed", "/stream?n=3", "/environ"])
def test_head_has_the_headers_of_get_and_no_body(behaviour, target):
    with behaviour.connect() as conn:
        get = _get(conn, target)
        head = _get(conn, target, method="HEAD")
        assert head.status == get.status == 200
        assert head.body == b""
        if get.header("Content-Length") is not None and target != "/environ":
            assert head.header("Content-Length") == get.header("Content-Length")
        assert head.header("Content-Type") == get.header("Content-Type")
        # No body bytes were sent after the HEAD response: the next response parses cleanly.
        nxt = _get(conn, "/fixed")
        assert nxt.status == 200
        assert nxt.body == b"hello world"


def test_head_gets_the_content_length_get_would_have(behaviour):
    with behaviour.connect() as conn:
        get = _get(conn, "/status?body=hello-body")
        head = _get(conn, "/status?body=hello-body", method="HEAD")
        assert get.header("Content-Length") == "10"
        assert head.header("Content-Length") == "10"
        assert head.body == b""
        assert _get(conn, "/fixed").body == b"hello world"
        # An empty body on HEAD (Werkzeug returns none for HEAD, whatever GET sends)
        # says nothing of GET's length: no Content-Length: 0.
        assert _get(conn, "/status", method="HEAD").header("Content-Length") is None


def test_a_204_carries_no_content_length_or_body(behaviour):
    with behaviour.connect() as conn:
        resp = _get(conn, "/status?s=204+No+Content&cl=5&body=hello")
        assert resp.status == 204
        assert resp.header("Content-Length") is None
        assert resp.body == b""
        assert _get(conn, "/fixed").body == b"hello world"


@pytest.mark.parametrize("length", ["&cl=5", ""])
def test_a_205_says_it_has_no_content_and_sends_none(behaviour, length):
    # RFC 9110 15.3.6: no content, and Content-Length: 0 so that the client
    # knows it and the connection goes on, whatever the app gave.
    with behaviour.connect() as conn:
        conn.send(f"GET /status?s=205+Reset+Content{length}&body=hello HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp = conn.read_response()
        assert resp.status == 205
        assert resp.header_all("Content-Length") == ["0"]
        assert resp.header("Transfer-Encoding") is None
        assert resp.body == b""
        assert _get(conn, "/fixed").body == b"hello world"


@pytest.mark.parametrize(
    "status", ["100 Continue", "101 Switching Protocols", "103 Early Hints", "600 Odd", "999 X"]
)
def test_a_status_that_cannot_be_final_is_refused(behaviour, status):
    """A WSGI response is final: a 1xx would make the client take the next response
    for this one, and codes end at 599. The app gets a 500 and the log says why."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        resp = _get(conn, "/status?s=" + status.replace(" ", "+") + "&body=x")
        assert resp.status == 500
        assert _get(conn, "/fixed").body == b"hello world"
    behaviour.wait_for(r"invalid status .*a WSGI response's status is 200 to 599", since=mark)


def test_a_bare_status_code_is_taken_as_gunicorn_takes_it(behaviour):
    """PEP 3333 wants a reason phrase; "201" alone still answers 201, with the
    status line's space before the empty reason."""
    with behaviour.connect() as conn:
        conn.send(b"GET /status?s=201&body=made HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_exact(15) == b"HTTP/1.1 201 \r\n"
    resp = behaviour.request("GET", "/status?s=201&body=made")
    assert (resp.status, resp.reason, resp.body) == (201, "", b"made")


def test_absolute_form_target_replaces_host(behaviour):
    with behaviour.connect() as conn:
        conn.send(b"GET http://example.com:81/environ?x=1 HTTP/1.1\r\nHost: other\r\n\r\n")
        env = json.loads(conn.read_response().body)
        assert env["HTTP_HOST"]["value"] == "example.com:81"
        assert env["PATH_INFO"]["value"] == "/environ"
        assert env["QUERY_STRING"]["value"] == "x=1"
        # userinfo is not part of the host.
        conn.send(b"GET http://good.example@evil.example/environ HTTP/1.1\r\nHost: good.example\r\n\r\n")
        assert json.loads(conn.read_response().body)["HTTP_HOST"]["value"] == "evil.example"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /fixed HTTP/1.1\r\nHost: a b@c/d\r\n\r\n",
        b"GET /fixed HTTP/1.1\r\nHost: evil.com/x\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\nContent-Length: 3\r\n\r\nabc",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"\r\n" * 4096 + b"GET /fixed HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["host-with-space", "host-with-path", "empty-te-with-cl", "empty-te", "empty-line-flood"],
)
def test_heads_refused_with_400(behaviour, raw):
    with behaviour.connect() as conn:
        conn.send(raw)
        resp = conn.read_response()
        assert resp.status == 400
        assert conn.at_eof(10)


def test_date_header(behaviour):
    resp = behaviour.request("GET", "/fixed")
    date = resp.header("Date")
    assert date is not None
    parsed = email.utils.parsedate_to_datetime(date)
    assert parsed.tzinfo is not None
    assert date.endswith(" GMT")
    assert abs(parsed.timestamp() - time.time()) < 300


def test_the_apps_own_date_header_replaces_the_servers(behaviour):
    with behaviour.connect() as conn:
        conn.send(b"GET /status?date=Mon,%2001%20Jan%202001%2000:00:00%20GMT HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().header_all("Date") == ["Mon, 01 Jan 2001 00:00:00 GMT"]
        # The next response on the connection gets the server's again.
        conn.send(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        (date,) = conn.read_response().header_all("Date")
        assert date != "Mon, 01 Jan 2001 00:00:00 GMT"


def test_expect_100_continue_when_the_app_reads(behaviour):
    with behaviour.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        interim = conn.read_head()
        assert interim.status == 100
        assert interim.version == "HTTP/1.1"
        conn.send(b"hello world")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"hello world"
        assert _get(conn, "/fixed").body == b"hello world"


def test_expect_100_continue_chunked(behaviour):
    with behaviour.connect() as conn:
        conn.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        assert conn.read_head().status == 100
        conn.send(b"3\r\nabc\r\n0\r\n\r\n")
        resp = conn.read_response()
        assert resp.body == b"abc"


def test_no_100_continue_when_the_app_does_not_read(behaviour):
    with behaviour.connect() as conn:
        conn.send(
            b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.body == b"ignored"
        assert resp.interim == []
        # The body was never sent: the server must not wait for it nor read it as a request.
        conn.sock.settimeout(3)
        try:
            rest = conn.read_to_close()
        except TimeoutError:
            rest = conn.buf
        assert b"100 Continue" not in rest


@pytest.mark.parametrize("declared", [100_000_000, 500_000], ids=["over-the-drain-limit", "stalled"])
def test_an_unread_body_the_client_never_finishes_does_not_hold_the_thread(start_server, declared):
    """The app ignores the body; the client sends 100 kB of it and stops. The
    one serving thread answers it, then must not wait for the rest of the
    body (its I/O timeout is 60 s) while another client waits."""
    server = start_server("behaviour:application", threads=1)
    with server.connect(timeout=30) as stalled:
        stalled.send(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % declared)
        stalled.send(b"x" * 100_000)
        resp = stalled.read_response()
        assert resp.body == b"ignored"
        # More than the server reads to drop: the response says it closes.
        assert resp.header("Connection") == ("close" if declared > 1 << 20 else None)
        # The client holds its connection open and sends nothing more.
        assert server.request("GET", "/fixed", timeout=15).body == b"hello world"
        assert stalled.at_eof(15)
    if declared < 1 << 20:
        # The response promised to keep the connection: the log says why it did not.
        server.wait_for(
            r"POST /ignore-body from 127\.0\.0\.1:\d+: closing the connection: the rest of a request body "
            r"the app did not read was still to come 2 s after the request ended"
        )


def test_unread_bodies_that_stall_do_not_take_turns_holding_the_thread(start_server):
    """Clients that each declare a body the app ignores and never send it:
    with one thread, each of them used to hold it while the rest of its body
    was awaited (2 s), so the next got its answer only after that. The rest
    is awaited in the event loop instead: all are answered, and so is
    another client, while their connections wait for it."""
    server = start_server("behaviour:application", threads=1)
    stalled = [server.connect(timeout=30) for _ in range(3)]
    ports = [c.sock.getsockname()[1] for c in stalled]
    for conn in stalled:
        conn.send(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n")
    for conn in stalled:
        resp = conn.read_response()
        assert (resp.status, resp.body, resp.header("Connection")) == (200, b"ignored", None)
    assert server.request("GET", "/fixed").body == b"hello world"
    # Still waiting for their bodies: none was given up before the others were answered.
    assert not any(conn.at_eof(0.01) for conn in stalled)
    for conn in stalled:
        assert conn.at_eof(15)
        conn.close()
    said = "POST /ignore-body from 127.0.0.1:{}: closing the connection: the rest of a request body the app did not read"
    assert wait_until(lambda: all(said.format(port) in server.log for port in ports))


def test_the_rest_of_an_unread_body_coming_later_keeps_the_connection(start_server):
    """The rest of a body the app did not read, sent after the response, is
    dropped as it comes (Content-Length and chunked), and the next request
    on the connection is served."""
    server = start_server("behaviour:application", threads=1)
    with server.connect(timeout=30) as conn:
        conn.send(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n" + b"a" * 70_000)
        assert conn.read_response().body == b"ignored"
        for _ in range(2):
            time.sleep(0.2)
            conn.send(b"b" * 115_000)
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"hello")
    assert "closing the connection" not in server.log


def test_a_head_that_comes_with_the_end_of_an_unread_body_has_its_own_header_timeout(start_server):
    """The next request's head arriving with the last bytes of the body the
    app did not read has the header timeout from then, not from the
    response before it."""
    server = start_server("behaviour:application", "--header-timeout", "1", threads=1)
    with server.connect(timeout=30) as conn:
        conn.send(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n" + b"a" * 70_000)
        assert conn.read_response().body == b"ignored"
        # Past the header timeout counted from the response (the rest is
        # awaited for 2 s), the rest of the body and the start of a head...
        time.sleep(1.5)
        conn.send(b"b" * 230_000 + b"GET /fixed HTTP/1.1\r\nHo")
        # ...which ends within the header timeout counted from its start.
        time.sleep(0.3)
        conn.send(b"st: x\r\n\r\n")
        assert conn.read_response().body == b"hello world"
    assert "Timed out" not in server.log


def test_a_chunked_body_left_unread_closes_the_connection_and_says_so(start_server):
    """The rest of a chunked body has no known size: a response sent before
    it is all in says Connection: close, rather than promising a connection
    the server may then close under the client's next request."""
    server = start_server("behaviour:application", threads=1)
    with server.connect(timeout=30) as conn:
        conn.send(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b"%x\r\n%s\r\n" % (200_000, b"x" * 200_000))
        resp = conn.read_response()
        assert (resp.body, resp.header("Connection")) == (b"ignored", "close")
        # A small chunked body, read whole before the app runs, keeps it.
    with server.connect(timeout=30) as conn:
        conn.send(
            b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        resp = conn.read_response()
        assert (resp.body, resp.header("Connection")) == (b"ignored", None)
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body == b"hello world"


def test_a_chunked_body_sent_whole_while_the_app_ran_keeps_the_connection(start_server):
    """The app answers without reading a chunked body whose rest came while
    it ran: what the socket holds is read before the head is written, the
    body's end is found there, and the connection stays open."""
    server = start_server("behaviour:application", threads=1)
    with server.connect(timeout=30) as conn:
        conn.send(b"POST /slow?secs=1&id=c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b"%x\r\n%s\r\n" % (80_000, b"x" * 80_000))
        server.wait_for("slow request started: c")
        for _ in range(3):
            conn.send(b"%x\r\n%s\r\n" % (20_000, b"y" * 20_000))
        conn.send(b"0\r\n\r\n")
        resp = conn.read_response()
        assert (resp.body, resp.header("Connection")) == (b"slept c", None)
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body == b"hello world"
    # More than the 1 MiB the server drops to keep a connection, all sent:
    # the response says the connection closes, and it does.
    with server.connect(timeout=30) as conn:
        conn.send(b"POST /slow?secs=1&id=d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        server.wait_for("slow request started: d")
        for _ in range(3):
            conn.send(b"%x\r\n%s\r\n" % (500_000, b"z" * 500_000))
        conn.send(b"0\r\n\r\n")
        resp = conn.read_response()
        assert (resp.body, resp.header("Connection")) == (b"slept d", "close")
        assert conn.at_eof(10)


def test_kept_alive_connections_do_not_wait_behind_a_batch_of_new_slow_ones(start_server):
    """One thread, busy with a slow request on a new connection; a kept-alive
    connection sends a quick one, then four more new connections bring slow
    ones. The quick one is served after at most one more slow one, not after
    the whole batch the thread can accept meanwhile."""
    server = start_server("behaviour:application", threads=1)
    finished = []
    lock = threading.Lock()

    def wait_for(name, conn):
        conn.read_response()
        with lock:
            finished.append(name)

    with server.connect(timeout=30) as kept:
        kept.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.read_response().status == 200
        slow = b"GET /slow?secs=0.5&id=%d HTTP/1.1\r\nHost: x\r\n\r\n"
        fresh = [server.connect(timeout=30)]
        fresh[0].send(slow % 0)
        server.wait_for("slow request started: 0")
        kept.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        # These arrive after the kept-alive request, while the thread is busy.
        for i in range(1, 5):
            fresh.append(server.connect(timeout=30))
            fresh[i].send(slow % i)
        readers = [threading.Thread(target=wait_for, args=("kept", kept))]
        readers += [threading.Thread(target=wait_for, args=(f"slow {i}", c)) for i, c in enumerate(fresh)]
        for r in readers:
            r.start()
        for r in readers:
            r.join(30)
        for conn in fresh:
            conn.close()
    assert len(finished) == 6, finished
    assert finished.index("kept") <= 2, finished


def test_short_app_body_closes_the_connection(behaviour):
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send_request("GET", "/short", {"Host": "x"})
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.header("Content-Length") == "10"
        assert resp.body == b"12345"
        assert not resp.complete
        assert conn.eof
    # The log says what happened to which request.
    behaviour.wait_for(r"(?i)/short.*(content-length|short|fewer|sent)", since=mark)


def test_an_app_body_past_its_content_length_is_cut_and_logged(behaviour):
    """Bytes past the declared length would be read as the next response:
    they are not sent, the connection serves on, and the log says so."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        resp = _get(conn, "/long")
        assert (resp.status, resp.body, resp.complete) == (200, b"12345", True)
        assert _get(conn, "/fixed").body == b"hello world"
    behaviour.wait_for(
        r"GET /long from 127\.0\.0\.1:\d+: the app sent more than its Content-Length \(5 bytes\)", since=mark
    )


def test_a_chunked_body_the_client_cuts_off_is_a_disconnect(behaviour):
    """A client closing inside a chunked body went away, as inside a
    Content-Length one: one log line with the peer, not a malformed body; it
    may still read, and is told 400."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.read_to_close().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    behaviour.wait_for(
        r"POST /echo from 127\.0\.0\.1:\d+: the peer closed its side inside the chunked body", since=mark
    )
    assert not behaviour.grep(r"POST /echo.*(client disconnected|not followed by CRLF)", since=mark)


def test_unknown_transfer_encoding_is_501(behaviour):
    for te in ("frobnicate", "frobnicate, chunked"):
        with behaviour.connect() as conn:
            conn.send(f"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n".encode())
            resp = conn.read_response()
            assert resp.status == 501, te
            assert conn.at_eof(10)


@pytest.mark.parametrize(("version", "status"), [("HTTP/2.0", 505), ("HTTP/3.0", 505), ("HTTP/1.10", 400)])
def test_other_http_versions_are_refused(behaviour, version, status):
    with behaviour.connect() as conn:
        conn.send(f"GET /fixed {version}\r\nHost: x\r\n\r\n".encode())
        resp = conn.read_response()
        assert resp.status == status
        assert conn.at_eof(10)


def test_a_later_http_1_minor_version_is_served_as_http_1_1(behaviour):
    # RFC 9112 2.3: HTTP/1.2 is read as the highest 1.x the server knows,
    # and the answer says HTTP/1.1; the connection stays open as 1.1's would.
    with behaviour.connect() as conn:
        conn.send(b"GET /environ HTTP/1.2\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.version == "HTTP/1.1"
        assert json.loads(resp.body)["SERVER_PROTOCOL"]["value"] == "HTTP/1.1"
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().body == b"hello world"


def test_absolute_form_target(behaviour):
    resp = behaviour.request("GET", "http://example.com/fixed")
    assert resp.status == 200
    assert resp.body == b"hello world"


# -- limits --------------------------------------------------------------------


def test_default_request_line_limit(behaviour):
    # 8190 by default, as nginx: an 8000-byte request line passes, a 9000-byte one is 414.
    prefix = "/environ?q="
    target = prefix + "a" * (8000 - len("GET  HTTP/1.1") - len(prefix))
    assert len(f"GET {target} HTTP/1.1") == 8000
    resp = behaviour.request("GET", target)
    assert resp.status == 200
    long_target = prefix + "a" * (9000 - len("GET  HTTP/1.1") - len(prefix))
    with behaviour.connect() as conn:
        conn.send_request("GET", long_target, {"Host": "x"})
        resp = conn.read_response()
        assert resp.status == 414
        assert conn.at_eof(10)


def test_too_many_headers_is_431(behaviour):
    headers = {f"X-H{i}": "v" for i in range(101)}
    with behaviour.connect() as conn:
        conn.send_request("GET", "/fixed", headers)
        resp = conn.read_response()
        assert resp.status == 431
        assert conn.at_eof(10)
    ok = behaviour.request("GET", "/fixed", {f"X-H{i}": "v" for i in range(90)})
    assert ok.status == 200


def test_oversized_header_is_431(behaviour):
    with behaviour.connect() as conn:
        conn.send_request("GET", "/fixed", {"Host": "x", "X-Big": "a" * 9000})
        resp = conn.read_response()
        assert resp.status == 431
        assert conn.at_eof(10)
    ok = behaviour.request("GET", "/fixed", {"X-Big": "a" * 8000})
    assert ok.status == 200


@pytest.fixture(scope="module")
def limited(start_module_server):
    return start_module_server(
        "behaviour:application",
        "--max-body-size",
        "1000",
        "--limit-request-fields",
        "10",
        "--limit-request-field-size",
        "200",
        "--limit-request-line",
        "300",
        threads=2,
    )


def test_max_body_size_content_length(limited):
    assert limited.request("POST", "/echo", body=b"x" * 1000).body == b"x" * 1000
    with limited.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000)
        resp = conn.read_response()
        assert resp.status == 413
        assert conn.at_eof(10)


def test_max_body_size_0_is_no_limit(start_server):
    """As uWSGI's `limit-post = 0` (its default) and corral's other limits' 0."""
    server = start_server("behaviour:application", "--max-body-size", "0")
    assert server.request("POST", "/echo", body=b"x" * 100_000).body == b"x" * 100_000


def test_a_refused_upload_reaches_a_client_that_sends_it_all_before_reading(limited):
    """A browser sends the whole of a large upload before it reads the
    answer. The 413 went out at once; the connection lingers, reading and
    dropping the body, so that closing it does not reset it and destroy the
    413 on its way (the client would see "connection reset"), and closes
    once the client has gone quiet."""
    with limited.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n")
        conn.send(b"x" * (8 << 20))
        assert conn.read_response().status == 413
        assert conn.at_eof(20)


def test_a_large_body_the_app_does_not_read_does_not_cost_the_client_its_response(behaviour):
    """The app answers without reading an 8 MiB body, more than is worth
    dropping to keep the connection: the client, which sends it all before it
    reads, still gets the response, then the close."""
    with behaviour.connect() as conn:
        conn.send(b"POST /fixed HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n")
        conn.send(b"x" * (8 << 20))
        resp = conn.read_response()
        assert (resp.status, resp.body, resp.complete) == (200, b"hello world", True)
        assert conn.at_eof(20)


def test_max_body_size_chunked(limited):
    with limited.connect() as conn:
        body = b"".join(b"64\r\n" + b"y" * 100 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        resp = conn.read_response()
        assert resp.status == 413
        assert conn.at_eof(10)


@pytest.mark.parametrize(
    "path,chunks",
    [
        # One chunk past the limit, read 8 KiB at a time: the part of the chunk
        # kept for the next read counts too.
        ("/echo", [3000]),
        # read() with no size, with the limit reached exactly on a chunk boundary.
        ("/input?op=read", [500, 500, 4]),
    ],
    ids=["one-big-chunk", "read-all-on-a-boundary"],
)
def test_max_body_size_chunked_whatever_the_reads(limited, path, chunks):
    with limited.connect() as conn:
        body = b"".join(b"%x\r\n" % n + b"z" * n + b"\r\n" for n in chunks) + b"0\r\n\r\n"
        conn.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body)
        resp = conn.read_response()
        assert resp.status == 413, (resp.status, resp.body[:200])


@pytest.mark.parametrize(("then", "status"), [("wrap", 413), ("bug", 500)])
def test_an_app_that_handles_a_body_error_and_fails_otherwise_gets_a_500(limited, then, status):
    """The body error answers only for itself, or for what is raised `from`
    it; a bug of the app's while handling it is shown (traceback, 500)."""
    mark = limited.mark()
    with limited.connect() as conn:
        body = b"".join(b"64\r\n" + b"y" * 100 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"
        conn.send(
            f"POST /body-error-then?then={then} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + body
        )
        assert conn.read_response().status == status
    if then == "bug":
        limited.wait_for(r"NameError: name 'undefined_name' is not defined", since=mark)
    else:
        limited.wait_for(r"request body larger than", since=mark)
        assert not limited.grep(r"Traceback", since=mark)


def test_max_body_size_with_expect_gets_no_100(limited):
    with limited.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 413
        assert resp.interim == []


def test_configured_header_limits(limited):
    assert limited.request("GET", "/fixed", {f"X-H{i}": "v" for i in range(8)}).status == 200
    assert limited.request("GET", "/fixed", {f"X-H{i}": "v" for i in range(11)}).status == 431
    assert limited.request("GET", "/fixed", {"X-Big": "a" * 150}).status == 200
    assert limited.request("GET", "/fixed", {"X-Big": "a" * 250}).status == 431
    assert limited.request("GET", "/fixed?" + "a" * 250).status == 200
    assert limited.request("GET", "/fixed?" + "a" * 350).status == 414
    # The line as sent counts, whitespace around the value included.
    with limited.connect() as conn:
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\nX-Pad:" + b" " * 300 + b"v\t\t\r\n\r\n")
        assert conn.read_response().status == 431
    # An unfinished line is refused once over the limit, not when the head
    # would reach the limit of all its lines together.
    with limited.connect() as conn:
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * 400)
        assert conn.read_response().status == 431


# -- timeouts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient(start_module_server):
    return start_module_server(
        "behaviour:application", "--header-timeout", "1", "--keepalive-timeout", "1", threads=2
    )


def test_header_timeout_closes_a_slow_client(impatient):
    mark = impatient.mark()
    with impatient.connect() as conn:
        conn.send(b"GET /fixed HTTP/1.1\r\nHost: x\r\n")
        # The server gives up on the head (perhaps with a 408) and closes, well before 10 s.
        conn.sock.settimeout(10)
        try:
            rest = conn.read_to_close()
        except TimeoutError:
            pytest.fail("the server kept a connection whose head never finished")
        assert rest == b"" or rest.startswith(b"HTTP/1.1 408")
    impatient.wait_for(
        r"Timed out: http request from 127\.0\.0\.1:\d+: incomplete after the header timeout "
        r"\(1 s, 30 bytes buffered\)",
        since=mark,
    )
    # The server still serves others.
    assert impatient.request("GET", "/fixed").status == 200


def test_a_small_body_read_ahead_of_the_app_has_the_grace_and_rate_of_any_body(impatient):
    """A body small enough to be read before the app runs is not held to the
    header timeout alone: past it, it must come at 500 bytes/s, as a body the
    app reads does; slower, the connection closes with a line saying so."""
    body = b"x" * 3000
    with impatient.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 300):
            conn.send(body[i : i + 300])
            time.sleep(0.25)
        resp = conn.read_response()
    assert resp.status == 200
    assert resp.body == body
    mark = impatient.mark()
    with impatient.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        conn.sock.settimeout(10)
        with contextlib.suppress(OSError):
            for i in range(0, 3000, 10):
                conn.send(body[i : i + 10])
                time.sleep(0.1)
                if impatient.grep("its body came slower than", since=mark):
                    break
    impatient.wait_for(
        r"Timed out: http request POST /echo from 127\.0\.0\.1:\d+: its body came slower than 500 bytes/s "
        r"after the header timeout",
        since=mark,
    )


def test_a_small_body_that_stalls_is_answered_408(impatient):
    """Its head whole, a request whose small body stops coming is answered
    408 when it times out, as one whose larger body the app reads is."""
    mark = impatient.mark()
    with impatient.connect(timeout=30) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6000\r\n\r\n" + b"x" * 100)
        resp = conn.read_response()
        assert resp.status == 408
        assert conn.at_eof(10)
    impatient.wait_for(
        r"Timed out: http request POST /echo from 127\.0\.0\.1:\d+: its body came slower than .*; "
        r"answered 408 and closed the connection",
        since=mark,
    )


def test_a_head_that_stalls_while_the_worker_reloads_is_logged(start_server):
    """A draining worker keeps a request it began to read until the header
    timeout, like any worker, and says so when it gives up on it."""
    server = start_server("behaviour:application", "--header-timeout", "1", threads=2)
    with server.connect(timeout=30) as conn:
        conn.send(b"GET /fixed HTTP/1.1\r\nHo")
        time.sleep(0.2)
        mark = server.mark()
        server.signal(signal.SIGHUP)
        assert conn.at_eof(20)
    server.wait_for(r"Timed out: http request from .*: incomplete after the header timeout", since=mark)
    assert server.request("GET", "/fixed").status == 200


def test_header_timeout_applies_to_a_silent_connection(impatient):
    with impatient.connect() as conn:
        assert conn.at_eof(10), "a connection that never sent anything was kept open"


def test_keepalive_timeout_closes_an_idle_connection(impatient):
    with impatient.connect() as conn:
        assert _get(conn, "/fixed").status == 200
        assert conn.at_eof(10), "an idle keep-alive connection was kept open"


def test_an_empty_line_after_a_body_leaves_the_connection_idle(start_server):
    """Clients send a CRLF after a body now and then (RFC 9112 2.2 has the
    server ignore it): the connection is then idle between requests, kept to
    the keep-alive timeout, not held to the header timeout as a request
    begun (nor by a graceful stop), and the next request on it is served."""
    server = start_server("behaviour:application", "--header-timeout", "1", "--keepalive-timeout", "60")
    mark = server.mark()
    with server.connect(timeout=30) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\r\n")
        assert conn.read_response().body == b"abc"
        assert not conn.at_eof(3), "closed as a request not ended after the header timeout"
        assert _get(conn, "/fixed").status == 200
        conn.send(b"\r\n\r\n")
        assert not conn.at_eof(3)
        mark_stop = server.mark()
        server.signal(signal.SIGTERM)
        assert conn.at_eof(20)
        assert server.wait_exit(30) == 0
    assert "Timed out" not in server.log[mark:], server.log[mark:]
    assert "incomplete" not in server.log[mark_stop:], server.log[mark_stop:]


def test_slow_but_steady_client_within_timeouts(impatient):
    with impatient.connect() as conn:
        for piece in (b"GET /fixed HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            conn.send(piece)
            time.sleep(0.2)
        assert conn.read_response().status == 200


def test_many_sequential_connections(behaviour):
    statuses = [behaviour.request("GET", "/fixed").status for _ in range(100)]
    assert statuses == [200] * 100


# -- clients that hold a thread, and requests that wait for one ------------------


@pytest.fixture
def one_thread(start_server):
    return start_server(
        "behaviour:application", "--header-timeout", "2", "--keepalive-timeout", "1", threads=1
    )


def test_a_body_that_trickles_in_is_cut_off_and_frees_the_thread(one_thread):
    """After the grace (the header timeout), a body must keep coming at 500 bytes/s
    on average: one byte a second does not hold the only thread for ever. The app's
    read fails, the client gets 408, and the next request is served."""
    mark = one_thread.mark()
    with one_thread.connect(timeout=60) as slow:
        slow.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        start = time.monotonic()
        status = None
        while time.monotonic() - start < 40:
            try:
                slow.send(b"x")
            except OSError:
                break
            if select.select([slow.sock], [], [], 1)[0]:
                break
        status = slow.read_response().status
    assert status == 408, one_thread.log[-2000:]
    one_thread.wait_for(
        r"POST /echo from .*: the body came slower than 500 bytes/s after a 2 s grace", since=mark
    )
    assert one_thread.request("GET", "/fixed").status == 200


def test_a_kept_connection_whose_request_waits_for_a_thread_past_its_keepalive_is_served(one_thread):
    """The keep-alive timeout is for a connection that sends nothing. A request
    sent in time, still waiting because the only thread is busy when that
    timeout passes, is served once the thread is free: not dropped unanswered."""
    with one_thread.connect(timeout=30) as kept, one_thread.connect(timeout=30) as busy:
        kept.send_request("GET", "/fixed")
        assert kept.read_response().status == 200
        busy.send_request("GET", "/slow?secs=3&id=hold")
        one_thread.wait_for(r"slow request started: hold$")
        kept.send_request("GET", "/fixed")
        resp = kept.read_response()
        assert (resp.status, resp.body) == (200, b"hello world")
        assert busy.read_response().status == 200


def test_a_body_the_engine_will_not_discard_gets_connection_close(behaviour):
    """The app answers without reading a body larger than the engine discards (1 MiB):
    the connection will close after the response, and the response says so."""
    with behaviour.connect() as conn:
        conn.send(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n" + b"x" * 1000)
        resp = conn.read_response()
        assert resp.status == 200
        assert resp.header("Connection") == "close", resp.headers
        assert conn.at_eof(10)


def test_a_body_cut_short_by_the_client_is_an_error_for_the_app(behaviour):
    """A client that closes its side before Content-Length bytes: the app's read
    raises instead of returning a shorter body as if it were whole, and the
    client, which may still read, is told 400 rather than reset."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100000)
        conn.sock.shutdown(socket.SHUT_WR)
        data = conn.read_to_close()
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data[:200]
        assert b"\r\nConnection: close\r\n" in data, data[:200]
    behaviour.wait_for(
        r"POST /echo from 127\.0\.0\.1:\d+: the peer closed its side 100000 bytes short of the declared",
        since=mark,
    )


@pytest.mark.parametrize("pieces", [2, 40])
def test_a_small_body_that_arrives_in_pieces_after_the_head_is_served(behaviour, pieces):
    """A body of up to 64 KiB is read ahead of the app; when it comes in several
    reads after the head (a slow uplink, 1448-byte segments), each piece must be
    looked at, or the request waits for its header timeout and is closed."""
    body = bytes(range(256)) * 12  # 3072 bytes
    step = -(-len(body) // pieces)
    with behaviour.connect(timeout=20) as conn:
        conn.send(f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), step):
            time.sleep(0.05)
            conn.send(body[i : i + step])
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, body)
        conn.send_request("GET", "/fixed", {"Host": "x"})
        assert conn.read_response().body == b"hello world"


def test_unfinished_heads_cannot_hold_unbounded_memory(start_server):
    """Each head may be as long as the limits allow (100 fields of 8190
    bytes), but a worker holds at most 32 MiB of heads that never end: past
    that, heads over 64 KiB are refused with 431, and the memory is given
    back when their connections close."""
    server = start_server("behaviour:application", workers=1, threads=4)
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 7990) for i in range(99))
    head = b"GET /fixed HTTP/1.1\r\nHost: a\r\n" + pad
    conns = []

    def fill(conn):
        try:
            conn.sock.settimeout(30)
            conn.send(head)
        except OSError:
            pass  # refused and closed while sending

    for _ in range(60):
        conns.append(server.connect())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fill, conns))
    # Answers come only to refused heads; the others wait for their end.
    answered = {}
    while True:
        ready, _, _ = select.select([c.sock for c in conns if c.sock not in answered], [], [], 2.0)
        if not ready:
            break
        for sock in ready:
            try:
                answered[sock] = sock.recv(64)
            except OSError:
                answered[sock] = b""
    statuses = [answered.get(c.sock, b"")[:12] for c in conns]
    refused = statuses.count(b"HTTP/1.1 431")
    # 32 MiB hold about 41 of these 792 KiB heads.
    assert 10 <= refused <= 30, statuses
    assert all(s in (b"", b"HTTP/1.1 431") for s in statuses), statuses
    server.wait_for(
        r"Request head refused from 127\.0\.0\.1:\d+: \d+ KiB and not ended, while this worker holds"
    )
    assert server.request("GET", "/fixed").status == 200
    # A whole head, with a large body right behind it, is no unfinished head.
    big_post = server.request("POST", "/echo", body=b"y" * 200_000)
    assert (big_post.status, len(big_post.body)) == (200, 200_000)
    for conn in conns:
        conn.close()

    # Given back once the closes are seen: the same head, ended, is served.
    def served():
        with server.connect() as big:
            big.send(head + b"\r\n")
            return big.read_response().status == 200

    assert wait_until(served, timeout=10)


def test_socket_timeout_frees_the_thread_a_client_that_stops_reading_holds(start_server):
    """--socket-timeout (uWSGI's option): a client that takes nothing of a
    response holds a thread that long, then the connection is given up."""
    server = start_server("behaviour:application", "--socket-timeout", "1", workers=1, threads=1)
    mark = server.mark()
    stuck = slow_reader(server, rcvbuf=4096)
    stuck.send_request("GET", "/stream?n=5000000")
    server.wait_for(
        r"GET /stream\?n=5000000 from .*: gave up on the client: it read nothing of the response for --socket-timeout",
        since=mark,
    )
    assert server.request("GET", "/fixed").status == 200
    # Said once, with the request: not again when the connection closes.
    assert len(server.grep("gave up on the client", since=mark)) == 1


def test_socket_timeout_spares_a_client_that_reads_slowly_but_steadily(start_server):
    """The kernel says a socket is writable only once a third of its send
    buffer is free, which a client reading steadily at 200 KB/s takes longer
    than --socket-timeout to free: what it reads keeps its connection."""
    server = start_server("behaviour:application", "--socket-timeout", "1", workers=1, threads=1)
    mark = server.mark()
    with server.connect() as conn:
        conn.send(b"GET /stream?n=5000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        conn.sock.settimeout(10)
        got = 0
        for _ in range(60):
            chunk = conn.sock.recv(20_000)
            assert chunk, f"the connection ended after {got} bytes: {server.log[-2000:]}"
            got += len(chunk)
            time.sleep(0.1)
    assert not server.grep("gave up on the client", since=mark)


def test_socket_timeout_gives_up_on_a_pipelining_client_that_reads_nothing_and_says_so(start_server):
    """A client that pipelines requests and reads none of the answers holds
    the thread writing them until --socket-timeout, then the connection is
    given up, with a log line naming the client."""
    server = start_server("behaviour:application", "--socket-timeout", "1", workers=1, threads=1)
    mark = server.mark()
    stuck = slow_reader(server, rcvbuf=4096)
    port = stuck.sock.getsockname()[1]
    said = rf"Connection from 127\.0\.0\.1:{port}: gave up on the client: it read nothing of the response for --socket-timeout \(1 s\); closing it"
    # Far more answers than the two sockets' buffers hold, sent as the server takes them.
    data = b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n" * 300_000
    stuck.sock.setblocking(False)
    sent = 0
    while sent < len(data) and not server.grep(said, since=mark):
        try:
            sent += stuck.sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:
            break  # given up on and closed
    server.wait_for(said, since=mark)
    assert len(server.grep("gave up on the client", since=mark)) == 1
    assert server.request("GET", "/fixed").status == 200
    stuck.close()
    stuck.close()


def test_a_tls_handshake_to_the_http_port_is_refused_at_once(behaviour):
    """A client speaking https to a plain-HTTP port sends bytes no request line
    starts with and never a line end: 400 at once, with a line saying what it
    was, rather than a close at the header timeout."""
    # The second has a line feed among its first bytes, as a real one has
    # (cipher suite c0 0a): still named as TLS, not as a bad target.
    for hello in (
        bytes.fromhex("160301020001") + b"\x00" * 40,
        bytes.fromhex("16030100f8010000f40303") + b"\x11" * 32 + bytes.fromhex("0020c02bc02fc00a") + b" / \n",
    ):
        mark = behaviour.mark()
        with behaviour.connect() as conn:
            conn.sock.settimeout(5)
            conn.send(hello)
            resp = conn.read_response()
            assert resp.status == 400, resp
            assert conn.at_eof(5)
        behaviour.wait_for(
            r"Bad request from 127\.0\.0\.1:\d+: a TLS handshake \(https\) sent to a plain-HTTP port",
            since=mark,
        )


def test_a_malformed_chunked_body_the_app_did_not_read_is_logged(behaviour):
    """The app answered without reading the body; reading it to find the next
    request finds bad framing: the connection closes, and the log says why."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(
            b"POST /fixed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n\r\n"
            b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert conn.read_response().status == 200
        assert conn.at_eof(5)
    behaviour.wait_for(
        r"Bad request body from 127\.0\.0\.1:\d+: invalid chunk size, in the body the app did not read",
        since=mark,
    )


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"3\nabc\r\n0\r\n\r\n", "bare CR or LF in the chunked framing or a trailer field"),
        (b"3\r\nabc\r\n0\r\nX-T: a\r\n b\r\n\r\n", "obsolete line folding in a trailer field"),
        (b"3\r\nabc\r\n0\r\nX-T: a\x01b\r\n\r\n", "invalid character in a trailer field value"),
    ],
)
def test_a_malformed_chunked_body_is_logged_as_one(behaviour, body, said):
    """Faults in the chunked framing and trailers are named as such, not with
    the words for a request head."""
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        assert conn.read_response().status == 400
    behaviour.wait_for(rf"POST /echo from 127\.0\.0\.1:\d+: invalid chunked request body: {said}", since=mark)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_client_pipelining_without_end_does_not_hold_its_thread(start_server, threads):
    """A client that keeps a stream of pipelined requests coming (each batch
    sent before the last one's responses are read) never empties its buffer.
    Served request after request as long as it has bytes, it would hold its
    thread for good: with one thread the whole worker, with two a second such
    client. Another client's request is answered while they go on."""
    server = start_server("behaviour:application", workers=1, threads=threads)
    stop, answered, errors = threading.Event(), [0] * threads, []
    # Each request takes the app a millisecond, so the requests come faster
    # than they are served and the connection's buffer never runs dry.
    batch = b"GET /slow?secs=0.001 HTTP/1.1\r\nHost: x\r\n\r\n" * 500

    def hog(i):
        # One thread writes batch after batch, as fast as the socket takes
        # them; another reads the responses.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:

            def read():
                with contextlib.suppress(OSError):
                    while data := s.recv(1 << 20):
                        answered[i] += data.count(b"slept")

            reader = threading.Thread(target=read)
            reader.start()
            try:
                while not stop.is_set():
                    s.sendall(batch)
            except OSError as e:
                errors.append(repr(e))
            # Reset rather than wait for the thousands of requests still queued.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RDWR)
            reader.join(30)

    hogs = [threading.Thread(target=hog, args=(i,)) for i in range(threads)]
    for h in hogs:
        h.start()
    try:
        assert wait_until(lambda: all(n > 100 for n in answered), 20), (answered, errors)
        resp = server.request("GET", "/fixed", timeout=30)
        still_going = not stop.is_set() and all(h.is_alive() for h in hogs)
    finally:
        stop.set()
        for h in hogs:
            h.join(30)
    assert resp.status == 200 and resp.body == b"hello world"
    assert still_going and not errors, errors


def test_a_large_body_that_stalls_is_logged_when_the_app_catches_the_error(start_server):
    """--socket-timeout ends the wait for a body past its first part (the
    rate check, which has its own line, allows it longer): the app catches
    the error and answers, and the log still says what happened, and from
    whom."""
    server = start_server("behaviour:application", "--socket-timeout", "2", workers=1, threads=2)
    mark = server.mark()
    with server.connect(timeout=30) as conn:
        conn.send(b"POST /body-error-then?then=ok HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        conn.send(b"x" * 100_000)
        resp = conn.read_response()
        assert (resp.status, resp.body) == (200, b"gave up on the body")
    server.wait_for(
        r"POST /body-error-then\?then=ok from 127\.0\.0\.1:\d+: no more of the body came for 2\.0 s "
        r"\(--socket-timeout\) after \d+ bytes; giving up on it",
        since=mark,
    )


def test_a_client_still_sending_an_unread_body_when_lingering_ends_is_logged(start_server):
    """An endless chunked body the app did not read: the response goes out,
    the connection lingers reading and dropping what comes (as nginx's
    lingering close), and when its time is up while the client still sends,
    the log says why the connection was closed (it closed without a word)."""
    server = start_server("behaviour:application")
    mark = server.mark()
    stop = threading.Event()
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(b"POST /fixed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")

        def send():
            chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    sock.sendall(chunk)
                    time.sleep(0.05)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            server.wait_for(
                r"127\.0\.0\.1:\d+: closing the connection: its client was still sending 30 s after the "
                r"response \(\d+ bytes read in all\)",
                since=mark,
                timeout=60,
            )
        finally:
            stop.set()
            sender.join(10)
    assert server.request("GET", "/fixed").status == 200
