"""A small WSGI app to try corral with: shows the request and echoes a form."""

import html
import os
from urllib.parse import parse_qs

PAGE = """<!doctype html>
<title>corral demo</title>
<h1>corral demo</h1>
<p>Served by worker pid {pid}.</p>
<table>
<tr><th>method</th><td>{method}</td></tr>
<tr><th>path</th><td>{path}</td></tr>
<tr><th>query</th><td>{query}</td></tr>
</table>
<form method="post"><input name="message" placeholder="say something"><button>Send</button></form>
<p>{echo}</p>
"""


def app(environ, start_response):
    echo = ""
    if environ["REQUEST_METHOD"] == "POST":
        form = parse_qs(environ["wsgi.input"].read().decode("utf-8", "replace"))
        echo = "You said: " + html.escape(form.get("message", [""])[0])
    body = PAGE.format(
        pid=os.getpid(),
        method=html.escape(environ["REQUEST_METHOD"]),
        path=html.escape(environ["PATH_INFO"]),
        query=html.escape(environ["QUERY_STRING"]),
        echo=echo,
    ).encode("utf-8")
    start_response(
        "200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return [body]
