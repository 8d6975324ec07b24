r"""Step 2 of the pipeline: the relaxed Differential Adaptation Matrix.

Every candidate ``(l, m)`` gets a LoRA branch whose output is multiplied by a continuous gate

.. math::

    h = W_0 x + g_{l,m}(\beta) \cdot \tfrac{\alpha}{r} B_{l,m} A_{l,m} x,
    \qquad
    g^{\text{sigmoid}}_{l,m} = \sigma(\beta_{l,m} / T),
    \qquad
    g^{\text{softmax}}_{l,m} = M_l \cdot \operatorname{softmax}_m(\beta_{l,:} / T)

(``M_l`` = number of candidates in row ``l``, so the softmax gates average 1 and the relaxed model starts as
plain LoRA). Plain LoRA is ``g ≡ 1``; the base model is ``g ≡ 0``.

The gates live on the modules: a forward hook on PEFT's ``lora_B`` sub-module of each candidate scales the branch
output (PEFT computes ``lora_B(lora_A(dropout(x))) * scaling``, so scaling ``lora_B``'s output scales the whole
branch). PEFT's internals are not patched and no ``forward`` signature changes. The betas are a separate
``nn.Module`` that is *not* registered inside the model, so PEFT never freezes, saves or syncs them and they keep
their own optimiser.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .candidates import DAMGrid, iter_cells


class DAMGates(nn.Module):
    """The architecture parameters ``beta`` (one per DAM entry) and their relaxation to gates."""

    def __init__(self, grid: DAMGrid, form: str = "sigmoid", init: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        rows, cols = grid.shape
        self.form = form
        self.temperature = float(temperature)
        self.beta = nn.Parameter(torch.full((rows, cols), float(init)))
        self.register_buffer("valid", torch.tensor(grid.valid_mask(), dtype=torch.bool), persistent=False)
        self._forced: Optional[torch.Tensor] = None

    def values(self) -> torch.Tensor:
        """The gate matrix ``g`` (``layers × types``; 0 where a block has no such module)."""
        if self._forced is not None:
            return self._forced
        return self._relax(self.beta)

    def _relax(self, beta: torch.Tensor) -> torch.Tensor:
        logits = beta / self.temperature
        if self.form == "sigmoid":
            gates = torch.sigmoid(logits)
        elif self.form == "softmax":
            masked = logits.masked_fill(~self.valid, float("-inf"))
            per_row = self.valid.sum(dim=1, keepdim=True).clamp(min=1).to(logits.dtype)
            gates = torch.softmax(masked, dim=1) * per_row
        else:  # validated by DiffoRAConfig; kept for direct use
            raise ValueError(f"unknown gate form {self.form!r}")
        return gates.masked_fill(~self.valid, 0.0)

    def initial_values(self, init: float) -> torch.Tensor:
        """The gate matrix every search starts from (all betas = ``init``)."""
        with torch.no_grad():
            return self._relax(torch.full_like(self.beta, float(init)))

    def forward(self) -> torch.Tensor:  # so the module can be called like any other
        return self.values()

    @contextlib.contextmanager
    def forced(self, value: float | torch.Tensor) -> Iterator[None]:
        """Temporarily replace every gate by ``value`` (1 = plain LoRA, 0 = base model)."""
        previous = self._forced
        forced = torch.as_tensor(value, dtype=self.beta.dtype).expand_as(self.beta).clone()
        self._forced = forced.masked_fill(~self.valid, 0.0)
        try:
            yield
        finally:
            self._forced = previous

    def zero_one_loss(self) -> torch.Tensor:
        """FairDARTS' zero-one loss ``-mean((g - 0.5)^2)`` over valid entries: low when gates are near 0 or 1."""
        gates = self.values()[self.valid]
        return -((gates - 0.5) ** 2).mean()


class GateHooks:
    """Forward hooks that multiply each candidate's LoRA branch by its gate."""

    def __init__(self, peft_model: nn.Module, grid: DAMGrid, gates: DAMGates, adapter_name: str = "default") -> None:
        self._handles = []
        base = peft_model.get_base_model()
        for i, j, name in iter_cells(grid):
            lora_layer = base.get_submodule(name)
            lora_b = lora_layer.lora_B[adapter_name]
            self._handles.append(lora_b.register_forward_hook(self._make_hook(gates, i, j)))

    @staticmethod
    def _make_hook(gates: DAMGates, i: int, j: int):
        def scale_branch(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * gates.values()[i, j].to(output.dtype)

        return scale_branch

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
