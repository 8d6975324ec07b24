"""A search's resumable state: what :meth:`DAMSearch.state_dict` saves and :meth:`DAMSearch.load_state_dict` restores.

Kept apart from the optimisation so the search class holds the steps only; the functions read and write the
search's attributes, so a state saved by one search restores into another over the same model and grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import SearchStateError

if TYPE_CHECKING:  # the search imports this module; the name is only needed for annotations
    from .search import DAMSearch


def search_state(search: "DAMSearch") -> dict[str, Any]:
    """Everything needed to continue the search exactly: LoRA/head weights, betas, both optimisers, counters."""
    return {
        "weights": {n: p.detach().clone() for n, p in search.model.named_parameters() if p.requires_grad},
        "beta": search.gates.beta.detach().clone(),
        "weight_optimizer": search.weight_optimizer.state_dict(),
        "gate_optimizer": search.gate_optimizer.state_dict(),
        "weight_steps": search.weight_steps,
        "gate_steps": search.gate_steps,
        "taylor_sum": search.taylor_sum.detach().clone(),
        "taylor_steps": search.taylor_steps,
        "gate_pull": search.gate_pull.detach().clone(),
        "history": {
            "weight_losses": list(search.history.weight_losses),
            "gate_losses": list(search.history.gate_losses),
            "gate_snapshots": list(search.history.gate_snapshots),
            "gate_label_counts": [list(c) for c in search.history.gate_label_counts],
        },
        # fp16 only: the loss scales (without them a resumed run would restart at 2**16 and re-overflow)
        **({"weight_scaler": search.weight_scaler.state_dict()} if search.weight_scaler is not None else {}),
        **({"gate_scaler": search.gate_scaler.state_dict()} if search.gate_scaler is not None else {}),
    }


def load_search_state(search: "DAMSearch", state: dict[str, Any]) -> None:
    """Restore a :func:`search_state` (of a search over the same model and grid) into ``search``."""
    params = {n: p for n, p in search.model.named_parameters() if p.requires_grad}
    if set(params) != set(state["weights"]):
        raise SearchStateError("the search state belongs to a different model or DAM grid")
    if tuple(state["beta"].shape) != tuple(search.gates.beta.shape):
        raise SearchStateError("the search state has a DAM of another shape")
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
        search.gates.beta.copy_(state["beta"])
    search.weight_optimizer.load_state_dict(state["weight_optimizer"])
    search.gate_optimizer.load_state_dict(state["gate_optimizer"])
    # states saved without fp16 keep the fresh scalers
    for key, scaler in (("weight_scaler", search.weight_scaler), ("gate_scaler", search.gate_scaler)):
        if scaler is not None and state.get(key):
            scaler.load_state_dict(state[key])
    search.weight_steps = int(state["weight_steps"])
    search.gate_steps = int(state["gate_steps"])
    # a state without the 'taylor' sums: that score then refuses, the others work
    taylor = state.get("taylor_sum")
    search.taylor_sum = (
        taylor.to(search.taylor_sum.device, torch.float32).clone()
        if taylor is not None
        else torch.zeros_like(search.taylor_sum)
    )
    search.taylor_steps = int(state.get("taylor_steps", 0))
    pull = state.get("gate_pull")  # absent in older states: the stability check then reads zeros (and says so)
    search.gate_pull = (
        pull.to(search.gate_pull.device, torch.float32).clone()
        if pull is not None
        else torch.zeros_like(search.gate_pull)
    )
    history = state.get("history", {})
    search.history = type(search.history)(
        list(history.get("weight_losses", [])),
        list(history.get("gate_losses", [])),
        [tuple(s) for s in history.get("gate_snapshots", [])],
        # absent in older states: the held-out check then compares with the first gate steps' loss instead
        [list(c) for c in history.get("gate_label_counts", [])],
    )
