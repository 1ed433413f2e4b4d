"""An app that starts a thread when it is imported, as metrics exporters,
schedulers and telemetry batchers do: with --preload, in the master."""

import os
import threading
import time


def _tick():
    while True:
        time.sleep(0.05)


threading.Thread(target=_tick, daemon=True, name="ticker").start()


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
