"""Fine-tune a Gemma model on user-modelling data with DeepSpeed ZeRO-3, one ablation profile per run.

Each record holds a user ``profile``, the user's interaction ``history``, a ``query`` and the ``target`` answer. The
ablation profile (``ablation_configs/<name>.json``) says which of them the prompt contains, so that runs that differ
only in that choice can be compared. Everything else comes from ``config.json`` (see README.md for every key).

Launch (from the repository root):

    # 4 GPUs on one node (accelerate picks up DeepSpeed from the generated config)
    accelerate launch --num_processes=4 Gemma/train_deepspeed.py \\
        --config config.json --ablation_config profile_and_history --output_dir Gemma/outputs/run1

    # 1 GPU, or a quick look on any machine: plain python runs a single process
    python Gemma/train_deepspeed.py --config config.json --ablation_config query_only --output_dir Gemma/outputs/q

    # your own DeepSpeed JSON instead of the generated ZeRO-3 config
    accelerate launch --num_processes=4 Gemma/train_deepspeed.py --config config.json \\
        --ablation_config history_only --output_dir Gemma/outputs/h --deepspeed_config my_ds.json

    # CPU-only machine (2 processes): accelerate needs --use_deepspeed to start several CPU processes
    accelerate launch --use_deepspeed --num_processes 2 Gemma/train_deepspeed.py \\
        --config config.json --ablation_config profile_and_history --output_dir Gemma/outputs/demo

    # continue an interrupted run from its latest complete checkpoint
    accelerate launch ... --output_dir Gemma/outputs/run1 --resume_from_checkpoint auto

    # evaluate a finished run's final/ model on the test file again, without training
    accelerate launch ... --output_dir Gemma/outputs/run1 --ablation_config profile_and_history --do_eval_only

    # will it fit? check everything and estimate memory per GPU for 4 x 80 GB, without weights or training
    python Gemma/train_deepspeed.py --config config.json --output_dir Gemma/outputs/run1 --dry_run \
        --gpus_per_node 4 --gpu_memory_gib 80

A whole ablation study (every profile, then the comparison): Gemma/run_study.py. Exit codes: 0 done, 2 a problem in
the config, data or flags (reported before the model loads), 3 training diverged, 143 preempted by SIGTERM.

Precedence of settings: defaults (the dataclasses below) < config.json < ablation profile < command line (--set).

The file reads top to bottom in the order data flows: config schema -> loading and validation -> command line ->
records and prompts -> DeepSpeed config -> memory plan -> CPU-only work-arounds -> activation offload -> model and
Trainer -> faults -> test-set evaluation -> outputs -> main (and the dry run).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger("train_deepspeed")

REPO_ROOT = Path(__file__).resolve().parent.parent
ABLATION_DIR = REPO_ROOT / "ablation_configs"
DS_CONFIG_DIRNAME = "deepspeed_config"
GENERATED_DS_CONFIG_NAME = "ds_config_zero3.json"
RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.jsonl"
RESOLVED_CONFIG_NAME = "resolved_config.json"
FINAL_DIRNAME = "final"
DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100  # label value the loss skips (torch's CrossEntropyLoss default)
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"


class UserError(Exception):
    """A problem the user can fix (config, data, flags). Printed as a message on rank 0, never as a traceback."""

    exit_code = 2

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TrainingStopped(UserError):
    """Training ended early on purpose (preemption, divergence); the message says how to continue."""

    def __init__(self, problems: str | list[str], exit_code: int):
        super().__init__(problems)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------------------------------
# Config schema: one typed dataclass per config.json section. Every default and why it is the default lives here.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # A local directory (relative paths are resolved against the directory holding config.json) or a hub id.
    model_name_or_path: str
    # Eager attention is what Gemma recommends for training (soft-capping and sliding windows); sdpa is faster on GPUs.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"
    # Weights are loaded in this dtype and DeepSpeed trains in it: bfloat16 is Gemma's native precision.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Where the tokenizer is, when not beside the model (null: model_name_or_path). Handy for --dry_run of a model
    # directory that holds only its config.json.
    tokenizer_name_or_path: str | None = None


@dataclass
class FieldNames:
    """The column names of the data files, for files that name the record fields differently."""

    profile: str = "profile"
    history: str = "history"
    query: str = "query"
    target: str = "target"
    id: str = "id"


@dataclass
class DataConfig:
    train_file: str
    validation_file: str | None = None
    test_file: str | None = None
    fields: FieldNames = field(default_factory=FieldNames)


@dataclass
class PromptConfig:
    """Which sections the prompt holds. Ablation profiles override these keys."""

    include_profile: bool = True
    include_history: bool = True
    # Keep at most this many of the most recent history items (null: all that fit in max_length).
    max_history_items: int | None = None


@dataclass
class TrainingConfig:
    # Prompt + target tokens per example; over-long examples lose their oldest history items first. Lower it on OOM.
    max_length: int = 512
    # Per-device micro-batch: the first knob for an OOM (memory grows linearly with batch_size x max_length).
    batch_size: int = 4
    eval_batch_size: int = 8
    # Keeps the global batch when batch_size is lowered: global = batch_size x accumulation x processes.
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    # A positive max_steps overrides num_train_epochs (handy for quick runs).
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    # Evaluate on the validation file every eval_steps optimizer steps (null: only at the end).
    eval_steps: int | None = 100
    save_steps: int = 100
    save_total_limit: int | None = 2
    seed: int = 42
    # Where the Trainer reports metrics: "none", "tensorboard", "wandb", ...
    report_to: list[str] = field(default_factory=lambda: ["none"])
    # Recompute each decoder layer in backward instead of storing its activations: a large memory saving for ~30% compute.
    activation_checkpointing: bool = True
    # Batch examples of similar length together (random groups, reshuffled every epoch): little padding, the same
    # examples and labels. The longest batch comes first, so an out-of-memory shows at step 1, not hours in. Grouped by
    # the full prompt's length, so that every ablation gets the same batches.
    group_by_length: bool = True
    # Concatenate each micro-batch into one row without padding. "auto": only with flash_attention_2, whose kernels
    # keep the sequences apart for free; eager and sdpa also handle it (a block mask over the row), but their attention
    # then costs (batch_size x length)^2 instead of batch_size x length^2.
    padding_free: Literal["auto", True, False] = "auto"

    def global_batch(self, processes: int) -> int:
        """Examples per optimizer step over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * processes


@dataclass
class DeepSpeedChoices:
    """What the generated ZeRO-3 config offloads. Ignored when --deepspeed_config is given."""

    # Optimizer states (12 bytes/parameter in fp32 Adam) live in CPU memory and the Adam step runs on the CPU.
    # "auto": offload only when the memory estimate (see --dry_run) says the model states do not fit on the GPUs.
    offload_optimizer: Literal["auto", True, False] = True
    # Parameters live in CPU memory and are fetched to the GPU layer by layer: fits huge models, costs PCIe bandwidth.
    offload_params: Literal["auto", True, False] = True
    # Page-locked CPU buffers make the offload copies faster (no effect on CPU-only machines).
    pin_memory: bool = True
    # Keep the activations that checkpointing saves (each decoder layer's inputs) in CPU memory instead of the GPU.
    cpu_checkpointing: bool = True


@dataclass
class EvaluationConfig:
    """Test-set evaluation at the end of training (and with --do_eval_only)."""

    # Evaluate (loss and greedy answer) at most this many test examples, the first ones in file order (null: all).
    max_test_examples: int | None = None
    # Greedy decoding stops at <end_of_turn>, or after this many new tokens.
    max_new_tokens: int = 32


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    prompt: PromptConfig = field(default_factory=PromptConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedChoices = field(default_factory=DeepSpeedChoices)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


@dataclass
class AblationProfile:
    """One file of ablation_configs/: a description plus the PromptConfig keys it overrides."""

    description: str
    include_profile: bool | None = None  # absent: keep config.json's prompt.include_profile
    include_history: bool | None = None  # absent: keep config.json's prompt.include_history
    max_history_items: int | None = None  # null: all the history that fits


# ----------------------------------------------------------------------------------------------------------------------
# Loading and validation: JSON -> dataclasses, collecting every problem, with no heavy imports.
# ----------------------------------------------------------------------------------------------------------------------


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file; errors name the file, line and column."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found. Check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}). Save the file as UTF-8.") from None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "an object"
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null",
            list: "a list"}.get(typing.get_origin(tp) or tp, str(tp))


_BAD = object()  # marks a value that failed its check (None is a valid JSON null)


def _check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check one JSON value against a type hint; returns the converted value, or _BAD after recording a problem."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner: list[str] = []
        checked = _check_value(value, next(a for a in args if a is not type(None)), where, inner)
        # "expected an integer, got ..." -> "expected an integer or null, got ..."
        problems += [p.replace(", got ", " or null, got ", 1) if "expected" in p else p for p in inner]
        return checked
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, got {json.dumps(value)}.")
            return _BAD
        return build_dataclass(tp, value, where, problems)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):  # 1 is not true, nor 0 false
            return value
        choices = [str(a) for a in typing.get_args(tp)]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {json.dumps(close[0])}?" if close else ""
        problems.append(f"{where}: {json.dumps(value)} is not {_type_name(tp)}.{hint}")
        return _BAD
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {json.dumps(value)}.")
            return _BAD
        items = [_check_value(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _BAD if _BAD in items else items
    # bool is a subclass of int in Python: true must not pass as 1, nor 1 as true.
    ok = (
        isinstance(value, bool) if tp is bool
        else isinstance(value, int) and not isinstance(value, bool) if tp is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float
        else isinstance(value, tp)
    )
    if not ok:
        problems.append(f"{where}: expected {_type_name(tp)}, got {json.dumps(value)}.")
        return _BAD
    return float(value) if tp is float else value


def _key_path(where: str, key: str) -> str:
    """'config.json:' + 'training' -> 'config.json: training'; 'config.json: training' + 'lr' -> '...training.lr'."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def build_dataclass(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    """Build `cls` from a JSON object. Unknown keys (with the closest valid one), missing keys and wrong types are
    appended to `problems` as "<file>: <key path>: ..." messages. A bad value falls back to its default so that the
    range checks can still run and report everything at once; returns None only when a required key is unusable."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(known)}."
            problems.append(f"{_key_path(where, key)}: unknown key{hint}")
    kwargs, complete = {}, True
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in data:
            if required:
                problems.append(f"{_key_path(where, f.name)}: required key is missing.")
                complete = False
            continue
        value = _check_value(data[f.name], hints[f.name], _key_path(where, f.name), problems)
        if value is not _BAD:
            kwargs[f.name] = value
        elif required:
            complete = False
    return cls(**kwargs) if complete else _BAD


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """Apply --set section.key=value (value parsed as JSON, else taken as a string) to the raw config dict."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            problems.append(f"--set {item}: expected SECTION.KEY=VALUE, e.g. --set training.max_steps=20.")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item}: {part} is not a section.")
                break
        else:
            node[parts[-1]] = value
    return problems


def resolve_path(value: str, base: Path) -> Path:
    """Relative paths in config.json are relative to the directory holding config.json, so runs work from any cwd."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def validate_config(cfg: Config, config_path: Path) -> list[str]:
    """Range and consistency checks that the type system cannot express. Each message says how to fix it."""
    where = str(config_path)
    t, problems = cfg.training, []

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            problems.append(f"{where}: {key}: {msg}")

    for key in ("max_length", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                "save_steps"):
        need(getattr(t, key) >= 1, f"training.{key}", f"must be at least 1, got {getattr(t, key)}.")
    need(t.learning_rate > 0, "training.learning_rate", f"must be positive, got {t.learning_rate}.")
    need(t.max_steps is None or t.max_steps >= 1, "training.max_steps", "must be at least 1, or null to use epochs.")
    need(t.max_steps is not None or t.num_train_epochs > 0, "training.num_train_epochs",
         f"must be positive, got {t.num_train_epochs} (or set training.max_steps).")
    need(0 <= t.warmup_ratio < 1, "training.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}.")
    need(t.weight_decay >= 0, "training.weight_decay", f"must be >= 0, got {t.weight_decay}.")
    need(t.max_grad_norm >= 0, "training.max_grad_norm", f"must be >= 0 (0 disables clipping), got {t.max_grad_norm}.")
    need(t.save_total_limit is None or t.save_total_limit >= 1, "training.save_total_limit",
         "must be at least 1, or null to keep every checkpoint.")
    need(t.eval_steps is None or t.eval_steps >= 1, "training.eval_steps", "must be at least 1, or null.")
    need(t.eval_steps is None or cfg.data.validation_file is not None, "training.eval_steps",
         f"is {t.eval_steps} but data.validation_file is null; set a validation file or set eval_steps to null.")
    need(cfg.prompt.max_history_items is None or cfg.prompt.max_history_items >= 0, "prompt.max_history_items",
         "must be >= 0, or null for all.")
    e = cfg.evaluation
    need(e.max_test_examples is None or e.max_test_examples >= 1, "evaluation.max_test_examples",
         "must be at least 1, or null for the whole test file.")
    need(e.max_new_tokens >= 1, "evaluation.max_new_tokens", f"must be at least 1, got {e.max_new_tokens}.")

    base = config_path.parent
    for key in ("train_file", "validation_file", "test_file"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        path = resolve_path(value, base)
        if path.suffix.lower() not in DATA_EXTENSIONS:
            problems.append(f"{where}: data.{key}: unsupported file type {path.suffix!r} ({value}); use one of "
                            f"{', '.join(DATA_EXTENSIONS)}.")
        elif not path.is_file():
            problems.append(f"{where}: data.{key}: file not found: {path}. Fix the path (relative paths are "
                            f"relative to the directory of {config_path.name}).")
    model_path = resolve_path(cfg.model.model_name_or_path, base)
    if model_path.is_dir():
        if not (model_path / "config.json").is_file():
            problems.append(f"{where}: model.model_name_or_path: {model_path} has no config.json; point it at a "
                            "directory written by save_pretrained (for the demo model: python Gemma/prepare_gemma.py).")
        else:
            problems += check_model_type(model_path / "config.json", where)
    elif not _looks_like_hub_id(cfg.model.model_name_or_path):
        problems.append(f"{where}: model.model_name_or_path: directory not found: {model_path}. For the demo model "
                        "run `python Gemma/prepare_gemma.py`; otherwise give a local directory or a hub id like "
                        "google/gemma-3-270m.")
    tokenizer = cfg.model.tokenizer_name_or_path
    if tokenizer is not None and not resolve_path(tokenizer, base).is_dir() and not _looks_like_hub_id(tokenizer):
        problems.append(f"{where}: model.tokenizer_name_or_path: directory not found: {resolve_path(tokenizer, base)}. "
                        "Give a directory holding tokenizer files, a hub id, or null to use the model's.")
    return problems


def check_model_type(model_config_path: Path, where: str) -> list[str]:
    """This tool writes Gemma chat turns and relies on Gemma's <end_of_turn>: other architectures are refused."""
    try:
        model_type = json.loads(model_config_path.read_text(encoding="utf-8")).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [f"{model_config_path}: unreadable model config ({e})."]
    problem = not_gemma(model_type, str(model_config_path.parent))
    return [f"{where}: model.model_name_or_path: {problem}"] if problem else []


def not_gemma(model_type: Any, model: str) -> str | None:
    if str(model_type).startswith("gemma"):
        return None
    return (f"{model} is a {model_type!r} model, not a Gemma (gemma, gemma2, gemma3...). This tool builds Gemma "
            "chat turns; use a Gemma checkpoint.")


def check_precision(dtype: str, cuda: bool, bf16_supported: bool, device_name: str) -> list[str]:
    """bf16 needs an Ampere or newer GPU (A100, H100, ...). CPUs run DeepSpeed's bf16 engine, so they pass."""
    if dtype == "bfloat16" and cuda and not bf16_supported:
        return [f"model.dtype is bfloat16 but {device_name} has no bf16 support. Set model.dtype to float16 (with "
                "DeepSpeed's loss scaling) or float32 in config.json, or pass --set model.dtype=float32."]
    return []


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve_ablation(name_or_path: str) -> tuple[str, Path]:
    """A name in ablation_configs/ or a path to a JSON file -> (name, path)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UserError(f"--ablation_config: file not found: {path}.")
        return path.stem, path
    candidate = ABLATION_DIR / f"{name_or_path}.json"
    if not candidate.is_file():
        available = sorted(p.stem for p in ABLATION_DIR.glob("*.json"))
        raise UserError(f"--ablation_config: unknown ablation {name_or_path!r}. Available in {ABLATION_DIR}: "
                        f"{', '.join(available)} (or pass the path to a JSON file).")
    return name_or_path, candidate


def load_ablation(path: Path, problems: list[str]) -> tuple[AblationProfile | None, dict]:
    """Returns the profile and the prompt keys it sets explicitly (a profile overrides only what it names)."""
    raw = read_json_file(path, "ablation profile")
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a JSON object with description and include_* keys.")
        return None, {}
    profile = build_dataclass(AblationProfile, raw, f"{path}:", problems)
    if profile is _BAD:
        return None, {}
    if profile.max_history_items is not None and profile.max_history_items < 0:
        problems.append(f"{path}: max_history_items: must be >= 0, or null for all.")
    for key in ("include_profile", "include_history"):
        if key in raw and raw[key] is None:
            problems.append(f"{path}: {key}: expected true or false, got null.")
    return profile, {k: v for k, v in raw.items() if k != "description"}


def load_settings(config_path: Path, ablation: str, overrides: list[str]) -> tuple[Config, str, AblationProfile]:
    """defaults < config.json < ablation profile < --set, validated; every problem is reported together."""
    raw = read_json_file(config_path, "config file")
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object with sections model, data, training, ...")
    problems: list[str] = []
    ablation_name, ablation_path = resolve_ablation(ablation)
    profile, prompt_overrides = load_ablation(ablation_path, problems)
    if isinstance(raw.setdefault("prompt", {}), dict):
        raw["prompt"].update(prompt_overrides)
    problems += apply_overrides(raw, overrides)
    cfg = build_dataclass(Config, raw, f"{config_path}:", problems)
    if cfg is not _BAD:
        problems += validate_config(cfg, config_path)
    if problems:
        raise UserError(problems)
    return cfg, ablation_name, profile


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train_deepspeed.py",
        description="Fine-tune Gemma with DeepSpeed ZeRO-3 on user-modelling data for one ablation profile.",
        epilog="Settings precedence: defaults < config.json < ablation profile < --set. See README.md.",
    )
    p.add_argument("--config", type=Path, default=Path("config.json"),
                   help="config.json with the model, data, prompt, training and deepspeed sections (default: %(default)s).")
    p.add_argument("--ablation_config", default="profile_and_history",
                   help="ablation profile: a name in ablation_configs/ (profile_and_history, profile_only, history_only, "
                        "query_only) or a path to a JSON file (default: %(default)s).")
    p.add_argument("--output_dir", type=Path, required=True,
                   help="where the DeepSpeed config, checkpoints, final/ model and results.json go.")
    p.add_argument("--deepspeed_config", type=Path, default=None,
                   help="your own DeepSpeed JSON instead of the generated ZeRO-3 offload config; leave batch sizes, "
                        "accumulation, clipping and optimizer values 'auto' so they follow config.json.")
    p.add_argument("--resume_from_checkpoint", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint directory, or 'auto' for the latest complete one in --output_dir.")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an --output_dir that holds a finished or unfinished run (its outputs are deleted).")
    p.add_argument("--do_eval_only", action="store_true",
                   help="no training: evaluate <output_dir>/final/ on data.test_file (loss, greedy answers, metrics) and "
                        "update results.json and predictions.jsonl. Pass the run's --config and --ablation_config.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config.json value, e.g. --set training.max_steps=20 (repeatable; JSON values).")
    plan = p.add_argument_group(
        "dry run", "check everything and estimate memory without loading weights or training; the hardware flags "
                   "plan for other machines than this one (default: what this launch has).")
    plan.add_argument("--dry_run", action="store_true",
                      help="validate, build the data and the DeepSpeed config, print and save a report to "
                           "<output_dir>/dry_run/ (example, token lengths, batch, memory estimate); no training.")
    plan.add_argument("--gpus_per_node", type=int, default=None, metavar="N")
    plan.add_argument("--num_nodes", type=int, default=None, metavar="N")
    plan.add_argument("--gpu_memory_gib", type=float, default=None, metavar="GIB", help="memory of one GPU, e.g. 80.")
    plan.add_argument("--cpu_memory_gib", type=float, default=None, metavar="GIB", help="host memory of one node.")
    args = p.parse_args(argv)
    planned = [f"--{k}" for k in ("gpus_per_node", "num_nodes", "gpu_memory_gib", "cpu_memory_gib")
               if getattr(args, k) is not None]
    if planned and not args.dry_run:
        p.error(f"{', '.join(planned)} describe hardware for --dry_run; a run measures the hardware it runs on.")
    for k in ("gpus_per_node", "num_nodes", "gpu_memory_gib", "cpu_memory_gib"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k} must be positive, got {getattr(args, k)}.")
    if args.dry_run and args.do_eval_only:
        p.error("--dry_run and --do_eval_only do not go together.")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Records and prompts: read the files, check every record, render the Gemma chat turn, tokenize and mask.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """What happened to one split, recorded in results.json so that runs can be checked for comparability."""

    records: int
    examples: int
    dropped_too_long: int
    history_shortened: int
    ids_sha256: str
    mean_tokens: float
    max_tokens: int
    p50_tokens: int = 0
    p95_tokens: int = 0
    max_target_tokens: int = 0  # target + <end_of_turn>: the supervised positions of the longest answer


def read_records(path: Path, fields: FieldNames) -> list[dict]:
    """Read a JSONL/JSON/CSV/Parquet file through `datasets` and return plain dicts keyed by the canonical names."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are re-explained below, once
    builder = DATA_EXTENSIONS[path.suffix.lower()]
    if builder != "parquet" and path.stat().st_size < 4096 and not path.read_bytes().strip():
        raise UserError(f"{path}: the file holds no records.")  # datasets' own error for this is cryptic
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
        rows = ds.to_list()  # Arrow defers some decoding (invalid UTF-8) to here
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the file and the line
        raise UserError(_explain_unreadable(path, e)) from None
    if not rows:
        raise UserError(f"{path}: the file holds no records.")
    rename = {getattr(fields, name): name for name in ("profile", "history", "query", "target", "id")}
    records = [{canon: row.get(col) for col, canon in rename.items()} for row in rows]
    if builder == "csv":  # CSV cells are text: profile and history may hold JSON objects/lists
        for rec in records:
            for key in ("profile", "history"):
                if isinstance(rec[key], str) and rec[key].lstrip()[:1] in ("{", "["):
                    try:
                        rec[key] = json.loads(rec[key])
                    except json.JSONDecodeError:
                        pass
    return records


def _explain_unreadable(path: Path, error: Exception) -> str:
    """Find the line that broke the reader, for line-oriented JSON, or fall back to the reader's own message."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"{path}: line {line}: not valid UTF-8 (byte {e.start}). Save the file as UTF-8."
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}: line {lineno}: invalid JSON ({e.msg} at column {e.colno}). Fix or remove that line."
            if not isinstance(obj, dict):
                return f"{path}: line {lineno}: expected a JSON object per line."
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return (f"{path}: could not be read as {DATA_EXTENSIONS[path.suffix.lower()]} ({message}). A field must have "
            "the same type in every record (e.g. profile always an object, or always a string).")


def check_record(rec: dict, index: int, path: Path, prompt: PromptConfig) -> list[str]:
    """Type checks for one record; only the fields this ablation uses are required. Record numbers start at 1."""
    where, problems = f"{path}: record {index + 1}", []
    for key in ("query", "target"):
        if not isinstance(rec[key], str):
            what = "is missing" if rec[key] is None else f"must be a string, got {type(rec[key]).__name__}"
            problems.append(f"{where}: {key} {what}.")
    profile, history = rec["profile"], rec["history"]
    if profile is None:
        if prompt.include_profile:
            problems.append(f"{where}: profile is missing but this ablation includes the profile.")
    elif not isinstance(profile, (dict, str)):
        problems.append(f"{where}: profile must be an object or a string, got {type(profile).__name__}.")
    if history is None:
        if prompt.include_history:
            problems.append(f"{where}: history is missing but this ablation includes the history.")
    elif not isinstance(history, list):
        problems.append(f"{where}: history must be a list of items (oldest first), got {type(history).__name__}.")
    elif not all(isinstance(item, (dict, str)) for item in history):
        problems.append(f"{where}: history items must be objects or strings.")
    return problems


def _format_attributes(obj: dict | str, sep: str) -> str:
    if isinstance(obj, str):
        return obj.strip()
    # Arrow fills keys missing from one record with null; a null attribute is not information.
    return sep.join(f"{k}: {v}" for k, v in obj.items() if v is not None)


def render_user_message(rec: dict, include_profile: bool, include_history: bool, history_items: int) -> str:
    """The user turn: profile attributes, then the last `history_items` history items (most recent last), then the
    query. Sections the ablation leaves out are absent, not empty."""
    sections = []
    if include_profile and rec["profile"] is not None:
        profile = rec["profile"]
        body = profile.strip() if isinstance(profile, str) else _format_attributes(profile, "\n").replace("\n", "\n- ")
        sections.append("User profile:\n" + (body if isinstance(profile, str) else "- " + body))
    if include_history and rec["history"] is not None:
        items = rec["history"][len(rec["history"]) - history_items:] if history_items else []
        lines = [f"{i}. {_format_attributes(item, '; ')}" for i, item in enumerate(items, 1)] or ["(none)"]
        sections.append("Interaction history (oldest first):\n" + "\n".join(lines))
    sections.append("Query: " + rec["query"].strip())
    return "\n\n".join(sections)


class PromptEncoder:
    """Turns records into token ids and labels with the tokenizer's chat template, or Gemma's turn format when the
    tokenizer has none (Gemma 3 270M's has none). Labels cover only the target and its <end_of_turn>."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if self.end_of_turn_id is None or self.end_of_turn_id == tokenizer.unk_token_id:
            raise UserError(f"the tokenizer has no {END_OF_TURN} token: is model.model_name_or_path a Gemma model?")
        self.bos_id = tokenizer.bos_token_id

    def check_fixed_parts(self) -> None:
        """The turn markers, BOS and the query label alone must leave room for a target."""
        empty = {"profile": None, "history": None, "query": ""}
        fixed = len(self.prompt_ids(render_user_message(empty, False, False, 0))) + 2  # + one target token + <eot>
        if self.max_length < fixed:
            raise UserError(f"training.max_length={self.max_length} is smaller than the fixed prompt parts "
                            f"({fixed} tokens: BOS, turn markers, section labels and a one-token answer). Raise "
                            "training.max_length (256 or more is typical).")

    def prompt_text(self, user_message: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
            )
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{START_OF_TURN}user\n{user_message.strip()}{END_OF_TURN}\n{START_OF_TURN}model\n"

    def prompt_ids(self, user_message: str) -> list[int]:
        ids = self.tokenizer(self.prompt_text(user_message), add_special_tokens=False)["input_ids"]
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids  # exactly one BOS, whether or not the template wrote it
        return ids

    def target_ids(self, target: str) -> list[int]:
        return self.tokenizer(target.strip(), add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]

    def fitting_history(self, rec: dict, target_len: int) -> int | None:
        """How many of the most recent history items fit with the FULL prompt (profile and all history), whatever the
        ablation: so every ablation keeps the same examples. None when even no history does not fit."""
        fitted = self.fit_full_prompt(rec, target_len)
        return None if fitted is None else fitted[0]

    def fit_full_prompt(self, rec: dict, target_len: int) -> tuple[int, int] | None:
        """(history items kept, tokens of the full-prompt example): see fitting_history."""
        n = len(rec["history"] or [])
        lengths: dict[int, int] = {}

        def fits(k: int) -> bool:
            lengths[k] = len(self.prompt_ids(render_user_message(rec, True, True, k))) + target_len
            return lengths[k] <= self.max_length

        if fits(n):
            return n, lengths[n]
        if not fits(0):
            return None
        lo, hi = 0, n  # fits(lo) and not fits(hi): binary search for the largest k that fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo, lengths[lo]

    def section_lengths(self, rec: dict, prompt: PromptConfig, history_items: int) -> dict[str, int]:
        """Tokens each part of encode()'s example adds; "template" is BOS, turn markers and the query label."""
        if prompt.max_history_items is not None:
            history_items = min(history_items, prompt.max_history_items)

        def n(profile: bool, history: bool, r: dict = rec) -> int:
            return len(self.prompt_ids(render_user_message(r, profile, history, history_items)))

        template = n(False, False, {**rec, "query": ""})
        query = n(False, False) - template
        profile = n(prompt.include_profile, False) - template - query
        history = n(prompt.include_profile, prompt.include_history) - template - query - profile
        return {"template": template, "profile": profile, "history": history, "query": query,
                "target": len(self.target_ids(rec["target"]))}

    def encode(self, rec: dict, prompt: PromptConfig, history_items: int) -> dict:
        if prompt.max_history_items is not None:
            history_items = min(history_items, prompt.max_history_items)
        message = render_user_message(rec, prompt.include_profile, prompt.include_history, history_items)
        prompt_ids, target_ids = self.prompt_ids(message), self.target_ids(rec["target"])
        input_ids = prompt_ids + target_ids
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        }


@dataclass
class Split:
    examples: list[dict]  # input_ids, attention_mask, labels
    ids: list[str]
    targets: list[str]
    stats: SplitStats
    # Tokens of each example with the FULL prompt: the same in every ablation, so length grouping batches the same
    # examples together whichever sections the prompt holds, and runs stay comparable.
    group_lengths: list[int] = field(default_factory=list)


def build_split(path: Path, split: str, cfg: Config, encoder: PromptEncoder) -> Split:
    """Read, check, truncate and encode one data file."""
    records = read_records(path, cfg.data.fields)
    problems = [p for i, rec in enumerate(records) for p in check_record(rec, i, path, cfg.prompt)]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more problems in {path}"] if len(problems) > 20 else [])
        raise UserError(shown)
    examples, ids, targets, group_lengths, shortened, dropped = [], [], [], [], 0, 0
    for i, rec in enumerate(records):
        target_len = len(encoder.target_ids(rec["target"]))
        if target_len >= encoder.max_length:
            raise UserError(f"{path}: record {i + 1}: the target alone is {target_len} tokens, which leaves no room "
                            f"for a prompt in training.max_length={encoder.max_length}. Raise max_length or shorten "
                            "the target.")
        fitted = encoder.fit_full_prompt(rec, target_len)
        if fitted is None:
            dropped += 1
            continue
        kept, full_length = fitted
        group_lengths.append(full_length)
        shortened += kept < len(rec["history"] or [])
        examples.append(encoder.encode(rec, cfg.prompt, kept))
        ids.append(str(rec["id"]) if rec["id"] is not None else f"{split}:{i}")
        targets.append(rec["target"].strip())
    if not examples:
        raise UserError(f"{path}: no record fits in training.max_length={encoder.max_length} even without history; "
                        "raise max_length.")
    lengths = sorted(len(e["input_ids"]) for e in examples)
    stats = SplitStats(
        records=len(records), examples=len(examples), dropped_too_long=dropped, history_shortened=shortened,
        ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        mean_tokens=round(sum(lengths) / len(lengths), 2), max_tokens=lengths[-1],
        p50_tokens=lengths[len(lengths) // 2], p95_tokens=lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        max_target_tokens=max(len(e["labels"]) - prompt_length(e) for e in examples),
    )
    return Split(examples, ids, targets, stats, group_lengths)


def prompt_length(example: dict) -> int:
    """Tokens before the first supervised one: the prompt a model answers at test time."""
    return next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed config: generate ZeRO-3 from config.json, or read the user's and check it against config.json.
# ----------------------------------------------------------------------------------------------------------------------


MIN_REDUCE_BUCKET = 50_000_000  # elements; DeepSpeed's own default is 5e8


def bucket_sizes(model_config: dict) -> dict[str, Any]:
    """ZeRO-3 bucket sizes from the model's hidden size, transformers' "auto" formulas (prefetch 0.9 h², persistence
    threshold 10 h), written as integers because multimodal configs (Gemma 3 4B+) keep hidden_size in text_config.
    The gradient reduce bucket is h² but at least MIN_REDUCE_BUCKET: h² alone makes one reduce-scatter per 0.4M
    gradient elements on Gemma 3 270M (h = 640), and fewer, larger ones were faster (benchmarks/results/speed.md:
    h² took 1.20x the step time on a tiny Gemma on the CPU); 5e7 bf16 elements are 100 MB, a tenth of DeepSpeed's
    default."""
    hidden = model_config.get("hidden_size") or (model_config.get("text_config") or {}).get("hidden_size")
    if hidden is None:
        raise UserError("the model config has no hidden_size (top level or text_config); pass --deepspeed_config "
                        "with explicit reduce_bucket_size / stage3_prefetch_bucket_size values.")
    return {"reduce_bucket_size": max(hidden * hidden, MIN_REDUCE_BUCKET),
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}


def generate_deepspeed_config(choices: DeepSpeedChoices, dtype: str, model_config: dict) -> dict:
    """ZeRO-3 with CPU offload and activation checkpointing. Batch, accumulation, clipping and optimizer values are
    'auto': the Trainer fills them from config.json, so the two can never disagree. There is deliberately no
    "scheduler" block: with one, DeepSpeed's scheduler would replace training.lr_scheduler_type."""

    def offload(enabled: bool) -> dict:
        return {"device": "cpu", "pin_memory": choices.pin_memory} if enabled else {"device": "none"}

    return {
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": offload(choices.offload_optimizer),
            "offload_param": offload(choices.offload_params),
            "overlap_comm": True,
            "contiguous_gradients": True,
            "sub_group_size": 1_000_000_000,
            **bucket_sizes(model_config),
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        # Read by this script (see "Activation checkpointing with CPU offload"): HF models ignore this section
        # otherwise. partition_activations only matters with model parallelism, which we do not use.
        "activation_checkpointing": {
            "partition_activations": False,
            "cpu_checkpointing": choices.cpu_checkpointing,
            "contiguous_memory_optimization": False,
            "synchronize_checkpoint_boundary": False,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1_000_000,  # the Trainer logs; DeepSpeed's own step prints would duplicate it
        "wall_clock_breakdown": False,
    }


def check_custom_deepspeed_config(ds: dict, path: Path, cfg: Config) -> list[str]:
    """Values fixed in the user's DeepSpeed JSON that contradict config.json; each names both values and the fix."""
    t, problems = cfg.training, []
    if not isinstance(ds, dict):
        return [f"{path}: expected a JSON object."]

    def conflict(key: str, config_key: str, expected: Any) -> None:
        value = ds.get(key, "auto")
        if value != "auto" and value != expected:
            problems.append(f"{path}: {key} is {value} but config.json {config_key} gives {expected}. Set it to "
                            f'"auto" (recommended) or change {config_key} in config.json.')

    conflict("train_micro_batch_size_per_gpu", "training.batch_size", t.batch_size)
    conflict("gradient_accumulation_steps", "training.gradient_accumulation_steps", t.gradient_accumulation_steps)
    conflict("gradient_clipping", "training.max_grad_norm", t.max_grad_norm)
    tbs = ds.get("train_batch_size", "auto")
    if tbs != "auto" and isinstance(tbs, int):
        per_process = t.batch_size * t.gradient_accumulation_steps
        if tbs % per_process:
            problems.append(f"{path}: train_batch_size {tbs} is not a multiple of training.batch_size x "
                            f"gradient_accumulation_steps = {per_process}. Set it to \"auto\".")
    not_objects = [f"{path}: {section} must be an object, got {json.dumps(ds[section])}."
                   for section in ("zero_optimization", "bf16", "fp16", "optimizer", "activation_checkpointing")
                   if not isinstance(ds.get(section, {}), dict)]
    if not_objects:
        return problems + not_objects
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage != 3:
        problems.append(f"{path}: zero_optimization.stage is {stage}; this script builds the model partitioned for "
                        "ZeRO stage 3 (zero.Init). Set \"stage\": 3.")
    if stage == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        problems.append(f"{path}: zero_optimization.stage3_gather_16bit_weights_on_model_save must be true, or "
                        f"{FINAL_DIRNAME}/ would hold a DeepSpeed checkpoint that from_pretrained cannot load.")
    for precision, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        wanted = cfg.model.dtype == dtype
        if precision not in ds:
            if wanted:
                problems.append(f"{path}: has no {precision} section but config.json model.dtype is "
                                f"{cfg.model.dtype}. Add \"{precision}\": {{\"enabled\": \"auto\"}}.")
            continue
        enabled = ds[precision].get("enabled", False)
        if enabled != "auto" and bool(enabled) != wanted:
            problems.append(f"{path}: {precision}.enabled is {json.dumps(enabled)} but config.json model.dtype is "
                            f"{cfg.model.dtype}. Set it to \"auto\" or make the two agree.")
    opt_params = ds.get("optimizer", {}).get("params", {})
    lr = opt_params.get("lr", "auto") if isinstance(opt_params, dict) else "auto"
    if lr != "auto" and lr != t.learning_rate:
        problems.append(f"{path}: optimizer.params.lr is {lr} but config.json training.learning_rate is "
                        f"{t.learning_rate}. Set it to \"auto\" or make the two agree.")
    return problems


def load_custom_deepspeed_config(path: Path, cfg: Config) -> dict:
    ds = read_json_file(path, "DeepSpeed config")
    problems = check_custom_deepspeed_config(ds, path, cfg)
    if problems:
        raise UserError(problems)
    return ds


# ----------------------------------------------------------------------------------------------------------------------
# Memory plan: what a configuration needs per GPU and per node, for --dry_run and for offload "auto". Estimates,
# never measurements: the model states follow DeepSpeed's own ZeRO-3 arithmetic, the activations an analytic count.
# ----------------------------------------------------------------------------------------------------------------------

GIB = 1024**3
GPU_USABLE_FRACTION = 0.9  # headroom for the CUDA context, communication buffers and allocator fragmentation
ZERO3_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory


@dataclass
class ModelShape:
    """What the estimates need from a model: exact parameter counts from the model built on the meta device, and
    the text decoder's dimensions from its config. No weights are read."""

    model_type: str
    total_params: int
    largest_layer_params: int  # the module with the most parameters of its own: Gemma's embedding
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    attn_softcapping: bool  # Gemma 2: tanh on the attention scores keeps one more score-sized tensor
    final_softcapping: bool
    qk_norm: bool  # Gemma 3 normalises queries and keys


@dataclass
class Hardware:
    gpus_per_node: int
    nodes: int
    gpu_memory: int | None  # bytes per GPU; None: no GPU here and none described with --gpu_memory_gib
    cpu_memory: int | None  # bytes per node
    source: str  # where these figures come from, for the report


def count_model_parameters(model: Any) -> tuple[int, int]:
    """(total, largest layer) counted like deepspeed.runtime.zero.stage3.model_to_params, which dedups tied weights by
    data_ptr; on the meta device every data_ptr is 0, so count by identity (parameters() yields a tied weight once)."""
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def model_shape(model_path: str) -> ModelShape:
    """Build the model from its config on the meta device: exact counts without memory (Gemma 2 27B: seconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total, largest = count_model_parameters(model)
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        model_type=config.model_type, total_params=total, largest_layer_params=largest,
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_heads=heads, num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab_size=text.vocab_size,
        attn_softcapping=bool(getattr(text, "attn_logit_softcapping", None)),
        final_softcapping=bool(getattr(text, "final_logit_softcapping", None)),
        qk_norm=config.model_type.startswith("gemma3"),
    )


def model_states_bytes(shape: ModelShape, hw: Hardware, offload_optimizer: bool, offload_params: bool,
                       buffer_factor: float = ZERO3_BUFFER_FACTOR) -> tuple[int, int]:
    """(per GPU, per node of host memory) for ZeRO-3 parameters, gradients and Adam states, with zero.Init: the
    arithmetic of deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs. Per GPU: the largest layer
    gathered (16-bit weights and gradients, 4 bytes each), plus this GPU's shard of the 2-byte parameters unless they
    are offloaded, plus its shard of the 16 bytes/parameter of gradients, fp32 master weights and Adam moments unless
    the optimizer is offloaded. DeepSpeed leaves out parameter-only offload; it follows the same terms here."""
    p, gpus = shape.total_params, hw.gpus_per_node * hw.nodes
    largest = 4 * shape.largest_layer_params
    gpu = largest + int((2 * (not offload_params) + 16 * (not offload_optimizer)) * p / gpus)
    if offload_optimizer or offload_params:
        host = p * (16 * offload_optimizer + 2 * offload_params) / hw.nodes * buffer_factor
        if not offload_optimizer:  # parameter-only offload: the gathered layers still pass through the host
            host = max(host, largest * hw.gpus_per_node * buffer_factor)
    else:
        host = largest * hw.gpus_per_node * buffer_factor
    return gpu, int(host)


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, supervised_tokens: int, attn: str,
                     checkpointing: bool, cpu_checkpointing: bool) -> dict[str, int]:
    """What autograd keeps for one micro-batch of batch_size x seq_len tokens in bf16 (an analytic count, checked
    against the tensors autograd actually saves in tests/test_memory_plan.py). Per token and decoder layer:
    four RMSNorms computed in fp32 (input and normalised output kept: 8 bytes x hidden each), the bf16 inputs of the
    attention and MLP projections, queries and keys around RoPE (and their norms in Gemma 3), the attention output,
    the GeGLU gate, up, activation and product (2 bytes x intermediate each); eager attention adds the softmax
    probabilities (fp32 and bf16 copies, plus the soft-capped scores in Gemma 2) for every key. Then the final norm,
    and logits only at the supervised positions (bf16 logits, their fp32 copy in the loss and its gradient). With
    checkpointing, backward recomputes one layer at a time on top of what the forward pass left."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_token = 4 * 8 * h + 2 * 2 * h + 2 * 2 * (q + kv) + 2 * q + 4 * 2 * inter
    if shape.qk_norm:
        per_token += 8 * (q + kv)
    if attn == "eager":  # keys and values repeated to every head, then the score-sized tensors
        per_token += 2 * 2 * q + shape.num_heads * seq_len * (4 + 2 + 2 * shape.attn_softcapping)
    else:  # sdpa / flash attention keep q, the repeated k and v, the output and a log-sum-exp per head
        per_token += 2 * 4 * q + 4 * shape.num_heads
    tokens = batch_size * seq_len
    layer = tokens * per_token
    logit_bytes = 2 + 4 + 4 + 4 * shape.final_softcapping
    logits = supervised_tokens * shape.vocab_size * logit_bytes
    final_norm = tokens * 8 * h
    layer_inputs = shape.num_layers * tokens * 2 * h  # what checkpointing keeps: each decoder layer's input
    if not checkpointing:
        held, host = shape.num_layers * layer, 0
    elif cpu_checkpointing:
        held, host = 0, layer_inputs  # the inputs wait in host memory
    else:
        held, host = layer_inputs, 0
    held += logits + final_norm  # what autograd holds on the GPU when the forward pass ends
    return {"held_after_forward": held, "gpu": held + layer * checkpointing,  # backward recomputes one layer
            "host": host, "per_layer": layer, "logits": logits,
            "logits_all_positions": tokens * shape.vocab_size * logit_bytes}


OFFLOAD_ORDER = [(False, False), (True, False), (False, True), (True, True)]  # fastest first


def choose_offload(wanted: tuple[bool | str, bool | str], gpu_need: dict[tuple[bool, bool], int],
                   gpu_memory: int | None, host_need: dict[tuple[bool, bool], int] | None = None,
                   host_memory: int | None = None) -> tuple[bool, bool, str]:
    """Resolve "auto" offload choices: the fastest combination (no offload, then optimizer only, then parameters only,
    then both) whose estimated GPU need fits in GPU_USABLE_FRACTION of the GPU's memory, and whose host need fits in
    the node's memory when that is known. Fixed true/false choices are kept. Without a GPU, "auto" means no offload:
    the states live in host memory either way."""
    options = [o for o in OFFLOAD_ORDER if all(w == "auto" or w == v for w, v in zip(wanted, o))]
    if "auto" not in wanted:
        return options[0][0], options[0][1], "as set in config.json"
    if gpu_memory is None:
        opt, par = options[0]
        return opt, par, "no GPU: parameters and optimizer states are in host memory anyway, offloading only copies"
    usable = GPU_USABLE_FRACTION * gpu_memory

    def host_fits(option: tuple[bool, bool]) -> bool:
        return host_need is None or host_memory is None or host_need[option] <= host_memory

    for opt, par in options:
        if gpu_need[(opt, par)] <= usable and host_fits((opt, par)):
            return opt, par, (f"the estimated need of {gpu_need[(opt, par)] / GIB:.1f} GiB per GPU fits in "
                              f"{GPU_USABLE_FRACTION:.0%} of {gpu_memory / GIB:.0f} GiB")
    opt, par = options[-1]
    return opt, par, (f"nothing fits: even this needs an estimated {gpu_need[(opt, par)] / GIB:.1f} GiB per GPU of "
                      f"{gpu_memory / GIB:.0f} GiB" + ("" if host_fits((opt, par)) else
                      f" and {host_need[(opt, par)] / GIB:.0f} GiB of host memory of {host_memory / GIB:.0f} GiB")
                      + "; lower training.batch_size or max_length, or add GPUs")


@dataclass
class MemoryPlan:
    hardware: Hardware
    shape: ModelShape
    batch_size: int
    seq_len: int
    supervised_tokens: int
    options: list[dict]  # one row per offload combination
    offload_optimizer: bool
    offload_params: bool
    reason: str


def plan_memory(shape: ModelShape, cfg: Config, hw: Hardware, seq_len: int, supervised_tokens: int) -> MemoryPlan:
    """Estimates for every offload combination at the configured micro-batch, and the "auto" decision."""
    t, ds = cfg.training, cfg.deepspeed
    act = activation_bytes(shape, t.batch_size, seq_len, supervised_tokens, cfg.model.attn_implementation,
                           t.activation_checkpointing, ds.cpu_checkpointing)
    act_off = activation_bytes(shape, t.batch_size, seq_len, supervised_tokens, cfg.model.attn_implementation,
                               False, False)
    rows, gpu_need, host_need = [], {}, {}
    for opt, par in OFFLOAD_ORDER:
        gpu, host = model_states_bytes(shape, hw, opt, par)
        gpu_need[(opt, par)] = gpu + act["gpu"]
        host_need[(opt, par)] = host + act["host"] * hw.gpus_per_node
        rows.append({"offload_optimizer": opt, "offload_params": par, "model_states_gpu": gpu,
                     "model_states_host_per_node": host, "activations_gpu": act["gpu"],
                     "activations_gpu_without_checkpointing": act_off["gpu"],
                     "activations_host_per_node": act["host"] * hw.gpus_per_node,
                     "total_gpu": gpu + act["gpu"], "total_host_per_node": host + act["host"] * hw.gpus_per_node,
                     "fits_gpu": None if hw.gpu_memory is None
                     else gpu + act["gpu"] <= GPU_USABLE_FRACTION * hw.gpu_memory,
                     "fits_host": None if hw.cpu_memory is None else host_need[(opt, par)] <= hw.cpu_memory})
    opt, par, reason = choose_offload((ds.offload_optimizer, ds.offload_params), gpu_need, hw.gpu_memory,
                                      host_need, hw.cpu_memory)
    return MemoryPlan(hw, shape, t.batch_size, seq_len, supervised_tokens, rows, opt, par, reason)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_hardware(args: argparse.Namespace) -> Hardware:
    """This launch's GPUs and nodes (from the launcher's environment), or the ones --dry_run was told to plan for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    described = any(x is not None for x in (args.gpus_per_node, args.num_nodes, args.gpu_memory_gib))
    gpu_memory = None
    if args.gpu_memory_gib is not None:
        gpu_memory = int(args.gpu_memory_gib * GIB)
    elif not described:
        import torch

        if torch.cuda.is_available():
            gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    cpu_memory = (int(args.cpu_memory_gib * GIB) if args.cpu_memory_gib is not None
                  else None if described else host_memory_bytes())
    return Hardware(
        gpus_per_node=args.gpus_per_node or local,
        nodes=args.num_nodes or max(1, world // local),
        gpu_memory=gpu_memory, cpu_memory=cpu_memory,
        source="as described on the command line" if described else "this machine and launch",
    )


# ----------------------------------------------------------------------------------------------------------------------
# CPU-only work-arounds (see ../shared/notes/cpu-stack.md). Each does nothing where CUDA is present.
# ----------------------------------------------------------------------------------------------------------------------


def prepare_cpu_only_environment() -> bool:
    """On a machine without CUDA, make DeepSpeed under accelerate see the real world size, and let bf16 run.

    Returns True when the work-arounds were applied. Must run before TrainingArguments is created.
    - accelerate sets no backend for DeepSpeed without a GPU, so every rank would believe it is alone: we create the
      process group ourselves (gloo) and TrainingArguments reuses it (accelerator_config.use_configured_state).
    - TrainingArguments refuses bf16 without a GPU; DeepSpeed runs a real bf16 engine on the CPU, so we let it.
    - Split the cores between the ranks when no launcher set OMP_NUM_THREADS (oversubscribing was about 15x slower).
    - Tell DeepSpeed's CPU accelerator how many ranks share this node (LOCAL_SIZE, which DeepSpeed's own launcher sets
      and accelerate's does not): otherwise it forks `numactl --hardware` on every gradient reduce-scatter to count
      NUMA nodes (measured: 12% of a tiny model's step), and its shared-memory communication sees the wrong size.
    """
    import torch

    if torch.cuda.is_available():
        return False
    import transformers.training_args
    from accelerate import PartialState

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    os.environ.setdefault("LOCAL_SIZE", str(local_world))
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    transformers.training_args.is_torch_bf16_gpu_available = lambda: True
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return True


def ensure_process_group_env() -> None:
    """Plain `python train_deepspeed.py` has no launcher: describe a one-process group so DeepSpeed can start."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:  # a free port, so two single-process runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def shutdown_distributed(cpu_only: bool) -> None:
    """Leave the process group cleanly. With gloo, a worker thread can still free the last all-gather's tensors while
    Python shuts down and abort the process after a successful run; a barrier, destroy and short pause prevent it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        if cpu_only:
            time.sleep(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing with CPU offload: what the DeepSpeed JSON's cpu_checkpointing asks for, made real.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class OffloadStats:
    tensors: int = 0
    bytes: int = 0


def make_cpu_offloaded_checkpoint(stats: OffloadStats):
    """A checkpoint function for transformers' decoder layers that keeps what checkpointing saves (each layer's
    inputs) in CPU memory: PyTorch's save_on_cpu around each checkpointed layer call, counting what it moves.

    Not around the whole forward (that would also ship the logits to the host), and not transformers'
    activation_checkpointing_kwargs={"offload": True}, which always pins memory and so fails without CUDA."""
    import torch
    from torch.utils.checkpoint import checkpoint

    pin = torch.cuda.is_available()

    def checkpoint_on_cpu(function, *args, **kwargs):
        hooks = torch.autograd.graph.save_on_cpu(pin_memory=pin)
        pack = hooks.pack_hook

        def counting_pack(tensor):
            stats.tensors += 1
            stats.bytes += tensor.numel() * tensor.element_size()
            return pack(tensor)

        hooks.pack_hook = counting_pack
        with hooks:
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    return checkpoint_on_cpu


def install_cpu_offloaded_checkpointing(model: Any, stats: OffloadStats) -> int:
    """Swap the checkpoint function of every checkpointed layer; returns how many layers use it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    func = make_cpu_offloaded_checkpoint(stats)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._gradient_checkpointing_func = func
    return len(layers)


# ----------------------------------------------------------------------------------------------------------------------
# Model, TrainingArguments and Trainer
# ----------------------------------------------------------------------------------------------------------------------


def load_model_config(model_path: str) -> dict:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).to_dict()


def build_training_arguments(cfg: Config, output_dir: Path, ds_config: dict, has_validation: bool, cpu_only: bool):
    """TrainingArguments from config.json. Created BEFORE the model so that from_pretrained builds it partitioned
    under ZeRO-3 (zero.Init) instead of loading the whole model on every rank."""
    from transformers import TrainingArguments

    t = cfg.training
    evaluate = has_validation and t.eval_steps is not None
    return TrainingArguments(
        output_dir=str(output_dir),
        deepspeed=ds_config,  # the dict, on every rank: reading back a file rank 0 writes would race
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the total steps
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=t.report_to,
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        activation_checkpointing=t.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_pin_memory=not cpu_only,  # pinning is a no-op without CUDA
        accelerator_config={"use_configured_state": True} if cpu_only else None,
        disable_tqdm=True,  # one log line per logging_steps reads better in a launcher's interleaved output
        save_only_model=False,
        prediction_loss_only=True,  # evaluation needs the loss only: never gather vocabulary-sized logits
    )


def load_model(model_path: str, cfg: Config):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, cfg.model.dtype), attn_implementation=cfg.model.attn_implementation
    )
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "right"  # labels follow the tokens; left padding only matters for batched generation
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class SupervisedPositionsCollator:
    """Batches examples and makes the model apply its LM head only at the positions whose next token has a label.

    Gemma's vocabulary is 262,144 (256,000 for Gemma 2): over a prompt the LM head costs more than all the decoder
    layers together, and the full-sequence logits are the largest activation in memory. Only the target tokens carry
    labels, so the model gets a boolean `logits_to_keep` mask and the matching `shift_labels`; its own loss function
    then computes exactly the standard loss (same sum, same token count, tied embeddings and soft-capping included).

    Padded: right-padded to the longest example. Padding-free: transformers' flattening collator concatenates the
    examples into one row whose position_ids restart at 0 for each, so attention keeps them apart; each example's
    first label becomes -100, which it already is (the BOS). Either way the supervised positions and labels are
    the same, so is the loss.
    """

    def __init__(self, tokenizer: Any, padding_free: bool = False, flash_attention: bool = False):
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        self.pad = (DataCollatorWithFlattening(return_flash_attn_kwargs=flash_attention) if padding_free
                    else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX))

    def __call__(self, features: list[dict]) -> dict:
        import torch

        batch = self.pad(features)  # the flattening collator reads input_ids and labels only
        # Position t predicts token t+1: the label for position t is labels[t+1].
        next_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = next_labels != IGNORE_INDEX
        batch["logits_to_keep"] = keep
        batch["shift_labels"] = next_labels[keep]
        return batch


def use_padding_free(cfg: Config) -> bool:
    if cfg.training.padding_free == "auto":
        return cfg.model.attn_implementation == "flash_attention_2"
    if cfg.training.padding_free and cfg.model.attn_implementation != "flash_attention_2":
        logger.warning("padding_free with %s attention: correct, but attention then spans the whole concatenated "
                       "micro-batch; flash_attention_2 keeps the examples apart at no extra cost.",
                       cfg.model.attn_implementation)
    return bool(cfg.training.padding_free)


class LengthGroupedSampler:
    """transformers' length grouping (random mega-batches of 50 batches, each sorted by length, the longest batch
    first) with a permutation that depends only on (seed, epoch): every rank draws the same one, which sharding the
    batches across ranks requires, and a resumed run replays the interrupted epoch's order."""

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's data loader calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


def padding_efficiency(lengths: list[list[int]]) -> float:
    """Real tokens / tokens processed, for micro-batches of example lengths right-padded to their longest."""
    real = sum(sum(batch) for batch in lengths)
    return real / sum(max(batch) * len(batch) for batch in lengths)


def epoch_padding_efficiency(split: Split, batch_size: int, group_size: int, seed: int) -> dict[str, float]:
    """padding_efficiency over one epoch of micro-batches, in length-grouped and in random order."""
    import torch

    lengths = [len(e["input_ids"]) for e in split.examples]
    orders = {"grouped": list(LengthGroupedSampler(split.group_lengths, group_size, seed)),
              "random": torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()}
    return {name: padding_efficiency([[lengths[i] for i in order[k:k + batch_size]]
                                      for k in range(0, len(order), batch_size)])
            for name, order in orders.items()}


def make_callbacks(cfg: Config, ds_config: dict, stats: OffloadStats) -> list:
    from transformers import TrainerCallback

    cpu_checkpointing = bool((ds_config.get("activation_checkpointing") or {}).get("cpu_checkpointing", False))

    class ActivationOffloadCallback(TrainerCallback):
        """The Trainer (re-)enables checkpointing inside train(), so the swap must happen at on_train_begin."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            n = install_cpu_offloaded_checkpointing(model, stats)
            logger.info("Activation checkpointing: %d layers keep their saved inputs in CPU memory.", n)

    if cfg.training.activation_checkpointing and cpu_checkpointing:
        return [ActivationOffloadCallback()]
    if cpu_checkpointing:
        logger.warning("cpu_checkpointing is on but training.activation_checkpointing is false: nothing to offload.")
    return []


def make_throughput_meter() -> Any:
    """Times every optimizer step (from on_step_begin to on_step_end: forward, backward and optimizer, not the
    evaluation or saving that follow) and counts the tokens the model ran, real and padding."""
    import statistics

    import torch
    from transformers import TrainerCallback

    class ThroughputMeter(TrainerCallback):
        def __init__(self):
            self.step_seconds: list[float] = []
            self.processed_tokens = 0
            self.real_tokens: Any = 0  # a device tensor until the end: no host sync per micro-batch
            self._started = 0.0

        def count(self, inputs: dict) -> None:
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            self.processed_tokens += ids.numel()
            self.real_tokens = self.real_tokens + (mask.sum() if mask is not None else ids.numel())

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds.append(time.perf_counter() - self._started)

        def summary(self, device: Any) -> dict:
            """Job-wide figures (collective: every rank calls it). The first step, which pays for warm-up, is left
            out of the median."""
            import resource

            import torch.distributed as dist

            counts = torch.tensor([float(self.real_tokens), float(self.processed_tokens)], dtype=torch.float64,
                                  device=device)
            dist.all_reduce(counts)
            peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                     torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None]
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, peaks)
            real, processed = (int(x) for x in counts.tolist())
            seconds = sum(self.step_seconds)
            return {
                "steps": len(self.step_seconds),
                "seconds_per_step": round(statistics.median(self.step_seconds[1:] or self.step_seconds), 4)
                if self.step_seconds else None,
                "train_step_seconds": round(seconds, 3),
                "real_tokens": real,
                "processed_tokens": processed,
                "padding_efficiency": round(real / processed, 4) if processed else None,
                "tokens_per_second": round(real / seconds, 1) if seconds else None,
                "peak_rss_bytes": [g[0] for g in gathered],
                "peak_gpu_memory_bytes": [g[1] for g in gathered] if torch.cuda.is_available() else None,
            }

    return ThroughputMeter()


def describe_engine(trainer: Any) -> dict:
    """What actually ran, read back from the DeepSpeed engine (not from our intentions)."""
    engine = trainer.model_wrapped
    if not hasattr(engine, "zero_optimization_stage"):
        return {"engine": type(engine).__name__}
    offload_opt, offload_param = engine.zero_offload_optimizer(), engine.zero_offload_param()
    return {
        "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "offload_optimizer": str(getattr(offload_opt, "device", "none")).split(".")[-1],
        "offload_param": str(getattr(offload_param, "device", "none")).split(".")[-1],
        "bf16": engine.bfloat16_enabled(),
        "optimizer": type(engine.optimizer).__name__,
        "base_optimizer": type(getattr(engine.optimizer, "optimizer", None)).__name__,
        "world_size": engine.world_size,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Faults: preemption (SIGTERM) saves at the next step boundary; a non-finite loss or gradient stops before saving.
# ----------------------------------------------------------------------------------------------------------------------

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job that stopped on their signal
EXIT_DIVERGED = 3


def make_fault_guard(trainer_ref: dict) -> Any:
    """A callback that, once per optimizer step, agrees across ranks (one tiny all-reduce) on whether to stop:
    every rank must save, or stop, at the same step, because ZeRO-3 saving is collective."""
    import signal

    import torch
    import torch.distributed as dist
    from transformers import TrainerCallback

    class FaultGuard(TrainerCallback):
        def __init__(self):
            self.preempt_requested = False
            self.nonfinite_loss = False
            self.preempted_at: int | None = None
            self.diverged_at: int | None = None
            signal.signal(signal.SIGTERM, self._on_sigterm)

        def _on_sigterm(self, signum, frame):
            self.preempt_requested = True  # acted on at the next step boundary, on every rank together

        def saw_loss(self, loss) -> None:
            if not torch.isfinite(loss.detach()).all():
                self.nonfinite_loss = True

        def on_step_end(self, args, state, control, **kwargs):
            engine = trainer_ref["trainer"].model_wrapped
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

    return FaultGuard()


def make_trainer_class(guard: Any, meter: Any, sampler: LengthGroupedSampler | None) -> type:
    """The Trainer, with each micro-batch's loss shown to the fault guard (no host sync: the check is lazy), its
    tokens counted, and our length-grouped sampler when grouping is on."""
    from transformers import Trainer

    class GuardedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            meter.count(inputs)
            loss = super().training_step(model, inputs, num_items_in_batch)
            guard.saw_loss(loss)
            return loss

    return GuardedTrainer


def raise_if_stopped(guard: Any, output_dir: Path) -> None:
    last = last_complete_checkpoint(output_dir)
    if guard.diverged_at is not None:
        raise TrainingStopped(
            f"training diverged: the loss or the gradient norm became NaN or infinite at step {guard.diverged_at}. "
            f"Nothing was saved after it; the last good checkpoint is {last or 'none (no checkpoint yet)'}. Lower "
            "training.learning_rate or raise warmup_ratio, then resume from that checkpoint or start over.",
            EXIT_DIVERGED)
    if guard.preempted_at is not None:
        raise TrainingStopped(
            f"preempted (SIGTERM): saved {last} at step {guard.preempted_at} and stopped. Rerun the same command "
            "with --resume_from_checkpoint auto to continue.", EXIT_PREEMPTED)


# ----------------------------------------------------------------------------------------------------------------------
# Test-set evaluation: per-example loss and greedy answers on every rank in step, then task metrics.
# ----------------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def normalize_answer(text: str) -> str:
    """Case, spacing and a trailing full stop do not make an answer wrong: "Comedy." matches "comedy"."""
    return " ".join(text.strip().rstrip(".").lower().split())


def parse_number(text: str) -> float | None:
    """The first number in a generated answer ("4 stars" -> 4.0), or None when there is none."""
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def score_predictions(rows: list[dict], test_examples: int) -> dict:
    """Adds exact_match / parsed / abs_error to each row (id, target, prediction, loss, target_tokens) and returns
    the metrics. The task counts as numeric when every target is a number (e.g. a rating): then MAE and RMSE are
    computed over the predictions that parse, and the ones that do not are counted, never silently dropped."""
    numeric = all(_NUMBER.fullmatch(r["target"].strip()) for r in rows)
    for r in rows:
        r["exact_match"] = normalize_answer(r["prediction"]) == normalize_answer(r["target"])
        r["parsed"] = parse_number(r["prediction"]) if numeric else None
        r["abs_error"] = abs(r["parsed"] - float(r["target"])) if r["parsed"] is not None else None
    tokens = sum(r["target_tokens"] for r in rows)
    loss = sum(r["loss"] * r["target_tokens"] for r in rows) / tokens  # token-weighted, like the training loss
    metrics = {"examples": test_examples, "generated": len(rows), "loss": loss, "perplexity": math.exp(loss),
               "exact_match": sum(r["exact_match"] for r in rows) / len(rows), "numeric": numeric,
               "mae": None, "rmse": None, "unparsable": None}
    if numeric:
        errors = [r["abs_error"] for r in rows if r["abs_error"] is not None]
        metrics.update(mae=sum(errors) / len(errors) if errors else None,
                       rmse=math.sqrt(sum(e * e for e in errors) / len(errors)) if errors else None,
                       unparsable=len(rows) - len(errors))
    return metrics


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                     synced: bool, device: Any) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded), cut at <end_of_turn>."""
    import torch
    from transformers import GenerationConfig

    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    pad, width = tokenizer.pad_token_id, max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                         eos_token_id=[eot, tokenizer.eos_token_id], pad_token_id=pad)
    # Under ZeRO-3 every forward gathers parameters collectively: synced_gpus keeps a rank that has finished
    # stepping until all ranks are done.
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                            generation_config=generation_config, synced_gpus=synced)
    answers = []
    for row in output[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in (eot, tokenizer.eos_token_id, pad)), len(row))
        answers.append(tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
    return answers


def evaluate_test(model: Any, tokenizer: Any, examples: list[dict], ids: list[str], targets: list[str],
                  batch_size: int, max_new_tokens: int, device: Any) -> list[dict] | None:
    """Per-example target loss and greedy answer for every example, sharded over the ranks. Every rank runs the
    same number of batches (ZeRO-3 forwards are collective), padding its shard by repeating an example whose
    result is then dropped. Returns the rows in input order on rank 0, None elsewhere."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = math.ceil(len(examples) / world)
    shard = list(range(rank, len(examples), world))
    shard += [shard[0] if shard else 0] * (per_rank - len(shard))
    real = len(range(rank, len(examples), world))
    collate = SupervisedPositionsCollator(tokenizer)
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, per_rank, batch_size):
            idx = shard[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=batch["logits_to_keep"]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits, batch["shift_labels"], reduction="none")
            row_of = batch["logits_to_keep"].nonzero()[:, 0]
            sums = torch.zeros(len(idx), device=device).index_add_(0, row_of, nll)
            counts = torch.bincount(row_of, minlength=len(idx))
            prompts = [examples[i]["input_ids"][:prompt_length(examples[i])] for i in idx]
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens, synced=world > 1, device=device)
            for j, i in enumerate(idx):
                rows.append({"index": i, "id": ids[i], "target": targets[i], "prediction": answers[j],
                             "loss": (sums[j] / counts[j]).item(), "target_tokens": int(counts[j])})
    model.train(was_training)
    rows = rows[:real]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank != 0:
        return None
    ordered = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    for r in ordered:
        del r["index"]
    return ordered


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: never overwrite a finished run; write atomically.
# ----------------------------------------------------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A finished run (results.json) is never overwritten, and an unfinished one is never silently mixed with a new
    one, unless the user says so."""
    if not output_dir.exists():
        return
    finished = (output_dir / RESULTS_NAME).is_file()
    checkpoints = list(output_dir.glob("checkpoint-*"))
    if overwrite:
        return
    if finished:
        raise UserError(f"{output_dir}: holds a finished run ({RESULTS_NAME}). Choose another --output_dir, or add "
                        "--overwrite_output_dir to replace it.")
    if checkpoints and resume is None:
        raise UserError(f"{output_dir}: holds checkpoints of an unfinished run. Add --resume_from_checkpoint auto to "
                        "continue it, or --overwrite_output_dir to start over.")


def clear_output_dir(output_dir: Path) -> None:
    """Remove what a previous run wrote (only our own outputs: never anything else the user keeps there)."""
    for path in [*output_dir.glob("checkpoint-*"), output_dir / FINAL_DIRNAME, output_dir / f".{FINAL_DIRNAME}.tmp",
                 output_dir / DS_CONFIG_DIRNAME]:
        if path.is_dir():
            shutil.rmtree(path)
    for name in (RESULTS_NAME, RESOLVED_CONFIG_NAME):
        (output_dir / name).unlink(missing_ok=True)


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


def check_output_writable(output_dir: Path, need_bytes: int | None) -> None:
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
    free = shutil.disk_usage(output_dir).free
    if need_bytes is not None and free < need_bytes:
        logger.warning("%s: %.1f GB free, but checkpoints and final/ may need about %.1f GB (estimate). Lower "
                       "training.save_total_limit or free some space.", output_dir, free / 1e9, need_bytes / 1e9)


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


def storage_estimate(n_params: int | None, cfg: Config) -> int | None:
    """Bytes for the kept checkpoints (16-bit weights twice, fp32 master weights and Adam moments: about 16 bytes per
    parameter) while one more is being written, plus final/ (2 bytes per parameter in 16 bits)."""
    if n_params is None:
        return None
    kept = (cfg.training.save_total_limit or 10) + 1
    return n_params * (16 * kept + 2)


def resolve_resume(resume: str | None, output_dir: Path) -> str | None:
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
# main: parse -> load and validate -> data -> DeepSpeed config -> model -> train -> evaluate -> save
# ----------------------------------------------------------------------------------------------------------------------


def setup_logging(rank: int) -> None:
    """Our INFO lines on rank 0 only; other libraries stay at WARNING (their INFO is compiler chatter)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING, stream=sys.stdout, force=True)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


@dataclass
class RunPlan:
    """Everything decided from the command line and config.json before anything heavy is imported."""

    cfg: Config
    config_path: Path
    ablation_name: str
    ablation: AblationProfile
    custom_ds: dict | None
    output_dir: Path
    model_path: str
    tokenizer_path: str


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Check everything the user wrote (config, ablation, --set, DeepSpeed JSON, output dir) in about a second."""
    config_path = args.config.resolve()
    cfg, ablation_name, ablation = load_settings(config_path, args.ablation_config, args.overrides)
    custom_ds = load_custom_deepspeed_config(args.deepspeed_config, cfg) if args.deepspeed_config else None
    output_dir = args.output_dir.resolve()
    model_path = local_or_hub(cfg.model.model_name_or_path, config_path.parent)
    tokenizer_path = local_or_hub(cfg.model.tokenizer_name_or_path or cfg.model.model_name_or_path, config_path.parent)
    if args.do_eval_only:
        model_path = tokenizer_path = str(check_eval_only(output_dir, cfg))  # final/ holds the run's tokenizer
    else:
        check_output_dir(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        check_output_writable(output_dir, storage_estimate(count_parameters(Path(model_path)), cfg))
    return RunPlan(cfg, config_path, ablation_name, ablation, custom_ds, output_dir, model_path, tokenizer_path)


def local_or_hub(name: str, base: Path) -> str:
    path = resolve_path(name, base)
    return str(path) if path.is_dir() else name


def check_eval_only(output_dir: Path, cfg: Config) -> Path:
    """--do_eval_only evaluates a finished run's final/ model with the prompt it was trained with."""
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


def start_distributed(rank: int, dtype: str) -> bool:
    """Process group, CPU-only work-arounds, a precision the hardware has, quiet libraries; returns whether this is
    a CPU-only machine."""
    # Host memory in 2 MB pages: far fewer page faults when offloaded parameters, optimizer states and activations
    # churn through CPU memory (measured on the CPU demo: 22 -> 18 s/step). Read once, when torch first allocates.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # thousands of torch.distributed deprecation lines
    ensure_process_group_env()
    cpu_only = prepare_cpu_only_environment()
    import torch
    from transformers.utils import logging as hf_logging

    if torch.cuda.is_available():
        problems = check_precision(dtype, True, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
        if problems:
            raise UserError(problems)

    hf_logging.set_verbosity_warning() if rank == 0 else hf_logging.set_verbosity_error()
    return cpu_only


def build_splits(plan: RunPlan, encoder: PromptEncoder, names: tuple[str, ...]) -> dict[str, Split]:
    """Read, check and encode the named splits (train / validation / test) before the model is loaded."""
    files = {"train": plan.cfg.data.train_file, "validation": plan.cfg.data.validation_file,
             "test": plan.cfg.data.test_file}
    splits = {}
    for name in names:
        if files[name] is not None:
            splits[name] = build_split(resolve_path(files[name], plan.config_path.parent), name, plan.cfg, encoder)
            s = splits[name].stats
            logger.info("%s: %d records -> %d examples (%d dropped as too long, %d with history shortened), "
                        "ids sha256 %s", name, s.records, s.examples, s.dropped_too_long, s.history_shortened,
                        s.ids_sha256[:12])
    return splits


def prepare_data(plan: RunPlan, names: tuple[str, ...]) -> tuple[Any, PromptEncoder, dict[str, Split]]:
    """Tokenizer, prompt encoder (its fixed parts checked against max_length) and the named splits."""
    tokenizer = load_tokenizer(plan.tokenizer_path)
    encoder = PromptEncoder(tokenizer, plan.cfg.training.max_length)
    encoder.check_fixed_parts()
    return tokenizer, encoder, build_splits(plan, encoder, names)


def load_gemma_config(model_path: str) -> dict:
    model_config = load_model_config(model_path)
    problem = not_gemma(model_config.get("model_type"), model_path)  # hub ids are only checked here
    if problem:
        raise UserError(problem)
    return model_config


def deepspeed_config_for(plan: RunPlan, model_config: dict, memory_plan: MemoryPlan | None) -> dict:
    """The user's --deepspeed_config, or the generated one with any "auto" offload resolved by the memory plan."""
    if plan.custom_ds is not None:
        return plan.custom_ds
    return generate_deepspeed_config(resolved_offload(plan.cfg.deepspeed, memory_plan), plan.cfg.model.dtype,
                                     model_config)


def write_run_files(plan: RunPlan, args: argparse.Namespace, ds_config: dict) -> None:
    """Rank 0: clear an overwritten run, save the DeepSpeed config used and resolved_config.json."""
    out = plan.output_dir
    if args.overwrite_output_dir and out.exists():
        clear_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    ds_name = args.deepspeed_config.name if plan.custom_ds is not None else GENERATED_DS_CONFIG_NAME
    write_json_atomic(out / DS_CONFIG_DIRNAME / ds_name, ds_config)
    resolved = {
        **dataclasses.asdict(plan.cfg),
        "ablation": {"name": plan.ablation_name, **dataclasses.asdict(plan.ablation)},
        "cli": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "deepspeed_config_file": str(out / DS_CONFIG_DIRNAME / ds_name),
        "model_path": plan.model_path,
    }
    write_json_atomic(out / RESOLVED_CONFIG_NAME, resolved)
    logger.info("Resolved config:\n%s", json.dumps(resolved, indent=2))


def save_final_model(trainer: Any, output_dir: Path, rank: int) -> Path:
    """final/: consolidated 16-bit weights (gathered by every rank) + tokenizer, renamed into place when complete."""
    import torch.distributed as dist

    staging, final = output_dir / f".{FINAL_DIRNAME}.tmp", output_dir / FINAL_DIRNAME
    trainer.model.config.use_cache = True  # users generate from final/: give them the cache back
    trainer.save_model(str(staging))
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    return final


def run_test_evaluation(trainer: Any, tokenizer: Any, test: Split, cfg: Config) -> tuple[dict, list[dict]] | None:
    """Test loss, perplexity and greedy answers (metrics on rank 0, None elsewhere)."""
    n = min(len(test.examples), cfg.evaluation.max_test_examples or len(test.examples))
    logger.info("Test evaluation: loss and greedy answers for %d of %d test examples.", n, len(test.examples))
    rows = evaluate_test(trainer.model, tokenizer, test.examples[:n], test.ids[:n], test.targets[:n],
                         cfg.training.eval_batch_size, cfg.evaluation.max_new_tokens,
                         device=trainer.args.device)  # ZeRO-3 parameters are placeholders: ask the Trainer
    if rows is None:
        return None
    metrics = score_predictions(rows, len(test.examples))
    logger.info("Test: loss %.4f, perplexity %.3f, exact match %.3f%s", metrics["loss"], metrics["perplexity"],
                metrics["exact_match"], f", MAE {metrics['mae']}, RMSE {metrics['rmse']}, "
                f"{metrics['unparsable']} unparsable" if metrics["numeric"] else "")
    return metrics, rows


def run(args: argparse.Namespace) -> Path:
    """parse -> check -> data -> DeepSpeed config -> TrainingArguments -> model -> train -> evaluate -> save."""
    started = time.time()
    rank = int(os.environ.get("RANK", "0"))
    plan = plan_run(args)  # everything the user wrote is checked before anything heavy is imported
    cfg, t = plan.cfg, plan.cfg.training
    cpu_only = start_distributed(rank, cfg.model.dtype)
    import torch.distributed as dist

    tokenizer, encoder, splits = prepare_data(
        plan, ("test",) if args.do_eval_only else ("train", "validation", "test"))

    # DeepSpeed config (offload "auto" decided from the memory estimate), TrainingArguments, then the model
    # (partitioned by zero.Init).
    model_config = load_gemma_config(plan.model_path)
    memory_plan = None
    if plan.custom_ds is None and "auto" in (cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params):
        memory_plan = plan_memory_for(plan, args, splits)
        logger.info("Offload \"auto\": optimizer %s, parameters %s (%s).", memory_plan.offload_optimizer,
                    memory_plan.offload_params, memory_plan.reason)
    ds_config = deepspeed_config_for(plan, model_config, memory_plan)
    training_args = build_training_arguments(cfg, plan.output_dir, ds_config, "validation" in splits, cpu_only)
    world_size = training_args.world_size
    if rank == 0 and not args.do_eval_only:
        write_run_files(plan, args, ds_config)
    dist.barrier()
    if cpu_only and world_size == 1 and "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        logger.warning("accelerate started one process. If you asked for several: on a CPU-only machine add "
                       "--use_deepspeed to `accelerate launch`.")
    logger.info("World size %d; effective global batch size %d = batch_size %d x gradient_accumulation_steps %d x "
                "%d processes.", world_size, t.global_batch(world_size),
                t.batch_size, t.gradient_accumulation_steps, world_size)

    offload_stats = OffloadStats()
    trainer_ref: dict[str, Any] = {}
    guard, meter = make_fault_guard(trainer_ref), make_throughput_meter()
    padding_free = use_padding_free(cfg)
    sampler = None
    if "train" in splits and t.group_by_length and not padding_free:
        # The longest micro-batches of the whole first optimizer step come first, on every rank.
        sampler = LengthGroupedSampler(splits["train"].group_lengths, t.global_batch(world_size), t.seed)
    logger.info("Batching: %s.", "padding-free (one concatenated row per micro-batch)" if padding_free
                else f"padded to the longest example, {'grouped' if sampler else 'not grouped'} by length")
    trainer = make_trainer_class(guard, meter, sampler)(
        model=load_model(plan.model_path, cfg),
        args=training_args,
        train_dataset=_as_dataset(splits["train"].examples) if "train" in splits else None,
        eval_dataset=_as_dataset(splits["validation"].examples) if "validation" in splits else None,
        processing_class=tokenizer,
        data_collator=SupervisedPositionsCollator(tokenizer, padding_free,
                                                  cfg.model.attn_implementation == "flash_attention_2"),
        callbacks=[*make_callbacks(cfg, ds_config, offload_stats), guard, meter],
    )
    trainer_ref["trainer"] = trainer
    results: dict[str, Any] = {}
    if args.do_eval_only:
        # The Trainer builds the DeepSpeed inference engine on its first evaluation; one example per rank suffices.
        trainer.evaluate(_as_dataset(splits["test"].examples[:world_size]))
    else:
        resume = resolve_resume(args.resume_from_checkpoint, plan.output_dir)
        train_result = trainer.train(resume_from_checkpoint=resume)
        raise_if_stopped(guard, plan.output_dir)
        throughput = meter.summary(training_args.device)
        eval_metrics = final_evaluation(trainer) if "validation" in splits else {}
        final = save_final_model(trainer, plan.output_dir, rank)
        results = {
            "ablation": plan.ablation_name,
            "ablation_description": plan.ablation.description,
            "prompt": dataclasses.asdict(cfg.prompt),  # what the prompt held (--set may refine the ablation)
            "train": train_result.metrics,
            "eval": eval_metrics,
            **loss_summary(trainer.state.log_history),
            "global_step": trainer.state.global_step,
            "world_size": world_size,
            "effective_batch_size": t.global_batch(world_size),
            "examples": {name: dataclasses.asdict(split.stats) for name, split in splits.items()},
            "deepspeed": describe_engine(trainer),
            "memory_plan": memory_plan_summary(memory_plan) if memory_plan else None,
            "batching": {"padding_free": padding_free, "group_by_length": sampler is not None},
            "throughput": throughput,
            "activation_checkpointing": {
                "enabled": t.activation_checkpointing,
                "cpu_offload": offload_stats.tensors > 0,
                "offloaded_tensors_rank0": offload_stats.tensors,
                "offloaded_bytes_rank0": offload_stats.bytes,
            },
            "resumed_from": resume,
            "versions": library_versions(),
            "log_history": trainer.state.log_history,
        }
    tested = run_test_evaluation(trainer, tokenizer, splits["test"], cfg) if "test" in splits else None

    if rank == 0:
        if tested is not None:
            metrics, rows = tested
            write_text_atomic(plan.output_dir / PREDICTIONS_NAME, "".join(json.dumps(r) + "\n" for r in rows))
            results["test"] = metrics
        if args.do_eval_only:  # keep the training results, replace the test section
            existing = plan.output_dir / RESULTS_NAME
            results = {**(json.loads(existing.read_text()) if existing.is_file() else {}), "test": results["test"]}
        else:
            results["wall_time_s"] = round(time.time() - started, 1)
        write_json_atomic(plan.output_dir / RESULTS_NAME, results)
        logger.info("Done in %.0f s. Results: %s%s", time.time() - started, plan.output_dir / RESULTS_NAME,
                    "" if args.do_eval_only else f"  Final model: {final}")
    shutdown_distributed(cpu_only)
    return plan.output_dir


def final_evaluation(trainer: Any) -> dict:
    """Validation metrics of the final weights; reuse the in-training evaluation when it ran at the last step."""
    last = trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}
    if "eval_loss" in last and last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def _as_dataset(examples: list[dict]):
    import datasets

    return datasets.Dataset.from_list(examples)


# ----------------------------------------------------------------------------------------------------------------------
# Dry run: everything a run checks and builds before the model loads, plus the memory plan, as a report.
# ----------------------------------------------------------------------------------------------------------------------

DRY_RUN_DIRNAME = "dry_run"


def resolved_offload(choices: DeepSpeedChoices, memory_plan: MemoryPlan | None) -> DeepSpeedChoices:
    if memory_plan is None:
        return choices
    return dataclasses.replace(choices, offload_optimizer=memory_plan.offload_optimizer,
                               offload_params=memory_plan.offload_params)


def plan_memory_for(plan: RunPlan, args: argparse.Namespace, splits: dict[str, Split]) -> MemoryPlan:
    """The memory plan for this run: the longest example (micro-batches are padded to their longest) and the
    longest answer of the split that will run."""
    stats = (splits.get("train") or next(iter(splits.values()))).stats
    seq_len = min(plan.cfg.training.max_length, stats.max_tokens)
    supervised = plan.cfg.training.batch_size * stats.max_target_tokens
    return plan_memory(model_shape(plan.model_path), plan.cfg, detect_hardware(args), seq_len, supervised)


def memory_plan_summary(mp: MemoryPlan) -> dict:
    return {"hardware": dataclasses.asdict(mp.hardware), "model": dataclasses.asdict(mp.shape),
            "micro_batch": {"batch_size": mp.batch_size, "seq_len": mp.seq_len,
                            "supervised_tokens": mp.supervised_tokens},
            "options": mp.options, "offload_optimizer": mp.offload_optimizer, "offload_params": mp.offload_params,
            "reason": mp.reason, "estimated": True}


def _gib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _shown(path: str) -> str:
    """A path under the current directory as a relative one: the report reads the same on every machine."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def dry_run_report(plan: RunPlan, splits: dict[str, Split], example: dict, mp: MemoryPlan, ds_config: dict,
                   resolved: dict, padding: dict[str, float]) -> str:
    cfg, t, hw, shape = plan.cfg, plan.cfg.training, mp.hardware, mp.shape
    gpus = hw.gpus_per_node * hw.nodes
    lines = [f"# Dry run: {plan.config_path.name}, ablation {plan.ablation_name} (nothing was trained)", ""]
    lines += ["## Model", "",
              f"{_shown(plan.model_path)} ({shape.model_type}): {shape.total_params:,} parameters, largest layer "
              f"{shape.largest_layer_params:,}; {shape.num_layers} layers, hidden {shape.hidden_size}, MLP "
              f"{shape.intermediate_size}, {shape.num_heads} heads ({shape.num_kv_heads} key/value) of "
              f"{shape.head_dim}, vocabulary {shape.vocab_size:,}. Counted from the model built on the meta device "
              "(no weights read).", ""]
    lines += ["## Data", ""]
    lines += _markdown_table(
        ["split", "records", "examples", "dropped (too long)", "history shortened", "tokens p50", "p95", "max",
         "answer tokens max"],
        [[name, s.stats.records, s.stats.examples, s.stats.dropped_too_long, s.stats.history_shortened,
          s.stats.p50_tokens, s.stats.p95_tokens, s.stats.max_tokens, s.stats.max_target_tokens]
         for name, s in splits.items()])
    lines += ["", f"Tokens per example include the prompt and the answer (max_length {t.max_length}; over-long "
              "examples lose their oldest history items first). Padding efficiency of the first epoch's training "
              f"micro-batches (real tokens / tokens processed): {padding['grouped']:.3f} grouped by length, "
              f"{padding['random']:.3f} in random order; padding-free batching processes no padding.", ""]
    lines += ["## Batch", "",
              f"Effective global batch {t.global_batch(gpus)} = batch_size "
              f"{t.batch_size} x gradient_accumulation_steps {t.gradient_accumulation_steps} x {gpus} GPUs "
              f"({hw.gpus_per_node} per node x {hw.nodes} nodes).", ""]
    sections = example["sections"]
    lines += [f"## One example (first training record, ablation {plan.ablation_name})", ""]
    lines += _markdown_table([*sections, "total"], [[*sections.values(), sum(sections.values())]])
    lines += ["", "Prompt (the model's input) and answer (the only supervised tokens):", "", "```text",
              example["prompt"], "```", "", "```text", example["target"], "```", ""]
    lines += ["## Memory per GPU and per node (estimated, not measured)", "",
              f"Hardware ({hw.source}): {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s), "
              f"{_gib(hw.gpu_memory) if hw.gpu_memory else 'GPU memory unknown'} per GPU, "
              f"{_gib(hw.cpu_memory) if hw.cpu_memory else 'host memory unknown'} per node. Micro-batch "
              f"{mp.batch_size} x {mp.seq_len} tokens (the longest training example), "
              f"{mp.supervised_tokens} supervised positions.", ""]
    rows = []
    for r in mp.options:
        fits = "?" if r["fits_gpu"] is None else "yes" if r["fits_gpu"] else "**no**"
        host = _gib(r["total_host_per_node"]) + (" (**too much**)" if r["fits_host"] is False else "")
        rows.append([_yes_no(r["offload_optimizer"]), _yes_no(r["offload_params"]), _gib(r["model_states_gpu"]),
                     _gib(r["activations_gpu"]), _gib(r["total_gpu"]), fits, host])
    lines += _markdown_table(["offload optimizer", "offload params", "model states / GPU", "activations / GPU",
                              "total / GPU", f"fits {GPU_USABLE_FRACTION:.0%} of GPU", "host / node"], rows)
    first = mp.options[0]
    act_on = activation_bytes(shape, mp.batch_size, mp.seq_len, mp.supervised_tokens,
                              cfg.model.attn_implementation, True, False)
    lines += ["", f"Activations per GPU for this micro-batch ({cfg.model.attn_implementation} attention): "
              f"{_gib(first['activations_gpu_without_checkpointing'])} without activation checkpointing, "
              f"{_gib(act_on['gpu'])} with it, {_gib(first['activations_gpu'])} as configured "
              f"(activation_checkpointing {str(t.activation_checkpointing).lower()}, cpu_checkpointing "
              f"{str(cfg.deepspeed.cpu_checkpointing).lower()}). Logits only at the supervised positions: "
              f"{_gib(act_on['logits'])}; at every position they would take {_gib(act_on['logits_all_positions'])}.",
              "",
              "Model states: DeepSpeed's ZeRO-3 arithmetic (estimate_zero3_model_states_mem_needs, zero.Init, host "
              f"buffer factor {ZERO3_BUFFER_FACTOR}). Activations: an analytic count of what autograd keeps (see "
              "activation_bytes). Not included: the CUDA context and communication buffers (hence the "
              f"{GPU_USABLE_FRACTION:.0%} rule), evaluation and generation.", ""]
    ds = cfg.deepspeed
    wanted = f"offload_optimizer {json.dumps(ds.offload_optimizer)}, offload_params {json.dumps(ds.offload_params)}"
    if plan.custom_ds is not None:
        lines += ["Decision: none (--deepspeed_config given: its offload settings apply).", ""]
    else:
        lines += [f"Decision ({wanted}): offload optimizer {_yes_no(mp.offload_optimizer)}, parameters "
                  f"{_yes_no(mp.offload_params)}: {mp.reason}.", ""]
    lines += ["## DeepSpeed config", "", "```json", json.dumps(ds_config, indent=2), "```", "",
              "## Resolved config", "", "```json", json.dumps(resolved, indent=2), "```", ""]
    return "\n".join(lines)


def dry_run(args: argparse.Namespace) -> Path:
    """--dry_run on rank 0 (other ranks of a launch have nothing to add): no weights, no training, no checkpoint."""
    plan = plan_run(args)
    cfg, t = plan.cfg, plan.cfg.training
    _, encoder, splits = prepare_data(plan, ("train", "validation", "test"))
    model_config = load_gemma_config(plan.model_path)
    mp = plan_memory_for(plan, args, splits)
    ds_config = deepspeed_config_for(plan, model_config, mp)

    train_file = resolve_path(cfg.data.train_file, plan.config_path.parent)
    record = read_records(train_file, cfg.data.fields)[0]
    kept = encoder.fitting_history(record, len(encoder.target_ids(record["target"])))
    history = kept if kept is not None else 0
    items = history if cfg.prompt.max_history_items is None else min(history, cfg.prompt.max_history_items)
    example = {"sections": encoder.section_lengths(record, cfg.prompt, history),
               "prompt": encoder.prompt_text(render_user_message(record, cfg.prompt.include_profile,
                                                                 cfg.prompt.include_history, items)),
               "target": record["target"].strip()}

    gpus = mp.hardware.gpus_per_node * mp.hardware.nodes
    padding = epoch_padding_efficiency(splits["train"], t.batch_size, t.global_batch(gpus), t.seed)

    resolved = {**dataclasses.asdict(cfg), "ablation": {"name": plan.ablation_name, **dataclasses.asdict(plan.ablation)},
                "model_path": _shown(plan.model_path), "tokenizer_path": _shown(plan.tokenizer_path)}
    report = dry_run_report(plan, splits, example, mp, ds_config, resolved, padding)
    out = plan.output_dir / DRY_RUN_DIRNAME
    ds_name = args.deepspeed_config.name if plan.custom_ds is not None else GENERATED_DS_CONFIG_NAME
    write_json_atomic(out / ds_name, ds_config)
    write_json_atomic(out / RESOLVED_CONFIG_NAME, resolved)
    write_json_atomic(out / "plan.json", {
        "memory": memory_plan_summary(mp), "examples": {k: dataclasses.asdict(s.stats) for k, s in splits.items()},
        "example": example, "padding_efficiency": padding,
        "effective_batch_size": t.global_batch(gpus)})
    write_text_atomic(out / "report.md", report)
    print(report, flush=True)
    logger.info("Dry run report: %s", out / "report.md")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        if args.dry_run:
            if rank == 0:
                dry_run(args)
        else:
            run(args)
    except UserError as e:
        if rank == 0:  # every rank finds the same problem; one copy of the message is enough
            print("error: " + "\n       ".join(e.problems), file=sys.stderr, flush=True)
        if isinstance(e, TrainingStopped):
            shutdown_distributed(cpu_only=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
