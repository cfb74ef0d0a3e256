"""CORS for pages on another origin that read streams (``Settings.cors_origins``).

A listed origin gets ``Access-Control-Allow-Origin`` naming it (never ``*``: a response that
varies by origin says ``Vary: Origin``, so caches keep them apart) and credentials, for an
``EventSource(url, {withCredentials: true})``. ``*`` (public mode only) lets any origin read,
without credentials. An origin not listed gets no CORS headers, so its page cannot read the
response; the gateway does not refuse the request itself (a same-origin request through a proxy
may carry an Origin the gateway cannot recognise as its own).
"""

from __future__ import annotations

from collections.abc import Mapping

#: What a preflight may ask for: EventSource polyfills send Last-Event-ID and Cache-Control.
ALLOWED_HEADERS = "Authorization, Last-Event-ID, Accept, Cache-Control"
ALLOWED_METHODS = "GET, HEAD"
#: How long a browser may reuse a preflight's answer, in seconds.
MAX_AGE = "600"


def allowed(origins: tuple[str, ...], origin: str) -> bool:
    return "*" in origins or origin.lower().rstrip("/") in origins


def response_headers(origins: tuple[str, ...], request_headers: Mapping[str, str]) -> dict[str, str]:
    """The CORS headers of a response to this request (only ``Vary`` when none apply)."""
    if not origins:
        return {}
    origin = request_headers.get("origin")
    if origin is None or not allowed(origins, origin):
        return {"vary": "Origin"}
    headers = {"access-control-allow-origin": origin, "vary": "Origin"}
    if origin.lower().rstrip("/") in origins:  # listed by name: credentials too
        headers["access-control-allow-credentials"] = "true"
    return headers


def preflight(origins: tuple[str, ...], request_headers: Mapping[str, str]) -> dict[str, str] | None:
    """The headers of a 204 answer to an allowed preflight (``OPTIONS``), or None to refuse."""
    origin = request_headers.get("origin")
    if origin is None or not origins or not allowed(origins, origin):
        return None
    return {
        **response_headers(origins, request_headers),
        "access-control-allow-methods": ALLOWED_METHODS,
        "access-control-allow-headers": ALLOWED_HEADERS,
        "access-control-max-age": MAX_AGE,
    }
