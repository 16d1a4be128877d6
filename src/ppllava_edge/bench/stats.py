"""Summary statistics of timing samples, with llama-bench's conventions.

- stddev is the *sample* standard deviation (N−1) and 0 for N <= 1 (llama-bench `stdev()`);
- percentiles interpolate linearly between the two nearest ranks (numpy's default "linear" method), so for one
  sample every statistic is that sample;
- rates (tokens/s) are computed per sample and then summarised, never as total tokens / total time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

STATS = ("min", "mean", "p50", "p90", "p95", "p99", "stddev")
"""The statistics every stage reports (JSON `stages.<stage>` keys; `max` and `n` are added too)."""


def stddev(samples: Sequence[float]) -> float:
    """Sample standard deviation (divides by N−1); 0.0 for fewer than two samples."""
    n = len(samples)
    if n <= 1:
        return 0.0
    mean = math.fsum(samples) / n
    return math.sqrt(math.fsum((x - mean) ** 2 for x in samples) / (n - 1))


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summarize(samples: Sequence[float]) -> dict:
    """{min, mean, p50, p90, p95, p99, stddev, max, n} of `samples`; every value None when there are none."""
    xs = [float(x) for x in samples]
    if not xs:
        return {**{k: None for k in STATS}, "max": None, "n": 0}
    arr = np.asarray(xs, dtype=np.float64)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(arr, [50, 90, 95, 99]))
    return {
        "min": float(arr.min()),
        "mean": math.fsum(xs) / len(xs),
        "p50": p50,
        "p90": p90,
        "p95": p95,
        "p99": p99,
        "stddev": stddev(xs),
        "max": float(arr.max()),
        "n": len(xs),
    }


def mean_std(samples: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample stddev), or (None, None) without samples."""
    xs = [float(x) for x in samples]
    if not xs:
        return None, None
    return math.fsum(xs) / len(xs), stddev(xs)
