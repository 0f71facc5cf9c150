"""Run by tests/test_supervised_logits.py in a fresh process (a one-rank gloo group must not leak into pytest):
the same batch through a real ZeRO-3 DeepSpeed engine (model partitioned by zero.Init, fp32) with full logits and
with the collator's supervised-positions mask; prints both losses and the largest gradient difference as JSON.

    python tests/zero3_supervised_loss.py MODEL_DIR PORT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "Gemma"), str(HERE)]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                  LOCAL_WORLD_SIZE="1")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from conftest import make_records  # noqa: E402
from finetune.batching import SupervisedPositionsCollator  # noqa: E402
from finetune.config import PromptConfig  # noqa: E402
from finetune.deepspeed_ops import use_environment_cache  # noqa: E402
from finetune.prompts import PromptEncoder  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402


def main() -> None:
    model_dir = sys.argv[1]
    use_environment_cache()  # DeepSpeed's ops as setup.sh built them
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
                 "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (while it lives, from_pretrained partitions the model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    partitioned = all(p.numel() == 0 and hasattr(p, "ds_shape") for p in model.parameters())
    # SGD with lr 0: engine.step() clears the gradients and leaves the weights as they were.
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=ds_config)
    encoder = PromptEncoder(tokenizer, 256)
    features = [encoder.encode(r, PromptConfig(), len(r["history"])) for r in make_records(3, seed=7)]
    batch = SupervisedPositionsCollator(tokenizer)(features)
    standard = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    results, grads = {}, {}
    for name, inputs in (("standard", standard), ("supervised", dict(batch))):
        out = engine(**inputs)
        engine.backward(out.loss)
        grads[name] = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()
        results[name] = {"loss": out.loss.item(), "logit_rows": out.logits.reshape(-1, out.logits.shape[-1]).shape[0]}
    diffs = {n: ((grads["supervised"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
             for n, g in grads["standard"].items()}
    print(json.dumps({**results, "partitioned": partitioned, "max_relative_grad_diff": max(diffs.values()),
                      "grad_names": sorted(diffs), "supervised_positions": int(batch["logits_to_keep"].sum())}))


if __name__ == "__main__":
    main()
