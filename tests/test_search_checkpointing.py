"""Non-reentrant gradient checkpointing: weight and gate steps give the losses and gradients of the plain model.

The recomputation during backward must read the gates the forward used (the per-pass gate cache), or it would
save different tensors than the forward did and PyTorch's checkpoint would refuse, or compute other gradients.
"""

import warnings

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model

from diffora import DiffoRAConfig, prepare_search

CASES = [("llama", "causal"), ("bert", "seq_cls")]


def _run(arch, kind, checkpointing, micro):
    model = tiny_model(arch, kind)  # BERT keeps its dropout: the recomputation must replay the same masks
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in v5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    search = prepare_search(model, DiffoRAConfig(rank=4, gate_warmup_steps=0, dropout=0.1))
    randomize_lora_b(search.model)
    recomputed = [0]
    first = search.model.get_base_model().get_submodule(search.grid.names[0][0]).lora_B["default"]
    first.register_forward_pre_hook(lambda *_: recomputed.__setitem__(0, recomputed[0] + 1))
    weight = [random_batch(n=4, seed=s, kind=kind) for s in (1, 2)]
    gate = [random_batch(n=4, seed=s, kind=kind) for s in (3, 4)]
    torch.manual_seed(0)
    w_loss = search.weight_step(weight if micro else weight[0])
    w_grads = [p.grad.clone() for p in search.weight_params]
    g_loss = search.gate_step(gate if micro else gate[0])
    calls = recomputed[0]
    return w_loss, w_grads, g_loss, search.gates.beta.grad.clone(), calls, search


@pytest.mark.parametrize("arch, kind", CASES)
@pytest.mark.parametrize("micro", [False, True], ids=["one-batch", "micro-batches"])
def test_checkpointing_gives_the_same_steps(arch, kind, micro):
    plain = _run(arch, kind, False, micro)
    ckpt = _run(arch, kind, True, micro)
    assert ckpt[5].model.get_base_model().is_gradient_checkpointing
    forwards = 2 if micro else 1  # lora_B forwards per step without checkpointing
    assert plain[4] == 2 * forwards and ckpt[4] == 4 * forwards, "the checkpointed blocks were recomputed"
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6) and ckpt[2] == pytest.approx(plain[2], rel=1e-6)
    for a, b in zip(ckpt[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ckpt[3], plain[3], rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(plain[3]) > 0
    for a, b in zip(ckpt[5].weight_params, plain[5].weight_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
