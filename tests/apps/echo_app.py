"""Answers every request with its environ as JSON, for the conformance vectors.

The body is whatever wsgi.input gave, base64-encoded. Errors reading the body
(a malformed chunked body, say) propagate, so the server has to answer them.
"""

import base64
import json


def application(environ, start_response):
    body = environ["wsgi.input"].read()
    out = {
        "method": environ["REQUEST_METHOD"],
        "path": environ["PATH_INFO"],
        "query": environ["QUERY_STRING"],
        "script_name": environ["SCRIPT_NAME"],
        "content_length": environ.get("CONTENT_LENGTH"),
        "content_type": environ.get("CONTENT_TYPE"),
        "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
        "body": base64.b64encode(body).decode("ascii"),
    }
    data = json.dumps(out).encode("utf-8")
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
