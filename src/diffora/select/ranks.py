"""Budget concentration: give the kept modules the LoRA rank that the dropped ones free (ours, not the paper's).

A branch of rank ``r`` on module ``m`` costs ``r * (d_in_m + d_out_m)`` parameters (``DAMGrid.param_costs``). After
discretisation the kept modules share a budget — by default what LoRA on *all* candidates at the search rank
costs — as integer ranks, written as a stock PEFT ``LoraConfig(rank_pattern=...)``.

* ``uniform``: the largest common rank that fits, then +1 for modules in score order while it fits;
* ``proportional``: ranks proportional to the scores (at least 1), then the same +1 fill, never letting a
  lower-scored module overtake a higher-scored one.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..method.candidates import DAMGrid, iter_cells
from .quota import Selection

MODES = ("uniform", "proportional")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _cost(grid: DAMGrid, name: str) -> int:
    try:
        i, j = grid.position(name)
    except KeyError:
        raise ConfigError(f"'{name}' is not a DAM candidate") from None
    return int(grid.param_costs[i][j])


def concentrate_ranks(
    grid: DAMGrid,
    selection: Selection,
    rank: int,
    *,
    scores: Optional[Sequence[Sequence[float]]] = None,
    mode: str = "uniform",
    budget_params: Optional[int] = None,
    max_rank: Optional[int] = None,
) -> dict[str, int]:
    """An integer rank for every kept module, spending at most ``budget_params`` LoRA parameters.

    Args:
        grid: the candidate grid (gives each module's ``d_in + d_out``).
        selection: the kept modules.
        rank: the search rank; the default budget is ``rank`` on every candidate (LoRA-all's parameter count).
        scores: ``layers × types`` scores (higher first when spending leftovers; the weights of ``proportional``).
        mode: ``"uniform"`` or ``"proportional"``.
        budget_params: the parameter budget instead of LoRA-all's.
        max_rank: an upper bound on every rank.
    """
    _positive_int(rank, "rank")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if max_rank is not None:
        _positive_int(max_rank, "max_rank")
    if not selection.modules:
        raise ConfigError("the selection keeps no module; there is nothing to give ranks to")
    cost = {name: _cost(grid, name) for name in selection.modules}
    budget = rank * sum(grid.param_costs[i][j] for i, j, _ in iter_cells(grid))  # LoRA on every candidate
    if budget_params is not None:
        budget = _positive_int(budget_params, "budget_params")
    if budget < sum(cost.values()):
        raise ConfigError(
            f"the budget of {budget:,} LoRA parameters cannot give rank 1 to the {len(cost)} kept modules "
            f"(that needs {sum(cost.values()):,})"
        )
    score = _kept_scores(grid, selection, scores)
    order = sorted(cost, key=lambda n: (-score[n], *grid.position(n)))  # grid order when all scores are 0
    cap = max_rank if max_rank is not None else math.inf

    if mode == "proportional" and scores is None:
        raise ConfigError("mode 'proportional' needs scores")
    if mode == "proportional" and any(v < 0 or not math.isfinite(v) for v in score.values()):
        raise ConfigError("mode 'proportional' needs finite scores >= 0")
    if mode == "uniform" or all(v == 0 for v in score.values()):
        common = int(min(budget // sum(cost.values()), cap))
        ranks = {n: common for n in cost}
        return _fill(ranks, order, cost, budget, cap, score=None)

    def sized(c: float) -> dict[str, int]:
        return {n: int(min(max(1, math.floor(c * score[n])), cap)) for n in cost}

    def spend(c: float) -> int:
        return sum(r * cost[n] for n, r in sized(c).items())

    # The largest scale c with Σ clip(floor(c s_m), 1, max_rank) cost_m <= budget: spend(c) is a monotone step
    # function, so bisect on c from a point that overspends (or that caps every module).
    positive = min(v for v in score.values() if v > 0)
    lo, hi = 0.0, (budget / min(cost.values()) + 1.0) / positive
    if spend(hi) <= budget:
        lo = hi
    else:
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if spend(mid) <= budget else (lo, mid)
    return _fill(sized(lo), order, cost, budget, cap, score=score)


def _kept_scores(grid: DAMGrid, selection: Selection, scores: Optional[Sequence[Sequence[float]]]) -> dict[str, float]:
    if scores is None:
        return {n: 0.0 for n in selection.modules}
    rows, cols = grid.shape
    if len(scores) != rows or any(len(r) != cols for r in scores):
        raise ConfigError(f"scores must be a {rows}x{cols} grid to match the DAM")
    return {n: float(scores[grid.position(n)[0]][grid.position(n)[1]]) for n in selection.modules}


def _fill(
    ranks: dict[str, int],
    order: list[str],
    cost: dict[str, int],
    budget: int,
    cap: float,
    score: Optional[dict[str, float]],
) -> dict[str, int]:
    """One pass of +1 in ``order`` while it fits; with ``score``, no module passes one that scores higher."""
    left = budget - sum(r * cost[n] for n, r in ranks.items())
    ceiling, group_min, previous = math.inf, math.inf, None
    for name in order:
        if score is not None:
            if previous is not None and score[name] < previous:
                ceiling, group_min = min(ceiling, group_min), math.inf
            previous = score[name]
        if cost[name] <= left and ranks[name] + 1 <= min(cap, ceiling):
            ranks[name] += 1
            left -= cost[name]
        group_min = min(group_min, ranks[name])
    return ranks


def rank_pattern_for(ranks: dict[str, int], default_rank: int) -> dict[str, int]:
    """PEFT ``rank_pattern`` for ``ranks`` (only the modules whose rank differs from ``default_rank``).

    PEFT (0.21, ``peft.utils.other.get_pattern_key``) uses the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module_name)``. The key is the escaped full module name, so it matches that
    module and no other (``...layer.1.attention.self.query`` does not match ``...layer.11...``; an escaped dot
    matches only a dot) — the same exact-or-dotted-suffix rule PEFT applies to the ``target_modules`` we export.
    """
    _positive_int(default_rank, "default_rank")
    for name, r in ranks.items():
        _positive_int(r, f"the rank of '{name}'")
    return {re.escape(name): int(r) for name, r in ranks.items() if r != default_rank}


@torch.no_grad()
def transfer_lora_weights(
    a: torch.Tensor,
    b: torch.Tensor,
    new_a: torch.Tensor,
    new_b: torch.Tensor,
    scaling: float,
    new_scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(A', B')`` of the new rank ``r' = new_a.shape[0]`` whose branch equals the old one.

    ``new_scaling * B' A' = scaling * B A`` exactly when ``r' >= r``: ``A'`` keeps ``A`` in its first ``r`` rows and
    ``new_a``'s (fresh PEFT init) in the rest, ``B'`` is ``B * scaling / new_scaling`` padded with zero columns, so
    the extra directions start like fresh LoRA. When ``r' < r`` it is the best rank-``r'`` approximation (SVD).
    """
    r, r_new = a.shape[0], new_a.shape[0]
    if r_new >= r:
        a_out = new_a.detach().clone()
        a_out[:r] = a.to(a_out.dtype)
        b_out = torch.zeros_like(new_b)
        b_out[:, :r] = (b.double() * (scaling / new_scaling)).to(b_out.dtype)
        return a_out, b_out
    u, s, vh = torch.linalg.svd(scaling * b.double() @ a.double(), full_matrices=False)
    root = (s[:r_new] / new_scaling).sqrt()
    return (root[:, None] * vh[:r_new]).to(new_a.dtype), (u[:, :r_new] * root).to(new_b.dtype)
