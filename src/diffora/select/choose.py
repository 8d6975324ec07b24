"""Step 4 of a finished search, for the pipeline and ``diffora compare`` alike: which modules to keep (the gate
ranking of :mod:`diffora.select.quota`, or the NTK selection of :mod:`diffora.select.ntk`) and, optionally, which rank each
kept module gets (budget concentration, :mod:`diffora.select.ranks`). Functions of the search's public state."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from .quota import Selection
from .ntk import ModuleKernels, greedy_ntk_selection, module_kernels, ntk_diagnostic
from .ranks import concentrate_ranks
from ..method.search import DAMSearch


def search_kernels(search: DAMSearch, batches: Iterable[dict], max_examples: int) -> ModuleKernels:
    """The per-module LoRA kernels of the searched (gated) model on ``max_examples`` rows of ``batches``."""
    return module_kernels(search.model, search.grid.module_names(), batches, loss_fn=search.loss_fn,
                          adapter_name=search.adapter_name, max_examples=max_examples)


def choose_modules(search: DAMSearch, kernels: Optional[ModuleKernels] = None, *,
                   keep_ratio: Optional[float] = None, granularity: Optional[str] = None) -> Selection:
    """The kept modules: greedy lambda_min for ``selection_score='ntk'`` (needs ``kernels``), else the gate ranking."""
    config = search.config
    keep_ratio = config.keep_ratio if keep_ratio is None else keep_ratio
    granularity = granularity or config.granularity
    if config.selection_score == "ntk":
        if kernels is None:
            raise ValueError("selection_score 'ntk' needs the kernels: pass search_kernels(...)")
        return greedy_ntk_selection(kernels, search.grid, keep_ratio, granularity, config.rank)
    return search.discretize(keep_ratio, granularity)


def diagnostic(search: DAMSearch, kernels: ModuleKernels, selection: Selection, seed: int = 0) -> dict:
    """``lambda_min`` of the kept set against random sets of the same budget (recorded in ``dam.json``)."""
    return ntk_diagnostic(kernels, search.grid, selection, selection.keep_ratio, selection.granularity,
                          search.config.rank, seed=seed)


def allocate_ranks(search: DAMSearch, selection: Selection,
                   kernels: Optional[ModuleKernels] = None) -> Optional[dict[str, int]]:
    """Budget concentration (``rank_allocation``): the kept modules share all candidates' LoRA parameters."""
    mode = search.config.rank_allocation
    if mode == "none":
        return None
    if search.config.selection_score == "ntk":  # a kept module's share of H(S): its kernel's trace
        traces = {name: float(k.trace()) for name, k in zip(kernels.names, kernels.kernels)}
        scores: Any = [[traces.get(name, 0.0) if name else 0.0 for name in row] for row in search.grid.names]
    else:
        scores = search.selection_scores()
    if mode == "proportional":
        scores = [[max(0.0, v) for v in row] for row in scores]
    return concentrate_ranks(search.grid, selection, search.config.rank, scores=scores, mode=mode)
