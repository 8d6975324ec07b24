"""Read user data (CSV, TSV, JSON, JSONL, Parquet files, or a Hugging Face hub dataset) into records, and records
into examples.

Two steps, so that every format shares one set of checks:

1. :func:`read_records` parses a file (or a hub dataset id such as ``user/name:split``) into a list of
   :class:`Record` (a ``dict`` of column -> value that also remembers the line it started on, for error messages).
2. :func:`build_examples` (classification / regression) or :func:`build_lm_examples` (causal LM) picks the
   columns a task needs and turns them into :class:`Examples`, :class:`LMExamples` or, for chat data (a column of
   ``[{"role": ..., "content": ...}, ...]`` lists), :class:`ChatExamples`.

Every problem with the file or its contents is a :class:`~diffora.errors.DataError` whose one-line message names
the file (and the line, where there is one) and says how to fix it. Parser exceptions (``UnicodeDecodeError``,
``csv.Error``, ``json.JSONDecodeError``, ``KeyError``) never escape.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from diffora.errors import DataError

__all__ = [
    "FORMATS",
    "ChatExamples",
    "Examples",
    "LMExamples",
    "Record",
    "build_examples",
    "build_lm_examples",
    "infer_format",
    "is_hub_dataset_id",
    "load_examples",
    "read_hub_records",
    "read_records",
]

Format = Literal["csv", "tsv", "json", "jsonl", "parquet"]
LabelKind = Literal["class", "float"]
PathLike = Union[str, Path]

#: Suffix (lower case) -> format.
FORMATS: dict[str, Format] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
#: Roles a chat message may have; the loss covers the assistant's turns only.
CHAT_ROLES = ("system", "user", "assistant", "tool")


class Record(dict):  # type: ignore[type-arg]
    """One row of a data file: column name -> value, plus ``line`` (1-based line it starts on, ``None`` for JSON)."""

    __slots__ = ("line",)

    def __init__(self, values: Mapping[str, Any], line: Optional[int] = None) -> None:
        super().__init__(values)
        self.line = line


def _where(source: str, record: Any, index: int) -> str:
    """``"file line N"`` when the record knows its line, else ``"file record #i"`` (1-based)."""
    line = getattr(record, "line", None)
    return f"{source} line {line}" if line is not None else f"{source} record #{index + 1}"


# ----------------------------------------------------------------------------------------------------------- reading


def infer_format(path: PathLike) -> Format:
    """The format implied by ``path``'s suffix; :class:`DataError` for a suffix diffora does not read."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise DataError(
            f"{path}: cannot tell the format from the suffix {suffix!r}; name it with one of the suffixes {known}"
        )
    return FORMATS[suffix]


def _decode(path: Path, raw: bytes, encoding: str) -> str:
    """Decode the whole file, turning a decoding error into a DataError with the line it happened on."""
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(
            f"{path}: unknown text encoding {encoding!r}; pass a valid one such as --encoding utf-8"
        ) from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path} line {line}: bytes that are not valid {encoding} ({exc.reason}); "
            f"save the file as UTF-8 or pass its encoding, e.g. --encoding latin-1"
        ) from None


def _read_delimited(
    path: Path, text: str, delimiter: str, quoting: int, header: bool, column_names: Optional[Sequence[str]]
) -> list[Record]:
    """Parse CSV/TSV text; every data row must have as many fields as the header (or ``column_names``)."""
    # newline="" keeps "\r" and "\r\n" untranslated so the csv module can handle line breaks inside quoted fields.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    names: Optional[list[str]] = list(column_names) if column_names is not None else None
    records: list[Record] = []
    saw_header = False
    line = 1  # line the next row starts on
    try:
        for row in reader:
            start, line = line, reader.line_num + 1
            if not row:  # blank line (e.g. a trailing empty line): nothing to read
                continue
            if header and not saw_header:
                saw_header = True
                if names is None:
                    names = [name.strip() for name in row]
                    duplicates = sorted({n for n in names if names.count(n) > 1})
                    if duplicates:
                        raise DataError(
                            f"{path} line {start}: the header repeats the column name(s) {duplicates}; "
                            "give every column a distinct name"
                        )
                elif len(names) != len(row):
                    raise DataError(
                        f"{path} line {start}: the header has {len(row)} columns but "
                        f"{len(names)} column names were given; "
                        "give one name per column"
                    )
                continue
            if names is None:  # no header and no names: columns are called "0", "1", ...
                names = [str(i) for i in range(len(row))]
            if len(row) != len(names):
                hint = " (a quote character may be unbalanced)" if quoting != csv.QUOTE_NONE else ""
                raise DataError(
                    f"{path} line {start}: expected {len(names)} fields but found {len(row)}{hint}; "
                    f"fix that row so every row has the same number of {'tabs' if delimiter == chr(9) else 'fields'}"
                )
            records.append(Record(zip(names, row, strict=True), line=start))
    except csv.Error as exc:
        raise DataError(
            f"{path} line {reader.line_num}: cannot parse the row ({exc}); fix the row or check the file format"
        ) from None
    if not records:
        what = "has a header but no data rows" if saw_header else "has no data rows"
        raise DataError(f"{path} {what}; add at least one example")
    return records


def _json_record(path: Path, item: Any, where: str, line: Optional[int]) -> Record:
    if not isinstance(item, dict):
        raise DataError(
            f"{where}: expected a JSON object (one example) but found {type(item).__name__}; "
            'write each example as {"column": value, ...}'
        )
    return Record({str(k): v for k, v in item.items()}, line=line)


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} line {exc.lineno}: invalid JSON ({exc.msg}); "
            "fix the syntax (JSON Lines files need the suffix .jsonl)"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of objects or {{"data": [...]}}; wrap the examples in a list')
    if not data:
        raise DataError(f"{path} holds no examples; add at least one")
    return [_json_record(path, item, f"{path} record #{i + 1}", None) for i, item in enumerate(data)]


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records: list[Record] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number}: invalid JSON ({exc.msg}); each line must hold one JSON object"
            ) from None
        records.append(_json_record(path, item, f"{path} line {number}", number))
    if not records:
        raise DataError(f"{path} holds no examples; add at least one JSON object per line")
    return records


def _read_parquet(path: Path) -> list[Record]:
    """Parquet through pyarrow (installed with ``datasets``); values keep their Arrow-to-Python types."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'diffora[hub]' (or pip install pyarrow)")
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{path}: not a readable Parquet file ({first}); re-create it or pass another file") from None
    if not rows:
        raise DataError(f"{path} holds no examples; add at least one row")
    return [Record({str(k): v for k, v in row.items()}) for row in rows]


#: ``user/name`` or ``user/name:split``: one slash, no leading ``.``/``/``/``~`` (those are paths)
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9._\[\]:%+-]+)?$")
_FILE_SUFFIXES = (*FORMATS, ".txt", ".gz", ".zip", ".arrow")


def is_hub_dataset_id(text: str) -> bool:
    """Whether ``text`` reads as a hub dataset id (``user/name[:split]``) rather than a data file's path."""
    return bool(_HUB_DATASET.match(text)) and not text.split(":")[0].lower().endswith(_FILE_SUFFIXES)


def read_hub_records(spec: str) -> list[Record]:
    """Rows of the hub dataset ``user/name`` (split ``train``) or ``user/name:split``, via ``datasets``.

    When the hub cannot be reached, offline mode is switched on for the call, so a cached dataset still loads and
    anything else fails at once with a one-line :class:`DataError` instead of minutes of retries.
    """
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{spec}' is not a local file; loading it as a hub dataset needs the 'datasets' package: "
            "pip install 'diffora[hub]', or pass a local CSV/TSV/JSON(L)/Parquet file"
        ) from None
    from diffora.data.models import hub_offline_if_unreachable

    try:
        with hub_offline_if_unreachable():
            data = datasets.load_dataset(name, split=split)
            rows = data.to_list()
    except (OSError, ValueError) as exc:  # ConnectionError/FileNotFoundError are OSErrors; a bad split a ValueError
        from huggingface_hub import constants

        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        if constants.HF_HUB_OFFLINE or "offline" in detail.lower() or isinstance(exc, ConnectionError):
            raise DataError(
                f"'{spec}' is not a local file and the Hugging Face hub is unreachable (offline) to load it as a "
                "dataset; pass a local CSV/TSV/JSON(L)/Parquet file, or run online once to cache it"
            ) from None
        raise DataError(
            f"'{spec}' is not a local file and cannot be loaded as a hub dataset ({detail}); check "
            "the path, or the dataset id and split (user/name:split)"
        ) from None
    if not rows:
        raise DataError(f"hub dataset '{spec}' holds no examples; pass another split (user/name:split)")
    return [Record({str(k): v for k, v in row.items()}) for row in rows]


def read_records(
    path: PathLike,
    *,
    fmt: Optional[Format] = None,
    header: bool = True,
    encoding: str = "utf-8-sig",
    column_names: Optional[Sequence[str]] = None,
) -> list[Record]:
    """Read a CSV, TSV, JSON, JSONL or Parquet file (or a hub dataset) into a list of :class:`Record`.

    Args:
        path: the file. Its suffix picks the format unless ``fmt`` is given. A ``user/name`` or ``user/name:split``
            that is not an existing path is loaded from the Hugging Face hub with ``datasets`` (split ``train`` by
            default; see :func:`read_hub_records`).
        fmt: ``"csv"``, ``"tsv"``, ``"json"``, ``"jsonl"`` or ``"parquet"``.
        header: CSV/TSV only: whether the first row names the columns. Without a header the columns are named by
            ``column_names`` or, failing that, ``"0"``, ``"1"``, ...
        encoding: text encoding. The default ``utf-8-sig`` reads UTF-8 and drops a leading byte-order mark.
        column_names: CSV/TSV only: names for the columns (replacing the header's, if there is one).

    TSV is read without quote handling (``csv.QUOTE_NONE``) because GLUE-style TSV texts contain bare ``"``;
    CSV uses standard quoting. Blank lines are skipped. Values of CSV/TSV records are strings; JSON and Parquet
    values keep their types.
    """
    file = Path(path)
    if fmt is None and not file.exists() and is_hub_dataset_id(str(path)):
        return read_hub_records(str(path))
    fmt = fmt or infer_format(file)
    if fmt not in ("csv", "tsv", "json", "jsonl", "parquet"):
        raise DataError(f"{file}: unknown format {fmt!r}; use csv, tsv, json, jsonl or parquet")
    if not file.exists():
        raise DataError(f"{file}: no such file; check the path")
    if not file.is_file():
        raise DataError(f"{file} is not a file; pass the path of a {fmt} file")
    if fmt == "parquet":
        return _read_parquet(file)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DataError(f"{file}: cannot read the file ({exc.strerror}); check its permissions") from None
    text = _decode(file, raw, encoding)
    if not text.strip():
        raise DataError(f"{file} is empty; add examples to it")
    if fmt == "csv":
        return _read_delimited(file, text, ",", csv.QUOTE_MINIMAL, header, column_names)
    if fmt == "tsv":
        return _read_delimited(file, text, "\t", csv.QUOTE_NONE, header, column_names)
    if fmt == "json":
        return _read_json(file, text)
    return _read_jsonl(file, text)


# ---------------------------------------------------------------------------------------------------------- examples


@dataclass
class Examples:
    """Texts (optionally pairs) and labels for sequence classification or regression.

    ``labels`` are class ids (``int``, indices into ``label_names``) for classification, floats for regression and
    ``None`` for unlabelled data. ``source`` names where the examples came from (for messages).
    """

    texts: list[str]
    text_pairs: Optional[list[str]] = None
    labels: Optional[Union[list[int], list[float]]] = None
    label_names: Optional[list[str]] = None
    source: str = "data"

    def __post_init__(self) -> None:
        n = len(self.texts)
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise ValueError(f"{len(self.text_pairs)} text pairs for {n} texts")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} texts")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_regression(self) -> bool:
        """True when the labels are real-valued scores: no label names and ``float`` values."""
        if self.labels is None or self.label_names is not None:
            return False
        return any(isinstance(v, float) for v in self.labels)

    @property
    def num_labels(self) -> Optional[int]:
        """Number of classes: 1 for regression, ``None`` when unlabelled, else the label names (or max id + 1)."""
        if self.labels is None:
            return None
        if self.label_names is not None:
            return len(self.label_names)
        return 1 if self.is_regression else max((int(v) for v in self.labels), default=-1) + 1

    def subset(self, indices: Sequence[int]) -> "Examples":
        """The examples at ``indices``, in that order (label names are kept even if a class disappears)."""
        idx = list(indices)
        return Examples(
            texts=[self.texts[i] for i in idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],  # type: ignore[misc]
            label_names=None if self.label_names is None else list(self.label_names),
            source=self.source,
        )

    def select(self, n: Optional[int]) -> "Examples":
        """The first ``n`` examples (all of them when ``n`` is ``None`` or not smaller than the size)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError(f"cannot select {n} examples")
        return self.subset(range(n))


@dataclass
class LMExamples:
    """Training text for causal language modelling.

    ``texts`` are the sequences the loss is computed on. When ``prompts`` is given, example ``i`` is
    ``prompts[i]`` followed by ``texts[i]`` (the response) and only the response is scored.
    """

    texts: list[str]
    prompts: Optional[list[str]] = None
    source: str = "data"

    def __post_init__(self) -> None:
        if self.prompts is not None and len(self.prompts) != len(self.texts):
            raise ValueError(f"{len(self.prompts)} prompts for {len(self.texts)} responses")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def responses(self) -> list[str]:
        """Alias of ``texts`` that reads better for prompt/response data."""
        return self.texts

    def subset(self, indices: Sequence[int]) -> "LMExamples":
        """The examples at ``indices``, in that order."""
        idx = list(indices)
        return LMExamples(
            texts=[self.texts[i] for i in idx],
            prompts=None if self.prompts is None else [self.prompts[i] for i in idx],
            source=self.source,
        )

    def select(self, n: Optional[int]) -> "LMExamples":
        """The first ``n`` examples (all of them when ``n`` is ``None`` or not smaller than the size)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError(f"cannot select {n} examples")
        return self.subset(range(n))


Message = dict[str, str]


@dataclass
class ChatExamples:
    """Conversations for causal language modelling: each a list of ``{"role", "content"}`` messages.

    They are rendered with the tokenizer's chat template and only the assistant turns are scored (see
    :func:`diffora.data.encode.encode_chat`).
    """

    conversations: list[list[Message]]
    source: str = "data"

    def __len__(self) -> int:
        return len(self.conversations)

    def subset(self, indices: Sequence[int]) -> "ChatExamples":
        """The examples at ``indices``, in that order."""
        return ChatExamples(conversations=[self.conversations[i] for i in indices], source=self.source)

    def select(self, n: Optional[int]) -> "ChatExamples":
        """The first ``n`` examples (all of them when ``n`` is ``None`` or not smaller than the size)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError(f"cannot select {n} examples")
        return self.subset(range(n))


def _check_columns(records: Sequence[Mapping[str, Any]], columns: Sequence[Optional[str]], source: str) -> None:
    """Every requested column must exist in the first record (later records are checked as they are read)."""
    if not records:
        raise DataError(f"{source} holds no examples; add at least one")
    present = list(records[0].keys())
    for column in columns:
        if column is not None and column not in present:
            raise DataError(f"{source}: no column {column!r}; the columns are {present}; pass one of them")


def _field(record: Mapping[str, Any], column: str, source: str, index: int) -> Any:
    try:
        return record[column]
    except KeyError:
        raise DataError(
            f"{_where(source, record, index)}: no field {column!r} (fields: {list(record.keys())}); "
            "add it to every example"
        ) from None


def _text(record: Mapping[str, Any], column: str, source: str, index: int) -> str:
    value = _field(record, column, source, index)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a JSON number used as text: keep its spelling
    raise DataError(
        f"{_where(source, record, index)}: {column!r} must be text but is {json.dumps(value)}; "
        "give every example a text value"
    )


def _label_key(value: Any) -> Optional[str]:
    """Canonical string form of a class label, or ``None`` when the value is missing/unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _sorted_label_names(keys: set[str]) -> list[str]:
    """Sort numerically when every label looks like a number ("2" < "10"), else alphabetically."""
    try:
        return sorted(keys, key=float)
    except ValueError:
        return sorted(keys)


def _class_labels(
    records: Sequence[Mapping[str, Any]], column: str, label_names: Optional[Sequence[str]], source: str
) -> tuple[list[int], list[str]]:
    keys: list[str] = []
    for i, record in enumerate(records):
        key = _label_key(_field(record, column, source, i))
        if key is None:
            raise DataError(
                f"{_where(source, record, i)}: missing or invalid label in {column!r}; give every example a class label"
            )
        keys.append(key)
    names = list(label_names) if label_names is not None else _sorted_label_names(set(keys))
    ids = {name: i for i, name in enumerate(names)}
    labels: list[int] = []
    for i, key in enumerate(keys):
        if key in ids:
            labels.append(ids[key])
        elif key.isdigit() and int(key) < len(names):  # already an id into the given label names
            labels.append(int(key))
        else:
            raise DataError(f"{_where(source, records[i], i)}: unknown label {key!r}; the labels are {names}")
    return labels, names


def _float_labels(records: Sequence[Mapping[str, Any]], column: str, source: str) -> list[float]:
    labels: list[float] = []
    for i, record in enumerate(records):
        value = _field(record, column, source, i)
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DataError(
                f"{_where(source, record, i)}: the score in {column!r} is {json.dumps(value)}, "
                "not a finite number; fix that value"
            )
        labels.append(number)
    return labels


def build_examples(
    records: Sequence[Mapping[str, Any]],
    *,
    text_column: str,
    text_pair_column: Optional[str] = None,
    label_column: Optional[str] = None,
    label_kind: Optional[LabelKind] = "class",
    label_names: Optional[Sequence[str]] = None,
    source: str = "data",
) -> Examples:
    """Pick the text (and pair) column and the label column out of ``records``.

    Args:
        records: rows from :func:`read_records` (any mappings work).
        text_column / text_pair_column: columns with the first and (optional) second text.
        label_column: column with the label; ``None`` for unlabelled data.
        label_kind: ``"class"`` maps labels to ids, ``"float"`` parses real-valued scores (regression);
            ``None`` ignores labels.
        label_names: the classes in id order. Default: the distinct labels sorted (numerically when they all look
            like numbers, so ``"0"``, ``"1"`` get ids 0 and 1). A label that is not a name but a valid id
            (``"2"`` with three names) is taken as that id.
        source: where the records came from, for error messages (usually the file path).
    """
    if label_kind not in ("class", "float", None):
        raise ValueError(f"label_kind must be 'class', 'float' or None, not {label_kind!r}")
    use_labels = label_column is not None and label_kind is not None
    _check_columns(records, [text_column, text_pair_column, label_column if use_labels else None], source)
    texts = [_text(r, text_column, source, i) for i, r in enumerate(records)]
    pairs = None if text_pair_column is None else [_text(r, text_pair_column, source, i) for i, r in enumerate(records)]
    labels: Optional[Union[list[int], list[float]]] = None
    names: Optional[list[str]] = None
    if use_labels and label_kind == "class":
        labels, names = _class_labels(records, label_column, label_names, source)  # type: ignore[arg-type]
    elif use_labels:
        labels = _float_labels(records, label_column, source)  # type: ignore[arg-type]
    return Examples(texts=texts, text_pairs=pairs, labels=labels, label_names=names, source=source)


def _conversation(record: Mapping[str, Any], column: str, source: str, index: int) -> list[Message]:
    """One chat example: a list of ``{"role": ..., "content": ...}`` with at least one assistant turn."""
    value = _field(record, column, source, index)
    where = _where(source, record, index)
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: {column!r} must be a non-empty list of {{"role": ..., "content": ...}} '
            "messages; fix that example"
        )
    messages: list[Message] = []
    for number, message in enumerate(value, start=1):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise DataError(
                f'{where}: message {number} of {column!r} must be {{"role": one of '
                f'{"/".join(CHAT_ROLES)}, "content": text}}, not {json.dumps(message, default=str)[:80]}'
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: the conversation in {column!r} has no assistant message, so nothing would be "
            "trained on; add the assistant's answer or drop the example"
        )
    return messages


def _is_chat_column(records: Sequence[Mapping[str, Any]], column: str) -> bool:
    return bool(records) and isinstance(records[0].get(column), list)


def build_lm_examples(
    records: Sequence[Mapping[str, Any]],
    *,
    text_column: Optional[str] = None,
    prompt_column: Optional[str] = None,
    response_column: Optional[str] = None,
    source: str = "data",
) -> Union[LMExamples, ChatExamples]:
    """Build causal-LM examples: either plain ``text_column``, or ``prompt_column`` + ``response_column``.

    With a prompt and a response, the model is trained on the response only (see
    :func:`diffora.data.encode.encode_causal_lm`). A response column alone is treated like a text column. A text
    column whose values are lists of ``{"role", "content"}`` messages (chat data, e.g. ``messages``) gives
    :class:`ChatExamples`, trained on the assistant turns only.
    """
    if text_column is not None and (prompt_column is not None or response_column is not None):
        raise DataError(f"{source}: give either a text column or prompt/response columns, not both")
    if text_column is None and response_column is None:
        what = (
            "a response column to go with the prompt column"
            if prompt_column
            else "a text column (or prompt and response columns)"
        )
        raise DataError(f"{source}: causal LM data needs {what}")
    column = text_column if text_column is not None else response_column
    _check_columns(records, [column, prompt_column], source)
    if text_column is not None and _is_chat_column(records, text_column):
        conversations = [_conversation(r, text_column, source, i) for i, r in enumerate(records)]
        return ChatExamples(conversations=conversations, source=source)
    texts = [_text(r, column, source, i) for i, r in enumerate(records)]  # type: ignore[arg-type]
    prompts = None if prompt_column is None else [_text(r, prompt_column, source, i) for i, r in enumerate(records)]
    return LMExamples(texts=texts, prompts=prompts, source=source)


def load_examples(
    path: PathLike,
    *,
    text_column: str,
    text_pair_column: Optional[str] = None,
    label_column: Optional[str] = None,
    label_kind: Optional[LabelKind] = "class",
    label_names: Optional[Sequence[str]] = None,
    fmt: Optional[Format] = None,
    header: bool = True,
    encoding: str = "utf-8-sig",
    column_names: Optional[Sequence[str]] = None,
) -> Examples:
    """:func:`read_records` followed by :func:`build_examples`, with the path as the source."""
    records = read_records(path, fmt=fmt, header=header, encoding=encoding, column_names=column_names)
    return build_examples(
        records,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        label_kind=label_kind,
        label_names=label_names,
        source=str(path),
    )
