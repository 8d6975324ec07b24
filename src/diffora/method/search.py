r"""Step 3 of the pipeline: the bi-level search over the relaxed DAM.

.. math::

    \min_\beta \; \mathcal{L}_{\text{gate}}\big(\Theta^*(\beta), \beta\big)
    \quad \text{s.t.} \quad
    \Theta^*(\beta) = \arg\min_\Theta \mathcal{L}_{\text{weight}}(\Theta, \beta)

``Θ`` = LoRA ``A``/``B`` of every candidate + the task head, trained on the *weight split*; ``β`` = the DAM gate
parameters, trained on the *gate split* (both come from the training data — never from the dev set you report).

* First order (default, DARTS' first-order approximation): alternate one AdamW step on ``Θ`` with one Adam step on
  ``β`` using ``∇_β L_gate(Θ, β)``.
* Second order (DARTS' unrolled gradient): see :mod:`diffora.method.second_order`.

LoRA's ``B`` starts at zero, so ``∂L/∂g`` (hence ``∂L/∂β``) is exactly zero until ``B`` has moved:
``gate_warmup_steps`` weight-only steps run before the first gate step.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, SearchStateError, TrainingError
from .config import DiffoRAConfig
from .diagnostics import label_counts, search_diagnostics
from .gates import DAMGates, GateHooks, new_gate_optimizer
from .parallel import (
    gradient_message,
    loss_message,
    model_device,
    nonfinite_code,
    sync_gradients,
    to_device,
    world_size,
)
from .precision import autocast, check_mixed_precision, new_scaler
from .schedule import check_warmup, gate_warmup
from .second_order import unrolled_gate_gradient
from .state import load_search_state, search_state
from .wrap import attach_lora, inject_lora

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class MicroBatches(list):
    """Micro-batches of one accumulated step. A plain ``list`` of dict batches means the same; this type also
    marks a list of non-dict batches (e.g. tuples for a custom ``loss_fn``) as micro-batches."""


StepBatch = Union[Batch, Sequence[Batch]]


#: gate-split batches the single-level search scores for the held-out check, at the warm-up's end and at its end
#: (the check's window is the last quarter of the recorded losses: these last batches)
SINGLE_LEVEL_CHECK_BATCHES = 6


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss (``labels`` must be in the batch)."""
    out = model(**batch)
    loss = out.loss if hasattr(out, "loss") else out["loss"] if isinstance(out, dict) else None
    if loss is None:
        raise TrainingError("the model returned no loss: put the targets in the batch under 'labels'")
    return loss


@dataclass
class SearchHistory:
    """What the search did, for the record and for plots."""

    weight_losses: list[float] = field(default_factory=list)
    gate_losses: list[float] = field(default_factory=list)
    gate_snapshots: list[tuple[int, list[list[float]]]] = field(default_factory=list)
    #: per gate step, how many of its examples carry each class label ([] when the labels are not class indices):
    #: the class-frequency baseline of the held-out check (:func:`diffora.method.diagnostics.heldout_check`)
    gate_label_counts: list[list[int]] = field(default_factory=list)


class DAMSearch:
    """A model with a gated LoRA on every candidate, the two optimisers and the search state.

    Create it with :func:`prepare_search`. The model passed in is modified in place (PEFT injects LoRA layers).
    The gates are put on the model's device; every batch is moved to it before the forward pass.

    Args (besides those of :func:`prepare_search`):
        mixed_precision: ``"no"`` (default), ``"bf16"`` or ``"fp16"``: the forward passes of weight and first-order
            gate steps run under ``torch.autocast`` in that dtype; LoRA weights, head and betas stay in their own
            (float32) dtype. ``"fp16"`` scales the losses with a ``torch.amp.GradScaler`` per step kind (weight,
            gate) and skips a step whose gradients overflowed; it needs a CUDA device. The second-order gate
            gradient always runs without autocast: its finite differences need full precision.
        accelerator: an ``accelerate.Accelerator``; the model is moved to its device and, when
            ``mixed_precision`` is ``"no"``, its ``mixed_precision`` is used. Processes are counted through
            ``torch.distributed`` either way.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DiffoRAConfig,
        *,
        adapter_name: str = "default",
        loss_fn: Optional[LossFn] = None,
        mixed_precision: str = "no",
        accelerator: Any = None,
    ) -> None:
        if accelerator is not None:
            if mixed_precision == "no":
                mixed_precision = str(getattr(accelerator, "mixed_precision", "no") or "no")
            if model_device(model) != torch.device(accelerator.device):
                model.to(accelerator.device)
        device = model_device(model)
        # checked before PEFT touches the model, so a refused search leaves it as it was
        check_mixed_precision(mixed_precision, device)
        self.adapter_name = adapter_name
        self.loss_fn: LossFn = loss_fn or default_loss
        self.mixed_precision = mixed_precision
        #: the search runs on the caller's own PeftModel (its LoraConfig decides the candidates), see attach_lora
        self.attached = isinstance(model, PeftModel)
        wrapped = (attach_lora if self.attached else inject_lora)(model, config, adapter_name)
        self.model, self.config, self.grid = wrapped.model, wrapped.config, wrapped.grid
        self.model_class, self.heads, self.fan_in_fan_out = wrapped.model_class, wrapped.heads, wrapped.fan_in_fan_out
        self.gates = DAMGates(self.grid, config.gate, config.gate_init, config.temperature).to(model_device(self.model))
        self.hooks = GateHooks(self.model, self.grid, self.gates, adapter_name)
        self.weight_params = [p for p in self.model.parameters() if p.requires_grad]
        self.weight_optimizer = torch.optim.AdamW(
            self.weight_params, lr=config.weight_lr, weight_decay=config.weight_decay
        )
        self.gate_optimizer = new_gate_optimizer(self.gates, config)
        # one scaler per step kind, as their losses differ
        self.weight_scaler = new_scaler(mixed_precision, device)
        self.gate_scaler = new_scaler(mixed_precision, device)
        self.weight_steps = 0
        self.gate_steps = 0
        # 'taylor' score: the sum over gate steps of -g * dL_gate/dg per entry, and how many steps it holds
        self.taylor_sum = torch.zeros_like(self.gates.beta, dtype=torch.float32)
        self.taylor_steps = 0
        # -dL_gate/dbeta summed over even and odd gate steps (disjoint gate batches): the kept-set stability check
        self.gate_pull = torch.zeros((2, *self.gates.beta.shape), dtype=torch.float32, device=self.gates.beta.device)
        self.history = SearchHistory()
        self.exported = False

    #: an LR scheduler of ``weight_optimizer``, stepped after every weight step (None: a constant LR). The
    #: 'continue' hand-off sets the fine-tune's schedule here (:func:`diffora.method.handoff.attach_schedule`), so
    #: the search's weight steps are the fine-tune's first steps; saving its state is the caller's, like the loaders'.
    weight_scheduler: Optional[Any] = None

    # ------------------------------------------------------------------ steps
    def weight_step(self, batch: StepBatch) -> float:
        """One AdamW step on LoRA A/B and the head on a weight-split batch; the betas do not move.

        ``batch`` is one batch, or a list of micro-batches (dicts; :class:`MicroBatches` for other batch types):
        each micro-batch's loss is divided by their number, the gradients accumulate, and one optimiser step
        follows. With a mean-reduced loss and equally sized micro-batches this is the update of one big batch; with
        unequal sizes it is not (the mean of means weights every micro-batch alike), and a causal LM's loss is a
        mean over *tokens*, whose count differs between micro-batches even at equal numbers of rows.
        Returns the (mean) loss.
        """
        return self._train_step(batch, gates=False)

    def joint_step(self, batch: StepBatch) -> float:
        """The single-level step (``search_levels='single'``): one backward on a weight-split batch, then an AdamW
        step on LoRA A/B and the head and an Adam step on the betas, both from those gradients. Costs one weight
        step; counts as a weight step and a gate step. Returns the (mean) training loss."""
        return self._train_step(batch, gates=True)

    def _train_step(self, batch: StepBatch, *, gates: bool) -> float:
        self.check_live()
        self.model.train()
        batches = _micro_batches(batch)
        n = len(batches)
        scaler = self.weight_scaler
        beta = self.gates.beta
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.gate_optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        code = 0
        with contextlib.nullcontext() if gates else _no_grad_for(beta):
            for micro in batches:
                loss = self.gate_loss(micro) if gates else self._loss(micro)
                losses.append(loss.detach())
                code = nonfinite_code(loss)
                if code:  # no backward: the step is abandoned once every rank knows
                    break
                if n > 1:
                    loss = loss / n
                (scaler.scale(loss) if scaler is not None else loss).backward()
        value = sum(float(v) for v in losses) / len(losses)
        params = self.weight_params + [beta] if gates else self.weight_params
        sync_gradients(params, "weight", self.weight_steps, code, value)
        if scaler is not None:
            scaler.unscale_(self.weight_optimizer)  # clip the true gradients, not the scaled ones
            if gates:
                scaler.unscale_(self.gate_optimizer)
        if self.config.max_grad_norm is not None:
            # the betas are not clipped: in a gate step they never are, and Adam normalises their step anyway
            norm = torch.nn.utils.clip_grad_norm_(self.weight_params, self.config.max_grad_norm)
            # after the all-reduce every rank holds the same gradients, so all see the same norm and agree
            if scaler is None and not bool(torch.isfinite(norm)):
                raise TrainingError(gradient_message("weight", self.weight_steps))
        if gates:
            if scaler is None and beta.grad is not None and not bool(torch.isfinite(beta.grad).all()):
                raise TrainingError(gradient_message("gate", self.gate_steps))
            self._accumulate(beta.grad)  # unscaled, before the step moves the betas
        if scaler is not None:
            scaler.step(self.weight_optimizer)  # skipped when the scaled gradients overflowed
            if gates:
                scaler.step(self.gate_optimizer)
            scaler.update()
        else:
            self.weight_optimizer.step()
            if gates:
                self.gate_optimizer.step()
        if self.weight_scheduler is not None:
            self.weight_scheduler.step()
        self.weight_steps += 1
        self.history.weight_losses.append(value)
        if gates:
            self.gate_steps += 1
        return value

    @torch.no_grad()
    def record_heldout(self, batch: StepBatch) -> float:
        """The single-level search's held-out check: the loss on a gate-split batch, recorded where a bi-level search
        records its gate losses (:func:`diffora.method.diagnostics.heldout_check` reads them); nothing moves."""
        self.check_live()
        self.model.eval()
        batches = _micro_batches(batch)
        value = sum(float(self._loss(micro)) for micro in batches) / len(batches)
        self.model.train()
        self.history.gate_losses.append(value)
        self.history.gate_label_counts.append(label_counts(batch))
        return value

    def record_weight_step(self, loss: float) -> None:
        """Count a weight step that an outside training loop (e.g. a ``transformers.Trainer``) performed."""
        self.check_live()
        self.weight_steps += 1
        self.history.weight_losses.append(float(loss))

    def gate_step(self, gate_batch: StepBatch, weight_batch: Optional[StepBatch] = None) -> float:
        """One Adam step on the betas on a gate-split batch; LoRA weights and head are left bit-identical.

        ``weight_batch`` is needed by the second-order search (its unrolled virtual step). Either may be a list of
        micro-batches (see :meth:`weight_step`): the beta gradient is the sum of the micro-batches' gradients of
        ``loss / n``. Returns the (mean) gate loss.
        """
        self.check_live()
        self.model.train()
        beta = self.gates.beta
        scaler = None
        if self.config.order == "second":
            if weight_batch is None:
                raise SearchStateError("the second-order gate step needs the weight batch: gate_step(gate, weight)")
            grad, loss = self.second_order_gradient(gate_batch, weight_batch)
            code, value = nonfinite_code(loss), float(loss.detach())
        else:
            scaler = self.gate_scaler
            batches = _micro_batches(gate_batch)
            n = len(batches)
            grad, losses, code = None, [], 0
            for micro in batches:
                loss = self.gate_loss(micro)
                losses.append(loss.detach())
                code = nonfinite_code(loss)
                if code:
                    break
                scaled = loss / n if n > 1 else loss
                if scaler is not None:
                    scaled = scaler.scale(scaled)  # unscaled by scaler.unscale_ below
                (g,) = torch.autograd.grad(scaled, [beta])
                grad = g if grad is None else grad + g
            value = sum(float(v) for v in losses) / len(losses)
        distributed = world_size() > 1
        if code and not distributed:
            raise TrainingError(loss_message("gate", self.gate_steps, value))
        self.gate_optimizer.zero_grad(set_to_none=True)
        beta.grad = grad.detach().clone() if grad is not None else None
        if distributed:
            sync_gradients([beta], "gate", self.gate_steps, code, value)
        if scaler is not None:
            scaler.unscale_(self.gate_optimizer)
            self._accumulate(beta.grad)  # unscaled, before the step moves the betas
            scaler.step(self.gate_optimizer)  # skipped when the scaled gate gradient overflowed
            scaler.update()
        else:
            if not bool(torch.isfinite(beta.grad).all()):
                raise TrainingError(gradient_message("gate", self.gate_steps))
            self._accumulate(beta.grad)
            self.gate_optimizer.step()
        self.gate_steps += 1
        self.history.gate_losses.append(value)
        self.history.gate_label_counts.append(label_counts(gate_batch))
        return value

    def _accumulate(self, grad: Optional[torch.Tensor]) -> None:
        """Add a gate step's (unscaled, synced) beta gradient to the per-half pulls and the 'taylor' sums."""
        if grad is None or not bool(torch.isfinite(grad).all()):
            return
        with torch.no_grad():
            self.gate_pull[self.gate_steps % 2] -= torch.sign(grad.detach().float()).to(self.gate_pull.device)
        self._add_taylor(grad)

    def _add_taylor(self, grad: Optional[torch.Tensor]) -> None:
        """Accumulate -g * dL/dg from the (unscaled, synced) beta gradient, at the current betas (call it before the
        optimiser step): -g dL/dg = -dL/dbeta * T / (1 - g/s) for g = s sigma(beta/T)
        (:meth:`DAMGates.slope_denominator`; independent sigmoid forms only). Steps whose gradient is not finite (an
        fp16 overflow the scaler skipped) are left out."""
        if grad is None or self.config.gate == "softmax" or not bool(torch.isfinite(grad).all()):
            return
        with torch.no_grad():
            denominator = self.gates.slope_denominator(self.gates.values().float())
            value = -grad.float() * self.gates.temperature / denominator
            self.taylor_sum += value.masked_fill(~self.gates.valid, 0.0).to(self.taylor_sum.device)
        self.taylor_steps += 1

    def second_order_gradient(
        self, gate_batch: StepBatch, weight_batch: StepBatch, xi: Optional[float] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DARTS' unrolled gate gradient (see :mod:`diffora.method.second_order`) and the gate loss; weights unchanged.

        Runs without autocast whatever ``mixed_precision`` says: the finite-difference HVP needs full precision.
        """
        if xi is None:
            xi = self.config.unroll_lr if self.config.unroll_lr is not None else self.config.weight_lr
        weight_losses = [functools.partial(self._loss, b, mixed=False) for b in _micro_batches(weight_batch)]
        gate_losses = [functools.partial(self.gate_loss, b, mixed=False) for b in _micro_batches(gate_batch)]
        return unrolled_gate_gradient(
            weight_losses[0] if len(weight_losses) == 1 else weight_losses,
            gate_losses[0] if len(gate_losses) == 1 else gate_losses,
            self.weight_params,
            self.gates.beta,
            xi,
        )

    def gate_loss(self, batch: Batch, *, mixed: bool = True) -> torch.Tensor:
        """Task loss on a gate batch plus the optional zero-one regulariser (``mixed=False``: no autocast)."""
        loss = self._loss(batch, mixed=mixed)
        if self.config.zero_one_weight > 0:
            loss = loss + self.config.zero_one_weight * self.gates.zero_one_loss()
        return loss

    def _loss(self, batch: Batch, *, mixed: bool = True) -> torch.Tensor:
        """``loss_fn`` on ``batch`` moved to the model's device, under autocast when mixed precision is on."""
        device = model_device(self.model)
        with autocast(self.mixed_precision, device) if mixed else contextlib.nullcontext():
            return self.loss_fn(self.model, to_device(batch, device))

    def fit(
        self,
        weight_data: Iterable[Batch],
        gate_data: Iterable[Batch],
        steps: int,
        *,
        progress: bool = True,
        snapshot_every: int = 10,
        callback: Optional[Callable[["DAMSearch", int], None]] = None,
        accumulation_steps: int = 1,
    ) -> SearchHistory:
        """Run search iterations until ``steps`` in total: a weight step, then (after the warm-up) a gate step.

        ``weight_data``/``gate_data`` are re-iterated when exhausted (e.g. DataLoaders, reshuffled each pass). A
        search restored with :meth:`load_state_dict` continues from its step counter. ``accumulation_steps`` > 1
        draws that many micro-batches from each iterator per iteration and accumulates their gradients into one
        weight step and one gate step (see :meth:`weight_step` for when that equals one bigger batch).
        """
        if steps <= 0:
            raise SearchStateError(f"steps must be positive, got {steps}")
        warmup = gate_warmup(steps, self.config)
        check_warmup(steps, warmup, error=SearchStateError, hint="raise steps or lower gate_warmup_steps")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ConfigError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
        if torch.is_autocast_enabled(model_device(self.model).type):
            # autocast caches its casts of the LoRA weights until the outermost context exits, so every step of a
            # search inside one context would read the weights as they were at its first forward (B stays 0)
            raise ConfigError(
                "the search was started inside torch.autocast, whose cast cache would hide every "
                "weight update from the later steps; start it outside autocast and pass "
                "mixed_precision='bf16' (or load the model in bfloat16) instead"
            )
        weights, gates = _cycle(weight_data), _cycle(gate_data)

        def draw(batches: Iterator[Batch]) -> StepBatch:
            if accumulation_steps == 1:
                return next(batches)
            return MicroBatches([next(batches) for _ in range(accumulation_steps)])

        bar = tqdm(
            range(self.weight_steps, steps),
            desc="DAM search",
            disable=not progress,
            dynamic_ncols=True,
            initial=self.weight_steps,
            total=steps,
        )
        single = self.config.search_levels == "single"

        def heldout_check() -> None:
            for _ in range(SINGLE_LEVEL_CHECK_BATCHES):
                self.record_heldout(draw(gates))

        for step in bar:
            if single and step == warmup:  # the held-out check's reference, before the gates move
                heldout_check()
            weight_batch = draw(weights)
            if single and step >= warmup:
                w_loss = self.joint_step(weight_batch)
            else:
                w_loss = self.weight_step(weight_batch)
            postfix = {"w_loss": f"{w_loss:.4f}"}
            if step >= warmup:
                if not single:
                    g_loss = self.gate_step(draw(gates), weight_batch)
                    postfix["g_loss"] = f"{g_loss:.4f}"
                g = self.gates.values().detach()[self.gates.valid]
                postfix["gates"] = f"{float(g.min()):.2f}..{float(g.max()):.2f}"
            if (step + 1) % snapshot_every == 0 or step + 1 == steps:
                self.snapshot()
            bar.set_postfix(postfix)
            if callback is not None:
                callback(self, step)
        # read from the history, not from this call: a search resumed from a state saved after its last step (killed
        # before the end check) still owes the check, and one that recorded both owes nothing
        if single and len(self.history.gate_losses) == SINGLE_LEVEL_CHECK_BATCHES:
            heldout_check()
        warning = search_diagnostics(self)["warning"]
        if warning:
            logger.warning(warning)
        return self.history

    def snapshot(self) -> None:
        self.history.gate_snapshots.append((self.weight_steps, self.gate_values()))

    # ------------------------------------------------------------ results
    def gate_values(self) -> list[list[float]]:
        with torch.no_grad():
            return [[float(v) for v in row] for row in self.gates.values()]

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the search exactly: LoRA/head weights, betas, both optimisers, counters."""
        return search_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of a search over the same model and grid)."""
        self.check_live()
        load_search_state(self, state)

    # ------------------------------------------------------------ helpers
    def check_live(self) -> None:
        """Raise if :meth:`export` consumed this search."""
        if self.exported:
            raise SearchStateError("this search was exported; its model now belongs to the exported PeftModel")


def prepare_search(
    model: nn.Module,
    config: Optional[DiffoRAConfig] = None,
    *,
    adapter_name: str = "default",
    loss_fn: Optional[LossFn] = None,
    mixed_precision: str = "no",
    accelerator: Any = None,
) -> DAMSearch:
    """Give every candidate module of ``model`` a gated LoRA branch and return the search.

    Args:
        model: a Hugging Face model (modified in place). For gradient checkpointing, call
            ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`` first
            (reentrant checkpointing cannot give gate gradients).
        config: search options; defaults to :class:`DiffoRAConfig()`.
        adapter_name: PEFT adapter name used during the search.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        mixed_precision: ``"no"`` | ``"bf16"`` | ``"fp16"`` autocast of the forward passes (see :class:`DAMSearch`).
        accelerator: optional ``accelerate.Accelerator`` giving the device and (by default) the mixed precision.
    """
    return DAMSearch(
        model,
        config or DiffoRAConfig(),
        adapter_name=adapter_name,
        loss_fn=loss_fn,
        mixed_precision=mixed_precision,
        accelerator=accelerator,
    )


# ---------------------------------------------------------------- utilities
class _no_grad_for:
    """Temporarily stop a parameter from receiving gradients (so weight steps do not touch beta)."""

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param

    def __enter__(self) -> None:
        self.previous = self.param.requires_grad
        self.param.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        self.param.requires_grad_(self.previous)


def _cycle(data: Iterable[Batch]) -> Iterator[Batch]:
    """Iterate ``data`` forever, re-iterating it (a new epoch) when exhausted."""
    for epoch in itertools.count():
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise SearchStateError("the search data is empty")


def _micro_batches(batch: Any) -> list:
    """``batch`` as a list of micro-batches: a :class:`MicroBatches` or a list of dicts is one; anything else is a
    single batch (so a list batch of tensors for a custom ``loss_fn`` keeps meaning one batch)."""
    if isinstance(batch, MicroBatches) or (
        isinstance(batch, list) and batch and all(isinstance(b, Mapping) for b in batch)
    ):
        if not batch:
            raise SearchStateError("an empty list of micro-batches")
        return list(batch)
    if isinstance(batch, list) and not batch:
        raise SearchStateError("an empty list of micro-batches")
    return [batch]
