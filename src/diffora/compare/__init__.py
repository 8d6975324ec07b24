"""``diffora compare``: DiffoRA against LoRA, AdaLoRA, EVA and random module selection on your own data.

Whether learning which modules get LoRA pays off depends on the model and the task. ``compare`` answers it on
yours: every method runs through the same data, seeds, schedule and training loop, and the report says, per
method, whether its difference from DiffoRA exceeds the seed-to-seed spread::

    from diffora.compare import compare

    results = compare(task="classification", train_file="train.csv", eval_file="dev.csv",
                      methods=["diffora", "lora-all", "lora-matched", "random"], seeds=[0, 1, 2],
                      output_dir="runs/cmp")

or on the command line ``diffora compare --task … --methods diffora lora-all … --output-dir runs/cmp``.

Layout: :mod:`.settings` (the options ``diffora run`` does not have) → :mod:`.methods` (``--methods`` entries and
their variants) → :mod:`.data` (splits, encoded rows) → :mod:`.jobs` (one search / fine-tune / timing job, in a
worker process) → :mod:`.runner` (validation, the plan, resume, scheduling, ``results.json``) → :mod:`.report`
(``report.md`` and the plots).
"""

from .methods import FAMILIES, Method, parse_method, parse_methods
from .runner import RESULTS_FORMAT, compare
from .settings import DEFAULT_METHODS, CompareOptions

__all__ = ["CompareOptions", "DEFAULT_METHODS", "FAMILIES", "Method", "RESULTS_FORMAT", "compare", "parse_method",
           "parse_methods"]
