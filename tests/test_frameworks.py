"""Real Flask, Django and Falcon apps under corral (2 workers x 2 threads), driven with requests."""

import hashlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

CHUNK = bytes(range(256)) * 256


def expected_download(size):
    h = hashlib.sha256()
    while size > 0:
        piece = CHUNK[: min(size, len(CHUNK))]
        size -= len(piece)
        h.update(piece)
    return h.hexdigest()


@pytest.fixture(scope="module", params=["flask", "django", "falcon"])
def framework(request, start_module_server):
    if request.param in ("flask", "falcon"):
        server = start_module_server(f"{request.param}_app:app", workers=2, threads=2)
    else:
        server = start_module_server(
            "djproject.wsgi:application",
            "--env",
            "DJANGO_SETTINGS_MODULE=djproject.settings",
            workers=2,
            threads=2,
        )
    server.name = request.param
    return server


def test_index(framework):
    resp = requests.get(framework.url + "/", timeout=30)
    assert resp.status_code == 200
    assert f"hello from {framework.name}" in resp.text


def test_form_post(framework):
    resp = requests.post(framework.url + "/form", data={"name": "Zoë & co", "item": ["a", "b c"]}, timeout=30)
    assert resp.status_code == 200
    assert resp.json() == {"name": "Zoë & co", "items": ["a", "b c"]}


def test_cookies_and_redirect(framework):
    with requests.Session() as s:
        resp = s.get(framework.url + "/set-cookie", timeout=30)
        assert resp.status_code == 200
        assert [r.status_code for r in resp.history] == [302]
        cookies = resp.json()
        assert cookies["count"] in ("3", "7")
        assert cookies["flavour"] in ("oatmeal raisin", "chocolate chip")
        # The session sends them back on later requests too.
        assert s.get(framework.url + "/show-cookie", timeout=30).json() == cookies


def test_redirect_target(framework):
    resp = requests.get(framework.url + "/old", allow_redirects=False, timeout=30)
    assert resp.status_code in (301, 302)
    assert resp.headers["Location"] in ("/", framework.url + "/")


def test_upload_5mib(framework):
    data = os.urandom(5 * 1024 * 1024)
    resp = requests.post(
        framework.url + "/upload", files={"file": ("big.bin", data, "application/octet-stream")}, timeout=60
    )
    assert resp.status_code == 200, resp.text[:2000]
    assert resp.json() == {
        "filename": "big.bin",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_upload_chunked(framework):
    if framework.name == "django":
        pytest.skip("Django needs a Content-Length for request bodies")
    data = os.urandom(3 * 1024 * 1024 + 17)

    def gen():
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    resp = requests.put(framework.url + "/raw", data=gen(), timeout=60)
    assert resp.status_code == 200, resp.text[:2000]
    assert resp.json() == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("variant", ["stream", "fixed"])
def test_download_10mib(framework, variant):
    size = 10 * 1024 * 1024
    if framework.name == "flask":
        url = framework.url + ("/download" if variant == "stream" else "/download-fixed") + f"?size={size}"
    else:
        url = framework.url + f"/download?size={size}&stream={1 if variant == 'stream' else 0}"
    resp = requests.get(url, timeout=60)
    assert resp.status_code == 200
    assert len(resp.content) == size
    assert hashlib.sha256(resp.content).hexdigest() == expected_download(size)
    if variant == "fixed":
        assert resp.headers["Content-Length"] == str(size)


@pytest.mark.parametrize("size", [0, 1, 3 * 1024 * 1024 + 5])
def test_file_response(framework, size):
    """Each framework's file response (Werkzeug's send_file, Django's
    FileResponse, a Falcon stream that is a file) goes through
    wsgi.file_wrapper; the whole file arrives with its length, and the
    connection serves the next request."""
    with requests.Session() as s:
        for _ in range(2):
            resp = s.get(framework.url + f"/file?size={size}", timeout=60)
            assert resp.status_code == 200
            assert resp.headers["Content-Length"] == str(size)
            assert hashlib.sha256(resp.content).hexdigest() == expected_download(size)
        assert s.get(framework.url + "/", timeout=30).status_code == 200


def test_concurrent_requests(framework):
    def one(i):
        resp = requests.post(framework.url + "/form", data={"name": f"n{i}"}, timeout=30)
        return resp.status_code, resp.json()["name"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40)))
    assert results == [(200, f"n{i}") for i in range(40)]


def test_django_csrf_protection(framework):
    if framework.name != "django":
        pytest.skip("Django only")
    assert requests.get(framework.url + "/protected", timeout=30).status_code == 200
    assert requests.post(framework.url + "/protected", data={"a": "b"}, timeout=30).status_code == 403


def test_django_disallowed_host(framework):
    if framework.name != "django":
        pytest.skip("Django only")
    resp = requests.get(framework.url + "/", headers={"Host": "evil.example"}, timeout=30)
    assert resp.status_code == 400


def test_flask_s_500_for_a_chunked_body_past_max_body_size_goes_out_as_413(start_server):
    """The read past --max-body-size raises in Flask's view, and Flask answers
    500 to it as to any exception: the client is told 413, what it did, and
    the log says the app's 500 was replaced."""
    server = start_server("flask_app:app", "--max-body-size", "2000")
    with server.connect() as conn:
        body = b"x" * 5000
        conn.send(
            b"PUT /raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        assert conn.read_response().status == 413
    server.wait_for(r"PUT /raw from .*: the app answered 500 to its body's error .*; the client is told 413")


@pytest.mark.parametrize("how", ["stalls", "stops"])
def test_a_body_django_cannot_read_is_answered_for_what_the_client_did(start_server, how):
    """Django renders the UnreadablePostError a body read raised as its own
    500: a client whose body stalled gets 408, one that stopped sending
    short of it 400, as when the error escapes an app, so that a slow or
    broken client does not count as a server error."""
    server = start_server(
        "djproject.wsgi:application",
        "--env",
        "DJANGO_SETTINGS_MODULE=djproject.settings",
        "--header-timeout",
        "1",
    )
    boundary = "b0undary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"x" * 1000
    with server.connect(timeout=30) as conn:
        # Larger than what corral reads ahead of the app, so Django's read waits.
        conn.send(
            f"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 500000\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
            + part
        )
        if how == "stops":
            conn.sock.shutdown(socket.SHUT_WR)
        assert conn.read_response().status == (408 if how == "stalls" else 400)
    told = 408 if how == "stalls" else 400
    server.wait_for(
        rf"POST /upload from .*: the app answered 500 to its body's error .*; the client is told {told}"
    )
