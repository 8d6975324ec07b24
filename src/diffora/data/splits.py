"""The seeded split of the training rows into the weight split and the gate split (shared by the CLI, the
integrations and the benchmarks, so all of them search on the same rows for the same seed)."""

from __future__ import annotations

import torch

from ..errors import DataError


def split_for_search(n: int, gate_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(weight_rows, gate_rows)``: a seeded ``gate_fraction`` of ``range(n)`` goes to the gate split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 17)).tolist()
    n_gate = max(1, int(round(gate_fraction * n)))
    if n - n_gate < 1:
        raise DataError(f"{n} training rows are too few to split for the search; add data or lower --gate-fraction")
    return sorted(order[n_gate:]), sorted(order[:n_gate])
