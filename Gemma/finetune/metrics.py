"""Test-set metrics: how each example is scored, and the one registry of metrics that results.json, predictions.jsonl
and Gemma/compare_ablations.py share. A new metric is a per-example column written by score_predictions plus a Metric
in METRICS; the comparison then reports it, with paired intervals. Standard library only."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def normalize_answer(text: str) -> str:
    """Case, spacing and a trailing full stop do not make an answer wrong: "Comedy." matches "comedy"."""
    return " ".join(text.strip().rstrip(".").lower().split())


def parse_number(text: str) -> float | None:
    """The first number in a generated answer ("4 stars" -> 4.0), or None when there is none."""
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


@dataclass(frozen=True)
class Aggregate:
    """finish(weighted mean of per_example(value)) over the examples. Every metric here has this form (exact match,
    MAE and the token-weighted loss are weighted means; RMSE is the root of a mean square), so a bootstrap resample
    needs only weighted sums. Works on Python numbers and on numpy arrays alike."""

    squared: bool = False

    def per_example(self, value):
        return value * value if self.squared else value

    def finish(self, mean):
        return mean ** 0.5 if self.squared else mean

    def __call__(self, values: Sequence, weights: Sequence | None = None) -> float:
        weights = [1.0] * len(values) if weights is None else weights
        total = math.fsum(float(w) * float(self.per_example(v)) for v, w in zip(values, weights, strict=True))
        return float(self.finish(total / math.fsum(float(w) for w in weights)))


MEAN = Aggregate()
ROOT_MEAN_SQUARE = Aggregate(squared=True)


@dataclass(frozen=True)
class Metric:
    """A test-set metric over the rows of predictions.jsonl: aggregate(column) over the rows whose column is not null,
    each weighted by its `weight` column (None: equally)."""

    name: str  # the comparison's name for it (table, CSV columns <name>, <name>_diff, <name>_lo, <name>_hi)
    key: str  # its key in results.json's "test" section
    label: str
    column: str  # the per-example value in predictions.jsonl
    aggregate: Aggregate = MEAN
    weight: str | None = None
    numeric_only: bool = False  # only for numeric targets (every target a number); unparsable answers have no value
    lower_is_better: bool = False

    def applies(self, numeric: bool) -> bool:
        return numeric or not self.numeric_only

    def value(self, rows: Sequence[dict]) -> float | None:
        kept = [r for r in rows if r[self.column] is not None]
        if not kept:
            return None
        return self.aggregate([r[self.column] for r in kept], None if self.weight is None else
                              [r[self.weight] for r in kept])


TEST_LOSS = Metric("test_loss", "loss", "test loss", column="loss", weight="target_tokens", lower_is_better=True)
EXACT_MATCH = Metric("exact_match", "exact_match", "exact match", column="exact_match")
MAE = Metric("mae", "mae", "MAE", column="abs_error", numeric_only=True, lower_is_better=True)
RMSE = Metric("rmse", "rmse", "RMSE", column="abs_error", aggregate=ROOT_MEAN_SQUARE, numeric_only=True,
              lower_is_better=True)
METRICS = (TEST_LOSS, EXACT_MATCH, MAE, RMSE)


def main_metric(numeric: bool) -> Metric:
    """The metric a task is judged by: MAE for numeric targets (ratings), exact match otherwise."""
    return MAE if numeric else EXACT_MATCH


def is_numeric_task(targets: Sequence[str]) -> bool:
    """A task counts as numeric when every target is a number (e.g. a rating)."""
    return all(_NUMBER.fullmatch(t.strip()) for t in targets)


def score_predictions(rows: list[dict], test_examples: int) -> dict:
    """Adds exact_match / parsed / abs_error to each row (id, target, prediction, loss, target_tokens) and returns
    results.json's test metrics. On numeric tasks MAE and RMSE are over the predictions that parse as a number; the
    ones that do not are counted (unparsable), never silently dropped."""
    numeric = is_numeric_task([r["target"] for r in rows])
    for r in rows:
        r["exact_match"] = normalize_answer(r["prediction"]) == normalize_answer(r["target"])
        r["parsed"] = parse_number(r["prediction"]) if numeric else None
        r["abs_error"] = abs(r["parsed"] - float(r["target"])) if r["parsed"] is not None else None
    metrics = {"examples": test_examples, "generated": len(rows)}
    for metric in METRICS:
        metrics[metric.key] = metric.value(rows) if metric.applies(numeric) else None
    metrics["perplexity"] = math.exp(metrics[TEST_LOSS.key])
    metrics["numeric"] = numeric
    metrics["unparsable"] = sum(r["parsed"] is None for r in rows) if numeric else None
    return metrics
