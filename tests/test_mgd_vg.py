"""Referring segmentation (TAO's VG mode) end to end on the tiny Mask Grounding DINO with region queries and the
synthetic referring split: train (validation logs the referring metrics) -> evaluate (results.json and the
per-expression detections.json) -> export (no_targets and union_mask_logits outputs; ONNX Runtime evaluates as
PyTorch does) -> inference (one output per expression, the expression on every annotated image,
a red "no target" bar when the model decides an expression refers to nothing)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from conftest import TINY_GDINO
from groundlab.deploy.mask_overlay import draw_expression_banner
from groundlab.runner import run_action

TINY_VG = ["experiment=mgd_vg_quickstart", *TINY_GDINO, "model.num_region_queries=4", "dataset.synthetic.num_train=8",
           "dataset.synthetic.num_val=4", "dataset.synthetic.image_size=[64,64]", "dataset.workers=0",
           "dataset.batch_size=4", "dataset.augmentation.scales=[64]", "dataset.augmentation.test_random_resize=64",
           "dataset.augmentation.train_random_resize=[64]", "dataset.augmentation.train_random_crop_min=64",
           "dataset.augmentation.train_random_crop_max=64", "train.max_time_minutes=null"]


def test_the_banner_shows_the_expression_and_a_no_target_answer():
    picture = Image.fromarray(np.full((40, 200, 3), 255, dtype=np.uint8))
    found = np.asarray(draw_expression_banner(picture, "red circle", no_target=False))
    empty = np.asarray(draw_expression_banner(picture, "red circle", no_target=True))
    assert (found[1, 150] == [0x20, 0x20, 0x20]).all()  # a dark bar across the top
    assert (empty[1, 150] == [0xC0, 0x39, 0x2B]).all()  # red: "no target: red circle"
    assert (found[30:] == 255).all() and (empty[30:] == 255).all()  # the picture below is untouched
    assert (empty[:14] != found[:14]).any()


@pytest.mark.slow
def test_train_evaluate_and_infer_referring_expressions(compose, tmp_path):
    from pycocotools import mask as mask_utils

    metrics = run_action(compose(TINY_VG + ["train.num_epochs=1"], results_dir=str(tmp_path / "train")))
    assert {"val_gIoU", "val_cIoU", "val_T_acc", "val_Pr7"} <= set(metrics)
    ckpt = tmp_path / "train" / "mask_gdino_model_latest.pth"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["model_config"]["num_region_queries"] == 4
    assert any(k.startswith("model.region_head.") for k in saved["state_dict"])

    # conf_threshold 0: every instance the union keeps is scored, so detections.json has some to check
    scores = run_action(compose(TINY_VG + ["action=evaluate", f"evaluate.checkpoint={ckpt}",
                                           "evaluate.conf_threshold=0.0", "evaluate.ioi_threshold=0.0"],
                                results_dir=str(tmp_path / "ev")))
    assert {"gIoU", "cIoU", "N_acc", "T_acc", "Pr@0.7", "num_samples"} <= set(scores)
    out = tmp_path / "ev" / "evaluate"
    results = json.loads((out / "results.json").read_text())
    assert results["data_type"] == "VG" and results["metrics"]["num_samples"] == 8  # 2 expressions per scene
    rows = json.loads((out / "detections.json").read_text())
    assert len(rows) == 8 and all({"expression", "no_target", "iou", "detections"} <= set(r) for r in rows)
    found = [d for r in rows for d in r["detections"]]
    for r in rows:
        if r["no_target"]:
            assert r["detections"] == []
    if found:
        assert mask_utils.decode(found[0]["segmentation"]).shape == (64, 64)
        expression = next(r["expression"] for r in rows if r["detections"])
        assert all(word in expression.split() for word in next(
            r["detections"][0]["label"] for r in rows if r["detections"]).split())

    # the exported graph adds no_targets and union_mask_logits, and ONNX Runtime evaluates VG as PyTorch does
    run_action(compose(TINY_VG + ["action=export", f"export.checkpoint={ckpt}", "export.input_height=64",
                                  "export.input_width=64"], results_dir=str(tmp_path / "export")))
    onnx_file = tmp_path / "export" / "mask_gdino.onnx"
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    shapes = {o.name: o.shape for o in session.get_outputs()}
    assert shapes["no_targets"] == ["batch_size", 2] and shapes["union_mask_logits"] == ["batch_size", 2, 8, 8]
    ort = run_action(compose(TINY_VG + ["action=evaluate", f"evaluate.onnx_file={onnx_file}",
                                        "evaluate.conf_threshold=0.0", "evaluate.ioi_threshold=0.0"],
                             results_dir=str(tmp_path / "ev_onnx")))
    for key in ("gIoU", "cIoU", "N_acc", "T_acc"):
        assert ort[key] == pytest.approx(scores[key], abs=0.005, nan_ok=True), key
    onnx_rows = json.loads((tmp_path / "ev_onnx" / "evaluate" / "detections.json").read_text())
    assert [r["no_target"] for r in onnx_rows] == [r["no_target"] for r in rows]

    run_action(compose(TINY_VG + ["action=inference", f"inference.checkpoint={ckpt}", "inference.conf_threshold=0.0"],
                       results_dir=str(tmp_path / "inf")))
    inf = tmp_path / "inf" / "inference"
    images = json.loads((inf / "images.json").read_text())["images"]
    assert len(images) == 8 and all(isinstance(i["expression"], str) and "no_target" in i for i in images)
    annotated = sorted((inf / "images_annotated").glob("*.jpg"))
    assert len(annotated) == 8  # one per expression, though two share each scene
    assert len(list((inf / "labels").glob("*.txt"))) == 8


@pytest.mark.slow
def test_short_training_clearly_beats_the_untrained_model_on_expressions(compose, tmp_path, trained):
    """The user's path: the session's instance-segmentation quickstart model (conftest.trained) starts a referring
    model (its region head from random weights), trained briefly on 16 scenes' expressions (and their detection
    records); it segments those expressions far better than where it started. Validation reads the training
    expressions themselves, so a short CPU run shows the head learning, not generalizing (the benchmark,
    benchmarks/mgd_vg_synthetic.py, measures that on unseen scenes)."""
    from groundlab.data.sources import synthetic_paths
    from groundlab.models.gdino.build import build_gdino, save_gdino
    from groundlab.models.gdino.weights import load_weights

    od_runs, _ = trained("mgd_quickstart")
    od_ckpt = od_runs / "train" / "mgd_quickstart" / "mask_gdino_model_latest.pth"
    scenes = ["dataset.synthetic.num_train=16", "dataset.synthetic.num_val=4"]
    generated = compose(["experiment=mgd_vg_quickstart", *scenes])
    p = synthetic_paths(generated.dataset, generated.cache_dir)
    source = f"{{image_dir: {p.train_images}, json_file: {p.referring_train}"
    base = ["experiment=mgd_vg_quickstart", "dataset=odvg", "dataset.workers=0", "train.max_time_minutes=null",
            f"dataset.train_data_sources=[{source}}}, {{image_dir: {p.train_images}, json_file: {p.train_odvg}, "
            f"label_map: {p.label_map}}}]", f"dataset.val_data_sources={source}, data_type: VG}}"]
    torch.manual_seed(42)
    model_cfg = compose(base).model
    start = build_gdino(model_cfg).model
    report = load_weights(start, str(od_ckpt))
    assert report.new and all(k.startswith("region_head.") for k in report.new)
    start_ckpt = save_gdino(str(tmp_path / "start.pth"), start, model_cfg)
    before = run_action(compose(base + ["action=evaluate", f"evaluate.checkpoint={start_ckpt}"],
                                results_dir=str(tmp_path / "before")))
    after = run_action(compose(base + [f"train.pretrained_model_path={od_ckpt}", "train.num_epochs=6",
                                       "train.validation_interval=6", "train.optim.warmup_steps=10"],
                               results_dir=str(tmp_path / "train")))
    print(before, {k: v for k, v in after.items() if k.startswith("val_")})
    assert after["val_gIoU"] >= before["gIoU"] + 0.15, (before, after)
    assert after["val_T_acc"] > before["T_acc"], (before, after)
