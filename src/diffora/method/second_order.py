r"""The second-order (unrolled) gate gradient of DARTS, applied to the DAM.

With one virtual SGD step ``w' = w - ξ ∇_w L_weight(w, β)``:

.. math::

    \nabla_\beta L_{\text{gate}}(w', \beta)
    - \xi \, \nabla^2_{\beta, w} L_{\text{weight}}(w, \beta) \, \nabla_{w'} L_{\text{gate}}(w', \beta)

The mixed Hessian-vector product is a central finite difference with ``v = ∇_{w'} L_gate`` and
``ε = 0.01 / ‖v‖``:

.. math::

    \nabla^2_{\beta, w} L \, v \approx
    \frac{\nabla_\beta L(w + εv, β) - \nabla_\beta L(w - εv, β)}{2ε}

Weights are restored by copying saved tensors back, never by adding and subtracting ``εv`` again (float arithmetic
does not round-trip: ``(w + εv) - εv != w`` in general). Both finite-difference passes replay the same RNG state, so
LoRA dropout draws the same mask in each (the CPU generator and those of the CUDA devices the weights live on).

Gradient accumulation: each loss may be a list of micro-batch losses instead of one; every gradient above is then
the sum of the micro-batch gradients of ``loss_k / n`` (one graph alive at a time), i.e. the gradient of their
mean.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

LossAt = Callable[[], torch.Tensor]
#: one loss, or the losses of the micro-batches whose mean is the loss
Losses = Union[LossAt, Sequence[LossAt]]


def _mean_grad(
    losses: Losses, inputs: Sequence[torch.Tensor], allow_unused: bool = False
) -> tuple[tuple[Optional[torch.Tensor], ...], torch.Tensor]:
    """Gradients of the (mean) loss w.r.t. ``inputs`` and the detached loss value."""
    if callable(losses):  # one batch: exactly one backward, as without accumulation
        loss = losses()
        return torch.autograd.grad(loss, list(inputs), allow_unused=allow_unused), loss.detach()
    fns = list(losses)
    n = len(fns)
    total: Optional[list[Optional[torch.Tensor]]] = None
    value = None
    for fn in fns:
        loss = fn()
        grads = torch.autograd.grad(loss / n, list(inputs), allow_unused=allow_unused)
        value = loss.detach() / n if value is None else value + loss.detach() / n
        if total is None:
            total = list(grads)
        else:
            total = [a if b is None else b if a is None else a + b for a, b in zip(total, grads)]
    return tuple(total), value


def _rng_states(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    cuda = {w.device.index or 0 for w in weights if w.device.type == "cuda"}
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda}


def _set_rng_states(states: tuple[torch.Tensor, dict[int, torch.Tensor]]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    for device, state in cuda.items():
        torch.cuda.set_rng_state(state, device)


def finite_difference_hvp(
    loss_at: Losses,
    weights: Sequence[torch.nn.Parameter],
    beta: torch.nn.Parameter,
    vector: Sequence[torch.Tensor],
    scale: float = 0.01,
) -> torch.Tensor:
    """``∇²_{β,w} L · v`` by central differences; ``weights`` are bit-identical afterwards."""
    norm = torch.sqrt(sum((v.detach().float() ** 2).sum() for v in vector))
    eps = scale / float(norm.clamp(min=1e-12))
    saved = [w.detach().clone() for w in weights]
    rng = _rng_states(weights)
    grads = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, w0, v in zip(weights, saved, vector):
                    w.copy_(w0 + sign * eps * v)
            _set_rng_states(rng)
            (g,), _ = _mean_grad(loss_at, [beta])
            grads.append(g)
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
    return (grads[0] - grads[1]) / (2.0 * eps)


def exact_mixed_hvp(
    loss_at: Callable[[], torch.Tensor],
    weights: Sequence[torch.nn.Parameter],
    beta: torch.nn.Parameter,
    vector: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``∇²_{β,w} L · v`` by double backward (reference for tests; too costly for real search)."""
    grads = torch.autograd.grad(loss_at(), list(weights), create_graph=True)
    dot = sum((g * v.detach()).sum() for g, v in zip(grads, vector))
    (hvp,) = torch.autograd.grad(dot, [beta])
    return hvp


def unrolled_gate_gradient(
    weight_loss: Losses,
    gate_loss: Losses,
    weights: Sequence[torch.nn.Parameter],
    beta: torch.nn.Parameter,
    xi: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-order gate gradient and the gate loss at the unrolled weights. Weights are left unchanged.

    ``weight_loss()`` / ``gate_loss()`` evaluate the current model on the weight / gate batch (or are lists of
    such callables, one per micro-batch).
    """
    weights = list(weights)
    saved = [w.detach().clone() for w in weights]
    try:
        # Virtual step w' = w - xi * dL_weight/dw (plain SGD, as in DARTS' derivation).
        train_grads, _ = _mean_grad(weight_loss, weights, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, train_grads):
                if g is not None:
                    w.sub_(xi * g)
        grads, loss = _mean_grad(gate_loss, [beta, *weights], allow_unused=True)
        d_beta = grads[0]
        d_weights = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[1:], weights)]
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
    hvp = finite_difference_hvp(weight_loss, weights, beta, d_weights)
    return d_beta - xi * hvp, loss
