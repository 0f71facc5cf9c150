"""The prepared-data cache (finetune/data_cache.py, data.build_split): a cached split is the split prepared afresh,
in one process or several; any input that changes the examples makes a new entry; a killed or damaged build is never
served; concurrent builders take turns; the ranks of a launch share one build."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_records, read_json, run_script, write_config, write_jsonl
from finetune.config import Config, DataConfig, ModelConfig, PromptConfig
from finetune.data import EXAMPLE_FEATURES, build_split
from finetune.data_cache import EXAMPLES_DIRNAME, MANIFEST_NAME, cached_build, read_entry
from finetune.errors import UserError
from finetune.outputs import RESULTS_NAME
from finetune.prompts import PromptEncoder


def records_with_every_case(n: int = 300) -> list[dict]:
    records = make_records(n, seed=11, max_history=12)
    records[7]["profile"] = {"bio": "very long " * 200}  # fits in no prompt: dropped
    records[8]["id"] = None  # gets the split's generated id
    return records


def config_for(path: Path, workers: int | None = None, **prompt) -> Config:
    return Config(model=ModelConfig("x"), data=DataConfig(str(path), preprocessing_num_workers=workers),
                  prompt=PromptConfig(**prompt))


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def everything(split) -> tuple:
    return split.rows.to_dict(), dataclasses.asdict(split.stats), split.first_record, split.first_history_items


def test_a_split_from_the_cache_is_the_split_prepared_afresh_in_one_process_or_several(tiny_tokenizer, tmp_path,
                                                                                      caplog):
    path = write_jsonl(tmp_path / "train.jsonl", records_with_every_case())
    encoder = PromptEncoder(tiny_tokenizer, max_length=120)
    caplog.set_level(logging.INFO, logger="finetune.data")
    fresh = build_split(path, "train", config_for(path, workers=1), encoder, tmp_path / "cache_one")
    cached = build_split(path, "train", config_for(path, workers=1), encoder, tmp_path / "cache_one")
    parallel = build_split(path, "train", config_for(path, workers=2), encoder, tmp_path / "cache_two")
    built = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: prepared")]
    assert ["with 1 process" in built[0], "from the cache" in built[1], "with 2 process" in built[2]] == [True] * 3
    assert everything(fresh) == everything(cached) == everything(parallel)
    assert fresh.stats.dropped_too_long == 1 and fresh.stats.history_shortened > 0
    assert "train:8" in fresh.ids and "u0007" not in fresh.ids and len(fresh) == 299
    assert list(fresh.rows.features) == list(EXAMPLE_FEATURES)
    assert fresh.group_lengths.tolist() == fresh.column("group_length")
    assert fresh.locations[7] == f"{path}: line 9"  # record 7 was dropped: the 8th example is line 9


def test_any_input_that_changes_the_examples_makes_a_new_entry(tiny_tokenizer, tiny_model_chat, tmp_path):
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    path = write_jsonl(tmp_path / "train.jsonl", make_records(20, seed=4))
    base = build_split(path, "train", config_for(path), PromptEncoder(tiny_tokenizer, 128), cache)
    build_split(path, "train", config_for(path), PromptEncoder(tiny_tokenizer, 128), cache)  # the same: reused
    assert len(entries(cache)) == 1
    changed = make_records(20, seed=4)
    changed[3]["target"] = "western"
    write_jsonl(path, changed)  # same path, new content
    rebuilt = build_split(path, "train", config_for(path), PromptEncoder(tiny_tokenizer, 128), cache)
    assert rebuilt.targets[3] == "western" != base.targets[3]
    build_split(path, "train", config_for(path), PromptEncoder(tiny_tokenizer, 100), cache)  # max_length
    build_split(path, "train", config_for(path, include_history=False), PromptEncoder(tiny_tokenizer, 128),
                cache)  # the prompt
    build_split(path, "validation", config_for(path), PromptEncoder(tiny_tokenizer, 128), cache)  # the split
    chat = AutoTokenizer.from_pretrained(tiny_model_chat)  # the same vocabulary with a chat template
    build_split(path, "train", config_for(path), PromptEncoder(chat, 128), cache)
    assert len(entries(cache)) == 6
    build_split(path, "train", config_for(path, workers=2), PromptEncoder(tiny_tokenizer, 128), cache)
    assert len(entries(cache)) == 6  # how many processes prepare it changes nothing in it


def _build_then_die(cache: str) -> None:
    def build(directory: Path) -> dict:
        (directory / "half.arrow").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 or an out-of-memory kill would, mid-build
        return {}

    cached_build(Path(cache), "k", build)


def _good_build(directory: Path) -> dict:
    (directory / "examples.arrow").write_bytes(b"y" * 1000)
    return {"content": "complete"}


def test_a_killed_or_damaged_build_is_never_served(tmp_path, caplog):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {[str(REPO / 'Gemma'), str(REPO / 'tests')]};"
                           f"from test_data_cache import _build_then_die; _build_then_die({str(cache)!r})"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in cache.iterdir() if p.is_dir()][0].startswith("k.tmp-")  # what the killed build left
    assert read_entry(cache / "k", "k") is None
    entry, manifest, built = cached_build(cache, "k", _good_build)
    assert built and manifest["content"] == "complete"
    assert [p.name for p in cache.iterdir() if p.is_dir()] == ["k"]  # the leftover is gone

    with open(entry / "examples.arrow", "r+b") as f:  # damaged afterwards: truncated
        f.truncate(10)
    caplog.set_level(logging.WARNING, logger="finetune.data_cache")
    _, _, built = cached_build(cache, "k", _good_build)
    assert built and "does not match its manifest" in caplog.text
    assert (entry / "examples.arrow").stat().st_size == 1000
    assert cached_build(cache, "k", _good_build)[2] is False


def _slow_build(directory: Path) -> dict:
    import time

    time.sleep(2)
    (directory / "rows.arrow").write_text(str(os.getpid()))
    return {"built_by": os.getpid()}


def _builder(cache: str, results) -> None:
    entry, manifest, built = cached_build(Path(cache), "shared", _slow_build)
    results.put((os.getpid(), built, manifest["built_by"]))


def test_concurrent_builders_take_turns_and_one_builds(tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_builder, args=(str(tmp_path), results)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    outcomes = [results.get(timeout=5) for _ in workers]
    builders = [pid for pid, built, _ in outcomes if built]
    assert len(builders) == 1 and {by for _, _, by in outcomes} == set(builders)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["shared"]


def test_an_unwritable_cache_dir_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="data.cache_dir: cannot create .* set data.cache_dir in config.json"):
        cached_build(blocker / "cache", "k", _good_build)


def test_the_ranks_of_a_launch_share_one_build(tiny_model, data_dir, tmp_path):
    cache = tmp_path / "prepared"
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          data={"cache_dir": "prepared", "preprocessing_num_workers": 2},  # 2 preparing processes
                          training={"max_steps": 2, "eval_steps": 2, "save_steps": 2})
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = entries(cache)  # relative to config.json's directory
    assert len(built) == 2 and not list(cache.glob("*.tmp-*"))  # train and validation, each built once
    stats = {json.loads((e / MANIFEST_NAME).read_text())["split"]: json.loads((e / MANIFEST_NAME).read_text())["stats"]
             for e in built}
    results = read_json(tmp_path / "run" / RESULTS_NAME)
    assert stats == results["examples"]
    assert all((e / EXAMPLES_DIRNAME).is_dir() for e in built)
