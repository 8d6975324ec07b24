"""Where a model's inputs go, how many processes share a step, and the one gradient all-reduce with agreed failures.

Every part of diffora that moves a batch to a model asks :func:`model_device`, so a model split across devices
(``device_map="auto"``) gets its inputs where its embeddings are, wherever the question is asked.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import TrainingError

#: what a rank's failure code stands for (0 = a finite loss)
CODE_VALUES = {1: float("nan"), 2: float("inf"), 3: float("-inf")}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device, else its first parameter's (CPU if none)."""
    try:
        embeddings = model.get_input_embeddings()
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    except (AttributeError, NotImplementedError, TypeError):
        pass
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` (dicts, lists, tuples, nested) on ``device``; ``batch`` itself when all are there."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if all(moved[k] is v for k, v in batch.items()):
            return batch
        if type(batch) is dict:
            return moved
        try:  # e.g. transformers' BatchEncoding
            return type(batch)(moved)
        except Exception:  # noqa: BLE001 - an exotic mapping: a plain dict does for model(**batch)
            return moved
    if isinstance(batch, (list, tuple)):
        items = [to_device(v, device) for v in batch]
        if all(a is b for a, b in zip(items, batch)):
            return batch
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        try:
            return type(batch)(items)
        except Exception:  # noqa: BLE001
            return items
    return batch


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Put an optimiser's state tensors (not its step counters) on ``device``."""
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and key != "step":
                per_param[key] = value.to(device)


def world_size() -> int:
    """Processes in the ``torch.distributed`` group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def nonfinite_code(loss: torch.Tensor) -> int:
    """0 for a finite loss, else 1 (nan), 2 (+inf) or 3 (-inf): small integers that survive an all-reduce."""
    value = loss.detach()
    if bool(torch.isfinite(value).all()):
        return 0
    first = float(value.reshape(-1)[~torch.isfinite(value.reshape(-1))][0])
    return 1 if first != first else 2 if first > 0 else 3


def loss_message(kind: str, step: int, value: float, ranks: Optional[list[int]] = None) -> str:
    where = (
        ""
        if ranks is None
        else f" on rank {ranks[0]}"
        if len(ranks) == 1
        else f" on ranks {', '.join(map(str, ranks))}"
    )
    return (
        f"the {kind} loss became {value} at {kind} step {step}{where}; lower the learning rate "
        "or check the data for invalid labels"
    )


def gradient_message(kind: str, step: int) -> str:
    where = " on some rank" if world_size() > 1 else ""
    return (
        f"the {kind} gradient became non-finite at {kind} step {step}{where} (the loss was finite); lower the "
        "learning rate or check the data"
    )


def all_reduce_mean(params: Sequence[torch.Tensor], code: int) -> list[int]:
    """Average ``p.grad`` over processes in ONE all-reduce; return every rank's failure code (0 = fine).

    The buffer is ``[grads..., has_grad per param, failure code per rank]``: a missing gradient is sent as zeros
    (every rank must send the same shape), and a parameter gets the average wherever any rank had a gradient, so
    the ranks keep stepping alike. A rank that failed sends its code instead of stopping, so nobody is left
    waiting in a collective; when any code is set the gradients are left alone (the caller raises).
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    device = params[0].device
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, dtype) for p in params
    ]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device)
    codes = torch.zeros(world, dtype=dtype, device=device)
    codes[rank] = code
    flat = torch.cat(parts + [has_grad, codes])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total = flat.numel() - len(params) - world
    reduced_codes = [int(c) for c in flat[-world:].tolist()]
    if any(reduced_codes):
        return reduced_codes
    flat[:total].div_(world)
    offset = 0
    for p, present in zip(params, flat[total : total + len(params)].tolist()):
        size = p.numel()
        if present > 0:
            mean = flat[offset : offset + size].view(p.shape)
            if p.grad is None:
                p.grad = mean.to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad.copy_(mean)
        offset += size
    return reduced_codes


def sync_gradients(params: Sequence[torch.Tensor], kind: str, step: int, code: int, value: float) -> None:
    """Raise on a local non-finite loss (one process), or average the gradients across processes in one
    all-reduce that also tells every rank which ranks failed, so all raise the same error or none does."""
    if world_size() == 1:
        if code:
            raise TrainingError(loss_message(kind, step, value))
        return
    codes = all_reduce_mean(params, code)
    failed = [rank for rank, c in enumerate(codes) if c]
    if failed:
        raise TrainingError(loss_message(kind, step, CODE_VALUES[codes[failed[0]]], ranks=failed))
