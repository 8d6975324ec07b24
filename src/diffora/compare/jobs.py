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
from pathlib import Path
from typing import Any, Optional

import torch

from ..method.candidates import DAMGrid, detect_task_heads, find_candidates
from ..method.config import SELECTION_SCORES
from ..select.quota import Selection, select_modules
from ..errors import ConfigError, TrainingError
from ..evaluation.metrics import higher_is_better
from ..evaluation.predict import evaluate_model
from ..method.export import count_trainable, infer_task_type, lora_config_for
from ..store.io import atomic_write_bytes, torch_load_safe
from ..cli.loading import load_model
from ..cli.options import Options
from ..runtime import seed_everything
from ..method.search import prepare_search
from ..select.choose import allocate_ranks, choose_modules, search_kernels
from ..data.splits import split_for_search
from ..train import finetune
from .data import OnDevice, Prepared, device, eval_loader, loader, prepared

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
    accumulation = getattr(opts, "gradient_accumulation_steps", 1)
    batches = math.ceil(n_weight_rows / opts.batch_size)
    return opts.search_steps or max(1, math.ceil(opts.search_epochs * batches / accumulation))


def new_search(model, opts: Options, config=None):
    """``prepare_search`` as ``diffora run`` calls it (the precision options only when set, so the defaults use the
    plain call)."""
    extra = {}
    if getattr(opts, "mixed_precision", "no") != "no":
        extra["mixed_precision"] = opts.mixed_precision
    return prepare_search(model, config or opts.search_config(), **extra)


def finetune_steps(opts: Options, n_train: int) -> int:
    """Optimiser steps of the fine-tune, as :func:`diffora.train.finetune` counts them."""
    accumulation = getattr(opts, "gradient_accumulation_steps", 1)
    return max(1, math.ceil(opts.epochs * math.ceil(n_train / opts.batch_size) / accumulation))


#: forward/backward passes of one gate step: first order one; second order four (the virtual weight step, the gate
#: loss at the virtual weights and the two finite-difference passes of the Hessian-vector product)
GATE_STEP_PASSES = {"first": 1, "second": 4}


def search_passes(search: dict) -> int:
    """Forward/backward passes of a finished search (its record): one per weight step, GATE_STEP_PASSES per gate
    step. A compute-matched method gets one optimiser step per pass."""
    return int(search["steps"]) + GATE_STEP_PASSES[search["config"]["order"]] * int(search["gate_steps"])


def epochs_for_steps(opts: Options, n_train: int, steps: int) -> float:
    """The (fractional) --epochs for which :func:`finetune_steps` gives exactly ``steps``: the shared loop keeps
    its schedule shape (warm-up ratio, linear decay) over the longer run."""
    accumulation = getattr(opts, "gradient_accumulation_steps", 1)
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
    cols = [j for j, (t, label) in enumerate(zip(grid.types, grid.labels))
            if label in QV_LABELS or any(t == s or t.endswith("." + s) for s in QV_SUFFIXES)]
    return [name for row in grid.names for j, name in enumerate(row) if j in cols and name is not None]


def eva_check(grid: DAMGrid, model: Any, rank: int, rho: float, where: str) -> None:
    """EVA computes up to round(rank * eva_rho) principal components of each module's input: no more than the
    input has features."""
    wanted = round(rank * rho)
    for name in grid.module_names():
        module = model.get_submodule(name)
        features = getattr(module, "in_features", None) or module.weight.shape[0]  # Conv1D stores (in, out)
        if wanted > features:
            raise ConfigError(f"{where}: EVA needs {wanted} components (rank {rank} x eva_rho {rho:g}) but "
                              f"'{name}' has only {features} input features; lower --rank or eva_rho")


def random_selection(grid: DAMGrid, keep_ratio: float, seed: int, rank: int, granularity: str = "layer") -> Selection:
    """Uniform random scores through DiffoRA's own discretisation: as many modules, per layer, as DiffoRA keeps."""
    g = torch.Generator().manual_seed(10_000 + 1000 * seed + int(round(keep_ratio * 100)))
    scores = torch.rand(grid.shape, generator=g).tolist()
    return select_modules(grid, scores, keep_ratio, granularity, rank=rank)


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
        raise ConfigError(f"this process already runs accelerate with another mixed precision ({exc}); run the "
                          "comparison with --workers 1 or more, or in a new process") from None


def job_options(job: dict) -> Options:
    return Options(**job["options"])


def _prepared(job: dict, opts: Options) -> Prepared:
    return prepared(opts, job["split"], job.get("holdout_rows", 0))


def _model(opts: Options, prep: Prepared, dev: torch.device):
    model, _ = load_model(opts, prep.data, device=dev)
    return model.to(dev) if not getattr(opts, "load_in_4bit", False) else model


# -------------------------------------------------------------------------------------------------- search
def run_search(job: dict) -> dict:
    """The bi-level search of ``diffora run``; its state is saved so each method can export from it."""
    opts = job_options(job)
    seed = opts.seed
    prep = _prepared(job, opts)
    reset_peak_memory()
    seed_everything(seed)
    dev = device()
    model = _model(opts, prep, dev)
    config = opts.search_config()
    start = time.perf_counter()
    w_idx, g_idx = split_for_search(len(prep.train_items), config.gate_fraction, seed)
    steps = search_steps(opts, len(w_idx))
    w_loader = loader(prep, [prep.train_items[i] for i in w_idx], opts.batch_size, shuffle=True, seed=seed)
    g_loader = loader(prep, [prep.train_items[i] for i in g_idx], opts.batch_size, shuffle=True, seed=seed + 1)
    search = new_search(model, opts, config)
    accumulation = getattr(opts, "gradient_accumulation_steps", 1)
    search.fit(OnDevice(w_loader, dev), OnDevice(g_loader, dev), steps, progress=False,
               **({"accumulation_steps": accumulation} if accumulation > 1 else {}))
    seconds = time.perf_counter() - start
    save_state(Path(job["state_path"]), search.state_dict())
    record = search.record(None, task=prep.data.name, seed=seed, search_steps=steps, model=opts.model,
                           weight_split_rows=len(w_idx), gate_split_rows=len(g_idx))
    record.pop("history", None)
    return {
        "kind": "search", "seed": seed, "config": config.to_dict(), "steps": steps, "gate_steps": search.gate_steps,
        "weight_split_rows": len(w_idx), "gate_split_rows": len(g_idx), "seconds": seconds,
        "gates": search.gate_values(),
        "scores": {score: search.selection_scores(score) for score in SELECTION_SCORES
                   if score != "ntk" and (score != "taylor" or config.gate == "sigmoid")},
        "gate_snapshots": [{"step": s, "gates": g} for s, g in search.history.gate_snapshots],
        "weight_loss": search.history.weight_losses, "gate_loss": search.history.gate_losses,
        "record": record, "total_lora_params": all_modules(search.grid, config.rank).lora_params,
        **peak_memory(),
    }


# ------------------------------------------------------------------------------------------------ fine-tune
def _fresh_lora(model, config, seed: int):
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # the init stream of DiffoRA's export without weight sharing
        return get_peft_model(model, config)


def build_model(job: dict, opts: Options, prep: Prepared, model, train_loader) -> tuple[Any, list[str], dict]:
    """The method's trainable model, the modules that carry an adapter, and what else the report needs."""
    from peft import AdaLoraConfig, EvaConfig, LoraConfig, initialize_lora_eva_weights

    family, seed = job["family"], opts.seed
    heads = detect_task_heads(model)
    task_type = infer_task_type(type(model).__name__)
    info: dict[str, Any] = {}

    def lora(modules: list[str], rank: int, **extra):
        fan_in_fan_out = any(type(model.get_submodule(m)).__name__ == "Conv1D" for m in modules)
        config = lora_config_for(modules, rank=rank, alpha=opts.alpha, dropout=opts.lora_dropout,
                                 modules_to_save=heads, task_type=task_type, fan_in_fan_out=fan_in_fan_out)
        for key, value in extra.items():
            setattr(config, key, value)
        return config

    if family in ("diffora", "random-ws"):
        t0 = time.perf_counter()
        search = new_search(model, opts)
        search.load_state_dict(torch_load_safe(job["search"]["state_path"]))
        ranks = None
        if family == "diffora":
            kernels = None
            if opts.selection_score == "ntk":  # the same gate-split rows diffora run uses
                _, g_idx = split_for_search(len(prep.train_items), search.config.gate_fraction, seed)
                rows = [prep.train_items[i] for i in g_idx[: opts.ntk_examples]]
                kernels = search_kernels(search, loader(prep, rows, min(8, opts.batch_size), shuffle=False, seed=0),
                                         opts.ntk_examples)
            selection = choose_modules(search, kernels, keep_ratio=opts.keep_ratio, granularity=opts.granularity)
            ranks = allocate_ranks(search, selection, kernels)
            if ranks is not None:
                info["ranks"] = ranks
        else:
            selection = random_selection(search.grid, opts.keep_ratio, seed, opts.rank, opts.granularity)
        peft_model = search.export(selection, weight_sharing=opts.weight_sharing, ranks=ranks)
        info["export_seconds"] = time.perf_counter() - t0
        info["search_seconds"] = job["search"]["seconds"]
        return peft_model, selection.modules, info
    grid = find_candidates(model, opts.target_types)
    if family == "random":
        kept = random_selection(grid, opts.keep_ratio, seed, opts.rank, opts.granularity).modules
        return _fresh_lora(model, lora(kept, opts.rank), seed), kept, info
    if family in ("lora-all", "lora-all-cm"):
        kept = grid.module_names()
        return _fresh_lora(model, lora(kept, opts.rank), seed), kept, info
    if family == "lora-qv":
        kept = qv_modules(grid)
        return _fresh_lora(model, lora(kept, opts.rank), seed), kept, info
    if family == "lora-matched":
        from ..select.ranks import rank_pattern_for

        ranks = matched_ranks(grid, opts.rank, job["target_lora_params"])
        base = statistics.mode(ranks.values())
        kept = grid.module_names()
        peft_model = _fresh_lora(model, lora(kept, base, rank_pattern=rank_pattern_for(ranks, base)), seed)
        info.update(matched_ranks=sorted(set(ranks.values())), target_lora_params=job["target_lora_params"])
        return peft_model, kept, info
    if family == "adalora":
        kept = grid.module_names()
        total = finetune_steps(opts, len(prep.train_items))
        target_r = max(1, round(opts.rank * opts.keep_ratio))
        init_r = math.ceil(1.5 * target_r)
        config = AdaLoraConfig(
            init_r=init_r, target_r=target_r, lora_alpha=opts.alpha, lora_dropout=opts.lora_dropout,
            tinit=max(1, int(0.1 * total)), tfinal=max(1, int(0.2 * total)), deltaT=max(1, total // 20),
            total_step=total, target_modules=kept, modules_to_save=heads or None, task_type=task_type,
        )
        info["adalora"] = {"init_r": init_r, "target_r": target_r, "tinit": config.tinit, "tfinal": config.tfinal,
                           "deltaT": config.deltaT, "total_step": total}
        return _fresh_lora(model, config, seed), kept, info
    if family == "eva":
        kept = grid.module_names()
        extra = job.get("extra", {})
        eva = EvaConfig(rho=float(extra.get("eva_rho", 2.0)), tau=float(extra.get("eva_tau", 0.99)),
                        use_label_mask=prep.data.kind == "causal_lm")
        base = lora(kept, opts.rank)
        config = LoraConfig(r=base.r, lora_alpha=base.lora_alpha, lora_dropout=base.lora_dropout,
                            target_modules=kept, modules_to_save=base.modules_to_save, task_type=base.task_type,
                            fan_in_fan_out=base.fan_in_fan_out, init_lora_weights="eva", eva_config=eva)
        peft_model = _fresh_lora(model, config, seed).to(device())
        t0 = time.perf_counter()
        calls = {"n": 0}

        def forward(m, inputs):
            calls["n"] += 1
            if calls["n"] > EVA_MAX_BATCHES:
                raise TrainingError(f"EVA's SVD did not converge within {EVA_MAX_BATCHES} batches; raise eva_tau's "
                                    "tolerance (e.g. 'eva[eva_tau=0.95]') or lower the rank")
            return m(**inputs)

        eva_loader = loader(prep, prep.train_items, opts.batch_size, shuffle=True, seed=seed + 3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 3)
            initialize_lora_eva_weights(peft_model, dataloader=eva_loader, forward_fn=forward, show_progress_bar=False)
        ranks = {n.replace("base_model.model.", ""): int(m.lora_A["default"].weight.shape[0])
                 for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        info.update(search_seconds=time.perf_counter() - t0, eva_batches=calls["n"], eva_ranks=ranks,
                    eva={"rho": eva.rho, "tau": eva.tau, "use_label_mask": eva.use_label_mask})
        return peft_model, [m for m in kept if m in ranks], info
    if family == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, [], info
    raise ConfigError(f"unknown method family {family!r}")


def run_finetune(job: dict) -> dict:
    """Build the method's model and fine-tune it with the shared loop."""
    opts = job_options(job)
    seed, family = opts.seed, job["family"]
    prep = _prepared(job, opts)
    data = prep.data
    compute: dict[str, int] = {}
    if family == "lora-all-cm":  # DiffoRA's fine-tune + one step per pass of its search, same schedule shape
        base = finetune_steps(opts, len(prep.train_items))
        compute = {"finetune_steps": base, "search_passes": int(job["search_passes"])}
        opts = dataclasses.replace(opts, epochs=epochs_for_steps(opts, len(prep.train_items),
                                                                 base + compute["search_passes"]))
    reset_peak_memory()
    seed_everything(seed)
    dev = device()
    model = _model(opts, prep, dev)
    train_loader = loader(prep, prep.train_items, opts.batch_size, shuffle=True, seed=seed + 2)
    peft_model, kept, info = build_model(job, opts, prep, model, train_loader)
    peft_model.to(dev)

    batches = OnDevice(eval_loader(prep, opts.eval_batch_size), dev)
    eval_time = [0.0]

    def evaluate(m):
        t = time.perf_counter()
        result = evaluate_model(m, batches, data.kind, data.metrics)
        eval_time[0] += time.perf_counter() - t
        return result

    curve0 = []
    if family in ("diffora", "random-ws") and opts.weight_sharing:
        curve0 = [{"step": 0, "epoch": 0.0, **evaluate(peft_model)}]  # the weights inherited from the search
    total = finetune_steps(opts, len(prep.train_items))
    options = dataclasses.replace(opts.finetune_options(), lr=job["lr"],
                                  eval_every=eval_every(opts, total, job.get("eval_points", 5)))
    handle, counter = None, {"step": 0}
    if family == "adalora":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def allocate(optimizer, args, kwargs):  # PEFT: every step, after optimizer.step(), before zero_grad()
            peft_model.base_model.update_and_allocate(counter["step"])
            counter["step"] += 1

        handle = register_optimizer_step_post_hook(allocate)
    before = eval_time[0]
    try:
        result = finetune(model=peft_model, train_loader=train_loader, evaluate=evaluate, options=options,
                          main_metric=data.main_metric, greater_is_better=higher_is_better(data.main_metric),
                          accelerator=accelerator_for(dev, getattr(opts, "mixed_precision", "no")), progress=False, desc=job["label"])
    finally:
        if handle is not None:
            handle.remove()
    ft_eval = eval_time[0] - before
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
    out: dict[str, Any] = {
        "kind": "finetune", "method": job["label"], "family": family, "seed": seed, "lr": job["lr"],
        "rho": opts.keep_ratio if family in ("diffora", "random", "random-ws", "lora-matched", "adalora") else None,
        "rank": opts.rank, "kept_modules": len(kept), "kept_module_names": kept,
        "trainable_params": count_trainable(peft_model), "lora_params": lora_params,
        # --keep-best restores the best evaluation's weights: report those scores (picked on the scored rows)
        "final": result.best_metrics if opts.keep_best else result.final_metrics, "curve": curve0 + result.curve,
        "steps": result.steps, "best_step": result.best_step,
        "finetune_seconds": result.seconds - ft_eval, "eval_seconds": ft_eval,
        "search_seconds": info.pop("search_seconds", 0.0), "export_seconds": info.pop("export_seconds", 0.0),
        "loss_first": statistics.mean(result.losses[:10]), "loss_last": statistics.mean(result.losses[-10:]),
        **({"compute_matched": compute} if compute else {}), **info, **peak_memory(),
    }
    if family == "adalora":
        out["adalora_allocate_calls"] = counter["step"]
        eff_params, eff_rank = 0, {}
        for name, module in peft_model.named_modules():
            e = getattr(module, "lora_E", None)
            if e is not None and "default" in e:
                r_eff = int((e["default"].detach() != 0).sum())
                base = module.get_base_layer()
                eff_params += r_eff * (base.in_features + base.out_features + 1)
                eff_rank[name.replace("base_model.model.", "")] = r_eff
        out.update(adalora_effective_lora_params=eff_params, adalora_final_ranks=eff_rank,
                   adalora_total_rank=sum(eff_rank.values()))
    return out


# --------------------------------------------------------------------------------------------------- timing
def run_timing(job: dict) -> dict:
    """Median step times, interleaved round by round on the same batches: PEFT LoRA step (reference), plain
    forward+backward (the cost any gate step must pay), DiffoRA weight step, gate step, search iteration, and a
    fine-tuning step of the exported DiffoRA model."""
    from peft import get_peft_model

    opts = job_options(job)
    prep = _prepared(job, opts)
    rounds = int(job["rounds"])
    dev = device()
    torch.manual_seed(0)
    batches = [next(iter(OnDevice(loader(prep, prep.train_items, opts.batch_size, shuffle=True, seed=100 + i), dev)))
               for i in range(4)]
    timing_opts = dataclasses.replace(opts, seed=0)
    model = _model(timing_opts, prep, dev)
    heads, task_type = detect_task_heads(model), infer_task_type(type(model).__name__)
    grid = find_candidates(model, opts.target_types)
    lora = get_peft_model(model, lora_config_for(grid.module_names(), rank=opts.rank, alpha=opts.alpha,
                                                 dropout=opts.lora_dropout, modules_to_save=heads,
                                                 task_type=task_type))
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=opts.lr)
    cfg = dataclasses.replace(timing_opts.search_config(), gate_warmup_steps=0, seed=0)
    search = new_search(_model(timing_opts, prep, dev), timing_opts, cfg)
    donor = new_search(_model(timing_opts, prep, dev), timing_opts, cfg)
    for i in range(3):
        donor.weight_step(batches[i % 4])
        donor.gate_step(batches[(i + 1) % 4], batches[i % 4])
    final = donor.export(donor.discretize(opts.keep_ratio))
    final_opt = torch.optim.AdamW([p for p in final.parameters() if p.requires_grad], lr=opts.lr)
    lora.train()
    final.train()
    times: dict[str, list[float]] = {k: [] for k in ("lora_step", "fwd_bwd", "weight_step", "gate_step",
                                                      "search_iteration", "final_step")}

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
        timed("final_step", lambda: lora_step(wb, final, final_opt))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first round is warm-up
    return {
        "kind": "timing", "rounds": rounds, "batch_tokens": [list(x["input_ids"].shape) for x in batches],
        "median_seconds": med, "samples": times,
        "ratios": {
            "search_iteration_over_lora_step": med["search_iteration"] / med["lora_step"],
            "search_iteration_over_lora_step_plus_gate_step": med["search_iteration"] / (med["lora_step"] + med["gate_step"]),
            "search_iteration_over_lora_step_plus_fwd_bwd": med["search_iteration"] / (med["lora_step"] + med["fwd_bwd"]),
            "gate_step_over_fwd_bwd": med["gate_step"] / med["fwd_bwd"],
            "weight_step_over_lora_step": med["weight_step"] / med["lora_step"],
            "final_step_over_lora_step": med["final_step"] / med["lora_step"],
        },
    }


# -------------------------------------------------------------------------------------------------- running
RUNNERS = {"search": run_search, "finetune": run_finetune, "timing": run_timing}


def execute(job: dict) -> dict:
    """Run one job; never raises (a failure is returned as ``error``, one line, plus its traceback)."""
    start = time.perf_counter()
    try:
        out = RUNNERS[job["kind"]](job)
    except Exception as exc:  # a failed job is recorded; the comparison goes on
        out = {"kind": job["kind"], "error": one_line(exc), "traceback": traceback.format_exc()}
    out.update(id=job["id"], key=job["key"], job_seconds=time.perf_counter() - start,
               finished_at=_dt.datetime.now().isoformat(timespec="seconds"), pid=os.getpid())
    return out
