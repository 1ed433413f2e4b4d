"""Clients for the protocols a front end speaks to corral: uwsgi, FastCGI and SCGI.

Each protocol has encoders that build exact bytes (so tests can also build
wrong ones) and a client that sends a request over TCP or a unix socket and
parses the whole answer:

- uwsgi: a packet (modifier1, u16 LE datasize, modifier2, vars) and the body;
  the answer is an HTTP status line, headers and a body that the closed
  connection ends.
- SCGI: a netstring of ``name\\0value\\0`` pairs and the body; the answer is
  CGI-style (``Status:`` header), ended by the closed connection.
- FastCGI: records. `FcgiConn` works at the record level (send any record,
  with padding, split or interleaved; read records one by one) and also runs
  whole requests, collecting STDOUT, STDERR and END_REQUEST.

An address is ``(host, port)`` for TCP or a ``str`` path for a unix socket.
`call` runs one request over any of the three protocols with the CGI
variables a front end would send. `start_gateways` starts corral with
protocol listeners and reads their addresses from its log.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from support import READY_RE

Addr = tuple[str, int] | str
PairLike = tuple[bytes | str, bytes | str]

PROTOCOLS = ("uwsgi", "fastcgi", "scgi")


def _b(s: bytes | str) -> bytes:
    return s if isinstance(s, bytes) else s.encode("latin-1")


def connect(addr: Addr, timeout: float = 10.0, rcvbuf: int | None = None) -> socket.socket:
    """A connection to `addr`; `rcvbuf` sets its receive buffer before it connects
    (a slow reader whose window stays small)."""
    if isinstance(addr, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return sock


def read_until_close(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Reads until the peer closes. Returns the bytes and whether it closed
    (False: `timeout` passed first). A reset counts as closed."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            return bytes(data), False
        except ConnectionResetError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk


def send_raw(addr: Addr, data: bytes, half_close: bool = True, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Sends `data` on a fresh connection (then half-closes it unless told
    not to) and reads until the server closes: (bytes received, closed)."""
    with connect(addr, timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_close(sock, timeout)


# -- responses ------------------------------------------------------------------


@dataclass
class Reply:
    """A parsed answer, whatever the protocol."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    # uwsgi/SCGI: every byte received; FastCGI: the STDOUT stream.
    raw: bytes
    # The server closed the connection (uwsgi/SCGI: within the timeout; FastCGI: after END_REQUEST).
    closed: bool = True
    # FastCGI only.
    stderr: bytes = b""
    app_status: int | None = None
    protocol_status: int | None = None
    records: list[Record] = field(default_factory=list)

    def header(self, name: str, default=None):
        values = self.header_all(name)
        return values[0] if values else default

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def complete(self) -> bool:
        """False when a Content-Length was given and the body is not that long."""
        cl = self.header("Content-Length")
        return cl is None or len(self.body) == int(cl)

    def json(self):
        assert self.status == 200, (self.status, self.body[:2000])
        return json.loads(self.body)

    def env(self, key: str, default=None):
        """A value from an /environ dump."""
        entry = self.json().get(key)
        return default if entry is None else entry["value"]


class BadReply(AssertionError):
    pass


def parse_reply(data: bytes, status_line: bool) -> Reply:
    """Parses a head and body: an HTTP status line (uwsgi) or a CGI ``Status:`` header."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise BadReply(f"no end of head in {data[:300]!r}")
    lines = head.split(b"\r\n")
    if status_line:
        m = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: (.*))?", lines[0])
        if not m:
            raise BadReply(f"bad status line {lines[0]!r}")
        status, reason = int(m.group(1)), (m.group(2) or b"").decode("latin-1")
        lines = lines[1:]
    else:
        status, reason = 0, ""
    headers = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadReply(f"bad header line {line!r}")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    if not status_line:
        found = [v for k, v in headers if k.lower() == "status"]
        if len(found) != 1:
            raise BadReply(f"expected one Status header in {head[:300]!r}")
        code, _, reason = found[0].partition(" ")
        status = int(code)
    return Reply(status, reason, headers, body, data)


# -- uwsgi ----------------------------------------------------------------------


def uwsgi_vars(pairs: Iterable[PairLike]) -> bytes:
    out = bytearray()
    for k, v in pairs:
        k, v = _b(k), _b(v)
        out += struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
    return bytes(out)


def uwsgi_packet(
    pairs: Iterable[PairLike], body: bytes = b"", modifier1: int = 0, modifier2: int = 0
) -> bytes:
    """A uwsgi request packet followed by `body`."""
    block = uwsgi_vars(pairs)
    assert len(block) <= 0xFFFF, "a uwsgi vars block is at most 65535 bytes"
    return bytes([modifier1]) + struct.pack("<H", len(block)) + bytes([modifier2]) + block + body


def uwsgi_request(
    addr: Addr, pairs: Iterable[PairLike], body: bytes = b"", modifier1: int = 0, timeout=10.0
) -> Reply:
    with connect(addr, timeout) as sock:
        sock.sendall(uwsgi_packet(pairs, body, modifier1))
        data, closed = read_until_close(sock, timeout)
    reply = parse_reply(data, status_line=True)
    reply.closed = closed
    return reply


# -- SCGI -----------------------------------------------------------------------


def scgi_netstring(pairs: Iterable[PairLike]) -> bytes:
    block = b"".join(_b(k) + b"\0" + _b(v) + b"\0" for k, v in pairs)
    return str(len(block)).encode() + b":" + block + b","


def scgi_request(addr: Addr, pairs: Iterable[PairLike], body: bytes = b"", timeout=10.0) -> Reply:
    """`pairs` go on the wire as given: CONTENT_LENGTH first and SCGI=1 are the caller's business."""
    with connect(addr, timeout) as sock:
        sock.sendall(scgi_netstring(pairs) + body)
        data, closed = read_until_close(sock, timeout)
    reply = parse_reply(data, status_line=False)
    reply.closed = closed
    return reply


# -- FastCGI --------------------------------------------------------------------

FCGI_BEGIN_REQUEST = 1
FCGI_ABORT_REQUEST = 2
FCGI_END_REQUEST = 3
FCGI_PARAMS = 4
FCGI_STDIN = 5
FCGI_STDOUT = 6
FCGI_STDERR = 7
FCGI_DATA = 8
FCGI_GET_VALUES = 9
FCGI_GET_VALUES_RESULT = 10
FCGI_UNKNOWN_TYPE = 11

FCGI_RESPONDER = 1
FCGI_AUTHORIZER = 2
FCGI_FILTER = 3
FCGI_KEEP_CONN = 1

FCGI_REQUEST_COMPLETE = 0
FCGI_CANT_MPX_CONN = 1
FCGI_OVERLOADED = 2
FCGI_UNKNOWN_ROLE = 3

MAX_CONTENT = 0xFFFF


@dataclass
class Record:
    type: int
    request_id: int
    content: bytes
    padding: int = 0
    version: int = 1

    def end_request(self) -> tuple[int, int]:
        """(appStatus, protocolStatus) of an END_REQUEST record."""
        assert self.type == FCGI_END_REQUEST and len(self.content) == 8, self
        app_status, protocol_status = struct.unpack(">IB3x", self.content)
        return app_status, protocol_status

    def pairs(self) -> list[tuple[bytes, bytes]]:
        return decode_pairs(self.content)


def record(rtype: int, request_id: int, content: bytes = b"", padding: int = 0, version: int = 1) -> bytes:
    """One record; `padding` zero bytes follow the content."""
    assert len(content) <= MAX_CONTENT
    return (
        struct.pack(">BBHHBB", version, rtype, request_id, len(content), padding, 0)
        + content
        + b"\0" * padding
    )


def begin_request(
    request_id: int = 1, role: int = FCGI_RESPONDER, keep_conn: bool = False, padding: int = 0
) -> bytes:
    body = struct.pack(">HB5x", role, FCGI_KEEP_CONN if keep_conn else 0)
    return record(FCGI_BEGIN_REQUEST, request_id, body, padding)


def _length(n: int, long: bool) -> bytes:
    return bytes([n]) if n < 128 and not long else struct.pack(">I", n | 0x80000000)


def encode_pair(name: bytes | str, value: bytes | str, long: bool = False) -> bytes:
    """A name-value pair: 1-byte lengths below 128, 4 bytes otherwise (or always with `long`)."""
    name, value = _b(name), _b(value)
    return _length(len(name), long) + _length(len(value), long) + name + value


def encode_pairs(pairs: Iterable[PairLike]) -> bytes:
    return b"".join(encode_pair(k, v) for k, v in pairs)


def decode_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 0

    def length() -> int:
        nonlocal i
        if data[i] < 128:
            i += 1
            return data[i - 1]
        n = struct.unpack(">I", data[i : i + 4])[0] & 0x7FFFFFFF
        i += 4
        return n

    while i < len(data):
        nl = length()
        vl = length()
        out.append((data[i : i + nl], data[i + nl : i + nl + vl]))
        i += nl + vl
    return out


def stream(
    rtype: int, request_id: int, data: bytes, chunk: int = MAX_CONTENT, padding: int = 0, end: bool = True
) -> bytes:
    """`data` as records of at most `chunk` bytes, then (with `end`) the empty record that ends the stream."""
    out = [record(rtype, request_id, data[i : i + chunk], padding) for i in range(0, len(data), chunk)]
    if end:
        out.append(record(rtype, request_id, b"", padding))
    return b"".join(out)


def fcgi_request_bytes(
    params: Iterable[PairLike],
    body: bytes = b"",
    request_id: int = 1,
    keep_conn: bool = False,
    params_chunk: int = MAX_CONTENT,
    stdin_chunk: int = MAX_CONTENT,
    padding: int = 0,
) -> bytes:
    """BEGIN_REQUEST, the PARAMS stream and the STDIN stream of one request."""
    return (
        begin_request(request_id, FCGI_RESPONDER, keep_conn, padding)
        + stream(FCGI_PARAMS, request_id, encode_pairs(params), params_chunk, padding)
        + stream(FCGI_STDIN, request_id, body, stdin_chunk, padding)
    )


def parse_records(data: bytes) -> tuple[list[Record], bytes]:
    """Every complete record in `data`, and the bytes left over."""
    out, i = [], 0
    while len(data) - i >= 8:
        version, rtype, rid, length, padding, _ = struct.unpack(">BBHHBB", data[i : i + 8])
        if len(data) - i < 8 + length + padding:
            break
        out.append(Record(rtype, rid, data[i + 8 : i + 8 + length], padding, version))
        i += 8 + length + padding
    return out, data[i:]


class FcgiConn:
    """One FastCGI connection, driven record by record."""

    def __init__(self, addr: Addr, timeout: float = 10.0, rcvbuf: int | None = None):
        self.sock = connect(addr, timeout, rcvbuf)
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        # Records read while waiting for something else (management answers, other ids'
        # records); `read_response` takes its request's records from here first.
        self.others: list[Record] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def send_record(
        self, rtype: int, request_id: int, content: bytes = b"", padding: int = 0, version: int = 1
    ):
        self.send(record(rtype, request_id, content, padding, version))

    def half_close(self):
        self.sock.shutdown(socket.SHUT_WR)

    def read_record(self, timeout: float | None = None) -> Record | None:
        """The next record; None when the server closed the connection.
        Raises TimeoutError when nothing complete arrives in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= 8:
                version, rtype, rid, length, padding, _ = struct.unpack(">BBHHBB", self.buf[:8])
                if len(self.buf) >= 8 + length + padding:
                    content = bytes(self.buf[8 : 8 + length])
                    del self.buf[: 8 + length + padding]
                    return Record(rtype, rid, content, padding, version)
            if self.eof:
                if self.buf:
                    raise BadReply(f"connection closed inside a record: {bytes(self.buf[:100])!r}")
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete record within the timeout; have {bytes(self.buf[:100])!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection, with no more records, within `timeout`."""
        try:
            return self.read_record(timeout) is None
        except TimeoutError:
            return False

    def read_response(self, request_id: int = 1, timeout: float | None = None) -> Reply:
        """Reads records until END_REQUEST for `request_id`; other ids' records go to `others`.

        Checks the framing: STDOUT ended by an empty record before END_REQUEST, nothing
        on STDOUT after that. The reply's head is parsed when STDOUT holds one.
        """
        stdout, stderr, mine = bytearray(), bytearray(), []
        stdout_ended = False

        def is_mine(rec: Record) -> bool:
            return rec.request_id == request_id and rec.type in (FCGI_STDOUT, FCGI_STDERR, FCGI_END_REQUEST)

        while True:
            # Records of this request read earlier, while waiting for another one, come first.
            rec = next((r for r in self.others if is_mine(r)), None)
            if rec is not None:
                self.others.remove(rec)
            else:
                rec = self.read_record(timeout)
            if rec is None:
                raise BadReply(
                    f"connection closed before END_REQUEST {request_id}; stdout {bytes(stdout[:300])!r}"
                )
            if not is_mine(rec):
                self.others.append(rec)
                continue
            assert rec.version == 1, rec
            mine.append(rec)
            if rec.type == FCGI_STDOUT:
                assert not stdout_ended, "STDOUT record after the empty one that ended the stream"
                if not rec.content:
                    stdout_ended = True
                stdout += rec.content
            elif rec.type == FCGI_STDERR:
                stderr += rec.content
            else:
                app_status, protocol_status = rec.end_request()
                break
        if stdout:
            assert stdout_ended, "END_REQUEST without the empty STDOUT record ending the stream"
            reply = parse_reply(bytes(stdout), status_line=False)
        else:
            reply = Reply(0, "", [], b"", b"")
        reply.closed = False
        reply.stderr = bytes(stderr)
        reply.app_status, reply.protocol_status = app_status, protocol_status
        reply.records = mine
        return reply

    def request(
        self,
        params: Iterable[PairLike],
        body: bytes = b"",
        request_id: int = 1,
        keep_conn: bool = False,
        **kw,
    ) -> Reply:
        """Sends one whole request and reads its answer; without `keep_conn`, also
        checks whether the server then closes the connection (`Reply.closed`)."""
        timeout = kw.pop("timeout", None)
        self.send(fcgi_request_bytes(params, body, request_id, keep_conn, **kw))
        reply = self.read_response(request_id, timeout)
        if not keep_conn:
            reply.closed = self.at_eof()
        return reply

    def get_values(self, names: Sequence[bytes | str]) -> dict[bytes, bytes]:
        self.send_record(FCGI_GET_VALUES, 0, encode_pairs((n, b"") for n in names))
        while True:
            rec = self.read_record()
            assert rec is not None, "connection closed instead of GET_VALUES_RESULT"
            if rec.type == FCGI_GET_VALUES_RESULT:
                assert rec.request_id == 0, rec
                return dict(rec.pairs())
            self.others.append(rec)


def fastcgi_request(addr: Addr, params: Iterable[PairLike], body: bytes = b"", timeout=10.0, **kw) -> Reply:
    with FcgiConn(addr, timeout) as conn:
        return conn.request(params, body, **kw)


# -- any protocol -----------------------------------------------------------------


def cgi_params(
    method: str = "GET",
    uri: str = "/",
    body: bytes = b"",
    extra: Iterable[PairLike] = (),
    content_length: bool = True,
) -> list[tuple[bytes, bytes]]:
    """The variables nginx would send for a request (CONTENT_LENGTH first, as SCGI wants),
    followed by `extra`; a default is left out when `extra` sets the same name."""
    extra = [(_b(k), _b(v)) for k, v in extra]
    given = {k for k, _ in extra}
    query = uri.partition("?")[2]
    defaults = [
        (b"CONTENT_LENGTH", str(len(body)).encode() if body or method in ("POST", "PUT") else b""),
        (b"REQUEST_METHOD", method.encode()),
        (b"REQUEST_URI", uri.encode("latin-1")),
        (b"QUERY_STRING", query.encode("latin-1")),
        (b"SERVER_PROTOCOL", b"HTTP/1.1"),
        (b"SERVER_NAME", b"gateway.test"),
        (b"SERVER_PORT", b"8080"),
        (b"REMOTE_ADDR", b"192.0.2.10"),
        (b"REMOTE_PORT", b"40000"),
        (b"HTTP_HOST", b"gateway.test:8080"),
    ]
    if not content_length:
        defaults = defaults[1:]
    return [(k, v) for k, v in defaults if k not in given] + extra


def call(
    proto: str,
    addr: Addr,
    method: str = "GET",
    uri: str = "/",
    body: bytes = b"",
    extra: Iterable[PairLike] = (),
    *,
    params: Iterable[PairLike] | None = None,
    modifier1: int = 0,
    timeout: float = 10.0,
    **kw,
) -> Reply:
    """One request over `proto` on a fresh connection. `params` replaces the default variables
    entirely; otherwise `cgi_params(method, uri, body, extra)`. For SCGI, SCGI=1 is added
    unless `params` are given."""
    pairs = list(params) if params is not None else cgi_params(method, uri, body, extra)
    if proto == "uwsgi":
        return uwsgi_request(addr, pairs, body, modifier1, timeout)
    if proto == "scgi":
        if params is None:
            # SCGI always has a CONTENT_LENGTH number (nginx sends "0" for no body).
            if pairs[0] == (b"CONTENT_LENGTH", b""):
                pairs[0] = (b"CONTENT_LENGTH", b"0")
            pairs.insert(1, (b"SCGI", b"1"))
        return scgi_request(addr, pairs, body, timeout)
    if proto == "fastcgi":
        return fastcgi_request(addr, pairs, body, timeout, **kw)
    raise ValueError(proto)


def request_bytes(proto: str, pairs: Sequence[PairLike], body: bytes = b"") -> bytes:
    """The bytes of one request over `proto`, `pairs` as given (no SCGI=1 added)."""
    if proto == "uwsgi":
        return uwsgi_packet(pairs, body)
    if proto == "scgi":
        return scgi_netstring(pairs) + body
    return fcgi_request_bytes(pairs, body)


def parse_any(proto: str, data: bytes) -> Reply:
    """Parses everything a connection received (FastCGI: the records up to END_REQUEST)."""
    if proto == "uwsgi":
        return parse_reply(data, status_line=True)
    if proto == "scgi":
        return parse_reply(data, status_line=False)
    recs, _ = parse_records(data)
    stdout = b"".join(r.content for r in recs if r.type == FCGI_STDOUT)
    ends = [r for r in recs if r.type == FCGI_END_REQUEST]
    if not ends:
        raise BadReply(f"no END_REQUEST in {data[:300]!r}")
    reply = parse_reply(stdout, status_line=False)
    reply.app_status, reply.protocol_status = ends[0].end_request()
    reply.records = recs
    return reply


# -- corral with protocol listeners ----------------------------------------------

GATEWAY_LISTEN_RE = re.compile(
    r"Listening at: (?:(uwsgi|fastcgi|scgi)://(\[[^\]]+\]|[^\s:\[]+):(\d+)|unix:(\S+) \((uwsgi|fastcgi|scgi)\))"
)


def gateway_addresses(server, since: int = 0) -> dict[str, list[Addr]]:
    """The protocol listeners in `server`'s log: {protocol: [(host, port) or unix path, ...]}."""
    out: dict[str, list[Addr]] = {p: [] for p in PROTOCOLS}
    for m in server.grep(GATEWAY_LISTEN_RE.pattern, since):
        if m.group(1):
            out[m.group(1)].append((m.group(2).strip("[]"), int(m.group(3))))
        else:
            out[m.group(5)].append(m.group(4))
    return out


def start_gateways(factory, app: str, listeners: Sequence[tuple[str, str]], *args: str, http=None, **kw):
    """Starts corral (through a conftest factory) with `--PROTO ADDR` for each of `listeners`
    and waits for every listener line and every worker. The server gets `gateways`
    (see `gateway_addresses`) and `addr(proto, unix=False)`."""
    flags = [a for proto, addr in listeners for a in (f"--{proto}", addr)]
    server = factory(app, *flags, *args, http=http, wait=False, **kw)
    server.wait_for(GATEWAY_LISTEN_RE.pattern, count=len(listeners), timeout=20)
    server.wait_for(READY_RE.pattern, count=server.expected_workers, timeout=20)
    server.gateways = gateway_addresses(server)

    def addr(proto: str, unix: bool = False) -> Addr:
        found = [a for a in server.gateways[proto] if isinstance(a, str) == unix]
        assert found, (proto, unix, server.gateways)
        return found[0]

    server.addr = addr
    return server
