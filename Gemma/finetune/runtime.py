"""The processes of one launch: logging on rank 0, the process group, every work-around this machine needs, and a
clean shutdown whatever happens.

CPU-only machines need work-arounds for DeepSpeed under accelerate (README: "CPU-only machines"); Runtime applies
them in start() and nothing else in the code asks whether this is a CPU: it asks the Runtime for what differs.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from .deepspeed_ops import clear_stale_build_locks, describe_waits, use_environment_cache
from .errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, TrainingStopped, UserError

logger = logging.getLogger(__name__)
# With an error raised on one rank only, the others may never reach the shutdown barrier: wait this long, not forever.
SHUTDOWN_BARRIER_TIMEOUT = datetime.timedelta(seconds=30)
STARTUP_REPORT_SECONDS = 60


def configure_logging(rank: int) -> None:
    """Our INFO lines on rank 0 only; other libraries stay at WARNING (their INFO is compiler chatter)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING, stream=sys.stdout, force=True)
    for name in ("finetune", "train_deepspeed"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def check_precision(dtype: str, cuda: bool, bf16_supported: bool, device_name: str) -> list[str]:
    """bf16 needs an Ampere or newer GPU (A100, H100, ...). CPUs run DeepSpeed's bf16 engine, so they pass."""
    if dtype == "bfloat16" and cuda and not bf16_supported:
        return [f"model.dtype is bfloat16 but {device_name} has no bf16 support. Set model.dtype to float32 in "
                "config.json, or pass --set model.dtype=float32 (float16, with DeepSpeed's loss scaling, is an option "
                "for Gemma 1 and 2 only: Gemma 3 and later overflow in it)."]
    return []


def ensure_process_group_env() -> None:
    """Plain `python train_deepspeed.py` has no launcher: describe a one-process group so DeepSpeed can start."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:  # a free port, so two single-process runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


class StoppedBySignal(TrainingStopped):
    """SIGTERM or Ctrl-C outside the training steps (which save first, see faults.FaultGuard): nothing to save."""


class StartupWatch:
    """Says, every STARTUP_REPORT_SECONDS, what a run that has not reached its first training step is still busy with
    or waiting for, so that a start-up never hangs in silence."""

    def __init__(self):
        self.phase: str | None = None
        self.since = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="startup-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enter(self, phase: str | None) -> None:
        self.phase, self.since = phase, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(STARTUP_REPORT_SECONDS):
            if self.phase is None:
                continue
            waits = describe_waits() if "DeepSpeed" in self.phase else None
            logger.warning("Still %s after %.0f s%s.", self.phase, time.monotonic() - self.since,
                           f"; waiting for {waits}" if waits else "")


def unlink_shared_memory_buffers(rank: int) -> None:
    """DeepSpeed's CPU allreduce maps one shared-memory buffer per rank (/dev/shm, 66 MB each) and never unlinks it:
    every run left its buffers in memory until the next reboot (14 GB after a day of test runs on a 24 GB machine).
    Once every rank has mapped every buffer (the barrier), each rank unlinks its own name: the mappings stay valid and
    the memory is freed when the processes exit, however they exit."""
    import torch.distributed as dist

    dist.barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(rank)])
    Path("/dev/shm", name).unlink(missing_ok=True)


class Runtime:
    """One process of a launch. `with Runtime.start(dtype) as runtime:` sets the process up; leaving the block, for
    any reason, leaves the process group cleanly (see close). SIGTERM and Ctrl-C stop the process at once with a
    message (exit 143 and 130), except that during the training steps faults.FaultGuard defers SIGTERM to the next
    step boundary and saves there. A start-up phase that lasts over a minute is reported with what it waits for."""

    def __init__(self, rank: int, world_size: int, cpu_only: bool):
        self.rank, self.world_size, self.cpu_only = rank, world_size, cpu_only
        self.watch = StartupWatch()
        self.stop: StoppedBySignal | None = None

    def phase(self, description: str | None) -> None:
        """What this process is busy with until the first training step (None: training is under way). A signal
        that came meanwhile ends the run here at the latest (see _on_signal)."""
        if self.stop is not None:
            raise self.stop
        self.watch.enter(description)
        if description is None:
            self.watch.stop()

    def _on_signal(self, signum, frame) -> None:
        """Stop now. The exception raises wherever Python happens to be; inside a finaliser (__del__) Python ignores
        it, so it is also kept, and the next phase raises it again."""
        name, code = ("SIGTERM", EXIT_PREEMPTED) if signum == signal.SIGTERM else ("Ctrl-C", EXIT_INTERRUPTED)
        self.stop = StoppedBySignal(f"stopped by {name} while {self.watch.phase or 'training'}; nothing was saved "
                                    "after the last checkpoint. Rerun the same command (with --resume_from_checkpoint "
                                    "auto if a checkpoint was saved) to continue.", code)
        raise self.stop

    @classmethod
    def start(cls, dtype: str) -> Runtime:
        """Set up this process before torch allocates anything, then check the hardware can run `dtype`."""
        # Host memory in 2 MB pages: far fewer page faults when offloaded parameters, optimizer states and activations
        # churn through CPU memory (README: "CPU-only machines"). torch reads it at its first allocation.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        ensure_process_group_env()
        use_environment_cache()
        clear_stale_build_locks()
        import torch  # only now: the allocator setting above must come first
        from transformers.utils import logging as hf_logging

        runtime = cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                      cpu_only=not torch.cuda.is_available())
        # torch.distributed's deprecation notices, thousands of lines per run; nothing a user of this script can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        if runtime.cpu_only:
            runtime._apply_cpu_only_workarounds()
        else:
            problems = check_precision(dtype, True, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
            if problems:
                raise UserError(problems)
        hf_logging.set_verbosity_warning() if runtime.rank == 0 else hf_logging.set_verbosity_error()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, runtime._on_signal)
        runtime.watch.start()
        return runtime

    def _apply_cpu_only_workarounds(self) -> None:
        """Make DeepSpeed under accelerate see the real world size on a machine without CUDA, and let bf16 run.

        - accelerate sets no backend for DeepSpeed without a GPU, so every rank would believe it is alone: create the
          process group here (gloo) and have TrainingArguments reuse it (training_arguments()).
        - TrainingArguments refuses bf16 without a GPU; DeepSpeed runs a real bf16 engine on the CPU, so we let it.
        - Split the cores between the ranks when no launcher set OMP_NUM_THREADS (oversubscribing was about 15x
          slower).
        - Tell DeepSpeed's CPU accelerator how many ranks share this node (LOCAL_SIZE, which DeepSpeed's own launcher
          sets and accelerate's does not): otherwise it forks `numactl --hardware` on every gradient reduce-scatter
          to count NUMA nodes, and its shared-memory communication sees the wrong size.
        """
        import torch
        import transformers.training_args
        from accelerate import PartialState

        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        os.environ.setdefault("LOCAL_SIZE", str(local_world))
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")  # accelerate starts DeepSpeed's communication (its shared-memory buffers) here
        unlink_shared_memory_buffers(self.rank)
        transformers.training_args.is_torch_bf16_gpu_available = lambda: True
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    def training_arguments(self) -> dict[str, Any]:
        """What TrainingArguments needs to know about this machine."""
        return {"dataloader_pin_memory": not self.cpu_only,  # pinning is a no-op without CUDA
                "accelerator_config": {"use_configured_state": True} if self.cpu_only else None}

    def warn_if_alone(self, world_size: int) -> None:
        if self.cpu_only and world_size == 1 and "ACCELERATE_DYNAMO_BACKEND" in os.environ:
            logger.warning("accelerate started one process. If you asked for several: on a CPU-only machine add "
                           "--use_deepspeed to `accelerate launch`.")

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self, every_rank: bool = True) -> None:
        """Leave the process group. With gloo, a worker thread can still free the last all-gather's tensors while
        Python shuts down and abort the process after a successful run; a barrier, destroy and short pause prevent
        it. every_rank=False (an error that may be this rank's alone): wait for the others only so long."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if every_rank:
            dist.barrier()
        else:
            try:
                dist.barrier(async_op=True).wait(timeout=SHUTDOWN_BARRIER_TIMEOUT)
            except RuntimeError:  # the others are not coming: leave the group to the launcher's clean-up
                return
        dist.destroy_process_group()
        if self.cpu_only:
            time.sleep(1.0)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.watch.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A UserError (a bad value found after start, a stop agreed at a step boundary) is raised on every rank alike;
        # anything else, a signal outside the training steps included, may not be.
        self.close(every_rank=exc is None or (isinstance(exc, UserError) and not isinstance(exc, StoppedBySignal)))
