"""Shared by the kill -9 / SIGTERM tests: run the CLI uninterrupted, interrupt a run within a phase, resume it and
check that it ends bit-identical to the uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VOLATILE_METRICS = {"search_seconds", "finetune_seconds", "total_seconds", "peak_rss_mib", "options"}


def cli(args: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``diffora <args> --output-dir out <extra>`` to the end; asserts exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", "diffora.cli", *args, "--output-dir", str(out), *extra],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def interrupt(args: list[str], out: Path, phase: str, sig: int) -> None:
    """Start a run, wait until it has a checkpoint of ``phase`` (and none of a later phase), then signal it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffora.cli", *args, "--output-dir", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    target = out / "checkpoints" / f"{phase}.pt"
    deadline = time.time() + 300
    while not target.exists():
        assert proc.poll() is None, f"the run ended before a {phase} checkpoint: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.4))  # a random step within the phase
    if phase == "search":
        assert not (out / "checkpoints" / "finetune.pt").exists(), "search finished too fast to interrupt"
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    if sig == signal.SIGKILL:
        assert code == -9
    else:
        assert code == 130, stderr[-2000:]
        assert "--resume" in stderr
    assert not (out / "metrics.json").exists(), "the run must not have finished"


def resume_and_compare(args: list[str], out: Path, reference: Path) -> None:
    """``--resume`` the interrupted run; dam.json, the adapter tensors and the metrics must equal the reference's."""
    cli(args, out, "--resume")
    assert (out / "dam.json").read_bytes() == (reference / "dam.json").read_bytes()
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].equal(theirs[key]), key
    m_ours = json.loads((out / "metrics.json").read_text())
    m_ref = json.loads((reference / "metrics.json").read_text())
    for key in m_ref:
        if key not in VOLATILE_METRICS:
            assert m_ours[key] == m_ref[key], key
    assert not (out / "checkpoints").exists(), "a finished run leaves no checkpoints behind"
