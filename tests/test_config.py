"""Config loading, validation and the command line: every problem reported at once, naming file and key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import REPO, make_records, run_script, write_config, write_jsonl
from finetune.config import Config
from finetune.errors import UserError
from finetune.outputs import (DS_CONFIG_DIRNAME, FINAL_DIRNAME, PREDICTIONS_NAME, RESOLVED_CONFIG_NAME, RESULTS_NAME,
                              PreviousRun, check_output_dir)
from finetune.settings import (ABLATION_DIR, build_dataclass, load_ablation, load_settings, resolve_ablation,
                               resolve_path)


def problems_of(config: Path, ablation: str = "profile_and_history", overrides: list[str] = ()) -> list[str]:
    with pytest.raises(UserError) as err:
        load_settings(config, ablation, list(overrides))
    return err.value.problems


def test_shipped_config_and_every_ablation_profile_validate(monkeypatch):
    # The shipped config names the demo model; its presence is the set-up's job, not the schema's.
    raw = json.loads((REPO / "config.json").read_text())
    problems: list[str] = []
    cfg = build_dataclass(Config, raw, "config.json:", problems)
    assert problems == [] and isinstance(cfg, Config)
    names = sorted(p.stem for p in ABLATION_DIR.glob("*.json"))
    assert names == ["history_only", "profile_and_history", "profile_only", "query_only"]
    for name in names:
        profile = load_ablation(ABLATION_DIR / f"{name}.json", problems)
        assert problems == [], problems
        assert profile.description.strip()
        # a profile states only the keys it sets: config.json's prompt.max_history_items stays in force
        assert set(profile.prompt) == {"include_profile", "include_history"}


def test_ablation_profiles_set_the_sections(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir)
    expected = {"profile_and_history": (True, True), "profile_only": (True, False),
                "history_only": (False, True), "query_only": (False, False)}
    for name, (profile, history) in expected.items():
        cfg, ablation = load_settings(config, name, [])
        assert ablation.name == name
        assert (cfg.prompt.include_profile, cfg.prompt.include_history) == (profile, history)


def test_precedence_defaults_config_ablation_cli(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          prompt={"include_profile": False, "max_history_items": 3})
    ablation = tmp_path / "mine.json"
    ablation.write_text(json.dumps({"description": "x", "include_profile": True, "max_history_items": 2}))
    cfg, profile = load_settings(config, str(ablation), ["prompt.max_history_items=1", "training.seed=7"])
    assert profile.name == "mine"
    assert cfg.prompt.include_profile is True  # ablation beats config.json
    assert cfg.prompt.max_history_items == 1  # --set beats the ablation
    assert cfg.prompt.include_history is True  # default, untouched by anyone
    assert cfg.training.seed == 7 and cfg.training.weight_decay == 0.0


def test_all_config_problems_are_reported_together(tiny_model, data_dir, tmp_path):
    config = write_config(
        tmp_path / "config.json", tiny_model, data_dir,
        model={"dtype": "bf16"},
        training={"batchsize": 2, "batch_size": 0, "learning_rate": -1, "seed": True, "report_to": "none",
                  "warmup_ratio": 1.5},
        data={"test_file": str(data_dir / "test.txt"), "validation_file": str(data_dir / "missing.jsonl")},
        deepspeed={"offload_optimizer": "yes", "offload_params": 1},
    )
    problems = "\n".join(problems_of(config))
    expected = [
        'model.dtype: "bf16" is not one of "bfloat16", "float16", "float32". Did you mean "bfloat16"?',
        "training.batchsize: unknown key; did you mean batch_size?",
        "training.batch_size: must be at least 1, got 0",
        "training.learning_rate: must be positive, got -1.0",
        "training.seed: expected an integer, got true",
        "training.report_to: expected a list",
        "training.warmup_ratio: must be in [0, 1), got 1.5",
        "data.test_file: unsupported file type '.txt'",
        "data.validation_file: file not found",
        'deepspeed.offload_optimizer: "yes" is not one of "auto", true, false.',
        'deepspeed.offload_params: 1 is not one of "auto", true, false.',  # 1 is not true
    ]
    for phrase in expected:
        assert phrase in problems, phrase
    assert all(line.startswith(str(config)) for line in problems.splitlines())


def test_missing_required_keys_and_bad_model_dir(tmp_path, data_dir):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {}, "data": {"train_file": str(data_dir / "train.jsonl")}}))
    assert any("model.model_name_or_path: required key is missing" in p for p in problems_of(config))
    (tmp_path / "empty_model").mkdir()
    config.write_text(json.dumps({"model": {"model_name_or_path": "empty_model"},
                                  "data": {"train_file": str(data_dir / "train.jsonl")}}))
    assert any("has no config.json" in p for p in problems_of(config))


def test_eval_interval_needs_a_validation_file(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, data={"validation_file": None})
    assert any("training.eval_steps: is 6 but data.validation_file is null" in p for p in problems_of(config))
    cfg, _ = load_settings(config, "query_only", ["training.eval_steps=null"])
    assert cfg.training.eval_steps is None


def test_relative_paths_resolve_against_the_config_directory(tiny_model, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "d" / "train.jsonl", make_records(4))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"model_name_or_path": str(tiny_model)},
                                  "data": {"train_file": "d/train.jsonl"}, "training": {"eval_steps": None}}))
    monkeypatch.chdir(REPO)  # somewhere else
    cfg, _ = load_settings(config, "query_only", [])
    assert resolve_path(cfg.data.train_file, config.parent) == tmp_path / "d" / "train.jsonl"


def test_invalid_json_names_line_and_column(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{\n  "model": {\n    "dtype": bfloat16\n  }\n}\n')
    with pytest.raises(UserError, match=r"config.json: invalid JSON at line 3, column 14"):
        load_settings(bad, "query_only", [])
    with pytest.raises(UserError, match="config file not found"):
        load_settings(tmp_path / "nope.json", "query_only", [])


def test_unknown_ablation_lists_the_available_ones():
    with pytest.raises(UserError) as err:
        resolve_ablation("profile_and_histry")
    message = str(err.value)
    for name in ("history_only", "profile_and_history", "profile_only", "query_only"):
        assert name in message


def test_bad_ablation_file(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir)
    ablation = tmp_path / "bad.json"
    ablation.write_text(json.dumps({"description": "x", "include_profiles": True, "include_history": "yes"}))
    problems = "\n".join(problems_of(config, str(ablation)))
    assert "bad.json: include_profiles: unknown key; did you mean include_profile?" in problems
    assert "bad.json: include_history: expected true or false" in problems


def test_set_override_syntax_errors(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir)
    assert any("expected SECTION.KEY=VALUE" in p for p in problems_of(config, overrides=["max_steps=3"]))


def test_help_is_fast_and_documents_every_flag():
    started = time.perf_counter()
    proc = run_script(["--help"], processes=None)
    assert proc.returncode == 0
    for flag in ("--config", "--ablation_config", "--output_dir", "--deepspeed_config", "--resume_from_checkpoint",
                 "--overwrite_output_dir", "--set"):
        assert flag in proc.stdout
    # --help imports nothing heavy: torch alone takes seconds to import.
    assert "torch" not in proc.stderr
    assert time.perf_counter() - started < 60  # generous: only guards against loading a model


def test_config_errors_exit_cleanly_without_traceback(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, training={"batch_size": 0})
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out")], processes=None)
    assert proc.returncode == 2
    assert "training.batch_size: must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_finished_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RESULTS_NAME).write_text("{}")
    with pytest.raises(UserError, match="holds a finished run"):
        check_output_dir(out, None, overwrite=False)
    with pytest.raises(UserError, match="holds a finished run"):
        check_output_dir(out, "auto", overwrite=False)
    check_output_dir(out, None, overwrite=True)
    (out / RESULTS_NAME).unlink()
    (out / "checkpoint-6").mkdir()
    with pytest.raises(UserError, match="--resume_from_checkpoint auto"):
        check_output_dir(out, None, overwrite=False)
    check_output_dir(out, "auto", overwrite=False)


def test_a_bad_ablation_key_is_reported_once_against_the_ablation_file(tiny_model, data_dir, tmp_path):
    """The profile's keys are PromptConfig's, checked with its types; a bad one is not merged into config.json's
    prompt section, so it is not reported a second time as a config.json problem."""
    config = write_config(tmp_path / "config.json", tiny_model, data_dir)
    ablation = tmp_path / "bad.json"
    ablation.write_text(json.dumps({"description": "x", "include_history": "yes", "max_history_items": -1}))
    problems = problems_of(config, str(ablation))
    history = [p for p in problems if "include_history" in p]
    assert history == [f"{ablation}: include_history: expected true or false, got \"yes\"."]
    cleaned = tmp_path / "range.json"
    cleaned.write_text(json.dumps({"description": "x", "max_history_items": -1}))
    assert problems_of(config, str(cleaned)) == [f"{cleaned}: max_history_items: must be >= 0, or null for all."]


def test_help_and_config_errors_import_nothing_heavy(tiny_model, data_dir, tmp_path):
    """--help and a config error come back before torch, transformers, datasets or deepspeed are imported."""
    import subprocess
    import sys

    from conftest import script_env

    bad = write_config(tmp_path / "config.json", tiny_model, data_dir, training={"batch_size": 0})
    code = ("import sys; sys.path.insert(0, 'Gemma'); import train_deepspeed\n"
            "for argv in (['--help'], ['--config', sys.argv[1], '--output_dir', sys.argv[2]]):\n"
            "    try:\n"
            "        code = train_deepspeed.main(argv)\n"
            "    except SystemExit as e:\n"
            "        code = e.code\n"
            "    heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'deepspeed', 'accelerate') "
            "if m in sys.modules)\n"
            "    print('RESULT', code, heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(bad), str(tmp_path / "out")], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert results == ["RESULT 0 []", "RESULT 2 []"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training.batch_size: must be at least 1" in proc.stderr


def test_overwrite_clears_every_output_of_the_previous_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-6").mkdir(parents=True)
    (out / FINAL_DIRNAME).mkdir()
    (out / DS_CONFIG_DIRNAME).mkdir()
    for name in (RESULTS_NAME, RESOLVED_CONFIG_NAME, PREDICTIONS_NAME, "my_notes.txt"):
        (out / name).write_text("{}")
    previous = PreviousRun(out, replacing=True)
    previous.move_aside()
    assert sorted(p.name for p in out.iterdir()) == [previous.aside.name, "my_notes.txt"]
    previous.discard()
    # predictions.jsonl of the old run must not be read as the new run's
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]


def test_shipped_profiles_leave_the_other_prompt_keys_to_config_json(tiny_model, data_dir, tmp_path):
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, prompt={"max_history_items": 2})
    for name in ("profile_and_history", "profile_only", "history_only", "query_only"):
        cfg, _ = load_settings(config, name, [])
        assert cfg.prompt.max_history_items == 2, name
