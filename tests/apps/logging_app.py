"""An app that configures Python's logging as users do and logs per request."""

import logging
import sys

logging.basicConfig(
    stream=sys.stderr, level=logging.INFO, format="APPLOG %(levelname)s %(name)s: %(message)s"
)
log = logging.getLogger("myapp")


def application(environ, start_response):
    log.info("handling %s", environ["PATH_INFO"])
    log.warning("a warning with %d args", 1)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
