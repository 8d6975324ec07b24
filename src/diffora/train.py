"""Step 6 of the pipeline: fine-tune the exported LoRA (kept modules + head) with accelerate.

An ordinary PEFT training loop — the point of DiffoRA is *which* modules are trained, not how: AdamW, linear
warm-up then linear decay, weight decay, gradient clipping, evaluation every N steps, and the best evaluation
checkpoint restored at the end. Data parallelism (``accelerate launch`` / ``torchrun``) comes from accelerate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .errors import ConfigError, TrainingError

EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class FinetuneOptions:
    epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    lr: float = field(default=5e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Fraction of steps with linear warm-up."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0: at the end of each epoch)."})
    keep_best: bool = field(default=True, metadata={"help": "Restore the checkpoint with the best eval metric."})

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")


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
) -> FinetuneResult:
    """Train ``model``'s trainable parameters on ``train_loader``; evaluate with ``evaluate(model)``.

    ``accelerator`` (an ``accelerate.Accelerator``) wraps model, optimiser and loader for data parallelism; without
    one the loop runs in this process.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainingError("the training data is empty")
    total = max(1, math.ceil(options.epochs * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(options.warmup_ratio * total), total)
    wrapped, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    # evaluation happens at these steps: every eval_every steps or at each epoch end, and always at the end
    per_shard_epoch = len(loader)
    total = max(1, math.ceil(options.epochs * per_shard_epoch))
    every = options.eval_every or per_shard_epoch
    eval_steps = set(range(every, total + 1, every)) | {total}

    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    best_value: Optional[float] = None
    best_state: Optional[dict[str, torch.Tensor]] = None
    best_step, best_metrics, final_metrics = 0, {}, {}
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress or not accelerator.is_main_process, dynamic_ncols=True)
    step = 0
    wrapped.train()
    while step < total:
        for batch in loader:
            loss = wrapped(**batch).loss
            if not torch.isfinite(loss.detach()):
                raise TrainingError(
                    f"the training loss became {float(loss.detach())} at step {step}; lower the learning rate "
                    "(--lr) or check the data for invalid labels"
                )
            accelerator.backward(loss)
            if options.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            postfix = {"loss": f"{losses[-1]:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
            if evaluate is not None and step in eval_steps:
                metrics = evaluate(accelerator.unwrap_model(wrapped))
                curve.append({"step": step, "epoch": step / per_shard_epoch, **metrics})
                final_metrics = metrics
                if main_metric is not None:
                    value = metrics[main_metric]
                    postfix[main_metric] = f"{value:.4f}"
                    better = best_value is None or (value > best_value if greater_is_better else value < best_value)
                    if better:
                        best_value, best_step, best_metrics = value, step, dict(metrics)
                        if options.keep_best:
                            best_state = {
                                n: p.detach().clone() for n, p in accelerator.unwrap_model(wrapped).named_parameters()
                                if p.requires_grad
                            }
                wrapped.train()
            bar.set_postfix(postfix)
            if step >= total:
                break
    bar.close()
    seconds = time.perf_counter() - start
    unwrapped = accelerator.unwrap_model(wrapped)
    if options.keep_best and best_state is not None and best_step != step:
        with torch.no_grad():
            for name, p in unwrapped.named_parameters():
                if name in best_state:
                    p.copy_(best_state[name])
    return FinetuneResult(
        steps=step,
        seconds=seconds,
        final_metrics=final_metrics,
        best_metrics=best_metrics or final_metrics,
        best_step=best_step or step,
        curve=curve,
        losses=losses,
    )
