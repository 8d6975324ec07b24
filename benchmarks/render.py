"""Render ``benchmarks/results/*.json`` (written by ``benchmarks/glue.py``) into ``BENCHMARKS.md`` and PNG plots.

    .venv/bin/python benchmarks/render.py [--results benchmarks/results] [--out BENCHMARKS.md]

Every number in BENCHMARKS.md comes from the JSON files; nothing is typed in by hand. Aggregates are computed here:
mean ± sample std over seeds, medians of times, paired (same-seed) differences, steps-to-target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TASK_ORDER = ["mrpc", "tweets", "sst2"]
METHOD_ORDER = [
    "diffora_rho0.25", "diffora_rho0.5", "diffora_rho0.75", "random_rho0.25", "random_rho0.5", "random_ws", "lora_all_r8",
    "lora_all_matched", "lora_qv_r8", "adalora", "full_ft",
]
LABELS = {
    "diffora_rho0.25": "DiffoRA ρ=0.25", "diffora_rho0.5": "**DiffoRA ρ=0.5** (default)",
    "diffora_rho0.75": "DiffoRA ρ=0.75", "random_rho0.25": "random ρ=0.25", "random_rho0.5": "random ρ=0.5",
    "lora_all_r8": "LoRA all, r=8", "lora_all_matched": "LoRA all, budget-matched r", "lora_qv_r8": "LoRA q,v, r=8",
    "adalora": "AdaLoRA (final rank budget = ρ 0.5)", "full_ft": "full fine-tuning",
    "random_ws": "random ρ=0.5, warm start (search's weights)",
}
TARGET_FRACTION = 0.98


# ----------------------------------------------------------------------------------------------- helpers
def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def pm(xs, digits=3, scale=1.0):
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "—"
    s = std(xs)
    return f"{mean(xs):.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{mean(xs):.{digits}f}"


def human(n):
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(int(n))


def load_results(folder: Path, include_quick: bool) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("format") != "diffora.benchmark/1" or (data.get("quick") and not include_quick):
            continue
        data["_path"] = str(path)
        out.append(data)
    return out


def _commit(report: dict) -> str:
    return report.get("versions", {}).get("git_commit") or "?"


def _budget_key(budget: dict) -> dict:
    """A budget without its unset fields, so files written before a field existed still merge with newer ones."""
    return {k: v for k, v in budget.items() if v is not None}


def merge(reports: list[dict]) -> list[dict]:
    """Reports of the same task, suite and budget (e.g. a supplemental run for another seed) become one report; a
    (method, seed) that two files hold is taken from the first file. Reports with different budgets stay apart."""
    merged: dict[tuple, dict] = {}
    for r in reports:
        # files of one task and suite merge; a file with another budget (e.g. a sweep of its own) stays separate
        key = (r["task"], r["suite"], bool(r.get("quick")), json.dumps(_budget_key(r["budget"]), sort_keys=True))
        if key not in merged:
            merged[key] = dict(r, commands=[(r["command"], r["started"], r.get("wall_seconds", 0), _commit(r))])
            continue
        m = merged[key]
        have = {(x["method"], x["seed"]) for x in m["runs"]}
        m["runs"] = m["runs"] + [x for x in r["runs"] if (x["method"], x["seed"]) not in have]
        have_s = {(x["variant"], x["seed"]) for x in m["searches"]}
        m["searches"] = m["searches"] + [x for x in r["searches"] if (x["variant"], x["seed"]) not in have_s]
        m["errors"] = m["errors"] + r["errors"]
        m["skipped"] = (m.get("skipped") or []) + (r.get("skipped") or [])
        m["seeds"] = sorted(set(m["seeds"]) | set(r["seeds"]))
        m["commands"].append((r["command"], r["started"], r.get("wall_seconds", 0), _commit(r)))
        if not m.get("timing") and r.get("timing"):
            m["timing"] = r["timing"]
    for m in merged.values():
        done = {(x["method"], x["seed"]) for x in m["runs"]}
        seen, skipped = set(done), []
        for j in m.get("skipped") or []:
            if (j.get("method"), j["seed"]) not in seen:
                seen.add((j.get("method"), j["seed"]))
                skipped.append(j)
        m["skipped"] = skipped
        m["seeds"] = sorted({x["seed"] for x in m["runs"]} | {x["seed"] for x in m["searches"]})
    return list(merged.values())


def by_method(report: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in report["runs"]:
        groups.setdefault(run["method"], []).append(run)
    for runs in groups.values():
        runs.sort(key=lambda r: r["seed"])
    return groups


def ordered(groups: dict) -> list[str]:
    known = [m for m in METHOD_ORDER if m in groups]
    return known + sorted(m for m in groups if m not in known)


def main_metric(report: dict) -> str:
    return report["data"]["main_metric"]


def second_metric(report: dict) -> Optional[str]:
    others = [m for m in report["data"]["metrics"] if m != main_metric(report)]
    return others[0] if others else None


def target_value(report: dict) -> Optional[float]:
    groups = by_method(report)
    ref = groups.get(f"lora_all_r{report['budget']['rank']}")
    if not ref:
        return None
    return TARGET_FRACTION * mean([r["final"][main_metric(report)] for r in ref])


def steps_to(run: dict, metric: str, target: Optional[float]) -> Optional[int]:
    if target is None:
        return None
    for point in run["curve"]:
        if point.get(metric) is not None and point[metric] >= target:
            return int(point["step"])
    return None


def steps_summary(runs: list[dict], metric: str, target: Optional[float]) -> tuple[float, int, int]:
    steps = [steps_to(r, metric, target) for r in runs]
    reached = [s for s in steps if s is not None]
    vals = [s if s is not None else math.inf for s in steps]
    return (statistics.median(vals) if vals else math.nan), len(reached), len(steps)


def fmt_steps(med: float, reached: int, n: int) -> str:
    if n == 0:
        return "—"
    head = "not reached" if math.isinf(med) else f"{med:.0f}"
    return f"{head} ({reached}/{n})"


def lora_ft_by_seed(report: dict) -> dict[int, float]:
    ref = by_method(report).get(f"lora_all_r{report['budget']['rank']}", [])
    return {r["seed"]: r["finetune_seconds"] for r in ref}


def wall_ratio(report: dict, runs: list[dict]) -> float:
    ref = lora_ft_by_seed(report)
    ratios = [(r.get("search_seconds", 0.0) + r["finetune_seconds"]) / ref[r["seed"]] for r in runs if r["seed"] in ref]
    return median(ratios)


def paired(report: dict, a: str, b: str) -> Optional[dict]:
    groups = by_method(report)
    if a not in groups or b not in groups:
        return None
    m = main_metric(report)
    sa = {r["seed"]: r["final"][m] for r in groups[a]}
    sb = {r["seed"]: r["final"][m] for r in groups[b]}
    seeds = sorted(set(sa) & set(sb))
    if not seeds:
        return None
    diffs = [sa[s] - sb[s] for s in seeds]
    a_vals, b_vals = [sa[s] for s in seeds], [sb[s] for s in seeds]  # only seeds both methods ran
    out = {
        "seeds": seeds, "diffs": diffs, "mean_a": mean(a_vals), "mean_b": mean(b_vals),
        "std_a": std(a_vals), "std_b": std(b_vals), "mean_diff": mean(diffs), "std_diff": std(diffs),
        "wins": sum(d > 0 for d in diffs),
    }
    out["margin"] = out["mean_a"] - out["mean_b"]
    out["max_std"] = max([x for x in (out["std_a"], out["std_b"]) if not math.isnan(x)], default=float("nan"))
    # a spread needs seeds: with fewer than 2 paired seeds the comparison is not testable
    out["testable"] = len(seeds) >= 2
    out["holds"] = out["testable"] and out["margin"] > out["max_std"]
    return out


def jaccard(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else float("nan")


def selection_stability(report: dict, method: str) -> Optional[float]:
    runs = by_method(report).get(method, [])
    sels = [r["kept_module_names"] for r in runs]
    pairs = [jaccard(sels[i], sels[j]) for i in range(len(sels)) for j in range(i + 1, len(sels))]
    return mean(pairs) if pairs else None


# ----------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {
    "diffora_rho0.25": "#08519c", "diffora_rho0.5": "#3182bd", "diffora_rho0.75": "#9ecae1",
    "random_rho0.25": "#a50f15", "random_rho0.5": "#fb6a4a", "lora_all_r8": "#000000",
    "lora_all_matched": "#737373", "lora_qv_r8": "#31a354", "adalora": "#756bb1", "full_ft": "#e6550d",
    "random_ws": "#8c510a",
}


def plot_params(reports: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 4.2), squeeze=False)
    for ax, report in zip(axes[0], reports):
        m = main_metric(report)
        groups = by_method(report)
        for method in ordered(groups):
            runs = groups[method]
            x = mean([r["trainable_params"] for r in runs])
            ys = [r["final"][m] for r in runs]
            ax.errorbar(x, mean(ys), yerr=std(ys) if len(ys) > 1 else None, fmt="o", capsize=3,
                        color=COLORS.get(method), label=method)
        base = report["data"]["majority_baseline"].get(m)
        if base is not None:
            ax.axhline(base, ls=":", color="grey", lw=1)
            ax.text(ax.get_xlim()[0], base, " majority", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"dev {m} (mean ± std over seeds)")
        ax.set_title(report["task"])
        ax.grid(alpha=0.3)
    legend: dict = {}  # one legend for all panels, below them, so it hides no point
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend.keys()), fontsize=8, loc="lower center",
               ncol=min(len(legend), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(legend) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(report: dict, path: Path) -> Path:
    plt = _plt()
    m = main_metric(report)
    groups = by_method(report)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for method in ordered(groups):
        runs = groups[method]
        steps = sorted({p["step"] for r in runs for p in r["curve"]})
        ys, es = [], []
        for s in steps:
            vals = [p[m] for r in runs for p in r["curve"] if p["step"] == s]
            ys.append(mean(vals))
            es.append(std(vals) if len(vals) > 1 else 0.0)
        style = "-" if method.startswith("diffora") else "--" if method.startswith("random") else ":"
        ax.plot(steps, ys, style, marker="o", ms=3, color=COLORS.get(method), label=method)
        ax.fill_between(steps, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)],
                        color=COLORS.get(method), alpha=0.08)
    target = target_value(report)
    if target is not None:
        ax.axhline(target, color="black", lw=0.8, ls="-.")
        ax.text(0, target, f" target = {TARGET_FRACTION:.0%} of LoRA-all final", fontsize=7, va="bottom")
    base = report["data"]["majority_baseline"].get(m)
    if base is not None:
        ax.axhline(base, ls=":", color="grey", lw=1)
    ax.set_xlabel("fine-tuning step (DiffoRA: after its search; step 0 = weights inherited from the search)")
    ax.set_ylabel(f"{m} (mean over seeds, band = ±std)")
    ax.set_title(f"{report['task']}: learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(report: dict, path: Path) -> Optional[Path]:
    from diffora import plot_dam

    searches = sorted((s for s in report["searches"] if s.get("variant") == "default"), key=lambda s: s["seed"])
    if not searches:
        return None
    s = searches[0]
    return plot_dam(s["record"], path, title=f"{report['task']}: learned DAM, seed {s['seed']} "
                                              f"({s['steps']} search iterations, {s['gate_steps']} gate steps)")


# ---------------------------------------------------------------------------------------------- markdown
def rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out.parent)


def budget_table(reports: list[dict]) -> list[str]:
    lines = ["| task | train rows | eval rows (set) | epochs | fine-tune steps | max len | batch | LR (LoRA / full / AdaLoRA) | "
             "search iterations (warm-up) | seeds | majority baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        b, d = r["budget"], r["data"]
        m = main_metric(r)
        ada = f"{b['adalora_lr']:g}" if b.get("adalora_lr") else "— (per run)"
        lines.append(
            f"| {r['task']}{' (ablations)' if r['suite'] == 'ablations' else ''} | {d['train_rows']:,} | "
            f"{d['eval_rows']:,} ({d['eval_set']}) | {b['epochs']:g} | {d['finetune_steps']} | {b['max_length']} | "
            f"{b['batch_size']} | {b['lr']:g} / {b['full_lr']:g} / {ada} | {d['search_steps']} ({d['search_warmup_steps']}) | "
            f"{', '.join(map(str, r['seeds']))} | {m} {fmt(d['majority_baseline'].get(m))} |")
    return lines


def results_table(report: dict) -> list[str]:
    m, m2 = main_metric(report), second_metric(report)
    groups = by_method(report)
    target = target_value(report)
    ref = groups.get(f"lora_all_r{report['budget']['rank']}")
    ref_params = mean([r["trainable_params"] for r in ref]) if ref else None
    head = (f"| method | kept modules | rank | trainable params | % of LoRA-all | {m} |{' ' + m2 + ' |' if m2 else ''} "
            f"steps to target | search s | fine-tune s | (search+ft) / LoRA-all ft | peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method in ordered(groups):
        runs = groups[method]
        params = mean([r["trainable_params"] for r in runs])
        ranks = sorted({r.get("rank") for r in runs if r.get("rank") is not None})
        rank = "/".join(map(str, ranks)) if method != "full_ft" else "—"
        if method == "adalora" and runs[0].get("adalora"):
            a = runs[0]["adalora"]
            rank = f"{a['init_r']}→{a['target_r']}"
        kept = mean([r["kept_modules"] for r in runs]) if method != "full_ft" else None
        med, reached, n = steps_summary(runs, m, target)
        search = median([r.get("search_seconds") for r in runs]) if runs[0].get("search_seconds") else None
        lines.append(
            f"| {LABELS.get(method, method)} | {fmt(kept, 1) if kept is not None else 'all'} | {rank} | {human(params)} | "
            f"{fmt(100 * params / ref_params, 1) if ref_params else '—'} | {pm([r['final'][m] for r in runs])} | "
            + (f"{pm([r['final'].get(m2) for r in runs])} | " if m2 else "")
            + f"{fmt_steps(med, reached, n)} | {fmt(search, 0) if search is not None else '—'} | "
            f"{fmt(median([r['finetune_seconds'] for r in runs]), 0)} | {fmt(wall_ratio(report, runs), 2)} | "
            f"{fmt(max(r['peak_rss_mib'] for r in runs), 0)} |")
    return lines


def paired_table(report: dict, rhos=(0.25, 0.5)) -> list[str]:
    lines = ["| comparison (same seeds) | per-seed differences | mean diff | std of diff | wins | "
             "mean A − mean B | max(seed std A, seed std B) | A > B by more than the seed std? |",
             "|---|---|---|---|---|---|---|---|"]
    comps = [(f"diffora_rho{r}", f"random_rho{r}") for r in rhos]
    comps += [("diffora_rho0.5", "random_ws"), ("diffora_rho0.5", "adalora"), ("diffora_rho0.5", "lora_all_matched"), ("diffora_rho0.5", "lora_all_r8"),
              ("diffora_rho0.25", "lora_qv_r8")]
    for a, b in comps:
        p = paired(report, a, b)
        if p is None:
            continue
        lines.append(f"| {a} vs {b} | {', '.join(f'{d:+.3f}' for d in p['diffs'])} | {p['mean_diff']:+.3f} | "
                     f"{fmt(p['std_diff'])} | {p['wins']}/{len(p['diffs'])} | {p['margin']:+.3f} | {fmt(p['max_std'])} | "
                     f"{('yes' if p['holds'] else 'no') if p['testable'] else 'not testable (1 seed)'} |")
    return lines


def timing_lines(reports: list[dict]) -> list[str]:
    lines = ["| task | PEFT LoRA step s | plain fwd+bwd s | DiffoRA weight step s | DiffoRA gate step s | "
             "search iteration s | final (ρ=0.5) step s | search it. / LoRA step | search it. / (LoRA step + gate step) | "
             "search it. / (LoRA step + fwd+bwd) | final step / LoRA step |", "|" + "---|" * 11]
    for r in reports:
        t = r.get("timing")
        if not t or "error" in t:
            continue
        med, ra = t["median_seconds"], t["ratios"]
        lines.append(
            f"| {r['task']} | {med['lora_step']:.3f} | {med['fwd_bwd']:.3f} | {med['weight_step']:.3f} | "
            f"{med['gate_step']:.3f} | {med['search_iteration']:.3f} | {med['final_step']:.3f} | "
            f"{ra['search_iteration_over_lora_step']:.2f} | {ra['search_iteration_over_lora_step_plus_gate_step']:.2f} | "
            f"{ra['search_iteration_over_lora_step_plus_fwd_bwd']:.2f} | {ra['final_step_over_lora_step']:.2f} |")
    return lines


def targets(reports: list[dict]) -> list[str]:
    """The six targets of issue #4, judged from the JSON."""
    lines = []
    main = [r for r in reports if r["suite"] == "main"]
    if not main:
        return ["No main-suite results yet."]

    def verdict(ok: Optional[bool]) -> str:
        return "—" if ok is None else ("**holds**" if ok else "**missed**")

    # 1. DiffoRA >= LoRA-all at <= 60% of its trainable params, averaged over tasks
    rows = []
    for r in main:
        g = by_method(r)
        ref = g.get(f"lora_all_r{r['budget']['rank']}")
        if not ref:
            continue
        m = main_metric(r)
        for rho in (0.25, 0.5):
            d = g.get(f"diffora_rho{rho}")
            if d:
                rows.append((r["task"], rho, mean([x["final"][m] for x in d]) - mean([x["final"][m] for x in ref]),
                             mean([x["trainable_params"] for x in d]) / mean([x["trainable_params"] for x in ref])))
    for rho in (0.5, 0.25):
        sel = [x for x in rows if x[1] == rho]
        if sel:
            gap, ratio = mean([x[2] for x in sel]), mean([x[3] for x in sel])
            per = "; ".join(f"{t} {g:+.3f} at {100 * q:.0f}%" for t, _, g, q in sel)
            lines.append(f"1. *DiffoRA ≥ LoRA-all at ≤ 60% of its trainable parameters (mean over tasks)*, ρ={rho}: "
                         f"mean score gap {gap:+.3f} at {100 * ratio:.0f}% of the parameters ({per}) → "
                         f"{verdict(gap >= 0 and ratio <= 0.6)}.")
    # 2. DiffoRA > random at the same rho by more than the seed std; the warm-start control (not in the issue) after it
    for rho, control in ((0.5, "random_rho0.5"), (0.25, "random_rho0.25"), (0.5, "random_ws")):
        parts, oks = [], []
        for r in main:
            p = paired(r, f"diffora_rho{rho}", control)
            if p:
                n = len(p["diffs"])
                parts.append(f"{r['task']} {p['margin']:+.3f} vs std {fmt(p['max_std'])} (wins {p['wins']}/{n} paired seeds)")
                if p["testable"]:
                    oks.append(p["holds"])
        if parts:
            v = ("**not testable** (fewer than 2 paired seeds)" if not oks
                 else f"**holds on {sum(oks)}/{len(oks)} testable task(s)** (the others have < 2 paired seeds)"
                 if len(oks) < len(parts) else verdict(all(oks)) if all(oks) or not any(oks)
                 else f"**holds on {sum(oks)}/{len(oks)} tasks**")
            what = ("random selection" if control.startswith("random_rho") else
                    "random selection with the same warm start (`random_ws`: random modules exported from the same "
                    "search, with its weights; our control, not one of the issue's targets)")
            lines.append(f"2. *DiffoRA > {what} at ρ={rho} by more than the seed std* (means and stds over the "
                         f"seeds both ran): {'; '.join(parts)} → {v}.")
    # 3. steps to target
    parts, oks = [], []
    for r in main:
        g, m, t = by_method(r), main_metric(r), target_value(r)
        if t is None or "diffora_rho0.5" not in g:
            continue
        d = steps_summary(g["diffora_rho0.5"], m, t)
        l = steps_summary(g[f"lora_all_r{r['budget']['rank']}"], m, t)
        rnd = steps_summary(g.get("random_rho0.5", []), m, t)
        ok = d[0] < l[0] and d[0] < rnd[0]
        oks.append(ok)
        parts.append(f"{r['task']}: DiffoRA {fmt_steps(*d)}, LoRA-all {fmt_steps(*l)}, random {fmt_steps(*rnd)}")
    if parts:
        lines.append(f"3. *DiffoRA (ρ=0.5) reaches {TARGET_FRACTION:.0%} of LoRA-all's final score in fewer fine-tuning "
                     f"steps than LoRA-all and random* (median steps, seeds that reached it; DiffoRA's steps do not count "
                     f"its search iterations): {'; '.join(parts)} → "
                     f"{verdict(all(oks)) if all(oks) or not any(oks) else f'**holds on {sum(oks)}/{len(oks)} tasks**'}.")
    # 4. AdaLoRA
    parts, oks = [], []
    for r in main:
        p = paired(r, "diffora_rho0.5", "adalora")
        if p:
            oks.append(p["margin"] >= 0)
            parts.append(f"{r['task']} {p['margin']:+.3f} (seed std {fmt(p['max_std'])}, {len(p['diffs'])} paired seeds)")
    if not parts:
        lines.append("4. *DiffoRA ≥ AdaLoRA at a matched final budget*: AdaLoRA did not run in these results → "
                     "**not measured**.")
    if parts:
        lines.append(f"4. *DiffoRA ≥ AdaLoRA at a matched final budget*: {'; '.join(parts)} → "
                     f"{verdict(all(oks)) if all(oks) or not any(oks) else f'**holds on {sum(oks)}/{len(oks)} tasks**'}.")
    # 5. wall time
    parts, oks = [], []
    for r in main:
        g = by_method(r)
        if "diffora_rho0.5" in g:
            w = wall_ratio(r, g["diffora_rho0.5"])
            oks.append(w <= 1.3)
            parts.append(f"{r['task']} {w:.2f}×")
    if parts:
        lines.append(f"5. *search + fine-tune wall ≤ 1.3× LoRA-all fine-tune wall* (median over seeds, evaluation time "
                     f"excluded): {'; '.join(parts)} → "
                     f"{verdict(all(oks)) if all(oks) or not any(oks) else f'**holds on {sum(oks)}/{len(oks)} tasks**'}.")
    # 6. search step
    parts, oks = [], []
    for r in main:
        t = r.get("timing")
        if t and "ratios" in t:
            a = t["ratios"]["search_iteration_over_lora_step_plus_fwd_bwd"]
            b = t["ratios"]["search_iteration_over_lora_step_plus_gate_step"]
            oks.append(a <= 1.1)
            parts.append(f"{r['task']} {a:.2f}× (against DiffoRA's own gate step: {b:.2f}×)")
    if parts:
        lines.append(f"6. *search iteration ≤ 1.1× (PEFT LoRA step + gate step)*, the gate step's reference cost being a "
                     f"plain forward+backward of the PEFT model: {'; '.join(parts)} → "
                     f"{verdict(all(oks)) if all(oks) or not any(oks) else f'**holds on {sum(oks)}/{len(oks)} tasks**'}.")
    return lines


def ablation_section(report: dict, out: Path, img: Path) -> list[str]:
    m = main_metric(report)
    groups = by_method(report)
    base = "diffora[default]"
    rho = next((r["rho"] for r in report["runs"] if r.get("rho")), None)
    lr_sweep = bool(groups) and all("[lr=" in k for k in groups)
    kind = "Ablations" if base in groups else (
        f"Learning-rate sweep ({', '.join(sorted({k.split('[')[0] for k in groups}))})" if lr_sweep else "Held-out runs")
    lines = [f"### {kind} on {report['task']} (evaluated on {report['data']['eval_rows']} rows held out from *train*"
             f"{f'; ρ={rho}' if rho else ''}; seeds "
             f"{', '.join(map(str, report['seeds']))})", "",
             "Commands: " + "; ".join(f"`{c}` ({st}, {w / 60:.0f} min)" for c, st, w, _ in report["commands"]) + ".", "",
             f"| variant | what changes | seeds | {m} (held-out train split) | paired diff vs default (same seeds) | "
             f"trainable params | search s | kept-module overlap across seeds (Jaccard) |", "|---|---|---|---|---|---|---|---|"]
    cfg = next((x["config"] for x in report.get("searches", []) if x["variant"] == "default"), {})
    ranking = {"gate": "gate value", "movement": "gate movement (absolute gate − initial)"}
    what = {
        "diffora[default]": f"the library defaults when run: {cfg.get('gate', 'sigmoid')} gates, "
                            f"{cfg.get('order', 'first')} order, gate split {cfg.get('gate_fraction', 0.3):g}, "
                            f"per-layer top-ρ, weight sharing, modules ranked by "
                            f"{ranking[cfg.get('selection_score', 'gate')]}",
        "diffora[score=gate]": "rank modules by gate value instead of gate movement (same search as default)",
        "diffora[score=movement]": "rank modules by gate movement instead of gate value (same search as default)",
        "diffora[softmax]": "per-layer softmax gates", "diffora[second_order]": "second-order (unrolled) gate gradient",
        "diffora[gate_fraction_0.5]": "gate split 0.5 of train", "diffora[search_x0.5]": "search half as long",
        "diffora[search_x2]": "search twice as long", "diffora[global]": "global top-ρ discretisation",
        "diffora[budget]": "parameter-budget discretisation", "diffora[re-init]": "no weight sharing (fresh LoRA + head)",
        "random_ws": "random modules, but inheriting the same search's weights",
        "diffora[zero_one_1.0]": "FairDARTS zero-one loss weight 1.0", "diffora[gate_lr_0.2]": "gate LR 0.2 (default 0.05)",
        "random_rho0.25": "random modules, fresh LoRA", "lora_all_r8": "LoRA on all modules",
    }
    for method in groups:
        if method.startswith("adalora[lr="):
            what[method] = f"AdaLoRA (final rank budget = ρ 0.5) at LR {method[len('adalora[lr='):-1]}"
        elif method.startswith("lora_all_r") and "[lr=" in method:
            what[method] = f"LoRA on all modules at LR {method.split('[lr=')[1][:-1]}"
    ref = {r["seed"]: r["final"][m] for r in groups.get(base, [])}
    for method in sorted(groups, key=lambda k: (k != base, not k.startswith("diffora"), k)):
        runs = groups[method]
        diffs = [r["final"][m] - ref[r["seed"]] for r in runs if r["seed"] in ref]
        search = median([r.get("search_seconds") for r in runs]) if runs[0].get("search_seconds") else None
        stab = selection_stability(report, method)
        lines.append(f"| {method} | {what.get(method, '')} | {','.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))} | "
                     f"{pm([r['final'][m] for r in runs])} | "
                     f"{(pm(diffs) if method != base else '—')} | {human(mean([r['trainable_params'] for r in runs]))} | "
                     f"{fmt(search, 0) if search else '—'} | {fmt(stab, 2) if stab is not None else '—'} |")
    if report.get("skipped"):
        lines += ["", "Not run (the `--max-minutes` budget ran out): " + ", ".join(
            f"{j.get('method') or j.get('variant')} seed {j['seed']}" for j in report["skipped"]) + "."]
    return lines


def initial_gate(config: dict) -> float:
    """The gate every search starts from, from its recorded config (as ``DAMGates.initial_values``): every beta
    equals ``gate_init``, so a per-layer softmax (scaled by the row's size) gives 1 and a sigmoid gives
    sigmoid(gate_init / temperature)."""
    if config.get("gate") == "softmax":
        return 1.0
    return 1.0 / (1.0 + math.exp(-float(config.get("gate_init", 0.0)) / float(config.get("temperature", 1.0))))


def gate_diagnostics(report: dict) -> list[str]:
    """What each search variant's gates did: how far they moved, whether they moved up or down, and whether the
    within-layer ranking (what per-layer discretisation uses) agrees between seeds."""
    import itertools

    import numpy as np

    variants: dict[str, list[dict]] = {}
    for s in report.get("searches", []):
        variants.setdefault(s["variant"], []).append(s)
    if not variants:
        return []
    lines = ["| search variant | gate spread (max − min), per seed | mean gate − initial, per seed | "
             "within-layer ranking agreement across seeds (Pearson of row-centred gates, per pair) |",
             "|---|---|---|---|"]
    for variant, searches in variants.items():
        searches = sorted(searches, key=lambda s: s["seed"])
        gates = [np.array(s["gates"], dtype=float) for s in searches]
        init = initial_gate(searches[0]["config"])
        centred = [g - g.mean(axis=1, keepdims=True) for g in gates]
        pairs = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in itertools.combinations(centred, 2)]
        lines.append(f"| {variant} | {', '.join(f'{g.max() - g.min():.3f}' for g in gates)} | "
                     f"{', '.join(f'{g.mean() - init:+.3f}' for g in gates)} | "
                     f"{', '.join(f'{c:+.2f}' for c in pairs) if pairs else '—'} |")
    return lines


def render(results: Path, out: Path, img: Path, include_quick: bool = False) -> str:
    reports = merge(load_results(results, include_quick))
    img.mkdir(parents=True, exist_ok=True)
    main = sorted([r for r in reports if r["suite"] == "main"],
                  key=lambda r: TASK_ORDER.index(r["task"]) if r["task"] in TASK_ORDER else 99)
    ablations = [r for r in reports if r["suite"] == "ablations"]
    L = ["# Benchmarks: does the DAM search pay off?", "",
         "<!-- Generated by benchmarks/render.py from benchmarks/results/*.json. Do not edit by hand. -->", "",
         "Issue #4. Every method of a task runs in one invocation of `benchmarks/glue.py` with the same data, seeds, "
         "epochs, LR schedule (linear warm-up 6% then linear decay), batch size and sequence length, through the same "
         "training loop (`diffora.train.finetune`). Scores are the **last** evaluation of each run (no best-checkpoint "
         "selection on the dev set), mean ± sample std over seeds. DiffoRA's time includes its search. Budget "
         "arithmetic: [benchmarks/README.md](benchmarks/README.md).", ""]
    if not main and not ablations:
        L.append("No results yet: run `benchmarks/glue.py --task mrpc`.")
    if main:
        m0 = main[0]["machine"]
        L += ["## Setup", "",
              f"Machine: {m0['cpu']}, {m0['cores']} cores, {m0.get('memory_gib')} GiB, no GPU; "
              f"{m0['workers']} worker processes × {m0['threads_per_worker']} torch thread(s) (load average at "
              f"start: {', '.join(f'{x:.1f}' for x in m0['load_average_at_start'])}); the machine is a shared VM, so "
              f"absolute seconds are noisy: compare the ratios. Model: packaged `{main[0]['budget']['model']}` (6-layer MiniLM, "
              "36 candidate modules = 6 layers × q, k, v, attn-out, ffn-in, ffn-out). Versions: "
              + ", ".join(f"{k} {v}" for k, v in main[0]["versions"].items() if k not in ("src_dirty", "git_commit"))
              + "; the git commit of each invocation is in the table.", "",
              "| task | command | started | wall | commit |", "|---|---|---|---|---|"]
        for r in main + ablations:
            for command, started, wall, commit in r["commands"]:
                L.append(f"| {r['task']}{' ablations' if r['suite'] == 'ablations' else ''} | `{command}` | "
                         f"{started} | {wall / 60:.0f} min | {commit} |")
        L += ["", *budget_table(main + ablations), ""]
        L += ["## Targets", "", *targets(main), ""]
        L += ["## Results per task", ""]
        for r in main:
            m = main_metric(r)
            t = target_value(r)
            L += [f"### {r['task']}", "",
                  f"Target for *steps to target*: {TARGET_FRACTION:.0%} of LoRA-all's mean final {m} = {fmt(t)}; "
                  f"evaluations every {math.ceil(r['data']['finetune_steps'] / r['budget']['eval_points'])} steps. "
                  f"Majority-class {m}: {fmt(r['data']['majority_baseline'].get(m))}.", "",
                  *results_table(r), "", "Paired comparisons (A − B on the same seed, main metric):", "",
                  *paired_table(r), ""]
            stab = selection_stability(r, "diffora_rho0.5")
            if stab is not None:
                L.append(f"Kept-module overlap of DiffoRA ρ=0.5 across seeds (mean pairwise Jaccard): {stab:.2f} "
                         f"(random ρ=0.5: {fmt(selection_stability(r, 'random_rho0.5'), 2)}).")
                L.append("")
            if r.get("skipped"):
                L.append("Skipped (the run's `--max-minutes` budget ran out): "
                         + ", ".join(f"{j.get('method') or j.get('variant')} seed {j['seed']}" for j in r["skipped"]) + ".")
                L.append("")
            if r["errors"]:
                L.append("Failed jobs: " + "; ".join(f"{e.get('method') or e.get('variant')} seed {e.get('seed')}: "
                                                     f"{e['error'][:120]}" for e in r["errors"]))
                L.append("")
            curves = plot_curves(r, img / f"curves_{r['task']}.png")
            heat = plot_heatmap(r, img / f"dam_{r['task']}.png")
            L += [f"![learning curves {r['task']}]({rel(curves, out)})", ""]
            if heat:
                L += [f"![DAM {r['task']}]({rel(heat, out)})", ""]
        L += ["## Score vs trainable parameters", "",
              f"![score vs params]({rel(plot_params(main, img / 'score_vs_params.png'), out)})", ""]
        L += ["## Step-time ratios (same process, same batches, interleaved, median)", "",
              *timing_lines(main), "",
              "A search iteration is one weight step (LoRA A/B + head on the weight split) plus one gate step (β on "
              "the gate split): two forward/backward passes by construction, so ≈2× a LoRA step is the floor; the "
              "target compares it to a LoRA step plus the reference cost of a gate step.", ""]
    if ablations:
        L += ["## Ablations", ""]
    # the ablation run with the library defaults first, then separate sweeps (e.g. AdaLoRA's LR)
    for r in sorted(ablations, key=lambda r: not r.get("searches")):
        L += [*ablation_section(r, out, img), ""]
        diag = gate_diagnostics(r)
        if diag:
            L += ["What the gates of each search variant did (one search per seed; same searches as above). Softmax "
                  "gates average 1 per row by construction, so their mean shift is 0:", "", *diag, ""]
    notes = results / "discussion.md"
    if notes.exists():
        L += [notes.read_text().strip(), ""]
    text = "\n".join(L) + "\n"
    out.write_text(text)
    return text


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--img", default=None, help="image folder (default <results>/img)")
    p.add_argument("--include-quick", action="store_true")
    a = p.parse_args(argv)
    results = Path(a.results)
    render(results, Path(a.out), Path(a.img) if a.img else results / "img", a.include_quick)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
