r"""NTK-guided module selection: choose the LoRA module set whose empirical kernel is best conditioned.

With LoRA parameters :math:`\theta = \bigcup_m (A_m, B_m)`, the empirical neural tangent (Gram) kernel of a module
set :math:`S` on examples :math:`x_1..x_n` is

.. math::

    H(S) = \sum_{m \in S} H_m, \qquad H_m[i, j] = \langle \nabla_{\theta_m} f(x_i), \nabla_{\theta_m} f(x_j) \rangle,

with :math:`f` the per-example loss (``ntk_kernel='loss_grad'``) or the model's outputs, summed over output
dimensions (``'output_jacobian'``), because the gradient w.r.t. the concatenated parameters of :math:`S` is the
concatenation of the per-module gradients. Gradient descent in the linearised regime converges at a rate set by
:math:`\lambda_{\min}(H(S))`, so a module set with a larger smallest eigenvalue fits every example faster. The
DiffoRA paper argues that the module set matters through this :math:`\lambda_{\min}`; it does not give a selection
procedure. Everything operational here — per-module kernels (:mod:`diffora.select.ntk`), greedy maximisation under
the quota rule of :mod:`diffora.select.quota`, the per-module normalisation and the random-set diagnostic — is our
reconstruction.

Why greedy: maximising :math:`\lambda_{\min}` of a sum of PSD matrices over subsets is a combinatorial problem
(:math:`\lambda_{\min}` is monotone and concave in the weights but not submodular in general), and exhaustive search
is hopeless beyond toy grids. Adding the module that raises :math:`\lambda_{\min}` most costs one batched
``eigvalsh`` of ``n × n`` matrices per step, with ``n`` ≤ a few dozen examples.

Why normalise: a module's kernel grows with its parameter count and its gradient scale, so without normalisation
:math:`\lambda_{\min}` favours the large FFN kernels — a module-type preference, not a conditioning one.
``ntk_normalization='trace'`` gives every module kernel trace 1 (only its *shape* counts); ``'params'`` divides by
its LoRA parameter count.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from ...errors import ConfigError
from ..quota import Quota, Selection, random_sets
from . import NTK_NORMALIZATIONS, Scores, SelectionStrategy, register

if TYPE_CHECKING:
    from ...method.candidates import DAMGrid

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

    def traces(self) -> dict[str, float]:
        return {name: float(k.trace()) for name, k in zip(self.names, self.kernels)}

    def normalized(self, mode: str, grid: Optional[DAMGrid] = None) -> "ModuleKernels":
        """``none``: as they are; ``trace``: every kernel divided by its trace (a zero kernel stays zero);
        ``params``: divided by the module's ``d_in + d_out`` (its LoRA parameters per rank; needs ``grid``)."""
        if mode not in NTK_NORMALIZATIONS:
            raise ConfigError(f"ntk_normalization must be one of {NTK_NORMALIZATIONS}, got {mode!r}")
        if mode == "none":
            return self
        if mode == "trace":
            scale = self.kernels.diagonal(dim1=1, dim2=2).sum(dim=1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        else:
            if grid is None:
                raise ConfigError("ntk_normalization 'params' needs the DAM grid (the modules' sizes)")
            sizes = []
            for name in self.names:
                try:
                    i, j = grid.position(name)
                except KeyError:
                    raise ConfigError(f"'{name}' is not a DAM candidate") from None
                sizes.append(float(grid.param_costs[i][j]))
            scale = torch.tensor(sizes, dtype=self.kernels.dtype)
        return replace(self, kernels=self.kernels / scale[:, None, None])


def _stack(kernels: ModuleKernels, grid: DAMGrid) -> torch.Tensor:
    """The kernels in the grid's row-major cell order."""
    index = {n: k for k, n in enumerate(kernels.names)}
    missing = [n for n in grid.module_names() if n not in index]
    if missing:
        raise ConfigError(f"{len(missing)} DAM candidate(s) have no kernel, e.g. '{missing[0]}'")
    return kernels.kernels[[index[n] for n in grid.module_names()]]


def greedy_ntk_selection(
    kernels: ModuleKernels,
    grid: DAMGrid,
    keep_ratio: float,
    granularity: str = "layer",
    rank: int = 8,
    budget_params: Optional[int] = None,
) -> Selection:
    """Greedily choose the module set that maximises ``λ_min(H(S))`` under the :class:`~diffora.select.quota.Quota`
    of ``granularity``.

    Each step adds the candidate that still fits the quota with the largest ``λ_min`` of the new sum; near-ties
    (relative 1e-12) go to the largest trace gain, then to the earlier layer, then the earlier column.
    """
    quota = Quota(grid, keep_ratio, granularity, rank, budget_params)
    stack = _stack(kernels, grid)
    cells = [(i, j) for i, j, _ in quota.cells]
    traces = stack.diagonal(dim1=1, dim2=2).sum(dim=1)
    scale = max(float(torch.linalg.eigvalsh(stack.sum(dim=0))[-1]), 1e-300)
    current = torch.zeros_like(stack[0])
    while True:
        allowed = [k for k, cell in enumerate(cells) if quota.can_add(cell)]
        if not allowed:
            break
        lams = torch.linalg.eigvalsh(current.unsqueeze(0) + stack[allowed])[:, 0]
        best = float(lams.max())
        near = [k for k, lam in zip(allowed, lams.tolist()) if lam >= best - _NEAR_TIE * max(abs(best), scale)]
        top_trace = max(float(traces[k]) for k in near)
        # cells are in row-major order, so the first near-tied one is the earliest (layer, column)
        choice = next(k for k in near if float(traces[k]) >= top_trace - _NEAR_TIE * max(top_trace, scale))
        quota.add(cells[choice])
        current = current + stack[choice]
    return quota.selection()


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
    """``λ_min(H(S))`` of ``n_sets`` random module sets drawn under the same quota as the selection."""
    if isinstance(n_sets, bool) or not isinstance(n_sets, int) or n_sets < 1:
        raise ConfigError(f"n_sets must be an integer >= 1, got {n_sets!r}")
    stack = _stack(kernels, grid)
    sets = random_sets(grid, keep_ratio, granularity, rank, budget_params, n_sets, seed)
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


@register
class NTKStrategy(SelectionStrategy):
    """No gate ranking: the set that maximises ``λ_min`` of the LoRA kernel (works without a search)."""

    name = "ntk"
    listed = 4
    needs_gate_steps = False
    needs_kernels = True

    def check_config(self, config: Any, label: str = "selection_score") -> None:
        if getattr(config, "score_normalization", "none") != "none":
            raise ConfigError(
                f"score_normalization normalises per-module scores; {label} 'ntk' chooses a "
                "set by its kernel: use ntk_normalization instead"
            )

    def scores(self, search: Any, kernels: Any = None) -> Scores:
        """A kept module's share of ``H(S)``: its kernel's trace (what rank allocation reads)."""
        self.check_ready(search, kernels)
        traces = kernels.traces()
        return [[traces.get(name, 0.0) if name else 0.0 for name in row] for row in search.grid.names]

    def select(
        self,
        search: Any,
        keep_ratio: float,
        granularity: str,
        *,
        kernels: Any = None,
        budget_params: Optional[int] = None,
    ) -> Selection:
        return greedy_ntk_selection(kernels, search.grid, keep_ratio, granularity, search.config.rank, budget_params)
