"""The per-module empirical kernels of a LoRA model on a few examples: what the ``ntk`` selection strategy and
the lambda_min diagnostic read (the kernel mathematics and the greedy selection are in
:mod:`diffora.select.strategies.ntk`).

Cost: the per-example gradients of all listed modules are kept until the kernels are built, i.e.
``n · P · Σ_m r (d_in + d_out)`` floats (float32, on CPU), with ``P`` = 1 for loss gradients and the number of
output directions for the output Jacobian.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError, ModelError, TrainingError
from ..method.parallel import model_device
from .strategies import NTK_KERNELS
from .strategies.ntk import ModuleKernels

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

#: outputs up to this size give the exact output-Jacobian kernel (one backward per output); larger ones (a
#: language model's vocabulary) are projected on this many seeded random sign vectors, an unbiased estimate
_MAX_EXACT_OUTPUTS = 16


def module_kernels(
    peft_model: nn.Module,
    modules: list[str],
    batches: Iterable[Batch],
    *,
    loss_fn: Optional[LossFn] = None,
    adapter_name: str = "default",
    max_examples: int = 32,
    kind: str = "loss_grad",
) -> ModuleKernels:
    """Per-module empirical NTKs from one backward per example (per output direction for ``output_jacobian``).

    Args:
        peft_model: a ``PeftModel`` with a LoRA adapter ``adapter_name`` on every name in ``modules``.
        modules: full module names (as in the base model, e.g. ``bert.encoder.layer.0.attention.self.query``).
        batches: dicts of tensors ``[batch, ...]``; each is split into 1-row examples.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``. Called on one example at a
            time, so it is that example's loss (mean token loss for a causal LM).
        max_examples: how many examples (kernel size ``n``) to use, at least 2.
        kind: ``"loss_grad"``: gradients of each example's loss; ``"output_jacobian"``: gradients of the model's
            ``logits`` (a sequence model's are averaged over the attention mask's positions), the kernel summed
            over output dimensions — exact up to 16 outputs, else on 16 seeded random sign projections.
            ``loss_fn`` is not used then.

    The model is evaluated in eval mode (no dropout) and its modes are restored; parameter values and ``.grad``
    are left untouched (gradients come from ``torch.autograd.grad``, which writes no ``.grad``). On a
    :class:`~diffora.method.search.DAMSearch` model the gate hooks stay on: wrap the call in
    ``search.gates.forced(1.0)`` for the kernel of the ungated model.
    """
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 2:
        raise ConfigError(f"max_examples must be an integer >= 2 (a kernel needs two examples), got {max_examples!r}")
    if not modules:
        raise ConfigError("module_kernels needs at least one module name")
    if len(set(modules)) != len(modules):
        raise ConfigError("module_kernels got the same module name twice")
    if kind not in NTK_KERNELS:
        raise ConfigError(f"ntk_kernel must be one of {NTK_KERNELS}, got {kind!r}")
    if loss_fn is None and kind == "loss_grad":
        from ..method.search import default_loss

        loss_fn = default_loss
    params = _lora_params(peft_model, modules, adapter_name)
    flat = [p for pair in params for p in pair]
    device = model_device(peft_model)

    modes = {m: m.training for m in peft_model.modules()}
    needs_grad = [p.requires_grad for p in flat]
    grads: list[list[torch.Tensor]] = [[] for _ in modules]
    n = 0
    probes: Optional[torch.Tensor] = None
    try:
        peft_model.eval()
        for p in flat:
            p.requires_grad_(True)  # an inference-mode adapter still has a kernel
        with torch.enable_grad():
            for example in _examples(batches):
                example = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}
                if kind == "loss_grad":
                    targets = [_checked_loss(loss_fn(peft_model, example), n)]
                else:
                    targets, probes = _output_targets(peft_model, example, n, probes)
                # allow_unused: a module the targets do not reach has a zero kernel, not an error.
                per_target = [
                    torch.autograd.grad(t, flat, allow_unused=True, retain_graph=k + 1 < len(targets))
                    if t.requires_grad
                    else [None] * len(flat)
                    for k, t in enumerate(targets)
                ]
                if all(gp is None for g in per_target for gp in g):
                    what = "loss does" if kind == "loss_grad" else "outputs do"
                    raise ModelError(
                        f"the {what} not depend on the LoRA weights of adapter '{adapter_name}' (is it disabled "
                        "or merged?)"
                    )
                for m, (a, b) in enumerate(params):
                    parts = [
                        torch.zeros(p.numel())
                        if g[2 * m + x] is None
                        else g[2 * m + x].detach().reshape(-1).float().cpu()
                        for g in per_target
                        for x, p in enumerate((a, b))
                    ]
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


def _checked_loss(loss: torch.Tensor, n: int) -> torch.Tensor:
    if loss.numel() != 1 or not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"the loss of example {n} is not a finite scalar ({loss.detach().flatten()[:1].tolist()}); "
            "check that every example has at least one label"
        )
    return loss.reshape(())


def _output_targets(
    model: nn.Module, example: Batch, n: int, probes: Optional[torch.Tensor]
) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """The scalars whose gradients form one example's row of the output-Jacobian kernel: every output, or its
    projections on ``probes`` (scaled so the kernel stays the sum over outputs in expectation)."""
    out = model(**example)
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ModelError("the model returned no logits: ntk_kernel 'output_jacobian' needs them")
    logits = logits.float()
    if logits.dim() == 3:  # [1, positions, outputs]: average the positions the attention mask keeps
        mask = example.get("attention_mask")
        weight = (mask[0] if isinstance(mask, torch.Tensor) else torch.ones(logits.shape[1])).to(logits)
        vector = (logits[0] * weight[:, None]).sum(dim=0) / weight.sum().clamp_min(1.0)
    else:
        vector = logits.reshape(-1)
    if not bool(torch.isfinite(vector.detach()).all()):
        raise TrainingError(f"the outputs of example {n} are not finite")
    if vector.numel() <= _MAX_EXACT_OUTPUTS:
        return list(vector), probes
    if probes is None:
        gen = torch.Generator().manual_seed(0)
        signs = torch.randint(0, 2, (_MAX_EXACT_OUTPUTS, vector.numel()), generator=gen).float() * 2 - 1
        probes = signs / math.sqrt(_MAX_EXACT_OUTPUTS)
    if probes.shape[1] != vector.numel():
        raise DataError(f"example {n} has {vector.numel()} outputs, the first had {probes.shape[1]}")
    return list(probes.to(vector.device) @ vector), probes
