"""Step 1 of the pipeline: find the candidate modules and arrange them as the DAM grid.

A transformer is a stack of repeated blocks (``bert.encoder.layer.<i>``, ``model.layers.<i>``,
``transformer.h.<i>``…). Inside every block the same projections recur; each is a *module type*, named by its
path inside the block (``attention.self.query``, ``mlp.down_proj``…). The Differential Adaptation Matrix has one
row per block and one column per module type::

                 query  key  value  attn.out  ffn.in  ffn.out
    layer 0    [  g00   g01   g02     g03      g04     g05  ]
    layer 1    [  ...                                       ]

Only linear maps inside the blocks are candidates (``nn.Linear`` and GPT-2's ``transformers.Conv1D``); task heads
and ``lm_head`` live outside the blocks and never are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from torch import nn

from ..errors import ModelError

try:  # transformers' GPT-2 style linear layer (weight stored transposed)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


@dataclass(frozen=True)
class Preset:
    """Module types of one architecture family, in column order, with short column labels."""

    family: str
    types: tuple[str, ...]
    labels: tuple[str, ...]


# Checked against the module names of transformers 5.x. The first preset whose types all occur in the blocks wins,
# so the presets are recognised by structure, not by ``model_type`` (RoBERTa, ELECTRA, XLM-R share BERT's names).
PRESETS: tuple[Preset, ...] = (
    Preset(
        "bert",
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        ("query", "key", "value", "attn.out", "ffn.in", "ffn.out"),
    ),
    Preset(
        "deberta-v2",
        (
            "attention.self.query_proj",
            "attention.self.key_proj",
            "attention.self.value_proj",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        ("query", "key", "value", "attn.out", "ffn.in", "ffn.out"),
    ),
    Preset(
        "llama",
        (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ),
        ("q", "k", "v", "o", "gate", "up", "down"),
    ),
    Preset(
        "gpt2",
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),
    ),
    Preset(
        "vit",
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
        ("query", "key", "value", "attn.out", "ffn.in", "ffn.out"),
    ),
    Preset(  # ViT as written by transformers 4.x
        "vit-v4",
        (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        ("query", "key", "value", "attn.out", "ffn.in", "ffn.out"),
    ),
    Preset(
        "distilbert",
        ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"),
        ("query", "key", "value", "attn.out", "ffn.in", "ffn.out"),
    ),
)


@dataclass
class DAMGrid:
    """The candidate modules as a ``layers × types`` grid of full module names (``None`` where a block lacks a type).

    ``param_costs[l][m]`` is the number of LoRA parameters per unit of rank, ``in + out`` features, so a branch of
    rank r costs ``r * param_costs[l][m]``.
    """

    layers: list[str]
    types: list[str]
    labels: list[str]
    names: list[list[Optional[str]]]
    param_costs: list[list[int]]
    family: str = "custom"
    _index: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {
            name: (i, j) for i, row in enumerate(self.names) for j, name in enumerate(row) if name is not None
        }

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.layers), len(self.types)

    def module_names(self) -> list[str]:
        """All candidate names in row-major order."""
        return [name for row in self.names for name in row if name is not None]

    def position(self, module_name: str) -> tuple[int, int]:
        return self._index[module_name]

    def valid_mask(self) -> list[list[bool]]:
        return [[name is not None for name in row] for row in self.names]

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "layers": self.layers,
            "types": self.types,
            "labels": self.labels,
            "names": self.names,
            "param_costs": self.param_costs,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DAMGrid":
        return cls(
            layers=list(data["layers"]),
            types=list(data["types"]),
            labels=list(data["labels"]),
            names=[list(row) for row in data["names"]],
            param_costs=[list(row) for row in data["param_costs"]],
            family=data.get("family", "custom"),
        )


def uses_conv1d(model: nn.Module, module_names: Iterable[str]) -> bool:
    """Whether any of the named modules stores its weight transposed (GPT-2's ``Conv1D``): PEFT's LoRA then needs
    ``fan_in_fan_out=True``."""
    return any(
        isinstance(model.get_submodule(n), LINEAR_TYPES) and not isinstance(model.get_submodule(n), nn.Linear)
        for n in module_names
    )


def _lora_cost(module: nn.Module) -> int:
    """in_features + out_features of a linear map (Conv1D stores its weight as ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features + module.out_features
    rows, cols = module.weight.shape  # Conv1D
    return int(rows + cols)


def find_block_stacks(model: nn.Module) -> list[str]:
    """Full names of the outermost ``nn.ModuleList``s of repeated blocks that contain linear maps."""
    stacks: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(s + ".") for s in stacks):
            continue  # nested list (e.g. MoE experts) inside a block already found
        children = list(module)
        same_class = all(type(c) is type(children[0]) for c in children)
        has_linear = any(isinstance(m, LINEAR_TYPES) for m in children[0].modules())
        if same_class and has_linear:
            stacks.append(name)
    return stacks


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks: list[tuple[str, nn.Module]] = []
    for stack in find_block_stacks(model):
        module_list = model.get_submodule(stack)
        blocks.extend((f"{stack}.{i}" if stack else str(i), block) for i, block in enumerate(module_list))
    return blocks


def _linear_types_in_blocks(blocks: Sequence[tuple[str, nn.Module]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, block in blocks:
        for rel, module in block.named_modules():
            if rel and isinstance(module, LINEAR_TYPES):
                seen.setdefault(rel, None)
    return list(seen)


def _matches(rel: str, pattern: str) -> bool:
    return rel == pattern or rel.endswith("." + pattern)


def _head_like(name: str, model: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and model.get_submodule(name) is out:
        return True
    return name.split(".")[-1] in {"lm_head", "classifier", "score", "qa_outputs"}


def find_candidates(
    model: nn.Module,
    target_types: Optional[Sequence[str]] = None,
    target_modules: Optional[Sequence[str]] = None,
) -> DAMGrid:
    """Build the DAM grid of ``model``.

    Args:
        model: any Hugging Face transformer (or a model containing ``nn.ModuleList``s of repeated blocks).
        target_types: module types as paths inside a block or suffixes of them (``"query"``, ``"mlp.c_proj"``).
            Default: the first built-in preset whose types all exist, else every linear map in the blocks.
        target_modules: exact full module names instead of types.

    Raises:
        ModelError: nothing matches; the message lists the module types the model does contain.
    """
    blocks = _blocks(model)
    if not blocks:
        raise ModelError(
            f"{type(model).__name__} has no stack of repeated transformer blocks (nn.ModuleList) with linear layers; "
            "diffora needs one to build the DAM grid"
        )
    available = _linear_types_in_blocks(blocks)
    family = "custom"
    labels: Optional[list[str]] = None

    if target_modules is not None:
        wanted = list(dict.fromkeys(target_modules))
        rel_of: dict[str, tuple[int, str]] = {}
        block_names = [b for b, _ in blocks]
        all_names = {n for n, _ in model.named_modules()}
        for full in wanted:
            owner = next((i for i, b in enumerate(block_names) if full.startswith(b + ".")), None)
            if owner is None or full not in all_names:
                if full in all_names:
                    hint = "it is not inside a repeated transformer block (heads and embeddings are never candidates)"
                else:
                    hint = "no module has that name"
                raise ModelError(
                    f"target module '{full}' cannot be a DAM candidate: {hint}; candidates look like "
                    f"'{block_names[0]}.{available[0]}'"
                )
            rel = full[len(block_names[owner]) + 1 :]
            if not isinstance(model.get_submodule(full), LINEAR_TYPES):
                raise ModelError(f"target module '{full}' is not a linear layer (nn.Linear or Conv1D)")
            rel_of[full] = (owner, rel)
        types = list(dict.fromkeys(rel for _, rel in rel_of.values()))
        rows = sorted({owner for owner, _ in rel_of.values()})
        chosen = set(wanted)
    else:
        if target_types is None:
            preset = next((p for p in PRESETS if all(t in available for t in p.types)), None)
            if preset is not None:
                types, labels, family = list(preset.types), list(preset.labels), preset.family
            else:
                types = available
        else:
            types = []
            for pattern in target_types:
                hits = [rel for rel in available if _matches(rel, pattern)]
                if not hits:
                    raise ModelError(
                        f"target type '{pattern}' matches no linear layer inside the transformer blocks; "
                        f"the blocks contain: {', '.join(available)}"
                    )
                types.extend(h for h in hits if h not in types)
        if not types:
            raise ModelError(
                f"no candidate modules found; the blocks contain: {', '.join(available) or 'no linear layers'}"
            )
        rows = list(range(len(blocks)))
        chosen = None

    names: list[list[Optional[str]]] = []
    costs: list[list[int]] = []
    for i in rows:
        block_name, block = blocks[i]
        row_names: list[Optional[str]] = []
        row_costs: list[int] = []
        for rel in types:
            full = f"{block_name}.{rel}"
            try:
                module = block.get_submodule(rel)
            except AttributeError:
                module = None
            if module is None or not isinstance(module, LINEAR_TYPES) or (chosen is not None and full not in chosen):
                row_names.append(None)
                row_costs.append(0)
            else:
                if _head_like(full, model):
                    raise ModelError(f"'{full}' is a task/LM head and cannot be a LoRA candidate")
                row_names.append(full)
                row_costs.append(_lora_cost(module))
        names.append(row_names)
        costs.append(row_costs)

    if labels is None:
        labels = _short_labels(types)
    return DAMGrid(
        layers=[blocks[i][0] for i in rows], types=types, labels=labels, names=names, param_costs=costs, family=family
    )


def _short_labels(types: Sequence[str]) -> list[str]:
    """The shortest dotted suffix of each type that is still unique among the types."""
    labels = []
    for t in types:
        parts = t.split(".")
        for k in range(1, len(parts) + 1):
            candidate = ".".join(parts[-k:])
            if sum(1 for other in types if other == candidate or other.endswith("." + candidate)) == 1:
                labels.append(candidate)
                break
        else:
            labels.append(t)
    return labels


def detect_task_heads(model: nn.Module) -> list[str]:
    """Top-level modules with parameters that are neither the backbone nor the (tied) output embeddings.

    These are the randomly initialised task heads (``classifier``, ``score``, DeBERTa's ``pooler``…) that must be
    trained in full and saved with the adapter (``modules_to_save``); otherwise PEFT re-initialises them on load.
    """
    backbone = getattr(model, "base_model_prefix", None)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    stacks = find_block_stacks(model)
    heads = []
    for name, child in model.named_children():
        holds_blocks = any(s == name or s.startswith(name + ".") for s in stacks)
        if name == backbone or child is out or holds_blocks:
            continue
        if any(True for _ in child.parameters()):
            heads.append(name)
    return heads


def describe_grid(grid: DAMGrid) -> str:
    rows, cols = grid.shape
    n = len(grid.module_names())
    return f"{rows} layers x {cols} types ({', '.join(grid.labels)}) = {n} candidate modules"


def ceil_count(ratio: float, total: int) -> int:
    """ceil(ratio * total), robust to float noise (0.5 * 6 must be 3, not 4)."""
    return max(1, min(total, math.ceil(round(ratio * total, 9))))


def iter_cells(grid: DAMGrid) -> Iterable[tuple[int, int, str]]:
    for i, row in enumerate(grid.names):
        for j, name in enumerate(row):
            if name is not None:
                yield i, j, name


def adapter_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """Full names (inside ``model``, e.g. ``peft_model.get_base_model()``) of the LoRA layers that carry
    ``adapter_name``, in module order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and adapter_name in module.lora_A
    }


def find_adapter_candidates(model: nn.Module, adapter_name: str = "default") -> DAMGrid:
    """The DAM grid of a model that already carries a LoRA adapter (``peft_model.get_base_model()``): the
    candidates are exactly the modules the user's ``LoraConfig`` put the adapter on, arranged as blocks x types.

    Raises:
        ModelError: no module carries the adapter, or one lies outside the repeated blocks (it could not be gated).
    """
    layers = adapter_layers(model, adapter_name)
    if not layers:
        raise ModelError(f"no module of {type(model).__name__} carries a LoRA adapter named '{adapter_name}'")
    blocks = _blocks(model)
    block_names = [b for b, _ in blocks]
    owner_of: dict[str, tuple[int, str]] = {}
    for full in layers:
        owner = next((i for i, b in enumerate(block_names) if full.startswith(b + ".")), None)
        if owner is None:
            raise ModelError(
                f"LoRA module '{full}' lies outside the repeated transformer blocks, so it has no DAM cell; "
                "leave it out of the LoraConfig (exclude_modules) or train it with modules_to_save"
            )
        owner_of[full] = (owner, full[len(block_names[owner]) + 1 :])
    types = list(dict.fromkeys(rel for _, rel in owner_of.values()))
    preset = next((p for p in PRESETS if set(p.types) == set(types)), None)
    family, labels = "custom", None
    if preset is not None:
        types, labels, family = list(preset.types), list(preset.labels), preset.family
    rows = sorted({owner for owner, _ in owner_of.values()})
    cell = {(owner, rel): full for full, (owner, rel) in owner_of.items()}
    names: list[list[Optional[str]]] = []
    costs: list[list[int]] = []
    for i in rows:
        names.append([cell.get((i, rel)) for rel in types])
        costs.append([_lora_cost(layers[n].get_base_layer()) if n is not None else 0 for n in names[-1]])
    return DAMGrid(
        layers=[block_names[i] for i in rows],
        types=types,
        labels=labels or _short_labels(types),
        names=names,
        param_costs=costs,
        family=family,
    )
