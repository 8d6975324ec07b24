"""diffora.integrations.auto_lora_config: one call to a plain LoraConfig, the caller's model left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from diffora import ConfigError, DataError, DiffoRAConfig, ModelError, load_record
from diffora.integrations import AutoLoraResult, auto_lora_config
from diffora.integrations.auto_config import default_search_steps, split_indices

FAST = dict(gate_warmup_steps=2, gate_lr=0.2, weight_lr=5e-3, seed=0)


def seq_cls_rows(n: int = 40, length: int = 8, seed: int = 0) -> list[dict]:
    """Rows as a tokenized data set holds them, with a raw-text column the model does not take."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(length, dtype=torch.long),
                "labels": torch.tensor(int(ids[0] > VOCAB // 2)),
                "text": f"example {i}",
            }
        )
    return rows


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "the caller's model got new modules (PEFT injection leaked)"
    assert after["grad"] == before["grad"]
    assert after["training"] == before["training"]
    assert set(after["params"]) == set(before["params"])
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name
    assert not hasattr(model, "peft_config") or not model.peft_config


@pytest.fixture(scope="module")
def bert_result() -> tuple[torch.nn.Module, dict, AutoLoraResult, torch.Tensor, torch.Tensor]:
    model = tiny_model("bert")  # eval mode, as from_pretrained returns it
    before = snapshot(model)
    rng_before = torch.get_rng_state()
    result = auto_lora_config(
        model,
        seq_cls_rows(),
        config=DiffoRAConfig(**FAST),
        batch_size=8,
        search_steps=8,
        return_weights=True,
        progress=False,
    )
    return model, before, result, rng_before, torch.get_rng_state()


def test_user_model_and_rng_untouched(bert_result):
    model, before, _, rng_before, rng_after = bert_result
    assert_unchanged(model, before)
    assert torch.equal(rng_before, rng_after), "auto_lora_config moved the caller's global RNG stream"


def test_returns_a_plain_lora_config_for_the_selection(bert_result):
    model, _, result, _, _ = bert_result
    cfg = result.lora_config
    assert isinstance(cfg, LoraConfig)
    assert cfg.task_type == "SEQ_CLS" and cfg.modules_to_save == ["classifier"]
    assert cfg.r == 8 and cfg.lora_alpha == 16
    names = {n for n, _ in model.named_modules()}
    assert sorted(cfg.target_modules) == sorted(result.selection.modules) == sorted(result.target_modules)
    assert all(m in names and m.startswith("bert.encoder.layer.") for m in cfg.target_modules)
    # keep_ratio 0.5 per layer over 6 types and 2 layers
    assert len(cfg.target_modules) == 6
    record = result.record
    assert record["format"] == "diffora.dam/1" and record["selection"]["modules"] == result.selection.modules
    assert record["weight_steps"] == 8 and record["gate_steps"] == 8 - FAST["gate_warmup_steps"]
    assert record["weight_split_rows"] + record["gate_split_rows"] == 40
    assert result.search_steps == 8 and result.seconds > 0


def test_the_two_line_change_works_with_get_peft_model(bert_result, tmp_path):
    """What a PEFT user does with the config: get_peft_model on *their* model, train, save, load."""
    model, _, result, _, _ = bert_result
    user_model = copy.deepcopy(model)
    peft_model = get_peft_model(user_model, result.lora_config)
    lora_targets = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert {t.split("base_model.model.", 1)[1] for t in lora_targets} == set(result.target_modules)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    assert sorted(reloaded.peft_config["default"].target_modules) == sorted(result.target_modules)


def test_return_weights_initialise_the_peft_model_from_the_search(bert_result):
    model, _, result, _, _ = bert_result
    sd = result.state_dict
    assert sd is not None
    fresh = get_peft_model(copy.deepcopy(model), result.lora_config)
    assert set(sd) == set(get_peft_model_state_dict(fresh)), "keys must be PEFT's own state-dict names"
    load = set_peft_model_state_dict(fresh, sd)
    assert not load.unexpected_keys
    b_norms = [float(v.norm()) for k, v in sd.items() if "lora_B" in k]
    assert b_norms and all(v > 0 for v in b_norms), "the search's B (times its gate) must carry over, not zeros"
    head = get_peft_model(copy.deepcopy(model), result.lora_config).get_base_model().classifier.original_module
    assert not torch.equal(sd["base_model.model.classifier.weight"], head.weight), "the trained head must carry over"
    # the helper does the same and gives the same function
    via_helper = result.get_peft_model(copy.deepcopy(model))
    batch = {k: torch.stack([r[k] for r in seq_cls_rows(4, seed=9)]) for k in ("input_ids", "attention_mask")}
    fresh.eval(), via_helper.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, via_helper(**batch).logits)
        assert not torch.allclose(fresh(**batch).logits, model(**batch).logits)


def test_deterministic_for_a_config_seed():
    model = tiny_model("bert")
    rows = seq_cls_rows()
    kwargs = dict(config=DiffoRAConfig(**FAST), batch_size=8, search_steps=6, progress=False)
    torch.manual_seed(123)
    first = auto_lora_config(model, rows, **kwargs)
    torch.manual_seed(456)  # the caller's RNG state does not matter
    second = auto_lora_config(model, rows, **kwargs)
    assert first.target_modules == second.target_modules
    assert first.record["betas"] == second.record["betas"]


def test_causal_lm_with_custom_collator_and_default_length():
    model = tiny_model("llama", kind="causal_lm")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(24):
        n = 5 + i % 4
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "prompt": "raw text the model does not take"})

    def pad(items: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in items)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in items])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in items])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in items])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    config = DiffoRAConfig(gate_warmup_steps=1, gate_lr=0.2, keep_ratio=0.3, granularity="global")
    before = snapshot(model)
    result = auto_lora_config(model, rows, config=config, collate_fn=pad, batch_size=4, progress=False)
    assert_unchanged(model, before)
    assert result.lora_config.task_type == "CAUSAL_LM" and not result.lora_config.modules_to_save
    # default length: one pass over the weight split (17 rows / 4 = 5 batches), at least warm-up + 20 gate steps
    assert result.search_steps == default_search_steps(5, config) == 21
    assert len(result.target_modules) == 5  # ceil(0.3 * 2 layers * 7 types)
    get_peft_model(model, result.lora_config)  # PEFT accepts it on the user's model


def test_record_round_trips_as_dam_json(bert_result, tmp_path):
    import json

    _, _, result, _, _ = bert_result
    path = tmp_path / "dam.json"
    path.write_text(json.dumps(result.record), encoding="utf-8")
    assert load_record(path)["selection"]["modules"] == result.target_modules


def test_split_is_seeded_disjoint_and_complete():
    for n, fraction, seed in ((40, 0.3, 0), (7, 0.5, 3), (100, 0.1, 11)):
        weight, gate = split_indices(n, fraction, seed)
        assert split_indices(n, fraction, seed) == (weight, gate)
        assert sorted(weight + gate) == list(range(n)) and len(gate) == max(1, round(fraction * n))
    assert split_indices(40, 0.3, 0) != split_indices(40, 0.3, 1)


def test_refuses_bad_inputs():
    model = tiny_model("bert")
    rows = seq_cls_rows(12)
    with pytest.raises(ModelError, match="without adapters"):
        auto_lora_config(get_peft_model(tiny_model("bert"), LoraConfig(target_modules=["query"])), rows, progress=False)
    with pytest.raises(ConfigError, match="gate_warmup_steps"):
        auto_lora_config(model, rows, config=DiffoRAConfig(gate_warmup_steps=5), search_steps=5, progress=False)
    with pytest.raises(DataError):
        auto_lora_config(model, rows[:1], progress=False)
    with pytest.raises(ConfigError):
        auto_lora_config(model, rows, batch_size=0, progress=False)
