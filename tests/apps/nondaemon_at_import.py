"""An app whose import starts a thread that is not a daemon and never ends
(a scheduler's loop): with --preload, in the master."""

import threading
import time


def _loop():
    while True:
        time.sleep(0.05)


threading.Thread(target=_loop, name="scheduler").start()


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
