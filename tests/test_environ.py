"""The WSGI environ (PEP 3333) as apps see it.

/environ in apps/behaviour.py runs inside wsgiref.validate.validator (its
warnings made errors), so a 200 already means the validator found nothing.
"""

import json
import socket
import time
import uuid

import pytest

CGI_KEYS = [
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "REQUEST_URI",
    "RAW_URI",
]


def _environ(server, target="/environ", method="GET", headers=None, body=b"", version="HTTP/1.1"):
    with server.connect() as conn:
        conn.send_request(
            method, target, {"Host": "example.test:8080", **(headers or {})}, body, version=version
        )
        resp = conn.read_response()
        assert resp.status == 200, (resp.status, resp.body[:3000], server.log[-3000:])
        env = json.loads(resp.body)
        if conn.sock.family != socket.AF_UNIX:
            env["_client_port"] = conn.sock.getsockname()[1]
        return env


def _v(env, key):
    return env[key]["value"]


def test_environ_keys_and_types(behaviour):
    env = _environ(behaviour, "/environ?x=1&y=%20z", headers={"User-Agent": "pytest", "X-Custom": "v"})
    for key in CGI_KEYS:
        assert env[key]["type"] == "str", key
    assert _v(env, "REQUEST_METHOD") == "GET"
    assert _v(env, "SCRIPT_NAME") == ""
    assert _v(env, "PATH_INFO") == "/environ"
    assert _v(env, "QUERY_STRING") == "x=1&y=%20z"
    assert _v(env, "REQUEST_URI") == "/environ?x=1&y=%20z"
    assert _v(env, "SERVER_PROTOCOL") == "HTTP/1.1"
    # From the listener, or (as some servers do) from the Host header: either pair is PEP 3333.
    assert (_v(env, "SERVER_NAME"), _v(env, "SERVER_PORT")) in (
        ("127.0.0.1", str(behaviour.port)),
        ("example.test", "8080"),
    )
    assert _v(env, "REMOTE_ADDR") == "127.0.0.1"
    assert _v(env, "REMOTE_PORT") == str(env["_client_port"])
    assert _v(env, "HTTP_HOST") == "example.test:8080"
    assert _v(env, "HTTP_USER_AGENT") == "pytest"
    assert _v(env, "HTTP_X_CUSTOM") == "v"
    assert _v(env, "wsgi.version") == [1, 0]
    assert env["wsgi.version"]["type"] == "tuple"
    assert _v(env, "wsgi.url_scheme") == "http"
    assert _v(env, "wsgi.run_once") is False
    assert _v(env, "wsgi.input_terminated") is True
    assert env["wsgi.multithread"]["type"] == "bool"
    assert env["wsgi.multiprocess"]["type"] == "bool"
    assert "wsgi.file_wrapper" in env
    assert env["_input_methods"] == ["read", "readline", "readlines", "__iter__"]
    assert env["_errors_methods"] == ["write", "writelines", "flush"]
    # No body, so no CONTENT_LENGTH (or an empty one) and no HTTP_CONTENT_* anywhere.
    assert env.get("CONTENT_LENGTH", {"value": ""})["value"] in ("", "0")
    assert not any(k.startswith("HTTP_CONTENT_") for k in env)
    for key in env:
        if key.isupper():
            assert env[key]["type"] == "str", key


def test_http10_request_protocol(behaviour):
    env = _environ(behaviour, version="HTTP/1.0")
    assert _v(env, "SERVER_PROTOCOL") == "HTTP/1.0"


def test_content_type_and_length(behaviour):
    env = _environ(
        behaviour,
        "/environ",
        "POST",
        headers={"Content-Type": "text/plain; charset=utf-8"},
        body=b"some body",
    )
    assert _v(env, "CONTENT_TYPE") == "text/plain; charset=utf-8"
    assert _v(env, "CONTENT_LENGTH") == "9"
    assert "HTTP_CONTENT_TYPE" not in env
    assert "HTTP_CONTENT_LENGTH" not in env
    assert env["_body"] == "some body"


def test_chunked_body_has_no_content_length(behaviour):
    env = _environ(
        behaviour, "/environ", "POST", headers={"Transfer-Encoding": "chunked"}, body=b"3\r\nabc\r\n0\r\n\r\n"
    )
    assert env.get("CONTENT_LENGTH", {"value": ""})["value"] == ""
    assert "HTTP_TRANSFER_ENCODING" not in env or _v(env, "HTTP_TRANSFER_ENCODING") == "chunked"
    assert _v(env, "wsgi.input_terminated") is True
    assert env["_body"] == "abc"


@pytest.mark.parametrize(
    "target,path,query",
    [
        ("/caf%C3%A9", "/caf\u00c3\u00a9", ""),  # percent-decoded, then each byte as latin-1
        ("/a%20b/c%2Bd+e", "/a b/c+d+e", ""),
        ("/x?q=caf%C3%A9&a=%20+b", "/x", "q=caf%C3%A9&a=%20+b"),  # the query stays raw
        ("/x?", "/x", ""),
        ("//double//slashes", "//double//slashes", ""),
        ("/%7Euser", "/~user", ""),
    ],
)
def test_path_and_query_decoding(behaviour, target, path, query):
    env = _environ(behaviour, target)
    assert _v(env, "PATH_INFO") == path
    assert _v(env, "QUERY_STRING") == query
    assert _v(env, "REQUEST_URI") == target
    assert _v(env, "RAW_URI") == target


def test_repeated_headers_are_joined(behaviour):
    with behaviour.connect() as conn:
        conn.send(
            b"GET /environ HTTP/1.1\r\nHost: x\r\nX-Multi: a\r\nX-Multi: b\r\n"
            b"Cookie: a=1\r\nCookie: b=2\r\nAccept: text/html\r\naccept: text/plain\r\n\r\n"
        )
        env = json.loads(conn.read_response().body)
    assert _v(env, "HTTP_X_MULTI") == "a,b"
    assert _v(env, "HTTP_COOKIE") == "a=1; b=2"
    assert _v(env, "HTTP_ACCEPT") == "text/html,text/plain"


def test_header_names_with_underscores_are_dropped(behaviour):
    env = _environ(behaviour, headers={"X_Sneaky": "1", "X-Fine": "2"})
    assert "HTTP_X_SNEAKY" not in env
    assert _v(env, "HTTP_X_FINE") == "2"


@pytest.mark.parametrize("workers,threads", [(1, 1), (2, 1), (1, 2)])
def test_multiprocess_and_multithread_flags(start_server, workers, threads):
    server = start_server("behaviour:application", workers=workers, threads=threads)
    env = _environ(server)
    assert _v(env, "wsgi.multiprocess") is (workers > 1)
    assert _v(env, "wsgi.multithread") is (threads > 1)


def test_requests_run_on_named_serving_threads_not_pythons_main_thread(start_server):
    """As under gunicorn's gthread workers, also with one thread: a signal
    handler cannot be set while serving (--timeout is the server's), and
    logging's %(threadName)s names the serving thread."""
    server = start_server("behaviour:application", threads=1)
    got = server.get_json("/thread")
    assert got["name"] == "corral-thread-1" and got["main"] is False, got
    assert "main thread" in got["signal"], got


def test_multiprocess_flag_with_an_adaptive_pool(start_server):
    server = start_server("behaviour:application", "--workers-min", "1", "--workers-max", "3", workers=None)
    assert _v(_environ(server), "wsgi.multiprocess") is True


@pytest.fixture(scope="module")
def mounted(start_module_server):
    return start_module_server("behaviour:application", "--mount", "/prefix", threads=2)


@pytest.mark.parametrize(
    "target,path",
    [("/prefix/foo", "/foo"), ("/prefix/", "/"), ("/prefix", ""), ("/prefix/a/b?q=1", "/a/b")],
)
def test_mount_sets_script_name(mounted, target, path):
    env = _environ(mounted, target)
    assert _v(env, "SCRIPT_NAME") == "/prefix"
    assert _v(env, "PATH_INFO") == path
    assert _v(env, "REQUEST_URI") == target


@pytest.mark.parametrize("target", ["/other/foo", "/prefixed", "/"])
def test_a_path_outside_the_mount_reaches_the_app_whole(mounted, target):
    """As uWSGI's default app: no prefix to take off, so none is given."""
    env = _environ(mounted, target)
    assert _v(env, "SCRIPT_NAME") == ""
    assert _v(env, "PATH_INFO") == target


def test_script_name_from_the_environment(start_server):
    server = start_server("behaviour:application", env={"SCRIPT_NAME": "/fromenv"})
    env = _environ(server, "/fromenv/thing")
    assert _v(env, "SCRIPT_NAME") == "/fromenv"
    assert _v(env, "PATH_INFO") == "/thing"


@pytest.mark.parametrize("how", ["--mount", "SCRIPT_NAME"])
def test_a_non_ascii_mount_is_given_as_latin_1_like_the_path(start_server, how):
    """PEP 3333: SCRIPT_NAME, like PATH_INFO, holds the URL's bytes decoded as
    latin-1, so that an app (Django's get_script_name, Werkzeug's url_for)
    gets back the UTF-8 of "/café" by encoding it to latin-1."""
    if how == "--mount":
        server = start_server("behaviour:application", "--mount", "/café")
    else:
        server = start_server("behaviour:application", env={"SCRIPT_NAME": "/café"})
    env = _environ(server, "/caf%C3%A9/environ")
    assert _v(env, "SCRIPT_NAME") == "/café".encode().decode("latin-1")
    assert _v(env, "PATH_INFO") == "/environ"


BODY = b"line1\nline2\nlonger line three\n\nend"
LINES = [b"line1\n", b"line2\n", b"longer line three\n", b"\n", b"end"]


@pytest.fixture
def input_server(start_server):
    # A server of its own for each wsgi.input test, so that one stuck read cannot hold up the others.
    return start_server("behaviour:application", threads=2)


def _send_body(server, op, framing, size=4):
    target = f"/input?op={op}&size={size}"
    if framing == "length":
        headers, body = {}, BODY
    else:
        headers = {"Transfer-Encoding": "chunked"}
        body = b"".join(
            b"%x\r\n%s\r\n" % (len(BODY[i : i + 7]), BODY[i : i + 7]) for i in range(0, len(BODY), 7)
        )
        body += b"0\r\n\r\n"
    resp = server.request("POST", target, headers, body, timeout=5)
    assert resp.status == 200, (resp.status, resp.body[:2000], server.log[-3000:])
    out = json.loads(resp.body)
    assert out["types"] in (["bytes"], [])
    return [c.encode("latin-1") for c in out["calls"]]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_input_read_all(input_server, framing):
    assert _send_body(input_server, "read", framing) == [BODY, b""]
    assert _send_body(input_server, "read-none", framing) == [BODY]
    assert _send_body(input_server, "read-minus-one", framing) == [BODY]


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("size", [1, 4, 100])
def test_input_read_n(input_server, framing, size):
    calls = _send_body(input_server, "readn", framing, size)
    assert calls[-1] == b""
    assert all(0 < len(c) <= size for c in calls[:-1])
    assert b"".join(calls) == BODY


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_input_readline(input_server, framing):
    assert _send_body(input_server, "readline", framing) == [*LINES, b""]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_input_readline_with_size(input_server, framing):
    calls = _send_body(input_server, "readline-size", framing, 4)
    assert calls[-1] == b""
    assert all(0 < len(c) <= 4 for c in calls[:-1])
    assert b"".join(calls) == BODY
    # A line never continues past its newline.
    for c in calls:
        assert b"\n" not in c[:-1]
    assert calls[:3] == [b"line", b"1\n", b"line"]


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_input_readlines(input_server, framing):
    assert _send_body(input_server, "readlines", framing) == LINES


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_input_iteration(input_server, framing):
    assert _send_body(input_server, "iter", framing) == LINES


@pytest.mark.parametrize("threads", [1, 4])
def test_input_read_on_another_thread_while_start_response_runs(start_server, threads):
    # The reader waits for the slow body with the GIL released but the
    # connection held; start_response must not wait for the connection
    # while holding the GIL, or the two wait for each other for ever.
    server = start_server("behaviour:application", threads=threads)
    size = 200_000
    with server.connect() as conn:
        conn.send(b"POST /input-in-thread HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        conn.send(b"x" * 1000)
        time.sleep(1)
        conn.send(b"x" * (size - 1000))
        resp = conn.read_response()
    assert (resp.status, resp.body) == (200, str(size).encode()), server.log[-3000:]
    assert server.request("GET", "/fixed").status == 200


def test_input_empty_body(input_server):
    resp = input_server.request("GET", "/input?op=read")
    assert json.loads(resp.body)["calls"] == ["", ""]


def test_wsgi_errors_reach_the_log(behaviour):
    marker = f"errors-marker-{uuid.uuid4().hex}"
    mark = behaviour.mark()
    resp = behaviour.request("GET", f"/errors?msg={marker}")
    assert resp.status == 200
    behaviour.wait_for(marker, since=mark)
    behaviour.wait_for(f"{marker} again", since=mark)


def test_wsgi_errors_keeps_a_line_whole_across_flushes_and_answers_as_a_stream(behaviour):
    """A line written a piece at a time, with a flush after each (a progress
    line), is one line of the log, as under gunicorn (each flush cut it);
    and the stream answers what code that uses it as sys.stderr asks
    (isatty, closed and writable raised AttributeError)."""
    mark = behaviour.mark()
    resp = behaviour.request("GET", "/errors-as-a-stream")
    assert resp.status == 200
    assert resp.body == (
        b"isatty=False closed=False writable=True fileno=unsupported bytes=write() argument must be str, not bytes"
    )
    behaviour.wait_for(r"progress: \.\.\. done$", since=mark)
    assert not behaviour.grep(r"progress: $|^\.$", since=mark), behaviour.log


def test_wsgi_errors_flushed_from_a_thread_of_the_apps_is_written_at_once(behaviour):
    """A thread the app started, which may never end its line (it waits for
    good after it), has its text written at its flush (it was held, and
    lost with the worker)."""
    mark = behaviour.mark()
    assert behaviour.request("GET", "/errors-partial-from-a-thread").body == b"started"
    behaviour.wait_for(r"partial line from a thread$", since=mark)


# -- the scheme a proxy reports (--forwarded-allow-ips) ------------------------------


def test_a_local_proxy_sets_the_scheme(behaviour):
    """gunicorn's defaults: a peer on 127.0.0.1 or ::1 may say the client came over
    https with X-Forwarded-Proto, X-Forwarded-Protocol or X-Forwarded-SSL."""
    for header, value, scheme in (
        ("X-Forwarded-Proto", "https", "https"),
        ("X-Forwarded-Proto", "http", "http"),
        ("X-Forwarded-Protocol", "ssl", "https"),
        ("X-Forwarded-SSL", "on", "https"),
        ("X-Forwarded-SSL", "off", "http"),
    ):
        env = _environ(behaviour, headers={header: value})
        assert _v(env, "wsgi.url_scheme") == scheme, (header, value)
        # The field itself still reaches the app.
        assert _v(env, "HTTP_" + header.upper().replace("-", "_")) == value


def test_contradictory_scheme_fields_are_refused(behaviour):
    mark = behaviour.mark()
    with behaviour.connect() as conn:
        conn.send_request(
            "GET", "/environ", {"Host": "x", "X-Forwarded-Proto": "https", "X-Forwarded-SSL": "off"}
        )
        assert conn.read_response().status == 400
    behaviour.wait_for(r"Bad request from 127\.0\.0\.1:\d+: contradictory scheme headers", since=mark)
    assert _v(_environ(behaviour), "wsgi.url_scheme") == "http"


@pytest.mark.parametrize("allow", ["", "10.0.0.0/8,192.0.2.1"])
def test_a_proxy_outside_the_allowed_list_cannot_set_the_scheme(start_server, allow):
    server = start_server("behaviour:application", "--forwarded-allow-ips", allow)
    env = _environ(server, headers={"X-Forwarded-Proto": "https"})
    assert _v(env, "wsgi.url_scheme") == "http"
    assert _v(env, "HTTP_X_FORWARDED_PROTO") == "https"
    # Nor refuse a request for fields it does not weigh.
    env = _environ(server, headers={"X-Forwarded-Proto": "https", "X-Forwarded-SSL": "off"})
    assert _v(env, "wsgi.url_scheme") == "http"


def test_allowed_networks_and_unix_socket_peers_set_the_scheme(start_server, tmp_path):
    server = start_server("behaviour:application", "--forwarded-allow-ips", "127.0.0.0/8")
    assert _v(_environ(server, headers={"X-Forwarded-Proto": "https"}), "wsgi.url_scheme") == "https"
    server = start_server(
        "behaviour:application", "--forwarded-allow-ips", "", http=f"unix:{tmp_path}/http.sock"
    )
    assert _v(_environ(server, headers={"X-Forwarded-Proto": "https"}), "wsgi.url_scheme") == "https"


def test_an_ipv4_mapped_entry_written_for_gunicorn_trusts_the_ipv4_peer(start_server):
    """gunicorn on [::] reports an IPv4 client as ::ffff:a.b.c.d, so its users
    list it that way; corral reports it as a.b.c.d, and the entry still counts."""
    server = start_server("behaviour:application", "--forwarded-allow-ips", "::ffff:127.0.0.1", http="[::]:0")
    server.host = "127.0.0.1"  # an IPv4 client of the dual-stack listener
    env = _environ(server, headers={"X-Forwarded-Proto": "https"})
    assert _v(env, "REMOTE_ADDR") == "127.0.0.1"
    assert _v(env, "wsgi.url_scheme") == "https"


def test_a_trusted_proxys_script_name_field_mounts_the_app_as_under_gunicorn(start_server):
    """nginx's `proxy_set_header SCRIPT_NAME /prefix`: from a peer in
    --forwarded-allow-ips, the field is SCRIPT_NAME and comes off PATH_INFO
    (gunicorn's forwarder_headers); from any other it is dropped with every
    name holding `_`. It used to be dropped from all."""
    trusting = start_server("behaviour:application")
    env = _environ(trusting, "/prefix/environ?q=1", headers={"SCRIPT_NAME": "/prefix/"})
    assert (_v(env, "SCRIPT_NAME"), _v(env, "PATH_INFO")) == ("/prefix", "/environ")
    assert _v(env, "QUERY_STRING") == "q=1"
    assert "HTTP_SCRIPT_NAME" not in env
    # A path without the prefix keeps it whole.
    env = _environ(trusting, "/environ", headers={"script_name": "/prefix"})
    assert (_v(env, "SCRIPT_NAME"), _v(env, "PATH_INFO")) == ("/prefix", "/environ")
    wary = start_server("behaviour:application", "--forwarded-allow-ips", "10.9.9.9")
    env = _environ(wary, "/environ", headers={"SCRIPT_NAME": "/prefix"})
    assert (_v(env, "SCRIPT_NAME"), _v(env, "PATH_INFO")) == ("", "/environ")
    assert "HTTP_SCRIPT_NAME" not in env


def test_the_forwarded_allow_ips_variable_is_the_default_as_in_gunicorn(start_server):
    """A container set up for gunicorn trusts its proxy through FORWARDED_ALLOW_IPS."""
    server = start_server("behaviour:application", env={"FORWARDED_ALLOW_IPS": "10.9.9.9"})
    assert _v(_environ(server, headers={"X-Forwarded-Proto": "https"}), "wsgi.url_scheme") == "http"
    server = start_server(
        "behaviour:application", "--forwarded-allow-ips", "127.0.0.1", env={"FORWARDED_ALLOW_IPS": ""}
    )
    assert _v(_environ(server, headers={"X-Forwarded-Proto": "https"}), "wsgi.url_scheme") == "https"


def test_gunicorns_empty_secure_scheme_headers_trust_no_peer(start_server, tmp_path):
    """`secure_scheme_headers = {}` makes no header count, from any peer, a
    unix socket's too; its forwarded_allow_ips is moot then."""
    cfg = tmp_path / "gunicorn.conf.py"
    cfg.write_text("forwarded_allow_ips = '*'\nsecure_scheme_headers = {}\n")
    for http in ("127.0.0.1:0", f"unix:{tmp_path}/http.sock"):
        server = start_server("behaviour:application", "-c", str(cfg), http=http)
        env = _environ(server, headers={"X-Forwarded-Proto": "https"})
        assert _v(env, "wsgi.url_scheme") == "http"
        assert _v(env, "HTTP_X_FORWARDED_PROTO") == "https"


def test_flask_builds_https_urls_behind_a_local_tls_proxy(start_server):
    server = start_server("flask_app:app")
    with server.connect() as conn:
        conn.send_request("GET", "/where", {"Host": "shop.example", "X-Forwarded-Proto": "https"})
        got = json.loads(conn.read_response().body)
    assert got == {"scheme": "https", "index": "https://shop.example/"}


@pytest.mark.parametrize(
    ("headers", "name", "port"),
    [
        ({"Host": "example.com:8080"}, "example.com", "8080"),
        ({"Host": "example.com"}, "example.com", "80"),
        ({"Host": "example.com", "X-Forwarded-Proto": "https"}, "example.com", "443"),
        ({"Host": "[::1]:8443"}, "[::1]", "8443"),
    ],
)
def test_a_unix_socket_takes_server_name_and_port_from_host(start_server, tmp_path, headers, name, port):
    """A unix socket has no name or port a URL could use, and PEP 3333 wants
    both non-empty: they come from the Host the client asked for, as under
    gunicorn (Django's CSRF Referer check compares against them)."""
    server = start_server("behaviour:application", http=f"unix:{tmp_path}/http.sock")
    env = _environ(server, headers=headers)
    assert (_v(env, "SERVER_NAME"), _v(env, "SERVER_PORT")) == (name, port)


@pytest.mark.parametrize(
    "method,target,path",
    [
        ("GET", "http://example.test", "/"),
        ("GET", "http://example.test?q=1", "/"),
        ("OPTIONS", "http://example.test", "*"),
        ("OPTIONS", "*", "*"),
    ],
)
def test_an_absolute_form_target_without_a_path_names_the_root(start_module_server, method, target, path):
    """RFC 9112 3.2.4: `http://a` is `/`, and for OPTIONS `*`, as `OPTIONS *`
    (a PATH_INFO of "" would be the mount point's own URL)."""
    server = start_module_server("echo_app:application")
    with server.connect() as conn:
        conn.send_request(method, target, {"Host": "example.test"})
        resp = conn.read_response()
    assert resp.status == 200, resp
    env = json.loads(resp.body)
    assert env["path"] == path
    assert env["headers"]["HTTP_HOST"] == "example.test"
