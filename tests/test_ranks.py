"""Budget concentration: ranks that spend (almost) LoRA-all's budget, and a rank_pattern PEFT applies exactly."""

import re

import pytest
import torch
import transformers
from conftest import VOCAB, random_batch, randomize_lora_b
from peft import LoraConfig, PeftModel, get_peft_model

from diffora import ConfigError, find_candidates, select_modules
from diffora.select.ranks import concentrate_ranks, rank_pattern_for, transfer_lora_weights

RANK = 4


def bert12(seed: int = 0):
    """12 layers, so 'layer.1' vs 'layer.11' is exercised; hidden 16 keeps it tiny."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def grid():
    return find_candidates(bert12())


def scores_for(grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(grid.shape, generator=g).tolist()


def lora_params_for_ranks(grid, ranks):
    """LoRA parameters of branches with these ranks: sum of r_m (d_in_m + d_out_m)."""
    return sum(int(r) * grid.param_costs[grid.position(n)[0]][grid.position(n)[1]] for n, r in ranks.items())


def all_budget(grid, rank=RANK):
    return rank * sum(c for row in grid.param_costs for c in row)


@pytest.mark.parametrize("gran,rho", [("layer", 0.5), ("global", 0.25), ("budget", 0.4), ("layer", 1.0)])
@pytest.mark.parametrize("mode", ["uniform", "proportional"])
def test_ranks_spend_the_budget_without_exceeding_it(grid, gran, rho, mode):
    scores = scores_for(grid)
    sel = select_modules(grid, scores, rho, gran, rank=RANK)
    ranks = concentrate_ranks(grid, sel, RANK, scores=scores, mode=mode)
    assert list(ranks) == sel.modules
    budget = all_budget(grid)
    spent = lora_params_for_ranks(grid, ranks)
    assert 0.95 * budget <= spent <= budget
    assert all(isinstance(r, int) and r >= 1 for r in ranks.values())
    if mode == "uniform":
        assert min(ranks.values()) >= RANK  # kept modules never lose rank
        assert max(ranks.values()) - min(ranks.values()) <= 1
    explicit = concentrate_ranks(grid, sel, RANK, scores=scores, mode=mode, budget_params=budget // 3)
    assert 0.95 * (budget // 3) <= lora_params_for_ranks(grid, explicit) <= budget // 3


def test_uniform_fills_leftover_in_score_order_and_grid_order_without_scores(grid):
    sel = select_modules(grid, scores_for(grid), 0.5, "layer", rank=RANK)
    scores = scores_for(grid, seed=5)

    def score(n):
        i, j = grid.position(n)
        return scores[i][j]

    by_score = sorted(sel.modules, key=lambda n: -score(n))
    for ranks, order in (
        (concentrate_ranks(grid, sel, RANK), sel.modules),
        (concentrate_ranks(grid, sel, RANK, scores=scores), by_score),
    ):
        common = min(ranks.values())
        cost = {n: grid.param_costs[grid.position(n)[0]][grid.position(n)[1]] for n in ranks}
        left = all_budget(grid) - lora_params_for_ranks(grid, ranks)
        bumped = {n for n in ranks if ranks[n] > common}
        assert bumped and all(cost[n] > left for n in ranks if n not in bumped)  # nothing else fits
        for k, b in enumerate(order):  # one pass in order: an earlier module that costs no more was bumped too
            assert b not in bumped or all(n in bumped for n in order[:k] if cost[n] <= cost[b])


def test_proportional_follows_the_scores(grid):
    scores = scores_for(grid, seed=2)
    sel = select_modules(grid, scores, 0.5, "global", rank=RANK)
    ranks = concentrate_ranks(grid, sel, RANK, scores=scores, mode="proportional")

    def s(n):
        i, j = grid.position(n)
        return scores[i][j]

    for a in sel.modules:
        for b in sel.modules:
            if s(a) > s(b):
                assert ranks[a] >= ranks[b], (a, b)
    assert max(ranks.values()) > min(ranks.values())
    # all-zero scores fall back to uniform
    zeros = [[0.0] * grid.shape[1] for _ in range(grid.shape[0])]
    assert concentrate_ranks(grid, sel, RANK, scores=zeros, mode="proportional") == concentrate_ranks(grid, sel, RANK)


def test_max_rank_caps_every_rank(grid):
    scores = scores_for(grid)
    sel = select_modules(grid, scores, 0.25, "global", rank=RANK)
    for mode in ("uniform", "proportional"):
        ranks = concentrate_ranks(grid, sel, RANK, scores=scores, mode=mode, max_rank=6)
        assert max(ranks.values()) <= 6
        assert lora_params_for_ranks(grid, ranks) <= all_budget(grid)


def test_bad_requests_are_config_errors(grid):
    sel = select_modules(grid, scores_for(grid), 0.5, "layer", rank=RANK)
    negative = [[-1.0] * grid.shape[1] for _ in range(grid.shape[0])]
    for kwargs in (
        dict(mode="svd"),
        dict(mode="proportional"),
        dict(mode="proportional", scores=negative),
        dict(budget_params=10),
        dict(max_rank=0),
        dict(scores=[[1.0]]),
    ):
        with pytest.raises(ConfigError) as info:
            concentrate_ranks(grid, sel, RANK, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        rank_pattern_for({"a": 0}, 8)


def test_rank_pattern_only_lists_changed_ranks_and_matches_one_module_each(grid):
    names = grid.module_names()
    ranks = {n: RANK + (k % 3) for k, n in enumerate(names)}
    pattern = rank_pattern_for(ranks, RANK)
    assert {k for k in pattern} == {re.escape(n) for n, r in ranks.items() if r != RANK}
    all_names = [n for n, _ in bert12().named_modules()]
    for key in pattern:  # PEFT's own matching rule (peft.utils.other.get_pattern_key)
        assert len([n for n in all_names if re.match(rf"(.*\.)?({key})$", n)]) == 1, key


def lora_ranks(model) -> dict[str, int]:
    return {
        n[len("base_model.model.") :]: m.r["default"]
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})
    }


def test_peft_applies_the_ranks_and_round_trips(grid, tmp_path):
    scores = scores_for(grid, seed=1)
    sel = select_modules(grid, scores, 0.5, "layer", rank=RANK)
    ranks = concentrate_ranks(grid, sel, RANK, scores=scores, mode="proportional")
    # make layer.1 and layer.11 of the same type differ, and keep some at the default rank
    for t in ("attention.self.query", "intermediate.dense"):
        ranks[f"bert.encoder.layer.1.{t}"], ranks[f"bert.encoder.layer.11.{t}"] = 3, 9
    ranks["bert.encoder.layer.10.output.dense"] = RANK  # default rank: no pattern key, and not attention.output
    config = LoraConfig(
        r=RANK,
        lora_alpha=8,
        target_modules=list(ranks),
        rank_pattern=rank_pattern_for(ranks, RANK),
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(bert12(), config)
    assert lora_ranks(model) == ranks
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora_params_for_ranks(grid, ranks)

    randomize_lora_b(model)
    model.eval()
    batch = random_batch(3)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(bert12(), tmp_path).eval()
    assert lora_ranks(loaded) == ranks
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


@pytest.mark.parametrize("new_rank", [4, 7, 2])
def test_transfer_keeps_the_branch(new_rank):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g)
    new_a, new_b = torch.randn(new_rank, 10, generator=g), torch.randn(12, new_rank, generator=g)
    scaling, new_scaling = 16 / 4, 16 / new_rank
    a2, b2 = transfer_lora_weights(a, b, new_a, new_b, scaling, new_scaling)
    assert a2.shape == new_a.shape and b2.shape == new_b.shape
    before, after = scaling * b @ a, new_scaling * b2 @ a2
    if new_rank >= 4:
        assert torch.allclose(after, before, atol=1e-5)
        assert torch.equal(a2[4:], new_a[4:]) and not b2[:, 4:].any()  # extra directions start like fresh LoRA
    else:
        s = torch.linalg.svdvals(before.double())
        err = torch.linalg.matrix_norm((after - before).double())
        assert err == pytest.approx(float(s[new_rank:].square().sum().sqrt()), rel=1e-4)  # best rank-r' (Eckart-Young)
