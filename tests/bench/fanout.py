"""One fan-out measurement, outside the suite: one contender, N clients on one stream.

For iterating on a gateway without running the whole suite (``python -m tests.bench --only
fanout`` runs the scenario)::

    .venv/bin/python -m tests.bench.fanout --contender streamcoord --clients 1000 --rate 100

Prints the figures as JSON. Built on the suite's parts: liverun.py (the measurement),
loadclient.py (the load process), sampler.py and stats.py. ``--client-mode`` runs the load
client in live mode (``python -m tests.bench.loadclient live`` is the same), and the /proc and
percentile helpers stay importable from here, for callers of this module's first version.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import loadclient
from .sampler import proc_cpu_seconds, proc_rss_mb
from .stats import percentile_ms

__all__ = ["main", "percentile_ms", "proc_cpu_seconds", "proc_rss_mb"]


async def measure(args: argparse.Namespace) -> dict[str, object]:
    from .contenders.lineup import make
    from .liverun import LiveLoad, measure_live
    from .procs import stop_all_children

    load = LiveLoad(1, args.clients, args.rate, args.seconds, drain_seconds=args.drain)
    with tempfile.TemporaryDirectory(prefix="scbench-") as tmp:
        try:
            metrics, notes = await measure_live(
                make(args.contender, clients=args.clients), Path(tmp), load
            )
        finally:
            await stop_all_children()
    return {"contender": args.contender, **load.params(), **metrics, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.fanout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--contender", default="streamcoord",
                        choices=["bare", "naive", "predecessor", "streamcoord"])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100, help="events/s")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--drain", type=float, default=15, help="seconds to receive after publishing")
    argv = sys.argv[1:] if argv is None else argv
    if "--client-mode" in argv:  # the first version's load client: now loadclient's live mode
        return loadclient.main(["live", *(a for a in argv if a != "--client-mode")])
    args = parser.parse_args(argv)
    from streamcoord import runtime

    print(json.dumps(runtime.run(measure(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
