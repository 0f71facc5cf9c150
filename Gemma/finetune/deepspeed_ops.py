"""DeepSpeed's compiled ops (CPU Adam for optimizer offload, and on CPU-only machines its Adam and shared-memory
communication): built once per environment into a cache that belongs to that environment, and never waited on
forever.

torch builds an op on first use into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions, shared by every
environment of the user, and keyed by paths, so two environments rebuild in turn) under a `lock` file; a build
killed half-way leaves the lock behind and every later run then waits on it silently, forever. So: the cache lives
in the environment (<sys.prefix>/torch_extensions), `Gemma/build_ops.py` (run by setup.sh) builds the ops there,
and each run clears locks whose builder is gone before it loads an op. Standard library only.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)
EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
# A lock younger than this may belong to a build that is just starting (its compiler not yet running).
FRESH_LOCK_SECONDS = 60


def extensions_dir() -> Path:
    """The compiled-ops cache of this environment (or the one TORCH_EXTENSIONS_DIR names)."""
    return Path(os.environ.get(EXTENSIONS_ENV) or Path(sys.prefix) / "torch_extensions")


def use_environment_cache() -> Path:
    """Point torch's op builds at this environment's cache, unless the user chose one."""
    os.environ.setdefault(EXTENSIONS_ENV, str(Path(sys.prefix) / "torch_extensions"))
    return extensions_dir()


def build_locks(root: Path | None = None) -> list[Path]:
    """The build locks in the cache: <root>/<op>/lock (DeepSpeed's builders) or <root>/<python and device>/<op>/lock
    (torch's own extensions, with the default root)."""
    root = root or extensions_dir()
    return sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]) if root.is_dir() else []


def builders_in(directory: Path) -> list[int]:
    """Processes of this host working in a build directory (ninja and the compiler run there)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")).is_relative_to(directory):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def clear_stale_build_locks(root: Path | None = None) -> list[Path]:
    """Remove the build locks left by builds that died (no process works in their directory and the lock is not
    new); return them. A lock with a live builder stays: the run waits for that build, and says so (Runtime)."""
    cleared = []
    for lock in build_locks(root):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > FRESH_LOCK_SECONDS and not builders_in(lock.parent):
            lock.unlink(missing_ok=True)
            cleared.append(lock)
            logger.warning("Removed %s, left by a build of DeepSpeed's %s op that was killed %.0f s ago; the op is "
                           "built again now.", lock, lock.parent.name, age)
    return cleared


def describe_waits(root: Path | None = None) -> str | None:
    """What a run starting DeepSpeed may be waiting for: op builds in progress, with their processes."""
    waits = [f"{lock.parent.name} (build lock {lock}, process {', '.join(map(str, builders_in(lock.parent))) or '?'})"
             for lock in build_locks(root)]
    return "a build of DeepSpeed's " + "; ".join(waits) if waits else None


def build_stamp() -> str:
    """What a build of the ops depends on besides their sources: the CPU (-march=native) and DeepSpeed's version."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").is_file() else "unknown CPU"
    return f"deepspeed {version('deepspeed')}; {cpu}"


def build_ops(cpu_only: bool) -> list[str]:
    """Compile the ops a run uses into the cache (returns their names): CPU Adam (optimizer offload) everywhere;
    without CUDA also DeepSpeed's Adam for non-offloaded states and its shared-memory communication."""
    use_environment_cache()
    clear_stale_build_locks()
    from deepspeed.accelerator import get_accelerator

    names = ["CPUAdamBuilder", *(["FusedAdamBuilder", "ShareMemCommBuilder"] if cpu_only else [])]
    for name in names:
        get_accelerator().create_op_builder(name).load(verbose=False)
    return names
