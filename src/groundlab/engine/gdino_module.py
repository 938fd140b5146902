"""Grounding DINO training on Lightning: loss, AdamW groups + per-step schedule, validation with COCO mAP,
and groundlab's checkpoint fields in every Lightning checkpoint (so it also serves evaluate/inference)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from groundlab.text.captions import chunk_class_prompts
from groundlab.eval.coco_eval import CocoEvaluator
from groundlab.models.checkpoint import FORMAT, VERSION
from groundlab.engine.finite_loss import check_finite_loss
from groundlab.models.gdino.build import build_gdino
from groundlab.models.gdino.criterion import build_criterion
from groundlab.models.gdino.optim import build_optimizer, lr_lambda
from groundlab.models.gdino.postprocess import GroundingPostProcessor, merge_chunk_results
from groundlab.models.gdino.weights import load_weights

log = logging.getLogger(__name__)


class GDinoLightning(L.LightningModule):
    """cfg: the composed config. datamodule: a prepared GroundingDataModule (validation ground truth,
    category ids and label map come from it)."""

    def __init__(self, cfg: DictConfig, datamodule=None):
        super().__init__()
        self.cfg = cfg
        self.dm = datamodule
        self.model = build_gdino(cfg.model).model
        if cfg.train.pretrained_model_path:
            log.info(load_weights(self.model, cfg.train.pretrained_model_path).summary())
        self.model.train()  # from_pretrained() hands over the text encoder in eval mode
        self._freeze(cfg.train.freeze)
        self.model.set_activation_checkpointing(bool(cfg.train.activation_checkpoint))
        self.criterion = build_criterion(cfg.model)
        self.post = GroundingPostProcessor(cfg.model.num_select)
        self.evaluator: Optional[CocoEvaluator] = None
        self.last_metrics: Dict[str, float] = {}
        self.last_metrics_step = -1

    def _freeze(self, prefixes) -> None:
        """train.freeze: parameters whose names start with any prefix stop training (e.g. [backbone, bert])."""
        names = [n for n, _ in self.model.named_parameters()]
        for prefix in prefixes:
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
    def on_train_epoch_start(self) -> None:
        if self.dm is not None:
            self.dm.train_set.set_epoch(self.current_epoch)

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.criterion(self(batch, batch["targets"]), batch["targets"])
        total = self.criterion.weighted_total(losses)
        check_finite_loss(total, self.global_step, self.current_epoch, batch_idx,
                          "Lower train.optim.lr, raise train.clip_grad_norm or use train.precision=fp32.")
        bs = batch["images"].shape[0]
        self.log("train_loss", total, prog_bar=True, batch_size=bs)
        for key in ("loss_ce", "loss_bbox", "loss_giou"):
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
        class_ids = list(self.cfg.dataset.eval_class_ids) if self.cfg.dataset.eval_class_ids else None
        self.evaluator = CocoEvaluator(self.dm.val_gt_json, class_ids=class_ids)

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        sizes = torch.stack([t["orig_size"] for t in batch["targets"]]).to(self.device)
        if "input_ids" in batch:  # every class fits one prompt: also a validation loss
            outputs = self(batch)
            losses = self.criterion(outputs, batch["targets"])
            self.log("val_loss", self.criterion.weighted_total(losses), batch_size=len(sizes), sync_dist=True)
            results = self.post(outputs, sizes, [p.to(self.device) for p in batch["positive_maps"]])
            for r, class_ids in zip(results, batch["prompt_class_ids"]):
                r["labels"] = torch.as_tensor(class_ids, device=r["labels"].device)[r["labels"]]
        else:
            results = self._chunked_predictions(batch, sizes)
        for target, result in zip(batch["targets"], results):
            self.evaluator.update(int(target["image_id"]), {k: v.cpu() for k, v in result.items()},
                                  self.dm.val_category_ids)

    def _chunked_predictions(self, batch, sizes) -> List[Dict[str, torch.Tensor]]:
        """Class lists longer than one prompt: run each chunk, merge into one result per image."""
        names = self.dm.val_set.sources[0].class_names
        encoder = self.dm.val_set.encoder
        chunked = chunk_class_prompts(names, encoder.name_len, encoder.max_text_len)
        per_chunk = []
        for prompt in chunked.prompts:
            text = encoder.encode([prompt] * len(sizes))
            t = {k: v.to(self.device) for k, v in text.items() if torch.is_tensor(v)}
            out = self.model(batch["images"], t["input_ids"], t["attention_mask"], t["token_type_ids"],
                             t["position_ids"], t["text_self_attention_mask"], batch["padding_mask"])
            per_chunk.append(self.post(out, sizes, text["positive_maps"][0].to(self.device)))
        return merge_chunk_results(per_chunk, chunked, self.post.num_select)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:  # every rank evaluates the gathered predictions of all ranks
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, self.evaluator.state())
            merged = CocoEvaluator(self.dm.val_gt_json, class_ids=self.evaluator.class_ids)
            merged.merge(states)
            self.evaluator = merged
        stats = self.evaluator.summarize()["bbox"]
        ap = float(stats["AP"]) if stats["AP"] is not None else 0.0
        ap50 = float(stats["AP50"]) if stats["AP50"] is not None else 0.0
        self.log("val_mAP", ap, prog_bar=True, sync_dist=False)
        self.log("val_mAP50", ap50, prog_bar=True, sync_dist=False)
        self.last_metrics = {"val_mAP": ap, "val_mAP50": ap50}
        self.last_metrics_step = self.global_step  # which weights they describe

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """The fields of a groundlab checkpoint (see models/checkpoint.py) next to Lightning's own."""
        checkpoint.update({
            "format": FORMAT, "version": VERSION, "model_name": self.cfg.model.name,
            "model_config": OmegaConf.to_container(self.cfg.model, resolve=True),
            "class_names": list(self.dm.class_names) if self.dm is not None and self.dm.class_names else None,
            "text_config": self.model.bert.config.to_dict(), "state_dict_prefix": "model.",
            "meta": {"current_epoch": self.current_epoch, "global_step": self.global_step},  # 0-based epoch
        })
