"""Selection strategies: what ranks the DAM's cells (or chooses a set of them) once a search has run.

A strategy is one class in one module of this package, registered with :func:`register`; every module here is
imported when the registry is first read, so adding a strategy touches its own file (plus its test) and nothing
else. Each strategy spends its ranking through the one keep rule of :mod:`diffora.select.quota`.

Strategies read a finished search through its public state only (``search.grid``, ``search.config``,
``search.gates``, ``search.gate_steps``, ``search.taylor_sum`` / ``taylor_steps``), never importing the search
module, so :class:`~diffora.method.config.DiffoRAConfig` can validate ``selection_score`` against this registry.
This module imports no model library; the strategies load on the first look-up.
"""

from __future__ import annotations

import importlib
import pkgutil
import statistics
from typing import Any, ClassVar, Optional, Sequence

from ...errors import ConfigError, SearchStateError
from ..quota import Selection, select_modules

#: ``score_normalization``: ``per_type`` z-scores each module type's scores across layers
SCORE_NORMALIZATIONS = ("none", "per_type")
#: the ``ntk`` strategy's and the diagnostic's kernel options (here, so the config validates them without torch)
NTK_KERNELS = ("loss_grad", "output_jacobian")
NTK_NORMALIZATIONS = ("none", "trace", "params")

Scores = list[list[float]]


class SelectionStrategy:
    """What one ``selection_score`` needs from a search and how it picks the kept modules.

    Override :meth:`scores` for a per-cell ranking (the default :meth:`select` puts it through the quota), or
    :meth:`select` for a strategy that chooses a set as a whole.
    """

    #: the ``selection_score`` value
    name: ClassVar[str] = ""
    #: where the name is listed (help texts, error messages); ties are listed by name
    listed: ClassVar[float] = 100.0
    #: reads the gate history: refuses a search without a gate step
    needs_gate_steps: ClassVar[bool] = True
    #: reads per-module kernels of data (:func:`diffora.select.choose.search_kernels`), passed in by the caller
    needs_kernels: ClassVar[bool] = False

    def check_config(self, config: Any, label: str = "selection_score") -> None:
        """Refuse, with a :class:`~diffora.errors.ConfigError`, a configuration this strategy cannot serve
        (``label``: how messages name the option, e.g. its command-line flag)."""

    def check_ready(self, search: Any, kernels: Any = None) -> None:
        """Refuse a search that lacks what this strategy reads."""
        if self.needs_gate_steps and search.gate_steps == 0:
            raise SearchStateError(
                "no gate step has run, so the DAM holds only its initial values; run search.fit(...) or "
                "search.gate_step(...) before choose_modules()"
            )
        if self.needs_kernels and kernels is None:
            raise ConfigError(f"selection_score '{self.name}' needs the kernels: pass search_kernels(...)")

    def scores(self, search: Any, kernels: Any = None) -> Scores:
        """``layers × types`` scores, higher = keep first (before ``score_normalization``)."""
        raise NotImplementedError(f"selection_score '{self.name}' has no per-module scores")

    def ranking(self, search: Any, kernels: Any = None) -> Scores:
        """:meth:`scores` after the config's ``score_normalization``: what the quota and the rank allocation read."""
        mode = getattr(search.config, "score_normalization", "none")
        return normalize_scores(self.scores(search, kernels), search.grid, mode)

    def select(
        self,
        search: Any,
        keep_ratio: float,
        granularity: str,
        *,
        kernels: Any = None,
        budget_params: Optional[int] = None,
    ) -> Selection:
        """The kept modules of a finished search."""
        return select_modules(
            search.grid,
            self.ranking(search, kernels),
            keep_ratio,
            granularity,
            rank=search.config.rank,
            budget_params=budget_params,
        )


_REGISTRY: dict[str, SelectionStrategy] = {}
_LOADED = False


def register(cls: type[SelectionStrategy]) -> type[SelectionStrategy]:
    """Class decorator: make ``cls`` the strategy of ``selection_score=cls.name``."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} needs a name")
    _REGISTRY[cls.name] = cls()
    return cls


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")


def strategy_names() -> tuple[str, ...]:
    """Every registered ``selection_score``."""
    _load()
    return tuple(sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].listed, name)))


def get_strategy(name: str) -> SelectionStrategy:
    """The strategy of ``selection_score=name``."""
    _load()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"selection_score must be one of {strategy_names()}, got {name!r}")
    return _REGISTRY[name]


def normalize_scores(scores: Sequence[Sequence[float]], grid: Any, mode: str = "none") -> Scores:
    """``none``: the scores as they are; ``per_type``: each column's candidates z-scored across layers (a column
    with one candidate, or equal scores, becomes 0), so a type whose scores are all large does not win every
    layer; missing cells get 0 (they are never selected)."""
    if mode not in SCORE_NORMALIZATIONS:
        raise ConfigError(f"score_normalization must be one of {SCORE_NORMALIZATIONS}, got {mode!r}")
    out = [[float(v) for v in row] for row in scores]
    if mode == "none":
        return out
    rows, cols = grid.shape
    for j in range(cols):
        members = [i for i in range(rows) if grid.names[i][j] is not None]
        values = [out[i][j] for i in members]
        mean = statistics.fmean(values) if values else 0.0
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        for i in range(rows):
            out[i][j] = (out[i][j] - mean) / std if i in members and std > 0 else 0.0
    return out
