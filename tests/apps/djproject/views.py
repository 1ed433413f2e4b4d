import hashlib
import os
import tempfile
import threading

from django.http import FileResponse, HttpResponse, HttpResponseRedirect, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

CHUNK = bytes(range(256)) * 256  # 64 KiB
FILES = tempfile.TemporaryDirectory(prefix="django-app-")


def _pieces(size):
    while size > 0:
        piece = CHUNK[: min(size, len(CHUNK))]
        size -= len(piece)
        yield piece


@csrf_exempt
def index(request):
    if request.method == "POST":
        return JsonResponse({"method": "POST", "body": request.body.decode()})
    return HttpResponse(f"hello from django {request.method} {request.path}")


@csrf_exempt
def form(request):
    return JsonResponse({"name": request.POST.get("name"), "items": request.POST.getlist("item")})


def set_cookie(request):
    resp = HttpResponseRedirect("/show-cookie")
    resp.set_cookie("flavour", "chocolate chip")
    resp.set_cookie("count", "7")
    return resp


def show_cookie(request):
    return JsonResponse(dict(request.COOKIES))


def old(request):
    return HttpResponseRedirect("/")


@csrf_exempt
def upload(request):
    f = request.FILES["file"]
    h = hashlib.sha256()
    size = 0
    for chunk in f.chunks():
        h.update(chunk)
        size += len(chunk)
    return JsonResponse({"filename": f.name, "size": size, "sha256": h.hexdigest()})


def download(request):
    size = int(request.GET["size"])
    if request.GET.get("stream") == "1":
        return StreamingHttpResponse(_pieces(size), content_type="application/octet-stream")
    return HttpResponse(b"".join(_pieces(size)), content_type="application/octet-stream")


def protected(request):
    # Not exempt: a POST without a CSRF token gets 403.
    return HttpResponse("ok")


def file(request):
    # Django's WSGI handler sends a FileResponse through wsgi.file_wrapper.
    path = os.path.join(FILES.name, f"{int(request.GET['size'])}.bin")
    if not os.path.exists(path):
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.writelines(_pieces(int(request.GET["size"])))
        os.replace(tmp, path)
    return FileResponse(open(path, "rb"), content_type="application/octet-stream")
