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
LoRA dropout draws the same mask in each.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def finite_difference_hvp(
    loss_at: Callable[[], torch.Tensor],
    weights: Sequence[torch.nn.Parameter],
    beta: torch.nn.Parameter,
    vector: Sequence[torch.Tensor],
    scale: float = 0.01,
) -> torch.Tensor:
    """``∇²_{β,w} L · v`` by central differences; ``weights`` are bit-identical afterwards."""
    norm = torch.sqrt(sum((v.detach().float() ** 2).sum() for v in vector))
    eps = scale / float(norm.clamp(min=1e-12))
    saved = [w.detach().clone() for w in weights]
    rng = torch.get_rng_state()
    grads = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, w0, v in zip(weights, saved, vector):
                    w.copy_(w0 + sign * eps * v)
            torch.set_rng_state(rng)
            (g,) = torch.autograd.grad(loss_at(), [beta])
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
    weight_loss: Callable[[], torch.Tensor],
    gate_loss: Callable[[], torch.Tensor],
    weights: Sequence[torch.nn.Parameter],
    beta: torch.nn.Parameter,
    xi: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-order gate gradient and the gate loss at the unrolled weights. Weights are left unchanged.

    ``weight_loss()`` / ``gate_loss()`` evaluate the current model on the weight / gate batch.
    """
    weights = list(weights)
    saved = [w.detach().clone() for w in weights]
    try:
        # Virtual step w' = w - xi * dL_weight/dw (plain SGD, as in DARTS' derivation).
        train_grads = torch.autograd.grad(weight_loss(), weights, allow_unused=True)
        with torch.no_grad():
            for w, g in zip(weights, train_grads):
                if g is not None:
                    w.sub_(xi * g)
        loss = gate_loss()
        grads = torch.autograd.grad(loss, [beta, *weights], allow_unused=True)
        d_beta = grads[0]
        d_weights = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[1:], weights)]
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
    hvp = finite_difference_hvp(weight_loss, weights, beta, d_weights)
    return d_beta - xi * hvp, loss.detach()
