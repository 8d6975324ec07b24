"""``diffora compare`` on tiny models (tests/conftest.py), a few dozen rows and a few steps, in this process.

Covered: every method in one comparison (and what the report and results.json hold), resume after an interrupted
suite, a failing job recorded while the others finish, causal LM on a tiny LLaMA, ``lora-matched``'s parameter
count, the controls matched to DiffoRA's kept set (type-prior, random at its parameter count or within module types),
the LR grid that extends past its edge, typed job records, and the one-line errors for bad input.
"""

from __future__ import annotations

import csv
import json
from os.path import relpath
from pathlib import Path

import pytest
from conftest import synthetic_sentiment

from diffora.cli import app as cli
from diffora.cli.options import Options
from diffora.compare import FAMILIES, CompareOptions, compare, jobs, methods, runner
from diffora.errors import ConfigError
from diffora.select.strategies.random import random_selection

ALL_METHODS = [
    "diffora",
    "diffora[keep_ratio=0.25]",
    "lora-all",
    "lora-matched",
    "random",
    "random-ws",
    "lora-qv",
    "adalora",
    "eva",
    "full",
    "type-prior",
    "random[matched=true]",
    "random-ws[within_type=true]",
]


def write_csv(path: Path, n: int, seed: int) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for text, label in synthetic_sentiment(n, seed):
            writer.writerow([text, ["neg", "pos"][label]])
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("compare-data")
    return write_csv(folder / "train.csv", 48, 1), write_csv(folder / "dev.csv", 16, 2)


def small(model: Path, files: tuple[Path, Path], out: Path, **extra) -> dict:
    """Options for a comparison that runs in seconds: 6 fine-tuning steps, a 4-step search, 2 evaluations."""
    train, dev = files
    return dict(
        task="classification",
        train_file=str(train),
        eval_file=str(dev),
        model=str(model),
        max_length=16,
        batch_size=8,
        eval_batch_size=16,
        epochs=1.0,
        search_steps=4,
        gate_warmup_steps=1,
        eval_points=2,
        workers=0,
        threads=1,
        quiet=True,
        output_dir=str(out),
        **extra,
    )


def finetunes(results: dict) -> dict[str, dict]:
    return {j: results["jobs"][j] for j in results["plan"] if results["jobs"].get(j, {}).get("kind") == "finetune"}


# ------------------------------------------------------------------------------------------- every method
@pytest.fixture(scope="module")
def every_method(tiny_bert_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("every") / "cmp"
    results = compare(
        **small(tiny_bert_dir, data_files, out, methods=ALL_METHODS, seeds=[0, 1], timing=True, timing_rounds=1)
    )
    return results, out


def test_every_method_runs_for_every_seed(every_method):
    results, out = every_method
    assert not [r for r in results["jobs"].values() if "error" in r]
    runs = finetunes(results)
    assert sorted(runs) == sorted(f"{m}@seed{s}" for m in ALL_METHODS for s in (0, 1))
    steps = results["data"]["finetune_steps"]
    assert steps == 6
    for run in runs.values():
        assert run["steps"] == steps and 0.0 <= run["final"]["accuracy"] <= 1.0
        assert [p["step"] for p in run["curve"] if p["step"] > 0] == [3, 6]  # every evaluation point is kept
        assert run["trainable_params"] > 0 and run["peak_rss_mib"] > 0
    # one search per seed, shared by diffora, diffora[keep_ratio=0.25], random-ws and lora-matched
    assert sorted(j for j in results["jobs"] if j.startswith("search")) == [
        "search[default]@seed0",
        "search[default]@seed1",
    ]
    d, d25, ws, rnd = (runs[f"{m}@seed0"] for m in ("diffora", "diffora[keep_ratio=0.25]", "random-ws", "random"))
    assert d["search_seconds"] > 0 and d["curve"][0]["step"] == 0  # weight-shared start evaluated at step 0
    assert d25["lora_params"] < d["lora_params"] < runs["lora-all@seed0"]["lora_params"]
    assert ws["kept_module_names"] == rnd["kept_module_names"] and ws["kept_modules"] == d["kept_modules"]
    assert runs["lora-qv@seed0"]["kept_modules"] == 4  # query + value of 2 layers
    assert runs["full@seed0"]["trainable_params"] > 10 * runs["lora-all@seed0"]["trainable_params"]
    a = runs["adalora@seed0"]
    assert a["lr"] == 1e-2 and a["adalora_allocate_calls"] == steps
    assert a["adalora_total_rank"] == a["adalora"]["target_r"] * a["kept_modules"]
    e = runs["eva@seed0"]
    assert e["eva_batches"] >= 1 and sum(e["eva_ranks"].values()) == 8 * 12  # EVA redistributes r x modules
    assert runs["full@seed0"]["lr"] == 5e-5 and d["lr"] == 5e-4
    assert results["timing"]["ratios"]["search_iteration_over_lora_step"] > 0
    assert results["timing"]["ratios"]["joint_step_over_lora_step"] > 0


def test_controls_match_diffora_kept_set_of_the_same_seed(every_method):
    """type-prior, random[matched=true] and random-ws[within_type=true] read DiffoRA's kept set of the same seed's
    search: the same LoRA parameters within one module's cost (within_type: exactly), no search of their own."""
    results, _ = every_method
    runs = finetunes(results)
    grid = jobs.DAMGrid.from_dict(results["jobs"]["search[default]@seed0"]["record"]["grid"])
    biggest = 8 * max(c for row in grid.param_costs for c in row)
    for seed in (0, 1):
        d = runs[f"diffora@seed{seed}"]
        prior, rnd, within = (
            runs[f"{m}@seed{seed}"] for m in ("type-prior", "random[matched=true]", "random-ws[within_type=true]")
        )
        for control in (prior, rnd):
            assert control["target_lora_params"] == d["lora_params"]
            assert d["lora_params"] - biggest < control["lora_params"] <= d["lora_params"]
            assert control["search_seconds"] == 0.0 and control["curve"][0]["step"] > 0  # fresh LoRA, no warm start
        assert within["lora_params"] == d["lora_params"] and within["curve"][0]["step"] == 0  # search's weights
        types = [sorted(grid.position(m)[1] for m in r["kept_module_names"]) for r in (d, within)]
        assert types[0] == types[1]  # the same number of modules of every type
        assert prior["type_order"][0] in grid.labels


def test_lora_matched_matches_diffora_within_5_percent(every_method):
    results, _ = every_method
    runs = finetunes(results)
    for seed in (0, 1):
        diffora, matched = runs[f"diffora@seed{seed}"], runs[f"lora-matched@seed{seed}"]
        assert matched["kept_modules"] == results["data"]["candidates"] == 12  # every candidate
        assert matched["target_lora_params"] == diffora["lora_params"]
        assert abs(matched["lora_params"] - diffora["lora_params"]) <= 0.05 * diffora["lora_params"]


def test_results_and_report_hold_what_a_user_needs(every_method):
    results, out = every_method
    saved = json.loads((out / "results.json").read_text())
    assert saved["format"] == "diffora.compare/1" and saved["jobs"].keys() == results["jobs"].keys()
    assert {"diffora", "torch", "transformers", "peft"} <= set(saved["versions"])
    assert saved["machine"]["cores"] and saved["command"] and saved["options"]["model"]
    report = (out / "report.md").read_text()
    assert "| method | seeds | kept modules | rank | trainable params | % of LoRA-all | **accuracy** |" in report
    assert "| lora-matched | 2 |" in report and "| adalora | 2 | 12.0 | 6→4 |" in report
    sentences = [line for line in report.splitlines() if line.startswith("- **diffora**")]
    assert len(sentences) == len(ALL_METHODS) - 1  # one plain sentence per comparison with DiffoRA
    assert all(f"**{m}**" in "".join(sentences) for m in ALL_METHODS[1:])
    assert "seed-to-seed spread" in report and "## Step-time ratios" in report
    for png in ("curves.png", "score_vs_params.png", "dam_default_seed0.png", "dam_default_seed1.png"):
        assert (out / png).stat().st_size > 1000
    assert not (out / "searches").exists()  # search states are kept only while a comparison is unfinished


# ------------------------------------------------------------------------------------------------- resume
def test_resume_runs_only_the_unfinished_jobs(tiny_bert_dir, data_files, tmp_path, monkeypatch):
    methods = ["diffora", "lora-all", "random-ws"]
    reference = compare(**small(tiny_bert_dir, data_files, tmp_path / "a", methods=methods, seeds=[0]))
    out = tmp_path / "b"
    calls: list[str] = []
    real = runner.Scheduler.execute

    def interrupted(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third job
        calls.append(job.id)
        return real(job)

    monkeypatch.setattr(runner.Scheduler, "execute", staticmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]))
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["jobs"]) == sorted(calls) == ["diffora@seed0", "search[default]@seed0"]
    assert (out / "searches").is_dir()  # the search state is kept for the rerun

    rerun: list[str] = []
    monkeypatch.setattr(runner.Scheduler, "execute", staticmethod(lambda job: rerun.append(job.id) or real(job)))
    resumed = compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]))
    assert sorted(rerun) == ["lora-all@seed0", "random-ws@seed0"]  # finished jobs are not run again
    for jid, run in finetunes(reference).items():
        again = resumed["jobs"][jid]
        assert (again["final"], again["curve"], again["kept_module_names"]) == (
            run["final"],
            run["curve"],
            run["kept_module_names"],
        )
    assert len(resumed["invocations"]) == 2
    # a rerun of a finished comparison runs nothing; one with other options is refused in one line
    rerun.clear()
    compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]))
    assert rerun == []
    with pytest.raises(ConfigError, match="holds a comparison with other options .*epochs"):
        compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]) | {"epochs": 2.0})
    # the same data file named by a relative path is the same comparison
    compare(
        **small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]) | {"train_file": relpath(data_files[0])}
    )
    assert rerun == []
    # results written before an option existed continue while it keeps its default, and only then
    saved = json.loads((out / "results.json").read_text())
    del saved["fingerprint"]["search_levels"]
    del saved["jobs"]["search[default]@seed0"]["key"]["search"]["search_levels"]
    (out / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="other options .*search_levels was 'bi', now 'single'"):
        compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]) | {"search_levels": "single"})
    compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0, 1]))  # a seed added: seed 0 kept
    assert sorted(rerun) == ["diffora@seed1", "lora-all@seed1", "random-ws@seed1", "search[default]@seed1"]


# ------------------------------------------------------------------------------------------------ failures
def test_a_failing_job_is_recorded_and_the_others_finish(tiny_bert_dir, data_files, tmp_path, monkeypatch):
    real_build, real_search = jobs.build_model, jobs.run_search

    def broken(job, *args, **kwargs):
        if job.family == "lora-qv":
            raise RuntimeError("simulated failure\nwith a second line")
        return real_build(job, *args, **kwargs)

    def broken_search(job):
        if job.options["gate"] == "softmax":
            raise ValueError("simulated search failure")
        return real_search(job)

    monkeypatch.setattr(jobs, "build_model", broken)
    monkeypatch.setitem(jobs.RUNNERS, "search", broken_search)
    methods = ["diffora", "lora-qv", "lora-all", "diffora[gate=softmax]"]
    out = tmp_path / "cmp"
    results = compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]))
    rec = results["jobs"]
    assert rec["lora-qv@seed0"]["error"] == "RuntimeError: simulated failure"  # one line
    assert "Traceback" in rec["lora-qv@seed0"]["traceback"]
    assert rec["diffora[gate=softmax]@seed0"]["error"].startswith(
        "its search search[gate=softmax]@seed0 failed (ValueError: simulated search failure)"
    )
    assert "error" not in rec["diffora@seed0"] and "error" not in rec["lora-all@seed0"]
    report = (out / "report.md").read_text()
    assert "## Failed jobs" in report and "`lora-qv@seed0`: RuntimeError: simulated failure" in report
    assert "| lora-qv | 0 (1 failed) |" in report
    assert (out / "searches").is_dir()  # unfinished: kept for the rerun
    # the rerun retries the failed jobs only
    monkeypatch.undo()
    retried: list[str] = []
    real = runner.Scheduler.execute
    monkeypatch.setattr(runner.Scheduler, "execute", staticmethod(lambda job: retried.append(job.id) or real(job)))
    again = compare(**small(tiny_bert_dir, data_files, out, methods=methods, seeds=[0]))
    assert sorted(retried) == ["diffora[gate=softmax]@seed0", "lora-qv@seed0", "search[gate=softmax]@seed0"]
    assert not [r for r in again["jobs"].values() if "error" in r]


# ------------------------------------------------------------------------------------------------ causal LM
def test_causal_lm_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    rows = [{"prompt": f"say {w}", "response": f"{w} {w} ok"} for w in ["red", "blue", "green", "gold"] * 8]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows[:24]) + "\n")
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps(r) for r in rows[24:]) + "\n")
    methods = ["diffora", "lora-all", "lora-matched", "lora-qv", "adalora", "eva"]
    out = tmp_path / "cmp"
    results = compare(
        task="causal_lm",
        train_file=str(train),
        eval_file=str(dev),
        prompt_column="prompt",
        response_column="response",
        model=str(tiny_llama_dir),
        max_length=16,
        batch_size=4,
        eval_batch_size=8,
        epochs=1.0,
        search_steps=4,
        gate_warmup_steps=1,
        eval_points=2,
        methods=methods,
        seeds=[0],
        workers=0,
        quiet=True,
        output_dir=str(out),
    )
    assert not [r for r in results["jobs"].values() if "error" in r]
    assert results["data"]["main_metric"] == "perplexity" and results["data"]["candidates"] == 14
    runs = finetunes(results)
    for run in runs.values():
        assert run["final"]["perplexity"] > 1 and "eval_loss" in run["final"]
    assert runs["lora-qv@seed0"]["kept_modules"] == 4  # q_proj and v_proj of 2 layers
    d, m = runs["diffora@seed0"], runs["lora-matched@seed0"]
    assert abs(m["lora_params"] - d["lora_params"]) <= 0.05 * d["lora_params"]
    report = (out / "report.md").read_text()
    assert "lower perplexity is better" in report and "| **perplexity** | eval_loss |" in report


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "methods, message",
    [
        (["diffora", "lora-al"], "unknown method 'lora-al' in --methods; choose from diffora, lora-all"),
        (
            ["diffora[keep_ratio=0.25,foo=1]"],
            "method 'diffora[keep_ratio=0.25,foo=1]': unknown option 'foo' for diffora; diffora takes rank, alpha",
        ),
        (
            ["lora-all[keep_ratio=0.5]"],
            "unknown option 'keep_ratio' for lora-all; lora-all takes rank, alpha, lora_dropout, lr",
        ),
        (["diffora[keep_ratio=2]"], "method 'diffora[keep_ratio=2]': --keep-ratio must be in (0, 1]"),
        (["diffora[keep_ratio=abc]"], "keep_ratio must be a number, got 'abc'"),
        (["diffora[keep_ratio]"], "'keep_ratio' is not key=value"),
        (["eva[eva_rho=0.5]"], "eva_rho must be >= 1"),
        (["diffora", "diffora"], "--methods lists 'diffora' twice"),
    ],
)
def test_bad_methods_are_one_line_errors_before_anything_runs(
    methods, message, tiny_bert_dir, data_files, tmp_path, capsys
):
    train, dev = data_files
    out = tmp_path / "cmp"
    code = cli.main(
        [
            "compare",
            "--task",
            "classification",
            "--train-file",
            str(train),
            "--eval-file",
            str(dev),
            "--model",
            str(tiny_bert_dir),
            "--output-dir",
            str(out),
            "--methods",
            *methods,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_other_bad_input_is_refused_in_one_line(tiny_bert_dir, data_files, tmp_path, capsys):
    train, dev = data_files
    base = [
        "compare",
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(tmp_path / "cmp"),
        "--workers",
        "0",
        "--quiet",
    ]
    cases = [
        (["--seeds", "0", "0"], "--seeds lists a seed twice"),
        (["--tune-lr", "--eval-on-holdout"], "--tune-lr and --eval-on-holdout both score on the held-out rows"),
        (["--max-length", "500"], "--max-length 500 is more than model"),
        (["--train-file", str(tmp_path / "missing.csv")], "missing.csv"),
        (["--methods", "diffora[selection_score=best]"], "selection_score"),
        (
            ["--methods", "adalora", "--max-train-samples", "8", "--epochs", "1"],
            "AdaLoRA needs at least 3 fine-tuning steps",
        ),
        # what diffora run refuses for the 'continue' hand-off, before any job
        (["--methods", "diffora[handoff=continue,weight_sharing=false]"], "--handoff continue needs --weight-sharing"),
        (
            ["--handoff", "continue", "--methods", "diffora[rank_allocation=uniform]"],
            "--handoff continue needs --rank-allocation none",
        ),
        (
            ["--handoff", "continue", "--methods", "diffora", "--max-train-samples", "8", "--epochs", "1"],
            "with --handoff continue the search is at most 0 of the 1 fine-tuning steps",
        ),
    ]
    for extra, message in cases:
        code = cli.main(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "cmp").exists()
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "notes.txt").write_text("mine")
    assert cli.main(base + ["--methods", "lora-all"]) == 2
    assert "holds no comparison" in capsys.readouterr().err


def test_config_file_and_api_take_the_compare_options(tmp_path, data_files, tiny_bert_dir):
    train, dev = data_files
    config = tmp_path / "cmp.yaml"
    config.write_text(
        f"task: classification\ntrain-file: {train}\neval-file: {dev}\nmodel: {tiny_bert_dir}\n"
        "methods: [diffora, 'random[keep_ratio=0.25]']\nseeds: [3, 4]\ntune-lr-factors: [0.5, 2]\n"
    )
    command, opts, args = cli.parse(["compare", "--config", str(config), "--workers", "0"])
    settings = CompareOptions(**args.compare_settings)
    assert command == "compare" and settings.methods == ["diffora", "random[keep_ratio=0.25]"]
    assert settings.seeds == [3, 4] and settings.tune_lr_factors == [0.5, 2.0] and settings.workers == 0
    assert opts.output_dir == "runs/compare"
    config.write_text("methods: [diffora]\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown option 'bogus'; see 'diffora compare --help'"):
        cli.parse(["compare", "--config", str(config)])
    with pytest.raises(ConfigError, match=r"compare\(\) got unknown option\(s\) \['bogus'\]"):
        compare(Options(), bogus=1)
    with pytest.raises(ConfigError, match="--workers must be"):
        CompareOptions(workers=-2)


# -------------------------------------------------------------------------------- held-out rows, time limit
def test_learning_rates_are_chosen_on_rows_held_out_from_train(tiny_bert_dir, data_files, tmp_path):
    out = tmp_path / "tuned"
    results = compare(
        **small(
            tiny_bert_dir,
            data_files,
            out,
            methods=["lora-all", "diffora", "full[lr=1e-4]"],
            seeds=[0],
            tune_lr=True,
            tune_lr_factors=[1.0, 4.0],
            holdout_rows=12,
            tune_lr_seeds=1,
            tune_lr_extensions=0,
        )
    )
    choice = results["lr_choice"]
    assert choice["holdout_rows"] == 12 and set(choice["methods"]) == {"lora-all", "diffora"}  # full keeps its lr
    tune = {j: r for j, r in results["jobs"].items() if j.startswith("tune:")}
    assert sorted(tune) == [
        "tune:diffora@lr=0.0005@seed0",
        "tune:diffora@lr=0.002@seed0",
        "tune:lora-all@lr=0.0005@seed0",
        "tune:lora-all@lr=0.002@seed0",
        "tune:search[default]@seed0",
    ]
    assert all(r["key"]["split"] == "holdout" for r in tune.values())
    assert (
        tune["tune:search[default]@seed0"]["weight_split_rows"] + tune["tune:search[default]@seed0"]["gate_split_rows"]
        == 48 - 12
    )  # trained without the held-out rows
    for m in ("lora-all", "diffora"):
        assert results["jobs"][f"{m}@seed0"]["lr"] == choice["methods"][m]["chosen"]
        assert results["jobs"][f"{m}@seed0"]["key"]["split"] == "main"
    assert results["jobs"]["full[lr=1e-4]@seed0"]["lr"] == 1e-4
    assert "## Learning rates chosen on held-out training rows" in (out / "report.md").read_text()

    held = compare(
        **small(
            tiny_bert_dir,
            data_files,
            tmp_path / "held",
            methods=["lora-all"],
            seeds=[0],
            eval_on_holdout=True,
            holdout_rows=12,
        )
    )
    assert held["data"]["eval_rows"] == 12 and held["data"]["train_rows"] == 36
    assert held["data"]["eval_set"] == "held-out split of train"


def test_max_minutes_leaves_the_rest_for_a_rerun(tiny_bert_dir, data_files, tmp_path):
    out = tmp_path / "cmp"
    results = compare(
        **small(tiny_bert_dir, data_files, out, methods=["lora-all", "random"], seeds=[0], max_minutes=1e-9)
    )
    assert sorted(results["skipped"]) == ["lora-all@seed0", "random@seed0"] and not finetunes(results)
    assert "## Not run" in (out / "report.md").read_text()
    again = compare(**small(tiny_bert_dir, data_files, out, methods=["lora-all", "random"], seeds=[0]))
    assert again["skipped"] == [] and len(finetunes(again)) == 2


def test_worker_processes_give_the_in_process_results(tiny_bert_dir, data_files, tmp_path):
    methods = ["diffora", "lora-all"]
    here = compare(**small(tiny_bert_dir, data_files, tmp_path / "here", methods=methods, seeds=[0]))
    pool = compare(**small(tiny_bert_dir, data_files, tmp_path / "pool", methods=methods, seeds=[0]) | {"workers": 2})
    assert pool["machine"]["workers"] == 2
    for jid, run in finetunes(here).items():
        other = pool["jobs"][jid]
        assert other["pid"] != run["pid"]
        assert (other["final"], other["curve"], other["loss_last"]) == (run["final"], run["curve"], run["loss_last"])


def test_gradient_accumulation_and_bf16_autocast_reach_every_method(tiny_bert_dir, data_files, tmp_path):
    # accelerate holds one precision per process: a bf16 comparison runs in a worker process
    options = small(
        tiny_bert_dir,
        data_files,
        tmp_path / "cmp",
        methods=["diffora", "lora-all"],
        seeds=[0],
        gradient_accumulation_steps=2,
        mixed_precision="bf16",
    )
    results = compare(**{**options, "workers": 1})
    assert not [r for r in results["jobs"].values() if "error" in r]
    assert results["data"]["finetune_steps"] == 3  # 6 batches, 2 per optimiser step
    for run in finetunes(results).values():
        assert run["steps"] == 3 and run["curve"][-1]["step"] == 3
    assert results["jobs"]["search[default]@seed0"]["steps"] == 4


def test_ntk_selection_and_budget_concentration_as_variants(tiny_bert_dir, data_files, tmp_path):
    methods = [
        "diffora",
        "diffora[selection_score=ntk]",
        "diffora[rank_allocation=uniform]",
        "lora-all",
        "diffora[selection_score=taylor]",
        "lora-matched[selection_score=taylor]",
    ]
    results = compare(**small(tiny_bert_dir, data_files, tmp_path / "cmp", methods=methods, seeds=[0], ntk_examples=8))
    jobs = {j["method"]: j for j in finetunes(results).values()}
    assert all(j.get("error") is None for j in jobs.values()), jobs
    lora_all = jobs["lora-all"]["lora_params"]
    concentrated = jobs["diffora[rank_allocation=uniform]"]
    assert 0.95 * lora_all <= concentrated["lora_params"] <= lora_all  # the dropped modules' rank went to the kept
    assert jobs["diffora"]["lora_params"] < 0.95 * lora_all
    # one shared search: the two selections differ only in how modules are ranked
    assert jobs["diffora[selection_score=ntk]"]["kept_modules"] == jobs["diffora"]["kept_modules"]
    # the taylor ranking of the same search: its own modules, and lora-matched follows its parameter count
    search = results["jobs"]["search[default]@seed0"]
    taylor = jobs["diffora[selection_score=taylor]"]
    assert "taylor" in search["scores"] and taylor["kept_modules"] == jobs["diffora"]["kept_modules"]
    assert jobs["lora-matched[selection_score=taylor]"]["target_lora_params"] == taylor["lora_params"]


def test_compute_matched_lora_all_trains_one_step_per_search_pass(tiny_bert_dir, data_files, tmp_path):
    """lora-all-cm: DiffoRA's fine-tuning steps + one per forward/backward pass of the same search (first order: a
    weight step per iteration, a gate step after the warm-up; second order: four passes per gate step)."""
    methods = ["lora-all", "lora-all-cm", "lora-all-cm[order=second]"]
    results = compare(**small(tiny_bert_dir, data_files, tmp_path / "cmp", methods=methods, seeds=[0]))
    assert not [r for r in results["jobs"].values() if "error" in r]
    runs = finetunes(results)
    plain, cm, cm2 = (runs[f"{m}@seed0"] for m in methods)
    search = results["jobs"]["search[default]@seed0"]
    assert (search["steps"], search["gate_steps"]) == (4, 3)  # 4 iterations, 1 of them weight-only warm-up
    assert plain["steps"] == 6
    assert cm["steps"] == 6 + 4 + 3 and cm["compute_matched"] == {"finetune_steps": 6, "search_passes": 7}
    assert cm2["steps"] == 6 + 4 + 4 * 3
    assert cm["lora_params"] == plain["lora_params"] and cm["kept_modules"] == plain["kept_modules"]
    assert [p["step"] for p in cm["curve"]] == [7, 13]  # the evaluation points follow the longer schedule
    assert cm["final"] != plain["final"] or cm["loss_last"] != plain["loss_last"]


@pytest.mark.parametrize(
    "n_train,batch,accumulation,steps",
    [(48, 8, 1, 13), (2000, 16, 1, 163), (100, 16, 3, 5), (1, 4, 1, 1), (3668, 16, 2, 999)],
)
def test_epochs_for_steps_gives_exactly_the_asked_steps(n_train, batch, accumulation, steps):
    opts = Options(
        task="classification", train_file="x.csv", batch_size=batch, gradient_accumulation_steps=accumulation
    )
    epochs = jobs.epochs_for_steps(opts, n_train, steps)
    assert (
        jobs.finetune_steps(
            Options(
                task="classification",
                train_file="x.csv",
                batch_size=batch,
                epochs=epochs,
                gradient_accumulation_steps=accumulation,
            ),
            n_train,
        )
        == steps
    )


# ------------------------------------------------------------------------------ the controls, as small units
@pytest.fixture(scope="module")
def bert_grid():
    from conftest import tiny_model

    from diffora import find_candidates

    return find_candidates(tiny_model("bert"))


def test_type_prior_keeps_the_most_kept_types_in_every_layer(bert_grid):
    grid, rank = bert_grid, 8
    rows, cols = grid.shape
    ffn = [j for j, label in enumerate(grid.labels) if grid.param_costs[0][j] == max(grid.param_costs[0])]
    value = grid.labels.index("value") if "value" in grid.labels else 2
    # DiffoRA kept the FFN types in every layer and one value projection: FFN first, then value, then the rest
    kept = [grid.names[i][j] for i in range(rows) for j in ffn] + [grid.names[0][value]]
    budget = sum(rank * grid.param_costs[i][j] for i in range(rows) for j in ffn) + rank * grid.param_costs[0][value]
    order = methods.type_order(grid, kept)
    assert set(order[: len(ffn)]) == {grid.labels[j] for j in ffn} and order[len(ffn)] == grid.labels[value]
    prior = methods.type_prior_selection(grid, kept, budget, rank)
    assert all(prior.mask[i][j] for i in range(rows) for j in ffn)  # the most-kept types, in every layer
    assert prior.mask[0][value]  # then the next type while the budget lasts
    smallest = rank * min(c for row in grid.param_costs for c in row)
    assert budget - smallest < prior.lora_params <= budget


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_at_diffora_parameter_count(bert_grid, seed):
    grid, rank = bert_grid, 8
    budget = int(0.64 * 8 * sum(c for row in grid.param_costs for c in row))
    drawn = random_selection(grid, 0.5, seed, rank, "budget", budget_params=budget)
    biggest = rank * max(c for row in grid.param_costs for c in row)
    assert budget - biggest < drawn.lora_params <= budget
    plain = random_selection(grid, 0.5, seed, rank)
    assert len(plain.modules) == sum(-(-len([n for n in row if n]) // 2) for row in grid.names)  # ceil(rho * M)
    kept = plain.modules
    within = jobs.random_within_types(grid, kept, seed + 7, 0.5, rank)
    assert within.lora_params == plain.lora_params
    assert sorted(grid.position(m)[1] for m in within.modules) == sorted(grid.position(m)[1] for m in kept)


@pytest.mark.parametrize(
    "grid, best, more",
    [
        ([1e-3, 2e-3, 4e-3], 4e-3, 8e-3),
        ([1e-3, 2e-3, 4e-3], 1e-3, 5e-4),
        ([1e-3, 2e-3, 4e-3], 2e-3, None),
        ([5e-4], 5e-4, 1e-3),
    ],
)
def test_lr_grid_extends_past_the_edge(grid, best, more):
    assert runner.extend_lr_grid(grid, best) == more


def test_tuning_extends_the_grid_until_the_best_lr_is_interior(tmp_path):
    """A fake scheduler scores each LR with a function that peaks at 1.6e-2 (the default grid tops out at 2e-3):
    the grid grows upward until the best LR is interior, the choice is the mean over two seeds, the grid is recorded.
    """
    import math
    from types import SimpleNamespace

    opts = Options(task="classification", train_file="x.csv", output_dir=str(tmp_path / "cmp"), lr=5e-4)
    settings = CompareOptions(
        methods=["lora-all", "lora-qv[lr=1e-3]"],
        seeds=[0],
        tune_lr=True,
        tune_lr_factors=[1.0, 2.0, 4.0],
        tune_lr_extensions=5,
    )
    c = runner.Comparison(opts, settings)
    c.methods = methods.parse_methods(settings.methods, opts)
    c.tune_prep = SimpleNamespace(data=SimpleNamespace(main_metric="accuracy"))
    c.holdout_rows = 10
    planned: list[list[str]] = []

    def score(lr: float, seed: int) -> float:
        return 1.0 - abs(math.log(lr / 1.6e-2)) / 10 + (0.01 if seed else 0.0)

    class FakeScheduler:
        stopped = False

        def run(self, jobs_: list) -> None:
            planned.append([j.id for j in jobs_])
            for j in jobs_:
                assert j.kind == "finetune" and j.spec.split == "holdout"
                results["jobs"][j.id] = {"final": {"accuracy": score(j.spec.lr, j.key["seed"])}}

    results: dict = {"jobs": {}}
    chosen = c.tune(FakeScheduler(), results)
    assert chosen == {"lora-all": 1.6e-2}  # lora-qv keeps its variant's LR
    row = results["lr_choice"]["methods"]["lora-all"]
    assert row["grid"] == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2] and row["extensions"] == 4
    assert row["interior"] and row["seeds"] == [0, 1] == results["lr_choice"]["seeds"]
    assert row["tried"]["0.016"] == pytest.approx(score(1.6e-2, 0) + 0.005)  # mean over the two seeds
    assert planned[0] == [f"tune:lora-all@lr={lr:g}@seed{s}" for s in (0, 1) for lr in (5e-4, 1e-3, 2e-3)]
    capped = CompareOptions(
        methods=["lora-all"], seeds=[0], tune_lr=True, tune_lr_factors=[1.0, 2.0], tune_lr_extensions=1, tune_lr_seeds=1
    )
    c.settings, c.methods, results = capped, methods.parse_methods(["lora-all"], opts), {"jobs": {}}
    c.tune(FakeScheduler(), results)
    row = results["lr_choice"]["methods"]["lora-all"]
    assert row["grid"] == [5e-4, 1e-3, 2e-3] and row["chosen"] == 2e-3 and row["interior"] is False


def test_job_records_are_typed_and_round_trip():
    spec = jobs.FinetuneJob(
        id="random@seed0",
        key={"kind": "finetune", "seed": 0},
        split="main",
        options={"seed": 0},
        label="random[matched=true]",
        family="random",
        lr=5e-4,
        extra={"matched": True},
    )
    spec.search = jobs.SearchRef(state_path="s.pt", seconds=1.5)
    data = spec.to_dict()
    assert data["kind"] == "finetune" and data["search"] == {
        "state_path": "s.pt",
        "seconds": 1.5,
        "weight_steps": 0,
        "total_steps": None,
    }
    assert jobs.JobSpec.from_dict(data) == spec
    assert all(
        hasattr(f, hook)
        for f in FAMILIES.values()
        for hook in ("validate", "build", "attach", "during_finetune", "account", "needs_search")
    )
    parsed = methods.parse_method("random[matched=true]", Options())
    assert parsed.needs_search and parsed.extra == {"matched": True}
    assert not methods.parse_method("random", Options()).needs_search
    with pytest.raises(ConfigError, match="use one of them"):
        methods.parse_method("random[matched=true,within_type=true]", Options())
    with pytest.raises(ConfigError, match="matched must be true or false"):
        methods.parse_method("random[matched=maybe]", Options())


# ---------------------------------------------------------------------------------- the 'continue' hand-off
@pytest.fixture(scope="module")
def still_bert_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: a comparison and ``diffora run`` then draw no random numbers while training,
    so their adapters can be compared bit for bit (their RNG streams differ between the search and the fine-tune)."""
    from transformers import AutoTokenizer, BertModel

    folder = tmp_path_factory.mktemp("still-bert")
    BertModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(
        folder
    )
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


def test_continue_handoff_takes_lora_alls_steps_and_equals_diffora_run(
    still_bert_dir, data_files, tmp_path, monkeypatch
):
    """diffora[handoff=continue]: the search is the first S of LoRA-all's T steps and the fine-tune continues its
    schedule and AdamW state for T - S steps, giving the adapter `diffora run --handoff continue` gives; the
    controls on the same search keep restarting, and lora-all-cm matches DiffoRA's compute (T - S + passes)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    trained = {}
    real = jobs.finetune

    def keep_adapter(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        trained[kwargs["desc"]] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return result

    monkeypatch.setattr(jobs, "finetune", keep_adapter)
    methods_ = ["diffora[handoff=continue]", "lora-all", "lora-all-cm[handoff=continue]", "random-ws[handoff=continue]"]
    options = small(
        still_bert_dir, data_files, tmp_path / "cmp", methods=methods_, seeds=[0], lr=1e-2, lora_dropout=0.0
    )
    results = compare(**options)
    assert not [r for r in results["jobs"].values() if "error" in r]
    runs = {r["method"]: r for r in finetunes(results).values()}
    search = results["jobs"]["search[handoff=continue]@lr=0.01@seed0"]  # a continue search runs at the job's LR
    assert search["handoff"] == {"mode": "continue", "search_steps": 4, "finetune_steps": 2, "total_steps": 6}
    assert search["config"]["weight_lr"] == 1e-2
    d, lora_all = runs["diffora[handoff=continue]"], runs["lora-all"]
    assert (d["search_steps"], d["finetune_steps"], d["steps"]) == (4, 2, 2)
    assert d["total_steps"] == lora_all["total_steps"] == lora_all["steps"] == 6
    assert [p["step"] for p in d["curve"]] == [4, 6]  # the hand-off is evaluated at step S
    ws, cm = runs["random-ws[handoff=continue]"], runs["lora-all-cm[handoff=continue]"]
    assert (ws["search_steps"], ws["finetune_steps"], ws["total_steps"]) == (4, 6, 10)  # restarts after the search
    assert cm["compute_matched"] == {"finetune_steps": 2, "search_passes": 7} and cm["total_steps"] == 9
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "At equal total steps: diffora[handoff=continue], lora-all." in report

    run_options = {
        k: v
        for k, v in options.items()
        if k not in ("methods", "seeds", "eval_points", "workers", "threads", "quiet", "output_dir")
    }
    argv = ["run", "--handoff", "continue", "--seed", "0", "--quiet", "--output-dir", str(tmp_path / "run")]
    for key, value in run_options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert cli.main(argv) == 0
    theirs = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    ours = trained["diffora[handoff=continue]"]
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    restarted = trained["random-ws[handoff=continue]"]
    assert any(not restarted[k].equal(theirs[k]) for k in restarted.keys() & theirs.keys())


def test_continue_plans_one_search_per_learning_rate(tmp_path):
    """Under the 'continue' hand-off the search's weight steps are fine-tune steps at the job's LR: each LR of a
    method gets its own search; restart searches stay shared across LRs."""
    opts = Options(task="classification", train_file="x.csv", output_dir=str(tmp_path / "cmp"))
    c = runner.Comparison(opts, CompareOptions(methods=["diffora[handoff=continue]", "diffora"], seeds=[0]))
    c.methods = methods.parse_methods(c.settings.methods, opts)
    planned = c.plan("holdout", [0], lambda m: [1e-3, 2e-3], "tune:")
    searches = [j for j in planned if j.kind == "search"]
    assert [j.id for j in searches] == [
        "tune:search[handoff=continue]@lr=0.001@seed0",
        "tune:search[handoff=continue]@lr=0.002@seed0",
        "tune:search[default]@seed0",
    ]
    assert [j.spec.options["lr"] for j in searches[:2]] == [1e-3, 2e-3]
    needs = {j.id: j.needs for j in planned if j.kind == "finetune"}
    assert needs["tune:diffora[handoff=continue]@lr=0.002@seed0"] == searches[1].id
    assert needs["tune:diffora@lr=0.001@seed0"] == needs["tune:diffora@lr=0.002@seed0"] == searches[2].id
