"""The app the front-end tests reach through nginx, Apache, HAProxy and cgi-fcgi.

/environ   the environ's str values (and wsgi.url_scheme) as JSON
/upload    reads wsgi.input to its end: {"length": n, "sha256": hex}
/download  ?mib=N: N MiB of a fixed pattern, with Content-Length, produced in chunks
/stream    a generator without Content-Length
/form      an urlencoded POST, parsed, echoed as JSON
/plain     a body in one piece, without Content-Length
/sleep     ?secs=N: answers after N seconds
"""

import hashlib
import json
import time
from urllib.parse import parse_qs

PATTERN = bytes(range(256)) * 4096  # 1 MiB


def _json(start_response, obj, status="200 OK"):
    body = json.dumps(obj).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _fails_midway():
    yield b"first part\n" * 100
    raise RuntimeError("failed in the middle of the body")


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path.endswith("/environ"):
        env = {k: v for k, v in environ.items() if isinstance(v, str)}
        return _json(start_response, env)
    if path.endswith("/upload"):
        h = hashlib.sha256()
        n = 0
        while chunk := environ["wsgi.input"].read(65536):
            h.update(chunk)
            n += len(chunk)
        return _json(start_response, {"length": n, "sha256": h.hexdigest()})
    if path.endswith("/download"):
        mib = int(parse_qs(environ.get("QUERY_STRING", "")).get("mib", ["1"])[0])
        start_response(
            "200 OK",
            [("Content-Type", "application/octet-stream"), ("Content-Length", str(mib * len(PATTERN)))],
        )
        return (PATTERN for _ in range(mib))
    if path.endswith("/stream"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (f"line {i}\n".encode() for i in range(100))
    if path.endswith("/form"):
        size = int(environ.get("CONTENT_LENGTH") or 0)
        form = parse_qs(environ["wsgi.input"].read(size).decode())
        return _json(start_response, {k: v for k, v in form.items()})
    if path.endswith("/fails-midway"):
        # A body cut by the app's failure after it began.
        headers = [("Content-Type", "text/plain")]
        if "cl=1" in environ.get("QUERY_STRING", ""):
            headers.append(("Content-Length", "100000"))
        start_response("200 OK", headers)
        return _fails_midway()
    if path.endswith("/sleep"):
        time.sleep(float(parse_qs(environ.get("QUERY_STRING", "")).get("secs", ["1"])[0]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slept\n"]
    if path.endswith("/plain"):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"one piece, no length given\n"]
    return _json(start_response, {"error": "not found", "path": path}, "404 Not Found")
