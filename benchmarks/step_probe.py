"""The same per-step measurement for every Trainer-based runner of benchmarks/speed.py (ours and TRL's SFTTrainer).

`probe_callbacks(probe_dir)` gives the runner's Trainer its measuring callback, a `StepTimer`, and counts the tokens of
each training micro-batch (`count_micro_batch_tokens`): real (attention mask, or every token when a padding-free batch
has no mask) and processed (every position the model runs, padding included).
At the end of training each rank writes `probe_dir/probe_rank<R>.json` (see `StepTimer.on_train_end`).

A step is timed from one `on_step_end` to the next, so it holds everything the user waits for in the loop: fetching
and collating the batch, forward, backward, the optimizer step, callbacks and logging. The first step (warm-up:
DeepSpeed's first gather, lazy allocations) has no previous end and is left out of the medians.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

PROBE_ENV = "SPEED_BENCH_PROBE_DIR"  # where a runner's ranks write their probe files


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_tokens(inputs: dict) -> tuple[int, int]:
    """(real, processed) tokens of one micro-batch."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = int(mask.sum()) if mask is not None else ids.numel()
    return real, ids.numel()


def write_probe(probe_dir: Path, rank: int, *, step_ends: list[float], step_begins: list[float],
                real_tokens: list[int], processed_tokens: list[int], extra: dict | None = None) -> Path:
    """One rank's figures: wall-clock time of each step end, per-step token counts, peak RSS."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    path = probe_dir / f"probe_rank{rank}.json"
    data = {"rank": rank, "step_ends": step_ends, "step_begins": step_begins, "real_tokens": real_tokens,
            "processed_tokens": processed_tokens, "peak_rss_bytes": peak_rss_bytes(), **(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
    return path


class StepTimer(TrainerCallback):
    """Wall-clock time of every step's begin and end; at the end of training, this rank's probe file."""

    def __init__(self, probe_dir: Path, counts: dict[str, list[int]]):
        self.probe_dir, self.counts = probe_dir, counts
        self.rank = int(os.environ.get("RANK", "0"))
        self.begins: list[float] = []
        self.ends: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        write_probe(self.probe_dir, self.rank, step_ends=self.ends, step_begins=self.begins,
                    real_tokens=self.counts["real"], processed_tokens=self.counts["processed"])


def count_micro_batch_tokens() -> dict[str, list[int]]:
    """Record the tokens of every training micro-batch of every Trainer in this process, through
    Trainer.training_step: no callback sees a micro-batch's inputs, so this is the one patch the probe makes."""
    counts: dict[str, list[int]] = {"real": [], "processed": []}
    original_step = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        real, processed = count_tokens(inputs)
        counts["real"].append(real)
        counts["processed"].append(processed)
        return original_step(self, model, inputs, *args, **kwargs)

    Trainer.training_step = training_step
    return counts


def probe_callbacks(probe_dir: str | Path | None = None) -> list[TrainerCallback]:
    """The callbacks that measure a runner (see module docstring); pass them to the Trainer last in line, so that a
    step's end includes every other callback's on_step_end (e.g. our fault guard's all-reduce)."""
    return [StepTimer(Path(probe_dir or os.environ[PROBE_ENV]), count_micro_batch_tokens())]
