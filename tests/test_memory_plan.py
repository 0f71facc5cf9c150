"""The memory plan behind --dry_run and offload "auto": parameter counts from the meta device, DeepSpeed's ZeRO-3
arithmetic, the activation count against what autograd really saves, the offload decision, and the dry run itself."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, run_script, write_config
from finetune.config import Config, DataConfig, DeepSpeedChoices, FieldNames, ModelConfig, PromptConfig, TrainingConfig
from finetune.records import read_records
from finetune.memory_plan import (GIB, Hardware, ModelShape, activation_bytes, choose_offload, model_shape,
                                  model_states_bytes, plan_memory)
from finetune.outputs import DRY_RUN_DIRNAME, GENERATED_DS_CONFIG_NAME, RESOLVED_CONFIG_NAME
from finetune.prompts import IGNORE_INDEX, PromptEncoder, load_tokenizer
from finetune.modeling import load_model_config

GEMMA2_27B = REPO / "benchmarks" / "dry_run" / "gemma-2-27b"


def hardware(gpus_per_node: int = 1, nodes: int = 1, gpu_gib: float | None = 80) -> Hardware:
    return Hardware(gpus_per_node, nodes, None if gpu_gib is None else int(gpu_gib * GIB), None, "test")


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_meta_device_counts_and_model_states_equal_deepspeeds_estimator(arch, tmp_path):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from tiny_gemma import build_tiny_gemma
    from transformers import AutoModelForCausalLM

    path = build_tiny_gemma(tmp_path / arch, arch=arch)
    shape = model_shape(load_model_config(str(path)))  # built on the meta device: no weights
    real = AutoModelForCausalLM.from_pretrained(path)  # DeepSpeed counts a real model (tied embedding once)
    assert (shape.total_params, shape.largest_layer_params) == model_to_params(real)
    assert shape.largest_layer_params == real.get_input_embeddings().weight.numel()

    for gpus_per_node, nodes in [(1, 1), (4, 1), (8, 2)]:
        hw = hardware(gpus_per_node, nodes)
        for offload_optimizer, offload_params in [(False, False), (True, False), (True, True)]:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                shape.total_params, shape.largest_layer_params, gpus_per_node, nodes,
                cpu_offload=offload_optimizer, cpu_offload_params=offload_params, zero_init=True)
            assert model_states_bytes(shape, hw, offload_optimizer, offload_params) == (gpu, cpu)


def test_gemma_2_27b_is_counted_on_the_meta_device_in_seconds():
    shape = model_shape(load_model_config(str(GEMMA2_27B)))
    # Gemma 2 27B: 27.2 billion parameters; its largest layer is the 256,000 x 4,608 embedding (tied to the head).
    assert 27.1e9 < shape.total_params < 27.3e9
    assert shape.largest_layer_params == 256_000 * 4_608
    assert shape.attn_softcapping and shape.final_softcapping and not shape.qk_norm


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes of the tensors autograd saves for backward during one forward pass (parameters excluded)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("arch,attn", [("gemma3", "eager"), ("gemma3", "sdpa"), ("gemma2", "eager")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_close_to_what_autograd_saves(arch, attn, checkpointing):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    dims = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, vocab_size=1000, sliding_window=64)
    config = (Gemma3TextConfig(**dims) if arch == "gemma3"
              else Gemma2Config(**dims, attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = (Gemma3ForCausalLM if arch == "gemma3" else Gemma2ForCausalLM)(config).to(torch.bfloat16).train()
    model.config.use_cache = False
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    batch_size, seq_len, answer = 4, 128, 3
    ids = torch.randint(10, 1000, (batch_size, seq_len))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer:] = ids[:, -answer:]
    keep = torch.zeros_like(ids, dtype=torch.bool)  # the collator's mask: positions that predict the answer
    keep[:, -answer - 1:-1] = True
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": keep,
              "shift_labels": labels[:, -answer:].reshape(-1)}

    measured = saved_activation_bytes(model, inputs)
    shape = ModelShape(arch, 0, 0, 2, 256, 1024, 4, 2, 64, 1000, arch == "gemma2", arch == "gemma2",
                       arch == "gemma3")
    estimate = activation_bytes(shape, batch_size, seq_len, batch_size * answer, attn, checkpointing, False)
    assert 0.9 < estimate["held_after_forward"] / measured < 1.15, (estimate, measured)


def test_auto_offload_takes_the_fastest_option_that_fits():
    need = {(False, False): 100 * GIB, (True, False): 20 * GIB, (False, True): 90 * GIB, (True, True): 5 * GIB}
    auto = ("auto", "auto")
    assert choose_offload(auto, need, 200 * GIB)[:2] == (False, False)
    assert choose_offload(auto, need, 80 * GIB)[:2] == (True, False)
    assert choose_offload(auto, need, 21 * GIB)[:2] == (True, True)  # 20 GiB > 90% of 21 GiB
    opt, par, reason = choose_offload(auto, need, 4 * GIB)
    assert (opt, par) == (True, True) and reason.startswith("nothing fits")
    # A fixed choice is kept; only the "auto" one is decided.
    assert choose_offload((True, "auto"), need, 200 * GIB)[:2] == (True, False)
    assert choose_offload(("auto", True), need, 200 * GIB)[:2] == (False, True)
    assert choose_offload(("auto", True), need, 80 * GIB)[:2] == (True, True)
    assert choose_offload((False, False), need, 4 * GIB) == (False, False, "as set in config.json")
    # Known host memory rules out options whose offloaded states would not fit there.
    host = {(False, False): 2 * GIB, (True, False): 600 * GIB, (False, True): 80 * GIB, (True, True): 700 * GIB}
    assert choose_offload(auto, need, 80 * GIB, host, 1024 * GIB)[:2] == (True, False)
    opt, par, reason = choose_offload(auto, need, 80 * GIB, host, 500 * GIB)
    assert (opt, par) == (True, True) and "700 GiB of host memory of 500 GiB" in reason  # nothing fits
    assert choose_offload(auto, need, 101 * GIB, host, 512 * GIB)[:2] == (False, True)
    # Without a GPU the states are in host memory anyway.
    opt, par, reason = choose_offload(auto, need, None)
    assert (opt, par) == (False, False) and reason.startswith("no GPU")


def test_gemma_2_27b_on_4_x_80_gb_offloads_the_optimizer_only(tiny_model, tmp_path):
    cfg = Config(model=ModelConfig(str(GEMMA2_27B)), data=DataConfig("unused.jsonl"),
                 training=TrainingConfig(batch_size=4, max_length=1024),
                 deepspeed=DeepSpeedChoices(offload_optimizer="auto", offload_params="auto"))
    plan = plan_memory(model_shape(load_model_config(str(GEMMA2_27B))), cfg, hardware(4, 1, 80), seq_len=1024,
                       supervised_tokens=4 * 16)
    rows = {(r["offload_optimizer"], r["offload_params"]): r for r in plan.options}
    # 18 bytes x 27.2B / 4 GPUs is about 114 GiB of model states per GPU: no offload cannot fit in 80 GB.
    assert rows[(False, False)]["fits_gpu"] is False and rows[(True, False)]["fits_gpu"] is True
    assert (plan.offload_optimizer, plan.offload_params) == (True, False)
    # Activation checkpointing: orders of magnitude less activation memory than keeping every layer's tensors.
    assert rows[(True, False)]["activations_gpu"] * 10 < rows[(True, False)]["activations_gpu_without_checkpointing"]


def test_dry_run_writes_its_report_and_trains_nothing(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          deepspeed={"offload_optimizer": "auto", "offload_params": "auto"})
    out = tmp_path / "run"
    proc = run_script(["--config", str(config), "--output_dir", str(out), "--dry_run", "--gpus_per_node", "4",
                       "--gpu_memory_gib", "80"], processes=None, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report_dir = out / DRY_RUN_DIRNAME
    assert sorted(p.name for p in out.iterdir()) == [DRY_RUN_DIRNAME]  # no checkpoint, no final/, no results
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(
        ["report.md", "plan.json", RESOLVED_CONFIG_NAME, GENERATED_DS_CONFIG_NAME])
    report = (report_dir / "report.md").read_text()
    assert report in proc.stdout  # printed as well as saved
    for heading in ("## Model", "## Data", "## Batch", "## One example", "## Memory per GPU", "## DeepSpeed config",
                    "## Resolved config"):
        assert heading in report
    assert "Effective global batch 16 = batch_size 4 x gradient_accumulation_steps 1 x 4 GPUs" in report
    assert "(estimated, not measured)" in report and "no weights read" in report
    plan = json.loads((report_dir / "plan.json").read_text())
    assert plan["memory"]["hardware"]["gpus_per_node"] == 4
    assert plan["memory"]["hardware"]["gpu_memory"] == 80 * GIB
    # A tiny model fits anywhere: "auto" turns offload off, and the saved DeepSpeed config says so.
    assert (plan["memory"]["offload_optimizer"], plan["memory"]["offload_params"]) == (False, False)
    ds = json.loads((report_dir / GENERATED_DS_CONFIG_NAME).read_text())
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "none"}
    sections = plan["example"]["sections"]
    first = read_records(data_dir / "train.jsonl", FieldNames())[0]
    tokenizer = load_tokenizer(str(tiny_model))
    encoder = PromptEncoder(tokenizer, 128)
    kept = encoder.fitting_history(first, len(encoder.target_ids(first["target"])))
    assert sum(sections.values()) == len(encoder.encode(first, PromptConfig(), kept)["input_ids"])
    assert min(sections.values()) > 0
    stats = plan["examples"]["train"]
    assert stats["p50_tokens"] <= stats["p95_tokens"] <= stats["max_tokens"]
    assert 0 < plan["padding_efficiency"]["random"] <= plan["padding_efficiency"]["grouped"] <= 1


def test_hardware_flags_belong_to_the_dry_run(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir)
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "run"), "--gpu_memory_gib", "80"],
                      processes=None, timeout=120)
    assert proc.returncode == 2 and "--gpu_memory_gib describe hardware for --dry_run" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flash_attention_2"])
def test_padding_free_micro_batches_are_planned_as_one_row(attn):
    """Padding-free batching concatenates the micro-batch into one row: eager attention then keeps scores for
    (batch x length)^2 token pairs instead of batch x length^2; the other terms are per token and stay the same."""
    shape = ModelShape("gemma3_text", 10**8, 10**7, 4, 256, 1024, 4, 2, 64, 1000, False, False, True)
    cfg = Config(model=ModelConfig("m", attn_implementation=attn), data=DataConfig("t.jsonl"),
                 training=TrainingConfig(batch_size=4, activation_checkpointing=False))
    padded = plan_memory(shape, cfg, hardware(), seq_len=128, supervised_tokens=12)
    flat = plan_memory(shape, cfg, hardware(), seq_len=128, supervised_tokens=12, padding_free=True)
    expected = activation_bytes(shape, 1, 4 * 128, 12, attn, False, False)["gpu"]
    assert flat.options[0]["activations_gpu"] == expected
    if attn == "eager":
        per_layer_scores = 4 * 128 * 4 * (4 * 128 - 128) * (4 + 2)  # heads x extra keys x (fp32 + bf16) per token
        assert flat.options[0]["activations_gpu"] - padded.options[0]["activations_gpu"] == 4 * per_layer_scores
    else:
        assert flat.options[0]["activations_gpu"] == padded.options[0]["activations_gpu"]
    assert flat.padding_free and not padded.padding_free


def test_dry_run_shows_the_first_record_that_fits(tiny_model, tmp_path):
    """The example in the report is the first record that became a training example, not record 1 when that one was
    dropped as too long."""
    from conftest import make_records, write_jsonl

    records = make_records(12, seed=4)
    records[0]["profile"] = {"bio": "very long " * 200}  # cannot fit even without history: dropped
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(data / "validation.jsonl", make_records(4, seed=5, prefix="v"))
    config = write_config(tmp_path / "config.json", tiny_model, data)
    out = tmp_path / "run"
    proc = run_script(["--config", str(config), "--output_dir", str(out), "--dry_run"], processes=None, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = json.loads((out / DRY_RUN_DIRNAME / "plan.json").read_text())
    assert plan["examples"]["train"]["dropped_too_long"] == 1
    assert plan["example"]["target"] == records[1]["target"]
    assert "very long" not in plan["example"]["prompt"] and f"age: {records[1]['profile']['age']}" in plan["example"][
        "prompt"]
