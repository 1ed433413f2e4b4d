"""An app that sets its own SIGTERM and SIGUSR1 handlers at import, as some
libraries do; /got says which signals its handlers saw."""

import json
import signal

GOT = []


def _handler(signum, frame):
    GOT.append(signum)


signal.signal(signal.SIGTERM, _handler)
signal.signal(signal.SIGUSR1, _handler)


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(GOT).encode()]
