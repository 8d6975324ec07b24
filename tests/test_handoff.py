"""The 'continue' hand-off: the search is the first phase of fine-tuning. Search-then-continue equals training the
kept modules from the search state by hand, bit for bit; the total optimiser steps are LoRA-all's; the LR at the
hand-off is the one schedule's; and ``diffora run --handoff continue`` records it and resumes exactly."""

from __future__ import annotations

import json
import signal
import warnings

import pytest
import torch
from conftest import CONTINUE_FLAGS, VOCAB, random_batch, sentiment_run_args, tiny_model, write_sentiment_csvs
from kill_resume import cli, interrupt, resume_and_compare
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from diffora import DiffoRAConfig, choose_modules, prepare_search
from diffora.errors import ConfigError
from diffora.method.config import FinetuneOptions
from diffora.method.export import fresh_lora
from diffora.method.handoff import (
    attach_schedule,
    carry_optimizer_state,
    continue_config,
    finetune_total_steps,
    linear_schedule,
    search_steps_within,
)
from diffora.train import continue_finetune, finetune

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
OPTIONS = FinetuneOptions(epochs=1, lr=2e-2, warmup_ratio=0.5, weight_decay=0.01, max_grad_norm=1.0)
S = 3  # search steps; the loader has 6 batches, so T = 6 and K = 3 fine-tune steps follow


def _config() -> DiffoRAConfig:
    # a large gate LR, so the kept gates leave 1 and folding them into B (and B's moments) matters
    return DiffoRAConfig(rank=4, alpha=8.0, gate_warmup_steps=1, gate_lr=0.5, keep_ratio=0.5, handoff="continue")


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (24, 10), generator=g)
    labels = torch.randint(0, 2, (24,), generator=g)
    rows = [
        {"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]}
        for i in range(24)
    ]
    return DataLoader(rows, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))


WEIGHT = [random_batch(seed=s) for s in (1, 2, 3)]
GATE = [random_batch(seed=s) for s in (7, 8)]


def _lam(step: int, total: int, warmup: int) -> float:
    """The linear warm-up/decay multiplier, written out (transformers' formula)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def test_search_then_continue_equals_training_the_kept_modules_from_the_search_state():
    total = finetune_total_steps(len(_loader()), OPTIONS)
    assert total == 6
    warmup = int(OPTIONS.warmup_ratio * total)

    # (a) the hand-off: S search steps under the fine-tune's schedule, then continue_finetune for T - S steps
    search = prepare_search(tiny_model("bert", **NO_DROPOUT), continue_config(_config(), OPTIONS))
    attach_schedule(search, total, OPTIONS.warmup_ratio)
    search.fit(WEIGHT, GATE, search_steps_within(S, total), progress=False)
    assert search.weight_optimizer.param_groups[0]["lr"] == OPTIONS.lr * _lam(S, total, warmup)
    selection = choose_modules(search)
    gates = search.gates.values().detach().clone()
    kept_gates = [float(gates[search.grid.position(m)]) for m in selection.modules]
    assert any(abs(g - 1.0) > 1e-3 for g in kept_gates), "the gates must move for the test to check the folding"
    peft_a, result = continue_finetune(search, selection, _loader(), None, OPTIONS, progress=False)
    assert (result.start_step, result.steps) == (S, total - S)

    # (b) by hand: the same search step by step with the LR set per step, then a plain PEFT model on the kept
    # modules built from the search's state, the AdamW state carried (B's moments over g, g^2), K plain steps
    search_b = prepare_search(tiny_model("bert", **NO_DROPOUT), continue_config(_config(), OPTIONS))
    gate_batches = iter(GATE)
    for step in range(S):
        for group in search_b.weight_optimizer.param_groups:
            group["lr"] = OPTIONS.lr * _lam(step, total, warmup)
        search_b.weight_step(WEIGHT[step])
        if step >= 1:  # gate_warmup_steps
            search_b.gate_step(next(gate_batches))
    assert choose_modules(search_b).modules == selection.modules
    state = search_b.state_dict()
    gates_b = search_b.gates.values().detach()
    assert torch.equal(gates_b, gates)
    names = {id(p): n for n, p in search_b.model.named_parameters()}
    moments = {names[id(p)]: search_b.weight_optimizer.state[p] for p in search_b.weight_params}

    lora = LoraConfig(
        r=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        target_modules=list(selection.modules),
        modules_to_save=list(search_b.heads),
        task_type="SEQ_CLS",
    )
    peft_b = get_peft_model(tiny_model("bert", **NO_DROPOUT), lora)
    trainable = {n: p for n, p in peft_b.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=OPTIONS.lr, weight_decay=OPTIONS.weight_decay)
    with torch.no_grad():
        for name, param in trainable.items():
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            gate = gates_b[search_b.grid.position(module)] if ".lora_B." in name else None
            param.copy_(state["weights"][name] * gate if gate is not None else state["weights"][name])
            carried = {k: v.clone() for k, v in moments[name].items()}
            if gate is not None:
                carried["exp_avg"] = carried["exp_avg"] / gate
                carried["exp_avg_sq"] = carried["exp_avg_sq"] / (gate * gate)
            optimizer.state[param] = carried
    peft_b.train()
    batches = iter(_loader())
    for step in range(S, total):
        for group in optimizer.param_groups:
            group["lr"] = OPTIONS.lr * _lam(step, total, warmup)
        loss = peft_b(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), OPTIONS.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ours = {n: p for n, p in peft_a.named_parameters() if p.requires_grad}
    assert ours.keys() == trainable.keys()
    for name, param in ours.items():
        assert torch.equal(param, trainable[name]), name

    # equal compute by construction: the search's steps and the fine-tune's add up to LoRA-all's
    lora_all = fresh_lora(
        tiny_model("bert", **NO_DROPOUT), search_b.grid.module_names(), rank=4, alpha=8.0, dropout=0.0, seed=0
    )
    assert finetune(lora_all, _loader(), None, OPTIONS, progress=False).steps == total == S + result.steps


def test_a_schedule_built_at_a_step_equals_one_stepped_there():
    total, ratio = 10, 0.3
    for start in range(total):
        stepped = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        one = get_linear_schedule_with_warmup(stepped, int(ratio * total), total)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping the schedule without optimiser steps, on purpose
            for _ in range(start):
                one.step()
        built = linear_schedule(
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3), total, ratio, start=start
        )
        assert built.get_last_lr() == one.get_last_lr(), start


def test_carried_state_keeps_only_the_kept_modules_and_rescales_b():
    search = prepare_search(tiny_model("bert", **NO_DROPOUT), continue_config(_config(), OPTIONS))
    attach_schedule(search, 6, OPTIONS.warmup_ratio)
    search.fit(WEIGHT, GATE, S, progress=False)
    selection = choose_modules(search)
    carried = carry_optimizer_state(search, selection)
    dropped = set(search.grid.module_names()) - set(selection.modules)
    assert not any(name.split(".lora_")[0].removeprefix("base_model.model.") in dropped for name in carried)
    assert any("classifier" in name for name in carried)
    params = dict(search.model.named_parameters())
    gates = search.gates.values().detach()
    for module in selection.modules:
        name = f"base_model.model.{module}.lora_B.default.weight"
        g = gates[search.grid.position(module)]
        before = search.weight_optimizer.state[params[name]]
        torch.testing.assert_close(carried[name]["exp_avg"] * g, before["exp_avg"])
        torch.testing.assert_close(carried[name]["exp_avg_sq"] * g * g, before["exp_avg_sq"])
        a = name.replace("lora_B", "lora_A")
        assert torch.equal(carried[a]["exp_avg"], search.weight_optimizer.state[params[a]]["exp_avg"])


def test_continue_needs_the_schedule_and_a_shared_export():
    with pytest.raises(ConfigError, match="weight_sharing"):
        DiffoRAConfig(handoff="continue", weight_sharing=False)
    with pytest.raises(ConfigError, match="rank_allocation"):
        DiffoRAConfig(handoff="continue", rank_allocation="uniform")
    with pytest.raises(ConfigError, match="handoff"):
        DiffoRAConfig(handoff="resume")
    assert search_steps_within(50, 6) == 5 and search_steps_within(2, 6) == 2
    config = continue_config(DiffoRAConfig(), OPTIONS)
    assert (config.weight_lr, config.weight_decay, config.max_grad_norm) == (2e-2, 0.01, 1.0)
    search = prepare_search(tiny_model("bert", **NO_DROPOUT), config)
    search.fit(WEIGHT, GATE, 2, progress=False)  # without attach_schedule
    from diffora.errors import SearchStateError

    with pytest.raises(SearchStateError, match="attach_schedule"):
        continue_finetune(search, choose_modules(search), _loader(), None, OPTIONS, progress=False)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def continue_job(tiny_bert_dir, tmp_path_factory):
    folder = write_sentiment_csvs(tmp_path_factory.mktemp("handoff-data"), 160, 48)
    args = sentiment_run_args(folder, tiny_bert_dir, *CONTINUE_FLAGS)
    reference = tmp_path_factory.mktemp("handoff-ref") / "out"
    cli(args, reference)
    return args, reference


def test_run_with_continue_takes_lora_alls_steps_and_records_them(continue_job):
    _, out = continue_job
    record = json.loads((out / "dam.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    total = 2 * 20  # 2 epochs of 160 rows in batches of 8: what LoRA-all fine-tuning takes
    handoff = record["handoff"]
    assert handoff == {
        "mode": "continue",
        "search_steps": record["weight_steps"],
        "finetune_steps": total - record["weight_steps"],
        "total_steps": total,
    }
    assert record["weight_steps"] == 2 * 14  # 2 passes over the weight split (112 rows = 14 batches)
    assert record["config"]["weight_lr"] == 1e-2  # the search's weight LR is the fine-tune's --lr
    assert metrics["search_steps"] + metrics["finetune_steps"] == metrics["total_steps"] == total


@pytest.mark.parametrize("phase", ["search", "finetune"])
def test_continue_resumes_bit_identically_after_kill9(continue_job, tmp_path, phase):
    args, reference = continue_job
    out = tmp_path / "out"
    interrupt(args, out, phase, signal.SIGKILL)
    resume_and_compare(args, out, reference)
