"""Task specifications and the GLUE presets.

A :class:`TaskSpec` says how to read a task's files (columns, header), what the labels are, and which metrics to
report. The GLUE presets match the original GLUE TSV files as written by ``download_glue_data.py``
(``glue_data/<TASK>/train.tsv`` and ``dev.tsv``; MNLI's dev split is ``dev_matched.tsv``):

=====  ===============================================  ==================  =====================  ============
task   columns used (text / pair / label)               labels              metrics                main metric
=====  ===============================================  ==================  =====================  ============
cola   sentence / - / label   (no header, 4 columns)    0, 1                mcc                    mcc
sst2   sentence / - / label                             0, 1                accuracy               accuracy
mrpc   #1 String / #2 String / Quality  (UTF-8 BOM)     0, 1                accuracy, f1           accuracy
stsb   sentence1 / sentence2 / score                    float (0-5)         pearson, spearman      pearson
rte    sentence1 / sentence2 / label                    entailment, not_e.  accuracy               accuracy
qnli   question / sentence / label                      entailment, not_e.  accuracy               accuracy
mnli   sentence1 / sentence2 / gold_label               entail., neutral,   accuracy               accuracy
                                                        contradiction
qqp    question1 / question2 / is_duplicate             0, 1                accuracy, f1           accuracy
=====  ===============================================  ==================  =====================  ============

Main metrics follow the LoRA / AdaLoRA / DiffoRA GLUE tables (accuracy for MRPC and QQP, Pearson for STS-B,
Matthews correlation for CoLA); F1 and Spearman are reported alongside. Class order matches the Hugging Face
``nyu-mll/glue`` dataset, so ids agree whichever way the data was loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from diffora.data.readers import Examples, Format, PathLike, build_examples, infer_format, read_records
from diffora.errors import ConfigError, DataError

__all__ = ["GLUE_TASKS", "TaskSpec", "get_task", "load_task_file", "load_task_split"]

TaskKind = Literal["classification", "regression", "causal_lm"]

# Spellings of split names that mean the same file.
_SPLIT_ALIASES = {
    "validation": "dev",
    "validation_matched": "dev",
    "dev_matched": "dev",
    "validation_mismatched": "dev_mismatched",
}


@dataclass(frozen=True)
class TaskSpec:
    """How to read a task and how to score it.

    Attributes:
        name: short name (``"sst2"``).
        kind: ``"classification"``, ``"regression"`` or ``"causal_lm"``.
        text_column / text_pair_column / label_column: columns of the data files.
        num_labels: classes (1 for regression, 0 for causal LM).
        label_names: the classes in id order, as written in the files; ``None`` = sorted distinct labels
            (classification) or no classes (regression, causal LM).
        metrics: metric names reported (see :mod:`diffora.evaluation.metrics`).
        main_metric: the one used to pick and compare runs.
        header: whether the files start with a header row.
        column_names: names for the columns of header-less files.
        prompt_column / response_column: causal LM with prompts: only the response is scored.
        glue_dir: the task's folder in a GLUE download (``"SST-2"``); ``None`` for non-GLUE tasks.
        files: split -> file name inside the task folder.
        hub_name: Hugging Face dataset config name for the online fallback; ``None`` = no fallback.
        hub_columns: the hub dataset's (text, pair) columns, which differ from the TSV headers.
        hub_splits: split -> hub split name.
    """

    name: str
    kind: TaskKind
    text_column: Optional[str] = "text"
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = "label"
    num_labels: int = 2
    label_names: Optional[tuple[str, ...]] = None
    metrics: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    header: bool = True
    column_names: Optional[tuple[str, ...]] = None
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    glue_dir: Optional[str] = None
    files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("dev", "dev.tsv"))
    hub_name: Optional[str] = None
    hub_columns: tuple[str, Optional[str]] = ("sentence", None)
    hub_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("dev", "validation"))

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression", "causal_lm"):
            raise ConfigError(
                f"task {self.name!r}: kind must be classification, regression or causal_lm, not {self.kind!r}"
            )
        if self.main_metric not in self.metrics:
            raise ConfigError(
                f"task {self.name!r}: main metric {self.main_metric!r} is not one of its metrics {list(self.metrics)}"
            )
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ConfigError(f"task {self.name!r}: {len(self.label_names)} label names for {self.num_labels} labels")

    @property
    def split_names(self) -> tuple[str, ...]:
        """The splits this task has files for."""
        return tuple(split for split, _ in self.files)

    def file_for(self, split: str) -> str:
        """File name of ``split`` (``"train"``, ``"dev"``/``"validation"``, ...)."""
        key = _SPLIT_ALIASES.get(split, split)
        for name, file in self.files:
            if name == key:
                return file
        raise ConfigError(f"task {self.name!r} has no split {split!r}; use one of {list(self.split_names)}")


def _glue(name: str, glue_dir: str, **kwargs: Any) -> TaskSpec:
    return TaskSpec(name=name, glue_dir=glue_dir, hub_name=name, **kwargs)


_PAIR_LABELS = ("entailment", "not_entailment")

#: The GLUE tasks, keyed by their short names.
GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue(
            "cola",
            "CoLA",
            kind="classification",
            text_column="sentence",
            label_column="label",
            label_names=("0", "1"),
            metrics=("mcc",),
            main_metric="mcc",
            header=False,
            column_names=("source", "label", "author_mark", "sentence"),
        ),
        _glue(
            "sst2", "SST-2", kind="classification", text_column="sentence", label_column="label", label_names=("0", "1")
        ),
        _glue(
            "mrpc",
            "MRPC",
            kind="classification",
            text_column="#1 String",
            text_pair_column="#2 String",
            label_column="Quality",
            label_names=("0", "1"),
            metrics=("accuracy", "f1"),
            hub_columns=("sentence1", "sentence2"),
        ),
        _glue(
            "stsb",
            "STS-B",
            kind="regression",
            text_column="sentence1",
            text_pair_column="sentence2",
            label_column="score",
            num_labels=1,
            metrics=("pearson", "spearman"),
            main_metric="pearson",
            hub_columns=("sentence1", "sentence2"),
        ),
        _glue(
            "rte",
            "RTE",
            kind="classification",
            text_column="sentence1",
            text_pair_column="sentence2",
            label_names=_PAIR_LABELS,
            hub_columns=("sentence1", "sentence2"),
        ),
        _glue(
            "qnli",
            "QNLI",
            kind="classification",
            text_column="question",
            text_pair_column="sentence",
            label_names=_PAIR_LABELS,
            hub_columns=("question", "sentence"),
        ),
        _glue(
            "mnli",
            "MNLI",
            kind="classification",
            text_column="sentence1",
            text_pair_column="sentence2",
            label_column="gold_label",
            num_labels=3,
            label_names=("entailment", "neutral", "contradiction"),
            files=(("train", "train.tsv"), ("dev", "dev_matched.tsv"), ("dev_mismatched", "dev_mismatched.tsv")),
            hub_columns=("premise", "hypothesis"),
            hub_splits=(("train", "train"), ("dev", "validation_matched"), ("dev_mismatched", "validation_mismatched")),
        ),
        _glue(
            "qqp",
            "QQP",
            kind="classification",
            text_column="question1",
            text_pair_column="question2",
            label_column="is_duplicate",
            label_names=("0", "1"),
            metrics=("accuracy", "f1"),
            hub_columns=("question1", "question2"),
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """The GLUE preset called ``name`` (case-insensitive; ``sst-2`` and ``sts-b`` are accepted)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def load_task_file(
    spec: TaskSpec, path: PathLike, *, encoding: str = "utf-8-sig", fmt: Optional[Format] = None
) -> Examples:
    """Read one data file of ``spec``'s layout into :class:`Examples` (classification or regression tasks)."""
    if spec.kind == "causal_lm":
        raise ConfigError(f"task {spec.name!r} is a causal LM task; read it with read_records + build_lm_examples")
    if spec.text_column is None:
        raise ConfigError(f"task {spec.name!r} has no text column")
    records = read_records(
        path, fmt=fmt or infer_format(path), header=spec.header, encoding=encoding, column_names=spec.column_names
    )
    return build_examples(
        records,
        text_column=spec.text_column,
        text_pair_column=spec.text_pair_column,
        label_column=spec.label_column,
        label_kind="float" if spec.kind == "regression" else "class",
        label_names=spec.label_names,
        source=str(path),
    )


def _find_split_file(spec: TaskSpec, split: str, data_dir: Path) -> Path:
    """``data_dir`` may be the GLUE root (holding ``SST-2/``) or the task folder itself."""
    file = spec.file_for(split)
    candidates = ([data_dir / spec.glue_dir / file] if spec.glue_dir else []) + [data_dir / file]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder; pass --data-dir with a folder that holds {file}")
    looked = " or ".join(str(c) for c in candidates)
    raise DataError(
        f"task {spec.name!r}: no {split} file at {looked}; put the GLUE-format {file} there or fix --data-dir"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def _load_from_hub(spec: TaskSpec, split: str) -> Examples:
    """The online fallback: ``datasets.load_dataset("nyu-mll/glue", name)``. Any failure becomes one DataError."""
    spec.file_for(split)  # validates the split name
    hint = f"pass --data-dir with a folder holding the GLUE-format files ({', '.join(f for _, f in spec.files)})"
    if spec.hub_name is None:
        raise DataError(f"task {spec.name!r} has no online copy; {hint}")
    hub_split = dict(spec.hub_splits).get(_SPLIT_ALIASES.get(split, split))
    if hub_split is None:
        raise DataError(f"task {spec.name!r}: split {split!r} is not on the hub; {hint}")
    try:
        import datasets  # optional dependency: only this fallback needs it
    except ImportError:
        raise DataError(
            f"task {spec.name!r}: no --data-dir given and the 'datasets' package is not installed; {hint}"
        ) from None
    from diffora.data.models import hub_offline_if_unreachable  # imports torch: only this fallback needs it

    try:
        with hub_offline_if_unreachable():  # no network: fail (or use the cache) at once instead of retrying ~30 s
            data = datasets.load_dataset("nyu-mll/glue", spec.hub_name, split=hub_split)
        text_col, pair_col = spec.hub_columns
        texts = [str(t) for t in data[text_col]]
        pairs = None if pair_col is None else [str(t) for t in data[pair_col]]
        raw_labels = list(data["label"])
        hub_names = getattr(data.features["label"], "names", None)
    except Exception as exc:  # network, hub, cache and schema errors all mean the same thing to the user
        raise DataError(
            f"cannot load GLUE {spec.name!r} from the Hugging Face hub ({_one_line(exc)}); the hub is unreachable "
            f"or the dataset is not cached: {hint}"
        ) from None
    labels: Union[list[int], list[float]]
    if spec.kind == "regression":
        labels = [float(v) for v in raw_labels]
    else:
        ids = list(range(spec.num_labels))
        if hub_names and spec.label_names and not all(n.isdigit() for n in spec.label_names):
            ids = [spec.label_names.index(n) if n in spec.label_names else i for i, n in enumerate(hub_names)]
        if any(not 0 <= int(v) < len(ids) for v in raw_labels):
            raise DataError(f"GLUE {spec.name!r} {split} from the hub has no labels (it is a test split); {hint}")
        labels = [ids[int(v)] for v in raw_labels]
    names = None if spec.kind == "regression" else list(spec.label_names or [str(i) for i in range(spec.num_labels)])
    return Examples(
        texts=texts,
        text_pairs=pairs,
        labels=labels,
        label_names=names,
        source=f"hub:nyu-mll/glue/{spec.hub_name}/{hub_split}",
    )


def load_task_split(
    spec: TaskSpec, split: str, data_dir: Optional[PathLike] = None, *, encoding: str = "utf-8-sig"
) -> Examples:
    """Load ``split`` (``"train"`` or ``"dev"``; MNLI also ``"dev_mismatched"``) of a task.

    With ``data_dir`` the GLUE TSV is read from ``data_dir/<GLUE folder>/<file>`` or ``data_dir/<file>``.
    Without it the Hugging Face hub copy (``nyu-mll/glue``) is tried; when that fails (offline, no cache, no
    ``datasets`` package) a one-line :class:`DataError` says to pass ``--data-dir``.
    """
    if data_dir is None:
        return _load_from_hub(spec, split)
    path = _find_split_file(spec, split, Path(data_dir))
    return load_task_file(spec, path, encoding=encoding)
