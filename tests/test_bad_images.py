"""One bad image is not fatal (issue 10): an image that cannot be decoded is skipped, counted and listed by
evaluate and inference, and replaced by another sample in training until more than
dataset.max_bad_image_fraction of the training images failed."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_GDINO
from groundlab.config import ConfigError, check_config
from groundlab.errors import DataError
from groundlab.runner import run_action


@pytest.mark.parametrize("model", [["model=gdino"], ["model=mal", "dataset=mal_synthetic"]])
@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_max_bad_image_fraction_must_be_a_fraction(compose, model, value):
    with pytest.raises(ConfigError) as info:
        check_config(compose(model + [f"dataset.max_bad_image_fraction={value}"]))
    assert f"dataset.max_bad_image_fraction={value} must be in [0, 1]" in str(info.value)
    check_config(compose(model + ["dataset.max_bad_image_fraction=0.0"]))
    check_config(compose(model + ["dataset.max_bad_image_fraction=1"]))


# ------------------------------------------------------------------------------------------------- helpers
# name -> (height, width); none square: a 64x64 image alone in a batch would leave the tiny model a 1x1
# GroupNorm level (which GroupNorm refuses)
GOOD = {"a.jpg": (60, 80), "b.jpg": (72, 64), "c.jpg": (50, 70)}


def _jpeg(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _truncate(path) -> None:
    """Keep the first half of a JPEG's bytes (header intact, pixels cut off)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _folder(root, bad=("garbage.jpg", "truncated.jpg")):
    """Small real JPEGs plus the bad ones: a truncated JPEG and garbage bytes under a .jpg name."""
    root.mkdir(parents=True, exist_ok=True)
    for k, (name, (h, w)) in enumerate(GOOD.items()):
        (root / name).write_bytes(_jpeg(h, w, k))
    if "truncated.jpg" in bad:
        (root / "truncated.jpg").write_bytes(_jpeg(64, 64, 9))
        _truncate(root / "truncated.jpg")
    if "garbage.jpg" in bad:
        (root / "garbage.jpg").write_bytes(b"this is not an image at all " * 40)
    return root


def _skip_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped undecodable image")]


def test_the_bad_files_really_do_not_decode(tmp_path):
    from groundlab.data.image_decode import ImageDecodeError, decode_rgb

    root = _folder(tmp_path / "imgs")
    for name in ("truncated.jpg", "garbage.jpg"):
        with pytest.raises(ImageDecodeError):
            decode_rgb((root / name).read_bytes(), name)
    assert decode_rgb((root / "a.jpg").read_bytes()).shape == (60, 80, 3)


@pytest.fixture(scope="module")
def gdino_checkpoint(compose, tmp_path_factory):
    from groundlab.models.gdino.build import build_gdino, save_gdino

    torch.manual_seed(0)
    cfg = compose(TINY_GDINO)
    return save_gdino(str(tmp_path_factory.mktemp("ckpt") / "gdino_tiny.pth"), build_gdino(cfg.model).model, cfg.model)


# ------------------------------------------------------------------------------------ Grounding DINO: inference
def test_inference_skips_and_lists_undecodable_images(compose, gdino_checkpoint, tmp_path, caplog):
    root = _folder(tmp_path / "imgs")
    # sorted: [a, b], [c, garbage], [truncated]: a batch with a bad image, and one with bad images only
    cfg = compose(["action=inference", "dataset=raw", "dataset.batch_size=2", "dataset.workers=0",
                   "dataset.augmentation.test_random_resize=64", "inference.conf_threshold=0.0",
                   f"inference.checkpoint={gdino_checkpoint}", f"dataset.infer_data_sources.image_dir=[{root}]",
                   "dataset.infer_data_sources.captions=[car,person]"], results_dir=str(tmp_path / "run"))
    caplog.set_level("WARNING")
    metrics = run_action(cfg)
    assert metrics["images"] == 3 and metrics["images_skipped"] == 2 and metrics["detections"] == 3 * 20
    out = tmp_path / "run" / "inference"
    images = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in images["images"]] == list(GOOD)
    skipped = {s["file_name"]: s for s in images["skipped_images"]}
    assert set(skipped) == {"garbage.jpg", "truncated.jpg"}
    for name, s in skipped.items():
        assert s["source"] == str(root) and name in s["reason"] and "cannot decode" in s["reason"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    detections = json.loads((out / "results.json").read_text())
    assert {d["image_id"] for d in detections} == {i["id"] for i in images["images"]}
    lines = _skip_lines(caplog)
    assert len(lines) == 2 and any(f"{root}/garbage.jpg: " in line for line in lines)
    assert any(f"{root}/truncated.jpg: " in line for line in lines)


def test_inference_dataset_returns_a_marker_and_the_collate_keeps_the_good_items(tmp_path):
    from groundlab.actions.inference import _collate
    from groundlab.data.bad_images import BadImage
    from groundlab.data.raw import InferenceDataset, list_raw, open_sources
    from groundlab.data.transforms import build_eval_transforms
    from groundlab.config.schema_dataset import AugmentationConfig

    sources = open_sources([str(_folder(tmp_path / "imgs"))], None)
    ds = InferenceDataset(sources, list_raw(sources), build_eval_transforms(AugmentationConfig(test_random_resize=64)))
    items = [ds[i] for i in range(len(ds))]
    assert [type(it).__name__ for it in items] == ["dict", "dict", "dict", "BadImage", "BadImage"]
    batch = _collate(items[2:4])
    assert batch["file_names"] == ["c.jpg"] and batch["images"].shape[0] == 1
    assert [b.file_name for b in batch["skipped"]] == ["garbage.jpg"]
    only_bad = _collate(items[3:])
    assert only_bad["images"] is None and all(isinstance(b, BadImage) for b in only_bad["skipped"])


# ------------------------------------------------------------------------------------ Grounding DINO: evaluate
def test_evaluate_reports_map_and_lists_the_undecodable_image(compose, gdino_checkpoint, tmp_path, caplog):
    root = _folder(tmp_path / "imgs", bad=("truncated.jpg",))
    files = dict(GOOD, **{"truncated.jpg": (64, 64)})
    gt = {"images": [{"id": i + 1, "file_name": n, "height": h, "width": w}
                     for i, (n, (h, w)) in enumerate(files.items())],
          "categories": [{"id": 4, "name": "car"}, {"id": 9, "name": "person"}],
          "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 4 if i % 2 else 9, "bbox": [2, 2, 30, 30],
                           "area": 900, "iscrowd": 0} for i in range(len(files))]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    # one batch: the three good images and the truncated one
    cfg = compose(["action=evaluate", "dataset=coco", "dataset.batch_size=4", "dataset.workers=0",
                   "dataset.augmentation.test_random_resize=64", f"evaluate.checkpoint={gdino_checkpoint}",
                   f"dataset.val_data_sources.image_dir={root}",
                   f"dataset.val_data_sources.json_file={tmp_path / 'gt.json'}"],
                  results_dir=str(tmp_path / "ev"))
    caplog.set_level("WARNING")
    metrics = run_action(cfg)
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["images_skipped"] == 1
    results = json.loads((tmp_path / "ev" / "evaluate" / "results.json").read_text())
    assert results["metrics"]["images_skipped"] == 1
    assert results["metrics"]["num_images"] == 4  # the skipped image counts, as an image without detections
    [skipped] = results["skipped_images"]
    assert skipped["file_name"] == "truncated.jpg" and skipped["image_id"] == 4 and skipped["source"] == str(root)
    detections = json.loads((tmp_path / "ev" / "evaluate" / "detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} == {1, 2, 3}
    [line] = _skip_lines(caplog)
    assert f"{root}/truncated.jpg: " in line and "without detections" in line


# ------------------------------------------------------------------------------------ Grounding DINO: training
def _corrupted_copy(compose, tmp_path, train_overrides, bad_val: bool = False):
    """(overrides training on a copy of the synthetic train images with one truncated image, its name); with
    bad_val also on a copy of the val images whose first image is garbage."""
    from groundlab.data.sources import synthetic_paths

    p = synthetic_paths(compose(train_overrides).dataset, compose(train_overrides).cache_dir)
    images = tmp_path / "train_images"
    shutil.copytree(p.train_images, images)
    name = json.loads(open(p.train_odvg).readline())["file_name"]
    _truncate(images / name)
    val_images = p.val_images
    if bad_val:
        val_images = tmp_path / "val_images"
        shutil.copytree(p.val_images, val_images)
        (val_images / json.loads(open(p.val_coco).read())["images"][0]["file_name"]).write_bytes(b"garbage" * 50)
    return train_overrides + [
        "dataset.type=odvg",
        f"dataset.train_data_sources=[{{image_dir: {images}, json_file: {p.train_odvg}, label_map: {p.label_map}}}]",
        f"dataset.val_data_sources={{image_dir: {val_images}, json_file: {p.val_coco}}}"], name


def test_a_training_sample_with_a_bad_image_is_replaced_deterministically(compose, tmp_path, caplog):
    from groundlab.data.build import build_grounding_dataset
    from test_gdino_train import TRAIN

    overrides, name = _corrupted_copy(compose, tmp_path, TRAIN)
    cfg = compose(overrides + ["dataset.max_bad_image_fraction=0.1"])
    caplog.set_level("WARNING")
    ds, collate = build_grounding_dataset(cfg, "train", augment=True)
    again, _ = build_grounding_dataset(cfg, "train", augment=True)
    assert ds.locate(0)[1]["file_name"] == name
    first, second = ds[0], again[0]  # the bad record's place: the next record, under index 0's seed
    assert first["file_name"] == ds.locate(1)[1]["file_name"] != name
    assert torch.equal(first["image"], second["image"]) and first["prompt"] == second["prompt"]
    assert ds[0]["file_name"] == first["file_name"] and len(ds.bad_images) == 1
    lines = [r.getMessage() for r in caplog.records if "undecodable training image" in r.getMessage()]
    assert len([line for line in lines if name in line]) == 2  # once per dataset (= per process), not per access
    assert collate([ds[0], ds[1]])["images"].shape[0] == 2
    cfg0 = compose(overrides + ["dataset.max_bad_image_fraction=0.0"])
    strict, _ = build_grounding_dataset(cfg0, "train", augment=True)
    with pytest.raises(DataError, match=r"1 of the 16 training images .*dataset.max_bad_image_fraction=0"):
        strict[0]


@pytest.mark.slow
def test_training_with_one_bad_image_finishes_and_names_it(compose, tmp_path, caplog):
    from test_gdino_train import TRAIN

    overrides, name = _corrupted_copy(compose, tmp_path, TRAIN, bad_val=True)
    cfg = compose(overrides + ["train.num_epochs=1", "dataset.max_bad_image_fraction=0.1"],
                  results_dir=str(tmp_path / "run"))
    caplog.set_level("WARNING")
    metrics = run_action(cfg)
    assert metrics["global_step"] == 2 and 0.0 <= metrics["val_mAP50"] <= 1.0
    lines = [r.getMessage() for r in caplog.records if "undecodable training image" in r.getMessage()]
    assert len(lines) == 1 and name in lines[0] and "dataset.max_bad_image_fraction=0.1" in lines[0]
    # the garbage validation image: named once (sanity check, epoch end and final validation all meet it)
    [val_line] = _skip_lines(caplog)
    assert "val_images/" in val_line and "validated as an image without detections" in val_line


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_training_stops_when_too_many_images_fail(compose, tmp_path, workers):
    """With max_bad_image_fraction=0.0 the first undecodable training image stops the run, also when a
    DataLoader worker meets it (the loader re-raises the worker's DataError in the training process)."""
    from test_gdino_train import TRAIN

    overrides, name = _corrupted_copy(compose, tmp_path, TRAIN)
    cfg = compose(overrides + ["train.num_epochs=1", "dataset.max_bad_image_fraction=0.0",
                               f"dataset.workers={workers}"],
                  results_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match="dataset.max_bad_image_fraction") as info:
        run_action(cfg)
    assert name in str(info.value) and "1 of the 16 training images" in str(info.value)
    assert not (tmp_path / "run" / "gdino_model_latest.pth").exists()


# ------------------------------------------------------------------------------------------------------- MAL
TINY_MAL = ["experiment=mal_quickstart", "train.max_time_minutes=null",
            "model.vit_overrides={hidden_size:64,num_hidden_layers:2,num_attention_heads:2,intermediate_size:128}",
            "model.mask_head_hidden_channel=32", "model.mask_head_out_channel=32", "dataset.crop_size=64",
            "dataset.num_workers_per_gpu=0"]
MAL_IMAGES = ["a.jpg", "truncated.jpg", "b.jpg", "c.jpg"]  # two boxes each, in this order in the json


def _mal_json(tmp_path):
    """A COCO json with masks over three good 96x96 JPEGs and a truncated one: (json path, image folder)."""
    from groundlab.ops.masks import encode_mask

    root = tmp_path / "mal_imgs"
    root.mkdir()
    images, annotations = [], []
    for i, name in enumerate(MAL_IMAGES):
        (root / name).write_bytes(_jpeg(96, 96, i))
        images.append({"id": i + 1, "file_name": name, "height": 96, "width": 96})
        for k, (x, y, w, h) in enumerate([(10, 12, 30, 28), (50, 40, 36, 44)]):
            seg = np.zeros((96, 96), bool)
            seg[y + 4:y + h - 4, x + 4:x + w - 4] = True
            annotations.append({"id": 10 * (i + 1) + k, "image_id": i + 1, "category_id": 1 + k, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0, "segmentation": encode_mask(seg)})
    _truncate(root / "truncated.jpg")
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}]}))
    return path, root


@pytest.fixture(scope="module")
def mal_checkpoint(compose, tmp_path_factory):
    """An untrained tiny MAL checkpoint (student and teacher), as a training run would write it."""
    from groundlab.models.checkpoint import save_checkpoint
    from groundlab.models.mal.build import build_mal_network

    torch.manual_seed(0)
    cfg = compose(TINY_MAL)
    net = build_mal_network(cfg.model, 64)
    state = {f"{which}.{k}": v for which in ("student", "teacher") for k, v in net.state_dict().items()}
    return save_checkpoint(str(tmp_path_factory.mktemp("mal") / "mal.pth"), net, cfg.model,
                           ["red circle", "blue square"], state_dict=state,
                           extra={"crop_size": 64, "category_ids": [1, 2]})


def test_mal_inference_lists_the_boxes_of_an_undecodable_image(compose, mal_checkpoint, tmp_path, caplog):
    path, root = _mal_json(tmp_path)
    out = tmp_path / "labels.json"
    # batches of two boxes: [a, a], [truncated, truncated] (nothing left to run), [b, b], [c, c]
    cfg = compose(TINY_MAL + ["action=inference", f"inference.checkpoint={mal_checkpoint}", "inference.batch_size=2",
                              f"inference.ann_path={path}", f"inference.img_dir={root}",
                              f"inference.label_dump_path={out}", "inference.draw_images=-1"],
                  results_dir=str(tmp_path / "inf"))
    caplog.set_level("WARNING")
    metrics = run_action(cfg)
    assert metrics["masks_written"] == 6 and metrics["boxes_skipped"] == 2 and metrics["images_skipped"] == 1
    written = json.loads(out.read_text())
    skipped = {s["ann_id"]: s for s in written["mal_skipped"]}
    assert set(skipped) == {20, 21} and {s["image_id"] for s in skipped.values()} == {2}
    assert all(s["reason"].startswith("image could not be decoded: ") and "truncated.jpg" in s["reason"]
               for s in skipped.values())
    original = {a["id"]: a for a in json.loads(path.read_text())["annotations"]}
    for ann in written["annotations"]:
        if ann["id"] in skipped:
            assert ann == original[ann["id"]]  # untouched: the input's own annotation
        else:
            assert ann["segmentation"] != original[ann["id"]]["segmentation"]  # the predicted mask
    drawn = sorted(p.name for p in (tmp_path / "inf" / "inference" / "images").glob("*.jpg"))
    assert drawn == ["a.jpg", "b.jpg", "c.jpg"]
    [line] = _skip_lines(caplog)  # one line for the image, not one per box
    assert f"{root}/truncated.jpg: " in line


def test_mal_evaluate_lists_the_undecodable_image_in_results(compose, mal_checkpoint, tmp_path, caplog):
    path, root = _mal_json(tmp_path)
    cfg = compose(TINY_MAL + ["action=evaluate", "dataset=mal_coco", f"evaluate.checkpoint={mal_checkpoint}",
                              "evaluate.batch_size=3", f"dataset.val_ann_path={path}", f"dataset.val_img_dir={root}",
                              "dataset.train_ann_path=x", "dataset.train_img_dir=x"], results_dir=str(tmp_path / "ev"))
    caplog.set_level("WARNING")
    metrics = run_action(cfg)
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["images_skipped"] == 1
    results = json.loads((tmp_path / "ev" / "evaluate" / "results.json").read_text())
    assert results["metrics"]["num_instances"] == 6  # the truncated image's two boxes are left out
    [image] = results["skipped_images"]
    assert image["file_name"] == "truncated.jpg" and image["boxes"] == 2 and image["source"] == str(root)
    assert [b["ann_id"] for b in results["skipped_boxes"]] == [20, 21]
    assert len(_skip_lines(caplog)) == 1


def test_mal_training_crops_replace_the_boxes_of_an_undecodable_image(tmp_path, caplog):
    from groundlab.data.image_source import open_image_source
    from groundlab.data.mal_dataset import MALCropDataset, collate_crops
    from groundlab.data.mal_instances import read_mal_instances

    path, root = _mal_json(tmp_path)
    data = read_mal_instances(str(path), open_image_source(str(root)))

    def crops(fraction):
        return MALCropDataset(data, open_image_source(str(root)), 32, True, [0.0, 1.2], [0.6, 0.6], seed=3,
                              max_bad_image_fraction=fraction)

    caplog.set_level("WARNING")
    ds, again = crops(0.25), crops(0.25)
    assert data.instances[2]["file_name"] == "truncated.jpg"
    first = ds[2]  # a truncated.jpg box: the next box of a decodable image (b.jpg's first), under index 2's seed
    assert int(first["index"]) == 4 and torch.equal(first["student"], again[2]["student"])
    assert int(ds[3]["index"]) == 4 and len(ds.bad_images) == 1  # the image counts once, whichever box met it
    assert collate_crops([ds[i] for i in range(len(ds))])["student"].shape[0] == 8
    lines = [r.getMessage() for r in caplog.records if "undecodable training image" in r.getMessage()]
    assert len(lines) == 2 and all("truncated.jpg" in line and "of the 4 training images" in line for line in lines)
    with pytest.raises(DataError, match=r"1 of the 4 training images .*dataset.max_bad_image_fraction=0.2"):
        crops(0.2)[2]  # 1 > 0.2 * 4


def test_mal_crops_for_evaluation_mark_the_boxes_of_an_undecodable_image(tmp_path):
    from groundlab.data.bad_images import BadImage
    from groundlab.data.image_source import open_image_source
    from groundlab.data.mal_dataset import MALCropDataset, collate_crops
    from groundlab.data.mal_instances import read_mal_instances

    path, root = _mal_json(tmp_path)
    data = read_mal_instances(str(path), open_image_source(str(root)), need_masks=True)
    ds = MALCropDataset(data, open_image_source(str(root)), 32, False, [0.0, 1.2], [0.6, 0.6], with_gt=True)
    items = [ds[i] for i in range(len(ds))]
    assert [i for i, it in enumerate(items) if isinstance(it, BadImage)] == [2, 3]
    assert items[2].index == 2 and items[2].image_id == 2 and items[2].file_name == "truncated.jpg"
    batch = collate_crops(items[1:4])
    assert batch["index"].tolist() == [1] and [b.index for b in batch["skipped"]] == [2, 3]
    assert collate_crops(items[2:4]).keys() == {"skipped"}


def test_mal_validation_during_training_leaves_out_an_undecodable_image(compose, tmp_path, caplog):
    import lightning as L

    from groundlab.engine.mal_data import MALDataModule
    from groundlab.engine.mal_module import MALLightning

    path, root = _mal_json(tmp_path)
    cfg = compose(TINY_MAL + ["dataset=mal_coco", "dataset.crop_size=64", "train.batch_size=2",
                              f"dataset.train_ann_path={path}", f"dataset.train_img_dir={root}",
                              f"dataset.val_ann_path={path}", f"dataset.val_img_dir={root}"], results_dir=str(tmp_path))
    dm = MALDataModule(cfg).prepare()
    assert dm.train_set.bad_images.max_fraction == cfg.dataset.max_bad_image_fraction
    module = MALLightning(cfg, dm.train_data.class_names, dm.train_data.category_ids)
    caplog.set_level("WARNING")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(module, datamodule=dm, verbose=False)
    assert 0.0 <= module.last_metrics["val_mIoU"] <= 1.0
    assert module.meter.compute()["num_instances"] == 6
    [line] = _skip_lines(caplog)
    assert f"{root}/truncated.jpg: " in line and "left out of the validation mIoU" in line
