"""Referring expressions (VG, issue 13) on the data side: the ODVG reader's referring records, the synthetic
referring split (recomputed from the scenes' own objects), VG evaluation and training samples, the VG
inference jsonl, and the config rules of data_type."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import SMALL_SYNTHETIC
from groundlab.config import ConfigError, check_config
from groundlab.data.build import build_grounding_dataset
from groundlab.data.image_source import open_image_source
from groundlab.data.odvg import read_odvg
from groundlab.data.raw import InferenceDataset, item_prompt, open_sources, read_coco_raw
from groundlab.data.sources import load_source, resolve_sources, synthetic_paths
from groundlab.data.synthetic import SyntheticSpec, ensure_synthetic
from groundlab.data.synthetic_referring import (EXPRESSIONS_PER_IMAGE, KIND_FRACTIONS, NO_TARGET_FRACTION,
                                                POSITION_MARGIN, SIZE_MARGIN, plan_kinds, quotas)
from groundlab.data.transforms import build_eval_transforms, build_train_transforms
from groundlab.errors import DataError
from groundlab.ops.masks import decode_segmentation, encode_mask

SMALL_VG = [s.replace("dataset=synthetic", "dataset=synthetic_vg") for s in SMALL_SYNTHETIC] + ["model=mask_gdino"]


def _jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------- the reader
@pytest.fixture
def folder(tmp_path):
    """An image folder with a.png (40 x 60)."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(root / "a.png")
    return str(root)


def _mask(y0, y1, x0, x1):
    m = np.zeros((40, 60), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_reader_accepts_expression_caption_and_empty(tmp_path, folder):
    car, bus = _mask(5, 15, 10, 30), _mask(20, 30, 5, 15)
    rows = [
        {"file_name": "a.png", "height": 40, "width": 60, "grounding": {"expression": "the red car", "regions": [
            {"bbox": [10, 5, 30, 15], "mask": encode_mask(car), "tokens_positive": [[4, 11]]},
            {"bbox": [5, 20, 15, 30], "mask": encode_mask(bus), "tokens_positive": [[4, 11]]}], "empty": False}},
        {"file_name": "a.png", "empty": True, "grounding": {"caption": "a blue bus", "regions": []}},
        {"file_name": "a.png", "grounding": {"expression": "anything round", "regions": [
            {"bbox": [10, 5, 30, 15], "mask": encode_mask(car)}]}},
        {"file_name": "a.png", "grounding": {"caption": "a dog and a cat", "regions": [
            {"bbox": [1, 1, 9, 9], "phrase": "a dog"}]}},
    ]
    records, _, _ = read_odvg(_write_jsonl(tmp_path / "vg.jsonl", rows), None, open_image_source(folder))
    first, nothing, whole, plain = (records[i] for i in range(4))
    assert (first["referring"], first["empty"], first["expression"]) == (True, False, "the red car")
    assert first["phrases"] == ["red car"] and first["labels"] == [0, 0] and first["caption"] == "the red car"
    assert np.array_equal(decode_segmentation(first["masks"][1], 40, 60), bus)
    assert (nothing["referring"], nothing["empty"], nothing["boxes"], nothing["expression"]) == \
        (True, True, [], "a blue bus")
    assert whole["phrases"] == ["anything round"] and whole["spans"] == [[[0, 14]]]  # no phrase, no span
    assert (plain["referring"], plain["empty"], plain["expression"]) == (False, False, None)


def test_vg_source_reads_every_grounding_line_as_referring(tmp_path, folder):
    rows = [{"file_name": "a.png", "grounding": {"caption": "a dog", "regions": [{"bbox": [1, 1, 9, 9]}]}}]
    records, _, _ = read_odvg(_write_jsonl(tmp_path / "vg.jsonl", rows), None, open_image_source(folder),
                              data_type="VG")
    assert records[0]["referring"] and records[0]["phrases"] == ["a dog"]


REGION = {"bbox": [1, 1, 9, 9], "tokens_positive": [[0, 3]]}
BAD_LINES = [
    ({"grounding": {"expression": "a cat", "regions": [REGION], "empty": True}},
     "says empty: true (an expression that refers to nothing) but has 1 region(s)"),
    ({"empty": True, "grounding": {"expression": "a cat", "regions": [REGION]}}, "says empty: true"),
    ({"grounding": {"expression": "a cat", "regions": [], "empty": "yes"}}, "'empty' must be true or false"),
    ({"grounding": {"expression": "  ", "regions": []}}, "needs a non-empty 'expression' (or 'caption')"),
    ({"grounding": {"expression": "a cat", "regions": [], "empty": False}}, "says empty: false but has no regions"),
    ({"grounding": {"expression": "a cat", "regions": [{"bbox": [1, 1, 9, 9], "tokens_positive": [[2, 40]]}]}},
     "region 0: tokens_positive span [2, 40] is outside the expression (5 characters)"),
    ({"grounding": {"caption": "a cat", "regions": [{"bbox": [1, 1, 9, 9]}]}},  # plain grounding: as before
     "grounding region needs a non-empty 'phrase'"),
]


@pytest.mark.parametrize("line, fragment", BAD_LINES, ids=[f for _, f in BAD_LINES])
def test_reader_names_file_and_line_of_bad_referring_lines(tmp_path, folder, line, fragment):
    good = {"file_name": "a.png", "grounding": {"expression": "a cat", "regions": [REGION]}}
    path = _write_jsonl(tmp_path / "vg.jsonl", [good, {"file_name": "a.png", **line}])
    with pytest.raises(DataError) as info:
        read_odvg(path, None, open_image_source(folder))
    assert str(info.value).startswith(f"{path}:2: ") and fragment in str(info.value)


def test_vg_source_refuses_detection_lines_and_coco_files(tmp_path, folder):
    path = _write_jsonl(tmp_path / "vg.jsonl", [{"file_name": "a.png", "detection": {"instances": []}}])
    with pytest.raises(DataError, match=r"vg.jsonl:1: a data_type=VG source holds referring expressions"):
        read_odvg(path, None, open_image_source(folder), data_type="VG")
    coco = tmp_path / "vg.json"
    coco.write_text("{}")
    with pytest.raises(DataError, match=r"dataset.val_data_sources.data_type=VG reads referring expressions from an "
                                        r"ODVG .jsonl file, but dataset.val_data_sources.json_file='.*vg.json'"):
        load_source({"image_dir": folder, "json_file": str(coco), "data_type": "VG"}, "dataset.val_data_sources",
                    str(tmp_path / "cache"))


# ------------------------------------------------------------------------------ the synthetic referring split
SPEC = SyntheticSpec(seed=5, image_size=(64, 72), num_train=40, num_val=10)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return ensure_synthetic(SPEC, str(tmp_path_factory.mktemp("vg_cache")))


def _scenes(paths) -> dict:
    """file name -> [(colour, shape, bbox, mask)] from the detection files (train ODVG, val COCO)."""
    out = {}
    for rec in _jsonl(paths.train_odvg):
        out[rec["file_name"]] = [(*inst["category"].split(), inst["bbox"], mask_utils.decode(inst["mask"]) > 0)
                                 for inst in rec["detection"]["instances"]]
    with open(paths.val_coco) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    for name in files.values():
        out[name] = []
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        out[files[ann["image_id"]]].append((*names[ann["category_id"]].split(), [x, y, x + w, y + h],
                                            mask_utils.decode(ann["segmentation"]) > 0))
    return out


def _noun_members(noun: str, objs) -> list:
    words = noun.split()
    if words == ["shape"]:
        return list(range(len(objs)))
    if len(words) == 1:
        return [i for i, o in enumerate(objs) if o[1] == words[0]]
    if words[1] == "shape":
        return [i for i, o in enumerate(objs) if o[0] == words[0]]
    return [i for i, o in enumerate(objs) if o[:2] == tuple(words)]


def _centre(o, axis):
    return (o[2][axis] + o[2][axis + 2]) / 2


def _referents(text: str, objs, hw) -> tuple:
    """(kind, referred object indices, the referent's words), recomputed from the text and the scene alone."""
    h, w = hw
    extent = (w, h)
    m = re.fullmatch(r"shape (left of|right of|above|below) the (\w+) (\w+)", text)
    if m:
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[m[1]]
        anchors = [i for i, o in enumerate(objs) if o[:2] == (m[2], m[3])]
        assert len(anchors) == 1, text  # the anchor is uniquely identified
        a = anchors[0]
        offsets = {i: sign * (_centre(o, axis) - _centre(objs[a], axis)) for i, o in enumerate(objs) if i != a}
        assert all(abs(d) >= POSITION_MARGIN * extent[axis] for d in offsets.values()), text  # none borderline
        return "relation", sorted(i for i, d in offsets.items() if d > 0), "shape"
    m = re.fullmatch(r"the (largest|smallest) (.+)", text)
    if m:
        members = sorted(_noun_members(m[2], objs), key=lambda i: objs[i][3].sum())
        assert len(members) >= 2, text
        big, small = (members[-1], members[-2]) if m[1] == "largest" else (members[1], members[0])
        assert objs[big][3].sum() >= SIZE_MARGIN * objs[small][3].sum(), text
        return "size", [members[-1] if m[1] == "largest" else members[0]], f"{m[1]} {m[2]}"
    m = re.fullmatch(r"the (leftmost|rightmost|topmost|bottommost) (.+)", text)
    if m:
        axis, sign = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}[m[1]]
        members = sorted(_noun_members(m[2], objs), key=lambda i: sign * _centre(objs[i], axis))
        assert len(members) >= 2, text
        gap = sign * (_centre(objs[members[-1]], axis) - _centre(objs[members[-2]], axis))
        assert gap >= POSITION_MARGIN * extent[axis], text
        return "position", [members[-1]], f"{m[1]} {m[2]}"
    m = re.fullmatch(r"all (\w+) shapes", text)
    if m:
        return "color", [i for i, o in enumerate(objs) if o[0] == m[1]], f"{m[1]} shapes"
    m = re.fullmatch(r"all (\w+)", text)
    if m:
        return "shape", [i for i, o in enumerate(objs) if m[1] in (o[1] + "s", o[1] + "es")], m[1]
    color, shape = text.split()
    return "category", [i for i, o in enumerate(objs) if o[:2] == (color, shape)], text


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_expression_refers_to_what_its_words_say(generated, split):
    scenes = _scenes(generated)
    kinds = set()
    for line in _jsonl(getattr(generated, f"referring_{split}")):
        g, objs = line["grounding"], scenes[line["file_name"]]
        text = g["expression"]
        kind, ids, words = _referents(text, objs, SPEC.image_size)
        if g["kind"] == "no_target":
            assert kind in ("category", "color", "shape") and ids == [], text  # really nothing of the kind
            assert g["empty"] is True and g["regions"] == []
            continue
        kinds.add(kind)
        assert g["kind"] == kind and ids and g["empty"] is False, text
        regions = [(r["bbox"], mask_utils.decode(r["mask"]) > 0) for r in g["regions"]]
        assert sorted(map(str, (r[0] for r in regions))) == sorted(str(objs[i][2]) for i in ids), text
        union = np.logical_or.reduce([m for _, m in regions])
        assert np.array_equal(union, np.logical_or.reduce([objs[i][3] for i in ids])), text
        for r in g["regions"]:
            (start, end), = r["tokens_positive"]
            assert text[start:end] == words == r["phrase"], text
    if split == "train":
        assert kinds == set(KIND_FRACTIONS) - {"no_target"}


def test_kinds_have_their_declared_shares_and_images_their_count(generated):
    assert abs(sum(KIND_FRACTIONS.values()) - 1) < 1e-9 and KIND_FRACTIONS["no_target"] == NO_TARGET_FRACTION
    for split, images in (("train", SPEC.num_train), ("val", SPEC.num_val)):
        lines = _jsonl(getattr(generated, f"referring_{split}"))
        per_image = collections.Counter(ln["file_name"] for ln in lines)
        assert set(per_image.values()) == {EXPRESSIONS_PER_IMAGE[split]} and len(per_image) == images
        by_image = collections.defaultdict(list)
        for ln in lines:
            by_image[ln["file_name"]].append(ln["grounding"]["expression"])
        assert all(len(set(texts)) == len(texts) for texts in by_image.values())  # no repeats in an image
        counts = collections.Counter(ln["grounding"]["kind"] for ln in lines)
        assert counts == quotas(len(lines)), split
        for kind, share in KIND_FRACTIONS.items():
            assert abs(counts[kind] / len(lines) - share) <= 1 / len(lines)
        assert sum(ln["grounding"]["empty"] for ln in lines) == counts["no_target"]


def test_referring_files_are_deterministic_and_inference_mirrors_val(generated, tmp_path):
    again = ensure_synthetic(SPEC, str(tmp_path))
    for name in ("referring_train", "referring_val", "referring_infer"):
        with open(getattr(generated, name), "rb") as a, open(getattr(again, name), "rb") as b:
            assert a.read() == b.read(), name
    val = _jsonl(generated.referring_val)
    assert _jsonl(generated.referring_infer) == [
        {"image_path": ln["file_name"], "expression": ln["grounding"]["expression"]} for ln in val]


def test_plan_meets_quotas_within_capacity_and_fills_poor_scenes():
    rng = np.random.default_rng(0)
    capacity = [{k: int(rng.integers(0, 3)) for k in KIND_FRACTIONS} | {"no_target": 3, "category": 1}
                for _ in range(30)]
    plan = plan_kinds(capacity, 2, np.random.default_rng(1))
    assert collections.Counter(k for kinds in plan for k in kinds) == quotas(60)
    assert all(kinds.count(k) <= capacity[i][k] for i, kinds in enumerate(plan) for k in kinds)
    poor = plan_kinds([{"no_target": 1, "category": 1}] * 4, 2, np.random.default_rng(1))
    assert poor == [["category", "no_target"]] * 4  # quotas unreachable: every slot still filled


# ------------------------------------------------------------------------------------------------- samples
def test_vg_evaluation_sample_prompts_the_whole_expression_with_union_at_original_size(compose):
    cfg = compose(SMALL_VG)
    ds, collate = build_grounding_dataset(cfg, "val", augment=False)
    assert ds.sources[0].data_type == "VG" and ds.sources[0].name.endswith("referring_val.jsonl")
    seen_empty = seen_full = False
    for i in range(len(ds)):
        item, (_, rec) = ds[i], ds.locate(i)
        t, expr = item["target"], rec["expression"]
        assert item["prompt"].text == expr + " ." and item["prompt"].phrases == (expr,)
        assert item["prompt"].spans == (((0, len(expr)),),) and item["prompt_class_ids"] == [-1]
        assert t["vg_union"].dtype == torch.bool and tuple(t["vg_union"].shape) == tuple(t["orig_size"].tolist())
        assert tuple(t["orig_size"].tolist()) == (64, 80) and tuple(item["image"].shape[1:]) != (64, 80)
        union = np.zeros((64, 80), bool)
        for m in rec["masks"] or []:
            union |= decode_segmentation(m, 64, 80)
        assert np.array_equal(t["vg_union"].numpy(), union)
        assert t["empty"] is rec["empty"] and (t["empty"] == (not union.any()) == (len(t["boxes"]) == 0))
        assert t["phrase_ids"].tolist() == [0] * len(t["boxes"])
        seen_empty |= t["empty"]
        seen_full |= not t["empty"]
    assert seen_empty and seen_full
    batch = collate([ds[0], ds[1]])
    assert torch.equal(batch["targets"][0]["vg_union"], ds[0]["target"]["vg_union"])
    for b, t in enumerate(batch["targets"]):  # every referred box is positive on the whole expression
        for row in t["positive_map"]:
            ids = batch["input_ids"][b][row[: batch["input_ids"].shape[1]].bool()]
            assert ds.encoder.tokenizer.decode(ids) == batch["prompts"][b].phrases[0]


def test_vg_training_samples_are_grounding_records_with_empty_ones(compose):
    cfg = compose(SMALL_VG)
    ds, collate = build_grounding_dataset(cfg, "train", augment=True)
    assert [src.data_type for src in ds.sources] == ["VG", "OD"]  # the expressions, then the detection records
    items = [ds[i] for i in range(len(ds.sources[0].records))]
    assert all("vg_union" not in it["target"] for it in items)  # the union is an evaluation target
    empty = [it for it in items if it["target"]["empty"]]
    assert empty and len(empty) < len(items)
    for it in empty:
        t = it["target"]
        assert len(t["boxes"]) == 0 and t["masks"].shape == (0,) + tuple(it["image"].shape[1:])
        assert it["prompt"].text == it["prompt"].phrases[0] + " ."
    full = [i for i, it in enumerate(items) if not it["target"]["empty"]][:6]
    batch = collate([items[i] for i in full])
    for b, (t, i) in enumerate(zip(batch["targets"], full)):
        _, rec = ds.locate(i)
        assert t["masks"].shape[0] == len(t["boxes"]) and batch["prompts"][b].text == rec["expression"] + " ."
        for row in t["positive_map"]:  # positive tokens: the referent's words, e.g. "shape" of a relation
            ids = batch["input_ids"][b][row[: batch["input_ids"].shape[1]].bool()]
            assert ds.encoder.tokenizer.decode(ids) == rec["phrases"][0]


@pytest.mark.parametrize("train", [True, False])
def test_transforms_pass_vg_union_through_untouched(compose, train):
    aug = compose(SMALL_VG).dataset.augmentation
    transforms = build_train_transforms(aug) if train else build_eval_transforms(aug)
    union = torch.zeros(50, 70, dtype=torch.bool)
    union[10:20, 5:40] = True
    target = {"boxes": torch.tensor([[5.0, 10.0, 40.0, 20.0]]), "masks": union[None].clone(),
              "labels": torch.tensor([-1]), "phrase_ids": torch.tensor([0]), "vg_union": union, "empty": False}
    for seed in range(6):
        _, out = transforms(torch.rand(3, 50, 70) * 255, target, np.random.default_rng(seed))
        assert out["vg_union"] is union and out["empty"] is False


# ---------------------------------------------------------------------------------------- VG inference input
def test_vg_inference_jsonl_reader(compose, tmp_path, folder):
    sources = open_sources([folder], str(tmp_path / "cache"))
    path = _write_jsonl(tmp_path / "infer.jsonl", [{"image_path": "a.png", "expression": "the left dog . cat"},
                                                   {"image_path": "a.png", "caption": "anything blue"}])
    items = read_coco_raw(path, sources, data_type="VG")
    assert [(it.name, it.caption, it.referring) for it in items] == [
        ("a.png", "the left dog . cat", True), ("a.png", "anything blue", True)]
    prompt = item_prompt(items[0].caption, items[0].referring)
    assert prompt.phrases == ("the left dog . cat",) and prompt.spans == (((0, 18),),)  # not split at the "."
    assert len(item_prompt("the left dog . cat").phrases) == 2  # OD captions still split
    sample = InferenceDataset(sources, items, build_eval_transforms(compose(SMALL_VG).dataset.augmentation))[0]
    assert sample["referring"] is True and sample["caption"] == "the left dog . cat"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"image_path": "a.png", "expression": "a dog"},
                                                {"image_path": "a.png", "text": "a dog"}])
    with pytest.raises(DataError, match=rf"^{re.escape(bad)}:2: each line needs 'image_path' and a non-empty "
                                        r"'expression'"):
        read_coco_raw(bad, sources, data_type="VG")
    assert not read_coco_raw(_write_jsonl(tmp_path / "od.jsonl", [{"image_path": "a.png", "caption": "x"}]),
                             sources)[0].referring


def test_synthetic_vg_resolves_referring_sources(compose):
    cfg = compose(SMALL_VG)
    p = synthetic_paths(cfg.dataset, cfg.cache_dir)
    resolved = resolve_sources(cfg.dataset, cfg.cache_dir)
    assert resolved["train"] == [{"image_dir": p.train_images, "json_file": p.referring_train, "label_map": None,
                                  "data_type": "VG"},
                                 {"image_dir": p.train_images, "json_file": p.train_odvg, "label_map": p.label_map,
                                  "data_type": "OD"}]
    assert resolved["val"] == resolved["test"] == {"image_dir": p.val_images, "json_file": p.referring_val,
                                                   "label_map": None, "data_type": "VG"}
    infer = resolved["infer"]
    assert (infer["image_dir"], infer["json_file"], infer["data_type"]) == ([p.val_images], p.referring_infer, "VG")
    items = read_coco_raw(infer["json_file"], open_sources(infer["image_dir"], cfg.cache_dir), data_type="VG")
    assert len(items) == 6 * EXPRESSIONS_PER_IMAGE["val"] and all(it.referring for it in items)


# ---------------------------------------------------------------------------------------------- config rules
def _refused(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    return str(info.value)


VG_RULES = [
    (["model=gdino", "dataset.val_data_sources.data_type=VG"],
     "dataset.val_data_sources.data_type=VG (referring expressions) needs model=mask_gdino"),
    (["model=gdino", "dataset=synthetic_vg"], "dataset=synthetic_vg (referring expressions) needs model=mask_gdino"),
    (["model=mask_gdino", "dataset=odvg", "dataset.test_data_sources.data_type=VG",
      "dataset.test_data_sources.json_file=refs.json"],
     "dataset.test_data_sources.data_type=VG reads referring expressions from an ODVG .jsonl file, but "
     "dataset.test_data_sources.json_file='refs.json' is not one."),
    (["model=mask_gdino", "dataset=raw", "dataset.infer_data_sources.data_type=VG"],
     "dataset.infer_data_sources.data_type=VG reads one referring expression per image from "
     "dataset.infer_data_sources.json_file"),
    (["model=mask_gdino", "dataset=raw", "dataset.infer_data_sources.data_type=VG",
      "dataset.infer_data_sources.json_file=refs.jsonl", "dataset.infer_data_sources.captions=[car]"],
     "dataset.infer_data_sources.captions is a class list for data_type=OD"),
    (["model=mask_gdino", "dataset=odvg", "dataset.train_data_sources=[{image_dir: a, json_file: b.jsonl, "
      "data_type: VD}]"], "dataset.train_data_sources[0].data_type='VD' must be one of OD, VG."),
]


@pytest.mark.parametrize("overrides, fragment", VG_RULES, ids=[r[1][:60] for r in VG_RULES])
def test_vg_rules_name_the_key(compose, overrides, fragment):
    assert fragment in _refused(compose(overrides))


@pytest.mark.parametrize("overrides", [
    ["model=mask_gdino", "dataset=synthetic_vg", "action=train"],
    ["model=mask_gdino", "dataset=synthetic_vg", "action=inference"],
    ["model=mask_gdino", "dataset=odvg", "dataset.val_data_sources.data_type=VG",
     "dataset.val_data_sources.json_file=refs.jsonl", "dataset.infer_data_sources.data_type=VG",
     "dataset.infer_data_sources.json_file=E/inference.jsonl"],
    ["model=mask_gdino", "dataset.val_data_sources.data_type=OD"],  # TAO's explicit OD
])
def test_vg_configs_pass_once_available(compose, overrides):
    check_config(compose(overrides))
