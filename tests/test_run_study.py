"""Gemma/run_study.py: the runs it plans (names, order, seeds), its usage errors, and one real study of the tiny model:
2 ablations x 2 seeds in one command, compared by seed, and a rerun that trains nothing and prunes the checkpoints."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_records, script_env, write_config, write_jsonl
from finetune.batching import LengthGroupedSampler
from finetune.outputs import FINAL_DIRNAME, RESOLVED_CONFIG_NAME, RESULTS_NAME
from finetune.study import StudyRun, planned_runs
from transformers import AutoModelForCausalLM

import run_study

ABLATIONS = ["profile_and_history", "query_only"]


def plan(*argv: str) -> list[tuple[str, int | None, str]]:
    args = run_study.parse_args(["--output_dir", "study", "--ablations", *ABLATIONS, *argv])
    return [(r.ablation, r.seed, r.directory.as_posix()) for r in planned_runs(args.ablations, args.seeds,
                                                                                args.output_dir)]


def test_without_seeds_each_ablation_trains_once_into_a_directory_named_for_it():
    assert plan() == [("profile_and_history", None, "study/profile_and_history"),
                      ("query_only", None, "study/query_only")]
    args = run_study.parse_args(["--output_dir", "study", "--set", "training.max_steps=5"])
    cmd = run_study.launch_command(args, StudyRun("profile_only", None, args.output_dir / "profile_only"), cuda=True)
    assert cmd[-2:] == ["--set", "training.max_steps=5"]  # the config's training.seed: nothing added
    assert not any("training.seed" in part for part in cmd)


def test_seeds_train_every_ablation_per_seed_seed_by_seed():
    assert plan("--seeds", "7", "3") == [
        ("profile_and_history", 7, "study/profile_and_history-seed7"), ("query_only", 7, "study/query_only-seed7"),
        ("profile_and_history", 3, "study/profile_and_history-seed3"), ("query_only", 3, "study/query_only-seed3")]
    args = run_study.parse_args(["--output_dir", "study", "--seeds", "3", "--set", "training.max_steps=5"])
    cmd = run_study.launch_command(args, StudyRun("query_only", 3, args.output_dir / "query_only-seed3"), cuda=True)
    assert cmd[-4:] == ["--set", "training.max_steps=5", "--set", "training.seed=3"]


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1", "2", "1"], "--seeds: 1 given more than once; list each seed once."),
    (["--seeds", "-3"], "expected a whole number in [0, 4294967295], got '-3'"),
    (["--seeds", "two"], "expected a whole number in [0, 4294967295], got 'two'"),
    (["--seeds", str(2**32)], "expected a whole number in [0, 4294967295]"),
    (["--seeds", "1", "--set", "training.seed=4"], "--set training.seed=4 and --seeds both set the seed"),
    (["--ablations", "query_only", "ablation_configs/query_only.json"], "--ablations: query_only given more than once"),
])
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_study.parse_args(["--output_dir", "study", *argv])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_training_order_depends_on_the_seed_alone():
    """Runs of one seed train on the same batches in every ablation: with length grouping the order is drawn from
    (seed, epoch) over the full-prompt lengths, which every ablation shares (test_batching checks that); without it
    accelerate's seedable sampler draws it from data_seed = training.seed over the example count."""
    from accelerate.data_loader import SeedableRandomSampler

    lengths = [(7 * i) % 97 + 3 for i in range(300)]
    assert list(LengthGroupedSampler(lengths, 8, seed=5)) == list(LengthGroupedSampler(list(lengths), 8, seed=5))
    assert list(LengthGroupedSampler(lengths, 8, seed=5)) != list(LengthGroupedSampler(lengths, 8, seed=7))

    def plain(dataset: list, seed: int) -> list[int]:
        return list(SeedableRandomSampler(dataset, data_seed=seed, generator=torch.Generator()))

    assert plain(["a prompt"] * 300, 5) == plain(["another prompt"] * 300, 5) != plain(["a prompt"] * 300, 7)


def test_a_study_of_two_ablations_and_two_seeds_in_one_command(tiny_model, data_dir, tmp_path):
    write_jsonl(data_dir / "test.jsonl", make_records(6, seed=3, prefix="t"))
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          data={"test_file": str(data_dir / "test.jsonl")}, evaluation={"max_new_tokens": 2},
                          training={"max_steps": 2, "logging_steps": 1, "eval_steps": 2, "save_steps": 2})
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "Gemma" / "run_study.py"), "--config", str(config), "--output_dir", str(out),
           "--ablations", *ABLATIONS, "--seeds", "5", "7", "--num_processes", "1"]
    first = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    names = [f"{a}-seed{s}" for s in (5, 7) for a in ABLATIONS]
    trained = [line.split(":")[0].removeprefix("[study] ") for line in first.stdout.splitlines()
               if line.startswith("[study] ") and ": done in " in line]
    assert trained == names  # seed by seed
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "comparison.csv", "comparison.md",
                                                           "comparison.png"])
    for name in names:
        resolved = json.loads((out / name / RESOLVED_CONFIG_NAME).read_text())
        assert resolved["training"]["seed"] == int(name[-1]) and resolved["cli"]["overrides"] == [
            f"training.seed={name[-1]}"]
        assert json.loads((out / name / RESULTS_NAME).read_text())["global_step"] == 2

    with (out / "comparison.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["ablation"], r["seeds"]) for r in table if r["seeds"]] == [(a, "2") for a in ABLATIONS]
    assert [(r["run"], r["seed"]) for r in table if r["seed"]] == [(n, n[-1]) for n in names]
    for ablation in ABLATIONS:  # the ablation's row is the mean of its two seeds' rows
        mean, *seeds = [r for r in table if r["ablation"] == ablation]
        assert float(mean["test_loss"]) == pytest.approx(sum(float(r["test_loss"]) for r in seeds) / 2)
    query = table[1]
    assert float(query["test_loss_lo"]) <= float(query["test_loss_diff"]) <= float(query["test_loss_hi"])
    assert (out / "comparison.md").read_text().startswith("Mean over seeds 5, 7.")

    # Rerun with --prune_checkpoints: nothing is trained again, and each finished run's checkpoints go.
    finished = {n: (out / n / RESULTS_NAME).stat().st_mtime_ns for n in names}
    assert all(any((out / n).glob("checkpoint-*")) for n in names)
    again = subprocess.run([*cmd, "--prune_checkpoints"], cwd=REPO, env=script_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    said = [line for line in again.stdout.splitlines() if line.split(":")[0].removeprefix("[study] ") in names]
    assert said[::2] == [f"[study] {n}: finished earlier, kept." for n in names]
    assert [line.partition(" (")[0] for line in said[1::2]] == [f"[study] {n}: checkpoints removed" for n in names]
    assert f"[study] run 4 of 4, {names[-1]}. 4 runs: 4 done; nothing left to train." in again.stdout
    assert {n: (out / n / RESULTS_NAME).stat().st_mtime_ns for n in names} == finished
    assert not any(any((out / n).glob("checkpoint-*")) for n in names)
    for name in names:  # what a finished run is used for stays: its model reloads, its predictions are compared
        assert AutoModelForCausalLM.from_pretrained(out / name / FINAL_DIRNAME).config.model_type == "gemma3_text"
    assert (out / "comparison.md").read_text().startswith("Mean over seeds 5, 7.")
