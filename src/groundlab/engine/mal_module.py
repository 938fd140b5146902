"""MAL training on Lightning: student trained with the MIL + CRF losses, EMA teacher updated after every
optimizer step, AdamW with warmup + cosine per step (lr scaled by devices x batch size, as TAO), mIoU
validation, and groundlab's checkpoint fields in every Lightning checkpoint."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from groundlab.eval.mask_miou import MaskIoUMeter
from groundlab.models.checkpoint import FORMAT, VERSION, load_checkpoint
from groundlab.engine.finite_loss import check_finite_loss
from groundlab.models.mal.build import build_mal_network, network_state
from groundlab.models.mal.criterion import MALCriterion
from groundlab.models.mal.postprocess import MALPostProcessor
from groundlab.eval.mask_miou import score_batch
from groundlab.predict.mal import MALPredictor
from groundlab.models.mal.vit_weights import load_mae_weights

log = logging.getLogger(__name__)


def warmup_cosine(epoch: float, warmup_epochs: float, max_epochs: float, lr: float, min_lr: float,
                  num_wave: float = 1.0) -> float:
    """MAL's schedule at a fractional epoch: linear warmup to lr, then cosine (num_wave waves) to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(1e-9, max_epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span * num_wave))


class MALLightning(L.LightningModule):
    """cfg: the composed config; class_names / category_ids: of the training json (stored in checkpoints);
    devices: number of training processes (the lr scales with it)."""

    def __init__(self, cfg: DictConfig, class_names: List[str], category_ids: List[int], devices: int = 1):
        super().__init__()
        self.cfg, self.class_names, self.category_ids = cfg, list(class_names), list(category_ids)
        self.student = build_mal_network(cfg.model, cfg.dataset.crop_size)
        if cfg.model.pretrained_path:
            log.info(load_mae_weights(self.student.backbone, cfg.model.pretrained_path).summary())
        self.teacher = copy.deepcopy(self.student)
        if cfg.train.pretrained_model_path:  # a MAL checkpoint: both networks start from it
            ckpt = load_checkpoint(cfg.train.pretrained_model_path)
            self.student.load_state_dict(network_state(ckpt, "student"))
            self.teacher.load_state_dict(network_state(ckpt, "teacher"))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.momentum = float(cfg.model.teacher_momentum)
        self.criterion = MALCriterion(cfg.train)
        self.post = MALPostProcessor(cfg.train.mask_thres)
        self.base_lr = cfg.train.lr * devices * cfg.train.batch_size
        self.min_lr = cfg.train.min_lr if cfg.train.min_lr > 0 else self.base_lr * cfg.train.min_lr_rate
        self.meter: Optional[MaskIoUMeter] = None
        self._ema_step = 0
        self.last_metrics: Dict[str, float] = {}
        self.last_metrics_step = -1

    def on_train_start(self) -> None:
        self._ema_step = self.global_step  # a resumed run: no extra EMA update before its first optimizer step

    def train(self, mode: bool = True):
        """The teacher is never in training mode (no drop path): it only follows the student."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------- training
    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None:
            dm.train_set.set_epoch(self.current_epoch)

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        student = self.student(batch["student"], batch["area"])
        with torch.no_grad():
            teacher = self.teacher(batch["teacher"], batch["area"])
        losses = self.criterion(student, teacher, batch["teacher"], batch["box_mask"], self.global_step)
        total = losses["loss_mil"] + losses["loss_crf"]
        check_finite_loss(total, self.global_step, self.current_epoch, batch_idx,
                          "Lower train.lr, set train.clip_grad_norm or use train.precision=fp32 (train.use_amp=false).")
        bs = batch["student"].shape[0]
        self.log("train_loss", total, prog_bar=True, batch_size=bs)
        self.log("train_loss_mil", losses["loss_mil"], batch_size=bs)
        self.log("train_loss_crf", losses["loss_crf"], batch_size=bs)
        return total

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, after every optimizer step (not every batch
        when gradients accumulate)."""
        if self.global_step == self._ema_step:
            return
        self._ema_step = self.global_step
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(self.momentum).add_(s.detach(), alpha=1 - self.momentum)
        for t, s in zip(self.teacher.buffers(), self.student.buffers()):
            t.copy_(s)

    def configure_optimizers(self):
        t = self.cfg.train
        if t.optim_type != "adamw":
            raise ValueError(f"train.optim_type={t.optim_type!r}: MAL trains with adamw")
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.base_lr, betas=tuple(t.optim_betas), eps=t.optim_eps,
                                      weight_decay=t.wd)
        max_epochs = max(1, self.trainer.max_epochs)
        steps_per_epoch = max(1, self.trainer.estimated_stepping_batches // max_epochs)

        def factor(step: int) -> float:
            lr = warmup_cosine(step / steps_per_epoch, t.warmup_epochs, max_epochs, self.base_lr, self.min_lr,
                               t.num_wave)
            return lr / self.base_lr

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- validation
    def predictor(self, evaluate_cfg: Optional[DictConfig] = None) -> MALPredictor:
        e = evaluate_cfg if evaluate_cfg is not None else self.cfg.get("evaluate")
        teacher = bool(e.get("use_teacher_test", False)) if e is not None else False
        mixed = bool(e.get("use_mixed_model_test", False)) if e is not None else False
        flip = bool(e.get("use_flip_test", False)) if e is not None else False
        return MALPredictor(self.student, self.teacher, teacher, mixed, flip)

    def on_validation_epoch_start(self) -> None:
        self.meter = MaskIoUMeter(len(self.class_names))

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        logits = self.predictor()(batch["teacher"], batch["area"])
        masks = self.post(logits, batch["ext"], batch["box"], batch["size"], batch["area"])
        score_batch(masks, batch, self.meter)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            states = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, self.meter.state())
            self.meter.merge(states)
        result = self.meter.compute(self.class_names)
        metrics = {k: float(v) for k, v in result.items() if k.startswith("mIoU") and v is not None}
        for k, v in metrics.items():
            self.log(f"val_{k}", v, prog_bar=k == "mIoU", sync_dist=False)
        self.last_metrics = {f"val_{k}": v for k, v in metrics.items()}
        self.last_metrics_step = self.global_step  # which weights they describe

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """The fields of a groundlab checkpoint (models/checkpoint.py) next to Lightning's own; the state dict
        holds `student.*` and `teacher.*`."""
        checkpoint.update({
            "format": FORMAT, "version": VERSION, "model_name": "mal",
            "model_config": OmegaConf.to_container(self.cfg.model, resolve=True),
            "crop_size": int(self.cfg.dataset.crop_size), "class_names": self.class_names,
            "category_ids": self.category_ids,
            "meta": {"current_epoch": self.current_epoch, "global_step": self.global_step},
        })
