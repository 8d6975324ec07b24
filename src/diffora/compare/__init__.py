"""``diffora compare``: DiffoRA against LoRA, AdaLoRA, EVA and random module selection on your own data.

Whether learning which modules get LoRA pays off depends on the model and the task. ``compare`` answers it on
yours: every method runs through the same data, seeds, schedule and training loop, and the report says, per
method, whether its difference from DiffoRA exceeds the seed-to-seed spread::

    from diffora.compare import compare

    results = compare(task="classification", train_file="train.csv", eval_file="dev.csv",
                      methods=["diffora", "lora-all", "lora-matched", "random"], seeds=[0, 1, 2],
                      output_dir="runs/cmp")

or on the command line ``diffora compare --task … --methods diffora lora-all … --output-dir runs/cmp``.

Layout: :mod:`.settings` (the options ``diffora run`` does not have) → :mod:`.methods` (one object per method
family: checks, model, fine-tune hooks, accounting; ``--methods`` entries and their variants) → :mod:`.data`
(splits, encoded rows) → :mod:`.jobs` (typed job records; one search / fine-tune / timing job, in a worker
process) → :mod:`.runner` (validation, the plan, resume, scheduling, ``results.json``) → :mod:`.report`
(``report.md`` and the plots).
"""

# Public names load on first use, so `diffora compare --help` (which reads .settings) imports neither torch nor peft.
from ..lazy import lazy_exports

_EXPORTS = {
    "FAMILIES": "methods",
    "Family": "methods",
    "Method": "methods",
    "parse_method": "methods",
    "parse_methods": "methods",
    "RESULTS_FORMAT": "runner",
    "compare": "runner",
    "DEFAULT_METHODS": "settings",
    "CompareOptions": "settings",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
