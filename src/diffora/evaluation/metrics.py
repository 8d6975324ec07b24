"""Evaluation metrics, computed with scikit-learn and SciPy (no ``evaluate``: it needs the network).

Names understood by :func:`compute_metrics`:

============  ======================================================  ===============
name          meaning                                                 better
============  ======================================================  ===============
accuracy      fraction of exact matches                               higher
f1            binary F1 of class 1                                    higher
macro_f1      unweighted mean of per-class F1                         higher
mcc           Matthews correlation coefficient                        higher
pearson       Pearson correlation of predicted and true scores        higher
spearman      Spearman rank correlation                               higher
perplexity    ``exp(mean token negative log-likelihood)``             lower
============  ======================================================  ===============

Degenerate inputs give finite, warning-free values: a correlation with a constant side is 0.0, MCC of constant
predictions is 0.0, F1 with no positive predictions and no positive labels is 0.0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np

from diffora.errors import ConfigError

__all__ = [
    "CLASSIFICATION_METRICS",
    "METRICS",
    "REGRESSION_METRICS",
    "accuracy",
    "compute_metrics",
    "f1",
    "higher_is_better",
    "macro_f1",
    "majority_baseline",
    "mcc",
    "pearson",
    "perplexity",
    "spearman",
]

ArrayLike = Any  # sequences, numpy arrays or CPU tensors


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{p.shape[0]} predictions for {y.shape[0]} labels")
    if p.shape[0] == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Binary F1 of the positive class 1: ``2 TP / (2 TP + FP + FN)``; 0.0 when there are no positives at all."""
    from sklearn.metrics import f1_score

    p, y = _pair(predictions, labels)
    return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def macro_f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Mean F1 over the classes present in labels or predictions (each class weighs the same)."""
    from sklearn.metrics import f1_score

    p, y = _pair(predictions, labels)
    return float(f1_score(y, p, average="macro", zero_division=0.0))


def mcc(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient; 0.0 when either side is constant (the formula's denominator is 0)."""
    from sklearn.metrics import matthews_corrcoef

    p, y = _pair(predictions, labels)
    if np.unique(p).size < 2 or np.unique(y).size < 2:
        return 0.0
    return float(matthews_corrcoef(y, p))


def _constant(x: np.ndarray) -> bool:
    return x.size < 2 or bool(np.all(x == x.flat[0]))


def _correlation(method: Callable[..., Any], predictions: ArrayLike, labels: ArrayLike) -> float:
    """``method(p, y)[0]`` as a float; 0.0 when either side is constant (SciPy would warn and return nan)."""
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    if _constant(p) or _constant(y):
        return 0.0
    value = float(method(p, y)[0])
    return 0.0 if math.isnan(value) else value


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predictions, labels)


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation; 0.0 when either side is constant."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predictions, labels)


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)`` for a mean per-token negative log-likelihood in nats; ``inf`` on overflow."""
    if math.isnan(mean_nll):
        raise ValueError("the mean negative log-likelihood is nan")
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


#: Metrics computed on class ids.
CLASSIFICATION_METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "mcc": mcc,
}
#: Metrics computed on real-valued scores.
REGRESSION_METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {"pearson": pearson, "spearman": spearman}
#: Every metric that takes predictions and labels.
METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {**CLASSIFICATION_METRICS, **REGRESSION_METRICS}

_KNOWN = sorted([*METRICS, "perplexity"])


def higher_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` is better (all but perplexity)."""
    if name not in _KNOWN:
        raise ConfigError(f"unknown metric {name!r}; choose from {_KNOWN}")
    return name != "perplexity"


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (possibly on a device, possibly requiring grad)
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def compute_metrics(
    names: Sequence[str], predictions: ArrayLike, labels: ArrayLike, *, mean_nll: Optional[float] = None
) -> dict[str, float]:
    """Compute each metric in ``names``.

    ``predictions`` may be class ids, logits of shape ``(n, num_classes)`` (arg-maxed for the classification
    metrics) or scores of shape ``(n,)``/``(n, 1)`` for regression. ``perplexity`` uses ``mean_nll`` instead.
    """
    for name in names:
        if name not in _KNOWN:
            raise ConfigError(f"unknown metric {name!r}; choose from {_KNOWN}")
    results: dict[str, float] = {}
    wanted = [n for n in names if n != "perplexity"]
    if wanted:
        p, y = _to_numpy(predictions), _to_numpy(labels)
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        for name in wanted:
            if name in CLASSIFICATION_METRICS:
                ids = p.argmax(axis=-1) if p.ndim == 2 else p
                results[name] = CLASSIFICATION_METRICS[name](ids, y)
            else:
                if p.ndim != 1:
                    raise ValueError(f"{name} needs one score per example, got predictions of shape {p.shape}")
                results[name] = REGRESSION_METRICS[name](p, y)
    if "perplexity" in names:
        if mean_nll is None:
            raise ValueError("perplexity needs mean_nll (the mean per-token negative log-likelihood)")
        results["perplexity"] = perplexity(mean_nll)
    return results


def majority_baseline(train_labels: ArrayLike, eval_labels: ArrayLike, metrics: Sequence[str]) -> dict[str, float]:
    """Scores of a constant predictor fitted on ``train_labels`` and evaluated on ``eval_labels``.

    Classification metrics use the most frequent training class (ties go to the smallest id); regression metrics
    use the mean training score, so their correlations are 0.0 by definition. Perplexity is skipped.
    """
    unknown = [m for m in metrics if m not in _KNOWN]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; choose from {_KNOWN}")
    train = _to_numpy(train_labels)
    if train.size == 0:
        raise ValueError("no training labels to fit the baseline on")
    n = len(_to_numpy(eval_labels))
    results: dict[str, float] = {}
    classification = [m for m in metrics if m in CLASSIFICATION_METRICS]
    regression = [m for m in metrics if m in REGRESSION_METRICS]
    if classification:
        counts = Counter(train.tolist())
        top = max(counts.values())
        majority = min(label for label, count in counts.items() if count == top)
        results.update(compute_metrics(classification, np.full(n, majority), eval_labels))
    if regression:
        results.update(compute_metrics(regression, np.full(n, float(np.mean(train))), eval_labels))
    return {m: results[m] for m in metrics if m in results}
