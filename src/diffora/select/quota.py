"""The ONE keep rule every selection strategy spends its ranking through.

Four granularities (``rho`` = keep ratio, ``L`` layers, ``M`` module types):

* ``layer``  — the top ``ceil(rho * M_l)`` entries of each row (every layer keeps some adaptation);
* ``type``   — within-type ranking: the top ``ceil(rho * L_m)`` entries of each column, so every module type keeps
  the same fraction of its layers and the ranking only decides *which layers* of a type adapt;
* ``global`` — the top ``ceil(rho * N)`` entries of the whole grid (``N`` candidates);
* ``budget`` — entries in order of their score while the LoRA parameters spent stay within
  ``rho * (all candidates' LoRA parameters)`` (modules differ in size: an FFN matrix costs ~2.5x an attention one).

:class:`Quota` states the rule incrementally ("may this cell still be added?"), so a ranking (:func:`select_modules`),
a greedy set search (the NTK strategy) and random draws all obey exactly the same counts and budget.
Ties of a ranking are broken deterministically: equal scores keep the earlier layer, then the earlier column.

This module imports neither torch nor transformers until a rule is applied: the config validates against
:data:`GRANULARITIES`, and the CLI reads the config before it loads any model library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..method.candidates import DAMGrid

GRANULARITIES = ("layer", "global", "budget", "type")

Cell = tuple[int, int]


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


class Quota:
    """How many cells a selection may keep, per row, per column, overall or by LoRA parameters, filled one cell at
    a time. Validates ``keep_ratio``, ``granularity`` and the budget once, with the messages users see."""

    def __init__(
        self,
        grid: DAMGrid,
        keep_ratio: float,
        granularity: str = "layer",
        rank: int = 8,
        budget_params: Optional[int] = None,
        type_counts: Optional[Sequence[int]] = None,
    ) -> None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        from ..method.candidates import ceil_count, iter_cells

        self.grid, self.keep_ratio, self.granularity = grid, keep_ratio, granularity
        self.cells = list(iter_cells(grid))
        if not self.cells:
            raise ConfigError("the DAM grid has no candidate modules to select from")
        self.cost = {(i, j): rank * grid.param_costs[i][j] for i, j, _ in self.cells}
        self.total = sum(self.cost.values())
        self.kept: set[Cell] = set()
        self.spent = 0
        # what is left per group: rows (layer), columns (type) or one group (global); budget counts parameters
        self._group = {"layer": lambda c: c[0], "type": lambda c: c[1]}.get(granularity, lambda c: 0)
        self._left: dict[int, int] = {}
        if granularity != "budget":
            sizes: dict[int, int] = {}
            for i, j, _ in self.cells:
                sizes[self._group((i, j))] = sizes.get(self._group((i, j)), 0) + 1
            self._left = {g: ceil_count(keep_ratio, n) for g, n in sizes.items()}
            if type_counts is not None:  # explicit counts per module type (e.g. another selection's), not rho's
                if granularity != "type" or len(type_counts) != grid.shape[1]:
                    raise ConfigError(
                        f"type_counts needs granularity 'type' and one count per module type "
                        f"({grid.shape[1]}), got {granularity!r} and {len(type_counts)}"
                    )
                if any(not 0 <= k <= sizes.get(j, 0) for j, k in enumerate(type_counts)):
                    raise ConfigError(
                        f"type_counts {list(type_counts)} exceed the candidates per type "
                        f"{[sizes.get(j, 0) for j in range(grid.shape[1])]}"
                    )
                self._left = {j: int(k) for j, k in enumerate(type_counts)}
            self.budget = None
        else:
            self.budget = budget_params if budget_params is not None else keep_ratio * self.total
            smallest = min(self.cost.values())
            if self.budget < smallest:
                raise ConfigError(
                    f"the parameter budget {int(self.budget):,} is smaller than the smallest candidate module "
                    f"({smallest:,} LoRA parameters at rank {rank}); raise the keep ratio/budget or lower the rank"
                )

    def can_add(self, cell: Cell) -> bool:
        """Whether ``cell`` (a candidate not kept yet) still fits the rule."""
        if cell in self.kept or cell not in self.cost:
            return False
        if self.budget is not None:
            return self.spent + self.cost[cell] <= self.budget
        return self._left[self._group(cell)] > 0

    def add(self, cell: Cell) -> None:
        if not self.can_add(cell):
            raise ConfigError(f"cell {cell} does not fit the {self.granularity} quota")
        self.kept.add(cell)
        self.spent += self.cost[cell]
        if self.budget is None:
            self._left[self._group(cell)] -= 1

    def fill(self, order: Iterable[Cell]) -> "Quota":
        """Add the cells of ``order`` that still fit, in that order."""
        for cell in order:
            if self.can_add(cell):
                self.add(cell)
        return self

    def selection(self) -> Selection:
        rows, cols = self.grid.shape
        return Selection(
            mask=[[(i, j) in self.kept for j in range(cols)] for i in range(rows)],
            modules=[name for i, j, name in self.cells if (i, j) in self.kept],
            keep_ratio=self.keep_ratio,
            granularity=self.granularity,
            lora_params=sum(self.cost[c] for c in self.kept),
            total_lora_params=self.total,
        )


def ranked_cells(grid: DAMGrid, scores: Sequence[Sequence[float]]) -> list[Cell]:
    """The candidate cells, best score first; ties keep the earlier layer, then the earlier column."""
    from ..method.candidates import iter_cells

    rows, cols = grid.shape
    if len(scores) != rows or any(len(r) != cols for r in scores):
        raise ConfigError(f"scores must be a {rows}x{cols} grid to match the DAM")
    return [(i, j) for i, j, _ in sorted(iter_cells(grid), key=lambda c: (-float(scores[c[0]][c[1]]), c[0], c[1]))]


def select_modules(
    grid: DAMGrid,
    scores: Sequence[Sequence[float]],
    keep_ratio: float,
    granularity: str = "layer",
    rank: int = 8,
    budget_params: Optional[int] = None,
    type_counts: Optional[Sequence[int]] = None,
) -> Selection:
    """Keep the best-scoring DAM entries.

    Args:
        grid: the candidate grid.
        scores: ``layers × types`` scores (e.g. the gate values); higher = more useful.
        keep_ratio: rho in (0, 1].
        granularity: ``"layer"``, ``"type"``, ``"global"`` or ``"budget"``.
        rank: LoRA rank, to count parameters.
        budget_params: for ``"budget"``, an explicit LoRA-parameter budget instead of ``rho`` of the total.
        type_counts: for ``"type"``, how many entries each module type keeps instead of ``ceil(rho * L_m)``.
    """
    quota = Quota(grid, keep_ratio, granularity, rank, budget_params, type_counts)
    return quota.fill(ranked_cells(grid, scores)).selection()


def random_sets(
    grid: DAMGrid, keep_ratio: float, granularity: str, rank: int, budget_params: Optional[int], n_sets: int, seed: int
) -> list[list[int]]:
    """Indices (into the row-major cells) of ``n_sets`` random module sets drawn under the same rule: each is a
    random order of the cells poured into a fresh :class:`Quota`. A private generator: the global RNG is untouched."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        quota = Quota(grid, keep_ratio, granularity, rank, budget_params)
        order = torch.randperm(len(quota.cells), generator=gen).tolist()
        quota.fill((quota.cells[k][0], quota.cells[k][1]) for k in order)
        sets.append([k for k, (i, j, _) in enumerate(quota.cells) if (i, j) in quota.kept])
    return sets
