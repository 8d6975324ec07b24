"""One rank of the 2-process DiffoRA Trainer test (launched by tests/test_trainer_integration.py with torchrun).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/ddp_trainer_worker.py OUT_DIR``

Every rank runs ``train_with_diffora`` with plain ``transformers.Trainer`` instances (gloo, CPU) on the same tiny BERT
and writes ``OUT_DIR/rank{R}.json`` with what it saw: its local (pre-all-reduce) gate gradients, the averaged gate
gradients the gate optimiser stepped with, the final betas, the selection, the gate rows it drew (as token tuples)
and a digest of the trained adapter tensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_model  # noqa: E402

from diffora import DiffoRAConfig  # noqa: E402
from diffora.integrations import train_with_diffora  # noqa: E402

transformers.logging.set_verbosity_error()


def dataset(n: int = 40, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 64, (length,), generator=g)
        # a learnable signal, so gradients are not noise only: the label is whether token 5 appears
        label = int((ids == 5).any()) if i % 3 else int(ids[0] > 32)
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": torch.tensor(label)}
        )
    return rows


def main(out_dir: str) -> None:
    out = Path(out_dir)
    local: list = []
    reduced: list = []

    def make_trainer(model, phase):
        if phase.name == "search":
            beta = phase.search.gates.beta
            beta.register_hook(lambda grad: local.append(grad.detach().clone().tolist()))  # this rank's own gradient
            # what the gate optimiser steps with: the gradient after DAMSearch.gate_step's all-reduce
            phase.search.gate_optimizer.register_step_pre_hook(
                lambda optimizer, args, kwargs: reduced.append(beta.grad.detach().clone().tolist())
            )
        args = TrainingArguments(
            output_dir=phase.output_dir(out / "trainer"),
            use_cpu=True,
            ddp_backend="gloo",
            report_to=[],
            max_steps=phase.max_steps,
            per_device_train_batch_size=4,
            per_device_eval_batch_size=3,
            learning_rate=1e-2,
            save_strategy="no",
            logging_steps=100,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        return Trainer(model=model, args=args, train_dataset=phase.train_dataset, eval_dataset=phase.eval_dataset)

    config = DiffoRAConfig(gate_warmup_steps=1, gate_lr=0.1, seed=0)
    model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    run = train_with_diffora(make_trainer, model, dataset(), search_steps=5, max_steps=8, diffora_config=config)

    callback = run.search_callback
    loader = callback.gate_dataloader
    gate_rows = sorted(
        {
            ",".join(str(int(t)) for t in loader.dataset[i]["input_ids"])
            for batch in callback.gate_batches
            for i in batch
        }
    )
    adapter = {n: p.detach() for n, p in run.model.named_parameters() if p.requires_grad}
    digest = {n: [float(p.sum()), float((p * p).sum())] for n, p in sorted(adapter.items())}
    result = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "distributed": dist.is_initialized(),
        "gate_rows": gate_rows,
        "local_gate_grads": local,
        "reduced_gate_grads": reduced,
        "betas": run.search.gates.beta.detach().tolist(),
        "selection": run.selection.modules,
        "gate_steps": run.search.gate_steps,
        "finetune_steps": run.trainer.state.global_step,
        "record_world_size": run.record["world_size"],
        "adapter_digest": digest,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
