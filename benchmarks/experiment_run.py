"""Runs `python run.py experiment=<name>` in a fresh temp run dir under a wall-time budget, for the learning
benchmarks; returns the run dir, the wall time and the validation rows of its CSV log."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_experiment(experiment: str, minutes: float, overrides: Sequence[str], metric: str
                   ) -> Tuple[str, float, List[Dict[str, str]]]:
    """(run dir, wall seconds, CSV rows that carry `metric`); exits with run.py's code and stderr on failure."""
    run_dir = tempfile.mkdtemp(prefix=f"{experiment}_")
    cmd = [sys.executable, os.path.join(REPO, "run.py"), f"experiment={experiment}", f"hydra.run.dir={run_dir}",
           f"train.max_time_minutes={minutes}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    with open(os.path.join(run_dir, "logs", "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(metric)]
    return run_dir, wall, rows
