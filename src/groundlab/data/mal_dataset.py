"""MAL crop dataset: one sample per box (see mal_instances), as the two views MAL trains on.

Sample keys (tensors): student (3, S, S) normalised (strongly augmented in training), teacher (3, S, S)
normalised clean view, box_mask (1, S, S) 0/1, area () box area in original pixels, label () class
index, index () instance index, ext (4,) int crop box [x1, y1, x2, y2] in image pixels (may leave the
image), box (4,) float, size (2,) image (height, width). With ground truth (evaluation): gt_crop (h', w')
uint8, the true mask inside the crop box clipped to the image, and gt_area () its full-image area.

A box whose image cannot be decoded is, in evaluation, a `BadImage` item (index: the box's instance index;
collate_crops lists it under "skipped" and the actions skip the box); in training the image is counted (see
`bad_images.BadImageBudget`, the fraction taken over the distinct images of the boxes) and the next box of
another image is cropped instead, under the bad box's random seed, so the sample is the same after a resume."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from groundlab.data.bad_images import BadImage, BadImageBudget, split_bad
from groundlab.data.image_decode import ImageDecodeError, decode_rgb
from groundlab.data.image_source import ImageSource
from groundlab.data.mal_augment import StudentAugment
from groundlab.data.mal_crops import box_mask_in_crop, crop_resized, expand_box, random_margins, eval_margins
from groundlab.data.mal_instances import MALInstances
from groundlab.errors import DataError
from groundlab.ops.masks import decode_segmentation

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # MAE was pretrained with these
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(crop: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float normalised."""
    x = torch.from_numpy(np.array(crop, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


class MALCropDataset(Dataset):
    """train=True: random margins, student augmentation, horizontal flips (both views), seeded by
    (seed, epoch, index) so a resumed epoch replays. train=False: fixed test margins, clean views.
    max_bad_image_fraction (training): the share of the boxes' images that may fail to decode in this process
    before a DataError stops the run."""

    def __init__(self, instances: MALInstances, source: ImageSource, crop_size: int, train: bool,
                 margin_rate: Sequence[float], test_margin_rate: Sequence[float], seed: int = 0,
                 with_gt: bool = False, max_bad_image_fraction: float = 0.01):
        self.data, self.source, self.size, self.train = instances, source, int(crop_size), train
        self.margin_rate, self.test_margin_rate = list(margin_rate), list(test_margin_rate)
        self.seed, self.epoch, self.with_gt = seed, 0, with_gt
        self.augment = StudentAugment()
        # (file_name, image or the ImageDecodeError): boxes of one image come in a row when evaluating
        self._cached: Optional[tuple] = None
        num_images = len({self.data.instances[i]["file_name"] for i in range(len(self.data.instances))}) if train else 0
        self.bad_images = BadImageBudget(max_bad_image_fraction, num_images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data.instances)

    def image(self, name: str, height: int, width: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of image `name`, annotated at (height, width): read as stored (EXIF
        orientation not applied) when that is its stored size, since the boxes were drawn on those pixels."""
        if self._cached is None or self._cached[0] != name:
            try:
                self._cached = (name, decode_rgb(self.source.read(name), name, annotated_size=(height, width)))
            except ImageDecodeError as e:
                self._cached = (name, e)  # the image's other boxes fail at once, without reading it again
        if isinstance(self._cached[1], ImageDecodeError):
            raise ImageDecodeError(str(self._cached[1]), name)
        return self._cached[1]

    def _bad(self, rec: Dict[str, Any], error: ImageDecodeError, i: int) -> BadImage:
        return BadImage(rec["file_name"], self.source.path, str(error), rec["image_id"], i)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not self.train:
            try:
                return self._sample(i, i)
            except ImageDecodeError as e:
                return self._bad(self.data.instances[i], e, i)
        n = len(self)
        for step in range(n):  # the next box of a decodable image, under this index's seed
            j = (i + step) % n
            rec = self.data.instances[j]
            if rec["file_name"] in self.bad_images:
                continue
            try:
                return self._sample(j, i)
            except ImageDecodeError as e:
                self.bad_images.record(rec["file_name"], self._bad(rec, e, i))
        raise DataError(f"{self.data.json_file}: none of the training images could be decoded")

    def _sample(self, j: int, i: int) -> Dict[str, Any]:
        """The crops of box `j`, seeded by (seed, epoch, i)."""
        rec = self.data.instances[j]
        image = self.image(rec["file_name"], rec["height"], rec["width"])
        h, w = image.shape[:2]
        if (h, w) != (rec["height"], rec["width"]):
            raise ValueError(f"{self.data.json_file}: image {rec['file_name']!r} is {w}x{h}, the json says "
                             f"{rec['width']}x{rec['height']}")
        rng = np.random.default_rng([self.seed, self.epoch, i])
        margins = random_margins(rng, self.margin_rate) if self.train else eval_margins(self.test_margin_rate)
        ext = expand_box(rec["box"], margins)
        teacher = crop_resized(image, ext, self.size)
        box_mask = box_mask_in_crop(rec["box"], ext, self.size)
        student = self.augment(teacher, rng) if self.train else teacher
        if self.train and rng.random() < 0.5:
            teacher, student, box_mask = teacher[:, ::-1], student[:, ::-1], box_mask[:, ::-1]
        out = {"student": to_tensor(student), "teacher": to_tensor(teacher),
               "box_mask": torch.from_numpy(np.ascontiguousarray(box_mask))[None],
               "area": torch.tensor(rec["area"], dtype=torch.float32), "label": torch.tensor(rec["label"]),
               "index": torch.tensor(j), "ext": torch.tensor(ext, dtype=torch.int64),
               "box": torch.tensor(rec["box"], dtype=torch.float32), "size": torch.tensor([h, w])}
        if self.with_gt:
            where = f"{self.data.json_file}: annotation id {rec['ann_id']}"
            gt = decode_segmentation(rec["segmentation"], h, w, where)
            x1, y1, x2, y2 = ext
            out["gt_crop"] = torch.from_numpy(gt[max(y1, 0):min(y2, h), max(x1, 0):min(x2, w)].astype(np.uint8))
            out["gt_area"] = torch.tensor(float(gt.sum()))
        return out


def collate_crops(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack every fixed-size field; gt_crop (one size per box) stays a list. `BadImage` items (boxes of an
    undecodable image) are left out and listed under "skipped"; with no other item the batch is only that."""
    samples, bad = split_bad(samples)
    out: Dict[str, Any] = {"skipped": bad}
    if not samples:
        return out
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = values if key == "gt_crop" else torch.stack(values)
    return out
