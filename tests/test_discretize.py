"""Discretisation on hand-set scores: the right modules, ties broken by (layer, column), budgets respected."""

import pytest

from diffora import ConfigError, DAMGrid, select_modules


def grid(rows=2, costs=None) -> DAMGrid:
    types = ["q", "k", "v", "ffn"]
    costs = costs or [[10, 10, 10, 25]] * rows
    return DAMGrid(
        layers=[f"l.{i}" for i in range(rows)],
        types=types,
        labels=types,
        names=[[f"l.{i}.{t}" for t in types] for i in range(rows)],
        param_costs=costs,
    )


SCORES = [[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.6]]


def test_per_layer_keeps_top_of_each_row():
    sel = select_modules(grid(), SCORES, keep_ratio=0.5, granularity="layer", rank=1)
    assert sel.modules == ["l.0.q", "l.0.ffn", "l.1.k", "l.1.ffn"]
    assert sel.mask == [[True, False, False, True], [False, True, False, True]]


def test_per_layer_rounds_up():
    sel = select_modules(grid(), SCORES, keep_ratio=0.3, granularity="layer", rank=1)  # ceil(0.3*4) = 2
    assert sel.num_kept == 4


def test_global_keeps_top_overall():
    sel = select_modules(grid(), SCORES, keep_ratio=0.25, granularity="global", rank=1)  # ceil(0.25*8) = 2
    assert sel.modules == ["l.0.q", "l.1.k"]
    sel = select_modules(grid(), SCORES, keep_ratio=0.5, granularity="global", rank=1)
    assert sel.modules == ["l.0.q", "l.0.ffn", "l.1.k", "l.1.ffn"]


def test_ties_prefer_earlier_layer_then_earlier_column():
    flat = [[0.5] * 4, [0.5] * 4]
    assert select_modules(grid(), flat, 0.25, "global", rank=1).modules == ["l.0.q", "l.0.k"]
    assert select_modules(grid(), flat, 0.5, "layer", rank=1).modules == ["l.0.q", "l.0.k", "l.1.q", "l.1.k"]
    # the result does not depend on float noise in ratio * count
    assert select_modules(grid(), flat, 0.5, "global", rank=1).num_kept == 4


def test_budget_counts_parameters_and_skips_what_does_not_fit():
    # total = 2 * (10+10+10+25) = 110 at rank 1; rho=0.5 -> budget 55
    sel = select_modules(grid(), SCORES, keep_ratio=0.5, granularity="budget", rank=1)
    # ranked: l.0.q(10) l.1.k(10) l.0.ffn(25) l.1.ffn(25, would be 70 > 55: skipped) l.0.v(10) ...
    assert sel.modules == ["l.0.q", "l.0.v", "l.0.ffn", "l.1.k"]
    assert sel.lora_params == 55 and sel.total_lora_params == 110
    sel8 = select_modules(grid(), SCORES, keep_ratio=0.5, granularity="budget", rank=8)
    assert sel8.lora_params == 8 * 55


def test_budget_smaller_than_any_module_is_an_error():
    with pytest.raises(ConfigError, match="smaller than the smallest candidate"):
        select_modules(grid(), SCORES, keep_ratio=0.05, granularity="budget", rank=1)


def test_missing_cells_are_never_selected():
    g = grid()
    g.names[1][0] = None
    g.param_costs[1][0] = 0
    g = DAMGrid(g.layers, g.types, g.labels, g.names, g.param_costs)
    scores = [[0.0, 0.0, 0.0, 0.0], [9.0, 0.1, 0.0, 0.0]]
    sel = select_modules(g, scores, keep_ratio=0.25, granularity="global", rank=1)
    assert sel.modules == ["l.0.q", "l.1.k"]  # ceil(0.25*7)=2: the 0.1 entry, then the first 0.0 tie


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ConfigError, match="keep_ratio"):
        select_modules(grid(), SCORES, keep_ratio=ratio)


@pytest.mark.parametrize("granularity", ["layer", "global", "budget"])
def test_empty_grid_is_a_config_error(granularity):
    g = grid()
    empty = DAMGrid(g.layers, g.types, g.labels, [[None] * 4 for _ in g.layers], [[0] * 4 for _ in g.layers])
    with pytest.raises(ConfigError, match="no candidate modules"):
        select_modules(empty, SCORES, keep_ratio=0.5, granularity=granularity, rank=1)
