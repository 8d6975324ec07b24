"""diffora: learn which transformer modules get LoRA (DiffoRA's Differential Adaptation Matrix), then export a
plain PEFT LoRA adapter.

Pipeline (one module each)::

    candidates  ->  gates  ->  search (+ second_order)  ->  discretize  ->  export  ->  train  ->  evaluation
    DAM grid        relaxed    bi-level optimisation       keep top rho    PEFT LoRA
"""

__version__ = "0.1.0"

from .candidates import DAMGrid, detect_task_heads, find_candidates
from .config import DiffoRAConfig
from .discretize import Selection, select_modules
from .errors import ConfigError, DataError, DiffoRAError, ModelError, SearchStateError, TrainingError
from .export import export_peft_model, infer_task_type, lora_config_for
from .gates import DAMGates
from .record import build_record, load_record, plot_dam
from .search import DAMSearch, prepare_search

__all__ = [
    "ConfigError",
    "DAMGates",
    "DAMGrid",
    "DAMSearch",
    "DataError",
    "DiffoRAConfig",
    "DiffoRAError",
    "ModelError",
    "SearchStateError",
    "Selection",
    "TrainingError",
    "build_record",
    "detect_task_heads",
    "export_peft_model",
    "find_candidates",
    "infer_task_type",
    "load_record",
    "lora_config_for",
    "plot_dam",
    "prepare_search",
    "select_modules",
]
