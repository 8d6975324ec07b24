"""Export: a stock PEFT adapter that loads without diffora and computes what the search's kept branches computed."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_batch, randomize_lora_b, tiny_model
from safetensors.torch import load_file, save_file

from diffora import DiffoRAConfig, choose_modules, prepare_search
from diffora.method.export import export_search

CASES = [("bert", "seq_cls"), ("llama", "seq_cls"), ("gpt2", "seq_cls"), ("llama", "causal")]


def _searched(arch, kind, tmp_path, **cfg):
    base_dir = tmp_path / "base"
    tiny_model(arch, kind).save_pretrained(base_dir)
    auto = "AutoModelForSequenceClassification" if kind == "seq_cls" else "AutoModelForCausalLM"
    import transformers

    model = getattr(transformers, auto).from_pretrained(base_dir)
    search = prepare_search(model, DiffoRAConfig(rank=4, gate_warmup_steps=1, **cfg))
    randomize_lora_b(search.model)
    batch = random_batch(kind=kind)
    search.fit([batch], [random_batch(seed=7, kind=kind)], steps=4, progress=False)
    return search, base_dir, auto, batch


@pytest.mark.parametrize("arch, kind", CASES)
def test_exported_model_matches_masked_relaxed_model(arch, kind, tmp_path):
    search, _, _, batch = _searched(arch, kind, tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    selection = choose_modules(search, keep_ratio=0.5)
    mask = torch.tensor(selection.mask)
    search.model.eval()
    with torch.no_grad():
        gates = search.gates.values().detach()
        with search.gates.forced(gates * mask):
            expected = search.model(**inputs).logits
        full = search.model(**inputs).logits
        exported = export_search(search, selection).eval()
        got = exported(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, expected, atol=1e-4), "dropping half the branches must change the output"
    names = {n for n, _ in exported.named_modules() if n.endswith("lora_A")}
    assert len(names) == selection.num_kept


@pytest.mark.parametrize("arch, kind", CASES)
def test_round_trip_in_fresh_process_without_diffora(arch, kind, tmp_path):
    search, base_dir, auto, batch = _searched(arch, kind, tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    selection = choose_modules(search)
    exported = export_search(search, selection).eval()
    with torch.no_grad():
        expected = exported(**inputs).logits
    adapter_dir = tmp_path / "adapter"
    exported.save_pretrained(adapter_dir)
    assert sorted(p.name for p in adapter_dir.iterdir() if p.suffix in {".json", ".safetensors"}) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(selection.modules)
    save_file(
        {**{k: v.contiguous() for k, v in inputs.items()}, "expected": expected}, str(tmp_path / "io.safetensors")
    )

    script = textwrap.dedent(f"""
        import json, sys, torch, transformers
        from peft import PeftModel
        from safetensors.torch import load_file
        io = load_file({str(tmp_path / "io.safetensors")!r})
        expected = io.pop("expected")
        base = transformers.{auto}.from_pretrained({str(base_dir)!r}).eval()
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        with torch.no_grad():
            loaded = model(**io).logits
            merged = model.merge_and_unload()(**io).logits
        print(json.dumps({{
            "diffora_imported": any(m == "diffora" or m.startswith("diffora.") for m in sys.modules),
            "loaded_err": float((loaded - expected).abs().max()),
            "merged_err": float((merged - expected).abs().max()),
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["diffora_imported"] is False
    assert result["loaded_err"] < 1e-5, result
    assert result["merged_err"] < 1e-5, result


def test_weight_sharing_folds_gate_into_b_and_carries_head(tmp_path):
    search, *_ = _searched("bert", "seq_cls", tmp_path)
    selection = choose_modules(search)
    gates = search.gates.values().detach()
    expected = {}
    for name in selection.modules:
        i, j = search.grid.position(name)
        layer = search.model.get_base_model().get_submodule(name)
        expected[name] = (
            layer.lora_A["default"].weight.detach().clone(),
            gates[i, j] * layer.lora_B["default"].weight.detach().clone(),
        )
    head = search.model.get_base_model().classifier.modules_to_save["default"].weight.detach().clone()
    exported = export_search(search, selection)
    for name, (a, b) in expected.items():
        layer = exported.get_base_model().get_submodule(name)
        assert torch.equal(layer.lora_A["default"].weight, a)
        assert torch.equal(layer.lora_B["default"].weight, b)
        assert not torch.equal(b, torch.zeros_like(b))
    assert torch.equal(exported.get_base_model().classifier.modules_to_save["default"].weight, head)


def test_reinit_gives_peft_init_and_pre_search_head(tmp_path):
    search, base_dir, *_ = _searched("bert", "seq_cls", tmp_path, weight_sharing=False)
    original_head = search.model.get_base_model().classifier.original_module.weight.detach().clone()
    trained_head = search.model.get_base_model().classifier.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(original_head, trained_head)
    exported = export_search(search, choose_modules(search))
    for name, module in exported.named_modules():
        if name.endswith("lora_B.default"):
            assert torch.count_nonzero(module.weight) == 0
        if name.endswith("lora_A.default"):
            assert torch.count_nonzero(module.weight) > 0
    assert torch.equal(exported.get_base_model().classifier.modules_to_save["default"].weight, original_head)
    saved_base = load_file(str(base_dir / "model.safetensors"))
    assert torch.equal(saved_base["classifier.weight"], original_head)


def test_search_is_consumed_by_export(tmp_path):
    from diffora import SearchStateError

    search, _, _, batch = _searched("bert", "seq_cls", tmp_path)
    export_search(search, choose_modules(search))
    with pytest.raises(SearchStateError, match="exported"):
        search.weight_step(batch)
