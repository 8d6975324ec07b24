"""Median wall time of ``diffora --help`` and ``diffora run --help`` over 5 runs each (issue #21 item 5: under
1.5 s; heavy libraries load only when a command runs). A script, not a test: timings depend on the machine.

    python benchmarks/cli_help_time.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["run", "--help"])


def wall_times(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffora.cli", *argv], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for argv in COMMANDS:
        times = wall_times(argv, args.runs)
        print(
            f"diffora {' '.join(argv):<12} median {statistics.median(times):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} runs)"
        )


if __name__ == "__main__":
    main()
