"""Configuration of a DiffoRA search.

Every field documents whether its default is the paper's (DiffoRA, arXiv 2502.08905 — only the abstract is
available, so few constants are) or ours. Ours are chosen from the measurements in ``BENCHMARKS.md`` where they
exist, otherwise from the cited prior work (DARTS, FairDARTS, AutoLoRA).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Literal, NamedTuple, Optional, Union

from ..errors import ConfigError
from ..select.quota import GRANULARITIES
from ..select.strategies import NTK_KERNELS, NTK_NORMALIZATIONS, SCORE_NORMALIZATIONS, get_strategy, strategy_names

GateForm = Literal["sigmoid2", "sigmoid", "softmax"]
SearchOrder = Literal["first", "second"]

GATE_FORMS = ("sigmoid2", "sigmoid", "softmax")
GATE_DECAYS = ("decoupled", "coupled")
SEARCH_ORDERS = ("first", "second")
RANK_ALLOCATIONS = ("none", "uniform", "proportional")
HANDOFFS = ("restart", "continue")
SEARCH_LEVELS = ("bi", "single")


def __getattr__(name: str) -> Any:
    # SELECTION_SCORES is the strategy registry's names, read when asked for: the registry loads its strategies
    # (and torch) on first use, and importing this module must not
    if name == "SELECTION_SCORES":
        return strategy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ options' types
# One type checker for every options dataclass (DiffoRAConfig, FinetuneOptions, the CLI's Options, CompareOptions)
# and for config-file values: a config file or a library caller can pass anything, and a wrong type must be a
# one-line ConfigError naming the option, never a TypeError from deep inside a run.


class Kind(NamedTuple):
    """What a field holds: its element type (bool, int, float or str), whether it is a list, whether None is allowed."""

    type: type
    is_list: bool
    optional: bool

    def describe(self) -> str:
        if self.is_list:
            return "a list of " + _PLURAL_WORDS.get(self.type, self.type.__name__)
        return _KIND_WORDS.get(self.type, self.type.__name__)


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL_WORDS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


@functools.lru_cache(maxsize=None)
def field_kinds(cls: type) -> dict[str, Kind]:
    """name -> :class:`Kind` of every field of the dataclass ``cls`` (``Literal[...]`` fields hold strings)."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) is Union and len(args) == 1
        if optional:
            hint = args[0]
        is_list = typing.get_origin(hint) is list
        if is_list:
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is Literal:
            hint = type(typing.get_args(hint)[0])
        kinds[name] = Kind(hint, is_list, optional)
    return kinds


def flag_of(cls: type, name: str) -> str:
    """The command-line name of a field (``metadata["flag"]`` where the CLI spells it differently), underscored."""
    return next(f.metadata.get("flag", f.name) for f in fields(cls) if f.name == name)


_FLAG_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar("diffora_flag_names", default=False)


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Inside, errors name options by their command-line flags (``--lora-dropout``), not their fields (``dropout``):
    the CLI validates the library's dataclasses with the names its users typed."""
    token = _FLAG_NAMES.set(True)
    try:
        yield
    finally:
        _FLAG_NAMES.reset(token)


def option_name(cls: type, name: str) -> str:
    """How an error names field ``name`` of ``cls``: the field name, or its flag inside :func:`flag_names`."""
    return "--" + flag_of(cls, name).replace("_", "-") if _FLAG_NAMES.get() else name


def check_value(value: Any, kind: Kind, label: str) -> Any:
    """``value`` checked against ``kind`` and normalised (a path becomes a string, a tuple or a single item a list);
    numbers must be finite. Anything else is a one-line :class:`ConfigError` naming ``label``."""
    if value is None and kind.optional:
        return None
    if kind.is_list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
    else:
        items = [value]
    checked = []
    for item in items:
        if kind.type is str and isinstance(item, os.PathLike):  # paths may be given as pathlib.Path
            item = os.fspath(item)
        ok = isinstance(item, kind.type) and (kind.type is bool or not isinstance(item, bool))
        if kind.type is float and isinstance(item, int) and not isinstance(item, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{label} must be {kind.describe()}, got {item!r}")
        if kind.type is float and not math.isfinite(item):
            raise ConfigError(f"{label} must be a finite number, got {item!r}")
        checked.append(item)
    return checked if kind.is_list else checked[0]


def check_types(obj: Any, label: Optional[Callable[[str], str]] = None) -> None:
    """Check (and normalise in place) every field of the dataclass instance ``obj`` with :func:`check_value`;
    ``label`` names a field in messages (default: :func:`option_name`)."""
    cls = type(obj)
    for name, kind in field_kinds(cls).items():
        value = getattr(obj, name)
        checked = check_value(value, kind, label(name) if label else option_name(cls, name))
        if checked is not value:
            setattr(obj, name, checked)


def convert_value(value: Any, kind: Kind) -> Any:
    """A config-file value converted the way argparse converts a flag's text (YAML reads ``1e-3`` as a string, JSON
    may quote numbers); ``ValueError`` when it cannot be. :func:`check_value` checks the result."""

    def one(item: Any) -> Any:
        if isinstance(item, bool):
            if kind.type is bool:
                return item
            raise ValueError(item)
        if item is None or isinstance(item, (list, dict)) or kind.type is bool:
            raise ValueError(item)
        if kind.type is str:
            if isinstance(item, (str, int, float)):
                return str(item)
            raise ValueError(item)
        if kind.type is int and isinstance(item, float):
            if item.is_integer():
                return int(item)
            raise ValueError(item)
        try:
            return kind.type(item)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(item) from None

    if value is None:
        if kind.optional:
            return None
        raise ValueError(value)
    if kind.is_list:
        return [one(v) for v in value] if isinstance(value, list) else [one(value)]
    return one(value)


@dataclass
class DiffoRAConfig:
    """All knobs of the DAM search, discretisation and export.

    The relaxed model computes, for every candidate module ``(l, m)`` of the grid,
    ``W[l,m] x + g[l,m] · (alpha / rank) · B[l,m] A[l,m] x`` with a gate ``g = gate(beta)``.
    """

    # --- LoRA branch (shared by the search and the exported adapter) ---
    rank: int = field(default=8, metadata={"help": "LoRA rank r of every candidate branch."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the branch is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"flag": "lora_dropout", "help": "LoRA dropout on the branch input."})

    # --- which modules are candidates ---
    target_types: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Module types (paths inside a transformer block, or their suffixes, e.g. 'query' or "
            "'mlp.down_proj') that form the DAM columns. Default: the built-in preset for the architecture."
        },
    )
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Exact full module names to use as candidates instead of types."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Task-head modules trained in full and saved with the adapter. Default: detected."},
    )

    # --- relaxed gates ---
    gate: GateForm = field(
        default="sigmoid2",
        metadata={
            "help": "Gate relaxation (ours: 'sigmoid2'): 'sigmoid2' = independent 2*sigmoid(beta/T) per entry, 1 at "
            "beta = 0, so the search starts as LoRA on every candidate; 'sigmoid' = sigmoid(beta/T) (FairDARTS-style; "
            "starts at 0.5, every branch at half strength); 'softmax' = M * softmax(beta_l / T) over each layer's "
            "row (DARTS-style, mean gate 1 per row)."
        },
    )
    gate_init: float = field(default=0.0, metadata={"help": "Initial value of every beta."})
    temperature: float = field(default=1.0, metadata={"help": "Gate temperature T (beta is divided by T)."})

    # --- bi-level search ---
    order: SearchOrder = field(
        default="first",
        metadata={
            "help": "'first' = alternating first-order updates; 'second' = DARTS unrolled (finite-difference HVP)."
        },
    )
    search_levels: str = field(
        default="bi",
        metadata={
            "help": "'bi' = bi-level (the paper's): weight steps on the weight split alternate with gate steps on the "
            "held-out gate split, two forward/backward passes per search step; 'single' = single-level (ours): one "
            "backward on a weight batch steps LoRA, head and gates together, so a search step costs a LoRA step "
            "(the gate split then only scores the held-out check, on a few batches at the warm-up's end and the "
            "search's end)."
        },
    )
    gate_fraction: float = field(
        default=0.3,
        metadata={"help": "Fraction of the training data held out for gate steps (the rest trains weights)."},
    )
    weight_lr: float = field(
        default=5e-4,
        metadata={
            "flag": "search_lr",
            "help": "AdamW learning rate of LoRA A/B and the head; default = the fine-tune's default LR.",
        },
    )
    weight_decay: float = field(
        default=0.0, metadata={"flag": "search_weight_decay", "help": "AdamW weight decay of LoRA A/B and the head."}
    )
    gate_lr: float = field(default=5e-2, metadata={"help": "Adam learning rate of the gate parameters beta."})
    gate_weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "Weight decay of beta (ours: none; DARTS: 1e-3 coupled). The gate gradients are 1e-7 .. 1e-4, "
            "so any decay of that size, not the gate loss, decides where beta settles."
        },
    )
    gate_decay: str = field(
        default="decoupled",
        metadata={"help": "'decoupled' (AdamW) or 'coupled' (Adam's L2, DARTS) weight decay of beta."},
    )
    gate_warmup_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Weight-only steps before the first gate step; None (default) = gate_warmup_fraction of the "
            "search. LoRA B starts at zero, so gate gradients are exactly zero until B has grown."
        },
    )
    gate_warmup_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Weight-only fraction of the search before the first gate step (ours), when gate_warmup_steps is "
            "None; scales with the data, and a search of any length keeps at least one gate step."
        },
    )
    zero_one_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of FairDARTS' zero-one loss -mean((g - 0.5)^2) that pushes sigmoid gates apart."},
    )
    unroll_lr: Optional[float] = field(
        default=None, metadata={"help": "Virtual SGD step xi of the second-order search. Default: weight_lr."}
    )
    max_grad_norm: Optional[float] = field(
        default=1.0, metadata={"flag": "search_max_grad_norm", "help": "Gradient clipping of weight steps."}
    )

    # --- discretisation ---
    keep_ratio: float = field(
        default=0.5, metadata={"help": "Fraction rho of the DAM kept (of entries or of parameters)."}
    )
    selection_score: str = field(
        default="gate",
        metadata={
            "help": "The selection strategy (diffora.select.strategies): 'gate' = the learned gate value (DARTS: "
            "keep the largest; the default: with identity gates every entry starts at g0 = 1, so this ranks like "
            "'signed', and 'movement' would also keep the modules the gate loss pushed DOWN, tests/test_signal.py); "
            "'movement' = how far each gate moved from its initial value, in either direction "
            "(ours: a module whose gate the held-out loss pushed hard matters, whichever way the early search pushed "
            "it); 'signed' = how far it moved up (g - g0: a module the held-out loss wants more of); 'taylor' = the "
            "mean over gate steps of -g * dL_gate/dg, the first-order estimate of how much the gate-split loss "
            "would rise if the module's branch were removed (ours; magnitudes, not Adam's sign-driven movement; "
            "not with softmax gates); 'ntk' = no gate ranking: choose the set that maximises lambda_min of the "
            "LoRA kernel H(S) (the paper's convergence argument made operational, ours), computed on gate-split "
            "examples; 'random' = a seeded random ranking (a control; needs no search)."
        },
    )
    rank_allocation: str = field(
        default="none",
        metadata={
            "help": "Budget concentration (ours): 'none' = every kept module keeps rank r; 'uniform' / "
            "'proportional' = the kept modules share the LoRA parameters of ALL candidates at rank r, equally or "
            "in proportion to their selection scores (exported as a stock PEFT rank_pattern)."
        },
    )
    granularity: str = field(
        default="layer",
        metadata={
            "help": "The quota the ranking is spent through: 'layer' = top ceil(rho*M) of each layer; 'type' = "
            "within-type ranking, top ceil(rho*L) of each module type (every type keeps the same fraction of its "
            "layers; the ranking only picks the layers); 'global' = top ceil(rho*L*M) overall; 'budget' = "
            "best-scoring entries first until rho of all candidate LoRA parameters are spent."
        },
    )
    score_normalization: str = field(
        default="none",
        metadata={
            "help": "'none' = rank the scores as they are; 'per_type' = z-score each module type's scores across "
            "layers first (ours), so a type whose gates all move a lot does not win every layer."
        },
    )
    ntk_kernel: str = field(
        default="loss_grad",
        metadata={
            "help": "The NTK of the 'ntk' strategy and of the lambda_min diagnostic: 'loss_grad' = gradients of "
            "each example's loss; 'output_jacobian' = gradients of the model's outputs (logits), summed over "
            "output dimensions (the classic empirical NTK; independent of how well the model already fits)."
        },
    )
    ntk_normalization: str = field(
        default="none",
        metadata={
            "help": "Per-module normalisation of the NTK (ours): 'none'; 'trace' = every module's kernel scaled "
            "to trace 1; 'params' = divided by the module's LoRA parameters per rank (d_in + d_out). Without one, "
            "lambda_min favours the large FFN kernels."
        },
    )
    ntk_ungated: bool = field(
        default=True,
        metadata={
            "help": "Compute the NTK with every gate forced to 1 (the LoRA modules as the export trains them); "
            "False = on the gated search model, where each module's kernel is scaled by g^2."
        },
    )

    # --- export ---
    weight_sharing: bool = field(
        default=True,
        metadata={
            "help": "Kept modules inherit the search's LoRA weights (gate folded into B) and the trained head; "
            "False re-initialises both (PEFT's LoRA init, the head as before the search)."
        },
    )
    handoff: str = field(
        default="restart",
        metadata={
            "help": "How fine-tuning follows the search (ours): 'restart' = a separate fine-tune with its own LR "
            "schedule and a fresh AdamW; 'continue' = the search is the first phase of fine-tuning: its weight steps "
            "use the fine-tune's LR schedule, weight decay and clipping (--lr, not --search-lr), the kept modules "
            "then continue with their AdamW state, and search + fine-tune take exactly the optimiser steps of a "
            "LoRA-all fine-tune (needs weight_sharing and no rank_allocation)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed (gate split, LoRA init, data order)."})

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        check_types(self)  # wrong types are ConfigErrors too, not TypeErrors from the comparisons below
        n = functools.partial(option_name, DiffoRAConfig)
        need(self.rank > 0, f"{n('rank')} must be a positive integer, got {self.rank!r}")
        need(self.alpha > 0, f"{n('alpha')} must be > 0, got {self.alpha!r}")
        need(0.0 <= self.dropout < 1.0, f"{n('dropout')} must be in [0, 1), got {self.dropout!r}")
        need(
            isinstance(self.gate, str) and self.gate in GATE_FORMS,
            f"{n('gate')} must be one of {GATE_FORMS}, got {self.gate!r}",
        )
        need(self.temperature > 0, f"{n('temperature')} must be > 0, got {self.temperature!r}")
        need(
            isinstance(self.order, str) and self.order in SEARCH_ORDERS,
            f"{n('order')} must be one of {SEARCH_ORDERS}, got {self.order!r}",
        )
        need(
            isinstance(self.search_levels, str) and self.search_levels in SEARCH_LEVELS,
            f"{n('search_levels')} must be one of {SEARCH_LEVELS}, got {self.search_levels!r}",
        )
        need(
            not (self.search_levels == "single" and self.order == "second"),
            f"{n('order')} second unrolls the weight step inside the gate step of a bi-level search; "
            f"{n('search_levels')} single has no inner problem to unroll (use {n('order')} first)",
        )
        need(0.0 < self.gate_fraction < 1.0, f"{n('gate_fraction')} must be in (0, 1), got {self.gate_fraction!r}")
        need(self.weight_lr > 0, f"{n('weight_lr')} must be > 0, got {self.weight_lr!r}")
        need(self.gate_lr > 0, f"{n('gate_lr')} must be > 0, got {self.gate_lr!r}")
        need(self.weight_decay >= 0, f"{n('weight_decay')} must be >= 0, got {self.weight_decay!r}")
        need(self.gate_weight_decay >= 0, f"{n('gate_weight_decay')} must be >= 0, got {self.gate_weight_decay!r}")
        need(
            self.gate_warmup_steps is None or self.gate_warmup_steps >= 0,
            f"{n('gate_warmup_steps')} must be an integer >= 0 or None, got {self.gate_warmup_steps!r}",
        )
        need(
            0.0 <= self.gate_warmup_fraction < 1.0,
            f"{n('gate_warmup_fraction')} must be in [0, 1), got {self.gate_warmup_fraction!r}",
        )
        need(
            isinstance(self.gate_decay, str) and self.gate_decay in GATE_DECAYS,
            f"{n('gate_decay')} must be one of {GATE_DECAYS}, got {self.gate_decay!r}",
        )
        need(self.zero_one_weight >= 0, f"{n('zero_one_weight')} must be >= 0, got {self.zero_one_weight!r}")
        need(self.unroll_lr is None or self.unroll_lr > 0, f"{n('unroll_lr')} must be > 0, got {self.unroll_lr!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, f"{n('max_grad_norm')} must be > 0 or None")
        need(
            0.0 < self.keep_ratio <= 1.0,
            f"{n('keep_ratio')} must be in (0, 1] (the fraction of modules to keep), got {self.keep_ratio!r}",
        )
        names = strategy_names()
        need(
            isinstance(self.selection_score, str) and self.selection_score in names,
            f"{n('selection_score')} must be one of {names}, got {self.selection_score!r}",
        )
        get_strategy(self.selection_score).check_config(self, n("selection_score"))
        need(
            isinstance(self.rank_allocation, str) and self.rank_allocation in RANK_ALLOCATIONS,
            f"{n('rank_allocation')} must be one of {RANK_ALLOCATIONS}, got {self.rank_allocation!r}",
        )
        need(
            isinstance(self.granularity, str) and self.granularity in GRANULARITIES,
            f"{n('granularity')} must be one of {GRANULARITIES}, got {self.granularity!r}",
        )
        for name, allowed in (
            ("score_normalization", SCORE_NORMALIZATIONS),
            ("ntk_kernel", NTK_KERNELS),
            ("ntk_normalization", NTK_NORMALIZATIONS),
        ):
            value = getattr(self, name)
            need(isinstance(value, str) and value in allowed, f"{n(name)} must be one of {allowed}, got {value!r}")
        need(
            isinstance(self.handoff, str) and self.handoff in HANDOFFS,
            f"{n('handoff')} must be one of {HANDOFFS}, got {self.handoff!r}",
        )
        if self.handoff == "continue":  # the kept branches carry the search's weights and AdamW moments as they are
            need(
                self.weight_sharing,
                f"{n('handoff')} continue needs {n('weight_sharing')}: the kept modules continue "
                "from the search's weights",
            )
            need(
                self.rank_allocation == "none",
                f"{n('handoff')} continue needs {n('rank_allocation')} none: a "
                "module whose rank changes has no optimiser state to continue with",
            )
        need(
            not (self.target_types and self.target_modules),
            f"pass either {n('target_types')} or {n('target_modules')}, not both",
        )
        for name in ("target_types", "target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                need(
                    isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value),
                    f"{n(name)} must be a list of non-empty strings, got {value!r}",
                )
                need(
                    len(value) > 0 or name == "modules_to_save",
                    f"{n(name)} must not be empty; leave it unset for the default",
                )
                setattr(self, name, list(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffoRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown DiffoRAConfig option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class FinetuneOptions:
    """Fine-tuning of the exported LoRA (:func:`diffora.train.finetune`). It lives here, beside
    :class:`DiffoRAConfig`, so that the options import without torch (the CLI's ``--help`` reads them)."""

    epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    lr: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Fraction of steps with linear warm-up."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end of each epoch)."})
    keep_best: bool = field(
        default=False,
        metadata={
            "help": "Restore the checkpoint with the best eval metric (selects on the eval set: off by default)."
        },
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimiser step (the loss of each is divided by this)."}
    )

    def __post_init__(self) -> None:
        check_types(self)
        n = functools.partial(option_name, FinetuneOptions)
        if not self.epochs > 0:
            raise ConfigError(f"{n('epochs')} must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"{n('lr')} must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{n('weight_decay')} must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{n('warmup_ratio')} must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"{n('max_grad_norm')} must be > 0, got {self.max_grad_norm}")
        if self.eval_every < 0:
            raise ConfigError(f"{n('eval_every')} must be >= 0, got {self.eval_every}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(
                f"{n('gradient_accumulation_steps')} must be at least 1, got {self.gradient_accumulation_steps}"
            )
