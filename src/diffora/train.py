"""Step 6 of the pipeline: fine-tune the exported LoRA (kept modules + head) with accelerate.

An ordinary PEFT training loop — the point of DiffoRA is *which* modules are trained, not how: AdamW, linear
warm-up then linear decay, weight decay, gradient clipping, evaluation every N steps, and the best evaluation
checkpoint restored at the end. Data parallelism (``accelerate launch`` / ``torchrun``) comes from accelerate.
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
from transformers import get_linear_schedule_with_warmup

from .errors import TrainingError
from .method.config import FinetuneOptions
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
) -> FinetuneResult:
    """Train ``model``'s trainable parameters on ``train_loader``; evaluate with ``evaluate(model)``.

    ``accelerator`` (an ``accelerate.Accelerator``) wraps model, optimiser and loader for data parallelism; without
    one the loop runs in this process. With a ``checkpointer`` the loop saves its full state every N steps (and on
    SIGINT/SIGTERM); ``resume=True`` continues from the saved state bit-identically (single process).
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    if len(train_loader) == 0:
        raise TrainingError("the training data is empty")
    distributed = accelerator.num_processes > 1
    accumulation = options.gradient_accumulation_steps
    if distributed:
        batches = math.ceil(len(train_loader) / accelerator.num_processes)
        total = max(1, math.ceil(options.epochs * batches / accumulation))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(options.warmup_ratio * total), total)
        wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    else:
        total = max(1, math.ceil(options.epochs * len(train_loader) / accumulation))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(options.warmup_ratio * total), total)
        wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        loader = ResumableLoader(train_loader)
    per_epoch = len(loader) / accumulation  # optimiser steps per pass over the data
    every = options.eval_every or max(1, math.ceil(per_epoch))
    eval_steps = set(range(every, total + 1, every)) | {total}
    unwrapped = accelerator.unwrap_model(wrapped)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}

    s = _LoopState()
    if resume and checkpointer is not None:
        saved = checkpointer.load("finetune")
        if saved is not None:
            s = _LoopState.restore(saved, trainable, optimizer, scheduler, loader)
            Checkpointer.restore_rng(saved)

    def save() -> None:
        checkpointer.save("finetune", {**s.to_state(trainable, optimizer, scheduler, loader), **(checkpoint_extra or {})})

    start = time.perf_counter() - s.seconds
    bar = tqdm(total=total, initial=s.step, desc=desc, dynamic_ncols=True,
               disable=not progress or not accelerator.is_main_process)
    wrapped.train()
    micro, step_loss = 0, 0.0
    guard = checkpointer.catching_signals() if checkpointer is not None else contextlib.nullcontext()
    with guard:
        if checkpointer is not None and s.step == 0 and not distributed:
            save()  # the starting point (e.g. weights inherited from the search)
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
        steps=s.step,
        seconds=seconds,
        final_metrics=s.final_metrics,
        best_metrics=s.best_metrics or s.final_metrics,
        best_step=s.best_step or s.step,
        curve=s.curve,
        losses=s.losses,
    )


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
                "step": self.step, "seconds": self.seconds, "losses": self.losses, "curve": self.curve,
                "best_value": self.best_value, "best_step": self.best_step, "best_metrics": self.best_metrics,
                "final_metrics": self.final_metrics,
            },
            "best_state": self.best_state or {},
        }

    @classmethod
    def restore(cls, saved: dict, trainable: dict, optimizer: Any, scheduler: Any, loader: ResumableLoader) -> "_LoopState":
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
            step=int(loop["step"]), seconds=float(loop["seconds"]), losses=list(loop["losses"]),
            curve=list(loop["curve"]), best_value=loop["best_value"], best_step=int(loop["best_step"]),
            best_metrics=dict(loop["best_metrics"]), final_metrics=dict(loop["final_metrics"]),
            best_state=dict(saved["best_state"]) or None,
        )
