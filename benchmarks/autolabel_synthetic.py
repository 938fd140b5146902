"""Is a Mask Grounding DINO trained on MAL's pseudo-masks as good as one trained on true masks? On the synthetic
scenes, the same recipe (experiment=autolabel_quickstart's Mask Grounding DINO, i.e. mgd_quickstart's) trains
(a) on the training split's true masks and (b) on MAL's masks made from its boxes alone (the auto-label pipeline:
MAL trained on the boxes, then labelling them); both are evaluated on the true val masks.

Prints `name: value` lines: true_mask_segm_mAP, pseudo_mask_segm_mAP, ratio (b / a; target >= 0.9),
pseudo_mask_mIoU (MAL's masks against the true train masks; boxes MAL could not label count 0), the boxes
without a pseudo-mask, mAP50s, each step's seconds and wall_s. Training runs by epochs, not wall time
(train.max_time_minutes=null for every model), so a busy machine changes the time, not the result.

    python benchmarks/autolabel_synthetic.py [--workdir DIR] [extra overrides ...]
A rerun with the same --workdir resumes both runs where they stopped (the pipeline's steps, training checkpoints).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="run dirs go here (default: a new temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    from groundlab.actions.autolabel import _run
    from groundlab.actions.autolabel_configs import mask_gdino_config, pipeline_inputs
    from groundlab.config import check_config
    from groundlab.config.compose import compose_config
    from groundlab.console import quiet_libraries
    from groundlab.data.sources import synthetic_paths
    from groundlab.engine.run_dirs import latest_path
    from groundlab.runner import run_action

    quiet_libraries()
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="autolabel_bench_"))
    overrides = ["experiment=autolabel_quickstart", "train.max_time_minutes=null",
                 "autolabel.mal_overrides=['experiment=mal_quickstart','train.num_epochs=2','train.max_time_minutes=null']",
                 *args.overrides]
    start = time.perf_counter()

    # (b) the pipeline: boxes -> MAL -> pseudo-masks -> Mask Grounding DINO -> segm mAP on the true val masks
    pipeline_dir = os.path.join(work, "pipeline")
    cfg = compose_config([*overrides, f"results_dir={pipeline_dir}"])
    check_config(cfg)
    pseudo = run_action(cfg)
    steps = json.load(open(os.path.join(pipeline_dir, "pipeline.json")))["steps"]

    # (a) the same recipe on the true masks of the same training images
    t0 = time.perf_counter()
    inputs = pipeline_inputs(cfg)
    true_json = synthetic_paths(cfg.dataset, cfg.cache_dir).train_coco
    train_dir, eval_dir = os.path.join(work, "true_masks_train"), os.path.join(work, "true_masks_evaluate")
    step = mask_gdino_config(cfg, train_dir, "train", true_json, inputs)
    check_config(step)
    _run(step)
    step = mask_gdino_config(cfg, eval_dir, "evaluate", None, inputs, latest_path(train_dir, cfg.model.name))
    true = _run(step)
    true_seconds = time.perf_counter() - t0

    print(f"true_mask_segm_mAP: {true['segm_mAP']:.4f}")
    print(f"pseudo_mask_segm_mAP: {pseudo['segm_mAP']:.4f}")
    print(f"ratio: {pseudo['segm_mAP'] / max(true['segm_mAP'], 1e-9):.4f}")
    print(f"pseudo_mask_mIoU: {pseudo['pseudo_mask_mIoU']:.4f}")
    print(f"true_mask_segm_mAP50: {true['segm_mAP50']:.4f}")
    print(f"pseudo_mask_segm_mAP50: {pseudo['segm_mAP50']:.4f}")
    print(f"ratio_mAP50: {pseudo['segm_mAP50'] / max(true['segm_mAP50'], 1e-9):.4f}")
    print(f"true_mask_bbox_mAP: {true['mAP']:.4f}")
    print(f"pseudo_mask_bbox_mAP: {pseudo['mAP']:.4f}")
    print(f"boxes: {pseudo['boxes']:.0f}")
    print(f"boxes_without_pseudo_mask: {pseudo['missing_masks']:.0f}")
    for name in ("mal_train", "mal_labels", "mask_gdino_train", "evaluate"):
        print(f"{name}_s: {steps[name]['seconds']:.0f}")
    print(f"true_mask_train_and_evaluate_s: {true_seconds:.0f}")
    print(f"wall_s: {time.perf_counter() - start:.0f}")
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()
