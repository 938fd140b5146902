"""action=inference end to end: a saved checkpoint (structure inside) on images from a folder and from a
.tar.gz, one class list (chunked when long) or a caption per image; writes annotated images, KITTI labels
and COCO results json."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_GDINO
from groundlab.models.gdino.build import build_gdino, save_gdino
from groundlab.runner import run_action


@pytest.fixture(scope="module")
def checkpoint(compose, tmp_path_factory):
    torch.manual_seed(0)
    cfg = compose(TINY_GDINO)
    built = build_gdino(cfg.model)
    return save_gdino(str(tmp_path_factory.mktemp("ckpt") / "gdino_tiny.pth"), built.model, cfg.model)


def _images(root, archive: bool):
    rng = np.random.default_rng(0)
    files = {"a.jpg": (60, 80), "sub/b.png": (72, 64), "c.jpg": (50, 50)}
    blobs = {}
    for name, (h, w) in files.items():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG" if name.endswith("png") else "JPEG")
        blobs[name] = buf.getvalue()
    if archive:
        path = root / "imgs.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, data in blobs.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return str(path), files
    for name, data in blobs.items():
        (root / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "imgs" / name).write_bytes(data)
    return str(root / "imgs"), files


BASE = ["action=inference", "dataset=raw", "dataset.batch_size=2", "dataset.workers=0",
        "dataset.augmentation.test_random_resize=64", "inference.conf_threshold=0.0"]


@pytest.mark.parametrize("archive", [False, True])
def test_class_list_inference_writes_all_outputs(compose, checkpoint, tmp_path, archive):
    image_dir, files = _images(tmp_path, archive)
    cfg = compose(BASE + [f"inference.checkpoint={checkpoint}", f"dataset.infer_data_sources.image_dir=[{image_dir}]",
                          "dataset.infer_data_sources.captions=[car,race car,person]"], results_dir=str(tmp_path / "run"))
    metrics = run_action(cfg)
    out = tmp_path / "run" / "inference"
    assert metrics["images"] == 3 and metrics["detections"] == 3 * 20  # num_select of the tiny model
    for name, (h, w) in files.items():
        stem = os.path.splitext(name)[0]
        lines = (out / "labels" / f"{stem}.txt").read_text().splitlines()
        assert len(lines) == 20
        fields = lines[0].split()
        assert fields[0] in ("car", "race_car", "person") and len(fields) == 16
        x1, y1, x2, y2 = map(float, fields[4:8])
        assert x1 <= x2 and y1 <= y2
        assert Image.open(out / "images_annotated" / f"{stem}.jpg").size == (w, h)
    detections = json.loads((out / "results.json").read_text())
    images = json.loads((out / "images.json").read_text())
    assert len(detections) == 60 and {d["image_id"] for d in detections} == {i["id"] for i in images["images"]}
    assert [c["name"] for c in images["categories"]] == ["car", "race car", "person"]


def test_long_class_list_is_chunked_and_merged(compose, checkpoint, tmp_path, monkeypatch):
    image_dir, _ = _images(tmp_path, False)
    names = ",".join(f"thing{i}" for i in range(120))  # > 256 tokens: several prompts
    prompts_seen = []
    from groundlab.predict.text_cache import TextCache

    original = TextCache.get

    def spy(self, prompt):
        prompts_seen.append(prompt.text)
        return original(self, prompt)

    monkeypatch.setattr(TextCache, "get", spy)
    cfg = compose(BASE + [f"inference.checkpoint={checkpoint}", f"dataset.infer_data_sources.image_dir=[{image_dir}]",
                          f"dataset.infer_data_sources.captions=[{names}]"], results_dir=str(tmp_path / "run"))
    run_action(cfg)
    distinct = set(prompts_seen)
    assert len(distinct) >= 2  # the class list did not fit one prompt
    assert sorted(n for p in distinct for n in p[: -len(" .")].split(" . ")) == sorted(f"thing{i}" for i in range(120))
    labels = {d["category_id"] for d in json.loads((tmp_path / "run" / "inference" / "results.json").read_text())}
    assert labels <= set(range(120))


def test_caption_per_image_decodes_phrases(compose, checkpoint, tmp_path):
    image_dir, _ = _images(tmp_path, True)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"image_path": n, "caption": "a red car . a dog ."})
                                  for n in ("a.jpg", "sub/b.png")))
    cfg = compose(BASE + ["dataset=coco_raw", f"inference.checkpoint={checkpoint}", "inference.text_threshold=0.0",
                          f"dataset.infer_data_sources.image_dir=[{image_dir}]",
                          f"dataset.infer_data_sources.json_file={captions}"], results_dir=str(tmp_path / "run"))
    metrics = run_action(cfg)
    assert metrics["images"] == 2
    images = json.loads((tmp_path / "run" / "inference" / "images.json").read_text())
    words = {w for c in images["categories"] for w in c["name"].split()}
    assert words and words <= {"a", "red", "car", "dog", "object"}


# Twenty one-token class names; with max_text_len=16 a prompt holds 7 of them ([CLS] + 7 x (name .) + [SEP]),
# so the list runs as three prompts.
CLASSES = ["cat", "dog", "bird", "horse", "sheep", "cow", "bear", "car", "bus", "train", "truck", "boat", "bench",
           "chair", "couch", "bed", "table", "book", "clock", "zebra"]


def _sees_only(model, token_id: int) -> None:
    """Weights under which every query scores `token_id` at +32 and every other token at -32, whatever the
    image: the text path carries one signed feature (+ for that token, - for the rest) from the word embedding
    to the contrastive head, and every decoder query ends as the same vector."""
    d, k = model.feat_map.out_features, 0
    v = torch.tensor([1.0, -1.0] * (d // 2))  # zero mean, unit std: LayerNorms pass it unchanged
    bert = model.bert
    with torch.no_grad():
        emb = bert.embeddings
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        emb.word_embeddings.weight[:, k] = -1.0
        emb.word_embeddings.weight[token_id] = 0.0
        emb.word_embeddings.weight[token_id, k] = 1.0
        norms = [emb.LayerNorm]
        for layer in bert.encoder.layer:  # no attention or FFN update: each layer only re-normalizes
            for lin in (layer.attention.output.dense, layer.output.dense):
                lin.weight.zero_()
                lin.bias.zero_()
            norms += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
        model.feat_map.weight.zero_()
        model.feat_map.weight[:, k] = v
        model.feat_map.bias.zero_()
        enc = model.transformer.encoder
        for fusion, text_layer in zip(enc.fusion_layers, enc.text_layers):
            fusion.gamma_l.zero_()  # the image does not update the text
            for lin in (text_layer.self_attn.out_proj, text_layer.linear2):
                lin.weight.zero_()
                lin.bias.zero_()
            norms += [fusion.layer_norm_l, text_layer.norm1, text_layer.norm2]
        for norm in norms:
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        decoder_norm = model.transformer.decoder.norm  # every query's final feature: v
        decoder_norm.weight.zero_()
        decoder_norm.bias.copy_(v)


@pytest.fixture(scope="module")
def zebra_checkpoint(compose, tokenizer, tmp_path_factory):
    """A tiny Grounding DINO with max_text_len=16 that detects "zebra" (score ~1) with every query, nothing else."""
    torch.manual_seed(0)
    cfg = compose(TINY_GDINO + ["model.max_text_len=16"])
    model = build_gdino(cfg.model).model
    _sees_only(model, tokenizer.convert_tokens_to_ids("zebra"))
    return save_gdino(str(tmp_path_factory.mktemp("ckpt") / "zebra_only.pth"), model, cfg.model)


@pytest.mark.parametrize("target", [19, 9])  # in the last prompt, and in a middle one
def test_chunked_class_list_reports_each_class_under_its_own_id(compose, tokenizer, zebra_checkpoint, tmp_path,
                                                                 target):
    from groundlab.text.captions import chunk_class_prompts
    from groundlab.text.tokens import PromptEncoder

    names = list(CLASSES)
    names[target], names[-1] = names[-1], names[target]  # zebra is the class at index `target`
    chunked = chunk_class_prompts(names, PromptEncoder(tokenizer, 16).name_len, 16)
    where = next(k for k, ids in enumerate(chunked.class_ids) if target in ids)
    assert len(chunked.prompts) == 3 and where == (2 if target == 19 else 1)
    assert chunked.class_ids[where].index(target) != target  # its place inside its prompt is another id

    image_dir, files = _images(tmp_path, False)
    cfg = compose(BASE[:-1] + ["inference.conf_threshold=0.5", f"inference.checkpoint={zebra_checkpoint}",
                               f"dataset.infer_data_sources.image_dir=[{image_dir}]",
                               f"dataset.infer_data_sources.captions=[{','.join(names)}]"],
                  results_dir=str(tmp_path / "run"))
    metrics = run_action(cfg)

    out = tmp_path / "run" / "inference"
    detections = json.loads((out / "results.json").read_text())
    assert metrics["detections"] == len(detections) == 3 * 20  # every query, on every image, sees a zebra
    assert {d["category_id"] for d in detections} == {target}
    assert all(d["score"] > 0.99 for d in detections)
    categories = json.loads((out / "images.json").read_text())["categories"]
    assert categories[target] == {"id": target, "name": "zebra"}
    for name in files:
        lines = (out / "labels" / f"{os.path.splitext(name)[0]}.txt").read_text().splitlines()
        assert len(lines) == 20 and {line.split()[0] for line in lines} == {"zebra"}


def test_chunked_evaluation_reports_the_last_prompts_class_under_its_coco_id(compose, zebra_checkpoint, tmp_path):
    image_dir, files = _images(tmp_path, False)
    coco_ids = [3 * i + 7 for i in range(len(CLASSES))]  # not contiguous; zebra has the largest: the last class
    gt = {"images": [{"id": i + 1, "file_name": n, "height": h, "width": w} for i, (n, (h, w)) in enumerate(files.items())],
          "categories": [{"id": c, "name": n} for c, n in zip(coco_ids, CLASSES)],
          "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": coco_ids[-1], "bbox": [2, 2, 20, 20],
                           "area": 400, "iscrowd": 0} for i in range(len(files))]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    # one batch: a 64x64 image alone would leave the tiny model (32 channels, 32 groups) a 1x1 GroupNorm level
    cfg = compose(["action=evaluate", "dataset=coco", "dataset.batch_size=3", "dataset.workers=0",
                   "dataset.augmentation.test_random_resize=64", "evaluate.conf_threshold=0.5",
                   f"evaluate.checkpoint={zebra_checkpoint}", f"dataset.val_data_sources.image_dir={image_dir}",
                   f"dataset.val_data_sources.json_file={tmp_path / 'gt.json'}"], results_dir=str(tmp_path / "ev"))
    run_action(cfg)
    out = tmp_path / "ev" / "evaluate"
    assert json.loads((out / "results.json").read_text())["num_prompts"] == 3
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == 3 * 20 and {d["category_id"] for d in detections} == {coco_ids[-1]}
