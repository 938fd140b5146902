"""The Grounding DINO dataset: annotated sources (ODVG or COCO) -> image, targets and prompt.

Training samples get a prompt of their positive classes plus random negatives (seeded per sample and
epoch, so any worker produces the same sample); evaluation samples get all class names (or None when
they need several prompts: the evaluator chunks them). Grounding records bring their own caption.

Referring expressions (VG, records with `referring`): in training they are grounding records (the caption is
the expression, its regions' tokens_positive the positive tokens; an expression that refers to nothing gives
zero boxes under the whole expression as its one phrase). Evaluated from a data_type=VG source, the prompt is
the whole expression as one phrase, every referred box belongs to it, and the target carries the union of the
referred masks at the original image size (what VG metrics compare against).

An image that cannot be decoded is, in evaluation, a `BadImage` item (the collate and the action skip and
list it); in training it is counted (see `bad_images.BadImageBudget`) and the next index's record is used
instead, under the bad index's random seed, so the sample is the same in every run and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from groundlab.text.captions import (
    Prompt, class_prompt, expression_prompt, grounding_prompt, prompt_token_len, sample_detection_prompt,
)
from groundlab.errors import DataError
from groundlab.data.bad_images import BadImage, BadImageBudget
from groundlab.data.image_decode import ImageDecodeError, decode_rgb
from groundlab.data.image_source import ImageSource
from groundlab.ops.masks import decode_segmentation
from groundlab.data.record_index import RecordIndex
from groundlab.text.tokens import PromptEncoder
from groundlab.data.transforms import PER_BOX_KEYS


@dataclass
class AnnotatedSource:
    """One annotation file with its images.

    class_names[i] is class index i; category_ids[i] its COCO id (None for ODVG: the label map's order).
    data_type "VG": referring expressions, evaluated as such (see GroundingDataset)."""

    name: str
    records: RecordIndex
    images: ImageSource
    class_names: List[str]
    category_ids: Optional[List[int]] = None
    data_type: str = "OD"


class GroundingDataset(torch.utils.data.Dataset):
    """Concatenation of annotated sources.

    Each item: {"image": (3, H, W) float32 normalized, "target": {"boxes": (N, 4) normalized cxcywh,
    "labels": (N,) class index (-1 for grounding phrases), "phrase_ids": (N,) index into the prompt's
    phrases, "iscrowd": (N,), "masks": (N, H, W) bool when load_masks, "image_id", "orig_size" (h, w),
    "size" (h, w), "num_dropped", "num_clamped"}, "prompt": Prompt or None, "prompt_class_ids": class
    index per prompt phrase (-1 for grounding), "source": source index, "file_name", "where"}.
    Referring records add target["empty"] (bool: the expression refers to nothing; then N = 0). Evaluated
    from a data_type=VG source (train=False) the prompt is `expression_prompt(expression)` (one phrase, the
    whole text), phrase_ids are all 0, and the target adds "vg_union": (H0, W0) bool, the union of the
    referred objects' masks at the original size orig_size (all False when empty), which the transforms
    pass through untouched.
    Evaluation (train=False): a `BadImage` for an image that cannot be decoded. Training: another record in
    its place, until more than `max_bad_image_fraction` of the records' images failed in this process
    (DataError naming dataset.max_bad_image_fraction).
    """

    def __init__(
        self, sources: Sequence[AnnotatedSource], encoder: PromptEncoder, transforms, *, train: bool,
        max_labels: int = 80, seed: int = 0, load_masks: bool = False, max_bad_image_fraction: float = 0.01,
    ):
        self.sources = list(sources)
        self.encoder = encoder
        self.transforms = transforms
        self.train = train
        self.max_labels = max_labels
        self.seed = seed
        self.load_masks = load_masks
        self.epoch = 0
        self._ends = np.cumsum([len(s.records) for s in self.sources]).astype(np.int64)
        self.bad_images = BadImageBudget(max_bad_image_fraction, len(self))

    def set_epoch(self, epoch: int) -> None:
        """Different augmentation and negatives each epoch, reproducible for the same seed."""
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, index: int) -> tuple:
        """(source index, record) of a dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[s - 1]) if s else 0
        return s, self.sources[s].records[index - start]

    def load_image(self, s: int, rec: Dict[str, Any]) -> np.ndarray:
        """(H, W, 3) uint8 RGB of a record; read as stored (EXIF orientation not applied) when the record's
        height/width are the stored size, since its boxes were drawn on those pixels."""
        size = (rec["height"], rec["width"]) if rec.get("height") and rec.get("width") else None
        return decode_rgb(self.sources[s].images.read(rec["file_name"]), rec["file_name"], annotated_size=size)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not self.train:
            s, rec = self.locate(index)
            try:
                return self._sample(s, rec, index)
            except ImageDecodeError as e:
                return BadImage(rec["file_name"], self.sources[s].images.path, str(e), int(rec["image_id"]), index)
        n = len(self)
        for step in range(n):  # the next decodable record, under this index's seed
            s, rec = self.locate((index + step) % n)
            key = (s, rec["file_name"])
            if key in self.bad_images:
                continue
            try:
                return self._sample(s, rec, index)
            except ImageDecodeError as e:
                self.bad_images.record(key, BadImage(rec["file_name"], self.sources[s].images.path, str(e),
                                                     int(rec["image_id"]), index))
        raise DataError(f"none of the {n} training images could be decoded")

    def _sample(self, s: int, rec: Dict[str, Any], index: int) -> Dict[str, Any]:
        """The sample of record `rec` of source `s`, its randomness seeded by (seed, epoch, index)."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = self.load_image(s, rec)
        H, W = image.shape[:2]
        target = self._target(rec, H, W)
        if rec.get("referring"):
            target["empty"] = bool(rec["empty"])
            if self._vg_eval(s):
                target["vg_union"] = referred_union(rec, H, W)
        prompt, class_ids = self._prompt(s, rec, target, rng)
        img = torch.from_numpy(image).permute(2, 0, 1).float()
        img, target = self.transforms(img, target, rng)
        return {"image": img, "target": target, "prompt": prompt, "prompt_class_ids": class_ids,
                "source": s, "file_name": rec["file_name"], "where": rec["where"]}

    def _target(self, rec: Dict[str, Any], H: int, W: int) -> Dict[str, Any]:
        boxes = torch.tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4)
        clamped = torch.stack([boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                               boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)], 1)
        num_clamped = int((clamped != boxes).any(1).sum())
        labels = torch.tensor(rec["labels"], dtype=torch.long)
        grounding = rec["kind"] == "grounding"
        target: Dict[str, Any] = {
            "boxes": clamped,
            "labels": torch.full_like(labels, -1) if grounding else labels,
            "phrase_ids": labels.clone(),
            "iscrowd": torch.tensor(rec.get("iscrowd") or [0] * len(labels), dtype=torch.long),
            "image_id": int(rec["image_id"]),
            "orig_size": torch.tensor([H, W]),
            "num_clamped": num_clamped,
            "num_dropped": 0,
        }
        if self.load_masks:
            if rec["masks"] is None and len(labels):
                raise DataError("masks were requested but this record has none", rec["where"])
            masks = [decode_segmentation(m, H, W, rec["where"]) for m in (rec["masks"] or [])]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, H, W, dtype=torch.bool)
        keep = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
        if self.train:
            keep &= target["iscrowd"] == 0  # crowd regions are not objects to match
        if not bool(keep.all()):
            target = {k: (v[keep] if k in PER_BOX_KEYS else v) for k, v in target.items()}
            target["num_dropped"] = int((~keep).sum())
        return target

    def _vg_eval(self, s: int) -> bool:
        """Source `s` is evaluated as referring expressions (a data_type=VG source outside training)."""
        return not self.train and self.sources[s].data_type == "VG"

    def _prompt(self, s: int, rec: Dict[str, Any], target: Dict[str, Any], rng: np.random.Generator):
        """(Prompt or None, class index per phrase); rewrites target["phrase_ids"] for sampled prompts and
        for referring expressions evaluated as a whole."""
        if rec["kind"] == "grounding":
            if rec.get("referring") and (self._vg_eval(s) or not rec["phrases"]):
                # every referred box belongs to the one phrase: the expression as a whole
                target["phrase_ids"] = torch.zeros_like(target["phrase_ids"])
                return expression_prompt(rec["caption"], rec["where"]), [-1]
            prompt = grounding_prompt(rec["caption"], rec["phrases"], rec["spans"], rec["where"])
            return prompt, [-1] * len(prompt.phrases)
        names = self.sources[s].class_names
        max_len = self.encoder.max_text_len
        if not self.train:
            if prompt_token_len(names, self.encoder.name_len) > max_len:
                return None, list(range(len(names)))
            return class_prompt(names), list(range(len(names)))
        prompt, class_ids = sample_detection_prompt(
            target["labels"].tolist(), names, self.max_labels, rng, self.encoder.name_len, max_len, rec["where"]
        )
        position = {c: k for k, c in enumerate(class_ids)}
        target["phrase_ids"] = torch.tensor([position[int(c)] for c in target["labels"]], dtype=torch.long)
        return prompt, class_ids


def referred_union(rec: Dict[str, Any], H: int, W: int) -> torch.Tensor:
    """(H, W) bool union of a referring record's region masks at the image's size (all False for an expression
    that refers to nothing); a referred region without a mask is a DataError naming the record."""
    if rec["masks"] is None and rec["boxes"]:
        raise DataError("VG evaluation needs a mask on every region of a referring expression (the metrics compare "
                        "the union of the referred masks)", rec["where"])
    union = np.zeros((H, W), dtype=bool)
    for m in rec["masks"] or []:
        union |= decode_segmentation(m, H, W, rec["where"])
    return torch.from_numpy(union)


def sample_prompt_text(prompt: Optional[Prompt]) -> str:
    """The caption of a prompt, or a marker when the classes need several prompts."""
    return prompt.text if prompt is not None else "<several prompts>"
