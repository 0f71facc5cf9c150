"""Logits only where the loss is: the collator's LM-head mask gives the standard loss and the same gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_records
from finetune.batching import SupervisedPositionsCollator
from finetune.config import PromptConfig
from finetune.prompts import IGNORE_INDEX, PromptEncoder


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])  # gemma2 adds final-logit soft-capping
def test_supervised_positions_loss_and_gradients_equal_the_standard_ones(arch, tmp_path):
    from tiny_gemma import build_tiny_gemma
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_gemma(tmp_path / arch, arch=arch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    enc = PromptEncoder(tokenizer, 256)
    features = [enc.encode(r, PromptConfig(), len(r["history"])) for r in make_records(3, seed=7)]
    batch = SupervisedPositionsCollator(tokenizer)(features)
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"][:, -1].min() == 0  # right-padded

    # Only the target tokens and their <end_of_turn> are predicted: a handful of positions, not the whole prompt.
    n_supervised = sum(sum(label != IGNORE_INDEX for label in f["labels"]) for f in features)
    assert int(batch["logits_to_keep"].sum()) == n_supervised == batch["shift_labels"].numel()
    assert n_supervised < batch["input_ids"].numel() / 10

    def loss_and_grads(inputs):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    standard = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    std_out, std_grads = loss_and_grads(standard)
    sup_out, sup_grads = loss_and_grads(dict(batch))
    assert std_out.logits.shape[:2] == batch["input_ids"].shape
    assert sup_out.logits.shape == (n_supervised, model.config.vocab_size)
    torch.testing.assert_close(sup_out.loss, std_out.loss, rtol=1e-6, atol=1e-6)
    for name, grad in std_grads.items():  # the tied embedding's gradient included
        torch.testing.assert_close(sup_grads[name], grad, rtol=1e-4, atol=1e-6)
    # With the Trainer's num_items_in_batch (gradient accumulation), the sums agree too.
    n = torch.tensor(n_supervised * 2)
    torch.testing.assert_close(model(**batch, num_items_in_batch=n).loss,
                               model(**standard, num_items_in_batch=n).loss, rtol=1e-6, atol=1e-6)


def test_supervised_positions_loss_and_gradients_under_zero3(tiny_model):
    """The same check through a real ZeRO-3 engine with the model partitioned by zero.Init (tied embedding included)."""
    import json
    import subprocess
    import sys

    from conftest import REPO, script_env

    proc = subprocess.run([sys.executable, str(REPO / "tests" / "zero3_supervised_loss.py"), str(tiny_model), "29571"],
                          env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["partitioned"]
    assert result["supervised"]["logit_rows"] == result["supervised_positions"] < result["standard"]["logit_rows"] / 10
    assert abs(result["supervised"]["loss"] - result["standard"]["loss"]) < 1e-5
    assert "model.embed_tokens.weight" in result["grad_names"]  # the tied LM head's gradient lands here
    assert result["max_relative_grad_diff"] < 1e-4
