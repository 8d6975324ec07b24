"""The first-order estimate of the loss increase if a module's branch were removed."""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError, SearchStateError
from . import Scores, SelectionStrategy, register


@register
class TaylorStrategy(SelectionStrategy):
    """The mean over gate steps of ``-g dL_gate/dg`` (the search accumulates ``taylor_sum`` / ``taylor_steps``)."""

    name = "taylor"
    listed = 3

    def check_config(self, config: Any, label: str = "selection_score") -> None:
        if config.gate == "softmax":  # the score assumes every gate moves on its own
            raise ConfigError(
                f"{label} 'taylor' needs sigmoid gates (gate='sigmoid2' or 'sigmoid'); softmax gates "
                "couple a row's entries"
            )

    def scores(self, search: Any, kernels: Any = None) -> Scores:
        self.check_config(search.config)
        if search.taylor_steps == 0:
            raise SearchStateError(
                "no gate step has recorded the 'taylor' score (a search state saved before "
                "it existed, or no gate step ran); rerun the search or choose another score"
            )
        return [[float(v) / search.taylor_steps for v in row] for row in search.taylor_sum.cpu()]
