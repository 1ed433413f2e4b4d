"""--static /url=DIR: files served by corral itself, with ranges,
conditional requests, precompressed siblings and no way out of DIR."""

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from front_ends import free_port
from support import APPS, CORRAL, read_hashed, slow_reader, wait_until


@pytest.fixture
def site(start_server, tmp_path):
    public = tmp_path / "public"
    (public / "css").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("top secret")
    (public / "css" / "app.css").write_text("body { color: red }\n" * 100)
    data = os.urandom(300_000)
    (public / "blob.bin").write_bytes(data)
    (public / "index.html").write_text("<h1>home</h1>")
    big_js = "console.log('x');\n" * 500
    (public / "app.js").write_text(big_js)
    (public / "app.js.gz").write_bytes(gzip.compress(big_js.encode()))
    os.symlink(tmp_path / "secret.txt", public / "escape.txt")
    os.symlink(public / "index.html", public / "alias.html")
    # The app sees everything outside /static (and /static itself is never passed to it).
    server = start_server("behaviour:application", "--static", f"/static={public}", "--access-log", "-")
    server.public, server.data, server.js = public, data, big_js
    return server


def _h(resp):
    return {k.lower(): v for k, v in resp.headers}


def test_files_types_and_lengths(site):
    r = site.request("GET", "/static/css/app.css")
    assert r.status == 200
    assert r.body == (site.public / "css" / "app.css").read_bytes()
    h = _h(r)
    assert h["content-type"] == "text/css; charset=utf-8"
    assert h["content-length"] == str(len(r.body))
    assert h["accept-ranges"] == "bytes"
    assert "etag" in h and "last-modified" in h
    blob = site.request("GET", "/static/blob.bin")
    assert hashlib.sha256(blob.body).digest() == hashlib.sha256(site.data).digest()
    assert _h(blob)["content-type"] == "application/octet-stream"
    # The types nginx's and Python's tables know, not only the web's commonest.
    for name, ctype in (
        ("clip.mov", "video/quicktime"),
        ("pic.bmp", "image/bmp"),
        ("feed.atom", "application/atom+xml"),
    ):
        (site.public / name).write_bytes(b"x")
        assert _h(site.request("GET", f"/static/{name}"))["content-type"] == ctype, name
    assert site.request("GET", "/static/").body == b"<h1>home</h1>"
    head = site.request("HEAD", "/static/blob.bin")
    assert head.status == 200 and head.body == b"" and _h(head)["content-length"] == str(len(site.data))
    assert site.request("GET", "/static/missing.txt").status == 404
    assert site.request("POST", "/static/css/app.css").status == 405
    # Outside the mount, the app answers as usual.
    assert site.request("GET", "/fixed").status == 200


def test_ranges(site):
    r = site.request("GET", "/static/blob.bin", headers={"Range": "bytes=100-199"})
    assert r.status == 206
    assert r.body == site.data[100:200]
    assert _h(r)["content-range"] == f"bytes 100-199/{len(site.data)}"
    r = site.request("GET", "/static/blob.bin", headers={"Range": "bytes=-10"})
    assert r.status == 206 and r.body == site.data[-10:]
    r = site.request("GET", "/static/blob.bin", headers={"Range": f"bytes={len(site.data)}-"})
    assert r.status == 416
    assert _h(r)["content-range"] == f"bytes */{len(site.data)}"


def test_conditional_requests(site):
    first = site.request("GET", "/static/css/app.css")
    etag, modified = _h(first)["etag"], _h(first)["last-modified"]
    r = site.request("GET", "/static/css/app.css", headers={"If-None-Match": etag})
    assert r.status == 304 and r.body == b"" and _h(r)["etag"] == etag
    r = site.request("GET", "/static/css/app.css", headers={"If-Modified-Since": modified})
    assert r.status == 304
    r = site.request("GET", "/static/css/app.css", headers={"If-None-Match": '"other"'})
    assert r.status == 200
    # A changed file gets a new validator.
    time.sleep(1.1)
    (site.public / "css" / "app.css").write_text("body { color: blue }\n")
    r = site.request("GET", "/static/css/app.css", headers={"If-None-Match": etag})
    assert r.status == 200 and b"blue" in r.body and _h(r)["etag"] != etag


def test_precompressed_sibling(site):
    r = site.request("GET", "/static/app.js", headers={"Accept-Encoding": "gzip, deflate"})
    assert r.status == 200
    h = _h(r)
    assert h["content-encoding"] == "gzip"
    assert h["vary"] == "Accept-Encoding"
    assert h["content-type"] == "text/javascript; charset=utf-8"
    assert gzip.decompress(r.body).decode() == site.js
    plain = site.request("GET", "/static/app.js")
    assert "content-encoding" not in _h(plain) and plain.body.decode() == site.js
    refused = site.request("GET", "/static/app.js", headers={"Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in _h(refused)


@pytest.mark.parametrize(
    "target",
    [
        "/static/../secret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/css/%2E%2E/%2e%2e/secret.txt",
        "/static/css/..%2f..%2fsecret.txt",
        "/static/escape.txt",
        "/static/app.js%00.txt",
        "/static/css/..",
    ],
)
def test_traversal_is_refused(site, target):
    r = site.request("GET", target)
    assert r.status in (400, 404), (target, r.status)
    assert b"top secret" not in r.body


@pytest.mark.parametrize(
    "target", ["/static/./css/app.css", "/static/css/./app.css", "/static/%2e/css/app.css"]
)
def test_a_dot_segment_names_the_directory_itself(site, target):
    """As nginx resolves it (a client normalizes it away): no way out."""
    r = site.request("GET", target)
    assert (r.status, r.body) == (200, site.request("GET", "/static/css/app.css").body), target


def test_a_file_whose_name_is_not_utf8_is_served(site):
    """File names are bytes: a Latin-1 name, percent-encoded in the URL, as
    nginx serves it."""
    with open(bytes(site.public) + b"/l\xe9.txt", "wb") as f:
        f.write(b"latin-1 name")
    r = site.request("GET", "/static/l%E9.txt")
    assert (r.status, r.body) == (200, b"latin-1 name")


def test_a_symlink_out_of_the_mount_is_refused_with_a_warning_naming_it(site):
    mark = site.mark()
    for _ in range(3):
        r = site.request("GET", "/static/escape.txt")
        assert r.status == 404 and b"top secret" not in r.body
    line = rf"Static file {re.escape(str(site.public))}/escape\.txt not served: it leads to .*secret\.txt, outside"
    site.wait_for(line, since=mark)
    # Once per file and worker, however often it is asked for.
    assert len(site.grep(line, since=mark)) == 1, site.log


def test_static_safe_lets_symlinks_lead_into_its_directories_and_no_others(start_server, tmp_path):
    """uWSGI's static-safe: Django's `collectstatic --link` fills the served
    directory with symlinks into each app's own static directory."""
    public, shared, private = tmp_path / "public", tmp_path / "shared", tmp_path / "private"
    for d in (public, shared / "admin", private):
        d.mkdir(parents=True)
    (shared / "admin" / "base.css").write_text("admin{}")
    (private / "key.pem").write_text("top secret")
    os.symlink(shared / "admin", public / "admin")
    os.symlink(private / "key.pem", public / "key.pem")
    server = start_server(
        "behaviour:application", "--static", f"/static={public}", "--static-safe", str(shared)
    )
    r = server.request("GET", "/static/admin/base.css")
    assert r.status == 200 and r.body == b"admin{}"
    assert _h(r)["content-type"] == "text/css; charset=utf-8"
    r = server.request("GET", "/static/key.pem")
    assert r.status == 404 and b"top secret" not in r.body
    server.wait_for(r"Static file .*key\.pem not served: it leads to .*, outside .*--static-safe DIR")


def test_an_index_that_is_a_symlink_is_followed_within_the_same_bounds(start_server, tmp_path):
    """A directory's index.html linked into a --static-safe directory (as
    `collectstatic --link` makes them) is served for the directory; one
    leading anywhere else is not, with the warning naming it. Both got 403
    ("too many levels of symbolic links")."""
    public, shared, private = tmp_path / "public", tmp_path / "shared", tmp_path / "private"
    for d in (public / "docs", public / "inner", public / "out", shared, private):
        d.mkdir(parents=True)
    (shared / "index.html").write_text("<h1>docs</h1>")
    (public / "page.html").write_text("<h1>page</h1>")
    (private / "index.html").write_text("top secret")
    os.symlink(shared / "index.html", public / "docs" / "index.html")
    os.symlink(public / "page.html", public / "inner" / "index.html")
    os.symlink(private / "index.html", public / "out" / "index.html")
    server = start_server(
        "behaviour:application", "--static", f"/static={public}", "--static-safe", str(shared)
    )
    assert server.request("GET", "/static/docs/").body == b"<h1>docs</h1>"
    assert server.request("GET", "/static/inner/").body == b"<h1>page</h1>"
    assert server.request("GET", "/static/inner").status == 301
    r = server.request("GET", "/static/out/")
    assert r.status == 404 and b"top secret" not in r.body
    server.wait_for(r"Static file .*/out/index\.html not served: it leads to .*private/index\.html, outside")


def test_a_directory_the_worker_may_not_enter_is_403_with_a_log_line(start_server):
    """As nginx answers it: a deploy with the wrong permissions on a
    directory does not fail as silent 404s."""
    # Not under tmp_path, whose parent only root may enter.
    top = Path(tempfile.mkdtemp(prefix="corral-static-"))
    try:
        public = top / "public"
        (public / "closed").mkdir(parents=True)
        (public / "closed" / "a.css").write_text("a{}")
        (public / "open.css").write_text("b{}")
        os.chmod(public / "closed", 0o700)
        for d in (top, public):
            os.chmod(d, 0o755)
        server = start_server(
            "behaviour:application", "--preload", "--user", "nobody", "--static", f"/static={public}"
        )
        assert server.request("GET", "/static/open.css").body == b"b{}"
        r = server.request("GET", "/static/closed/a.css")
        assert r.status == 403
        server.wait_for(r"--static /static: cannot look up /closed/a\.css: Permission denied .*answering 403")
    finally:
        shutil.rmtree(top)


def test_static_safe_from_a_uwsgi_ini_is_found_from_its_chdir(start_server, tmp_path):
    site = tmp_path / "site"
    (site / "static").mkdir(parents=True)
    (site / "vendor").mkdir()
    (site / "vendor" / "lib.js").write_text("lib()")
    os.symlink(site / "vendor" / "lib.js", site / "static" / "lib.js")
    port = free_port()
    ini = tmp_path / "app.ini"
    ini.write_text(
        f"[uwsgi]\nchdir = {site}\npythonpath = {APPS}\nmodule = behaviour:application\n"
        f"http-socket = 127.0.0.1:{port}\n"
        "static-map = /static=static\nstatic-safe = vendor\n"
    )
    server = start_server(str(ini), "--config", http=None, pythonpath=None, wait=False)
    server.wait_started()
    assert server.request("GET", "/static/lib.js").body == b"lib()"


def test_a_uwsgi_ini_static_map_under_a_mount_with_manage_script_name(start_server, tmp_path):
    """uWSGI matches static-map against PATH_INFO with the mount's prefix
    taken off: /prefix/static/a.css is the file, and so is /static/a.css.
    The app got the first (Django answered 404 for every static file)."""
    site = tmp_path / "site"
    (site / "static").mkdir(parents=True)
    (site / "static" / "a.css").write_text("a{}")
    port = free_port()
    ini = tmp_path / "app.ini"
    ini.write_text(
        f"[uwsgi]\nchdir = {site}\npythonpath = {APPS}\nmount = /prefix=behaviour:application\n"
        f"manage-script-name = true\nhttp-socket = 127.0.0.1:{port}\nstatic-map = /static=static\n"
    )
    server = start_server(str(ini), "--config", http=None, pythonpath=None, wait=False)
    server.wait_started()
    assert server.request("GET", "/prefix/static/a.css").body == b"a{}"
    assert server.request("GET", "/static/a.css").body == b"a{}"
    assert server.request("GET", "/prefix/fixed").body == b"hello world"


def test_static_safe_needs_a_directory_and_a_mount(tmp_path):
    (tmp_path / "file").write_text("x")
    for args, said in [
        (["--static-safe", str(tmp_path / "nowhere")], "--static-safe"),
        (["--static", f"/s={tmp_path}", "--static-safe", str(tmp_path / "file")], "is not a directory"),
        (["--static-safe", str(tmp_path)], "without a --static or --static-map directory"),
    ]:
        proc = subprocess.run(
            [*CORRAL, "--http", "127.0.0.1:0", *args, "behaviour:application"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode != 0 and said in proc.stderr, (args, proc.stderr)


def test_symlink_inside_the_mount_is_served(site):
    assert site.request("GET", "/static/alias.html").body == b"<h1>home</h1>"


def test_static_requests_are_logged(site):
    site.request("GET", "/static/css/app.css")
    assert any('"GET /static/css/app.css HTTP/1.1" 200' in line for line in _wait_stdout(site))


def _wait_stdout(server):
    from support import wait_until

    wait_until(lambda: any("/static/" in line for line in server.stdout_lines), 5)
    return server.stdout_lines


def test_precondition_headers(site):
    first = site.request("GET", "/static/blob.bin")
    etag, modified = _h(first)["etag"], _h(first)["last-modified"]
    past = "Sat, 01 Jan 2000 00:00:00 GMT"
    # If-Match / If-Unmodified-Since (RFC 9110 13.1.1, 13.1.4): 412 when they fail.
    assert site.request("GET", "/static/blob.bin", headers={"If-Match": '"nomatch"'}).status == 412
    assert site.request("GET", "/static/blob.bin", headers={"If-Match": etag}).status == 200
    assert site.request("GET", "/static/blob.bin", headers={"If-Match": "*"}).status == 200
    assert site.request("GET", "/static/blob.bin", headers={"If-Match": "W/" + etag}).status == 412
    assert site.request("GET", "/static/blob.bin", headers={"If-Unmodified-Since": past}).status == 412
    assert site.request("GET", "/static/blob.bin", headers={"If-Unmodified-Since": modified}).status == 200
    # If-Range: the range only for the client's own copy, else the whole file.
    rng = {"Range": "bytes=500-999"}
    assert site.request("GET", "/static/blob.bin", headers={**rng, "If-Range": etag}).status == 206
    assert site.request("GET", "/static/blob.bin", headers={**rng, "If-Range": modified}).status == 206
    for stale in ('"old-etag"', past):
        r = site.request("GET", "/static/blob.bin", headers={**rng, "If-Range": stale})
        assert r.status == 200 and r.body == site.data, stale


def test_repeated_header_lines_form_one_list(site):
    etag = _h(site.request("GET", "/static/css/app.css"))["etag"]
    with site.connect() as conn:
        conn.send(
            b'GET /static/css/app.css HTTP/1.1\r\nHost: x\r\nIf-None-Match: "other"\r\n'
            + b"If-None-Match: "
            + etag.encode()
            + b"\r\n\r\n"
        )
        assert conn.read_response().status == 304
        conn.send(
            b"GET /static/app.js HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\nAccept-Encoding: gzip\r\n\r\n"
        )
        assert _h(conn.read_response()).get("content-encoding") == "gzip"


@pytest.mark.parametrize(
    "accept,coding",
    [
        ("br, gzip", "br"),
        ("br;Q=0, gzip", "gzip"),
        ("br;q=0., gzip", "gzip"),
        ("br;q=0.5, gzip;q=1", "gzip"),
        ("gzip;q=0.5, br;q=0.5", "br"),
        ("*;q=0.2", "br"),
        ("*, br;q=0, gzip;q=0", None),
        ("identity", None),
    ],
)
def test_the_preferred_precompressed_coding_is_chosen(site, accept, coding):
    (site.public / "app.js.br").write_bytes(b"brotli bytes")
    r = site.request("GET", "/static/app.js", headers={"Accept-Encoding": accept})
    assert r.status == 200
    assert _h(r).get("content-encoding") == coding, accept


def test_a_precompressed_sibling_linking_outside_is_not_served(site, tmp_path):
    (site.public / "t.txt").write_text("text")
    # Newer than t.txt, as a real precompressed sibling would be.
    later = time.time() + 100
    os.utime(tmp_path / "secret.txt", (later, later))
    os.symlink(tmp_path / "secret.txt", site.public / "t.txt.br")
    os.symlink(tmp_path / "secret.txt", site.public / "t.txt.gz")
    r = site.request("GET", "/static/t.txt", headers={"Accept-Encoding": "br, gzip"})
    assert r.status == 200 and r.body == b"text"
    assert "content-encoding" not in _h(r)


def test_directories_and_trailing_slashes_as_nginx_answers_them(site):
    """A directory without its slash is redirected to it (so the links in its
    index resolve there); a file name with a slash after it names nothing."""
    (site.public / "docs").mkdir()
    (site.public / "docs" / "index.html").write_text("<a href=x.html>x</a>")
    r = site.request("GET", "/static/docs")
    assert (r.status, _h(r)["location"]) == (301, "/static/docs/")
    r = site.request("GET", "/static/docs?page=2&q=a%20b")
    assert (r.status, _h(r)["location"]) == (301, "/static/docs/?page=2&q=a%20b")
    assert site.request("GET", "/static/docs/").body == b"<a href=x.html>x</a>"
    assert (site.request("GET", "/static").status, _h(site.request("GET", "/static"))["location"]) == (
        301,
        "/static/",
    )
    assert site.request("GET", "/static/css/app.css/").status == 404


def test_a_fifo_swapped_in_never_hangs_a_thread(site):
    """The open of a name checked a moment earlier never waits: a FIFO that takes
    a regular file's place between the check and the open is refused, and the
    worker goes on serving."""
    fifo_at = site.public / "swap.txt"
    stop = [False]

    def swapper():
        tmp_file, tmp_fifo = site.public / ".f", site.public / ".p"
        while not stop[0]:
            tmp_file.write_text("file")
            os.replace(tmp_file, fifo_at)
            if not tmp_fifo.exists():
                os.mkfifo(tmp_fifo)
            os.replace(tmp_fifo, fifo_at)

    import threading

    t = threading.Thread(target=swapper)
    t.start()
    try:
        for _ in range(300):
            r = site.request("GET", "/static/swap.txt", timeout=10)
            assert r.status in (200, 404) and r.body in (b"file", b"404 Not Found\n")
    finally:
        stop[0] = True
        t.join()
    assert site.request("GET", "/fixed", timeout=10).status == 200


def test_an_unreadable_precompressed_sibling_falls_back_to_the_file(site):
    if os.geteuid() == 0:
        pytest.skip("root reads files of any mode")
    (site.public / "app.js.gz").chmod(0)
    r = site.request("GET", "/static/app.js", headers={"Accept-Encoding": "gzip"})
    assert (r.status, r.body.decode(), _h(r).get("content-encoding")) == (200, site.js, None)


# -- downloads a client reads slowly ------------------------------------------------

BIG = 48 << 20


@pytest.fixture
def big_file(tmp_path):
    public = tmp_path / "big"
    public.mkdir()
    data = os.urandom(BIG)
    (public / "big.bin").write_bytes(data)
    return public, hashlib.sha256(data).hexdigest()


def test_a_client_that_stops_reading_a_download_holds_no_thread(start_server, big_file, tmp_path):
    """One worker with one thread: while a client sits on a download it stopped
    reading, the rest of its file is sent by the offload thread and the serving
    thread answers other requests; the download then completes whole, its
    connection carries another request, and the log line counts every byte."""
    public, digest = big_file
    log = tmp_path / "access.log"
    server = start_server(
        "behaviour:application",
        "--static",
        f"/static={public}",
        "--access-log",
        str(log),
        "--access-log-format",
        "%(r)s %(s)s %(B)s",
    )
    with slow_reader(server) as slow:
        slow.send_request("GET", "/static/big.bin", {"Host": "x"})
        head = slow.read_head()
        assert head.status == 200
        assert int(head.header("Content-Length")) == BIG
        time.sleep(0.5)
        for i in range(5):
            assert server.request("GET", f"/fixed?n={i}", timeout=20).status == 200
        assert read_hashed(slow, BIG) == (BIG, digest)
        slow.send_request("GET", "/fixed?after", {"Host": "x"})
        assert slow.read_response().status == 200
    assert wait_until(lambda: "/fixed?after" in log.read_text())
    assert f"GET /static/big.bin HTTP/1.1 200 {BIG}" in log.read_text().splitlines()


def test_downloads_finish_when_the_worker_stops_gracefully(start_server, big_file):
    """A TERM while the offload thread still sends a file: the worker waits for it."""
    public, digest = big_file
    server = start_server("behaviour:application", "--static", f"/static={public}", "--threads", "2")
    with slow_reader(server) as slow:
        slow.send_request("GET", "/static/big.bin", {"Host": "x"})
        assert slow.read_head().status == 200
        time.sleep(0.5)
        os.kill(server.proc.pid, signal.SIGTERM)
        server.wait_for("Worker draining")
        assert read_hashed(slow, BIG) == (BIG, digest)
    assert server.proc.wait(30) == 0


def test_a_static_file_that_shrinks_while_sent_is_reported_as_the_file(start_server, tmp_path):
    """The client sees the connection close short of the announced length, and
    the log line says that the file ended early: it does not blame the app."""
    public = tmp_path / "shrinking"
    public.mkdir()
    path = public / "big.bin"
    size = 64 << 20
    with open(path, "wb") as f:
        f.truncate(size)
    server = start_server("behaviour:application", "--static", f"/static={public}")
    mark = server.mark()
    with slow_reader(server) as slow:
        slow.send_request("GET", "/static/big.bin", {"Host": "x"})
        assert int(slow.read_head().header("Content-Length")) == size
        time.sleep(0.5)
        os.truncate(path, 1 << 20)
        got, _ = read_hashed(slow, size)
        assert got < size
    server.wait_for(rf"the body ended after \d+ of the {size} bytes its file had", since=mark)
    assert not server.grep("the app declared", since=mark)
    assert server.request("GET", "/fixed", timeout=10).status == 200


def test_a_mount_at_the_root_leaves_what_it_has_not_to_the_app(start_server, tmp_path):
    # uWSGI's `static-map = /=DIR` and nginx's `try_files $uri @app`: the
    # site's root files are served, every other request reaches the app.
    public, assets = tmp_path / "public", tmp_path / "assets"
    (public / "sub").mkdir(parents=True)
    assets.mkdir()
    (public / "robots.txt").write_text("User-agent: *\n")
    (public / "echo").write_text("a file named like a route")
    (public / "sub" / "index.html").write_text("<p>index</p>")
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", public / "escape.txt")
    (assets / "a.css").write_text("a{}")
    server = start_server("behaviour:application", "--static", f"/={public}", "--static", f"/assets={assets}")
    robots = server.request("GET", "/robots.txt")
    assert robots.status == 200 and robots.body == b"User-agent: *\n"
    assert "etag" in _h(robots)
    assert server.request("HEAD", "/robots.txt").status == 200
    # A file's GET is the file's; a POST to its path is the app's.
    assert server.request("GET", "/echo").body == b"a file named like a route"
    assert server.request("POST", "/echo", body=b"posted").body == b"posted"
    for path in ["/", "/nope", "/sub", "/sub/", "/escape.txt"]:
        r = server.request("GET", path)
        assert r.status == 200, path
        env = json.loads(r.body)
        assert env["PATH_INFO"]["value"] == path, (path, env["PATH_INFO"])
        assert b"top secret" not in r.body
    # A mount elsewhere still answers for its whole prefix.
    assert server.request("GET", "/assets/a.css").body == b"a{}"
    assert server.request("GET", "/assets/missing.css").status == 404


def test_a_static_map_goes_before_a_static_mount_of_its_prefix(start_server, tmp_path):
    """--static-map mounts are tried first, whatever the order of the flags,
    and pass what they have not on: here to a --static mount of the same
    prefix, which answers 404 for what it has not either."""
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    (new / "a.css").write_text("new a")
    (old / "a.css").write_text("old a")
    (old / "b.css").write_text("old b")
    server = start_server(
        "behaviour:application", "--static", f"/assets={old}", "--static-map", f"/assets={new}"
    )
    assert server.request("GET", "/assets/a.css").body == b"new a"
    assert server.request("GET", "/assets/b.css").body == b"old b"
    assert server.request("GET", "/assets/c.css").status == 404
    assert server.request("POST", "/assets/a.css", body=b"x").status == 405


def test_the_longest_static_prefix_answers_and_a_prefix_given_twice_is_refused(start_server, tmp_path):
    """Nested mounts answer by their longest prefix, whatever the order of the
    flags (as nginx picks a location); one prefix given twice is refused, with
    --static-map named for trying several directories."""
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    (outer / "sub").mkdir(parents=True)
    inner.mkdir()
    (outer / "a.txt").write_text("outer a")
    (outer / "sub" / "b.txt").write_text("outer b")
    (inner / "c.txt").write_text("inner c")
    server = start_server("behaviour:application", "--static", f"/n={outer},/n/sub={inner}")
    assert server.request("GET", "/n/a.txt").body == b"outer a"
    assert server.request("GET", "/n/sub/c.txt").body == b"inner c"
    assert server.request("GET", "/n/sub/b.txt").status == 404
    refused = subprocess.run(
        [
            *CORRAL,
            "--check-config",
            "--static",
            f"/n={outer}",
            "--static",
            f"/n/={inner}",
            "behaviour:application",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2, refused.stderr
    assert "--static /n is given twice" in refused.stderr and "--static-map" in refused.stderr, refused.stderr


def test_a_client_that_takes_nothing_of_a_file_is_given_up_with_the_request_named(start_server, tmp_path):
    """The offload thread gives up on a client that takes nothing for
    --socket-timeout; the line says which request it was, as every other
    line about a file does."""
    public = tmp_path / "public"
    public.mkdir()
    (public / "big.bin").write_bytes(b"z" * (32 << 20))
    server = start_server(
        "behaviour:application", "--static", f"/static={public}", "--socket-timeout", "1", workers=1
    )
    mark = server.mark()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect((server.host, server.port))
        sock.sendall(b"GET /static/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_for(
            r"GET /static/big\.bin from 127\.0\.0\.1:\d+: gave up sending the file: the client took nothing "
            r"for 1 s \(\d+ bytes sent\)",
            since=mark,
            timeout=20,
        )
    finally:
        sock.close()
    assert server.request("GET", "/fixed").status == 200


def test_a_client_reading_a_file_slowly_but_steadily_is_not_given_up(start_server, tmp_path):
    """The kernel says a socket is writable only once a third of its send
    buffer is free, which a client reading slowly but steadily from a large
    buffer may take longer than --socket-timeout to free: what it reads
    meanwhile is progress too (the offload thread counted only what it
    wrote, cut the download short and said the client took nothing)."""
    public = tmp_path / "public"
    public.mkdir()
    data = os.urandom(5 << 20)
    (public / "big.bin").write_bytes(data)
    server = start_server(
        "behaviour:application", "--static", f"/static={public}", "--socket-timeout", "1", workers=1
    )
    mark = server.mark()
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(b"GET /static/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = bytearray()
        # About 700 KB a second: a third of a 4 MiB send buffer takes longer.
        while chunk := sock.recv(35_000):
            got += chunk
            time.sleep(0.05)
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) == len(data) and body == data, len(body)
    assert not server.grep(r"gave up sending the file", since=mark)
