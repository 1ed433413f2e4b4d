"""An application whose first worker imports it at once and whose later
workers wait in the import until the file `release` exists in
CORRAL_TEST_GATE_DIR (a worker of a growing pool still loading). Each
response names the worker's pid, after sleeping ?secs."""

import os
import time
from urllib.parse import parse_qs

_gate = os.environ["CORRAL_TEST_GATE_DIR"]
try:
    os.close(os.open(os.path.join(_gate, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
except FileExistsError:
    _deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(_gate, "release")) and time.monotonic() < _deadline:
        time.sleep(0.02)


def application(environ, start_response):
    secs = float(parse_qs(environ.get("QUERY_STRING", "")).get("secs", ["0"])[0])
    time.sleep(secs)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
