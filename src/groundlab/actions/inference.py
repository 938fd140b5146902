"""action=inference for Grounding DINO: images from folders or tar archives, one class list for all images
(`raw`, chunked into several prompts when longer than max_text_len and merged back) or a caption per image
(`coco_raw`, phrases decoded from token probabilities). Each distinct prompt is encoded once.

Writes into <results_dir>/inference/: images_annotated/ (boxes, label, score), labels/ (KITTI, TAO layout),
results.json (COCO detections) and images.json (the COCO images and categories they refer to).
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
from groundlab.text.captions import ChunkedPrompts, chunk_class_prompts
from groundlab.data.collate import pad_images
from groundlab.data.image_decode import decode_rgb
from groundlab.data.odvg import read_label_map
from groundlab.data.raw import InferenceDataset, InferItem, caption_prompt, list_raw, open_sources, read_coco_raw
from groundlab.data.sources import synthetic_paths
from groundlab.text.tokenizer import load_tokenizer
from groundlab.text.tokens import PromptEncoder
from groundlab.data.transforms import build_eval_transforms
from groundlab.deploy.writers import CocoResultsWriter, draw_detections, write_kitti
from groundlab.models.gdino.build import build_gdino
from groundlab.models.gdino.postprocess import GroundingPostProcessor, merge_chunk_results, select_free_form

log = logging.getLogger(__name__)


def inference_inputs(cfg: DictConfig) -> Tuple[list, List[InferItem], Optional[List[str]]]:
    """(image sources, items, class names or None for per-image captions) from dataset.infer_data_sources,
    or the synthetic val images with its label map when none are given and dataset=synthetic."""
    src = cfg.dataset.infer_data_sources
    cache = os.path.expanduser(cfg.cache_dir)
    if src.image_dir:
        sources = open_sources(list(src.image_dir), cache)
        if src.json_file:
            return sources, read_coco_raw(src.json_file, sources, cfg.dataset.skip_missing_images), None
        if not src.captions:
            raise ConfigError("dataset.infer_data_sources.captions (class names) or .json_file (coco_raw "
                              "captions per image) is needed with dataset.infer_data_sources.image_dir.")
        return sources, list_raw(sources), [str(c) for c in src.captions]
    if cfg.dataset.type == "synthetic":
        p = synthetic_paths(cfg.dataset, cache)
        sources = open_sources([p.val_images], cache)
        return sources, list_raw(sources), read_label_map(p.label_map)[0]
    raise ConfigError("action=inference needs dataset.infer_data_sources.image_dir (folders or tar archives).")


class TextCache:
    """Encoded text per distinct prompt text, so BERT runs once per prompt, not once per image."""

    def __init__(self, model, encoder: PromptEncoder, device):
        self.model, self.encoder, self.device, self.cache = model, encoder, device, {}

    def get(self, prompt) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(encoded text (batch 1), positive map (P, max_text_len), input_ids (L,))."""
        if prompt.text not in self.cache:
            if len(self.cache) > 256:
                self.cache.clear()
            tok = self.encoder.encode([prompt])
            t = {k: v.to(self.device) for k, v in tok.items() if torch.is_tensor(v)}
            with torch.no_grad():
                text = self.model.encode_text(t["input_ids"], t["attention_mask"], t["token_type_ids"],
                                              t["position_ids"], t["text_self_attention_mask"])
            self.cache[prompt.text] = (text, tok["positive_maps"][0], tok["input_ids"][0])
        return self.cache[prompt.text]


def _collate(items):
    images, padding = pad_images([it["image"] for it in items])
    return {"images": images, "padding_mask": padding, "orig_sizes": torch.stack([it["orig_size"] for it in items]),
            "captions": [it["caption"] for it in items], "sources": [it["source"] for it in items],
            "file_names": [it["file_name"] for it in items]}


def _detect_classes(model, texts: TextCache, chunked: ChunkedPrompts, post, batch, device, inf) -> List[dict]:
    per_chunk = []
    for prompt in chunked.prompts:
        text, pmap, _ = texts.get(prompt)
        with torch.no_grad():
            out = model.forward_with_text(batch["images"].to(device), text, batch["padding_mask"].to(device))
        per_chunk.append(post(out, batch["orig_sizes"].to(device), pmap.to(device)))
    return merge_chunk_results(per_chunk, chunked, post.num_select, inf.nms_threshold)


def _detect_captions(model, texts: TextCache, tokenizer, batch, device, inf) -> List[dict]:
    results = []
    for b, caption in enumerate(batch["captions"]):
        text, _, ids = texts.get(caption_prompt(caption))
        with torch.no_grad():
            out = model.forward_with_text(batch["images"][b : b + 1].to(device), text,
                                          batch["padding_mask"][b : b + 1].to(device))
        results += select_free_form(out, batch["orig_sizes"][b : b + 1].to(device), ids.to(device), tokenizer,
                                    inf.conf_threshold, inf.text_threshold)
    return results


def _safe_relative(name: str) -> str:
    """An output path under the results dir for an input image name (never escaping it)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return os.path.join(*parts) if parts else "image"


def run(cfg: DictConfig) -> Dict[str, float]:
    inf = cfg.inference
    if cfg.model.name == "mal":
        from groundlab.actions.mal_inference import run as run_mal

        return run_mal(cfg)
    if not inf.checkpoint:
        raise ConfigError("inference.checkpoint is required: a groundlab .pth, an HF Grounding DINO directory "
                          "or an IDEA-Research .pth.")
    device = torch.device("cuda" if torch.cuda.is_available() and inf.num_gpus > 0 else "cpu")
    built = build_gdino(cfg.model, inf.checkpoint)
    model = built.model.to(device).eval()
    tokenizer = load_tokenizer(built.config.text_encoder_type)
    encoder = PromptEncoder(tokenizer, built.config.max_text_len)
    sources, items, class_names = inference_inputs(cfg)
    chunked = chunk_class_prompts(class_names, encoder.name_len, built.config.max_text_len) if class_names else None
    dataset = InferenceDataset(sources, items, build_eval_transforms(cfg.dataset.augmentation))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.workers,
                                         collate_fn=_collate)
    out_dir = os.path.join(cfg.results_dir, "inference")
    post = GroundingPostProcessor(built.config.num_select, None)
    texts = TextCache(model, encoder, device)
    coco = CocoResultsWriter(os.path.join(out_dir, "results.json"), conf_threshold=inf.conf_threshold)
    images_json: List[dict] = []
    phrase_ids: Dict[str, int] = {}
    total = 0
    for batch in tqdm(loader, desc="inference", unit="batch"):
        if chunked is not None:
            results = _detect_classes(model, texts, chunked, post, batch, device, inf)
        else:
            results = _detect_captions(model, texts, tokenizer, batch, device, inf)
        for b, result in enumerate(results):
            result = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in result.items()}
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
            if len(sources) > 1:  # same names in two folders/archives must not overwrite each other's outputs
                rel = os.path.join(f"{source}_{_safe_relative(os.path.basename(sources[source].path.rstrip('/')))}", rel)
            write_kitti(os.path.join(out_dir, "labels", os.path.splitext(rel)[0] + ".txt"), result, names,
                        inf.conf_threshold)
            coco.add(image_id, result)
            picture = decode_rgb(sources[source].read(name), name)
            drawn = draw_detections(np.asarray(picture), result, names, dict(inf.color_map), inf.outline_width,
                                    inf.conf_threshold)
            target = os.path.join(out_dir, "images_annotated", os.path.splitext(rel)[0] + ".jpg")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            drawn.convert("RGB").save(target, quality=92)
            total += int((result["scores"] >= inf.conf_threshold).sum())
    coco.write()
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names if chunked is not None else list(phrase_ids))]
    with open(os.path.join(out_dir, "images.json"), "w") as f:
        json.dump({"images": images_json, "categories": categories}, f, indent=1)
    log.info("inference: %d images, %d detections >= %.2f, written to %s", len(images_json), total,
             inf.conf_threshold, out_dir)
    return {"images": float(len(images_json)), "detections": float(total)}
