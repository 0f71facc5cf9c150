"""Checks of what the installed libraries will accept, made before any weights load: the reporting integrations,
the attention kernel, what the model class supports, and the DeepSpeed config as transformers fills it and
DeepSpeed's own config model parses it.
Each problem is a UserError message naming the key or file and the fix; all are reported together."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime import lr_schedules
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig
from transformers import AutoModel, AutoModelForCausalLM, TimmWrapperModel, TrainingArguments
from transformers.integrations import HfTrainerDeepSpeedConfig
from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                         get_available_reporting_integrations)
from transformers.utils import is_flash_attn_2_available, is_timm_available

from .config import Config
from .errors import UserError
from .gemma import precision_problem
from .modeling import layer_configs, meta_model


def environment_problems(cfg: Config) -> list[str]:
    """Reporting integrations and the attention kernel this machine has."""
    problems = []
    known, installed = sorted(INTEGRATION_TO_CALLBACK), get_available_reporting_integrations()
    for name in cfg.training.report_to:
        if name in ("none", "all"):
            continue
        if name not in known:
            problems.append(f"training.report_to: {name!r} is not an integration transformers knows; use \"none\" "
                            f"or some of {', '.join(known)}.")
        elif name not in installed:
            problems.append(f"training.report_to: {name} is not installed here; `pip install {name}` or remove it "
                            "from training.report_to.")
    if cfg.model.attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package and a CUDA GPU, "
                        "which this machine lacks; `pip install flash-attn` on a GPU machine, or use \"sdpa\" or "
                        "\"eager\".")
    return problems


FLASH_ATTENTION_MAX_HEAD_DIM = 256  # flash-attn 2's kernels


def model_class(model_config: Any) -> type:
    """The class AutoModelForCausalLM builds from this config (multimodal Gemmas: ...ForConditionalGeneration)."""
    return AutoModelForCausalLM._model_mapping[type(model_config)]


def architecture_problems(cfg: Config, model_config: Any, hf_deepspeed_config: Any = None) -> list[str]:
    """What the model class itself refuses, known from the config alone: an attention implementation it does not
    support (its own _supports_sdpa / _supports_flash_attn flags), head dims above flash-attn's limit, fp16 in the
    families it overflows in."""
    problems, attn, cls = [], cfg.model.attn_implementation, model_class(model_config)
    supported = {"eager": True, "sdpa": getattr(cls, "_supports_sdpa", False),
                 "flash_attention_2": getattr(cls, "_supports_flash_attn", False)}
    if not supported[attn]:
        choices = " or ".join(f'"{a}"' for a, ok in supported.items() if ok)
        problems.append(f"model.attn_implementation: {cls.__name__} does not support {attn}; use {choices}.")
    elif attn == "flash_attention_2":
        widest = max((getattr(layer, "head_dim", None) or 0) for layer in layer_configs(model_config))
        if widest > FLASH_ATTENTION_MAX_HEAD_DIM:
            problems.append(f"model.attn_implementation: flash_attention_2 takes head dims up to "
                            f"{FLASH_ATTENTION_MAX_HEAD_DIM}, and this model's attention layers use {widest}; use "
                            "\"sdpa\".")
    if (problem := precision_problem(model_config.model_type, cfg.model.dtype)) is not None:
        problems.append(problem)
    if cfg.lora.enabled:
        problems += adapter_problems(cfg, model_config, hf_deepspeed_config)
    if _timm_towers(model_config) and not is_timm_available():
        problems.append(f"model.model_name_or_path: {cls.__name__} builds its vision tower with timm "
                        f"({', '.join(_timm_towers(model_config))}), which is not installed; `pip install "
                        "'timm>=1.0.23'` (the tower stays frozen, but it is part of the checkpoint).")
    return problems


def adapter_problems(cfg: Config, model_config: Any, hf_deepspeed_config: Any) -> list[str]:
    """lora.target_modules and modules_to_save against the model's own modules, built on the meta device."""
    from .lora import lora_problems

    return lora_problems(meta_model(model_config, hf_deepspeed_config), cfg.lora)


def _timm_towers(model_config: Any) -> list[str]:
    """The sub-models (Gemma 3n's MobileNet vision tower) that transformers builds through its timm wrapper."""
    return [name for name in getattr(model_config, "sub_configs", {})
            if AutoModel._model_mapping.get(type(getattr(model_config, name, None)), None) is TimmWrapperModel]


def trainer_arguments_like(cfg: Config, world_size: int) -> SimpleNamespace:
    """What transformers' DeepSpeed integration reads from TrainingArguments, for a launch of `world_size` processes
    that has not started (--dry_run plans for other hardware): our config plus TrainingArguments' own defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    t = cfg.training
    return SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta1=defaults["adam_beta1"],
        adam_beta2=defaults["adam_beta2"], adam_epsilon=defaults["adam_epsilon"], save_on_each_node=False,
        fp16=cfg.model.dtype == "float16", bf16=cfg.model.dtype == "bfloat16", fp16_full_eval=False,
        bf16_full_eval=False, warmup_steps=t.warmup_ratio,
        get_warmup_steps=lambda steps: int(t.warmup_ratio * steps) if t.warmup_ratio < 1 else int(t.warmup_ratio))


def deepspeed_problems(ds_config: dict, args: Any, model_config: Any, steps: int, source: str) -> list[str]:
    """The DeepSpeed config (`source`: its file, or "the generated DeepSpeed config") filled the way the Trainer will
    fill it for these arguments and this model, then parsed by DeepSpeed's own config model: contradictions with
    config.json, unknown keys, values DeepSpeed refuses (an offload device, a batch size that does not add up), and an
    optimizer or scheduler it cannot build. Works on a copy: the run's config is not touched."""
    hf = args.hf_deepspeed_config if isinstance(args, TrainingArguments) else None
    hf = copy.deepcopy(hf) if hf is not None else _processed(copy.deepcopy(ds_config), args)
    try:
        hf.trainer_config_finalize(args, SimpleNamespace(config=model_config), steps)
    except ValueError as e:  # transformers lists each value that contradicts the training arguments
        return [f"{source}: {line.lstrip('- ')} (ds: the DeepSpeed config; hf: what config.json and this launch "
                "give). Set it to \"auto\" so that it follows config.json." for line in str(e).splitlines()
                if line.startswith("- ")] or [f"{source}: {e}"]
    # The batch sizes were matched against this launch's (or the planned) world size just above; DeepSpeed's own
    # check uses the world size of this process group, which --dry_run has not started.
    config = dict(hf.config)
    micro, accumulation = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps", 1)
    if isinstance(micro, int) and isinstance(accumulation, int) and "train_batch_size" in config:
        config["train_batch_size"] = micro * accumulation * (dist.get_world_size() if dist.is_initialized() else 1)
    try:
        parsed = DeepSpeedConfig(config)
    except Exception as e:  # noqa: BLE001 - pydantic, assertion and value errors, each with DeepSpeed's message
        message = " ".join(str(e).split("For further information")[0].split())
        return [f"{source}: DeepSpeed does not accept it: {message[:600]}"]
    problems = []
    name = parsed.optimizer_name
    if name is not None and name not in DEEPSPEED_OPTIMIZERS and getattr(torch.optim, name, None) is None:
        problems.append(f"{source}: optimizer.type {name!r} is neither a DeepSpeed optimizer "
                        f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor one of torch.optim.")
    scheduler = parsed.scheduler_name
    if scheduler is not None and not (hasattr(lr_schedules, scheduler) or hasattr(torch.optim.lr_scheduler,
                                                                                     scheduler)):
        problems.append(f"{source}: scheduler.type {scheduler!r} is neither a DeepSpeed nor a torch scheduler.")
    return problems


def _processed(ds_config: dict, args: Any) -> HfTrainerDeepSpeedConfig:
    hf = HfTrainerDeepSpeedConfig(ds_config)
    hf.trainer_config_process(args)
    return hf


def deepspeed_source(custom: Path | None) -> str:
    return str(custom) if custom is not None else "the generated DeepSpeed config"


def check_before_loading(cfg: Config, ds_config: dict, args: Any, model_config: Any, steps: int,
                         custom: Path | None) -> None:
    """Every check above, reported together before the model loads."""
    problems = (environment_problems(cfg)
                + architecture_problems(cfg, model_config, getattr(args, "hf_deepspeed_config", None))
                + deepspeed_problems(ds_config, args, model_config, steps, deepspeed_source(custom)))
    if problems:
        raise UserError(problems)
