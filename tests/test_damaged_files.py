"""Damaged files handed to the CLI (issue #21 item 7): a truncated adapter, an adapter whose tensor shapes do not fit
the base model, a search record or checkpoint from another diffora version. Each must end with exit 2, one line on
stderr that names the file, no traceback, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import FAST_FLAGS, write_sentiment_csvs

from diffora.cli.app import main

FAST = FAST_FLAGS["run"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = write_sentiment_csvs(tmp_path_factory.mktemp("damaged-data"), 48, 16)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """A good adapter for the tiny BERT (LoRA on the query projections, classifier saved)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("good") / "adapter"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    config = LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def _snapshot(path: Path) -> Optional[dict[str, Optional[bytes]]]:
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _fails_cleanly(argv: list[str], capsys, watched: list[Path], *names: str) -> str:
    """Run ``argv``: exit 2, one ``diffora: error:`` line naming every one of ``names``, ``watched`` unchanged."""
    before = [_snapshot(p) for p in watched]
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("diffora: error: "), err
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert [_snapshot(p) for p in watched] == before, "something was written"
    return lines[0]


def _eval(tiny_bert_dir: Path, data_dir: Path, adapter: Path, output_file: Path) -> list[str]:
    return [
        "eval",
        "--task",
        "classification",
        "--eval-file",
        str(data_dir / "dev.csv"),
        "--model",
        str(tiny_bert_dir),
        "--max-length",
        "32",
        "--adapter",
        str(adapter),
        "--output-file",
        str(output_file),
    ]


def test_good_adapter_evaluates(tiny_bert_dir, data_dir, adapter_dir, tmp_path, capsys) -> None:
    """The control: the undamaged adapter loads and is scored (so the failures below are about the damage)."""
    out = tmp_path / "metrics.json"
    assert main(_eval(tiny_bert_dir, data_dir, adapter_dir, out)) == 0, capsys.readouterr().err
    assert "accuracy" in json.loads(out.read_text())["eval"]


def test_truncated_adapter_weights(tiny_bert_dir, data_dir, adapter_dir, tmp_path, capsys) -> None:
    adapter = _copy_adapter(adapter_dir, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "metrics.json"
    line = _fails_cleanly(
        _eval(tiny_bert_dir, data_dir, adapter, out), capsys, [tmp_path / "adapter", out], str(weights)
    )
    assert "safetensors" in line and "internal error" not in line


def test_adapter_weights_not_safetensors(tiny_bert_dir, data_dir, adapter_dir, tmp_path, capsys) -> None:
    adapter = _copy_adapter(adapter_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    out = tmp_path / "metrics.json"
    _fails_cleanly(
        _eval(tiny_bert_dir, data_dir, adapter, out), capsys, [out], str(adapter / "adapter_model.safetensors")
    )


def test_adapter_with_wrong_shapes(tiny_bert_dir, data_dir, adapter_dir, tmp_path, capsys) -> None:
    """Same tensor names, other shapes (a rank-2 file under a config that says rank 2, but rows of another width)."""
    from safetensors.torch import load_file, save_file

    adapter = _copy_adapter(adapter_dir, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if "lora_A" in n)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 8)
    save_file(tensors, weights)
    out = tmp_path / "metrics.json"
    line = _fails_cleanly(_eval(tiny_bert_dir, data_dir, adapter, out), capsys, [out], str(adapter))
    assert "shape" in line.lower() or "size" in line.lower()


def _interrupted_run(tmp_path: Path, checkpoint: dict) -> Path:
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, out / "checkpoints" / "search.pt")
    return out


def _resume(tiny_bert_dir: Path, data_dir: Path, out: Path) -> list[str]:
    return [
        "run",
        "--task",
        "classification",
        "--train-file",
        str(data_dir / "train.csv"),
        "--eval-file",
        str(data_dir / "dev.csv"),
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(out),
        *FAST,
        "--resume",
    ]


def test_checkpoint_from_another_version(tiny_bert_dir, data_dir, tmp_path, capsys) -> None:
    out = _interrupted_run(tmp_path, {"format": "diffora.checkpoint/99", "phase": "search", "search": {}})
    line = _fails_cleanly(_resume(tiny_bert_dir, data_dir, out), capsys, [out], str(out / "checkpoints" / "search.pt"))
    assert "not a diffora search checkpoint" in line


def test_checkpoint_with_foreign_contents(tiny_bert_dir, data_dir, tmp_path, capsys) -> None:
    """The right format string over contents this version does not know (a renamed key, a tensor of another size)."""
    out = _interrupted_run(
        tmp_path, {"format": "diffora.checkpoint/1", "phase": "search", "rng": {}, "searcher": {"beta": torch.zeros(3)}}
    )
    _fails_cleanly(_resume(tiny_bert_dir, data_dir, out), capsys, [out], str(out / "checkpoints" / "search.pt"))


def test_search_record_from_another_version(tiny_bert_dir, data_dir, tmp_path, capsys) -> None:
    record = tmp_path / "dam.json"
    record.write_text(json.dumps({"format": "diffora.dam/7", "grid": {"names": []}, "selection": {"modules": []}}))
    out = tmp_path / "out"
    argv = [
        "train",
        "--task",
        "classification",
        "--train-file",
        str(data_dir / "train.csv"),
        "--eval-file",
        str(data_dir / "dev.csv"),
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(out),
        "--dam",
        str(record),
        "--max-length",
        "32",
        "--epochs",
        "1",
        "--quiet",
    ]
    line = _fails_cleanly(argv, capsys, [out], str(record))
    assert "diffora.dam/1" in line  # the format this version reads
