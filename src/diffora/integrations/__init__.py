"""Hugging Face integrations: DiffoRA inside the workflows PEFT users already have.

* :func:`auto_lora_config` — one call from ``(model, train_dataset)`` to a ``peft.LoraConfig`` whose
  ``target_modules`` DiffoRA selected (the caller's model is left untouched);
* :class:`DiffoRATrainer` — a ``transformers.Trainer`` whose ``train()`` runs the DAM search, discretises it and then
  trains the exported LoRA model, with DDP and checkpoint/resume support.

See ``docs/huggingface.md``.
"""

from .auto_config import AutoLoraResult, auto_lora_config
from .trainer import DiffoRATrainer

__all__ = ["AutoLoraResult", "DiffoRATrainer", "auto_lora_config"]
