"""Shared fixtures: tiny models built from configs (no downloads) and random batches."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 64
REPO = Path(__file__).resolve().parents[1]


def glue_dir() -> Path | None:
    env = os.environ.get("DIFFORA_GLUE_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "glue")
    return next((c for c in candidates if (c / "MRPC" / "train.tsv").exists()), None)


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, num_labels=2, pad_token_id=0)
    if arch == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, **common,
        )
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, max_position_embeddings=64, **common,
        )
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2, **common,
        )
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str, kind: str = "seq_cls", seed: int = 0, attn: str | None = None, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = transformers.AutoModelForSequenceClassification if kind == "seq_cls" else transformers.AutoModelForCausalLM
    extra = {"attn_implementation": attn} if attn else {}
    return cls.from_config(cfg, **extra).eval()


def random_batch(n: int = 6, length: int = 10, seed: int = 1, kind: str = "seq_cls") -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row, so attention masks matter
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq_cls":
        batch["labels"] = torch.randint(0, 2, (n,), generator=g)
    else:
        labels = ids.clone()
        labels[mask == 0] = -100
        batch["labels"] = labels
    return batch


def randomize_lora_b(peft_model: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Give every LoRA B non-zero values, so a branch that is dropped or loaded wrongly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    return tmp_path / "out"
