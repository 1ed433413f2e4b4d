"""Malformed input from a front end over uwsgi, FastCGI and SCGI: the
connection is closed with one log line naming the protocol, the problem and
the peer; the worker, its other connections and the master are untouched,
and nothing of one request reaches another."""

import json
import socket
import struct

import pytest
from front_ends import free_port


def _uwsgi(variables, body=b"", modifier1=0):
    data = b""
    for k, v in variables:
        data += struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
    return bytes([modifier1]) + struct.pack("<H", len(data)) + b"\0" + data + body


def _scgi(pairs, body=b""):
    block = b"".join(k + b"\0" + v + b"\0" for k, v in pairs)
    return str(len(block)).encode() + b":" + block + b"," + body


def _record(kind, rid, content=b"", padding=0, version=1):
    return struct.pack(">BBHHBB", version, kind, rid, len(content), padding, 0) + content + b"\0" * padding


def _pair(k, v):
    enc = lambda n: bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)
    return enc(len(k)) + enc(len(v)) + k + v


def _fcgi(params, body=b"", rid=1, keep=False):
    p = b"".join(_pair(k, v) for k, v in params)
    out = _record(1, rid, struct.pack(">HB5x", 1, 1 if keep else 0)) + _record(4, rid, p) + _record(4, rid)
    if body:
        out += _record(5, rid, body)
    return out + _record(5, rid)


GOOD = [(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/pid"), (b"SERVER_PROTOCOL", b"HTTP/1.1")]


def _send(port, data, read=True):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while read and (chunk := s.recv(65536)):
            out += chunk
        return out


@pytest.fixture(scope="module")
def gateways(start_module_server):
    ports = {p: free_port() for p in ("uwsgi", "fastcgi", "scgi")}
    server = start_module_server(
        "behaviour:application",
        *[a for p, port in ports.items() for a in (f"--{p}", f"127.0.0.1:{port}")],
        threads=2,
    )
    server.ports = ports
    return server


def _pid_over(gateways, proto):
    port = gateways.ports[proto]
    if proto == "uwsgi":
        out = _send(port, _uwsgi(GOOD))
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        return int(out.partition(b"\r\n\r\n")[2])
    if proto == "scgi":
        out = _send(port, _scgi([(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *GOOD]))
        assert out.startswith(b"Status: 200"), out[:200]
        return int(out.partition(b"\r\n\r\n")[2])
    out = _send(port, _fcgi(GOOD))
    stdout, rest = b"", out
    while len(rest) >= 8:
        _, kind, _, length, pad, _ = struct.unpack(">BBHHBB", rest[:8])
        if kind == 6:
            stdout += rest[8 : 8 + length]
        rest = rest[8 + length + pad :]
    assert stdout.startswith(b"Status: 200"), out[:200]
    return int(stdout.partition(b"\r\n\r\n")[2])


BAD = [
    ("uwsgi", _uwsgi([(b"A", b"1")], modifier1=5), "unsupported uwsgi modifier1 5"),
    # A complete 5-byte vars block whose key claims 50 bytes.
    (
        "uwsgi",
        b"\0" + struct.pack("<H", 5) + b"\0" + struct.pack("<H", 50) + b"KEY",
        "uwsgi var runs past the end",
    ),
    ("uwsgi", _uwsgi([(b"", b"x")]), "empty var name"),
    ("uwsgi", b"\0\x20\0", "connection closed inside the request"),
    ("scgi", b"12x:", "netstring"),
    ("scgi", b"0012:", "leading zero"),
    ("scgi", b"99999999:", "over"),
    ("scgi", _scgi([(b"CONTENT_LENGTH", b"0"), (b"REQUEST_METHOD", b"GET")]), "SCGI"),
    (
        "scgi",
        _scgi([(b"REQUEST_METHOD", b"GET"), (b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1")]),
        "CONTENT_LENGTH",
    ),
    ("fastcgi", _record(1, 1, struct.pack(">HB5x", 1, 0), version=2), "unsupported FastCGI version 2"),
    ("fastcgi", _record(1, 1, b"short"), "BEGIN_REQUEST body is not 8 bytes"),
    (
        "fastcgi",
        _record(1, 1, struct.pack(">HB5x", 1, 0)) + _record(4, 1, b"\x05\x01ab"),
        "inside the request",
    ),
    (
        "fastcgi",
        _record(1, 1, struct.pack(">HB5x", 1, 0)) + _record(4, 1, b"\x81\x00\x00\x00\x01") + _record(4, 1),
        "FastCGI",
    ),
]


@pytest.mark.parametrize(("proto", "data", "why"), BAD, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_input_closes_only_that_connection(gateways, proto, data, why):
    before = _pid_over(gateways, proto)
    port = gateways.ports[proto]
    # A good connection opened before the bad one, completed after it.
    good = socket.create_connection(("127.0.0.1", port), timeout=10)
    mark = gateways.mark()
    out = _send(port, data)
    assert not out.startswith((b"HTTP/1.1 200", b"Status: 200")), out[:200]
    line = gateways.wait_for(rf"Bad {proto} request from 127\.0\.0\.1:\d+: .*{why}", since=mark)
    assert len(line) == 1
    request = {"uwsgi": _uwsgi(GOOD), "scgi": _scgi([(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), *GOOD])}.get(
        proto, _fcgi(GOOD)
    )
    good.sendall(request)
    good.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := good.recv(65536):
        got += chunk
    good.close()
    assert b"200" in got[:400], got[:400]
    # Same worker, still serving; the master is up.
    assert _pid_over(gateways, proto) == before
    assert gateways.running()


def test_missing_request_method_gets_400(gateways):
    out = _send(gateways.ports["uwsgi"], _uwsgi([(b"REQUEST_URI", b"/x")]))
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    out = _send(
        gateways.ports["scgi"], _scgi([(b"CONTENT_LENGTH", b"0"), (b"SCGI", b"1"), (b"REQUEST_URI", b"/")])
    )
    assert out.startswith(b"Status: 400"), out[:200]


def test_nothing_leaks_between_requests(gateways):
    """A body and variables of one request never show up in the next one on a
    kept FastCGI connection."""
    port = gateways.ports["fastcgi"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        first = [
            (b"REQUEST_METHOD", b"POST"),
            (b"REQUEST_URI", b"/echo"),
            (b"CONTENT_LENGTH", b"6"),
            (b"HTTP_X_ONE", b"1"),
        ]
        s.sendall(_fcgi(first, b"secret", keep=True))
        second = [(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/environ")]
        s.sendall(_fcgi(second, keep=True))
        buf, ends, stdout = b"", 0, [b"", b""]
        while ends < 2:
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
            while len(buf) >= 8:
                _, kind, _, length, pad, _ = struct.unpack(">BBHHBB", buf[:8])
                if len(buf) < 8 + length + pad:
                    break
                if kind == 6:
                    stdout[ends] += buf[8 : 8 + length]
                elif kind == 3:
                    ends += 1
                buf = buf[8 + length + pad :]
    assert stdout[0].endswith(b"secret")
    env = json.loads(stdout[1].partition(b"\r\n\r\n")[2])
    keys = {k for k in env if k.startswith("HTTP_")}
    assert "HTTP_X_ONE" not in keys
    assert env["REQUEST_METHOD"]["value"] == "GET"
    assert env.get("CONTENT_LENGTH", {"value": ""})["value"] in ("", "0")


def test_fastcgi_stream_survives_a_half_close(gateways):
    """Apache's mod_proxy_fcgi shuts down its sending side once the request
    is sent; a streamed response must still arrive whole."""
    port = gateways.ports["fastcgi"]
    for _ in range(5):
        out = _send(port, _fcgi([(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/stream?n=200")]))
        stdout, rest, ended = b"", out, False
        while len(rest) >= 8:
            _, kind, _, length, pad, _ = struct.unpack(">BBHHBB", rest[:8])
            if kind == 6:
                stdout += rest[8 : 8 + length]
            elif kind == 3:
                ended = True
            rest = rest[8 + length + pad :]
        assert ended, out[-200:]
        body = stdout.partition(b"\r\n\r\n")[2]
        assert body == b"".join(f"chunk{i}\n".encode() for i in range(200)), body[-100:]
