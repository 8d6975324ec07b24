r"""DiffoRA on the PeftModel you already built: search in place, then narrow it to the kept modules.

::

    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", use_rslora=True, ...))
    lora_config = diffora.narrow_lora(peft_model, train_loader)   # the same object, now LoRA on the kept modules only
    trainer = Trainer(model=peft_model, ...)                      # or SFTTrainer / axolotl with lora_config

The candidates are the modules your ``LoraConfig`` put the adapter on (``all-linear``, ``exclude_modules``, rsLoRA,
DoRA and ``init_lora_weights`` are yours, untouched); the gates hook each candidate's ``lora_B`` input as in every
search. No copy of the model is made: the search trains your adapter's own weights, so its peak memory is that of a
LoRA-on-every-candidate training step plus the gates (``benchmarks/narrow_memory.py`` measures it).

Narrowing, with public torch / PEFT API only:

* a dropped module's LoRA layer is replaced in its parent by ``layer.get_base_layer()`` (the original linear map);
* a kept module keeps its branch with the gate folded into ``B`` (``B' = g B``: the branch computes what the gated
  one did; for DoRA as well, since PEFT computes DoRA's weight norm through ``lora_B`` too, so the gate is in it);
* with ``rank_allocation`` the kept branches get their new ranks (:func:`diffora.select.ranks.transfer_lora_weights`
  keeps each branch's function) and the adapter's ``LoraConfig`` gets the matching ``rank_pattern`` (one alpha for all);
* the adapter's ``LoraConfig.target_modules`` becomes the kept full names; a copy of it is returned.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from peft import LoraConfig, PeftModel
from torch import nn
from torch.utils.data import DataLoader

from ..data.splits import split_for_search
from ..errors import ConfigError, ModelError
from ..method.config import DiffoRAConfig
from ..method.schedule import check_warmup, gate_warmup, min_search_length, search_length
from ..method.search import DAMSearch, LossFn, prepare_search
from ..select.choose import allocate_ranks, choose_modules, search_kernels
from ..select.quota import Selection
from ..select.ranks import rank_pattern_for, transfer_lora_weights
from ..select.strategies import get_strategy

__all__ = ["DEFAULT_MAX_SEARCH_STEPS", "MIN_GATE_STEPS", "Narrowed", "check_options", "narrow_lora", "narrow_model"]

#: Cap of the default search length (one pass over the weight split, at most this many steps).
DEFAULT_MAX_SEARCH_STEPS = 300
#: The default search runs at least this many gate steps after the warm-up, even on a small data set.
MIN_GATE_STEPS = 20
#: rows per data kernel when ``selection_score="ntk"``
NTK_EXAMPLES = 64


@dataclass
class Narrowed:
    """What a narrowing did: the adapter's new config (a copy), the kept modules and their ranks."""

    lora_config: LoraConfig
    selection: Selection
    ranks: Optional[dict[str, int]]


def check_options(config: DiffoRAConfig, *, kernels_available: bool = True) -> None:
    """Refuse impossible option combinations before any compute (the selection strategy's own checks, and a
    strategy that needs data kernels where none can be computed)."""
    strategy = get_strategy(config.selection_score)
    strategy.check_config(config)
    if strategy.needs_kernels and not kernels_available:
        raise ConfigError(
            f"selection_score '{config.selection_score}' needs data kernels, which this integration "
            "cannot compute; use narrow_lora or the CLI, or another selection_score"
        )


def default_search_steps(n_weight_batches: int, config: DiffoRAConfig, cap: int = DEFAULT_MAX_SEARCH_STEPS) -> int:
    """One pass over the weight split, long enough for ``MIN_GATE_STEPS`` gate steps, at most ``cap`` steps (but
    never too short for one gate step)."""
    steps = search_length(n_weight_batches, minimum=min_search_length(MIN_GATE_STEPS, config), cap=cap)
    return max(steps, min_search_length(1, config))


def narrow_lora(
    peft_model: PeftModel,
    dataloader: Iterable[Any],
    *,
    config: Optional[DiffoRAConfig] = None,
    gate_dataloader: Optional[Iterable[Any]] = None,
    steps: Optional[int] = None,
    loss_fn: Optional[LossFn] = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
    mixed_precision: str = "no",
) -> LoraConfig:
    """Search which of ``peft_model``'s LoRA modules to keep, narrow the model to them in place, return the config.

    Args:
        peft_model: a ``PeftModel`` built with your own ``LoraConfig``; its adapter's modules are the candidates.
        dataloader: batches (dicts with ``labels``, or what ``loss_fn`` takes). A ``DataLoader`` over a sized data
            set is split by rows (a seeded ``config.gate_fraction`` of them gives the gate batches, same batch size
            and collator); any other iterable needs ``gate_dataloader``.
        config: search options (``keep_ratio``, ``rank_allocation``, learning rates...); its rank / alpha / dropout
            are taken from your ``LoraConfig``. Default ``DiffoRAConfig()``.
        gate_dataloader: the gate batches, held out from ``dataloader``'s rows.
        steps: weight steps of the search; default one pass over the weight batches, at least the warm-up plus 20
            gate steps, at most 300.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the model's own loss.
        adapter_name: default the model's active adapter.
        progress: show a progress bar.
        mixed_precision: ``"no"`` | ``"bf16"`` | ``"fp16"``: autocast of the search's forward passes (call
            ``narrow_lora`` outside any ``torch.autocast`` context of your own: its cast cache would hide the
            search's weight updates, so that is refused).

    Returns:
        a copy of the adapter's updated ``LoraConfig`` (kept full names in ``target_modules``; ``rank_pattern``
        when ``rank_allocation`` changed ranks; one alpha for all), for ``save_pretrained`` or other tools.
    """
    return narrow_search(
        peft_model,
        dataloader,
        config=config,
        gate_dataloader=gate_dataloader,
        steps=steps,
        loss_fn=loss_fn,
        adapter_name=adapter_name,
        progress=progress,
        mixed_precision=mixed_precision,
    )[0].lora_config


def narrow_search(
    peft_model: PeftModel,
    dataloader: Iterable[Any],
    *,
    config: Optional[DiffoRAConfig] = None,
    gate_dataloader: Optional[Iterable[Any]] = None,
    steps: Optional[int] = None,
    loss_fn: Optional[LossFn] = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
    mixed_precision: str = "no",
) -> tuple[Narrowed, DAMSearch, int]:
    """:func:`narrow_lora`, also returning the (finished) search and its length, for the search record."""
    config = config or DiffoRAConfig()
    if not isinstance(peft_model, PeftModel):
        raise ModelError(
            f"narrow_lora needs a PeftModel (get_peft_model(model, LoraConfig(...))), got {type(peft_model).__name__}"
        )
    check_options(config)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ConfigError(f"steps must be a positive whole number of weight steps, got {steps!r}")
    weight_loader, gate_loader = _split_loaders(dataloader, gate_dataloader, config)
    if steps is None:
        try:
            n_batches = len(weight_loader)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(
                "the number of search steps cannot be derived from an iterable without a length: pass steps="
            ) from None
        steps = default_search_steps(n_batches, config)
    check_warmup(steps, gate_warmup(steps, config), hint="raise steps or lower DiffoRAConfig.gate_warmup_steps")
    name = adapter_name or peft_model.active_adapter
    search = prepare_search(peft_model, config, adapter_name=name, loss_fn=loss_fn, mixed_precision=mixed_precision)
    with torch.random.fork_rng(devices=[]):  # dropout draws from config.seed; the caller's stream stays put
        torch.manual_seed(config.seed)
        search.fit(weight_loader, gate_loader, steps, progress=progress)
    kernels = None
    if get_strategy(search.config.selection_score).needs_kernels:
        kernels = search_kernels(search, weight_loader, NTK_EXAMPLES)
    selection = choose_modules(search, kernels)
    ranks = allocate_ranks(search, selection, kernels)
    return narrow_model(search, selection, ranks), search, steps


def _split_loaders(
    dataloader: Iterable[Any], gate_dataloader: Optional[Iterable[Any]], config: DiffoRAConfig
) -> tuple[Iterable[Any], Iterable[Any]]:
    """Weight and gate batches: the given pair, or a seeded row split of a DataLoader's data set."""
    if gate_dataloader is not None:
        return dataloader, gate_dataloader
    dataset = getattr(dataloader, "dataset", None)
    if not isinstance(dataloader, DataLoader) or dataset is None or not hasattr(dataset, "__len__"):
        raise ConfigError(
            "pass gate_dataloader= (held-out batches for the gate steps), or a DataLoader over a sized "
            "data set so that diffora can hold out gate_fraction of its rows"
        )
    n = len(dataset)
    if n < 2:
        raise ConfigError(f"the data set has {n} row(s); the search needs at least 2, one for each split")
    weight_rows, gate_rows = split_for_search(n, config.gate_fraction, config.seed)
    batch_size = dataloader.batch_size or 1

    def loader(rows: list[int], seed: int) -> DataLoader:
        return DataLoader(
            torch.utils.data.Subset(dataset, rows),
            batch_size=batch_size,
            shuffle=True,
            collate_fn=dataloader.collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )

    return loader(weight_rows, config.seed), loader(gate_rows, config.seed + 1)


# ------------------------------------------------------------------------------------------------- narrowing
def narrow_model(search: DAMSearch, selection: Selection, ranks: Optional[dict[str, int]] = None) -> Narrowed:
    """Turn the searched PeftModel (in place) into LoRA on ``selection``'s modules, gates folded in; see module doc.

    The search is consumed (its gate hooks are removed)."""
    search.check_live()
    model, adapter = search.model, search.adapter_name
    lora = model.peft_config[adapter]
    kept = list(selection.modules)
    unknown = [m for m in kept if m not in search.grid.module_names()]
    if unknown:
        raise ConfigError(f"the selection names modules that are not candidates: {unknown[:3]}")
    with torch.no_grad():
        gates = search.gates.values().detach()
    search.hooks.remove()
    search.exported = True
    base = model.get_base_model()
    rslora = bool(getattr(lora, "use_rslora", False))
    with torch.no_grad():
        for name in search.grid.module_names():
            layer = base.get_submodule(name)
            if name not in kept:
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent) if parent else base, child, layer.get_base_layer())
                continue
            i, j = search.grid.position(name)
            _fold_gate(layer, adapter, gates[i, j])
            if ranks and ranks[name] != lora.r:
                _resize(layer, adapter, ranks[name], lora.lora_alpha, rslora)
    lora.target_modules = kept
    if ranks:
        # one alpha for every module (diffora's convention, as in the CLI's export): a branch of rank r_m is scaled
        # alpha / r_m, and _resize rescaled B so it still computes what it did
        lora.rank_pattern = rank_pattern_for(ranks, lora.r)
    return Narrowed(copy.deepcopy(lora), selection, ranks)


def _fold_gate(layer: nn.Module, adapter: str, gate: torch.Tensor) -> None:
    """``B <- g B``: the branch computes what the gated one did.

    DoRA too: PEFT computes its weight norm ``||W + s B A||`` from ``lora_B(lora_A(I))``, a call of ``lora_B`` on a
    rank-r input, so the gate hook already scaled ``B`` there and ``m / ||W + s g B A||`` is what the search used."""
    b = layer.lora_B[adapter].weight
    b.copy_((b.float() * gate.to(device=b.device, dtype=torch.float32)).to(b.dtype))
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is not None and adapter in magnitude:
        # PEFT's optional DoRA cache (eval mode) holds the pre-fold norm; entering train mode clears it
        was_training = magnitude[adapter].training
        magnitude[adapter].train(True)
        magnitude[adapter].train(was_training)


def _resize(layer: nn.Module, adapter: str, new_rank: int, new_alpha: float, rslora: bool) -> None:
    """Give a kept branch rank ``new_rank`` with the same function (scale kept by ``new_alpha``)."""
    old_a, old_b = layer.lora_A[adapter], layer.lora_B[adapter]
    old_scaling = layer.scaling[adapter]
    new_scaling = new_alpha / (math.sqrt(new_rank) if rslora else new_rank)
    weight = old_a.weight
    new_a = nn.Linear(old_a.in_features, new_rank, bias=False, device=weight.device, dtype=weight.dtype)
    new_b = nn.Linear(
        new_rank, old_b.out_features, bias=old_b.bias is not None, device=weight.device, dtype=old_b.weight.dtype
    )
    nn.init.kaiming_uniform_(new_a.weight, a=math.sqrt(5))  # PEFT's default A init for the extra directions
    a, b = transfer_lora_weights(old_a.weight, old_b.weight, new_a.weight, new_b.weight, old_scaling, new_scaling)
    new_a.weight.copy_(a)
    new_b.weight.copy_(b)
    if old_b.bias is not None:
        new_b.bias.copy_(old_b.bias)
    new_a.weight.requires_grad_(old_a.weight.requires_grad)
    new_b.weight.requires_grad_(old_b.weight.requires_grad)
    layer.lora_A[adapter], layer.lora_B[adapter] = new_a, new_b
    layer.r[adapter], layer.lora_alpha[adapter], layer.scaling[adapter] = new_rank, new_alpha, new_scaling
