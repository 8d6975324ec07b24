"""Gating lora_B's rank-r input (O(r) memory) computes what gating its d_out output did, and the per-pass gate cache
is never stale: across optimiser steps, forced() contexts, no_grad/grad passes, devices and dtypes."""

import copy

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model
from torch import nn

from diffora import DiffoRAConfig, prepare_search
from diffora.method.candidates import iter_cells
from diffora.method.gates import DAMGates, GateHooks

CASES = [("bert", "seq_cls"), ("llama", "seq_cls"), ("llama", "causal")]


def _search(arch, kind, **cfg):
    # the bf16 tolerances below were measured at sigmoid gates; the hook under test is the same for every form
    cfg = {"gate": "sigmoid", **cfg}
    search = prepare_search(tiny_model(arch, kind), DiffoRAConfig(rank=4, gate_warmup_steps=0, **cfg))
    randomize_lora_b(search.model)
    with torch.no_grad():
        search.gates.beta.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    return search


class OutputGatedHooks:
    """The previous form, as the reference: a forward hook scaling lora_B's full output by the gate."""

    def __init__(self, search):
        gates = search.gates
        self.handles = []
        for i, j, name in iter_cells(search.grid):
            lora_b = search.model.get_base_model().get_submodule(name).lora_B["default"]
            self.handles.append(
                lora_b.register_forward_hook(lambda _m, _a, out, i=i, j=j: out * gates.values()[i, j].to(out.dtype))
            )

    def remove(self):
        for h in self.handles:
            h.remove()


def _outputs_and_grads(search, batch, autocast_dtype=None):
    """Logits and the gradients of the loss w.r.t. beta, every lora_A, lora_B and the head."""
    named = {n: p for n, p in search.model.named_parameters() if p.requires_grad}
    params = [search.gates.beta, *named.values()]
    torch.manual_seed(0)  # same dropout masks (LoRA dropout is on) in both forms
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        out = search.model(**batch)
    grads = torch.autograd.grad(out.loss, params)
    return out.logits.detach().float(), dict(zip(["beta", *named], grads))


def _relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


@pytest.mark.parametrize("arch, kind", CASES)
def test_input_gating_equals_output_gating(arch, kind):
    """float32: equal to rounding. bf16 autocast: both forms round differently, so each is compared with the
    float32 truth, and the input-gated form must be about as accurate as the output-gated one."""
    search = _search(arch, kind, dropout=0.1)
    search.model.train()
    batch = random_batch(kind=kind)
    new32 = _outputs_and_grads(search, batch)
    new16 = _outputs_and_grads(search, batch, torch.bfloat16)
    search.hooks.remove()
    reference = OutputGatedHooks(search)
    old32 = _outputs_and_grads(search, batch)
    old16 = _outputs_and_grads(search, batch, torch.bfloat16)
    reference.remove()

    torch.testing.assert_close(new32[0], old32[0], rtol=1e-5, atol=1e-6)
    for name, old in old32[1].items():
        torch.testing.assert_close(new32[1][name], old, rtol=1e-4, atol=1e-6, msg=name)
    groups = ("beta", "lora_A", "lora_B") + (("modules_to_save",) if kind == "seq_cls" else ())  # causal: no head
    for group in groups:  # every group really has a gradient
        assert any(group in n and torch.count_nonzero(g) > 0 for n, g in new32[1].items()), group

    truth = {"logits": old32[0], **old32[1]}
    ours = {"logits": new16[0], **new16[1]}
    theirs = {"logits": old16[0], **old16[1]}
    for name, value in truth.items():
        err_new, err_old = _relative(ours[name], value), _relative(theirs[name], value)
        assert err_new < 0.2 and err_new <= 1.5 * err_old + 0.02, (name, err_new, err_old)
        assert ours[name].dtype == value.dtype  # gradients of float32 parameters stay float32 under autocast


def test_gates_gate_the_rank_r_input_of_lora_b():
    """What lora_B receives is g * A(dropout(x)): r values, not d_out."""
    search = _search("llama", "seq_cls")
    name = search.grid.names[0][0]
    layer = search.model.get_base_model().get_submodule(name)
    seen = {}
    layer.lora_A["default"].register_forward_hook(lambda _m, _a, out: seen.__setitem__("u", out.detach()))
    layer.lora_B["default"].register_forward_hook(lambda _m, args, _o: seen.__setitem__("in", args[0].detach()))
    search.model.eval()
    with torch.no_grad():
        search.model(**{k: v for k, v in random_batch().items() if k != "labels"})
        gate = search.gates.values()[0, 0]
    assert seen["in"].shape[-1] == 4
    torch.testing.assert_close(seen["in"], seen["u"] * gate)


def _count_relax(search):
    calls = [0]
    original = search.gates._relax

    def counting(beta):
        calls[0] += 1
        return original(beta)

    search.gates._relax = counting
    return calls


@pytest.mark.parametrize("arch, kind", CASES)
def test_gate_matrix_computed_once_per_forward(arch, kind):
    search = _search(arch, kind)
    calls = _count_relax(search)
    batch = random_batch(kind=kind)
    search.model.train()
    search.model(**batch).loss.backward()
    assert calls[0] == 1
    with torch.no_grad():
        search.model(**batch)
    assert calls[0] == 2
    search.weight_step(batch)
    assert calls[0] == 3
    # a gate step: one forward, plus one evaluation at the pre-step betas for the 'taylor' score's -g dL/dg
    search.gate_step(batch)
    assert calls[0] == 5
    assert search.gates._depth == 0


def test_generic_peft_model_and_direct_base_call_open_one_pass():
    """A plain PeftModel (no task type) calls the transformers model directly; generate() enters there too."""
    from test_signal import ToyModel, _batches

    search = prepare_search(ToyModel(), DiffoRAConfig(rank=2, modules_to_save=[], gate_warmup_steps=0))
    randomize_lora_b(search.model)
    calls = _count_relax(search)
    batch = _batches(1, seed=0)[0]
    search.model(**batch)
    assert calls[0] == 1
    search.model.get_base_model()(**batch)
    assert calls[0] == 2


def test_cache_not_stale_across_no_grad_steps_and_forced():
    search = _search("bert", "seq_cls")
    batch = random_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    search.model.eval()

    def logits():
        return search.model(**inputs).logits

    with torch.no_grad():
        relaxed = logits()
        with search.gates.forced(0.0):
            base = logits()
        assert torch.equal(logits(), relaxed)  # forced() left: the relaxed gates are back
        with search.gates.forced(search.gates.values().detach()):
            assert torch.equal(logits(), relaxed)
    assert not torch.allclose(relaxed, base)

    # a no_grad pass's gates (no graph) are not reused by the next grad pass
    loss = nn.functional.cross_entropy(logits(), batch["labels"])
    (grad,) = torch.autograd.grad(loss, [search.gates.beta])
    assert torch.count_nonzero(grad) > 0

    # an optimiser step on beta changes what the next pass uses (and the next call of a lone LoRA layer)
    search.gate_step(batch)
    search.model.eval()  # gate_step switched to train mode (dropout)
    with torch.no_grad():
        after = logits()
        with search.gates.forced(search.gates.values().detach()):
            expected = logits()
    assert not torch.equal(after, relaxed)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)

    layer = search.model.get_base_model().get_submodule(search.grid.names[0][0])
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        y1 = layer(x)
        search.gates.beta.add_(1.0)
        y2 = layer(x)
    assert not torch.equal(y1, y2)


def test_failed_forward_does_not_leave_a_pass_open():
    search = _search("bert", "seq_cls")
    with pytest.raises(Exception):
        search.model(input_ids=torch.full((2, 5), 10_000))  # index out of range in the embedding
    assert search.gates._depth == 0


def test_forced_backward_outside_the_context_with_checkpointing():
    """Checkpoint recomputation replays the gates the forward used, even after forced() was left."""
    model = tiny_model("llama", "causal")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    search = prepare_search(model, DiffoRAConfig(rank=4))
    randomize_lora_b(search.model)
    reference = copy.deepcopy(search)
    batch = random_batch(kind="causal")
    grads = []
    for s in (search, reference):
        s.model.train()
        with s.gates.forced(0.8):  # not the relaxed 0.5 (beta = 0)
            loss = s.model(**batch).loss
            if s is reference:
                loss.backward()
        if s is search:
            loss.backward()
        grads.append([p.grad for p in s.weight_params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert search.gates.beta is not reference.gates.beta  # the copy's hooks read the copy's gates


def test_forced_follows_beta_device_and_hook_follows_input_dtype_and_device():
    search = _search("bert", "seq_cls")
    on_meta = DAMGates(search.grid).to("meta")  # a device without data: stands in for CUDA on a CPU machine
    assert on_meta.beta.device.type == "meta" and on_meta.valid.device.type == "meta"
    with on_meta.forced(1.0):
        assert on_meta.values().device.type == "meta"
    gates = search.gates
    with gates.forced(1.0):
        hook = GateHooks._make_hook(gates, 0, 0)
        (out,) = hook(None, (torch.ones(3, 4, dtype=torch.bfloat16, device="meta"),))
    assert out.dtype == torch.bfloat16 and out.device.type == "meta"
    (out,) = GateHooks._make_hook(gates, 0, 0)(None, (torch.ones(3, 4, dtype=torch.float64),))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.ones(3, 4, dtype=torch.float64) * float(gates.values()[0, 0]))


def test_deepcopy_of_a_search_has_its_own_gates():
    search = _search("bert", "seq_cls")
    search.model.eval()
    inputs = {k: v for k, v in random_batch().items() if k != "labels"}
    with torch.no_grad():
        search.model(**inputs)  # fills the pass cache: the copy must not carry it
        twin = copy.deepcopy(search)
        twin.gates.beta.fill_(-20.0)  # the copy's gates ~ 0: its model is (almost) the base model
        assert not torch.equal(search.model(**inputs).logits, twin.model.eval()(**inputs).logits)
        with search.gates.forced(0.0):
            base = search.model(**inputs).logits
        torch.testing.assert_close(twin.model(**inputs).logits, base, rtol=1e-5, atol=1e-6)
