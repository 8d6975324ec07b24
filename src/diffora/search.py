r"""Step 3 of the pipeline: the bi-level search over the relaxed DAM.

.. math::

    \min_\beta \; \mathcal{L}_{\text{gate}}\big(\Theta^*(\beta), \beta\big)
    \quad \text{s.t.} \quad
    \Theta^*(\beta) = \arg\min_\Theta \mathcal{L}_{\text{weight}}(\Theta, \beta)

``Θ`` = LoRA ``A``/``B`` of every candidate + the task head, trained on the *weight split*; ``β`` = the DAM gate
parameters, trained on the *gate split* (both come from the training data — never from the dev set you report).

* First order (default, DARTS' first-order approximation): alternate one AdamW step on ``Θ`` with one Adam step on
  ``β`` using ``∇_β L_gate(Θ, β)``.
* Second order (DARTS' unrolled gradient): see :mod:`diffora.second_order`.

LoRA's ``B`` starts at zero, so ``∂L/∂g`` (hence ``∂L/∂β``) is exactly zero until ``B`` has moved:
``gate_warmup_steps`` weight-only steps run before the first gate step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .candidates import DAMGrid, detect_task_heads, find_candidates
from .config import SELECTION_SCORES, DiffoRAConfig
from .discretize import Selection, select_modules
from .errors import ConfigError, SearchStateError, TrainingError
from .export import build_exported_model, collect_shared_weights, infer_task_type, lora_config_for
from .gates import DAMGates, GateHooks
from .record import RECORD_FORMAT
from .second_order import unrolled_gate_gradient

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


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
    """

    def __init__(
        self,
        model: nn.Module,
        config: DiffoRAConfig,
        *,
        adapter_name: str = "default",
        loss_fn: Optional[LossFn] = None,
    ) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.loss_fn: LossFn = loss_fn or default_loss
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
        self.gates = DAMGates(self.grid, config.gate, config.gate_init, config.temperature)
        self.hooks = GateHooks(self.model, self.grid, self.gates, adapter_name)
        self.weight_params = [p for p in self.model.parameters() if p.requires_grad]
        self.weight_optimizer = torch.optim.AdamW(
            self.weight_params, lr=config.weight_lr, weight_decay=config.weight_decay
        )
        # DARTS' architecture optimiser: Adam with beta1 = 0.5.
        self.gate_optimizer = torch.optim.Adam(
            self.gates.parameters(), lr=config.gate_lr, betas=(0.5, 0.999), weight_decay=config.gate_weight_decay
        )
        self.weight_steps = 0
        self.gate_steps = 0
        self.history = SearchHistory()
        self.exported = False

    # ------------------------------------------------------------------ steps
    def weight_step(self, batch: Batch) -> float:
        """One AdamW step on LoRA A/B and the head on a weight-split batch; the betas do not move."""
        self.check_live()
        self.model.train()
        self.weight_optimizer.zero_grad(set_to_none=True)
        with _no_grad_for(self.gates.beta):
            loss = self.loss_fn(self.model, batch)
            _check_finite(loss, "weight", self.weight_steps)
            loss.backward()
        _average_across_processes([p.grad for p in self.weight_params if p.grad is not None])
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.weight_params, self.config.max_grad_norm)
        self.weight_optimizer.step()
        self.weight_steps += 1
        value = float(loss.detach())
        self.history.weight_losses.append(value)
        return value

    def record_weight_step(self, loss: float) -> None:
        """Count a weight step that an outside training loop (e.g. a ``transformers.Trainer``) performed."""
        self.check_live()
        self.weight_steps += 1
        self.history.weight_losses.append(float(loss))

    def gate_step(self, gate_batch: Batch, weight_batch: Optional[Batch] = None) -> float:
        """One Adam step on the betas on a gate-split batch; LoRA weights and head are left bit-identical.

        ``weight_batch`` is needed by the second-order search (its unrolled virtual step).
        """
        self.check_live()
        self.model.train()
        if self.config.order == "second":
            if weight_batch is None:
                raise SearchStateError("the second-order gate step needs the weight batch: gate_step(gate, weight)")
            grad, loss = self.second_order_gradient(gate_batch, weight_batch)
        else:
            loss = self.gate_loss(gate_batch)
            (grad,) = torch.autograd.grad(loss, [self.gates.beta])
        _check_finite(loss, "gate", self.gate_steps)
        self.gate_optimizer.zero_grad(set_to_none=True)
        self.gates.beta.grad = grad.detach().clone()
        _average_across_processes([self.gates.beta.grad])
        self.gate_optimizer.step()
        self.gate_steps += 1
        value = float(loss.detach())
        self.history.gate_losses.append(value)
        return value

    def second_order_gradient(
        self, gate_batch: Batch, weight_batch: Batch, xi: Optional[float] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DARTS' unrolled gate gradient (see :mod:`diffora.second_order`) and the gate loss; weights unchanged."""
        if xi is None:
            xi = self.config.unroll_lr if self.config.unroll_lr is not None else self.config.weight_lr
        return unrolled_gate_gradient(
            lambda: self.loss_fn(self.model, weight_batch), lambda: self.gate_loss(gate_batch),
            self.weight_params, self.gates.beta, xi,
        )

    def gate_loss(self, batch: Batch) -> torch.Tensor:
        """Task loss on a gate batch plus the optional zero-one regulariser."""
        loss = self.loss_fn(self.model, batch)
        if self.config.zero_one_weight > 0:
            loss = loss + self.config.zero_one_weight * self.gates.zero_one_loss()
        return loss

    def fit(
        self,
        weight_data: Iterable[Batch],
        gate_data: Iterable[Batch],
        steps: int,
        *,
        progress: bool = True,
        snapshot_every: int = 10,
        callback: Optional[Callable[["DAMSearch", int], None]] = None,
    ) -> SearchHistory:
        """Run search iterations until ``steps`` in total: a weight step, then (after the warm-up) a gate step.

        ``weight_data``/``gate_data`` are re-iterated when exhausted (e.g. DataLoaders, reshuffled each pass). A
        search restored with :meth:`load_state_dict` continues from its step counter.
        """
        if steps <= 0:
            raise SearchStateError(f"steps must be positive, got {steps}")
        if steps <= self.config.gate_warmup_steps:
            raise SearchStateError(
                f"steps ({steps}) must exceed gate_warmup_steps ({self.config.gate_warmup_steps}), "
                "otherwise no gate step runs and the DAM learns nothing"
            )
        weights, gates = _cycle(weight_data), _cycle(gate_data)
        bar = tqdm(range(self.weight_steps, steps), desc="DAM search", disable=not progress, dynamic_ncols=True,
                   initial=self.weight_steps, total=steps)
        for step in bar:
            weight_batch = next(weights)
            w_loss = self.weight_step(weight_batch)
            postfix = {"w_loss": f"{w_loss:.4f}"}
            if step >= self.config.gate_warmup_steps:
                g_loss = self.gate_step(next(gates), weight_batch)
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
        """What discretisation ranks: the gate values, or (``"movement"``) ``|g - g_initial|`` per entry."""
        score = score or self.config.selection_score
        if score == "gate":
            return self.gate_values()
        if score not in SELECTION_SCORES:
            raise ConfigError(f"selection_score must be one of {SELECTION_SCORES}, got {score!r}")
        with torch.no_grad():
            moved = (self.gates.values() - self.gates.initial_values(self.config.gate_init)).abs()
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

    def export(self, selection: Selection, weight_sharing: Optional[bool] = None) -> PeftModel:
        """A stock ``peft.PeftModel`` with LoRA on the kept modules only (see :mod:`diffora.export`).

        The search is consumed: its model becomes the exported model's base.
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
            fan_in_fan_out=self.fan_in_fan_out,
        )
        return build_exported_model(plain_model, config, shared, adapter_name=self.adapter_name,
                                    weight_sharing=sharing, seed=self.config.seed + 1)

    def record(self, selection: Optional[Selection] = None, **extra: Any) -> dict:
        """The search record (``dam.json``, format :data:`diffora.record.RECORD_FORMAT`)."""
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
            "history": {
                "weight_losses": list(self.history.weight_losses),
                "gate_losses": list(self.history.gate_losses),
                "gate_snapshots": list(self.history.gate_snapshots),
            },
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
        self.weight_steps = int(state["weight_steps"])
        self.gate_steps = int(state["gate_steps"])
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
) -> DAMSearch:
    """Give every candidate module of ``model`` a gated LoRA branch and return the search.

    Args:
        model: a Hugging Face model (modified in place).
        config: search options; defaults to :class:`DiffoRAConfig()`.
        adapter_name: PEFT adapter name used during the search.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
    """
    return DAMSearch(model, config or DiffoRAConfig(), adapter_name=adapter_name, loss_fn=loss_fn)


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


def _check_finite(loss: torch.Tensor, kind: str, step: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"the {kind} loss became {float(loss.detach())} at {kind} step {step}; lower the learning rate "
            "or check the data for invalid labels"
        )


def _average_across_processes(grads: list[torch.Tensor]) -> None:
    """All-reduce (mean) gradients when running data-parallel (accelerate/torchrun), so every rank steps alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for grad in grads:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad.div_(world)


def _uses_conv1d(model: nn.Module, grid: DAMGrid) -> bool:
    return any(not isinstance(model.get_submodule(n), nn.Linear) for n in grid.module_names())
