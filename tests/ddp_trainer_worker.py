"""One rank of the 2-process DiffoRATrainer test (launched by tests/test_trainer_integration.py with torchrun).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/ddp_trainer_worker.py OUT_DIR``

Every rank trains the same tiny BERT with DiffoRATrainer (gloo, CPU) and writes ``OUT_DIR/rank{R}.json`` with what it
saw: its local (pre-all-reduce) gate gradients, the averaged gate gradients the gate optimiser stepped with, the
final betas, the selection, the gate rows it drew and a digest of the trained adapter tensors.
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
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_model  # noqa: E402

from diffora import DiffoRAConfig  # noqa: E402
from diffora.integrations import DiffoRATrainer  # noqa: E402

transformers.logging.set_verbosity_error()


def dataset(n: int = 48, length: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 64, (length,), generator=g)
        # a learnable signal, so gradients are not noise only: the label is whether token 5 appears
        label = int((ids == 5).any()) if i % 3 else int(ids[0] > 32)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                     "labels": torch.tensor(label)})
    return rows


class RecordReducedGrad(TrainerCallback):
    """Runs after DiffoRATrainer's own callback: beta.grad then holds the all-reduced gradient of the gate step."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref
        self.reduced: list[list[list[float]]] = []

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer_ref[0]
        beta = trainer.search.gates.beta
        if trainer.phase == "search" and state.global_step > trainer.diffora_config.gate_warmup_steps:
            self.reduced.append(beta.grad.detach().clone().tolist())
        return control


def main(out_dir: str) -> None:
    out = Path(out_dir)
    args = TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=True, ddp_backend="gloo", report_to=[], max_steps=8,
        per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", logging_steps=100,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    config = DiffoRAConfig(gate_warmup_steps=1, gate_lr=0.1, seed=0)
    ref: list = []
    recorder = RecordReducedGrad(ref)
    trainer = DiffoRATrainer(tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), args,
                             train_dataset=dataset(), diffora_config=config, search_steps=5, callbacks=[recorder])
    ref.append(trainer)
    local: list = []
    trainer.search.gates.beta.register_hook(lambda grad: local.append(grad.detach().clone().tolist()))
    gate_rows = trainer._gate_rows(0)
    trainer.train()

    adapter = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    digest = {n: [float(p.sum()), float((p * p).sum())] for n, p in sorted(adapter.items())}
    result = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "distributed": dist.is_initialized(),
        "gate_rows": gate_rows,
        "local_gate_grads": local,
        "reduced_gate_grads": recorder.reduced,
        "betas": trainer.search.gates.beta.detach().tolist(),
        "selection": trainer.selection.modules,
        "gate_steps": trainer.search.gate_steps,
        "adapter_digest": digest,
        "phase": trainer.phase,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
