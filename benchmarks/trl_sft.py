"""TRL's SFTTrainer on the same model, data, DeepSpeed config and batch settings as Gemma/train_deepspeed.py.

    .venv/bin/accelerate launch --use_deepspeed --num_processes 2 benchmarks/trl_sft.py \\
        --config CFG.json --deepspeed_config OUR_RUN/deepspeed_config/ds_config_zero3.json --steps 20 --probe_dir DIR \\
        [--lora]

- Data: the examples our script builds (benchmarks/bench_data.py), handed to TRL already tokenized as `input_ids` +
  `completion_mask` (1 on the target and its <end_of_turn>), so TRL trains on exactly the same token sequences with
  completion-only loss (TRL turns the mask into labels -100 on the prompt). TRL's own padded collator.
- DeepSpeed: the ZeRO-3 offload JSON our run wrote (same file, every rank reads it; it exists before launch).
- Same batch size, accumulation, learning rate, schedule, clipping, max_length, bf16, seed; activation checkpointing
  on (use_reentrant=False). Not the same: our script also keeps checkpointed layer inputs in CPU memory
  (save_on_cpu) and computes the LM head only at labelled positions; TRL computes entropy and token accuracy each step.
- CPU-only: the same work-arounds our script applies (finetune.runtime.Runtime.start: gloo process group reused by
  accelerate, bf16 allowed on the CPU, TrainingArguments' accelerator_config.use_configured_state).
- --lora: LoRA through TRL's own path, SFTTrainer(peft_config=...), with the settings of our script's lora section at
  its defaults (finetune.lora): r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", and as
  target_modules one regular expression matching every nn.Linear under model.get_decoder() (for Gemma3ForCausalLM:
  model\\.(?:.*\\.)?(?:down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)), never the LM head. TRL 1.16 itself,
  under ZeRO-3 and unquantized, calls get_peft_model with autocast_adapter_dtype=False (adapters in the model dtype,
  bf16, as ours), switches gradient checkpointing to use_reentrant=True (its work-around for PEFT + ZeRO-3; ours stays
  non-reentrant) and calls enable_input_require_grads().
Rank 0 writes probe_dir/trl_setup.json: trainable / total parameters, the trainable parameters' dtypes, the LoRA
settings and the gradient checkpointing arguments TRL ended up with (benchmarks/speed.py reports them).
Timing: benchmarks/step_probe.py (the same callback and token counts as the run of our script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data  # noqa: E402  (puts Gemma/ on sys.path)
import step_probe  # noqa: E402
from finetune.runtime import Runtime  # noqa: E402

# Our script's lora section defaults (Gemma/finetune/config.py LoraConfig); checked against the measured config.
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32.0, 0.05


def decoder_linear_pattern(model) -> str:
    """Every nn.Linear under the decoder as one regular expression anchored at it (peft re.fullmatch-es a string
    target_modules against each module's full name): what our script's "all-linear" adapts."""
    from torch import nn

    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, nn.Linear)})
    return rf"{re.escape(prefix)}\.(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})"


def lora_config(model, cfg):
    import peft

    ours = getattr(cfg, "lora", None)  # the measured script's defaults, when it has a lora section
    if ours is not None and (ours.r, ours.alpha, ours.dropout, ours.target_modules, ours.use_rslora) != (
            LORA_R, LORA_ALPHA, LORA_DROPOUT, "all-linear", False):
        raise SystemExit(f"trl_sft.py --lora mirrors lora r={LORA_R} alpha={LORA_ALPHA} dropout={LORA_DROPOUT} "
                         f"all-linear; the benchmark config has {ours}")
    return peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                           target_modules=decoder_linear_pattern(model), bias="none", task_type="CAUSAL_LM")


def numel(p) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitioned parameters hold 0 elements locally


def write_setup(path: Path, model, sft_args, peft_config) -> None:
    """What TRL made of the model: trainable parameters, their dtypes, the LoRA and checkpointing settings."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    setup = {"trainable_parameters": sum(map(numel, trainable)), "total_parameters": sum(map(numel, params)),
             "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
             "gradient_checkpointing_kwargs": sft_args.gradient_checkpointing_kwargs,
             "lora": None if peft_config is None else {
                 "r": peft_config.r, "lora_alpha": peft_config.lora_alpha, "lora_dropout": peft_config.lora_dropout,
                 "target_modules": peft_config.target_modules, "bias": peft_config.bias,
                 "adapted_modules": sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(setup, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--deepspeed_config", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--probe_dir", type=Path, required=True)
    p.add_argument("--output_dir", type=Path, default=None, help="Trainer output dir (default: probe_dir/trl_out)")
    p.add_argument("--lora", action="store_true", help="LoRA adapters via SFTTrainer(peft_config=...), as ours")
    args = p.parse_args(argv)

    dtype = bench_data.load_settings(args.config.resolve(), "profile_and_history", [])[0].model.dtype
    runtime = Runtime.start(dtype)  # the process set-up our script does, CPU-only work-arounds included
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    examples, tokenizer, cfg, model_path = bench_data.load_train_examples(args.config)
    t = cfg.training
    train = datasets.Dataset.from_list([
        {"input_ids": e["input_ids"], "completion_mask": [int(x != bench_data.IGNORE_INDEX) for x in e["labels"]]}
        for e in examples])
    sft_args = SFTConfig(
        output_dir=str(args.output_dir or args.probe_dir / "trl_out"),
        deepspeed=str(args.deepspeed_config),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        max_steps=args.steps,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        seed=t.seed,
        data_seed=t.seed,
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        gradient_checkpointing=t.activation_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=t.max_length,
        completion_only_loss=True,
        disable_tqdm=True,
        **runtime.training_arguments(),
    )
    # SFTConfig (with the DeepSpeed config) before from_pretrained: zero.Init builds the model partitioned.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype),
                                                 attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    peft_config = lora_config(model, cfg) if args.lora else None
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train, processing_class=tokenizer,
                         callbacks=step_probe.probe_callbacks(args.probe_dir), peft_config=peft_config)
    if int(os.environ.get("RANK", "0")) == 0:
        write_setup(args.probe_dir / "trl_setup.json", trainer.model, sft_args, peft_config)
    trainer.train()
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
