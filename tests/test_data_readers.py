"""Reading CSV/TSV/JSON/JSONL files into records, and records into examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffora.data.readers import (
    Examples,
    LMExamples,
    Record,
    build_examples,
    build_lm_examples,
    infer_format,
    load_examples,
    read_records,
)
from diffora.errors import DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------ read_records


def test_csv_with_quotes_commas_and_newlines(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\n"two\nlines ""quoted""",neg\nplain,pos\n')
    records = read_records(path)
    assert records == [
        {"text": "hello, world", "label": "pos"},
        {"text": 'two\nlines "quoted"', "label": "neg"},
        {"text": "plain", "label": "pos"},
    ]
    assert all(isinstance(r, Record) for r in records)
    # The second record spans lines 3-4, so the third starts on line 5.
    assert [r.line for r in records] == [2, 3, 5]


def test_csv_with_crlf_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\r\na,1\r\n"b\rc",0\r\n')
    assert read_records(path) == [{"text": "a", "label": "1"}, {"text": "b\rc", "label": "0"}]


def test_tsv_keeps_bare_quotes(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", 'sentence\tlabel\nhe said " hi .\t1\n"quoted at start\t0\n')
    records = read_records(path)
    assert [r["sentence"] for r in records] == ['he said " hi .', '"quoted at start']


def test_utf8_bom_is_dropped_from_the_header(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "\ufeffQuality\t#1 String\n1\tcafé\n")
    records = read_records(path)
    assert list(records[0]) == ["Quality", "#1 String"]
    assert records[0]["#1 String"] == "café"


def test_no_header_names_columns_by_index_or_given_names(tmp_path: Path) -> None:
    # Like CoLA's dev.tsv: no header and no newline after the last row.
    path = write(tmp_path / "d.tsv", "gj04\t1\t\tGood.\ngj04\t0\t*\tBad bad.")
    assert read_records(path, header=False)[1] == {"0": "gj04", "1": "0", "2": "*", "3": "Bad bad."}
    named = read_records(path, header=False, column_names=["source", "label", "mark", "sentence"])
    assert [r["sentence"] for r in named] == ["Good.", "Bad bad."]
    assert named[1].line == 2


def test_column_names_replace_the_header(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,b\nx,1\n")
    assert read_records(path, column_names=["text", "label"]) == [{"text": "x", "label": "1"}]
    with pytest.raises(DataError, match="3 column names"):
        read_records(path, column_names=["a", "b", "c"])


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label\n\na,1\n\n")
    assert read_records(path) == [{"text": "a", "label": "1"}]


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("short.tsv", "sentence\tlabel\ngood\t1\nno label here\n", 3),
        ("long.tsv", "sentence\tlabel\ngood\t1\nok\t0\ntoo\tmany\tfields\n", 4),
        ("short.csv", "text,label\na,1\nb\n", 3),
    ],
)
def test_wrong_number_of_fields_names_file_and_line(tmp_path: Path, name: str, content: str, line: int) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as excinfo:
        read_records(path)
    message = one_line_error(excinfo)
    assert str(path) in message and f"line {line}" in message and "expected 2 fields" in message


def test_unbalanced_csv_quote_is_a_data_error(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\n"never closed,1\n')
    with pytest.raises(DataError) as excinfo:
        read_records(path)
    assert str(path) in one_line_error(excinfo)


def test_csv_bad_quoting_is_a_data_error(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", 'text,label\n"a"b,1\n')
    with pytest.raises(DataError, match="line 2"):
        read_records(path)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("empty.csv", "", "is empty"),
        ("blank.tsv", "\n\n  \n", "is empty"),
        ("header.csv", "text,label\n", "header but no data rows"),
        ("header.tsv", "\ufeffsentence\tlabel\n\n", "header but no data rows"),
        ("empty.json", "[]", "no examples"),
        ("empty.jsonl", "\n\n", "is empty"),
    ],
)
def test_empty_files(tmp_path: Path, name: str, content: str, fragment: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as excinfo:
        read_records(path)
    message = one_line_error(excinfo)
    assert str(path) in message and fragment in message


def test_undecodable_bytes_suggest_an_encoding(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nok,1\nna\xefve caf\xe9,0\n".encode("latin-1"))
    with pytest.raises(DataError) as excinfo:
        read_records(path)
    message = one_line_error(excinfo)
    assert str(path) in message and "line 3" in message and "--encoding" in message
    assert read_records(path, encoding="latin-1")[1]["text"] == "naïve café"


def test_unknown_encoding_name(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text\na\n")
    with pytest.raises(DataError, match="unknown text encoding"):
        read_records(path, encoding="no-such-codec")


def test_missing_file_folder_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="is not a file"):
        read_records(tmp_path, fmt="csv")
    path = write(tmp_path / "data.txt", "text\na\n")
    with pytest.raises(DataError, match="suffix '.txt'"):
        read_records(path)
    assert read_records(path, fmt="csv") == [{"text": "a"}]


def test_infer_format() -> None:
    assert [infer_format(p) for p in ("a.CSV", "b.tsv", "c.json", "d.jsonl", "e.ndjson")] == [
        "csv",
        "tsv",
        "json",
        "jsonl",
        "jsonl",
    ]


def test_duplicate_header_names(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,text\na,b\n")
    with pytest.raises(DataError, match="repeats the column name"):
        read_records(path)


def test_json_list_and_data_wrapper(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(rows))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": rows}))
    assert read_records(plain) == rows == read_records(wrapped)
    assert read_records(plain)[0].line is None  # JSON records have no line numbers


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('[{"text": "a"},\n {"text": }]', "line 2: invalid JSON"),
        ('{"rows": []}', "expected a JSON list"),
        ('[{"text": "a"}, "b"]', "record #2: expected a JSON object"),
    ],
)
def test_bad_json(tmp_path: Path, content: str, fragment: str) -> None:
    path = write(tmp_path / "d.json", content)
    with pytest.raises(DataError) as excinfo:
        read_records(path)
    assert fragment in one_line_error(excinfo)


def test_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    records = read_records(path)
    assert records == [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    assert [r.line for r in records] == [1, 3]


def test_bad_jsonl_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError) as excinfo:
        read_records(path)
    message = one_line_error(excinfo)
    assert str(path) in message and "line 2" in message
    write(path, '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        read_records(path)


# ---------------------------------------------------------------------------------------------------- build_examples


def rows(*pairs: tuple[str, str]) -> list[Record]:
    return [Record({"text": t, "label": y}, line=i + 2) for i, (t, y) in enumerate(pairs)]


def test_numeric_string_labels_sort_numerically() -> None:
    ex = build_examples(rows(("a", "10"), ("b", "2"), ("c", "1"), ("d", "2")), text_column="text", label_column="label")
    assert ex.label_names == ["1", "2", "10"]  # not "1", "10", "2"
    assert ex.labels == [2, 1, 0, 1]
    assert not ex.is_regression and ex.num_labels == 3


def test_zero_one_labels_map_to_ids_zero_one() -> None:
    ex = build_examples(rows(("a", "1"), ("b", "0")), text_column="text", label_column="label")
    assert ex.label_names == ["0", "1"] and ex.labels == [1, 0]


def test_string_labels_sort_alphabetically() -> None:
    ex = build_examples(rows(("a", "pos"), ("b", "neg"), ("c", "neutral")), text_column="text", label_column="label")
    assert ex.label_names == ["neg", "neutral", "pos"]
    assert ex.labels == [2, 0, 1]


def test_given_label_names_fix_the_order_and_accept_ids() -> None:
    names = ["entailment", "neutral", "contradiction"]
    ex = build_examples(
        rows(("a", "contradiction"), ("b", "entailment"), ("c", "1")),
        text_column="text",
        label_column="label",
        label_names=names,
    )
    assert ex.labels == [2, 0, 1] and ex.label_names == names


def test_unknown_label_is_reported_with_its_line() -> None:
    with pytest.raises(DataError) as excinfo:
        build_examples(
            rows(("a", "neg"), ("b", "maybe")),
            text_column="text",
            label_column="label",
            label_names=["neg", "pos"],
            source="f.csv",
        )
    message = one_line_error(excinfo)
    assert "f.csv line 3" in message and "'maybe'" in message and "['neg', 'pos']" in message


def test_empty_label_is_an_error() -> None:
    with pytest.raises(DataError, match="f.csv line 2: missing or invalid label"):
        build_examples(rows(("a", " ")), text_column="text", label_column="label", source="f.csv")


def test_missing_column_lists_the_columns() -> None:
    with pytest.raises(DataError) as excinfo:
        build_examples(rows(("a", "1")), text_column="sentence", label_column="label", source="f.csv")
    message = one_line_error(excinfo)
    assert "no column 'sentence'" in message and "['text', 'label']" in message and "f.csv" in message


def test_missing_key_in_a_later_json_record() -> None:
    records = [Record({"text": "a", "label": 1}), Record({"txt": "b", "label": 0})]
    with pytest.raises(DataError, match=r"f.json record #2: no field 'text'"):
        build_examples(records, text_column="text", label_column="label", source="f.json")


def test_json_values_labels_and_null_text() -> None:
    records = [Record({"text": "a", "label": 1}), Record({"text": 7, "label": 0.0})]
    ex = build_examples(records, text_column="text", label_column="label")
    assert ex.texts == ["a", "7"] and ex.labels == [1, 0]
    with pytest.raises(DataError, match="must be text but is null"):
        build_examples([Record({"text": None, "label": 1})], text_column="text", label_column="label")


def test_float_labels_for_regression() -> None:
    ex = build_examples(rows(("a", "3.8"), ("b", " 0 ")), text_column="text", label_column="label", label_kind="float")
    assert ex.labels == [3.8, 0.0]
    assert ex.label_names is None and ex.is_regression and ex.num_labels == 1


@pytest.mark.parametrize("bad", ["high", "", "nan", "inf"])
def test_non_numeric_regression_label(bad: str) -> None:
    with pytest.raises(DataError) as excinfo:
        build_examples(
            rows(("a", "1.5"), ("b", bad)), text_column="text", label_column="label", label_kind="float", source="s.tsv"
        )
    message = one_line_error(excinfo)
    assert "s.tsv line 3" in message and "not a finite number" in message


def test_pairs_and_unlabelled_data() -> None:
    records = [Record({"q": "why?", "a": "because", "y": "1"})]
    ex = build_examples(records, text_column="q", text_pair_column="a")
    assert ex.text_pairs == ["because"] and ex.labels is None and ex.num_labels is None
    ex = build_examples(records, text_column="q", label_column="y", label_kind=None)
    assert ex.labels is None


def test_examples_select_and_subset() -> None:
    ex = Examples(
        texts=["a", "b", "c"], text_pairs=["x", "y", "z"], labels=[0, 1, 0], label_names=["n", "p"], source="s"
    )
    assert len(ex) == 3
    assert ex.select(None) is ex and ex.select(10) is ex
    first = ex.select(2)
    assert first.texts == ["a", "b"] and first.text_pairs == ["x", "y"] and first.labels == [0, 1]
    picked = ex.subset([2, 0])
    assert picked.texts == ["c", "a"] and picked.labels == [0, 0] and picked.label_names == ["n", "p"]
    assert picked.source == "s"
    with pytest.raises(ValueError):
        Examples(texts=["a"], labels=[0, 1])


def test_examples_without_label_names_tell_classes_from_scores() -> None:
    ids = Examples(texts=["a", "b"], labels=[0, 2])
    assert not ids.is_regression and ids.num_labels == 3
    scores = Examples(texts=["a", "b"], labels=[0.5, 2.0])
    assert scores.is_regression and scores.num_labels == 1
    assert Examples(texts=["a"]).num_labels is None and not Examples(texts=["a"]).is_regression


def test_load_examples_reads_and_builds(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "s1\ts2\tscore\na\tb\t4.5\nc\td\t1\n")
    ex = load_examples(path, text_column="s1", text_pair_column="s2", label_column="score", label_kind="float")
    assert ex.texts == ["a", "c"] and ex.text_pairs == ["b", "d"] and ex.labels == [4.5, 1.0]
    assert ex.source == str(path)
    with pytest.raises(DataError, match=f"{path} line 3"):
        write(path, "s1\ts2\tscore\na\tb\t4.5\nc\td\tx\n")
        load_examples(path, text_column="s1", label_column="score", label_kind="float")


# ------------------------------------------------------------------------------------------------- build_lm_examples


def test_lm_examples_from_text_or_prompt_response() -> None:
    records = [Record({"prompt": "Q: 1+1?", "response": " 2", "text": "hello"})]
    plain = build_lm_examples(records, text_column="text")
    assert plain.texts == ["hello"] and plain.prompts is None
    paired = build_lm_examples(records, prompt_column="prompt", response_column="response")
    assert paired.prompts == ["Q: 1+1?"] and paired.responses == [" 2"] and len(paired) == 1
    assert build_lm_examples(records, response_column="response").prompts is None


def test_lm_examples_errors() -> None:
    records = [Record({"text": "hello"})]
    with pytest.raises(DataError, match="needs a text column"):
        build_lm_examples(records)
    with pytest.raises(DataError, match="needs a response column"):
        build_lm_examples(records, prompt_column="text")
    with pytest.raises(DataError, match="not both"):
        build_lm_examples(records, text_column="text", response_column="text")
    with pytest.raises(DataError, match="no column 'prompt'"):
        build_lm_examples(records, prompt_column="prompt", response_column="text")


def test_lm_examples_select() -> None:
    ex = LMExamples(texts=["a", "b", "c"], prompts=["p", "q", "r"])
    assert ex.select(2).prompts == ["p", "q"] and ex.subset([2]).texts == ["c"]
    with pytest.raises(ValueError):
        LMExamples(texts=["a"], prompts=[])
