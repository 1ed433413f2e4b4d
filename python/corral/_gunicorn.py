"""What gunicorn's server hooks are given when corral runs them.

A gunicorn configuration file's hooks (`post_fork(server, worker)`,
`pre_request(worker, req)`...) take gunicorn's own objects. corral builds
these in their place, with the attributes hooks use: `server.log` and
`worker.log` write to corral's error log, `worker.pid` and `worker.age` name
the worker, `req.method` and `req.path` the request, `resp.status` the
response. An attribute gunicorn has and these lack raises AttributeError in
the hook, which corral logs with the hook's name.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from http import HTTPStatus
from urllib.parse import quote, urlsplit

from corral._corral import _log


class Log:
    """gunicorn's logger, as hooks call it: `log.info("spawned %s", pid)`."""

    def _emit(self, level: str, msg, args) -> None:
        text = str(msg)
        if args:
            try:
                text = text % args
            except (TypeError, ValueError):
                text = f"{text} {args!r}"
        _log(level, text)

    def critical(self, msg, *args, **kwargs) -> None:
        self._emit("error", msg, args)

    def error(self, msg, *args, **kwargs) -> None:
        self._emit("error", msg, args)

    def warning(self, msg, *args, **kwargs) -> None:
        self._emit("warning", msg, args)

    warn = warning

    def info(self, msg, *args, **kwargs) -> None:
        self._emit("info", msg, args)

    def debug(self, msg, *args, **kwargs) -> None:
        self._emit("debug", msg, args)

    def exception(self, msg, *args, **kwargs) -> None:
        self._emit("error", msg, args)
        if sys.exc_info()[0] is not None:
            _log("error", traceback.format_exc().rstrip("\n"))

    def log(self, level: int, msg, *args, **kwargs) -> None:
        # The numeric levels of the logging module.
        name = "error" if level >= 40 else "warning" if level >= 30 else "info" if level >= 20 else "debug"
        self._emit(name, msg, args)


LOG = Log()


class Server:
    """gunicorn's `server` (its arbiter): the master."""

    def __init__(self, pid: int, num_workers: int, proc_name: str):
        self.pid = pid
        self.num_workers = num_workers
        self.proc_name = proc_name
        self.log = LOG

    def __repr__(self) -> str:
        return f"<corral master pid={self.pid}>"


class Worker:
    """gunicorn's `worker`: one worker process.

    `age` counts the workers this master has started (the first is 1), as
    gunicorn's does; `slot` is the worker's number in corral's log lines.
    """

    def __init__(
        self,
        pid: int,
        ppid: int,
        age: int,
        slot: int,
        booted: bool,
        alive: bool,
        max_requests: int,
        timeout: int,
    ):
        self.pid = pid
        self.ppid = ppid
        self.age = age
        self.slot = slot
        self.booted = booted
        self.alive = alive
        self.aborted = False
        self.max_requests = max_requests
        self.timeout = timeout
        self.log = LOG

    def __repr__(self) -> str:
        return f"<corral worker {self.slot} pid={self.pid}>"


class Request:
    """gunicorn's `req`, made from the request's environ."""

    def __init__(self, environ: dict):
        self.method = environ.get("REQUEST_METHOD", "")
        self.query = environ.get("QUERY_STRING", "")
        self.fragment = ""
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if raw:
            # gunicorn's path is the target's, as sent (still percent-encoded).
            self.uri = raw
            parts = _split_target(raw)
            self.path = parts.path
            self.fragment = parts.fragment
        else:
            # A front end that sent no REQUEST_URI: the path its environ stands for.
            decoded = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
            try:
                self.path = quote(decoded.encode("latin-1"))
            except UnicodeEncodeError:
                self.path = quote(decoded)
            self.uri = self.path + ("?" + self.query if self.query else "")
        protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.0")
        try:
            major, minor = protocol.split("/", 1)[1].split(".", 1)
            self.version = (int(major), int(minor))
        except (IndexError, ValueError):
            self.version = (1, 0)
        self.scheme = environ.get("wsgi.url_scheme", "http")
        self.headers = [
            (key[5:].replace("_", "-"), value) for key, value in environ.items() if key.startswith("HTTP_")
        ]
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                self.headers.append((key.replace("_", "-"), environ[key]))
        self.remote_addr = environ.get("REMOTE_ADDR", "")
        self.peer_addr = (self.remote_addr, environ.get("REMOTE_PORT", ""))

    def __repr__(self) -> str:
        return f"<corral request {self.method} {self.uri}>"


def _split_target(target: str):
    # As gunicorn's util.split_request_uri: a path that starts with // is a
    # path, not a scheme-relative URL naming a host.
    if target.startswith("//"):
        parts = urlsplit("." + target)
        return parts._replace(path=parts.path[1:])
    return urlsplit(target)


def arity(hook) -> int | None:
    """The positional parameters of a hook, as gunicorn's util.get_arity
    counts them; None if its signature cannot be read (some builtins)."""
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in signature.parameters.values() if p.kind in kinds)


def post_request_of(hook, n: int):
    """A `post_request` hook of 2 or 3 parameters called as one of 4, as
    gunicorn's validate_post_request wraps it."""
    if n == 3:
        return lambda worker, req, environ, resp: hook(worker, req, environ)
    return lambda worker, req, environ, resp: hook(worker, req)


class Response:
    """gunicorn's `resp`: what the app answered, for `post_request`.

    `start_response` is what the app is given in place of the server's, so
    that the status and headers are known here.
    """

    def __init__(self, start_response):
        self._start_response = start_response
        self.status = None
        self.status_code = None
        self.headers = []
        self.response_length = None
        self.sent = 0
        self.version = (1, 1)

    def start_response(self, status, headers, exc_info=None):
        write = self._start_response(status, headers, exc_info)
        self.status = status
        try:
            self.status_code = int(str(status).split(None, 1)[0])
        except (IndexError, ValueError):
            self.status_code = None
        self.headers = list(headers)
        for name, value in self.headers:
            if str(name).lower() == "content-length":
                try:
                    self.response_length = int(value)
                except (TypeError, ValueError):
                    pass
        return write

    def _answered(self, code: int, sent: int) -> None:
        """What went out: the server's own status when it answered in the app's
        place (500 after an exception)."""
        self.sent = sent
        if code and code != self.status_code:
            self.status_code = code
            try:
                self.status = f"{code} {HTTPStatus(code).phrase}"
            except ValueError:
                self.status = str(code)

    def __repr__(self) -> str:
        return f"<corral response {self.status}>"
