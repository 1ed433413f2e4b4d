"""Starts a helper program while it is imported, as apps with schedulers or
exporters do, and appends its pid to the file named by CORRAL_TEST_HELPERS."""

import os
import subprocess

_helper = subprocess.Popen(["sleep", "300"])
with open(os.environ["CORRAL_TEST_HELPERS"], "a") as f:
    f.write(f"{_helper.pid}\n")


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
