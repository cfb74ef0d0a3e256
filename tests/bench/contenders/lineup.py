"""The contenders by name, made fresh for each measurement.

The predecessor's module (predecessor.py, django-streaming-coordinator 0.2.1 in a venv of its
own) is imported only when it is asked for, so a suite without it still runs: its rows then say
why it is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from . import Contender
from .bare import Bare
from .naive import Naive
from .streamcoord import Streamcoord

#: The fan-out line-up, in the order the tables list them.
ALL = ("bare", "naive", "predecessor", "streamcoord")
#: The display name of each, for rows of contenders that could not be made.
TITLES = {
    "bare": Bare.name, "naive": Naive.name, "predecessor": "predecessor 0.2.1",
    "streamcoord": Streamcoord.name, "streamcoord-cluster": "streamcoord (3-master cluster)",
}


class Unavailable(Exception):
    """A contender that cannot run here (its module is missing or fails to import)."""


def _predecessor() -> Contender:
    try:
        module = importlib.import_module("tests.bench.contenders.predecessor")
        factory: Callable[[], Contender] = module.Predecessor
        return factory()
    except Exception as exc:  # whatever its import or constructor raise, the row says it
        raise Unavailable(f"predecessor unavailable: {type(exc).__name__}: {exc}") from exc


def make(name: str, *, clients: int = 1000) -> Contender:
    """A new contender; ``clients`` sizes the naive gateway's Redis pool."""
    if name == "bare":
        return Bare()
    if name == "naive":
        return Naive(clients=clients)
    if name == "streamcoord":
        return Streamcoord()
    if name == "streamcoord-cluster":
        from .cluster import StreamcoordCluster  # tests.topologies: only when asked for

        return StreamcoordCluster()
    if name == "predecessor":
        return _predecessor()
    raise ValueError(f"unknown contender {name!r}")
