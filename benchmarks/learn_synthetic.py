"""Does the quickstart learn? Trains `experiment=quickstart` (tiny Grounding DINO, real MiniLM text encoder,
synthetic shapes-and-colours) for a wall-time budget on this machine and prints the validation mAP50 curve,
the best mAP50 and when the target was first reached. Prints `name: value` lines.

    python benchmarks/learn_synthetic.py [--minutes 10] [--target 0.75] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import os

from experiment_run import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run_dir, wall, rows = run_experiment("quickstart", args.minutes, args.overrides, "val_mAP50")
    created = os.path.getmtime(os.path.join(run_dir, "run_info.json"))
    best, reached = 0.0, None
    for r in rows:
        value = float(r["val_mAP50"])
        best = max(best, value)
        print(f"epoch_{int(r['epoch']):03d}_step_{int(r['step']):05d}_val_mAP50: {value:.4f}")
    ckpts = sorted(f for f in os.listdir(run_dir) if f.startswith("model_epoch_"))
    for r in rows:  # first epoch at or above target, with the wall time of its checkpoint
        if float(r["val_mAP50"]) >= args.target:
            epoch = int(r["epoch"]) + 1
            match = [f for f in ckpts if f.startswith(f"model_epoch_{epoch:03d}_")]
            if match:
                reached = os.path.getmtime(os.path.join(run_dir, match[0])) - created
            break
    print(f"wall_time_s: {wall:.1f}")
    print(f"budget_minutes: {args.minutes}")
    print(f"best_val_mAP50: {best:.4f}")
    print(f"final_val_mAP50: {float(rows[-1]['val_mAP50']) if rows else 0.0:.4f}")
    print(f"target_val_mAP50: {args.target}")
    print(f"target_reached_after_s: {reached:.1f}" if reached is not None else "target_reached_after_s: never")
    print(f"run_dir: {run_dir}")


if __name__ == "__main__":
    main()
