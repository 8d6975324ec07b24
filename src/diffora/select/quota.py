"""Step 4 of the pipeline: discretise the relaxed DAM into a keep/drop mask.

Three granularities (``rho`` = keep ratio, ``L`` layers, ``M`` module types):

* ``layer``  — the top ``ceil(rho * M_l)`` entries of each row (every layer keeps some adaptation);
* ``global`` — the top ``ceil(rho * N)`` entries of the whole grid (``N`` candidates);
* ``budget`` — entries in order of their score while the LoRA parameters spent stay within
  ``rho * (all candidates' LoRA parameters)`` (modules differ in size: an FFN matrix costs ~2.5x an attention one).

Ties are broken deterministically: equal scores keep the earlier layer, then the earlier column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..method.candidates import DAMGrid, ceil_count, iter_cells
from ..method.config import GRANULARITIES
from ..errors import ConfigError


@dataclass
class Selection:
    """Which DAM entries keep their LoRA branch."""

    mask: list[list[bool]]
    modules: list[str]
    keep_ratio: float
    granularity: str
    lora_params: int
    total_lora_params: int

    @property
    def num_kept(self) -> int:
        return len(self.modules)

    @classmethod
    def from_dict(cls, data: dict) -> "Selection":
        """Inverse of :meth:`to_dict` (e.g. the ``selection`` of a ``dam.json``)."""
        return cls(
            mask=[list(row) for row in data["mask"]],
            modules=list(data["modules"]),
            keep_ratio=float(data["keep_ratio"]),
            granularity=str(data["granularity"]),
            lora_params=int(data["lora_params"]),
            total_lora_params=int(data["total_lora_params"]),
        )

    def to_dict(self) -> dict:
        return {
            "mask": self.mask,
            "modules": self.modules,
            "keep_ratio": self.keep_ratio,
            "granularity": self.granularity,
            "lora_params": self.lora_params,
            "total_lora_params": self.total_lora_params,
        }


def _ranked(cells: list[tuple[int, int, str]], scores: Sequence[Sequence[float]]) -> list[tuple[int, int, str]]:
    return sorted(cells, key=lambda c: (-float(scores[c[0]][c[1]]), c[0], c[1]))


def select_modules(
    grid: DAMGrid,
    scores: Sequence[Sequence[float]],
    keep_ratio: float,
    granularity: str = "layer",
    rank: int = 8,
    budget_params: Optional[int] = None,
) -> Selection:
    """Keep the best-scoring DAM entries.

    Args:
        grid: the candidate grid.
        scores: ``layers × types`` scores (the gate values); higher = more useful.
        keep_ratio: rho in (0, 1].
        granularity: ``"layer"``, ``"global"`` or ``"budget"``.
        rank: LoRA rank, to count parameters.
        budget_params: for ``"budget"``, an explicit LoRA-parameter budget instead of ``rho`` of the total.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    rows, cols = grid.shape
    if len(scores) != rows or any(len(r) != cols for r in scores):
        raise ConfigError(f"scores must be a {rows}x{cols} grid to match the DAM")
    cells = list(iter_cells(grid))
    if not cells:
        raise ConfigError("the DAM grid has no candidate modules to select from")
    cost = {(i, j): rank * grid.param_costs[i][j] for i, j, _ in cells}
    total = sum(cost.values())
    kept: set[tuple[int, int]] = set()

    if granularity == "layer":
        for row in range(rows):
            row_cells = [c for c in cells if c[0] == row]
            if row_cells:
                k = ceil_count(keep_ratio, len(row_cells))
                kept.update((i, j) for i, j, _ in _ranked(row_cells, scores)[:k])
    elif granularity == "global":
        k = ceil_count(keep_ratio, len(cells))
        kept.update((i, j) for i, j, _ in _ranked(cells, scores)[:k])
    else:
        budget = budget_params if budget_params is not None else keep_ratio * total
        smallest = min(cost.values())
        if budget < smallest:
            raise ConfigError(
                f"the parameter budget {int(budget):,} is smaller than the smallest candidate module "
                f"({smallest:,} LoRA parameters at rank {rank}); raise the keep ratio/budget or lower the rank"
            )
        spent = 0
        for i, j, _ in _ranked(cells, scores):
            if spent + cost[i, j] <= budget:
                kept.add((i, j))
                spent += cost[i, j]

    mask = [[(i, j) in kept for j in range(cols)] for i in range(rows)]
    modules = [name for i, j, name in cells if (i, j) in kept]
    return Selection(
        mask=mask,
        modules=modules,
        keep_ratio=keep_ratio,
        granularity=granularity,
        lora_params=sum(cost[c] for c in kept),
        total_lora_params=total,
    )
