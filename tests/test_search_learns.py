"""A search that can learn (#20 item 1): identity gates at step 0, no coupled decay on beta, a warm-up that scales
with the search, and the diagnostics that say whether the gates separated the modules."""

import logging
import math

import pytest
import torch
from conftest import VOCAB, random_batch, randomize_lora_b, tiny_model

from diffora import DiffoRAConfig, choose_modules, prepare_search
from diffora.errors import ConfigError
from diffora.method.diagnostics import (
    flat_limit,
    gate_spread,
    heldout_check,
    jaccard,
    label_counts,
    search_diagnostics,
)
from diffora.method.schedule import check_warmup, gate_warmup, min_search_length, search_length
from diffora.store.record import search_record


@pytest.mark.parametrize("arch, kind", [("bert", "seq_cls"), ("llama", "causal")])
def test_search_model_at_step_0_is_lora_on_every_candidate(arch, kind):
    search = prepare_search(tiny_model(arch, kind), DiffoRAConfig(rank=4))
    randomize_lora_b(search.model)  # B = 0 would make any gate look like the identity
    batch = random_batch(kind=kind)
    search.model.eval()
    with torch.no_grad():
        gated = search.model(**batch).logits
        search.hooks.remove()  # the same model and LoRA init, without gates: LoRA on every candidate
        plain = search.model(**batch).logits
    assert torch.equal(gated, plain)


def test_the_old_sigmoid_form_starts_at_half_strength():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, gate="sigmoid"))
    assert torch.all(search.gates.values()[search.gates.valid] == 0.5)


def test_zero_gradient_leaves_beta_at_zero_by_default():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4))
    beta = search.gates.beta
    for _ in range(5):
        beta.grad = torch.zeros_like(beta)
        search.gate_optimizer.step()
    assert torch.count_nonzero(beta) == 0
    # the DARTS setting, kept for old runs: coupled L2 moves a beta that has no gradient
    coupled = prepare_search(
        tiny_model("bert"), DiffoRAConfig(rank=4, gate_decay="coupled", gate_weight_decay=1e-3, gate_init=1.0)
    )
    coupled.gates.beta.grad = torch.zeros_like(coupled.gates.beta)
    coupled.gate_optimizer.step()
    assert torch.all(coupled.gates.beta < 1.0)


def test_taylor_score_matches_minus_g_dl_dg_for_the_identity_form():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, gate_warmup_steps=0))
    randomize_lora_b(search.model)
    with torch.no_grad():
        search.gates.beta.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    batch = random_batch()
    search.model.eval()
    gates = search.gates.values().detach().requires_grad_(True)
    with search.gates.forced(gates):
        (dl_dg,) = torch.autograd.grad(search.loss_fn(search.model, batch), [gates], allow_unused=True)
    expected = (-gates.detach() * dl_dg).masked_fill(~search.gates.valid, 0.0)
    (dl_dbeta,) = torch.autograd.grad(search.loss_fn(search.model, batch), [search.gates.beta])
    search._add_taylor(dl_dbeta)
    torch.testing.assert_close(search.taylor_sum, expected, rtol=1e-4, atol=1e-9)


def test_warmup_is_a_fraction_and_small_data_runs_under_the_defaults():
    config = DiffoRAConfig()
    assert config.gate_warmup_steps is None
    assert [gate_warmup(n, config) for n in (1, 2, 9, 10, 100)] == [0, 0, 0, 1, 10]
    assert all(min_search_length(20, config) - gate_warmup(min_search_length(20, config), config) >= 20 for _ in [0])
    assert search_length(14, epochs=1.0) == 14 and search_length(14, epochs=0.0) == 0
    assert search_length(3, epochs=1.0, minimum=10, cap=8) == 8 and search_length(3, steps=5) == 5
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4))
    search.fit([random_batch(seed=1)], [random_batch(seed=2)], steps=2, progress=False)  # 2 steps: 1 gate step
    assert search.gate_steps >= 1


def test_an_explicit_warmup_longer_than_the_search_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="no gate step would run"):
        check_warmup(14, gate_warmup(14, DiffoRAConfig(gate_warmup_steps=20)))
    with pytest.raises(ConfigError, match="gate_warmup_fraction"):
        DiffoRAConfig(gate_warmup_fraction=1.0)


def test_diagnostics_flag_gates_that_did_not_move_and_not_gates_that_separated(caplog):
    # B barely leaves 0, so the gate gradients stay far below Adam's eps and the betas hardly move
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, weight_lr=1e-10))
    with caplog.at_level(logging.WARNING, logger="diffora.method.search"):
        search.fit([random_batch(seed=1)], [random_batch(seed=2)], steps=6, progress=False)
    flat = search_diagnostics(search)
    assert flat["gates_flat"] and "close to arbitrary" in flat["warning"]
    assert any("close to arbitrary" in r.getMessage() for r in caplog.records)
    with torch.no_grad():  # betas well beyond what gate-step noise reaches
        search.gates.beta.copy_(torch.linspace(-1.0, 1.0, search.gates.beta.numel()).view_as(search.gates.beta))
    separated = search_diagnostics(search)
    assert not separated["gates_flat"] and separated["warning"] is None
    assert separated["beta_range"] > flat_limit(search.config.gate_lr, search.gate_steps)
    record = search_record(search)
    assert record["diagnostics"]["gates_flat"] is False and record["diagnostics"]["gate_range"] > 0


def test_gate_spread_and_jaccard():
    spread = gate_spread(torch.tensor([[1.0, 3.0], [2.0, 9.0]]), torch.tensor([[True, True], [True, False]]))
    assert spread["gate_min"] == 1.0 and spread["gate_max"] == 3.0 and spread["gate_range"] == 2.0
    assert jaccard([[True, False], [True, True]], [[True, True], [False, True]]) == pytest.approx(2 / 4)
    assert jaccard([[False]], [[False]]) == 1.0


def keyword_batches(n: int, seed: int, positive_rate: float | None, size: int = 16, length: int = 12) -> list[dict]:
    """A task whose label is which of two keyword sets fills half the positions; ``positive_rate`` set: labels drawn
    at that rate whatever the text says (no signal; 0.85 also lets a model lower its loss by learning the prior)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(19, VOCAB, (size, length), generator=g)
        labels = torch.randint(0, 2, (size,), generator=g)
        where = torch.randint(1, length, (size, 6), generator=g)
        pos, neg = torch.randint(3, 11, (size, 6), generator=g), torch.randint(11, 19, (size, 6), generator=g)
        ids.scatter_(1, where, torch.where(labels[:, None] == 1, pos, neg))
        ids[:, 0] = 2
        if positive_rate is not None:
            labels = (torch.rand(size, generator=g) < positive_rate).long()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_warning_fires_on_a_task_without_signal_and_not_on_one_with_signal(seed):
    """Same texts, same search; only whether the labels follow the text differs. Shuffled labels still spread the
    gates (the weights overfit), so the warning must come from the held-out gate loss, not from the beta range."""
    found = {}
    for name, rate in (("signal", None), ("shuffled", 0.5), ("shuffled, imbalanced", 0.85)):
        search = prepare_search(tiny_model("bert", seed=seed), DiffoRAConfig(rank=4, weight_lr=3e-3, seed=seed))
        weight, gate = keyword_batches(20, 100 + seed, rate), keyword_batches(20, 200 + seed, rate)
        search.fit(weight, gate, steps=80, progress=False)
        found[name] = search_record(search, choose_modules(search))["diagnostics"]
    signal = found["signal"]
    assert signal["heldout_signal"] is True and signal["warning"] is None, signal
    assert signal["heldout_loss"] < signal["heldout_reference"] - 0.1  # the search model did learn the task
    for name in ("shuffled", "shuffled, imbalanced"):
        none = found[name]
        assert none["heldout_signal"] is False and "close to arbitrary" in none["warning"], (name, none)
        assert none["heldout_baseline"] == "the class frequencies"
    # with 85 % positives the model learns the prior: its loss falls well below ln 2, yet not below the frequencies'
    assert found["shuffled, imbalanced"]["heldout_loss"] < 0.6


def test_heldout_check_baselines_and_no_verdict_on_short_searches():
    assert heldout_check([0.7] * 8, [[4, 4]] * 8)["heldout_signal"] is None  # a window of 2 gate steps
    # without class labels the baseline is the first quarter's loss
    falling = [1.0 + 0.01 * (i % 2) for i in range(10)] + [0.5 + 0.01 * (i % 2) for i in range(10)]
    check = heldout_check(falling, [[]] * 20)
    assert check["heldout_baseline"] == "its first gate steps" and check["heldout_signal"] is True
    assert check["heldout_gain"] == pytest.approx(0.5, abs=0.02)
    # class labels at 3:1 and a loss equal to their cross-entropy: no better than the frequencies
    prior = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    flat = heldout_check([prior + 0.01 * (i % 2) for i in range(20)], [[3, 1]] * 20)
    assert flat["heldout_baseline"] == "the class frequencies" and flat["heldout_signal"] is False
    assert flat["heldout_reference"] == pytest.approx(prior)


def test_label_counts_reads_class_labels_only():
    batch = {"labels": torch.tensor([0, 2, 2, -100])}
    assert label_counts(batch) == [1, 0, 2]
    assert label_counts([batch, {"labels": torch.tensor([1])}]) == [1, 1, 2]  # micro-batches add up
    assert label_counts(random_batch(kind="causal")) == []  # token labels
    assert label_counts({"labels": torch.tensor([0.5, 1.5])}) == []  # regression targets
    assert label_counts(("not", "a dict")) == []
