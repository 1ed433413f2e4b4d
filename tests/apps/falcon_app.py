"""A small Falcon app: the same routes as flask_app, the Falcon way."""

import hashlib
import os
import tempfile

import falcon
from payload import download_bytes, file_of

FILES = tempfile.TemporaryDirectory(prefix="falcon-app-")


class Index:
    def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "hello from falcon"


class Form:
    def on_post(self, req, resp):
        form = req.get_media()
        items = form.get("item", [])
        resp.media = {"name": form.get("name"), "items": items if isinstance(items, list) else [items]}


class SetCookie:
    def on_get(self, req, resp):
        # Falcon marks cookies Secure by default; these go over plain HTTP.
        resp.set_cookie("flavour", "oatmeal raisin", secure=False)
        resp.set_cookie("count", "3", secure=False)
        resp.status = falcon.HTTP_302
        resp.location = "/show-cookie"


class ShowCookie:
    def on_get(self, req, resp):
        resp.media = req.cookies


class Old:
    def on_get(self, req, resp):
        raise falcon.HTTPMovedPermanently("/")


class Upload:
    def on_post(self, req, resp):
        for part in req.get_media():
            if part.name == "file":
                data = part.stream.read()
                resp.media = {
                    "filename": part.filename,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                return
        raise falcon.HTTPBadRequest(title="no file part")


class Raw:
    def on_put(self, req, resp):
        # bounded_stream stops at Content-Length; a chunked body has none, and
        # the server's wsgi.input ends where the body ends.
        data = req.bounded_stream.read() if req.content_length is not None else req.stream.read()
        resp.media = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class Download:
    def on_get(self, req, resp):
        size = req.get_param_as_int("size", required=True)
        resp.content_type = "application/octet-stream"
        if req.get_param("stream") == "0":
            resp.data = b"".join(download_bytes(size))
        else:
            resp.stream = download_bytes(size)


class File:
    def on_get(self, req, resp):
        # A file object as the stream: Falcon hands it to wsgi.file_wrapper.
        path = file_of(FILES.name, req.get_param_as_int("size", required=True))
        resp.content_type = "application/octet-stream"
        resp.stream = open(path, "rb")  # noqa: SIM115 (the server closes it)
        resp.content_length = os.path.getsize(path)


app = falcon.App()
app.add_route("/", Index())
app.add_route("/form", Form())
app.add_route("/set-cookie", SetCookie())
app.add_route("/show-cookie", ShowCookie())
app.add_route("/old", Old())
app.add_route("/upload", Upload())
app.add_route("/raw", Raw())
app.add_route("/download", Download())
app.add_route("/file", File())
