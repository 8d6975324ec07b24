"""Did the search learn? Numbers that say whether the gates separated the modules, for ``dam.json`` and the log.

* **Gate spread**: range and standard deviation of the valid gates.
* **Flat gates**: the betas spread no further than gate-step noise alone would take them. Adam moves every beta by
  about ``gate_lr`` per step whatever the gradient's size, so gradients of random sign leave a random walk of
  ``gate_lr * sqrt(gate_steps)`` per entry, and ``M`` such walks span a few of those; a gradient that keeps its sign
  moves a beta ``gate_lr * gate_steps``. The betas are called flat when their range stays under
  :data:`FLAT_FACTOR` random-walk lengths: the ranking then reflects noise, and the kept set is close to arbitrary.
* **Kept-set stability**: :func:`jaccard` of two selections (e.g. of two halves of the gate data, or of two seeds).
"""

from __future__ import annotations

import math
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
    warning = FLAT_WARNING.format(beta_range=beta_range, limit=limit) if flat else None
    return {**spread, "beta_range": beta_range, "flat_limit": limit, "gates_flat": flat, "warning": warning}


def jaccard(mask_a: Sequence[Sequence[bool]], mask_b: Sequence[Sequence[bool]]) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two kept-module masks of the same grid (1.0 when both keep nothing)."""
    a = torch.as_tensor(mask_a, dtype=torch.bool)
    b = torch.as_tensor(mask_b, dtype=torch.bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
