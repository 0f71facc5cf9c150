"""Study designs (finetune/designs.py, run_study.py --design): each design's run list (names, prompt keys,
reference), leave_one_out's attributes read from the training file and its refusals, history_lengths' checks, the
same examples in every run of each design, the profile files a study writes (and a rerun's refusal when they would
change), and the comparison's main metric against the history length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_records, script_env, write_config, write_jsonl
from finetune.comparison import comparison_table, seed_comparison, seed_groups
from finetune.finished_runs import load_runs
from finetune.data import build_split
from finetune.designs import (HISTORY_LENGTH_KEY, SECTIONS_ABLATIONS, history_lengths_design, leave_one_out_design,
                              load_design, override_conflicts, parse_design, sections_design, write_profiles)
from finetune.config import PromptConfig
from finetune.errors import UserError
from finetune.outputs import RESULTS_NAME
from finetune.prompts import PromptEncoder
from finetune.settings import ABLATION_DIR, load_settings
from finetune.study import planned_runs
from test_compare_ablations import PNG_SIGNATURE, genre_predictions, make_run

import compare_ablations as ca
import run_study


def records_with(profiles: list) -> list[dict]:
    return [{"id": f"u{i}", "profile": p, "history": [], "query": "q", "target": "t"} for i, p in enumerate(profiles)]


def keys_of(design) -> list[tuple[str, dict]]:
    return [(run.name, run.prompt) for run in design.runs]


# ----------------------------------------------------------------------------------------------------------------------
# The run list of each design
# ----------------------------------------------------------------------------------------------------------------------


def test_sections_is_the_four_shipped_profiles_as_before():
    design = sections_design()
    assert [r.name for r in design.runs] == list(SECTIONS_ABLATIONS) == run_study.SHIPPED_ABLATIONS
    assert design.reference == "profile_and_history" and design.x_axis is None and all(r.shipped for r in design.runs)
    for run in design.runs:
        assert run.profile() == json.loads((ABLATION_DIR / f"{run.name}.json").read_text())
    assert write_profiles(design, Path("unused")) == list(SECTIONS_ABLATIONS)  # passed by name, nothing written
    assert run_study.parse_args(["--output_dir", "s"]).ablations == list(SECTIONS_ABLATIONS)  # no --design: as ever


def test_leave_one_out_drops_each_attribute_of_the_training_file_in_first_seen_order():
    records = records_with([{"age": 30, "occupation": "critic"}, {"occupation": "chef", "city": None},
                            {"age": 41, "city": "Leeds", "occupation": "nurse"}])
    design = leave_one_out_design(PromptConfig(), records, Path("train.jsonl"))
    assert keys_of(design) == [
        ("all_attributes", {"include_profile": True, "profile_fields": ["age", "occupation", "city"]}),
        ("without_age", {"include_profile": True, "profile_fields": ["occupation", "city"]}),
        ("without_occupation", {"include_profile": True, "profile_fields": ["age", "city"]}),
        ("without_city", {"include_profile": True, "profile_fields": ["age", "occupation"]}),
    ]
    assert design.reference == "all_attributes" and design.x_axis is None
    assert design.keys() == ["prompt.include_profile", "prompt.profile_fields"]
    assert design.runs[2].description == "Every profile attribute but 'occupation': what 'occupation' is worth."
    # config.json's list: the attributes the study shows, in its order
    listed = leave_one_out_design(PromptConfig(profile_fields=["city", "age"]), records, Path("train.jsonl"))
    assert keys_of(listed)[1:] == [("without_city", {"include_profile": True, "profile_fields": ["age"]}),
                                   ("without_age", {"include_profile": True, "profile_fields": ["city"]})]


@pytest.mark.parametrize("profiles, prompt, message", [
    ([{"age": 3, "job": "x"}, "a 30-year-old critic"], PromptConfig(),
     "train.jsonl: record 2 (id 'u1') has a string profile, as 1 of its 2 records do; --design leave_one_out leaves "
     "out one profile attribute at a time, so it needs object profiles"),
    ([{"age": 3}, {"age": 4, "job": None}], PromptConfig(),
     "train.jsonl: the profiles have 1 attribute(s) (age); --design leave_one_out needs at least two"),
    ([{"age": 3, "job": "x"}], PromptConfig(profile_fields=["job"]),
     "config.json's prompt.profile_fields lists 1 attribute(s) (job)"),
    ([{"home city": "a", "home/city": "b", "age": 3}], PromptConfig(),
     "attributes whose run names clash or are empty (without_home_city: 'home city', 'home/city')"),
])
def test_leave_one_out_refusals_say_why_and_how_to_fix(profiles, prompt, message):
    with pytest.raises(UserError) as err:
        leave_one_out_design(prompt, records_with(profiles), Path("train.jsonl"))
    assert message in str(err.value)


def test_history_lengths_one_run_per_length_with_the_largest_as_reference():
    design = history_lengths_design([2, 0, 8, 4])
    assert keys_of(design) == [(f"history_{n}", {"include_history": True, "max_history_items": n})
                               for n in (2, 0, 8, 4)]
    assert design.reference == "history_8" and design.x_axis == HISTORY_LENGTH_KEY == "prompt.max_history_items"
    assert parse_design(["history_lengths", "2", "0", "8"]) == ("history_lengths", [2, 0, 8])
    assert parse_design(["leave_one_out"]) == ("leave_one_out", [])


@pytest.mark.parametrize("argv, message", [
    (["--design", "history_lengths", "4"], "needs at least two lengths to draw a curve"),
    (["--design", "history_lengths", "1", "-2"], "lengths must be >= 0, got 1, -2."),
    (["--design", "history_lengths", "1", "two"], "expected whole numbers, got 'two'"),
    (["--design", "history_lengths", "1", "2", "1"], "1 given more than once; list each length once."),
    (["--design", "leave_one_out", "3"], "--design leave_one_out takes no arguments, got 3."),
    (["--design", "leave_one_ot"], "--design leave_one_ot: unknown design. Did you mean leave_one_out?"),
    (["--design", "sections", "--ablations", "query_only"], "--ablations and --design both choose the runs"),
])
def test_design_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_study.parse_args(["--output_dir", "study", *argv])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_set_of_a_key_the_design_sets_is_refused():
    design = history_lengths_design([1, 2])
    assert override_conflicts(design, ["prompt.max_history_items=3", "prompt.instruction=Hi", "training.seed=1"]) == [
        "--set prompt.max_history_items=3: the history_lengths design sets prompt.max_history_items in each of its "
        "runs; drop the --set (the design's keys: prompt.include_history, prompt.max_history_items)."]
    with pytest.raises(UserError, match="--set prompt.include_profile=false: the sections design sets"):
        load_design("sections", [], Path("config.json"), ["prompt.include_profile=false"])


# ----------------------------------------------------------------------------------------------------------------------
# Every run of a design keeps the same examples
# ----------------------------------------------------------------------------------------------------------------------


def long_records() -> list[dict]:
    """Profiles of three attributes, some long enough (bio) that examples lose history items or do not fit."""
    records = make_records(40, seed=3, max_history=12)
    for i, rec in enumerate(records):
        rec["profile"]["bio"] = "likes " + "old films " * (i % 7) * 6
    return records


@pytest.mark.parametrize("design_words", [["sections"], ["leave_one_out"], ["history_lengths", "0", "1", "3"]])
def test_every_run_of_each_design_keeps_the_same_examples(design_words, tiny_model, tiny_tokenizer, tmp_path):
    data = tmp_path / "data"
    train = write_jsonl(data / "train.jsonl", long_records())
    validation = write_jsonl(data / "validation.jsonl", make_records(8, seed=5, prefix="v", max_history=12))
    config = write_config(tmp_path / "config.json", tiny_model, data, training={"max_length": 160})
    design = load_design(*parse_design(design_words), config, [])
    ablations = write_profiles(design, tmp_path / "study" / "designs")
    assert [Path(a).stem for a in ablations] == [r.name for r in design.runs]

    splits = {}
    for ablation in ablations:
        cfg, profile = load_settings(config, ablation, [])
        assert profile.name == Path(ablation).stem  # results.json's ablation is the design's run name
        encoder = PromptEncoder.for_prompt(tiny_tokenizer, cfg.training.max_length, cfg.prompt, profile.study_prompt)
        splits[profile.name] = {name: build_split(path, name, cfg, encoder)
                                for name, path in (("train", train), ("validation", validation))}
    reference = splits[design.reference]["train"]
    assert reference.stats.dropped_too_long > 0 and reference.stats.history_shortened > 0  # the fit mattered
    for name, by_split in splits.items():
        for split_name, split in by_split.items():
            ref = splits[design.reference][split_name]
            assert (split.ids, split.stats.ids_sha256, split.group_lengths.tolist()) == (
                ref.ids, ref.stats.ids_sha256, ref.group_lengths.tolist()), (name, split_name)
    tokens = {name: sum(len(e["input_ids"]) for e in s["train"].examples) for name, s in splits.items()}
    assert len(set(tokens.values())) == len(tokens)  # and yet every run's prompt is another one
    if design.name == "history_lengths":
        assert tokens["history_0"] < tokens["history_1"] < tokens["history_3"]
        first = tiny_tokenizer.decode(splits["history_1"]["train"].examples[0]["input_ids"])
        assert "Interaction history (oldest first):\n1. " in first and "\n2. " not in first
    if design.name == "leave_one_out":
        assert [r.name for r in design.runs] == ["all_attributes", "without_age", "without_occupation",
                                                 "without_bio"]
        text = tiny_tokenizer.decode(splits["without_occupation"]["train"].examples[0]["input_ids"])
        assert "- age:" in text and "- bio:" in text and "occupation" not in text


# ----------------------------------------------------------------------------------------------------------------------
# The files a study writes, and a rerun
# ----------------------------------------------------------------------------------------------------------------------


def test_profiles_are_written_once_and_a_rerun_that_would_change_them_is_refused(tmp_path):
    directory = tmp_path / "designs"
    design = leave_one_out_design(PromptConfig(), records_with([{"age": 3, "job": "x"}]), Path("train.jsonl"))
    paths = write_profiles(design, directory)
    assert paths == [str(directory / f"{n}.json") for n in ("all_attributes", "without_age", "without_job")]
    assert json.loads(Path(paths[1]).read_text()) == {
        "description": "Every profile attribute but 'age': what 'age' is worth.", "include_profile": True,
        "profile_fields": ["job"]}
    written = {p: Path(p).stat().st_mtime_ns for p in paths}
    assert write_profiles(design, directory) == paths  # the same design again: resumed, files untouched
    assert {p: Path(p).stat().st_mtime_ns for p in paths} == written

    grown = leave_one_out_design(PromptConfig(), records_with([{"age": 3, "job": "x", "city": "y"}]),
                                 Path("train.jsonl"))  # the training file gained an attribute
    with pytest.raises(UserError) as err:
        write_profiles(grown, directory)
    problems = err.value.problems
    assert problems[0].startswith(f"{directory}: the leave_one_out design now gives other profiles than this "
                                  "study's files (has the training file or config.json's prompt changed?)")
    assert "Start the study in a new --output_dir, or delete each file below" in problems[0]
    assert [p.split(":")[0].strip(" -") for p in problems[1:]] == [str(directory / f"{n}.json") for n in
                                                                    ("all_attributes", "without_age", "without_job")]
    assert not (directory / "without_city.json").exists()  # nothing written
    assert {p: Path(p).stat().st_mtime_ns for p in paths} == written


def test_a_design_with_seeds_plans_every_run_of_every_seed(tmp_path):
    args = run_study.parse_args(["--output_dir", str(tmp_path / "study"), "--design", "history_lengths", "1", "2",
                                 "--seeds", "5", "7", "--set", "training.max_steps=5"])
    run_study.apply_design(args)
    designs = tmp_path / "study" / "designs"
    runs = planned_runs(args.ablations, args.seeds, args.output_dir)
    assert [(Path(r.ablation).name, r.seed, r.name) for r in runs] == [
        ("history_1.json", 5, "history_1-seed5"), ("history_2.json", 5, "history_2-seed5"),
        ("history_1.json", 7, "history_1-seed7"), ("history_2.json", 7, "history_2-seed7")]
    assert (args.reference, args.x_axis) == ("history_2", "prompt.max_history_items")
    cmd = run_study.launch_command(args, runs[0], cuda=True)
    assert cmd[cmd.index("--ablation_config") + 1] == str(designs / "history_1.json")
    assert cmd[-4:] == ["--set", "training.max_steps=5", "--set", "training.seed=5"]
    # without --design the reference is the full prompt's, and --reference still wins
    plain = run_study.parse_args(["--output_dir", "s"])
    run_study.apply_design(plain)
    assert (plain.reference, plain.x_axis) == ("profile_and_history", None)
    chosen = run_study.parse_args(["--output_dir", str(tmp_path / "s2"), "--design", "history_lengths", "1", "2",
                                   "--reference", "history_1"])
    run_study.apply_design(chosen)
    assert chosen.reference == "history_1"


# ----------------------------------------------------------------------------------------------------------------------
# The comparison: the main metric against the history length
# ----------------------------------------------------------------------------------------------------------------------


def history_run(root: Path, n: int, right: int, seed: int | None = None) -> Path:
    """A finished history_<n> run: make_run's full-prompt run with the design's profile and name."""
    name = f"history_{n}" + ("" if seed is None else f"-seed{seed}")
    changes = {"prompt.max_history_items": n}
    if seed is not None:
        changes.update({"training.seed": seed, "cli.overrides": [f"training.seed={seed}"]})
    out = make_run(root, name, "profile_and_history", genre_predictions(40, set(range(right)), seed=n),
                   config_changes=changes)
    for file_name, section in (("results.json", None), ("resolved_config.json", "ablation")):
        doc = json.loads((out / file_name).read_text())
        if section is None:
            doc["ablation"] = f"history_{n}"
        else:
            doc[section]["name"] = f"history_{n}"
        (out / file_name).write_text(json.dumps(doc))
    return out


def test_the_main_metric_against_the_history_length(tmp_path):
    import matplotlib.image

    dirs = [history_run(tmp_path, n, right) for n, right in ((1, 20), (4, 34), (2, 28))]
    runs = load_runs(dirs)
    rows = comparison_table(runs, runs[1], n_resamples=200)
    assert ca.x_values(runs, rows, HISTORY_LENGTH_KEY) == [1.0, 4.0, 2.0]
    path = tmp_path / "by_n.png"
    ca.plot_against(runs, rows, HISTORY_LENGTH_KEY, path, 0.95)
    image = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE and image.shape[1] >= 700 and image[..., :3].std() > 0.05

    result = subprocess.run([sys.executable, str(REPO / "Gemma" / "compare_ablations.py"), *map(str, dirs),
                             "--reference", "history_4", "--x_axis", HISTORY_LENGTH_KEY, "--bootstrap", "200"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "comparison_by_max_history_items.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| history_4 (reference) |" in result.stdout and "comparison_by_max_history_items.png" in result.stderr

    missing = subprocess.run([sys.executable, str(REPO / "Gemma" / "compare_ablations.py"), *map(str, dirs),
                              "--x_axis", "prompt.max_history_itms", "--bootstrap", "200"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "--x_axis prompt.max_history_itms: every run needs a number there" in missing.stderr
    assert "  - history_1: history_1=null" in missing.stderr


def test_the_history_length_plot_of_a_study_of_several_seeds(tmp_path):
    dirs = [history_run(tmp_path, n, right + seed, seed) for seed in (1, 2) for n, right in ((1, 20), (3, 30))]
    runs = load_runs(dirs)
    ablation_rows, run_rows = seed_comparison(seed_groups(runs), "history_3", n_resamples=200)
    assert ca.x_values(runs, ablation_rows, HISTORY_LENGTH_KEY) == [1.0, 3.0]
    path = tmp_path / "by_n_seeds.png"
    ca.plot_against(runs, ablation_rows, HISTORY_LENGTH_KEY, path, 0.95, run_rows)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# ----------------------------------------------------------------------------------------------------------------------
# One real study
# ----------------------------------------------------------------------------------------------------------------------


def test_a_history_lengths_study_of_the_tiny_model(tiny_model, data_dir, tmp_path):
    write_jsonl(data_dir / "test.jsonl", make_records(6, seed=3, prefix="t"))
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          data={"test_file": str(data_dir / "test.jsonl")}, evaluation={"max_new_tokens": 2},
                          training={"max_steps": 1, "logging_steps": 1, "eval_steps": 1, "save_steps": 1})
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "Gemma" / "run_study.py"), "--config", str(config), "--output_dir", str(out),
           "--design", "history_lengths", "1", "2", "--num_processes", "1"]
    first = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.md", "comparison.png",
                                                     "comparison_by_max_history_items.png", "designs", "history_1",
                                                     "history_2"]
    for n in (1, 2):
        results = json.loads((out / f"history_{n}" / RESULTS_NAME).read_text())
        assert results["ablation"] == f"history_{n}" and results["prompt"]["max_history_items"] == n
    assert "| history_2 (reference) |" in (out / "comparison.md").read_text()
    ids = {json.loads((out / f"history_{n}" / RESULTS_NAME).read_text())["examples"]["train"]["ids_sha256"]
           for n in (1, 2)}
    assert len(ids) == 1
