"""Every Gemma family a researcher picks trains correctly: the prompt follows the family's published turn format token
by token, a 2-rank ZeRO-3 offload run trains and its final/ reloads, multimodal towers stay as they were and hold no
optimizer state, the mixture of experts does not hang, and what a family cannot do is refused before the model
loads. Tiny random models of each family (tests/tiny_gemma.py) with their published chat templates."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_records, run_script, write_config, write_jsonl
from finetune.config import PromptConfig
from finetune.outputs import FINAL_DIRNAME, RESULTS_NAME
from finetune.prompts import IGNORE_INDEX, PromptEncoder, load_tokenizer, render_user_message
from tiny_gemma import FAMILY_TURNS, build_tiny_gemma

RECORD = {"id": "u1", "profile": {"age": 34, "occupation": "horror critic"},
          "history": [{"title": "first film", "genre": "drama"}, "second film (liked)"],
          "query": "Which genre next?", "target": "horror"}
SYSTEM = "Be brief."
# (family, class AutoModelForCausalLM loads, module-name parts of what stays frozen)
TRAINED_FAMILIES = [
    ("gemma2", "Gemma2ForCausalLM", ()),
    ("gemma3_mm", "Gemma3ForConditionalGeneration", ("vision_tower", "multi_modal_projector")),
    ("gemma3n_text", "Gemma3nForCausalLM", ()),
    ("gemma4", "Gemma4ForCausalLM", ()),
    ("gemma4_moe", "Gemma4ForCausalLM", ()),
    ("gemma4_mm", "Gemma4ForConditionalGeneration", ("vision_tower", "audio_tower", "embed_vision", "embed_audio")),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {arch: build_tiny_gemma(root / arch, arch=arch, chat_template=True) for arch in FAMILY_TURNS}


@pytest.mark.parametrize("arch", list(FAMILY_TURNS))
def test_the_prompt_follows_the_published_turn_format_token_by_token(arch, models):
    turns = FAMILY_TURNS[arch]
    tokenizer = load_tokenizer(str(models[arch]))
    encoder = PromptEncoder(tokenizer, 512, PromptConfig(system=SYSTEM))
    example = encoder.encode(RECORD, PromptConfig(), 2)
    message = render_user_message(RECORD, PromptConfig(), 2)
    if turns["system"] == "own_turn":  # Gemma 4: a system turn of its own
        prompt = f"{turns['system_prefix']}{SYSTEM}{turns['end_of_turn']}{turns['user_prefix']}{message}"
    else:  # Gemma 1-3: the system text leads the first user turn (Gemma 1/2's templates refuse it: we place it so)
        prompt = f"{turns['user_prefix']}{SYSTEM}\n\n{message}"
    expected = (f"{turns['bos']}{prompt}{turns['end_of_turn']}{turns['generation_prompt']}horror"
                f"{turns['end_of_turn_token']}")
    assert tokenizer.decode(example["input_ids"]) == expected
    target = tokenizer("horror", add_special_tokens=False)["input_ids"]
    end_of_turn = tokenizer.convert_tokens_to_ids(turns["end_of_turn_token"])
    assert encoder.end_of_turn_id == end_of_turn != tokenizer.unk_token_id
    # labels: exactly the target and the token that ends the model's turn; everything before is masked
    supervised = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert supervised == target + [end_of_turn] == example["input_ids"][-len(supervised):]
    assert example["labels"][:-len(supervised)] == [IGNORE_INDEX] * (len(example["labels"]) - len(supervised))
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1 and example["input_ids"][0] == tokenizer.bos_token_id


def tower_weights(model: torch.nn.Module, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if any(part in name for part in parts)}


def optimizer_state_numel(checkpoint: Path) -> int:
    """fp32 master weights DeepSpeed keeps, over all ranks: the parameters the optimizer trains (and padding)."""
    total = 0
    for file in checkpoint.glob("global_step*/*optim_states.pt"):
        state = torch.load(file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        total += sum(t.numel() for t in state["fp32_flat_groups"])
    return total


@pytest.mark.parametrize("arch,model_class,towers", TRAINED_FAMILIES, ids=[f[0] for f in TRAINED_FAMILIES])
def test_every_family_trains_under_zero3_offload_on_two_ranks(arch, model_class, towers, models, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_records(32, seed=1))
    config = write_config(tmp_path / "config.json", models[arch], data, data={"validation_file": None},
                          prompt={"system": SYSTEM},
                          training={"max_steps": 4, "save_steps": 4, "eval_steps": None, "logging_steps": 1})
    out = tmp_path / "run"
    proc = run_script(["--config", str(config), "--output_dir", str(out)], timeout=420)  # a hang fails here
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / RESULTS_NAME).read_text())
    losses = [h["loss"] for h in results["log_history"] if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert (results["deepspeed"]["zero_stage"], results["deepspeed"]["offload_param"]) == (3, "cpu")
    final = out / FINAL_DIRNAME
    trained_model = AutoModelForCausalLM.from_pretrained(final)
    assert type(trained_model).__name__ == model_class
    trained, frozen = results["parameters"]["trained"], results["parameters"]["frozen"]
    fp32 = optimizer_state_numel(out / "checkpoint-4")
    assert trained <= fp32 < trained + max(frozen, 1)  # optimizer states for what is trained, none for the towers
    if towers:
        assert frozen > 0
        before = tower_weights(AutoModelForCausalLM.from_pretrained(models[arch]), towers)
        after = tower_weights(trained_model, towers)
        assert before and before.keys() == after.keys()
        for name, weight in before.items():  # unchanged: only rounded to bf16, the dtype the run trains in
            torch.testing.assert_close(after[name], weight.to(torch.bfloat16).to(after[name].dtype), rtol=0, atol=0)
    else:
        assert frozen == 0


REFUSALS = {
    "gemma2 with sdpa": ("gemma2", {"attn_implementation": "sdpa"},
                         "model.attn_implementation: Gemma2ForCausalLM does not support sdpa; use \"eager\" or "
                         "\"flash_attention_2\""),
    "multimodal Gemma 3 with flash-attn": ("gemma3_mm", {"attn_implementation": "flash_attention_2"},
                                           "Gemma3ForConditionalGeneration does not support flash_attention_2"),
    "Gemma 4 in float16": ("gemma4", {"dtype": "float16"}, "model.dtype: float16 overflows in Gemma 4 (text)"),
    "Gemma 3 in float16": ("gemma3_mm", {"dtype": "float16"}, "float16 overflows in Gemma 3 (4B-27B, multimodal)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_a_family_cannot_do_is_refused_before_the_model_loads(case, models, tmp_path, data_dir):
    arch, model, message = REFUSALS[case]
    config = write_config(tmp_path / "config.json", models[arch], data_dir, model=model)
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out")], processes=None)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "World size" not in proc.stdout


@pytest.mark.parametrize("model_type,architectures,message", [
    ("paligemma", ["PaliGemmaForConditionalGeneration"], "a vision-language model"),
    ("t5gemma", ["T5GemmaForConditionalGeneration"], "an encoder-decoder model"),
    ("gemma3_text", ["Gemma3TextModel"], "an embedding or encoder checkpoint"),  # EmbeddingGemma
])
def test_gemma_checkpoints_that_are_not_causal_chat_models_are_refused(model_type, architectures, message, tmp_path,
                                                                        data_dir):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": architectures}))
    config = write_config(tmp_path / "config.json", model, data_dir)
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out")], processes=None)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_gemma3n_multimodal_without_timm_is_a_clear_early_error(models, tmp_path, data_dir):
    """Gemma 3n's vision tower is a timm MobileNet: without timm the error comes before the model loads."""
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    from transformers import Gemma3nConfig

    model = tmp_path / "gemma3n"
    shutil.copytree(models["gemma3n_text"], model, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    Gemma3nConfig().save_pretrained(model)
    config = write_config(tmp_path / "config.json", model, data_dir)
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out")], processes=None)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Gemma3nForConditionalGeneration builds its vision tower with timm" in proc.stderr
    assert "pip install 'timm>=1.0.23'" in proc.stderr and "Traceback" not in proc.stderr
