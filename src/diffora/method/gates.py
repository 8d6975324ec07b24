r"""Step 2 of the pipeline: the relaxed Differential Adaptation Matrix.

Every candidate ``(l, m)`` gets a LoRA branch multiplied by a continuous gate

.. math::

    h = W_0 x + g_{l,m}(\beta) \cdot \tfrac{\alpha}{r} B_{l,m} A_{l,m} x,
    \qquad
    g^{\text{sigmoid2}}_{l,m} = 2\,\sigma(\beta_{l,m} / T),
    \qquad
    g^{\text{sigmoid}}_{l,m} = \sigma(\beta_{l,m} / T),
    \qquad
    g^{\text{softmax}}_{l,m} = M_l \cdot \operatorname{softmax}_m(\beta_{l,:} / T)

(``M_l`` = number of candidates in row ``l``, so the softmax gates average 1). Plain LoRA is ``g ≡ 1``; the base
model is ``g ≡ 0``. ``sigmoid2`` (the default) and ``softmax`` start at ``g = 1`` (``beta = 0``), so the search model
at step 0 *is* LoRA on every candidate and its weight steps train each branch at full strength; ``sigmoid`` starts
at ``g = 0.5`` (half strength), as the first versions did.

Where the gate is applied: ``B`` is linear, so :math:`g \cdot B u = B (g u)` with :math:`u = A\,\mathrm{dropout}(x)`
(rank ``r``). PEFT computes ``lora_B(lora_A(dropout(x))) * scaling``; a forward *pre*-hook on each candidate's
``lora_B`` scales its rank-``r`` input. Backward then keeps ``u`` and ``g u`` (``2r`` values per token and
candidate) instead of ``u`` and ``B u`` (``r + d_out``) as gating ``lora_B``'s output would, so the gates add
O(r), not O(d_out), activation memory on top of plain LoRA (``benchmarks/gate_memory.py`` measures it). PEFT's
internals are not patched and no ``forward`` signature changes. The betas are a separate ``nn.Module`` that is *not*
registered inside the model, so PEFT never freezes, saves or syncs them and they keep their own optimiser.

The gate matrix is computed once per model forward, not once per candidate: a pre-hook on the model's entry
modules (the ``PeftModel``, its tuner and the wrapped transformers model; the outermost one that runs wins) caches
``gates.values()`` for the pass and the ``lora_B`` hooks read the cache. The cache is keyed by the betas' version
counter, device and storage, the :meth:`DAMGates.forced` context and the grad mode, so it is never reused across
optimiser steps, ``forced()`` contexts or ``no_grad``/grad passes. It outlives the pass on purpose: non-reentrant
gradient checkpointing re-runs a block's forward during backward, and the recomputation must read the very gate
values the original pass used (a LoRA layer called on its own, outside any model forward, computes its gate
itself). Reentrant checkpointing (``use_reentrant=True``) is not supported: it runs its own inner backward, which
``torch.autograd.grad`` with respect to the betas cannot see.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .candidates import DAMGrid, iter_cells
from .config import DiffoRAConfig

#: the largest value each independent gate form reaches (its range is ``(0, scale)``)
_SIGMOID_SCALES = {"sigmoid": 1.0, "sigmoid2": 2.0}


def new_gate_optimizer(gates: "DAMGates", config: DiffoRAConfig) -> torch.optim.Optimizer:
    """DARTS' architecture optimiser (Adam, beta1 = 0.5) over the betas.

    ``gate_decay="decoupled"`` (default) is AdamW's decay, ``beta <- beta (1 - lr wd)``, independent of the
    gradient's size; ``"coupled"`` adds ``wd * beta`` to the gradient (Adam's ``weight_decay``, DARTS' choice): the
    gate gradients are as small as 1e-7, so a coupled L2 of 1e-3 decides where beta settles."""
    if config.gate_decay == "coupled":
        return torch.optim.Adam(
            gates.parameters(), lr=config.gate_lr, betas=(0.5, 0.999), weight_decay=config.gate_weight_decay
        )
    return torch.optim.AdamW(
        gates.parameters(), lr=config.gate_lr, betas=(0.5, 0.999), weight_decay=config.gate_weight_decay
    )


class DAMGates(nn.Module):
    """The architecture parameters ``beta`` (one per DAM entry) and their relaxation to gates.

    Move it with ``.to(device)`` like any module; :class:`~diffora.method.search.DAMSearch` puts it on the model's
    device.
    """

    def __init__(self, grid: DAMGrid, form: str = "sigmoid2", init: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        rows, cols = grid.shape
        self.form = form
        self.temperature = float(temperature)
        self.beta = nn.Parameter(torch.full((rows, cols), float(init)))
        self.register_buffer("valid", torch.tensor(grid.valid_mask(), dtype=torch.bool), persistent=False)
        self._forced: Optional[torch.Tensor] = None
        self._forced_token = 0  # bumped on every forced() entry and exit: part of the cache key
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None
        self._depth = 0  # nesting of model forwards in progress (the PeftModel calls its tuner calls the model)

    def values(self) -> torch.Tensor:
        """The gate matrix ``g`` (``layers × types``; 0 where a block has no such module), freshly computed."""
        if self._forced is not None:
            return self._forced
        return self._relax(self.beta)

    def _relax(self, beta: torch.Tensor) -> torch.Tensor:
        logits = beta / self.temperature
        if self.form in _SIGMOID_SCALES:
            gates = torch.sigmoid(logits)
            if self.form != "sigmoid":
                gates = gates * _SIGMOID_SCALES[self.form]
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
        forced = torch.as_tensor(value, dtype=self.beta.dtype, device=self.beta.device)
        self._forced = forced.expand_as(self.beta).clone().masked_fill(~self.valid, 0.0)
        self._forced_token += 1
        try:
            yield
        finally:
            self._forced = previous
            self._forced_token += 1

    def zero_one_loss(self) -> torch.Tensor:
        """FairDARTS' zero-one loss ``-mean((g - c)^2)`` over valid entries, ``c`` the middle of the gate's range
        (0.5; 1 for ``sigmoid2``): low when gates are near either end."""
        gates = self.values()[self.valid]
        return -((gates - 0.5 * _SIGMOID_SCALES.get(self.form, 1.0)) ** 2).mean()

    def slope_denominator(self, gates: torch.Tensor) -> Optional[torch.Tensor]:
        """``1 - g/s`` of the independent sigmoid forms ``g = s sigma(beta/T)`` (``None`` for softmax, whose entries
        are coupled): ``dg/dbeta = g (1 - g/s) / T``, so ``-g dL/dg = -dL/dbeta * T / (1 - g/s)``."""
        scale = _SIGMOID_SCALES.get(self.form)
        if scale is None:
            return None
        return (1.0 - (gates / scale if scale != 1.0 else gates)).clamp_min(1e-6)

    # ------------------------------------------------------------------ per-pass cache
    def _cache_key(self) -> tuple:
        beta = self.beta
        return (
            beta.device,
            beta.data_ptr(),
            beta._version,
            beta.requires_grad,
            self._forced_token,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
        )

    def begin_pass(self) -> None:
        """A model forward starts: compute the gate matrix once for all its candidates (outermost entry only)."""
        if self._depth == 0:
            self._cache = (self._cache_key(), self.values())
        self._depth += 1

    def end_pass(self) -> None:
        """A model forward ended (normally or by an exception). The cache stays for checkpoint recomputation."""
        self._depth = max(0, self._depth - 1)

    # hook signatures; bound methods (not closures), so copy.deepcopy(search) hooks the copy to its own gates
    def _pass_pre_hook(self, _module: nn.Module, _args: tuple) -> None:
        self.begin_pass()

    def _pass_hook(self, _module: nn.Module, _args: tuple, _output: Any) -> None:
        self.end_pass()

    def pass_values(self) -> torch.Tensor:
        """The gate matrix the current forward uses (what the ``lora_B`` hooks read)."""
        cache = self._cache
        if cache is not None:
            if self._depth > 0 and cache[0] == self._cache_key():
                return cache[1]
            if self._depth == 0 and torch.is_grad_enabled() and cache[0][:4] == self._cache_key()[:4]:
                # Outside a model forward with the betas unchanged (same storage, version, requires_grad): checkpoint
                # recomputation in backward, which must replay exactly what the forward used, even if forced() has
                # been left since. (torch has no public "inside backward" test; a lone LoRA-layer call with the same
                # betas shares the last pass's gates too.)
                return cache[1]
        value = self.values()
        if self._depth > 0:  # the betas or forced() changed inside a forward: recompute, and keep it for the pass
            self._cache = (self._cache_key(), value)
        return value

    def __getstate__(self) -> dict:
        # the cache holds a graph tensor (not deep-copyable) that belongs to one pass anyway
        state = self.__dict__.copy()
        state["_cache"], state["_depth"] = None, 0
        return state


class GateHooks:
    """Hooks that multiply each candidate's LoRA branch by its gate (by scaling the rank-r input of ``lora_B``)."""

    def __init__(self, peft_model: nn.Module, grid: DAMGrid, gates: DAMGates, adapter_name: str = "default") -> None:
        self._handles: list[Any] = []
        self.gates = gates
        base = peft_model.get_base_model()
        for i, j, name in iter_cells(grid):
            lora_layer = base.get_submodule(name)
            lora_b = lora_layer.lora_B[adapter_name]
            self._handles.append(lora_b.register_forward_pre_hook(self._make_hook(gates, i, j)))
        # Every way into the model (PeftModel -> tuner -> transformers model, or the last one alone, e.g. from
        # generate()) opens a pass; nested entries only count depth.
        entries: dict[int, nn.Module] = {}
        for module in (peft_model, getattr(peft_model, "base_model", None), base):
            if isinstance(module, nn.Module):
                entries.setdefault(id(module), module)
        for module in entries.values():
            self._handles.append(module.register_forward_pre_hook(gates._pass_pre_hook))
            self._handles.append(module.register_forward_hook(gates._pass_hook, always_call=True))

    @staticmethod
    def _make_hook(gates: DAMGates, i: int, j: int) -> "_GateInput":
        return _GateInput(gates, i, j)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.gates._depth = 0
        self.gates._cache = None


class _GateInput:
    """The ``lora_B`` pre-hook of candidate ``(i, j)``: ``u -> g[i, j] * u`` in ``u``'s dtype and on its device.

    An object rather than a closure so that ``copy.deepcopy`` of a search rebinds it to the copied gates.
    """

    def __init__(self, gates: DAMGates, i: int, j: int) -> None:
        self.gates, self.i, self.j = gates, i, j

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        u = args[0]
        gate = self.gates.pass_values()[self.i, self.j].to(device=u.device, dtype=u.dtype)
        return (u * gate, *args[1:])
