"""The output folder contract (other tools read it)::

    OUT/adapter/          stock PEFT adapter (adapter_config.json + adapter_model.safetensors)
    OUT/dam.json          the search record
    OUT/dam.png           DAM heatmap, kept modules outlined
    OUT/metrics.json      metrics, parameter counts, timings, peak RSS, seed, resolved options

Everything is written into a temporary folder beside ``OUT`` and renamed onto it at the very end, so a failed or
interrupted run leaves no half-written ``OUT`` and never damages an existing one. ``--overwrite`` replaces only an
earlier diffora output, and ``--resume`` needs the checkpoints an interrupted run left.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import ConfigError
from ..store.io import atomic_dir, atomic_write_json
from ..store.record import plot_dam

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; runs are then not protected from each other
    fcntl = None  # type: ignore[assignment]

#: options that may differ between an interrupted run and its --resume
RESUME_VOLATILE = {"resume", "quiet", "overwrite", "checkpoint_every", "threads"}


def check_output_dir(path: str, overwrite: bool, resume: bool = False) -> Path:
    """Refuse to clobber results; allow --resume only where an interrupted run left checkpoints."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir '{out}' is a file; choose a folder path")
    checkpoints = out / "checkpoints"
    if resume:
        if not any(checkpoints.glob("*.pt")):
            raise ConfigError(f"nothing to resume: '{checkpoints}' holds no checkpoint; run without --resume")
    elif out.exists() and not overwrite:
        if checkpoints.exists() and not (out / "metrics.json").exists() and not (out / "dam.json").exists():
            raise ConfigError(
                f"output directory '{out}' holds an interrupted run; pass --resume to continue it "
                "or --overwrite to start over"
            )
        raise ConfigError(
            f"output directory '{out}' already exists; pass --overwrite to replace it or choose another --output-dir"
        )
    elif out.exists():
        _check_replaceable(out)
    _check_writable_parent(out, "--output-dir")
    return out


#: what a diffora output folder holds; --overwrite replaces only folders holding some of these (or nothing)
OUTPUT_NAMES = {"adapter", "search_adapter", "checkpoints", "dam.json", "dam.png", "metrics.json"}


def _check_replaceable(out: Path) -> None:
    """``--overwrite`` deletes the folder: allow it only for an empty folder or an earlier diffora output, and
    never for the current folder (or one that contains it), so a mistyped path cannot wipe unrelated files."""
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ConfigError(f"refusing to --overwrite '{out}': it contains the current folder; choose a new --output-dir")
    entries = [p.name for p in resolved.iterdir()]
    if entries and not OUTPUT_NAMES.intersection(entries):
        raise ConfigError(
            f"refusing to --overwrite '{out}': it is not a diffora output folder ({len(entries)} other entries, e.g. "
            f"'{sorted(entries)[0]}'); choose a new --output-dir or empty that folder first"
        )


def _check_writable_parent(target: Path, flag: str) -> None:
    """The nearest existing ancestor of ``target`` must be a folder this process can create entries in."""
    probe = target.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot create '{target}': '{probe}' is a file, not a folder; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to '{probe}' (permission denied); choose another {flag}")


def lock_path(out: Path) -> Path:
    """The lock of output folder ``out``: beside it, because the folder itself is replaced at the end of a run."""
    return out.resolve().parent / f".{out.resolve().name}.diffora.lock"


@contextlib.contextmanager
def output_lock(out: Path, accelerator: Any = None) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the whole run, so a second run on the same ``--output-dir`` refuses
    instead of writing over the first one's checkpoints and outputs.

    An advisory ``flock``: the kernel releases it when the process dies, even by ``kill -9``, so ``--resume`` after a
    crash is never blocked by a stale lock. In data-parallel runs the main process takes it and tells the others, so
    all ranks refuse together (none is left waiting at a collective)."""
    main = accelerator is None or accelerator.is_main_process
    handle, error = None, ""
    if main and fcntl is not None:
        handle, error = _acquire(lock_path(out), out)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    if error:
        raise ConfigError(error)
    try:
        yield
    finally:
        if handle is not None:
            # delete while still holding it, so nothing is left beside OUT; _acquire re-checks the inode, so a
            # run that opened the old file just before cannot hold a lock on a deleted name
            with contextlib.suppress(OSError):
                os.unlink(lock_path(out))
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


def _acquire(path: Path, out: Path) -> tuple[Any, str]:
    """Lock ``path`` (created if missing): ``(open file, "")``, or ``(None, message)`` if another run holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        handle = open(path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            return None, (
                f"output directory '{out}' is in use by another diffora run (pid {holder}); wait for it "
                "to finish or choose another --output-dir"
            )
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle, ""
        handle.close()  # the previous holder deleted this name after we opened it: try the new file
    return None, f"could not lock output directory '{out}'; retry, or choose another --output-dir"


def check_output_file(path: str) -> Path:
    """``diffora eval --output-file``: a file path whose folder can be created and written."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--output-file '{target}' is a folder; pass a file path such as '{target / 'eval.json'}'")
    _check_writable_parent(target, "--output-file")
    return target


def write_outputs(
    out: Path,
    *,
    adapter_model: Any = None,
    record: Optional[dict] = None,
    metrics: Optional[dict] = None,
    extra_adapters: Optional[dict[str, Any]] = None,
    title: Optional[str] = None,
) -> None:
    """Write the whole output folder atomically (into a temporary folder renamed onto ``out``)."""
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            if adapter_model is not None:
                adapter_model.save_pretrained(tmp / "adapter")
            for name, model in (extra_adapters or {}).items():
                model.save_pretrained(tmp / name)
            if record is not None:
                atomic_write_json(tmp / "dam.json", record)
                plot_dam(record, tmp / "dam.png", title=title)
            if metrics is not None:
                atomic_write_json(tmp / "metrics.json", metrics)
    except Exception as exc:
        # safetensors reports a full disk as SafetensorError("... No space left on device ..."), not as OSError
        if not isinstance(exc, OSError) and ("No space left on device" in str(exc) or "StorageFull" in str(exc)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
        raise


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: store them as strings so metrics.json stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
