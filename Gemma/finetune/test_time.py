"""Test-time ablation: a trained run's final/ model evaluated with another ablation's prompt, without retraining
(--do_eval_only --test_time_ablation TRAINED_RUN --ablation_config X --output_dir NEW_DIR). The cheap first look at
what an input is worth; a run trained without the input is the real measurement.

The evaluation gets a directory of its own, which the comparison reads like a run directory: results.json (its
"test_time_ablation" section names the trained run and both ablations), predictions.jsonl and resolved_config.json.
Nothing of the trained run is written. Its test examples are the trained run's: the examples kept are decided on
config.json's full prompt, whatever the ablation (Ablation.study_prompt), and their ids are checked before the model
loads. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Ablation, Config
from .errors import UserError
from .outputs import FINAL_DIRNAME, IDENTITY_NAME, RESOLVED_CONFIG_NAME, RESULTS_NAME, read_results
from .run_identity import CADENCE_KEYS, CADENCE_SECTIONS, LOCATION_KEYS

RESULTS_KEY = "test_time_ablation"  # results.json's section that marks a test-time evaluation
# Config keys a test-time evaluation may set otherwise than the trained run: the prompt (what it ablates), the test
# evaluation, and what --do_eval_only itself changes (a LoRA run's final/ is merged).
EVALUATION_SECTIONS = ("prompt.", "evaluation.", "lora.")


def label(evaluated: str, trained: str) -> str:
    """How tables name a test-time evaluation: never the bare name of a trained ablation."""
    return f"{evaluated} (test-time, trained: {trained})"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); is this a finished run of Gemma/train_deepspeed.py?") from None


@dataclass(frozen=True)
class TestTimeAblation:
    """The trained run a test-time evaluation reads, and what it records about it."""

    __test__ = False  # not a pytest class

    trained_run: Path
    trained_ablation: str
    evaluated_ablation: str
    trained_results: dict
    trained_resolved: dict

    @property
    def final(self) -> Path:
        return self.trained_run / FINAL_DIRNAME

    @classmethod
    def check(cls, trained_run: Path, output_dir: Path, cfg: Config, ablation: Ablation) -> TestTimeAblation:
        """The trained run, the ablation and the new directory, before anything is written or loaded; every problem
        at once. check_settings follows, once the evaluation's identity is known."""
        trained_run = trained_run.resolve()
        problems = []
        if not (trained_run / RESULTS_NAME).is_file() or not (trained_run / RESOLVED_CONFIG_NAME).is_file():
            raise UserError(f"--test_time_ablation {trained_run}: not a finished run (no {RESULTS_NAME} or "
                            f"{RESOLVED_CONFIG_NAME}); give the --output_dir of a finished training run.")
        results, resolved = read_results(trained_run), _read(trained_run / RESOLVED_CONFIG_NAME)
        if RESULTS_KEY in results:
            raise UserError(f"--test_time_ablation {trained_run}: is itself a test-time evaluation; give the trained "
                            f"run it evaluated ({results[RESULTS_KEY].get('trained_run')}).")
        if not (trained_run / FINAL_DIRNAME / "config.json").is_file():
            problems.append(f"--test_time_ablation {trained_run}: no {FINAL_DIRNAME}/ model to evaluate.")
        if output_dir == trained_run or trained_run in output_dir.parents:
            problems.append(f"--output_dir {output_dir}: inside the trained run, which a test-time evaluation never "
                            f"writes into; choose a directory beside it, e.g. {trained_run}@test_time_{ablation.name}.")
        elif any((output_dir / name).exists() for name in (RESULTS_NAME, RESOLVED_CONFIG_NAME, IDENTITY_NAME,
                                                           FINAL_DIRNAME)) or list(output_dir.glob("checkpoint-*")):
            problems.append(f"--output_dir {output_dir}: holds a run or an evaluation already; choose a new directory "
                            "for the test-time evaluation (or delete that one).")
        if cfg.data.test_file is None:
            problems.append("--test_time_ablation needs data.test_file in the config.")
        if resolved.get("prompt") == dataclasses.asdict(cfg.prompt):
            problems.append(f"--ablation_config {ablation.name}: the prompt the run was trained with, so there is "
                            "nothing to ablate at test time; its own test results are in its results.json (re-evaluate "
                            "with --do_eval_only --output_dir TRAINED_RUN and without --test_time_ablation).")
        if problems:
            raise UserError(problems)
        return cls(trained_run, str(results.get("ablation")), ablation.name, results, resolved)

    def check_settings(self, identity: dict) -> None:
        """The evaluation's settings (its run identity) against the trained run's, but for prompt and evaluation."""
        if problems := config_differences(self.trained_run, identity):
            raise UserError([f"the trained run {self.trained_run} was trained with other settings than this "
                             "evaluation has; pass its --config and --set (only prompt, evaluation and lora may "
                             "differ):", *(f"  - {line}" for line in problems)])

    def check_test_set(self, test_set: dict) -> None:
        """The test examples must be the trained run's, so that the comparison pairs them example by example."""
        trained = ((self.trained_results.get("examples") or {}).get("test") or {}).get("ids_sha256")
        if trained is not None and trained != test_set["ids_sha256"]:
            raise UserError(f"{test_set['path']}: its test examples (ids sha256 {test_set['ids_sha256'][:12]}) are "
                            f"not the trained run's ({trained[:12]}); pass the trained run's data.test_file and "
                            "training.max_length.")

    def results(self, test_stats: dict, model_identity: Any) -> dict:
        """results.json of the evaluation, before its test section: no training and no validation loss of its own
        (the trained run's were measured with the trained prompt, so they are not copied)."""
        return {"ablation": self.evaluated_ablation,
                RESULTS_KEY: {"trained_run": str(self.trained_run), "trained_ablation": self.trained_ablation,
                              "evaluated_ablation": self.evaluated_ablation, "model": str(self.final)},
                "model_identity": model_identity, "eval": {}, "log_history": [],
                # train/validation: the examples the evaluated model was trained and validated on
                "examples": {**(self.trained_results.get("examples") or {}), "test": test_stats}}

    def resolved_config(self, own: dict) -> dict:
        """resolved_config.json: this evaluation's settings, with the trained run's model_path (the model final/ was
        trained from) so that it compares with the trained runs; the model evaluated is evaluated_model."""
        return {**own, "model_path": self.trained_resolved.get("model_path", own["model_path"]),
                "tokenizer_path": self.trained_resolved.get("tokenizer_path", own["tokenizer_path"]),
                "evaluated_model": str(self.final)}


def config_differences(trained_run: Path, identity: dict) -> list[str]:
    """The settings of this evaluation that differ from what the trained run was trained with, other than the prompt
    and the evaluation (a different max_length or seed would not evaluate the trained model as it was trained)."""
    path = trained_run / IDENTITY_NAME
    if not path.is_file():
        return []  # a run of an older version: the test ids check still holds
    before = _read(path)
    old, new = before.get("config", {}), identity["config"]
    lines = []
    for key in sorted((old.keys() | new.keys()) - LOCATION_KEYS - CADENCE_KEYS):
        if key.startswith(EVALUATION_SECTIONS + CADENCE_SECTIONS) or old.get(key) == new.get(key):
            continue
        lines.append(f"{key}: the run was trained with {json.dumps(old.get(key))}, this evaluation has "
                     f"{json.dumps(new.get(key))}")
    if "examples_fitted_on" in before and before["examples_fitted_on"] != identity["examples_fitted_on"]:
        lines.append("config.json's prompt texts, on which the examples kept are decided, differ from the run's")
    return lines
