"""Evaluation: metrics computed offline with scikit-learn and SciPy."""

from diffora.evaluation.metrics import (
    CLASSIFICATION_METRICS,
    METRICS,
    REGRESSION_METRICS,
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
