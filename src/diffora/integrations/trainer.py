r"""DiffoRA inside ``transformers.Trainer.train()``: search, discretise, then ordinary LoRA training, in one call.

:class:`DiffoRATrainer` is a ``Trainer`` whose ``train()`` runs two phases over one global step counter::

    steps 1 .. S        search      model = LoRA on every DAM candidate, gated (diffora.search.DAMSearch)
                                    weight step = the Trainer's own step (its batches, loss, optimiser, DDP,
                                                  gradient accumulation, clipping) on the *weight split*;
                                    gate step   = one Adam step on the betas on a *gate split* batch, right after
                                                  each weight step once the warm-up is over
    at S                discretise  keep the top entries of the DAM -> stock PEFT LoRA on the kept modules
                                    (weight sharing: the search's A, g*B and trained head carry over)
    steps S+1 .. T      fine-tune   ordinary Trainer training of the exported PeftModel on the whole training set

The gate split is a seeded ``diffora_config.gate_fraction`` of ``train_dataset`` (the same split ``diffora run``
uses); the weight split is the rest. ``T`` is the Trainer's ``max_steps`` (or ``num_train_epochs`` over the whole
training set).

Guarantees (each one a bug AdaLoRA users met, see ``docs/huggingface.md``):

* it never degrades to plain LoRA: ``S`` must exceed ``gate_warmup_steps`` (checked before training starts) and a
  training run that ends before step ``S`` raises :class:`~diffora.errors.SearchStateError` instead of returning a
  model; ``save_model`` during the search raises too;
* gate gradients are averaged over processes under DDP (the gate step runs outside the DDP wrapper, which would
  otherwise bypass gradient sync); each process draws its own shard of the gate batch;
* checkpoints hold the betas, the gate optimiser, the search counters and history (``diffora_search.json`` +
  ``diffora_search.safetensors``) besides what the Trainer saves, and ``train(resume_from_checkpoint=...)`` restores
  them: a resumed run reproduces the uninterrupted one (search phase, boundary and fine-tuning phase alike);
* ``save_model`` writes a stock PEFT adapter plus the search record (``dam.json``) and heatmap (``dam.png``).

Learning rates: the LoRA/head weights use the Trainer's optimiser and ``learning_rate`` in both phases (the search
phase at a constant rate after the Trainer's warm-up, the fine-tuning phase with ``lr_scheduler_type`` over its own
``T - S`` steps); ``diffora_config.weight_lr``/``weight_decay``/``max_grad_norm`` are not used here (they belong to
``DAMSearch.fit``). The betas use ``diffora_config.gate_lr`` (Adam, beta1 = 0.5 as in DARTS).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
from transformers.optimization import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..config import DiffoRAConfig
from ..discretize import Selection
from ..errors import ConfigError, DataError, ModelError, SearchStateError
from ..search import prepare_search
from .auto_config import _has_adapters, split_indices

__all__ = ["DiffoRATrainer", "STATE_JSON", "STATE_TENSORS"]

STATE_JSON = "diffora_search.json"
STATE_TENSORS = "diffora_search.safetensors"
STATE_FORMAT = "diffora.trainer/1"
TRAINER_STATE_NAME = "trainer_state.json"
SNAPSHOT_EVERY = 10


class DiffoRATrainer(Trainer):
    """A ``transformers.Trainer`` that learns which modules get LoRA before training them.

    Pass the *base* model (no adapters): the trainer wraps it for the search (PEFT injection, in place, as
    ``get_peft_model`` does) and, at step ``search_steps``, replaces it by the exported PEFT model, available as
    ``trainer.model`` afterwards.

    Args:
        model: a Hugging Face model without adapters.
        args, data_collator, train_dataset, eval_dataset, **kwargs: as for ``transformers.Trainer``
            (``model_init`` and a pre-built ``optimizers`` pair are not supported: each phase creates its own
            optimiser; use ``optimizer_cls_and_kwargs`` or ``args.optim`` to choose one).
        diffora_config: search options (rank, alpha, keep ratio, gate form, gate lr, warm-up, seed…).
        search_steps: when to discretise: an ``int`` number of optimiser steps, a ``float`` in (0, 1) as a fraction of
            all steps, or ``None`` for one pass over the weight split (at least ``gate_warmup_steps + 20`` steps,
            at most half of all steps).
        gate_batch_size: examples per process in a gate batch (default ``args.per_device_train_batch_size``).

    Attributes:
        search: the :class:`~diffora.search.DAMSearch` (betas, gate optimiser, history).
        selection: the kept modules once discretised (``None`` before).
        record: the search record (``dam.json``) once discretised.
        search_steps: the resolved discretisation step (after ``train()`` started).
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        diffora_config: Optional[DiffoRAConfig] = None,
        search_steps: Union[int, float, None] = None,
        gate_batch_size: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if model is None or kwargs.get("model_init") is not None:
            raise ConfigError("DiffoRATrainer needs the model itself (model_init is not supported)")
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ConfigError(
                "DiffoRATrainer creates a new optimiser when the search ends (the trainable parameters change), so "
                "it cannot take a pre-built optimizers=(...) pair; use optimizer_cls_and_kwargs or args.optim"
            )
        if _has_adapters(model):
            raise ModelError("DiffoRATrainer needs the base model without adapters; it adds the LoRA layers itself")
        if train_dataset is None:
            raise ConfigError("DiffoRATrainer needs a train_dataset (the gate split is held out from it)")
        try:
            n_rows = len(train_dataset)
        except TypeError:
            raise DataError(
                "DiffoRATrainer needs a train_dataset with a length (map-style Dataset, list or datasets.Dataset): "
                "the gate split is a seeded slice of it"
            ) from None
        _check_search_steps(search_steps)
        if gate_batch_size is not None and gate_batch_size <= 0:
            raise ConfigError(f"gate_batch_size must be positive, got {gate_batch_size}")

        config = diffora_config or DiffoRAConfig()
        weight_idx, gate_idx = split_indices(n_rows, config.gate_fraction, config.seed)
        self.diffora_config = config
        self.search = prepare_search(model, config)
        self.selection: Optional[Selection] = None
        self.record: Optional[dict] = None
        self.search_steps: Optional[int] = None
        self._search_steps_arg = search_steps
        self._gate_batch_size_arg = gate_batch_size
        self._phase = "search"
        self._total_steps: Optional[int] = None
        self._full_train_dataset = train_dataset
        self._weight_rows, self._gate_rows_total = len(weight_idx), len(gate_idx)
        self._gate_dataset = _select(train_dataset, gate_idx)
        self._gate_collate: Any = None
        self._gate_perms: dict[int, list[int]] = {}
        self._boundary_dir: Optional[str] = None
        self._step_weight_loss = 0.0
        self._gate_losses_since_log: list[float] = []
        self._last_inputs: Any = None

        callbacks = [_DiffoRACallback(self)] + list(kwargs.pop("callbacks", None) or [])
        super().__init__(
            model=self.search.model,
            args=args,
            data_collator=data_collator,
            train_dataset=_select(train_dataset, weight_idx),
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            **kwargs,
        )
        self.search.loss_fn = self._gate_loss
        self.search.gates.to(self.args.device)

    # ------------------------------------------------------------------------------------------------------ train
    def train(
        self,
        resume_from_checkpoint: Union[str, bool, None] = None,
        trial: Any = None,
        ignore_keys_for_eval: Optional[list[str]] = None,
        **kwargs: Any,
    ):
        """Search for ``search_steps`` steps, discretise, export, then fine-tune the exported PEFT model."""
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        checkpoint = str(resume_from_checkpoint) if resume_from_checkpoint is not None else None
        if self._phase != "search":
            raise SearchStateError(
                "this DiffoRATrainer has already searched and exported its model; create a new DiffoRATrainer (with "
                "a fresh base model) to train again, or resume one from a checkpoint"
            )
        self._plan()
        saved = _read_state(checkpoint) if checkpoint is not None else None
        if checkpoint is not None:
            if saved is None:
                raise SearchStateError(
                    f"checkpoint '{checkpoint}' holds no DiffoRA search state ({STATE_JSON}); it was not written by "
                    "DiffoRATrainer, so the gates and the gate optimiser cannot be restored"
                )
            self._check_plan(saved, checkpoint)

        if saved is not None and saved["phase"] == "train":  # resume inside the fine-tuning phase
            self._restore_selection(saved)
            self._enter_finetune()
            return super().train(resume_from_checkpoint=checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

        boundary_source: Optional[str] = None
        if saved is not None and saved.get("selection") is not None:  # checkpoint taken when the search ended
            self._load_from_checkpoint(checkpoint)
            boundary_source = checkpoint
        else:
            super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                          **kwargs)
        if self.selection is None:
            raise SearchStateError(
                f"training stopped at step {self.state.global_step}, before the DAM search finished at step "
                f"{self.search_steps}; the DAM was never discretised, so no LoRA model was produced (a callback or "
                "an exhausted data set stopped training early?)"
            )
        self._enter_finetune()
        return self._continue_after_search(boundary_source, trial, ignore_keys_for_eval, **kwargs)

    def _continue_after_search(self, source: Optional[str], trial: Any, ignore_keys_for_eval: Any, **kwargs: Any):
        """Enter the fine-tuning phase as a resume from a private folder that holds the trainer state and RNG state at
        step S, so that an uninterrupted run and a run resumed at any checkpoint walk the same data and RNG streams."""
        boundary = tempfile.mkdtemp(prefix="diffora-boundary-")
        self._boundary_dir = boundary
        handler = self.callback_handler
        try:
            if source is None:
                self.state.save_to_json(os.path.join(boundary, TRAINER_STATE_NAME))
                self._save_rng_state(boundary)
            else:
                for name in os.listdir(source):
                    if name == TRAINER_STATE_NAME or (name.startswith("rng_state") and name.endswith(".pth")):
                        shutil.copy2(os.path.join(source, name), os.path.join(boundary, name))
            _clear_stop_flag(os.path.join(boundary, TRAINER_STATE_NAME))
            self.control.should_training_stop = False

            def train_continues(args: Any, state: TrainerState, control: TrainerControl) -> TrainerControl:
                # The callbacks saw on_train_begin at step 0; the phase change is not a new training run.
                control.should_training_stop = False
                return control

            handler.on_train_begin = train_continues  # type: ignore[method-assign]
            return super().train(resume_from_checkpoint=boundary, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            handler.__dict__.pop("on_train_begin", None)
            self._boundary_dir = None
            shutil.rmtree(boundary, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ planning
    def _plan(self) -> None:
        """Resolve the total number of steps T and the discretisation step S, and check them."""
        args, config = self.args, self.diffora_config
        weight_updates = self._updates_per_epoch(self.train_dataset)
        if args.max_steps > 0:
            total = int(args.max_steps)
        else:
            total = math.ceil(args.num_train_epochs * self._updates_per_epoch(self._full_train_dataset))
        given = self._search_steps_arg
        if given is None:
            steps = min(max(weight_updates, config.gate_warmup_steps + 20), total // 2)
        elif isinstance(given, float):
            steps = math.ceil(given * total)
        else:
            steps = int(given)
        if steps <= config.gate_warmup_steps:
            raise ConfigError(
                f"the search would end at step {steps}, not after gate_warmup_steps ({config.gate_warmup_steps}), so no "
                "gate step would run and the DAM would learn nothing; raise search_steps (or max_steps) or lower "
                "DiffoRAConfig.gate_warmup_steps"
            )
        if steps >= total:
            raise ConfigError(
                f"search_steps ({steps}) must be smaller than the total number of training steps ({total}), so that "
                "the exported LoRA model gets trained; raise max_steps/num_train_epochs or lower search_steps"
            )
        self._total_steps, self.search_steps = total, steps

    def _updates_per_epoch(self, dataset: Any) -> int:
        current = self.train_dataset
        self.train_dataset = dataset
        try:
            batches = len(self.get_train_dataloader())
        finally:
            self.train_dataset = current
        accumulation = self.args.gradient_accumulation_steps
        return max(batches // accumulation + int(batches % accumulation > 0), 1)

    def _check_plan(self, saved: dict, checkpoint: str) -> None:
        for key, mine in (("search_steps", self.search_steps), ("total_steps", self._total_steps),
                          ("gate_rows", self._gate_rows_total), ("weight_rows", self._weight_rows)):
            if saved.get(key) != mine:
                raise ConfigError(
                    f"checkpoint '{checkpoint}' was written by a run with {key}={saved.get(key)}, this trainer has "
                    f"{key}={mine}; resume with the same data, search_steps, max_steps and DiffoRAConfig"
                )

    def set_initial_training_values(self, args: Any, dataloader: Any):
        """Both phases count the same T steps (phase 1 runs over the weight split, phase 2 over all rows)."""
        values = list(super().set_initial_training_values(args, dataloader))
        if self._total_steps is not None:
            per_epoch = values[1]
            values[6] = self._total_steps
            values[0] = self._total_steps // per_epoch + int(self._total_steps % per_epoch > 0)
            values[3] = self._total_steps * values[4]
        return tuple(values)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None):
        if self.lr_scheduler is None and self._phase == "search":
            self.lr_scheduler = get_scheduler(
                "constant_with_warmup",
                optimizer=optimizer if optimizer is not None else self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(self.search_steps),
            )
            self._created_lr_scheduler = True
            return self.lr_scheduler
        if self._phase == "train" and self._total_steps is not None:
            num_training_steps = self._total_steps - self.search_steps
        return super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)

    # ------------------------------------------------------------------------------------------------- steps
    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None):
        if self._phase != "search":
            return super().training_step(model, inputs, num_items_in_batch)
        self._last_inputs = inputs
        beta = self.search.gates.beta
        beta.requires_grad_(False)  # weight steps leave the betas alone (and compute no gradient for them)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            beta.requires_grad_(True)
        self._step_weight_loss += float(loss.detach())
        return loss

    def _gate_loss(self, model: Any, batch: dict) -> torch.Tensor:
        return self.compute_loss(model, dict(batch))

    def _after_optimizer_step(self, state: TrainerState, control: TrainerControl) -> None:
        """Called by the internal callback after every optimiser step: gate step, snapshot, discretisation."""
        if self._phase != "search":
            return
        search, config, step = self.search, self.diffora_config, state.global_step
        search.record_weight_step(self._step_weight_loss)
        if search.weight_steps != step:
            raise SearchStateError(f"search step {search.weight_steps} is out of step with the Trainer's {step}")
        self._step_weight_loss = 0.0
        if step > config.gate_warmup_steps:
            gate_batch = self._gate_batch(search.gate_steps)
            weight_batch = self._last_inputs if config.order == "second" else None
            self._gate_losses_since_log.append(search.gate_step(gate_batch, weight_batch))
        self._last_inputs = None
        if step % SNAPSHOT_EVERY == 0 or step == self.search_steps:
            search.snapshot()
        if step >= self.search_steps:
            self._discretize(state)
            control.should_training_stop = True

    def _discretize(self, state: TrainerState) -> None:
        if self.search.gate_steps == 0:
            raise SearchStateError(
                f"the search reached step {state.global_step} without a single gate step; refusing to discretise an "
                "untrained DAM (that would be plain LoRA on an arbitrary subset)"
            )
        self.selection = self.search.discretize()
        self.record = self.search.record(
            self.selection,
            model=_model_name(self.search.model.get_base_model()),
            search_steps=self.search_steps,
            total_steps=self._total_steps,
            weight_split_rows=self._weight_rows,
            gate_split_rows=self._gate_rows_total,
            world_size=self.args.world_size,
            learning_rate=self.args.learning_rate,
            source="diffora.integrations.DiffoRATrainer",
        )

    def _enter_finetune(self) -> None:
        """Export the selection to a stock PeftModel and make it the model the Trainer trains."""
        exported = self.search.export(self.selection)
        self.model = exported
        self.model_wrapped = exported
        self.optimizer = None
        self.lr_scheduler = None
        self.train_dataset = self._full_train_dataset
        self._phase = "train"

    # ---------------------------------------------------------------------------------------------- gate data
    def _gate_rows(self, gate_step: int) -> list[int]:
        """Rows of the gate split for gate step ``gate_step`` on this process: a seeded stream of permutations of the
        gate split, cut into global batches of ``gate_batch_size * world_size``, each process taking its shard."""
        n = len(self._gate_dataset)
        per_process = self._gate_batch_size_arg or self.args.per_device_train_batch_size
        world, rank = max(1, self.args.world_size), self.args.process_index
        size = per_process * world
        position, rows = gate_step * size, []
        while len(rows) < size:
            epoch, offset = divmod(position + len(rows), n)
            perm = self._gate_perm(epoch)
            rows.extend(perm[offset : offset + size - len(rows)])
        return rows[rank * per_process : (rank + 1) * per_process]

    def _gate_perm(self, epoch: int) -> list[int]:
        if epoch not in self._gate_perms:
            if len(self._gate_perms) > 4:
                self._gate_perms.clear()
            generator = torch.Generator().manual_seed(self.diffora_config.seed * 1_000_003 + 7919 * (epoch + 1))
            self._gate_perms[epoch] = torch.randperm(len(self._gate_dataset), generator=generator).tolist()
        return self._gate_perms[epoch]

    def _gate_batch(self, gate_step: int) -> dict:
        if self._gate_collate is None:
            if _is_hf_dataset(self._gate_dataset):
                self._gate_dataset = self._remove_unused_columns(self._gate_dataset, description="gate")
                self._gate_collate = self.data_collator
            else:
                self._gate_collate = self._get_collator_with_removed_columns(self.data_collator, description="gate")
        items = [self._gate_dataset[i] for i in self._gate_rows(gate_step)]
        return self._prepare_inputs(self._gate_collate(items))

    # ---------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            self._write_search_state(folder)
        super()._save_checkpoint(model, trial)

    def _write_search_state(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        info: dict[str, Any] = {
            "format": STATE_FORMAT,
            "phase": self._phase,
            "global_step": self.state.global_step,
            "search_steps": self.search_steps,
            "total_steps": self._total_steps,
            "weight_rows": self._weight_rows,
            "gate_rows": self._gate_rows_total,
            "selection": self.selection.to_dict() if self.selection is not None else None,
            "record": self.record,
        }
        if self._phase == "search":
            tensors: dict[str, torch.Tensor] = {}
            info["state"] = _pack(self.search.state_dict(), tensors)
            save_file(tensors, os.path.join(folder, STATE_TENSORS))
        _write_json(os.path.join(folder, STATE_JSON), info)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if self._boundary_dir is not None and os.path.abspath(resume_from_checkpoint) == os.path.abspath(
            self._boundary_dir
        ):
            return  # entering the fine-tuning phase: the exported model already holds the weights
        saved = _read_state(resume_from_checkpoint)
        if saved is None:
            raise SearchStateError(
                f"checkpoint '{resume_from_checkpoint}' holds no DiffoRA search state ({STATE_JSON}); it was not "
                "written by DiffoRATrainer"
            )
        if saved["phase"] == "search":
            if self._phase != "search":
                raise SearchStateError(f"'{resume_from_checkpoint}' is a search-phase checkpoint, but the search is over")
            from safetensors.torch import load_file

            tensors = load_file(os.path.join(resume_from_checkpoint, STATE_TENSORS))
            self.search.load_state_dict(_unpack(saved["state"], tensors))
            if saved.get("selection") is not None:
                self._restore_selection(saved)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _restore_selection(self, saved: dict) -> None:
        self.selection = Selection.from_dict(saved["selection"])
        self.record = saved.get("record")
        if self.record is not None and self.search.gate_steps == 0:
            with torch.no_grad():
                beta = torch.tensor(self.record["betas"], dtype=self.search.gates.beta.dtype)
                self.search.gates.beta.copy_(beta)
            self.search.gate_steps = int(self.record.get("gate_steps", 0))
            self.search.weight_steps = int(self.record.get("weight_steps", 0))

    def _finalize_training(self, trial: Any, num_train_samples: Any, start_time: Any):
        if self._phase == "search":
            # End of the search phase, not of training: no on_train_end, no best-model reload, no final log.
            self._total_loss_scalar += self._tr_loss.item()
            return None
        return super()._finalize_training(trial, num_train_samples, start_time)

    def _determine_best_metric(self, metrics: dict, trial: Any) -> bool:
        if self._phase == "search":
            return False  # the relaxed model's checkpoints cannot be loaded into the exported one
        return super()._determine_best_metric(metrics, trial)

    # -------------------------------------------------------------------------------------------- saving/log
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the exported PEFT adapter (stock ``adapter_config.json`` + ``adapter_model.safetensors``) plus the
        search record ``dam.json`` and heatmap ``dam.png``."""
        if self._phase == "search" and not _internal_call:
            raise SearchStateError(
                "the DAM search has not finished (no module selection yet); save_model would write LoRA on every "
                "candidate without its gates. Run train() past search_steps first"
            )
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.record is not None and self.args.should_save:
            from ..record import plot_dam

            out = Path(output_dir if output_dir is not None else self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            _write_json(str(out / "dam.json"), self.record)
            plot_dam(self.record, out / "dam.png", title=f"DiffoRATrainer / {self.search.model_class}")

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._phase == "search" and self._gate_losses_since_log and "loss" in logs:
            logs = dict(logs)
            logs["gate_loss"] = round(sum(self._gate_losses_since_log) / len(self._gate_losses_since_log), 4)
            gates = self.search.gates.values().detach()[self.search.gates.valid]
            logs["gate_min"], logs["gate_max"] = round(float(gates.min()), 4), round(float(gates.max()), 4)
            self._gate_losses_since_log.clear()
        super().log(logs, *args, **kwargs)

    @property
    def phase(self) -> str:
        """``"search"`` until the DAM is discretised and exported, ``"train"`` after."""
        return self._phase


class _DiffoRACallback(TrainerCallback):
    """Runs the gate step after each optimiser step (before the Trainer logs, evaluates or saves)."""

    def __init__(self, trainer: DiffoRATrainer) -> None:
        self._trainer = trainer

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        self._trainer._after_optimizer_step(state, control)
        return control


# --------------------------------------------------------------------------------------------------- helpers
def _check_search_steps(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"search_steps must be an int, a float in (0, 1) or None, got {value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ConfigError(f"a float search_steps is a fraction of all steps and must be in (0, 1), got {value}")
    if isinstance(value, int) and value <= 0:
        raise ConfigError(f"search_steps must be positive, got {value}")


def _model_name(model: Any) -> Optional[str]:
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else None


def _is_hf_dataset(data: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - transformers pulls it in for most users
        return False
    return isinstance(data, datasets.Dataset)


def _select(data: Any, indices: list[int]) -> Any:
    if _is_hf_dataset(data):
        return data.select(indices)
    return torch.utils.data.Subset(data, indices)


def _read_state(folder: str) -> Optional[dict]:
    path = os.path.join(folder, STATE_JSON)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise SearchStateError(f"{path} is not a DiffoRATrainer search state (expected format '{STATE_FORMAT}')")
    return saved


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


def _clear_stop_flag(state_file: str) -> None:
    with open(state_file, encoding="utf-8") as handle:
        state = json.load(handle)
    control = state.get("stateful_callbacks", {}).get("TrainerControl")
    for entry in control if isinstance(control, list) else [control]:
        if isinstance(entry, dict) and "args" in entry:
            entry["args"]["should_training_stop"] = False
            entry["args"]["should_epoch_stop"] = False
    _write_json(state_file, state)


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (for safetensors) and referenced by key;
    dict keys keep their type (optimiser states are keyed by int)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__items__": [[k, _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the search state")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj
