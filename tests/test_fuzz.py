"""Property-based fuzzing (hypothesis, bounded): options, data readers and discretisation never fail with anything
but diffora's own errors, and a selection always honours the keep-ratio rules."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffora.cli.options import Options
from diffora.data.readers import Examples, load_examples, read_records
from diffora.errors import ConfigError, DataError
from diffora.method.candidates import DAMGrid, ceil_count
from diffora.method.config import DiffoRAConfig
from diffora.select.quota import select_modules

FUZZ = settings(
    max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# values of every type, valid or not
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.text(max_size=6), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
SMALL_NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=200),
    st.floats(min_value=-2.0, max_value=2.0, allow_nan=False),
    st.sampled_from([0, 0.0, 1, 1.0]),
)
CHOICES = st.sampled_from(
    [
        "sigmoid",
        "softmax",
        "first",
        "second",
        "layer",
        "global",
        "budget",
        "query",
        "classification",
        "regression",
        "causal_lm",
        "sst2",
        "tweets",
        "",
    ]
)


def _values_for(name: str) -> st.SearchStrategy:
    """Mostly plausible values for a field (so the deeper checks are reached), sometimes junk."""
    if name in ("target_types", "target_modules", "modules_to_save"):
        plausible = st.one_of(st.none(), st.lists(st.sampled_from(["query", "value", "q_proj", "", "mlp"]), max_size=3))
    else:
        plausible = st.one_of(SMALL_NUMBERS, CHOICES, st.booleans())
    return st.one_of(plausible, plausible, JUNK)


def _kwargs(cls: type) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={f.name: _values_for(f.name) for f in fields(cls) if f.init})


@FUZZ
@given(_kwargs(DiffoRAConfig))
def test_diffora_config_accepts_or_raises_config_error(kwargs: dict) -> None:
    try:
        config = DiffoRAConfig(**kwargs)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert 0.0 < config.keep_ratio <= 1.0 and config.rank > 0
    assert DiffoRAConfig.from_dict(config.to_dict()) == config


@FUZZ
@given(_kwargs(Options))
def test_options_accept_or_raise_config_error(kwargs: dict) -> None:
    try:
        opts = Options(**kwargs)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert opts.search_config().rank == opts.rank
    for f in fields(Options):  # every numeric option that made it through is a finite number
        value = getattr(opts, f.name)
        if isinstance(value, float):
            assert math.isfinite(value), f.name


# ---------------------------------------------------------------------------------------------------- readers
SUFFIXES = st.sampled_from([".csv", ".tsv", ".json", ".jsonl", ".ndjson"])
ENCODINGS = st.sampled_from(["utf-8-sig", "utf-8", "latin-1", "utf-16", "ascii", "cp1252", "hex", "no-such-codec"])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _expect_data_error(call, *args, **kwargs):
    """Run ``call``; a DataError (one line) is fine, any other exception fails the test."""
    try:
        return call(*args, **kwargs)
    except DataError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


@FUZZ
@given(raw=st.binary(max_size=300), suffix=SUFFIXES, encoding=ENCODINGS, header=st.booleans())
def test_read_records_on_random_bytes(scratch: Path, raw: bytes, suffix: str, encoding: str, header: bool) -> None:
    path = scratch / f"random{suffix}"
    path.write_bytes(raw)
    records = _expect_data_error(read_records, path, encoding=encoding, header=header)
    if records is not None:
        assert records and all(isinstance(r, dict) for r in records)


CELL = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab 1.5-é\"',\t\n\r\x00")), max_size=8),
    st.sampled_from(["pos", "neg", "0", "1", "2.5", "nan", "inf"]),
)


@FUZZ
@given(
    names=st.lists(st.sampled_from(["text", "label", "pair", "other", "", "text"]), min_size=1, max_size=4),
    rows=st.lists(st.lists(CELL, min_size=0, max_size=5), max_size=6),
    delimiter=st.sampled_from([",", "\t"]),
    quoted=st.booleans(),
    header=st.booleans(),
    pair=st.sampled_from([None, "pair"]),
    kind=st.sampled_from(["class", "float", None]),
)
def test_load_examples_on_random_delimited_shapes(
    scratch: Path, names, rows, delimiter, quoted, header, pair, kind
) -> None:
    buffer = io.StringIO(newline="")
    if quoted:  # well-formed quoting of random cells (with ragged rows)
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
    else:  # raw joins: stray quotes, tabs and line breaks inside cells
        buffer.write("\n".join(delimiter.join(r) for r in [names, *rows]) + "\n")
    path = scratch / ("shape.tsv" if delimiter == "\t" else "shape.csv")
    path.write_text(buffer.getvalue(), encoding="utf-8")
    examples = _expect_data_error(
        load_examples,
        path,
        text_column="text",
        text_pair_column=pair,
        label_column="label",
        label_kind=kind,
        header=header,
    )
    if examples is not None:
        _check_examples(examples, kind)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=12,
)
RECORD = st.dictionaries(st.sampled_from(["text", "label", "pair", "x"]), JSON_VALUES, max_size=4)


@FUZZ
@given(
    data=st.one_of(
        st.lists(st.one_of(RECORD, JSON_VALUES), max_size=5),
        st.fixed_dictionaries({"data": st.lists(RECORD, max_size=4)}),
        JSON_VALUES,
    ),
    lines=st.booleans(),
    kind=st.sampled_from(["class", "float", None]),
)
def test_load_examples_on_random_json(scratch: Path, data, lines: bool, kind) -> None:
    if lines:
        items = data if isinstance(data, list) else [data]
        path = scratch / "random.jsonl"
        path.write_text("\n".join(json.dumps(item) for item in items) + "\n", encoding="utf-8")
    else:
        path = scratch / "random.json"
        path.write_text(json.dumps(data), encoding="utf-8")
    examples = _expect_data_error(load_examples, path, text_column="text", label_column="label", label_kind=kind)
    if examples is not None:
        _check_examples(examples, kind)


def _check_examples(examples: Examples, kind) -> None:
    assert all(isinstance(t, str) for t in examples.texts)
    if kind is None:
        assert examples.labels is None
    elif kind == "float":
        assert len(examples.labels) == len(examples) and all(math.isfinite(v) for v in examples.labels)
    else:
        assert len(examples.labels) == len(examples)
        assert all(0 <= v < len(examples.label_names) for v in examples.labels)


# --------------------------------------------------------------------------------------------- discretisation
@st.composite
def grids(draw) -> tuple[DAMGrid, list[list[float]]]:
    rows = draw(st.integers(min_value=1, max_value=5))
    cols = draw(st.integers(min_value=1, max_value=5))
    valid = draw(st.lists(st.lists(st.booleans(), min_size=cols, max_size=cols), min_size=rows, max_size=rows))
    assume(any(any(r) for r in valid))
    names = [[f"l{i}.t{j}" if valid[i][j] else None for j in range(cols)] for i in range(rows)]
    costs = draw(
        st.lists(
            st.lists(st.integers(min_value=1, max_value=5000), min_size=cols, max_size=cols),
            min_size=rows,
            max_size=rows,
        )
    )
    score = st.one_of(st.floats(min_value=-1e6, max_value=1e6), st.sampled_from([0.0, 0.5, 1.0]))  # ties are common
    scores = draw(st.lists(st.lists(score, min_size=cols, max_size=cols), min_size=rows, max_size=rows))
    grid = DAMGrid(
        layers=[f"l{i}" for i in range(rows)],
        types=[f"t{j}" for j in range(cols)],
        labels=[f"t{j}" for j in range(cols)],
        names=names,
        param_costs=costs,
    )
    return grid, scores


@FUZZ
@given(
    grid_scores=grids(),
    keep_ratio=st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    granularity=st.sampled_from(["layer", "global", "budget"]),
    rank=st.integers(min_value=1, max_value=64),
)
def test_select_modules_honours_the_ratio_rules(grid_scores, keep_ratio: float, granularity: str, rank: int) -> None:
    grid, scores = grid_scores
    cells = [(i, j) for i, row in enumerate(grid.names) for j, n in enumerate(row) if n is not None]
    cost = {c: rank * grid.param_costs[c[0]][c[1]] for c in cells}
    total = sum(cost.values())
    try:
        selection = select_modules(grid, scores, keep_ratio, granularity, rank=rank)
    except ConfigError as exc:  # only a budget smaller than every module may refuse
        assert granularity == "budget" and keep_ratio * total < min(cost.values()), str(exc)
        return
    kept = {(i, j) for i, row in enumerate(selection.mask) for j, k in enumerate(row) if k}
    assert len(selection.mask) == len(grid.names) and all(len(r) == len(grid.types) for r in selection.mask)
    assert kept <= set(cells), "only real candidates can be kept"
    assert selection.modules == [grid.names[i][j] for i, j in cells if (i, j) in kept]
    assert selection.lora_params == sum(cost[c] for c in kept) and selection.total_lora_params == total
    dropped = set(cells) - kept

    def best_first(group: set, rest: set) -> None:
        if group and rest:
            assert min(scores[i][j] for i, j in group) >= max(scores[i][j] for i, j in rest)

    if granularity == "layer":
        for row in range(len(grid.names)):
            in_row = {c for c in cells if c[0] == row}
            if in_row:
                assert len(kept & in_row) == ceil_count(keep_ratio, len(in_row))
                best_first(kept & in_row, dropped & in_row)
    elif granularity == "global":
        assert len(kept) == ceil_count(keep_ratio, len(cells))
        best_first(kept, dropped)
    else:
        budget = keep_ratio * total
        assert 0 < selection.lora_params <= budget
        # greedy by score: every module left out did not fit into what was left of the budget
        assert all(selection.lora_params + cost[c] > budget for c in dropped)


@FUZZ
@given(
    grid_scores=grids(),
    keep_ratio=st.one_of(st.floats(allow_nan=True), st.integers(-2, 3)),
    granularity=st.one_of(st.sampled_from(["layer", "global", "budget"]), st.text(max_size=5)),
    extra_row=st.booleans(),
)
def test_select_modules_rejects_bad_arguments_with_config_error(
    grid_scores, keep_ratio, granularity, extra_row: bool
) -> None:
    grid, scores = grid_scores
    if extra_row:
        scores = [*scores, [0.0] * len(grid.types)]
    try:
        select_modules(grid, scores, keep_ratio, granularity)
    except ConfigError:
        return
    assert 0 < keep_ratio <= 1 and granularity in ("layer", "global", "budget") and not extra_row
