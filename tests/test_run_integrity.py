"""Run integrity through the real CLI (plain python, tiny Gemma): a resumed, overwritten, concurrent, re-evaluated or
interrupted run never becomes something other than what its name says, and nothing the user had is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_records, read_json, run_script, script_env, write_config, write_jsonl
from finetune.outputs import IDENTITY_NAME, LOCK_NAME, PREDICTIONS_NAME, RESULTS_NAME


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step and a test evaluation."""
    root = tmp_path_factory.mktemp("integrity")
    data = root / "data"
    write_jsonl(data / "train.jsonl", make_records(32, seed=1))
    write_jsonl(data / "validation.jsonl", make_records(8, seed=2, prefix="v"))
    write_jsonl(data / "test.jsonl", make_records(6, seed=3, prefix="t"))
    write_jsonl(data / "test2.jsonl", make_records(5, seed=4, prefix="w"))
    config = write_config(root / "config.json", tiny_model, data, data={"test_file": str(data / "test.jsonl")},
                          training={"max_steps": 2, "save_steps": 1, "eval_steps": None, "logging_steps": 1,
                                    "save_total_limit": None},
                          evaluation={"max_new_tokens": 2})
    finished = root / "finished"
    proc = run_script(["--config", str(config), "--output_dir", str(finished)], processes=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (finished / "checkpoint-1" / IDENTITY_NAME).is_file()  # every checkpoint says what it was trained with
    return {"root": root, "data": data, "config": config, "finished": finished, "model": tiny_model}


def unfinished_copy(base: dict, name: str) -> Path:
    """A run directory holding only the finished run's first checkpoint, as after a crash at step 2."""
    out = base["root"] / name
    shutil.copytree(base["finished"] / "checkpoint-1", out / "checkpoint-1")
    return out


def resume_case(base: dict, case: str) -> tuple[list[str], str]:
    """The extra arguments of a resume that changes what is learned, and the difference the refusal must name."""
    if case == "ablation":
        return ["--ablation_config", "query_only"], "prompt.include_profile: the checkpoint was trained with true"
    if case == "learning_rate":
        return ["--set", "training.learning_rate=0.001"], "training.learning_rate: the checkpoint was trained with 0.003"
    if case == "batch_size":
        return ["--set", "training.batch_size=2"], "training.batch_size: the checkpoint was trained with 4"
    if case == "seed":
        return ["--set", "training.seed=7"], "training.seed"
    if case == "train_data":
        records = make_records(32, seed=1)
        records[0]["target"] = "western"
        changed = write_jsonl(base["root"] / "changed" / "train.jsonl", records)
        return ["--set", f"data.train_file={changed}"], "data.train_file: its content differs"
    if case == "model":
        from tiny_gemma import build_tiny_gemma

        other = build_tiny_gemma(base["root"] / "other_model", seed=1)  # same shapes, other weights
        return ["--set", f"model.model_name_or_path={other}"], "model: the checkpoint was trained with"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["ablation", "learning_rate", "batch_size", "seed", "train_data", "model"])
def test_resume_refuses_a_checkpoint_trained_otherwise(base, case):
    out = unfinished_copy(base, f"resume_{case}")
    extra, difference = resume_case(base, case)
    before = snapshot(out)
    proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--resume_from_checkpoint", "auto",
                       *extra], processes=None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was trained with other settings than this run asks for" in proc.stderr
    assert difference in proc.stderr and "--allow_config_changes" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert snapshot(out) == before


def test_resume_records_cadence_changes_and_forced_ones(base):
    out = unfinished_copy(base, "resume_forced")
    proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--resume_from_checkpoint", "auto",
                       "--set", "training.logging_steps=2", "--set", "training.learning_rate=0.001",
                       "--allow_config_changes"], processes=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = read_json(out / RESULTS_NAME)
    assert results["global_step"] == 2 and results["resumed_from"].endswith("checkpoint-1")
    changes = "\n".join(results["resume_changes"])
    assert "training.learning_rate: the checkpoint was trained with 0.003, this run asks for 0.001" in changes
    assert "training.logging_steps" in changes  # cadence: allowed, and recorded all the same


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(base, tmp_path):
    """The new run passes every check, then its model cannot be loaded (a truncated weights file): the finished run
    it was to replace is back, byte for byte."""
    out = tmp_path / "run"
    shutil.copytree(base["finished"], out)
    broken = tmp_path / "broken_model"
    shutil.copytree(base["model"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(out)
    proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--overwrite_output_dir",
                       "--set", f"model.model_name_or_path={broken}"], processes=None)
    assert proc.returncode != 0
    assert "the previous run in" in proc.stdout + proc.stderr  # "... is back as it was"
    assert snapshot(out) == before


def test_overwrite_replaces_a_finished_run_once_the_new_one_has_started(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base["finished"], out)
    (out / "my_notes.txt").write_text("kept")
    proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--overwrite_output_dir",
                       "--ablation_config", "query_only", "--set", "data.allow_overlap=true",
                       "--set", f"data.test_file={base['data'] / 'train.jsonl'}"], processes=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = read_json(out / RESULTS_NAME)
    assert results["ablation"] == "query_only"
    assert not list(out.glob(".replaced-*")) and (out / "my_notes.txt").read_text() == "kept"
    # data.allow_overlap let the test file be the training file; the overlap is on record
    assert results["data_overlap"]["train/test"]["identical_examples"] == 32
    assert len((out / PREDICTIONS_NAME).read_text().splitlines()) == 32


def test_a_live_run_keeps_its_directory(base, tmp_path):
    """A second run into a directory that a live run uses is refused, and the live run finishes unharmed."""
    out = tmp_path / "live"
    cmd = [sys.executable, str(REPO / "Gemma" / "train_deepspeed.py"), "--config", str(base["config"]),
           "--output_dir", str(out), "--set", "training.max_steps=30", "--set", "training.save_steps=100"]
    with open(tmp_path / "live.log", "w") as log:
        live = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).is_file():
            assert live.poll() is None and time.monotonic() < deadline, (tmp_path / "live.log").read_text()[-3000:]
            time.sleep(0.1)
        for extra in ([], ["--overwrite_output_dir"], ["--dry_run"]):
            second = run_script(["--config", str(base["config"]), "--output_dir", str(out), *extra], processes=None)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"{out}: in use by another run (process {live.pid} on {socket.gethostname()}" in second.stderr
        assert live.wait(timeout=600) == 0, (tmp_path / "live.log").read_text()[-3000:]
    finally:
        live.kill()
    results = read_json(out / RESULTS_NAME)
    assert results["global_step"] == 30 and not (out / LOCK_NAME).exists()
    assert not (out / "dry_run").exists()


def test_locks_of_runs_that_are_gone_are_taken_over_and_others_refused(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base["finished"], out)
    lock = out / LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"another host": {"pid": 1, "host": "gpu-node-17", "started": "2026-12-01 10:00:00", "command": "x"},
              "this process": {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "x"}}
    for who, holder in owners.items():
        lock.write_text(json.dumps(holder))
        proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--dry_run"], processes=None)
        assert proc.returncode == 2 and "in use by another run" in proc.stderr, who
        assert f"If that run is gone, delete {lock}" in proc.stderr
        assert read_json(lock) == holder  # refused: the lock stays the other run's
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier",
                                "command": "a run that was killed"}))
    proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--dry_run"], processes=None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "taking over the lock of a run that is gone" in proc.stdout + proc.stderr
    assert not lock.exists() and (out / "dry_run" / "report.md").is_file()  # a dry run beside a finished run


def test_eval_only_never_silently_replaces_the_predictions_of_another_test_set(base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base["finished"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    other = ["--set", f"data.test_file={base['data'] / 'test2.jsonl'}"]
    before = snapshot(out)
    refused = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--do_eval_only", *other],
                         processes=None)
    assert refused.returncode == 2 and "--replace_test_set" in refused.stderr, refused.stderr[-2000:]
    assert "test.jsonl" in refused.stderr and "test2.jsonl" in refused.stderr
    assert snapshot(out) == before
    replaced = run_script(["--config", str(base["config"]), "--output_dir", str(out), "--do_eval_only",
                           "--replace_test_set", *other], processes=None)
    assert replaced.returncode == 0, replaced.stdout[-3000:] + replaced.stderr[-3000:]
    results, old = read_json(out / RESULTS_NAME), read_json(base["finished"] / RESULTS_NAME)
    test_set = results["test"]["test_set"]
    assert test_set["path"].endswith("test2.jsonl") and test_set["evaluated"].startswith("--do_eval_only")
    assert test_set["replaced"] == old["test"]["test_set"]  # what these results replaced, on record
    assert results["examples"]["test"]["ids_sha256"] == test_set["ids_sha256"] != old["examples"]["test"]["ids_sha256"]
    assert [json.loads(line)["id"] for line in (out / PREDICTIONS_NAME).read_text().splitlines()] == [
        f"w{i:04d}" for i in range(5)]
    assert results["train"] == old["train"]


@pytest.mark.parametrize("signum,code,message", [(signal.SIGTERM, 143, "stopped by SIGTERM while"),
                                                 (signal.SIGINT, 130, "stopped by Ctrl-C while")])
def test_a_signal_before_the_first_step_ends_the_run_at_once(base, tmp_path, signum, code, message):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "Gemma" / "train_deepspeed.py"), "--config", str(base["config"]),
           "--output_dir", str(out)]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while "Resolved config" not in (tmp_path / "log").read_text():  # rank 0 wrote its files: the model loads next
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    returncode = proc.wait(timeout=60)
    output = (tmp_path / "log").read_text()
    assert returncode == code, output[-3000:]
    assert message in output and "Traceback" not in output, output[-3000:]
    assert not (out / LOCK_NAME).exists() and not (out / RESULTS_NAME).exists()


@pytest.mark.parametrize("case", ["every rank finds it", "rank 0 finds it"])
def test_under_the_launcher_a_user_error_is_our_one_message_and_no_traceback_of_ours(base, tmp_path, case):
    """With accelerate launch the launcher adds its own ChildFailedError report after our message (that one is not
    ours to suppress); no process of ours prints a traceback, whichever ranks meet the problem."""
    out = tmp_path / "run"
    extra = []
    if case == "every rank finds it":
        records = make_records(8)
        records[2].pop("query")
        extra = ["--set", f"data.train_file={write_jsonl(tmp_path / 'bad' / 'train.jsonl', records)}"]
        message = "error: " + str(tmp_path / "bad" / "train.jsonl") + ": line 3: query is missing."
    else:
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": "now", "command": "pytest"}))
        message = f"error: {out}: in use by another run (process {os.getpid()}"
    proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), *extra])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(message) == 1, output[-4000:]
    tracebacks = output.split("Traceback (most recent call last)")[1:]
    assert len(tracebacks) <= 1 and all("ChildFailedError" in t and "accelerate" in t for t in tracebacks), output
    assert output.index(message) < output.find("Traceback") or not tracebacks


@pytest.mark.parametrize("flags,message", [
    (["--overwrite_output_dir", "--resume_from_checkpoint", "auto"], "choose one"),
    (["--allow_config_changes"], "--allow_config_changes applies to --resume_from_checkpoint only"),
    (["--replace_test_set"], "--replace_test_set applies to --do_eval_only only"),
])
def test_contradictory_flags_are_usage_errors(base, tmp_path, flags, message):
    out = tmp_path / "run"
    shutil.copytree(base["finished"], out)
    before = snapshot(out)
    proc = run_script(["--config", str(base["config"]), "--output_dir", str(out), *flags], processes=None)
    assert proc.returncode == 2 and message in proc.stderr
    assert snapshot(out) == before
