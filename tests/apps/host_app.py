"""Says which host and which code version answered: HOST_NAME comes from the
environment (corral --env), the version from a VERSION file beside the app's
working directory, read at import (so a reload picks up a new one)."""

import os
import pathlib

HOST = os.environ.get("HOST_NAME", "?")
VERSION = pathlib.Path("VERSION").read_text().strip() if pathlib.Path("VERSION").exists() else "0"


def application(environ, start_response):
    body = f"{HOST} {VERSION}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
