"""Data: read files into examples, GLUE task presets, packaged offline datasets, tokenization.

``encode`` is not imported here because it needs torch/transformers; import it as ``diffora.data.encode``.
"""

from diffora.data.packaged import PACKAGED_DATASETS, PACKAGED_TASKS, load_packaged
from diffora.data.readers import (
    ChatExamples,
    Examples,
    LMExamples,
    Record,
    build_examples,
    build_lm_examples,
    load_examples,
    read_records,
)
from diffora.data.tasks import GLUE_TASKS, TaskSpec, get_task, load_task_file, load_task_split

__all__ = [
    "GLUE_TASKS",
    "PACKAGED_DATASETS",
    "PACKAGED_TASKS",
    "ChatExamples",
    "Examples",
    "LMExamples",
    "Record",
    "TaskSpec",
    "build_examples",
    "build_lm_examples",
    "get_task",
    "load_examples",
    "load_packaged",
    "load_task_file",
    "load_task_split",
    "read_records",
]
