"""action=train for Grounding DINO: Lightning trainer (devices, strategy, precision, clipping, loggers),
data read and checked before the first step, checkpoints every interval, automatic resume from the run
dir's latest checkpoint (or train.resume_training_checkpoint_path)."""

from __future__ import annotations

import logging
import time
from typing import Dict

import torch
from omegaconf import DictConfig

from groundlab.config import ConfigError

log = logging.getLogger(__name__)

PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def trainer_devices(train: DictConfig):
    """(accelerator, devices, strategy) from train.num_gpus / gpu_ids / distributed_strategy."""
    if not torch.cuda.is_available() or train.num_gpus < 1:
        return "cpu", 1, "auto"
    devices = list(train.gpu_ids)[: train.num_gpus] if train.gpu_ids else train.num_gpus
    n = len(devices) if isinstance(devices, list) else devices
    if n * train.num_nodes == 1:
        return "gpu", devices, "auto"
    if train.distributed_strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return "gpu", devices, FSDPStrategy()
    from lightning.pytorch.strategies import DDPStrategy

    return "gpu", devices, DDPStrategy(find_unused_parameters=False)


def _interval(value: int, unit: str) -> Dict[str, object]:
    if unit == "step":
        return {"val_check_interval": value, "check_val_every_n_epoch": None}
    return {"check_val_every_n_epoch": value}


def run(cfg: DictConfig) -> Dict[str, float]:
    if cfg.model.name == "mal":
        from groundlab.actions.mal_train import run as run_mal

        return run_mal(cfg)
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from groundlab.engine.gdino_data import GroundingDataModule
    from groundlab.engine.checkpoint_files import GroundlabCheckpoint, find_resume_checkpoint
    from groundlab.engine.gdino_module import GDinoLightning

    train = cfg.train
    if train.precision not in PRECISION:
        raise ConfigError(f"train.precision={train.precision!r} is not one of {list(PRECISION)}")
    run_dir = cfg.results_dir
    L.seed_everything(cfg.seed, workers=True)
    datamodule = GroundingDataModule(cfg).prepare()  # bad data fails here, before any training
    module = GDinoLightning(cfg, datamodule)
    accelerator, devices, strategy = trainer_devices(train)
    loggers = [CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="tensorboard", version="")]
    if train.get("wandb"):
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project="groundlab", save_dir=run_dir))
    trainer = L.Trainer(
        default_root_dir=run_dir, max_epochs=train.num_epochs, accelerator=accelerator, devices=devices,
        num_nodes=train.num_nodes, strategy=strategy, precision=PRECISION[train.precision],
        gradient_clip_val=train.clip_grad_norm or None, logger=loggers, enable_checkpointing=False,
        callbacks=[GroundlabCheckpoint(run_dir, cfg.model.name, train.checkpoint_interval,
                                       train.checkpoint_interval_unit)],
        num_sanity_val_steps=0, log_every_n_steps=1, fast_dev_run=bool(train.is_dry_run),
        max_time={"minutes": train.max_time_minutes} if train.max_time_minutes else None,
        **_interval(train.validation_interval, train.validation_interval_unit),
    )
    resume = train.resume_training_checkpoint_path or find_resume_checkpoint(run_dir, cfg.model.name)
    if resume:
        log.info("resuming from %s", resume)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if module.last_metrics_step != trainer.global_step:  # the final weights were not validated (max_time, an
        # interval that does not divide the epochs, a finished run resumed): validate them now
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics.update(module.last_metrics)
    metrics["train_time_s"] = time.perf_counter() - start
    metrics["epochs"] = float(trainer.current_epoch)
    metrics["global_step"] = float(trainer.global_step)
    return metrics
