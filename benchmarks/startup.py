"""Start-up latency of run.py: `--help`, a typo'd key, and a cross-field error must answer in
well under 3 s because heavy libraries load only inside the action. Prints `name: value` lines.

    python benchmarks/startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "help_s": ["--help"],
    "typo_key_error_s": ["model.max_txt_len=3"],
    "wrong_type_error_s": ["train.num_epochs=many"],
    "cross_field_error_s": ["model.num_queries=10", "model.num_select=20"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name, argv in CASES.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(REPO, "run.py"), *argv], cwd=REPO, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"{name}: {min(times):.2f}")


if __name__ == "__main__":
    main()
