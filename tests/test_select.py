"""Module selection has one home: strategies from a registry, one quota rule, and the ranking options of issue 20
(per-type normalisation, within-type quota, NTK normalisation / ungated kernels / output Jacobian), each shown to
be able to change the kept set against the default on a constructed example."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model
from peft import LoraConfig, get_peft_model
from torch import nn

from diffora import ConfigError, DAMGrid, DiffoRAConfig, SearchStateError, choose_modules, prepare_search
from diffora.select import strategies
from diffora.select.choose import allocate_ranks, gate_scores, search_kernels
from diffora.select.ntk import module_kernels
from diffora.select.quota import Quota, select_modules
from diffora.select.strategies import SelectionStrategy, get_strategy, normalize_scores, register, strategy_names
from diffora.select.strategies.ntk import ModuleKernels, greedy_ntk_selection
from diffora.select.strategies.random import random_selection


def grid(rows: int = 3, types=("q", "k", "ffn"), costs=None) -> DAMGrid:
    costs = costs or [10, 10, 25]
    return DAMGrid(
        layers=[f"l.{i}" for i in range(rows)],
        types=list(types),
        labels=list(types),
        names=[[f"l.{i}.{t}" for t in types] for i in range(rows)],
        param_costs=[list(costs) for _ in range(rows)],
    )


class FixedGates:
    """Duck-typed gates whose values are given (strategies read only ``values`` and ``initial_values``)."""

    def __init__(self, values) -> None:
        self._values = torch.tensor(values, dtype=torch.float32)

    def values(self) -> torch.Tensor:
        return self._values

    def initial_values(self, init: float) -> torch.Tensor:
        return torch.zeros_like(self._values)


def fake_search(values, g: DAMGrid, **config) -> SimpleNamespace:
    """A finished search as strategies see it (one gate step; a taylor sum equal to the gates)."""
    return SimpleNamespace(
        grid=g,
        config=DiffoRAConfig(**{"rank": 1, **config}),
        gates=FixedGates(values),
        gate_steps=1,
        taylor_sum=torch.tensor(values),
        taylor_steps=1,
    )


# One module type (ffn) scores highest in every layer, but its scores barely differ between layers.
TYPE_DOMINATED = [[0.1, 0.2, 0.90], [0.3, 0.1, 0.80], [0.2, 0.25, 0.85]]


# ------------------------------------------------------------------------------------------------ registry
def test_the_registry_holds_every_strategy_and_the_config_validates_against_it():
    assert strategy_names() == ("gate", "movement", "signed", "taylor", "ntk", "random")
    with pytest.raises(ConfigError, match="selection_score must be one of"):
        DiffoRAConfig(selection_score="loss")
    with pytest.raises(ConfigError, match="selection_score must be one of"):
        get_strategy("loss")
    with pytest.raises(ConfigError, match="'taylor' needs sigmoid gates"):
        DiffoRAConfig(selection_score="taylor", gate="softmax")
    with pytest.raises(ConfigError, match="ntk_normalization"):
        DiffoRAConfig(selection_score="ntk", score_normalization="per_type")


def test_a_new_strategy_is_one_registered_class(monkeypatch):
    """Adding a strategy touches its own file only: the config, choose_modules and rank allocation pick it up."""
    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))

    @register
    class LastColumns(SelectionStrategy):
        name = "last-columns"
        needs_gate_steps = False

        def scores(self, search, kernels=None):
            return [[float(j) for j in range(search.grid.shape[1])] for _ in range(search.grid.shape[0])]

    assert "last-columns" in strategy_names()
    search = fake_search(
        TYPE_DOMINATED, grid(), selection_score="last-columns", keep_ratio=1 / 3, rank_allocation="uniform"
    )
    search.gate_steps = 0
    assert choose_modules(search).modules == ["l.0.ffn", "l.1.ffn", "l.2.ffn"]
    assert allocate_ranks(search, choose_modules(search)) is not None


@pytest.mark.parametrize(
    "option,value",
    [("score_normalization", "z"), ("ntk_kernel", "fisher"), ("ntk_normalization", "max"), ("granularity", "row")],
)
def test_new_options_are_validated(option, value):
    with pytest.raises(ConfigError, match=f"{option} must be one of"):
        DiffoRAConfig(**{option: value})


def test_gate_strategies_refuse_a_search_without_gate_steps_and_searchless_ones_do_not():
    search = fake_search(TYPE_DOMINATED, grid())
    search.gate_steps = 0
    with pytest.raises(SearchStateError, match="no gate step has run"):
        choose_modules(search)
    assert choose_modules(search, score="random").num_kept == 6  # ceil(0.5 * 3) in each of 3 layers
    with pytest.raises(ConfigError, match="needs the kernels"):
        choose_modules(search, score="ntk")


def test_gate_scores_lists_what_the_gate_history_gives():
    scores = gate_scores(fake_search(TYPE_DOMINATED, grid()))
    assert set(scores) == {"gate", "movement", "signed", "taylor"}  # no data kernels, nothing random
    assert scores["gate"][0][2] == pytest.approx(0.9)
    assert set(gate_scores(fake_search(TYPE_DOMINATED, grid(), gate="softmax"))) == {"gate", "movement", "signed"}


def test_the_random_strategy_draws_the_random_controls_stream():
    g = grid()
    for seed, rho, gran in ((0, 0.5, "layer"), (3, 0.25, "global"), (1, 0.4, "budget")):
        ours = random_selection(g, rho, seed, 2, gran)
        search = fake_search(TYPE_DOMINATED, g, selection_score="random", seed=seed, rank=2)
        assert choose_modules(search, keep_ratio=rho, granularity=gran) == ours


# ------------------------------------------------------------------------------------------------- the quota
@pytest.mark.parametrize("gran,rho", [("layer", 0.5), ("type", 0.5), ("global", 0.3), ("budget", 0.4)])
def test_select_modules_is_the_quota_filled_in_ranking_order(gran, rho):
    g = grid(rows=4)
    scores = torch.rand(g.shape, generator=torch.Generator().manual_seed(1)).tolist()
    cells = sorted(((i, j) for i in range(4) for j in range(3)), key=lambda c: (-scores[c[0]][c[1]], c))
    quota = Quota(g, rho, gran, rank=2)
    for cell in cells:
        if quota.can_add(cell):
            quota.add(cell)
            assert not quota.can_add(cell)  # a kept cell is never added twice
    assert select_modules(g, scores, rho, gran, rank=2) == quota.selection()
    with pytest.raises(ConfigError, match="does not fit"):
        quota.add(next(c for c in cells if not quota.can_add(c)))


def test_within_type_quota_keeps_the_same_fraction_of_every_type():
    g = grid()
    by_layer = select_modules(g, TYPE_DOMINATED, 1 / 3, "layer", rank=1)
    by_type = select_modules(g, TYPE_DOMINATED, 1 / 3, "type", rank=1)
    assert by_layer.modules == ["l.0.ffn", "l.1.ffn", "l.2.ffn"]
    assert [sum(row[j] for row in by_type.mask) for j in range(3)] == [1, 1, 1]
    assert by_type.modules == ["l.0.ffn", "l.1.q", "l.2.k"]  # each type's best layer
    search = fake_search(TYPE_DOMINATED, g, selection_score="gate", keep_ratio=1 / 3, granularity="type")
    assert choose_modules(search) == by_type


def test_explicit_type_counts_replace_rho_and_are_checked():
    g = grid()
    chosen = select_modules(g, TYPE_DOMINATED, 1 / 3, "type", rank=1, type_counts=[0, 2, 1])
    assert [sum(row[j] for row in chosen.mask) for j in range(3)] == [0, 2, 1]
    best_two = sorted(range(3), key=lambda i: -TYPE_DOMINATED[i][1])[:2]  # column 1's two best layers
    assert sorted(i for i in range(3) if chosen.mask[i][1]) == sorted(best_two)
    with pytest.raises(ConfigError, match="type_counts needs granularity 'type'"):
        select_modules(g, TYPE_DOMINATED, 1 / 3, "layer", rank=1, type_counts=[1, 1, 1])
    with pytest.raises(ConfigError, match="exceed the candidates per type"):
        select_modules(g, TYPE_DOMINATED, 1 / 3, "type", rank=1, type_counts=[4, 0, 0])


# -------------------------------------------------------------------------------------- score normalisation
def test_per_type_normalization_z_scores_each_column_and_can_change_the_selection():
    g = grid()
    z = normalize_scores(TYPE_DOMINATED, g, "per_type")
    for j in range(3):
        column = torch.tensor([row[j] for row in z])
        assert float(column.mean()) == pytest.approx(0.0, abs=1e-9)
        assert float(column.std(unbiased=False)) == pytest.approx(1.0)
    assert normalize_scores([[1.0, 2.0, 3.0]], grid(rows=1), "per_type") == [[0.0, 0.0, 0.0]]  # one layer: no spread

    default = choose_modules(fake_search(TYPE_DOMINATED, g, selection_score="gate", keep_ratio=1 / 3))
    per_type = choose_modules(
        fake_search(TYPE_DOMINATED, g, selection_score="gate", keep_ratio=1 / 3, score_normalization="per_type")
    )
    assert default.modules == ["l.0.ffn", "l.1.ffn", "l.2.ffn"]
    assert per_type.modules == ["l.0.ffn", "l.1.q", "l.2.k"]  # each layer's type that stands out most


def test_missing_cells_stay_out_of_the_normalization():
    g = grid(rows=3)
    g.names[2][0] = None
    z = normalize_scores([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [100.0, 0.0, 0.0]], g, "per_type")
    assert [row[0] for row in z] == [pytest.approx(-1.0), pytest.approx(1.0), 0.0]


# ----------------------------------------------------------------------------------------------------- NTK
def two_module_kernels() -> tuple[DAMGrid, ModuleKernels]:
    """'big' has the larger lambda_min only because its kernel is large (and ill-conditioned); 'small' is a
    smaller, perfectly conditioned kernel. 'big' also has 100x the parameters."""
    g = grid(rows=1, types=("big", "small"), costs=[100, 1])
    kernels = torch.stack([torch.diag(torch.tensor([100.0, 1.0])), 0.5 * torch.eye(2)]).double()
    return g, ModuleKernels(names=["l.0.big", "l.0.small"], kernels=kernels, n_examples=2)


@pytest.mark.parametrize("mode", ["trace", "params"])
def test_ntk_normalization_can_change_the_selection(mode):
    g, kernels = two_module_kernels()
    assert greedy_ntk_selection(kernels, g, 0.5, "global", rank=1).modules == ["l.0.big"]
    normalized = kernels.normalized(mode, g)
    assert greedy_ntk_selection(normalized, g, 0.5, "global", rank=1).modules == ["l.0.small"]
    if mode == "trace":
        assert normalized.kernels.diagonal(dim1=1, dim2=2).sum(dim=1).tolist() == pytest.approx([1.0, 1.0])
    search = fake_search([[1.0, 1.0]], g, selection_score="ntk", keep_ratio=0.5, granularity="global")
    assert choose_modules(search, normalized).modules == ["l.0.small"]
    assert kernels.normalized("none", g) is kernels


class TwoBranches(nn.Module):
    """Two classes; 'shift' moves both logits alike (the cross-entropy cannot see it), 'diff' only logit 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shift, self.diff = nn.Linear(8, 1), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        c = self.shift(x)
        logits = torch.cat([c + self.diff(x), c], dim=-1)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_output_jacobian_kernel_can_change_the_selection():
    """A module that moves every logit alike has a zero loss gradient under cross-entropy but the largest output
    Jacobian: loss_grad keeps 'diff', output_jacobian keeps 'shift'."""
    model = get_peft_model(TwoBranches(), LoraConfig(r=4, lora_alpha=4, target_modules=["shift", "diff"]))
    base = model.get_base_model()
    with torch.no_grad():  # the same A in both branches, so only what the outputs do with it differs
        base.diff.lora_A["default"].weight.copy_(base.shift.lora_A["default"].weight)
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(4, 8, generator=g), "labels": torch.tensor([0, 1, 0, 1])}]
    names = ["shift", "diff"]
    dam = DAMGrid(layers=["m"], types=names, labels=names, names=[names], param_costs=[[9, 9]])
    by_loss = module_kernels(model, names, batches, max_examples=4)
    by_output = module_kernels(model, names, batches, max_examples=4, kind="output_jacobian")
    assert float(by_loss.kernels[0].abs().max()) < 1e-10 * float(by_loss.kernels[1].abs().max())
    torch.testing.assert_close(by_output.kernels[0], 2 * by_output.kernels[1])  # two outputs against one
    assert greedy_ntk_selection(by_loss, dam, 0.5, "global", rank=1).modules == ["diff"]
    assert greedy_ntk_selection(by_output, dam, 0.5, "global", rank=1).modules == ["shift"]
    with pytest.raises(ConfigError, match="ntk_kernel must be one of"):
        module_kernels(model, names, batches, kind="fisher")


def test_output_jacobian_of_a_language_model_uses_seeded_projections():
    search = prepare_search(tiny_model("llama", kind="causal_lm"), DiffoRAConfig(rank=2))
    randomize_lora_b(search.model)
    names = search.grid.module_names()
    batch = random_batch(3, kind="causal_lm")
    a = module_kernels(search.model, names, [batch], kind="output_jacobian")
    b = module_kernels(search.model, names, [batch], kind="output_jacobian")
    assert a.kernels.shape == (len(names), 3, 3) and torch.equal(a.kernels, b.kernels)
    torch.testing.assert_close(a.kernels, a.kernels.transpose(1, 2))
    assert bool((torch.linalg.eigvalsh(a.kernels) > -1e-8 * a.kernels.abs().amax()).all())


def test_ungated_kernels_ignore_the_gates_and_can_change_the_selection():
    """Forcing the gates to 1 computes the kernels of LoRA on every candidate, whatever the search learned; the
    gated kernels scale each module by g^2, so nearly closed gates hide a module from the NTK selection."""
    config = dict(rank=4, keep_ratio=0.25, selection_score="ntk")
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(**config))
    randomize_lora_b(search.model)
    batch = random_batch(6)
    ungated = search_kernels(search, [batch], 6)
    kept = choose_modules(search, ungated)
    assert kept.modules  # one module per layer
    with torch.no_grad():  # close every gate but one per layer, never the one the ungated kernels keep
        beta = torch.full_like(search.gates.beta, -30.0)
        for i, row in enumerate(kept.mask):
            j = next(j for j, name in enumerate(search.grid.names[i]) if name and not row[j])
            beta[i, j] = 0.0
        search.gates.beta.copy_(beta)
    torch.testing.assert_close(search_kernels(search, [batch], 6).kernels, ungated.kernels)
    search.config = DiffoRAConfig(**config, ntk_ungated=False)
    gated = choose_modules(search, search_kernels(search, [batch], 6))
    assert set(gated.modules).isdisjoint(kept.modules)
