"""Announces every import on stderr, so tests can count them (and see in which process)."""

import os
import sys

print(f"preload_app imported in pid={os.getpid()}", file=sys.stderr, flush=True)


def application(environ, start_response):
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
