"""``corral signal NAME PIDFILE``: sends a running master one of the signals
it acts on, found by its ``--pidfile`` (what ``uwsgi --reload PIDFILE`` and
``kill -HUP $(cat PIDFILE)`` do, with the name checked first)."""

import os
import signal
import sys

#: The signals a master acts on, and what each one does.
ACTIONS = {
    "HUP": "zero-downtime reload",
    "TERM": "graceful stop",
    "INT": "graceful stop (quick with --sigint quick)",
    "QUIT": "quick stop",
    "USR1": "reopen the log files",
    "USR2": "re-execute the master in place",
    "TTIN": "one worker more",
    "TTOU": "one worker fewer",
}


def _fail(message: str, code: int = 1) -> int:
    print(f"corral signal: {message}", file=sys.stderr)
    return code


def _is_corral(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"corral" in f.read()
    except OSError:
        return False


def signal_main(name: str, pidfile: str) -> int:
    key = name.upper().removeprefix("SIG")
    if key not in ACTIONS:
        known = ", ".join(f"{k} ({v})" for k, v in ACTIONS.items())
        return _fail(f"unknown signal name {name!r}; one of: {known}", 2)
    try:
        with open(pidfile) as f:
            text = f.read().strip()
    except OSError as e:
        return _fail(f"cannot read the pid file {pidfile}: {e.strerror}")
    if not text.isdigit() or int(text) <= 1:
        return _fail(f"{pidfile} does not hold a process id: {text[:40]!r}")
    pid = int(text)
    if os.path.exists(f"/proc/{pid}") and not _is_corral(pid):
        # A stale file: the system gave its pid to another program.
        return _fail(f"process {pid} (from {pidfile}) is not corral: the pid file is stale")
    try:
        os.kill(pid, getattr(signal, f"SIG{key}"))
    except ProcessLookupError:
        return _fail(f"no process {pid} (from {pidfile}): is corral running?")
    except PermissionError:
        return _fail(f"not allowed to signal process {pid} (from {pidfile})")
    print(f"sent SIG{key} ({ACTIONS[key]}) to {pid}")
    return 0
