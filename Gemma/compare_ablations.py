"""Compare finished runs of Gemma/train_deepspeed.py: one table row per ablation, bootstrap intervals.

Each RUN_DIR is an --output_dir of a finished run: it holds results.json, resolved_config.json and, when the run had a
test file, predictions.jsonl. Paths that are no run directory (the comparison's own files, when a glob picks them up)
are skipped with a note. Runs are compared only when they saw the same examples and differ in nothing but the
ablation; otherwise the tool lists what differs and stops (the two --allow_* flags compare them anyway). --csv and
--figure must end in .csv and .png and may not point into a run directory.

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

    # a study trained with several seeds (Gemma/run_study.py --seeds 1 2 3): each ablation's mean over seeds
    python Gemma/compare_ablations.py Gemma/outputs/study_seeds/*

    # a history-length study (run_study.py --design history_lengths 1 2 4): also the main metric against the number
    # of history items, in comparison_by_max_history_items.png beside comparison.png
    python Gemma/compare_ablations.py Gemma/outputs/study_history/* --reference history_4 \\
        --x_axis prompt.max_history_items

Output: a Markdown table on stdout; a CSV (default <common parent of the runs>/comparison.csv) with separate value,
diff, lo and hi columns; a PNG (default <common parent>/comparison.png) with the validation-loss curves on the left and
the task's main metric (results.json test.main_metric) per run on the right. Both files are written atomically.
--x_axis KEY (a resolved_config.json key whose value is a number in every run, e.g.
prompt.max_history_items) adds a PNG, <figure stem>_by_<last part of KEY>.png: the main metric against that value,
one point per run (or per ablation, with several seeds), with the same intervals as the figure's right panel.
Notes (which run is the reference, where the files went) go to stderr. Exit status: 0 done, 2 a problem you can fix
(one line naming it on stderr; for runs that are not comparable, one line per difference below it).

Metrics (the registry in finetune/metrics.py, shared with the training script's evaluation), each on the test
examples of predictions.jsonl:
    test loss    token-weighted: sum(loss_i * target_tokens_i) / sum(target_tokens_i)
    exact match  fraction of examples whose prediction equals the target
    MAE, RMSE    numeric targets only, over the examples whose prediction parsed as a number; the difference from
                 the reference uses the examples parsed in both runs (the CSV's numeric_pairs counts them)
    macro-F1     answer choices: the mean over classes of F1; AUC: two answer choices, the second one positive
    expected_mae numeric answer choices: MAE (and expected_rmse RMSE) of the expected value sum(p_i * v_i)
    ROUGE-1/L    free-text targets: mean F-measure per example (rouge-score)
    eval loss    results.json's eval.eval_loss: the Trainer reports only the mean, so it has no interval
Differences are run minus reference. Intervals are paired percentile bootstraps: each resample draws test ids with
replacement, the same draw for both runs, and recomputes the metric on each (macro-F1 and AUC, which are no means of
per-example values, from the resampled rows). The table shows eval loss, then the main metric, then the others. A
run without predictions.jsonl (no test file) is allowed when its results.json has no "test" section: it is compared
on eval loss only and its test metric cells stay empty.

Test-time ablations (train_deepspeed.py --do_eval_only --test_time_ablation): an evaluation directory is read like a
run; its row's ablation is "<evaluated> (test-time, trained: <trained>)", so it is never grouped or confused with a
trained run of the evaluated ablation, and the CSV gains the columns test_time and trained_ablation. It has no eval
loss of its own. The reference must be a trained run.

Several seeds: when some ablation has runs of more than one training.seed (read from resolved_config.json), the runs
are grouped by ablation and seed, and the seed may differ between runs. Every ablation needs the same seeds with one
run each (else the runs at fault are named and nothing is written). The output is then two tables: one row per
ablation (its number of seeds; each value the mean over seeds; the difference the mean over seeds of the run minus the
reference ablation's run of the same seed, which trained on the same batches), with intervals from a two-level
bootstrap that resamples seeds and test examples together (finetune/bootstrap.seed_example_bootstrap says why); then
one row per run with its seed and its paired interval against the reference run of its seed. The CSV holds both kinds
of rows (SEED_CSV_COLUMNS: seed empty on an ablation's row, seeds empty on a run's); the PNG shows every seed's value
beside each ablation's mean and interval. When each ablation has a single seed, the comparison is run by run as above.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finetune.comparison import (DEFAULT_REFERENCE_ABLATION, Row, check_comparable, choose_reference,
                                 choose_reference_ablation, common_ids, comparison_table, seed_comparison, seed_groups)
from finetune.finished_runs import Run, check_output_path, common_parent, load_runs, run_paths
from finetune.errors import EXIT_INTERRUPTED, UserError, positive_int
from finetune.metrics import BY_NAME, EVERY_TASK_COLUMNS, METRICS
from finetune.outputs import RESOLVED_CONFIG_NAME, write_atomic

logger = logging.getLogger("compare_ablations")

DEFAULT_CSV_NAME = "comparison.csv"
DEFAULT_FIGURE_NAME = "comparison.png"
COLUMNS = ("eval_loss", *(m.name for m in METRICS))  # the table's metrics, in order
LABELS = {"eval_loss": "eval loss", **{m.name: m.label for m in METRICS}}
ALWAYS_SHOWN = {"eval_loss", *(m.name for m in METRICS if m.column in EVERY_TASK_COLUMNS)}
CSV_COLUMNS = ["run", "ablation", "reference", "test_examples",
               *(f"{m}{part}" for m in COLUMNS for part in ("", "_diff", "_lo", "_hi")),
               "unparsable", "numeric_pairs", "confidence"]
# A study of several seeds: a row per ablation (seed empty, seeds = how many it averages), then a row per run
SEED_CSV_COLUMNS = ["run", "ablation", "seed", "seeds", *CSV_COLUMNS[2:]]
# Appended when some row is a test-time evaluation (train_deepspeed.py --test_time_ablation): true on its rows, with
# the ablation its model was trained with
TEST_TIME_CSV_COLUMNS = ["test_time", "trained_ablation"]


# ----------------------------------------------------------------------------------------------------------------------
# Output: Markdown, CSV, figure
# ----------------------------------------------------------------------------------------------------------------------


def _number(x: float | None, signed: bool = False) -> str:
    return "" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def _difference(row: Row, metric: str) -> str:
    e = row.estimate(metric)
    if e.diff is None:
        return ""
    return _number(e.diff, True) + ("" if e.lo is None else f" [{_number(e.lo, True)}, {_number(e.hi, True)}]")


def _lead(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """The columns before the metrics: run and ablation; with seed for the runs of a study of several seeds; ablation
    and the number of seeds for its ablations' means."""
    if any(r.seeds is not None for r in rows):
        return ["ablation", "seeds"], [[r.ablation + (" (reference)" if r.reference else ""), str(len(r.seeds or ()))]
                                       for r in rows]
    cells = [[r.run + (" (reference)" if r.reference else ""), r.ablation] for r in rows]
    if any(r.seed is not None for r in rows):
        return ["run", "ablation", "seed"], [c + [str(r.seed)] for c, r in zip(cells, rows, strict=True)]
    return ["run", "ablation"], cells


def _count(x: float | None) -> str:
    """A count, or a mean of counts over seeds (1.5)."""
    return "" if x is None else str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def markdown_table(rows: Sequence[Row], confidence: float) -> str:
    """The rows as a Markdown table: eval loss, then the task's main metric, then the others that apply (have a value
    in some row: MAE, RMSE and unparsable only when some run is numeric, AUC only with two answer choices, ...)."""
    numeric = any(r.unparsable is not None for r in rows)
    main = rows[0].main if rows else None
    applying = [m for m in COLUMNS if m in ALWAYS_SHOWN or any(r.estimate(m).value is not None for r in rows)]
    metrics = ["eval_loss", *(m for m in applying if m == main), *(m for m in applying if m not in ("eval_loss", main))]
    level = f"{confidence * 100:g}%"
    lead, lead_cells = _lead(rows)
    header = [*lead, "test examples"]
    for m in metrics:
        header += [LABELS[m], f"{LABELS[m]} vs ref" + ("" if m == "eval_loss" else f" [{level} CI]")]
    header += ["unparsable"] if numeric else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r, cells in zip(rows, lead_cells, strict=True):
        cells = [*cells, "" if r.examples is None else str(r.examples)]
        for m in metrics:
            cells += [_number(r.estimate(m).value), _difference(r, m)]
        cells += [_count(r.unparsable)] if numeric else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_markdown(ablation_rows: Sequence[Row], run_rows: Sequence[Row], confidence: float) -> str:
    """A study of several seeds: the ablations' means over seeds, then every run, each table under a line saying
    what its numbers and intervals are."""
    seeds = ", ".join(map(str, ablation_rows[0].seeds or ()))
    return "\n".join([
        f"Mean over seeds {seeds}. Differences: mean over seeds of (ablation - reference ablation of the same seed); "
        "intervals resample seeds and test examples together (two-level bootstrap).", "",
        markdown_table(ablation_rows, confidence), "",
        "Per seed: each run against the reference ablation's run of the same seed; intervals resample test examples "
        "(paired bootstrap).", "",
        markdown_table(run_rows, confidence)])


def write_csv(rows: Sequence[Row], path: Path, confidence: float) -> None:
    """One line per row with CSV_COLUMNS (value, diff, lo, hi per metric; empty where it does not apply); with
    SEED_CSV_COLUMNS when the rows are a study of several seeds (ablation means, then runs); TEST_TIME_CSV_COLUMNS
    after them when some row is a test-time evaluation."""
    seeded = any(r.seed is not None or r.seeds is not None for r in rows)
    test_time = any(r.trained_ablation is not None for r in rows)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([*(SEED_CSV_COLUMNS if seeded else CSV_COLUMNS),
                             *(TEST_TIME_CSV_COLUMNS if test_time else [])])
            for r in rows:
                metrics = [getattr(r.estimate(m), part) for m in COLUMNS for part in ("value", "diff", "lo", "hi")]
                seed = [r.seed, None if r.seeds is None else len(r.seeds)] if seeded else []
                writer.writerow(["" if v is None else v for v in
                                 ["" if r.seeds is not None else r.run, r.ablation, *seed, r.reference, r.examples,
                                  *metrics, r.unparsable, r.numeric_pairs, confidence,
                                  *([r.trained_ablation is not None, r.trained_ablation] if test_time else [])]])

    write_atomic(path, write)


def plot(runs: Sequence[Run], rows: Sequence[Row], path: Path, confidence: float,
         run_rows: Sequence[Row] = ()) -> None:
    """PNG: validation loss vs step for every run (left); the task's main metric per run (right; metrics.main_metric:
    e.g. exact match, MAE, ROUGE-L). A run's error bar is the paired interval of its difference from the reference,
    drawn around its value: when the bar misses the reference's dashed line, the difference is significant.
    A study of several seeds (rows: the ablations' means, run_rows: every run): the right panel has one position per
    ablation, its mean with the seed-and-example interval and, beside it, every seed's value as a small point; the
    left panel colours the curves by ablation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)

    curves = [r for r in runs if r.eval_curve]
    colours = {a: f"C{i % 10}" for i, a in enumerate(dict.fromkeys(r.ablation for r in rows))}
    for run in curves:
        steps, losses = zip(*run.eval_curve, strict=True)
        if run_rows:  # many runs: one colour and one legend entry per ablation
            first = run is next(r for r in curves if r.ablation == run.ablation)
            left.plot(steps, losses, marker="o", markersize=3, color=colours.get(run.ablation, "grey"),
                      label=run.ablation if first else None)
        else:
            left.plot(steps, losses, marker="o", label=f"{run.name} ({run.ablation})")
    left.set(title="Validation loss", xlabel="step", ylabel="eval loss")
    if curves:
        left.legend(fontsize="small")
    else:
        left.text(0.5, 0.5, "no evaluation in log_history", ha="center", va="center", transform=left.transAxes)

    metric = BY_NAME[rows[0].main]
    shown = [r for r in rows if r.estimate(metric.name).value is not None]
    for x, row in enumerate(shown):
        e = row.estimate(metric.name)
        yerr = None if e.lo is None else [[max(0.0, e.diff - e.lo)], [max(0.0, e.hi - e.diff)]]
        color = "black" if row.reference else f"C{x % 10}"
        right.errorbar([x], [e.value], yerr=yerr, fmt="D" if row.reference else "o", color=color, capsize=6,
                       markersize=8)
        if row.reference:
            right.axhline(e.value, color="black", linestyle="--", linewidth=1, label=f"reference: {row.run}")
        seeds = [r for r in run_rows if r.ablation == row.ablation and r.estimate(metric.name).value is not None]
        if seeds:  # every seed's value, spread a little to the right of the mean so that equal values stay visible
            offsets = 0.12 + 0.16 * np.arange(len(seeds)) / max(len(seeds) - 1, 1)
            right.scatter(x + offsets, [r.estimate(metric.name).value for r in seeds], s=18, color=color, alpha=0.6,
                          label="one seed" if x == 0 else None)
    if run_rows:
        right.set_xticks(range(len(shown)), [f"{r.ablation}\n({len(r.seeds or ())} seeds)" for r in shown],
                         fontsize="small")
        title = (f"{metric.label}: mean over seeds (large) and each seed (small)\nbars: {confidence * 100:g}% CI of "
                 "the difference, seeds and examples resampled")
    else:
        right.set_xticks(range(len(shown)), [f"{r.run}\n({r.ablation})" for r in shown], fontsize="small")
        title = f"{metric.label} per run; bars: {confidence * 100:g}% paired CI of the difference from the reference"
    right.set_xlim(-0.5, max(len(shown), 1) - 0.5)
    right.set_title(title, fontsize="medium")
    right.set_ylabel(metric.label + (" (lower is better)" if metric.lower_is_better else ""))
    if any(r.reference for r in shown):
        right.legend(fontsize="small")
    if not shown:
        right.text(0.5, 0.5, "no test predictions", ha="center", va="center", transform=right.transAxes)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def x_axis_figure(figure: Path, key: str) -> Path:
    """Where the metric-against-KEY figure goes: beside the comparison's figure."""
    return figure.with_name(f"{figure.stem}_by_{key.rsplit('.', 1)[-1]}.png")


def x_values(runs: Sequence[Run], rows: Sequence[Row], key: str) -> list[float]:
    """Each row's value of a resolved_config.json key (a run's row: its run's; an ablation's row of a study of several
    seeds: its runs', which must agree); refused, naming the runs, when a value is missing or not a number."""
    def value(run: Run) -> object:
        node: object = run.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    values, problems = [], []
    for row in rows:
        of_row = [r for r in runs if (r.ablation == row.ablation if row.seeds is not None else r.name == row.run)]
        found = {json.dumps(value(r)) for r in of_row}
        number = value(of_row[0])
        if len(found) > 1 or not isinstance(number, (int, float)) or isinstance(number, bool):
            problems.append(f"  - {row.run}: {', '.join(f'{r.name}={json.dumps(value(r))}' for r in of_row)}")
        else:
            values.append(float(number))
    if problems:
        raise UserError([f"--x_axis {key}: every run needs a number there (the runs of one ablation the same one), as "
                         f"in {RESOLVED_CONFIG_NAME}; drop --x_axis, or compare runs that differ in it:", *problems])
    return values


def plot_against(runs: Sequence[Run], rows: Sequence[Row], key: str, path: Path, confidence: float,
                 run_rows: Sequence[Row] = ()) -> None:
    """PNG: the main metric against a config value (e.g. how many history items the prompt shows), one point per row
    in order of that value, joined by a line. The error bars are the intervals of plot()'s right panel (the
    difference from the reference, drawn around the value); the reference is the black diamond and dashed line. A
    study of several seeds (rows: the ablations' means, run_rows: every run): each seed's value as a small point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = BY_NAME[rows[0].main]
    xs = x_values(runs, rows, key)
    points = sorted(((x, r) for x, r in zip(xs, rows, strict=True) if r.estimate(metric.name).value is not None),
                    key=lambda point: point[0])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([x for x, _ in points], [r.estimate(metric.name).value for _, r in points], color="C0", zorder=1)
    for x, row in points:
        e = row.estimate(metric.name)
        yerr = None if e.lo is None else [[max(0.0, e.diff - e.lo)], [max(0.0, e.hi - e.diff)]]
        ax.errorbar([x], [e.value], yerr=yerr, fmt="D" if row.reference else "o", color="black" if row.reference
                    else "C0", capsize=6, markersize=8, zorder=2)
        if row.reference:
            ax.axhline(e.value, color="black", linestyle="--", linewidth=1, label=f"reference: {row.run}")
        seeds = [v for r in run_rows if r.ablation == row.ablation and (v := r.estimate(metric.name).value) is not None]
        if seeds:  # a little to the right of the mean, so that a seed equal to it stays visible
            offset = 0.015 * ((points[-1][0] - points[0][0]) or 1.0)
            ax.scatter([x + offset] * len(seeds), seeds, s=18, color="C1", alpha=0.6, zorder=3,
                       label="one seed" if row is points[0][1] else None)
    ax.set_xticks(sorted({x for x, _ in points}))
    ax.set(xlabel=key, ylabel=metric.label + (" (lower is better)" if metric.lower_is_better else ""))
    ax.set_title(f"{metric.label} against {key}\nbars: {confidence * 100:g}% CI of the difference from the reference"
                 + (", seeds and examples resampled" if run_rows else ""), fontsize="medium")
    if points:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no test predictions", ha="center", va="center", transform=ax.transAxes)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


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
    p.add_argument("--bootstrap", type=positive_int, default=2000, metavar="N",
                   help="bootstrap resamples (default: 2000; more give steadier interval ends).")
    p.add_argument("--confidence", type=_confidence, default=0.95, help="interval level (default: 0.95).")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed: the same seed gives the same intervals.")
    p.add_argument("--allow_different_examples", action="store_true",
                   help="compare runs whose example sets differ; metrics then use the test ids common to all runs.")
    p.add_argument("--allow_config_differences", action="store_true",
                   help="compare runs whose resolved configs differ in more than the ablation.")
    p.add_argument("--x_axis", metavar="KEY",
                   help="also plot the main metric against this resolved_config.json key (a number in every run, "
                        "e.g. prompt.max_history_items), into <figure stem>_by_<last part of KEY>.png.")
    return p.parse_args(argv)


def compare(args: argparse.Namespace) -> None:
    """The recipe: check the flags, load the runs, refuse incomparable ones, then table, CSV and figure."""
    run_dirs, skipped = run_paths(args.run_dirs)
    for path in skipped:
        logger.info("Skipped %s: not a run directory.", path)
    if not run_dirs:
        raise UserError("none of the paths given is a run directory (one that holds resolved_config.json).")
    figure = args.figure or common_parent(run_dirs) / DEFAULT_FIGURE_NAME
    csv_path = args.csv or common_parent(run_dirs) / DEFAULT_CSV_NAME
    check_output_path(figure, ".png", "--figure")
    check_output_path(csv_path, ".csv", "--csv")
    if args.x_axis:
        check_output_path(x_axis_figure(figure, args.x_axis), ".png", "--x_axis")

    runs = load_runs(run_dirs)
    study = seed_groups(runs)  # None: one seed per ablation, one row per run
    problems = check_comparable(runs, allow_different_examples=args.allow_different_examples,
                                allow_config_differences=args.allow_config_differences, across_seeds=study is not None)
    if problems:
        raise UserError(["these runs are not comparable; fix the runs, or pass the flag named on a line to compare "
                         "them anyway:", *(f"  - {p}" for p in problems)])
    if study is None:
        reference = choose_reference(runs, args.reference)
        logger.info("Reference: %s (%s)", reference.name, reference.ablation)
    else:
        reference_ablation = choose_reference_ablation(runs, args.reference)
        logger.info("Reference: %s; %d ablations x %d seeds (%s)", reference_ablation, len(study.ablations),
                    len(study.seeds), ", ".join(map(str, study.seeds)))
    for r in runs:
        if r.test_time is not None:
            logger.info("%s: a test-time ablation, %s's final model evaluated with the %s prompt (not trained "
                        "with it; no eval loss of its own).", r.name, r.test_time.get("trained_run"),
                        r.test_time.get("evaluated_ablation"))
    ids = common_ids(runs)
    for r in runs:
        if r.predictions is not None and len(r.predictions.ids) > len(ids):
            logger.warning("%s: %d of its %d test ids are not in every run; the metrics use the %d common ids.",
                           r.name, len(r.predictions.ids) - len(ids), len(r.predictions.ids), len(ids))

    bootstrap = {"n_resamples": args.bootstrap, "confidence": args.confidence, "seed": args.seed}
    if study is None:
        rows = comparison_table(runs, reference, **bootstrap)
        print(markdown_table(rows, args.confidence), flush=True)
        write_csv(rows, csv_path, args.confidence)
        plot(runs, rows, figure, args.confidence)
        if args.x_axis:
            plot_against(runs, rows, args.x_axis, x_axis_figure(figure, args.x_axis), args.confidence)
    else:
        ablation_rows, run_rows = seed_comparison(study, reference_ablation, **bootstrap)
        print(seed_markdown(ablation_rows, run_rows, args.confidence), flush=True)
        write_csv([*ablation_rows, *run_rows], csv_path, args.confidence)
        plot(runs, ablation_rows, figure, args.confidence, run_rows)
        if args.x_axis:
            plot_against(runs, ablation_rows, args.x_axis, x_axis_figure(figure, args.x_axis), args.confidence,
                         run_rows)
    logger.info("Wrote %s and %s%s", csv_path, figure,
                f" and {x_axis_figure(figure, args.x_axis)}" if args.x_axis else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        compare(args)
    except UserError as e:
        print("\n".join([f"error: {e.problems[0]}", *e.problems[1:]]), file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
