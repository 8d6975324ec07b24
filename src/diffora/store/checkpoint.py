"""Checkpoints that let an interrupted search or fine-tuning continue *exactly* where it stopped.

A checkpoint holds everything the next step depends on: trainable weights, betas, both optimisers and the
scheduler, the Python/NumPy/torch RNG states, each data loader's position (its generator state at the start of the
epoch plus the number of batches already consumed), step counters and histories. It is one file per phase,
``OUT/checkpoints/{search,finetune}.pt``, written atomically (temporary file, fsync, rename): a crash mid-write leaves
the previous checkpoint valid. It is read back with ``torch.load(weights_only=True)``, which cannot execute code.

SIGINT/SIGTERM do not kill a run mid-step: the loop finishes the step, writes a checkpoint and stops with
:class:`Interrupted`. ``kill -9`` loses at most the steps since the last periodic checkpoint.
"""

from __future__ import annotations

import io
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from ..errors import DiffoRAError
from ..runtime import capture_rng_state, restore_rng_state
from .io import atomic_write_bytes, torch_load_safe

FORMAT = "diffora.checkpoint/1"


class Interrupted(DiffoRAError):
    """The run was stopped by a signal after writing a checkpoint."""


class ResumableLoader:
    """Wraps a single-process ``DataLoader`` (with a seeded ``generator``) so its position can be saved and restored.

    Restoring sets the generator back to its state at the start of the interrupted epoch, so the same permutation is
    drawn, and skips the batches that were already consumed.
    """

    def __init__(self, loader: DataLoader) -> None:
        if not isinstance(getattr(loader, "generator", None), torch.Generator):
            raise ValueError("ResumableLoader needs a DataLoader built with generator=torch.Generator()")
        self.loader = loader
        self.epoch = 0
        self.position = 0
        self._epoch_start: Optional[torch.Tensor] = None
        self._resume = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        generator = self.loader.generator
        if self._resume and self._epoch_start is not None:
            generator.set_state(self._epoch_start)
            skip = self.position
        else:
            self._epoch_start = generator.get_state()
            skip = 0
        self._resume = False
        self.position = skip
        # Look one batch ahead so the loader is exhausted *before* the epoch's last batch is handed out: when the
        # rows divide evenly into batches, torch's RandomSampler draws once more from the generator only when it is
        # advanced past its last index, and a checkpoint taken after the last batch must already include that draw.
        iterator, done = enumerate(self.loader), object()
        current = next(iterator, done)
        while current is not done:
            following = next(iterator, done)
            index, batch = current
            if index >= skip:
                self.position = index + 1
                yield batch
            current = following
        self.epoch += 1
        self.position = 0
        self._epoch_start = None

    def state_dict(self) -> dict[str, Any]:
        if self._epoch_start is not None and self.position >= len(self.loader):
            # The epoch is used up: resume at the start of the next one. The generator has not been drawn from since
            # this epoch's permutation, so its current state is exactly where the next epoch will start.
            return {"epoch": self.epoch + 1, "position": 0, "epoch_start": self.loader.generator.get_state()}
        return {
            "epoch": self.epoch,
            "position": self.position,
            "epoch_start": self._epoch_start if self._epoch_start is not None else torch.empty(0, dtype=torch.uint8),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        start = state["epoch_start"]
        self._epoch_start = start if start.numel() else None
        self._resume = self._epoch_start is not None


class Checkpointer:
    """Saves and loads the phase checkpoints of one run; also turns SIGINT/SIGTERM into a clean stop."""

    def __init__(self, folder: Path, every: int = 50, enabled: bool = True) -> None:
        self.folder = Path(folder)
        self.every = every
        self.enabled = enabled and every > 0
        self.stop_requested = False

    def path(self, phase: str) -> Path:
        return self.folder / f"{phase}.pt"

    def due(self, step: int) -> bool:
        return self.enabled and (self.stop_requested or step % self.every == 0)

    def save(self, phase: str, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        payload = {"format": FORMAT, "phase": phase, "rng": capture_rng_state(), **state}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(self.path(phase), buffer.getvalue())
        if self.stop_requested:
            raise Interrupted(
                f"stopped by a signal; a checkpoint was written to {self.path(phase)}: rerun the same command with "
                "--resume to continue"
            )

    def load(self, phase: str) -> Optional[dict[str, Any]]:
        path = self.path(phase)
        if not path.exists():
            return None
        state = torch_load_safe(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("phase") != phase:
            found = state.get("format") if isinstance(state, dict) else None
            raise DiffoRAError(
                f"{path} is not a diffora {phase} checkpoint (format {found!r}, this version reads {FORMAT!r}); "
                "delete it or start over with --overwrite"
            )
        return state

    @staticmethod
    def restore_rng(state: dict[str, Any]) -> None:
        restore_rng_state(state["rng"])

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        """While active, SIGINT/SIGTERM request a checkpoint-and-stop at the next step boundary."""
        if not self.enabled:
            yield
            return

        def request_stop(signum: int, _frame: Any) -> None:
            self.stop_requested = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
