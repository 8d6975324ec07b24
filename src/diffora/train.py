"""Step 6 of the pipeline: fine-tune the exported LoRA (kept modules + head) with accelerate.

An ordinary PEFT training loop — the point of DiffoRA is *which* modules are trained, not how: AdamW, linear
warm-up then linear decay, weight decay, gradient clipping, evaluation every N steps, and the best evaluation
checkpoint restored at the end. Data parallelism (``accelerate launch`` / ``torchrun``) comes from accelerate.

With the 'continue' hand-off (:mod:`diffora.method.handoff`) the loop starts at the search's step ``S`` of the same
``T``-step schedule, with the AdamW state the search left: :func:`continue_finetune`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import DataError, SearchStateError, TrainingError
from .method.config import FinetuneOptions
from .method.export import export_search
from .method.handoff import (
    OptimizerState,
    carry_optimizer_state,
    finetune_total_steps,
    linear_schedule,
    load_optimizer_state,
)
from .store.checkpoint import Checkpointer, ResumableLoader

EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    final_metrics: dict[str, float]
    best_metrics: dict[str, float]
    best_step: int
    curve: list[dict[str, Any]]
    losses: list[float]
    #: the schedule step this fine-tune started at (the search's steps under the 'continue' hand-off); ``steps``
    #: counts the steps taken here, so ``start_step + steps`` is the schedule's total
    start_step: int = 0


def finetune(
    model: nn.Module,
    train_loader: Any,
    evaluate: Optional[EvalFn],
    options: FinetuneOptions,
    *,
    main_metric: Optional[str] = None,
    greater_is_better: bool = True,
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "fine-tune",
    checkpointer: Optional[Checkpointer] = None,
    resume: bool = False,
    checkpoint_extra: Optional[dict[str, Any]] = None,
    start_step: int = 0,
    optimizer_state: Optional[OptimizerState] = None,
) -> FinetuneResult:
    """Train ``model``'s trainable parameters on ``train_loader``; evaluate with ``evaluate(model)``.

    ``accelerator`` (an ``accelerate.Accelerator``) wraps model, optimiser and loader for data parallelism; without
    one the loop runs in this process. With a ``checkpointer`` the loop saves its full state every N steps (and on
    SIGINT/SIGTERM); ``resume=True`` continues from the saved state bit-identically (single process).

    ``start_step`` > 0 continues a schedule that earlier optimiser steps (the search's, 'continue' hand-off) began:
    the schedule still spans the ``T`` steps ``options`` give, starts at ``start_step``, and ``T - start_step`` steps
    run. ``optimizer_state`` (parameter name -> AdamW state, :func:`diffora.method.handoff.carry_optimizer_state`)
    is loaded before the first step; a resumed run takes both from its checkpoint instead.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    if len(train_loader) == 0:
        raise TrainingError("the training data is empty")
    if optimizer_state:
        load_optimizer_state(optimizer, model, optimizer_state)
    distributed = accelerator.num_processes > 1
    accumulation = options.gradient_accumulation_steps
    total = finetune_total_steps(len(train_loader), options, accelerator.num_processes)
    if not 0 <= start_step < total:
        raise TrainingError(
            f"the fine-tune would start at step {start_step} of its {total}: nothing would be left "
            "to train; shorten the search or raise --epochs"
        )
    scheduler = linear_schedule(optimizer, total, options.warmup_ratio, start=start_step)
    if distributed:
        wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    else:
        wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        loader = ResumableLoader(train_loader)
    per_epoch = len(loader) / accumulation  # optimiser steps per pass over the data
    every = options.eval_every or max(1, math.ceil(per_epoch))
    eval_steps = set(range(every, total + 1, every)) | {total}
    unwrapped = accelerator.unwrap_model(wrapped)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}

    s = _LoopState(step=start_step)
    if resume and checkpointer is not None:
        saved = checkpointer.load("finetune")
        if saved is not None:
            try:
                s = _LoopState.restore(saved, trainable, optimizer, scheduler, loader)
                Checkpointer.restore_rng(saved)
            except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # another version's or a damaged file
                raise DataError(
                    f"{checkpointer.path('finetune')} does not fit this run or this diffora version "
                    f"({type(exc).__name__}: {exc}); delete it or start over with --overwrite"
                ) from None

    def save() -> None:
        state = s.to_state(trainable, optimizer, scheduler, loader)
        checkpointer.save("finetune", {**state, **(checkpoint_extra or {})})

    start = time.perf_counter() - s.seconds
    bar = tqdm(
        total=total,
        initial=s.step,
        desc=desc,
        dynamic_ncols=True,
        disable=not progress or not accelerator.is_main_process,
    )
    wrapped.train()
    micro, step_loss = 0, 0.0
    guard = checkpointer.catching_signals() if checkpointer is not None else contextlib.nullcontext()
    with guard:
        if checkpointer is not None and s.step == start_step and not distributed:
            # the starting point (weights and, under the 'continue' hand-off, the AdamW state from the search)
            save()
        while s.step < total:
            for batch in loader:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                # Micro-batches run back to back across the end of an epoch; a step is `accumulation` of them, and
                # checkpoints fall only between steps, so a resumed run regroups the same micro-batches.
                micro += 1
                last = micro == accumulation
                with contextlib.nullcontext() if last or not distributed else accelerator.no_sync(wrapped):
                    loss = wrapped(**batch).loss
                    if not torch.isfinite(loss.detach()):
                        raise TrainingError(
                            f"the training loss became {float(loss.detach())} at step {s.step}; lower the learning "
                            "rate (--lr) or check the data for invalid labels"
                            + (f"; the last good checkpoint is {checkpointer.path('finetune')}" if checkpointer else "")
                        )
                    accelerator.backward(loss / accumulation)
                step_loss += float(loss.detach()) / accumulation
                if not last:
                    continue
                micro = 0
                if options.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, options.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                s.step += 1
                s.losses.append(step_loss)
                step_loss = 0.0
                bar.update(1)
                postfix = {"loss": f"{s.losses[-1]:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
                if evaluate is not None and s.step in eval_steps:
                    metrics = evaluate(unwrapped)
                    s.curve.append({"step": s.step, "epoch": s.step / per_epoch, **metrics})
                    s.final_metrics = metrics
                    if main_metric is not None:
                        value = metrics[main_metric]
                        postfix[main_metric] = f"{value:.4f}"
                        better = s.best_value is None or (
                            value > s.best_value if greater_is_better else value < s.best_value
                        )
                        if better:
                            s.best_value, s.best_step, s.best_metrics = value, s.step, dict(metrics)
                            if options.keep_best:
                                s.best_state = {n: p.detach().clone() for n, p in trainable.items()}
                    wrapped.train()
                bar.set_postfix(postfix)
                if checkpointer is not None and not distributed and checkpointer.due(s.step):
                    s.seconds = time.perf_counter() - start
                    save()
                if s.step >= total:
                    break
    bar.close()
    seconds = time.perf_counter() - start
    if options.keep_best and s.best_state is not None and s.best_step != s.step:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(s.best_state[name])
    return FinetuneResult(
        steps=s.step - start_step,
        seconds=seconds,
        final_metrics=s.final_metrics,
        best_metrics=s.best_metrics or s.final_metrics,
        best_step=s.best_step or s.step,
        curve=s.curve,
        losses=s.losses,
        start_step=start_step,
    )


def continue_finetune(
    search: Any, selection: Any, train_loader: Any, evaluate: Optional[EvalFn], options: FinetuneOptions, **kwargs: Any
) -> tuple[nn.Module, FinetuneResult]:
    """The 'continue' hand-off's second phase: export the kept modules of ``search`` with weight sharing (consuming
    it) and fine-tune them from the search's step and AdamW state for the rest of the ``T`` steps that ``options``
    and ``train_loader`` give. The search must have run under :func:`diffora.method.handoff.attach_schedule` with
    the same ``T`` (and :func:`~diffora.method.handoff.continue_config`). ``kwargs`` go to :func:`finetune`.

    Returns ``(peft_model, result)``."""
    if search.weight_steps > 0 and search.weight_scheduler is None:
        raise SearchStateError(
            "the search ran without the fine-tune's schedule: call "
            "diffora.method.handoff.attach_schedule(search, total, warmup_ratio) before fit"
        )
    carried = carry_optimizer_state(search, selection)
    start = search.weight_steps
    model = export_search(search, selection, weight_sharing=True)
    return model, finetune(model, train_loader, evaluate, options, start_step=start, optimizer_state=carried, **kwargs)


@dataclass
class _LoopState:
    """What the fine-tuning loop must carry across a checkpoint."""

    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    best_value: Optional[float] = None
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_state: Optional[dict[str, torch.Tensor]] = None

    def to_state(self, trainable: dict, optimizer: Any, scheduler: Any, loader: ResumableLoader) -> dict[str, Any]:
        return {
            "weights": {n: p.detach().clone() for n, p in trainable.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "loop": {
                "step": self.step,
                "seconds": self.seconds,
                "losses": self.losses,
                "curve": self.curve,
                "best_value": self.best_value,
                "best_step": self.best_step,
                "best_metrics": self.best_metrics,
                "final_metrics": self.final_metrics,
            },
            "best_state": self.best_state or {},
        }

    @classmethod
    def restore(
        cls, saved: dict, trainable: dict, optimizer: Any, scheduler: Any, loader: ResumableLoader
    ) -> "_LoopState":
        if set(saved["weights"]) != set(trainable):
            raise TrainingError("the fine-tuning checkpoint belongs to another model or module selection")
        with torch.no_grad():
            for name, value in saved["weights"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        loader.load_state_dict(saved["loader"])
        loop = saved["loop"]
        return cls(
            step=int(loop["step"]),
            seconds=float(loop["seconds"]),
            losses=list(loop["losses"]),
            curve=list(loop["curve"]),
            best_value=loop["best_value"],
            best_step=int(loop["best_step"]),
            best_metrics=dict(loop["best_metrics"]),
            final_metrics=dict(loop["final_metrics"]),
            best_state=dict(saved["best_state"]) or None,
        )
