"""Announces every import on stderr, so tests can count them (and see in which process)."""

import os

# One write(2), so the lines of two workers importing at once never interleave
# (print() writes the text and the newline separately).
os.write(2, f"preload_app imported in pid={os.getpid()}\n".encode())


def application(environ, start_response):
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
