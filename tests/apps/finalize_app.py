"""An app that relies on the interpreter's exit: a module-level file written
without flushing, a reference cycle whose __del__ leaves a mark, and a
NamedTemporaryFile held in a cycle (as a traceback holds Django's upload
file when a client aborts its upload). Writes under $FINALIZE_DIR."""

import os
import tempfile

OUT = os.environ["FINALIZE_DIR"]
_log = open(os.path.join(OUT, f"buffered-{os.getpid()}.txt"), "w")  # noqa: SIM115 (closed at exit)


class Cycle:
    def __del__(self):
        with open(os.path.join(OUT, "collected.txt"), "a") as f:
            f.write(f"{os.getpid()}\n")


def application(environ, start_response):
    _log.write("x" * 100)
    c = Cycle()
    c.me = c
    t = tempfile.NamedTemporaryFile(dir=OUT, suffix=".upload")  # noqa: SIM115 (a cycle's to remove)
    t.write(b"abc")
    t.me = t
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
