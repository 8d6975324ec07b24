"""Metrics checked against values worked out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from diffora.errors import ConfigError
from diffora.evaluation.metrics import (
    accuracy,
    compute_metrics,
    f1,
    higher_is_better,
    macro_f1,
    majority_baseline,
    mcc,
    pearson,
    perplexity,
    spearman,
)

# A 2x2 confusion matrix, worked by hand:
#   predictions 1 1 1 0 0 0
#   labels      1 1 0 1 0 0
#   TP = 2 (pos 0,1), FP = 1 (pos 2), FN = 1 (pos 3), TN = 2 (pos 4,5)
PRED = [1, 1, 1, 0, 0, 0]
GOLD = [1, 1, 0, 1, 0, 0]


def test_accuracy() -> None:
    assert accuracy(PRED, GOLD) == pytest.approx(4 / 6)  # TP + TN = 4 of 6
    assert accuracy([2, 0, 1], [2, 1, 1]) == pytest.approx(2 / 3)


def test_binary_f1() -> None:
    # precision = 2/3, recall = 2/3, F1 = 2 TP / (2 TP + FP + FN) = 4 / 6
    assert f1(PRED, GOLD) == pytest.approx(4 / 6)
    # Class 1 is the positive class even when it is the minority: TP=1, FP=0, FN=1 -> 2 / 3.
    assert f1([1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx(2 / 3)


def test_mcc() -> None:
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 3 / 9
    assert mcc(PRED, GOLD) == pytest.approx(1 / 3)
    assert mcc([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert mcc([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_macro_f1() -> None:
    # (prediction, label) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); per class F1 = 2 TP / (2 TP + FP + FN)
    #   class 0: TP=1 FP=1 FN=1 -> 2/4;  class 1: TP=2 FP=0 FN=1 -> 4/5;  class 2: TP=1 FP=1 FN=0 -> 2/3
    expected = (2 / 4 + 4 / 5 + 2 / 3) / 3
    assert macro_f1([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]) == pytest.approx(expected)


def test_pearson() -> None:
    # x = 1 2 3 (mean 2), y = 1 2 5 (mean 8/3): dx = -1 0 1, dy = -5/3 -2/3 7/3
    # sum dx*dy = 5/3 + 7/3 = 4; sum dx^2 = 2; sum dy^2 = (25 + 4 + 49) / 9 = 78/9
    expected = 4 / math.sqrt(2 * 78 / 9)
    assert pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(expected)
    assert pearson([1.0, 2.0, 3.0], [6.0, 4.0, 2.0]) == pytest.approx(-1.0)


def test_spearman() -> None:
    # ranks 1 2 3 4 vs 1 3 2 4: d = 0 -1 1 0, sum d^2 = 2; rho = 1 - 6*2 / (4*(16-1)) = 0.8
    assert spearman([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [1, 2, 5]) == pytest.approx(1.0)  # monotone, not linear


def test_degenerate_inputs_give_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert mcc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant predictions
        assert mcc([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0  # constant labels
        assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
        assert pearson([1.0, 2.0], [3.0, 3.0]) == 0.0
        assert spearman([5, 5, 5], [1, 2, 3]) == 0.0
        assert pearson([1.0], [2.0]) == 0.0  # a single pair has no correlation
        assert f1([0, 0], [0, 0]) == 0.0  # no positives anywhere
        assert macro_f1([0, 0], [0, 0]) == pytest.approx(1.0)


def test_perplexity() -> None:
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError):
        perplexity(float("nan"))


def test_length_mismatch_and_empty_input() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_compute_metrics_with_class_ids_and_logits() -> None:
    expected = {"accuracy": 4 / 6, "f1": 4 / 6, "mcc": 1 / 3}
    assert compute_metrics(["accuracy", "f1", "mcc"], PRED, GOLD) == pytest.approx(expected)
    # Logits whose arg-max is PRED, as a torch tensor (what an eval loop collects).
    logits = torch.tensor([[0.1, 0.9], [-1.0, 2.0], [0.0, 0.5], [3.0, 1.0], [0.2, 0.1], [5.0, -5.0]])
    assert compute_metrics(["accuracy", "f1", "mcc"], logits, torch.tensor(GOLD)) == pytest.approx(expected)


def test_compute_metrics_regression_and_perplexity() -> None:
    scores = np.array([[1.0], [2.0], [3.0]])  # (n, 1) regression head output
    result = compute_metrics(["pearson", "spearman"], scores, [1.0, 2.0, 5.0])
    assert result == pytest.approx({"pearson": 4 / math.sqrt(2 * 78 / 9), "spearman": 1.0})
    assert compute_metrics(["perplexity"], [], [], mean_nll=math.log(4.0)) == pytest.approx({"perplexity": 4.0})
    with pytest.raises(ValueError, match="mean_nll"):
        compute_metrics(["perplexity"], [], [])
    with pytest.raises(ValueError, match="one score per example"):
        compute_metrics(["pearson"], np.zeros((3, 2)), [1.0, 2.0, 3.0])


def test_unknown_metric() -> None:
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ConfigError):
        majority_baseline([1], [1], ["bleu"])


def test_higher_is_better() -> None:
    assert higher_is_better("accuracy") and higher_is_better("mcc") and higher_is_better("pearson")
    assert not higher_is_better("perplexity")


def test_majority_baseline() -> None:
    # Train majority is 1 (three of four). Eval labels 1 0 0 1 1, all predicted 1:
    #   accuracy 3/5; TP=3, FP=2, FN=0 -> F1 = 6/8; constant predictions -> MCC 0
    result = majority_baseline([0, 1, 1, 1], [1, 0, 0, 1, 1], ["accuracy", "f1", "mcc"])
    assert result == pytest.approx({"accuracy": 3 / 5, "f1": 6 / 8, "mcc": 0.0})
    assert list(result) == ["accuracy", "f1", "mcc"]
    # Ties go to the smallest class id: 0 and 2 both appear twice -> predict 0.
    assert majority_baseline([2, 0, 2, 0], [0, 2, 1], ["accuracy"]) == pytest.approx({"accuracy": 1 / 3})


def test_majority_baseline_regression_predicts_the_mean() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = majority_baseline([1.0, 3.0], [0.0, 5.0, 2.5], ["pearson", "spearman", "perplexity"])
    assert result == {"pearson": 0.0, "spearman": 0.0}
