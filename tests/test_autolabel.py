"""action=autolabel: boxes -> MAL pseudo-masks -> Mask Grounding DINO -> segm mAP on true masks. The pieces
(detections as a COCO dataset, masks for boxes MAL could not label, pseudo-mask mIoU, the step record) against
hand-made cases; the whole pipeline end to end on tiny synthetic settings, killed between steps and resumed by
the same command; Grounding DINO detections as the box source; bad settings fail in one sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SMALL_SYNTHETIC, TINY_GDINO
from groundlab.actions.pipeline_steps import Pipeline
from groundlab.config import ConfigError
from groundlab.data.pseudo_labels import box_mask, detections_to_coco, fill_missing_masks
from groundlab.eval.pseudo_mask_iou import pseudo_mask_iou
from groundlab.ops.masks import decode_segmentation, encode_mask

TINY_MGD = ["experiment=mgd_quickstart", *TINY_GDINO, "dataset.synthetic.num_train=16", "dataset.synthetic.num_val=4",
            "dataset.synthetic.image_size=[64,64]", "dataset.workers=0", "dataset.batch_size=8",
            "dataset.augmentation.scales=[64]", "dataset.augmentation.test_random_resize=64",
            "dataset.augmentation.train_random_resize=[64]", "dataset.augmentation.train_random_crop_min=48",
            "dataset.augmentation.train_random_crop_max=64", "train.max_time_minutes=null", "train.num_epochs=1"]
TINY_MAL = ["experiment=mal_quickstart", "train.max_time_minutes=null", "train.num_epochs=1",
            "model.vit_overrides={hidden_size:64,num_hidden_layers:2,num_attention_heads:2,intermediate_size:128}",
            "model.mask_head_hidden_channel=32", "model.mask_head_out_channel=32", "dataset.crop_size=64",
            "inference.draw_images=2"]
TINY_AUTOLABEL = [*TINY_MGD, "action=autolabel",
                  "autolabel.mal_overrides=[" + ",".join(f"'{o}'" for o in TINY_MAL) + "]"]


# ------------------------------------------------------------------------------------------- the pieces
def test_detections_become_a_box_dataset_above_the_threshold():
    images = [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30, "source": "/x"},
              {"id": 2, "file_name": "b.jpg", "height": 20, "width": 30, "source": "/x"}]
    dets = [{"image_id": 1, "category_id": 0, "bbox": [1, 2, 10, 5], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [3, 3, 4, 4], "score": 0.2},
            {"image_id": 2, "category_id": 1, "bbox": [3, 3, 0, 4], "score": 0.8}]  # degenerate: no box
    coco = detections_to_coco(dets, images, [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}], 0.3)
    assert [a["bbox"] for a in coco["annotations"]] == [[1.0, 2.0, 10.0, 5.0]]
    assert coco["annotations"][0]["area"] == 50.0 and coco["annotations"][0]["score"] == 0.9
    assert [im["id"] for im in coco["images"]] == [1, 2] and "source" not in coco["images"][0]  # negatives stay


def test_box_mask_is_the_clamped_rectangle():
    m = box_mask([2, 1, 3, 2], 5, 6)
    assert m.sum() == 6 and m[1:3, 2:5].all()
    assert box_mask([4, 3, 10, 10], 5, 6).sum() == 2 * 2  # clamped to the image


def _labelled():
    """MAL's output on one 8x8 image: box 1 labelled, box 2 with an empty mask, box 3 skipped (listed)."""
    full = np.zeros((8, 8), bool)
    full[1:4, 1:4] = True
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 3, 3], "segmentation": encode_mask(full),
             "area": 9.0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [4, 4, 2, 2],
             "segmentation": encode_mask(np.zeros((8, 8), bool)), "area": 0.0},
            {"id": 3, "image_id": 8, "category_id": 2, "bbox": [0, 0, 2, 2]}]
    return {"images": [{"id": 7, "file_name": "a.png", "height": 8, "width": 8},
                       {"id": 8, "file_name": "b.png", "height": 8, "width": 8}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns,
            "mal_skipped": [{"ann_id": 3, "ann_index": 2, "image_id": 8, "reason": "image could not be decoded"}]}


def test_boxes_without_a_mask_get_their_rectangle_counted_by_reason():
    out, counts = fill_missing_masks(_labelled(), "box")
    assert counts["boxes"] == 3 and counts["pseudo_masks"] == 1 and counts["missing_masks"] == 2
    assert counts["missing_by_reason"] == {"empty mask": 1, "image could not be decoded": 1}
    assert counts["box_masks"] == 2 and counts["images_dropped"] == 0
    rect = decode_segmentation(out["annotations"][1]["segmentation"], 8, 8)
    assert rect.sum() == 4 and rect[4:6, 4:6].all() and out["annotations"][1]["area"] == 4.0
    assert out["annotations"][0]["area"] == 9.0  # MAL's own masks untouched


def test_drop_image_leaves_out_every_image_with_a_box_without_mask():
    out, counts = fill_missing_masks(_labelled(), "drop_image")
    assert out["images"] == [] and out["annotations"] == []
    assert counts["images_dropped"] == 2 and counts["annotations_dropped"] == 3 and counts["missing_masks"] == 2


def test_pseudo_mask_miou_by_hand():
    truth = _labelled()
    true_full = np.zeros((8, 8), bool)
    true_full[1:4, 1:3] = True  # 6 px; the pseudo-mask (9 px) covers it: IoU 6/9
    truth["annotations"][0]["segmentation"] = encode_mask(true_full)
    truth["annotations"][1]["segmentation"] = encode_mask(box_mask([4, 4, 2, 2], 8, 8))  # pseudo empty: 0
    truth["annotations"][2]["segmentation"] = encode_mask(box_mask([0, 0, 2, 2], 8, 8))  # pseudo missing: 0
    out = pseudo_mask_iou(_labelled(), truth)
    assert out["num_instances"] == 3 and out["missing"] == 2
    # class a: mean(6/9, 0) = 1/3; class b: 0 -> mIoU = mean over classes = 1/6
    assert out["per_class"]["a"]["mIoU"] == pytest.approx(1 / 3) and out["mIoU"] == pytest.approx(1 / 6)


def test_pipeline_skips_complete_steps_and_reruns_changed_ones(tmp_path):
    runs = []

    def make(name):
        def fn(folder):
            os.makedirs(folder, exist_ok=True)
            runs.append(name)
            path = os.path.join(folder, "out.txt")
            open(path, "w").write(name)
            return {"outputs": {"out": path}, "metrics": {"n": len(runs)}}
        return fn

    pipe = Pipeline(str(tmp_path))
    a = pipe.step("a", {"x": 1}, make("a"))
    pipe.step("b", {"y": (1, 2)}, make("b"), after=[a])
    assert runs == ["a", "b"]
    pipe = Pipeline(str(tmp_path))  # the same command again: nothing runs
    a = pipe.step("a", {"x": 1}, make("a"))
    pipe.step("b", {"y": (1, 2)}, make("b"), after=[a])
    assert runs == ["a", "b"]
    pipe = Pipeline(str(tmp_path))  # a's input changed: a runs in a fresh folder (the old one kept), then b
    a = pipe.step("a", {"x": 2}, make("a"))
    pipe.step("b", {"y": (1, 2)}, make("b"), after=[a])
    kept = [p for p in os.listdir(tmp_path) if p.startswith("a.")]
    assert runs == ["a", "b", "a", "b"] and len(kept) == 1 and (tmp_path / kept[0] / "out.txt").exists()
    record = json.loads((tmp_path / "pipeline.json").read_text())
    assert record["order"] == ["a", "b"] and record["steps"]["b"]["inputs"]["a_finished"] == a["finished"]
    os.remove(a["outputs"]["out"])  # a missing output makes its step run again
    Pipeline(str(tmp_path)).step("a", {"x": 2}, make("a"))
    assert runs[-1] == "a" and len(runs) == 5


# ------------------------------------------------------------------------------------------- end to end
def _steps(run_dir) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())["steps"]


@pytest.mark.slow
def test_pipeline_killed_between_steps_resumes_with_the_same_command(compose, tmp_path, caplog):
    """run.py is killed (SIGKILL) once MAL's labels are written; the same command then skips the three finished
    steps, trains Mask Grounding DINO on the pseudo-masks and evaluates it on the true val masks."""
    from groundlab.runner import run_action

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *TINY_AUTOLABEL, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "pipeline.json").exists() and \
                    _steps(run_dir).get("mal_labels", {}).get("status") == "complete":
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = _steps(run_dir)
    assert [before[s]["status"] for s in ("boxes", "mal_train", "mal_labels")] == ["complete"] * 3
    assert before.get("mask_gdino_train", {}).get("status") != "complete"
    labels = json.loads(open(before["mal_labels"]["outputs"]["train_json"]).read())
    assert all(a.get("segmentation") for a in labels["annotations"])  # every box trainable

    caplog.set_level("INFO", logger="groundlab")
    metrics = run_action(compose(TINY_AUTOLABEL, results_dir=str(run_dir)))
    after = _steps(run_dir)
    for name in ("boxes", "mal_train", "mal_labels"):
        assert after[name]["finished"] == before[name]["finished"], name
        assert f"step {name}: complete" in caplog.text
    assert after["mask_gdino_train"]["status"] == after["evaluate"]["status"] == "complete"
    assert (run_dir / "mask_gdino_train" / "mask_gdino_model_latest.pth").exists()
    assert {"segm_mAP", "segm_mAP50", "mAP50", "pseudo_mask_mIoU", "missing_masks"} <= set(metrics)
    assert metrics["boxes"] == metrics["pseudo_mask_num_instances"] > 0
    assert 0.0 < metrics["pseudo_mask_mIoU"] <= 1.0
    assert after["mal_labels"]["metrics"]["pseudo_mask_mIoU"] == metrics["pseudo_mask_mIoU"]
    results = json.loads((run_dir / "evaluate" / "evaluate" / "results.json").read_text())
    assert "segm" in results["metrics"] and results["checkpoint"].endswith("mask_gdino_model_latest.pth")


@pytest.mark.slow
def test_grounding_dino_detections_as_the_box_source(compose, tmp_path):
    """box_source=gdino: an (untrained) Grounding DINO's detections for the class list, at box_threshold, are the
    box json MAL labels; the step's annotated images and inference outputs stay in its folder."""
    import torch

    from groundlab.actions.autolabel_configs import gdino_boxes_config, pipeline_inputs
    from groundlab.actions.autolabel import detect_boxes
    from groundlab.data.sources import synthetic_paths
    from groundlab.models.gdino.build import build_gdino, save_gdino

    torch.manual_seed(0)
    ckpt = str(tmp_path / "gdino.pth")
    gd = compose(["model=gdino", *TINY_GDINO, *SMALL_SYNTHETIC])
    save_gdino(ckpt, build_gdino(gd.model).model, gd.model)
    images = synthetic_paths(gd.dataset, gd.cache_dir).train_images
    cfg = compose([*TINY_AUTOLABEL, "autolabel.box_source=gdino", f"autolabel.gdino_checkpoint={ckpt}",
                   "autolabel.box_threshold=0.0", "autolabel.gdino_overrides=['dataset.workers=0','dataset.augmentation.test_random_resize=64']",
                   f"dataset.infer_data_sources.image_dir=[{images}]",
                   "dataset.infer_data_sources.captions=[red circle,blue square]"], results_dir=str(tmp_path))
    inputs = pipeline_inputs(cfg)
    assert inputs["class_names"] == ["red circle", "blue square"] and inputs["box_json"] is None
    step = gdino_boxes_config(cfg, str(tmp_path / "boxes"), inputs)
    assert step.inference.checkpoint == ckpt and step.model.name == "gdino"
    path, counts = detect_boxes(step, str(tmp_path / "boxes"), 0.0)
    coco = json.loads(open(path).read())
    assert (tmp_path / "boxes" / "inference" / "images_annotated").is_dir()
    assert [c["name"] for c in coco["categories"]] == ["red circle", "blue square"]
    assert len(coco["images"]) == counts["images"] == 12 and len(coco["annotations"]) == counts["boxes"] > 0
    assert {a["image_id"] for a in coco["annotations"]} <= {im["id"] for im in coco["images"]}


# ------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize("overrides, fragment", [
    (["autolabel.box_source=gdino"], "autolabel.box_source=gdino needs autolabel.gdino_checkpoint"),
    (["autolabel.box_source=gdino", "autolabel.gdino_checkpoint=x.pth"],
     "holds 0"),
    (["autolabel.mal_overrides=['train.no_such_key=1']"], "autolabel.mal_overrides=['train.no_such_key=1']: "),
    (["autolabel.train_mask_json=/nonexistent.json"], "'/nonexistent.json' is not a file"),
])
def test_bad_settings_fail_in_one_sentence(compose, tmp_path, overrides, fragment):
    from groundlab.runner import run_action

    with pytest.raises(ConfigError) as info:
        run_action(compose([*TINY_AUTOLABEL, *overrides], results_dir=str(tmp_path)))
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "pipeline.json").exists()  # nothing ran


def test_box_source_coco_needs_one_coco_json(compose, tmp_path):
    from groundlab.actions.autolabel_configs import pipeline_inputs

    cfg = compose(["model=mask_gdino", "action=autolabel", "dataset=odvg",
                   "dataset.train_data_sources=[{image_dir: a, json_file: a.jsonl}]"], results_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"reads boxes from a COCO \.json"):
        pipeline_inputs(cfg)
    cfg = compose(["model=mask_gdino", "action=autolabel", "dataset=coco",
                   "dataset.train_data_sources=[{image_dir: a, json_file: a.json},{image_dir: b, json_file: b.json}]",
                   "dataset.val_data_sources.image_dir=v", "dataset.val_data_sources.json_file=v.json"],
                  results_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="holds 2 sources"):
        pipeline_inputs(cfg)
