"""A control: uniform random scores through the same quota (as many modules, per layer, as a ranking keeps)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..quota import Selection, select_modules
from . import Scores, SelectionStrategy, register

if TYPE_CHECKING:
    from ...method.candidates import DAMGrid


def random_scores(grid: DAMGrid, keep_ratio: float, seed: int) -> Scores:
    """Uniform scores from a private generator seeded by ``seed`` and ``keep_ratio`` (the global RNG is untouched;
    the stream ``diffora compare``'s random methods draw)."""
    import torch  # here, not at import: reading the registry must not load torch

    g = torch.Generator().manual_seed(10_000 + 1000 * seed + int(round(keep_ratio * 100)))
    return torch.rand(grid.shape, generator=g).tolist()


def random_selection(
    grid: DAMGrid,
    keep_ratio: float,
    seed: int,
    rank: int,
    granularity: str = "layer",
    budget_params: Optional[int] = None,
) -> Selection:
    """A random module set under the quota rule of ``granularity``."""
    return select_modules(
        grid, random_scores(grid, keep_ratio, seed), keep_ratio, granularity, rank=rank, budget_params=budget_params
    )


@register
class RandomStrategy(SelectionStrategy):
    """Random scores seeded by the config's ``seed``; needs no gate step (a search-free control)."""

    name = "random"
    listed = 5
    needs_gate_steps = False

    def scores(self, search: Any, kernels: Any = None) -> Scores:
        return random_scores(search.grid, search.config.keep_ratio, search.config.seed)

    def select(
        self,
        search: Any,
        keep_ratio: float,
        granularity: str,
        *,
        kernels: Any = None,
        budget_params: Optional[int] = None,
    ) -> Selection:
        return random_selection(
            search.grid, keep_ratio, search.config.seed, search.config.rank, granularity, budget_params
        )
