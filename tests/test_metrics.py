"""Task metrics of the test-set evaluation: exact match, and MAE/RMSE with unparsable answers counted."""

from __future__ import annotations

import math

import pytest
from finetune.metrics import parse_number, score_predictions


def rows(pairs, losses=None):
    return [{"id": str(i), "target": t, "prediction": p, "loss": (losses or [1.0] * len(pairs))[i],
             "target_tokens": 2} for i, (t, p) in enumerate(pairs)]


def test_exact_match_ignores_case_spacing_and_a_full_stop():
    data = rows([("comedy", "Comedy."), ("comedy", " comedy "), ("science fiction", "science  fiction"),
                 ("drama", "dramatic"), ("horror", "")])
    metrics = score_predictions(data, test_examples=9)
    assert [r["exact_match"] for r in data] == [True, True, True, False, False]
    assert metrics["exact_match"] == pytest.approx(3 / 5)
    assert metrics["numeric"] is False and metrics["mae"] is None and metrics["unparsable"] is None
    assert metrics["examples"] == 9 and metrics["generated"] == 5


def test_numeric_targets_give_mae_rmse_and_count_unparsable_predictions():
    data = rows([("4", "4"), ("5", "3 stars"), ("1", "I cannot say"), ("2.5", "-0.5"), ("3", "")])
    metrics = score_predictions(data, test_examples=5)
    assert metrics["numeric"] is True
    assert [r["parsed"] for r in data] == [4.0, 3.0, None, -0.5, None]
    assert [r["abs_error"] for r in data] == [0.0, 2.0, None, 3.0, None]
    assert metrics["unparsable"] == 2  # counted, not dropped silently
    assert metrics["mae"] == pytest.approx(5 / 3)
    assert metrics["rmse"] == pytest.approx(math.sqrt((0 + 4 + 9) / 3))
    assert metrics["exact_match"] == pytest.approx(1 / 5)


def test_loss_is_token_weighted_and_perplexity_is_its_exponential():
    data = rows([("a", "a"), ("b", "c")], losses=[1.0, 3.0])
    data[1]["target_tokens"] = 6
    metrics = score_predictions(data, test_examples=2)
    assert metrics["loss"] == pytest.approx((1.0 * 2 + 3.0 * 6) / 8)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_parse_number():
    assert parse_number("rating: 4.5/5") == 4.5
    assert parse_number("-3") == -3.0 and parse_number(".5") == 0.5 and parse_number("1e3") == 1000.0
    assert parse_number("none") is None
