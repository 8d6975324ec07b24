"""ResumableLoader: restoring a saved position reproduces the rest of the batch stream exactly, at any point,
including the boundary right after an epoch's last batch (streams are read the way the search reads them)."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from diffora.method.search import _cycle
from diffora.store.checkpoint import ResumableLoader


def _loader(rows=10):
    return DataLoader(list(range(rows)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(4))


def _take(stream, n):
    return [b.tolist() for b in itertools.islice(stream, n)]


# 10 rows: 4 batches per epoch, the last one partial (4 and 8 end an epoch). 9 rows: 3 full batches (3, 6 and 9 end
# an epoch); there the sampler draws from the generator once more only after its last index, which a checkpoint
# taken right after the epoch's last batch must include (the cause of the SIGTERM-resume mismatch).
@pytest.mark.parametrize("rows", [10, 9])
@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 5, 6, 8, 9])
def test_resume_continues_the_same_stream(rows, consumed):
    reference = _take(_cycle(ResumableLoader(_loader(rows))), 14)
    first = ResumableLoader(_loader(rows))
    head = _take(_cycle(first), consumed)
    second = ResumableLoader(_loader(rows))
    second.load_state_dict(first.state_dict())
    tail = _take(_cycle(second), 14 - consumed)
    assert head + tail == reference
