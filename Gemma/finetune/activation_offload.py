"""Activation checkpointing with CPU offload: what the DeepSpeed JSON's cpu_checkpointing asks for, made real for
transformers' models (which ignore that section): each checkpointed decoder layer keeps what it saves for backward,
its inputs, in CPU memory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

logger = logging.getLogger(__name__)


@dataclass
class OffloadStats:
    tensors: int = 0
    bytes: int = 0


class CpuOffloadedCheckpoint:
    """A checkpoint function for transformers' decoder layers: PyTorch's save_on_cpu around each checkpointed layer
    call, counting what it moves.

    Not around the whole forward (that would also ship the logits to the host), and not transformers'
    activation_checkpointing_kwargs={"offload": True}, which always pins memory and so fails without CUDA."""

    def __init__(self, stats: OffloadStats):
        self.stats = stats
        self.pin = torch.cuda.is_available()

    def __call__(self, function, *args, **kwargs):
        hooks = torch.autograd.graph.save_on_cpu(pin_memory=self.pin)
        pack = hooks.pack_hook

        def counting_pack(tensor):
            self.stats.tensors += 1
            self.stats.bytes += tensor.numel() * tensor.element_size()
            return pack(tensor)

        hooks.pack_hook = counting_pack
        with hooks:
            return checkpoint(function, *args, use_reentrant=False, **kwargs)


def install_cpu_offloaded_checkpointing(model: Any, stats: OffloadStats) -> int:
    """Swap the checkpoint function of every checkpointed layer; returns how many layers use it."""
    model = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    offloaded = CpuOffloadedCheckpoint(stats)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._gradient_checkpointing_func = offloaded
    return len(layers)


class ActivationOffloadCallback(TrainerCallback):
    """Installs the CPU-offloaded checkpoint function when training begins: the Trainer (re-)enables checkpointing
    inside train(), which would undo a swap made before it."""

    def __init__(self):
        self.stats = OffloadStats()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        n = install_cpu_offloaded_checkpointing(model, self.stats)
        logger.info("Activation checkpointing: %d layers keep their saved inputs in CPU memory.", n)


def activation_offload_for(activation_checkpointing: bool, cpu_checkpointing: bool) -> ActivationOffloadCallback | None:
    """The callback when the DeepSpeed config asks for CPU checkpointing and there is checkpointing to offload."""
    if activation_checkpointing and cpu_checkpointing:
        return ActivationOffloadCallback()
    if cpu_checkpointing:
        logger.warning("cpu_checkpointing is on but training.activation_checkpointing is false: nothing to offload.")
    return None
