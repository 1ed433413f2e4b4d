"""A small Flask app: forms, cookies, redirects, uploads and downloads."""

import hashlib
import tempfile

from flask import Flask, Response, redirect, request, send_file, url_for
from payload import download_bytes, file_of

app = Flask(__name__)

FILES = tempfile.TemporaryDirectory(prefix="flask-app-")


@app.get("/")
def index():
    return "hello from flask"


@app.post("/form")
def form():
    return {"name": request.form.get("name"), "items": request.form.getlist("item")}


@app.get("/set-cookie")
def set_cookie():
    resp = redirect("/show-cookie")
    resp.set_cookie("flavour", "oatmeal raisin")
    resp.set_cookie("count", "3")
    return resp


@app.get("/show-cookie")
def show_cookie():
    return dict(request.cookies)


@app.get("/old")
def old():
    return redirect("/", code=301)


@app.post("/upload")
def upload():
    f = request.files["file"]
    data = f.read()
    return {"filename": f.filename, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@app.put("/raw")
def raw():
    data = request.get_data()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@app.get("/download")
def download():
    size = int(request.args["size"])
    return Response(download_bytes(size), mimetype="application/octet-stream")


@app.get("/download-fixed")
def download_fixed():
    size = int(request.args["size"])
    return Response(b"".join(download_bytes(size)), mimetype="application/octet-stream")


@app.get("/where")
def where():
    return {"scheme": request.scheme, "index": url_for("index", _external=True)}


@app.get("/file")
def file():
    # Werkzeug sends a file through wsgi.file_wrapper.
    return send_file(file_of(FILES.name, int(request.args["size"])), mimetype="application/octet-stream")
