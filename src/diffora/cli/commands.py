"""The pipeline behind the four CLI commands: ``run`` (search → discretise → export → fine-tune → evaluate →
save), ``search``, ``train`` and ``eval``. Each returns the metrics dict it wrote."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..data.models import check_4bit_support
from ..data.splits import split_for_search
from ..errors import ConfigError, DataError, ModelError, ResourceError, TrainingError
from ..evaluation.metrics import higher_is_better, majority_baseline
from ..evaluation.predict import evaluate_model
from ..method.export import count_trainable, export_search, fresh_lora
from ..method.handoff import (
    attach_schedule,
    carry_optimizer_state,
    continue_config,
    finetune_total_steps,
    search_steps_within,
)
from ..method.schedule import check_warmup, gate_warmup, search_length
from ..method.search import prepare_search
from ..runtime import peak_gpu_mib, peak_rss_mib, seed_everything
from ..select.choose import allocate_ranks, choose_modules, diagnostic, search_kernels
from ..select.quota import select_modules
from ..store.checkpoint import Checkpointer, ResumableLoader
from ..store.io import atomic_write_json, check_adapter_weights, load_error_detail
from ..store.record import load_record, search_record
from ..train import finetune
from .loading import TaskData, encode, load_model, load_task_data, make_loader
from .options import Options, with_new_defaults
from .outputs import RESUME_VOLATILE, check_output_dir, check_output_file, json_safe, output_lock, write_outputs


def build_accelerator(opts: Optional[Options] = None):
    from accelerate import Accelerator

    if opts is not None and opts.threads > 0:
        torch.set_num_threads(opts.threads)
    if opts is not None:
        check_device_options(opts)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=opts.mixed_precision if opts is not None else "no"
    )
    sharded = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}
    if accelerator.distributed_type.name in sharded:  # every rank sees the same launcher config: all refuse alike
        raise ConfigError(
            f"diffora does not support sharded training ({accelerator.distributed_type.name}) yet: the search and "
            "the export read whole LoRA weights, so a sharded run would export a wrong adapter; launch plain data "
            "parallel instead (accelerate launch --multi_gpu, or torchrun)"
        )
    return accelerator


@contextlib.contextmanager
def _guarded(opts: Options, out: Optional[Path], accelerator: Any) -> Iterator[None]:
    """One run per output folder at a time (a lock), and out-of-memory as a one-line error."""
    with contextlib.ExitStack() as stack:
        if out is not None:
            stack.enter_context(output_lock(out, accelerator))
        stack.enter_context(_out_of_memory_is_an_error(opts, out or Path(opts.output_dir)))
        yield


def check_device_options(opts: Options) -> None:
    """Refuse option combinations this machine cannot run, before any data or model is loaded."""
    cuda = torch.cuda.is_available()
    if not cuda and opts.dtype == "float16":
        raise ConfigError(
            "--dtype float16 needs a CUDA GPU (float16 training on the CPU is unsupported or very "
            "slow); use --dtype bfloat16 or float32 here"
        )
    if not cuda and opts.mixed_precision == "fp16":
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use --mixed-precision bf16 on the CPU")
    if opts.load_in_4bit:
        check_4bit_support()


@contextlib.contextmanager
def _out_of_memory_is_an_error(opts: Options, out: Path) -> Iterator[None]:
    """Running out of accelerator memory is the user's to fix: one line naming the knobs, exit 1, checkpoints kept."""
    try:
        yield
    except torch.OutOfMemoryError:
        checkpoints = out / "checkpoints"
        kept = (
            f"; the checkpoints in {checkpoints} were kept (rerun with --resume after changing only "
            "--quiet/--threads, or start over with the new settings and --overwrite)"
            if any(checkpoints.glob("*.pt"))
            else ""
        )
        raise ResourceError(
            f"out of memory on {'the GPU' if torch.cuda.is_available() else 'this device'} with --batch-size "
            f"{opts.batch_size}; lower --batch-size and raise --gradient-accumulation-steps (now "
            f"{opts.gradient_accumulation_steps}), add --gradient-checkpointing, or use --dtype bfloat16 / "
            f"--mixed-precision bf16 / --load-in-4bit{kept}"
        ) from None


def _say(opts: Options, accelerator: Any, text: str) -> None:
    if not opts.quiet and accelerator.is_main_process:
        print(text, flush=True)


class _Prepared:
    """Data, model, tokenizer and loaders shared by the jobs."""

    def __init__(self, opts: Options, accelerator: Any, *, need_train: bool = True, announce: bool = True) -> None:
        self.data: TaskData = load_task_data(opts, need_train=need_train)
        # a hub model's first download can take minutes: say what is happening (not for eval, whose stdout is JSON;
        # stderr is kept for the one-line errors)
        if announce:
            _say(opts, accelerator, f"loading model {opts.model} ...")
        self.model, self.tokenizer = load_model(opts, self.data, accelerator.device)
        limit = _position_limit(self.model, self.tokenizer)
        if limit is not None and opts.max_length > limit:
            raise ConfigError(
                f"--max-length {opts.max_length} is more than model '{opts.model}' can take ({limit} "
                f"tokens); pass --max-length {limit} or less"
            )
        kind = self.data.kind
        self.train_items = encode(self.data.train, self.tokenizer, kind, opts.max_length) if need_train else []
        self.eval_items = encode(self.data.eval, self.tokenizer, kind, opts.max_length)
        self.eval_loader = make_loader(
            self.eval_items, self.tokenizer, kind, opts.eval_batch_size, shuffle=False, seed=opts.seed
        )
        self.opts = opts
        self.accelerator = accelerator

    def loader(self, indices: Optional[list[int]], seed_offset: int, *, shard: bool = True):
        items = self.train_items if indices is None else [self.train_items[i] for i in indices]
        loader = make_loader(
            items, self.tokenizer, self.data.kind, self.opts.batch_size, shuffle=True, seed=self.opts.seed + seed_offset
        )
        return self.accelerator.prepare_data_loader(loader) if shard and self.accelerator.num_processes > 1 else loader

    def evaluate(self, model: Any) -> dict[str, float]:
        with self.accelerator.autocast():  # the same precision as training
            return evaluate_model(model, self.eval_loader, self.data.kind, self.data.metrics)

    def baseline(self) -> dict[str, float]:
        if self.data.kind == "causal_lm" or not self.data.train or self.data.train.labels is None:
            return {}
        return majority_baseline(self.data.train.labels, self.data.eval.labels, self.data.metrics)


def _position_limit(model: Any, tokenizer: Any) -> Optional[int]:
    """The longest input the model takes: its position table and the tokenizer's limit, where they are known."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    known = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(known) if known else None


def _checkpointer(opts: Options, accelerator: Any, out: Path) -> Checkpointer:
    # Exact resume is implemented for one process; data-parallel runs still stop cleanly on signals via the
    # accelerate launcher, but they do not write resumable checkpoints (documented in docs/reliability.md).
    enabled = accelerator.num_processes == 1 and opts.checkpoint_every > 0
    return Checkpointer(out / "checkpoints", every=opts.checkpoint_every, enabled=enabled)


def _check_same_options(saved: dict, opts: Options) -> None:
    now = {k: v for k, v in vars(opts).items() if k not in RESUME_VOLATILE}
    before = {k: v for k, v in with_new_defaults(saved, now).items() if k not in RESUME_VOLATILE}
    changed = sorted(k for k in now if before.get(k) != now[k])
    if changed:
        raise ConfigError(
            f"--resume needs the options of the interrupted run; these differ: {', '.join(changed)} "
            f"(was {before.get(changed[0])!r}, now {now[changed[0]]!r})"
        )


def _search(
    prep: _Prepared, opts: Options, ckpt: Optional[Checkpointer] = None, *, total: Optional[int] = None
) -> tuple[Any, Any, dict, float, Optional[dict]]:
    """Search + discretise + export; returns (peft_model, selection, record, seconds, carried optimiser state).

    ``total`` (the 'continue' hand-off): the search is the first part of a ``total``-step fine-tune, under its LR
    schedule and hyperparameters (:mod:`diffora.method.handoff`); the kept parameters' AdamW state is returned for
    the fine-tune to continue with (None otherwise)."""
    config = opts.search_config()
    continuing = total is not None
    if continuing:
        config = continue_config(config, opts.finetune_options())
    start = time.perf_counter()
    weight_idx, gate_idx = split_for_search(len(prep.train_items), config.gate_fraction, opts.seed)
    weight_loader, gate_loader = prep.loader(weight_idx, 0), prep.loader(gate_idx, 1)
    resumable = ckpt is not None and ckpt.enabled
    if resumable:
        weight_loader, gate_loader = ResumableLoader(weight_loader), ResumableLoader(gate_loader)
    search = prepare_search(prep.model, config, mixed_precision=opts.mixed_precision)
    rows, cols = search.grid.shape
    # fail before the search, not after it, when the discretisation cannot keep anything (e.g. a budget too small)
    select_modules(search.grid, [[0.0] * cols for _ in range(rows)], config.keep_ratio, config.granularity, config.rank)
    accumulation = opts.gradient_accumulation_steps
    # a search step is one optimiser step on the weights: --gradient-accumulation-steps micro-batches
    # 0 only when both lengths are 0, which Options allows for the ntk selection alone (it needs no search)
    steps = search_length(
        len(weight_loader), epochs=opts.search_epochs, steps=opts.search_steps, accumulation=accumulation
    )
    if continuing:
        steps = search_steps_within(steps, total)
    if steps > 0:
        check_warmup(
            steps,
            gate_warmup(steps, config),
            error=DataError,
            hint="add data, raise --search-epochs/--search-steps or lower --gate-warmup-steps",
        )
    previous_seconds = 0.0
    if resumable and opts.resume:
        saved = ckpt.load("search")
        if saved is not None:
            try:
                _check_same_options(saved["options"], opts)
                search.load_state_dict(saved["search"])
                weight_loader.load_state_dict(saved["weight_loader"])
                gate_loader.load_state_dict(saved["gate_loader"])
                previous_seconds = float(saved["seconds"])
                Checkpointer.restore_rng(saved)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise DataError(
                    f"{ckpt.path('search')} does not fit this diffora version or this run "
                    f"({load_error_detail(exc)}); start over with --overwrite"
                ) from None
    if continuing:  # after a restore: the LR is recomputed at the restored step, so checkpoints need not hold it
        attach_schedule(search, total, opts.warmup_ratio)

    def checkpoint(s: Any, _step: int) -> None:
        if resumable and ckpt.due(s.weight_steps):
            ckpt.save(
                "search",
                {
                    "search": s.state_dict(),
                    "weight_loader": weight_loader.state_dict(),
                    "gate_loader": gate_loader.state_dict(),
                    "options": vars(opts),
                    "seconds": previous_seconds + time.perf_counter() - start,
                },
            )

    try:
        with ckpt.catching_signals() if resumable else contextlib.nullcontext():
            if steps > 0:
                search.fit(
                    weight_loader,
                    gate_loader,
                    steps,
                    progress=not opts.quiet and prep.accelerator.is_main_process,
                    callback=checkpoint,
                    accumulation_steps=accumulation,
                )
    except TrainingError as exc:  # the loss diverged: say which options steer the search, and what was kept
        saved_search = resumable and ckpt.path("search").exists()
        kept = f"; the last good checkpoint is {ckpt.path('search')}" if saved_search else ""
        lr_flag = "--lr" if continuing else "--search-lr"
        raise TrainingError(f"{exc} (search options: {lr_flag}, --gate-lr){kept}") from None
    agree = _ranks_agree(search.gates.beta.detach())
    kernels = _module_kernels(prep, opts, search, gate_idx) if opts.ntk_examples else None
    selection = choose_modules(search, kernels)
    ranks = allocate_ranks(search, selection, kernels)
    extra = {}
    if kernels is not None:
        extra["ntk"] = diagnostic(search, kernels, selection, seed=opts.seed)
    if ranks is not None:
        extra["ranks"] = ranks
    if continuing:
        extra["handoff"] = {
            "mode": "continue",
            "search_steps": steps,
            "finetune_steps": total - steps,
            "total_steps": total,
        }
    seconds = previous_seconds + time.perf_counter() - start
    record = search_record(
        search,
        selection,
        model=opts.model,
        task=prep.data.name,
        seed=opts.seed,
        search_steps=steps,
        weight_split_rows=len(weight_idx),
        gate_split_rows=len(gate_idx),
        world_size=prep.accelerator.num_processes,
        ranks_agree=agree,
        **extra,
    )
    carried = carry_optimizer_state(search, selection) if continuing else None  # before the export consumes it
    peft_model = export_search(search, selection, ranks=ranks)
    if resumable:
        atomic_write_json(ckpt.folder / "dam.json", {**record, "search_seconds": seconds})
    return peft_model, selection, record, seconds, carried


def _module_kernels(prep: _Prepared, opts: Options, search: Any, gate_idx: list[int]) -> Any:
    """The LoRA kernels on the first ``--ntk-examples`` gate-split rows (the same rows on every rank, so
    data-parallel runs agree on an ntk selection without a collective)."""
    rows = [prep.train_items[i] for i in gate_idx[: opts.ntk_examples]]
    batches = make_loader(rows, prep.tokenizer, prep.data.kind, min(8, opts.batch_size), shuffle=False, seed=0)
    with prep.accelerator.autocast():
        return search_kernels(search, batches, opts.ntk_examples)


def _model_from_record(
    prep: _Prepared,
    opts: Options,
    modules: list[str],
    heads: Optional[list[str]] = None,
    ranks: Optional[dict[str, int]] = None,
) -> Any:
    """A fresh PEFT model with LoRA on ``modules`` (PEFT init), as the export would build it."""
    return fresh_lora(
        prep.model,
        modules,
        rank=opts.rank,
        alpha=opts.alpha,
        dropout=opts.lora_dropout,
        seed=opts.seed,
        heads=heads,
        ranks=ranks,
    )


def _ranks_agree(beta: torch.Tensor) -> bool:
    """Data-parallel runs must learn one DAM: compare every rank's betas bit for bit (True on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    gathered = [torch.empty_like(beta) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, beta.contiguous())
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the DAM differs between processes; data-parallel gate gradients were not synchronised")
    return True


def _finetune(
    prep: _Prepared,
    opts: Options,
    peft_model: Any,
    ckpt: Optional[Checkpointer] = None,
    *,
    start_step: int = 0,
    optimizer_state: Optional[dict] = None,
):
    main = prep.data.main_metric
    return finetune(
        peft_model,
        prep.loader(None, 2, shard=False),
        prep.evaluate,
        opts.finetune_options(),
        main_metric=main,
        greater_is_better=higher_is_better(main),
        accelerator=prep.accelerator,
        progress=not opts.quiet,
        checkpointer=ckpt if ckpt is not None and ckpt.enabled else None,
        resume=opts.resume,
        checkpoint_extra={"options": vars(opts)},
        start_step=start_step,
        optimizer_state=optimizer_state,
    )


def _metrics(
    prep: _Prepared,
    opts: Options,
    peft_model: Any,
    result: Any,
    *,
    kept: list[str],
    candidates: Optional[int],
    search_seconds: float,
    started: float,
    search_steps: int = 0,
) -> dict:
    """The metrics.json of a run. ``search_steps`` (the search's weight steps) and ``finetune_steps`` add up to
    ``total_steps``, the run's weight optimiser steps: under the 'continue' hand-off those of a LoRA-all fine-tune."""
    finetune_steps = result.steps if result is not None else 0
    final = prep.evaluate(peft_model)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
    return json_safe(
        {
            "task": prep.data.name,
            "kind": prep.data.kind,
            "main_metric": prep.data.main_metric,
            "eval": final,
            "majority_baseline": prep.baseline(),
            "train_rows": len(prep.train_items),
            "eval_rows": len(prep.eval_items),
            "trainable_params": count_trainable(peft_model),
            "lora_params": lora,
            "kept_modules": len(kept),
            "candidate_modules": candidates,
            "kept_module_names": kept,
            "search_seconds": search_seconds,
            "finetune_seconds": result.seconds if result is not None else 0.0,
            "total_seconds": time.perf_counter() - started,
            "finetune_steps": finetune_steps,
            "search_steps": search_steps,
            "total_steps": search_steps + finetune_steps,
            "best_step": result.best_step if result is not None else None,
            "learning_curve": result.curve if result is not None else [],
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(),
            "device": str(prep.accelerator.device),
            "seed": opts.seed,
            "world_size": prep.accelerator.num_processes,
            "options": {k: v for k, v in vars(opts).items()},
        }
    )


def run_job(opts: Options) -> dict:
    """Search, discretise, export, fine-tune and evaluate; write OUT/{adapter,dam.json,dam.png,metrics.json}."""
    started = time.perf_counter()
    out = check_output_dir(opts.output_dir, opts.overwrite, opts.resume)
    seed_everything(opts.seed, deterministic=opts.full_determinism)
    accelerator = build_accelerator(opts)
    with _guarded(opts, out, accelerator):
        prep = _Prepared(opts, accelerator)
        ckpt = _checkpointer(opts, accelerator, out)
        if opts.overwrite and not opts.resume and ckpt.folder.exists() and accelerator.is_main_process:
            import shutil

            shutil.rmtree(ckpt.folder)  # stale resume state of an earlier run must not leak into this one
        # 'continue' hand-off: the search is the first part of the T-step fine-tune LoRA-all would run on
        # _finetune's loader
        total = (
            finetune_total_steps(
                len(prep.loader(None, 2, shard=False)), opts.finetune_options(), accelerator.num_processes
            )
            if opts.handoff == "continue"
            else None
        )
        carried = None
        if opts.resume and ckpt.path("finetune").exists():
            saved = load_record(ckpt.folder / "dam.json")
            try:
                search_seconds = float(saved.pop("search_seconds"))
                record, modules = saved, saved["selection"]["modules"]
                # the fine-tune checkpoint holds the carried AdamW state and schedule; only its start is needed
                start = int(saved["handoff"]["search_steps"]) if total is not None else 0
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"{ckpt.folder / 'dam.json'} does not fit this diffora version or this run "
                    f"({load_error_detail(exc)}); start over with --overwrite"
                ) from None
            _check_same_options(ckpt.load("finetune").get("options", vars(opts)), opts)
            peft_model = _model_from_record(prep, opts, modules, saved.get("heads"), saved.get("ranks"))
        else:
            peft_model, selection, record, search_seconds, carried = _search(prep, opts, ckpt, total=total)
            modules = selection.modules
            start = record["handoff"]["search_steps"] if total is not None else 0
        result = _finetune(prep, opts, peft_model, ckpt, start_step=start, optimizer_state=carried)
        n_candidates = sum(1 for row in record["grid"]["names"] for n in row if n)
        metrics = _metrics(
            prep,
            opts,
            peft_model,
            result,
            kept=modules,
            candidates=n_candidates,
            search_seconds=search_seconds,
            started=started,
            search_steps=int(record.get("weight_steps", 0)),
        )
        if accelerator.is_main_process:
            write_outputs(
                out,
                adapter_model=peft_model,
                record=record,
                metrics=metrics,
                title=f"{prep.data.name} / {Path(opts.model).name}",
            )
        accelerator.wait_for_everyone()
        _say(opts, accelerator, summary(metrics, out))
        if record.get("diagnostics"):
            _say(opts, accelerator, _learned(record["diagnostics"]))
        return metrics


def _learned(diagnostics: dict) -> str:
    """One line on whether the search learned: the gate range, the two halves' agreement, and any warning."""
    text = f"  search: gates {diagnostics['gate_min']:.3f}..{diagnostics['gate_max']:.3f}"
    if diagnostics.get("heldout_signal") is not None:
        text += (
            f"; held-out gate loss {diagnostics['heldout_loss']:.4f} vs {diagnostics['heldout_reference']:.4f} "
            f"({diagnostics['heldout_baseline']})"
        )
    if diagnostics.get("agreement") is not None:
        text += (
            f"; two halves of the gate data agree {diagnostics['agreement']:.2f} on the kept set "
            "(1 = same set, 0 = random)"
        )
    if diagnostics.get("warning"):
        text += f"\n  warning: {diagnostics['warning']}"
    return text


def search_job(opts: Options) -> dict:
    """Search and discretise only; write OUT/{dam.json,dam.png,search_adapter/}."""
    started = time.perf_counter()
    out = check_output_dir(opts.output_dir, opts.overwrite)
    seed_everything(opts.seed, deterministic=opts.full_determinism)
    accelerator = build_accelerator(opts)
    with _guarded(opts, out, accelerator):
        prep = _Prepared(opts, accelerator)
        peft_model, selection, record, search_seconds, _ = _search(prep, opts)
        metrics = json_safe(
            {
                "task": prep.data.name,
                "search_seconds": search_seconds,
                "total_seconds": time.perf_counter() - started,
                "kept_modules": selection.num_kept,
                "kept_module_names": selection.modules,
                "lora_params": selection.lora_params,
                "peak_rss_mib": peak_rss_mib(),
                "seed": opts.seed,
                "options": vars(opts),
            }
        )
        if accelerator.is_main_process:
            write_outputs(
                out,
                record=record,
                metrics=metrics,
                extra_adapters={"search_adapter": peft_model},
                title=f"{prep.data.name} / {Path(opts.model).name}",
            )
        accelerator.wait_for_everyone()
        ntk = record.get("ntk")
        if ntk:
            _say(
                opts,
                accelerator,
                f"lambda_min of the LoRA kernel ({ntk['n_examples']} examples): kept set "
                f"{ntk['lambda_min_selected']:.3e}, above {ntk['selected_rank_among_random']:.0%} "
                f"of {len(ntk['lambda_min_random'])} random sets (mean {ntk['random_mean']:.3e}); "
                f"all candidates {ntk['lambda_min_all']:.3e}",
            )
        _say(
            opts,
            accelerator,
            f"kept {selection.num_kept} modules; search record in {out / 'dam.json'}, "
            f"heatmap {out / 'dam.png'}; fine-tune with: diffora train --dam {out / 'dam.json'} ...",
        )
        if record.get("diagnostics"):
            _say(opts, accelerator, _learned(record["diagnostics"]))
        return metrics


def train_job(opts: Options, dam: Optional[str] = None, modules: Optional[list[str]] = None) -> dict:
    """Fine-tune LoRA on the modules of a search record (``dam``) or an explicit module list."""
    from peft import PeftModel

    if (dam is None) == (modules is None):
        raise DataError("diffora train needs exactly one of --dam (a dam.json from diffora search) or --modules")
    started = time.perf_counter()
    out = check_output_dir(opts.output_dir, opts.overwrite)
    record = load_record(dam) if dam is not None else None
    if record is not None:
        if "selection" not in record:
            raise DataError(f"{dam} holds no selection; it was written before discretisation")
        modules = record["selection"].get("modules") if isinstance(record["selection"], dict) else None
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise DataError(
                f"{dam}: 'selection.modules' must be a non-empty list of module names; pass a dam.json "
                "written by 'diffora search'"
            )
        modules = list(modules)
    seed_everything(opts.seed, deterministic=opts.full_determinism)
    accelerator = build_accelerator(opts)
    with _guarded(opts, out, accelerator):
        prep = _Prepared(opts, accelerator)
        names = {n for n, _ in prep.model.named_modules()}
        missing = [m for m in modules if m not in names]
        if missing:
            if dam:
                raise ModelError(
                    f"search record {dam} names module '{missing[0]}' that model '{opts.model}' does not have "
                    "(a record from a different model?); rerun diffora search with this model"
                )
            example = next((n for n, m in prep.model.named_modules() if isinstance(m, torch.nn.Linear)), "")
            raise ModelError(
                f"--modules names module '{missing[0]}' that model '{opts.model}' does not have; pass full "
                f"module names such as '{example}'"
            )
        search_adapter = Path(dam).parent / "search_adapter" if dam else None
        if opts.weight_sharing and search_adapter is not None and (search_adapter / "adapter_config.json").exists():
            check_adapter_weights(search_adapter)
            try:
                peft_model = PeftModel.from_pretrained(prep.model, str(search_adapter), is_trainable=True)
            except (ValueError, KeyError, RuntimeError, OSError) as exc:
                raise DataError(
                    f"search adapter '{search_adapter}' does not fit model '{opts.model}' "
                    f"({load_error_detail(exc)}); drop --weight-sharing or rerun diffora search"
                ) from None
        else:
            peft_model = _model_from_record(prep, opts, modules, ranks=record.get("ranks") if record else None)
        result = _finetune(prep, opts, peft_model)
        candidates = sum(1 for row in record["grid"]["names"] for n in row if n) if record else None
        metrics = _metrics(
            prep, opts, peft_model, result, kept=modules, candidates=candidates, search_seconds=0.0, started=started
        )
        if accelerator.is_main_process:
            write_outputs(out, adapter_model=peft_model, record=record, metrics=metrics)
        accelerator.wait_for_everyone()
        _say(opts, accelerator, summary(metrics, out))
        return metrics


def eval_job(opts: Options, adapter: str, output_file: Optional[str] = None, model_given: bool = True) -> dict:
    """Score a saved adapter on the evaluation data; print the metrics as JSON (and write them to a file)."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter)
    if output_file:
        check_output_file(output_file)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DataError(f"'{adapter_dir}' is not a PEFT adapter folder (no adapter_config.json); pass OUT/adapter")
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # PEFT raises several types for a broken config
        raise DataError(
            f"'{adapter_dir}/adapter_config.json' cannot be read as a PEFT config ({exc.__class__.__name__}); "
            "pass the adapter folder a run wrote (OUT/adapter)"
        ) from None
    check_adapter_weights(adapter_dir)  # a damaged file is named before the model is loaded
    if not model_given and peft_config.base_model_name_or_path:
        opts.model = peft_config.base_model_name_or_path
    seed_everything(opts.seed, deterministic=opts.full_determinism)
    accelerator = build_accelerator(opts)
    with _guarded(opts, None, accelerator):
        prep = _Prepared(opts, accelerator, need_train=False, announce=False)
        try:
            model = PeftModel.from_pretrained(prep.model, str(adapter_dir))
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise DataError(
                f"adapter '{adapter_dir}' does not fit model '{opts.model}' ({load_error_detail(exc)}); "
                "pass the base model it was trained on with --model"
            ) from None
        metrics = json_safe(
            {
                "task": prep.data.name,
                "adapter": str(adapter_dir),
                "model": opts.model,
                "eval_rows": len(prep.eval_items),
                "eval": prep.evaluate(model),
            }
        )
        if output_file and accelerator.is_main_process:
            atomic_write_json(output_file, metrics)
        if accelerator.is_main_process:
            print(json.dumps(metrics, indent=2))
        return metrics


def summary(metrics: dict, out: Path) -> str:
    main = metrics["main_metric"]
    evals, base = metrics["eval"], metrics.get("majority_baseline") or {}
    lines = [
        "",
        f"diffora {metrics['task']}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in evals.items() if isinstance(v, (int, float))),
    ]
    if main in base:
        lines.append(f"  majority-class baseline {main}: {base[main]:.4f}  ->  {evals[main] - base[main]:+.4f}")
    kept = metrics["kept_modules"]
    cand = metrics.get("candidate_modules")
    lines.append(
        f"  kept modules: {kept}"
        + (f" of {cand}" if cand else "")
        + f"; trainable parameters: {metrics['trainable_params']:,} (LoRA {metrics['lora_params']:,})"
    )
    lines.append(
        f"  search {metrics['search_seconds']:.0f}s, fine-tune {metrics['finetune_seconds']:.0f}s, "
        f"peak RSS {metrics['peak_rss_mib']:.0f} MiB"
    )
    lines.append(f"  outputs: {out}/adapter (PEFT), dam.json, dam.png, metrics.json")
    return "\n".join(lines)
