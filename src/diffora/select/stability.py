"""Would another half of the gate data have kept the same modules? A chance-corrected check of the kept set.

The search sums ``-dL_gate/dbeta`` separately over its even and odd gate steps, which read disjoint gate batches
(``DAMSearch.gate_pull``). Each half's pull is ranked through the run's own quota (the same keep ratio and
granularity), and the two kept sets are compared by Jaccard. Random rankings through that quota already overlap
(per-layer quotas force some agreement), so the Jaccard is set against theirs:

    agreement = (J_halves - J_random) / (1 - J_random)

1 means both halves keep the same modules, 0 means they agree no more than random rankings do: the data does not
say which modules matter, and the kept set is close to arbitrary.
"""

from __future__ import annotations

import random
from typing import Any, Optional

from ..method.diagnostics import jaccard
from .quota import select_modules

#: below this chance-corrected agreement the two halves disagree nearly as much as random rankings
LOW_AGREEMENT = 0.2
DRAWS = 200
WARNING = (
    "the two halves of the gate data keep different modules (agreement {agreement:.2f}, where 0 is what "
    "random rankings reach); the choice is close to arbitrary"
)


def random_jaccard(
    grid: Any, keep_ratio: float, granularity: str, rank: int, *, draws: int = DRAWS, seed: int = 0
) -> float:
    """Mean Jaccard of two kept sets from independent random rankings under the same quota."""
    rng = random.Random(seed)
    rows, cols = grid.shape
    total = 0.0
    for _ in range(draws):
        masks = [
            select_modules(
                grid, [[rng.random() for _ in range(cols)] for _ in range(rows)], keep_ratio, granularity, rank=rank
            ).mask
            for _ in range(2)
        ]
        total += jaccard(*masks)
    return total / draws


def half_agreement(search: Any, keep_ratio: Optional[float] = None, granularity: Optional[str] = None) -> dict:
    """``halves_jaccard``, ``random_jaccard``, ``agreement`` and a ``stability_warning`` (``None`` when the halves
    agree); all ``None`` when fewer than two gate steps ran."""
    config = search.config
    keep_ratio = config.keep_ratio if keep_ratio is None else keep_ratio
    granularity = granularity or config.granularity
    pull = getattr(search, "gate_pull", None)
    if pull is None or search.gate_steps < 2 or not bool(pull.abs().sum(dim=(1, 2)).gt(0).all()):
        return {"halves_jaccard": None, "random_jaccard": None, "agreement": None, "stability_warning": None}
    masks = [
        select_modules(search.grid, pull[h].tolist(), keep_ratio, granularity, rank=config.rank).mask for h in (0, 1)
    ]
    observed = jaccard(*masks)
    chance = random_jaccard(search.grid, keep_ratio, granularity, config.rank, seed=config.seed)
    agreement = (observed - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    warning = WARNING.format(agreement=agreement) if agreement < LOW_AGREEMENT else None
    return {"halves_jaccard": observed, "random_jaccard": chance, "agreement": agreement, "stability_warning": warning}
