"""The DeepSpeed config: ZeRO-3 generated from config.json, or the user's own JSON checked against config.json.
Plain dictionaries and the standard library: checked before torch is imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config, DeepSpeedChoices
from .errors import UserError
from .outputs import FINAL_DIRNAME
from .settings import read_json_file

MIN_REDUCE_BUCKET = 50_000_000  # elements; DeepSpeed's own default is 5e8


def bucket_sizes(hidden_size: int) -> dict[str, int]:
    """ZeRO-3 bucket sizes from the model's hidden size h: transformers' "auto" formulas (prefetch 0.9 h², persistence
    threshold 10 h), written out as integers. The gradient reduce bucket is h² but at least MIN_REDUCE_BUCKET: h² alone
    makes one reduce-scatter per 0.4M gradient elements on Gemma 3 270M (h = 640), and fewer, larger ones were faster
    (benchmarks/results/speed.md); 5e7 bf16 elements are 100 MB, a tenth of DeepSpeed's default."""
    return {"reduce_bucket_size": max(hidden_size * hidden_size, MIN_REDUCE_BUCKET),
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}


def generate_deepspeed_config(choices: DeepSpeedChoices, dtype: str, hidden_size: int) -> dict:
    """ZeRO-3 with CPU offload and activation checkpointing. Batch, accumulation, clipping and optimizer values are
    'auto': the Trainer fills them from config.json, so the two can never disagree. There is deliberately no
    "scheduler" block: with one, DeepSpeed's scheduler would replace training.lr_scheduler_type.

    The offload choices must be decided (true or false): resolve "auto" with the memory plan first."""
    for key in ("offload_optimizer", "offload_params"):
        if not isinstance(getattr(choices, key), bool):
            raise ValueError(f"deepspeed.{key} is {getattr(choices, key)!r}: resolve \"auto\" with the memory plan "
                             "(memory_plan.resolved_offload) before generating the config")

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
            **bucket_sizes(hidden_size),
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        # Read by activation_offload.py: HF models ignore this section otherwise. partition_activations only matters
        # with model parallelism, which we do not use.
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


def cpu_checkpointing(ds_config: dict) -> bool:
    """Whether a DeepSpeed config (generated or the user's) asks for activation checkpoints in CPU memory."""
    return bool((ds_config.get("activation_checkpointing") or {}).get("cpu_checkpointing", False))


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
