"""--dry_run's report: everything a run checks and builds before the model loads, plus the memory plan, as Markdown
(printed and saved to <output_dir>/dry_run/ with plan.json, resolved_config.json and the DeepSpeed JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config, LoraConfig, PromptConfig
from .data import Split
from .memory_plan import GIB, GPU_USABLE_FRACTION, ZERO3_BUFFER_FACTOR, MemoryPlan
from .prompts import SECTIONS, PromptEncoder, included, render_user_message, shown_fields


def first_example(encoder: PromptEncoder, train: Split, cfg: Config) -> dict:
    """The first training example as the run builds it: its prompt, answer and tokens by section."""
    record, history_items = train.first_record, train.first_history_items
    return {"sections": encoder.section_lengths(record, cfg.prompt, history_items),
            "prompt": encoder.prompt_text(render_user_message(record, cfg.prompt, history_items)),
            "target": record["target"].strip()}


def _prompt_settings(prompt: PromptConfig) -> str:
    """One sentence: what this run's prompt shows of each section, and whether it has an instruction."""
    shown = []
    for section in SECTIONS:
        fields = shown_fields(prompt, section)
        attributes = "all attributes" if fields is None else "attributes " + ", ".join(fields)
        if section.is_list and prompt.history_selection == "bm25":
            attributes += ", the items most relevant to the query (BM25) when not all are kept"
        shown.append(f"{section.name} {'shown, ' + attributes if included(prompt, section) else 'left out'}")
    instruction = "an instruction" if prompt.instruction else "no instruction"
    return f"This ablation's prompt: {instruction}; {'; '.join(shown)}."


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


def _model_section(model_path: str, mp: MemoryPlan, lora: LoraConfig) -> list[str]:
    shape = mp.shape
    frozen = shape.total_params - shape.trained
    if lora.enabled:
        parts = [f"{shape.trained:,} trained (LoRA adapters, r={lora.r}), {frozen:,} frozen (the base model, in "
                 "16-bit, with no gradients and no optimizer states)"]
    else:
        parts = [f"{shape.trained:,} trained (the language model), {frozen:,} frozen (vision / audio towers and "
                 "projectors: no gradients, no optimizer states)" if frozen else "all trained"]
    if shape.active_params is not None and shape.active_params < shape.total_params:
        parts.append(f"{shape.active_params:,} active per token (mixture of experts: {shape.experts_per_token} "
                     "experts per token; the states of all experts are counted)")
    head_dims = sorted({q // shape.num_heads for q, _, _ in shape.layers()})
    return ["## Model", "",
            f"{_shown(model_path)} ({shape.model_type}): {shape.total_params:,} parameters ({'; '.join(parts)}), "
            f"largest layer {shape.largest_layer_params:,}; {shape.num_layers} layers, hidden {shape.hidden_size}, "
            f"MLP {shape.intermediate_size}, {shape.num_heads} heads ({shape.num_kv_heads} key/value) of "
            f"{' / '.join(map(str, head_dims))}, vocabulary {shape.vocab_size:,}. Counted from the model built on "
            "the meta device (no weights read).", ""]


def _data_section(cfg: Config, splits: dict[str, Split], padding: dict[str, float]) -> list[str]:
    lines = ["## Data", ""]
    lines += _markdown_table(
        ["split", "records", "examples", "dropped (too long)", "history shortened", "tokens p50", "p95", "max",
         "answer tokens max"],
        [[name, s.stats.records, s.stats.examples, s.stats.dropped_too_long, s.stats.history_shortened,
          s.stats.p50_tokens, s.stats.p95_tokens, s.stats.max_tokens, s.stats.max_target_tokens]
         for name, s in splits.items()])
    return lines + ["", f"Tokens per example include the prompt and the answer (max_length "
                    f"{cfg.training.max_length}; over-long examples lose their oldest history items first). Padding "
                    "efficiency of the first epoch's training micro-batches (real tokens / tokens processed): "
                    f"{padding['grouped']:.3f} grouped by length, {padding['random']:.3f} in random order; "
                    "padding-free batching processes no padding.", ""]


def _memory_section(cfg: Config, mp: MemoryPlan, custom_deepspeed: bool) -> list[str]:
    hw, t = mp.hardware, cfg.training
    lines = ["## Memory per GPU and per node (estimated, not measured)", "",
             f"Hardware ({hw.source}): {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s), "
             f"{_gib(hw.gpu_memory) if hw.gpu_memory else 'GPU memory unknown'} per GPU, "
             f"{_gib(hw.cpu_memory) if hw.cpu_memory else 'host memory unknown'} per node. Micro-batch "
             f"{mp.batch_size} x {mp.seq_len} tokens (the longest training example"
             f"{', as one padding-free row' if mp.padding_free else ''}), {mp.supervised_tokens} supervised "
             "positions.", ""]
    rows = []
    for r in mp.options:
        fits = "?" if r["fits_gpu"] is None else "yes" if r["fits_gpu"] else "**no**"
        host = _gib(r["total_host_per_node"]) + (" (**too much**)" if r["fits_host"] is False else "")
        rows.append([_yes_no(r["offload_optimizer"]), _yes_no(r["offload_params"]), _gib(r["model_states_gpu"]),
                     _gib(r["activations_gpu"]), _gib(r["total_gpu"]), fits, host])
    lines += _markdown_table(["offload optimizer", "offload params", "model states / GPU", "activations / GPU",
                              "total / GPU", f"fits {GPU_USABLE_FRACTION:.0%} of GPU", "host / node"], rows)
    first, with_checkpointing = mp.options[0], mp.activations(cfg, True, False)
    lines += ["", f"Activations per GPU for this micro-batch ({cfg.model.attn_implementation} attention): "
              f"{_gib(first['activations_gpu_without_checkpointing'])} without activation checkpointing, "
              f"{_gib(with_checkpointing['gpu'])} with it, {_gib(first['activations_gpu'])} as configured "
              f"(activation_checkpointing {str(t.activation_checkpointing).lower()}, cpu_checkpointing "
              f"{str(cfg.deepspeed.cpu_checkpointing).lower()}). Logits only at the supervised positions: "
              f"{_gib(with_checkpointing['logits'])}; at every position they would take "
              f"{_gib(with_checkpointing['logits_all_positions'])}.", "",
              "Model states: DeepSpeed's ZeRO-3 arithmetic (estimate_zero3_model_states_mem_needs, zero.Init, host "
              f"buffer factor {ZERO3_BUFFER_FACTOR}). Activations: an analytic count of what autograd keeps (see "
              "memory_plan.activation_bytes). Not included: the CUDA context and communication buffers (hence the "
              f"{GPU_USABLE_FRACTION:.0%} rule), evaluation and generation.", ""]
    ds = cfg.deepspeed
    wanted = f"offload_optimizer {json.dumps(ds.offload_optimizer)}, offload_params {json.dumps(ds.offload_params)}"
    if custom_deepspeed:
        return lines + ["Decision: none (--deepspeed_config given: its offload settings apply).", ""]
    return lines + [f"Decision ({wanted}): offload optimizer {_yes_no(mp.offload_optimizer)}, parameters "
                    f"{_yes_no(mp.offload_params)}: {mp.reason}.", ""]


def dry_run_report(cfg: Config, config_name: str, ablation_name: str, model_path: str, splits: dict[str, Split],
                   example: dict, mp: MemoryPlan, ds_config: dict, resolved: dict, padding: dict[str, float],
                   custom_deepspeed: bool) -> str:
    t, hw = cfg.training, mp.hardware
    gpus = hw.gpus_per_node * hw.nodes
    lines = [f"# Dry run: {config_name}, ablation {ablation_name} (nothing was trained)", ""]
    lines += _model_section(model_path, mp, cfg.lora)
    lines += _data_section(cfg, splits, padding)
    lines += ["## Batch", "",
              f"Effective global batch {t.global_batch(gpus)} = batch_size {t.batch_size} x "
              f"gradient_accumulation_steps {t.gradient_accumulation_steps} x {gpus} GPUs ({hw.gpus_per_node} per "
              f"node x {hw.nodes} nodes).", ""]
    sections = example["sections"]
    lines += [f"## One example (first training record, ablation {ablation_name})", ""]
    lines += _markdown_table([*sections, "total"], [[*sections.values(), sum(sections.values())]])
    lines += ["", _prompt_settings(cfg.prompt), "",
              "Prompt (the model's input) and answer (the only supervised tokens):", "", "```text",
              example["prompt"], "```", "", "```text", example["target"], "```", ""]
    lines += _memory_section(cfg, mp, custom_deepspeed)
    lines += ["## DeepSpeed config", "", "```json", json.dumps(ds_config, indent=2), "```", "",
              "## Resolved config", "", "```json", json.dumps(resolved, indent=2), "```", ""]
    return "\n".join(lines)
