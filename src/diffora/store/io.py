"""Crash-safe file output and safe tensor loading.

Everything diffora writes (reports, search states, adapters, converted models) goes through this module so that a
crash, a ``Ctrl-C`` or a full disk never leaves a half-written file where a good one used to be:

* files are written to a temporary file in the *same directory* (so the final rename cannot cross file systems),
  flushed and ``fsync``-ed, then moved over the target with :func:`os.replace`, which is atomic on POSIX and Windows;
* directories (e.g. a PEFT adapter folder) are built in a temporary sibling folder and renamed onto the target only
  when the block that fills them succeeds (:func:`atomic_dir`);
* on any failure the temporary file or folder is removed and the previous target is left untouched.

Loading is the other half: :func:`load_safetensors` reads tensors without pickle, and :func:`torch_load_safe` only
accepts ``torch.load`` files in ``weights_only`` mode, so a malicious checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffora.errors import DiffoRAError

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_safetensors",
    "read_safetensors_metadata",
    "save_safetensors_atomic",
    "torch_load_safe",
]

PathLike = str | os.PathLike[str]


def _umask() -> int:
    """The process umask, read without changing it where possible (``os.umask`` is the only portable way)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Persist a rename by syncing the directory entry; not supported everywhere (e.g. Windows), so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def _atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, sync it and move it onto ``path``.

    The block writes the temporary file however it likes (plain ``open``, ``safetensors.save_file`` ...). The file
    gets the permissions a normal ``open`` would give it (``mkstemp`` creates files readable by the owner only),
    or keeps those of the file it replaces.
    """
    target = Path(path)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            mode = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        # The writer may have closed the file without syncing it: reopen to push the data to disk before renaming.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see either the old file or the complete new one.

    Missing parent folders are created. Returns the target path.
    """
    target = Path(path)
    with _atomic_file(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)  # synced by _atomic_file before the rename
    return target


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`). Line endings are written as given."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Serialise ``obj`` as JSON (UTF-8, trailing newline) and write it to ``path`` atomically.

    The object is serialised *before* anything touches the disk, so an unserialisable value raises ``TypeError``
    and leaves no trace. Non-finite floats are written as ``NaN``/``Infinity`` like :func:`json.dumps` does.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def _fsync_tree(root: Path) -> None:
    """Sync every file and folder under ``root`` so the final rename never exposes unwritten data."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file_path = Path(dirpath) / name
            if file_path.is_symlink():
                continue
            with open(file_path, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(target: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; move it onto ``target`` only if the block succeeds.

    Typical use::

        with atomic_dir(out / "adapter") as tmp:
            peft_model.save_pretrained(tmp)

    If the block raises, the temporary folder is deleted and ``target`` (if any) is untouched. On success the
    files are synced and the folder renamed onto ``target``. An existing ``target`` folder is replaced when
    ``overwrite`` is true: it is first renamed aside, so if the final rename fails it is put back; between
    the two renames there is a short moment where ``target`` does not exist (POSIX cannot swap two non-empty
    folders portably). With ``overwrite=False`` an existing ``target`` raises :class:`FileExistsError` (after
    the temporary folder is removed); this is how concurrent writers of the same cache entry let the first one win.
    """
    final = Path(target)
    if final.exists() and not final.is_dir():
        raise DiffoRAError(
            f"cannot write folder '{final}': a file with that name exists; remove it or pick another path"
        )
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_tree(tmp)
        _move_dir_into_place(tmp, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _move_dir_into_place(tmp: Path, final: Path, *, overwrite: bool) -> None:
    if not final.exists():
        try:
            os.rename(tmp, final)
            return
        except OSError as exc:
            # Someone created ``final`` after our check (another process writing the same target).
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) and not final.exists():
                raise
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "target folder already exists", str(final))
    backup = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
    os.rmdir(backup)  # only the unique name is wanted; ``rename`` needs it to be free
    os.rename(final, backup)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(backup, final)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save ``tensors`` as a safetensors file at ``path`` atomically.

    Tensors are made contiguous and moved to the CPU first (safetensors requires both). ``metadata`` must map
    strings to strings; it ends up in the file header and can be read back with :func:`read_safetensors_metadata`.
    Tensors that share memory (e.g. tied weights) are rejected by safetensors; pass copies.
    """
    prepared = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    meta = dict(metadata) if metadata is not None else None
    if meta is not None:
        bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    target = Path(path)
    with _atomic_file(target) as tmp:
        save_file(prepared, str(tmp), metadata=meta)
    return target


def _open_safetensors_error(path: Path, exc: Exception) -> DiffoRAError:
    if isinstance(exc, FileNotFoundError) or not path.exists():
        return DiffoRAError(f"file '{path}' not found: check the path")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DiffoRAError(f"'{path}' is not a readable safetensors file ({first}); re-create it or pass another file")


def load_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Load all tensors of a safetensors file onto the CPU. A missing or corrupt file raises :class:`DiffoRAError`."""
    source = Path(path)
    try:
        with safe_open(str(source), framework="pt", device="cpu") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise _open_safetensors_error(source, exc) from exc


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """Return the string metadata stored in a safetensors header (empty dict when there is none)."""
    source = Path(path)
    try:
        with safe_open(str(source), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise _open_safetensors_error(source, exc) from exc


def torch_load_safe(path: PathLike) -> Any:
    """``torch.load`` restricted to plain data: tensors, numbers, strings, lists, dicts (``weights_only=True``).

    Pickle can run arbitrary code on load, so anything outside that allow-list (custom classes, ``__reduce__``
    payloads) is refused *before* it runs, and reported as a one-line :class:`DiffoRAError`. Tensors are mapped to
    the CPU. Prefer safetensors files (:func:`load_safetensors`) for anything diffora writes itself.
    """
    source = Path(path)
    if not source.is_file():
        raise DiffoRAError(f"file '{source}' not found: check the path")
    try:
        return torch.load(source, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # torch's message is many lines of advice about weights_only=False, which is exactly what we must not do.
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Unsupported global" in ln or "Unsupported operand" in ln), None)
        # keep "Unsupported global: GLOBAL x.y", drop torch's advice on how to allow it anyway
        detail = f" ({reason.split(' was not an allowed global')[0].split('. Please')[0]})" if reason else ""
        raise DiffoRAError(
            f"refusing to load '{source}': it contains pickled objects other than plain tensors/containers{detail};"
            " only load files you trust, ideally re-saved as safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(". ")[0].rstrip(".")  # torch appends paragraphs of advice to the first sentence
        raise DiffoRAError(
            f"'{source}' is not a readable torch file ({first}); re-create it or pass another file"
        ) from exc


#: the weight files of a saved PEFT adapter, in the order PEFT looks for them
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_weights(folder: PathLike) -> Path:
    """The weights file of the PEFT adapter in ``folder``, opened and checked before PEFT loads it.

    safetensors checks its header against the file size, so a truncated or corrupt file is found here and reported
    as a one-line :class:`DiffoRAError` naming it (PEFT's loader would raise a bare ``SafetensorError``); a pickle
    ``.bin`` file goes through :func:`torch_load_safe`. A folder without either file is refused too.
    """
    source = Path(folder)
    for name in ADAPTER_WEIGHTS:
        path = source / name
        if path.is_file():
            if name.endswith(".safetensors"):
                load_safetensors(path)  # reads every tensor: a file cut inside the data fails here, not in PEFT
            else:
                torch_load_safe(path)
            return path
    raise DiffoRAError(
        f"adapter folder '{source}' has no {ADAPTER_WEIGHTS[0]}; pass the adapter folder a run wrote "
        "(OUT/adapter), with its weights"
    )


def load_error_detail(exc: BaseException, limit: int = 240) -> str:
    """The line of a loading error that says what is wrong, whitespace-collapsed and cut to ``limit`` characters.

    torch's ``load_state_dict`` error starts with "Error(s) in loading state_dict for X:" and names the mismatched
    tensor and both shapes only on a later line, so that line is preferred; a ``KeyError`` names the missing key.
    """
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    shaped = [line for line in lines if "size mismatch" in line or "shape" in line]
    if isinstance(exc, KeyError):
        text = f"no entry {exc}"
    else:
        text = (shaped or lines or [type(exc).__name__])[0]
    return text.replace("torch.Size(", "(")[:limit]
