"""Records -> Gemma chat prompts -> token ids and labels, checked token by token."""

from __future__ import annotations

import json

import pytest
from conftest import make_records, write_jsonl
from finetune.config import Config, DataConfig, FieldNames, ModelConfig, PromptConfig
from finetune.data import build_split
from finetune.records import check_record, read_records
from finetune.errors import UserError
from finetune.prompts import IGNORE_INDEX, PromptEncoder, render_user_message
from finetune.settings import ABLATION_DIR, load_ablation

FULL = PromptConfig()
RECORD = {
    "id": "u1",
    "profile": {"age": 34, "occupation": "horror critic"},
    "history": [{"title": "first film", "genre": "drama", "rating": 2}, "second film (liked)",
                {"title": "third film", "genre": "horror", "rating": 5}],
    "query": "Which genre next?",
    "target": "horror",
}


def prompt_for(name: str) -> PromptConfig:
    return PromptConfig(**load_ablation(ABLATION_DIR / f"{name}.json", []).prompt)


def test_user_message_holds_exactly_the_sections_of_each_ablation():
    expected = {"profile_and_history": (True, True), "profile_only": (True, False),
                "history_only": (False, True), "query_only": (False, False)}
    for name, (has_profile, has_history) in expected.items():
        p = prompt_for(name)
        text = render_user_message(RECORD, p, 3)
        assert ("User profile:" in text) == has_profile, name
        assert ("occupation: horror critic" in text) == has_profile, name
        assert ("Interaction history" in text) == has_history, name
        assert ("third film" in text) == has_history, name
        assert text.endswith("Query: Which genre next?"), name
    full = render_user_message(RECORD, FULL, 3)
    # Order: profile, then history oldest first (most recent last), then the query.
    assert full.index("User profile") < full.index("first film") < full.index("second film") \
        < full.index("third film") < full.index("Query:")
    assert full == (
        "User profile:\n- age: 34\n- occupation: horror critic\n\n"
        "Interaction history (oldest first):\n1. title: first film; genre: drama; rating: 2\n"
        "2. second film (liked)\n3. title: third film; genre: horror; rating: 5\n\nQuery: Which genre next?"
    )


def test_history_selection_keeps_the_most_recent_items():
    history_only = PromptConfig(include_profile=False)
    text = render_user_message(RECORD, history_only, 1)
    assert "third film" in text and "first film" not in text and "second film" not in text
    assert "(none)" in render_user_message(RECORD, history_only, 0)
    string_profile = dict(RECORD, profile="Loves scary films.")
    profile_only = PromptConfig(include_history=False)
    assert "User profile:\nLoves scary films." in render_user_message(string_profile, profile_only, 0)


def test_labels_cover_only_the_target_and_end_of_turn(tiny_tokenizer):
    enc = PromptEncoder(tiny_tokenizer, max_length=512)
    ex = enc.encode(RECORD, FULL, history_items=3)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) == len(ex["attention_mask"])
    eot = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    target_ids = tiny_tokenizer("horror", add_special_tokens=False)["input_ids"]
    n_supervised = len(target_ids) + 1
    # Token by token: everything before the target is -100, the target and its <end_of_turn> are their own ids.
    for i, (tok, lab) in enumerate(zip(ids, labels)):
        if i < len(ids) - n_supervised:
            assert lab == IGNORE_INDEX, (i, tiny_tokenizer.decode([tok]))
        else:
            assert lab == tok
    assert ids[-1] == eot and ids[-n_supervised:-1] == target_ids
    assert ids.count(tiny_tokenizer.bos_token_id) == 1 and ids[0] == tiny_tokenizer.bos_token_id
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<bos><start_of_turn>user\nUser profile:")
    assert text.endswith("Query: Which genre next?<end_of_turn>\n<start_of_turn>model\nhorror<end_of_turn>")


def test_chat_template_and_gemma_fallback_give_the_same_tokens(tiny_tokenizer, tiny_model_chat):
    from transformers import AutoTokenizer

    chat_tok = AutoTokenizer.from_pretrained(tiny_model_chat)
    assert chat_tok.chat_template and not tiny_tokenizer.chat_template
    with_template = PromptEncoder(chat_tok, 512).encode(RECORD, FULL, 3)
    fallback = PromptEncoder(tiny_tokenizer, 512).encode(RECORD, FULL, 3)
    assert with_template == fallback
    assert with_template["input_ids"].count(chat_tok.bos_token_id) == 1


def test_long_examples_lose_their_oldest_history_first_and_never_the_target(tiny_tokenizer):
    rec = dict(RECORD, history=[f"item number {i} " + "words " * 8 for i in range(12)])
    full_len = len(PromptEncoder(tiny_tokenizer, 10_000).encode(rec, FULL, 12)["input_ids"])
    enc = PromptEncoder(tiny_tokenizer, max_length=full_len - 30)
    kept = enc.fitting_history(rec, len(enc.target_ids(rec["target"])))
    assert 0 < kept < 12
    ex = enc.encode(rec, FULL, kept)
    assert len(ex["input_ids"]) <= enc.max_length
    text = tiny_tokenizer.decode(ex["input_ids"])
    assert "item number 11" in text and "item number 0 " not in text
    assert text.endswith("horror<end_of_turn>")
    # One more item would not have fitted: the cut is the smallest possible.
    assert len(enc.encode(rec, FULL, kept + 1)["input_ids"]) > enc.max_length


def test_every_ablation_keeps_the_same_examples(tiny_tokenizer, tmp_path):
    records = make_records(40, seed=3, max_history=12)
    records[5]["profile"] = {"bio": "very long " * 200}  # cannot fit even without history: dropped everywhere
    path = write_jsonl(tmp_path / "train.jsonl", records)
    enc = PromptEncoder(tiny_tokenizer, max_length=120)
    seen = {}
    for name in ("profile_and_history", "profile_only", "history_only", "query_only"):
        cfg = Config(model=ModelConfig("x"), data=DataConfig(str(path)), prompt=prompt_for(name))
        split = build_split(path, "train", cfg, enc)
        assert "u0005" not in split.ids and len(split.targets) == len(split.ids) == len(split.examples)
        stats = split.stats
        seen[name] = (tuple(split.ids), stats.dropped_too_long, stats.history_shortened, stats.ids_sha256)
        assert all(len(e["input_ids"]) <= 120 for e in split.examples)
    assert len(set(seen.values())) == 1, seen
    _, dropped, shortened, _ = seen["query_only"]
    assert dropped == 1 and shortened > 0
    # The first example's record, kept for --dry_run, is the first one that fits (record 5 is the dropped one).
    first = records[0]
    assert split.first_record["id"] == first["id"]
    assert split.first_history_items == enc.fitting_history(first, len(enc.target_ids(first["target"]))) < 10


def test_a_target_longer_than_max_length_is_an_error(tiny_tokenizer, tmp_path):
    records = make_records(3)
    records[1]["target"] = "word " * 300
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = Config(model=ModelConfig("x"), data=DataConfig(str(path)))
    with pytest.raises(UserError, match=r"train.jsonl: line 2: the target alone is \d+ tokens"):
        build_split(path, "train", cfg, PromptEncoder(tiny_tokenizer, 128))


def test_record_problems_name_the_file_and_record(tiny_tokenizer, tmp_path):
    records = make_records(4)
    records[0].pop("query")
    records[1]["history"] = "not a list"
    records[3]["target"] = 5
    path = tmp_path / "train.jsonl"
    # Written by hand: datasets needs one type per column, so the bad types go in records of their own files.
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:1] + records[2:3]))
    cfg = Config(model=ModelConfig("x"), data=DataConfig(str(path)))
    with pytest.raises(UserError, match=r"train.jsonl: line 1: query is missing"):
        build_split(path, "train", cfg, PromptEncoder(tiny_tokenizer, 256))
    for bad, message in ((records[1], "history must be a list"), (records[3], "target must be a string")):
        problems = check_record(dict(bad), f"{path}: record 7", PromptConfig())
        assert len(problems) == 1 and problems[0].startswith(f"{path}: record 7: {message}")


def test_fields_the_ablation_does_not_use_may_be_missing(tmp_path):
    rec = {"id": "a", "profile": None, "history": None, "query": "q", "target": "t"}
    path = tmp_path / "x.jsonl"
    assert check_record(rec, f"{path}: record 1", prompt_for("query_only")) == []
    problems = check_record(rec, f"{path}: record 1", prompt_for("profile_and_history"))
    assert [p.split(": ", 2)[2] for p in problems] == [
        "profile is missing but this ablation includes the profile.",
        "history is missing but this ablation includes the history.",
    ]


def test_malformed_jsonl_line_is_located(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + '{"query": "x", \n' + json.dumps(RECORD) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl: line 2: invalid JSON"):
        read_records(path, FieldNames())


def test_empty_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl"):
        read_records(empty, FieldNames())
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(RECORD).encode() + b"\n" + b'{"query": "caf\xe9", "target": "x"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl: line 2: not valid UTF-8"):
        read_records(latin, FieldNames())


def test_csv_parquet_and_renamed_fields_read_the_same_records(tmp_path):
    import pandas as pd

    records = make_records(5, seed=4)
    renamed = [{"uid": r["id"], "user": r["profile"], "events": r["history"], "question": r["query"],
                "answer": r["target"]} for r in records]
    fields = FieldNames(profile="user", history="events", query="question", target="answer", id="uid")
    jsonl = write_jsonl(tmp_path / "a.jsonl", renamed)
    csv = tmp_path / "a.csv"
    pd.DataFrame([{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in renamed]
                 ).to_csv(csv, index=False)
    parquet = tmp_path / "a.parquet"
    pd.DataFrame(renamed).to_parquet(parquet)
    expected = [{"profile": r["profile"], "history": r["history"], "query": r["query"], "target": r["target"],
                 "id": r["id"]} for r in records]
    for path in (jsonl, csv, parquet):
        got = read_records(path, fields)
        # Arrow may order struct keys differently; compare content.
        assert [json.dumps(r, sort_keys=True) for r in got] == [json.dumps(r, sort_keys=True) for r in expected], path


def test_numeric_targets_are_read_as_the_text_the_model_writes(tmp_path):
    """A rating as target: in CSV every cell is text ("4" stays "4", "007" stays "007"), and a JSON number becomes its
    text, so the numeric metrics (MAE, RMSE) see the documented numeric case."""
    rows = [{"id": "007", "query": "Rate it 1-5.", "target": 4}, {"id": "8", "query": "Rate it.", "target": 3.5}]
    jsonl = write_jsonl(tmp_path / "ratings.jsonl", rows)
    csv = tmp_path / "ratings.csv"
    csv.write_text('id,query,target\n007,Rate it 1-5.,4\n8,"Rate it.","3.5"\n')
    for path in (jsonl, csv):
        records = read_records(path, FieldNames())
        assert [(r["id"], r["target"]) for r in records] == [("007", "4"), ("8", "3.5")], path
