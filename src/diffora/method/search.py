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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from .candidates import DAMGrid, detect_task_heads, find_candidates
from .config import SELECTION_SCORES, DiffoRAConfig
from ..select.quota import Selection, select_modules
from ..errors import ConfigError, SearchStateError, TrainingError
from .export import build_exported_model, collect_shared_weights, infer_task_type, lora_config_for
from .gates import DAMGates, GateHooks
from ..store.record import RECORD_FORMAT
from .second_order import unrolled_gate_gradient

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]

#: ``mixed_precision`` values: no autocast, bfloat16 autocast, float16 autocast with gradient scaling
MIXED_PRECISION = ("no", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: device types where the search refuses float16 autocast (a module constant, so tests can lift it)
_FP16_UNSUPPORTED = frozenset({"cpu"})


class MicroBatches(list):
    """Micro-batches of one accumulated step. A plain ``list`` of dict batches means the same; this type also
    marks a list of non-dict batches (e.g. tuples for a custom ``loss_fn``) as micro-batches."""


StepBatch = Union[Batch, Sequence[Batch]]


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
            if _model_device(model) != torch.device(accelerator.device):
                model.to(accelerator.device)
        device = _model_device(model)
        # checked before PEFT touches the model, so a refused search leaves it as it was
        if mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
        if mixed_precision == "fp16" and device.type in _FP16_UNSUPPORTED:
            raise ConfigError(f"mixed_precision='fp16' on {device.type}: float16 mixed precision needs a CUDA "
                              "device; use bf16 on CPU")
        self.config = config
        self.adapter_name = adapter_name
        self.loss_fn: LossFn = loss_fn or default_loss
        self.mixed_precision = mixed_precision
        self.model_class = type(model).__name__
        self.grid: DAMGrid = find_candidates(model, config.target_types, config.target_modules)
        self.heads: list[str] = (
            list(config.modules_to_save) if config.modules_to_save is not None else detect_task_heads(model)
        )
        self.fan_in_fan_out = _uses_conv1d(model, self.grid)
        lora_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=self.grid.module_names(),
            modules_to_save=self.heads or None,
            fan_in_fan_out=self.fan_in_fan_out,
        )
        # Seed LoRA's random A init without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model: PeftModel = get_peft_model(model, lora_config, adapter_name=adapter_name)
        self.gates = DAMGates(self.grid, config.gate, config.gate_init, config.temperature).to(
            _model_device(self.model))
        self.hooks = GateHooks(self.model, self.grid, self.gates, adapter_name)
        self.weight_params = [p for p in self.model.parameters() if p.requires_grad]
        self.weight_optimizer = torch.optim.AdamW(
            self.weight_params, lr=config.weight_lr, weight_decay=config.weight_decay
        )
        # DARTS' architecture optimiser: Adam with beta1 = 0.5.
        self.gate_optimizer = torch.optim.Adam(
            self.gates.parameters(), lr=config.gate_lr, betas=(0.5, 0.999), weight_decay=config.gate_weight_decay
        )
        # fp16 gradients underflow without loss scaling; one scaler per step kind, as their losses differ
        fp16 = mixed_precision == "fp16"
        self.weight_scaler: Optional[torch.amp.GradScaler] = torch.amp.GradScaler(device.type) if fp16 else None
        self.gate_scaler: Optional[torch.amp.GradScaler] = torch.amp.GradScaler(device.type) if fp16 else None
        self.weight_steps = 0
        self.gate_steps = 0
        # 'taylor' score: the sum over gate steps of -g * dL_gate/dg per entry, and how many steps it holds
        self.taylor_sum = torch.zeros_like(self.gates.beta, dtype=torch.float32)
        self.taylor_steps = 0
        self.history = SearchHistory()
        self.exported = False

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
        self.check_live()
        self.model.train()
        batches = _micro_batches(batch)
        n = len(batches)
        scaler = self.weight_scaler
        self.weight_optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        code = 0
        with _no_grad_for(self.gates.beta):
            for micro in batches:
                loss = self._loss(micro)
                losses.append(loss.detach())
                code = _nonfinite_code(loss)
                if code:  # no backward: the step is abandoned once every rank knows
                    break
                if n > 1:
                    loss = loss / n
                (scaler.scale(loss) if scaler is not None else loss).backward()
        value = sum(float(v) for v in losses) / len(losses)
        self._sync(self.weight_params, "weight", self.weight_steps, code, value)
        if scaler is not None:
            scaler.unscale_(self.weight_optimizer)  # clip the true gradients, not the scaled ones
        if self.config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.weight_params, self.config.max_grad_norm)
            # after the all-reduce every rank holds the same gradients, so all see the same norm and agree
            if scaler is None and not bool(torch.isfinite(norm)):
                raise TrainingError(_gradient_message("weight", self.weight_steps))
        if scaler is not None:
            scaler.step(self.weight_optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            self.weight_optimizer.step()
        self.weight_steps += 1
        self.history.weight_losses.append(value)
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
            code, value = _nonfinite_code(loss), float(loss.detach())
        else:
            scaler = self.gate_scaler
            batches = _micro_batches(gate_batch)
            n = len(batches)
            grad, losses, code = None, [], 0
            for micro in batches:
                loss = self.gate_loss(micro)
                losses.append(loss.detach())
                code = _nonfinite_code(loss)
                if code:
                    break
                scaled = loss / n if n > 1 else loss
                if scaler is not None:
                    scaled = scaler.scale(scaled)  # unscaled by scaler.unscale_ below
                (g,) = torch.autograd.grad(scaled, [beta])
                grad = g if grad is None else grad + g
            value = sum(float(v) for v in losses) / len(losses)
        distributed = _world_size() > 1
        if code and not distributed:
            raise TrainingError(_loss_message("gate", self.gate_steps, value))
        self.gate_optimizer.zero_grad(set_to_none=True)
        beta.grad = grad.detach().clone() if grad is not None else None
        if distributed:
            self._sync([beta], "gate", self.gate_steps, code, value)
        if scaler is not None:
            scaler.unscale_(self.gate_optimizer)
            self._add_taylor(beta.grad)  # unscaled, before the step moves the betas
            scaler.step(self.gate_optimizer)  # skipped when the scaled gate gradient overflowed
            scaler.update()
        else:
            if not bool(torch.isfinite(beta.grad).all()):
                raise TrainingError(_gradient_message("gate", self.gate_steps))
            self._add_taylor(beta.grad)
            self.gate_optimizer.step()
        self.gate_steps += 1
        self.history.gate_losses.append(value)
        return value

    def _add_taylor(self, grad: Optional[torch.Tensor]) -> None:
        """Accumulate -g * dL/dg from the (unscaled, synced) beta gradient, at the current betas (call it before the
        optimiser step). Sigmoid gates only: there dL/dbeta = dL/dg * g (1 - g) / T, so -g dL/dg =
        -dL/dbeta * T / (1 - g). Steps whose gradient is not finite (an fp16 overflow the scaler skipped) are left
        out."""
        if self.config.gate != "sigmoid" or grad is None or not bool(torch.isfinite(grad).all()):
            return
        with torch.no_grad():
            g = self.gates.values().float()
            value = -grad.float() * self.gates.temperature / (1.0 - g).clamp_min(1e-6)
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
            self.weight_params, self.gates.beta, xi,
        )

    def gate_loss(self, batch: Batch, *, mixed: bool = True) -> torch.Tensor:
        """Task loss on a gate batch plus the optional zero-one regulariser (``mixed=False``: no autocast)."""
        loss = self._loss(batch, mixed=mixed)
        if self.config.zero_one_weight > 0:
            loss = loss + self.config.zero_one_weight * self.gates.zero_one_loss()
        return loss

    def _loss(self, batch: Batch, *, mixed: bool = True) -> torch.Tensor:
        """``loss_fn`` on ``batch`` moved to the model's device, under autocast when mixed precision is on."""
        batch = _to_device(batch, _model_device(self.model))
        with self._autocast() if mixed else contextlib.nullcontext():
            return self.loss_fn(self.model, batch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST_DTYPES.get(self.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=_model_device(self.model).type, dtype=dtype)

    def _sync(self, params: Sequence[torch.Tensor], kind: str, step: int, code: int, value: float) -> None:
        """Raise on a local non-finite loss (one process), or average the gradients across processes in one
        all-reduce that also tells every rank which ranks failed, so all raise the same error or none does."""
        if _world_size() == 1:
            if code:
                raise TrainingError(_loss_message(kind, step, value))
            return
        codes = _all_reduce_mean(params, code)
        failed = [rank for rank, c in enumerate(codes) if c]
        if failed:
            raise TrainingError(_loss_message(kind, step, _CODE_VALUES[codes[failed[0]]], ranks=failed))

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
        if steps <= self.config.gate_warmup_steps:
            raise SearchStateError(
                f"steps ({steps}) must exceed gate_warmup_steps ({self.config.gate_warmup_steps}), "
                "otherwise no gate step runs and the DAM learns nothing"
            )
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ConfigError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
        weights, gates = _cycle(weight_data), _cycle(gate_data)

        def draw(batches: Iterator[Batch]) -> StepBatch:
            if accumulation_steps == 1:
                return next(batches)
            return MicroBatches([next(batches) for _ in range(accumulation_steps)])

        bar = tqdm(range(self.weight_steps, steps), desc="DAM search", disable=not progress, dynamic_ncols=True,
                   initial=self.weight_steps, total=steps)
        for step in bar:
            weight_batch = draw(weights)
            w_loss = self.weight_step(weight_batch)
            postfix = {"w_loss": f"{w_loss:.4f}"}
            if step >= self.config.gate_warmup_steps:
                g_loss = self.gate_step(draw(gates), weight_batch)
                postfix["g_loss"] = f"{g_loss:.4f}"
                g = self.gates.values().detach()[self.gates.valid]
                postfix["gates"] = f"{float(g.min()):.2f}..{float(g.max()):.2f}"
            if (step + 1) % snapshot_every == 0 or step + 1 == steps:
                self.snapshot()
            bar.set_postfix(postfix)
            if callback is not None:
                callback(self, step)
        return self.history

    def snapshot(self) -> None:
        self.history.gate_snapshots.append((self.weight_steps, self.gate_values()))

    # ------------------------------------------------------------ results
    def gate_values(self) -> list[list[float]]:
        with torch.no_grad():
            return [[float(v) for v in row] for row in self.gates.values()]

    def selection_scores(self, score: Optional[str] = None) -> list[list[float]]:
        """What discretisation ranks: the gate values, ``|g - g_initial|`` (``"movement"``), ``g - g_initial``
        (``"signed"``) or the mean of ``-g dL_gate/dg`` over the gate steps (``"taylor"``) per entry. ``"ntk"`` is not a gate score: it needs data (:mod:`diffora.select.ntk`)."""
        score = score or self.config.selection_score
        if score == "gate":
            return self.gate_values()
        if score == "ntk":
            raise ConfigError("selection_score 'ntk' ranks module sets by their kernel, not by gates: use "
                              "diffora.select.ntk.module_kernels + greedy_ntk_selection (diffora run does this)")
        if score not in SELECTION_SCORES:
            raise ConfigError(f"selection_score must be one of {SELECTION_SCORES}, got {score!r}")
        if score == "taylor":
            if self.config.gate != "sigmoid":
                raise ConfigError("selection_score 'taylor' needs sigmoid gates (gate='sigmoid')")
            if self.taylor_steps == 0:
                raise SearchStateError("no gate step has recorded the 'taylor' score (a search state saved before "
                                       "it existed, or no gate step ran); rerun the search or choose another score")
            return [[float(v) / self.taylor_steps for v in row] for row in self.taylor_sum.cpu()]
        with torch.no_grad():
            moved = self.gates.values() - self.gates.initial_values(self.config.gate_init)
        if score == "movement":
            moved = moved.abs()
        return [[float(v) for v in row] for row in moved]

    def discretize(
        self,
        keep_ratio: Optional[float] = None,
        granularity: Optional[str] = None,
        budget_params: Optional[int] = None,
        score: Optional[str] = None,
    ) -> Selection:
        """Keep the top entries of the learned DAM (defaults from the config)."""
        if self.gate_steps == 0:
            raise SearchStateError(
                "no gate step has run, so the DAM holds only its initial values; run search.fit(...) or "
                "search.gate_step(...) before discretize()"
            )
        return select_modules(
            self.grid,
            self.selection_scores(score),
            keep_ratio if keep_ratio is not None else self.config.keep_ratio,
            granularity or self.config.granularity,
            rank=self.config.rank,
            budget_params=budget_params,
        )

    def export(self, selection: Selection, weight_sharing: Optional[bool] = None,
               ranks: Optional[dict[str, int]] = None) -> PeftModel:
        """A stock ``peft.PeftModel`` with LoRA on the kept modules only (see :mod:`diffora.method.export`).

        ``ranks`` (from :func:`diffora.select.ranks.concentrate_ranks`) gives kept modules their own rank, exported as a
        ``rank_pattern``; the searched weights go into the first ``r`` directions. The search is consumed: its
        model becomes the exported model's base.
        """
        self.check_live()
        sharing = self.config.weight_sharing if weight_sharing is None else weight_sharing
        with torch.no_grad():
            gates = self.gates.values().detach()
        shared = collect_shared_weights(self.model.get_base_model(), selection, self.grid, gates, self.heads,
                                        self.adapter_name)
        self.hooks.remove()
        plain_model = self.model.unload()  # removes every LoRA layer; heads are plain modules again
        self.exported = True
        config = lora_config_for(
            selection, rank=self.config.rank, alpha=self.config.alpha, dropout=self.config.dropout,
            modules_to_save=self.heads, task_type=infer_task_type(self.model_class),
            fan_in_fan_out=self.fan_in_fan_out, ranks=ranks,
        )
        return build_exported_model(plain_model, config, shared, adapter_name=self.adapter_name,
                                    weight_sharing=sharing, seed=self.config.seed + 1,
                                    search_scaling=self.config.alpha / self.config.rank)

    def record(self, selection: Optional[Selection] = None, **extra: Any) -> dict:
        """The search record (``dam.json``, format :data:`diffora.store.record.RECORD_FORMAT`)."""
        record: dict[str, Any] = {
            "format": RECORD_FORMAT,
            "diffora_version": __version__,
            "model_class": self.model_class,
            "grid": self.grid.to_dict(),
            "betas": [[float(v) for v in row] for row in self.gates.beta.detach()],
            "gates": self.gate_values(),
            "config": self.config.to_dict(),
            "heads": self.heads,
            "weight_steps": self.weight_steps,
            "gate_steps": self.gate_steps,
            "history": {
                "weight_loss": self.history.weight_losses,
                "gate_loss": self.history.gate_losses,
                "gate_snapshots": [{"step": s, "gates": g} for s, g in self.history.gate_snapshots],
            },
        }
        if selection is not None:
            record["selection"] = selection.to_dict()
        record.update(extra)
        return record

    # --------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the search exactly: LoRA/head weights, betas, both optimisers, counters."""
        return {
            "weights": {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
            "beta": self.gates.beta.detach().clone(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "gate_optimizer": self.gate_optimizer.state_dict(),
            "weight_steps": self.weight_steps,
            "gate_steps": self.gate_steps,
            "taylor_sum": self.taylor_sum.detach().clone(),
            "taylor_steps": self.taylor_steps,
            "history": {
                "weight_losses": list(self.history.weight_losses),
                "gate_losses": list(self.history.gate_losses),
                "gate_snapshots": list(self.history.gate_snapshots),
            },
            # fp16 only: the loss scales (without them a resumed run would restart at 2**16 and re-overflow)
            **({"weight_scaler": self.weight_scaler.state_dict()} if self.weight_scaler is not None else {}),
            **({"gate_scaler": self.gate_scaler.state_dict()} if self.gate_scaler is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of a search over the same model and grid)."""
        self.check_live()
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(params) != set(state["weights"]):
            raise SearchStateError("the search state belongs to a different model or DAM grid")
        if tuple(state["beta"].shape) != tuple(self.gates.beta.shape):
            raise SearchStateError("the search state has a DAM of another shape")
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
            self.gates.beta.copy_(state["beta"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        # states saved without fp16 (or before scalers existed) keep the fresh scalers
        for key, scaler in (("weight_scaler", self.weight_scaler), ("gate_scaler", self.gate_scaler)):
            if scaler is not None and state.get(key):
                scaler.load_state_dict(state[key])
        self.weight_steps = int(state["weight_steps"])
        self.gate_steps = int(state["gate_steps"])
        # states saved before the 'taylor' score existed hold none: that score then refuses, the others work
        taylor = state.get("taylor_sum")
        self.taylor_sum = (taylor.to(self.taylor_sum.device, torch.float32).clone() if taylor is not None
                           else torch.zeros_like(self.taylor_sum))
        self.taylor_steps = int(state.get("taylor_steps", 0))
        history = state.get("history", {})
        self.history = SearchHistory(
            list(history.get("weight_losses", [])),
            list(history.get("gate_losses", [])),
            [tuple(s) for s in history.get("gate_snapshots", [])],
        )

    # ------------------------------------------------------------ helpers
    def lora_layer(self, module_name: str) -> nn.Module:
        return self.model.get_base_model().get_submodule(module_name)

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
    return DAMSearch(model, config or DiffoRAConfig(), adapter_name=adapter_name, loss_fn=loss_fn,
                     mixed_precision=mixed_precision, accelerator=accelerator)


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


_CODE_VALUES = {1: float("nan"), 2: float("inf"), 3: float("-inf")}


def _nonfinite_code(loss: torch.Tensor) -> int:
    """0 for a finite loss, else 1 (nan), 2 (+inf) or 3 (-inf): small integers that survive an all-reduce."""
    value = loss.detach()
    if bool(torch.isfinite(value).all()):
        return 0
    first = float(value.reshape(-1)[~torch.isfinite(value.reshape(-1))][0])
    return 1 if first != first else 2 if first > 0 else 3


def _loss_message(kind: str, step: int, value: float, ranks: Optional[list[int]] = None) -> str:
    where = "" if ranks is None else f" on rank {ranks[0]}" if len(ranks) == 1 else \
        f" on ranks {', '.join(map(str, ranks))}"
    return (f"the {kind} loss became {value} at {kind} step {step}{where}; lower the learning rate "
            "or check the data for invalid labels")


def _gradient_message(kind: str, step: int) -> str:
    where = " on some rank" if _world_size() > 1 else ""
    return (f"the {kind} gradient became non-finite at {kind} step {step}{where} (the loss was finite); lower the "
            "learning rate or check the data")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_mean(params: Sequence[torch.Tensor], code: int) -> list[int]:
    """Average ``p.grad`` over processes in ONE all-reduce; return every rank's failure code (0 = fine).

    The buffer is ``[grads..., has_grad per param, failure code per rank]``: a missing gradient is sent as zeros
    (every rank must send the same shape), and a parameter gets the average wherever any rank had a gradient, so
    the ranks keep stepping alike. A rank that failed sends its code instead of stopping, so nobody is left
    waiting in a collective; when any code is set the gradients are left alone (the caller raises).
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    device = params[0].device
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, dtype)
             for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device)
    codes = torch.zeros(world, dtype=dtype, device=device)
    codes[rank] = code
    flat = torch.cat(parts + [has_grad, codes])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total = flat.numel() - len(params) - world
    reduced_codes = [int(c) for c in flat[-world:].tolist()]
    if any(reduced_codes):
        return reduced_codes
    flat[:total].div_(world)
    offset = 0
    for p, present in zip(params, flat[total:total + len(params)].tolist()):
        size = p.numel()
        if present > 0:
            mean = flat[offset:offset + size].view(p.shape)
            if p.grad is None:
                p.grad = mean.to(device=p.device, dtype=p.dtype).clone()
            else:
                p.grad.copy_(mean)
        offset += size
    return reduced_codes


def _micro_batches(batch: Any) -> list:
    """``batch`` as a list of micro-batches: a :class:`MicroBatches` or a list of dicts is one; anything else is a
    single batch (so a list batch of tensors for a custom ``loss_fn`` keeps meaning one batch)."""
    if isinstance(batch, MicroBatches) or (isinstance(batch, list) and batch and
                                           all(isinstance(b, Mapping) for b in batch)):
        if not batch:
            raise SearchStateError("an empty list of micro-batches")
        return list(batch)
    if isinstance(batch, list) and not batch:
        raise SearchStateError("an empty list of micro-batches")
    return [batch]


def _to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` (dicts, lists, tuples, nested) on ``device``; ``batch`` itself when all are there."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: _to_device(v, device) for k, v in batch.items()}
        if all(moved[k] is v for k, v in batch.items()):
            return batch
        if type(batch) is dict:
            return moved
        try:  # e.g. transformers' BatchEncoding
            return type(batch)(moved)
        except Exception:  # noqa: BLE001 - an exotic mapping: a plain dict does for model(**batch)
            return moved
    if isinstance(batch, (list, tuple)):
        items = [_to_device(v, device) for v in batch]
        if all(a is b for a, b in zip(items, batch)):
            return batch
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        try:
            return type(batch)(items)
        except Exception:  # noqa: BLE001
            return items
    return batch


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device, else its first parameter's (CPU if none)."""
    try:
        embeddings = model.get_input_embeddings()
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    except (AttributeError, NotImplementedError, TypeError):
        pass
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _uses_conv1d(model: nn.Module, grid: DAMGrid) -> bool:
    return any(not isinstance(model.get_submodule(n), nn.Linear) for n in grid.module_names())
