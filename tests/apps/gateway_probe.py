"""The behaviour app (apps/behaviour.py) plus endpoints for large bodies:

- /big?size=N&piece=K&seed=S[&cl=1]: N pseudo-random bytes yielded in pieces
  of K, their sha256 in X-Sha256 (and a Content-Length with cl=1).
- /read-then/<path>: reads wsgi.input to its end, then answers as <path> would.
- /sha: reads wsgi.input to its end and answers its length and sha256 as JSON,
  with the largest single read and wsgi.input_terminated.
- /status-header: a 200 that also sets a "Status: 404 Not Found" header.
- /short-body: declares Content-Length 100 and sends 11 bytes.
- /not-modified-then-raise: a 304 whose iterable yields, then raises.
- /write-in-close: a whole response whose iterable's close() calls write().

Every other path goes to the behaviour app.
"""

import hashlib
import json
import random
from urllib.parse import parse_qs

from behaviour import application as behaviour_app


def _query(environ):
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def big(environ, start_response):
    q = _query(environ)
    size, piece = int(q.get("size", "1048576")), int(q.get("piece", "65536"))
    data = random.Random(int(q.get("seed", "1"))).randbytes(size)
    headers = [("Content-Type", "application/octet-stream"), ("X-Sha256", hashlib.sha256(data).hexdigest())]
    if q.get("cl") == "1":
        headers.append(("Content-Length", str(size)))
    start_response("200 OK", headers)
    view = memoryview(data)
    return (bytes(view[i : i + piece]) for i in range(0, size, piece))


def sha(environ, start_response):
    stream = environ["wsgi.input"]
    digest, length, largest = hashlib.sha256(), 0, 0
    while True:
        data = stream.read(65536)
        if not data:
            break
        digest.update(data)
        length += len(data)
        largest = max(largest, len(data))
    body = json.dumps(
        {
            "length": length,
            "sha256": digest.hexdigest(),
            "largest_read": largest,
            "input_terminated": environ.get("wsgi.input_terminated"),
            "content_length": environ.get("CONTENT_LENGTH"),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def status_header(environ, start_response):
    start_response("200 OK", [("Status", "404 Not Found"), ("Content-Type", "text/plain")])
    return [b"body\n"]


def short_body(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
    return [b"0123456789\n"]


def not_modified_then_raise(environ, start_response):
    start_response("304 Not Modified", [])

    def body():
        yield b"x"
        raise ValueError("after a whole 304")

    return body()


def write_in_close(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])

    class Body:
        def __iter__(self):
            yield b"whole"

        def close(self):
            write(b"late")

    return Body()


ROUTES = {
    "/write-in-close": write_in_close,
    "/big": big,
    "/sha": sha,
    "/status-header": status_header,
    "/short-body": short_body,
    "/not-modified-then-raise": not_modified_then_raise,
}


def mutate_environ(environ, start_response):
    """Changes its environ every way an app can; no later request may see it."""
    environ["HTTP_USER_AGENT"] = "changed"
    environ["PROBE_ADDED"] = "added"
    del environ["QUERY_STRING"]
    environ.pop("HTTP_COOKIE", None)
    environ["wsgi.url_scheme"] = "gopher"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"mutated"]


ROUTES["/mutate-environ"] = mutate_environ


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith("/read-then/"):
        while environ["wsgi.input"].read(65536):
            pass
        environ["PATH_INFO"] = path[len("/read-then") :]
    app = ROUTES.get(environ.get("PATH_INFO", ""), behaviour_app)
    return app(environ, start_response)
