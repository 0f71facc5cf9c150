"""LoRA with peft under ZeRO-3: which modules get adapters, wrapping the loaded model, and the merged model of final/.

Adapters go on the language model only: "all-linear" means every linear layer under the model's decoder
(get_decoder(): attention and MLP projections, Gemma 3n/4's per-layer projections), never the vision or audio towers
nor the output head, which Gemma ties to the embedding. peft is given the exact modules as one regular expression
anchored at the decoder, so that a name such as "q_proj" cannot also pick a tower's layer of the same name.

Under ZeRO-3 the base model is partitioned as it loads (zero.Init); the adapters peft adds afterwards are ordinary
parameters that DeepSpeed partitions when its engine starts. Only they reach the optimizer: the base stays in 16-bit
with no gradients and no optimizer states. The Trainer saves the adapter alone (transformers gathers the trainable
parameters only); final/ is the base model with the adapter merged in, built on rank 0 from the files on disk.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import peft
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .config import Config, LoraConfig
from .modeling import attention_implementation, load_model_config, zero3_init_disabled

logger = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Embedding)  # the layer types our adapters are used on (peft supports these and more)


def decoder_prefix(model: Any) -> str:
    """The name of the language model's decoder inside `model` ("model" for Gemma3ForCausalLM,
    "model.language_model" for the multimodal classes)."""
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def adapted_modules(model: Any, lora: LoraConfig) -> dict[str, nn.Module]:
    """The decoder's modules that get adapters, by full name: its linear layers for "all-linear", else those whose
    own name (the last part) is in target_modules."""
    prefix, wanted = decoder_prefix(model), lora.target_modules
    return {f"{prefix}.{name}": module for name, module in model.get_decoder().named_modules()
            if name and (isinstance(module, nn.Linear) if wanted == "all-linear" else name.rsplit(".", 1)[-1] in wanted)}


def saved_modules(model: Any, lora: LoraConfig) -> list[str]:
    """Full names of the decoder modules trained in full beside the adapters (modules_to_save)."""
    prefix = decoder_prefix(model)
    return [f"{prefix}.{name}" for name, _ in model.get_decoder().named_modules()
            if name and any(name == wanted or name.endswith(f".{wanted}") for wanted in lora.modules_to_save)]


def lora_problems(model: Any, lora: LoraConfig) -> list[str]:
    """What target_modules and modules_to_save name that this model does not have, checked on the model built on the
    meta device before the weights load."""
    problems = []
    decoder = model.get_decoder()
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, nn.Linear)})
    if lora.target_modules != "all-linear":
        found = adapted_modules(model, lora)
        for wanted in lora.target_modules:
            kinds = {type(m).__name__ for name, m in found.items() if name.rsplit(".", 1)[-1] == wanted}
            if not kinds:
                problems.append(f"lora.target_modules: {wanted!r} names no module of the language model; its linear "
                                f"layers are {', '.join(linear)} (or use \"all-linear\").")
            elif not all(isinstance(m, ADAPTABLE) for name, m in found.items() if name.rsplit(".", 1)[-1] == wanted):
                problems.append(f"lora.target_modules: {wanted!r} is a {', '.join(sorted(kinds))}, which LoRA "
                                f"cannot adapt; name linear layers ({', '.join(linear)}).")
    saved = saved_modules(model, lora)
    for wanted in lora.modules_to_save:
        if not any(name == wanted or name.endswith(f".{wanted}") for name in saved):
            problems.append(f"lora.modules_to_save: {wanted!r} names no module of the language model.")
    return problems


def peft_config(model: Any, lora: LoraConfig) -> peft.LoraConfig:
    """peft's LoraConfig for `model`: the adapted modules as one regular expression anchored at the decoder (peft
    matches a string target with re.fullmatch), the modules to save by full name."""
    prefix = decoder_prefix(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted_modules(model, lora)})
    pattern = rf"{re.escape(prefix)}\.(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})"
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                           modules_to_save=saved_modules(model, lora) or None, use_rslora=lora.use_rslora,
                           bias="none", task_type="CAUSAL_LM")


def add_adapters(model: Any, lora: LoraConfig) -> peft.PeftModel:
    """The model with LoRA adapters, only they (and modules_to_save) trainable. The adapters take the base model's
    dtype (no float32 upcast): DeepSpeed's bf16 engine keeps its own fp32 master copy of what it trains."""
    return peft.get_peft_model(model, peft_config(model, lora), autocast_adapter_dtype=False)


def merged_model(base_path: str, adapter_dir: str, cfg: Config, hf_deepspeed_config: Any) -> Any:
    """The base model with the trained adapter merged into its weights (peft's merge_and_unload), loaded whole on
    this process's CPU: a plain model that from_pretrained loads, towers included."""
    config = load_model_config(base_path)
    with zero3_init_disabled(hf_deepspeed_config):
        base = AutoModelForCausalLM.from_pretrained(
            base_path, config=config, dtype=getattr(torch, cfg.model.dtype),
            attn_implementation=attention_implementation(config, cfg.model.attn_implementation))
    return peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
