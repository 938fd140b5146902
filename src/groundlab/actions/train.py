"""action=train: each model's recipe builds its data module (data read and checked before the first step) and
its Lightning module, then the one training engine (groundlab.engine.trainer.fit) runs them: checkpoints every
interval, exact resume from the run dir's latest checkpoint (or train.resume_training_checkpoint_path), the
final weights validated, the metrics returned to the sweeper."""

from __future__ import annotations

from typing import Dict

from omegaconf import DictConfig

from groundlab.engine.devices import process_count
from groundlab.engine.trainer import fit, seed_run


def train_gdino(cfg: DictConfig) -> Dict[str, float]:
    """Grounding DINO (and Mask Grounding DINO's detector)."""
    from groundlab.engine.gdino_data import GroundingDataModule
    from groundlab.engine.gdino_module import GDinoLightning

    seed_run(cfg.seed)
    datamodule = GroundingDataModule(cfg).prepare()
    return fit(cfg, GDinoLightning(cfg, datamodule), datamodule, has_validation=datamodule.val_set is not None)


def train_mal(cfg: DictConfig) -> Dict[str, float]:
    """The Mask Auto-Labeler (student + EMA teacher; the lr scales with processes x batch size, as TAO)."""
    from groundlab.engine.mal_data import MALDataModule
    from groundlab.engine.mal_module import MALLightning

    seed_run(cfg.seed)
    datamodule = MALDataModule(cfg).prepare()
    module = MALLightning(cfg, datamodule.train_data.class_names, datamodule.train_data.category_ids,
                          process_count(cfg.train))
    return fit(cfg, module, datamodule, has_validation=datamodule.val_set is not None)
