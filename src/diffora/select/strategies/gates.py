"""Rankings read from the learned gates: their value (DARTS), how far they moved, and how far they moved up."""

from __future__ import annotations

from typing import Any

import torch

from . import Scores, SelectionStrategy, register


def _moved(search: Any) -> torch.Tensor:
    with torch.no_grad():
        return search.gates.values() - search.gates.initial_values(search.config.gate_init)


def _grid(values: torch.Tensor) -> Scores:
    return [[float(v) for v in row] for row in values.detach().cpu()]


@register
class GateStrategy(SelectionStrategy):
    """The gate value ``g`` (DARTS: keep the largest)."""

    name = "gate"
    listed = 0

    def scores(self, search: Any, kernels: Any = None) -> Scores:
        with torch.no_grad():
            return _grid(search.gates.values())


@register
class MovementStrategy(SelectionStrategy):
    """``|g - g_initial|``: a module whose gate the held-out loss pushed hard matters, in either direction."""

    name = "movement"
    listed = 1

    def scores(self, search: Any, kernels: Any = None) -> Scores:
        return _grid(_moved(search).abs())


@register
class SignedStrategy(SelectionStrategy):
    """``g - g_initial``: a module the held-out loss wants more of."""

    name = "signed"
    listed = 2

    def scores(self, search: Any, kernels: Any = None) -> Scores:
        return _grid(_moved(search))
