"""Percentile bootstrap intervals for the difference of a metric between two ablations on the same test examples:
paired_bootstrap for one run each (resamples test examples), seed_example_bootstrap for several training seeds each
(resamples seeds and test examples together). Both take a weighted-mean Aggregate (vectorised through weighted sums)
or a RowStatistic (macro-F1, AUC: recomputed on every resample's rows through resample counts)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .metrics import MEAN, Aggregate, RowStatistic

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
    metric: Aggregate | RowStatistic = MEAN,
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
    rows = isinstance(metric, RowStatistic)  # a, b: (n, 2) rows, no weights
    if a.ndim != 1 + rows or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be non-empty {'(n, 2)' if rows else '1-D'} arrays of one shape, got shapes "
                         f"{a.shape} and {b.shape}")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and n_resamples >= 1, got {confidence} and {n_resamples}")
    if rows:
        return _paired_rows(a, b, metric, n_resamples, confidence, seed)
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


def _quantiles(diff: float, stats: np.ndarray, confidence: float) -> Difference:
    """The difference and the percentile interval of its resampled values (NaN ones left out)."""
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return Difference(diff, math.nan, math.nan)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return Difference(diff, float(lo), float(hi))


def _paired_rows(a: np.ndarray, b: np.ndarray, metric: RowStatistic, n_resamples: int, confidence: float,
                 seed: int) -> Difference:
    """paired_bootstrap for a RowStatistic: the same resample counts applied to both runs' rows. The counts come
    from the same seeded draws as for an Aggregate. A resample whose statistic is undefined (AUC with no positive
    drawn) is left out of the quantiles."""
    n = len(a)
    diff = float(metric.resampled(np.ones((1, n)), a)[0] - metric.resampled(np.ones((1, n)), b)[0])
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    block = max(1, BOOTSTRAP_BLOCK // n)
    for start in range(0, n_resamples, block):
        counts = resample_counts(n, min(block, n_resamples - start), rng)
        diffs[start:start + len(counts)] = metric.resampled(counts, a) - metric.resampled(counts, b)
    return _quantiles(diff, diffs, confidence)


def seed_example_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    metric: Aggregate | RowStatistic = MEAN,
    *,
    weights: np.ndarray | tuple[np.ndarray | None, np.ndarray | None] | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """mean over training seeds s of metric(a[s]) - metric(b[s]), with a two-level percentile bootstrap interval.

    a, b: (seeds, examples) per-example values of two ablations, aligned on both axes: row s of a and row s of b are
    the runs trained with seed s (the same batches, so the two are paired), column i is the same test example in every
    run. NaN marks an example without a value in that run (MAE of an unparsable answer); seed s's difference then uses
    the examples that have a value in both a[s] and b[s]. weights: per-example weights as in paired_bootstrap, (seeds,
    examples) arrays.

    Why two levels: the mean difference varies with the test examples drawn AND with the training seeds; its variance
    has an example component and a seed component, and fine-tuning runs that differ only in seed often differ by more
    than the gaps being measured. paired_bootstrap resamples only examples, so it misses the seed component (Bouthillier
    et al. 2021, "Accounting for Variance in Machine Learning Benchmarks", MLSys: both sources must be sampled). Each
    resample here draws the seeds with replacement (a drawn seed brings its pair of runs) and, independently, the test
    examples with replacement (one draw shared by every run, as the examples are one sample of the task), and computes
    the mean over the drawn seeds of the paired difference on the drawn examples. With identical seeds the seed draw
    changes nothing and the interval is paired_bootstrap's (up to Monte Carlo noise). With few seeds the seed component
    is itself poorly known (and the bootstrap estimates it at (seeds - 1) / seeds of its size), so the interval is
    then still on the narrow side: more seeds give a truer one. A resample in which some drawn seed has no example with
    a value in both runs is left out of the quantiles.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rows = isinstance(metric, RowStatistic)  # a, b: (seeds, examples, 2) rows, no weights
    if a.ndim != 2 + rows or a.shape != b.shape or a.size == 0:
        raise ValueError(f"a and b must be non-empty (seeds, examples{', 2' if rows else ''}) arrays of one shape, "
                         f"got {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and n_resamples >= 1, got {confidence} and {n_resamples}")
    if rows:
        return _seed_example_rows(a, b, metric, n_resamples, confidence, seed)
    wa, wb = (weights, weights) if weights is None or isinstance(weights, np.ndarray) else weights
    wa = np.ones_like(a) if wa is None else np.broadcast_to(np.asarray(wa, dtype=np.float64), a.shape)
    wb = np.ones_like(b) if wb is None else np.broadcast_to(np.asarray(wb, dtype=np.float64), b.shape)
    # An example without a value in both runs of a seed weighs nothing in that seed's difference.
    both = ~np.isnan(a) & ~np.isnan(b)
    if not both.any(axis=1).all():
        raise ValueError("every seed needs at least one example with a value in both runs")
    wa, wb = np.where(both, wa, 0.0), np.where(both, wb, 0.0)
    va = np.where(both, metric.per_example(np.nan_to_num(a)), 0.0)
    vb = np.where(both, metric.per_example(np.nan_to_num(b)), 0.0)
    n_seeds, n = a.shape

    def seed_differences(sums: np.ndarray) -> np.ndarray:
        """(..., 4 * seeds) weighted sums [a values, a weights, b values, b weights] -> (..., seeds) differences."""
        sa, swa, sb, swb = np.split(sums, 4, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):  # a seed whose drawn examples all lack a value: NaN
            return metric.finish(sa / swa) - metric.finish(sb / swb)

    # Columns per run (seed): weighted value and weight; example counts @ columns gives every seed's weighted sums.
    columns = np.concatenate([(wa * va).T, wa.T, (wb * vb).T, wb.T], axis=1)  # (examples, 4 * seeds)
    diff = float(np.mean(seed_differences(columns.sum(axis=0))))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    block = max(1, BOOTSTRAP_BLOCK // n)
    for start in range(0, n_resamples, block):
        size = min(block, n_resamples - start)
        seed_counts = resample_counts(n_seeds, size, rng)  # (size, seeds): how often each seed is drawn
        per_seed = seed_differences(resample_counts(n, size, rng) @ columns)  # (size, seeds)
        drawn = seed_counts > 0  # a seed not drawn must not bring its NaN into the mean
        stats[start:start + size] = np.sum(np.where(drawn, per_seed, 0.0) * seed_counts, axis=1) / n_seeds
        stats[start:start + size][np.any(drawn & np.isnan(per_seed), axis=1)] = np.nan
    return _quantiles(diff, stats, confidence)


def _seed_example_rows(a: np.ndarray, b: np.ndarray, metric: RowStatistic, n_resamples: int, confidence: float,
                       seed: int) -> Difference:
    """seed_example_bootstrap for a RowStatistic, a and b (seeds, examples, 2): the same two-level draws (seeds with
    replacement, examples with replacement shared by every run); each seed's statistic is recomputed on the drawn
    rows of its runs that have a value in both (the others count zero times). A resample in which a drawn seed's
    difference is undefined is left out of the quantiles."""
    both = ~np.isnan(a).any(axis=2) & ~np.isnan(b).any(axis=2)
    if not both.any(axis=1).all():
        raise ValueError("every seed needs at least one example with a value in both runs")
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    n_seeds, n = both.shape

    def seed_differences(counts: np.ndarray) -> np.ndarray:
        """(size, examples) example counts -> (size, seeds) per-seed differences."""
        return np.stack([metric.resampled(counts * both[s], a[s]) - metric.resampled(counts * both[s], b[s])
                         for s in range(n_seeds)], axis=1)

    diff = float(np.mean(seed_differences(np.ones((1, n)))))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    block = max(1, BOOTSTRAP_BLOCK // n)
    for start in range(0, n_resamples, block):
        size = min(block, n_resamples - start)
        seed_counts = resample_counts(n_seeds, size, rng)
        per_seed = seed_differences(resample_counts(n, size, rng))
        drawn = seed_counts > 0
        stats[start:start + size] = np.sum(np.where(drawn, per_seed, 0.0) * seed_counts, axis=1) / n_seeds
        stats[start:start + size][np.any(drawn & np.isnan(per_seed), axis=1)] = np.nan
    return _quantiles(diff, stats, confidence)
