"""Does Mask Grounding DINO learn referring segmentation? Trains `experiment=mgd_vg_quickstart` (the quickstart's
small Mask Grounding DINO plus 16 region queries) on the synthetic referring split for a wall-time budget, then
runs `action=evaluate` on the final checkpoint over the validation expressions (a fifth of which refer to
nothing). Prints `name: value` lines: per-epoch validation curves, wall_s (training and evaluation), and the
final gIoU, cIoU, N_acc, T_acc, Pr@0.7/0.8/0.9 (fractions in 0..1). Issue 13's target on 2 cores: gIoU >= 0.70,
N_acc and T_acc >= 0.85 within 20 minutes.

    python benchmarks/mgd_vg_synthetic.py [--minutes 18] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from experiment_run import REPO, run_experiment

CURVES = ("val_gIoU", "val_cIoU", "val_N_acc", "val_T_acc")
FINAL = ("gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "Pr@0.8", "Pr@0.9", "num_samples", "num_no_target")


def evaluate(run_dir: str, overrides) -> dict:
    """The metrics of action=evaluate on the run's latest checkpoint (results.json)."""
    cmd = [sys.executable, os.path.join(REPO, "run.py"), "experiment=mgd_vg_quickstart", "action=evaluate",
           f"evaluate.checkpoint={os.path.join(run_dir, 'mask_gdino_model_latest.pth')}", f"results_dir={run_dir}",
           f"hydra.run.dir={os.path.join(run_dir, 'evaluate_run')}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    with open(os.path.join(run_dir, "evaluate", "results.json")) as f:
        return json.load(f)["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=18.0, help="training budget (train.max_time_minutes)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    start = time.perf_counter()
    run_dir, train_wall, rows = run_experiment("mgd_vg_quickstart", args.minutes, args.overrides, "val_gIoU")
    for r in rows:
        print(f"epoch_{int(r['epoch']):03d}: " + "  ".join(f"{k}: {float(r[k]):.4f}" for k in CURVES if r.get(k)))
    metrics = evaluate(run_dir, args.overrides)
    print(f"train_wall_s: {train_wall:.1f}")
    print(f"wall_s: {time.perf_counter() - start:.1f}")
    for key in FINAL:
        value = metrics.get(key)
        print(f"{key}: {'nan' if value is None else f'{float(value):.4f}'}")
    print(f"run_dir: {run_dir}")


if __name__ == "__main__":
    main()
