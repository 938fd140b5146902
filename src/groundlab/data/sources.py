"""From the `dataset` config to annotated sources: the synthetic dataset is generated (once) and
its files filled in; each data source's annotation format follows its file (`.jsonl` ODVG, `.json` COCO).
Image folders and archives of every model open through `open_images`, so a `.tar.gz` is decompressed once
into the one archive cache (`image_source.archive_cache_root`), whichever model reads it. Any of a source's
files (image_dir, json_file, label_map) may be an s3:// / gs:// / https:// URI: it is fetched once into the cache
(`groundlab.io.remote_files`) and read as the local file it becomes."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from groundlab.data.coco import read_coco
from groundlab.errors import DataError
from groundlab.data.grounding_dataset import AnnotatedSource
from groundlab.data.image_source import ImageSource, ImageSourceError, open_image_source
from groundlab.data.odvg import read_odvg
from groundlab.data.synthetic import SyntheticPaths, SyntheticSpec, ensure_synthetic
from groundlab.io.remote_files import local_path


def synthetic_spec(cfg: DictConfig) -> SyntheticSpec:
    """SyntheticSpec from `dataset.synthetic` (ValueError names the field)."""
    fields = OmegaConf.to_container(cfg, resolve=True)
    fields["image_size"] = tuple(fields["image_size"])
    return SyntheticSpec(**fields)


def synthetic_paths(dataset: DictConfig, cache_dir: str) -> SyntheticPaths:
    """Generate (first use) or reuse the synthetic dataset of `dataset.synthetic`."""
    return ensure_synthetic(synthetic_spec(dataset.synthetic), os.path.expanduser(cache_dir))


def open_images(path: str, key: str, cache_dir: Optional[str]) -> ImageSource:
    """The image folder or `.tar`/`.tar.gz` archive at `path` (`~` expanded; an archive may be a remote URI,
    fetched into the cache as the archive it is), for any model and action.

    `cache_dir` is groundlab's cache (the config's `cache_dir`), never a sub-folder: archives are
    decompressed under `archive_cache_root(cache_dir)`. `key` is the config key that named `path`
    (e.g. "dataset.train_img_dir"); a bad path is a DataError naming it."""
    if not path:
        raise DataError(f"{key} is empty: give the image folder or .tar/.tar.gz")
    try:
        return open_image_source(os.path.expanduser(local_path(path, cache_dir, key)), cache_dir=cache_dir)
    except ImageSourceError as err:
        raise DataError(f"{key}: {err}") from None


def resolve_sources(dataset: DictConfig, cache_dir: str) -> Dict[str, Any]:
    """{"train": [source dicts], "val": source dict or None, "test": ..., "quant_calibration": ..., "infer": ...}.
    Annotated sources have keys image_dir, json_file, label_map, data_type ("OD" | "VG"); "infer" is
    dataset.infer_data_sources as a dict (image_dir a list, json_file, data_type, captions, classmap).
    For dataset.type=synthetic and synthetic_vg they point into the generated dataset: synthetic_vg trains on
    referring_train.jsonl and the scenes' detection records (train_odvg.jsonl), evaluates referring_val.jsonl and infers referring_infer.jsonl (val images), all VG."""
    container = OmegaConf.to_container(dataset, resolve=True)
    infer = container.get("infer_data_sources")
    if dataset.type == "synthetic":
        p = synthetic_paths(dataset, cache_dir)
        val = {"image_dir": p.val_images, "json_file": p.val_coco, "label_map": None, "data_type": "OD"}
        train = {"image_dir": p.train_images, "json_file": p.train_odvg, "label_map": p.label_map, "data_type": "OD"}
        return {"train": [train], "val": val, "test": val, "quant_calibration": train, "infer": infer}
    if dataset.type == "synthetic_vg":
        p = synthetic_paths(dataset, cache_dir)
        val = {"image_dir": p.val_images, "json_file": p.referring_val, "label_map": None, "data_type": "VG"}
        train = {"image_dir": p.train_images, "json_file": p.referring_train, "label_map": None, "data_type": "VG"}
        # and the same scenes' detection records: grounding models learn from detection and grounding data together,
        # and the class prompts give the detector (and the union head: everything a prompt names) far more positives
        detection = {"image_dir": p.train_images, "json_file": p.train_odvg, "label_map": p.label_map, "data_type": "OD"}
        if not infer.get("image_dir") and not infer.get("json_file"):  # the user's own images win
            infer = {"image_dir": [p.val_images], "json_file": p.referring_infer, "data_type": "VG", "captions": [],
                     "classmap": None}
        return {"train": [train, detection], "val": val, "test": val, "quant_calibration": train, "infer": infer}

    def given(source):
        return source if source and source.get("json_file") else None

    return {"train": list(container.get("train_data_sources") or []),
            "val": given(container.get("val_data_sources")), "test": given(container.get("test_data_sources")),
            "quant_calibration": given(container.get("quant_calibration_data_sources")), "infer": infer}


def load_source(source: Dict[str, Any], key: str, cache_dir: str, skip_missing: bool = False,
                use_masks: bool = True) -> AnnotatedSource:
    """Read one source's annotations, checking every image exists. `key` is the config key that named it
    (e.g. "dataset.train_data_sources[0]") so a bad path is reported where the user wrote it. Remote files
    are fetched here, when the split is read, not when the config names them."""
    json_file = local_path(source.get("json_file") or "", cache_dir, f"{key}.json_file")
    if not json_file or not os.path.isfile(json_file):
        raise DataError(f"{key}.json_file={json_file!r} is not a file")
    data_type = source.get("data_type") or "OD"
    if data_type == "VG" and not json_file.endswith(".jsonl"):
        raise DataError(f"{key}.data_type=VG reads referring expressions from an ODVG .jsonl file, but "
                        f"{key}.json_file={json_file!r} is not one")
    images = open_images(source.get("image_dir") or "", f"{key}.image_dir", cache_dir)
    if json_file.endswith(".jsonl"):
        label_map = local_path(source.get("label_map"), cache_dir, f"{key}.label_map")
        records, names, _ = read_odvg(json_file, label_map, images, skip_missing, data_type)
        return AnnotatedSource(json_file, records, images, names, data_type=data_type)
    if json_file.endswith(".json"):
        records, names, cat_ids, _ = read_coco(json_file, images, skip_missing, use_masks)
        return AnnotatedSource(json_file, records, images, names, cat_ids)
    raise DataError(f"{key}.json_file={json_file!r}: expected ODVG '.jsonl' or COCO '.json'")


def load_split(dataset: DictConfig, cache_dir: str, split: str, use_masks: bool = True) -> List[AnnotatedSource]:
    """Annotated sources of split "train", "val", "test" or "quant_calibration" (an empty list if the split has
    none)."""
    resolved = resolve_sources(dataset, cache_dir)[split]
    if resolved is None:
        return []
    entries: List[Optional[Dict[str, Any]]] = resolved if isinstance(resolved, list) else [resolved]
    key = f"dataset.{split}_data_sources"
    return [
        load_source(src, f"{key}[{i}]" if isinstance(resolved, list) else key, cache_dir,
                    dataset.skip_missing_images, use_masks)
        for i, src in enumerate(entries)
    ]
