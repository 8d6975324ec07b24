r"""NTK-guided module selection: pick the LoRA modules whose empirical kernel is best conditioned.

With LoRA parameters :math:`\theta = \bigcup_m (A_m, B_m)` and per-example losses :math:`l_1..l_n`, the empirical
neural tangent (Gram) kernel of a module set :math:`S` is

.. math::

    H(S) = \sum_{m \in S} H_m, \qquad H_m[i, j] = \langle \nabla_{\theta_m} l_i, \nabla_{\theta_m} l_j \rangle,

because the gradient w.r.t. the concatenated parameters of :math:`S` is the concatenation of the per-module
gradients. Gradient descent in the linearised regime converges at a rate set by :math:`\lambda_{\min}(H(S))`, so a
module set with a larger smallest eigenvalue fits every example faster. The DiffoRA paper argues that the module
set matters through this :math:`\lambda_{\min}`; it does not give a selection procedure. Everything operational
here — per-module kernels from one backward per example, greedy maximisation under the same cardinality and budget
rules as :func:`diffora.select.quota.select_modules`, and the random-set diagnostic — is our reconstruction.

Why greedy: maximising :math:`\lambda_{\min}` of a sum of PSD matrices over subsets is a combinatorial problem
(:math:`\lambda_{\min}` is monotone and concave in the weights but not submodular in general), and exhaustive search
is hopeless beyond toy grids. Adding the module that raises :math:`\lambda_{\min}` most costs one batched
``eigvalsh`` of ``n × n`` matrices per step, with ``n`` ≤ a few dozen examples.

Cost: the per-example gradients of all listed modules are kept until the kernels are built, i.e.
``n · Σ_m r (d_in + d_out)`` floats (float32, on CPU).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..method.candidates import DAMGrid, iter_cells
from .quota import Selection, select_modules
from ..errors import ConfigError, DataError, ModelError, TrainingError

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Subset = Union[Sequence[str], Sequence[bool], torch.Tensor]

# Near-ties of lambda_min (relative to the kernels' scale) are broken by the trace gain: with few rank-deficient
# modules every candidate sum has lambda_min ~ 0 up to eigvalsh round-off (~1e-16 relative).
_NEAR_TIE = 1e-12


@dataclass
class ModuleKernels:
    """Per-module empirical NTKs ``kernels[m] = G_m G_m^T`` (``M × n × n``, float64) of the modules ``names``."""

    names: list[str]
    kernels: torch.Tensor
    n_examples: int

    def mask(self, subset: Subset) -> torch.Tensor:
        """A boolean mask over :attr:`names` from module names or a boolean mask."""
        if isinstance(subset, torch.Tensor):
            chosen = subset.to(torch.bool).flatten()
        else:
            items = list(subset)
            if items and all(isinstance(s, bool) for s in items):
                chosen = torch.tensor([bool(s) for s in items], dtype=torch.bool)
            else:
                index = {n: k for k, n in enumerate(self.names)}
                unknown = [s for s in items if s not in index]
                if unknown:
                    raise ConfigError(f"module(s) without a kernel: {unknown[:3]}")
                chosen = torch.zeros(len(self.names), dtype=torch.bool)
                chosen[[index[s] for s in items]] = True
        if chosen.numel() != len(self.names):
            raise ConfigError(f"a module mask needs {len(self.names)} entries, got {chosen.numel()}")
        return chosen

    def kernel(self, subset: Subset) -> torch.Tensor:
        """``H(S) = Σ_{m ∈ S} H_m`` (``n × n``; zeros for the empty set)."""
        return self.kernels[self.mask(subset)].sum(dim=0)

    def lambda_min(self, subset: Subset) -> float:
        """Smallest eigenvalue of :meth:`kernel`."""
        return float(torch.linalg.eigvalsh(self.kernel(subset))[0])


# ------------------------------------------------------------------------------------------- kernels from a model
def module_kernels(
    peft_model: nn.Module,
    modules: list[str],
    batches: Iterable[Batch],
    *,
    loss_fn: Optional[LossFn] = None,
    adapter_name: str = "default",
    max_examples: int = 32,
) -> ModuleKernels:
    """Per-module empirical NTKs from one backward per example.

    Args:
        peft_model: a ``PeftModel`` with a LoRA adapter ``adapter_name`` on every name in ``modules``.
        modules: full module names (as in the base model, e.g. ``bert.encoder.layer.0.attention.self.query``).
        batches: dicts of tensors ``[batch, ...]``; each is split into 1-row examples.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``. Called on one example at a
            time, so it is that example's loss (mean token loss for a causal LM).
        max_examples: how many examples (kernel size ``n``) to use, at least 2.

    The model is evaluated in eval mode (no dropout) and its modes are restored; parameter values and ``.grad``
    are left untouched (gradients come from ``torch.autograd.grad``, which writes no ``.grad``). On a
    :class:`~diffora.method.search.DAMSearch` model the gate hooks stay on, so this is the kernel of the gated model.
    """
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 2:
        raise ConfigError(f"max_examples must be an integer >= 2 (a kernel needs two examples), got {max_examples!r}")
    if not modules:
        raise ConfigError("module_kernels needs at least one module name")
    if len(set(modules)) != len(modules):
        raise ConfigError("module_kernels got the same module name twice")
    if loss_fn is None:
        from ..method.search import default_loss

        loss_fn = default_loss
    params = _lora_params(peft_model, modules, adapter_name)
    flat = [p for pair in params for p in pair]
    device = _input_device(peft_model, flat[0].device)

    modes = {m: m.training for m in peft_model.modules()}
    needs_grad = [p.requires_grad for p in flat]
    grads: list[list[torch.Tensor]] = [[] for _ in modules]
    n = 0
    try:
        peft_model.eval()
        for p in flat:
            p.requires_grad_(True)  # an inference-mode adapter still has a kernel
        with torch.enable_grad():
            for example in _examples(batches):
                example = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
                loss = loss_fn(peft_model, example)
                if loss.numel() != 1 or not torch.isfinite(loss.detach()).all():
                    raise TrainingError(
                        f"the loss of example {n} is not a finite scalar ({loss.detach().flatten()[:1].tolist()}); "
                        "check that every example has at least one label"
                    )
                # allow_unused: a module the loss does not reach has a zero kernel, not an error.
                g = torch.autograd.grad(loss, flat, allow_unused=True) if loss.requires_grad else [None] * len(flat)
                if all(gp is None for gp in g):
                    raise ModelError(
                        f"the loss does not depend on the LoRA weights of adapter '{adapter_name}' (is it disabled "
                        "or merged?)"
                    )
                for m, (a, b) in enumerate(params):
                    ga, gb = g[2 * m], g[2 * m + 1]
                    parts = [torch.zeros(p.numel()) if gp is None else gp.detach().reshape(-1).float().cpu()
                             for p, gp in ((a, ga), (b, gb))]
                    grads[m].append(torch.cat(parts))
                n += 1
                if n == max_examples:
                    break  # before pulling another batch from a one-shot iterator
    finally:
        for p, flag in zip(flat, needs_grad):
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    if n < 2:
        raise DataError(f"module_kernels needs at least 2 examples, the batches gave {n}")
    kernels = torch.empty(len(modules), n, n, dtype=torch.float64)
    for m, rows in enumerate(grads):
        g64 = torch.stack(rows).to(torch.float64)
        kernels[m] = g64 @ g64.T
        grads[m] = []  # free as we go
    return ModuleKernels(names=list(modules), kernels=kernels, n_examples=n)


def _lora_params(model: nn.Module, modules: Sequence[str], adapter: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = []
    for name in modules:
        try:
            layer = base.get_submodule(name)
        except AttributeError:
            raise ModelError(f"module '{name}' does not exist in the model") from None
        lora_a, lora_b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
        if lora_a is None or lora_b is None or adapter not in lora_a or adapter not in lora_b:
            raise ModelError(f"module '{name}' has no LoRA adapter '{adapter}'")
        out.append((lora_a[adapter].weight, lora_b[adapter].weight))
    return out


def _input_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Where the inputs go: the input embeddings' device (the first device of a model split across several)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return fallback


def _examples(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Split every batch into 1-row batches: tensors with the batch's leading size are sliced, the rest kept."""
    for batch in batches:
        sizes = [v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not sizes:
            raise DataError("a batch has no tensor with a batch dimension")
        size = sizes[0]
        for row in range(size):
            yield {
                k: v[row : row + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
                for k, v in batch.items()
            }


# -------------------------------------------------------------------------------------------- greedy selection
def _rules(
    grid: DAMGrid, keep_ratio: float, granularity: str, rank: int, budget_params: Optional[int]
) -> tuple[list[tuple[int, int, str]], dict[tuple[int, int], int], Selection, Optional[float]]:
    """Cells, LoRA cost per cell and the rules of :func:`select_modules` (validated by calling it on flat scores)."""
    rows, cols = grid.shape
    # select_modules validates keep_ratio/granularity/budget exactly as discretisation does and gives the per-row
    # (layer) or overall (global) counts: with flat scores only its cardinalities matter.
    reference = select_modules(grid, [[0.0] * cols for _ in range(rows)], keep_ratio, granularity, rank, budget_params)
    cells = list(iter_cells(grid))
    cost = {(i, j): rank * grid.param_costs[i][j] for i, j, _ in cells}
    budget = None
    if granularity == "budget":
        budget = budget_params if budget_params is not None else keep_ratio * reference.total_lora_params
    return cells, cost, reference, budget


def _check_kernels(kernels: ModuleKernels, grid: DAMGrid) -> torch.Tensor:
    """The kernels in the grid's row-major cell order."""
    index = {n: k for k, n in enumerate(kernels.names)}
    missing = [n for n in grid.module_names() if n not in index]
    if missing:
        raise ConfigError(f"{len(missing)} DAM candidate(s) have no kernel, e.g. '{missing[0]}'")
    return kernels.kernels[[index[n] for n in grid.module_names()]]


def _selection(grid: DAMGrid, kept: set[tuple[int, int]], cells, cost, reference: Selection) -> Selection:
    rows, cols = grid.shape
    return Selection(
        mask=[[(i, j) in kept for j in range(cols)] for i in range(rows)],
        modules=[name for i, j, name in cells if (i, j) in kept],
        keep_ratio=reference.keep_ratio,
        granularity=reference.granularity,
        lora_params=sum(cost[c] for c in kept),
        total_lora_params=reference.total_lora_params,
    )


def greedy_ntk_selection(
    kernels: ModuleKernels,
    grid: DAMGrid,
    keep_ratio: float,
    granularity: str = "layer",
    rank: int = 8,
    budget_params: Optional[int] = None,
) -> Selection:
    """Greedily choose the module set that maximises ``λ_min(H(S))`` under :func:`select_modules`' rules.

    ``layer``: ``ceil(rho * M_l)`` per row; ``global``: ``ceil(rho * N)``; ``budget``: modules added while their
    LoRA parameters fit. Each step adds the allowed candidate with the largest ``λ_min`` of the new sum; near-ties
    (relative 1e-12) go to the largest trace gain, then to the earlier layer, then the earlier column.
    """
    cells, cost, reference, budget = _rules(grid, keep_ratio, granularity, rank, budget_params)
    stack = _check_kernels(kernels, grid)
    quota = {i: sum(reference.mask[i]) for i in range(grid.shape[0])}  # layer granularity
    total = reference.num_kept  # global granularity
    traces = stack.diagonal(dim1=1, dim2=2).sum(dim=1)
    scale = max(float(torch.linalg.eigvalsh(stack.sum(dim=0))[-1]), 1e-300)
    current = torch.zeros_like(stack[0])
    kept: set[tuple[int, int]] = set()
    spent = 0

    while True:
        if granularity == "layer":
            allowed = [k for k, (i, j, _) in enumerate(cells) if (i, j) not in kept and quota[i] > 0]
        elif granularity == "global":
            allowed = [k for k, (i, j, _) in enumerate(cells) if (i, j) not in kept] if len(kept) < total else []
        else:
            allowed = [k for k, (i, j, _) in enumerate(cells)
                       if (i, j) not in kept and spent + cost[i, j] <= budget]
        if not allowed:
            break
        lams = torch.linalg.eigvalsh(current.unsqueeze(0) + stack[allowed])[:, 0]
        best = float(lams.max())
        near = [k for k, lam in zip(allowed, lams.tolist()) if lam >= best - _NEAR_TIE * max(abs(best), scale)]
        top_trace = max(float(traces[k]) for k in near)
        # cells are in row-major order, so the first near-tied one is the earliest (layer, column)
        choice = next(k for k in near if float(traces[k]) >= top_trace - _NEAR_TIE * max(top_trace, scale))
        i, j, _ = cells[choice]
        kept.add((i, j))
        current = current + stack[choice]
        quota[i] -= 1
        spent += cost[i, j]
    return _selection(grid, kept, cells, cost, reference)


def _random_sets(
    grid: DAMGrid, keep_ratio: float, granularity: str, rank: int, budget_params: Optional[int], n_sets: int, seed: int
) -> list[list[int]]:
    """Indices (into the row-major cells) of ``n_sets`` random module sets drawn under the selection rules."""
    cells, cost, reference, budget = _rules(grid, keep_ratio, granularity, rank, budget_params)
    gen = torch.Generator().manual_seed(seed)  # private stream: the global RNG is not touched
    sets = []
    for _ in range(n_sets):
        if granularity == "layer":
            chosen = []
            for row in range(grid.shape[0]):
                members = [k for k, c in enumerate(cells) if c[0] == row]
                if members:
                    order = torch.randperm(len(members), generator=gen).tolist()
                    chosen += [members[o] for o in order[: sum(reference.mask[row])]]
        elif granularity == "global":
            chosen = torch.randperm(len(cells), generator=gen).tolist()[: reference.num_kept]
        else:
            chosen, spent = [], 0
            for k in torch.randperm(len(cells), generator=gen).tolist():
                c = cost[cells[k][0], cells[k][1]]
                if spent + c <= budget:
                    chosen.append(k)
                    spent += c
        sets.append(sorted(chosen))
    return sets


def random_lambda_min(
    kernels: ModuleKernels,
    grid: DAMGrid,
    keep_ratio: float,
    granularity: str,
    rank: int,
    budget_params: Optional[int] = None,
    n_sets: int = 20,
    seed: int = 0,
) -> list[float]:
    """``λ_min(H(S))`` of ``n_sets`` random module sets drawn under the same rules as the selection."""
    if isinstance(n_sets, bool) or not isinstance(n_sets, int) or n_sets < 1:
        raise ConfigError(f"n_sets must be an integer >= 1, got {n_sets!r}")
    stack = _check_kernels(kernels, grid)
    sets = _random_sets(grid, keep_ratio, granularity, rank, budget_params, n_sets, seed)
    sums = torch.stack([stack[s].sum(dim=0) for s in sets])
    return [float(v) for v in torch.linalg.eigvalsh(sums)[:, 0]]


def ntk_diagnostic(
    kernels: ModuleKernels,
    grid: DAMGrid,
    selection: Selection,
    keep_ratio: float,
    granularity: str,
    rank: int,
    n_random: int = 20,
    seed: int = 0,
    budget_params: Optional[int] = None,
) -> dict:
    """How well conditioned the selection's kernel is, next to all candidates and random sets (for ``dam.json``).

    ``selected_rank_among_random`` is the fraction of random sets with a strictly lower ``λ_min``;
    ``random_std`` is the population standard deviation.
    """
    selected = kernels.lambda_min(selection.modules)
    every = kernels.lambda_min(grid.module_names())
    rand = random_lambda_min(kernels, grid, keep_ratio, granularity, rank, budget_params, n_random, seed)
    return {
        "n_examples": int(kernels.n_examples),
        "lambda_min_selected": selected,
        "lambda_min_all": every,
        "lambda_min_random": rand,
        "random_mean": statistics.fmean(rand),
        "random_std": statistics.pstdev(rand),
        "selected_rank_among_random": sum(r < selected for r in rand) / len(rand),
    }
