"""The floor for benchmarks/speed.py: a bare PyTorch training loop on the same model, data and batch size.

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/bare_loop.py --config CFG.json --steps 20 --probe_dir DIR

2 processes, torch.distributed gloo + DistributedDataParallel (gradients all-reduced every step). The model is loaded
with from_pretrained in the config's dtype (bf16: weights, gradients and AdamW states all bf16, no fp32 master copy),
torch.optim.AdamW with the config's learning rate and weight decay, gradient clipping at training.max_grad_norm. No
ZeRO, no offload, no activation checkpointing, no scheduler: forward + backward + clip + step, nothing else. The
batches are the examples Gemma/train_deepspeed.py builds (benchmarks/bench_data.py), right-padded, labels -100 on the
prompt, shuffled with a fixed seed; rank r takes every world_size-th batch. The loss is the model's own full-sequence
loss (our script computes the LM head only at labelled positions: the same loss, a little less work).
Each rank writes probe_rank<R>.json (benchmarks/step_probe.py's format).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import IGNORE_INDEX, load_train_examples  # noqa: E402
from step_probe import write_probe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--probe_dir", type=Path, required=True)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    examples, tokenizer, cfg, model_path = load_train_examples(args.config)
    t = cfg.training
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype),
                                                 attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    model.train()
    ddp = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)

    # Right-padded batches with -100 labels on the padding, as our collator pads (without its LM-head mask).
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(t.seed)).tolist()
    bs = t.batch_size
    ends, begins, real, processed = [], [], [], []
    for step in range(args.steps):
        start = ((step * world + rank) * bs) % (len(order) - bs + 1)
        batch = pad([examples[i] for i in order[start:start + bs]])
        begins.append(time.perf_counter())
        loss = ddp(**batch).loss
        loss.backward()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
        real.append(int(batch["attention_mask"].sum()))
        processed.append(batch["input_ids"].numel())
    write_probe(args.probe_dir, rank, step_ends=ends, step_begins=begins, real_tokens=real,
                processed_tokens=processed, extra={"last_loss": float(loss.detach())})
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
