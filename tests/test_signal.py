"""The search carries information: on a task only one module type can solve, that type's gates rank highest.

Toy transformer-like stack (any model with an ``nn.ModuleList`` of blocks is a valid DiffoRA target)::

    h_0 = x            (x[:, 0] = 0; the label is sign(w . x[:, 1:]))
    h_l = h_{l-1} + solver_l(h_{l-1}) + distractor_l(z)      (z: noise independent of the label)
    logits = [h_L[:, 0], -h_L[:, 0]]

Base weights are zero, so the base model predicts nothing. A LoRA on ``solver`` can write ``w . x`` into coordinate
0 and solve the task; a LoRA on ``distractor`` only sees noise and can only hurt. A correct search must push every
solver gate above every distractor gate; a search that learns nothing (or the wrong sign, or gates wired to the
wrong modules) fails this test.
"""

import torch
from torch import nn

from diffora import DiffoRAConfig, choose_modules, prepare_search


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.solver = nn.Linear(dim, dim, bias=False)
        self.distractor = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.solver.weight)
        nn.init.zeros_(self.distractor.weight)


class ToyModel(nn.Module):
    def __init__(self, dim: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyBlock(dim) for _ in range(layers))

    def forward(self, x, z, labels=None):
        h = x
        for block in self.layers:
            h = h + block.solver(h) + block.distractor(z)
        logits = torch.stack([h[:, 0], -h[:, 0]], dim=-1)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _batches(n_batches: int, seed: int, dim: int = 8, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(-1.0, 1.0, dim - 1)
    out = []
    for _ in range(n_batches):
        x = torch.randn(size, dim, generator=g)
        x[:, 0] = 0.0
        z = torch.randn(size, dim, generator=g) * 2.0
        labels = (x[:, 1:] @ w > 0).long()
        out.append({"x": x, "z": z, "labels": labels})
    return out


def test_search_ranks_the_only_useful_module_type_highest():
    torch.manual_seed(0)
    search = prepare_search(
        ToyModel(),
        DiffoRAConfig(
            rank=2,
            alpha=2,
            modules_to_save=[],
            gate_warmup_steps=10,
            weight_lr=1e-2,
            gate_lr=5e-2,
            keep_ratio=0.5,
            granularity="global",
        ),  # the default score
    )
    assert search.grid.labels == ["solver", "distractor"]
    search.fit(_batches(16, seed=1), _batches(8, seed=2), steps=120, progress=False)
    gates = torch.tensor(search.gate_values())
    solver, distractor = gates[:, 0], gates[:, 1]
    assert solver.min() > distractor.max(), gates
    assert choose_modules(search).modules == [f"layers.{i}.solver" for i in range(3)]
    # gates start at 1 and the distractors' move furthest (down): |movement| would keep the wrong modules
    assert choose_modules(search, score="movement").modules != [f"layers.{i}.solver" for i in range(3)]
    # and the loss really went down: the kept branches learned the task
    assert search.history.weight_losses[-1] < 0.5 * search.history.weight_losses[0]
