"""Template tags that lead a page to task streams: ``{% load streamcoord %}``.

::

    {% load streamcoord %}
    {% streamcoord_js %}
    <div data-stream-url="{% stream_url task %}"></div>
    {% stream_url task start=True expires_in=600 as url %}
    <div data-streams-url="{% streams_url tasks %}"></div>

``stream_url`` is ``task.stream_url()``: the stream path with a token for this task (absolute
under ``STREAMCOORD_GATEWAY_URL``). ``streams_url`` is one URL for many tasks (a queryset or a
list of them) on one connection, with one token for all (``access.streams_url``): a page that
follows many tasks gives it to ``streamcoord.follow`` and holds one of the browser's six
HTTP/1.1 connections to the gateways, not one per task. Render either only into pages whose
viewer may watch the tasks: the token is what lets them. Autoescaping applies, so an ``&`` in
the URL becomes ``&amp;`` in the HTML and the browser reads it back as ``&`` from an attribute
(``element.dataset``).
"""

from __future__ import annotations

from collections.abc import Iterable

from django import template
from django.templatetags.static import static
from django.utils.html import format_html
from django.utils.safestring import SafeString

from django_app import access
from django_app.models import StreamTask

register = template.Library()

#: The helper's path among the static files (``django_app/static/``).
JS_PATH = "streamcoord/streamcoord.js"


@register.simple_tag
def stream_url(task: StreamTask, start: bool = False, expires_in: float | None = None) -> str:
    """``task.stream_url(start, expires_in)``; escaped by the template like any variable."""
    return task.stream_url(start=start, expires_in=expires_in)


@register.simple_tag
def streams_url(tasks: Iterable[StreamTask], start: bool = False, expires_in: float | None = None) -> str:
    """``access.streams_url`` of ``tasks``: one URL (and token) for all of them."""
    return access.streams_url([task.stream_ref for task in tasks], start=start, expires_in=expires_in)


@register.simple_tag
def streamcoord_js() -> SafeString:
    """The ``<script>`` that loads ``streamcoord.js`` (which sets ``window.streamcoord``)."""
    return format_html('<script src="{}"></script>', static(JS_PATH))
