"""Faults during training: preemption (SIGTERM) saves at the next step boundary; a non-finite loss or gradient norm
stops before anything of that step is saved."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .errors import EXIT_DIVERGED, EXIT_PREEMPTED, TrainingStopped
from .outputs import last_complete_checkpoint


class FaultGuard(TrainerCallback):
    """Once per optimizer step, the ranks agree (one tiny all-reduce) on whether to stop: every rank must save, or
    stop, at the same step, because ZeRO-3 saving is collective.

    SIGTERM is caught only while training runs (on_train_begin .. on_train_end): outside training there is no step
    boundary to act on it at, so it keeps its default effect and ends the process."""

    def __init__(self, trainer: Any):
        self.trainer = trainer  # whose DeepSpeed engine knows the step's global gradient norm
        self.preempt_requested = False
        self.nonfinite_loss = False
        self.preempted_at: int | None = None
        self.diverged_at: int | None = None
        self._sigterm_before: Any = None

    def _on_sigterm(self, signum, frame):
        self.preempt_requested = True  # acted on at the next step boundary, on every rank together

    def on_train_begin(self, args, state, control, **kwargs):
        self._sigterm_before = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, args, state, control, **kwargs):
        signal.signal(signal.SIGTERM, self._sigterm_before)

    def saw_loss(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            self.nonfinite_loss = True

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        bad = self.nonfinite_loss or (grad_norm is not None and not math.isfinite(float(grad_norm)))
        flags = torch.tensor([float(self.preempt_requested), float(bad)], device=args.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        preempt, bad = (bool(x) for x in flags.tolist())
        if bad:  # the weights may already be broken: no checkpoint of them, no evaluation
            self.diverged_at = state.global_step
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True
        elif preempt:
            self.preempted_at = state.global_step
            control.should_save = control.should_training_stop = True
        return control

    def raise_if_stopped(self, output_dir: Path) -> None:
        """After training: a stop is an exit with the code and message that say how to continue."""
        last = last_complete_checkpoint(output_dir)
        if self.diverged_at is not None:
            raise TrainingStopped(
                f"training diverged: the loss or the gradient norm became NaN or infinite at step {self.diverged_at}. "
                f"Nothing was saved after it; the last good checkpoint is {last or 'none (no checkpoint yet)'}. Lower "
                "training.learning_rate or raise warmup_ratio, then resume from that checkpoint or start over.",
                EXIT_DIVERGED)
        if self.preempted_at is not None:
            raise TrainingStopped(
                f"preempted (SIGTERM): saved {last} at step {self.preempted_at} and stopped. Rerun the same command "
                "with --resume_from_checkpoint auto to continue.", EXIT_PREEMPTED)
