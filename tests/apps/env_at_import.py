"""An app whose import takes a secret out of the environment (so that
programs it runs do not see it) and puts a directory before APP_TEST_PATH,
as apps do at import."""

import os

SECRET = os.environ.pop("APP_TEST_SECRET")
os.environ["APP_TEST_PATH"] = "/opt/app/bin:" + os.environ.get("APP_TEST_PATH", "")


def application(environ, start_response):
    body = f"{SECRET} {os.environ['APP_TEST_PATH']} {os.environ.get('APP_TEST_SECRET')}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
