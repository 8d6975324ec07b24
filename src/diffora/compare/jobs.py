"""One job of a comparison: a DAM search, one method's fine-tune for one seed, or the timing block.

Jobs run in worker processes (or in the calling process with ``--workers 0``); :func:`execute` never raises: a job
that fails returns its one-line reason and traceback, and the comparison goes on. Every method builds its model
here and then trains with the same loop (:func:`diffora.train.finetune`), the same data, the same training order
for a seed (loader seed = seed + 2), the same schedule and the same evaluation points.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from ..cli.loading import load_model
from ..cli.options import Options
from ..data.splits import split_for_search
from ..errors import ConfigError, TrainingError
from ..evaluation.metrics import higher_is_better
from ..evaluation.predict import evaluate_model
from ..method.candidates import DAMGrid, detect_task_heads, find_candidates, uses_conv1d
from ..method.export import count_trainable, export_search, infer_task_type, lora_config_for, seeded_peft_model
from ..method.handoff import (
    attach_schedule,
    carry_optimizer_state,
    continue_config,
    finetune_total_steps,
    search_steps_within,
)
from ..method.schedule import search_length
from ..method.search import SINGLE_LEVEL_CHECK_BATCHES, prepare_search
from ..runtime import seed_everything
from ..select.choose import allocate_ranks, choose_modules, gate_scores, search_kernels
from ..select.quota import Selection, select_modules
from ..select.strategies import get_strategy
from ..select.strategies.random import random_scores
from ..store.io import atomic_write_bytes, torch_load_safe
from ..store.record import search_record
from ..train import finetune
from .data import OnDevice, Prepared, device, eval_loader, loader, prepared
from .methods import FAMILIES, Built

#: column labels (see diffora.method.candidates.PRESETS) and type suffixes of the query and value projections
QV_LABELS = ("query", "value", "q", "v")
QV_SUFFIXES = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin", "c_attn")
#: EVA's SVD sees at most this many batches (it stops earlier once its components converge)
EVA_MAX_BATCHES = 2000


# ------------------------------------------------------------------------------------------------- helpers
def reset_peak_memory() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) of this process
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, Optional[float]]:
    rss = None
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    if rss is None:
        from ..runtime import peak_rss_mib

        rss = peak_rss_mib()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mib": rss, "peak_gpu_mib": gpu}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def search_steps(opts: Options, n_weight_rows: int) -> int:
    """The search length ``diffora run`` uses: --search-steps, or --search-epochs passes over the weight split (a
    step is --gradient-accumulation-steps micro-batches)."""
    return search_length(
        math.ceil(n_weight_rows / opts.batch_size),
        epochs=opts.search_epochs,
        steps=opts.search_steps,
        accumulation=getattr(opts, "gradient_accumulation_steps", 1),
    )


def search_config(opts: Options):
    """The search's configuration as ``diffora run`` builds it: under the 'continue' hand-off the search's weight
    steps are fine-tune steps, so they take the fine-tune's LR (``opts.lr``), weight decay and clipping."""
    config = opts.search_config()
    return continue_config(config, opts.finetune_options()) if config.handoff == "continue" else config


def new_search(model, opts: Options, config=None):
    """``prepare_search`` as ``diffora run`` calls it (the precision options only when set, so the defaults use the
    plain call)."""
    extra = {}
    if getattr(opts, "mixed_precision", "no") != "no":
        extra["mixed_precision"] = opts.mixed_precision
    return prepare_search(model, config or search_config(opts), **extra)


def finetune_steps(opts: Options, n_train: int) -> int:
    """Optimiser steps of a fine-tune over ``n_train`` rows (the fine-tuning loop's and the hand-off's rule)."""
    return finetune_total_steps(math.ceil(n_train / opts.batch_size), opts.finetune_options())


def continue_steps(opts: Options, n_train: int, n_weight_rows: int) -> tuple[int, int]:
    """``(S, T)`` of the 'continue' hand-off: the search's weight steps, clipped so that at least one of the ``T``
    steps a LoRA-all fine-tune over ``n_train`` rows takes is left for the kept modules."""
    total = finetune_steps(opts, n_train)
    return search_steps_within(search_steps(opts, n_weight_rows), total), total


#: forward/backward passes of one gate step: first order one; second order four (the virtual weight step, the gate
#: loss at the virtual weights and the two finite-difference passes of the Hessian-vector product)
GATE_STEP_PASSES = {"first": 1, "second": 4}


def search_passes(search: dict) -> int:
    """Forward/backward passes of a finished search (its record): one per weight step, GATE_STEP_PASSES per gate
    step. A single-level search's gate steps share its weight steps' backward; its held-out check scores
    2 x SINGLE_LEVEL_CHECK_BATCHES batches forward-only, counted as a third of a pass each (rounded up). A
    compute-matched method gets one optimiser step per pass."""
    config = search["config"]
    if config.get("search_levels", "bi") == "single":
        return int(search["steps"]) + math.ceil(2 * SINGLE_LEVEL_CHECK_BATCHES / 3)
    return int(search["steps"]) + GATE_STEP_PASSES[config["order"]] * int(search["gate_steps"])


def epochs_for_steps(opts: Options, n_train: int, steps: int) -> float:
    """The (fractional) --epochs for which :func:`finetune_steps` gives exactly ``steps``: the shared loop keeps
    its schedule shape (warm-up ratio, linear decay) over the longer run."""
    accumulation = opts.gradient_accumulation_steps
    batches = math.ceil(n_train / opts.batch_size)
    epochs = (steps * accumulation - 0.5) / batches  # ceil(epochs * batches / accumulation) == steps
    assert max(1, math.ceil(epochs * batches / accumulation)) == steps
    return epochs


def eval_every(opts: Options, total: int, eval_points: int) -> int:
    if opts.eval_every > 0:
        return opts.eval_every
    return max(1, math.ceil(total / eval_points)) if eval_points > 0 else 0


def qv_modules(grid: DAMGrid) -> list[str]:
    """The query and value projections of every layer (GPT-2's fused c_attn holds both)."""
    cols = [
        j
        for j, (t, label) in enumerate(zip(grid.types, grid.labels))
        if label in QV_LABELS or any(t == s or t.endswith("." + s) for s in QV_SUFFIXES)
    ]
    return [name for row in grid.names for j, name in enumerate(row) if j in cols and name is not None]


def eva_check(grid: DAMGrid, model: Any, rank: int, rho: float, where: str) -> None:
    """EVA computes up to round(rank * eva_rho) principal components of each module's input: no more than the
    input has features."""
    wanted = round(rank * rho)
    for name in grid.module_names():
        module = model.get_submodule(name)
        features = getattr(module, "in_features", None) or module.weight.shape[0]  # Conv1D stores (in, out)
        if wanted > features:
            raise ConfigError(
                f"{where}: EVA needs {wanted} components (rank {rank} x eva_rho {rho:g}) but "
                f"'{name}' has only {features} input features; lower --rank or eva_rho"
            )


def random_within_types(grid: DAMGrid, kept: list[str], seed: int, keep_ratio: float, rank: int) -> Selection:
    """As many modules of each type as ``kept`` holds, in the layers with the highest random scores."""
    counts = [0] * grid.shape[1]
    for name in kept:
        counts[grid.position(name)[1]] += 1
    scores = random_scores(grid, keep_ratio, seed)
    return select_modules(grid, scores, keep_ratio, "type", rank=rank, type_counts=counts)


def all_modules(grid: DAMGrid, rank: int) -> Selection:
    rows, cols = grid.shape
    return select_modules(grid, [[0.0] * cols for _ in range(rows)], 1.0, "global", rank=rank)


def matched_ranks(grid: DAMGrid, rank: int, target_lora_params: int) -> dict[str, int]:
    """Integer ranks for every candidate whose LoRA parameters come as close to ``target_lora_params`` as a +1 on
    one module allows (never above it): the largest common rank that fits, then +1 on modules in grid order."""
    from ..select.ranks import concentrate_ranks

    return concentrate_ranks(grid, all_modules(grid, rank), rank, mode="uniform", budget_params=int(target_lora_params))


def save_state(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def accelerator_for(dev: torch.device, mixed_precision: str):
    """An ``Accelerator`` for one fine-tune. accelerate keeps one state per process, so a process serves one
    precision: comparisons with another ``--mixed-precision`` run in worker processes (``--workers`` >= 1)."""
    from accelerate import Accelerator

    try:
        return Accelerator(cpu=dev.type == "cpu", mixed_precision=mixed_precision)
    except ValueError as exc:
        raise ConfigError(
            f"this process already runs accelerate with another mixed precision ({exc}); run the "
            "comparison with --workers 1 or more, or in a new process"
        ) from None


# ------------------------------------------------------------------------------------------------ job records
@dataclass
class SearchRef:
    """What a fine-tune takes from its finished search: the saved state, the search's time, its weight steps, and
    whether it is the first part of the fine-tune ('continue' hand-off: ``total_steps`` is that fine-tune's T)."""

    state_path: str
    seconds: float
    weight_steps: int = 0
    total_steps: Optional[int] = None


@dataclass(kw_only=True)
class JobSpec:
    """What a worker gets for one job. ``key`` is what makes a saved result reusable; ``options`` are the
    :class:`~diffora.cli.options.Options` fields of the job (as a dict, so a record pickles and prints plainly)."""

    kind: ClassVar[str] = ""
    id: str
    key: dict
    split: str
    holdout_rows: int = 0
    options: dict

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict) -> "JobSpec":
        cls = JOB_KINDS[data["kind"]]
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("search"), dict):
            values["search"] = SearchRef(**values["search"])
        return cls(**values)


@dataclass(kw_only=True)
class SearchJob(JobSpec):
    kind: ClassVar[str] = "search"
    state_path: str
    label: str


@dataclass(kw_only=True)
class FinetuneJob(JobSpec):
    kind: ClassVar[str] = "finetune"
    label: str
    family: str
    lr: float
    eval_points: int = 5
    extra: dict = field(default_factory=dict)  # the variant's values that are not Options fields (eva_rho, matched)
    search: Optional[SearchRef] = None  # set by the family's attach() once the search has finished
    search_passes: Optional[int] = None  # lora-all-cm: forward/backward passes of the search
    reference: Optional[dict] = None  # DiffoRA's kept modules and LoRA parameters of the same seed


@dataclass(kw_only=True)
class TimingJob(JobSpec):
    kind: ClassVar[str] = "timing"
    rounds: int


JOB_KINDS: dict[str, type[JobSpec]] = {c.kind: c for c in (SearchJob, FinetuneJob, TimingJob)}


def job_options(job: JobSpec) -> Options:
    return Options(**job.options)


def _prepared(job: JobSpec, opts: Options) -> Prepared:
    return prepared(opts, job.split, job.holdout_rows)


def _model(opts: Options, prep: Prepared, dev: torch.device):
    model, _ = load_model(opts, prep.data, device=dev)
    return model.to(dev) if not opts.load_in_4bit else model


# -------------------------------------------------------------------------------------------------- search
def run_search(job: SearchJob) -> dict:
    """The bi-level search of ``diffora run``; its state is saved so each method can export from it."""
    opts = job_options(job)
    seed = opts.seed
    prep = _prepared(job, opts)
    reset_peak_memory()
    seed_everything(seed, deterministic=opts.full_determinism)
    dev = device()
    model = _model(opts, prep, dev)
    config = search_config(opts)
    start = time.perf_counter()
    w_idx, g_idx = split_for_search(len(prep.train_items), config.gate_fraction, seed)
    steps = search_steps(opts, len(w_idx))
    handoff = {}
    if config.handoff == "continue":  # the first S of the T steps LoRA-all's fine-tune takes, under its schedule
        steps, total = continue_steps(opts, len(prep.train_items), len(w_idx))
        handoff = {
            "handoff": {
                "mode": "continue",
                "search_steps": steps,
                "finetune_steps": total - steps,
                "total_steps": total,
            }
        }
    w_loader = loader(prep, [prep.train_items[i] for i in w_idx], opts.batch_size, shuffle=True, seed=seed)
    g_loader = loader(prep, [prep.train_items[i] for i in g_idx], opts.batch_size, shuffle=True, seed=seed + 1)
    search = new_search(model, opts, config)
    if handoff:
        attach_schedule(search, handoff["handoff"]["total_steps"], opts.warmup_ratio)
    accumulation = opts.gradient_accumulation_steps
    search.fit(
        OnDevice(w_loader, dev),
        OnDevice(g_loader, dev),
        steps,
        progress=False,
        **({"accumulation_steps": accumulation} if accumulation > 1 else {}),
    )
    seconds = time.perf_counter() - start
    # the state holds the weight optimiser: the 'continue' hand-off carries its AdamW moments into the fine-tune
    save_state(Path(job.state_path), search.state_dict())
    record = search_record(
        search,
        None,
        task=prep.data.name,
        seed=seed,
        search_steps=steps,
        model=opts.model,
        weight_split_rows=len(w_idx),
        gate_split_rows=len(g_idx),
        **handoff,
    )
    record.pop("history", None)
    return {
        "kind": "search",
        "seed": seed,
        "config": config.to_dict(),
        "steps": steps,
        "gate_steps": search.gate_steps,
        "weight_split_rows": len(w_idx),
        "gate_split_rows": len(g_idx),
        "seconds": seconds,
        "gates": search.gate_values(),
        "scores": gate_scores(search),
        "gate_snapshots": [{"step": s, "gates": g} for s, g in search.history.gate_snapshots],
        "weight_loss": search.history.weight_losses,
        "gate_loss": search.history.gate_losses,
        "record": record,
        "total_lora_params": all_modules(search.grid, config.rank).lora_params,
        **handoff,
        **peak_memory(),
    }


# ------------------------------------------------------------------------------------------------ fine-tune
def _fresh_lora(model, config, seed: int):
    return seeded_peft_model(model, config, seed + 1)  # the init stream of DiffoRA's export without weight sharing


@dataclass
class BuildContext:
    """What a method family builds its trainable model from (see :meth:`diffora.compare.methods.Family.build`)."""

    job: FinetuneJob
    opts: Options
    prep: Prepared
    model: Any
    train_loader: Any
    heads: list[str]
    task_type: Optional[str]
    _grid: Optional[DAMGrid] = None

    @property
    def grid(self) -> DAMGrid:
        if self._grid is None:
            self._grid = find_candidates(self.model, self.opts.target_types)
        return self._grid

    def lora(self, modules: list[str], rank: int, **extra):
        """The plain LoraConfig of ``modules`` at ``rank`` with the comparison's alpha and dropout."""
        fan_in_fan_out = uses_conv1d(self.model, modules)
        config = lora_config_for(
            modules,
            rank=rank,
            alpha=self.opts.alpha,
            dropout=self.opts.lora_dropout,
            modules_to_save=self.heads,
            task_type=self.task_type,
            fan_in_fan_out=fan_in_fan_out,
        )
        for key, value in extra.items():
            setattr(config, key, value)
        return config

    def fresh(self, config):
        return _fresh_lora(self.model, config, self.opts.seed)


def load_search(ctx: BuildContext):
    """The finished search of this job's seed, restored from its saved state (a 'continue' search ran at this
    job's LR: the plan gives each LR its own)."""
    search = new_search(ctx.model, dataclasses.replace(ctx.opts, lr=ctx.job.lr))
    search.load_state_dict(torch_load_safe(ctx.job.search.state_path))
    return search


def continue_from_search(ctx: BuildContext, search, selection: Selection) -> Built:
    """The 'continue' hand-off, as ``diffora run`` does it: the kept parameters' AdamW state (B's moments rescaled
    for the folded gate) is taken before the export consumes the search, and the fine-tune resumes the one T-step
    schedule at the search's step S (:func:`diffora.train.finetune` with ``start_step`` and ``optimizer_state``)."""
    ref = ctx.job.search
    if ref.total_steps is None:
        raise TrainingError(
            f"search {ref.state_path} ran without the 'continue' hand-off; rerun the comparison with --overwrite"
        )
    total = finetune_steps(ctx.opts, len(ctx.prep.train_items))
    if (search.weight_steps, total) != (ref.weight_steps, ref.total_steps):
        raise TrainingError(
            f"the search took {search.weight_steps} of {ref.total_steps} steps, but this fine-tune "
            f"has {total} and expects {ref.weight_steps}; rerun the comparison with --overwrite"
        )
    attach_schedule(search, total, ctx.opts.warmup_ratio)  # the schedule the search ran under, at step S
    carried = carry_optimizer_state(search, selection)
    start = search.weight_steps
    model = export_search(search, selection, weight_sharing=True)
    return Built(model, selection.modules, start_step=start, optimizer_state=carried)


def diffora_selection(ctx: BuildContext, search) -> tuple[Selection, Optional[dict], dict]:
    """DiffoRA's kept modules (and per-module ranks) from a finished search, as ``diffora run`` chooses them."""
    opts, prep, seed = ctx.opts, ctx.prep, ctx.opts.seed
    info: dict[str, Any] = {}
    kernels = None
    if get_strategy(opts.selection_score).needs_kernels:  # the same gate-split rows diffora run uses
        _, g_idx = split_for_search(len(prep.train_items), search.config.gate_fraction, seed)
        rows = [prep.train_items[i] for i in g_idx[: opts.ntk_examples]]
        kernels = search_kernels(
            search, loader(prep, rows, min(8, opts.batch_size), shuffle=False, seed=0), opts.ntk_examples
        )
    selection = choose_modules(search, kernels, keep_ratio=opts.keep_ratio, granularity=opts.granularity)
    ranks = allocate_ranks(search, selection, kernels)
    if ranks is not None:
        info["ranks"] = ranks
    return selection, ranks, info


def eva_init(ctx: BuildContext, rho: float, tau: float) -> Built:
    """PEFT LoRA on every candidate, initialised by EVA on training batches (at most EVA_MAX_BATCHES)."""
    from peft import EvaConfig, LoraConfig, initialize_lora_eva_weights

    opts, prep, seed = ctx.opts, ctx.prep, ctx.opts.seed
    kept = ctx.grid.module_names()
    eva = EvaConfig(rho=rho, tau=tau, use_label_mask=prep.data.kind == "causal_lm")
    base = ctx.lora(kept, opts.rank)
    config = LoraConfig(
        r=base.r,
        lora_alpha=base.lora_alpha,
        lora_dropout=base.lora_dropout,
        target_modules=kept,
        modules_to_save=base.modules_to_save,
        task_type=base.task_type,
        fan_in_fan_out=base.fan_in_fan_out,
        init_lora_weights="eva",
        eva_config=eva,
    )
    peft_model = ctx.fresh(config).to(device())
    t0 = time.perf_counter()
    calls = {"n": 0}

    def forward(m, inputs):
        calls["n"] += 1
        if calls["n"] > EVA_MAX_BATCHES:
            raise TrainingError(
                f"EVA's SVD did not converge within {EVA_MAX_BATCHES} batches; raise eva_tau's "
                "tolerance (e.g. 'eva[eva_tau=0.95]') or lower the rank"
            )
        return m(**inputs)

    eva_loader = loader(prep, prep.train_items, opts.batch_size, shuffle=True, seed=seed + 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        initialize_lora_eva_weights(peft_model, dataloader=eva_loader, forward_fn=forward, show_progress_bar=False)
    ranks = {
        n.replace("base_model.model.", ""): int(m.lora_A["default"].weight.shape[0])
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    info = {
        "search_seconds": time.perf_counter() - t0,
        "eva_batches": calls["n"],
        "eva_ranks": ranks,
        "eva": {"rho": eva.rho, "tau": eva.tau, "use_label_mask": eva.use_label_mask},
    }
    return Built(peft_model, [m for m in kept if m in ranks], info)


def build_model(job: FinetuneJob, opts: Options, prep: Prepared, model, train_loader) -> Built:
    """The method's trainable model, the modules that carry an adapter, and what else the report needs."""
    ctx = BuildContext(
        job=job,
        opts=opts,
        prep=prep,
        model=model,
        train_loader=train_loader,
        heads=detect_task_heads(model),
        task_type=infer_task_type(type(model).__name__),
    )
    return FAMILIES[job.family].build(ctx)


def run_finetune(job: FinetuneJob) -> dict:
    """Build the method's model and fine-tune it with the shared loop."""
    family = FAMILIES[job.family]
    opts = job_options(job)
    seed = opts.seed
    prep = _prepared(job, opts)
    data = prep.data
    opts, compute = family.training_options(job, opts, len(prep.train_items))
    reset_peak_memory()
    seed_everything(seed, deterministic=opts.full_determinism)
    dev = device()
    model = _model(opts, prep, dev)
    train_loader = loader(prep, prep.train_items, opts.batch_size, shuffle=True, seed=seed + 2)
    built = build_model(job, opts, prep, model, train_loader)
    peft_model, kept, info = built.model, built.kept, built.info
    peft_model.to(dev)

    batches = OnDevice(eval_loader(prep, opts.eval_batch_size), dev)
    eval_time = [0.0]

    def evaluate(m):
        t = time.perf_counter()
        result = evaluate_model(m, batches, data.kind, data.metrics)
        eval_time[0] += time.perf_counter() - t
        return result

    total = finetune_steps(opts, len(prep.train_items))
    start = built.start_step
    curve0 = []
    if family.starts_from_search(opts):  # the weights inherited from the search (at step S when it was S of T)
        per_epoch = len(train_loader) / opts.gradient_accumulation_steps  # optimiser steps per pass, as the loop
        curve0 = [{"step": start, "epoch": start / per_epoch, **evaluate(peft_model)}]
    options = dataclasses.replace(
        opts.finetune_options(), lr=job.lr, eval_every=eval_every(opts, total, job.eval_points)
    )
    before = eval_time[0]
    hooked: dict[str, Any] = {}
    with family.during_finetune(peft_model, hooked):
        result = finetune(
            model=peft_model,
            train_loader=train_loader,
            evaluate=evaluate,
            options=options,
            main_metric=data.main_metric,
            greater_is_better=higher_is_better(data.main_metric),
            accelerator=accelerator_for(dev, opts.mixed_precision),
            progress=False,
            desc=job.label,
            start_step=start,
            optimizer_state=built.optimizer_state,
        )
    ft_eval = eval_time[0] - before
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
    out: dict[str, Any] = {
        "kind": "finetune",
        "method": job.label,
        "family": job.family,
        "seed": seed,
        "lr": job.lr,
        "rho": opts.keep_ratio if family.reports_rho else None,
        "rank": opts.rank,
        "kept_modules": len(kept),
        "kept_module_names": kept,
        "trainable_params": count_trainable(peft_model),
        "lora_params": lora_params,
        # --keep-best restores the best evaluation's weights: report those scores (picked on the scored rows)
        "final": result.best_metrics if opts.keep_best else result.final_metrics,
        "curve": curve0 + result.curve,
        "steps": result.steps,
        "best_step": result.best_step,
        # optimiser steps on the weights the model trained: those of the search it inherits its weights from (its
        # weight steps), then the fine-tune's; LoRA-all takes finetune_steps alone
        **step_counts(family.inherited_search_steps(job, opts), result.steps),
        "finetune_seconds": result.seconds - ft_eval,
        "eval_seconds": ft_eval,
        "search_seconds": info.pop("search_seconds", 0.0),
        "export_seconds": info.pop("export_seconds", 0.0),
        "loss_first": statistics.mean(result.losses[:10]),
        "loss_last": statistics.mean(result.losses[-10:]),
        **({"compute_matched": compute} if compute else {}),
        **info,
        **peak_memory(),
    }
    out.update(hooked)
    family.account(peft_model, out)
    return out


def step_counts(search_steps: int, finetune_steps: int) -> dict[str, int]:
    return {
        "search_steps": int(search_steps),
        "finetune_steps": int(finetune_steps),
        "total_steps": int(search_steps) + int(finetune_steps),
    }


# --------------------------------------------------------------------------------------------------- timing
def run_timing(job: TimingJob) -> dict:
    """Median step times, interleaved round by round on the same batches: PEFT LoRA step (reference), plain
    forward+backward (the cost any gate step must pay), DiffoRA weight step, gate step, search iteration, the
    single-level search's joint step, and a fine-tuning step of the exported DiffoRA model."""
    from peft import get_peft_model

    opts = job_options(job)
    prep = _prepared(job, opts)
    rounds = int(job.rounds)
    dev = device()
    torch.manual_seed(0)
    batches = [
        next(iter(OnDevice(loader(prep, prep.train_items, opts.batch_size, shuffle=True, seed=100 + i), dev)))
        for i in range(4)
    ]
    timing_opts = dataclasses.replace(opts, seed=0)
    model = _model(timing_opts, prep, dev)
    heads, task_type = detect_task_heads(model), infer_task_type(type(model).__name__)
    grid = find_candidates(model, opts.target_types)
    lora = get_peft_model(
        model,
        lora_config_for(
            grid.module_names(),
            rank=opts.rank,
            alpha=opts.alpha,
            dropout=opts.lora_dropout,
            modules_to_save=heads,
            task_type=task_type,
        ),
    )
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=opts.lr)
    cfg = dataclasses.replace(timing_opts.search_config(), gate_warmup_steps=0, seed=0)
    search = new_search(_model(timing_opts, prep, dev), timing_opts, cfg)
    donor = new_search(_model(timing_opts, prep, dev), timing_opts, cfg)
    for i in range(3):
        donor.weight_step(batches[i % 4])
        donor.gate_step(batches[(i + 1) % 4], batches[i % 4])
    final = export_search(donor, choose_modules(donor, keep_ratio=opts.keep_ratio))
    final_opt = torch.optim.AdamW([p for p in final.parameters() if p.requires_grad], lr=opts.lr)
    lora.train()
    final.train()
    times: dict[str, list[float]] = {
        k: []
        for k in ("lora_step", "fwd_bwd", "weight_step", "gate_step", "search_iteration", "joint_step", "final_step")
    }

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(key, fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times[key].append(time.perf_counter() - t)

    def lora_step(batch, m=lora, opt=lora_opt):
        loss = m(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd(batch):
        loss = lora(**batch).loss
        loss.backward()
        lora_opt.zero_grad(set_to_none=True)

    for r in range(rounds + 1):
        wb, gb = batches[r % 4], batches[(r + 1) % 4]
        timed("lora_step", lambda: lora_step(wb))
        timed("fwd_bwd", lambda: fwd_bwd(wb))
        timed("weight_step", lambda: search.weight_step(wb))
        timed("gate_step", lambda: search.gate_step(gb, wb))
        timed("search_iteration", lambda: (search.weight_step(wb), search.gate_step(gb, wb)))
        timed("joint_step", lambda: search.joint_step(wb))  # a single-level search iteration
        timed("final_step", lambda: lora_step(wb, final, final_opt))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round is warm-up
    return {
        "kind": "timing",
        "rounds": rounds,
        "batch_tokens": [list(x["input_ids"].shape) for x in batches],
        "median_seconds": med,
        "samples": times,
        "ratios": {
            "search_iteration_over_lora_step": med["search_iteration"] / med["lora_step"],
            "search_iteration_over_lora_step_plus_gate_step": med["search_iteration"]
            / (med["lora_step"] + med["gate_step"]),
            "search_iteration_over_lora_step_plus_fwd_bwd": med["search_iteration"]
            / (med["lora_step"] + med["fwd_bwd"]),
            "gate_step_over_fwd_bwd": med["gate_step"] / med["fwd_bwd"],
            "weight_step_over_lora_step": med["weight_step"] / med["lora_step"],
            "final_step_over_lora_step": med["final_step"] / med["lora_step"],
            "joint_step_over_lora_step": med["joint_step"] / med["lora_step"],
        },
    }


# -------------------------------------------------------------------------------------------------- running
RUNNERS = {"search": run_search, "finetune": run_finetune, "timing": run_timing}


def execute(job: JobSpec) -> dict:
    """Run one job; never raises (a failure is returned as ``error``, one line, plus its traceback)."""
    start = time.perf_counter()
    try:
        out = RUNNERS[job.kind](job)
    except Exception as exc:  # a failed job is recorded; the comparison goes on
        out = {"kind": job.kind, "error": one_line(exc), "traceback": traceback.format_exc()}
    out.update(
        id=job.id,
        key=job.key,
        job_seconds=time.perf_counter() - start,
        finished_at=_dt.datetime.now().isoformat(timespec="seconds"),
        pid=os.getpid(),
    )
    return out
