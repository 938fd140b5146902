"""Grounding DINO's (and Mask Grounding DINO's) training steps on the shared engine: loss, AdamW groups + per-step
schedule, and validation through the predictor (every class prompted once per validation, the backbone once per
image), COCO bbox mAP, and segm mAP for a model with a mask head; a referring-expression (data_type VG) validation
source is scored instead by the union of each expression's predicted masks: val_gIoU, val_cIoU, val_N_acc,
val_T_acc (eval/referring_metrics.py), with evaluate.*'s thresholds."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig

from groundlab.data.bad_images import log_skipped
from groundlab.data.collate import unpadded_sizes
from groundlab.io.remote_files import local_path
from groundlab.engine.module_base import GroundlabModule
from groundlab.eval.coco_eval import CocoEvaluator
from groundlab.eval.referring_metrics import ReferringMetrics
from groundlab.models.gdino.build import build_gdino, criterion_for
from groundlab.models.gdino.optim import build_optimizer, lr_lambda
from groundlab.models.gdino.weights import load_weights
from groundlab.models.mask_gdino.referring_postprocess import prediction_union
from groundlab.predict.gdino import GDinoPredictor

log = logging.getLogger(__name__)

# TAO's fine-tuning spec freezes ["backbone.0", "bert"]: its image backbone is IDEA's `backbone.0`, ours `backbone.body`
TAO_FREEZE_PREFIXES = {"backbone.0": "backbone.body"}


class GDinoLightning(GroundlabModule):
    """cfg: the composed config. datamodule: a prepared GroundingDataModule (validation ground truth,
    category ids, class names and label map come from it)."""

    loss_remedy = "Lower train.optim.lr, raise train.clip_grad_norm or use train.precision=fp32."

    def __init__(self, cfg: DictConfig, datamodule=None):
        super().__init__(cfg)
        self.dm = datamodule
        self.model = build_gdino(cfg.model).model
        if cfg.train.pretrained_model_path:
            path = local_path(cfg.train.pretrained_model_path, cfg.cache_dir, "train.pretrained_model_path")
            log.info(load_weights(self.model, path).summary())
        self.model.train()  # from_pretrained() hands over the text encoder in eval mode
        self._freeze(cfg.train.freeze)
        self.model.set_activation_checkpointing(bool(cfg.train.activation_checkpoint))
        self.criterion = criterion_for(cfg.model)
        # Mask Grounding DINO validates its masks too (COCO segm AP)
        self.iou_types = ("bbox", "segm") if cfg.model.get("has_mask") else ("bbox",)
        self.evaluator: Optional[CocoEvaluator] = None
        self.referring: Optional[ReferringMetrics] = None  # a data_type VG validation source
        self.predictor: Optional[GDinoPredictor] = None  # made at the first validation, on its device
        self._bad_val_images: set = set()  # undecodable validation images already named in the log

    def _freeze(self, prefixes) -> None:
        """train.freeze: parameters whose names start with any prefix stop training (e.g. [backbone, bert])."""
        names = [n for n, _ in self.model.named_parameters()]
        for prefix in prefixes:
            prefix = TAO_FREEZE_PREFIXES.get(prefix, prefix)
            hit = [n for n in names if n.startswith(prefix)]
            if not hit:
                raise ValueError(f"train.freeze: no parameter name starts with {prefix!r} "
                                 f"(top-level modules: {sorted({n.split('.')[0] for n in names})})")
            for n, p in self.model.named_parameters():
                if n.startswith(prefix):
                    p.requires_grad_(False)
            for n, m in self.model.named_modules():  # frozen parts also stop dropout / drop path
                if n == prefix or n.startswith(prefix + "."):
                    m.eval()

    def forward(self, batch: Dict[str, Any], targets: Optional[list] = None) -> Dict[str, Any]:
        """targets (training): enable the denoising queries when model.dn_number > 0."""
        return self.model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                          batch["position_ids"], batch["text_self_attention_mask"], batch["padding_mask"], targets)

    def transfer_batch_to_device(self, batch: Dict[str, Any], device, dataloader_idx: int) -> Dict[str, Any]:
        """Tensors (and the targets' tensors) to the device; prompts and names stay as they are."""
        def move(v):
            return v.to(device, non_blocking=True) if torch.is_tensor(v) else v

        out = {k: move(v) for k, v in batch.items()}
        out["targets"] = [{k: move(v) for k, v in t.items()} for t in batch["targets"]]
        if "positive_maps" in batch:
            out["positive_maps"] = [move(p) for p in batch["positive_maps"]]
        return out

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.criterion(self(batch, batch["targets"]), batch["targets"])
        total = self.criterion.weighted_total(losses)
        self.check_loss(total, batch_idx)
        bs = batch["images"].shape[0]
        self.log("train_loss", total, prog_bar=True, batch_size=bs)
        for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_nt", "loss_minimap",
                    "loss_union"):
            if key in losses:
                self.log(f"train_{key}", losses[key], batch_size=bs)
        return total

    def configure_optimizers(self):
        optim_cfg = self.cfg.train.optim
        optimizer = build_optimizer(self.model, optim_cfg)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(optim_cfg, steps_per_epoch, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        if self.dm.val_referring:
            self.referring = ReferringMetrics()
        else:
            class_ids = list(self.cfg.dataset.eval_class_ids) if self.cfg.dataset.eval_class_ids else None
            self.evaluator = CocoEvaluator(self.dm.val_gt_json, iou_types=self.iou_types, class_ids=class_ids)
        if self.predictor is None or self.predictor.device != self.device:
            self.predictor = GDinoPredictor.from_model(self.model, self.cfg.model, self.device)
        self.predictor.texts.clear()  # the text encoder may have trained since the last validation

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        if self.referring is not None:
            return self._validate_expressions(batch)
        for bad in batch.get("skipped", ()):  # undecodable: an image without detections, named once per run
            if bad.file_name not in self._bad_val_images:
                self._bad_val_images.add(bad.file_name)
                log_skipped(bad, "validated as an image without detections")
            self.evaluator.update(bad.image_id, {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
                                                 "boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 1, 1)},
                                  self.dm.val_category_ids)
        if batch["images"] is None:
            return
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
        names = self.dm.val_set.sources[0].class_names
        chunked = self.predictor.chunked(names)
        outputs = self.predictor.run_chunks(batch["images"], batch["padding_mask"], chunked)
        if len(chunked.prompts) == 1 and "positive_map" in batch["targets"][0]:
            # every class fits one prompt, the one the targets' positive maps were made for: also a loss
            losses = self.criterion(outputs[0], batch["targets"])
            self.log("val_loss", self.criterion.weighted_total(losses), batch_size=len(sizes), sync_dist=True)
        results = self.predictor.postprocess_chunks(outputs, sizes, unpadded_sizes(batch["padding_mask"]), chunked)
        for target, result in zip(batch["targets"], results):
            self.evaluator.update(int(target["image_id"]), {k: v.cpu() for k, v in result.items()},
                                  self.dm.val_category_ids)

    def _validate_expressions(self, batch: Dict[str, Any]) -> None:
        for bad in batch.get("skipped", ()):  # no ground truth to score against: named once, left out
            if bad.file_name not in self._bad_val_images:
                self._bad_val_images.add(bad.file_name)
                log_skipped(bad, "left out of the referring metrics")
        if batch["images"] is None:
            return
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]])
        results = self.predictor.detect_expressions(batch["images"], batch["padding_mask"], sizes, batch["prompts"],
                                                    self.cfg.evaluate)
        for target, result in zip(batch["targets"], results):
            self.referring.update(prediction_union(result["masks"]).cpu(), target["vg_union"].cpu(),
                                  bool(target["empty"]), sample_id=int(target["image_id"]))

    def _referring_epoch_end(self) -> None:
        metrics = ReferringMetrics().merge(self.gather(self.referring.state())).compute()
        # a fraction with no sample to count (N_acc without no-target expressions) is NaN: not logged
        logged = {f"val_{k.replace('@0.', '')}": v for k, v in metrics.items()  # Pr@0.7 -> val_Pr7
                  if not k.startswith("num_") and v == v}
        self.record_validation(logged, prog_bar=("val_gIoU", "val_N_acc", "val_T_acc"))

    def on_validation_epoch_end(self) -> None:
        if self.referring is not None:
            return self._referring_epoch_end()
        if self.trainer.world_size > 1:  # every rank evaluates the gathered predictions of all ranks
            merged = CocoEvaluator(self.dm.val_gt_json, iou_types=self.iou_types, class_ids=self.evaluator.class_ids)
            merged.merge(self.gather(self.evaluator.state()))
            self.evaluator = merged
        summary = self.evaluator.summarize()
        # box metrics keep Grounding DINO's names (TAO's monitor is the box mAP50); masks add segm_val_*
        metrics = {"val_mAP": float(summary["bbox"]["AP"] or 0.0), "val_mAP50": float(summary["bbox"]["AP50"] or 0.0)}
        if "segm" in summary:
            metrics.update({"segm_val_mAP": float(summary["segm"]["AP"] or 0.0),
                            "segm_val_mAP50": float(summary["segm"]["AP50"] or 0.0)})
        self.record_validation(metrics, prog_bar=("val_mAP50", "segm_val_mAP50"))

    # ---------------------------------------------------------------------------------------- checkpoints
    def checkpoint_fields(self) -> Dict[str, Any]:
        return {"class_names": list(self.dm.class_names) if self.dm is not None and self.dm.class_names else None,
                "text_config": self.model.bert.config.to_dict(), "state_dict_prefix": "model."}
