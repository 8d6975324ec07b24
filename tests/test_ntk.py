"""NTK-guided selection: per-module kernels against a brute-force Jacobian, greedy rules, the diagnostic."""

import itertools
import json
import statistics

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model
from torch.func import functional_call, grad

from diffora import ConfigError, DAMGrid, DataError, DiffoRAConfig, ModelError, prepare_search, select_modules
from diffora.select.ntk import module_kernels
from diffora.select.quota import random_sets
from diffora.select.strategies.ntk import ModuleKernels, greedy_ntk_selection, ntk_diagnostic, random_lambda_min


def search_for(arch: str, kind: str = "seq_cls"):
    search = prepare_search(tiny_model(arch, kind=kind), DiffoRAConfig(rank=4))
    randomize_lora_b(search.model)  # B != 0, so the gradients w.r.t. A are not zero either
    return search


def brute_force_kernel(search, names, batches, n):
    """K = J J^T with J the per-example gradient of the loss w.r.t. the concatenated LoRA A/B of ``names``,
    via torch.func (functional_call + grad), independent of diffora.select.ntk."""
    base = search.model.get_base_model()
    keys = [f"{m}.lora_{x}.{search.adapter_name}.weight" for m in names for x in ("A", "B")]
    params = {k: base.get_parameter(k).detach().clone() for k in keys}

    def loss(p, example):
        return functional_call(base, p, args=(), kwargs=example, strict=False).loss

    rows = []
    for batch in batches:
        size = batch["input_ids"].shape[0]
        for i in range(size):
            if len(rows) < n:
                g = grad(loss)(params, {k: v[i : i + 1] for k, v in batch.items()})
                rows.append(torch.cat([g[k].detach().reshape(-1) for k in keys]).double())
    jac = torch.stack(rows)
    return jac @ jac.T


@pytest.mark.parametrize("arch,kind", [("bert", "seq_cls"), ("llama", "causal_lm")])
def test_kernel_is_additive_and_matches_brute_force(arch, kind):
    search = search_for(arch, kind)
    search.model.eval()
    names = search.grid.module_names()
    batches = [random_batch(3, kind=kind), random_batch(4, seed=2, kind=kind)]
    kernels = module_kernels(search.model, names, batches, max_examples=6)  # crosses a batch boundary, truncates
    assert kernels.n_examples == 6 and kernels.kernels.shape == (len(names), 6, 6)
    assert kernels.kernels.dtype == torch.float64

    g = torch.Generator().manual_seed(0)
    subset = [n for n, keep in zip(names, torch.rand(len(names), generator=g) < 0.5) if keep]
    expected = brute_force_kernel(search, subset, batches, 6)
    got = kernels.kernel(subset)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    # the same subset as a mask, and as a sum of single-module kernels
    mask = [n in subset for n in names]
    assert torch.equal(kernels.kernel(mask), got)
    assert torch.allclose(sum(kernels.kernel([n]) for n in subset), got, rtol=1e-12)
    assert kernels.lambda_min(subset) == pytest.approx(float(torch.linalg.eigvalsh(expected)[0]), rel=1e-4, abs=1e-12)


def test_fresh_lora_has_zero_a_kernel_but_a_nonzero_kernel():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4))  # B = 0: grad wrt A is exactly 0
    kernels = module_kernels(search.model, search.grid.module_names()[:2], [random_batch(4)])
    assert kernels.n_examples == 4 and float(kernels.kernels.abs().sum()) > 0


def test_module_kernels_leaves_the_model_as_it_was():
    search = search_for("bert")
    model = search.model
    model.train()
    layer = search.model.get_base_model().get_submodule(search.grid.module_names()[0])
    frozen = layer.lora_A[search.adapter_name].weight
    frozen.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    kernels = module_kernels(model, search.grid.module_names(), [random_batch(4)], max_examples=4)
    assert float(kernels.kernel([search.grid.module_names()[0]]).trace()) > 0  # a frozen LoRA still has a kernel
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert search.gates.beta.grad is None


def test_module_kernels_errors_are_one_line():
    search = search_for("bert")
    names = search.grid.module_names()
    cases = [
        (ConfigError, dict(modules=names, max_examples=1)),
        (ConfigError, dict(modules=names, max_examples=True)),
        (ConfigError, dict(modules=[])),
        (ConfigError, dict(modules=[names[0], names[0]])),
        (ModelError, dict(modules=["bert.encoder.layer.0.nope"])),
        (ModelError, dict(modules=["bert.pooler.dense"])),  # exists, has no LoRA
        (DataError, dict(modules=names, batches=[random_batch(1)])),
    ]
    for error, kwargs in cases:
        kwargs.setdefault("batches", [random_batch(4)])
        with pytest.raises(error) as info:
            module_kernels(search.model, **kwargs)
        assert "\n" not in str(info.value) and str(info.value)


def test_module_kernels_pulls_no_more_batches_than_needed():
    search = search_for("bert")
    pulled = []

    def batches():
        for seed in range(5):
            pulled.append(seed)
            yield random_batch(2, seed=seed + 1)

    module_kernels(search.model, search.grid.module_names()[:1], batches(), max_examples=4)
    assert pulled == [0, 1]


# ------------------------------------------------------------------------------------------------ greedy rules
def hand_grid(rows=3, costs=(10, 10, 10, 25)) -> DAMGrid:
    types = ["q", "k", "v", "ffn"]
    return DAMGrid(
        layers=[f"l.{i}" for i in range(rows)],
        types=types,
        labels=types,
        names=[[f"l.{i}.{t}" for t in types] for i in range(rows)],
        param_costs=[list(costs) for _ in range(rows)],
    )


def kernels_from(grid: DAMGrid, mats) -> ModuleKernels:
    stack = torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in mats])
    return ModuleKernels(names=grid.module_names(), kernels=stack, n_examples=stack.shape[1])


def random_kernels(grid: DAMGrid, n=6, p=3, seed=0) -> ModuleKernels:
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in grid.module_names():
        j = torch.randn(n, p, generator=g, dtype=torch.float64)  # rank p < n: rank-deficient, as real H_m can be
        mats.append(j @ j.T)
    return kernels_from(grid, mats)


@pytest.mark.parametrize("rho", [0.2, 0.5, 0.75, 1.0])
def test_greedy_obeys_select_modules_rules(rho):
    grid = hand_grid()
    kernels = random_kernels(grid)
    scores = [[0.0] * 4 for _ in range(3)]
    for gran in ("layer", "global", "budget"):
        ref = select_modules(grid, scores, rho, gran, rank=2)
        sel = greedy_ntk_selection(kernels, grid, rho, gran, rank=2)
        assert sel == greedy_ntk_selection(kernels, grid, rho, gran, rank=2)  # deterministic
        assert sel.total_lora_params == ref.total_lora_params
        assert sel.keep_ratio == rho and sel.granularity == gran
        cells = [(i, j, n) for i, row in enumerate(grid.names) for j, n in enumerate(row)]
        assert sel.modules == [n for i, j, n in cells if sel.mask[i][j]]
        assert sel.lora_params == sum(2 * grid.param_costs[i][j] for i, j, _ in cells if sel.mask[i][j])
        if gran == "layer":
            assert [sum(r) for r in sel.mask] == [sum(r) for r in ref.mask]
        elif gran == "global":
            assert sel.num_kept == ref.num_kept
        else:
            budget = rho * ref.total_lora_params
            assert sel.lora_params <= budget
            assert all(sel.mask[i][j] or sel.lora_params + 2 * grid.param_costs[i][j] > budget for i, j, _ in cells)
    explicit = greedy_ntk_selection(kernels, grid, rho, "budget", rank=2, budget_params=70)
    assert explicit.lora_params <= 70


def test_greedy_validates_like_select_modules():
    grid = hand_grid()
    kernels = random_kernels(grid)
    for kwargs in (
        dict(keep_ratio=0.0),
        dict(keep_ratio=0.5, granularity="row"),
        dict(keep_ratio=0.5, granularity="budget", budget_params=5),
    ):
        with pytest.raises(ConfigError):
            greedy_ntk_selection(kernels, grid, **kwargs)
    partial = ModuleKernels(kernels.names[1:], kernels.kernels[1:], kernels.n_examples)
    with pytest.raises(ConfigError, match="no kernel"):
        greedy_ntk_selection(partial, grid, 0.5)


def test_identical_kernels_tie_break_like_select_modules():
    grid = hand_grid(costs=(10, 30, 10, 25))
    kernels = kernels_from(grid, [torch.eye(4)] * 12)
    flat = [[1.0] * 4 for _ in range(3)]
    for gran, rho in (("layer", 0.5), ("global", 0.25), ("budget", 0.3)):
        assert (
            greedy_ntk_selection(kernels, grid, rho, gran, rank=1).modules
            == select_modules(grid, flat, rho, gran, rank=1).modules
        )


def test_near_zero_ties_go_to_the_largest_trace():
    grid = hand_grid(rows=1)
    kernels = kernels_from(
        grid,
        [
            torch.diag(torch.tensor(d, dtype=torch.float64))
            for d in ([1.0, 0, 0], [5.0, 5.0, 0], [0, 0, 2.0], [0, 1.0, 0])
        ],
    )
    # every single module has lambda_min 0: the first pick is the largest trace (k), then v completes the rank
    assert greedy_ntk_selection(kernels, grid, 0.25, "global", rank=1).modules == ["l.0.k"]
    assert greedy_ntk_selection(kernels, grid, 0.5, "global", rank=1).modules == ["l.0.k", "l.0.v"]


def signal_kernels(grid: DAMGrid) -> ModuleKernels:
    """Only the 'q' column is full rank (with per-layer strength); the others are rank-deficient."""
    n = 4
    mats = []
    for i, j, _ in ((i, j, n_) for i, row in enumerate(grid.names) for j, n_ in enumerate(row)):
        if j == 0:
            mats.append(torch.eye(n) * (2.0 + i))
        else:  # two zero directions: no mix of these and fewer q's reaches the all-q optimum 2 + 3 + 4 = 9
            d = torch.full((n,), 3.0)
            d[(i + j) % n] = d[(i + j + 1) % n] = 0.0
            mats.append(torch.diag(d))
    return kernels_from(grid, mats)


def test_greedy_finds_the_known_optimum_and_beatsrandom_sets():
    grid = hand_grid()
    kernels = signal_kernels(grid)
    cells = grid.module_names()
    for gran, rho in (("layer", 0.25), ("global", 0.25)):
        sel = greedy_ntk_selection(kernels, grid, rho, gran, rank=1)
        assert sel.modules == ["l.0.q", "l.1.q", "l.2.q"]
        best = max(
            kernels.lambda_min(list(s))
            for s in itertools.combinations(cells, 3)
            if gran == "global" or sorted(int(m.split(".")[1]) for m in s) == [0, 1, 2]
        )
        assert kernels.lambda_min(sel.modules) == pytest.approx(best) == pytest.approx(9.0)
        rand = random_lambda_min(kernels, grid, rho, gran, rank=1, n_sets=30)
        assert kernels.lambda_min(sel.modules) >= statistics.median(rand)


def test_random_sets_follow_the_rules_and_keep_the_global_rng():
    grid = hand_grid()
    kernels = random_kernels(grid)
    state = torch.get_rng_state()
    a = random_lambda_min(kernels, grid, 0.5, "layer", rank=2, n_sets=8, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert a == random_lambda_min(kernels, grid, 0.5, "layer", rank=2, n_sets=8, seed=3)
    assert a != random_lambda_min(kernels, grid, 0.5, "layer", rank=2, n_sets=8, seed=4)
    cells = [(i, j) for i in range(3) for j in range(4)]
    for s in random_sets(grid, 0.5, "layer", 2, None, 10, 0):
        assert [sum(1 for k in s if cells[k][0] == row) for row in range(3)] == [2, 2, 2]
    assert all(len(s) == 3 for s in random_sets(grid, 0.25, "global", 2, None, 10, 0))
    sets = random_sets(grid, 0.5, "budget", 1, None, 10, 0)  # budget 0.5 * 165 = 82.5
    for s in sets:
        spent = sum(grid.param_costs[cells[k][0]][cells[k][1]] for k in s)
        assert spent <= 82.5 and all(k in s or spent + grid.param_costs[c[0]][c[1]] > 82.5 for k, c in enumerate(cells))
    assert len({tuple(s) for s in sets}) > 1


def test_diagnostic_is_json_ready():
    grid = hand_grid()
    kernels = signal_kernels(grid)
    sel = greedy_ntk_selection(kernels, grid, 0.25, "layer", rank=1)
    diag = ntk_diagnostic(kernels, grid, sel, 0.25, "layer", 1, n_random=10)
    assert json.loads(json.dumps(diag)) == diag
    assert diag["n_examples"] == 4 and len(diag["lambda_min_random"]) == 10
    assert diag["lambda_min_selected"] == pytest.approx(9.0)
    assert diag["lambda_min_all"] >= diag["lambda_min_selected"]
    assert diag["random_mean"] == pytest.approx(statistics.fmean(diag["lambda_min_random"]))
    assert diag["selected_rank_among_random"] == sum(r < 9.0 - 1e-9 for r in diag["lambda_min_random"]) / 10


def test_end_to_end_on_a_tiny_model():
    search = search_for("bert")
    kernels = module_kernels(search.model, search.grid.module_names(), [random_batch(6)])
    sel = greedy_ntk_selection(kernels, search.grid, 0.5, "layer", rank=search.config.rank)
    ref = select_modules(search.grid, search.gate_values(), 0.5, "layer", rank=search.config.rank)
    assert [sum(r) for r in sel.mask] == [sum(r) for r in ref.mask]
    diag = ntk_diagnostic(kernels, search.grid, sel, 0.5, "layer", search.config.rank)
    assert diag["lambda_min_selected"] >= statistics.median(diag["lambda_min_random"])


def test_a_disabled_adapter_is_a_model_error():
    search = search_for("bert")
    with search.model.disable_adapter(), pytest.raises(ModelError, match="does not depend"):
        module_kernels(search.model, search.grid.module_names(), [random_batch(4)])
