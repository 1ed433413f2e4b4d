"""An app whose import starts a thread that runs failing commands one after
another, once CORRAL_TEST_STATUS_FILE.go exists, and writes each exit
status to CORRAL_TEST_STATUS_FILE (with --preload, in the master, as an
app's background job would)."""

import os
import subprocess
import threading
import time


def _run():
    # Not while the master forks its workers: a worker forked during a
    # subprocess.run holds a copy of the pipe the parent reads the child's
    # exec error from, and that read waits for the worker to exit.
    path = os.environ["CORRAL_TEST_STATUS_FILE"]
    while not os.path.exists(path + ".go"):
        time.sleep(0.02)
    with open(path, "a") as out:
        for _ in range(20):
            rc = subprocess.run(["sh", "-c", "sleep 0.1; exit 3"], check=False).returncode
            out.write(f"{rc}\n")
            out.flush()


threading.Thread(target=_run, daemon=True).start()


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
