"""Bad input never crashes or corrupts (issue #5).

One parametrised test per row of the catalogue in ``docs/reliability.md`` (the ids are the row names, and a test
checks that the two lists agree). Every case runs ``diffora.cli.main`` in-process and must:

* exit with status 2 (1 is reserved for internal errors),
* print exactly one line on stderr, ``diffora: error: ...``, naming the problem and the fix, and no traceback,
* leave no partial output: the output directory is absent afterwards, or, if it existed, byte-identical (a few
  cases that fail *during* training leave exactly ``OUT/checkpoints/``, which is how a run is resumed).

Two subprocess checks at the end confirm that no traceback reaches stderr unless ``--debug`` is given, and the
remaining tests cover the safety rules (``trust_remote_code``, config-file write locations, disk-full recovery).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from conftest import FAST_FLAGS, REPO, write_sentiment_csvs

from diffora.cli.app import main

FAST = FAST_FLAGS["run"]
#: the fast flags each command takes (a command refuses the options it does not use)
FAST_FOR = FAST_FLAGS


# ------------------------------------------------------------------------------------------------------ harness
@dataclass
class Spec:
    """What one case runs and what it must print/leave."""

    argv: list[str]
    expect: tuple[str, ...]  # substrings of the one-line message (case-insensitive): the problem and the fix
    out: Optional[Path] = None  # the output that must not be created/changed (default: ctx.out)
    leaves: str = "nothing"  # "nothing" (absent or byte-identical) or "checkpoints" (only OUT/checkpoints/)


@dataclass
class Case:
    name: str
    build: Callable[["Ctx"], Spec]


CASES: list[Case] = []


def case(name: str):
    def register(build: Callable[["Ctx"], Spec]) -> Callable[["Ctx"], Spec]:
        CASES.append(Case(name, build))
        return build

    return register


@dataclass
class Ctx:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    bert: Path
    llama: Path
    data: Path
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.tmp / "out"

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def folder(self, name: str, **files: str | bytes) -> str:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        for file, content in files.items():
            (path / file).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def run(
        self, *extra: str, command: str = "run", train: Optional[str] = None, out: Optional[Path] = None
    ) -> list[str]:
        """A valid, fast command on the tiny BERT; ``extra`` flags come last, so they override the defaults."""
        return [
            command,
            "--task",
            "classification",
            "--train-file",
            train or str(self.data / "train.csv"),
            "--eval-file",
            str(self.data / "dev.csv"),
            "--model",
            str(self.bert),
            "--output-dir",
            str(out or self.out),
            *FAST_FOR[command],
            *extra,
        ]

    def eval(self, *extra: str, adapter: Optional[str] = None) -> list[str]:
        return [
            "eval",
            "--task",
            "classification",
            "--eval-file",
            str(self.data / "dev.csv"),
            "--model",
            str(self.bert),
            "--max-length",
            "32",
            "--adapter",
            adapter or self.folder("adapter"),
            *extra,
        ]

    def diffora_output(self, path: Optional[Path] = None) -> Path:
        """A finished-looking diffora output folder (so --overwrite would be allowed to replace it)."""
        path = path or self.out
        (path / "adapter").mkdir(parents=True)
        (path / "adapter" / "adapter_config.json").write_text('{"x": 1}\n')
        (path / "metrics.json").write_text('{"eval": {"accuracy": 0.5}}\n')
        return path


def _snapshot(path: Path) -> Optional[dict[str, bytes | None]]:
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = write_sentiment_csvs(tmp_path_factory.mktemp("bad-input-data"), 64, 24)
    return folder


@pytest.fixture
def ctx(tmp_path, monkeypatch, tiny_bert_dir, tiny_llama_dir, data_dir) -> Ctx:
    monkeypatch.setenv("DIFFORA_CACHE", str(tmp_path / "cache"))
    return Ctx(tmp_path, monkeypatch, tiny_bert_dir, tiny_llama_dir, data_dir)


@pytest.mark.parametrize("row", CASES, ids=lambda c: c.name)
def test_bad_input(row: Case, ctx: Ctx, capsys) -> None:
    spec = row.build(ctx)
    out = spec.out or ctx.out
    before = _snapshot(out)
    code = main(spec.argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"stderr must be one line, got:\n{err}"
    assert lines[0].startswith("diffora: error: "), lines[0]
    for text in spec.expect:
        assert text.lower() in lines[0].lower(), f"{text!r} not in: {lines[0]}"
    if spec.leaves == "checkpoints":
        assert before is None
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
        assert any((out / "checkpoints").glob("*.pt"))
    else:
        assert _snapshot(out) == before, "the output was created or changed"
    leftovers = [p.name for p in out.parent.glob(f".{out.name}.*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_catalogue_lists_every_case() -> None:
    """docs/reliability.md's table and this file's cases are the same list, in the same order."""
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
    assert rows == [c.name for c in CASES]
    assert len(rows) >= 30


# --------------------------------------------------------------------------------------------------- model
@case("unknown-model-path")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--model", str(ctx.tmp / "no" / "such" / "model")), ("not found", "local folder"))


@case("model-folder-without-config")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--model", ctx.folder("empty-model")), ("no config.json", "save_pretrained"))


@case("adapter-passed-as-model")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--model", ctx.folder("an-adapter", **{"adapter_config.json": "{}"})),
        ("adapter folder, not a model", "base model"),
    )


@case("pickle-only-model-weights")
def _(ctx: Ctx) -> Spec:
    folder = ctx.folder(
        "pickled", **{"config.json": (ctx.bert / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x02}q\x00."}
    )
    return Spec(ctx.run("--model", folder), ("pickle weights", "safetensors"))


@case("hub-model-while-offline")
def _(ctx: Ctx) -> Spec:
    ctx.monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return Spec(ctx.run("--model", "nosuchorg/nosuchmodel"), ("hub is unreachable", "local folder"))


@case("gguf-without-gguf-package")
def _(ctx: Ctx) -> Spec:
    import importlib.util

    real = importlib.util.find_spec
    ctx.monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    return Spec(
        ctx.run("--model", ctx.file("tiny.gguf", b"GGUF\x03\x00\x00\x00")),
        ("needs the 'gguf' package", "pip install gguf"),
    )


@case("target-types-match-nothing")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--target-types", "q_proj"),
        ("'q_proj' matches no linear layer", "the blocks contain: attention.self.query"),
    )


@case("max-length-beyond-model")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--max-length", "512"), ("more than model", "--max-length 128 or less"))


# ------------------------------------------------------------------------------------------------- options
@case("keep-ratio-zero")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--keep-ratio", "0"), ("--keep-ratio must be in (0, 1]", "got 0.0"))


@case("keep-ratio-above-one")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--keep-ratio", "1.5"), ("--keep-ratio must be in (0, 1]", "got 1.5"))


@case("rank-zero")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--rank", "0"), ("--rank must be a positive integer", "got 0"))


@case("budget-below-smallest-module")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--granularity", "budget", "--keep-ratio", "0.0001"),
        ("smaller than the smallest candidate module", "raise the keep ratio"),
    )


@case("bad-gate")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--gate", "tanh"), ("--gate must be one of", "'sigmoid', 'softmax'"))


@case("bad-granularity")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--granularity", "row"), ("--granularity must be one of", "'layer', 'global', 'budget'"))


@case("bad-selection-score")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--selection-score", "loss"), ("--selection-score must be one of", "'gate', 'movement'"))


@case("bad-order")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--order", "third"), ("--order must be one of", "'first', 'second'"))


@case("unknown-task")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--task", "sentiment"), ("unknown --task 'sentiment'", "classification"))


@case("max-train-samples-zero")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--max-train-samples", "0"), ("--max-train-samples", "positive number of rows"))


@case("flag-value-not-a-number")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--rank", "eight"), ("--rank: invalid int value: 'eight'", "--help"))


@case("unknown-flag")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--rnak", "4"), ("unrecognized arguments: --rnak", "--help"))


@case("max-length-below-two")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--max-length", "1"), ("--max-length must be at least 2", "got 1"))


@case("negative-weight-decay")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--weight-decay", "-0.1"), ("--weight-decay must be >= 0", "got -0.1"))


@case("non-finite-epochs")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--epochs", "inf"), ("--epochs must be a finite number", "got inf"))


@case("non-positive-max-grad-norm")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--max-grad-norm", "-1"), ("--max-grad-norm must be > 0", "got -1.0"))


@case("seed-out-of-range")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--seed", "-1"), ("--seed must be an integer between 0 and 4294967295", "got -1"))


# ---------------------------------------------------------------------------------------------------- data
@case("train-file-missing")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run(train=str(ctx.tmp / "nope.csv")), ("nope.csv: no such file", "check the path"))


@case("empty-data-file")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run(train=ctx.file("empty.csv", "")), ("empty.csv is empty", "add examples"))


@case("header-only-file")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run(train=ctx.file("header.csv", "text,label\n")),
        ("header.csv has a header but no data rows", "add at least one example"),
    )


@case("missing-text-column")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run(train=ctx.file("t.csv", "sentence,label\ngood,1\nbad,0\n")),
        ("t.csv: no column 'text'", "the columns are ['sentence', 'label']"),
    )


@case("missing-label-column")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run(train=ctx.file("t.csv", "text,stars\ngood,1\nbad,0\n")),
        ("t.csv: no column 'label'", "the columns are ['text', 'stars']"),
    )


@case("label-count-mismatch")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--num-labels", "3"), ("--num-labels is 3 but the data has 2 classes", "fix --num-labels"))


@case("non-numeric-regression-label")
def _(ctx: Ctx) -> Spec:
    train = ctx.file("r.csv", "text,label\ngood,4.5\nok,high\n")
    return Spec(ctx.run("--task", "regression", train=train), ("r.csv line 3", '"high"', "not a finite number"))


@case("mixed-label-types")
def _(ctx: Ctx) -> Spec:
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "odd", "label": True}]
    train = ctx.file("m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    return Spec(ctx.run(train=train), ("m.jsonl line 3", "invalid label", "give every example a class label"))


@case("undecodable-bytes")
def _(ctx: Ctx) -> Spec:
    train = ctx.file("latin.csv", "text,label\ngood,1\n".encode() + "caf\u00e9,0\n".encode("latin-1"))
    return Spec(ctx.run(train=train), ("latin.csv line 3", "not valid utf-8", "--encoding latin-1"))


@case("unknown-encoding")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--encoding", "klingon"), ("unknown text encoding 'klingon'", "--encoding utf-8"))


@case("tsv-wrong-field-count")
def _(ctx: Ctx) -> Spec:
    train = ctx.file("bad.tsv", "text\tlabel\ngood\t1\nbad\t0\textra\n")
    return Spec(ctx.run(train=train), ("bad.tsv line 3", "expected 2 fields but found 3", "same number of tabs"))


@case("csv-unbalanced-quote")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run(train=ctx.file("q.csv", 'text,label\ngood,1\n"bad,0\n')),
        ("q.csv line", "cannot parse the row", "fix the row"),
    )


@case("unsupported-file-suffix")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run(train=ctx.file("train.txt", "text,label\ngood,1\n")), ("cannot tell the format", ".csv"))


@case("invalid-json")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run(train=ctx.file("t.json", '[{"text": "good", "label": 1},')),
        ("t.json line 1: invalid json", "fix the syntax"),
    )


@case("eval-file-without-labels")
def _(ctx: Ctx) -> Spec:
    argv = ctx.run("--eval-file", ctx.file("unlabelled.csv", "text\ngood\nbad\n"))
    return Spec(argv, ("unlabelled.csv: no column 'label'", "pass one of them"))


@case("eval-label-unknown-to-training")
def _(ctx: Ctx) -> Spec:
    argv = ctx.run("--eval-file", ctx.file("dev7.csv", "text,label\ngood,1\nodd,7\n"))
    return Spec(argv, ("dev7.csv line 3: unknown label '7'", "the labels are ['0', '1']"))


@case("single-class-training-data")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run(train=ctx.file("one.csv", "text,label\ngood,1\nfine,1\n")),
        ("only one class (1)", "add examples of the other classes"),
    )


@case("too-few-training-rows")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--max-train-samples", "1"), ("1 training rows are too few to split", "add data"))


@case("search-shorter-than-warmup")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--search-steps", "3", "--gate-warmup-steps", "5"),
        ("no gate step would run", "lower --gate-warmup-steps"),
    )


@case("causal-lm-prompt-without-response")
def _(ctx: Ctx) -> Spec:
    rows = "\n".join(json.dumps({"prompt": f"say {i}"}) for i in range(8)) + "\n"
    train = ctx.file("lm.jsonl", rows)
    argv = [
        "run",
        "--task",
        "causal_lm",
        "--train-file",
        train,
        "--prompt-column",
        "prompt",
        "--model",
        str(ctx.llama),
        "--output-dir",
        str(ctx.out),
        *FAST,
    ]
    return Spec(argv, ("needs a response column", "prompt column"))


# ---------------------------------------------------------------------------------------------------- GLUE
@case("glue-data-dir-without-files")
def _(ctx: Ctx) -> Spec:
    argv = [
        "run",
        "--task",
        "sst2",
        "--data-dir",
        ctx.folder("glue-empty"),
        "--model",
        str(ctx.bert),
        "--output-dir",
        str(ctx.out),
        "--quiet",
    ]
    return Spec(argv, ("no train file at", "train.tsv", "fix --data-dir"))


@case("glue-data-dir-missing")
def _(ctx: Ctx) -> Spec:
    argv = [
        "run",
        "--task",
        "rte",
        "--data-dir",
        str(ctx.tmp / "nowhere"),
        "--model",
        str(ctx.bert),
        "--output-dir",
        str(ctx.out),
        "--quiet",
    ]
    return Spec(argv, ("nowhere: no such folder", "--data-dir"))


@case("glue-offline-without-data-dir")
def _(ctx: Ctx) -> Spec:
    ctx.monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    argv = ["run", "--task", "sst2", "--model", str(ctx.bert), "--output-dir", str(ctx.out), "--quiet"]
    return Spec(argv, ("cannot load glue 'sst2' from the hugging face hub", "pass --data-dir"))


# -------------------------------------------------------------------------------------------------- config
@case("config-file-missing")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--config", str(ctx.tmp / "nope.yaml")), ("config file", "does not exist", "check the --config path")
    )


@case("config-not-valid-yaml")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--config", ctx.file("c.yaml", "rank: [1\nalpha: 2\n")),
        ("c.yaml' is not valid yaml (line 2", "fix the syntax"),
    )


@case("config-not-a-mapping")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--config", ctx.file("c.yaml", "- rank\n- 4\n")), ("must hold a mapping of option names to values",)
    )


@case("config-unknown-option")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--config", ctx.file("c.yaml", "rank: 4\nlearning_rate: 0.1\n")),
        ("unknown option 'learning_rate'", "diffora run --help"),
    )


@case("config-wrong-value-type")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--config", ctx.file("c.yaml", "alpha: sixteen\n")), ("option 'alpha' must be a number", "'sixteen'")
    )


@case("config-writes-outside-its-folder")
def _(ctx: Ctx) -> Spec:
    config = ctx.file("cfg/c.yaml", f"output-dir: {ctx.out}\noverwrite: true\n")
    argv = [a for a in ctx.run("--config", config) if a not in ("--output-dir", str(ctx.out))]
    return Spec(argv, ("not below the config file's folder", "pass --output-dir on the command line"))


# -------------------------------------------------------------------------------------------------- output
@case("output-dir-exists")
def _(ctx: Ctx) -> Spec:
    ctx.diffora_output()
    return Spec(ctx.run(), ("already exists", "pass --overwrite"))


@case("output-dir-is-a-file")
def _(ctx: Ctx) -> Spec:
    ctx.out.write_text("not a folder\n")
    return Spec(ctx.run(), ("is a file", "choose a folder path"))


@case("output-parent-is-a-file")
def _(ctx: Ctx) -> Spec:
    blocker = ctx.tmp / "blocker"
    blocker.write_text("x\n")
    out = blocker / "out"
    return Spec(ctx.run(out=out), ("blocker' is a file, not a folder", "choose another --output-dir"), out=blocker)


@case("output-dir-not-writable")
def _(ctx: Ctx) -> Spec:
    # root ignores chmod, so simulate a read-only parent where the check looks
    ctx.monkeypatch.setattr(os, "access", lambda *a, **k: False)
    return Spec(ctx.run(), ("permission denied", "choose another --output-dir"))


@case("overwrite-unrelated-folder")
def _(ctx: Ctx) -> Spec:
    ctx.folder("out", **{"thesis.tex": "precious\n"})
    return Spec(ctx.run("--overwrite"), ("not a diffora output folder", "'thesis.tex'", "choose a new --output-dir"))


@case("overwrite-current-folder")
def _(ctx: Ctx) -> Spec:
    ctx.diffora_output()
    ctx.monkeypatch.chdir(ctx.out)
    argv = [a if a != str(ctx.out) else "." for a in ctx.run("--overwrite")]
    return Spec(argv, ("refusing to --overwrite '.'", "contains the current folder"))


@case("disk-full-while-saving")
def _(ctx: Ctx) -> Spec:
    import diffora.store.io

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    ctx.monkeypatch.setattr(diffora.store.io.os, "fsync", full)
    return Spec(ctx.run("--checkpoint-every", "0"), ("no space left on device", "free some disk space", "rerun"))


@case("disk-full-while-saving-adapter")
def _(ctx: Ctx) -> Spec:
    from safetensors import SafetensorError

    def full(*_a, **_k):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    ctx.monkeypatch.setattr("peft.peft_model.safe_save_file", full)
    return Spec(ctx.run("--checkpoint-every", "0"), ("no space left on device", "free some disk space"))


@case("eval-output-file-is-a-folder")
def _(ctx: Ctx) -> Spec:
    folder = Path(ctx.folder("results"))
    adapter = ctx.folder("adapter", **{"adapter_config.json": "{}"})
    return Spec(
        ctx.eval("--output-file", str(folder), adapter=adapter), ("is a folder", "pass a file path"), out=folder
    )


# ----------------------------------------------------------------------------------------------- run state
@case("resume-with-nothing")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run("--resume"), ("nothing to resume", "run without --resume"))


@case("resume-on-search-command")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--resume", command="search"),
        ("'diffora search' does not take --resume (an option of diffora run)", "diffora search --help"),
    )


@case("interrupted-run-without-resume")
def _(ctx: Ctx) -> Spec:
    (ctx.out / "checkpoints").mkdir(parents=True)
    (ctx.out / "checkpoints" / "search.pt").write_bytes(b"checkpoint")
    return Spec(ctx.run(), ("holds an interrupted run", "pass --resume"))


class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@case("malicious-checkpoint")
def _(ctx: Ctx) -> Spec:
    marker = ctx.tmp / "pwned"
    (ctx.out / "checkpoints").mkdir(parents=True)
    torch.save(
        {"format": "diffora.checkpoint/1", "phase": "search", "evil": _Payload(marker)},
        ctx.out / "checkpoints" / "search.pt",
    )
    return Spec(
        ctx.run("--resume"), ("refusing to load", "search.pt", "unsupported global", "only load files you trust")
    )


@case("corrupt-checkpoint")
def _(ctx: Ctx) -> Spec:
    (ctx.out / "checkpoints").mkdir(parents=True)
    (ctx.out / "checkpoints" / "search.pt").write_bytes(b"PK\x03\x04 truncated by a crash")
    return Spec(ctx.run("--resume"), ("is not a readable torch file", "re-create it"))


@case("loss-becomes-nan")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--lr", "1e30", "--warmup-ratio", "0", "--epochs", "3"),
        ("the training loss became nan", "lower the learning rate (--lr)", "last good checkpoint"),
        leaves="checkpoints",
    )


@case("search-loss-becomes-nan")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--search-lr", "1e30", "--checkpoint-every", "1"),
        ("loss became nan", "--search-lr", "last good checkpoint"),
        leaves="checkpoints",
    )


# --------------------------------------------------------------------------------------- records and adapters
@case("dam-not-json")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--dam", ctx.file("dam.json", "{ not json"), command="train"), ("is not valid json", "pass a dam.json")
    )


@case("dam-missing")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--dam", str(ctx.tmp / "s" / "dam.json"), command="train"),
        ("does not exist", "written by 'diffora search'"),
    )


@case("dam-not-a-search-record")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--dam", ctx.file("dam.json", '{"eval": {"accuracy": 0.9}}'), command="train"),
        ("is not a diffora search record", "diffora.dam/1"),
    )


@case("dam-from-different-model")
def _(ctx: Ctx) -> Spec:
    names = [[f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.mlp.down_proj"] for i in range(2)]
    record = {"format": "diffora.dam/1", "grid": {"names": names}, "selection": {"modules": [names[0][0], names[1][1]]}}
    return Spec(
        ctx.run("--dam", ctx.file("dam.json", json.dumps(record)), command="train"),
        ("names module 'model.layers.0.self_attn.q_proj'", "rerun diffora search with this model"),
    )


@case("train-without-dam-or-modules")
def _(ctx: Ctx) -> Spec:
    return Spec(ctx.run(command="train"), ("needs exactly one of --dam", "or --modules"))


@case("unknown-module-name")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.run("--modules", "bert.encoder.layer.7.attention.self.query", command="train"),
        ("'bert.encoder.layer.7.attention.self.query'", "does not have", "pass full module names such as 'bert."),
    )


@case("adapter-not-peft")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.eval(adapter=ctx.folder("notes", **{"readme.txt": "hi"})),
        ("is not a peft adapter folder", "pass out/adapter"),
    )


@case("adapter-config-broken")
def _(ctx: Ctx) -> Spec:
    return Spec(
        ctx.eval(adapter=ctx.folder("broken", **{"adapter_config.json": "{ nope"})),
        ("cannot be read as a peft config", "pass the adapter folder a run wrote"),
    )


@case("adapter-for-another-model")
def _(ctx: Ctx) -> Spec:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = ctx.tmp / "llama-adapter"
    model = AutoModelForCausalLM.from_pretrained(ctx.llama)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return Spec(ctx.eval(adapter=str(folder)), ("does not fit model", str(ctx.bert)))


@case("eval-without-adapter")
def _(ctx: Ctx) -> Spec:
    argv = [a for a in ctx.eval() if a not in ("--adapter", str(ctx.tmp / "adapter"))]
    return Spec(argv, ("diffora eval needs --adapter",))


# ------------------------------------------------------------------------------------------ beyond the table
def test_malicious_checkpoint_not_run(ctx: Ctx, capsys) -> None:
    """--resume on a checkpoint holding a pickle payload refuses it before it runs (and says so in one line)."""
    build = next(c.build for c in CASES if c.name == "malicious-checkpoint")
    spec = build(ctx)
    assert main(spec.argv) == 2
    assert "refusing to load" in capsys.readouterr().err
    marker = ctx.tmp / "pwned"
    assert not marker.exists()
    # control: the payload is real
    torch.load(ctx.out / "checkpoints" / "search.pt", weights_only=False)
    assert marker.exists()


def test_disk_full_at_the_end_keeps_checkpoints_and_resume_finishes(ctx: Ctx, capsys, monkeypatch) -> None:
    """A full disk when the outputs are written leaves OUT/checkpoints; after freeing space, --resume finishes."""
    import diffora.store.io

    real = diffora.store.io.atomic_write_bytes

    def full_for_metrics(path, data):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    argv = ctx.run("--checkpoint-every", "2")
    monkeypatch.setattr(diffora.store.io, "atomic_write_bytes", full_for_metrics)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left on device" in err and "--resume" in err
    assert sorted(p.name for p in ctx.out.iterdir()) == ["checkpoints"]
    monkeypatch.setattr(diffora.store.io, "atomic_write_bytes", real)
    assert main([*argv, "--resume"]) == 0
    assert {p.name for p in ctx.out.iterdir()} == {"adapter", "dam.json", "dam.png", "metrics.json"}


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]], ids=["default", "flag"])
def test_trust_remote_code_is_off_unless_asked(ctx: Ctx, monkeypatch, capsys, flag) -> None:
    import transformers

    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        real = cls.from_pretrained

        def record(*args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "missing")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    assert main(ctx.run("--target-types", "nothing-matches", *flag)) == 2  # fails right after loading
    capsys.readouterr()
    expected = bool(flag)
    assert {name for name, _ in seen} == {"AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(value is expected for _, value in seen), seen


# --------------------------------------------------------------------------------------- config path rules
def test_config_paths_are_relative_to_the_config_file(ctx: Ctx, monkeypatch) -> None:
    from diffora.cli.app import parse

    folder = Path(ctx.folder("project/configs"))
    (folder / "data").mkdir()
    (folder / "c.yaml").write_text(
        "train-file: data/train.csv\neval-file: /abs/dev.csv\noutput-dir: runs/a\nlr: 1e-3\nrank: '4'\n"
    )
    monkeypatch.chdir(ctx.tmp)
    _, opts, _ = parse(["run", "--config", str(folder / "c.yaml")])
    assert opts.train_file == str(folder.resolve() / "data" / "train.csv")
    assert opts.eval_file == "/abs/dev.csv"
    assert opts.output_dir == str(folder.resolve() / "runs" / "a")
    assert (opts.lr, opts.rank) == (1e-3, 4)  # YAML reads 1e-3 as text; converted like the flag would be


@pytest.mark.parametrize("value", ["/tmp/elsewhere", "../sibling", ".", "~/runs", "link/out", "a/../../b"])
def test_config_cannot_write_outside_its_folder(ctx: Ctx, value: str) -> None:
    from diffora.cli.app import parse
    from diffora.errors import ConfigError

    folder = Path(ctx.folder("cfg"))
    (folder / "link").symlink_to(ctx.folder("elsewhere"))
    (folder / "c.yaml").write_text(f"output-dir: '{value}'\n")
    with pytest.raises(ConfigError, match="not below the config file's folder"):
        parse(["run", "--config", str(folder / "c.yaml")])
    # the same value typed on the command line is the user's own choice
    _, opts, _ = parse(["run", "--config", str(folder / "c.yaml"), "--output-dir", value])
    assert opts.output_dir == value
    (folder / "e.yaml").write_text(f"output-file: '{value}'\n")
    with pytest.raises(ConfigError, match="not below the config file's folder"):
        parse(["eval", "--adapter", "a", "--config", str(folder / "e.yaml")])


# ----------------------------------------------------------------------------------------------- subprocesses
def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "diffora.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_no_traceback_without_debug_and_glue_offline_fails_fast(tmp_path, tiny_bert_dir) -> None:
    start = time.perf_counter()
    done = _cli("run", "--task", "sst2", "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "o"))
    seconds = time.perf_counter() - start
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--data-dir" in done.stderr
    # a generous bound: it catches hub retry loops with back-off (minutes), not a slow shared machine (seen: 110 s)
    assert seconds < 300, f"the offline hub fallback took {seconds:.0f}s (network retries?)"
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(tmp_path) -> None:
    done = _cli("run", "--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o"), "--debug")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ModelError" in done.stderr
