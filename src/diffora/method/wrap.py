"""The LoRA the search gates: injected into a plain model at the config's rank, or the caller's own PeftModel."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..errors import ConfigError
from .candidates import DAMGrid, detect_task_heads, find_adapter_candidates, find_candidates, uses_conv1d
from .config import DiffoRAConfig


@dataclass
class Wrapped:
    """A PeftModel with LoRA on every candidate, and what the search needs to know about it."""

    model: PeftModel
    config: DiffoRAConfig  # with the LoRA shape the model really has
    grid: DAMGrid
    model_class: str
    heads: list[str]
    fan_in_fan_out: bool


def inject_lora(model: nn.Module, config: DiffoRAConfig, adapter_name: str) -> Wrapped:
    """LoRA of ``config``'s rank on every candidate of a plain model (modified in place)."""
    grid = find_candidates(model, config.target_types, config.target_modules)
    heads = list(config.modules_to_save) if config.modules_to_save is not None else detect_task_heads(model)
    fan_in_fan_out = uses_conv1d(model, grid.module_names())
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=grid.module_names(),
        modules_to_save=heads or None,
        fan_in_fan_out=fan_in_fan_out,
    )
    model_class = type(model).__name__
    # seed LoRA's random A init without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    return Wrapped(peft_model, config, grid, model_class, heads, fan_in_fan_out)


def attach_lora(model: PeftModel, config: DiffoRAConfig, adapter_name: str) -> Wrapped:
    """The caller's PeftModel as it is: the candidates are the modules its adapter sits on, and its LoraConfig's
    r / alpha / dropout (and rsLoRA, DoRA, init) are the search's. Nothing is copied."""
    if adapter_name not in model.peft_config:
        raise ConfigError(
            f"the PeftModel has no adapter named '{adapter_name}' (it has {', '.join(model.peft_config)})"
        )
    lora = model.peft_config[adapter_name]
    if not isinstance(lora, LoraConfig):
        raise ConfigError(f"adapter '{adapter_name}' is a {type(lora).__name__}; DiffoRA searches LoRA")
    if lora.rank_pattern or lora.alpha_pattern:
        raise ConfigError(
            "the LoraConfig has a rank_pattern/alpha_pattern: DiffoRA needs one rank r for all "
            "candidates to compare them"
        )
    if config.target_types is not None or config.target_modules is not None:
        raise ConfigError(
            "with a PeftModel the LoraConfig's target_modules decide the candidates: leave "
            "DiffoRAConfig.target_types / target_modules unset"
        )
    config = dataclasses.replace(
        config, rank=int(lora.r), alpha=float(lora.lora_alpha), dropout=float(lora.lora_dropout)
    )
    base = model.get_base_model()
    return Wrapped(
        model,
        config,
        find_adapter_candidates(base, adapter_name),
        type(base).__name__,
        list(lora.modules_to_save or []),
        bool(lora.fan_in_fan_out),
    )
