"""An app whose import sets a Python handler for SIGALRM (a timeout helper
built on signal.alarm), and Python's own SIGINT handler stays."""

import signal


def _on_alarm(signum, frame):
    raise TimeoutError


signal.signal(signal.SIGALRM, _on_alarm)


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
