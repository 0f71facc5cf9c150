"""Paired percentile bootstrap intervals for the difference of a metric between two runs on the same examples."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .metrics import MEAN, Aggregate

# Resamples are drawn in blocks of about this many (resample, example) counts: a block stays in cache (2000 x 5000 runs
# 3-5x faster than in one block) and memory stays bounded for any test set.
BOOTSTRAP_BLOCK = 250_000


class Difference(NamedTuple):
    """metric(run) - metric(reference) and its percentile bootstrap interval."""

    diff: float
    lo: float
    hi: float


def resample_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) counts: how often each of n examples is drawn when n are drawn with replacement."""
    draws = rng.integers(0, n, size=(n_resamples, n), dtype=np.int32)
    draws += (n * np.arange(n_resamples, dtype=np.int32))[:, None]  # row r counts into bins r*n .. r*n + n-1
    return np.bincount(draws.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    metric: Aggregate = MEAN,
    *,
    weights: np.ndarray | tuple[np.ndarray | None, np.ndarray | None] | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """metric(a) - metric(b) with a paired percentile bootstrap interval.

    a, b: per-example values of two runs, aligned (element i of both is the same example). weights: per-example
    weights (target tokens for the token-weighted loss), one array for both runs or a pair (weights_a, weights_b).
    Each resample draws n example positions with replacement from a seeded numpy Generator, applies the same draw to
    both runs and recomputes the metric on each; lo and hi are the (1 -/+ confidence) / 2 quantiles of the differences.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be non-empty 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and n_resamples >= 1, got {confidence} and {n_resamples}")
    wa, wb = (weights, weights) if weights is None or isinstance(weights, np.ndarray) else weights
    wa = np.ones_like(a) if wa is None else np.asarray(wa, dtype=np.float64)
    wb = np.ones_like(b) if wb is None else np.asarray(wb, dtype=np.float64)
    diff = metric(a, wa) - metric(b, wb)

    # Columns (weighted value, weight) per run: resample counts @ columns gives every resample's weighted sums.
    columns_a = np.stack([wa * metric.per_example(a), wa], axis=1)
    columns_b = np.stack([wb * metric.per_example(b), wb], axis=1)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    block = max(1, BOOTSTRAP_BLOCK // a.size)
    for start in range(0, n_resamples, block):
        counts = resample_counts(a.size, min(block, n_resamples - start), rng)
        sums_a, sums_b = counts @ columns_a, counts @ columns_b
        diffs[start:start + len(counts)] = (metric.finish(sums_a[:, 0] / sums_a[:, 1])
                                            - metric.finish(sums_b[:, 0] / sums_b[:, 1]))
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return Difference(diff, float(lo), float(hi))
