"""Gemma/train_deepspeed.py's own main(), with benchmarks/step_probe.py's step timer and token counter installed.

    .venv/bin/accelerate launch --use_deepspeed --num_processes 2 benchmarks/ours_probed.py --probe_dir DIR \\
        [--cprofile RANK0.prof] <the arguments of Gemma/train_deepspeed.py>

Runs exactly what `accelerate launch ... Gemma/train_deepspeed.py <args>` runs (the module's main(), given the probe's
callbacks); the probe adds the same callback and token counter the TRL runner gets, so that both are timed the same
way. --cprofile: rank 0 runs cProfile from the end of the first step to the end of training.
The copy of train_deepspeed.py measured is the repository's Gemma/ one unless SPEED_BENCH_GEMMA_DIR names another.
"""

from __future__ import annotations

import cProfile
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data  # noqa: E402,F401  (puts the measured copy of Gemma/ on sys.path)
import step_probe  # noqa: E402
import train_deepspeed  # noqa: E402


def take_option(argv: list[str], name: str) -> str | None:
    if name not in argv:
        return None
    i = argv.index(name)
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


class ProfileSteps(TrainerCallback):
    """cProfile on rank 0 from the end of step 1 (warm-up) to the end of step N, before the last step's logging and the
    end-of-training save; dumped to `path` at the end of training."""

    def __init__(self, path: Path):
        self.path, self.profiler = path, cProfile.Profile()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            self.profiler.disable()
        elif state.global_step == 1:
            self.profiler.enable()

    def on_train_end(self, args, state, control, **kwargs):
        self.profiler.disable()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.dump_stats(str(self.path))


if __name__ == "__main__":
    argv = sys.argv[1:]
    probe_dir = take_option(argv, "--probe_dir")
    profile = take_option(argv, "--cprofile")
    callbacks = step_probe.probe_callbacks(probe_dir)
    if profile and os.environ.get("RANK", "0") == "0":
        callbacks.insert(0, ProfileSteps(Path(profile)))
    sys.exit(train_deepspeed.main(argv, callbacks=callbacks))
