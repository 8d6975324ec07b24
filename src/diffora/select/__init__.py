"""Which modules a search keeps: one quota rule (``quota``: per layer, global or a parameter budget) applied to the
scores of a selection strategy, and the ranks the kept modules get."""
