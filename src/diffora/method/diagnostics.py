"""Did the search learn? Numbers that say whether the gates separated the modules, for ``dam.json`` and the log.

* **Gate spread**: range and standard deviation of the valid gates.
* **Flat gates**: the betas spread no further than gate-step noise alone would take them. Adam moves every beta by
  about ``gate_lr`` per step whatever the gradient's size, so gradients of random sign leave a random walk of
  ``gate_lr * sqrt(gate_steps)`` per entry, and ``M`` such walks span a few of those; a gradient that keeps its sign
  moves a beta ``gate_lr * gate_steps``. The betas are called flat when their range stays under
  :data:`FLAT_FACTOR` random-walk lengths. Measured, this range overlaps between searches with and without signal,
  so it warns only when the held-out check below has no verdict.
* **Held-out signal**: the weight steps never read the gate split, so the gate loss is a held-out loss. If over
  the last quarter of the gate steps it is no lower than what predicting the class frequencies of those very batches
  scores (for class labels; otherwise the loss of the first quarter), the search model learned nothing that carries
  over to unseen rows: the gate gradients then follow noise (shuffled labels still spread the gates, as the weights
  overfit), and the choice is close to arbitrary. See :func:`heldout_check`.
* **Kept-set stability**: :func:`jaccard` of two selections (e.g. of two halves of the gate data, or of two seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:  # annotations only (the search imports nothing from here)
    from .search import DAMSearch

#: betas whose range is under this many random-walk lengths ``gate_lr * sqrt(gate_steps)`` are flat
FLAT_FACTOR = 4.0
FLAT_WARNING = (
    "the gates did not separate the modules (beta range {beta_range:.3g} <= {limit:.3g}, what gate-step "
    "noise alone reaches); the choice is close to arbitrary"
)


#: the held-out check compares the last (and, without class labels, the first) this fraction of the gate steps
HELDOUT_WINDOW = 0.25
#: ... and needs at least this many gate steps in the window to give a verdict
HELDOUT_MIN_STEPS = 3
#: the gain must exceed this many standard errors of the per-step differences
HELDOUT_Z = 2.0
NO_SIGNAL_WARNING = (
    "on its held-out gate batches the search model did no better than {baseline} (loss {loss:.4g} vs {reference:.4g}): "
    "the gates followed noise, so the choice is close to arbitrary"
)


def label_counts(batch: Any) -> list[int]:
    """How many examples of ``batch`` (or of its micro-batches) carry each class index; [] when its ``labels`` are
    not one integer class per example (token labels of a causal LM, regression targets, a custom batch)."""
    batches = batch if isinstance(batch, list) else [batch]
    counts: list[int] = []
    for micro in batches:
        labels = micro.get("labels") if isinstance(micro, Mapping) else None
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
            return []
        labels = labels[labels >= 0]
        found = torch.bincount(labels.detach().cpu().long()).tolist() if labels.numel() else []
        counts = [a + b for a, b in zip_longest(counts, found, fillvalue=0)]
    return counts


def _prior_losses(counts: Sequence[Sequence[int]]) -> list[float]:
    """Per batch, the cross-entropy of predicting the class frequencies pooled over all of ``counts``."""
    pooled = [sum(col) for col in zip_longest(*counts, fillvalue=0)]
    total = sum(pooled)
    log_p = [math.log(c / total) if c else 0.0 for c in pooled]
    return [-sum(c * lp for c, lp in zip(row, log_p)) / max(sum(row), 1) for row in counts]


def heldout_check(gate_losses: Sequence[float], counts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Did the search model end up better than a no-signal baseline on its held-out gate batches?

    The window is the last :data:`HELDOUT_WINDOW` of the gate steps. With class labels on every gate batch of the
    window, the baseline is the loss of always predicting the window's pooled class frequencies, batch by batch (a
    model without signal can at best learn those); otherwise it is the mean gate loss of the first steps. The model
    learned (``heldout_signal``) when its mean loss is below the baseline by more than :data:`HELDOUT_Z` standard
    errors. ``heldout_signal`` is ``None`` with fewer than :data:`HELDOUT_MIN_STEPS` gate steps in the window.
    """
    n = len(gate_losses)
    k = max(int(n * HELDOUT_WINDOW), 1)
    found: dict[str, Any] = {
        "heldout_loss": None,
        "heldout_baseline": None,
        "heldout_reference": None,
        "heldout_gain": None,
        "heldout_signal": None,
    }
    if k < HELDOUT_MIN_STEPS:
        return found
    last = [float(v) for v in gate_losses[-k:]]
    window = list(counts[-k:]) if len(counts) == n else []
    if window and all(sum(c) > 0 for c in window) and max(len(c) for c in window) > 1:
        baseline, reference = "the class frequencies", _prior_losses(window)
        diffs = [a - b for a, b in zip(last, reference)]
    else:
        first = [float(v) for v in gate_losses[:k]]
        baseline, reference = "its first gate steps", first
        diffs = [a - sum(first) / k for a in last]
    mean = sum(diffs) / k
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (k - 1))
    found.update(
        heldout_loss=sum(last) / k,
        heldout_baseline=baseline,
        heldout_reference=sum(reference) / k,
        heldout_gain=-mean,
        heldout_signal=bool(-mean > HELDOUT_Z * std / math.sqrt(k)),
    )
    return found


def gate_spread(gates: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """``gate_min``, ``gate_max``, ``gate_range`` (max - min) and ``gate_std`` of the valid entries."""
    values = gates.detach().float()[valid]
    if values.numel() == 0:
        return {"gate_min": math.nan, "gate_max": math.nan, "gate_range": 0.0, "gate_std": 0.0}
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return {
        "gate_min": float(values.min()),
        "gate_max": float(values.max()),
        "gate_range": float(values.max() - values.min()),
        "gate_std": std,
    }


def flat_limit(gate_lr: float, gate_steps: int) -> float:
    """The beta range gate-step noise alone reaches: :data:`FLAT_FACTOR` ``* gate_lr * sqrt(gate_steps)``."""
    return FLAT_FACTOR * gate_lr * math.sqrt(max(gate_steps, 0))


def search_diagnostics(search: "DAMSearch") -> dict[str, Any]:
    """Gate spread, beta range, the flat-gates flag and its one-line warning (``None`` when the gates separated)."""
    gates = search.gates
    with torch.no_grad():
        spread = gate_spread(gates.values(), gates.valid)
        betas = gates.beta.detach().float()[gates.valid]
    beta_range = float(betas.max() - betas.min()) if betas.numel() else 0.0
    limit = flat_limit(search.config.gate_lr, search.gate_steps)
    flat = search.gate_steps == 0 or beta_range <= limit
    heldout = heldout_check(search.history.gate_losses, search.history.gate_label_counts)
    # The held-out check decides when it can: on a toy (tests/test_search_learns.py) and on the benchmark searches
    # the beta range of searches with and without signal overlaps, so flat gates alone warn only without a verdict.
    if heldout["heldout_signal"] is False:
        warning = NO_SIGNAL_WARNING.format(
            baseline=heldout["heldout_baseline"], loss=heldout["heldout_loss"], reference=heldout["heldout_reference"]
        )
    elif heldout["heldout_signal"] is None and flat:
        warning = FLAT_WARNING.format(beta_range=beta_range, limit=limit)
    else:
        warning = None
    return {**spread, "beta_range": beta_range, "flat_limit": limit, "gates_flat": flat, **heldout, "warning": warning}


def jaccard(mask_a: Sequence[Sequence[bool]], mask_b: Sequence[Sequence[bool]]) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two kept-module masks of the same grid (1.0 when both keep nothing)."""
    a = torch.as_tensor(mask_a, dtype=torch.bool)
    b = torch.as_tensor(mask_b, dtype=torch.bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
