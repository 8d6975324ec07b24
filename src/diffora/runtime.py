"""Reproducibility and resource helpers: seeding, RNG checkpoints, peak memory, wall-clock timing.

A DiffoRA search is only resumable bit-for-bit if every random source is restored with the weights, so
:func:`capture_rng_state` returns the Python, NumPy and torch generator states in plain data (lists, numbers, a
``uint8`` tensor) that can go into a JSON or safetensors checkpoint, and :func:`restore_rng_state` puts them back.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from diffora.errors import ConfigError, DiffoRAError

__all__ = [
    "capture_rng_state",
    "peak_rss_mib",
    "restore_rng_state",
    "rng_state_to_jsonable",
    "seed_everything",
]

_MAX_SEED = 2**32 - 1  # NumPy's legacy global generator only accepts 32-bit seeds


#: libraries whose warnings diffora's command line and compare workers hide (failures are reported in one line):
#: huggingface_hub logs every network retry, datasets its cache misses, and bitsandbytes (imported by peft when
#: installed) warns at import on AVX512-BF16 CPUs that its optional `kernels` speed-up is missing
QUIET_LOGGERS = ("huggingface_hub", "datasets", "bitsandbytes", "kernels")  # kernels: bitsandbytes' offline hub notice


def quiet_library_loggers() -> None:
    """Raise those libraries' loggers to ERROR; call it before anything imports them."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_worker_process(threads: int, devices: Any = None) -> None:
    """Initialise a worker process of ``diffora compare``: quiet libraries, its GPU (one per worker), torch threads.

    It lives here, not with the jobs, because a spawned worker imports its initializer's module before calling it:
    this module imports neither peft nor bitsandbytes, so their import-time warnings come after the loggers are
    quieted."""
    import warnings

    quiet_library_loggers()
    if devices is not None:
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get_nowait())
        except Exception:  # more workers than devices: share the first one
            pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if threads > 0:
        torch.set_num_threads(threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and, if present, all CUDA devices).

    With ``deterministic=True`` torch is also asked to use deterministic kernels
    (``torch.use_deterministic_algorithms(True, warn_only=True)``: ops without a deterministic version warn instead of
    failing) and cuDNN autotuning is switched off; ``deterministic=False`` turns the deterministic-kernel request
    off again and leaves autotuning as it is.
    ``seed`` must be an integer in ``[0, 2**32 - 1]``.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _MAX_SEED:
        raise ConfigError(f"seed must be an integer between 0 and {_MAX_SEED}, got {seed!r}: pass e.g. --seed 0")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS reads this when it initialises; setting it is harmless on CPU and needed for determinism on GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels run to run


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the Python, NumPy (global generator) and torch RNG states.

    Returns a dict with keys

    * ``"python"``: ``{"version": int, "internal": list[int], "gauss_next": float | None}``
    * ``"numpy"``: ``{"bit_generator": str, "keys": list[int], "pos": int, "has_gauss": int, "cached_gaussian": float}``
    * ``"torch"``: the CPU generator state, a ``uint8`` tensor
    * ``"cuda"``: a list of ``uint8`` tensors, one per CUDA device, only when CUDA is already initialised

    The tensors can be stored in a safetensors file as they are; :func:`rng_state_to_jsonable` turns the whole dict
    into JSON-ready data. Generators created by user code (``np.random.default_rng``, ``torch.Generator``) are not
    global and therefore not included.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(name),
            "keys": [int(x) for x in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state().clone(),
    }
    # Querying CUDA states would initialise CUDA (slow, and it grabs GPU memory); skip when it is not in use yet.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def rng_state_to_jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a :func:`capture_rng_state` dict with tensors turned into lists of ints (for JSON)."""
    out = dict(state)
    out["torch"] = _as_uint8_tensor(state["torch"], "torch").tolist()
    if "cuda" in state:
        out["cuda"] = [_as_uint8_tensor(s, "cuda").tolist() for s in state["cuda"]]
    return out


def _as_uint8_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.uint8).contiguous()
    if isinstance(value, (list, tuple, np.ndarray)):
        return torch.tensor(np.asarray(value, dtype=np.uint8), dtype=torch.uint8)
    raise DiffoRAError(
        f"RNG state entry '{key}' has type {type(value).__name__}: the checkpoint is corrupt; restart the run"
    )


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (tensor form or the JSON form of
    :func:`rng_state_to_jsonable`). After this, the global generators produce exactly the draws they would have
    produced at capture time. A malformed state raises :class:`DiffoRAError` and leaves every generator unchanged.
    CUDA states are restored only when present and CUDA is available (a CPU resume of a GPU run skips them).
    """
    try:
        py = state["python"]
        python_state = (int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"])
        npst = state["numpy"]
        numpy_state = (
            str(npst["bit_generator"]),
            np.asarray(npst["keys"], dtype=np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
        torch_state = _as_uint8_tensor(state["torch"], "torch")
        cuda_states = [_as_uint8_tensor(s, "cuda") for s in state.get("cuda", [])]
        # Mersenne Twister: 624 state words (+ position for Python); NumPy fails obscurely on other sizes.
        if len(python_state[1]) != 625 or len(numpy_state[1]) != 624:
            raise ValueError("wrong Mersenne Twister state length")
    except (KeyError, TypeError, ValueError) as exc:
        raise DiffoRAError(
            f"RNG state is malformed ({type(exc).__name__}: {exc}): the checkpoint is corrupt; restart the run"
        ) from exc
    # Validate everything first, then apply, so a bad entry cannot leave the generators half-restored.
    old_python = random.getstate()
    old_numpy = np.random.get_state()
    old_torch = torch.get_rng_state()
    try:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        random.setstate(old_python)
        np.random.set_state(old_numpy)
        torch.set_rng_state(old_torch)
        raise DiffoRAError(f"RNG state is malformed ({exc}): the checkpoint is corrupt; restart the run") from exc
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


def peak_gpu_mib() -> Optional[float]:
    """Peak CUDA memory allocated by this process's tensors so far, in MiB; ``None`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.max_memory_allocated()) / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (the high-water mark, not the current usage)."""
    try:
        import resource
    except ImportError:  # Windows has no ``resource`` module
        import psutil

        info = psutil.Process().memory_info()
        return float(getattr(info, "peak_wset", info.rss)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux (and most Unixes) but in bytes on macOS.
    divisor = 2**20 if sys.platform == "darwin" else 2**10
    return float(peak) / divisor


def installed_package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some packages that ship models or data
    run code or pull in heavy dependencies on import); ``None`` when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
