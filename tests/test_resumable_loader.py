"""ResumableLoader: restoring a saved position reproduces the rest of the batch stream exactly, at any point,
including the boundary right after an epoch's last batch (streams are read the way the search reads them)."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from diffora.checkpoint import ResumableLoader
from diffora.search import _cycle


def _loader():
    return DataLoader(list(range(10)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(4))


def _take(stream, n):
    return [b.tolist() for b in itertools.islice(stream, n)]


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 5, 8, 9])  # 4 batches per epoch: 4 and 8 end an epoch
def test_resume_continues_the_same_stream(consumed):
    reference = _take(_cycle(ResumableLoader(_loader())), 14)
    first = ResumableLoader(_loader())
    head = _take(_cycle(first), consumed)
    second = ResumableLoader(_loader())
    second.load_state_dict(first.state_dict())
    tail = _take(_cycle(second), 14 - consumed)
    assert head + tail == reference
