"""Template tags that lead a page to a task's stream: ``{% load streamcoord %}``.

::

    {% load streamcoord %}
    {% streamcoord_js %}
    <div data-stream-url="{% stream_url task %}"></div>
    {% stream_url task start=True expires_in=600 as url %}

``stream_url`` is ``task.stream_url()``: the stream path with a token for this task (absolute
under ``STREAMCOORD_GATEWAY_URL``). Render it only into pages whose viewer may watch the task:
the token is what lets them. Autoescaping applies, so an ``&`` in the URL becomes ``&amp;`` in
the HTML and the browser reads it back as ``&`` from an attribute (``element.dataset``).
"""

from __future__ import annotations

from django import template
from django.templatetags.static import static
from django.utils.html import format_html
from django.utils.safestring import SafeString

from django_app.models import StreamTask

register = template.Library()

#: The helper's path among the static files (``django_app/static/``).
JS_PATH = "streamcoord/streamcoord.js"


@register.simple_tag
def stream_url(task: StreamTask, start: bool = False, expires_in: float | None = None) -> str:
    """``task.stream_url(start, expires_in)``; escaped by the template like any variable."""
    return task.stream_url(start=start, expires_in=expires_in)


@register.simple_tag
def streamcoord_js() -> SafeString:
    """The ``<script>`` that loads ``streamcoord.js`` (which sets ``window.streamcoord``)."""
    return format_html('<script src="{}"></script>', static(JS_PATH))
