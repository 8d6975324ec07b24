"""Smoke test of the benchmark harness (issue #4): ``benchmarks/glue.py --quick`` then ``benchmarks/render.py``.

Tiny BERT (hidden 32, 2 layers) with the packaged MiniLM tokenizer, 160 MRPC training rows, 2 seeds, in-process.
No timing assertions: only that every method ran, the JSON has what the report needs and the report renders.
"""

from __future__ import annotations

import json

import pytest

from conftest import glue_dir, load_benchmark

pytestmark = pytest.mark.skipif(glue_dir() is None, reason="GLUE data (shared/data/glue/MRPC) not available")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    glue = load_benchmark("glue")
    out = tmp_path_factory.mktemp("bench") / "quick_mrpc.json"
    args = glue.parse_args(["--quick", "--out", str(out), "--data-dir", str(glue_dir())])
    glue.run(args)
    return json.loads(out.read_text()), out


def test_every_method_runs_for_every_seed(quick_report):
    report, _ = quick_report
    assert report["errors"] == []
    methods = {r["method"] for r in report["runs"]}
    expected = {"diffora_rho0.25", "diffora_rho0.5", "diffora_rho0.75", "random_rho0.25", "random_rho0.5",
                "lora_all_r8", "lora_all_matched", "lora_qv_r8", "adalora", "full_ft", "random_ws"}
    assert methods == expected
    for method in expected:
        assert sorted(r["seed"] for r in report["runs"] if r["method"] == method) == report["seeds"] == [0, 1]
    assert len(report["searches"]) == 2


def test_runs_record_what_the_report_needs(quick_report):
    report, _ = quick_report
    m = report["data"]["main_metric"]
    steps = report["data"]["finetune_steps"]
    runs = {(r["method"], r["seed"]): r for r in report["runs"]}
    for run in report["runs"]:
        assert 0.0 <= run["final"][m] <= 1.0
        assert run["steps"] == steps
        assert run["curve"] and run["curve"][-1]["step"] == steps
        assert run["trainable_params"] > 0 and run["peak_rss_mib"] > 0
    # DiffoRA: the search time is carried; the weight-shared start is evaluated at step 0
    d = runs["diffora_rho0.5", 0]
    assert d["search_seconds"] > 0 and d["curve"][0]["step"] == 0
    # parameter counts are ordered as the selection ratios are
    p = {k: runs[k, 0]["lora_params"] for k in ("diffora_rho0.25", "diffora_rho0.5", "diffora_rho0.75", "lora_all_r8")}
    assert p["diffora_rho0.25"] < p["diffora_rho0.5"] < p["diffora_rho0.75"] < p["lora_all_r8"]
    assert runs["full_ft", 0]["trainable_params"] > 10 * runs["lora_all_r8", 0]["trainable_params"]
    # random selection keeps as many modules as DiffoRA at the same rho, and differs across seeds
    assert runs["random_rho0.5", 0]["kept_modules"] == runs["diffora_rho0.5", 0]["kept_modules"]
    # the warm-start control: random modules at rho 0.5, inheriting the search's weights (evaluated at step 0 too)
    ws = runs["random_ws", 0]
    assert ws["kept_modules"] == runs["diffora_rho0.5", 0]["kept_modules"] and ws["curve"][0]["step"] == 0
    assert ws["kept_module_names"] == runs["random_rho0.5", 0]["kept_module_names"]
    # AdaLoRA really allocated: called every step, final total rank = target_r x modules
    a = runs["adalora", 0]
    assert a["adalora_allocate_calls"] == steps
    assert a["adalora_total_rank"] == a["adalora"]["target_r"] * a["kept_modules"]
    # timing ratios against a PEFT LoRA step measured in the same run
    ratios = report["timing"]["ratios"]
    assert all(v > 0 for v in ratios.values())


def test_render_writes_markdown_and_plots(quick_report, tmp_path):
    render = load_benchmark("render")
    report, path = quick_report
    out = tmp_path / "BENCHMARKS.md"
    text = render.render(path.parent, out, tmp_path / "img", include_quick=True)
    assert out.read_text() == text
    assert "## Targets" in text and "DiffoRA ρ=0.25" in text and "random ρ=0.5" in text
    assert "| diffora_rho0.5 vs random_rho0.5 |" in text
    for png in ("score_vs_params.png", "curves_mrpc.png", "dam_mrpc.png"):
        assert (tmp_path / "img" / png).stat().st_size > 1000


def test_ablation_suite_runs_each_choice_from_the_default_search(tmp_path):
    """The default search yields the discretisation, ranking, weight-sharing and warm-start controls; AdaLoRA LR
    sweep jobs carry their own LR. Everything is scored on rows held out from train."""
    glue = load_benchmark("glue")
    out = tmp_path / "quick_ablations.json"
    glue.run(glue.parse_args(["--quick", "--suite", "ablations", "--seeds", "0", "--variants", "default",
                              "--adalora-lrs", "0.01", "--lora-lrs", "0.002", "--out", str(out), "--data-dir", str(glue_dir())]))
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["data"]["eval_set"] == "held-out split of train"
    runs = {r["method"]: r for r in report["runs"]}
    assert set(runs) == {"diffora[default]", "diffora[global]", "diffora[budget]", "diffora[re-init]",
                         "diffora[score=gate]", "random_ws", "random_rho0.25", "lora_all_r8", "adalora[lr=0.01]",
                         "lora_all_r8[lr=0.002]"}
    assert runs["adalora[lr=0.01]"]["lr"] == 0.01 and runs["lora_all_r8"]["lr"] == report["budget"]["lr"]
    assert runs["lora_all_r8[lr=0.002]"]["lr"] == 0.002
    # same search, other ranking: the kept sets may differ but the module count is the same
    assert runs["diffora[score=gate]"]["kept_modules"] == runs["diffora[default]"]["kept_modules"]
    assert report["searches"][0]["config"]["selection_score"] == "movement"
