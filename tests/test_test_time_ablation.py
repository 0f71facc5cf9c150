"""Test-time ablation through the real CLI (plain python, tiny Gemma): a trained run's final/ evaluated with another
ablation's prompt goes into a directory of its own, labelled, on the trained run's test examples; the trained run is
never written; wrong uses are refused before the model loads; the comparison labels the row and never takes it for a
trained run of that ablation."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_records, read_json, run_script, write_config, write_jsonl
from finetune.outputs import LOCK_NAME, PREDICTIONS_NAME, RESOLVED_CONFIG_NAME, RESULTS_NAME


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prediction_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / PREDICTIONS_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def study(tiny_model, tmp_path_factory):
    """A finished 2-step profile_and_history run (1 process), then its test-time evaluation with the profile_only
    prompt (2 ranks under accelerate launch, as the evaluation shards the test examples)."""
    root = tmp_path_factory.mktemp("test_time")
    data = root / "data"
    write_jsonl(data / "train.jsonl", make_records(32, seed=1))
    write_jsonl(data / "validation.jsonl", make_records(8, seed=2, prefix="v"))
    write_jsonl(data / "test.jsonl", make_records(6, seed=3, prefix="t"))
    config = write_config(root / "config.json", tiny_model, data, data={"test_file": str(data / "test.jsonl")},
                          training={"max_steps": 2, "save_steps": 2, "eval_steps": 2, "logging_steps": 1},
                          evaluation={"max_new_tokens": 2})
    trained = root / "profile_and_history"
    proc = run_script(["--config", str(config), "--output_dir", str(trained)], processes=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = snapshot(trained)
    evaluated = root / "profile_and_history@test_time_profile_only"
    proc = run_script(["--config", str(config), "--do_eval_only", "--test_time_ablation", str(trained),
                       "--ablation_config", "profile_only", "--output_dir", str(evaluated)])  # 2 ranks
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "config": config, "trained": trained, "evaluated": evaluated, "before": before}


def test_the_evaluation_is_labelled_in_its_own_directory_on_the_trained_run_s_test_examples(study):
    trained, evaluated = study["trained"], study["evaluated"]
    assert snapshot(trained) == study["before"]  # not one byte of the trained run changed, nothing was added
    results, trained_results = read_json(evaluated / RESULTS_NAME), read_json(trained / RESULTS_NAME)
    assert results["test_time_ablation"] == {"trained_run": str(trained.resolve()),
                                             "trained_ablation": "profile_and_history",
                                             "evaluated_ablation": "profile_only",
                                             "model": str(trained.resolve() / "final")}
    assert results["ablation"] == "profile_only" and "train" not in results
    assert results["eval"] == {} and results["log_history"] == []  # the run's validation loss had the trained prompt
    assert "test-time ablation of" in results["test"]["test_set"]["evaluated"]
    examples, trained_examples = results["examples"], trained_results["examples"]
    assert {k: v for k, v in examples.items() if k != "test"} == {k: v for k, v in trained_examples.items()
                                                                 if k != "test"}  # what the model was trained on
    for key in ("ids_sha256", "records", "examples", "dropped_too_long", "history_shortened"):
        assert examples["test"][key] == trained_examples["test"][key], key  # the same test examples ...
    assert examples["test"]["mean_tokens"] < trained_examples["test"]["mean_tokens"]  # ... without their history
    rows, trained_rows = prediction_rows(evaluated), prediction_rows(trained)
    assert [r["id"] for r in rows] == [r["id"] for r in trained_rows] == [f"t{i:04d}" for i in range(6)]
    assert [r["target"] for r in rows] == [r["target"] for r in trained_rows]
    # the same model on other prompts: the losses differ (the history really was removed)
    assert [r["loss"] for r in rows] != pytest.approx([r["loss"] for r in trained_rows])
    resolved = read_json(evaluated / RESOLVED_CONFIG_NAME)
    assert resolved["prompt"]["include_history"] is False and resolved["ablation"]["name"] == "profile_only"
    assert resolved["evaluated_model"] == str(trained.resolve() / "final")
    assert resolved["model_path"] == read_json(trained / RESOLVED_CONFIG_NAME)["model_path"]  # what final/ came from
    assert not (evaluated / "final").exists() and not list(evaluated.glob("checkpoint-*"))


def refusal_case(study: dict, case: str, tmp_path: Path) -> tuple[list[str], str]:
    """The arguments of a wrong use and what its message must say."""
    trained, flag = str(study["trained"]), ["--do_eval_only", "--test_time_ablation", str(study["trained"])]
    new = ["--output_dir", str(tmp_path / "new")]
    if case == "flag without --do_eval_only":
        return ["--test_time_ablation", trained, "--ablation_config", "profile_only", *new], "add --do_eval_only"
    if case == "another ablation without the flag":
        return (["--do_eval_only", "--output_dir", trained, "--ablation_config", "profile_only"],
                f"add --test_time_ablation {study['trained'].resolve()}")
    if case == "the trained ablation":
        return [*flag, "--ablation_config", "profile_and_history", *new], "nothing to ablate at test time"
    if case == "into a directory holding a trained run":
        other = tmp_path / "other_run"
        shutil.copytree(study["trained"], other, ignore=shutil.ignore_patterns("checkpoint-*"))
        return [*flag, "--ablation_config", "profile_only", "--output_dir", str(other)], "holds a run or an evaluation"
    if case == "into the trained run":
        return ([*flag, "--ablation_config", "profile_only", "--output_dir", str(study["trained"] / "test_time")],
                "inside the trained run")
    if case == "of a test-time evaluation":
        return (["--do_eval_only", "--test_time_ablation", str(study["evaluated"]), "--ablation_config", "query_only",
                 *new], "is itself a test-time evaluation")
    if case == "other training settings":
        return ([*flag, "--ablation_config", "profile_only", "--set", "training.learning_rate=0.1", *new],
                "training.learning_rate: the run was trained with 0.003, this evaluation has 0.1")
    if case == "another test set":
        other = write_jsonl(tmp_path / "test2.jsonl", make_records(4, seed=9, prefix="w"))
        return ([*flag, "--ablation_config", "profile_only", "--set", f"data.test_file={other}", *new],
                "are not the trained run's")
    if case == "a directory in use":
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                               "started": "now", "command": "pytest"}))
        return [*flag, "--ablation_config", "profile_only", *new], "in use by another run"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["flag without --do_eval_only", "another ablation without the flag",
                                  "the trained ablation", "into a directory holding a trained run",
                                  "into the trained run", "of a test-time evaluation", "other training settings",
                                  "another test set", "a directory in use"])
def test_wrong_uses_are_refused_before_the_model_loads(study, tmp_path, case):
    args, message = refusal_case(study, case, tmp_path)
    untouched = {d: snapshot(d) for d in (study["trained"], study["evaluated"])}
    proc = run_script(["--config", str(study["config"]), *args], processes=None)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "loading the model" not in proc.stdout + proc.stderr
    assert {d: snapshot(d) for d in untouched} == untouched
    assert not (tmp_path / "new" / RESULTS_NAME).exists() and not (study["trained"] / "test_time").exists()


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "Gemma" / "compare_ablations.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_the_comparison_labels_the_row_and_keeps_it_apart_from_a_trained_run_of_its_ablation(study, tmp_path):
    # A trained profile_only run, made by hand from the evaluation (same ids and settings), for the mix.
    trained_profile_only = tmp_path / "profile_only"
    shutil.copytree(study["evaluated"], trained_profile_only)
    results = read_json(trained_profile_only / RESULTS_NAME)
    del results["test_time_ablation"]
    (trained_profile_only / RESULTS_NAME).write_text(json.dumps(results))
    out = tmp_path / "cmp"
    proc = compare(str(study["trained"]), str(study["evaluated"]), str(trained_profile_only),
                   "--csv", str(out / "c.csv"), "--figure", str(out / "c.png"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "| profile_and_history (reference) | profile_and_history |" in lines[2]
    assert ("| profile_and_history@test_time_profile_only | profile_only (test-time, trained: profile_and_history) |"
            in lines[3]) and " [" in lines[3]  # paired with the trained reference, with its interval
    assert "| profile_only | profile_only |" in lines[4]
    assert "a test-time ablation" in proc.stderr
    rows = list(csv.DictReader((out / "c.csv").open()))
    assert [(r["ablation"], r["test_time"], r["trained_ablation"]) for r in rows] == [
        ("profile_and_history", "False", ""), ("profile_only (test-time, trained: profile_and_history)", "True",
                                               "profile_and_history"), ("profile_only", "False", "")]
    assert rows[1]["eval_loss"] == "" and rows[1]["exact_match_diff"] != ""
    assert (out / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = compare(str(study["trained"]), str(study["evaluated"]), "--reference", str(study["evaluated"]),
                      "--csv", str(out / "d.csv"), "--figure", str(out / "d.png"))
    assert refused.returncode == 2 and "the reference must be a trained run" in refused.stderr, refused.stderr
    # without a profile_and_history trained run, the default reference is the first trained run, never the evaluation
    default = compare(str(study["evaluated"]), str(trained_profile_only), "--csv", str(out / "e.csv"),
                      "--figure", str(out / "e.png"))
    assert default.returncode == 0 and "Reference: profile_only (profile_only)" in default.stderr, default.stderr


def test_in_a_study_of_several_seeds_test_time_evaluations_are_an_ablation_of_their_own(tmp_path):
    """Hand-made runs (test_compare_ablations' formats): each seed's trained runs plus a test-time evaluation of each
    seed's profile_and_history run with the profile_only prompt."""
    import compare_ablations as ca
    from finetune.comparison import choose_reference_ablation, seed_comparison, seed_groups
    from finetune.finished_runs import load_runs
    from finetune.errors import UserError
    from test_compare_ablations import seed_run

    def test_time_run(seed: int, right: int) -> Path:
        out = seed_run(tmp_path / "scratch", "profile_only", seed, right)
        out = out.rename(tmp_path / f"profile_and_history-seed{seed}@test_time_profile_only")
        results = read_json(out / RESULTS_NAME)
        results["test_time_ablation"] = {"trained_run": str(tmp_path / f"profile_and_history-seed{seed}"),
                                         "trained_ablation": "profile_and_history",
                                         "evaluated_ablation": "profile_only", "model": "final"}
        (out / RESULTS_NAME).write_text(json.dumps(results))
        return out

    label = "profile_only (test-time, trained: profile_and_history)"
    dirs = [seed_run(tmp_path, a, s, right) for a, s, right in
            [("profile_and_history", 1, 30), ("profile_and_history", 2, 30), ("profile_only", 1, 28),
             ("profile_only", 2, 16)]]
    runs = load_runs([*dirs, test_time_run(1, 20)])
    with pytest.raises(UserError, match=re.escape(f"{label}: no run with seed 2")):
        seed_groups(runs)  # a test-time evaluation of every seed, as for a trained ablation
    runs = load_runs([*dirs, tmp_path / "profile_and_history-seed1@test_time_profile_only", test_time_run(2, 18)])
    study = seed_groups(runs)
    assert study.ablations == ("profile_and_history", "profile_only", label)
    reference = choose_reference_ablation(runs, None)
    assert reference == "profile_and_history"
    with pytest.raises(UserError, match="the reference must be a trained run"):
        choose_reference_ablation(runs, label)
    ablation_rows, run_rows = seed_comparison(study, reference, n_resamples=200)
    assert [(r.ablation, r.trained_ablation) for r in ablation_rows] == [
        ("profile_and_history", None), ("profile_only", None), (label, "profile_and_history")]
    assert ablation_rows[2].exact_match.value == pytest.approx((20 + 18) / 80)
    ca.write_csv([*ablation_rows, *run_rows], tmp_path / "c.csv", 0.95)
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert list(rows[0])[-2:] == ["test_time", "trained_ablation"]
    assert [r["test_time"] for r in rows] == ["False", "False", "True"] * 3
