"""Shared fixtures: a tiny random Gemma built locally, small user-modelling data, configs, and the real launcher."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "Gemma"), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prepared data (finetune/data_cache.py) goes into a cache of this session's own, which the scripts it starts share
# (a script that imports this module, such as zero3_supervised_loss.py, finds the session's cache in its environment).
if "GEMMA_TEST_SESSION_CACHE" not in os.environ:
    os.environ["GEMMA_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="test-datasets-cache-")
os.environ["HF_DATASETS_CACHE"] = os.environ["GEMMA_TEST_SESSION_CACHE"]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["GEMMA_TEST_SESSION_CACHE"], ignore_errors=True)

from tiny_gemma import build_tiny_gemma  # noqa: E402

GENRES = ["comedy", "drama", "horror", "romance", "scifi"]


def make_records(n: int, seed: int = 0, max_history: int = 6, prefix: str = "u") -> list[dict]:
    """Records whose target is the genre the profile and the history point at: a tiny model can lower its loss."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        genre = rng.choice(GENRES)
        history = [{"title": f"film {rng.randint(1, 99)}", "genre": rng.choice([genre, rng.choice(GENRES)]),
                    "rating": rng.randint(1, 5)} for _ in range(rng.randint(1, max_history))]
        records.append({"id": f"{prefix}{i:04d}", "profile": {"age": rng.randint(18, 70), "occupation": f"{genre} critic"},
                        "history": history, "query": "Which genre should we recommend next?", "target": genre})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_config(path: Path, model_dir: Path, data_dir: Path, **sections) -> Path:
    """A config.json for the tiny model; keyword arguments update whole sections, e.g. training={...}."""
    cfg = {
        "model": {"model_name_or_path": str(model_dir), "dtype": "bfloat16"},
        "data": {"train_file": str(data_dir / "train.jsonl"), "validation_file": str(data_dir / "validation.jsonl")},
        "training": {"max_length": 128, "batch_size": 4, "eval_batch_size": 8, "learning_rate": 3e-3,
                     "max_steps": 12, "warmup_ratio": 0.0, "logging_steps": 2, "eval_steps": 6, "save_steps": 6},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma"))


@pytest.fixture(scope="session")
def tiny_model_chat(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma_chat"), chat_template=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    write_jsonl(d / "train.jsonl", make_records(64, seed=1))
    write_jsonl(d / "validation.jsonl", make_records(16, seed=2, prefix="v"))
    return d


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore::FutureWarning", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(args: list[str], *, processes: int | None = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run Gemma/train_deepspeed.py for real: under `accelerate launch --use_deepspeed` with `processes` ranks, or
    with plain python when processes is None."""
    script = str(REPO / "Gemma" / "train_deepspeed.py")
    if processes is None:
        cmd = [sys.executable, script, *args]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--use_deepspeed", "--num_processes", str(processes), script, *args]
    return subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=timeout)
