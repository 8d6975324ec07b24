"""Load what a run needs: the task's training and evaluation examples, the model and tokenizer, and the batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader

from ..data import encode as enc
from ..data.models import load_model_and_tokenizer
from ..data.packaged import PACKAGED_DATASETS, PACKAGED_TASKS, load_packaged
from ..data.readers import Examples, LMExamples, build_lm_examples, load_examples, read_records
from ..data.tasks import GLUE_TASKS, TaskSpec, get_task, load_task_file, load_task_split
from ..errors import ConfigError, DataError
from .options import Options

GENERIC_TASKS = ("classification", "regression", "causal_lm")
#: seed of the data subsets (--max-train-samples, the held-out eval split of --train-file): fixed, so that --seed
#: changes only the training randomness and runs with different seeds see the same rows
DATA_SEED = 0

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
        data = TaskData(
            spec.name,
            spec.kind,
            spec.metrics,
            spec.main_metric,
            train,
            evals,
            list(spec.label_names)
            if spec.label_names
            else (evals.label_names if isinstance(evals, Examples) else None),
        )
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
                # chat data ("messages": [{"role", "content"}, ...]) is picked up without flags, as TRL does
                chat = bool(records) and "text" not in records[0] and "messages" in records[0]
                text_column = "messages" if chat else "text"
            return build_lm_examples(
                records,
                text_column=text_column,
                prompt_column=opts.prompt_column,
                response_column=opts.response_column,
                source=path,
            )
        return load_examples(
            path,
            text_column=opts.text_column or "text",
            text_pair_column=opts.text_pair_column,
            label_column=opts.label_column or "label",
            label_kind="float" if kind == "regression" else "class",
            label_names=label_names,
            encoding=opts.encoding,
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
    metrics = {
        "classification": ("accuracy", "macro_f1"),
        "regression": ("pearson", "spearman"),
        "causal_lm": ("perplexity",),
    }[kind]
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


def load_model(opts: Options, data: TaskData, device: Optional[torch.device] = None):
    """The model (on ``device``, in ``--dtype``, 4-bit with ``--load-in-4bit``, checkpointed with
    ``--gradient-checkpointing``) and its tokenizer."""
    model, tokenizer = load_model_and_tokenizer(
        opts.model,
        task=data.kind,
        num_labels=data.num_labels if data.kind == "classification" else None,
        trust_remote_code=opts.trust_remote_code,
        seed=opts.seed,
        dtype=opts.dtype if opts.dtype == "auto" else getattr(torch, opts.dtype),
        load_in_4bit=opts.load_in_4bit,
        device=device,
    )
    if opts.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # casts norms/head to fp32 and freezes the quantised weights, as PEFT's QLoRA recipe does
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=opts.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif device is not None:
        model.to(device)
    if opts.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"model '{opts.model}' does not support gradient checkpointing; drop --gradient-checkpointing"
            )
        # non-reentrant: the gate step differentiates w.r.t. the gates, which are not inputs of the checkpointed
        # blocks, and reentrant checkpointing would drop those gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    return model, tokenizer


def encode(examples: AnyExamples, tokenizer: Any, kind: str, max_length: int) -> list[dict]:
    if kind == "causal_lm":
        return enc.encode_causal_lm(examples, tokenizer, max_length)
    return enc.encode_classification(examples, tokenizer, max_length)


def make_loader(
    items: list[dict], tokenizer: Any, kind: str, batch_size: int, *, shuffle: bool, seed: int
) -> DataLoader:
    collate = enc.make_collator(tokenizer, "causal_lm" if kind == "causal_lm" else "classification")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
