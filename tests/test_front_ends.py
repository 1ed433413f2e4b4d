"""corral behind real front ends: nginx over uwsgi, FastCGI (also with
keep-conn and an upstream keepalive pool) and SCGI on TCP and unix sockets,
Apache over all three, HAProxy over FastCGI, and cgi-fcgi; and nginx, Apache
and HAProxy as HTTP proxies in front of --http.

Every combination serves the same checks: a GET with a query, a form POST, a
1 MiB upload and a 100 MiB download with checksums, a streamed response,
non-ASCII and percent-encoded paths, repeated headers, the HTTPS flag, an
app mounted at /prefix, and the front end's own error when corral is stopped,
then requests flowing again once it is back. The configurations are the ones
docs/deploy/ shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import front_ends
import pytest
from front_ends import free_port
from support import Server, wait_until

PATTERN = bytes(range(256)) * 4096

NGINX_PROTOCOLS = {
    # protocol: (params file, pass directive, param directive)
    "uwsgi": ("uwsgi_params", "uwsgi_pass", "uwsgi_param"),
    "fastcgi": ("fastcgi_params", "fastcgi_pass", "fastcgi_param"),
    "scgi": ("scgi_params", "scgi_pass", "scgi_param"),
}

COMBOS = [
    ("nginx", "uwsgi", "tcp"),
    ("nginx", "uwsgi", "unix"),
    ("nginx", "fastcgi", "tcp"),
    ("nginx", "fastcgi", "unix"),
    ("nginx", "fastcgi-keepalive", "tcp"),
    ("nginx", "scgi", "tcp"),
    ("nginx", "scgi", "unix"),
    ("apache", "uwsgi", "tcp"),
    ("apache", "fastcgi", "tcp"),
    ("apache", "scgi", "tcp"),
    ("haproxy", "fastcgi", "tcp"),
]


class Stack:
    """corral behind one front end; `port` is the front end's, `https_port`
    the same route with the front end saying the client used TLS."""

    def __init__(self, tmp, front, protocol, transport, extra=()):
        self.tmp, self.front_name, self.protocol, self.transport = tmp, front, protocol, transport
        self.extra = extra
        self.wire = protocol.split("-")[0]
        if transport == "unix":
            self.backend = f"unix:{tmp}/corral.sock"
        else:
            self.backend = f"127.0.0.1:{free_port()}"
        self.stats_port = free_port()
        self.corral = None
        self.start_corral()
        self.port, self.https_port = free_port(), free_port()
        try:
            self.front = getattr(self, f"_{front}")()
        except BaseException:
            self.stop_corral()
            raise

    def start_corral(self):
        # 666: Apache's workers run as www-data.
        self.corral = Server(
            "front_app:application",
            f"--{self.wire}",
            self.backend,
            "--mount",
            "/prefix",
            "--socket-mode",
            "666",
            "--stats",
            f"127.0.0.1:{self.stats_port}",
            *self.extra,
            http=None,
            threads=4,
        )
        self.corral.wait_for(r"Worker ready", timeout=20)

    def stop_corral(self):
        self.corral.signal(signal.SIGTERM)
        assert self.corral.wait_exit(30) == 0
        self.corral.cleanup()

    def _nginx(self):
        params, directive, param = NGINX_PROTOCOLS[self.wire]
        # The HTTPS server also sets again two variables the stock params set
        # (REQUEST_SCHEME to http; HTTP_HOST to $host, without the port, in
        # Debian's), as docs/deploy/nginx.md advises behind TLS ended
        # elsewhere and on a port of its own: nginx then sends both values.
        https = f"{param} HTTPS on; {param} REQUEST_SCHEME https; {param} HTTP_HOST $http_host;"
        target = self.backend  # HOST:PORT, or unix:/path, which is nginx's own syntax too
        upstream, extra = "", ""
        if self.protocol == "fastcgi-keepalive":
            upstream = f"upstream corral {{ server {target}; keepalive 8; }}"
            target, extra = "corral", "fastcgi_keep_conn on;"
        servers = []
        for port, flag in ((self.port, ""), (self.https_port, https)):
            servers.append(
                f"""
    server {{
        listen {port};
        location / {{
            include {front_ends.NGINX_PARAMS}/{params};
            {flag}
            {extra}
            {directive} {target};
        }}
    }}"""
            )
        return front_ends.nginx(self.tmp / "nginx", upstream + "\n".join(servers))

    def _apache(self):
        scheme = {"uwsgi": "uwsgi", "fastcgi": "fcgi", "scgi": "scgi"}[self.wire]
        # Connections kept in a pool, each checked by peeking at it before reuse.
        reuse = " enablereuse=on" if self.protocol == "fastcgi-reuse" else ""
        hosts = []
        for port, flag in ((self.port, ""), (self.https_port, "SetEnv HTTPS on")):
            hosts.append(
                f"""
<VirtualHost 127.0.0.1:{port}>
    {flag}
    ProxyPass "/" "{scheme}://{self.backend}/"{reuse}
</VirtualHost>"""
            )
        return front_ends.apache(self.tmp / "apache", "\n".join(hosts), [self.port, self.https_port])

    def _haproxy(self):
        cfg = f"""
global
    maxconn 200
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
fcgi-app corral
    docroot /
    option keep-conn
fcgi-app corral-https
    docroot /
    option keep-conn
    set-param HTTPS on
frontend plain
    bind 127.0.0.1:{self.port}
    default_backend corral
frontend tls
    bind 127.0.0.1:{self.https_port}
    default_backend corral-https
backend corral
    use-fcgi-app corral
    option httpchk GET /readyz
    server s1 {self.backend} proto fcgi check check-proto h1 port {self.stats_port} inter 1s
backend corral-https
    use-fcgi-app corral-https
    server s1 {self.backend} proto fcgi
"""
        return front_ends.haproxy(self.tmp / "haproxy", cfg, [self.port, self.https_port])

    def request(self, method, path, body=None, headers=(), port=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def environ(self, path="/environ", **kw):
        status, _, body = self.request("GET", path, **kw)
        assert status == 200, (status, body[:500], self.front.logs())
        return json.loads(body)


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def stack(request, tmp_path_factory):
    front, protocol, transport = request.param
    needs = {"nginx": "nginx", "apache": "apache2", "haproxy": "haproxy"}[front]
    if not front_ends.available(needs):
        pytest.skip(f"{needs} is not installed (scripts/setup.sh installs it)")
    s = Stack(tmp_path_factory.mktemp(f"{front}-{protocol}-{transport}"), front, protocol, transport)
    yield s
    s.front.stop()
    s.corral.cleanup()


def test_get_with_query(stack):
    env = stack.environ("/environ?a=1&b=x%20y&c")
    assert env["REQUEST_METHOD"] == "GET"
    assert env["QUERY_STRING"] == "a=1&b=x%20y&c"
    assert env["PATH_INFO"] == "/environ"
    assert env["SCRIPT_NAME"] == ""
    assert env["wsgi.url_scheme"] == "http"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["SERVER_PROTOCOL"].startswith("HTTP/1.")
    assert "HTTP_CONTENT_LENGTH" not in env and "HTTP_CONTENT_TYPE" not in env


def test_form_post(stack):
    body = b"name=caf%C3%A9&n=1&n=2"
    status, _, out = stack.request(
        "POST", "/form", body, headers=[("Content-Type", "application/x-www-form-urlencoded")]
    )
    assert status == 200, out
    assert json.loads(out) == {"name": ["café"], "n": ["1", "2"]}


def test_upload_1mib(stack):
    data = os.urandom(1 << 20)
    status, _, out = stack.request(
        "POST", "/upload", data, headers=[("Content-Type", "application/octet-stream")]
    )
    assert status == 200, out
    assert json.loads(out) == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _chunked_post(port, path, chunks, timeout=10):
    """A POST whose body goes in the chunks given (none: an empty chunked body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def test_chunked_uploads_reach_the_app_whole(stack):
    """Front ends pass a chunked body on with a CONTENT_LENGTH (nginx, HAProxy
    and Apache buffer it) or as a stream. HAProxy 2.6 sends no STDIN at all
    for an empty one, only CONTENT_LENGTH 0: an app reading it waited for the
    end of STDIN until the header timeout, and got 408. Apache refuses them
    over uwsgi and SCGI itself (docs/deploy/apache.md)."""
    for chunks in ([], [b"abc", b"de"], [os.urandom(3000)] * 3):
        data = b"".join(chunks)
        status, out = _chunked_post(stack.port, "/upload", chunks)
        if stack.front_name == "apache" and stack.protocol in ("uwsgi", "scgi"):
            assert status == 411 and b"Content-length" in out, out[:300]
            continue
        assert status == 200, out[:300]
        assert json.loads(out) == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert stack.environ()["REQUEST_METHOD"] == "GET"


def test_an_answer_given_without_reading_a_large_body_reaches_the_client(stack):
    """The app answers (a 404 here; a 403 from CSRF, a redirect) without reading
    the 8 MiB body. The front end sends all of it before it reads the answer,
    and a backend closing before taking it made nginx answer 502."""
    data = b"x" * (8 << 20)
    mark = stack.corral.mark()
    for _ in range(3):
        status, out = _post_reading_as_it_sends(stack.port, "/nowhere", data)
        assert (status, json.loads(out)) == (404, {"error": "not found", "path": "/nowhere"}), out[:300]
    # A front end that closes rather than send the rest of a body nobody
    # reads (nginx over a kept FastCGI connection) broke nothing: no warning.
    warned = stack.corral.grep(r"\[WARNING\].*|\[ERROR\].*", since=mark)
    assert not warned, [m.group(0) for m in warned]
    # Nor did corral wait for the rest of it: nginx sends no more of a body
    # once it has the answer's head, and waits for END_REQUEST.
    waited = stack.corral.grep(r".*did not come within.*", since=mark)
    assert not waited, [m.group(0) for m in waited]


def test_a_client_sending_its_whole_body_before_reading_gets_the_answer_given_without_it(stack):
    """Most clients (http.client here, curl without Expect) send the whole
    body before they read. HAProxy passes on no more of it once it has
    END_REQUEST, so an END_REQUEST sent before the rest of STDIN left such a
    client waiting for HAProxy's 60 s timeout (the client here gives up at
    20 s) while corral waited for the rest of the body."""
    data = b"x" * (4 << 20)
    for _ in range(2):
        status, _, out = stack.request("POST", "/nowhere", data, timeout=20)
        assert (status, json.loads(out)) == (404, {"error": "not found", "path": "/nowhere"}), out[:300]
    assert stack.environ(timeout=20)["REQUEST_METHOD"] == "GET"


@pytest.mark.skipif(not front_ends.available("nginx"), reason="nginx is not installed")
@pytest.mark.parametrize("protocol", ["uwsgi", "fastcgi-keepalive", "scgi"])
def test_a_body_over_max_body_size_gets_413_through_the_front_end(tmp_path, protocol):
    """Refused before the app by its declared length (over FastCGI too, whose
    STDIN is a stream), and the front end gets the 413, not a closed socket."""
    access = tmp_path / "access.log"
    stack = Stack(
        tmp_path, "nginx", protocol, "unix", extra=("--max-body-size", "1000000", "--access-log", str(access))
    )
    try:
        for _ in range(3):
            status, _, out = stack.request(
                "POST", "/upload?big=1", b"y" * 2_000_000, headers=[("User-Agent", "uploader/1.0")]
            )
            assert status == 413 and b"request body too large" in out, (status, out[:300])
        # Logged as the request it was, from what the front end said of it.
        assert wait_until(lambda: access.exists() and access.read_text().count(" 413 ") == 3)
        line = access.read_text().splitlines()[0]
        assert line.startswith("127.0.0.1 ") and '"POST /upload?big=1 HTTP/1.1" 413' in line, line
        assert '"uploader/1.0"' in line, line
        status, _, out = stack.request("POST", "/upload", b"y" * 1_000_000)
        assert (status, json.loads(out)["length"]) == (200, 1_000_000)
        # The client nginx named, and nginx.
        stack.corral.wait_for(
            r"Request body too large from 127\.0\.0\.1 via unix:\S+corral\.sock: Content-Length 2000000 exceeds "
            r"--max-body-size 1000000",
            count=3,
        )
    finally:
        stack.front.stop()
        stack.corral.cleanup()


@pytest.mark.skipif(not front_ends.available("apache2"), reason="Apache is not installed")
@pytest.mark.parametrize("ending", ["413", "timeout"])
def test_apache_reusing_fastcgi_connections_is_not_misled_by_one_that_closes(tmp_path, ending):
    """A kept FastCGI connection that closes after its response (a 413, a 504
    from --timeout) must look closed to Apache, which peeks at a pooled
    connection before it reuses it: a record behind END_REQUEST meant for
    nginx looked like a sign of life, and so did a connection still open
    while the rest of a refused body was awaited. Apache sent its next
    request on it and answered 503."""
    extra = ("--max-body-size", "100000") if ending == "413" else ("--timeout", "1")
    stack = Stack(tmp_path, "apache", "fastcgi-reuse", "tcp", extra=extra)
    try:
        for _ in range(3):
            if ending == "413":
                status, _, out = stack.request("POST", "/upload", b"y" * 200_000)
            else:
                status, _, out = stack.request("GET", "/sleep?secs=3")
            assert status == int(ending if ending == "413" else 504), (status, out[:300])
            for _ in range(6):
                status, _, out = stack.request("GET", "/environ")
                assert status == 200, (status, out[:300], stack.front.logs()[-2000:])
    finally:
        stack.front.stop()
        stack.corral.cleanup()


def _post_reading_as_it_sends(port, path, data):
    """A POST whose client reads the answer while it sends, as browsers and curl
    do (HAProxy passes the answer on before it has the whole body, and then
    need not read the rest)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"

        def send():
            with contextlib.suppress(OSError):
                sock.sendall(head.encode() + data)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def test_download_100mib(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
    try:
        conn.request("GET", "/download?mib=100")
        resp = conn.getresponse()
        assert resp.status == 200
        h, n = hashlib.sha256(), 0
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    finally:
        conn.close()
    expected = hashlib.sha256()
    for _ in range(100):
        expected.update(PATTERN)
    assert n == 100 << 20
    assert h.hexdigest() == expected.hexdigest()


def test_head_gets_the_length_get_would_have(stack):
    """As over HTTP: the app returns its body in one piece without a
    Content-Length; GET is given one, and so is HEAD, without the body."""
    status, headers, body = stack.request("GET", "/plain")
    assert (status, body) == (200, b"one piece, no length given\n")
    status, headers, body = stack.request("HEAD", "/plain")
    assert (status, body) == (200, b"")
    length = {k.lower(): v for k, v in headers.items()}.get("content-length")
    if stack.front_name == "apache":
        # Apache answers HEAD without a length whatever its backend said.
        return
    assert length == str(len(b"one piece, no length given\n")), headers


def test_streamed_response(stack):
    status, _, body = stack.request("GET", "/stream")
    assert status == 200
    assert body == b"".join(f"line {i}\n".encode() for i in range(100))


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "no-length"])
def test_a_body_the_app_fails_in_the_middle_of_is_not_passed_off_as_whole(stack, length):
    """The front end learns the body is cut (a reset over TCP, a FastCGI
    record header it refuses on a unix socket, a short Content-Length) and
    cuts the client's response, or answers with its own error. Over uwsgi and
    SCGI on a unix socket there is nothing to send: a response without a
    length then ends normally behind nginx. Apache's mod_proxy_uwsgi takes
    the reset at the end of such a response for its end now and then; the
    same is allowed of mod_proxy_scgi (docs/deploy/)."""
    unframed = not length and stack.wire in ("uwsgi", "scgi")
    must_pass_off = unframed and stack.transport == "unix" and stack.front_name == "nginx"
    may_pass_off = must_pass_off or (unframed and stack.front_name == "apache")
    try:
        status, _, body = stack.request("GET", "/fails-midway" + ("?cl=1" if length else ""))
    except (http.client.IncompleteRead, ConnectionError) as e:
        assert not must_pass_off, e
    else:
        # A front end that learns of the cut before it has sent the head
        # answers with its own error (Apache: 503) instead.
        if status >= 500:
            assert not must_pass_off, (status, body[:200])
        else:
            assert may_pass_off, (status, len(body))
            assert status == 200 and body == b"first part\n" * 100
    stack.corral.wait_for("failed in the middle of the body")
    assert stack.request("GET", "/stream")[0] == 200


def test_many_responses_in_a_row_arrive_whole(stack):
    # A front end may still be sending the end of a request when the response
    # is complete (Apache sends FastCGI's empty STDIN record late); closing
    # then must not reset the connection under the response.
    expected = b"".join(f"line {i}\n".encode() for i in range(100))
    for _ in range(30):
        status, _, body = stack.request("GET", "/stream")
        assert (status, body) == (200, expected)
        status, _, body = stack.request("POST", "/upload", b"x" * 1000)
        assert status == 200 and json.loads(body)["length"] == 1000


def test_kept_client_connection_alternating_downloads_and_uploads(stack):
    """One kept-alive client connection, a multi-block download then a small
    request or an upload, over and over. HAProxy (and nginx over a kept FastCGI connection) sends the
    next request as soon as it has the whole body, before END_REQUEST: that
    request is the next one and must be served, not refused and left hanging."""
    mark = stack.corral.mark()
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        for i in range(100):
            conn.request("GET", "/download?mib=2")
            resp = conn.getresponse()
            body = resp.read()
            assert (resp.status, len(body)) == (200, 2 << 20), (i, stack.front.logs()[-2000:])
            # A small response right behind it, then an upload behind another download.
            conn.request("GET" if i % 2 else "POST", "/upload", body=None if i % 2 else b"u" * 300_000)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (i, body[:300], stack.front.logs()[-2000:])
            assert json.loads(body)["length"] == (0 if i % 2 else 300_000)
    finally:
        conn.close()
    assert not stack.corral.grep(r"ERROR", since=mark), stack.corral.log[-3000:]


def test_non_ascii_and_percent_encoded_paths(stack):
    # PATH_INFO is the decoded bytes as latin-1 (PEP 3333).
    assert stack.environ("/caf%C3%A9/environ")["PATH_INFO"] == "/caf\u00c3\u00a9/environ"
    assert stack.environ("/a%20b/environ")["PATH_INFO"] == "/a b/environ"


def test_repeated_headers(stack):
    env = stack.environ(headers=[("X-Multi", "one"), ("X-Multi", "two")])
    # nginx and HAProxy pass both lines (corral joins them); Apache joins them itself.
    assert env["HTTP_X_MULTI"].replace(" ", "") == "one,two"


def test_https_flag(stack):
    assert stack.environ(port=stack.https_port)["wsgi.url_scheme"] == "https"
    assert stack.environ()["wsgi.url_scheme"] == "http"


def test_a_variable_the_front_end_config_sets_again_takes_its_last_value(stack):
    if stack.front_name != "nginx":
        pytest.skip("nginx's params files")
    env = stack.environ(port=stack.https_port)
    assert env["REQUEST_SCHEME"] == "https"
    assert env["HTTP_HOST"] == f"127.0.0.1:{stack.https_port}"


def test_dot_segments_and_repeated_slashes_reach_the_app_resolved(stack):
    """The app routes on the path the front end routed on: `..`, `.` (also
    percent-encoded) and `//` are resolved, whichever protocol carried the request."""
    env = stack.environ("/internal/../a//b/./c/%2e%2e/environ?q=1")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("", "/a/b/environ", "q=1")
    env = stack.environ("//prefix//x/../environ")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/prefix", "/environ")


def test_haproxy_health_check_keeps_the_server_in_rotation(stack):
    """docs/deploy/haproxy.md's check: HTTP on corral's --stats port (/readyz)."""
    if stack.front_name != "haproxy":
        pytest.skip("HAProxy only")
    # Three failed checks (fall 3, inter 1s) would take the server down.
    time.sleep(4.5)
    assert stack.environ()["REQUEST_METHOD"] == "GET"
    assert "is DOWN" not in stack.front.logs(), stack.front.logs()[-2000:]


def test_app_mounted_at_prefix(stack):
    env = stack.environ("/prefix/environ?x=1")
    assert env["SCRIPT_NAME"] == "/prefix"
    assert env["PATH_INFO"] == "/environ"
    assert env["QUERY_STRING"] == "x=1"


def test_keepalive_reuses_backend_connections(stack):
    if stack.protocol != "fastcgi-keepalive" and stack.front_name != "haproxy":
        pytest.skip("only FastCGI with keep-conn keeps backend connections")
    for _ in range(20):
        assert stack.environ()["REQUEST_METHOD"] == "GET"
    # With FCGI_KEEP_CONN, the backend connections stay open between requests.
    port = stack.backend.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    open_conns = [line for line in out.splitlines() if line.strip()]
    assert 1 <= len(open_conns) <= 8, out
    # And nothing was logged as a protocol error.
    assert not stack.corral.grep(r"Bad fastcgi request")


def test_front_end_error_when_corral_is_stopped_then_recovery(stack):
    stack.stop_corral()
    status, _, _ = stack.request("GET", "/environ")
    # nginx answers 502, Apache 503, HAProxy 503: the front end's own error.
    assert status in (502, 503), status
    stack.start_corral()
    assert wait_until(lambda: stack.request("GET", "/environ")[0] == 200, 15), stack.front.logs()
    assert stack.environ()["PATH_INFO"] == "/environ"


def _http_get(port, path, method="GET", body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _serves_through_an_http_proxy(server, port, tls_port):
    """What a reverse proxy in front of --http must give the app: the query,
    the client's Host and address (X-Forwarded-For), its scheme (the TLS
    port's proxy says https), a 1 MiB upload whole, HEAD, kept connections
    to corral, and nothing in corral's log worth a warning. Returns the
    environs of the kept requests."""
    status, _, body = _http_get(port, "/environ?q=1")
    assert status == 200, (status, body[:300])
    env = json.loads(body)
    assert (env["wsgi.url_scheme"], env["QUERY_STRING"], env["HTTP_HOST"]) == (
        "http",
        "q=1",
        f"127.0.0.1:{port}",
    )
    assert env["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert json.loads(_http_get(tls_port, "/environ")[2])["wsgi.url_scheme"] == "https"
    data = os.urandom(1 << 20)
    status, _, out = _http_get(port, "/upload", method="POST", body=data)
    assert json.loads(out) == {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    status, headers, out = _http_get(port, "/plain", method="HEAD")
    assert (status, out, headers.get("content-length")) == (200, b"", "27")
    # One client connection kept alive, as a browser's (HAProxy's
    # `http-reuse safe` gives a client's first request a connection of its own).
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    kept = []
    try:
        for _ in range(20):
            conn.request("GET", "/environ")
            resp = conn.getresponse()
            assert resp.status == 200
            kept.append(json.loads(resp.read()))
    finally:
        conn.close()
    assert not server.grep(r"\[WARNING\]|\[ERROR\]"), server.log
    return kept


@pytest.mark.skipif(not front_ends.available("nginx"), reason="nginx is not installed")
def test_nginx_proxy_pass_over_http_to_a_unix_socket(start_server, tmp_path):
    """docs/deploy/nginx.md's HTTP section, as a site moving from gunicorn has
    it: proxy_pass to --http on a unix socket, kept connections, the client's
    scheme in X-Forwarded-Proto (believed from a unix socket peer)."""
    sock = tmp_path / "corral.sock"
    server = start_server("front_app:application", "--http", f"unix:{sock}", http=None, wait=False, threads=2)
    server.wait_for("Worker ready")
    port, tls_port = free_port(), free_port()
    location = """
        proxy_pass http://corral_http;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;"""
    front = front_ends.nginx(
        tmp_path / "nginx",
        f"""
    upstream corral_http {{
        server unix:{sock};
        keepalive 8;
    }}
    server {{
        listen {port};
        location / {{{location}
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
    server {{
        listen {tls_port};
        location / {{{location}
            proxy_set_header X-Forwarded-Proto https;   # as $scheme is behind TLS
        }}
    }}""",
    )
    try:
        _serves_through_an_http_proxy(server, port, tls_port)
    finally:
        front.stop()


@pytest.fixture
def sock_dir():
    """A directory a front end's unprivileged workers (Apache's www-data)
    can reach a socket in, which pytest's own temporary directories are not."""
    path = tempfile.mkdtemp(prefix="corral-sock-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _http_backend(start_server, sock_dir, transport, *extra):
    """corral's --http listener for a proxy, on TCP or a unix socket (mode
    666: Apache's workers run as www-data); returns the server and the
    address the proxy connects to."""
    if transport == "unix":
        sock = sock_dir / "corral.sock"
        addr, flags = str(sock), ["--http", f"unix:{sock}", "--socket-mode", "666"]
    else:
        addr = f"127.0.0.1:{free_port()}"
        flags = ["--http", addr]
    server = start_server("front_app:application", *flags, *extra, http=None, wait=False, threads=2)
    server.wait_for("Worker ready")
    return server, addr


@pytest.mark.skipif(not front_ends.available("apache2"), reason="Apache is not installed")
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_apache_mod_proxy_http_to_corral_http(start_server, tmp_path, sock_dir, transport):
    """docs/deploy/apache.md's HTTP section: mod_proxy_http to --http, with
    the client's Host kept, its scheme in X-Forwarded-Proto from the TLS
    virtual host, and Apache's pool of kept connections to corral."""
    server, addr = _http_backend(start_server, sock_dir, transport)
    target = f"unix:{addr}|http://localhost/" if transport == "unix" else f"http://{addr}/"
    port, tls_port = free_port(), free_port()
    hosts = []
    for p, proto in ((port, ""), (tls_port, 'RequestHeader set X-Forwarded-Proto "https"')):
        hosts.append(
            f"""
<VirtualHost 127.0.0.1:{p}>
    ProxyPreserveHost On
    {proto}
    ProxyPass "/" "{target}" ttl=60
    ProxyPassReverse "/" "{target}"
</VirtualHost>"""
        )
    front = front_ends.apache(tmp_path / "apache", "\n".join(hosts), [port, tls_port])
    try:
        kept = _serves_through_an_http_proxy(server, port, tls_port)
        # Apache resolves dot segments and merges slashes before it routes,
        # and passes on the path it routed on.
        paths = ("/x/../environ", "/x/%2e%2e/environ", "/a//environ")
        assert [json.loads(_http_get(port, p)[2])["PATH_INFO"] for p in paths] == [
            "/environ",
            "/environ",
            "/a/environ",
        ]
        if transport == "tcp":
            # Apache's event MPM keeps a pool per child process, whose
            # threads share it: far fewer connections than requests.
            assert len({env["REMOTE_PORT"] for env in kept}) <= 10, kept
    finally:
        front.stop()
    assert ":error]" not in front.logs(), front.logs()


@pytest.mark.skipif(not front_ends.available("haproxy"), reason="HAProxy is not installed")
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_haproxy_mode_http_to_corral_http(start_server, tmp_path, sock_dir, transport):
    """docs/deploy/haproxy.md's HTTP section: `mode http` to --http with
    `option forwardfor`, X-Forwarded-Proto from the TLS frontend, kept
    server connections (`http-reuse safe`) and the health check on /readyz."""
    stats = free_port()
    server, addr = _http_backend(start_server, sock_dir, transport, "--stats", f"127.0.0.1:{stats}")
    port, tls_port = free_port(), free_port()
    cfg = f"""
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend www
    bind 127.0.0.1:{port}
    default_backend corral
frontend tls
    bind 127.0.0.1:{tls_port}
    http-request set-header X-Forwarded-Proto https
    default_backend corral
backend corral
    option forwardfor
    http-reuse safe
    option httpchk GET /readyz
    server s1 {addr} check addr 127.0.0.1 port {stats} inter 1s
"""
    front = front_ends.haproxy(tmp_path / "haproxy", cfg, [port, tls_port])
    try:
        kept = _serves_through_an_http_proxy(server, port, tls_port)
        # HAProxy passes the target as the client wrote it, and corral (as
        # gunicorn) decodes it without resolving dot segments: the README's
        # caution for path rules in the proxy.
        paths = ("/x/../environ", "/x/%2e%2e/environ", "/a//environ")
        got = [json.loads(_http_get(port, p)[2])["PATH_INFO"] for p in paths]
        assert got == ["/x/../environ", "/x/../environ", "/a//environ"]
        if transport == "tcp":
            assert len({env["REMOTE_PORT"] for env in kept}) <= 10, kept
        # Three failed checks in a row (fall 3, inter 1s) would take it down.
        time.sleep(3.5)
        assert _http_get(port, "/plain")[0] == 200
        assert "is DOWN" not in front.logs(), front.logs()
    finally:
        front.stop()


@pytest.mark.skipif(not front_ends.available("cgi-fcgi"), reason="cgi-fcgi (libfcgi-bin) is not installed")
def test_cgi_fcgi(start_server):
    port = free_port()
    start_server("front_app:application", "--fastcgi", f"127.0.0.1:{port}", http=None, wait=False).wait_for(
        "Worker ready"
    )
    base = {
        "PATH": os.environ.get("PATH", ""),
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.1.2.3",
    }
    env = {**base, "REQUEST_METHOD": "GET", "REQUEST_URI": "/environ?q=1", "QUERY_STRING": "q=1"}
    out = subprocess.run(
        ["cgi-fcgi", "-bind", "-connect", f"127.0.0.1:{port}"],
        env=env,
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"Status: 200 OK"), out[:300]
    data = json.loads(body)
    assert (data["PATH_INFO"], data["QUERY_STRING"], data["REMOTE_ADDR"]) == ("/environ", "q=1", "10.1.2.3")
    payload = os.urandom(100_000)
    env = {**base, "REQUEST_METHOD": "POST", "REQUEST_URI": "/upload", "CONTENT_LENGTH": str(len(payload))}
    out = subprocess.run(
        ["cgi-fcgi", "-bind", "-connect", f"127.0.0.1:{port}"],
        env=env,
        input=payload,
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    body = out.partition(b"\r\n\r\n")[2]
    assert json.loads(body) == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def _nginx_kept_fastcgi_pool(tmp_path, port, backends):
    """nginx on `port` passing every request over FastCGI to `backends`, with
    fastcgi_keep_conn and an upstream keepalive pool of 8."""
    servers = " ".join(f"server {b};" for b in backends)
    return front_ends.nginx(
        tmp_path / "nginx",
        f"""
    upstream corral {{ {servers} keepalive 8; }}
    server {{
        listen {port};
        location / {{
            include {front_ends.NGINX_PARAMS}/fastcgi_params;
            fastcgi_keep_conn on;
            fastcgi_pass corral;
        }}
    }}""",
    )


@contextlib.contextmanager
def _strace(pid, *args):
    """strace attached to `pid` (its main thread; all of them with "-f") with
    `args` (a fault to inject) for the block; skips the test where strace
    cannot attach (no ptrace)."""
    proc = subprocess.Popen(
        ["strace", "-qq", "-o", "/dev/null", "-p", str(pid), *args], stderr=subprocess.PIPE
    )
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            pytest.skip(f"strace cannot attach here: {proc.stderr.read().decode(errors='replace')[:300]}")
        yield
    finally:
        proc.kill()
        proc.wait()


def _keep_requesting(port, stop, failures, counts, send):
    """Requests on one kept connection to the front end at `port` until `stop`,
    `send(conn, i)` making the i-th: each answer other than 200, and each
    error (the connection is then opened again), goes to `failures`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = 0
    while not stop.is_set():
        i += 1
        try:
            send(conn, i)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failures.append(resp.status)
            counts[0] += 1
        except (OSError, http.client.HTTPException) as e:
            failures.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()


@pytest.mark.skipif(not front_ends.available("nginx"), reason="nginx is not installed")
@pytest.mark.parametrize("event", ["recycling", "hup"])
def test_no_post_fails_behind_a_kept_fastcgi_pool_while_workers_are_replaced(start_server, tmp_path, event):
    """nginx with an upstream keepalive pool and fastcgi_keep_conn, under a load of
    uploads and downloads, while corral replaces its workers (--max-requests every
    ~20 requests, or HUP reloads). nginx cannot retry a POST whose connection
    closed under it (502), so a draining worker must close none: every request
    is answered 200."""
    backend = f"127.0.0.1:{free_port()}"
    args = ["--max-requests", "20", "--max-requests-jitter", "5"] if event == "recycling" else []
    server = start_server(
        "front_app:application", "--fastcgi", backend, *args, http=None, workers=2, threads=4, wait=False
    )
    server.wait_for(r"Worker ready", count=2, timeout=20)
    port = free_port()
    front = _nginx_kept_fastcgi_pool(tmp_path, port, [backend])
    failures, counts = [], [0]
    stop = threading.Event()

    def send(conn, i):
        if i % 2:
            conn.request("POST", "/upload", body=b"p" * 300_000)
        else:
            conn.request("GET", "/download?mib=1")

    def client():
        _keep_requesting(port, stop, failures, counts, send)

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        if event == "hup":
            for _ in range(5):
                time.sleep(1.5)
                server.signal(signal.SIGHUP)
        time.sleep(2 if event == "hup" else 8)
        stop.set()
        for t in threads:
            t.join(60)
        assert counts[0] > 100, counts
        assert not failures, (failures[:10], front.logs()[-3000:])
        assert server.grep(r"Worker handed \d+ connection"), server.log[-3000:]
    finally:
        stop.set()
        front.stop()


@pytest.mark.skipif(not front_ends.available("nginx"), reason="nginx is not installed")
@pytest.mark.parametrize("socket_kind", ["unix", "tcp"])
def test_no_request_fails_behind_a_kept_fastcgi_pool_when_bodies_over_max_body_size_are_refused(
    start_server, tmp_path, socket_kind
):
    """A body over --max-body-size gets its 413, and the connection, kept
    (FCGI_KEEP_CONN), serves nginx's next requests: none of them may fail (a
    502, for the refused request or another)."""
    backend = f"unix:{tmp_path}/corral.sock" if socket_kind == "unix" else f"127.0.0.1:{free_port()}"
    server = start_server(
        "front_app:application",
        "--fastcgi",
        backend,
        "--max-body-size",
        "1000",
        http=None,
        threads=4,
        wait=False,
    )
    server.wait_for(r"Worker ready", timeout=20)
    port = free_port()
    front = _nginx_kept_fastcgi_pool(tmp_path, port, [backend])
    wrong = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(150):
            big = i % 2 == 0
            try:
                conn.request("POST", "/upload", body=b"p" * (5000 if big else 10))
                resp = conn.getresponse()
                resp.read()
                if resp.status != (413 if big else 200):
                    wrong.append((big, resp.status))
            except (OSError, http.client.HTTPException) as e:
                wrong.append((big, repr(e)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not wrong, (wrong[:10], front.logs()[-3000:])
    finally:
        front.stop()


@pytest.mark.skipif(not front_ends.available("nginx"), reason="nginx is not installed")
@pytest.mark.parametrize("late_close", [False, True], ids=["prompt-close", "late-close"])
@pytest.mark.parametrize("socket_kind", ["unix", "tcp"])
def test_no_post_fails_behind_a_kept_fastcgi_pool_when_one_of_two_servers_stops(
    start_server, tmp_path, socket_kind, late_close
):
    """Two corral servers behind one nginx upstream with a keepalive pool and
    fastcgi_keep_conn, eight clients posting, and one server stopped (TERM)
    under that load. nginx sends a request refused at connect to the other
    server, but cannot retry a POST written on a pooled connection that closes
    under it (502): the stopping server must end each kept connection so that
    nginx never puts it back in its pool, on a unix socket as over TCP.
    `late_close` widens the moment this races: strace delays every shutdown(2)
    of the stopping worker by 20 ms, so nginx has long read each last response
    before its connection ends (the record corral puts right behind the last
    END_REQUEST must keep nginx from pooling it)."""
    if late_close and not front_ends.available("strace"):
        pytest.skip("strace is not installed")
    if socket_kind == "unix":
        backends = [f"unix:{tmp_path}/corral-{i}.sock" for i in range(2)]
    else:
        backends = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    servers = [
        start_server("front_app:application", "--fastcgi", b, http=None, workers=1, threads=4, wait=False)
        for b in backends
    ]
    for server in servers:
        server.wait_for(r"Worker ready", timeout=20)
    port = free_port()
    front = _nginx_kept_fastcgi_pool(tmp_path, port, backends)
    failures, counts = [], [0]
    stop = threading.Event()

    def client():
        _keep_requesting(
            port, stop, failures, counts, lambda conn, _: conn.request("POST", "/upload", body=b"p" * 2000)
        )

    late = _strace(
        servers[0].worker_pids()[0], "-f", "-e", "trace=shutdown", "-e", "inject=shutdown:delay_enter=20000"
    )
    try:
        with late if late_close else contextlib.nullcontext():
            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(1.5)
            before = counts[0]
            servers[0].signal(signal.SIGTERM)
            assert servers[0].wait_exit(20) == 0, servers[0].log[-3000:]
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(60)
        assert before > 50 and counts[0] > before + 50, (before, counts)
        assert not failures, (failures[:10], front.logs()[-3000:])
    finally:
        stop.set()
        front.stop()


@pytest.mark.skipif(not front_ends.available("nginx", "strace"), reason="nginx or strace is not installed")
def test_no_post_fails_behind_a_kept_fastcgi_pool_when_handing_connections_over_fails_at_first(
    start_server, tmp_path
):
    """A HUP under a load of POSTs through nginx's kept FastCGI pool, where
    the draining worker's first 40 attempts to hand an idle kept connection to
    its replacement fail (strace makes its main thread's sendmsg(2) wait
    10 ms and fail with EPIPE, as when the chosen sibling begins to drain
    too). A connection is marked as going away while it is handed over; a
    request nginx sends on it meanwhile must be served once the connection
    is given back, not closed unread with it (a reset: 502)."""
    backend = f"unix:{tmp_path}/corral.sock"
    server = start_server(
        "front_app:application", "--fastcgi", backend, http=None, workers=1, threads=4, wait=False
    )
    server.wait_for(r"Worker ready", timeout=20)
    [worker] = server.worker_pids()
    port = free_port()
    front = _nginx_kept_fastcgi_pool(tmp_path, port, [backend])
    failures, counts = [], [0]
    stop = threading.Event()

    def send(conn, _):
        # Pauses leave kept connections idle, for the sweep to hand over.
        time.sleep(0.01)
        conn.request("POST", "/upload", body=b"p" * 2000)

    def client():
        _keep_requesting(port, stop, failures, counts, send)

    fail_first = _strace(
        worker, "-e", "trace=sendmsg", "-e", "inject=sendmsg:error=EPIPE:delay_enter=10000:when=1..40"
    )
    try:
        with fail_first:
            threads = [threading.Thread(target=client) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(1)
            mark = server.mark()
            server.signal(signal.SIGHUP)
            server.wait_for(
                rf"Worker handed \d+ connection\(s\) to other workers: pid={worker}",
                since=mark,
                timeout=30,
            )
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(60)
        assert counts[0] > 100, counts
        assert not failures, (failures[:10], front.logs()[-3000:])
    finally:
        stop.set()
        front.stop()
