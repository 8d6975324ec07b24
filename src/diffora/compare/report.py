"""``OUT/report.md`` and the plots of a comparison, from ``results.json`` alone.

The statistics here (mean ± sample std over seeds, paired same-seed differences, "beyond the seed spread") are also
what ``benchmarks/render.py`` uses for BENCHMARKS.md, so both say the same thing about the same numbers.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from ..store.io import atomic_write_text


# ------------------------------------------------------------------------------------------------ statistics
def _nums(xs) -> list[float]:
    return [
        x
        for x in xs
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))
    ]


def mean(xs) -> float:
    xs = _nums(xs)
    return statistics.mean(xs) if xs else float("nan")


def std(xs) -> float:
    """Sample standard deviation (nan for fewer than 2 values)."""
    xs = _nums(xs)
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def median(xs) -> float:
    xs = _nums(xs)
    return statistics.median(xs) if xs else float("nan")


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def pm(xs, digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    xs = [x * scale for x in _nums(xs)]
    if not xs:
        return "—"
    s = std(xs)
    return f"{mean(xs):.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{mean(xs):.{digits}f}"


def human(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(int(n))


def paired_stats(a: dict[int, float], b: dict[int, float], higher_is_better: bool = True) -> Optional[dict]:
    """Same-seed comparison of A and B (seed -> score). ``diffs`` are A − B; ``wins`` counts the seeds where A is
    better; ``holds`` says A is better than B by more than the larger of their seed stds (over the shared seeds)."""
    seeds = sorted(set(a) & set(b))
    seeds = [s for s in seeds if _nums([a[s]]) and _nums([b[s]])]
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    a_vals, b_vals = [a[s] for s in seeds], [b[s] for s in seeds]
    sign = 1.0 if higher_is_better else -1.0
    out = {
        "seeds": seeds,
        "diffs": diffs,
        "mean_a": mean(a_vals),
        "mean_b": mean(b_vals),
        "std_a": std(a_vals),
        "std_b": std(b_vals),
        "mean_diff": mean(diffs),
        "std_diff": std(diffs),
        "wins": sum(sign * d > 0 for d in diffs),
    }
    out["margin"] = out["mean_a"] - out["mean_b"]
    out["max_std"] = max([x for x in (out["std_a"], out["std_b"]) if not math.isnan(x)], default=float("nan"))
    out["testable"] = len(seeds) >= 2  # a spread needs two seeds
    out["exceeds"] = out["testable"] and abs(out["margin"]) > out["max_std"]
    out["holds"] = out["testable"] and sign * out["margin"] > out["max_std"]
    return out


def steps_to(curve: list[dict], metric: str, target: Optional[float], higher_is_better: bool = True) -> Optional[int]:
    """The first evaluated step at which ``metric`` reaches ``target``."""
    if target is None:
        return None
    for point in curve:
        value = point.get(metric)
        if value is not None and (value >= target if higher_is_better else value <= target):
            return int(point["step"])
    return None


# ---------------------------------------------------------------------------------------------------- plots
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(label: str) -> str:
    return "-" if label.startswith("diffora") else "--" if label.startswith("random") else ":"


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def plot_curves(
    groups: dict[str, list[dict]],
    metric: str,
    path: Path,
    *,
    title: str,
    baseline: Optional[float] = None,
    target: Optional[float] = None,
    target_label: str = "target",
    colors: Optional[dict] = None,
    xlabel: str = "fine-tuning step (DiffoRA: after its search; step 0 = weights inherited from the search)",
    ylabel: Optional[str] = None,
) -> Path:
    """Mean (over seeds) ``metric`` at every evaluated step, one line per method, band = ±std."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for label, runs in groups.items():
        steps = sorted({p["step"] for r in runs for p in r["curve"]})
        ys, es = [], []
        for s in steps:
            vals = [p.get(metric) for r in runs for p in r["curve"] if p["step"] == s]
            ys.append(mean(vals))
            es.append(std(vals) if len(_nums(vals)) > 1 else 0.0)
        color = (colors or {}).get(label)
        ax.plot(steps, ys, _style(label), marker="o", ms=3, color=color, label=label)
        ax.fill_between(
            steps, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], color=color, alpha=0.08
        )
    if target is not None:
        ax.axhline(target, color="black", lw=0.8, ls="-.")
        ax.text(0, target, f" {target_label}", fontsize=7, va="bottom")
    if baseline is not None:
        ax.axhline(baseline, ls=":", color="grey", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or f"{metric} (mean over seeds, band = ±std)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def plot_score_vs_params(panels: list[dict], path: Path, *, colors: Optional[dict] = None) -> Path:
    """One panel per entry ``{"title", "groups", "metric", "baseline", "ylabel"}``: mean ± std of the final score
    against the trainable parameters (log scale)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 5.2 * len(panels)), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        m = panel["metric"]
        for label, runs in panel["groups"].items():
            x = mean([r["trainable_params"] for r in runs])
            ys = [r["final"].get(m) for r in runs]
            ax.errorbar(
                x,
                mean(ys),
                yerr=std(ys) if len(_nums(ys)) > 1 else None,
                fmt="o",
                capsize=3,
                color=(colors or {}).get(label),
                label=label,
            )
        base = panel.get("baseline")
        if base is not None:
            ax.axhline(base, ls=":", color="grey", lw=1)
            ax.text(ax.get_xlim()[0], base, " majority", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(panel.get("ylabel") or f"{m} (mean ± std over seeds)")
        ax.set_title(panel["title"])
        ax.grid(alpha=0.3)
    legend: dict = {}  # one legend for all panels, below them, so it hides no point
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    ncol = max(1, min(len(legend), 5 if len(panels) > 1 else 3))
    fig.legend(list(legend.values()), list(legend.keys()), fontsize=8, loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (max(len(legend), 1) - 1) // ncol), 1, 1))
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------------- report
def finished_runs(results: dict) -> dict[str, list[dict]]:
    """Finished main fine-tunes per method label, in --methods order, sorted by seed."""
    groups: dict[str, list[dict]] = {m["label"]: [] for m in results.get("methods", [])}
    for jid in results.get("plan", []):
        rec = results["jobs"].get(jid)
        if rec and rec.get("kind") == "finetune" and "error" not in rec:
            groups.setdefault(rec["method"], []).append(rec)
    for runs in groups.values():
        runs.sort(key=lambda r: r["seed"])
    return {k: v for k, v in groups.items() if v}


def reference_method(results: dict) -> Optional[str]:
    """What every other method is compared with: ``diffora`` if it ran, else the first DiffoRA variant, else the
    first method."""
    labels = [m["label"] for m in results.get("methods", [])]
    if "diffora" in labels:
        return "diffora"
    return next(
        (m["label"] for m in results.get("methods", []) if m["family"] == "diffora"), labels[0] if labels else None
    )


def _hib(results: dict) -> bool:
    from ..evaluation.metrics import higher_is_better

    return higher_is_better(results["data"]["main_metric"])


def comparison_sentence(a: str, b: str, p: Optional[dict], metric: str, higher_is_better: bool) -> str:
    """One plain sentence: who is ahead, by how much, on how many seeds, and whether that exceeds the seed spread."""
    if p is None:
        return f"**{a} vs {b}**: no seed finished for both, so there is nothing to compare."
    n = len(p["seeds"])
    margin = p["margin"]
    better = margin > 0 if higher_is_better else margin < 0
    digits = 4 if abs(margin) < 0.1 else 3
    if margin == 0:
        head = f"**{a}** and **{b}** score the same {metric} on average over {n} paired seed{'s' * (n > 1)}"
    else:
        head = (
            f"**{a}** is {'ahead of' if better else 'behind'} **{b}** by {abs(margin):.{digits}f} {metric} on "
            f"average over {n} paired seed{'s' * (n > 1)} ({a} better on {p['wins']}/{n})"
        )
    if not p["testable"]:
        return head + "; with one seed there is no seed spread to judge it against."
    if p["exceeds"]:
        return (
            head + f"; that is more than the seed-to-seed spread ({p['max_std']:.{digits}f}), so the difference "
            "is larger than what changing the seed does."
        )
    return (
        head + f"; that is within the seed-to-seed spread ({p['max_std']:.{digits}f}), so these seeds cannot "
        "tell the two apart."
    )


def _rank_text(runs: list[dict]) -> str:
    r0 = runs[0]
    family = r0.get("family")
    if family == "full":
        return "—"
    if family == "adalora" and r0.get("adalora"):
        return f"{r0['adalora']['init_r']}→{r0['adalora']['target_r']}"
    if family == "lora-matched":
        ranks = sorted({x for r in runs for x in r.get("matched_ranks", [])})
        return "/".join(map(str, ranks)) if ranks else str(r0.get("rank"))
    if family == "eva":
        ranks = [x for r in runs for x in (r.get("eva_ranks") or {}).values()]
        return f"{min(ranks)}–{max(ranks)} (EVA)" if ranks else str(r0.get("rank"))
    return "/".join(map(str, sorted({r.get("rank") for r in runs if r.get("rank") is not None})))


def results_table(results: dict, groups: dict[str, list[dict]]) -> list[str]:
    data = results["data"]
    m = data["main_metric"]
    others = [x for x in data["metrics"] if x != m]
    if data["kind"] == "causal_lm" and "eval_loss" not in others:
        others = ["eval_loss"]
    ref_params = data.get("lora_all_params")
    lora_all = {r["seed"]: r["finetune_seconds"] for r in groups.get("lora-all", [])}
    gpu = any(r.get("peak_gpu_mib") for runs in groups.values() for r in runs)
    head = (
        f"| method | seeds | kept modules | rank | trainable params | % of LoRA-all | **{m}** | "
        + "".join(f"{o} | " for o in others)
        + "search / init s | fine-tune s | (search + fine-tune) / LoRA-all fine-tune | peak RSS MiB | "
        + ("peak GPU MiB | " if gpu else "")
        + "LR |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lr_of = {x["label"]: x for x in results.get("methods", [])}
    for label in [x["label"] for x in results.get("methods", [])]:
        runs = groups.get(label, [])
        failed = sum(
            1
            for r in results["jobs"].values()
            if r.get("kind") == "finetune"
            and "error" in r
            and r.get("id", "").rsplit("@seed", 1)[0] == label
            and r.get("id") in results.get("plan", [])
        )
        if not runs:
            lines.append(f"| {label} | 0{f' ({failed} failed)' if failed else ''} |" + " — |" * (head.count("|") - 3))
            continue
        params = mean([r["trainable_params"] for r in runs])
        ratios = [
            (r.get("search_seconds", 0.0) + r["finetune_seconds"]) / lora_all[r["seed"]]
            for r in runs
            if r["seed"] in lora_all and lora_all[r["seed"]] > 0
        ]
        search = median([r.get("search_seconds") for r in runs]) if any(r.get("search_seconds") for r in runs) else None
        kept = "all" if runs[0].get("family") == "full" else fmt(mean([r["kept_modules"] for r in runs]), 1)
        info = lr_of.get(label, {})
        lr = f"{info['lr']:g}" + (" (tuned)" if "held-out" in str(info.get("lr_source", "")) else "") if info else "—"
        lines.append(
            f"| {label} | {len(runs)}{f' ({failed} failed)' if failed else ''} | {kept} | {_rank_text(runs)} | "
            f"{human(params)} | {fmt(100 * params / ref_params, 1) if ref_params else '—'} | "
            f"{pm([r['final'].get(m) for r in runs], 4)} | "
            + "".join(f"{pm([r['final'].get(o) for r in runs], 4)} | " for o in others)
            + f"{fmt(search, 1) if search else '—'} | {fmt(median([r['finetune_seconds'] for r in runs]), 1)} | "
            f"{fmt(median(ratios), 2) if ratios else '—'} | {fmt(max(r['peak_rss_mib'] or 0 for r in runs), 0)} | "
            + (f"{fmt(max(r.get('peak_gpu_mib') or 0 for r in runs), 0)} | " if gpu else "")
            + f"{lr} |"
        )
    return lines


def paired_section(results: dict, groups: dict[str, list[dict]]) -> list[str]:
    ref = reference_method(results)
    m = results["data"]["main_metric"]
    hib = _hib(results)
    if ref is None or ref not in groups:
        return [f"No run of {ref or 'DiffoRA'} finished, so there are no paired comparisons."]
    lines = [
        f"Each row compares **{ref}** (A) with another method (B) on the seeds both finished: A − B per seed, "
        f"its mean, and how often A is better ({'higher' if hib else 'lower'} {m} is better). *Beyond the seed "
        "spread* means |mean A − mean B| > the larger of the two methods' standard deviations over those seeds.",
        "",
        "| A vs B | per-seed A − B | mean A − B | std of A − B | A better | max seed std | beyond the seed spread? |",
        "|---|---|---|---|---|---|---|",
    ]
    sentences = []
    a = {r["seed"]: r["final"].get(m) for r in groups[ref]}
    for label in groups:
        if label == ref:
            continue
        p = paired_stats(a, {r["seed"]: r["final"].get(m) for r in groups[label]}, hib)
        sentences.append("- " + comparison_sentence(ref, label, p, m, hib))
        if p is None:
            continue
        lines.append(
            f"| {ref} vs {label} | {', '.join(f'{d:+.4f}' for d in p['diffs'])} | {p['mean_diff']:+.4f} | "
            f"{fmt(p['std_diff'], 4)} | {p['wins']}/{len(p['diffs'])} | {fmt(p['max_std'], 4)} | "
            f"{('yes' if p['exceeds'] else 'no') if p['testable'] else 'one seed: no spread'} |"
        )
    return lines + [""] + sentences


def dam_heatmaps(results: dict, out: Path) -> list[Path]:
    """One DAM heatmap per search of the main comparison, with the modules its DiffoRA method kept outlined."""
    from ..method.candidates import DAMGrid
    from ..select.quota import select_modules
    from ..store.record import plot_dam

    opts = results["options"]
    paths = []
    methods = results.get("methods", [])
    for jid, rec in sorted(results["jobs"].items()):
        if rec.get("kind") != "search" or "error" in rec or jid.startswith("tune:") or "record" not in rec:
            continue
        users = [
            m
            for m in methods
            if m["family"] in ("diffora", "lora-matched", "random-ws", "type-prior")
            and _search_label_of(m, opts) == rec.get("label")
        ]
        chosen = next((m for m in users if m["family"] == "diffora"), users[0] if users else None)
        o = {**opts, **(chosen["overrides"] if chosen else {})}
        record = dict(rec["record"])
        grid = DAMGrid.from_dict(record["grid"])
        selection = select_modules(
            grid, rec["scores"][o["selection_score"]], o["keep_ratio"], o["granularity"], rank=o["rank"]
        )
        record["selection"] = selection.to_dict()
        label = "".join(c if c.isalnum() or c in "._=-" else "_" for c in rec.get("label", "default"))
        lr = (rec.get("key") or {}).get("search", {}).get("lr")  # a 'continue' search: one per fine-tuning LR
        name = f"dam_{label}{f'_lr={lr:g}' if lr is not None else ''}_seed{rec['seed']}.png"
        title = (
            f"{results['data']['task']}: {jid} ({rec['steps']} search iterations, {rec['gate_steps']} gate "
            f"steps); kept = {chosen['label'] if chosen else 'rho ' + str(o['keep_ratio'])}"
        )
        paths.append(plot_dam(record, out / name, title=title))
    return paths


def _search_label_of(method: dict, opts: dict) -> str:
    from .methods import SEARCH_KEYS

    # results written before a key existed lack it: such a key cannot differ
    values = {
        **{k: opts[k] for k in SEARCH_KEYS if k in opts},
        **{k: v for k, v in method["overrides"].items() if k in SEARCH_KEYS},
    }
    differ = [f"{k}={values[k]}" for k in SEARCH_KEYS if k in values and values[k] != opts.get(k)]
    return "default" if not differ else ",".join(differ)


def steps_section(results: dict, groups: dict[str, list[dict]]) -> list[str]:
    """Optimiser steps on the weights per method (search weight steps its model inherits + fine-tune steps), and
    which methods took as many as LoRA-all's fine-tune."""
    reference = results["data"]["finetune_steps"]
    lines = ["| method | search steps | fine-tune steps | total | vs LoRA-all's |", "|---|---|---|---|---|"]
    equal, more = [], []
    for label, runs in groups.items():
        if any("total_steps" not in r for r in runs):  # results written before the step counts were recorded
            continue
        total = median([r["total_steps"] for r in runs])
        lines.append(
            f"| {label} | {fmt(median([r['search_steps'] for r in runs]), 0)} | "
            f"{fmt(median([r['finetune_steps'] for r in runs]), 0)} | {fmt(total, 0)} | "
            f"{fmt(total / reference, 2)}× |"
        )
        (equal if all(r["total_steps"] == reference for r in runs) else more).append(label)
    if not equal and not more:
        return []
    text = (
        f"Optimiser steps on the weights each trained model went through: the weight steps of the search it "
        f"inherits its weights from, then its fine-tune. LoRA-all's fine-tune takes {reference}. "
    )
    if equal:
        text += f"At equal total steps: {', '.join(equal)}. "
    if more:
        text += (
            f"Other totals: {', '.join(more)} (the search's weight steps before a fine-tune that restarts, or "
            "compute matching)."
        )
    return [text.strip(), "", *lines]


def timing_lines(timing: dict) -> list[str]:
    med, ra = timing["median_seconds"], timing["ratios"]
    return [
        "Medians of interleaved rounds in one process on the same batches (the first round is warm-up):",
        "",
        "| PEFT LoRA step s | plain fwd+bwd s | DiffoRA weight step s | DiffoRA gate step s | search iteration s | "
        "exported DiffoRA step s | search it. / LoRA step | search it. / (LoRA step + gate step) | "
        "search it. / (LoRA step + fwd+bwd) | exported step / LoRA step |",
        "|" + "---|" * 10,
        f"| {med['lora_step']:.4f} | {med['fwd_bwd']:.4f} | {med['weight_step']:.4f} | {med['gate_step']:.4f} | "
        f"{med['search_iteration']:.4f} | {med['final_step']:.4f} | {ra['search_iteration_over_lora_step']:.2f} | "
        f"{ra['search_iteration_over_lora_step_plus_gate_step']:.2f} | "
        f"{ra['search_iteration_over_lora_step_plus_fwd_bwd']:.2f} | {ra['final_step_over_lora_step']:.2f} |",
        "",
        "A search iteration is one weight step plus one gate step: two forward/backward passes, so about 2× a "
        "LoRA step is its floor.",
    ]


def write_report(results: dict, out: Path) -> Path:
    """Write ``report.md``, ``curves.png``, ``score_vs_params.png`` and the DAM heatmaps into ``out``."""
    out = Path(out)
    data, opts, s = results["data"], results["options"], results["settings"]
    groups = finished_runs(results)
    m = data["main_metric"]
    base = (data.get("majority_baseline") or {}).get(m)
    where = (
        f"{data['eval_rows']:,} rows held out from the training data (the eval set was not used)"
        if data["eval_set"] != "eval"
        else f"{data['eval_rows']:,} eval rows"
    )
    lines = [
        f"# diffora compare: {data['task']} on `{opts['model']}`",
        "",
        "Every method ran through the same data, seeds, schedule and training loop (`diffora.train.finetune`): "
        f"{data['train_rows']:,} training rows, scored on {where}; {data['finetune_steps']} fine-tuning steps "
        f"({opts['epochs']:g} epoch(s), batch {opts['batch_size']}, max length {opts['max_length']}, AdamW, "
        f"linear warm-up {opts['warmup_ratio']:g} then linear decay), evaluated every "
        f"{data['eval_every'] or 'epoch'} step(s); seeds {', '.join(map(str, s['seeds']))}. Scores are the "
        f"**last** evaluation{' (--keep-best: the best one, picked on the scored rows)' if opts['keep_best'] else ''},"
        " mean ± sample std over seeds. DiffoRA's time includes its search, EVA's its SVD initialisation.",
        "",
        f"Model: {data['candidates']} candidate modules ({data['grid']['layers']} layers × "
        f"{', '.join(data['grid']['types'])}); LoRA rank {opts['rank']}, alpha {opts['alpha']:g}. "
        f"LoRA on all candidates has {data['lora_all_params']:,} trainable parameters (with the task head).",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    if base is not None:
        lines += [f"Majority-class {m}: {base:.4f}.", ""]
    lines += ["## Results", "", *results_table(results, groups), ""]
    lines += ["## Paired differences", "", *paired_section(results, groups), ""]
    steps = steps_section(results, groups)
    if steps:
        lines += ["## Optimiser steps", "", *steps, ""]
    if results.get("lr_choice"):
        c = results["lr_choice"]
        seeds = c.get("seeds") or [c["seed"]]
        on = (
            f"seed {seeds[0]}"
            if len(seeds) == 1
            else f"seeds {', '.join(map(str, seeds))}; each LR's score is the mean over them"
        )
        grown = (
            f" While a method's best LR was the largest or smallest tried, one more beyond it was tried (at most "
            f"{c['max_extensions']} times)."
            if c.get("max_extensions")
            else ""
        )
        lines += [
            "## Learning rates chosen on held-out training rows",
            "",
            f"Each method trained at its default LR times {', '.join(f'{f:g}' for f in s['tune_lr_factors'])} on "
            f"the training rows left after holding out {c['holdout_rows']:,} ({on}), scored on the "
            f"held-out rows ({c['metric']}); the best LR was then used above.{grown} The eval set played no "
            "part.",
            "",
            "| method | default LR | tried: held-out score | chosen |",
            "|---|---|---|---|",
        ]
        for label, row in c["methods"].items():
            tried = ", ".join(f"{lr}: {v:.4f}" for lr, v in row["tried"].items()) or row.get("note", "—")
            edge = " (edge of the grid)" if row.get("interior") is False else ""
            lines.append(f"| {label} | {row['default']:g} | {tried} | {row['chosen']:g}{edge} |")
        lines.append("")
    if results.get("timing"):
        lines += ["## Step-time ratios", "", *timing_lines(results["timing"]), ""]
    failed = [r for jid, r in results["jobs"].items() if "error" in r]
    if failed:
        lines += [
            "## Failed jobs",
            "",
            *[f"- `{r['id']}`: {r['error']}" for r in failed],
            "",
            "Rerun the same command to retry them; finished jobs are kept.",
            "",
        ]
    if results.get("skipped"):
        lines += [
            "## Not run",
            "",
            f"`--max-minutes` ran out before {len(results['skipped'])} job(s): "
            + ", ".join(f"`{j}`" for j in results["skipped"])
            + ". Rerun the same command to run them.",
            "",
        ]
    images = []
    if groups:
        plot_curves(groups, m, out / "curves.png", title=f"{data['task']}: learning curves", baseline=base)
        plot_score_vs_params(
            [{"title": data["task"], "groups": groups, "metric": m, "baseline": base}], out / "score_vs_params.png"
        )
        images += [("learning curves", "curves.png"), ("score vs trainable parameters", "score_vs_params.png")]
    images += [(f"DAM {p.stem}", p.name) for p in dam_heatmaps(results, out)]
    if images:
        lines += ["## Plots", "", *[f"![{alt}]({name})\n" for alt, name in images]]
    machine, versions = results["machine"], results["versions"]
    lines += [
        "## Machine and versions",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {machine.get('memory_gib')} GiB"
        + (f", GPUs: {', '.join(machine['gpus'])}" if machine.get("gpus") else ", no GPU")
        + f"; {machine['workers']} worker process(es) × {machine['threads_per_worker'] or 'default'} torch "
        f"thread(s). "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None and k != "src_dirty")
        + f". Wall time of all invocations: {results.get('wall_seconds', 0) / 60:.1f} min.",
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
