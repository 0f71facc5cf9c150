"""prompt.history_selection: which history items a prompt keeps when not all fit (finetune/prompts.kept_items):
the most recent, or the most relevant to the query by BM25 (LaMP's retrieval), shown oldest first; the same items in
every ablation; through the settings, the prepared data and the history_lengths design."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import run_script, write_config, write_jsonl
from finetune.config import Config, DataConfig, ModelConfig, PromptConfig
from finetune.data import build_split
from finetune.designs import history_lengths_design, load_design
from finetune.errors import UserError
from finetune.outputs import DRY_RUN_DIRNAME
from finetune.prompts import PromptEncoder, bm25_ranking, kept_items, render_user_message
from finetune.settings import load_settings

GENRES = ["comedy", "drama", "scifi", "romance"]
# Ten items, oldest first: horror only at positions 1 and 3, long before the most recent ones.
HISTORY = [{"title": f"film {i}", "genre": "horror" if i in (1, 3) else GENRES[i % 4], "rating": 4}
           for i in range(10)]
RECORD = {"id": "u1", "profile": {"age": 30}, "history": HISTORY, "query": "Recommend another horror film.",
          "target": "horror"}
BM25 = PromptConfig(history_selection="bm25")


def titles(items: list[dict]) -> list[str]:
    return [item["title"] for item in items]


def test_recent_keeps_the_last_items_and_bm25_the_ones_about_the_query():
    assert titles(kept_items(HISTORY, 2, "recent", RECORD["query"])) == ["film 8", "film 9"]
    assert titles(kept_items(HISTORY, 2, "bm25", RECORD["query"])) == ["film 1", "film 3"]  # oldest first
    # Past the matching items, the rest tie at no match: the more recent go first.
    assert titles(kept_items(HISTORY, 4, "bm25", RECORD["query"])) == ["film 1", "film 3", "film 8", "film 9"]
    assert kept_items(HISTORY, 0, "bm25", RECORD["query"]) == []
    assert kept_items(HISTORY, 10, "bm25", RECORD["query"]) == HISTORY  # all fit: nothing to choose
    # A query with no word in any item, or no words at all: recency.
    assert titles(kept_items(HISTORY, 2, "bm25", "???")) == ["film 8", "film 9"]
    assert bm25_ranking("", ("a", "b", "c")) == (2, 1, 0)
    # String items are ranked by their text.
    notes = ["liked a horror film", "went hiking", "read a novel"]
    assert kept_items(notes, 1, "bm25", "Any horror tonight?") == ["liked a horror film"]


def test_the_prompt_shows_the_relevant_items_whatever_attributes_it_shows():
    capped = dataclasses.replace(BM25, max_history_items=2)
    text = render_user_message(RECORD, capped, 10)
    assert "1. title: film 1; genre: horror; rating: 4\n2. title: film 3; genre: horror" in text
    # Hiding the genre changes what is shown, not which items: selection reads every value.
    titles_only = dataclasses.replace(capped, history_fields=["title"])
    assert "Interaction history (oldest first):\n1. title: film 1\n2. title: film 3\n" in \
        render_user_message(RECORD, titles_only, 10)


def test_prepared_examples_keep_the_relevant_items_and_every_ablation_the_same_examples(tiny_tokenizer, tmp_path):
    records = [dict(RECORD, id=f"u{i}") for i in range(6)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    full = PromptEncoder(tiny_tokenizer, 10_000, BM25)
    target_len = len(full.target_ids("horror"))
    # Room for the prompt with two items and the target: the fit keeps two of ten.
    two = len(full.prompt_ids(render_user_message(RECORD, BM25, 2))) + target_len
    seen = {}
    for ablation in ("profile_and_history", "history_only", "query_only"):
        prompt = dataclasses.replace(BM25, include_profile=ablation != "history_only",
                                     include_history=ablation != "query_only")
        encoder = PromptEncoder(tiny_tokenizer, two, prompt, BM25)
        split = build_split(path, "train", Config(ModelConfig("x"), DataConfig(str(path)), prompt), encoder)
        assert split.stats.history_shortened == 6
        seen[ablation] = split.stats.ids_sha256
        text = tiny_tokenizer.decode(split.examples[0]["input_ids"])
        if prompt.include_history:
            assert "film 1" in text and "film 3" in text and "film 9" not in text, text
    assert len(set(seen.values())) == 1
    # With recency the same budget keeps the last two items instead.
    recent = PromptConfig()
    split = build_split(path, "train", Config(ModelConfig("x"), DataConfig(str(path)), recent),
                        PromptEncoder(tiny_tokenizer, two, recent))
    text = tiny_tokenizer.decode(split.examples[0]["input_ids"])
    assert "film 8" in text and "film 9" in text and "film 1;" not in text


def test_a_misspelt_selection_is_refused_with_the_right_name(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, prompt={"history_selection": "BM25"})
    with pytest.raises(UserError) as error:
        load_settings(config, "profile_and_history", [])
    assert error.value.problems == [f'{config}: prompt.history_selection: "BM25" is not one of "recent", "bm25". '
                                    'Did you mean "bm25"?']
    with pytest.raises(UserError) as error:
        load_settings(config, "profile_and_history", ['prompt.history_selection="bm26"'])
    assert '--set prompt.history_selection="bm26": "bm26" is not one of "recent", "bm25". Did you mean "bm25"?' in \
        error.value.problems


def test_the_history_lengths_design_says_which_items_its_runs_keep(tiny_model, data_dir, tmp_path):
    assert history_lengths_design([0, 2]).runs[1].description.startswith("The 2 most recent history items")
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, prompt={"history_selection": "bm25"})
    design = load_design("history_lengths", [0, 2], config, [])
    assert design.runs[1].description.startswith("The 2 history items most relevant to the query (BM25)")
    assert load_design("history_lengths", [0, 2], config, ["prompt.history_selection=\"recent\""]).runs[1] \
        .description.startswith("The 2 most recent history items")  # --set applies to every run, the design too


def test_a_dry_run_shows_the_example_with_the_relevant_items(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [dict(RECORD, id=f"u{i}") for i in range(8)])
    config = write_config(tmp_path / "config.json", tiny_model, data, training={"eval_steps": None},
                          data={"validation_file": None},
                          prompt={"history_selection": "bm25", "max_history_items": 2})
    out = tmp_path / "out"
    proc = run_script(["--config", str(config), "--output_dir", str(out), "--dry_run"], processes=None, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / DRY_RUN_DIRNAME / "report.md").read_text()
    assert ("Interaction history (oldest first):\n1. title: film 1; genre: horror; rating: 4\n"
            "2. title: film 3; genre: horror; rating: 4\n\nQuery: Recommend another horror film.") in report
    assert "history shown, all attributes, the items most relevant to the query (BM25) when not all are kept." in report
