"""Instance masks drawn over an image: each mask tinted in its class colour at half opacity, its box outlined
and named with deploy.writers.draw_detections. MAL's annotated images (overlay_masks: every box drawn, no
score) and Mask Grounding DINO's inference images (draw_masked_detections: scored detections, the colour map
and the confidence threshold of draw_detections) share the tint."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from groundlab.deploy.writers import (PALETTE, box_colour, class_name, detection_arrays, draw_detections,
                                      result_masks)


def tint_masks(image: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[str],
               alpha: float = 0.5) -> np.ndarray:
    """image (H, W, 3) uint8 with masks[k] ((H, W) bool) blended towards colours[k] (a PIL colour string) at
    `alpha`, in order (a later mask covers an earlier one where they overlap); pixels outside every mask keep
    their exact values. Returns a new (H, W, 3) uint8 array."""
    out = image.astype(np.float32)  # a copy
    for mask, colour in zip(masks, colours):
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask is {mask.shape} but the image is {image.shape[:2]}: masks must be at the "
                             f"image's size")
        rgb = np.array(ImageColor.getrgb(colour)[:3], dtype=np.float32)
        out[mask] = out[mask] * (1 - alpha) + rgb * alpha
    return np.clip(out, 0, 255).astype(np.uint8)  # truncates, as MAL's images always did


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], labels: Sequence[int], boxes: Sequence[Sequence[float]],
                  names: Sequence[str], alpha: float = 0.5) -> Image.Image:
    """image (H, W, 3) uint8; masks: (H, W) bool each; labels: class indices; boxes: [x1, y1, x2, y2]."""
    tinted = tint_masks(image, masks, [PALETTE[int(label) % len(PALETTE)] for label in labels], alpha)
    result = {"scores": np.ones(len(labels), dtype=np.float32), "labels": np.asarray(labels, dtype=np.int64),
              "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4)}
    return draw_detections(tinted, result, names)


def draw_masked_detections(
    image: np.ndarray,
    result: Mapping[str, object],
    names: Sequence[str],
    color_map: Optional[Mapping[str, str]] = None,
    outline_width: int = 2,
    conf_threshold: float = 0.0,
    alpha: float = 0.5,
) -> Image.Image:
    """draw_detections over a copy of image (H, W, 3) uint8 whose pixels inside result["masks"] ((K, H, W) bool,
    at the image's size) are tinted in each detection's box colour (writers.box_colour). Only detections with
    score >= conf_threshold are drawn, masks included; low scores are tinted first, so where masks overlap the
    most confident one shows."""
    masks = result_masks(result)
    if masks is None:
        raise ValueError("draw_masked_detections needs result['masks'] (K, H, W); draw_detections draws boxes only")
    scores, labels, _ = detection_arrays(result)
    order = [int(k) for k in np.argsort(scores, kind="stable") if scores[k] >= conf_threshold]
    colours = [box_colour(class_name(names, int(labels[k])), int(labels[k]), color_map) for k in order]
    tinted = tint_masks(image, [masks[k] for k in order], colours, alpha)
    return draw_detections(tinted, result, names, color_map, outline_width, conf_threshold)


def draw_expression_banner(picture: Image.Image, expression: str, no_target: bool) -> Image.Image:
    """A copy of `picture` with the referring expression on a bar along its top edge: dark for an expression the
    model found, red with "no target: " in front when it decided the expression refers to nothing, so an empty
    answer is visible rather than an image without marks."""
    out = picture.convert("RGB")
    draw = ImageDraw.Draw(out)
    text = f"no target: {expression}" if no_target else expression
    left, top, right, bottom = draw.textbbox((0, 0), text)
    fill = "#c0392b" if no_target else "#202020"
    draw.rectangle([0, 0, max(out.width, right - left + 6), bottom - top + 6], fill=fill)
    draw.text((3 - left, 3 - top), text, fill="white")
    return out
