"""action=visualize: draw ground truth as the data pipeline delivers it (boxes, masks, phrases and the
prompt), so a user can check a dataset, a label map or an augmentation setting before training."""

from __future__ import annotations

import logging
import os
from typing import Dict

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from groundlab.data.bad_images import BadImage, log_skipped
from groundlab.data.build import build_grounding_dataset
from groundlab.ops.boxes import box_cxcywh_to_xyxy
from groundlab.data.grounding_dataset import sample_prompt_text

log = logging.getLogger(__name__)

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def to_pixels(image, target, mean, std) -> tuple:
    """Undo Normalize: (H, W, 3) uint8 image and (N, 4) xyxy pixel boxes."""
    h, w = image.shape[-2:]
    img = image.numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    img = (img.clip(0, 1) * 255).round().astype(np.uint8)
    xyxy = box_cxcywh_to_xyxy(target["boxes"]).numpy() * np.array([w, h, w, h])
    return img, xyxy


def draw_sample(img: np.ndarray, boxes: np.ndarray, names, masks=None, caption: str = "", width: int = 2) -> Image.Image:
    """Boxes and mask outlines with their phrase; the prompt in a strip under the image.

    Masks are outlined, not filled: a tint would change the colour that the phrase names."""
    canvas = img.astype(np.float32)
    if masks is not None:
        for k, m in enumerate(masks):
            inner = m.copy()
            inner[1:] &= m[:-1]
            inner[:-1] &= m[1:]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            canvas[m & ~inner] = PALETTE[k % len(PALETTE)]
    strip = 14 * (1 + len(caption) * 6 // max(img.shape[1], 1))
    out = Image.new("RGB", (img.shape[1], img.shape[0] + strip), (255, 255, 255))
    out.paste(Image.fromarray(canvas.clip(0, 255).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(out)
    for k, (box, name) in enumerate(zip(boxes, names)):
        colour = PALETTE[k % len(PALETTE)]
        draw.rectangle([float(v) for v in box], outline=colour, width=width)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), name, fill=colour)
    per_line = max(1, img.shape[1] // 6)
    for i in range(0, len(caption), per_line):
        draw.text((2, img.shape[0] + 1 + 14 * (i // per_line)), caption[i : i + per_line], fill=(0, 0, 0))
    return out


def run(cfg: DictConfig) -> Dict[str, float]:
    a = cfg.action
    dataset, _ = build_grounding_dataset(cfg, a.split, augment=a.augment)
    out_dir = os.path.join(cfg.results_dir, "visualize")
    os.makedirs(out_dir, exist_ok=True)
    aug = cfg.dataset.augmentation
    n = min(a.num_images, len(dataset))
    boxes_total = dropped = clamped = 0
    for i in range(n):
        item = dataset[i]
        if isinstance(item, BadImage):
            log_skipped(item)
            continue
        t = item["target"]
        img, xyxy = to_pixels(item["image"], t, aug.input_mean, aug.input_std)
        prompt = item["prompt"]
        if prompt is not None:
            names = [prompt.phrases[int(p)] for p in t["phrase_ids"]]
        else:
            names = [dataset.sources[item["source"]].class_names[int(c)] for c in t["labels"]]
        masks = t["masks"].numpy() if "masks" in t else None
        picture = draw_sample(img, xyxy, names, masks, sample_prompt_text(prompt), a.outline_width)
        picture.save(os.path.join(out_dir, f"{i:05d}_{os.path.basename(item['file_name'])}.png"))
        boxes_total += len(xyxy)
        dropped += t["num_dropped"]
        clamped += t["num_clamped"]
    log.info("wrote %d images with %d boxes to %s", n, boxes_total, out_dir)
    return {"images": float(n), "boxes": float(boxes_total), "boxes_dropped": float(dropped),
            "boxes_clamped": float(clamped)}
