"""How long a search runs and when its gate steps start: one rule for the CLI, ``compare``, the API and the Trainer
integrations.

A search step is one optimiser step on the LoRA weights (``accumulation`` micro-batches). The gates get their first
step after a weight-only warm-up: LoRA's ``B`` starts at zero, so the gate gradient is exactly zero until ``B`` has
moved. By default the warm-up is a fraction of the search (:attr:`DiffoRAConfig.gate_warmup_fraction`), so it scales
with the data and a short search on small data still has gate steps; an explicit ``gate_warmup_steps`` is a fixed
count, and a search no longer than it is refused (:func:`check_warmup`).
"""

from __future__ import annotations

import math
from typing import Optional

from ..errors import ConfigError, DiffoRAError
from .config import DiffoRAConfig


def search_length(
    n_weight_batches: int,
    *,
    epochs: float = 1.0,
    steps: int = 0,
    accumulation: int = 1,
    minimum: int = 0,
    cap: Optional[int] = None,
) -> int:
    """Search steps: ``steps`` when > 0; else ``epochs`` passes over ``n_weight_batches`` batches, at least one step
    and at least ``minimum``, then at most ``cap`` (0 when ``epochs`` is 0 too: a search that does not run)."""
    if steps > 0:
        return int(steps)
    if epochs <= 0:
        return 0
    length = max(1, math.ceil(epochs * n_weight_batches / accumulation), minimum)
    return min(length, cap) if cap is not None else length


def min_search_length(gate_steps: int, config: DiffoRAConfig) -> int:
    """The shortest search that runs at least ``gate_steps`` gate steps after its warm-up (:func:`gate_warmup`)."""
    if config.gate_warmup_steps is not None:
        return config.gate_warmup_steps + gate_steps
    # steps - floor(f * steps) >= steps * (1 - f) >= gate_steps
    return max(gate_steps, math.ceil(gate_steps / (1.0 - config.gate_warmup_fraction)))


def gate_warmup(steps: int, config: DiffoRAConfig) -> int:
    """Weight-only steps before the first gate step of a ``steps``-step search.

    An explicit ``config.gate_warmup_steps`` is used as it is; otherwise ``floor(gate_warmup_fraction * steps)``,
    never all of the steps (the first gate step follows a weight step, so ``B`` has moved even at warm-up 0)."""
    if config.gate_warmup_steps is not None:
        return config.gate_warmup_steps
    return max(0, min(math.floor(config.gate_warmup_fraction * steps), steps - 1))


def check_warmup(
    steps: int,
    warmup: int,
    *,
    error: type[DiffoRAError] = ConfigError,
    hint: str = "raise search_steps or lower gate_warmup_steps",
) -> None:
    """Refuse a search that would end before its first gate step (the DAM would learn nothing)."""
    if steps <= warmup:
        raise error(
            f"the search has only {steps} steps, not more than its gate warm-up of {warmup} steps, so no "
            f"gate step would run and the DAM would learn nothing; {hint}"
        )
