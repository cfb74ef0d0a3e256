"""Which requests the admin listener answers: those addressed to an IP address or to localhost.

The admin listener serves operators (``/stats``, ``/metrics``, the dashboard, whose links carry
minted read tokens). A page in an operator's browser could reach it by DNS rebinding: its own
name, re-pointed at the listener's address, makes the browser send the listener requests whose
``Host`` is that name. Requests by an IP address (Prometheus scraping a pod, ``curl``) or by
localhost (``kubectl port-forward``, ``ssh -L``, a unix socket) are never such requests.
"""

from __future__ import annotations

import ipaddress


def host_name(host: str) -> str:
    """The name of a ``Host`` header (``name[:port]``, ``[v6]:port``), lower case."""
    if host.startswith("["):
        return host[1:].partition("]")[0].lower()
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


def rebinding_guard_applies(server: tuple[str, int | None] | None) -> bool:
    """Whether a request came over TCP (``scope["server"]`` has a port): a browser cannot
    connect to a unix socket, so the guard is for TCP listeners only."""
    return bool(server) and server[1] is not None  # type: ignore[index]


def is_ip_or_localhost(host: str) -> bool:
    """Whether a ``Host`` header names an IP address or localhost (an empty one, from an
    HTTP/1.0 client, counts: no browser sends that)."""
    name = host_name(host).rstrip(".")
    if not name or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback_client(client: tuple[str, int] | None) -> bool:
    """Whether a connection comes from this machine: a unix socket (no client address) or a
    loopback address (which is where ``kubectl port-forward`` and ``ssh -L`` connect from)."""
    if not client or not client[0]:
        return True
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False
