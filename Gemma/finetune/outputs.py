"""What a run leaves in its output directory, shared by every tool of this project: the file names, atomic writes,
the checks that keep a finished run from being overwritten, checkpoints and resuming, and disk space.
Standard library only."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, TrainingConfig
from .errors import UserError

logger = logging.getLogger(__name__)

DS_CONFIG_DIRNAME = "deepspeed_config"
GENERATED_DS_CONFIG_NAME = "ds_config_zero3.json"
RESULTS_NAME = "results.json"  # written last: a run is finished when it exists
PREDICTIONS_NAME = "predictions.jsonl"
RESOLVED_CONFIG_NAME = "resolved_config.json"
FINAL_DIRNAME = "final"
DRY_RUN_DIRNAME = "dry_run"


def deepspeed_config_filename(custom: Path | None) -> str:
    """A copy of the user's --deepspeed_config keeps its name; the generated one is GENERATED_DS_CONFIG_NAME."""
    return custom.name if custom is not None else GENERATED_DS_CONFIG_NAME


# ----------------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------------


def write_atomic(path: Path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write text, bytes, or whatever write(temporary path) writes, to a temporary file in the same directory, flush
    it to disk, then rename it over `path`: readers (and a run that dies) see the old file or the new, never half.
    The temporary file never stays behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, (str, bytes)):  # text as UTF-8 bytes: "\n" stays "\n" on every platform
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        else:
            content(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror or e}); free some space, fix the permissions or choose "
                        "another path.") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


# ----------------------------------------------------------------------------------------------------------------------
# The output directory: never overwrite a finished run, never mix two runs
# ----------------------------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A finished run (results.json) is never overwritten, and an unfinished one is never silently mixed with a new
    one, unless the user says so."""
    if not output_dir.exists() or overwrite:
        return
    if (output_dir / RESULTS_NAME).is_file():
        raise UserError(f"{output_dir}: holds a finished run ({RESULTS_NAME}). Choose another --output_dir, or add "
                        "--overwrite_output_dir to replace it.")
    if list(output_dir.glob("checkpoint-*")) and resume is None:
        raise UserError(f"{output_dir}: holds checkpoints of an unfinished run. Add --resume_from_checkpoint auto to "
                        "continue it, or --overwrite_output_dir to start over.")


def clear_output_dir(output_dir: Path) -> None:
    """Remove what a previous run wrote (only our own outputs: never anything else the user keeps there)."""
    for path in [*output_dir.glob("checkpoint-*"), output_dir / FINAL_DIRNAME, output_dir / f".{FINAL_DIRNAME}.tmp",
                 output_dir / DS_CONFIG_DIRNAME]:
        if path.is_dir():
            shutil.rmtree(path)
    for name in (RESULTS_NAME, RESOLVED_CONFIG_NAME, PREDICTIONS_NAME):
        (output_dir / name).unlink(missing_ok=True)


def check_eval_only(output_dir: Path, cfg: Config) -> Path:
    """--do_eval_only evaluates a finished run's final/ model with the prompt it was trained with; returns final/."""
    final = output_dir / FINAL_DIRNAME
    problems = []
    if not (final / "config.json").is_file():
        problems.append(f"{output_dir}: no {FINAL_DIRNAME}/ model to evaluate; train first, or point --output_dir "
                        "at a finished run.")
    if cfg.data.test_file is None:
        problems.append("--do_eval_only needs data.test_file in the config.")
    resolved = output_dir / RESOLVED_CONFIG_NAME
    if resolved.is_file():
        trained_prompt = json.loads(resolved.read_text(encoding="utf-8")).get("prompt")
        if trained_prompt != dataclasses.asdict(cfg.prompt):
            problems.append(f"{resolved}: the run was trained with prompt {trained_prompt}, not "
                            f"{dataclasses.asdict(cfg.prompt)}; pass the run's --ablation_config.")
    if problems:
        raise UserError(problems)
    return final


def check_output_writable(output_dir: Path) -> None:
    """Fail now, not after hours of training, when the output directory cannot take a checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise UserError(f"{output_dir}: cannot write there ({e.strerror or e}). Free some space, fix the permissions, "
                        "or choose another --output_dir.") from None


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and resuming
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_is_complete(path: Path) -> bool:
    """The Trainer writes trainer_state.json last, after the model and every rank's DeepSpeed shards (DeepSpeed
    saves collectively, with a barrier): a checkpoint killed mid-write lacks it, or holds a truncated one."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    step = path.name.rpartition("-")[2]
    return step.isdigit() and state.get("global_step") == int(step)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The highest-step complete checkpoint-N in output_dir (incomplete ones are reported and skipped)."""
    candidates = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.rpartition("-")[2].isdigit()]
    for path in sorted(candidates, key=lambda p: int(p.name.rpartition("-")[2]), reverse=True):
        if checkpoint_is_complete(path):
            return path
        logger.warning("%s is incomplete (interrupted while saving); skipping it.", path)
    return None


def resolve_resume(resume: str | None, output_dir: Path) -> str | None:
    """--resume_from_checkpoint: a complete checkpoint directory, or "auto" for the latest complete one (None: start
    from the beginning)."""
    if resume is None:
        return None
    if resume == "auto":
        last = last_complete_checkpoint(output_dir) if output_dir.is_dir() else None
        if last is None:
            logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting from the beginning.", output_dir)
        return str(last) if last else None
    if not checkpoint_is_complete(Path(resume)):
        raise UserError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint directory (or use 'auto').")
    return resume


# ----------------------------------------------------------------------------------------------------------------------
# Disk space
# ----------------------------------------------------------------------------------------------------------------------


def count_parameters(model_dir: Path) -> int | None:
    """Parameter count from the safetensors headers (no weights are read); None when unknown (hub ids, .bin)."""
    files = list(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def planned_steps(training: TrainingConfig, train_examples: int, processes: int) -> int:
    """Optimizer steps the run will take: max_steps, or the epochs over the training examples."""
    if training.max_steps is not None:
        return training.max_steps
    batches = math.ceil(train_examples / (training.batch_size * processes))  # per rank, per epoch
    return math.ceil(training.num_train_epochs * max(1, batches // training.gradient_accumulation_steps))


def checkpoints_on_disk(training: TrainingConfig, steps: int) -> int:
    """The most checkpoint-N directories on disk at once: save_total_limit of them plus the one being written (the
    Trainer deletes the oldest only after saving), or every one the run writes when the limit is null. The Trainer
    saves every save_steps and at the last step."""
    written = math.ceil(steps / training.save_steps)
    return written if training.save_total_limit is None else min(written, training.save_total_limit + 1)


def storage_estimate(n_params: int, checkpoints: int) -> int:
    """Bytes for `checkpoints` checkpoints (16-bit weights twice, fp32 master weights and Adam moments: about 16 bytes
    per parameter each) plus final/ (2 bytes per parameter in 16 bits)."""
    return n_params * (16 * checkpoints + 2)


def estimated_storage(model_dir: Path, training: TrainingConfig, train_examples: int, processes: int) -> int | None:
    """Bytes the run's checkpoints and final/ may need at once; None when the parameter count is unknown."""
    n_params = count_parameters(model_dir)
    if n_params is None:
        return None
    return storage_estimate(n_params, checkpoints_on_disk(training, planned_steps(training, train_examples,
                                                                                  processes)))


def warn_if_disk_is_short(output_dir: Path, need_bytes: int | None) -> None:
    free = shutil.disk_usage(output_dir).free
    if need_bytes is not None and free < need_bytes:
        logger.warning("%s: %.1f GB free, but checkpoints and final/ may need about %.1f GB (estimate). Lower "
                       "training.save_total_limit or free some space.", output_dir, free / 1e9, need_bytes / 1e9)


# ----------------------------------------------------------------------------------------------------------------------
# What results.json and resolved_config.json record besides the metrics
# ----------------------------------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def loss_summary(log_history: list[dict]) -> dict[str, float | None]:
    losses = [h["loss"] for h in log_history if "loss" in h]
    evals = [h["eval_loss"] for h in log_history if "eval_loss" in h]
    return {"first_train_loss": losses[0] if losses else None, "last_train_loss": losses[-1] if losses else None,
            "first_eval_loss": evals[0] if evals else None, "last_eval_loss": evals[-1] if evals else None}
