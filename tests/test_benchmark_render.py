"""Pieces of ``benchmarks/render.py`` that must agree with the library (no GLUE data needed)."""

from __future__ import annotations


import pytest
import torch

from conftest import load_benchmark, tiny_model
from diffora import DiffoRAConfig, find_candidates
from diffora.gates import DAMGates


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
    base = {"format": "diffora.benchmark/1", "task": "sst2", "suite": "main", "command": "c", "started": "s",
            "runs": [{"method": "a", "seed": 0}], "searches": [], "errors": [], "seeds": [0], "_path": "x"}
    old = dict(base, budget={"lr": 5e-4})
    new = dict(base, budget={"lr": 5e-4, "adalora_lr": None}, runs=[{"method": "b", "seed": 0}], _path="y")
    merged = render.merge([old, new])
    assert len(merged) == 1 and {r["method"] for r in merged[0]["runs"]} == {"a", "b"}
    other = dict(base, budget={"lr": 1e-3}, _path="z")  # another budget: kept as its own report
    assert sorted(len(m["runs"]) for m in render.merge([old, other])) == [1, 1]
