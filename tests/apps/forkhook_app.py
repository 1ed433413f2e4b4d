"""Registers an after-fork hook at import, as apps preloaded in a master do to
reconnect or reseed in each worker; the hook records, in the directory
$FORKHOOK_DIR, the worker's pid, its first random number and the signals
blocked while the hook runs (a program it starts inherits that mask)."""

import os
import random
from pathlib import Path


def _after_fork():
    # random's own hook ran first (registered when random was imported), so
    # this draws from the worker's reseeded generator.
    path = Path(os.environ["FORKHOOK_DIR"]) / str(os.getpid())
    status = Path("/proc/self/status").read_text()
    blocked = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:"))
    path.write_text(f"{random.getrandbits(64)} {blocked}")


os.register_at_fork(after_in_child=_after_fork)


def application(environ, start_response):
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
