"""CPU time and memory of processes, sampled from /proc while a benchmark runs.

The machine is shared (another test suite may run beside the benchmark), so the busy time of the
whole host is sampled too: what our processes did not use of it was someone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: How often the sampler reads /proc.
SAMPLE_INTERVAL = 0.2
HOST = "host"


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def host_cpu_seconds() -> float:
    """CPU time all cores of this machine spent busy (not idle, not waiting for I/O) so far."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user..steal; guest time is inside user


def proc_rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (0.0 once it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclasses.dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    cpu: float  # cumulative CPU seconds
    rss_mb: float


class ProcSampler:
    """Samples named processes every ``interval`` seconds, and the busy time of the whole
    machine as ``"host"``. Names sharing a prefix (``server-0``, ``server-1``) add up."""

    def __init__(self, pids: dict[str, int], interval: float = SAMPLE_INTERVAL) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[Sample]] = {name: [] for name in [*pids, HOST]}

    def sample(self) -> None:
        now = time.time()
        self.samples[HOST].append(Sample(now, host_cpu_seconds(), 0.0))
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError, ValueError, IndexError):  # the process is gone
                self.samples[name].append(Sample(now, proc_cpu_seconds(pid), proc_rss_mb(pid)))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ProcSampler]:
        """Sample in the background for the duration of the block (and once at each end)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval)
                self.sample()

        self.sample()
        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.sample()

    def _names(self, prefix: str) -> list[str]:
        return [n for n in self.samples if n == prefix or n.startswith(prefix + "-")]

    def cpu_percent(self, prefix: str, start: float, end: float) -> float | None:
        """Mean CPU use of the processes named ``prefix`` (or ``prefix-*``) between two
        wall-clock times, in % of one core; None when there is nothing to tell."""
        used, known = 0.0, False
        for name in self._names(prefix):
            samples = self.samples[name]
            if len(samples) >= 2 and end > start:
                used += _cpu_at(samples, end) - _cpu_at(samples, start)
                known = True
        return round(100 * used / (end - start), 1) if known else None

    def peak_rss_mb(self, prefix: str, start: float, end: float) -> float | None:
        """The highest RSS (summed over ``prefix-*``) sampled between two times."""
        totals: dict[float, float] = {}
        for name in self._names(prefix):
            for s in self.samples[name]:
                if start <= s.at <= end:
                    totals[s.at] = totals.get(s.at, 0.0) + s.rss_mb
        return round(max(totals.values()), 1) if totals else None

    def others_cpu_percent(self, start: float, end: float) -> float | None:
        """Busy time of the host not spent by any process we sample, in % of one core."""
        host = self.cpu_percent(HOST, start, end)
        if host is None:
            return None
        ours = sum(self.cpu_percent(n, start, end) or 0.0 for n in self.pids)
        return round(max(0.0, host - ours), 1)


def _cpu_at(samples: list[Sample], at: float) -> float:
    """Cumulative CPU time at ``at``, interpolated between the samples around it."""
    if at <= samples[0].at:
        return samples[0].cpu
    for before, after in itertools.pairwise(samples):
        if before.at <= at <= after.at:
            share = (at - before.at) / (after.at - before.at) if after.at > before.at else 0.0
            return before.cpu + share * (after.cpu - before.cpu)
    return samples[-1].cpu
