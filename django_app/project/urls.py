"""The example project's URLs: the admin (every StreamTask model, with start, cancel and retry)
and the example pages (``django_app.examples.views``)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("django_app.examples.urls")),
]
