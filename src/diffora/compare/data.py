"""The data every job of a comparison shares: the task's rows, split as the comparison asks, encoded once per
process, and the loaders built from them.

Two splits exist:

* ``main``: the training rows and the evaluation set exactly as ``diffora run`` reads them (``--max-train-samples``
  picks the same seeded subset, ``--max-eval-samples`` the first eval rows);
* ``holdout``: rows held out from the *training* data (a seeded random ``--holdout-rows`` of them) become the
  evaluation set, and the rest (``--max-train-samples`` of them, when given) the training rows. The eval set is not
  read. ``--tune-lr`` chooses learning rates on it; ``--eval-on-holdout`` scores every job on it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ..cli.loading import TaskData, encode, load_model, load_task_data, make_loader
from ..cli.options import Options
from ..errors import DataError

#: seed of the held-out split (the benchmark's ablation split used the same one)
HOLDOUT_SEED = 1234
SPLITS = ("main", "holdout")


def holdout_size(n_train: int, requested: int) -> int:
    return requested if requested > 0 else max(1, min(2000, n_train // 5))


def load_split(opts: Options, split: str, holdout_rows: int = 0) -> TaskData:
    """The task's data for ``split`` (see the module docstring)."""
    if split == "main":
        return load_task_data(opts)
    full = load_task_data(dataclasses.replace(opts, max_train_samples=None))
    n = len(full.train)
    h = holdout_size(n, holdout_rows)
    if h >= n:
        raise DataError(f"--holdout-rows {h} leaves no training rows (the training data has {n}); lower --holdout-rows")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
    train = full.train
    full.eval = train.subset(sorted(order[:h]))
    rest = order[h:]
    full.train = train.subset(sorted(rest[: opts.max_train_samples] if opts.max_train_samples else rest))
    if full.kind == "classification" and len(set(full.train.labels or [])) < 2:
        raise DataError(
            "the training rows left after the held-out split have only one class; add data or lower --holdout-rows"
        )
    return full


@dataclass
class Prepared:
    """A split's data, tokenizer and encoded rows (one per process and split)."""

    data: TaskData
    tokenizer: Any
    train_items: list[dict]
    eval_items: list[dict]


_CACHE: dict[str, Prepared] = {}


def clear_cache() -> None:
    _CACHE.clear()


def context_key(options: dict, split: str, holdout_rows: int) -> str:
    return json.dumps({"options": options, "split": split, "holdout_rows": holdout_rows}, sort_keys=True, default=str)


def prepared(
    opts: Options, split: str, holdout_rows: int, *, data: Optional[TaskData] = None, tokenizer: Any = None
) -> Prepared:
    """Load (once per process) the data of ``split`` with its tokenizer, and encode it. ``data`` and ``tokenizer``
    may be passed when the caller has them already."""
    key = context_key(data_options(opts), split, holdout_rows)
    if key in _CACHE:
        return _CACHE[key]
    if data is None:
        data = load_split(opts, split, holdout_rows)
    if tokenizer is None:
        _, tokenizer = load_model(opts, data)
    prep = Prepared(
        data,
        tokenizer,
        encode(data.train, tokenizer, data.kind, opts.max_length),
        encode(data.eval, tokenizer, data.kind, opts.max_length),
    )
    _CACHE[key] = prep
    return prep


#: the options that decide the data and its encoding
DATA_OPTIONS = (
    "task",
    "data_dir",
    "train_file",
    "eval_file",
    "text_column",
    "text_pair_column",
    "label_column",
    "prompt_column",
    "response_column",
    "num_labels",
    "max_train_samples",
    "max_eval_samples",
    "max_length",
    "encoding",
    "model",
    "trust_remote_code",
)


def data_options(opts: Options) -> dict:
    return {k: getattr(opts, k) for k in DATA_OPTIONS}


def loader(prep: Prepared, items: list[dict], batch_size: int, *, shuffle: bool, seed: int):
    return make_loader(items, prep.tokenizer, prep.data.kind, batch_size, shuffle=shuffle, seed=seed)


def eval_loader(prep: Prepared, batch_size: int):
    """The evaluation rows sorted by length: batches pad to their longest row, so this cuts evaluation time; the
    metrics do not depend on the order."""
    by_length = sorted(prep.eval_items, key=lambda item: len(item["input_ids"]))
    return loader(prep, by_length, batch_size, shuffle=False, seed=0)


class OnDevice:
    """Iterate a loader with every tensor moved to ``device`` (the search and the evaluation take batches as they
    come; the fine-tuning loop moves its own)."""

    def __init__(self, batches: Any, device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            yield {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
