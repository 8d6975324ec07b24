"""diffora: learn which transformer modules get LoRA (DiffoRA's Differential Adaptation Matrix), then export a
plain PEFT LoRA adapter.

Pipeline (one module each)::

    candidates  ->  gates  ->  search (+ second_order)  ->  discretize  ->  export  ->  train  ->  evaluation
    DAM grid        relaxed    bi-level optimisation       keep top rho    PEFT LoRA

The CLI is ``options`` (every flag) -> ``loading`` (data, model) -> ``pipeline`` (the four commands) ->
``outputs`` (the output folder); see README's "How the code is laid out".
"""

__version__ = "0.1.0"

# The public names load their submodule on first use (PEP 562), so ``import diffora.cli`` imports neither torch's
# heavy dependants nor peft (and through it bitsandbytes) before the CLI has set up its logging.
_EXPORTS = {
    "DAMGrid": "candidates", "detect_task_heads": "candidates", "find_candidates": "candidates",
    "DiffoRAConfig": "config", "Selection": "discretize", "select_modules": "discretize",
    "ConfigError": "errors", "DataError": "errors", "DiffoRAError": "errors", "ModelError": "errors",
    "SearchStateError": "errors", "TrainingError": "errors", "infer_task_type": "export",
    "lora_config_for": "export", "DAMGates": "gates", "load_record": "record", "plot_dam": "record",
    "DAMSearch": "search", "prepare_search": "search",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))


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
