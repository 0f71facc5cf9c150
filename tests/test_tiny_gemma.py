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
from tiny_gemma import ARCHS, SPECIAL_TOKENS, build_tiny_gemma  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED_MODEL_CLASS = {
    "gemma3": "Gemma3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma": "GemmaForCausalLM",
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


@pytest.mark.parametrize("arch", ARCHS)
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
