"""Nothing is lost: SIGKILL and SIGTERM mid-run, then `--resume_from_checkpoint auto`; a NaN stops the run with the
last good checkpoint kept. Real runs under `accelerate launch --use_deepspeed --num_processes 2` on a tiny Gemma."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_records, run_script, script_env, write_config, write_jsonl
from finetune.errors import UserError
from finetune.outputs import (FINAL_DIRNAME, RESULTS_NAME, checkpoint_is_complete, last_complete_checkpoint,
                              resolve_resume)

STEPS = 30


def fake_checkpoint(out: Path, step: int, complete: bool, truncated: bool = False) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif truncated:
        (path / "trainer_state.json").write_text('{"global_step": ')
    return path


def test_incomplete_checkpoints_are_never_taken_for_complete(tmp_path):
    fake_checkpoint(tmp_path, 5, complete=True)
    fake_checkpoint(tmp_path, 10, complete=True)
    fake_checkpoint(tmp_path, 15, complete=False)  # killed before trainer_state.json
    fake_checkpoint(tmp_path, 20, complete=False, truncated=True)  # killed while writing it
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint-10")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-15"), tmp_path)
    assert last_complete_checkpoint(tmp_path / "none") is None


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    data = base / "data"
    write_jsonl(data / "train.jsonl", make_records(64, seed=1))
    # Many short steps, a checkpoint every 5; no evaluation, to keep the runs short.
    config = write_config(base / "config.json", tiny_model, data, data={"validation_file": None},
                          training={"max_steps": STEPS, "save_steps": 5, "eval_steps": None, "logging_steps": 1,
                                    "save_total_limit": None, "batch_size": 2})
    return {"base": base, "config": config}


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup["base"] / "uninterrupted"
    proc = run_script(["--config", str(setup["config"]), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / RESULTS_NAME).read_text())


def start(setup: dict, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--use_deepspeed", "--num_processes", "2",
           str(REPO / "Gemma" / "train_deepspeed.py"), "--config", str(setup["config"]), "--output_dir", str(out),
           *extra]
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: a full pipe would stall the ranks
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=f, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log
    return proc


def output_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it (torch elastic starts each rank in a session of its own)."""
    import psutil

    launcher = psutil.Process(pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGKILL)


def wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoint_is_complete(out / f"checkpoint-{step}"):
        assert proc.poll() is None, output_of(proc)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def resume_and_compare(setup: dict, out: Path, uninterrupted: dict) -> dict:
    proc = run_script(["--config", str(setup["config"]), "--output_dir", str(out), "--resume_from_checkpoint", "auto"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = json.loads((out / RESULTS_NAME).read_text())
    assert resumed["global_step"] == uninterrupted["global_step"] == STEPS
    assert resumed["last_train_loss"] == pytest.approx(uninterrupted["last_train_loss"], abs=1e-2)
    return resumed


def test_sigkill_then_auto_resume_matches_an_uninterrupted_run(setup, uninterrupted):
    out = setup["base"] / "killed"
    proc = start(setup, out)
    wait_for_checkpoint(out, 10, proc)
    kill_tree(proc.pid)  # the launcher and both ranks at once, with no chance to clean up
    proc.wait(timeout=60)
    assert not (out / RESULTS_NAME).exists() and not (out / FINAL_DIRNAME).exists()
    # A checkpoint the kill interrupted while it was being written must be passed over.
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    fake_checkpoint(out, last + 1, complete=False)
    resumed = resume_and_compare(setup, out, uninterrupted)
    assert int(resumed["resumed_from"].rsplit("-", 1)[1]) <= last


def test_sigterm_saves_at_the_next_step_and_resumes(setup, uninterrupted):
    out = setup["base"] / "preempted"
    proc = start(setup, out)
    wait_for_checkpoint(out, 5, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler does; it forwards it to the ranks
    proc.wait(timeout=120)
    output = output_of(proc)
    assert proc.returncode != 0
    assert "preempted (SIGTERM): saved" in output and "--resume_from_checkpoint auto" in output
    assert "Traceback (most recent call last)" not in output.split("preempted (SIGTERM)")[0]
    assert not (out / RESULTS_NAME).exists()
    saved = last_complete_checkpoint(out)
    step = int(saved.name.split("-")[1])
    # Saved at the step boundary after the signal: at most one step lost, not back to the last save_steps multiple.
    assert f"saved {saved} at step {step}" in output and 5 <= step < STEPS
    resume_and_compare(setup, out, uninterrupted)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(setup):
    out = setup["base"] / "diverged"
    proc = run_script(["--config", str(setup["config"]), "--output_dir", str(out), "--set", "training.save_steps=1",
                       "--set", "training.learning_rate=1e30", "--set", "training.warmup_ratio=0"])
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "training diverged: the loss or the gradient norm became NaN or infinite at step" in output
    step = int(output.split("infinite at step ")[1].split(".")[0])
    last_good = last_complete_checkpoint(out)
    assert last_good is not None and int(last_good.name.split("-")[1]) == step - 1
    assert f"the last good checkpoint is {last_good}" in output
    assert not (out / f"checkpoint-{step}").exists()  # nothing saved from the broken step on
    assert not (out / RESULTS_NAME).exists() and not (out / FINAL_DIRNAME).exists()


def test_sigterm_is_caught_only_while_training_runs():
    """Outside training (e.g. --do_eval_only, or the test evaluation after training) no step boundary will ever act on
    a caught SIGTERM, so it must keep its default effect: end the process."""
    from finetune.faults import FaultGuard

    before = signal.getsignal(signal.SIGTERM)
    guard = FaultGuard(trainer=None)
    assert signal.getsignal(signal.SIGTERM) is before  # building the guard changes nothing
    guard.on_train_begin(None, None, None)
    try:
        assert signal.getsignal(signal.SIGTERM) == guard._on_sigterm
        signal.raise_signal(signal.SIGTERM)  # caught: a request, acted on at the next step boundary
        assert guard.preempt_requested
    finally:
        guard.on_train_end(None, None, None)
    assert signal.getsignal(signal.SIGTERM) is before
