"""action=evaluate for Grounding DINO: COCO bbox AP of a checkpoint (groundlab, HF or IDEA layout) on a COCO
json with any category ids. Prompts hold every class name (split into several prompts when too long and
merged back); results are written with the original ids. Writes <results_dir>/evaluate/results.json with the
12 COCO stats and per-class AP, and detections.json."""

from __future__ import annotations

import json
import logging
import os
from typing import Dict

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from groundlab.config import ConfigError
from groundlab.text.captions import chunk_class_prompts
from groundlab.data.collate import GroundingCollator
from groundlab.data.grounding_dataset import GroundingDataset
from groundlab.data.sources import load_split
from groundlab.text.tokenizer import load_tokenizer
from groundlab.text.tokens import PromptEncoder
from groundlab.data.transforms import build_eval_transforms
from groundlab.eval.coco_eval import CocoEvaluator, write_results_json
from groundlab.models.gdino.build import build_gdino
from groundlab.models.gdino.postprocess import GroundingPostProcessor, merge_chunk_results

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Dict[str, float]:
    ev = cfg.evaluate
    if cfg.model.name == "mal":
        from groundlab.actions.mal_evaluate import run as run_mal

        return run_mal(cfg)
    if not ev.checkpoint:
        raise ConfigError("evaluate.checkpoint is required (a groundlab .pth, an HF directory or an IDEA .pth).")
    split = "test" if cfg.dataset.test_data_sources.json_file and cfg.dataset.type != "synthetic" else "val"
    sources = load_split(cfg.dataset, cfg.cache_dir, split, use_masks=False)
    if not sources or not len(sources[0].records):
        raise ConfigError(f"dataset.{split}_data_sources holds no images to evaluate.")
    source = sources[0]
    if source.category_ids is None:
        raise ConfigError(f"dataset.{split}_data_sources.json_file must be a COCO json (the ground truth).")
    device = torch.device("cuda" if torch.cuda.is_available() and ev.num_gpus > 0 else "cpu")
    built = build_gdino(cfg.model, ev.checkpoint)
    model = built.model.to(device).eval()
    encoder = PromptEncoder(load_tokenizer(built.config.text_encoder_type), built.config.max_text_len)
    dataset = GroundingDataset([source], encoder, build_eval_transforms(cfg.dataset.augmentation), train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.workers,
                                         collate_fn=GroundingCollator(encoder))
    class_ids = list(cfg.dataset.eval_class_ids) if cfg.dataset.eval_class_ids else None
    evaluator = CocoEvaluator(source.name, class_ids=class_ids)
    chunked = chunk_class_prompts(source.class_names, encoder.name_len, built.config.max_text_len)
    post = GroundingPostProcessor(built.config.num_select)
    texts = []
    with torch.no_grad():
        for prompt in chunked.prompts:  # each prompt's text encoded once for the whole run
            tok = encoder.encode([prompt])
            t = {k: v.to(device) for k, v in tok.items() if torch.is_tensor(v)}
            texts.append((model.encode_text(t["input_ids"], t["attention_mask"], t["token_type_ids"],
                                            t["position_ids"], t["text_self_attention_mask"]),
                          tok["positive_maps"][0].to(device)))
        detections = []
        for batch in tqdm(loader, desc="evaluate", unit="batch"):
            images, padding = batch["images"].to(device), batch["padding_mask"].to(device)
            sizes = torch.stack([t["orig_size"] for t in batch["targets"]]).to(device)
            per_chunk = [post(model.forward_with_text(images, text, padding), sizes, pmap) for text, pmap in texts]
            results = merge_chunk_results(per_chunk, chunked, post.num_select)
            for target, result in zip(batch["targets"], results):
                keep = result["scores"] >= ev.conf_threshold
                result = {k: v[keep].cpu() for k, v in result.items()}
                evaluator.update(int(target["image_id"]), result, source.category_ids)
                for s, l, b in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()):
                    detections.append({"image_id": int(target["image_id"]), "category_id": source.category_ids[l],
                                       "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    summary = evaluator.summarize()["bbox"]
    out_dir = os.path.join(cfg.results_dir, "evaluate")
    os.makedirs(out_dir, exist_ok=True)
    log.info("\n%s", summary.get("report", ""))
    stats = {k: v for k, v in summary.items() if k != "report"}
    write_results_json(os.path.join(out_dir, "results.json"), stats,
                       {"checkpoint": ev.checkpoint, "annotations": source.name, "num_prompts": len(chunked.prompts)})
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(detections, f)
    return {"mAP": float(summary["AP"]), "mAP50": float(summary["AP50"]), "mAP75": float(summary["AP75"])}
