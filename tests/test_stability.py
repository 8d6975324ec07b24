"""The two-halves stability check: halves that rank alike agree (1), independent noise agrees like chance (~0)."""

from types import SimpleNamespace

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model

from diffora import DAMGrid, DiffoRAConfig, prepare_search
from diffora.select.stability import LOW_AGREEMENT, half_agreement, random_jaccard


def grid(rows: int = 6, types: int = 6) -> DAMGrid:
    labels = [f"t{j}" for j in range(types)]
    return DAMGrid(
        layers=[f"l.{i}" for i in range(rows)],
        types=labels,
        labels=labels,
        names=[[f"l.{i}.t{j}" for j in range(types)] for i in range(rows)],
        param_costs=[[10] * types for _ in range(rows)],
    )


def fake_search(pull: torch.Tensor, gate_steps: int = 40) -> SimpleNamespace:
    config = DiffoRAConfig(keep_ratio=0.5, granularity="layer")
    return SimpleNamespace(config=config, grid=grid(*pull.shape[1:]), gate_pull=pull, gate_steps=gate_steps)


def test_halves_that_rank_alike_agree_fully():
    scores = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    report = half_agreement(fake_search(torch.stack([scores, scores * 3.0])))
    assert report["halves_jaccard"] == 1.0
    assert report["agreement"] == pytest.approx(1.0)
    assert report["stability_warning"] is None


def test_independent_halves_agree_like_chance_and_warn():
    agreements, warned = [], 0
    for seed in range(10):
        pull = torch.randn(2, 6, 6, generator=torch.Generator().manual_seed(seed))
        report = half_agreement(fake_search(pull))
        agreements.append(report["agreement"])
        warned += report["stability_warning"] is not None
    assert abs(sum(agreements) / len(agreements)) < 0.15, agreements
    assert warned >= 6, agreements
    assert LOW_AGREEMENT > 0


def test_chance_level_accounts_for_the_quota():
    # keeping 5 of 6 per layer, random kept sets overlap a lot; keeping 1 of 6, little
    assert random_jaccard(grid(), 5 / 6, "layer", rank=1) > 0.6
    assert random_jaccard(grid(), 1 / 6, "layer", rank=1) < 0.15


def test_no_verdict_before_two_gate_steps():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=2))
    report = half_agreement(search)
    assert report["agreement"] is None and report["stability_warning"] is None


def test_the_search_counts_gate_pulls_by_half():
    """Even gate steps vote in half 0, odd ones in half 1: the sign of -dL/dbeta, one vote per step and entry."""
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=2, gate_warmup_steps=1))
    randomize_lora_b(search.model)  # B = 0 would give zero gate gradients
    seen = []
    for step in range(3):
        before = search.gate_pull.clone()
        search.gate_step(random_batch(seed=step))
        seen.append(search.gate_pull - before)
    valid = search.gates.valid
    assert bool((seen[0][1] == 0).all()) and bool((seen[1][0] == 0).all()) and bool((seen[2][1] == 0).all())
    assert set(seen[0][0][valid].abs().unique().tolist()) <= {0.0, 1.0}
    assert float(seen[0][0][valid].abs().sum()) > 0
