"""The one training engine: every model's `action=train` builds its Lightning module and data module and
calls `fit`. Here live the trainer's construction (devices, strategy, precision, loggers incl. W&B, progress
bar, checkpoint files, exact-resume state, max time, validation interval), the automatic resume from the run
dir's latest checkpoint, the validation of the final weights, and the metrics returned to the sweeper."""

from __future__ import annotations

import logging
import time
from typing import Dict, List

import lightning as L
import torch
from omegaconf import DictConfig

from groundlab.engine.checkpoint_files import GroundlabCheckpoint
from groundlab.engine.data_base import ResumableDataModule
from groundlab.engine.devices import trainer_devices, trainer_precision
from groundlab.engine.module_base import GroundlabModule
from groundlab.engine.resume_state import ResumeState
from groundlab.engine.run_dirs import find_resume_checkpoint

log = logging.getLogger(__name__)


def _validation_interval(train: DictConfig, has_validation: bool) -> Dict[str, object]:
    if not has_validation:
        return {"limit_val_batches": 0}
    if train.validation_interval_unit == "step":
        return {"val_check_interval": train.validation_interval, "check_val_every_n_epoch": None}
    return {"check_val_every_n_epoch": train.validation_interval}


def _loggers(cfg: DictConfig) -> List[object]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    run_dir = cfg.results_dir
    loggers = [CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="tensorboard", version="")]
    if cfg.train.get("wandb"):
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project="groundlab", name=cfg.run_name, save_dir=run_dir))
    return loggers


def seed_run(seed: int) -> None:
    """Python, numpy and torch seeded before the model is built (its random weights) and the data read."""
    L.seed_everything(seed, workers=True, verbose=False)


def build_trainer(cfg: DictConfig, has_validation: bool = True, find_unused_parameters: bool = True) -> L.Trainer:
    """L.Trainer from the `train` group (TAO keys) for the run dir cfg.results_dir; find_unused_parameters: the
    module's DDP setting."""
    train = cfg.train
    accelerator, devices, num_nodes, strategy = trainer_devices(train, find_unused_parameters)
    callbacks = [GroundlabCheckpoint(cfg.results_dir, cfg.model.name, train.checkpoint_interval,
                                     train.checkpoint_interval_unit), ResumeState()]
    return L.Trainer(
        default_root_dir=cfg.results_dir, max_epochs=train.num_epochs, accelerator=accelerator, devices=devices,
        num_nodes=num_nodes, strategy=strategy, precision=trainer_precision(train),
        gradient_clip_val=train.clip_grad_norm or None, accumulate_grad_batches=train.get("accum_grad_batches", 1),
        logger=_loggers(cfg), enable_checkpointing=True, callbacks=callbacks,  # ours: no default ModelCheckpoint
        use_distributed_sampler=False,  # ResumableSampler shards over the ranks itself
        num_sanity_val_steps=0, log_every_n_steps=1, enable_model_summary=False, fast_dev_run=bool(train.get("is_dry_run", False)),
        max_time={"minutes": train.max_time_minutes} if train.max_time_minutes else None,
        **_validation_interval(train, has_validation),
    )


def fit(cfg: DictConfig, module: GroundlabModule, datamodule: ResumableDataModule,
        has_validation: bool = True) -> Dict[str, float]:
    """Train (resuming from train.resume_training_checkpoint_path or the run dir's latest checkpoint), validate
    the final weights if the last validation saw others, and return every scalar metric plus train_time_s,
    epochs and global_step."""
    trainer = build_trainer(cfg, has_validation, module.ddp_find_unused_parameters)
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info("%s: %.1f M parameters, %.1f M trained", cfg.model.name, total / 1e6, trainable / 1e6)
    resume = cfg.train.resume_training_checkpoint_path or find_resume_checkpoint(cfg.results_dir, cfg.model.name)
    if resume:
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if has_validation and module.last_metrics_step != trainer.global_step:
        # the final weights were not validated (max_time, an interval that does not divide the epochs, a finished
        # run resumed): validate them now, so the returned metric describes the checkpoint
        trainer.validate(module, datamodule=datamodule, verbose=False, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update(module.last_metrics)
    metrics.update(train_time_s=time.perf_counter() - start, epochs=float(trainer.current_epoch),
                   global_step=float(trainer.global_step))
    return metrics
