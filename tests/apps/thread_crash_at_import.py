"""An app whose import starts a thread that crashes in C code holding the
GIL while the import still runs (a C extension's thread failing at
start-up)."""

import ctypes
import threading
import time


def _crash():
    time.sleep(0.2)
    ctypes.string_at(0)


threading.Thread(target=_crash, daemon=True).start()
time.sleep(2)


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
