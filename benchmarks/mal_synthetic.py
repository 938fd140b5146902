"""Does MAL learn masks from boxes alone? Trains `experiment=mal_quickstart` (small ViT, synthetic shapes,
box-only train json) for a wall-time budget on this machine and prints the validation mIoU per epoch
against the true masks, next to the box-as-mask baseline (every box filled) on the same boxes.
Prints `name: value` lines.

    python benchmarks/mal_synthetic.py [--minutes 10] [extra overrides ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from experiment_run import REPO, run_experiment


def box_baseline(overrides) -> dict:
    """mIoU of the boxes themselves taken as masks, on the validation crops the model is scored on."""
    import torch
    from hydra import compose, initialize_config_dir

    from groundlab.config.store import register_configs
    from groundlab.ops.paste import paste_mask
    from groundlab.engine.mal_data import MALDataModule
    from groundlab.eval.mask_miou import MaskIoUMeter
    from groundlab.eval.mask_miou import score_batch

    register_configs()
    with initialize_config_dir(os.path.join(REPO, "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=mal_quickstart", *overrides])
    cfg.results_dir = tempfile.mkdtemp()
    dm = MALDataModule(cfg).prepare()
    meter = MaskIoUMeter(len(dm.val_data.class_names))
    for batch in dm.val_dataloader():
        masks = []
        for ext, box, size in zip(batch["ext"].tolist(), batch["box"].tolist(), batch["size"].tolist()):
            ones = torch.ones(4, 4)  # any positive constant: paste_mask cuts it to the box
            region, place = paste_mask(ones, ext, box, size[0], size[1])
            masks.append((region > 0.5, place))
        score_batch(masks, batch, meter)
    return meter.compute(dm.val_data.class_names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--target", type=float, default=0.75)
    parser.add_argument("--margin", type=float, default=0.1, help="required gain over the box baseline")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    baseline = box_baseline(args.overrides)
    run_dir, wall, rows = run_experiment("mal_quickstart", args.minutes, args.overrides, "val_mIoU")
    for r in rows:
        print(f"epoch_{int(r['epoch']):03d}_step_{int(r['step']):05d}_val_mIoU: {float(r['val_mIoU']):.4f}")
    final = float(rows[-1]["val_mIoU"]) if rows else 0.0
    last = rows[-1] if rows else {}
    print(f"wall_time_s: {wall:.1f}")
    print(f"budget_minutes: {args.minutes}")
    print(f"box_baseline_mIoU: {baseline['mIoU']:.4f}")
    for size in ("small", "medium", "large"):
        if baseline.get(f"mIoU_{size}") is not None:
            print(f"box_baseline_mIoU_{size}: {baseline[f'mIoU_{size}']:.4f}")
        if last.get(f"val_mIoU_{size}"):
            print(f"final_mIoU_{size}: {float(last[f'val_mIoU_{size}']):.4f}")
    print(f"final_mIoU: {final:.4f}")
    print(f"gain_over_baseline: {final - baseline['mIoU']:.4f}")
    print(f"target_met: {final >= args.target and final - baseline['mIoU'] >= args.margin}")
    print(f"run_dir: {run_dir}")


if __name__ == "__main__":
    main()
