import hashlib
import tempfile

from django.http import FileResponse, HttpResponse, HttpResponseRedirect, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from payload import download_bytes, file_of

FILES = tempfile.TemporaryDirectory(prefix="django-app-")


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
        return StreamingHttpResponse(download_bytes(size), content_type="application/octet-stream")
    return HttpResponse(b"".join(download_bytes(size)), content_type="application/octet-stream")


def protected(request):
    # Not exempt: a POST without a CSRF token gets 403.
    return HttpResponse("ok")


def file(request):
    # Django's WSGI handler sends a FileResponse through wsgi.file_wrapper.
    path = file_of(FILES.name, int(request.GET["size"]))
    return FileResponse(open(path, "rb"), content_type="application/octet-stream")
