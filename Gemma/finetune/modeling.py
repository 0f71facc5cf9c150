"""The model: its config, how it loads, and what of it is trained.

Multimodal Gemmas (Gemma 3 4B-27B, Gemma 3n, Gemma 4 with towers) load through AutoModelForCausalLM as their
...ForConditionalGeneration class, towers included (loading the text model class from such a checkpoint would silently
initialise its weights at random). Training is text-only, so everything outside the language model (vision and
audio towers, their projectors and embedders) is frozen: no gradients, no optimizer states, unchanged in final/,
which stays the multimodal model from_pretrained and the image/audio processors expect. Mixture-of-experts blocks
are made ZeRO-3 leaves, fetched whole, so that ranks routing tokens to different experts still gather the same
parameters.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import torch
from deepspeed.utils import set_z3_leaf_modules
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from .config import Config
from .errors import UserError
from .gemma import family_of, gemma_problem
from .prompts import load_pretrained

logger = logging.getLogger(__name__)


def load_model_config(path: str) -> PretrainedConfig:
    """The model's config, which must be a Gemma's (a local directory was checked before; a hub id is checked here)."""
    config = load_pretrained(AutoConfig, path, "model.model_name_or_path")
    problem = gemma_problem(config.model_type, path, getattr(config, "architectures", None))
    if problem:
        raise UserError(problem)
    return config


def hidden_size(config: PretrainedConfig) -> int:
    """The text decoder's hidden size, wherever the config keeps it (multimodal Gemma 3 4B+: in text_config)."""
    size = getattr(config.get_text_config(), "hidden_size", None)
    if size is None:
        raise UserError("the model config has no hidden_size (top level or text_config); pass --deepspeed_config "
                        "with explicit reduce_bucket_size / stage3_prefetch_bucket_size values.")
    return size


def layer_configs(config: PretrainedConfig) -> list[Any]:
    """The text decoder's config of each layer: transformers' per-layer view where a model has one (Gemma 4's
    full-attention layers have a head_dim of their own), else the text config for every layer."""
    text = config.get_text_config()
    view = getattr(text, "per_layer_config", None)
    return [view[i] for i in range(text.num_hidden_layers)] if view is not None else [text] * text.num_hidden_layers


def attention_implementation(config: PretrainedConfig, choice: str) -> str | dict[str, str]:
    """model.attn_implementation for the language model; a multimodal model's towers, frozen and never run on text,
    keep eager attention, which every tower supports (Gemma 4's audio tower refuses sdpa)."""
    towers = [name for name in getattr(config, "sub_configs", {}) if name != "text_config"]
    return {"text_config": choice, **{name: "eager" for name in towers}} if towers else choice


@contextmanager
def zero3_init_disabled(hf_deepspeed_config: Any = None):
    """Builds models whole in this process: while a ZeRO-3 TrainingArguments exists (its hf_deepspeed_config),
    transformers builds every model partitioned (zero.Init, a collective), which a model on the meta device or a
    rank-0-only load must not be."""
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if hf_deepspeed_config is not None:
            set_hf_deepspeed_config(hf_deepspeed_config)


def meta_model(config: PretrainedConfig, hf_deepspeed_config: Any = None) -> Any:
    """The model built from its config on the meta device: every module and exact shapes, no memory, no weights."""
    with zero3_init_disabled(hf_deepspeed_config), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention_implementation(config, "eager"))


def trained_parameters(model: Any) -> set[int]:
    """The ids of the parameters text training updates: the language model (get_decoder(): embeddings and decoder
    layers) and the output head (tied to the embeddings in Gemma). For a text-only model, all of them."""
    trained = {id(p) for p in model.get_decoder().parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        trained |= {id(p) for p in head.parameters()}
    return trained


def numel(parameter: Any) -> int:
    return getattr(parameter, "ds_numel", None) or parameter.numel()  # a ZeRO-3 partition holds a slice


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameters trained (requires_grad: the language model, or the LoRA adapters) and frozen, and their total (tied
    weights counted once)."""
    counts = {"trained": 0, "frozen": 0}
    for p in model.parameters():
        counts["trained" if p.requires_grad else "frozen"] += numel(p)
    return {**counts, "total": counts["trained"] + counts["frozen"]}


def load_model(path: str, cfg: Config) -> Any:
    """The model in cfg.model.dtype (partitioned as it loads when ZeRO-3's TrainingArguments exist), ready for text
    training: the KV cache off, what is not the language model frozen, mixture-of-experts blocks as ZeRO-3 leaves,
    and with lora.enabled the peft model whose adapters alone are trained."""
    config = load_model_config(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=getattr(torch, cfg.model.dtype),
        attn_implementation=attention_implementation(config, cfg.model.attn_implementation),
    )
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    trained = trained_parameters(model)
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    counts = parameter_counts(model)
    if counts["frozen"]:
        logger.info("Text-only training: %d parameters of the language model are trained, %d of the towers and "
                    "projectors are frozen.", counts["trained"], counts["frozen"])
    family = family_of(model.config.model_type)
    if family is not None and family.moe_blocks:
        leaves = set_z3_leaf_modules(model, list(family.moe_blocks), raise_if_not_found=False)
        if leaves:
            logger.info("Mixture of experts: %d expert blocks are ZeRO-3 leaves (fetched whole).", len(leaves))
    if cfg.lora.enabled:
        from .lora import add_adapters  # peft: imported only by runs that use it

        model = add_adapters(model, cfg.lora)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info("LoRA (r=%d, alpha=%g): %d of %d parameters are trained (%.2f%%), the base model is frozen.",
                    cfg.lora.r, cfg.lora.alpha, trainable, total, 100 * trainable / total)
    return model
