"""A study's runs (Gemma/run_study.py): which they are, where each one stands, and the commands that train them,
here one after another or as a SLURM job array.

A run is an (ablation, seed) pair trained into its own directory, <output_dir>/<ablation>[-seed<S>]. Its state is
read from that directory alone, so that a study run here, by a scheduler, or by both over time reports the same:

    done         results.json is there
    running      a live run holds the directory's lock (one on another host counts as live, as for the lock)
    resumable    stopped after a checkpoint: the next launch resumes it
    failed       stopped before its first checkpoint: the next launch trains it from the start
    not started  no directory, or an empty one

The job array (`run_study.py --slurm`) has one task per run, in planned_runs' order: task i calls
`run_study.py --array_task i` through srun once per node, which launches accelerate for that run alone, skips it
when done and resumes it when resumable, so that resubmitting the array (or one task) continues the study.

Disk: a finished run keeps its checkpoints (DeepSpeed's optimizer state, about 16 bytes per parameter each), which a
study of many runs multiplies. After each run the study says when the runs left would not fit at that run's size,
and `--prune_checkpoints` removes a finished run's checkpoint-* folders (final/, results.json and predictions stay).
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .outputs import FINAL_DIRNAME, RESULTS_NAME, OutputLock

DONE, RUNNING, RESUMABLE, FAILED, NOT_STARTED = "done", "running", "resumable", "failed", "not started"
SBATCH_NAME = "study.sbatch"
SLURM_LOGS_DIRNAME = "slurm"  # <output_dir>/slurm/<job>_<task>.out
# Each array task's rendezvous port, from its own job id: two tasks placed on one node never share a port.
PORT_BASE, PORT_RANGE = 20000, 20000


@dataclass(frozen=True)
class StudyRun:
    """One training run of a study: an ablation (a shipped name or a profile path) with a seed (None: the config's
    training.seed), trained into `directory`."""

    ablation: str
    seed: int | None
    directory: Path

    @property
    def name(self) -> str:
        return self.directory.name


def planned_runs(ablations: Sequence[str], seeds: Sequence[int] | None, output_dir: Path) -> list[StudyRun]:
    """Every run, in training order: seed by seed, so that a study stopped part-way holds every ablation of its first
    seeds. Without seeds each ablation trains once, into a directory named for it."""
    return [StudyRun(a, s, output_dir / (Path(a).stem + ("" if s is None else f"-seed{s}")))
            for s in (seeds or [None]) for a in ablations]


def run_state(directory: Path) -> str:
    if (directory / RESULTS_NAME).is_file():
        return DONE
    if OutputLock(directory).is_held():
        return RUNNING
    if any(directory.glob("checkpoint-*")):
        return RESUMABLE
    if directory.is_dir() and any(directory.iterdir()):
        return FAILED
    return NOT_STARTED


def wall_time_s(directory: Path) -> float | None:
    """How long a finished run took (results.json -> wall_time_s), None when it is not finished."""
    try:
        return float(json.loads((directory / RESULTS_NAME).read_text(encoding="utf-8"))["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def time_left_s(runs: Sequence[StudyRun]) -> float | None:
    """The time the unfinished runs will take one after another, estimated as the mean wall time of the finished
    ones; None before any run has finished. A resumable run counts in full, so this errs long."""
    finished = [t for t in map(wall_time_s, (r.directory for r in runs)) if t is not None]
    unfinished = sum(run_state(r.directory) != DONE for r in runs)
    if not finished:
        return None
    return sum(finished) / len(finished) * unfinished


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def progress_summary(runs: Sequence[StudyRun]) -> str:
    """One line: how many runs are in each state, and the estimated time left."""
    states = [run_state(r.directory) for r in runs]
    counts = ", ".join(f"{states.count(s)} {s}" for s in (DONE, RUNNING, RESUMABLE, FAILED, NOT_STARTED)
                       if states.count(s))
    left = time_left_s(runs)
    estimate = ("no estimate of the time left before a run has finished" if left is None else
                "nothing left to train" if left == 0 else
                f"about {_minutes(left)} of training left, one run after another, at the mean of the finished runs")
    return f"{len(runs)} runs: {counts}; {estimate}."


def status_table(runs: Sequence[StudyRun]) -> str:
    """Every run with its index (the job array's task), state and, when finished, its wall time."""
    lines = [progress_summary(runs)]
    for i, run in enumerate(runs):
        state, took = run_state(run.directory), wall_time_s(run.directory)
        lines.append(f"  {i:>3}  {run.name:<40} {state}{f' ({_minutes(took)})' if took is not None else ''}")
    return "\n".join(lines)


def unfinished_problems(runs: Sequence[StudyRun]) -> list[str]:
    """Why the study cannot be compared yet: every run that is not done, with its state."""
    waiting = [f"  {run.name}: {state}" for run in runs if (state := run_state(run.directory)) != DONE]
    if not waiting:
        return []
    return [f"{len(waiting)} of {len(runs)} runs are not done, so the study cannot be compared yet:", *waiting,
            "Wait for the running ones; resubmit (or rerun here) the others, then collect again."]


def directory_bytes(directory: Path) -> int:
    """The size of every file below `directory` (a file that vanishes while it is read counts nothing)."""
    total = 0
    for path in directory.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() and not path.is_symlink() else 0
        except OSError:
            pass
    return total


def prune_checkpoints(directory: Path) -> int:
    """Remove the checkpoint-* folders of a finished run whose final/ model is saved; the bytes freed. Nothing is
    removed from a run that is not done, or whose directory a live run holds: its checkpoints are how it resumes."""
    if run_state(directory) != DONE or not (directory / FINAL_DIRNAME).is_dir() or OutputLock(directory).is_held():
        return 0
    freed = 0
    for checkpoint in sorted(directory.glob("checkpoint-*")):
        freed += directory_bytes(checkpoint)
        shutil.rmtree(checkpoint)
    return freed


def storage_warning(run_bytes: int, runs_left: int, free_bytes: int) -> str | None:
    """A warning when `runs_left` more runs of `run_bytes` each (a finished run's size on disk) exceed the free space;
    None when they fit."""
    need = run_bytes * runs_left
    if need <= free_bytes:
        return None
    return (f"the {runs_left} runs left may need about {need / 1e9:.1f} GB at this run's size ({run_bytes / 1e9:.1f} "
            f"GB), but {free_bytes / 1e9:.1f} GB are free. Add --prune_checkpoints to remove each finished run's "
            "checkpoints (its final/ model and results stay), lower training.save_total_limit, or free space.")


def run_for_task(runs: Sequence[StudyRun], index: int) -> StudyRun:
    if not 0 <= index < len(runs):
        raise UserError(f"--array_task {index}: this study has {len(runs)} runs (tasks 0-{len(runs) - 1}). Were the "
                        "ablations or seeds changed after the job script was written? Write it again with --slurm.")
    return runs[index]


def slurm_launcher_args(env: Mapping[str, str], cuda: bool) -> list[str]:
    """accelerate launch arguments for this node of an array task, from SLURM's variables and the MAIN_PROCESS_IP
    the job script exports (the task's first node): the task's own rendezvous port (tasks that share a node would
    collide on accelerate's default), and on several nodes the machine's rank and the main node. None outside SLURM."""
    if "SLURM_JOB_ID" not in env:
        return []
    port = ["--main_process_port", str(PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_RANGE)]
    nodes = int(env.get("SLURM_NNODES", "1"))
    if nodes == 1:
        return port
    missing = [k for k in ("SLURM_NODEID", "MAIN_PROCESS_IP") if not env.get(k)]
    if missing:
        raise UserError(f"--array_task on {nodes} nodes needs {', '.join(missing)} in the environment: run it "
                        f"through the job script ({SBATCH_NAME}), which srun starts once per node.")
    return [*(["--multi_gpu"] if cuda else []), "--num_machines", str(nodes), "--machine_rank", env["SLURM_NODEID"],
            "--main_process_ip", env["MAIN_PROCESS_IP"], *port]


def sbatch_script(runs: Sequence[StudyRun], task_command: Sequence[str], *, nodes: int, gpus_per_node: int,
                  sbatch_options: Sequence[str], workdir: Path, logs: Path, job_name: str) -> str:
    """The job array: one task per run; `task_command` is run_study.py's, to which the task index is appended."""
    lines = ["#!/bin/bash",
             "# Written by Gemma/run_study.py --slurm. Submit: sbatch " + shlex.quote(str(logs.parent / SBATCH_NAME)),
             "# Then, when every task has finished: the same run_study.py command with --collect instead of --slurm.",
             "# Task -> run (resubmitting a task resumes its run; a finished run is kept):",
             *(f"#   {i}: {run.name}" for i, run in enumerate(runs)),
             f"#SBATCH --job-name={job_name}",
             f"#SBATCH --array=0-{len(runs) - 1}",
             f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1",  # one run_study.py per node; accelerate starts the ranks
             *([f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []),
             f"#SBATCH --chdir={workdir}",
             f"#SBATCH --output={logs}/%A_%a.out",
             *(f"#SBATCH {option}" for option in sbatch_options),
             "set -euo pipefail",
             ]
    if nodes > 1:  # the rendezvous address every node's accelerate launch is given (slurm_launcher_args)
        lines.append('export MAIN_PROCESS_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"')
    lines.append(f'srun {shlex.join(task_command)} --array_task "$SLURM_ARRAY_TASK_ID"')
    return "\n".join(lines) + "\n"
