"""The single-level search (``search_levels='single'``): one backward steps LoRA, head and gates together, so a
search step costs one LoRA step; the gate split only scores the held-out check."""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from conftest import (
    CONTINUE_FLAGS,
    random_batch,
    randomize_lora_b,
    sentiment_run_args,
    tiny_model,
    write_sentiment_csvs,
)
from kill_resume import cli, interrupt, resume_and_compare

from diffora import DiffoRAConfig, prepare_search
from diffora.compare.jobs import search_passes
from diffora.errors import ConfigError
from diffora.method.diagnostics import search_diagnostics
from diffora.method.schedule import gate_warmup
from diffora.method.search import SINGLE_LEVEL_CHECK_BATCHES
from diffora.method.state import load_search_state, search_state


def _pair(**overrides):
    """Two identical searches (same model, LoRA init and betas) with non-zero B, so the gates have gradients."""
    config = DiffoRAConfig(rank=4, search_levels="single", weight_lr=1e-2, **overrides)
    searches = []
    for _ in range(2):
        search = prepare_search(tiny_model("bert"), config)
        randomize_lora_b(search.model)
        searches.append(search)
    return searches


def test_joint_step_updates_weights_and_gates_from_one_backward():
    joint, manual = _pair()
    batch = random_batch(seed=5)
    torch.manual_seed(7)  # the same dropout masks in both
    loss = joint.joint_step(batch)

    # the same step by hand: one loss, one backward, the weight gradients clipped, both optimisers stepped
    manual.model.train()
    manual.weight_optimizer.zero_grad(set_to_none=True)
    manual.gate_optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    expected_loss = manual.loss_fn(manual.model, batch)
    expected_loss.backward()
    assert manual.gates.beta.grad is not None and torch.count_nonzero(manual.gates.beta.grad) > 0
    torch.nn.utils.clip_grad_norm_(manual.weight_params, manual.config.max_grad_norm)
    manual.weight_optimizer.step()
    manual.gate_optimizer.step()

    assert loss == pytest.approx(float(expected_loss.detach()))
    assert torch.equal(joint.gates.beta, manual.gates.beta)
    assert torch.count_nonzero(joint.gates.beta) > 0
    for a, b in zip(joint.weight_params, manual.weight_params):
        assert torch.equal(a, b)
    assert (joint.weight_steps, joint.gate_steps) == (1, 1)
    assert joint.taylor_steps == 1 and torch.count_nonzero(joint.taylor_sum) > 0


def test_the_bilevel_weight_step_still_leaves_the_betas_alone():
    search, _ = _pair()
    before = search.gates.beta.detach().clone()
    search.weight_step(random_batch(seed=5))
    assert torch.equal(search.gates.beta, before) and search.gate_steps == 0


def test_single_level_fit_steps_gates_every_step_after_the_warmup_and_scores_the_heldout_check():
    search, _ = _pair(gate_warmup_steps=2)
    weights = [random_batch(seed=s) for s in range(3)]
    gates = [random_batch(seed=10 + s) for s in range(2)]
    search.fit(weights, gates, steps=8, progress=False)
    assert search.weight_steps == 8 and search.gate_steps == 8 - 2
    # the held-out check: CHECK batches before the first gate step, CHECK at the end, nothing else from the gate split
    assert len(search.history.gate_losses) == 2 * SINGLE_LEVEL_CHECK_BATCHES
    assert all(counts for counts in search.history.gate_label_counts)
    found = search_diagnostics(search)
    assert found["heldout_signal"] is not None and found["heldout_loss"] is not None
    assert found["beta_range"] > 0
    # a second fit() call at the same length runs no step and records no further check
    search.fit(weights, gates, steps=8, progress=False)
    assert len(search.history.gate_losses) == 2 * SINGLE_LEVEL_CHECK_BATCHES


def test_a_search_resumed_after_its_last_step_still_records_the_end_check():
    # The kill -9 test below once failed this way: killed after the state of the last step was saved and before the
    # end check, the resumed fit() ran no step and skipped the check, so dam.json lost its held-out diagnostics.
    whole, resumed = _pair(gate_warmup_steps=2)
    weights = [random_batch(seed=s) for s in range(3)]
    gates = [random_batch(seed=10)]  # one gate batch: the check reads the same batch wherever its cycle stands
    saved = {}

    def keep_last(search, step):
        if step == 7:
            saved.update(copy.deepcopy(search_state(search)))

    whole.fit(weights, gates, steps=8, progress=False, callback=keep_last)
    load_search_state(resumed, saved)
    assert len(resumed.history.gate_losses) == SINGLE_LEVEL_CHECK_BATCHES  # only the warm-up check so far
    resumed.fit(weights, gates, steps=8, progress=False)
    assert resumed.history.gate_losses == whole.history.gate_losses
    assert len(resumed.history.gate_losses) == 2 * SINGLE_LEVEL_CHECK_BATCHES
    assert search_diagnostics(resumed)["heldout_loss"] is not None


def test_single_level_refusals_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="search_levels must be one of"):
        DiffoRAConfig(search_levels="triple")
    with pytest.raises(ConfigError, match="no inner problem"):
        DiffoRAConfig(search_levels="single", order="second")
    from diffora.integrations.callback import DiffoRACallback

    with pytest.raises(ConfigError, match="search_levels='bi'"):
        DiffoRACallback(DiffoRAConfig(search_levels="single"), gate_dataset=[{"x": 1}], search_steps=10)


def test_compute_matching_counts_a_single_level_gate_step_as_no_extra_pass():
    bi = {"steps": 40, "gate_steps": 36, "config": {"order": "first", "search_levels": "bi"}}
    old = {"steps": 40, "gate_steps": 36, "config": {"order": "first"}}  # records from before the option
    single = {"steps": 40, "gate_steps": 36, "config": {"order": "first", "search_levels": "single"}}
    assert search_passes(bi) == search_passes(old) == 76
    assert search_passes(single) == 40 + -(-2 * SINGLE_LEVEL_CHECK_BATCHES // 3)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def single_job(tiny_bert_dir, tmp_path_factory):
    folder = write_sentiment_csvs(tmp_path_factory.mktemp("single-data"), 160, 48)
    args = sentiment_run_args(folder, tiny_bert_dir, *CONTINUE_FLAGS, "--search-levels", "single")
    reference = tmp_path_factory.mktemp("single-ref") / "out"
    cli(args, reference)
    return args, reference


def test_run_with_a_single_level_search_records_it(single_job):
    _, out = single_job
    record = json.loads((out / "dam.json").read_text())
    assert record["config"]["search_levels"] == "single"
    steps = record["weight_steps"]
    assert record["gate_steps"] == steps - gate_warmup(steps, DiffoRAConfig())
    assert record["diagnostics"]["heldout_loss"] is not None
    assert record["handoff"]["search_steps"] + record["handoff"]["finetune_steps"] == record["handoff"]["total_steps"]
    assert (out / "adapter" / "adapter_config.json").exists()


def test_single_level_search_resumes_bit_identically_after_kill9(single_job, tmp_path):
    args, reference = single_job
    out = tmp_path / "out"
    interrupt(args, out, "search", signal.SIGKILL)
    resume_and_compare(args, out, reference)
