"""corral behind a front end, driven by the raw protocol clients of gateway.py:
uwsgi, FastCGI and SCGI on TCP and unix sockets; the environ the front end's
variables give; large, streamed and file bodies; FastCGI records (keep-conn,
padding, split streams, management records, roles, multiplexing, aborts);
socket files and listener warnings; malformed input."""

from __future__ import annotations

import hashlib
import os
import pwd
import random
import re
import select
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gateway as g
import pytest
from support import CORRAL, wait_until

PROTOS = g.PROTOCOLS
MIB = 1 << 20


@pytest.fixture(scope="module")
def gw(start_module_server, tmp_path_factory):
    """One worker with four threads; every protocol on TCP and on a unix socket."""
    d = tmp_path_factory.mktemp("gw")
    markers = d / "closed.log"
    markers.touch()
    listeners = [(p, "127.0.0.1:0") for p in PROTOS] + [(p, f"unix:{d}/{p}.sock") for p in PROTOS]
    server = g.start_gateways(
        start_module_server,
        "gateway_probe:application",
        listeners,
        "--env",
        f"CORRAL_TEST_MARKERS={markers}",
        workers=1,
        threads=4,
    )
    server.markers = markers
    yield server
    server.cleanup()
    assert "without being closed" not in server.log, server.log


@pytest.fixture(scope="module")
def mounted(start_module_server):
    return g.start_gateways(
        start_module_server,
        "behaviour:application",
        [(p, "127.0.0.1:0") for p in PROTOS],
        "--mount",
        "/prefix",
        threads=2,
    )


def _pid(server, proto="uwsgi", unix=False) -> int:
    r = g.call(proto, server.addr(proto, unix), uri="/pid")
    assert r.status == 200, (r.status, r.body)
    return int(r.body)


def _env(server, proto, uri="/environ", extra=(), **kw) -> dict:
    r = g.call(proto, server.addr(proto), uri=uri, extra=extra, **kw)
    assert r.status == 200, (proto, r.status, r.body[:2000], server.log[-3000:])
    return {k: v["value"] if isinstance(v, dict) else v for k, v in r.json().items()}


def _head_of(proto: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" if proto == "uwsgi" else b"Status: 200 OK\r\n"


# -- each protocol, each transport ---------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("proto", PROTOS)
def test_request_and_response_framing(gw, proto, unix):
    r = g.call(proto, gw.addr(proto, unix), uri="/environ?x=1&y=%20z", extra=[("HTTP_USER_AGENT", "probe")])
    assert r.status == 200 and r.reason == "OK", r.raw[:300]
    # uwsgi answers with an HTTP status line, SCGI and FastCGI with a CGI Status header first.
    assert r.raw.startswith(_head_of(proto)), r.raw[:100]
    assert r.header("Content-Type") == "application/json"
    assert r.complete
    env = {k: v["value"] for k, v in r.json().items() if isinstance(v, dict)}
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/environ"
    assert env["QUERY_STRING"] == "x=1&y=%20z"
    assert env["REQUEST_URI"] == "/environ?x=1&y=%20z"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("gateway.test", "8080")
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("192.0.2.10", "40000")
    assert env["HTTP_HOST"] == "gateway.test:8080"
    assert env["HTTP_USER_AGENT"] == "probe"
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.input_terminated"] is True
    # SCGI always carries a CONTENT_LENGTH number.
    assert env.get("CONTENT_LENGTH", "") in ("", "0")
    if proto == "fastcgi":
        assert (r.app_status, r.protocol_status) == (0, g.FCGI_REQUEST_COMPLETE)
        kinds = [(rec.type, len(rec.content)) for rec in r.records]
        # STDOUT with data, one empty STDOUT, then END_REQUEST.
        assert kinds[-2:] == [(g.FCGI_STDOUT, 0), (g.FCGI_END_REQUEST, 8)], kinds
        assert all(t == g.FCGI_STDOUT and n > 0 for t, n in kinds[:-2]), kinds
    # No keep-alive over uwsgi and SCGI, and none for FastCGI without FCGI_KEEP_CONN.
    assert r.closed


@pytest.mark.parametrize("proto", ["uwsgi", "scgi"])
def test_one_request_per_connection(gw, proto):
    """A second request sent on a uwsgi or SCGI connection is never answered: the
    connection closes after the first response."""
    pairs = g.cgi_params("GET", "/fixed", extra=[("SCGI", "1")] if proto == "scgi" else ())
    if proto == "scgi":
        pairs[0] = (b"CONTENT_LENGTH", b"0")
    one = g.request_bytes(proto, pairs)
    with g.connect(gw.addr(proto)) as sock:
        sock.sendall(one + one)
        data, closed = g.read_until_close(sock)
    assert closed
    r = g.parse_any(proto, data)
    assert r.status == 200
    assert r.body == b"hello world"


@pytest.mark.parametrize("proto", PROTOS)
def test_post_echo(gw, proto):
    r = g.call(proto, gw.addr(proto), "POST", "/echo", b"hello body")
    assert r.status == 200
    assert r.body == b"hello body"


@pytest.mark.parametrize("proto", PROTOS)
def test_missing_request_method_gets_400(gw, proto):
    pairs = [(k, v) for k, v in g.cgi_params(uri="/environ") if k != b"REQUEST_METHOD"]
    if proto == "scgi":
        pairs = [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *pairs[1:]]
    mark = gw.mark()
    r = g.call(proto, gw.addr(proto), params=pairs)
    assert r.status == 400, r.raw[:300]
    if proto == "fastcgi":
        assert r.protocol_status == g.FCGI_REQUEST_COMPLETE
    gw.wait_for(rf"\[WARNING\] Bad {proto} request from 127\.0\.0\.1:\d+: no REQUEST_METHOD", since=mark)


# -- environ mapping -------------------------------------------------------------------


@pytest.mark.parametrize("proto", PROTOS)
def test_repeated_http_variables_are_joined(gw, proto):
    env = _env(
        gw,
        proto,
        extra=[
            ("HTTP_X_MULTI", "a"),
            ("HTTP_COOKIE", "a=1"),
            ("HTTP_X_MULTI", "b"),
            ("HTTP_COOKIE", "b=2"),
            ("HTTP_X_MULTI", "c d"),
        ],
    )
    assert env["HTTP_X_MULTI"] == "a,b,c d"
    assert env["HTTP_COOKIE"] == "a=1; b=2"


@pytest.mark.parametrize("proto", PROTOS)
def test_last_value_wins_for_other_variables(gw, proto):
    # nginx repeats a variable its configuration sets twice (`scgi_param
    # HTTPS on;` after the stock scgi_params, which set it too): over SCGI as
    # well, though its specification forbids repeats.
    env = _env(
        gw,
        proto,
        extra=[
            ("SERVER_NAME", "first.test"),
            ("DOCUMENT_ROOT", "/srv/one"),
            ("SERVER_NAME", "second.test"),
            ("DOCUMENT_ROOT", "/srv/two"),
        ],
    )
    assert env["SERVER_NAME"] == "second.test"
    assert env["DOCUMENT_ROOT"] == "/srv/two"


def test_scgi_repeated_content_length_is_answered_400(gw):
    # The one name that may not repeat: it says where the body ends.
    pairs = [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *GOOD, (b"CONTENT_LENGTH", b"5")]
    out, closed = g.send_raw(gw.addr("scgi"), g.scgi_netstring(pairs) + b"EVIL!")
    assert closed and g.parse_any("scgi", out).status == 400, out[:300]
    assert wait_until(lambda: "repeated CONTENT_LENGTH (400 Bad Request)" in gw.log), gw.log[-1500:]
    assert _env(gw, "scgi")["REQUEST_METHOD"] == "GET"


@pytest.mark.parametrize("proto", PROTOS)
def test_http_content_length_and_type_never_reach_environ(gw, proto):
    env = _env(
        gw,
        proto,
        method="POST",
        body=b"abc",
        extra=[
            ("CONTENT_TYPE", "text/plain"),
            ("HTTP_CONTENT_LENGTH", "3"),
            ("HTTP_CONTENT_TYPE", "text/plain"),
        ],
    )
    assert "HTTP_CONTENT_LENGTH" not in env
    assert "HTTP_CONTENT_TYPE" not in env
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["CONTENT_LENGTH"] == "3"
    assert env["_body"] == "abc"


@pytest.mark.parametrize("proto", PROTOS)
def test_path_info_derived_from_request_uri(gw, proto):
    env = _env(gw, proto, uri="/caf%C3%A9/a%20b?q=%C3%A9+x&r=%2F")
    assert env["PATH_INFO"] == "/caf\u00c3\u00a9/a b"  # percent-decoded bytes as latin-1
    assert env["QUERY_STRING"] == "q=%C3%A9+x&r=%2F"
    assert env["SCRIPT_NAME"] == ""


@pytest.mark.parametrize("proto", PROTOS)
def test_path_info_sent_is_used(gw, proto):
    env = _env(gw, proto, uri="/original?a=1", extra=[("PATH_INFO", "/rewritten"), ("SCRIPT_NAME", "/app")])
    assert env["PATH_INFO"] == "/rewritten"
    assert env["SCRIPT_NAME"] == "/app"
    assert env["QUERY_STRING"] == "a=1"


@pytest.mark.parametrize("proto", PROTOS)
def test_script_name_without_path_info_is_ignored(gw, proto):
    """Stock nginx fastcgi_params put the whole path in SCRIPT_NAME and send no PATH_INFO."""
    env = _env(gw, proto, uri="/app/page?x=1", extra=[("SCRIPT_NAME", "/app/page")])
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/app/page"


def test_uwsgi_modifier1_30_strips_script_name(gw):
    extra = [("SCRIPT_NAME", "/app"), ("PATH_INFO", "/app/hello")]
    r = g.call("uwsgi", gw.addr("uwsgi"), uri="/app/hello", extra=extra, modifier1=30)
    assert (r.env("SCRIPT_NAME"), r.env("PATH_INFO")) == ("/app", "/hello")
    # modifier1 0 leaves PATH_INFO as sent.
    r = g.call("uwsgi", gw.addr("uwsgi"), uri="/app/hello", extra=extra, modifier1=0)
    assert (r.env("SCRIPT_NAME"), r.env("PATH_INFO")) == ("/app", "/app/hello")


@pytest.mark.parametrize(
    ("uri", "extra", "script", "path"),
    [
        ("/prefix/a/b?q=1", [], "/prefix", "/a/b"),
        ("/prefix", [], "/prefix", ""),
        ("/other", [], "", "/other"),
        ("/prefixed", [], "", "/prefixed"),
        # uwsgi_params style: PATH_INFO sent.
        ("/prefix/x", [("PATH_INFO", "/prefix/x")], "/prefix", "/x"),
        # fastcgi_params style: SCRIPT_NAME holds the whole path, no PATH_INFO.
        ("/prefix/y", [("SCRIPT_NAME", "/prefix/y")], "/prefix", "/y"),
        # uWSGI --manage-script-name style: the front end names the mount point too.
        ("/prefix/a/env", [("SCRIPT_NAME", "/prefix"), ("PATH_INFO", "/prefix/a/env")], "/prefix", "/a/env"),
        ("/prefix/a/env", [("SCRIPT_NAME", "/prefix"), ("PATH_INFO", "/a/env")], "/prefix", "/a/env"),
        # Split by the front end already: /prefix/x is a route of the app's.
        (
            "/prefix/prefix/x",
            [("SCRIPT_NAME", "/prefix"), ("PATH_INFO", "/prefix/x")],
            "/prefix",
            "/prefix/x",
        ),
    ],
)
@pytest.mark.parametrize("proto", PROTOS)
def test_mount_splits_path_info(mounted, proto, uri, extra, script, path):
    env = _env(mounted, proto, uri=uri, extra=extra)
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == (script, path)


@pytest.mark.parametrize(
    ("extra", "scheme"),
    [
        ([("HTTPS", "on")], "https"),
        ([("HTTPS", "1")], "https"),
        ([("REQUEST_SCHEME", "https")], "https"),
        ([("HTTPS", "off")], "http"),
        ([("REQUEST_SCHEME", "http")], "http"),
        ([("UWSGI_SCHEME", "https")], "https"),
        ([], "http"),
    ],
    ids=["https-on", "https-1", "scheme-https", "https-off", "scheme-http", "uwsgi-scheme", "none"],
)
@pytest.mark.parametrize("proto", PROTOS)
def test_url_scheme(gw, proto, extra, scheme):
    assert _env(gw, proto, extra=extra)["wsgi.url_scheme"] == scheme


@pytest.mark.parametrize("proto", PROTOS)
def test_the_front_end_cannot_replace_the_servers_wsgi_keys(gw, proto):
    env = _env(gw, proto, extra=[("wsgi.version", "x"), ("wsgi.url_scheme", "https"), ("wsgi.input", "y")])
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.version"] != "x" and env["wsgi.input"] != "y", env


@pytest.mark.parametrize("proto", PROTOS)
def test_server_name_with_port_loses_the_port(gw, proto):
    """HAProxy's fcgi-app sends SERVER_NAME as host:port."""
    pairs = [(k, v) for k, v in g.cgi_params(uri="/environ") if k not in (b"SERVER_NAME", b"SERVER_PORT")]
    pairs.append((b"SERVER_NAME", b"haproxy.test:8443"))
    if proto == "scgi":
        pairs = [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *pairs[1:]]
    r = g.call(proto, gw.addr(proto), params=pairs)
    assert r.env("SERVER_NAME") == "haproxy.test"
    assert r.env("SERVER_PORT") == "8443"


@pytest.mark.parametrize("proto", PROTOS)
def test_an_empty_server_name_is_the_requested_host(gw, proto):
    """nginx sends SERVER_NAME "" from a server block without `server_name`; PEP 3333
    never allows an empty one, so it is the Host the client asked for."""
    env = _env(gw, proto, extra=[("SERVER_NAME", ""), ("HTTP_HOST", "shop.example:8443")])
    assert env["SERVER_NAME"] == "shop.example"
    assert env["SERVER_PORT"] == "8080"


def test_the_access_log_shows_the_path_of_a_peer_without_request_uri(start_server, tmp_path):
    log = tmp_path / "access.log"
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [(p, "127.0.0.1:0") for p in PROTOS],
        "--access-log",
        str(log),
        "--access-log-format",
        "%(p)s %(m)s %(U)s %(q)s %(s)s|%(r)s",
    )
    for proto in PROTOS:
        pairs = [
            (k, v) for k, v in g.cgi_params(uri="/fixed?a=1") if k not in (b"REQUEST_URI", b"QUERY_STRING")
        ]
        pairs += [(b"PATH_INFO", b"/fixed"), (b"QUERY_STRING", b"a=1")]
        if proto == "scgi":
            pairs.insert(1, (b"SCGI", b"1"))
            pairs[0] = (b"CONTENT_LENGTH", b"0")
        assert g.call(proto, server.addr(proto), params=pairs).status == 200
    assert wait_until(lambda: len(log.read_text().splitlines()) == len(PROTOS))
    for line in log.read_text().splitlines():
        # The query too, from QUERY_STRING.
        assert line.split(" ", 1)[1] == "GET /fixed a=1 200|GET /fixed?a=1 HTTP/1.1", line


# -- bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
@pytest.mark.parametrize("proto", PROTOS)
def test_post_one_mib(gw, proto, unix):
    payload = random.Random(7).randbytes(MIB)
    r = g.call(proto, gw.addr(proto, unix), "POST", "/sha", payload)
    got = r.json()
    assert got["length"] == MIB
    assert got["sha256"] == hashlib.sha256(payload).hexdigest()
    assert got["content_length"] == str(MIB)
    assert got["input_terminated"] is True


@pytest.mark.parametrize("stdin_chunk", [1000, g.MAX_CONTENT])
def test_fastcgi_stdin_without_content_length(gw, stdin_chunk):
    """nginx with fastcgi_request_buffering off: no CONTENT_LENGTH, the empty STDIN record ends the body."""
    payload = random.Random(8).randbytes(300_000)
    params = g.cgi_params("POST", "/sha", content_length=False)
    assert not any(k == b"CONTENT_LENGTH" for k, _ in params)
    r = g.fastcgi_request(gw.addr("fastcgi"), params, payload, stdin_chunk=stdin_chunk)
    got = r.json()
    assert (got["length"], got["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert got["content_length"] in (None, "")
    assert got["input_terminated"] is True


@pytest.mark.parametrize("proto", PROTOS)
def test_streamed_response(gw, proto):
    r = g.call(proto, gw.addr(proto), uri="/stream?n=200")
    assert r.status == 200
    assert r.body == b"".join(f"chunk{i}\n".encode() for i in range(200))
    # No chunked coding over a gateway: the end of the stream (close or END_REQUEST) ends the body.
    assert r.header("Transfer-Encoding") is None
    assert r.header("Content-Length") is None
    assert r.closed


@pytest.mark.parametrize("cl", [False, True], ids=["no-length", "length"])
@pytest.mark.parametrize("proto", PROTOS)
def test_large_response(gw, proto, cl):
    size = 20 * MIB + 13
    r = g.call(proto, gw.addr(proto), uri=f"/big?size={size}&piece=100000&seed=3&cl={int(cl)}", timeout=30)
    assert r.status == 200
    assert len(r.body) == size
    assert hashlib.sha256(r.body).hexdigest() == r.header("X-Sha256")
    assert r.header("Content-Length") == (str(size) if cl else None)
    assert r.closed


@pytest.mark.parametrize("cl", ["1", "0"], ids=["length", "no-length"])
@pytest.mark.parametrize("proto", PROTOS)
def test_file_wrapper_response(gw, proto, cl, tmp_path):
    data = random.Random(9).randbytes(3 * MIB + 123)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    r = g.call(proto, gw.addr(proto), uri=f"/file?path={path}&cl={cl}")
    assert r.status == 200
    assert r.body == data
    assert r.complete and r.closed


def test_uwsgi_full_vars_block_is_accepted(gw):
    pairs = [(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/environ"), (b"SERVER_PROTOCOL", b"HTTP/1.1")]
    used = len(g.uwsgi_vars(pairs))
    name = b"HTTP_X_BIG"
    value = b"v" * (0xFFFF - used - 4 - len(name))
    pairs.append((name, value))
    assert len(g.uwsgi_vars(pairs)) == 0xFFFF
    r = g.uwsgi_request(gw.addr("uwsgi"), pairs)
    assert r.env("HTTP_X_BIG") == value.decode()


def test_scgi_header_block_of_one_mib_is_accepted(gw):
    pairs = [
        (b"CONTENT_LENGTH", b"0"),
        (b"SCGI", b"1"),
        (b"REQUEST_METHOD", b"GET"),
        (b"REQUEST_URI", b"/environ"),
    ]
    used = len(g.scgi_netstring(pairs)) - len(b"nn:,")
    value = b"v" * (MIB - used - len(b"HTTP_X_BIG\0\0"))
    pairs.append((b"HTTP_X_BIG", value))
    assert g.scgi_netstring(pairs).startswith(b"%d:" % MIB)
    r = g.scgi_request(gw.addr("scgi"), pairs)
    assert len(r.env("HTTP_X_BIG")) == len(value)


def test_fastcgi_params_of_one_mib_are_accepted(gw):
    pairs = [(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/environ")]
    # The big pair: 1-byte name length, 4-byte value length, name, value.
    size = MIB - len(g.encode_pairs(pairs)) - 1 - 4 - len(b"HTTP_X_BIG")
    pairs.append((b"HTTP_X_BIG", b"v" * size))
    assert len(g.encode_pairs(pairs)) == MIB
    r = g.fastcgi_request(gw.addr("fastcgi"), pairs)
    assert len(r.env("HTTP_X_BIG")) == size


@pytest.mark.parametrize("proto", PROTOS)
def test_no_request_sees_the_environ_or_values_of_one_before(gw, proto):
    """A serving thread keeps its last gateway request's environ, to copy for
    the next request with the same variables: neither the values of the
    requests before nor what an app did to its own environ may show through,
    whether the variables keep their names, lose one, gain one or change
    order, and with the scheme switching."""
    for i in range(40):
        extra = [(b"HTTP_USER_AGENT", b"probe/1"), (b"REMOTE_PORT", str(41000 + i % 3).encode())]
        cookie = b"n=%d" % i if i % 4 == 1 else None
        if cookie:
            extra.append((b"HTTP_COOKIE", cookie))
        https = i % 4 == 2
        if https:
            extra.append((b"HTTPS", b"on"))
        if i % 5 == 3:
            extra.reverse()
        if i % 3 == 0:
            r = g.call(proto, gw.addr(proto), uri=f"/mutate-environ?i={i}", extra=extra)
            assert (r.status, r.body) == (200, b"mutated")
        body = b"body %d" % i if i % 2 else b""
        r = g.call(proto, gw.addr(proto), "POST" if body else "GET", f"/environ?i={i}", body, extra)
        env = {k: v["value"] for k, v in r.json().items() if isinstance(v, dict)}
        assert env["QUERY_STRING"] == f"i={i}"
        assert env["REQUEST_URI"] == f"/environ?i={i}"
        assert env["PATH_INFO"] == "/environ"
        assert env["HTTP_USER_AGENT"] == "probe/1"
        assert env["REMOTE_PORT"] == str(41000 + i % 3)
        assert env.get("HTTP_COOKIE") == (cookie.decode() if cookie else None)
        assert env["wsgi.url_scheme"] == ("https" if https else "http")
        assert "PROBE_ADDED" not in env
        assert env["REQUEST_METHOD"] == ("POST" if body else "GET")
        assert r.json()["_body"] == body.decode()


# -- FastCGI records ------------------------------------------------------------------


def test_fastcgi_keep_conn_fifty_requests(gw):
    """Fifty requests on one connection, with new and reused ids, GETs and POSTs:
    each sees only its own variables and body."""
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        for i in range(50):
            rid = i % 7 + 1
            if i % 2:
                body = f"body {i} ".encode() * (i + 1)
                r = conn.request(g.cgi_params("POST", "/echo", body), body, rid, keep_conn=True)
                assert r.body == body
            else:
                params = g.cgi_params(uri=f"/environ?i={i}", extra=[(f"HTTP_X_REQ_{i}", str(i))])
                r = conn.request(params, request_id=rid, keep_conn=True)
                env = r.json()
                assert env["QUERY_STRING"]["value"] == f"i={i}"
                assert [k for k in env if k.startswith("HTTP_X_REQ_")] == [f"HTTP_X_REQ_{i}"]
                assert env["_body"] == ""
            assert (r.status, r.app_status, r.protocol_status) == (200, 0, 0)
            assert not r.closed
        assert not conn.others
        # A last request without FCGI_KEEP_CONN: the connection closes after END_REQUEST.
        r = conn.request(g.cgi_params(uri="/fixed"), request_id=9)
        assert r.body == b"hello world"
        assert r.closed


def _padded_request(params, body, rid, keep_conn, pads):
    """A request whose records carry padding from `pads`, in turn."""
    pad = iter(pads * 1000)
    enc = g.encode_pairs(params)
    out = [g.begin_request(rid, keep_conn=keep_conn, padding=next(pad))]
    out += [g.record(g.FCGI_PARAMS, rid, enc[i : i + 10], next(pad)) for i in range(0, len(enc), 10)]
    out.append(g.record(g.FCGI_PARAMS, rid, b"", next(pad)))
    out += [g.record(g.FCGI_STDIN, rid, body[i : i + 333], next(pad)) for i in range(0, len(body), 333)]
    out.append(g.record(g.FCGI_STDIN, rid, b"", next(pad)))
    return b"".join(out)


def test_fastcgi_padding_is_skipped(gw):
    body = bytes(range(256)) * 20
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        for pads in ([1, 7, 0, 255, 3], [8], [255]):
            conn.send(_padded_request(g.cgi_params("POST", "/echo", body), body, 1, True, pads))
            r = conn.read_response(1)
            assert (r.status, r.protocol_status) == (200, 0)
            assert r.body == body
        conn.send(_padded_request(g.cgi_params(uri="/fixed"), b"", 2, False, [5]))
        r = conn.read_response(2)
        assert r.body == b"hello world"
        assert conn.at_eof()


@pytest.mark.parametrize("chunk", [1, 3, 127, 1000])
def test_fastcgi_params_split_across_records(gw, chunk):
    """PARAMS cut anywhere, inside 4-byte lengths and names included; lengths that
    could be one byte sent as four."""
    long_name = "HTTP_X_" + "N" * 150
    params = g.cgi_params(uri="/environ?split=1", extra=[(long_name, "v" * 300), ("HTTP_X_SHORT", "s")])
    enc = g.encode_pairs(params[:-1]) + g.encode_pair("HTTP_X_SHORT", "s", long=True)
    data = g.begin_request(1) + g.stream(g.FCGI_PARAMS, 1, enc, chunk) + g.stream(g.FCGI_STDIN, 1, b"")
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(data)
        r = conn.read_response(1)
    env = r.json()
    assert env[long_name]["value"] == "v" * 300
    assert env["HTTP_X_SHORT"]["value"] == "s"
    assert env["QUERY_STRING"]["value"] == "split=1"


def test_fastcgi_management_records_interleaved_with_a_request(gw):
    """GET_VALUES and unknown record types between a request's PARAMS and STDIN
    records are answered; the request goes on."""
    enc = g.encode_pairs(g.cgi_params("POST", "/echo", b"abcdef"))
    ask = g.encode_pairs([(b"FCGI_MPXS_CONNS", b"")])
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(
            g.begin_request(1, keep_conn=True)
            + g.record(g.FCGI_PARAMS, 1, enc[:20])
            + g.record(g.FCGI_GET_VALUES, 0, ask)
            + g.record(g.FCGI_PARAMS, 1, enc[20:])
            + g.record(99, 0, b"xyz", 5)
            + g.record(g.FCGI_PARAMS, 1)
            + g.record(g.FCGI_STDIN, 1, b"abc")
            + g.record(g.FCGI_GET_VALUES, 0, ask, 2)
            + g.record(g.FCGI_STDIN, 1, b"def")
            + g.record(g.FCGI_STDIN, 1)
        )
        r = conn.read_response(1)
        assert r.body == b"abcdef"
        kinds = [rec.type for rec in conn.others]
        assert kinds.count(g.FCGI_GET_VALUES_RESULT) == 2, conn.others
        assert kinds.count(g.FCGI_UNKNOWN_TYPE) == 1, conn.others
        for rec in conn.others:
            if rec.type == g.FCGI_GET_VALUES_RESULT:
                assert rec.pairs() == [(b"FCGI_MPXS_CONNS", b"0")]
            else:
                assert rec.content == bytes([99]) + b"\0" * 7


def test_fastcgi_get_values(gw):
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        values = conn.get_values(
            ["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS", "FCGI_NOT_A_VARIABLE"]
        )
        assert set(values) == {b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS", b"FCGI_MPXS_CONNS"}
        assert values[b"FCGI_MPXS_CONNS"] == b"0"
        assert values[b"FCGI_MAX_REQS"] == b"4"  # 1 worker x 4 threads
        assert int(values[b"FCGI_MAX_CONNS"]) > 0
        # Asking for one variable gets just that one; the connection stays usable.
        assert conn.get_values(["FCGI_MAX_REQS"]) == {b"FCGI_MAX_REQS": b"4"}
        # Asked for thousands of times over (62700 bytes of names), each is
        # answered once: the answer fits in its one record.
        rec_pairs = conn.get_values(["FCGI_MAX_CONNS", "FCGI_MPXS_CONNS"] * 1900)
        assert rec_pairs == {b"FCGI_MAX_CONNS": values[b"FCGI_MAX_CONNS"], b"FCGI_MPXS_CONNS": b"0"}
        r = conn.request(g.cgi_params(uri="/fixed"))
        assert r.body == b"hello world"
        assert r.closed


def test_fastcgi_get_values_counts_every_worker(start_server):
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [("fastcgi", "127.0.0.1:0")],
        "--max-connections",
        "3",
        workers=2,
        threads=3,
    )
    addr = server.addr("fastcgi")
    with g.FcgiConn(addr) as conn:
        assert conn.get_values(["FCGI_MAX_REQS", "FCGI_MAX_CONNS"]) == {
            b"FCGI_MAX_REQS": b"6",
            b"FCGI_MAX_CONNS": b"6",  # 2 workers x --max-connections 3
        }


def test_fastcgi_get_values_max_conns_is_the_real_limit(start_server):
    """The front end may open as many connections as FCGI_MAX_CONNS says, and each
    of them is served; while all of them are in use (here: each in the middle of
    its request), the next one is turned away."""
    server = g.start_gateways(
        start_server, "behaviour:application", [("fastcgi", "127.0.0.1:0")], "--max-connections", "3"
    )
    addr = server.addr("fastcgi")
    conns = [g.FcgiConn(addr) for _ in range(3)]
    try:
        limit = int(conns[0].get_values(["FCGI_MAX_CONNS"])[b"FCGI_MAX_CONNS"])
        assert limit == 3
        for c in conns:
            r = c.request(g.cgi_params(uri="/fixed"), keep_conn=True)
            assert r.body == b"hello world"
        # Each begins another request and stops before the end of its params.
        for c in conns:
            c.send(g.fcgi_request_bytes(g.cgi_params(uri="/fixed"), keep_conn=True)[:-16])
        time.sleep(0.3)
        mark = server.mark()
        with g.FcgiConn(addr) as extra:
            assert extra.at_eof(timeout=10), "a connection past FCGI_MAX_CONNS was kept"
        server.wait_for(r"--max-connections 3", since=mark)
    finally:
        for c in conns:
            c.close()


def test_fastcgi_unknown_record_type(gw):
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send_record(42, 0, b"whatever")
        rec = conn.read_record()
        assert (rec.type, rec.request_id, rec.content) == (g.FCGI_UNKNOWN_TYPE, 0, bytes([42]) + b"\0" * 7)
        conn.send_record(200, 1)
        rec = conn.read_record()
        assert (rec.type, rec.content[0]) == (g.FCGI_UNKNOWN_TYPE, 200)
        r = conn.request(g.cgi_params(uri="/fixed"))
        assert (r.status, r.body) == (200, b"hello world")


@pytest.mark.parametrize("keep_conn", [True, False], ids=["keep", "close"])
@pytest.mark.parametrize("role", [g.FCGI_AUTHORIZER, g.FCGI_FILTER, 77])
def test_fastcgi_unknown_role(gw, role, keep_conn):
    mark = gw.mark()
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(
            g.begin_request(1, role, keep_conn)
            + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(g.cgi_params(uri="/fixed")))
            + g.stream(g.FCGI_STDIN, 1, b"")
        )
        r = conn.read_response(1)
        assert r.protocol_status == g.FCGI_UNKNOWN_ROLE
        assert r.records[0].type == g.FCGI_END_REQUEST, "no STDOUT for a refused role"
        if keep_conn:
            r = conn.request(g.cgi_params(uri="/fixed"), request_id=2)
            assert (r.status, r.body) == (200, b"hello world")
        else:
            assert conn.at_eof()
    name = {g.FCGI_AUTHORIZER: r"AUTHORIZER \(2\)", g.FCGI_FILTER: r"FILTER \(3\)"}.get(role, str(role))
    gw.wait_for(
        rf"\[WARNING\] Bad fastcgi request from 127\.0\.0\.1:\d+: FastCGI role {name} refused for request 1",
        since=mark,
    )


@pytest.mark.parametrize("phase", ["params", "stdin"])
def test_fastcgi_second_request_id_gets_cant_mpx_conn(gw, phase):
    """BEGIN_REQUEST for another id while a request's PARAMS or STDIN are still
    coming: END_REQUEST CANT_MPX_CONN for that id; the active request completes."""
    enc = g.encode_pairs(g.cgi_params("POST", f"/read-then/slow?secs=0.5&id={phase}", b"abcdef"))
    second = g.fcgi_request_bytes(g.cgi_params(uri="/fixed"), request_id=2, keep_conn=True)
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(g.begin_request(1, keep_conn=True) + g.record(g.FCGI_PARAMS, 1, enc[:15]))
        if phase == "params":
            conn.send(second)
        conn.send(
            g.record(g.FCGI_PARAMS, 1, enc[15:])
            + g.record(g.FCGI_PARAMS, 1)
            + g.record(g.FCGI_STDIN, 1, b"abc")
        )
        if phase == "stdin":
            conn.send(second)
        conn.send(g.record(g.FCGI_STDIN, 1, b"def") + g.record(g.FCGI_STDIN, 1))
        refused = conn.read_response(2)
        assert refused.protocol_status == g.FCGI_CANT_MPX_CONN
        assert refused.records[0].type == g.FCGI_END_REQUEST, "no STDOUT for a refused request"
        first = conn.read_response(1)
        assert (first.status, first.body, first.protocol_status) == (200, f"slept {phase}".encode(), 0)
        # The connection still serves requests afterwards.
        r = conn.request(g.cgi_params(uri="/fixed"), request_id=3)
        assert r.body == b"hello world"
        assert not conn.others


@pytest.mark.parametrize("body", [b"", b"x" * 300_000], ids=["get", "post"])
def test_fastcgi_next_request_sent_before_end_request_is_served(gw, body):
    """HAProxy reuses a kept connection as soon as it has the whole response
    body, so the next BEGIN_REQUEST can arrive before END_REQUEST of the one
    running, once that one's STDIN has ended. It is the next request, not a
    concurrent one: served after the first, never refused."""
    mark = gw.mark()
    enc = g.encode_pairs(g.cgi_params("POST", "/read-then/slow?secs=0.5&id=running", body))
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(
            g.begin_request(1, keep_conn=True) + g.record(g.FCGI_PARAMS, 1, enc) + g.record(g.FCGI_PARAMS, 1)
        )
        for at in range(0, len(body), 65535):
            conn.send(g.record(g.FCGI_STDIN, 1, body[at : at + 65535]))
        conn.send(g.record(g.FCGI_STDIN, 1))
        gw.wait_for(r"slow request started: running$", since=mark)
        conn.send(g.fcgi_request_bytes(g.cgi_params(uri="/fixed"), request_id=2, keep_conn=True))
        first = conn.read_response(1)
        assert (first.status, first.body, first.protocol_status) == (200, b"slept running", 0)
        second = conn.read_response(2)
        assert (second.status, second.body, second.protocol_status) == (200, b"hello world", 0)
        r = conn.request(g.cgi_params(uri="/fixed"), request_id=3)
        assert r.body == b"hello world"
        assert not conn.others


@pytest.mark.parametrize("gap", [0.0, 0.0002, 0.002], ids=["same-write", "0.2ms", "2ms"])
def test_fastcgi_second_request_right_behind_the_first_is_never_lost(gw, gap):
    """A second request id sent just behind a quick first one is either refused
    with CANT_MPX_CONN (seen while the first ran) or served once the first has
    ended; either way it gets an answer and the connection goes on."""
    first = g.fcgi_request_bytes(g.cgi_params(uri="/fixed"), request_id=1, keep_conn=True)
    second = g.fcgi_request_bytes(g.cgi_params(uri="/fixed?n=2"), request_id=2, keep_conn=True)
    for _ in range(20):
        with g.FcgiConn(gw.addr("fastcgi")) as conn:
            if gap:
                conn.send(first)
                time.sleep(gap)
                conn.send(second)
            else:
                conn.send(first + second)
            r1 = conn.read_response(1)
            assert (r1.status, r1.body, r1.protocol_status) == (200, b"hello world", 0)
            r2 = conn.read_response(2)
            if r2.protocol_status == g.FCGI_CANT_MPX_CONN:
                assert r2.records[0].type == g.FCGI_END_REQUEST
            else:
                assert (r2.status, r2.body, r2.protocol_status) == (200, b"hello world", 0)
            r3 = conn.request(g.cgi_params(uri="/fixed"), request_id=3)
            assert r3.body == b"hello world"
            assert not conn.others


@pytest.mark.parametrize(
    ("threads", "how", "args"),
    [(1, "SIGHUP", ()), (4, "SIGHUP", ()), (4, "SIGUSR2", ()), (4, "SIGHUP", ("--preload",))],
    ids=["hup-1-thread", "hup-4-threads", "usr2", "hup-preload"],
)
def test_fastcgi_kept_connections_survive_a_reload(start_server, threads, how, args):
    """FastCGI cannot tell a front end that a kept connection is about to close,
    so a reload hands them to the new workers instead: an idle one at once, and
    one busy with a request once its END_REQUEST is out. The front end's next
    requests on both are served by new workers, on the same connections. Also
    when the master re-executes itself (USR2, HUP with --preload) and the new
    workers have a scoreboard of their own."""
    server = g.start_gateways(
        start_server,
        "gateway_probe:application",
        [("fastcgi", "127.0.0.1:0")],
        *args,
        workers=2,
        threads=threads,
    )
    addr = server.addr("fastcgi")
    with g.FcgiConn(addr, timeout=30) as idle, g.FcgiConn(addr, timeout=30) as busy:
        before = {int(idle.request(g.cgi_params(uri="/pid"), request_id=1, keep_conn=True).body)}
        olds = server.worker_pids()
        mark = server.mark()
        busy.send(
            g.fcgi_request_bytes(g.cgi_params(uri="/slow?secs=2&id=inflight"), request_id=1, keep_conn=True)
        )
        server.wait_for(r"slow request started: inflight$", since=mark)
        server.signal(getattr(signal, how))
        r = busy.read_response(1)
        assert (r.status, r.body, r.closed) == (200, b"slept inflight", False)
        for old in olds:
            server.wait_for(rf"Worker stopped gracefully: pid={old}", since=mark, timeout=20)
        new = set(server.worker_pids(mark))
        for n, conn in enumerate((idle, busy), start=2):
            r = conn.request(g.cgi_params(uri="/pid"), request_id=n, keep_conn=True)
            assert r.status == 200 and not r.closed
            assert int(r.body) in new and int(r.body) not in before
    assert len(server.grep(r"Worker handed \d+ connection")) >= 1, server.log


def test_fastcgi_requests_begun_as_a_drain_starts_are_not_lost(start_server):
    """Apache writes BEGIN_REQUEST on its own, then PARAMS and STDIN. A draining
    worker that had read only BEGIN_REQUEST of a kept connection's next request
    handed the connection to a sibling without it, and the sibling dropped the
    rest as records of a request it never saw begin: the front end waited for
    an answer until its timeout (Apache: 504)."""
    server = g.start_gateways(
        start_server, "gateway_probe:application", [("fastcgi", "127.0.0.1:0")], workers=1, threads=4
    )
    addr = server.addr("fastcgi")
    conns = [g.FcgiConn(addr, timeout=20) for _ in range(16)]
    try:
        old = {int(c.request(g.cgi_params(uri="/pid"), request_id=1, keep_conn=True).body) for c in conns}
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"Worker draining", since=mark)
        rest = g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(g.cgi_params(uri="/pid"))) + g.stream(
            g.FCGI_STDIN, 1, b""
        )
        for c in conns:
            c.send(g.begin_request(1, keep_conn=True))
        time.sleep(0.5)
        for c in conns:
            c.send(rest)
        for c in conns:
            r = c.read_response(1)
            assert r.status == 200 and int(r.body) not in old
    finally:
        for c in conns:
            c.close()


def test_a_body_s_closing_record_after_the_response_does_not_close_a_draining_worker_s_connection(
    start_server,
):
    """Apache writes a body's closing empty STDIN record on its own: once the
    app has read CONTENT_LENGTH bytes, it may come after END_REQUEST, and then
    the next request, on the same connection. A draining worker that read that
    record alone closed the kept connection, and the request on its way was
    lost (Apache: 503, "Failed to read FastCGI header"). With workers
    recycled every 2 requests, many connections are read by draining
    workers; each such connection now goes to a sibling with the request."""
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [("fastcgi", "127.0.0.1:0")],
        "--max-requests",
        "2",
        workers=2,
        threads=4,
    )
    addr = server.addr("fastcgi")
    failures: list[str] = []

    def client(k: int):
        conn = g.FcgiConn(addr, timeout=20)
        closing = b""
        try:
            for i in range(100):
                body = f"{k}-{i}".encode()
                if closing:
                    conn.send(closing)
                    time.sleep(0.01)
                params = g.cgi_params("POST", "/echo", body)
                conn.send(
                    g.begin_request(1, keep_conn=True)
                    + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(params))
                    + g.stream(g.FCGI_STDIN, 1, body, end=False)
                )
                reply = conn.read_response(1)
                if reply.status != 200 or reply.body != body:
                    failures.append(f"{body!r}: {reply.status} {reply.body[:100]!r}")
                closing = g.record(g.FCGI_STDIN, 1, b"")
        except (OSError, EOFError, g.BadReply) as e:
            failures.append(f"client {k}: {e!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert server.grep(r"Worker handed \d+ connection\(s\) to other workers")


def _fastcgi_refusing_large_bodies(start_server, *extra):
    """One worker of two threads on a FastCGI listener, with --max-body-size 1000."""
    return g.start_gateways(
        start_server,
        "gateway_probe:application",
        [("fastcgi", "127.0.0.1:0")],
        "--max-body-size",
        "1000",
        *extra,
        workers=1,
        threads=2,
    )


@pytest.mark.parametrize("refusal", ["413", "400", "431"])
def test_fastcgi_keep_conn_stays_after_a_refused_request(start_server, refusal):
    """FCGI_KEEP_CONN leaves the close to the front end: a request refused
    before the app (a body over --max-body-size, a bad CONTENT_LENGTH, too
    many variables) gets its answer, the rest of its STDIN is dropped, and
    the request the front end sent behind it on the same connection is
    served (it was dropped with the connection, unanswered and unlogged)."""
    server = _fastcgi_refusing_large_bodies(start_server)
    if refusal == "413":
        params, body = g.cgi_params("POST", "/echo", b"x" * 5000), b"x" * 5000
    elif refusal == "400":
        params, body = g.cgi_params("POST", "/echo", extra=[("CONTENT_LENGTH", "-5")]), b"abc"
    else:
        params, body = g.cgi_params(extra=[(f"HTTP_X_{i}", "v") for i in range(1100)]), b""
    with g.FcgiConn(server.addr("fastcgi")) as conn:
        for _ in range(3):
            conn.send(
                g.fcgi_request_bytes(params, body, request_id=1, keep_conn=True, stdin_chunk=1000)
                + g.fcgi_request_bytes(g.cgi_params("POST", "/echo", b"next"), b"next", 1, keep_conn=True)
            )
            refused = conn.read_response(1)
            assert refused.status == int(refusal), refused
            served = conn.read_response(1)
            assert (served.status, served.body) == (200, b"next"), served
        assert not conn.at_eof(0.5)
    said = r"Request body too large from" if refusal == "413" else rf"Bad fastcgi request from .*\({refusal} "
    assert len(server.grep(said)) == 3, server.log[-2000:]


@pytest.mark.parametrize("keep_conn", [True, False], ids=["keep", "close"])
def test_a_fastcgi_request_refused_from_its_params_has_an_access_log_line(start_server, tmp_path, keep_conn):
    """PARAMS whose records are whole but whose pairs are not get a 400, and
    the 400 its access-log line (and its count in the metrics), like any
    other refusal; the front end's address stands for the client, whose own
    the broken variables would have named."""
    log = tmp_path / "access.log"
    server = _fastcgi_refusing_large_bodies(
        start_server, "--access-log", str(log), "--access-log-format", "%(h)s %(m)s %(U)s %(s)s"
    )
    params = g.encode_pairs(g.cgi_params(uri="/fixed")) + b"\x80\x00\x00\x09\x01ab"
    with g.FcgiConn(server.addr("fastcgi"), timeout=10) as conn:
        conn.send(
            g.begin_request(1, g.FCGI_RESPONDER, keep_conn)
            + g.stream(g.FCGI_PARAMS, 1, params)
            + g.stream(g.FCGI_STDIN, 1, b"")
        )
        assert conn.read_response(1).status == 400
        if keep_conn:
            r = conn.request(g.cgi_params(uri="/fixed"), request_id=1, keep_conn=True)
            assert (r.status, r.body) == (200, b"hello world")
    if not keep_conn:
        assert g.call("fastcgi", server.addr("fastcgi"), uri="/fixed").body == b"hello world"
    assert wait_until(
        lambda: (
            log.exists()
            and log.read_text().splitlines() == ["127.0.0.1 - - 400", "192.0.2.10 GET /fixed 200"]
        )
    ), log.read_text() if log.exists() else "no access log"


@pytest.mark.parametrize("refusal", ["413", "400", "broken-params"])
def test_a_refusal_on_a_kept_fastcgi_connection_ends_after_its_stdin(start_server, refusal):
    """END_REQUEST of a refused request waits for the end of its STDIN, as
    for an app's answer, also as the connection's second request (with the
    first's id again, as nginx sends); and the connection, answered, is on
    the keep-alive clock, not the header timeout of a new one."""
    server = _fastcgi_refusing_large_bodies(start_server, "--header-timeout", "1")
    if refusal == "413":
        params = g.encode_pairs(g.cgi_params("POST", "/echo", b"x" * 5000))
    elif refusal == "400":
        params = g.encode_pairs(g.cgi_params("POST", "/echo", extra=[("CONTENT_LENGTH", "abc")]))
    else:
        params = g.encode_pairs(g.cgi_params(uri="/fixed")) + b"\x80\x00\x00\x09\x01ab"
    with g.FcgiConn(server.addr("fastcgi"), timeout=10) as conn:
        for first in (True, False):
            if not first:
                r = conn.request(g.cgi_params(uri="/fixed"), request_id=1, keep_conn=True)
                assert r.status == 200
            conn.send(
                g.begin_request(1, g.FCGI_RESPONDER, True)
                + g.stream(g.FCGI_PARAMS, 1, params)
                # Part of the 413's declared body; the others declare none.
                + g.stream(g.FCGI_STDIN, 1, b"x" * (3000 if refusal == "413" else 1000), end=False)
            )
            got = [conn.read_record(5), conn.read_record(5)]
            assert [r.type for r in got] == [g.FCGI_STDOUT, g.FCGI_STDOUT], got
            with pytest.raises(TimeoutError):
                conn.read_record(0.5)
            conn.send(g.stream(g.FCGI_STDIN, 1, b"x" * (2000 if refusal == "413" else 0)))
            end = conn.read_record(5)
            assert end.type == g.FCGI_END_REQUEST, end
        # Past the header timeout, still open for the next request.
        time.sleep(1.5)
        r = conn.request(g.cgi_params(uri="/fixed"), request_id=1, keep_conn=True)
        assert (r.status, r.body) == (200, b"hello world")


def test_fastcgi_params_whose_pairs_are_broken_get_400_and_a_kept_connection_goes_on(gw):
    """Whole PARAMS records whose pairs are not (a length running past the
    end): the front end gets a 400 to show, as for a bad uwsgi packet,
    rather than a closed connection (a 502), and KEEP_CONN keeps it."""
    mark = gw.mark()
    broken = g.encode_pairs(g.cgi_params(uri="/fixed")) + b"\x80\x00\x00\x09\x01ab"
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(
            g.begin_request(1, g.FCGI_RESPONDER, True)
            + g.stream(g.FCGI_PARAMS, 1, broken)
            + g.stream(g.FCGI_STDIN, 1, b"")
        )
        r = conn.read_response(1)
        assert (r.status, r.protocol_status) == (400, 0), r
        r = conn.request(g.cgi_params(uri="/fixed"), request_id=1, keep_conn=True)
        assert (r.status, r.body) == (200, b"hello world")
    gw.wait_for(r"Bad fastcgi request from 127\.0\.0\.1:\d+: request 1: malformed PARAMS", since=mark)


def test_fastcgi_keep_conn_half_close_with_the_request_ends_the_connection(start_server):
    """With one thread, kept-alive connections stay armed edge-triggered between
    requests. A request and the front end's half-close that arrive together, while
    the thread is busy with another connection, reach the worker as one event: the
    request is answered and the connection then closed, not left open until the
    keep-alive timeout (75 s by default)."""
    server = g.start_gateways(
        start_server, "gateway_probe:application", [("fastcgi", "127.0.0.1:0")], workers=1, threads=1
    )
    addr = server.addr("fastcgi")
    with g.FcgiConn(addr, timeout=30) as conn, g.FcgiConn(addr, timeout=30) as busy:
        r = conn.request(g.cgi_params(uri="/fixed"), request_id=1, keep_conn=True)
        assert (r.body, r.closed) == (b"hello world", False)
        busy.send(g.fcgi_request_bytes(g.cgi_params(uri="/slow?secs=1"), request_id=1))
        server.wait_for("slow request started")
        conn.send(g.fcgi_request_bytes(g.cgi_params(uri="/fixed"), request_id=2, keep_conn=True))
        conn.half_close()
        r = conn.read_response(2)
        assert (r.status, r.body) == (200, b"hello world")
        assert conn.at_eof(timeout=20), server.log[-2000:]
        assert busy.read_response(1).status == 200


@pytest.mark.parametrize("reads_body", [True, False], ids=["app-read-body", "app-ignores-body"])
def test_fastcgi_abort_request_closes_the_iterable(gw, reads_body):
    tag = uuid.uuid4().hex
    path = "/read-then/closing" if reads_body else "/closing"
    mark = gw.mark()
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(g.fcgi_request_bytes(g.cgi_params(uri=f"{path}?id={tag}&mode=infinite"), keep_conn=True))
        for _ in range(3):
            rec = conn.read_record()
            assert rec.type == g.FCGI_STDOUT and rec.content, rec
        conn.send_record(g.FCGI_ABORT_REQUEST, 1)
        # The response stops: END_REQUEST, or the connection closes, within a few records
        # (those already on their way) and a few seconds.
        after, end = 0, None
        while True:
            rec = conn.read_record(timeout=5)
            if rec is None or rec.type == g.FCGI_END_REQUEST:
                end = rec
                break
            after += 1
            assert after < 200, "the response goes on after ABORT_REQUEST"
        assert wait_until(lambda: tag in gw.markers.read_text().split(), timeout=5), "close() was not called"
        if end is not None:
            assert end.request_id == 1
            # The connection asked to be kept and still serves requests.
            r = conn.request(g.cgi_params(uri="/fixed"), request_id=1)
            assert r.body == b"hello world"
    gw.wait_for(r"the front end aborted the request", since=mark)
    # Said once, not again as a client that disconnected.
    said = gw.grep(r"abort|disconnect", since=mark)
    assert len(said) == 1, [m.string for m in said]


def test_gunicorn_zeros_keep_alive_off_and_limits_at_the_ceiling(start_server):
    """gunicorn's 0s: --keep-alive 0 closes every HTTP connection after its
    response (FastCGI connections the front end keeps stay kept), and
    --limit-request-line 0 / --limit-request-field-size 0 / --limit-request-fields 0
    allow the most corral does instead of being refused."""
    server = start_server(
        "behaviour:application",
        "--fastcgi",
        "127.0.0.1:0",
        "--keep-alive",
        "0",
        "--limit-request-line",
        "0",
        "--limit-request-field-size",
        "0",
        "--limit-request-fields",
        "0",
    )
    with server.connect() as conn:
        conn.send_request("GET", "/fixed", {"Host": "x"})
        r = conn.read_response()
        assert (r.status, r.header("Connection")) == (200, "close")
        assert conn.at_eof(10)
    long_query = "q=" + "a" * 20_000  # past the default 8190 of both limits
    with server.connect() as conn:
        headers = {"Host": "x", "X-Long": "b" * 20_000, **{f"X-H{i}": "v" for i in range(150)}}
        conn.send_request("GET", f"/fixed?{long_query}", headers)
        assert conn.read_response().status == 200
    fastcgi = g.gateway_addresses(server)["fastcgi"][0]
    with g.FcgiConn(fastcgi) as conn:
        assert conn.request(g.cgi_params(uri="/fixed"), keep_conn=True).body == b"hello world"
        time.sleep(2.5)  # idle past a sweep: a zero idle time would have closed it
        assert conn.request(g.cgi_params(uri="/fixed"), keep_conn=True).body == b"hello world"


@pytest.mark.parametrize("offloaded", [False, True], ids=["serving-thread", "offloaded"])
def test_fastcgi_abort_stops_a_file_download(start_server, tmp_path, offloaded):
    """ABORT_REQUEST during a large file response (a --static file or
    wsgi.file_wrapper, sent with sendfile in FastCGI records, by the serving
    thread or, once the front end stops reading, by the offload thread): the
    rest of the file is not sent, the request gets its END_REQUEST and the kept
    connection serves the next request."""
    root = tmp_path / "files"
    root.mkdir()
    size = 64 * MIB
    (root / "big.bin").write_bytes(random.Random(5).randbytes(size))
    server = g.start_gateways(
        start_server, "behaviour:application", [("fastcgi", "127.0.0.1:0")], "--static", f"/static={root}"
    )
    mark = server.mark()
    with g.FcgiConn(server.addr("fastcgi"), timeout=30, rcvbuf=4096 if offloaded else None) as conn:
        conn.send(g.fcgi_request_bytes(g.cgi_params(uri="/static/big.bin"), keep_conn=True))
        first = conn.read_record()
        assert first.type == g.FCGI_STDOUT and first.content.startswith(b"Status: 200"), first
        if offloaded:
            time.sleep(0.5)  # the socket fills and the offload thread takes the file
        conn.send_record(g.FCGI_ABORT_REQUEST, 1)
        received, end = len(first.content), None
        while end is None:
            rec = conn.read_record()
            assert rec is not None, "closed instead of ending the request"
            if rec.type == g.FCGI_END_REQUEST:
                end = rec
            else:
                assert rec.type == g.FCGI_STDOUT, rec
                received += len(rec.content)
        assert received < size // 2, f"{received} of {size} bytes sent after ABORT_REQUEST"
        assert end.request_id == 1
        assert conn.request(g.cgi_params(uri="/fixed"), request_id=1).body == b"hello world"
    server.wait_for(r"GET /static/big\.bin .*the front end aborted the request", since=mark)


@pytest.mark.parametrize("keep_conn", [True, False], ids=["keep-conn", "no-keep-conn"])
def test_fastcgi_abort_while_the_app_reads_the_body(gw, keep_conn):
    """ABORT_REQUEST arriving while the app waits for more STDIN: the app's read
    fails, and the request still gets its END_REQUEST (FastCGI 5.4)."""
    mark = gw.mark()
    params = g.cgi_params("POST", "/sha", extra=[("CONTENT_LENGTH", "1000")])
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(
            g.begin_request(1, keep_conn=keep_conn)
            + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(params))
            + g.record(g.FCGI_STDIN, 1, b"abc")
            + g.record(g.FCGI_ABORT_REQUEST, 1)
        )
        r = conn.read_response(1, timeout=10)
        assert r.records[-1].type == g.FCGI_END_REQUEST, r.records
        assert r.protocol_status == g.FCGI_REQUEST_COMPLETE
        if keep_conn:
            r = conn.request(g.cgi_params(uri="/fixed"), request_id=2, keep_conn=True)
            assert r.body == b"hello world"
        else:
            assert conn.at_eof(timeout=10)
    gw.wait_for(r"POST /sha from .*: the front end aborted the request", since=mark)
    said = gw.grep(r"abort|disconnect", since=mark)
    assert len(said) == 1, [m.string for m in said]


def test_fastcgi_stdin_past_content_length_is_not_read(gw):
    """The app reads CONTENT_LENGTH bytes and then sees end of input (PEP 3333); what
    the front end sent beyond it is dropped, logged, and does not reach the next
    request on the connection."""
    mark = gw.mark()
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        params = g.cgi_params("POST", "/sha", extra=[("CONTENT_LENGTH", "2")])
        conn.send(g.fcgi_request_bytes(params, b"abcdef", keep_conn=True))
        r = conn.read_response(1)
        assert r.status == 200
        got = r.json()
        assert (got["length"], got["sha256"]) == (2, hashlib.sha256(b"ab").hexdigest())
        r = conn.request(g.cgi_params("POST", "/sha", body=b"xyz"), b"xyz", request_id=2, keep_conn=True)
        assert r.json()["sha256"] == hashlib.sha256(b"xyz").hexdigest()
    gw.wait_for(r"POST /sha from .*: the front end sent 4 bytes of STDIN past CONTENT_LENGTH", since=mark)


@pytest.mark.parametrize("body", [b"", b"abc"])
@pytest.mark.parametrize("path", ["/sha", "/fixed"])
def test_fastcgi_body_of_content_length_is_whole_without_the_end_of_stdin(gw, body, path):
    """Once CONTENT_LENGTH bytes came, the app has its body (PEP 3333) and the
    response its END_REQUEST, without waiting for the empty STDIN record:
    HAProxy 2.6 sends none for an empty chunked upload. Should it come late,
    it is dropped, and the next request on the connection is served."""
    mark = gw.mark()
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        params = g.cgi_params("POST", path, body)
        conn.send(
            g.begin_request(1, keep_conn=True)
            + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(params))
            + g.stream(g.FCGI_STDIN, 1, body, end=False)
        )
        r = conn.read_response(1, timeout=5)
        assert r.status == 200
        if path == "/sha":
            got = r.json()
            assert (got["length"], got["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        conn.send(g.record(g.FCGI_STDIN, 1))
        r = conn.request(g.cgi_params("POST", "/sha", body=b"xyz"), b"xyz", request_id=1, keep_conn=True)
        assert r.json()["sha256"] == hashlib.sha256(b"xyz").hexdigest()
    assert not gw.grep(r"\[(WARNING|ERROR)\].*", since=mark), gw.log[-2000:]


@pytest.mark.parametrize("proto", ["uwsgi", "scgi"])
def test_a_body_cut_short_by_the_front_end_is_an_error_for_the_app(gw, proto):
    """A front end that closes before CONTENT_LENGTH bytes (nginx when the client
    aborts an unbuffered upload) must not look like a whole, shorter body: the
    app's read raises (ClientDisconnected), as over FastCGI and under uWSGI, and
    nothing answers 200 for the cut upload."""
    mark = gw.mark()
    extra = [("SCGI", "1")] if proto == "scgi" else []
    whole = g.request_bytes(proto, g.cgi_params("POST", "/sha", b"x" * 1000, extra), b"x" * 1000)
    sock = g.connect(gw.addr(proto))
    try:
        sock.sendall(whole[:-700])
        sock.shutdown(socket.SHUT_WR)
        data, closed = g.read_until_close(sock, timeout=15)
    finally:
        sock.close()
    assert closed
    assert b"200 OK" not in data and b'"length"' not in data, data
    gw.wait_for(r"POST /sha from .*: the peer closed its side 700 bytes short of the declared", since=mark)
    assert g.call(proto, gw.addr(proto), uri="/fixed").body == b"hello world"
    # One line for the one event.
    assert not gw.grep(r"POST /sha.*client disconnected", since=mark), gw.log[-2000:]


def test_a_fastcgi_upload_cut_by_the_front_end_closing_is_a_disconnect_said_once(gw):
    """Its client gone in the middle of an upload, the front end closes (Apache
    does): the app's read raises ClientDisconnected, as over uwsgi and SCGI, and
    one line says so, with how much had come. It was an invalid-body error
    with no line at all."""
    mark = gw.mark()
    sock = g.connect(gw.addr("fastcgi"))
    try:
        params = g.cgi_params("POST", "/sha", extra=[("CONTENT_LENGTH", "1000")])
        sock.sendall(
            g.begin_request(1)
            + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(params))
            + g.stream(g.FCGI_STDIN, 1, b"x" * 300, end=False)
        )
        sock.shutdown(socket.SHUT_WR)
        data, closed = g.read_until_close(sock, timeout=15)
    finally:
        sock.close()
    assert closed and b'"length"' not in data, data
    gw.wait_for(
        r"POST /sha from .*: the front end closed the connection inside the body \(300 bytes of it received, "
        r"700 short of CONTENT_LENGTH\)",
        since=mark,
    )
    assert not gw.grep(r"InvalidRequestBody|\[ERROR\]", since=mark), gw.log[-2000:]
    assert g.call("fastcgi", gw.addr("fastcgi"), uri="/fixed").body == b"hello world"


def test_fastcgi_stdin_shorter_than_content_length_is_an_error_for_the_app(gw):
    """As over uwsgi and SCGI: the app's read raises rather than taking the
    cut body for a whole one."""
    mark = gw.mark()
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        params = g.cgi_params("POST", "/sha", extra=[("CONTENT_LENGTH", "100")])
        conn.send(g.fcgi_request_bytes(params, b"abc", keep_conn=True))
        r = conn.read_response(1)
        assert r.status == 400 and b'"length"' not in r.body, (r.status, r.body)
    assert g.call("fastcgi", gw.addr("fastcgi"), uri="/fixed").body == b"hello world"
    gw.wait_for(r"Bad fastcgi request from .*: STDIN ended short of CONTENT_LENGTH", since=mark)


def test_a_queued_fastcgi_request_aborted_leaves_no_response_held(start_server):
    """One thread holds a finished response briefly to write it with the
    next: a request that came in behind a running one on the same kept
    connection, and that the front end aborted meanwhile, gets its
    END_REQUEST, and the response held before it goes out with it rather
    than waiting for the front end to send something more."""
    server = g.start_gateways(start_server, "behaviour:application", [("fastcgi", "127.0.0.1:0")], threads=1)
    with g.FcgiConn(server.addr("fastcgi"), timeout=20) as conn:
        conn.send(
            g.fcgi_request_bytes(
                g.cgi_params("GET", "/slow", extra=[("QUERY_STRING", "secs=1&id=one")]), keep_conn=True
            )
        )
        server.wait_for("slow request started: one")
        conn.send(g.fcgi_request_bytes(g.cgi_params("GET", "/fixed"), request_id=2, keep_conn=True))
        conn.send_record(g.FCGI_ABORT_REQUEST, 2)
        assert conn.read_response(1).body == b"slept one"
        ended = conn.read_record()
        while ended.type != g.FCGI_END_REQUEST:
            ended = conn.read_record()
        assert ended.request_id == 2


def test_fastcgi_stdin_before_the_end_of_params_is_refused(gw):
    """Its bytes would otherwise be dropped from the body without a word."""
    mark = gw.mark()
    params = g.cgi_params("POST", "/sha", b"abcdef")
    whole = g.fcgi_request_bytes(params, b"abcdef")
    # BEGIN_REQUEST, then STDIN "abc" before the PARAMS stream's records.
    begin_len = 16
    early = g.record(5, 1, b"abc")
    data, closed = b"", False
    sock = g.connect(gw.addr("fastcgi"))
    try:
        sock.sendall(whole[:begin_len] + early + whole[begin_len:])
        data, closed = g.read_until_close(sock, timeout=15)
    finally:
        sock.close()
    assert closed and b"Status: 200" not in data, data
    gw.wait_for(r"STDIN record before the end of PARAMS", since=mark)


def _closed_unanswered(addr, data):
    """Sends `data` and expects the server to close without a byte in return."""
    sock = g.connect(addr)
    try:
        sock.sendall(data)
        got, closed = g.read_until_close(sock, timeout=15)
        assert closed and got == b""
    finally:
        sock.close()


@pytest.mark.parametrize("proto", PROTOS)
def test_a_request_head_that_stalls_is_closed_and_logged(start_server, proto):
    server = g.start_gateways(
        start_server, "behaviour:application", [(proto, "127.0.0.1:0")], "--header-timeout", "1"
    )
    whole = g.request_bytes(proto, g.cgi_params(uri="/fixed"))
    mark = server.mark()
    _closed_unanswered(server.addr(proto), whole[:10])
    server.wait_for(
        rf"Timed out: {proto} request from 127\.0\.0\.1:\d+: incomplete after the header timeout "
        r"\(1 s, 10 bytes buffered\)",
        since=mark,
    )
    assert g.call(proto, server.addr(proto), uri="/fixed").body == b"hello world"


@pytest.mark.parametrize("proto", ["uwsgi", "scgi"])
def test_a_small_body_that_stalls_is_answered_408(start_server, proto, tmp_path):
    """A body small enough to be read ahead of the app has a body's grace and
    rate; when it stalls, the request is answered 408, as one whose larger
    body the app was reading would be. The log line says it was the body and
    names the request and the client the front end named; the 408 has its
    access-log line."""
    log = tmp_path / "access.log"
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [(proto, "127.0.0.1:0")],
        "--header-timeout",
        "1",
        "--access-log",
        str(log),
        "--access-log-format",
        "%(h)s %(m)s %(U)s %(s)s",
    )
    body = b"b" * 6000
    extra = [("SCGI", "1")] if proto == "scgi" else []
    whole = g.request_bytes(proto, g.cgi_params("POST", uri="/echo", body=body, extra=extra), body)
    mark = server.mark()
    with g.connect(server.addr(proto), timeout=30) as sock:
        sock.sendall(whole[: len(whole) - len(body) + 100])
        out, closed = g.read_until_close(sock, timeout=30)
    assert closed and g.parse_any(proto, out).status == 408, out[:300]
    server.wait_for(
        rf"Timed out: {proto} request POST /echo from 192\.0\.2\.10 via 127\.0\.0\.1:\d+: its body came "
        r"slower than 500 bytes/s after the header timeout \(1 s, \d+ bytes buffered\); answered 408",
        since=mark,
    )
    assert wait_until(lambda: log.exists() and log.read_text().splitlines() == ["192.0.2.10 POST /echo 408"])
    assert g.call(proto, server.addr(proto), uri="/fixed").body == b"hello world"


def test_a_fastcgi_request_whose_records_stop_is_closed_and_logged(start_server):
    """Whole records leave the buffer for the request's state as they come: a
    request that stops between two of them is still said to have timed out."""
    server = g.start_gateways(
        start_server, "behaviour:application", [("fastcgi", "127.0.0.1:0")], "--header-timeout", "1"
    )
    mark = server.mark()
    params = g.encode_pairs(g.cgi_params(uri="/fixed"))
    _closed_unanswered(
        server.addr("fastcgi"), g.begin_request(1, keep_conn=True) + g.record(g.FCGI_PARAMS, 1, params)
    )
    # The PARAMS held in the request's state count as buffered.
    server.wait_for(
        r"Timed out: fastcgi request from 127\.0\.0\.1:\d+: incomplete after the header timeout "
        rf"\(1 s, {len(params)} bytes buffered\)",
        since=mark,
    )


@pytest.mark.parametrize(
    "what", ["params one at a time", "management records", "kept, then management records"]
)
def test_a_fastcgi_peer_sending_a_record_now_and_then_still_meets_the_header_timeout(start_server, what):
    """Each record leaves the buffer as it is read, so the clock must not start
    again with every read: a request's PARAMS trickling in a record at a time,
    or a new connection sending only GET_VALUES, is closed after the header
    timeout like any unfinished request, not held open for good."""
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [("fastcgi", "127.0.0.1:0")],
        "--header-timeout",
        "1",
        "--keepalive-timeout",
        "1",
    )
    pair = g.encode_pairs([(b"A", b"")])
    with g.connect(server.addr("fastcgi"), timeout=30) as sock:
        if what == "params one at a time":
            sock.sendall(g.begin_request(1, keep_conn=True))
        if what.startswith("kept"):
            # A kept connection idle after its request: GET_VALUES records
            # are not requests, and do not restart its keep-alive clock.
            sock.sendall(g.fcgi_request_bytes(g.cgi_params(uri="/fixed"), keep_conn=True))
            got = b""
            while b"hello world" not in got:
                got += sock.recv(65536)
        closed = False
        for _ in range(100):  # 30 s of records, every 0.3 s, against a 1 s timeout
            try:
                if what == "params one at a time":
                    sock.sendall(g.record(g.FCGI_PARAMS, 1, pair))
                else:
                    sock.sendall(g.record(g.FCGI_GET_VALUES, 0, g.encode_pairs([(b"FCGI_MAX_CONNS", b"")])))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.3)
            if select.select([sock], [], [], 0)[0]:
                try:
                    data = sock.recv(65536)  # GET_VALUES_RESULT records, or the end
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed = True
                    break
        assert closed, "the connection was still open after 30 s of records"
    assert g.call("fastcgi", server.addr("fastcgi"), uri="/fixed").body == b"hello world"


def test_fastcgi_abort_before_the_params_end(gw):
    enc = g.encode_pairs(g.cgi_params(uri="/pid"))
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        conn.send(g.begin_request(1, keep_conn=True) + g.record(g.FCGI_PARAMS, 1, enc[:10]))
        conn.send_record(g.FCGI_ABORT_REQUEST, 1)
        r = conn.read_response(1)
        assert r.records[0].type == g.FCGI_END_REQUEST, "nothing ran, only END_REQUEST is owed"
        assert r.protocol_status == g.FCGI_REQUEST_COMPLETE
        r = conn.request(g.cgi_params(uri="/fixed"), request_id=1)
        assert r.body == b"hello world"


# -- socket files and listeners -----------------------------------------------------


def _short_dir(tmp_path):
    # Unix socket paths are limited to 107 bytes.
    assert len(str(tmp_path)) < 80, tmp_path
    return tmp_path


def test_socket_mode_and_removal_at_exit(start_server, tmp_path):
    d = _short_dir(tmp_path)
    paths = {p: d / f"{p}.sock" for p in PROTOS}
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [(p, f"unix:{paths[p]}") for p in PROTOS],
        "--socket-mode",
        "660",
    )
    for proto, path in paths.items():
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660, (proto, oct(st.st_mode))
        assert g.call(proto, str(path), uri="/fixed").body == b"hello world"
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert [p for p in paths.values() if p.exists()] == []


def test_socket_owner(start_server, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    path = _short_dir(tmp_path) / "owned.sock"
    server = g.start_gateways(
        start_server, "behaviour:application", [("uwsgi", f"unix:{path}")], "--socket-owner", "nobody:nogroup"
    )
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert g.call("uwsgi", server.addr("uwsgi", unix=True), uri="/fixed").body == b"hello world"


def test_socket_files_belong_to_the_user_workers_run_as(start_server):
    """As gunicorn does with --user: a front end running as that user can connect."""
    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="corral-own-"))
    try:
        d.chmod(0o777)  # the master, as nobody by then, removes the file at exit
        path = d / "user.sock"
        server = g.start_gateways(
            start_server,
            "behaviour:application",
            [("uwsgi", f"unix:{path}")],
            "--preload",
            "--user",
            "nobody",
        )
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert g.call("uwsgi", str(path), uri="/fixed").body == b"hello world"
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert not path.exists(), server.log
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_socket_owner_group_alone_keeps_the_users_owner(start_server):
    """`--socket-owner :GROUP` with --user: the file is the user's, in GROUP
    (not root's, though root binds it)."""
    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="corral-own-"))
    try:
        d.chmod(0o777)
        path = d / "group.sock"
        server = g.start_gateways(
            start_server,
            "behaviour:application",
            [("uwsgi", f"unix:{path}")],
            "--preload",
            "--user",
            "nobody",
            "--socket-owner",
            ":0",
        )
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, 0)
        server.signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_stale_socket_file_is_replaced(start_server, tmp_path):
    path = _short_dir(tmp_path) / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens on it
    assert path.exists()
    server = g.start_gateways(start_server, "behaviour:application", [("scgi", f"unix:{path}")])
    assert g.call("scgi", server.addr("scgi", unix=True), uri="/fixed").body == b"hello world"


def test_socket_in_use_is_not_taken(start_server, tmp_path):
    path = _short_dir(tmp_path) / "busy.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        server = start_server("behaviour:application", "--fastcgi", f"unix:{path}", http=None, wait=False)
        assert server.wait_exit() != 0
        assert "address already in use" in server.log, server.log
        # The other program's socket is untouched.
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))


def test_a_start_that_fails_after_binding_leaves_no_socket_file(start_server, tmp_path):
    path = _short_dir(tmp_path) / "early.sock"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = start_server(
            "behaviour:application", "--uwsgi", f"unix:{path}", http=f"127.0.0.1:{port}", wait=False
        )
        assert server.wait_exit() != 0
    assert "address already in use" in server.log, server.log
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop the right to connect")
def test_a_socket_that_cannot_be_checked_is_not_taken(start_server, tmp_path):
    """A socket file whose listener this process may not connect to is not
    "stale": the start fails, and the other server keeps its socket."""
    path = _short_dir(tmp_path) / "private.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        os.chmod(path, 0o600)
        os.chown(path, 65534, 65534)
        # root without the capabilities that override file permissions.
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *CORRAL]
        server = start_server(
            "behaviour:application",
            "--uwsgi",
            f"unix:{path}",
            http=None,
            wait=False,
            command=command,
        )
        assert server.wait_exit() != 0
        assert "cannot be checked" in server.log, server.log
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))


def test_non_loopback_listeners_warn_for_the_gateway_protocols(start_server, tmp_path):
    """uwsgi, FastCGI and SCGI trust what their peer says (client address, scheme,
    paths): bound where other machines reach them, whether by address or as an
    inherited descriptor, they get a warning; HTTP, loopback and unix ones do not."""
    inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    inherited.bind(("0.0.0.0", 0))
    inherited.listen(16)
    fd = inherited.fileno()
    listeners = [
        ("uwsgi", "0.0.0.0:0"),
        ("fastcgi", "0.0.0.0:0"),
        ("fastcgi", "[::]:0"),
        ("scgi", "0.0.0.0:0"),
        ("uwsgi", f"fd://{fd}"),
        ("uwsgi", "127.0.0.2:0"),
        ("fastcgi", "[::1]:0"),
        ("uwsgi", f"unix:{_short_dir(tmp_path)}/u.sock"),
        ("fastcgi", "127.0.0.1:0"),
        ("scgi", "tcp://127.0.0.1:0"),
    ]
    try:
        server = g.start_gateways(
            start_server, "behaviour:application", listeners, http="0.0.0.0:0", pass_fds=(fd,)
        )
    finally:
        inherited.close()
    warnings = [line for line in server.lines if "[WARNING]" in line]
    assert len(warnings) == 5, "\n".join(warnings)
    addrs = server.gateways
    for proto, host, port in [
        ("uwsgi", "0.0.0.0", addrs["uwsgi"][0][1]),
        ("fastcgi", "0.0.0.0", addrs["fastcgi"][0][1]),
        ("fastcgi", "[::]", addrs["fastcgi"][1][1]),
        ("scgi", "0.0.0.0", addrs["scgi"][0][1]),
    ]:
        url = f"{proto}://{host}:{port}"
        assert [w for w in warnings if url in w and "must not face the internet" in w], (url, warnings)
    assert [w for w in warnings if f"(fd {fd})" in w and "must not face the internet" in w], warnings
    # The loopback and unix ones serve without a warning.
    assert g.call("uwsgi", ("127.0.0.2", addrs["uwsgi"][2][1]), uri="/fixed").body == b"hello world"
    assert g.call("fastcgi", ("::1", addrs["fastcgi"][2][1]), uri="/fixed").body == b"hello world"
    assert g.call("scgi", ("127.0.0.1", addrs["scgi"][1][1]), uri="/fixed").body == b"hello world"


# -- malformed input ------------------------------------------------------------------

GOOD = [(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/environ"), (b"SERVER_PROTOCOL", b"HTTP/1.1")]
EVIL = [*GOOD, (b"HTTP_X_EVIL", b"1")]
U16 = struct.Struct("<H")


def _scgi(pairs, body=b""):
    return g.scgi_netstring(pairs) + body


def _ns(block):
    return b"%d:%s," % (len(block), block)


SCGI_OK = [(b"CONTENT_LENGTH", b"4"), (b"SCGI", b"1"), *EVIL]

BAD = [
    # uwsgi
    ("uwsgi", "modifier1", g.uwsgi_packet(EVIL, b"", modifier1=5), "unsupported uwsgi modifier1 5"),
    ("uwsgi", "modifier1-255", g.uwsgi_packet(EVIL, b"", modifier1=255), "unsupported uwsgi modifier1 255"),
    ("uwsgi", "key-past-end", b"\0" + U16.pack(5) + b"\0" + U16.pack(50) + b"KEY", "runs past the end"),
    (
        "uwsgi",
        "value-past-end",
        b"\0" + U16.pack(10) + b"\0" + U16.pack(4) + b"HTTP" + U16.pack(60000) + b"ab",
        "runs past the end",
    ),
    (
        "uwsgi",
        "oversized-var-in-full-block",
        b"\0" + U16.pack(0xFFFF) + b"\0" + U16.pack(0xFFFF) + b"K" * (0xFFFF - 2),
        "runs past the end",
    ),
    ("uwsgi", "empty-key", g.uwsgi_packet([(b"", b"x"), *EVIL]), "empty var name"),
    ("uwsgi", "truncated-packet", g.uwsgi_packet(EVIL)[:20], "connection closed inside the request"),
    ("uwsgi", "truncated-header", b"\0\x20", "connection closed inside the request"),
    # SCGI
    ("scgi", "length-not-a-number", b"12x:" + b"A" * 20, "not a decimal number"),
    ("scgi", "empty-length", b":CONTENT_LENGTH\x000\x00,", "not a decimal number"),
    ("scgi", "leading-zero", b"0012:", "leading zero"),
    ("scgi", "length-over-limit", b"%d:" % (MIB + 1), "over 1 MiB"),
    ("scgi", "missing-comma", _scgi(SCGI_OK)[:-1] + b";EVIL", "not followed by ','"),
    ("scgi", "no-scgi-1", _scgi([(b"CONTENT_LENGTH", b"4"), *EVIL], b"EVIL"), "SCGI header missing or not 1"),
    (
        "scgi",
        "scgi-2",
        _scgi([(b"CONTENT_LENGTH", b"4"), (b"SCGI", b"2"), *EVIL], b"EVIL"),
        "SCGI header missing",
    ),
    (
        "scgi",
        "content-length-not-first",
        _scgi([(b"SCGI", b"1"), (b"CONTENT_LENGTH", b"4"), *EVIL], b"EVIL"),
        "CONTENT_LENGTH missing or not the first",
    ),
    ("scgi", "no-content-length", _scgi([(b"SCGI", b"1"), *EVIL]), "CONTENT_LENGTH missing or not the first"),
    (
        "scgi",
        "bad-content-length",
        _scgi([(b"CONTENT_LENGTH", b"4x"), (b"SCGI", b"1"), *EVIL]),
        "invalid SCGI CONTENT_LENGTH",
    ),
    ("scgi", "not-nul-terminated", _ns(b"CONTENT_LENGTH\x000\x00SCGI\x001\x00ABC"), "does not end in NUL"),
    (
        "scgi",
        "name-without-value",
        _ns(b"CONTENT_LENGTH\x000\x00SCGI\x001\x00ABC\x00"),
        "name without a value",
    ),
    ("scgi", "truncated", _scgi(SCGI_OK)[:30], "connection closed inside the request"),
    # FastCGI
    (
        "fastcgi",
        "version-2",
        g.record(1, 1, struct.pack(">HB5x", 1, 0), version=2),
        "unsupported FastCGI version 2",
    ),
    (
        "fastcgi",
        "version-0",
        g.record(1, 1, struct.pack(">HB5x", 1, 0), version=0),
        "unsupported FastCGI version 0",
    ),
    (
        "fastcgi",
        "version-in-stdin",
        g.begin_request(1)
        + g.stream(
            g.FCGI_PARAMS, 1, g.encode_pairs([*EVIL[:1], (b"REQUEST_URI", b"/sha"), (b"HTTP_X_EVIL", b"1")])
        )
        + g.record(g.FCGI_STDIN, 1, b"EVIL")
        + g.record(g.FCGI_STDIN, 1, b"EVIL", version=9),
        "unknown FastCGI version",
    ),
    (
        "fastcgi",
        "begin-body-short",
        g.record(g.FCGI_BEGIN_REQUEST, 1, b"\0\x01\0"),
        "BEGIN_REQUEST body is not 8 bytes",
    ),
    ("fastcgi", "begin-id-0", g.begin_request(0), "management request id 0"),
    (
        "fastcgi",
        "pair-cut-short",
        g.begin_request(1) + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(EVIL) + b"\x05\x01ab"),
        "pair cut short",
    ),
    (
        "fastcgi",
        "empty-name",
        g.begin_request(1) + g.stream(g.FCGI_PARAMS, 1, g.encode_pair(b"", b"x")),
        "empty FastCGI parameter name",
    ),
    (
        "fastcgi",
        "params-over-limit",
        g.begin_request(1)
        + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(EVIL) + g.encode_pair("HTTP_X_PAD", "p" * MIB)),
        "over",
    ),
    (
        "fastcgi",
        "pair-claims-over-limit",
        g.begin_request(1)
        + g.stream(
            g.FCGI_PARAMS,
            1,
            g.encode_pairs(EVIL) + b"\x01" + struct.pack(">I", 0x80000000 | (2 * MIB)) + b"A",
        ),
        "over 1 MiB",
    ),
    (
        "fastcgi",
        "closed-in-params",
        g.begin_request(1) + g.record(g.FCGI_PARAMS, 1, g.encode_pairs(EVIL)),
        "connection closed inside the request",
    ),
    ("fastcgi", "closed-in-header", g.begin_request(1)[:5], "connection closed inside the request"),
]


def _good_request(proto: str) -> bytes:
    params = [*GOOD, (b"HTTP_X_GOOD", b"1"), (b"CONTENT_LENGTH", b"9")]
    if proto == "scgi":
        params = [(b"CONTENT_LENGTH", b"9"), (b"SCGI", b"1"), *params[:-1]]
    return g.request_bytes(proto, params, b"good-body")


def _check_bad_input(server, proto, data, why, unix=False):
    addr = server.addr(proto, unix)
    before = _pid(server, proto, unix)
    # A good connection opened, and half sent, before the bad one; finished after it.
    good_bytes = _good_request(proto)
    good = g.connect(addr)
    good.sendall(good_bytes[: len(good_bytes) // 2])
    mark = server.mark()
    out, closed = g.send_raw(addr, data)
    assert closed, "the bad connection was not closed"
    assert b" 200 " not in out[:100] and b"Status: 200" not in out[:200], out[:300]
    peer = re.escape(f"unix:{addr}") if unix else r"127\.0\.0\.1:\d+"
    server.wait_for(rf"\[WARNING\] Bad {proto} request from {peer}: .*{re.escape(why)}", since=mark)
    with good:
        good.sendall(good_bytes[len(good_bytes) // 2 :])
        got, _ = g.read_until_close(good)
    env = g.parse_any(proto, got).json()
    assert env["HTTP_X_GOOD"]["value"] == "1"
    assert "HTTP_X_EVIL" not in env
    assert env["_body"] == "good-body"
    # The same worker answers; nothing else was logged about it.
    assert _pid(server, proto, unix) == before
    noise = [line for line in server.lines[mark:] if re.search(r"\[(WARNING|ERROR|CRITICAL)\]", line)]
    assert len(noise) == 1, "\n".join(noise)
    assert server.running()


@pytest.mark.parametrize(
    ("proto", "data", "why"), [b[:1] + b[2:] for b in BAD], ids=[f"{b[0]}-{b[1]}" for b in BAD]
)
def test_bad_input_closes_only_that_connection(gw, proto, data, why):
    _check_bad_input(gw, proto, data, why)


@pytest.mark.parametrize("proto", PROTOS)
def test_bad_input_on_a_unix_socket(gw, proto):
    case = {"uwsgi": "modifier1", "scgi": "length-not-a-number", "fastcgi": "version-2"}[proto]
    [(_, _, data, why)] = [b for b in BAD if b[:2] == (proto, case)]
    _check_bad_input(gw, proto, data, why, unix=True)


# Whole packets whose contents are wrong: answered (the front end shows that
# status rather than a 502), the rest of BAD only closed.
ANSWERED_400 = {
    "uwsgi-key-past-end",
    "uwsgi-value-past-end",
    "uwsgi-oversized-var-in-full-block",
    "uwsgi-empty-key",
    "scgi-no-scgi-1",
    "scgi-scgi-2",
    "scgi-content-length-not-first",
    "scgi-no-content-length",
    "scgi-bad-content-length",
    "scgi-not-nul-terminated",
    "scgi-name-without-value",
}


@pytest.mark.parametrize(
    ("name", "proto", "data"),
    [(f"{b[0]}-{b[1]}", b[0], b[2]) for b in BAD if b[0] != "fastcgi"],
    ids=[f"{b[0]}-{b[1]}" for b in BAD if b[0] != "fastcgi"],
)
def test_a_whole_uwsgi_or_scgi_head_that_is_wrong_is_answered_400(gw, name, proto, data):
    out, closed = g.send_raw(gw.addr(proto), data)
    assert closed
    if name in ANSWERED_400:
        assert g.parse_any(proto, out).status == 400, out[:300]
    else:
        assert out == b"", out[:300]


def test_an_scgi_head_of_too_many_headers_is_answered_431(gw):
    pairs = [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *GOOD]
    pairs += [(f"HTTP_X_{i}".encode(), b"v") for i in range(1100)]
    mark = gw.mark()
    out, closed = g.send_raw(gw.addr("scgi"), g.scgi_netstring(pairs))
    assert closed and g.parse_any("scgi", out).status == 431, out[:300]
    gw.wait_for(r"\[WARNING\] Bad scgi request from .*too many SCGI headers \(431 ", since=mark)


# SCGI's CONTENT_LENGTH is part of its framing: a bad one is among the cases above.
@pytest.mark.parametrize("proto", ["uwsgi", "fastcgi"])
def test_invalid_content_length_gets_400(gw, proto):
    mark = gw.mark()
    r = g.call(proto, gw.addr(proto), params=[*EVIL, (b"CONTENT_LENGTH", b"12abc")])
    assert r.status == 400, r.raw[:300]
    gw.wait_for(rf"\[WARNING\] Bad {proto} request from .*invalid CONTENT_LENGTH", since=mark)


# SCGI's codec stops at the same number of pairs (a bad-input case: its framing).
@pytest.mark.parametrize("proto", ["uwsgi", "fastcgi"])
def test_more_variables_than_a_request_may_have_get_431(gw, proto):
    """The environ is built from at most 1024 variables (looking each name up
    among those before it costs their square); a request under the limit made
    of one header repeated is joined whole."""
    repeated = [("HTTP_X_MANY", f"v{i}") for i in range(1024 - len(g.cgi_params(uri="/environ")))]
    env = _env(gw, proto, extra=repeated)
    assert env["HTTP_X_MANY"] == ",".join(v for _, v in repeated)
    mark = gw.mark()
    r = g.call(proto, gw.addr(proto), uri="/environ", extra=[*repeated, ("HTTP_X_ONE_MORE", "1")])
    assert r.status == 431, r.raw[:300]
    gw.wait_for(
        rf"\[WARNING\] Bad {proto} request from 127\.0\.0\.1:\d+: 1025 variables, over the 1024", since=mark
    )
    assert g.call(proto, gw.addr(proto), uri="/fixed").body == b"hello world"


def test_nothing_leaks_between_requests_on_a_kept_connection(gw):
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        first = g.cgi_params("POST", "/echo", b"secret", extra=[("HTTP_X_ONE", "1"), ("HTTPS", "on")])
        assert conn.request(first, b"secret", keep_conn=True).body == b"secret"
        # STDIN carrying more than CONTENT_LENGTH: whatever this request makes of it,
        # the extra bytes are not the next request's.
        r = conn.request(g.cgi_params("POST", "/echo", b"abc"), b"abcEXTRA", keep_conn=True)
        assert r.body.startswith(b"abc")
        env = conn.request(g.cgi_params(uri="/environ"), keep_conn=True).json()
    assert not [k for k in env if k.startswith("HTTP_X_")]
    assert env["wsgi.url_scheme"]["value"] == "http"
    assert env["_body"] == ""
    assert env.get("CONTENT_LENGTH", {"value": ""})["value"] == ""


def test_bad_input_leaves_concurrent_requests_alone(gw):
    """Bad input on many connections while good requests are in flight on others."""
    import concurrent.futures as cf

    before = _pid(gw)
    payload = random.Random(11).randbytes(200_000)

    def good(i):
        proto = PROTOS[i % 3]
        r = g.call(proto, gw.addr(proto), "POST", "/sha", payload)
        return r.json()["sha256"]

    def bad(i):
        proto, _, data, _ = BAD[i % len(BAD)]
        return g.send_raw(gw.addr(proto), data)[1]

    with cf.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, i) for i in range(30)]
        bads = [pool.submit(bad, i) for i in range(30)]
        assert all(f.result() for f in bads)
        assert {f.result() for f in goods} == {hashlib.sha256(payload).hexdigest()}
    assert _pid(gw) == before


def test_fastcgi_stream_survives_a_half_close(gw):
    """Apache's mod_proxy_fcgi shuts down its sending side once the request
    is sent; a streamed response must still arrive whole."""
    for _ in range(5):
        out, closed = g.send_raw(gw.addr("fastcgi"), g.fcgi_request_bytes(g.cgi_params(uri="/stream?n=200")))
        assert closed
        r = g.parse_any("fastcgi", out)
        assert r.protocol_status == g.FCGI_REQUEST_COMPLETE
        assert r.body == b"".join(f"chunk{i}\n".encode() for i in range(200)), r.body[-100:]


def test_static_files_over_fastcgi_follow_the_path_the_front_end_routed_on(start_server, tmp_path):
    """HAProxy and Apache send REQUEST_URI only: a --static file is found for the
    path the app would see (decoded, dot segments resolved, absolute form reduced
    to its path), not for the raw target."""
    root = tmp_path / "files"
    root.mkdir()
    (root / "f.txt").write_text("file")
    server = g.start_gateways(
        start_server, "behaviour:application", [("fastcgi", "127.0.0.1:0")], "--static", f"/static={root}"
    )
    addr = server.addr("fastcgi")
    for uri in ("/static/f.txt", "/x/../static/f.txt", "/static/%66.txt", "http://h/static/f.txt?q=1"):
        r = g.call("fastcgi", addr, params=g.cgi_params(uri=uri))
        assert (r.status, r.body) == (200, b"file"), uri


@pytest.mark.parametrize(
    ("script_name", "path_info"),
    [
        ("/prefix", "/static/f.txt"),
        ("/prefix/", "/static/f.txt"),
        ("/prefix", "/prefix/static/f.txt"),
        ("", "/prefix/static/f.txt"),
    ],
    ids=["split", "split-slash", "whole-path", "no-script-name"],
)
def test_static_files_under_a_prefix_follow_script_name_and_path_info(
    start_server, tmp_path, script_name, path_info
):
    """`--static /prefix/static=DIR` is the path clients request: found
    whether the front end split it itself (nginx's fastcgi_split_path_info:
    SCRIPT_NAME /prefix, PATH_INFO the rest; it used to reach the app) or
    sent SCRIPT_NAME with the whole path in PATH_INFO."""
    root = tmp_path / "files"
    root.mkdir()
    (root / "f.txt").write_text("file")
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [("fastcgi", "127.0.0.1:0")],
        "--mount",
        "/prefix",
        "--static",
        f"/prefix/static={root}",
    )
    extra = [("SCRIPT_NAME", script_name), ("PATH_INFO", path_info)]
    r = g.call(
        "fastcgi", server.addr("fastcgi"), params=g.cgi_params(uri="/prefix/static/f.txt", extra=extra)
    )
    assert (r.status, r.body) == (200, b"file")


@pytest.mark.parametrize("proto", PROTOS)
def test_a_static_download_the_front_end_reads_slowly_holds_no_thread(start_server, tmp_path, proto):
    """One worker with one thread behind a front end that stops reading a large
    --static file: the offload thread sends the rest as the front end reads, the
    serving thread answers other requests meanwhile, and the file arrives whole in
    the protocol's framing (FastCGI: records, END_REQUEST, the kept connection
    then carries another request)."""
    root = tmp_path / "files"
    root.mkdir()
    data = random.Random(3).randbytes(40 * MIB)
    (root / "big.bin").write_bytes(data)
    server = g.start_gateways(
        start_server, "behaviour:application", [(proto, "127.0.0.1:0")], "--static", f"/static={root}"
    )
    addr = server.addr(proto)
    pairs = g.cgi_params(uri="/static/big.bin")
    if proto == "scgi":
        pairs = [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *pairs[1:]]
    if proto == "fastcgi":
        with g.FcgiConn(addr, timeout=60, rcvbuf=4096) as conn:
            conn.send(g.fcgi_request_bytes(pairs, keep_conn=True))
            time.sleep(0.5)
            for _ in range(3):
                assert g.call(proto, addr, uri="/fixed", timeout=20).status == 200
            r = conn.read_response()
            assert r.protocol_status == g.FCGI_REQUEST_COMPLETE
            assert hashlib.sha256(r.body).digest() == hashlib.sha256(data).digest()
            assert conn.request(g.cgi_params(uri="/fixed"), keep_conn=True).status == 200
        # Without keep-conn the end records still close the response (they are held
        # for the flusher with one thread, and must go out before the close).
        with g.FcgiConn(addr, timeout=60, rcvbuf=4096) as conn:
            conn.send(g.fcgi_request_bytes(pairs))
            time.sleep(0.5)
            r = conn.read_response()
            assert r.protocol_status == g.FCGI_REQUEST_COMPLETE
            assert hashlib.sha256(r.body).digest() == hashlib.sha256(data).digest()
            assert conn.at_eof()
        return
    with g.connect(addr, timeout=60, rcvbuf=4096) as sock:
        sock.sendall(g.request_bytes(proto, pairs))
        time.sleep(0.5)
        for _ in range(3):
            assert g.call(proto, addr, uri="/fixed", timeout=20).status == 200
        raw, closed = g.read_until_close(sock, timeout=60)
    assert closed
    r = g.parse_any(proto, raw)
    assert r.status == 200
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(data).digest()


NGINX = [("SERVER_SOFTWARE", "nginx/1.22.1")]


def _ends_as_told(conn, nginx):
    """What came behind END_REQUEST in the same read: for nginx, the record
    that keeps a closing connection out of its pool; for any other front end
    nothing (Apache takes a byte there for a sign of life), and the end."""
    assert bytes(conn.buf) == (g.record(g.FCGI_GET_VALUES_RESULT, 0) if nginx else b""), bytes(conn.buf)
    conn.buf.clear()


@pytest.mark.parametrize("front", ["nginx", "apache"])
@pytest.mark.parametrize("socket_kind", ["tcp", "unix"])
def test_a_kept_fastcgi_request_running_when_the_stop_begins_closes_its_connection_with_its_end(
    start_server, tmp_path, socket_kind, front
):
    """A request already running when a stop begins, on a kept FastCGI connection
    with no sibling to take it over: the connection ends with END_REQUEST, so
    the front end does not put it back in its pool (left idle, it would be
    closed later, maybe as the front end sends its next request on it). Over
    TCP the FIN comes in END_REQUEST's segment. A unix socket cannot send the
    two together, so an empty GET_VALUES_RESULT comes right behind END_REQUEST,
    in the same read: nginx pools a connection only when END_REQUEST ends what
    it read."""
    unix = socket_kind == "unix"
    listen = f"unix:{tmp_path}/fcgi.sock" if unix else "127.0.0.1:0"
    server = g.start_gateways(start_server, "behaviour:application", [("fastcgi", listen)])
    with g.FcgiConn(server.addr("fastcgi", unix=unix)) as conn:
        marker = tmp_path / "go"
        extra = NGINX if front == "nginx" else [("SERVER_SOFTWARE", "Apache/2.4.62")]
        conn.send(
            g.fcgi_request_bytes(g.cgi_params(uri=f"/pause?marker={marker}", extra=extra), keep_conn=True)
        )
        first = conn.read_record()
        assert first.type == g.FCGI_STDOUT
        conn.others.append(first)  # read_response takes it from there
        mark = server.mark()
        server.signal(signal.SIGTERM)
        server.wait_for("Worker draining", since=mark)
        marker.touch()
        reply = conn.read_response()
        assert (reply.status, reply.body) == (200, b"first,second,third")
        # What came with END_REQUEST, read by the same recv (nothing is read
        # past a record's end until the next one is asked for).
        _ends_as_told(conn, front == "nginx")
        if unix:
            assert conn.at_eof(5)
        else:
            # Everything the server sent is here already (the FIN in
            # END_REQUEST's segment), so the end of the stream must be too,
            # without waiting.
            readable, _, _ = select.select([conn.sock], [], [], 0)
            assert conn.eof or (readable and conn.sock.recv(1) == b"")
    assert server.wait_exit(30) == 0


@pytest.mark.parametrize("front", ["nginx", "other"])
@pytest.mark.parametrize("socket_kind", ["tcp", "unix"])
def test_a_kept_fastcgi_connection_ends_with_a_whole_response_the_app_returned_during_the_stop(
    start_server, tmp_path, socket_kind, front
):
    """As above, for a response the app returns whole (its END_REQUEST goes in
    the response's one write) after the stop began while it ran: that write
    is the connection's last, with the same ending."""
    unix = socket_kind == "unix"
    listen = f"unix:{tmp_path}/fcgi.sock" if unix else "127.0.0.1:0"
    server = g.start_gateways(start_server, "behaviour:application", [("fastcgi", listen)])
    with g.FcgiConn(server.addr("fastcgi", unix=unix), timeout=20) as conn:
        mark = server.mark()
        extra = NGINX if front == "nginx" else []
        conn.send(g.fcgi_request_bytes(g.cgi_params(uri="/slow?secs=1&id=last", extra=extra), keep_conn=True))
        server.wait_for("slow request started: last", since=mark)
        server.signal(signal.SIGTERM)
        server.wait_for("Worker draining", since=mark)
        reply = conn.read_response()
        assert (reply.status, reply.body) == (200, b"slept last")
        _ends_as_told(conn, front == "nginx")
        assert conn.at_eof(5)
    assert server.wait_exit(30) == 0


@pytest.mark.parametrize("front", ["nginx", "other"])
def test_a_kept_fastcgi_request_past_the_timeout_ends_its_connection_with_its_504(start_server, front):
    """A request past --timeout on a kept FastCGI connection gets 504 and its
    connection is shut down: an empty GET_VALUES_RESULT comes right behind the
    504's END_REQUEST, so that nginx does not put the connection back in its
    pool and send its next request on it (EPIPE, 502)."""
    server = g.start_gateways(
        start_server, "behaviour:application", [("fastcgi", "127.0.0.1:0")], "--timeout", "1", threads=2
    )
    with g.FcgiConn(server.addr("fastcgi"), timeout=20) as conn:
        extra = NGINX if front == "nginx" else []
        conn.send(
            g.fcgi_request_bytes(g.cgi_params(uri="/slow?secs=30&id=late", extra=extra), keep_conn=True)
        )
        reply = conn.read_response()
        assert reply.status == 504
        _ends_as_told(conn, front == "nginx")
        assert conn.at_eof(5)


@pytest.mark.parametrize("proto", ["uwsgi", "scgi"])
def test_a_started_response_cut_by_the_timeout_ends_in_a_reset_over_tcp(start_server, proto):
    """Apache over uwsgi and SCGI does not count the body, and passed the
    FIN of a shutdown on to its client as the end of a response --timeout
    had cut: the cut is a reset, as when the app fails in its body."""
    server = g.start_gateways(
        start_server, "behaviour:application", [(proto, "127.0.0.1:0")], "--timeout", "2", threads=2
    )
    pairs = g.cgi_params(uri="/burst-then-slow?slow=30")
    if proto == "scgi":
        pairs[0] = (b"CONTENT_LENGTH", b"0")
        pairs.insert(1, (b"SCGI", b"1"))
    with g.connect(server.addr(proto), timeout=30) as sock:
        sock.sendall(g.request_bytes(proto, pairs))
        got = b""
        with pytest.raises(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
    assert b"burst 0" in got, got
    server.wait_for(
        r"Request timeout: GET /burst-then-slow.*its response had started, so the connection was cut"
    )


def test_a_whole_response_whose_close_outlasts_the_timeout_is_not_cut(start_server):
    """The response went out whole before close() hung (Django's
    request_finished handlers): --timeout ends the request, but the peer
    gets that response and a plain end, not a reset."""
    server = g.start_gateways(
        start_server, "behaviour:application", [("scgi", "127.0.0.1:0")], "--timeout", "2", threads=2
    )
    pairs = g.cgi_params(uri="/slow-close")
    pairs[0] = (b"CONTENT_LENGTH", b"0")
    pairs.insert(1, (b"SCGI", b"1"))
    with g.connect(server.addr("scgi"), timeout=30) as sock:
        sock.sendall(g.request_bytes("scgi", pairs))
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    assert got.startswith(b"Status: 200") and got.endswith(b"\r\n\r\nab"), got
    server.wait_for(
        r"Request timeout: GET /slow-close.*its response had gone out whole; the connection was closed"
    )
    assert g.call("scgi", server.addr("scgi"), uri="/release-close").status == 200


def test_a_request_sent_after_a_whole_response_whose_close_outlasts_the_timeout_is_not_dropped_silently(
    start_server,
):
    """Over HTTP the connection was to stay open, so the client sent its next
    request on it while close() hung: the connection closes with the stuck
    request, and the log says the request after it went unanswered."""
    server = start_server("behaviour:application", "--timeout", "2", threads=2)
    with server.connect() as conn:
        conn.send(b"GET /slow-close HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = conn.read_response()
        assert (resp.status, resp.body, resp.complete) == (200, b"ab", True)
        conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert conn.at_eof(30)
    server.wait_for(
        r"Request timeout: GET /slow-close.*its response had gone out whole; the connection was closed, "
        r"and the \d+ bytes the client sent after it on the connection \(its next request\) went unanswered"
    )
    assert server.request("GET", "/release-close").status == 200


def test_a_kept_fastcgi_connection_whose_request_comes_in_parts_is_served_while_draining(start_server):
    """A stop keeps idle kept connections a moment, for the request a front
    end may be sending on one: one whose records arrive in several reads is
    read whole and served, not closed between them (nginx would answer 502)."""
    server = g.start_gateways(start_server, "behaviour:application", [("fastcgi", "127.0.0.1:0")])
    body = b"x" * 1000
    params = g.cgi_params("POST", "/echo", body)
    with g.FcgiConn(server.addr("fastcgi")) as conn:
        assert conn.request(g.cgi_params(uri="/fixed"), keep_conn=True).body == b"hello world"
        mark = server.mark()
        server.signal(signal.SIGTERM)
        server.wait_for("Worker draining", since=mark)
        # The PARAMS stream's end comes with the second part.
        conn.send(
            g.begin_request(1, keep_conn=True) + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(params), end=False)
        )
        time.sleep(0.3)
        conn.send(g.record(g.FCGI_PARAMS, 1) + g.stream(g.FCGI_STDIN, 1, body))
        reply = conn.read_response()
        assert (reply.status, reply.body) == (200, body)
    assert server.wait_exit(30) == 0


@pytest.mark.parametrize("proto", ["fastcgi", "scgi"])
def test_unfinished_variables_cannot_hold_unbounded_memory(start_server, proto):
    """A front end's variables may reach 1 MiB (SCGI's netstring, FastCGI's
    PARAMS), but a worker holds at most 32 MiB of request heads that never
    end, as over HTTP: past that, those over 64 KiB are refused with 431 in
    the protocol's framing, and the memory is given back when they close."""
    server = g.start_gateways(start_server, "behaviour:application", [(proto, "127.0.0.1:0")], threads=4)
    addr = server.addr(proto)
    pairs = g.cgi_params(uri="/fixed", extra=[("HTTP_X_PAD", "a" * 800_000)])
    if proto == "scgi":
        pairs = [(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *pairs[1:]]
    whole = g.request_bytes(proto, pairs)
    # Everything but the end of the variables: SCGI's netstring lacks its
    # last 10 bytes, FastCGI's PARAMS stream its closing empty record.
    if proto == "fastcgi":
        unfinished = whole[: whole.index(g.record(g.FCGI_PARAMS, 1))]
    else:
        unfinished = whole[:-10]
    assert len(unfinished) > 790_000

    def fill(sock):
        try:
            sock.sendall(unfinished)
        except OSError:
            pass  # refused and closed while sending

    socks = [g.connect(addr, timeout=30) for _ in range(60)]
    mark = server.mark()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fill, socks))
    answered = {}
    while True:
        ready, _, _ = select.select([s for s in socks if s not in answered], [], [], 2.0)
        if not ready:
            break
        for sock in ready:
            answered[sock] = g.read_until_close(sock, timeout=10)[0]
    refused = [g.parse_any(proto, data) for data in answered.values() if data]
    # 32 MiB hold about 41 of these 790 KiB heads.
    assert 10 <= len(refused) <= 30, (len(refused), len(answered))
    assert {r.status for r in refused} == {431}, [r.raw[:200] for r in refused]
    assert all(data for data in answered.values()), "closed without an answer"
    server.wait_for(
        rf"\[WARNING\] Bad {proto} request from 127\.0\.0\.1:\d+: request variables refused: \d+ KiB and not "
        r"ended, while this worker holds \d+ MiB of unfinished request heads \(at most 32 MiB\) \(431 ",
        since=mark,
    )
    assert g.call(proto, addr, uri="/fixed").body == b"hello world"
    for sock in socks:
        sock.close()
    # Given back once the closes are seen: the same variables, ended, are served.
    assert wait_until(lambda: g.call(proto, addr, params=pairs).body == b"hello world", timeout=10)


def _send_until_closed(sock: socket.socket, piece: bytes, pause: float, limit: float) -> float:
    """Sends `piece` again and again until the peer closes (or `limit` s pass);
    returns how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            sock.sendall(piece)
        except OSError:
            break
        if pause:
            time.sleep(pause)
    return time.monotonic() - started


def test_a_front_end_trickling_a_body_the_app_did_not_read_is_dropped_in_the_end(gw):
    """The rest of a body the app answered without reading is read and dropped
    while a front end sends it (so the response is not lost to a reset), but not
    for good: past FRONT_END_DRAIN_TIME the connection closes, with a line saying
    why, and the thread serves again."""
    mark = gw.mark()
    head = g.uwsgi_packet(g.cgi_params("POST", "/ignore-body", b"x" * 1_000_000), b"")
    sock = g.connect(gw.addr("uwsgi"), timeout=30)
    try:
        sock.sendall(head + b"x" * 70_000)
        took = _send_until_closed(sock, b"x", 0.5, 40)
        data, _ = g.read_until_close(sock, timeout=5)
    except OSError:
        data, took = b"", 0.0
    finally:
        sock.close()
    assert took < 40, "the trickled body was read for as long as it came"
    assert data == b"" or data.startswith(b"HTTP/1.1 200"), data[:100]
    gw.wait_for(
        r"POST /ignore-body from .*: closing the connection: the front end was still sending a request body "
        r"the app did not read after 10 s",
        since=mark,
    )
    assert g.call("uwsgi", gw.addr("uwsgi"), uri="/fixed").body == b"hello world"


def test_a_fastcgi_body_streamed_without_end_after_the_response_is_cut_off(gw):
    """STDIN records sent as fast as they go, for a request the app answered
    without reading: dropped for FRONT_END_DRAIN_TIME, then the connection is
    closed with a line, rather than read forever."""
    mark = gw.mark()
    params = g.cgi_params("POST", "/ignore-body", content_length=False)
    sock = g.connect(gw.addr("fastcgi"), timeout=30)
    piece = g.record(g.FCGI_STDIN, 1, b"x" * 65000) * 16
    try:
        sock.sendall(
            g.begin_request(1, g.FCGI_RESPONDER, False) + g.stream(g.FCGI_PARAMS, 1, g.encode_pairs(params))
        )
        took = _send_until_closed(sock, piece, 0, 60)
    finally:
        sock.close()
    assert took < 60, "the endless body was read for as long as it came"
    gw.wait_for(
        r"POST /ignore-body from .*: closing the connection: the front end was still sending a request body "
        r"the app did not read after 10 s",
        since=mark,
        timeout=20,
    )
    assert g.call("fastcgi", gw.addr("fastcgi"), uri="/fixed").body == b"hello world"


@pytest.mark.parametrize("proto", ["uwsgi", "scgi"])
def test_a_front_end_that_stops_inside_a_body_the_app_did_not_read_is_closed(gw, proto):
    """A body the app did not read, of which the front end sends part and then
    nothing: the response goes out, and the connection closes once nothing
    came for DRAIN_WAIT, with a line."""
    mark = gw.mark()
    extra = [("SCGI", "1")] if proto == "scgi" else []
    pairs = [(b"CONTENT_LENGTH", b"10000000000"), *g.cgi_params("POST", "/ignore-body", b"", extra, False)]
    sock = g.connect(gw.addr(proto), timeout=15)
    try:
        sock.sendall(g.request_bytes(proto, pairs, b"x" * 1000))
        data, closed = g.read_until_close(sock, timeout=15)
    except OSError:
        data, closed = b"", True
    finally:
        sock.close()
    assert closed
    assert b"HTTP/1.1 500" not in data and b"Status: 500" not in data, data[:200]
    gw.wait_for(
        r"POST /ignore-body from .*: closing the connection: the rest of a request body the app did not read "
        r"did not come within 2 s",
        since=mark,
    )


@pytest.mark.parametrize("proto", ["fastcgi", "scgi"])
def test_a_status_header_from_the_app_does_not_replace_its_status(gw, proto):
    """In a CGI reply the Status header is the status: one the app sets is
    dropped (with a line), so start_response's status is the only one."""
    reply = g.call(proto, gw.addr(proto), uri="/status-header")
    assert reply.status == 200, reply.raw[:300]
    assert reply.header_all("Status") == ["200 OK"], reply.headers
    assert reply.body == b"body\n"
    gw.wait_for(r'The app set a "Status: 404 Not Found" header, which over FastCGI and SCGI')


@pytest.mark.parametrize("proto", PROTOS)
def test_a_body_shorter_than_its_content_length_ends_in_a_reset(gw, proto):
    """The app declares 100 bytes and sends 11: the front end is told with a
    reset, not a plain close that a front end not counting the body (Apache over
    SCGI) would pass on as a whole response."""
    mark = gw.mark()
    pairs = g.cgi_params(
        "GET", "/short-body", b"", [("SCGI", "1")] if proto == "scgi" else [], proto != "scgi"
    )
    if proto == "scgi":
        pairs.insert(0, (b"CONTENT_LENGTH", b"0"))
    sock = g.connect(gw.addr(proto), timeout=10)
    try:
        sock.sendall(g.request_bytes(proto, pairs))
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    finally:
        sock.close()
    gw.wait_for(r"the app declared Content-Length 100 but sent 11 bytes", since=mark)


def test_a_whole_reply_whose_iterable_raises_keeps_a_kept_fastcgi_connection(gw):
    """A 304 is whole once its head went out: the iterable raising after it ends
    the request with END_REQUEST, and the kept connection carries the next one
    (closing it raced the front end's next request: Apache answered it 503)."""
    mark = gw.mark()
    with g.FcgiConn(gw.addr("fastcgi")) as conn:
        first = conn.request(g.cgi_params("GET", "/not-modified-then-raise"), keep_conn=True)
        assert first.status == 304 and first.body == b""
        second = conn.request(g.cgi_params("GET", "/fixed"), request_id=2, keep_conn=True)
        assert second.body == b"hello world"
    gw.wait_for(r"ValueError: after a whole 304", since=mark)


@pytest.mark.parametrize("proto", PROTOS)
def test_a_write_from_close_after_the_response_ended_raises(gw, proto):
    """The iterable's close() calls write() once the response went out whole:
    the bytes cannot be sent, and the app hears so (logged with the traceback),
    rather than seeing them vanish."""
    mark = gw.mark()
    reply = g.call(proto, gw.addr(proto), uri="/write-in-close")
    assert reply.status == 200 and reply.body == b"whole", reply.raw[:300]
    gw.wait_for(r"RuntimeError: write\(\) called after the response ended", since=mark)


def _server_side(pid: int, client: socket.socket) -> socket.socket | None:
    """The worker's own socket of `client`'s connection, duplicated into this
    process with pidfd_getfd(2)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sys_pidfd_getfd = 438
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(sys_pidfd_getfd, pidfd, int(name), 0)
            if fd < 0:
                continue
            sock = socket.socket(fileno=fd)
            try:
                if sock.getpeername() == client.getsockname():
                    return sock
            except OSError:
                pass
            sock.close()
    finally:
        os.close(pidfd)
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="taking a worker's socket (pidfd_getfd) needs root")
def test_accepted_tcp_connections_have_nagle_off(start_server):
    """Each response goes out in as few writes as it takes, and each must
    leave at once: Nagle's algorithm would hold a second small write back
    for the peer's delayed ACK (40 ms). Accepted connections get TCP_NODELAY
    from their listener, an inherited one included."""
    inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)
    fd = inherited.fileno()
    try:
        server = g.start_gateways(
            start_server,
            "behaviour:application",
            [("uwsgi", "127.0.0.1:0"), ("scgi", f"fd://{fd}")],
            http="127.0.0.1:0",
            pass_fds=(fd,),
        )
    finally:
        inherited.close()
    (pid,) = server.worker_pids()
    (port,) = [int(m.group(1)) for m in server.grep(r"Listening at: http://127\.0\.0\.1:(\d+)")]
    http = socket.create_connection(("127.0.0.1", port), timeout=10)
    http.sendall(b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n")
    assert http.recv(100).startswith(b"HTTP/1.1 200 ")
    clients = [http]
    # A head that is not whole keeps a gateway connection open.
    for proto in ("uwsgi", "scgi"):
        sock = g.connect(server.addr(proto))
        sock.sendall(g.request_bytes(proto, g.cgi_params(uri="/fixed"))[:5])
        clients.append(sock)
    try:
        for client in clients:
            assert wait_until(lambda c=client: _server_side(pid, c) is not None), client
            with _server_side(pid, client) as ours:
                assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, client
    finally:
        for sock in clients:
            sock.close()


def test_a_front_ends_remote_addr_cannot_begin_a_log_line_of_its_own(start_server):
    """REMOTE_ADDR is the front end's word; in an error-log line it is
    escaped as the request's target is, so a line feed in it cannot forge a
    line (it was written as it came)."""
    server = g.start_gateways(
        start_server, "behaviour:application", [("uwsgi", "127.0.0.1:0")], "--max-body-size", "10"
    )
    mark = server.mark()
    params = g.cgi_params("POST", "/echo", b"x" * 50, extra=[("REMOTE_ADDR", "9.9.9.9\n[CRITICAL] forged")])
    assert g.call("uwsgi", server.addr("uwsgi"), params=params, body=b"x" * 50).status == 413
    server.wait_for(
        r"Request body too large from 9\.9\.9\.9\\x0a\[CRITICAL\] forged via 127\.0\.0\.1:\d+", since=mark
    )
    assert not server.grep(r"^\[CRITICAL\] forged", since=mark)


@pytest.mark.parametrize("proto", PROTOS)
def test_a_gateway_request_refused_for_its_variables_is_logged_with_them(start_server, tmp_path, proto):
    """A request whose variables parsed but are refused (no REQUEST_METHOD)
    has its access-log line name the client and the target the front end
    gave, as any refused request of its kind (it named the front end's own
    address and no request)."""
    log = tmp_path / "access.log"
    server = g.start_gateways(
        start_server,
        "behaviour:application",
        [(proto, "127.0.0.1:0")],
        "--access-log",
        str(log),
        "--access-log-format",
        "%(h)s %(U)s %(q)s %(s)s",
    )
    params = [(k, v) for k, v in g.cgi_params(uri="/nomethod?x=1") if k != b"REQUEST_METHOD"]
    if proto == "scgi":
        # SCGI's own rules: a CONTENT_LENGTH with a number, and SCGI=1.
        params = [(b"CONTENT_LENGTH", b"0"), *params[1:], (b"SCGI", b"1")]
    assert g.call(proto, server.addr(proto), params=params).status == 400
    assert wait_until(
        lambda: log.exists() and log.read_text().splitlines() == ["192.0.2.10 /nomethod x=1 400"]
    ), log.read_text() if log.exists() else "no access log"
