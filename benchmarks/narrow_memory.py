"""Peak memory of ``diffora.narrow_lora``'s in-place search against one LoRA-all training step, measured in one run.

On CPU the allocator's peak is not observable per step, so the benchmark counts what a step must hold at once:

* model bytes: every distinct parameter/buffer storage reachable from the model (a model copy would double it);
* training state: trainable parameters' gradients + AdamW's two moments (+ the gates' betas, their gradient and Adam
  moments for the search);
* activations: the bytes autograd saves for backward during the step's forward (``torch.autograd.graph.
  saved_tensors_hooks``), the largest of the search's weight and gate forwards.

peak = model + training state + activations. The baseline is the same user ``PeftModel`` (LoRA on all linear maps)
trained one step by plain AdamW; the search is ``DAMSearch`` attached to that very model (what ``narrow_lora`` runs).
The brief's bound: ratio <= 1.1.

    .venv/bin/python benchmarks/narrow_memory.py [--layers 4 --hidden 256 --seq 128 --batch 4]
"""

from __future__ import annotations

import argparse

import torch
import transformers
from peft import LoraConfig, get_peft_model

from diffora import DiffoRAConfig, prepare_search


def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> "SavedBytes":
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ctx.__exit__(*exc)

    def total(self, exclude: int = 0) -> int:
        return sum(self.storages.values()) - exclude


def build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=args.hidden * 3,
        max_position_embeddings=args.seq,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return get_peft_model(
        model,
        LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", use_rslora=True, task_type="CAUSAL_LM"
        ),
    )


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}

    # baseline: one LoRA-all step
    model = build(args).train()
    param_bytes = storage_bytes(list(model.parameters()) + list(model.buffers()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    with SavedBytes() as saved:
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    base_acts = saved.total(exclude=0)
    base_state = storage_bytes(p.grad for p in trainable) + optimizer_bytes(opt)
    baseline = param_bytes + base_state + base_acts
    del model, opt, loss, saved

    # the search, attached in place to the same kind of user PeftModel
    model = build(args).train()
    search = prepare_search(model, DiffoRAConfig(gate_warmup_steps=0, seed=0))
    search_param_bytes = storage_bytes(
        list(model.parameters()) + list(model.buffers()) + list(search.gates.parameters())
    )
    with SavedBytes() as weight_saved:
        search.weight_step(batch)
    with SavedBytes() as gate_saved:
        search.gate_step(batch)
    acts = max(weight_saved.total(), gate_saved.total())
    state = (
        storage_bytes(p.grad for p in search.weight_params if p.grad is not None)
        + optimizer_bytes(search.weight_optimizer)
        + optimizer_bytes(search.gate_optimizer)
        + search.gates.beta.numel() * search.gates.beta.element_size()
    )
    peak = search_param_bytes + state + acts
    mib = 1 / 2**20
    print(f"model: {args.layers} layers x hidden {args.hidden}, seq {args.seq}, batch {args.batch}, r={args.rank}")
    print(f"{'':24}{'params':>10}{'train state':>13}{'activations':>13}{'peak':>10}  (MiB)")
    print(
        f"{'LoRA-all step':24}{param_bytes * mib:10.1f}{base_state * mib:13.1f}{base_acts * mib:13.1f}"
        f"{baseline * mib:10.1f}"
    )
    print(
        f"{'narrow_lora search step':24}{search_param_bytes * mib:10.1f}{state * mib:13.1f}{acts * mib:13.1f}"
        f"{peak * mib:10.1f}"
    )
    print(
        f"ratio search / LoRA-all = {peak / baseline:.3f} (bound 1.1); model copies: "
        f"{search_param_bytes / param_bytes - 1:.3f}x extra parameter bytes"
    )


if __name__ == "__main__":
    main()
