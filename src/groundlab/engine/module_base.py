"""What every groundlab Lightning module shares, so model modules keep only their own steps: the groundlab
checkpoint fields next to Lightning's (models/checkpoint.py), cross-rank gathering of validation state,
which weights the last validation described, and the non-finite-loss stop."""

from __future__ import annotations

from typing import Any, Dict, List

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from groundlab.engine.finite_loss import check_finite_loss
from groundlab.models.checkpoint import FORMAT, VERSION


class GroundlabModule(L.LightningModule):
    """cfg: the composed config. Subclasses implement training_step / validation hooks and
    `checkpoint_fields()`; `loss_remedy` names the config keys that help against a non-finite loss;
    `ddp_find_unused_parameters` is DDP's setting for this model."""

    loss_remedy = "Lower the learning rate, clip gradients or use train.precision=fp32."
    # DDP's find_unused_parameters. On for every model: MAL as TAO's MAL trainer; Grounding DINO too, as some of its
    # batches leave parameters out of the graph (seen: input_proj.3, the extra level, without a gradient on some
    # 48-64 px synthetic crops), which DDP without the search stops on
    ddp_find_unused_parameters = True

    def __init__(self, cfg: DictConfig):
        super().__init__()
        self.cfg = cfg
        self.last_metrics: Dict[str, float] = {}
        self.last_metrics_step = -1  # the global step whose weights last_metrics describe

    # ------------------------------------------------------------------------------------------- training
    def check_loss(self, total: torch.Tensor, batch_idx: int) -> None:
        check_finite_loss(total, self.global_step, self.current_epoch, batch_idx, self.loss_remedy)

    # ----------------------------------------------------------------------------------------- validation
    def gather(self, state: Any) -> List[Any]:
        """Every rank's `state` (a picklable object), in rank order; [state] in a single process."""
        if self.trainer.world_size <= 1:
            return [state]
        states: List[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def record_validation(self, metrics: Dict[str, float], prog_bar: tuple = ()) -> None:
        """Log `metrics` (already computed over all ranks) and remember which weights they describe."""
        for key, value in metrics.items():
            self.log(key, float(value), prog_bar=key in prog_bar, sync_dist=False)
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        self.last_metrics_step = self.global_step

    # ---------------------------------------------------------------------------------------- checkpoints
    def checkpoint_fields(self) -> Dict[str, Any]:
        """Model-specific fields of a groundlab checkpoint (class names, text config, ...)."""
        return {}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """The fields of a groundlab checkpoint (see models/checkpoint.py) next to Lightning's own, so one file
        resumes training and feeds evaluate / inference."""
        checkpoint.update({
            "format": FORMAT, "version": VERSION, "model_name": self.cfg.model.name,
            "model_config": OmegaConf.to_container(self.cfg.model, resolve=True),
            "meta": {"current_epoch": self.current_epoch, "global_step": self.global_step},  # 0-based epoch
            **self.checkpoint_fields(),
        })
