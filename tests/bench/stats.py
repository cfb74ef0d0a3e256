"""Latency histograms: log-linear buckets, cheap to fill, merged across processes, read as
percentiles.

A bucket is a whole number of 0.1 ms units: exact to 0.1 ms below 100 ms, to 1 ms below 1 s and
to 10 ms beyond, so a histogram stays small (a few thousand buckets at most) however long the
latencies grow. A percentile is read as the upper edge of the bucket it falls in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

#: Width of the finest bucket, in seconds.
UNIT_SECONDS = 1e-4
#: Buckets below this many units are one unit wide, below the next ten, beyond that a hundred.
_FINE, _MEDIUM = 1_000, 10_000

Histogram = dict[int, int]


def bucket_of(seconds: float) -> int:
    """The bucket a latency falls in (negative latencies, from clock skew, count as 0)."""
    units = int(seconds / UNIT_SECONDS)
    if units < _FINE:
        return max(units, 0)
    if units < _MEDIUM:
        return units - units % 10
    return units - units % 100


def bucket_width(bucket: int) -> int:
    return 1 if bucket < _FINE else 10 if bucket < _MEDIUM else 100


def record(histogram: Histogram, seconds: float) -> None:
    bucket = bucket_of(seconds)
    histogram[bucket] = histogram.get(bucket, 0) + 1


def merge(histograms: Iterable[Mapping[Any, int]]) -> Histogram:
    """One histogram from several; keys may be strings (as they come back from JSON)."""
    merged: Histogram = {}
    for histogram in histograms:
        for bucket, count in histogram.items():
            key = int(bucket)
            merged[key] = merged.get(key, 0) + count
    return merged


def count(histogram: Histogram) -> int:
    return sum(histogram.values())


def percentile_ms(histogram: Histogram, fraction: float) -> float | None:
    """The latency below which ``fraction`` of the samples fall (bucket upper edge), in ms;
    None for an empty histogram."""
    total = count(histogram)
    if not total:
        return None
    wanted = fraction * total
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= wanted:
            return round((bucket + bucket_width(bucket)) * UNIT_SECONDS * 1000, 2)
    raise AssertionError("unreachable: the cumulative count reaches the total")


def summary_ms(histogram: Histogram) -> dict[str, float | None]:
    """p50, p99 and max in ms (None when there were no samples)."""
    return {
        "p50_ms": percentile_ms(histogram, 0.50),
        "p99_ms": percentile_ms(histogram, 0.99),
        "max_ms": percentile_ms(histogram, 1.0),
    }


def quantile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank quantile of a small list of values (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def per_second(amount: float, seconds: float) -> float | None:
    return round(amount / seconds, 1) if seconds > 0 else None
