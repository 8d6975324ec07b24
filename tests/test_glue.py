"""GLUE presets: synthetic GLUE-format files for all eight tasks, the hub fallback, and the real files if present."""

from __future__ import annotations

import os
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from diffora.data.tasks import GLUE_TASKS, TaskSpec, get_task, load_task_file, load_task_split
from diffora.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------------------- the presets


def test_all_eight_tasks_are_defined() -> None:
    assert sorted(GLUE_TASKS) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


@pytest.mark.parametrize(
    ("name", "metrics", "main"),
    [
        ("cola", ("mcc",), "mcc"),
        ("sst2", ("accuracy",), "accuracy"),
        ("mrpc", ("accuracy", "f1"), "accuracy"),
        ("stsb", ("pearson", "spearman"), "pearson"),
        ("rte", ("accuracy",), "accuracy"),
        ("qnli", ("accuracy",), "accuracy"),
        ("mnli", ("accuracy",), "accuracy"),
        ("qqp", ("accuracy", "f1"), "accuracy"),
    ],
)
def test_metrics_per_task(name: str, metrics: tuple[str, ...], main: str) -> None:
    spec = GLUE_TASKS[name]
    assert spec.metrics == metrics and spec.main_metric == main


def test_kinds_and_label_counts() -> None:
    assert GLUE_TASKS["stsb"].kind == "regression" and GLUE_TASKS["stsb"].num_labels == 1
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert all(
        GLUE_TASKS[n].kind == "classification" and GLUE_TASKS[n].num_labels == 2
        for n in ("cola", "sst2", "mrpc", "rte", "qnli", "qqp")
    )
    assert GLUE_TASKS["cola"].header is False and len(GLUE_TASKS["cola"].column_names or ()) == 4


def test_get_task_accepts_common_spellings() -> None:
    assert get_task("SST-2") is GLUE_TASKS["sst2"]
    assert get_task("sts_b") is GLUE_TASKS["stsb"]
    with pytest.raises(ConfigError, match="unknown task 'imdb'"):
        get_task("imdb")


def test_split_files_and_aliases() -> None:
    mnli = GLUE_TASKS["mnli"]
    assert mnli.file_for("dev") == mnli.file_for("validation") == "dev_matched.tsv"
    assert mnli.file_for("dev_mismatched") == "dev_mismatched.tsv"
    assert GLUE_TASKS["rte"].file_for("train") == "train.tsv"
    with pytest.raises(ConfigError, match="no split 'test'"):
        GLUE_TASKS["rte"].file_for("test")


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match="main metric"):
        TaskSpec(name="x", kind="classification", metrics=("accuracy",), main_metric="f1")
    with pytest.raises(ConfigError, match="kind"):
        TaskSpec(name="x", kind="ranking")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- synthetic GLUE-format files

# Two data rows per task, in the exact column layout of the original GLUE TSVs.
SYNTHETIC: dict[str, tuple[str, str]] = {
    "cola": ("CoLA/train.tsv", "gj04\t1\t\tThe dog barked.\ngj04\t0\t*\tDog the barked.\n"),
    "sst2": ("SST-2/train.tsv", "sentence\tlabel\nit 's a \" charming journey . \t1\nbleak \t0\n"),
    "mrpc": (
        "MRPC/train.tsv",
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t1\t2\tHe said " hi .\tHe said hello .\n0\t3\t4\tA cat .\tA car .\n',
    ),
    "stsb": (
        "STS-B/train.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tAn air plane is taking off.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays a flute.\tA man cuts onions.\t0.500\n",
    ),
    "rte": (
        "RTE/train.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tNo weapons found.\tWeapons found.\tnot_entailment\n1\tA is B.\tA is B.\tentailment\n",
    ),
    "qnli": (
        "QNLI/train.tsv",
        "index\tquestion\tsentence\tlabel\n0\tWho?\tHe did.\tentailment\n1\tWhen?\tBlue.\tnot_entailment\n",
    ),
    "mnli": (
        "MNLI/train.tsv",
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse"
        "\tsentence1\tsentence2\tlabel1\tgold_label\n"
        "0\t1\t1e\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tIt rains.\tIt is dry.\tcontradiction\tcontradiction\n"
        "1\t2\t2n\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tHe sat.\tHe sat down.\tneutral\tneutral\n",
    ),
    "qqp": (
        "QQP/train.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "0\t1\t2\tHow to code?\tHow do I code?\t1\n1\t3\t4\tWhy?\tWhere?\t0\n",
    ),
}

EXPECTED: dict[str, tuple[list[str], list[Any]]] = {
    "cola": (["The dog barked.", "Dog the barked."], [1, 0]),
    "sst2": (["it 's a \" charming journey . ", "bleak "], [1, 0]),
    "mrpc": (['He said " hi .', "A cat ."], [1, 0]),
    "stsb": (["A plane takes off.", "A man plays a flute."], [5.0, 0.5]),
    "rte": (["No weapons found.", "A is B."], [1, 0]),  # entailment=0, not_entailment=1
    "qnli": (["Who?", "When?"], [0, 1]),
    "mnli": (["It rains.", "He sat."], [2, 1]),  # entailment=0, neutral=1, contradiction=2
    "qqp": (["How to code?", "Why?"], [1, 0]),
}


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    for relative, content in SYNTHETIC.values():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_each_task_reads_its_glue_layout(glue_root: Path, name: str) -> None:
    spec = GLUE_TASKS[name]
    ex = load_task_split(spec, "train", glue_root)
    texts, labels = EXPECTED[name]
    assert ex.texts == texts and ex.labels == labels
    assert (ex.text_pairs is not None) == (spec.text_pair_column is not None)
    if spec.kind == "regression":
        assert ex.label_names is None
    else:
        assert ex.label_names == list(spec.label_names or ())


def test_data_dir_may_be_the_task_folder(glue_root: Path) -> None:
    ex = load_task_split(GLUE_TASKS["rte"], "train", glue_root / "RTE")
    assert len(ex) == 2


def test_mnli_dev_is_dev_matched(glue_root: Path) -> None:
    (glue_root / "MNLI" / "dev_matched.tsv").write_text(SYNTHETIC["mnli"][1], encoding="utf-8")
    assert load_task_split(GLUE_TASKS["mnli"], "dev", glue_root).labels == [2, 1]
    with pytest.raises(DataError, match="dev_mismatched.tsv"):
        load_task_split(GLUE_TASKS["mnli"], "dev_mismatched", glue_root)


def test_missing_split_file_and_folder(glue_root: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_task_split(GLUE_TASKS["sst2"], "dev", glue_root)
    message = str(excinfo.value)
    assert "\n" not in message and "dev.tsv" in message and "--data-dir" in message
    with pytest.raises(DataError, match="no such folder"):
        load_task_split(GLUE_TASKS["sst2"], "dev", glue_root / "nowhere")


def test_unknown_label_in_a_glue_file(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text(
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tcontradiction\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=rf"{path} line 3: unknown label 'contradiction'"):
        load_task_file(GLUE_TASKS["rte"], path)


def test_causal_lm_spec_is_not_read_as_classification(tmp_path: Path) -> None:
    spec = TaskSpec(name="lm", kind="causal_lm", num_labels=0, metrics=("perplexity",), main_metric="perplexity")
    with pytest.raises(ConfigError, match="causal LM"):
        load_task_file(spec, tmp_path / "x.jsonl")


# ---------------------------------------------------------------------------------------------- the hub fallback


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> list[tuple[Any, ...]]:
    """Install a stand-in ``datasets`` module (the real hub is unreachable here, and slow to fail)."""
    calls: list[tuple[Any, ...]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append((*args, kwargs.get("split")))
        return load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=recording))
    return calls


def test_hub_failure_says_to_pass_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    calls = fake_datasets(monkeypatch, offline)
    with pytest.raises(DataError) as excinfo:
        load_task_split(GLUE_TASKS["cola"], "train")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "unreachable" in message and "--data-dir" in message and "train.tsv" in message
    assert calls == [("nyu-mll/glue", "cola", "train")]


def test_hub_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="'datasets' package is not installed.*--data-dir"):
        load_task_split(GLUE_TASKS["sst2"], "dev")


class FakeHubSplit:
    """Just enough of a ``datasets.Dataset`` for the fallback: column access and label features."""

    def __init__(self, columns: dict[str, list[Any]], label_names: list[str] | None) -> None:
        self.columns = columns
        self.features = {"label": types.SimpleNamespace(names=label_names) if label_names else object()}

    def __getitem__(self, key: str) -> list[Any]:
        return self.columns[key]


def test_hub_mnli_columns_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    split = FakeHubSplit(
        {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0]},
        ["entailment", "neutral", "contradiction"],
    )
    calls = fake_datasets(monkeypatch, lambda *a, **k: split)
    ex = load_task_split(GLUE_TASKS["mnli"], "dev")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ex.texts == ["p1", "p2"] and ex.text_pairs == ["h1", "h2"]
    assert ex.labels == [2, 0] and ex.label_names == ["entailment", "neutral", "contradiction"]


def test_hub_stsb_scores_and_unlabelled_split(monkeypatch: pytest.MonkeyPatch) -> None:
    split = FakeHubSplit({"sentence1": ["a"], "sentence2": ["b"], "label": [3.2]}, None)
    fake_datasets(monkeypatch, lambda *a, **k: split)
    ex = load_task_split(GLUE_TASKS["stsb"], "train")
    assert ex.labels == [3.2] and ex.is_regression
    unlabelled = FakeHubSplit({"sentence": ["a"], "label": [-1]}, ["negative", "positive"])
    fake_datasets(monkeypatch, lambda *a, **k: unlabelled)
    with pytest.raises(DataError, match="no labels"):
        load_task_split(GLUE_TASKS["sst2"], "train")


# ------------------------------------------------------------------------------------------------ the real files


def glue_dir() -> Path | None:
    """``$DIFFORA_GLUE_DIR``, else ``shared/data/glue`` beside the repository; ``None`` when absent."""
    candidates = [Path(os.environ["DIFFORA_GLUE_DIR"])] if os.environ.get("DIFFORA_GLUE_DIR") else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
    return next((c for c in candidates if (c / "CoLA" / "train.tsv").is_file()), None)


@pytest.fixture(scope="module")
def real_glue() -> Path:
    root = glue_dir()
    if root is None:
        pytest.skip("real GLUE files not found (set DIFFORA_GLUE_DIR or provide shared/data/glue)")
    return root


# From shared/data/glue/README.md: data rows and label distributions of each file.
REAL_COUNTS = {
    ("cola", "train"): {1: 6023, 0: 2528},
    ("cola", "dev"): {1: 721, 0: 322},
    ("sst2", "train"): {1: 37569, 0: 29780},
    ("sst2", "dev"): {1: 444, 0: 428},
    ("mrpc", "train"): {1: 2474, 0: 1194},
    ("mrpc", "dev"): {1: 279, 0: 129},
}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "split"), sorted(REAL_COUNTS))
def test_real_glue_counts_and_labels(real_glue: Path, name: str, split: str) -> None:
    ex = load_task_split(GLUE_TASKS[name], split, real_glue)
    assert dict(Counter(ex.labels)) == REAL_COUNTS[(name, split)]
    assert len(ex) == sum(REAL_COUNTS[(name, split)].values())
    assert ex.label_names == ["0", "1"]
    assert all(ex.texts)


def test_real_cola_keeps_the_last_row_without_newline(real_glue: Path) -> None:
    ex = load_task_split(GLUE_TASKS["cola"], "dev", real_glue)
    assert ex.texts[0] == "The sailors rode the breeze clear of the rocks."
    assert ex.texts[-1] == "John talked to Bill about himself."


def test_real_mrpc_header_bom_and_bare_quotes(real_glue: Path) -> None:
    ex = load_task_split(GLUE_TASKS["mrpc"], "dev", real_glue)
    assert ex.text_pairs is not None and ex.text_pairs[0].startswith('" The foodservice pie business')
    assert sum('"' in t for t in ex.texts + ex.text_pairs) > 10
