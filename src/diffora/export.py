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

from typing import TYPE_CHECKING, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .discretize import Selection
from .errors import SearchStateError

if TYPE_CHECKING:  # pragma: no cover
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
) -> LoraConfig:
    """The plain ``LoraConfig`` a PEFT user would write by hand for this selection."""
    modules = list(selection.modules if isinstance(selection, Selection) else selection)
    if not modules:
        raise SearchStateError("the selection keeps no module; raise keep_ratio")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type=task_type,
        fan_in_fan_out=fan_in_fan_out,
    )


def export_peft_model(search: "DAMSearch", selection: Selection, weight_sharing: bool = True) -> PeftModel:
    """Build the final PEFT model from a finished search (which is consumed)."""
    search._check_live()
    adapter = search.adapter_name
    base_model = search.model.get_base_model()
    unknown = [m for m in selection.modules if m not in search.grid.module_names()]
    if unknown:
        raise SearchStateError(f"the selection names modules that are not DAM candidates: {unknown[:3]}")

    # Collect what to carry over before the search's LoRA layers are removed.
    with torch.no_grad():
        gates = search.gates.values().detach()
        lora_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in selection.modules:
            layer = base_model.get_submodule(name)
            i, j = search.grid.position(name)
            a = layer.lora_A[adapter].weight.detach().clone()
            b = layer.lora_B[adapter].weight.detach().clone() * gates[i, j].to(layer.lora_B[adapter].weight.dtype)
            lora_weights[name] = (a, b)
        head_states: dict[str, tuple[dict, dict]] = {}
        for head in search.heads:
            wrapper = base_model.get_submodule(head)
            trained = {k: v.detach().clone() for k, v in wrapper.modules_to_save[adapter].state_dict().items()}
            original = {k: v.detach().clone() for k, v in wrapper.original_module.state_dict().items()}
            head_states[head] = (trained, original)

    search._hooks.remove()
    plain_model = search.model.unload()  # removes every LoRA layer; heads are plain modules again
    search.exported = True

    config = lora_config_for(
        selection,
        rank=search.config.rank,
        alpha=search.config.alpha,
        dropout=search.config.dropout,
        modules_to_save=search.heads,
        task_type=infer_task_type(search.model_class),
        fan_in_fan_out=search.fan_in_fan_out,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(search.config.seed + 1)
        exported = get_peft_model(plain_model, config, adapter_name=adapter)

    with torch.no_grad():
        new_base = exported.get_base_model()
        for head, (trained, original) in head_states.items():
            wrapper = new_base.get_submodule(head)
            wrapper.original_module.load_state_dict(original)
            wrapper.modules_to_save[adapter].load_state_dict(trained if weight_sharing else original)
        if weight_sharing:
            for name, (a, b) in lora_weights.items():
                layer = new_base.get_submodule(name)
                layer.lora_A[adapter].weight.copy_(a)
                layer.lora_B[adapter].weight.copy_(b)
    return exported


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
