"""Pieces of ``benchmarks/render.py`` that must agree with the library (no GLUE data needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark, tiny_model

from diffora import DiffoRAConfig, find_candidates
from diffora.method.gates import DAMGates


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
@pytest.mark.parametrize("gate_init, temperature", [(0.0, 1.0), (1.5, 1.0), (-2.0, 0.5)])
def test_initial_gate_matches_the_library(form, gate_init, temperature):
    """The gate diagnostics measure movement from the gate a search starts at; it is read from the recorded config
    and must equal what ``DAMGates.initial_values`` gives for that config."""
    config = DiffoRAConfig(gate=form, gate_init=gate_init, temperature=temperature).to_dict()
    gates = DAMGates(find_candidates(tiny_model("bert")), form=form, init=gate_init, temperature=temperature)
    start = gates.initial_values(gate_init)[gates.valid]
    assert torch.allclose(start, start[0])
    assert load_benchmark("render").initial_gate(config) == pytest.approx(float(start[0]), rel=1e-6)


def test_merge_joins_files_of_one_budget_even_across_new_fields():
    render = load_benchmark("render")
    base = {
        "format": "diffora.benchmark/1",
        "task": "sst2",
        "suite": "main",
        "command": "c",
        "started": "s",
        "runs": [{"method": "a", "seed": 0}],
        "searches": [],
        "errors": [],
        "seeds": [0],
        "_path": "x",
    }
    old = dict(base, budget={"lr": 5e-4})
    new = dict(base, budget={"lr": 5e-4, "adalora_lr": None}, runs=[{"method": "b", "seed": 0}], _path="y")
    merged = render.merge([old, new])
    assert len(merged) == 1 and {r["method"] for r in merged[0]["runs"]} == {"a", "b"}
    other = dict(base, budget={"lr": 1e-3}, _path="z")  # another budget: kept as its own report
    assert sorted(len(m["runs"]) for m in render.merge([old, other])) == [1, 1]


def test_benchmarks_md_is_the_render_of_the_committed_results(tmp_path):
    """BENCHMARKS.md is generated: rendering benchmarks/results again gives the same file (image links aside, which
    are relative to where the markdown is written). The harness's old result files are still read as they are."""
    import re

    from conftest import REPO

    render = load_benchmark("render")
    results = REPO / "benchmarks" / "results"
    text = render.render(results, tmp_path / "BENCHMARKS.md", results / "img", plots=False)

    def normal(markdown: str) -> list[str]:
        return [re.sub(r"\]\(.*/([^/)]+)\)", r"](\1)", line) for line in markdown.splitlines()]

    assert normal(text) == normal((REPO / "BENCHMARKS.md").read_text())


def test_paired_statistics_are_the_compare_reports():
    """render.py and diffora compare's report judge 'beyond the seed spread' with one function."""
    from diffora.compare.report import paired_stats

    render = load_benchmark("render")
    report = {
        "data": {"main_metric": "accuracy", "metrics": ["accuracy"]},
        "runs": [
            {"method": m, "seed": s, "final": {"accuracy": v}}
            for m, vals in (("a", (0.8, 0.82, 0.81)), ("b", (0.7, 0.71, 0.69)))
            for s, v in enumerate(vals)
        ],
    }
    p = render.paired(report, "a", "b")
    assert p == paired_stats({0: 0.8, 1: 0.82, 2: 0.81}, {0: 0.7, 1: 0.71, 2: 0.69})
    assert p["wins"] == 3 and p["holds"] and p["exceeds"]
    lower = paired_stats({0: 10.0, 1: 11.0}, {0: 12.0, 1: 13.0}, higher_is_better=False)  # perplexity
    assert lower["wins"] == 2 and lower["holds"]


def _fair_results(task: str, scores: dict[str, tuple[float, ...]], seconds: dict[str, float]) -> dict:
    """A minimal ``diffora compare`` results.json of a fair suite."""
    jobs, plan = {}, []
    for label, values in scores.items():
        for seed, value in enumerate(values):
            jid = f"{label}@seed{seed}"
            plan.append(jid)
            jobs[jid] = {
                "kind": "finetune",
                "method": label,
                "seed": seed,
                "final": {"accuracy": value},
                "trainable_params": 100,
                "steps": 10,
                "finetune_seconds": seconds.get(label, 10.0),
                "search_seconds": 2.0 if label == "diffora" else 0.0,
            }
    return {
        "format": "diffora.compare/1",
        "data": {
            "task": task,
            "main_metric": "accuracy",
            "train_rows": 10,
            "eval_rows": 5,
            "finetune_steps": 10,
            "lora_all_params": 200,
        },
        "methods": [{"label": m} for m in scores],
        "jobs": jobs,
        "plan": plan,
    }


def test_fair_goals_are_judged_from_the_paired_scores():
    """Issue 14's goals: +1.0 point over lora-matched on the task mean, >= AdaLoRA/EVA/compute-matched LoRA-all,
    beyond random_ws's seed std on >= 3 of 4 tasks, <= 1.3x LoRA-all's wall."""
    render = load_benchmark("render")
    good = {
        "diffora": (0.80, 0.81, 0.82),
        "lora-matched": (0.78, 0.79, 0.80),
        "adalora": (0.80, 0.80, 0.80),
        "eva": (0.81, 0.81, 0.81),
        "lora-all-cm": (0.79, 0.80, 0.81),
        "random-ws": (0.70, 0.71, 0.72),
        "lora-all": (0.80, 0.80, 0.80),
    }
    suites = [_fair_results(t, good, {"diffora": 10.0, "lora-all": 10.0}) for t in ("a", "b", "c", "d")]
    lines = "\n".join(render.fair_goals(suites))
    assert "lora-matched by ≥ 1.0 point on the mean over tasks*: mean +2.00 points" in lines
    assert "≥ AdaLoRA (mean over tasks)*: mean +1.00 points" in lines and "**holds**" in lines
    assert "≥ EVA (mean over tasks)*: mean +0.00 points" in lines  # a tie meets '>='
    assert "holds on 4 of 4 → **holds**" in lines
    assert "a 1.20×" in lines  # (2 s search + 10 s fine-tune) / 10 s
    worse = dict(good, adalora=(0.9, 0.9, 0.9), **{"random-ws": (0.80, 0.81, 0.82)})
    lines = "\n".join(render.fair_goals([_fair_results(t, worse, {}) for t in ("a", "b", "c")]))
    assert "≥ AdaLoRA (mean over tasks)*: mean -9.00 points" in lines
    assert "holds on 0 of 3 → **missed** (only 3 of 4 tasks have run)" in lines
    # a task without signal (every run at the majority class) adds zeros to every difference: it is left out
    flat = _fair_results("z", {label: (0.5, 0.5, 0.5) for label in good}, {})
    lines = "\n".join(render.fair_goals(suites + [flat]))
    assert "Judged on the 4 tasks with signal; left out: z (no signal)." in lines
    assert "lora-matched by ≥ 1.0 point on the mean over tasks*: mean +2.00 points" in lines
    assert "holds on 4 of 4 → **holds**" in lines
    lines = "\n".join(render.fair_goals(suites[:3] + [flat]))
    assert "holds on 4 of 4" not in lines and "(only 3 of 4 tasks have run)" in lines


def test_wall_share_and_the_heldout_table(tmp_path):
    """The wall goal's break-even search share solves S*c_search + (T - S)*c_final = T; the held-out table reads
    what benchmarks/heldout_check.py writes and marks a warned search."""
    import json

    render = load_benchmark("render")
    share = render._max_search_share({"search_iteration_over_lora_step": 2.0, "final_step_over_lora_step": 0.9})
    assert share == pytest.approx(0.1 / 1.1)
    assert 0.1 / 1.1 * 2.0 + (1 - 0.1 / 1.1) * 0.9 == pytest.approx(1.0)
    assert render._max_search_share({"search_iteration_over_lora_step": 0.8, "final_step_over_lora_step": 0.7}) == 1.0
    run = {
        "heldout_loss": 0.69,
        "heldout_reference": 0.68,
        "heldout_signal": False,
        "beta_range": 1.0,
        "flat_limit": 2.0,
        "agreement": None,
        "warning": "close to arbitrary",
    }
    (tmp_path / "heldout_check.json").write_text(json.dumps({"runs": {"shuffled@seed0": run}}))
    lines = render.heldout_check_lines(tmp_path)
    assert "| shuffled@seed0 | 0.690 vs 0.680 | no | 1.00 / 2.00 | — | yes |" in lines
    assert render.heldout_check_lines(tmp_path / "nothing") == []


def test_single_level_table_pairs_each_method_with_its_bilevel_counterpart(tmp_path):
    """single_*: a single-level run is compared with the bi-level search of the same hand-off (seed by seed), the
    'continue' runs with LoRA-all; the wall column appears only for a suite that ran one job at a time."""
    import json

    render = load_benchmark("render")
    single = "diffora[handoff=continue,search_levels=single]"
    scores = {
        "diffora[handoff=continue]": (0.80, 0.81, 0.82),
        single: (0.70, 0.71, 0.72),
        "lora-all": (0.80, 0.80, 0.80),
        "diffora": (0.84, 0.85, 0.86),
        "diffora[search_levels=single]": (0.84, 0.86, 0.86),
    }
    seconds = {"lora-all": 10.0, single: 8.0}
    for suite, workers in (("single_tweets", 1), ("single_sst2", 2)):
        res = _fair_results(suite.split("_")[1], scores, seconds)
        res["settings"] = {"workers": workers}
        res["timing"] = {
            "rounds": 10,
            "ratios": {
                "joint_step_over_lora_step": 1.02,
                "search_iteration_over_lora_step": 1.9,
                "final_step_over_lora_step": 0.9,
            },
        }
        for jid, job in res["jobs"].items():  # same kept sets for every method, so every Jaccard is 1
            job["kept_module_names"] = ["a", "b"]
        (tmp_path / suite).mkdir()
        (tmp_path / suite / "results.json").write_text(json.dumps(res))
    lines, wall = render.single_lines(tmp_path)
    text = "\n".join(lines)
    # 8 s fine-tune + 0 s search over LoRA-all's 10 s, single_tweets only
    assert wall == pytest.approx(0.8)
    row = next(x for x in lines if x.startswith(f"| tweets | {single} |"))
    assert "**-10.00 ± 0.00** (beyond)" in row and "| 1.00 |" in row and row.endswith("| 0.80× |")
    sst2 = next(x for x in lines if x.startswith(f"| sst2 | {single} |"))
    assert sst2.endswith("| — |")  # two workers shared the cores: no wall ratio
    restart = next(x for x in lines if x.startswith("| tweets | diffora[search_levels=single] |"))
    assert "+0.33 ± 0.58 (within)" in restart and restart.count("—") == 1  # no LoRA-all column for restart
    assert "a single-level iteration 1.02, a bi-level one 1.90" in text
    assert render.single_lines(tmp_path / "nothing") == ([], None)
