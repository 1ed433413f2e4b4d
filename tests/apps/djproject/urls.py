from django.urls import path

from djproject import views

urlpatterns = [
    path("", views.index),
    path("form", views.form),
    path("set-cookie", views.set_cookie),
    path("show-cookie", views.show_cookie),
    path("old", views.old),
    path("upload", views.upload),
    path("download", views.download),
    path("protected", views.protected),
    path("file", views.file),
]
