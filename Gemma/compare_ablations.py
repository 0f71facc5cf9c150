"""Compare finished runs of Gemma/train_deepspeed.py: one table row per ablation, paired bootstrap intervals.

Each RUN_DIR is an --output_dir of a finished run: it holds results.json, resolved_config.json and, when the run had a
test file, predictions.jsonl. Runs are compared only when they saw the same examples and differ in nothing but the
ablation; otherwise the tool lists what differs and stops (the two --allow_* flags compare them anyway).

Usage (from the repository root):

    # every ablation of one experiment; the reference is the profile_and_history run
    python Gemma/compare_ablations.py Gemma/outputs/profile_and_history Gemma/outputs/profile_only \\
        Gemma/outputs/history_only Gemma/outputs/query_only

    # another reference (a run directory, a run name or an ablation name), outputs elsewhere, a 90% interval
    python Gemma/compare_ablations.py Gemma/outputs/* --reference query_only \\
        --csv results/comparison.csv --figure results/comparison.png --confidence 0.9 --bootstrap 5000 --seed 1

    # compare anyway: runs whose example sets differ (e.g. one prompt dropped more over-long examples) or whose
    # configs differ in more than the ablation; the metrics then use the test ids common to all runs
    python Gemma/compare_ablations.py RUN_A RUN_B --allow_different_examples --allow_config_differences

Output: a Markdown table on stdout; a CSV (default <common parent of the runs>/comparison.csv) with separate value,
diff, lo and hi columns; a PNG (default <common parent>/comparison.png) with the validation-loss curves on the left and
the main metric (exact match, or MAE for numeric targets) per run on the right. Both files are written atomically.
Notes (which run is the reference, where the files went) go to stderr. Exit status: 0 done, 2 a problem you can fix
(one line naming it on stderr; for runs that are not comparable, one line per difference below it).

Metrics, each on the test examples of predictions.jsonl:
    test loss    token-weighted: sum(loss_i * target_tokens_i) / sum(target_tokens_i)
    exact match  fraction of examples whose prediction equals the target
    MAE, RMSE    numeric targets only, over the examples whose prediction parsed as a number; the difference from
                 the reference uses the examples parsed in both runs (the CSV's numeric_pairs counts them)
    eval loss    results.json's eval.eval_loss: the Trainer reports only the mean, so it has no interval
Differences are run minus reference. Intervals are paired percentile bootstraps: each resample draws test ids with
replacement, the same draw for both runs, and recomputes the metric on each. A run without predictions.jsonl (no
test file) is allowed when its results.json has no "test" section: it is compared on eval loss only and its test
metric cells stay empty.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger("compare_ablations")

# The file names the training script writes: one definition, so the two can never drift apart.
from train_deepspeed import PREDICTIONS_NAME, RESOLVED_CONFIG_NAME, RESULTS_NAME  # noqa: E402
DEFAULT_REFERENCE_ABLATION = "profile_and_history"  # the full prompt: every other ablation removes something from it
DEFAULT_CSV_NAME = "comparison.csv"
DEFAULT_FIGURE_NAME = "comparison.png"
# resolved_config.json keys that may differ between the runs of one ablation study (a key covers everything below it)
IGNORED_CONFIG_KEYS = frozenset({
    "prompt", "ablation", "cli.output_dir", "cli.ablation_config", "cli.resume_from_checkpoint",
    "cli.overwrite_output_dir", "deepspeed_config_file",
})
# --set overrides of these sections refine the ablation, so cli.overrides is compared without them
ABLATION_OVERRIDE_PREFIXES = ("prompt.",)
# bootstrap resamples are drawn in blocks of about this many (resample, example) counts: a block stays in cache
# (2000 x 5000 runs 3-5x faster than in one block) and memory stays bounded for any test set
BOOTSTRAP_BLOCK = 250_000


class UserError(Exception):
    """A problem the user can fix (a path, a run directory, a flag). main() prints it without a traceback."""

    def __init__(self, message: str, details: Sequence[str] = ()):
        self.message, self.details = message, list(details)
        super().__init__("\n".join([message, *details]))


# ----------------------------------------------------------------------------------------------------------------------
# Metrics and the paired bootstrap
# ----------------------------------------------------------------------------------------------------------------------


def _identity(x: np.ndarray) -> np.ndarray:
    return x


@dataclass(frozen=True)
class Metric:
    """finish(weighted mean of per_example(x)). Every metric in the table has this form (exact match, MAE and the
    token-weighted loss are weighted means; RMSE is sqrt of the mean square), so a bootstrap resample needs only
    weighted sums: a whole block of resamples is one product of a resample-count matrix with two columns."""

    per_example: Callable[[np.ndarray], np.ndarray] = _identity
    finish: Callable[[np.ndarray], np.ndarray] = _identity

    def __call__(self, values: np.ndarray, weights: np.ndarray | None = None) -> float:
        values = np.asarray(values, dtype=np.float64)
        w = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
        return float(self.finish(np.sum(w * self.per_example(values)) / np.sum(w)))


MEAN = Metric()
ROOT_MEAN_SQUARE = Metric(per_example=np.square, finish=np.sqrt)


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
    metric: Metric = MEAN,
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


# ----------------------------------------------------------------------------------------------------------------------
# Loading runs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """predictions.jsonl as aligned arrays, one element per generated test example."""

    ids: np.ndarray  # str
    loss: np.ndarray  # mean NLL over the example's target tokens
    target_tokens: np.ndarray
    exact_match: np.ndarray  # 0.0 or 1.0
    abs_error: np.ndarray  # NaN where the prediction did not parse as a number, or the task is not numeric

    def select(self, ids: np.ndarray) -> Predictions:
        """The rows of the given ids, in their order (every id must be present)."""
        order = np.argsort(self.ids, kind="stable")
        rows = order[np.searchsorted(self.ids[order], ids)]
        return Predictions(*(getattr(self, f.name)[rows] for f in fields(self)))


@dataclass(frozen=True)
class Run:
    path: Path
    name: str  # the directory name, or its path below the runs' common parent when two names collide
    ablation: str
    numeric: bool  # the test targets are numbers: MAE, RMSE and unparsable apply
    examples: dict[str, str]  # split -> ids_sha256
    eval_loss: float | None
    eval_curve: list[tuple[int, float]]  # (step, eval_loss) from log_history
    config: dict[str, Any]
    predictions: Predictions | None  # None: the run had no test file


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}).") from None


def _field(obj: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """obj[key], which must exist and have one of the given types (list type(None) to allow null)."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {json.dumps(obj)[:60]}.")
    if key not in obj:
        raise UserError(f"{where}: missing key {key!r}; was this file written by Gemma/train_deepspeed.py?")
    allowed = types if isinstance(types, tuple) else (types,)
    value = obj[key]
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):  # JSON true is no number
        names = "/".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise UserError(f"{where}: {key}: expected {names}, got {json.dumps(value)[:60]}.")
    return value


def _finite(value: float | None, where: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, got {value}.")
    return None if value is None else float(value)


def read_predictions(path: Path) -> Predictions:
    """Parse predictions.jsonl, checking every line; errors name the file and line."""
    ids, loss, tokens, match, error = [], [], [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}).") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg}); is the file truncated?") from None
        ids.append(str(_field(rec, "id", (str, int), where)))
        loss.append(_finite(_field(rec, "loss", (int, float), where), f"{where}: loss"))
        tokens.append(_field(rec, "target_tokens", int, where))
        if tokens[-1] < 1:
            raise UserError(f"{where}: target_tokens: must be >= 1, got {tokens[-1]}.")
        match.append(_field(rec, "exact_match", bool, where))
        err = _finite(_field(rec, "abs_error", (int, float, type(None)), where), f"{where}: abs_error")
        error.append(math.nan if err is None else err)
    if not ids:
        raise UserError(f"{path}: no predictions; the run's test generation did not finish.")
    id_array = np.array(ids)
    unique, counts = np.unique(id_array, return_counts=True)
    if len(unique) < len(id_array):
        raise UserError(f"{path}: duplicate ids, e.g. {', '.join(unique[counts > 1][:3])}; ids must be unique.")
    return Predictions(id_array, np.array(loss), np.array(tokens, dtype=np.float64),
                       np.array(match, dtype=np.float64), np.array(error))


def load_run(run_dir: Path) -> Run:
    """Read one run directory: results.json and resolved_config.json, plus predictions.jsonl when the run had a test
    file (results.json's "test" section says so)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory.")
    if not (run_dir / RESOLVED_CONFIG_NAME).is_file():
        raise UserError(f"{run_dir}: no {RESOLVED_CONFIG_NAME}; is this an --output_dir of Gemma/train_deepspeed.py?")
    if not (run_dir / RESULTS_NAME).is_file():
        raise UserError(f"{run_dir}: no {RESULTS_NAME}; is the run finished? (train_deepspeed.py writes it last)")
    results_path = run_dir / RESULTS_NAME
    results, config = _read_json(results_path), _read_json(run_dir / RESOLVED_CONFIG_NAME)
    if not isinstance(config, dict):
        raise UserError(f"{run_dir / RESOLVED_CONFIG_NAME}: expected a JSON object.")
    where = str(results_path)
    examples = {split: _field(stats, "ids_sha256", str, f"{where}: examples.{split}")
                for split, stats in _field(results, "examples", dict, where).items()}
    eval_metrics = _field(results, "eval", dict, where)
    eval_loss = (_finite(_field(eval_metrics, "eval_loss", (int, float), f"{where}: eval"), f"{where}: eval.eval_loss")
                 if "eval_loss" in eval_metrics else None)  # absent when the run had no validation file
    curve = {}
    for entry in _field(results, "log_history", list, where):
        if isinstance(entry, dict) and "eval_loss" in entry and "step" in entry:
            curve[entry["step"]] = entry["eval_loss"]  # a repeated final evaluation keeps the last value

    predictions_path = run_dir / PREDICTIONS_NAME
    test = results.get("test")  # absent (or null) when the run had no test file
    if test is None and predictions_path.exists():
        raise UserError(f"{run_dir}: {PREDICTIONS_NAME} exists but {RESULTS_NAME} has no \"test\" section; "
                        "was the run interrupted after generation?")
    if test is not None and not predictions_path.is_file():
        raise UserError(f"{run_dir}: {RESULTS_NAME} reports a test evaluation but {PREDICTIONS_NAME} is missing.")
    predictions, numeric = None, False
    if test is not None:
        numeric = _field(test, "numeric", bool, f"{where}: test")
        generated = _field(test, "generated", int, f"{where}: test")
        predictions = read_predictions(predictions_path)
        if len(predictions.ids) != generated:
            raise UserError(f"{predictions_path}: {len(predictions.ids)} predictions, but {RESULTS_NAME} says "
                            f"test.generated={generated}; is the file truncated?")
    return Run(path=run_dir, name=run_dir.resolve().name, ablation=_field(results, "ablation", str, where),
               numeric=numeric, examples=examples, eval_loss=eval_loss, eval_curve=sorted(curve.items()),
               config=config, predictions=predictions)


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest directory holding every run directory (for sibling runs: their parent)."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def load_runs(run_dirs: Sequence[Path]) -> list[Run]:
    """Load every run; rows are named by directory name, or by the path below the common parent when names collide."""
    resolved = [Path(d).resolve() for d in run_dirs]
    if len(set(resolved)) < len(resolved):
        raise UserError("the same run directory is given twice; list each run once.")
    runs = [load_run(Path(d)) for d in run_dirs]
    if len({r.name for r in runs}) < len(runs):
        parent = common_parent(resolved)
        runs = [replace(r, name=p.relative_to(parent).as_posix()) for r, p in zip(runs, resolved, strict=True)]
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# Comparability: the same examples, and configs that differ only in the ablation
# ----------------------------------------------------------------------------------------------------------------------


_ABSENT = object()  # a key one run's file lacks


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differs(runs: Sequence[Run], values: Sequence[Any]) -> str | None:
    """'a=1, b=2' when the runs' values are not all equal (as JSON: 1 and 1.0 and true differ), else None."""
    def key(v: Any) -> str:
        return "\0absent" if v is _ABSENT else json.dumps(v, sort_keys=True)

    if len({key(v) for v in values}) == 1:
        return None
    return ", ".join(f"{r.name}={_show(v)}" for r, v in zip(runs, values, strict=True))


def example_differences(runs: Sequence[Run]) -> list[str]:
    """Differences in the example sets: every split's ids_sha256, and the ids of predictions.jsonl."""
    problems = []
    for split in sorted({s for r in runs for s in r.examples}):
        hashes = [r.examples.get(split, _ABSENT) for r in runs]
        if len({str(h) for h in hashes}) > 1:
            shown = ", ".join(f"{r.name}={h[:12] if isinstance(h, str) else _show(h)}"
                              for r, h in zip(runs, hashes, strict=True))
            problems.append(f"examples.{split}.ids_sha256 differs: {shown}")
    id_sets = [(r.name, set(r.predictions.ids)) for r in runs if r.predictions is not None]
    if id_sets:
        (first, first_ids), others = id_sets[0], id_sets[1:]
        for name, ids in others:
            if ids != first_ids:
                extra, missing = sorted(ids - first_ids), sorted(first_ids - ids)
                problems.append(f"{PREDICTIONS_NAME} ids differ: {name} has {len(extra)} ids {first} lacks "
                                f"({', '.join(extra[:3]) or '-'}) and lacks {len(missing)} of its ids "
                                f"({', '.join(missing[:3]) or '-'})")
    return problems


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"training": {"learning_rate": 1e-4}} -> {"training.learning_rate": 1e-4}, without IGNORED_CONFIG_KEYS.
    cli.overrides keeps only the --set entries outside the ablation's sections."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in IGNORED_CONFIG_KEYS:
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{path}."))
        elif path == "cli.overrides" and isinstance(value, list):
            flat[path] = [o for o in value if not str(o).startswith(ABLATION_OVERRIDE_PREFIXES)]
        else:
            flat[path] = value
    return flat


def config_differences(runs: Sequence[Run]) -> list[str]:
    """Every resolved_config.json key path whose value is not the same in all runs, with each run's value."""
    flat = [flatten_config(r.config) for r in runs]
    problems = []
    for key in sorted({k for f in flat for k in f}):
        if (shown := _differs(runs, [f.get(key, _ABSENT) for f in flat])) is not None:
            problems.append(f"{key} differs: {shown}")
    return problems


def check_comparable(runs: Sequence[Run], *, allow_different_examples: bool = False,
                     allow_config_differences: bool = False) -> list[str]:
    """The reasons the runs cannot be compared, each naming the flag that overrides it; [] when they can be."""
    problems = []
    if not allow_different_examples:
        problems += [f"{p}  (override: --allow_different_examples)" for p in example_differences(runs)]
    if not allow_config_differences:
        problems += [f"{p}  (override: --allow_config_differences)" for p in config_differences(runs)]
    return problems


def choose_reference(runs: Sequence[Run], wanted: str | None) -> Run:
    """--reference as a run directory, a run name or an ablation name; by default the profile_and_history run, else
    the first run."""
    if wanted is None:
        full = [r for r in runs if r.ablation == DEFAULT_REFERENCE_ABLATION]
        return full[0] if full else runs[0]
    if Path(wanted).is_dir():
        by_path = [r for r in runs if r.path.resolve() == Path(wanted).resolve()]
        if by_path:
            return by_path[0]
    matches = [r for r in runs if r.name == wanted] or [r for r in runs if r.ablation == wanted]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(r.name for r in runs)
    if matches:
        raise UserError(f"--reference {wanted}: {len(matches)} runs have that ablation; name one run: {choices}.")
    raise UserError(f"--reference {wanted}: not one of the runs; give a run directory, a run name ({choices}) or "
                    "an ablation name.")


# ----------------------------------------------------------------------------------------------------------------------
# The comparison table
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A run's metric value and its paired difference from the reference (None where it does not apply)."""

    value: float | None = None
    diff: float | None = None
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class Row:
    run: str
    ablation: str
    reference: bool
    examples: int | None  # test examples the metrics use
    eval_loss: Estimate  # no interval: the Trainer reports only the mean
    test_loss: Estimate
    exact_match: Estimate
    mae: Estimate
    rmse: Estimate
    unparsable: int | None  # numeric tasks: predictions that did not parse as a number
    numeric_pairs: int | None  # numeric tasks: examples parsed in this run and the reference (MAE/RMSE differences)


def common_ids(runs: Sequence[Run]) -> np.ndarray:
    """The test ids every run with predictions has, sorted (with matching example sets: all of them)."""
    id_sets = [r.predictions.ids for r in runs if r.predictions is not None]
    if not id_sets:
        return np.array([], dtype=str)
    common = id_sets[0]
    for ids in id_sets[1:]:
        common = np.intersect1d(common, ids)
    return np.unique(common)


def _estimate(metric: Metric, column: str, run: Predictions, ref: Predictions | None, bootstrap: dict[str, Any],
              weights: str | None = None) -> Estimate:
    """metric over one Predictions column of the run; with the reference's aligned predictions, also the paired
    difference and its interval. weights: the name of the column that weights each example."""
    def weights_of(p: Predictions) -> np.ndarray | None:
        return None if weights is None else getattr(p, weights)

    value = metric(getattr(run, column), weights_of(run))
    if ref is None:
        return Estimate(value)
    return Estimate(value, *paired_bootstrap(getattr(run, column), getattr(ref, column), metric,
                                             weights=(weights_of(run), weights_of(ref)), **bootstrap))


def comparison_table(runs: Sequence[Run], reference: Run, *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> list[Row]:
    """One Row per run, in the given order. Test metrics use the test ids common to all runs with predictions (all of
    them when the example sets match). MAE and RMSE are over the run's parsed predictions; their differences use the
    ids parsed in both the run and the reference."""
    bootstrap: dict[str, Any] = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    ids = common_ids(runs)
    aligned = {r.name: r.predictions.select(ids) for r in runs if r.predictions is not None and ids.size}
    ref = aligned.get(reference.name)
    rows = []
    for run in runs:
        is_ref = run is reference
        eval_diff = (None if is_ref or run.eval_loss is None or reference.eval_loss is None
                     else run.eval_loss - reference.eval_loss)
        test_loss = exact_match = mae = rmse = Estimate()
        examples = unparsable = pairs = None
        p = aligned.get(run.name)
        paired = None if is_ref else ref  # the reference's aligned predictions, when there is a difference to take
        if p is not None:
            examples = len(ids)
            test_loss = _estimate(MEAN, "loss", p, paired, bootstrap, weights="target_tokens")
            exact_match = _estimate(MEAN, "exact_match", p, paired, bootstrap)
        if p is not None and run.numeric:
            parsed = ~np.isnan(p.abs_error)
            unparsable = int(np.sum(~parsed))
            if parsed.any():
                mae = Estimate(MEAN(p.abs_error[parsed]))
                rmse = Estimate(ROOT_MEAN_SQUARE(p.abs_error[parsed]))
            if is_ref:
                pairs = int(np.sum(parsed))
            elif paired is not None and reference.numeric:
                both = parsed & ~np.isnan(paired.abs_error)
                pairs = int(np.sum(both))
                if pairs:
                    errors, ref_errors = p.abs_error[both], paired.abs_error[both]
                    mae = Estimate(mae.value, *paired_bootstrap(errors, ref_errors, MEAN, **bootstrap))
                    rmse = Estimate(rmse.value, *paired_bootstrap(errors, ref_errors, ROOT_MEAN_SQUARE, **bootstrap))
        rows.append(Row(run.name, run.ablation, is_ref, examples, Estimate(run.eval_loss, eval_diff), test_loss,
                        exact_match, mae, rmse, unparsable, pairs))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Output: Markdown, CSV, figure
# ----------------------------------------------------------------------------------------------------------------------

METRICS = ("eval_loss", "test_loss", "exact_match", "mae", "rmse")
LABELS = {"eval_loss": "eval loss", "test_loss": "test loss", "exact_match": "exact match", "mae": "MAE",
          "rmse": "RMSE"}


def _number(x: float | None, signed: bool = False) -> str:
    return "" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def _difference(e: Estimate) -> str:
    if e.diff is None:
        return ""
    return _number(e.diff, True) + ("" if e.lo is None else f" [{_number(e.lo, True)}, {_number(e.hi, True)}]")


def markdown_table(rows: Sequence[Row], confidence: float) -> str:
    """The rows as a Markdown table; MAE, RMSE and unparsable columns only when some run is numeric."""
    numeric = any(r.unparsable is not None for r in rows)
    metrics = [m for m in METRICS if numeric or m not in ("mae", "rmse")]
    level = f"{confidence * 100:g}%"
    header = ["run", "ablation", "test examples"]
    for m in metrics:
        header += [LABELS[m], f"{LABELS[m]} vs ref" + ("" if m == "eval_loss" else f" [{level} CI]")]
    header += ["unparsable"] if numeric else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r.run + (" (reference)" if r.reference else ""), r.ablation,
                 "" if r.examples is None else str(r.examples)]
        for m in metrics:
            cells += [_number(getattr(r, m).value), _difference(getattr(r, m))]
        cells += ["" if r.unparsable is None else str(r.unparsable)] if numeric else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_COLUMNS = ["run", "ablation", "reference", "test_examples",
               *(f"{m}{part}" for m in METRICS for part in ("", "_diff", "_lo", "_hi")),
               "unparsable", "numeric_pairs", "confidence"]


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path in the same directory), then rename: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or e}); choose another path.") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(rows: Sequence[Row], path: Path, confidence: float) -> None:
    """One line per run with CSV_COLUMNS (value, diff, lo, hi per metric; empty where it does not apply)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for r in rows:
                metrics = [getattr(getattr(r, m), part) for m in METRICS for part in ("value", "diff", "lo", "hi")]
                writer.writerow(["" if v is None else v for v in
                                 [r.run, r.ablation, r.reference, r.examples, *metrics, r.unparsable,
                                  r.numeric_pairs, confidence]])

    _write_atomic(path, write)


def plot(runs: Sequence[Run], rows: Sequence[Row], path: Path, confidence: float) -> None:
    """PNG: validation loss vs step for every run (left); the main metric per run (right), exact match or, when the
    targets are numeric, MAE. A run's error bar is the paired interval of its difference from the reference, drawn
    around its value: when the bar misses the reference's dashed line, the difference is significant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    curves = [r for r in runs if r.eval_curve]
    for run in curves:
        steps, losses = zip(*run.eval_curve, strict=True)
        left.plot(steps, losses, marker="o", label=f"{run.name} ({run.ablation})")
    left.set(title="Validation loss", xlabel="step", ylabel="eval loss")
    if curves:
        left.legend(fontsize="small")
    else:
        left.text(0.5, 0.5, "no evaluation in log_history", ha="center", va="center", transform=left.transAxes)

    metric = "mae" if any(r.unparsable is not None for r in rows) else "exact_match"
    shown = [r for r in rows if getattr(r, metric).value is not None]
    for x, row in enumerate(shown):
        e = getattr(row, metric)
        yerr = None if e.lo is None else [[max(0.0, e.diff - e.lo)], [max(0.0, e.hi - e.diff)]]
        color = "black" if row.reference else f"C{x % 10}"
        right.errorbar([x], [e.value], yerr=yerr, fmt="D" if row.reference else "o", color=color, capsize=6,
                       markersize=8)
        if row.reference:
            right.axhline(e.value, color="black", linestyle="--", linewidth=1, label=f"reference: {row.run}")
    right.set_xticks(range(len(shown)), [f"{r.run}\n({r.ablation})" for r in shown], fontsize="small")
    right.set_xlim(-0.5, max(len(shown), 1) - 0.5)
    right.set_title(f"{LABELS[metric]} per run; bars: {confidence * 100:g}% paired CI of the difference from the "
                    "reference", fontsize="medium")
    right.set_ylabel(LABELS[metric] + (" (lower is better)" if metric == "mae" else ""))
    if any(r.reference for r in shown):
        right.legend(fontsize="small")
    if not shown:
        right.text(0.5, 0.5, "no test predictions", ha="center", va="center", transform=right.transAxes)
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (e.g. 0.95), got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare finished runs of Gemma/train_deepspeed.py (see the module "
                                            "docstring for the metrics).")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="output directories of finished runs.")
    p.add_argument("--reference", metavar="NAME_OR_DIR",
                   help="the run the others are compared with: a run directory, run name or ablation name "
                        f"(default: the {DEFAULT_REFERENCE_ABLATION} run, else the first).")
    p.add_argument("--csv", type=Path, metavar="PATH",
                   help=f"CSV output (default: <common parent of the runs>/{DEFAULT_CSV_NAME}).")
    p.add_argument("--figure", type=Path, metavar="PATH",
                   help=f"PNG output (default: <common parent of the runs>/{DEFAULT_FIGURE_NAME}).")
    p.add_argument("--bootstrap", type=_positive_int, default=2000, metavar="N",
                   help="bootstrap resamples (default: 2000; more give steadier interval ends).")
    p.add_argument("--confidence", type=_confidence, default=0.95, help="interval level (default: 0.95).")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed: the same seed gives the same intervals.")
    p.add_argument("--allow_different_examples", action="store_true",
                   help="compare runs whose example sets differ; metrics then use the test ids common to all runs.")
    p.add_argument("--allow_config_differences", action="store_true",
                   help="compare runs whose resolved configs differ in more than the ablation.")
    return p.parse_args(argv)


def compare(args: argparse.Namespace) -> None:
    """The recipe: check the flags, load the runs, refuse incomparable ones, then table, CSV and figure."""
    figure = args.figure or common_parent(args.run_dirs) / DEFAULT_FIGURE_NAME
    if figure.suffix.lower() != ".png":
        raise UserError(f"--figure {figure}: the figure is a PNG; give a path ending in .png.")
    csv_path = args.csv or common_parent(args.run_dirs) / DEFAULT_CSV_NAME

    runs = load_runs(args.run_dirs)
    problems = check_comparable(runs, allow_different_examples=args.allow_different_examples,
                                allow_config_differences=args.allow_config_differences)
    if problems:
        raise UserError("these runs are not comparable; fix the runs, or pass the flag named on a line to compare "
                        "them anyway:", [f"  - {p}" for p in problems])
    reference = choose_reference(runs, args.reference)
    logger.info("Reference: %s (%s)", reference.name, reference.ablation)
    ids = common_ids(runs)
    for r in runs:
        if r.predictions is not None and len(r.predictions.ids) > len(ids):
            logger.warning("%s: %d of its %d test ids are not in every run; the metrics use the %d common ids.",
                           r.name, len(r.predictions.ids) - len(ids), len(r.predictions.ids), len(ids))

    rows = comparison_table(runs, reference, n_resamples=args.bootstrap, confidence=args.confidence, seed=args.seed)
    print(markdown_table(rows, args.confidence), flush=True)
    write_csv(rows, csv_path, args.confidence)
    plot(runs, rows, figure, args.confidence)
    logger.info("Wrote %s and %s", csv_path, figure)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        compare(args)
    except UserError as e:
        print("\n".join([f"error: {e.message}", *e.details]), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
