r"""The DAM search inside any ``transformers.Trainer`` (plain ``Trainer``, TRL's ``SFTTrainer``, your subclass), through
the public ``TrainerCallback`` API only.

The host trainer trains the gated search model (``search.model``, LoRA on every DAM candidate, each branch scaled by
its gate) exactly as it would train any PEFT model: its batches, tokenisation, packing, collator, loss, optimiser,
scheduler, gradient accumulation, clipping, mixed precision and DDP. :class:`DiffoRACallback` adds the other half of
the bi-level search::

    after optimiser step k of the host              (on_step_end)
        weight step k   counted: search.record_weight_step(...)   (the loss is the host's, filled in by on_log)
        gate step       if k > gate_warmup_steps: search.gate_step(batch) on the next gate-split batch
    at k = search_steps                              the search is complete; ``callback.finish()`` discretises

Gate batches come from the host: the gate split is one of the trainer's named eval datasets (default name
:data:`GATE_SPLIT`, ``"diffora_gate"``), so the host preprocesses it like any eval set (``SFTTrainer`` tokenises it,
packs it, masks prompts for completion-only loss), and the callback obtains it with the public
``trainer.get_eval_dataloader("diffora_gate")``: that loader's dataset, collator (with the host's column removal) and
per-process batch sampler (each DDP rank its own shard). Gate batch ``g`` is the ``g mod n``-th of that loader's
``n`` batches, in a seeded order that changes every pass; it is collated by the host's collator and moved to the
model's device. Gate batches are a pure function of the gate-step count, so resuming needs no data-loader state.

The gate split is taken out of ``trainer.eval_dataset`` when the callback is created, so the host never evaluates it
as a metric set (``evaluate_gate_split=True`` leaves it in: the host then reports ``eval_diffora_gate_*`` at every
evaluation, at the cost of one more pass over the gate split each time).

Gate gradients: the gate step runs on ``search.model`` (outside the DDP wrapper), so ``DAMSearch.gate_step``
all-reduces the beta gradient when ``torch.distributed`` is initialised; every rank steps its betas identically.

Weight-step losses: the callback does not recompute them. It counts each weight step at ``on_step_end`` and fills in
the loss from the host's next ``on_log`` (the host's own loss, averaged over the logging window and over processes);
it asks the host to log at the last search step and at every step that saves a checkpoint, so every checkpoint and
the final record hold complete loss histories.

Checkpoints: ``on_save`` writes :data:`STATE_JSON` + :data:`STATE_TENSORS` (betas, gate optimiser, counters, loss and
gate history, the search's LoRA/head weights) into ``os.path.join(args.output_dir, f"checkpoint-{global_step}")``,
next to what the host saves. :meth:`DiffoRACallback.load_checkpoint` restores them before
``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import ConfigError, DataError, SearchStateError
from ..method.parallel import model_device, move_optimizer_state
from ..method.schedule import check_warmup, gate_warmup
from ..method.search import DAMSearch
from ..select.choose import choose_modules
from ..select.quota import Selection
from ..store.trainer_state import (
    STATE_FORMAT,
    STATE_JSON,
    STATE_TENSORS,
    check_same_plan,
    read_search_state,
    write_search_state,
)

__all__ = [
    "GATE_SPLIT",
    "STATE_FORMAT",
    "STATE_JSON",
    "STATE_TENSORS",
    "DiffoRACallback",
    "checkpoint_folder",
    "finish_search",
    "read_search_state",
    "write_search_state",
]

#: the name of the gate split among the host trainer's eval datasets
GATE_SPLIT = "diffora_gate"
#: a gate snapshot goes into the history every this many weight steps (and at the last one)
SNAPSHOT_EVERY = 10
#: what to change when a search is too short for a gate step
_HINT = "raise search_steps or lower DiffoRAConfig.gate_warmup_steps"
#: model kwargs of a host forward that are not part of the batch (dropped from the second-order weight batch)
_CALL_OPTIONS = ("num_items_in_batch", "fused_lm_head", "return_dict", "use_cache")

_SINGLE_LEVEL = (
    "search_levels='single' steps the gates in the same backward as the weights, inside diffora's own search loop "
    "(diffora run/search, auto_lora_config, narrow_lora); here the host trainer steps the weights, so use "
    "search_levels='bi'"
)


class DiffoRACallback(TrainerCallback):
    """Runs the DAM search's gate steps and bookkeeping inside a host ``Trainer``'s ``train()``.

    One ``train()`` call, in place (:class:`InPlaceSearch`)::

        SFTTrainer(model, peft_config=LoraConfig(...), callbacks=[
            DiffoRACallback(DiffoRAConfig(keep_ratio=0.5), gate_dataset=gate_rows, search_steps=100)])

    searches during the first ``search_steps`` host steps and narrows the host's PeftModel to the kept modules;
    ``gate_rows`` are held out of the training data and formatted like the host's train rows (its collator batches
    them). Pass ``trainer=`` (``trainer.add_callback(DiffoRACallback(config, trainer, ...))``) so the gate metrics
    go out through ``trainer.log`` to every ``report_to`` logger; without it they join the host's next log entry.

    Two phases, on a search you prepared (below): the host trains ``search.model``; export after ``finish()``.

    Args:
        search: the search (:func:`diffora.prepare_search`); the host trainer must train ``search.model``.
        trainer: the host trainer (any ``transformers.Trainer`` subclass), built with ``model=search.model``,
            ``max_steps=search_steps`` and the gate split among its eval datasets under ``gate_split``.
            Add the callback to it yourself: ``trainer.add_callback(callback)``.
        search_steps: optimiser steps of the search (default: the host's ``max_steps``); must exceed
            ``search.config.gate_warmup_steps`` and equal the host's ``max_steps``.
        gate_split: the key of the gate split in ``trainer.eval_dataset`` (a dict).
        evaluate_gate_split: leave the gate split among the host's eval sets (it is then evaluated as
            ``eval_<gate_split>_*`` whenever the host evaluates); by default it is taken out.
        checkpoint_info: extra JSON fields written into every checkpoint's :data:`STATE_JSON` and compared on
            :meth:`load_checkpoint` (e.g. split sizes, so a resume with other data is refused).

    Attributes:
        gate_dataset: the gate split as the host preprocessed it.
        gate_dataloader: the host's loader for it (``trainer.get_eval_dataloader(gate_split)``), built at
            ``on_train_begin``.
        gate_batches: this process's batches of the gate split (lists of row indices into the loader's dataset).
    """

    def __new__(cls, search: Any = None, *args: Any, **kwargs: Any) -> "DiffoRACallback":
        # DiffoRACallback(config, gate_dataset=..., search_steps=...) is the one-train() in-place search
        if cls is DiffoRACallback and not isinstance(search, DAMSearch):
            return super().__new__(InPlaceSearch)
        return super().__new__(cls)

    def __init__(
        self,
        search: DAMSearch,
        trainer: Any,
        *,
        search_steps: Optional[int] = None,
        gate_split: str = GATE_SPLIT,
        evaluate_gate_split: bool = False,
        checkpoint_info: Optional[dict] = None,
    ) -> None:
        if search.config.search_levels == "single":
            raise ConfigError(_SINGLE_LEVEL)
        if search_steps is not None and (isinstance(search_steps, bool) or not isinstance(search_steps, int)):
            raise ConfigError(f"search_steps must be a whole number of optimiser steps, got {search_steps!r}")
        if search_steps is not None:
            check_warmup(search_steps, gate_warmup(search_steps, search.config), hint=_HINT)
        if trainer.model is not search.model:
            raise ConfigError(
                "the host trainer must train the search's gated model: build it with model=search.model (the "
                "PeftModel prepare_search returned), not the base model or another copy"
            )
        evals = trainer.eval_dataset
        if not isinstance(evals, dict) or gate_split not in evals:
            raise ConfigError(
                f"the host trainer has no eval dataset named '{gate_split}': pass the gate split as "
                f"eval_dataset={{'{gate_split}': gate_dataset, ...}} so that the trainer preprocesses it"
            )
        self.search = search
        self.trainer = trainer
        self.search_steps = search_steps
        self.warmup = gate_warmup(search_steps, search.config) if search_steps is not None else None
        self.gate_split = gate_split
        self.evaluate_gate_split = evaluate_gate_split
        self.checkpoint_info = dict(checkpoint_info or {})
        self.gate_dataset = evals[gate_split]
        if not evaluate_gate_split:
            others = {k: v for k, v in evals.items() if k != gate_split}
            trainer.eval_dataset = others or None
            args = trainer.args
            if not others and (args.eval_strategy != "no" or args.eval_on_start):
                raise ConfigError(
                    f"the host trainer evaluates (eval_strategy={args.eval_strategy}) but its only eval dataset is the "
                    f"gate split '{gate_split}', which is not evaluated by default: add an eval set, set "
                    "eval_strategy='no', or pass evaluate_gate_split=True"
                )
        self.gate_dataloader: Any = None
        self.gate_batches: list[list[int]] = []
        self.gate_order: tuple[int, list[int]] = (-1, [])
        self.gate_losses_since_log: list[float] = []
        self.pending_losses = 0  # weight steps counted but not yet given the host's logged loss
        self.weight_batch: Optional[dict] = None
        self.hook_handle: Any = None
        self.restored_from: Optional[str] = None

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        search = self.search
        if self.search_steps is None:
            self.search_steps = int(state.max_steps)
            self.warmup = gate_warmup(self.search_steps, search.config)
            check_warmup(self.search_steps, self.warmup, hint=_HINT)
        if state.max_steps != self.search_steps:
            raise ConfigError(
                f"the host trainer runs {state.max_steps} optimiser steps but the search is {self.search_steps} steps "
                "long: build the search-phase trainer with max_steps=search_steps"
            )
        if args.load_best_model_at_end:
            raise ConfigError(
                "load_best_model_at_end would load an earlier search checkpoint's LoRA weights under the final gates; "
                "turn it off for the search phase (use it for the fine-tuning phase)"
            )
        if state.global_step != search.weight_steps:
            raise SearchStateError(
                f"the host trainer starts at step {state.global_step} but the search state is at weight step "
                f"{search.weight_steps}: to resume, call callback.load_checkpoint(folder) before "
                "trainer.train(resume_from_checkpoint=folder)"
            )
        device = model_device(search.model)
        search.gates.to(device)
        move_optimizer_state(search.gate_optimizer, device)
        search.gates.beta.requires_grad_(False)  # weight steps compute no beta gradient; gate steps enable it
        self.gate_dataloader = host_gate_loader(self.trainer, self.gate_split, self.gate_dataset)
        self.gate_batches = [list(b) for b in self.gate_dataloader.batch_sampler]
        if not self.gate_batches:
            raise DataError(f"the gate split '{self.gate_split}' gives no batch on this process; it needs more rows")
        if search.config.order == "second" and self.hook_handle is None:
            self.hook_handle = search.model.register_forward_pre_hook(self.capture_weight_batch, with_kwargs=True)
        return control

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        search, step = self.search, state.global_step
        if step != search.weight_steps + 1:
            raise SearchStateError(
                f"host step {step} does not follow the search's weight step {search.weight_steps}; one callback "
                "instance serves one search-phase trainer"
            )
        search.record_weight_step(math.nan)  # the host's loss for this step arrives with its next log
        self.pending_losses += 1
        if step > self.warmup:
            self.gate_losses_since_log.append(self.run_gate_step())
        self.weight_batch = None
        if step % SNAPSHOT_EVERY == 0 or step == self.search_steps:
            search.snapshot()
        if step >= self.search_steps or control.should_save:
            control.should_log = True  # complete loss history at the end and in every checkpoint
        return control

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if control.should_save:
            control.should_log = True
        return control

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: Optional[dict] = None, **kwargs: Any
    ):
        if not logs or "loss" not in logs:
            return control
        if self.pending_losses:
            losses = self.search.history.weight_losses
            losses[len(losses) - self.pending_losses :] = [float(logs["loss"])] * self.pending_losses
            self.pending_losses = 0
        extra: dict[str, float] = {}
        if self.gate_losses_since_log:
            extra["gate_loss"] = sum(self.gate_losses_since_log) / len(self.gate_losses_since_log)
            gates = self.search.gates.values().detach()[self.search.gates.valid]
            extra["gate_min"], extra["gate_max"] = float(gates.min()), float(gates.max())
            self.gate_losses_since_log.clear()
        if extra:
            logs.update(extra)
            history = state.log_history
            if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
                history[-1].update(extra)
        return control

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if args.should_save:
            info = {
                **self.checkpoint_info,
                "phase": "search",
                "global_step": state.global_step,
                "search_steps": self.search_steps,
                "pending_losses": self.pending_losses,
                "gate_losses_since_log": list(self.gate_losses_since_log),
            }
            write_search_state(checkpoint_folder(args, state), info, self.search.state_dict())
        return control

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.hook_handle is not None:
            self.hook_handle.remove()
            self.hook_handle = None
        return control

    # -------------------------------------------------------------------------------------------- public API
    @property
    def finished(self) -> bool:
        """Whether the host ran all ``search_steps`` weight steps (the DAM can be discretised)."""
        return self.search_steps is not None and self.search.weight_steps >= self.search_steps

    def finish(self, **discretize_kwargs: Any) -> Selection:
        """Check that the search ran to the end and discretise it (``choose_modules(search, **discretize_kwargs)``).

        Raises :class:`~diffora.errors.SearchStateError` when the host stopped before ``search_steps`` (a callback,
        an exhausted data set) or no gate step ran: the DAM is then not discretised, so no model is exported.
        """
        if not self.finished:
            raise SearchStateError(
                f"training stopped at step {self.search.weight_steps}, before the DAM search finished at step "
                f"{self.search_steps}; the DAM was never discretised, so no LoRA model was produced (a callback or an "
                "exhausted data set stopped training early?)"
            )
        return finish_search(self.search, **discretize_kwargs)

    def load_checkpoint(self, folder: str) -> dict:
        """Restore the search state :meth:`on_save` wrote into ``folder`` (call before
        ``trainer.train(resume_from_checkpoint=folder)``); returns the checkpoint's JSON fields."""
        saved, state = read_search_state(folder)
        if saved.get("phase") != "search":
            raise SearchStateError(f"'{folder}' is a {saved.get('phase')}-phase checkpoint, not a search checkpoint")
        check_same_plan(saved, {**self.checkpoint_info, "search_steps": self.search_steps}, folder)
        self.search.load_state_dict(state)
        self.pending_losses = int(saved.get("pending_losses", 0))
        self.gate_losses_since_log = [float(v) for v in saved.get("gate_losses_since_log", [])]
        self.restored_from = folder
        return saved

    # ----------------------------------------------------------------------------------------------- steps
    def gate_batch(self, gate_step: int) -> dict:
        """The batch of gate step ``gate_step`` on this process: the host's collator's, on the model's device."""
        n = len(self.gate_batches)
        cycle, position = divmod(gate_step, n)
        if self.gate_order[0] != cycle:  # a new pass over the gate split: a new seeded batch order (same on all ranks)
            generator = torch.Generator().manual_seed(self.search.config.seed * 7919 + cycle)
            self.gate_order = (cycle, torch.randperm(n, generator=generator).tolist())
        rows = self.gate_batches[self.gate_order[1][position]]
        loader = self.gate_dataloader
        batch = loader.collate_fn([loader.dataset[i] for i in rows])
        device = model_device(self.search.model)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def run_gate_step(self) -> float:
        """One gate step on the next gate batch (betas enabled for grad only inside it, host autocast applied)."""
        search = self.search
        gate_batch = self.gate_batch(search.gate_steps)
        weight_batch = self.weight_batch if search.config.order == "second" else None
        if search.config.order == "second" and weight_batch is None:
            raise SearchStateError("the second-order gate step found no weight batch of the host's training step")
        beta = search.gates.beta
        beta.requires_grad_(True)
        try:
            with self.trainer.accelerator.autocast():
                return search.gate_step(gate_batch, weight_batch)
        finally:
            beta.requires_grad_(False)

    def capture_weight_batch(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: keep the host's last training micro-batch (the second-order unrolled step needs it)."""
        if module.training and not self.search.gates.beta.requires_grad:
            self.weight_batch = {k: v for k, v in kwargs.items() if k not in _CALL_OPTIONS}


def finish_search(search: DAMSearch, **discretize_kwargs: Any) -> Selection:
    """Discretise a search that ran to its end; refuses one without a gate step (that would be plain LoRA)."""
    if search.gate_steps == 0:
        raise SearchStateError(
            f"the search reached step {search.weight_steps} without a single gate step; refusing to discretise "
            "an untrained DAM (that would be plain LoRA on an arbitrary subset)"
        )
    losses = search.history.weight_losses
    if any(isinstance(v, float) and math.isnan(v) for v in losses):
        # only when a checkpoint was taken between two host logs (e.g. save_strategy="best"): keep dam.json valid
        losses[:] = [None if isinstance(v, float) and math.isnan(v) else v for v in losses]
    search.gates.beta.requires_grad_(True)
    return choose_modules(search, **discretize_kwargs)


def host_gate_loader(trainer: Any, name: str, dataset: Any) -> Any:
    """The host's eval loader for the gate split (``trainer.get_eval_dataloader(name)``), built by name so that the
    host's loader cache keys stay apart; ``trainer.eval_dataset`` is put back as it was."""
    current = trainer.eval_dataset
    trainer.eval_dataset = {name: dataset}
    try:
        loader = trainer.get_eval_dataloader(name)
    finally:
        trainer.eval_dataset = current
    if getattr(loader, "batch_sampler", None) is None:
        raise DataError(
            f"the gate split '{name}' is an iterable data set; DiffoRA needs a map-style (sized) gate split, so that "
            "gate batches can be replayed exactly on resume"
        )
    return loader


# ------------------------------------------------------------------------------------------------- state files
def checkpoint_folder(args: Any, state: TrainerState) -> str:
    """The folder the host ``Trainer`` writes its checkpoint of ``state.global_step`` into."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


# ------------------------------------------------------------------------------------------------- in place
class InPlaceSearch(DiffoRACallback):
    """The search in the first ``search_steps`` steps of the user's own ``trainer.train()``, then narrowing in place.

    Built by ``DiffoRACallback(config=..., gate_dataset=..., search_steps=...)`` (no search): see
    :class:`DiffoRACallback`. The host trains its own ``PeftModel`` (``peft_config=`` or ``get_peft_model``); at its
    first step the search attaches to that model (:meth:`DAMSearch` on a PeftModel: the candidates are the
    adapter's modules), after each host step past the warm-up one gate step runs on the next gate batch, and after
    step ``search_steps`` the model is narrowed in place to the kept modules (:func:`narrow_model`); the host's
    optimiser, scheduler, step counter and log stream simply continue. Dropped branches get no more gradients, so
    the host's optimiser skips them.
    """

    def __init__(
        self, config: Any = None, trainer: Any = None, *, gate_dataset: Any = None, search_steps: Any = None
    ) -> None:
        from ..method.config import DiffoRAConfig
        from .narrow import check_options

        config = config if config is not None else DiffoRAConfig()
        if not isinstance(config, DiffoRAConfig):
            raise ConfigError(f"DiffoRACallback takes a DAMSearch or a DiffoRAConfig, got {type(config).__name__}")
        if gate_dataset is None:
            raise ConfigError(
                "DiffoRACallback(config, gate_dataset=..., search_steps=...) needs the gate split: rows "
                "held out of the training data, formatted like the host's train rows"
            )
        check_options(config, kernels_available=False)
        if config.search_levels == "single":
            raise ConfigError(_SINGLE_LEVEL)
        if config.rank_allocation != "none":
            raise ConfigError(
                "rank_allocation changes LoRA shapes, which the host's optimiser cannot follow in the "
                "middle of train(): narrow first with diffora.narrow_lora, then build the trainer"
            )
        if isinstance(search_steps, bool) or not isinstance(search_steps, int):
            raise ConfigError(f"search_steps must be a whole number of optimiser steps, got {search_steps!r}")
        check_warmup(search_steps, gate_warmup(search_steps, config), hint=_HINT)
        try:
            n = len(gate_dataset)
        except TypeError:
            raise DataError(
                "gate_dataset must be a sized data set (rows formatted like the host's train rows)"
            ) from None
        if n == 0:
            raise DataError("gate_dataset is empty")
        self.config, self.gate_dataset, self.search_steps = config, gate_dataset, search_steps
        self.warmup = gate_warmup(search_steps, config)
        self.trainer = trainer
        self.search: Optional[DAMSearch] = None
        self.selection: Optional[Selection] = None
        self.lora_config: Any = None
        self.collate: Any = None
        self.batch_size = 1
        self.gate_losses_since_log: list[float] = []
        self.pending: dict[str, float] = {}

    @property
    def finished(self) -> bool:
        return self.selection is not None

    def on_train_begin(
        self,
        args: Any,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ):
        from peft import PeftModel

        from ..method.search import prepare_search

        if not isinstance(model, PeftModel):
            raise ConfigError(
                "DiffoRACallback searches the host's PeftModel: build the trainer with "
                "peft_config=LoraConfig(...) or on get_peft_model(model, ...)"
            )
        if state.max_steps < self.search_steps:
            raise ConfigError(
                f"the host trainer runs {state.max_steps} steps, fewer than the {self.search_steps} search steps"
            )
        self.collate = getattr(train_dataloader, "collate_fn", None) or (lambda rows: rows)
        self.batch_size = max(1, int(args.per_device_train_batch_size))
        if self.search is None:
            self.search = prepare_search(model, self.config)  # the host's optimiser steps the LoRA weights
        if state.global_step > 0:
            self._resume(checkpoint_folder(args, state), state.global_step)
        if self.search is not None and not self.search.exported:
            self.search.gates.beta.requires_grad_(False)
        return control

    def _resume(self, folder: str, step: int) -> None:
        saved, tensors = read_search_state(folder)
        if saved.get("phase") != "in-place":
            raise SearchStateError(f"'{folder}' holds no in-place DiffoRA state to resume from")
        check_same_plan(saved, {"search_steps": self.search_steps}, folder)
        search = self.search
        if saved.get("selection") is None:
            search.load_state_dict(tensors)
            self.gate_losses_since_log = [float(v) for v in saved.get("gate_losses_since_log", [])]
            return
        from .narrow import narrow_model

        # the host reloaded the narrowed adapter's weights (gates already folded): narrow the structure only
        selection = Selection.from_dict(saved["selection"])
        with search.gates.forced(1.0):
            narrowed = narrow_model(search, selection)
        self.selection, self.lora_config = selection, narrowed.lora_config

    def gate_batch(self, gate_step: int) -> dict:
        n = len(self.gate_dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + gate_step // n))
        per_pass = max(1, n // self.batch_size)
        start = (gate_step % per_pass) * self.batch_size
        rows = [self.gate_dataset[int(i)] for i in order[start : start + self.batch_size]]
        return to_model_device(self.collate(rows), self.search.model)

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        search, step = self.search, state.global_step
        if search is None or self.finished:
            return control
        search.record_weight_step(math.nan)
        if step > self.warmup:
            beta = search.gates.beta
            beta.requires_grad_(True)
            try:
                self.gate_losses_since_log.append(search.gate_step(self.gate_batch(search.gate_steps)))
            finally:
                beta.requires_grad_(False)
        if step % SNAPSHOT_EVERY == 0 or step == self.search_steps:
            search.snapshot()
        if step >= self.search_steps:
            control.should_log = True  # the last gate metrics go out with the host's log of this step
        self._collect()
        if step >= self.search_steps:
            self._narrow()
        return control

    def _collect(self) -> None:
        if not self.gate_losses_since_log:
            return
        gates = self.search.gates.values().detach()[self.search.gates.valid]
        self.pending = {
            "diffora/gate_loss": sum(self.gate_losses_since_log) / len(self.gate_losses_since_log),
            "diffora/gate_min": float(gates.min()),
            "diffora/gate_max": float(gates.max()),
        }

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: Optional[dict] = None, **kwargs: Any
    ):
        """Gate metrics through the host: ``trainer.log`` right after the host's own log (so every ``report_to``
        logger sees them) when the trainer is known, else merged into the host's log entry (callbacks after this
        one and ``state.log_history`` see them)."""
        if not self.pending or logs is None or "loss" not in logs:
            return control
        metrics, self.pending = self.pending, {}
        self.gate_losses_since_log.clear()
        if self.trainer is not None:
            self.trainer.log(metrics)
            return self.trainer.control
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        return control

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        return control

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        return control

    def finish(self, **discretize_kwargs: Any) -> Selection:
        """The kept modules (the model was narrowed at step ``search_steps``)."""
        if self.selection is None:
            raise SearchStateError(
                f"training stopped before the DAM search finished at step {self.search_steps}; "
                "the model was not narrowed"
            )
        return self.selection

    def _narrow(self) -> None:
        from .narrow import narrow_model

        self.selection = finish_search(self.search)
        self.lora_config = narrow_model(self.search, self.selection).lora_config

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if args.should_save and self.search is not None:
            info = {
                "phase": "in-place",
                "search_steps": self.search_steps,
                "global_step": state.global_step,
                "gate_losses_since_log": list(self.gate_losses_since_log),
                "selection": self.selection.to_dict() if self.selection is not None else None,
            }
            write_search_state(
                checkpoint_folder(args, state), info, None if self.finished else self.search.state_dict()
            )
        return control


def to_model_device(batch: Any, model: Any) -> Any:
    device = model_device(model)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch
