"""action=train for MAL (model=mal): Lightning trainer (devices, DDP, precision, accumulation, loggers),
data read and checked before the first step, checkpoints every `save_every_k_epoch`, automatic resume
from the run dir's latest checkpoint (or train.resume_training_checkpoint_path)."""

from __future__ import annotations

import logging
import time
from typing import Dict

import torch
from omegaconf import DictConfig

from groundlab.config import ConfigError

log = logging.getLogger(__name__)


def precision(train: DictConfig) -> str:
    """train.precision when set (fp16/bf16), else TAO's use_amp: fp16 autocast on a GPU, fp32 on a CPU."""
    from groundlab.actions.train import PRECISION

    if train.precision not in PRECISION:
        raise ConfigError(f"train.precision={train.precision!r} is not one of {list(PRECISION)}")
    if train.precision == "fp32" and train.use_amp and torch.cuda.is_available():
        return PRECISION["fp16"]
    return PRECISION[train.precision]


def run(cfg: DictConfig) -> Dict[str, float]:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from groundlab.actions.train import trainer_devices
    from groundlab.engine.mal_data import MALDataModule
    from groundlab.engine.checkpoint_files import GroundlabCheckpoint, find_resume_checkpoint
    from groundlab.engine.mal_module import MALLightning

    train, run_dir = cfg.train, cfg.results_dir
    L.seed_everything(cfg.seed, workers=True)
    datamodule = MALDataModule(cfg).prepare()  # bad data fails here, before any training
    accelerator, devices, strategy = trainer_devices(train)
    n_devices = (len(devices) if isinstance(devices, list) else int(devices)) * train.num_nodes
    module = MALLightning(cfg, datamodule.train_data.class_names, datamodule.train_data.category_ids, n_devices)
    if train.activation_checkpoint:
        module.student.backbone.set_activation_checkpointing(True)
    trainer = L.Trainer(
        default_root_dir=run_dir, max_epochs=train.num_epochs, accelerator=accelerator, devices=devices,
        num_nodes=train.num_nodes, strategy=strategy, precision=precision(train),
        gradient_clip_val=train.clip_grad_norm or None, accumulate_grad_batches=train.accum_grad_batches,
        logger=[CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="tensorboard", version="")],
        enable_checkpointing=False, callbacks=[GroundlabCheckpoint(run_dir, "mal", train.save_every_k_epoch)],
        num_sanity_val_steps=0, log_every_n_steps=1, check_val_every_n_epoch=train.val_interval,
        limit_val_batches=None if datamodule.val_set is not None else 0,
        max_time={"minutes": train.max_time_minutes} if train.max_time_minutes else None,
    )
    resume = train.resume_training_checkpoint_path or find_resume_checkpoint(run_dir, "mal")
    if resume:
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if datamodule.val_set is not None and module.last_metrics_step != trainer.global_step:
        # the final weights were not validated (max_time, val_interval, a finished run resumed): do it now
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update(module.last_metrics)
    metrics.update(train_time_s=time.perf_counter() - start, epochs=float(trainer.current_epoch),
                   global_step=float(trainer.global_step))
    return metrics
