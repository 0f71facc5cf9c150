"""TRL's SFTTrainer on the same model, data, DeepSpeed config and batch settings as Gemma/train_deepspeed.py.

    .venv/bin/accelerate launch --use_deepspeed --num_processes 2 benchmarks/trl_sft.py \\
        --config CFG.json --deepspeed_config OUR_RUN/deepspeed_config/ds_config_zero3.json --steps 20 --probe_dir DIR

- Data: the examples our script builds (benchmarks/bench_data.py), handed to TRL already tokenized as `input_ids` +
  `completion_mask` (1 on the target and its <end_of_turn>), so TRL trains on exactly the same token sequences with
  completion-only loss (TRL turns the mask into labels -100 on the prompt). TRL's own padded collator.
- DeepSpeed: the ZeRO-3 offload JSON our run wrote (same file, every rank reads it; it exists before launch).
- Same batch size, accumulation, learning rate, schedule, clipping, max_length, bf16, seed; activation checkpointing
  on (use_reentrant=False). Not the same: our script also keeps checkpointed layer inputs in CPU memory
  (save_on_cpu) and computes the LM head only at labelled positions; TRL computes entropy and token accuracy each step.
- CPU-only: the same work-arounds our script applies (finetune.runtime.Runtime.start: gloo process group reused by
  accelerate, bf16 allowed on the CPU, TrainingArguments' accelerator_config.use_configured_state).
Timing: benchmarks/step_probe.py (the same callback and token counts as the run of our script).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data  # noqa: E402  (puts Gemma/ on sys.path)
import step_probe  # noqa: E402
from finetune.runtime import Runtime  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--deepspeed_config", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--probe_dir", type=Path, required=True)
    p.add_argument("--output_dir", type=Path, default=None, help="Trainer output dir (default: probe_dir/trl_out)")
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
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train, processing_class=tokenizer,
                         callbacks=step_probe.probe_callbacks(args.probe_dir))
    trainer.train()
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
