"""Prompt rendering control: prompt.instruction, prompt.profile_fields and prompt.history_fields. Selected attributes
only, in the listed order; the instruction first in the user turn; names checked against the training file before the
model loads; every ablation keeps the same examples whatever attributes or instruction it shows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import make_records, run_script, write_config, write_jsonl
from finetune.comparison import flatten_config
from finetune.config import Ablation, Config, DataConfig, FieldNames, ModelConfig, PromptConfig
from finetune.data import build_split
from finetune.records import check_record, field_list_problems, present_attributes, read_records
from finetune.errors import UserError
from finetune.outputs import DRY_RUN_DIRNAME, RESOLVED_CONFIG_NAME
from finetune.prompts import PromptEncoder, render_user_message
from finetune.run_identity import flatten, resume_differences, run_identity
from finetune.settings import load_settings

RECORD = {
    "id": "u1",
    "profile": {"age": 34, "occupation": "horror critic", "city": "Leeds"},
    "history": [{"title": "first film", "genre": "drama", "rating": 2, "timestamp": 964982703},
                {"title": "third film", "genre": "horror", "rating": 5, "timestamp": 964982931}],
    "query": "Which genre next?",
    "target": "horror",
}
MODEL_LOADING_MARKERS = ("World size", "Loading weights", "Activation checkpointing:")


def problems_of(config: Path, ablation: str = "profile_and_history", overrides: list[str] = ()) -> list[str]:
    with pytest.raises(UserError) as err:
        load_settings(config, ablation, list(overrides))
    return err.value.problems


def profile_file(tmp_path: Path, name: str, **keys) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"description": name, **keys}))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def test_selected_fields_only_in_the_listed_order():
    prompt = PromptConfig(profile_fields=["occupation", "age"], history_fields=["genre", "title"])
    assert render_user_message(RECORD, prompt, 2) == (
        "User profile:\n- occupation: horror critic\n- age: 34\n\n"
        "Interaction history (oldest first):\n1. genre: drama; title: first film\n2. genre: horror; title: third film"
        "\n\nQuery: Which genre next?")


def test_null_fields_show_every_attribute_as_before():
    every = PromptConfig(profile_fields=list(RECORD["profile"]), history_fields=list(RECORD["history"][0]))
    assert render_user_message(RECORD, PromptConfig(), 2) == render_user_message(RECORD, every, 2)
    assert "timestamp: 964982931" in render_user_message(RECORD, PromptConfig(), 2)


def test_an_attribute_a_record_lacks_is_absent_not_empty():
    record = {**RECORD, "profile": {"age": 34, "occupation": None}}  # Arrow gives a missing attribute null
    text = render_user_message(record, PromptConfig(profile_fields=["city", "age", "occupation"]), 0)
    assert "User profile:\n- age: 34\n\n" in text and "city" not in text and "occupation" not in text


def test_instruction_leads_the_user_turn_in_every_ablation():
    instruction = "Recommend one genre for this user."
    for include_profile, include_history in ((True, True), (False, False)):
        prompt = PromptConfig(instruction=instruction, include_profile=include_profile,
                              include_history=include_history)
        text = render_user_message(RECORD, prompt, 2)
        assert text.startswith(instruction + "\n\n")
        assert text.endswith("\n\nQuery: Which genre next?")
        assert ("User profile:" in text) == include_profile


def test_instruction_follows_a_system_text_that_joins_the_user_turn(tiny_tokenizer):
    """The tiny tokenizer has no chat template: Gemma's, with no system turn, so the system text leads the user turn
    and the instruction comes after it, before the sections."""
    prompt = PromptConfig(system="You are a recommender.", instruction="Answer with one genre.",
                          profile_fields=["city"])
    encoder = PromptEncoder(tiny_tokenizer, 512, prompt)
    text = tiny_tokenizer.decode(encoder.encode(RECORD, prompt, 2)["input_ids"])
    assert text.startswith("<bos><start_of_turn>user\nYou are a recommender.\n\nAnswer with one genre.\n\n"
                           "User profile:\n- city: Leeds\n\nInteraction history")


def test_gemma4_keeps_the_system_text_in_its_own_turn_and_the_instruction_in_the_user_turn():
    from tiny_gemma import FAMILY_TURNS, build_tiny_tokenizer

    tokenizer, turns = build_tiny_tokenizer(chat_template=True, arch="gemma4"), FAMILY_TURNS["gemma4"]
    prompt = PromptConfig(system="You are a recommender.", instruction="Answer with one genre.")
    text = PromptEncoder(tokenizer, 512, prompt).prompt_text(render_user_message(RECORD, prompt, 2))
    assert text.startswith(f"{turns['bos']}{turns['system_prefix']}You are a recommender.{turns['end_of_turn']}"
                           f"{turns['user_prefix']}Answer with one genre.\n\nUser profile:\n")


def test_section_lengths_add_up_with_an_instruction_and_selected_fields(tiny_tokenizer):
    prompt = PromptConfig(instruction="Answer with one genre.", profile_fields=["age"], history_fields=["genre"])
    encoder = PromptEncoder(tiny_tokenizer, 512, prompt)
    sections = encoder.section_lengths(RECORD, prompt, 2)
    assert list(sections) == ["template", "instruction", "profile", "history", "query", "target"]
    assert min(sections.values()) > 0
    assert sum(sections.values()) == len(encoder.encode(RECORD, prompt, 2)["input_ids"])
    # Without an instruction the table is as before: no instruction column.
    assert "instruction" not in encoder.section_lengths(RECORD, PromptConfig(), 2)


# ----------------------------------------------------------------------------------------------------------------------
# Validation: config, ablation profiles, data
# ----------------------------------------------------------------------------------------------------------------------


def test_config_problems_with_the_new_keys_are_reported_together(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          prompt={"profile_fields": [], "history_fields": ["genre", "genre", " "], "instruction": " "})
    problems = "\n".join(problems_of(config))
    assert "config.json: prompt.profile_fields: is empty" in problems and "include_profile to false" in problems
    assert "prompt.history_fields: names 'genre' more than once" in problems
    assert "prompt.history_fields: holds an empty name" in problems
    assert "config.json: prompt.instruction: is empty; give the task text, or null" in problems
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, prompt={"profile_fieldz": ["age"]})
    assert any("prompt.profile_fieldz: unknown key; did you mean profile_fields?" in p for p in problems_of(config))


def test_an_ablation_profile_sets_the_fields_and_its_problems_name_the_file(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          prompt={"instruction": "Answer with one genre."})
    no_age = profile_file(tmp_path, "no_age", profile_fields=["occupation"])
    cfg, ablation = load_settings(config, str(no_age), [])
    assert cfg.prompt.profile_fields == ["occupation"] and cfg.prompt.history_fields is None
    assert cfg.prompt.instruction == "Answer with one genre."  # config.json's, kept by the profile
    assert ablation.prompt == {"profile_fields": ["occupation"]}
    assert ablation.study_prompt == PromptConfig(instruction="Answer with one genre.")  # before the profile
    bad = profile_file(tmp_path, "bad", profile_fields="occupation")
    problems = problems_of(config, str(bad))
    assert any(p.startswith(f"{bad}: profile_fields: expected a list or null") for p in problems), problems
    empty = profile_file(tmp_path, "empty", history_fields=[])
    problems = problems_of(config, str(empty))
    assert any(p.startswith(f"{empty}: history_fields: is empty") for p in problems), problems
    # --set names itself
    problems = problems_of(config, overrides=["prompt.history_fields=[]"])
    assert any(p.startswith("--set prompt.history_fields=[]: is empty") for p in problems), problems


def test_unknown_field_names_are_refused_with_the_names_that_exist(tmp_path):
    records = [RECORD, {**RECORD, "id": "u2", "profile": {"age": 20, "zip": "LS1"}}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    read = read_records(path, FieldNames())
    problems = field_list_problems(present_attributes(read), path, PromptConfig(profile_fields=["agee", "zip"],
                                                            history_fields=["genre", "timestmp", "year"]))
    assert problems == [
        f"{path}: prompt.profile_fields: no profile in this file has an attribute 'agee'. Did you mean 'age'? Its "
        "profiles have: age, occupation, city, zip.",
        f"{path}: prompt.history_fields: no history item in this file has an attribute 'timestmp'. Did you mean "
        "'timestamp'? Its history items have: title, genre, rating, timestamp.",
        f"{path}: prompt.history_fields: no history item in this file has an attribute 'year'. Its history items "
        "have: title, genre, rating, timestamp.",
    ]
    # "zip" is in one record only: allowed, and the other record shows its other attributes
    assert field_list_problems(present_attributes(read), path, PromptConfig(profile_fields=["zip", "age"])) == []


def test_a_string_profile_or_item_with_a_field_list_is_refused():
    record = {**RECORD, "profile": "Loves scary films.", "history": [RECORD["history"][0], "a film I liked"]}
    where = "train.jsonl: line 3"
    assert check_record(record, where, PromptConfig()) == []  # all attributes: strings are shown as they are
    problems = check_record(record, where, PromptConfig(include_profile=False, profile_fields=["age"],
                                                        history_fields=["title"]))
    assert problems == [
        "train.jsonl: line 3: profile is a string, but prompt.profile_fields selects attributes of objects; give it "
        "as an object, or set prompt.profile_fields to null.",
        "train.jsonl: line 3: history item 2 is a string, but prompt.history_fields selects attributes of objects; "
        "give it as an object, or set prompt.history_fields to null.",
    ]


def test_control_token_text_in_the_instruction_is_refused(tiny_tokenizer):
    encoder = PromptEncoder(tiny_tokenizer, 512, PromptConfig(instruction="Answer, then <end_of_turn>."),
                            study=PromptConfig(system="<start_of_turn>model"))
    with pytest.raises(UserError) as err:
        encoder.check_fixed_parts()
    assert err.value.problems == [
        "prompt.instruction: holds '<end_of_turn>', the tokenizer's control token text: the model would read it as "
        "markup, not as words. Rewrite it (e.g. 'end of turn').",
        "prompt.system: holds '<start_of_turn>', the tokenizer's control token text: the model would read it as "
        "markup, not as words. Rewrite it (e.g. 'end of turn').",
    ]


def test_unknown_field_names_end_the_real_cli_before_the_model_loads(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, prompt={"history_fields": ["genre"]})
    typo = profile_file(tmp_path, "typo", profile_fields=["occupaton"])
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--ablation_config",
                       str(typo), "--dry_run"], processes=None, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "prompt.profile_fields: no profile in this file has an attribute 'occupaton'. Did you mean " \
           "'occupation'? Its profiles have: age, occupation." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(marker in proc.stdout + proc.stderr for marker in MODEL_LOADING_MARKERS)
    assert not (tmp_path / "out" / DRY_RUN_DIRNAME / "report.md").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The same examples in every ablation
# ----------------------------------------------------------------------------------------------------------------------


def split_for(config: Path, ablation: str | Path, tokenizer, path: Path, name: str = "train"):
    cfg, profile = load_settings(config, str(ablation), [])
    encoder = PromptEncoder.for_prompt(tokenizer, cfg.training.max_length, cfg.prompt, profile.study_prompt)
    return build_split(path, name, cfg, encoder)


def long_records() -> list[dict]:
    records = make_records(40, seed=3, max_history=12)
    for i, rec in enumerate(records):
        rec["profile"]["bio"] = "likes " + "old films " * (i % 7) * 6  # some records long enough to lose history
    return records


def test_ablations_differing_in_fields_or_instruction_keep_the_same_examples(tiny_model, tiny_tokenizer, tmp_path):
    data = tmp_path / "data"
    train = write_jsonl(data / "train.jsonl", long_records())
    write_jsonl(data / "validation.jsonl", make_records(4, seed=5, prefix="v"))
    config = write_config(tmp_path / "config.json", tiny_model, data, training={"max_length": 160},
                          prompt={"instruction": "Recommend the genre this user will like next, in one word."})
    ablations = {
        "every attribute": "profile_and_history",
        "no bio, no rating": profile_file(tmp_path, "no_bio", profile_fields=["occupation", "age"],
                                          history_fields=["genre", "title"]),
        "one attribute, shorter instruction": profile_file(tmp_path, "short", profile_fields=["age"],
                                                           instruction="One word."),
        "no instruction, query only": profile_file(tmp_path, "bare", instruction=None, include_profile=False,
                                                   include_history=False),
    }
    splits = {name: split_for(config, ablation, tiny_tokenizer, train) for name, ablation in ablations.items()}
    reference = splits["every attribute"]
    assert 0 < reference.stats.dropped_too_long and 0 < reference.stats.history_shortened  # the fit mattered
    for name, split in splits.items():
        assert split.ids == reference.ids, name
        assert (split.stats.ids_sha256, split.stats.dropped_too_long, split.stats.history_shortened) == (
            reference.stats.ids_sha256, reference.stats.dropped_too_long, reference.stats.history_shortened), name
        assert split.group_lengths.tolist() == reference.group_lengths.tolist(), name  # the same length-grouped batches
        assert max(len(e["input_ids"]) for e in split.examples) <= 160, name
    no_bio = tiny_tokenizer.decode(splits["no bio, no rating"].examples[0]["input_ids"])
    assert "bio:" not in no_bio and "rating:" not in no_bio and "- occupation:" in no_bio
    assert sum(map(len, (e["input_ids"] for e in splits["no bio, no rating"].examples))) < sum(
        map(len, (e["input_ids"] for e in reference.examples)))


def test_a_profile_instruction_longer_than_config_jsons_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    """The examples are fitted on config.json's prompt; a profile whose instruction makes examples outgrow
    max_length would have to drop or cut them, and so differ from the other ablations: refused, saying how to fix."""
    data = tmp_path / "data"
    train = write_jsonl(data / "train.jsonl", long_records())
    write_jsonl(data / "validation.jsonl", make_records(4, seed=5, prefix="v"))
    config = write_config(tmp_path / "config.json", tiny_model, data, training={"max_length": 160})
    wordy = profile_file(tmp_path, "wordy", instruction="Think about this user carefully. " * 6)
    with pytest.raises(UserError) as err:
        split_for(config, wordy, tiny_tokenizer, train)
    message = str(err.value)
    assert "examples are longer than training.max_length=160 with this run's prompt" in message
    assert f"{train}: line " in message and "this run's prompt.instruction (from the ablation profile or --set)" \
        in message and "Give config.json the longest system text and instruction of the study" in message


def test_comparison_and_run_identity_treat_the_new_keys_as_prompt_keys(tmp_path):
    cfg = Config(model=ModelConfig("m"), data=DataConfig("t.jsonl"),
                 prompt=PromptConfig(instruction="One word.", profile_fields=["age"]))
    flat = flatten(dataclasses.asdict(cfg))
    assert flat["prompt.profile_fields"] == ["age"] and flat["prompt.instruction"] == "One word."
    # compare_ablations: ablations may differ in any prompt key, --set prompt.* included
    resolved = {**dataclasses.asdict(cfg), "cli": {"overrides": ["prompt.history_fields=[\"genre\"]"]}}
    assert not [k for k in flatten_config(resolved) if k.startswith("prompt.")]
    assert flatten_config(resolved)["cli.overrides"] == []
    # a resumed run that shows other attributes, or fits on another instruction, learns something else: refused
    train = write_jsonl(tmp_path / "train.jsonl", [RECORD])
    before = run_identity(cfg, Ablation("a", "d", study_prompt=cfg.prompt), {"train": train}, "hub/m", "hub/m", 1, {})
    changed = dataclasses.replace(cfg, prompt=dataclasses.replace(cfg.prompt, profile_fields=["age", "city"]))
    now = run_identity(changed, Ablation("a", "d", study_prompt=PromptConfig()), {"train": train}, "hub/m", "hub/m",
                       1, {})
    refused, _ = resume_differences(before, now, 1)
    assert any(line.startswith("prompt.profile_fields: ") for line in refused), refused
    assert any(line.startswith("config.json's prompt texts") for line in refused), refused
    del before["examples_fitted_on"]  # a checkpoint from before the key was recorded
    refused, _ = resume_differences(before, now, 1)
    assert not any(line.startswith("config.json's prompt texts") for line in refused), refused


# ----------------------------------------------------------------------------------------------------------------------
# The dry run shows the example under the run's prompt
# ----------------------------------------------------------------------------------------------------------------------


def test_dry_run_shows_the_rendered_example_under_the_runs_prompt(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          prompt={"instruction": "Recommend one genre."})
    no_age = profile_file(tmp_path, "no_age", profile_fields=["occupation"], history_fields=["genre"])
    out = tmp_path / "out"
    proc = run_script(["--config", str(config), "--output_dir", str(out), "--ablation_config", str(no_age),
                       "--dry_run"], processes=None, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / DRY_RUN_DIRNAME / "report.md").read_text()
    first = read_records(data_dir / "train.jsonl", FieldNames())[0]
    # the user turn: the instruction, then only the listed attributes (the oldest history items may not fit)
    assert ("<start_of_turn>user\nRecommend one genre.\n\nUser profile:\n- occupation: "
            + first["profile"]["occupation"] + "\n\nInteraction history (oldest first):\n1. genre: ") in report
    assert f". genre: {first['history'][-1]['genre']}\n\nQuery: {first['query']}<end_of_turn>" in report
    assert "- age:" not in report.split("## One example")[1].split("## Memory")[0]
    assert "This ablation's prompt: an instruction; profile shown, attributes occupation; history shown, " \
           "attributes genre." in report
    plan = json.loads((out / DRY_RUN_DIRNAME / "plan.json").read_text())
    assert list(plan["example"]["sections"]) == ["template", "instruction", "profile", "history", "query", "target"]
    resolved = json.loads((out / DRY_RUN_DIRNAME / RESOLVED_CONFIG_NAME).read_text())
    assert resolved["prompt"]["profile_fields"] == ["occupation"] and resolved["prompt"]["history_fields"] == ["genre"]
    assert resolved["prompt"]["instruction"] == "Recommend one genre."
    assert resolved["ablation"]["profile_fields"] == ["occupation"]
