"""Benchmark (not a test): what applying the LM head only at the supervised positions saves, on the real model.

    .venv/bin/python benchmarks/lm_head.py [--repeats 7] [--batch_size 4] [--threads 2]

One process, the real Gemma 3 270M in bf16 (Gemma/models/gemma-3-270m, from setup.sh), a micro-batch of the demo's
training examples encoded by train_deepspeed.py (prompt + answer, labels on the answer only). Each repeat times one
forward + backward with the standard full-sequence logits and one with the collator's `logits_to_keep` mask and
`shift_labels`, alternating which goes first; the medians and the ratio are printed and written to
benchmarks/results/lm_head.md. Also: the size of the logits tensor in each case and the loss (equal to float
tolerance; tests/test_supervised_logits.py checks loss and gradients exactly on tiny models, also under ZeRO-3).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "Gemma"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", type=Path, default=REPO / "Gemma" / "models" / "gemma-3-270m")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "lm_head.md")
    args = p.parse_args(argv)

    import torch
    from finetune.batching import SupervisedPositionsCollator
    from finetune.config import FieldNames, PromptConfig
    from finetune.records import read_records
    from finetune.prompts import PromptEncoder, load_tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(args.model))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="eager")
    model.config.use_cache = False
    model.train()
    encoder = PromptEncoder(tokenizer, 256)
    records = read_records(REPO / "Gemma" / "data" / "demo" / "train.jsonl", FieldNames())[:args.batch_size]
    features = [encoder.encode(r, PromptConfig(), len(r["history"])) for r in records]
    batch = SupervisedPositionsCollator(tokenizer)(features)
    variants = {"all positions": {k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                "supervised positions": dict(batch)}

    def step(inputs: dict) -> tuple[float, float, tuple]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(**inputs)
        out.loss.backward()
        return time.perf_counter() - start, out.loss.item(), tuple(out.logits.shape)

    for inputs in variants.values():  # warm-up
        step(inputs)
    times: dict[str, list[float]] = {name: [] for name in variants}
    facts = {}
    for r in range(args.repeats):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in names:
            seconds, loss, shape = step(variants[name])
            times[name].append(seconds)
            facts[name] = (loss, shape)

    tokens = int(batch["attention_mask"].sum())
    rows = []
    for name in variants:
        loss, shape = facts[name]
        logits_mb = torch.Size(shape).numel() * 2 / 1e6
        rows.append(f"| {name} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f}-{max(times[name]):.3f} "
                    f"| {' x '.join(map(str, shape))} ({logits_mb:.0f} MB bf16) | {loss:.4f} |")
    ratio = statistics.median(times["all positions"]) / statistics.median(times["supervised positions"])
    report = "\n".join([
        "# LM head only at the supervised positions (Gemma 3 270M, CPU)",
        "",
        f"Measured {dt.date.today()} on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
        f"{args.threads} threads), one process, bf16, eager attention, micro-batch of {args.batch_size} demo examples "
        f"({batch['input_ids'].shape[1]} tokens padded, {tokens} real, "
        f"{int(batch['logits_to_keep'].sum())} supervised), {args.repeats} repeats (alternating order), with "
        f"`.venv/bin/python benchmarks/lm_head.py --repeats {args.repeats} --batch_size {args.batch_size} "
        f"--threads {args.threads}`.",
        "",
        "| logits at | forward + backward, median (s) | min-max (s) | logits shape | loss |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Speed-up of a forward + backward: {ratio:.2f}x.",
        "",
    ])
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(report, encoding="utf-8")
    tmp.replace(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
