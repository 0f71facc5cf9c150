"""What this tool knows about Gemma checkpoints, without torch: which model types it trains and their chat turn
markers. A new model family starts here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Gemma's chat turns: <start_of_turn>user ... <end_of_turn> <start_of_turn>model ... <end_of_turn>. Used as written
# when the tokenizer has no chat template (Gemma 3 270M base has none).
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"


def gemma_problem(model_type: Any, model: str) -> str | None:
    """This tool writes Gemma chat turns and relies on Gemma's turn tokens: other architectures are refused.
    Returns the message for a model that is not a Gemma, None for one that is."""
    if str(model_type).startswith("gemma"):
        return None
    return (f"{model} is a {model_type!r} model, not a Gemma (gemma, gemma2, gemma3...). This tool builds Gemma "
            "chat turns; use a Gemma checkpoint.")


def check_model_directory(model_dir: Path) -> list[str]:
    """A local model directory: it holds a readable config.json of a Gemma. Problems start with the model path."""
    config = model_dir / "config.json"
    if not config.is_file():
        return [f"{model_dir} has no config.json; point it at a directory written by save_pretrained (for the demo "
                "model: python Gemma/prepare_gemma.py)."]
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        return [f"{config}: unreadable model config ({e})."]
    problem = gemma_problem(model_type, str(model_dir))
    return [problem] if problem else []
