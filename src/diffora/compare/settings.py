"""The options of ``diffora compare`` on top of :class:`diffora.cli.options.Options`: which methods, which seeds, how
many worker processes, the per-method learning rates, the optional learning-rate choice on rows held out from the
training data, and the timing block. Field metadata is the ``--help`` text and the ``--config`` file keys, as for
:class:`~diffora.cli.options.Options`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..method.config import Kind, check_types, field_kinds

#: what ``diffora compare`` runs when ``--methods`` is not given: DiffoRA with the library defaults, LoRA on every
#: candidate, the same at DiffoRA's parameter count, the two random-selection controls and the two adaptive-rank
#: baselines. ``lora-qv`` and ``full`` are cheaper or dearer extras: ask for them by name.
DEFAULT_METHODS = ("diffora", "lora-all", "lora-matched", "random", "random-ws", "adalora", "eva")

#: AdaLoRA's peak LR. Chosen on rows held out from SST-2 *train* (seed 0, MiniLM, one epoch): 5e-4 and 2e-3 stayed
#: at the majority class, 5e-3 reached 0.825, 1e-2 reached 0.834 (benchmarks/results/sst2_adalora_lr.json). Its
#: singular values E start at 0 and their gradient is scaled by the 0.02-std P and Q, so it needs ~20x LoRA's LR.
ADALORA_LR = 1e-2
#: full fine-tuning's peak LR: 5e-4 diverges for a full BERT; BERT's usual range is 2e-5..5e-5.
FULL_LR = 5e-5


@dataclass
class CompareOptions:
    """Options of ``diffora compare`` that ``diffora run`` does not have."""

    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={
            "help": (
                "Methods to compare: diffora, lora-all, lora-all-cm (compute-matched: as many optimiser steps as "
                "DiffoRA's search + fine-tune), lora-matched, random, random-ws, type-prior (DiffoRA's most-kept module"
                " types in every layer, at its parameter count), lora-qv, adalora, eva, full. A method may carry "
                "options as a variant, quoted for the shell: 'diffora[keep_ratio=0.25]', "
                "'diffora[gate_fraction=0.5,gate_lr=0.2]', 'random[keep_ratio=0.25]', 'random[matched=true]' (random "
                "modules at DiffoRA's parameter count), 'random[within_type=true]' (DiffoRA's count per module type, "
                "random layers), 'lora-all[lr=1e-3]'. Default: "
            )
            + " ".join(DEFAULT_METHODS)
            + "."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds; every method runs once per seed (same data, same training order per seed)."},
    )
    workers: int = field(
        default=-1,
        metadata={
            "help": "Parallel worker processes (-1: one per GPU, else 2 on CPU; 0: run every job in this process)."
        },
    )
    eval_points: int = field(
        default=5,
        metadata={
            "help": (
                "Evaluations spread evenly over fine-tuning (the learning curves); --eval-every > 0 overrides it, 0 "
                "evaluates each epoch."
            )
        },
    )
    adalora_lr: float = field(
        default=ADALORA_LR,
        metadata={
            "help": (
                "AdaLoRA's peak learning rate (it needs far more than LoRA: 1e-2 was chosen on rows held out from "
                "train)."
            )
        },
    )
    full_lr: float = field(default=FULL_LR, metadata={"help": "Full fine-tuning's peak learning rate."})
    tune_lr: bool = field(
        default=False,
        metadata={
            "help": (
                "Choose each method's learning rate first, on rows held out from the training data (never the eval "
                "set), among its default LR times --tune-lr-factors; methods with an lr in their variant keep it."
            )
        },
    )
    tune_lr_factors: list[float] = field(
        default_factory=lambda: [0.25, 1.0, 4.0],
        metadata={"help": "--tune-lr: the LRs tried first, as multiples of each method's default LR."},
    )
    tune_lr_seeds: int = field(
        default=2,
        metadata={
            "help": (
                "--tune-lr: seeds each LR is trained with; the LR with the best mean held-out score is chosen (the "
                "first seeds of --seeds, then the next unused ones)."
            )
        },
    )
    tune_lr_extensions: int = field(
        default=3,
        metadata={
            "help": (
                "--tune-lr: while a method's best LR is the largest or smallest tried, try one more beyond it (one grid"
                " step), at most this many times."
            )
        },
    )
    holdout_rows: int = field(
        default=0,
        metadata={
            "help": (
                "Rows held out from the training data for --tune-lr or --eval-on-holdout (0: 20% of the training rows, "
                "at most 2000)."
            )
        },
    )
    eval_on_holdout: bool = field(
        default=False,
        metadata={
            "help": (
                "Score every job on rows held out from the training data instead of the eval set (to choose options "
                "without touching the eval set)."
            )
        },
    )
    timing: bool = field(
        default=False,
        metadata={
            "help": (
                "Also time a DiffoRA search iteration against a PEFT LoRA step, interleaved in one process on the same "
                "batches."
            )
        },
    )
    timing_rounds: int = field(
        default=10,
        metadata={"help": "--timing: interleaved rounds (medians are reported; the first round is warm-up)."},
    )
    max_minutes: float = field(
        default=0.0,
        metadata={
            "help": "Start no new job after this many minutes (0: no limit); rerun the same command to run the rest."
        },
    )

    def __post_init__(self) -> None:
        check_types(self, label=lambda name: "--" + name.replace("_", "-"))  # compare's options are flags only
        if not self.methods:
            raise ConfigError("--methods needs at least one method")
        self.methods = [part for text in self.methods for part in str(text).split()]
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds lists a seed twice: {self.seeds}")
        for seed in self.seeds:
            if not 0 <= seed < 2**32:
                raise ConfigError(f"--seeds must be integers between 0 and {2**32 - 1}, got {seed}")
        if self.workers < -1:
            raise ConfigError(
                f"--workers must be -1 (auto), 0 (in this process) or a number of processes, got {self.workers}"
            )
        for name in ("eval_points", "holdout_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("adalora_lr", "full_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not self.tune_lr_factors or any(not f > 0 for f in self.tune_lr_factors):
            raise ConfigError(f"--tune-lr-factors must be numbers > 0, got {self.tune_lr_factors}")
        if self.tune_lr_seeds < 1:
            raise ConfigError(f"--tune-lr-seeds must be >= 1, got {self.tune_lr_seeds}")
        if self.tune_lr_extensions < 0:
            raise ConfigError(f"--tune-lr-extensions must be >= 0, got {self.tune_lr_extensions}")
        if self.timing_rounds < 1:
            raise ConfigError(f"--timing-rounds must be >= 1, got {self.timing_rounds}")
        if self.max_minutes < 0:
            raise ConfigError(f"--max-minutes must be >= 0, got {self.max_minutes}")
        if self.tune_lr and self.eval_on_holdout:
            raise ConfigError("--tune-lr and --eval-on-holdout both score on the held-out rows; use one of them")


def compare_option_kinds() -> dict[str, Kind]:
    """name -> (element type, is_list, optional) of every :class:`CompareOptions` field."""
    return field_kinds(CompareOptions)
