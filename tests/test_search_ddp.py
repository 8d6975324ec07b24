"""Data-parallel search (2 CPU processes, gloo): one all-reduce per step keeps the ranks identical, and a NaN on one
rank stops every rank with the same error instead of hanging the others in a collective."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO

MODES = "agree,nan-weight,nan-gate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("search-ddp")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, str(REPO / "tests" / "search_ddp_worker.py"), MODES, str(out), str(_free_port())]
    # a hang would show up here as a timeout (the worker's collectives also time out after 60 s)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ranks_end_bit_identical_and_step_with_the_average(ranks):
    r0, r1 = ranks[0]["agree"], ranks[1]["agree"]
    assert "error" not in r0 and "error" not in r1
    assert r0["hook_calls"] == r1["hook_calls"] == [8, 6]  # 4 iterations x 2 micro-batches; 3 gate steps x 2
    assert r0["betas"] == r1["betas"]  # bit for bit
    assert r0["weights"] == r1["weights"]
    assert r0["betas"] != [[0.0] * len(row) for row in r0["betas"]]
    for kind, local in (("weight", "local_weight"), ("gate", "local_gate")):
        sums = [torch.tensor(r[local]).sum(dim=0) for r in (r0, r1)]  # a rank's accumulated gradient
        assert not torch.allclose(sums[0], sums[1]), "different shards must give different local gradients"
        for r in (r0, r1):
            torch.testing.assert_close(torch.tensor(r["reduced"][kind]), (sums[0] + sums[1]) / 2, rtol=1e-5, atol=1e-8)


def test_nan_weight_loss_on_one_rank_stops_all_ranks_alike(ranks):
    errors = [r["nan-weight"].get("error") for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "weight loss became nan at weight step 3 on rank 1" in errors[0]
    assert "\n" not in errors[0]


def test_nan_gate_loss_on_one_rank_stops_all_ranks_alike(ranks):
    errors = [r["nan-gate"].get("error") for r in ranks]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "gate loss became nan at gate step 2 on rank 0" in errors[0]
