"""Mask Grounding DINO's evaluate / inference inputs and outputs (issue 11): masks in the writers (RLE
segmentation in COCO results, tinted overlays; KITTI unchanged), the classmap file and data_type keys, the TAO
mask_gdino inference row, and the evaluate / inference actions wired for masks. The actions run with a stand-in
predictor (FakePredictor) whose results are hand-made, since the actions branch only on `predictor.has_masks`
and on result["masks"]; end-to-end tests with the real mask model come with it."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor
from pycocotools import mask as mask_util

from groundlab.actions.inference import inference_inputs
from groundlab.config import ConfigError, check_config
from groundlab.data.raw import read_classmap
from groundlab.deploy.mask_overlay import draw_masked_detections, overlay_masks, tint_masks
from groundlab.deploy.writers import PALETTE, CocoResultsWriter, coco_results, draw_detections, kitti_lines
from groundlab.errors import DataError, MissingFile
from groundlab.ops.masks import encode_mask
from groundlab.predict.gdino import GDinoPredictor
from groundlab.runner import run_action
from groundlab.text.captions import chunk_class_prompts
from groundlab.text.tokens import PromptEncoder

NAMES = ["car", "person", "traffic light"]


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _ellipse(h: int, w: int, box) -> np.ndarray:
    """(h, w) bool ellipse inscribed in box [x1, y1, x2, y2] (so a mask is not its box in disguise)."""
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cy, cx, ry, rx = (y1 + y2) / 2, (x1 + x2) / 2, (y2 - y1) / 2, (x2 - x1) / 2
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _masked_result(h: int = 48, w: int = 64) -> dict:
    """Three detections with masks at (h, w); the last scores below 0.5."""
    masks = np.stack([_rect(h, w, 10, 44, 8, 20), _ellipse(h, w, [30, 5, 60, 40]), _rect(h, w, 40, 46, 0, 6)])
    return {"scores": torch.tensor([0.9, 0.7, 0.2]), "labels": torch.tensor([0, 2, 1]),
            "boxes": torch.tensor([[8.0, 10.0, 20.0, 44.0], [30.0, 5.0, 60.0, 40.0], [0.0, 40.0, 6.0, 46.0]]),
            "masks": torch.from_numpy(masks)}


# ------------------------------------------------------------------------------------------------ writers
def test_coco_results_gain_rle_segmentations_that_decode_to_the_masks():
    result = _masked_result()
    entries = coco_results(7, result, category_ids=[3, 5, 9], conf_threshold=0.5)
    assert [e["category_id"] for e in entries] == [3, 9]  # the third is below conf_threshold: its mask too
    for entry, mask in zip(entries, result["masks"].numpy()):
        seg = entry["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [48, 64]
        decoded = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
    json.dumps(entries)  # json-ready as is


def test_box_results_stay_as_they_were():
    result = {k: v for k, v in _masked_result().items() if k != "masks"}
    entries = coco_results(7, result)
    assert all(set(e) == {"image_id", "category_id", "bbox", "score"} for e in entries)


def test_results_writer_writes_segmentations(tmp_path):
    writer = CocoResultsWriter(str(tmp_path / "results.json"), conf_threshold=0.5)
    writer.add(1, _masked_result())
    written = json.loads(open(writer.write()).read())
    assert len(written) == 2 and all("segmentation" in e for e in written)


def test_kitti_lines_ignore_masks():
    result = _masked_result()
    boxes_only = {k: v for k, v in result.items() if k != "masks"}
    assert kitti_lines(result, NAMES, 0.5) == kitti_lines(boxes_only, NAMES, 0.5)


def test_masks_that_do_not_match_the_detections_are_refused():
    result = _masked_result()
    with pytest.raises(ValueError, match="masks must be"):
        coco_results(1, {**result, "masks": result["masks"][:2]})
    with pytest.raises(ValueError, match="image's size"):
        draw_masked_detections(np.zeros((40, 64, 3), np.uint8), result, NAMES)


def test_overlay_tints_the_pixels_inside_kept_masks_only():
    result = _masked_result()
    image = np.full((48, 64, 3), 128, dtype=np.uint8)
    colour_map = {"traffic light": "#0000ff"}
    boxes = np.asarray(draw_detections(image, result, NAMES, colour_map, 2, 0.5))
    masked = np.asarray(draw_masked_detections(image, result, NAMES, colour_map, 2, 0.5))
    masks = result["masks"].numpy()
    kept = masks[0] | masks[1]
    changed = (boxes != masked).any(axis=2)
    assert not changed[~kept].any()  # boxes, labels and everything else exactly as draw_detections draws them
    # inside the masks, away from the outlines and label pads: half-way to the class colour
    assert masked[36, 14].tolist() == [(128 + c) // 2 for c in ImageColor.getrgb(PALETTE[0])]
    assert masked[30, 45].tolist() == [64, 64, 191]  # the colour map's blue
    assert not changed[masks[2]].any()  # below conf_threshold: not tinted


def test_tint_leaves_outside_pixels_exact_and_mal_overlay_still_draws():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    mask = _rect(20, 30, 5, 10, 5, 12)
    tinted = tint_masks(image, [mask], ["red"])
    np.testing.assert_array_equal(tinted[~mask], image[~mask])
    assert (tinted[mask][:, 0] >= image[mask][:, 0]).all()
    drawn = overlay_masks(image, [mask], [1], [[5, 5, 12, 10]], NAMES)
    assert drawn.size == (30, 20)


# ------------------------------------------------------------------------------------------------ classmap
def test_classmap_is_one_class_per_line(tmp_path):
    path = tmp_path / "label_map.txt"
    path.write_text("  car\n\nperson  \n traffic light\n\n")
    assert read_classmap(str(path)) == ["car", "person", "traffic light"]


def test_a_missing_classmap_names_the_key_and_path(tmp_path):
    with pytest.raises(MissingFile) as info:
        read_classmap(str(tmp_path / "gone.txt"))
    message = str(info.value)
    assert "dataset.infer_data_sources.classmap" in message and "gone.txt" in message and "\n" not in message


def test_an_empty_classmap_is_one_sentence(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n   \n")
    with pytest.raises(DataError, match=r"classmap=.*empty.txt holds no class names"):
        read_classmap(str(path))


def _png_folder(root, sizes) -> str:
    """Uniform grey PNGs a.png, b.png, ... of the given (h, w) under root/imgs."""
    (root / "imgs").mkdir(exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / "imgs" / f"{'abc'[i]}.png")
    return str(root / "imgs")


RAW = ["action=inference", "dataset=raw", "dataset.workers=0"]


def test_inference_inputs_read_the_classmap(compose, tmp_path):
    (tmp_path / "classes.txt").write_text("car\nrace car\n")
    cfg = compose(RAW + [f"dataset.infer_data_sources.image_dir=[{_png_folder(tmp_path, [(8, 8)])}]",
                         f"dataset.infer_data_sources.classmap={tmp_path / 'classes.txt'}"])
    check_config(cfg)
    _, items, names = inference_inputs(cfg)
    assert names == ["car", "race car"] and [it.name for it in items] == ["a.png"]


@pytest.mark.parametrize("other, fragment", [
    ("dataset.infer_data_sources.captions=[car]",
     "dataset.infer_data_sources.classmap and dataset.infer_data_sources.captions are both given"),
    ("dataset.infer_data_sources.json_file=captions.jsonl",
     "dataset.infer_data_sources.classmap and dataset.infer_data_sources.json_file are both given"),
])
def test_classmap_with_another_class_source_is_refused(compose, other, fragment):
    cfg = compose(RAW + ["dataset.infer_data_sources.classmap=labels.txt", other])
    with pytest.raises(ConfigError, match=fragment):
        check_config(cfg)


def test_vg_inference_needs_an_expression_file(compose):
    cfg = compose(["model=mask_gdino"] + RAW + ["dataset.infer_data_sources.data_type=VG"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert "dataset.infer_data_sources.data_type=VG reads one referring expression per image" in str(info.value)
    assert compose(RAW).dataset.infer_data_sources.data_type == "OD"


def test_tao_mask_gdino_inference_row_reads_its_archive_and_classmap(compose, tmp_path):
    """The row of ../shared/tao_spec_overrides.md, as written, on real files at its placeholder paths."""
    from test_tao_overrides import SETS, _why_not, dataset_choice, with_paths

    rows = [s for s in SETS if (s.model, s.action) == ("mask_gdino", "inference") and _why_not(s) is None]
    if not rows:
        pytest.skip("../shared/tao_spec_overrides.md is absent or has no mask_gdino inference row")
    (tmp_path / "E").mkdir()
    (tmp_path / "E" / "label_map.txt").write_text("forklift\ncone\n")
    with tarfile.open(tmp_path / "E" / "images.tar.gz", "w:gz") as tar:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
        info = tarfile.TarInfo("frame.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    row = rows[0]
    cfg = compose(["model=mask_gdino", "action=inference"] + dataset_choice(row) + with_paths(row.overrides, tmp_path))
    check_config(cfg)
    _, items, names = inference_inputs(cfg)
    assert names == ["forklift", "cone"] and [it.name for it in items] == ["frame.png"]


# ------------------------------------------------------------------------------------------------ actions
class FakePredictor:
    """Stands in for GDinoPredictor.from_checkpoint in the actions: `has_masks`, `input_size` (None: a checkpoint takes
    any size), `encoder` and `chunked` as the real one has them; detect_classes / detect_captions return `by_size[(h, w)]` (a hand-made result per original image
    size, so batch order does not matter) and record the thresholds they were given."""

    def __init__(self, tokenizer, by_size, has_masks: bool = True):
        self.encoder = PromptEncoder(tokenizer, 256)
        self.by_size, self.has_masks = by_size, has_masks
        self.input_size = None
        self.calls = []

    def chunked(self, class_names):
        return chunk_class_prompts(tuple(class_names), self.encoder.name_len, 256)

    def _results(self, orig_sizes):
        return [{k: v.clone() if torch.is_tensor(v) else list(v) for k, v in self.by_size[tuple(s)].items()}
                for s in orig_sizes.tolist()]

    def detect_classes(self, images, padding_mask, orig_sizes, class_names, nms_threshold=None, mask_threshold=0.5):
        self.calls.append({"nms_threshold": nms_threshold, "mask_threshold": mask_threshold})
        return self._results(orig_sizes)

    def detect_captions(self, images, padding_mask, orig_sizes, prompts, box_threshold, text_threshold,
                        mask_threshold=0.5):
        self.calls.append({"mask_threshold": mask_threshold})
        return self._results(orig_sizes)


@pytest.fixture
def use_predictor(monkeypatch):
    def install(fake):
        monkeypatch.setattr(GDinoPredictor, "from_checkpoint", classmethod(lambda cls, *args, **kwargs: fake))
        return fake
    return install


SIZES = [(40, 48), (44, 52), (36, 60)]  # one size per image: the fake tells the images apart by it
GT_BOXES = [[6, 8, 30, 32], [10, 4, 44, 30], [20, 6, 56, 30]]  # x1, y1, x2, y2


def _coco_gt(root, with_masks: bool = True) -> str:
    """Three grey images, one ellipse object each (category id 11 "cone"; id 4 "car" has none)."""
    images, anns = [], []
    for i, ((h, w), box) in enumerate(zip(SIZES, GT_BOXES)):
        images.append({"id": i + 1, "file_name": f"{'abc'[i]}.png", "height": h, "width": w})
        mask = _ellipse(h, w, box)
        ann = {"id": i + 1, "image_id": i + 1, "category_id": 11, "iscrowd": 0, "area": int(mask.sum()),
               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
        if with_masks:
            ann["segmentation"] = encode_mask(mask)
        anns.append(ann)
    path = root / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 4, "name": "car"}, {"id": 11, "name": "cone"}]}))
    return str(path)


def _eval_results(mask_kind: str):
    """Per image size: the GT object found (score 0.9, label 1 = "cone") with the GT mask ("right") or a thin
    strip of its box ("wrong"), plus a low-scoring "car" that evaluate.conf_threshold=0.5 drops."""
    out = {}
    for (h, w), box in zip(SIZES, GT_BOXES):
        right = _ellipse(h, w, box)
        mask = right if mask_kind == "right" else _rect(h, w, box[1], box[1] + 2, box[0], box[2])
        out[(h, w)] = {"scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0]),
                       "boxes": torch.tensor([box, [0, 0, 5, 5]], dtype=torch.float32),
                       "masks": torch.from_numpy(np.stack([mask, _rect(h, w, 0, 5, 0, 5)]))}
    return out


def _evaluate(compose, tmp_path, gt):
    cfg = compose(["model=mask_gdino", "action=evaluate", "dataset=coco", "dataset.batch_size=2",
                   "dataset.workers=0", "dataset.augmentation.test_random_resize=32", "evaluate.checkpoint=fake.pth",
                   "evaluate.conf_threshold=0.5", "evaluate.nms_threshold=0.3", "evaluate.mask_threshold=0.4",
                   f"dataset.val_data_sources.image_dir={_png_folder(tmp_path, SIZES)}",
                   f"dataset.val_data_sources.json_file={gt}"], results_dir=str(tmp_path / "ev"))
    return run_action(cfg), tmp_path / "ev" / "evaluate"


@pytest.mark.parametrize("mask_kind", ["right", "wrong"])
def test_evaluate_scores_boxes_and_masks_of_a_mask_model(compose, tokenizer, use_predictor, tmp_path, mask_kind):
    fake = use_predictor(FakePredictor(tokenizer, _eval_results(mask_kind)))
    metrics, out = _evaluate(compose, tmp_path, _coco_gt(tmp_path))
    assert fake.calls and all(c == {"nms_threshold": 0.3, "mask_threshold": 0.4} for c in fake.calls)
    assert metrics["mAP"] == pytest.approx(1.0)  # the boxes are right either way
    if mask_kind == "right":
        assert metrics["segm_mAP"] == pytest.approx(1.0) and metrics["segm_mAP50"] == pytest.approx(1.0)
    else:
        assert metrics["segm_mAP50"] == pytest.approx(0.0)
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert set(results) == {"bbox", "segm", "images_skipped"}
    assert results["segm"]["AP"] == pytest.approx(metrics["segm_mAP"])
    assert results["bbox"]["per_class_AP"]["cone"] == pytest.approx(1.0)
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == 3 and {d["category_id"] for d in detections} == {11}  # conf_threshold: the car is gone
    for d in detections:
        h, w = SIZES[d["image_id"] - 1]
        seg = d["segmentation"]
        decoded = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(decoded, _eval_results(mask_kind)[(h, w)]["masks"][0].numpy())


def test_evaluate_of_a_box_model_keeps_its_layout(compose, tokenizer, use_predictor, tmp_path):
    by_size = {s: {k: v for k, v in r.items() if k != "masks"} for s, r in _eval_results("right").items()}
    use_predictor(FakePredictor(tokenizer, by_size, has_masks=False))
    metrics, out = _evaluate(compose, tmp_path, _coco_gt(tmp_path, with_masks=False))
    assert set(metrics) == {"mAP", "mAP50", "mAP75", "images_skipped"} and metrics["mAP"] == pytest.approx(1.0)
    results = json.loads((out / "results.json").read_text())["metrics"]
    assert results["AP"] == pytest.approx(1.0) and "segm" not in results and "bbox" not in results
    assert all("segmentation" not in d for d in json.loads((out / "detections.json").read_text()))


def test_evaluate_of_a_mask_model_needs_gt_masks(compose, tokenizer, use_predictor, tmp_path):
    use_predictor(FakePredictor(tokenizer, _eval_results("right")))
    with pytest.raises(DataError) as info:
        _evaluate(compose, tmp_path, _coco_gt(tmp_path, with_masks=False))
    message = str(info.value)
    assert "gt.json: annotation id 1" in message and "needs a segmentation on every GT annotation" in message


def _infer_results():
    """Per image size: a "cone" (score 0.9) with a rectangle mask, and a "car" (0.3, below the threshold) with a
    mask in the bottom-right corner."""
    out = {}
    for h, w in SIZES:
        out[(h, w)] = {"scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([1, 0]),
                       "boxes": torch.tensor([[6.0, 16.0, 30.0, 34.0], [w - 10.0, h - 8.0, w - 1.0, h - 1.0]]),
                       "masks": torch.from_numpy(np.stack([_rect(h, w, 16, 34, 6, 30),
                                                           _rect(h, w, h - 8, h - 1, w - 10, w - 1)]))}
    return out


@pytest.mark.parametrize("prompting", ["classmap", "captions per image"])
def test_inference_writes_masks(compose, tokenizer, use_predictor, tmp_path, prompting):
    results = _infer_results()
    if prompting == "captions per image":  # detect_captions names its detections by phrase
        for r in results.values():
            r["phrases"] = ["cone", "car"]
            del r["labels"]
        (tmp_path / "captions.jsonl").write_text("\n".join(
            json.dumps({"image_path": n, "caption": "cone . car ."}) for n in ("a.png", "b.png", "c.png")))
        source = ["dataset=coco_raw", f"dataset.infer_data_sources.json_file={tmp_path / 'captions.jsonl'}"]
    else:
        (tmp_path / "classes.txt").write_text("car\ncone\n")
        source = ["dataset=raw", f"dataset.infer_data_sources.classmap={tmp_path / 'classes.txt'}"]
    fake = use_predictor(FakePredictor(tokenizer, results))
    cfg = compose(["model=mask_gdino", "action=inference", "dataset.workers=0"] + source + [
        "dataset.batch_size=2", "dataset.augmentation.test_random_resize=32", "inference.checkpoint=fake.pth",
        "inference.conf_threshold=0.5", "inference.mask_threshold=0.35", "+inference.color_map.cone='#0000ff'",
        f"dataset.infer_data_sources.image_dir=[{_png_folder(tmp_path, SIZES)}]"], results_dir=str(tmp_path / "run"))
    metrics = run_action(cfg)
    out = tmp_path / "run" / "inference"
    assert metrics["images"] == 3 and metrics["detections"] == 3
    assert fake.calls and all(c["mask_threshold"] == 0.35 for c in fake.calls)
    images = {i["id"]: i for i in json.loads((out / "images.json").read_text())["images"]}
    detections = json.loads((out / "results.json").read_text())
    assert len(detections) == 3  # conf_threshold drops the car, mask and all
    for d in detections:
        img = images[d["image_id"]]
        seg = d["segmentation"]
        decoded = mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
        np.testing.assert_array_equal(decoded, results[(img["height"], img["width"])]["masks"][0].numpy())
    for name, (h, w) in zip("abc", SIZES):
        kitti = (out / "labels" / f"{name}.txt").read_text().splitlines()
        assert len(kitti) == 1 and kitti[0].startswith("cone 0.00 0 0.00 6.00 16.00 30.00 34.00 ")
        drawn = np.asarray(Image.open(out / "images_annotated" / f"{name}.jpg")).astype(float)
        inside = drawn[22:30, 12:26].mean(axis=(0, 1))  # inside the cone's mask, clear of its outline and label
        assert inside == pytest.approx([64, 64, 191], abs=8)  # half-way to the colour map's blue
        corner = drawn[h - 6 : h - 2, w - 8 : w - 2].mean(axis=(0, 1))  # the dropped car's mask: untouched
        assert corner == pytest.approx([128, 128, 128], abs=8)
