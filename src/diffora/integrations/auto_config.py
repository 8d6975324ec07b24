"""One call from a model and its training data to a plain ``peft.LoraConfig`` whose ``target_modules`` DiffoRA chose.

A PEFT user changes two lines::

    - config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    + from diffora.integrations import auto_lora_config
    + config = auto_lora_config(model, train_ds, collate_fn=collator).lora_config
      peft_model = get_peft_model(model, config)     # ... and the rest of the training code stays as it was

The search runs on a deep copy of ``model``: PEFT injection, the search steps and the export all happen on the copy,
so the caller's model (its modules, parameters, ``training`` flag) and the caller's global RNG stream are left as
they were. The result depends only on the model, the data and ``config`` (the search seeds its own RNG with
``config.seed``).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.utils.data import DataLoader

from ..data.splits import split_for_search
from ..errors import ConfigError, DataError, ModelError
from ..method.config import DiffoRAConfig
from ..method.export import export_search, search_lora_config
from ..method.parallel import model_device, to_device
from ..method.schedule import check_warmup, gate_warmup, min_search_length, search_length
from ..method.search import LossFn, default_loss, prepare_search
from ..select.choose import allocate_ranks, choose_modules, search_kernels
from ..select.quota import Selection
from ..select.strategies import get_strategy
from ..store.record import search_record
from .narrow import NTK_EXAMPLES, check_options

__all__ = ["AutoLoraResult", "DEFAULT_MAX_SEARCH_STEPS", "auto_lora_config", "has_adapters", "split_indices"]

#: Cap of the default search length (one pass over the weight split, at most this many steps).
DEFAULT_MAX_SEARCH_STEPS = 300
#: The default search runs at least this many gate steps after the warm-up, even on a small data set.
MIN_GATE_STEPS = 20


@dataclass
class AutoLoraResult:
    """What :func:`auto_lora_config` found.

    Attributes:
        lora_config: a plain ``peft.LoraConfig`` (explicit full module names in ``target_modules``, the task head in
            ``modules_to_save``, ``task_type`` inferred from the model class).
        record: the search record, as written to ``dam.json`` (grid, betas, gates, history, selection).
        selection: the kept DAM entries.
        state_dict: with ``return_weights=True``, the search's LoRA weights of the kept modules (gate folded into
            ``B``) and its trained task head, keyed as ``peft.get_peft_model_state_dict`` names them; else ``None``.
        search_steps: weight steps the search ran (gate steps: ``search_steps - gate_warmup_steps``).
        seconds: wall-clock time of the search.
    """

    lora_config: LoraConfig
    record: dict
    selection: Selection
    state_dict: Optional[dict[str, torch.Tensor]] = None
    search_steps: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def target_modules(self) -> list[str]:
        return list(self.selection.modules)

    def get_peft_model(self, model: nn.Module, adapter_name: str = "default") -> PeftModel:
        """``get_peft_model(model, lora_config)``, initialised from the search's weights when they were returned."""
        peft_model = get_peft_model(model, self.lora_config, adapter_name=adapter_name)
        if self.state_dict is not None:
            result = set_peft_model_state_dict(peft_model, self.state_dict, adapter_name=adapter_name)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise ModelError(
                    f"the search weights do not fit this model (unexpected keys such as {unexpected[0]!r}); "
                    "pass the model the search ran on"
                )
        return peft_model


#: the CLI's weight/gate split (re-exported under the name this module has always used)
split_indices = split_for_search


def default_search_steps(n_weight_batches: int, config: DiffoRAConfig, cap: int = DEFAULT_MAX_SEARCH_STEPS) -> int:
    """One pass over the weight split, long enough for ``MIN_GATE_STEPS`` gate steps, at most ``cap`` steps (but
    never too short for one gate step)."""
    steps = search_length(n_weight_batches, minimum=min_search_length(MIN_GATE_STEPS, config), cap=cap)
    return max(steps, min_search_length(1, config))


def auto_lora_config(
    model: nn.Module,
    train_dataset: Sequence[Any],
    *,
    config: Optional[DiffoRAConfig] = None,
    collate_fn: Optional[Callable[[list[Any]], Mapping[str, Any]]] = None,
    batch_size: int = 16,
    search_steps: Optional[int] = None,
    loss_fn: Optional[LossFn] = None,
    return_weights: bool = False,
    progress: bool = True,
) -> AutoLoraResult:
    """Search which modules of ``model`` should get LoRA and return the ``LoraConfig`` for them.

    Args:
        model: a Hugging Face model **without** adapters (left unchanged: the search runs on a deep copy).
        train_dataset: the training examples (a list, a ``torch`` map-style dataset or a ``datasets.Dataset``);
            a seeded ``config.gate_fraction`` of it is held out for the gate steps, the rest trains the weights.
        config: search options (rank, alpha, keep ratio, granularity, learning rates…); default ``DiffoRAConfig()``.
        collate_fn: turns a list of examples into a batch dict with ``labels`` (e.g. ``DataCollatorWithPadding``
            or ``diffora.data.encode.make_collator``); default ``transformers.default_data_collator``. Columns the
            model's ``forward`` does not accept (raw text…) are dropped first, as the ``Trainer`` does.
        batch_size: examples per search step (weight and gate batches alike).
        search_steps: weight steps of the search; default one pass over the weight split, at least
            ``gate_warmup_steps + 20`` and at most 300 steps.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default the model's own loss.
        return_weights: also return the search's LoRA/head weights of the kept modules (``result.state_dict``),
            so training can start from them (weight sharing) instead of PEFT's fresh init.
        progress: show a progress bar.

    Raises:
        ModelError: ``model`` already carries PEFT adapters, or has nothing DiffoRA can adapt.
        DataError / ConfigError: too little data, a bad option.
    """
    config = config or DiffoRAConfig()
    if has_adapters(model):
        raise ModelError(
            "auto_lora_config needs the base model without adapters (it got a PEFT model); pass the model you would "
            "hand to get_peft_model"
        )
    check_options(config)  # an impossible option combination fails before the search, not after it
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if search_steps is not None and (isinstance(search_steps, bool) or int(search_steps) != search_steps):
        raise ConfigError(f"search_steps must be a whole number of steps, got {search_steps!r}")
    try:
        n = len(train_dataset)
    except TypeError:
        raise DataError(
            "train_dataset must have a length (a list, a map-style Dataset or a datasets.Dataset)"
        ) from None
    if n < 2:
        raise DataError(f"auto_lora_config needs at least 2 training examples (got {n}): one for each split")

    weight_idx, gate_idx = split_indices(n, config.gate_fraction, config.seed)
    collate = _column_filtering(collate_fn or _default_collator(), model)
    if not any(True for _ in model.parameters()):
        raise ModelError(f"{type(model).__name__} has no parameters")
    device = model_device(model)
    n_weight_batches = math.ceil(len(weight_idx) / batch_size)
    steps = int(search_steps) if search_steps is not None else default_search_steps(n_weight_batches, config)
    check_warmup(steps, gate_warmup(steps, config))

    base_loss = loss_fn or default_loss

    def on_device_loss(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return base_loss(m, to_device(batch, device))

    start = time.perf_counter()
    cuda_devices = [device] if device.type == "cuda" else []
    # Own RNG stream: LoRA init, data order and dropout depend on config.seed only, and the caller's stream is left
    # where it was.
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)
        work = copy.deepcopy(model)
        search = prepare_search(work, config, loss_fn=on_device_loss)
        search.gates.to(device)
        weight_loader = _loader(train_dataset, weight_idx, batch_size, collate, config.seed)
        gate_loader = _loader(train_dataset, gate_idx, batch_size, collate, config.seed + 1)
        search.fit(weight_loader, gate_loader, steps, progress=progress)
        kernels = None
        if get_strategy(config.selection_score).needs_kernels:
            kernels = search_kernels(search, weight_loader, NTK_EXAMPLES)
        selection = choose_modules(search, kernels)
        ranks = allocate_ranks(search, selection, kernels)  # the CLI's rank_pattern, through the API too
        seconds = time.perf_counter() - start
        record = search_record(
            search,
            selection,
            search_steps=steps,
            weight_split_rows=len(weight_idx),
            gate_split_rows=len(gate_idx),
            search_seconds=seconds,
            batch_size=batch_size,
            source="diffora.integrations.auto_lora_config",
        )
        lora_config = search_lora_config(search, selection, ranks)
        state_dict = None
        if return_weights:
            exported = export_search(search, selection, weight_sharing=True, ranks=ranks)
            state_dict = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(exported).items()}
            del exported
    del search, work
    return AutoLoraResult(
        lora_config=lora_config,
        record=record,
        selection=selection,
        state_dict=state_dict,
        search_steps=steps,
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------------------- helpers
def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` already carries PEFT adapters (a ``PeftModel``, an HF model with loaded adapters, or PEFT
    tuner layers injected in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or getattr(model, "_hf_peft_config_loaded", False):
        return True
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _default_collator() -> Callable[[list[Any]], Mapping[str, Any]]:
    from transformers import default_data_collator

    return default_data_collator


def _accepted_inputs(model: nn.Module) -> Optional[set[str]]:
    """Argument names of ``model.forward`` (None when it takes ``**kwargs``, i.e. accepts anything)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) | {"label", "label_ids", "labels"}


def _column_filtering(collate: Callable, model: nn.Module) -> Callable:
    """Drop example fields the model does not take (as the Trainer's ``remove_unused_columns`` does), then collate."""
    accepted = _accepted_inputs(model)

    def collate_filtered(items: list[Any]) -> Mapping[str, Any]:
        if accepted is not None and items and isinstance(items[0], Mapping):
            items = [{k: v for k, v in item.items() if k in accepted} for item in items]
        batch = collate(items)
        if not isinstance(batch, Mapping):
            raise DataError(
                f"collate_fn returned a {type(batch).__name__}; it must return a dict of model inputs with 'labels'"
            )
        return batch

    return collate_filtered


class _Rows(torch.utils.data.Dataset):
    """Rows ``indices`` of any indexable data set (``datasets.Dataset`` rows come back as dicts)."""

    def __init__(self, data: Sequence[Any], indices: list[int]) -> None:
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[self.indices[i]]


def _loader(data: Sequence[Any], indices: list[int], batch_size: int, collate: Callable, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        _Rows(data, indices), batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator
    )
