"""The demo pages of the embedded default: start an example task with a click, watch it live.

Served by ``runserver_stream`` only when it runs the embedded default (one process with its own
worker and database access); a stateless gateway serves no pages.

``POST /demo/start`` creates a row and starts a task, so it serves only the demo's own page on
this machine: a request must name a loopback host (a DNS-rebound name is refused), and one a
browser sends from another site (its ``Origin`` or ``Sec-Fetch-Site`` says so) is refused.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
from typing import Any

from asgineer import HttpRequest

from django_app.coordinator import coordinator, find_model
from streamcoord.gateway import Response, text

PAGE = importlib.resources.files(__package__).joinpath("demo.html").read_bytes()

#: What the page offers: a label, a model, and the fields of the row it creates.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "progress": ("ProgressTask: 20 steps", {"steps": 20, "delay": 0.25}),
    "failing": ("ProgressTask that fails at step 5", {"steps": 10, "delay": 0.25, "fail_at": 5}),
    "example": ("ExampleTask (the predecessor's)", {"message": "Hello from the demo"}),
}
MODELS = {"progress": "ProgressTask", "failing": "ProgressTask", "example": "ExampleTask"}


def is_loopback_host(host: str) -> bool:
    """Whether a Host header (``name[:port]``, ``[v6]:port``) names this machine."""
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def foreign_request(request: HttpRequest) -> str | None:
    """Why a state-changing request did not come from this demo's own page, or None."""
    host = request.headers.get("host", "")
    if not is_loopback_host(host):
        return "the demo answers only requests to a loopback host (localhost, 127.0.0.1, [::1])"
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != f"{request.scheme}://{host}".lower():
        return "cross-origin requests may not start demo tasks"
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return "cross-site requests may not start demo tasks"
    return None


def _json(body: Any, status: int = 200) -> Response:
    return status, {"content-type": "application/json", "cache-control": "no-store"}, json.dumps(body)


async def demo_routes(request: HttpRequest) -> Response | None:
    if request.path == "/" and request.method == "GET":
        return 200, {"content-type": "text/html; charset=utf-8"}, PAGE
    if request.path == "/demo/kinds":
        return _json([{"kind": kind, "label": label} for kind, (label, _) in KINDS.items()])
    if request.path == "/demo/start":
        if request.method != "POST":
            return text(405, "use POST")
        refused = foreign_request(request)
        if refused is not None:
            return text(403, refused)
        kind = request.querydict.get("kind", "")
        if kind not in KINDS:
            return text(400, f"kind must be one of {', '.join(KINDS)}")
        task = await find_model(MODELS[kind]).objects.acreate(**KINDS[kind][1])
        outcome = await coordinator.start_task(task)
        ref = task.stream_ref
        # The page that started the task may watch it: a URL with a token for this one task.
        return _json({
            "model": ref.model, "id": task.pk, "stream": task.stream_path, "stream_url": task.stream_url(),
            "started": outcome.queued,
        })
    return None
