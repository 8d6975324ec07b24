"""The Trainer integrations' state files in a host checkpoint folder: :data:`STATE_JSON` (plan, counters, the
search state's structure) + :data:`STATE_TENSORS` (its tensors), both written atomically and fsynced, so a crash
mid-save leaves the previous files whole."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from ..errors import ConfigError, SearchStateError
from .io import atomic_write_json, load_safetensors, save_safetensors_atomic

#: DiffoRA's files in a checkpoint folder
STATE_JSON = "diffora_search.json"
STATE_TENSORS = "diffora_search.safetensors"
STATE_FORMAT = "diffora.trainer/2"


def write_search_state(folder: str, info: dict, state: Optional[dict]) -> None:
    """Write ``info`` (JSON) and the tensors of ``state`` (a ``DAMSearch.state_dict()``) into ``folder``; the
    tensors first, so the JSON that points at them never names a file that is not complete."""
    os.makedirs(folder, exist_ok=True)
    info = {"format": STATE_FORMAT, **info}
    if state is not None:
        tensors: dict[str, torch.Tensor] = {}
        info["state"] = pack(state, tensors)
        save_safetensors_atomic(tensors, os.path.join(folder, STATE_TENSORS))
    atomic_write_json(os.path.join(folder, STATE_JSON), info, indent=1)


def read_search_state(folder: str) -> tuple[dict, Optional[dict]]:
    """``(info, DAMSearch state dict or None)`` from a checkpoint folder; :class:`SearchStateError` without one."""
    path = os.path.join(str(folder), STATE_JSON)
    if not os.path.isfile(path):
        raise SearchStateError(
            f"checkpoint '{folder}' holds no DiffoRA search state ({STATE_JSON}); it was not written by a DiffoRA "
            "search or fine-tuning phase, so the gates and the gate optimiser cannot be restored"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SearchStateError(
            f"{path} is not valid JSON ({exc.__class__.__name__}); the checkpoint is damaged"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise SearchStateError(f"{path} is not a DiffoRA trainer search state (expected format '{STATE_FORMAT}')")
    state = None
    if "state" in saved:
        state = unpack(saved["state"], load_safetensors(os.path.join(str(folder), STATE_TENSORS)))
    return saved, state


def check_same_plan(saved: dict, mine: dict, folder: str) -> None:
    """Refuse to resume a checkpoint written by a run with other search settings or data."""
    for key, value in mine.items():
        if value is not None and key in saved and saved[key] != value:
            raise ConfigError(
                f"checkpoint '{folder}' was written by a run with {key}={saved[key]}, this run has {key}={value}; "
                "resume with the same data, search_steps, max_steps and DiffoRAConfig"
            )


def pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (for safetensors) and referenced by key;
    dict keys keep their type (optimiser states are keyed by int)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__items__": [[k, pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the search state")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`pack`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj
