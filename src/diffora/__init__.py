"""diffora: learn which transformer modules get LoRA (DiffoRA's Differential Adaptation Matrix), then export a
plain PEFT LoRA adapter.

Pipeline (one module each)::

    candidates  ->  gates  ->  search (+ second_order)  ->  discretize  ->  export  ->  train  ->  evaluation
    DAM grid        relaxed    bi-level optimisation       keep top rho    PEFT LoRA

The CLI is ``options`` (every flag) -> ``loading`` (data, model) -> ``pipeline`` (the four commands) ->
``outputs`` (the output folder); see README's "How the code is laid out".
"""

__version__ = "0.1.0"

from .candidates import DAMGrid, detect_task_heads, find_candidates
from .config import DiffoRAConfig
from .discretize import Selection, select_modules
from .errors import ConfigError, DataError, DiffoRAError, ModelError, SearchStateError, TrainingError
from .export import infer_task_type, lora_config_for
from .gates import DAMGates
from .record import load_record, plot_dam
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
    "detect_task_heads",
    "find_candidates",
    "infer_task_type",
    "load_record",
    "lora_config_for",
    "plot_dam",
    "prepare_search",
    "select_modules",
]
