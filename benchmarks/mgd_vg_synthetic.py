"""Does Mask Grounding DINO learn referring segmentation? The user's path in two stages on one wall-time budget:
(1) `experiment=mgd_quickstart` learns instance segmentation of the synthetic scenes (OD, 4 epochs), then (2)
`experiment=mgd_vg_quickstart` (the same model plus 16 region queries) starts from that checkpoint
(`train.pretrained_model_path`; the region head starts from random weights) and learns the synthetic referring
split. `action=evaluate` then scores the final checkpoint on the validation expressions of unseen scenes (a fifth
of which refer to nothing). Prints `name: value` lines: per-epoch validation curves of both stages, the stages'
and the total wall_s, and the final gIoU, cIoU, N_acc, T_acc, Pr@0.7/0.8/0.9 (fractions in 0..1) and the IoU per
expression kind. Issue 13's target on 2 cores: gIoU >= 0.70, N_acc and T_acc >= 0.85 within 20 minutes.

    python benchmarks/mgd_vg_synthetic.py [--od-minutes 6 --od-epochs 4] [--minutes 13] [extra VG overrides ...]

`--od-minutes 0` trains the referring model from random image weights in one stage (the earlier recipe).
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


def per_kind_iou(run_dir: str, overrides) -> dict:
    """Mean IoU per expression kind (category, colour, shape, size, position, relation, no_target): evaluate's
    per-expression detections.json joined with the synthetic referring split's `kind` of each line."""
    from hydra import compose, initialize_config_dir

    from groundlab.config.store import register_configs
    from groundlab.data.sources import synthetic_paths

    register_configs()
    with initialize_config_dir(os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=mgd_vg_quickstart", *overrides])
    paths = synthetic_paths(cfg.dataset, os.path.expanduser(cfg.cache_dir))
    with open(paths.referring_val) as f:
        kinds = {line_no: json.loads(line)["grounding"].get("kind", "?") for line_no, line in enumerate(f, 1)}
    with open(os.path.join(run_dir, "evaluate", "detections.json")) as f:
        rows = json.load(f)
    out: dict = {}
    for r in rows:
        out.setdefault(kinds.get(int(r["image_id"]), "?"), []).append(float(r["iou"]))
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(out.items())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--od-minutes", type=float, default=6.0,
                        help="stage 1 budget: instance segmentation (0: no stage 1, the VG run starts from scratch)")
    parser.add_argument("--od-epochs", type=int, default=4, help="stage 1 epochs (its cosine schedule's length)")
    parser.add_argument("--minutes", type=float, default=13.0, help="stage 2 budget: referring segmentation")
    parser.add_argument("overrides", nargs="*", help="overrides of the referring stage (and its evaluation)")
    args = parser.parse_args()
    start = time.perf_counter()
    overrides = list(args.overrides)
    if args.od_minutes > 0:
        od_dir, od_wall, od_rows = run_experiment("mgd_quickstart", args.od_minutes,
                                                  [f"train.num_epochs={args.od_epochs}"], "segm_val_mAP50")
        for r in od_rows:
            print(f"od_epoch_{int(r['epoch']):03d}: " + "  ".join(
                f"{k}: {float(r[k]):.4f}" for k in ("val_mAP50", "segm_val_mAP50") if r.get(k)))
        print(f"od_train_wall_s: {od_wall:.1f}")
        overrides = [f"train.pretrained_model_path={os.path.join(od_dir, 'mask_gdino_model_latest.pth')}",
                     *overrides]
    run_dir, train_wall, rows = run_experiment("mgd_vg_quickstart", args.minutes, overrides, "val_gIoU")
    for r in rows:
        print(f"epoch_{int(r['epoch']):03d}: " + "  ".join(f"{k}: {float(r[k]):.4f}" for k in CURVES if r.get(k)))
    metrics = evaluate(run_dir, args.overrides)
    print(f"train_wall_s: {train_wall:.1f}")
    print(f"wall_s: {time.perf_counter() - start:.1f}")
    for key in FINAL:
        value = metrics.get(key)
        print(f"{key}: {'nan' if value is None else f'{float(value):.4f}'}")
    for kind, (iou, n) in per_kind_iou(run_dir, args.overrides).items():
        print(f"IoU_{kind}: {iou:.4f}  (n={n})")
    print(f"run_dir: {run_dir}")


if __name__ == "__main__":
    main()
