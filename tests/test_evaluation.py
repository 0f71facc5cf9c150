"""The test-set evaluation's building blocks: per-example target losses without a KV cache, and finding the
validation metrics of the last step in the Trainer's log."""

from __future__ import annotations

import pytest
import torch
from conftest import make_records
from finetune.batching import SupervisedPositionsCollator
from finetune.config import PromptConfig
from finetune.evaluation import target_losses
from finetune.prompts import IGNORE_INDEX, PromptEncoder
from finetune.trainer import evaluation_at


def test_target_losses_are_per_example_means_and_build_no_kv_cache(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.config.use_cache = True  # as after saving final/: the test-loss forward must still build no cache
    features = [PromptEncoder(tiny_tokenizer, 256).encode(r, PromptConfig(), len(r["history"]))
                for r in make_records(3, seed=9)]
    batch = SupervisedPositionsCollator(tiny_tokenizer)(features)
    caches = []
    handle = model.register_forward_hook(lambda module, args, kwargs, output: caches.append(output.past_key_values),
                                         with_kwargs=True)
    with torch.no_grad():
        losses, counts = target_losses(model, batch)
    handle.remove()
    assert caches == [None]
    for i, feature in enumerate(features):  # each row's mean NLL over its own target tokens, computed plainly
        labels = torch.tensor([feature["labels"]])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([feature["input_ids"]]), use_cache=False).logits[0, :-1]
        expected = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX)
        assert losses[i].item() == pytest.approx(expected.item(), rel=1e-5)
        assert counts[i] == sum(label != IGNORE_INDEX for label in feature["labels"])


def test_the_final_evaluation_is_found_wherever_the_log_puts_it():
    history = [{"loss": 2.0, "step": 5}, {"eval_loss": 1.5, "eval_runtime": 1.0, "epoch": 0.5, "step": 6},
               {"loss": 1.4, "step": 10}, {"eval_loss": 1.1, "eval_runtime": 1.0, "epoch": 1.0, "step": 12},
               {"loss": 1.0, "step": 12}, {"train_runtime": 30.0, "train_loss": 1.5, "step": 12}]
    # Not the second-to-last entry: a logging step can follow the evaluation of the last step.
    assert evaluation_at(history, 12) == {"eval_loss": 1.1, "eval_runtime": 1.0, "epoch": 1.0}
    assert evaluation_at(history, 6)["eval_loss"] == 1.5
    assert evaluation_at(history[:3] + history[4:], 12) is None  # no evaluation at the last step: evaluate again
