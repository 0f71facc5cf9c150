"""The processes of one launch: logging on rank 0, the process group, every work-around this machine needs, and a
clean shutdown whatever happens.

CPU-only machines need work-arounds for DeepSpeed under accelerate (README: "CPU-only machines"); Runtime applies
them in start() and nothing else in the code asks whether this is a CPU: it asks the Runtime for what differs.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
import warnings
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)
# With an error raised on one rank only, the others may never reach the shutdown barrier: wait this long, not forever.
SHUTDOWN_BARRIER_TIMEOUT = datetime.timedelta(seconds=30)


def configure_logging(rank: int) -> None:
    """Our INFO lines on rank 0 only; other libraries stay at WARNING (their INFO is compiler chatter)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING, stream=sys.stdout, force=True)
    for name in ("finetune", "train_deepspeed"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def check_precision(dtype: str, cuda: bool, bf16_supported: bool, device_name: str) -> list[str]:
    """bf16 needs an Ampere or newer GPU (A100, H100, ...). CPUs run DeepSpeed's bf16 engine, so they pass."""
    if dtype == "bfloat16" and cuda and not bf16_supported:
        return [f"model.dtype is bfloat16 but {device_name} has no bf16 support. Set model.dtype to float16 (with "
                "DeepSpeed's loss scaling) or float32 in config.json, or pass --set model.dtype=float32."]
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


class Runtime:
    """One process of a launch. `with Runtime.start(dtype) as runtime:` sets the process up; leaving the block, for
    any reason, leaves the process group cleanly (see close)."""

    def __init__(self, rank: int, world_size: int, cpu_only: bool):
        self.rank, self.world_size, self.cpu_only = rank, world_size, cpu_only

    @classmethod
    def start(cls, dtype: str) -> Runtime:
        """Set up this process before torch allocates anything, then check the hardware can run `dtype`."""
        # Host memory in 2 MB pages: far fewer page faults when offloaded parameters, optimizer states and activations
        # churn through CPU memory (README: "CPU-only machines"). torch reads it at its first allocation.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        ensure_process_group_env()
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
        PartialState(backend="gloo")
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
        # A UserError (a stop, a bad value found after start) is raised on every rank alike; anything else may not be.
        self.close(every_rank=exc is None or isinstance(exc, UserError))
