"""An application whose import takes CORRAL_TEST_IMPORT_SECS seconds (a module
that waits on a database or a lock at import time)."""

import os
import signal
import time

if os.environ.get("CORRAL_TEST_BLOCK_ABRT"):
    # As C code that masks signals while it waits would.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGABRT})
if os.environ.get("CORRAL_TEST_IMPORT_MARK"):
    # Says that the import has begun.
    open(os.environ["CORRAL_TEST_IMPORT_MARK"], "w").close()
time.sleep(float(os.environ.get("CORRAL_TEST_IMPORT_SECS", "0")))


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
