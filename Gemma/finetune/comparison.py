"""Finished runs (finished_runs.py loads them) -> rows of a comparison: refuse runs that are not comparable, and
compute every metric of the registry (metrics.METRICS) with its paired difference from the reference run; for a study
trained with several seeds (some ablation has runs of more than one training.seed), group the runs by (ablation,
seed) and compare the ablations' means over seeds (seed_groups, seed_comparison)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .bootstrap import paired_bootstrap, seed_example_bootstrap
from .errors import UserError
from .finished_runs import Predictions, Run
from .metrics import MAE, METRICS, Metric, RowStatistic
from .outputs import PREDICTIONS_NAME, RESOLVED_CONFIG_NAME

DEFAULT_REFERENCE_ABLATION = "profile_and_history"  # the full prompt: every other ablation removes something from it
# resolved_config.json keys that may differ between the runs of one ablation study (a key covers everything below it)
IGNORED_CONFIG_KEYS = frozenset({
    "prompt", "ablation", "cli.output_dir", "cli.ablation_config", "cli.resume_from_checkpoint",
    "cli.overwrite_output_dir", "deepspeed_config_file",
    # a test-time evaluation (test_time.py) differs from the trained runs in how it was launched and what it loaded
    "cli.do_eval_only", "cli.test_time_ablation", "evaluated_model",
})
# --set overrides of these sections refine the ablation, so cli.overrides is compared without them
ABLATION_OVERRIDE_PREFIXES = ("prompt.",)
# The training seed: a run's seed in a study of several seeds (run_study.py --seeds sets it with --set), so it may
# differ between runs when the runs are grouped by seed
SEED_KEY = "training.seed"
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


def flatten_config(config: dict[str, Any], prefix: str = "", *, across_seeds: bool = False) -> dict[str, Any]:
    """{"training": {"learning_rate": 1e-4}} -> {"training.learning_rate": 1e-4}, without IGNORED_CONFIG_KEYS.
    cli.overrides keeps only the --set entries outside the ablation's sections. across_seeds: without SEED_KEY and
    its --set entries too."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in IGNORED_CONFIG_KEYS or (across_seeds and path == SEED_KEY):
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{path}.", across_seeds=across_seeds))
        elif path == "cli.overrides" and isinstance(value, list):
            flat[path] = [o for o in value if not str(o).startswith(ABLATION_OVERRIDE_PREFIXES)
                          and not (across_seeds and str(o).partition("=")[0] == SEED_KEY)]
        else:
            flat[path] = value
    return flat


def config_differences(runs: Sequence[Run], *, across_seeds: bool = False) -> list[str]:
    """Every resolved_config.json key path whose value is not the same in all runs, with each run's value.
    across_seeds: the training seed may differ (the runs are grouped by seed)."""
    flat = [flatten_config(r.config, across_seeds=across_seeds) for r in runs]
    problems = []
    for key in sorted({k for f in flat for k in f}):
        if (shown := _differs(runs, [f.get(key, _ABSENT) for f in flat])) is not None:
            problems.append(f"{key} differs: {shown}")
    return problems


def check_comparable(runs: Sequence[Run], *, allow_different_examples: bool = False,
                     allow_config_differences: bool = False, across_seeds: bool = False) -> list[str]:
    """The reasons the runs cannot be compared, each naming the flag that overrides it; [] when they can be.
    across_seeds: a study of several seeds, whose runs may differ in the training seed too."""
    problems = []
    if not allow_different_examples:
        problems += [f"{p}  (override: --allow_different_examples)" for p in example_differences(runs)]
    if not allow_config_differences:
        problems += [f"{p}  (override: --allow_config_differences)"
                     for p in config_differences(runs, across_seeds=across_seeds)]
    return problems


def choose_reference(runs: Sequence[Run], wanted: str | None) -> Run:
    """--reference as a run directory, a run name or an ablation name; by default the profile_and_history run, else
    the first run."""
    if wanted is None:
        full = [r for r in runs if r.ablation == DEFAULT_REFERENCE_ABLATION]
        trained = [r for r in runs if r.test_time is None]
        return full[0] if full else check_trained_reference((trained or runs)[0])
    if Path(wanted).is_dir():
        by_path = [r for r in runs if r.path.resolve() == Path(wanted).resolve()]
        if by_path:
            return check_trained_reference(by_path[0])
    matches = [r for r in runs if r.name == wanted] or [r for r in runs if r.ablation == wanted]
    if len(matches) == 1:
        return check_trained_reference(matches[0])
    choices = ", ".join(r.name for r in runs)
    if matches:
        raise UserError(f"--reference {wanted}: {len(matches)} runs have that ablation; name one run: {choices}.")
    raise UserError(f"--reference {wanted}: not one of the runs; give a run directory, a run name ({choices}) or "
                    "an ablation name.")


def check_trained_reference(run: Run) -> Run:
    """The reference is a trained run: a test-time evaluation is what is compared with it, never the yardstick."""
    if run.test_time is not None:
        raise UserError(f"--reference {run.name}: a test-time evaluation ({run.ablation}); the reference must be a "
                        "trained run, e.g. the trained run it evaluated.")
    return run


def choose_reference_ablation(runs: Sequence[Run], wanted: str | None) -> str:
    """For a study of several seeds: the reference ablation, from --reference as an ablation name, or as a run
    directory or run name (its ablation); by default profile_and_history, else the first run's ablation."""
    if wanted is not None and wanted in {r.ablation for r in runs}:
        return check_trained_reference(next(r for r in runs if r.ablation == wanted)).ablation
    return choose_reference(runs, wanted).ablation


# ----------------------------------------------------------------------------------------------------------------------
# Seeds: the runs of a study trained with several seeds, grouped by ablation and seed
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedStudy:
    """runs[ablation][seed]: one run per ablation and seed, every ablation with the same seeds."""

    ablations: tuple[str, ...]  # in the order their first runs were given
    seeds: tuple[int, ...]  # ascending
    runs: dict[str, dict[int, Run]]

    def of_seed(self, seed: int) -> list[Run]:
        """The runs trained with one seed, one per ablation, in ablation order."""
        return [self.runs[a][seed] for a in self.ablations]


def run_seed(run: Run) -> int | None:
    """training.seed from the run's resolved_config.json (None when it has no integer there)."""
    training = run.config.get("training")
    value = training.get("seed") if isinstance(training, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def seed_groups(runs: Sequence[Run]) -> SeedStudy | None:
    """None when each ablation's runs share one training seed: the comparison is then one row per run, as before
    seeds existed (a study of one seed). Otherwise (some ablation has runs of several seeds) the runs grouped by
    ablation and seed, refused with every problem listed when a run records no seed, two runs have the same ablation
    and seed, or the ablations do not all have the same seeds: seed s of an ablation is paired with seed s of the
    reference (they trained on the same batches), so every ablation needs every seed."""
    seeds_of: dict[str, set[int | None]] = {}
    for r in runs:
        seeds_of.setdefault(r.ablation, set()).add(run_seed(r))
    if all(len(seeds) == 1 for seeds in seeds_of.values()):
        return None
    problems = [f"{r.path}: {RESOLVED_CONFIG_NAME} has no integer {SEED_KEY}; was it written by "
                "Gemma/train_deepspeed.py?" for r in runs if run_seed(r) is None]
    grouped: dict[str, dict[int, Run]] = {a: {} for a in seeds_of}
    for r in runs:
        seed = run_seed(r)
        if seed is None:
            continue
        if seed in grouped[r.ablation]:
            problems.append(f"{grouped[r.ablation][seed].path} and {r.path}: both are ablation {r.ablation} with "
                            f"seed {seed}; give one run per ablation and seed.")
        else:
            grouped[r.ablation][seed] = r
    every_seed = sorted({s for by_seed in grouped.values() for s in by_seed})
    for ablation, by_seed in grouped.items():
        missing = [str(s) for s in every_seed if s not in by_seed]
        if missing:
            problems.append(f"{ablation}: no run with seed {', '.join(missing)}, which other ablations have; every "
                            "ablation needs every seed (finish the study by rerunning Gemma/run_study.py, or leave "
                            "out the runs of the seeds some ablation lacks).")
    if problems:
        raise UserError([f"these runs of a study of several seeds ({', '.join(map(str, every_seed))}) cannot be "
                         "grouped by ablation and seed:", *(f"  - {p}" for p in problems)])
    return SeedStudy(tuple(grouped), tuple(every_seed), grouped)


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
    """One line of the comparison: one run's, or (seeds set) one ablation's mean over the runs of its seeds. Each
    metric of the registry reads as an attribute: row.exact_match."""

    run: str
    ablation: str
    reference: bool
    examples: int | None  # test examples the metrics use
    eval_loss: Estimate  # no interval: the Trainer reports only the mean
    metrics: dict[str, Estimate] = field(default_factory=dict)  # by Metric.name, every metric of METRICS
    unparsable: float | None = None  # numeric tasks: predictions that did not parse as a number (mean over seeds)
    numeric_pairs: int | None = None  # numeric tasks: examples parsed in this run and the reference (MAE/RMSE)
    seed: int | None = None  # a run's row in a study of several seeds: its training seed
    seeds: tuple[int, ...] | None = None  # an ablation's row in a study of several seeds: the seeds it averages
    main: str = "exact_match"  # the reference run's main metric (Metric.name): the comparison shows it first
    trained_ablation: str | None = None  # a test-time evaluation's row: the ablation its model was trained with

    def __getattr__(self, name: str) -> Estimate:
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(name)

    def estimate(self, name: str) -> Estimate:
        """eval_loss or a metric of the registry, by name."""
        return self.eval_loss if name == "eval_loss" else self.metrics[name]


def common_ids(runs: Sequence[Run]) -> np.ndarray:
    """The test ids every run with predictions has, sorted (with matching example sets: all of them)."""
    id_sets = [r.predictions.ids for r in runs if r.predictions is not None]
    if not id_sets:
        return np.array([], dtype=str)
    common = id_sets[0]
    for ids in id_sets[1:]:
        common = np.intersect1d(common, ids)
    return np.unique(common)


def _values(metric: Metric, p: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights) of one run: values 1-D, or (examples, 2) rows [column, with_column] for a RowStatistic."""
    values = p.columns[metric.column]
    if isinstance(metric.aggregate, RowStatistic):
        values = np.stack([values, p.columns[metric.with_column]], axis=-1)
    return values, (np.ones(len(p.ids)) if metric.weight is None else p.columns[metric.weight])


def _present(values: np.ndarray) -> np.ndarray:
    """The examples (the last axis of 1-D values, the one before it of rows) that have a value."""
    return ~np.isnan(values) if values.ndim == 1 else ~np.isnan(values).any(axis=-1)


def metric_estimate(metric: Metric, run: Predictions, ref: Predictions | None, bootstrap: dict[str, Any]) -> Estimate:
    """The metric over the run's examples that have a value; with the reference's aligned predictions, also the
    paired difference over the examples that have a value in both runs, and its interval."""
    values, weights = _values(metric, run)
    present = _present(values)
    if not present.any():
        return Estimate()
    value = metric.aggregate(values[present], weights[present])
    if ref is None:
        return Estimate(value)
    ref_values, ref_weights = _values(metric, ref)
    both = present & _present(ref_values)
    if not both.any():
        return Estimate(value)
    return Estimate(value, *paired_bootstrap(values[both], ref_values[both], metric.aggregate,
                                             weights=(weights[both], ref_weights[both]), **bootstrap))


def comparison_table(runs: Sequence[Run], reference: Run, *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0, ids: np.ndarray | None = None) -> list[Row]:
    """One Row per run, in the given order. Test metrics use the test ids common to all runs with predictions (all of
    them when the example sets match; ids: these instead); a metric that has no value for some examples (MAE when an
    answer did not parse) uses the run's examples that have one, and its difference the examples that have one in
    both runs."""
    bootstrap: dict[str, Any] = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    ids = common_ids(runs) if ids is None else ids
    aligned = {r.name: r.predictions.select(ids) for r in runs if r.predictions is not None and ids.size}
    ref = aligned.get(reference.name)
    rows = []
    for run in runs:
        is_ref = run is reference
        eval_diff = (None if is_ref or run.eval_loss is None or reference.eval_loss is None
                     else run.eval_loss - reference.eval_loss)
        p = aligned.get(run.name)
        estimates = {}
        for metric in METRICS:
            paired = ref if not is_ref and metric.applies(reference.numeric) else None
            estimates[metric.name] = (metric_estimate(metric, p, paired, bootstrap)
                                      if p is not None and metric.applies(run.numeric) else Estimate())
        unparsable = pairs = None
        if p is not None and run.numeric:
            parsed = ~np.isnan(p.columns[MAE.column])
            unparsable = int(np.sum(~parsed))
            if is_ref:
                pairs = int(np.sum(parsed))
            elif ref is not None and reference.numeric:
                pairs = int(np.sum(parsed & ~np.isnan(ref.columns[MAE.column])))
        rows.append(Row(run.name, run.ablation, is_ref, len(ids) if p is not None else None,
                        Estimate(run.eval_loss, eval_diff), estimates, unparsable, pairs, main=reference.main_metric,
                        trained_ablation=run.test_time and run.test_time["trained_ablation"]))
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean over seeds, or None when some seed has no value (the mean of the others would be another quantity)."""
    return None if any(v is None for v in values) else math.fsum(values) / len(values)


def _seed_matrix(metric: Metric, predictions: Sequence[Predictions]) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, examples) values (NaN: no value), or (seeds, examples, 2) rows of a RowStatistic, and weights of one
    ablation's runs."""
    pairs = [_values(metric, p) for p in predictions]
    return np.stack([v for v, _ in pairs]), np.stack([w for _, w in pairs])


def seed_comparison(study: SeedStudy, reference: str, *, n_resamples: int = 2000, confidence: float = 0.95,
                    seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(one Row per ablation, one Row per run) for a study of several seeds; reference: the reference ablation.

    Per run: comparison_table of each seed's runs against the reference ablation's run of that seed (paired
    intervals over test examples), its Row carrying the seed; seeds ascending, ablations in study order.
    Per ablation: each value (eval loss, every metric) is the mean over seeds of the runs' values; the difference is
    the mean over seeds of the paired per-seed differences, with a seed_example_bootstrap interval (seeds and test
    examples resampled together); unparsable is the mean over seeds. Every row uses the test ids common to all runs.
    """
    every_run = [r for a in study.ablations for r in study.runs[a].values()]
    ids = common_ids(every_run)
    per_seed = {s: comparison_table(study.of_seed(s), study.runs[reference][s], n_resamples=n_resamples,
                                    confidence=confidence, seed=seed, ids=ids) for s in study.seeds}
    run_rows = [replace(row, seed=s) for s in study.seeds for row in per_seed[s]]
    ablation_rows = []
    for index, ablation in enumerate(study.ablations):
        rows = [per_seed[s][index] for s in study.seeds]
        runs = [study.runs[ablation][s] for s in study.seeds]
        is_ref = ablation == reference
        eval_loss = Estimate(_mean([r.eval_loss.value for r in rows]),
                             None if is_ref else _mean([r.eval_loss.diff for r in rows]))
        estimates = {}
        for metric in METRICS:
            per_run = [r.estimate(metric.name) for r in rows]
            value, diff = _mean([e.value for e in per_run]), _mean([e.diff for e in per_run])
            if value is None or diff is None:
                estimates[metric.name] = Estimate(value)
                continue
            a = _seed_matrix(metric, [r.predictions.select(ids) for r in runs])
            b = _seed_matrix(metric, [study.runs[reference][s].predictions.select(ids) for s in study.seeds])
            _, lo, hi = seed_example_bootstrap(a[0], b[0], metric.aggregate, weights=(a[1], b[1]),
                                               n_resamples=n_resamples, confidence=confidence, seed=seed)
            estimates[metric.name] = Estimate(value, diff, *((None, None) if math.isnan(lo) else (lo, hi)))
        ablation_rows.append(Row(ablation, ablation, is_ref, rows[0].examples, eval_loss, estimates,
                                 _mean([r.unparsable for r in rows]), seeds=study.seeds, main=rows[0].main,
                                 trained_ablation=rows[0].trained_ablation))
    return ablation_rows, run_rows
