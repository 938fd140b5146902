"""Mask Grounding DINO end to end on the tiny model and the synthetic dataset: train -> evaluate (COCO bbox +
segm) -> inference (masks in every output), fine-tuning from a Grounding DINO checkpoint the way TAO's users
do (detector weights loaded, mask head newly initialized, TAO's freeze names), and a short training run whose
segm mAP clearly beats the untrained model's."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import TINY_GDINO, TRAINED_RECIPE
from groundlab.runner import run_action

TINY = ["experiment=mgd_quickstart", *TINY_GDINO, "dataset.synthetic.num_train=16", "dataset.synthetic.num_val=4",
        "dataset.synthetic.image_size=[64,64]", "dataset.workers=0", "dataset.batch_size=8",
        "dataset.augmentation.scales=[64]", "dataset.augmentation.test_random_resize=64",
        "dataset.augmentation.train_random_resize=[64]", "dataset.augmentation.train_random_crop_min=48",
        "dataset.augmentation.train_random_crop_max=64", "train.max_time_minutes=null"]


@pytest.mark.slow
def test_train_evaluate_and_infer_with_masks(compose, tmp_path):
    from pycocotools import mask as mask_utils

    metrics = run_action(compose(TINY + ["train.num_epochs=1"], results_dir=str(tmp_path / "train")))
    assert {"val_mAP50", "segm_val_mAP", "segm_val_mAP50"} <= set(metrics)
    ckpt = tmp_path / "train" / "mask_gdino_model_latest.pth"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["model_name"] == "mask_gdino" and saved["model_config"]["has_mask"]
    assert any(k.startswith("model.controller.") for k in saved["state_dict"])

    scores = run_action(compose(TINY + ["action=evaluate", f"evaluate.checkpoint={ckpt}"],
                                results_dir=str(tmp_path / "ev")))
    assert {"mAP50", "segm_mAP", "segm_mAP50"} <= set(scores)
    results = json.loads((tmp_path / "ev" / "evaluate" / "results.json").read_text())["metrics"]
    assert {"bbox", "segm"} <= set(results) and "per_class_AP" in results["segm"]

    run_action(compose(TINY + ["action=inference", f"inference.checkpoint={ckpt}", "inference.conf_threshold=0.0"],
                       results_dir=str(tmp_path / "inf")))
    detections = json.loads((tmp_path / "inf" / "inference" / "results.json").read_text())
    assert detections and all("segmentation" in d for d in detections)
    mask = mask_utils.decode(detections[0]["segmentation"])
    assert mask.shape == (64, 64)
    assert list((tmp_path / "inf" / "inference" / "images_annotated").glob("*.jpg"))


@pytest.mark.slow
def test_a_grounding_dino_checkpoint_fine_tunes_into_mask_grounding_dino(compose, tmp_path, caplog):
    """train.pretrained_model_path = a Grounding DINO checkpoint: every detector weight loads, the mask head
    starts new (and says so), and TAO's `freeze: [backbone.0, bert]` keeps the image backbone as it came."""
    from groundlab.models.gdino.build import build_gdino, save_gdino

    gdino_cfg = compose(["experiment=quickstart", *TINY[1:]]).model  # the same detector, no mask head
    assert not gdino_cfg.has_mask
    torch.manual_seed(1)
    detector = build_gdino(gdino_cfg).model
    ckpt = save_gdino(str(tmp_path / "gdino.pth"), detector, gdino_cfg)
    cfg = compose(TINY + ["train.num_epochs=1", f"train.pretrained_model_path={ckpt}",
                          "train.freeze=[backbone.0,bert]"], results_dir=str(tmp_path / "ft"))
    with caplog.at_level(logging.INFO):
        run_action(cfg)
    assert "mask-head weights newly initialized" in caplog.text
    tuned = torch.load(tmp_path / "ft" / "mask_gdino_model_latest.pth", map_location="cpu", weights_only=True)
    state = {k[len("model."):]: v for k, v in tuned["state_dict"].items()}
    for key, value in detector.state_dict().items():
        if key.startswith(("backbone.", "bert.")):  # frozen: exactly the Grounding DINO weights
            assert torch.equal(state[key], value), key
    assert not torch.equal(state["transformer.tgt_embed.weight"], detector.state_dict()["transformer.tgt_embed.weight"])
    assert {"controller.layers.0.weight", "mask_head.jia_dcn.weight"} <= set(state)


@pytest.mark.slow
def test_short_training_clearly_beats_the_untrained_model_on_masks(compose, tmp_path, trained):
    """mgd_quickstart for 3 epochs on 256 scenes (the session's trained one, conftest.TRAINED_RECIPE): segm mAP
    well above the untrained model's on the same validation images (deterministic: fixed seed, per-sample
    augmentation seeds)."""
    from groundlab.models.gdino.build import build_gdino, save_gdino

    base = ["experiment=mgd_quickstart", *TRAINED_RECIPE]
    torch.manual_seed(42)
    model_cfg = compose(base).model
    untrained = save_gdino(str(tmp_path / "untrained.pth"), build_gdino(model_cfg).model, model_cfg)
    before = run_action(compose(base + ["action=evaluate", f"evaluate.checkpoint={untrained}"],
                                results_dir=str(tmp_path / "before")))
    after = trained("mgd_quickstart")[1]
    assert after["segm_val_mAP50"] >= before["segm_mAP50"] + 0.05, (before, after)
    assert after["segm_val_mAP"] >= 3 * before["segm_mAP"] and after["segm_val_mAP"] > 0.01, (before, after)
