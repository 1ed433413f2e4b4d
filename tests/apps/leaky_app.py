"""An app that leaks memory on purpose: each request keeps 4 MiB forever."""

import os

_kept = []


def application(environ, start_response):
    _kept.append(bytearray(4 << 20))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
