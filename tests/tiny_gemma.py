"""Build a tiny, random-weight Gemma causal LM and a matching tokenizer, fully offline.

Tests (and CPU smoke runs of ``Gemma/train_deepspeed.py``) need a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load exactly like a
real Gemma checkpoint, but without the network and in a couple of seconds. This module writes one:

* **Tokenizer**: a ``tokenizers`` BPE with byte fallback (any text encodes, unicode included),
  trained in well under a second on a small corpus, wrapped in transformers' ``GemmaTokenizer``.
  Special tokens have Gemma's ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4,
  then ``<start_of_turn>`` 5 and ``<end_of_turn>`` 6 (the real Gemma 3 has those two at 105/106).
  ``tok(text)`` prepends ``<bos>`` and appends nothing, as Gemma does; the turn markers are single
  tokens even inside running text. With ``chat_template=True`` Gemma 3's official chat template is
  set; otherwise there is none (like the Gemma 3 270M GGUF tokenizer).
* **Model**: Gemma 3 (``Gemma3ForCausalLM``), Gemma 2 or Gemma 1, hidden size 64, 2 layers (one
  sliding-window, one global), 2 query heads / 1 KV head of size 32, tied embeddings, float32
  safetensors, deterministic for a given ``seed``. config.json carries
  ``"attn_implementation": "eager"``, so ``from_pretrained`` defaults to eager attention (an explicit
  ``attn_implementation=`` argument overrides it).

Usage::

    from tests.tiny_gemma import build_tiny_gemma
    path = build_tiny_gemma(tmp_path / "tiny", chat_template=True)

    python tests/tiny_gemma.py OUT_DIR [--chat_template] [--arch {gemma3,gemma2,gemma}] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path

# Nothing here may reach the Hub; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, normalizers, pre_tokenizers  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from tokenizers.trainers import BpeTrainer  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    PreTrainedModel,
)
from transformers.models.gemma.tokenization_gemma import GemmaTokenizer  # noqa: E402

__all__ = [
    "ARCHS",
    "GEMMA3_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "build_tiny_gemma",
    "build_tiny_tokenizer",
    "default_corpus",
    "main",
]

# Gemma's special tokens, in id order: pad 0, eos 1, bos 2, unk 3, mask 4 as in every Gemma; the two
# turn markers follow directly (ids 5 and 6 here).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
)
# Byte-fallback pieces, named as SentencePiece/Gemma names them.
_BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))

# Target vocabulary size (specials + 256 bytes + learned pieces); the corpus may yield slightly fewer.
VOCAB_SIZE = 1000

ARCHS: tuple[str, ...] = ("gemma3", "gemma2", "gemma")

# Gemma 3's chat template, as shipped in google/gemma-3-*-it tokenizer_config.json.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# ---------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------

_GENRES = ("comedy", "drama", "horror", "romance", "scifi", "action", "thriller", "documentary")
_OCCUPATIONS = (
    "engineer", "teacher", "student", "doctor", "artist", "writer", "lawyer", "nurse", "programmer",
    "scientist", "librarian", "farmer", "retired", "salesman", "technician", "executive", "homemaker",
    "administrator", "educator", "entertainment", "healthcare", "marketing", "none",
)  # fmt: skip
_GENDERS = ("female", "male", "other")
_ADJECTIVES = (
    "great", "boring", "funny", "scary", "beautiful", "slow", "exciting", "classic", "original", "dark",
    "charming", "clever", "predictable", "wonderful", "terrible", "brilliant", "strange", "moving",
    "violent", "gentle", "popular", "underrated", "famous", "recent", "short", "long",
)  # fmt: skip
_NOUNS = (
    "movie", "film", "story", "ending", "actor", "actress", "director", "plot", "soundtrack", "scene",
    "character", "series", "season", "episode", "book", "song", "album", "game", "product", "review",
    "friend", "family", "weekend", "evening", "cinema", "screen", "sequel", "trailer",
)  # fmt: skip
_VERBS = (
    "liked", "loved", "watched", "enjoyed", "hated", "recommended", "rated", "skipped", "bought",
    "finished", "started", "remembered", "preferred", "avoided", "shared", "reviewed",
)  # fmt: skip
_QUESTIONS = (
    "Which genre does this user prefer?",
    "Will the user like item {item} ({genre})?",
    "Recommend a genre for this user.",
    "What rating would the user give item {item}?",
    "Predict the next item the user will watch.",
)


def default_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Return ``n_lines`` deterministic lines of synthetic user-modelling text.

    Profiles, interaction histories with ratings, free-text reviews, queries and answers, as a
    training script would see them, so the learned merges cover the words it will tokenize.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < n_lines:
        genre = rng.choice(_GENRES)
        lines.append(
            f"User profile: age {rng.randint(18, 79)}, gender: {rng.choice(_GENDERS)}, "
            f"occupation: {rng.choice(_OCCUPATIONS)}, zip {rng.randint(10000, 99999)}."
        )
        history = "; ".join(
            f"item {rng.randint(0, 999)} ({rng.choice(_GENRES)}) rating {rng.randint(1, 5)}/5"
            for _ in range(rng.randint(2, 5))
        )
        lines.append(f"Interaction history: {history}.")
        lines.append(
            f"The user {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_GENRES)} "
            f"{rng.choice(_NOUNS)} with a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} and "
            f"{rng.choice(_VERBS)} the {rng.choice(_NOUNS)}, saying it was \"{rng.choice(_ADJECTIVES)}\"."
        )
        question = rng.choice(_QUESTIONS).format(item=rng.randint(0, 999), genre=genre)
        lines.append(f"Query: {question}\nAnswer: {genre}")
        lines.append(f"user\n{question}\nmodel\nThe user prefers {genre}! Score = {rng.random():.2f} (0-9).")
    return lines[:n_lines]


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def _train_bpe(corpus: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a Gemma-style BPE and return its ``(vocab, merges)``.

    Gemma normalises spaces to "▁" and splits digits into single tokens; training mirrors that (words
    split before each "▁", newlines and digits isolated) so no learned piece crosses a word or line
    boundary or joins digits. (GemmaTokenizer itself applies the merges to the whole text, unsplit.)
    The specials and the 256 byte pieces are passed as the trainer's special tokens, which puts them
    first, in order: ids 0..6 for the specials, 7..262 for the bytes.
    """
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*SPECIAL_TOKENS, *_BYTE_TOKENS],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None, *, chat_template: bool = False, vocab_size: int = VOCAB_SIZE
) -> GemmaTokenizer:
    """Train and return a tiny ``GemmaTokenizer`` (BPE, byte fallback, Gemma's specials and ids)."""
    lines: Iterable[str] = default_corpus() if corpus is None else corpus
    vocab, merges = _train_bpe(lines, vocab_size)
    for i, token in enumerate(SPECIAL_TOKENS):
        if vocab.get(token) != i:  # the trainer places special tokens first; guard that assumption
            raise RuntimeError(f"tokenizer training put {token!r} at id {vocab.get(token)}, expected {i}")
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        # add_bos_token must be passed: the backend's own default is False, whatever the docstring says.
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        # Right padding for training; transformers' GemmaTokenizer class default is "left".
        padding_side="right",
        chat_template=GEMMA3_CHAT_TEMPLATE if chat_template else None,
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def _build_model(arch: str, vocab_size: int, *, pad_id: int, bos_id: int, eos_id: int) -> PreTrainedModel:
    """Return a randomly initialised tiny causal LM of the given Gemma generation (float32)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        use_cache=True,
        attn_implementation="eager",  # Gemma 2/3 recommend eager (soft-capping); deterministic on CPU
    )
    # Gemma 2/3: one local (sliding-window) and one global layer, so both attention paths run; the
    # window is shorter than typical test sequences so it actually masks something.
    local_global = dict(
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=32,  # = head_dim, as in the real models
    )
    if arch == "gemma3":
        config = Gemma3TextConfig(**common, **local_global)
        model_cls: type[PreTrainedModel] = Gemma3ForCausalLM
    elif arch == "gemma2":
        config = Gemma2Config(**common, **local_global)
        model_cls = Gemma2ForCausalLM
    elif arch == "gemma":
        config = GemmaConfig(**common)
        model_cls = GemmaForCausalLM
    else:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    return model_cls(config).to(torch.float32)


def build_tiny_gemma(
    out_dir: str | Path,
    *,
    corpus: Iterable[str] | None = None,
    chat_template: bool = False,
    seed: int = 0,
    arch: str = "gemma3",
) -> Path:
    """Write a tiny random-weight Gemma causal LM and its tokenizer into ``out_dir``; return the path.

    Args:
        out_dir: directory to create (or overwrite files in).
        corpus: lines to train the BPE on; default: :func:`default_corpus` (user-modelling text).
        chat_template: set Gemma 3's official chat template; otherwise the tokenizer has none.
        seed: seeds the weight initialisation (``torch.manual_seed``); same seed, same weights.
        arch: ``"gemma3"`` (Gemma3ForCausalLM), ``"gemma2"`` or ``"gemma"``.

    The directory then loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` without any network access.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer(corpus, chat_template=chat_template)
    tokenizer.save_pretrained(out)

    # Seed only around model construction, restoring the caller's RNG state afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(
            arch,
            len(tokenizer),
            pad_id=tokenizer.pad_token_id,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
        )
    model.save_pretrained(out)  # float32 safetensors
    _persist_eager_attention(out / "config.json")
    return out


def _persist_eager_attention(config_path: Path) -> None:
    """Make ``from_pretrained`` default to eager attention for this checkpoint.

    transformers 5 never serialises the attention implementation (``_attn_implementation_internal``
    is dropped on save), so a reload would pick sdpa. A top-level ``"attn_implementation"`` key in
    config.json is honoured on load, and an explicit ``attn_implementation=`` argument still wins.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["attn_implementation"] = "eager"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python tests/tiny_gemma.py OUT_DIR [--chat_template] [--arch gemma3] [--seed 0]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model and tokenizer into")
    parser.add_argument("--chat_template", action="store_true", help="set Gemma 3's chat template")
    parser.add_argument("--arch", choices=ARCHS, default="gemma3", help="Gemma generation (default gemma3)")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (default 0)")
    args = parser.parse_args(argv)
    path = build_tiny_gemma(args.out_dir, chat_template=args.chat_template, seed=args.seed, arch=args.arch)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
