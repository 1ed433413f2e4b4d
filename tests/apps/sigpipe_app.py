"""An app that sets SIGPIPE back to its default at import, as command-line
tools do, and, loaded in the master with --preload, sets its own SIGTERM
handler and starts a thread of its own (which, not blocking the master's
signals, is where the kernel delivers them)."""

import os
import signal
import threading
import time

signal.signal(signal.SIGPIPE, signal.SIG_DFL)
if os.environ.get("SIGPIPE_APP_TERM"):
    signal.signal(signal.SIGTERM, lambda *a: None)
    threading.Thread(target=time.sleep, args=(3600,), daemon=True, name="app-thread").start()


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/slow":
        time.sleep(1.5)
        return [f"slow {os.getpid()}".encode()]

    def stream():
        for _ in range(200):
            time.sleep(0.02)
            yield b"x" * 1000 + b"\n"

    return stream()
