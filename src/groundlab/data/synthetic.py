"""Deterministic synthetic dataset of coloured shapes for open-vocabulary detection and segmentation.

Each image shows 1..N objects such as "red circle" or "blue square" on a muted, textured background.
Classes are the (colour, shape) pairs, so a grounding model must read both words of the prompt. The dataset
is generated on first use into ``{cache_dir}/synthetic/{spec.digest()}`` and reused afterwards; every image
has its own RNG seeded by ``(seed, split, index)``, so output is byte-identical across runs and machines
running the same library versions. The same scenes also come with referring expressions (VG: "the largest
square", "shape left of the green triangle", no-target ones): see ``synthetic_referring``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from groundlab.data.synthetic_referring import infer_lines, referring_split

# Part of the digest: bump it whenever the generator's output changes so stale caches are not reused.
FORMAT_VERSION = 2  # 2: referring expressions (referring_*.jsonl)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "magenta": (215, 50, 200), "cyan": (40, 200, 215), "orange": (245, 140, 30), "purple": (120, 45, 170),
    "white": (245, 245, 245), "black": (15, 15, 15),
}

# Unit-circumradius outlines (x right, y down); every vertex lies inside the unit circle so an object of
# radius r centred at least r from each border stays inside the image under any rotation.
_STAR = [(np.cos(a) * rad, np.sin(a) * rad) for a, rad in
         zip(np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False), [1.0, 0.45] * 5)]
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
    "triangle": [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)],
    "diamond": [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)],
    "star": _STAR,
    "cross": [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3),
              (0.3, 0.9), (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)],
}
SHAPES: tuple[str, ...] = ("circle", "ellipse") + tuple(_POLYGONS)

_SPLITS = {"train": 0, "val": 1}
_MARKER = "spec.json"
_PLACEMENT_TRIES = 12
_MIN_VISIBLE = 0.5  # an earlier object must keep at least this fraction of its area visible


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the dataset; two equal specs produce byte-identical files."""

    seed: int = 0
    image_size: tuple[int, int] = (128, 128)  # (height, width)
    num_train: int = 256
    num_val: int = 64
    min_objects: int = 1
    max_objects: int = 4
    colors: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    min_size_frac: float = 0.15  # object diameter as a fraction of the shorter image side
    max_size_frac: float = 0.45
    archive: bool = False  # True: each split's images go into one .tar.gz instead of a folder
    jpeg_quality: int = 92

    def __post_init__(self) -> None:
        # Configs (Hydra/OmegaConf, json) hand over lists; store tuples so the spec stays hashable.
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "colors", tuple(str(c) for c in self.colors))
        object.__setattr__(self, "shapes", tuple(str(s) for s in self.shapes))
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticSpec.{message}")

        check(self.seed >= 0, f"seed must be a non-negative integer, got {self.seed}.")
        check(len(self.image_size) == 2 and min(self.image_size) > 0,
              f"image_size must be two positive integers (height, width), got {self.image_size}.")
        for name in ("num_train", "num_val", "min_objects", "max_objects"):
            check(getattr(self, name) >= 1, f"{name} must be a positive integer, got {getattr(self, name)}.")
        check(self.min_objects <= self.max_objects,
              f"min_objects ({self.min_objects}) must not exceed max_objects ({self.max_objects}).")
        for field, names, known in (("colors", self.colors, COLORS), ("shapes", self.shapes, SHAPES)):
            check(len(names) > 0, f"{field} must name at least one entry.")
            check(len(set(names)) == len(names), f"{field} must not repeat names, got {names}.")
            for n in names:
                check(n in known, f"{field} has unknown name {n!r}; known: {', '.join(known)}.")
        check(0.0 < self.min_size_frac <= self.max_size_frac <= 1.0,
              f"min_size_frac/max_size_frac must satisfy 0 < min <= max <= 1, "
              f"got {self.min_size_frac}/{self.max_size_frac}.")
        check(self.min_size_frac * min(self.image_size) >= 4,
              f"min_size_frac ({self.min_size_frac}) gives objects under 4 px for image_size {self.image_size}.")
        check(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in 1..100, got {self.jpeg_quality}.")

    @property
    def class_names(self) -> list[str]:
        """``f"{color} {shape}"`` in colour-major order; the list index is the class label."""
        return [f"{c} {s}" for c in self.colors for s in self.shapes]

    def digest(self) -> str:
        """12 hex chars of sha1 over the canonical json of the fields (and the generator version)."""
        payload = json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)},
                             sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class SyntheticPaths:
    """Absolute paths of one generated dataset."""

    root: str
    train_images: str  # folder, or the .tar.gz path when spec.archive
    val_images: str  # folder or .tar.gz
    train_odvg: str  # ODVG detection jsonl (with masks)
    train_grounding: str  # ODVG grounding jsonl (phrase records)
    label_map: str  # json {"0": "red circle", ...}
    val_coco: str  # COCO json with RLE segmentation
    train_coco_boxes: str  # COCO json of the train split, boxes only (MAL's training input)
    train_coco: str  # COCO json of the train split with RLE segmentation (ground truth for MAL)
    referring_train: str  # ODVG VG jsonl: referring expressions of the train images (regions with RLE masks)
    referring_val: str  # ODVG VG jsonl of the val images
    referring_infer: str  # inference jsonl {"image_path", "expression"}: referring_val's expressions, val images


def _interp_matrix(n: int, g: int) -> np.ndarray:
    """(n, g) bilinear weights that upsample g coarse samples onto n pixels."""
    t = np.linspace(0.0, g - 1, n)
    return np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(g)[None, :]))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float image: smooth grey field + faint tint + stripes + soft blobs + pixel noise."""
    g = int(rng.integers(3, 7))
    ry, rx = _interp_matrix(h, g), _interp_matrix(w, g)
    lum = rng.uniform(100, 155) + ry @ rng.normal(0, 22, (g, g)) @ rx.T
    tint = (ry @ rng.normal(0, 6, (3, g, g)) @ rx.T).transpose(1, 2, 0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    theta, period = rng.uniform(0, np.pi), rng.uniform(5, 18)
    lum += rng.uniform(0, 10) * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period
                                       + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.integers(2, 6))):
        bx, by, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * min(h, w)
        lum += rng.uniform(-25, 25) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * s * s))
    img = lum[..., None] + tint + rng.normal(0, 5, (h, w, 3))
    # Clipping keeps the background well away from black/white and saturated object colours.
    return np.clip(img, 60, 195)


def _inside_polygon(u: np.ndarray, v: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule, vectorised over pixels (loops only over the handful of edges)."""
    inside = np.zeros(u.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        if y1 != y0:  # horizontal edges never cross a horizontal ray
            crosses = (y0 > v) != (y1 > v)
            inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
        x0, y0 = x1, y1
    return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Mask of a unit-circumradius shape in its own rotated frame (u, v)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ellipse":
        return u * u + (v / aspect) ** 2 <= 1.0
    return _inside_polygon(u, v, _POLYGONS[shape])


def render_scene(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Draw one scene.

    Returns the (H, W, 3) uint8 image and one dict per visible object, in drawing order (later objects
    occlude earlier ones): ``label`` (int class index), ``category`` (str), ``mask`` ((H, W) bool, the
    object's visible pixels; masks of one image are disjoint) and ``bbox`` ([x1, y1, x2, y2] float
    pixels, tight around the mask, x2/y2 exclusive).
    """
    h, w = spec.image_size
    names = spec.class_names
    img = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int64)  # index of the object that owns each pixel
    labels: list[int] = []
    full_areas: list[int] = []
    visible = np.zeros(0, dtype=np.int64)  # visible pixel count per placed object
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        label = int(rng.integers(len(names)))
        shape = spec.shapes[label % len(spec.shapes)]
        for _attempt in range(_PLACEMENT_TRIES):
            r = rng.uniform(spec.min_size_frac, spec.max_size_frac) * min(h, w) / 2
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            angle = rng.uniform(0, np.pi) if shape == "ellipse" else rng.uniform(-0.35, 0.35)
            aspect = rng.uniform(0.5, 0.75)
            # Shapes fit in their circumcircle, so only the window around it needs evaluating.
            win = (slice(int(cy - r), min(h, int(np.ceil(cy + r)))),
                   slice(int(cx - r), min(w, int(np.ceil(cx + r)))))
            ys, xs = np.mgrid[win].astype(np.float64) + 0.5  # pixel centres
            ca, sa = np.cos(angle), np.sin(angle)
            u = ((xs - cx) * ca + (ys - cy) * sa) / r
            v = (-(xs - cx) * sa + (ys - cy) * ca) / r
            local = _shape_mask(shape, u, v, aspect)
            if not local.any():
                continue
            covered = owner[win][local]
            lost = np.bincount(covered[covered >= 0], minlength=len(labels))
            if np.all(visible - lost >= _MIN_VISIBLE * np.asarray(full_areas, dtype=np.float64)):
                break
        else:
            continue  # no acceptable placement: skip rather than bury an earlier object
        base = np.asarray(COLORS[spec.colors[label // len(spec.shapes)]])
        colour = np.clip(base + rng.integers(-20, 21, 3), 0, 255)
        # A gentle brightness gradient across the object plus pixel noise, so colour is never a flat constant.
        shading = 1.0 + rng.uniform(-0.12, 0.12) * u[local]
        img[win][local] = colour * shading[:, None] + rng.normal(0, 6, (int(local.sum()), 3))
        visible = np.append(visible - lost, int(local.sum()))
        owner[win][local] = len(labels)
        labels.append(label)
        full_areas.append(int(local.sum()))

    objects = []
    for k, label in enumerate(labels):
        visible = owner == k
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        bbox = [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
        objects.append({"label": label, "category": names[label], "mask": visible, "bbox": bbox})
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _encode_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}


def _caption(categories: list[str]) -> tuple[str, dict[str, list[int]]]:
    """'a red circle, a blue square and an orange star.' plus each phrase's [start, end) span."""
    unique = list(dict.fromkeys(categories))
    caption, spans = "", {}
    for i, phrase in enumerate(unique):
        if i > 0:
            caption += " and " if i == len(unique) - 1 else ", "
        caption += "an " if phrase[0] in "aeiou" else "a "
        spans[phrase] = [len(caption), len(caption) + len(phrase)]
        caption += phrase
    return caption + ".", spans


class _ImageSink:
    """Context manager writing encoded images into a folder, or streaming them into a reproducible .tar.gz."""

    def __init__(self, path: str, archive: bool) -> None:
        self._path, self._tar, self._open = path, None, []
        if archive:
            f = open(path, "wb")
            # mtime=0 in the gzip header and on every member keeps the archive byte-identical across runs.
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0)
            self._tar = tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT)
            self._open = [self._tar, gz, f]
        else:
            os.makedirs(path)

    def add(self, name: str, data: bytes) -> None:
        if self._tar is None:
            with open(os.path.join(self._path, name), "wb") as f:
                f.write(data)
        else:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))

    def __enter__(self) -> "_ImageSink":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._open:
            handle.close()


def _coco(rows: list[tuple[str, list[dict]]], names: list[str], h: int, w: int, masks: bool) -> dict:
    images, annotations = [], []
    for image_id, (file_name, objects) in enumerate(rows, start=1):
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for obj in objects:
            x1, y1, x2, y2 = obj["bbox"]
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["label"] + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": obj["area"] if masks else (x2 - x1) * (y2 - y1),
                   "iscrowd": 0}
            if masks:
                ann["segmentation"] = obj["rle"]
            annotations.append(ann)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    return {"info": {"description": "groundlab synthetic shapes"}, "licenses": [],
            "images": images, "categories": categories, "annotations": annotations}


def _paths(spec: SyntheticSpec, root: str) -> SyntheticPaths:
    j = lambda name: os.path.join(root, name)  # noqa: E731
    images = {s: j(f"{s}_images.tar.gz") if spec.archive else j(os.path.join("images", s)) for s in _SPLITS}
    return SyntheticPaths(root=root, train_images=images["train"], val_images=images["val"],
                          train_odvg=j("train_odvg.jsonl"), train_grounding=j("train_grounding.jsonl"),
                          label_map=j("label_map.json"), val_coco=j("val_coco.json"),
                          train_coco_boxes=j("train_coco_boxes.json"), train_coco=j("train_coco.json"),
                          referring_train=j("referring_train.jsonl"), referring_val=j("referring_val.jsonl"),
                          referring_infer=j("referring_infer.jsonl"))


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _write_jsonl(path: str, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def _generate(spec: SyntheticSpec, root: str) -> None:
    paths = _paths(spec, root)
    names, (h, w) = spec.class_names, spec.image_size
    if not spec.archive:
        os.makedirs(os.path.join(root, "images"))
    rows: dict[str, list[tuple[str, list[dict]]]] = {}
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        rows[split] = []
        with _ImageSink(getattr(paths, f"{split}_images"), spec.archive) as sink:
            for index in range(count):
                image, objects = render_scene(spec, np.random.default_rng([spec.seed, _SPLITS[split], index]))
                buf = io.BytesIO()
                # 4:4:4 chroma: small objects would otherwise bleed colour into the background at their edges.
                Image.fromarray(image).save(buf, format="JPEG", quality=spec.jpeg_quality, subsampling=0)
                file_name = f"{split}_{index:06d}.jpg"
                sink.add(file_name, buf.getvalue())
                for obj in objects:  # keep RLE, not the dense masks, to bound memory
                    obj["rle"], obj["area"] = _encode_rle(obj["mask"]), float(obj.pop("mask").sum())
                rows[split].append((file_name, objects))

    with open(paths.train_odvg, "w", encoding="utf-8") as det, \
            open(paths.train_grounding, "w", encoding="utf-8") as grd:
        for file_name, objects in rows["train"]:
            instances = [{"bbox": o["bbox"], "label": o["label"], "category": o["category"], "mask": o["rle"]}
                         for o in objects]
            det.write(json.dumps({"file_name": file_name, "height": h, "width": w,
                                  "detection": {"instances": instances}}) + "\n")
            caption, spans = _caption([o["category"] for o in objects])
            regions = [{"bbox": o["bbox"], "phrase": o["category"], "tokens_positive": [spans[o["category"]]]}
                       for o in objects]
            grd.write(json.dumps({"file_name": file_name, "height": h, "width": w,
                                  "grounding": {"caption": caption, "regions": regions}}) + "\n")
    _write_json(paths.label_map, {str(i): n for i, n in enumerate(names)})
    _write_json(paths.val_coco, _coco(rows["val"], names, h, w, masks=True))
    _write_json(paths.train_coco, _coco(rows["train"], names, h, w, masks=True))
    _write_json(paths.train_coco_boxes, _coco(rows["train"], names, h, w, masks=False))
    for split in _SPLITS:
        lines = referring_split(rows[split], split, _SPLITS[split], spec.seed, spec.colors, spec.shapes, (h, w))
        _write_jsonl(getattr(paths, f"referring_{split}"), lines)
        if split == "val":
            _write_jsonl(paths.referring_infer, infer_lines(lines))
    # Written last: its presence is what marks the dataset complete.
    _write_json(os.path.join(root, _MARKER), {**dataclasses.asdict(spec), "class_names": names})


def ensure_synthetic(spec: SyntheticSpec, cache_dir: str) -> SyntheticPaths:
    """Return the paths of the dataset for ``spec``, generating it under ``cache_dir`` if needed.

    Generation happens in a temporary sibling directory that is renamed into place, so concurrent callers
    never see a half-written dataset; a caller that loses the rename race discards its copy.
    """
    parent = os.path.join(os.path.abspath(cache_dir), "synthetic")
    root = os.path.join(parent, spec.digest())
    paths = _paths(spec, root)
    if os.path.isfile(os.path.join(root, _MARKER)):
        return paths
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{spec.digest()}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
        _generate(spec, tmp)
        try:
            os.replace(tmp, root)
        except OSError:
            if os.path.isfile(os.path.join(root, _MARKER)):
                return paths  # another process finished first; use theirs
            # Only complete datasets are ever renamed into place, so a marker-less root is debris: replace it.
            trash = tempfile.mkdtemp(prefix=f".{spec.digest()}.", suffix=".trash", dir=parent)
            os.replace(root, os.path.join(trash, "old"))
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
