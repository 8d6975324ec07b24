"""diffora.narrow_lora: the search on the user's own PeftModel, in place, then narrowed to the kept modules."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, random_batch, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader

import diffora
from diffora import ConfigError, DiffoRAConfig, ModelError
from diffora.integrations.narrow import narrow_model, narrow_search
from diffora.method.candidates import adapter_layers
from diffora.method.search import prepare_search
from diffora.select.choose import allocate_ranks
from diffora.select.quota import Selection

FAST = dict(gate_warmup_steps=2, gate_lr=0.2, weight_lr=5e-3, seed=0, keep_ratio=0.5)


def lm_rows(n: int = 24, length: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return rows


def loader(rows: list[dict], batch_size: int = 4) -> DataLoader:
    return DataLoader(rows, batch_size=batch_size, shuffle=False)


def user_peft_model(**lora: object) -> PeftModel:
    model = tiny_model("llama", kind="causal_lm")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **lora)
    return get_peft_model(model, config)


@pytest.mark.parametrize(
    "lora",
    [dict(use_rslora=True, exclude_modules=["down_proj"]), dict(use_dora=True, init_lora_weights="gaussian")],
    ids=["rslora", "dora"],
)
def test_narrows_the_users_model_in_place_and_reloads_with_stock_peft(lora, tmp_path):
    peft_model = user_peft_model(**lora)
    candidates = list(adapter_layers(peft_model.get_base_model()))
    assert not any("down_proj" in n for n in candidates) or "exclude_modules" not in lora
    params_before = {id(p) for p in peft_model.parameters()}
    config = diffora.narrow_lora(peft_model, loader(lm_rows()), config=DiffoRAConfig(**FAST), steps=6, progress=False)
    kept = list(config.target_modules)
    assert 0 < len(kept) < len(candidates) and set(kept) <= set(candidates)
    assert set(adapter_layers(peft_model.get_base_model())) == set(kept)  # dropped layers are plain linears again
    assert {id(p) for p in peft_model.parameters()} <= params_before  # no new model, no copies
    assert config.use_rslora == lora.get("use_rslora", False) and config.use_dora == lora.get("use_dora", False)
    assert peft_model.peft_config["default"].target_modules == config.target_modules
    assert config is not peft_model.peft_config["default"]

    batch = {k: torch.stack([r[k] for r in lm_rows(3, seed=5)]) for k in ("input_ids", "attention_mask")}
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("llama", kind="causal_lm"), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
    assert set(adapter_layers(reloaded.get_base_model())) == set(kept)


@pytest.mark.parametrize("lora", [dict(), dict(use_dora=True)], ids=["lora", "dora"])
def test_gate_folding_keeps_the_searched_function(lora):
    """The gate reaches the branch (DoRA's forward calls lora_B on the rank-r input too) and folding it into B
    (and DoRA's magnitude) gives the narrowed model exactly the gated model's output."""
    peft_model = user_peft_model(**lora)
    search = prepare_search(peft_model, DiffoRAConfig(**FAST))
    with torch.no_grad():
        for layer in adapter_layers(peft_model.get_base_model()).values():
            layer.lora_B["default"].weight.normal_(0, 0.3)
        search.gates.beta.normal_(0, 2.0)
    batch = {k: torch.stack([r[k] for r in lm_rows(3, seed=7)]) for k in ("input_ids", "attention_mask")}
    peft_model.eval()
    with torch.no_grad():
        gated = peft_model(**batch).logits
        with search.gates.forced(1.0):
            ungated = peft_model(**batch).logits
    assert not torch.allclose(gated, ungated, atol=1e-4), "the gate does not reach the LoRA branch"
    names = search.grid.module_names()
    selection = Selection(
        mask=search.grid.valid_mask(),
        modules=names,
        keep_ratio=1.0,
        granularity="entry",
        lora_params=0,
        total_lora_params=0,
    )
    narrow_model(search, selection)
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, gated, atol=1e-5)


def test_rank_allocation_gives_the_same_rank_pattern_as_the_cli_and_keeps_the_function():
    peft_model = user_peft_model()
    narrowed, search, _ = narrow_search(
        peft_model, loader(lm_rows()), steps=6, progress=False, config=DiffoRAConfig(**FAST, rank_allocation="uniform")
    )
    assert narrowed.ranks and narrowed.lora_config.rank_pattern  # budget of all candidates: kept ranks grow
    for name, r in narrowed.ranks.items():
        layer = peft_model.get_base_model().get_submodule(name)
        assert layer.lora_A["default"].weight.shape[0] == r
    assert allocate_ranks(search, narrowed.selection) == narrowed.ranks


def test_bad_inputs_fail_before_any_compute():
    model = tiny_model("llama", kind="causal_lm")
    with pytest.raises(ModelError):
        diffora.narrow_lora(model, loader(lm_rows()))
    peft_model = user_peft_model()
    with pytest.raises(ConfigError):
        diffora.narrow_lora(peft_model, iter(loader(lm_rows())))  # no gate split possible
    with pytest.raises(ConfigError):
        diffora.narrow_lora(peft_model, loader(lm_rows()), steps=2, config=DiffoRAConfig(gate_warmup_steps=4))


def test_a_search_inside_an_outer_autocast_is_refused():
    """autocast caches its weight casts for the whole context: the search would read B = 0 at every step."""
    peft_model = get_peft_model(
        tiny_model("llama", kind="causal_lm"), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    batches = [random_batch(n=2, seed=i, kind="causal_lm") for i in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ConfigError, match="inside torch.autocast"):
        diffora.narrow_lora(
            peft_model, batches, gate_dataloader=batches, config=DiffoRAConfig(), steps=3, progress=False
        )
