"""A thread started at import ends the process a moment after the worker
became ready, as a failing background task of the app might."""

import os
import threading
import time


def _end_soon():
    time.sleep(0.3)
    os._exit(1)


threading.Thread(target=_end_soon, daemon=True).start()


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"alive\n"]
