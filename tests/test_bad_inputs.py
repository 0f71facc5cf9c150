"""Every bad input ends the real CLI with exit code 2, a message naming the file, key or record and the fix, no
traceback, and before the model is loaded ("World size" is logged just before the model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_records, run_script, write_config, write_jsonl
from finetune.config import TrainingConfig
from finetune.outputs import RESULTS_NAME, checkpoints_on_disk, count_parameters, planned_steps, storage_estimate
from finetune.runtime import check_precision

MODEL_LOADING_MARKERS = ("World size", "Loading weights", "Activation checkpointing:")


def _data(tmp: Path, records: list[dict] | None = None, name: str = "train.jsonl") -> Path:
    return write_jsonl(tmp / "data" / name, records if records is not None else make_records(8))


def _records(**changes) -> list[dict]:
    records = make_records(8)
    for index_key, value in changes.items():
        index, key = index_key.split("__")
        if value is ...:
            records[int(index)].pop(key)
        else:
            records[int(index)][key] = value
    return records


def setup_case(case: str, tmp: Path, model: Path) -> list[str]:
    """Writes the files for one bad input; returns the CLI arguments (config and output dir included)."""
    data = tmp / "data"
    _data(tmp)
    _data(tmp, make_records(4, seed=1, prefix="v"), "validation.jsonl")
    training, sections, extra = {}, {}, []
    model_dir = model
    if case == "missing_config":
        return ["--config", str(tmp / "nope.json"), "--output_dir", str(tmp / "out")]
    if case == "invalid_json":
        (tmp / "config.json").write_text('{"model": {"model_name_or_path": "x",}}')
        return ["--config", str(tmp / "config.json"), "--output_dir", str(tmp / "out")]
    if case == "unknown_key":
        training = {"batchsize": 2}
    elif case == "wrong_type":
        training = {"max_steps": "ten"}
    elif case == "batch_size_zero":
        training = {"batch_size": 0}
    elif case == "negative_learning_rate":
        training = {"learning_rate": -0.1}
    elif case == "max_length_below_fixed_parts":
        training = {"max_length": 8}
    elif case == "eval_without_validation":
        sections["data"] = {"validation_file": None}
    elif case == "missing_data_file":
        sections["data"] = {"train_file": str(data / "missing.jsonl")}
    elif case == "unsupported_extension":
        (data / "train.txt").write_text("hello")
        sections["data"] = {"train_file": str(data / "train.txt")}
    elif case == "several_config_problems":
        training = {"batch_size": 0, "learning_rate": -1, "seedd": 1}
    elif case == "unknown_ablation":
        extra = ["--ablation_config", "profile_and_histroy"]
    elif case == "bad_ablation_file":
        (tmp / "abl.json").write_text(json.dumps({"description": "x", "include_profiles": True,
                                                  "include_history": "yes"}))
        extra = ["--ablation_config", str(tmp / "abl.json")]
    elif case == "empty_data_file":
        (data / "train.jsonl").write_text("")
    elif case == "malformed_jsonl_line":
        (data / "train.jsonl").write_text(json.dumps(make_records(1)[0]) + "\n{not json}\n")
    elif case == "missing_query":
        _data(tmp, _records(**{"2__query": ...}))
    elif case == "missing_target":
        _data(tmp, _records(**{"0__target": ...}))
    elif case == "missing_profile_needed":
        _data(tmp, _records(**{"3__profile": ...}))
    elif case == "history_not_a_list":
        records = make_records(3)
        for r in records:
            r["history"] = "watched three films"
        _data(tmp, records)
    elif case == "target_longer_than_max_length":
        _data(tmp, _records(**{"1__target": "word " * 300}))
    elif case == "non_utf8":
        (data / "train.jsonl").write_bytes(json.dumps(make_records(1)[0]).encode() + b'\n{"query": "caf\xe9"}\n')
    elif case == "deepspeed_config_missing":
        extra = ["--deepspeed_config", str(tmp / "ds.json")]
    elif case == "deepspeed_config_invalid_json":
        (tmp / "ds.json").write_text('{"zero_optimization": {"stage": 3}')
        extra = ["--deepspeed_config", str(tmp / "ds.json")]
    elif case == "deepspeed_stage_2":
        (tmp / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
        extra = ["--deepspeed_config", str(tmp / "ds.json")]
    elif case == "deepspeed_contradicts_config":
        (tmp / "ds.json").write_text(json.dumps({
            "train_micro_batch_size_per_gpu": 16, "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}))
        extra = ["--deepspeed_config", str(tmp / "ds.json")]
    elif case == "model_without_config":
        model_dir = tmp / "empty_model"
        model_dir.mkdir()
    elif case == "non_gemma_model":
        model_dir = tmp / "llama"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    # late failures, now found before the model loads
    elif case == "seed_out_of_range":
        training = {"seed": 2**32}
    elif case == "report_to_not_installed":
        training = {"report_to": ["tensorboard"]}
    elif case == "report_to_unknown":
        training = {"report_to": ["tensorbord"]}
    elif case == "flash_attention_without_package":
        sections["model"] = {"model_name_or_path": str(model), "attn_implementation": "flash_attention_2"}
    elif case == "infinite_epochs":
        training = {"max_steps": None, "num_train_epochs": float("inf")}
    elif case in ("deepspeed_batch_contradiction", "deepspeed_offload_device", "deepspeed_unknown_optimizer",
                  "deepspeed_unknown_key"):
        zero = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
        ds = {"bf16": {"enabled": "auto"}, "zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
        if case == "deepspeed_batch_contradiction":
            ds["train_batch_size"] = 12  # batch_size 4 x 1 process x accumulation 1 = 4
        elif case == "deepspeed_offload_device":
            zero["offload_optimizer"] = {"device": "gpu"}
        elif case == "deepspeed_unknown_optimizer":
            ds["optimizer"] = {"type": "AdamWW", "params": {"lr": "auto"}}
        else:
            zero["stage3_max_live_paramters"] = 10**9
        (tmp / "ds.json").write_text(json.dumps(ds))
        extra = ["--deepspeed_config", str(tmp / "ds.json")]
    elif case == "resume_path_not_a_checkpoint":
        extra = ["--resume_from_checkpoint", str(tmp / "nowhere")]
    elif case == "mistyped_local_model_path":
        (tmp / "models").mkdir()
        model_dir = Path("models/tiny-gemma")  # relative to config.json's directory, where models/ exists
    elif case == "unreachable_hub_id":
        model_dir = Path("nobody/no-such-gemma")  # HF_HUB_OFFLINE is set: not in the cache, not reachable
    # data that would corrupt an evaluation
    elif case == "duplicate_ids":
        records = make_records(8)
        records[4]["id"] = records[1]["id"]
        _data(tmp, records)
    elif case == "ids_shared_across_splits":
        _data(tmp, make_records(4, seed=7), "validation.jsonl")  # ids u0000..u0003, as in train
    elif case == "train_file_as_test_file":
        sections["data"] = {"test_file": str(data / "train.jsonl")}
    elif case == "empty_target":
        _data(tmp, _records(**{"5__target": "  "}))
    elif case == "control_token_in_text":
        _data(tmp, _records(**{"2__query": "Which genre?<end_of_turn>"}))
    elif case == "two_fields_one_column":
        sections["data"] = {"fields": {"query": "target"}}
    elif case == "unknown_history_field":
        sections["prompt"] = {"history_fields": ["genre", "ratng"]}
    elif case == "string_profile_with_fields":
        _data(tmp, [{**r, "profile": "Likes old films."} for r in make_records(8)])  # one type per field
        sections["prompt"] = {"profile_fields": ["age"]}
    elif case == "blank_line_location":
        records = make_records(4)
        records[2].pop("query")
        (data / "train.jsonl").write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n"
                                          + json.dumps(records[2]) + "\n")
    # --set: problems name the --set they came from
    elif case == "set_type_error":
        extra = ["--set", "training.max_steps=ten"]
    elif case == "set_range_error":
        extra = ["--set", "training.batch_size=0"]
    elif case == "set_unknown_key":
        extra = ["--set", "training.batchsize=2"]
    elif case == "finished_run":
        (tmp / "out").mkdir()
        (tmp / "out" / RESULTS_NAME).write_text("{}")
    elif case == "unwritable_output_dir":
        (tmp / "a_file").write_text("not a directory")
        return ["--config", str(write_config(tmp / "config.json", model_dir, data)),
                "--output_dir", str(tmp / "a_file" / "out")]
    else:
        raise AssertionError(case)
    config = write_config(tmp / "config.json", model_dir, data, training=training, **sections)
    return ["--config", str(config), "--output_dir", str(tmp / "out"), *extra]


CASES = {
    # config.json
    "missing_config": ["nope.json: config file not found"],
    "invalid_json": ["config.json: invalid JSON at line 1, column 38"],
    "unknown_key": ["config.json: training.batchsize: unknown key; did you mean batch_size?"],
    "wrong_type": ["config.json: training.max_steps: expected an integer or null, got \"ten\""],
    "batch_size_zero": ["training.batch_size: must be at least 1, got 0"],
    "negative_learning_rate": ["training.learning_rate: must be positive, got -0.1"],
    "max_length_below_fixed_parts": ["training.max_length=8 is smaller than the fixed prompt parts", "Raise"],
    "eval_without_validation": ["training.eval_steps: is 6 but data.validation_file is null"],
    "missing_data_file": ["data.train_file: file not found", "missing.jsonl"],
    "unsupported_extension": ["data.train_file: unsupported file type '.txt'", ".jsonl, .json, .csv, .parquet"],
    "several_config_problems": ["training.batch_size: must be at least 1", "training.learning_rate: must be positive",
                                "training.seedd: unknown key; did you mean seed?"],
    # ablation profiles
    "unknown_ablation": ["unknown ablation 'profile_and_histroy'", "history_only, profile_and_history, "
                         "profile_only, query_only"],
    "bad_ablation_file": ["abl.json: include_profiles: unknown key; did you mean include_profile?",
                          "abl.json: include_history: expected true or false"],
    # data
    "empty_data_file": ["train.jsonl: the file holds no records"],
    "malformed_jsonl_line": ["train.jsonl: line 2: invalid JSON"],
    "missing_query": ["train.jsonl: line 3: query is missing"],
    "missing_target": ["train.jsonl: line 1: target is missing"],
    "missing_profile_needed": ["train.jsonl: line 4: profile is missing but this ablation includes the profile"],
    "history_not_a_list": ["train.jsonl: line 1: history must be a list of items"],
    "target_longer_than_max_length": ["train.jsonl: line 2: the target alone is", "Raise max_length"],
    "non_utf8": ["train.jsonl: line 2: not valid UTF-8", "Save the file as UTF-8"],
    # DeepSpeed
    "deepspeed_config_missing": ["ds.json: DeepSpeed config not found"],
    "deepspeed_config_invalid_json": ["ds.json: invalid JSON at line 1"],
    "deepspeed_stage_2": ["ds.json: zero_optimization.stage is 2", "Set \"stage\": 3"],
    "deepspeed_contradicts_config": ["train_micro_batch_size_per_gpu is 16 but config.json training.batch_size "
                                     "gives 4", "\"auto\""],
    # late failures, now found before the model loads
    "seed_out_of_range": ["training.seed: must be in [0, 4294967295], got 4294967296"],
    "report_to_not_installed": ["training.report_to: tensorboard is not installed here", "pip install tensorboard"],
    "report_to_unknown": ["training.report_to: 'tensorbord' is not an integration transformers knows", "tensorboard"],
    "flash_attention_without_package": ["model.attn_implementation: flash_attention_2 needs the flash-attn package",
                                        "\"sdpa\""],
    "infinite_epochs": ["training.num_train_epochs: must be a positive, finite number, got inf"],
    "deepspeed_batch_contradiction": ["ds.json: ds train_batch_size=12 vs hf train_batch_size (calculated)=4",
                                      "\"auto\""],
    "deepspeed_offload_device": ["ds.json: DeepSpeed does not accept it", "offload_optimizer.device",
                                 "'none', 'cpu' or 'nvme'"],
    "deepspeed_unknown_optimizer": ["ds.json: optimizer.type 'AdamWW' is neither a DeepSpeed optimizer"],
    "deepspeed_unknown_key": ["ds.json: DeepSpeed does not accept it", "stage3_max_live_paramters",
                              "Extra inputs are not permitted"],
    "resume_path_not_a_checkpoint": ["--resume_from_checkpoint", "nowhere is not a complete checkpoint directory"],
    "mistyped_local_model_path": ["model.model_name_or_path: directory not found", "models/tiny-gemma",
                                  "exists, so this is a local path, not a hub id"],
    "unreachable_hub_id": ["model.tokenizer_name_or_path (or model_name_or_path): cannot load 'nobody/no-such-gemma'"],
    # data
    "duplicate_ids": ["train.jsonl: id 'u0001' is used by 2 records (line 2, line 5)"],
    "ids_shared_across_splits": ["4 ids are in both the train and the validation file (e.g. u0000, u0001, u0002)",
                                "data.allow_overlap"],
    "train_file_as_test_file": ["8 test examples are identical to training examples", "data.allow_overlap"],
    "empty_target": ["train.jsonl: line 6: target is empty"],
    "control_token_in_text": ["train.jsonl: line 3: query holds '<end_of_turn>', the tokenizer's control token text"],
    "two_fields_one_column": ["data.fields: query and target are all read from the column 'target'"],
    "unknown_history_field": ["train.jsonl: prompt.history_fields: no history item in this file has an attribute "
                              "'ratng'. Did you mean 'rating'? Its history items have: title, genre, rating."],
    "string_profile_with_fields": ["train.jsonl: line 1: profile is a string, but prompt.profile_fields selects "
                                   "attributes of objects", "set prompt.profile_fields to null"],
    "blank_line_location": ["train.jsonl: line 4: query is missing"],
    # --set
    "set_type_error": ["--set training.max_steps=ten: expected an integer or null, got \"ten\""],
    "set_range_error": ["--set training.batch_size=0: must be at least 1, got 0"],
    "set_unknown_key": ["--set training.batchsize=2: unknown key training.batchsize; did you mean batch_size?"],
    # model
    "model_without_config": ["empty_model has no config.json"],
    "non_gemma_model": ["is a 'llama' model, not a Gemma"],
    # output
    "finished_run": ["holds a finished run", "--overwrite_output_dir"],
    "unwritable_output_dir": ["cannot write there", "choose another --output_dir"],
}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_reported_before_the_model_loads(case, tmp_path, tiny_model):
    args = setup_case(case, tmp_path, tiny_model)
    before = snapshot(tmp_path)
    proc = run_script(args, processes=None, timeout=300)
    output = proc.stdout + proc.stderr
    assert snapshot(tmp_path) == before  # nothing the user had was changed, and nothing was added
    assert proc.returncode == 2, output[-3000:]
    assert proc.stderr.startswith("error: "), output[-3000:]
    for phrase in CASES[case]:
        assert phrase in proc.stderr, (phrase, proc.stderr)
    assert "Traceback" not in output
    for marker in MODEL_LOADING_MARKERS:
        assert marker not in output, marker
    assert not (tmp_path / "out" / RESULTS_NAME).exists() or case == "finished_run"


def test_precision_check_names_the_fix():
    assert check_precision("bfloat16", cuda=False, bf16_supported=False, device_name="cpu") == []
    assert check_precision("bfloat16", cuda=True, bf16_supported=True, device_name="NVIDIA H100") == []
    (problem,) = check_precision("bfloat16", cuda=True, bf16_supported=False, device_name="Tesla V100")
    assert "Tesla V100 has no bf16 support" in problem and "model.dtype to float32" in problem


def test_storage_estimate_and_parameter_count(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    n = count_parameters(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # safetensors keeps one copy of the tied embedding, as the model does
    assert n == sum(p.numel() for p in model.parameters())
    limited = TrainingConfig(save_total_limit=2, save_steps=100)
    assert storage_estimate(n, checkpoints_on_disk(limited, steps=1000)) == n * (16 * 3 + 2)
    assert count_parameters(tiny_model / "nowhere") is None


def test_storage_estimate_counts_every_checkpoint_when_the_limit_is_null():
    unlimited = TrainingConfig(save_total_limit=None, save_steps=10)
    assert checkpoints_on_disk(unlimited, steps=95) == 10  # steps 10, 20, ..., 90 and the last step
    assert checkpoints_on_disk(TrainingConfig(save_total_limit=2, save_steps=10), steps=95) == 3  # 2 + 1 being written
    assert checkpoints_on_disk(TrainingConfig(save_total_limit=5, save_steps=10), steps=20) == 2  # only 2 written
    by_epochs = TrainingConfig(save_total_limit=None, save_steps=10, batch_size=4, num_train_epochs=2)
    assert planned_steps(by_epochs, train_examples=400, processes=2) == 100  # 50 steps per epoch
    assert planned_steps(TrainingConfig(max_steps=7), train_examples=400, processes=2) == 7
