"""End to end: the real script under `accelerate launch --use_deepspeed --num_processes 2` on a tiny random Gemma,
with the generated ZeRO-3 offload config; and a few steps of the real Gemma 3 270M when it has been prepared."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_json, run_script, write_config
from finetune.config import FieldNames, PromptConfig
from finetune.records import read_records
from finetune.outputs import (DS_CONFIG_DIRNAME, FINAL_DIRNAME, GENERATED_DS_CONFIG_NAME, PREDICTIONS_NAME,
                              RESOLVED_CONFIG_NAME, RESULTS_NAME)
from finetune.prompts import IGNORE_INDEX, PromptEncoder


def validation_loss(model_dir: Path, tokenizer_dir: Path, data_file: Path) -> float:
    """Mean target-token loss of a saved model on a data file, computed here independently of the Trainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = PromptEncoder(tokenizer, 512)
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in read_records(data_file, FieldNames()):
            ex = enc.encode(rec, PromptConfig(), len(rec["history"]))
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            n = sum(label != IGNORE_INDEX for label in ex["labels"])  # tokens the loss averaged over
            total, count = total + out.loss.item() * n, count + n
    return total / count


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """One 12-step run on 2 ranks with checkpoints at steps 6 and 12, shared by the assertions below."""
    from conftest import make_records, write_jsonl

    base = tmp_path_factory.mktemp("e2e")
    data = base / "data"
    write_jsonl(data / "train.jsonl", make_records(64, seed=1))
    write_jsonl(data / "validation.jsonl", make_records(16, seed=2, prefix="v"))
    write_jsonl(data / "test.jsonl", make_records(11, seed=3, prefix="t"))  # odd: the ranks' shards differ in size
    config = write_config(base / "config.json", tiny_model, data, data={"test_file": str(data / "test.jsonl")},
                          evaluation={"max_new_tokens": 4})
    out = base / "run"
    proc = run_script(["--config", str(config), "--ablation_config", "profile_and_history", "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"config": config, "out": out, "data": data, "proc": proc}


def test_run_used_deepspeed_zero3_with_offload_on_two_ranks(finished_run):
    results = read_json(finished_run["out"] / RESULTS_NAME)
    assert results["deepspeed"] == {
        "engine": "DeepSpeedEngine", "zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu",
        "bf16": True, "optimizer": "DeepSpeedZeroOptimizer_Stage3", "base_optimizer": "DeepSpeedCPUAdam",
        "world_size": 2,
    }
    assert results["world_size"] == 2 and results["effective_batch_size"] == 8
    assert "effective global batch size 8 = batch_size 4 x gradient_accumulation_steps 1 x 2 processes" \
        in finished_run["proc"].stdout
    # Activation checkpointing with CPU checkpointing took effect: layer inputs went through the CPU hook.
    ac = results["activation_checkpointing"]
    assert ac["enabled"] and ac["cpu_offload"] and ac["offloaded_tensors_rank0"] >= 12 * 2


def test_loss_fell_and_outputs_are_complete(finished_run):
    out = finished_run["out"]
    results = read_json(out / RESULTS_NAME)
    assert results["global_step"] == 12
    assert results["last_train_loss"] < results["first_train_loss"] - 0.5
    assert results["eval"]["eval_loss"] < results["first_eval_loss"] + 1e-9
    assert results["ablation"] == "profile_and_history" and results["ablation_description"]
    train = results["examples"]["train"]
    assert train["records"] == train["examples"] == 64 and len(train["ids_sha256"]) == 64
    assert results["examples"]["validation"]["examples"] == 16
    assert {"torch", "transformers", "deepspeed", "accelerate", "datasets"} <= results["versions"].keys()
    assert any("eval_loss" in h for h in results["log_history"][:-1])  # evaluated during training too

    ds = read_json(out / DS_CONFIG_DIRNAME / GENERATED_DS_CONFIG_NAME)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == "auto"
    resolved = read_json(out / RESOLVED_CONFIG_NAME)
    assert resolved["ablation"]["name"] == "profile_and_history"
    assert resolved["training"]["max_steps"] == 12 and resolved["prompt"]["include_history"] is True
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert not list(out.glob(".*tmp*"))  # no staging leftovers


def test_throughput_and_batching_are_recorded(finished_run):
    results = read_json(finished_run["out"] / RESULTS_NAME)
    assert results["batching"] == {"padding_free": False, "group_by_length": True}
    speed = results["throughput"]
    assert speed["steps"] == 12 and 0 < speed["seconds_per_step"] and speed["tokens_per_second"] > 0
    # Every example's tokens were run once per epoch position: 12 steps x 8 examples of this data set.
    assert 0 < speed["real_tokens"] <= speed["processed_tokens"]
    assert speed["padding_efficiency"] == pytest.approx(speed["real_tokens"] / speed["processed_tokens"], abs=1e-4)
    assert speed["padding_efficiency"] >= 0.95  # grouped by length
    assert len(speed["peak_rss_bytes"]) == 2 and all(b > 100e6 for b in speed["peak_rss_bytes"])
    assert results["memory_plan"] is None  # offload was fixed in the config, nothing to decide


def test_padding_free_under_zero3_gives_the_padded_first_step_loss(tiny_model, tmp_path):
    """Two 2-rank ZeRO-3 runs that see the same batches (no length grouping) with offload "auto" (no GPU: off):
    padded and padding-free agree on the first step's loss, which the supervised-positions logits compute."""
    from conftest import make_records, write_jsonl

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_records(32, seed=5))
    write_jsonl(data / "validation.jsonl", make_records(8, seed=6, prefix="v"))
    results = {}
    for padding_free in (False, True):
        config = write_config(tmp_path / f"config_{padding_free}.json", tiny_model, data,
                              training={"max_steps": 2, "logging_steps": 1, "eval_steps": None, "save_steps": 10,
                                        "group_by_length": False, "padding_free": padding_free},
                              deepspeed={"offload_optimizer": "auto", "offload_params": "auto"})
        out = tmp_path / f"run_{padding_free}"
        proc = run_script(["--config", str(config), "--output_dir", str(out)])
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        results[padding_free] = read_json(out / RESULTS_NAME)
    padded, flat = results[False], results[True]
    assert flat["batching"]["padding_free"] and flat["throughput"]["padding_efficiency"] == 1.0
    assert padded["throughput"]["padding_efficiency"] < 1.0
    assert flat["throughput"]["real_tokens"] == padded["throughput"]["real_tokens"]  # the same examples
    assert flat["first_train_loss"] == pytest.approx(padded["first_train_loss"], rel=2e-2)  # bf16 rounding
    for r in (padded, flat):  # "auto" without a GPU: the states are in host memory anyway, so no offload
        assert (r["deepspeed"]["offload_optimizer"], r["deepspeed"]["offload_param"]) == ("none", "none")
        assert r["memory_plan"]["reason"].startswith("no GPU") and r["memory_plan"]["estimated"]


def test_test_set_is_evaluated_with_predictions_for_every_example(finished_run):
    out = finished_run["out"]
    lines = (out / PREDICTIONS_NAME).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == [f"t{i:04d}" for i in range(11)]  # one line each, in file order
    assert all(r["loss"] > 0 and r["target_tokens"] >= 2 and isinstance(r["prediction"], str) for r in rows)
    test = read_json(out / RESULTS_NAME)["test"]
    assert test["examples"] == test["generated"] == 11 and test["numeric"] is False
    weighted = sum(r["loss"] * r["target_tokens"] for r in rows) / sum(r["target_tokens"] for r in rows)
    assert test["loss"] == pytest.approx(weighted) and test["perplexity"] == pytest.approx(math.exp(weighted))
    assert test["exact_match"] == pytest.approx(sum(r["exact_match"] for r in rows) / 11)
    # The per-example losses agree with a plain forward pass of the saved model.
    final = out / FINAL_DIRNAME
    assert test["loss"] == pytest.approx(validation_loss(final, final, finished_run["data"] / "test.jsonl"), rel=0.05)


def test_eval_only_rescores_a_finished_run(finished_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished_run["out"], out, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = read_json(out / RESULTS_NAME)
    proc = run_script(["--config", str(finished_run["config"]), "--output_dir", str(out), "--do_eval_only",
                       "--set", "evaluation.max_test_examples=5"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    after = read_json(out / RESULTS_NAME)
    assert after["test"]["generated"] == 5 and after["test"]["examples"] == 11
    assert len((out / PREDICTIONS_NAME).read_text().splitlines()) == 5
    assert after["train"] == before["train"] and after["log_history"] == before["log_history"]
    wrong = run_script(["--config", str(finished_run["config"]), "--output_dir", str(out), "--do_eval_only",
                        "--ablation_config", "query_only"], processes=None)
    assert wrong.returncode == 2 and "pass the run's --ablation_config" in wrong.stderr


def test_compare_two_tiny_runs_writes_table_csv_and_png(finished_run, tmp_path):
    """A second ablation of the same data and config, then the comparison tool on both real runs."""
    other = tmp_path / "query_only"
    proc = run_script(["--config", str(finished_run["config"]), "--ablation_config", "query_only",
                       "--output_dir", str(other)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    csv, png = tmp_path / "comparison.csv", tmp_path / "comparison.png"
    compare = subprocess.run([sys.executable, str(REPO / "Gemma" / "compare_ablations.py"), str(finished_run["out"]),
                              str(other), "--csv", str(csv), "--figure", str(png)],
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr
    lines = compare.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | ablation | test examples |")
    assert "| run (reference) | profile_and_history | 11 |" in lines[2]
    assert "| query_only | query_only | 11 |" in lines[3] and " [" in lines[3]  # a difference with its interval
    import csv as csv_module

    rows = list(csv_module.DictReader(csv.open()))
    assert [r["ablation"] for r in rows] == ["profile_and_history", "query_only"]
    assert rows[1]["exact_match_diff"] != "" and float(rows[1]["exact_match_lo"]) <= float(rows[1]["exact_match_hi"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_final_model_reloads_and_beats_the_initial_weights(finished_run, tiny_model):
    final = finished_run["out"] / FINAL_DIRNAME
    val = finished_run["data"] / "validation.jsonl"
    trained = validation_loss(final, final, val)
    initial = validation_loss(tiny_model, tiny_model, val)
    assert trained < initial - 0.5, (trained, initial)
    assert read_json(final / "config.json")["use_cache"] is True


def test_resume_from_mid_run_checkpoint_reaches_the_same_end(finished_run, tmp_path):
    """A copy of the run that stopped after its step-6 checkpoint, resumed with `auto`."""
    src, out = finished_run["out"], tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(src / "checkpoint-6", out / "checkpoint-6")
    proc = run_script(["--config", str(finished_run["config"]), "--output_dir", str(out),
                       "--resume_from_checkpoint", "auto"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    resumed, full = read_json(out / RESULTS_NAME), read_json(src / RESULTS_NAME)
    assert resumed["resumed_from"].endswith("checkpoint-6")
    assert resumed["global_step"] == full["global_step"] == 12
    assert resumed["last_train_loss"] == pytest.approx(full["last_train_loss"], abs=1e-2)
    assert resumed["eval"]["eval_loss"] == pytest.approx(full["eval"]["eval_loss"], abs=1e-2)


def test_plain_python_runs_a_single_process(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          training={"max_steps": 2, "eval_steps": None, "save_steps": 2})
    out = tmp_path / "single"
    proc = run_script(["--config", str(config), "--ablation_config", "query_only", "--output_dir", str(out)],
                      processes=None)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = read_json(out / RESULTS_NAME)
    assert results["world_size"] == 1 and results["deepspeed"]["zero_stage"] == 3
    assert results["global_step"] == 2 and results["ablation"] == "query_only"


DEMO_MODEL = REPO / "Gemma" / "models" / "gemma-3-270m"


@pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                    reason="the real Gemma 3 270M is not prepared: run `bash setup.sh` (CI does)")
def test_real_gemma_3_270m_trains_a_few_steps(tmp_path):
    out = tmp_path / "real"
    proc = run_script([
        "--config", str(REPO / "config.json"), "--output_dir", str(out),
        "--set", "training.max_steps=3", "--set", "training.batch_size=2", "--set", "training.max_length=160",
        "--set", "training.logging_steps=1", "--set", "training.eval_steps=null", "--set", "training.save_steps=100",
        "--set", "data.validation_file=null", "--set", "evaluation.max_test_examples=8",
        "--set", "evaluation.max_new_tokens=4",
    ], timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = read_json(out / RESULTS_NAME)
    assert results["global_step"] == 3 and results["deepspeed"]["zero_stage"] == 3
    losses = [h["loss"] for h in results["log_history"] if "loss" in h]
    # The base model has never seen <end_of_turn> after text (about 33 nats on that token): loss starts high, falls fast.
    assert len(losses) == 3 and all(0 < loss < 60 for loss in losses) and losses[-1] < losses[0]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / FINAL_DIRNAME).model_type == "gemma3_text"
    assert results["test"]["generated"] == 8 and results["test"]["examples"] == 200


def test_main_takes_extra_trainer_callbacks(tiny_model, data_dir, tmp_path):
    """main(argv, callbacks=...) hands extra callbacks to the Trainer (the speed benchmark's step probe uses this)."""
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          training={"max_steps": 2, "eval_steps": None, "save_steps": 2})
    out, record = tmp_path / "run", tmp_path / "steps.json"
    code = ("import json, sys; sys.path.insert(0, 'Gemma'); import train_deepspeed\n"
            "from transformers import TrainerCallback\n"
            "class Recorder(TrainerCallback):\n"
            "    steps = []\n"
            "    def on_step_end(self, args, state, control, **kwargs):\n"
            "        self.steps.append(state.global_step)\n"
            "    def on_train_end(self, args, state, control, **kwargs):\n"
            "        open(sys.argv[3], 'w').write(json.dumps(self.steps))\n"
            "sys.exit(train_deepspeed.main(['--config', sys.argv[1], '--output_dir', sys.argv[2]],"
            " callbacks=[Recorder()]))\n")
    from conftest import script_env

    proc = subprocess.run([sys.executable, "-c", code, str(config), str(out), str(record)], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert json.loads(record.read_text()) == [1, 2]
    assert read_json(out / RESULTS_NAME)["global_step"] == 2


def test_final_model_answers_through_a_chat_pipeline_as_in_predictions(finished_run):
    """final/ works in the client users load it with: transformers' text-generation pipeline with chat messages
    rebuilds the training prompt from the saved chat template (the tiny tokenizer had none: Gemma's is saved), stops
    where the model's turn ends, and gives the answers of predictions.jsonl."""
    from finetune.prompts import render_user_message
    from transformers import AutoTokenizer, pipeline

    final = finished_run["out"] / FINAL_DIRNAME
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template  # written although the base tokenizer had none
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert eot in read_json(final / "generation_config.json")["eos_token_id"]
    encoder = PromptEncoder(tokenizer, 128)  # the run's max_length
    generate = pipeline("text-generation", model=str(final), tokenizer=tokenizer, device="cpu")
    records = read_records(finished_run["data"] / "test.jsonl", FieldNames())
    rows = [json.loads(line) for line in (finished_run["out"] / PREDICTIONS_NAME).read_text().splitlines()]
    for record, row in list(zip(records, rows, strict=True))[:4]:
        kept = encoder.fitting_history(record, len(encoder.target_ids(record["target"])))
        messages = [{"role": "user", "content": render_user_message(record, PromptConfig(), kept)}]
        # the chat template saved in final/ renders exactly the prompt the model was trained and evaluated on
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            encoder.prompt_text(messages[0]["content"])
        answer = generate(messages, max_new_tokens=4, do_sample=False)[0]["generated_text"][-1]["content"]
        assert answer.strip() == row["prediction"], (answer, row)
