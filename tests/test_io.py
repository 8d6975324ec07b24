"""Tests for diffora.store.io: atomic writes keep the old file on failure, and loading never runs pickled code."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from diffora.errors import DiffoRAError
from diffora.store import io as dio


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in ``folder`` other than ``keep``: temp files/folders that a failed write should have removed."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _disk_full(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------------------------------------- files


def test_atomic_write_bytes_text_json_roundtrip(tmp_path: Path) -> None:
    dio.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    dio.atomic_write_text(tmp_path / "sub" / "b.txt", "héllo\n")  # parent folder is created
    dio.atomic_write_json(tmp_path / "c.json", {"x": [1, 2.5], "s": "é"})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"x": [1, 2.5], "s": "é"}
    assert (tmp_path / "c.json").read_text(encoding="utf-8").endswith("\n")
    assert _leftovers(tmp_path, {"a.bin", "sub", "c.json"}) == []


def test_atomic_write_overwrites_and_keeps_mode(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    dio.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_new_file_is_not_owner_only(tmp_path: Path) -> None:
    # mkstemp creates 0600 files; the final file should get the usual umask-based mode instead.
    target = dio.atomic_write_text(tmp_path / "f.txt", "x")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_disk_full_on_replace_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    dio.atomic_write_json(target, {"v": 1})
    monkeypatch.setattr(dio.os, "replace", _disk_full)
    with pytest.raises(OSError) as info:
        dio.atomic_write_json(target, {"v": 2})
    assert info.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path, {"state.json"}) == []


def test_disk_full_during_write_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    monkeypatch.setattr(dio.os, "fsync", _disk_full)  # the data never reaches the disk
    with pytest.raises(OSError):
        dio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"data.bin"}) == []


def test_unserialisable_json_touches_nothing(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text('{"ok": true}')
    with pytest.raises(TypeError):
        dio.atomic_write_json(target, {"bad": object()})
    assert target.read_text() == '{"ok": true}'
    assert _leftovers(tmp_path, {"r.json"}) == []


# --------------------------------------------------------------------------------------------- folders


def test_atomic_dir_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with dio.atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"

    with dio.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
        (tmp / "extra").write_text("e")
    assert (target / "weights").read_text() == "v2" and (target / "extra").is_file()
    assert _leftovers(tmp_path, {"adapter"}) == []


def test_atomic_dir_exception_keeps_previous(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with dio.atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("boom")
    assert (target / "weights").read_text() == "old"
    assert _leftovers(tmp_path, {"adapter"}) == []
    assert sorted(p.name for p in target.iterdir()) == ["weights"]


def test_atomic_dir_failed_rename_restores_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        # Moving the old folder aside works; moving the new one into place hits a full disk.
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(dio.os, "rename", rename)
    with pytest.raises(OSError):
        with dio.atomic_dir(target) as tmp:
            (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert _leftovers(tmp_path, {"adapter"}) == []


def test_atomic_dir_no_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError):
        with dio.atomic_dir(target, overwrite=False) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
    assert (target / "config.json").read_text() == "{}"
    assert _leftovers(tmp_path, {"model"}) == []


def test_atomic_dir_refuses_file_target(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("file")
    with pytest.raises(DiffoRAError, match="a file with that name exists"):
        with dio.atomic_dir(tmp_path / "x"):
            pass


def test_atomic_dir_with_peft_save(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["proj"]))
    with dio.atomic_dir(tmp_path / "adapter") as tmp:
        model.save_pretrained(tmp)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert _leftovers(tmp_path, {"adapter"}) == []


# --------------------------------------------------------------------------------------------- tensors


def test_safetensors_roundtrip_with_metadata(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"w": base.t(), "b": torch.tensor([1, 2], dtype=torch.int64)}  # non-contiguous input is accepted
    path = dio.save_safetensors_atomic(tensors, tmp_path / "t.safetensors", metadata={"step": "7"})
    loaded = dio.load_safetensors(path)
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], base.t()) and torch.equal(loaded["b"], tensors["b"])
    assert dio.read_safetensors_metadata(path) == {"step": "7"}


def test_safetensors_failure_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.safetensors"
    dio.save_safetensors_atomic({"a": torch.zeros(2)}, path)
    monkeypatch.setattr(dio.os, "replace", _disk_full)
    with pytest.raises(OSError):
        dio.save_safetensors_atomic({"a": torch.ones(2)}, path)
    assert torch.equal(dio.load_safetensors(path)["a"], torch.zeros(2))
    assert _leftovers(tmp_path, {"t.safetensors"}) == []


def test_safetensors_bad_metadata(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        dio.save_safetensors_atomic({"a": torch.zeros(1)}, tmp_path / "t.safetensors", metadata={"n": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_load_safetensors_errors(tmp_path: Path) -> None:
    with pytest.raises(DiffoRAError, match="not found"):
        dio.load_safetensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(DiffoRAError, match="not a readable safetensors file") as info:
        dio.load_safetensors(bad)
    assert "\n" not in str(info.value)


def test_torch_load_safe_plain_data(tmp_path: Path) -> None:
    obj = {"w": torch.ones(2, 2), "step": 3, "names": ["a", "b"]}
    torch.save(obj, tmp_path / "ok.pt")
    loaded = dio.torch_load_safe(tmp_path / "ok.pt")
    assert loaded["step"] == 3 and loaded["names"] == ["a", "b"] and torch.equal(loaded["w"], obj["w"])


class _Payload:
    """Pickles into "call Path.touch(marker)": loading it with full pickle would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_torch_load_safe_does_not_execute_payload(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.zeros(1), "evil": _Payload(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)  # the protocol torch.save uses
    with pytest.raises(DiffoRAError, match="refusing to load") as info:
        dio.torch_load_safe(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()

    # Control: the payload is real, an unrestricted load does run it.
    if fmt == "torch_zip":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)  # noqa: S301 - deliberately unsafe, on a file this test wrote
    assert marker.exists()


def test_torch_load_safe_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DiffoRAError, match="not found"):
        dio.torch_load_safe(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DiffoRAError) as info:
        dio.torch_load_safe(bad)
    assert "\n" not in str(info.value)
