"""The generated ZeRO-3 config, the user's own config checked against config.json, and CPU activation offload."""

from __future__ import annotations

import json

import pytest
import torch
from finetune.activation_offload import OffloadStats, install_cpu_offloaded_checkpointing
from finetune.config import Config, DataConfig, DeepSpeedChoices, ModelConfig, PromptConfig, TrainingConfig
from finetune.deepspeed_config import (MIN_REDUCE_BUCKET, bucket_sizes, check_custom_deepspeed_config,
                                       generate_deepspeed_config, load_custom_deepspeed_config)
from finetune.errors import UserError
from finetune.prompts import PromptEncoder
from finetune.modeling import hidden_size


def make_config(**training) -> Config:
    return Config(model=ModelConfig("x"), data=DataConfig("t.jsonl"),
                  training=TrainingConfig(**training))


def test_generated_config_is_zero3_with_offload_and_auto_values():
    ds = generate_deepspeed_config(DeepSpeedChoices(), "bfloat16", 640)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # transformers' "auto" formulas from hidden_size, with a floor on the gradient reduce bucket
    assert zero["reduce_bucket_size"] == MIN_REDUCE_BUCKET > 640 * 640
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 640 * 640)
    assert zero["stage3_param_persistence_threshold"] == 6400
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["activation_checkpointing"]["cpu_checkpointing"] is True
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert set(ds["optimizer"]["params"].values()) == {"auto"}
    # No scheduler block: the Trainer's lr_scheduler_type from config.json must stay in charge.
    assert "scheduler" not in ds
    json.dumps(ds)  # serialisable as written to ds_config_zero3.json


def test_generated_config_follows_the_choices():
    choices = DeepSpeedChoices(offload_optimizer=False, offload_params=True, pin_memory=False,
                               cpu_checkpointing=False)
    ds = generate_deepspeed_config(choices, "float32", 64)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "none"}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["activation_checkpointing"]["cpu_checkpointing"] is False


def test_bucket_sizes_follow_the_hidden_size_wherever_the_config_keeps_it():
    # Gemma 3 4B+ (multimodal) keeps hidden_size in text_config; Gemma 2 27B's h² is above the reduce-bucket floor.
    from transformers import Gemma3Config, PretrainedConfig

    sizes = bucket_sizes(hidden_size(Gemma3Config(text_config={"hidden_size": 2560})))
    assert sizes == {"reduce_bucket_size": MIN_REDUCE_BUCKET, "stage3_prefetch_bucket_size": int(0.9 * 2560 * 2560),
                     "stage3_param_persistence_threshold": 25600}
    assert bucket_sizes(hidden_size(PretrainedConfig(hidden_size=8192)))["reduce_bucket_size"] == 8192 * 8192
    with pytest.raises(UserError, match="no hidden_size"):
        hidden_size(PretrainedConfig())


def test_custom_config_conflicts_name_both_values_and_the_fix(tmp_path):
    cfg = make_config(batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-4)
    path = tmp_path / "ds.json"
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 12,
          "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}, "optimizer": {"params": {"lr": 3e-4}}}
    problems = "\n".join(check_custom_deepspeed_config(ds, path, cfg))
    assert "train_micro_batch_size_per_gpu is 8 but config.json training.batch_size gives 4" in problems
    assert 'Set it to "auto"' in problems
    assert "train_batch_size 12 is not a multiple" in problems
    assert "zero_optimization.stage is 2" in problems
    assert "bf16.enabled is false but config.json model.dtype is bfloat16" in problems
    assert "optimizer.params.lr is 0.0003" in problems
    assert "gradient_accumulation_steps" not in problems.replace("x gradient_accumulation_steps", "")
    zero3 = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    ok = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero3, "bf16": {"enabled": "auto"}}
    assert check_custom_deepspeed_config(ok, path, cfg) == []
    agreeing = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 16, "zero_optimization": zero3,
                "bf16": {"enabled": True}}
    assert check_custom_deepspeed_config(agreeing, path, cfg) == []


def test_custom_config_structure_problems(tmp_path):
    path, cfg = tmp_path / "ds.json", make_config()
    assert check_custom_deepspeed_config({"bf16": True, "zero_optimization": {"stage": 3}}, path, cfg) == [
        f"{path}: bf16 must be an object, got true."]
    problems = "\n".join(check_custom_deepspeed_config({"zero_optimization": {"stage": 3}}, path, cfg))
    assert "stage3_gather_16bit_weights_on_model_save must be true" in problems
    assert 'has no bf16 section but config.json model.dtype is bfloat16' in problems


def test_custom_config_json_errors_name_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 3,}\n}')
    with pytest.raises(UserError, match=r"ds.json: invalid JSON at line 2, column 36"):
        load_custom_deepspeed_config(path, make_config())
    with pytest.raises(UserError, match="DeepSpeed config not found"):
        load_custom_deepspeed_config(tmp_path / "missing.json", make_config())


def _loss_and_grads(model, batch, checkpoint_func=None):
    model.zero_grad()
    model.train()
    if checkpoint_func is None:
        model.activation_checkpointing_disable()
    else:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if checkpoint_func == "offload":
        stats = OffloadStats()
        assert install_cpu_offloaded_checkpointing(model, stats) == model.config.num_hidden_layers
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, (stats if checkpoint_func == "offload" else None)


def test_cpu_offloaded_checkpointing_saves_layer_inputs_and_keeps_gradients(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.use_cache = False
    enc = PromptEncoder(tiny_tokenizer, 256)
    from conftest import make_records

    examples = [enc.encode(r, PromptConfig(), len(r["history"])) for r in make_records(2, seed=5)]
    width = max(len(e["input_ids"]) for e in examples)
    batch = {k: torch.tensor([e[k] + [0 if k != "labels" else -100] * (width - len(e[k])) for e in examples])
             for k in ("input_ids", "attention_mask", "labels")}

    plain_loss, plain_grads, _ = _loss_and_grads(model, batch)
    off_loss, off_grads, stats = _loss_and_grads(model, batch, "offload")
    assert off_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain_grads.keys() == off_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(off_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)
    # What went through the CPU hook is what checkpointing keeps: each layer's inputs, at least the hidden states.
    hidden_bytes = batch["input_ids"].numel() * model.config.hidden_size * 4
    assert stats.tensors >= model.config.num_hidden_layers
    assert stats.bytes >= model.config.num_hidden_layers * hidden_bytes
    # ... and not the per-layer intermediates (attention scores, MLP activations), which would be many times more.
    assert stats.bytes < 4 * model.config.num_hidden_layers * hidden_bytes


def test_generating_with_an_unresolved_auto_offload_is_refused():
    """"auto" is truthy: taken as it is, it would turn offload on. It must be decided by the memory plan first."""
    from finetune.memory_plan import resolved_offload

    auto = DeepSpeedChoices(offload_optimizer="auto", offload_params=False)
    with pytest.raises(ValueError, match="resolve \"auto\""):
        generate_deepspeed_config(auto, "bfloat16", 64)
    assert resolved_offload(DeepSpeedChoices(offload_optimizer=True), None).offload_optimizer is True
