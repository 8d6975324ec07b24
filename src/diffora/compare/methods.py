"""The methods ``diffora compare`` knows: one object per method family, in one registry (:data:`FAMILIES`), and how
``--methods`` entries such as ``diffora[keep_ratio=0.25]`` are parsed and checked.

A method is a *family* (``diffora``, ``lora-all``, …) plus optional *variant* options in brackets, comma-separated
``key=value`` pairs. The keys are the names of ``diffora run``'s options (``keep_ratio``, ``gate_fraction``,
``rank``…), with underscores or dashes, plus ``lr`` (the method's fine-tuning LR), EVA's ``eva_rho`` / ``eva_tau``
and the random controls' ``matched`` / ``within_type``. Each family accepts the keys that change what it does;
anything else is a one-line :class:`~diffora.errors.ConfigError` that lists the keys it takes.

A family object holds everything that differs between methods: its checks before any job (:meth:`Family.validate`),
whether it exports from a search or needs DiffoRA's kept set of the same seed (:meth:`Family.needs_search`,
:meth:`Family.attach`), the trainable model (:meth:`Family.build`), the fine-tune's length and hooks
(:meth:`Family.training_options`, :meth:`Family.during_finetune`) and its parameter accounting
(:meth:`Family.account`). The runner, the scheduler and the worker call these and never switch on a name.

**One α convention.** Every method's LoRA branch on module ``m`` is scaled ``alpha / r_m`` at that module's own rank
(PEFT's default for ``LoraConfig(r=..., lora_alpha=alpha)``): ``lora-matched``'s and EVA's per-module ranks follow it,
and so does DiffoRA's rank concentration (its export writes a ``rank_pattern`` and no ``alpha_pattern``).

**The 'continue' hand-off** (``diffora[handoff=continue]`` or ``--handoff continue``): the search is the first
``S`` of the ``T`` steps a LoRA-all fine-tune takes, at the fine-tune's LR (so each LR gets its own search), and
DiffoRA's fine-tune continues its schedule and AdamW state for ``T - S`` steps: equal total steps with LoRA-all. The
controls that reuse that search keep restarting after it; ``lora-all-cm`` matches DiffoRA's ``T - S`` fine-tune
steps plus the search's passes. Every fine-tune records ``search_steps`` (the weight steps of the search its model
inherits), ``finetune_steps`` and ``total_steps``.

**Controls that isolate the search** (same seed, same options as the DiffoRA they are matched to):

* ``type-prior``: no search of its own; counts DiffoRA's kept modules per module type and keeps the most-kept types
  in every layer (ties: column order) under the budget rule at DiffoRA's LoRA parameter count; fresh LoRA.
* ``random[matched=true]`` / ``random-ws[matched=true]``: uniform random scores through the budget rule at DiffoRA's
  LoRA parameter count (the plain ``random`` keeps as many modules per layer as DiffoRA, which spends fewer
  parameters when the draw favours small modules).
* ``random[within_type=true]`` / ``random-ws[within_type=true]``: as many modules of each type as DiffoRA keeps, in
  random layers: the type preference stays, the choice of layers is random (same parameter count as DiffoRA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Iterator, Optional

from ..cli.options import Options, option_kinds
from ..errors import ConfigError
from ..method.config import DiffoRAConfig, flag_of

#: options that change only what is kept from a search
SELECT_KEYS = (
    "keep_ratio",
    "granularity",
    "selection_score",
    "rank_allocation",
    "score_normalization",
    "ntk_kernel",
    "ntk_normalization",
    "ntk_ungated",
    "ntk_examples",
)
#: DiffoRAConfig fields that are not variant keys of a search: the job's seed, list-valued targets, the export
_NOT_SEARCH = ("seed", "target_types", "target_modules", "modules_to_save", "weight_sharing")
#: options that change the DAM search itself (two methods with equal values share one search per seed): every
#: DiffoRAConfig flag that is not a selection or export option, and the search length
SEARCH_KEYS = tuple(
    flag_of(DiffoRAConfig, f.name)
    for f in fields(DiffoRAConfig)
    if f.name not in _NOT_SEARCH and flag_of(DiffoRAConfig, f.name) not in SELECT_KEYS
) + ("search_epochs", "search_steps")
LORA_KEYS = ("rank", "alpha", "lora_dropout")
#: the keys of a control matched to a DiffoRA's kept set
RANDOM_KEYS = ("matched", "within_type")


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


#: variant keys that are not fields of Options: name -> (type, check, message)
EXTRA_KEYS: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "lr": (float, lambda v: v > 0, "must be > 0"),
    "eva_rho": (float, lambda v: v >= 1, "must be >= 1 (1: no rank redistribution)"),
    "eva_tau": (float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "matched": (bool, _is_bool, "must be true or false"),
    "within_type": (bool, _is_bool, "must be true or false"),
}
#: EVA's defaults (PEFT's EvaConfig)
EVA_RHO, EVA_TAU = 2.0, 0.99


# ------------------------------------------------------------------------------------------------ contexts
@dataclass
class Validation:
    """What a family's checks before the first job may look at."""

    where: str  # "method 'label'", the prefix of every message
    opts: Options  # the method's options (the comparison's with its variant applied)
    values: dict[str, Any]  # the variant's values (Options keys and extra keys)
    grid: Any  # DAMGrid of the model
    model: Any
    train_rows: list[int]  # training rows of every split the comparison trains on


@dataclass
class Built:
    """A method's trainable model, the modules that carry an adapter, and what else its record holds."""

    model: Any
    kept: list[str]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the 'continue' hand-off: the schedule step the fine-tune starts at (the search's S of T) and the kept
    #: parameters' AdamW state (:func:`diffora.method.handoff.carry_optimizer_state`); 0 and None otherwise
    start_step: int = 0
    optimizer_state: Optional[dict[str, Any]] = None


# --------------------------------------------------------------------------------------------------- family
class Family:
    """One method family; subclasses override the hooks that differ from plain LoRA on a fixed set of modules."""

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    what: ClassVar[str]
    #: whether the record's ``rho`` is the keep ratio (the method keeps a fraction of the modules)
    reports_rho: ClassVar[bool] = False

    def default_lr(self, base: Options, settings: Any) -> float:
        """The fine-tuning LR without --tune-lr or an lr variant (``settings``: the CompareOptions)."""
        return float(base.lr)

    def check_variant(self, label: str, values: dict[str, Any]) -> None:
        """Checks across the variant's keys (each key alone is checked when parsed)."""

    def needs_search(self, values: dict[str, Any]) -> bool:
        """Whether the job waits for the DAM search of its seed (to export from it or to read DiffoRA's kept set)."""
        return False

    def needs_reference(self, values: dict[str, Any]) -> bool:
        """Whether the job needs DiffoRA's kept set and LoRA parameters for its seed (see :meth:`attach`)."""
        return False

    def validate(self, v: Validation) -> None:
        """One-line errors before any job runs."""

    def attach(self, job: Any, search: dict) -> None:
        """Give a fine-tune job what it needs from its finished search record."""
        from .jobs import SearchRef

        handoff = search.get("handoff") or {}
        job.search = SearchRef(
            state_path=search["state_path"],
            seconds=float(search["seconds"]),
            weight_steps=int(search["steps"]),
            total_steps=handoff.get("total_steps"),
        )
        if self.needs_reference(job.extra):
            job.reference = diffora_reference(Options(**job.options), search)

    def training_options(self, job: Any, opts: Options, n_train: int) -> tuple[Options, dict]:
        """The options the fine-tune trains with, and the record's ``compute_matched`` entry (empty: none)."""
        return opts, {}

    def build(self, ctx: Any) -> Built:
        raise NotImplementedError

    def starts_from_search(self, opts: Options) -> bool:
        """Whether the model starts from trained weights (then step 0 is evaluated)."""
        return False

    def inherited_search_steps(self, job: Any, opts: Options) -> int:
        """The search's weight steps that the trained model's weights went through (0: a fresh start)."""
        return int(job.search.weight_steps) if job.search is not None and self.starts_from_search(opts) else 0

    @contextlib.contextmanager
    def during_finetune(self, model: Any, record: dict) -> Iterator[None]:
        """Hooks around the shared fine-tuning loop; may add entries to the job's record."""
        yield

    def account(self, model: Any, record: dict) -> None:
        """Method-specific parameter accounting added to the record."""

    # ...................................................................................... shared checks
    @staticmethod
    def _check_quota(v: Validation) -> None:
        from ..select.quota import select_modules

        rows, cols = v.grid.shape
        try:  # fail now, not after the search, when the discretisation cannot keep anything
            select_modules(
                v.grid, [[0.0] * cols for _ in range(rows)], v.opts.keep_ratio, v.opts.granularity, rank=v.opts.rank
            )
        except ConfigError as exc:
            raise ConfigError(f"{v.where}: {exc}") from None

    @staticmethod
    def _check_reference_score(v: Validation) -> None:
        """DiffoRA's kept set is read from the search record's scores: only the scores a search records (those its
        gate history gives, see :func:`diffora.select.choose.gate_scores`) can be matched."""
        from ..select.strategies import get_strategy, strategy_names

        recorded = []
        for name in strategy_names():
            strategy = get_strategy(name)
            if not strategy.needs_gate_steps or strategy.needs_kernels:
                continue
            try:
                strategy.check_config(v.opts.search_config())
            except ConfigError:
                continue
            recorded.append(name)
        if v.opts.selection_score not in recorded:
            raise ConfigError(
                f"{v.where}: matching DiffoRA's kept set needs a selection score its search records "
                f"({', '.join(recorded)}), not {v.opts.selection_score}"
            )


class FixedLoRA(Family):
    """Fresh PEFT LoRA at rank r on a set of modules that no search chooses."""

    def modules(self, ctx: Any) -> list[str]:
        raise NotImplementedError

    def build(self, ctx: Any) -> Built:
        kept = self.modules(ctx)
        return Built(ctx.fresh(ctx.lora(kept, ctx.opts.rank)), kept)


class LoraAll(FixedLoRA):
    name = "lora-all"
    keys = LORA_KEYS + ("lr",)
    what = "PEFT LoRA on every candidate module at rank r"

    def modules(self, ctx: Any) -> list[str]:
        return ctx.grid.module_names()


class LoraAllComputeMatched(LoraAll):
    name = "lora-all-cm"
    keys = SEARCH_KEYS + ("lr",)
    what = (
        "compute-matched LoRA-all: every candidate at rank r, trained for DiffoRA's fine-tuning steps plus one "
        "step per forward/backward pass of its search (same seed, same search options), so the search's warm "
        "start is not free compute"
    )

    def needs_search(self, values: dict[str, Any]) -> bool:
        return True

    def attach(self, job: Any, search: dict) -> None:
        from .jobs import search_passes

        super().attach(job, search)
        job.search_passes = search_passes(search)  # as many extra optimiser steps as the search made passes

    def training_options(self, job: Any, opts: Options, n_train: int) -> tuple[Options, dict]:
        from .jobs import epochs_for_steps, finetune_steps

        # DiffoRA's fine-tune + one step per pass, same schedule shape; a 'continue' search is the first S of
        # DiffoRA's T steps, so its fine-tune takes only T - S
        base = finetune_steps(opts, n_train)
        if job.search.total_steps is not None:
            base -= int(job.search.weight_steps)
        compute = {"finetune_steps": base, "search_passes": int(job.search_passes)}
        return dataclasses.replace(
            opts, epochs=epochs_for_steps(opts, n_train, base + compute["search_passes"])
        ), compute


class LoraQV(FixedLoRA):
    name = "lora-qv"
    keys = LORA_KEYS + ("lr",)
    what = "PEFT LoRA on the query and value projections of every layer"

    def validate(self, v: Validation) -> None:
        from .jobs import qv_modules

        if not qv_modules(v.grid):
            raise ConfigError(
                f"{v.where}: model '{v.opts.model}' has no query/value projections among its candidate "
                f"types ({', '.join(v.grid.labels)}); drop lora-qv"
            )

    def modules(self, ctx: Any) -> list[str]:
        from .jobs import qv_modules

        return qv_modules(ctx.grid)


class Diffora(Family):
    name = "diffora"
    keys = SEARCH_KEYS + SELECT_KEYS + ("weight_sharing", "lr")
    what = "DiffoRA: DAM search, keep the top rho, export with the search's weights (weight sharing), fine-tune"
    reports_rho = True

    def needs_search(self, values: dict[str, Any]) -> bool:
        return True

    def validate(self, v: Validation) -> None:
        self._check_quota(v)

    def starts_from_search(self, opts: Options) -> bool:
        return bool(opts.weight_sharing)

    def continues(self, opts: Options) -> bool:
        """Whether the fine-tune continues the search's schedule and AdamW state ('continue' hand-off) instead of
        restarting them."""
        return opts.handoff == "continue"

    def select(self, ctx: Any, search: Any) -> tuple[Any, Optional[dict], dict]:
        """The selection, per-module ranks (or None) and record entries of this search."""
        from .jobs import diffora_selection

        return diffora_selection(ctx, search)

    def build(self, ctx: Any) -> Built:
        from ..method.export import export_search
        from .jobs import continue_from_search, load_search

        t0 = time.perf_counter()
        search = load_search(ctx)
        selection, ranks, info = self.select(ctx, search)
        if self.continues(ctx.opts):
            built = continue_from_search(ctx, search, selection)
        else:
            built = Built(
                export_search(search, selection, weight_sharing=ctx.opts.weight_sharing, ranks=ranks), selection.modules
            )
        built.info = {**info, "export_seconds": time.perf_counter() - t0, "search_seconds": ctx.job.search.seconds}
        return built


class RandomControl(Family):
    """The random-selection controls: the draw, and its matching to DiffoRA's kept set when asked."""

    reports_rho = True

    def check_variant(self, label: str, values: dict[str, Any]) -> None:
        if values.get("matched") and values.get("within_type"):
            raise ConfigError(
                f"method '{label}': matched and within_type both match DiffoRA's parameter count; use one of them"
            )

    def needs_reference(self, values: dict[str, Any]) -> bool:
        return bool(values.get("matched") or values.get("within_type"))

    def validate(self, v: Validation) -> None:
        self._check_quota(v)
        if self.needs_reference(v.values):
            self._check_reference_score(v)

    def draw(self, ctx: Any, grid: Any) -> Any:
        from ..select.strategies.random import random_selection
        from .jobs import random_within_types

        opts, extra, seed = ctx.opts, ctx.job.extra, ctx.opts.seed
        if extra.get("within_type"):
            return random_within_types(grid, ctx.job.reference["modules"], seed, opts.keep_ratio, opts.rank)
        if extra.get("matched"):
            return random_selection(
                grid, opts.keep_ratio, seed, opts.rank, "budget", budget_params=int(ctx.job.reference["lora_params"])
            )
        return random_selection(grid, opts.keep_ratio, seed, opts.rank, opts.granularity)

    def reference_info(self, ctx: Any) -> dict:
        ref = ctx.job.reference
        return {"target_lora_params": int(ref["lora_params"])} if ref else {}


class Random(RandomControl):
    name = "random"
    keys = ("keep_ratio", "granularity") + LORA_KEYS + ("lr",) + RANDOM_KEYS
    what = (
        "fresh LoRA on random modules at the same rho (same per-layer rule as DiffoRA); matched=true: random "
        "scores through the budget rule at DiffoRA's LoRA parameters; within_type=true: DiffoRA's count per "
        "module type in random layers"
    )

    def needs_search(self, values: dict[str, Any]) -> bool:
        return self.needs_reference(values)

    def build(self, ctx: Any) -> Built:
        kept = self.draw(ctx, ctx.grid).modules
        return Built(ctx.fresh(ctx.lora(kept, ctx.opts.rank)), kept, self.reference_info(ctx))


class RandomWS(RandomControl, Diffora):
    name = "random-ws"
    keys = SEARCH_KEYS + ("keep_ratio", "granularity", "lr") + RANDOM_KEYS
    what = (
        "random modules (the same draw as `random`) exported from the same search as DiffoRA, with its weights: "
        "separates the choice of modules from the warm start"
    )

    def validate(self, v: Validation) -> None:
        RandomControl.validate(self, v)

    def continues(self, opts: Options) -> bool:
        return False  # a control: its random modules restart the fine-tune from the search's weights

    def select(self, ctx: Any, search: Any) -> tuple[Any, Optional[dict], dict]:
        return self.draw(ctx, search.grid), None, self.reference_info(ctx)


class MatchedControl(Family):
    """A control built from DiffoRA's kept set of the same seed (its parameter count, or its module types)."""

    def needs_search(self, values: dict[str, Any]) -> bool:
        return True

    def needs_reference(self, values: dict[str, Any]) -> bool:
        return True

    def validate(self, v: Validation) -> None:
        self._check_quota(v)
        self._check_reference_score(v)


class LoraMatched(MatchedControl):
    name = "lora-matched"
    keys = SEARCH_KEYS + SELECT_KEYS + ("lr",)
    what = (
        "LoRA on every candidate, ranks chosen so its LoRA parameters match DiffoRA's (same seed, same options) "
        "within 5%"
    )
    reports_rho = True

    def build(self, ctx: Any) -> Built:
        from ..select.ranks import rank_pattern_for
        from .jobs import matched_ranks

        target = int(ctx.job.reference["lora_params"])
        ranks = matched_ranks(ctx.grid, ctx.opts.rank, target)
        base = statistics.mode(ranks.values())
        kept = ctx.grid.module_names()
        model = ctx.fresh(ctx.lora(kept, base, rank_pattern=rank_pattern_for(ranks, base)))
        return Built(model, kept, {"matched_ranks": sorted(set(ranks.values())), "target_lora_params": target})


class TypePrior(MatchedControl):
    name = "type-prior"
    keys = SEARCH_KEYS + ("keep_ratio", "granularity", "selection_score", "lr")
    what = (
        "no search of its own: the module types DiffoRA keeps most often (same seed, same options), in every "
        "layer, under the budget rule at DiffoRA's LoRA parameters; fresh LoRA"
    )
    reports_rho = True

    def build(self, ctx: Any) -> Built:
        ref = ctx.job.reference
        selection = type_prior_selection(ctx.grid, ref["modules"], int(ref["lora_params"]), ctx.opts.rank)
        kept = selection.modules
        info = {"target_lora_params": int(ref["lora_params"]), "type_order": type_order(ctx.grid, ref["modules"])}
        return Built(ctx.fresh(ctx.lora(kept, ctx.opts.rank)), kept, info)


class AdaLoRA(Family):
    name = "adalora"
    keys = LORA_KEYS + ("keep_ratio", "lr")
    what = "PEFT AdaLoRA on every candidate, final rank budget rho x r per module (init 1.5x that)"
    reports_rho = True

    def default_lr(self, base: Options, settings: Any) -> float:
        return float(settings.adalora_lr)

    def validate(self, v: Validation) -> None:
        from .jobs import finetune_steps

        steps = [finetune_steps(v.opts, n) for n in v.train_rows]
        if min(steps) < 3:
            raise ConfigError(
                f"{v.where}: AdaLoRA needs at least 3 fine-tuning steps (a warm-up, a budgeting and a "
                f"final phase), this comparison has {steps[0]}; add data or raise --epochs"
            )

    def build(self, ctx: Any) -> Built:
        from peft import AdaLoraConfig

        from .jobs import finetune_steps

        opts = ctx.opts
        kept = ctx.grid.module_names()
        total = finetune_steps(opts, len(ctx.prep.train_items))
        target_r = max(1, round(opts.rank * opts.keep_ratio))
        init_r = math.ceil(1.5 * target_r)
        config = AdaLoraConfig(
            init_r=init_r,
            target_r=target_r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.lora_dropout,
            tinit=max(1, int(0.1 * total)),
            tfinal=max(1, int(0.2 * total)),
            deltaT=max(1, total // 20),
            total_step=total,
            target_modules=kept,
            modules_to_save=ctx.heads or None,
            task_type=ctx.task_type,
        )
        info = {
            "adalora": {
                "init_r": init_r,
                "target_r": target_r,
                "tinit": config.tinit,
                "tfinal": config.tfinal,
                "deltaT": config.deltaT,
                "total_step": total,
            }
        }
        return Built(ctx.fresh(config), kept, info)

    @contextlib.contextmanager
    def during_finetune(self, model: Any, record: dict) -> Iterator[None]:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        counter = {"step": 0}

        def allocate(optimizer, args, kwargs):  # PEFT: every step, after optimizer.step(), before zero_grad()
            model.base_model.update_and_allocate(counter["step"])
            counter["step"] += 1

        handle = register_optimizer_step_post_hook(allocate)
        try:
            yield
        finally:
            handle.remove()
            record["adalora_allocate_calls"] = counter["step"]

    def account(self, model: Any, record: dict) -> None:
        eff_params, eff_rank = 0, {}
        for name, module in model.named_modules():
            e = getattr(module, "lora_E", None)
            if e is not None and "default" in e:
                r_eff = int((e["default"].detach() != 0).sum())
                base = module.get_base_layer()
                eff_params += r_eff * (base.in_features + base.out_features + 1)
                eff_rank[name.replace("base_model.model.", "")] = r_eff
        record.update(
            adalora_effective_lora_params=eff_params,
            adalora_final_ranks=eff_rank,
            adalora_total_rank=sum(eff_rank.values()),
        )


class Eva(Family):
    name = "eva"
    keys = LORA_KEYS + ("eva_rho", "eva_tau", "lr")
    what = (
        "PEFT LoRA on every candidate with EVA init (SVD of the layer inputs on training batches, ranks "
        "redistributed up to eva_rho x r)"
    )

    def validate(self, v: Validation) -> None:
        from .jobs import eva_check

        eva_check(v.grid, v.model, v.opts.rank, v.values.get("eva_rho", EVA_RHO), v.where)

    def build(self, ctx: Any) -> Built:
        from .jobs import eva_init

        return eva_init(ctx, float(ctx.job.extra.get("eva_rho", EVA_RHO)), float(ctx.job.extra.get("eva_tau", EVA_TAU)))


class Full(Family):
    name = "full"
    keys = ("lr",)
    what = "full fine-tuning: every parameter trainable"

    def default_lr(self, base: Options, settings: Any) -> float:
        return float(settings.full_lr)

    def build(self, ctx: Any) -> Built:
        for p in ctx.model.parameters():
            p.requires_grad_(True)
        return Built(ctx.model, [])


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Diffora(),
        LoraAll(),
        LoraAllComputeMatched(),
        LoraMatched(),
        Random(),
        RandomWS(),
        TypePrior(),
        LoraQV(),
        AdaLoRA(),
        Eva(),
        Full(),
    )
}


# --------------------------------------------------------------------------------------- DiffoRA's kept set
def diffora_reference(opts: Options, search: dict) -> dict:
    """DiffoRA's kept modules and LoRA parameters for ``opts`` from a finished search record (the same seed)."""
    from ..method.candidates import DAMGrid
    from ..select.quota import select_modules

    grid = DAMGrid.from_dict(search["record"]["grid"])
    selection = select_modules(
        grid, search["scores"][opts.selection_score], opts.keep_ratio, opts.granularity, rank=opts.rank
    )
    return {"modules": list(selection.modules), "lora_params": int(selection.lora_params)}


def type_order(grid: Any, kept: list[str]) -> list[str]:
    """The grid's module types (labels), most-kept first in ``kept``; ties keep the column order."""
    counts = [0] * grid.shape[1]
    for name in kept:
        counts[grid.position(name)[1]] += 1
    order = sorted(range(len(counts)), key=lambda j: (-counts[j], j))
    return [grid.labels[j] for j in order]


def type_prior_selection(grid: Any, kept: list[str], budget_params: int, rank: int) -> Any:
    """Whole module types in every layer, most-kept type first, under the budget rule at ``budget_params``."""
    from ..select.quota import select_modules

    rows, cols = grid.shape
    position = {label: p for p, label in enumerate(type_order(grid, kept))}
    scores = [[float(cols - position[grid.labels[j]]) for j in range(cols)] for _ in range(rows)]
    return select_modules(grid, scores, 1.0, "budget", rank=rank, budget_params=budget_params)


# ---------------------------------------------------------------------------------------------- parsing
_METHOD = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)(?:\[(.*)\])?$")


@dataclass(frozen=True)
class Method:
    """One ``--methods`` entry, checked."""

    label: str  # how the report names it, e.g. "diffora[keep_ratio=0.25]"
    family: str
    overrides: tuple[tuple[str, Any], ...]  # variant options, typed, in the order given

    @property
    def kind(self) -> Family:
        """The family object that runs this method."""
        return FAMILIES[self.family]

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def extra(self) -> dict[str, Any]:
        """Variant values that are not fields of Options (nor the LR), as the fine-tune job carries them."""
        return {k: v for k, v in self.overrides if k in EXTRA_KEYS and k != "lr"}

    @property
    def explicit_lr(self) -> Optional[float]:
        return self.values.get("lr")

    @property
    def needs_search(self) -> bool:
        return self.kind.needs_search(self.values)

    def options(self, base: Options) -> Options:
        """``base`` with this method's Options-valued variant keys applied."""
        changes = {k: v for k, v in self.overrides if k not in EXTRA_KEYS}
        return dataclasses.replace(base, **changes) if changes else base

    def default_lr(self, base: Options, settings: Any) -> float:
        return self.kind.default_lr(base, settings)

    def search_values(self, base: Options) -> dict[str, Any]:
        """The options that define this method's search (for the methods that need one)."""
        opts = self.options(base)
        return {k: getattr(opts, k) for k in SEARCH_KEYS}


def _convert(label: str, key: str, text: str) -> Any:
    if key in EXTRA_KEYS:
        kind, check, message = EXTRA_KEYS[key]
        if kind is bool:
            value = _boolean(label, key, text)
        else:
            try:
                value = kind(text)
            except ValueError:
                raise ConfigError(f"method '{label}': {key} must be a number, got '{text}'") from None
        if not check(value):
            raise ConfigError(f"method '{label}': {key} {message}, got {text}")
        return value
    kind, is_list, _ = option_kinds()[key]
    if is_list:  # pragma: no cover - no list option is a variant key
        raise ConfigError(f"method '{label}': {key} cannot be set per method")
    if kind is bool:
        return _boolean(label, key, text)
    try:
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return kind(text)
    except ValueError:
        word = {int: "an integer", float: "a number"}.get(kind, "a string")
        raise ConfigError(f"method '{label}': {key} must be {word}, got '{text}'") from None


def _boolean(label: str, key: str, text: str) -> bool:
    low = text.lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"method '{label}': {key} must be true or false, got '{text}'")


def parse_method(text: str, base: Options) -> Method:
    """Parse and check one ``--methods`` entry against ``base`` (the comparison's options)."""
    entry = str(text).strip()
    match = _METHOD.match(entry)
    if not match:
        raise ConfigError(
            f"cannot read method '{entry}'; write a method name, optionally with options in "
            "brackets: diffora, 'diffora[keep_ratio=0.25]', 'lora-all[lr=1e-3,rank=4]'"
        )
    name = match.group(1).lower().replace("_", "-")
    if name not in FAMILIES:
        raise ConfigError(f"unknown method '{match.group(1)}' in --methods; choose from {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    pairs: list[tuple[str, str]] = []
    body = (match.group(2) or "").strip()
    for part in [p.strip() for p in body.split(",")] if body else []:
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise ConfigError(f"method '{entry}': '{part}' is not key=value; write e.g. '{name}[{family.keys[0]}=...]'")
        pairs.append((key, value.strip()))
    label = name + (f"[{','.join(f'{k}={v}' for k, v in pairs)}]" if pairs else "")
    seen: set[str] = set()
    overrides = []
    for key, value in pairs:
        if key not in family.keys:
            raise ConfigError(
                f"method '{label}': unknown option '{key}' for {name}; {name} takes {', '.join(family.keys)}"
            )
        if key in seen:
            raise ConfigError(f"method '{label}' sets {key} twice")
        seen.add(key)
        overrides.append((key, _convert(label, key, value)))
    method = Method(label=label, family=name, overrides=tuple(overrides))
    family.check_variant(label, method.values)
    try:
        method.options(base)  # Options checks every value (and the search and fine-tuning configs it implies)
    except ConfigError as exc:
        raise ConfigError(f"method '{label}': {exc}") from None
    return method


def parse_methods(texts: list[str], base: Options) -> list[Method]:
    methods = [parse_method(t, base) for t in texts]
    labels = [m.label for m in methods]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ConfigError(f"--methods lists '{twice[0]}' twice")
    return methods


def search_label(values: dict[str, Any], base: Options) -> str:
    """A readable name for a search: 'default', or the options that differ from the comparison's."""
    differ = [f"{k}={values[k]}" for k in SEARCH_KEYS if k in values and values[k] != getattr(base, k)]
    return "default" if not differ else ",".join(differ)


def search_key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)
