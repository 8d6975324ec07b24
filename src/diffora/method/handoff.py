r"""How fine-tuning follows the search (:attr:`DiffoRAConfig.handoff`), and the one step count and LR schedule they
share.

* ``"restart"`` (default): the search is a phase of its own; the exported LoRA is fine-tuned with a fresh AdamW and
  its own schedule over ``T`` steps, so a run takes ``S + T`` weight steps against LoRA-all's ``T``.
* ``"continue"``: the search is the first phase of fine-tuning. ``T`` is what a LoRA-all fine-tune takes
  (:func:`finetune_total_steps`); the search's weight steps are its first ``S < T`` steps, under the fine-tune's
  linear warm-up/decay over ``T`` (:func:`attach_schedule`) and its LR, weight decay and clipping
  (:func:`continue_config`). After the discretisation the dropped branches are removed (export), and the kept
  parameters (LoRA ``A``/``B``, head) continue with their AdamW state (:func:`carry_optimizer_state`) and the
  scheduler at step ``S`` for the remaining ``T - S`` steps. Equal total optimiser steps then hold by construction,
  and every step after the pruning is cheaper than a LoRA-all step.

Weight sharing folds the gate into ``B`` (``B' = g B``, :mod:`diffora.method.export`). The loss is the same
function of ``B'`` as of ``g B``, so ``\partial L / \partial B' = (\partial L / \partial B) / g``: every gradient
the exported ``B'`` will receive is ``1/g`` times what ``B`` received. Adam's moments are running averages of
gradients and of their squares, so the carried moments are put on the same scale, ``m' = m / g`` and
``v' = v / g^2``; the next update then mixes history and new gradients measured alike, and its size
``m' / \sqrt{v'}`` is the search's. (Scaling them like the weight, ``m g`` and ``v g^2``, would mix a history
measured ``g^2`` times larger than the new gradients.) A branch whose gate is not positive keeps no moments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, SearchStateError, TrainingError
from ..select.quota import Selection
from .config import DiffoRAConfig, FinetuneOptions

if TYPE_CHECKING:  # annotations only: the search is an earlier stage
    from .search import DAMSearch

#: parameter name (as the model's ``named_parameters`` gives it) -> its AdamW state (``step``, ``exp_avg``, ...)
OptimizerState = dict[str, dict[str, Any]]

#: the Adam moments that scale with the gradient (first power) and with its square
_FIRST_MOMENTS = ("exp_avg",)
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def finetune_total_steps(n_batches: int, options: FinetuneOptions, processes: int = 1) -> int:
    """Optimiser steps of a fine-tune over a loader of ``n_batches`` batches, as :func:`diffora.train.finetune`
    takes them: ``ceil(epochs * batches per process / accumulation)``, at least one."""
    batches = math.ceil(n_batches / processes) if processes > 1 else n_batches
    return max(1, math.ceil(options.epochs * batches / options.gradient_accumulation_steps))


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float, *, start: int = 0) -> Any:
    """The fine-tune's schedule: linear warm-up over ``int(warmup_ratio * total)`` steps, then linear decay to 0 at
    ``total``; positioned after ``start`` steps (the LR of step ``start`` is set on the optimiser). The LR is a
    closed form of the step, so a schedule built at ``start`` equals one stepped ``start`` times, bit for bit."""
    from transformers import get_linear_schedule_with_warmup

    if not 0 <= start < total:
        raise TrainingError(f"the schedule starts at step {start}, outside a fine-tune of {total} steps")
    for group in optimizer.param_groups:  # the peak LR; a restored optimiser already holds it
        group.setdefault("initial_lr", group["lr"])
    return get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total, last_epoch=start - 1)


def continue_config(config: DiffoRAConfig, options: FinetuneOptions) -> DiffoRAConfig:
    """The search configuration of the 'continue' hand-off: the search's weight steps are fine-tune steps, so they
    take the fine-tune's LR, weight decay and gradient clipping."""
    return dataclasses.replace(
        config,
        handoff="continue",
        weight_lr=options.lr,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
    )


def search_steps_within(steps: int, total: int) -> int:
    """The search's share ``S`` of a ``total``-step fine-tune: ``steps``, clipped so at least one fine-tune step of
    the kept modules follows."""
    if total < 1:
        raise ConfigError(f"the fine-tune has {total} steps; it needs at least one")
    return max(0, min(int(steps), total - 1))


def attach_schedule(search: "DAMSearch", total: int, warmup_ratio: float) -> Any:
    """Put the fine-tune's schedule over ``total`` steps on the search's weight optimiser, at the search's current
    step (0, or the step a restored search reached: the LR is recomputed, nothing needs saving). Returns it."""
    search.check_live()
    scheduler = linear_schedule(search.weight_optimizer, total, warmup_ratio, start=search.weight_steps)
    search.weight_scheduler = scheduler
    return scheduler


def carry_optimizer_state(search: "DAMSearch", selection: Selection) -> OptimizerState:
    """The AdamW state of every parameter the export keeps (kept modules' LoRA ``A``/``B``, the heads), cloned and
    keyed by the search model's parameter names, ``B``'s moments rescaled for the folded gate (module docstring).
    Call it before :func:`diffora.method.export.export_search`, which consumes the search."""
    search.check_live()
    kept = set(selection.modules)
    unknown = sorted(kept - set(search.grid.module_names()))
    if unknown:
        raise SearchStateError(f"the selection names modules that are not DAM candidates: {unknown[:3]}")
    base = {id(p): n for n, p in search.model.get_base_model().named_parameters()}
    full = {id(p): n for n, p in search.model.named_parameters()}
    with torch.no_grad():
        gates = search.gates.values().detach()
    folded = {f"{m}.lora_B.{search.adapter_name}.weight": gates[search.grid.position(m)] for m in kept}
    optimizer = search.weight_optimizer
    carried: OptimizerState = {}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                entry = optimizer.state.get(param)
                name = base.get(id(param))
                if not entry or name is None or id(param) not in full:
                    continue
                if ".lora_" in name and name.split(".lora_")[0] not in kept:
                    continue  # a dropped branch: removed by the export
                entry = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in entry.items()}
                gate = folded.get(name)
                if gate is not None:
                    if not bool(gate > 0):
                        continue  # B' = 0 · B: nothing to rescale the history to; the branch starts fresh moments
                    for key in _FIRST_MOMENTS + _SECOND_MOMENTS:
                        if key in entry:
                            g = gate.to(device=entry[key].device, dtype=entry[key].dtype)
                            entry[key] = entry[key] / g if key in _FIRST_MOMENTS else entry[key] / (g * g)
                carried[full[id(param)]] = entry
    return carried


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: OptimizerState) -> None:
    """Give ``optimizer`` (over parameters of ``model``) the carried per-parameter ``state``, keyed by
    ``model.named_parameters()`` names; its hyperparameters stay its own. Parameters without an entry start fresh."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    index = {name: i for i, name in enumerate(order) if name is not None}
    params = {n: p for n, p in model.named_parameters()}
    unknown = sorted(set(state) - set(index))
    if unknown:
        raise TrainingError(f"the carried optimiser state names parameters this model does not train: {unknown[:3]}")
    for name, entry in state.items():
        moment = entry.get("exp_avg")
        if torch.is_tensor(moment) and tuple(moment.shape) != tuple(params[name].shape):
            raise TrainingError(
                f"the carried optimiser state of {name} has shape {tuple(moment.shape)}, the "
                f"parameter {tuple(params[name].shape)}"
            )
    saved = optimizer.state_dict()
    saved["state"] = {
        index[name]: {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
        for name, entry in state.items()
    }
    optimizer.load_state_dict(saved)  # moves the moments to each parameter's device and dtype
