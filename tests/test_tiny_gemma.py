"""Tests for tests/tiny_gemma.py: the offline tiny Gemma fixture loads and behaves like a Gemma checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # any attempt to reach the Hub fails instead of hanging

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_gemma import (  # noqa: E402
    ARCHS,
    CHAT_TEMPLATE_SHA256,
    CHAT_TEMPLATES,
    EXAMPLE_MESSAGES,
    FAMILY_TURNS,
    GEMMA4_NAMED_TOKENS,
    SPECIAL_TOKENS,
    UNBUILDABLE_ARCHS,
    build_tiny_gemma,
    special_tokens_for,
)

import tiny_gemma  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# The original families, whose configs are flat (vocab_size, ids, ... at the top of config.json).
ORIGINAL_ARCHS = ("gemma3", "gemma2", "gemma")
NEW_ARCHS = tuple(arch for arch in ARCHS if arch not in ORIGINAL_ARCHS)
EXPECTED_MODEL_CLASS = {
    "gemma3": "Gemma3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma3_mm": "Gemma3ForConditionalGeneration",
    "gemma3n_text": "Gemma3nForCausalLM",
    "gemma4": "Gemma4ForCausalLM",
    "gemma4_moe": "Gemma4ForCausalLM",
    "gemma4_mm": "Gemma4ForConditionalGeneration",
}
EXPECTED_MODEL_TYPE = {
    "gemma3_mm": "gemma3",
    "gemma3n_text": "gemma3n_text",
    "gemma4": "gemma4_text",
    "gemma4_moe": "gemma4_text",
    "gemma4_mm": "gemma4",
}
CHAT_TEXT = (
    "<start_of_turn>user\nUser profile: age 34, occupation: engineer<end_of_turn>\n"
    "<start_of_turn>model\ncomedy<end_of_turn>\n"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One build per arch (no chat template), shared by the tests of this module."""
    return {arch: build_tiny_gemma(tmp_path_factory.mktemp(arch), arch=arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("chat"), chat_template=True)


@pytest.mark.parametrize("arch", ORIGINAL_ARCHS)  # the other families: test_new_family_reloads_and_trains
def test_reloads_and_forward_pass(built: dict[str, Path], arch: str) -> None:
    path = built[arch]
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

    assert type(model).__name__ == EXPECTED_MODEL_CLASS[arch]
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert model.config._attn_implementation == "eager"
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # Stored as float32 (tied lm_head not duplicated on disk).
    tensors = load_file(path / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}

    enc = tok(CHAT_TEXT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_special_token_ids_and_bos(built: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(built["gemma3"])
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)

    ids = tok("hi").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
    assert tok("hi", add_special_tokens=False).input_ids[0] != tok.bos_token_id

    # Turn markers are one id each, even glued to text.
    ids = tok(CHAT_TEXT, add_special_tokens=False).input_ids
    start, end = tok.convert_tokens_to_ids("<start_of_turn>"), tok.convert_tokens_to_ids("<end_of_turn>")
    assert ids.count(start) == 2 and ids.count(end) == 2
    assert ids[0] == start
    for marker in ("<start_of_turn>", "<end_of_turn>"):
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1


def test_unicode_round_trip(built: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(built["gemma3"])
    text = "naïve 東京 😀\n  two  spaces, tab\tend"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids  # byte fallback, never <unk>
    assert tok.decode(ids) == text
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_chat_template(chat_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(chat_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<bos><start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n")
    # 'assistant' becomes 'model', content is trimmed, a system prompt joins the first user turn.
    text = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " q "},
            {"role": "assistant", "content": " a "},
        ],
        tokenize=False,
    )
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nq<end_of_turn>\n<start_of_turn>model\na<end_of_turn>\n"
    # Tokenized, the template's <bos> is the only one.
    ids = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, return_dict=False)
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<start_of_turn>")]
    assert ids.count(tok.bos_token_id) == 1


def test_no_chat_template_by_default(built: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(built["gemma3"])
    assert tok.chat_template is None
    assert not (built["gemma3"] / "chat_template.jinja").exists()


def test_deterministic_per_seed(built: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_gemma(tmp_path / "again", seed=0)
    other = build_tiny_gemma(tmp_path / "other", seed=1)
    base = load_file(built["gemma3"] / "model.safetensors")
    same = load_file(again / "model.safetensors")
    diff = load_file(other / "model.safetensors")
    assert base.keys() == same.keys() == diff.keys()
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not all(torch.equal(base[k], diff[k]) for k in base)
    assert (again / "tokenizer.json").read_text() == (built["gemma3"] / "tokenizer.json").read_text()


def test_custom_corpus_and_bad_arch(tmp_path: Path) -> None:
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20
    path = build_tiny_gemma(tmp_path / "custom", corpus=corpus)
    tok = AutoTokenizer.from_pretrained(path)
    assert "▁quick" in tok.get_vocab()
    assert json.loads((path / "config.json").read_text())["vocab_size"] == len(tok)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_tiny_gemma(tmp_path / "bad", arch="llama")


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "tiny_gemma.py"), str(out), "--chat_template", "--arch", "gemma2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma2"
    assert AutoTokenizer.from_pretrained(out).chat_template is not None


# ---------------------------------------------------------------------------------------------------
# Every family: published chat templates and turn formats, tokenizers, models
# ---------------------------------------------------------------------------------------------------

# Module names of the multimodal parts, as transformers 5.24 names them.
MULTIMODAL_MODULES = {
    "gemma3_mm": {
        "model.vision_tower": "SiglipVisionModel",
        "model.multi_modal_projector": "Gemma3MultiModalProjector",
        "model.language_model": "Gemma3TextModel",
    },
    "gemma4_mm": {
        "model.vision_tower": "Gemma4VisionModel",
        "model.embed_vision": "Gemma4MultimodalEmbedder",
        "model.audio_tower": "Gemma4AudioModel",
        "model.embed_audio": "Gemma4MultimodalEmbedder",
        "model.language_model": "Gemma4TextModel",
    },
}


@pytest.fixture(scope="module")
def chat_built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One build per arch with its family's published chat template."""
    return {arch: build_tiny_gemma(tmp_path_factory.mktemp(f"chat_{arch}"), chat_template=True, arch=arch) for arch in ARCHS}


def example_messages(arch: str) -> list[dict[str, str]]:
    messages = list(EXAMPLE_MESSAGES)
    return messages[1:] if FAMILY_TURNS[arch]["system"] == "unsupported" else messages


def test_published_chat_templates_byte_for_byte() -> None:
    import hashlib

    for name, digest in CHAT_TEMPLATE_SHA256.items():
        assert hashlib.sha256(getattr(tiny_gemma, name).encode("utf-8")).hexdigest() == digest, name
    # Gemma 4's E2B/E4B template is the large models' one without the empty thought channel of the generation prompt.
    assert "{{- '<|channel>thought\\n<channel|>' -}}" in tiny_gemma.GEMMA4_LARGE_CHAT_TEMPLATE
    assert "{{- '<|channel>thought\\n<channel|>' -}}" not in tiny_gemma.GEMMA4_CHAT_TEMPLATE
    assert set(CHAT_TEMPLATES) == set(ARCHS) == set(FAMILY_TURNS)


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_renders_the_published_turn_format(chat_built: dict[str, Path], arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(chat_built[arch])
    turns = FAMILY_TURNS[arch]
    assert tok.chat_template == CHAT_TEMPLATES[arch]
    assert (chat_built[arch] / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATES[arch]

    # The example, and the same text assembled from the published parts.
    text = tok.apply_chat_template(example_messages(arch), tokenize=False)
    assert text == turns["example"]
    turn = lambda prefix, content: prefix + content + turns["end_of_turn"]  # noqa: E731
    if turns["system"] == "own_turn":
        expected = turns["bos"] + turn(turns["system_prefix"], "Be brief.") + turn(turns["user_prefix"], "Hi")
    elif turns["system"] == "first_user_turn":
        expected = turns["bos"] + turn(turns["user_prefix"], "Be brief.\n\nHi")
    else:
        expected = turns["bos"] + turn(turns["user_prefix"], "Hi")
        with pytest.raises(Exception, match="System role not supported"):
            tok.apply_chat_template(list(EXAMPLE_MESSAGES), tokenize=False)
    assert text == expected + turn(turns["model_prefix"], "Yo")
    assert turns["end_of_turn"] == turns["end_of_turn_token"] + "\n"
    assert turns["user_prefix"].startswith(turns["start_of_turn_token"])

    # The generation prompt (thinking off: Gemma 4's default).
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == turns["bos"] + turn(turns["user_prefix"], "Hi") + turns["generation_prompt"]

    # Turn tokens are one token each, glued to text too; tokenized, the template's <bos> is the only one.
    for marker in (turns["start_of_turn_token"], turns["end_of_turn_token"]):
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1, marker
    ids = tok.apply_chat_template(example_messages(arch), return_dict=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.convert_tokens_to_ids(turns["end_of_turn_token"])) == text.count(turns["end_of_turn_token"])

    # Media content renders the placeholder the family's processor expands (one token, where the tokenizer has it).
    for kind, placeholder in turns["media"].items():
        content = [{"type": kind}, {"type": "text", "text": "Hi"}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        assert placeholder in text
        if arch != "gemma3":  # the original gemma3 tokenizer keeps its 7 specials
            assert len(tok(placeholder, add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize("arch", ["gemma4", "gemma4_moe"])
def test_gemma4_thinking(chat_built: dict[str, Path], arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(chat_built[arch])
    thinking = FAMILY_TURNS[arch]["thinking"]
    user = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    # Thinking on: <|think|> heads the system turn, and the model opens its thought channel itself.
    assert text == "<bos>" + thinking["system_prefix"] + "<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *user], tokenize=False, enable_thinking=True
    )
    assert text.startswith("<bos>" + thinking["system_prefix"] + "Be brief.<turn|>\n")
    # A model turn's thoughts are not replayed in the history.
    answer = thinking["channel_open"] + "hmm" + thinking["channel_close"] + "Yo"
    text = tok.apply_chat_template([*user, {"role": "assistant", "content": answer}], tokenize=False)
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\nYo<turn|>\n"
    for token in ("<|think|>", "<|channel>", "<channel|>"):
        assert len(tok(token, add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_special_tokens_and_bos(built: dict[str, Path], arch: str) -> None:
    tok = AutoTokenizer.from_pretrained(built[arch])
    specials = special_tokens_for(arch)
    assert [tok.convert_tokens_to_ids(t) for t in specials] == list(range(len(specials)))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert set(specials) <= set(tok.all_special_tokens)
    ids = tok("hi user profile").input_ids
    # Gemma 1-3 tokenizers prepend <bos>; Gemma 4's leave it to the chat template.
    assert (ids[0] == tok.bos_token_id) == (not arch.startswith("gemma4"))
    assert tok.eos_token_id not in ids and tok.unk_token_id not in ids
    if arch.startswith("gemma4"):
        for name, token in GEMMA4_NAMED_TOKENS.items():
            assert getattr(tok, name) == token and getattr(tok, f"{name}_id") == tok.convert_tokens_to_ids(token)
    elif arch in ("gemma3_mm", "gemma3n_text"):
        assert (tok.boi_token, tok.image_token, tok.eoi_token) == ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
        if arch == "gemma3n_text":
            assert (tok.boa_token, tok.audio_token, tok.eoa_token) == ("<start_of_audio>", "<audio_soft_token>", "<end_of_audio>")
    assert tok.decode(tok("naïve 東京 😀", add_special_tokens=False).input_ids) == "naïve 東京 😀"


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_new_family_reloads_and_trains(chat_built: dict[str, Path], arch: str) -> None:
    path = chat_built[arch]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == EXPECTED_MODEL_CLASS[arch]
    assert model.config.model_type == EXPECTED_MODEL_TYPE[arch]
    text = model.config.get_text_config()
    assert text.vocab_size == len(tok) and text.hidden_size == 64 and text.num_hidden_layers == 2
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert text.layer_types == ["sliding_attention", "full_attention"]
    for sub in ("text_config", "vision_config", "audio_config"):
        config = getattr(model.config, sub, None) or (model.config if sub == "text_config" else None)
        assert config is None or config._attn_implementation == "eager", sub
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.float32}
    if arch.startswith("gemma4"):  # the global layer's head size is a per-layer value, as in the real configs
        assert text.per_layer_config[1].head_dim == 64 and text.per_layer_config[0].head_dim == 32
        assert text.final_logit_softcapping == 30.0
    if arch in ("gemma4", "gemma4_mm", "gemma3n_text"):
        assert text.hidden_size_per_layer_input == 16

    enc = tok.apply_chat_template(example_messages(arch), return_dict=True, return_tensors="pt")
    out = model(**enc, labels=enc["input_ids"])
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss) and 0 < out.loss.item() < 20
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_gemma4_moe_block(built: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(built["gemma4_moe"])
    text = model.config
    assert (text.enable_moe_block, text.num_experts, text.top_k_experts, text.moe_intermediate_size) == (True, 4, 2, 32)
    assert text.attention_k_eq_v and text.hidden_size_per_layer_input == 0
    kv_heads = [text.per_layer_config[i].num_key_value_heads for i in range(2)]
    assert kv_heads == [2, 1]  # sliding / global layer, as 26B-A4B's 8 / 2
    modules = dict(model.named_modules())
    for i in range(2):
        assert type(modules[f"model.layers.{i}.router"]).__name__ == "Gemma4TextRouter"
        assert type(modules[f"model.layers.{i}.experts"]).__name__ == "Gemma4TextExperts"
        assert type(modules[f"model.layers.{i}.mlp"]).__name__ == "Gemma4TextMLP"  # the dense MLP runs alongside
    assert modules["model.layers.0.experts"].gate_up_proj.shape == (4, 2 * 32, 64)
    ids = torch.arange(10, 60).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert modules["model.layers.0.experts"].gate_up_proj.grad.abs().sum() > 0  # tokens were routed to experts


def test_gemma3_mm_image_forward(built: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(built["gemma3_mm"])
    model = AutoModelForCausalLM.from_pretrained(built["gemma3_mm"])
    modules = dict(model.named_modules())
    assert {name: type(modules[name]).__name__ for name in MULTIMODAL_MODULES["gemma3_mm"]} == MULTIMODAL_MODULES["gemma3_mm"]
    config = model.config
    assert (config.boi_token_id, config.eoi_token_id, config.image_token_id) == (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id)
    image = tok.boi_token + tok.image_token * config.mm_tokens_per_image + tok.eoi_token
    enc = tok(f"<start_of_turn>user\n{image}What genre?<end_of_turn>\n", return_tensors="pt")
    image_tokens = enc.input_ids == tok.image_token_id
    assert int(image_tokens.sum()) == config.mm_tokens_per_image == 4
    size = config.vision_config.image_size
    out = model(**enc, pixel_values=torch.rand(1, 3, size, size), token_type_ids=image_tokens.long(), labels=enc.input_ids)
    assert torch.isfinite(out.loss)


def test_gemma4_mm_image_and_audio_forward(built: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(built["gemma4_mm"])
    model = AutoModelForCausalLM.from_pretrained(built["gemma4_mm"])
    modules = dict(model.named_modules())
    assert {name: type(modules[name]).__name__ for name in MULTIMODAL_MODULES["gemma4_mm"]} == MULTIMODAL_MODULES["gemma4_mm"]
    config = model.config
    assert (config.image_token_id, config.audio_token_id, config.boi_token_id, config.boa_token_id) == (
        tok.image_token_id, tok.audio_token_id, tok.boi_token_id, tok.boa_token_id)
    # One image of 3x3 patches (16x16 pixels, as the processor flattens them), pooled 3x3 into one soft token.
    patch = config.vision_config.patch_size
    positions = torch.tensor([[[x, y] for y in range(3) for x in range(3)]])
    enc = tok(f"<bos><|turn>user\n{tok.boi_token}{tok.image_token}{tok.eoi_token}Hi<turn|>\n", return_tensors="pt")
    out = model(**enc, pixel_values=torch.rand(1, 9, 3 * patch * patch), image_position_ids=positions, labels=enc.input_ids)
    assert torch.isfinite(out.loss)
    # 64 frames of 128 mel bins; the conformer's subsampler makes 16 soft tokens of them.
    features, mask = torch.rand(1, 64, 128), torch.ones(1, 64, dtype=torch.bool)
    n_audio = int(model.model.get_audio_features(features, mask).attention_mask.sum())
    assert n_audio == 16
    enc = tok(f"<bos><|turn>user\n{tok.boa_token}{tok.audio_token * n_audio}{tok.eoa_token}Hi<turn|>\n", return_tensors="pt")
    out = model(**enc, input_features=features, input_features_mask=mask, labels=enc.input_ids)
    assert torch.isfinite(out.loss)


def test_new_family_is_deterministic_per_seed(built: dict[str, Path], tmp_path: Path) -> None:
    base = load_file(built["gemma4_mm"] / "model.safetensors")
    same = load_file(build_tiny_gemma(tmp_path / "again", arch="gemma4_mm") / "model.safetensors")
    other = load_file(build_tiny_gemma(tmp_path / "other", arch="gemma4_mm", seed=1) / "model.safetensors")
    assert base.keys() == same.keys() == other.keys()
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not all(torch.equal(base[k], other[k]) for k in base if k.endswith("weight"))


def test_gemma3n_multimodal_is_refused_with_the_reason(tmp_path: Path) -> None:
    assert "gemma3n" not in ARCHS and "timm" in UNBUILDABLE_ARCHS["gemma3n"]
    with pytest.raises(ValueError, match="timm"):
        build_tiny_gemma(tmp_path / "g3n", arch="gemma3n")
    assert not (tmp_path / "g3n").exists()
