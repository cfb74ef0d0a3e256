"""The contenders of the benchmark suite: each serves SSE streams under the same load.

A contender starts its server(s) bound to a unix socket or a kernel-picked loopback port,
prepares ``streams`` streams (1..streams), tells the suite when its clients are connected,
and publishes events at a rate: every event's data is a JSON object carrying ``"t"`` (the
publisher's ``time.time()`` when it sent the event) and ``"n"`` (its number), and each stream
ends with a ``complete`` event. The load client measures latency as ``time.time() - t``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol


@dataclasses.dataclass
class Endpoint:
    """Where clients connect, and which processes the suite measures (CPU, RSS)."""

    socket: Path | None = None  # a unix socket ...
    host: str | None = None  # ... or a loopback host and port
    port: int | None = None
    server_pids: list[int] = dataclasses.field(default_factory=list)  # the contender's servers
    redis_pid: int | None = None  # the Redis it uses, if any


class Contender(Protocol):
    name: str

    async def start(self, workdir: Path, streams: int) -> Endpoint:
        """Start the server(s) and prepare streams 1..streams."""
        ...

    def stream_path(self, stream: int) -> str:
        """The URL path a client GETs for stream ``stream``."""
        ...

    async def wait_for_clients(self, expected: int, within: float) -> None:
        """Return once the server holds ``expected`` stream connections (or, for a server that
        cannot tell, after a settle time)."""
        ...

    async def publish(self, stream: int, rate: float, seconds: float) -> int:
        """Publish ``rate`` events/s to ``stream`` for ``seconds``, then ``complete``; returns
        the number of events published (without ``complete``)."""
        ...

    async def stop(self) -> None:
        """Stop every process this contender started (by pid)."""
        ...
