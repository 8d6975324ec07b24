"""Mixed precision, devices and failure checks of the search steps.

bf16 autocast runs on CPU for real. fp16 is refused on CPU (the search needs CUDA for it); its GradScaler logic is
still exercised here on CPU by lifting that refusal (CPU autocast does run float16), so the scaling, the skipped
overflow steps and the scaler state in checkpoints are tested without a GPU.
"""

import collections
import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model

import diffora.method.precision as precision_module
from diffora import ConfigError, DiffoRAConfig, TrainingError, prepare_search
from diffora.method.parallel import to_device as _to_device


def _lora_a_dtypes(search):
    seen = []
    layer = search.model.get_base_model().get_submodule(search.grid.names[0][0])
    layer.lora_A["default"].register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    return seen


def test_bf16_autocast_search_runs_on_cpu():
    search = prepare_search(
        tiny_model("llama", "causal"), DiffoRAConfig(rank=4, gate_warmup_steps=1, gate_lr=0.1), mixed_precision="bf16"
    )
    randomize_lora_b(search.model)
    assert search.weight_scaler is None and search.gate_scaler is None
    dtypes = _lora_a_dtypes(search)
    beta = search.gates.beta.detach().clone()
    data = [random_batch(seed=s, kind="causal") for s in range(3)]
    search.fit(data, data, steps=4, progress=False)
    losses = search.history.weight_losses + search.history.gate_losses
    assert len(losses) == 7 and all(torch.isfinite(torch.tensor(losses)))
    assert set(dtypes) == {torch.bfloat16}  # the forwards really ran under autocast
    assert not torch.equal(search.gates.beta, beta)
    assert search.gates.beta.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in search.weight_params)
    # the second-order gate gradient runs in full precision
    second = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, order="second"), mixed_precision="bf16")
    dtypes = _lora_a_dtypes(second)
    second.gate_step(random_batch(), random_batch(seed=2))
    assert set(dtypes) == {torch.float32}


def test_fp16_is_refused_on_cpu_before_the_model_changes():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="float16 mixed precision needs a CUDA device; use bf16 on CPU") as err:
        prepare_search(model, DiffoRAConfig(rank=4), mixed_precision="fp16")
    assert "\n" not in str(err.value)
    assert not any("lora_" in n for n, _ in model.named_modules())
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        prepare_search(model, DiffoRAConfig(rank=4), mixed_precision="fp8")


def test_accelerator_gives_the_mixed_precision():
    fake = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")  # what the search reads from one
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4), accelerator=fake)
    assert search.mixed_precision == "bf16"
    explicit = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4), accelerator=fake, mixed_precision="no")
    assert explicit.mixed_precision == "bf16"  # "no" is the default, so the accelerator's setting wins


@pytest.fixture
def fp16_search(monkeypatch):
    monkeypatch.setattr(precision_module, "FP16_UNSUPPORTED", frozenset())

    def make():
        search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, gate_warmup_steps=0), mixed_precision="fp16")
        randomize_lora_b(search.model)
        return search

    return make


def test_fp16_scales_skips_overflow_and_checkpoints_the_scalers(fp16_search):
    search = fp16_search()
    assert search.weight_scaler is not None and search.gate_scaler is not None
    dtypes = _lora_a_dtypes(search)
    for s in range(2):
        assert torch.isfinite(torch.tensor(search.weight_step(random_batch(seed=s))))
        assert torch.isfinite(torch.tensor(search.gate_step(random_batch(seed=10 + s))))
    assert set(dtypes) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in search.weight_params) and search.gates.beta.dtype == torch.float32

    # an overflowing scale: the step is skipped (parameters untouched), the scale backs off, the step is counted
    for scaler, step, params in (
        (search.gate_scaler, lambda: search.gate_step(random_batch(seed=20)), [search.gates.beta]),
        (search.weight_scaler, lambda: search.weight_step(random_batch(seed=21)), search.weight_params),
    ):
        scaler.update(new_scale=3e38)
        before = [p.detach().clone() for p in params]
        step()
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        assert scaler.get_scale() == pytest.approx(1.5e38)
    assert search.weight_steps == 3 and search.gate_steps == 3

    state = search.state_dict()
    assert state["weight_scaler"]["scale"] == pytest.approx(1.5e38)
    restored = fp16_search()
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.gate_scaler.get_scale() == pytest.approx(1.5e38)
    assert restored.weight_scaler.get_scale() == pytest.approx(1.5e38)
    # states from before scalers existed (or from an fp32 search) still load
    old = {k: v for k, v in state.items() if not k.endswith("_scaler")}
    fresh = fp16_search()
    fresh.load_state_dict(old)
    assert fresh.gate_steps == 3 and fresh.gate_scaler.get_scale() == 65536.0
    plain = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4))
    assert "weight_scaler" not in plain.state_dict()
    plain.load_state_dict(copy.deepcopy(state))


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradient_of_a_finite_loss_stops_with_clear_error():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, gate_warmup_steps=0))
    randomize_lora_b(search.model)
    search.loss_fn = lambda model, batch: _InfGradient.apply(model(**batch).loss)
    with pytest.raises(TrainingError, match="weight gradient became non-finite at weight step 0"):
        search.weight_step(random_batch())
    beta = search.gates.beta.detach().clone()
    with pytest.raises(TrainingError, match="gate gradient became non-finite at gate step 0"):
        search.gate_step(random_batch())
    assert torch.equal(search.gates.beta, beta)


def test_nan_loss_of_one_micro_batch_stops_the_step():
    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4, gate_warmup_steps=0))
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) == 2 else loss

    search.loss_fn = loss_fn
    before = [p.detach().clone() for p in search.weight_params]
    with pytest.raises(TrainingError, match="the weight loss became nan at weight step 0; "):
        search.weight_step([random_batch(seed=s) for s in range(3)])
    assert len(calls) == 2  # the third micro-batch never ran
    assert all(torch.equal(p, b) for p, b in zip(search.weight_params, before))
    assert search.weight_steps == 0


def test_batches_follow_the_model_device():
    batch = random_batch()
    assert _to_device(batch, torch.device("cpu")) is batch  # on the model's device already: untouched
    meta = torch.device("meta")  # a second device on a CPU-only machine
    moved = _to_device({"a": batch["input_ids"], "nested": [batch["labels"], (batch["attention_mask"], 3)]}, meta)
    assert moved["a"].device == meta and moved["nested"][0].device == meta
    assert moved["nested"][1][0].device == meta and moved["nested"][1][1] == 3
    Pair = collections.namedtuple("Pair", "x y")
    pair = _to_device(Pair(batch["input_ids"], "text"), meta)
    assert isinstance(pair, Pair) and pair.x.device == meta and pair.y == "text"
    from transformers import BatchEncoding

    encoding = _to_device(BatchEncoding({"input_ids": batch["input_ids"]}), meta)
    assert isinstance(encoding, BatchEncoding) and encoding["input_ids"].device == meta

    search = prepare_search(tiny_model("bert"), DiffoRAConfig(rank=4))
    assert search.gates.beta.device == next(search.model.parameters()).device
    seen = []
    search.loss_fn = lambda model, b: (seen.append(b), model(**b).loss)[1]
    search.weight_step(batch)
    assert seen[0] is batch
