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
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
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
IDENTITY_NAME = "run_identity.json"  # what the run is (run_identity.py); also in every checkpoint
FINAL_DIRNAME = "final"
ADAPTER_DIRNAME = "adapter"  # LoRA runs: the trained adapter, which peft.PeftModel.from_pretrained loads on the base
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


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> int:
    """One JSON object per line, streamed (a converted benchmark can be a million records: never one string in
    memory); returns how many were written."""
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                written += 1

    write_atomic(path, write)
    return written


# The files the data converters (convert_movielens.py, convert_lamp.py) write into their --output_dir.
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


def check_split_files(output_dir: Path, overwrite: bool) -> None:
    """Converted data is never replaced unless the user says so: checked before any input is read."""
    existing = [output_dir / name for name in SPLIT_FILES.values() if (output_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{output_dir}: already holds {', '.join(p.name for p in existing)}. Choose another "
                        "--output_dir, or add --overwrite to replace them.")


def write_splits(output_dir: Path, splits: Mapping[str, Iterable[dict]]) -> dict[str, int]:
    """Each split's records into its SPLIT_FILES file, atomically; returns the record count per split."""
    return {split: write_jsonl_atomic(output_dir / SPLIT_FILES[split], records) for split, records in splits.items()}


# ----------------------------------------------------------------------------------------------------------------------
# The output directory: never overwrite a finished run, never mix two runs
# ----------------------------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A finished run (results.json) is never overwritten, and an unfinished one is never silently mixed with a new
    one, unless the user says so."""
    if not output_dir.exists():
        return
    replaced = sorted(output_dir.glob(f"{REPLACED_PREFIX}*"))
    if replaced:
        raise UserError(f"{replaced[0]}: holds the outputs of a run that --overwrite_output_dir was replacing when the "
                        "new run died before its first step. Move them back (`mv "
                        f"{replaced[0]}/* {output_dir}/`) or delete that directory, then run again.")
    if overwrite:
        return
    if (output_dir / RESULTS_NAME).is_file():
        raise UserError(f"{output_dir}: holds a finished run ({RESULTS_NAME}). Choose another --output_dir, or add "
                        "--overwrite_output_dir to replace it.")
    if list(output_dir.glob("checkpoint-*")) and resume is None:
        raise UserError(f"{output_dir}: holds checkpoints of an unfinished run. Add --resume_from_checkpoint auto to "
                        "continue it, or --overwrite_output_dir to start over.")


# What a training run writes into its output directory, and nothing else: --overwrite_output_dir moves exactly these.
RUN_OUTPUTS = ("checkpoint-*", FINAL_DIRNAME, f".{FINAL_DIRNAME}.tmp", ADAPTER_DIRNAME, f".{ADAPTER_DIRNAME}.tmp",
               DS_CONFIG_DIRNAME, RESULTS_NAME, RESOLVED_CONFIG_NAME, PREDICTIONS_NAME, IDENTITY_NAME)
REPLACED_PREFIX = ".replaced-"


class PreviousRun:
    """The outputs of the run that --overwrite_output_dir replaces. They are moved aside (renames, instant) when the
    new run starts writing, put back if the new run stops before its first optimizer step, and deleted after that
    step: the old run is never lost for a new one that does not start."""

    def __init__(self, output_dir: Path, replacing: bool):
        self.output_dir, self.replacing = output_dir, replacing  # replacing: --overwrite_output_dir, on rank 0
        self.aside = output_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.moved: list[str] = []

    def move_aside(self) -> None:
        if not self.replacing:
            return
        for pattern in RUN_OUTPUTS:
            for path in sorted(self.output_dir.glob(pattern)):
                self.aside.mkdir(exist_ok=True)
                os.replace(path, self.aside / path.name)
                self.moved.append(path.name)
        if self.moved:
            logger.info("--overwrite_output_dir: the previous run's outputs wait in %s until this run's first step.",
                        self.aside)

    def restore(self) -> None:
        """The new run stopped before its first step: its own files go, the previous run's come back."""
        for pattern in RUN_OUTPUTS:
            for path in self.output_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for name in self.moved:
            os.replace(self.aside / name, self.output_dir / name)
        self.aside.rmdir()
        self.moved = []
        logger.warning("The new run stopped before its first step: the previous run in %s is back as it was.",
                       self.output_dir)

    def discard(self) -> None:
        if self.moved:
            shutil.rmtree(self.aside)
            self.moved = []

    def __enter__(self) -> PreviousRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.moved:
            self.restore()
        self.discard()


# ----------------------------------------------------------------------------------------------------------------------
# Which test set a run's predictions come from
# ----------------------------------------------------------------------------------------------------------------------


def read_results(output_dir: Path) -> dict:
    path = output_dir / RESULTS_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); it was not written by a finished run of this tool.") from None


def test_set_of(results: dict) -> dict | None:
    """The provenance of a results.json's test section: {path, sha256, ids_sha256} (None: no test evaluation)."""
    return (results.get("test") or {}).get("test_set")


def check_same_test_set(output_dir: Path, new: dict, replace: bool) -> None:
    """--do_eval_only may re-evaluate a run on the test set its predictions came from; another test set would replace
    them silently, so it needs --replace_test_set (recorded)."""
    old = test_set_of(read_results(output_dir))
    if old is None or replace or (old.get("ids_sha256"), old.get("sha256")) == (new["ids_sha256"], new["sha256"]):
        return
    raise UserError(f"{output_dir / PREDICTIONS_NAME} and results.json's test metrics come from {old.get('path')} "
                    f"(ids sha256 {str(old.get('ids_sha256'))[:12]}, content sha256 {str(old.get('sha256'))[:12]}); "
                    f"this evaluation would use {new['path']} (ids {new['ids_sha256'][:12]}, content "
                    f"{new['sha256'][:12]}) and replace them. Add --replace_test_set to replace them (recorded), or "
                    "evaluate a copy of the run directory.")


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
                            f"{dataclasses.asdict(cfg.prompt)}; pass the run's --ablation_config, or, to evaluate "
                            f"it with this prompt at test time, add --test_time_ablation {output_dir} and a new "
                            "--output_dir for the evaluation (README: Test-time ablation).")
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


def estimated_storage(model_dir: Path, training: TrainingConfig, steps: int) -> int | None:
    """Bytes the run's checkpoints and final/ may need at once; None when the parameter count is unknown."""
    n_params = count_parameters(model_dir)
    return None if n_params is None else storage_estimate(n_params, checkpoints_on_disk(training, steps))


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


# ----------------------------------------------------------------------------------------------------------------------
# The output-directory lock: one run at a time
# ----------------------------------------------------------------------------------------------------------------------

LOCK_NAME = ".lock"


def process_start_time(pid: int) -> str | None:
    """When a process started (Linux: clock ticks after boot), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def owner_is_gone(holder: dict) -> bool:
    """True when the lock's owner ran on this host and is no longer running. An owner on another host cannot be seen
    from here and counts as alive."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if pid == "?":  # an unreadable lock file older than any write of it: its writer died while writing
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return True
    except PermissionError:  # alive, another user's
        return False
    started = process_start_time(int(pid))
    return started is not None and holder.get("process_start") not in (None, started)  # the pid was reused


class OutputLock:
    """<output_dir>/.lock, held by rank 0 for the whole of a training run, an --do_eval_only or a --dry_run, so that two
    runs never write into one directory. The file says who holds it (process, host, start time, command). A lock left
    by a run that died on this host is taken over, with a warning; one held by a live run, or by a run on another
    host, is refused with how to clear it. The other ranks leave it to rank 0: if rank 0 stops, the launcher stops
    them."""

    def __init__(self, output_dir: Path, held_here: bool = True):
        self.path, self.held_here, self.holding = output_dir / LOCK_NAME, held_here, False

    def acquire(self) -> None:
        if not self.held_here:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": process_start_time(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # released meanwhile
                    continue
                if not owner_is_gone(holder):
                    raise UserError(f"{self.path.parent}: in use by another run (process {holder.get('pid')} on "
                                    f"{holder.get('host')}, started {holder.get('started')}: "
                                    f"{holder.get('command', '?')}). Wait for it to end or choose another "
                                    f"--output_dir. If that run is gone, delete {self.path}.") from None
                logger.warning("%s: taking over the lock of a run that is gone (process %s on %s, started %s).",
                               self.path, holder.get("pid"), holder.get("host"), holder.get("started"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.holding = True
            return
        raise UserError(f"{self.path}: another run took this directory while this one was starting; choose another "
                        "--output_dir.")

    def _holder(self) -> dict | None:
        """Who holds the lock; None when the file went away meanwhile."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written right now, or left half-written by a killed run
            written_just_now = time.time() - self.path.stat().st_mtime < 10
            return {"pid": "?", "host": socket.gethostname() if not written_just_now else "?",
                    "started": "?", "command": "? (unreadable lock file)"}

    def is_held(self) -> bool:
        """Whether a live run holds the lock (a run on another host counts as live, as in acquire)."""
        holder = self._holder()
        return holder is not None and not owner_is_gone(holder)

    def release(self) -> None:
        if self.holding:
            self.path.unlink(missing_ok=True)
            self.holding = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
