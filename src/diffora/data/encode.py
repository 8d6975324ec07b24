"""Tokenize examples into model inputs, and pad them into batches.

The encoders return a plain ``list`` of per-example dicts. A list is a valid map-style
``torch.utils.data.Dataset`` (it has ``__len__`` and ``__getitem__``), so it goes straight into a ``DataLoader``
with the collator from :func:`make_collator`. Token ids stay Python lists until the collator pads them.

* Classification/regression items: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
  makes them) plus ``labels``, a 0-d tensor: int64 class id or float32 score. Pairs are encoded as pairs;
  sequences longer than ``max_length`` are truncated (longest text first).
* Causal LM items: ``input_ids``, ``attention_mask`` and ``labels`` (same length). Labels are ``-100`` on prompt
  tokens, so the loss covers only the response; for plain text every token is scored. An EOS token closes every
  response/text so the model learns to stop.
* Chat items (:class:`~diffora.data.readers.ChatExamples`): the same keys; the conversation is rendered with the
  tokenizer's chat template and labels are ``-100`` everywhere except on the assistant turns (each with the
  template's end-of-turn marker, so the model learns to stop).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, Union

import torch

from diffora.data.readers import ChatExamples, Examples, LMExamples, Message
from diffora.errors import DataError, ModelError

__all__ = [
    "IGNORE_INDEX",
    "encode_causal_lm",
    "encode_chat",
    "encode_classification",
    "ensure_pad_token",
    "make_collator",
]

#: Label value ignored by PyTorch's cross-entropy (and by every Hugging Face model's loss).
IGNORE_INDEX = -100

Item = dict[str, Any]
_CHUNK = 1024  # examples tokenized per call: fast tokenizers batch well, and memory stays bounded


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS token as pad token (decoder-only LMs usually lack one).

    Padding positions are masked out by the attention mask and by ``-100`` labels, so reusing EOS is safe.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; "
                "set tokenizer.pad_token first"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")


def encode_classification(examples: Examples, tokenizer: Any, max_length: int) -> list[Item]:
    """Tokenize ``examples`` (with pairs, if any) for sequence classification or regression."""
    _check_max_length(max_length)
    items: list[Item] = []
    for start in range(0, len(examples), _CHUNK):
        stop = min(start + _CHUNK, len(examples))
        texts = examples.texts[start:stop]
        pairs = None if examples.text_pairs is None else examples.text_pairs[start:stop]
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
        for j in range(stop - start):
            items.append({k: list(enc[k][j]) for k in keys})
    if examples.labels is not None:
        dtype = torch.float32 if examples.is_regression else torch.int64
        for item, label in zip(items, examples.labels, strict=True):
            item["labels"] = torch.tensor(label, dtype=dtype)
    return items


def _bos_id(tokenizer: Any) -> Optional[int]:
    """BOS to put in front, if the tokenizer has its own (GPT-2's BOS *is* its EOS and is not prepended)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos if bos is not None and bos != eos else None


def encode_causal_lm(lm_examples: Union[LMExamples, ChatExamples], tokenizer: Any, max_length: int) -> list[Item]:
    """Tokenize causal-LM examples; see the module docstring for the label layout (chat data: :func:`encode_chat`).

    Each sequence is ``[BOS] prompt response EOS`` (BOS only when the tokenizer has a distinct one). Prompt and
    response are tokenized separately, so the boundary is exact. When the whole does not fit in ``max_length``,
    the response keeps up to half the budget and the prompt loses its *oldest* tokens (the end of a prompt is what
    the response depends on); the response is then cut at the end if still too long.
    """
    if isinstance(lm_examples, ChatExamples):
        return encode_chat(lm_examples, tokenizer, max_length)
    _check_max_length(max_length)
    bos = _bos_id(tokenizer)
    eos = tokenizer.eos_token_id
    prefix = [bos] if bos is not None else []
    suffix = [eos] if eos is not None else []
    items: list[Item] = []
    for start in range(0, len(lm_examples), _CHUNK):
        stop = min(start + _CHUNK, len(lm_examples))
        bodies = tokenizer(lm_examples.texts[start:stop], add_special_tokens=False)["input_ids"]
        prompts = None
        if lm_examples.prompts is not None:
            prompts = tokenizer(lm_examples.prompts[start:stop], add_special_tokens=False)["input_ids"]
        for j, body in enumerate(bodies):
            target = list(body) + suffix
            context = prefix + (list(prompts[j]) if prompts is not None else [])
            budget = max_length
            if len(context) + len(target) > budget:
                keep_target = min(len(target), max(budget - len(context), budget // 2))
                keep_context = budget - keep_target
                # Left-truncate the prompt but keep BOS in front.
                if len(context) > keep_context:
                    head = prefix[:keep_context]
                    tail_len = keep_context - len(head)
                    context = head + (context[len(context) - tail_len :] if tail_len > 0 else [])
                target = target[:keep_target]
            input_ids = context + target
            if prompts is None:
                labels = list(input_ids)  # plain text: every token is scored
            else:
                labels = [IGNORE_INDEX] * len(context) + list(target)
            items.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return items


def _chat_segments(conversation: list[Message], tokenizer: Any, source: str, index: int) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant_turn)`` pieces.

    Each assistant turn is the text between the conversation rendered up to it with the generation prompt and the
    conversation rendered through it, so the role header (e.g. "<|im_start|>assistant") stays unscored and the
    end-of-turn marker is scored. That needs a template that renders every prefix as a prefix of the whole.
    """

    def render(messages: list[Message], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2 raises TemplateError, and templates raise their own exceptions
            detail = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise DataError(
                f"{source} record #{index + 1}: the tokenizer's chat template rejects this conversation "
                f"({detail}); fix the conversation (e.g. the order of roles)"
            ) from None

    segments: list[tuple[str, bool]] = []
    done = ""  # the text already cut into segments
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before, after = render(conversation[:i], True), render(conversation[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise ModelError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')!r} does not render a "
                "conversation turn by turn (an earlier turn changes when a later one is added), so the assistant "
                "turns cannot be told apart; use --prompt-column/--response-column data instead"
            )
        segments += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    whole = render(conversation, False)
    segments.append((whole[len(done) :], False) if whole.startswith(done) else ("", False))
    return [(text, scored) for text, scored in segments if text]


def encode_chat(chat: ChatExamples, tokenizer: Any, max_length: int) -> list[Item]:
    """Render each conversation with the tokenizer's chat template; score the assistant turns only.

    Every piece is tokenized on its own (without added special tokens: the template writes them), so the boundary
    between unscored and scored tokens is exact. A conversation longer than ``max_length`` keeps its first
    ``max_length`` tokens, or, when the first assistant turn ends later than that, the ``max_length`` tokens that
    end with it, so every example keeps at least one scored token.
    """
    _check_max_length(max_length)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"chat data ({chat.source}) needs a tokenizer with a chat template, and "
            f"{getattr(tokenizer, 'name_or_path', 'this one')!r} has none; use an instruct/chat model, or "
            "--prompt-column/--response-column data"
        )
    items: list[Item] = []
    for index, conversation in enumerate(chat.conversations):
        segments = _chat_segments(conversation, tokenizer, chat.source, index)
        pieces = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
        input_ids: list[int] = []
        labels: list[int] = []
        first_end: Optional[int] = None  # where the first assistant turn ends
        for (_, scored), ids in zip(segments, pieces, strict=True):
            input_ids += list(ids)
            labels += list(ids) if scored else [IGNORE_INDEX] * len(ids)
            if scored and first_end is None and ids:
                first_end = len(input_ids)
        if first_end is None:
            raise DataError(
                f"{chat.source} record #{index + 1}: the assistant turns render to no tokens with this "
                "chat template; give them some content"
            )
        if len(input_ids) > max_length:
            stop = max(max_length, first_end)
            input_ids, labels = input_ids[stop - max_length : stop], labels[stop - max_length : stop]
        items.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return items


class _CausalLMCollator:
    """Pads ``input_ids`` with the pad token, ``attention_mask`` with 0 and ``labels`` with -100."""

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: Optional[int] = None
    ) -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch: dict[str, torch.Tensor] = {}
        for key, fill in fills.items():
            rows = []
            for item in items:
                values = [int(v) for v in item[key]]
                pad = [fill] * (length - len(values))
                rows.append(pad + values if self.padding_side == "left" else values + pad)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch


def make_collator(
    tokenizer: Any,
    kind: Optional[Literal["classification", "causal_lm"]] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> Callable[[Sequence[Item]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` that pads a list of encoded items into a batch of tensors.

    ``kind`` picks the layout; left as ``None`` it is detected per batch (sequence labels = causal LM). A
    tokenizer without a pad token gets EOS as its pad token (see :func:`ensure_pad_token`).
    """
    from transformers import DataCollatorWithPadding  # heavy import, only needed here

    ensure_pad_token(tokenizer)
    classification = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
    causal = _CausalLMCollator(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"), pad_to_multiple_of)

    def collate(items: Sequence[Item]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        is_lm = kind == "causal_lm" or (kind is None and isinstance(items[0].get("labels"), (list, tuple)))
        return causal(items) if is_lm else dict(classification(list(items)))

    return collate
