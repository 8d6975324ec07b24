"""Configuration of a DiffoRA search.

Every field documents whether its default is the paper's (DiffoRA, arXiv 2502.08905 — only the abstract is
available, so few constants are) or ours. Ours are chosen from the measurements in ``BENCHMARKS.md`` where they
exist, otherwise from the cited prior work (DARTS, FairDARTS, AutoLoRA).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional

from ..errors import ConfigError

GateForm = Literal["sigmoid", "softmax"]
Granularity = Literal["layer", "global", "budget"]
SearchOrder = Literal["first", "second"]
SelectionScore = Literal["gate", "movement", "signed", "taylor", "ntk"]

GATE_FORMS = ("sigmoid", "softmax")
GRANULARITIES = ("layer", "global", "budget")
SEARCH_ORDERS = ("first", "second")
SELECTION_SCORES = ("gate", "movement", "signed", "taylor", "ntk")
RANK_ALLOCATIONS = ("none", "uniform", "proportional")


_NUMBER_FIELDS = (
    "alpha", "dropout", "gate_init", "temperature", "gate_fraction", "weight_lr", "weight_decay", "gate_lr",
    "gate_weight_decay", "zero_one_weight", "unroll_lr", "max_grad_norm", "keep_ratio",
)
_OPTIONAL_FIELDS = ("unroll_lr", "max_grad_norm")


@dataclass
class DiffoRAConfig:
    """All knobs of the DAM search, discretisation and export.

    The relaxed model computes, for every candidate module ``(l, m)`` of the grid,
    ``W[l,m] x + g[l,m] · (alpha / rank) · B[l,m] A[l,m] x`` with a gate ``g = gate(beta)``.
    """

    # --- LoRA branch (shared by the search and the exported adapter) ---
    rank: int = field(default=8, metadata={"help": "LoRA rank r of every candidate branch."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the branch is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout on the branch input."})

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
        default="sigmoid",
        metadata={
            "help": "Gate relaxation: 'sigmoid' = independent sigmoid(beta/T) per entry (FairDARTS-style); "
            "'softmax' = M * softmax(beta_l / T) over each layer's row (DARTS-style, mean gate 1 per row)."
        },
    )
    gate_init: float = field(default=0.0, metadata={"help": "Initial value of every beta."})
    temperature: float = field(default=1.0, metadata={"help": "Gate temperature T (beta is divided by T)."})

    # --- bi-level search ---
    order: SearchOrder = field(
        default="first",
        metadata={"help": "'first' = alternating first-order updates; 'second' = DARTS unrolled (finite-difference HVP)."},
    )
    gate_fraction: float = field(
        default=0.3,
        metadata={"help": "Fraction of the training data held out for gate steps (the rest trains weights)."},
    )
    weight_lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of LoRA A/B and the head."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of LoRA A/B and the head."})
    gate_lr: float = field(default=5e-2, metadata={"help": "Adam learning rate of the gate parameters beta."})
    gate_weight_decay: float = field(default=1e-3, metadata={"help": "Weight decay of beta (DARTS: 1e-3)."})
    gate_warmup_steps: int = field(
        default=20,
        metadata={
            "help": "Weight-only steps before the first gate step. LoRA B starts at zero, so gate gradients are "
            "exactly zero until B has grown."
        },
    )
    zero_one_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of FairDARTS' zero-one loss -mean((g - 0.5)^2) that pushes sigmoid gates apart."},
    )
    unroll_lr: Optional[float] = field(
        default=None, metadata={"help": "Virtual SGD step xi of the second-order search. Default: weight_lr."}
    )
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Gradient clipping of weight steps."})

    # --- discretisation ---
    keep_ratio: float = field(default=0.5, metadata={"help": "Fraction rho of the DAM kept (of entries or of parameters)."})
    selection_score: SelectionScore = field(
        default="movement",
        metadata={
            "help": "What discretisation ranks: 'gate' = the learned gate value (DARTS: keep the largest); "
            "'movement' = how far each gate moved from its initial value, in either direction (ours: a module "
            "whose gate the held-out loss pushed hard matters, whichever way the early search pushed it); "
            "'signed' = how far it moved up (g - g0: a module the held-out loss wants more of); 'taylor' = the "
            "mean over gate steps of -g * dL_gate/dg, the first-order estimate of how much the gate-split loss "
            "would rise if the module's branch were removed (ours; magnitudes, not Adam's sign-driven movement; "
            "sigmoid gates only); 'ntk' = no "
            "gate ranking: choose the set that maximises lambda_min of the LoRA kernel H(S) (diffora.select.ntk; the "
            "paper's convergence argument made operational, ours), computed on gate-split examples."
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
    granularity: Granularity = field(
        default="layer",
        metadata={
            "help": "'layer' = top ceil(rho*M) of each layer; 'global' = top ceil(rho*L*M) overall; "
            "'budget' = best-scoring entries first until rho of all candidate LoRA parameters are spent."
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
    seed: int = field(default=0, metadata={"help": "Seed of the search (gate split, LoRA init, data order)."})

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        for name in _NUMBER_FIELDS:  # wrong types are ConfigErrors too, not TypeErrors from the comparisons below
            value = getattr(self, name)
            need(
                (value is None and name in _OPTIONAL_FIELDS) or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                f"{name} must be a number, got {value!r}",
            )
        for name in ("rank", "gate_warmup_steps", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        need(isinstance(self.weight_sharing, bool), f"weight_sharing must be true or false, got {self.weight_sharing!r}")
        need(self.rank > 0, f"rank must be a positive integer, got {self.rank!r}")
        need(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(isinstance(self.gate, str) and self.gate in GATE_FORMS, f"gate must be one of {GATE_FORMS}, got {self.gate!r}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature!r}")
        need(isinstance(self.order, str) and self.order in SEARCH_ORDERS, f"order must be one of {SEARCH_ORDERS}, got {self.order!r}")
        need(0.0 < self.gate_fraction < 1.0, f"gate_fraction must be in (0, 1), got {self.gate_fraction!r}")
        need(self.weight_lr > 0, f"weight_lr must be > 0, got {self.weight_lr!r}")
        need(self.gate_lr > 0, f"gate_lr must be > 0, got {self.gate_lr!r}")
        need(self.weight_decay >= 0 and self.gate_weight_decay >= 0, "weight decays must be >= 0")
        need(
            isinstance(self.gate_warmup_steps, int) and self.gate_warmup_steps >= 0,
            f"gate_warmup_steps must be an integer >= 0, got {self.gate_warmup_steps!r}",
        )
        need(self.zero_one_weight >= 0, f"zero_one_weight must be >= 0, got {self.zero_one_weight!r}")
        need(self.unroll_lr is None or self.unroll_lr > 0, f"unroll_lr must be > 0, got {self.unroll_lr!r}")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None")
        need(
            0.0 < self.keep_ratio <= 1.0,
            f"keep_ratio must be in (0, 1] (the fraction of modules to keep), got {self.keep_ratio!r}",
        )
        need(
            isinstance(self.selection_score, str) and self.selection_score in SELECTION_SCORES,
            f"selection_score must be one of {SELECTION_SCORES}, got {self.selection_score!r}",
        )
        need(not (self.selection_score == "taylor" and self.gate != "sigmoid"),
             "selection_score 'taylor' needs sigmoid gates (gate='sigmoid'); softmax gates couple a row's entries")
        need(
            isinstance(self.rank_allocation, str) and self.rank_allocation in RANK_ALLOCATIONS,
            f"rank_allocation must be one of {RANK_ALLOCATIONS}, got {self.rank_allocation!r}",
        )
        need(
            isinstance(self.granularity, str) and self.granularity in GRANULARITIES,
            f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}",
        )
        need(
            not (self.target_types and self.target_modules),
            "pass either target_types or target_modules, not both",
        )
        for name in ("target_types", "target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                need(
                    isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value),
                    f"{name} must be a list of non-empty strings, got {value!r}",
                )
                need(
                    len(value) > 0 or name == "modules_to_save",
                    f"{name} must not be empty; leave it unset for the default",
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
