"""The relaxed model: gates at 1 = PEFT LoRA, gates at 0 = base; weight and gate steps touch only their own params."""

import copy

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model
from peft import LoraConfig, get_peft_model

from diffora import DiffoRAConfig, SearchStateError, choose_modules, prepare_search
from diffora.select import selection_scores

ARCHS = ["bert", "llama", "gpt2"]


def _search(arch, **cfg):
    model = tiny_model(arch)
    base = copy.deepcopy(model)
    search = prepare_search(model, DiffoRAConfig(rank=4, gate_warmup_steps=0, **cfg))
    randomize_lora_b(search.model)
    return search, base


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_gates_one_equal_peft_lora_and_zero_equal_base(arch, form):
    search, base = _search(arch, gate=form)
    batch = random_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    search.model.eval()

    reference = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=search.grid.module_names(),
            init_lora_weights=False,
            fan_in_fan_out=arch == "gpt2",
        ),
    ).eval()
    with torch.no_grad():
        for name in search.grid.module_names():
            ours, theirs = (
                search.model.get_base_model().get_submodule(name),
                reference.get_base_model().get_submodule(name),
            )
            theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
            theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
        with search.gates.forced(1.0):
            relaxed_one = search.model(**inputs).logits
        with search.gates.forced(0.0):
            relaxed_zero = search.model(**inputs).logits
        lora_logits = reference(**inputs).logits
        base_logits = base(**inputs).logits
        relaxed = search.model(**inputs).logits

    torch.testing.assert_close(relaxed_one, lora_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(relaxed_zero, base_logits, rtol=1e-5, atol=1e-5)
    # the non-zero B really matters: the unforced relaxed model differs from both
    assert not torch.allclose(relaxed, base_logits, atol=1e-4)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-4)


def test_softmax_gates_average_one_per_row():
    search, _ = _search("bert", gate="softmax")
    with torch.no_grad():
        search.gates.beta.normal_()
    g = search.gates.values()
    torch.testing.assert_close(g.sum(dim=1), torch.full((2,), 6.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_step_changes_only_lora_and_head(arch):
    search, _ = _search(arch)
    before = {n: p.detach().clone() for n, p in search.model.named_parameters()}
    beta = search.gates.beta.detach().clone()
    search.weight_step(random_batch())
    changed = {n for n, p in search.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "a weight step must change something"
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in changed), sorted(changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("modules_to_save" in n for n in changed)
    assert torch.equal(search.gates.beta, beta)


@pytest.mark.parametrize("order", ["first", "second"])
def test_gate_step_changes_only_betas(order):
    search, _ = _search("bert", order=order)
    before = {n: p.detach().clone() for n, p in search.model.named_parameters()}
    beta = search.gates.beta.detach().clone()
    batch = random_batch()
    search.gate_step(random_batch(seed=5), batch)
    assert all(torch.equal(p, before[n]) for n, p in search.model.named_parameters())
    assert not torch.equal(search.gates.beta, beta)
    assert search.gate_steps == 1


def test_gate_gradient_is_zero_while_lora_b_is_zero():
    """The pitfall the warm-up exists for: with PEFT's zero-initialised B the gates cannot learn."""
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4))
    search.model.train()
    loss = search.gate_loss(random_batch())
    (grad,) = torch.autograd.grad(loss, [search.gates.beta])
    assert torch.count_nonzero(grad) == 0


def test_discretize_before_gate_step_is_an_error():
    search, _ = _search("bert")
    search.weight_step(random_batch())
    with pytest.raises(SearchStateError, match="no gate step has run"):
        choose_modules(search)


def test_fit_refuses_search_without_gate_steps():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, gate_warmup_steps=5))
    with pytest.raises(SearchStateError, match="no gate step would run"):
        search.fit([random_batch()], [random_batch()], steps=5, progress=False)


def test_nan_loss_stops_with_clear_error():
    from diffora import TrainingError

    search, _ = _search("bert")
    with torch.no_grad():
        search.model.get_base_model().get_submodule(search.grid.names[0][0]).lora_A["default"].weight.fill_(
            float("nan")
        )
    with pytest.raises(TrainingError, match="loss became nan"):
        search.weight_step(random_batch())


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_movement_score_ranks_by_distance_from_the_initial_gate(form):
    """'gate' keeps the largest gates; 'movement' keeps the gates that moved furthest, down as well as up."""
    search, _ = _search("bert", gate=form, keep_ratio=0.5, granularity="global", gate_init=0.3)
    search.gate_steps = 1  # betas are set by hand below instead of by gate steps
    with torch.no_grad():
        beta = torch.full_like(search.gates.beta, 0.3)
        beta[0, 0], beta[0, 1] = 3.0, -6.0  # one gate far up, one far further down
        search.gates.beta.copy_(beta)
    start = search.gates.initial_values(0.3)
    assert torch.allclose(start[search.gates.valid], start[search.gates.valid][0])  # all gates start equal
    names = search.grid.names
    by_gate = set(choose_modules(search, score="gate").modules)
    by_move = set(choose_modules(search, score="movement").modules)
    assert names[0][0] in by_gate and names[0][1] not in by_gate
    assert names[0][0] in by_move and names[0][1] in by_move
    moved = selection_scores(search, "movement")
    assert min(moved[0][0], moved[0][1]) > 0.3 and moved[1][0] == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(search.gates.beta, beta)  # computing the initial gates leaves the betas alone


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_taylor_score_is_minus_g_times_the_gate_gradient(arch, temperature):
    """'taylor' = mean over gate steps of -g dL/dg, checked against autograd through the gate values themselves
    (forced gates that require grad), at the betas each step started from, with the same dropout masks."""
    search, _ = _search(arch, temperature=temperature, gate_init=0.4)
    batches = [random_batch(seed=s) for s in (1, 2)]
    expected = torch.zeros_like(search.gates.beta)
    search.model.train()  # as in the gate step (dropout masks replayed by the seeds below)
    for step, batch in enumerate(batches):
        g = search.gates.values().detach().clone().requires_grad_(True)
        torch.manual_seed(100 + step)
        with search.gates.forced(g):
            (grad,) = torch.autograd.grad(search.gate_loss(batch), [g])
        expected += (-g * grad).detach().masked_fill(~search.gates.valid, 0.0)
        torch.manual_seed(100 + step)
        search.gate_step(batch)
    got = torch.tensor(selection_scores(search, "taylor"))
    torch.testing.assert_close(got, expected / 2, rtol=1e-4, atol=1e-7)
    assert got.abs().sum() > 0 and search.taylor_steps == 2


def test_taylor_score_survives_a_state_round_trip_and_old_states_refuse_it():
    search, _ = _search("bert")
    search.gate_step(random_batch(seed=3))
    state = search.state_dict()
    fresh, _ = _search("bert")
    fresh.load_state_dict(state)
    assert selection_scores(fresh, "taylor") == selection_scores(search, "taylor")
    old = {k: v for k, v in state.items() if not k.startswith("taylor")}  # saved before the score existed
    older, _ = _search("bert")
    older.load_state_dict(old)
    assert selection_scores(older, "movement") == selection_scores(search, "movement")
    with pytest.raises(SearchStateError, match="taylor"):
        selection_scores(older, "taylor")


def test_taylor_needs_sigmoid_gates():
    from diffora.errors import ConfigError

    with pytest.raises(ConfigError, match="sigmoid"):
        DiffoRAConfig(gate="softmax", selection_score="taylor")
