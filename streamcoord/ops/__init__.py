"""Operations: what the whole system is doing, read straight from Redis (no Django, no gateway).

One module per view, each taking a Redis client (any topology) and a :class:`KeySpace`:

    status    queue, workers, gateways, dead letters, tasks by state (``collect_status``)
    records   every task's state record, found with SCAN in bounded batches (every master)
    tasks     tasks listed and filtered; one task's record and latest events
    tail      one task's events followed exactly once until its end
    control   cancel and retry without Django
    render    the text and rich views of all of the above (pure)
    commands  the ``streamcoord`` operator subcommands that put them together
"""

from __future__ import annotations

from .status import Status, collect_status

__all__ = ["Status", "collect_status"]
