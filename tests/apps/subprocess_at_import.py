"""An app whose import starts a thread that runs failing commands one after
another and writes each exit status to CORRAL_TEST_STATUS_FILE (with
--preload, in the master, as an app's background job would)."""

import os
import subprocess
import threading


def _run():
    with open(os.environ["CORRAL_TEST_STATUS_FILE"], "a") as out:
        for _ in range(20):
            rc = subprocess.run(["sh", "-c", "sleep 0.1; exit 3"], check=False).returncode
            out.write(f"{rc}\n")
            out.flush()


threading.Thread(target=_run, daemon=True).start()


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
