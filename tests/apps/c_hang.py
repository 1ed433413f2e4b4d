"""An app whose /hang endpoint blocks inside C code while holding the GIL.

ctypes.PyDLL calls keep the GIL (unlike ctypes.CDLL), so libc's sleep()
here stops every Python thread of the worker: only something outside
Python can notice the request is stuck.
"""

import ctypes
import os
import sys
from urllib.parse import parse_qs

_libc = ctypes.PyDLL(None)


def hold_the_gil_in_c(seconds):
    _libc.sleep(seconds)


def application(environ, start_response):
    if environ["PATH_INFO"] == "/hang":
        hold_the_gil_in_c(60)
    if environ["PATH_INFO"] == "/hold":
        secs = int(parse_qs(environ["QUERY_STRING"])["secs"][0])
        print(f"holding the GIL in pid {os.getpid()}", file=sys.stderr, flush=True)
        hold_the_gil_in_c(secs)
        print(f"hold done in pid {os.getpid()}", file=sys.stderr, flush=True)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
