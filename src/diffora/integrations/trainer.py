r"""DiffoRA with any ``transformers.Trainer`` (plain ``Trainer``, TRL's ``SFTTrainer``, your subclass), in two phases,
through public Trainer API only.

:func:`train_with_diffora` runs::

    phase "search"   make_trainer(search.model, phase) -> host trainer 1, max_steps = S, + DiffoRACallback
                     host trainer 1 trains LoRA on every DAM candidate (gated) on the weight split; after each of
                     its optimiser steps past the warm-up the callback takes one gate step on a gate-split batch
    at S             discretise the DAM -> export a stock PEFT LoRA model on the kept modules (weight sharing:
                     the search's A, g*B and trained head carry over)
    phase "train"    make_trainer(exported_model, phase) -> host trainer 2 trains it on the whole training set
                     for the rest (max_steps = T - S, or the factory's num_train_epochs)

``make_trainer(model, phase)`` is your code: it builds the trainer you would build anyway, on the model it is given,
with ``max_steps=phase.max_steps``, ``train_dataset=phase.train_dataset`` and ``eval_dataset=phase.eval_dataset``
(in the search phase, the gate split is one of those eval sets, so the host preprocesses it). :class:`DiffoRATrainer`
is the same with the factory written for you (``trainer_cls(model=..., args=..., ...)``).

Guarantees:

* it never degrades to plain LoRA: ``S`` must exceed ``gate_warmup_steps`` (checked before anything trains); a search
  phase that stops before ``S`` raises :class:`~diffora.errors.SearchStateError` instead of exporting;
* gate gradients are averaged over processes under DDP (``DAMSearch.gate_step`` all-reduces them), and each process
  draws its own shard of the gate split, through the host's eval loader;
* every checkpoint of either phase holds DiffoRA's state (``diffora_search.json`` + ``diffora_search.safetensors``:
  betas, gate optimiser, counters, history, the search's weights; in the fine-tuning phase also the selection and
  the record); ``resume_from_checkpoint`` restores them: a resumed run reproduces the uninterrupted one;
* :meth:`DiffoRARun.save` / :meth:`DiffoRATrainer.save_model` write a stock PEFT adapter (the host's ``save_model``)
  plus the search record ``dam.json`` and heatmap ``dam.png``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from ..data.splits import split_for_search
from ..errors import ConfigError, DataError, ModelError, SearchStateError
from ..method.config import DiffoRAConfig
from ..method.export import export_search
from ..method.parallel import world_size
from ..method.schedule import check_warmup, gate_warmup, min_search_length, search_length
from ..method.search import DAMSearch, LossFn, prepare_search
from ..select.quota import Selection
from ..store.io import atomic_write_json
from ..store.record import search_record
from .auto_config import has_adapters
from .callback import (
    GATE_SPLIT,
    STATE_JSON,
    STATE_TENSORS,
    DiffoRACallback,
    check_same_plan,
    checkpoint_folder,
    finish_search,
    read_search_state,
    write_search_state,
)

__all__ = [
    "DiffoRAPhase",
    "DiffoRARun",
    "DiffoRATrainer",
    "GATE_SPLIT",
    "SEARCH_DIR",
    "STATE_JSON",
    "STATE_TENSORS",
    "TRAIN_DIR",
    "train_with_diffora",
]

#: the sub-folders of an output root for the two phases' checkpoints (:meth:`DiffoRAPhase.output_dir`)
SEARCH_DIR, TRAIN_DIR = "diffora-search", "diffora-train"
_PHASE_DIRS = {"search": SEARCH_DIR, "train": TRAIN_DIR}
#: the key of a single (non-dict) user eval set among the search phase's eval datasets
EVAL_KEY = "eval"

Factory = Callable[[Any, "DiffoRAPhase"], Any]


@dataclass(frozen=True)
class DiffoRAPhase:
    """What ``make_trainer(model, phase)`` needs to build the trainer of one phase.

    Attributes:
        name: ``"search"`` or ``"train"``.
        max_steps: optimiser steps the trainer must run: ``S`` in the search phase; ``T - S`` in the fine-tuning
            phase, or ``-1`` when no total ``max_steps`` was given (the trainer's ``num_train_epochs`` then applies).
        train_dataset: the weight split (search) or the whole training set (train), unprocessed: the trainer
            preprocesses it as usual.
        eval_dataset: search phase: a dict with the gate split under ``GATE_SPLIT`` plus your eval set(s) (a single
            eval set is under ``"eval"``; DiffoRA takes the gate split out again, and restores a single eval set,
            right after the trainer is built, so neither is renamed in the metrics); train phase: your eval set(s).
        search: the :class:`~diffora.method.search.DAMSearch` (betas, gate optimiser, history).
    """

    name: str
    max_steps: int
    train_dataset: Any
    eval_dataset: Any
    search: DAMSearch

    def output_dir(self, root: Union[str, os.PathLike]) -> str:
        """``root/diffora-search`` or ``root/diffora-train``: a separate checkpoint folder per phase (their step
        counters both start at 0, so sharing one folder would mix their checkpoints)."""
        return os.path.join(str(root), _PHASE_DIRS[self.name])


@dataclass
class DiffoRARun:
    """What :func:`train_with_diffora` returns.

    Attributes:
        model: the exported, fine-tuned stock ``peft.PeftModel`` (LoRA on the kept modules only).
        search: the search (consumed by the export; its betas, counters and history remain readable).
        selection: the kept DAM entries; ``record``: the search record (``dam.json``).
        trainer: the fine-tuning phase's trainer; ``train_output``: its ``train()`` result.
        search_trainer / search_callback: the search phase's trainer and callback (``None`` when resumed past it).
    """

    model: Any
    search: DAMSearch
    selection: Selection
    record: dict
    trainer: Any
    train_output: Any
    search_trainer: Any = None
    search_callback: Optional[DiffoRACallback] = None

    def save(self, output_dir: Union[str, os.PathLike, None] = None) -> Path:
        """``trainer.save_model(output_dir)`` (a stock PEFT adapter: ``adapter_config.json`` +
        ``adapter_model.safetensors``) plus ``dam.json`` and ``dam.png``; default folder ``trainer.args.output_dir``.
        Call it on every process (the host saves on the main one)."""
        from ..store.record import plot_dam

        out = Path(output_dir if output_dir is not None else self.trainer.args.output_dir)
        self.trainer.save_model(str(out))
        if self.trainer.args.should_save:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "dam.json", self.record, indent=1)
            plot_dam(self.record, out / "dam.png", title=f"DiffoRA / {self.search.model_class}")
        return out


def train_with_diffora(
    make_trainer: Factory,
    model: Any,
    train_dataset: Any,
    *,
    search_steps: int,
    diffora_config: Optional[DiffoRAConfig] = None,
    max_steps: Optional[int] = None,
    eval_dataset: Any = None,
    gate_dataset: Any = None,
    resume_from_checkpoint: Union[str, os.PathLike, None] = None,
    evaluate_gate_split: bool = False,
    loss_fn: Optional[LossFn] = None,
) -> DiffoRARun:
    """Search which modules get LoRA inside your trainer, export a stock PEFT model, then fine-tune it.

    Args:
        make_trainer: ``make_trainer(model, phase) -> Trainer``; builds the trainer of one phase (see
            :class:`DiffoRAPhase`) on ``model`` with ``max_steps=phase.max_steps``,
            ``train_dataset=phase.train_dataset`` and ``eval_dataset=phase.eval_dataset``. Use a different
            ``output_dir`` per phase (e.g. ``phase.output_dir("out")``).
        model: the base model, without adapters (PEFT injects the search's LoRA layers in place).
        train_dataset: the raw training data (as your trainer takes it).
        search_steps: ``S``, optimiser steps of the search; must exceed ``gate_warmup_steps``.
        diffora_config: search options (rank, alpha, keep ratio, gate form, gate lr, warm-up, seed…).
        max_steps: ``T``, optimiser steps of both phases together (fine-tuning runs ``T - S``); ``None``: the
            fine-tuning trainer's own ``num_train_epochs`` decides (``phase.max_steps`` is then ``-1``).
        eval_dataset: your eval set(s), passed to both phases.
        gate_dataset: the gate split; default a seeded ``gate_fraction`` of ``train_dataset`` (the search phase then
            trains on the rest, the fine-tuning phase on all of it).
        resume_from_checkpoint: a checkpoint folder of either phase (``checkpoint-N`` with ``diffora_search.json``).
        evaluate_gate_split: also evaluate the gate split as a metric set during the search (off by default).
        loss_fn: the gate loss ``loss_fn(model, batch)``; default the model's own loss on the host-collated batch.

    Raises:
        ConfigError: ``search_steps <= gate_warmup_steps``, ``max_steps <= search_steps``, or a trainer that does
            not train the given model for ``phase.max_steps`` steps.
        SearchStateError: the search phase stopped before ``S``; a checkpoint without DiffoRA state.
    """
    config = diffora_config or DiffoRAConfig()
    if has_adapters(model):
        raise ModelError("train_with_diffora needs the base model without adapters; it adds the LoRA layers itself")
    if isinstance(search_steps, bool) or not isinstance(search_steps, int):
        raise ConfigError(f"search_steps must be a whole number of optimiser steps, got {search_steps!r}")
    check_warmup(
        search_steps,
        gate_warmup(search_steps, config),
        hint="raise search_steps (or max_steps) or lower DiffoRAConfig.gate_warmup_steps",
    )
    if max_steps is not None and max_steps <= search_steps:
        raise ConfigError(
            f"search_steps ({search_steps}) must be smaller than the total number of training steps ({max_steps}), so "
            "that the exported LoRA model gets trained; raise max_steps/num_train_epochs or lower search_steps"
        )
    if resume_from_checkpoint is True:
        raise ConfigError(
            "pass the checkpoint folder itself (DiffoRATrainer.train(resume_from_checkpoint=True) finds "
            "the last one of its two phase folders)"
        )
    checkpoint = str(resume_from_checkpoint) if resume_from_checkpoint not in (None, False) else None
    saved, saved_state = read_search_state(checkpoint) if checkpoint is not None else (None, None)

    weight_data, gate_data, plan = _splits(train_dataset, gate_dataset, config)
    plan.update(search_steps=search_steps, max_steps=max_steps)
    if saved is not None:
        check_same_plan(saved, plan, checkpoint)

    search = prepare_search(model, config, loss_fn=loss_fn)
    search_trainer, callback = None, None
    if saved is None or (saved["phase"] == "search" and saved["global_step"] < search_steps):
        phase = DiffoRAPhase("search", search_steps, weight_data, _with_gate(eval_dataset, gate_data), search)
        search_trainer = make_trainer(search.model, phase)
        _check_trainer(search_trainer, search.model, phase)
        callback = DiffoRACallback(
            search,
            search_trainer,
            search_steps=search_steps,
            evaluate_gate_split=evaluate_gate_split,
            checkpoint_info=plan,
        )
        if not evaluate_gate_split and eval_dataset is not None and not isinstance(eval_dataset, dict):
            search_trainer.eval_dataset = search_trainer.eval_dataset[EVAL_KEY]  # a single set stays a single set
        search_trainer.add_callback(callback)
        if saved is not None:
            callback.load_checkpoint(checkpoint)
            search_trainer.train(resume_from_checkpoint=checkpoint)
        else:
            search_trainer.train()
        selection = callback.finish()
    else:  # the checkpoint was taken when the search had ended, or during fine-tuning
        if saved_state is None:
            raise SearchStateError(f"checkpoint '{checkpoint}' holds no search tensors ({STATE_TENSORS})")
        search.load_state_dict(saved_state)
        if saved["phase"] == "train":
            selection = Selection.from_dict(saved["selection"])
        else:
            selection = finish_search(search)

    if saved is not None and saved["phase"] == "train":
        record = saved["record"]
    else:
        record = search_record(
            search,
            selection,
            model=_model_name(search.model.get_base_model()),
            search_steps=search_steps,
            max_steps=max_steps,
            weight_split_rows=plan["weight_rows"],
            gate_split_rows=plan["gate_rows"],
            world_size=world_size(),
            host_trainer=type(search_trainer).__name__ if search_trainer is not None else None,
            source="diffora.integrations.train_with_diffora",
        )
    final_state = search.state_dict()  # the search as it ended: every fine-tuning checkpoint carries it
    exported = export_search(search, selection)

    phase = DiffoRAPhase(
        "train", max_steps - search_steps if max_steps is not None else -1, train_dataset, eval_dataset, search
    )
    trainer = make_trainer(exported, phase)
    _check_trainer(trainer, exported, phase)
    if search_trainer is not None and _same_checkpoint_folder(search_trainer.args, trainer.args):
        raise ConfigError(
            f"both phases write checkpoints into '{trainer.args.output_dir}'; their step counters both start at 0, so "
            "their checkpoints would overwrite each other: give each phase its own output_dir (phase.output_dir(root)) "
            f"and resume from '{search_trainer.args.output_dir}/checkpoint-{search_steps}'"
        )
    info = {**plan, "phase": "train", "selection": selection.to_dict(), "record": record}
    trainer.add_callback(_FineTuneCheckpoints(info, final_state))
    resume = checkpoint if saved is not None and saved["phase"] == "train" else None
    output = trainer.train(resume_from_checkpoint=resume) if resume is not None else trainer.train()
    return DiffoRARun(
        model=exported,
        search=search,
        selection=selection,
        record=record,
        trainer=trainer,
        train_output=output,
        search_trainer=search_trainer,
        search_callback=callback,
    )


class DiffoRATrainer:
    """A ``Trainer``-like front end of :func:`train_with_diffora`: pass what you would pass to ``Trainer(...)``.

    ``train()`` builds two ``trainer_cls`` instances (default ``transformers.Trainer``; TRL's ``SFTTrainer`` or your
    subclass work too) with copies of ``args``:

    * search phase: ``max_steps = search_steps``, ``output_dir = args.output_dir/diffora-search``,
      ``lr_scheduler_type = "constant_with_warmup"`` (the search trains at a constant rate after your warm-up),
      ``load_best_model_at_end = False``; trains the gated model on the weight split;
    * fine-tuning phase: ``max_steps = args.max_steps - search_steps`` (or ``num_train_epochs`` when
      ``args.max_steps <= 0``), ``output_dir = args.output_dir/diffora-train``, everything else as you set it;
      trains the exported PEFT model on the whole ``train_dataset``.

    Args:
        model: the base model, without adapters (PEFT injects the search's LoRA layers in place).
        args: ``TrainingArguments`` (or a subclass such as ``SFTConfig``) for the whole run.
        data_collator, train_dataset, eval_dataset, callbacks, **trainer_kwargs: as for ``trainer_cls``; the
            callbacks are added to both phases' trainers. ``model_init`` and a pre-built ``optimizers`` pair are
            refused (each phase builds its own optimiser).
        diffora_config: search options.
        search_steps: an ``int`` number of optimiser steps; a ``float`` in (0, 1): a fraction of ``args.max_steps``
            (or of ``num_train_epochs`` over the training set); ``None``: one pass over the weight split, at least
            ``gate_warmup_steps + 20`` steps and at most half of all steps.
        gate_dataset: the gate split (default a seeded ``gate_fraction`` of ``train_dataset``).
        trainer_cls: the trainer class of both phases.
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
        gate_dataset: Any = None,
        trainer_cls: Optional[type] = None,
        callbacks: Optional[list] = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None or trainer_kwargs.get("model_init") is not None:
            raise ConfigError("DiffoRATrainer needs the model itself (model_init is not supported)")
        optimizers = trainer_kwargs.get("optimizers", (None, None))
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ConfigError(
                "DiffoRATrainer creates a new optimiser when the search ends (the trainable parameters change), so "
                "it cannot take a pre-built optimizers=(...) pair; use optimizer_cls_and_kwargs or args.optim"
            )
        if has_adapters(model):
            raise ModelError("DiffoRATrainer needs the base model without adapters; it adds the LoRA layers itself")
        if args is None:
            raise ConfigError("DiffoRATrainer needs TrainingArguments (args=...)")
        if train_dataset is None:
            raise ConfigError("DiffoRATrainer needs a train_dataset (the gate split is held out from it)")
        _check_search_steps(search_steps)
        self.args = args
        self.diffora_config = diffora_config or DiffoRAConfig()
        self.base_model = model
        self.data_collator = data_collator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.gate_dataset = gate_dataset
        self.trainer_cls = trainer_cls or Trainer
        self.callbacks = list(callbacks or [])
        self.trainer_kwargs = trainer_kwargs
        self.search_steps_arg = search_steps
        self.search_steps: Optional[int] = None
        self.search: Optional[DAMSearch] = None
        self.search_trainer: Any = None
        self.trainer: Any = None
        self.run: Optional[DiffoRARun] = None

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None) -> Any:
        """Search, discretise, export, fine-tune; returns the fine-tuning trainer's ``TrainOutput``.

        ``resume_from_checkpoint``: a checkpoint folder of either phase, or ``True`` for the latest one (fine-tuning
        phase first, then search phase).
        """
        if self.run is not None or self.search is not None:
            raise SearchStateError(
                "this DiffoRATrainer has already run (its model now carries LoRA layers); create a new one with a "
                "fresh base model to train again, or resume one from a checkpoint"
            )
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self.last_checkpoint()
        total = int(self.args.max_steps) if self.args.max_steps > 0 else None
        self.search_steps = self.resolve_search_steps(total)
        self.run = train_with_diffora(
            self.make_phase_trainer,
            self.base_model,
            self.train_dataset,
            search_steps=self.search_steps,
            diffora_config=self.diffora_config,
            max_steps=total,
            eval_dataset=self.eval_dataset,
            gate_dataset=self.gate_dataset,
            resume_from_checkpoint=resume_from_checkpoint or None,
        )
        return self.run.train_output

    def save_model(self, output_dir: Union[str, os.PathLike, None] = None) -> Path:
        """Write the exported PEFT adapter (stock ``adapter_config.json`` + ``adapter_model.safetensors``) plus
        ``dam.json`` and ``dam.png`` (default folder ``args.output_dir``)."""
        if self.run is None:
            raise SearchStateError(
                "the DAM search has not finished (no module selection yet); there is no exported LoRA model to save. "
                "Run train() past search_steps first"
            )
        return self.run.save(output_dir if output_dir is not None else self.args.output_dir)

    # ---------------------------------------------------------------------------------------------- views
    @property
    def phase(self) -> str:
        """``"search"`` until the DAM is discretised and the exported model trained, ``"train"`` after."""
        return "train" if self.run is not None else "search"

    @property
    def model(self) -> Any:
        """The exported PEFT model after ``train()``; before, the model given (the search model while searching)."""
        if self.run is not None:
            return self.run.model
        return self.search.model if self.search is not None and not self.search.exported else self.base_model

    @property
    def selection(self) -> Optional[Selection]:
        return self.run.selection if self.run is not None else None

    @property
    def record(self) -> Optional[dict]:
        return self.run.record if self.run is not None else None

    @property
    def state(self) -> Any:
        """The ``TrainerState`` of the current (or last) phase's trainer."""
        current = self.trainer if self.trainer is not None else self.search_trainer
        return current.state if current is not None else None

    # ---------------------------------------------------------------------------------------------- phases
    def make_phase_trainer(self, model: Any, phase: DiffoRAPhase) -> Any:
        """The factory :func:`train_with_diffora` calls: ``trainer_cls`` on a copy of ``args`` for ``phase``."""
        self.search = phase.search
        changes: dict[str, Any] = {"max_steps": phase.max_steps, "output_dir": phase.output_dir(self.args.output_dir)}
        if phase.name == "search":
            changes.update(
                lr_scheduler_type="constant_with_warmup", lr_scheduler_kwargs={}, load_best_model_at_end=False
            )
        trainer = self.trainer_cls(
            model=model,
            args=dataclasses.replace(self.args, **changes),
            data_collator=self.data_collator,
            train_dataset=phase.train_dataset,
            eval_dataset=phase.eval_dataset,
            callbacks=list(self.callbacks),
            **self.trainer_kwargs,
        )
        if phase.name == "search":
            self.search_trainer = trainer
        else:
            self.trainer = trainer
        return trainer

    def last_checkpoint(self) -> str:
        """The latest checkpoint of the fine-tuning phase, else of the search phase (``ValueError`` if none)."""
        for sub in (TRAIN_DIR, SEARCH_DIR):
            folder = os.path.join(self.args.output_dir, sub)
            last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
            if last is not None:
                return last
        raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")

    def resolve_search_steps(self, total: Optional[int]) -> int:
        """``search_steps`` as a number of optimiser steps (``total``: ``args.max_steps``, or ``None`` for epochs)."""
        given, config = self.search_steps_arg, self.diffora_config
        if isinstance(given, int):
            return given
        rows = _length(self.train_dataset, "DiffoRATrainer's train_dataset")
        if total is None:
            total = math.ceil(self.args.num_train_epochs * _updates_per_epoch(self.args, rows))
        if isinstance(given, float):
            return math.ceil(given * total)
        weight_rows = rows - max(1, int(round(config.gate_fraction * rows))) if self.gate_dataset is None else rows
        return search_length(
            _updates_per_epoch(self.args, weight_rows), minimum=min_search_length(20, config), cap=total // 2
        )


class _FineTuneCheckpoints(TrainerCallback):
    """Writes the selection, the record and the finished search's state into every fine-tuning checkpoint."""

    def __init__(self, info: dict, search_state: dict) -> None:
        self.info, self.search_state = info, search_state

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if args.should_save:
            write_search_state(
                checkpoint_folder(args, state), {**self.info, "global_step": state.global_step}, self.search_state
            )
        return control


# --------------------------------------------------------------------------------------------------- helpers
def _updates_per_epoch(args: Any, rows: int) -> int:
    batches = math.ceil(rows / (args.per_device_train_batch_size * max(1, args.world_size)))
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def _check_search_steps(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"search_steps must be an int, a float in (0, 1) or None, got {value!r}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ConfigError(f"a float search_steps is a fraction of all steps and must be in (0, 1), got {value}")
    if isinstance(value, int) and value <= 0:
        raise ConfigError(f"search_steps must be positive, got {value}")


def _check_trainer(trainer: Any, model: Any, phase: DiffoRAPhase) -> None:
    if trainer.model is not model:
        raise ConfigError(
            f"make_trainer must build the {phase.name}-phase trainer on the model it is given (model=model): its "
            f"trainer.model is a {type(trainer.model).__name__}, not that {type(model).__name__}"
        )
    if phase.max_steps > 0 and trainer.args.max_steps != phase.max_steps:
        raise ConfigError(
            f"make_trainer must set max_steps=phase.max_steps ({phase.max_steps}) for the {phase.name} phase; its "
            f"trainer has max_steps={trainer.args.max_steps}"
        )


def _splits(train_dataset: Any, gate_dataset: Any, config: DiffoRAConfig) -> tuple[Any, Any, dict]:
    """(weight data, gate data, plan): the seeded split of ``train_dataset``, or all of it and ``gate_dataset``."""
    if gate_dataset is not None:
        return (
            train_dataset,
            gate_dataset,
            {"weight_rows": _length(train_dataset, None), "gate_rows": _length(gate_dataset, None)},
        )
    n = _length(train_dataset, "train_dataset")
    weight_rows, gate_rows = split_for_search(n, config.gate_fraction, config.seed)
    order = torch.randperm(len(gate_rows), generator=torch.Generator().manual_seed(config.seed + 29)).tolist()
    gate_rows_shuffled = [gate_rows[i] for i in order]  # the host's gate loader is sequential: shuffle the rows once
    return (
        _select(train_dataset, weight_rows),
        _select(train_dataset, gate_rows_shuffled),
        {"weight_rows": len(weight_rows), "gate_rows": len(gate_rows)},
    )


def _with_gate(eval_dataset: Any, gate_dataset: Any) -> dict:
    if eval_dataset is None:
        return {GATE_SPLIT: gate_dataset}
    if isinstance(eval_dataset, dict):
        if GATE_SPLIT in eval_dataset:
            raise ConfigError(f"'{GATE_SPLIT}' is DiffoRA's gate split; name your eval set differently")
        return {GATE_SPLIT: gate_dataset, **eval_dataset}
    return {GATE_SPLIT: gate_dataset, EVAL_KEY: eval_dataset}


def _length(data: Any, what: Optional[str]) -> Optional[int]:
    try:
        return len(data)
    except TypeError:
        if what is None:
            return None
        raise DataError(
            f"{what} needs a length (map-style Dataset, list or datasets.Dataset): the gate split is a seeded slice "
            "of it; pass gate_dataset=... to use an iterable training set"
        ) from None


def _select(data: Any, indices: list[int]) -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - transformers pulls it in for most users
        datasets = None
    if datasets is not None and isinstance(data, datasets.Dataset):
        return data.select(indices)
    return torch.utils.data.Subset(data, indices)


def _same_checkpoint_folder(a: Any, b: Any) -> bool:
    saving = a.save_strategy != "no" and b.save_strategy != "no"
    return saving and os.path.abspath(a.output_dir) == os.path.abspath(b.output_dir)


def _model_name(model: Any) -> Optional[str]:
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else None
