"""The methods ``diffora compare`` knows, and how ``--methods`` entries such as ``diffora[keep_ratio=0.25]`` are
parsed and checked.

A method is a *family* (``diffora``, ``lora-all``, …) plus optional *variant* options in brackets, comma-separated
``key=value`` pairs. The keys are the names of ``diffora run``'s options (``keep_ratio``, ``gate_fraction``,
``rank``…), with underscores or dashes, plus ``lr`` (the method's fine-tuning LR) and EVA's ``eva_rho`` /
``eva_tau``. Each family accepts the keys that change what it does; anything else is a one-line
:class:`~diffora.errors.ConfigError` that lists the keys it takes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError
from ..cli.options import Options, option_kinds

#: options that change the DAM search itself (two methods with equal values share one search per seed)
SEARCH_KEYS = ("rank", "alpha", "lora_dropout", "gate", "order", "gate_fraction", "search_epochs", "search_steps",
               "search_lr", "gate_lr", "gate_warmup_steps", "zero_one_weight")
#: options that change only what is kept from a search
SELECT_KEYS = ("keep_ratio", "granularity", "selection_score", "rank_allocation", "ntk_examples")
LORA_KEYS = ("rank", "alpha", "lora_dropout")
#: variant keys that are not fields of Options: name -> (type, check, message)
EXTRA_KEYS: dict[str, tuple[type, Any, str]] = {
    "lr": (float, lambda v: v > 0, "must be > 0"),
    "eva_rho": (float, lambda v: v >= 1, "must be >= 1 (1: no rank redistribution)"),
    "eva_tau": (float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
}


@dataclass(frozen=True)
class Family:
    name: str
    keys: tuple[str, ...]
    needs_search: bool
    lr_source: str  # "lr" (the LoRA-family --lr), "adalora_lr" or "full_lr"
    what: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("diffora", SEARCH_KEYS + SELECT_KEYS + ("weight_sharing", "lr"), True, "lr",
           "DiffoRA: DAM search, keep the top rho, export with the search's weights (weight sharing), fine-tune"),
    Family("lora-all", LORA_KEYS + ("lr",), False, "lr", "PEFT LoRA on every candidate module at rank r"),
    Family("lora-all-cm", SEARCH_KEYS + ("lr",), True, "lr",
           "compute-matched LoRA-all: every candidate at rank r, trained for DiffoRA's fine-tuning steps plus one "
           "step per forward/backward pass of its search (same seed, same search options), so the search's warm "
           "start is not free compute"),
    Family("lora-matched", SEARCH_KEYS + SELECT_KEYS + ("lr",), True, "lr",
           "LoRA on every candidate, ranks chosen so its LoRA parameters match DiffoRA's (same seed, same options) "
           "within 5%"),
    Family("random", ("keep_ratio", "granularity") + LORA_KEYS + ("lr",), False, "lr",
           "fresh LoRA on random modules at the same rho (same per-layer rule as DiffoRA)"),
    Family("random-ws", SEARCH_KEYS + ("keep_ratio", "granularity", "lr"), True, "lr",
           "random modules (the same draw as `random`) exported from the same search as DiffoRA, with its weights: "
           "separates the choice of modules from the warm start"),
    Family("lora-qv", LORA_KEYS + ("lr",), False, "lr", "PEFT LoRA on the query and value projections of every layer"),
    Family("adalora", LORA_KEYS + ("keep_ratio", "lr"), False, "adalora_lr",
           "PEFT AdaLoRA on every candidate, final rank budget rho x r per module (init 1.5x that)"),
    Family("eva", LORA_KEYS + ("eva_rho", "eva_tau", "lr"), False, "lr",
           "PEFT LoRA on every candidate with EVA init (SVD of the layer inputs on training batches, ranks "
           "redistributed up to eva_rho x r)"),
    Family("full", ("lr",), False, "full_lr", "full fine-tuning: every parameter trainable"),
)}

_METHOD = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)(?:\[(.*)\])?$")


@dataclass(frozen=True)
class Method:
    """One ``--methods`` entry, checked."""

    label: str  # how the report names it, e.g. "diffora[keep_ratio=0.25]"
    family: str
    overrides: tuple[tuple[str, Any], ...]  # variant options, typed, in the order given

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def explicit_lr(self) -> Optional[float]:
        return self.values.get("lr")

    def options(self, base: Options) -> Options:
        """``base`` with this method's Options-valued variant keys applied."""
        changes = {k: v for k, v in self.overrides if k not in EXTRA_KEYS}
        return dataclasses.replace(base, **changes) if changes else base

    def default_lr(self, base: Options, settings: Any) -> float:
        source = FAMILIES[self.family].lr_source
        return float(base.lr if source == "lr" else getattr(settings, source))

    def search_values(self, base: Options) -> dict[str, Any]:
        """The options that define this method's search (for the families that need one)."""
        opts = self.options(base)
        return {k: getattr(opts, k) for k in SEARCH_KEYS}


def family_help() -> str:
    return "; ".join(f"{f.name}: {f.what}" for f in FAMILIES.values())


def _convert(label: str, key: str, text: str) -> Any:
    if key in EXTRA_KEYS:
        kind, check, message = EXTRA_KEYS[key]
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"method '{label}': {key} must be a number, got '{text}'") from None
        if not check(value):
            raise ConfigError(f"method '{label}': {key} {message}, got {text}")
        return value
    kind, is_list, _ = option_kinds()[key]
    if is_list:  # pragma: no cover - no list option is a variant key
        raise ConfigError(f"method '{label}': {key} cannot be set per method")
    if kind is bool:
        low = text.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"method '{label}': {key} must be true or false, got '{text}'")
    try:
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return kind(text)
    except ValueError:
        word = {int: "an integer", float: "a number"}.get(kind, "a string")
        raise ConfigError(f"method '{label}': {key} must be {word}, got '{text}'") from None


def parse_method(text: str, base: Options) -> Method:
    """Parse and check one ``--methods`` entry against ``base`` (the comparison's options)."""
    entry = str(text).strip()
    match = _METHOD.match(entry)
    if not match:
        raise ConfigError(f"cannot read method '{entry}'; write a method name, optionally with options in "
                          "brackets: diffora, 'diffora[keep_ratio=0.25]', 'lora-all[lr=1e-3,rank=4]'")
    name = match.group(1).lower().replace("_", "-")
    if name not in FAMILIES:
        raise ConfigError(f"unknown method '{match.group(1)}' in --methods; choose from {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    pairs: list[tuple[str, str]] = []
    body = (match.group(2) or "").strip()
    for part in [p.strip() for p in body.split(",")] if body else []:
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise ConfigError(f"method '{entry}': '{part}' is not key=value; write e.g. '{name}[{family.keys[0]}=...]'")
        pairs.append((key, value.strip()))
    label = name + (f"[{','.join(f'{k}={v}' for k, v in pairs)}]" if pairs else "")
    seen: set[str] = set()
    overrides = []
    for key, value in pairs:
        if key not in family.keys:
            raise ConfigError(f"method '{label}': unknown option '{key}' for {name}; {name} takes "
                              f"{', '.join(family.keys)}")
        if key in seen:
            raise ConfigError(f"method '{label}' sets {key} twice")
        seen.add(key)
        overrides.append((key, _convert(label, key, value)))
    method = Method(label=label, family=name, overrides=tuple(overrides))
    try:
        method.options(base)  # Options checks every value (and the search and fine-tuning configs it implies)
    except ConfigError as exc:
        raise ConfigError(f"method '{label}': {exc}") from None
    return method


def parse_methods(texts: list[str], base: Options) -> list[Method]:
    methods = [parse_method(t, base) for t in texts]
    labels = [m.label for m in methods]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ConfigError(f"--methods lists '{twice[0]}' twice")
    return methods


def search_label(values: dict[str, Any], base: Options) -> str:
    """A readable name for a search: 'default', or the options that differ from the comparison's."""
    differ = [f"{k}={values[k]}" for k in SEARCH_KEYS if values[k] != getattr(base, k)]
    return "default" if not differ else ",".join(differ)


def search_key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)
