"""Hugging Face integrations: DiffoRA inside the workflows PEFT users already have.

* :func:`narrow_lora` — search on the user's own PeftModel in place and narrow it to the kept modules;
* :func:`auto_lora_config` — one call from ``(model, train_dataset)`` to a ``peft.LoraConfig`` whose
  ``target_modules`` DiffoRA selected (the caller's model is left untouched);
* :class:`DiffoRACallback` — the DAM search's gate steps and checkpointing inside any ``transformers.Trainer``
  (plain ``Trainer``, TRL's ``SFTTrainer``, subclasses), through the public ``TrainerCallback`` API;
* :func:`train_with_diffora` — the two phases (search with the callback, then fine-tuning of the exported stock PEFT
  model) with trainers built by your own ``make_trainer(model, phase)``;
* :class:`DiffoRATrainer` — the same behind a ``Trainer``-like constructor (``trainer_cls=`` picks the trainer class).

See ``docs/huggingface.md``.
"""

from .auto_config import AutoLoraResult, auto_lora_config, has_adapters
from .callback import GATE_SPLIT, DiffoRACallback
from .narrow import narrow_lora
from .trainer import DiffoRAPhase, DiffoRARun, DiffoRATrainer, train_with_diffora

__all__ = [
    "GATE_SPLIT",
    "AutoLoraResult",
    "DiffoRACallback",
    "DiffoRAPhase",
    "DiffoRARun",
    "DiffoRATrainer",
    "auto_lora_config",
    "has_adapters",
    "narrow_lora",
    "train_with_diffora",
]
