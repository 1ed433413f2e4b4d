"""An application whose import takes CORRAL_TEST_IMPORT_SECS seconds (a module
that waits on a database or a lock at import time)."""

import os
import time

time.sleep(float(os.environ.get("CORRAL_TEST_IMPORT_SECS", "0")))


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
