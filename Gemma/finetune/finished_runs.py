"""Finished runs as the comparison reads them: a run directory's results.json, resolved_config.json and
predictions.jsonl loaded and checked (each problem names the file and the key or line); which of the paths a user
gives are run directories, and where the comparison may write (never into a run)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .metrics import BY_NAME, EVERY_TASK_COLUMNS, METRICS, main_metric
from .outputs import IDENTITY_NAME, PREDICTIONS_NAME, RESOLVED_CONFIG_NAME, RESULTS_NAME
from .test_time import RESULTS_KEY as TEST_TIME_KEY
from .test_time import label as test_time_label

# The per-example columns of predictions.jsonl the metrics read -> whether it may be null (or absent: a file written
# before the metric existed); a null means the example has no value (an answer that did not parse as a number).
COLUMNS = {column: column not in EVERY_TASK_COLUMNS for m in METRICS for column in m.columns}
WEIGHTS = {m.weight for m in METRICS if m.weight is not None}  # per-example weights: at least 1



@dataclass(frozen=True)
class Predictions:
    """predictions.jsonl as aligned arrays, one element per generated test example."""

    ids: np.ndarray  # str
    columns: dict[str, np.ndarray]  # COLUMNS by name, float64; NaN where an example has no value (null)

    def select(self, ids: np.ndarray) -> Predictions:
        """The rows of the given ids, in their order (every id must be present)."""
        order = np.argsort(self.ids, kind="stable")
        rows = order[np.searchsorted(self.ids[order], ids)]
        return Predictions(self.ids[rows], {name: values[rows] for name, values in self.columns.items()})


@dataclass(frozen=True)
class Run:
    path: Path
    name: str  # the directory name, or its path below the runs' common parent when two names collide
    ablation: str
    numeric: bool  # the test targets are numbers: MAE, RMSE and unparsable apply
    main_metric: str  # the metric the task is judged by (results.json test.main_metric; metrics.main_metric)
    examples: dict[str, str]  # split -> ids_sha256
    eval_loss: float | None
    eval_curve: list[tuple[int, float]]  # (step, eval_loss) from log_history
    config: dict[str, Any]
    predictions: Predictions | None  # None: the run had no test file
    # A test-time evaluation (results.json's test_time_ablation: trained_run, trained_ablation, evaluated_ablation);
    # its ablation is then the label "<evaluated> (test-time, trained: <trained>)". None: a trained run.
    test_time: dict | None = None


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
    ids: list[str] = []
    columns: dict[str, list[float]] = {name: [] for name in COLUMNS}
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
        for name, nullable in COLUMNS.items():
            if nullable and isinstance(rec, dict) and name not in rec:
                columns[name].append(math.nan)
                continue
            types = (int, float, bool, type(None)) if nullable else (int, float, bool)
            value = _finite(_field(rec, name, types, where), f"{where}: {name}")
            if name in WEIGHTS and not value >= 1:
                raise UserError(f"{where}: {name}: must be >= 1, got {value}.")
            columns[name].append(math.nan if value is None else value)
    if not ids:
        raise UserError(f"{path}: no predictions; the run's test generation did not finish.")
    id_array = np.array(ids)
    unique, counts = np.unique(id_array, return_counts=True)
    if len(unique) < len(id_array):
        raise UserError(f"{path}: duplicate ids, e.g. {', '.join(unique[counts > 1][:3])}; ids must be unique.")
    return Predictions(id_array, {name: np.array(values, dtype=np.float64) for name, values in columns.items()})


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
    predictions, numeric, main = None, False, main_metric(False).name
    if test is not None:
        numeric = _field(test, "numeric", bool, f"{where}: test")
        # Runs evaluated before the main metric was recorded: the rule of that time (MAE for numbers, else exact match)
        main = test.get("main_metric") or main_metric(numeric).name
        if main not in BY_NAME:
            raise UserError(f"{where}: test.main_metric: {main!r} is no metric of this version "
                            f"({', '.join(BY_NAME)}); was it written by a newer Gemma/train_deepspeed.py?")
        generated = _field(test, "generated", int, f"{where}: test")
        predictions = read_predictions(predictions_path)
        if len(predictions.ids) != generated:
            raise UserError(f"{predictions_path}: {len(predictions.ids)} predictions, but {RESULTS_NAME} says "
                            f"test.generated={generated}; is the file truncated?")
    ablation, test_time = _field(results, "ablation", str, where), None
    if TEST_TIME_KEY in results:
        test_time = _field(results, TEST_TIME_KEY, dict, where)
        ablation = test_time_label(ablation, _field(test_time, "trained_ablation", str, f"{where}: {TEST_TIME_KEY}"))
    return Run(path=run_dir, name=run_dir.resolve().name, ablation=ablation,
               numeric=numeric, main_metric=main, examples=examples, eval_loss=eval_loss,
               eval_curve=sorted(curve.items()), config=config, predictions=predictions, test_time=test_time)


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest directory holding every run directory (for sibling runs: their parent)."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def is_run_directory(path: Path) -> bool:
    """A directory a run of train_deepspeed.py wrote into (finished or not)."""
    return path.is_dir() and any((path / name).exists() for name in (RESOLVED_CONFIG_NAME, RESULTS_NAME,
                                                                        IDENTITY_NAME))


def run_paths(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(run directories, skipped): a shell glob like Gemma/outputs/study/* also picks up the comparison's own files
    and unrelated directories, which are skipped; a path that does not exist is an error (a typo)."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise UserError(f"{missing[0]}: no such run directory.")
    runs = [p for p in paths if is_run_directory(p)]
    return runs, [p for p in paths if p not in runs]


def check_output_path(path: Path, suffix: str, flag: str) -> None:
    """An output of the comparison must have its type's suffix and must not land in a run directory, where it could
    replace a run's own files (results.json, ...)."""
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: give a path ending in {suffix}.")
    for directory in path.resolve().parents:
        if is_run_directory(directory):
            raise UserError(f"{flag} {path}: {directory} is a run directory; write the comparison beside the runs, "
                            "not into one.")


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
