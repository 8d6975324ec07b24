"""Mixed precision of the search's forward passes: which modes exist, where they run, their autocast and scalers."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..errors import ConfigError

#: ``mixed_precision`` values: no autocast, bfloat16 autocast, float16 autocast with gradient scaling
MIXED_PRECISION = ("no", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: device types where the search refuses float16 autocast (a module constant, so tests can lift it)
FP16_UNSUPPORTED = frozenset({"cpu"})


def check_mixed_precision(mode: str, device: torch.device) -> None:
    """Refuse an unknown mode, or float16 on a device without float16 loss scaling."""
    if mode not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mode!r}")
    if mode == "fp16" and device.type in FP16_UNSUPPORTED:
        raise ConfigError(
            f"mixed_precision='fp16' on {device.type}: float16 mixed precision needs a CUDA device; use bf16 on CPU"
        )


def new_scaler(mode: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for float16 (its gradients underflow without one), else ``None``."""
    return torch.amp.GradScaler(device.type) if mode == "fp16" else None


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in the mode's dtype on ``device``; a no-op for ``"no"``."""
    dtype = AUTOCAST_DTYPES.get(mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
