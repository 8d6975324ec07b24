"""Two CPU processes (gloo) running ``DAMSearch`` steps; launched by tests/test_search_ddp.py.

Usage: ``python tests/search_ddp_worker.py MODES OUT_DIR PORT``; MODES is a comma-separated list of scenarios, run
one after the other on fresh searches in one process group:

* ``agree``: both ranks search the same tiny BERT on *different* data shards for a few steps (with 2 micro-batches
  per step): final betas and LoRA/head weights, plus the local and the reduced gradients of one weight and gate
  step;
* ``nan-weight`` / ``nan-gate``: rank 1 (weight loss at weight step 3) or rank 0 (gate loss at gate step 2) returns
  NaN; the error every rank raised.

Every rank writes ``rank{R}.json`` = ``{mode: what it saw}`` (``error`` when it raised a ``TrainingError``).
Collectives time out after 60 s, so a rank left waiting in one fails instead of hanging the test.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_batch, tiny_model  # noqa: E402

from diffora import DiffoRAConfig, TrainingError, prepare_search  # noqa: E402
from diffora.method.search import default_loss  # noqa: E402


def scenario(rank: int, mode: str) -> dict:
    """One search under ``mode``; what this rank saw."""
    result: dict = {}
    try:
        model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        holder: list = []

        def loss_fn(m, batch):
            loss = default_loss(m, batch)
            search = holder[0]
            in_gate_step = search.gates.beta.requires_grad  # weight steps switch it off
            if mode == "nan-weight" and rank == 1 and not in_gate_step and search.weight_steps == 3:
                return loss * float("nan")
            if mode == "nan-gate" and rank == 0 and in_gate_step and search.gate_steps == 2:
                return loss * float("nan")
            return loss

        config = DiffoRAConfig(rank=4, gate_warmup_steps=1, gate_lr=0.1, weight_lr=1e-2, max_grad_norm=None)
        search = prepare_search(model, config, loss_fn=loss_fn)
        holder.append(search)
        probe = next(p for n, p in search.model.named_parameters() if "lora_A" in n)
        local_weight: list = []
        local_gate: list = []
        probe.register_hook(lambda g: local_weight.append(g.detach().clone()))
        search.gates.beta.register_hook(lambda g: local_gate.append(g.detach().clone()))
        reduced: dict = {}

        def callback(s, step):
            if step == 1:  # the first gate step ran at step 1 (warm-up 1)
                reduced["weight"] = probe.grad.detach().clone().tolist()
                reduced["gate"] = s.gates.beta.grad.detach().clone().tolist()

        # every rank its own shard: different seeds
        weight_data = [random_batch(n=4, seed=100 + 10 * rank + i) for i in range(4)]
        gate_data = [random_batch(n=4, seed=200 + 10 * rank + i) for i in range(4)]
        if mode == "agree":
            search.fit(weight_data, gate_data, steps=4, progress=False, accumulation_steps=2, callback=callback)
            # iteration 1: weight micro-batches 3 and 4, gate micro-batches 1 and 2 (no gate step at iteration 0)
            result["local_weight"] = [g.tolist() for g in local_weight[2:4]]
            result["local_gate"] = [g.tolist() for g in local_gate[0:2]]
            result["reduced"] = reduced
            result["hook_calls"] = [len(local_weight), len(local_gate)]
        else:
            search.fit(weight_data, gate_data, steps=6, progress=False)
        result["betas"] = search.gates.beta.detach().tolist()
        result["weights"] = {n: p.detach().tolist() for n, p in search.model.named_parameters() if p.requires_grad}
    except TrainingError as exc:
        result["error"] = str(exc)
    return result


def run(rank: int, modes: list[str], out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    results = {"rank": rank}
    for mode in modes:
        results[mode] = scenario(rank, mode)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    mode_arg, out_arg, port_arg = sys.argv[1:4]
    Path(out_arg).mkdir(parents=True, exist_ok=True)
    mp.spawn(run, args=(mode_arg.split(","), out_arg, port_arg), nprocs=2, join=True)
