"""Closed answer sets (evaluation.answer_choices): choice scores are the log-likelihood of each answer, computed
directly; the metrics they feed (accuracy, macro-F1, AUC, expected ratings) and ROUGE against hand-computed values;
their bootstrap recomputes the statistic on resampled rows; config errors come before the model loads; and ZeRO-3
on 2 ranks scores the choices as 1 rank does."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import GENRES, make_records, run_script, write_config, write_jsonl
from finetune.batching import SupervisedPositionsCollator
from finetune.bootstrap import paired_bootstrap, resample_counts, seed_example_bootstrap
from finetune.config import MAX_AUTO_CHOICES, PromptConfig
from finetune.answer_choices import resolve_answer_choices
from finetune.data import Split
from finetune.errors import UserError
from finetune.evaluation import choice_log_likelihoods
from finetune.metrics import BINARY_AUC, MACRO_F1, main_metric, score_predictions
from finetune.outputs import PREDICTIONS_NAME, RESULTS_NAME
from finetune.prompts import PromptEncoder, prompt_length

MODEL_LOADING_MARKERS = ("World size", "Loading weights", "Activation checkpointing:")


# ----------------------------------------------------------------------------------------------------------------------
# Scoring the choices
# ----------------------------------------------------------------------------------------------------------------------


def test_choice_scores_are_the_log_likelihood_of_each_answer_token_by_token(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    encoder = PromptEncoder(tiny_tokenizer, 256)
    examples = [encoder.encode(r, PromptConfig(), len(r["history"])) for r in make_records(3, seed=4)]
    prompts = [e["input_ids"][:prompt_length(e)] for e in examples]
    choices = ["comedy", "science fiction", "no"]  # answers of different token lengths
    choice_ids = [encoder.target_ids(c) for c in choices]
    assert all(ids[-1] == encoder.end_of_turn_id for ids in choice_ids)
    with torch.no_grad():  # batches of 2 rows: the rows of one example span two forwards, padding differs
        scores = choice_log_likelihoods(model, SupervisedPositionsCollator(tiny_tokenizer), prompts, choice_ids, 2,
                                        "cpu")
        assert scores.shape == (3, 3)
        for i, prompt in enumerate(prompts):
            for j, ids in enumerate(choice_ids):
                log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].double(), -1)
                expected = sum(log_probs[len(prompt) - 1 + k, token].item() for k, token in enumerate(ids))
                assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics against hand-computed values
# ----------------------------------------------------------------------------------------------------------------------


def choice_rows(targets: list[str], probabilities: list[list[float]], choices: list[str]) -> list[dict]:
    return [{"id": str(i), "target": t, "loss": 1.0, "target_tokens": 2,
             "prediction": choices[int(np.argmax(p))], "choice_probabilities": dict(zip(choices, p, strict=True))}
            for i, (t, p) in enumerate(zip(targets, probabilities, strict=True))]


def test_accuracy_macro_f1_and_per_class_f1():
    choices = ["a", "b", "c"]
    # targets a a a b b c; predictions a a b b c c
    onehot = {"a": [0.8, 0.1, 0.1], "b": [0.1, 0.8, 0.1], "c": [0.1, 0.1, 0.8]}
    rows = choice_rows(list("aaabbc"), [onehot[p] for p in "aabbcc"], choices)
    metrics = score_predictions(rows, 6, choices)
    assert metrics["exact_match"] == pytest.approx(4 / 6)  # the accuracy of the most likely choice
    # a: TP 2, FP 0, FN 1 -> 4/5; b: TP 1, FP 1, FN 1 -> 2/4; c: TP 1, FP 1, FN 0 -> 2/3
    assert metrics["per_class_f1"] == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3})
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics["auc"] is None and metrics["main_metric"] == "exact_match"
    assert metrics["rouge1"] is None and metrics["expected_mae"] is None


def test_auc_counts_ties_half_and_the_second_choice_is_positive():
    choices = ["no", "yes"]
    p_yes = [0.9, 0.5, 0.5, 0.2, 0.5, 0.1]
    targets = ["yes", "yes", "no", "yes", "no", "no"]
    rows = choice_rows(targets, [[1 - p, p] for p in p_yes], choices)
    metrics = score_predictions(rows, 6, choices)
    # positives 0.9, 0.5, 0.2 against negatives 0.5, 0.5, 0.1: 0.9 beats 3; 0.5 ties 2 (1) and beats 1;
    # 0.2 beats 1 -> (3 + 2 + 1) / 9
    assert metrics["auc"] == pytest.approx(6 / 9)
    assert [r["positive_probability"] for r in rows] == p_yes
    assert BINARY_AUC([[0.3, 1], [0.3, 0]]) == 0.5 and BINARY_AUC([[0.9, 1], [0.1, 0]]) == 1.0


def test_numeric_choices_give_the_expected_ratings_mae_beside_the_most_likely_ones():
    choices = ["1", "2", "3"]
    rows = choice_rows(["3", "1"], [[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]], choices)
    metrics = score_predictions(rows, 2, choices)
    expected = [0.2 + 0.6 + 1.5, 0.6 + 0.8]  # 2.3 and 1.4
    assert [r["expected"] for r in rows] == pytest.approx(expected)
    assert metrics["expected_mae"] == pytest.approx((0.7 + 0.4) / 2)
    assert metrics["expected_rmse"] == pytest.approx(math.sqrt((0.49 + 0.16) / 2))
    assert metrics["mae"] == 0.0 and metrics["rmse"] == 0.0  # the most likely choices, 3 and 1, are right
    assert metrics["main_metric"] == "expected_mae" and metrics["unparsable"] == 0


def test_rouge_on_free_text_and_the_main_metric_rule():
    rows = [{"id": "0", "target": "the cat sat on the mat", "prediction": "the cat on mat", "loss": 1.0,
             "target_tokens": 3},
            {"id": "1", "target": "a new movie review", "prediction": "an old book", "loss": 1.0, "target_tokens": 3}]
    metrics = score_predictions(rows, 2)
    # 1: unigram overlap 4 (the, cat, on, mat); P 4/4, R 4/6 -> F 0.8; LCS "the cat on mat" = 4 -> 0.8. 2: no overlap.
    assert [r["rouge1"] for r in rows] == pytest.approx([0.8, 0.0])
    assert metrics["rouge1"] == pytest.approx(0.4) and metrics["rougeL"] == pytest.approx(0.4)
    assert metrics["main_metric"] == "rougeL"  # 4.5 words on average: longer than LONG_TEXT_WORDS
    assert main_metric(False, None, ["comedy", "science fiction"]).name == "exact_match"
    assert main_metric(True).name == "mae" and main_metric(False, ["no", "yes"]).name == "exact_match"


# ----------------------------------------------------------------------------------------------------------------------
# Bootstrap of the statistics that are no means
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("statistic", [MACRO_F1, BINARY_AUC])
def test_resampled_statistics_equal_the_statistic_of_the_resampled_rows(statistic):
    rng = np.random.default_rng(3)
    n = 40
    target = rng.integers(0, 2 if statistic is BINARY_AUC else 4, n)
    first = np.round(rng.random(n), 1) if statistic is BINARY_AUC else rng.integers(0, 4, n)  # ties in the scores
    rows = np.stack([first, target], axis=1).astype(float)
    counts = resample_counts(n, 5, rng)
    for r, value in enumerate(statistic.resampled(counts, rows)):
        drawn = np.repeat(rows, counts[r].astype(int), axis=0)
        assert value == pytest.approx(statistic(drawn))
    if statistic is BINARY_AUC:  # AUC by its definition: every (positive, negative) pair, a tie counting half
        pos, neg = rows[target == 1, 0], rows[target == 0, 0]
        pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        assert statistic(rows) == pytest.approx(pairs.mean())


def test_bootstraps_of_macro_f1_cover_the_difference_and_agree_for_identical_seeds():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 300)
    good = np.where(rng.random(300) < 0.8, target, rng.integers(0, 3, 300))
    poor = np.where(rng.random(300) < 0.4, target, rng.integers(0, 3, 300))
    a, b = np.stack([good, target], 1).astype(float), np.stack([poor, target], 1).astype(float)
    paired = paired_bootstrap(a, b, MACRO_F1, n_resamples=500)
    assert paired.diff == pytest.approx(MACRO_F1(a) - MACRO_F1(b)) and 0 < paired.lo < paired.diff < paired.hi
    seeds = seed_example_bootstrap(np.stack([a, a]), np.stack([b, b]), MACRO_F1, n_resamples=500)
    assert seeds.diff == pytest.approx(paired.diff)
    assert seeds.lo == pytest.approx(paired.lo, abs=0.03) and seeds.hi == pytest.approx(paired.hi, abs=0.03)


# ----------------------------------------------------------------------------------------------------------------------
# Resolving the setting, and its errors before the model loads
# ----------------------------------------------------------------------------------------------------------------------


def split_of(targets: list[str], tmp_path: Path) -> Split:
    path = write_jsonl(tmp_path / "test.jsonl", [{"target": t} for t in targets])
    rows = datasets.Dataset.from_dict({"id": [f"t{i}" for i in range(len(targets))], "target": targets,
                                       "index": list(range(len(targets)))})
    return Split(rows, None, path, {}, 0)


def test_auto_choices_are_the_distinct_training_targets_up_to_the_threshold(tmp_path):
    auto = resolve_answer_choices("auto", ["5", "10", "2", "5"], split_of(["2", "10"], tmp_path))
    assert auto.choices == ["2", "5", "10"] and auto.record()["source"].startswith("auto")  # numbers by value
    assert resolve_answer_choices("auto", ["yes", "no"], split_of(["no"], tmp_path)).choices == ["no", "yes"]
    many = [f"title {i}" for i in range(MAX_AUTO_CHOICES + 1)]
    assert resolve_answer_choices("auto", many, split_of(["title 0"], tmp_path)).choices is None  # free text
    assert resolve_answer_choices(None, many, split_of(["x"], tmp_path)).choices is None
    assert resolve_answer_choices(["no", "yes"], None, None) is None  # no test file
    with pytest.raises(UserError) as error:
        resolve_answer_choices(["no", "yes"], None, split_of(["yes", "maybe", "no"], tmp_path))
    assert "test.jsonl: line 2: target 'maybe' is not one of the answer choices" in error.value.problems[0]


@pytest.mark.parametrize("choices, message", [
    (["comedy", "drama"], "is not one of the answer choices"),
    (5, "evaluation.answer_choices: expected"),
    (["comedy", "comedy"], "lists 'comedy' more than once"),
])
def test_bad_answer_choices_stop_the_cli_before_the_model_loads(choices, message, tiny_model, data_dir, tmp_path):
    write_jsonl(data_dir / "test.jsonl", make_records(6, seed=3, prefix="t"))
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          data={"test_file": str(data_dir / "test.jsonl")}, evaluation={"answer_choices": choices})
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out")], processes=None)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert not any(marker in proc.stdout + proc.stderr for marker in MODEL_LOADING_MARKERS)
    if isinstance(choices, list) and len(set(choices)) == 2:
        assert "test.jsonl: line" in proc.stderr and "add these answers to evaluation.answer_choices" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------------
# ZeRO-3 on 2 ranks scores the choices as 1 rank does
# ----------------------------------------------------------------------------------------------------------------------


def test_zero3_two_rank_choice_scoring_equals_one_rank(tiny_model, data_dir, tmp_path):
    write_jsonl(data_dir / "test.jsonl", make_records(7, seed=3, prefix="t"))  # odd: the ranks' shards differ
    config = write_config(tmp_path / "config.json", tiny_model, data_dir, model={"dtype": "float32"},
                          data={"test_file": str(data_dir / "test.jsonl"), "validation_file": None},
                          training={"max_steps": 2, "eval_steps": None, "save_steps": 2, "eval_batch_size": 4})
    out = tmp_path / "run"
    proc = run_script(["--config", str(config), "--output_dir", str(out)], processes=None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    choices = ["--set", f"evaluation.answer_choices={json.dumps(GENRES)}"]
    predictions = {}
    for processes in (1, 2):
        run = tmp_path / f"eval{processes}"
        shutil.copytree(out, run, ignore=shutil.ignore_patterns("checkpoint-*"))
        proc = run_script(["--config", str(config), "--output_dir", str(run), "--do_eval_only", *choices],
                          processes=processes)
        assert proc.returncode == 0, proc.stderr[-4000:]
        predictions[processes] = [json.loads(line) for line in (run / PREDICTIONS_NAME).read_text().splitlines()]
        test = json.loads((run / RESULTS_NAME).read_text())["test"]
        assert test["answer_choices"] == {"choices": GENRES, "source": "config.json"}
        assert test["main_metric"] == "exact_match" and set(test["per_class_f1"]) == set(GENRES)
        assert test["macro_f1"] is not None and test["auc"] is None
    one, two = predictions[1], predictions[2]
    assert [r["id"] for r in one] == [r["id"] for r in two] == [f"t{i:04d}" for i in range(7)]
    for a, b in zip(one, two, strict=True):
        assert set(a["choice_probabilities"]) == set(GENRES)
        assert sum(a["choice_probabilities"].values()) == pytest.approx(1.0)
        assert a["prediction"] == max(a["choice_probabilities"], key=a["choice_probabilities"].get)
        for genre in GENRES:
            assert b["choice_probabilities"][genre] == pytest.approx(a["choice_probabilities"][genre], abs=1e-4)
        assert b["prediction"] == a["prediction"] and b["loss"] == pytest.approx(a["loss"], abs=1e-4)


def test_auto_choices_are_found_and_logged_by_a_dry_run(tiny_model, data_dir, tmp_path):
    write_jsonl(data_dir / "test.jsonl", make_records(6, seed=3, prefix="t"))
    config = write_config(tmp_path / "config.json", tiny_model, data_dir,
                          data={"test_file": str(data_dir / "test.jsonl")}, evaluation={"answer_choices": "auto"})
    proc = run_script(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--dry_run"], processes=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Answer choices (auto: the 5 distinct training targets): {', '.join(map(repr, GENRES))}" in proc.stdout
