"""diffora: learn which transformer modules get LoRA (DiffoRA's Differential Adaptation Matrix), then export a
plain PEFT LoRA adapter.

Pipeline::

    method.candidates -> method.gates -> method.search -> select (quota + strategy) -> method.export -> train
    DAM grid             relaxed         bi-level           keep top rho                 PEFT LoRA

    -> evaluation; store (files), data (examples, models); cli, compare and integrations sit on top.

See README's "How the code is laid out".
"""

__version__ = "0.1.0"

# The public names load their submodule on first use (PEP 562), so ``import diffora.cli`` imports neither torch's
# heavy dependants nor peft (and through it bitsandbytes) before the CLI has set up its logging.
from .lazy import lazy_exports

_EXPORTS = {
    "DAMGrid": "method.candidates",
    "detect_task_heads": "method.candidates",
    "find_candidates": "method.candidates",
    "DiffoRAConfig": "method.config",
    "Selection": "select.quota",
    "select_modules": "select.quota",
    "choose_modules": "select.choose",
    "ConfigError": "errors",
    "DataError": "errors",
    "DiffoRAError": "errors",
    "ModelError": "errors",
    "SearchStateError": "errors",
    "TrainingError": "errors",
    "infer_task_type": "method.export",
    "lora_config_for": "method.export",
    "export_search": "method.export",
    "DAMGates": "method.gates",
    "load_record": "store.record",
    "plot_dam": "store.record",
    "search_record": "store.record",
    "DAMSearch": "method.search",
    "prepare_search": "method.search",
    "narrow_lora": "integrations.narrow",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


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
    "choose_modules",
    "detect_task_heads",
    "export_search",
    "find_candidates",
    "infer_task_type",
    "load_record",
    "lora_config_for",
    "narrow_lora",
    "plot_dam",
    "prepare_search",
    "search_record",
    "select_modules",
]
