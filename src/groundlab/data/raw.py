"""Unannotated inputs for inference: `raw` (image folders or archives + one class list, given as a list or as
a classmap text file) and `coco_raw` (jsonl lines {"image_path": ..., "caption": ...}, each image with its own
caption). With data_type=VG (referring expressions, TAO's mask_grounding_dino) the same jsonl holds
{"image_path": ..., "expression": ...} lines, one expression per line (an image may appear on several lines),
each prompted as one phrase: `item_prompt`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from groundlab.text.captions import Prompt, Span, expression_prompt, terminated
from groundlab.errors import DataError, MissingFile
from groundlab.data.bad_images import BadImage
from groundlab.data.image_decode import ImageDecodeError, decode_rgb
from groundlab.data.image_source import ImageSource
from groundlab.data.json_files import iter_jsonl
from groundlab.data.read_stats import ReadStats
from groundlab.data.sources import open_images


@dataclass(frozen=True)
class InferItem:
    source: int  # index into the image sources
    name: str  # image name inside that source
    caption: Optional[str] = None  # coco_raw: the image's own caption (VG: its referring expression)
    referring: bool = False  # VG: `caption` is one referring expression, prompted as a whole


def caption_prompt(caption: str) -> Prompt:
    """A free-form caption as a prompt: each '.'-separated part is a phrase with its exact span
    (found by scanning, so repeated words keep their own places)."""
    phrases: List[str] = []
    spans: List[Tuple[Span, ...]] = []
    start = 0
    for end in [i for i, ch in enumerate(caption) if ch == "."] + [len(caption)]:
        part = caption[start:end]
        stripped = part.strip()
        if stripped:
            s = start + (len(part) - len(part.lstrip()))
            phrases.append(stripped)
            spans.append(((s, s + len(stripped)),))
        start = end + 1
    if not phrases:
        raise DataError(f"caption {caption!r} has no words")
    return Prompt(terminated(caption), tuple(phrases), tuple(spans))


def item_prompt(caption: str, referring: bool = False, where: Optional[str] = None) -> Prompt:
    """The prompt of an inference item: a referring expression as one phrase (VG), else `caption_prompt`."""
    return expression_prompt(caption, where) if referring else caption_prompt(caption)


def open_sources(image_dirs: Sequence[str], cache_dir: Optional[str]) -> List[ImageSource]:
    if not image_dirs:
        raise DataError("dataset.infer_data_sources.image_dir is empty: give folders or .tar/.tar.gz archives")
    return [open_images(path, f"dataset.infer_data_sources.image_dir[{i}]", cache_dir)
            for i, path in enumerate(image_dirs)]


def read_classmap(path: str, key: str = "dataset.infer_data_sources.classmap") -> List[str]:
    """Class names of a classmap text file (TAO's mask_grounding_dino `classmap`, e.g. label_map.txt): one name
    per line, in file order (class index = position), surrounding whitespace stripped, blank lines skipped.
    `key` is the config key that named the file; a missing, unreadable or empty file is one sentence naming it."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise MissingFile(f"{key}={path} is not a file (a text file with one class name per line).")
    try:
        with open(full, encoding="utf-8") as f:
            names = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{key}={path} cannot be read as UTF-8 text ({err}).") from None
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{key}={path} holds no class names (one per line; blank lines are skipped).")
    return names


def list_raw(sources: Sequence[ImageSource]) -> List[InferItem]:
    """Every image of every source, in source then name order."""
    return [InferItem(s, name) for s, src in enumerate(sources) for name in src.names()]


def read_coco_raw(json_file: str, sources: Sequence[ImageSource], skip_missing: bool = False,
                  data_type: str = "OD") -> List[InferItem]:
    """Items of a coco_raw jsonl; an image_path is looked up in each source in turn. data_type="VG": each line's
    text is its "expression" (or "caption"), and the items are `referring`."""
    stats = ReadStats(json_file)
    referring = data_type == "VG"
    key, what = ("expression", "expression file") if referring else ("caption", "caption file")
    items: List[InferItem] = []
    for _, where, obj in iter_jsonl(json_file, what):
        path = obj.get("image_path")
        text = obj.get("expression", obj.get("caption")) if referring else obj.get("caption")
        if not isinstance(path, str) or not isinstance(text, str) or not text.strip():
            raise DataError(f"each line needs 'image_path' and a non-empty '{key}'", where)
        s = next((k for k, src in enumerate(sources) if src.exists(path)), None)
        if s is None:
            if not skip_missing:
                raise DataError(f"image {path!r} is in none of {[src.path for src in sources]}", where)
            stats.add("missing images skipped", where)
            continue
        items.append(InferItem(s, path, text, referring))
        stats.records += 1
    stats.log()
    return items


class InferenceDataset(torch.utils.data.Dataset):
    """Items: {"image": (3, H, W) normalized, "orig_size": (h, w), "size": (h, w), "caption": str or None,
    "referring": bool (VG: the caption is a referring expression, see `item_prompt`), "source": int,
    "file_name": str}; `transforms` as in groundlab.data.transforms (eval). An image that cannot be decoded
    gives a `BadImage` instead (the action skips and lists it)."""

    def __init__(self, sources: Sequence[ImageSource], items: Sequence[InferItem], transforms):
        self.sources, self.items, self.transforms = list(sources), list(items), transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.items[index]
        source = self.sources[item.source]
        try:
            image = decode_rgb(source.read(item.name), item.name)
        except ImageDecodeError as e:
            return BadImage(item.name, source.path, str(e), index=index)
        h, w = image.shape[:2]
        target = {"boxes": torch.zeros(0, 4)}
        img, target = self.transforms(torch.from_numpy(image).permute(2, 0, 1).float(), target,
                                      np.random.default_rng(index))
        return {"image": img, "orig_size": torch.tensor([h, w]), "size": target["size"],
                "caption": item.caption, "referring": item.referring, "source": item.source, "file_name": item.name}
