"""Which modules a search keeps: a selection strategy (:mod:`.strategies`: gate, movement, signed, taylor, ntk,
random, ...) ranks the DAM, the one quota rule (:mod:`.quota`: per layer, per type, global or a parameter budget)
decides how many are kept, and :mod:`.ranks` gives the kept modules their ranks. :func:`choose_modules` is the
entry point for a finished search.

The names below load their module on first use (PEP 562): :mod:`diffora.method.config` imports the strategy
registry, which must not pull in the search that :mod:`.choose` reads.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "Selection": "quota",
    "Quota": "quota",
    "select_modules": "quota",
    "GRANULARITIES": "quota",
    "SelectionStrategy": "strategies",
    "register": "strategies",
    "get_strategy": "strategies",
    "strategy_names": "strategies",
    "normalize_scores": "strategies",
    "choose_modules": "choose",
    "selection_scores": "choose",
    "gate_scores": "choose",
    "search_kernels": "choose",
    "allocate_ranks": "choose",
    "diagnostic": "choose",
    "ModuleKernels": "strategies.ntk",
    "greedy_ntk_selection": "strategies.ntk",
    "module_kernels": "ntk",
    "concentrate_ranks": "ranks",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
