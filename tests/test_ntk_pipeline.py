"""NTK selection, the lambda_min diagnostic and budget concentration, through the library and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_batch, sentiment_data_args, tiny_model, write_sentiment_csvs

from diffora import choose_modules
from diffora.method.export import export_search

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TRAIN_FAST = [
    "--max-length",
    "32",
    "--batch-size",
    "8",
    "--eval-batch-size",
    "32",
    "--epochs",
    "1",
    "--lr",
    "1e-2",
    "--quiet",
]
FAST = [*TRAIN_FAST, "--search-epochs", "1", "--gate-warmup-steps", "3", "--search-lr", "1e-2", "--ntk-examples", "12"]


def diffora(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "diffora.cli", *args], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    return sentiment_data_args(write_sentiment_csvs(tmp_path_factory.mktemp("sentiment"), 120, 40))


def test_every_run_records_the_ntk_diagnostic(data, tiny_bert_dir, tmp_path):
    diffora("run", *data, "--model", str(tiny_bert_dir), "--output-dir", str(tmp_path / "out"), *FAST)
    record = json.loads((tmp_path / "out" / "dam.json").read_text())
    ntk = record["ntk"]
    assert ntk["n_examples"] == 12 and len(ntk["lambda_min_random"]) == 20
    # adding modules only adds PSD kernels: all candidates bound every subset from above
    assert 0 < ntk["lambda_min_selected"] <= ntk["lambda_min_all"]
    assert max(ntk["lambda_min_random"]) <= ntk["lambda_min_all"] * (1 + 1e-9)
    assert record["config"]["selection_score"] == "gate"  # the default ranking; the diagnostic comes with any


def test_ntk_selection_without_a_search(data, tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    diffora(
        "run",
        *data,
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(out),
        *FAST,
        "--selection-score",
        "ntk",
        "--search-epochs",
        "0",
        "--search-steps",
        "0",
    )
    record = json.loads((out / "dam.json").read_text())
    assert record["weight_steps"] == 0 and record["gate_steps"] == 0
    mask = record["selection"]["mask"]
    assert [sum(row) for row in mask] == [3, 3]  # rho 0.5 of 6 types in each of the 2 layers
    # greedy maximises lambda_min: the chosen set beats the typical random set of the same size
    ntk = record["ntk"]
    assert ntk["lambda_min_selected"] >= sorted(ntk["lambda_min_random"])[len(ntk["lambda_min_random"]) // 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["search_seconds"] >= 0 and (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("mode", ["uniform", "proportional"])
def test_rank_allocation_spends_lora_alls_budget_and_reloads_in_stock_peft(mode, data, tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    diffora(
        "run",
        *data,
        "--model",
        str(tiny_bert_dir),
        "--output-dir",
        str(out),
        *FAST,
        "--rank",
        "4",
        "--rank-allocation",
        mode,
    )
    record = json.loads((out / "dam.json").read_text())
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ranks = record["ranks"]
    assert set(ranks) == set(record["selection"]["modules"])
    assert adapter["rank_pattern"] and all(r >= 1 for r in adapter["rank_pattern"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    budget = record["selection"]["total_lora_params"]  # all candidates at rank 4 = LoRA-all's parameters
    assert 0.95 * budget <= metrics["lora_params"] <= budget
    # a stock PEFT reload (no diffora code) reproduces the metrics the run wrote
    script = f"""
import json, sys, torch, transformers
from peft import PeftModel
base = transformers.AutoModelForSequenceClassification.from_pretrained({str(tiny_bert_dir)!r}, num_labels=2)
model = PeftModel.from_pretrained(base, {str(out / "adapter")!r})
shapes = {{n: tuple(p.shape) for n, p in model.named_parameters() if "lora_A" in n}}
print(json.dumps(shapes)); assert "diffora" not in sys.modules
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shapes = json.loads(done.stdout)
    for name, r in ranks.items():
        key = next(k for k in shapes if f".{name}.lora_A" in k)
        assert shapes[key][0] == r


def test_concentrated_export_computes_what_the_plain_export_computes():
    """Weight sharing into wider branches is exact: rank r -> r' adds zero columns to B at the same scale."""
    from diffora import DiffoRAConfig, prepare_search
    from diffora.select.ranks import concentrate_ranks

    def searched():
        search = prepare_search(
            tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            DiffoRAConfig(rank=4, gate_warmup_steps=1, seed=2),
        )
        batch = random_batch()
        for _ in range(3):
            search.weight_step(batch)
            search.gate_step(random_batch(seed=5))
        return search

    batch = {k: v for k, v in random_batch(seed=9).items() if k != "labels"}
    plain_search = searched()
    plain = export_search(plain_search, choose_modules(plain_search)).eval()
    wide_search = searched()
    selection = choose_modules(wide_search)
    ranks = concentrate_ranks(wide_search.grid, selection, 4, mode="uniform")
    assert max(ranks.values()) > 4
    wide = export_search(wide_search, selection, ranks=ranks).eval()
    with torch.no_grad():
        torch.testing.assert_close(wide(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-6)
    lora_a = {n: p.shape[0] for n, p in wide.named_parameters() if "lora_A" in n}
    assert max(lora_a.values()) == max(ranks.values())


def test_diffora_ntk_command_selects_without_a_search_and_train_uses_it(data, tiny_bert_dir, tmp_path):
    out = tmp_path / "ntk"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffora.cli",
            "ntk",
            *data,
            "--model",
            str(tiny_bert_dir),
            "--output-dir",
            str(out),
            "--max-length",
            "32",
            "--ntk-examples",
            "12",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lambda_min of the LoRA kernel" in result.stdout and "random sets" in result.stdout
    record = json.loads((out / "dam.json").read_text())
    assert record["config"]["selection_score"] == "ntk" and record["weight_steps"] == 0
    assert record["ntk"]["selected_rank_among_random"] >= 0.5
    diffora(
        "train",
        *data,
        "--model",
        str(tiny_bert_dir),
        "--dam",
        str(out / "dam.json"),
        "--output-dir",
        str(tmp_path / "trained"),
        *TRAIN_FAST,
    )
    metrics = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert metrics["kept_module_names"] == record["selection"]["modules"]
