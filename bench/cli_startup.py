"""How long ``brecq --help`` and ``brecq study --example`` take (a fresh process each), against bare
``python -c pass``: the command line must answer at once, without importing torch.

    python bench/cli_startup.py [--runs 10]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def timed(command: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(1e3 * (time.perf_counter() - started))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "brecq --help": [sys.executable, "-m", "brecq.cli", "--help"],
                "brecq study --example": [sys.executable, "-m", "brecq.cli", "study", "--example"],
                "import brecq_ext (torch)": [sys.executable, "-c", "import brecq_ext"]}
    print("| command | median ms | min-max |\n|---|---:|---:|")
    for name, command in commands.items():
        t = timed(command, args.runs)
        print(f"| {name} | {statistics.median(t):.0f} | {min(t):.0f}-{max(t):.0f} |")


if __name__ == "__main__":
    main()
