"""Step 4 of a finished search, for the pipeline, the integrations and ``diffora compare`` alike: which modules
to keep (the ``selection_score`` strategy of :mod:`diffora.select.strategies`, spent through the quota of
:mod:`diffora.select.quota`) and, optionally, which rank each kept module gets (:mod:`diffora.select.ranks`).
Functions of the search's public state."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Optional

from ..errors import ConfigError
from .ntk import module_kernels
from .quota import Selection
from .ranks import concentrate_ranks
from .strategies import get_strategy, strategy_names
from .strategies.ntk import ModuleKernels, ntk_diagnostic


def selection_scores(
    search: Any, score: Optional[str] = None, kernels: Optional[ModuleKernels] = None
) -> list[list[float]]:
    """The ``layers × types`` scores of strategy ``score`` (default: the config's), before ``score_normalization``:
    the gate values (``"gate"``), ``|g - g0|`` (``"movement"``), ``g - g0`` (``"signed"``), the mean of
    ``-g dL_gate/dg`` over the gate steps (``"taylor"``), ..."""
    return get_strategy(score or search.config.selection_score).scores(search, kernels)


def gate_scores(search: Any) -> dict[str, list[list[float]]]:
    """Every score that the gate history of ``search`` gives (no data needed), by strategy name."""
    out = {}
    for name in strategy_names():
        strategy = get_strategy(name)
        if not strategy.needs_gate_steps or strategy.needs_kernels:
            continue
        try:
            strategy.check_config(search.config)
        except ConfigError:
            continue
        out[name] = strategy.scores(search)
    return out


def choose_modules(
    search: Any,
    kernels: Optional[ModuleKernels] = None,
    *,
    keep_ratio: Optional[float] = None,
    granularity: Optional[str] = None,
    budget_params: Optional[int] = None,
    score: Optional[str] = None,
) -> Selection:
    """The kept modules of a finished search (defaults from ``search.config``).

    ``kernels`` (:func:`search_kernels`) is needed by strategies that read data kernels (``ntk``); a strategy that
    reads the gates refuses a search without a gate step.
    """
    config = search.config
    strategy = get_strategy(score or config.selection_score)
    strategy.check_config(config)
    strategy.check_ready(search, kernels)
    return strategy.select(
        search,
        config.keep_ratio if keep_ratio is None else keep_ratio,
        granularity or config.granularity,
        kernels=kernels,
        budget_params=budget_params,
    )


def search_kernels(search: Any, batches: Iterable[dict], max_examples: int) -> ModuleKernels:
    """The per-module LoRA kernels on ``max_examples`` rows of ``batches``, as the config asks: of the ungated
    model (every gate forced to 1, so a module's kernel is not scaled by ``g^2`` from the search) unless
    ``ntk_ungated`` is off, of ``ntk_kernel``'s kind, normalised by ``ntk_normalization``."""
    config = search.config
    ungated = getattr(config, "ntk_ungated", True)
    with search.gates.forced(1.0) if ungated else contextlib.nullcontext():
        kernels = module_kernels(
            search.model,
            search.grid.module_names(),
            batches,
            loss_fn=search.loss_fn,
            adapter_name=search.adapter_name,
            max_examples=max_examples,
            kind=getattr(config, "ntk_kernel", "loss_grad"),
        )
    return kernels.normalized(getattr(config, "ntk_normalization", "none"), search.grid)


def diagnostic(search: Any, kernels: ModuleKernels, selection: Selection, seed: int = 0) -> dict:
    """``lambda_min`` of the kept set against random sets of the same quota (recorded in ``dam.json``)."""
    return ntk_diagnostic(
        kernels, search.grid, selection, selection.keep_ratio, selection.granularity, search.config.rank, seed=seed
    )


def allocate_ranks(
    search: Any, selection: Selection, kernels: Optional[ModuleKernels] = None
) -> Optional[dict[str, int]]:
    """Budget concentration (``rank_allocation``): the kept modules share all candidates' LoRA parameters, in the
    order (and, for ``proportional``, the proportions) of the strategy's ranking."""
    mode = search.config.rank_allocation
    if mode == "none":
        return None
    scores = get_strategy(search.config.selection_score).ranking(search, kernels)
    if mode == "proportional":
        scores = [[max(0.0, v) for v in row] for row in scores]
    return concentrate_ranks(search.grid, selection, search.config.rank, scores=scores, mode=mode)
