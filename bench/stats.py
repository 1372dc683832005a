"""Percentiles of latency samples and the spread of figures over rounds."""

from __future__ import annotations

import statistics

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def percentiles_us(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max of samples in seconds, in microseconds
    (nearest rank; an empty sample gives zeros)."""
    if not seconds:
        return {**{name: 0.0 for name, _ in PERCENTILES}, "max": 0.0, "samples": 0}
    ordered = sorted(seconds)
    n = len(ordered)
    out = {name: round(ordered[min(n - 1, max(0, int(-(-q * n // 100)) - 1))] * 1e6, 1) for name, q in PERCENTILES}
    out["max"] = round(ordered[-1] * 1e6, 1)
    out["samples"] = n
    return out


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of one figure over the rounds."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
