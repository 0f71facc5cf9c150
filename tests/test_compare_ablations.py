"""Gemma/compare_ablations.py on hand-made run directories in the formats Gemma/train_deepspeed.py writes."""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Gemma"))

import compare_ablations as ca  # noqa: E402
from finetune.bootstrap import paired_bootstrap, seed_example_bootstrap  # noqa: E402
from finetune.comparison import (  # noqa: E402
    Estimate,
    check_comparable,
    choose_reference,
    choose_reference_ablation,
    comparison_table,
    config_differences,
    seed_comparison,
    seed_groups,
)
from finetune.finished_runs import load_run, load_runs  # noqa: E402
from finetune.errors import UserError  # noqa: E402
from finetune.metrics import MEAN, ROOT_MEAN_SQUARE  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENRES = ["comedy", "drama", "horror", "romance", "scifi"]


# ----------------------------------------------------------------------------------------------------------------------
# Fake run directories
# ----------------------------------------------------------------------------------------------------------------------


def sha(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()  # as finetune.data.build_split hashes the ids


def resolved_config(output_dir: Path, ablation: str, include_profile: bool, include_history: bool) -> dict:
    """resolved_config.json of a demo run, as train_deepspeed.py writes it."""
    return {
        "model": {"model_name_or_path": "Gemma/models/gemma-3-270m", "attn_implementation": "eager",
                  "dtype": "bfloat16"},
        "data": {"train_file": "Gemma/data/demo/train.jsonl", "validation_file": "Gemma/data/demo/validation.jsonl",
                 "test_file": "Gemma/data/demo/test.jsonl",
                 "fields": {"profile": "profile", "history": "history", "query": "query", "target": "target",
                            "id": "id"}},
        "prompt": {"include_profile": include_profile, "include_history": include_history, "max_history_items": None},
        "training": {"max_length": 256, "batch_size": 8, "eval_batch_size": 16, "gradient_accumulation_steps": 1,
                     "learning_rate": 0.0002, "num_train_epochs": 1.0, "max_steps": 40, "warmup_ratio": 0.1,
                     "lr_scheduler_type": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 5,
                     "eval_steps": 20, "save_steps": 20, "save_total_limit": 2, "seed": 42, "report_to": ["none"],
                     "activation_checkpointing": True},
        "deepspeed": {"offload_optimizer": True, "offload_params": True, "pin_memory": True,
                      "cpu_checkpointing": True},
        "ablation": {"name": ablation, "description": f"{ablation} prompt.", "include_profile": include_profile,
                     "include_history": include_history, "max_history_items": None},
        "cli": {"config": "config.json", "ablation_config": ablation, "output_dir": str(output_dir),
                "deepspeed_config": None, "resume_from_checkpoint": None, "overwrite_output_dir": False,
                "overrides": []},
        "deepspeed_config_file": str(output_dir.resolve() / "deepspeed_config" / "ds_config_zero3.json"),
        "model_path": "/work/main/Gemma/models/gemma-3-270m",
    }


def make_run(root: Path, name: str, ablation: str, predictions: list[dict] | None, *, eval_losses=(1.9, 1.4),
             numeric: bool = False, config_changes: dict | None = None, test_ids_sha: str | None = None) -> Path:
    """A finished run directory. predictions: predictions.jsonl records (None: a run without a test file)."""
    out = root / name
    (out / "deepspeed_config").mkdir(parents=True)
    flags = {"profile_and_history": (True, True), "profile_only": (True, False), "history_only": (False, True),
             "query_only": (False, False)}[ablation]
    config = resolved_config(out, ablation, *flags)
    for key, value in (config_changes or {}).items():
        section, leaf = key.split(".")
        config.setdefault(section, {})[leaf] = value
    (out / "resolved_config.json").write_text(json.dumps(config, indent=2))

    train_ids, validation_ids = [f"u{i:06d}" for i in range(2000)], [f"v{i:06d}" for i in range(200)]
    examples = {
        "train": {"records": 2000, "examples": 2000, "dropped_too_long": 0, "history_shortened": 31,
                  "ids_sha256": sha(train_ids), "mean_tokens": 141.2, "max_tokens": 256},
        "validation": {"records": 200, "examples": 200, "dropped_too_long": 0, "history_shortened": 2,
                       "ids_sha256": sha(validation_ids), "mean_tokens": 139.8, "max_tokens": 251},
    }
    steps = [20 * (i + 1) for i in range(len(eval_losses))]
    log_history = [{"loss": 2.6 - 0.1 * s / 5, "grad_norm": 3.1, "learning_rate": 1e-4, "epoch": s / 250, "step": s}
                   for s in range(5, steps[-1] + 1, 5)]
    log_history += [{"eval_loss": v, "eval_runtime": 4.2, "epoch": s / 250, "step": s}
                    for s, v in zip(steps, eval_losses, strict=True)]
    log_history.sort(key=lambda h: h["step"])
    results = {
        "ablation": ablation, "ablation_description": f"{ablation} prompt.",
        "prompt": config["prompt"], "train": {"train_runtime": 310.5, "train_loss": 1.7},
        "eval": {"eval_loss": eval_losses[-1], "eval_runtime": 4.2, "epoch": 0.16},
        "global_step": steps[-1], "world_size": 2, "effective_batch_size": 16, "examples": examples,
        "log_history": log_history, "wall_time_s": 352.0,
    }
    if predictions is not None:
        ids = [p["id"] for p in predictions]
        examples["test"] = {"records": len(ids), "examples": len(ids), "dropped_too_long": 0, "history_shortened": 0,
                            "ids_sha256": test_ids_sha or sha(ids), "mean_tokens": 140.0, "max_tokens": 250}
        tokens = sum(p["target_tokens"] for p in predictions)
        errors = [p["abs_error"] for p in predictions if p["abs_error"] is not None]
        results["test"] = {
            "examples": len(ids), "generated": len(ids),
            "loss": sum(p["loss"] * p["target_tokens"] for p in predictions) / tokens,
            "exact_match": sum(p["exact_match"] for p in predictions) / len(ids), "numeric": numeric,
            "mae": float(np.mean(errors)) if numeric else None,
            "rmse": float(np.sqrt(np.mean(np.square(errors)))) if numeric else None,
            "unparsable": len(ids) - len(errors) if numeric else None,
        }
        (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return out


def genre_predictions(n: int, correct: set[int], seed: int = 0) -> list[dict]:
    """Genre predictions (not numeric): examples in `correct` are right, with a lower loss."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        target = GENRES[i % len(GENRES)]
        right = i in correct
        records.append({"id": f"t{i:06d}", "target": target, "prediction": target if right else GENRES[(i + 1) % 5],
                        "loss": round(float(rng.uniform(0.05, 0.6) if right else rng.uniform(1.0, 3.0)), 4),
                        "target_tokens": int(rng.integers(1, 4)), "exact_match": right, "abs_error": None,
                        "parsed": None})
    return records


def rating_predictions(targets: list[int], predicted: list[str]) -> list[dict]:
    """Rating predictions (numeric): a prediction that is not a number is unparsable (abs_error null)."""
    records = []
    for i, (target, text) in enumerate(zip(targets, predicted, strict=True)):
        parsed = float(text) if text.replace(".", "", 1).isdigit() else None
        records.append({"id": f"t{i:06d}", "target": str(target), "prediction": text, "loss": 0.5 + 0.1 * i,
                        "target_tokens": 1, "exact_match": parsed == target,
                        "abs_error": None if parsed is None else abs(parsed - target), "parsed": parsed})
    return records


@pytest.fixture
def genre_runs(tmp_path) -> list[Path]:
    """Three ablations on 60 test examples: the full prompt is right on 45, profile_only on 36, query_only on 15."""
    return [
        make_run(tmp_path, "full", "profile_and_history", genre_predictions(60, set(range(45)), seed=1)),
        make_run(tmp_path, "profile", "profile_only", genre_predictions(60, set(range(36)), seed=2),
                 eval_losses=(2.0, 1.6)),
        make_run(tmp_path, "query", "query_only", genre_predictions(60, set(range(0, 60, 4)), seed=3),
                 eval_losses=(2.3, 2.1)),
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "Gemma" / "compare_ablations.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# ----------------------------------------------------------------------------------------------------------------------


def test_bootstrap_of_identical_runs_is_exactly_zero():
    values = np.random.default_rng(0).uniform(0, 3, size=500)
    tokens = np.random.default_rng(1).integers(1, 6, size=500).astype(float)
    for metric, weights in ((MEAN, None), (MEAN, tokens), (ROOT_MEAN_SQUARE, None)):
        assert paired_bootstrap(values, values.copy(), metric, weights=weights) == (0.0, 0.0, 0.0)


def test_a_run_better_on_every_example_has_an_interval_excluding_zero():
    rng = np.random.default_rng(2)
    reference = rng.uniform(0.5, 2.0, size=300)  # e.g. absolute errors
    better = reference - rng.uniform(0.01, 0.2, size=300)  # lower on every single example
    diff, lo, hi = paired_bootstrap(better, reference, n_resamples=1000, seed=0)
    assert lo <= diff <= hi < 0
    assert diff == pytest.approx(better.mean() - reference.mean())


def test_the_interval_covers_a_known_difference_of_means_and_has_the_textbook_width():
    rng = np.random.default_rng(3)
    n, shift = 2000, 0.3
    b = rng.normal(size=n)
    noise = rng.normal(size=n)
    a = b + shift + noise - noise.mean()  # the observed mean difference is exactly `shift`
    diff, lo, hi = paired_bootstrap(a, b, n_resamples=2000, confidence=0.95, seed=0)
    assert diff == pytest.approx(shift)
    assert lo < shift < hi
    # percentile interval of a mean of paired differences: about +-1.96 standard errors
    half_width = 1.96 * np.std(a - b) / np.sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.1)
    narrower = paired_bootstrap(a, b, n_resamples=2000, confidence=0.5, seed=0)
    assert lo < narrower.lo < narrower.hi < hi


def test_the_same_seed_gives_the_same_numbers_and_another_seed_others():
    rng = np.random.default_rng(4)
    a, b, w = rng.normal(size=400), rng.normal(size=400), rng.integers(1, 4, size=400).astype(float)
    first = paired_bootstrap(a, b, weights=w, n_resamples=500, seed=7)
    assert paired_bootstrap(a, b, weights=w, n_resamples=500, seed=7) == first
    other = paired_bootstrap(a, b, weights=w, n_resamples=500, seed=8)
    assert other.diff == first.diff and (other.lo, other.hi) != (first.lo, first.hi)


def test_token_weighted_metric_and_root_mean_square():
    losses, tokens = np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 0.5])
    assert MEAN(losses, tokens) == pytest.approx((1 + 6 + 2) / 4.5)
    assert MEAN(losses) == pytest.approx(7 / 3)
    assert ROOT_MEAN_SQUARE(np.array([3.0, 4.0])) == pytest.approx(np.sqrt(12.5))
    # weights may differ per run (another tokenizer): each run's own weighted mean
    diff, _, _ = paired_bootstrap(losses, losses, weights=(tokens, np.ones(3)), n_resamples=10)
    assert diff == pytest.approx((1 + 6 + 2) / 4.5 - 7 / 3)


def test_bootstrap_is_fast_enough_for_a_few_thousand_examples():
    rng = np.random.default_rng(5)
    a, b, w = rng.uniform(size=5000), rng.uniform(size=5000), rng.integers(1, 9, size=5000).astype(float)
    paired_bootstrap(a[:50], b[:50], n_resamples=10)  # warm-up: first-call costs are not the algorithm
    start = time.perf_counter()
    paired_bootstrap(a, b, weights=w, n_resamples=2000, seed=0)
    # typically ~0.1 s on 2 CPU cores; the bound leaves room for a loaded CI machine
    assert time.perf_counter() - start < 1.5


# ----------------------------------------------------------------------------------------------------------------------
# Seed-and-example bootstrap
# ----------------------------------------------------------------------------------------------------------------------


def two_ablations(seed_offsets: list[float], n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, n) per-example values of an ablation and the reference: the ablation is 0.1 above the reference on
    average, each of its seeds shifted by its offset (training noise); the reference's seeds agree."""
    rng = np.random.default_rng(11)
    reference = rng.uniform(0, 2, size=n)
    ablation = reference + 0.1 + rng.normal(0, 0.5, size=n)
    return (np.stack([ablation + o for o in seed_offsets]),
            np.stack([reference for _ in seed_offsets]))


def width(d) -> float:
    return d.hi - d.lo


def test_seeds_that_disagree_widen_the_interval_beyond_the_example_bootstrap():
    a, b = two_ablations([-0.3, 0.3, -0.1, 0.1])
    both = seed_example_bootstrap(a, b, n_resamples=2000, seed=0)
    # the example-only bootstrap of the same data: the paired one on the seeds' mean per example (for a mean,
    # the mean over seeds of the differences is the difference of the seed-averaged values)
    examples_only = paired_bootstrap(a.mean(axis=0), b.mean(axis=0), n_resamples=2000, seed=0)
    assert both.diff == pytest.approx(examples_only.diff) == pytest.approx(np.mean(a - b))
    assert both.lo <= both.diff <= both.hi
    assert width(both) > 2 * width(examples_only)
    # about +-1.96 standard errors, with the seed term's variance as the bootstrap sees it ((S-1)/S of the sample's)
    seed_means = (a - b).mean(axis=1)
    se = np.sqrt(np.var(seed_means) / 4 + np.var((a - b).mean(axis=0)) / a.shape[1])
    assert width(both) / 2 == pytest.approx(1.96 * se, rel=0.2)


def test_identical_seeds_give_the_example_bootstrap_interval():
    a, b = two_ablations([0.0, 0.0, 0.0])
    both = seed_example_bootstrap(a, b, n_resamples=4000, seed=1)
    examples_only = paired_bootstrap(a[0], b[0], n_resamples=4000, seed=1)
    assert both.diff == pytest.approx(examples_only.diff)
    assert width(both) == pytest.approx(width(examples_only), rel=0.1)
    assert both.lo == pytest.approx(examples_only.lo, abs=0.02) and both.hi == pytest.approx(examples_only.hi, abs=0.02)


def test_seed_example_bootstrap_is_deterministic_per_seed():
    a, b = two_ablations([-0.2, 0.2])
    tokens = np.random.default_rng(3).integers(1, 4, size=a.shape).astype(float)
    first = seed_example_bootstrap(a, b, ROOT_MEAN_SQUARE, weights=tokens, n_resamples=500, seed=7)
    assert seed_example_bootstrap(a, b, ROOT_MEAN_SQUARE, weights=tokens, n_resamples=500, seed=7) == first
    other = seed_example_bootstrap(a, b, ROOT_MEAN_SQUARE, weights=tokens, n_resamples=500, seed=8)
    assert other.diff == first.diff and (other.lo, other.hi) != (first.lo, first.hi)
    expected = np.mean([ROOT_MEAN_SQUARE(a[s], tokens[s]) - ROOT_MEAN_SQUARE(b[s], tokens[s]) for s in range(2)])
    assert first.diff == pytest.approx(expected)


def test_seed_example_bootstrap_pairs_only_examples_with_a_value_in_both_runs_of_a_seed():
    a, b = two_ablations([0.0, 0.5], n=50)
    a[0, :10] = np.nan  # seed 0: ten unparsable answers in the ablation's run
    b[1, 40:] = np.nan  # seed 1: ten in the reference's run
    d = seed_example_bootstrap(a, b, n_resamples=300, seed=0)
    expected = (np.mean(a[0, 10:] - b[0, 10:]) + np.mean(a[1, :40] - b[1, :40])) / 2
    assert d.diff == pytest.approx(expected) and d.lo <= d.diff <= d.hi
    with pytest.raises(ValueError, match="every seed needs"):
        seed_example_bootstrap(np.full((2, 3), np.nan), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(seeds, examples\)"):
        seed_example_bootstrap(np.zeros(3), np.zeros(3))


def test_seed_example_bootstrap_is_fast_enough():
    rng = np.random.default_rng(5)
    a, b, w = rng.uniform(size=(5, 5000)), rng.uniform(size=(5, 5000)), rng.integers(1, 9, size=(5, 5000))
    seed_example_bootstrap(a[:, :50], b[:, :50], n_resamples=10)  # warm-up
    start = time.perf_counter()
    seed_example_bootstrap(a, b, weights=w.astype(float), n_resamples=2000, seed=0)
    # typically ~0.3 s on 2 CPU cores for 5 seeds x 5000 examples; the bound leaves room for a loaded machine
    assert time.perf_counter() - start < 4


# ----------------------------------------------------------------------------------------------------------------------
# Loading runs and the comparison table
# ----------------------------------------------------------------------------------------------------------------------


def test_test_loss_is_token_weighted_and_differences_are_run_minus_reference(tmp_path):
    def predictions(losses, matches):
        return [{"id": f"t{i}", "target": "comedy", "prediction": "comedy" if m else "drama", "loss": loss,
                 "target_tokens": tokens, "exact_match": m, "abs_error": None, "parsed": None}
                for i, (loss, tokens, m) in enumerate(zip(losses, [1, 3, 2, 2], matches, strict=True))]

    full = make_run(tmp_path, "full", "profile_and_history", predictions([0.2, 0.4, 1.0, 0.1],
                                                                        [True, True, False, True]))
    query = make_run(tmp_path, "query", "query_only", predictions([0.9, 0.5, 2.0, 0.3], [False, True, False, True]),
                     eval_losses=(2.0, 1.7))
    runs = load_runs([query, full])
    reference = choose_reference(runs, None)
    assert reference.name == "full"  # the profile_and_history run, although listed second
    rows = {r.run: r for r in comparison_table(runs, reference, n_resamples=200)}
    assert rows["full"].test_loss.value == pytest.approx((0.2 * 1 + 0.4 * 3 + 1.0 * 2 + 0.1 * 2) / 8)
    assert rows["query"].test_loss.value == pytest.approx((0.9 * 1 + 0.5 * 3 + 2.0 * 2 + 0.3 * 2) / 8)
    assert rows["query"].test_loss.diff == pytest.approx(rows["query"].test_loss.value - rows["full"].test_loss.value)
    assert rows["query"].exact_match.value == 0.5 and rows["query"].exact_match.diff == pytest.approx(-0.25)
    assert rows["query"].eval_loss.value == 1.7 and rows["query"].eval_loss.diff == pytest.approx(1.7 - 1.4)
    assert rows["query"].eval_loss.lo is None  # no per-example data, no interval
    assert rows["full"].reference and rows["full"].test_loss.diff is None and rows["full"].examples == 4
    assert rows["query"].mae.value is None and rows["query"].unparsable is None  # not numeric


def test_table_of_three_ablations(genre_runs):
    runs = load_runs(genre_runs)
    rows = comparison_table(runs, choose_reference(runs, None), n_resamples=1000)
    assert [r.run for r in rows] == ["full", "profile", "query"]
    assert [r.exact_match.value for r in rows] == [0.75, 0.6, 0.25]
    query = rows[2].exact_match
    assert query.diff == pytest.approx(-0.5) and query.lo <= query.diff <= query.hi < 0
    table = ca.markdown_table(rows, 0.95)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 and lines[1] == "|" + "---|" * 9
    for line in lines[:1] + lines[2:]:
        assert line.startswith("| ") and line.endswith(" |") and line.count(" | ") == 8
    assert "exact match vs ref [95% CI]" in lines[0] and "MAE" not in lines[0]
    assert lines[2].startswith("| full (reference) | profile_and_history | 60 | 1.400 |")
    assert f"-0.500 [{query.lo:+.3f}, {query.hi:+.3f}]" in lines[4]


def test_reference_by_name_directory_or_ablation(genre_runs):
    runs = load_runs(genre_runs)
    assert choose_reference(runs, "query").name == "query"
    assert choose_reference(runs, "profile_only").name == "profile"
    assert choose_reference(runs, str(genre_runs[1])).name == "profile"
    with pytest.raises(UserError, match=r"not one of the runs.*full, profile, query"):
        choose_reference(runs, "history_only")


def test_numeric_targets_with_unparsable_predictions(tmp_path):
    targets = [4, 3, 5, 2, 1, 4]
    full = make_run(tmp_path, "full", "profile_and_history",
                    rating_predictions(targets, ["4", "3", "4", "3", "1", "five"]), numeric=True)
    query = make_run(tmp_path, "query", "query_only",
                     rating_predictions(targets, ["3", "I'd say 3", "3", "3", "3", "3"]), numeric=True)
    runs = load_runs([full, query])
    rows = {r.run: r for r in comparison_table(runs, runs[0], n_resamples=300)}
    ref, other = rows["full"], rows["query"]
    assert (ref.unparsable, other.unparsable) == (1, 1)
    # MAE and RMSE of each run over its own parsed predictions
    assert ref.mae.value == pytest.approx((0 + 0 + 1 + 1 + 0) / 5)
    assert other.mae.value == pytest.approx((1 + 2 + 1 + 2 + 1) / 5)
    assert other.rmse.value == pytest.approx(np.sqrt((1 + 4 + 1 + 4 + 1) / 5))
    # the paired difference over the 4 examples parsed in both runs (0, 2, 3, 4)
    assert other.numeric_pairs == 4 and ref.numeric_pairs == 5
    assert other.mae.diff == pytest.approx((1 + 2 + 1 + 2) / 4 - (0 + 1 + 1 + 0) / 4)
    assert other.rmse.diff == pytest.approx(np.sqrt(10 / 4) - np.sqrt(2 / 4))
    assert other.mae.lo <= other.mae.diff <= other.mae.hi
    assert ref.exact_match.value == pytest.approx(3 / 6)
    header = ca.markdown_table(list(rows.values()), 0.9).splitlines()[0]
    assert "MAE vs ref [90% CI]" in header and "RMSE" in header and header.endswith("| unparsable |")


def test_a_run_without_a_test_file_is_compared_on_eval_loss(tmp_path):
    a = make_run(tmp_path, "a", "profile_and_history", None, eval_losses=(1.8, 1.2))
    b = make_run(tmp_path, "b", "history_only", None, eval_losses=(1.9, 1.5))
    runs = load_runs([a, b])
    assert runs[0].predictions is None and runs[0].eval_curve == [(20, 1.8), (40, 1.2)]
    assert check_comparable(runs) == []
    rows = comparison_table(runs, runs[0])
    assert rows[1].eval_loss.diff == pytest.approx(0.3)
    assert rows[1].test_loss == Estimate() and rows[1].exact_match == Estimate() and rows[1].examples is None


def test_broken_run_directories_are_clear_errors(tmp_path, genre_runs):
    with pytest.raises(UserError, match="nowhere: no such run directory"):
        load_run(tmp_path / "nowhere")
    (genre_runs[0] / "predictions.jsonl").unlink()
    with pytest.raises(UserError, match=r"full: results.json reports a test evaluation but predictions.jsonl is"):
        load_run(genre_runs[0])
    (genre_runs[1] / "resolved_config.json").unlink()
    with pytest.raises(UserError, match=r"profile: no resolved_config.json"):
        load_run(genre_runs[1])
    lines = (genre_runs[2] / "predictions.jsonl").read_text().splitlines()
    (genre_runs[2] / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match=r"59 predictions, but results.json says test.generated=60"):
        load_run(genre_runs[2])
    (genre_runs[2] / "predictions.jsonl").write_text("\n".join([*lines[:-1], lines[-1][:30]]))
    with pytest.raises(UserError, match=r"predictions.jsonl: line 60: invalid JSON"):
        load_run(genre_runs[2])


# ----------------------------------------------------------------------------------------------------------------------
# Comparability
# ----------------------------------------------------------------------------------------------------------------------


def test_runs_that_differ_only_in_the_ablation_are_comparable(genre_runs):
    # output_dir, ablation_config, prompt, ablation and deepspeed_config_file all differ between these runs
    runs = load_runs(genre_runs)
    assert check_comparable(runs) == []


def test_different_example_sets_are_refused_unless_allowed(tmp_path):
    predictions = genre_predictions(40, set(range(30)))
    full = make_run(tmp_path, "full", "profile_and_history", predictions)
    other = make_run(tmp_path, "other", "profile_only", predictions, test_ids_sha="0" * 64)
    runs = load_runs([full, other])
    problems = check_comparable(runs)
    assert problems == [f"examples.test.ids_sha256 differs: full={sha([p['id'] for p in predictions])[:12]}, "
                        "other=000000000000  (override: --allow_different_examples)"]
    assert check_comparable(runs, allow_different_examples=True) == []


def test_different_prediction_ids_are_refused_and_compared_on_the_common_ids_when_allowed(tmp_path):
    full = make_run(tmp_path, "full", "profile_and_history", genre_predictions(40, set(range(30))))
    short = make_run(tmp_path, "short", "profile_only", genre_predictions(40, set(range(10)))[:36])
    runs = load_runs([full, short])
    problems = check_comparable(runs)
    assert len(problems) == 2 and problems[0].startswith("examples.test.ids_sha256 differs")
    assert problems[1].startswith("predictions.jsonl ids differ: short has 0 ids full lacks (-) and lacks 4 of its "
                                  "ids (t000036, t000037, t000038)")
    assert check_comparable(runs, allow_different_examples=True) == []
    rows = comparison_table(runs, runs[0], n_resamples=100)
    assert [r.examples for r in rows] == [36, 36]
    assert rows[0].exact_match.value == pytest.approx(30 / 36)


def test_config_differences_are_refused_with_both_values_unless_allowed(tmp_path):
    predictions = genre_predictions(20, set(range(10)))
    full = make_run(tmp_path, "full", "profile_and_history", predictions)
    other = make_run(tmp_path, "other", "profile_only", predictions,
                     config_changes={"training.learning_rate": 0.0001, "cli.overrides": ["prompt.max_history_items=3"]})
    runs = load_runs([full, other])
    assert check_comparable(runs) == [
        "training.learning_rate differs: full=0.0002, other=0.0001  (override: --allow_config_differences)"]
    assert check_comparable(runs, allow_config_differences=True) == []
    # a key only one run has is a difference too
    missing = copy.deepcopy(runs[1].config)
    del missing["training"]["seed"]
    assert config_differences([runs[0], dataclasses.replace(runs[1], config=missing)])[1] == \
        "training.seed differs: full=42, other=absent"


def test_lora_and_full_fine_tuning_runs_are_not_compared_unless_allowed(tmp_path):
    predictions = genre_predictions(20, set(range(10)))
    full = make_run(tmp_path, "full", "profile_and_history", predictions, config_changes={"lora.enabled": False})
    lora = make_run(tmp_path, "lora", "profile_only", predictions, config_changes={"lora.enabled": True})
    runs = load_runs([full, lora])
    assert check_comparable(runs) == [
        "lora.enabled differs: full=false, lora=true  (override: --allow_config_differences)"]
    assert check_comparable(runs, allow_config_differences=True) == []


def test_duplicate_directory_names_are_told_apart(tmp_path):
    predictions = genre_predictions(10, {1, 2})
    a = make_run(tmp_path / "week1", "run", "profile_and_history", predictions)
    b = make_run(tmp_path / "week2", "run", "query_only", predictions)
    assert [r.name for r in load_runs([a, b])] == ["week1/run", "week2/run"]
    with pytest.raises(UserError, match="given twice"):
        load_runs([a, tmp_path / "week1" / ".." / "week1" / "run"])


# ----------------------------------------------------------------------------------------------------------------------
# A study of several seeds
# ----------------------------------------------------------------------------------------------------------------------

# examples right per (ablation, seed) in 40: the full prompt's seeds agree, profile_only's disagree
SEED_STUDY = {("profile_and_history", 1): 30, ("profile_and_history", 2): 30,
              ("profile_only", 1): 28, ("profile_only", 2): 16}


def seed_run(root: Path, ablation: str, seed: int, right: int, **kwargs) -> Path:
    return make_run(root, f"{ablation}-seed{seed}", ablation, genre_predictions(40, set(range(right)), seed=seed),
                    config_changes={"training.seed": seed,
                                    "cli.overrides": ["training.max_steps=40", f"training.seed={seed}"]}, **kwargs)


@pytest.fixture
def seed_runs(tmp_path) -> list[Path]:
    """2 ablations x 2 seeds, in run_study.py's order (seed by seed)."""
    return [seed_run(tmp_path, a, s, right, eval_losses=(1.9, 1.4 + 0.1 * s)) for (a, s), right in
            sorted(SEED_STUDY.items(), key=lambda item: item[0][1])]


def test_runs_are_grouped_by_ablation_and_seed_and_may_differ_in_the_seed(seed_runs):
    runs = load_runs(seed_runs)
    study = seed_groups(runs)
    assert study.ablations == ("profile_and_history", "profile_only") and study.seeds == (1, 2)
    assert [r.name for r in study.of_seed(2)] == ["profile_and_history-seed2", "profile_only-seed2"]
    assert check_comparable(runs, across_seeds=True) == []
    # without grouping the seed is a config difference, as for runs that should share one
    assert [p.split(" differs")[0] for p in check_comparable(runs)] == ["cli.overrides", "training.seed"]
    assert choose_reference_ablation(runs, None) == "profile_and_history"
    assert choose_reference_ablation(runs, "profile_only-seed1") == "profile_only"
    assert choose_reference_ablation(runs, str(seed_runs[1])) == "profile_only"


def test_a_study_of_one_seed_is_compared_run_by_run_as_before(genre_runs, tmp_path):
    assert seed_groups(load_runs(genre_runs)) is None  # every run has seed 42
    one_each = [seed_run(tmp_path, "profile_and_history", 1, 30), seed_run(tmp_path, "profile_only", 2, 20)]
    runs = load_runs(one_each)
    assert seed_groups(runs) is None  # one seed per ablation: not a seed study, so the seeds must match
    assert "training.seed differs: profile_and_history-seed1=1, profile_only-seed2=2  (override: " \
           "--allow_config_differences)" in check_comparable(runs)


def test_ablation_rows_hold_the_mean_over_seeds_and_run_rows_each_seed(seed_runs):
    runs = load_runs(seed_runs)
    ablation_rows, run_rows = seed_comparison(seed_groups(runs), "profile_and_history", n_resamples=1000)
    full, profile = ablation_rows
    assert full.reference and full.seeds == (1, 2) and full.exact_match == Estimate(0.75)
    assert profile.exact_match.value == pytest.approx((28 + 16) / 80)
    assert profile.exact_match.diff == pytest.approx(((28 - 30) + (16 - 30)) / 80)
    assert profile.exact_match.lo <= profile.exact_match.diff <= profile.exact_match.hi
    test_losses = {(r.ablation, r.seed): r.test_loss.value for r in run_rows}
    assert profile.test_loss.value == pytest.approx((test_losses["profile_only", 1] + test_losses["profile_only", 2])
                                                    / 2)
    assert profile.eval_loss == Estimate(pytest.approx(1.55), pytest.approx(0.0))  # 1.5, 1.6 vs 1.5, 1.6
    assert profile.examples == 40 and profile.unparsable is None
    # the runs: seed by seed, each against the reference ablation's run of its seed, with paired intervals
    assert [(r.run, r.seed, r.reference) for r in run_rows] == [
        ("profile_and_history-seed1", 1, True), ("profile_only-seed1", 1, False),
        ("profile_and_history-seed2", 2, True), ("profile_only-seed2", 2, False)]
    assert [r.exact_match.value for r in run_rows] == [0.75, 0.7, 0.75, 0.4]
    assert run_rows[3].exact_match.diff == pytest.approx(-0.35) and run_rows[3].exact_match.hi < 0
    # the seeds disagree (-0.05 and -0.35): the seed-and-example interval is wider than either seed's paired one
    assert width(profile.exact_match) > max(width(run_rows[1].exact_match), width(run_rows[3].exact_match))


def test_numeric_study_of_two_seeds_pairs_the_parsed_answers_per_seed(tmp_path):
    targets = [4, 3, 5, 2, 1, 4]
    answers = {("profile_and_history", 1): ["4", "3", "4", "3", "1", "five"],
               ("profile_and_history", 2): ["4", "3", "5", "2", "2", "4"],
               ("query_only", 1): ["3", "I'd say 3", "3", "3", "3", "3"],
               ("query_only", 2): ["3", "3", "3", "3", "x", "y"]}
    runs = load_runs([make_run(tmp_path, f"{a}-seed{s}", a, rating_predictions(targets, text), numeric=True,
                               config_changes={"training.seed": s}) for (a, s), text in answers.items()])
    full, query = seed_comparison(seed_groups(runs), "profile_and_history", n_resamples=300)[0]
    # seed 1 pairs examples 0, 2, 3, 4 (parsed in both runs); seed 2 pairs examples 0-3
    seed1 = (1 + 2 + 1 + 2) / 4 - (0 + 1 + 1 + 0) / 4
    seed2 = (1 + 0 + 2 + 1) / 4 - (0 + 0 + 0 + 0) / 4
    assert query.mae.diff == pytest.approx((seed1 + seed2) / 2)
    assert query.mae.lo <= query.mae.diff <= query.mae.hi
    assert query.mae.value == pytest.approx(((1 + 2 + 1 + 2 + 1) / 5 + (1 + 0 + 2 + 1) / 4) / 2)
    assert (full.unparsable, query.unparsable, query.numeric_pairs) == (0.5, 1.5, None)
    assert ca.markdown_table([full, query], 0.95).splitlines()[3].endswith("| 1.50 |")


def test_a_duplicated_ablation_and_seed_is_refused_naming_both_runs(seed_runs, tmp_path):
    again = seed_run(tmp_path / "again", "profile_only", 2, 20)
    with pytest.raises(UserError) as refused:
        seed_groups(load_runs([*seed_runs, again]))
    assert refused.value.problems == [
        "these runs of a study of several seeds (1, 2) cannot be grouped by ablation and seed:",
        f"  - {seed_runs[3]} and {again}: both are ablation profile_only with seed 2; give one run per ablation and "
        "seed."]


def test_ablations_with_different_seed_sets_are_refused_listing_what_is_missing(seed_runs, tmp_path):
    third = seed_run(tmp_path, "profile_only", 3, 20)
    with pytest.raises(UserError) as refused:
        seed_groups(load_runs([*seed_runs, third]))
    assert refused.value.problems[1].startswith("  - profile_and_history: no run with seed 3, which other ablations "
                                                "have; every ablation needs every seed")
    assert len(refused.value.problems) == 2
    with pytest.raises(UserError, match="profile_only: no run with seed 2"):
        seed_groups(load_runs(seed_runs[:3]))


def test_cli_on_a_study_of_two_seeds(seed_runs):
    parent = seed_runs[0].parent
    result = run_cli(*map(str, seed_runs), "--bootstrap", "300")
    assert result.returncode == 0, result.stderr
    assert "Reference: profile_and_history; 2 ablations x 2 seeds (1, 2)" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Mean over seeds 1, 2.")
    assert lines[2].startswith("| ablation | seeds | test examples | eval loss |")
    assert lines[4].startswith("| profile_and_history (reference) | 2 | 40 | 1.550 |")
    assert lines[5].startswith("| profile_only | 2 | 40 | 1.550 | +0.000 |") and "| 0.550 | -0.200 [" in lines[5]
    assert lines[7].startswith("Per seed:") and lines[9].startswith("| run | ablation | seed | test examples |")
    assert lines[14].startswith("| profile_only-seed2 | profile_only | 2 | 40 |") and len(lines) == 15
    with (parent / "comparison.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ca.SEED_CSV_COLUMNS
    assert [(r["run"], r["ablation"], r["seed"], r["seeds"]) for r in table] == [
        ("", "profile_and_history", "", "2"), ("", "profile_only", "", "2"),
        ("profile_and_history-seed1", "profile_and_history", "1", ""), ("profile_only-seed1", "profile_only", "1", ""),
        ("profile_and_history-seed2", "profile_and_history", "2", ""), ("profile_only-seed2", "profile_only", "2", "")]
    assert float(table[1]["exact_match"]) == pytest.approx(0.55) and float(table[5]["exact_match"]) == 0.4
    assert (parent / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE


def test_figure_of_a_seed_study_shows_every_seed(seed_runs, tmp_path):
    import matplotlib.image

    runs = load_runs(seed_runs)
    ablation_rows, run_rows = seed_comparison(seed_groups(runs), "profile_and_history", n_resamples=200)
    path = tmp_path / "seeds.png"
    ca.plot(runs, ablation_rows, path, 0.95, run_rows)
    image = matplotlib.image.imread(path)
    assert image.shape[1] >= 800 and image[..., :3].std() > 0.05


# ----------------------------------------------------------------------------------------------------------------------
# CSV and figure
# ----------------------------------------------------------------------------------------------------------------------


def test_csv_has_one_row_per_run_and_value_diff_lo_hi_columns(genre_runs, tmp_path):
    runs = load_runs(genre_runs)
    rows = comparison_table(runs, runs[0], n_resamples=200)
    path = tmp_path / "out" / "comparison.csv"
    ca.write_csv(rows, path, 0.95)
    with path.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ca.CSV_COLUMNS
    for metric in ("eval_loss", "test_loss", "exact_match", "mae", "rmse"):
        assert {f"{metric}", f"{metric}_diff", f"{metric}_lo", f"{metric}_hi"} <= set(table[0])
    assert [r["run"] for r in table] == ["full", "profile", "query"]
    assert [r["reference"] for r in table] == ["True", "False", "False"]
    query = table[2]
    assert float(query["exact_match"]) == 0.25 and float(query["exact_match_diff"]) == pytest.approx(-0.5)
    assert float(query["exact_match_lo"]) == rows[2].exact_match.lo  # full precision, not the table's 3 decimals
    assert query["mae"] == "" and query["unparsable"] == "" and table[0]["test_loss_diff"] == ""
    assert query["test_examples"] == "60" and query["confidence"] == "0.95"
    assert [p.name for p in path.parent.iterdir()] == ["comparison.csv"]  # no temporary file left behind


def test_figure_is_a_valid_png(genre_runs, tmp_path):
    import matplotlib.image

    runs = load_runs(genre_runs)
    rows = comparison_table(runs, runs[0], n_resamples=200)
    path = tmp_path / "figure.png"
    ca.plot(runs, rows, path, 0.95)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 300 and image.shape[1] >= 800 and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.05  # curves, markers and text, not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["figure.png", *[d.name for d in genre_runs]])


# ----------------------------------------------------------------------------------------------------------------------
# Command line, end to end
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_end_to_end(genre_runs):
    result = run_cli(*map(str, genre_runs), "--bootstrap", "500", "--seed", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| run | ablation | test examples | eval loss |")
    assert set(lines[1]) == {"|", "-"}
    assert lines[2].startswith("| full (reference) | profile_and_history |")
    assert "Reference: full (profile_and_history)" in result.stderr and "Traceback" not in result.stderr
    parent = genre_runs[0].parent
    with (parent / "comparison.csv").open(newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["full", "profile", "query"]
    assert (parent / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    # the same seed gives the same table
    assert run_cli(*map(str, genre_runs), "--bootstrap", "500", "--seed", "3", "--csv", str(parent / "again.csv"),
                   "--figure", str(parent / "again.png")).stdout == result.stdout


def test_cli_errors_are_one_line_with_exit_status_2(genre_runs, tmp_path):
    result = run_cli(str(genre_runs[0]), str(tmp_path / "missing_run"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'missing_run'}: no such run directory."]
    assert result.stdout == ""


def test_cli_refuses_incomparable_runs_and_the_flag_overrides(tmp_path):
    predictions = genre_predictions(30, set(range(20)))
    full = make_run(tmp_path, "full", "profile_and_history", predictions)
    other = make_run(tmp_path, "other", "query_only", predictions, config_changes={"training.learning_rate": 1e-3})
    refused = run_cli(str(full), str(other))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines() == [
        "error: these runs are not comparable; fix the runs, or pass the flag named on a line to compare them anyway:",
        "  - training.learning_rate differs: full=0.0002, other=0.001  (override: --allow_config_differences)"]
    assert not (tmp_path / "comparison.csv").exists()
    allowed = run_cli(str(full), str(other), "--allow_config_differences", "--figure", str(tmp_path / "f.png"))
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "f.png").is_file() and (tmp_path / "comparison.csv").is_file()


def test_a_glob_over_a_study_skips_what_is_not_a_run(genre_runs):
    """`compare_ablations.py STUDY/*` a second time: the glob also holds the first comparison's CSV and PNG."""
    parent = genre_runs[0].parent
    assert run_cli(*map(str, genre_runs)).returncode == 0
    (parent / "notes").mkdir()
    paths = sorted(parent.iterdir())
    assert {p.name for p in paths} >= {"comparison.csv", "comparison.png", "notes"}
    again = run_cli(*map(str, paths), "--bootstrap", "200")
    assert again.returncode == 0, again.stderr
    assert len(again.stdout.splitlines()) == 2 + 3
    for skipped in ("comparison.csv", "comparison.png", "notes"):
        assert f"Skipped {parent / skipped}: not a run directory." in again.stderr


def test_outputs_must_have_their_suffix_and_stay_out_of_run_directories(genre_runs, tmp_path):
    results = genre_runs[0] / "results.json"
    before = results.read_bytes()
    for flag, path, message in (("--csv", results, "give a path ending in .csv"),
                                ("--csv", genre_runs[0] / "table.csv", "is a run directory"),
                                ("--figure", genre_runs[1] / "f.png", "is a run directory"),
                                ("--figure", tmp_path / "f.jpg", "give a path ending in .png")):
        proc = run_cli(*map(str, genre_runs), flag, str(path))
        assert proc.returncode == 2 and message in proc.stderr, (flag, path, proc.stderr)
        assert not path.exists() or path == results
    assert results.read_bytes() == before


def rating_choice_predictions(n: int, skill: float, seed: int) -> list[dict]:
    """Ratings scored over the answer choices 1-5 (probabilities, as the evaluation writes them): with probability
    `skill` the mass sits on the target."""
    from finetune.metrics import score_predictions

    rng = np.random.default_rng(seed)
    choices = ["1", "2", "3", "4", "5"]
    rows = []
    for i in range(n):
        target = int(rng.integers(1, 6))
        centre = target if rng.random() < skill else int(rng.integers(1, 6))
        p = np.exp(-np.abs(np.arange(1, 6) - centre))
        p /= p.sum()
        rows.append({"id": f"t{i:06d}", "target": str(target), "prediction": str(centre), "loss": 0.5,
                     "target_tokens": 2, "choice_probabilities": dict(zip(choices, p.tolist(), strict=True))})
    score_predictions(rows, n, choices)
    return rows


def test_answer_choice_metrics_are_compared_with_the_main_metric_first(tmp_path):
    runs_dirs = [make_run(tmp_path, "full", "profile_and_history", rating_choice_predictions(80, 0.9, 1), numeric=True),
                 make_run(tmp_path, "query", "query_only", rating_choice_predictions(80, 0.3, 2), numeric=True)]
    for d in runs_dirs:  # as the evaluation records it for numeric answer choices
        results = json.loads((d / "results.json").read_text())
        results["test"]["main_metric"] = "expected_mae"
        (d / "results.json").write_text(json.dumps(results))
    runs = load_runs(runs_dirs)
    rows = comparison_table(runs, runs[0], n_resamples=300)
    query = rows[1]
    assert query.main == "expected_mae" and query.auc.value is None
    for name in ("macro_f1", "expected_mae", "expected_rmse", "mae"):
        e = query.estimate(name)
        assert e.lo <= e.diff <= e.hi, name
    assert query.macro_f1.diff < 0 < query.expected_mae.diff  # the weaker run: lower F1, larger error
    header = ca.markdown_table(rows, 0.95).splitlines()[0].split(" | ")
    assert header[3:6] == ["eval loss", "eval loss vs ref", "MAE of the expected rating"]
    assert "macro-F1" in header and "AUC" not in header and "ROUGE-L" not in header
    ca.plot(runs, rows, tmp_path / "figure.png", 0.95)  # the main metric on the right


def test_a_study_of_several_seeds_gives_macro_f1_its_seed_and_example_interval(tmp_path):
    dirs = []
    for seed in (1, 2):
        for ablation, skill in (("profile_and_history", 0.9), ("query_only", 0.3 + 0.2 * seed)):
            d = make_run(tmp_path, f"{ablation}-seed{seed}", ablation,
                         rating_choice_predictions(60, skill, seed), numeric=True,
                         config_changes={"training.seed": seed, "cli.overrides": [f"training.seed={seed}"]})
            results = json.loads((d / "results.json").read_text())
            results["test"]["main_metric"] = "expected_mae"
            (d / "results.json").write_text(json.dumps(results))
            dirs.append(d)
    ablation_rows, run_rows = seed_comparison(seed_groups(load_runs(dirs)), "profile_and_history", n_resamples=300)
    query = ablation_rows[1].macro_f1
    per_seed = [r.macro_f1.diff for r in run_rows if r.ablation == "query_only"]
    assert query.diff == pytest.approx(sum(per_seed) / 2) and query.lo <= query.diff <= query.hi < 0
    assert ablation_rows[1].main == "expected_mae" and ablation_rows[1].auc.value is None
