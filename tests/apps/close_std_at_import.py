"""An app whose import closes descriptors 0, 1 and 2, as a library that
daemonizes the process would; each request prints a line."""

import os

for fd in (0, 1, 2):
    os.close(fd)


def application(environ, start_response):
    print("hello from the app")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
    return [b"printed"]
