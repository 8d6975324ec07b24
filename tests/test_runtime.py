"""Tests for diffora.runtime: seeding, RNG capture/restore, memory and timing helpers."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffora import runtime
from diffora.errors import ConfigError, DiffoRAError
from diffora.store.io import load_safetensors, save_safetensors_atomic


@pytest.fixture(autouse=True)
def _restore_global_rng_and_determinism() -> Iterator[None]:
    """These tests reseed the global generators and toggle deterministic mode; undo that for other test files."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(th)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)


def _draws() -> tuple[list[float], list[float], list[float]]:
    return (
        [random.random() for _ in range(5)] + [random.gauss(0, 1)],
        list(np.random.rand(5)) + [float(np.random.randn())],
        torch.rand(5).tolist() + torch.randn(1).tolist(),
    )


def test_seed_everything_reproduces_draws() -> None:
    runtime.seed_everything(123)
    first = _draws()
    runtime.seed_everything(123)
    assert _draws() == first
    runtime.seed_everything(124)
    assert _draws() != first


def test_seed_everything_deterministic_flag() -> None:
    runtime.seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    runtime.seed_everything(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "3", True])
def test_seed_everything_rejects_bad_seed(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        runtime.seed_everything(bad)
    assert "\n" not in str(info.value)


def test_capture_restore_reproduces_draws() -> None:
    runtime.seed_everything(7)
    random.gauss(0, 1)  # leaves a cached gauss value in Python's state
    np.random.randn()  # odd number of normals: NumPy caches the second one
    state = runtime.capture_rng_state()
    expected = _draws()
    _draws()  # move every generator on
    runtime.restore_rng_state(state)
    assert _draws() == expected


def test_state_survives_json_and_safetensors(tmp_path: Path) -> None:
    runtime.seed_everything(11)
    np.random.randn()
    state = runtime.capture_rng_state()
    expected = _draws()

    # JSON: the whole state as plain data.
    json_path = tmp_path / "rng.json"
    json_path.write_text(json.dumps(runtime.rng_state_to_jsonable(state)))
    runtime.restore_rng_state(json.loads(json_path.read_text()))
    assert _draws() == expected

    # safetensors for the torch tensor, JSON for the rest (how a checkpoint stores it).
    save_safetensors_atomic({"torch": state["torch"]}, tmp_path / "rng.safetensors")
    rest = json.loads(json.dumps({k: v for k, v in state.items() if k in ("python", "numpy")}))
    runtime.restore_rng_state({**rest, "torch": load_safetensors(tmp_path / "rng.safetensors")["torch"]})
    assert _draws() == expected


def test_capture_has_expected_types() -> None:
    state = runtime.capture_rng_state()
    assert state["torch"].dtype == torch.uint8
    assert isinstance(state["python"]["internal"], list) and isinstance(state["numpy"]["keys"], list)
    json.dumps({k: v for k, v in state.items() if k != "torch" and k != "cuda"})  # JSON-ready as is


def test_restore_malformed_state_changes_nothing() -> None:
    runtime.seed_everything(5)
    good = runtime.capture_rng_state()
    expected = _draws()
    runtime.restore_rng_state(good)
    bad = dict(good)
    bad["numpy"] = {**good["numpy"], "keys": [1, 2, 3]}  # wrong length: NumPy rejects it
    with pytest.raises(DiffoRAError, match="malformed") as info:
        runtime.restore_rng_state(bad)
    assert "\n" not in str(info.value)
    assert _draws() == expected  # the failed restore did not half-apply
    with pytest.raises(DiffoRAError, match="malformed"):
        runtime.restore_rng_state({"python": good["python"]})


def test_peak_rss_mib_is_plausible_and_grows() -> None:
    before = runtime.peak_rss_mib()
    assert 10 < before < 1_000_000  # a Python process with torch loaded uses tens of MiB at least
    block = np.ones(64 * 2**20 // 8)  # touch 64 MiB
    block[::512] = 2.0
    after = runtime.peak_rss_mib()
    del block
    assert after >= before
    assert after >= 64  # the peak includes the block
