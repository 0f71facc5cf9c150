"""What this tool knows about Gemma checkpoints, without torch: which model types it trains and how, what it refuses
and why, Gemma's turn format for tokenizers that carry no chat template, and the mixture-of-experts blocks ZeRO-3 must
fetch whole. A new model family starts here (README: "Which Gemma?").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Gemma 1-3's turns, written as they are when the tokenizer has no chat template (Gemma 3 270M base has none).
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# Google's Gemma 3 chat template (google/gemma-3-*-it, tokenizer_config.json), which renders the Gemma turn format:
# a system message joins the first user turn. It is given to a tokenizer that has no template, so that the prompt
# is built one way for every tokenizer, and final/ is saved with it (apply_chat_template then rebuilds the training
# prompt exactly).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    """A Gemma generation as this tool treats it."""

    name: str
    multimodal: bool = False  # vision (and audio) towers beside the language model: frozen, only text is trained
    fp16_overflows: bool = False  # activations exceed fp16's range: bf16, or fp32 where there is no bf16
    moe_blocks: tuple[str, ...] = ()  # module classes whose experts ZeRO-3 must fetch as one (routing differs by rank)


FAMILIES = {
    "gemma": Family("Gemma 1"),
    "gemma2": Family("Gemma 2"),
    "gemma3_text": Family("Gemma 3 (270M, 1B)", fp16_overflows=True),
    "gemma3": Family("Gemma 3 (4B-27B, multimodal)", multimodal=True, fp16_overflows=True),
    "gemma3n_text": Family("Gemma 3n (text)", fp16_overflows=True),
    "gemma3n": Family("Gemma 3n (multimodal)", multimodal=True, fp16_overflows=True),
    "gemma4_text": Family("Gemma 4 (text)", fp16_overflows=True, moe_blocks=("Gemma4TextExperts",)),
    "gemma4": Family("Gemma 4 (multimodal)", multimodal=True, fp16_overflows=True,
                     moe_blocks=("Gemma4TextExperts",)),
}
# Gemma checkpoints that are not causal language models of the chat format this tool trains.
NOT_TRAINED = {
    "paligemma": "a vision-language model that answers about images, with its own prompt format",
    "t5gemma": "an encoder-decoder model", "t5gemma2": "an encoder-decoder model",
    "embedding_gemma2": "an embedding model", "shieldgemma2": "an image safety classifier",
    "recurrentgemma": "a RecurrentGemma (Griffin) model", "recurrent_gemma": "a RecurrentGemma (Griffin) model",
    "gemma4_assistant": "a draft model for speculative decoding", "diffusion_gemma": "a diffusion model",
    "gemma4_unified": "a unified Gemma 4 checkpoint this tool has not been tested with",
    "gemma4_unified_text": "a unified Gemma 4 checkpoint this tool has not been tested with",
    "vaultgemma": "a VaultGemma checkpoint this tool has not been tested with",
}


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def gemma_problem(model_type: Any, model: str, architectures: list[str] | None = None) -> str | None:
    """Why this checkpoint cannot be trained here (None: it can). `architectures` is config.json's list: an
    embedding checkpoint (EmbeddingGemma) has a Gemma 3 model_type but no causal-LM head."""
    supported = ", ".join(FAMILIES)
    if model_type in NOT_TRAINED:
        return (f"{model} is {NOT_TRAINED[model_type]} ({model_type!r}), not a causal Gemma this tool trains: it "
                f"renders Gemma chat turns and learns the answer. Use one of the model types {supported}.")
    if model_type not in FAMILIES:
        return (f"{model} is a {model_type!r} model, not a Gemma this tool trains ({supported}). This tool builds "
                "Gemma chat turns; use a Gemma checkpoint.")
    heads = ("ForCausalLM", "ForConditionalGeneration")
    if architectures and not any(a.endswith(heads) for a in architectures):
        return (f"{model} holds {', '.join(architectures)}: an embedding or encoder checkpoint without the language "
                "model head this tool trains. Use a causal Gemma checkpoint (…ForCausalLM or "
                "…ForConditionalGeneration).")
    return None


def precision_problem(model_type: str, dtype: str) -> str | None:
    family = family_of(model_type)
    if family is not None and family.fp16_overflows and dtype == "float16":
        return (f"model.dtype: float16 overflows in {family.name} (activations exceed its range); use bfloat16, or "
                "float32 on a GPU without bf16.")
    return None


def check_model_directory(model_dir: Path) -> list[str]:
    """A local model directory: it holds a readable config.json of a Gemma this tool trains."""
    config = model_dir / "config.json"
    if not config.is_file():
        return [f"{model_dir} has no config.json; point it at a directory written by save_pretrained (for the demo "
                "model: python Gemma/prepare_gemma.py)."]
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        model_type, architectures = data.get("model_type", ""), data.get("architectures")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        return [f"{config}: unreadable model config ({e})."]
    problem = gemma_problem(model_type, str(model_dir), architectures)
    return [problem] if problem else []
