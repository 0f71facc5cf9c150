"""What makes a run the run its name says: the settings that decide what is learned, the content of its data files,
the model it starts from, the launch's world size and the library versions. Recorded when a run starts (in its
output directory and in every checkpoint), compared when a run resumes. Standard library only.

Resuming may change how often a run logs, evaluates and saves, how it is evaluated at the end, where DeepSpeed keeps
states, and may lengthen max_steps: none of that changes what is learned. Anything else is refused unless
--allow_config_changes is given, and every change is recorded in results.json.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from .config import Ablation, Config
from .errors import UserError
from .outputs import IDENTITY_NAME, resolve_resume

# Config keys a resumed run may change: cadence, final evaluation, DeepSpeed's placement of states (the same
# arithmetic), recomputation instead of storage, the attention kernel (the same attention).
CADENCE_KEYS = frozenset({
    "training.logging_steps", "training.eval_steps", "training.save_steps", "training.save_total_limit",
    "training.report_to", "training.eval_batch_size", "training.activation_checkpointing",
    "model.attn_implementation", "data.allow_overlap", "data.cache_dir", "data.preprocessing_num_workers",
})
CADENCE_SECTIONS = ("evaluation.", "deepspeed.")
# Compared by what they hold (data_files, model), not by where they are: a moved file is the same file.
LOCATION_KEYS = frozenset({"model.model_name_or_path", "model.tokenizer_name_or_path", "data.train_file",
                           "data.validation_file", "data.test_file"})
FITTED_ON_KEYS = ("system", "instruction")  # the PromptConfig texts of the full prompt that examples are fitted on
SAMPLE = 1 << 20  # bytes read from each part of a weights file for its fingerprint


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"training": {"seed": 1}} -> {"training.seed": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def file_sha256(path: Path) -> str:
    """The file's content hash; a run asks for each data file's twice (its identity, the prepared-data cache's key),
    so it is read once per size and modification time."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(path: Path) -> str:
    """A digest of a weights file's size and of samples from its start, middle and end: reading all of a 60 GB
    checkpoint at every start would take minutes, and a fine-tuned copy differs in every sample."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE))
    return digest.hexdigest()


def model_identity(location: str) -> dict[str, Any]:
    """A local checkpoint by the content of its config and a fingerprint of each weights file; a hub id by name."""
    path = Path(location)
    if not path.is_dir():
        return {"hub_id": location}
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return {"config_sha256": file_sha256(path / "config.json") if (path / "config.json").is_file() else None,
            "weights": {p.name: weights_fingerprint(p) for p in weights}}


def run_identity(cfg: Config, ablation: Ablation, data_files: dict[str, Path], model_path: str, tokenizer_path: str,
                 world_size: int, versions: dict[str, str]) -> dict[str, Any]:
    return {
        "config": flatten(dataclasses.asdict(cfg)),
        "ablation": ablation.name,
        # config.json's texts, which decide the examples kept even where the ablation's prompt replaces them
        "examples_fitted_on": {key: getattr(ablation.study_prompt, key) for key in FITTED_ON_KEYS},
        "data_files": {split: {"path": str(path), "sha256": file_sha256(path)} for split, path in data_files.items()},
        "model": model_identity(model_path),
        "tokenizer": model_identity(tokenizer_path) if tokenizer_path != model_path else "the model's",
        "world_size": world_size,
        "versions": versions,
    }


def identity_of_checkpoint(checkpoint: Path) -> tuple[dict | None, Path | None]:
    """The identity saved in a checkpoint, or in the run directory that holds it."""
    for candidate in (checkpoint / IDENTITY_NAME, checkpoint.parent / IDENTITY_NAME):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8")), candidate
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
    return None, None


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def resume_differences(before: dict, now: dict, checkpoint_step: int) -> tuple[list[str], list[str]]:
    """(refused, allowed): the differences between the identity a checkpoint was trained with and this run's.
    Refused: anything that changes what is learned. Allowed: cadence and placement, a longer max_steps, library
    versions."""
    refused, allowed = [], []
    old, new = before.get("config", {}), now["config"]
    for key in sorted((old.keys() | new.keys()) - LOCATION_KEYS):
        if old.get(key) == new.get(key):
            continue
        line = f"{key}: the checkpoint was trained with {_show(old.get(key))}, this run asks for {_show(new.get(key))}"
        cadence = key in CADENCE_KEYS or key.startswith(CADENCE_SECTIONS)
        longer = key == "training.max_steps" and isinstance(new.get(key), int) and new[key] >= max(
            checkpoint_step, old.get(key) or 0)
        (allowed if cadence or longer else refused).append(line)
    for key, what in (("ablation", "ablation"), ("model", "model"), ("tokenizer", "tokenizer"),
                      ("world_size", "number of processes"),
                      ("examples_fitted_on", "config.json's prompt texts, on which the examples kept are decided")):
        # Checkpoints from before examples_fitted_on was recorded lack it (and knew no instruction): not a change.
        not_recorded = key == "examples_fitted_on" and key not in before
        if not not_recorded and before.get(key) != now[key]:
            refused.append(f"{what}: the checkpoint was trained with {_show(before.get(key))}, this run has "
                           f"{_show(now[key])}")
    old_files, new_files = before.get("data_files", {}), now["data_files"]
    for split in sorted(old_files.keys() | new_files.keys()):
        old_hash = (old_files.get(split) or {}).get("sha256")
        new_hash = (new_files.get(split) or {}).get("sha256")
        if old_hash != new_hash:
            refused.append(f"data.{split}_file: its content differs from the file the checkpoint was trained with "
                           f"({(old_files.get(split) or {}).get('path', 'none')} then, "
                           f"{(new_files.get(split) or {}).get('path', 'none')} now)")
    if before.get("versions") != now["versions"]:
        allowed.append(f"library versions: {_show(before.get('versions'))} then, {_show(now['versions'])} now")
    return refused, allowed


def resume_point(requested: str | None, output_dir: Path, identity: dict,
                 allow_changes: bool) -> tuple[str | None, list[str]]:
    """The checkpoint a run continues from (None: it starts from the beginning), and the changes against the identity
    the checkpoint was trained with that are allowed (or forced with --allow_config_changes), for results.json."""
    checkpoint = resolve_resume(requested, output_dir)
    if checkpoint is None:
        return None, []
    before, source = identity_of_checkpoint(Path(checkpoint))
    if before is None:
        if allow_changes:
            return checkpoint, [f"{checkpoint} carries no {IDENTITY_NAME}; resumed without comparing settings"]
        raise UserError(f"{checkpoint}: no {IDENTITY_NAME} records what it was trained with (a checkpoint of an "
                        "older version of this tool, or of another one), so resuming could mix two runs. Pass "
                        "--allow_config_changes to resume it anyway (recorded in results.json), or start a new "
                        "--output_dir.")
    refused, allowed = resume_differences(before, identity, int(Path(checkpoint).name.rpartition("-")[2]))
    if refused and not allow_changes:
        raise UserError([f"{checkpoint} was trained with other settings than this run asks for; resuming would "
                         "mix two runs under one name:", *(f"  - {line}" for line in refused),
                         f"Rerun with the checkpoint's settings (recorded in {source}), start a new --output_dir, "
                         "or pass --allow_config_changes to continue anyway (the changes are recorded in "
                         "results.json)."])
    return checkpoint, refused + allowed
