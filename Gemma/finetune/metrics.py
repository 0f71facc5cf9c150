"""Test-set metrics: how each example is scored, and the one registry of metrics that results.json, predictions.jsonl
and Gemma/compare_ablations.py share. A new metric is a per-example column written by score_predictions plus a Metric
in METRICS; the comparison then reports it, with paired intervals. Pure functions over numbers and numpy arrays;
ROUGE through Google's rouge-score package. Only the standard library at module level."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads where a statistic is computed: this module is on the path of --help
    import numpy as np

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# Free-text targets longer than this many words on average (LaMP-4/5/7 headlines, titles, tweets) are judged by
# ROUGE-L: exact match of a sentence is almost always 0. Shorter ones (a genre, a tag) are judged by exact match.
LONG_TEXT_WORDS = 3


def normalize_answer(text: str) -> str:
    """Case, spacing and a trailing full stop do not make an answer wrong: "Comedy." matches "comedy"."""
    return " ".join(text.strip().rstrip(".").lower().split())


def parse_number(text: str) -> float | None:
    """The first number in a generated answer ("4 stars" -> 4.0), or None when there is none."""
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


# ----------------------------------------------------------------------------------------------------------------------
# Aggregates: how a column of per-example values becomes one number, on the data and on bootstrap resamples
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregate:
    """finish(weighted mean of per_example(value)) over the examples (exact match, MAE, ROUGE and the token-weighted
    loss are weighted means; RMSE is the root of a mean square), so a bootstrap resample needs only weighted sums.
    Works on Python numbers and on numpy arrays alike."""

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


class RowStatistic:
    """A metric that is no weighted mean of per-example values (macro-F1, AUC): a function of (n, 2) rows
    [value, target class] and of how often each row counts. resampled(counts, rows) computes it for every bootstrap
    resample at once from (resamples, n) counts, so a bootstrap recomputes it exactly on the resampled rows."""

    def resampled(self, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, rows: Sequence, weights: Sequence | None = None) -> float:
        """The statistic of the rows, each counted `weights` times (None: once)."""
        import numpy as np

        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        counts = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64)
        return float(self.resampled(counts[None, :], rows)[0])


class MacroF1(RowStatistic):
    """Mean over classes of F1 = 2 TP / (2 TP + FP + FN); rows are [predicted class, target class]. A class that is
    neither a target nor a prediction among the counted rows has no F1 and is left out of the mean (scikit-learn's
    labels=present classes). Every count is a weighted sum over rows, so resamples are one matrix product."""

    def resampled(self, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        import numpy as np

        tp, fp, fn = class_counts(counts, rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * tp / (2 * tp + fp + fn)  # NaN for a class absent from both columns
        return np.nanmean(f1, axis=-1)


class BinaryAUC(RowStatistic):
    """Area under the ROC curve; rows are [probability of the positive class, target class (1: positive)]. The
    Mann-Whitney U statistic: the share of (positive, negative) pairs that the probability orders rightly, a tie
    counting one half. Per resample: the rows sorted by probability once, tied rows grouped, and each positive group
    scored against the negatives counted below it."""

    def resampled(self, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        import numpy as np

        order = np.argsort(rows[:, 0], kind="stable")
        scores, positive = rows[order, 0], rows[order, 1] == 1
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # the first row of each group of equal scores
        c = counts[:, order]
        pos = np.add.reduceat(np.where(positive, c, 0.0), starts, axis=1)
        neg = np.add.reduceat(np.where(positive, 0.0, c), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        with np.errstate(invalid="ignore", divide="ignore"):  # no positive or no negative drawn: NaN
            return np.sum(pos * (below + 0.5 * neg), axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def class_counts(counts: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TP, FP, FN) per class, each (resamples, classes), for rows [predicted class, target class] (0, 1, ...)."""
    import numpy as np

    predicted, target = rows[:, 0].astype(int), rows[:, 1].astype(int)
    classes = np.arange(max(predicted.max(), target.max()) + 1)
    hit = predicted[:, None] == classes
    true = target[:, None] == classes
    indicators = np.concatenate([hit & true, hit & ~true, ~hit & true], axis=1).astype(np.float64)
    return np.split(counts @ indicators, 3, axis=-1)


MACRO_F1 = MacroF1()
BINARY_AUC = BinaryAUC()


# ----------------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A test-set metric over the rows of predictions.jsonl: aggregate(column) over the rows whose column is not null,
    each weighted by its `weight` column (None: equally). A RowStatistic reads the rows [column, with_column]. A
    metric whose column is null in every row does not apply to the task (AUC without two answer choices)."""

    name: str  # the comparison's name for it (table, CSV columns <name>, <name>_diff, <name>_lo, <name>_hi)
    key: str  # its key in results.json's "test" section
    label: str
    column: str  # the per-example value in predictions.jsonl
    aggregate: Aggregate | RowStatistic = MEAN
    weight: str | None = None
    with_column: str | None = None  # a RowStatistic's second column (the target class)
    numeric_only: bool = False  # only for numeric targets (every target a number); unparsable answers have no value
    lower_is_better: bool = False

    def applies(self, numeric: bool) -> bool:
        return numeric or not self.numeric_only

    @property
    def columns(self) -> tuple[str, ...]:
        """The predictions.jsonl columns it reads."""
        return tuple(c for c in (self.column, self.with_column, self.weight) if c is not None)

    def value(self, rows: Sequence[dict]) -> float | None:
        kept = [r for r in rows if r[self.column] is not None]
        if not kept:
            return None
        if isinstance(self.aggregate, RowStatistic):
            return self.aggregate([[r[self.column], r[self.with_column]] for r in kept])
        return self.aggregate([r[self.column] for r in kept], None if self.weight is None else
                              [r[self.weight] for r in kept])


TEST_LOSS = Metric("test_loss", "loss", "test loss", column="loss", weight="target_tokens", lower_is_better=True)
# With answer choices the prediction is the most likely choice, and exact match is its accuracy.
EXACT_MATCH = Metric("exact_match", "exact_match", "exact match", column="exact_match")
MACRO_F1_METRIC = Metric("macro_f1", "macro_f1", "macro-F1", column="predicted_class", aggregate=MACRO_F1,
                         with_column="target_class")
AUC = Metric("auc", "auc", "AUC", column="positive_probability", aggregate=BINARY_AUC, with_column="target_class")
MAE = Metric("mae", "mae", "MAE", column="abs_error", numeric_only=True, lower_is_better=True)
RMSE = Metric("rmse", "rmse", "RMSE", column="abs_error", aggregate=ROOT_MEAN_SQUARE, numeric_only=True,
              lower_is_better=True)
EXPECTED_MAE = Metric("expected_mae", "expected_mae", "MAE of the expected rating", column="expected_abs_error",
                      numeric_only=True, lower_is_better=True)
EXPECTED_RMSE = Metric("expected_rmse", "expected_rmse", "RMSE of the expected rating", column="expected_abs_error",
                       aggregate=ROOT_MEAN_SQUARE, numeric_only=True, lower_is_better=True)
ROUGE_1 = Metric("rouge1", "rouge1", "ROUGE-1", column="rouge1")
ROUGE_L = Metric("rougeL", "rougeL", "ROUGE-L", column="rougeL")
METRICS = (TEST_LOSS, EXACT_MATCH, MACRO_F1_METRIC, AUC, MAE, RMSE, EXPECTED_MAE, EXPECTED_RMSE, ROUGE_1, ROUGE_L)
BY_NAME = {m.name: m for m in METRICS}
# Every run has these metrics' columns (never null); the others' columns are null where the metric does not apply and
# absent from predictions.jsonl files written before they existed.
EVERY_TASK_COLUMNS = frozenset(TEST_LOSS.columns + EXACT_MATCH.columns)


def main_metric(numeric: bool, choices: Sequence[str] | None = None, targets: Sequence[str] = ()) -> Metric:
    """The metric a task is judged by. Answer choices: numeric ones (ratings) by the MAE of the expected rating (it
    uses the whole distribution over the choices), others by accuracy (macro-F1 is reported beside it, for
    imbalanced classes). Generated answers: numbers by MAE; free text by ROUGE-L when the targets average more than
    LONG_TEXT_WORDS words, else by exact match."""
    if choices:
        return EXPECTED_MAE if numeric else EXACT_MATCH
    if numeric:
        return MAE
    words = [len(t.split()) for t in targets]
    return ROUGE_L if words and sum(words) / len(words) > LONG_TEXT_WORDS else EXACT_MATCH


def is_numeric_task(targets: Sequence[str]) -> bool:
    """A task counts as numeric when every target is a number (e.g. a rating)."""
    return all(_NUMBER.fullmatch(t.strip()) for t in targets)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring the rows of predictions.jsonl
# ----------------------------------------------------------------------------------------------------------------------


def rouge_scores(targets: Sequence[str], predictions: Sequence[str]) -> list[tuple[float, float]]:
    """(ROUGE-1, ROUGE-L) F-measure per example, by rouge-score (Google's reference implementation; its default
    tokenizer lowercases and keeps letters and digits; no stemming, as in LaMP)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(t, p) for t, p in zip(targets, predictions, strict=True)]
    return [(s["rouge1"].fmeasure, s["rougeL"].fmeasure) for s in scores]


def per_class_f1(rows: Sequence[dict], choices: Sequence[str]) -> dict[str, float | None]:
    """F1 of each choice as a class (None for a choice that is neither a target nor a prediction)."""
    import numpy as np

    tp, fp, fn = class_counts(np.ones((1, len(rows))), np.array([[r["predicted_class"], r["target_class"]]
                                                                  for r in rows], dtype=np.float64))
    f1 = {}
    for k, choice in enumerate(choices):
        counted = k < tp.shape[1] and 2 * tp[0, k] + fp[0, k] + fn[0, k] > 0
        f1[choice] = float(2 * tp[0, k] / (2 * tp[0, k] + fp[0, k] + fn[0, k])) if counted else None
    return f1


def score_choice_columns(row: dict, choices: Sequence[str], numeric: bool) -> None:
    """The columns of a row scored over answer choices (choice_probabilities set): the classes, the positive
    probability (two choices: the second choice is the positive class, as in "no", "yes") and, for numeric choices,
    the expected value sum(p_i * v_i) and its absolute error."""
    probabilities = row["choice_probabilities"]
    row["target_class"] = choices.index(row["target"])
    row["predicted_class"] = choices.index(row["prediction"])
    row["positive_probability"] = probabilities[choices[1]] if len(choices) == 2 else None
    row["expected"] = (math.fsum(p * float(c) for c, p in probabilities.items()) if numeric else None)
    row["expected_abs_error"] = abs(row["expected"] - float(row["target"])) if numeric else None


def score_predictions(rows: list[dict], test_examples: int, choices: Sequence[str] | None = None) -> dict:
    """Adds the per-example columns of METRICS to each row (id, target, prediction, loss, target_tokens, and with
    answer choices choice_probabilities) and returns results.json's test metrics. On numeric tasks MAE and RMSE are
    over the predictions that parse as a number; the ones that do not are counted (unparsable), never silently
    dropped. With choices every prediction is a choice, so every one parses."""
    targets = [r["target"] for r in rows]
    numeric = is_numeric_task(targets)
    free_text = not choices and not numeric
    rouge = rouge_scores(targets, [r["prediction"] for r in rows]) if free_text else [(None, None)] * len(rows)
    for r, (rouge1, rouge_l) in zip(rows, rouge, strict=True):
        r["exact_match"] = normalize_answer(r["prediction"]) == normalize_answer(r["target"])
        r["parsed"] = parse_number(r["prediction"]) if numeric else None
        r["abs_error"] = abs(r["parsed"] - float(r["target"])) if r["parsed"] is not None else None
        r["rouge1"], r["rougeL"] = rouge1, rouge_l
        if choices:
            score_choice_columns(r, choices, numeric)
        else:
            r.update(target_class=None, predicted_class=None, positive_probability=None, expected=None,
                     expected_abs_error=None)
    metrics: dict = {"examples": test_examples, "generated": len(rows)}
    for metric in METRICS:
        metrics[metric.key] = metric.value(rows) if metric.applies(numeric) else None
    metrics["per_class_f1"] = per_class_f1(rows, choices) if choices else None
    metrics["perplexity"] = math.exp(metrics[TEST_LOSS.key])
    metrics["numeric"] = numeric
    metrics["unparsable"] = sum(r["parsed"] is None for r in rows) if numeric else None
    metrics["main_metric"] = main_metric(numeric, choices, targets).name
    return metrics
