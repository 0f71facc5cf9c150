"""What a configuration needs per GPU and per node: for --dry_run, and for the generated config's offload "auto".

Estimates, never measurements: the model states follow DeepSpeed's own ZeRO-3 arithmetic
(estimate_zero3_model_states_mem_needs) on exact parameter counts from the model built on the meta device; the
activations are an analytic count, checked against what autograd saves in tests/test_memory_plan.py.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config, DeepSpeedChoices, LoraConfig
from .data import SplitStats
from .gemma import family_of
from .modeling import layer_configs, meta_model, trained_parameters

GIB = 1024**3
GPU_USABLE_FRACTION = 0.9  # headroom for the CUDA context, communication buffers and allocator fragmentation
ZERO3_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory
OFFLOAD_ORDER = [(False, False), (True, False), (False, True), (True, True)]  # fastest first


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
    qk_norm: bool  # Gemma 3 and later normalise queries and keys
    trained_params: int | None = None  # the language model's (towers of multimodal models are frozen); None: all
    active_params: int | None = None  # per token: a mixture of experts runs top_k of its experts; None: all
    # (query width, key/value width, MLP width) of each decoder layer where layers differ (Gemma 4's full-attention
    # layers have a head_dim of their own); None: num_heads x head_dim, num_kv_heads x head_dim, intermediate_size
    layer_dims: list[tuple[int, int, int]] | None = None
    experts_per_token: int = 0  # mixture of experts: top_k experts of moe_intermediate_size each, in every layer
    moe_intermediate_size: int = 0

    @property
    def trained(self) -> int:
        return self.total_params if self.trained_params is None else self.trained_params

    def layers(self) -> list[tuple[int, int, int]]:
        return self.layer_dims or [(self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                    self.intermediate_size)] * self.num_layers


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


def model_shape(config: Any, lora: LoraConfig | None = None) -> ModelShape:
    """Build the model from its config on the meta device: exact counts without memory (Gemma 2 27B: seconds). What
    is trained (the language model, or with LoRA the adapters peft adds, counted by peft on the same model) and, for a
    mixture of experts, what runs per token are counted too. Dimensions are read per layer: Gemma 4's full-attention
    layers have a head_dim and key/value heads of their own."""
    model = meta_model(config)
    if lora is not None and lora.enabled:
        from .lora import add_adapters

        with torch.device("meta"):
            model = add_adapters(model, lora)
    total, largest = count_model_parameters(model)
    trained = ({id(p) for p in model.parameters() if p.requires_grad} if lora is not None and lora.enabled
               else trained_parameters(model))
    family = family_of(config.model_type)
    experts = sum(p.numel() for m in model.modules() if family and type(m).__name__ in family.moe_blocks
                  for p in m.parameters())
    text = config.get_text_config()
    heads, top_k = text.num_attention_heads, getattr(text, "top_k_experts", None) or 0
    layers = [(heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size)
              for c in layer_configs(config)]
    first = layer_configs(config)[0]
    return ModelShape(
        model_type=config.model_type, total_params=total, largest_layer_params=largest,
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, intermediate_size=first.intermediate_size,
        num_heads=heads, num_kv_heads=first.num_key_value_heads, head_dim=first.head_dim, vocab_size=text.vocab_size,
        attn_softcapping=bool(getattr(text, "attn_logit_softcapping", None)),
        final_softcapping=bool(getattr(text, "final_logit_softcapping", None)),
        qk_norm=config.model_type.startswith(("gemma3", "gemma4")),
        trained_params=sum(p.numel() for p in model.parameters() if id(p) in trained),
        active_params=total - experts + experts * top_k // max(1, getattr(text, "num_experts", None) or 1),
        layer_dims=layers if len(set(layers)) > 1 else None,
        experts_per_token=top_k if experts else 0,
        moe_intermediate_size=getattr(text, "moe_intermediate_size", None) or 0,
    )


def model_states_bytes(shape: ModelShape, hw: Hardware, offload_optimizer: bool, offload_params: bool,
                       buffer_factor: float = ZERO3_BUFFER_FACTOR) -> tuple[int, int]:
    """(per GPU, per node of host memory) for ZeRO-3 parameters, gradients and Adam states, with zero.Init: the
    arithmetic of deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs. Per GPU: the largest layer
    gathered (16-bit weights and gradients, 4 bytes each), plus this GPU's shard of the 2-byte parameters unless they
    are offloaded, plus its shard of the 16 bytes/parameter of gradients, fp32 master weights and Adam moments unless
    the optimizer is offloaded. DeepSpeed leaves out parameter-only offload; it follows the same terms here. Only
    trained parameters have gradients and optimizer states: frozen towers cost their 2 bytes per parameter."""
    p, trained, gpus = shape.total_params, shape.trained, hw.gpus_per_node * hw.nodes
    largest = 4 * shape.largest_layer_params
    gpu = largest + int((2 * p * (not offload_params) + 16 * trained * (not offload_optimizer)) / gpus)
    if offload_optimizer or offload_params:
        host = (16 * trained * offload_optimizer + 2 * p * offload_params) / hw.nodes * buffer_factor
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
    h, tokens = shape.hidden_size, batch_size * seq_len

    def per_token(q: int, kv: int, inter: int) -> int:
        n = 4 * 8 * h + 2 * 2 * h + 2 * 2 * (q + kv) + 2 * q + 4 * 2 * inter
        n += 4 * 2 * shape.moe_intermediate_size * shape.experts_per_token  # the experts each token is routed to
        if shape.qk_norm:
            n += 8 * (q + kv)
        if attn == "eager":  # keys and values repeated to every head, then the score-sized tensors
            return n + 2 * 2 * q + shape.num_heads * seq_len * (4 + 2 + 2 * shape.attn_softcapping)
        return n + 2 * 4 * q + 4 * shape.num_heads  # sdpa / flash: q, repeated k and v, output, log-sum-exp

    layers = [tokens * per_token(q, kv, inter) for q, kv, inter in shape.layers()]
    layer = max(layers)  # checkpointing recomputes one layer at a time: the largest
    logit_bytes = 2 + 4 + 4 + 4 * shape.final_softcapping
    logits = supervised_tokens * shape.vocab_size * logit_bytes
    final_norm = tokens * 8 * h
    layer_inputs = shape.num_layers * tokens * 2 * h  # what checkpointing keeps: each decoder layer's input
    if not checkpointing:
        held, host = sum(layers), 0
    elif cpu_checkpointing:
        held, host = 0, layer_inputs  # the inputs wait in host memory
    else:
        held, host = layer_inputs, 0
    held += logits + final_norm  # what autograd holds on the GPU when the forward pass ends
    return {"held_after_forward": held, "gpu": held + layer * checkpointing,  # backward recomputes one layer
            "host": host, "per_layer": layer, "logits": logits,
            "logits_all_positions": tokens * shape.vocab_size * logit_bytes}


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
    padding_free: bool  # the micro-batch is one row of batch_size x seq_len tokens
    options: list[dict]  # one row per offload combination
    offload_optimizer: bool
    offload_params: bool
    reason: str

    def activations(self, cfg: Config, checkpointing: bool, cpu_checkpointing: bool) -> dict[str, int]:
        """activation_bytes for this plan's micro-batch. Padding-free batching runs it as a single row, whose
        eager/sdpa attention spans all batch_size x seq_len tokens."""
        rows, length = (1, self.batch_size * self.seq_len) if self.padding_free else (self.batch_size, self.seq_len)
        return activation_bytes(self.shape, rows, length, self.supervised_tokens, cfg.model.attn_implementation,
                                checkpointing, cpu_checkpointing)


def plan_memory(shape: ModelShape, cfg: Config, hw: Hardware, seq_len: int, supervised_tokens: int,
                padding_free: bool = False) -> MemoryPlan:
    """Estimates for every offload combination at the configured micro-batch, and the "auto" decision."""
    t, ds = cfg.training, cfg.deepspeed
    plan = MemoryPlan(hw, shape, t.batch_size, seq_len, supervised_tokens, padding_free, [], False, False, "")
    act = plan.activations(cfg, t.activation_checkpointing, ds.cpu_checkpointing)
    act_off = plan.activations(cfg, False, False)
    gpu_need, host_need = {}, {}
    for opt, par in OFFLOAD_ORDER:
        gpu, host = model_states_bytes(shape, hw, opt, par)
        gpu_need[(opt, par)] = gpu + act["gpu"]
        host_need[(opt, par)] = host + act["host"] * hw.gpus_per_node
        plan.options.append({
            "offload_optimizer": opt, "offload_params": par, "model_states_gpu": gpu,
            "model_states_host_per_node": host, "activations_gpu": act["gpu"],
            "activations_gpu_without_checkpointing": act_off["gpu"],
            "activations_host_per_node": act["host"] * hw.gpus_per_node,
            "total_gpu": gpu + act["gpu"], "total_host_per_node": host + act["host"] * hw.gpus_per_node,
            "fits_gpu": None if hw.gpu_memory is None else gpu + act["gpu"] <= GPU_USABLE_FRACTION * hw.gpu_memory,
            "fits_host": None if hw.cpu_memory is None else host_need[(opt, par)] <= hw.cpu_memory})
    plan.offload_optimizer, plan.offload_params, plan.reason = choose_offload(
        (ds.offload_optimizer, ds.offload_params), gpu_need, hw.gpu_memory, host_need, hw.cpu_memory)
    return plan


def plan_memory_for_split(shape: ModelShape, cfg: Config, hw: Hardware, stats: SplitStats,
                          padding_free: bool) -> MemoryPlan:
    """The plan for micro-batches of the split that will run: each as long as its longest example (micro-batches are
    padded to their longest), with the longest answer in every row."""
    seq_len = min(cfg.training.max_length, stats.max_tokens)
    supervised = cfg.training.batch_size * stats.max_target_tokens
    return plan_memory(shape, cfg, hw, seq_len, supervised, padding_free)


def resolved_offload(choices: DeepSpeedChoices, plan: MemoryPlan | None) -> DeepSpeedChoices:
    """The config's offload choices with "auto" replaced by the plan's decision (no plan: nothing was "auto")."""
    if plan is None:
        return choices
    return dataclasses.replace(choices, offload_optimizer=plan.offload_optimizer, offload_params=plan.offload_params)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_hardware(gpus_per_node: int | None = None, num_nodes: int | None = None,
                    gpu_memory_gib: float | None = None, cpu_memory_gib: float | None = None) -> Hardware:
    """This launch's GPUs and nodes (from the launcher's environment), or the ones --dry_run was told to plan for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    described = any(x is not None for x in (gpus_per_node, num_nodes, gpu_memory_gib))
    gpu_memory = None
    if gpu_memory_gib is not None:
        gpu_memory = int(gpu_memory_gib * GIB)
    elif not described and torch.cuda.is_available():
        gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    cpu_memory = (int(cpu_memory_gib * GIB) if cpu_memory_gib is not None
                  else None if described else host_memory_bytes())
    return Hardware(
        gpus_per_node=gpus_per_node or local,
        nodes=num_nodes or max(1, world // local),
        gpu_memory=gpu_memory, cpu_memory=cpu_memory,
        source="as described on the command line" if described else "this machine and launch",
    )


def memory_plan_summary(plan: MemoryPlan) -> dict:
    """The plan as results.json and the dry run's plan.json record it."""
    return {"hardware": dataclasses.asdict(plan.hardware), "model": dataclasses.asdict(plan.shape),
            "micro_batch": {"batch_size": plan.batch_size, "seq_len": plan.seq_len,
                            "supervised_tokens": plan.supervised_tokens, "padding_free": plan.padding_free},
            "options": plan.options, "offload_optimizer": plan.offload_optimizer,
            "offload_params": plan.offload_params, "reason": plan.reason, "estimated": True}
