"""Says which host and which code version answered, as "HOST VERSION".

HOST_NAME comes from the environment (corral --env); the version from the
VERSION file in the working directory (corral --chdir), read when the module
is imported, so a worker started by a reload or a restart answers with the
file's new content and an old worker with the old one.

`?delay=SECS` sleeps before answering (a request that is in flight for a
while); `?tag=NAME` first logs "request NAME started" to wsgi.errors, so a
test can tell from the server's log that (and where) a request is in flight. `/orphan` starts a shell that backgrounds a `sleep` and exits at once,
leaving the sleep to be adopted by the nearest reaper (in a container: PID 1)
and answers with the sleep's pid as seen by the app. `/host` answers with
HTTP_HOST, the Host the app sees.
"""

import os
import pathlib
import subprocess
import time
from urllib.parse import parse_qs

HOST = os.environ.get("HOST_NAME", "?")
_version_file = pathlib.Path("VERSION")
VERSION = _version_file.read_text().strip() if _version_file.exists() else "0"


def _text(start_response, body, status="200 OK"):
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def application(environ, start_response):
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if environ.get("PATH_INFO") == "/orphan":
        secs = float(query.get("secs", "1"))
        out = subprocess.run(
            ["/bin/sh", "-c", f"sleep {secs} >/dev/null 2>&1 & echo $!"],
            capture_output=True,
            text=True,
            check=True,
        )
        return _text(start_response, out.stdout.strip())
    if environ.get("PATH_INFO") == "/host":
        return _text(start_response, environ.get("HTTP_HOST", "-"))
    if "tag" in query:
        environ["wsgi.errors"].write(f"request {query['tag']} started\n")
        environ["wsgi.errors"].flush()
    if "delay" in query:
        time.sleep(float(query["delay"]))
    return _text(start_response, f"{HOST} {VERSION}")
