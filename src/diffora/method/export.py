r"""Step 5 of the pipeline: turn the discretised DAM into a stock PEFT LoRA model (weight sharing).

The kept modules become ``LoraConfig(target_modules=[exact full names])`` and the task head goes into
``modules_to_save``. With weight sharing (the default, our reading of the paper's "weight-sharing
optimisations", as in one-shot NAS) each kept branch inherits the search's weights with its gate folded into ``B``:

.. math::

    g \cdot \tfrac{\alpha}{r} B A x = \tfrac{\alpha}{r} (g B) A x
    \quad\Rightarrow\quad A' = A, \; B' = g B,

so the exported branch computes exactly what the relaxed branch computed, and the trained head is carried over.
Without weight sharing, LoRA gets PEFT's fresh init and the head its pre-search weights.

The result has no diffora code in it: ``save_pretrained`` writes plain ``adapter_config.json`` +
``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import SearchStateError
from ..select.quota import Selection
from ..select.ranks import rank_pattern_for, transfer_lora_weights
from .candidates import DAMGrid, detect_task_heads, uses_conv1d

if TYPE_CHECKING:  # annotations only: the search is an earlier stage, imported by callers
    from .search import DAMSearch

_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def infer_task_type(model_class_name: str) -> Optional[str]:
    """PEFT task type from the transformers class name (``None`` = generic ``PeftModel``)."""
    return next((task for suffix, task in _TASK_TYPES.items() if model_class_name.endswith(suffix)), None)


def lora_config_for(
    selection: Selection | list[str],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    modules_to_save: Optional[list[str]],
    task_type: Optional[str],
    fan_in_fan_out: bool = False,
    ranks: Optional[dict[str, int]] = None,
) -> LoraConfig:
    """The plain ``LoraConfig`` a PEFT user would write by hand for this selection.

    ``ranks`` (budget concentration) gives modules their own rank: a ``rank_pattern`` with one exact key per
    module and no ``alpha_pattern``. Every method keeps one alpha, so a module of rank ``r_m`` is scaled
    ``alpha / r_m`` (PEFT's convention, and lora-matched's and EVA's): a wider branch does not also take larger
    steps, which would confound its extra rank with a higher learning rate. Weight sharing still carries the
    searched function over (:func:`diffora.select.ranks.transfer_lora_weights` rescales B)."""
    modules = list(selection.modules if isinstance(selection, Selection) else selection)
    if not modules:
        raise SearchStateError("the selection keeps no module; raise keep_ratio")
    patterns = {}
    if ranks:
        unknown = sorted(set(ranks) - set(modules))
        if unknown:
            raise SearchStateError(f"ranks are given for modules that are not kept: {unknown[:3]}")
        rank_pattern = rank_pattern_for(ranks, rank)
        patterns = {"rank_pattern": rank_pattern}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
        fan_in_fan_out=fan_in_fan_out,
        **patterns,
    )


#: what weight sharing carries from the search into the exported model: module -> (A, g*B), head -> (trained, original)
SharedWeights = tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, tuple[dict, dict]]]


def collect_shared_weights(
    base_model: nn.Module,
    selection: Selection,
    grid: DAMGrid,
    gates: torch.Tensor,
    heads: list[str],
    adapter_name: str = "default",
) -> SharedWeights:
    """Copy the kept branches' ``A`` and gate-folded ``B`` and the heads' weights out of the searched model."""
    unknown = [m for m in selection.modules if m not in grid.module_names()]
    if unknown:
        raise SearchStateError(f"the selection names modules that are not DAM candidates: {unknown[:3]}")
    with torch.no_grad():
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in selection.modules:
            layer = base_model.get_submodule(name)
            i, j = grid.position(name)
            b = layer.lora_B[adapter_name].weight
            lora[name] = (
                layer.lora_A[adapter_name].weight.detach().clone(),
                b.detach().clone() * gates[i, j].to(device=b.device, dtype=b.dtype),
            )
        head_states: dict[str, tuple[dict, dict]] = {}
        for head in heads:
            wrapper = base_model.get_submodule(head)
            trained = {k: v.detach().clone() for k, v in wrapper.modules_to_save[adapter_name].state_dict().items()}
            original = {k: v.detach().clone() for k, v in wrapper.original_module.state_dict().items()}
            head_states[head] = (trained, original)
    return lora, head_states


def build_exported_model(
    plain_model: nn.Module,
    config: LoraConfig,
    shared: SharedWeights,
    *,
    adapter_name: str = "default",
    weight_sharing: bool = True,
    seed: int = 1,
    search_scaling: Optional[float] = None,
) -> PeftModel:
    """Wrap the search's base model (LoRA layers removed) in a stock PEFT model; copy ``shared`` into it.

    A module whose exported rank differs from the search's (``config.rank_pattern``) gets an equivalent branch
    (:func:`diffora.select.ranks.transfer_lora_weights`; ``search_scaling`` = the search's ``alpha / r``)."""
    lora, head_states = shared
    exported = seeded_peft_model(plain_model, config, seed, adapter_name=adapter_name)
    with torch.no_grad():
        new_base = exported.get_base_model()
        for head, (trained, original) in head_states.items():
            wrapper = new_base.get_submodule(head)
            wrapper.original_module.load_state_dict(original)
            wrapper.modules_to_save[adapter_name].load_state_dict(trained if weight_sharing else original)
        if weight_sharing:
            for name, (a, b) in lora.items():
                layer = new_base.get_submodule(name)
                new_a, new_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                if new_a.shape != a.shape:
                    a, b = transfer_lora_weights(
                        a, b, new_a, new_b, search_scaling or config.lora_alpha / config.r, layer.scaling[adapter_name]
                    )
                new_a.copy_(a)
                new_b.copy_(b)
    return exported


def search_lora_config(search: "DAMSearch", selection: Selection, ranks: Optional[dict[str, int]] = None) -> LoraConfig:
    """The ``LoraConfig`` of a search's selection: its rank, alpha, dropout, heads, task type and Conv1D layout."""
    config = search.config
    return lora_config_for(
        selection,
        rank=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        modules_to_save=search.heads,
        task_type=infer_task_type(search.model_class),
        fan_in_fan_out=search.fan_in_fan_out,
        ranks=ranks,
    )


def export_search(
    search: "DAMSearch",
    selection: Selection,
    weight_sharing: Optional[bool] = None,
    ranks: Optional[dict[str, int]] = None,
) -> PeftModel:
    """A stock ``peft.PeftModel`` with LoRA on the kept modules only.

    ``ranks`` (from :func:`diffora.select.ranks.concentrate_ranks`) gives kept modules their own rank, exported as a
    ``rank_pattern``; the searched weights go into the first ``r`` directions. The search is consumed: its model
    becomes the exported model's base.
    """
    search.check_live()
    config = search.config
    sharing = config.weight_sharing if weight_sharing is None else weight_sharing
    with torch.no_grad():
        gates = search.gates.values().detach()
    shared = collect_shared_weights(
        search.model.get_base_model(), selection, search.grid, gates, search.heads, search.adapter_name
    )
    search.hooks.remove()
    plain_model = search.model.unload()  # removes every LoRA layer; heads are plain modules again
    search.exported = True
    lora_config = search_lora_config(search, selection, ranks)
    return build_exported_model(
        plain_model,
        lora_config,
        shared,
        adapter_name=search.adapter_name,
        weight_sharing=sharing,
        seed=config.seed + 1,
        search_scaling=config.alpha / config.rank,
    )


def fresh_lora(
    model: nn.Module,
    modules: Sequence[str],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    seed: int,
    heads: Optional[list[str]] = None,
    ranks: Optional[dict[str, int]] = None,
) -> PeftModel:
    """LoRA with PEFT's own init on ``modules`` of ``model`` (modified in place), as the export without weight
    sharing builds it: the init is drawn from ``seed + 1`` without disturbing the caller's RNG stream; ``heads``
    default to the detected task heads."""
    config = lora_config_for(
        list(modules),
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        ranks=ranks,
        modules_to_save=heads if heads is not None else detect_task_heads(model),
        task_type=infer_task_type(type(model).__name__),
        fan_in_fan_out=uses_conv1d(model, modules),
    )
    return seeded_peft_model(model, config, seed + 1)


def seeded_peft_model(
    model: nn.Module, config: LoraConfig, init_seed: int, *, adapter_name: str = "default"
) -> PeftModel:
    """``get_peft_model`` with PEFT's random init drawn from ``init_seed``, leaving the caller's RNG stream where
    it was (so the same seed gives the same adapter whatever ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return get_peft_model(model, config, adapter_name=adapter_name)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
