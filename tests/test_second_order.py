"""Second-order search: the finite-difference HVP restores weights bit-identically and matches double backward."""

import torch
from conftest import random_batch, randomize_lora_b, tiny_model

from diffora import DiffoRAConfig, prepare_search
from diffora.method.second_order import exact_mixed_hvp, finite_difference_hvp


def _search64():
    model = tiny_model("bert", attn="eager").double()  # SDPA on CPU has no double backward
    # the tolerance below was set at sigmoid gates (g <= 1); the HVP machinery does not depend on the form
    search = prepare_search(model, DiffoRAConfig(rank=4, order="second", gate_warmup_steps=0, gate="sigmoid"))
    randomize_lora_b(search.model)
    with torch.no_grad():
        search.gates.beta.normal_(0.0, 0.5)
    search.model.eval()  # no dropout: both sides see the same function
    return search


def test_fd_hvp_restores_weights_bit_identically_and_matches_exact():
    search = _search64()
    batch = random_batch()
    weights, beta = search.weight_params, search.gates.beta
    g = torch.Generator().manual_seed(0)
    vector = [torch.randn(w.shape, generator=g, dtype=w.dtype) for w in weights]
    before = [w.detach().clone() for w in weights]
    loss_at = lambda: search.loss_fn(search.model, batch)  # noqa: E731

    fd = finite_difference_hvp(loss_at, weights, beta, vector)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    exact = exact_mixed_hvp(loss_at, weights, beta, vector)
    assert torch.count_nonzero(exact) > 0
    torch.testing.assert_close(fd, exact, rtol=1e-4, atol=1e-7)


def test_unrolled_gradient_leaves_weights_untouched_and_differs_from_first_order():
    search = _search64()
    wb, gb = random_batch(seed=1), random_batch(seed=2)
    before = [w.detach().clone() for w in search.weight_params]
    second, _ = search.second_order_gradient(gb, wb, xi=0.5)
    assert all(torch.equal(w, b) for w, b in zip(search.weight_params, before))
    (first,) = torch.autograd.grad(search.gate_loss(gb), [search.gates.beta])
    assert second.shape == first.shape
    assert not torch.allclose(second, first)
    # xi -> 0 recovers the first-order gradient
    tiny, _ = search.second_order_gradient(gb, wb, xi=1e-9)
    torch.testing.assert_close(tiny, first, rtol=1e-5, atol=1e-8)


def test_unrolled_gradient_matches_brute_force_reference():
    """Whole formula vs. autograd through the virtual step (exact second order, float64)."""
    search = _search64()
    wb, gb = random_batch(seed=1), random_batch(seed=2)
    xi = 0.3
    weights, beta = search.weight_params, search.gates.beta
    saved = [w.detach().clone() for w in weights]
    grads = torch.autograd.grad(search.loss_fn(search.model, wb), weights, create_graph=True)
    # w'(beta) = w - xi * grad_w L_train(w, beta); differentiate L_gate(w'(beta), beta) wrt beta through w'.
    unrolled = [w - xi * g for w, g in zip(weights, grads)]
    from torch.func import functional_call

    names = [n for n, p in search.model.named_parameters() if p.requires_grad]
    params = dict(zip(names, unrolled))
    loss = functional_call(search.model, params, args=(), kwargs=gb).loss
    (reference,) = torch.autograd.grad(loss, [beta])
    assert all(torch.equal(w, s) for w, s in zip(weights, saved))
    ours, _ = search.second_order_gradient(gb, wb, xi)
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-7)
