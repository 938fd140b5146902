"""Does Mask Grounding DINO learn masks? Trains `experiment=mgd_quickstart` (the quickstart's small Grounding
DINO, real MiniLM text encoder, random image weights, plus the dynamic mask head) on the synthetic scenes for
a wall-time budget, then evaluates the final checkpoint on the validation split: COCO bbox and segm mAP, and
the segm mAP of the same detections with each box filled as its mask (the baseline a mask head must beat).
Prints `name: value` lines; wall_s covers training and this evaluation.

    python benchmarks/mgd_synthetic.py [--minutes 13] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import os
import time

from experiment_run import REPO, run_experiment


def evaluate(run_dir: str, overrides) -> dict:
    """bbox / segm / filled-box segm metrics of the run's final checkpoint on the synthetic validation split."""
    import torch
    from hydra import compose, initialize_config_dir

    from groundlab.config.store import register_configs
    from groundlab.data.build import build_grounding_dataset
    from groundlab.eval.coco_eval import CocoEvaluator
    from groundlab.predict.gdino import GDinoPredictor

    register_configs()
    with initialize_config_dir(os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=mgd_quickstart", f"results_dir={run_dir}", *overrides])
    val, collate = build_grounding_dataset(cfg, "val", augment=False)
    predictor = GDinoPredictor.from_checkpoint(cfg.model, os.path.join(run_dir, "mask_gdino_model_latest.pth"),
                                               torch.device("cpu"))
    gt = val.sources[0].name
    predicted = CocoEvaluator(gt, iou_types=("bbox", "segm"))
    filled = CocoEvaluator(gt, iou_types=("segm",))
    loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=collate)
    names, ids = val.sources[0].class_names, val.sources[0].category_ids
    for batch in loader:
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
        results = predictor.detect_classes(batch["images"], batch["padding_mask"], sizes, names)
        for target, result, (h, w) in zip(batch["targets"], results, sizes.tolist()):
            image_id = int(target["image_id"])
            predicted.update(image_id, result, ids)
            boxes = torch.zeros(len(result["boxes"]), h, w, dtype=torch.bool)
            for k, (x1, y1, x2, y2) in enumerate(result["boxes"].round().long().tolist()):
                boxes[k, max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
            filled.update(image_id, dict(result, masks=boxes), ids)
    ours, base = predicted.summarize(), filled.summarize()
    return {"bbox_mAP50": ours["bbox"]["AP50"], "bbox_mAP": ours["bbox"]["AP"], "segm_mAP50": ours["segm"]["AP50"],
            "segm_mAP": ours["segm"]["AP"], "filled_box_segm_mAP50": base["segm"]["AP50"],
            "filled_box_segm_mAP": base["segm"]["AP"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=13.0, help="training budget (train.max_time_minutes)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    start = time.perf_counter()
    run_dir, train_wall, rows = run_experiment("mgd_quickstart", args.minutes, args.overrides, "segm_val_mAP50")
    for r in rows:
        print(f"epoch_{int(r['epoch']):03d}_val_mAP50: {float(r['val_mAP50']):.4f}  "
              f"segm_val_mAP50: {float(r['segm_val_mAP50']):.4f}")
    metrics = evaluate(run_dir, args.overrides)
    print(f"train_wall_s: {train_wall:.1f}")
    print(f"wall_s: {time.perf_counter() - start:.1f}")
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"segm_mAP_over_filled_box: {metrics['segm_mAP'] - metrics['filled_box_segm_mAP']:.4f}")
    print(f"run_dir: {run_dir}")


if __name__ == "__main__":
    main()
