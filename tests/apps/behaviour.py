"""One WSGI app with an endpoint per behaviour the tests drive, chosen by PATH_INFO.

Well-behaved endpoints run inside wsgiref.validate.validator, with its warnings
turned into errors, so a server that breaks PEP 3333 turns them into 500s. The
endpoints that misbehave on purpose (bad headers, exceptions, short bodies,
file wrappers, which the validator would hide behind its own iterator) are not
wrapped.

When a response iterable of /closing is closed, a line "<id>" is appended to
the file named by the CORRAL_TEST_MARKERS environment variable, when set.
"""

import gzip
import io
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from urllib.parse import parse_qs
from wsgiref.validate import WSGIWarning, validator

warnings.simplefilter("error", WSGIWarning)

TEXT = [("Content-Type", "text/plain")]


def _query(environ):
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}


def _ok(start_response, body, headers=TEXT, status="200 OK"):
    if isinstance(body, str):
        body = body.encode("utf-8")
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]


def _json(start_response, obj, status="200 OK"):
    return _ok(start_response, json.dumps(obj), [("Content-Type", "application/json")], status)


def _read_all(stream, size=8192):
    """Reads wsgi.input to its end with read(size) calls only (what the validator allows)."""
    parts = []
    while True:
        data = stream.read(size)
        if not data:
            return b"".join(parts)
        parts.append(data)


def _describe(value):
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, tuple):
        return list(value)
    return None


# -- well-behaved endpoints (validated) -----------------------------------------


def environ_dump(environ, start_response):
    out = {k: {"type": type(v).__name__, "value": _describe(v)} for k, v in environ.items()}
    out["_input_methods"] = [
        m for m in ("read", "readline", "readlines", "__iter__") if hasattr(environ["wsgi.input"], m)
    ]
    out["_errors_methods"] = [
        m for m in ("write", "writelines", "flush") if hasattr(environ["wsgi.errors"], m)
    ]
    out["_body"] = _read_all(environ["wsgi.input"]).decode("latin-1")
    return _json(start_response, out)


def echo(environ, start_response):
    """Echoes the request body."""
    return _ok(
        start_response, _read_all(environ["wsgi.input"]), [("Content-Type", "application/octet-stream")]
    )


def ignore_body(environ, start_response):
    """Answers without touching wsgi.input."""
    return _ok(start_response, "ignored")


def fixed(environ, start_response):
    return _ok(start_response, "hello world")


def deep(environ, start_response):
    """json.dumps of a list nested ?depth= deep: C recursion, as much stack as a
    Python thread has (the recursion limit is raised for this call)."""
    depth = int(_query(environ).get("depth", "20000"))
    nested = []
    for _ in range(depth):
        nested = [nested]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 1000)
    try:
        text = json.dumps(nested)
    finally:
        sys.setrecursionlimit(limit)
    return _ok(start_response, f"{len(text)} bytes")


def background(environ, start_response):
    """Starts a thread (not a daemon) that writes ?marker= after ?secs=, and answers at once."""
    q = _query(environ)

    def later():
        time.sleep(float(q.get("secs", "1")))
        with open(q["marker"], "w") as f:
            f.write("done")

    # Said outright: a thread started from a serving thread (a thread Python did
    # not start) would be a daemon by default, as under uWSGI's threads.
    threading.Thread(target=later, name="app-background", daemon=False).start()
    return _ok(start_response, "started")


def stream(environ, start_response):
    """A body of n pieces and no Content-Length."""
    n = int(_query(environ).get("n", "3"))
    start_response("200 OK", TEXT)
    return (f"chunk{i}\n".encode() for i in range(n))


def status(environ, start_response):
    """Answers with ?s= as the status, ?body= as the body (one piece), and a
    Content-Length of ?cl= and a Date of ?date= when given."""
    q = _query(environ)
    headers = [("Content-Type", "text/plain")]
    if "cl" in q:
        headers.append(("Content-Length", q["cl"]))
    if "date" in q:
        headers.append(("date", q["date"]))
    start_response(q.get("s", "200 OK"), headers)
    return [q.get("body", "").encode()]


def errors_as_a_stream(environ, start_response):
    """Uses wsgi.errors as code that puts it in place of sys.stderr does: a
    progress line written a piece at a time with a flush after each, and the
    questions a logging handler or a library asks of a stream."""
    import io

    e = environ["wsgi.errors"]
    e.write("progress: ")
    e.flush()
    for _ in range(3):
        e.write(".")
        e.flush()
    e.write(" done\n")
    answers = [f"isatty={e.isatty()}", f"closed={e.closed}", f"writable={e.writable()}"]
    try:
        e.fileno()
    except io.UnsupportedOperation:
        answers.append("fileno=unsupported")
    try:
        e.write(b"bytes")
    except TypeError as err:
        answers.append(f"bytes={err}")
    return _ok(start_response, " ".join(answers))


def errors_partial_from_a_thread(environ, start_response):
    """A thread of the app's writes an unfinished line to wsgi.errors,
    flushes, and then waits for good (a worker thread blocked in a queue)."""
    import threading

    errors = environ["wsgi.errors"]

    def run():
        errors.write("partial line from a thread")
        errors.flush()
        time.sleep(600)

    threading.Thread(target=run, daemon=True).start()
    return _ok(start_response, "started")


def print_errors(environ, start_response):
    """Writes to wsgi.errors the way print() does (the line in several pieces), and
    a last line without its newline."""
    print("piece", "by", 42, file=environ["wsgi.errors"])
    environ["wsgi.errors"].write("no newline at the end")
    return _ok(start_response, "printed")


def errors_from_thread(environ, start_response):
    """A thread of the app's own writes a line and then a last piece without
    a newline to wsgi.errors, and ends."""

    def write(errors):
        errors.write("from a thread of the app\n")
        errors.write("its last piece")

    t = threading.Thread(target=write, args=(environ["wsgi.errors"],))
    t.start()
    t.join()
    return _ok(start_response, "written")


class _CloseFails:
    def __init__(self, items, fail_after=None):
        self.items, self.fail_after = items, fail_after

    def __iter__(self):
        for i, item in enumerate(self.items):
            if i == self.fail_after:
                raise ValueError("iteration failed")
            yield item

    def close(self):
        raise RuntimeError("close failed")


KEPT_ENVIRONS = []


def keep_environ(environ, start_response):
    """Reads the body and keeps the environ for good, as a request history
    or a debug panel does; answers with the worker's resident memory in KiB."""
    environ["wsgi.input"].read()
    KEPT_ENVIRONS.append(environ)
    with open("/proc/self/status") as f:
        rss = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
    return _ok(start_response, rss)


def close_fails(environ, start_response):
    """A whole body whose iterable's close() raises (a Django request_finished
    handler that fails, say); with ?mid=1 its iteration fails after the first
    piece as well; with ?nostart=1 start_response is never called and the
    iterable is empty."""
    if "nostart" in _query(environ):
        return _CloseFails([])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return _CloseFails([b"hello ", b"world"], fail_after=1 if "mid" in _query(environ) else None)


def burst_then_slow(environ, start_response):
    """Three pieces at once (gathered and held), then ?slow= pieces a second apart."""
    slow = int(_query(environ).get("slow", "2"))
    start_response("200 OK", [("Content-Type", "text/plain")])

    def gen():
        for i in range(3):
            yield b"burst %d\n" % i
        for i in range(slow):
            time.sleep(1)
            yield b"slow %d\n" % i

    return gen()


def exit_now(environ, start_response):
    """Ends the worker process at once with ?code= (an app that calls os._exit)."""
    os._exit(int(_query(environ).get("code", "1")))


def pid(environ, start_response):
    return _ok(start_response, str(os.getpid()))


def slow(environ, start_response):
    q = _query(environ)
    environ["wsgi.errors"].write(f"slow request started: {q.get('id', '')}\n")
    environ["wsgi.errors"].flush()
    time.sleep(float(q.get("secs", "2")))
    if q.get("pid"):
        return _ok(start_response, f"slept {q.get('id', '')} in {os.getpid()}")
    return _ok(start_response, f"slept {q.get('id', '')}")


def errors(environ, start_response):
    msg = _query(environ).get("msg", "")
    environ["wsgi.errors"].write(msg + "\n")
    environ["wsgi.errors"].writelines([msg + " again\n"])
    environ["wsgi.errors"].flush()
    return _ok(start_response, "logged")


def os_environ(environ, start_response):
    key = _query(environ)["key"]
    return _json(start_response, {"value": os.environ.get(key)})


def cwd(environ, start_response):
    return _json(start_response, {"cwd": os.getcwd(), "sys_path": sys.path})


def write_callable(environ, start_response):
    write = start_response("200 OK", TEXT)
    write(b"hello ")
    write(b"from ")
    return [b"write()"]


def exc_info_replace(environ, start_response):
    """start_response called again with exc_info before anything was sent: the new status wins."""
    start_response("200 OK", TEXT)
    try:
        raise ValueError("changed my mind")
    except ValueError:
        start_response(
            "503 Service Unavailable", [("Content-Type", "text/plain"), ("X-Replaced", "yes")], sys.exc_info()
        )
    return [b"replaced"]


def thread(environ, start_response):
    """The serving thread as Python sees it, and whether it may set a signal handler."""
    import signal

    try:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        handler = "set"
    except ValueError as e:
        handler = str(e)
    me = threading.current_thread()
    return _json(start_response, {"name": me.name, "main": me is threading.main_thread(), "signal": handler})


VALIDATED = {
    "/environ": environ_dump,
    "/thread": thread,
    "/echo": echo,
    "/ignore-body": ignore_body,
    "/fixed": fixed,
    "/stream": stream,
    "/pid": pid,
    "/exit": exit_now,
    "/slow": slow,
    "/errors": errors,
    "/os-environ": os_environ,
    "/cwd": cwd,
    "/write": write_callable,
    "/exc-info-replace": exc_info_replace,
}


# -- endpoints that misbehave or that the validator would get in the way of --------------


def input_ops(environ, start_response):
    """Reads wsgi.input in the way ?op= asks and reports what each call returned."""
    q = _query(environ)
    op, size = q.get("op", "read"), int(q.get("size", "4"))
    stream = environ["wsgi.input"]
    calls = []
    if op == "read":
        calls.append(stream.read())
        calls.append(stream.read())
    elif op == "read-none":
        calls.append(stream.read(None))
    elif op == "read-minus-one":
        calls.append(stream.read(-1))
    elif op == "readn":
        while True:
            data = stream.read(size)
            calls.append(data)
            if not data:
                break
    elif op == "readline":
        while True:
            data = stream.readline()
            calls.append(data)
            if not data:
                break
    elif op == "readline-size":
        while True:
            data = stream.readline(size)
            calls.append(data)
            if not data:
                break
    elif op == "readlines":
        calls = stream.readlines()
        assert isinstance(calls, list)
    elif op == "iter":
        calls = list(stream)
    types = sorted({type(c).__name__ for c in calls})
    return _json(start_response, {"calls": [c.decode("latin-1") for c in calls], "types": types})


def short_body(environ, start_response):
    """Declares 10 bytes, sends 5."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    return [b"12345"]


def long_body(environ, start_response):
    """Declares 5 bytes, sends 28 in three blocks."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"123", b"4567890", b"abcdefghijklmnopqr"]


def catch_bad_header(environ, start_response):
    """start_response with a bad header among good ones; the app catches the
    error, then (with ?retry=1) calls start_response again."""
    try:
        start_response("201 Created", [("X-Good", "1"), ("X-Bad", "a\r\nb"), ("X-After", "2")])
    except (TypeError, ValueError) as e:
        caught = type(e).__name__
    else:
        caught = "nothing"
    if _query(environ).get("retry"):
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Retry", "1")])
    return [caught.encode()]


def bad_header(environ, start_response):
    q = _query(environ)
    kind = q.get("kind")
    if kind == "crlf":
        headers = [("X-Injected", "a\r\nSet-Cookie: evil=1")]
    elif kind == "lf":
        headers = [("X-Injected", "a\nb")]
    elif kind == "nonstr":
        headers = [("X-Number", 42)]
    elif kind == "bytes":
        headers = [("X-Bytes", b"value")]
    elif kind == "hop":
        headers = [(q["name"], q.get("value", "close"))]
    elif kind == "name-space":
        headers = [("X Bad Name", "v")]
    else:
        raise ValueError(kind)
    try:
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])
    except Exception as e:
        environ["wsgi.errors"].write(f"start_response raised {type(e).__name__}: {e}\n")
        raise
    return [b"should not be sent"]


def header_shapes(environ, start_response):
    """start_response with headers in the shapes apps written for other servers use."""
    shape = _query(environ)["shape"]
    pairs = [("Content-Type", "text/plain"), ("X-Shape", shape)]
    headers = {
        "list-of-lists": [list(p) for p in pairs],
        "tuple-of-tuples": tuple(pairs),
        "generator": (p for p in pairs),
        "dict": dict(pairs),
        "str": "Content-Type: text/plain",
        "triple": [("Content-Type", "text/plain", "x")],
        "bare-str-item": ["ab"],
    }[shape]
    try:
        start_response("200 OK", headers)
    except Exception as e:
        environ["wsgi.errors"].write(f"start_response raised {type(e).__name__}: {e}\n")
        raise
    return [b"shape ok"]


def start_response_twice(environ, start_response):
    start_response("200 OK", TEXT)
    try:
        start_response("404 Not Found", TEXT)
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = f"raised {type(e).__name__}"
    else:
        result = "did not raise"
    return [result.encode()]


def exc_info_after_headers(environ, start_response):
    """start_response with exc_info once the headers were sent must re-raise."""
    start_response("200 OK", TEXT)
    yield b"first part\n"
    try:
        raise KeyError("late failure")
    except KeyError:
        start_response("500 Internal Server Error", TEXT, sys.exc_info())
    yield b"must not be reached\n"


ENDLESS = {}


class _Endless:
    """Pieces without end, counted; with ?exact=1 one piece of ?cl= bytes, then
    a mark set by the code after the last yield."""

    def __init__(self, state, exact, length):
        self.state, self.exact, self.length = state, exact, length

    def __iter__(self):
        if self.exact:
            yield b"x" * self.length
            self.state["after_last_yield"] = True
            return
        while True:
            self.state["items"] += 1
            yield b"tick\n"
            time.sleep(0.01)

    def close(self):
        self.state["closed"] = True


class _EndlessFile:
    """A file-like object without a descriptor whose reads never end."""

    def __init__(self, state):
        self.state = state

    def read(self, size=-1):
        self.state["items"] += 1
        time.sleep(0.01)
        return b"z" * (size if size and size > 0 else 8192)

    def close(self):
        self.state["closed"] = True


def endless(environ, start_response):
    """An endless body (?file=1: through wsgi.file_wrapper) with status ?s= and
    Content-Length ?cl=, its progress at /endless-state?key=."""
    q = _query(environ)
    state = ENDLESS.setdefault(q["key"], {"items": 0, "closed": False, "after_last_yield": False})
    headers = list(TEXT)
    if "cl" in q:
        headers.append(("Content-Length", q["cl"]))
    start_response(q.get("s", "200 OK"), headers)
    if "file" in q:
        return environ["wsgi.file_wrapper"](_EndlessFile(state), 8192)
    return _Endless(state, "exact" in q, int(q.get("cl", "0")))


def endless_state(environ, start_response):
    return _json(start_response, ENDLESS.get(_query(environ)["key"]))


class Closing:
    """A response iterable that records close() calls in the markers file."""

    def __init__(self, tag, mode, count):
        self.tag, self.mode, self.count = tag, mode, count

    def __iter__(self):
        i = 0
        while self.mode == "infinite" or i < self.count:
            if self.mode == "raise" and i == 1:
                raise RuntimeError(f"failing mid-iteration {self.tag}")
            yield b"x" * 65536 if self.mode == "infinite" else f"piece{i}\n".encode()
            if self.mode == "infinite":
                time.sleep(0.005)
            i += 1

    def close(self):
        # Servers started without a markers file (tests of other things) record nothing.
        path = os.environ.get("CORRAL_TEST_MARKERS")
        if path:
            with open(path, "a") as f:
                f.write(f"{self.tag}\n")


def closing(environ, start_response):
    q = _query(environ)
    start_response("200 OK", TEXT)
    return Closing(q["id"], q.get("mode", "normal"), int(q.get("count", "3")))


def serve_file(environ, start_response):
    """?path= through wsgi.file_wrapper, with its Content-Length unless ?cl=0;
    ?write= goes through write() first and ?at_end=1 starts at the file's end."""
    q = _query(environ)
    path = q["path"]
    headers = [("Content-Type", "application/octet-stream")]
    if q.get("cl", "1") == "1":
        headers.append(("Content-Length", str(os.path.getsize(path))))
    write = start_response("200 OK", headers)
    if "write" in q:
        write(q["write"].encode())
    # ?mode=r: a file opened in text mode, as hand-written apps do.
    f = open(path, q.get("mode", "rb"))  # noqa: SIM115 - the server closes it with the response
    if q.get("at_end") == "1":
        f.seek(0, os.SEEK_END)
    return environ["wsgi.file_wrapper"](f, 65536)


LATE_WRITES = {}


def serve_file_then_write_late(environ, start_response):
    """A file_wrapper response whose app keeps write() and calls it after returning;
    /late-write?id= tells what that call got."""
    q = _query(environ)
    path, key = q["path"], q["id"]
    write = start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(os.path.getsize(path)))],
    )

    def late():
        time.sleep(float(q.get("after", "0.5")))
        try:
            write(b"LATE")
            LATE_WRITES[key] = "written"
        except Exception as e:  # noqa: BLE001 - what the app sees is the result
            LATE_WRITES[key] = f"{type(e).__name__}: {e}"

    threading.Thread(target=late).start()
    return environ["wsgi.file_wrapper"](open(path, "rb"), 65536)


def late_write(environ, start_response):
    return _json(start_response, {"result": LATE_WRITES.get(_query(environ)["id"])})


def serve_gzip(environ, start_response):
    """A file_wrapper over gzip.open() of a file holding ?size= bytes: the
    decoded bytes are the response, though fileno() is the gzip file's."""
    size = int(_query(environ).get("size", "100000"))
    path = os.path.join(tempfile.mkdtemp(), "data.gz")
    with gzip.open(path, "wb") as f:
        f.write(bytes(i % 251 for i in range(size)))
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](gzip.open(path, "rb"))


def serve_bytesio(environ, start_response):
    """A file_wrapper over a BytesIO of ?size= bytes, read in ?blksize= blocks;
    the wrapper's attributes as wsgiref has them are checked on the way."""
    q = _query(environ)
    size, blksize = int(q.get("size", "100000")), int(q.get("blksize", "8192"))
    data = bytes(i % 251 for i in range(size))
    filelike = io.BytesIO(data)
    wrapper_class = environ["wsgi.file_wrapper"]
    if "subclass" in q:
        # As an app may extend gunicorn's wrapper.
        wrapper_class = type("Wrapper", (wrapper_class,), {"note": "subclassed"})
    wrapper = wrapper_class(filelike, blksize)
    assert wrapper.filelike is filelike and wrapper.blksize == blksize
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return wrapper


def pause(environ, start_response):
    """Two small blocks at once, then nothing until the file `marker` exists (at most 10 s)."""
    marker = _query(environ)["marker"]
    start_response("200 OK", TEXT)
    yield b"first,"
    yield b"second,"
    deadline = time.monotonic() + 10
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.005)
    yield b"third"


def input_in_thread(environ, start_response):
    """Reads the body on a thread of its own while this one calls start_response."""
    got = []
    reader = threading.Thread(target=lambda: got.append(_read_all(environ["wsgi.input"])))
    reader.start()
    time.sleep(0.2)
    start_response("200 OK", TEXT)
    reader.join()
    return [str(len(got[0])).encode()]


def fork_returns(environ, start_response):
    """Forks; the child returns from the app too, as if it forgot os._exit()."""
    child = os.fork()
    if child == 0:
        start_response("200 OK", TEXT)
        return [b"from the child"]
    _, status = os.waitpid(child, 0)
    start_response("200 OK", TEXT)
    return [f"parent {os.getpid()}, child exit code {os.waitstatus_to_exitcode(status)}".encode()]


def fork_in_iterable(environ, start_response):
    """Forks inside the response iterable (?at=iter) or its close() (?at=close);
    the child ends with sys.exit(), which raises there, rather than os._exit()."""
    at = _query(environ).get("at", "iter")
    parent = os.getpid()

    def fork_and_wait():
        child = os.fork()
        if child == 0:
            sys.exit(0)
        _, status = os.waitpid(child, 0)
        return os.waitstatus_to_exitcode(status)

    class Body:
        def __iter__(self):
            yield b"before "
            if at == "iter":
                fork_and_wait()
            yield f"after in {os.getpid()}".encode()

        def close(self):
            if at == "close" and os.getpid() == parent:
                environ["wsgi.errors"].write(f"close forked a child that ended with {fork_and_wait()}\n")
                environ["wsgi.errors"].flush()

    start_response("200 OK", TEXT)
    return Body()


def _mp_target():
    pass


def multiprocessing_exitcode(environ, start_response):
    """A multiprocessing (fork) process started from a serving thread, whose target returns."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_mp_target)
    proc.start()
    proc.join(30)
    return _ok(start_response, str(proc.exitcode))


def fork_then_signal(environ, start_response):
    """Forks a child that sleeps, sends it ?sig=TERM, and says how it ended."""
    import signal

    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.write(ready_w, b"x")  # past the fork's handlers: signals are as they will stay
        time.sleep(10)
        os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    os.kill(child, getattr(signal, "SIG" + _query(environ).get("sig", "TERM")))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return _ok(start_response, f"signal {signal.Signals(os.WTERMSIG(status)).name}")
    return _ok(start_response, f"exit {os.waitstatus_to_exitcode(status)}")


def fork_child(environ, start_response):
    """Forks a child that sleeps ?secs= holding every descriptor it inherited (as
    a process pool the app starts would), then answers with the child's pid."""
    child = os.fork()
    if child == 0:
        # Not the log: the test's reader of the server's output would wait for it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        time.sleep(float(_query(environ).get("secs", "60")))
        os._exit(0)
    start_response("200 OK", TEXT)
    return [str(child).encode()]


def undecodable(environ, start_response):
    """A file name os.fsdecode could not decode (a lone surrogate), in wsgi.errors and in an exception."""
    name = os.fsdecode(b"file\xff.txt")
    environ["wsgi.errors"].write(f"cannot open {name}\n")
    raise FileNotFoundError(f"no such file: {name}")


def no_start(environ, start_response):
    return [b"a body, and start_response never called"]


def set_user(environ, start_response):
    """Sets REMOTE_USER in the environ, as authentication middleware does."""
    environ["REMOTE_USER"] = _query(environ)["user"]
    return _ok(start_response, "ok")


def cookies(environ, start_response):
    """Two Set-Cookie fields, as a login response has."""
    start_response("200 OK", [*TEXT, ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    return [b"cookies"]


def ids(environ, start_response):
    """The process's user, group and supplementary groups."""
    return _json(start_response, {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())})


def inheritable_fds(environ, start_response):
    """The worker's descriptors above 2 that a program it runs would inherit."""
    import fcntl

    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # the directory listing's own descriptor, closed by now
        if fd > 2 and not flags & fcntl.FD_CLOEXEC:
            fds.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
    return _json(start_response, fds)


def lengths(environ, start_response):
    """Six bytes, with a Content-Length header for each of ?values= (comma-separated)."""
    values = _query(environ)["values"].split(",")
    start_response("200 OK", [("Content-Type", "text/plain"), *(("Content-Length", v) for v in values)])
    return [b"abcdef"]


def _step(n):
    return (n * 7 + 3) % 1000003


def spin(environ, start_response):
    """Runs Python for ?secs= (a call per step: frames come and go all the time)."""
    end, n = time.monotonic() + float(_query(environ).get("secs", "30")), 1
    while time.monotonic() < end:
        n = _step(n)
    return _ok(start_response, str(n))


def segfault(environ, start_response):
    """Crashes the worker as a broken C extension would."""
    import ctypes

    ctypes.string_at(0)


def segfault_without_gil(environ, start_response):
    """Crashes in C code called with the GIL released, as a C library does."""
    import ctypes

    ctypes.memset(0, 0, 1)


def segfault_in_a_thread(environ, start_response):
    """Starts a thread of the app's own that crashes in C code called
    without the GIL (?gil=1: with it), as a C library's worker thread would;
    the request itself returns at once."""
    import ctypes
    import threading

    crash = ctypes.string_at if _query(environ).get("gil") else ctypes.memset

    def run():
        time.sleep(0.2)
        if crash is ctypes.memset:
            ctypes.memset(0, 0, 1)
        else:
            ctypes.string_at(0)

    threading.Thread(target=run, daemon=True).start()
    return _ok(start_response, "started")


def close_std(environ, start_response):
    """Closes descriptors 0, 1 and 2, as a library that daemonizes the process would."""
    for fd in (0, 1, 2):
        os.close(fd)
    return _ok(start_response, "closed")


def raise_before(environ, start_response):
    raise RuntimeError("boom before start_response" + _query(environ).get("more", ""))


def body_error_then(environ, start_response):
    """Reads the body; on corral's body error, ?then=wrap raises another
    exception from it (as Django's UnreadablePostError is), ?then=bug fails
    with an unrelated bug of its own while handling it, ?then=ok answers 200."""
    then = _query(environ).get("then", "wrap")
    try:
        _read_all(environ["wsgi.input"])
    except OSError as e:
        if then == "ok":
            return _ok(start_response, "gave up on the body")
        if then == "wrap":
            raise ValueError("could not read the upload") from e
        return undefined_name  # noqa: F821
    return _ok(start_response, "read")


def raise_after(environ, start_response):
    start_response("200 OK", TEXT)
    yield b"part one\n"
    raise RuntimeError("boom after the headers were sent")


def raise_after_cl(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
    yield b"part one\n"
    raise RuntimeError("boom after the headers were sent")


def raise_after_whole(environ, start_response):
    """?n= bytes (4 MiB by default) with their Content-Length, then an error
    in the generator's code after its last yield."""
    n = int(_query(environ).get("n", str(4 << 20)))
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))])
    body = (bytes(range(251)) * (n // 251 + 1))[:n]
    for start in range(0, n, 1 << 16):
        yield body[start : start + (1 << 16)]
    raise RuntimeError("cleanup failed after the whole body")


def print_std(environ, start_response):
    """Prints ?msg= to stdout and to stderr, as an app's print() and logging do."""
    msg = _query(environ).get("msg", "")
    print(f"stdout says {msg}", flush=True)
    print(f"stderr says {msg}", file=sys.stderr, flush=True)
    return _ok(start_response, "printed")


def non_daemon_thread(environ, start_response):
    """Starts a thread that is not a daemon and never ends (or ends after the
    seconds the query gives), as an app's forgotten background worker:
    Python's exit waits for it."""
    secs = float(environ["QUERY_STRING"] or 3600)
    threading.Thread(target=time.sleep, args=(secs,), name="forgotten").start()
    return _ok(start_response, "started")


def return_none(environ, start_response):
    """Forgets to return the body."""
    start_response("200 OK", TEXT)


def close_listeners(environ, start_response):
    """Closes every listening socket of the process (an app that closes the
    descriptors it did not open, as a daemonizing idiom does)."""
    import socket

    closed = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        s.detach()
        if listening:
            os.close(fd)
            closed.append(fd)
    return _ok(start_response, f"closed {closed}")


def close_fd(environ, start_response):
    """Closes ?fd= (an app that closes its standard output), then writes to
    it on later requests through /write-fd."""
    os.close(int(_query(environ)["fd"]))
    return _ok(start_response, "closed")


def write_fd(environ, start_response):
    fd = int(_query(environ)["fd"])
    try:
        os.write(fd, b"WRITTEN-BY-THE-APP\r\n\r\n")
        outcome = "written"
    except OSError as e:
        outcome = f"failed: {e}"
    return _ok(start_response, outcome)


_CLOSE_RELEASED = threading.Event()


class WaitingClose:
    """A chunked body whose close() waits (for /release-close, 30 s at most),
    as Django's does while its request_finished handlers run."""

    def __iter__(self):
        yield b"a"
        yield b"b"

    def close(self):
        _CLOSE_RELEASED.wait(30)
        _CLOSE_RELEASED.clear()


def slow_close(environ, start_response):
    start_response("200 OK", TEXT)
    return WaitingClose()


def release_close(environ, start_response):
    _CLOSE_RELEASED.set()
    return _ok(start_response, "released")


class Upper(list):
    """A list whose iteration is the app's own: a server must go through it."""

    def __iter__(self):
        return (item.upper() for item in list.__iter__(self))


def list_subclass(environ, start_response):
    start_response("200 OK", TEXT)
    return Upper([b"abc"])


UNVALIDATED = {
    "/status": status,
    "/ids": ids,
    "/cookies": cookies,
    "/slow-close": slow_close,
    "/errors-from-thread": errors_from_thread,
    "/release-close": release_close,
    "/list-subclass": list_subclass,
    "/print-std": print_std,
    "/burst-then-slow": burst_then_slow,
    "/print-errors": print_errors,
    "/errors-as-a-stream": errors_as_a_stream,
    "/errors-partial-from-a-thread": errors_partial_from_a_thread,
    "/close-fails": close_fails,
    "/keep-environ": keep_environ,
    "/input": input_ops,
    "/short": short_body,
    "/long": long_body,
    "/catch-bad-header": catch_bad_header,
    "/bad-header": bad_header,
    "/header-shapes": header_shapes,
    "/twice": start_response_twice,
    "/exc-info-after-headers": exc_info_after_headers,
    "/closing": closing,
    "/file": serve_file,
    "/file-late-write": serve_file_then_write_late,
    "/late-write": late_write,
    "/bytesio": serve_bytesio,
    "/gzip": serve_gzip,
    "/pause": pause,
    "/input-in-thread": input_in_thread,
    "/fork-returns": fork_returns,
    "/fork-child": fork_child,
    "/fork-in-iterable": fork_in_iterable,
    "/mp-exitcode": multiprocessing_exitcode,
    "/fork-then-signal": fork_then_signal,
    "/close-fd": close_fd,
    "/close-listeners": close_listeners,
    "/return-none": return_none,
    "/non-daemon-thread": non_daemon_thread,
    "/write-fd": write_fd,
    "/close-std": close_std,
    "/segfault": segfault,
    "/segfault-without-gil": segfault_without_gil,
    "/segfault-in-a-thread": segfault_in_a_thread,
    "/spin": spin,
    "/lengths": lengths,
    "/undecodable": undecodable,
    "/no-start": no_start,
    "/set-user": set_user,
    "/inheritable-fds": inheritable_fds,
    "/raise-before": raise_before,
    "/body-error-then": body_error_then,
    "/raise-after": raise_after,
    "/raise-after-cl": raise_after_cl,
    "/raise-after-whole": raise_after_whole,
    "/deep": deep,
    "/background": background,
    "/endless": endless,
    "/endless-state": endless_state,
}

_validated = {path: validator(app) for path, app in VALIDATED.items()}


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    app = _validated.get(path) or UNVALIDATED.get(path)
    if app is None:
        # Everything else (other paths, --mount tests) gets the environ dump.
        app = _validated["/environ"]
    return app(environ, start_response)
