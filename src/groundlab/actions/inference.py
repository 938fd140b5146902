"""action=inference for Grounding DINO and Mask Grounding DINO (a checkpoint, inference.onnx_file or
inference.trt_engine: predict/backends.py; none given: the latest checkpoint of the train run with the same
model and run_name, engine/run_dirs.py): images from folders or tar archives, one class list for all images
(`raw`, chunked into several prompts when longer than max_text_len and merged back) or a caption per image
(`coco_raw`, phrases decoded from token probabilities; images with different captions run as one batch).
The predictor encodes each distinct prompt once and runs the backbone once per image.

Writes into <results_dir>/inference/: images_annotated/ (boxes, label, score), labels/ (KITTI, TAO layout),
results.json (COCO detections) and images.json (the COCO images and categories they refer to). A mask model
(Mask Grounding DINO: its results carry "masks") adds each detection's mask: tinted in its class colour on the
annotated image and as an RLE "segmentation" in results.json; the KITTI files stay boxes only. An image that
cannot be decoded is skipped, named in the log and listed in images.json under "skipped_images"
({"file_name", "source", "reason"}); the metrics count it (images_skipped).

Referring segmentation (dataset.infer_data_sources.data_type=VG, a Mask Grounding DINO with region queries):
json_file is a jsonl of {"image_path", "expression"} (images under image_dir, else beside the jsonl); each
expression is one output (file names get the expression's id), its detections labelled with the expression's
words they answer to, its annotated image topped by the expression, or by "no target: ..." on red when the model
decides it refers to nothing; images.json records "expression" and "no_target" per entry.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from groundlab.config import ConfigError
from groundlab.data.bad_images import BadImage, log_skipped, split_bad
from groundlab.data.collate import pad_images
from groundlab.data.image_decode import decode_rgb
from groundlab.data.odvg import read_label_map
from groundlab.data.raw import (InferenceDataset, InferItem, caption_prompt, item_prompt, list_raw, open_sources,
                                read_classmap, read_coco_raw)
from groundlab.data.sources import resolve_sources, synthetic_paths
from groundlab.deploy.mask_overlay import draw_expression_banner, draw_masked_detections
from groundlab.deploy.writers import CocoResultsWriter, draw_detections, write_kitti
from groundlab.engine.devices import run_device
from groundlab.engine.run_dirs import chained_settings
from groundlab.io.remote_files import local_path
from groundlab.predict.backends import choose_backend, open_predictor, predictor_transforms

log = logging.getLogger(__name__)


def inference_inputs(cfg: DictConfig) -> Tuple[list, List[InferItem], Optional[List[str]]]:
    """(image sources, items, class names or None for per-image captions) from dataset.infer_data_sources,
    or the synthetic val images with its label map when none are given and dataset=synthetic (dataset=synthetic_vg:
    its referring expressions on the val images). data_type=VG items are `referring` (InferItem)."""
    src = cfg.dataset.infer_data_sources
    cache = os.path.expanduser(cfg.cache_dir)
    resolved = resolve_sources(cfg.dataset, cache)["infer"]
    # remote (s3:// / https://) files are fetched into the cache here; image_dir archives in open_sources
    json_file = local_path(resolved.get("json_file"), cache, "dataset.infer_data_sources.json_file")
    if resolved.get("data_type") == "VG":  # an expression per line; images beside the jsonl unless image_dir says
        dirs = list(resolved.get("image_dir") or []) or [os.path.dirname(os.path.abspath(json_file))]
        sources = open_sources(dirs, cache)
        return sources, read_coco_raw(json_file, sources, cfg.dataset.skip_missing_images, "VG"), None
    if src.image_dir:
        # a classmap is read before the images open (an archive may take a while to decompress)
        classmap = local_path(src.classmap, cache, "dataset.infer_data_sources.classmap")
        names = read_classmap(classmap) if classmap else [str(c) for c in src.captions]
        sources = open_sources(list(src.image_dir), cache)
        if json_file:
            return sources, read_coco_raw(json_file, sources, cfg.dataset.skip_missing_images), None
        if not names:
            raise ConfigError("dataset.infer_data_sources.captions or .classmap (class names) or .json_file "
                              "(coco_raw captions per image) is needed with dataset.infer_data_sources.image_dir.")
        return sources, list_raw(sources), names
    if cfg.dataset.type == "synthetic":
        p = synthetic_paths(cfg.dataset, cache)
        sources = open_sources([p.val_images], cache)
        return sources, list_raw(sources), read_label_map(p.label_map)[0]
    raise ConfigError("action=inference needs dataset.infer_data_sources.image_dir (folders or tar archives).")


def _collate(items):
    """The decoded images as one batch, and the undecodable ones under "skipped" (only those when none decoded:
    "images" is None then)."""
    items, bad = split_bad(items)
    if not items:
        return {"images": None, "skipped": bad}
    images, padding = pad_images([it["image"] for it in items])
    return {"images": images, "padding_mask": padding, "orig_sizes": torch.stack([it["orig_size"] for it in items]),
            "captions": [it["caption"] for it in items], "referring": [it.get("referring", False) for it in items],
            "sources": [it["source"] for it in items],
            "file_names": [it["file_name"] for it in items], "skipped": bad}


def _safe_relative(name: str) -> str:
    """An output path under the results dir for an input image name (never escaping it)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return os.path.join(*parts) if parts else "image"


def run(cfg: DictConfig) -> Dict[str, float]:
    inf = chained_settings(cfg, "inference")  # no model file given: the train run's latest checkpoint
    choose_backend(inf, "inference")  # the settings are checked before anything loads
    predictor = open_predictor(cfg.model, inf, "inference", run_device(inf.num_gpus, inf.gpu_ids))
    sources, items, class_names = inference_inputs(cfg)
    chunked = predictor.chunked(class_names) if class_names else None  # also checks every name fits a prompt
    dataset = InferenceDataset(sources, items, predictor_transforms(cfg.dataset.augmentation, predictor))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.workers,
                                         collate_fn=_collate)
    out_dir = os.path.join(cfg.results_dir, "inference")
    coco = CocoResultsWriter(os.path.join(out_dir, "results.json"), conf_threshold=inf.conf_threshold)
    images_json: List[dict] = []
    skipped: List[BadImage] = []
    phrase_ids: Dict[str, int] = {}
    total = 0
    for batch in tqdm(loader, desc="inference", unit="batch"):
        for bad in batch["skipped"]:  # undecodable: named, listed in images.json, the run goes on
            log_skipped(bad)
        skipped += batch["skipped"]
        if batch["images"] is None:
            continue
        referring = any(batch["referring"])
        if referring:  # one referring expression per image (VG): instances, or "no target"
            results = predictor.detect_expressions(batch["images"], batch["padding_mask"], batch["orig_sizes"],
                                                   [item_prompt(c, True) for c in batch["captions"]], inf)
            for result in results:
                result["phrases"] = result.pop("labels")
        elif chunked is not None:
            results = predictor.detect_classes(batch["images"], batch["padding_mask"], batch["orig_sizes"],
                                               class_names, inf.nms_threshold, inf.mask_threshold)
        else:  # a caption per image, the whole batch at once
            results = predictor.detect_captions(batch["images"], batch["padding_mask"], batch["orig_sizes"],
                                                [caption_prompt(c) for c in batch["captions"]],
                                                inf.conf_threshold, inf.text_threshold, inf.mask_threshold)
        for b, result in enumerate(results):
            no_target = bool(result.pop("no_target", False))
            result = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in result.items()
                      if k not in ("union", "query_idx")}
            names = class_names
            if chunked is None:  # free-form: each decoded phrase is a category of this run
                labels = [phrase_ids.setdefault(p or "object", len(phrase_ids)) for p in result["phrases"]]
                result["labels"] = torch.tensor(labels, dtype=torch.long)
                names = list(phrase_ids)
            image_id = len(images_json) + 1
            name, source = batch["file_names"][b], batch["sources"][b]
            h, w = batch["orig_sizes"][b].tolist()
            images_json.append({"id": image_id, "file_name": name, "height": h, "width": w,
                                "source": sources[source].path})
            rel = _safe_relative(name)
            if referring:  # an image may come with several expressions: one output per expression
                images_json[-1].update({"expression": batch["captions"][b], "no_target": no_target})
                rel = f"{os.path.splitext(rel)[0]}_{image_id:05d}{os.path.splitext(rel)[1]}"
            if len(sources) > 1:  # same names in two folders/archives must not overwrite each other's outputs
                rel = os.path.join(f"{source}_{_safe_relative(os.path.basename(sources[source].path.rstrip('/')))}", rel)
            write_kitti(os.path.join(out_dir, "labels", os.path.splitext(rel)[0] + ".txt"), result, names,
                        inf.conf_threshold)
            coco.add(image_id, result)
            picture = decode_rgb(sources[source].read(name), name)
            draw = draw_masked_detections if "masks" in result else draw_detections
            drawn = draw(np.asarray(picture), result, names, dict(inf.color_map), inf.outline_width,
                         inf.conf_threshold)
            if referring:
                drawn = draw_expression_banner(drawn, batch["captions"][b], no_target)
            target = os.path.join(out_dir, "images_annotated", os.path.splitext(rel)[0] + ".jpg")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            drawn.convert("RGB").save(target, quality=92)
            total += int((result["scores"] >= inf.conf_threshold).sum())
    coco.write()
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names if chunked is not None else list(phrase_ids))]
    with open(os.path.join(out_dir, "images.json"), "w") as f:
        json.dump({"images": images_json, "categories": categories,
                   "skipped_images": [b.as_dict() for b in skipped]}, f, indent=1)
    log.info("inference: %d images, %d detections >= %.2f, written to %s%s", len(images_json), total,
             inf.conf_threshold, out_dir,
             f"; {len(skipped)} undecodable images skipped (listed in images.json)" if skipped else "")
    return {"images": float(len(images_json)), "detections": float(total), "images_skipped": float(len(skipped))}
