"""LoRA with peft under ZeRO-3 through the real CLI (tiny Gemma, 2 ranks, parameters and optimizer offloaded): only the
adapters reach the optimizer, the loss falls, adapter/ loads with peft and gives the logits of the merged final/, the
memory plan counts what peft trains, a resumed run ends where an uninterrupted one does, and bad `lora` values are
clear errors before the model loads."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import make_records, read_json, run_script, write_config, write_jsonl
from finetune.config import (Config, DataConfig, DeepSpeedChoices, LoraConfig, ModelConfig, TrainingConfig)
from finetune.modeling import load_model_config, meta_model
from finetune.outputs import ADAPTER_DIRNAME, FINAL_DIRNAME, RESULTS_NAME
from test_families import optimizer_state_numel
from test_memory_plan import GEMMA2_27B, hardware

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A finished 6-step LoRA run on 2 ranks with a checkpoint every 3 steps and a test evaluation."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "data"
    write_jsonl(data / "train.jsonl", make_records(32, seed=1))
    write_jsonl(data / "validation.jsonl", make_records(8, seed=2, prefix="v"))
    write_jsonl(data / "test.jsonl", make_records(6, seed=3, prefix="t"))
    config = write_config(root / "config.json", tiny_model, data, data={"test_file": str(data / "test.jsonl")},
                          lora=LORA, evaluation={"max_new_tokens": 2},
                          training={"max_steps": 6, "save_steps": 3, "eval_steps": 3, "logging_steps": 1,
                                    "learning_rate": 1e-2, "save_total_limit": None})
    out, started = root / "run", time.time()
    proc = run_script(["--config", str(config), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "config": config, "out": out, "model": tiny_model, "results": read_json(out / RESULTS_NAME),
            "started": started}


def test_only_the_adapters_are_trained_and_the_loss_falls(lora_run):
    results, out = lora_run["results"], lora_run["out"]
    assert results["deepspeed"]["zero_stage"] == 3 and results["deepspeed"]["offload_param"] == "cpu"
    assert results["last_train_loss"] < results["first_train_loss"] - 0.3
    trained, frozen = results["parameters"]["trained"], results["parameters"]["frozen"]
    assert 0 < trained < frozen / 10  # r=4 adapters beside the whole base model
    # DeepSpeed's fp32 master copies (what the optimizer updates) hold the adapters, and nothing of the base model
    fp32 = optimizer_state_numel(out / "checkpoint-6")
    assert trained <= fp32 < trained + 64  # partition padding only
    # activation checkpointing with the saved layer inputs in CPU memory works with the adapters too
    assert results["activation_checkpointing"]["cpu_offload"] and results["activation_checkpointing"]["enabled"]
    adapter = read_json(out / ADAPTER_DIRNAME / "adapter_config.json")
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["peft_type"] == "LORA"


def test_a_run_leaves_no_shared_memory_behind(lora_run):
    """DeepSpeed's CPU allreduce buffers (66 MB per rank in /dev/shm) are unlinked once mapped: none outlives its run."""
    left = [p for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if p.stat().st_mtime >= lora_run["started"]]
    assert not left, left


def test_the_adapter_loads_with_peft_and_gives_the_logits_of_the_merged_final_model(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, ids = lora_run["out"], torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(lora_run["model"], dtype=torch.bfloat16)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
        adapted = PeftModel.from_pretrained(base, out / ADAPTER_DIRNAME)(input_ids=ids).logits.float()
        final = AutoModelForCausalLM.from_pretrained(out / FINAL_DIRNAME, dtype=torch.bfloat16)
        merged = final(input_ids=ids).logits.float()
    assert type(final).__name__ == "Gemma3ForCausalLM" and not hasattr(final, "peft_config")  # a plain model
    torch.testing.assert_close(merged, adapted, rtol=0, atol=3e-2)  # the merge rounds weights to bf16
    assert (adapted - base_logits).abs().max() > 0.2  # the adapter is not empty: it changed the model


def test_the_memory_plan_counts_what_peft_trains(lora_run):
    from finetune.memory_plan import model_shape

    shape = model_shape(load_model_config(str(lora_run["model"])), LoraConfig(**LORA))
    assert shape.trained == lora_run["results"]["parameters"]["trained"]
    assert shape.total_params == lora_run["results"]["parameters"]["total"]


def test_a_resumed_lora_run_ends_where_an_uninterrupted_one_does(lora_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(lora_run["out"] / "checkpoint-3", out / "checkpoint-3")  # as after a crash at step 4
    proc = run_script(["--config", str(lora_run["config"]), "--output_dir", str(out), "--resume_from_checkpoint",
                       "auto"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed, uninterrupted = read_json(out / RESULTS_NAME), lora_run["results"]
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == 6
    assert abs(resumed["last_train_loss"] - uninterrupted["last_train_loss"]) < 1e-2
    assert abs(resumed["test"]["loss"] - uninterrupted["test"]["loss"]) < 1e-2


def test_a_lora_checkpoint_is_not_resumed_as_full_fine_tuning(lora_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lora_run["out"] / "checkpoint-3", out / "checkpoint-3")
    proc = run_script(["--config", str(lora_run["config"]), "--output_dir", str(out), "--resume_from_checkpoint",
                       "auto", "--set", "lora.enabled=false"])
    assert proc.returncode != 0 and "lora.enabled: the checkpoint was trained with true" in proc.stderr, \
        proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]


def test_eval_only_evaluates_the_merged_model(lora_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lora_run["out"], out)
    proc = run_script(["--config", str(lora_run["config"]), "--output_dir", str(out), "--do_eval_only"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "LoRA" not in proc.stdout + proc.stderr  # final/ is evaluated as it is: no adapters are added
    tested = read_json(out / RESULTS_NAME)["test"]
    assert abs(tested["loss"] - lora_run["results"]["test"]["loss"]) < 1e-2  # adapter vs merged: bf16 rounding


def test_lora_trains_under_a_custom_deepspeed_config(lora_run, tmp_path):
    """The user's own ZeRO-3 JSON (no offload, the Trainer's optimizer): the adapters train and both outputs load."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                              "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                              "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                              "gradient_clipping": "auto"}))
    out = tmp_path / "run"
    proc = run_script(["--config", str(lora_run["config"]), "--output_dir", str(out), "--deepspeed_config", str(ds),
                       "--set", "training.max_steps=3", "--set", "data.test_file=null"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = read_json(out / RESULTS_NAME)
    assert results["deepspeed"]["offload_param"] == "none" and results["deepspeed"]["zero_stage"] == 3
    assert results["parameters"] == lora_run["results"]["parameters"]
    assert results["last_train_loss"] < results["first_train_loss"]
    assert (out / ADAPTER_DIRNAME / "adapter_model.safetensors").is_file()
    assert (out / FINAL_DIRNAME / "model.safetensors").is_file()


def test_auto_offload_stops_offloading_when_lora_makes_the_model_fit():
    """Gemma 2 27B on 4 x 80 GB: full fine-tuning needs the optimizer offloaded; with LoRA the frozen 16-bit base and
    the adapters' states fit on the GPUs."""
    from finetune.memory_plan import model_shape, plan_memory

    cfg = Config(model=ModelConfig(str(GEMMA2_27B)), data=DataConfig("unused.jsonl"),
                 training=TrainingConfig(batch_size=4, max_length=1024),
                 deepspeed=DeepSpeedChoices(offload_optimizer="auto", offload_params="auto"), lora=LoraConfig(True))
    config = load_model_config(str(GEMMA2_27B))
    full = plan_memory(model_shape(config), cfg, hardware(4, 1, 80), seq_len=1024, supervised_tokens=64)
    lora_shape = model_shape(config, cfg.lora)
    lora = plan_memory(lora_shape, cfg, hardware(4, 1, 80), seq_len=1024, supervised_tokens=64)
    assert (full.offload_optimizer, full.offload_params) == (True, False)
    assert (lora.offload_optimizer, lora.offload_params) == (False, False)
    # r=16 on every linear layer of 46 layers: r x (in + out) per projection
    text = config.get_text_config()
    q, kv, mlp, h = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim, \
        text.intermediate_size, text.hidden_size
    per_layer = 16 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + mlp) + (mlp + h))
    assert lora_shape.trained == text.num_hidden_layers * per_layer


def test_adapters_go_on_the_language_model_only(tmp_path):
    """A multimodal Gemma 4: "all-linear" adapts the language model's linear layers, never a tower's, nor the head."""
    import peft
    from finetune.lora import peft_config
    from tiny_gemma import build_tiny_gemma

    config = load_model_config(str(build_tiny_gemma(tmp_path / "g4mm", arch="gemma4_mm")))
    model = meta_model(config)
    with torch.device("meta"):
        wrapped = peft.get_peft_model(model, peft_config(model, LoraConfig(True)), autocast_adapter_dtype=False)
    adapted = {name.rsplit(".lora_", 1)[0] for name, p in wrapped.named_parameters() if p.requires_grad}
    assert adapted and all(".model.language_model." in name for name in adapted), sorted(adapted)[:5]
    assert any(name.endswith("per_layer_model_projection") for name in adapted)  # a linear layer outside the layers
    towers = [n for n, m in wrapped.named_modules() if isinstance(m, torch.nn.Linear) and "tower" in n]
    assert towers and not any(".lora_" in n for n in towers)


@pytest.mark.parametrize("lora,messages", [
    ({"r": 0, "alpha": -1, "dropout": 1.0}, ["lora.r: must be at least 1, got 0", "lora.alpha: must be a positive",
                                             "lora.dropout: must be in [0, 1), got 1.0"]),
    ({"target_modules": "all_linear"}, ["lora.target_modules: expected one of \"all-linear\" or a list, got "
                                        "\"all_linear\". Did you mean \"all-linear\"?"]),
    ({"target_modules": ["qproj", "v_proj"]}, ["lora.target_modules: 'qproj' names no module of the language model; "
                                               "its linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj"]),
    ({"target_modules": ["rotary_emb"]}, ["'rotary_emb' is a Gemma3RotaryEmbedding, which LoRA cannot adapt"]),
    ({"modules_to_save": ["nrom"]}, ["lora.modules_to_save: 'nrom' names no module of the language model"]),
    ({"rank": 8}, ["lora.rank: unknown key"]),
])
def test_bad_lora_values_are_clear_errors_before_the_model_loads(lora, messages, tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, lora={"enabled": True, **lora})
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out")], processes=None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for message in messages:
        assert message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "World size" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / RESULTS_NAME).exists()
