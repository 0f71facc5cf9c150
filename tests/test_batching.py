"""Batching that wastes no compute on padding: padding-free batches give the padded loss, and length grouping keeps
every example while cutting the padding."""

from __future__ import annotations

import pytest
import torch
from conftest import make_records
from finetune.batching import LengthGroupedSampler, SupervisedPositionsCollator, padding_efficiency, use_padding_free
from finetune.config import Config, DataConfig, ModelConfig, PromptConfig, TrainingConfig
from finetune.data import build_split
from finetune.prompts import PromptEncoder


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_free_batch_gives_the_padded_loss_and_gradients(attn, tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # as in training: a KV cache would hide the packing from the attention mask
    encoder = PromptEncoder(tiny_tokenizer, 256)
    features = [encoder.encode(r, PromptConfig(), len(r["history"])) for r in make_records(4, seed=11)]
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) > 1  # padding to do

    padded = SupervisedPositionsCollator(tiny_tokenizer)(features)
    flat = SupervisedPositionsCollator(tiny_tokenizer, padding_free=True)(features)
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    assert flat["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    # The same supervised positions and labels, so the same loss.
    torch.testing.assert_close(flat["shift_labels"], padded["shift_labels"], rtol=0, atol=0)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_loss, padded_grads = loss_and_grads(padded)
    flat_loss, flat_grads = loss_and_grads(flat)
    torch.testing.assert_close(flat_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_padding_free_is_automatic_only_with_flash_attention():
    def cfg(attn: str, padding_free) -> Config:
        return Config(model=ModelConfig("m", attn_implementation=attn), data=DataConfig("t.jsonl"),
                      training=TrainingConfig(padding_free=padding_free))

    assert use_padding_free(cfg("flash_attention_2", "auto"))
    assert not use_padding_free(cfg("eager", "auto")) and not use_padding_free(cfg("sdpa", "auto"))
    assert use_padding_free(cfg("eager", True)) and not use_padding_free(cfg("flash_attention_2", False))


def test_length_grouped_sampler_keeps_every_example_and_cuts_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(40, 400) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, group_size=8, seed=42)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(len(lengths)))  # a permutation: nothing dropped or repeated
    assert list(LengthGroupedSampler(lengths, group_size=8, seed=42)) == epoch0  # every rank draws the same
    sampler.set_epoch(1)
    assert list(sampler) != epoch0  # reshuffled each epoch
    assert lengths[epoch0[0]] == max(lengths)  # the longest batch first: an OOM shows at step 1

    def efficiency(order: list[int], batch: int = 4) -> float:
        return padding_efficiency([[lengths[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)])

    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    assert efficiency(shuffled) < 0.8 < 0.95 <= efficiency(epoch0)


def test_padding_efficiency_counts_real_over_processed_tokens():
    assert padding_efficiency([[10, 10], [4, 2]]) == pytest.approx((20 + 6) / (20 + 8))


def test_every_ablation_is_grouped_into_the_same_batches(tiny_tokenizer, tmp_path):
    """Grouping by the full prompt's length: query_only batches the same examples together as the full prompt, so
    the runs of an ablation study differ only in what the prompt holds."""
    from conftest import write_jsonl

    path = write_jsonl(tmp_path / "train.jsonl", make_records(200, seed=3, max_history=12))
    orders, lengths = {}, {}
    for name, prompt in [("full", PromptConfig()), ("query_only", PromptConfig(False, False))]:
        cfg = Config(model=ModelConfig("m"), data=DataConfig(str(path)), prompt=prompt,
                     training=TrainingConfig(max_length=128))
        split = build_split(path, "train", cfg, PromptEncoder(tiny_tokenizer, 128))
        lengths[name] = [len(e["input_ids"]) for e in split.examples]
        orders[name] = list(LengthGroupedSampler(split.group_lengths, group_size=8, seed=1))
        if name == "full":
            assert split.group_lengths.tolist() == lengths[name]
    assert lengths["query_only"] != lengths["full"]  # the examples themselves differ...
    assert orders["query_only"] == orders["full"]  # ...but they are batched the same way
