"""A study as a SLURM job array and its progress (Gemma/run_study.py --slurm / --array_task / --status / --collect,
finetune/study.py): which run each task trains, the launcher arguments of each node, every run state, the estimate of
the time left, and one array task run here with SLURM's variables set (no scheduler: `srun` is a stand-in that runs
its command once, as SLURM does on a one-node task)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_json, script_env, write_config
from finetune.errors import EXIT_INTERRUPTED, UserError
from finetune.outputs import FINAL_DIRNAME, RESULTS_NAME, OutputLock
from finetune.study import (DONE, FAILED, NOT_STARTED, RESUMABLE, RUNNING, SBATCH_NAME, directory_bytes,
                            planned_runs, progress_summary, prune_checkpoints, run_for_task, run_state,
                            slurm_launcher_args, storage_warning, time_left_s)

import run_study

ABLATIONS = ["profile_and_history", "query_only"]


def task_argv(script: str, index: int) -> list[str]:
    """The run_study.py arguments the job script's srun line gives array task `index`."""
    line = next(line for line in script.splitlines() if line.startswith("srun "))
    words = shlex.split(line.replace('"$SLURM_ARRAY_TASK_ID"', str(index)))
    assert words[1:3] == [sys.executable, str(REPO / "Gemma" / "run_study.py")]
    return words[3:]


def test_each_array_task_trains_its_own_run_of_the_study(tmp_path):
    out = tmp_path / "study"
    args = run_study.parse_args(["--output_dir", str(out), "--ablations", *ABLATIONS, "--seeds", "5", "7",
                                 "--num_processes", "16", "--slurm", "--nodes", "2", "--sbatch_option",
                                 "partition=gpu", "--set", "training.max_steps=5", "--prune_checkpoints"])
    run_study.apply_design(args)
    runs = planned_runs(args.ablations, args.seeds, args.output_dir)
    script = run_study.write_job_array(args, runs).read_text()
    for line in ["#SBATCH --array=0-3", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 f"#SBATCH --output={out}/slurm/%A_%a.out", "#   3: query_only-seed7"]:
        assert line in script.splitlines()
    assert 'export MAIN_PROCESS_IP="$(scontrol show hostnames' in script  # the main node of a 2-node task
    for index, run in enumerate(runs):
        task = run_study.parse_args(task_argv(script, index))
        assert task.array_task == index and task.overrides == ["training.max_steps=5"] and task.num_processes == 16
        assert task.prune_checkpoints  # each task prunes its own run once it has finished
        assert run_for_task(planned_runs(task.ablations, task.seeds, task.output_dir), index) == run
    with pytest.raises(UserError, match="this study has 4 runs"):
        run_for_task(runs, 4)


def test_a_design_study_passes_its_profile_files_to_the_tasks(tmp_path):
    args = run_study.parse_args(["--output_dir", str(tmp_path / "s"), "--design", "history_lengths", "0", "2",
                                 "--slurm"])
    run_study.apply_design(args)
    runs = planned_runs(args.ablations, args.seeds, args.output_dir)
    script = run_study.write_job_array(args, runs).read_text()
    assert "#SBATCH --nodes=1" in script and "scontrol" not in script
    task = run_study.parse_args(task_argv(script, 1))
    assert task.ablations == [str(tmp_path / "s" / "designs" / f"history_{n}.json") for n in (0, 2)]
    assert planned_runs(task.ablations, task.seeds, task.output_dir)[1] == runs[1]


def test_each_node_of_a_task_gets_its_rank_and_the_task_its_own_port():
    one_node = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    assert slurm_launcher_args(one_node, cuda=True) == ["--main_process_port", "21234"]
    second = {"SLURM_JOB_ID": "41234", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "MAIN_PROCESS_IP": "gpu-node-07"}
    assert slurm_launcher_args(second, cuda=True) == [
        "--multi_gpu", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "gpu-node-07",
        "--main_process_port", "21234"]
    assert slurm_launcher_args({}, cuda=True) == []  # not under SLURM: accelerate's defaults
    with pytest.raises(UserError, match="needs MAIN_PROCESS_IP"):
        slurm_launcher_args({"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_NODEID": "0"}, cuda=True)


def finished(directory: Path, wall_time_s: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RESULTS_NAME).write_text(json.dumps({"wall_time_s": wall_time_s}))


def test_every_run_state_is_read_from_its_directory(tmp_path):
    runs = planned_runs(["a", "b", "c", "d", "e"], None, tmp_path)
    finished(runs[0].directory, 600)
    (runs[1].directory / "checkpoint-30").mkdir(parents=True)
    (runs[2].directory / "deepspeed_config").mkdir(parents=True)  # stopped before its first checkpoint
    lock = OutputLock(runs[3].directory)
    with lock:
        assert [run_state(r.directory) for r in runs] == [DONE, RESUMABLE, FAILED, RUNNING, NOT_STARTED]
        assert progress_summary(runs) == ("5 runs: 1 done, 1 running, 1 resumable, 1 failed, 1 not started; about "
                                          "40 min of training left, one run after another, at the mean of the "
                                          "finished runs.")
    assert run_state(runs[3].directory) == NOT_STARTED  # the lock is gone with its run
    (runs[3].directory / ".lock").write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))
    assert run_state(runs[3].directory) == FAILED  # a lock left by a run that died is no run


def fake_run(directory: Path, *, done: bool, final: bool = True) -> None:
    """A run directory as training leaves it: two checkpoints, and when done final/ and results.json."""
    for step in (2, 4):
        (directory / f"checkpoint-{step}" / f"global_step{step}").mkdir(parents=True)
        (directory / f"checkpoint-{step}" / f"global_step{step}" / "optim_states.pt").write_bytes(b"x" * 1000)
    if final:
        (directory / FINAL_DIRNAME).mkdir()
        (directory / FINAL_DIRNAME / "model.safetensors").write_bytes(b"w" * 300)
    if done:
        (directory / RESULTS_NAME).write_text(json.dumps({"wall_time_s": 1.0}))


def test_pruning_removes_only_a_finished_runs_checkpoints(tmp_path):
    finished, unfinished, no_final = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    fake_run(finished, done=True)
    fake_run(unfinished, done=False)  # how it resumes: kept
    fake_run(no_final, done=True, final=False)  # a model saved nowhere else: kept
    assert directory_bytes(finished) == 2000 + 300 + (finished / RESULTS_NAME).stat().st_size
    assert prune_checkpoints(finished) == 2000
    assert sorted(p.name for p in finished.iterdir()) == [FINAL_DIRNAME, RESULTS_NAME] and run_state(finished) == DONE
    assert prune_checkpoints(finished) == 0  # again: nothing left to remove
    assert prune_checkpoints(unfinished) == 0 and run_state(unfinished) == RESUMABLE
    assert prune_checkpoints(no_final) == 0 and len(list(no_final.glob("checkpoint-*"))) == 2
    fake_run(held := tmp_path / "d", done=True)
    with OutputLock(held):
        assert prune_checkpoints(held) == 0  # a live process (here, this one) still works in it
    assert prune_checkpoints(held) == 2000


def test_the_study_warns_when_the_runs_left_would_not_fit(tmp_path):
    assert storage_warning(run_bytes=10 * 10**9, runs_left=3, free_bytes=30 * 10**9) is None
    warning = storage_warning(run_bytes=10 * 10**9, runs_left=3, free_bytes=25 * 10**9)
    assert "3 runs left may need about 30.0 GB" in warning and "25.0 GB are free" in warning
    assert "--prune_checkpoints" in warning


def test_the_time_left_is_the_mean_of_the_finished_runs_per_unfinished_run(tmp_path):
    runs = planned_runs(["a", "b", "c", "d"], [1], tmp_path)
    assert time_left_s(runs) is None and "no estimate" in progress_summary(runs)
    finished(runs[0].directory, 100)
    finished(runs[1].directory, 300)
    assert time_left_s(runs) == pytest.approx(400)
    for run in runs[2:]:
        finished(run.directory, 50)
    assert time_left_s(runs) == 0 and progress_summary(runs).endswith("4 done; nothing left to train.")


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2"], "--nodes and --sbatch_option describe the job array; give them with --slurm."),
    (["--slurm", "--nodes", "3", "--num_processes", "8"], "does not split evenly over --nodes 3"),
    (["--slurm", "--sbatch_option=--partition=gpu"], "write it as KEY=VALUE without dashes"),
    (["--slurm", "--sbatch_option", "exclusive"], "write it as KEY=VALUE without dashes"),
    (["--slurm", "--collect"], "not allowed with argument"),
    (["--status", "--array_task", "1"], "not allowed with argument"),
    (["--status", "--prune_checkpoints"], "--status trains nothing"),
    (["--print_commands", "--prune_checkpoints"], "--print_commands trains nothing"),
])
def test_job_array_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_study.parse_args(["--output_dir", "study", *argv])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def run_tool(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "Gemma" / "run_study.py"), *argv], cwd=REPO,
                          env=env or script_env(), capture_output=True, text=True, timeout=900)


def test_one_array_task_trains_its_run_here_resumes_when_resubmitted_and_collect_waits_for_all(
        tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          training={"max_steps": 2, "logging_steps": 1, "eval_steps": 1, "save_steps": 1})
    out = tmp_path / "study"
    study = ["--config", str(config), "--output_dir", str(out), "--ablations", *ABLATIONS, "--num_processes", "2"]
    written = run_tool(*study, "--slurm")
    assert written.returncode == 0, written.stderr[-3000:]
    assert not any(out / r for r in ABLATIONS if (out / r).exists())  # --slurm trains nothing

    fake_slurm = tmp_path / "bin"  # srun starts its command once per node: here one node
    fake_slurm.mkdir()
    (fake_slurm / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (fake_slurm / "srun").chmod(0o755)
    env = {**script_env(), "PATH": f"{fake_slurm}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_JOB_ID": "7001", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}

    def task_1() -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(out / SBATCH_NAME)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    proc = task_1()
    assert "--main_process_port 27001" in proc.stdout  # the task's own rendezvous port
    assert read_json(out / "query_only" / RESULTS_NAME)["global_step"] == 2
    assert not (out / "profile_and_history").exists()  # task 1 is query_only alone

    status = run_tool(*study, "--status")
    assert status.returncode == 0 and status.stdout.splitlines()[0].startswith("2 runs: 1 done, 1 not started;")
    collect = run_tool(*study, "--collect")
    assert collect.returncode == 2 and "1 of 2 runs are not done" in collect.stderr
    assert "profile_and_history: not started" in collect.stderr and not (out / "comparison.md").exists()

    # Preempted after its first checkpoint: the resubmitted task resumes the run instead of starting over.
    crashed = out / "query_only"
    shutil.move(crashed, tmp_path / "first_attempt")
    crashed.mkdir()
    shutil.copytree(tmp_path / "first_attempt" / "checkpoint-1", crashed / "checkpoint-1")
    assert run_tool(*study, "--status").stdout.splitlines()[2].split()[-1] == RESUMABLE
    proc = task_1()
    assert "--resume_from_checkpoint auto" in proc.stdout
    resumed = read_json(crashed / RESULTS_NAME)
    assert resumed["resumed_from"].endswith("checkpoint-1") and resumed["global_step"] == 2
    again = task_1()  # a finished run is kept
    assert "query_only: finished earlier, kept." in again.stdout

    env["SLURM_ARRAY_TASK_ID"] = "0"
    task_1()
    assert all(any((out / r).glob("checkpoint-*")) for r in ABLATIONS)
    collect = run_tool(*study, "--collect", "--prune_checkpoints")
    assert collect.returncode == 0, collect.stderr[-3000:]
    assert not any(any((out / r).glob("checkpoint-*")) for r in ABLATIONS)  # pruned once all were done
    table = (out / "comparison.md").read_text()
    assert "| profile_and_history (reference) |" in table and "| query_only | query_only |" in table


def test_ctrl_c_stops_the_study_with_how_to_continue(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, training={"max_steps": 400})
    out = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, str(REPO / "Gemma" / "run_study.py"), "--config", str(config),
                             "--output_dir", str(out), "--ablations", "query_only"], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # the run has been launched
        if line.startswith("[study] query_only: "):
            break
    time.sleep(15)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the study and the run it launched
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err.split("[study] query_only failed")[-1]
    assert "interrupted (Ctrl-C); rerun the same command to continue the study" in err
