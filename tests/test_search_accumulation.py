"""Gradient accumulation: N equal micro-batches of size b give the step of one batch of N*b (mean loss, no dropout)."""

import copy

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model

from diffora import ConfigError, DiffoRAConfig, prepare_search
from diffora.method.search import MicroBatches

CASES = [("bert", "seq_cls"), ("llama", "causal")]
NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "llama": {}}


def _big_batch(kind, seed, n=6):
    batch = random_batch(n=n, seed=seed, kind=kind)
    if kind != "seq_cls":  # equal token counts per micro-batch, so the mean of means is the mean
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        batch["labels"] = batch["input_ids"].clone()
    return batch


def _split(batch, parts):
    size = len(batch["input_ids"]) // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _pair(arch, kind, **cfg):
    search = prepare_search(
        tiny_model(arch, kind, **NO_DROPOUT[arch]),
        DiffoRAConfig(rank=4, gate_warmup_steps=0, max_grad_norm=None, **cfg),
    )
    randomize_lora_b(search.model)
    with torch.no_grad():
        search.gates.beta.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    return search, copy.deepcopy(search)


@pytest.mark.parametrize("arch, kind", CASES)
def test_micro_batches_equal_one_big_batch(arch, kind):
    big, micro = _pair(arch, kind)
    weight, gate = _big_batch(kind, 1), _big_batch(kind, 2)
    big_w, micro_w = big.weight_step(weight), micro.weight_step(_split(weight, 3))
    assert micro_w == pytest.approx(big_w, rel=1e-5)
    for a, b in zip(micro.weight_params, big.weight_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    big_g, micro_g = big.gate_step(gate), micro.gate_step(_split(gate, 3))
    assert micro_g == pytest.approx(big_g, rel=1e-5)
    assert torch.count_nonzero(big.gates.beta.grad) > 0
    torch.testing.assert_close(micro.gates.beta.grad, big.gates.beta.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(micro.gates.beta, big.gates.beta, rtol=1e-5, atol=1e-7)
    assert micro.history.weight_losses == [micro_w] and micro.history.gate_losses == [micro_g]


def test_second_order_micro_batches_equal_one_big_batch():
    big, micro = _pair("bert", "seq_cls", order="second", unroll_lr=0.1)
    weight, gate = _big_batch("seq_cls", 1), _big_batch("seq_cls", 2)
    before = [w.detach().clone() for w in micro.weight_params]
    big.gate_step(gate, weight)
    micro.gate_step(_split(gate, 2), MicroBatches(_split(weight, 3)))
    assert all(torch.equal(w, b) for w, b in zip(micro.weight_params, before))
    # the finite-difference HVP differs by rounding between the two; its float32 noise sets the tolerance
    torch.testing.assert_close(micro.gates.beta.grad, big.gates.beta.grad, rtol=2e-2, atol=2e-5)


def test_fit_draws_accumulation_steps_micro_batches_per_iteration():
    search, _ = _pair("bert", "seq_cls")
    sizes = []

    def loss_fn(model, batch):
        sizes.append(("gate" if search.gates.beta.requires_grad else "weight", len(batch["input_ids"])))
        return model(**batch).loss

    search.loss_fn = loss_fn
    data = _split(_big_batch("seq_cls", 1, n=8), 4)
    search.config.gate_warmup_steps = 1
    search.fit(data, data, steps=3, progress=False, accumulation_steps=2)
    assert [k for k, _ in sizes] == ["weight"] * 2 + (["weight"] * 2 + ["gate"] * 2) * 2
    assert search.weight_steps == 3 and search.gate_steps == 2
    with pytest.raises(ConfigError, match="accumulation_steps"):
        search.fit(data, data, steps=5, progress=False, accumulation_steps=0)


def test_list_batches_of_tensors_stay_one_batch():
    """A DataLoader over tuples yields lists of tensors: those are one batch for a custom loss_fn."""
    search, _ = _pair("bert", "seq_cls")
    seen = []

    def loss_fn(model, batch):
        seen.append(type(batch).__name__)
        ids, labels = batch
        return model(input_ids=ids, labels=labels).loss

    search.loss_fn = loss_fn
    batch = _big_batch("seq_cls", 1)
    search.weight_step([batch["input_ids"], batch["labels"]])
    assert seen == ["list"]
    search.weight_step(
        MicroBatches([(batch["input_ids"][:3], batch["labels"][:3]), (batch["input_ids"][3:], batch["labels"][3:])])
    )
    assert seen == ["list", "tuple", "tuple"]
