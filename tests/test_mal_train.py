"""MAL end to end on a small ViT and the synthetic shapes: a short training run clearly beats the untrained
model, the same command resumes, evaluate writes results.json, inference writes the input json with RLE
masks (skipped boxes listed) that pycocotools and the mask_gdino reader load, bad inputs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from groundlab.config import ConfigError
from groundlab.errors import DataError
from groundlab.runner import run_action

TINY_MAL = ["experiment=mal_quickstart", "train.max_time_minutes=null",
            "model.vit_overrides={hidden_size:64,num_hidden_layers:2,num_attention_heads:2,intermediate_size:128}",
            "model.mask_head_hidden_channel=32", "model.mask_head_out_channel=32", "dataset.crop_size=64",
            "dataset.synthetic.num_train=96", "dataset.synthetic.num_val=24", "dataset.synthetic.image_size=[96,96]"]


@pytest.fixture(scope="module")
def trained(compose, tmp_path_factory):
    """(run dir, metrics, untrained metrics, cfg) of a 3-epoch run (~100 steps)."""
    run_dir = tmp_path_factory.mktemp("mal_run")
    cfg = compose(TINY_MAL + ["train.num_epochs=3"], results_dir=str(run_dir))
    import lightning as L

    from groundlab.engine.mal_data import MALDataModule
    from groundlab.engine.mal_module import MALLightning

    L.seed_everything(cfg.seed)
    dm = MALDataModule(cfg).prepare()
    untrained = MALLightning(cfg, dm.train_data.class_names, dm.train_data.category_ids)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(untrained, datamodule=dm,
                                                                                   verbose=False)
    metrics = run_action(cfg)
    return run_dir, metrics, untrained.last_metrics, cfg


@pytest.mark.slow
def test_short_training_clearly_beats_the_untrained_model(trained):
    _, metrics, before, _ = trained
    assert metrics["val_mIoU"] >= before["val_mIoU"] + 0.1, (before, metrics)
    assert metrics["global_step"] > 0 and {"val_mIoU_small", "val_mIoU_medium"} <= set(metrics)


@pytest.mark.slow
def test_checkpoint_carries_what_evaluate_and_inference_need(trained):
    run_dir = trained[0]
    ckpt = torch.load(run_dir / "mal_model_latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "groundlab" and ckpt["model_name"] == "mal" and ckpt["crop_size"] == 64
    assert ckpt["class_names"][0] == "red circle" and ckpt["category_ids"][0] == 1
    assert any(k.startswith("teacher.") for k in ckpt["state_dict"]) and "optimizer_states" in ckpt


@pytest.mark.slow
def test_the_same_command_resumes(compose, trained, tmp_path):
    run_dir, metrics, _, _ = trained
    cfg = compose(TINY_MAL + ["train.num_epochs=4"], results_dir=str(run_dir))
    again = run_action(cfg)
    steps_per_epoch = metrics["global_step"] / 3
    assert again["global_step"] == pytest.approx(4 * steps_per_epoch)  # one more epoch, not four


@pytest.mark.slow
def test_evaluate_writes_miou_per_class_and_size(compose, trained, tmp_path):
    run_dir = trained[0]
    cfg = compose(TINY_MAL + ["action=evaluate", f"evaluate.checkpoint={run_dir / 'mal_model_latest.pth'}",
                              "evaluate.use_flip_test=true"], results_dir=str(tmp_path))
    metrics = run_action(cfg)
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert results["metrics"]["mIoU"] == pytest.approx(metrics["mIoU"]) and 0 < metrics["mIoU"] <= 1
    assert set(results["metrics"]["per_class_mIoU_by_id"]) <= {str(i) for i in range(1, 10)}
    assert {"mIoU_small", "mIoU_medium", "mIoU_large", "num_instances"} <= set(results["metrics"])


@pytest.mark.slow
def test_evaluate_on_a_box_only_json_fails_naming_the_file(compose, trained, tmp_path):
    from groundlab.data.sources import synthetic_paths

    run_dir, _, _, cfg = trained
    paths = synthetic_paths(cfg.dataset, cfg.cache_dir)
    bad = compose(TINY_MAL + ["action=evaluate", "dataset=mal_coco", "dataset.crop_size=64",
                              f"evaluate.checkpoint={run_dir / 'mal_model_latest.pth'}",
                              f"dataset.val_ann_path={paths.train_coco_boxes}", f"dataset.val_img_dir={paths.train_images}",
                              "dataset.train_ann_path=x", "dataset.train_img_dir=x"], results_dir=str(tmp_path))
    with pytest.raises(DataError, match="train_coco_boxes.json.*segmentation"):
        run_action(bad)


@pytest.mark.slow
def test_inference_writes_masks_on_every_box_and_lists_the_rest(compose, trained, tmp_path):
    from pycocotools.coco import COCO

    from groundlab.data.coco import read_coco
    from groundlab.data.image_source import open_image_source
    from groundlab.data.sources import synthetic_paths

    run_dir, _, _, cfg = trained
    paths = synthetic_paths(cfg.dataset, cfg.cache_dir)
    data = json.loads(open(paths.val_coco).read())
    for a in data["annotations"]:
        del a["segmentation"]  # boxes only, as a user brings them
    n_boxes = len(data["annotations"])
    data["annotations"] += [  # boxes it cannot process: they must come back listed, never dropped
        {"id": 9001, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
        {"id": 9002, "image_id": 1, "category_id": 1, "bbox": [500, 500, 8, 8], "area": 64, "iscrowd": 0}]
    (tmp_path / "boxes.json").write_text(json.dumps(data))
    out = tmp_path / "labels" / "with_masks.json"
    cfg = compose(TINY_MAL + ["action=inference", f"inference.checkpoint={run_dir / 'mal_model_latest.pth'}",
                              f"inference.ann_path={tmp_path / 'boxes.json'}", f"inference.img_dir={paths.val_images}",
                              f"inference.label_dump_path={out}", "inference.draw_images=2"],
                  results_dir=str(tmp_path / "inf"))
    metrics = run_action(cfg)
    assert metrics["masks_written"] == n_boxes and metrics["boxes_skipped"] == 2
    written = json.loads(out.read_text())
    assert {s["ann_id"]: s["reason"] for s in written["mal_skipped"]} == {
        9001: "zero-area box", 9002: "box outside the image"}
    coco = COCO(str(out))
    masked = [a for a in coco.dataset["annotations"] if "segmentation" in a]
    assert len(masked) == n_boxes
    for ann in masked[:20]:
        assert coco.annToMask(ann).sum() == ann["area"]  # area is the mask's, not the box's
    assert len(list((tmp_path / "inf" / "inference" / "images").glob("*.jpg"))) == 2
    # the labels train mask_gdino: its COCO reader takes them as masks
    only_masked = dict(written, annotations=masked)
    (tmp_path / "masked.json").write_text(json.dumps(only_masked))
    records, names, _, _ = read_coco(str(tmp_path / "masked.json"), open_image_source(paths.val_images))
    assert records[0]["masks"] is not None and len(names) == 9


def test_inference_needs_a_checkpoint_and_an_output(compose, tmp_path):
    # no checkpoint given and no train run to follow (tests/test_chained_runs.py has the sentence)
    with pytest.raises(ConfigError, match="inference.checkpoint is not given"):
        run_action(compose(TINY_MAL + ["action=inference"],
                           results_dir=str(tmp_path / "mal" / "inference" / "mal_quickstart")))
    with pytest.raises(ConfigError, match="inference.label_dump_path is required"):
        run_action(compose(TINY_MAL + ["action=inference", "inference.label_dump_path=''"],
                           results_dir=str(tmp_path / "mal" / "inference" / "mal_quickstart")))


@pytest.mark.slow
def test_inference_reads_a_rotated_photo_as_its_json_says(compose, trained, tmp_path, caplog):
    """A phone photo (EXIF orientation 6) annotated on its stored pixels: inference reads it as stored (it used to
    stop with a traceback on the size mismatch) and says so once; annotated on the displayed image, it is turned."""
    from PIL import Image

    run_dir = trained[0]
    (tmp_path / "img").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("stored.jpg", "shown.jpg"):
        im = Image.new("RGB", (96, 64), (30, 30, 200))
        im.paste((230, 30, 30), (10, 10, 40, 40))
        im.save(tmp_path / "img" / name, exif=exif)
    data = {"images": [{"id": 1, "file_name": "stored.jpg", "height": 64, "width": 96},
                       {"id": 2, "file_name": "shown.jpg", "height": 96, "width": 64}],
            "categories": [{"id": 1, "name": "red circle"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [24, 10, 30, 30]}]}
    (tmp_path / "boxes.json").write_text(json.dumps(data))
    out = tmp_path / "with_masks.json"
    cfg = compose(TINY_MAL + ["action=inference", f"inference.checkpoint={run_dir / 'mal_model_latest.pth'}",
                              f"inference.ann_path={tmp_path / 'boxes.json'}", f"inference.img_dir={tmp_path / 'img'}",
                              f"inference.label_dump_path={out}", "inference.draw_images=2"],
                  results_dir=str(tmp_path / "inf"))
    caplog.set_level("WARNING")
    metrics = run_action(cfg)
    assert metrics["masks_written"] == 2 and metrics["boxes_skipped"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "groundlab.data.exif_orientation"]
    assert len(lines) == 1 and "1 image (e.g. 'stored.jpg')" in lines[0]
    written = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    assert written[1]["segmentation"]["size"] == [64, 96] and written[2]["segmentation"]["size"] == [96, 64]
    drawn = {p.name: Image.open(p).size for p in (tmp_path / "inf" / "inference" / "images").glob("*.jpg")}
    assert drawn == {"stored.jpg": (96, 64), "shown.jpg": (64, 96)}
