"""The training examples every runner of benchmarks/speed.py trains on, tokenized exactly as Gemma/train_deepspeed.py
does (its package's load_settings, load_tokenizer, PromptEncoder and build_split), so the token sequences are
identical."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Which copy of train_deepspeed.py to measure: the working tree's by default; speed.py --gemma_dir sets another.
GEMMA_DIR_ENV = "SPEED_BENCH_GEMMA_DIR"
GEMMA_DIR = Path(os.environ.get(GEMMA_DIR_ENV) or REPO / "Gemma").resolve()
if str(GEMMA_DIR) not in sys.path:
    sys.path.insert(0, str(GEMMA_DIR))

from finetune.data import build_split  # noqa: E402
from finetune.prompts import IGNORE_INDEX, PromptEncoder, load_tokenizer  # noqa: E402,F401  (IGNORE_INDEX: runners)
from finetune.settings import load_settings, resolve_path  # noqa: E402


def load_train_examples(config_path: Path, ablation: str = "profile_and_history"):
    """(examples, tokenizer, cfg, model_path) for config_path's train_file under the given ablation profile."""
    cfg, _ = load_settings(config_path.resolve(), ablation, [])
    model_path = str(resolve_path(cfg.model.model_name_or_path, config_path.resolve().parent))
    tokenizer = load_tokenizer(model_path)
    encoder = PromptEncoder.for_prompt(tokenizer, cfg.training.max_length, cfg.prompt)
    split = build_split(resolve_path(cfg.data.train_file, config_path.resolve().parent), "train", cfg, encoder)
    return split.examples, tokenizer, cfg, model_path

