"""MAL training on Lightning: student trained with the MIL + CRF losses, EMA teacher updated after every
optimizer step, AdamW with warmup + cosine per step (lr scaled by devices x batch size, as TAO), mIoU
validation, and groundlab's checkpoint fields in every Lightning checkpoint."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig

from groundlab.data.bad_images import log_skipped
from groundlab.io.remote_files import local_path
from groundlab.engine.module_base import GroundlabModule
from groundlab.eval.mask_miou import MaskIoUMeter, score_batch
from groundlab.models.checkpoint import load_checkpoint
from groundlab.models.mal.build import build_mal_network, network_state
from groundlab.models.mal.criterion import MALCriterion
from groundlab.models.mal.vit_weights import load_mae_weights
from groundlab.predict.mal import MALPredictor

log = logging.getLogger(__name__)


def warmup_cosine(epoch: float, warmup_epochs: float, max_epochs: float, lr: float, min_lr: float,
                  num_wave: float = 1.0) -> float:
    """MAL's schedule at a fractional epoch: linear warmup to lr, then cosine (num_wave waves) to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(1e-9, max_epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span * num_wave))


class MALLightning(GroundlabModule):
    """cfg: the composed config; class_names / category_ids: of the training json (stored in checkpoints);
    devices: number of training processes (the lr scales with it)."""

    ddp_find_unused_parameters = True  # as TAO's MAL trainer (said here, whatever the base default becomes)
    loss_remedy = "Lower train.lr, set train.clip_grad_norm or use train.precision=fp32 (train.use_amp=false)."

    def __init__(self, cfg: DictConfig, class_names: List[str], category_ids: List[int], devices: int = 1):
        super().__init__(cfg)
        self.class_names, self.category_ids = list(class_names), list(category_ids)
        self.student = build_mal_network(cfg.model, cfg.dataset.crop_size)
        if cfg.model.pretrained_path:
            path = local_path(cfg.model.pretrained_path, cfg.cache_dir, "model.pretrained_path")
            log.info(load_mae_weights(self.student.backbone, path).summary())
        self.teacher = copy.deepcopy(self.student)
        if cfg.train.pretrained_model_path:  # a MAL checkpoint: both networks start from it
            ckpt = load_checkpoint(local_path(cfg.train.pretrained_model_path, cfg.cache_dir,
                                              "train.pretrained_model_path"))
            self.student.load_state_dict(network_state(ckpt, "student"))
            self.teacher.load_state_dict(network_state(ckpt, "teacher"))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.momentum = float(cfg.model.teacher_momentum)
        self.criterion = MALCriterion(cfg.train)
        self.base_lr = cfg.train.lr * devices * cfg.train.batch_size
        self.min_lr = cfg.train.min_lr if cfg.train.min_lr > 0 else self.base_lr * cfg.train.min_lr_rate
        self.meter: Optional[MaskIoUMeter] = None
        self.predictor: Optional[MALPredictor] = None  # made at each validation, on its device
        self._bad_val_images: set = set()  # undecodable validation images already named in the log
        if cfg.train.activation_checkpoint:
            self.student.backbone.set_activation_checkpointing(True)

    def train(self, mode: bool = True):
        """The teacher is never in training mode (no drop path): it only follows the student."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        student = self.student(batch["student"], batch["area"])
        with torch.no_grad():
            teacher = self.teacher(batch["teacher"], batch["area"])
        losses = self.criterion(student, teacher, batch["teacher"], batch["box_mask"], self.global_step)
        total = losses["loss_mil"] + losses["loss_crf"]
        self.check_loss(total, batch_idx)
        bs = batch["student"].shape[0]
        self.log("train_loss", total, prog_bar=True, batch_size=bs)
        self.log("train_loss_mil", losses["loss_mil"], batch_size=bs)
        self.log("train_loss_crf", losses["loss_crf"], batch_size=bs)
        return total

    def optimizer_step(self, *args, **kwargs) -> None:
        """EMA right after each optimizer step (once per step under gradient accumulation), inside the step, so
        a checkpoint written at the end of the batch already holds the teacher of that step."""
        super().optimizer_step(*args, **kwargs)
        self._ema_update()

    @torch.no_grad()
    def _ema_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student; buffers copied."""
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
    def on_validation_epoch_start(self) -> None:
        self.meter = MaskIoUMeter(len(self.class_names))
        # validation scores the student (evaluate's teacher / mixed / flip options apply to action=evaluate)
        self.predictor = MALPredictor.from_model(self.student, self.cfg.model.mask_thres, self.device)

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        for bad in batch.get("skipped", ()):  # boxes of an undecodable image are left out, the image named once
            if bad.file_name not in self._bad_val_images:
                self._bad_val_images.add(bad.file_name)
                log_skipped(bad, "its boxes are left out of the validation mIoU")
        if "teacher" not in batch:
            return
        score_batch(self.predictor(batch), batch, self.meter)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            self.meter.merge(self.gather(self.meter.state()))
        result = self.meter.compute(self.class_names)
        self.record_validation({f"val_{k}": float(v) for k, v in result.items() if k.startswith("mIoU") and v is not None},
                               prog_bar=("val_mIoU",))

    # ---------------------------------------------------------------------------------------- checkpoints
    def checkpoint_fields(self) -> Dict[str, Any]:
        """The state dict holds `student.*` and `teacher.*`; crops are rebuilt at crop_size."""
        return {"crop_size": int(self.cfg.dataset.crop_size), "class_names": self.class_names,
                "category_ids": self.category_ids}
